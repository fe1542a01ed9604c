//! Would the target's seccomp filters let our injected system call through?
//!
//! Containers (Docker's default profile, systemd's `SystemCallFilter=`) run services under
//! seccomp filters. Refusing all of them would leave those services unpatchable; guessing could
//! get a target killed (`SECCOMP_RET_KILL_PROCESS`). So we fetch the thread's actual filters
//! with `PTRACE_SECCOMP_GET_FILTER` and run them, as the kernel would, on the exact system call
//! we are about to inject. Anything but "allow" (or "log") refuses the operation.

use anyhow::{bail, Result};

/// `struct sock_filter`.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// `struct seccomp_data` as the filter sees it.
#[derive(Debug, Clone, Copy)]
pub struct SeccompData {
    pub nr: i32,
    pub arch: u32,
    pub instruction_pointer: u64,
    pub args: [u64; 6],
}

pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const MAX_INSNS: usize = 4096; // BPF_MAXINSNS

const RET_ACTION_FULL: u32 = 0xffff_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_LOG: u32 = 0x7ffc_0000;

/// A hardware control-flow guard a thread runs under (from its `/proc/.../status`) that
/// injection cannot honour: with a CET shadow stack the `ret` of a `syscall; ret` gadget into
/// our frame, and the frame's `rt_sigreturn`, would not match the shadow stack and the CPU
/// would kill the process.
fn control_flow_guard(status: &str) -> Option<&'static str> {
    let features = status
        .lines()
        .find_map(|l| l.strip_prefix("x86_Thread_features:"))?;
    features
        .split_whitespace()
        .any(|f| f == "shstk")
        .then_some("shadow stack (CET)")
}

/// The filters attached to thread `tid` of `pid` (ptrace-stopped by us), innermost first.
/// Threads without a filter (`Seccomp: 0` in their status) are not asked.
pub fn filters(pid: i32, tid: i32) -> Result<Vec<Vec<SockFilter>>> {
    let mut out = Vec::new();
    // (Inside the stop: not a growing buffer's eight reads.)
    let status =
        crate::procfs::read_text(&format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    if let Some(feature) = control_flow_guard(&status) {
        return Err(anyhow::Error::new(crate::remote::ShadowStack {
            pid,
            tid,
            feature,
        }));
    }
    let mode = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim)
        .unwrap_or("0");
    match mode {
        "0" => return Ok(out),
        "2" => {}
        _ => bail!(
            "thread {tid} is in seccomp strict mode: it may not make the calls patching needs"
        ),
    }
    for index in 0..64u64 {
        // SAFETY: with a null buffer the kernel only returns the filter's length.
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut libc::c_void,
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOENT) => break, // no more filters
                Some(libc::EINVAL) if index == 0 => break, // no filter at all
                _ => bail!(
                    "cannot read the seccomp filters of thread {tid} to check them: {err} (kernel without CONFIG_CHECKPOINT_RESTORE?)"
                ),
            }
        }
        let n = n as usize;
        if n > MAX_INSNS {
            bail!("thread {tid}: seccomp filter of {n} instructions exceeds the kernel's limit");
        }
        let mut prog = vec![SockFilter::default(); n];
        // SAFETY: `prog` has room for exactly the `n` instructions the kernel reported, and
        // SockFilter has the layout of `struct sock_filter`.
        let got = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut libc::c_void,
                prog.as_mut_ptr() as *mut libc::c_void,
            )
        };
        if got as usize != n {
            bail!("thread {tid}: seccomp filter {index} changed while being read");
        }
        out.push(prog);
    }
    Ok(out)
}

/// The action of all filters together: the most restrictive one wins, as in the kernel.
pub fn allows(filters: &[Vec<SockFilter>], data: &SeccompData) -> Result<bool> {
    for f in filters {
        let ret = run(f, data)?;
        let action = ret & RET_ACTION_FULL;
        if action != RET_ALLOW && action != RET_LOG {
            return Ok(false);
        }
    }
    Ok(true)
}

