//! Helpers shared by the adversarial modules.

#![expect(dead_code, reason = "filled by the attack modules as they land")]

/// The unprivileged uid the attacker runs as (the same uid as the attested service where a
/// test says so).
pub const ATTACKER_UID: u32 = 65534;
