//! Grants: time-bound exceptions added from the command line (`enforcer-agent grant`), the
//! break-glass case. A grant is an egress entry of one identity with an `expires` instant; the
//! agent adds the grants in force to the policy it applies, so the kernel holds them like any
//! time-bound entry and stops honouring each at its instant by itself, agent or not.
//!
//! Grants live in the agent's state folder (`grants.json`, written atomically at each change),
//! so they survive a restart; one that expired while the agent was down is reported and
//! dropped at start. A policy apply keeps them unless the new policy says otherwise: a grant
//! whose identity the new policy no longer has is dropped, and one longer than the new
//! `maxGrant` is cut to it (both reported).

use std::{
    fs,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::{self, Policy, Protocol, Rule, Timing};

/// Format version of `grants.json`.
const FILE_VERSION: u32 = 1;

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: u64,
    /// The identity's `name` in the policy.
    pub identity: String,
    pub cidr: IpNet,
    /// Inclusive port ranges; empty = every port.
    pub ports: Vec<(u16, u16)>,
    /// `tcp`, `udp` or `any`.
    pub protocol: String,
    pub reason: String,
    /// Who asked (as the command line reported it: user and uid).
    pub by: String,
    /// Unix ns.
    pub granted_at: i64,
    /// Unix ns.
    pub expires: i64,
}

impl Grant {
    fn protocol(&self) -> Protocol {
        match self.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => Protocol::Any,
        }
    }

    /// `tcp 10.0.0.7/32 ports 22` as in rule texts.
    pub fn destination(&self) -> String {
        let mut s = format!("{} {}", self.protocol, self.cidr);
        if !self.ports.is_empty() {
            s.push_str(&format!(" ports {}", policy::format_ports(&self.ports)));
        }
        s
    }

    /// The policy rule this grant adds for identity number `ident`.
    pub fn rule(&self, ident: u32) -> Rule {
        Rule {
            ident,
            deny: false,
            cidr: self.cidr,
            to_ident: 0,
            ports: self.ports.clone(),
            protocol: self.protocol(),
            line: 0,
            text: format!(
                "grant {} ({}): {} egress: {} until {}",
                self.id,
                self.reason,
                self.identity,
                self.destination(),
                policy::rfc3339(self.expires)
            ),
            timing: Timing {
                not_before: None,
                expires: Some(self.expires),
                reason: Some(self.reason.clone()),
                grant: Some(self.id),
            },
        }
    }
}

/// What a `grant` asks for.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub identity: String,
    /// `ADDR[/LEN][:PORTS]` (IPv6 in brackets when ports follow: `[::1]:53`).
    pub to: String,
    /// `tcp`, `udp` or empty (any).
    pub protocol: String,
    /// `30m`, `4h`, `1h30m`...
    pub duration: String,
    pub reason: String,
    pub by: String,
}

/// Errors of grants, one clear sentence each.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("the policy in force has no identity {name:?} ({known}); name one of its identities")]
    UnknownIdentity { name: String, known: String },
    #[error(
        "--to {0:?} is not ADDR[/LEN][:PORTS]; write e.g. 10.0.0.7:22, 10.20.0.0/16:5432,8000-8100 or [::1]:53"
    )]
    BadDestination(String),
    #[error("--protocol {0:?} must be tcp or udp (or left out for both)")]
    BadProtocol(String),
    #[error("--for {given:?}: {why}; write e.g. 30m or 4h")]
    BadDuration { given: String, why: String },
    #[error(
        "--for {given} is longer than the policy's maxGrant ({max}); ask for at most {max}, or raise `maxGrant:` in the policy"
    )]
    TooLong { given: String, max: String },
    #[error("--reason is empty; say why (an incident or ticket), it is shown in status and events")]
    NoReason,
    #[error("no grant {0} is in force (see `enforcer-agent grants`)")]
    NoSuchGrant(u64),
    #[error("writing the grants to {path}: {err}; the grant was not made")]
    Save { path: String, err: std::io::Error },
}

