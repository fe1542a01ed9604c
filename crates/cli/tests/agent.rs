//! The host agent end to end: the real `suture agent run` binary with temporary folders and a
//! short reconcile interval, real C targets compiled by gcc, real bundles and keys.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A host: a target build with a build-id of its own (tests run in parallel and an agent
/// patches every process mapping its module, so no two tests may share one), patch objects,
/// keys, and the agent's folders.
struct Host {
    work: Work,
    exe: PathBuf,
    key: PathBuf,
    bundles: PathBuf,
    trust: PathBuf,
    state: PathBuf,
}

impl Host {
    fn new(name: &str) -> Host {
        let work = Work::new();
        let unique: u64 = name.bytes().fold(0xcbf29ce484222325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        work.gcc(&[
            "-O2",
            "-pthread",
            &format!("-Wl,--build-id=0x{unique:016x}{:08x}", std::process::id()),
            &Work::src("target.c"),
            "-o",
            "target",
        ]);
        for (src, obj) in [
            ("patch_compute.c", "p1.o"),
            ("patch_greet.c", "p2.o"),
            ("patch_crash.c", "crash.o"),
            ("patch_blocker.c", "blocker.o"),
        ] {
            work.gcc(&[
                "-O2",
                "-c",
                "-fPIE",
                "-ffunction-sections",
                "-fdata-sections",
                "-DCOUNTER=counter",
                "-DFACTOR=secret_factor",
                &Work::src(src),
                "-o",
                obj,
            ]);
        }
        let (key, public) = work.keys("ops");
        let (bundles, trust, state) =
            (work.path("bundles"), work.path("trust"), work.path("state"));
        for d in [&bundles, &trust] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::copy(&public, trust.join("ops.pub")).unwrap();
        Host {
            exe: work.path("target"),
            key,
            bundles,
            trust,
            state,
            work,
        }
    }

    fn start(&self) -> Target {
        Target::start(&self.exe, None)
    }

    /// Makes a signed bundle; returns its path (outside the bundle folder) and id.
    fn bundle(&self, object: &str, replaces: &[&str], level: u32, out: &str) -> (PathBuf, String) {
        let p = self
            .work
            .bundle("target", object, replaces, level, &self.key, out);
        let (ok, v) = suture_json(&["inspect", p.to_str().unwrap()]);
        assert!(ok, "{v}");
        (p, v["manifest"]["id"].as_str().unwrap().to_string())
    }

    /// Drops a bundle into the bundle folder the way an operator should (rename into place).
    fn offer(&self, bundle: &Path) -> PathBuf {
        let name = bundle.file_name().unwrap();
        let tmp = self.bundles.join(".incoming");
        std::fs::copy(bundle, &tmp).unwrap();
        let dest = self.bundles.join(name);
        std::fs::rename(&tmp, &dest).unwrap();
        dest
    }

    fn dirs(&self) -> Vec<String> {
        vec![
            "--bundle-dir".into(),
            self.bundles.display().to_string(),
            "--trust-dir".into(),
            self.trust.display().to_string(),
            "--state-dir".into(),
            self.state.display().to_string(),
        ]
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        self.agent_with_env(extra, &[])
    }

    fn agent_with_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let log = self.work.path(&format!("agent-{}.log", now_ns()));
        let mut args = vec!["agent".to_string(), "run".into()];
        args.extend(self.dirs());
        if !extra.contains(&"--interval-ms") {
            args.extend(["--interval-ms".into(), "200".into()]);
        }
        // The gate searches the test's own folder for target files, not the host's.
        if !extra.contains(&"--watch-path") {
            args.extend([
                "--watch-path".into(),
                self.work.path(".").display().to_string(),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_suture"))
            .args(&args)
            .env("SUTURE_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("agent starts");
        Agent {
            child: Some(child),
            log,
        }
    }

    /// `suture agent status --json` (the running agent's snapshot, or computed).
    fn status(&self) -> Value {
        let mut args = vec!["agent".to_string(), "status".into()];
        args.extend(self.dirs());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, v) = suture_json(&args);
        assert!(ok, "agent status failed: {v}");
        v
    }

    fn journal(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("journal.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("journal line is JSON"))
            .collect()
    }

    /// Journal entries of one kind for one bundle id.
    fn events(&self, event: &str, id: &str) -> Vec<Value> {
        self.journal()
            .into_iter()
            .filter(|e| e["event"] == event && e["id"] == id)
            .collect()
    }
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM: the agent must finish what it does and exit 0.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "agent exited with {st}: {}", self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent ignored SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- agent log ---\n{}", self.log());
            }
        }
    }
}

/// Polls `f` until it holds or the deadline passes.
fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bundle_status<'a>(st: &'a Value, id: &str) -> Option<&'a Value> {
    st["bundles"].as_array()?.iter().find(|b| b["id"] == id)
}

