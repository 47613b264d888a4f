//! Helpers shared by the adversarial modules.

/// The unprivileged uid the attacker runs as (the same uid as the attested service where a
/// test says so).
pub const ATTACKER_UID: u32 = 65534;
