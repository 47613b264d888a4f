//! Adoption: identities from another system's registrations (SPEC "Adoption commands").
//!
//! - [`spire`]: SPIRE registration entries (`spire-server entry show -output json`).

pub mod spire;
