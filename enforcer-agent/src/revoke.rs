//! Revocation: the connections that lose their allow are closed, not only new connects.
//!
//! The kernel programs judge a connect once, when it is made. When an apply, a grant's end
//! or the loss of an identity takes an identity's right to a destination away, its
//! established TCP connections and connected UDP sockets to that destination stay open
//! unless someone closes them. [`sweep`] does: it lists the sockets of the processes given
//! (their `/proc/PID/fd`), finds them in the kernel's socket table of their network
//! namespace (`NETLINK_SOCK_DIAG`), judges each (process, destination, port, protocol) with
//! the decision the kernel makes now ([`crate::kernel::Kernel::judge`], the function
//! `explain` uses), and destroys each socket the verdict denies (`SOCK_DESTROY`: the owner's
//! next call fails with `ECONNABORTED`, a TCP peer gets a reset).
//!
//! A TCP socket that a listener of its namespace accepted (its local port is a listening
//! port there) is an inbound connection, which no connect hook judged: it is left alone.
//! Every UDP socket with a peer got it from a `connect()` the hooks judged, so all are kept
//! to the rule.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use enforcer_common::Verdict;

use crate::{
    kernel::Judgement,
    sock_diag::{self, Diag, DiagSocket},
};

/// Why a sweep runs; each closure's event carries it (`reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeReason {
    /// A policy was put in force (start excepted): `policy apply`, SIGHUP, the file watch,
    /// identity destinations updated.
    PolicyApply,
    /// The agent started (or took over) with its policy in force: what lost its allow while
    /// no agent ran.
    Startup,
    /// A process lost its identity (tampered with).
    IdentityLost,
    /// A `grant` reached its end.
    GrantExpired,
    /// `revoke ID` ended a grant.
    GrantRevoked,
    /// A time-bound policy entry (`expires`) ended.
    EntryExpired,
}

impl RevokeReason {
    pub const fn name(self) -> &'static str {
        match self {
            Self::PolicyApply => "policy-apply",
            Self::Startup => "startup",
            Self::IdentityLost => "identity-lost",
            Self::GrantExpired => "grant-expired",
            Self::GrantRevoked => "grant-revoked",
            Self::EntryExpired => "entry-expired",
        }
    }
}

/// One socket a sweep closed, or would have closed (the verdict was an audit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closure {
    pub pid: u32,
    pub src: SocketAddr,
    /// The peer; an IPv4-mapped IPv6 peer is given as the IPv4 address (as it is judged).
    pub dst: SocketAddr,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    pub judgement: Judgement,
    /// True: destroyed. False: the verdict was `audit` (would close; nothing closed).
    pub closed: bool,
}

/// What one sweep did.
#[derive(Debug, Default)]
pub struct Sweep {
    pub closures: Vec<Closure>,
    /// One sentence per failure (what failed, on what); the sweep goes on after each.
    pub errors: Vec<String>,
    /// Processes whose descriptors were read, and their sockets found in the kernel's table.
    pub processes: usize,
    pub sockets: usize,
}

/// True when `cgroup` is inside one of the policy's `scope` subtrees.
pub fn in_scope(scope: &[String], cgroup: &str) -> bool {
    scope.iter().any(|s| {
        let s = s.trim_end_matches('/');
        s.is_empty() || cgroup == s || cgroup.starts_with(&format!("{s}/"))
    })
}

const TCP: u8 = libc::IPPROTO_TCP as u8;
const UDP: u8 = libc::IPPROTO_UDP as u8;
const INET: u8 = libc::AF_INET as u8;
const INET6: u8 = libc::AF_INET6 as u8;

