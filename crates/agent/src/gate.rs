//! The gate: a process that starts a patched executable or loads a patched library (at
//! start-up or by `dlopen`) never runs the unfixed code, not even its first instruction.
//!
//! Why fanotify permission events: they are the only notice that comes *before* the module
//! can run, from the kernel, for every process on the host (any mount namespace: marks sit on
//! inodes), without patching the loader on disk or preloading anything. The event's `open`
//! waits for our answer, which gives us the time to seize the opener; `PTRACE_EVENT_EXEC`
//! and the proc connector come after the fact, and a BPF LSM program cannot make a process
//! wait for user space. The engine then holds the process at its loader's debugger hook
//! ([`suture_engine::hold`]) and applies the patch before letting go.
//!
//! Fail open, never stuck: if the agent dies, the kernel answers every pending permission
//! event with "allow" when the fanotify descriptor closes, and ptrace lets go of held
//! processes; they start unpatched and the restarted agent's first pass patches them. An
//! opening we cannot hold (a traced process, a statically linked program, too many held at
//! once) is allowed at once and patched by the connector path a few milliseconds later.
//!
//! Files are marked by inode (`FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM`), found by build-id: the
//! files that running processes map, and files named like a bundle's module under the
//! watched folders (`--watch-path`), whether or not anything maps them now.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MarkFlags, MaskFlags,
    Response,
};
use suture_bundle::Bundle;
use suture_engine::hold::{Hold, Opening};
use suture_engine::{ApplyOptions, ApplyReport, EngineError};

use crate::controller::Msg;

/// At most this many processes held at once; more openings are let through (and patched
/// right after their start by the connector path).
const MAX_HELD: usize = 32;
/// How deep the watched folders are searched.
const MAX_DEPTH: usize = 6;

/// A bundle the gate applies to new processes.
#[derive(Clone)]
pub struct Desired {
    pub sha: String,
    pub bundle: Arc<Bundle>,
}

/// What one held process got.
#[derive(Debug)]
pub struct Held {
    pub pid: i32,
    /// From the opening to the release.
    pub held_us: u64,
    pub results: Vec<(String, std::result::Result<ApplyReport, EngineError>)>,
}

/// A marked file.
struct Marked {
    /// The path it was marked through (to remove the mark).
    path: PathBuf,
    build_id: Vec<u8>,
}

struct Shared {
    /// Desired bundles by target build-id.
    desired: Mutex<HashMap<Vec<u8>, Vec<Desired>>>,
    /// Marked files by (dev, inode).
    marked: Mutex<HashMap<(u64, u64), Marked>>,
    /// Processes held now.
    held: Mutex<HashSet<i32>>,
    active: AtomicUsize,
    /// Shutting down: nothing new is held.
    closing: AtomicBool,
    /// Processes held and patched; let through (with the last reason).
    held_total: AtomicUsize,
    let_through: Mutex<(u64, Option<String>)>,
    opts: ApplyOptions,
    deadline: Duration,
}

/// The fanotify group and what it watches.
pub struct Gate {
    fan: Arc<Fanotify>,
    shared: Arc<Shared>,
    watch_paths: Vec<PathBuf>,
    walked: Mutex<Walk>,
}

/// The last search of the watched folders.
#[derive(Default)]
struct Walk {
    /// For which bundles (content addresses, sorted).
    shas: Vec<String>,
    at: Option<Instant>,
    /// (build-id, path) of what it found.
    found: Vec<(Vec<u8>, PathBuf)>,
}

/// The watched folders are searched again after this long (new files show up; an update
/// that replaces a file gives it a new inode).
const REWALK: Duration = Duration::from_secs(60);

