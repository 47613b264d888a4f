//! Policy parsing, checking and compiling.
//!
//! - [`check`] parses a YAML policy (SPEC "Policy file (YAML, version 1)") into a [`Policy`],
//!   reporting every problem as a [`Diagnostic`] with its line and column.
//! - [`encode_bundle`] / [`decode_bundle`] / [`load`]: the compiled protobuf bundle.
//! - [`resolve`] and [`Classes`]: which identity a process gets (pure, and as kernel classes).
//! - [`rule_entries`] / [`kernel_verdict`]: the entries of `ENF_HOSTS` + `ENF_RULES` and the kernel's lookup.
//!
//! Extensions of the SPEC format, all optional:
//! - `reportAllow: true|false` (top level, default `false`): report allowed decisions too.
//! - `revokeConnections: true|false` (top level, default `true`; SPEC "Time-bound entries and
//!   grants"): close live connections that lose their allow ([`crate::revoke`]).
//! - `mode` defaults to `enforce` and `unattested` to `allow` when absent.
//! - `cgroup` globs: `*` matches within one path segment, `**` (a whole segment) matches any
//!   number of segments, zero included, so `/kubepods.slice/**` matches `/kubepods.slice`
//!   itself and everything below it. No other character is special.
//! - `k8s.podLabels` keys are exact label keys; their values are globs like the other `k8s`
//!   selectors (`*` matches any characters, `""` only the empty value), and every pair of an
//!   entry must hold.
//! - `sockets: [raw, icmp, sctp, udplite, other]` on an identity: socket kinds the connect
//!   hooks never judge that it may still create (refused at creation otherwise).
//! - `preload: [HEX...]` on a match entry (the SPEC's modifier): it selects nothing; the
//!   sha256 of objects `LD_PRELOAD` may load into a process the entry holds for
//!   ([`crate::preload`]). An entry needs a selector besides it.
//! - A `cidr` may be a bare address (a host, `/32` or `/128`); an IPv4-mapped IPv6 CIDR
//!   (`::ffff:a.b.c.d/n`, n >= 96) is stored as the IPv4 CIDR it carries.

mod bundle;
mod cgroup_attr;
mod check;
mod compile;
mod glob;
mod resolve;
mod yaml;

pub use bundle::{BUNDLE_FORMAT, decode_bundle, encode_bundle, is_bundle, load, policy_hash};
pub use cgroup_attr::{CgroupAttr, CgroupFacts, systemd_unit};
pub(crate) use check::format_ports;
pub use check::{check, check_at, parse_duration_secs};
pub use compile::{
    Clock, kernel_verdict, kernel_verdict_at, rule_entries, rule_entries_of, socket_entries,
};
pub use glob::cgroup_glob_match;
pub use resolve::{Classes, ProcessFacts, Resolution, preload_missing, resolve};

/// The embedded default policy: audit mode, no identities, every decision reported. It denies
/// nothing and shows what each process is and where it connects.
pub const DEFAULT_POLICY: &str = "\
# Embedded default policy of the enforcer agent: observe only.
apiVersion: enforcer/v1
kind: Policy
trustDomain: local.enforcer
mode: audit            # a would-be deny is allowed and reported
unattested: audit      # processes that match no identity are reported, never blocked
scope: [\"/\"]
reportAllow: true      # report allowed connects too
identities: []
rules: []
";

/// Severity of a [`Diagnostic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a policy source, with 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub col: usize,
    pub severity: Severity,
    pub message: String,
}

impl Diagnostic {
    /// `FILE:LINE:COL: error: message` (or `warning:`).
    pub fn render(&self, file: &str) -> String {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        format!("{file}:{}:{}: {sev}: {}", self.line, self.col, self.message)
    }
}

/// `mode:` of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

/// `unattested:` of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Audit,
    Deny,
}

/// `protocol:` of an egress or deny entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

impl Protocol {
    /// The lower-case name used in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        }
    }
}

/// A checked policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub trust_domain: String,
    pub mode: Mode,
    pub unattested: Action,
    /// cgroup v2 paths relative to the cgroup2 root, each starting with "/" (default `["/"]`).
    pub scope: Vec<String>,
    /// Top-level `reportAllow: true|false` (default `false`), an extension of the SPEC format:
    /// when true, allowed decisions are reported as events too (the default policy does).
    pub report_allow: bool,
    /// Top-level `revokeConnections: true|false` (default `true`): live connections that a
    /// change of policy or identity no longer allows are closed ([`crate::revoke`]).
    pub revoke_connections: bool,
    /// The identity number of `identities[i]` is `i + 1` (0 = no identity).
    pub identities: Vec<Identity>,
    /// One per compiled egress/deny destination; the rule id is the index in this Vec.
    pub rules: Vec<Rule>,
    /// `maxGrant:` the longest `enforcer-agent grant` accepted, in seconds (default 1 h).
    pub max_grant_secs: u64,
}

