//! `suture demo`: the whole job on a real process, with nothing to set up but gcc.
//!
//! Compiles the bundled multi-threaded service (a real authentication-bypass bug), starts it,
//! shows the bug, builds and signs a patch from the bundled fix, applies it live, shows the fix
//! with the same pid and the same counters, reverts it, and cleans up.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use suture_build::{handmade_manifest, Handmade, Replace};
use suture_bundle::{Bundle, SecretKey, TrustStore};
use suture_engine::ApplyOptions;

const SERVICE_C: &str = include_str!("../demo/service.c");
const FIX_C: &str = include_str!("../demo/fix.c");

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(keep: bool) -> Result<i32> {
    let dir = tempdir()?;
    let result = run_in(&dir);
    if keep {
        println!("work directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result.map(|_| 0)
}

fn tempdir() -> Result<std::path::PathBuf> {
    let base = std::env::temp_dir().join(format!("suture-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    Ok(base)
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn run_in(dir: &Path) -> Result<()> {
    step("1. Build the service (gcc) and the fix");
    std::fs::write(dir.join("service.c"), SERVICE_C)?;
    std::fs::write(dir.join("fix.c"), FIX_C)?;
    gcc(
        dir,
        &["-O2", "-g", "-pthread", "service.c", "-o", "service"],
    )?;
    gcc(
        dir,
        &[
            "-O2",
            "-c",
            "-ffunction-sections",
            "-fdata-sections",
            "fix.c",
            "-o",
            "fix.o",
        ],
    )?;
    println!("   gcc -O2 -pthread service.c -o service; gcc -O2 -c -ffunction-sections fix.c");

    step("2. Start it: 4 busy threads plus a thread per client");
    let sock = dir.join("service.sock");
    let service = Service(
        Command::new(dir.join("service"))
            .arg(&sock)
            .spawn()
            .context("cannot start the demo service")?,
    );
    let pid = service.0.id() as i32;
    wait_for(&sock)?;
    println!("   pid {pid}, socket {}", sock.display());
    for _ in 0..3 {
        ask(&sock, "LOGIN alice")?;
    }
    show(&sock, "STATS")?;

    step("3. The bug: a prefix of an admin's name is treated as the admin");
    show(&sock, "LOGIN admin")?;
    show(&sock, "LOGIN ad")?;
    show(&sock, "LOGIN alice")?;

    step("4. Make a signed patch (suture keygen + suture bundle)");
    let (key, public) = suture_bundle::generate_keypair("demo", dir)?;
    let target = std::fs::read(dir.join("service"))?;
    let object = std::fs::read(dir.join("fix.o"))?;
    let manifest = handmade_manifest(&Handmade {
        target: &target,
        target_name: "service".into(),
        object: &object,
        replaces: vec![Replace {
            function: "is_admin".into(),
            replacement: "is_admin".into(),
        }],
        id: Some("demo-auth-fix".into()),
        level: 1,
        cves: vec!["CVE-2012-2122".into()],
        description: "is_admin: compare whole names, not a prefix".into(),
    })?;
    let bundle = Bundle::sign(manifest, object, &SecretKey::load(&key)?)?;
    let path = dir.join("auth-fix.suture");
    bundle.write_file(&path)?;
    println!(
        "   {} ({} bytes, sha256 {})",
        path.display(),
        bundle.to_bytes().len(),
        &bundle.content_address()[..16]
    );

    step("5. Apply it live (suture apply --pid)");
    let trusted = TrustStore::load_files(&[public])?;
    let bundle = Bundle::read_file(&path)?;
    bundle.verify(&trusted)?;
    let report = suture_engine::apply(pid, &bundle, &ApplyOptions::default())?;
    println!(
        "   applied {} to pid {}: all {} thread(s) stopped together for {} µs (a thread stopped {} µs in all)",
        report.patch, report.pid, report.threads, report.all_stopped_us, report.stopped_us
    );

    step("6. Same process, fixed behaviour, state preserved");
    show(&sock, "LOGIN ad")?;
    show(&sock, "LOGIN admin")?;
    show(&sock, "STATS")?;
    for p in suture_engine::status(pid)? {
        println!(
            "   status: pid {pid} carries {} level {} fixing {}",
            p.id,
            p.level,
            p.cves.join(",")
        );
    }
    if ask(&sock, "LOGIN ad")? != "granted user" {
        bail!("the patch did not take effect");
    }

    step("7. Revert it (suture revert --pid)");
    let r = suture_engine::revert(pid, None, &ApplyOptions::default())?;
    println!("   reverted {} in {} µs", r.patch, r.stopped_us);
    show(&sock, "LOGIN ad")?;
    show(&sock, "STATS")?;

    step("8. Clean up");
    drop(service);
    println!("   service stopped; done.");
    Ok(())
}

fn gcc(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("gcc")
        .current_dir(dir)
        .args(args)
        .output()
        .context("cannot run gcc (install it: apt-get install gcc)")?;
    if !out.status.success() {
        bail!("gcc failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn wait_for(sock: &Path) -> Result<()> {
    let start = Instant::now();
    while UnixStream::connect(sock).is_err() {
        if start.elapsed() > Duration::from_secs(5) {
            bail!("the demo service did not start");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn ask(sock: &Path, line: &str) -> Result<String> {
    let mut s = UnixStream::connect(sock).context("cannot reach the demo service")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

fn show(sock: &Path, line: &str) -> Result<()> {
    println!("   {line:<12} -> {}", ask(sock, line)?);
    Ok(())
}