impl Gate {
    /// Opens the fanotify group and starts the thread that answers its events.
    pub fn start(
        tx: Sender<Msg>,
        opts: ApplyOptions,
        deadline: Duration,
        watch_paths: Vec<PathBuf>,
    ) -> Result<Gate> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT
                | InitFlags::FAN_CLOEXEC
                | InitFlags::FAN_REPORT_TID
                | InitFlags::FAN_UNLIMITED_QUEUE
                | InitFlags::FAN_UNLIMITED_MARKS,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .context("fanotify_init (permission events need CAP_SYS_ADMIN and CONFIG_FANOTIFY_ACCESS_PERMISSIONS)")?;
        let fan = Arc::new(fan);
        let shared = Arc::new(Shared {
            desired: Mutex::new(HashMap::new()),
            marked: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            active: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            held_total: AtomicUsize::new(0),
            let_through: Mutex::new((0, None)),
            opts,
            deadline,
        });
        {
            let (fan, shared) = (fan.clone(), shared.clone());
            std::thread::Builder::new()
                .name("gate".into())
                .spawn(move || answer_events(&fan, &shared, &tx))
                .context("cannot start the gate thread")?;
        }
        Ok(Gate {
            fan,
            shared,
            watch_paths,
            walked: Mutex::new(Walk::default()),
        })
    }

    /// Sets what new processes get, and marks the files they would open: `mapped` are files
    /// running processes map (as `/proc/PID/map_files/…` paths, which reach files in other
    /// mount namespaces too), by build-id.
    pub fn update(&self, desired: Vec<Desired>, mapped: &[(Vec<u8>, PathBuf)]) {
        let mut by_id: HashMap<Vec<u8>, Vec<Desired>> = HashMap::new();
        for d in desired {
            if let Ok(id) = hex::decode(&d.bundle.manifest.module.build_id) {
                by_id.entry(id).or_default().push(d);
            }
        }
        let names: HashSet<String> = by_id
            .values()
            .flatten()
            .map(|d| d.bundle.manifest.module.name.clone())
            .collect();
        let mut candidates: Vec<(Vec<u8>, PathBuf)> = mapped
            .iter()
            .filter(|(id, _)| by_id.contains_key(id))
            .cloned()
            .collect();
        let mut shas: Vec<String> = by_id.values().flatten().map(|d| d.sha.clone()).collect();
        shas.sort();
        {
            let mut walked = lock(&self.walked);
            if walked.shas != shas || walked.at.is_none_or(|t| t.elapsed() > REWALK) {
                let mut found = Vec::new();
                for root in &self.watch_paths {
                    find_named(root, &names, 0, &mut |path| {
                        if let Some(id) = build_id_of(path) {
                            if by_id.contains_key(&id) {
                                found.push((id, path.to_path_buf()));
                            }
                        }
                    });
                }
                *walked = Walk {
                    shas,
                    at: Some(Instant::now()),
                    found,
                };
            }
            candidates.extend(walked.found.iter().cloned());
        }
        *lock(&self.shared.desired) = by_id.clone();
        let mut marked = lock(&self.shared.marked);
        let mut keep: HashSet<(u64, u64)> = HashSet::new();
        for (id, path) in candidates {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let key = (meta.dev(), meta.ino());
            if !keep.insert(key) || marked.contains_key(&key) {
                continue;
            }
            match self.fan.mark(
                MarkFlags::FAN_MARK_ADD,
                MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_OPEN_EXEC_PERM,
                None,
                Some(&path),
            ) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), build_id = %hex::encode(&id), "gate: watching");
                    marked.insert(key, Marked { path, build_id: id });
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), "gate: cannot watch: {e}")
                }
            }
        }
        let stale: Vec<(u64, u64)> = marked
            .iter()
            .filter(|(k, m)| !keep.contains(k) && !by_id.contains_key(&m.build_id))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(m) = marked.remove(&k) {
                // Fails if the file is gone, and then so is the mark.
                let _ = self.fan.mark(
                    MarkFlags::FAN_MARK_REMOVE,
                    MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_OPEN_EXEC_PERM,
                    None,
                    Some(&m.path),
                );
                tracing::info!(file = %m.path.display(), "gate: no longer watching");
            }
        }
    }

    /// What it watches and what it did.
    pub fn status(&self) -> crate::report::GateStatus {
        let mut watching: Vec<String> = lock(&self.shared.marked)
            .values()
            .map(|m| m.path.display().to_string())
            .collect();
        watching.sort();
        let (let_through, last_let_through) = lock(&self.shared.let_through).clone();
        crate::report::GateStatus {
            watching,
            held: self.shared.held_total.load(Ordering::SeqCst) as u64,
            let_through,
            last_let_through,
        }
    }

    /// Holds nothing new and waits (up to `wait`) for the processes held now to be patched and
    /// let go. Dropping the gate afterwards closes the fanotify group: the kernel lets every
    /// pending open through.
    pub fn close(self, wait: Duration) {
        self.shared.closing.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + wait;
        while self.shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = self.shared.active.load(Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(
                left,
                "gate: stopping with processes still held; the kernel releases them"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Calls `f` for every regular file under `dir` whose name is in `names` (symbolic links are
/// not followed).
fn find_named(dir: &Path, names: &HashSet<String>, depth: usize, f: &mut dyn FnMut(&Path)) {
    if depth > MAX_DEPTH || names.is_empty() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let path = e.path();
        if ft.is_dir() {
            find_named(&path, names, depth + 1, f);
        } else if ft.is_file() && names.contains(&*e.file_name().to_string_lossy()) {
            f(&path);
        }
    }
}

/// The build-id of an ELF file, from its headers and notes.
fn build_id_of(path: &Path) -> Option<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let read_at = |off: u64, buf: &mut [u8]| file.read_exact_at(buf, off);
    suture_module::identify(&read_at, meta.len()).ok()?.build_id
}

/// The gate thread: reads permission events and answers each, at once or once its opener is
/// held.
fn answer_events(fan: &Arc<Fanotify>, shared: &Arc<Shared>, tx: &Sender<Msg>) {
    loop {
        let events = match fan.read_events() {
            Ok(e) => e,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("gate: reading fanotify events failed: {e}; new processes are patched after they start");
                return;
            }
        };
        for ev in events {
            let Some(fd) = ev.fd() else {
                tracing::warn!("gate: fanotify queue overflow");
                continue;
            };
            let tid = ev.pid();
            let opening = if ev.mask().contains(MaskFlags::FAN_OPEN_EXEC_PERM) {
                Opening::Exec
            } else {
                Opening::Load
            };
            match should_hold(shared, fd, tid) {
                Some((pid, desired)) => {
                    shared.active.fetch_add(1, Ordering::SeqCst);
                    lock(&shared.held).insert(pid);
                    // The event stays reachable here: if no thread starts, it is answered.
                    let slot = Arc::new(Mutex::new(Some(ev)));
                    let (fan2, shared2, tx2, slot2) =
                        (fan.clone(), shared.clone(), tx.clone(), slot.clone());
                    let spawned = std::thread::Builder::new()
                        .name(format!("hold-{pid}"))
                        .spawn(move || {
                            let ev = lock(&slot2).take();
                            if let Some(ev) = ev {
                                hold(&fan2, &shared2, &tx2, ev, pid, tid, opening, desired)
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!(pid, "gate: cannot start a hold thread: {e}");
                        if let Some(fd) = lock(&slot).as_ref().and_then(FanotifyEvent::fd) {
                            allow(fan, fd);
                        }
                        lock(&shared.held).remove(&pid);
                        shared.active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                None => allow(fan, fd),
            }
        }
    }
}

/// The process to hold for this event and what it should get, or `None` to let it through.
fn should_hold(shared: &Shared, fd: BorrowedFd<'_>, tid: i32) -> Option<(i32, Vec<Desired>)> {
    if shared.closing.load(Ordering::SeqCst) {
        return None;
    }
    // Our own threads read the files we watch (scans, the engine): never in the way.
    if Path::new(&format!("/proc/self/task/{tid}")).exists() {
        return None;
    }
    let pid = tgid_of(tid)?;
    if lock(&shared.held).contains(&pid) {
        return None; // its holder applies whatever it maps once the loader is done
    }
    if shared.active.load(Ordering::SeqCst) >= MAX_HELD {
        tracing::warn!(
            pid,
            "gate: {MAX_HELD} processes held already; letting this one through"
        );
        return None;
    }
    let meta = nix::sys::stat::fstat(fd.as_raw_fd()).ok()?;
    let key = (meta.st_dev, meta.st_ino);
    let id = lock(&shared.marked).get(&key)?.build_id.clone();
    let desired = lock(&shared.desired);
    desired.get(&id)?;
    // Everything it may map: an executable and a library of it can both be patched.
    Some((pid, desired.values().flatten().cloned().collect()))
}

fn tgid_of(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn allow(fan: &Fanotify, fd: BorrowedFd<'_>) {
    if let Err(e) = fan.write_response(FanotifyResponse::new(fd, Response::FAN_ALLOW)) {
        tracing::warn!("gate: answering a permission event failed: {e}");
    }
}

/// Holds one process: seize, allow its open, run it to the end of its load, apply, let go.
#[allow(clippy::too_many_arguments)]
fn hold(
    fan: &Fanotify,
    shared: &Shared,
    tx: &Sender<Msg>,
    ev: FanotifyEvent,
    pid: i32,
    tid: i32,
    opening: Opening,
    desired: Vec<Desired>,
) {
    let t0 = Instant::now();
    let held = Hold::seize(pid, tid, opening);
    if let Some(fd) = ev.fd() {
        allow(fan, fd);
    }
    drop(ev);
    let let_through = |why: String| {
        let mut l = lock(&shared.let_through);
        l.0 += 1;
        l.1 = Some(format!("pid {pid}: {why}"));
    };
    let results = match held {
        Err(e) if e.is::<suture_engine::hold::NotLoading>() => {
            // An exec also opens the file without the exec flag (not through the loader), and
            // any reader of a library is no loader: neither is a start let through.
            tracing::debug!(pid, "gate: not holding ({e:#})");
            None
        }
        Err(e) => {
            tracing::info!(pid, "gate: not holding ({e:#}); patched after it starts");
            let_through(format!("{e:#}"));
            None
        }
        Ok(mut h) => match h.run_to_loaded(Instant::now() + shared.deadline) {
            Err(e) => {
                tracing::warn!(pid, "gate: released unpatched: {e:#}");
                let_through(format!("{e:#}"));
                None
            }
            Ok(()) => {
                let loaded_us = t0.elapsed().as_micros() as u64;
                let mut results = Vec::new();
                for d in &desired {
                    let id = hex::decode(&d.bundle.manifest.module.build_id).unwrap_or_default();
                    if h.maps_build_id(&id) {
                        results.push((d.sha.clone(), h.apply(&d.bundle, &shared.opts)));
                    }
                }
                let applied_us = t0.elapsed().as_micros() as u64;
                if results.iter().any(|(_, r)| r.is_ok()) {
                    shared.held_total.fetch_add(1, Ordering::SeqCst);
                }
                if let Err(e) = h.release() {
                    tracing::warn!(pid, "gate: releasing: {e:#}");
                }
                tracing::debug!(
                    pid,
                    loaded_us,
                    applied_us,
                    released_us = t0.elapsed().as_micros() as u64,
                    "gate: held"
                );
                Some(results)
            }
        },
    };
    lock(&shared.held).remove(&pid);
    shared.active.fetch_sub(1, Ordering::SeqCst);
    if let Some(results) = results {
        let _ = tx.send(Msg::Held(Held {
            pid,
            held_us: t0.elapsed().as_micros() as u64,
            results,
        }));
    }
}
