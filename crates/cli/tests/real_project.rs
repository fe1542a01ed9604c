//! Real projects and real upstream security fixes, from Debian source packages built with their
//! own build systems:
//! - zlib 1.2.13 (`./configure && make`), deployed with the fix for CVE-2022-37434 reverted;
//! - expat 2.5.0 (CMake), deployed as released, before the fix for CVE-2024-45490;
//! - libyaml 0.2.5 (autotools and libtool, with a stale build in the source folder);
//!
//! each patched live from the upstream diff with `suture build` while a program using the
//! library runs; and
//! - the machine's own, stripped `/usr/lib/x86_64-linux-gnu/libz.so.1.2.13` from Debian's
//!   zlib1g package, rebuilt from the source package with Debian's flags, proven to be the same
//!   code, and patched live in a program that uses it.

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

/// `apt-get source --download-only` of the first of `versions` the mirror serves, with its own
/// source list and state, leaving the system's apt untouched.
fn fetch_source(dir: &Path, versions: &[&str]) {
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
    let mut failures = String::new();
    for version in versions {
        let mut source = Command::new("apt-get");
        opts(&mut source);
        let out = source
            .args(["source", "--download-only", version])
            .current_dir(dir)
            .output()
            .expect("apt-get runs");
        if out.status.success() {
            return;
        }
        failures += &String::from_utf8_lossy(&out.stderr);
    }
    panic!("no source package among {versions:?}: {failures}");
}

/// A real fix to build for a deployed library.
struct Fix<'a> {
    src: &'a Path,
    diff: &'a str,
    target: &'a Path,
    build_cmd: &'a str,
    cve: Option<&'a str>,
}

/// `suture build` of the fix, then `suture apply` of its bundle to the running target; returns
/// the build's JSON report.
fn build_and_apply(work: &Work, fix: &Fix, t: &Target) -> serde_json::Value {
    let (key, public) = work.keys("real");
    let bundle = work.path("cve.suture");
    let mut args = vec![
        "--json",
        "build",
        "--source",
        fix.src.to_str().unwrap(),
        "--diff",
        fix.diff,
        "--target",
        fix.target.to_str().unwrap(),
        "--build-cmd",
        fix.build_cmd,
        "--key",
        key.to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
    ];
    if let Some(cve) = fix.cve {
        args.extend(["--cve", cve]);
    }
    let out = suture(&args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "{}{v}", stderr(&out));
    let (ok, a) = apply_to(&bundle, t.pid, &public);
    assert!(ok, "{a}");
    v
}

/// Compiles `tests/c/NAME.c` against library `lib` (headers in `include`, the library in
/// `lib_dir`) into the work folder; returns the program.
fn compile_service(
    work: &Work,
    name: &str,
    include: &[&Path],
    lib_dir: &Path,
    lib: &str,
) -> PathBuf {
    let mut args: Vec<String> = vec!["-O2".into()];
    args.extend(include.iter().map(|d| format!("-I{}", d.display())));
    args.push(Work::src(&format!("{name}.c")));
    args.extend([
        format!("-L{}", lib_dir.display()),
        format!("-l{lib}"),
        "-o".into(),
        name.into(),
    ]);
    work.gcc(&args.iter().map(String::as_str).collect::<Vec<_>>());
    work.path(name)
}

fn fetch_zlib(dir: &Path) -> PathBuf {
    fetch_source(dir, &[ZLIB]);
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
    let service = compile_service(&work, "gzservice", &[&src], &src, "z");

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
    let v = build_and_apply(
        &work,
        &Fix {
            src: &src,
            diff: DIFF,
            target: &src.join("libz.so.1.2.13"),
            build_cmd: "./configure && make libz.so.1.2.13",
            cve: Some("CVE-2022-37434"),
        },
        &t,
    );
    assert_eq!(
        v["summary"]["changed"],
        serde_json::json!(["inflate (inflate.c)"])
    );
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

/// The Debian package's own configuration, less what the test does not need.
const EXPAT_CMAKE: &str = "cmake -S expat -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DEXPAT_BUILD_TESTS=OFF -DEXPAT_BUILD_EXAMPLES=OFF -DEXPAT_BUILD_DOCS=OFF \
    -DEXPAT_BUILD_TOOLS=OFF >/dev/null && cmake --build build";

const EXPAT_DIFF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/real/expat-CVE-2024-45490.diff"
);

