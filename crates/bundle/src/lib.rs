//! The patch bundle: one signed `.suture` file carrying a live patch for one module.
//!
//! ```text
//! magic     "SUTURE\0" + container version (1)          8 bytes
//! u32 LE    manifest length (<= 1 MiB)
//!           manifest: compact JSON of [`Manifest`], fields in declaration order
//! u32 LE    object length (<= 64 MiB)
//!           the new code: an x86-64 ELF relocatable object (ET_REL)
//! 32 bytes  signer's Ed25519 public key
//! 64 bytes  Ed25519 signature over "suture-bundle-v1\0" + every byte before the key
//! ```
//!
//! Parsing is strict and bounded: exact length, limits on every field, and the manifest must
//! re-serialise to exactly the bytes that were signed, so one patch has one byte string. That
//! makes the SHA-256 of the file a true content address: any HTTP cache or object store can
//! hold bundles by hash.

mod keys;
mod manifest;

use std::io::{Read, Write};
use std::path::Path;

use ed25519_dalek::{Signature, Signer};
use sha2::{Digest, Sha256};

pub use keys::{generate_keypair, PublicKey, SecretKey, TrustStore};
pub use manifest::{BindTarget, Binding, FunctionPatch, Manifest, ModuleRef, FORMAT_VERSION};