fn load_word(data: &SeccompData, off: u32) -> Result<u32> {
    let word = |v: u64, hi: bool| if hi { (v >> 32) as u32 } else { v as u32 };
    Ok(match off {
        0 => data.nr as u32,
        4 => data.arch,
        8 | 12 => word(data.instruction_pointer, off == 12),
        16..=60 if off.is_multiple_of(4) => {
            let i = ((off - 16) / 8) as usize;
            word(data.args[i], (off - 16) % 8 == 4)
        }
        _ => bail!("seccomp filter loads from invalid offset {off}"),
    })
}

/// Runs one classic-BPF seccomp program (the subset the kernel accepts for seccomp).
pub fn run(prog: &[SockFilter], data: &SeccompData) -> Result<u32> {
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    for _ in 0..=prog.len() {
        let Some(ins) = prog.get(pc) else {
            bail!("seccomp filter runs past its end");
        };
        pc += 1;
        let k = ins.k;
        let class = ins.code & 0x07;
        let src_x = ins.code & 0x08 != 0;
        match class {
            0x00 => {
                // BPF_LD
                a = match ins.code & 0xe0 {
                    0x20 => load_word(data, k)?, // ABS
                    0x80 => 64,                  // LEN: sizeof(struct seccomp_data)
                    0x00 => k,                   // IMM
                    0x60 => *mem
                        .get(k as usize)
                        .ok_or_else(|| anyhow::anyhow!("bad M[{k}]"))?,
                    m => bail!("unsupported seccomp load mode {m:#x}"),
                }
            }
            0x01 => {
                // BPF_LDX
                x = match ins.code & 0xe0 {
                    0x80 => 64,
                    0x00 => k,
                    0x60 => *mem
                        .get(k as usize)
                        .ok_or_else(|| anyhow::anyhow!("bad M[{k}]"))?,
                    m => bail!("unsupported seccomp ldx mode {m:#x}"),
                }
            }
            0x02 | 0x03 => {
                // BPF_ST / BPF_STX
                let v = if class == 0x02 { a } else { x };
                *mem.get_mut(k as usize)
                    .ok_or_else(|| anyhow::anyhow!("bad M[{k}]"))? = v;
            }
            0x04 => {
                // BPF_ALU
                let operand = if src_x { x } else { k };
                a = match ins.code & 0xf0 {
                    0x00 => a.wrapping_add(operand),
                    0x10 => a.wrapping_sub(operand),
                    0x20 => a.wrapping_mul(operand),
                    0x30 => a.checked_div(operand).unwrap_or(0),
                    0x40 => a | operand,
                    0x50 => a & operand,
                    0x60 => a.checked_shl(operand).unwrap_or(0),
                    0x70 => a.checked_shr(operand).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 => a.checked_rem(operand).unwrap_or(0),
                    0xa0 => a ^ operand,
                    op => bail!("unsupported seccomp alu op {op:#x}"),
                }
            }
            0x05 => {
                // BPF_JMP
                let operand = if src_x { x } else { k };
                let op = ins.code & 0xf0;
                if op == 0x00 {
                    pc += k as usize; // JA
                    continue;
                }
                let taken = match op {
                    0x10 => a == operand,
                    0x20 => a > operand,
                    0x30 => a >= operand,
                    0x40 => a & operand != 0,
                    _ => bail!("unsupported seccomp jump {op:#x}"),
                };
                pc += if taken { ins.jt } else { ins.jf } as usize;
            }
            0x06 => return Ok(if ins.code & 0x18 == 0x10 { a } else { k }), // BPF_RET (A or K)
            0x07 => {
                // BPF_MISC
                if ins.code & 0xf8 == 0x00 {
                    x = a; // TAX
                } else {
                    a = x; // TXA
                }
            }
            _ => unreachable!("class is three bits"),
        }
    }
    bail!("seccomp filter does not terminate")
}

