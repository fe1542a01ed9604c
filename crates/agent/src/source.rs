//! Where bundles come from. The controller only sees [`BundleSource`]: a local folder today
//! (offline, air-gapped hosts), the fleet server later. A source only offers bytes; trust is
//! decided by the agent against its own keys, so a source can never make a host run code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use suture_bundle::Bundle;

/// One bundle a source offers: parsed, or the reason it could not be.
pub struct Offered {
    /// Where it came from (a file path, a URL), for logs and status.
    pub origin: String,
    pub bundle: std::result::Result<Bundle, String>,
}

pub trait BundleSource: Send {
    /// What this source is, for logs.
    fn describe(&self) -> String;
    /// Every bundle currently offered. A bundle no longer offered is withdrawn.
    fn offered(&mut self) -> Result<Vec<Offered>>;
    /// Calls `changed` whenever the offer may have changed, from a thread of its own (best
    /// effort: the agent also reconciles on an interval).
    fn watch(&self, _changed: Box<dyn Fn() + Send>) -> Result<()> {
        Ok(())
    }
}

/// A folder of `*.suture` files. Files are re-parsed only when their size or mtime changes.
pub struct LocalDir {
    dir: PathBuf,
    cache: HashMap<PathBuf, (SystemTime, u64, std::result::Result<Bundle, String>)>,
}

impl LocalDir {
    pub fn new(dir: &Path) -> LocalDir {
        LocalDir {
            dir: dir.to_path_buf(),
            cache: HashMap::new(),
        }
    }
}

impl BundleSource for LocalDir {
    fn describe(&self) -> String {
        format!("folder {}", self.dir.display())
    }

    /// inotify on the folder: a dropped or removed bundle is acted on at once.
    fn watch(&self, changed: Box<dyn Fn() + Send>) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes())
            .context("bundle folder path contains a NUL byte")?;
        // SAFETY: inotify_init1 with a constant flag; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            anyhow::bail!("inotify_init1: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is ours and nothing else owns it.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(std::os::fd::AsRawFd::as_raw_fd(&fd), path.as_ptr(), mask)
        };
        if wd < 0 {
            anyhow::bail!(
                "cannot watch {}: {}",
                self.dir.display(),
                std::io::Error::last_os_error()
            );
        }
        let dir = self.dir.clone();
        std::thread::Builder::new()
            .name("bundle-watch".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    // SAFETY: reading into a buffer we own, of the length passed.
                    let n = unsafe {
                        libc::read(
                            std::os::fd::AsRawFd::as_raw_fd(&fd),
                            buf.as_mut_ptr() as *mut libc::c_void,
                            buf.len(),
                        )
                    };
                    if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    if n <= 0 {
                        return;
                    }
                    changed();
                    // The folder itself went away: its watch is gone; passes go on.
                    let mut at = 0usize;
                    while at + 16 <= n as usize {
                        let m = u32::from_ne_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
                        let len = u32::from_ne_bytes([buf[at + 12], buf[at + 13], buf[at + 14], buf[at + 15]]) as usize;
                        if m & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                            tracing::warn!("bundle folder {} moved or removed: no longer watched (passes go on)", dir.display());
                            return;
                        }
                        at += 16 + len;
                    }
                }
            })?;
        Ok(())
    }

    fn offered(&mut self) -> Result<Vec<Offered>> {
        // A folder that is gone (unmounted, mistyped) is an error, not an empty offer: it
        // must not withdraw every patch on the host. Withdrawing is removing files.
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?;
        let mut seen = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", self.dir.display()))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("suture") {
                continue; // temporary files of a copy in progress, notes, keys…
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // removed while we looked
            };
            if !meta.is_file() {
                continue;
            }
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let fresh = self
                .cache
                .get(&path)
                .is_some_and(|(t, len, _)| *t == mtime && *len == meta.len());
            if !fresh {
                let parsed = Bundle::read_file(&path).map_err(|e| e.to_string());
                self.cache.insert(path.clone(), (mtime, meta.len(), parsed));
            }
            seen.push(path);
        }
        self.cache.retain(|p, _| seen.contains(p));
        seen.sort();
        Ok(seen
            .into_iter()
            .filter_map(|p| {
                let (_, _, b) = self.cache.get(&p)?;
                Some(Offered {
                    origin: p.display().to_string(),
                    bundle: b.clone(),
                })
            })
            .collect())
    }
}
