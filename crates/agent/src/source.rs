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
