//! What the agent tells the world: a status snapshot per bundle and every journaled action.
//! All of it goes through [`Report`]: the log and `STATE_DIR/status.json` now, metrics when
//! enabled, the fleet server's check-in later.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::journal::{Entry, Event};

pub const STATUS_FILE: &str = "status.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum BundleState {
    /// Desired: applied to (or being applied to) every process mapping its module.
    Active,
    /// A newer level of the same patch line is active, or was applied before.
    Superseded,
    /// Taken out after a crash or a failed health check; stays out until enabled.
    RolledBack,
    /// Not trusted or not readable: never applied.
    Refused,
    /// No longer offered by the source: taken back out of every process.
    Withdrawn,
}

impl BundleState {
    pub fn as_str(self) -> &'static str {
        match self {
            BundleState::Active => "active",
            BundleState::Superseded => "superseded",
            BundleState::RolledBack => "rolled_back",
            BundleState::Refused => "refused",
            BundleState::Withdrawn => "withdrawn",
        }
    }

    pub const ALL: [BundleState; 5] = [
        BundleState::Active,
        BundleState::Superseded,
        BundleState::RolledBack,
        BundleState::Refused,
        BundleState::Withdrawn,
    ];
}

/// A process the bundle should be in but is not, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub pid: i32,
    /// The engine's word: busy, refused (seccomp, layout…), exited, failed.
    pub kind: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleStatus {
    /// Bundle id (`None` for a file that could not be read at all).
    pub id: Option<String>,
    pub level: Option<u32>,
    pub state: BundleState,
    pub reason: Option<String>,
    /// Processes carrying it now.
    pub processes: usize,
    pub failures: Vec<Failure>,
    pub origin: Option<String>,
    pub sha256: Option<String>,
    pub build_id: Option<String>,
    pub module: Option<String>,
    #[serde(default)]
    pub cves: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// Milliseconds since the epoch when this was taken.
    pub taken_ms: u64,
    /// Pid of the agent that wrote it (absent when computed by `agent status` itself).
    pub agent_pid: Option<u32>,
    /// Whether the running agent sees process events (crash rollback, new processes).
    #[serde(default)]
    pub process_events: Option<bool>,
    /// The gate that holds starting processes until patched (absent: off, or no agent).
    #[serde(default)]
    pub gate: Option<GateStatus>,
    pub bundles: Vec<BundleStatus>,
}

/// What the gate watches and what it did since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateStatus {
    /// The files watched now (paths as they were found: a folder path, or a
    /// `/proc/PID/map_files/…` path for a file in another mount namespace).
    pub watching: Vec<String>,
    /// Starting processes held and patched before they ran.
    pub held: u64,
    /// Starting processes let through unpatched (then patched after their start), and why the
    /// last one was.
    pub let_through: u64,
    pub last_let_through: Option<String>,
}

/// Something that wants to hear what the agent does.
pub trait Report: Send {
    /// An action, after it was journaled.
    fn action(&mut self, entry: &Entry);
    /// The state after a reconcile pass.
    fn status(&mut self, status: &Status);
    /// How long every thread of a process was stopped by one apply.
    fn stopped(&mut self, _micros: u64) {}
    /// How long the gate held a starting process until it was patched and let go.
    fn held(&mut self, _micros: u64) {}
}

/// One log line per action: bundle id, pid, outcome (reads well in journald).
pub struct LogReport;

impl Report for LogReport {
    fn action(&mut self, entry: &Entry) {
        match &entry.event {
            Event::Accepted {
                id, level, module, ..
            } => tracing::info!(bundle = %id, level, module = %module, "accepted"),
            Event::Applied {
                id,
                pid,
                level,
                stopped_us,
                ..
            } => tracing::info!(bundle = %id, pid, level, stopped_us, "applied"),
            Event::Superseded { id, by, pid } => {
                tracing::info!(bundle = %id, pid, by = %by, "superseded")
            }
            Event::Reverted {
                id, pid, reason, ..
            } => tracing::info!(bundle = %id, pid, reason = %reason, "reverted"),
            Event::Refused { origin, id, reason } => {
                tracing::warn!(bundle = id.as_deref().unwrap_or("-"), origin = %origin, reason = %reason, "refused")
            }
            Event::Failed {
                id,
                pid,
                op,
                kind,
                reason,
                ..
            } => {
                tracing::warn!(bundle = %id, pid, op = %op, kind = %kind, reason = %reason, "failed")
            }
            Event::RolledBack {
                id,
                pid,
                signal,
                reason,
                ..
            } => {
                tracing::error!(bundle = %id, pid = ?pid, signal = ?signal, reason = %reason, "rolled back")
            }
            Event::Enabled { id } => tracing::info!(bundle = %id, "enabled"),
        }
    }

    fn status(&mut self, _status: &Status) {}
}

/// `STATE_DIR/status.json`, replaced atomically (temp file + rename) after every pass.
pub struct StatusFile {
    pub path: PathBuf,
}

impl StatusFile {
    pub fn new(state_dir: &Path) -> StatusFile {
        StatusFile {
            path: state_dir.join(STATUS_FILE),
        }
    }
}

impl Report for StatusFile {
    fn action(&mut self, _entry: &Entry) {}

    fn status(&mut self, status: &Status) {
        if let Err(e) = write_atomic(&self.path, status) {
            tracing::warn!("cannot write {}: {e:#}", self.path.display());
        }
    }
}

pub fn write_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value)?;
    std::fs::write(&tmp, &bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
}

pub fn read_status(state_dir: &Path) -> Result<Option<Status>> {
    let path = state_dir.join(STATUS_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("{} is not a status snapshot", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}
