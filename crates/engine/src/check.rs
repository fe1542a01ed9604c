//! Read-only questions about processes: what they carry (`status`), whether they can be
//! patched (`check`), and which of them map a module (`--all`).

use anyhow::Result;
use serde::Serialize;

use crate::modules;
use crate::procfs::{self, Memory};
use crate::record::{self, FoundPatch, PatchRecord};
use crate::stop::Session;

/// The patches process `pid` verifiably carries (every detour in place, leading into the
/// patch's code), read from its own memory.
pub fn status(pid: i32) -> Result<Vec<PatchRecord>> {
    let maps = procfs::read_maps(pid)?;
    if !maps.iter().any(record::is_patch_mapping) {
        return Ok(Vec::new());
    }
    let mem = Memory::open(pid)?;
    record::applied_patches(&mem, &maps)
}

/// Every patch mapping of process `pid`, each with what checking it showed: applied, partial,
/// orphaned or invalid.
pub fn inspect(pid: i32) -> Result<Vec<FoundPatch>> {
    inspect_maps(pid, &procfs::read_maps(pid)?)
}

/// [`inspect`] with the process's maps already read (a host scan has them).
pub fn inspect_maps(pid: i32, maps: &[procfs::Mapping]) -> Result<Vec<FoundPatch>> {
    if !maps.iter().any(record::is_patch_mapping) {
        return Ok(Vec::new());
    }
    let mem = Memory::open(pid)?;
    Ok(record::found_patches(&mem, maps))
}

#[derive(Debug, Clone, Serialize)]
pub struct ModuleInfo {
    pub path: String,
    pub build_id: Option<String>,
    pub base: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub pid: i32,
    pub command: String,
    /// Nothing stands in the way of patching.
    pub patchable: bool,
    /// Why it cannot be patched, one line each.
    pub problems: Vec<String>,
    pub threads: usize,
    pub modules: Vec<ModuleInfo>,
    pub patches: Vec<PatchRecord>,
}

/// Pre-flight: can process `pid` be patched, and if not, why. If `build_id` is given, also
/// whether the process maps that module.
pub fn check(pid: i32, build_id: Option<&[u8]>) -> Result<CheckReport> {
    let mut problems = Vec::new();
    if !procfs::exists(pid) {
        anyhow::bail!("no process {pid}");
    }
    let command = procfs::command_name(pid);
    if procfs::is_kernel_thread(pid) {
        problems.push("a kernel thread: it has no user-space code to patch".to_string());
        return Ok(CheckReport {
            pid,
            command,
            patchable: false,
            problems,
            threads: 1,
            modules: Vec::new(),
            patches: Vec::new(),
        });
    }
    if std::env::consts::ARCH != "x86_64" {
        problems.push("suture patches x86-64 processes only".to_string());
    }
    let stat = procfs::stat(pid);
    // (A main thread that exited while others run is a zombie of a living process.)
    let live = stat
        .as_ref()
        .and_then(|s| procfs::memory_dir_of(pid, s))
        .unwrap_or(pid);
    match procfs::status_field(live, "State")?.as_deref() {
        Some(s) if s.starts_with('Z') => problems.push("process is a zombie".into()),
        Some(s) if s.starts_with('T') => {
            problems.push("process is stopped (job control or a debugger)".into())
        }
        _ => {}
    }
    if procfs::frozen(pid) {
        problems.push("process is frozen by its cgroup (a paused container?)".into());
    }
    if let Some(sharer) = stat.as_ref().and_then(|s| procfs::memory_sharer_of(pid, s)) {
        problems.push(format!("{} (they share one memory)", sharer.describe(pid)));
    }
    if let Some(t) = procfs::status_field(pid, "TracerPid")? {
        if t != "0" {
            problems.push(format!(
                "process is already traced by pid {t}; only one tracer may attach"
            ));
        }
    }
    let maps = match procfs::read_maps(pid) {
        Ok(m) => m,
        Err(e) => {
            problems.push(format!("{e:#}"));
            Vec::new()
        }
    };
    if let Err(e) = Memory::open(pid) {
        problems.push(format!("{e:#}"));
    }
    // Headers only: a check of every process on a host must not read every library whole.
    let modules: Vec<ModuleInfo> = modules::identified_modules(pid, &maps)
        .into_iter()
        .map(|(path, build_id, bias)| ModuleInfo {
            build_id: build_id.map(hex::encode),
            path,
            base: bias,
        })
        .collect();
    if let Some(want) = build_id {
        let copies = modules::loaded_copies(pid, &maps, want).len();
        let want = hex::encode(want);
        if !modules.iter().any(|m| m.build_id.as_deref() == Some(&want)) {
            problems.push(format!(
                "process does not map a module with build-id {want}"
            ));
        } else if copies > 1 {
            problems.push(format!(
                "process has the module loaded {copies} times (a copy under another path, or a \
                 dlmopen namespace); suture patches one copy per process"
            ));
        }
    }
    let threads = procfs::threads(pid).map(|t| t.len()).unwrap_or(0);
    if problems.is_empty() {
        // The real test of ptrace permission: seize and let go (a stop of a few microseconds).
        // (A live thread: the main one may have exited.)
        match Session::seize(pid) {
            Ok(mut s) => {
                match s.stop_thread(live) {
                    Err(e) => problems.push(format!("{e:#}")),
                    Ok(()) => {
                        // The same test apply makes: would the seccomp filter let us work?
                        match crate::seccomp::filters(pid, live)
                            .and_then(|f| crate::seccomp::check_injected(&f, 0))
                        {
                            Ok(Ok(())) => {}
                            Ok(Err(name)) => problems.push(format!(
                                "its seccomp filter blocks `{name}`, which patching needs"
                            )),
                            Err(e) => problems.push(format!("{e:#}")),
                        }
                    }
                }
                s.detach();
            }
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    let patches = status(pid).unwrap_or_default();
    Ok(CheckReport {
        pid,
        command,
        patchable: problems.is_empty(),
        problems,
        threads,
        modules,
        patches,
    })
}

/// Every process (but this one) that maps a module with `build_id`.
pub fn processes_mapping(build_id: &[u8]) -> Result<Vec<i32>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let me = std::process::id() as i32;
    let pids = procfs::all_pids()?;
    // Reading a process's maps and stat'ing its files is all system calls: one scanner per CPU
    // (a host of a thousand processes took half a second one by one).
    let scanners = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let next = AtomicUsize::new(0);
    let found = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..scanners {
            s.spawn(|| {
                let mut mine = Vec::new();
                while let Some(&pid) = pids.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if pid == me {
                        continue;
                    }
                    let Ok(maps) = procfs::read_maps(pid) else {
                        continue; // exited, or a kernel thread
                    };
                    // Headers only: the files of unrelated processes are never read whole.
                    if modules::maps_build_id(pid, &maps, build_id) {
                        mine.push(pid);
                    }
                }
                found
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend(mine);
            });
        }
    });
    let mut out = found
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    out.sort_unstable();
    Ok(out)
}
