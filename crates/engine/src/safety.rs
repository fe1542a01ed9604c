//! The activeness check: no thread may be executing in, or be about to return into, code that
//! a detour is about to bypass or that is about to be unmapped.
//!
//! A stack in which no word (and no register) points into guarded code is clear: that is
//! checked first, and is all most stacks need. Otherwise the stack is walked with the
//! modules' unwind tables ([`crate::unwind`]); every return address found is checked. Where the
//! tables cannot continue (or have not been read yet: the caller reads them and checks again),
//! the rest of the stack is scanned conservatively: every word that points into guarded code
//! counts. A thread caught *executing* a replaced function runs alone, in short slices, until
//! it leaves it (a function that is hot in many threads would otherwise rarely be found idle);
//! one that is still down the call chain too, within a small budget; what is left over makes
//! the caller back off and retry.

use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::ptrace;
use nix::unistd::Pid;

use crate::modules::LoadedModule;
use crate::procfs::{Mapping, Memory};
use crate::stop::{gone, Session};
use crate::unwind::{Frame, Step, Walker};

/// Upper bound on the stack bytes read per thread.
const MAX_STACK: u64 = 8 << 20;
/// How long one thread may run alone to leave a replaced function.
const STEP_BUDGET: Duration = Duration::from_millis(2);
const MAX_FRAMES: usize = 1024;

/// Code that must not be active.
#[derive(Debug, Clone)]
pub struct Guarded {
    pub name: String,
    pub start: u64,
    pub end: u64,
    /// Replaced functions: a thread sitting exactly at the entry is safe (it will take the
    /// detour). Code that is going away is unsafe at any address.
    pub entry_is_safe: bool,
}

impl Guarded {
    fn holds_pc(&self, pc: u64) -> bool {
        pc >= self.start && pc < self.end && !(self.entry_is_safe && pc == self.start)
    }

    /// A return address points after a call: never at a function's first byte.
    fn holds_return(&self, ra: u64) -> bool {
        ra > self.start && ra <= self.end
    }
}

/// Why the process cannot be changed right now.
#[derive(Debug, Clone)]
pub struct Busy {
    pub tid: i32,
    pub function: String,
    pub how: &'static str,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "thread {} {} `{}`", self.tid, self.how, self.function)
    }
}

/// One thread's stack, read with one system call.
struct Stack<'a> {
    mem: &'a Memory,
    base: u64,
    bytes: Vec<u8>,
}

impl Stack<'_> {
    fn read(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.base)? as usize;
        match self.bytes.get(off..off + 8) {
            Some(b) => Some(u64::from_le_bytes(b.try_into().ok()?)),
            None => self.mem.read_u64(addr).ok(),
        }
    }
}

pub struct Checker<'a> {
    pub mem: &'a Memory,
    pub maps: &'a [Mapping],
    pub modules: &'a [LoadedModule],
    pub guarded: &'a [Guarded],
    walker: Walker,
    /// Some thread's stack is not in our snapshot of the mappings (a thread born since).
    pub saw_unknown_stack: bool,
    /// Whether a stack that needs walking is reported as soon as some module's unwind tables
    /// are not read yet (the caller reads them with nothing stopped and checks again), rather
    /// than walked conservatively past that module.
    pub ask_for_tables: bool,
    /// Some stack needed the unwind tables that are not read yet ([`Checker::ask_for_tables`]).
    pub needs_tables: bool,
}

impl<'a> Checker<'a> {
    pub fn new(
        mem: &'a Memory,
        maps: &'a [Mapping],
        modules: &'a [LoadedModule],
        guarded: &'a [Guarded],
    ) -> Self {
        Checker {
            mem,
            maps,
            modules,
            guarded,
            walker: Walker::default(),
            saw_unknown_stack: false,
            ask_for_tables: true,
            needs_tables: false,
        }
    }

    /// Checks every thread; steps a busy thread (alone) until it is clear, where that is quick.
    pub fn check(&mut self, session: &mut Session) -> Result<Option<Busy>> {
        if self.guarded.is_empty() {
            return Ok(None);
        }
        let tids: Vec<i32> = session.threads().collect();
        for tid in tids {
            let mut busy = self.thread(session, tid)?;
            // (Asking for tables is no reason to let the thread run alone.)
            if busy.is_some() && !self.needs_tables {
                busy = self.step_out(session, tid)?;
            }
            if busy.is_some() {
                return Ok(busy);
            }
        }
        Ok(None)
    }

