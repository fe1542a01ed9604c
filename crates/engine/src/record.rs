//! The record of an applied patch, kept in the target itself.
//!
//! Every patch mapping starts with a read-only header page: a magic, a length and a JSON
//! [`PatchRecord`]. The mapping is a memfd named `suture:<patch id>`, so `/proc/PID/maps` shows
//! it on every kernel, and `status` (or an agent that restarted) learns what a process carries
//! from the process alone, with no outside database to drift out of date.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::procfs::{Mapping, Memory};

pub const MAGIC: &[u8; 8] = b"SUTURE-P";
pub const RECORD_VERSION: u32 = 1;
/// Prefix of the memfd name; maps shows it as `/memfd:suture:<id> (deleted)`.
pub const MEMFD_PREFIX: &str = "suture:";
const MAX_RECORD: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRecord {
    pub id: String,
    pub level: u32,
    /// Content address (SHA-256) of the bundle that was applied.
    pub bundle_sha256: String,
    pub build_id: String,
    pub module: String,
    pub cves: Vec<String>,
    /// Seconds since the epoch.
    pub applied_at: u64,
    /// Fingerprint of the key that signed the bundle.
    pub signer: String,
    /// The whole patch mapping, header included.
    pub base: u64,
    pub len: u64,
    /// Where the patch's code lies (threads must not be in it when it is removed).
    pub text_start: u64,
    pub text_end: u64,
    pub functions: Vec<Detour>,
    /// The patch's unwind tables as registered with the process's unwinder
    /// (`__register_frame_info`), and the unwinder's bookkeeping object; 0 when not registered.
    #[serde(default)]
    pub eh_frame: u64,
    #[serde(default)]
    pub eh_object: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detour {
    pub symbol: String,
    /// Runtime address and size of the replaced function.
    pub address: u64,
    pub size: u64,
    /// Where calls go now.
    pub replacement: u64,
    /// The original bytes under the detour, hex.
    pub saved: String,
}

impl PatchRecord {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self)?;
        let mut out = Vec::with_capacity(16 + json.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        Ok(out)
    }

    /// Reads the record at the start of a patch mapping.
    pub fn read(mem: &Memory, base: u64) -> Result<PatchRecord> {
        let head = mem.read(base, 16)?;
        if &head[..8] != MAGIC {
            bail!("mapping at {base:#x} has no suture patch header");
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version != RECORD_VERSION {
            bail!("patch header at {base:#x} has unknown version {version}");
        }
        let len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
        if len > MAX_RECORD {
            bail!("patch header at {base:#x} is implausibly large ({len} bytes)");
        }
        let json = mem.read(base + 16, len as usize)?;
        serde_json::from_slice(&json)
            .with_context(|| format!("patch header at {base:#x} is corrupt"))
    }

    /// The runtime range a replaced function `symbol` occupies, if this patch detours it.
    pub fn detour(&self, address: u64) -> Option<&Detour> {
        self.functions.iter().find(|d| d.address == address)
    }
}

/// Is this mapping the first page of a patch of ours?
pub fn is_patch_mapping(m: &Mapping) -> bool {
    m.offset == 0 && m.path.starts_with(&format!("/memfd:{MEMFD_PREFIX}"))
}

/// Every patch the process carries, in the order they were applied.
pub fn applied_patches(mem: &Memory, maps: &[Mapping]) -> Result<Vec<PatchRecord>> {
    let mut out = Vec::new();
    for m in maps.iter().filter(|m| is_patch_mapping(m)) {
        out.push(PatchRecord::read(mem, m.start)?);
    }
    out.sort_by_key(|r| (r.applied_at, r.level));
    Ok(out)
}