#[test]
fn expat_cve_2024_45490_fixed_live_in_a_cmake_build() {
    let work = Work::new();
    // Only the upstream tarball is used; any Debian 12 revision carries the same one.
    fetch_source(
        work.dir.path(),
        &["expat=2.5.0-1+deb12u2", "expat=2.5.0-1+deb12u1", "expat"],
    );
    run(Command::new("tar")
        .args(["xzf", "expat_2.5.0.orig.tar.gz"])
        .current_dir(work.dir.path()));
    let src = work.path("libexpat-R_2_5_0");
    run(Command::new("sh")
        .args(["-c", EXPAT_CMAKE])
        .current_dir(&src));
    let lib_dir = src.join("build");
    let service = compile_service(
        &work,
        "xmlservice",
        &[&src.join("expat/lib"), &lib_dir],
        &lib_dir,
        "expat",
    );
    let mut t = Target::start(&service, Some(&lib_dir));
    // The bug: a negative length is accepted.
    assert_eq!(t.ask("negative"), "status 1 error 0");
    assert_eq!(t.ask("parse"), "status 1 elements 4");

    let target = lib_dir.join("libexpat.so.1.8.10");
    let v = build_and_apply(
        &work,
        &Fix {
            src: &src,
            diff: EXPAT_DIFF,
            target: &target,
            build_cmd: EXPAT_CMAKE,
            cve: Some("CVE-2024-45490"),
        },
        &t,
    );
    assert_eq!(
        v["summary"]["changed"],
        serde_json::json!(["XML_ParseBuffer (xmlparse.c)"])
    );
    // expat's accounting passes __LINE__: thirteen functions below the fix differ only in
    // that, and keep running as they are (among them the parser's hot loops).
    let kept = v["summary"]["line_numbers_only"].to_string();
    assert!(kept.contains("doContent (xmlparse.c)"), "{v}");
    assert!(kept.contains("doProlog (xmlparse.c)"), "{v}");
    assert_eq!(v["summary"]["pulled_in"], serde_json::json!([]), "{v}");
    // A one-function fix is well under 1% of the library.
    let lib_bytes = std::fs::metadata(&target).unwrap().len();
    let bundle_bytes = v["bundle_bytes"].as_u64().unwrap();
    assert!(
        bundle_bytes * 100 < lib_bytes,
        "{bundle_bytes} of {lib_bytes}"
    );
    // Fixed: XML_STATUS_ERROR with XML_ERROR_INVALID_ARGUMENT (41); parsing still works, and
    // the process is the one that served the first requests (a restart would count from 1).
    assert_eq!(t.ask("negative"), "status 0 error 41");
    assert_eq!(t.ask("parse"), "status 1 elements 4");
    assert_eq!(t.ask("served"), "5");
    assert!(t.alive());

    let (ok, r) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(ok, "{r}");
    assert_eq!(t.ask("negative"), "status 1 error 0");
}

/// The Debian 12 library every process on this machine maps, as its package installed it.
const SYSTEM_LIBZ: &str = "/usr/lib/x86_64-linux-gnu/libz.so.1.2.13";

/// debian/rules of zlib 1:1.2.13.dfsg-1 with Debian 12's `dpkg-buildflags` spelled out (so the
/// test needs no dpkg-dev): the same compiler driver name, flags and configure options the
/// package was built with.
fn debian_zlib_build(src: &Path) -> String {
    format!(
        "AR=ar CC=x86_64-linux-gnu-gcc CFLAGS='-g -O2 -ffile-prefix-map={}=. \
         -fstack-protector-strong -Wformat -Werror=format-security -Wdate-time \
         -D_FORTIFY_SOURCE=2 -Wall -D_REENTRANT -O3 -DUNALIGNED_OK' LDFLAGS='-Wl,-z,relro' \
         uname=GNU ./configure --shared --prefix=/usr --libdir=/usr/lib/x86_64-linux-gnu \
         >/dev/null && make libz.so.1.2.13",
        src.display()
    )
}

