//! Stopping every thread of a process with `PTRACE_SEIZE` + `PTRACE_INTERRUPT`, and letting
//! them go again.
//!
//! Threads are seized first (which does not stop them) and interrupted only when the world must
//! stand still, so the pause covers only the work that needs it. `PTRACE_O_TRACECLONE` makes
//! any thread created meanwhile a tracee of ours, and the thread list is re-read until no new
//! thread shows up: no thread escapes the stop. Signals that arrive while a thread is stopped
//! are remembered and delivered when it is resumed, so the target loses none.
//!
//! A ptrace tracer is a thread, not a process: a [`Session`] must be used from the thread that
//! created it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::debug;

use crate::procfs;

#[derive(Debug, Default)]
struct Tracee {
    stopped: bool,
    /// A signal that was being delivered when the thread stopped; handed back on resume.
    pending: Option<Signal>,
}

/// The threads of one process, seized by us.
pub struct Session {
    pid: i32,
    tracees: BTreeMap<i32, Tracee>,
    /// How long a thread may take to reach a stop (one in uninterruptible sleep takes longer).
    pub stop_timeout: Duration,
}

/// Errors that mean the whole process went away.
pub fn gone(pid: i32) -> anyhow::Error {
    anyhow::anyhow!("process {pid} exited during the operation; nothing was left changed in it")
}

/// Is thread `tid` gone or on its way out (zombie/dead)?
fn thread_exiting(pid: i32, tid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) {
        // The state follows the command name in parentheses, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| matches!(state, "Z" | "X" | "x")),
        Err(_) => true,
    }
}

