//! The policy in force, as one value: the policy, what it compiled to and what it was compiled
//! against. An apply builds the next one completely, then swaps it in ([`crate::daemon`]).

use std::collections::{BTreeSet, HashSet};

use enforcer_common::{
    IdMatchKey, RULE_DEFAULT_DENY, RULE_NO_CONFIG, RULE_PENDING, RULE_SOCKET_KIND, RULE_TAMPERED,
    RULE_UNATTESTED, RULE_UNTRACKED, RULE_WITHHELD,
};

use crate::{
    listeners::Listener,
    policy::{self, Classes, Policy},
};

/// The policy in force, as one value: what was compiled from it and what it was compiled
/// against. An apply builds the next one completely, then swaps it in.
pub(crate) struct InForce {
    /// The policy in force: `base` with the grants' entries after its own rules.
    pub(crate) policy: Policy,
    /// The policy as applied (file, API), without grants: what a re-apply starts from.
    pub(crate) base: Policy,
    /// The clocks read when it was compiled: time-bound entries' windows on the boot clock.
    pub(crate) clock: policy::Clock,
    /// Indices in `policy.rules` of the time-bound entries (grants included), found once per
    /// apply so the 500 ms tick and `status` never walk the whole rule list.
    pub(crate) timed: Vec<usize>,
    pub(crate) classes: Classes,
    /// The generation it is written in (the kernel's `active`).
    pub(crate) generation: u32,
    /// `ENF_IDMATCH` entries written for it (classes interned after the apply add some).
    pub(crate) idmatch_written: HashSet<(IdMatchKey, u32)>,
    /// Rules made for identity destinations from the listeners found (see `listeners`); their
    /// rule ids follow the policy's own rules.
    pub(crate) listener_rules: Vec<policy::Rule>,
    /// Listeners of identities named in `to: {identity: X}` destinations, as last applied.
    pub(crate) listeners: BTreeSet<(u32, Listener)>,
    /// Where the policy came from.
    pub(crate) source: String,
    /// sha256 of the compiled policy (computed once per apply).
    pub(crate) hash: String,
}

impl InForce {
    pub(crate) fn identity_name(&self, ident: u32) -> Option<&str> {
        let i = ident.checked_sub(1)? as usize;
        self.policy
            .identities
            .get(i)
            .map(|id| id.spiffe_id.as_str())
    }

    /// The policy rule (its own, a grant's or one made from listeners) of a rule id.
    pub(crate) fn rule(&self, rule: u32) -> Option<&policy::Rule> {
        let own = self.policy.rules.len();
        let i = usize::try_from(rule).ok()?;
        if i < own {
            self.policy.rules.get(i)
        } else {
            self.listener_rules.get(i - own)
        }
    }

    /// What a rule id reported by the kernel stands for (a rule of this policy, one made
    /// from listeners, or one of the `RULE_*` reasons).
    pub(crate) fn rule_text(&self, rule: u32) -> String {
        match rule {
            RULE_DEFAULT_DENY => "default deny (no egress entry matches)".to_string(),
            RULE_UNATTESTED => "unattested".to_string(),
            RULE_PENDING => "pending attestation".to_string(),
            RULE_WITHHELD => "withheld: loader environment".to_string(),
            RULE_UNTRACKED => "untracked process".to_string(),
            RULE_NO_CONFIG => "no policy loaded".to_string(),
            RULE_TAMPERED => "tampered (no identity until it execs again untraced)".to_string(),
            RULE_SOCKET_KIND => "the identity's `sockets:` list".to_string(),
            r => self
                .rule(r)
                .map_or_else(|| format!("rule {r}"), |x| x.text.clone()),
        }
    }
}
