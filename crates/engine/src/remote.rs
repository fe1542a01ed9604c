//! Making a stopped thread of the target run a system call or a function for us, in a way that
//! survives our own death at any instant.
//!
//! A tracer can be killed (`kill -9`, the OOM killer) between any two of its steps, and the
//! kernel then simply lets the target's threads run on from whatever registers they hold. So
//! the registers we give a thread are never a state it could not run on by itself:
//!
//! - Below the thread's stack (past the red zone, memory the ABI gives to whoever comes next)
//!   we write a signal frame (`ucontext`) holding the thread's own state, as the kernel would
//!   to deliver a signal, with the frame's return slot pointing at an `rt_sigreturn` that
//!   already exists in the target (libc's signal restorer).
//! - A system call runs at an existing `syscall; ret` in the target, with the stack pointer at
//!   that return slot. We stop the thread at the call's entry and exit (`PTRACE_SYSCALL`).
//!   Left alone at any point, the thread finishes the call, returns into `rt_sigreturn`, and
//!   the kernel restores its exact state (general, floating-point and vector registers, signal
//!   mask; an interrupted system call restarts).
//! - A function call returns into a landing stub in the patch's own code page that keeps the
//!   result and does the same `rt_sigreturn`.
//! - While we live, we never let the thread reach that `rt_sigreturn`: we put the saved
//!   registers back from an interrupt stop, where the kernel restarts an interrupted system call
//!   exactly as it would have without us.
//!
//! Nothing is single-stepped (a trap flag outlives a dead tracer) and no signal is held: one
//! that arrives is delivered at once in the thread's own state (see [`crate::stop`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libc::user_regs_struct;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

use crate::procfs::{Mapping, Memory};
use crate::seccomp::{self, SeccompData, SockFilter};
use crate::stop::{gone, ptrace_req, Injected, Session};

/// The x86-64 red zone: the thread may hold data there.
const RED_ZONE: u64 = 128;
/// Room for data the caller puts in the target (e.g. a memfd name), above the frame.
const SCRATCH: u64 = 512;
/// Room below the frame for the stack of a function we call.
const CALL_STACK: u64 = 12 << 10;
/// `struct ucontext` as the x86-64 kernel reads it in `rt_sigreturn`, and the `siginfo` after
/// it that the kernel checks is addressable.
const UCONTEXT: u64 = 304;
const SIGINFO: u64 = 128;
/// Where the 64-byte aligned fpstate sits in the frame (after the return slot, the ucontext
/// and the siginfo).
const FPSTATE_AT: u64 = 448;

const NT_PRFPREG: libc::c_int = 2;
const NT_X86_XSTATE: libc::c_int = 0x202;
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
const UC_FP_XSTATE: u64 = 0x1;
const UC_SIGCONTEXT_SS: u64 = 0x2;
const UC_STRICT_RESTORE_SS: u64 = 0x4;

/// `mov [rsp-0x10], rax; again: mov eax, 15; syscall; jmp again`: keeps a called function's
/// result below the frame, then restores the thread's state (`rt_sigreturn`). Placed by the
/// engine in the patch's code page.
pub const LANDING: [u8; 14] = [
    0x48, 0x89, 0x44, 0x24, 0xf0, 0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7,
];
/// Offset of the end of the landing stub's `syscall`.
const LANDING_SYSCALL_END: u64 = 12;

