//! Apply and revert, as named phases. Each phase says what it changes in the process and how
//! it is undone; the fault-injection tests aim at the instants between them.
//!
//! ```text
//! apply:  prepare ──► map ──► commit ──► release
//! revert: prepare ──────────► commit ──► release
//! ```
//!
//! - **prepare** reads the bundle and the process (build-id, running bytes, symbols, a dry
//!   link, the gadgets injection will use) and refuses what it cannot patch whole (a vfork
//!   child sharing the memory, the module loaded twice). Nothing is stopped or changed.
//!   Undo: none.
//! - **map** stops one thread (one with room on its stack) and, through it, creates the patch
//!   memory: a memfd named after the patch, mapped privately and R-X next to the module, not
//!   inherited by `fork` yet. The image is written from outside, everything but code loses
//!   `PROT_EXEC`, unwind tables are registered, and the record written last (memory without a
//!   record is recognisably unfinished). Undo: unmap.
//! - **commit** stops every thread, waits until none is in (or returning into) code being
//!   bypassed, re-verifies the running bytes, makes the memory inheritable, and writes the
//!   detours. Undo: before the writes, the map phase's undo; a failed write puts back the ones
//!   written.
//! - **release** removes memory nothing runs any more: the superseded (or reverted) patch and
//!   patch memory that earlier interrupted operations left behind.
//!
//! Every injected step is safe against our own death (see [`crate::remote`]); an operator's
//! interrupt (SIGINT/SIGTERM/SIGHUP) is honoured between phases: before commit the operation
//! is undone, after it the operation finishes.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use serde::Serialize;
use sha2::{Digest, Sha256};
use suture_bundle::Bundle;
use suture_detour::{check_site, decode_jmp, encode_jmp, DETOUR_LEN};
use suture_link::{Plan, Prot, Resolved};
use tracing::{debug, info};

use crate::bind::{self, Symbols, UnwindRegistry};
use crate::modules::{self, LoadedModule};
use crate::procfs::{self, Mapping, Memory};
use crate::record::{self, Detour, FoundPatch, PatchRecord, PatchState, MEMFD_PREFIX};
use crate::remote::{self, Gadgets, Remote};
use crate::safety::{Checker, Guarded};
use crate::stop::{DidNotStop, ProcessExeced, ProcessGone, Session};
use crate::{fault, interrupt, lock, refused, EngineError};

const PAGE: u64 = 4096;
const MADV_DOFORK: u64 = 11;
const MADV_DONTFORK: u64 = 10;

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// How long to keep retrying while a thread is inside a function being replaced (and to
    /// wait for another operation on the same process).
    pub timeout: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub pid: i32,
    pub patch: String,
    pub level: u32,
    /// The lower level this one superseded, if the module carried one.
    pub replaced: Option<String>,
    pub functions: usize,
    pub threads: usize,
    /// Time in which any thread of the process was stopped (what a client of a one-thread
    /// server waits at most), microseconds: the map phase, the commit attempts and the
    /// release.
    pub stopped_us: u64,
    /// Time every thread was stopped at once (creating patch memory, every commit attempt).
    pub all_stopped_us: u64,
    /// The longest time one thread stayed stopped without running in between.
    pub longest_thread_stop_us: u64,
    /// Time one thread was stopped beforehand to map patch memory, microseconds.
    pub prep_us: u64,
    /// Time one thread was stopped afterwards to remove superseded memory, microseconds.
    pub release_us: u64,
    pub attempts: u32,
    pub base: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RevertReport {
    pub pid: i32,
    pub patch: String,
    pub level: u32,
    pub functions: usize,
    /// What the patch was before the revert (`applied`, `partial`, `orphaned`).
    pub was: &'static str,
    /// Time in which any thread was stopped (commit and release), microseconds.
    pub stopped_us: u64,
    /// Time every thread was stopped at once.
    pub all_stopped_us: u64,
    pub release_us: u64,
    pub attempts: u32,
}

type Result<T> = std::result::Result<T, EngineError>;

/// The patch memory's descriptor no longer named our memfd when every thread had stopped: a
/// thread of the process closed it and the number was reused. Nothing was done with it.
#[derive(Debug, thiserror::Error)]
#[error("process {pid} closed or reused descriptor {fd} of the patch memory while it was being made (a double close?); nothing was changed: try again")]
struct DescriptorReused {
    pid: i32,
    fd: u64,
}

/// Whether a `/proc/PID/fd` link names the memfd created as `name`.
fn names_memfd(link: &std::path::Path, name: &[u8]) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let link = link.as_os_str().as_bytes();
    let link = link.strip_suffix(b" (deleted)").unwrap_or(link);
    link.strip_prefix(b"/memfd:") == Some(name)
}

/// The true reason an operation on `pid` failed: the process went away or exec'ed, or `e`.
fn exited_or(pid: i32, e: anyhow::Error) -> EngineError {
    if let Some(x) = e.downcast_ref::<ProcessExeced>() {
        return EngineError::Exited(x.to_string());
    }
    if e.is::<ProcessGone>() || procfs::exited(pid) {
        return EngineError::Exited(ProcessGone { pid }.to_string());
    }
    if e.is::<remote::SeccompBlocks>() || e.is::<remote::ShadowStack>() {
        return EngineError::Refused(e.to_string());
    }
    let slow = e.is::<DidNotStop>() || e.is::<remote::SyscallTimedOut>();
    if slow && procfs::frozen(pid) {
        return frozen(pid);
    }
    if e.is::<DidNotStop>() || e.is::<DescriptorReused>() {
        return EngineError::Busy(e.to_string());
    }
    EngineError::Failed(e)
}

/// The process's `/proc/PID/stat` (read once per operation: it costs tens of microseconds)
/// and its lock.
fn frozen(pid: i32) -> EngineError {
    EngineError::Busy(format!(
        "process {pid} is frozen by its cgroup (a paused container?); nothing was changed: try \
         again once it is thawed"
    ))
}

fn take_lock(pid: i32, opts: &ApplyOptions) -> Result<(procfs::Stat, lock::ProcessLock)> {
    let stat = procfs::stat(pid).ok_or_else(|| refused(format!("no process {pid}")))?;
    let lock = lock::lock_process_started(pid, stat.start_time, opts.timeout)?
        .map_err(EngineError::Busy)?;
    Ok((stat, lock))
}

/// One function of the bundle, located in this process.
struct Target {
    symbol: String,
    address: u64,
    size: u64,
    replacement: String,
    /// The original first bytes (from the running code, or from the patch being superseded).
    saved: [u8; DETOUR_LEN],
    /// What the entry holds now (the original, or the superseded patch's detour).
    running_head: [u8; DETOUR_LEN],
    expected_sha256: String,
}

/// Everything the apply needs, read while the process runs untouched.
struct Prepared<'b> {
    pid: i32,
    bundle: &'b Bundle,
    maps: Vec<Mapping>,
    mem: Memory,
    module: LoadedModule,
    /// The lower level of this module the process verifiably carries.
    prev: Option<PatchRecord>,
    /// Patch memory no detour leads into (left by interrupted operations): removed on release.
    stale: Vec<FoundPatch>,
    targets: Vec<Target>,
    plan: Arc<Plan>,
    symbols: Symbols,
    unwind: Option<UnwindRegistry>,
    /// Every module of the process, for walking stacks in the commit phase.
    loaded: Vec<LoadedModule>,
    gadgets: Gadgets,
}

