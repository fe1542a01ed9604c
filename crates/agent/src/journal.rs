//! The crash-safe journal: every action the agent takes, one JSON line each, appended to
//! `STATE_DIR/journal.jsonl` and fsync'ed before the agent goes on.
//!
//! What processes carry is always read from the processes themselves; the journal keeps what
//! processes cannot tell: which bundles the agent took on (so it can take them back when they
//! are withdrawn), the highest level ever applied per patch line (an older level is never
//! re-applied), and which bundles were rolled back (they stay off until an operator enables
//! them). Its state is a fold over its lines, so the agent, a restarted agent and the
//! `agent enable` command (which appends a line) all agree.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const FILE: &str = "journal.jsonl";

/// One action. Bundles are named by id and content address (SHA-256).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A trusted bundle became desired: the agent will keep it applied until it is withdrawn.
    /// Written before the first apply, so a crash mid-apply still knows to take it back.
    Accepted {
        id: String,
        sha256: String,
        level: u32,
        build_id: String,
        module: String,
        cves: Vec<String>,
    },
    Applied {
        id: String,
        sha256: String,
        level: u32,
        build_id: String,
        pid: i32,
        stopped_us: u64,
    },
    /// `id` left process `pid` in the same stop that applied `by`.
    Superseded { id: String, by: String, pid: i32 },
    Reverted {
        id: String,
        sha256: String,
        pid: i32,
        reason: String,
    },
    /// A bundle the agent will not use (signature, trust, format), with the reason.
    Refused {
        origin: String,
        id: Option<String>,
        reason: String,
    },
    /// An operation on one process failed; `kind` is the engine's word (busy, refused…).
    Failed {
        id: String,
        sha256: String,
        pid: i32,
        op: String,
        kind: String,
        reason: String,
    },
    /// The bundle hurt a process (or the health command failed): taken out everywhere and
    /// kept out until enabled.
    RolledBack {
        id: String,
        sha256: String,
        build_id: String,
        level: u32,
        pid: Option<i32>,
        signal: Option<i32>,
        reason: String,
    },
    /// An operator allowed a rolled-back bundle again.
    Enabled { id: String },
}

/// A line: when, and what.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Milliseconds since the epoch.
    pub ts_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

#[derive(Debug, Clone, Serialize)]
pub struct Known {
    pub id: String,
    pub level: u32,
    pub build_id: String,
    pub module: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rollback {
    pub sha256: String,
    pub reason: String,
    pub pid: Option<i32>,
    pub signal: Option<i32>,
    pub ts_ms: u64,
}

/// What the journal's lines add up to.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Bundles the agent took on, by content address.
    pub known: HashMap<String, Known>,
    /// Highest level applied per patch line (module build-id): (level, bundle id).
    pub highest: HashMap<String, (u32, String)>,
    /// Rolled-back bundles by id.
    pub rolled_back: HashMap<String, Rollback>,
    /// When a bundle was first applied anywhere (ms), by content address.
    pub first_applied: HashMap<String, u64>,
    /// Refusals already written (origin, reason): written once, not on every pass.
    pub refused: HashSet<(String, String)>,
    /// Lines that did not parse (a torn write from a crash), counted and skipped.
    pub unreadable: usize,
}

impl State {
    fn fold(&mut self, e: &Entry) {
        match &e.event {
            Event::Accepted {
                id,
                sha256,
                level,
                build_id,
                module,
                ..
            } => {
                self.known.insert(
                    sha256.clone(),
                    Known {
                        id: id.clone(),
                        level: *level,
                        build_id: build_id.clone(),
                        module: module.clone(),
                    },
                );
            }
            Event::Applied {
                id,
                sha256,
                level,
                build_id,
                ..
            } => {
                let h = self
                    .highest
                    .entry(build_id.clone())
                    .or_insert((*level, id.clone()));
                if *level > h.0 {
                    *h = (*level, id.clone());
                }
                self.first_applied.entry(sha256.clone()).or_insert(e.ts_ms);
            }
            Event::Refused { origin, reason, .. } => {
                self.refused.insert((origin.clone(), reason.clone()));
            }
            Event::RolledBack {
                id,
                sha256,
                pid,
                signal,
                reason,
                ..
            } => {
                self.rolled_back.insert(
                    id.clone(),
                    Rollback {
                        sha256: sha256.clone(),
                        reason: reason.clone(),
                        pid: *pid,
                        signal: *signal,
                        ts_ms: e.ts_ms,
                    },
                );
            }
            Event::Enabled { id } => {
                self.rolled_back.remove(id);
            }
            Event::Superseded { .. } | Event::Reverted { .. } | Event::Failed { .. } => {}
        }
    }
}

