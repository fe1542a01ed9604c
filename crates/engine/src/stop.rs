//! Stopping every thread of a process with `PTRACE_SEIZE` + `PTRACE_INTERRUPT`, and letting
//! them go again.
//!
//! Threads are seized first (which does not stop them) and interrupted only when the world must
//! stand still, so the pause covers only the work that needs it. `PTRACE_O_TRACECLONE` makes
//! any thread created meanwhile a tracee of ours, and the thread list is re-read until no new
//! thread shows up: no thread escapes the stop.
//!
//! Rules that keep the target safe whatever happens to us:
//! - **No signal is ever held.** A signal that arrives while a thread is ours is delivered at
//!   once, in the thread's own state, and the thread is interrupted again afterwards: nothing
//!   sits in our memory that our death would lose (real-time signals included: glibc's
//!   `SIGSETXID` waits for every thread to take it).
//! - **No wait without a deadline**, and every wait understands every status the kernel can
//!   report (exits, `exec`, clone events, group stops, syscall stops, any signal number).
//! - **No single-step trap, no breakpoint.** The kernel does not clear a trap flag when a
//!   tracer dies, so an armed single-step outlives a killed tracer and kills the target with
//!   `SIGTRAP`. Every stop we make is an interrupt or a system-call stop, which a dying tracer
//!   simply releases.
//!
//! A ptrace tracer is a thread, not a process: a [`Session`] must be used from the thread that
//! created it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nix::errno::Errno;
use tracing::debug;

use crate::procfs;

/// The process went away while we worked on it.
#[derive(Debug, thiserror::Error)]
#[error("process {pid} exited during the operation; nothing was left changed in it")]
pub struct ProcessGone {
    pub pid: i32,
}

/// The process replaced its program (`execve`) while we worked on it.
#[derive(Debug, thiserror::Error)]
#[error("process {pid} replaced its program (exec) during the operation; the new program was not touched")]
pub struct ProcessExeced {
    pub pid: i32,
}

/// A thread that did not reach a stop in time: held in the kernel (uninterruptible sleep, a
/// `vfork` parent waiting for its child). Nothing was changed; later it may stop.
#[derive(Debug, thiserror::Error)]
#[error("process {pid}: thread {tid} did not stop within {timeout:?}{why}")]
pub struct DidNotStop {
    pub pid: i32,
    pub tid: i32,
    pub timeout: Duration,
    pub why: &'static str,
}

/// Errors that mean the whole process went away.
pub fn gone(pid: i32) -> anyhow::Error {
    anyhow::Error::new(ProcessGone { pid })
}

/// What `waitpid` reported for one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// `PTRACE_EVENT_STOP`: our interrupt (or a new thread's first stop), or a group stop
    /// (job control) when `group` is set.
    Interrupt { group: bool },
    /// A system-call entry or exit stop (`PTRACE_O_TRACESYSGOOD`).
    Syscall,
    /// A signal is about to be delivered to the thread.
    Signal(i32),
    /// The thread created a thread (`PTRACE_EVENT_CLONE`).
    Clone(i32),
    /// The thread called `execve`.
    Exec,
    /// The thread exited or was killed.
    Gone,
}

/// Waits (without blocking) for a status change of `tid`; `None` if it is still running.
pub(crate) fn poll(tid: i32) -> Result<Option<Stop>> {
    let mut status = 0;
    // SAFETY: waitpid only writes the status integer we pass.
    let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
    if r == 0 {
        return Ok(None);
    }
    if r < 0 {
        return match Errno::last() {
            Errno::ECHILD => Ok(Some(Stop::Gone)),
            Errno::EINTR => Ok(None),
            e => bail!("waiting for thread {tid}: {e}"),
        };
    }
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        return Ok(Some(Stop::Gone));
    }
    if !libc::WIFSTOPPED(status) {
        return Ok(None); // WIFCONTINUED: not a stop
    }
    let sig = libc::WSTOPSIG(status);
    let event = (status >> 16) & 0xff;
    Ok(Some(match event {
        0 if sig == libc::SIGTRAP | 0x80 => Stop::Syscall,
        0 => Stop::Signal(sig),
        libc::PTRACE_EVENT_STOP => Stop::Interrupt {
            group: sig != libc::SIGTRAP,
        },
        libc::PTRACE_EVENT_CLONE => {
            let mut child: libc::c_ulong = 0;
            // SAFETY: PTRACE_GETEVENTMSG writes one unsigned long to the pointer we pass.
            unsafe {
                libc::ptrace(
                    libc::PTRACE_GETEVENTMSG,
                    tid,
                    std::ptr::null_mut::<libc::c_void>(),
                    &mut child as *mut libc::c_ulong,
                )
            };
            Stop::Clone(child as i32)
        }
        libc::PTRACE_EVENT_EXEC => Stop::Exec,
        _ => Stop::Interrupt { group: false },
    }))
}

