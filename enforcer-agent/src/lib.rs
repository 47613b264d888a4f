//! The enforcer's node agent as a library: the binary in `src/bin` is thin.
//!
//! Data path: kernel event -> [`attest`] -> [`policy`] (identity) -> [`kernel`] (maps) ->
//! verdict -> event, driven by [`daemon`].

pub mod api;
pub mod attest;
pub mod btf;
pub mod cgroups;
pub mod client;
pub mod daemon;
pub mod events;
pub mod exes;
pub mod grants;
pub mod health;
pub mod import;
pub mod in_force;
pub mod k8s;
pub mod kernel;
pub mod learn;
pub mod listeners;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod preload;
pub mod probe;
pub mod procs;
pub mod record;
pub mod replay;
pub mod revoke;
pub mod server;
pub mod sock_diag;
pub mod sys;
pub mod views;

/// True under `CI=true` (or `CI=1`): tests that cannot run there fail instead of skipping.
#[cfg(test)]
pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
