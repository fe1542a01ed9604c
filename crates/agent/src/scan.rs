//! Which processes map which modules, by build-id, at the cost of a build-id: the engine's
//! identity scan ([`suture_engine::modules::identity`]: ELF header, program headers and notes of
//! each mapped file, read through the process's own view and cached by file identity).

use std::collections::{HashMap, HashSet};

use suture_engine::modules;
use suture_engine::procfs;

/// A host scan. The engine keeps the per-file cache; this keeps the maps of the processes
/// the last scan found, until the next one (what they carry is read from the same maps).
#[derive(Default)]
pub struct Scanner {
    maps: HashMap<i32, Vec<procfs::Mapping>>,
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner::default()
    }

    /// The maps the last [`Scanner::processes_mapping`] read for `pid`, if it found it.
    pub fn maps_of(&self, pid: i32) -> Option<&[procfs::Mapping]> {
        self.maps.get(&pid).map(Vec::as_slice)
    }

    /// The build-ids of the ELF files process `pid` maps (empty for a kernel thread or a
    /// process that is gone).
    pub fn build_ids(&mut self, pid: i32) -> Vec<Vec<u8>> {
        procfs::read_maps(pid)
            .map(|maps| build_ids_in(pid, &maps))
            .unwrap_or_default()
    }

    /// For each wanted build-id, the processes (not this one) mapping a module with it.
    pub fn processes_mapping(&mut self, wanted: &HashSet<Vec<u8>>) -> HashMap<Vec<u8>, Vec<i32>> {
        let mut out: HashMap<Vec<u8>, Vec<i32>> = HashMap::new();
        self.maps.clear();
        if wanted.is_empty() {
            return out;
        }
        let me = std::process::id() as i32;
        let Ok(pids) = procfs::all_pids() else {
            return out;
        };
        for pid in pids.into_iter().filter(|&p| p != me) {
            let Ok(maps) = procfs::read_maps(pid) else {
                continue;
            };
            let mut found = false;
            for id in build_ids_in(pid, &maps) {
                if wanted.contains(&id) {
                    found = true;
                    let v = out.entry(id).or_default();
                    if !v.contains(&pid) {
                        v.push(pid);
                    }
                }
            }
            if found {
                self.maps.insert(pid, maps);
            }
        }
        out
    }
}

/// The build-ids of the ELF files in `maps` (process `pid`'s).
fn build_ids_in(pid: i32, maps: &[procfs::Mapping]) -> Vec<Vec<u8>> {
    let mut seen: HashSet<(&str, u64)> = HashSet::new();
    let mut out = Vec::new();
    // The ELF header sits at file offset 0: the module's first mapping.
    for m in maps.iter().filter(|m| m.is_file() && m.offset == 0) {
        if !seen.insert((m.dev.as_str(), m.inode)) {
            continue;
        }
        if let Some(id) = modules::identity(pid, m)
            .ok()
            .and_then(|i| i.build_id.clone())
        {
            out.push(id);
        }
    }
    out
}

/// A path to the file with this build-id in `maps` (process `pid`'s):
/// `/proc/PID/map_files/…`, which reaches the file whatever mount namespace the process lives in.
pub fn mapped_file(
    pid: i32,
    maps: &[procfs::Mapping],
    build_id: &[u8],
) -> Option<std::path::PathBuf> {
    maps.iter()
        .filter(|m| m.is_file() && m.offset == 0)
        .find(|m| {
            modules::identity(pid, m)
                .ok()
                .and_then(|i| i.build_id.clone())
                .is_some_and(|id| id == build_id)
        })
        .map(|m| m.map_file(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_running_program_by_the_build_id_of_its_file() {
        let sleep = std::path::Path::new("/bin/sleep");
        let id = suture_module::read_build_id(&std::fs::read(sleep).unwrap())
            .unwrap()
            .expect("sleep has a build-id");
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
