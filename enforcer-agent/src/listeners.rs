//! `to: {identity: X}` destinations: where processes of identity X listen, and the concrete
//! cidr rules that stand for them. Reading is /proc only; expansion is pure.

use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use crate::policy::{Policy, Protocol, Rule};

/// One listening socket: TCP in LISTEN, or a bound unconnected UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Listener {
    /// `true` for TCP, `false` for UDP.
    pub tcp: bool,
    pub addr: IpAddr,
    pub port: u16,
}

/// The listening sockets a process holds, read from its own network namespace view
/// (`/proc/PID/net/*`) and its file descriptors. A vanished process has none.
pub fn process_listeners(pid: u32) -> Vec<Listener> {
    let Ok(p) = procfs::process::Process::new(pid as i32) else {
        return Vec::new();
    };
    let inodes: HashSet<u64> = match p.fd() {
        Ok(fds) => fds
            .flatten()
            .filter_map(|fd| match fd.target {
                procfs::process::FDTarget::Socket(i) => Some(i),
                _ => None,
            })
            .collect(),
        Err(_) => return Vec::new(),
    };
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for e in p.tcp().into_iter().chain(p.tcp6()).flatten() {
        if e.state == procfs::net::TcpState::Listen && inodes.contains(&e.inode) {
            out.push(Listener {
                tcp: true,
                addr: e.local_address.ip(),
                port: e.local_address.port(),
            });
        }
    }
    for e in p.udp().into_iter().chain(p.udp6()).flatten() {
        if e.remote_address.port() == 0 && e.local_address.port() != 0 && inodes.contains(&e.inode)
        {
            out.push(Listener {
                tcp: false,
                addr: e.local_address.ip(),
                port: e.local_address.port(),
            });
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Addresses of this node (all interfaces of the agent's network namespace).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn host(a: IpAddr) -> IpNet {
    IpNet::from(a)
}

/// Destination prefixes a listener is reachable at from this node.
fn reachable(l: &Listener, local: &[IpAddr]) -> Vec<IpNet> {
    let loop4: IpNet = IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8)
        .unwrap_or_else(|_| host(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let v4s = || local.iter().filter(|a| a.is_ipv4()).map(|a| host(*a));
    let v6s = || local.iter().filter(|a| a.is_ipv6()).map(|a| host(*a));
    match l.addr {
        IpAddr::V4(a) if a.is_unspecified() => std::iter::once(loop4).chain(v4s()).collect(),
        IpAddr::V6(a) if a.is_unspecified() => {
            // A dual-stack `::` listener takes IPv4 too (the Linux default).
            [loop4, host(IpAddr::V6(Ipv6Addr::LOCALHOST))]
                .into_iter()
                .chain(v4s())
                .chain(v6s())
                .collect()
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => vec![host(IpAddr::V4(v4))],
            None => vec![host(IpAddr::V6(a))],
        },
        a => vec![host(a)],
    }
}

/// The concrete rules for the identity-destination rules of `policy`: one per (listener,
/// prefix) of the destination identity that the entry's protocol and ports admit. `listeners`
/// holds (identity number, listener). They come after the policy's own rules (which keep
/// their indices, the rule ids) and name their origin in `text`.
pub fn listener_rules(
    policy: &Policy,
    listeners: &BTreeSet<(u32, Listener)>,
    local: &[IpAddr],
) -> Vec<Rule> {
    let mut out = Vec::new();
    for r in policy.rules.iter().filter(|r| r.to_ident != 0) {
        for (_, l) in listeners.iter().filter(|(id, _)| *id == r.to_ident) {
            let proto_ok = match r.protocol {
                Protocol::Any => true,
                Protocol::Tcp => l.tcp,
                Protocol::Udp => !l.tcp,
            };
            let port_ok =
                r.ports.is_empty() || r.ports.iter().any(|&(a, b)| (a..=b).contains(&l.port));
            if !(proto_ok && port_ok) {
                continue;
            }
            for cidr in reachable(l, local) {
                out.push(Rule {
                    ident: r.ident,
                    deny: r.deny,
                    cidr,
                    to_ident: 0,
                    ports: vec![(l.port, l.port)],
                    protocol: if l.tcp { Protocol::Tcp } else { Protocol::Udp },
                    line: r.line,
                    text: format!(
                        "{} (listener {} {}:{})",
                        r.text,
                        if l.tcp { "tcp" } else { "udp" },
                        l.addr,
                        l.port
                    ),
                    timing: r.timing.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::check;

    const P: &str = "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nidentities:\n  - name: api\n    match:\n      - binarySha256: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]\n  - name: db\n    match:\n      - binarySha256: [bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb]\nrules:\n  - identity: api\n    egress:\n      - to: {identity: db, protocol: tcp}\n";

    #[test]
    fn expands_listeners_of_the_destination_identity_only() {
        let (p, _) = check(P).unwrap_or_else(|d| panic!("{d:?}"));
        let mut ls = BTreeSet::new();
        let db = Listener {
            tcp: true,
            addr: "127.0.0.1".parse().expect("ip"),
            port: 5432,
        };
        ls.insert((2, db));
        ls.insert((
            2,
            Listener {
                tcp: false,
                addr: "127.0.0.1".parse().expect("ip"),
                port: 53,
            },
        ));
        ls.insert((
            1,
            Listener {
                tcp: true,
                addr: "127.0.0.1".parse().expect("ip"),
                port: 80,
            },
        ));
        let extra = listener_rules(&p, &ls, &[]);
        assert_eq!(extra.len(), 1, "{extra:?}");
        assert_eq!(extra[0].ident, 1);
        assert_eq!(extra[0].cidr.to_string(), "127.0.0.1/32");
        assert_eq!(extra[0].ports, vec![(5432, 5432)]);
        assert!(extra[0].text.contains("identity db") && extra[0].text.contains("5432"));
        // nothing listens: nothing allowed
        assert!(listener_rules(&p, &BTreeSet::new(), &[]).is_empty());
    }

    #[test]
    fn wildcard_listeners_reach_local_addresses() {
        let l = Listener {
            tcp: true,
            addr: "::".parse().expect("ip"),
            port: 1,
        };
        let local: Vec<IpAddr> = vec![
            "10.1.2.3".parse().expect("ip"),
            "fe80::1".parse().expect("ip"),
        ];
        let r: Vec<String> = reachable(&l, &local)
            .iter()
            .map(|n| n.to_string())
            .collect();
        for want in ["127.0.0.0/8", "::1/128", "10.1.2.3/32", "fe80::1/128"] {
            assert!(r.contains(&want.to_string()), "{want} missing in {r:?}");
        }
        let mapped = Listener {
            tcp: true,
            addr: "::ffff:127.0.0.2".parse().expect("ip"),
            port: 1,
        };
        assert_eq!(reachable(&mapped, &local)[0].to_string(), "127.0.0.2/32");
    }

    #[test]
    fn own_listeners_are_found() {
        let sock = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = sock.local_addr().expect("addr").port();
        let ls = process_listeners(std::process::id());
        assert!(ls.iter().any(|l| l.tcp && l.port == port), "{ls:?}");
    }
}
