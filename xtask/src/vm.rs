//! `cargo xtask vm-test`: the real-kernel tests inside Debian kernels booted under QEMU.
//!
//! For each kernel: fetch Debian's `linux-image-*-amd64` through a private apt config (the
//! machine's sources are never touched), build one initramfs (static busybox, the `kernel`
//! test binary, the agent, the probe and the glibc they load), boot it under TCG with the
//! serial console captured to `target/vm/<kernel>.log`, and parse the libtest lines into a
//! kernel x test table. Downloads are cached under `target/vm`; a second run fetches nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use super::{build, clean_command, have, output, stable_cargo, status, step};

const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";
/// apt lists younger than this are reused without `apt-get update`.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A kernel line of the matrix.
struct KernelLine {
    /// As given on the command line: `6.1`.
    name: &'static str,
    suite: &'static str,
    /// apt sources lines for this suite.
    sources: &'static [(&'static str, &'static str)],
}

const KERNELS: &[KernelLine] = &[
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

struct Opts {
    kernels: Vec<&'static KernelLine>,
    timeout: Duration,
    refresh: bool,
    update_readme: bool,
    filter: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Opts> {
    let mut kernels = Vec::new();
    let mut timeout = DEFAULT_TIMEOUT;
    let mut refresh = false;
    let mut update_readme = false;
    let mut filter = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = |what: &str| -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .with_context(|| format!("{what} needs a value")),
            }
        };
        match key {
            "--kernel" | "-k" => {
                let v = value("--kernel")?;
                for k in v.split(',') {
                    if k == "all" {
                        kernels.extend(KERNELS.iter());
                    } else {
                        kernels.push(KERNELS.iter().find(|l| l.name == k).with_context(|| {
                            format!(
                                "unknown kernel `{k}`: one of {} or all",
                                KERNELS
                                    .iter()
                                    .map(|l| l.name)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })?);
                    }
                }
            }
            "--timeout" => {
                let v = value("--timeout")?;
                timeout = Duration::from_secs(
                    v.parse()
                        .with_context(|| format!("--timeout takes seconds, not `{v}`"))?,
                );
            }
            "--refresh" => refresh = true,
            "--update-readme" => update_readme = true,
            s if s.starts_with('-') => bail!(
                "unknown option `{s}` (vm-test [--kernel 5.10|6.1|6.12|7.2|all] [--timeout SECS] [--refresh] [--update-readme] [TEST-FILTER...])"
            ),
            s => filter.push(s.to_string()),
        }
    }
    if kernels.is_empty() {
        kernels.push(
            KERNELS
                .iter()
                .find(|l| l.name == "6.1")
                .expect("6.1 is listed"),
        );
    }
    let mut seen = BTreeSet::new();
    kernels.retain(|k| seen.insert(k.name));
    Ok(Opts {
        kernels,
        timeout,
        refresh,
        update_readme,
        filter,
    })
}

pub(crate) fn vm_test(root: &Path, args: &[String]) -> Result<()> {
    let t0 = Instant::now();
    let opts = parse_args(args)?;
    let vm = root.join("target").join("vm");
    let cache = vm.join("cache");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    ensure_qemu(&vm)?;
    let busybox = ensure_busybox(&vm)?;

    // Kernels first: a mirror problem shows before minutes of building.
    let mut vmlinuz = Vec::new();
    for k in &opts.kernels {
        vmlinuz.push(fetch_kernel(&vm, k, opts.refresh)?);
    }

    let obj = build(root)?;
    step("building the real-kernel test binaries (enforcer-tests, release)");
    let tests_bin: Vec<PathBuf> = SUITES
        .iter()
        .map(|suite| build_kernel_tests(root, &obj, suite))
        .collect::<Result<_>>()?;
    let agent = root.join("target").join("release").join("enforcer-agent");
    let probe = root.join("target").join("release").join("enf-probe");
    for p in [&agent, &probe] {
        if !p.exists() {
            bail!("{} was not built", p.display());
        }
    }

    step("building the initramfs (target/vm/initramfs.cpio.gz)");
    let initrd = vm.join("initramfs.cpio.gz");
    build_initramfs(&initrd, &busybox, &tests_bin, &agent, &probe, &opts.filter)?;

    let mut results: Vec<(String, GuestResult)> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for (k, (pkg, kimg)) in opts.kernels.iter().zip(&vmlinuz) {
        let log = vm.join(format!("{}.log", k.name));
        step(&format!(
            "booting {pkg} under QEMU/TCG (console: {})",
            log.display()
        ));
        let r = boot(kimg, &initrd, &log, opts.timeout)?;
        eprintln!(
            "xtask: {} finished in {:.1}s: {}",
            k.name,
            r.wall.as_secs_f64(),
            r.summary()
        );
        results.push((format!("{} ({})", k.name, kernel_release(pkg)), r));
        names.push(k.name);
    }

    print_table(&results);
    let mut failed = false;
    for ((label, r), k) in results.iter().zip(&opts.kernels) {
        if !r.ok() {
            failed = true;
            let log = vm.join(format!("{}.log", k.name));
            println!(
                "\n--- {label}: {} ; console log {} (tail) ---",
                r.summary(),
                log.display()
            );
            print!("{}", log_tail(&log));
            print!("{}", failure_details(label, r));
        }
    }
    let md = matrix_markdown(&names, &results);
    let matrix = vm.join("matrix.md");
    fs::write(&matrix, &md).with_context(|| format!("writing {}", matrix.display()))?;
    println!("\n{md}");
    eprintln!(
        "xtask: kernel x feature and kernel x test tables: {}",
        matrix.display()
    );
    if opts.update_readme {
        update_readme(&root.join("README.md"), &md)?;
    }
    eprintln!("xtask: vm-test took {:.1}s", t0.elapsed().as_secs_f64());
    if failed {
        bail!("some kernel tests failed in the VMs (table above)");
    }
    Ok(())
}

