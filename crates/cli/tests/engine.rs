//! The engine end to end: real C targets compiled by gcc, patched by `suture` through ptrace.

mod common;

use std::path::PathBuf;

use common::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Pie,
    NonPie,
    Static,
    SharedLib,
}

struct Built {
    work: Work,
    exe: PathBuf,
    /// The module the patches are for (the executable, or libcalc.so).
    module: String,
    lib_dir: Option<PathBuf>,
    key: PathBuf,
    public: PathBuf,
}

impl Built {
    fn start(&self) -> Target {
        Target::start(&self.exe, self.lib_dir.as_deref())
    }

    fn trust(&self) -> String {
        self.public.display().to_string()
    }

    fn module_path(&self) -> PathBuf {
        self.work.path(&self.module)
    }
}

fn build(kind: Kind) -> Built {
    let work = Work::new();
    let target = Work::src("target.c");
    let (counter, factor, pic) = match kind {
        Kind::SharedLib => ("-DCOUNTER=counter_in_lib", "-DFACTOR=lib_factor", "-fPIC"),
        _ => ("-DCOUNTER=counter", "-DFACTOR=secret_factor", "-fPIE"),
    };
    let mut module = "target".to_string();
    let mut lib_dir = None;
    match kind {
        Kind::Pie => work.gcc(&["-O2", "-g", "-pthread", &target, "-o", "target"]),
        Kind::NonPie => work.gcc(&[
            "-O2", "-no-pie", "-fno-pie", "-pthread", &target, "-o", "target",
        ]),
        Kind::Static => work.gcc(&["-O2", "-static", "-pthread", &target, "-o", "target"]),
        Kind::SharedLib => {
            work.gcc(&[
                "-O2",
                "-shared",
                "-fPIC",
                &Work::src("libcalc.c"),
                "-o",
                "libcalc.so",
            ]);
            work.gcc(&[
                "-O2",
                "-pthread",
                "-DUSE_LIB",
                &target,
                "-L.",
                "-lcalc",
                "-o",
                "target",
            ]);
            module = "libcalc.so".into();
            lib_dir = Some(work.dir.path().to_path_buf());
        }
    }
    for (src, obj) in [
        ("patch_compute.c", "p1.o"),
        ("patch_greet.c", "p2.o"),
        ("patch_blocker.c", "blocker.o"),
        ("patch_zero.c", "zero.o"),
        ("patch_waiter.c", "waiter.o"),
    ] {
        work.gcc(&[
            "-O2",
            "-c",
            pic,
            "-ffunction-sections",
            "-fdata-sections",
            counter,
            factor,
            &Work::src(src),
            "-o",
            obj,
        ]);
    }
    let (key, public) = work.keys("test");
    Built {
        exe: work.path("target"),
        module,
        lib_dir,
        key,
        public,
        work,
    }
}

/// The bundle most tests apply: `compute` fixed (`compute 2` answers 106 instead of 7), level 1.
fn p1(b: &Built) -> PathBuf {
    b.work
        .bundle("target", "p1.o", &["compute"], 1, &b.key, "p1.suture")
}

fn apply(b: &Built, bundle: &std::path::Path, pid: i32) -> (bool, serde_json::Value) {
    apply_to(bundle, pid, &b.public)
}

/// `suture apply BUNDLE --all`, in JSON.
fn apply_all(b: &Built, bundle: &std::path::Path) -> (bool, serde_json::Value) {
    suture_json(&[
        "apply",
        bundle.to_str().unwrap(),
        "--all",
        "--trust",
        &b.trust(),
    ])
}

