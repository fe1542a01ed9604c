//! The reconcile loop: desired state (the newest trusted, not rolled-back level per patch
//! line, i.e. per target module build-id) against actual state (what each process carries,
//! read from its own memory), closed by applies and reverts through the engine.
//!
//! One pass: read the journal, the trust store and the source; decide what each patch line
//! wants; scan the processes mapping each line's module; apply where the desired bundle is
//! missing (a lower level is superseded in the same stop), revert what the agent applied and
//! no longer wants (withdrawn, rolled back); write status. Passes run on an interval, on
//! process events (exec: the new process; exit by a crash signal: the health guard), and on
//! shutdown the operation in progress finishes first.
//!
//! Every engine call for a pid runs whole on one worker thread (ptrace belongs to the thread
//! that attached); a pid is never worked on by two threads at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use suture_bundle::{Bundle, TrustStore};
use suture_engine::{ApplyOptions, EngineError, PatchRecord};

use crate::config::Settings;
use crate::journal::{now_ms, Entry, Event, Journal};
use crate::procevents::{is_crash_signal, signal_name, ProcEvent};
use crate::report::{BundleState, BundleStatus, Failure, Report, Status};
use crate::scan::Scanner;
use crate::source::BundleSource;
use suture_engine::PatchState;

/// What wakes the controller.
#[derive(Debug)]
pub enum Msg {
    Proc(ProcEvent),
    /// The connector dropped events (buffer overrun): rescan everything.
    EventsLost,
    /// The connector is gone; exits are no longer seen.
    ConnectorDown(String),
    /// The bundle source may offer something new.
    SourceChanged,
    /// The gate held a starting process and applied to it.
    Held(crate::gate::Held),
    Shutdown,
}

/// New processes waiting for their first apply, and when the next full pass is due.
struct Events {
    /// (pid, next try, tries): a library is mapped a few milliseconds after the exec.
    fresh: Vec<(i32, Instant, u32)>,
    /// When each new process exec'd, to log how long it ran unpatched.
    exec_at: HashMap<i32, Instant>,
    next_pass: Instant,
}

/// A trusted bundle, with its content address computed once.
#[derive(Clone)]
struct Verified {
    bundle: Arc<Bundle>,
    sha: String,
    origin: String,
}

impl Verified {
    fn id(&self) -> &str {
        &self.bundle.manifest.id
    }
    fn level(&self) -> u32 {
        self.bundle.manifest.level
    }
    fn build_id(&self) -> &str {
        &self.bundle.manifest.module.build_id
    }
}

/// A bundle the agent will not use: where it came from, its id and level if readable, why.
type Refusal = (String, Option<(String, u32)>, String);

/// The decisions of the last full pass, reused for new processes between passes.
#[derive(Default, Clone)]
struct Plan {
    verified: Vec<Verified>,
    refused: Vec<Refusal>,
    /// Per patch line (build-id): the desired bundle (index into `verified`), if any.
    lines: BTreeMap<String, Option<usize>>,
}

/// A process the agent patched (or found patched), watched for crashes in the health window.
#[derive(Debug, Clone)]
struct Watched {
    sha: String,
    id: String,
    applied_ms: u64,
}

/// The last failure of an operation (bundle, pid) and when to try again.
struct Tracked {
    failure: Failure,
    op: &'static str,
    start: Option<u64>,
    next_try: Instant,
    tries: u32,
}

#[derive(Debug, Clone)]
enum Op {
    Apply(usize),
    Revert {
        id: String,
        sha: String,
        reason: String,
    },
}

enum Outcome {
    Applied(suture_engine::ApplyReport),
    Reverted(suture_engine::RevertReport),
}

pub struct Agent {
    s: Settings,
    source: Box<dyn BundleSource>,
    journal: Journal,
    reports: Vec<Box<dyn Report>>,
    stop: Arc<AtomicBool>,
    /// Only look, never act nor write (for `agent status` without a running agent).
    dry: bool,
    plan: Plan,
    /// A source that failed keeps its last offer: an unreachable source withdraws nothing.
    last_offer_ok: bool,
    watch: HashMap<i32, Vec<Watched>>,
    tracked: HashMap<(String, i32), Tracked>,
    /// Bundles withdrawn while this agent ran (shown in status).
    withdrawn: HashSet<String>,
    /// Processes carrying each bundle at the last full pass.
    carriers: HashMap<String, usize>,
    connector_up: bool,
    last_health_cmd: Option<Instant>,
    scanner: Scanner,
    /// Young processes whose apply was refused in the last operations: retried, not tracked.
    unsettled: HashSet<i32>,
    /// Holds starting processes until they are patched (off if fanotify is not available).
    gate: Option<crate::gate::Gate>,
}

impl Agent {
    pub fn new(
        s: Settings,
        source: Box<dyn BundleSource>,
        reports: Vec<Box<dyn Report>>,
        stop: Arc<AtomicBool>,
    ) -> Result<Agent> {
        let journal = Journal::open(&s.state_dir)?;
        Ok(Agent::with_journal(s, source, reports, stop, journal))
    }

    fn with_journal(
        s: Settings,
        source: Box<dyn BundleSource>,
        reports: Vec<Box<dyn Report>>,
        stop: Arc<AtomicBool>,
        journal: Journal,
    ) -> Agent {
        Agent {
            s,
            source,
            journal,
            reports,
            stop,
            dry: false,
            plan: Plan::default(),
            last_offer_ok: true,
            watch: HashMap::new(),
            tracked: HashMap::new(),
            withdrawn: HashSet::new(),
            carriers: HashMap::new(),
            connector_up: false,
            last_health_cmd: None,
            scanner: Scanner::new(),
            unsettled: HashSet::new(),
            gate: None,
        }
    }

    /// Starting processes are held and patched before they run (see [`crate::gate`]).
    pub fn set_gate(&mut self, gate: crate::gate::Gate) {
        self.gate = Some(gate);
    }

