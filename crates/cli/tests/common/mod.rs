//! Shared helpers of the integration tests: compile C with gcc, run targets, drive `suture`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

pub const C_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c");

pub struct Work {
    pub dir: tempfile::TempDir,
}

impl Work {
    pub fn new() -> Work {
        Work {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs gcc in the work directory with the test C sources on the include path.
    pub fn gcc(&self, args: &[&str]) {
        let out = Command::new("gcc")
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .expect("gcc runs");
        assert!(
            out.status.success(),
            "gcc {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn src(name: &str) -> String {
        format!("{C_DIR}/{name}")
    }

    /// Generates a key pair NAME in the work directory.
    pub fn keys(&self, name: &str) -> (PathBuf, PathBuf) {
        let out = suture(&[
            "keygen",
            "--name",
            name,
            "--out",
            self.dir.path().to_str().unwrap(),
        ]);
        assert!(out.status.success(), "keygen: {}", stderr(&out));
        (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.pub")),
        )
    }

    /// `suture bundle`, asserting success; returns the bundle path.
    pub fn bundle(
        &self,
        target: &str,
        object: &str,
        replaces: &[&str],
        level: u32,
        key: &Path,
        out: &str,
    ) -> PathBuf {
        let out_path = self.path(out);
        let mut args = vec![
            "bundle".to_string(),
            "--target".into(),
            self.path(target).display().to_string(),
            "--object".into(),
            self.path(object).display().to_string(),
            "--level".into(),
            level.to_string(),
            "--cve".into(),
            "CVE-2024-0001".into(),
            "--key".into(),
            key.display().to_string(),
            "--out".into(),
            out_path.display().to_string(),
        ];
        for r in replaces {
            args.push("--replace".into());
            args.push(r.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = suture(&args);
        assert!(o.status.success(), "bundle failed: {}", stderr(&o));
        out_path
    }
}

pub fn suture(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_suture"))
        .args(args)
        .env("SUTURE_LOG", "warn")
        .output()
        .expect("suture runs")
}

/// Runs suture with `--json` and parses its output.
pub fn suture_json(args: &[&str]) -> (bool, serde_json::Value) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = suture(&a);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad json ({e}): {} / {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        )
    });
    (out.status.success(), v)
}

/// `suture apply BUNDLE --pid PID --trust KEY`, in JSON.
pub fn apply_to(bundle: &Path, pid: i32, trust: &Path) -> (bool, serde_json::Value) {
    apply_with(bundle, pid, trust, &[])
}

/// [`apply_to`] that gives up on a busy process after `ms` milliseconds.
pub fn apply_within(bundle: &Path, pid: i32, trust: &Path, ms: u64) -> (bool, serde_json::Value) {
    apply_with(bundle, pid, trust, &["--timeout-ms", &ms.to_string()])
}

fn apply_with(bundle: &Path, pid: i32, trust: &Path, more: &[&str]) -> (bool, serde_json::Value) {
    let pid = pid.to_string();
    let mut args = vec![
        "apply",
        bundle.to_str().unwrap(),
        "--pid",
        &pid,
        "--trust",
        trust.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    suture_json(&args)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running target that answers one line per command.
pub struct Target {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: i32,
}

impl Target {
    pub fn start(exe: &Path, lib_dir: Option<&Path>) -> Target {
        Target::start_command(Command::new(exe), lib_dir)
    }

    /// Starts `cmd`, which must end up `exec`ing the target (same pid).
    pub fn start_command(mut cmd: Command, lib_dir: Option<&Path>) -> Target {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        // The kernel rewrites each thread's registered rseq area (cpu id) whenever the thread
        // resumes; without registration, any byte that changes was changed by us.
        cmd.env("GLIBC_TUNABLES", "glibc.pthread.rseq=0");
        if let Some(d) = lib_dir {
            cmd.env("LD_LIBRARY_PATH", d);
        }
        let mut child = cmd.spawn().expect("target starts");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        stdout.read_line(&mut first).expect("ready line");
        assert!(first.starts_with("ready"), "target said {first:?}");
        let pid = child.id() as i32;
        Target {
            child,
            stdin,
            stdout,
            pid,
        }
    }

    pub fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to target");
        self.stdin.flush().expect("flush");
        let mut out = String::new();
        self.stdout.read_line(&mut out).expect("read from target");
        assert!(
            !out.is_empty(),
            "target {} closed its output (crashed?)",
            self.pid
        );
        out.trim().to_string()
    }

    /// Sends a command without waiting for an answer (one that may kill the target).
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to target");
        self.stdin.flush().expect("flush");
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid_arg(&self) -> String {
        self.pid.to_string()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Address of `symbol` in the running target (via `nm` on the file and the load bias).
pub fn runtime_address(pid: i32, file: &Path, symbol: &str) -> u64 {
    let out = Command::new("nm").arg(file).output().expect("nm");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = text
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let v = f.next()?;
            let _t = f.next()?;
            (f.next()? == symbol).then(|| u64::from_str_radix(v, 16).ok())?
        })
        .unwrap_or_else(|| panic!("{symbol} not in nm output of {}", file.display()));
    let is_pie = {
        let h = std::fs::read(file).expect("read elf");
        u16::from_le_bytes([h[16], h[17]]) == 3
    };
    if !is_pie {
        return value;
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let canon = std::fs::canonicalize(file).expect("canonical");
    let base = maps
        .lines()
        .find(|l| {
            l.ends_with(canon.to_str().unwrap()) && l.split_whitespace().nth(2) == Some("00000000")
        })
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .expect("module mapped");
    base + value
}

/// The scheduler state of a process's main thread (`R`, `S`, `T`, `Z`, …; `?` if gone).
pub fn state(pid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .unwrap_or("?")
        .to_string()
}

pub fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, addr).expect("read mem");
    buf
}

/// Waits until the target's main thread sits in `read(0, …)`, waiting for its next command.
pub fn wait_idle(pid: i32) {
    for _ in 0..500 {
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if sc.split_whitespace().take(2).eq(["0", "0x0"]) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    panic!("target {pid} never went idle");
}

/// Every readable mapping's range, protection, name and bytes: the target's whole memory,
/// taken while it waits for a command.
pub fn snapshot(pid: i32) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
    wait_idle(pid);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut out = Vec::new();
    for l in maps.lines() {
        if l.contains("[vvar") || l.contains("[vsyscall]") {
            continue;
        }
        let mut parts = l.split_whitespace();
        let range = parts.next().unwrap();
        let perms = parts.next().unwrap();
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(e, 16).unwrap(),
        );
        let mut bytes = Vec::new();
        if perms.starts_with('r') {
            bytes = vec![0u8; (e - s) as usize];
            if f.read_exact_at(&mut bytes, s).is_err() {
                bytes.clear();
            }
        }
        out.push((l.to_string(), bytes));
    }
    out
}

/// Asserts two snapshots are byte-identical, naming the first mapping that differs.
pub fn assert_same_memory(before: &[(String, Vec<u8>)], after: &[(String, Vec<u8>)]) {
    let b: Vec<&String> = before.iter().map(|(l, _)| l).collect();
    let a: Vec<&String> = after.iter().map(|(l, _)| l).collect();
    assert_eq!(b, a, "the target's mappings changed");
    for ((line, x), (_, y)) in before.iter().zip(after) {
        if x != y {
            let i = x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0);
            panic!("memory of mapping `{line}` changed at offset {i:#x}");
        }
    }
}
