//! The per-process operation lock: one operation at a time, even while lock files come and go,
//! and no file left behind per process (a host starts processes all day; `/run` is RAM).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use suture_engine::lock;

/// The lock files of process `pid`.
fn lock_files(pid: i32) -> Vec<String> {
    std::fs::read_dir(lock::lock_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&format!("{pid}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// A process to lock (nothing else touches it).
fn sleeper() -> std::process::Child {
    std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap()
}

#[test]
fn one_holder_at_a_time_and_no_file_left_behind() {
    let mut child = sleeper();
    let pid = child.id() as i32;
    // Eight threads take and release the same process's lock over and over: never two inside
    // at once, although every release unlinks the file the others are waiting on.
    let inside = AtomicUsize::new(0);
    let overlaps = AtomicUsize::new(0);
    let taken = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..200 {
                    let l = lock::lock_process(pid, Duration::from_secs(10))
                        .unwrap()
                        .expect("lock within 10 s");
                    if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::yield_now();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    taken.fetch_add(1, Ordering::SeqCst);
                    drop(l);
                }
            });
        }
    });
    assert_eq!(taken.load(Ordering::SeqCst), 1600);
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    assert_eq!(lock_files(pid).len(), 0, "released locks leave no file");

    // A holder that dies (its file stays) is swept once its process is gone, not before.
    let l = lock::lock_process(pid, Duration::from_secs(1))
        .unwrap()
        .unwrap();
    std::mem::forget(l); // as if killed while holding it: file and descriptor stay
    lock::sweep_stale();
    assert_eq!(
        lock_files(pid).len(),
        1,
        "a held lock of a live process stays"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    lock::sweep_stale();
    assert_eq!(
        lock_files(pid).len(),
        1,
        "a lock still held (by us) is never swept"
    );
}

#[test]
fn the_lock_of_a_process_that_is_gone_is_swept() {
    let mut child = sleeper();
    let pid = child.id() as i32;
    // Left by a holder that was killed: a file whose lock nobody holds.
    let l = lock::lock_process(pid, Duration::from_secs(1))
        .unwrap()
        .unwrap();
    let held = lock_files(pid);
    assert_eq!(held.len(), 1);
    std::mem::forget(l);
    // Copy the file under its name with no lock on it: what a SIGKILL'ed holder leaves.
    let dir = lock::lock_dir();
    std::fs::remove_file(dir.join(&held[0])).unwrap();
    std::fs::write(dir.join(&held[0]), b"").unwrap();
    lock::sweep_stale();
    assert_eq!(lock_files(pid).len(), 1, "the process lives: kept");
    child.kill().unwrap();
    child.wait().unwrap();
    lock::sweep_stale();
    assert_eq!(lock_files(pid).len(), 0, "the process is gone: swept");
}