    /// The status as it is now, from the journal and a scan of the processes, touching
    /// nothing (what `agent status` shows when no agent runs).
    pub fn observe(s: Settings, source: Box<dyn BundleSource>) -> Result<Status> {
        let journal = Journal::load(&s.state_dir)?;
        let mut a = Agent::with_journal(
            s,
            source,
            Vec::new(),
            Arc::new(AtomicBool::new(false)),
            journal,
        );
        a.dry = true;
        a.pass()
    }

    /// Runs until `Msg::Shutdown` (SIGTERM/SIGINT) or the stop flag.
    pub fn run(&mut self, rx: Receiver<Msg>, connector_up: bool) -> Result<()> {
        self.connector_up = connector_up;
        tracing::info!(
            source = %self.source.describe(),
            state = %self.s.state_dir.display(),
            interval_ms = self.s.interval.as_millis() as u64,
            health_window_s = self.s.health_window.as_secs(),
            "agent started"
        );
        // The first pass before any event: it learns from the processes which of them carry
        // our patches (and since when), so a crash reported meanwhile is judged with that.
        if let Err(e) = self.pass() {
            tracing::error!("reconcile pass failed: {e:#}");
        }
        let mut ev = Events {
            fresh: Vec::new(),
            exec_at: HashMap::new(),
            next_pass: Instant::now() + self.s.interval,
        };
        loop {
            // Everything already queued first (a crash must not wait behind a pass).
            loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        if !self.handle(msg, &mut ev) {
                            tracing::info!("agent stopped");
                            return Ok(());
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        tracing::info!("agent stopped");
                        return Ok(());
                    }
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let now = Instant::now();
            if now >= ev.next_pass {
                if let Err(e) = self.pass() {
                    tracing::error!("reconcile pass failed: {e:#}");
                }
                self.health_command();
                ev.next_pass = Instant::now() + self.s.interval;
                continue;
            }
            let due: Vec<i32> = ev
                .fresh
                .iter()
                .filter(|(_, t, _)| *t <= now)
                .map(|(p, _, _)| *p)
                .collect();
            if !due.is_empty() {
                let (done, patched) = self.pass_new(&due);
                for pid in patched {
                    if let Some(t) = ev.exec_at.get(&pid) {
                        tracing::info!(
                            pid,
                            us_after_exec = t.elapsed().as_micros() as u64,
                            "new process patched"
                        );
                    }
                }
                ev.fresh.retain_mut(|(p, t, n)| {
                    if !due.contains(p) {
                        return true;
                    }
                    if done.contains(p) || *n >= 4 {
                        return false;
                    }
                    *n += 1;
                    *t = Instant::now() + Duration::from_millis(5 << (2 * *n));
                    true
                });
                continue;
            }
            let wake = ev
                .fresh
                .iter()
                .map(|(_, t, _)| *t)
                .min()
                .unwrap_or(ev.next_pass)
                .min(ev.next_pass);
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(msg) => {
                    if !self.handle(msg, &mut ev) {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        tracing::info!("agent stopped");
        Ok(())
    }

    /// Acts on one message. Returns false on shutdown.
    fn handle(&mut self, msg: Msg, ev: &mut Events) -> bool {
        match msg {
            Msg::Shutdown => return false,
            Msg::EventsLost | Msg::SourceChanged => ev.next_pass = Instant::now(),
            Msg::ConnectorDown(why) => {
                tracing::error!("process events lost for good ({why}): crashes are no longer seen, new processes wait for the next pass");
                self.connector_up = false;
            }
            Msg::Held(h) => self.on_held(h),
            Msg::Proc(ProcEvent::Exec { pid }) => {
                if !self.plan.lines.values().any(Option::is_some) {
                    return true; // nothing to apply anywhere
                }
                ev.fresh.retain(|(p, _, _)| *p != pid);
                ev.fresh.push((pid, Instant::now(), 0));
                if ev.exec_at.len() > 4096 {
                    ev.exec_at.clear();
                }
                ev.exec_at.insert(pid, Instant::now());
            }
            Msg::Proc(ProcEvent::Exit {
                pid,
                signal,
                status,
            }) => {
                ev.fresh.retain(|(p, _, _)| *p != pid);
                ev.exec_at.remove(&pid);
                if self.on_exit(pid, signal, status) {
                    ev.next_pass = Instant::now();
                }
            }
        }
        true
    }

    /// What the gate did to a starting process: journaled like any apply.
    fn on_held(&mut self, h: crate::gate::Held) {
        for r in &mut self.reports {
            r.held(h.held_us);
        }
        let verified = self.plan.verified.clone();
        for (sha, r) in h.results {
            let Some(i) = verified.iter().position(|v| v.sha == sha) else {
                continue;
            };
            if r.is_ok() {
                tracing::info!(
                    pid = h.pid,
                    bundle = %verified[i].id(),
                    held_us = h.held_us,
                    "new process patched before it ran"
                );
            }
            if let Err(e) = self.record(h.pid, &Op::Apply(i), r.map(Outcome::Applied), &verified) {
                tracing::error!(pid = h.pid, "cannot journal: {e:#}");
            }
        }
    }

    fn append(&mut self, event: Event) -> Result<()> {
        if self.dry {
            return Ok(());
        }
        let entry = Entry {
            ts_ms: now_ms(),
            event: event.clone(),
        };
        self.journal.append(event)?;
        for r in &mut self.reports {
            r.action(&entry);
        }
        Ok(())
    }

    /// A watched process ended. Returns whether a rollback happened.
    fn on_exit(&mut self, pid: i32, signal: Option<i32>, status: Option<i32>) -> bool {
        self.tracked.retain(|(_, p), _| *p != pid);
        let Some(watched) = self.watch.remove(&pid) else {
            return false;
        };
        let Some(sig) = signal.filter(|s| is_crash_signal(*s)) else {
            tracing::debug!(pid, ?signal, ?status, "patched process ended (not a crash)");
            return false;
        };
        let now = now_ms();
        let window = self.s.health_window.as_millis() as u64;
        let mut rolled = false;
        for w in watched {
            if self.journal.state().rolled_back.contains_key(&w.id) {
                continue;
            }
            let age = now.saturating_sub(w.applied_ms);
            if age > window {
                tracing::warn!(bundle = %w.id, pid, signal = %signal_name(sig), age_s = age / 1000, "patched process crashed after its health window; not rolled back");
                continue;
            }
            let Some(known) = self.journal.state().known.get(&w.sha).cloned() else {
                continue;
            };
            let reason = format!(
                "process {pid} died of {} {:.1} s after the patch went live in it",
                signal_name(sig),
                age as f64 / 1000.0
            );
            if let Err(e) = self.append(Event::RolledBack {
                id: w.id.clone(),
                sha256: w.sha.clone(),
                build_id: known.build_id,
                level: known.level,
                pid: Some(pid),
                signal: Some(sig),
                reason,
            }) {
                tracing::error!("cannot journal the rollback of {}: {e:#}", w.id);
            }
            rolled = true;
        }
        rolled
    }

    /// Runs the operator's health command while a bundle is in its health window; a failure
    /// rolls back every bundle in its window.
    fn health_command(&mut self) {
        let Some(cmd) = self.s.health_cmd.clone() else {
            return;
        };
        if self
            .last_health_cmd
            .is_some_and(|t| t.elapsed() < self.s.interval.max(Duration::from_secs(1)))
        {
            return;
        }
        let now = now_ms();
        let window = self.s.health_window.as_millis() as u64;
        let state = self.journal.state();
        let in_window: Vec<Verified> = self
            .plan
            .lines
            .values()
            .flatten()
            .filter_map(|&i| self.plan.verified.get(i))
            .filter(|v| {
                state
                    .first_applied
                    .get(&v.sha)
                    .is_some_and(|&t| now.saturating_sub(t) <= window)
            })
            .cloned()
            .collect();
        if in_window.is_empty() {
            return;
        }
        self.last_health_cmd = Some(Instant::now());
        let Err(why) = run_health_command(&cmd, Duration::from_secs(30)) else {
            return;
        };
        for v in in_window {
            let reason = format!("health command `{cmd}` failed: {why}");
            if let Err(e) = self.append(Event::RolledBack {
                id: v.id().to_string(),
                sha256: v.sha.clone(),
                build_id: v.build_id().to_string(),
                level: v.level(),
                pid: None,
                signal: None,
                reason,
            }) {
                tracing::error!("cannot journal the rollback of {}: {e:#}", v.id());
            }
        }
        if let Err(e) = self.pass() {
            tracing::error!("reconcile pass failed: {e:#}");
        }
    }

    /// Decides what each patch line wants, from what the source offers and the journal.
    fn make_plan(&mut self) -> Result<()> {
        let trust = match TrustStore::load_dir(&self.s.trust_dir) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("cannot read trusted keys: {e}");
                TrustStore::new()
            }
        };
        let offered = match self.source.offered() {
            Ok(o) => {
                self.last_offer_ok = true;
                o
            }
            Err(e) => {
                // Keep the last decisions: an unreachable source must not withdraw patches.
                if self.last_offer_ok {
                    tracing::error!("bundle source {}: {e:#}", self.source.describe());
                }
                self.last_offer_ok = false;
                return Ok(());
            }
        };
        let mut plan = Plan::default();
        for o in offered {
            let b = match o.bundle {
                Err(reason) => {
                    plan.refused.push((o.origin, None, reason));
                    continue;
                }
                Ok(b) => b,
            };
            let idl = (b.manifest.id.clone(), b.manifest.level);
            if trust.is_empty() {
                plan.refused.push((
                    o.origin,
                    Some(idl),
                    format!("no trusted keys in {}", self.s.trust_dir.display()),
                ));
                continue;
            }
            if let Err(e) = b.verify(&trust) {
                plan.refused.push((o.origin, Some(idl), e.to_string()));
                continue;
            }
            if hex::decode(&b.manifest.module.build_id).is_err() {
                plan.refused
                    .push((o.origin, Some(idl), "invalid module build-id".into()));
                continue;
            }
            if plan.verified.iter().any(|v| v.id() == b.manifest.id) {
                plan.refused.push((
                    o.origin,
                    Some(idl),
                    "another file offers a bundle with the same id".into(),
                ));
                continue;
            }
            let sha = b.content_address();
            plan.verified.push(Verified {
                bundle: Arc::new(b),
                sha,
                origin: o.origin,
            });
        }
        let state = self.journal.state();
        let mut by_line: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, v) in plan.verified.iter().enumerate() {
            by_line.entry(v.build_id().to_string()).or_default().push(i);
        }
        for (line, mut idx) in by_line {
            idx.sort_by_key(|&i| std::cmp::Reverse(plan.verified[i].level()));
            let floor = state.highest.get(&line).map(|h| h.0).unwrap_or(0);
            // The newest level that is not rolled back, unless a higher one was applied before
            // (a withdrawn or rolled-back level 2 never brings level 1 back).
            let desired = idx.into_iter().find(|&i| {
                let v = &plan.verified[i];
                !state.rolled_back.contains_key(v.id()) && v.level() >= floor
            });
            plan.lines.insert(line, desired);
        }
        // Journal refusals once each.
        let new_refusals: Vec<_> = plan
            .refused
            .iter()
            .filter(|(origin, _, reason)| {
                !state.refused.contains(&(origin.clone(), reason.clone()))
            })
            .cloned()
            .collect();
        let new_accepts: Vec<Verified> = plan
            .lines
            .values()
            .flatten()
            .map(|&i| plan.verified[i].clone())
            .filter(|v| !state.known.contains_key(&v.sha))
            .collect();
        let offered_shas: HashSet<&String> = plan.verified.iter().map(|v| &v.sha).collect();
        let withdrawn: Vec<String> = self
            .plan
            .verified
            .iter()
            .filter(|v| !offered_shas.contains(&v.sha))
            .map(|v| v.sha.clone())
            .collect();
        self.withdrawn.extend(withdrawn);
        for v in &plan.verified {
            self.withdrawn.remove(&v.sha);
        }
        self.plan = plan;
        for (origin, idl, reason) in new_refusals {
            self.append(Event::Refused {
                origin,
                id: idl.map(|(id, _)| id),
                reason,
            })?;
        }
        for v in new_accepts {
            let m = &v.bundle.manifest;
            self.append(Event::Accepted {
                id: m.id.clone(),
                sha256: v.sha.clone(),
                level: m.level,
                build_id: m.module.build_id.clone(),
                module: m.module.name.clone(),
                cves: m.cves.clone(),
            })?;
        }
        Ok(())
    }

