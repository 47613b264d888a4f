//! The adversarial suite (issue 12): each attack of the threat model ([SECURITY.md]) as a
//! real-kernel test with a real attacker process of an unprivileged uid. Every test first shows
//! its attack works with enforcement off (no agent, or audit mode), so it cannot pass by not
//! attacking, then that the enforcing agent stops it (or strips the identity) and says so.
//!
//! One module per attack family; shared attacker helpers live in `common`.
//!
//! [SECURITY.md]: ../../../SECURITY.md

mod common;

mod aliases;
mod held;
mod loader;
mod sockets;
mod tamper;
