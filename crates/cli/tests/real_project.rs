//! A real project and a real upstream security fix: Debian's zlib source package (1.2.13),
//! deployed with the fix for CVE-2022-37434 reverted, patched live from the upstream diff with
//! `suture build` and its own `./configure && make`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const DIFF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/real/zlib-CVE-2022-37434.diff"
);
const ZLIB: &str = "zlib=1:1.2.13.dfsg-1";

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `apt-get source` with its own source list and state, leaving the system's apt untouched.
fn fetch_zlib(dir: &Path) -> PathBuf {
    let apt = dir.join("apt");
    for d in ["parts", "lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.join(d)).unwrap();
    }
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .expect("a Debian 12 machine")
        .replace("Types: deb\n", "Types: deb-src\n");
    std::fs::write(apt.join("parts/debian-src.sources"), sources).unwrap();
    let opts = |c: &mut Command| {
        c.args([
            "-q",
            "-o",
            "Dir::Etc::SourceList=/dev/null",
            "-o",
            &format!("Dir::Etc::SourceParts={}", apt.join("parts").display()),
            "-o",
            &format!("Dir::State::Lists={}", apt.join("lists").display()),
            "-o",
            &format!("Dir::Cache={}", apt.join("cache").display()),
            "-o",
            "Debug::NoLocking=1",
            "-o",
            "Acquire::Retries=3",
        ]);
    };
    let mut update = Command::new("apt-get");
    opts(&mut update);
    run(update.arg("update"));
    let mut source = Command::new("apt-get");
    opts(&mut source);
    run(source
        .args(["source", "--download-only", ZLIB])
        .current_dir(dir));
    run(Command::new("tar")
        .args(["xjf", "zlib_1.2.13.dfsg.orig.tar.bz2"])
        .current_dir(dir));
    dir.join("zlib-1.2.13.dfsg")
}

#[test]
fn zlib_cve_2022_37434_fixed_live_from_the_upstream_diff() {
    let work = Work::new();
    let src = fetch_zlib(work.dir.path());
    // The deployment: zlib with the upstream fix reverted, built with its own build system.
    run(Command::new("patch")
        .args(["-p1", "-R", "-s", "-i", DIFF])
        .current_dir(&src));
    run(Command::new("sh")
        .args(["-c", "./configure >/dev/null && make -s libz.so.1.2.13"])
        .current_dir(&src));
    let inc = format!("-I{}", src.display());
    let lib = format!("-L{}", src.display());
    work.gcc(&[
        "-O2",
        &inc,
        &Work::src("gzservice.c"),
        &lib,
        "-lz",
        "-o",
        "gzservice",
    ]);
    let service = work.path("gzservice");

    // The bug is real: the crafted header kills a vulnerable process.
    let mut victim = Command::new(&service)
        .env("LD_LIBRARY_PATH", &src)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(victim.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    writeln!(victim.stdin.as_mut().unwrap(), "gzhead").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let status = victim.wait().unwrap();
    assert!(
        line.is_empty() && !status.success(),
        "the vulnerable zlib survived: {line:?} {status}"
    );

    // A running service on the same vulnerable library, patched live.
    let mut t = Target::start(&service, Some(&src));
    assert_eq!(t.ask("version"), "1.2.13");
    let (key, public) = work.keys("zlib");
    let bundle = work.path("cve.suture");
    let target = src.join("libz.so.1.2.13");
    let out = suture(&[
        "--json",
        "build",
        "--source",
        src.to_str().unwrap(),
        "--diff",
        DIFF,
        "--target",
        target.to_str().unwrap(),
        "--build-cmd",
        "./configure && make libz.so.1.2.13",
        "--key",
        key.to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
        "--cve",
        "CVE-2022-37434",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "{}{v}", stderr(&out));
    assert_eq!(
        v["summary"]["changed"],
        serde_json::json!(["inflate (inflate.c)"])
    );
    let (ok, a) = suture_json(&[
        "apply",
        bundle.to_str().unwrap(),
        "--pid",
        &t.pid_arg(),
        "--trust",
        public.to_str().unwrap(),
    ]);
    assert!(ok, "{a}");
    assert_eq!(
        t.ask("gzhead"),
        "ok",
        "the extra field is cut at 16 bytes, nothing overwritten"
    );
    assert_eq!(t.ask("gzhead"), "ok");
    assert_eq!(t.ask("version"), "1.2.13");
    let (_, st) = suture_json(&["status", "--pid", &t.pid_arg()]);
    assert_eq!(
        st["processes"][0]["patches"][0]["cves"][0],
        "CVE-2022-37434"
    );
}