const SYSCALL_RET: &[u8] = &[0x0f, 0x05, 0xc3];
/// glibc's and musl's signal restorer: `mov $15, %rax; syscall` (or `mov $15, %eax`).
const SIGRETURN: [&[u8]; 2] = [
    &[0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
    &[0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
];

/// The target's seccomp filter would stop a system call the engine needs.
#[derive(Debug, thiserror::Error)]
#[error("process {pid} runs under a seccomp filter that blocks `{syscall}`, which patching needs; it was not touched")]
pub struct SeccompBlocks {
    pub pid: i32,
    pub syscall: &'static str,
}

/// An injected system call did not run before the deadline (the thread got no CPU: a frozen
/// or throttled process). It was taken back before the call began, or the call finished.
#[derive(Debug, thiserror::Error)]
#[error("process {pid}: injected system call {nr} did not run in time")]
pub struct SyscallTimedOut {
    pub pid: i32,
    pub nr: i64,
}

/// The thread's stack has too little room below its stack pointer for our frame.
#[derive(Debug, thiserror::Error)]
#[error("thread {tid}: too little stack left below its stack pointer to work with")]
pub struct NoRoom {
    pub tid: i32,
}

/// The thread runs under a hardware control-flow guard injection cannot honour.
#[derive(Debug, thiserror::Error)]
#[error("process {pid}: thread {tid} runs with a {feature}, which suture cannot inject into yet; it was not touched")]
pub struct ShadowStack {
    pub pid: i32,
    pub tid: i32,
    pub feature: &'static str,
}

/// Code that already exists in the target and that injection runs through.
#[derive(Debug, Clone, Copy)]
pub struct Gadgets {
    /// `syscall; ret`
    pub syscall_ret: u64,
    /// `mov $15, %rax; syscall` (`rt_sigreturn`), the way back to the thread's own state.
    pub sigreturn: Option<u64>,
}

/// A mapped file's code: (device, inode, offset, length).
type GadgetKey = (String, u64, u64, u64);
/// Offsets of `syscall; ret` and of the signal restorer in it.
type GadgetOffsets = (Option<u64>, Option<u64>);
type GadgetCache = Mutex<HashMap<GadgetKey, GadgetOffsets>>;

/// Gadget offsets found by earlier `suture` processes on this host (root only; `/run` is
/// emptied at boot). A one-shot command would otherwise read the loader's code (≈ 150 KB) to
/// find what the last one found. Nothing here is trusted: every hit is checked against the
/// target's own bytes before use, so a stale or forged line can only cost a search.
fn hints_path() -> Option<std::path::PathBuf> {
    nix::unistd::geteuid()
        .is_root()
        .then(|| crate::lock::lock_dir().with_file_name("gadgets"))
}

/// At most this many bytes of hints are read (a few lines per distinct loader and libc).
const MAX_HINTS_BYTES: u64 = 64 << 10;

fn gadget_cache() -> &'static GadgetCache {
    static CACHE: OnceLock<GadgetCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(hints_path().map(|p| read_hints(&p)).unwrap_or_default()))
}

fn read_hints(path: &std::path::Path) -> HashMap<GadgetKey, GadgetOffsets> {
    use std::io::Read;
    // Room for a host's worth of lines up front: an empty string is filled by probing reads
    // that double from 32 bytes (seven reads for a kilobyte).
    let mut text = String::with_capacity(16 << 10);
    let read =
        std::fs::File::open(path).and_then(|f| f.take(MAX_HINTS_BYTES).read_to_string(&mut text));
    if read.is_err() {
        return HashMap::new();
    }
    parse_hints(&text)
}

/// `dev inode offset length syscall_ret sigreturn` per line, offsets in hexadecimal, `-` for
/// none; lines that do not parse are skipped.
fn parse_hints(text: &str) -> HashMap<GadgetKey, GadgetOffsets> {
    let hex = |w: &str| u64::from_str_radix(w, 16).ok();
    let found = |w: &str| {
        if w == "-" {
            Some(None)
        } else {
            hex(w).map(Some)
        }
    };
    text.lines()
        .filter_map(|line| {
            let w: Vec<&str> = line.split_ascii_whitespace().collect();
            let [dev, inode, offset, len, sr, sg] = w[..] else {
                return None;
            };
            let key = (dev.to_string(), hex(inode)?, hex(offset)?, hex(len)?);
            Some((key, (found(sr)?, found(sg)?)))
        })
        .collect()
}