pub struct Journal {
    path: PathBuf,
    /// `None` when opened to look only ([`Journal::load`]) and there is no journal yet.
    file: Option<File>,
    /// Bytes of the file folded into `state` so far.
    consumed: u64,
    state: State,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Journal {
    /// Opens (or creates) the journal in `state_dir` and reads it all.
    pub fn open(state_dir: &Path) -> Result<Journal> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create state folder {}", state_dir.display()))?;
        let path = state_dir.join(FILE);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("cannot open journal {}", path.display()))?;
        if created {
            // The new name must survive a power cut too.
            if let Ok(d) = File::open(state_dir) {
                let _ = d.sync_all();
            }
        }
        // A crash in the middle of a write leaves a line without its newline: end it, so the
        // torn fragment stays one unreadable line instead of corrupting the next one.
        let len = file.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                file.sync_data()?;
            }
        }
        let mut j = Journal {
            path,
            file: Some(file),
            consumed: 0,
            state: State::default(),
        };
        j.refresh()?;
        Ok(j)
    }

    /// Reads the journal in `state_dir` without creating or repairing anything (for
    /// `agent status` when no agent runs). Appending to it fails.
    pub fn load(state_dir: &Path) -> Result<Journal> {
        let path = state_dir.join(FILE);
        let file = match File::open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let mut j = Journal {
            path,
            file,
            consumed: 0,
            state: State::default(),
        };
        j.refresh()?;
        Ok(j)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Folds in lines appended since the last look (by us, or by `suture agent enable`).
    pub fn refresh(&mut self) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.consumed))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .with_context(|| format!("cannot read journal {}", self.path.display()))?;
        // Only whole lines; a line being written right now is read next time.
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        for line in buf[..end].split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Entry>(line) {
                Ok(e) => self.state.fold(&e),
                Err(e) => {
                    self.state.unreadable += 1;
                    tracing::warn!(
                        "journal {}: skipping unreadable line: {e}",
                        self.path.display()
                    );
                }
            }
        }
        self.consumed += end as u64 + 1;
        Ok(())
    }

    /// Appends one event, durably (fsync) and atomically (one `write` of one line on an
    /// `O_APPEND` file), then folds it in.
    pub fn append(&mut self, event: Event) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            bail!("journal {} was opened read-only", self.path.display());
        };
        append_line(file, &self.path, event)?;
        self.refresh()
    }

    /// Every entry of the journal in `state_dir`, in order (for tools and tests).
    pub fn read_all(state_dir: &Path) -> Result<Vec<Entry>> {
        let path = state_dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

fn append_line(file: &mut File, path: &Path, event: Event) -> Result<()> {
    let mut line = serde_json::to_vec(&Entry {
        ts_ms: now_ms(),
        event,
    })?;
    line.push(b'\n');
    file.write_all(&line)
        .and_then(|()| file.sync_data())
        .with_context(|| format!("cannot write journal {}", path.display()))
}

/// `suture agent enable ID`: lets a rolled-back bundle be applied again. A running agent
/// picks the line up on its next pass.
pub fn enable(state_dir: &Path, id: &str) -> Result<Rollback> {
    let mut j = Journal::open(state_dir)?;
    let Some(r) = j.state.rolled_back.get(id).cloned() else {
        let ids: Vec<&String> = j.state.rolled_back.keys().collect();
        if ids.is_empty() {
            bail!("bundle {id} is not rolled back (no bundle is)");
        }
        bail!("bundle {id} is not rolled back (rolled back: {ids:?})");
    };
    j.append(Event::Enabled { id: id.to_string() })?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_reopen_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        for level in [1, 2] {
            j.append(Event::Applied {
                id: format!("p{level}"),
                sha256: format!("s{level}"),
                level,
                build_id: "bb".into(),
                pid: 10,
                stopped_us: 5,
            })
            .unwrap();
        }
        j.append(Event::RolledBack {
            id: "p2".into(),
            sha256: "s2".into(),
            build_id: "bb".into(),
            level: 2,
            pid: Some(10),
            signal: Some(11),
            reason: "crash".into(),
        })
        .unwrap();
        drop(j);
        // A crash in the middle of the next write.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(b"{\"ts_ms\":1,\"event\":\"ena").unwrap();
        drop(f);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.state().highest["bb"], (2, "p2".to_string()));
        assert!(j.state().rolled_back.contains_key("p2"));
        assert_eq!(j.state().unreadable, 1);
        drop(j);
        enable(dir.path(), "p2").unwrap();
        assert!(enable(dir.path(), "p2").is_err());
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.state().rolled_back.is_empty());
    }
}
