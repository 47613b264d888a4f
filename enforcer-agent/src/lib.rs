//! The enforcer's node agent as a library: the binaries in `src/bin` are thin.
//!
//! Data path: kernel event -> [`attest`] -> [`policy`] (identity) -> [`kernel`] (maps) ->
//! verdict -> event.

pub mod attest;
pub mod btf;
pub mod policy;
