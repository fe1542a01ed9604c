//! Holding a process at the door: a process that starts a patched executable, or loads a
//! patched library, runs none of the module's code before the patch is live in it.
//!
//! The caller (the host agent) learns of the opening from a fanotify permission event: the
//! `open` waits for its answer. Before answering it seizes the opener ([`Hold::seize`]); from
//! then on the process runs traced, and [`Hold::run_to_loaded`] stops it at the one moment
//! that suits a patch: the dynamic loader has mapped and relocated every object of this load,
//! and no constructor and no caller of the module has run yet. glibc's loader marks exactly
//! that moment by calling its debugger hook `_dl_debug_state` with `_r_debug.r_state ==
//! RT_CONSISTENT` (at start-up, before `_dl_init`; in `dlopen`, before the constructors).
//!
//! How we see the call without a breakpoint: the hook is a bare `ret` followed by alignment
//! padding; we write `mov $SYS_getpid, %eax; syscall; ret` there (rax, rcx and r11 are
//! call-clobbered, `getpid` changes nothing) and trace system calls. A breakpoint or a trap
//! flag would outlive a dead tracer and kill the process with `SIGTRAP`; this hook outlives
//! us harmlessly. So if we die at any instant the kernel detaches the process and it starts
//! unpatched (fail open), as it would have without us.
//!
//! Then the engine applies with the held session ([`Hold::apply`], the held thread stays
//! stopped throughout), and [`Hold::release`] puts the loader's bytes back and lets go.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use nix::sys::ptrace;
use nix::unistd::Pid;
use suture_bundle::Bundle;
use tracing::debug;

use crate::apply::{apply_held, ApplyOptions, ApplyReport};
use crate::procfs::{self, Mapping, Memory};
use crate::seccomp::{self, SeccompData, AUDIT_ARCH_X86_64};
use crate::stop::{gone, pause, poll, ptrace_req, Session, Stop};
use crate::{fault, lock, modules, EngineError};

/// How the held process came to open the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// `execve` of the module (fanotify `FAN_OPEN_EXEC_PERM`): the opener is still the old
    /// program.
    Exec,
    /// The dynamic loader opens the module, at start-up or in `dlopen` (`FAN_OPEN_PERM`).
    Load,
}

/// `AT_BASE` of the auxiliary vector: where the kernel put the program interpreter.
const AT_BASE: u64 = 7;
/// `struct r_debug` of glibc's `<link.h>`: offset of `r_state`, and its value once a change
/// of the link map is complete.
const R_STATE_OFFSET: u64 = 24;
const RT_CONSISTENT: u32 = 0;
/// `mov $SYS_getpid, %eax; syscall; ret`
const HOOK: [u8; 8] = [0xb8, libc::SYS_getpid as u8, 0, 0, 0, 0x0f, 0x05, 0xc3];
/// Where the thread sits after the hook's `syscall`.
const AFTER_SYSCALL: u64 = 7;
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// The loader's debugger hook, turned into a system call.
struct Hook {
    /// The `ret` of `_dl_debug_state` (after its `endbr64`, if any).
    at: u64,
    /// The bytes there in the loader's file.
    original: [u8; HOOK.len()],
    /// `&_r_debug.r_state`.
    r_state: u64,
}