    fn thread(&mut self, session: &Session, tid: i32) -> Result<Option<Busy>> {
        let regs = ptrace::getregs(Pid::from_raw(tid)).map_err(|_| gone(session.pid()))?;
        if let Some(g) = self.guarded.iter().find(|g| g.holds_pc(regs.rip)) {
            return Ok(Some(busy(tid, g, EXECUTING)));
        }
        let sp = regs.rsp & !7;
        let mut end = match self.maps.iter().find(|m| m.contains(sp)) {
            Some(m) => m.end,
            None => {
                self.saw_unknown_stack = true;
                sp + 64 * 1024
            }
        };
        // The kernel merges neighbouring thread stacks into one mapping; a thread's own stack
        // ends at its thread control block, where the thread pointer points (glibc, musl).
        // Past it lie other threads' stacks, whose stale words are not this thread's frames.
        if regs.fs_base > sp && regs.fs_base < end {
            end = regs.fs_base;
        }
        let len = (end.saturating_sub(sp)).min(MAX_STACK) as usize;
        let bytes = self.mem.read(sp, len).unwrap_or_default();
        let stack = Stack {
            mem: self.mem,
            base: sp,
            bytes,
        };
        // Every return address a walk can find is a word of the live stack or, in hand-written
        // code, a register's value: if the whole stack was read and none of them points into
        // guarded code, no walk can find one (and most stacks never need the unwind tables).
        let whole = !self.saw_unknown_stack && stack.bytes.len() as u64 == end.saturating_sub(sp);
        let candidate = self.may_return_into(&regs, &stack.bytes);
        if whole && candidate.is_none() {
            return Ok(None);
        }
        if self.ask_for_tables && self.modules.iter().any(|m| !m.facts.unwind_read()) {
            self.needs_tables = true;
            let g = candidate.or(self.guarded.first());
            return Ok(g.map(|g| busy(tid, g, RETURNS)));
        }

        // Precise walk while the unwind tables can answer.
        let mut frame = Frame::new(&regs);
        let mut first = true;
        let mut scan_from = None;
        for _ in 0..MAX_FRAMES {
            match self
                .walker
                .step(self.modules, &frame, first, &mut |a| stack.read(a))
            {
                Step::Caller(next) => {
                    if let Some(g) = self.guarded.iter().find(|g| g.holds_return(next.pc)) {
                        return Ok(Some(busy(tid, g, RETURNS)));
                    }
                    frame = next;
                    first = false;
                }
                Step::Done => break,
                Step::Unknown => {
                    scan_from = Some(frame.sp);
                    break;
                }
            }
        }
        // Conservative scan of whatever the walk could not cover (the walk only goes up the
        // stack, from the stack pointer: `from` lies in the bytes read).
        let rest = scan_from.and_then(|from| {
            stack
                .bytes
                .get(((from & !7).saturating_sub(stack.base)) as usize..)
        });
        Ok(rest
            .and_then(|words| self.returned_into(words))
            .map(|g| busy(tid, g, RETURNS)))
    }

    /// The guarded code that some word of `stack` (8-byte aligned) would return into.
    fn returned_into(&self, stack: &[u8]) -> Option<&'a Guarded> {
        let guarded = self.guarded;
        stack.chunks_exact(8).find_map(|w| {
            let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            guarded.iter().find(|g| g.holds_return(v))
        })
    }

    /// The guarded code that some register or stack word would return into, if any (a
    /// superset of the return addresses a precise walk finds).
    fn may_return_into(&self, regs: &libc::user_regs_struct, stack: &[u8]) -> Option<&'a Guarded> {
        let guarded = self.guarded;
        let hit = |v: u64| guarded.iter().find(|g| g.holds_return(v));
        let registers = [
            regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp, regs.r8, regs.r9,
            regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ];
        registers
            .into_iter()
            .find_map(hit)
            .or_else(|| self.returned_into(stack))
    }

    /// Lets `tid` run alone, in short slices, until neither its pc nor its stack touches
    /// guarded code; returns what still stands in the way when the budget runs out (e.g. it
    /// blocked in a system call, or the guarded function is far down its stack).
    fn step_out(&mut self, session: &mut Session, tid: i32) -> Result<Option<Busy>> {
        let deadline = Instant::now() + STEP_BUDGET;
        let mut busy = self.thread(session, tid)?;
        // A thread stopped inside a system call would only block again: leave such threads to
        // the back-off.
        let regs = ptrace::getregs(Pid::from_raw(tid)).map_err(|_| gone(session.pid()))?;
        if (regs.orig_rax as i64) >= 0 {
            return Ok(busy);
        }
        // Let it run alone in short slices (never single-stepped: a trap flag would outlive us
        // if we died) until it is out.
        let mut slice = Duration::from_micros(20);
        while busy.is_some() && Instant::now() < deadline {
            if !session.nudge(tid, slice)? {
                return Ok(None); // it exited
            }
            busy = self.thread(session, tid)?;
            slice = (slice * 2).min(Duration::from_micros(200));
        }
        Ok(busy)
    }
}

const EXECUTING: &str = "is executing in";
const RETURNS: &str = "would return into";

fn busy(tid: i32, g: &Guarded, how: &'static str) -> Busy {
    Busy {
        tid,
        function: g.name.clone(),
        how,
    }
}