fn format_hints(cache: &HashMap<GadgetKey, GadgetOffsets>) -> String {
    let found = |o: Option<u64>| o.map_or("-".to_string(), |o| format!("{o:x}"));
    let mut lines: Vec<String> = cache
        .iter()
        .map(|((dev, inode, offset, len), (sr, sg))| {
            format!(
                "{dev} {inode:x} {offset:x} {len:x} {} {}",
                found(*sr),
                found(*sg)
            )
        })
        .collect();
    lines.sort();
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// Best effort: a hint that is not saved costs the next command a search, nothing more.
fn save_hints(cache: &HashMap<GadgetKey, GadgetOffsets>) {
    let Some(path) = hints_path() else {
        return;
    };
    // Written aside and renamed over: a reader sees the old file or the new one, whole.
    let aside = path.with_extension(format!("{}", std::process::id()));
    let written =
        std::fs::write(&aside, format_hints(cache)).and_then(|()| std::fs::rename(&aside, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&aside);
        tracing::debug!(error = %e, "gadget hints not saved");
    }
}

fn find_in(bytes: &[u8], pattern: &[u8]) -> Option<u64> {
    memchr::memmem::find(bytes, pattern).map(|i| i as u64)
}

/// The addresses in mapping `m` (of which `len` bytes were searched) at which the process
/// holds the gadgets found at these offsets: the file's bytes are what was searched, and what
/// runs is the process's own copy.
fn confirm(
    mem: &Memory,
    m: &Mapping,
    len: u64,
    (sr, sg): GadgetOffsets,
) -> (Option<u64>, Option<u64>) {
    let holds = |o: u64, pattern: &[u8]| {
        o.checked_add(pattern.len() as u64)
            .is_some_and(|end| end <= len)
            && mem
                .read(m.start + o, pattern.len())
                .is_ok_and(|b| b == pattern)
    };
    (
        sr.filter(|&o| holds(o, SYSCALL_RET)).map(|o| m.start + o),
        sg.filter(|&o| SIGRETURN.iter().any(|p| holds(o, p)))
            .map(|o| m.start + o),
    )
}

/// Finds the gadgets in the target's executable memory: the vDSO first (small, always there),
/// then the files it maps (offsets cached per file, and checked in this process before use).
pub fn find_gadgets(mem: &Memory, maps: &[Mapping]) -> Result<Gadgets> {
    let mut syscall_ret = None;
    let mut sigreturn = None;
    // Only code that stays: the vDSO and mapped files, never memory of ours (a patch's own
    // landing stub holds the same bytes as a signal restorer, and goes away on revert).
    let mut candidates: Vec<&Mapping> = maps
        .iter()
        .filter(|m| m.executable)
        .filter(|m| m.path == "[vdso]" || (m.is_file() && !m.path.starts_with("/memfd:")))
        .collect();
    // Smallest first: the loader's code has both, and is an eighth of libc's.
    candidates.sort_by_key(|m| (m.path != "[vdso]", m.end - m.start));
    for m in candidates {
        if syscall_ret.is_some() && sigreturn.is_some() {
            break;
        }
        let len = (m.end - m.start).min(8 << 20);
        let key = m.is_file().then(|| (m.dev.clone(), m.inode, m.offset, len));
        let cached = key
            .as_ref()
            .and_then(|k| gadget_cache().lock().ok()?.get(k).copied());
        // A remembered hit that the process's bytes do not confirm (the file changed under
        // the same inode, a forged hint) is forgotten and the code searched again.
        let confirmed = cached
            .map(|found| (found, confirm(mem, m, len, found)))
            .filter(|((sr, sg), (a, b))| {
                sr.is_some() == a.is_some() && sg.is_some() == b.is_some()
            });
        let (sr, sg) = match confirmed {
            Some((_, hits)) => hits,
            None => {
                // The file's bytes rather than the process's (a read of the page cache, not
                // of another address space); hits are checked in the process below.
                let from_file = m
                    .is_file()
                    .then(|| crate::modules::file_range(mem.pid(), m, m.offset, len as usize).ok())
                    .flatten();
                let bytes = match from_file {
                    Some(b) => b,
                    None => match mem.read(m.start, len as usize) {
                        Ok(b) => b,
                        Err(_) => continue,
                    },
                };
                let bytes = &bytes[..];
                let found = (
                    find_in(bytes, SYSCALL_RET),
                    SIGRETURN.iter().find_map(|p| find_in(bytes, p)),
                );
                if let (Some(k), Ok(mut c)) = (key, gadget_cache().lock()) {
                    c.insert(k, found);
                    save_hints(&c);
                }
                confirm(mem, m, len, found)
            }
        };
        syscall_ret = syscall_ret.or(sr);
        sigreturn = sigreturn.or(sg);
    }
    Ok(Gadgets {
        syscall_ret: syscall_ret
            .context("no `syscall; ret` instruction found in the target's executable memory")?,
        sigreturn,
    })
}

/// A stopped thread we use to act inside the target.
pub struct Remote {
    pid: i32,
    tid: i32,
    /// The thread's own registers, as the interrupt stop found them.
    saved: user_regs_struct,
    gadgets: Gadgets,
    /// Our return slot; the signal frame follows it.
    frame: u64,
    scratch: u64,
    /// (address, bytes) of the dead stack we use, put back by [`Remote::finish`]: from the
    /// frame up, and from [`CALL_STACK`] below it once a function is called.
    stack: (u64, Vec<u8>),
    /// Signals delivered by the session when the dead stack was saved: if more were delivered
    /// since, a live signal frame may lie there and the old bytes must not come back.
    delivered: u64,
    /// What the return slot holds now.
    slot: u64,
    /// The landing stub for function calls, once the patch's code page exists.
    landing: Option<u64>,
    /// The thread sits in a system-call stop of ours (not an interrupt stop).
    in_syscall: bool,
    /// The thread's seccomp filters: every injected call is checked against them first.
    filters: Vec<Vec<SockFilter>>,
}

fn getregs(pid: i32, tid: i32) -> Result<user_regs_struct> {
    ptrace::getregs(Pid::from_raw(tid)).map_err(|_| gone(pid))
}

fn setregs(pid: i32, tid: i32, regs: user_regs_struct) -> Result<()> {
    ptrace::setregs(Pid::from_raw(tid), regs).map_err(|_| gone(pid))
}

/// The thread's floating-point and vector state in the layout of a signal frame's fpstate
/// (XSAVE with its software-reserved bytes filled in, plus the trailing magic).
fn fpstate(tid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 16 << 10];
    let read = |note: libc::c_int, buf: &mut Vec<u8>| -> Result<usize, Errno> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: PTRACE_GETREGSET writes at most iov_len bytes into the buffer the iovec
        // describes, which lives for the call, and updates iov_len.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGSET,
                tid,
                note as usize as *mut libc::c_void,
                &mut iov as *mut libc::iovec as *mut libc::c_void,
            )
        };
        if r < 0 {
            Err(Errno::last())
        } else {
            Ok(iov.iov_len)
        }
    };
    match read(NT_X86_XSTATE, &mut buf) {
        Ok(len) if len >= 576 => {
            buf.truncate(len);
            // The XSAVE header's XSTATE_BV says which components hold state; restoring those
            // (plus x87/SSE) and leaving the rest in their initial state is exact.
            let bv = u64::from_le_bytes(buf[512..520].try_into().unwrap_or_default()) | 0x3;
            buf[464..468].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
            buf[468..472].copy_from_slice(&((len + 4) as u32).to_le_bytes());
            buf[472..480].copy_from_slice(&bv.to_le_bytes());
            buf[480..484].copy_from_slice(&(len as u32).to_le_bytes());
            buf[484..512].fill(0);
            buf.extend_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
            Ok(buf)
        }
        _ => {
            // No XSAVE: the legacy 512-byte FXSAVE area, which the kernel restores as such.
            let len = read(NT_PRFPREG, &mut buf)
                .map_err(|e| anyhow::anyhow!("thread {tid}: cannot read its FPU state: {e}"))?;
            buf.truncate(len.min(512));
            buf[464..512].fill(0);
            Ok(buf)
        }
    }
}

