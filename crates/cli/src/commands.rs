//! One function per subcommand.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use suture_build::{handmade_manifest, Handmade};
use suture_bundle::{BindTarget, Bundle, SecretKey, TrustStore};
use suture_engine::{ApplyOptions, ApplyReport, EngineError, PatchState, RevertReport};

use crate::cli::{Args, Command};
use crate::output::{self, clean};

pub fn run(args: Args) -> Result<i32> {
    let j = args.json;
    match args.command {
        Command::Keygen { name, out } => keygen(j, &name, &out),
        Command::Bundle {
            target,
            object,
            replace,
            level,
            cve,
            description,
            id,
            key,
            out,
        } => {
            let target_bytes = std::fs::read(&target)
                .with_context(|| format!("cannot read {}", target.display()))?;
            let object_bytes = std::fs::read(&object)
                .with_context(|| format!("cannot read {}", object.display()))?;
            let manifest = handmade_manifest(&Handmade {
                target: &target_bytes,
                target_name: file_name(&target),
                object: &object_bytes,
                replaces: replace,
                id,
                level,
                cves: cve,
                description,
            })?;
            let key = SecretKey::load(&key)?;
            let bundle = Bundle::sign(manifest, object_bytes, &key)?;
            bundle.write_file(&out)?;
            if j {
                output::json(&json!({"ok": true, "bundle": out, "id": bundle.manifest.id,
                    "sha256": bundle.content_address(), "functions": bundle.manifest.functions.len()}));
            } else {
                println!(
                    "wrote {} ({} {} function(s), level {}, sha256 {})",
                    out.display(),
                    bundle.manifest.id,
                    bundle.manifest.functions.len(),
                    bundle.manifest.level,
                    bundle.content_address()
                );
            }
            Ok(0)
        }
        Command::Build {
            source,
            diff,
            target,
            build_cmd,
            artifact,
            key,
            out,
            level,
            cve,
            description,
            id,
            accept,
            keep_work,
        } => {
            let key = SecretKey::load(&key)?;
            let temp = std::env::temp_dir().join(format!("suture-build-{}", std::process::id()));
            let work = keep_work.clone().unwrap_or_else(|| temp.clone());
            let fix = suture_build::source::SourceFix {
                source: &source,
                diffs: &diff,
                target: &target,
                build_cmd: &build_cmd,
                artifact: artifact.as_deref(),
                work: &work,
                id,
                accept,
                level,
                cves: cve,
                description,
            };
            let bar = if j {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new_spinner()
            };
            bar.enable_steady_tick(Duration::from_millis(120));
            let built = suture_build::source::build_from_source(&fix, &mut |msg| {
                bar.set_message(msg.to_string())
            });
            bar.finish_and_clear();
            // A failed build keeps its work folder: the error names the log in it.
            let build_failed = built.as_ref().err().is_some_and(|e| {
                e.downcast_ref::<suture_build::source::tree::BuildFailed>()
                    .is_some()
            });
            if keep_work.is_none() && !build_failed {
                let _ = std::fs::remove_dir_all(&temp);
            }
            let built = built?;
            let bundle = Bundle::sign(built.manifest, built.object, &key)?;
            bundle.write_file(&out)?;
            let s = &built.summary;
            if j {
                output::json(&json!({"ok": true, "bundle": out, "id": bundle.manifest.id,
                    "sha256": bundle.content_address(), "summary": s,
                    "bundle_bytes": bundle.to_bytes().len()}));
            } else {
                for f in &s.changed {
                    println!("changed      {f}");
                }
                for f in &s.line_numbers_only {
                    println!("kept         {f} (only line numbers moved by the fix differ)");
                }
                for f in &s.pulled_in {
                    println!("pulled in    {f} (source unchanged, code changed: inlines a changed function or uses a line number the fix moved)");
                }
                for f in &s.new_functions {
                    println!("new function {f}");
                }
                for f in &s.new_data {
                    println!("new data     {f}");
                }
                for f in &s.changed_rodata {
                    println!("new copy of read-only data {f}");
                }
                for f in &s.new_state {
                    println!("new state    {f} (accepted: starts when the patch is applied)");
                }
                for w in &s.warnings {
                    println!("warning      {w}");
                }
                for f in &s.noise {
                    println!("noise        {f} (differs between builds of the same source; the fix cannot reach it: left as it runs)");
                }
                println!(
                    "wrote {} ({}, level {}, {} bytes) in {:.1} s",
                    out.display(),
                    bundle.manifest.id,
                    bundle.manifest.level,
                    bundle.to_bytes().len(),
                    s.build_seconds
                );
            }
            Ok(0)
        }
        Command::Inspect { bundle } => inspect(j, &bundle),
        Command::Verify { bundle, trust } => {
            let b = Bundle::read_file(&bundle)?;
            let store = trust_store(&trust)?;
            let signer = b.verify(&store)?;
            if j {
                output::json(
                    &json!({"ok": true, "id": b.manifest.id, "signer": signer.fingerprint(),
                    "signer_name": signer.name(), "sha256": b.content_address()}),
                );
            } else {
                println!(
                    "OK: {} is signed by trusted key {} ({})",
                    clean(&bundle.display().to_string()),
                    clean(signer.name()),
                    signer.fingerprint()
                );
            }
            Ok(0)
        }
        Command::Apply {
            bundle,
            pid,
            all,
            trust,
            timeout_ms,
            jobs,
        } => {
            let b = Bundle::read_file(&bundle)?;
            b.verify(&trust_store(&trust)?)?;
            tracing::debug!("bundle read and verified");
            let opts = ApplyOptions {
                timeout: Duration::from_millis(timeout_ms),
            };
            match (pid, all) {
                (Some(pid), _) => {
                    // One look: a command is milliseconds (a busy host costs it a time slice
                    // per yield, a wrong guess tens of microseconds).
                    suture_engine::stop::sense_host_load(1);
                    let r = suture_engine::apply(pid, &b, &opts)?;
                    if j {
                        output::json(&json!({"ok": true, "results": [r]}));
                    } else {
                        print_applied(&r);
                    }
                    Ok(0)
                }
                (None, _) => apply_all(j, &b, &opts, jobs),
            }
        }
        Command::Revert {
            pid,
            all,
            patch_id,
            timeout_ms,
            jobs,
        } => {
            let opts = ApplyOptions {
                timeout: Duration::from_millis(timeout_ms),
            };
            match (pid, all) {
                (Some(pid), _) => {
                    suture_engine::stop::sense_host_load(1);
                    let r = suture_engine::revert(pid, patch_id.as_deref(), &opts)?;
                    if j {
                        output::json(&json!({"ok": true, "result": r}));
                    } else {
                        print_reverted(&r);
                    }
                    Ok(0)
                }
                (None, _) => revert_all(j, patch_id.as_deref(), &opts, jobs),
            }
        }
        Command::Status { pid } => status(j, pid),
        Command::Check { pid, bundle } => {
            let build_id = match &bundle {
                Some(p) => Some(
                    hex::decode(&Bundle::read_file(p)?.manifest.module.build_id)
                        .map_err(|_| anyhow!("bundle has an invalid build-id"))?,
                ),
                None => None,
            };
            let r = suture_engine::check(pid, build_id.as_deref())?;
            if j {
                output::json(&r);
            } else {
                println!("pid {} ({}), {} thread(s)", r.pid, r.command, r.threads);
                if r.patchable {
                    println!("patchable: yes");
                } else {
                    println!("patchable: no");
                    for p in &r.problems {
                        println!("  - {p}");
                    }
                }
                for p in &r.patches {
                    println!("carries {} (level {}) for {}", p.id, p.level, p.module);
                }
            }
            Ok(if r.patchable { 0 } else { 2 })
        }
        Command::Demo { keep } => crate::demo::run(keep),
        Command::Agent { command } => crate::agent::run(j, command),
        Command::Eligibility { agent } => crate::agent::eligibility(j, agent),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn trust_store(files: &[PathBuf]) -> Result<TrustStore> {
    let store = if files.is_empty() {
        TrustStore::load_dir(Path::new(TrustStore::DEFAULT_DIR))?
    } else {
        TrustStore::load_files(files)?
    };
    if store.is_empty() {
        bail!(
            "no trusted keys: pass --trust KEY.pub or put keys in {}",
            TrustStore::DEFAULT_DIR
        );
    }
    Ok(store)
}

fn keygen(j: bool, name: &str, out: &Path) -> Result<i32> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (key, public) = suture_bundle::generate_keypair(name, out)?;
    if j {
        output::json(&json!({"ok": true, "secret": key, "public": public}));
    } else {
        println!(
            "secret key: {}\npublic key: {}",
            key.display(),
            public.display()
        );
    }
    Ok(0)
}

/// What a bundle claims, every field from it [`clean`]ed: its text is the signer's to choose,
/// and nothing here has checked who the signer is.
fn inspect(j: bool, path: &Path) -> Result<i32> {
    let b = Bundle::read_file(path)?;
    let m = &b.manifest;
    if j {
        output::json(
            &json!({"ok": true, "verified": false, "manifest": m, "signer": b.signer.fingerprint(),
            "object_bytes": b.object.len(), "sha256": b.content_address()}),
        );
        return Ok(0);
    }
    println!(
        "NOT VERIFIED: this shows what the bundle claims; run 'suture verify' to check its signature against trusted keys"
    );
    println!("patch       {} (level {})", clean(&m.id), m.level);
    println!(
        "module      {} build-id {}",
        clean(&m.module.name),
        clean(&m.module.build_id)
    );
    if !m.cves.is_empty() {
        println!("fixes       {}", clean(&m.cves.join(", ")));
    }
    if !m.description.is_empty() {
        println!("description {}", clean(&m.description));
    }
    println!(
        "signed by   key {} (not checked here: use `suture verify`)",
        b.signer.fingerprint()
    );
    println!("sha256      {}", b.content_address());
    println!("object      {} bytes", b.object.len());
    for f in &m.functions {
        println!(
            "replaces    {} at {:#x} ({} bytes, sha256 {}…) with {}",
            clean(&f.symbol),
            f.address,
            f.size,
            clean(f.expected_sha256.get(..16).unwrap_or(&f.expected_sha256)),
            clean(&f.replacement)
        );
    }
    for bnd in &m.bindings {
        let target = match &bnd.target {
            BindTarget::Module { address } => format!("module address {address:#x}"),
            BindTarget::ModuleIfunc { address } => format!("module ifunc at {address:#x}"),
            BindTarget::ModuleTls { offset } => format!("module TLS offset {offset:#x}"),
            BindTarget::External { name } => format!("external {}", clean(name)),
        };
        println!("binds       {} -> {target}", clean(&bnd.symbol));
    }
    Ok(0)
}

/// One line per process an `--all` command could not handle: what it is (busy, refused,
/// exited, failed) once, then why.
fn print_failure(pid: i32, e: &EngineError, what: &str) {
    let text = e.to_string();
    let kind = e.kind();
    let why = text
        .strip_prefix(kind)
        .and_then(|t| t.strip_prefix(": "))
        .unwrap_or(&text);
    println!("pid {pid}: {what} ({kind}): {}", output::clean(why));
}

fn print_applied(r: &ApplyReport) {
    let replaced = r
        .replaced
        .as_ref()
        .map(|p| format!(", superseding {}", output::clean(p)))
        .unwrap_or_default();
    println!(
        "applied {} (level {}) to pid {}: {} function(s); threads stopped {} µs in all ({} µs all {} at once, longest for one thread {} µs){}",
        output::clean(&r.patch),
        r.level,
        r.pid,
        r.functions,
        r.stopped_us,
        r.all_stopped_us,
        r.threads,
        r.longest_thread_stop_us,
        replaced
    );
}

fn apply_all(j: bool, b: &Bundle, opts: &ApplyOptions, jobs: Option<usize>) -> Result<i32> {
    let build_id = hex::decode(&b.manifest.module.build_id)
        .map_err(|_| anyhow!("bundle has an invalid build-id"))?;
    let all = suture_engine::processes_mapping(&build_id)?;
    if all.is_empty() {
        if j {
            output::json(&json!({"ok": true, "results": [], "failures": [], "skipped": []}));
        } else {
            println!(
                "no running process maps {} ({})",
                b.manifest.module.name, b.manifest.module.build_id
            );
        }
        return Ok(0);
    }
    // Re-running --all (new processes started since) must not fail on the ones already done:
    // those carrying this very bundle (applied, not merely left over by an interrupted run)
    // are skipped.
    let started = std::time::Instant::now();
    let mut results = for_all(&all, jobs, j, |pid| {
        suture_engine::apply_unless_carried(pid, b, opts)
    });
    let elapsed = started.elapsed();
    results.sort_by_key(|(pid, _)| *pid);
    let skipped: Vec<i32> = results
        .iter()
        .filter(|(_, r)| matches!(r, Ok(None)))
        .map(|(pid, _)| *pid)
        .collect();
    if skipped.len() == results.len() {
        if j {
            output::json(&json!({"ok": true, "results": [], "failures": [],
                "skipped": skipped.iter().map(|p| json!({"pid": p, "reason": "already carries this patch"})).collect::<Vec<_>>()}));
        } else {
            println!(
                "all {} process(es) mapping {} already carry this patch",
                skipped.len(),
                b.manifest.module.name
            );
        }
        return Ok(0);
    }
    let results: Vec<(i32, std::result::Result<ApplyReport, EngineError>)> = results
        .into_iter()
        .filter_map(|(pid, r)| match r {
            Ok(None) => None,
            Ok(Some(report)) => Some((pid, Ok(report))),
            Err(e) => Some((pid, Err(e))),
        })
        .collect();
    let ok: Vec<&ApplyReport> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let failed: Vec<(i32, &EngineError)> = results
        .iter()
        .filter_map(|(p, r)| r.as_ref().err().map(|e| (*p, e)))
        .collect();
    if j {
        output::json(&json!({
            "ok": failed.is_empty(),
            "elapsed_ms": elapsed.as_millis() as u64,
            "results": ok,
            "skipped": skipped.iter().map(|p| json!({"pid": p, "reason": "already carries this patch"})).collect::<Vec<_>>(),
            "failures": failed.iter().map(|(p, e)| json!({"pid": p, "kind": e.kind(), "error": e.to_string()})).collect::<Vec<_>>(),
        }));
    } else {
        for r in &ok {
            if ok.len() <= 20 {
                print_applied(r);
            }
        }
        for (p, e) in &failed {
            print_failure(*p, e, "not patched");
        }
        println!(
            "{} of {} process(es) patched in {:.2} s{}",
            ok.len(),
            results.len(),
            elapsed.as_secs_f64(),
            if skipped.is_empty() {
                String::new()
            } else {
                format!("; {} already carried it", skipped.len())
            }
        );
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

fn status(j: bool, pid: Option<i32>) -> Result<i32> {
    let pids = match pid {
        Some(p) => vec![p],
        None => suture_engine::procfs::all_pids()?,
    };
    let mut rows = Vec::new();
    let mut unreadable = 0usize;
    for p in pids {
        match suture_engine::inspect(p) {
            Ok(found) if !found.is_empty() || pid.is_some() => rows.push((p, found)),
            Ok(_) => {}
            Err(e) if pid.is_some() => return Err(e),
            Err(_) => unreadable += 1,
        }
    }
    let me_root = nix::unistd::geteuid().is_root();
    if j {
        output::json(
            &json!({"ok": true, "unreadable": unreadable, "processes": rows.iter().map(|(p, found)| json!({
            "pid": p,
            "patches": found.iter().filter(|f| f.state == PatchState::Applied).filter_map(|f| f.record.as_ref()).collect::<Vec<_>>(),
            "other": found.iter().filter(|f| f.state != PatchState::Applied).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()}),
        );
        return Ok(0);
    }
    if rows.iter().all(|(_, v)| v.is_empty()) {
        println!("no patched processes");
    }
    for (p, found) in &rows {
        for f in found {
            match (&f.record, f.state) {
                (Some(r), PatchState::Applied) => {
                    let cves = if r.cves.is_empty() {
                        String::new()
                    } else {
                        format!(" fixes {}", r.cves.join(","))
                    };
                    println!(
                        "pid {p}: {} level {} in {} ({} function(s)){}",
                        output::clean(&r.id),
                        r.level,
                        output::clean(&r.module),
                        r.functions.len(),
                        output::clean(&cves)
                    );
                }
                _ => println!(
                    "pid {p}: {} is {} (not applied): {}",
                    output::clean(&f.name),
                    f.state.as_str(),
                    output::clean(f.reason.as_deref().unwrap_or(""))
                ),
            }
        }
    }
    if unreadable > 0 && !me_root {
        println!(
            "{unreadable} process(es) could not be read (not root): run as root to see every process"
        );
    }
    Ok(0)
}

fn print_reverted(r: &RevertReport) {
    println!(
        "reverted {} (level {}, was {}) in pid {}: {} function(s) restored; threads stopped {} µs in all ({} µs all at once)",
        output::clean(&r.patch),
        r.level,
        r.was,
        r.pid,
        r.functions,
        r.stopped_us,
        r.all_stopped_us
    );
}

/// Runs `op` on every pid, `jobs` at a time, each on its own thread (a ptrace session belongs
/// to the thread that made it). After an interrupt (SIGINT/SIGTERM/SIGHUP) no new process is
/// started; those in progress finish or undo.
fn for_all<T: Send>(
    pids: &[i32],
    jobs: Option<usize>,
    quiet: bool,
    op: impl Fn(i32) -> std::result::Result<T, EngineError> + Sync,
) -> Vec<(i32, std::result::Result<T, EngineError>)> {
    let jobs = jobs
        .unwrap_or_else(suture_engine::default_jobs)
        .clamp(1, 64)
        .min(pids.len().max(1));
    let bar = if quiet || pids.len() < 8 {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(pids.len() as u64)
    };
    // Before our own threads run (they would count as load).
    let busy = suture_engine::stop::sense_host_load(3);
    tracing::debug!(busy, jobs, "host load sensed");
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                if suture_engine::interrupt::requested() {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&pid) = pids.get(i) else { break };
                let r = op(pid);
                bar.inc(1);
                if let Ok(mut v) = results.lock() {
                    v.push((pid, r));
                }
            });
        }
    });
    bar.finish_and_clear();
    results.into_inner().unwrap_or_else(|p| p.into_inner())
}

fn revert_all(j: bool, id: Option<&str>, opts: &ApplyOptions, jobs: Option<usize>) -> Result<i32> {
    // Every (process, patch) pair to take out: the named patch, or every patch.
    let mut work: Vec<(i32, String)> = Vec::new();
    // Every process is looked at (its maps and patch records), in parallel.
    let mut seen = for_all(&suture_engine::procfs::all_pids()?, jobs, true, |pid| {
        suture_engine::inspect(pid).map_err(EngineError::Failed)
    });
    seen.sort_by_key(|(pid, _)| *pid);
    for (pid, found) in seen {
        let Ok(found) = found else {
            continue;
        };
        for f in found {
            if f.state == PatchState::Invalid {
                continue;
            }
            if id.is_none_or(|want| f.name == want) {
                work.push((pid, f.name));
            }
        }
    }
    let pids: Vec<i32> = {
        let mut v: Vec<i32> = work.iter().map(|(p, _)| *p).collect();
        v.dedup();
        v
    };
    let started = std::time::Instant::now();
    let mut results = for_all(&pids, jobs, j, |pid| {
        let mut done = Vec::new();
        // Newest first: a lower level under a higher one is not reachable anyway.
        for (_, name) in work.iter().filter(|(p, _)| *p == pid).rev() {
            done.push(suture_engine::revert(pid, Some(name), opts)?);
        }
        Ok(done)
    });
    results.sort_by_key(|(pid, _)| *pid);
    let failed: Vec<(i32, &EngineError)> = results
        .iter()
        .filter_map(|(p, r)| r.as_ref().err().map(|e| (*p, e)))
        .collect();
    let ok: Vec<&RevertReport> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flatten()
        .collect();
    if j {
        output::json(&json!({
            "ok": failed.is_empty(),
            "elapsed_ms": started.elapsed().as_millis() as u64,
            "results": ok,
            "failures": failed.iter().map(|(p, e)| json!({"pid": p, "kind": e.kind(), "error": e.to_string()})).collect::<Vec<_>>(),
        }));
    } else {
        if ok.len() <= 20 {
            for r in &ok {
                print_reverted(r);
            }
        }
        for (p, e) in &failed {
            print_failure(*p, e, "not reverted");
        }
        println!(
            "{} patch(es) reverted in {} process(es) in {:.2} s",
            ok.len(),
            pids.len() - failed.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}
