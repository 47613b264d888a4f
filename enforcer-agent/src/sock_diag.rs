//! The kernel's socket table through `NETLINK_SOCK_DIAG` (inet_diag): dump the TCP and UDP
//! sockets of a network namespace, and destroy one (`SOCK_DESTROY`, the kernel's
//! `tcp_abort`/`udp_abort`: the owner's next call fails with `ECONNABORTED`). Raw netlink
//! behind safe functions, in the style of [`crate::sys`].
//!
//! A netlink socket answers for the network namespace it was created in:
//! [`DiagSocket::open_in`] creates one inside another namespace from a short-lived thread
//! that joins it (`setns`), and the socket keeps working from any thread afterwards.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` (without attributes).
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// TCP states (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_LISTEN: u8 = 10;
/// The TCP states of a socket that carries or may still carry data: established, the
/// handshake (SYN_SENT, SYN_RECV) and the closing ones but TIME_WAIT and CLOSE
/// (FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING).
pub const TCP_LIVE_STATES: u32 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
/// A connected UDP socket is `TCP_ESTABLISHED` in the kernel's table.
pub const UDP_CONNECTED_STATES: u32 = 1 << TCP_ESTABLISHED;

/// One socket of the kernel's table, with the exact identity `SOCK_DESTROY` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    pub state: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub inode: u32,
    pub cookie: u64,
    /// The raw `inet_diag_sockid` (ports, addresses, interface, cookie) as the kernel sent it.
    id: [u8; SOCKID_LEN],
}

/// A `NETLINK_SOCK_DIAG` socket of one network namespace.
pub struct Diag {
    fd: OwnedFd,
    seq: u32,
}

/// Why a socket operation failed: the errno and what was asked.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct DiagError {
    pub what: String,
    #[source]
    pub source: io::Error,
}

impl DiagError {
    fn new(what: impl Into<String>, source: io::Error) -> Self {
        Self {
            what: what.into(),
            source,
        }
    }