/// The thread's blocked-signal mask.
fn blocked_mask(pid: i32, tid: i32) -> Result<u64> {
    const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
    let mut mask: u64 = 0;
    // SAFETY: PTRACE_GETSIGMASK writes `addr` (8) bytes of signal mask to the pointer we pass.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GETSIGMASK,
            tid,
            8usize as *mut libc::c_void,
            &mut mask as *mut u64 as *mut libc::c_void,
        )
    };
    if r < 0 {
        return Err(gone(pid));
    }
    Ok(mask)
}

/// The registers the thread resumes with if the kernel restarts the system call it was
/// interrupted in (what happens on return from an interrupt stop when no handler runs).
pub fn restarted(regs: &user_regs_struct) -> user_regs_struct {
    let mut r = *regs;
    if (regs.orig_rax as i64) >= 0 {
        match regs.rax as i64 {
            // ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND; ERESTART_RESTARTBLOCK is re-issued
            // as the original call (rt_sigreturn resets the restart block).
            -512 | -513 | -514 | -516 => {
                r.rax = regs.orig_rax;
                r.rip = regs.rip.wrapping_sub(2);
            }
            _ => {}
        }
    }
    r.orig_rax = u64::MAX;
    r
}

/// A signal frame (`struct ucontext` after an 8-byte return slot) that restores `regs`.
fn signal_frame(regs: &user_regs_struct, mask: u64, fp: &[u8], frame: u64, ret: u64) -> Vec<u8> {
    let r = restarted(regs);
    let mut out = Vec::with_capacity((FPSTATE_AT as usize) + fp.len());
    let mut put = |v: u64| out.extend_from_slice(&v.to_le_bytes());
    put(ret); // return slot
    put(UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS); // uc_flags
    put(0); // uc_link
    put(0); // uc_stack.ss_sp
            // An invalid ss_flags makes the kernel leave the thread's alternate stack as it is
            // (sigaltstack's error is ignored by rt_sigreturn).
    put(0xffff_ffff); // uc_stack.ss_flags
    put(0); // uc_stack.ss_size
    for v in [
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx, r.rdx,
        r.rax, r.rcx, r.rsp, r.rip, r.eflags,
    ] {
        put(v);
    }
    // cs, gs, fs, ss (16 bits each)
    put((r.cs & 0xffff) | (r.gs & 0xffff) << 16 | (r.fs & 0xffff) << 32 | (r.ss & 0xffff) << 48);
    put(0); // err
    put(0); // trapno
    put(mask); // oldmask
    put(0); // cr2
    put(frame + FPSTATE_AT); // fpstate
    for _ in 0..8 {
        put(0); // reserved1
    }
    put(mask); // uc_sigmask
    out.resize(FPSTATE_AT as usize, 0); // siginfo and alignment
    out.extend_from_slice(fp);
    out
}

