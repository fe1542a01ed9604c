//! The trust store reads only what is safe to trust: small regular key files, in a directory
//! and files nobody but root (or us) can change. Every load runs against a deadline, so a
//! regression that blocks (a FIFO, /dev/zero) fails instead of hanging the test run.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use suture_bundle::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// Runs `f` on its own thread and fails the test if it has not returned by the deadline.
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(_) => panic!(
            "{what} did not return within {DEADLINE:?} (blocked) after {:?}",
            started.elapsed()
        ),
    }
}

fn load_dir(dir: &Path) -> Result<TrustStore, BundleError> {
    let d = dir.to_path_buf();
    within_deadline("TrustStore::load_dir", move || TrustStore::load_dir(&d))
}

fn load_file(p: &Path) -> Result<TrustStore, BundleError> {
    let p = p.to_path_buf();
    within_deadline("TrustStore::load_files", move || {
        TrustStore::load_files(&[p])
    })
}

/// The refusal's message, asserting it is a trust refusal naming `path` and containing `want`.
fn refused(r: Result<TrustStore, BundleError>, path: &Path, want: &str) -> String {
    let e = match r {
        Ok(s) => panic!(
            "accepted an unsafe trust store ({} key(s)); wanted a refusal naming {}",
            s.keys().len(),
            path.display()
        ),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(
        matches!(e, BundleError::Trust(_)),
        "wrong kind of error: {msg}"
    );
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name {}: {msg}",
        path.display()
    );
    assert!(msg.contains(want), "error does not say {want:?}: {msg}");
    assert!(!msg.contains('\n'), "error is not one line: {msg:?}");
    msg
}