/// One wait between polls for a tracee: yield at first (a stop usually comes within
/// microseconds), then sleep, so a tracee that needs a CPU of a busy machine gets it from us.
pub(crate) fn pause(spins: &mut u32) {
    *spins += 1;
    if *spins < 200 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Whether the calling thread (ptrace tracers are threads) already traces `tid`.
fn traced_by_us(pid: i32, tid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .is_some_and(|tracer| tracer == nix::unistd::gettid().as_raw() as u32)
}

impl Session {
    /// Seizes every thread of `pid` without stopping any.
    pub fn seize(pid: i32) -> Result<Session> {
        let mut session = Session {
            pid,
            tracees: BTreeMap::new(),
            stop_timeout: Duration::from_secs(2),
        };
        // Converge before anything stops: once every listed thread is seized, any thread created
        // later is born traced (TRACECLONE), so the stop itself need not list /proc again.
        for _ in 0..64 {
            if session.seize_new_threads()? == 0 {
                break;
            }
        }
        if session.tracees.is_empty() {
            bail!(gone(pid));
        }
        Ok(session)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn threads(&self) -> impl Iterator<Item = i32> + '_ {
        self.tracees.keys().copied()
    }

    pub fn thread_count(&self) -> usize {
        self.tracees.len()
    }

    /// Seizes threads listed in /proc that we don't trace yet; returns how many were new.
    fn seize_new_threads(&mut self) -> Result<usize> {
        let mut new = 0;
        let tids = procfs::threads(self.pid).map_err(|_| gone(self.pid))?;
        for tid in tids {
            if self.tracees.contains_key(&tid) {
                continue;
            }
            match ptrace::seize(Pid::from_raw(tid), ptrace::Options::PTRACE_O_TRACECLONE) {
                Ok(()) => {
                    self.tracees.insert(tid, Tracee::default());
                    new += 1;
                }
                Err(Errno::ESRCH) => {} // the thread exited meanwhile
                // The kernel also says EPERM for a thread that is exiting.
                Err(Errno::EPERM) if thread_exiting(self.pid, tid) => {}
                // ... and for one a seized thread just created: TRACECLONE already attached it
                // to us, and its clone event is still to be read.
                Err(Errno::EPERM) if traced_by_us(self.pid, tid) => {
                    self.tracees.insert(tid, Tracee::default());
                    new += 1;
                }
                Err(Errno::EPERM) => bail!(
                    "process {}: ptrace not permitted (already traced by another debugger, or not root)",
                    self.pid
                ),
                Err(e) => bail!("process {}: cannot seize thread {tid}: {e}", self.pid),
            }
        }
        Ok(new)
    }

    /// Threads we trace that are not in a stop.
    fn running(&self) -> Vec<i32> {
        self.tracees
            .iter()
            .filter(|(_, t)| !t.stopped)
            .map(|(tid, _)| *tid)
            .collect()
    }

    /// The thread to act through: the main thread if it lives, else any.
    pub fn injection_thread(&self) -> Option<i32> {
        self.threads()
            .find(|&t| t == self.pid)
            .or_else(|| self.threads().next())
    }

    /// Stops one thread.
    pub fn stop_thread(&mut self, tid: i32) -> Result<()> {
        if self.tracees.get(&tid).is_some_and(|t| !t.stopped) {
            let _ = ptrace::interrupt(Pid::from_raw(tid));
            self.wait_stopped(tid)?;
        }
        Ok(())
    }

    /// Stops every thread, including any created while stopping.
    pub fn stop_all(&mut self) -> Result<()> {
        loop {
            let running = self.running();
            for &tid in &running {
                let _ = ptrace::interrupt(Pid::from_raw(tid));
            }
            for &tid in &running {
                self.wait_stopped(tid)?;
            }
            // Threads born meanwhile were auto-attached (TRACECLONE, seen in wait_stopped) and
            // are stopped on the next round.
            if self.tracees.is_empty() {
                bail!(gone(self.pid));
            }
            if self.tracees.values().all(|t| t.stopped) {
                return Ok(());
            }
        }
    }

    /// Waits until `tid` is in a ptrace-stop (or gone).
    fn wait_stopped(&mut self, tid: i32) -> Result<()> {
        let deadline = Instant::now() + self.stop_timeout;
        let mut spins = 0u32;
        loop {
            let status = waitpid(
                Pid::from_raw(tid),
                Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
            );
            match status {
                Ok(WaitStatus::StillAlive) => {
                    if Instant::now() > deadline {
                        bail!(
                            "process {}: thread {tid} did not stop within {:?} (uninterruptible sleep?)",
                            self.pid,
                            self.stop_timeout
                        );
                    }
                    pause(&mut spins);
                }
                Ok(WaitStatus::PtraceEvent(_, _, event)) => {
                    if event == libc::PTRACE_EVENT_CLONE {
                        if let Ok(child) = ptrace::getevent(Pid::from_raw(tid)) {
                            debug!(tid, child, "thread created during stop; now traced");
                            self.tracees.entry(child as i32).or_default();
                        }
                    }
                    self.mark_stopped(tid, None);
                    return Ok(());
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    let pending = (sig != Signal::SIGTRAP).then_some(sig);
                    self.mark_stopped(tid, pending);
                    return Ok(());
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                    self.tracees.remove(&tid);
                    if !procfs::exists(self.pid) {
                        bail!(gone(self.pid));
                    }
                    return Ok(());
                }
                Ok(other) => {
                    debug!(tid, ?other, "unexpected wait status; treating as stopped");
                    self.mark_stopped(tid, None);
                    return Ok(());
                }
                Err(Errno::EINTR) => {}
                Err(e) => bail!("process {}: waiting for thread {tid}: {e}", self.pid),
            }
        }
    }

    fn mark_stopped(&mut self, tid: i32, pending: Option<Signal>) {
        let t = self.tracees.entry(tid).or_default();
        t.stopped = true;
        if pending.is_some() {
            t.pending = pending;
        }
    }

    /// Records a signal that arrived while we were driving `tid`, to deliver on resume.
    pub fn defer_signal(&mut self, tid: i32, sig: Signal) {
        if let Some(t) = self.tracees.get_mut(&tid) {
            t.pending = Some(sig);
        }
    }

    /// Forgets a thread that exited while we drove it.
    pub fn forget(&mut self, tid: i32) {
        self.tracees.remove(&tid);
    }

    /// Executes one instruction of stopped thread `tid`, the others staying stopped. False if
    /// it did not come back to a stop before `deadline` (it is then stopped again by force).
    pub fn step(&mut self, tid: i32, deadline: Instant) -> Result<bool> {
        let pid = Pid::from_raw(tid);
        ptrace::step(pid, None).map_err(|_| gone(self.pid))?;
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) | Ok(WaitStatus::PtraceEvent(..)) => {
                    return Ok(true)
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    // A signal got in first: keep it for later and take the step again.
                    self.defer_signal(tid, sig);
                    ptrace::step(pid, None).map_err(|_| gone(self.pid))?;
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {
                    if Instant::now() > deadline {
                        let _ = ptrace::interrupt(pid);
                        if let Some(t) = self.tracees.get_mut(&tid) {
                            t.stopped = false;
                        }
                        self.wait_stopped(tid)?;
                        return Ok(false);
                    }
                    std::thread::yield_now();
                }
                Ok(_) | Err(_) => {
                    self.tracees.remove(&tid);
                    if !procfs::exists(self.pid) {
                        bail!(gone(self.pid));
                    }
                    return Ok(false);
                }
            }
        }
    }

    /// Lets every thread but `keep` run again, keeping them seized (for a retry, or while
    /// `keep` does clean-up that no longer needs the world stopped).
    pub fn resume(&mut self, keep: Option<i32>) {
        for (&tid, t) in self.tracees.iter_mut() {
            if t.stopped && Some(tid) != keep {
                let _ = ptrace::cont(Pid::from_raw(tid), t.pending.take());
                t.stopped = false;
            }
        }
    }

    /// Detaches from every thread; running ones are stopped first (detach needs a stop).
    pub fn detach(mut self) {
        self.detach_inner();
    }

    /// Same as [`Session::detach`], leaving an empty session behind.
    pub fn detach_inner(&mut self) {
        let running = self.running();
        for tid in running {
            let _ = ptrace::interrupt(Pid::from_raw(tid));
            let _ = self.wait_stopped(tid);
        }
        for (tid, t) in std::mem::take(&mut self.tracees) {
            let _ = ptrace::detach(Pid::from_raw(tid), t.pending);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // On any error path: never leave a thread stopped or traced.
        if !self.tracees.is_empty() {
            self.detach_inner();
        }
    }
}