impl Remote {
    /// Takes over `tid`, which must be in an interrupt stop of `session`.
    pub fn new(
        session: &Session,
        tid: i32,
        mem: &Memory,
        maps: &[Mapping],
        gadgets: Gadgets,
    ) -> Result<Remote> {
        let pid = session.pid();
        let t = std::time::Instant::now();
        let filters = seccomp::filters(pid, tid)?;
        if let Err(name) = seccomp::check_injected(&filters, gadgets.syscall_ret)? {
            return Err(anyhow::Error::new(SeccompBlocks { pid, syscall: name }));
        }
        if gadgets.sigreturn.is_none() {
            tracing::warn!(
                pid,
                "no rt_sigreturn in the process: if suture is killed mid-operation the thread cannot recover"
            );
        }
        let saved = getregs(pid, tid)?;
        let mut r = Remote {
            pid,
            tid,
            saved,
            gadgets,
            frame: 0,
            scratch: 0,
            stack: (0, Vec::new()),
            delivered: session.delivered,
            slot: 0,
            landing: None,
            in_syscall: false,
            filters,
        };
        r.lay_frame(session, mem, maps)?;
        tracing::debug!(
            pid,
            tid,
            us = t.elapsed().as_micros() as u64,
            "injection frame laid"
        );
        Ok(r)
    }

    /// Saves the dead stack below the thread's stack pointer and writes the signal frame there.
    fn lay_frame(&mut self, session: &Session, mem: &Memory, maps: &[Mapping]) -> Result<()> {
        let fp = fpstate(self.tid).map_err(|e| {
            if crate::procfs::exists(self.pid) {
                e
            } else {
                gone(self.pid)
            }
        })?;
        let mask = blocked_mask(self.pid, self.tid)?;
        let top = self.saved.rsp.wrapping_sub(RED_ZONE) & !63;
        let scratch = top - SCRATCH;
        let frame_len = (FPSTATE_AT + fp.len() as u64 + UCONTEXT + SIGINFO).div_ceil(64) * 64;
        let frame = (scratch - frame_len) & !63;
        let low = frame - CALL_STACK;
        let floor = maps
            .iter()
            .find(|m| m.contains(self.saved.rsp.wrapping_sub(1)))
            .map(|m| m.start)
            .unwrap_or(u64::MAX);
        if low < floor || floor == u64::MAX {
            return Err(anyhow::Error::new(NoRoom { tid: self.tid }));
        }
        // The frame and scratch now; the call stack below only if a function is called (most
        // operations make system calls alone).
        self.stack = (frame, mem.read(frame, (top - frame) as usize)?);
        self.delivered = session.delivered;
        self.frame = frame;
        self.scratch = scratch;
        let ret = self.gadgets.sigreturn.unwrap_or(0);
        mem.write(frame, &signal_frame(&self.saved, mask, &fp, frame, ret))?;
        self.slot = ret;
        Ok(())
    }

