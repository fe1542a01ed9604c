//! What `/proc/PID` tells about a process: its mappings, threads, status and memory.
//!
//! Files of other processes are always read through the process's own view
//! (`/proc/PID/map_files`, `/proc/PID/root`), so a target inside a container (another mount
//! namespace) is read correctly.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    pub offset: u64,
    /// `major:minor` of the backing file's device, as printed by the kernel.
    pub dev: String,
    pub inode: u64,
    /// Path or pseudo-name (`[stack]`, `/memfd:… (deleted)`), empty for anonymous memory.
    pub path: String,
}

impl Mapping {
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// `/proc/PID/map_files/START-END`: the mapped file as the process sees it.
    pub fn map_file(&self, pid: i32) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ))
    }
}

pub fn parse_maps(text: &str) -> Result<Vec<Mapping>> {
    text.lines().map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Result<Mapping> {
    let bad = || format!("unexpected line in /proc/PID/maps: {line:?}");
    let mut fields = line.splitn(6, ' ');
    let range = fields.next().with_context(bad)?;
    let perms = fields.next().with_context(bad)?.as_bytes();
    let offset = fields.next().with_context(bad)?;
    let dev = fields.next().with_context(bad)?;
    let inode = fields.next().with_context(bad)?;
    let path = fields.next().unwrap_or("").trim_start();
    let (start, end) = range.split_once('-').with_context(bad)?;
    if perms.len() < 4 {
        bail!(bad());
    }
    Ok(Mapping {
        start: u64::from_str_radix(start, 16).with_context(bad)?,
        end: u64::from_str_radix(end, 16).with_context(bad)?,
        readable: perms[0] == b'r',
        writable: perms[1] == b'w',
        executable: perms[2] == b'x',
        offset: u64::from_str_radix(offset, 16).with_context(bad)?,
        dev: dev.to_string(),
        inode: inode.parse().with_context(bad)?,
        path: path.to_string(),
    })
}

pub fn read_maps(pid: i32) -> Result<Vec<Mapping>> {
    let read = |dir: i32| read_text(&format!("/proc/{dir}/maps"));
    let cannot = |dir: i32| format!("process {pid}: cannot read /proc/{dir}/maps");
    for _ in 0..3 {
        let text = read(pid).with_context(|| cannot(pid))?;
        // A live process always maps something: none means its main thread has exited.
        if !text.is_empty() {
            return parse_maps(&text);
        }
        let Some(dir) = memory_dir(pid).filter(|&d| d != pid) else {
            return parse_maps(&text);
        };
        match read(dir) {
            Ok(text) => return parse_maps(&text),
            // That thread is gone: it may have exec'd and taken the process's pid (the old
            // main thread is a zombie for that instant). Look again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {}
            Err(e) => return Err(e).with_context(|| cannot(dir)),
        }
    }
    Err(if exited(pid) {
        anyhow::Error::new(crate::stop::ProcessGone { pid })
    } else {
        anyhow::Error::new(crate::stop::ProcessExeced { pid })
    })
}

/// The `/proc` directory through which process `pid`'s memory is reached: its own, or, once
/// its main thread has exited (`pthread_exit` in `main`) while others run on, that of a live
/// thread (`/proc/TID` serves any thread): a zombie main thread has no memory, no maps, no
/// `map_files`, no `exe`. `None` when no thread of it lives.
pub fn memory_dir(pid: i32) -> Option<i32> {
    memory_dir_of(pid, &stat(pid)?)
}

/// [`memory_dir`] from a [`Stat`] already read.
pub fn memory_dir_of(pid: i32, stat: &Stat) -> Option<i32> {
    if stat.state != 'Z' && stat.state != 'X' {
        return Some(pid);
    }
    threads(pid).ok()?.into_iter().find(|&tid| {
        tid != pid && crate::stop::thread_state(pid, tid).is_some_and(|s| s != 'Z' && s != 'X')
    })
}

/// Whether process `pid` has ended: gone, or every thread of it exited.
pub fn exited(pid: i32) -> bool {
    memory_dir(pid).is_none()
}

/// The thread ids of a process, from `/proc/PID/task`.
pub fn threads(pid: i32) -> Result<Vec<i32>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("process {pid}: cannot list threads (has it exited?)"))?;
    let mut tids = Vec::new();
    for entry in dir {
        let entry = entry?;
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// A `/proc` text file, whole. `std::fs::read_to_string` asks the file its size first (a
/// `statx` and an `lseek`, useless on `/proc`) and then reads into a buffer that starts small
/// and doubles: ten `read` calls for a small process's maps, each making the kernel walk its
/// mappings again. Here one call reads any file of ordinary size, and one more sees its end.
pub fn read_text(path: &str) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 16 << 10];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Tasks runnable on the host right now, the caller included (`/proc/loadavg`'s fourth field).
pub fn runnable_tasks() -> Option<u32> {
    let text = read_text("/proc/loadavg").ok()?;
    text.split_whitespace()
        .nth(3)?
        .split_once('/')?
        .0
        .parse()
        .ok()
}

pub fn exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Fields of `/proc/PID/stat` after the command name (which may hold spaces and parentheses):
/// index 0 is the state.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    use std::io::Read;
    // One read: the kernel writes the whole line per read call, summing every thread's times
    // (tens of microseconds), and a growing buffer would make it do so several times.
    let mut buf = [0u8; 2048];
    let n = File::open(format!("/proc/{pid}/stat"))
        .and_then(|mut f| f.read(&mut buf))
        .ok()?;
    let stat = std::str::from_utf8(&buf[..n]).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// What `/proc/PID/stat` says of a process (its main thread), read once for an operation.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    /// The scheduler state letter (`R`, `S`, `D`, `Z`, `T`, …).
    pub state: char,
    pub ppid: i32,
    pub threads: u64,
    /// Clock ticks since boot: with the pid, it names one process.
    pub start_time: u64,
}

