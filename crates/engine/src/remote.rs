//! Making a stopped thread of the target run a system call or a function for us.
//!
//! The thread's registers are saved, pointed at a `syscall` instruction that already exists in
//! the target (so nothing is written into its code), single-stepped, and restored. `orig_rax`
//! is set to -1 while we drive it so that the kernel does not "restart" the system call the
//! thread was sleeping in on our behalf; restoring the saved registers restores that restart.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libc::user_regs_struct;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::procfs::{Mapping, Memory};
use crate::seccomp::{self, SeccompData, SockFilter};
use crate::stop::{gone, pause, Session};

/// Bytes below the stack pointer we leave alone: the x86-64 red zone plus a margin.
const STACK_SKIP: u64 = 128 + 1024;
/// Dead stack below the red zone that our scratch data and remote calls may use; saved first
/// and put back by [`Remote::finish`] so the target's memory ends byte-identical.
const STACK_USE: u64 = 16 << 10;

/// The target's seccomp filter would stop a system call the engine needs.
#[derive(Debug, thiserror::Error)]
#[error("process {pid} runs under a seccomp filter that blocks `{syscall}`, which patching needs; it was not touched")]
pub struct SeccompBlocks {
    pub pid: i32,
    pub syscall: &'static str,
}

/// A stopped thread we use to act inside the target.
pub struct Remote {
    pid: i32,
    tid: i32,
    saved: user_regs_struct,
    syscall_insn: u64,
    /// (address, bytes) of the dead stack we may scribble on.
    stack: (u64, Vec<u8>),
    /// The thread's seccomp filters: every injected call is checked against them first.
    filters: Vec<Vec<SockFilter>>,
}

impl Remote {
    /// Takes over `tid`, which must be stopped in `session`.
    pub fn new(session: &Session, tid: i32, mem: &Memory, maps: &[Mapping]) -> Result<Remote> {
        let saved = ptrace::getregs(Pid::from_raw(tid)).map_err(|_| gone(session.pid()))?;
        let syscall_insn = find_syscall_insn(mem, maps)?;
        let top = saved.rsp - 128;
        let floor = maps
            .iter()
            .find(|m| m.contains(saved.rsp))
            .map(|m| m.start)
            .unwrap_or(top - STACK_USE);
        let low = top.saturating_sub(STACK_USE).max(floor);
        if top - low < STACK_USE / 2 {
            bail!("thread {tid}: too little stack left below its stack pointer to work with");
        }
        let stack = (low, mem.read(low, (top - low) as usize)?);
        let filters = seccomp::filters(session.pid(), tid)?;
        if let Err(name) = seccomp::check_injected(&filters, syscall_insn)? {
            return Err(anyhow::Error::new(SeccompBlocks {
                pid: session.pid(),
                syscall: name,
            }));
        }
        Ok(Remote {
            pid: session.pid(),
            tid,
            saved,
            syscall_insn,
            stack,
            filters,
        })
    }

    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Scratch memory on the thread's own stack, below anything it uses.
    pub fn scratch(&self) -> u64 {
        (self.saved.rsp - STACK_SKIP) & !0xf
    }

    /// Runs system call `nr` in the target; returns its raw result (negative errno on failure).
    pub fn syscall(&mut self, session: &mut Session, nr: i64, args: &[u64]) -> Result<i64> {
        if !self.filters.is_empty() {
            let mut a = [0u64; 6];
            for (slot, v) in a.iter_mut().zip(args) {
                *slot = *v;
            }
            let data = SeccompData {
                nr: nr as i32,
                arch: seccomp::AUDIT_ARCH_X86_64,
                instruction_pointer: self.syscall_insn,
                args: a,
            };
            if !seccomp::allows(&self.filters, &data)? {
                bail!(
                    "process {}: its seccomp filter would block system call {nr}; not injected",
                    self.pid
                );
            }
        }
        let mut regs = self.saved;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rip = self.syscall_insn;
        let slots = [
            &mut regs.rdi,
            &mut regs.rsi,
            &mut regs.rdx,
            &mut regs.r10,
            &mut regs.r8,
            &mut regs.r9,
        ];
        for (slot, value) in slots.into_iter().zip(args) {
            *slot = *value;
        }
        let pid = Pid::from_raw(self.tid);
        ptrace::setregs(pid, regs).map_err(|_| gone(self.pid))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut tries = 0;
        let out = loop {
            ptrace::step(pid, None).map_err(|_| gone(self.pid))?;
            match self.wait(session, deadline)? {
                Signal::SIGTRAP => {
                    // Done only if the thread is past our `syscall`: a single-step trap left
                    // over from an earlier step (of a thread that was in a blocking system
                    // call) arrives before anything executed.
                    let out = ptrace::getregs(pid).map_err(|_| gone(self.pid))?;
                    if out.rip == self.syscall_insn + 2 {
                        break out;
                    }
                }
                other => session.defer_signal(self.tid, other), // keep it for later
            }
            tries += 1;
            if tries > 16 {
                self.restore()?;
                bail!(
                    "process {}: injected system call {nr} did not run",
                    self.pid
                );
            }
            ptrace::setregs(pid, regs).map_err(|_| gone(self.pid))?;
        };
        self.restore()?;
        Ok(out.rax as i64)
    }

