//! A request to stop (SIGINT, SIGTERM, SIGHUP), seen by the engine at its phase boundaries: an
//! operation that has not committed undoes what it did; one that has committed finishes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The flag a signal handler sets (register it with `signal_hook::flag::register`).
pub fn flag() -> Arc<AtomicBool> {
    shared().clone()
}

fn shared() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Has the operator asked us to stop? (Checked in loops: no reference counting here.)
pub fn requested() -> bool {
    shared().load(Ordering::Relaxed)
}
