//! The command line contract.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use suture_build::Replace;

#[derive(Parser)]
#[command(
    name = "suture",
    version,
    about = "Live security patches for running Linux processes"
)]
pub struct Args {
    /// Machine-readable output (one JSON document on stdout).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create an Ed25519 signing key pair: DIR/NAME.key (secret, 0600) and DIR/NAME.pub.
    Keygen {
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a signed bundle from a hand-compiled replacement object.
    Bundle {
        /// The deployed executable or shared library.
        #[arg(long)]
        target: PathBuf,
        /// ELF relocatable object with the new code (gcc -c -O2 -ffunction-sections).
        #[arg(long)]
        object: PathBuf,
        /// FUNC or FUNC=NEWFUNC: replace FUNC of the target by NEWFUNC of the object.
        #[arg(long = "replace", required = true)]
        replace: Vec<Replace>,
        #[arg(long, default_value_t = 1)]
        level: u32,
        #[arg(long = "cve")]
        cve: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Patch id (default: derived from target, level and object).
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Build a signed patch from a source tree and a fix, or say why it cannot be live.
    Build {
        /// The source tree the deployed binary was built from.
        #[arg(long)]
        source: PathBuf,
        /// The fix, as a unified diff (-p1 or -p0). Give it several times for a series
        /// (fix 1, fix 2, …): applied in order, the bundle is the cumulative level.
        #[arg(long, required = true)]
        diff: Vec<PathBuf>,
        /// The deployed executable or shared library (may be stripped).
        #[arg(long)]
        target: PathBuf,
        /// The project's own build command, run in the tree's top folder.
        #[arg(long)]
        build_cmd: String,
        /// Where the target appears in the tree after the build.
        #[arg(long)]
        artifact: Option<PathBuf>,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        level: u32,
        #[arg(long = "cve")]
        cve: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        id: Option<String>,
        /// Accept a kind of change knowingly (recorded in the manifest): `new-state`, new
        /// writable state or run-time initialisation that the changed code depends on.
        #[arg(long)]
        accept: Vec<String>,
        /// Keep the work trees and build logs in DIR.
        #[arg(long)]
        keep_work: Option<PathBuf>,
    },
    /// Show what a bundle contains (does not check trust).
    Inspect { bundle: PathBuf },
    /// Check a bundle's signature against trusted keys.
    Verify {
        bundle: PathBuf,
        /// Trusted public keys (default: /etc/suture/trusted.d/*.pub).
        #[arg(long)]
        trust: Vec<PathBuf>,
    },
    /// Apply a bundle to a running process, or to every process that maps its module.
    Apply {
        bundle: PathBuf,
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        pid: Option<i32>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        trust: Vec<PathBuf>,
        /// How long to retry while a thread is inside a function being replaced.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Processes patched at once with --all (default: twice the number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Take a patch back out of a process (default: the newest it carries), or with --all out
    /// of every process that carries it (without PATCH_ID: every patch of every process).
    /// Patch memory left partly applied or orphaned by an interrupted operation is cleaned up
    /// the same way (name it by its id).
    Revert {
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        pid: Option<i32>,
        #[arg(long)]
        all: bool,
        patch_id: Option<String>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Processes reverted at once with --all (default: twice the number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Which patches processes carry, read from the processes themselves.
    Status {
        #[arg(long)]
        pid: Option<i32>,
    },
    /// Pre-flight: can this process be patched (by this bundle), and if not, why.
    Check {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
    /// The host agent: keeps every process patched with the newest trusted bundles.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Can this host be live-patched, and which of its processes (for the bundles in the
    /// bundle folder).
    Eligibility {
        #[command(flatten)]
        agent: AgentFlags,
    },
    /// Compile a small buggy C service, patch it live, show the fix, revert, clean up.
    Demo {
        /// Keep the work directory (sources, binary, bundle, keys) and print its path.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Run the agent (a daemon: reconciles until SIGTERM/SIGINT).
    Run {
        #[command(flatten)]
        agent: AgentFlags,
    },
    /// Per bundle: state, reason, processes carrying it, processes that could not be patched.
    Status {
        #[command(flatten)]
        agent: AgentFlags,
    },
    /// Allow a rolled-back bundle to be applied again.
    Enable {
        bundle_id: String,
        #[command(flatten)]
        agent: AgentFlags,
    },
}

/// Agent settings: each overrides the config file (default /etc/suture/agent.toml).
#[derive(clap::Args, Debug, Default)]
pub struct AgentFlags {
    /// Settings file [default: /etc/suture/agent.toml, if present].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where signed bundles are dropped [default: /var/lib/suture/bundles].
    #[arg(long)]
    pub bundle_dir: Option<PathBuf>,
    /// Trusted publisher keys, *.pub [default: /etc/suture/trusted.d].
    #[arg(long)]
    pub trust_dir: Option<PathBuf>,
    /// Journal and status snapshot [default: /var/lib/suture].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Seconds after a patch goes live during which a crash rolls it back [default: 60].
    #[arg(long, value_name = "SECS")]
    pub health_window: Option<u64>,
    /// Serve Prometheus metrics on ADDR (HOST:PORT) [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// A command (sh -c) that must succeed while a bundle is in its health window.
    #[arg(long, value_name = "CMD")]
    pub health_cmd: Option<String>,
    /// Time between full reconcile passes.
    #[arg(long, hide = true)]
    pub interval_ms: Option<u64>,
    /// How long one apply or revert retries while a process is busy.
    #[arg(long, hide = true)]
    pub op_timeout_ms: Option<u64>,
    /// Processes patched at once.
    #[arg(long, hide = true)]
    pub jobs: Option<usize>,
    /// A folder searched for the files bundles target, so a program is patched before its
    /// first instruction when it starts (repeatable) [default: /usr/bin, /usr/sbin, /usr/lib,
    /// /usr/libexec, /usr/local/{bin,sbin,lib}, /opt].
    #[arg(long = "watch-path", value_name = "DIR")]
    pub watch_paths: Vec<PathBuf>,
    /// How long a starting process may be held until it is patched [default: 5000].
    #[arg(long, value_name = "MS")]
    pub hold_timeout_ms: Option<u64>,
}
