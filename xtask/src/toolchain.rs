//! The one place where the toolchains are pinned. The nightly that compiles the kernel crate
//! and the bpf-linker that links it must agree on the LLVM major version: bpf-linker is built
//! against that nightly's own libLLVM, so changing `NIGHTLY` rebuilds the linker.

/// Nightly for the kernel crate (`-Z build-std=core`, needs `rust-src`). LLVM 23.
pub const NIGHTLY: &str = "nightly-2026-10-15";
/// Stable for the agent, the tests and aya 0.16 (needs rustc >= 1.98).
pub const STABLE: &str = "1.99.1";
/// bpf-linker release, built from crates.io against `NIGHTLY`'s libLLVM.
pub const BPF_LINKER: &str = "0.13.0";
/// bpf-linker cargo features selecting the LLVM major of `NIGHTLY` (empty: default = LLVM 23).
pub const BPF_LINKER_FEATURES: &[&str] = &[];
/// Target of the kernel crate.
pub const BPF_TARGET: &str = "bpfel-unknown-none";
/// Target of the static agent in the OCI image and of the node suite's test images (added to
/// `STABLE` by the set-up).
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// cargo-fuzz release (`cargo xtask fuzz`), built from crates.io with `STABLE`; it runs the
/// fuzz targets with `NIGHTLY` (libFuzzer's instrumentation needs nightly flags).
pub const CARGO_FUZZ: &str = "0.13.2";
