//! The kernel's process-events connector (netlink `NETLINK_CONNECTOR`, `CN_IDX_PROC`): every
//! exec and every exit on the host, with the exit's code and signal. Needs root
//! (CAP_NET_ADMIN in the initial user namespace).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Result};

const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
/// `struct proc_event`: what, cpu, timestamp_ns, then the event's data.
const EVENT_DATA: usize = NLMSG_HDRLEN + CN_MSG_LEN + 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// Process `pid` ran `execve`.
    Exec { pid: i32 },
    /// Process `pid` (the whole thread group) ended; `signal` is the signal that killed it,
    /// `None` for a normal exit.
    Exit {
        pid: i32,
        signal: Option<i32>,
        status: Option<i32>,
    },
}

pub struct Connector {
    fd: OwnedFd,
}

impl Connector {
    /// Opens the connector and subscribes to process events.
    pub fn open() -> Result<Connector> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            bail!(
                "cannot open the process-events connector: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = CN_IDX_PROC;
        addr.nl_pid = 0; // the kernel picks a unique port id
                         // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            bail!(
                "cannot bind the process-events connector: {}",
                std::io::Error::last_os_error()
            );
        }
        // A big receive buffer: exits come in bursts (a build, a shell loop).
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with a valid int option value; failure only keeps the default.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + CN_MSG_LEN + 4);
        let total = (NLMSG_HDRLEN + CN_MSG_LEN + 4) as u32;
        msg.extend_from_slice(&total.to_ne_bytes()); // nlmsg_len
        msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes()); // nlmsg_type
        msg.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes()); // nlmsg_pid
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes()); // cn_msg.id.idx
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes()); // cn_msg.id.val
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: sending a fully initialised buffer of the given length.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
            )
        };
        if n < 0 {
            bail!(
                "cannot subscribe to process events (root needed): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Connector { fd })
    }

    /// Waits for the next batch of events. `Err` with ENOBUFS means events were lost (the
    /// caller should rescan); other errors are fatal for the connector.
    pub fn recv(&self, out: &mut Vec<ProcEvent>) -> std::io::Result<()> {
        let mut buf = [0u8; 8192];
        // SAFETY: receiving into a buffer we own, of the length passed.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        parse(&buf[..n as usize], out);
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses the netlink messages of one datagram.
fn parse(mut buf: &[u8], out: &mut Vec<ProcEvent>) {
    while buf.len() >= NLMSG_HDRLEN {
        let Some(len) = u32_at(buf, 0).map(|l| l as usize) else {
            return;
        };
        if len < NLMSG_HDRLEN || len > buf.len() {
            return;
        }
        let msg = &buf[..len];
        if let Some(e) = parse_event(msg) {
            out.push(e);
        }
        let step = (len + 3) & !3;
        buf = buf.get(step..).unwrap_or(&[]);
    }
}

fn parse_event(msg: &[u8]) -> Option<ProcEvent> {
    let what = u32_at(msg, NLMSG_HDRLEN + CN_MSG_LEN)?;
    let d = EVENT_DATA;
    match what {
        PROC_EVENT_EXEC => Some(ProcEvent::Exec {
            pid: u32_at(msg, d + 4)? as i32, // the thread group
        }),
        PROC_EVENT_EXIT => {
            let pid = u32_at(msg, d)? as i32;
            let tgid = u32_at(msg, d + 4)? as i32;
            if pid != tgid {
                return None; // a thread ended, not the process
            }
            // The wait(2) status: low 7 bits the killing signal, else the exit code << 8.
            let code = u32_at(msg, d + 8)?;
            let sig = (code & 0x7f) as i32;
            Some(ProcEvent::Exit {
                pid,
                signal: (sig != 0).then_some(sig),
                status: (sig == 0).then_some(((code >> 8) & 0xff) as i32),
            })
        }
        _ => None,
    }
}

/// Is this a signal that means the process crashed (as opposed to was asked to stop)?
pub fn is_crash_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGABRT | libc::SIGSYS
    )
}

pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGSYS => "SIGSYS".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real child killed by SIGSEGV and one exiting cleanly, seen through the connector.
    #[test]
    fn sees_a_crash_and_a_clean_exit() {
        let Ok(c) = Connector::open() else {
            eprintln!("skipped: the connector needs root");
            return;
        };
        let crash = std::process::Command::new("sh")
            .args(["-c", "kill -SEGV $$"])
            .spawn()
            .unwrap();
        let clean = std::process::Command::new("true").spawn().unwrap();
        let (cp, kp) = (crash.id() as i32, clean.id() as i32);
        let (mut crash, mut clean) = (crash, clean);
        let _ = crash.wait();
        let _ = clean.wait();
        let mut seen = (None, None);
        let mut events = Vec::new();
        while seen.0.is_none() || seen.1.is_none() {
            events.clear();
            c.recv(&mut events).unwrap();
            for e in &events {
                if let ProcEvent::Exit { pid, signal, .. } = *e {
                    if pid == cp {
                        seen.0 = Some(signal);
                    }
                    if pid == kp {
                        seen.1 = Some(signal);
                    }
                }
            }
        }
        assert_eq!(seen, (Some(Some(libc::SIGSEGV)), Some(None)));
    }
}