/// Closes the sockets of `pids` whose destination `judge` denies now (`Verdict::Deny`);
/// `Verdict::Audit` is reported as a would-be closure and nothing is closed. Errors are
/// collected per process, namespace and socket; the sweep never stops at one.
pub fn sweep(
    pids: &[u32],
    mut judge: impl FnMut(u32, IpAddr, u16, u8) -> Result<Judgement, String>,
) -> Sweep {
    let mut out = Sweep::default();
    let own_ns = sock_diag::netns_inode(Path::new("/proc/self/ns/net")).ok();
    // Network namespace -> (a path to join it, the processes there and their sockets).
    type Members = Vec<(u32, HashSet<u32>)>;
    let mut by_ns: BTreeMap<u64, (PathBuf, Members)> = BTreeMap::new();
    for &pid in pids {
        let inodes = match sock_diag::socket_inodes(pid) {
            Ok(i) => i,
            // Gone since it was listed: nothing of it to close.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.errors
                    .push(format!("reading the descriptors of pid {pid}: {e}"));
                continue;
            }
        };
        if inodes.is_empty() {
            continue;
        }
        out.processes += 1;
        let ns_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let ns = match sock_diag::netns_inode(&ns_path) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.errors.push(format!(
                    "finding the network namespace of pid {pid} ({}): {e}",
                    ns_path.display()
                ));
                continue;
            }
        };
        by_ns
            .entry(ns)
            .or_insert_with(|| (ns_path, Vec::new()))
            .1
            .push((pid, inodes.into_iter().collect()));
    }
    for (ns, (path, members)) in by_ns {
        let diag = if Some(ns) == own_ns {
            Diag::open()
        } else {
            Diag::open_in(&path)
        };
        let mut diag = match diag {
            Ok(d) => d,
            Err(e) => {
                out.errors.push(format!(
                    "network namespace {ns} (of pid {}): {e}",
                    members[0].0
                ));
                continue;
            }
        };
        sweep_namespace(&mut diag, &members, &mut judge, &mut out);
    }
    out
}

fn sweep_namespace(
    diag: &mut Diag,
    members: &[(u32, HashSet<u32>)],
    judge: &mut impl FnMut(u32, IpAddr, u16, u8) -> Result<Judgement, String>,
    out: &mut Sweep,
) {
    let tcp_states = sock_diag::TCP_LIVE_STATES | (1 << sock_diag::TCP_LISTEN);
    let mut table: HashMap<u32, DiagSocket> = HashMap::new();
    let mut listening: HashSet<u16> = HashSet::new();
    for (family, proto, states) in [
        (INET, TCP, tcp_states),
        (INET6, TCP, tcp_states),
        (INET, UDP, sock_diag::UDP_CONNECTED_STATES),
        (INET6, UDP, sock_diag::UDP_CONNECTED_STATES),
    ] {
        match diag.dump(family, proto, states) {
            Ok(list) => {
                for s in list {
                    if proto == TCP && s.state == sock_diag::TCP_LISTEN {
                        listening.insert(s.src.port());
                    } else if s.inode != 0 {
                        table.insert(s.inode, s);
                    }
                }
            }
            Err(e) => out.errors.push(e.to_string()),
        }
    }
    let mut destroyed: HashSet<u32> = HashSet::new();
    for (pid, inodes) in members {
        for ino in inodes {
            let Some(s) = table.get(ino) else { continue };
            if destroyed.contains(ino) {
                continue;
            }
            // Accepted by a listener of this namespace: inbound, never judged by a hook.
            if s.protocol == TCP && listening.contains(&s.src.port()) {
                continue;
            }
            out.sockets += 1;
            let dst = SocketAddr::new(s.dst.ip().to_canonical(), s.dst.port());
            let j = match judge(*pid, dst.ip(), dst.port(), s.protocol) {
                Ok(j) => j,
                Err(e) => {
                    out.errors.push(format!(
                        "judging pid {pid}'s {} connection {} -> {dst}: {e}",
                        sock_diag::protocol_name(s.protocol),
                        s.src
                    ));
                    continue;
                }
            };
            let closed = match j.verdict {
                Verdict::Allow => continue,
                Verdict::Audit => false,
                Verdict::Deny => match diag.destroy(s) {
                    Ok(()) => true,
                    // Closed by its owner in between: nothing left to do.
                    Err(e) if e.errno() == Some(libc::ENOENT) => continue,
                    Err(e) => {
                        out.errors.push(format!("pid {pid}: {e}"));
                        continue;
                    }
                },
            };
            if closed {
                destroyed.insert(*ino);
            }
            out.closures.push(Closure {
                pid: *pid,
                src: s.src,
                dst,
                protocol: s.protocol,
                judgement: j,
                closed,
            });
        }
    }
}

/// The probe's feature names ([`crate::probe`]): netlink `SOCK_DESTROY` (what the agent
/// uses) and the `bpf_sock_destroy` kfunc (reported only).
pub const FEATURE_NETLINK: &str = "sock_destroy_netlink";
pub const FEATURE_KFUNC: &str = "kfunc_bpf_sock_destroy";
/// What the agent does without [`FEATURE_NETLINK`].
pub const WITHOUT_NETLINK: &str = "revocation cannot close live connections: a connection that loses its allow stays open until it ends (new connects are still judged by the policy in force)";
/// What the agent does without [`FEATURE_KFUNC`].
pub const WITHOUT_KFUNC: &str =
    "nothing: the agent closes connections through netlink SOCK_DESTROY";

