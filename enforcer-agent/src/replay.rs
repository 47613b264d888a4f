//! `policy diff` (and `policy apply --dry-run`): the recorded connects ([`crate::record`])
//! judged under the policy in force and under a candidate, with the pure model of the
//! kernel's decision: the scope, the identity from the process's facts
//! ([`crate::policy::resolve`]), the `unattested` action, the compiled rule entries and the
//! kernel's own lookup ([`crate::policy::kernel_verdict`]), then the mode.
//!
//! `to: {identity: X}` destinations depend on where processes of X listen: they are judged
//! against the listeners open now (the caller passes the rules made of them), which the
//! report says. Facts the record does not keep (a process withheld for its loader
//! environment, tampered with or pending at the time) are replayed as an attested process
//! with the same executable and cgroup.

use std::{collections::BTreeMap, net::IpAddr};

use enforcer_common::{PROTO_TCP, PROTO_UDP, Verdict};

use crate::{
    api,
    policy::{self, Action, CgroupFacts, Mode, Policy, PolicyError, ProcessFacts, Rule},
    record::{Key, ProcFacts, Seen},
};

/// A policy ready to judge connects: its compiled rule entries (generation 0).
pub struct Model<'a> {
    pub policy: &'a Policy,
    extra: &'a [Rule],
    entries: Vec<(enforcer_common::RuleKey, enforcer_common::RuleValue)>,
}

/// What the model decides for one connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    /// The effective verdict: `Audit` is a would-be deny let through (audit mode or
    /// `unattested: audit`).
    pub verdict: Verdict,
    /// SPIFFE ID, or none (unattested).
    pub identity: Option<String>,
    pub rule: String,
}

impl<'a> Model<'a> {
    /// `extra`: the concrete rules of `to: {identity}` destinations (listeners open now).
    pub fn new(policy: &'a Policy, extra: &'a [Rule], limit: usize) -> Result<Self, PolicyError> {
        let entries =
            policy::rule_entries_of(&policy.rules, extra, 0, limit, policy::Clock::now())?;
        Ok(Model {
            policy,
            extra,
            entries,
        })
    }

    fn rule_text(&self, i: u32) -> String {
        let i = i as usize;
        self.policy
            .rules
            .get(i)
            .or_else(|| self.extra.get(i.wrapping_sub(self.policy.rules.len())))
            .map_or_else(|| format!("rule {i}"), |r| r.text.clone())
    }

    /// The decision for a process with `facts` connecting to `dst:port` over `protocol`.
    pub fn judge(&self, facts: &ProcFacts, dst: IpAddr, port: u16, protocol: &str) -> Judged {
        let p = self.policy;
        if !crate::learn::in_scope(&p.scope, &facts.cgroup) {
            return Judged {
                verdict: Verdict::Allow,
                identity: None,
                rule: format!("outside the enforced scope ({})", p.scope.join(", ")),
            };
        }
        let sha: Option<[u8; 32]> = hex::decode(&facts.sha256)
            .ok()
            .and_then(|v| v.try_into().ok());
        let pod = facts.pod.as_ref().map(crate::record::Pod::to_meta);
        let r = policy::resolve(
            p,
            &ProcessFacts {
                sha256: sha.as_ref(),
                exe_path: (!facts.exe.is_empty()).then_some(facts.exe.as_str()),
                cgroup: Some(CgroupFacts {
                    path: &facts.cgroup,
                    pod: pod.as_ref(),
                }),
                uid: facts.uid,
            },
        );
        let (verdict, identity, rule) = if r.ident == 0 {
            let v = match p.unattested {
                Action::Allow => Verdict::Allow,
                Action::Audit => Verdict::Audit,
                Action::Deny => Verdict::Deny,
            };
            (v, None, "unattested".to_string())
        } else {
            let identity = p
                .identities
                .get(r.ident as usize - 1)
                .map(|i| i.spiffe_id.clone());
            let proto = if protocol == "udp" {
                PROTO_UDP
            } else {
                PROTO_TCP
            };
            match policy::kernel_verdict(&self.entries, 0, r.ident, proto, dst, port) {
                Some(v) => (
                    Verdict::from_raw(v.verdict),
                    identity,
                    self.rule_text(v.rule),
                ),
                None => (
                    Verdict::Deny,
                    identity,
                    "default deny (no egress entry matches)".to_string(),
                ),
            }
        };
        let verdict = match (verdict, p.mode) {
            (Verdict::Deny, Mode::Audit) => Verdict::Audit,
            (v, _) => v,
        };
        Judged {
            verdict,
            identity,
            rule,
        }
    }
}

