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
}