impl Prepared<'_> {
    fn stop_plan<'a>(&'a self, opts: &ApplyOptions) -> StopPlan<'a> {
        StopPlan {
            mem: &self.mem,
            maps: &self.maps,
            modules: &self.loaded,
            guarded: &[],
            timeout: opts.timeout,
            inject: None,
        }
    }
}

/// A failure that is really the process replacing its program: our handle on its memory
/// (opened before) reads nothing any more while the process lives on. (A thread that "did not
/// stop" may have been in the middle of that exec: busy is checked too.)
fn explain(pid: i32, mem: &Memory, maps: &[Mapping], e: EngineError) -> EngineError {
    if let EngineError::Failed(_) | EngineError::Busy(_) = e {
        let readable = maps.iter().filter(|m| m.readable).take(3);
        let mut probed = false;
        let mut any = false;
        for m in readable {
            probed = true;
            any |= mem.read(m.start, 1).is_ok();
        }
        if probed && !any && procfs::exists(pid) {
            return EngineError::Exited(ProcessExeced { pid }.to_string());
        }
    }
    e
}

/// Applies a bundle (whose signature the caller has verified) to process `pid`.
pub fn apply(pid: i32, bundle: &Bundle, opts: &ApplyOptions) -> Result<ApplyReport> {
    let m = &bundle.manifest;
    apply_unless_carried(pid, bundle, opts)?.ok_or_else(|| not_newer(pid, (m.level, &m.id), m))
}

/// The refusal of bundle `m` in a process that carries patch `carried` (level, id) of the same
/// module at a level as high or higher.
fn not_newer(pid: i32, (level, id): (u32, &str), m: &suture_bundle::Manifest) -> EngineError {
    refused(format!(
        "process {pid} already carries level {level} ({id}) of {}; level {} is not newer",
        m.module.name, m.level
    ))
}

/// [`apply`] for a process that may already carry this very bundle (`apply --all` run again):
/// then `None`, and the process is not touched. Decided on what apply reads anyway, so a host
/// of processes is not looked at twice.
pub fn apply_unless_carried(
    pid: i32,
    bundle: &Bundle,
    opts: &ApplyOptions,
) -> Result<Option<ApplyReport>> {
    let t = Instant::now();
    let (stat, _lock) = take_lock(pid, opts)?;
    let Some(p) = prepare(pid, bundle, &stat)? else {
        return Ok(None);
    };
    debug!(pid, us = t.elapsed().as_micros() as u64, "prepared");
    apply_prepared(&p, opts)
        .map(Some)
        .map_err(|e| explain(pid, &p.mem, &p.maps, e))
}

/// Phases map, commit and release of apply.
fn apply_prepared(p: &Prepared, opts: &ApplyOptions) -> Result<ApplyReport> {
    let pid = p.pid;
    if interrupt::requested() {
        return Err(EngineError::Interrupted(format!(
            "interrupted before process {pid} was touched"
        )));
    }
    let mut session = Session::seize(pid).map_err(|e| exited_or(pid, e))?;
    let report = apply_with(&mut session, p, opts)?;
    session.detach();
    Ok(report)
}

/// Applies a bundle to a process [`crate::hold`] holds (seized, its held thread stopped);
/// the process stays seized.
pub(crate) fn apply_held(
    session: &mut Session,
    bundle: &Bundle,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    let pid = session.pid();
    // (The holder owns the process lock.)
    let stat = procfs::stat(pid).ok_or_else(|| exited_or(pid, anyhow!("no process")))?;
    let m = &bundle.manifest;
    let p = prepare(pid, bundle, &stat)?.ok_or_else(|| not_newer(pid, (m.level, &m.id), m))?;
    session.seize_rest().map_err(|e| exited_or(pid, e))?;
    apply_with(session, &p, opts).map_err(|e| explain(pid, &p.mem, &p.maps, e))
}

/// Phases map, commit and release, in a seized process.
fn apply_with(session: &mut Session, p: &Prepared, opts: &ApplyOptions) -> Result<ApplyReport> {
    let (pid, bundle) = (p.pid, p.bundle);
    let threads = session.thread_count();
    let t_prep = Instant::now();
    let mapped = map(session, p)?;
    let prep_us = t_prep.elapsed().as_micros() as u64;
    debug!(
        pid,
        base = mapped.record.base,
        prep_us,
        "patch memory mapped"
    );
    fault::point("apply:mapped");
    if interrupt::requested() {
        undo_map(session, p, &mapped);
        return Err(EngineError::Interrupted(format!(
            "interrupted; process {pid} was left as it was"
        )));
    }
    let (commit_us, attempts, finish_us) = match commit(session, p, &mapped, opts) {
        Ok(v) => v,
        Err(e) => {
            undo_map(session, p, &mapped);
            return Err(e);
        }
    };
    fault::point("apply:committed");
    // The detours are live. What no detour leads to any more goes.
    let t_release = Instant::now();
    let mut gone: Vec<FoundPatch> = p.stale.clone();
    if let Some(prev) = &p.prev {
        if let Some(f) = record::found_patches(&p.mem, &p.maps)
            .into_iter()
            .find(|f| f.start == prev.base)
        {
            gone.push(f);
        }
    }
    release(
        session,
        p.stop_plan(opts),
        p.gadgets,
        &gone,
        mapped.landing,
        Then::Resume,
    );
    let release_us = if gone.is_empty() {
        0
    } else {
        t_release.elapsed().as_micros() as u64
    };
    let m = &bundle.manifest;
    let all_stopped_us = commit_us + mapped.stopped_us;
    // (The map phase's all-threads interval lies within prep.)
    let stopped_us = prep_us + commit_us + finish_us + release_us;
    let longest_thread_stop_us = prep_us
        .max(if attempts == 1 {
            commit_us + finish_us
        } else {
            finish_us
        })
        .max(release_us);
    info!(pid, patch = %m.id, level = m.level, stopped_us, all_stopped_us, "applied");
    Ok(ApplyReport {
        pid,
        patch: m.id.clone(),
        level: m.level,
        replaced: p.prev.as_ref().map(|p| p.id.clone()),
        functions: p.targets.len(),
        threads,
        stopped_us,
        all_stopped_us,
        longest_thread_stop_us,
        prep_us,
        release_us,
        attempts,
        base: mapped.record.base,
    })
}