pub fn stat(pid: i32) -> Option<Stat> {
    let f = stat_fields(pid)?;
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        threads: f.get(17)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

/// The process's start time (clock ticks since boot): with the pid, it names one process.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|s| s.start_time)
}

/// Another process that shares a process's address space (not one of its threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharer {
    /// The process is a `vfork` (or `CLONE_VM`) child of this one and has not exec'd yet.
    Parent(i32),
    /// This process is such a child of one of the process's threads.
    Child(i32),
}

impl Sharer {
    /// What it is, said of process `pid`.
    pub fn describe(&self, pid: i32) -> String {
        match *self {
            Sharer::Parent(p) => {
                format!("process {pid} is a vfork child of process {p} that has not exec'd yet")
            }
            Sharer::Child(c) => format!(
                "process {pid} has a vfork (or CLONE_VM) child, {c}, that has not exec'd yet"
            ),
        }
    }
}

/// Whether processes `a` and `b` run in one address space (`kcmp(KCMP_VM)`); `None` where the
/// kernel will not say (no `kcmp`, no permission, one is gone).
fn same_memory(a: i32, b: i32) -> Option<bool> {
    const KCMP_VM: libc::c_long = 1;
    // SAFETY: kcmp compares two processes' kernel objects; it reads and writes no memory of
    // ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, a, b, KCMP_VM, 0, 0) };
    (r >= 0).then_some(r == 0)
}

/// A process that shares `pid`'s memory: its parent while `pid` is a `vfork` child that has
/// not exec'd, or a child of one of its threads made so (`posix_spawn` makes one for an
/// instant). Writing through `pid` would change what that other process runs, and no stop of
/// `pid`'s threads covers its threads. `None` also where the kernel cannot tell (no `kcmp` or
/// `/proc/PID/task/TID/children`). `stat` is the process's, read once for the operation.
pub fn memory_sharer_of(pid: i32, stat: &Stat) -> Option<Sharer> {
    let ppid = stat.ppid;
    if ppid > 1 && same_memory(pid, ppid) == Some(true) {
        return Some(Sharer::Parent(ppid));
    }
    // (One thread: no need to list them.)
    let tids = if stat.threads == 1 {
        vec![pid]
    } else {
        threads(pid).ok()?
    };
    for tid in tids {
        let Ok(children) = read_text(&format!("/proc/{pid}/task/{tid}/children")) else {
            continue;
        };
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            if same_memory(pid, child) == Some(true) {
                return Some(Sharer::Child(child));
            }
        }
    }
    None
}