/// `maxGrant` when the policy sets none.
pub const DEFAULT_MAX_GRANT_SECS: u64 = 3600;

/// One `identities` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub name: String,
    pub spiffe_id: String,
    /// Any entry matches (OR).
    pub matches: Vec<MatchEntry>,
    /// `sockets:` the socket kinds (bits [`enforcer_common::SocketKind::bit`]) the identity
    /// may create besides TCP, UDP and MPTCP; 0 = none (every other kind refused).
    pub sockets: u32,
}

/// One `match` entry: every selector that is non-empty must hold (AND).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MatchEntry {
    pub binary_sha256: Vec<[u8; 32]>,
    pub binary_path: Vec<String>,
    pub cgroup: Vec<String>,
    /// Globs on the systemd unit that owns the process's cgroup ([`systemd_unit`]).
    pub systemd_unit: Vec<String>,
    pub uid: Vec<u32>,
    /// `k8s.namespace`: globs on the namespace of the pod the cgroup belongs to.
    pub k8s_namespace: Vec<String>,
    /// `k8s.serviceAccount`: globs on the pod's service account.
    pub k8s_service_account: Vec<String>,
    /// `k8s.podLabels`: `KEY=GLOB` pairs (exact label key, glob on its value), all of which
    /// must hold.
    pub k8s_pod_labels: Vec<String>,
    /// `k8s.container`: globs on the container's name in the pod spec.
    pub k8s_container: Vec<String>,
    /// `preload:` (a modifier, not a selector): sha256 of objects `LD_PRELOAD` may load into
    /// a process this entry holds for without withholding its identity ([`crate::preload`]).
    pub preload: Vec<[u8; 32]>,
}

/// True when some identity of `policy` has a `preload:` list (the kernel then holds execs
/// that name `LD_PRELOAD`, `GenConfig::preload_hold`).
pub fn has_preload(policy: &Policy) -> bool {
    policy
        .identities
        .iter()
        .any(|i| i.matches.iter().any(|m| !m.preload.is_empty()))
}

/// The SPIFFE ID of an identity that sets no `spiffeId`: SPIRE's Kubernetes shape
/// `spiffe://TD/ns/NS/sa/SA` when every entry with `k8s` selectors pins the same single
/// namespace and single service account (no glob), else `spiffe://TD/NAME`.
pub fn default_spiffe_id(trust_domain: &str, name: &str, matches: &[MatchEntry]) -> String {
    let pinned = |e: &MatchEntry| match (&e.k8s_namespace[..], &e.k8s_service_account[..]) {
        ([ns], [sa]) if !ns.contains('*') && !sa.contains('*') => Some((ns.clone(), sa.clone())),
        _ => None,
    };
    let mut k8s = matches.iter().filter(|e| {
        CgroupAttr::ALL
            .iter()
            .any(|a| a.is_k8s() && !a.globs(e).is_empty())
    });
    let first = k8s.next().and_then(pinned);
    match first {
        Some(pair) if k8s.all(|e| pinned(e).as_ref() == Some(&pair)) => {
            format!("spiffe://{trust_domain}/ns/{}/sa/{}", pair.0, pair.1)
        }
        _ => format!("spiffe://{trust_domain}/{name}"),
    }
}

/// One compiled egress or deny destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Identity number (index into `identities` + 1).
    pub ident: u32,
    pub deny: bool,
    /// Destination prefix; unused when `to_ident` is set.
    pub cidr: ipnet::IpNet,
    /// `to: {identity: X}`: identity number of X (0 = a `cidr` destination). The agent turns
    /// these into concrete rules for the addresses and ports where processes of X listen.
    pub to_ident: u32,
    /// Inclusive port ranges; empty = all ports.
    pub ports: Vec<(u16, u16)>,
    pub protocol: Protocol,
    /// Line of the entry in the YAML source (0 when unknown).
    pub line: usize,
    /// Short human description, e.g. `payments-api egress[0]: tcp 10.20.0.0/16 ports 5432,8000-8100`.
    pub text: String,
    /// When the entry holds (`notBefore:` / `expires:`), and why (`reason:`, grants).
    pub timing: Timing,
}