    /// Saves the dead stack a called function will use (checked to exist when the frame was
    /// laid), once per frame.
    fn save_call_stack(&mut self, mem: &Memory) -> Result<()> {
        let low = self.frame - CALL_STACK;
        if self.stack.0 > low {
            let mut below = mem.read(low, (self.stack.0 - low) as usize)?;
            below.extend_from_slice(&self.stack.1);
            self.stack = (low, below);
        }
        Ok(())
    }

    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// 512 bytes of scratch memory in the target for the caller's data (names, arguments).
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// From now on, function calls return through the landing stub at `addr` (a copy of
    /// [`LANDING`] in executable memory of ours).
    pub fn set_landing(&mut self, addr: u64) {
        self.landing = Some(addr);
    }

    fn set_slot(&mut self, mem: &Memory, value: u64) -> Result<()> {
        if self.slot != value {
            mem.write(self.frame, &value.to_le_bytes())?;
            self.slot = value;
        }
        Ok(())
    }

    /// A signal came for the thread before our call began: put its own state back, deliver the
    /// signal in it, and start over from wherever the thread stops next.
    fn deliver(
        &mut self,
        session: &mut Session,
        mem: &Memory,
        maps: &[Mapping],
        sig: i32,
    ) -> Result<()> {
        let state = if self.in_syscall {
            restarted(&self.saved)
        } else {
            self.saved
        };
        setregs(self.pid, self.tid, state)?;
        session.deliver_and_restop(self.tid, sig)?;
        self.in_syscall = false;
        self.saved = getregs(self.pid, self.tid)?;
        // The old dead-stack bytes may now lie under a live signal frame: never restore them.
        self.lay_frame(session, mem, maps)
    }

    /// Runs system call `nr` in the target; returns its raw result (negative errno on failure).
    pub fn syscall(
        &mut self,
        session: &mut Session,
        mem: &Memory,
        maps: &[Mapping],
        nr: i64,
        args: &[u64],
    ) -> Result<i64> {
        self.syscall_with(session, mem, maps, nr, args, &[])
    }

    /// Like [`Remote::syscall`], with `data` placed in the scratch memory first and its
    /// address as the first argument (before `args`). The data is written again before every
    /// attempt: a signal delivered meanwhile puts its frame where the scratch memory was.
    pub fn syscall_with_data(
        &mut self,
        session: &mut Session,
        mem: &Memory,
        maps: &[Mapping],
        nr: i64,
        data: &[u8],
        args: &[u64],
    ) -> Result<i64> {
        if data.len() as u64 > SCRATCH {
            bail!("{} bytes do not fit the scratch memory", data.len());
        }
        self.syscall_with(session, mem, maps, nr, args, data)
    }

