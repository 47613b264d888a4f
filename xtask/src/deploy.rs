//! The deployment files: `cargo xtask deb` (the Debian package of the agent), and the offline
//! validation of the Kubernetes manifests that `cargo xtask test` runs (kustomize through the
//! machine's kubectl, then `kubernetes-validate --strict` from a pinned venv under target/).

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{have, in_ci, output, status, step};

/// Kustomizations rendered and validated: the audit-mode base and the enforce overlay.
pub const KUSTOMIZATIONS: [&str; 2] = ["deploy/kubernetes", "deploy/kubernetes/enforce"];

/// Kubernetes versions whose schemas the manifests must pass: the oldest the DaemonSet needs
/// (`securityContext.appArmorProfile` is 1.30+) and the newest kubernetes-validate knows.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// The validator and its dependencies, pinned (PyPI).
const VALIDATOR: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.4",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];

/// `kubernetes-validate` in a venv under target/, created once (pip, pinned versions).
fn validator(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target").join("deploy-venv");
    let bin = venv.join("bin").join("kubernetes-validate");
    let want = VALIDATOR[0].trim_start_matches("kubernetes-validate==");
    let mut c = Command::new(&bin);
    c.arg("--version");
    if output(c).is_some_and(|v| v.trim() == want) {
        return Ok(bin);
    }
    step(&format!(
        "creating {} with kubernetes-validate {want} (pip, once)",
        venv.display()
    ));
    let _ = fs::remove_dir_all(&venv);
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| Path::new(p).exists() || have(p))
        .context("python3 is missing: install it (`apt-get install python3-venv`)")?;
    let mut c = Command::new(python);
    c.args(["-m", "venv"]).arg(&venv);
    status(
        c,
        "python3 -m venv (on Debian: `apt-get install python3-venv`)",
    )?;
    let mut c = Command::new(venv.join("bin").join("pip"));
    c.args(["install", "--quiet", "--disable-pip-version-check"])
        .args(VALIDATOR);
    status(c, "pip install kubernetes-validate")?;
    Ok(bin)
}

/// `kubectl kustomize DIR`: the manifests as the cluster would get them.
pub fn render(root: &Path, dir: &str) -> Result<String> {
    let o = Command::new("kubectl")
        .arg("kustomize")
        .arg(root.join(dir))
        .stderr(Stdio::inherit())
        .output()
        .context("running kubectl (install kubectl 1.32 or newer)")?;
    if !o.status.success() {
        bail!("`kubectl kustomize {dir}` failed ({}); see above", o.status);
    }
    String::from_utf8(o.stdout).with_context(|| format!("kubectl kustomize {dir}: not UTF-8"))
}

