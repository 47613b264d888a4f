//! Embeds the test-only kernel object (`enforcer-ebpf-test`: the bench's allow-only programs
//! and the program the verifier must reject) that `cargo xtask build` compiled, from
//! ENFORCER_EBPF_TEST_OBJ. Without it the tests that need it fail, saying how to build it.
use std::env;

fn main() {
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