/// The `revocation:` line of `status`.
pub fn status_line(probe: &crate::probe::Probe, revoke_connections: bool) -> String {
    let kfunc = if probe.found(FEATURE_KFUNC) {
        "present, unused"
    } else {
        "absent"
    };
    if !revoke_connections {
        return "off (revokeConnections: false): live connections stay open when they lose their allow".to_string();
    }
    match probe.feature(FEATURE_NETLINK) {
        Some(f) if f.found => format!(
            "closes connections that lose their allow within the apply, with netlink SOCK_DESTROY (bpf_sock_destroy kfunc: {kfunc})"
        ),
        Some(f) => format!(
            "CANNOT close connections: {}; {WITHOUT_NETLINK} (bpf_sock_destroy kfunc: {kfunc})",
            f.detail
        ),
        None => format!("CANNOT close connections: not probed; {WITHOUT_NETLINK}"),
    }
}

/// A closure as an event: the process's facts, the identity it had, the destination and
/// the rule that denies it now, `action`, `closed`, `reason` and `src`.
impl crate::views::View<'_> {
    pub(crate) fn closure(
        &self,
        c: &Closure,
        reason: RevokeReason,
        time_ns: u64,
    ) -> crate::api::Decision {
        let t = self.procs.get(c.pid);
        let exe = t.and_then(|t| self.exes.get(t.exe_id));
        // The identity judged now, or (lost: tampered) the one its facts give.
        let ident = if c.judgement.ident != enforcer_common::IDENT_NONE {
            c.judgement.ident
        } else {
            t.zip(exe).map_or(enforcer_common::IDENT_NONE, |(t, exe)| {
                let pod = self.pods.for_cgroup(&t.cgroup);
                crate::policy::resolve(&self.in_force.policy, &t.facts(exe, pod.as_ref())).ident
            })
        };
        crate::api::Decision {
            pid: c.pid,
            exe: exe.map(|e| e.path.clone()),
            sha256: exe.map(|e| hex::encode(e.sha256)),
            cgroup: t.map(|t| t.cgroup.clone()),
            uid: t.map_or(0, |t| t.uid),
            identity: self.in_force.identity_name(ident).map(str::to_string),
            verdict: c.judgement.verdict.name().to_string(),
            dst: c.dst.ip().to_string(),
            port: c.dst.port().into(),
            protocol: sock_diag::protocol_name(c.protocol).to_string(),
            rule: self.in_force.rule_text(c.judgement.rule),
            time_ns,
            action: Some(if c.closed { "closed" } else { "would close" }.to_string()),
            closed: Some(c.closed),
            reason: Some(reason.name().to_string()),
            src: Some(c.src.to_string()),
            ..Default::default()
        }
    }
}

/// Linux capability number of `CAP_NET_ADMIN`, which `SOCK_DESTROY` needs.
const CAP_NET_ADMIN: u32 = 12;

/// Whether the agent can close sockets through netlink `SOCK_DESTROY`
/// (`CONFIG_INET_DIAG_DESTROY`, and `CAP_NET_ADMIN`): what was found, or why not.
pub fn probe_netlink() -> Result<String, String> {
    let mut d = Diag::open().map_err(|e| e.to_string())?;
    match d.probe_destroy() {
        Ok(()) => {}
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
            return Err(
                "SOCK_DESTROY answers EOPNOTSUPP: the kernel was built without CONFIG_INET_DIAG_DESTROY"
                    .to_string(),
            );
        }
        Err(e) => return Err(e.to_string()),
    }
    if !has_capability(CAP_NET_ADMIN) {
        return Err(
            "the kernel has SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY) but the agent lacks CAP_NET_ADMIN, which it needs; grant CAP_NET_ADMIN"
                .to_string(),
        );
    }
    Ok(
        "netlink SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY) for TCP and UDP, with CAP_NET_ADMIN"
            .to_string(),
    )
}

/// Whether the kernel has the `bpf_sock_destroy` kfunc (6.5+; found in its BTF). The agent
/// does not use it (netlink reaches every namespace without a program); `status` says
/// whether it is there.
pub fn probe_kfunc() -> Result<String, String> {
    probe_kfunc_in(Path::new(crate::btf::VMLINUX_BTF))
}