/// Apply, observe the fix with the same pid and shared state, revert, and compare bytes.
fn round_trip(kind: Kind) {
    let b = build(kind);
    let mut t = b.start();
    assert_eq!(t.ask("compute 2"), "7");
    let counter_before: i64 = t.ask("counter").parse().unwrap();
    let addr = runtime_address(t.pid, &b.module_path(), "compute");
    let original = read_mem(t.pid, addr, 32);

    let p1 = b
        .work
        .bundle(&b.module, "p1.o", &["compute"], 1, &b.key, "p1.suture");
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(ok, "apply failed: {v}");
    let r = &v["results"][0];
    assert_eq!(r["pid"], t.pid);
    assert!(r["stopped_us"].as_u64().unwrap() > 0);

    // Fixed behaviour, same process, through a direct call and a pointer stored before.
    assert!(t.alive());
    assert_eq!(t.ask("compute 2"), "106");
    assert_eq!(t.ask("ptr 2"), "106");
    assert_eq!(t.ask("greet"), "old greeting");
    if kind != Kind::SharedLib {
        // The patch counts in the running global: state is shared, not copied.
        let after: i64 = t.ask("counter").parse().unwrap();
        assert_eq!(after, counter_before + 2);
    }
    // The static the unchanged helper reads is the running one.
    assert_eq!(t.ask("factor 5"), "ok");
    assert_eq!(t.ask("compute 2"), "110");
    assert_eq!(t.ask("factor 3"), "ok");

    let (ok, st) = suture_json(&["status", "--pid", &t.pid_arg()]);
    assert!(ok);
    let patches = &st["processes"][0]["patches"];
    assert_eq!(patches.as_array().unwrap().len(), 1, "{st}");
    assert_eq!(patches[0]["level"], 1);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    assert!(maps.contains("/memfd:suture:"), "patch mapping is named");
    assert!(
        !maps.lines().any(|l| l.contains("memfd:suture")
            && l.split_whitespace().nth(1).unwrap().starts_with("rwx")),
        "patch memory is never writable and executable"
    );

    let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(ok, "revert failed: {v}");
    assert_eq!(t.ask("compute 2"), "7");
    assert_eq!(
        read_mem(t.pid, addr, 32),
        original,
        "revert restores the exact bytes"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    assert!(!maps.contains("memfd:suture"), "patch memory is unmapped");
    let (_, st) = suture_json(&["status", "--pid", &t.pid_arg()]);
    assert_eq!(st["processes"][0]["patches"].as_array().unwrap().len(), 0);
    assert_eq!(t.ask("ping"), "?", "the target still answers");
}

#[test]
fn pie_apply_and_revert() {
    round_trip(Kind::Pie);
}

#[test]
fn non_pie_apply_and_revert() {
    round_trip(Kind::NonPie);
}

#[test]
fn static_apply_and_revert() {
    round_trip(Kind::Static);
}

#[test]
fn shared_library_apply_and_revert() {
    round_trip(Kind::SharedLib);
}

#[test]
fn non_pic_patch_object_for_non_pie_target() {
    let b = build(Kind::NonPie);
    b.work.gcc(&[
        "-O2",
        "-c",
        "-fno-pic",
        "-ffunction-sections",
        "-DCOUNTER=counter",
        "-DFACTOR=secret_factor",
        &Work::src("patch_greet.c"),
        "-o",
        "nopic.o",
    ]);
    let mut t = b.start();
    let p = b.work.bundle(
        "target",
        "nopic.o",
        &["compute", "greet"],
        1,
        &b.key,
        "nopic.suture",
    );
    let (ok, v) = apply(&b, &p, t.pid);
    assert!(ok, "{v}");
    assert_eq!(t.ask("greet"), "new greeting");
    assert_eq!(t.ask("compute 2"), "206");
}

#[test]
fn threads_calling_constantly_see_old_or_new_never_garbage() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    assert_eq!(t.ask("spin 8"), "ok");
    std::thread::sleep(std::time::Duration::from_millis(50));
    let p1 = p1(&b);
    let p2 = b.work.bundle(
        "target",
        "p2.o",
        &["compute", "greet"],
        2,
        &b.key,
        "p2.suture",
    );
    for p in [&p1, &p2] {
        let (ok, v) = apply(&b, p, t.pid);
        assert!(ok, "{v}");
        assert_eq!(v["results"][0]["threads"], 9);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(ok, "{v}");
    std::thread::sleep(std::time::Duration::from_millis(50));
    let stats = t.ask("stats");
    let (calls, bad) = stats.split_once(' ').unwrap();
    assert!(
        calls.parse::<u64>().unwrap() > 1000,
        "threads kept calling: {stats}"
    );
    assert_eq!(bad, "0", "no call returned garbage");
    assert!(t.alive());
}

#[test]
fn cumulative_level_replaces_lower_and_lower_is_refused() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    let p1 = p1(&b);
    let p2 = b.work.bundle(
        "target",
        "p2.o",
        &["compute", "greet"],
        2,
        &b.key,
        "p2.suture",
    );
    let greet = runtime_address(t.pid, &b.exe, "greet");
    let greet_bytes = read_mem(t.pid, greet, 16);
    assert!(apply(&b, &p1, t.pid).0);
    assert_eq!(t.ask("compute 2"), "106");
    let (ok, v) = apply(&b, &p2, t.pid);
    assert!(ok, "{v}");
    assert_eq!(
        v["results"][0]["replaced"],
        "target-L1-".to_string() + &id_hash(&b, "p1.o")
    );
    assert_eq!(t.ask("compute 2"), "206");
    assert_eq!(t.ask("greet"), "new greeting");
    let (_, st) = suture_json(&["status", "--pid", &t.pid_arg()]);
    let patches = st["processes"][0]["patches"].as_array().unwrap().clone();
    assert_eq!(
        patches.len(),
        1,
        "level 1 was superseded in the same stop: {st}"
    );
    assert_eq!(patches[0]["level"], 2);

    // Lower or equal level: refused, memory untouched.
    let before = snapshot(t.pid);
    for p in [&p1, &p2] {
        let (ok, v) = apply(&b, p, t.pid);
        assert!(!ok);
        assert_eq!(v["kind"], "refused", "{v}");
        assert!(v["error"].as_str().unwrap().contains("not newer"), "{v}");
    }
    assert_same_memory(&before, &snapshot(t.pid));
    assert_eq!(t.ask("compute 2"), "206");

    let (ok, _) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(ok);
    assert_eq!(t.ask("compute 2"), "7");
    assert_eq!(t.ask("greet"), "old greeting");
    assert_eq!(read_mem(t.pid, greet, 16), greet_bytes);
}