    /// One full pass. Returns the status it wrote.
    pub fn pass(&mut self) -> Result<Status> {
        // Files no process asked about for six passes leave the engine's caches (updated
        // packages, processes gone): the agent's memory stays what the host needs now.
        suture_engine::modules::evict_unused_files(6);
        // Lock files of operations that were killed, for processes now gone.
        suture_engine::lock::sweep_stale();
        self.journal.refresh()?;
        self.make_plan()?;
        let state = self.journal.state().clone();
        let mut lines: Vec<String> = self.plan.lines.keys().cloned().collect();
        for k in state.known.values() {
            if !lines.contains(&k.build_id) {
                lines.push(k.build_id.clone());
            }
        }
        // Actual state: what every process mapping a line's module carries for that line.
        let wanted: HashSet<Vec<u8>> = lines.iter().filter_map(|l| hex::decode(l).ok()).collect();
        let found = self.scanner.processes_mapping(&wanted);
        let mut carried: BTreeMap<i32, Vec<PatchRecord>> = BTreeMap::new();
        let mut stale: BTreeMap<i32, Vec<PatchRecord>> = BTreeMap::new();
        let mut mapping: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for (bid, pids) in found {
            for &pid in &pids {
                if let std::collections::btree_map::Entry::Vacant(e) = carried.entry(pid) {
                    let read = match self.scanner.maps_of(pid) {
                        Some(maps) => carried_in(pid, maps),
                        None => carried_by(pid),
                    };
                    match read {
                        Ok((live, left)) => {
                            e.insert(live);
                            if !left.is_empty() {
                                stale.insert(pid, left);
                            }
                        }
                        Err(err) => tracing::debug!(pid, "cannot read what it carries: {err:#}"),
                    }
                }
            }
            mapping.insert(hex::encode(bid), pids);
        }
        // New processes are covered first, before the running ones are worked on.
        if let Some(gate) = &self.gate {
            let desired: Vec<crate::gate::Desired> = self
                .plan
                .lines
                .values()
                .flatten()
                .filter_map(|&i| self.plan.verified.get(i))
                .map(|v| crate::gate::Desired {
                    sha: v.sha.clone(),
                    bundle: v.bundle.clone(),
                })
                .collect();
            let mapped: Vec<(Vec<u8>, PathBuf)> = mapping
                .iter()
                .filter_map(|(bid, pids)| {
                    let id = hex::decode(bid).ok()?;
                    let path = pids.iter().find_map(|&p| {
                        // (The scan has just read these maps.)
                        let maps = self.scanner.maps_of(p)?;
                        crate::scan::mapped_file(p, maps, &id)
                    })?;
                    Some((id, path))
                })
                .collect();
            gate.update(desired, &mapped);
        }
        // Known patches found in processes: watched for crashes; a level applied just before
        // a crash of the agent (no journal line) is adopted so it is never applied again.
        let mut adopt = Vec::new();
        for (&pid, recs) in &carried {
            for r in recs {
                if !state.known.contains_key(&r.bundle_sha256) {
                    continue;
                }
                let w = self.watch.entry(pid).or_default();
                if !w.iter().any(|w| w.sha == r.bundle_sha256) {
                    w.push(Watched {
                        sha: r.bundle_sha256.clone(),
                        id: r.id.clone(),
                        applied_ms: r.applied_at * 1000,
                    });
                }
                if state.highest.get(&r.build_id).is_none_or(|h| h.0 < r.level) {
                    adopt.push((pid, r.clone()));
                }
            }
        }
        for (pid, r) in adopt {
            if self
                .journal
                .state()
                .highest
                .get(&r.build_id)
                .is_some_and(|h| h.0 >= r.level)
            {
                continue;
            }
            tracing::info!(bundle = %r.id, pid, "found applied without a journal line (agent stopped mid-operation); adopted");
            self.append(Event::Applied {
                id: r.id.clone(),
                sha256: r.bundle_sha256.clone(),
                level: r.level,
                build_id: r.build_id.clone(),
                pid,
                stopped_us: 0,
            })?;
        }
        if !self.connector_up {
            // Without exit events, forget what is gone (nothing will tell us).
            self.watch
                .retain(|pid, _| Path::new(&format!("/proc/{pid}")).exists());
        }
        self.tracked
            .retain(|(_, pid), t| start_time(*pid).is_some() && start_time(*pid) == t.start);

        // Failures to apply a bundle that is no longer wanted are no longer news.
        let wanted: HashSet<String> = self
            .plan
            .lines
            .values()
            .flatten()
            .filter_map(|&i| self.plan.verified.get(i))
            .map(|v| v.sha.clone())
            .collect();
        self.tracked.retain(|(sha, _), t| {
            t.op != "apply" || t.failure.kind == "stale" || wanted.contains(sha)
        });
        self.note_stale(&stale)?;
        let ops = self.ops_for(&mapping, &carried, &stale);
        // Only the processes operated on can carry something else now.
        let touched: HashSet<i32> = ops.iter().map(|(pid, _)| *pid).collect();
        if !self.dry {
            self.execute(ops);
        }
        for pid in touched {
            if let Some(c) = carried.get_mut(&pid) {
                *c = carried_by(pid).map(|c| c.0).unwrap_or_default();
            }
        }
        let status = self.status_now(&carried);
        for r in &mut self.reports {
            r.status(&status);
        }
        Ok(status)
    }