/// The window of a time-bound entry (`expires:`, `notBefore:`, or a grant), as wall-clock
/// instants (Unix ns, UTC). The agent maps them to the kernel boot clock when it writes the
/// maps ([`Timing::boot_window`]); the kernel itself stops honouring the entry at `expires`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Timing {
    pub not_before: Option<i64>,
    pub expires: Option<i64>,
    /// `reason:` of the entry or of the grant.
    pub reason: Option<String>,
    /// The grant this entry came from (`enforcer-agent grant`), if any.
    pub grant: Option<u64>,
}

impl Timing {
    /// True when the entry holds only inside a window.
    pub fn is_timed(&self) -> bool {
        self.not_before.is_some() || self.expires.is_some()
    }

    /// True when the entry can never hold again at `now` (Unix ns).
    pub fn is_over(&self, now: i64) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// True when the entry holds at `now` (Unix ns).
    pub fn holds_at(&self, now: i64) -> bool {
        self.not_before.is_none_or(|b| b <= now) && !self.is_over(now)
    }

    /// The window on the kernel boot clock, `(not_before_ns, expires_ns)` with 0 for "no
    /// bound" (the [`enforcer_common::RuleValue`] encoding), given one reading of both clocks
    /// (`wall_ns` Unix ns and `boot_ns` taken together). An instant already past maps to 1
    /// (expired: boot ns 1 is always past), never to 0 (which would mean "no bound").
    pub fn boot_window(&self, wall_ns: i64, boot_ns: u64) -> (u64, u64) {
        let map = |t: i64| -> u64 {
            let delta = i128::from(t) - i128::from(wall_ns);
            let b = i128::from(boot_ns) + delta;
            u64::try_from(b.clamp(1, i128::from(u64::MAX))).unwrap_or(u64::MAX)
        };
        (self.not_before.map_or(0, map), self.expires.map_or(0, map))
    }
}

/// An instant (Unix ns) as RFC 3339 UTC, to the second (`2026-12-01T18:00:00Z`).
pub fn rfc3339(unix_ns: i64) -> String {
    match jiff::Timestamp::from_nanosecond(i128::from(unix_ns)) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => format!("@{unix_ns}ns"),
    }
}

/// The wall clock now, Unix ns.
pub fn wall_now_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Errors of loading, decoding and compiling a policy.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// The YAML policy has errors; `rendered` holds one `FILE:LINE:COL: ...` line each.
    #[error("{rendered}")]
    Invalid {
        rendered: String,
        diagnostics: Vec<Diagnostic>,
    },
    #[error(
        "{file}: the policy is neither UTF-8 YAML nor a compiled bundle; pass a YAML policy or the output of `enforcer-agent policy compile`"
    )]
    NotUtf8 { file: String },
    #[error(
        "the compiled policy bundle is corrupt ({0}); compile it again with `enforcer-agent policy compile`"
    )]
    Corrupt(String),
    #[error(
        "the data is not a compiled policy bundle (magic missing); compile one with `enforcer-agent policy compile`"
    )]
    NotABundle,
    #[error(
        "the compiled policy bundle has format version {found}, this agent reads version {expected}; compile it again with this agent"
    )]
    BundleVersion { found: u32, expected: u32 },
    #[error(
        "the compiled policy bundle is invalid: {0}; compile it again from a policy that passes `enforcer-agent policy check`"
    )]
    InvalidBundle(String),
    #[error(
        "the policy compiles to more than {limit} kernel rule entries; use fewer or wider port ranges (a range is expanded to one entry per port) or fewer CIDRs, or give the agent room with `enforcer-agent run --max-rules N`"
    )]
    TooManyRules { limit: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_checks() {
        let (p, warnings) = match check(DEFAULT_POLICY) {
            Ok(v) => v,
            Err(d) => panic!("{d:?}"),
        };
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.unattested, Action::Audit);
        assert_eq!(p.scope, vec!["/".to_string()]);
        assert!(p.report_allow);
        assert!(p.identities.is_empty() && p.rules.is_empty());
        assert_eq!(p.trust_domain, "local.enforcer");
    }

    #[test]
    fn render_format() {
        let d = Diagnostic {
            line: 3,
            col: 7,
            severity: Severity::Warning,
            message: "m".into(),
        };
        assert_eq!(d.render("p.yaml"), "p.yaml:3:7: warning: m");
    }
}