fn id_hash(b: &Built, obj: &str) -> String {
    use std::process::Command;
    let out = Command::new("sha256sum")
        .arg(b.work.path(obj))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)[..8].to_string()
}

#[test]
fn thread_inside_replaced_function_makes_apply_report_busy_and_change_nothing() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    assert_eq!(t.ask("block"), "ok");
    let p = b.work.bundle(
        "target",
        "blocker.o",
        &["blocker"],
        1,
        &b.key,
        "blocker.suture",
    );
    let before = snapshot(t.pid);
    let (ok, v) = apply_within(&p, t.pid, &b.public, 300);
    assert!(!ok);
    assert_eq!(v["kind"], "busy", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("blocker"),
        "names the function: {v}"
    );
    assert_same_memory(&before, &snapshot(t.pid));
    assert_eq!(t.ask("compute 2"), "7");
}

/// A word on a stack that points into the function being replaced, but is no return address
/// (a code pointer in a local, a stale slot), is told apart by walking the stack with the
/// unwind tables — which are read only once a stack gives a reason to — and does not make the
/// process busy.
#[test]
fn a_code_pointer_on_a_stack_is_not_taken_for_a_return_address() {
    for kind in [Kind::Pie, Kind::SharedLib] {
        let b = build(kind);
        let mut t = b.start();
        assert_eq!(t.ask("stale"), "ok");
        let bundle = b
            .work
            .bundle(&b.module, "p1.o", &["compute"], 1, &b.key, "p1.suture");
        let (ok, v) = apply_within(&bundle, t.pid, &b.public, 300);
        assert!(ok, "{kind:?}: {v}");
        assert_eq!(t.ask("compute 2"), "106", "{kind:?}");
    }
}

/// A revert takes the detours out at once, but the patch's memory goes only once no thread is
/// in its code: a thread asleep inside a replacement survives the revert, wakes up, returns,
/// and the memory left behind is cleaned up by the next revert.
#[test]
fn a_thread_inside_the_patch_code_outlives_its_revert() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    let p = b.work.bundle(
        "target",
        "waiter.o",
        &["blocker"],
        1,
        &b.key,
        "waiter.suture",
    );
    let (ok, v) = apply(&b, &p, t.pid);
    assert!(ok, "{v}");
    // A new thread enters blocker(): the replacement, where it sleeps until `counter` moves.
    assert_eq!(t.ask("block"), "ok");
    let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg(), "--timeout-ms", "300"]);
    assert!(ok, "the detour comes out even with a thread inside: {v}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    assert!(
        maps.contains("memfd:suture"),
        "the code a thread is in stays mapped"
    );
    // The thread wakes, returns through the patch's code and ends; the process answers with
    // the original code (compute moves `counter`).
    assert_eq!(t.ask("compute 2"), "7");
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(t.ask("compute 2"), "7");
    assert_eq!(t.ask("greet"), "old greeting");
    // Nothing leads into the memory and nobody is in it now: the next revert removes it.
    let (_, st) = suture_json(&["status", "--pid", &t.pid_arg()]);
    let left = &st["processes"][0]["other"][0];
    assert_eq!(left["state"], "orphaned", "the left memory is listed: {st}");
    let id = left["name"].as_str().unwrap().to_string();
    let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg(), &id]);
    assert!(ok, "{v}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    assert!(!maps.contains("memfd:suture"), "{maps}");
    assert_eq!(t.ask("compute 2"), "7");
}

/// Applies `bundle` (p1: `compute 2` answers 106), then reverts it (7 again).
fn fixed_then_reverted(b: &Built, t: &mut Target, bundle: &std::path::Path, what: &str) {
    let (ok, v) = apply(b, bundle, t.pid);
    assert!(ok, "{what}: {v}");
    assert_eq!(t.ask("compute 2"), "106", "{what}");
    reverted(t, what);
}

