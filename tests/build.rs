//! Embeds the test-only kernel object (`enforcer-ebpf-test`: the bench's allow-only programs
//! and the program the verifier must reject) that `cargo xtask build` compiled, from
//! ENFORCER_EBPF_TEST_OBJ. Without it the tests that need it fail, saying how to build it.
//!
//! Also compiles the C programs of the loader tests (tests/loader-c, with the host's `cc`)
//! into OUT_DIR/loader, embedded by tests/tests/adversarial/loader.rs, so the guests (which
//! have the loader and libc the test binaries need, but no compiler) run them too.
use std::{env, path::Path, process::Command};

/// `cc ARGS...`; false (and a warning) when it fails.
fn cc(args: &[&str]) -> bool {
    match Command::new("cc").args(args).status() {
        Ok(s) if s.success() => true,
        r => {
            println!(
                "cargo:warning=cc {}: {r:?}; the loader tests will fail",
                args.join(" ")
            );
            false
        }
    }
}

fn loader_c() {
    for f in ["svc.c", "evil.c", "helper.c"] {
        println!("cargo:rerun-if-changed=loader-c/{f}");
    }
    println!("cargo::rustc-check-cfg=cfg(loader_c)");
    let out = Path::new(&env::var("OUT_DIR").expect("OUT_DIR")).join("loader");
    let _ = std::fs::create_dir_all(&out);
    let o = |f: &str| out.join(f).to_string_lossy().into_owned();
    let ok = cc(&[
        "-shared",
        "-fPIC",
        "-O2",
        "-o",
        &o("libhelper.so"),
        "loader-c/helper.c",
    ]) && cc(&[
        "-shared",
        "-fPIC",
        "-O2",
        "-o",
        &o("evil.so"),
        "loader-c/evil.c",
    ]) && cc(&[
        "-O2",
        "-o",
        &o("svc"),
        "loader-c/svc.c",
        &format!("-L{}", out.display()),
        "-lhelper",
        "-Wl,-rpath,$ORIGIN/lib,--enable-new-dtags",
    ]);
    if ok {
        println!("cargo:rustc-cfg=loader_c");
    }
}

fn main() {
    loader_c();
    println!("cargo:rerun-if-env-changed=ENFORCER_EBPF_TEST_OBJ");
    println!("cargo::rustc-check-cfg=cfg(enforcer_ebpf_test)");
    if let Some(obj) = env::var_os("ENFORCER_EBPF_TEST_OBJ") {
        let path = std::path::PathBuf::from(obj);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
            println!("cargo:rustc-cfg=enforcer_ebpf_test");
            println!("cargo:rustc-env=ENFORCER_EBPF_TEST_OBJ={}", path.display());
        } else {
            println!(
                "cargo:warning=ENFORCER_EBPF_TEST_OBJ={} does not exist; tests that load it will fail",
                path.display()
            );
        }
    }
}
