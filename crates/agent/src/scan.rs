//! Which processes map which modules, by build-id, at the cost of a build-id: the ELF header,
//! the program headers and the note segment of each mapped file, read through
//! `/proc/PID/map_files` (so a process in another mount namespace is read through its own
//! view), cached by file identity. A whole-file read per module of every process on the host
//! would take seconds on a busy host; this takes milliseconds.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

/// (device, inode, size, mtime) of a mapped file.
type FileKey = (u64, u64, u64, i64);

#[derive(Default)]
pub struct Scanner {
    cache: HashMap<FileKey, Option<Vec<u8>>>,
}

const PT_NOTE: u32 = 4;
const NT_GNU_BUILD_ID: u32 = 3;

impl Scanner {
    pub fn new() -> Scanner {
        Scanner::default()
    }

    /// The build-ids of the ELF files process `pid` maps (empty for a kernel thread or a
    /// process that is gone).
    pub fn build_ids(&mut self, pid: i32) -> Vec<Vec<u8>> {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            return Vec::new();
        };
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut out = Vec::new();
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (Some(range), Some(_perms), Some(offset), Some(dev), Some(inode)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let path = f.next().unwrap_or("");
            // The ELF header sits at file offset 0: the module's first mapping.
            if inode == "0" || !path.starts_with('/') || !offset.trim_start_matches('0').is_empty()
            {
                continue;
            }
            if !seen.insert((dev.to_string(), inode.to_string())) {
                continue;
            }
            let Ok(file) = File::open(format!("/proc/{pid}/map_files/{range}")) else {
                continue;
            };
            let Ok(meta) = file.metadata() else { continue };
            let key = (meta.dev(), meta.ino(), meta.size(), meta.mtime());
            let id = self
                .cache
                .entry(key)
                .or_insert_with(|| read_build_id(&file))
                .clone();
            if let Some(id) = id {
                out.push(id);
            }
        }
        out
    }

    /// For each wanted build-id, the processes (not this one) mapping a module with it.
    pub fn processes_mapping(&mut self, wanted: &HashSet<Vec<u8>>) -> HashMap<Vec<u8>, Vec<i32>> {
        let mut out: HashMap<Vec<u8>, Vec<i32>> = HashMap::new();
        if wanted.is_empty() {
            return out;
        }
        let me = std::process::id() as i32;
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        let mut pids: Vec<i32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&p| p != me)
            .collect();
        pids.sort_unstable();
        for pid in pids {
            for id in self.build_ids(pid) {
                if wanted.contains(&id) {
                    let v = out.entry(id).or_default();
                    if !v.contains(&pid) {
                        v.push(pid);
                    }
                }
            }
        }
        // Forget files no longer seen, so the cache does not grow without bound.
        if self.cache.len() > 8192 {
            self.cache.clear();
        }
        out
    }
}

fn read_at(f: &File, off: u64, len: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).ok()?;
    Some(b)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The GNU build-id of a 64-bit little-endian ELF file, from its note segments only.
pub fn read_build_id(f: &File) -> Option<Vec<u8>> {
    let h = read_at(f, 0, 64)?;
    if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return None;
    }
    let phoff = u64_at(&h, 32)?;
    let phentsize = u16_at(&h, 54)? as u64;
    let phnum = u16_at(&h, 56)? as u64;
    if phentsize < 56 || phnum == 0 || phnum > 256 {
        return None;
    }
    let ph = read_at(f, phoff, (phentsize * phnum) as usize)?;
    for i in 0..phnum as usize {
        let p = &ph[i * phentsize as usize..];
        if u32_at(p, 0)? != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(p, 8)?, u64_at(p, 32)?);
        if size > 1 << 16 {
            continue;
        }
        let notes = read_at(f, off, size as usize)?;
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let namesz = u32_at(&notes, at)? as usize;
            let descsz = u32_at(&notes, at + 4)? as usize;
            let ty = u32_at(&notes, at + 8)?;
            let name_at = at + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let next = desc_at + descsz.div_ceil(4) * 4;
            if next > notes.len() + 3 {
                break;
            }
            if ty == NT_GNU_BUILD_ID && notes.get(name_at..name_at + namesz) == Some(b"GNU\0") {
                return notes.get(desc_at..desc_at + descsz).map(<[u8]>::to_vec);
            }
            at = next;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_running_program_by_the_build_id_of_its_file() {
        let sleep = std::path::Path::new("/bin/sleep");
        let id = read_build_id(&File::open(sleep).unwrap()).expect("sleep has a build-id");
        let readelf = std::process::Command::new("readelf")
            .args(["-n", "/bin/sleep"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&readelf.stdout).contains(&hex::encode(&id)),
            "readelf agrees"
        );
        let mut child = std::process::Command::new(sleep).arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let mut scanner = Scanner::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // Right after the spawn the child may not have exec'd yet.
        while !scanner.build_ids(pid).contains(&id) {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep never showed up"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let wanted: HashSet<Vec<u8>> = [id.clone()].into_iter().collect();
        let map = scanner.processes_mapping(&wanted);
        let _ = child.kill();
        let _ = child.wait();
        assert!(map[&id].contains(&pid));
        assert!(!map[&id].contains(&(std::process::id() as i32)));
    }
}