impl Hook {
    /// Finds the hook in the loader of `pid`, checks that it is what glibc makes (a bare
    /// `ret` and padding, or already our hook), and writes our code there.
    fn install(pid: i32, mem: &Memory) -> Result<Hook> {
        let base = at_base(pid)?;
        if base == 0 {
            bail!("process {pid} has no dynamic loader (statically linked)");
        }
        let maps = procfs::read_maps(pid)?;
        let ld = modules::module_at(pid, &maps, base).context("the dynamic loader")?;
        let hook = ld
            .facts
            .export("_dl_debug_state")
            .ok_or_else(|| anyhow!("{}: no _dl_debug_state (not glibc's loader?)", ld.path))?;
        let r_debug = ld
            .facts
            .export("_r_debug")
            .ok_or_else(|| anyhow!("{}: no _r_debug", ld.path))?;
        // The bytes as the file has them: what we compare with and put back.
        let file = file_bytes(
            pid,
            &maps,
            ld.bias + hook.address,
            ENDBR64.len() + HOOK.len() + 16,
        )
        .with_context(|| format!("{}: _dl_debug_state", ld.path))?;
        let skip = if file.starts_with(&ENDBR64) {
            ENDBR64.len()
        } else {
            0
        };
        let original: [u8; HOOK.len()] = file[skip..skip + HOOK.len()]
            .try_into()
            .map_err(|_| anyhow!("short read"))?;
        let at = ld.bias + hook.address + skip as u64;
        if original[0] != 0xc3 || !padding(&file[skip + 1..], at + 1, HOOK.len() - 1) {
            bail!(
                "{}: _dl_debug_state is not a bare `ret` followed by padding; not touching it",
                ld.path
            );
        }
        let running = mem.read(at, HOOK.len())?;
        if running == HOOK {
            debug!(
                pid,
                "loader hook already in place (left by an agent that died)"
            );
        } else if running != original {
            bail!(
                "{}: _dl_debug_state in process {pid} differs from the file; not touching it",
                ld.path
            );
        } else {
            mem.write(at, &HOOK)?;
        }
        Ok(Hook {
            at,
            original,
            r_state: ld.bias + r_debug.address + R_STATE_OFFSET,
        })
    }

    /// Puts the loader's bytes back (if they are still ours).
    fn remove(&self, mem: &Memory) -> Result<()> {
        let running = mem.read(self.at, HOOK.len())?;
        if running == HOOK {
            mem.write(self.at, &self.original)?;
        } else if running != self.original {
            bail!(
                "the loader hook at {:#x} was changed by someone else",
                self.at
            );
        }
        Ok(())
    }
}

/// Bytes `addr..addr+len` of the process as the file mapped there holds them.
fn file_bytes(pid: i32, maps: &[Mapping], addr: u64, len: usize) -> Result<Vec<u8>> {
    let m = maps
        .iter()
        .find(|m| m.is_file() && m.contains(addr) && addr + len as u64 <= m.end)
        .ok_or_else(|| anyhow!("{addr:#x} lies outside the mapped file"))?;
    let bytes = modules::file_range(pid, m, m.offset + (addr - m.start), len)?;
    if bytes.len() < len {
        bail!("{addr:#x} lies past the end of {}", m.path);
    }
    Ok(bytes)
}

/// Are the instructions that start in the first `window` bytes of `code` (at `ip`) all
/// no-ops or `int3`s (alignment padding)? `code` reaches past the window so that nothing there
/// is cut short.
fn padding(code: &[u8], ip: u64, window: usize) -> bool {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    while decoder.position() < window {
        let ins = decoder.decode();
        if ins.is_invalid() || !matches!(ins.mnemonic(), Mnemonic::Nop | Mnemonic::Int3) {
            return false;
        }
    }
    true
}

fn at_base(pid: i32) -> Result<u64> {
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).map_err(|_| gone(pid))?;
    for pair in auxv.chunks_exact(16) {
        let key = u64::from_ne_bytes(pair[..8].try_into().unwrap_or_default());
        if key == AT_BASE {
            return Ok(u64::from_ne_bytes(pair[8..].try_into().unwrap_or_default()));
        }
    }
    Ok(0)
}

/// Is thread `tid` blocked in a system call made from the dynamic loader's code?
fn in_loader(pid: i32, tid: i32) -> Result<bool> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))
        .map_err(|_| gone(pid))?;
    // "nr arg1 .. arg6 sp pc", or "running" / "-1 sp pc".
    let Some(pc) = text
        .split_whitespace()
        .last()
        .and_then(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
    else {
        return Ok(false);
    };
    let base = at_base(pid)?;
    if base == 0 {
        return Ok(false);
    }
    let maps = procfs::read_maps(pid)?;
    let Some(ld) = maps.iter().find(|m| m.contains(base)) else {
        return Ok(false);
    };
    Ok(maps
        .iter()
        .any(|m| m.dev == ld.dev && m.inode == ld.inode && m.contains(pc)))
}

/// The opening is no start: a process reads the file, its loader does not load it (or an
/// `exec` opens it a second time, without the exec flag).
#[derive(Debug, thiserror::Error)]
#[error("process {pid} opens the module, but not through the dynamic loader")]
pub struct NotLoading {
    pub pid: i32,
}