/// The diff of `old` (in force) and `new` (candidate) over the recorded `entries`.
pub fn diff(old: &Model<'_>, new: &Model<'_>, entries: &[(Key, Seen)]) -> api::DiffReport {
    type GroupKey = (Option<String>, String, u32, String);
    let mut denied: BTreeMap<GroupKey, api::DiffGroup> = BTreeMap::new();
    let mut allowed: BTreeMap<GroupKey, api::DiffGroup> = BTreeMap::new();
    let mut connects = 0u64;
    for (k, s) in entries {
        connects = connects.saturating_add(s.count);
        let a = old.judge(&k.facts, k.dst, k.port, &k.protocol);
        let b = new.judge(&k.facts, k.dst, k.port, &k.protocol);
        let into = match (a.verdict, b.verdict) {
            (x, Verdict::Deny) if x != Verdict::Deny => &mut denied,
            (Verdict::Deny, y) if y != Verdict::Deny => &mut allowed,
            _ => continue,
        };
        let key = (
            b.identity.clone(),
            k.dst.to_string(),
            u32::from(k.port),
            k.protocol.clone(),
        );
        let g = into.entry(key).or_insert_with(|| api::DiffGroup {
            identity: b.identity.clone(),
            dst: k.dst.to_string(),
            port: u32::from(k.port),
            protocol: k.protocol.clone(),
            connects: 0,
            processes: Vec::new(),
            rule_in_force: a.rule.clone(),
            rule_candidate: b.rule.clone(),
            last_seen: 0,
        });
        g.connects = g.connects.saturating_add(s.count);
        g.last_seen = g.last_seen.max(s.last_seen);
        let who = format!("{} in {}", k.facts.exe, k.facts.cgroup);
        if !g.processes.contains(&who) {
            g.processes.push(who);
            g.processes.sort();
        }
    }
    let mut notes = Vec::new();
    let to_ident: Vec<&str> = new
        .policy
        .rules
        .iter()
        .filter(|r| r.to_ident != 0)
        .filter_map(|r| new.policy.identities.get(r.ident as usize - 1))
        .map(|i| i.name.as_str())
        .collect();
    if !to_ident.is_empty() {
        let mut names = to_ident;
        names.sort_unstable();
        names.dedup();
        notes.push(format!(
            "`to: {{identity: ...}}` destinations of {} are judged against the listeners open now, not those open when the connects were made",
            names.join(", ")
        ));
    }
    if new.policy.scope != old.policy.scope {
        notes.push(format!(
            "the candidate's scope ({}) differs from the one in force ({}): connects outside the scope in force were never reported, so what the candidate denies there cannot be replayed",
            new.policy.scope.join(", "),
            old.policy.scope.join(", ")
        ));
    }
    notes.push(
        "replayed from the decision record: allowed connects are recorded only while allow reports are on (`reportAllow: true`, audit mode, `events --follow --all` or `learn --for`)".to_string(),
    );
    api::DiffReport {
        newly_denied: denied.into_values().collect(),
        newly_allowed: allowed.into_values().collect(),
        entries: entries.len() as u64,
        connects,
        notes,
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        crate::policy::check(yaml)
            .unwrap_or_else(|d| panic!("{d:?}"))
            .0
    }

    fn key(sha: char, cgroup: &str, dst: &str, port: u16, proto: &str) -> (Key, Seen) {
        (
            Key {
                facts: ProcFacts {
                    sha256: sha.to_string().repeat(64),
                    exe: "/bin/app".into(),
                    cgroup: cgroup.into(),
                    uid: 0,
                    pod: None,
                },
                dst: dst.parse().expect("addr"),
                port,
                protocol: proto.into(),
            },
            Seen {
                count: 2,
                first_seen: 1,
                last_seen: 5,
                verdict: "allow".into(),
                identity: None,
            },
        )
    }

    #[test]
    fn newly_denied_and_allowed_grouped_with_counts() {
        let head = "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nunattested: deny\nscope: [\"/w\"]\nidentities:\n  - name: app\n    match:\n      - binarySha256: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]\nrules:\n  - identity: app\n    egress:\n";
        let old = policy(&format!(
            "{head}      - to: {{cidr: 127.0.0.1/32, ports: [80, 81], protocol: tcp}}\n"
        ));
        let new = policy(&format!(
            "{head}      - to: {{cidr: 127.0.0.1/32, ports: [80], protocol: tcp}}\n      - to: {{cidr: \"::1\", ports: [53], protocol: udp}}\n"
        ));
        let entries = vec![
            key('a', "/w/x", "127.0.0.1", 80, "tcp"),
            key('a', "/w/x", "127.0.0.1", 81, "tcp"),
            key('a', "/w/y", "127.0.0.1", 81, "tcp"),
            key('a', "/w/x", "::1", 53, "udp"),
            key('b', "/w/x", "127.0.0.1", 80, "tcp"),
            key('b', "/out", "127.0.0.1", 80, "tcp"),
        ];
        let (mo, mn) = (
            Model::new(&old, &[], 1000).expect("old"),
            Model::new(&new, &[], 1000).expect("new"),
        );
        let r = diff(&mo, &mn, &entries);
        assert_eq!(r.entries, 6);
        assert_eq!(r.connects, 12);
        assert_eq!(r.newly_denied.len(), 1, "{r:?}");
        let d = &r.newly_denied[0];
        assert_eq!(d.identity.as_deref(), Some("spiffe://t.org/app"));
        assert_eq!(
            (d.dst.as_str(), d.port, d.protocol.as_str()),
            ("127.0.0.1", 81, "tcp")
        );
        assert_eq!(d.connects, 4);
        assert_eq!(d.processes, ["/bin/app in /w/x", "/bin/app in /w/y"]);
        assert!(d.rule_candidate.contains("default deny"), "{d:?}");
        assert_eq!(r.newly_allowed.len(), 1);
        assert_eq!(r.newly_allowed[0].port, 53);
        // The same policy: nothing changes; audit mode denies nothing.
        assert!(diff(&mo, &mo, &entries).newly_denied.is_empty());
        let audit = policy(&format!(
            "{}      - to: {{cidr: 127.0.0.1/32, ports: [80], protocol: tcp}}\n",
            head.replace("unattested: deny", "mode: audit\nunattested: deny")
        ));
        let ma = Model::new(&audit, &[], 1000).expect("audit");
        assert!(diff(&mo, &ma, &entries).newly_denied.is_empty());
        assert_eq!(
            ma.judge(&entries[4].0.facts, entries[4].0.dst, 80, "tcp")
                .verdict,
            Verdict::Audit
        );
        // Outside the scope: allowed, whatever the rules.
        assert_eq!(
            mn.judge(&entries[5].0.facts, entries[5].0.dst, 80, "tcp")
                .verdict,
            Verdict::Allow
        );
    }
}