    /// New processes (exec events): the desired bundles of lines whose module they map.
    /// Returns the pids that need no retry, and those patched now.
    fn pass_new(&mut self, pids: &[i32]) -> (Vec<i32>, Vec<i32>) {
        let mut mapping: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        let mut carried = BTreeMap::new();
        let mut stale = BTreeMap::new();
        let mut settled = Vec::new();
        for &pid in pids {
            let ids = self.scanner.build_ids(pid);
            if ids.is_empty() {
                settled.push(pid); // gone already, or nothing mapped yet worth a retry
                continue;
            }
            let mut any = false;
            for (line, d) in &self.plan.lines {
                if d.is_none() {
                    continue;
                }
                let Ok(bid) = hex::decode(line) else { continue };
                if ids.contains(&bid) {
                    mapping.entry(line.clone()).or_default().push(pid);
                    any = true;
                }
            }
            if any {
                if let Ok((live, left)) = carried_by(pid) {
                    carried.insert(pid, live);
                    if !left.is_empty() {
                        stale.insert(pid, left);
                    }
                }
                settled.push(pid);
            }
        }
        // Only applies: a new process has nothing of ours to take back.
        let ops: Vec<(i32, Vec<Op>)> = self
            .ops_for(&mapping, &carried, &stale)
            .into_iter()
            .map(|(p, ops)| {
                let ops = ops
                    .into_iter()
                    .filter(|o| matches!(o, Op::Apply(_)))
                    .collect();
                (p, ops)
            })
            .collect();
        let patched = self.execute(ops);
        // A refusal of a process still in its dynamic loader (libraries not mapped yet) is
        // retried on the new-process schedule, not settled.
        settled.retain(|p| !self.unsettled.contains(p));
        (settled, patched)
    }