pub const MAGIC: &[u8; 8] = b"SUTURE\x00\x01";
const DOMAIN: &[u8] = b"suture-bundle-v1\0";
pub const MAX_MANIFEST: usize = 1 << 20;
pub const MAX_OBJECT: usize = 64 << 20;
const MAX_FILE: u64 = 80 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a suture bundle (bad magic)")]
    BadMagic,
    #[error("unsupported bundle container version {0}")]
    ContainerVersion(u8),
    #[error("bundle is truncated: {0}")]
    Truncated(String),
    #[error("bundle has {0} unexpected trailing bytes")]
    Trailing(usize),
    #[error("bundle {what} is too large ({len} bytes, limit {limit})")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("bundle manifest is not valid: {0}")]
    Manifest(String),
    #[error("manifest field `{field}`: {reason}")]
    Field { field: String, reason: String },
    #[error("bundle manifest is not in canonical form (it was re-encoded after signing)")]
    NotCanonical,
    #[error("bundle object is not an x86-64 ELF relocatable object: {0}")]
    Object(&'static str),
    #[error("bundle signed by untrusted key {fingerprint} ({name})")]
    Untrusted { fingerprint: String, name: String },
    #[error("bundle signature does not verify: the bundle was modified after signing")]
    BadSignature,
    #[error("key: {0}")]
    Key(String),
    /// A trust directory or key file that is unsafe to read or to trust (not a regular file,
    /// too large, or writable by someone other than its owner, root).
    #[error("trust store refused: {0}")]
    Trust(String),
    /// (The I/O error is in the message, not the source chain: it would print twice.)
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |error| BundleError::Io {
        path: path.display().to_string(),
        error,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub manifest: Manifest,
    pub object: Vec<u8>,
    pub signer: PublicKey,
    pub signature: [u8; 64],
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn check_object(object: &[u8]) -> Result<(), BundleError> {
    if object.is_empty() {
        return Err(BundleError::Object("empty"));
    }
    if object.len() < 64 || &object[..4] != b"\x7fELF" {
        return Err(BundleError::Object("no ELF header"));
    }
    if object[4] != 2 || object[5] != 1 {
        return Err(BundleError::Object("not 64-bit little-endian"));
    }
    if u16::from_le_bytes([object[16], object[17]]) != 1 {
        return Err(BundleError::Object("not ET_REL"));
    }
    if u16::from_le_bytes([object[18], object[19]]) != 62 {
        return Err(BundleError::Object("not EM_X86_64"));
    }
    Ok(())
}

/// The signed prefix: magic, manifest and object.
fn body(manifest_json: &[u8], object: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + manifest_json.len() + object.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(manifest_json.len() as u32).to_le_bytes());
    out.extend_from_slice(manifest_json);
    out.extend_from_slice(&(object.len() as u32).to_le_bytes());
    out.extend_from_slice(object);
    out
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(body);
    m
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], BundleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| {
                BundleError::Truncated(format!(
                    "expected {n} bytes of {what}, found {}",
                    self.data.len() - self.pos
                ))
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<usize, BundleError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

impl Bundle {
    /// Validates the manifest and object, and signs them.
    pub fn sign(
        manifest: Manifest,
        object: Vec<u8>,
        key: &SecretKey,
    ) -> Result<Bundle, BundleError> {
        manifest.validate()?;
        check_object(&object)?;
        if object.len() > MAX_OBJECT {
            return Err(BundleError::TooLarge {
                what: "object",
                len: object.len() as u64,
                limit: MAX_OBJECT as u64,
            });
        }
        let json = manifest.to_canonical()?;
        let sig = key.signing.sign(&signed_message(&body(&json, &object)));
        Ok(Bundle {
            manifest,
            object,
            signer: key.public(),
            signature: sig.to_bytes(),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Validated at construction, so encoding cannot fail.
        let json = self.manifest.to_canonical().unwrap_or_default();
        let mut out = body(&json, &self.object);
        out.extend_from_slice(&self.signer.to_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Strict parse of a bundle file's bytes. Does not check trust or the signature.
    pub fn parse(bytes: &[u8]) -> Result<Bundle, BundleError> {
        let mut r = Reader {
            data: bytes,
            pos: 0,
        };
        let magic = r.take(8, "magic").map_err(|_| BundleError::BadMagic)?;
        if magic[..7] != MAGIC[..7] {
            return Err(BundleError::BadMagic);
        }
        if magic[7] != MAGIC[7] {
            return Err(BundleError::ContainerVersion(magic[7]));
        }
        let mlen = r.u32("manifest length")?;
        if mlen > MAX_MANIFEST {
            return Err(BundleError::TooLarge {
                what: "manifest",
                len: mlen as u64,
                limit: MAX_MANIFEST as u64,
            });
        }
        let json = r.take(mlen, "manifest")?;
        let olen = r.u32("object length")?;
        if olen > MAX_OBJECT {
            return Err(BundleError::TooLarge {
                what: "object",
                len: olen as u64,
                limit: MAX_OBJECT as u64,
            });
        }
        let object = r.take(olen, "object")?;
        let key = r.take(32, "signer key")?;
        let sig = r.take(64, "signature")?;
        if r.pos != bytes.len() {
            return Err(BundleError::Trailing(bytes.len() - r.pos));
        }
        let manifest: Manifest =
            serde_json::from_slice(json).map_err(|e| BundleError::Manifest(e.to_string()))?;
        manifest.validate()?;
        if manifest.to_canonical()? != json {
            return Err(BundleError::NotCanonical);
        }
        check_object(object)?;
        let mut k = [0u8; 32];
        k.copy_from_slice(key);
        let mut s = [0u8; 64];
        s.copy_from_slice(sig);
        Ok(Bundle {
            manifest,
            object: object.to_vec(),
            signer: PublicKey::from_bytes(k, "")?,
            signature: s,
        })
    }

    pub fn read_file(path: &Path) -> Result<Bundle, BundleError> {
        let f = std::fs::File::open(path).map_err(io(path))?;
        let len = f.metadata().map_err(io(path))?.len();
        if len > MAX_FILE {
            return Err(BundleError::TooLarge {
                what: "file",
                len,
                limit: MAX_FILE,
            });
        }
        let mut data = Vec::with_capacity(len as usize);
        f.take(MAX_FILE + 1)
            .read_to_end(&mut data)
            .map_err(io(path))?;
        Bundle::parse(&data)
    }

    /// Writes atomically: a temporary file in the same folder, fsync, rename.
    pub fn write_file(&self, path: &Path) -> Result<(), BundleError> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&self.to_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, path).map_err(io(path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// The signer must be trusted, and the signature must verify. Returns the trusted key
    /// (which carries the name the host knows it by).
    pub fn verify<'t>(&self, trust: &'t TrustStore) -> Result<&'t PublicKey, BundleError> {
        let Some(trusted) = trust.find(&self.signer) else {
            return Err(BundleError::Untrusted {
                fingerprint: self.signer.fingerprint(),
                name: "not in the trust store".into(),
            });
        };
        let json = self.manifest.to_canonical()?;
        let msg = signed_message(&body(&json, &self.object));
        trusted
            .verifying
            .verify_strict(&msg, &Signature::from_bytes(&self.signature))
            .map_err(|_| BundleError::BadSignature)?;
        Ok(trusted)
    }

    pub fn content_address(&self) -> String {
        sha256_hex(&self.to_bytes())
    }
}
