//! Fault injection: `suture` killed, interrupted or stopped at every phase and at random
//! instants of apply and revert, and targets that misbehave (signals, setgid, fork, exec,
//! forged records). After each fault the target must be alive, running, uncorrupted (its own
//! threads check their answers and their vector registers all the time), either untouched or
//! fully patched, and recoverable by the next `suture` command.
//!
//! `SUTURE_FAULT_TRIALS=N` runs N random trials per fault kind instead of the short CI run.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Hostile {
    work: Work,
    exe: PathBuf,
    trust: PathBuf,
    p1: PathBuf,
    p2: PathBuf,
}

fn build() -> Hostile {
    let work = Work::new();
    work.gcc(&[
        "-O2",
        "-fno-omit-frame-pointer",
        "-pthread",
        &Work::src("hostile.c"),
        "-o",
        "hostile",
    ]);
    std::fs::write(
        work.path("fix.c"),
        "int compute_fixed(int x) { return x * 53; }\n",
    )
    .unwrap();
    work.gcc(&[
        "-O2",
        "-c",
        "-ffunction-sections",
        "-fdata-sections",
        &work.path("fix.c").display().to_string(),
        "-o",
        "fix.o",
    ]);
    let (key, trust) = work.keys("ops");
    let p1 = work.bundle(
        "hostile",
        "fix.o",
        &["compute=compute_fixed"],
        1,
        &key,
        "p1.suture",
    );
    let p2 = work.bundle(
        "hostile",
        "fix.o",
        &["compute=compute_fixed"],
        2,
        &key,
        "p2.suture",
    );
    Hostile {
        exe: work.path("hostile"),
        work,
        trust,
        p1,
        p2,
    }
}

