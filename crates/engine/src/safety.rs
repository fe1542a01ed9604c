//! The activeness check: no thread may be executing in, or be about to return into, code that
//! a detour is about to bypass or that is about to be unmapped.
//!
//! For each stopped thread we look at its instruction pointer and scan its live stack (from the
//! stack pointer to the end of the stack mapping) for words that point into a guarded range.
//! The scan is conservative: a return address is always on the stack, so none is missed, and a
//! stale word that happens to look like one only costs a retry. Signal frames on the same stack
//! are covered (their saved `rip` is a stack word).

use anyhow::Result;
use nix::sys::ptrace;
use nix::unistd::Pid;

use crate::procfs::{Mapping, Memory};
use crate::stop::{gone, Session};

/// Upper bound on the stack bytes scanned per thread.
const MAX_STACK_SCAN: u64 = 8 << 20;

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

pub fn check(
    session: &Session,
    mem: &Memory,
    maps: &[Mapping],
    guarded: &[Guarded],
) -> Result<Option<Busy>> {
    if guarded.is_empty() {
        return Ok(None);
    }
    for tid in session.threads() {
        let regs = ptrace::getregs(Pid::from_raw(tid)).map_err(|_| gone(session.pid()))?;
        for g in guarded {
            let inside = regs.rip >= g.start && regs.rip < g.end;
            if inside && !(g.entry_is_safe && regs.rip == g.start) {
                return Ok(Some(Busy {
                    tid,
                    function: g.name.clone(),
                    how: "is executing in",
                }));
            }
        }
        let sp = regs.rsp;
        let Some(stack) = maps.iter().find(|m| m.contains(sp)) else {
            continue; // a stack we cannot see (e.g. not yet in our maps snapshot)
        };
        let len = (stack.end - (sp & !7)).min(MAX_STACK_SCAN) as usize;
        let Ok(words) = mem.read(sp & !7, len) else {
            continue;
        };
        for chunk in words.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            let v = u64::from_le_bytes(w);
            // A return address points after a call: never at the very start of a function.
            if let Some(g) = guarded.iter().find(|g| v > g.start && v <= g.end) {
                return Ok(Some(Busy {
                    tid,
                    function: g.name.clone(),
                    how: "would return into",
                }));
            }
        }
    }
    Ok(None)
}