    /// The operations that close the gap between wanted and carried, grouped by pid.
    fn ops_for(
        &mut self,
        mapping: &BTreeMap<String, Vec<i32>>,
        carried: &BTreeMap<i32, Vec<PatchRecord>>,
        stale: &BTreeMap<i32, Vec<PatchRecord>>,
    ) -> Vec<(i32, Vec<Op>)> {
        let state = self.journal.state();
        let mut out: BTreeMap<i32, Vec<Op>> = BTreeMap::new();
        let now = Instant::now();
        for (line, pids) in mapping {
            let desired = self.plan.lines.get(line).copied().flatten();
            let d = desired.and_then(|i| self.plan.verified.get(i));
            for &pid in pids {
                let Some(recs) = carried.get(&pid) else {
                    continue;
                };
                let recs: Vec<&PatchRecord> = recs.iter().filter(|r| &r.build_id == line).collect();
                let mut reverting = HashSet::new();
                for r in &recs {
                    if d.is_some_and(|d| d.sha == r.bundle_sha256) {
                        continue;
                    }
                    if !state.known.contains_key(&r.bundle_sha256) {
                        continue; // not ours to take back (applied by hand)
                    }
                    if d.is_some_and(|d| d.level() > r.level) {
                        continue; // the apply supersedes it in the same stop
                    }
                    let reason = match state.rolled_back.get(&r.id) {
                        Some(rb) => format!("rolled back: {}", rb.reason),
                        None if self.plan.verified.iter().any(|v| v.sha == r.bundle_sha256) => {
                            "no longer the desired level".to_string()
                        }
                        // The source cannot be read: what it offers is unknown, not empty.
                        None if !self.last_offer_ok => continue,
                        None => "withdrawn".to_string(),
                    };
                    if self.due(&r.bundle_sha256, pid, now) {
                        reverting.insert(r.bundle_sha256.clone());
                        out.entry(pid).or_default().push(Op::Revert {
                            id: r.id.clone(),
                            sha: r.bundle_sha256.clone(),
                            reason,
                        });
                    }
                }
                let (Some(i), Some(d)) = (desired, d) else {
                    continue;
                };
                if recs.iter().any(|r| r.bundle_sha256 == d.sha) {
                    self.tracked.remove(&(d.sha.clone(), pid));
                    continue;
                }
                if stale
                    .get(&pid)
                    .is_some_and(|v| v.iter().any(|r| &r.build_id == line))
                {
                    continue; // the engine would refuse: see note_stale
                }
                if let Some(r) = recs
                    .iter()
                    .find(|r| r.level >= d.level() && !reverting.contains(&r.bundle_sha256))
                {
                    if !state.known.contains_key(&r.bundle_sha256) {
                        let f = Failure {
                            pid,
                            kind: "refused".into(),
                            reason: format!(
                                "carries level {} ({}), applied outside the agent, which is not older",
                                r.level, r.id
                            ),
                        };
                        self.tracked.insert(
                            (d.sha.clone(), pid),
                            Tracked {
                                failure: f,
                                op: "apply",
                                start: start_time(pid),
                                next_try: now + Duration::from_secs(3600),
                                tries: 1,
                            },
                        );
                    }
                    continue;
                }
                if self.due(&d.sha, pid, now) {
                    out.entry(pid).or_default().push(Op::Apply(i));
                }
            }
        }
        out.into_iter().collect()
    }

    /// Records left by an interrupted apply: reported once per process as a failure of that
    /// bundle. The engine takes them for applied patches (it refuses to apply over them and
    /// cannot revert them), so the process needs a restart.
    fn note_stale(&mut self, stale: &BTreeMap<i32, Vec<PatchRecord>>) -> Result<()> {
        for (&pid, recs) in stale {
            for r in recs {
                let key = (r.bundle_sha256.clone(), pid);
                if self
                    .tracked
                    .get(&key)
                    .is_some_and(|t| t.failure.kind == "stale")
                {
                    continue;
                }
                let reason = format!(
                    "holds patch memory of {} without its detours (an apply was interrupted, the agent killed mid-operation?); it cannot be patched again until it restarts",
                    r.id
                );
                self.tracked.insert(
                    key,
                    Tracked {
                        failure: Failure {
                            pid,
                            kind: "stale".into(),
                            reason: reason.clone(),
                        },
                        op: "apply",
                        start: start_time(pid),
                        next_try: Instant::now() + Duration::from_secs(3600),
                        tries: 1,
                    },
                );
                self.append(Event::Failed {
                    id: r.id.clone(),
                    sha256: r.bundle_sha256.clone(),
                    pid,
                    op: "apply".into(),
                    kind: "stale".into(),
                    reason,
                })?;
            }
        }
        Ok(())
    }

