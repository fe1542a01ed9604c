//! The engine's per-file caches forget what nobody asks for (a long-running agent must not
//! keep every file it ever read). Its own test binary: the caches are global to a process.

use std::process::Command;

use suture_engine::modules;

#[test]
fn files_nobody_asks_for_leave_the_cache_and_used_ones_stay() {
    let sleep = std::path::Path::new("/bin/sleep");
    let id = suture_module::read_build_id(&std::fs::read(sleep).unwrap())
        .unwrap()
        .expect("sleep has a build-id");
    let mut child = Command::new(sleep).arg("30").spawn().unwrap();
    let pid = child.id() as i32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !suture_engine::processes_mapping(&id)
        .unwrap()
        .contains(&pid)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "sleep never showed up"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (identities, _) = modules::cached_files();
    assert!(identities > 0, "the scan cached what it read");
    // Asked for in this generation: kept while it keeps being asked for.
    for _ in 0..4 {
        modules::evict_unused_files(2);
        suture_engine::processes_mapping(&id).unwrap();
    }
    assert!(modules::cached_files().0 > 0, "files in use were forgotten");
    // Nobody asks any more: gone after `keep` generations.
    let _ = child.kill();
    let _ = child.wait();
    for _ in 0..3 {
        modules::evict_unused_files(2);
    }
    assert_eq!(modules::cached_files(), (0, 0), "unused files stay cached");
}