// ---------------------------------------------------------------- host tools

fn ensure_qemu(vm: &Path) -> Result<()> {
    if have("qemu-system-x86_64") {
        return Ok(());
    }
    if !super::nix_is_root() {
        bail!("qemu-system-x86_64 is missing; install Debian's qemu-system-x86 (as root)");
    }
    // Never remove anything: a backported qemu-utils (as machines of this kind carry) breaks
    // the stable qemu-system-common, so then take qemu-system-x86 from the same backports.
    let mut q = Command::new("dpkg-query");
    q.args(["-W", "-f=${Version}", "qemu-utils"]);
    let utils = output(q).unwrap_or_default();
    let codename = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VERSION_CODENAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_default();
    if utils.contains("~bpo") && !codename.is_empty() {
        let bpo = format!("{codename}-backports");
        step(&format!(
            "installing qemu-system-x86 from {bpo} (qemu-utils {utils} is installed from there)"
        ));
        let aptdir = vm.join("apt").join("host-backports");
        for d in [
            aptdir.join("lists").join("partial"),
            aptdir.join("cache").join("archives").join("partial"),
        ] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let sl = aptdir.join("sources.list");
        fs::write(
            &sl,
            format!(
                "deb {MIRROR} {bpo} main
"
            ),
        )
        .with_context(|| format!("writing {}", sl.display()))?;
        // The machine's own sources (sources.list.d) plus backports, private lists.
        let opts = |c: &mut Command| {
            c.arg("-o")
                .arg(format!("Dir::Etc::SourceList={}", sl.display()))
                .arg("-o")
                .arg(format!(
                    "Dir::State::Lists={}",
                    aptdir.join("lists").display()
                ))
                .arg("-o")
                .arg(format!("Dir::Cache={}", aptdir.join("cache").display()))
                .args(["-o", "Acquire::Languages=none"]);
        };
        let mut c = Command::new("apt-get");
        opts(&mut c);
        c.args(["update", "-q"]);
        status(c, &format!("apt-get update ({bpo})"))?;
        let mut c = Command::new("apt-get");
        opts(&mut c);
        c.env("DEBIAN_FRONTEND", "noninteractive").args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--no-remove",
            "-t",
            &bpo,
            "qemu-system-x86",
        ]);
        return status(c, &format!("apt-get install -t {bpo} qemu-system-x86"));
    }
    step("installing qemu-system-x86 from Debian");
    let mut c = Command::new("sh");
    c.args([
        "-c",
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --no-remove qemu-system-x86",
    ]);
    status(c, "apt-get install qemu-system-x86")
}

/// The static busybox of Debian's `busybox-static`, extracted under target/vm (the machine's
/// own apt sources; nothing is installed).
fn ensure_busybox(vm: &Path) -> Result<PathBuf> {
    let dir = vm.join("busybox");
    let bin = dir.join("bin").join("busybox");
    if bin.exists() {
        return Ok(bin);
    }
    let cache = vm.join("cache");
    let deb = match find_deb(&cache, "busybox-static_")? {
        Some(d) => d,
        None => {
            step("downloading busybox-static (apt-get download)");
            let mut c = Command::new("apt-get");
            c.current_dir(&cache)
                .args(["download", "-q", "busybox-static"]);
            if c.status().map(|s| !s.success()).unwrap_or(true) {
                let mut c = Command::new("apt-get");
                c.args(["update", "-q"]);
                status(c, "apt-get update")?;
                let mut c = Command::new("apt-get");
                c.current_dir(&cache)
                    .args(["download", "-q", "busybox-static"]);
                status(c, "apt-get download busybox-static")?;
            }
            find_deb(&cache, "busybox-static_")?
                .context("apt-get download left no busybox-static .deb")?
        }
    };
    extract_deb(&deb, &dir)?;
    if !bin.exists() {
        bail!("{} has no bin/busybox", deb.display());
    }
    Ok(bin)
}

fn find_deb(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
        })
        .collect();
    found.sort_by(|a, b| vercmp(&a.to_string_lossy(), &b.to_string_lossy()));
    Ok(found.pop())
}

