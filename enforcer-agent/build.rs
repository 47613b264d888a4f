//! Embeds the kernel object that `cargo xtask build` compiled (path in ENFORCER_EBPF_OBJ).
//! Without it the agent still builds (for unit tests of the pure modules) but refuses to
//! load, saying how to build it properly.
use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=ENFORCER_EBPF_OBJ");
    println!("cargo::rustc-check-cfg=cfg(enforcer_ebpf)");
    if let Some(obj) = env::var_os("ENFORCER_EBPF_OBJ") {
        let path = std::path::PathBuf::from(obj);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
            println!("cargo:rustc-cfg=enforcer_ebpf");
            println!("cargo:rustc-env=ENFORCER_EBPF_OBJ={}", path.display());
        } else {
            println!(
                "cargo:warning=ENFORCER_EBPF_OBJ={} does not exist; the agent will not be able to load",
                path.display()
            );
        }
    }
}
