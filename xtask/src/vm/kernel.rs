//! The kernel lines of the matrix and fetching their `vmlinuz`: the newest
//! `linux-image-<line>*-amd64` of each suite, downloaded once and kept as
//! `target/vm/kernels/<package>/vmlinuz` (the .debs and modules are deleted).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::debian::{MIRROR, SECURITY, apt, extract_deb, find_deb, lists_fresh, vercmp};
use crate::cmd::{output, status, step};

/// A kernel line of the matrix.
pub struct KernelLine {
    /// As given on the command line: `6.1`.
    pub name: &'static str,
    pub suite: &'static str,
    /// apt sources lines for this suite.
    pub sources: &'static [(&'static str, &'static str)],
}

pub const KERNELS: &[KernelLine] = &[
    KernelLine {
        name: "5.10",
        suite: "bullseye",
        sources: &[(MIRROR, "bullseye"), (SECURITY, "bullseye-security")],
    },
    KernelLine {
        name: "6.1",
        suite: "bookworm",
        sources: &[(MIRROR, "bookworm"), (SECURITY, "bookworm-security")],
    },
    KernelLine {
        name: "6.12",
        suite: "trixie",
        sources: &[(MIRROR, "trixie"), (SECURITY, "trixie-security")],
    },
    KernelLine {
        name: "7.2",
        suite: "sid",
        sources: &[(MIRROR, "sid")],
    },
];

/// The kernel kept under `target/vm/kernels/<package>/vmlinuz` (with `source`, the .deb it
/// came from); the newest of this line, unless `--refresh` asks apt for a newer one.
fn kept_kernel(kernels: &Path, k: &KernelLine) -> Option<(String, PathBuf)> {
    let prefix = format!("linux-image-{}", k.name);
    let mut found: Vec<(String, PathBuf)> = fs::read_dir(kernels)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&prefix)?;
            let v = e.path().join("vmlinuz");
            ((rest.starts_with('.') || rest.starts_with('-')) && v.is_file()).then_some((name, v))
        })
        .collect();
    found.sort_by(|a, b| vercmp(&a.0, &b.0));
    found.pop()
}

/// boot/vmlinuz-X, or usr/lib/modules/X/vmlinuz (the layout of newer Debian kernels).
fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    let in_boot = fs::read_dir(root.join("boot")).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
    });
    in_boot.or_else(|| {
        fs::read_dir(root.join("usr").join("lib").join("modules"))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("vmlinuz"))
            .find(|p| p.is_file())
    })
}

/// Keeps `vmlinuz` of an extracted tree as `dir/vmlinuz` (plus `dir/source`), then removes the
/// tree and the .debs: what boots is all a second run needs.
fn keep_vmlinuz(dir: &Path, tree: &Path, debs: &[PathBuf]) -> Result<Option<PathBuf>> {
    let Some(v) = find_vmlinuz(tree) else {
        return Ok(None);
    };
    let kept = dir.join("vmlinuz");
    let tmp = dir.join("vmlinuz.partial");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::copy(&v, &tmp).with_context(|| format!("copying {}", v.display()))?;
    let source: String = debs
        .iter()
        .filter_map(|d| d.file_name())
        .map(|n| format!("{}\n", n.to_string_lossy()))
        .collect();
    fs::write(dir.join("source"), source).context("writing the kernel's source marker")?;
    fs::rename(&tmp, &kept).with_context(|| format!("renaming {}", tmp.display()))?;
    // Everything else of the package: the extracted modules and the .debs (hundreds of MB).
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name();
            if n != "vmlinuz" && n != "source" {
                let p = e.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
    }
    if tree != dir {
        let _ = fs::remove_dir_all(tree);
    }
    for d in debs {
        let _ = fs::remove_file(d);
    }
    Ok(Some(kept))
}

/// Removes the .debs of a kernel whose vmlinuz is kept (left by an older vm-test), naming
/// them in its `source` marker when that is empty.
fn prune_debs(cache: &Path, dir: &Path, pkg: &str) -> Result<()> {
    let binary = pkg.replacen("linux-image-", "linux-binary-", 1);
    let mut debs = Vec::new();
    for prefix in [format!("{pkg}_"), format!("{binary}_")] {
        if let Some(d) = find_deb(cache, &prefix)? {
            debs.push(d);
        }
    }
    if debs.is_empty() {
        return Ok(());
    }
    let marker = dir.join("source");
    if fs::read_to_string(&marker)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        let names: String = debs
            .iter()
            .filter_map(|d| d.file_name())
            .map(|n| format!("{}\n", n.to_string_lossy()))
            .collect();
        fs::write(&marker, names).with_context(|| format!("writing {}", marker.display()))?;
    }
    for d in &debs {
        fs::remove_file(d).with_context(|| format!("removing {}", d.display()))?;
    }
    Ok(())
}