/// A process held at the door. Dropping it releases the process.
pub struct Hold {
    session: Session,
    /// No other suture operation touches the process while we hold it.
    _lock: lock::ProcessLock,
    pid: i32,
    tid: i32,
    opening: Opening,
    mem: Option<Memory>,
    hook: Option<Hook>,
    /// The thread sits in a ptrace stop the session does not know of.
    in_stop: bool,
    /// Where the loop stands, for the log.
    syscalls: u32,
}

impl Hold {
    /// Seizes thread `tid` of `pid`, which is blocked in a permission-checked open of the
    /// module (the caller answers the open afterwards). Refuses a `Load` opening not made by
    /// the loader.
    pub fn seize(pid: i32, tid: i32, opening: Opening) -> Result<Hold> {
        if opening == Opening::Load && !in_loader(pid, tid)? {
            return Err(anyhow::Error::new(NotLoading { pid }));
        }
        let lock = lock::lock_process(pid, Duration::from_millis(100))?
            .map_err(|busy| anyhow!("{busy}"))?;
        let session = Session::seize_thread(pid, tid)?;
        let hold = Hold {
            session,
            _lock: lock,
            pid,
            tid,
            opening,
            mem: None,
            hook: None,
            in_stop: false,
            syscalls: 0,
        };
        // Stops the thread as soon as its open (or exec) returns to user space; the hook goes
        // in there (`arm`), before the loader can get to it.
        let _ = ptrace_req(libc::PTRACE_INTERRUPT, tid, 0);
        fault::point("hold:seized");
        Ok(hold)
    }

    /// Runs the process (after the caller allowed the open) until its loader has finished
    /// this load: on return the held thread is stopped in the hook, before any code of what
    /// was loaded has run. Errors if that does not happen by `deadline`.
    pub fn run_to_loaded(&mut self, deadline: Instant) -> Result<()> {
        let r = self.run_loop(deadline);
        if r.is_err() && self.in_stop {
            self.session.pin(self.tid);
        }
        r
    }

    fn run_loop(&mut self, deadline: Instant) -> Result<()> {
        let mut spins = 0u32;
        loop {
            let stop = match poll(self.tid)? {
                Some(s) => {
                    spins = 0; // the next stop usually comes within microseconds again
                    s
                }
                None => {
                    if Instant::now() > deadline {
                        bail!(
                            "process {}: its loader did not finish within the deadline ({} system calls seen)",
                            self.pid,
                            self.syscalls
                        );
                    }
                    pause(&mut spins);
                    continue;
                }
            };
            self.in_stop = true;
            match stop {
                Stop::Exec => {
                    // A thread other than the leader that exec's takes the process id.
                    self.session.renamed(self.tid, self.pid);
                    self.tid = self.pid;
                    self.arm()?;
                }
                Stop::Gone if self.opening == Opening::Exec && self.tid != self.pid => {
                    self.session.renamed(self.tid, self.pid);
                    self.tid = self.pid;
                    self.in_stop = false;
                    continue;
                }
                Stop::Gone => bail!(gone(self.pid)),
                Stop::Syscall => {
                    self.syscalls += 1;
                    if self.at_consistent_hook()? {
                        self.in_stop = false;
                        // Out of the system-call stop into an interrupt stop, where the engine
                        // acts from (`getpid` completes; nothing else runs).
                        self.session.leave_syscall_stop(self.tid)?;
                        self.session.pin(self.tid);
                        fault::point("hold:loaded");
                        return Ok(());
                    }
                }
                Stop::Signal(sig) => {
                    self.in_stop = false;
                    ptrace_req(libc::PTRACE_SYSCALL, self.tid, sig as usize)
                        .map_err(|_| gone(self.pid))?;
                    continue;
                }
                Stop::Interrupt { group: true } => {
                    bail!("process {}: stopped by job control while loading", self.pid)
                }
                Stop::Interrupt { group: false } => {
                    if self.hook.is_none() {
                        match self.opening {
                            // Our interrupt came before any exec: the exec failed.
                            Opening::Exec => {
                                bail!("process {}: its exec did not happen", self.pid)
                            }
                            // The loader's open returned: the hook goes in now.
                            Opening::Load => self.arm()?,
                        }
                    }
                }
                Stop::Clone(_) => {
                    bail!(
                        "process {}: created a thread before its loader finished",
                        self.pid
                    )
                }
            }
            self.in_stop = false;
            ptrace_req(libc::PTRACE_SYSCALL, self.tid, 0).map_err(|_| gone(self.pid))?;
        }
    }

