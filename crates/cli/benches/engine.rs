//! `cargo bench -p suture --bench engine`: pause time, fleet throughput and call overhead,
//! measured on real processes. Prints a Markdown table for BENCHMARKS.md.
//!
//! Pause is compared with the floor measured in the same run on the same process: a bare
//! seize + interrupt + detach of all its threads.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use suture_build::{handmade_manifest, Handmade, Replace};
use suture_bundle::{Bundle, SecretKey};
use suture_engine::ApplyOptions;

const C: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/c");

fn gcc(dir: &Path, args: &[&str]) {
    let st = Command::new("gcc")
        .current_dir(dir)
        .args(args)
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc {args:?}");
}

fn bundle(dir: &Path, target: &str, object: &str, funcs: &[String], key: &Path) -> Bundle {
    let t = std::fs::read(dir.join(target)).expect("target");
    let o = std::fs::read(dir.join(object)).expect("object");
    let m = handmade_manifest(&Handmade {
        target: &t,
        target_name: target.into(),
        object: &o,
        replaces: funcs
            .iter()
            .map(|f| Replace {
                function: f.clone(),
                replacement: f.clone(),
            })
            .collect(),
        id: None,
        level: 1,
        cves: vec![],
        description: String::new(),
    })
    .expect("manifest");
    Bundle::sign(m, o, &SecretKey::load(key).expect("key")).expect("sign")
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

struct Proc {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Proc {
    fn start(exe: &Path, arg: &str) -> Proc {
        let mut child = Command::new(exe)
            .arg(arg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut l = String::new();
        out.read_line(&mut l).expect("ready");
        Proc { child, out }
    }
    fn ask(&mut self, q: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{q}").expect("write");
        let mut l = String::new();
        self.out.read_line(&mut l).expect("read");
        l.trim().to_string()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    gcc(
        d,
        &[
            "-O2",
            "-pthread",
            &format!("{C}/bench_target.c"),
            "-o",
            "bench_target",
        ],
    );
    gcc(
        d,
        &[
            "-O2",
            "-c",
            "-ffunction-sections",
            &format!("{C}/bench_patch.c"),
            "-o",
            "bench_patch.o",
        ],
    );
    gcc(d, &["-O2", &format!("{C}/idle.c"), "-o", "idle"]);
    gcc(
        d,
        &[
            "-O2",
            "-c",
            "-ffunction-sections",
            &format!("{C}/idle_patch.c"),
            "-o",
            "idle_patch.o",
        ],
    );
    let (key, _) = suture_bundle::generate_keypair("bench", d).expect("keys");
    let opts = ApplyOptions::default();
    let reps: usize = std::env::var("SUTURE_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);

    // SUTURE_BENCH_ONLY=scan: only the host scan (the other scenarios take minutes);
    // =startup: only the start-up latency the agent's gate adds; =agent: the agent on a host
    // of many processes; =rtt: what a client of a single-threaded server sees; =fleet: `apply
    // --all` to many processes; =command: one `suture apply` command at a time; =pause: stop
    // times and unit prices.
    match std::env::var("SUTURE_BENCH_ONLY").as_deref() {
        Ok("scan") => return host_scan(d, reps),
        Ok("startup") => return startup(d),
        Ok("agent") => return agent_fleet(d),
        Ok("rtt") => return client_rtt(d, &key),
        Ok("fleet") => return fleet(d, &key, &opts),
        Ok("command") => return command(d, &key),
        Ok("pause") => return pause(d, &key, &opts, reps),
        _ => {}
    }

    pause(d, &key, &opts, reps);

    println!("\n## Call overhead of a patched tiny hot function\n");
    let mut p = Proc::start(&d.join("bench_target"), "1");
    let pid = p.child.id() as i32;
    let calls = "calls 200000000";
    let before: f64 = (0..3)
        .map(|_| p.ask(calls).parse::<f64>().expect("rate"))
        .fold(0.0, f64::max);
    let bh = bundle(
        d,
        "bench_target",
        "bench_patch.o",
        &["hot".to_string()],
        &key,
    );
    suture_engine::apply(pid, &bh, &opts).expect("apply hot");
    let after: f64 = (0..3)
        .map(|_| p.ask(calls).parse::<f64>().expect("rate"))
        .fold(0.0, f64::max);
    println!("| before (calls/s) | after (calls/s) | after/before |\n|---:|---:|---:|");
    println!("| {:.0} | {:.0} | {:.3} |", before, after, after / before);
    drop(p);

    command(d, &key);
    fleet(d, &key, &opts);
    host_scan(d, reps);
}

/// How long threads are stopped by an apply and a revert, against a bare stop of the same
/// threads, and the unit prices an apply is made of.
fn pause(d: &Path, key: &Path, opts: &ApplyOptions, reps: usize) {
    println!(
        "## Pause (median of {reps}; floor = bare seize+interrupt+detach of the same threads)\n"
    );
    println!("| threads | functions | floor µs | apply, all threads at once µs | ratio | apply, any thread stopped µs | longest one-thread stop µs | prep µs (1 thread) | apply wall µs | revert, all at once µs | revert, any µs |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let one = vec!["f0".to_string()];
    let twenty: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let b1 = bundle(d, "bench_target", "bench_patch.o", &one, key);
    let b20 = bundle(d, "bench_target", "bench_patch.o", &twenty, key);
    for threads in [1usize, 8, 64] {
        let p = Proc::start(&d.join("bench_target"), &threads.to_string());
        let pid = p.child.id() as i32;
        std::thread::sleep(Duration::from_millis(50));
        for (nf, b) in [(1, &b1), (20, &b20)] {
            let (mut floor, mut all, mut any, mut longest, mut prep, mut rev_all, mut rev_any) =
                (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
            let mut wall = vec![];
            for _ in 0..reps {
                floor.push(suture_engine::bare_stop(pid).expect("floor"));
                let t = Instant::now();
                let r = suture_engine::apply(pid, b, opts).expect("apply");
                wall.push(t.elapsed().as_micros() as u64);
                all.push(r.all_stopped_us);
                any.push(r.stopped_us);
                longest.push(r.longest_thread_stop_us);
                prep.push(r.prep_us);
                let r = suture_engine::revert(pid, None, opts).expect("revert");
                rev_all.push(r.all_stopped_us);
                rev_any.push(r.stopped_us);
            }
            let (f, s) = (median(floor), median(all));
            println!(
                "| {threads} | {nf} | {f} | {s} | {:.2}× | {} | {} | {} | {} | {} | {} |",
                s as f64 / f.max(1) as f64,
                median(any),
                median(longest),
                median(prep),
                median(wall),
                median(rev_all),
                median(rev_any)
            );
        }
    }

    // The unit prices an apply is made of, in one process of the same run.
    {
        let p = Proc::start(&d.join("bench_target"), "1");
        let pid = p.child.id() as i32;
        std::thread::sleep(Duration::from_millis(50));
        let (mut floor, mut laid, mut call) = (vec![], vec![], vec![]);
        for _ in 0..reps {
            floor.push(suture_engine::bare_stop(pid).expect("floor"));
            let (l, c) = suture_engine::bare_injected_call(pid).expect("injected call");
            laid.push(l);
            call.push(c);
        }
        println!("\n## Unit prices, 1 thread (median of {reps})\n");
        println!("| bare stop (floor) µs | lay an injection frame µs | one injected system call µs |\n|---:|---:|---:|");
        println!(
            "| {} | {} | {} |",
            median(floor),
            median(laid),
            median(call)
        );
    }
}

/// Processes that keep `n` CPUs busy (a shell loop each) while it lives: the load the goals
/// are set under.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(n: usize) -> Hogs {
        let hogs = (0..n)
            .map(|_| {
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .expect("spawn a busy loop")
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        Hogs(hogs)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for h in &mut self.0 {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

/// The number of CPUs (one busy process each makes a loaded host).
fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// One `suture apply` (and `revert`) command at a time on an idle 1-thread process, each a new
/// process with cold caches, beside `suture --version` (what starting the binary costs) in the
/// same run.
fn command(d: &Path, key: &Path) {
    let rounds: usize = std::env::var("SUTURE_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let exe = env!("CARGO_BIN_EXE_suture");
    let b = bundle(d, "idle", "idle_patch.o", &["handle".to_string()], key);
    let path = d.join("command.bundle");
    b.write_file(&path).expect("write bundle");
    let trust = key.with_extension("pub");
    let mut target = Command::new(d.join("idle"))
        .stdin(Stdio::piped())
        .spawn()
        .expect("idle");
    std::thread::sleep(Duration::from_millis(100));
    let pid = target.id().to_string();
    let spawn = |program: &str, args: &[&str]| {
        let t = Instant::now();
        let st = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("spawn");
        assert!(st.success(), "{program} {args:?}");
        t.elapsed().as_micros() as u64
    };
    let run = |args: &[&str]| spawn(exe, args);
    let bundle_arg = path.to_string_lossy().into_owned();
    let trust_arg = trust.to_string_lossy().into_owned();
    let p90 = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() * 9 / 10]
    };
    println!("\n## One command at a time (a new `suture` process each, cold caches; median of {rounds})\n");
    println!("| host | floor: `true` µs | `suture --version` µs | `suture apply` µs (p90) | `suture revert` µs (p90) | apply − version µs | apply / floor |\n|---|---:|---:|---:|---:|---:|---:|");
    for busy in [0, cpus()] {
        let _hogs = Hogs::start(busy);
        // The floor: what starting any program costs on this machine.
        let (mut floor, mut version, mut apply, mut revert) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            floor.push(spawn("true", &[]));
            version.push(run(&["--version"]));
            apply.push(run(&[
                "apply",
                "--pid",
                &pid,
                "--trust",
                &trust_arg,
                &bundle_arg,
            ]));
            revert.push(run(&["revert", "--pid", &pid]));
        }
        let (f, v, a, r) = (
            median(floor),
            median(version.clone()),
            median(apply.clone()),
            median(revert.clone()),
        );
        let host = if busy == 0 {
            "idle".to_string()
        } else {
            format!("{busy} busy processes")
        };
        println!(
            "| {host} | {f} | {v} | {a} ({}) | {r} ({}) | {} | {:.2}× |",
            p90(apply),
            p90(revert),
            a.saturating_sub(v),
            a as f64 / f.max(1) as f64
        );
    }
    let _ = target.kill();
    let _ = target.wait();
}

/// `apply --all` to many idle processes, the way the fleet goal is stated: on a host that also
/// maps a large unrelated binary, idle and under load (one busy process per CPU), each next to
/// the floor of the same run — a bare ptrace stop of every one of those processes, made by as
/// many threads (the least any ptrace patcher needs per process).
fn fleet(d: &Path, key: &Path, opts: &ApplyOptions) {
    let fleet: usize = std::env::var("SUTURE_BENCH_FLEET")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    println!("\n## Fleet: one bundle to {fleet} processes on this host (`apply --all` path)\n");
    gcc(d, &["-O2", &format!("{C}/big.c"), "-o", "big"]);
    let spawn = |exe: &Path| {
        Command::new(exe)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let mut kids: Vec<Child> = vec![spawn(&d.join("big"))];
    kids.extend((0..fleet).map(|_| spawn(&d.join("idle"))));
    std::thread::sleep(Duration::from_millis(500));
    let idle_pids: Vec<i32> = kids[1..].iter().map(|k| k.id() as i32).collect();
    let bi = bundle(d, "idle", "idle_patch.o", &["handle".to_string()], key);
    let build_id = hex::decode(&bi.manifest.module.build_id).expect("hex");
    let jobs = std::env::var("SUTURE_BENCH_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(suture_engine::default_jobs);
    // Runs `op` on every pid, `jobs` threads at a time; counts the failures.
    let on_all = |pids: &[i32], op: &(dyn Fn(i32) -> bool + Sync)| {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failures = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..jobs {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&pid) = pids.get(i) else { break };
                    if !op(pid) {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        failures.into_inner()
    };
    let big_mb = std::fs::metadata(d.join("big")).expect("big").len() >> 20;
    println!(
        "Also running: one process mapping a {big_mb} MB unrelated executable; {jobs} jobs.\n"
    );
    println!("| host | processes | failures | scan s | total s | processes/s | bare stop of each, processes/s | apply / bare stop |\n|---|---:|---:|---:|---:|---:|---:|---:|");
    for busy in [0, cpus()] {
        let hogs = Hogs::start(busy);
        // As `apply --all` does before its jobs start.
        let busy_host = suture_engine::stop::sense_host_load(3);
        let t = Instant::now();
        on_all(&idle_pids, &|pid| suture_engine::bare_stop(pid).is_ok());
        let floor = t.elapsed();
        let t = Instant::now();
        let pids = suture_engine::processes_mapping(&build_id).expect("scan");
        let scan = t.elapsed();
        let failures = on_all(&pids, &|pid| suture_engine::apply(pid, &bi, opts).is_ok());
        let total = t.elapsed();
        let rate = pids.len() as f64 / total.as_secs_f64();
        let floor_rate = idle_pids.len() as f64 / floor.as_secs_f64();
        let host = match (busy, busy_host) {
            (0, false) => "idle".to_string(),
            (0, true) => "idle (sensed busy)".to_string(),
            (n, true) => format!("{n} busy processes"),
            (n, false) => format!("{n} busy processes (not sensed)"),
        };
        println!(
            "| {host} | {} | {failures} | {:.2} | {:.2} | {rate:.0} | {floor_rate:.0} | {:.1}× |",
            pids.len(),
            scan.as_secs_f64(),
            total.as_secs_f64(),
            floor_rate / rate,
        );
        // Unpatched again for the next round (not timed).
        on_all(&pids, &|pid| suture_engine::revert(pid, None, opts).is_ok());
        drop(hogs);
    }
    for k in &mut kids {
        let _ = k.kill();
    }
    for k in &mut kids {
        let _ = k.wait();
    }
}

/// Finding the processes that map a module by build-id, with N copies of a small service and
/// one unrelated process whose binary is 200 MB. "Whole files" is how every mapped file used to
/// be read to learn its build-id (`loaded_modules`, still what a patched process gets); "headers"
/// is what the scan does now. Both cold (caches emptied), on the same processes in the same run.
fn host_scan(d: &Path, reps: usize) {
    use suture_engine::{modules, procfs};
    let n: usize = std::env::var("SUTURE_BENCH_SCAN_PROCS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let reps = reps.clamp(1, 5);
    gcc(d, &["-O2", &format!("{C}/big.c"), "-o", "big"]);
    let big_mb = std::fs::metadata(d.join("big")).expect("big").len() >> 20;
    let spawn = |exe: &str| {
        Command::new(d.join(exe))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let mut kids: Vec<Child> = vec![spawn("big")];
    kids.extend((0..n).map(|_| spawn("idle")));
    std::thread::sleep(Duration::from_millis(500));
    let pids: Vec<i32> = kids.iter().map(|k| k.id() as i32).collect();
    let id = suture_module::read_build_id(&std::fs::read(d.join("idle")).expect("idle"))
        .expect("elf")
        .expect("build-id");
    let time = |find: &dyn Fn(i32, &[procfs::Mapping]) -> bool| {
        let runs: Vec<u64> = (0..reps)
            .map(|_| {
                modules::forget_cached_files();
                let t = Instant::now();
                let found = pids
                    .iter()
                    .filter(|&&pid| {
                        let maps = procfs::read_maps(pid).expect("maps");
                        find(pid, &maps)
                    })
                    .count();
                assert_eq!(found, n, "the idle copies, not the big one");
                t.elapsed().as_micros() as u64
            })
            .collect();
        median(runs)
    };
    let whole = time(&|pid, maps| {
        modules::loaded_modules(pid, maps)
            .iter()
            .any(|m| m.facts.build_id.as_deref() == Some(&id[..]))
    });
    let headers = time(&|pid, maps| modules::maps_build_id(pid, maps, &id));
    modules::forget_cached_files();
    let t = Instant::now();
    let found = suture_engine::processes_mapping(&id).expect("scan");
    let host_cold = t.elapsed().as_micros();
    let t = Instant::now();
    suture_engine::processes_mapping(&id).expect("scan");
    let host_warm = t.elapsed().as_micros();
    assert_eq!(found.len(), n);
    println!(
        "\n## Host scan by build-id: {n} processes + 1 unrelated {big_mb} MB ELF mapped (cold, median of {reps})\n"
    );
    println!("| whole files ms | headers ms | ratio | whole host, cold ms | whole host, warm ms |\n|---:|---:|---:|---:|---:|");
    println!(
        "| {:.1} | {:.1} | {:.0}× | {:.1} | {:.1} |",
        whole as f64 / 1000.0,
        headers as f64 / 1000.0,
        whole as f64 / headers.max(1) as f64,
        host_cold as f64 / 1000.0,
        host_warm as f64 / 1000.0
    );
    for k in &mut kids {
        let _ = k.kill();
    }
    for k in &mut kids {
        let _ = k.wait();
    }
}

/// What holding a starting process costs it: wall time from spawn to exit of a program that
/// calls the patched function first thing, watched by a running `suture agent` (held, patched
/// before it runs) against an identical program of another build-id that nothing watches,
/// alternated in one run. Same for a library the program links.
fn startup(d: &Path) {
    let tests_c = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c");
    let n: usize = std::env::var("SUTURE_BENCH_STARTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let src = format!("{tests_c}/first_call.c");
    let rpath = format!("-Wl,-rpath,{}", d.display());
    for (name, id) in [("first", 1), ("first_ctl", 2)] {
        gcc(
            d,
            &[
                "-O2",
                &format!("-Wl,--build-id=0x{id:040x}"),
                &src,
                "-o",
                name,
            ],
        );
    }
    for (lib, id) in [("first", 3), ("firstctl", 4)] {
        let out = format!("lib{lib}.so");
        gcc(
            d,
            &[
                "-O2",
                "-shared",
                "-fPIC",
                &format!("-Wl,--build-id=0x{id:040x}"),
                &format!("{tests_c}/libfirst.c"),
                "-o",
                &out,
            ],
        );
        let exe = format!("linked_{lib}");
        gcc(
            d,
            &[
                "-O2",
                "-DLIBRARY",
                &src,
                "-o",
                &exe,
                "-L.",
                &format!("-l{lib}"),
                &rpath,
            ],
        );
    }
    gcc(
        d,
        &[
            "-O2",
            "-c",
            "-fPIE",
            "-ffunction-sections",
            &format!("{tests_c}/patch_first.c"),
            "-o",
            "patch_first.o",
        ],
    );
    let dirs = AgentDirs::new(d, "gate");
    for (target, out) in [
        ("first", "first.suture"),
        ("libfirst.so", "libfirst.suture"),
    ] {
        dirs.bundle(
            "gate",
            target,
            "patch_first.o",
            "first_check",
            &dirs.bundles.join(out),
        );
    }
    std::fs::remove_file(dirs.trust.join("gate.key")).expect("key");
    let mut agent = dirs.agent("gate-agent.log");
    let start = |exe: &str| {
        let t = Instant::now();
        let o = Command::new(d.join(exe)).output().expect("start");
        (
            t.elapsed().as_micros() as u64,
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while start("first").1 != "-1" || start("linked_first").1 != "-1" {
        assert!(
            Instant::now() < deadline,
            "the agent never patched new processes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("\n## Start-up latency added by the agent's gate ({n} starts each, alternated; wall time spawn → exit)\n");
    println!("| target | not watched, median µs | held and patched, median µs | added, median µs | not watched p99 µs | held p99 µs |\n|---|---:|---:|---:|---:|---:|");
    for (label, watched, control) in [
        ("executable", "first", "first_ctl"),
        ("linked library", "linked_first", "linked_firstctl"),
    ] {
        let (mut free, mut held) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (us, out) = start(control);
            assert_eq!(out, "3");
            free.push(us);
            let (us, out) = start(watched);
            assert_eq!(out, "-1", "a start ran unpatched");
            held.push(us);
        }
        let p99 = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[v.len() * 99 / 100]
        };
        let (mf, mh) = (median(free.clone()), median(held.clone()));
        println!(
            "| {label} | {mf} | {mh} | {} | {} | {} |",
            mh.saturating_sub(mf),
            p99(free),
            p99(held)
        );
    }
    let _ = agent.kill();
    let _ = agent.wait();
}

/// The agent on a host of N idle processes (default 1000) that all map the target: from a
/// bundle dropped into its folder to the bundle live in every one of them (journal lines),
/// then the agent's own CPU time and memory while nothing changes (default 10 s passes).
fn agent_fleet(d: &Path) {
    let n: usize = std::env::var("SUTURE_BENCH_PROCS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let idle_secs: u64 = std::env::var("SUTURE_BENCH_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    gcc(
        d,
        &[
            "-O2",
            "-Wl,--build-id=0x5eed000000000000000000000000000000000001",
            &format!("{C}/idle.c"),
            "-o",
            "fleet_idle",
        ],
    );
    let dirs = AgentDirs::new(d, "fleet");
    let staged = d.join("fleet.suture");
    dirs.bundle("fleet", "fleet_idle", "idle_patch.o", "handle", &staged);
    std::fs::remove_file(dirs.trust.join("fleet.key")).expect("key");
    let (bundles, state) = (&dirs.bundles, &dirs.state);
    let mut kids: Vec<Child> = (0..n)
        .map(|_| {
            Command::new(d.join("fleet_idle"))
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut agent = dirs.agent("fleet-agent.log");
    std::thread::sleep(Duration::from_secs(2));
    let applied = || {
        std::fs::read_to_string(state.join("journal.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"event\":\"applied\""))
            .count()
    };
    std::fs::copy(&staged, bundles.join(".incoming")).expect("copy");
    let t = Instant::now();
    std::fs::rename(bundles.join(".incoming"), bundles.join("fleet.suture")).expect("rename");
    let deadline = Instant::now() + Duration::from_secs(600);
    while applied() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} patched",
            applied()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let live_ms = t.elapsed().as_millis() as u64;
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
    };
    let rss_kb = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let c0 = cpu(agent.id());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_cpu = (cpu(agent.id()) - c0) as f64 / hz / idle_secs as f64 * 100.0;
    println!("\n## The agent on a host of {n} processes\n");
    println!("| processes | bundle dropped → live in all, ms | processes/s | agent CPU while idle ({idle_secs} s, 10 s passes) | agent RSS MB |\n|---:|---:|---:|---:|---:|");
    println!(
        "| {n} | {live_ms} | {:.0} | {idle_cpu:.2}% | {:.1} |",
        n as f64 * 1000.0 / live_ms.max(1) as f64,
        rss_kb(agent.id()) as f64 / 1024.0
    );
    let _ = agent.kill();
    let _ = agent.wait();
    for k in &mut kids {
        let _ = k.kill();
    }
    for k in &mut kids {
        let _ = k.wait();
    }
}

/// What a client sees: a single-threaded request/response server (every client waits on its
/// one thread, as with Redis) answers a client that sends requests back to back; its worst
/// round trip while nothing happens is compared with its worst round trip over windows in
/// which the server is patched and unpatched (apply and revert in-process), in one run.
fn client_rtt(d: &Path, key: &Path) {
    let rounds: usize = std::env::var("SUTURE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    gcc(
        d,
        &[
            "-O2",
            "-pthread",
            &format!("{C}/rtt_server.c"),
            "-o",
            "rtt_server",
        ],
    );
    gcc(
        d,
        &[
            "-O2",
            "-c",
            "-ffunction-sections",
            &format!("{C}/rtt_patch.c"),
            "-o",
            "rtt_patch.o",
        ],
    );
    let b = bundle(d, "rtt_server", "rtt_patch.o", &["handle".to_string()], key);
    println!("\n## A client of a server with one serving thread: round trips around {rounds} applies and reverts\n");
    println!("| background threads | baseline median µs | baseline p99 µs | baseline worst µs | worst around apply µs | worst around revert µs | (worst around op) / (baseline worst) | worst per op-long baseline window, median / p90 µs | worst per op, median / p90 µs | ratio, median / p90 | largest reported stop µs: all at once / any (apply) | wrong answers |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for idle in [0, 3] {
        client_rtt_row(d, &b, rounds, idle);
    }
}

/// One row of [`client_rtt`]: the server with `idle` background threads.
fn client_rtt_row(d: &Path, b: &Bundle, rounds: usize, idle: usize) {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let mut server = Command::new(d.join("rtt_server"))
        .args([port.to_string(), idle.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("server");
    let mut ready = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("ready");
    let pid = server.id() as i32;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    // (microseconds since start, round trip in microseconds, answer)
    let samples: Mutex<Vec<(u64, u64, i64)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    // (start µs, end µs, kind, all-at-once µs, any µs)
    let mut windows: Vec<(u64, u64, &str, u64, u64)> = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut x: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                x += 1;
                let t = Instant::now();
                conn.write_all(&x.to_ne_bytes()).expect("send");
                let mut buf = [0u8; 8];
                conn.read_exact(&mut buf).expect("answer");
                let rtt = t.elapsed().as_micros() as u64;
                let y = i64::from_ne_bytes(buf);
                samples.lock().expect("samples").push((
                    t.duration_since(t0).as_micros() as u64,
                    rtt,
                    y - x * 7,
                ));
            }
        });
        std::thread::sleep(Duration::from_secs(2)); // baseline
        let opts = ApplyOptions::default();
        // Runs one operation and keeps its window: (start, end, kind, all-at-once, any).
        let mut timed = |kind: &'static str, op: &dyn Fn() -> (u64, u64)| {
            let a = t0.elapsed().as_micros() as u64;
            let (all, any) = op();
            windows.push((a, t0.elapsed().as_micros() as u64, kind, all, any));
            std::thread::sleep(Duration::from_millis(50));
        };
        for _ in 0..rounds {
            timed("apply", &|| {
                let r = suture_engine::apply(pid, b, &opts).expect("apply");
                (r.all_stopped_us, r.stopped_us)
            });
            timed("revert", &|| {
                let r = suture_engine::revert(pid, None, &opts).expect("revert");
                (r.all_stopped_us, r.stopped_us)
            });
        }
        stop.store(true, Ordering::Relaxed);
    });
    let samples = samples.into_inner().expect("samples");
    let baseline: Vec<u64> = samples
        .iter()
        .filter(|s| s.0 < 2_000_000)
        .map(|s| s.1)
        .collect();
    let wrong = samples.iter().filter(|s| s.2 != 1 && s.2 != 2).count();
    // The worst round trip overlapping each operation's window.
    let worst_per_op = |kind: &str| -> Vec<u64> {
        windows
            .iter()
            .filter(|w| w.2 == kind)
            .map(|&(a, e, _, _, _)| {
                samples
                    .iter()
                    .filter(|s| s.0 <= e && s.0 + s.1 >= a)
                    .map(|s| s.1)
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    };
    let worst_in = |kind: &str| worst_per_op(kind).into_iter().max().unwrap_or(0);
    // The same statistic without operations: the worst round trip of each baseline window as
    // long as a typical operation. A VM's rare multi-millisecond hiccups dominate a single
    // worst; the median of the per-window worsts does not.
    let op_len = median(windows.iter().map(|w| w.1 - w.0).collect()).max(1);
    let mut base_worsts: Vec<u64> = Vec::new();
    let mut start = 0u64;
    while start + op_len < 2_000_000 {
        let end = start + op_len;
        if let Some(w) = samples
            .iter()
            .filter(|s| s.0 <= end && s.0 + s.1 >= start && s.0 < 2_000_000)
            .map(|s| s.1)
            .max()
        {
            base_worsts.push(w);
        }
        start = end;
    }
    let pct = |mut v: Vec<u64>, p: usize| {
        v.sort_unstable();
        v.get(v.len() * p / 100).copied().unwrap_or(0)
    };
    let ops: Vec<u64> = worst_per_op("apply")
        .into_iter()
        .chain(worst_per_op("revert"))
        .collect();
    let (b50, b90) = (pct(base_worsts.clone(), 50), pct(base_worsts, 90));
    let (o50, o90) = (pct(ops.clone(), 50), pct(ops, 90));
    let largest = |field: fn(&(u64, u64, &str, u64, u64)) -> u64| {
        windows
            .iter()
            .filter(|w| w.2 == "apply")
            .map(field)
            .max()
            .unwrap_or(0)
    };
    let (apply_all, apply_any) = (largest(|w| w.3), largest(|w| w.4));
    let mut sorted = baseline.clone();
    sorted.sort_unstable();
    let (bmed, bp99, bmax) = (
        sorted[sorted.len() / 2],
        sorted[sorted.len() * 99 / 100],
        sorted[sorted.len() - 1],
    );
    let (wa, wr) = (worst_in("apply"), worst_in("revert"));
    println!("| {idle} | {bmed} | {bp99} | {bmax} | {wa} | {wr} | {:.2}× | {b50} / {b90} | {o50} / {o90} | {:.2}× / {:.2}× | {apply_all} / {apply_any} | {wrong} |", wa.max(wr) as f64 / bmax.max(1) as f64, o50 as f64 / b50.max(1) as f64, o90 as f64 / b90.max(1) as f64);
    drop(conn);
    let _ = server.kill();
    let _ = server.wait();
}

/// A real `suture` agent's folders in `d` (named `{prefix}-…`), with a fresh trusted key.
struct AgentDirs {
    dir: PathBuf,
    bundles: PathBuf,
    trust: PathBuf,
    state: PathBuf,
}

impl AgentDirs {
    fn new(d: &Path, prefix: &str) -> AgentDirs {
        let a = AgentDirs {
            dir: d.to_path_buf(),
            bundles: d.join(format!("{prefix}-bundles")),
            trust: d.join(format!("{prefix}-trust")),
            state: d.join(format!("{prefix}-state")),
        };
        for dir in [&a.bundles, &a.trust] {
            std::fs::create_dir_all(dir).expect("dir");
        }
        a.suture(&[
            "keygen",
            "--name",
            prefix,
            "--out",
            &a.trust.display().to_string(),
        ]);
        a
    }

    /// Runs a `suture` command in `d`, asserting success.
    fn suture(&self, args: &[&str]) {
        let o = Command::new(env!("CARGO_BIN_EXE_suture"))
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("suture");
        assert!(
            o.status.success(),
            "suture {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Signs a bundle of `object` replacing `function` in `target`; the key then goes away
    /// (only its public half stays trusted).
    fn bundle(&self, key: &str, target: &str, object: &str, function: &str, out: &Path) {
        self.suture(&[
            "bundle",
            "--target",
            target,
            "--object",
            object,
            "--replace",
            function,
            "--level",
            "1",
            "--key",
            &self.trust.join(format!("{key}.key")).display().to_string(),
            "--out",
            &out.display().to_string(),
        ]);
    }

    /// Starts `suture agent run` on these folders, watching `d`; its log goes to `log`.
    fn agent(&self, log: &str) -> Child {
        Command::new(env!("CARGO_BIN_EXE_suture"))
            .args([
                "agent",
                "run",
                "--bundle-dir",
                &self.bundles.display().to_string(),
                "--trust-dir",
                &self.trust.display().to_string(),
                "--state-dir",
                &self.state.display().to_string(),
                "--watch-path",
                &self.dir.display().to_string(),
            ])
            .stderr(std::fs::File::create(self.dir.join(log)).expect("log"))
            .spawn()
            .expect("agent")
    }
}