fn probe_kfunc_in(path: &Path) -> Result<String, String> {
    let btf = btf_rs::Btf::from_file(path)
        .map_err(|e| format!("cannot read kernel BTF from {}: {e}", path.display()))?;
    let found = btf
        .resolve_types_by_name("bpf_sock_destroy")
        .map(|ts| ts.iter().any(|t| matches!(t, btf_rs::Type::Func(_))))
        .unwrap_or(false);
    if found {
        Ok(format!(
            "kfunc bpf_sock_destroy in {} (not used: the agent closes through netlink)",
            path.display()
        ))
    } else {
        Err(format!(
            "no kfunc bpf_sock_destroy in {} (kernels before 6.5)",
            path.display()
        ))
    }
}

/// True when the calling process has capability `cap` in its effective set.
fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1 << cap) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_matches_subtrees_only() {
        let scope = vec!["/a/b".to_string()];
        assert!(in_scope(&scope, "/a/b"));
        assert!(in_scope(&scope, "/a/b/c"));
        assert!(!in_scope(&scope, "/a/bc"));
        assert!(!in_scope(&scope, "/a"));
        assert!(in_scope(&["/".to_string()], "/anything"));
    }

    #[test]
    fn reasons_have_stable_names() {
        let all = [
            RevokeReason::PolicyApply,
            RevokeReason::Startup,
            RevokeReason::IdentityLost,
            RevokeReason::GrantExpired,
            RevokeReason::GrantRevoked,
            RevokeReason::EntryExpired,
        ];
        let names: Vec<&str> = all.iter().map(|r| r.name()).collect();
        assert_eq!(
            names,
            [
                "policy-apply",
                "startup",
                "identity-lost",
                "grant-expired",
                "grant-revoked",
                "entry-expired"
            ]
        );
    }

    fn judgement(verdict: Verdict) -> Judgement {
        Judgement {
            verdict,
            ident: 1,
            rule: 0,
        }
    }

    /// The sweep over this very process: a denied outbound TCP connection is closed, an
    /// allowed one and an accepted (inbound) one stay; an audit verdict closes nothing.
    #[test]
    fn sweep_closes_denied_outbound_connections_of_the_process() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                !crate::in_ci(),
                "needs root (CAP_NET_ADMIN) and CI forbids skipping"
            );
            eprintln!("SKIP: needs root");
            return;
        }
        use std::io::Read as _;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = l.local_addr().expect("addr").port();
        let denied = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (inbound, _) = l.accept().expect("accept");
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port2 = l2.local_addr().expect("addr").port();
        let allowed = std::net::TcpStream::connect(("127.0.0.1", port2)).expect("connect");
        let (_peer2, _) = l2.accept().expect("accept");
        let me = std::process::id();
        // Audit first: reported, nothing closed.
        let audit = sweep(&[me], |_, _, p, _| {
            Ok(judgement(if p == port {
                Verdict::Audit
            } else {
                Verdict::Allow
            }))
        });
        assert!(audit.errors.is_empty(), "{:?}", audit.errors);
        assert_eq!(audit.closures.len(), 1, "{:?}", audit.closures);
        assert!(!audit.closures[0].closed);
        let s = sweep(&[me], |pid, ip, p, proto| {
            assert_eq!(pid, me);
            assert_eq!(proto, TCP);
            assert_eq!(ip, IpAddr::from([127, 0, 0, 1]));
            Ok(judgement(if p == port {
                Verdict::Deny
            } else {
                Verdict::Allow
            }))
        });
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.closures.len(), 1, "{:?}", s.closures);
        let c = &s.closures[0];
        assert!(c.closed);
        assert_eq!(c.dst.port(), port);
        assert_eq!(c.src, denied.local_addr().expect("addr"));
        let e = (&denied).read(&mut [0u8; 1]).expect_err("closed");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED));
        // The inbound side and the allowed connection are untouched.
        inbound.set_nonblocking(true).expect("nonblocking");
        allowed.set_nonblocking(true).expect("nonblocking");
        let still_open = |mut t: &std::net::TcpStream| match t.read(&mut [0u8; 1]) {
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        };
        // The inbound socket got the reset of its peer: it is the peer that was closed.
        assert!(
            still_open(&allowed),
            "the allowed connection must stay open"
        );
        drop(inbound);
    }

    #[test]
    fn kfunc_probe_reads_btf() {
        match probe_kfunc_in(Path::new("/nonexistent/vmlinux")) {
            Err(e) => assert!(e.contains("cannot read kernel BTF"), "{e}"),
            Ok(s) => panic!("no file, yet found: {s}"),
        }
    }
}