/// Revert, and the old answer is back.
fn reverted(t: &mut Target, what: &str) {
    let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(ok, "{what}: {v}");
    assert_eq!(t.ask("compute 2"), "7", "{what}");
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// The vfork child of `pid` (one of its threads waits in `vfork`), once it exists.
fn vfork_child(pid: i32) -> i32 {
    for _ in 0..200 {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            if let Some(c) = children.split_whitespace().next() {
                return c.parse().unwrap();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("process {pid} made no vfork child");
}

fn wait_gone(pid: i32) {
    for _ in 0..1000 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("process {pid} is still there");
}

/// A vfork child runs in its parent's memory until it execs: writing through either changes
/// what the other runs, and no stop of one covers the other's threads. Both are left alone
/// (busy, memory byte-identical) while the child lives; the parent is patched, and reverted,
/// once it is gone.
#[test]
fn a_process_sharing_its_memory_with_a_vfork_child_is_left_alone_until_the_child_is_gone() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    let p1 = p1(&b);
    assert_eq!(t.ask("vfork 2000"), "ok");
    let child = vfork_child(t.pid);
    let before = snapshot(t.pid);
    for (pid, says) in [
        (t.pid, format!("has a vfork (or CLONE_VM) child, {child},")),
        (child, format!("is a vfork child of process {}", t.pid)),
    ] {
        let (ok, v) = apply(&b, &p1, pid);
        assert!(!ok, "{v}");
        assert_eq!(v["kind"], "busy", "{v}");
        assert!(v["error"].as_str().unwrap().contains(&says), "{v}");
    }
    assert_same_memory(&before, &snapshot(t.pid));
    wait_gone(child);
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(ok, "{v}");
    assert_eq!(t.ask("compute 2"), "106");
    // Reverting waits for the next child the same way.
    assert_eq!(t.ask("vfork 1000"), "ok");
    let child = vfork_child(t.pid);
    let before = snapshot(t.pid);
    let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(!ok, "{v}");
    assert_eq!(v["kind"], "busy", "{v}");
    assert_same_memory(&before, &snapshot(t.pid));
    wait_gone(child);
    reverted(&mut t, "revert");
}

/// A process whose main thread has exited (`pthread_exit` in `main`) lives on in its other
/// threads, but its main thread is a zombie without memory, maps, map_files or exe: it was
/// taken for exited. It is checked, patched, shown and reverted like any other.
#[test]
fn a_process_whose_main_thread_exited_is_patched_like_any_other() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    assert_eq!(t.ask("leave"), "ok");
    // It answers, then exits: wait until it is a zombie.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while state(t.pid) != "Z" {
        assert!(std::time::Instant::now() < deadline, "{}", state(t.pid));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let p1 = p1(&b);
    let (ok, v) = suture_json(&[
        "check",
        "--pid",
        &t.pid_arg(),
        "--bundle",
        p1.to_str().unwrap(),
    ]);
    assert!(ok, "{v}");
    assert_eq!(v["patchable"], true, "{v}");
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(ok, "{v}");
    assert_eq!(t.ask("compute 2"), "106");
    let (ok, v) = suture_json(&["status", "--pid", &t.pid_arg()]);
    assert!(ok, "{v}");
    // (Applied patches are listed under `patches`, anything else under `other`.)
    assert_eq!(
        v["processes"][0]["patches"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    assert_eq!(
        v["processes"][0]["other"].as_array().map(Vec::len),
        Some(0),
        "{v}"
    );
    reverted(&mut t, "revert");
}

/// The engine acts through the quietest sleeping thread; one made with the smallest stack
/// there is has no room for its frame below the stack pointer. Another thread is taken, and
/// the patch goes in (it used to fail: "too little stack left").
#[test]
fn a_thread_with_a_tiny_stack_is_passed_over_not_a_failure() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    assert_eq!(t.ask("smallstack"), "ok");
    let p1 = p1(&b);
    fixed_then_reverted(&b, &mut t, &p1, "tiny stack");
}

/// A cgroup that can freeze one process: the v1 freezer where it is mounted, else cgroup v2.
struct Freezer {
    dir: PathBuf,
    root: PathBuf,
    v2: bool,
    pid: i32,
}

impl Freezer {
    fn new(pid: i32) -> Freezer {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let find = |v2: bool| {
            mounts.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let ok = if v2 {
                    f[2] == "cgroup2"
                } else {
                    f[2] == "cgroup" && f[3].split(',').any(|o| o == "freezer")
                };
                ok.then(|| PathBuf::from(f[1]))
            })
        };
        let (root, v2) = find(false)
            .map(|r| (r, false))
            .or_else(|| find(true).map(|r| (r, true)))
            .expect("a cgroup freezer (v1) or cgroup v2");
        let dir = root.join(format!("suture-test-{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        Freezer { dir, root, v2, pid }
    }

    fn freeze(&self, on: bool) {
        let (file, value, done) = match (self.v2, on) {
            (false, true) => ("freezer.state", "FROZEN", "FROZEN"),
            (false, false) => ("freezer.state", "THAWED", "THAWED"),
            (true, true) => ("cgroup.freeze", "1", "frozen 1"),
            (true, false) => ("cgroup.freeze", "0", "frozen 0"),
        };
        std::fs::write(self.dir.join(file), value).unwrap();
        let state = if self.v2 {
            "cgroup.events"
        } else {
            "freezer.state"
        };
        for _ in 0..500 {
            let now = std::fs::read_to_string(self.dir.join(state)).unwrap_or_default();
            if now.lines().any(|l| l.trim() == done) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("cgroup {} never became {done}", self.dir.display());
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
            let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        }
        let _ = std::fs::write(self.root.join("cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A process frozen by its cgroup (`docker pause`, `systemctl freeze`) runs no thread until it
/// is thawed: apply says busy, frozen, and changes nothing; once thawed it is patched.
#[test]
fn a_frozen_process_is_busy_untouched_and_patched_once_thawed() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    let p1 = p1(&b);
    let cgroup = Freezer::new(t.pid);
    cgroup.freeze(true);
    let before = snapshot(t.pid);
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(!ok, "{v}");
    assert_eq!(v["kind"], "busy", "{v}");
    assert!(v["error"].as_str().unwrap().contains("frozen"), "{v}");
    assert_same_memory(&before, &snapshot(t.pid));
    cgroup.freeze(false);
    fixed_then_reverted(&b, &mut t, &p1, "thawed");
}

/// A library loaded twice in one process (a copy under another path, or a dlmopen namespace)
/// runs two copies of its code: patching one would leave the other vulnerable while saying
/// "applied". Refused with the reason, the process byte-identical; `check` says so too.
#[test]
fn a_library_loaded_twice_is_refused_not_half_patched() {
    let b = build(Kind::SharedLib);
    let mut t = b.start();
    let copy = b.work.path("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(b.module_path(), copy.join("libcalc.so")).unwrap();
    assert_eq!(
        t.ask(&format!("dlopen {}", copy.join("libcalc.so").display())),
        "ok"
    );
    let p1 = b
        .work
        .bundle(&b.module, "p1.o", &["compute"], 1, &b.key, "p1.suture");
    let before = snapshot(t.pid);
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(!ok, "{v}");
    assert_eq!(v["kind"], "refused", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("loaded 2 times"),
        "{v}"
    );
    assert_same_memory(&before, &snapshot(t.pid));
    let (_, v) = suture_json(&[
        "check",
        "--pid",
        &t.pid_arg(),
        "--bundle",
        p1.to_str().unwrap(),
    ]);
    assert_eq!(v["patchable"], false, "{v}");
    assert!(v["problems"].to_string().contains("loaded 2 times"), "{v}");
    assert_eq!(t.ask("compute 2"), "7");
}

/// Hardened services forbid adding PROT_EXEC to memory: systemd's MemoryDenyWriteExecute=yes
/// (a seccomp filter: journald, logind, networkd, timesyncd… run with it) and prctl
/// PR_SET_MDWE. Patch memory is mapped R-X and only ever loses rights, so both are patched,
/// answer fixed, and are reverted.
#[test]
fn services_that_deny_write_execute_memory_are_patched() {
    let b = build(Kind::Pie);
    let p1 = p1(&b);
    for rule in ["seccomp mdwe", "prctl mdwe"] {
        let mut t = b.start();
        assert_eq!(t.ask(rule), "0", "{rule}");
        fixed_then_reverted(&b, &mut t, &p1, rule);
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
        assert!(!maps.contains("memfd:suture"), "{rule}: {maps}");
    }
}

/// A process stopped by job control is not touched (nothing may run in it) and is patched
/// once it is continued.
#[test]
fn a_stopped_process_is_left_alone_and_patched_once_continued() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    assert_eq!(t.ask("spin 2"), "ok");
    let p1 = p1(&b);
    // Stopped while it waits for a command (a stop on the way back to it would never end).
    wait_idle(t.pid);
    signal(t.pid, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = snapshot(t.pid);
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(!ok, "{v}");
    assert_eq!(v["kind"], "busy", "{v}");
    assert!(v["error"].as_str().unwrap().contains("stopped"), "{v}");
    assert_same_memory(&before, &snapshot(t.pid));
    assert_eq!(state(t.pid), "T", "still stopped");
    signal(t.pid, nix::sys::signal::Signal::SIGCONT);
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(ok, "{v}");
    assert_eq!(t.ask("compute 2"), "106");
    // Reverting waits for it to run too, and changes nothing meanwhile.
    wait_idle(t.pid);
    signal(t.pid, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = snapshot(t.pid);
    let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(!ok, "{v}");
    assert_eq!(v["kind"], "busy", "{v}");
    assert_same_memory(&before, &snapshot(t.pid));
    signal(t.pid, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(t.ask("compute 2"), "106");
    reverted(&mut t, "revert");
    assert_eq!(
        t.ask("stats").split(' ').nth(1),
        Some("0"),
        "spinners saw no garbage"
    );
}

#[test]
fn refusals_leave_the_target_byte_identical() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    let p1 = p1(&b);
    let pid = t.pid_arg();
    let before = snapshot(t.pid);

    // Bad signature: one byte of the signed content flipped.
    let mut bytes = std::fs::read(&p1).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x40; // inside the object, before the signer key and signature
    let tampered = b.work.path("tampered.suture");
    std::fs::write(&tampered, &bytes).unwrap();
    let (ok, v) = suture_json(&[
        "apply",
        tampered.to_str().unwrap(),
        "--pid",
        &pid,
        "--trust",
        &b.trust(),
    ]);
    assert!(!ok, "{v}");
    assert!(v["error"].as_str().unwrap().contains("signature"), "{v}");

    // Untrusted key.
    let (_, other_pub) = b.work.keys("other");
    let (ok, v) = suture_json(&[
        "apply",
        p1.to_str().unwrap(),
        "--pid",
        &pid,
        "--trust",
        other_pub.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(v["error"].as_str().unwrap().contains("untrusted"), "{v}");

    // Wrong build-id: a bundle made for another build of the program.
    b.work.gcc(&[
        "-O2",
        "-DOTHER_BUILD",
        "-pthread",
        &Work::src("target.c"),
        "-o",
        "other",
    ]);
    let wrong = b
        .work
        .bundle("other", "p1.o", &["compute"], 1, &b.key, "wrong.suture");
    let (ok, v) = apply(&b, &wrong, t.pid);
    assert!(!ok);
    assert_eq!(v["kind"], "refused");
    assert!(v["error"].as_str().unwrap().contains("build-id"), "{v}");

    assert_same_memory(&before, &snapshot(t.pid));
    assert_eq!(t.ask("compute 2"), "7");
}

#[test]
fn running_bytes_that_differ_are_refused() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    let p1 = p1(&b);
    // Someone else changed a byte in the body of compute() (e.g. another tool's breakpoint).
    let addr = runtime_address(t.pid, &b.exe, "compute");
    let mut body = read_mem(t.pid, addr + 8, 1);
    body[0] = 0xcc;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{}/mem", t.pid))
            .unwrap();
        f.write_all_at(&body, addr + 8).unwrap();
    }
    let before = snapshot(t.pid);
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(!ok);
    assert_eq!(v["kind"], "refused");
    assert!(v["error"].as_str().unwrap().contains("differs"), "{v}");
    assert_same_memory(&before, &snapshot(t.pid));
    assert!(t.alive());
}

/// Gadget offsets remembered by earlier commands (`/run/suture/gadgets`) are checked against
/// the target's own bytes: forged ones cost a search, never a failure or a jump into the wrong
/// bytes (offset 0 of each mapping holds no gadget).
#[test]
fn forged_gadget_hints_are_checked_not_trusted() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root's commands remember gadgets");
        return;
    }
    let b = build(Kind::Pie);
    let mut t = b.start();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    let forged: String = maps
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let (range, perms, offset, dev, inode) = (w[0], w[1], w[2], w[3], w[4]);
            if !perms.contains('x') || !w.get(5).is_some_and(|p| p.starts_with('/')) {
                return None;
            }
            let (start, end) = range.split_once('-').unwrap();
            let len =
                u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap();
            let inode: u64 = inode.parse().unwrap();
            Some(format!(
                "{dev} {inode:x} {offset} {:x} 0 0\n",
                len.min(8 << 20)
            ))
        })
        .collect();
    assert!(forged.lines().count() >= 2, "{maps}");
    std::fs::create_dir_all("/run/suture").unwrap();
    std::fs::write("/run/suture/gadgets", &forged).unwrap();
    let (ok, v) = apply(&b, &p1(&b), t.pid);
    assert!(ok, "apply failed: {v}");
    assert_eq!(t.ask("compute 2"), "106");
    let hints = std::fs::read_to_string("/run/suture/gadgets").unwrap();
    assert!(
        forged.lines().any(|f| !hints.lines().any(|h| h == f)),
        "a searched mapping's forged hint is replaced: {hints}"
    );
}

#[test]
fn function_shorter_than_a_detour_is_refused() {
    let b = build(Kind::Pie);
    let out = suture(&[
        "bundle",
        "--target",
        b.exe.to_str().unwrap(),
        "--object",
        b.work.path("zero.o").to_str().unwrap(),
        "--replace",
        "zero",
        "--key",
        b.key.to_str().unwrap(),
        "--out",
        b.work.path("z.suture").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("shorter than the 5-byte detour"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert!(!b.work.path("z.suture").exists(), "no bundle written");
}

#[test]
fn check_reports_patchable_and_module() {
    let b = build(Kind::Pie);
    let t = b.start();
    let p1 = p1(&b);
    let (ok, v) = suture_json(&[
        "check",
        "--pid",
        &t.pid_arg(),
        "--bundle",
        p1.to_str().unwrap(),
    ]);
    assert!(ok, "{v}");
    assert_eq!(v["patchable"], true);
    let (ok, v) = suture_json(&["check", "--pid", "999999999"]);
    assert!(!ok);
    assert!(v["error"].as_str().unwrap().contains("no process"), "{v}");
    // A kernel thread has nothing to patch, and says so (none are visible in a container).
    let kernel_thread = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let flags: u64 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(6)?
            .parse()
            .ok()?;
        (flags & 0x0020_0000 != 0).then_some(pid)
    });
    if let Some(k) = kernel_thread {
        let (ok, v) = suture_json(&["check", "--pid", &k.to_string()]);
        assert!(!ok && v["patchable"] == false, "{v}");
        assert!(v["problems"].to_string().contains("kernel thread"), "{v}");
    }
}

#[test]
fn apply_all_patches_every_process_mapping_the_module() {
    let b = build(Kind::Pie);
    let mut targets: Vec<Target> = (0..4).map(|_| b.start()).collect();
    let p1 = p1(&b);
    let (ok, v) = apply_all(&b, &p1);
    assert!(ok, "{v}");
    assert_eq!(v["results"].as_array().unwrap().len(), 4, "{v}");
    for t in &mut targets {
        assert_eq!(t.ask("compute 2"), "106");
    }
}

#[test]
fn seccomp_filter_that_blocks_patching_is_refused_and_one_that_does_not_is_patched() {
    let b = build(Kind::Pie);
    let p1 = p1(&b);

    let mut t = b.start();
    assert_eq!(t.ask("seccomp memfd"), "0");
    let before = snapshot(t.pid);
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(!ok);
    assert_eq!(v["kind"], "refused", "{v}");
    assert!(v["error"].as_str().unwrap().contains("memfd_create"), "{v}");
    assert_same_memory(&before, &snapshot(t.pid));
    assert_eq!(t.ask("compute 2"), "7");
    let (ok, c) = suture_json(&["check", "--pid", &t.pid_arg()]);
    assert!(!ok && c["patchable"] == false, "{c}");

    // Docker-like: a filter is present but allows what patching needs.
    let mut t = b.start();
    assert_eq!(t.ask("seccomp reboot"), "0");
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(ok, "{v}");
    assert_eq!(t.ask("compute 2"), "106");
}

#[test]
fn threads_born_and_dying_during_the_stop_do_not_escape_or_break_it() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    assert_eq!(t.ask("churn"), "ok");
    let p1 = p1(&b);
    let p2 = b.work.bundle(
        "target",
        "p2.o",
        &["compute", "greet"],
        2,
        &b.key,
        "p2.suture",
    );
    for p in [&p1, &p2] {
        let (ok, v) = apply(&b, p, t.pid);
        assert!(ok, "{v}");
    }
    let (ok, v) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(ok, "{v}");
    // The churning threads go on (on a busy machine they may need a moment to get going).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stats = loop {
        let stats = t.ask("stats");
        let calls: u64 = stats.split_once(' ').unwrap().0.parse().unwrap();
        if calls > 100 || std::time::Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (calls, bad) = stats.split_once(' ').unwrap();
    assert!(
        calls.parse::<u64>().unwrap() > 100,
        "threads stopped being born: {stats}"
    );
    assert_eq!(bad, "0");
    assert_eq!(t.ask("compute 2"), "7");
}

#[test]
fn a_process_that_exits_mid_apply_gets_a_one_line_error() {
    let b = build(Kind::Pie);
    let p1 = p1(&b);
    for delay_us in [0u64, 100, 300, 600, 1000, 2000] {
        let mut t = b.start();
        assert_eq!(t.ask("spin 4"), "ok");
        let pid = t.pid;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_micros(delay_us));
            // SAFETY: kill(2) of a child this test owns; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let out = suture(&[
            "--json",
            "apply",
            p1.to_str().unwrap(),
            "--pid",
            &pid.to_string(),
            "--trust",
            &b.trust(),
        ]);
        killer.join().unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("json even when the target dies");
        if !out.status.success() {
            let kind = v["kind"].as_str().unwrap();
            assert!(["exited", "refused", "failed"].contains(&kind), "{v}");
            assert!(!v["error"].as_str().unwrap().contains('\n'));
        }
        let _ = t.child.wait();
    }
}