    /// Calls `func(args…)` (up to six integer arguments) in the target and returns `rax`. Used
    /// for GNU indirect function resolvers and to register unwind tables. The call returns to
    /// address 0; the resulting fault is ours and is never delivered to the target.
    pub fn call(
        &mut self,
        session: &mut Session,
        mem: &Memory,
        func: u64,
        args: &[u64],
    ) -> Result<u64> {
        if args.len() > 6 {
            bail!("at most six arguments in a register call");
        }
        let mut regs = self.saved;
        let slots = [
            &mut regs.rdi,
            &mut regs.rsi,
            &mut regs.rdx,
            &mut regs.rcx,
            &mut regs.r8,
            &mut regs.r9,
        ];
        for (slot, v) in slots.into_iter().zip(args) {
            *slot = *v;
        }
        let sp = (self.saved.rsp - STACK_SKIP - 1024) & !0xf;
        let sp = sp - 8;
        mem.write(sp, &0u64.to_le_bytes())?;
        regs.rsp = sp;
        regs.rip = func;
        regs.rax = 0;
        regs.orig_rax = u64::MAX;
        let pid = Pid::from_raw(self.tid);
        ptrace::setregs(pid, regs).map_err(|_| gone(self.pid))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut deliver = None;
        loop {
            ptrace::cont(pid, deliver.take()).map_err(|_| gone(self.pid))?;
            match self.wait(session, deadline)? {
                Signal::SIGSEGV => break,
                Signal::SIGTRAP => {}
                other => session.defer_signal(self.tid, other),
            }
        }
        let out = ptrace::getregs(pid).map_err(|_| gone(self.pid))?;
        self.restore()?;
        if out.rip != 0 {
            bail!(
                "process {}: call of {func:#x} faulted at {:#x}",
                self.pid,
                out.rip
            );
        }
        Ok(out.rax)
    }

    fn wait(&self, session: &mut Session, deadline: Instant) -> Result<Signal> {
        let pid = Pid::from_raw(self.tid);
        let mut spins = 0u32;
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Stopped(_, sig)) => return Ok(sig),
                Ok(WaitStatus::PtraceEvent(_, sig, _)) => return Ok(sig),
                Ok(WaitStatus::StillAlive) => {
                    if Instant::now() > deadline {
                        // Bring it back to a stop so the session can restore and detach it.
                        let _ = ptrace::interrupt(pid);
                        let _ = waitpid(pid, Some(WaitPidFlag::__WALL));
                        let _ = self.restore();
                        bail!(
                            "process {}: injected operation did not finish in time",
                            self.pid
                        );
                    }
                    pause(&mut spins);
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                    session.forget(self.tid);
                    bail!(gone(self.pid));
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => bail!("process {}: waiting for thread {}: {e}", self.pid, self.tid),
            }
        }
    }

    /// Puts the dead stack and the registers back exactly as they were. Must be called while
    /// the thread is still stopped.
    pub fn finish(self, mem: &Memory) -> Result<()> {
        mem.write(self.stack.0, &self.stack.1)?;
        self.restore()
    }

    /// Puts the thread's registers back exactly as they were.
    pub fn restore(&self) -> Result<()> {
        ptrace::setregs(Pid::from_raw(self.tid), self.saved).map_err(|_| gone(self.pid))
    }

    pub fn check(&self, what: &str, ret: i64) -> Result<u64> {
        if ret < 0 && ret > -4096 {
            let err = Errno::from_raw((-ret) as i32);
            bail!("process {}: {what} failed in the target: {err}", self.pid);
        }
        Ok(ret as u64)
    }
}

/// Finds a `syscall` instruction (`0f 05`) in the target's executable memory, the vDSO first.
fn find_syscall_insn(mem: &Memory, maps: &[Mapping]) -> Result<u64> {
    let mut candidates: Vec<&Mapping> = maps.iter().filter(|m| m.executable).collect();
    candidates.sort_by_key(|m| if m.path == "[vdso]" { 0 } else { 1 });
    for m in candidates {
        if m.path == "[vsyscall]" {
            continue;
        }
        let len = (m.end - m.start).min(1 << 20) as usize;
        let Ok(bytes) = mem.read(m.start, len) else {
            continue;
        };
        if let Some(i) = bytes.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(m.start + i as u64);
        }
    }
    None.context("no syscall instruction found in the target's executable memory")
}