    /// With the thread in a ptrace stop: checks that its seccomp filters let the hook's
    /// `getpid` through (strict mode or an unreadable filter refuses), then puts the hook in.
    fn arm(&mut self) -> Result<()> {
        let filters = seccomp::filters(self.pid, self.tid)?;
        let getpid = SeccompData {
            nr: libc::SYS_getpid as i32,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: 0,
            args: [0; 6],
        };
        if !seccomp::allows(&filters, &getpid)? {
            bail!(
                "process {}: its seccomp filters do not allow getpid",
                self.pid
            );
        }
        // (After an exec the old memory handle would show the old program.)
        let mem = Memory::open(self.pid)?;
        self.hook = Some(Hook::install(self.pid, &mem)?);
        self.mem = Some(mem);
        Ok(())
    }

    /// Is the thread at the entry of the hook's `getpid`, with the link map consistent?
    fn at_consistent_hook(&self) -> Result<bool> {
        let (Some(hook), Some(mem)) = (&self.hook, &self.mem) else {
            return Ok(false);
        };
        let regs = ptrace::getregs(Pid::from_raw(self.tid)).map_err(|_| gone(self.pid))?;
        let entry = regs.rax as i64 == -(libc::ENOSYS as i64);
        if !entry || regs.orig_rax != libc::SYS_getpid as u64 || regs.rip != hook.at + AFTER_SYSCALL
        {
            return Ok(false);
        }
        let state = u32::from_ne_bytes(
            mem.read(hook.r_state, 4)?
                .try_into()
                .map_err(|_| anyhow!("short read"))?,
        );
        Ok(state == RT_CONSISTENT)
    }

    /// Does the held process map a module with this build-id (now that its loader is done)?
    pub fn maps_build_id(&self, build_id: &[u8]) -> bool {
        procfs::read_maps(self.pid)
            .map(|maps| modules::maps_build_id(self.pid, &maps, build_id))
            .unwrap_or(false)
    }

    /// Applies a verified bundle to the held process; the process stays held.
    pub fn apply(
        &mut self,
        bundle: &Bundle,
        opts: &ApplyOptions,
    ) -> std::result::Result<ApplyReport, EngineError> {
        apply_held(&mut self.session, bundle, opts)
    }

    /// Puts the loader back as it was and lets the process go.
    pub fn release(mut self) -> Result<()> {
        fault::point("hold:applied");
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(hook) = self.hook.take() {
            // Held in the hook, our thread holds the loader's lock: no other thread can be in
            // the hook. Otherwise (an error on the way) every thread stops while it goes.
            let held = self.session.threads().any(|t| t == self.tid) && self.in_hook(&hook);
            if !held {
                let _ = self.session.seize_rest();
                let _ = self.session.stop_all();
            }
            if let Some(mem) = &self.mem {
                result = hook.remove(mem);
            }
            // A thread stopped inside our code goes on at the original `ret`.
            if result.is_ok() {
                let tids: Vec<i32> = self.session.threads().collect();
                for tid in tids {
                    if let Ok(mut regs) = ptrace::getregs(Pid::from_raw(tid)) {
                        if regs.rip > hook.at && regs.rip <= hook.at + HOOK.len() as u64 {
                            regs.rip = hook.at;
                            let _ = ptrace::setregs(Pid::from_raw(tid), regs);
                        }
                    }
                }
            }
        }
        self.session.unpin(self.tid);
        self.session.detach_inner();
        result
    }

    /// Is the held thread stopped in the hook?
    fn in_hook(&self, hook: &Hook) -> bool {
        ptrace::getregs(Pid::from_raw(self.tid))
            .is_ok_and(|r| r.rip > hook.at && r.rip <= hook.at + HOOK.len() as u64)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::warn!(pid = self.pid, "releasing a held process: {e:#}");
        }
    }
}
