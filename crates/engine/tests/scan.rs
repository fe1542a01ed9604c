//! Scanning the host for the processes that map a module (`apply --all`): real processes built
//! by gcc, real files.
//!
//! - a big unrelated binary mapped by another process is not read (only its headers are);
//! - a process that replaces its mapped file's name with a FIFO or another file neither hangs
//!   the scan nor gets that file taken for the module.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::os::unix::fs::MetadataExt;

/// A folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("suture-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running child, killed on drop.
struct Running(std::process::Child);

impl Running {
    /// Starts `exe` and waits for its first line ("ready").
    fn start(exe: &Path) -> Running {
        let mut child = Command::new(exe)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("ready"), "{exe:?} said {line:?}");
        Running(child)
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gcc(dir: &Path, args: &[&str]) {
    let st = Command::new("gcc")
        .current_dir(dir)
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "gcc {args:?}");
}

fn build_id(path: &Path) -> Vec<u8> {
    suture_module::read_build_id(&std::fs::read(path).unwrap())
        .unwrap()
        .unwrap()
}

/// Bytes this thread has read through read/pread so far (`rchar`).
fn bytes_read_by_this_thread() -> u64 {
    std::fs::read_to_string("/proc/thread-self/io")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

const SERVICE: &str = r#"
#include <stdio.h>
#include <unistd.h>
extern int lib_fn(void);
int main(void) { printf("ready %d\n", lib_fn()); fflush(stdout); for (;;) pause(); }
"#;
const LIB: &str = "int lib_fn(void) { return 42; }";

/// The service (`svc`) and the library it maps (`libt.so`), in `dir`.
fn build_service(dir: &Path) {
    std::fs::write(dir.join("svc.c"), SERVICE).unwrap();
    std::fs::write(dir.join("lib.c"), LIB).unwrap();
    gcc(dir, &["-O2", "-shared", "-fPIC", "lib.c", "-o", "libt.so"]);
    gcc(
        dir,
        &[
            "-O2",
            "svc.c",
            "-o",
            "svc",
            "-L.",
            "-lt",
            "-Wl,-rpath,$ORIGIN",
        ],
    );
}

#[test]
fn an_unrelated_big_binary_is_not_read_by_a_scan() {
    let dir = TempDir::new("scan-big");
    let d = &dir.0;
    build_service(d);
    // A valid ELF (with a build-id) of more than 200 MB: a big initialised array.
    std::fs::write(
        d.join("big.c"),
        r#"
#include <stdio.h>
#include <unistd.h>
char big[210 << 20] = { 1 };
int main(void) { printf("ready %d\n", big[12345]); fflush(stdout); for (;;) pause(); }
"#,
    )
    .unwrap();
    gcc(d, &["-O2", "big.c", "-o", "big"]);
    let big_meta = std::fs::metadata(d.join("big")).unwrap();
    assert!(big_meta.len() > 200 << 20);
    let big = Running::start(&d.join("big"));
    let svc = Running::start(&d.join("svc"));
    let lib_id = build_id(&d.join("libt.so"));

    let before = bytes_read_by_this_thread();
    let t = Instant::now();
    let pids = suture_engine::processes_mapping(&lib_id).unwrap();
    let took = t.elapsed();
    let read = bytes_read_by_this_thread() - before;

    assert!(pids.contains(&svc.pid()), "{pids:?}");
    assert!(!pids.contains(&big.pid()), "{pids:?}");
    // Every process on the host was scanned, by the headers of the files they map: a few
    // MB at most, where reading the big file alone is 210 MB.
    assert!(read < 32 << 20, "the scan read {read} bytes");
    assert!(
        !suture_engine::modules::fully_read(big_meta.dev(), big_meta.ino()),
        "the big binary was read whole"
    );
    assert!(took < Duration::from_secs(1), "the scan took {took:?}");
    eprintln!("scan of the host: {took:?}, {read} bytes read");

    // Finding the module in the service to patch it reads that module whole, and only it.
    let maps = suture_engine::procfs::read_maps(svc.pid()).unwrap();
    let module = suture_engine::modules::find_by_build_id(svc.pid(), &maps, &lib_id).unwrap();
    assert!(module.path.ends_with("/libt.so"));
    assert!(module.facts.function("lib_fn").is_some());
    assert!(!suture_engine::modules::fully_read(
        big_meta.dev(),
        big_meta.ino()
    ));
    // (The check above can fail: walking the big process's stacks reads its binary whole.)
    let maps = suture_engine::procfs::read_maps(big.pid()).unwrap();
    let all = suture_engine::modules::loaded_modules(big.pid(), &maps);
    assert!(all.iter().any(|m| m.path.ends_with("/big")));
    assert!(suture_engine::modules::fully_read(
        big_meta.dev(),
        big_meta.ino()
    ));
}

/// Runs `scan` in a thread without CAP_SYS_ADMIN and CAP_CHECKPOINT_RESTORE, so that
/// `/proc/PID/map_files` is closed to it (as for a tool run without those) and files are reached
/// by the name the process's maps give; fails if it does not finish within 10 s.
fn without_map_files<T: Send + 'static>(scan: impl FnOnce() -> T + Send + 'static) -> T {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_CHECKPOINT_RESTORE: u32 = 40;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset read and write the header and two data words we own; they
        // change the capabilities of this thread only.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            for cap in [CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE] {
                data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
            }
            assert_eq!(
                libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
                0
            );
        }
        let _ = tx.send(scan());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the scan did not finish in 10 s (blocked on a FIFO?)")
}