    fn syscall_with(
        &mut self,
        session: &mut Session,
        mem: &Memory,
        maps: &[Mapping],
        nr: i64,
        rest: &[u64],
        data: &[u8],
    ) -> Result<i64> {
        let with_data = |scratch: u64| -> Vec<u64> {
            if data.is_empty() {
                rest.to_vec()
            } else {
                std::iter::once(scratch)
                    .chain(rest.iter().copied())
                    .collect()
            }
        };
        let args = with_data(self.scratch);
        let args = &args[..];
        if !self.filters.is_empty() {
            let mut a = [0u64; 6];
            for (slot, v) in a.iter_mut().zip(args) {
                *slot = *v;
            }
            let data = SeccompData {
                nr: nr as i32,
                arch: seccomp::AUDIT_ARCH_X86_64,
                instruction_pointer: self.gadgets.syscall_ret,
                args: a,
            };
            if !seccomp::allows(&self.filters, &data)? {
                bail!(
                    "process {}: its seccomp filter would block system call {nr}; not injected",
                    self.pid
                );
            }
        }
        let ret = self.gadgets.sigreturn.unwrap_or(0);
        self.set_slot(mem, ret)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        for _ in 0..64 {
            if !data.is_empty() {
                mem.write(self.scratch, data)?;
            }
            let args = with_data(self.scratch);
            let mut regs = self.saved;
            regs.rax = nr as u64;
            regs.orig_rax = u64::MAX;
            regs.rip = self.gadgets.syscall_ret;
            regs.rsp = self.frame;
            let slots = [
                &mut regs.rdi,
                &mut regs.rsi,
                &mut regs.rdx,
                &mut regs.r10,
                &mut regs.r8,
                &mut regs.r9,
            ];
            for (slot, value) in slots.into_iter().zip(&args) {
                *slot = *value;
            }
            setregs(self.pid, self.tid, regs)?;
            ptrace_req(libc::PTRACE_SYSCALL, self.tid, 0).map_err(|_| gone(self.pid))?;
            match session.wait_injected(self.tid, deadline)? {
                Injected::Syscall => {
                    let at = getregs(self.pid, self.tid)?;
                    if at.orig_rax != nr as u64 || at.rip != self.gadgets.syscall_ret + 2 {
                        bail!(
                            "process {}: thread {} stopped in system call {} at {:#x}, not ours",
                            self.pid,
                            self.tid,
                            at.orig_rax as i64,
                            at.rip
                        );
                    }
                    self.in_syscall = true;
                    crate::fault::point("inject:entered");
                    ptrace_req(libc::PTRACE_SYSCALL, self.tid, 0).map_err(|_| gone(self.pid))?;
                    match session.wait_injected(self.tid, deadline)? {
                        Injected::Syscall => {
                            let ret = getregs(self.pid, self.tid)?.rax as i64;
                            crate::fault::point("inject:exited");
                            return Ok(ret);
                        }
                        other => bail!(
                            "process {}: injected system call {nr} did not complete ({other:?})",
                            self.pid
                        ),
                    }
                }
                Injected::Signal(sig) => self.deliver(session, mem, maps, sig)?,
                Injected::Interrupted => {
                    self.in_syscall = false;
                }
                Injected::TimedOut => {
                    self.regain(session)?;
                    return Err(anyhow::Error::new(SyscallTimedOut { pid: self.pid, nr }));
                }
            }
        }
        bail!(
            "process {}: injected system call {nr} kept being interrupted by signals",
            self.pid
        )
    }

    /// Calls `func(args…)` (up to six integer arguments) in the target and returns `rax`. Used
    /// for GNU indirect function resolvers and to register unwind tables. Needs the landing
    /// stub ([`Remote::set_landing`]).
    pub fn call(
        &mut self,
        session: &mut Session,
        mem: &Memory,
        maps: &[Mapping],
        func: u64,
        args: &[u64],
    ) -> Result<u64> {
        if args.len() > 6 {
            bail!("at most six arguments in a register call");
        }
        let landing = self
            .landing
            .context("no landing stub mapped for a call in the target")?;
        let deadline = Instant::now() + Duration::from_secs(2);
        for _ in 0..64 {
            self.save_call_stack(mem)?;
            self.set_slot(mem, landing)?;
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
            regs.rsp = self.frame;
            regs.rip = func;
            regs.rax = 0;
            regs.orig_rax = u64::MAX;
            setregs(self.pid, self.tid, regs)?;
            ptrace_req(libc::PTRACE_SYSCALL, self.tid, 0).map_err(|_| gone(self.pid))?;
            let mut started = false;
            loop {
                match session.wait_injected(self.tid, deadline)? {
                    Injected::Syscall => {
                        started = true;
                        let mut at = getregs(self.pid, self.tid)?;
                        if at.orig_rax == libc::SYS_rt_sigreturn as u64
                            && at.rip == landing + LANDING_SYSCALL_END
                        {
                            let result = mem.read_u64(self.frame - 8)?;
                            // Our own rt_sigreturn: skip it (the state comes back from an
                            // interrupt stop instead), and let the thread reach its exit stop.
                            at.orig_rax = u64::MAX;
                            setregs(self.pid, self.tid, at)?;
                            ptrace_req(libc::PTRACE_SYSCALL, self.tid, 0)
                                .map_err(|_| gone(self.pid))?;
                            match session.wait_injected(self.tid, deadline)? {
                                Injected::Syscall => {}
                                other => bail!(
                                    "process {}: call of {func:#x} did not return cleanly ({other:?})",
                                    self.pid
                                ),
                            }
                            self.in_syscall = true;
                            let ret = self.gadgets.sigreturn.unwrap_or(0);
                            self.set_slot(mem, ret)?;
                            return Ok(result);
                        }
                        // A system call of the function itself: let it run.
                        ptrace_req(libc::PTRACE_SYSCALL, self.tid, 0)
                            .map_err(|_| gone(self.pid))?;
                    }
                    Injected::Signal(sig) if !started => {
                        self.deliver(session, mem, maps, sig)?;
                        break; // start the call over from the new state
                    }
                    Injected::Signal(sig) => {
                        // The function runs on the thread's behalf: the handler runs on top of
                        // it, as it would if the program had made the call.
                        session.delivered += 1;
                        ptrace_req(libc::PTRACE_SYSCALL, self.tid, sig as usize)
                            .map_err(|_| gone(self.pid))?;
                    }
                    Injected::Interrupted => {
                        ptrace_req(libc::PTRACE_SYSCALL, self.tid, 0)
                            .map_err(|_| gone(self.pid))?;
                    }
                    Injected::TimedOut => {
                        self.regain(session)?;
                        bail!(
                            "process {}: call of {func:#x} did not finish in time",
                            self.pid
                        );
                    }
                }
            }
        }
        bail!(
            "process {}: call of {func:#x} kept being interrupted by signals",
            self.pid
        )
    }