#[test]
fn thread_local_variables_of_the_executable_are_shared() {
    let b = build(Kind::Pie);
    b.work.gcc(&[
        "-O2",
        "-c",
        "-fPIE",
        "-ffunction-sections",
        &Work::src("patch_tls.c"),
        "-o",
        "tls.o",
    ]);
    let mut t = b.start();
    assert_eq!(t.ask("tls"), "1");
    assert_eq!(t.ask("tls"), "2");
    let p = b
        .work
        .bundle("target", "tls.o", &["touch_tls"], 1, &b.key, "tls.suture");
    let (ok, v) = apply(&b, &p, t.pid);
    assert!(ok, "{v}");
    // The main thread's own counter (2) continues: the patch found the running TLS block.
    assert_eq!(t.ask("tls"), "102");
    assert_eq!(t.ask("tls"), "202");
}

#[test]
fn apply_all_again_skips_processes_that_already_carry_the_patch() {
    let b = build(Kind::Pie);
    let mut first = b.start();
    let p1 = p1(&b);
    let (ok, v) = apply_all(&b, &p1);
    assert!(ok, "{v}");
    let mut second = b.start(); // started after the rollout
    let (ok, v) = apply_all(&b, &p1);
    assert!(ok, "{v}");
    assert_eq!(
        v["skipped"],
        serde_json::json!([{"pid": first.pid, "reason": "already carries this patch"}])
    );
    assert_eq!(v["results"][0]["pid"], second.pid);
    assert_eq!(first.ask("compute 2"), "106");
    assert_eq!(second.ask("compute 2"), "106");
}

