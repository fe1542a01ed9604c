//! One operation per process at a time, across `suture` processes: an advisory lock per
//! target process (pid + start time, so a reused pid is another lock), released by the kernel
//! however the holder ends.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::procfs;

/// Held while an operation works on a process.
pub struct ProcessLock {
    _file: File,
}

fn lock_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/suture/locks")
    } else {
        std::env::temp_dir().join(format!("suture-locks-{}", nix::unistd::geteuid()))
    }
}

/// Takes the lock of process `pid`, waiting up to `wait` for another operation to end.
pub fn lock_process(pid: i32, wait: Duration) -> Result<Result<ProcessLock, String>> {
    let dir = lock_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let start = procfs::start_time(pid).unwrap_or(0);
    let path = dir.join(format!("{pid}-{start}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let deadline = Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor we own.
        let r = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if r == 0 {
            return Ok(Ok(ProcessLock { _file: file }));
        }
        if Instant::now() >= deadline {
            return Ok(Err(format!(
                "another suture operation is in progress on pid {pid}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