/// Phase **prepare** of apply: nothing in the process is stopped or changed.
/// `None` when the process already carries this very bundle.
fn prepare<'b>(pid: i32, bundle: &'b Bundle, stat: &procfs::Stat) -> Result<Option<Prepared<'b>>> {
    let m = &bundle.manifest;
    let build_id =
        hex::decode(&m.module.build_id).map_err(|_| refused("bundle names an invalid build-id"))?;
    let dir = procfs::memory_dir_of(pid, stat).ok_or_else(|| {
        EngineError::Exited(format!("process {pid} has exited (no thread of it runs)"))
    })?;
    refuse_unstoppable(pid, stat)?;
    let maps = procfs::read_maps(pid).map_err(|e| exited_or(pid, e))?;
    let module = modules::find_by_build_id(pid, &maps, &build_id).ok_or_else(|| {
        refused(format!(
            "process {pid} does not map module {} with build-id {}",
            m.module.name, m.module.build_id
        ))
    })?;
    let copies = modules::copies_of_module(pid, &maps, &module);
    if copies.len() > 1 {
        return Err(refused(format!(
            "process {pid} has module {} loaded {} times (at {}: a copy of the file under another \
             path, or a second dlmopen namespace), each with its own code; patching one would \
             leave the others running the old code, and suture patches one copy per process: \
             not touched",
            m.module.name,
            copies.len(),
            copies
                .iter()
                .map(|b| format!("{b:#x}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mem = Memory::open_at(pid, dir).map_err(|e| exited_or(pid, e))?;
    match prepare_with(pid, bundle, &module, &maps, &mem) {
        Ok(None) => Ok(None),
        Ok(Some(parts)) => Ok(Some(Prepared {
            pid,
            bundle,
            maps,
            mem,
            module,
            prev: parts.0,
            stale: parts.1,
            targets: parts.2,
            plan: parts.3,
            symbols: parts.4,
            unwind: parts.5,
            loaded: parts.6,
            gadgets: parts.7,
        })),
        Err(e) => Err(explain(pid, &mem, &maps, e)),
    }
}

/// Busy while the process cannot be stopped whole: frozen by its cgroup, or sharing its memory
/// with another process (a `vfork` child that has not exec'd), whose threads run code our stops
/// do not cover. Both pass: the process is thawed, the child execs or exits.
fn refuse_unstoppable(pid: i32, stat: &procfs::Stat) -> Result<()> {
    // A frozen process's threads sleep uninterruptibly: no stop would come before the
    // deadline. (Asked only then: the check reads cgroup files.)
    // (A v2 freezer leaves them asleep: that is found when a stop or a call does not come.)
    if stat.state == 'D' && procfs::frozen(pid) {
        return Err(frozen(pid));
    }
    match procfs::memory_sharer_of(pid, stat) {
        None => Ok(()),
        Some(sharer) => Err(EngineError::Busy(format!(
            "{}: the two share one memory, so it was not touched; retry once the child has \
             exec'd or exited",
            sharer.describe(pid)
        ))),
    }
}

type PreparedParts = (
    Option<PatchRecord>,
    Vec<FoundPatch>,
    Vec<Target>,
    Arc<Plan>,
    Symbols,
    Option<UnwindRegistry>,
    Vec<LoadedModule>,
    Gadgets,
);

fn prepare_with(
    pid: i32,
    bundle: &Bundle,
    module: &LoadedModule,
    maps: &[Mapping],
    mem: &Memory,
) -> Result<Option<PreparedParts>> {
    let m = &bundle.manifest;
    let found = record::found_patches(mem, maps);
    let mine = |f: &&FoundPatch| {
        f.record
            .as_ref()
            .is_some_and(|r| r.build_id == m.module.build_id)
    };
    if let Some(f) = found
        .iter()
        .filter(mine)
        .find(|f| f.state == PatchState::Partial)
    {
        return Err(refused(format!(
            "process {pid} carries patch {} only partly ({}); revert it first",
            f.name,
            f.reason.as_deref().unwrap_or("")
        )));
    }
    let prev = found
        .iter()
        .filter(mine)
        .filter(|f| f.state == PatchState::Applied)
        .filter_map(|f| f.record.clone())
        .max_by_key(|r| r.level);
    if let Some(p) = &prev {
        if p.bundle_sha256 == bundle.content_address() {
            return Ok(None);
        }
        if m.level <= p.level {
            return Err(not_newer(pid, (p.level, &p.id), m));
        }
    }
    let stale: Vec<FoundPatch> = found
        .into_iter()
        .filter(|f| f.state == PatchState::Orphaned)
        .collect();

    let plan = parsed_plan(&bundle.object)?;
    let defined = plan.defined_symbols();
    let targets = locate_functions(mem, module, bundle, prev.as_ref(), &defined)?;
    let symbols = bind::resolve_bindings(pid, maps, module, bundle, &plan)?;
    // Dry link: unresolved symbols and impossible relocations are refused before any stop.
    let probe_base = module.lo.saturating_sub(plan.size() + 16 * PAGE) & !(PAGE - 1);
    plan.link(probe_base, &|name| symbols.lookup(name))
        .map_err(|e| refused(format!("patch cannot be linked into process {pid}: {e}")))?;
    // Read before anything stops: the libraries' symbols take a millisecond (their unwind
    // tables are read only if a stack points into the code being patched).
    let loaded = bind::search_order(pid, maps);
    let unwind = if plan.has_eh_frame() {
        bind::unwind_registry(&loaded)
    } else {
        None
    };
    let gadgets = remote::find_gadgets(mem, maps).map_err(|e| exited_or(pid, e))?;
    Ok(Some((
        prev, stale, targets, plan, symbols, unwind, loaded, gadgets,
    )))
}

/// The patch object parsed for linking, once per object however many processes it goes to
/// (`apply --all`, the agent): the same bytes always parse to the same plan.
fn parsed_plan(object: &[u8]) -> Result<Arc<Plan>> {
    type Plans = Mutex<Vec<(Vec<u8>, Arc<Plan>)>>;
    static PLANS: OnceLock<Plans> = OnceLock::new();
    let plans = PLANS.get_or_init(Default::default);
    let known = |plans: &Plans| {
        let list = plans.lock().unwrap_or_else(PoisonError::into_inner);
        list.iter()
            .find(|(o, _)| o == object)
            .map(|(_, p)| p.clone())
    };
    if let Some(plan) = known(plans) {
        return Ok(plan);
    }
    let plan = Arc::new(
        Plan::new(object).map_err(|e| refused(format!("patch object cannot be loaded: {e}")))?,
    );
    let mut list = plans.lock().unwrap_or_else(PoisonError::into_inner);
    if list.len() >= 8 {
        list.remove(0); // a handful of bundles at a time is what a host deploys
    }
    list.push((object.to_vec(), plan.clone()));
    Ok(plan)
}

/// What the map phase made.
struct Mapped {
    record: PatchRecord,
    /// Time every thread was stopped while the memory was created, microseconds.
    stopped_us: u64,
    /// The landing stub of function calls, in the patch's engine page.
    landing: u64,
}

/// Phase **map**: one thread stopped; patch memory created, filled and registered. On error,
/// whatever it mapped is gone again.
fn map(session: &mut Session, p: &Prepared) -> Result<Mapped> {
    let pid = p.pid;
    let mut remote = take_injector(session, &p.mem, &p.maps, p.gadgets)?;
    let result = map_with(session, &mut remote, p);
    let finished = remote.finish(session, &p.mem);
    session.resume(None);
    let mapped = result?;
    finished.map_err(|e| exited_or(pid, e))?;
    Ok(mapped)
}

/// Stops the thread to act through and lays its frame; a thread whose stack has no room for
/// the frame (one made with a small stack) is let go and the next quietest is taken.
fn take_injector(
    session: &mut Session,
    mem: &Memory,
    maps: &[Mapping],
    gadgets: Gadgets,
) -> Result<Remote> {
    let pid = session.pid();
    loop {
        let tid = session.injection_thread().ok_or_else(|| {
            exited_or(
                pid,
                anyhow!("no thread with room on its stack to act through"),
            )
        })?;
        session.stop_thread(tid).map_err(|e| exited_or(pid, e))?;
        if session.job_stopped(tid) {
            // Nothing may run in it (injected calls would), and nothing of it runs the old
            // code meanwhile: patch it once it runs again.
            session.resume(None);
            return Err(EngineError::Busy(format!(
                "process {pid} is stopped (SIGSTOP or job control); it was not touched: try \
                 again once it is continued"
            )));
        }
        match Remote::new(session, tid, mem, maps, gadgets) {
            Err(e) if e.is::<remote::NoRoom>() => {
                debug!(pid, tid, "no room on the thread's stack; taking another");
                session.resume(None);
                session.pass_over(tid);
            }
            r => return r.map_err(|e| exited_or(pid, e)),
        }
    }
}

fn map_with(session: &mut Session, remote: &mut Remote, p: &Prepared) -> Result<Mapped> {
    let pid = p.pid;
    let m = &p.bundle.manifest;
    let ex = |e: anyhow::Error| exited_or(pid, e);
    let mut record = PatchRecord {
        id: m.id.clone(),
        level: m.level,
        bundle_sha256: p.bundle.content_address(),
        build_id: m.module.build_id.clone(),
        module: p.module.path.clone(),
        cves: m.cves.clone(),
        applied_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        signer: p.bundle.signer.fingerprint(),
        base: u64::MAX,
        len: u64::MAX,
        text_start: u64::MAX,
        text_end: u64::MAX,
        landing: u64::MAX,
        functions: p
            .targets
            .iter()
            .map(|t| Detour {
                symbol: t.symbol.clone(),
                address: t.address,
                size: t.size,
                replacement: u64::MAX,
                saved: hex::encode(t.saved),
            })
            .collect(),
        eh_frame: if p.unwind.is_some() { u64::MAX } else { 0 },
        eh_object: if p.unwind.is_some() { u64::MAX } else { 0 },
    };
    // The maximum values stand in so the header is sized for the real ones.
    let header_len = (record.encode()?.len() as u64).div_ceil(PAGE) * PAGE;
    // header (R) | image (R, R-X, RW) | unwinder's page (RW) | engine page (R-X, landing stub):
    // the header joins the image's read-only data and the unwinder's page its data, so only
    // two runs of pages lose execute permission (two `mprotect`s in the target).
    let image_at = header_len;
    let unwind_at = image_at + p.plan.size();
    let engine_at = unwind_at + if p.unwind.is_some() { PAGE } else { 0 };
    let total = engine_at + PAGE;

    let t_map = Instant::now();
    let step = |what: &str| debug!(pid, us = t_map.elapsed().as_micros() as u64, "map: {what}");
    let mut name: Vec<u8> = format!("{MEMFD_PREFIX}{}", record.id).into_bytes();
    name.truncate(240);
    name.push(0);
    let fd = remote
        .syscall_with_data(
            session,
            &p.mem,
            &p.maps,
            libc::SYS_memfd_create,
            &name,
            &[libc::MFD_CLOEXEC as u64],
        )
        .map_err(ex)?;
    let fd = remote.check("memfd_create", fd).map_err(ex)?;
    fault::point("apply:memfd");
    step("memfd created");
    // The descriptor is the target's: it sizes and maps it itself, with its own rights. We
    // never open it; the contents go into the private mapping through /proc/PID/mem.
    // Every thread stops before the descriptor is used: one that closed a descriptor it did
    // not own (a double `close`) and opened a file in its place would otherwise have that file
    // sized, mapped or closed by us. Stopped, nothing of the process can change its
    // descriptor table; we check that `fd` is still ours, then size, map and close it. And
    // between mmap and madvise the memory would be inherited by a fork: no thread may run in
    // that window either. (No flag of mmap sets VM_DONTCOPY.)
    let all_stopped = Instant::now();
    let mut ours = false;
    let placed = (|| -> anyhow::Result<Option<u64>> {
        session.stop_all()?;
        // Through the injecting thread: a main thread that exited shows no descriptors.
        let link = std::fs::read_link(format!("/proc/{pid}/task/{}/fd/{fd}", remote.tid())).ok();
        ours = link.is_some_and(|l| names_memfd(&l, &name[..name.len() - 1]));
        if !ours {
            return Err(anyhow::Error::new(DescriptorReused { pid, fd }));
        }
        let ret = remote.syscall(session, &p.mem, &p.maps, libc::SYS_ftruncate, &[fd, total])?;
        remote.check("ftruncate of the patch memfd", ret)?;
        step("sized");
        // Places free in the maps read before anything stopped; if the process has mapped
        // something at each since (the kernel refuses with EEXIST), places in fresh maps.
        let place = |maps: &[Mapping]| {
            crate::placement::candidates(
                maps,
                p.module.lo,
                p.module.hi,
                total,
                p.plan.needs_low_address(),
            )
            .into_iter()
            .take(8)
        };
        for round in 0..2 {
            let candidates: Vec<u64> = if round == 0 {
                place(&p.maps).collect()
            } else {
                place(&procfs::read_maps(pid)?).collect()
            };
            for base in candidates {
                let ret = remote.syscall(
                    session,
                    &p.mem,
                    &p.maps,
                    libc::SYS_mmap,
                    &[
                        base,
                        total,
                        (libc::PROT_READ | libc::PROT_EXEC) as u64,
                        (libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE) as u64,
                        fd,
                        0,
                    ],
                )?;
                if ret == -(libc::EEXIST as i64) {
                    continue; // someone mapped there meanwhile: next candidate
                }
                let got = remote.check("mmap of patch memory", ret)?;
                if got != base {
                    let _ =
                        remote.syscall(session, &p.mem, &p.maps, libc::SYS_munmap, &[got, total]);
                    anyhow::bail!("kernel placed patch memory at {got:#x}, not at {base:#x}");
                }
                fault::point("apply:mmapped");
                // Not inherited by a fork until the detours are live (commit): a child forked
                // before must come out clean, not carrying unused patch memory.
                let ret = remote.syscall(
                    session,
                    &p.mem,
                    &p.maps,
                    libc::SYS_madvise,
                    &[base, total, MADV_DONTFORK],
                )?;
                if let Err(e) = remote.check("madvise(MADV_DONTFORK) of patch memory", ret) {
                    let _ =
                        remote.syscall(session, &p.mem, &p.maps, libc::SYS_munmap, &[base, total]);
                    return Err(e);
                }
                return Ok(Some(base));
            }
        }
        Ok(None)
    })();
    // Closed while nothing else runs (see above); a descriptor that is not ours is left alone.
    let closed = if ours {
        remote
            .syscall(session, &p.mem, &p.maps, libc::SYS_close, &[fd])
            .map(|_| ())
    } else {
        Ok(())
    };
    // The other threads run again as soon as the memory cannot be inherited.
    session.resume(Some(remote.tid()));
    step("mapped, uninheritable");
    let all_stopped_us = all_stopped.elapsed().as_micros() as u64;
    let base = match placed.map_err(ex)? {
        Some(b) => b,
        None => {
            return Err(refused(format!(
                "no free address range within ±2 GiB of {} for {total} bytes of patch",
                p.module.path
            )))
        }
    };
    record.base = base;
    record.len = total;
    let mut registered = false;
    let mut registering = false;
    let filled = (|| -> anyhow::Result<()> {
        closed?;
        let landing = base + engine_at;
        p.mem.write(landing, &remote::LANDING)?;
        remote.set_landing(landing);
        record.landing = landing;
        step("engine page");
        // GNU indirect functions: their resolvers choose the implementation in the process.
        let mut symbols = Symbols {
            known: p.symbols.known.clone(),
            ifuncs: Vec::new(),
        };
        for (name, resolver) in &p.symbols.ifuncs {
            let addr = remote.call(session, &p.mem, &p.maps, *resolver, &[])?;
            symbols.known.insert(name.clone(), Resolved::Address(addr));
        }
        fault::point("apply:resolved");
        step("ifuncs resolved");
        let image = p
            .plan
            .link(base + image_at, &|n| symbols.lookup(n))
            .map_err(|e| anyhow!("patch cannot be linked: {e}"))?;
        let text = image
            .segments
            .iter()
            .find(|s| matches!(s.prot, Prot::ReadExecute));
        record.text_start = base + image_at + text.map(|s| s.offset).unwrap_or(0);
        record.text_end = record.text_start + text.map(|s| s.len).unwrap_or(0);
        if p.unwind.is_some() {
            record.eh_frame = image.eh_frame.unwrap_or(0);
            record.eh_object = base + unwind_at;
        }
        for (d, t) in record.functions.iter_mut().zip(&p.targets) {
            d.replacement = *image
                .symbols
                .get(&t.replacement)
                .ok_or_else(|| anyhow!("patch object does not define `{}`", t.replacement))?;
        }
        p.mem.write(base + image_at, &image.bytes)?;
        step("linked, written");
        // Mapped R-X as a whole: systemd's MemoryDenyWriteExecute= and prctl(PR_SET_MDWE)
        // forbid adding PROT_EXEC to a mapping, not mapping one R-X. Everything that is not
        // code now loses it: the header read-only, data read-write (never both W and X).
        let pages = total.div_ceil(PAGE) as usize;
        let mut prot = vec![Prot::Read; pages];
        let mut set = |offset: u64, len: u64, p: Prot| {
            let first = (offset / PAGE) as usize;
            let last = (offset + len).div_ceil(PAGE) as usize;
            for slot in prot.iter_mut().take(last.min(pages)).skip(first) {
                *slot = p;
            }
        };
        for seg in &image.segments {
            set(image_at + seg.offset, seg.len, seg.prot);
        }
        if p.unwind.is_some() {
            set(unwind_at, PAGE, Prot::ReadWrite);
        }
        set(engine_at, PAGE, Prot::ReadExecute);
        let mut page = 0;
        while page < pages {
            let run = prot[page..]
                .iter()
                .take_while(|&&q| q == prot[page])
                .count();
            let flags = match prot[page] {
                Prot::ReadExecute => None,
                Prot::Read => Some(libc::PROT_READ),
                Prot::ReadWrite => Some(libc::PROT_READ | libc::PROT_WRITE),
            };
            if let Some(flags) = flags {
                let ret = remote.syscall(
                    session,
                    &p.mem,
                    &p.maps,
                    libc::SYS_mprotect,
                    &[base + page as u64 * PAGE, run as u64 * PAGE, flags as u64],
                )?;
                remote.check("mprotect of patch memory", ret)?;
            }
            page += run;
        }
        step("protections set");
        // The record before the unwind tables are registered: memory without a record was
        // never registered anywhere, so it can always be unmapped.
        p.mem.write(base, &record.encode()?)?;
        // Exceptions and thread cancellation must be able to unwind through the new code.
        if let Some(u) = p.unwind {
            registering = true;
            remote
                .call(
                    session,
                    &p.mem,
                    &p.maps,
                    u.register,
                    &[record.eh_frame, record.eh_object],
                )
                .map_err(|e| e.context("registering the patch's unwind tables"))?;
            registered = true;
            step("unwind tables registered");
        }
        Ok(())
    })();
    match filled {
        Ok(()) => Ok(Mapped {
            landing: record.landing,
            stopped_us: all_stopped_us,
            record,
        }),
        Err(e) => {
            let err = exited_or(pid, e);
            // A registration that did not finish may or may not have happened: libgcc aborts
            // the process on deregistering what it does not know, and would read freed memory
            // if we unmapped what it knows. Such memory stays (unreachable, reported).
            if !matches!(err, EngineError::Exited(_)) && (registered || !registering) {
                remove_memory(
                    session,
                    remote,
                    p,
                    base,
                    total,
                    registered.then_some(record.eh_frame),
                );
            }
            Err(err)
        }
    }
}

/// Undoes the map phase: deregisters the unwind tables and unmaps, through a fresh remote.
fn undo_map(session: &mut Session, p: &Prepared, mapped: &Mapped) {
    let found = FoundPatch {
        state: PatchState::Orphaned,
        reason: None,
        name: mapped.record.id.clone(),
        start: mapped.record.base,
        end: mapped.record.base + mapped.record.len,
        detours_in_place: 0,
        record: Some(mapped.record.clone()),
    };
    if procfs::exists(p.pid) {
        // Nothing ran in the new memory (no detour was written): no thread to wait for there.
        let plan = StopPlan {
            guarded: &[],
            ..p.stop_plan(&ApplyOptions::default())
        };
        let mut f = found;
        if let Some(r) = f.record.as_mut() {
            r.text_end = r.text_start;
        }
        // Memory that earlier interrupted operations left goes too: nothing leads into it.
        let mut gone = vec![f];
        gone.extend(p.stale.iter().cloned());
        release(
            session,
            plan,
            p.gadgets,
            &gone,
            mapped.landing,
            Then::Resume,
        );
    }
}

/// Unmaps patch memory through `remote` (deregistering its unwind tables first); failing
/// that, it stays mapped: unreachable, and reclaimed by the next operation.
fn remove_memory(
    session: &mut Session,
    remote: &mut Remote,
    p: &Prepared,
    base: u64,
    len: u64,
    eh_frame: Option<u64>,
) {
    let result = (|| -> anyhow::Result<()> {
        if let (Some(eh), Some(u)) = (eh_frame, p.unwind) {
            remote.call(session, &p.mem, &p.maps, u.deregister, &[eh])?;
        }
        let ret = remote.syscall(session, &p.mem, &p.maps, libc::SYS_munmap, &[base, len])?;
        remote.check("munmap", ret).map(|_| ())
    })();
    if let Err(e) = result {
        tracing::warn!(pid = p.pid, "patch memory at {base:#x} stays mapped: {e:#}");
    }
}

/// Phase **commit** of apply: every thread stopped, detours written. Returns the stopped time
/// and the number of attempts. On error nothing of the process's code was changed.
/// Returns (all-threads stopped µs, attempts, µs the injection thread stayed stopped after).
fn commit(
    session: &mut Session,
    p: &Prepared,
    mapped: &Mapped,
    opts: &ApplyOptions,
) -> Result<(u64, u32, u64)> {
    let rec = &mapped.record;
    let mut writes: Vec<Write> = Vec::new();
    for (t, d) in p.targets.iter().zip(&rec.functions) {
        let jmp = encode_jmp(t.address, d.replacement).map_err(|e| refused(e.to_string()))?;
        writes.push(Write {
            address: t.address,
            bytes: jmp.to_vec(),
            before: t.running_head.to_vec(),
        });
    }
    let guarded: Vec<Guarded> = p
        .targets
        .iter()
        .map(|t| Guarded {
            name: t.symbol.clone(),
            start: t.address,
            end: t.address + t.size,
            entry_is_safe: true,
        })
        .collect();
    if let Some(prev) = &p.prev {
        // The superseded patch's code may still be running after this: its memory goes only
        // on release, once no thread is in it.
        for d in prev
            .functions
            .iter()
            .filter(|d| !p.targets.iter().any(|t| t.address == d.address))
        {
            writes.push(restore_write(d)?);
        }
    }
    privatize(&p.mem, &writes)?;
    let plan = StopPlan {
        guarded: &guarded,
        ..p.stop_plan(opts)
    };
    let mut pending = None;
    let plan = StopPlan {
        inject: Some(p.gadgets),
        ..plan
    };
    let result = stop_and_write(session, plan, &mut pending, |session, mem, remote| {
        // Re-verify under the stop: nothing may have changed since we looked.
        let codes = read_functions(mem, &p.targets)?;
        for (t, code) in p.targets.iter().zip(codes) {
            verify_code(t, code, p.prev.as_ref()).map_err(EngineError::Refused)?;
        }
        // From now on a fork's child carries the detours, so it must carry their code too.
        madvise(
            session,
            mem,
            &p.maps,
            remote,
            (rec.base, rec.len),
            MADV_DOFORK,
        )?;
        fault::point("apply:inheritable");
        write_all(mem, &writes)?;
        // Releasing superseded or stale memory needs every thread once more.
        Ok(if p.stale.is_empty() && p.prev.is_none() {
            Then::LetGo
        } else {
            Then::Resume
        })
    });
    let then = result.as_ref().map_or(Then::Resume, |r| r.3);
    let t_finish = Instant::now();
    let finished = finish_pending(session, &p.mem, pending, then);
    let finish_us = t_finish.elapsed().as_micros() as u64;
    let (stopped, attempts, alone, _) = result?;
    finished?;
    Ok((stopped, attempts, finish_us + alone))
}

/// Changes whether `fork` children inherit the patch memory, through the remote the stop laid
/// (only the system call itself counts in the all-threads stop).
fn madvise(
    session: &mut Session,
    mem: &Memory,
    maps: &[Mapping],
    remote: Option<&mut Remote>,
    (base, len): (u64, u64),
    advice: u64,
) -> Result<()> {
    let pid = session.pid();
    let r = remote.ok_or_else(|| exited_or(pid, anyhow!("no thread to act through")))?;
    let ret = r
        .syscall(session, mem, maps, libc::SYS_madvise, &[base, len, advice])
        .map_err(|e| exited_or(pid, e))?;
    r.check("madvise of patch memory", ret)
        .map(|_| ())
        .map_err(|e| exited_or(pid, e))
}

/// Puts the thread a [`madvise`] used back in its own state and lets everyone run; after
/// [`Then::LetGo`] that thread stays stopped for what comes next (a release through it, the
/// detach), which then needs no stop of its own.
fn finish_pending(
    session: &mut Session,
    mem: &Memory,
    pending: Option<Remote>,
    then: Then,
) -> Result<()> {
    let pid = session.pid();
    let finished = pending.map_or(Ok(()), |r| r.finish(session, mem));
    if then == Then::Resume {
        session.resume(None);
    }
    finished.map_err(|e| exited_or(pid, e))
}

/// Phase **release**: removes patch memory that nothing leads into any more, once no thread
/// is executing in it or would return into it (all threads stopped to check, retried with
/// back-off until `timeout`), then through one stopped thread (with the landing stub at
/// `landing` for unwind-table calls). Failures only leave memory mapped (unreachable, reported
/// as orphaned and reclaimed by the next operation); they are logged.
fn release(
    session: &mut Session,
    plan: StopPlan,
    gadgets: Gadgets,
    gone: &[FoundPatch],
    landing: u64,
    then: Then,
) {
    if gone.is_empty() {
        return;
    }
    let pid = session.pid();
    let (mem, maps, loaded) = (plan.mem, plan.maps, plan.modules);
    fault::point("release:start");
    // After Then::LetGo the caller's stop has found no thread in the code.
    let guarded = match then {
        Then::LetGo => Vec::new(),
        Then::Resume => code_of(gone),
    };
    let result = (|| -> anyhow::Result<()> {
        if !guarded.is_empty() {
            let plan = StopPlan {
                guarded: &guarded,
                ..plan
            };
            stop_and_write(session, plan, &mut None, |_, _, _| Ok(Then::Resume))
                .map_err(|e| anyhow!("{e}"))?;
        }
        let mut r = take_injector(session, mem, maps, gadgets).map_err(|e| anyhow!("{e}"))?;
        if landing != 0 {
            r.set_landing(landing);
        }
        for f in gone {
            let eh = f.record.as_ref().map(|r| r.eh_frame).unwrap_or(0);
            let step = (|| -> anyhow::Result<()> {
                if eh != 0 {
                    // Registered with the process's unwinder: deregister first, or it would read
                    // freed memory at the next exception.
                    let registry = bind::unwind_registry(loaded)
                        .ok_or_else(|| anyhow!("the process's unwinder (libgcc_s) is gone"))?;
                    r.call(session, mem, maps, registry.deregister, &[eh])
                        .map_err(|e| e.context("deregistering the patch's unwind tables"))?;
                }
                let ret = r.syscall(
                    session,
                    mem,
                    maps,
                    libc::SYS_munmap,
                    &[f.start, f.end - f.start],
                )?;
                r.check("munmap of patch memory", ret).map(|_| ())
            })();
            if let Err(e) = step {
                tracing::warn!(pid, "patch memory {} stays mapped: {e:#}", f.name);
            }
        }
        r.finish(session, mem)?;
        if then == Then::Resume {
            session.resume(None);
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(pid, "releasing patch memory: {e:#}");
    }
}

/// The code of patches about to go: no thread may be in it or return into it.
fn code_of(gone: &[FoundPatch]) -> Vec<Guarded> {
    gone.iter()
        .filter_map(|f| f.record.as_ref())
        .filter(|r| r.text_end > r.text_start)
        .map(|r| Guarded {
            name: format!("code of patch {}", r.id),
            start: r.text_start,
            end: r.text_end,
            entry_is_safe: false,
        })
        .collect()
}

/// Reverts patch `id` (default: the newest applied) in process `pid`. A patch left partly
/// applied or orphaned by an interrupted operation is cleaned up the same way.
pub fn revert(pid: i32, id: Option<&str>, opts: &ApplyOptions) -> Result<RevertReport> {
    let (stat, _lock) = take_lock(pid, opts)?;
    let dir = procfs::memory_dir_of(pid, &stat).ok_or_else(|| {
        EngineError::Exited(format!("process {pid} has exited (no thread of it runs)"))
    })?;
    refuse_unstoppable(pid, &stat)?;
    let maps = procfs::read_maps(pid).map_err(|e| exited_or(pid, e))?;
    let mem = Memory::open_at(pid, dir).map_err(|e| exited_or(pid, e))?;
    revert_in(pid, id, opts, &maps, &mem).map_err(|e| explain(pid, &mem, &maps, e))
}

fn revert_in(
    pid: i32,
    id: Option<&str>,
    opts: &ApplyOptions,
    maps: &[Mapping],
    mem: &Memory,
) -> Result<RevertReport> {
    let maps = maps.to_vec();
    let found = record::found_patches(mem, &maps);
    let f = match id {
        Some(id) => found.iter().find(|f| f.name == id),
        None => found
            .iter()
            .filter(|f| f.state == PatchState::Applied)
            .max_by_key(|f| f.record.as_ref().map(|r| (r.applied_at, r.level))),
    }
    .cloned()
    .ok_or_else(|| match id {
        Some(id) => refused(format!("process {pid} does not carry patch {id}")),
        None if found.is_empty() => refused(format!("process {pid} carries no patch")),
        None => refused(format!(
            "process {pid} carries no applied patch ({}); name one to remove it",
            found
                .iter()
                .map(|f| format!(
                    "{} is {}: {}",
                    f.name,
                    f.state.as_str(),
                    f.reason.as_deref().unwrap_or("")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    })?;
    if f.state == PatchState::Invalid {
        return Err(refused(format!(
            "patch memory {} in process {pid} does not match its record ({}); not touching it",
            f.name,
            f.reason.as_deref().unwrap_or("")
        )));
    }
    let mut writes = Vec::new();
    if let Some(rec) = &f.record {
        for d in &rec.functions {
            let now = mem.read(d.address, DETOUR_LEN).unwrap_or_default();
            if decode_jmp(d.address, &now) == Some(d.replacement) {
                writes.push(restore_write(d)?);
            }
        }
    }
    let loaded = bind::search_order(pid, &maps);
    let gadgets = remote::find_gadgets(mem, &maps).map_err(|e| exited_or(pid, e))?;
    if interrupt::requested() {
        return Err(EngineError::Interrupted(format!(
            "interrupted before process {pid} was touched"
        )));
    }
    let plan = StopPlan {
        mem,
        maps: &maps,
        modules: &loaded,
        guarded: &[],
        timeout: opts.timeout,
        inject: None,
    };
    let mut session = Session::seize(pid).map_err(|e| exited_or(pid, e))?;
    let (all_stopped_us, attempts, finish_us, then) = if writes.is_empty() {
        (0, 0, 0, Then::Resume)
    } else {
        privatize(mem, &writes)?;
        // Threads inside the patch's code finish there; its memory goes on release, once
        // none is left in it.
        let mut pending = None;
        let plan = StopPlan {
            inject: Some(gadgets),
            ..plan
        };
        let result = stop_and_write(&mut session, plan, &mut pending, |session, mem, remote| {
            for w in &writes {
                if mem.read(w.address, DETOUR_LEN)? != w.before {
                    return Err(refused(format!(
                        "code at {:#x} no longer holds this patch's detour; not touching it",
                        w.address
                    )));
                }
            }
            // Once the detours are gone no thread can enter the patch's code: if none is in
            // it or would return into it now (everyone is stopped), its memory can go without
            // stopping them all again. (Checked before the injection below moves the
            // injection thread's registers.)
            let code = code_of(std::slice::from_ref(&f));
            let mut checker = Checker::new(mem, &maps, &loaded, &code);
            let inside = checker.check(session).map_err(|e| exited_or(pid, e))?;
            let clear = inside.is_none() && !checker.saw_unknown_stack;
            // A child forked from now on runs the original code: it must not inherit the
            // patch memory either.
            madvise(
                session,
                mem,
                &maps,
                remote,
                (f.start, f.end - f.start),
                MADV_DONTFORK,
            )?;
            fault::point("revert:uninheritable");
            write_all(mem, &writes)?;
            Ok(if clear { Then::LetGo } else { Then::Resume })
        });
        let then = result.as_ref().map_or(Then::Resume, |r| r.3);
        let t_finish = Instant::now();
        let finished = finish_pending(&mut session, mem, pending, then);
        let finish_us = t_finish.elapsed().as_micros() as u64;
        let (stopped, attempts, alone, then) = result?;
        finished?;
        (stopped, attempts, finish_us + alone, then)
    };
    fault::point("revert:committed");
    let t_release = Instant::now();
    let landing = f.record.as_ref().map(|r| r.landing).unwrap_or(0);
    release(
        &mut session,
        plan,
        gadgets,
        std::slice::from_ref(&f),
        landing,
        then,
    );
    let release_us = t_release.elapsed().as_micros() as u64;
    session.detach();
    let (level, functions) = f
        .record
        .as_ref()
        .map(|r| (r.level, r.functions.len()))
        .unwrap_or((0, 0));
    let stopped_us = all_stopped_us + finish_us + release_us;
    info!(pid, patch = %f.name, stopped_us, all_stopped_us, was = f.state.as_str(), "reverted");
    Ok(RevertReport {
        pid,
        patch: f.name.clone(),
        level,
        functions,
        was: f.state.as_str(),
        stopped_us,
        all_stopped_us,
        release_us,
        attempts,
    })
}

/// The write that puts a detoured function's original bytes back.
fn restore_write(d: &Detour) -> Result<Write> {
    let saved = hex::decode(&d.saved).map_err(|_| refused("corrupt patch record"))?;
    let jmp = encode_jmp(d.address, d.replacement).map_err(|e| refused(e.to_string()))?;
    Ok(Write {
        address: d.address,
        bytes: saved,
        before: jmp.to_vec(),
    })
}

/// Gives each write's page its private copy now, by writing back the bytes it holds: the
/// content does not change, and the writes inside the stop become plain copies instead of
/// copy-on-write faults. (Bytes that changed meanwhile are left alone; the check inside the
/// stop refuses them.)
fn privatize(mem: &Memory, writes: &[Write]) -> Result<()> {
    for w in writes {
        if mem.read(w.address, w.before.len())? == w.before {
            mem.write(w.address, &w.before)?;
        }
    }
    Ok(())
}

/// What a stop needs to know besides the session.
#[derive(Clone, Copy)]
struct StopPlan<'a> {
    mem: &'a Memory,
    maps: &'a [Mapping],
    modules: &'a [LoadedModule],
    guarded: &'a [Guarded],
    timeout: Duration,
    /// The thread to make a system call through inside the stop, and the code it runs it
    /// with. Its frame is laid before the others stop (only the call counts in the
    /// all-threads stop), and it stays stopped after a successful stop until the caller
    /// finishes it (once the others run).
    inject: Option<Gadgets>,
}

/// What becomes of the threads after a successful stop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// They run again, still seized: a later phase stops them again.
    Resume,
    /// No later phase needs them: they are detached from this stop (the injection thread and
    /// pinned ones stay), which saves stopping them all once more only to detach.
    LetGo,
}

/// Stops the world, waits for safety (retrying with back-off), then runs `act` and lets every
/// thread go again (seized or not, as `act` says). With `plan.inject`, `act` gets a remote on
/// that thread, left in `pending` for the caller to finish. Returns the time every thread was
/// stopped, the number of attempts, and the time the injection thread was stopped alone
/// before.
fn stop_and_write(
    session: &mut Session,
    plan: StopPlan,
    pending: &mut Option<Remote>,
    mut act: impl FnMut(&mut Session, &Memory, Option<&mut Remote>) -> Result<Then>,
) -> Result<(u64, u32, u64, Then)> {
    let StopPlan {
        mem,
        maps,
        modules,
        guarded,
        timeout,
        inject,
    } = plan;
    let pid = session.pid();
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_micros(200);
    let mut stopped = Duration::ZERO;
    let mut alone = Duration::ZERO;
    let mut attempts = 0;
    let mut tables_read = false;
    let mut maps = maps.to_vec();
    loop {
        attempts += 1;
        if let Some(gadgets) = inject {
            let t = Instant::now();
            let r = take_injector(session, mem, &maps, gadgets);
            alone += t.elapsed();
            *pending = Some(r?);
        }
        let t = Instant::now();
        session.stop_all().map_err(|e| exited_or(pid, e))?;
        fault::point("commit:stopped");
        // (busy, whether the unwind tables are asked for, whether a stack was not in `maps`)
        let check = |session: &mut Session, maps: &[Mapping]| {
            let mut checker = Checker::new(mem, maps, modules, guarded);
            checker.ask_for_tables = !tables_read;
            let busy = checker.check(session).map_err(|e| exited_or(pid, e))?;
            Ok::<_, EngineError>((busy, checker.needs_tables, checker.saw_unknown_stack))
        };
        let (mut busy, mut needs_tables, unknown_stack) = check(session, &maps)?;
        if unknown_stack {
            // A thread born after our snapshot runs on a stack we have not seen: look again.
            maps = procfs::read_maps(pid).map_err(|e| exited_or(pid, e))?;
            (busy, needs_tables, _) = check(session, &maps)?;
        }
        match busy {
            None => {
                let result = act(session, mem, pending.as_mut());
                // Success or not: let go right away; the pause ends when the last thread runs.
                let keep = pending.as_ref().map(Remote::tid);
                match result {
                    Ok(Then::LetGo) => session.let_go(keep),
                    _ => session.resume(keep),
                }
                stopped += t.elapsed();
                let then = result?;
                let (stopped, alone) = (stopped.as_micros() as u64, alone.as_micros() as u64);
                return Ok((stopped, attempts, alone, then));
            }
            Some(b) => {
                // Nothing was injected yet: the thread's own state is back as it was.
                let finished = pending.take().map_or(Ok(()), |r| r.finish(session, mem));
                session.resume(None);
                stopped += t.elapsed();
                finished.map_err(|e| exited_or(pid, e))?;
                // A stack that points into guarded code is walked precisely, with the modules'
                // unwind tables: read now that nothing is stopped, then look again at once.
                if needs_tables {
                    tables_read = true;
                    let t = Instant::now();
                    for m in modules {
                        if let Err(e) = modules::read_unwind(pid, m) {
                            debug!(pid, module = %m.path, "unwind tables unread (walked conservatively): {e:#}");
                        }
                    }
                    debug!(pid, %b, us = t.elapsed().as_micros() as u64, "unwind tables read; checking again");
                    continue;
                }
                if interrupt::requested() {
                    return Err(EngineError::Interrupted(format!(
                        "interrupted while waiting for process {pid} ({b}); nothing was changed"
                    )));
                }
                if Instant::now() + backoff > deadline {
                    return Err(EngineError::Busy(format!(
                        "process {pid}: {b} (gave up after {attempts} attempts in {timeout:?}); nothing was changed"
                    )));
                }
                debug!(pid, %b, "busy; backing off");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(20));
            }
        }
    }
}

/// One write of the stop: `bytes` go to `address`, which holds `before` (already verified).
struct Write {
    address: u64,
    bytes: Vec<u8>,
    before: Vec<u8>,
}

/// Writes closer together than this go out as one: inside the stop every system call counts.
const CLUSTER_GAP: u64 = 4096;

/// Performs every write (all threads are stopped). Nearby writes are merged: their span is read
/// once, each write's `before` bytes are checked in it, and the span is written back in one
/// call. If a write fails, the spans already written are put back.
fn write_all(mem: &Memory, writes: &[Write]) -> Result<()> {
    let mut order: Vec<&Write> = writes.iter().collect();
    order.sort_by_key(|w| w.address);
    let mut clusters: Vec<Vec<&Write>> = Vec::new();
    for w in order {
        match clusters.last_mut() {
            Some(c)
                if w.address
                    <= c[c.len() - 1].address + c[c.len() - 1].bytes.len() as u64 + CLUSTER_GAP =>
            {
                c.push(w)
            }
            _ => clusters.push(vec![w]),
        }
    }
    let mut done: Vec<(u64, Vec<u8>)> = Vec::new();
    for c in clusters {
        let lo = c[0].address;
        let hi = c
            .iter()
            .map(|w| w.address + w.bytes.len() as u64)
            .max()
            .unwrap_or(lo);
        let before = mem.read(lo, (hi - lo) as usize)?;
        let mut after = before.clone();
        for w in &c {
            let at = (w.address - lo) as usize;
            if after[at..at + w.before.len()] != w.before[..] {
                undo(mem, &done);
                return Err(refused(format!(
                    "code at {:#x} changed during the stop; nothing was changed",
                    w.address
                )));
            }
            after[at..at + w.bytes.len()].copy_from_slice(&w.bytes);
        }
        if let Err(e) = mem.write(lo, &after) {
            let _ = mem.write(lo, &before);
            undo(mem, &done);
            return Err(EngineError::Failed(e));
        }
        done.push((lo, before));
        fault::point("commit:wrote-cluster");
    }
    Ok(())
}

fn undo(mem: &Memory, done: &[(u64, Vec<u8>)]) {
    for (addr, bytes) in done.iter().rev() {
        let _ = mem.write(*addr, bytes);
    }
}

fn locate_functions(
    mem: &Memory,
    module: &LoadedModule,
    bundle: &Bundle,
    prev: Option<&PatchRecord>,
    defined: &[String],
) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    for f in &bundle.manifest.functions {
        if !defined.iter().any(|d| d == &f.replacement) {
            return Err(refused(format!(
                "patch object does not define `{}`, the replacement for `{}`",
                f.replacement, f.symbol
            )));
        }
        let address = module.bias.wrapping_add(f.address);
        let prior = prev.and_then(|p| p.detour(address));
        let saved: [u8; DETOUR_LEN] = match prior {
            Some(d) => hex::decode(&d.saved)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| refused("corrupt patch record in the target"))?,
            None => {
                let head = mem.read(address, DETOUR_LEN)?;
                let mut s = [0u8; DETOUR_LEN];
                s.copy_from_slice(&head);
                s
            }
        };
        let mut running_head = [0u8; DETOUR_LEN];
        running_head.copy_from_slice(&mem.read(address, DETOUR_LEN)?);
        let t = Target {
            symbol: f.symbol.clone(),
            address,
            size: f.size,
            replacement: f.replacement.clone(),
            saved,
            running_head,
            expected_sha256: f.expected_sha256.clone(),
        };
        let code = verify_running(mem, &t, prev).map_err(EngineError::Refused)?;
        check_site(address, &code).map_err(|e| refused(format!("`{}`: {e}", t.symbol)))?;
        out.push(t);
    }
    Ok(out)
}

/// Reads the running function, undoes a detour of the patch being superseded, and compares
/// with the bundle's expected hash. Returns the (original) code.
fn verify_running(
    mem: &Memory,
    t: &Target,
    prev: Option<&PatchRecord>,
) -> std::result::Result<Vec<u8>, String> {
    let code = mem
        .read(t.address, t.size as usize)
        .map_err(|e| format!("`{}`: {e:#}", t.symbol))?;
    verify_code(t, code, prev)
}

/// Reads every target function; with one system call when they lie close together (inside
/// the stop, each call counts).
fn read_functions(mem: &Memory, targets: &[Target]) -> Result<Vec<Vec<u8>>> {
    let lo = targets.iter().map(|t| t.address).min().unwrap_or(0);
    let hi = targets
        .iter()
        .map(|t| t.address + t.size)
        .max()
        .unwrap_or(0);
    if hi - lo <= 1 << 20 {
        let span = mem.read(lo, (hi - lo) as usize)?;
        Ok(targets
            .iter()
            .map(|t| span[(t.address - lo) as usize..(t.address - lo + t.size) as usize].to_vec())
            .collect())
    } else {
        targets
            .iter()
            .map(|t| {
                mem.read(t.address, t.size as usize)
                    .map_err(EngineError::Failed)
            })
            .collect()
    }
}

/// Compares a function's running code with the bundle's expectation (undoing the detour of
/// the patch being superseded first). Returns the original code.
fn verify_code(
    t: &Target,
    mut code: Vec<u8>,
    prev: Option<&PatchRecord>,
) -> std::result::Result<Vec<u8>, String> {
    if let Some(d) = prev.and_then(|p| p.detour(t.address)) {
        if decode_jmp(t.address, &code) != Some(d.replacement) {
            return Err(format!(
                "`{}` at {:#x} does not hold the detour of the applied patch; it was changed by someone else",
                t.symbol, t.address
            ));
        }
        code[..DETOUR_LEN].copy_from_slice(&t.saved);
    }
    let actual = hex::encode(Sha256::digest(&code));
    if actual != t.expected_sha256 {
        return Err(format!(
            "running code of `{}` at {:#x} differs from what the bundle expects (sha256 {} != {}): wrong build or already modified",
            t.symbol,
            t.address,
            &actual[..16],
            &t.expected_sha256[..t.expected_sha256.len().min(16)]
        ));
    }
    Ok(code)
}
