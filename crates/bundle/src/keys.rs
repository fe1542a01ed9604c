//! Ed25519 keys in one-line text files, and the set of keys a host trusts.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::BundleError;

const SECRET_TAG: &str = "suture-secret-key";
const PUBLIC_TAG: &str = "suture-public-key";

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

impl SecretKey {
    pub fn load(path: &Path) -> Result<SecretKey, BundleError> {
        let meta = std::fs::metadata(path).map_err(|source| BundleError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(key_err(format!(
                "{} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| BundleError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let (seed, name) = parse_line(&text, SECRET_TAG, path)?;
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

    pub fn load(path: &Path) -> Result<PublicKey, BundleError> {
        let text = std::fs::read_to_string(path).map_err(|source| BundleError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let (bytes, name) = parse_line(&text, PUBLIC_TAG, path)?;
        PublicKey::from_bytes(bytes, &name)
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
        move |source| BundleError::Io { path: p, source }
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

    pub fn load_files(paths: &[PathBuf]) -> Result<Self, BundleError> {
        let mut s = Self::new();
        for p in paths {
            s.add(PublicKey::load(p)?);
        }
        Ok(s)
    }

    /// Every `*.pub` in `dir`; a missing folder is an empty store.
    pub fn load_dir(dir: &Path) -> Result<Self, BundleError> {
        let mut s = Self::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(s),
            Err(source) => {
                return Err(BundleError::Io {
                    path: dir.display().to_string(),
                    source,
                })
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pub"))
            .collect();
        paths.sort();
        for p in paths {
            s.add(PublicKey::load(&p)?);
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