/// `3600` -> `1h`, `5400` -> `1h30m`, `90` -> `1m30s`.
pub fn format_secs(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// Parses `ADDR[/LEN][:PORTS]`: the destination prefix (a bare address is a host; an
/// IPv4-mapped IPv6 prefix is the IPv4 one it carries) and its port ranges.
pub fn parse_destination(to: &str) -> Result<(IpNet, Vec<(u16, u16)>), GrantError> {
    let bad = || GrantError::BadDestination(to.to_string());
    let to = to.trim();
    let (net, ports) = if let Some(rest) = to.strip_prefix('[') {
        let (net, after) = rest.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (net, None),
            _ => (net, Some(after.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else if to.matches(':').count() > 1 {
        (to, None)
    } else {
        match to.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (to, None),
        }
    };
    let net: IpNet = match net.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => IpNet::from(net.parse::<IpAddr>().map_err(|_| bad())?),
    };
    let net = match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .map_err(|_| bad())?,
            None => IpNet::V6(v6),
        },
        n => n,
    }
    .trunc();
    let mut ranges = Vec::new();
    if let Some(p) = ports {
        for part in p.split(',') {
            let part = part.trim();
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let a: u16 = a.trim().parse().map_err(|_| bad())?;
            let b: u16 = b.trim().parse().map_err(|_| bad())?;
            if a == 0 || b < a {
                return Err(bad());
            }
            ranges.push((a, b));
        }
        if ranges.is_empty() {
            return Err(bad());
        }
    }
    Ok((net, ranges))
}

#[derive(Serialize, Deserialize)]
struct GrantsFile {
    version: u32,
    next_id: u64,
    grants: Vec<Grant>,
}

/// The grants in force, kept in `grants.json` of the state folder.
#[derive(Debug, Clone)]
pub struct Grants {
    path: Option<PathBuf>,
    next_id: u64,
    list: Vec<Grant>,
}