    /// May (bundle, pid) be tried now (no failure, or its back-off is over)?
    fn due(&self, sha: &str, pid: i32, now: Instant) -> bool {
        match self.tracked.get(&(sha.to_string(), pid)) {
            None => true,
            Some(t) => t.next_try <= now,
        }
    }

    /// Runs the operations: one worker thread per pid at a time, every engine call for that
    /// pid whole on that thread; results are journaled as they come in.
    /// Returns the pids where an apply succeeded.
    fn execute(&mut self, ops: Vec<(i32, Vec<Op>)>) -> Vec<i32> {
        let mut applied = Vec::new();
        self.unsettled.clear();
        if ops.is_empty() {
            return applied;
        }
        let opts = ApplyOptions {
            timeout: self.s.op_timeout,
        };
        let verified = self.plan.verified.clone();
        let jobs = self.s.jobs.min(ops.len()).max(1);
        // How waits for a process give up the CPU on this host now (before our jobs run).
        suture_engine::stop::sense_host_load(3);
        let next = AtomicUsize::new(0);
        let (tx, rx) = std::sync::mpsc::channel::<(i32, Op, Result<Outcome, EngineError>)>();
        let stop = self.stop.clone();
        let ops = &ops;
        let verified = &verified;
        let opts = &opts;
        std::thread::scope(|scope| {
            for _ in 0..jobs {
                let tx = tx.clone();
                let next = &next;
                let stop = stop.clone();
                scope.spawn(move || loop {
                    // A shutdown lets the operation in progress finish and starts no new one.
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((pid, list)) = ops.get(i) else { break };
                    for op in list {
                        let r = match op {
                            Op::Apply(i) => match verified.get(*i) {
                                Some(v) => suture_engine::apply(*pid, &v.bundle, opts)
                                    .map(Outcome::Applied),
                                None => continue,
                            },
                            Op::Revert { id, .. } => {
                                suture_engine::revert(*pid, Some(id), opts).map(Outcome::Reverted)
                            }
                        };
                        let failed = r.is_err();
                        if tx.send((*pid, op.clone(), r)).is_err() || failed {
                            break; // the next operations on this pid depend on this one
                        }
                    }
                });
            }
            drop(tx);
            for (pid, op, r) in rx {
                if matches!(r, Ok(Outcome::Applied(_))) {
                    applied.push(pid);
                }
                if let Err(e) = self.record(pid, &op, r, verified) {
                    tracing::error!(pid, "cannot journal: {e:#}");
                }
            }
        });
        applied
    }

    fn record(
        &mut self,
        pid: i32,
        op: &Op,
        r: Result<Outcome, EngineError>,
        verified: &[Verified],
    ) -> Result<()> {
        let (id, sha, opname) = match op {
            Op::Apply(i) => match verified.get(*i) {
                Some(v) => (v.id().to_string(), v.sha.clone(), "apply"),
                None => return Ok(()),
            },
            Op::Revert { id, sha, .. } => (id.clone(), sha.clone(), "revert"),
        };
        match r {
            Ok(Outcome::Applied(rep)) => {
                self.tracked.remove(&(sha.clone(), pid));
                let v = verified.iter().find(|v| v.sha == sha);
                for r in &mut self.reports {
                    r.stopped(rep.stopped_us);
                }
                self.append(Event::Applied {
                    id: id.clone(),
                    sha256: sha.clone(),
                    level: rep.level,
                    build_id: v.map(|v| v.build_id().to_string()).unwrap_or_default(),
                    pid,
                    stopped_us: rep.stopped_us,
                })?;
                let w = self.watch.entry(pid).or_default();
                if let Some(old) = &rep.replaced {
                    w.retain(|w| &w.id != old);
                }
                w.push(Watched {
                    sha,
                    id: id.clone(),
                    applied_ms: now_ms(),
                });
                if let Some(old) = rep.replaced {
                    self.append(Event::Superseded {
                        id: old,
                        by: id,
                        pid,
                    })?;
                }
            }
            Ok(Outcome::Reverted(rep)) => {
                tracing::debug!(bundle = %id, pid, stopped_us = rep.stopped_us, "revert done");
                self.tracked.remove(&(sha.clone(), pid));
                if let Some(w) = self.watch.get_mut(&pid) {
                    w.retain(|w| w.sha != sha);
                }
                let reason = match op {
                    Op::Revert { reason, .. } => reason.clone(),
                    Op::Apply(_) => String::new(),
                };
                self.append(Event::Reverted {
                    id,
                    sha256: sha,
                    pid,
                    reason,
                })?;
            }
            Err(e) => {
                let kind = e.kind().to_string();
                // (A process that is gone before the engine even looked is refused as "no
                // process": it exited all the same.)
                if kind == "exited" || !Path::new(&format!("/proc/{pid}")).exists() {
                    self.tracked.remove(&(sha, pid));
                    return Ok(());
                }
                // A process seconds old may still be in its dynamic loader: the libraries
                // the patch binds to are not mapped yet (refused), or not relocated yet (a
                // call the engine injects faults: failed, and undone by the engine). Not a
                // failure to report; try again shortly.
                if (kind == "refused" || kind == "failed")
                    && opname == "apply"
                    && process_age(pid).is_some_and(|a| a < Duration::from_secs(2))
                {
                    tracing::debug!(bundle = %id, pid, "new process not ready: {e:#}");
                    self.unsettled.insert(pid);
                    return Ok(());
                }
                let key = (sha.clone(), pid);
                let prev = self.tracked.remove(&key);
                let tries = prev.as_ref().map(|t| t.tries + 1).unwrap_or(1);
                let same = prev
                    .as_ref()
                    .is_some_and(|t| t.failure.kind == kind && t.op == opname);
                // Busy clears by itself soon; a refusal (seccomp, layout) rarely does.
                let base = if kind == "refused" { 5 } else { 1 };
                let backoff = Duration::from_secs((base << tries.min(8)).min(600));
                let reason = format!("{e:#}").replace('\n', " ");
                self.tracked.insert(
                    key,
                    Tracked {
                        failure: Failure {
                            pid,
                            kind: kind.clone(),
                            reason: reason.clone(),
                        },
                        op: opname,
                        start: start_time(pid),
                        next_try: Instant::now() + backoff,
                        tries,
                    },
                );
                if !same {
                    self.append(Event::Failed {
                        id,
                        sha256: sha,
                        pid,
                        op: opname.to_string(),
                        kind,
                        reason,
                    })?;
                } else {
                    tracing::debug!(bundle = %id, pid, "{opname} failed again: {reason}");
                }
            }
        }
        Ok(())
    }

