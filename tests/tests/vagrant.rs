//! The operator Vagrant matrix (`vagrant/`): the Vagrantfile validates and provision.sh parses.
//! Boxes cannot be downloaded in CI, so this is all CI checks of it; `vagrant up` is run by
//! operators (vagrant/README.md).
//!
//! No `vagrant` on the machine: under CI=true the test fails (install Debian's `vagrant`
//! package); locally it prints SKIP with the reason and returns.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn vagrant_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("vagrant")
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A temporary folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("enforcer-vagrant-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
        Self(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True when `vagrant` runs. Missing: panics under CI=true, else prints SKIP.
fn have_vagrant(test: &str) -> bool {
    let why = match Command::new("vagrant").arg("--version").output() {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "`vagrant --version` failed ({}): {}",
            o.status,
            text(&o).trim()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => "vagrant is not installed".to_string(),
        Err(e) => format!("cannot run vagrant: {e}"),
    };
    if ci() {
        panic!(
            "{test}: {why}; install Debian's vagrant package \
             (apt-get install -y --no-install-recommends vagrant): CI=true forbids skipping"
        );
    }
    eprintln!("SKIP {test}: {why} (install Debian's vagrant package to run it)");
    false
}

/// `vagrant ARGS` in vagrant/, offline, with its state (`.vagrant/`) in `scratch`, not the repo.
fn vagrant(scratch: &Scratch, boxes: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new("vagrant");
    c.current_dir(vagrant_dir())
        .args(args)
        .env("VAGRANT_DOTFILE_PATH", scratch.0.join("dot"))
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .env("VAGRANT_NO_COLOR", "1")
        .env_remove("ENFORCER_BOXES");
    if let Some(b) = boxes {
        c.env("ENFORCER_BOXES", b);
    }
    c.output()
        .unwrap_or_else(|e| panic!("running vagrant {}: {e}", args.join(" ")))
}

#[test]
fn vagrantfile_validates() {
    if !have_vagrant("vagrantfile_validates") {
        return;
    }
    let s = Scratch::new("validate");

    // Everything but the provider blocks: needs no hypervisor and no plugin.
    let t0 = std::time::Instant::now();
    let out = vagrant(&s, None, &["validate", "--ignore-provider"]);
    assert!(
        out.status.success(),
        "vagrant validate --ignore-provider failed ({}):\n{}",
        out.status,
        text(&out)
    );
    let all = text(&out);
    for name in [
        "ubuntu2004",
        "ubuntu2204",
        "ubuntu2404",
        "debian12",
        "el9",
        "al2023",
    ] {
        assert!(
            all.contains(name),
            "machine {name} not in the matrix:\n{all}"
        );
    }
    eprintln!(
        "vagrant validate --ignore-provider: ok ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );

    // With the provider blocks too, when this machine has a usable provider.
    let out = vagrant(&s, None, &["validate"]);
    let all = text(&out);
    if out.status.success() {
        eprintln!("vagrant validate (with the default provider's config): ok");
    } else if all.contains("No usable default provider") || all.contains("usable on this system") {
        eprintln!("note: no usable Vagrant provider here; provider blocks were not validated");
    } else {
        panic!("vagrant validate failed ({}):\n{all}", out.status);
    }

    // ENFORCER_BOXES selects a subset; an unknown name is an error that names it.
    let out = vagrant(
        &s,
        Some("ubuntu2204,debian12"),
        &["validate", "--ignore-provider"],
    );
    assert!(
        out.status.success(),
        "ENFORCER_BOXES=ubuntu2204,debian12 vagrant validate failed:\n{}",
        text(&out)
    );
    let out = vagrant(
        &s,
        Some("debian12,nosuchbox"),
        &["validate", "--ignore-provider"],
    );
    let all = text(&out);
    assert!(
        !out.status.success() && all.contains("unknown box(es) nosuchbox"),
        "ENFORCER_BOXES=debian12,nosuchbox should fail naming nosuchbox ({}):\n{all}",
        out.status
    );
}

#[test]
fn provision_sh_parses() {
    let script = vagrant_dir().join("provision.sh");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("running bash -n");
    assert!(
        out.status.success(),
        "bash -n {} failed:\n{}",
        script.display(),
        text(&out)
    );
    match Command::new("shellcheck").arg(&script).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck {}:\n{}",
            script.display(),
            text(&out)
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            eprintln!("note: shellcheck not installed; provision.sh only parsed with bash -n")
        }
        Err(e) => panic!("running shellcheck: {e}"),
    }
}
