//! Settings: `/etc/suture/agent.toml`, each value overridable by a command-line flag.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/suture/agent.toml";

/// The agent's settings, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where signed bundles are dropped (the local bundle source).
    pub bundle_dir: PathBuf,
    /// Trusted publisher keys (`*.pub`), re-read on every pass.
    pub trust_dir: PathBuf,
    /// The journal, the status snapshot and the pid file.
    pub state_dir: PathBuf,
    /// How long after a patch goes live in a process a crash of that process rolls it back.
    pub health_window: Duration,
    /// Prometheus endpoint; off when `None`.
    pub metrics_addr: Option<SocketAddr>,
    /// An operator command (`sh -c`) that must succeed while a bundle is in its health window.
    pub health_cmd: Option<String>,
    /// Time between two full reconcile passes (events trigger passes in between).
    pub interval: Duration,
    /// How long one apply or revert keeps retrying while a thread is in a replaced function.
    pub op_timeout: Duration,
    /// Processes patched at once.
    pub jobs: usize,
    /// Folders searched for the files bundles target (by name, then build-id), so that a
    /// program that is not running yet is patched before its first instruction when it starts.
    pub watch_paths: Vec<PathBuf>,
    /// How long a starting process may be held until its loader is done and it is patched.
    pub hold_timeout: Duration,
}

/// Where programs and libraries live on a Debian-like host.
pub const DEFAULT_WATCH_PATHS: &[&str] = &[
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib",
    "/usr/libexec",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/local/lib",
    "/opt",
];

/// The file's shape: every key optional, unknown keys an error (a typo must not pass silently).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileSettings {
    pub bundle_dir: Option<PathBuf>,
    pub trust_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub health_window: Option<u64>,
    pub metrics_addr: Option<String>,
    pub health_cmd: Option<String>,
    pub interval_ms: Option<u64>,
    pub op_timeout_ms: Option<u64>,
    pub jobs: Option<usize>,
    pub watch_paths: Option<Vec<PathBuf>>,
    pub hold_timeout_ms: Option<u64>,
}

/// Values given on the command line; they win over the file.
pub type Overrides = FileSettings;

impl Settings {
    /// Reads the config file (`path`, or the default one if it exists) and applies `flags`.
    pub fn resolve(path: Option<&Path>, flags: Overrides) -> Result<Settings> {
        let file = match path {
            Some(p) => read_file(p)?,
            None if Path::new(DEFAULT_CONFIG).exists() => read_file(Path::new(DEFAULT_CONFIG))?,
            None => FileSettings::default(),
        };
        let metrics_addr = match flags.metrics_addr.or(file.metrics_addr) {
            None => None,
            Some(s) if s.is_empty() || s == "off" => None,
            Some(s) => Some(
                s.parse::<SocketAddr>()
                    .map_err(|e| anyhow!("metrics address {s:?} is not HOST:PORT: {e}"))?,
            ),
        };
        let jobs = flags
            .jobs
            .or(file.jobs)
            .unwrap_or_else(suture_engine::default_jobs)
            .clamp(1, 64);
        Ok(Settings {
            bundle_dir: flags
                .bundle_dir
                .or(file.bundle_dir)
                .unwrap_or_else(|| "/var/lib/suture/bundles".into()),
            trust_dir: flags
                .trust_dir
                .or(file.trust_dir)
                .unwrap_or_else(|| suture_bundle::TrustStore::DEFAULT_DIR.into()),
            state_dir: flags
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| "/var/lib/suture".into()),
            health_window: Duration::from_secs(
                flags.health_window.or(file.health_window).unwrap_or(60),
            ),
            metrics_addr,
            health_cmd: flags
                .health_cmd
                .or(file.health_cmd)
                .filter(|c| !c.is_empty()),
            interval: Duration::from_millis(
                flags
                    .interval_ms
                    .or(file.interval_ms)
                    .unwrap_or(10_000)
                    .max(10),
            ),
            op_timeout: Duration::from_millis(
                flags.op_timeout_ms.or(file.op_timeout_ms).unwrap_or(5_000),
            ),
            jobs,
            watch_paths: flags
                .watch_paths
                .or(file.watch_paths)
                .unwrap_or_else(|| DEFAULT_WATCH_PATHS.iter().map(PathBuf::from).collect()),
            hold_timeout: Duration::from_millis(
                flags
                    .hold_timeout_ms
                    .or(file.hold_timeout_ms)
                    .unwrap_or(5_000),
            ),
        })
    }
}

fn read_file(path: &Path) -> Result<FileSettings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow!(
            "config {} is invalid: {}",
            path.display(),
            e.to_string().replace('\n', " ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_typos_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "bundle-dir = \"/b\"\nhealth-window = 5\n").unwrap();
        let s = Settings::resolve(
            Some(&p),
            Overrides {
                health_window: Some(9),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.bundle_dir, PathBuf::from("/b"));
        assert_eq!(s.health_window, Duration::from_secs(9));
        std::fs::write(&p, "bundle_dirr = \"/b\"\n").unwrap();
        let e = Settings::resolve(Some(&p), Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("invalid"), "{e}");
    }

    #[test]
    fn the_shipped_example_is_valid_and_says_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, include_str!("../../../dist/agent.toml")).unwrap();
        let s = Settings::resolve(Some(&p), Overrides::default()).unwrap();
        assert_eq!(s.bundle_dir, PathBuf::from("/var/lib/suture/bundles"));
        assert_eq!(s.health_window, Duration::from_secs(60));
        assert!(s.metrics_addr.is_none());
    }
}