    /// The per-bundle status after a pass.
    /// `carried`: what each scanned process carries after this pass's operations.
    fn status_now(&mut self, carried: &BTreeMap<i32, Vec<PatchRecord>>) -> Status {
        let state = self.journal.state();
        let mut carriers: HashMap<String, usize> = HashMap::new();
        for records in carried.values() {
            for r in records {
                *carriers.entry(r.bundle_sha256.clone()).or_default() += 1;
            }
        }
        self.carriers = carriers;
        let failures_of = |sha: &str| -> Vec<Failure> {
            let mut f: Vec<Failure> = self
                .tracked
                .iter()
                .filter(|((s, _), _)| s == sha)
                .map(|(_, t)| t.failure.clone())
                .collect();
            f.sort_by_key(|f| f.pid);
            f
        };
        let mut bundles = Vec::new();
        for (i, v) in self.plan.verified.iter().enumerate() {
            let m = &v.bundle.manifest;
            let desired = self.plan.lines.get(v.build_id()).copied().flatten();
            let (st, reason) = if let Some(rb) = state.rolled_back.get(v.id()) {
                (BundleState::RolledBack, Some(rb.reason.clone()))
            } else if desired == Some(i) {
                (BundleState::Active, None)
            } else {
                let why = match (desired.and_then(|d| self.plan.verified.get(d)), state.highest.get(v.build_id())) {
                    (Some(d), _) if d.level() > v.level() => {
                        format!("level {} ({}) is newer", d.level(), d.id())
                    }
                    (_, Some((lvl, hid))) if *lvl > v.level() => format!(
                        "level {lvl} ({hid}) was applied before; an older level is never re-applied"
                    ),
                    _ => "a newer level of this module is rolled back; older levels are not re-applied".to_string(),
                };
                (BundleState::Superseded, Some(why))
            };
            bundles.push(BundleStatus {
                id: Some(m.id.clone()),
                level: Some(m.level),
                state: st,
                reason,
                processes: self.carriers.get(&v.sha).copied().unwrap_or(0),
                failures: failures_of(&v.sha),
                origin: Some(v.origin.clone()),
                sha256: Some(v.sha.clone()),
                build_id: Some(m.module.build_id.clone()),
                module: Some(m.module.name.clone()),
                cves: m.cves.clone(),
            });
        }
        for (origin, idl, reason) in &self.plan.refused {
            bundles.push(BundleStatus {
                id: idl.as_ref().map(|(id, _)| id.clone()),
                level: idl.as_ref().map(|(_, l)| *l),
                state: BundleState::Refused,
                reason: Some(reason.clone()),
                processes: 0,
                failures: Vec::new(),
                origin: Some(origin.clone()),
                sha256: None,
                build_id: None,
                module: None,
                cves: Vec::new(),
            });
        }
        // Bundles no longer offered: withdrawn, still shown while a process carries them,
        // while a revert fails, while rolled back, or when withdrawn during this run.
        let offered: HashSet<&String> = self.plan.verified.iter().map(|v| &v.sha).collect();
        let mut gone: Vec<(&String, &crate::journal::Known)> = state
            .known
            .iter()
            .filter(|(sha, _)| !offered.contains(sha))
            .collect();
        gone.sort_by(|a, b| (&a.1.id, a.0).cmp(&(&b.1.id, b.0)));
        for (sha, k) in gone {
            let n = self.carriers.get(sha).copied().unwrap_or(0);
            let failures = failures_of(sha);
            let rb = state.rolled_back.get(&k.id).filter(|r| &r.sha256 == sha);
            if n == 0 && failures.is_empty() && rb.is_none() && !self.withdrawn.contains(sha) {
                continue;
            }
            let (st, reason) = match rb {
                Some(r) => (BundleState::RolledBack, Some(r.reason.clone())),
                None => (
                    BundleState::Withdrawn,
                    Some("no longer offered by the bundle source".to_string()),
                ),
            };
            bundles.push(BundleStatus {
                id: Some(k.id.clone()),
                level: Some(k.level),
                state: st,
                reason,
                processes: n,
                failures,
                origin: None,
                sha256: Some(sha.clone()),
                build_id: Some(k.build_id.clone()),
                module: Some(k.module.clone()),
                cves: Vec::new(),
            });
        }
        Status {
            taken_ms: now_ms(),
            agent_pid: (!self.dry).then(std::process::id),
            process_events: (!self.dry).then_some(self.connector_up),
            gate: self.gate.as_ref().map(crate::gate::Gate::status),
            bundles,
        }
    }
}

/// What process `pid` carries, as the engine verifies it: patches whose detours are all in
/// place (live), and patches left partly applied by an interrupted operation (which the engine
/// refuses to build on until they are reverted). Orphaned patch memory blocks nothing: the
/// engine reclaims it on the next apply.
fn carried_by(pid: i32) -> Result<(Vec<PatchRecord>, Vec<PatchRecord>)> {
    split_carried(suture_engine::inspect(pid)?)
}

