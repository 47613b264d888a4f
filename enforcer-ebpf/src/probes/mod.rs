//! Programs by hook family.

pub mod process;
pub mod sock_addr;
pub mod sock_create;
pub mod tamper;