    /// Brings a thread that did not come back in time to a stop, in its own state.
    fn regain(&mut self, session: &mut Session) -> Result<()> {
        let _ = ptrace_req(libc::PTRACE_INTERRUPT, self.tid, 0);
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            match session.wait_injected(self.tid, until)? {
                Injected::TimedOut => bail!(
                    "process {}: thread {} does not stop (it is left to finish on its own)",
                    self.pid,
                    self.tid
                ),
                Injected::Signal(sig) => {
                    session.delivered += 1;
                    let _ = ptrace_req(libc::PTRACE_CONT, self.tid, sig as usize);
                    let _ = ptrace_req(libc::PTRACE_INTERRUPT, self.tid, 0);
                }
                Injected::Syscall => {
                    self.in_syscall = true;
                    break;
                }
                Injected::Interrupted => {
                    self.in_syscall = false;
                    break;
                }
            }
        }
        self.restore(session)
    }

    /// Puts the thread back in its own state, in an interrupt stop.
    fn restore(&mut self, session: &mut Session) -> Result<()> {
        if self.in_syscall {
            // Leave the system-call stop through an interrupt stop, so that the kernel
            // restarts an interrupted call from the registers we put back. Until then the
            // thread holds the restarted form of its state, which is what it would run if we
            // died now.
            setregs(self.pid, self.tid, restarted(&self.saved))?;
            self.in_syscall = false;
            let before = session.delivered;
            session.leave_syscall_stop(self.tid)?;
            if session.delivered != before {
                // A signal was delivered on the way out: the thread now stands at its handler,
                // in a state of its own that must be kept.
                self.saved = getregs(self.pid, self.tid)?;
                return Ok(());
            }
        }
        setregs(self.pid, self.tid, self.saved)
    }

    /// Puts the registers and the dead stack back exactly as they were. The thread stays
    /// stopped.
    pub fn finish(mut self, session: &mut Session, mem: &Memory) -> Result<()> {
        self.restore(session)?;
        if session.delivered == self.delivered {
            mem.write(self.stack.0, &self.stack.1)?;
        }
        Ok(())
    }

    pub fn check(&self, what: &str, ret: i64) -> Result<u64> {
        if ret < 0 && ret > -4096 {
            let err = Errno::from_raw((-ret) as i32);
            bail!("process {}: {what} failed in the target: {err}", self.pid);
        }
        Ok(ret as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gadget_hints_read_back_what_was_written_and_skip_what_does_not_parse() {
        let mut cache = HashMap::new();
        cache.insert(
            ("fe:00".to_string(), 0x1234, 0x1000, 0x26000),
            (Some(0x11ca5), Some(0x1ff70)),
        );
        cache.insert(("00:1f".to_string(), 7, 0, 0x2000), (None, Some(0x10)));
        cache.insert(("fe:01".to_string(), 9, 0x3000, 0x5000), (None, None));
        let text = format_hints(&cache);
        assert_eq!(parse_hints(&text), cache);
        let damaged = format!("garbage\nfe:00 1 2 3 zz -\nfe:00 1 2\n{text}fe:00 1 2 3 4 5 6\n");
        assert_eq!(parse_hints(&damaged), cache);
    }
}