/// Whether the process is frozen by its cgroup's freezer (`docker pause`, `systemctl freeze`,
/// a v1 `freezer.state` or a v2 `cgroup.freeze`): none of its threads runs, so none can
/// reach a stop until it is thawed. Unknown (no cgroup file to read) counts as not frozen.
pub fn frozen(pid: i32) -> bool {
    let Ok(groups) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    // (mount point, whether it is the v2 hierarchy) of each hierarchy that can freeze.
    let roots: Vec<(&str, bool)> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match (f.get(2), f.get(3)) {
                (Some(&"cgroup2"), _) => Some((f[1], true)),
                (Some(&"cgroup"), Some(opts)) if opts.split(',').any(|o| o == "freezer") => {
                    Some((f[1], false))
                }
                _ => None,
            }
        })
        .collect();
    groups.lines().any(|line| {
        // hierarchy-id:controllers:path
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            return false;
        };
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "freezer") {
            return false;
        }
        roots.iter().filter(|r| r.1 == v2).any(|(root, _)| {
            let (file, frozen) = if v2 {
                ("cgroup.events", "frozen 1")
            } else {
                ("freezer.state", "FROZEN")
            };
            std::fs::read_to_string(format!("{root}{path}/{file}")).is_ok_and(|t| {
                t.lines()
                    .any(|l| l.trim() == frozen || l.trim() == "FREEZING")
            })
        })
    })
}

/// Whether the process (its main thread) is a zombie.
pub fn is_zombie(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state == 'Z')
}

/// Field `name` of `/proc/PID/status` (e.g. `Seccomp`, `TracerPid`, `State`).
pub fn status_field(pid: i32, name: &str) -> Result<Option<String>> {
    let text = read_text(&format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid}: cannot read /proc/{pid}/status"))?;
    Ok(text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == name).then(|| v.trim().to_string())
    }))
}

/// Whether `pid` is a kernel thread (`PF_KTHREAD` in the flags of `/proc/PID/stat`).
pub fn is_kernel_thread(pid: i32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    stat_fields(pid)
        .and_then(|f| f.get(6)?.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

pub fn command_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Every numeric entry of `/proc`.
pub fn all_pids() -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let entry = entry?;
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// `/proc/PID/mem`, opened once: reads and writes any mapping of the target, including
/// read-only code (the kernel breaks copy-on-write for us), without the target's page
/// protections ever changing.
pub struct Memory {
    pid: i32,
    file: File,
}

impl Memory {
    pub fn open(pid: i32) -> Result<Memory> {
        Memory::open_at(pid, memory_dir(pid).unwrap_or(pid))
    }

    /// Through `/proc/{dir}` ([`memory_dir`] already found).
    pub fn open_at(pid: i32, dir: i32) -> Result<Memory> {
        let open = |dir: i32| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{dir}/mem"))
        };
        let vanished =
            |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT));
        let file = match open(dir).or_else(|e| match memory_dir(pid) {
            // The live thread we went through has exited since: through another one.
            Some(other) if vanished(&e) && other != dir => open(other),
            _ => Err(e),
        }) {
            Ok(f) => f,
            // No memory to open while the process lives: it is between the two programs of
            // an exec (the old main thread a zombie for an instant, the exec'ing thread taking
            // its pid), or dying, which the caller finds out.
            Err(e) if vanished(&e) && !exited(pid) => {
                return Err(anyhow::Error::new(crate::stop::ProcessExeced { pid }))
            }
            Err(e) if vanished(&e) => {
                return Err(anyhow::Error::new(crate::stop::ProcessGone { pid }))
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("process {pid}: cannot open its memory (are you root?)")
                })
            }
        };
        Ok(Memory { pid, file })
    }

    /// The process this is the memory of.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(addr, &mut buf)?;
        Ok(buf)
    }

    pub fn read_into(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, addr).with_context(|| {
            format!(
                "process {}: cannot read {} bytes at {addr:#x}",
                self.pid,
                buf.len()
            )
        })
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_into(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, addr).with_context(|| {
            format!(
                "process {}: cannot write {} bytes at {addr:#x}",
                self.pid,
                bytes.len()
            )
        })
    }
}

/// Reads at most `limit` bytes of a file (bounded: the file belongs to someone else).
pub fn read_bounded(path: &std::path::Path, limit: u64) -> Result<Vec<u8>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut data = Vec::new();
    file.take(limit)
        .read_to_end(&mut data)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234  /usr/bin/x y\n\
                    7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]\n\
                    7f0000000000-7f0000001000 r-xp 00000000 00:00 0 \n";
        let maps = parse_maps(text).expect("valid maps");
        assert_eq!(maps.len(), 3);
        assert_eq!(maps[0].path, "/usr/bin/x y");
        assert!(maps[0].is_file());
        assert_eq!(maps[1].path, "[stack]");
        assert!(maps[2].executable && maps[2].path.is_empty());
        assert!(parse_maps("garbage").is_err());
    }
}
