//! Ed25519 keys in one-line text files, and the set of keys a host trusts.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::BundleError;

const SECRET_TAG: &str = "suture-secret-key";
const PUBLIC_TAG: &str = "suture-public-key";
/// A public key file is one line of about 110 bytes; anything much larger is not one.
pub const MAX_KEY_FILE: u64 = 4096;

fn key_err(msg: impl Into<String>) -> BundleError {
    BundleError::Key(msg.into())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[derive(Clone)]
pub struct SecretKey {
    pub(crate) signing: SigningKey,
    name: String,
}

#[derive(Clone, Debug)]
pub struct PublicKey {
    pub(crate) verifying: VerifyingKey,
    name: String,
}

/// Keys are equal when their key bytes are: the name is only a label.
impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.verifying == other.verifying
    }
}

impl Eq for PublicKey {}

/// Parses `TAG ed25519 HEX NAME`.
fn parse_line(text: &str, tag: &str, path: &Path) -> Result<([u8; 32], String), BundleError> {
    let bad = || key_err(format!("{}: not a {tag} file", path.display()));
    let mut f = text.split_whitespace();
    if f.next() != Some(tag) || f.next() != Some("ed25519") {
        return Err(bad());
    }
    let bytes = hex::decode(f.next().ok_or_else(bad)?).map_err(|_| bad())?;
    let name = f.next().ok_or_else(bad)?.to_string();
    if f.next().is_some() || !valid_name(&name) {
        return Err(bad());
    }
    let arr: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
    Ok((arr, name))
}

fn trust_err(msg: impl Into<String>) -> BundleError {
    BundleError::Trust(msg.into())
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Refuses `path` (a trust directory or key file, `meta` its status) when someone other than
/// root or us can change it: then whoever that is decides which patches root applies.
fn check_owner_and_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), BundleError> {
    let mode = meta.mode() & 0o7777;
    let uid = meta.uid();
    let me = effective_uid();
    if uid != 0 && uid != me {
        let who = if me == 0 {
            "root".to_string()
        } else {
            format!("root or uid {me}")
        };
        return Err(trust_err(format!(
            "{} is owned by uid {uid}, not {who} (mode {mode:04o}): its owner could make us trust any key",
            path.display()
        )));
    }
    if mode & 0o022 != 0 {
        return Err(trust_err(format!(
            "{} is writable by {} (mode {mode:04o}, owner uid {uid}); chmod go-w it",
            path.display(),
            match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "group and others",
                (true, false) => "its group",
                _ => "others",
            }
        )));
    }
    Ok(())
}

/// Opens and reads a key file with every check made on the opened file itself. In a trust
/// directory (`in_dir`) a symbolic link is refused: it would lead out of the directory whose
/// permissions were checked. A path given explicitly may be a link to a key file.
fn read_trusted_file(path: &Path, in_dir: bool) -> Result<Vec<u8>, BundleError> {
    let io = |error| BundleError::Io {
        path: path.display().to_string(),
        error,
    };
    if in_dir {
        let lmeta = std::fs::symlink_metadata(path).map_err(io)?;
        if lmeta.file_type().is_symlink() {
            return Err(trust_err(format!(
                "{} is a symbolic link; a trusted key must be a regular file in the trust directory",
                path.display()
            )));
        }
    }
    // O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: in a trust directory,
    // a link swapped in after the check above fails here instead of being followed.
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    if in_dir {
        flags |= libc::O_NOFOLLOW;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(trust_err(format!(
            "{} is {what}; a key must be a regular file",
            path.display()
        )));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(trust_err(format!(
            "{} is {} bytes; a key file is one line of at most {MAX_KEY_FILE} bytes",
            path.display(),
            meta.len()
        )));
    }
    check_owner_and_mode(path, &meta)?;
    // The file may grow after fstat: never read more than the limit.
    let mut bytes = Vec::with_capacity(256);
    (&mut file)
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(trust_err(format!(
            "{} grew past {MAX_KEY_FILE} bytes while being read",
            path.display()
        )));
    }
    Ok(bytes)
}

/// A public key file's contents (text that is not one is a `Key` error, never fatal in a
/// trust directory).
fn parse_public(bytes: &[u8], path: &Path) -> Result<PublicKey, BundleError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| key_err(format!("{}: not a {PUBLIC_TAG} file", path.display())))?;
    let (key, name) = parse_line(text, PUBLIC_TAG, path)?;
    PublicKey::from_bytes(key, &name)
}