/// A trust directory (mode 0755) holding one good key, `good.pub`.
struct Dir {
    dir: tempfile::TempDir,
    secret: SecretKey,
    public: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (k, p) = generate_keypair("good", dir.path()).unwrap();
        let secret = SecretKey::load(&k).unwrap();
        // Only public keys belong in a trust directory.
        std::fs::remove_file(&k).unwrap();
        Dir {
            dir,
            secret,
            public: p,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bundle(&self) -> Bundle {
        Bundle::sign(manifest(), object(), &self.secret).unwrap()
    }
}

fn object() -> Vec<u8> {
    let mut o = vec![0u8; 128];
    o[..4].copy_from_slice(b"\x7fELF");
    o[4] = 2;
    o[5] = 1;
    o[16] = 1;
    o[18] = 62;
    o
}

fn manifest() -> Manifest {
    Manifest {
        format: FORMAT_VERSION,
        id: "svc-L1-fix".into(),
        level: 1,
        module: ModuleRef {
            build_id: "4bfdbb6ee68454cb5f563abf8bf0ff3f1062812c".into(),
            name: "svc".into(),
        },
        cves: vec![],
        description: "fix".into(),
        functions: vec![FunctionPatch {
            symbol: "parse_header".into(),
            address: 0x1530,
            size: 64,
            expected_sha256: "61".repeat(32),
            replacement: "parse_header".into(),
        }],
        bindings: vec![],
        accepted: Vec::new(),
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_safe_directory_loads_and_verifies() {
    let d = Dir::new();
    let store = load_dir(d.dir.path()).unwrap();
    assert_eq!(store.keys().len(), 1);
    assert_eq!(d.bundle().verify(&store).unwrap().name(), "good");
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let d = Dir::new();
    let fifo = d.path("fifo.pub");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    chmod(&fifo, 0o644);
    refused(load_dir(d.dir.path()), &fifo, "FIFO");
    refused(load_file(&fifo), &fifo, "FIFO");
}

#[test]
fn a_fifo_given_as_the_secret_key_is_refused_without_blocking() {
    let d = Dir::new();
    let fifo = d.path("fifo.key");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    chmod(&fifo, 0o600);
    let f = fifo.clone();
    let r = within_deadline("SecretKey::load", move || SecretKey::load(&f).map(|_| ()));
    let msg = r.expect_err("a FIFO is not a key").to_string();
    assert!(msg.contains("FIFO"), "{msg}");
}

#[test]
fn a_dev_zero_symlink_is_refused_without_reading_it() {
    let d = Dir::new();
    let link = d.path("zero.pub");
    symlink("/dev/zero", &link).unwrap();
    // In the trust directory, no link is followed at all.
    refused(load_dir(d.dir.path()), &link, "symbolic link");
    // Named explicitly, the link is followed but the opened file is checked: a device.
    refused(load_file(&link), &link, "device");
    refused(
        load_file(Path::new("/dev/zero")),
        Path::new("/dev/zero"),
        "device",
    );
}

#[test]
fn a_300_mb_file_is_refused_by_its_size() {
    let d = Dir::new();
    let big = d.path("big.pub");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(300 << 20).unwrap(); // sparse: no disk used
    drop(f);
    chmod(&big, 0o644);
    let started = Instant::now();
    refused(load_dir(d.dir.path()), &big, "314572800 bytes");
    refused(load_file(&big), &big, "314572800 bytes");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}: the file was read",
        started.elapsed()
    );
}

#[test]
fn a_world_writable_directory_is_refused() {
    let d = Dir::new();
    chmod(d.dir.path(), 0o777);
    refused(load_dir(d.dir.path()), d.dir.path(), "mode 0777");
    chmod(d.dir.path(), 0o775);
    refused(load_dir(d.dir.path()), d.dir.path(), "mode 0775");
    chmod(d.dir.path(), 0o755);
    assert_eq!(load_dir(d.dir.path()).unwrap().keys().len(), 1);
}

#[test]
fn a_world_writable_key_is_refused() {
    let d = Dir::new();
    chmod(&d.public, 0o666);
    refused(load_dir(d.dir.path()), &d.public, "mode 0666");
    refused(load_file(&d.public), &d.public, "mode 0666");
    let e = PublicKey::load(&d.public).unwrap_err();
    assert!(matches!(e, BundleError::Trust(_)), "{e}");
}

#[test]
fn a_key_or_directory_owned_by_another_user_is_refused() {
    if !is_root() {
        eprintln!("skipped: chown to another user needs root");
        return;
    }
    let d = Dir::new();
    std::os::unix::fs::chown(&d.public, Some(65534), Some(65534)).unwrap();
    refused(load_dir(d.dir.path()), &d.public, "uid 65534");
    refused(load_file(&d.public), &d.public, "uid 65534");
    std::os::unix::fs::chown(&d.public, Some(0), Some(0)).unwrap();
    std::os::unix::fs::chown(d.dir.path(), Some(65534), Some(65534)).unwrap();
    refused(load_dir(d.dir.path()), d.dir.path(), "uid 65534");
}

#[test]
fn a_file_that_is_not_a_key_is_skipped_and_the_good_key_still_verifies() {
    let d = Dir::new();
    std::fs::write(d.path("aaa-junk.pub"), "hello, I am not a key\n").unwrap();
    std::fs::write(
        d.path("binary.pub"),
        [0xffu8, 0xfe, 0x00, 0x1b, b'[', b'2', b'J'],
    )
    .unwrap();
    std::fs::write(
        d.path("wrong-tag.pub"),
        format!("suture-secret-key ed25519 {} x\n", "00".repeat(32)),
    )
    .unwrap();
    for n in ["aaa-junk.pub", "binary.pub", "wrong-tag.pub"] {
        chmod(&d.path(n), 0o644);
    }
    let store = load_dir(d.dir.path()).unwrap();
    assert_eq!(store.keys().len(), 1, "only the good key is trusted");
    assert_eq!(d.bundle().verify(&store).unwrap().name(), "good");
    // Given explicitly, a file that is not a key is an error (the user asked for it).
    let e = load_file(&d.path("aaa-junk.pub")).unwrap_err();
    assert!(e.to_string().contains("aaa-junk.pub"), "{e}");
}
