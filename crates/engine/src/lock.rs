//! One operation per process at a time, across `suture` processes: an advisory lock per
//! target process (pid + start time, so a reused pid is another lock), released by the kernel
//! however the holder ends.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::procfs;

/// Held while an operation works on a process. Its file goes when it is released: a host
/// that starts processes all day must not collect one file per process in `/run` (tmpfs, RAM).
pub struct ProcessLock {
    _file: File,
    path: PathBuf,
}

impl Drop for ProcessLock {
    fn drop(&mut self) {
        // Unlinked while still locked: whoever waits on this file finds, once it gets the
        // lock, that the name no longer leads to it, and starts over (see `lock_process`).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where the lock files are (per user when not root).
#[doc(hidden)]
pub fn lock_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/suture/locks")
    } else {
        std::env::temp_dir().join(format!("suture-locks-{}", nix::unistd::geteuid()))
    }
}

/// Takes the exclusive lock on `file` if nobody holds it.
fn try_flock(file: &File) -> bool {
    // SAFETY: flock on a descriptor the caller owns; it touches no memory.
    unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(file),
            libc::LOCK_EX | libc::LOCK_NB,
        ) == 0
    }
}

/// Whether `path` still names the file open as `file` (the lock was not released, and its
/// file unlinked, while we waited for it).
fn still_named(file: &File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Takes the lock of process `pid`, waiting up to `wait` for another operation to end.
pub fn lock_process(pid: i32, wait: Duration) -> Result<Result<ProcessLock, String>> {
    lock_process_started(pid, procfs::start_time(pid).unwrap_or(0), wait)
}

/// [`lock_process`] for a process whose start time (`/proc/PID/stat`) is already read.
pub fn lock_process_started(
    pid: i32,
    start: u64,
    wait: Duration,
) -> Result<Result<ProcessLock, String>> {
    let dir = lock_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{pid}-{start}.lock"));
    let deadline = Instant::now() + wait;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        loop {
            if try_flock(&file) {
                break;
            }
            if Instant::now() >= deadline {
                return Ok(Err(format!(
                    "another suture operation is in progress on pid {pid}"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if still_named(&file, &path) {
            return Ok(Ok(ProcessLock { _file: file, path }));
        }
        // The holder released it and unlinked its file meanwhile: take the current one.
    }
}

/// Removes the lock files of processes that are gone (left by operations that were killed:
/// a released lock removes its own file). A file someone holds is left alone.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(lock_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, start)) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".lock"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(p, s)| Some((p.parse::<i32>().ok()?, s.parse::<u64>().ok()?)))
        else {
            continue;
        };
        if procfs::start_time(pid) == Some(start) {
            continue; // the process lives
        }
        let path = entry.path();
        let Ok(file) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        else {
            continue;
        };
        if try_flock(&file) && still_named(&file, &path) {
            let _ = std::fs::remove_file(&path);
        }
    }
}