/// Raw ptrace requests on one thread; errors only mean the thread is gone.
pub(crate) fn ptrace_req(req: libc::c_uint, tid: i32, data: usize) -> Result<(), Errno> {
    // SAFETY: these requests (CONT, SYSCALL, INTERRUPT, DETACH, LISTEN) take no pointers;
    // `data` is a signal number or 0.
    let r = unsafe {
        libc::ptrace(
            req,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            data as *mut libc::c_void,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Is thread `tid` gone or on its way out (zombie/dead)?
fn thread_exiting(pid: i32, tid: i32) -> bool {
    matches!(thread_state(pid, tid), None | Some('Z' | 'X' | 'x'))
}

/// The scheduler state letter of a thread (`R`, `S`, `D`, `Z`, `T`, `t`, …).
/// At most this many threads are weighed to choose the injection thread.
const MAX_CANDIDATES: usize = 64;

/// A thread's state letter and the CPU time it has used (clock ticks, user + system).
fn thread_activity(pid: i32, tid: i32) -> Option<(char, u64)> {
    let stat = crate::procfs::read_text(&format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime(11) stime(12).
    let state = f.first()?.chars().next()?;
    let cpu = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((state, cpu))
}

pub(crate) fn thread_state(pid: i32, tid: i32) -> Option<char> {
    let stat = crate::procfs::read_text(&format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // The state follows the command name in parentheses, which may itself hold spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.chars().next())
}

/// Whether other processes keep the CPUs busy ([`sense_host_load`]).
static HOST_BUSY: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Sleeps of this thread end when asked, not up to 50 µs later (the default timer slack).
    static PRECISE_SLEEP: () = {
        // SAFETY: PR_SET_TIMERSLACK takes plain integers and changes only the calling thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    };
}

/// Looks at how many tasks are runnable on the host (`/proc/loadavg`: the least of `looks`
/// looks a millisecond apart, ours excluded; one look costs microseconds, several tell a busy
/// host from a passing task) and sets how waits for a tracee give up the CPU until the next
/// call. On a quiet host a yield hands it to the tracee or to another of our jobs, the fastest
/// way. On a busy one it hands it to a busy process for its whole time slice (a tick: 4 ms at
/// HZ=250), and every stop of every tracee would cost one: waits sleep briefly instead. Call
/// it before starting work (our own running threads would count). Returns whether the host is
/// busy.
pub fn sense_host_load(looks: u32) -> bool {
    let mut fewest = u32::MAX;
    for look in 0..looks.max(1) {
        if look > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The reader itself is running.
        fewest = fewest.min(
            crate::procfs::runnable_tasks()
                .unwrap_or(1)
                .saturating_sub(1),
        );
    }
    let busy = fewest > 0;
    HOST_BUSY.store(busy, Ordering::Relaxed);
    busy
}

/// One wait between polls for a tracee: a yield at first (a stop usually comes within
/// microseconds), or a short sleep on a busy host ([`sense_host_load`]); after 200 polls a
/// longer sleep, so a tracee that needs a CPU of a busy machine gets it from us.
pub(crate) fn pause(spins: &mut u32) {
    *spins += 1;
    if *spins >= 200 {
        std::thread::sleep(Duration::from_micros(50));
    } else if HOST_BUSY.load(Ordering::Relaxed) {
        PRECISE_SLEEP.with(|_| ());
        std::thread::sleep(Duration::from_micros(2));
    } else {
        std::thread::yield_now();
    }
}

/// Whether the calling thread (ptrace tracers are threads) already traces `tid`.
fn traced_by_us(pid: i32, tid: i32) -> bool {
    tracer_of(pid, tid) == Some(nix::unistd::gettid().as_raw())
}

/// The tracer of a thread (`TracerPid`), if any.
pub(crate) fn tracer_of(pid: i32, tid: i32) -> Option<i32> {
    let status = crate::procfs::read_text(&format!("/proc/{pid}/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|&t| t != 0)
}

/// Says who holds the process when seizing it is refused.
fn seize_refused(pid: i32, tid: i32) -> anyhow::Error {
    match tracer_of(pid, tid) {
        Some(t) if procfs::command_name(t) == "suture" => {
            anyhow::anyhow!("another suture operation is in progress on pid {pid} (suture pid {t})")
        }
        Some(t) => anyhow::anyhow!(
            "process {pid} is already traced by pid {t} ({}); only one tracer may attach",
            procfs::command_name(t)
        ),
        None if nix::unistd::geteuid().is_root() => {
            anyhow::anyhow!(
                "process {pid}: the kernel does not permit ptrace (an LSM or lockdown?)"
            )
        }
        None => anyhow::anyhow!("process {pid}: ptrace not permitted (run as root)"),
    }
}

#[derive(Debug, Default)]
struct Tracee {
    stopped: bool,
    /// Stopped by job control (SIGSTOP & co.), not by us: resume with LISTEN, not CONT.
    group: bool,
    /// Held by [`crate::hold`]: stays stopped until its holder lets it go.
    pinned: bool,
    /// Its stack has no room for an injection frame (a thread made with a small stack).
    cramped: bool,
    /// It did not reach a stop before the deadline: waiting for it again (to detach) would only
    /// wait as long again.
    stuck: bool,
}

/// The threads of one process, seized by us.
pub struct Session {
    pid: i32,
    tracees: BTreeMap<i32, Tracee>,
    /// How long a thread may take to reach a stop (one in uninterruptible sleep takes longer).
    pub stop_timeout: Duration,
    /// Signals delivered while the session ran (the memory below a thread's stack may then
    /// hold a live signal frame).
    pub(crate) delivered: u64,
    /// The thread chosen to act through ([`Session::injection_thread`]).
    injector: std::cell::Cell<Option<i32>>,
}

const OPTIONS: usize =
    (libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACEEXEC) as usize;

/// `PTRACE_SEIZE` of one thread with our options (it keeps running).
fn seize_raw(tid: i32) -> Result<(), Errno> {
    // SAFETY: PTRACE_SEIZE takes the options as data and no pointer.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            OPTIONS as *mut libc::c_void,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

impl Session {
    /// Seizes every thread of `pid` without stopping any.
    pub fn seize(pid: i32) -> Result<Session> {
        let mut session = Session {
            pid,
            tracees: BTreeMap::new(),
            stop_timeout: Duration::from_secs(2),
            delivered: 0,
            injector: std::cell::Cell::new(None),
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

    /// Seizes one thread only, without stopping it (a thread that is about to `exec` or to
    /// load a module: [`crate::hold`]).
    pub(crate) fn seize_thread(pid: i32, tid: i32) -> Result<Session> {
        if let Err(e) = seize_raw(tid) {
            return Err(match e {
                Errno::ESRCH => gone(pid),
                _ => seize_refused(pid, tid),
            });
        }
        let mut tracees = BTreeMap::new();
        tracees.insert(tid, Tracee::default());
        Ok(Session {
            pid,
            tracees,
            stop_timeout: Duration::from_secs(2),
            delivered: 0,
            injector: std::cell::Cell::new(None),
        })
    }

    /// Seizes the threads of the process not traced yet, until no new one shows up.
    pub(crate) fn seize_rest(&mut self) -> Result<()> {
        for _ in 0..64 {
            if self.seize_new_threads()? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Marks `tid`, which its holder has put in an interrupt stop, as held: no operation of
    /// the session lets it run; only [`Session::unpin`] or the detach does.
    pub(crate) fn pin(&mut self, tid: i32) {
        let t = self.tracees.entry(tid).or_default();
        t.stopped = true;
        t.pinned = true;
    }

    pub(crate) fn unpin(&mut self, tid: i32) {
        if let Some(t) = self.tracees.get_mut(&tid) {
            t.pinned = false;
        }
    }

    /// The thread `old` carries on as `new` (a non-leader thread that exec'd takes the
    /// process id).
    pub(crate) fn renamed(&mut self, old: i32, new: i32) {
        if old != new {
            if let Some(t) = self.tracees.remove(&old) {
                self.tracees.insert(new, t);
            }
        }
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
            match seize_raw(tid) {
                Ok(()) => {
                    self.tracees.insert(tid, Tracee::default());
                    new += 1;
                }
                Err(Errno::ESRCH) => {} // the thread exited meanwhile
                // The kernel also says EPERM for a thread that is exiting (a zombie leader).
                Err(Errno::EPERM) if thread_exiting(self.pid, tid) => {}
                // ... and for one a seized thread just created: TRACECLONE already attached it
                // to us, and its clone event is still to be read.
                Err(Errno::EPERM) if traced_by_us(self.pid, tid) => {
                    self.tracees.insert(tid, Tracee::default());
                    new += 1;
                }
                Err(Errno::EPERM) => {
                    if self.tracees.is_empty() && !procfs::exists(self.pid) {
                        bail!(gone(self.pid));
                    }
                    return Err(seize_refused(self.pid, tid));
                }
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

    /// The thread to act through, the same for the whole session while it lives: the one
    /// that has used the least CPU among those asleep (a background thread rather than the
    /// one serving clients, who then wait only for the all-threads stops), else the main
    /// thread, else any.
    pub fn injection_thread(&self) -> Option<i32> {
        let usable = |tid: i32| {
            self.tracees
                .get(&tid)
                .is_some_and(|t| !t.group && !t.cramped)
        };
        if let Some(tid) = self.injector.get().filter(|&t| usable(t)) {
            return Some(tid);
        }
        let quietest = self
            .threads()
            .filter(|&t| usable(t))
            .take(MAX_CANDIDATES)
            .filter_map(|t| thread_activity(self.pid, t).map(|(state, cpu)| (t, state, cpu)))
            .filter(|&(_, state, _)| state == 'S')
            .min_by_key(|&(t, _, cpu)| (cpu, t != self.pid))
            .map(|(t, _, _)| t);
        let chosen = quietest
            .or_else(|| self.threads().find(|&t| t == self.pid && usable(t)))
            .or_else(|| self.threads().find(|&t| usable(t)));
        self.injector.set(chosen);
        chosen
    }

    /// Never act through `tid` again in this session: its stack has no room for our frame.
    pub(crate) fn pass_over(&mut self, tid: i32) {
        if let Some(t) = self.tracees.get_mut(&tid) {
            t.cramped = true;
        }
        if self.injector.get() == Some(tid) {
            self.injector.set(None);
        }
    }

    /// Whether `tid` is stopped by job control (`SIGSTOP`, Ctrl-Z): then so is the whole
    /// process, and nothing should run in it until it is continued.
    pub fn job_stopped(&self, tid: i32) -> bool {
        self.tracees.get(&tid).is_some_and(|t| t.stopped && t.group)
    }

    /// Stops one thread.
    pub fn stop_thread(&mut self, tid: i32) -> Result<()> {
        if self.tracees.get(&tid).is_some_and(|t| !t.stopped) {
            let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
            self.wait_stopped(tid)?;
        }
        Ok(())
    }

    /// Stops every thread, including any created while stopping.
    pub fn stop_all(&mut self) -> Result<()> {
        loop {
            let running = self.running();
            for &tid in &running {
                let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
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

    /// Handles a status that is not the stop we wait for; returns whether the thread is now in
    /// an interrupt stop of ours.
    fn absorb(&mut self, tid: i32, stop: Stop) -> Result<bool> {
        match stop {
            Stop::Interrupt { group } => {
                let t = self.tracees.entry(tid).or_default();
                t.stopped = true;
                t.group = group;
                Ok(true)
            }
            Stop::Clone(child) => {
                debug!(
                    tid,
                    child, "thread created during the operation; now traced"
                );
                self.tracees.entry(child).or_default();
                // Only interrupt stops are places we act from: let the creator finish its
                // clone and stop it again.
                let _ = ptrace_req(libc::PTRACE_CONT, tid, 0);
                let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
                Ok(false)
            }
            Stop::Syscall => {
                let _ = ptrace_req(libc::PTRACE_CONT, tid, 0);
                let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
                Ok(false)
            }
            Stop::Signal(sig) => {
                // Never hold a signal: deliver it now, in the thread's own state, and take the
                // thread back afterwards.
                debug!(tid, sig, "signal arrived while stopping; delivered");
                self.delivered += 1;
                let _ = ptrace_req(libc::PTRACE_CONT, tid, sig as usize);
                let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
                Ok(false)
            }
            Stop::Exec => {
                self.release_after_exec(tid);
                Err(anyhow::Error::new(ProcessExeced { pid: self.pid }))
            }
            Stop::Gone => {
                self.tracees.remove(&tid);
                if !procfs::exists(self.pid)
                    || procfs::is_zombie(self.pid) && self.tracees.is_empty()
                {
                    self.reap_all();
                    bail!(gone(self.pid));
                }
                Ok(false)
            }
        }
    }

    /// Waits until `tid` is in an interrupt stop (or gone).
    fn wait_stopped(&mut self, tid: i32) -> Result<()> {
        let deadline = Instant::now() + self.stop_timeout;
        let mut spins = 0u32;
        loop {
            if !self.tracees.contains_key(&tid) {
                return Ok(()); // exited meanwhile
            }
            match poll(tid).map_err(|e| e.context(format!("process {}", self.pid)))? {
                Some(stop) => {
                    if self.absorb(tid, stop)? {
                        if let Some(t) = self.tracees.get_mut(&tid) {
                            t.stuck = false; // it does stop after all
                        }
                        return Ok(());
                    }
                }
                None => {
                    if Instant::now() > deadline {
                        let why = match thread_state(self.pid, tid) {
                            Some('D') => " (it is in uninterruptible sleep)",
                            None => " (it is exiting)",
                            _ => "",
                        };
                        if let Some(t) = self.tracees.get_mut(&tid) {
                            t.stuck = true;
                        }
                        return Err(anyhow::Error::new(DidNotStop {
                            pid: self.pid,
                            tid,
                            timeout: self.stop_timeout,
                            why,
                        }));
                    }
                    pause(&mut spins);
                }
            }
        }
    }

    /// Waits for the next status of `tid` after we resumed it with `PTRACE_SYSCALL` (for
    /// [`crate::remote`]): a system-call stop, or a signal that is about to be delivered.
    /// Other statuses are handled here.
    pub(crate) fn wait_injected(&mut self, tid: i32, deadline: Instant) -> Result<Injected> {
        let mut spins = 0u32;
        loop {
            match poll(tid).map_err(|e| e.context(format!("process {}", self.pid)))? {
                Some(Stop::Syscall) => return Ok(Injected::Syscall),
                Some(Stop::Signal(sig)) => return Ok(Injected::Signal(sig)),
                Some(Stop::Interrupt { .. }) => return Ok(Injected::Interrupted),
                Some(Stop::Clone(child)) => {
                    // A function we call in the target may create a thread: it is ours too.
                    self.tracees.entry(child).or_default();
                    let _ = ptrace_req(libc::PTRACE_SYSCALL, tid, 0);
                }
                Some(other @ (Stop::Exec | Stop::Gone)) => {
                    self.absorb(tid, other)?;
                    bail!(gone(self.pid));
                }
                None => {
                    if Instant::now() > deadline {
                        return Ok(Injected::TimedOut);
                    }
                    pause(&mut spins);
                }
            }
        }
    }

    /// Delivers `sig` to `tid` (in whatever state its registers hold now) and waits until it is
    /// back in an interrupt stop.
    pub(crate) fn deliver_and_restop(&mut self, tid: i32, sig: i32) -> Result<()> {
        self.delivered += 1;
        let _ = ptrace_req(libc::PTRACE_CONT, tid, sig as usize);
        let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
        self.restopped(tid)
    }

    /// Takes a thread out of a system-call stop into an interrupt stop without running any
    /// of its user code: the kernel then restarts an interrupted system call from the
    /// registers we restore there, as it would have without us. (The interrupt is armed
    /// before the thread leaves the stop, so it traps on its way out.)
    pub(crate) fn leave_syscall_stop(&mut self, tid: i32) -> Result<()> {
        let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
        let _ = ptrace_req(libc::PTRACE_CONT, tid, 0);
        self.restopped(tid)
    }

    /// Waits for a thread we just let go of to be back in an interrupt stop.
    fn restopped(&mut self, tid: i32) -> Result<()> {
        if let Some(t) = self.tracees.get_mut(&tid) {
            t.stopped = false;
        }
        self.wait_stopped(tid)?;
        if !self.tracees.contains_key(&tid) {
            bail!(gone(self.pid));
        }
        Ok(())
    }

    /// Lets `tid` run alone for a moment and stops it again (to get it out of a function being
    /// replaced without single-stepping). False if it is gone.
    pub fn nudge(&mut self, tid: i32, run_for: Duration) -> Result<bool> {
        if ptrace_req(libc::PTRACE_CONT, tid, 0).is_err() {
            return Ok(false);
        }
        if let Some(t) = self.tracees.get_mut(&tid) {
            t.stopped = false;
        }
        std::thread::sleep(run_for);
        let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
        self.wait_stopped(tid)?;
        Ok(self.tracees.contains_key(&tid))
    }

    /// Lets every thread but `keep` run again, keeping them seized (for a retry, or while
    /// `keep` does clean-up that no longer needs the world stopped).
    pub fn resume(&mut self, keep: Option<i32>) {
        for (&tid, t) in self.tracees.iter_mut() {
            if t.stopped && !t.pinned && Some(tid) != keep {
                // A thread stopped by job control stays stopped (LISTEN); ours run.
                let req = if t.group {
                    libc::PTRACE_LISTEN
                } else {
                    libc::PTRACE_CONT
                };
                let _ = ptrace_req(req, tid, 0);
                t.stopped = false;
            }
        }
    }

    /// Detaches, from the stop they are in, every stopped thread but `keep` (and pinned ones):
    /// they run on untraced, and no later stop is needed to let go of them (detach needs a
    /// stop). For the last stop an operation needs every thread in. A thread stopped by job
    /// control stays stopped.
    pub fn let_go(&mut self, keep: Option<i32>) {
        let done: Vec<i32> = self
            .tracees
            .iter()
            .filter(|&(&tid, t)| t.stopped && !t.pinned && Some(tid) != keep)
            .map(|(&tid, _)| tid)
            .collect();
        for tid in done {
            let _ = ptrace_req(libc::PTRACE_DETACH, tid, 0);
            self.tracees.remove(&tid);
        }
    }

    /// Detaches from every thread; running ones are stopped first (detach needs a stop).
    pub fn detach(mut self) {
        self.detach_inner();
    }

    /// Same as [`Session::detach`], leaving an empty session behind.
    pub fn detach_inner(&mut self) {
        // A thread that did not stop once (frozen, uninterruptible) is forgotten at once: the
        // kernel lets it go when the thread that traces it ends.
        self.tracees.retain(|_, t| t.stopped || !t.stuck);
        let running = self.running();
        for &tid in &running {
            let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
        }
        for tid in running {
            if self.wait_stopped(tid).is_err() {
                // Gone, exec'ed or stuck: the kernel releases it when we exit; forget it.
                self.tracees.remove(&tid);
            }
        }
        for (tid, _) in std::mem::take(&mut self.tracees) {
            let _ = ptrace_req(libc::PTRACE_DETACH, tid, 0);
        }
    }

    /// After an exec the other threads are gone and the exec'ing thread holds the new
    /// program: let it go and reap the rest.
    fn release_after_exec(&mut self, tid: i32) {
        let _ = ptrace_req(libc::PTRACE_DETACH, tid, 0);
        self.tracees.remove(&tid);
        let others: Vec<i32> = self.tracees.keys().copied().collect();
        for t in others {
            let _ = ptrace_req(libc::PTRACE_DETACH, t, 0);
        }
        self.reap_all();
    }

    /// Collects the exit statuses of threads that died while ours (a zombie thread stays until
    /// its tracer reaps it, and its process cannot be reaped before).
    fn reap_all(&mut self) {
        for (tid, _) in std::mem::take(&mut self.tracees) {
            let mut status = 0;
            // SAFETY: waitpid only writes the status integer.
            unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        }
    }
}

/// What became of a thread resumed with `PTRACE_SYSCALL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injected {
    Syscall,
    Signal(i32),
    Interrupted,
    TimedOut,
}

impl Drop for Session {
    fn drop(&mut self) {
        // On any error path: never leave a thread stopped or traced.
        if !self.tracees.is_empty() {
            self.detach_inner();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Processes that keep a CPU busy make the host busy, and waits then sleep (yields would
    /// hand the CPU to them for a whole time slice per stop).
    #[test]
    fn busy_processes_are_sensed() {
        let mut hogs: Vec<std::process::Child> = (0..2)
            .map(|_| {
                std::process::Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let busy = sense_host_load(3);
        let waits_sleep = HOST_BUSY.load(Ordering::Relaxed);
        for h in &mut hogs {
            let _ = h.kill();
            let _ = h.wait();
        }
        assert!(busy && waits_sleep);
        assert!(crate::procfs::runnable_tasks().is_some_and(|n| n >= 1));
    }
}