#[test]
fn a_mapped_file_replaced_by_a_fifo_or_another_file_is_not_taken_for_the_module() {
    let dir = TempDir::new("scan-swap");
    let d = &dir.0;
    build_service(d);
    let lib = d.join("libt.so");
    let lib_id = build_id(&lib);
    let svc = Running::start(&d.join("svc"));

    // Unchanged: found both ways.
    let id = lib_id.clone();
    assert!(suture_engine::processes_mapping(&id)
        .unwrap()
        .contains(&svc.pid()));
    let found = without_map_files(move || suture_engine::processes_mapping(&id).unwrap());
    assert!(found.contains(&svc.pid()), "by name: {found:?}");

    // The library's name now leads to FIFOs (its maps line reads "…/libt.so (deleted)"):
    // opening one for reading would wait for a writer forever.
    std::fs::remove_file(&lib).unwrap();
    for name in ["libt.so", "libt.so (deleted)"] {
        let fifo =
            std::ffi::CString::new(d.join(name).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    }
    let id = lib_id.clone();
    let t = Instant::now();
    let found = without_map_files(move || suture_engine::processes_mapping(&id).unwrap());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!found.contains(&svc.pid()), "a FIFO taken for the module");
    // Through map_files the kernel gives the file really mapped: it is still the module.
    assert!(suture_engine::processes_mapping(&lib_id)
        .unwrap()
        .contains(&svc.pid()));

    // Another regular file in its place, even one with the same build-id (a copy), is not the
    // mapped file: its inode differs.
    std::fs::remove_file(d.join("libt.so (deleted)")).unwrap();
    gcc(
        d,
        &[
            "-O2",
            "-shared",
            "-fPIC",
            "lib.c",
            "-o",
            "libt.so (deleted)",
        ],
    );
    assert_eq!(build_id(&d.join("libt.so (deleted)")), lib_id);
    let id = lib_id.clone();
    let found = without_map_files(move || suture_engine::processes_mapping(&id).unwrap());
    assert!(
        !found.contains(&svc.pid()),
        "a swapped file taken for the module"
    );
}

/// A loop-mounted filesystem image, unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// btrfs gives each subvolume its own device number in `stat`, while `/proc/PID/maps` prints
/// the filesystem's: a module in a subvolume (Fedora's default layout) must still be found.
#[test]
fn a_module_in_a_btrfs_subvolume_is_found() {
    if Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: mkfs.btrfs is not installed (apt-get install btrfs-progs)");
        return;
    }
    let dir = TempDir::new("scan-btrfs");
    let img = dir.0.join("img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let run = |cmd: &str, args: &[&str]| {
        let st = Command::new(cmd)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{cmd} {args:?}");
    };
    run("mkfs.btrfs", &["-q", img.to_str().unwrap()]);
    let mnt = dir.0.join("m");
    std::fs::create_dir(&mnt).unwrap();
    run(
        "mount",
        &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
    );
    let mounted = Mounted(mnt.clone());
    let sub = mnt.join("sub");
    run("btrfs", &["subvolume", "create", sub.to_str().unwrap()]);
    build_service(&sub);
    let lib_id = build_id(&sub.join("libt.so"));
    let svc = Running::start(&sub.join("svc"));

    // The disagreement this test is about.
    let maps = suture_engine::procfs::read_maps(svc.pid()).unwrap();
    let line = maps.iter().find(|m| m.path.ends_with("/libt.so")).unwrap();
    let meta = std::fs::metadata(sub.join("libt.so")).unwrap();
    let stat_dev = format!(
        "{:02x}:{:02x}",
        libc::major(meta.dev()),
        libc::minor(meta.dev())
    );
    assert_ne!(line.dev, stat_dev);
    assert_eq!(line.inode, meta.ino());

    assert!(suture_engine::processes_mapping(&lib_id)
        .unwrap()
        .contains(&svc.pid()));
    let module = suture_engine::modules::find_by_build_id(svc.pid(), &maps, &lib_id).unwrap();
    assert!(module.facts.function("lib_fn").is_some());
    // By name (no map_files), the device cannot be checked: skipped rather than trusted.
    let id = lib_id.clone();
    let found = without_map_files(move || suture_engine::processes_mapping(&id).unwrap());
    assert!(!found.contains(&svc.pid()));
    drop(svc);
    drop(mounted);
}
