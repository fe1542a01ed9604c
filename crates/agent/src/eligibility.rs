//! `suture eligibility`: can this host be live-patched, and which of its processes.

use std::path::Path;

use serde::Serialize;
use suture_bundle::Bundle;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessCheck {
    pub pid: i32,
    pub command: String,
    pub bundle: String,
    pub module: String,
    pub patchable: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Eligibility {
    /// Every host check that patching needs passed.
    pub eligible: bool,
    pub checks: Vec<Check>,
    /// Each running process mapping a module a bundle in the bundle folder targets.
    pub processes: Vec<ProcessCheck>,
    /// Bundle files that could not be read.
    pub unreadable: Vec<String>,
}

const CAP_SYS_PTRACE: u32 = 19;
const CAP_NET_ADMIN: u32 = 12;

fn cap_effective() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The host checks. `needed` says which ones patching cannot do without.
pub fn host_checks() -> Vec<(Check, bool)> {
    let mut out = Vec::new();
    let caps = cap_effective().unwrap_or(0);
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let ptrace_cap = caps & (1 << CAP_SYS_PTRACE) != 0;
    out.push((
        Check {
            name: "ptrace_capability",
            ok: ptrace_cap,
            detail: if ptrace_cap {
                format!("CAP_SYS_PTRACE held (euid {euid})")
            } else {
                format!("CAP_SYS_PTRACE missing (euid {euid}): run as root")
            },
        },
        true,
    ));
    let (ok, detail) = match read_trim("/proc/sys/kernel/yama/ptrace_scope").as_deref() {
        None => (true, "Yama is not active".to_string()),
        Some("0") => (true, "ptrace_scope 0 (classic)".into()),
        Some("1") => (
            ptrace_cap,
            "ptrace_scope 1 (descendants only; CAP_SYS_PTRACE may attach to any process)".into(),
        ),
        Some("2") => (
            ptrace_cap,
            "ptrace_scope 2 (admin only: CAP_SYS_PTRACE needed)".into(),
        ),
        Some("3") => (
            false,
            "ptrace_scope 3: ptrace is off until reboot; nothing can be patched".into(),
        ),
        Some(v) => (false, format!("ptrace_scope {v} (unknown)")),
    };
    out.push((
        Check {
            name: "yama_ptrace_scope",
            ok,
            detail,
        },
        true,
    ));
    let detail = match read_trim("/sys/kernel/security/lockdown") {
        None => "no lockdown LSM (or securityfs not mounted)".to_string(),
        Some(s) => format!("lockdown {s}: user-space ptrace is not restricted by lockdown"),
    };
    out.push((
        Check {
            name: "kernel_lockdown",
            ok: true,
            detail,
        },
        true,
    ));
    let lsms = read_trim("/sys/kernel/security/lsm");
    let mut lsm_ok = true;
    let mut detail = match &lsms {
        Some(l) => format!("active LSMs: {l}"),
        None => "LSM list not readable (securityfs not mounted)".to_string(),
    };
    if read_trim("/sys/fs/selinux/booleans/deny_ptrace").is_some_and(|v| v.starts_with('1')) {
        lsm_ok = false;
        detail.push_str("; SELinux boolean deny_ptrace is on: ptrace is denied");
    }
    if let Some(label) = read_trim("/proc/self/attr/current") {
        let label = label.trim_end_matches('\0').to_string();
        if !label.is_empty() && label != "unconfined" && !label.contains("unconfined") {
            detail.push_str(&format!(
                "; this process is confined ({label}): its policy must allow ptrace"
            ));
        }
    }
    out.push((
        Check {
            name: "lsm_ptrace",
            ok: lsm_ok,
            detail,
        },
        true,
    ));
    // SAFETY: fanotify_init with constant flags; the descriptor is closed right away.
    let fd = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC,
            libc::O_RDONLY as u32,
        )
    };
    let (ok, detail) = if fd >= 0 {
        // SAFETY: closing the descriptor we just got.
        unsafe { libc::close(fd) };
        (
            true,
            "permission events available (new processes can be held until patched)".to_string(),
        )
    } else {
        (
            false,
            format!(
                "fanotify_init(FAN_CLASS_CONTENT): {}",
                std::io::Error::last_os_error()
            ),
        )
    };
    out.push((
        Check {
            name: "fanotify_permission_events",
            ok,
            detail,
        },
        false,
    ));
    let (ok, detail) = match crate::procevents::Connector::open() {
        Ok(_) => (
            true,
            "process events connector available (crash rollback, new processes)".to_string(),
        ),
        Err(e) => (
            false,
            format!(
                "{e:#}{}",
                if caps & (1 << CAP_NET_ADMIN) == 0 {
                    " (CAP_NET_ADMIN missing)"
                } else {
                    ""
                }
            ),
        ),
    };
    out.push((
        Check {
            name: "process_events",
            ok,
            detail,
        },
        false,
    ));
    out
}

/// Host checks plus a `check` of every process mapping a module a bundle in `bundle_dir`
/// targets (touching nothing but a momentary ptrace stop of one thread).
pub fn eligibility(bundle_dir: &Path) -> Eligibility {
    let checks = host_checks();
    let eligible = checks.iter().all(|(c, needed)| c.ok || !needed);
    let mut processes = Vec::new();
    let mut unreadable = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(bundle_dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "suture"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut scanner = crate::scan::Scanner::new();
    for f in files {
        let b = match Bundle::read_file(&f) {
            Ok(b) => b,
            Err(e) => {
                unreadable.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        let Ok(bid) = hex::decode(&b.manifest.module.build_id) else {
            unreadable.push(format!("{}: invalid build-id", f.display()));
            continue;
        };
        let wanted = [bid.clone()].into_iter().collect();
        let pids = scanner
            .processes_mapping(&wanted)
            .remove(&bid)
            .unwrap_or_default();
        for pid in pids {
            let (command, patchable, problems) = match suture_engine::check(pid, Some(&bid)) {
                Ok(r) => (r.command, r.patchable, r.problems),
                Err(e) => (String::new(), false, vec![format!("{e:#}")]),
            };
            processes.push(ProcessCheck {
                pid,
                command,
                bundle: b.manifest.id.clone(),
                module: b.manifest.module.name.clone(),
                patchable,
                problems,
            });
        }
    }
    Eligibility {
        eligible,
        checks: checks.into_iter().map(|(c, _)| c).collect(),
        processes,
        unreadable,
    }
}