/// An interrupted rollout leaves memory of the bundle but no fix: running `apply --all` again
/// must patch that process, not skip it as one that carries the patch.
#[test]
fn apply_all_again_patches_a_process_an_interrupted_run_left_unpatched() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    let p1 = p1(&b);
    // Killed after mapping the patch, before any detour: memory with the bundle's record.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_suture"))
        .args(["apply", p1.to_str().unwrap(), "--pid", &t.pid_arg()])
        .args(["--trust", &b.trust()])
        .env("SUTURE_FAULT", "apply:mapped")
        .env("SUTURE_LOG", "error")
        .output()
        .expect("suture runs");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "the fault point killed it"
    );
    assert_eq!(t.ask("compute 2"), "7", "not fixed");
    let (_, st) = suture_json(&["status", "--pid", &t.pid_arg()]);
    assert_eq!(st["processes"][0]["other"][0]["state"], "orphaned", "{st}");

    let (ok, v) = apply_all(&b, &p1);
    assert!(ok, "{v}");
    assert_eq!(v["skipped"], serde_json::json!([]), "{v}");
    assert_eq!(v["results"][0]["pid"], t.pid, "{v}");
    assert_eq!(t.ask("compute 2"), "106");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    assert_eq!(
        maps.lines()
            .filter(|l| l.contains("memfd:suture") && l.contains(" 00000000 "))
            .count(),
        1,
        "the left memory was reclaimed: {maps}"
    );
}