/// [`carried_by`] with the process's maps already read.
fn carried_in(
    pid: i32,
    maps: &[suture_engine::procfs::Mapping],
) -> Result<(Vec<PatchRecord>, Vec<PatchRecord>)> {
    split_carried(suture_engine::inspect_maps(pid, maps)?)
}

fn split_carried(
    found: Vec<suture_engine::FoundPatch>,
) -> Result<(Vec<PatchRecord>, Vec<PatchRecord>)> {
    let (mut live, mut stale) = (Vec::new(), Vec::new());
    for f in found {
        match (f.state, f.record) {
            (PatchState::Applied, Some(r)) => live.push(r),
            (PatchState::Partial, Some(r)) => stale.push(r),
            _ => {}
        }
    }
    Ok((live, stale))
}

/// The process's start time (clock ticks since boot): with the pid, it names one process
/// instance, so a reused pid is not mistaken for the old one.
pub fn start_time(pid: i32) -> Option<u64> {
    suture_engine::procfs::start_time(pid)
}

/// How long process `pid` has existed.
fn process_age(pid: i32) -> Option<Duration> {
    let ticks = start_time(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    if hz <= 0 {
        return None;
    }
    let started = ticks as f64 / hz as f64;
    Some(Duration::from_secs_f64((uptime - started).max(0.0)))
}

/// Runs `sh -c CMD`; `Err` carries why it failed (status, last line of stderr, timeout).
fn run_health_command(cmd: &str, timeout: Duration) -> std::result::Result<(), String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                if st.success() {
                    return Ok(());
                }
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                let last = err.lines().last().unwrap_or("").trim().to_string();
                return Err(if last.is_empty() {
                    format!("{st}")
                } else {
                    format!("{st}: {last}")
                });
            }
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    }
}

/// The files of a running agent in its state folder.
pub struct Lock {
    _file: std::fs::File,
    pid_path: PathBuf,
}

impl Lock {
    /// Takes the state folder for this agent (an exclusive `flock`, released by the kernel
    /// if the agent dies) and writes the pid file.
    pub fn take(state_dir: &Path) -> Result<Lock> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let path = state_dir.join("agent.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let other = std::fs::read_to_string(state_dir.join("agent.pid")).unwrap_or_default();
            anyhow::bail!(
                "another agent (pid {}) runs with state folder {}",
                other.trim(),
                state_dir.display()
            );
        }
        let pid_path = state_dir.join("agent.pid");
        std::fs::write(&pid_path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write {}", pid_path.display()))?;
        Ok(Lock {
            _file: file,
            pid_path,
        })
    }

    /// Is an agent running with this state folder?
    pub fn held(state_dir: &Path) -> bool {
        use std::os::fd::AsRawFd;
        let Ok(file) = std::fs::File::open(state_dir.join("agent.lock")) else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; released when `file` closes.
        let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
        !free
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pid_path);
    }
}

/// Sends process events to the controller from a thread of their own. Returns whether the
/// connector is up (without it, crashes are not seen and new processes wait for a pass).
pub fn spawn_connector(tx: Sender<Msg>) -> bool {
    let conn = match crate::procevents::Connector::open() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e:#}; crash rollback and fast patching of new processes are off");
            return false;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("proc-events".into())
        .spawn(move || {
            let mut events = Vec::new();
            loop {
                events.clear();
                match conn.recv(&mut events) {
                    Ok(()) => {
                        for e in events.drain(..) {
                            if tx.send(Msg::Proc(e)).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        if tx.send(Msg::EventsLost).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Msg::ConnectorDown(e.to_string()));
                        return;
                    }
                }
            }
        });
    spawned.is_ok()
}

/// Everything `suture agent run` does, from settings to shutdown.
pub fn run_agent(s: Settings) -> Result<()> {
    let _lock = Lock::take(&s.state_dir)?;
    if let Err(e) = std::fs::create_dir_all(&s.bundle_dir) {
        tracing::warn!(
            "cannot create bundle folder {}: {e}",
            s.bundle_dir.display()
        );
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let tx = tx.clone();
        let stop = stop.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])
        .context("cannot install signal handlers")?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(
                        signal = sig,
                        "shutting down after the operation in progress"
                    );
                    stop.store(true, Ordering::SeqCst);
                    let _ = tx.send(Msg::Shutdown);
                }
            })?;
    }
    let connector_up = spawn_connector(tx.clone());
    let mut reports: Vec<Box<dyn Report>> = vec![
        Box::new(crate::report::LogReport),
        Box::new(crate::report::StatusFile::new(&s.state_dir)),
    ];
    if let Some(addr) = s.metrics_addr {
        reports.push(Box::new(crate::metrics::Metrics::serve(addr)?));
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    let source = Box::new(crate::source::LocalDir::new(&s.bundle_dir));
    let wake = tx.clone();
    let watched = source.watch(Box::new(move || {
        let _ = wake.send(Msg::SourceChanged);
    }));
    if let Err(e) = watched {
        tracing::warn!("{e:#}: bundle changes are seen on the next pass");
    }
    let gate = crate::gate::Gate::start(
        tx.clone(),
        ApplyOptions {
            timeout: s.op_timeout,
        },
        s.hold_timeout,
        s.watch_paths.clone(),
    );
    let mut agent = Agent::new(s, source, reports, stop)?;
    match gate {
        Ok(g) => agent.set_gate(g),
        Err(e) => tracing::error!(
            "{e:#}: starting processes are patched right after they start, not before"
        ),
    }
    // `tx` lives as long as the loop: the channel never reports itself disconnected.
    let _tx = tx;
    let result = agent.run(rx, connector_up);
    // Processes held right now are finished (patched or let go), none left half-done.
    if let Some(gate) = agent.gate.take() {
        gate.close(Duration::from_secs(15));
    }
    result
}
