//! `cargo xtask vm-test`: the real-kernel tests inside Debian kernels booted under QEMU.
//!
//! For each kernel: fetch Debian's `linux-image-*-amd64` through a private apt config (the
//! machine's sources are never touched; `kernel.rs`, `debian.rs`), build one initramfs (static
//! busybox, the test binaries, the agent, the probe and the glibc they load; `host.rs`,
//! `guest.rs`, `cpio.rs`), boot it under TCG with the serial console captured to
//! `target/vm/<kernel>.log` (`qemu.rs`), parse the libtest lines (`log.rs`) into a kernel x
//! test table (`report.rs`). Downloads are cached under `target/vm`; a second run fetches
//! nothing.

mod cpio;
mod debian;
mod guest;
mod host;
mod kernel;
mod log;
mod qemu;
mod report;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use self::kernel::{KERNELS, KernelLine};
use crate::{build::build, cmd::step};

/// The kernel line booted when none is named.
const DEFAULT_KERNEL: &str = "6.1";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Kernel lines to boot: 5.10, 6.1, 6.12, 7.2 or all (comma-separated or repeated;
    /// default 6.1).
    #[arg(short, long, value_name = "KERNEL", value_delimiter = ',')]
    pub kernel: Vec<String>,
    /// Stop a guest that runs longer than this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 15 * 60)]
    pub timeout: u64,
    /// Ask apt for newer kernels than the ones kept under target/vm/kernels.
    #[arg(long)]
    pub refresh: bool,
    /// Write the kernel x feature and kernel x test tables into README.md.
    #[arg(long)]
    pub update_readme: bool,
    /// libtest filters for the suites run in each guest.
    #[arg(value_name = "TEST-FILTER")]
    pub filter: Vec<String>,
}

impl Args {
    /// One kernel line, every other option at its default.
    pub fn kernel(name: &str) -> Self {
        Self {
            kernel: vec![name.to_string()],
            timeout: 15 * 60,
            refresh: false,
            update_readme: false,
            filter: Vec::new(),
        }
    }
}

/// The kernel lines named (`all` for every one), each once, in the order given; 6.1 when
/// none is named.
pub fn resolve_kernels(names: &[String]) -> Result<Vec<&'static KernelLine>> {
    let mut kernels = Vec::new();
    for k in names {
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
    if kernels.is_empty() {
        kernels.push(
            KERNELS
                .iter()
                .find(|l| l.name == DEFAULT_KERNEL)
                .context("the default kernel line is not listed")?,
        );
    }
    let mut seen = BTreeSet::new();
    kernels.retain(|k| seen.insert(k.name));
    Ok(kernels)
}

pub fn vm_test(root: &Path, args: &Args) -> Result<()> {
    let t0 = Instant::now();
    let kernels = resolve_kernels(&args.kernel)?;
    let timeout = Duration::from_secs(args.timeout);
    let vm = root.join("target").join("vm");
    let cache = vm.join("cache");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    host::ensure_qemu(&vm)?;
    let busybox = host::ensure_busybox(&vm)?;

    // Kernels first: a mirror problem shows before minutes of building.
    let mut vmlinuz = Vec::new();
    for k in &kernels {
        vmlinuz.push(kernel::fetch_kernel(&vm, k, args.refresh)?);
    }

    let obj = build(root)?;
    step("building the real-kernel test binaries (enforcer-tests, release)");
    let tests_bin: Vec<PathBuf> = guest::SUITES
        .iter()
        .map(|suite| guest::build_kernel_tests(root, &obj, suite))
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
    guest::build_initramfs(&initrd, &busybox, &tests_bin, &agent, &probe, &args.filter)?;

    let mut results: Vec<(String, log::GuestResult)> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for (k, (pkg, kimg)) in kernels.iter().zip(&vmlinuz) {
        let log = vm.join(format!("{}.log", k.name));
        step(&format!(
            "booting {pkg} under QEMU/TCG (console: {})",
            log.display()
        ));
        let r = qemu::boot(kimg, &initrd, &log, timeout)?;
        eprintln!(
            "xtask: {} finished in {:.1}s: {}",
            k.name,
            r.wall.as_secs_f64(),
            r.summary()
        );
        results.push((format!("{} ({})", k.name, kernel::kernel_release(pkg)), r));
        names.push(k.name);
    }

    report::print_table(&results);
    let mut failed = false;
    for ((label, r), k) in results.iter().zip(&kernels) {
        if !r.ok() {
            failed = true;
            let log = vm.join(format!("{}.log", k.name));
            println!(
                "\n--- {label}: {} ; console log {} (tail) ---",
                r.summary(),
                log.display()
            );
            print!("{}", report::log_tail(&log));
            print!("{}", report::failure_details(label, r));
        }
    }
    let md = report::matrix_markdown(&names, &results);
    let matrix = vm.join("matrix.md");
    fs::write(&matrix, &md).with_context(|| format!("writing {}", matrix.display()))?;
    println!("\n{md}");
    eprintln!(
        "xtask: kernel x feature and kernel x test tables: {}",
        matrix.display()
    );
    if args.update_readme {
        report::update_readme(&root.join("README.md"), &md)?;
    }
    eprintln!("xtask: vm-test took {:.1}s", t0.elapsed().as_secs_f64());
    if failed {
        bail!("some kernel tests failed in the VMs (table above)");
    }
    Ok(())
}