/// Renders every kustomization and validates it, strictly, against the pinned Kubernetes
/// versions' schemas. Without kubectl or python3: skipped with a line, an error under CI.
pub fn validate(root: &Path) -> Result<()> {
    step(&format!(
        "validating {} against the Kubernetes {} schemas (offline)",
        KUSTOMIZATIONS.join(", "),
        KUBERNETES_VERSIONS.join(" and ")
    ));
    if !have("kubectl") {
        if in_ci() {
            bail!("kubectl is missing: the deployment files cannot be rendered (CI=true)");
        }
        eprintln!("xtask: no kubectl on PATH: not validating the deployment files");
        return Ok(());
    }
    let validator = match validator(root) {
        Ok(v) => v,
        Err(e) if !in_ci() => {
            eprintln!("xtask: no kubernetes-validate ({e:#}): not validating the deployment files");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let out = root.join("target").join("deploy");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for dir in KUSTOMIZATIONS {
        let rendered = render(root, dir)?;
        let file = out.join(format!("{}.yaml", dir.replace('/', "_")));
        fs::write(&file, rendered).with_context(|| format!("writing {}", file.display()))?;
        for version in KUBERNETES_VERSIONS {
            let mut c = Command::new(&validator);
            c.args(["--strict", "--quiet", "-k", version]).arg(&file);
            status(
                c,
                &format!("kubernetes-validate --strict -k {version} of `kubectl kustomize {dir}`"),
            )?;
        }
    }
    Ok(())
}

/// The workspace version (`[workspace.package] version`), the package's version.
pub fn workspace_version(root: &Path) -> Result<String> {
    let toml = fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?;
    toml.lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| {
            let v = l.trim().strip_prefix("version")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .context("no version in [workspace.package] of Cargo.toml")
}

const POSTINST: &str = r#"#!/bin/sh
# Enables and starts the service where systemd runs; does nothing else anywhere else.
set -e
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ]; then
	if command -v deb-systemd-helper >/dev/null 2>&1; then
		deb-systemd-helper unmask 'enforcer-agent.service' >/dev/null || true
		if deb-systemd-helper --quiet was-enabled 'enforcer-agent.service'; then
			deb-systemd-helper enable 'enforcer-agent.service' >/dev/null || true
		else
			deb-systemd-helper update-state 'enforcer-agent.service' >/dev/null || true
		fi
	fi
	if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		# An upgrade restarts the agent: the new one takes the pinned programs over.
		if [ -n "$2" ]; then action=restart; else action=start; fi
		deb-systemd-invoke "$action" 'enforcer-agent.service' >/dev/null || true
	fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
# On removal (not on upgrade, where the new agent takes over): stop the service and detach
# the programs, since nothing would keep their identities current any more.
set -e
if [ "$1" = "remove" ] || [ "$1" = "deconfigure" ]; then
	if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
		deb-systemd-invoke stop 'enforcer-agent.service' >/dev/null || true
	fi
	if [ -z "$DPKG_ROOT" ] && [ -e /sys/fs/bpf/enforcer ]; then
		/usr/bin/enforcer-agent uninstall || true
	fi
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = "remove" ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
if command -v deb-systemd-helper >/dev/null 2>&1; then
	if [ "$1" = "remove" ]; then
		deb-systemd-helper mask 'enforcer-agent.service' >/dev/null || true
	fi
	if [ "$1" = "purge" ]; then
		deb-systemd-helper purge 'enforcer-agent.service' >/dev/null || true
		deb-systemd-helper unmask 'enforcer-agent.service' >/dev/null || true
	fi
fi
if [ "$1" = "purge" ]; then
	rm -rf "$DPKG_ROOT/run/enforcer"
fi
exit 0
"#;

fn write(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Assembles `target/debian/enforcer-agent_VERSION_ARCH.deb` from the built release agent:
/// the binary, the systemd unit, the audit-mode policy (a conffile), the man page and the
/// maintainer scripts. Returns its path.
pub fn deb(root: &Path) -> Result<PathBuf> {
    let agent = root.join("target/release/enforcer-agent");
    if !agent.exists() {
        bail!(
            "{} is missing: run `cargo xtask build` first",
            agent.display()
        );
    }
    let version = workspace_version(root)?;
    let mut c = Command::new("dpkg");
    c.arg("--print-architecture");
    let arch = output(c)
        .map(|a| a.trim().to_string())
        .context("dpkg --print-architecture failed: `cargo xtask deb` needs dpkg (Debian)")?;
    step(&format!("packaging enforcer-agent {version} ({arch})"));
    let out = root.join("target/debian");
    let tree = out.join("enforcer-agent");
    let _ = fs::remove_dir_all(&tree);
    let bin = fs::read(&agent).with_context(|| format!("reading {}", agent.display()))?;
    write(&tree.join("usr/bin/enforcer-agent"), &bin, 0o755)?;
    let unit = fs::read(root.join("deploy/systemd/enforcer-agent.service"))
        .context("reading deploy/systemd/enforcer-agent.service")?;
    write(
        &tree.join("lib/systemd/system/enforcer-agent.service"),
        unit,
        0o644,
    )?;
    let policy = fs::read(root.join("deploy/systemd/policy.yaml"))
        .context("reading deploy/systemd/policy.yaml")?;
    write(&tree.join("etc/enforcer/policy.yaml"), policy, 0o644)?;
    let mut c = Command::new(&agent);
    c.arg("man");
    let man = output(c).context("`enforcer-agent man` failed")?;
    let man_path = tree.join("usr/share/man/man1/enforcer-agent.1");
    write(&man_path, man, 0o644)?;
    let mut c = Command::new("gzip");
    c.args(["-9n"]).arg(&man_path);
    status(c, "gzip of the man page")?;
    write(
        &tree.join("usr/share/doc/enforcer-agent/copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: enforcer\n\nFiles: *\nCopyright: the enforcer authors\nLicense: Apache-2.0\n \
         On Debian systems, the full text of the Apache License 2.0 is in\n \
         /usr/share/common-licenses/Apache-2.0.\n",
        0o644,
    )?;
    let installed_kb = dir_size(&tree)?.div_ceil(1024);
    let mut control = String::new();
    writeln!(control, "Package: enforcer-agent")?;
    writeln!(control, "Version: {version}")?;
    writeln!(control, "Architecture: {arch}")?;
    writeln!(
        control,
        "Maintainer: enforcer developers <enforcer@example.invalid>"
    )?;
    writeln!(control, "Installed-Size: {installed_kb}")?;
    writeln!(control, "Depends: libc6")?;
    writeln!(control, "Section: net")?;
    writeln!(control, "Priority: optional")?;
    writeln!(control, "Homepage: https://example.invalid/enforcer")?;
    writeln!(
        control,
        "Description: eBPF workload identity enforcer (node agent)\n \
         Attests every process (sha256 of its executable, cgroup, uid), maps it to a\n \
         workload identity and allows or denies its connects in the kernel, with\n \
         eBPF programs on the cgroup socket hooks. Installs in audit mode."
    )?;
    write(&tree.join("DEBIAN/control"), control, 0o644)?;
    write(
        &tree.join("DEBIAN/conffiles"),
        "/etc/enforcer/policy.yaml\n",
        0o644,
    )?;
    write(&tree.join("DEBIAN/postinst"), POSTINST, 0o755)?;
    write(&tree.join("DEBIAN/prerm"), PRERM, 0o755)?;
    write(&tree.join("DEBIAN/postrm"), POSTRM, 0o755)?;
    let deb = out.join(format!("enforcer-agent_{version}_{arch}.deb"));
    let mut c = Command::new("dpkg-deb");
    c.args(["--build", "--root-owner-group", "-Zxz"])
        .arg(&tree)
        .arg(&deb);
    status(c, "dpkg-deb --build")?;
    step(&format!("built {}", deb.display()));
    Ok(deb)
}

/// Bytes of the regular files under `dir`.
fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            total += dir_size(&e.path())?;
        } else if t.is_file() {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_version_is_the_workspace_version() {
        let root = crate::cmd::workspace_root().expect("root");
        let v = workspace_version(&root).expect("version");
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn maintainer_scripts_parse() {
        for (name, script) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
            let ok = Command::new("sh")
                .args(["-n", "-c", script])
                .status()
                .expect("sh");
            assert!(ok.success(), "{name} does not parse");
        }
    }
}
