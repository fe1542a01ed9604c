//! The Suture host agent. Its one job: keep every process on this host carrying the newest
//! trusted patch for the modules it maps, and take patches back out when they are withdrawn
//! or when they hurt.
//!
//! It is a controller ([`controller`]): desired state is the trusted bundles a
//! [`source::BundleSource`] offers (newest level per patch line, i.e. per target module
//! build-id); actual state is what each process carries, read from its own memory by the
//! engine. Every action goes to a crash-safe [`journal`] before the agent moves on; the
//! [`procevents`] connector reports crashes of patched processes (automatic rollback) and new
//! processes (patched right after their exec). Status and metrics go through
//! [`report::Report`]. [`eligibility`] answers whether a host can be live-patched at all.
//!
//! # New processes: the window that is left, and how to close it
//!
//! Today a new process is patched in reaction to its `PROC_EVENT_EXEC` (retried for a second
//! while its libraries get mapped): it runs unpatched code from its exec until then (2–10 ms
//! measured, up to tens under load), and a library `dlopen`ed later waits for the next full pass. Closing the
//! window needs the engine to patch a process it holds, which its public API does not offer
//! yet (`apply` seizes and releases the process itself). The design:
//!
//! 1. fanotify (`FAN_CLASS_CONTENT`) marks on every file whose build-id a desired bundle
//!    targets, found by the same scan (`FAN_OPEN_EXEC_PERM` for executables, `FAN_OPEN_PERM`
//!    for libraries; re-marked when a package update replaces the file). The event carries
//!    the opener's pid and the `open` waits for our answer.
//! 2. On the event, `PTRACE_SEIZE` the opener with `PTRACE_O_TRACEEXEC`, then answer
//!    `FAN_ALLOW`. An executable: the exec stop comes before any instruction of the new
//!    image. A library: stop the opener at the dynamic loader's debugger hook
//!    (`_dl_debug_state`, found through `r_debug`) once the library is mapped and relocated,
//!    before its constructors and before any caller can reach it.
//! 3. Apply with the already-seized session (the missing engine entry point; bindings to
//!    libraries not loaded yet wait for the loader hook), then detach.
//! 4. Fail open: if the agent dies, the kernel answers the pending permission events and
//!    ptrace detaches; the process runs unpatched, and the restarted agent's first pass
//!    patches it as it does any running process. A response timeout of our own (answer
//!    `FAN_ALLOW` after a deadline) keeps a stuck engine from hanging exec on the host.

pub mod config;
pub mod controller;
pub mod eligibility;
pub mod gate;
pub mod journal;
pub mod metrics;
pub mod procevents;
pub mod report;
pub mod scan;
pub mod source;

pub use config::Settings;
pub use controller::{run_agent, Agent, Lock};
pub use report::{BundleState, BundleStatus, Status};