fn extract_deb(deb: &Path, dir: &Path) -> Result<()> {
    let tmp = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut c = Command::new("dpkg-deb");
    c.arg("-x").arg(deb).arg(&tmp);
    status(c, &format!("dpkg-deb -x {}", deb.display()))?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))
}

// ---------------------------------------------------------------- kernels

/// `apt-get`/`apt-cache` with the private config of one suite.
fn apt(aptdir: &Path, program: &str) -> Command {
    let mut c = Command::new(program);
    let o = |k: &str, v: &Path| format!("{k}={}", v.display());
    c.arg("-o")
        .arg(o("Dir::Etc::SourceList", &aptdir.join("sources.list")))
        .arg("-o")
        .arg(o("Dir::Etc::SourceParts", &aptdir.join("sources.list.d")))
        .arg("-o")
        .arg(o(
            "Dir::Etc::PreferencesParts",
            &aptdir.join("preferences.d"),
        ))
        .arg("-o")
        .arg(o("Dir::Etc::Preferences", &aptdir.join("preferences")))
        .arg("-o")
        .arg(o("Dir::State::Lists", &aptdir.join("lists")))
        .arg("-o")
        .arg(o("Dir::Cache", &aptdir.join("cache")))
        .arg("-o")
        .arg(o("Dir::State::status", &aptdir.join("status")))
        .args([
            "-o",
            "Acquire::Languages=none",
            "-o",
            "APT::Architectures::=amd64",
        ]);
    c
}

/// apt stamps list files with the server's dates, so freshness is our own stamp's mtime.
fn lists_fresh(aptdir: &Path) -> bool {
    let has_lists = fs::read_dir(aptdir.join("lists")).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
    });
    has_lists
        && fs::metadata(aptdir.join("updated"))
            .and_then(|m| m.modified())
            .is_ok_and(|m| {
                SystemTime::now()
                    .duration_since(m)
                    .is_ok_and(|age| age < LISTS_MAX_AGE)
            })
}

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
fn fetch_kernel(vm: &Path, k: &KernelLine, refresh: bool) -> Result<(String, PathBuf)> {
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

fn kernel_release(pkg: &str) -> &str {
    pkg.strip_prefix("linux-image-").unwrap_or(pkg)
}

/// Debian-ish version order: runs of digits compare as numbers, the rest as bytes.
fn vercmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut v = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                v.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        v
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let o = if x.0 && y.0 {
            let (nx, ny) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
            nx.len().cmp(&ny.len()).then(nx.cmp(ny))
        } else {
            x.1.cmp(y.1)
        };
        if o.is_ne() {
            return o;
        }
    }
    ca.len().cmp(&cb.len())
}

// ---------------------------------------------------------------- test binary

/// The real-kernel suites of `tests/tests/` that run in every guest, in this order.
const SUITES: [&str; 2] = ["kernel", "operator"];