/// Compiles a C program `name` in the work folder and signs a bundle replacing its `compute`
/// (the hostile fix); returns the bundle.
fn program_with_fix(h: &Hostile, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let work = &h.work;
    let src = work.path(&format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let mut args = vec!["-O2", "-fno-omit-frame-pointer"];
    args.extend_from_slice(flags);
    let src = src.display().to_string();
    args.extend_from_slice(&[src.as_str(), "-o", name]);
    work.gcc(&args);
    let fix = work.path(&format!("{name}-fix.suture"));
    let o = suture(&[
        "bundle",
        "--target",
        work.path(name).to_str().unwrap(),
        "--object",
        work.path("fix.o").to_str().unwrap(),
        "--replace",
        "compute=compute_fixed",
        "--level",
        "1",
        "--key",
        work.path("ops.key").to_str().unwrap(),
        "--out",
        fix.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    fix
}

fn stats(t: &mut Target) -> HashMap<String, i64> {
    t.ask("stats")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(-1)))
        .collect()
}

/// Status of the process: (applied patch ids, other patch memory as (name, state)).
fn patches(pid: i32) -> (Vec<String>, Vec<(String, String)>) {
    let (ok, v) = suture_json(&["status", "--pid", &pid.to_string()]);
    assert!(ok, "status: {v}");
    let p = &v["processes"][0];
    let applied = p["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let other = p["other"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (applied, other)
}

/// The target survived whatever happened: alive, running, nothing corrupted, and its
/// behaviour agrees with what it verifiably carries. Returns whether it is patched.
fn assert_sound(t: &mut Target, what: &str) -> bool {
    // No thread may be left stopped or traced by a dead suture.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", t.pid))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let stuck: Vec<String> = tasks
            .iter()
            .filter(|tid| {
                let st = std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", t.pid))
                    .unwrap_or_default();
                st.lines()
                    .any(|l| l.starts_with("State:\tt") || l.starts_with("State:\tT"))
                    || st
                        .lines()
                        .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
            })
            .cloned()
            .collect();
        if stuck.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: threads {stuck:?} stay stopped or traced"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(t.alive(), "{what}: the target died");
    assert_ne!(state(t.pid), "Z", "{what}: the target is a zombie");
    let answer = t.ask("compute 2");
    let (applied, _) = patches(t.pid);
    let patched = !applied.is_empty();
    assert_eq!(
        answer,
        if patched { "106" } else { "7" },
        "{what}: behaviour does not match status (applied: {applied:?})"
    );
    let s = stats(t);
    assert_eq!(s["bad"], 0, "{what}: a thread saw a wrong answer: {s:?}");
    assert_eq!(s["fpbad"], 0, "{what}: vector registers corrupted: {s:?}");
    assert_eq!(s.get("forkbad").copied().unwrap_or(0), 0, "{what}: {s:?}");
    patched
}

/// The next operation repairs anything an interrupted one left: apply works, leaves exactly
/// one applied patch and no other patch memory; revert leaves nothing.
fn assert_recoverable(h: &Hostile, t: &mut Target, what: &str) {
    let (ok, v) = apply_to(&h.p1, t.pid, &h.trust);
    if !ok {
        assert!(
            v["error"].as_str().unwrap_or("").contains("not newer"),
            "{what}: recovery apply failed: {v}"
        );
    }
    let (applied, other) = patches(t.pid);
    assert_eq!(applied.len(), 1, "{what}: {applied:?} {other:?}");
    assert!(
        other.is_empty(),
        "{what}: stale patch memory left: {other:?}"
    );
    assert_eq!(t.ask("compute 2"), "106", "{what}");
    let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(ok, "{what}: revert: {v}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    assert!(!maps.contains("memfd:suture"), "{what}: patch memory left");
    assert_eq!(t.ask("compute 2"), "7", "{what}");
    assert_sound(t, what);
}

/// Takes every patch (applied or left over) out of this one process (tests run side by side:
/// `revert --all` would touch the others' targets).
fn clean(t: &Target, what: &str) {
    let pid = t.pid_arg();
    for _ in 0..4 {
        let (applied, other) = patches(t.pid);
        if applied.is_empty() && other.is_empty() {
            return;
        }
        for name in applied
            .into_iter()
            .rev()
            .chain(other.into_iter().map(|(n, _)| n))
        {
            let (ok, v) = suture_json(&["revert", "--pid", &pid, &name]);
            assert!(ok, "{what}: cleaning {name}: {v}");
        }
    }
    panic!("{what}: patches keep coming back: {:?}", patches(t.pid));
}

/// Runs suture with a fault point set; returns whether it was killed by it.
fn suture_with_fault(fault: &str, args: &[&str]) -> bool {
    let out = Command::new(env!("CARGO_BIN_EXE_suture"))
        .args(args)
        .env("SUTURE_FAULT", fault)
        .env("SUTURE_LOG", "error")
        .output()
        .expect("suture runs");
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(libc::SIGKILL)
}

const APPLY_POINTS: &[&str] = &[
    "inject:entered",
    "inject:exited",
    "apply:memfd",
    "apply:mmapped",
    "inject:entered#4",
    "apply:resolved",
    "apply:mapped",
    "commit:stopped",
    "apply:inheritable",
    "commit:wrote-cluster",
    "apply:committed",
];

const REVERT_POINTS: &[&str] = &[
    "commit:stopped",
    "inject:entered",
    "revert:uninheritable",
    "commit:wrote-cluster",
    "revert:committed",
    "release:start",
    "inject:exited#2",
];

#[test]
fn killed_at_every_phase_of_apply_and_revert_the_target_survives_and_recovers() {
    let h = build();
    let mut t = Target::start(&h.exe, None);
    let pid = t.pid_arg();
    for point in APPLY_POINTS {
        let killed = suture_with_fault(
            point,
            &[
                "apply",
                h.p1.to_str().unwrap(),
                "--pid",
                &pid,
                "--trust",
                h.trust.to_str().unwrap(),
            ],
        );
        eprintln!("apply killed at {point}");
        assert!(killed, "apply never reached fault point {point}");
        let what = format!("apply killed at {point}");
        assert_sound(&mut t, &what);
        assert_recoverable(&h, &mut t, &what);
    }
    for point in REVERT_POINTS {
        let (ok, v) = apply_to(&h.p1, t.pid, &h.trust);
        assert!(ok, "{v}");
        let killed = suture_with_fault(point, &["revert", "--pid", &pid]);
        eprintln!("revert killed at {point}");
        assert!(killed, "revert never reached fault point {point}");
        let what = format!("revert killed at {point}");
        assert_sound(&mut t, &what);
        // Clean whatever is left (a partly reverted or orphaned patch), then the full cycle.
        clean(&t, &what);
        assert_recoverable(&h, &mut t, &what);
    }
    // Superseding level 1 by level 2, killed in its commit and release.
    for point in ["apply:inheritable", "apply:committed", "release:start"] {
        let (ok, v) = apply_to(&h.p1, t.pid, &h.trust);
        assert!(ok, "{v}");
        let killed = suture_with_fault(
            point,
            &[
                "apply",
                h.p2.to_str().unwrap(),
                "--pid",
                &pid,
                "--trust",
                h.trust.to_str().unwrap(),
            ],
        );
        assert!(killed, "supersede never reached {point}");
        let what = format!("supersede killed at {point}");
        assert!(assert_sound(&mut t, &what), "{what}: one level stays live");
        clean(&t, &what);
        assert_eq!(t.ask("compute 2"), "7", "{what}");
        let (applied, other) = patches(t.pid);
        assert!(
            applied.is_empty() && other.is_empty(),
            "{what}: {applied:?} {other:?}"
        );
    }
}

/// How a random trial ends suture.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Int,
    Term,
    StopThenKill,
}

fn random_trials(kind: Fault, trials: usize) {
    let h = build();
    let mut t = Target::start(&h.exe, None);
    assert_eq!(t.ask("setgid"), "ok");
    let pid = t.pid_arg();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (kind as u64);
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for trial in 0..trials {
        let revert = rand(2) == 1;
        if revert {
            let (ok, v) = apply_to(&h.p1, t.pid, &h.trust);
            assert!(ok, "{v}");
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_suture"));
        if revert {
            cmd.args(["revert", "--pid", &pid]);
        } else {
            cmd.args([
                "apply",
                h.p1.to_str().unwrap(),
                "--pid",
                &pid,
                "--trust",
                h.trust.to_str().unwrap(),
            ]);
        }
        let mut child = cmd
            .env("SUTURE_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Somewhere in the whole command: start-up, reading, mapping, the stop, release.
        std::thread::sleep(Duration::from_micros(rand(12_000)));
        let cpid = child.id() as i32;
        // SAFETY: signalling our own child.
        unsafe {
            match kind {
                Fault::Kill => libc::kill(cpid, libc::SIGKILL),
                Fault::Int => libc::kill(cpid, libc::SIGINT),
                Fault::Term => libc::kill(cpid, libc::SIGTERM),
                Fault::StopThenKill => {
                    libc::kill(cpid, libc::SIGSTOP);
                    std::thread::sleep(Duration::from_millis(rand(20)));
                    libc::kill(cpid, libc::SIGKILL)
                }
            };
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "suture hangs after {kind:?}");
            std::thread::sleep(Duration::from_millis(5));
        };
        if matches!(kind, Fault::Int | Fault::Term) {
            // Handled: it finishes or undoes, then ends with one line. Only a signal that came
            // before suture could install its handler (while the program loads) may end it,
            // and then it had not touched the target.
            use std::os::unix::process::ExitStatusExt;
            if status.signal().is_some() {
                let (applied, other) = patches(t.pid);
                assert!(
                    other.is_empty() && applied.is_empty() != revert,
                    "suture died of the signal after it had started: {applied:?} {other:?}"
                );
            }
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(err.lines().count() <= 1, "more than one line: {err}");
        }
        let what = format!(
            "{kind:?} trial {trial} ({})",
            if revert { "revert" } else { "apply" }
        );
        assert_sound(&mut t, &what);
        // Clean up for the next trial; whatever is left must be removable.
        clean(&t, &what);
        let (applied, other) = patches(t.pid);
        assert!(
            applied.is_empty() && other.is_empty(),
            "{what}: {applied:?} {other:?}"
        );
        assert_eq!(t.ask("compute 2"), "7");
    }
    let s = stats(&mut t);
    assert!(s["setgid"] > 0 && s["sleeps"] > 0, "{s:?}");
}

fn trials() -> usize {
    std::env::var("SUTURE_FAULT_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

#[test]
fn random_sigkill_during_apply_and_revert() {
    random_trials(Fault::Kill, trials());
}

#[test]
fn random_sigint_during_apply_and_revert() {
    random_trials(Fault::Int, trials());
}

#[test]
fn random_sigterm_during_apply_and_revert() {
    random_trials(Fault::Term, trials());
}

#[test]
fn random_sigstop_then_sigkill_during_apply_and_revert() {
    random_trials(Fault::StopThenKill, trials());
}

#[test]
fn real_time_signals_and_setgid_threads_lose_nothing() {
    let h = build();
    let mut t = Target::start(&h.exe, None);
    assert_eq!(t.ask("setgid"), "ok");
    let pid = t.pid;
    // A sender that queues SIGRTMIN+2 to the process all the time while we patch.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: sending a signal the target handles.
                if unsafe { libc::kill(pid, libc::SIGRTMIN() + 2) } == 0 {
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };
    let before = stats(&mut t)["setgid"];
    for round in 0..10 {
        let (ok, v) = apply_to(&h.p1, t.pid, &h.trust);
        assert!(ok, "round {round}: {v}");
        assert_eq!(t.ask("compute 2"), "106");
        let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
        assert!(ok, "round {round}: {v}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let s = stats(&mut t);
    // Real-time signals queue: every one sent is delivered exactly once.
    assert_eq!(
        s["rt"],
        sent.load(std::sync::atomic::Ordering::Relaxed),
        "{s:?}"
    );
    assert!(s["setgid"] > before, "the setgid thread is stuck: {s:?}");
    assert_sound(&mut t, "signals");
}

#[test]
fn children_forked_at_any_moment_are_clean_or_fully_patched() {
    let h = build();
    let mut t = Target::start(&h.exe, None);
    assert_eq!(t.ask("fork"), "ok");
    for round in 0..15 {
        let (ok, v) = apply_to(&h.p1, t.pid, &h.trust);
        assert!(ok, "round {round}: {v}");
        let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
        assert!(ok, "round {round}: {v}");
    }
    std::thread::sleep(Duration::from_millis(30));
    let s = stats(&mut t);
    assert!(s["forks"] > 10, "{s:?}");
    assert_eq!(
        s["forkbad"], 0,
        "a child inherited patch memory without its detours: {s:?}"
    );
    assert_sound(&mut t, "fork");
}

/// A thread with a double-close bug closes whatever holds one descriptor number and opens a
/// file there, over and over; now and then the patch memory's descriptor gets that number. The
/// process must never lose its file to us (sized to the patch, mapped, or closed): the
/// descriptor is checked to be ours once every thread has stopped, before it is used.
#[test]
fn a_thread_reusing_descriptor_numbers_never_loses_its_file_to_the_engine() {
    let h = build();
    let victim = h.work.path("victim.db");
    let content: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&victim, &content).unwrap();
    let mut t = Target::start(&h.exe, None);
    assert_eq!(t.ask(&format!("fdreuse {}", victim.display())), "ok");
    let (mut applied, mut busy) = (0, 0);
    for round in 0..20 {
        let (ok, v) = apply_to(&h.p1, t.pid, &h.trust);
        if ok {
            applied += 1;
            assert_eq!(t.ask("compute 2"), "106", "round {round}");
            let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
            assert!(ok, "round {round}: {v}");
        } else {
            assert_eq!(v["kind"], "busy", "round {round}: {v}");
            assert!(
                v["error"].as_str().unwrap().contains("descriptor"),
                "round {round}: {v}"
            );
            busy += 1;
        }
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            content,
            "round {round}: the process's file was changed"
        );
    }
    let s = stats(&mut t);
    assert!(s["reuses"] > 1000, "{s:?}");
    eprintln!("{applied} applied, {busy} busy");
    assert!(applied > 0, "never applied ({busy} busy)");
    assert_eq!(t.ask("compute 2"), "7");
    assert_sound(&mut t, "fdreuse");
}

#[test]
fn a_forged_record_is_reported_as_such_and_does_not_block_a_real_fix() {
    let h = build();
    let work = &h.work;
    // A process that maps a memfd named like ours, holding a made-up record that claims a fix.
    let fix = program_with_fix(
        &h,
        "forger",
        r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
__attribute__((noinline)) int compute(int x) { return x * 3 + 1; }
int main(void) {
    int fd = memfd_create("suture:hostile-L1-forged", 0);
    const char *json = "{\"id\":\"hostile-L1-forged\",\"level\":9,\"bundle_sha256\":\"00\",\"build_id\":\"00\",\"module\":\"/x\",\"cves\":[\"CVE-2099-0001\"],\"applied_at\":1,\"signer\":\"00\",\"base\":0,\"len\":4096,\"text_start\":0,\"text_end\":0,\"functions\":[]}";
    char page[4096] = "SUTURE-P";
    unsigned v = 1, n = strlen(json);
    memcpy(page + 8, &v, 4); memcpy(page + 12, &n, 4); memcpy(page + 16, json, n);
    write(fd, page, sizeof page);
    mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    char line[64];
    while (fgets(line, sizeof line, stdin)) printf("%d\n", compute(2));
    return 0;
}
"#,
        &[],
    );
    let mut t = Target::start(&work.path("forger"), None);
    let (applied, other) = patches(t.pid);
    assert!(
        applied.is_empty(),
        "a forged record counts as applied: {applied:?}"
    );
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].1, "invalid", "{other:?}");
    let out = suture(&["status", "--pid", &t.pid_arg()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("invalid") && !text.contains("fixes CVE-2099"),
        "{text}"
    );
    // The forged record names another build; what matters is it blocks nothing: the real
    // bundle for this program applies.
    let (ok, v) = apply_to(&fix, t.pid, &h.trust);
    assert!(ok, "{v}");
    assert_eq!(t.ask("x"), "106");
    let (applied, _) = patches(t.pid);
    assert_eq!(applied.len(), 1);
}

#[test]
fn a_target_that_swaps_descriptors_cannot_make_suture_write_a_root_file() {
    let h = build();
    let work = &h.work;
    let victim = work.path("victim.conf");
    std::fs::write(&victim, "root-owned contents\n").unwrap();
    // A process that keeps putting a descriptor of the victim file (opened read-only, as an
    // unprivileged process could) over every low descriptor number.
    let fix = program_with_fix(
        &h,
        "swapper",
        &format!(
            r#"
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((noinline)) int compute(int x) {{ return x * 3 + 1; }}
static void *swap(void *a) {{
    (void)a;
    int fd = open("{}", O_RDONLY);
    for (;;) for (int n = 3; n < 12; n++) dup2(fd, n);
    return 0;
}}
int main(void) {{
    pthread_t t; pthread_create(&t, 0, swap, 0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    char line[64];
    while (fgets(line, sizeof line, stdin)) printf("%d\n", compute(2));
    return 0;
}}
"#,
            victim.display()
        ),
        &["-pthread"],
    );
    let mut t = Target::start(&work.path("swapper"), None);
    for _ in 0..10 {
        let (ok, v) = apply_to(&fix, t.pid, &h.trust);
        if ok {
            assert_eq!(t.ask("x"), "106");
            let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
            assert!(ok, "{v}");
        } else {
            // Refused or failed in the process (its own descriptors are its business), but
            // never anything written outside it.
            assert!(v["error"].is_string(), "{v}");
        }
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "root-owned contents\n"
        );
    }
    assert_eq!(t.ask("x"), "7");
}

/// Kills the child when dropped: a failed assertion must not leave it running, holding the
/// test's output pipe open (whoever reads the output would wait for it forever).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_target_that_execs_mid_apply_ends_the_operation_with_the_true_reason() {
    let h = build();
    let work = &h.work;
    let fix = program_with_fix(
        &h,
        "execer",
        r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((noinline)) int compute(int x) { return x * 3 + 1; }
static char *self;
static void *later(void *a) {
    usleep((useconds_t)(long)a);
    char *argv[] = {self, "again", 0};
    execv(self, argv);
    return 0;
}
static void *spin(void *a) { (void)a; for (;;) compute(2); return 0; }
int main(int argc, char **argv) {
    self = argv[0];
    if (argc > 1) { for (;;) pause(); }
    pthread_t t; pthread_create(&t, 0, spin, 0);
    pthread_create(&t, 0, later, (void *)(long)(argc > 2 ? 0 : 3000));
    for (;;) compute(2);
}
"#,
        &["-pthread"],
    );
    for i in 0..12 {
        let mut guard = KillOnDrop(
            Command::new(work.path("execer"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let child = &mut guard.0;
        std::thread::sleep(Duration::from_micros(2500 + 100 * i));
        let started = Instant::now();
        let (ok, v) = apply_to(&fix, child.id() as i32, &h.trust);
        assert!(started.elapsed() < Duration::from_secs(15), "apply hung");
        if !ok {
            let e = v["error"].as_str().unwrap_or("");
            assert!(
                e.contains("exec") || e.contains("does not map") || e.contains("exited"),
                "misleading reason: {v}"
            );
            assert!(
                !e.contains("are you root") && !e.contains("another debugger"),
                "{v}"
            );
        }
        // Whatever happened, the process lives on (now in its new program) and is not stuck.
        std::thread::sleep(Duration::from_millis(20));
        assert!(child.try_wait().unwrap().is_none(), "the process died");
        let st = state(child.id() as i32);
        assert!(st != "t" && st != "T", "left stopped ({st})");
        let _ = child.kill();
        let _ = child.wait();
    }
}