#[test]
fn the_distributions_own_stripped_libz_is_rebuilt_exactly_and_patched_live() {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "zlib1g"])
        .output()
        .expect("dpkg-query runs");
    assert_eq!(
        String::from_utf8_lossy(&installed.stdout),
        "1:1.2.13.dfsg-1",
        "this test rebuilds Debian 12's zlib1g; the machine has another version"
    );
    let work = Work::new();
    let src = fetch_zlib(work.dir.path());
    run(Command::new("tar")
        .args(["xJf", "../zlib_1.2.13.dfsg-1.debian.tar.xz"])
        .current_dir(&src));
    let series = std::fs::read_to_string(src.join("debian/patches/series")).unwrap();
    for patch in series.lines().filter(|l| !l.trim().is_empty()) {
        run(Command::new("patch")
            .args(["-p1", "-s", "-i"])
            .arg(src.join("debian/patches").join(patch))
            .current_dir(&src));
    }
    work.gcc(&["-O2", &Work::src("gzservice.c"), "-lz", "-o", "gzservice"]);
    let mut t = Target::start(&work.path("gzservice"), None);
    assert_eq!(t.ask("version"), "1.2.13");
    let marker = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/real/zlib-version-marker.diff"
    );
    let v = build_and_apply(
        &work,
        &Fix {
            src: &src,
            diff: marker,
            target: Path::new(SYSTEM_LIBZ),
            build_cmd: &debian_zlib_build(&src),
            cve: None,
        },
        &t,
    );
    assert_eq!(
        v["summary"]["changed"],
        serde_json::json!(["zlibVersion (zutil.c)"])
    );
    assert_eq!(t.ask("version"), "1.2.13-live");
    assert_eq!(t.ask("gzhead"), "ok", "the rest of the library still works");
    let (ok, r) = suture_json(&["revert", "--pid", &t.pid_arg()]);
    assert!(ok, "{r}");
    assert_eq!(t.ask("version"), "1.2.13");
}

#[test]
fn libyaml_built_with_autotools_and_libtool() {
    let work = Work::new();
    fetch_source(work.dir.path(), &["libyaml=0.2.5-1", "libyaml"]);
    run(Command::new("tar")
        .args(["xzf", "libyaml_0.2.5.orig.tar.gz"])
        .current_dir(work.dir.path()));
    let src = work.path("libyaml-0.2.5");
    // The deployment, built in the source folder: its libtool outputs (.lo/.la stamps, .libs/)
    // stay there, as they would on a build machine, and must not be taken for fresh ones.
    run(Command::new("sh")
        .args(["-c", "./bootstrap && ./configure && make"])
        .current_dir(&src));
    let libs = src.join("src/.libs");
    let service = compile_service(&work, "yamlservice", &[&src.join("include")], &libs, "yaml");
    let mut t = Target::start(&service, Some(&libs));
    assert_eq!(t.ask("version"), "0.2.5");
    assert_eq!(t.ask("parse"), "13");
    let marker = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/real/libyaml-version-marker.diff"
    );
    let v = build_and_apply(
        &work,
        &Fix {
            src: &src,
            diff: marker,
            target: &libs.join("libyaml-0.so.2.0.9"),
            build_cmd: "./configure >/dev/null && make",
            cve: None,
        },
        &t,
    );
    assert_eq!(
        v["summary"]["changed"],
        serde_json::json!(["yaml_get_version_string (api.c)"])
    );
    assert_eq!(t.ask("version"), "0.2.5-live");
    assert_eq!(t.ask("parse"), "13");
}
