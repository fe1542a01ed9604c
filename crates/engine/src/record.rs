//! The record of an applied patch, kept in the target itself.
//!
//! Every patch mapping starts with a read-only header page: a magic, a length and a JSON
//! [`PatchRecord`]. The mapping is a memfd named `suture:<patch id>`, so `/proc/PID/maps` shows
//! it on every kernel, and `status` (or an agent that restarted) learns what a process carries
//! from the process alone, with no outside database to drift out of date.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use suture_detour::{decode_jmp, DETOUR_LEN};

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
    /// The engine's landing stub for calls into the process (in the patch's engine page).
    #[serde(default)]
    pub landing: u64,
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
    m.offset == 0 && is_patch_memory(m)
}

/// Is this mapping (any part of) patch memory of ours?
pub fn is_patch_memory(m: &Mapping) -> bool {
    m.path
        .strip_prefix("/memfd:")
        .is_some_and(|name| name.starts_with(MEMFD_PREFIX))
}

/// What a patch mapping found in a process really is. A record is believed only as far as the
/// process's own code confirms it: `applied` means every detour is in place and leads into this
/// mapping's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchState {
    /// Every detour is in place and leads into this patch's code.
    Applied,
    /// Some detours are in place, not all (an operation was cut short between writes).
    Partial,
    /// No detour leads into it: memory left by an interrupted operation, inherited without its
    /// detours, or made up by the process. It changes nothing the process runs.
    Orphaned,
    /// The record does not match the memory it sits in (forged or damaged); never acted on.
    Invalid,
}

impl PatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            PatchState::Applied => "applied",
            PatchState::Partial => "partial",
            PatchState::Orphaned => "orphaned",
            PatchState::Invalid => "invalid",
        }
    }
}

/// A patch mapping as found in a process, with what checking it against the process showed.
#[derive(Debug, Clone, Serialize)]
pub struct FoundPatch {
    pub state: PatchState,
    /// Why it is not `applied`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The id in the mapping's name (the record's own id when there is a record).
    pub name: String,
    /// Where the mapping starts and ends (every mapping of the memfd).
    pub start: u64,
    pub end: u64,
    /// Detours found in place, of `record.functions`.
    pub detours_in_place: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<PatchRecord>,
}

/// Every patch mapping of the process, each checked against the process's memory.
pub fn found_patches(mem: &Memory, maps: &[Mapping]) -> Vec<FoundPatch> {
    let mut out = Vec::new();
    for m in maps.iter().filter(|m| is_patch_mapping(m)) {
        let name = m
            .path
            .trim_start_matches("/memfd:")
            .trim_start_matches(MEMFD_PREFIX)
            .trim_end_matches(" (deleted)")
            .to_string();
        // The whole patch: this memfd's mappings, contiguous from the first page.
        let mut end = m.end;
        for n in maps.iter().filter(|n| n.inode == m.inode && n.dev == m.dev) {
            if n.start == end {
                end = n.end;
            }
        }
        let mut found = FoundPatch {
            state: PatchState::Orphaned,
            reason: None,
            name,
            start: m.start,
            end,
            detours_in_place: 0,
            record: None,
        };
        match mem.read(m.start, 8) {
            Ok(head) if head[..] == MAGIC[..] => match PatchRecord::read(mem, m.start) {
                Ok(rec) => {
                    match verify(&rec, &found, maps) {
                        Err(why) => {
                            found.state = PatchState::Invalid;
                            found.reason = Some(why);
                        }
                        Ok(()) => {
                            let n = rec.functions.len();
                            let k = rec
                                .functions
                                .iter()
                                .filter(|d| {
                                    mem.read(d.address, DETOUR_LEN).is_ok_and(|b| {
                                        decode_jmp(d.address, &b) == Some(d.replacement)
                                    })
                                })
                                .count();
                            found.detours_in_place = k;
                            (found.state, found.reason) = if k == n && n > 0 {
                                (PatchState::Applied, None)
                            } else if k == 0 {
                                (
                                    PatchState::Orphaned,
                                    Some("no detour leads into it".to_string()),
                                )
                            } else {
                                (
                                    PatchState::Partial,
                                    Some(format!("{k} of {n} detours in place")),
                                )
                            };
                        }
                    }
                    found.record = Some(rec);
                }
                Err(e) => {
                    found.state = PatchState::Invalid;
                    found.reason = Some(format!("{e:#}"));
                }
            },
            Ok(_) => {
                found.reason =
                    Some("patch memory without its record (an operation was interrupted)".into())
            }
            Err(e) => {
                found.state = PatchState::Invalid;
                found.reason = Some(format!("{e:#}"));
            }
        }
        out.push(found);
    }
    out
}

