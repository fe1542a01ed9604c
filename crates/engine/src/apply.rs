//! Apply and revert: the orchestration of the engine's steps (see the crate doc).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use serde::Serialize;
use sha2::{Digest, Sha256};
use suture_bundle::{BindTarget, Bundle};
use suture_detour::{check_site, decode_jmp, encode_jmp, DETOUR_LEN};
use suture_link::{Plan, Prot, Resolved};
use tracing::{debug, info};

use crate::modules::{self, executable_tp_offset, LoadedModule};
use crate::procfs::{self, Mapping, Memory};
use crate::record::{self, Detour, PatchRecord, MEMFD_PREFIX};
use crate::remote::Remote;
use crate::safety::{Checker, Guarded};
use crate::stop::Session;
use crate::EngineError;

const PAGE: u64 = 4096;

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// How long to keep retrying while a thread is inside a function being replaced.
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
    /// Time every thread of the process was stopped (all attempts), microseconds.
    pub stopped_us: u64,
    /// Time one thread was stopped beforehand to map patch memory, microseconds.
    pub prep_us: u64,
    pub attempts: u32,
    pub base: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RevertReport {
    pub pid: i32,
    pub patch: String,
    pub level: u32,
    pub functions: usize,
    pub stopped_us: u64,
    pub attempts: u32,
}

type Result<T> = std::result::Result<T, EngineError>;

fn refused(msg: impl Into<String>) -> EngineError {
    EngineError::Refused(msg.into())
}