/// The system calls the engine injects, with representative arguments.
const INJECTED: &[(&str, i64, [u64; 6])] = &[
    (
        "memfd_create",
        libc::SYS_memfd_create,
        [0, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0],
    ),
    (
        "mmap",
        libc::SYS_mmap,
        [
            0,
            4096,
            (libc::PROT_READ | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE) as u64,
            3,
            0,
        ],
    ),
    (
        "mprotect",
        libc::SYS_mprotect,
        [0, 4096, libc::PROT_READ as u64, 0, 0, 0],
    ),
    (
        "mprotect",
        libc::SYS_mprotect,
        [
            0,
            4096,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            0,
            0,
            0,
        ],
    ),
    ("close", libc::SYS_close, [3, 0, 0, 0, 0, 0]),
    ("munmap", libc::SYS_munmap, [0, 4096, 0, 0, 0, 0]),
];

/// Checks every system call the engine will inject; `Err` names the first one a filter stops.
pub fn check_injected(
    filters: &[Vec<SockFilter>],
    ip: u64,
) -> Result<std::result::Result<(), &'static str>> {
    for (name, nr, args) in INJECTED {
        let d = SeccompData {
            nr: *nr as i32,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: ip,
            args: *args,
        };
        if !allows(filters, &d)? {
            return Ok(Err(name));
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_with_a_shadow_stack_is_not_injected_into() {
        let status = |features: &str| {
            format!("Name:\tx\nSeccomp:\t0\nx86_Thread_features:\t{features}\nx86_Thread_features_locked:\tshstk wrss\n")
        };
        assert_eq!(
            control_flow_guard(&status("shstk wrss")),
            Some("shadow stack (CET)")
        );
        assert_eq!(
            control_flow_guard(&status("shstk")),
            Some("shadow stack (CET)")
        );
        assert_eq!(control_flow_guard(&status("")), None);
        assert_eq!(control_flow_guard(&status("wrss")), None);
        // Kernels without user shadow stacks have no such line.
        assert_eq!(control_flow_guard("Name:\tx\nSeccomp:\t0\n"), None);
    }

    fn ins(code: u16, jt: u8, jf: u8, k: u32) -> SockFilter {
        SockFilter { code, jt, jf, k }
    }

    fn data(nr: i32) -> SeccompData {
        SeccompData {
            nr,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: 0,
            args: [0; 6],
        }
    }

    /// arch check, then: memfd_create -> ERRNO(EPERM), everything else -> ALLOW.
    fn deny_memfd() -> Vec<SockFilter> {
        vec![
            ins(0x20, 0, 0, 4),                             // ld arch
            ins(0x15, 1, 0, AUDIT_ARCH_X86_64),             // jeq arch, +1
            ins(0x06, 0, 0, 0x8000_0000),                   // ret KILL_PROCESS
            ins(0x20, 0, 0, 0),                             // ld nr
            ins(0x15, 0, 1, libc::SYS_memfd_create as u32), // jeq memfd_create
            ins(0x06, 0, 0, 0x0005_0000 | 1),               // ret ERRNO(EPERM)
            ins(0x06, 0, 0, RET_ALLOW),                     // ret ALLOW
        ]
    }

    #[test]
    fn evaluates_a_typical_filter() {
        let f = vec![deny_memfd()];
        assert!(!allows(&f, &data(libc::SYS_memfd_create as i32)).unwrap());
        assert!(allows(&f, &data(libc::SYS_mmap as i32)).unwrap());
        let mut wrong_arch = data(libc::SYS_mmap as i32);
        wrong_arch.arch = 0x4000_0003;
        assert!(!allows(&f, &wrong_arch).unwrap());
    }

    #[test]
    fn malformed_programs_are_errors_not_panics() {
        assert!(run(&[], &data(0)).is_err());
        assert!(run(&[ins(0x20, 0, 0, 3)], &data(0)).is_err()); // unaligned load
        assert!(run(&[ins(0x05, 0, 0, 100)], &data(0)).is_err()); // jump past the end
        assert!(run(&[ins(0x02, 0, 0, 99)], &data(0)).is_err()); // bad scratch slot
    }
}