/// Does the record describe the memory it sits in?
fn verify(rec: &PatchRecord, found: &FoundPatch, maps: &[Mapping]) -> Result<(), String> {
    if rec.id != found.name && !found.name.starts_with(&rec.id) {
        return Err(format!(
            "record names patch {} but sits in memory named {}",
            rec.id, found.name
        ));
    }
    if rec.base != found.start || rec.base.checked_add(rec.len) != Some(found.end) {
        return Err("record does not describe the memory it sits in".into());
    }
    if !(rec.base < rec.text_start && rec.text_start <= rec.text_end && rec.text_end <= found.end) {
        return Err("record's code range lies outside its memory".into());
    }
    if rec.text_end > rec.text_start {
        let text = maps
            .iter()
            .find(|m| m.contains(rec.text_start))
            .ok_or("record's code is not mapped")?;
        if !text.executable || text.writable || text.end < rec.text_end {
            return Err("record's code is not in read-only executable memory".into());
        }
    }
    // Function calls we make in the process return through it: a page of this memory that
    // nothing can write, or a record that is not ours.
    if rec.landing != 0 {
        const PAGE: u64 = 4096;
        let inside = rec.landing.is_multiple_of(PAGE)
            && rec.landing >= rec.base
            && rec
                .landing
                .checked_add(PAGE)
                .is_some_and(|e| e <= found.end);
        let page = maps.iter().find(|m| m.contains(rec.landing));
        if !inside || !page.is_some_and(|m| m.executable && !m.writable) {
            return Err(
                "record's landing page is not read-only executable memory of its own".into(),
            );
        }
    }
    for d in &rec.functions {
        if d.replacement < rec.text_start || d.replacement >= rec.text_end {
            return Err(format!(
                "detour of `{}` leads outside the patch's code",
                d.symbol
            ));
        }
        if hex::decode(&d.saved).map(|v| v.len()) != Ok(DETOUR_LEN) {
            return Err(format!("saved bytes of `{}` are malformed", d.symbol));
        }
    }
    Ok(())
}

/// The patches the process verifiably carries (state `applied`), in the order they were
/// applied.
pub fn applied_patches(mem: &Memory, maps: &[Mapping]) -> Result<Vec<PatchRecord>> {
    let mut out: Vec<PatchRecord> = found_patches(mem, maps)
        .into_iter()
        .filter(|f| f.state == PatchState::Applied)
        .filter_map(|f| f.record)
        .collect();
    out.sort_by_key(|r| (r.applied_at, r.level));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::parse_maps;

    /// A patch of four pages at 0x10000: header, code, data, engine page.
    fn patch(landing: u64) -> (PatchRecord, FoundPatch, Vec<Mapping>) {
        let maps = parse_maps(
            "10000-11000 r--p 00000000 00:01 7 /memfd:suture:p-L1 (deleted)\n\
             11000-12000 r-xp 00001000 00:01 7 /memfd:suture:p-L1 (deleted)\n\
             12000-13000 rw-p 00002000 00:01 7 /memfd:suture:p-L1 (deleted)\n\
             13000-14000 r-xp 00003000 00:01 7 /memfd:suture:p-L1 (deleted)\n\
             20000-21000 r-xp 00000000 fe:01 9 /usr/bin/other\n",
        )
        .unwrap();
        let rec = PatchRecord {
            id: "p-L1".into(),
            level: 1,
            bundle_sha256: String::new(),
            build_id: String::new(),
            module: String::new(),
            cves: Vec::new(),
            applied_at: 0,
            signer: String::new(),
            base: 0x10000,
            len: 0x4000,
            text_start: 0x11000,
            text_end: 0x11100,
            landing,
            functions: Vec::new(),
            eh_frame: 0,
            eh_object: 0,
        };
        let found = FoundPatch {
            state: PatchState::Orphaned,
            reason: None,
            name: "p-L1".into(),
            start: 0x10000,
            end: 0x14000,
            detours_in_place: 0,
            record: None,
        };
        (rec, found, maps)
    }

    #[test]
    fn a_landing_page_must_be_read_only_code_of_the_patch_itself() {
        for (landing, ok) in [
            (0x13000, true),  // the engine page
            (0, true),        // none (a record from before landing pages were recorded)
            (0x12000, false), // the patch's writable data
            (0x13008, false), // not a page
            (0x20000, false), // someone else's code
            (0x14000, false), // past the end
            (!0xfff, false),
        ] {
            let (rec, found, maps) = patch(landing);
            assert_eq!(verify(&rec, &found, &maps).is_ok(), ok, "{landing:#x}");
        }
    }
}
