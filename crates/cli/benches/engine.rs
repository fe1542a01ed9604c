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

    // SUTURE_BENCH_ONLY=scan: only the host scan (the other scenarios take minutes).
    if std::env::var("SUTURE_BENCH_ONLY").as_deref() == Ok("scan") {
        host_scan(d, reps);
        return;
    }

    println!(
        "## Pause (median of {reps}; floor = bare seize+interrupt+detach of the same threads)\n"
    );
    println!("| threads | functions | floor µs | apply stopped µs | ratio | prep µs (1 thread) | revert stopped µs |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let one = vec!["f0".to_string()];
    let twenty: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let b1 = bundle(d, "bench_target", "bench_patch.o", &one, &key);
    let b20 = bundle(d, "bench_target", "bench_patch.o", &twenty, &key);
    for threads in [1usize, 8, 64] {
        let p = Proc::start(&d.join("bench_target"), &threads.to_string());
        let pid = p.child.id() as i32;
        std::thread::sleep(Duration::from_millis(50));
        for (nf, b) in [(1, &b1), (20, &b20)] {
            let (mut floor, mut stopped, mut prep, mut rev) = (vec![], vec![], vec![], vec![]);
            for _ in 0..reps {
                floor.push(suture_engine::bare_stop(pid).expect("floor"));
                let r = suture_engine::apply(pid, b, &opts).expect("apply");
                stopped.push(r.stopped_us);
                prep.push(r.prep_us);
                let r = suture_engine::revert(pid, None, &opts).expect("revert");
                rev.push(r.stopped_us);
            }
            let (f, s) = (median(floor), median(stopped));
            println!(
                "| {threads} | {nf} | {f} | {s} | {:.2}× | {} | {} |",
                s as f64 / f.max(1) as f64,
                median(prep),
                median(rev)
            );
        }
    }

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

    let fleet: usize = std::env::var("SUTURE_BENCH_FLEET")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    println!("\n## Fleet: one bundle to {fleet} processes on this host (`apply --all` path)\n");
    let idle: PathBuf = d.join("idle");
    let mut kids: Vec<Child> = (0..fleet)
        .map(|_| {
            Command::new(&idle)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn idle")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let bi = bundle(d, "idle", "idle_patch.o", &["handle".to_string()], &key);
    let build_id = hex::decode(&bi.manifest.module.build_id).expect("hex");
    let t = Instant::now();
    let pids = suture_engine::processes_mapping(&build_id).expect("scan");
    let scan = t.elapsed();
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        * 2;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&pid) = pids.get(i) else { break };
                if suture_engine::apply(pid, &bi, &opts).is_err() {
                    failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let total = t.elapsed();
    println!(
        "| processes | failures | scan s | total s | processes/s |\n|---:|---:|---:|---:|---:|"
    );
    println!(
        "| {} | {} | {:.2} | {:.2} | {:.0} |",
        pids.len(),
        failures.load(std::sync::atomic::Ordering::Relaxed),
        scan.as_secs_f64(),
        total.as_secs_f64(),
        pids.len() as f64 / total.as_secs_f64()
    );
    for k in &mut kids {
        let _ = k.kill();
    }
    for k in &mut kids {
        let _ = k.wait();
    }
    host_scan(d, reps);
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