    /// The errno, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl Diag {
    /// A sock_diag socket in the caller's network namespace.
    pub fn open() -> Result<Self, DiagError> {
        // SAFETY: socket(2) on integers; a new descriptor or -1.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(DiagError::new(
                "opening a NETLINK_SOCK_DIAG socket",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: a new descriptor the kernel just gave us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A kernel answer never takes long; a bound keeps the event loop from hanging.
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads one timeval we own, on a descriptor we own.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Self { fd, seq: 0 })
    }

    /// A sock_diag socket inside the network namespace `ns` (a `/proc/PID/ns/net` path),
    /// created from a thread that joins it and ends; the caller's namespace is untouched.
    pub fn open_in(ns: &Path) -> Result<Self, DiagError> {
        let f = fs::File::open(ns)
            .map_err(|e| DiagError::new(format!("opening {}", ns.display()), e))?;
        let what = format!("joining the network namespace {}", ns.display());
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on a descriptor we hold; it changes only this thread,
                // which ends right after creating the socket.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(DiagError::new(what.clone(), io::Error::last_os_error()));
                }
                Self::open()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(DiagError::new(
                    what.clone(),
                    io::Error::other("the namespace thread panicked"),
                ))
            })
        })
    }

    fn send(&mut self, kind: u16, flags: u16, req: &[u8; REQ_LEN]) -> Result<u32, io::Error> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
        msg.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(req);
        // SAFETY: send(2) reads `msg.len()` bytes of a buffer we own; a netlink socket with
        // no destination sends to the kernel.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, io::Error> {
        loop {
            // SAFETY: recv(2) writes at most `buf.len()` bytes into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// The sockets of `family` and `protocol` in the states of the `states` bit mask.
    pub fn dump(
        &mut self,
        family: u8,
        protocol: u8,
        states: u32,
    ) -> Result<Vec<DiagSocket>, DiagError> {
        let what = || {
            format!(
                "listing {} {} sockets (sock_diag dump)",
                family_name(family),
                protocol_name(protocol)
            )
        };
        let req = request(family, protocol, states, &[0; SOCKID_LEN]);
        let seq = self
            .send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)
            .map_err(|e| DiagError::new(what(), e))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf).map_err(|e| DiagError::new(what(), e))?;
            if n == 0 {
                return Ok(out);
            }
            for m in messages(&buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = error_code(m.body);
                        if code != 0 {
                            return Err(DiagError::new(what(), io::Error::from_raw_os_error(code)));
                        }
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        if let Some(s) = parse_msg(m.body, protocol) {
                            out.push(s);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Destroys one socket (`SOCK_DESTROY` with its exact id, cookie included: a socket
    /// that was replaced in between is not touched, the kernel answers `ENOENT`).
    pub fn destroy(&mut self, s: &DiagSocket) -> Result<(), DiagError> {
        self.destroy_id(s.family, s.protocol, &s.id).map_err(|e| {
            DiagError::new(
                format!(
                    "closing {} {} -> {}",
                    protocol_name(s.protocol),
                    s.src,
                    s.dst
                ),
                e,
            )
        })
    }

    fn destroy_id(
        &mut self,
        family: u8,
        protocol: u8,
        id: &[u8; SOCKID_LEN],
    ) -> Result<(), io::Error> {
        let req = request(family, protocol, u32::MAX, id);
        let seq = self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.recv(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the kernel closed the netlink socket without an answer",
                ));
            }
            for m in messages(&buf[..n]) {
                if m.seq == seq && m.kind == NLMSG_ERROR {
                    let code = error_code(m.body);
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(code))
                    };
                }
            }
        }
    }

    /// Whether this kernel destroys sockets through netlink: a `SOCK_DESTROY` of a TCP and
    /// a UDP socket that does not exist answers `ENOENT` when the kernel has the handler
    /// (`CONFIG_INET_DIAG_DESTROY=y`), `EOPNOTSUPP` when it was built without it.
    pub fn probe_destroy(&mut self) -> Result<(), DiagError> {
        let mut id = [0u8; SOCKID_LEN];
        // 127.0.0.1:1 -> 127.0.0.1:1 with cookie 0: no such socket.
        id[0..2].copy_from_slice(&1u16.to_be_bytes());
        id[2..4].copy_from_slice(&1u16.to_be_bytes());
        id[4..8].copy_from_slice(&[127, 0, 0, 1]);
        id[20..24].copy_from_slice(&[127, 0, 0, 1]);
        for proto in [libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8] {
            match self.destroy_id(libc::AF_INET as u8, proto, &id) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(DiagError::new(
                        format!("SOCK_DESTROY of a {} socket", protocol_name(proto)),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `inet_diag_req_v2` bytes.
fn request(family: u8, protocol: u8, states: u32, id: &[u8; SOCKID_LEN]) -> [u8; REQ_LEN] {
    let mut r = [0u8; REQ_LEN];
    r[0] = family;
    r[1] = protocol;
    r[4..8].copy_from_slice(&states.to_ne_bytes());
    r[8..].copy_from_slice(id);
    r
}

struct Message<'a> {
    kind: u16,
    seq: u32,
    body: &'a [u8],
}

/// The netlink messages of one datagram (a truncated one ends the list).
fn messages(mut buf: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        out.push(Message {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            body: &buf[NLMSG_HDRLEN..len],
        });
        let aligned = (len + 3) & !3;
        buf = buf.get(aligned..).unwrap_or_default();
    }
    out
}

/// The positive errno of an `NLMSG_ERROR` body (0: success).
fn error_code(body: &[u8]) -> i32 {
    match body.get(0..4) {
        Some(b) => -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        None => libc::EPROTO,
    }
}

/// One `inet_diag_msg`.
fn parse_msg(b: &[u8], protocol: u8) -> Option<DiagSocket> {
    if b.len() < MSG_LEN {
        return None;
    }
    let family = b[0];
    let state = b[1];
    let mut id = [0u8; SOCKID_LEN];
    id.copy_from_slice(&b[4..4 + SOCKID_LEN]);
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let addr = |at: usize| -> Option<IpAddr> {
        if family == libc::AF_INET as u8 {
            Some(IpAddr::V4(Ipv4Addr::new(
                id[at],
                id[at + 1],
                id[at + 2],
                id[at + 3],
            )))
        } else if family == libc::AF_INET6 as u8 {
            let mut a = [0u8; 16];
            a.copy_from_slice(&id[at..at + 16]);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        } else {
            None
        }
    };
    let src = SocketAddr::new(addr(4)?, sport);
    let dst = SocketAddr::new(addr(20)?, dport);
    let cookie = u64::from(u32::from_ne_bytes([id[40], id[41], id[42], id[43]]))
        | (u64::from(u32::from_ne_bytes([id[44], id[45], id[46], id[47]])) << 32);
    let at = 4 + SOCKID_LEN + 16;
    let inode = u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    Some(DiagSocket {
        family,
        protocol,
        state,
        src,
        dst,
        inode,
        cookie,
        id,
    })
}

pub fn family_name(family: u8) -> &'static str {
    if family == libc::AF_INET6 as u8 {
        "IPv6"
    } else {
        "IPv4"
    }
}

pub fn protocol_name(protocol: u8) -> &'static str {
    if protocol == libc::IPPROTO_UDP as u8 {
        "udp"
    } else {
        "tcp"
    }
}