impl Grants {
    /// Grants kept nowhere (tests, `--state-dir` unset).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            next_id: 1,
            list: Vec::new(),
        }
    }

    /// The grants saved in `path` (none when it does not exist). A file that cannot be read
    /// is moved aside (`.unreadable`) and reported: its grants are lost, which only narrows
    /// access, never widens it.
    pub fn open(path: &Path) -> Self {
        let mut g = Self {
            path: Some(path.to_path_buf()),
            ..Self::in_memory()
        };
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return g,
            Err(e) => {
                tracing::error!(path = %path.display(), "reading the grants: {e}; starting with none");
                return g;
            }
        };
        match serde_json::from_slice::<GrantsFile>(&bytes) {
            Ok(f) if f.version == FILE_VERSION => {
                g.next_id = f.next_id.max(1);
                g.list = f.grants;
            }
            Ok(f) => tracing::error!(
                path = %path.display(),
                version = f.version,
                "the grants file has an unknown version; starting with no grants (the file is kept)"
            ),
            Err(e) => {
                let aside = path.with_extension("json.unreadable");
                let _ = fs::rename(path, &aside);
                tracing::error!(
                    path = %path.display(),
                    moved_to = %aside.display(),
                    "the grants file does not parse ({e}); starting with no grants"
                );
            }
        }
        g
    }

    /// Writes the grants to their file; a failure is logged (the grants in force stay).
    pub fn persist(&self) {
        if let Err(e) = self.save() {
            tracing::error!("{e}");
        }
    }

    fn save(&self) -> Result<(), GrantError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |err| GrantError::Save {
            path: path.display().to_string(),
            err,
        };
        let body = serde_json::to_vec_pretty(&GrantsFile {
            version: FILE_VERSION,
            next_id: self.next_id,
            grants: self.list.clone(),
        })
        .map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(&body).map_err(err)?;
        f.sync_all().map_err(err)?;
        fs::rename(&tmp, path).map_err(err)?;
        Ok(())
    }

    /// The grants, oldest first.
    pub fn list(&self) -> &[Grant] {
        &self.list
    }

    /// Adds a grant to `policy` (the policy in force, without grants) at wall-clock `now`
    /// (Unix ns). Saved before it is returned; the caller applies it.
    pub fn add(
        &mut self,
        req: &GrantRequest,
        policy: &Policy,
        now: i64,
    ) -> Result<Grant, GrantError> {
        if !policy.identities.iter().any(|i| i.name == req.identity) {
            let mut known: Vec<&str> = policy.identities.iter().map(|i| i.name.as_str()).collect();
            known.sort_unstable();
            return Err(GrantError::UnknownIdentity {
                name: req.identity.clone(),
                known: if known.is_empty() {
                    "it has none".into()
                } else {
                    format!("it has: {}", known.join(", "))
                },
            });
        }
        let (cidr, ports) = parse_destination(&req.to)?;
        let protocol = match req.protocol.as_str() {
            "" | "any" => "any",
            "tcp" => "tcp",
            "udp" => "udp",
            p => return Err(GrantError::BadProtocol(p.to_string())),
        };
        let secs =
            policy::parse_duration_secs(&req.duration).map_err(|why| GrantError::BadDuration {
                given: req.duration.clone(),
                why,
            })?;
        if secs > policy.max_grant_secs {
            return Err(GrantError::TooLong {
                given: format_secs(secs),
                max: format_secs(policy.max_grant_secs),
            });
        }
        if req.reason.trim().is_empty() {
            return Err(GrantError::NoReason);
        }
        let grant = Grant {
            id: self.next_id,
            identity: req.identity.clone(),
            cidr,
            ports,
            protocol: protocol.to_string(),
            reason: req.reason.trim().to_string(),
            by: req.by.clone(),
            granted_at: now,
            expires: now.saturating_add(
                i64::try_from(secs)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1_000_000_000),
            ),
        };
        self.next_id += 1;
        self.list.push(grant.clone());
        if let Err(e) = self.save() {
            self.list.pop();
            return Err(e);
        }
        Ok(grant)
    }

    /// Takes a grant back (the caller undoes an `add` whose apply failed, or revokes).
    pub fn remove(&mut self, id: u64) -> Result<Grant, GrantError> {
        let i = self
            .list
            .iter()
            .position(|g| g.id == id)
            .ok_or(GrantError::NoSuchGrant(id))?;
        let g = self.list.remove(i);
        if let Err(e) = self.save() {
            tracing::error!("{e}");
        }
        Ok(g)
    }

    /// Puts back a grant taken by [`Grants::remove`] (a revoke whose apply failed).
    pub fn restore(&mut self, g: Grant) {
        self.list.push(g);
        self.list.sort_by_key(|g| g.id);
        self.persist();
    }

    /// Removes and returns the grants over at `now` (Unix ns).
    pub fn expire(&mut self, now: i64) -> Vec<Grant> {
        let (over, keep): (Vec<Grant>, Vec<Grant>) =
            self.list.drain(..).partition(|g| g.expires <= now);
        self.list = keep;
        if !over.is_empty()
            && let Err(e) = self.save()
        {
            tracing::error!("{e}");
        }
        over
    }

    /// The rules the grants add to `policy`, after fitting the grants to it: a grant whose
    /// identity the policy does not have is dropped, one longer than its `maxGrant` is cut.
    /// Returns the rules and what changed (grant, what was done); not saved: the caller
    /// [`Grants::persist`]s once the policy is in force.
    pub fn fit(&mut self, policy: &Policy) -> (Vec<Rule>, Vec<(Grant, String)>) {
        let mut changed = Vec::new();
        let mut rules = Vec::new();
        let max_ns = i64::try_from(policy.max_grant_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000_000);
        let mut keep = Vec::with_capacity(self.list.len());
        for mut g in self.list.drain(..) {
            let Some(i) = policy.identities.iter().position(|i| i.name == g.identity) else {
                changed.push((
                    g.clone(),
                    format!(
                        "dropped: the policy applied has no identity {:?}",
                        g.identity
                    ),
                ));
                continue;
            };
            let cap = g.granted_at.saturating_add(max_ns);
            if g.expires > cap {
                g.expires = cap;
                changed.push((
                    g.clone(),
                    format!(
                        "cut to the policy's maxGrant ({}): now expires {}",
                        format_secs(policy.max_grant_secs),
                        policy::rfc3339(cap)
                    ),
                ));
            }
            rules.push(g.rule(u32::try_from(i + 1).unwrap_or(u32::MAX)));
            keep.push(g);
        }
        self.list = keep;
        (rules, changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: &str) -> Policy {
        let src = format!(
            "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.example\nmaxGrant: {max}\nidentities:\n  - name: api\n    match: [{{uid: [1000]}}]\n"
        );
        match policy::check(&src) {
            Ok((p, _)) => p,
            Err(d) => panic!("{d:?}"),
        }
    }

    fn req(to: &str, dur: &str) -> GrantRequest {
        GrantRequest {
            identity: "api".into(),
            to: to.into(),
            protocol: "tcp".into(),
            duration: dur.into(),
            reason: "INC-1".into(),
            by: "root (uid 0)".into(),
        }
    }

    #[test]
    fn destinations_parse() {
        let p = |s: &str| parse_destination(s).map(|(n, p)| (n.to_string(), p));
        assert_eq!(
            p("10.0.0.7:22").ok(),
            Some(("10.0.0.7/32".into(), vec![(22, 22)]))
        );
        assert_eq!(
            p("10.20.0.9/16:5432,8000-8100").ok(),
            Some(("10.20.0.0/16".into(), vec![(5432, 5432), (8000, 8100)]))
        );
        assert_eq!(p("[::1]:53").ok(), Some(("::1/128".into(), vec![(53, 53)])));
        assert_eq!(p("fd00::/64").ok(), Some(("fd00::/64".into(), vec![])));
        assert_eq!(
            p("[::ffff:10.0.0.1]:80").ok(),
            Some(("10.0.0.1/32".into(), vec![(80, 80)]))
        );
        for bad in [
            "",
            "10.0.0.1:0",
            "10.0.0.1:9-8",
            "x:1",
            "[::1",
            "10.0.0.1:",
            "10.0.0.1/33",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_grant_is_bounded_by_max_grant_and_kept_in_the_state_folder() {
        let dir = std::env::temp_dir().join(format!("enf-grants-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join("grants.json");
        let p = policy("2h");
        let mut g = Grants::open(&file);
        assert!(matches!(
            g.add(&req("10.0.0.7:22", "3h"), &p, 0),
            Err(GrantError::TooLong { .. })
        ));
        assert!(matches!(
            g.add(
                &GrantRequest {
                    identity: "nope".into(),
                    ..req("10.0.0.7:22", "1h")
                },
                &p,
                0
            ),
            Err(GrantError::UnknownIdentity { .. })
        ));
        assert!(matches!(
            g.add(
                &GrantRequest {
                    reason: " ".into(),
                    ..req("10.0.0.7:22", "1h")
                },
                &p,
                0
            ),
            Err(GrantError::NoReason)
        ));
        let a = g.add(&req("10.0.0.7:22", "90m"), &p, 1_000).expect("grant");
        assert_eq!(a.id, 1);
        assert_eq!(a.expires, 1_000 + 5_400 * 1_000_000_000);
        // Survives a restart.
        let mut again = Grants::open(&file);
        assert_eq!(again.list(), std::slice::from_ref(&a));
        // A policy with a shorter maxGrant cuts it; one without the identity drops it.
        let (rules, changed) = again.fit(&policy("1h"));
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].timing.expires, Some(1_000 + 3_600 * 1_000_000_000));
        assert_eq!(changed.len(), 1);
        let mut other = policy("1h");
        other.identities[0].name = "other".into();
        let (rules, changed) = again.fit(&other);
        assert!(rules.is_empty() && changed.len() == 1);
        assert_eq!(
            Grants::open(&file).list().len(),
            1,
            "saved only when persisted"
        );
        again.persist();
        assert!(Grants::open(&file).list().is_empty());
        // Expiry removes what is over.
        let b = again.add(&req("[::1]:53", "1m"), &p, 0).expect("grant");
        assert_eq!(b.id, 2);
        assert!(again.expire(59_999_999_999).is_empty());
        assert_eq!(again.expire(60_000_000_000), vec![b]);
        // An unreadable file is moved aside, never trusted.
        fs::write(&file, b"{not json").expect("write");
        assert!(Grants::open(&file).list().is_empty());
        assert!(dir.join("grants.json.unreadable").exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
