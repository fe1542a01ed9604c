//! The Suture engine: applies a verified patch bundle to a running x86-64 Linux process, takes
//! it back, and reports what a process carries.
//!
//! It is an out-of-process loader (no `LD_PRELOAD`, no cooperation from the target):
//!
//! 1. find the target module in the process by build-id ([`modules`]);
//! 2. check the running bytes of every function against the bundle, resolve the patch's
//!    symbols, and link its object for an address within ±2 GiB of the module ([`placement`],
//!    `suture-link`), all while the process runs;
//! 3. stop one thread to create a named memfd in the target and map the patch there read-only,
//!    then flip text to R-X and data to RW ([`remote`]); memory is never writable and
//!    executable at once;
//! 4. stop every thread ([`stop`]), re-verify, check that no thread is inside or returning into
//!    a replaced function ([`safety`]), write the 5-byte detours through `/proc/PID/mem`, and
//!    let go. Busy processes are retried with back-off until a deadline.
//!
//! The record of what was applied lives in the patch mapping itself ([`record`]).
//! See `docs/THREAT-MODEL.md` for what this defends against and what it does not.

mod bind;
pub mod fault;
pub mod hold;
pub mod interrupt;
pub mod lock;
pub mod modules;
pub mod placement;
pub mod procfs;
pub mod record;
pub mod remote;
pub mod safety;
pub mod seccomp;
pub mod stop;
pub mod unwind;

mod apply;
mod check;

pub use apply::{apply, apply_unless_carried, revert, ApplyOptions, ApplyReport, RevertReport};
pub use check::{check, inspect, inspect_maps, processes_mapping, status, CheckReport, ModuleInfo};
pub use record::{Detour, FoundPatch, PatchRecord, PatchState};

/// How an operation on a process failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The patch does not fit this process; nothing was touched.
    #[error("{0}")]
    Refused(String),
    /// A thread kept running a function being replaced until the deadline; nothing was touched.
    #[error("busy: {0}")]
    Busy(String),
    /// The process exited (or replaced its program) while we worked on it.
    #[error("{0}")]
    Exited(String),
    /// The operator interrupted us (SIGINT/SIGTERM/SIGHUP); the message says what was left.
    #[error("{0}")]
    Interrupted(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// A refusal: the patch does not fit this process, nothing was touched.
pub(crate) fn refused(msg: impl Into<String>) -> EngineError {
    EngineError::Refused(msg.into())
}

impl EngineError {
    /// A stable word for scripts (`--json`).
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Refused(_) => "refused",
            EngineError::Busy(_) => "busy",
            EngineError::Exited(_) => "exited",
            EngineError::Interrupted(_) => "interrupted",
            EngineError::Failed(_) => "failed",
        }
    }
}

/// How many processes to work on at once by default: two per CPU. A job spends most of an
/// operation waiting for its tracee to reach a stop, so one per CPU leaves CPUs idle (1,000
/// idle processes on 2 CPUs: 0.58–0.65 s with 2 jobs, 0.52–0.57 s with 4; with both CPUs
/// busy, 3.0–3.6 s and 2.4–3.0 s).
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .saturating_mul(2)
}

/// Measures the floor for pause benchmarks: a bare seize + interrupt + detach of every thread,
/// doing nothing in between. Returns the stopped time in microseconds.
pub fn bare_stop(pid: i32) -> anyhow::Result<u64> {
    let mut session = stop::Session::seize(pid)?;
    let t = std::time::Instant::now();
    session.stop_all()?;
    session.detach();
    Ok(t.elapsed().as_micros() as u64)
}

/// What one injected system call costs in process `pid` (for benchmarks): (microseconds to lay
/// the injection frame on its main thread, microseconds of one `getpid` made by that thread
/// through it). Every apply makes a handful of such calls; this is their unit price.
#[doc(hidden)]
pub fn bare_injected_call(pid: i32) -> anyhow::Result<(u64, u64)> {
    let mut session = stop::Session::seize(pid)?;
    session.stop_thread(pid)?;
    let maps = procfs::read_maps(pid)?;
    let mem = procfs::Memory::open(pid)?;
    let gadgets = remote::find_gadgets(&mem, &maps)?;
    let t = std::time::Instant::now();
    let mut r = remote::Remote::new(&session, pid, &mem, &maps, gadgets)?;
    let laid = t.elapsed().as_micros() as u64;
    let t = std::time::Instant::now();
    let got = r.syscall(&mut session, &mem, &maps, libc::SYS_getpid, &[]);
    let call = t.elapsed().as_micros() as u64;
    let finished = r.finish(&mut session, &mem);
    session.detach();
    anyhow::ensure!(got? == i64::from(pid), "getpid answered something else");
    finished?;
    Ok((laid, call))
}