/// The inode of a network namespace (`/proc/PID/ns/net`), which names it.
pub fn netns_inode(ns: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(ns).map(|m| m.ino())
}

/// The socket inodes a process holds (`/proc/PID/fd/N -> socket:[INODE]`).
pub fn socket_inodes(pid: u32) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if let Ok(target) = fs::read_link(e.path())
            && let Some(ino) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
        {
            out.push(ino);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn messages_are_split_and_parsed() {
        let mut b = Vec::new();
        let mut msg = vec![0u8; MSG_LEN];
        msg[0] = libc::AF_INET as u8;
        msg[1] = TCP_ESTABLISHED;
        msg[4..6].copy_from_slice(&40000u16.to_be_bytes());
        msg[6..8].copy_from_slice(&443u16.to_be_bytes());
        msg[8..12].copy_from_slice(&[10, 0, 0, 1]);
        msg[24..28].copy_from_slice(&[10, 0, 0, 2]);
        msg[44..48].copy_from_slice(&7u32.to_ne_bytes());
        msg[48..52].copy_from_slice(&1u32.to_ne_bytes());
        msg[4 + SOCKID_LEN + 16..4 + SOCKID_LEN + 20].copy_from_slice(&99u32.to_ne_bytes());
        for seq in [5u32, 6] {
            b.extend_from_slice(&((NLMSG_HDRLEN + MSG_LEN) as u32).to_ne_bytes());
            b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&msg);
        }
        b.extend_from_slice(&[1, 2, 3]); // a truncated tail is ignored
        let ms = messages(&b);
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[1].seq, 6);
        let s = parse_msg(ms[0].body, libc::IPPROTO_TCP as u8).expect("parsed");
        assert_eq!(s.src, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(s.dst, "10.0.0.2:443".parse().unwrap());
        assert_eq!(s.inode, 99);
        assert_eq!(s.cookie, 7 | (1 << 32));
        assert_eq!(s.state, TCP_ESTABLISHED);
        assert!(parse_msg(&msg[..10], 6).is_none());
    }

    /// A real connection on loopback is listed with its inode and destroyed: the owner's
    /// next read fails with ECONNABORTED.
    #[test]
    fn dump_finds_and_destroy_closes_a_loopback_connection() {
        if !root() {
            assert!(
                !crate::in_ci(),
                "needs root (CAP_NET_ADMIN) and CI forbids skipping"
            );
            eprintln!("SKIP: needs root");
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (_server, _) = l.accept().expect("accept");
        let local = c.local_addr().expect("addr");
        let mut d = Diag::open().expect("sock_diag");
        d.probe_destroy()
            .expect("this kernel has CONFIG_INET_DIAG_DESTROY");
        let all = d
            .dump(
                libc::AF_INET as u8,
                libc::IPPROTO_TCP as u8,
                TCP_LIVE_STATES,
            )
            .expect("dump");
        let s = all
            .iter()
            .find(|s| s.src == local)
            .expect("the client socket is listed");
        let mine = socket_inodes(std::process::id()).expect("fds");
        assert!(
            mine.contains(&s.inode),
            "inode {} not among {mine:?}",
            s.inode
        );
        d.destroy(s).expect("destroy");
        use std::io::Read as _;
        let e = (&c)
            .read(&mut [0u8; 1])
            .expect_err("a destroyed socket fails");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
        // Destroying it again: it is gone.
        let again = d.destroy(s).expect_err("gone");
        assert_eq!(again.errno(), Some(libc::ENOENT));
    }
}
