//! The Suture host agent. Its one job: keep every process on this host carrying the newest
//! trusted patch for the modules it maps, and take patches back out when they are withdrawn
//! or when they hurt.
//!
//! It is a controller ([`controller`]): desired state is the trusted bundles a
//! [`source::BundleSource`] offers (newest level per patch line, i.e. per target module
//! build-id); actual state is what each process carries, read from its own memory by the
//! engine. Every action goes to a crash-safe [`journal`] before the agent moves on; the
//! [`procevents`] connector reports crashes of patched processes (automatic rollback) and new
//! processes (patched right after their exec, when the gate could not hold them). Status and metrics go through
//! [`report::Report`]. [`eligibility`] answers whether a host can be live-patched at all.
//!
//! # New processes: no unpatched window
//!
//! The [`gate`] holds a process that starts a patched executable or loads a patched library
//! (fanotify permission events, then the engine's [`suture_engine::hold`]) and patches it
//! before the module's code can run; the exec event of the connector is the fallback for
//! processes the gate cannot hold.

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