impl SecretKey {
    pub fn load(path: &Path) -> Result<SecretKey, BundleError> {
        let meta = std::fs::metadata(path).map_err(|error| BundleError::Io {
            path: path.display().to_string(),
            error,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(key_err(format!(
                "{} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        // The same careful read as a trusted key: never block on a FIFO, never read a device
        // or a huge file.
        let bytes = read_trusted_file(path, false)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| key_err(format!("{}: not a {SECRET_TAG} file", path.display())))?;
        let (seed, name) = parse_line(text, SECRET_TAG, path)?;
        Ok(SecretKey {
            signing: SigningKey::from_bytes(&seed),
            name,
        })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            verifying: self.signing.verifying_key(),
            name: self.name.clone(),
        }
    }
}

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32], name: &str) -> Result<PublicKey, BundleError> {
        let verifying = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| key_err("not a valid Ed25519 public key"))?;
        Ok(PublicKey {
            verifying,
            name: name.to_string(),
        })
    }

    /// Reads a public key file. Only a regular file of at most [`MAX_KEY_FILE`] bytes that
    /// nobody but root (or the invoking user) can write is read; the checks are made on the
    /// opened file, so a FIFO, a device or a file swapped in after the check is never read.
    pub fn load(path: &Path) -> Result<PublicKey, BundleError> {
        parse_public(&read_trusted_file(path, false)?, path)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.verifying.to_bytes()
    }

    /// First 16 hex digits of the SHA-256 of the key.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.to_bytes()))[..16].to_string()
    }

    /// The name from the key file ("" for a key read out of a bundle).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Writes DIR/NAME.key (mode 0600 from creation) and DIR/NAME.pub; never overwrites.
pub fn generate_keypair(name: &str, out_dir: &Path) -> Result<(PathBuf, PathBuf), BundleError> {
    if !valid_name(name) {
        return Err(key_err(format!(
            "key name {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ -"
        )));
    }
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| key_err(format!("no randomness: {e}")))?;
    let secret = SecretKey {
        signing: SigningKey::from_bytes(&seed),
        name: name.into(),
    };
    let key_path = out_dir.join(format!("{name}.key"));
    let pub_path = out_dir.join(format!("{name}.pub"));
    if pub_path.exists() {
        return Err(key_err(format!(
            "{} exists; refusing to overwrite",
            pub_path.display()
        )));
    }
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |error| BundleError::Io { path: p, error }
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    writeln!(f, "{SECRET_TAG} ed25519 {} {name}", hex::encode(seed)).map_err(io(&key_path))?;
    f.sync_all().map_err(io(&key_path))?;
    let public = secret.public();
    let mut p = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&pub_path)
        .map_err(io(&pub_path))?;
    writeln!(
        p,
        "{PUBLIC_TAG} ed25519 {} {name}",
        hex::encode(public.to_bytes())
    )
    .map_err(io(&pub_path))?;
    Ok((key_path, pub_path))
}

#[derive(Clone, Debug, Default)]
pub struct TrustStore {
    keys: Vec<PublicKey>,
}

impl TrustStore {
    pub const DEFAULT_DIR: &'static str = "/etc/suture/trusted.d";

    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, k: PublicKey) {
        if self.find(&k).is_none() {
            self.keys.push(k);
        }
    }

    /// The keys in `paths` (given explicitly, so any of them that cannot be used is an error).
    pub fn load_files(paths: &[PathBuf]) -> Result<Self, BundleError> {
        let mut s = Self::new();
        for p in paths {
            s.add(PublicKey::load(p)?);
        }
        Ok(s)
    }

    /// Every `*.pub` in `dir`; a missing folder is an empty store.
    ///
    /// The directory and each key file must be writable by nobody but root (or the invoking
    /// user), and each key must be a small regular file: anything else is refused with the
    /// reason, since it would let someone else choose what root trusts. A file that is simply
    /// not a key (wrong format) is skipped with a warning, so one stray file does not stop
    /// every patch.
    pub fn load_dir(dir: &Path) -> Result<Self, BundleError> {
        let mut s = Self::new();
        let io = |error| BundleError::Io {
            path: dir.display().to_string(),
            error,
        };
        let meta = match std::fs::metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(s),
            Err(e) => return Err(io(e)),
        };
        if !meta.is_dir() {
            return Err(trust_err(format!("{} is not a directory", dir.display())));
        }
        check_owner_and_mode(dir, &meta)?;
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let p = entry.map_err(io)?.path();
            if p.extension().is_some_and(|x| x == "pub") {
                paths.push(p);
            }
        }
        paths.sort();
        for p in paths {
            match parse_public(&read_trusted_file(&p, true)?, &p) {
                Ok(k) => s.add(k),
                Err(e) => {
                    tracing::warn!(path = %p.display(), "skipping a file that is not a public key: {e}")
                }
            }
        }
        Ok(s)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    pub(crate) fn find(&self, k: &PublicKey) -> Option<&PublicKey> {
        self.keys.iter().find(|t| t.verifying == k.verifying)
    }
}