/// Returns (package name, path of vmlinuz).
pub fn fetch_kernel(vm: &Path, k: &KernelLine, refresh: bool) -> Result<(String, PathBuf)> {
    let kernels = vm.join("kernels");
    if !refresh && let Some((pkg, v)) = kept_kernel(&kernels, k) {
        prune_debs(&vm.join("cache"), &kernels.join(&pkg), &pkg)?;
        return Ok((pkg, v));
    }
    let aptdir = vm.join("apt").join(k.suite);
    for d in [
        aptdir.join("lists").join("partial"),
        aptdir.join("cache").join("archives").join("partial"),
        aptdir.join("sources.list.d"),
        aptdir.join("preferences.d"),
    ] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let sources: String = k
        .sources
        .iter()
        .map(|(uri, suite)| format!("deb {uri} {suite} main\n"))
        .collect();
    let sl = aptdir.join("sources.list");
    let changed = fs::read_to_string(&sl).ok().as_deref() != Some(sources.as_str());
    if changed {
        fs::write(&sl, &sources).with_context(|| format!("writing {}", sl.display()))?;
    }
    fs::write(aptdir.join("status"), "").context("writing the private dpkg status")?;
    if refresh || changed || !lists_fresh(&aptdir) {
        step(&format!(
            "apt-get update for {} (private config {})",
            k.suite,
            aptdir.display()
        ));
        let mut c = apt(&aptdir, "apt-get");
        c.args(["update", "-q"]);
        status(c, &format!("apt-get update ({})", k.suite))?;
        fs::write(aptdir.join("updated"), "").context("writing the apt stamp")?;
    }
    let mut c = apt(&aptdir, "apt-cache");
    c.args(["pkgnames", "linux-image-"]);
    let names = output(c).with_context(|| format!("apt-cache pkgnames ({})", k.suite))?;
    let prefix = format!("linux-image-{}", k.name);
    let mut cands: Vec<&str> = names
        .lines()
        .map(str::trim)
        .filter(|n| {
            n.strip_prefix(&prefix).is_some_and(|rest| {
                (rest.starts_with('.') || rest.starts_with('-'))
                    && rest.ends_with("-amd64")
                    && !rest.contains("-rt-")
                    && !rest.contains("-cloud-")
            })
        })
        .collect();
    // Keep only packages that are real (a version in the lists), newest last.
    cands.sort_by(|a, b| vercmp(a, b));
    let pkg = loop {
        let Some(n) = cands.pop() else {
            bail!(
                "no linux-image-{}*-amd64 in {} (see {})",
                k.name,
                k.suite,
                sl.display()
            );
        };
        let mut c = apt(&aptdir, "apt-cache");
        c.args(["show", "--no-all-versions", n]);
        if output(c).is_some_and(|s| s.contains("Filename:")) {
            break n.to_string();
        }
    };
    let dir = kernels.join(&pkg);
    if dir.join("vmlinuz").is_file() {
        return Ok((pkg, dir.join("vmlinuz")));
    }
    // A tree extracted by an older vm-test: keep its vmlinuz, drop the rest.
    if let Some(v) = keep_vmlinuz(&dir, &dir, &[])? {
        prune_debs(&vm.join("cache"), &dir, &pkg)?;
        return Ok((pkg, v));
    }
    let cache = vm.join("cache");
    let deb = match find_deb(&cache, &format!("{pkg}_"))? {
        Some(d) => d,
        None => {
            step(&format!("downloading {pkg} ({})", k.suite));
            let mut c = apt(&aptdir, "apt-get");
            c.current_dir(&cache).args(["download", "-q", &pkg]);
            status(c, &format!("apt-get download {pkg}"))?;
            find_deb(&cache, &format!("{pkg}_"))?
                .with_context(|| format!("apt-get download left no {pkg} .deb"))?
        }
    };
    let tree = vm.join("extract").join(&pkg);
    step(&format!("extracting {}", deb.display()));
    extract_deb(&deb, &tree)?;
    if let Some(v) = keep_vmlinuz(&dir, &tree, std::slice::from_ref(&deb))? {
        return Ok((pkg, v));
    }
    // Newer Debian kernels (7.x in sid) split the image: linux-image-X depends on
    // linux-binary-X, which holds boot/vmlinuz-X.
    let binary = pkg.replacen("linux-image-", "linux-binary-", 1);
    let bdeb = match find_deb(&cache, &format!("{binary}_"))? {
        Some(d) => d,
        None => {
            step(&format!(
                "downloading {binary} ({}): the image package holds no vmlinuz",
                k.suite
            ));
            let mut c = apt(&aptdir, "apt-get");
            c.current_dir(&cache).args(["download", "-q", &binary]);
            status(c, &format!("apt-get download {binary}"))?;
            find_deb(&cache, &format!("{binary}_"))?
                .with_context(|| format!("apt-get download left no {binary} .deb"))?
        }
    };
    step(&format!("extracting {}", bdeb.display()));
    extract_deb(&bdeb, &tree)?;
    let v = keep_vmlinuz(&dir, &tree, &[deb.clone(), bdeb.clone()])?.with_context(|| {
        format!(
            "neither {} nor {} has boot/vmlinuz-*",
            deb.display(),
            bdeb.display()
        )
    })?;
    Ok((pkg, v))
}

pub fn kernel_release(pkg: &str) -> &str {
    pkg.strip_prefix("linux-image-").unwrap_or(pkg)
}