fn state_of(st: &Value, id: &str) -> String {
    bundle_status(st, id)
        .map(|b| b["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// The patches a process carries, read from its memory.
/// Patch memory of any state (an apply in progress has mapped its patch before its detours).
fn patch_memory(pid: i32) -> usize {
    let (ok, v) = suture_json(&["status", "--pid", &pid.to_string()]);
    assert!(ok, "{v}");
    let p = &v["processes"][0];
    p["patches"].as_array().map_or(0, Vec::len) + p["other"].as_array().map_or(0, Vec::len)
}

fn carried(pid: i32) -> Vec<Value> {
    let (ok, v) = suture_json(&["status", "--pid", &pid.to_string()]);
    assert!(ok, "{v}");
    v["processes"][0]["patches"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn bundle_goes_live_everywhere_and_withdrawal_reverts() {
    let h = Host::new("live");
    let mut a = h.start();
    let mut b = h.start();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = metrics.local_addr().unwrap().to_string();
    drop(metrics);
    let mut agent = h.agent(&["--metrics-addr", &addr]);
    let (p1, id) = h.bundle("p1.o", &["compute"], 1, "p1.suture");
    let offered = h.offer(&p1);
    let t = Instant::now();
    wait_for("both targets patched", 30, || {
        a.ask("compute 2") == "106" && b.ask("compute 2") == "106"
    });
    eprintln!(
        "live in 2 processes {} ms after the drop",
        t.elapsed().as_millis()
    );
    assert_eq!(
        serde_json::from_str::<Value>(
            &std::fs::read_to_string(h.state.join("status.json")).unwrap()
        )
        .unwrap()["process_events"],
        true,
        "the agent sees process events"
    );
    wait_for("status: active in 2 processes", 10, || {
        let st = h.status();
        bundle_status(&st, &id).is_some_and(|b| b["state"] == "active" && b["processes"] == 2)
    });
    assert_eq!(h.events("applied", &id).len(), 2, "{:?}", h.journal());

    // A process started later is patched without waiting for a full pass (exec event).
    let t = Instant::now();
    let mut c = h.start();
    wait_for("a new process patched", 10, || c.ask("compute 2") == "106");
    eprintln!(
        "new process patched {} ms after its start",
        t.elapsed().as_millis()
    );
    for l in agent
        .log()
        .lines()
        .filter(|l| std::env::var("AGENT_LOG").is_ok() || l.contains("new process"))
    {
        eprintln!("{l}");
    }

    wait_for("metrics: one active bundle, three applies", 10, || {
        let body = http_get(&addr, "/metrics");
        body.contains("suture_agent_bundles{state=\"active\"} 1")
            && body.contains("suture_agent_apply_stop_seconds_count 3")
    });

    // A bundle folder that disappears (unmounted, say) withdraws nothing.
    let away = h.work.path("bundles-away");
    std::fs::rename(&h.bundles, &away).unwrap();
    let seen = status_taken(&h);
    wait_for("a few passes without the folder", 10, || {
        status_taken(&h) > seen + 1000
    });
    assert_eq!(a.ask("compute 2"), "106");
    assert!(h.events("reverted", &id).is_empty());
    assert!(agent.log().contains("cannot list"), "the error is logged");
    std::fs::rename(&away, &h.bundles).unwrap();

    // Withdrawn: taken back out of every process.
    std::fs::remove_file(&offered).unwrap();
    wait_for("all targets reverted", 30, || {
        a.ask("compute 2") == "7" && b.ask("compute 2") == "7" && c.ask("compute 2") == "7"
    });
    for t in [&a, &b, &c] {
        assert!(carried(t.pid).is_empty(), "patch memory released");
    }
    // The journal line follows the engine's return by a moment.
    wait_for("three reverts journaled", 10, || {
        h.events("reverted", &id).len() == 3
    });
    wait_for("status: withdrawn", 10, || {
        let st = h.status();
        bundle_status(&st, &id).is_some_and(|b| b["state"] == "withdrawn" && b["processes"] == 0)
    });
    agent.stop();
    assert!(agent.log().contains("applied"), "one log line per action");
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn tampered_or_untrusted_bundles_are_refused_and_nothing_changes() {
    let h = Host::new("refused");
    let mut t = h.start();
    let before = snapshot(t.pid);
    let mut agent = h.agent(&[]);

    let (p1, id) = h.bundle("p1.o", &["compute"], 1, "p1.suture");
    let mut bytes = std::fs::read(&p1).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1; // one bit of the signature
    let tampered = h.work.path("tampered.suture");
    std::fs::write(&tampered, &bytes).unwrap();
    h.offer(&tampered);

    // Signed by a key the host does not trust.
    let (other_key, _) = h.work.keys("stranger");
    let untrusted = h.work.path("untrusted.suture");
    let mut args = vec![
        "bundle".to_string(),
        "--target".into(),
        h.exe.display().to_string(),
        "--object".into(),
        h.work.path("p2.o").display().to_string(),
        "--replace".into(),
        "compute".into(),
        "--level".into(),
        "2".into(),
        "--key".into(),
        other_key.display().to_string(),
        "--out".into(),
        untrusted.display().to_string(),
    ];
    let o = suture(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    h.offer(&untrusted);
    std::fs::write(h.bundles.join("garbage.suture"), b"not a bundle").unwrap();

    wait_for("three refusals in status", 20, || {
        let st = h.status();
        st["bundles"]
            .as_array()
            .is_some_and(|v| v.iter().filter(|b| b["state"] == "refused").count() == 3)
    });
    let st = h.status();
    let reasons: Vec<String> = st["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| format!("{} {}", b["origin"], b["reason"]))
        .collect();
    let has = |file: &str, word: &str| {
        reasons
            .iter()
            .any(|r| r.contains(file) && r.to_lowercase().contains(word))
    };
    assert!(has("tampered", "signature"), "{reasons:?}");
    assert!(has("untrusted", "untrusted"), "{reasons:?}");
    assert!(has("garbage", "not a suture bundle"), "{reasons:?}");
    assert_eq!(state_of(&st, &id), "refused");
    // Refused once in the journal, not on every pass; nothing applied.
    std::thread::sleep(Duration::from_millis(600));
    let j = h.journal();
    assert_eq!(
        j.iter().filter(|e| e["event"] == "refused").count(),
        3,
        "{j:?}"
    );
    assert!(!j.iter().any(|e| e["event"] == "applied"), "{j:?}");
    assert_same_memory(&before, &snapshot(t.pid));
    assert_eq!(t.ask("compute 2"), "7");
    assert!(agent.log().contains("refused"));
    agent.stop();
    args.clear();
}

#[test]
fn crashing_patch_is_rolled_back_on_the_host_and_stays_out() {
    let h = Host::new("crash");
    let mut a = h.start();
    let mut b = h.start();
    let mut agent = h.agent(&["--health-window", "60"]);
    let (crash, id) = h.bundle("crash.o", &["compute"], 1, "crash.suture");
    h.offer(&crash);
    wait_for("both targets patched", 30, || {
        a.ask("compute 2") == "306" && b.ask("compute 2") == "306"
    });
    // The bad input: the patched process dies of SIGSEGV.
    let victim = a.pid;
    a.send("compute 13");
    let t = Instant::now();
    wait_for("the patched process crashed", 10, || !a.alive());
    wait_for("the other process reverted", 20, || {
        b.ask("compute 2") == "7"
    });
    eprintln!(
        "rolled back host-wide {} ms after the crash",
        t.elapsed().as_millis()
    );
    let rb = h.events("rolled_back", &id);
    assert_eq!(rb.len(), 1, "{:?}", h.journal());
    assert_eq!(rb[0]["pid"], victim);
    assert_eq!(rb[0]["signal"], libc::SIGSEGV);
    wait_for("status: rolled back", 10, || {
        state_of(&h.status(), &id) == "rolled_back"
    });
    let st = h.status();
    let reason = bundle_status(&st, &id).unwrap()["reason"].to_string();
    assert!(
        reason.contains("SIGSEGV") && reason.contains(&victim.to_string()),
        "{reason}"
    );

    // Not re-applied: not to the survivor, not to a new process, not after a restart.
    let mut c = h.start();
    agent.stop();
    let mut agent = h.agent(&[]);
    let restarted = Instant::now();
    let new_pid = agent.child.as_ref().unwrap().id() as u64;
    wait_for("the restarted agent wrote status", 10, || {
        suture_agent_status_pid(&h) == Some(new_pid)
    });
    while restarted.elapsed() < Duration::from_secs(2) {
        assert_eq!(b.ask("compute 2"), "7");
        assert_eq!(c.ask("compute 2"), "7");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state_of(&h.status(), &id), "rolled_back");
    assert_eq!(h.events("applied", &id).len(), 2);

    // An operator enables it again: applied again, and a clean exit is not a crash.
    let mut args = vec!["agent".to_string(), "enable".into(), id.clone()];
    args.extend(h.dirs());
    let o = suture(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("enabled bundle applied again", 20, || {
        b.ask("compute 2") == "306" && c.ask("compute 2") == "306"
    });
    c.send("quit");
    wait_for("clean exit seen", 10, || !c.alive());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.ask("compute 2"), "306", "a clean exit does not roll back");
    assert_eq!(h.events("rolled_back", &id).len(), 1);
    agent.stop();
}

/// When the running agent last wrote its status snapshot (ms since the epoch).
fn status_taken(h: &Host) -> u64 {
    std::fs::read_to_string(h.state.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["taken_ms"].as_u64())
        .unwrap_or(0)
}

/// The pid in the status snapshot of a running agent, if one wrote it.
fn suture_agent_status_pid(h: &Host) -> Option<u64> {
    let text = std::fs::read_to_string(h.state.join("status.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["agent_pid"].as_u64()
}

#[test]
fn kill_9_and_restart_applies_nothing_twice() {
    let h = Host::new("kill9");
    let mut a = h.start();
    let mut b = h.start();
    let mut agent = h.agent(&[]);
    let (p1, id) = h.bundle("p1.o", &["compute"], 1, "p1.suture");
    h.offer(&p1);
    wait_for("both targets patched", 30, || {
        a.ask("compute 2") == "106" && b.ask("compute 2") == "106"
    });
    wait_for("both applies journaled", 10, || {
        h.events("applied", &id).len() == 2
    });
    let old_pid = agent.child.as_ref().unwrap().id() as u64;
    agent.kill9();
    let mut agent = h.agent(&[]);
    wait_for("the new agent's status: active in 2", 20, || {
        suture_agent_status_pid(&h).is_some_and(|p| p != old_pid)
            && bundle_status(&h.status(), &id)
                .is_some_and(|b| b["state"] == "active" && b["processes"] == 2)
    });
    // A few more passes of the new agent.
    std::thread::sleep(Duration::from_millis(800));
    let applied = h.events("applied", &id);
    assert_eq!(applied.len(), 2, "applied once per process: {applied:?}");
    for t in [&a, &b] {
        assert_eq!(carried(t.pid).len(), 1, "one patch in each process");
    }
    assert_eq!(a.ask("compute 2"), "106");
    agent.stop();
}

#[test]
fn level_2_supersedes_level_1_and_withdrawing_it_does_not_bring_level_1_back() {
    let h = Host::new("levels");
    let mut t = h.start();
    let mut agent = h.agent(&[]);
    let (p1, id1) = h.bundle("p1.o", &["compute"], 1, "p1.suture");
    let (p2, id2) = h.bundle("p2.o", &["compute", "greet"], 2, "p2.suture");
    h.offer(&p1);
    wait_for("level 1 live", 30, || t.ask("compute 2") == "106");
    let l2 = h.offer(&p2);
    wait_for("level 2 live", 30, || t.ask("compute 2") == "206");
    assert_eq!(t.ask("greet"), "new greeting");
    let patches = carried(t.pid);
    assert_eq!(patches.len(), 1, "level 1 left in the same stop");
    assert_eq!(patches[0]["level"], 2);
    wait_for("superseded journaled", 10, || {
        h.events("superseded", &id1).len() == 1
    });
    wait_for("status: 2 active, 1 superseded", 10, || {
        let st = h.status();
        state_of(&st, &id2) == "active" && state_of(&st, &id1) == "superseded"
    });

    std::fs::remove_file(&l2).unwrap();
    wait_for("level 2 reverted", 30, || t.ask("compute 2") == "7");
    agent.stop();
    let mut agent = h.agent(&[]);
    let restarted = Instant::now();
    while restarted.elapsed() < Duration::from_secs(2) {
        assert_eq!(t.ask("compute 2"), "7", "level 1 is never re-applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = h.status();
    assert_eq!(state_of(&st, &id1), "superseded", "{st}");
    assert!(
        bundle_status(&st, &id1).unwrap()["reason"]
            .as_str()
            .unwrap()
            .contains("never re-applied"),
        "{st}"
    );
    assert_eq!(h.events("applied", &id1).len(), 1);
    agent.stop();
}

#[test]
fn failing_health_command_rolls_back() {
    let h = Host::new("healthcmd");
    let mut t = h.start();
    let flag = h.work.path("unhealthy");
    let cmd = format!("test ! -e {}", flag.display());
    let mut agent = h.agent(&["--health-cmd", &cmd]);
    let (p1, id) = h.bundle("p1.o", &["compute"], 1, "p1.suture");
    h.offer(&p1);
    wait_for("patched", 30, || t.ask("compute 2") == "106");
    std::fs::write(&flag, b"").unwrap();
    wait_for("rolled back after the health command failed", 20, || {
        t.ask("compute 2") == "7"
    });
    let rb = h.events("rolled_back", &id);
    assert_eq!(rb.len(), 1);
    assert!(rb[0]["reason"].as_str().unwrap().contains("health command"));
    agent.stop();
}

#[test]
fn a_process_that_cannot_be_patched_is_listed_with_its_reason() {
    let h = Host::new("unpatchable");
    let mut ok = h.start();
    let mut locked = h.start();
    assert_eq!(locked.ask("seccomp memfd"), "0");
    let (p1, id) = h.bundle("p1.o", &["compute"], 1, "p1.suture");
    h.offer(&p1);

    // Eligibility, before any agent: the host, and each process the bundle targets.
    let mut args = vec!["eligibility".to_string()];
    args.extend(h.dirs());
    let (_, e) = suture_json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let procs = e["processes"].as_array().expect("processes");
    let find = |pid: i32| procs.iter().find(|p| p["pid"] == pid).cloned();
    assert_eq!(find(ok.pid).expect("listed")["patchable"], true, "{e}");
    let l = find(locked.pid).expect("listed");
    assert_eq!(l["patchable"], false, "{e}");
    assert!(l["problems"].to_string().contains("seccomp"), "{e}");
    assert!(e["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "yama_ptrace_scope"));

    let mut agent = h.agent(&[]);
    wait_for("the patchable one patched", 30, || {
        ok.ask("compute 2") == "106"
    });
    wait_for("status lists the other with its reason", 20, || {
        let st = h.status();
        bundle_status(&st, &id).is_some_and(|b| {
            b["processes"] == 1
                && b["failures"].as_array().is_some_and(|f| {
                    f.iter().any(|f| {
                        f["pid"] == locked.pid
                            && f["kind"] == "refused"
                            && f["reason"].as_str().unwrap_or("").contains("seccomp")
                    })
                })
        })
    });
    assert_eq!(locked.ask("compute 2"), "7");
    let failed = h.events("failed", &id);
    assert_eq!(
        failed.len(),
        1,
        "journaled once, not on every pass: {failed:?}"
    );
    agent.stop();
}

#[test]
fn sigterm_undoes_the_operation_in_progress_and_leaves_nothing() {
    let h = Host::new("sigterm");
    let mut t = h.start();
    // A thread sleeps inside `blocker`: replacing it stays busy until the operation's deadline.
    assert_eq!(t.ask("block"), "ok");
    let before = snapshot(t.pid);
    let mut agent = h.agent(&["--op-timeout-ms", "4000"]);
    let (b, id) = h.bundle("blocker.o", &["blocker"], 1, "blocker.suture");
    h.offer(&b);
    // The apply is under way: its patch memory is mapped, it retries until its deadline.
    wait_for("the apply in progress", 20, || patch_memory(t.pid) > 0);
    let asked = Instant::now();
    agent.stop();
    let waited = asked.elapsed();
    // The engine undid the operation in progress at once (it had not written its detours),
    // it was journaled, and it left nothing behind.
    let failed = h.events("failed", &id);
    assert_eq!(failed.len(), 1, "{:?}", h.journal());
    assert_eq!(failed[0]["kind"], "interrupted");
    assert_eq!(failed[0]["pid"], t.pid);
    assert!(
        waited < Duration::from_millis(3500),
        "the agent did not sit out the operation's deadline ({waited:?})"
    );
    assert!(carried(t.pid).is_empty());
    assert_same_memory(&before, &snapshot(t.pid));
    assert_eq!(t.ask("compute 2"), "7");
}

#[test]
fn a_process_in_another_mount_namespace_is_patched_too() {
    let h = Host::new("mountns");
    // The target runs from a tmpfs mounted in its own mount namespace: from the agent's
    // namespace, its file does not exist (the folder is empty).
    let hidden = h.work.path("hidden");
    std::fs::create_dir_all(&hidden).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &format!(
            "mount -t tmpfs none {d} && cp {exe} {d}/target && exec {d}/target",
            d = hidden.display(),
            exe = h.exe.display()
        ),
    ]);
    let mut t = Target::start_command(cmd, None);
    assert!(!hidden.join("target").exists(), "not visible from here");
    let mut agent = h.agent(&[]);
    let (p1, id) = h.bundle("p1.o", &["compute"], 1, "p1.suture");
    h.offer(&p1);
    wait_for("the namespaced process patched", 30, || {
        t.ask("compute 2") == "106"
    });
    wait_for("applied journaled", 10, || {
        h.events("applied", &id).len() == 1
    });
    agent.stop();
}

#[test]
fn events_alone_drive_the_agent_between_passes() {
    // Full passes a minute apart: what happens here is driven by inotify on the bundle folder
    // and by the process-events connector.
    let h = Host::new("events");
    let mut a = h.start();
    let mut agent = h.agent(&["--interval-ms", "60000"]);
    wait_for("the first pass", 10, || status_taken(&h) > 0);
    let (p1, _) = h.bundle("p1.o", &["compute"], 1, "p1.suture");
    let offered = h.offer(&p1);
    wait_for("a dropped bundle live at once", 10, || {
        a.ask("compute 2") == "106"
    });
    let mut b = h.start();
    wait_for("a new process patched on its exec", 10, || {
        b.ask("compute 2") == "106"
    });
    std::fs::remove_file(&offered).unwrap();
    wait_for("a removed bundle reverted at once", 10, || {
        a.ask("compute 2") == "7" && b.ask("compute 2") == "7"
    });
    agent.stop();
}

#[test]
fn kill_9_in_the_middle_of_an_apply_is_not_taken_for_a_patch() {
    let h = Host::new("kill9mid");
    let mut t = h.start();
    assert_eq!(t.ask("block"), "ok");
    let mut agent = h.agent(&["--op-timeout-ms", "10000"]);
    let (b, id) = h.bundle("blocker.o", &["blocker"], 1, "blocker.suture");
    h.offer(&b);
    // The apply has mapped its patch and waits for the thread to leave `blocker`.
    wait_for("the apply mapped its patch", 20, || patch_memory(t.pid) > 0);
    std::thread::sleep(Duration::from_millis(1500)); // into the 10 s of busy retries
    agent.kill9();
    // The process runs on, unpatched: the memory left behind has no detour, and the engine
    // reports it as orphaned, never as applied.
    assert_eq!(t.ask("compute 2"), "7");
    assert!(carried(t.pid).is_empty());
    let mut agent = h.agent(&["--op-timeout-ms", "500"]);
    let new_pid = agent.child.as_ref().unwrap().id() as u64;
    wait_for(
        "the restarted agent reports the process as not patched, and the leftover is reclaimed",
        30,
        || {
            suture_agent_status_pid(&h) == Some(new_pid)
                && bundle_status(&h.status(), &id).is_some_and(|b| {
                    b["processes"] == 0
                        && b["failures"]
                            .as_array()
                            .is_some_and(|f| f.iter().any(|f| f["pid"] == t.pid))
                })
                && patch_memory(t.pid) == 0
        },
    );
    assert!(h.events("applied", &id).is_empty());
    assert_eq!(t.ask("compute 2"), "7");
    agent.stop();
}

#[test]
fn the_health_window_survives_a_restart_and_ends() {
    let h = Host::new("window");
    let mut a = h.start();
    let mut b = h.start();
    let mut c = h.start();
    let mut agent = h.agent(&["--health-window", "10"]);
    let (crash, id) = h.bundle("crash.o", &["compute"], 1, "crash.suture");
    h.offer(&crash);
    wait_for("patched", 30, || {
        a.ask("compute 2") == "306" && b.ask("compute 2") == "306" && c.ask("compute 2") == "306"
    });
    let live = Instant::now();
    // Restarted inside the window: the new agent learns when each process was patched from
    // the process itself, and a crash past the window is not the patch's fault.
    agent.stop();
    let mut agent = h.agent(&["--health-window", "10"]);
    let new_pid = agent.child.as_ref().unwrap().id() as u64;
    wait_for("the restarted agent's first pass", 10, || {
        suture_agent_status_pid(&h) == Some(new_pid)
    });
    a.send("compute 13");
    wait_for("the crash rolled it back", 20, || c.ask("compute 2") == "7");
    assert_eq!(h.events("rolled_back", &id).len(), 1);

    // Enabled again: re-applied, and a crash once the window is over changes nothing.
    let mut args = vec!["agent".to_string(), "enable".into(), id.clone()];
    args.extend(h.dirs());
    let o = suture(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("re-applied", 20, || {
        b.ask("compute 2") == "306" && c.ask("compute 2") == "306"
    });
    let again = Instant::now();
    while again.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(100)); // let the 10 s window pass
    }
    b.send("compute 13");
    wait_for("the late crash", 10, || !b.alive());
    let seen = status_taken(&h);
    wait_for("a few passes after it", 10, || {
        status_taken(&h) > seen + 1000
    });
    assert_eq!(
        c.ask("compute 2"),
        "306",
        "not rolled back after the window"
    );
    assert_eq!(h.events("rolled_back", &id).len(), 1);
    assert!(live.elapsed() > Duration::from_secs(10));
    agent.stop();
}

/// Builds first_call.c's programs and library with build-ids of their own, and bundles of the
/// fix for the executable and for the library.
fn first_call_host(name: &str) -> (Host, PathBuf, PathBuf) {
    let h = Host::new(name);
    let id = |tag: u32| {
        format!(
            "-Wl,--build-id=0x{tag:08x}{:08x}{:016x}",
            std::process::id(),
            now_ns() as u64
        )
    };
    let w = &h.work;
    w.gcc(&["-O2", &id(1), &Work::src("first_call.c"), "-o", "first"]);
    w.gcc(&[
        "-O2",
        "-shared",
        "-fPIC",
        &id(2),
        &Work::src("libfirst.c"),
        "-o",
        "libfirst.so",
    ]);
    let rpath = format!("-Wl,-rpath,{}", w.path(".").display());
    w.gcc(&[
        "-O2",
        "-DLIBRARY",
        &id(3),
        &Work::src("first_call.c"),
        "-o",
        "first_linked",
        "-L.",
        "-lfirst",
        &rpath,
    ]);
    w.gcc(&[
        "-O2",
        "-DLIBRARY",
        "-DDLOPEN",
        "-pthread",
        &id(4),
        &Work::src("first_call.c"),
        "-o",
        "first_dlopen",
        "-ldl",
    ]);
    w.gcc(&[
        "-O2",
        "-c",
        "-fPIE",
        "-ffunction-sections",
        &Work::src("patch_first.c"),
        "-o",
        "patch_first.o",
    ]);
    let exe_fix = w.bundle(
        "first",
        "patch_first.o",
        &["first_check"],
        1,
        &h.key,
        "first.suture",
    );
    let lib_fix = w.bundle(
        "libfirst.so",
        "patch_first.o",
        &["first_check"],
        1,
        &h.key,
        "libfirst.suture",
    );
    (h, exe_fix, lib_fix)
}

/// The files the running agent's gate watches (from its status).
fn gate_watching(h: &Host) -> Vec<String> {
    h.status()["gate"]["watching"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn gate_watches_first_call(h: &Host) -> bool {
    let w = gate_watching(h);
    w.iter().any(|p| p.ends_with("/first")) && w.iter().any(|p| p.ends_with("/libfirst.so"))
}

/// Runs a program of first_call.c; its output (the first call's answer), or why it failed.
fn first_answer(program: &Path, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("{} hung", program.display()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{}: {} {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn a_process_started_after_the_fix_runs_it_from_its_first_call() {
    let (h, exe_fix, lib_fix) = first_call_host("firstcall");
    let first = h.work.path("first");
    let linked = h.work.path("first_linked");
    let dlopen = h.work.path("first_dlopen");
    let lib = h.work.path("libfirst.so").display().to_string();
    // Before any fix: the old answer.
    assert_eq!(first_answer(&first, &[]).unwrap(), "3");
    assert_eq!(first_answer(&dlopen, &[&lib]).unwrap(), "3");
    let agent = h.agent(&[]);
    h.offer(&exe_fix);
    h.offer(&lib_fix);
    // Nothing runs these programs now: the files themselves are watched.
    wait_for("the gate watches both files", 30, || {
        gate_watches_first_call(&h)
    });
    let mut old = Vec::new();
    for (program, args) in [
        (&first, vec![]),
        (&linked, vec![]),
        (&dlopen, vec![lib.as_str()]),
    ] {
        for i in 0..100 {
            match first_answer(program, &args) {
                Ok(a) if a == "-1" => {}
                other => old.push(format!("{} start {i}: {other:?}", program.display())),
            }
        }
    }
    assert!(
        old.is_empty(),
        "{} of 300 starts ran the unfixed code first: {:?}\n{}",
        old.len(),
        &old[..old.len().min(5)],
        agent.log()
    );
    // Each start was held and patched by the gate, not by the after-the-fact path (the log
    // line comes when the controller has journaled it, a moment after the start).
    wait_for("300 starts reported as held and patched", 20, || {
        agent
            .log()
            .matches("new process patched before it ran")
            .count()
            >= 300
    });
}

#[test]
fn starts_never_hang_or_break_when_the_agent_dies_holding_them() {
    let (h, exe_fix, lib_fix) = first_call_host("failopen");
    let first = h.work.path("first");
    let dlopen = h.work.path("first_dlopen");
    let lib = h.work.path("libfirst.so").display().to_string();
    let mut agent = h.agent(&[]);
    h.offer(&exe_fix);
    h.offer(&lib_fix);
    wait_for("the gate watches both files", 30, || {
        gate_watches_first_call(&h)
    });
    // Starts run back to back from two threads while the agent is killed among them (once
    // a first start has been patched: the kill lands while holds are going on).
    let patched = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let starter = |program: PathBuf, args: Vec<String>| {
        let patched = patched.clone();
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            (0..60)
                .map(|_| {
                    let r = first_answer(&program, &args);
                    if r.as_deref() == Ok("-1") {
                        patched.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    r
                })
                .collect::<Vec<_>>()
        })
    };
    let a = starter(first.clone(), vec![]);
    let b = starter(dlopen.clone(), vec![lib.clone()]);
    wait_for("a first start patched", 30, || {
        patched.load(std::sync::atomic::Ordering::SeqCst)
    });
    std::thread::sleep(Duration::from_millis(20));
    agent.kill9();
    let answers: Vec<_> = a
        .join()
        .unwrap()
        .into_iter()
        .chain(b.join().unwrap())
        .collect();
    for r in &answers {
        let a = r.as_ref().expect("every start completes");
        assert!(a == "-1" || a == "3", "a start answered {a:?}");
    }
    assert!(
        answers.iter().any(|r| r.as_deref() == Ok("-1")),
        "some starts were patched before the kill"
    );
    // After the agent: programs start as they always did.
    assert_eq!(first_answer(&first, &[]).unwrap(), "3");
    assert_eq!(first_answer(&dlopen, &[&lib]).unwrap(), "3");
}

#[test]
fn an_agent_killed_at_any_step_of_a_hold_lets_the_process_start() {
    let (h, exe_fix, lib_fix) = first_call_host("holdfaults");
    let first = h.work.path("first");
    let dlopen = h.work.path("first_dlopen");
    let lib = h.work.path("libfirst.so").display().to_string();
    h.offer(&exe_fix);
    h.offer(&lib_fix);
    for point in ["hold:seized", "hold:loaded", "hold:applied"] {
        for (program, args) in [(&first, vec![]), (&dlopen, vec![lib.as_str()])] {
            // (The last agent's status must not pass for this one's.)
            let _ = std::fs::remove_file(h.state.join("status.json"));
            let mut agent = h.agent_with_env(&[], &[("SUTURE_FAULT", point)]);
            wait_for("the gate watches both files", 30, || {
                gate_watches_first_call(&h)
            });
            // The agent dies holding this process, at `point`.
            let answer = first_answer(program, &args);
            let child = agent.child.as_mut().unwrap();
            wait_for("the agent to die at the fault point", 20, || {
                child.try_wait().unwrap().is_some()
            });
            let died = child.wait().unwrap();
            assert_eq!(
                died.signal(),
                Some(libc::SIGKILL),
                "{point}: the agent did not die there: {}",
                agent.log()
            );
            let answer = answer.unwrap_or_else(|e| panic!("{point}: {e}"));
            let want = if point == "hold:applied" { "-1" } else { "3" };
            assert_eq!(answer, want, "{point}: {}", program.display());
            // Whatever it left behind (the loader hook at worst), the next start is normal.
            assert_eq!(first_answer(program, &args).unwrap(), "3", "{point}");
            agent.child = None;
        }
    }
}

#[test]
fn a_process_started_inside_a_container_runs_the_fix_from_its_first_call() {
    let (h, exe_fix, _) = first_call_host("gatens");
    // The program lives only on a tmpfs of another mount namespace (a container's own files):
    // no watched folder of the agent's namespace has it; a running service there maps it.
    let hidden = h.work.path("container");
    std::fs::create_dir_all(&hidden).unwrap();
    let mut service = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none {d} && cp {exe} {d}/first && exec {d}/first --stay",
            d = hidden.display(),
            exe = h.work.path("first").display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(service.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "3", "the service ran before any fix");
    let pid = service.id() as i32;
    let agent = h.agent(&[]);
    h.offer(&exe_fix);
    wait_for("the container's file watched", 30, || {
        gate_watching(&h)
            .iter()
            .any(|w| w.starts_with(&format!("/proc/{pid}/map_files/")))
    });
    // New starts inside the container, by its own path.
    for i in 0..20 {
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m"])
            .arg(hidden.join("first"))
            .output()
            .unwrap();
        assert!(out.status.success(), "start {i}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "-1",
            "start {i} ran the old code: {}",
            agent.log()
        );
    }
    let _ = service.kill();
    let _ = service.wait();
}

#[test]
fn a_start_under_a_seccomp_filter_that_forbids_the_hook_is_let_through_unharmed() {
    let (h, exe_fix, _) = first_call_host("gateseccomp");
    h.work
        .gcc(&["-O2", &Work::src("no_getpid.c"), "-o", "no_getpid"]);
    let agent = h.agent(&[]);
    h.offer(&exe_fix);
    wait_for("the gate watches the program", 30, || {
        gate_watching(&h).iter().any(|w| w.ends_with("/first"))
    });
    // Its parent's filter kills the process on getpid: the hook would kill it.
    let out = Command::new(h.work.path("no_getpid"))
        .arg(h.work.path("first"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the start was harmed: {out:?}\n{}",
        agent.log()
    );
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(answer == "3" || answer == "-1", "{answer}");
    wait_for(
        "the start counted as let through, with the reason",
        10,
        || {
            let g = &h.status()["gate"];
            g["let_through"].as_u64() >= Some(1)
                && g["last_let_through"]
                    .as_str()
                    .is_some_and(|w| w.contains("seccomp"))
        },
    );
    // Without the filter the same program is held and patched as usual.
    assert_eq!(first_answer(&h.work.path("first"), &[]).unwrap(), "-1");
}
