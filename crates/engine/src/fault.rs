//! Fault points: named instants of apply and revert at which `suture` can be made to kill
//! itself (`SUTURE_FAULT=NAME` or `NAME#N` for the N-th time the point is reached), so the
//! fault-injection tests can prove that a target survives the tracer dying at exactly that
//! instant. Unset, a point costs one relaxed atomic load.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

fn configured() -> &'static Option<(String, u32)> {
    static FAULT: OnceLock<Option<(String, u32)>> = OnceLock::new();
    FAULT.get_or_init(|| {
        let v = std::env::var("SUTURE_FAULT").ok()?;
        match v.split_once('#') {
            Some((name, n)) => Some((name.to_string(), n.parse().unwrap_or(1))),
            None => Some((v, 1)),
        }
    })
}

/// Marks the instant `name`; kills this process (SIGKILL, as an operator or the OOM killer
/// would) if the fault is set for it.
pub fn point(name: &str) {
    static HITS: AtomicU32 = AtomicU32::new(0);
    if let Some((want, nth)) = configured() {
        if want == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *nth {
            // SAFETY: kill(2) on our own pid with a valid signal has no memory effects.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}