#[test]
fn target_in_its_own_mount_namespace_is_found_through_its_own_view() {
    // Like a container: the binary lives on a tmpfs mounted only inside the target's mount
    // namespace, so its path means nothing on the host.
    let b = build(Kind::Pie);
    let p1 = p1(&b);
    let inside = b.work.path("ns");
    std::fs::create_dir_all(&inside).unwrap();
    let script = format!(
        "mount -t tmpfs none {d} && cp {exe} {d}/target && exec {d}/target",
        d = inside.display(),
        exe = b.exe.display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let mut t = Target::start_command(cmd, None);
    assert!(
        !inside.join("target").exists(),
        "the host does not see the binary"
    );
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(ok, "{v}");
    assert_eq!(t.ask("compute 2"), "106");
}

#[test]
fn a_second_operation_on_the_same_process_waits_or_says_one_is_in_progress() {
    let b = build(Kind::Pie);
    let mut t = b.start();
    assert_eq!(t.ask("block"), "ok");
    let p = b.work.bundle(
        "target",
        "blocker.o",
        &["blocker"],
        1,
        &b.key,
        "blocker2.suture",
    );
    // The first one waits (busy) for 3 s while holding the process.
    let first = std::process::Command::new(env!("CARGO_BIN_EXE_suture"))
        .args([
            "--json",
            "apply",
            p.to_str().unwrap(),
            "--pid",
            &t.pid_arg(),
            "--trust",
            &b.trust(),
            "--timeout-ms",
            "3000",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let p1 = b
        .work
        .bundle(&b.module, "p1.o", &["compute"], 1, &b.key, "p1-lock.suture");
    let (ok, v) = apply_within(&p1, t.pid, &b.public, 200);
    assert!(!ok, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains(&format!(
            "another suture operation is in progress on pid {}",
            t.pid
        )),
        "{v}"
    );
    let out = first.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "busy", "{v}");
    // Once the first is done, the second goes through.
    let (ok, v) = apply(&b, &p1, t.pid);
    assert!(ok, "{v}");
    assert_eq!(t.ask("compute 2"), "106");
}