fn build_kernel_tests(root: &Path, obj: &Path, suite: &str) -> Result<PathBuf> {
    let mut c = stable_cargo(root, obj);
    c.args([
        "test",
        "--release",
        "--no-run",
        "-p",
        "enforcer-tests",
        "--test",
        suite,
        "--message-format=json",
    ])
    .stderr(Stdio::inherit());
    let out = c.output().context("could not start cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "cargo test --no-run failed ({}); see the output above",
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let src = root.join("tests").join("tests").join(format!("{suite}.rs"));
    let src_json = format!("\"src_path\":\"{}\"", src.display());
    for line in text.lines() {
        if line.contains("\"reason\":\"compiler-artifact\"")
            && line.contains(&src_json)
            && line.contains("\"test\":true")
            && let Some(exe) = json_str(line, "executable")
        {
            return Ok(PathBuf::from(exe));
        }
    }
    // Fallback: the newest target/release/deps/<suite>-<hash>.
    let deps = root.join("target").join("release").join("deps");
    let newest = fs::read_dir(&deps)
        .with_context(|| format!("reading {}", deps.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&format!("{suite}-")) && !n.contains('.')
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    newest.map(|(_, p)| p).with_context(|| {
        format!("cargo test --no-run named no executable for tests/tests/{suite}.rs")
    })
}

/// The string value of `"key":"..."` in one line of cargo's JSON (paths: no escapes expected).
fn json_str(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let mut out = String::new();
    let mut chars = line[start..].chars();
    while let Some(ch) = chars.next() {
        match ch {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}

// ---------------------------------------------------------------- initramfs

const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin 2>/dev/null
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
# /tmp stays on the (writable) initramfs root: a tmpfs there would hide the probe, which the
# tests find by the absolute path they were compiled with (often under /tmp for a clone).
chmod 1777 /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "vm-test: no cgroup2 mount"
mount -t bpf bpf /sys/fs/bpf || echo "vm-test: no bpffs mount"
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ip link set lo up
hostname vmtest
echo "=== VMTEST BEGIN $(uname -r) cpus=$(nproc)"
for f in /sys/kernel/btf/vmlinux /sys/fs/bpf /sys/kernel/tracing/events; do
  [ -e $f ] && echo "vm-test: $f present" || echo "vm-test: $f MISSING"
done
cd /tmp
unset CI
export HOME=/root ENFORCER_AGENT_BIN=/bin/enforcer-agent RUST_BACKTRACE=1
rc=0
for t in /tests/*; do
  "$t" --test-threads=1 @FILTER@ 2>&1 || rc=$?
done
echo "=== VMTEST EXIT $rc"
echo "=== VMTEST PROBE BEGIN"
/bin/enforcer-agent probe --json 2>/dev/null
echo "=== VMTEST PROBE END"
echo "=== VMTEST REJECT BEGIN"
/bin/enforcer-agent load-program enf_reject --object /bin/enforcer-test.o 2>&1
echo "=== VMTEST REJECT END"
if [ "$rc" != 0 ]; then
  echo "=== VMTEST DMESG BEGIN"
  dmesg
  echo "=== VMTEST DMESG END"
fi
poweroff -f
"#;

/// A newc cpio archive being written in memory.
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    seen: BTreeSet<String>,
}

impl Cpio {
    fn new() -> Self {
        Self {
            buf: Vec::new(),
            ino: 1,
            seen: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// A directory and its parents, once each.
    fn dir(&mut self, path: &str) {
        let mut cur = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            if self.seen.insert(cur.clone()) {
                let c = cur.clone();
                self.entry(&c, 0o040755, &[]);
            }
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        if self.seen.insert(path.to_string()) {
            self.entry(path, 0o100000 | mode, data);
        }
    }

    fn host_file(&mut self, path: &str, host: &Path) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.file(path, mode, &data);
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        if self.seen.insert(path.to_string()) {
            self.entry(path, 0o120777, target.as_bytes());
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

/// The shared libraries (and the loader) `ldd` lists for a binary.
fn ldd(bin: &Path) -> Result<Vec<PathBuf>> {
    let mut c = Command::new("ldd");
    c.arg(bin);
    let out = c
        .output()
        .with_context(|| format!("running ldd {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path
            && p.starts_with('/')
        {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            bail!("ldd {}: {line}", bin.display());
        }
    }
    Ok(libs)
}

fn build_initramfs(
    out: &Path,
    busybox: &Path,
    tests: &[PathBuf],
    agent: &Path,
    probe: &Path,
    filter: &[String],
) -> Result<()> {
    let mut cpio = Cpio::new();
    for d in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/var/tmp",
    ] {
        cpio.dir(d);
    }
    cpio.file(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    );
    cpio.file("/etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n");
    cpio.file("/etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n");
    cpio.host_file("/bin/busybox", busybox)?;
    for applet in [
        "sh", "true", "false", "mount", "mkdir", "ip", "poweroff", "cat", "echo", "sleep", "ls",
        "dmesg", "uname", "grep", "tail", "sed", "nproc", "hostname", "env",
    ] {
        cpio.symlink(&format!("/bin/{applet}"), "busybox");
    }
    cpio.file(
        "/init",
        0o755,
        INIT.replace("@FILTER@", &shell_words(filter)).as_bytes(),
    );
    cpio.dir("/tests");
    for (i, t) in tests.iter().enumerate() {
        cpio.host_file(
            &format!("/tests/{i}-{}", SUITES.get(i).unwrap_or(&"suite")),
            t,
        )?;
    }
    cpio.host_file("/bin/enforcer-agent", agent)?;
    // The test-only kernel object, for the rejection demonstration (`load-program --object`).
    cpio.host_file(
        "/bin/enforcer-test.o",
        &crate::ebpf_test_obj(&crate::workspace_root()?),
    )?;
    // The tests find the probe by the absolute path compiled into them.
    let probe_abs = fs::canonicalize(probe).unwrap_or_else(|_| probe.to_path_buf());
    cpio.host_file(&probe_abs.to_string_lossy(), probe)?;
    if probe_abs != probe {
        cpio.host_file(&probe.to_string_lossy(), probe)?;
    }
    let mut libs = BTreeSet::new();
    for b in tests.iter().map(PathBuf::as_path).chain([agent, probe]) {
        libs.extend(ldd(b)?);
    }
    for lib in &libs {
        cpio.host_file(&lib.to_string_lossy(), lib)?;
    }
    let data = cpio.finish();
    let mut c = Command::new("gzip");
    c.args(["-6", "-n"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = c.spawn().context("starting gzip")?;
    let mut stdin = child.stdin.take().context("gzip stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let o = child.wait_with_output().context("gzip")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("gzip writer panicked"))?
        .context("writing to gzip")?;
    if !o.status.success() {
        bail!("gzip failed ({})", o.status);
    }
    fs::write(out, &o.stdout).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "xtask: initramfs {} ({:.1} MiB; libs: {})",
        out.display(),
        o.stdout.len() as f64 / 1048576.0,
        libs.iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------- boot and parse

#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Pass,
    Fail,
    Skipped,
}

struct GuestResult {
    tests: BTreeMap<String, Outcome>,
    /// Tests libtest announced (`running N tests`).
    expected: Option<usize>,
    /// The test binary's exit code, when the guest reached the end.
    exit: Option<i32>,
    timed_out: bool,
    wall: Duration,
    /// Tests that returned early because the kernel lacks a feature: test -> feature.
    skipped_for: BTreeMap<String, String>,
    /// `enforcer-agent probe --json` run in the guest.
    probe: Option<serde_json::Value>,
    /// What `enforcer-agent load-program enf_reject` printed in the guest.
    reject: String,
    /// The guest's kernel log (only when its tests failed).
    dmesg: String,
    /// Verifier log blocks the agent printed (outside the `enf_reject` demonstration).
    verifier: Vec<String>,
}

impl GuestResult {
    fn ok(&self) -> bool {
        self.exit == Some(0) && !self.timed_out && !self.tests.values().any(|o| *o == Outcome::Fail)
    }

    fn summary(&self) -> String {
        let n = |o| self.tests.values().filter(|x| **x == o).count();
        let mut s = format!(
            "{} passed, {} failed, {} skipped",
            n(Outcome::Pass),
            n(Outcome::Fail),
            n(Outcome::Skipped)
        );
        if let Some(e) = self.expected
            && e > self.tests.len()
        {
            s.push_str(&format!(", {} not reached", e - self.tests.len()));
        }
        if self.timed_out {
            s.push_str(", TIMED OUT");
        } else {
            match self.exit {
                Some(c) => s.push_str(&format!(", test binary exit {c}")),
                None => s.push_str(", guest stopped before the tests ended"),
            }
        }
        s
    }
}

fn boot(kernel: &Path, initrd: &Path, log: &Path, timeout: Duration) -> Result<GuestResult> {
    let t0 = Instant::now();
    // The serial console goes straight to a file: a pipe that fills up makes QEMU's UART
    // drop (and garble) guest output, which lost test lines under load.
    let _ = fs::remove_file(log);
    let mut c = clean_command("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet random.trust_cpu=on",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().context("starting qemu-system-x86_64")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    // Progress: the test lines of the console file as they arrive.
    let mut shown = 0usize;
    let mut progress = move || {
        let Ok(bytes) = fs::read(log) else {
            return;
        };
        let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        if end < shown {
            return;
        }
        for raw in bytes[shown..=end].split(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(raw);
            let line = line.trim_end();
            let line = line.find("=== VMTEST").map_or(line, |i| &line[i..]);
            if line.starts_with("test ")
                || line.starts_with("running ")
                || line.contains("=== VMTEST")
                || line.starts_with("vm-test:")
            {
                eprintln!("  guest| {line}");
            }
        }
        shown = end + 1;
    };
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut timed_out = false;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        progress();
        if t0.elapsed() > timeout {
            timed_out = true;
            eprintln!(
                "xtask: the guest ran past {}s: stopping QEMU",
                timeout.as_secs()
            );
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    progress();
    let qemu_err = err_reader.join().unwrap_or_default();
    if !qemu_err.trim().is_empty() {
        eprintln!("xtask: qemu stderr: {}", qemu_err.trim());
    }
    let text = fs::read(log).with_context(|| format!("reading {}", log.display()))?;
    let mut r = parse_log(&String::from_utf8_lossy(&text));
    r.timed_out = timed_out;
    r.wall = t0.elapsed();
    Ok(r)
}

fn parse_log(text: &str) -> GuestResult {
    let mut tests = BTreeMap::new();
    let mut expected = None;
    let mut exit = None;
    let mut pending: Option<String> = None;
    let mut skipped_for = BTreeMap::new();
    let mut block: Option<(&str, Vec<String>)> = None;
    let mut probe_text = String::new();
    let mut reject = String::new();
    let mut dmesg = String::new();
    let mut verifier: Vec<String> = Vec::new();
    let mut in_verifier: Option<Vec<String>> = None;
    let outcome = |s: &str| -> Option<Outcome> {
        let s = s.trim();
        if s.starts_with("ok") {
            Some(Outcome::Pass)
        } else if s.starts_with("FAILED") {
            Some(Outcome::Fail)
        } else if s.starts_with("ignored") {
            Some(Outcome::Skipped)
        } else {
            None
        }
    };
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        let line = line.find("=== VMTEST").map_or(line, |i| &line[i..]);
        // Marked blocks: the probe's JSON, the rejection demonstration, the kernel log.
        if let Some(rest) = line.strip_prefix("=== VMTEST ") {
            match rest.trim().split_once(' ') {
                Some((what, "BEGIN")) if what != "EXIT" => {
                    block = Some(match what {
                        "PROBE" => ("probe", Vec::new()),
                        "REJECT" => ("reject", Vec::new()),
                        _ => ("dmesg", Vec::new()),
                    });
                    continue;
                }
                Some((_, "END")) => {
                    if let Some((what, lines)) = block.take() {
                        let text = lines.join("\n");
                        match what {
                            "probe" => probe_text = text,
                            "reject" => reject = text,
                            _ => dmesg = text,
                        }
                    }
                    continue;
                }
                _ => {}
            }
        }
        if let Some((what, lines)) = &mut block {
            if *what != "probe" || !line.starts_with('[') || line.trim() == "[" {
                lines.push(line.to_string());
            }
            continue;
        }
        // A verifier log the agent printed (a rejected program), kept whole.
        if line.contains("--- verifier log of ") {
            in_verifier = Some(Vec::new());
        }
        if let Some(v) = &mut in_verifier {
            v.push(line.to_string());
            if line.contains("--- end of verifier log ---") {
                verifier.push(v.join("\n"));
                in_verifier = None;
            }
        }
        if let Some(i) = line.find("vm-test: skipped: kernel lacks ") {
            let rest = &line[i + "vm-test: skipped: kernel lacks ".len()..];
            let feature = rest.split_whitespace().next().unwrap_or("?").to_string();
            let test = rest
                .split_once("(test ")
                .and_then(|(_, t)| t.split_once(')'))
                .map(|(t, _)| t.to_string())
                .or_else(|| pending.clone());
            if let Some(t) = test {
                skipped_for.insert(t, feature);
            }
        }
        if let Some(rest) = line.strip_prefix("=== VMTEST EXIT ") {
            exit = rest.trim().parse().ok();
            continue;
        }
        if let Some(rest) = line.strip_prefix("running ")
            && let Some(n) = rest.strip_suffix(" tests").or(rest.strip_suffix(" test"))
        {
            // One `running N tests` line per suite: the guest runs them all.
            if let Ok(n) = n.trim().parse::<usize>() {
                expected = Some(expected.unwrap_or(0) + n);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, after)) = rest.split_once(" ... ")
            && !name.contains(' ')
        {
            match outcome(after) {
                Some(o) => {
                    tests.insert(name.to_string(), o);
                    pending = None;
                }
                None => pending = Some(name.to_string()),
            }
            continue;
        }
        if let Some(p) = &pending {
            // Output of a child process (or the kernel) landed between the name and the verdict.
            for word in ["ok", "FAILED", "ignored"] {
                if line.trim_end().ends_with(word) || line.trim() == word {
                    if let Some(o) = outcome(word) {
                        tests.insert(p.clone(), o);
                    }
                    pending = None;
                    break;
                }
            }
        }
    }
    if let Some(v) = in_verifier {
        verifier.push(v.join("\n"));
    }
    for t in skipped_for.keys() {
        if let Some(o) = tests.get_mut(t)
            && *o == Outcome::Pass
        {
            *o = Outcome::Skipped;
        }
    }
    GuestResult {
        tests,
        expected,
        exit,
        timed_out: false,
        wall: Duration::ZERO,
        skipped_for,
        probe: serde_json::from_str(probe_text.trim()).ok(),
        reject,
        dmesg,
        verifier,
    }
}

fn print_table(results: &[(String, GuestResult)]) {
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for (_, r) in results {
        names.extend(r.tests.keys().map(String::as_str));
    }
    let w0 = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4);
    let widths: Vec<usize> = results.iter().map(|(l, _)| l.len().max(7)).collect();
    println!();
    print!("{:w0$}", "test");
    for ((l, _), w) in results.iter().zip(&widths) {
        print!("  {l:w$}");
    }
    println!();
    print!("{}", "-".repeat(w0));
    for w in &widths {
        print!("  {}", "-".repeat(*w));
    }
    println!();
    for n in &names {
        print!("{n:w0$}");
        for ((_, r), w) in results.iter().zip(&widths) {
            let cell = test_cell(r, n);
            print!("  {cell:w$}");
        }
        println!();
    }
    print!("{:w0$}", "(guest)");
    for ((_, r), w) in results.iter().zip(&widths) {
        let cell = if r.ok() {
            "ok"
        } else if r.timed_out {
            "TIMEOUT"
        } else if r.exit.is_none() {
            "DIED"
        } else {
            "FAILED"
        };
        print!("  {cell:w$}");
    }
    println!();
}

/// The `failures:` section libtest prints (when present) and the last lines of the console.
fn log_tail(log: &Path) -> String {
    let text = fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    if let Some(i) = lines.iter().position(|l| *l == "failures:") {
        let end = (i + 200).min(lines.len());
        for l in &lines[i..end] {
            out.push_str(l);
            out.push('\n');
        }
        if end < lines.len() {
            out.push_str("[...]\n");
        }
    }
    let start = lines.len().saturating_sub(60);
    out.push_str("--- last console lines ---\n");
    for l in &lines[start..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// One cell of the kernel x test table.
fn test_cell(r: &GuestResult, test: &str) -> String {
    match r.tests.get(test) {
        Some(Outcome::Pass) => "pass".into(),
        Some(Outcome::Fail) => "FAIL".into(),
        Some(Outcome::Skipped) => match r.skipped_for.get(test) {
            Some(f) => format!("skipped ({f})"),
            None => "skipped".into(),
        },
        None => "-".into(),
    }
}

/// Kernel log lines printed for a failed guest.
const DMESG_TAIL: usize = 200;

/// What a failed guest leaves to read: verifier logs of rejected programs and the kernel log.
fn failure_details(label: &str, r: &GuestResult) -> String {
    let mut out = String::new();
    for v in &r.verifier {
        out.push_str(&format!(
            "\n--- {label}: a program was rejected by the verifier ---\n{v}\n"
        ));
    }
    if r.dmesg.trim().is_empty() {
        out.push_str(&format!(
            "\n--- {label}: no kernel log (the guest stopped before it could print one) ---\n"
        ));
    } else {
        // The end of the kernel log is where a failure shows; the boot is in the console log.
        let lines: Vec<&str> = r.dmesg.lines().collect();
        let start = lines.len().saturating_sub(DMESG_TAIL);
        out.push_str(&format!(
            "\n--- {label}: kernel log (dmesg, last {} of {} lines; all of it is in the console log) ---\n{}\n--- end of kernel log ---\n",
            lines.len() - start,
            lines.len(),
            lines[start..].join("\n")
        ));
    }
    out
}

/// The kernel x feature table (from each guest's `enforcer-agent probe --json`), the kernel x
/// test table, and what a rejected program prints on the oldest kernel, as Markdown.
fn matrix_markdown(names: &[&str], results: &[(String, GuestResult)]) -> String {
    let col = |i: usize, r: &GuestResult| -> String {
        let release = r
            .probe
            .as_ref()
            .and_then(|p| p["release"].as_str())
            .unwrap_or("?");
        format!("{} (`{release}`)", names.get(i).copied().unwrap_or("?"))
    };
    let header = |first: &str| -> String {
        let mut h = format!("| {first} |");
        let mut sep = String::from("| --- |");
        for (i, (_, r)) in results.iter().enumerate() {
            h.push_str(&format!(" {} |", col(i, r)));
            sep.push_str(" --- |");
        }
        format!("{h}\n{sep}\n")
    };
    let mut md = String::new();
    md.push_str("Kernel x feature, as `enforcer-agent probe` finds it in each guest (required: the agent refuses to start without it; optional: it starts and says what it loses):\n\n");
    md.push_str(&header("feature"));
    // Rows in the probe's order, from the first guest that printed one.
    let mut rows: Vec<(String, bool, String)> = Vec::new();
    for (_, r) in results {
        if let Some(fs) = r.probe.as_ref().and_then(|p| p["features"].as_array()) {
            for f in fs {
                let name = f["name"].as_str().unwrap_or("?").to_string();
                if !rows.iter().any(|(n, _, _)| *n == name) {
                    rows.push((
                        name,
                        f["required"] == true,
                        f["without"].as_str().unwrap_or("").to_string(),
                    ));
                }
            }
        }
    }
    for (name, required, _) in &rows {
        let need = if *required { "required" } else { "optional" };
        md.push_str(&format!("| `{name}` ({need}) |"));
        for (_, r) in results {
            let f = r.probe.as_ref().and_then(|p| {
                p["features"]
                    .as_array()?
                    .iter()
                    .find(|f| f["name"] == name.as_str())
                    .cloned()
            });
            let cell = match f {
                Some(f) if f["found"] == true => "yes",
                Some(_) => "**missing**",
                None => "-",
            };
            md.push_str(&format!(" {cell} |"));
        }
        md.push('\n');
    }
    md.push_str("| agent starts |");
    for (_, r) in results {
        let cell = match r.probe.as_ref().map(|p| p["supported"] == true) {
            Some(true) => "yes",
            Some(false) => "**refuses**",
            None => "-",
        };
        md.push_str(&format!(" {cell} |"));
    }
    md.push_str("\n\nWithout an optional feature:\n\n");
    for (name, required, without) in &rows {
        if !required {
            md.push_str(&format!("- `{name}`: {without}.\n"));
        }
    }
    md.push_str("\nKernel x test (`tests/tests/kernel.rs` and `tests/tests/operator.rs`, run inside each guest):\n\n");
    md.push_str(&header("test"));
    let mut tests: BTreeSet<&str> = BTreeSet::new();
    for (_, r) in results {
        tests.extend(r.tests.keys().map(String::as_str));
    }
    for t in &tests {
        md.push_str(&format!("| `{t}` |"));
        for (_, r) in results {
            md.push_str(&format!(" {} |", test_cell(r, t)));
        }
        md.push('\n');
    }
    md.push_str("| (guest) |");
    for (_, r) in results {
        md.push_str(&format!(" {} |", if r.ok() { "ok" } else { "**FAILED**" }));
    }
    md.push('\n');
    if let Some((i, (_, r))) = results
        .iter()
        .enumerate()
        .find(|(_, (_, r))| !r.reject.trim().is_empty())
    {
        md.push_str(&format!(
            "\nWhat the agent prints when the kernel verifier rejects one of its programs (`enforcer-agent load-program enf_reject --object enforcer-test.o`, a program that is wrong on purpose), on {}:\n\n```text\n{}\n```\n",
            col(i, r),
            r.reject
                .lines()
                // Timings change from run to run; the table should not.
                .map(|l| if l.starts_with("verification time") {
                    "verification time … usec"
                } else {
                    l
                })
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
        ));
    }
    md
}

const README_BEGIN: &str = "<!-- kernel-matrix:begin -->";
const README_END: &str = "<!-- kernel-matrix:end -->";

/// Replaces the marked section of README.md with the tables.
fn update_readme(readme: &Path, md: &str) -> Result<()> {
    let text =
        fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(b), Some(e)) = (text.find(README_BEGIN), text.find(README_END)) else {
        bail!(
            "{} has no `{README_BEGIN}` ... `{README_END}` section; add the two markers where the tables go",
            readme.display()
        );
    };
    if e < b {
        bail!(
            "{}: `{README_END}` comes before `{README_BEGIN}`",
            readme.display()
        );
    }
    let new = format!(
        "{}{README_BEGIN}\n<!-- generated by `cargo xtask vm-test --kernel all --update-readme`; do not edit by hand -->\n\n{}\n{}",
        &text[..b],
        md.trim_end(),
        &text[e..]
    );
    fs::write(readme, new).with_context(|| format!("writing {}", readme.display()))?;
    eprintln!("xtask: updated the kernel matrix in {}", readme.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_log_reads_skips_probe_reject_and_dmesg() {
        let log = "\
=== VMTEST BEGIN 5.10.0-46-amd64 cpus=2\r
running 3 tests\r
test a_test ... ok\r
test needs_btf ... vm-test: skipped: kernel lacks btf (test needs_btf): \"no BTF\"\r
ok\r
test broken ... [   12.3] some kernel line\r
enforcer-agent: error: the kernel (release 5.10) refused to load program enf_x (raw_tracepoint): Permission denied\r
--- verifier log of enf_x: 2 of 2 lines ---\r
0: (b7) r0 = 0\r
invalid bpf_context access off=4000 size=4\r
--- end of verifier log ---\r
FAILED\r
=== VMTEST EXIT 101\r
=== VMTEST PROBE BEGIN\r
{\"release\": \"5.10.0-46-amd64\", \"supported\": true,\r
 \"features\": [{\"name\": \"btf\", \"required\": false, \"found\": false, \"without\": \"held\"}]}\r
=== VMTEST PROBE END\r
=== VMTEST REJECT BEGIN\r
rejected text\r
=== VMTEST REJECT END\r
=== VMTEST DMESG BEGIN\r
[    0.0] Linux version 5.10\r
=== VMTEST DMESG END\r
";
        let r = parse_log(log);
        assert_eq!(r.expected, Some(3));
        assert_eq!(r.exit, Some(101));
        assert!(r.tests["a_test"] == Outcome::Pass);
        assert!(r.tests["needs_btf"] == Outcome::Skipped);
        assert!(r.tests["broken"] == Outcome::Fail);
        assert_eq!(test_cell(&r, "needs_btf"), "skipped (btf)");
        assert_eq!(test_cell(&r, "a_test"), "pass");
        let probe = r.probe.as_ref().expect("probe JSON parsed");
        assert_eq!(probe["release"], "5.10.0-46-amd64");
        assert_eq!(r.reject, "rejected text");
        assert!(r.dmesg.contains("Linux version"), "{}", r.dmesg);
        assert_eq!(r.verifier.len(), 1);
        assert!(r.verifier[0].contains("invalid bpf_context access"));
        let details = failure_details("5.10", &r);
        assert!(details.contains("rejected by the verifier") && details.contains("kernel log"));
        let md = matrix_markdown(&["5.10"], &[("5.10".into(), r)]);
        assert!(md.contains("| `btf` (optional) | **missing** |"), "{md}");
        assert!(md.contains("| `needs_btf` | skipped (btf) |"), "{md}");
        assert!(md.contains("rejected text"), "{md}");
    }

    #[test]
    fn readme_section_is_replaced_between_markers() {
        let dir = std::env::temp_dir().join(format!("vmtest-readme-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let readme = dir.join("README.md");
        fs::write(
            &readme,
            format!("a\n{README_BEGIN}\nold\n{README_END}\nb\n"),
        )
        .expect("write");
        update_readme(&readme, "new table\n").expect("update");
        let text = fs::read_to_string(&readme).expect("read");
        assert!(text.starts_with("a\n") && text.ends_with(&format!("{README_END}\nb\n")));
        assert!(
            text.contains("new table") && !text.contains("old"),
            "{text}"
        );
        fs::write(&readme, "no markers").expect("write");
        assert!(update_readme(&readme, "x").is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