fn exited_or(pid: i32, e: anyhow::Error) -> EngineError {
    if procfs::exists(pid) {
        EngineError::Failed(e)
    } else {
        EngineError::Exited(format!(
            "process {pid} exited during the operation; nothing was left changed in it"
        ))
    }
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

/// Applies a bundle (whose signature the caller has verified) to process `pid`.
pub fn apply(pid: i32, bundle: &Bundle, opts: &ApplyOptions) -> Result<ApplyReport> {
    let m = &bundle.manifest;
    let build_id =
        hex::decode(&m.module.build_id).map_err(|_| refused("bundle names an invalid build-id"))?;
    if !procfs::exists(pid) {
        return Err(refused(format!("no process {pid}")));
    }
    let maps = procfs::read_maps(pid)?;
    let module = modules::find_by_build_id(pid, &maps, &build_id).ok_or_else(|| {
        refused(format!(
            "process {pid} does not map module {} with build-id {}",
            m.module.name, m.module.build_id
        ))
    })?;
    let mem = Memory::open(pid)?;
    let applied = record::applied_patches(&mem, &maps)?;
    let prev = applied
        .iter()
        .filter(|r| r.build_id == m.module.build_id)
        .max_by_key(|r| r.level)
        .cloned();
    if let Some(p) = &prev {
        if m.level <= p.level {
            return Err(refused(format!(
                "process {pid} already carries level {} ({}) of {}; level {} is not newer",
                p.level, p.id, m.module.name, m.level
            )));
        }
    }

    let plan = Plan::new(&bundle.object)
        .map_err(|e| refused(format!("patch object cannot be loaded: {e}")))?;
    let defined = plan.defined_symbols();
    let targets = locate_functions(&mem, &module, bundle, prev.as_ref(), &defined)?;
    let mut symbols = resolve_bindings(pid, &maps, &module, bundle, &plan)?;
    // Dry link: unresolved symbols and impossible relocations are refused before any stop.
    let probe_base = module.lo.saturating_sub(plan.size() + 16 * PAGE) & !(PAGE - 1);
    plan.link(probe_base, &|name| symbols.lookup(name))
        .map_err(|e| refused(format!("patch cannot be linked into process {pid}: {e}")))?;

    // Found before anything stops: reading the libraries' symbols takes milliseconds.
    let unwind = if plan.has_eh_frame() {
        unwind_registry(&search_order(pid, &maps))
    } else {
        None
    };

    // From here on the process is touched; every error path undoes what was done.
    let mut session = Session::seize(pid).map_err(|e| exited_or(pid, e))?;
    let threads = session.thread_count();
    let tid0 = session
        .injection_thread()
        .ok_or_else(|| exited_or(pid, anyhow!("no threads")))?;
    let t_prep = Instant::now();
    session.stop_thread(tid0).map_err(|e| exited_or(pid, e))?;
    let mut remote = Remote::new(&session, tid0, &mem, &maps).map_err(|e| {
        if e.is::<crate::remote::SeccompBlocks>() {
            EngineError::Refused(e.to_string())
        } else {
            exited_or(pid, e)
        }
    })?;
    for (name, resolver) in std::mem::take(&mut symbols.ifuncs) {
        let addr = remote
            .call(&mut session, &mem, resolver, &[])
            .map_err(|e| exited_or(pid, e))?;
        symbols.known.insert(name, Resolved::Address(addr));
    }
    let mut record = PatchRecord {
        id: m.id.clone(),
        level: m.level,
        bundle_sha256: bundle.content_address(),
        build_id: m.module.build_id.clone(),
        module: module.path.clone(),
        cves: m.cves.clone(),
        applied_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        signer: bundle.signer.fingerprint(),
        base: u64::MAX,
        len: u64::MAX,
        text_start: u64::MAX,
        text_end: u64::MAX,
        functions: targets
            .iter()
            .map(|t| Detour {
                symbol: t.symbol.clone(),
                address: t.address,
                size: t.size,
                replacement: u64::MAX,
                saved: hex::encode(t.saved),
            })
            .collect(),
        eh_frame: 0,
        eh_object: 0,
    };
    if unwind.is_some() {
        // Filled in once placed; the maximum stands in so the header is sized for it.
        record.eh_frame = u64::MAX;
        record.eh_object = u64::MAX;
    }
    let header_len = (record.encode()?.len() as u64).div_ceil(PAGE) * PAGE;
    // One more page, read-write, for the unwinder's bookkeeping of our tables.
    let total = header_len + plan.size() + if unwind.is_some() { PAGE } else { 0 };
    let mapped = map_patch(
        &mut session,
        &mut remote,
        &mem,
        &module,
        &plan,
        &symbols,
        &mut record,
        &targets
            .iter()
            .map(|t| t.replacement.clone())
            .collect::<Vec<_>>(),
        header_len,
        total,
        unwind,
    )
    .map_err(|e| exited_or(pid, e));
    // Exceptions and thread cancellation must be able to unwind through the new code.
    let registered = match (&mapped, unwind) {
        (Ok(m), Some(u)) => remote
            .call(
                &mut session,
                &mem,
                u.register,
                &[record.eh_frame, record.eh_object],
            )
            .map(|_| ())
            .map_err(|e| {
                unmap(&mut session, &mut remote, m.base, total);
                exited_or(pid, e.context("registering the patch's unwind tables"))
            }),
        _ => Ok(()),
    };
    let finished = remote.finish(&mem).map_err(|e| exited_or(pid, e));
    let mapped = mapped?;
    registered?;
    finished?;
    let prep_us = t_prep.elapsed().as_micros() as u64;
    debug!(pid, base = mapped.base, prep_us, "patch memory mapped");

    let detours: Result<Vec<(u64, [u8; DETOUR_LEN])>> = targets
        .iter()
        .zip(&record.functions)
        .map(|(t, d)| encode_jmp(t.address, d.replacement).map(|j| (t.address, j)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| refused(e.to_string()));
    let detours = match detours {
        Ok(d) => d,
        Err(e) => {
            unmap_now(&mut session, &mem, &maps, tid0, mapped.base, total);
            return Err(e);
        }
    };
    let mut writes: Vec<Write> = detours
        .iter()
        .zip(&targets)
        .map(|((a, j), t)| Write {
            address: *a,
            bytes: j.to_vec(),
            before: t.running_head.to_vec(),
        })
        .collect();
    let mut guarded: Vec<Guarded> = targets
        .iter()
        .map(|t| Guarded {
            name: t.symbol.clone(),
            start: t.address,
            end: t.address + t.size,
            entry_is_safe: true,
        })
        .collect();
    if let Some(p) = &prev {
        for d in p
            .functions
            .iter()
            .filter(|d| !targets.iter().any(|t| t.address == d.address))
        {
            let saved = hex::decode(&d.saved).map_err(|_| refused("corrupt patch record"))?;
            let jmp = encode_jmp(d.address, d.replacement).map_err(|e| refused(e.to_string()))?;
            writes.push(Write {
                address: d.address,
                bytes: saved,
                before: jmp.to_vec(),
            });
        }
        guarded.push(Guarded {
            name: format!(
                "{} (code of patch {})",
                p.functions
                    .first()
                    .map(|d| d.symbol.as_str())
                    .unwrap_or("?"),
                p.id
            ),
            start: p.text_start,
            end: p.text_end,
            entry_is_safe: false,
        });
    }

    // Give each detour site its private copy of the page now, by writing back the bytes it
    // holds: the content does not change, and the writes inside the stop become plain copies
    // instead of copy-on-write faults.
    // (Bytes that changed meanwhile are left alone; the check inside the stop refuses them.)
    for w in &writes {
        if mem.read(w.address, w.before.len())? == w.before {
            mem.write(w.address, &w.before)?;
        }
    }
    let loaded = modules::loaded_modules(pid, &maps);
    let plan = StopPlan {
        mem: &mem,
        maps: &maps,
        modules: &loaded,
        guarded: &guarded,
        timeout: opts.timeout,
        keep: prev.as_ref().map(|_| tid0),
    };
    let outcome = stop_and_write(&mut session, plan, |_session, mem| {
        // Re-verify under the stop: nothing may have changed since we looked.
        let codes = read_functions(mem, &targets)?;
        for (t, code) in targets.iter().zip(codes) {
            verify_code(t, code, prev.as_ref()).map_err(EngineError::Refused)?;
        }
        write_all(mem, &writes)?;
        Ok(())
    });
    let (stopped_us, attempts) = match outcome {
        Ok(v) => v,
        Err(e) => {
            if procfs::exists(pid) {
                match session.stop_all() {
                    Ok(()) => unmap_now(&mut session, &mem, &maps, tid0, mapped.base, total),
                    Err(stop) => {
                        tracing::warn!(pid, "cannot stop the process to clean up: {stop:#}")
                    }
                }
            }
            return Err(e);
        }
    };
    // The detours are live and the other threads run again. The superseded patch's code is
    // unreachable now (no detour leads there and no thread was in it), so its memory goes;
    // failing that only leaks it.
    if let Some(p) = &prev {
        if let Err(e) = release_patch(&mut session, &mem, &maps, tid0, p) {
            tracing::warn!(pid, "superseded patch {} stays mapped: {e:#}", p.id);
        }
        session.detach();
    }
    info!(pid, patch = %m.id, level = m.level, stopped_us, "applied");
    Ok(ApplyReport {
        pid,
        patch: m.id.clone(),
        level: m.level,
        replaced: prev.map(|p| p.id),
        functions: targets.len(),
        threads,
        stopped_us,
        prep_us,
        attempts,
        base: mapped.base,
    })
}

/// Reverts patch `id` (default: the newest) in process `pid`.
pub fn revert(pid: i32, id: Option<&str>, opts: &ApplyOptions) -> Result<RevertReport> {
    if !procfs::exists(pid) {
        return Err(refused(format!("no process {pid}")));
    }
    let maps = procfs::read_maps(pid)?;
    let mem = Memory::open(pid)?;
    let applied = record::applied_patches(&mem, &maps)?;
    let rec = match id {
        Some(id) => applied.iter().find(|r| r.id == id),
        None => applied.last(),
    }
    .cloned()
    .ok_or_else(|| match id {
        Some(id) => refused(format!("process {pid} does not carry patch {id}")),
        None => refused(format!("process {pid} carries no patch")),
    })?;
    let mut writes = Vec::new();
    for d in &rec.functions {
        let saved = hex::decode(&d.saved).map_err(|_| refused("corrupt patch record"))?;
        let jmp = encode_jmp(d.address, d.replacement).map_err(|e| refused(e.to_string()))?;
        writes.push(Write {
            address: d.address,
            bytes: saved,
            before: jmp.to_vec(),
        });
    }
    let guarded = vec![Guarded {
        name: format!("code of patch {}", rec.id),
        start: rec.text_start,
        end: rec.text_end,
        entry_is_safe: false,
    }];
    let mut session = Session::seize(pid).map_err(|e| exited_or(pid, e))?;
    let tid0 = session
        .injection_thread()
        .ok_or_else(|| exited_or(pid, anyhow!("no threads")))?;
    let loaded = modules::loaded_modules(pid, &maps);
    let plan = StopPlan {
        mem: &mem,
        maps: &maps,
        modules: &loaded,
        guarded: &guarded,
        timeout: opts.timeout,
        keep: Some(tid0),
    };
    let (stopped_us, attempts) = stop_and_write(&mut session, plan, |_session, mem| {
        for d in &rec.functions {
            let now = mem.read(d.address, DETOUR_LEN)?;
            if decode_jmp(d.address, &now) != Some(d.replacement) {
                return Err(refused(format!(
                    "`{}` at {:#x} no longer holds this patch's detour; not touching it",
                    d.symbol, d.address
                )));
            }
        }
        write_all(mem, &writes)
    })?;
    // The original code is back and the other threads run; the patch's code is unreachable.
    if let Err(e) = release_patch(&mut session, &mem, &maps, tid0, &rec) {
        // The detours are gone, so the patch is reverted; only its memory (and record) stay.
        tracing::warn!(pid, "reverted patch {} stays mapped: {e:#}", rec.id);
    }
    session.detach();
    info!(pid, patch = %rec.id, stopped_us, "reverted");
    Ok(RevertReport {
        pid,
        patch: rec.id.clone(),
        level: rec.level,
        functions: rec.functions.len(),
        stopped_us,
        attempts,
    })
}

/// Stops the world, waits for safety (retrying with back-off), then runs `act` and lets the
/// threads go (all but `keep`). Returns the total stopped time and the number of attempts.
/// What a stop needs to know besides the session.
struct StopPlan<'a> {
    mem: &'a Memory,
    maps: &'a [Mapping],
    modules: &'a [LoadedModule],
    guarded: &'a [Guarded],
    timeout: Duration,
    /// A thread that stays stopped afterwards, for clean-up.
    keep: Option<i32>,
}

fn stop_and_write(
    session: &mut Session,
    plan: StopPlan,
    act: impl Fn(&mut Session, &Memory) -> Result<()>,
) -> Result<(u64, u32)> {
    let StopPlan {
        mem,
        maps,
        modules,
        guarded,
        timeout,
        keep,
    } = plan;
    let pid = session.pid();
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_micros(200);
    let mut stopped = Duration::ZERO;
    let mut attempts = 0;
    let mut maps = maps.to_vec();
    loop {
        attempts += 1;
        let t = Instant::now();
        session.stop_all().map_err(|e| exited_or(pid, e))?;
        let mut checker = Checker::new(mem, &maps, modules, guarded);
        let mut busy = checker.check(session).map_err(|e| exited_or(pid, e))?;
        if checker.saw_unknown_stack {
            // A thread born after our snapshot runs on a stack we have not seen: look again.
            maps = procfs::read_maps(pid).map_err(|e| exited_or(pid, e))?;
            busy = Checker::new(mem, &maps, modules, guarded)
                .check(session)
                .map_err(|e| exited_or(pid, e))?;
        }
        match busy {
            None => {
                act(session, mem)?;
                // Success: let go right away; the pause ends when the last thread runs. `keep`
                // stays stopped for clean-up that no longer needs the world stopped.
                match keep {
                    Some(tid) => session.resume(Some(tid)),
                    None => session.detach_inner(),
                }
                stopped += t.elapsed();
                return Ok((stopped.as_micros() as u64, attempts));
            }
            Some(b) => {
                session.resume(None);
                stopped += t.elapsed();
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

/// What the patch's undefined symbols resolve to in this process.
struct Symbols {
    known: HashMap<String, Resolved>,
    /// Indirect functions still to be resolved by calling their resolver in the target.
    ifuncs: Vec<(String, u64)>,
}

impl Symbols {
    fn lookup(&self, name: &str) -> Option<Resolved> {
        if let Some(r) = self.known.get(name) {
            return Some(*r);
        }
        // Before resolvers ran (dry link), the resolver's address stands in: same reach.
        self.ifuncs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| Resolved::Address(*a))
    }
}

fn resolve_bindings(
    pid: i32,
    maps: &[Mapping],
    module: &LoadedModule,
    bundle: &Bundle,
    plan: &Plan,
) -> Result<Symbols> {
    let mut symbols = Symbols {
        known: HashMap::new(),
        ifuncs: Vec::new(),
    };
    let mut loaded: Option<Vec<LoadedModule>> = None;
    for name in plan.undefined_symbols() {
        let binding = bundle.manifest.bindings.iter().find(|b| &b.symbol == name);
        let target = binding
            .map(|b| b.target.clone())
            .unwrap_or(BindTarget::External { name: name.clone() });
        match target {
            BindTarget::Module { address } => {
                symbols.known.insert(
                    name.clone(),
                    Resolved::Address(module.bias.wrapping_add(address)),
                );
            }
            BindTarget::ModuleIfunc { address } => {
                symbols
                    .ifuncs
                    .push((name.clone(), module.bias.wrapping_add(address)));
            }
            BindTarget::ModuleTls { offset } => {
                if !is_main_executable(pid, module) {
                    return Err(refused(format!(
                        "patch uses thread-local `{name}` of shared library {}: not supported",
                        module.path
                    )));
                }
                let tls = module.facts.tls.as_ref().ok_or_else(|| {
                    refused(format!(
                        "patch uses thread-local `{name}` but the module has no TLS segment"
                    ))
                })?;
                let off = executable_tp_offset(tls, offset)
                    .ok_or_else(|| refused(format!("unsupported TLS layout for `{name}`")))?;
                symbols.known.insert(name.clone(), Resolved::TpOffset(off));
            }
            BindTarget::External { name: ext } => {
                let loaded = loaded.get_or_insert_with(|| search_order(pid, maps));
                let found = find_export(loaded, &ext);
                match found {
                    Some((lm, e)) if e.ifunc => symbols
                        .ifuncs
                        .push((name.clone(), lm.bias.wrapping_add(e.address))),
                    Some((lm, e)) => {
                        symbols.known.insert(
                            name.clone(),
                            Resolved::Address(lm.bias.wrapping_add(e.address)),
                        );
                    }
                    None => {} // the dry link reports it (or binds a weak reference to 0)
                }
            }
        }
    }
    Ok(symbols)
}

/// The loaded modules in the order a name is looked up: the executable, then libraries, the
/// dynamic loader last.
fn search_order(pid: i32, maps: &[Mapping]) -> Vec<LoadedModule> {
    let mut all = modules::loaded_modules(pid, maps);
    let exe = std::fs::metadata(format!("/proc/{pid}/exe"))
        .map(|m| m.ino())
        .ok();
    all.sort_by_key(|m| (exe != Some(m.inode), m.path.contains("/ld-linux")));
    all
}

/// The process's definition of exported symbol `name`: the first strong one in search order,
/// else the first weak one.
fn find_export<'m>(
    loaded: &'m [LoadedModule],
    name: &str,
) -> Option<(&'m LoadedModule, modules::Export)> {
    let mut found: Option<(&LoadedModule, modules::Export)> = None;
    for lm in loaded {
        if let Some(e) = lm.facts.export(name) {
            if found.is_none_or(|(_, f)| f.weak && !e.weak) {
                found = Some((lm, e));
            }
            if !e.weak {
                break;
            }
        }
    }
    found
}

/// libgcc's registry of unwind tables in the process (`__register_frame_info` and
/// `__deregister_frame_info`, exported by libgcc_s, or linked into a static executable), if it
/// has one. C++ programs and any program that cancels threads have it; without it, nothing in
/// the process unwinds.
#[derive(Clone, Copy)]
struct UnwindRegistry {
    register: u64,
    deregister: u64,
}

fn unwind_registry(loaded: &[LoadedModule]) -> Option<UnwindRegistry> {
    let at = |name| {
        find_export(loaded, name)
            .filter(|(_, e)| !e.ifunc)
            .map(|(lm, e)| lm.bias.wrapping_add(e.address))
            .or_else(|| {
                // A static executable exports nothing; it comes first in search order.
                let exe = loaded.first()?;
                exe.facts.function(name).map(|a| exe.bias.wrapping_add(a))
            })
    };
    Some(UnwindRegistry {
        register: at("__register_frame_info")?,
        deregister: at("__deregister_frame_info")?,
    })
}

/// Removes a patch's memory after its detours are gone and no thread is in its code: first its
/// unwind tables from the process's unwinder, then the mapping. If the tables cannot be
/// deregistered the memory stays (the unwinder would read freed memory at the next exception).
fn release_patch(
    session: &mut Session,
    mem: &Memory,
    maps: &[Mapping],
    tid: i32,
    rec: &PatchRecord,
) -> Result<()> {
    let pid = session.pid();
    let mut r = Remote::new(session, tid, mem, maps).map_err(|e| exited_or(pid, e))?;
    let result = (|| -> anyhow::Result<()> {
        if rec.eh_frame != 0 {
            let registry = unwind_registry(&search_order(pid, maps))
                .ok_or_else(|| anyhow!("the process's unwinder (libgcc_s) is gone"))?;
            r.call(session, mem, registry.deregister, &[rec.eh_frame])
                .context("deregistering the patch's unwind tables")?;
        }
        let ret = r.syscall(session, libc::SYS_munmap, &[rec.base, rec.len])?;
        r_check(pid, "munmap of the patch", ret).map(|_| ())
    })();
    r.finish(mem).map_err(|e| exited_or(pid, e))?;
    result.map_err(EngineError::Failed)
}

fn is_main_executable(pid: i32, module: &LoadedModule) -> bool {
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .map(|m| m.ino() == module.inode)
        .unwrap_or(false)
}

struct Mapped {
    base: u64,
}

/// Creates the named memfd in the target, fills it from our side through `/proc/PID/fd`, maps
/// it near the module read-only, then gives text R-X and data RW. Fills in `record`.
#[allow(clippy::too_many_arguments)]
fn map_patch(
    session: &mut Session,
    remote: &mut Remote,
    mem: &Memory,
    module: &LoadedModule,
    plan: &Plan,
    symbols: &Symbols,
    record: &mut PatchRecord,
    replacements: &[String],
    header_len: u64,
    total: u64,
    unwind: Option<UnwindRegistry>,
) -> anyhow::Result<Mapped> {
    let pid = session.pid();
    let mut name: Vec<u8> = format!("{MEMFD_PREFIX}{}", record.id).into_bytes();
    name.truncate(240);
    name.push(0);
    let scratch = remote.scratch() - 256;
    mem.write(scratch, &name)?;
    let ret = remote.syscall(
        session,
        libc::SYS_memfd_create,
        &[scratch, libc::MFD_CLOEXEC as u64],
    )?;
    let fd = remote.check("memfd_create", ret)?;
    let result = (|| -> anyhow::Result<Mapped> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/fd/{fd}"))
            .context("cannot open the patch memfd")?;
        file.set_len(total).context("cannot size the patch memfd")?;
        let maps = procfs::read_maps(pid)?;
        let candidates = crate::placement::candidates(
            &maps,
            module.lo,
            module.hi,
            total,
            plan.needs_low_address(),
        );
        for base in candidates.into_iter().take(8) {
            let image = plan
                .link(base + header_len, &|n| symbols.lookup(n))
                .map_err(|e| anyhow!("patch cannot be linked: {e}"))?;
            record.base = base;
            record.len = total;
            let text = image
                .segments
                .iter()
                .find(|s| matches!(s.prot, Prot::ReadExecute));
            record.text_start = base + header_len + text.map(|s| s.offset).unwrap_or(0);
            record.text_end = record.text_start + text.map(|s| s.len).unwrap_or(0);
            if unwind.is_some() {
                record.eh_frame = image.eh_frame.unwrap_or(0);
                record.eh_object = base + total - PAGE;
            }
            for (d, name) in record.functions.iter_mut().zip(replacements) {
                d.replacement = *image
                    .symbols
                    .get(name)
                    .ok_or_else(|| anyhow!("patch object does not define `{name}`"))?;
            }
            let header = record.encode()?;
            file.write_all_at(&header, 0)?;
            file.write_all_at(&image.bytes, header_len)?;
            let ret = remote.syscall(
                session,
                libc::SYS_mmap,
                &[
                    base,
                    total,
                    libc::PROT_READ as u64,
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
                let _ = remote.syscall(session, libc::SYS_munmap, &[got, total]);
                anyhow::bail!("kernel placed patch memory at {got:#x}, not at {base:#x}");
            }
            let mapped = Mapped { base };
            let unwinder_page = unwind.map(|_| (total - PAGE - header_len, PAGE, Prot::ReadWrite));
            let ranges = image
                .segments
                .iter()
                .map(|s| (s.offset, s.len, s.prot))
                .chain(unwinder_page);
            for (offset, len, prot) in ranges {
                let prot = match prot {
                    Prot::ReadExecute => libc::PROT_READ | libc::PROT_EXEC,
                    Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
                    Prot::Read => continue,
                };
                let ret = remote.syscall(
                    session,
                    libc::SYS_mprotect,
                    &[base + header_len + offset, len, prot as u64],
                )?;
                if let Err(e) = remote.check("mprotect of patch memory", ret) {
                    unmap(session, remote, base, total);
                    return Err(e);
                }
            }
            return Ok(mapped);
        }
        anyhow::bail!(
            "no free address range within ±2 GiB of {} for {total} bytes of patch",
            module.path
        )
    })();
    let ret = remote.syscall(session, libc::SYS_close, &[fd])?;
    let _ = remote.check("close", ret);
    result
}

/// Undoes a mapping from a fresh remote on `tid` (stopped), leaving its stack as it was.
fn unmap_now(session: &mut Session, mem: &Memory, maps: &[Mapping], tid: i32, base: u64, len: u64) {
    match Remote::new(session, tid, mem, maps) {
        Ok(mut r) => {
            unmap(session, &mut r, base, len);
            if let Err(e) = r.finish(mem) {
                tracing::warn!("restoring thread {tid} after clean-up: {e:#}");
            }
        }
        Err(e) => tracing::warn!("cannot clean up patch memory at {base:#x}: {e:#}"),
    }
}

fn r_check(pid: i32, what: &str, ret: i64) -> anyhow::Result<u64> {
    if ret < 0 && ret > -4096 {
        anyhow::bail!(
            "process {pid}: {what} failed in the target: {}",
            nix::errno::Errno::from_raw((-ret) as i32)
        );
    }
    Ok(ret as u64)
}

fn unmap(session: &mut Session, remote: &mut Remote, base: u64, len: u64) {
    let result = remote
        .syscall(session, libc::SYS_munmap, &[base, len])
        .and_then(|ret| remote.check("munmap", ret));
    if let Err(e) = result {
        tracing::warn!("cannot unmap patch memory at {base:#x}: {e:#}");
    }
}
