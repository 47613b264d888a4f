//! What the guest runs: the real-kernel test binaries, built on the host, and the initramfs
//! holding them with busybox, the agent, the probe, the libraries they load and `/init`.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use super::cpio::Cpio;
use crate::cmd::stable_cargo;

/// The real-kernel suites of `tests/tests/` that run in every guest, in this order.
pub const SUITES: [&str; 3] = ["kernel", "operator", "adversarial"];

/// Builds one suite's test binary (release); returns its path.
pub fn build_kernel_tests(root: &Path, obj: &Path, suite: &str) -> Result<PathBuf> {
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

/// Writes the gzipped initramfs to `out`: busybox, `/init` (running `filter` in each suite),
/// the test binaries, the agent, the probe and the shared libraries they load.
pub fn build_initramfs(
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
        &crate::build::ebpf_test_obj(&crate::cmd::workspace_root()?),
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

/// Words quoted for `sh`.
fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_reach_init_quoted_for_sh() {
        let words = ["plain".to_string(), "it's here".to_string()];
        assert_eq!(shell_words(&words), r#"'plain' 'it'\''s here'"#);
        assert_eq!(shell_words(&[]), "");
        assert!(INIT.contains("--test-threads=1 @FILTER@"));
    }

    #[test]
    fn json_str_reads_cargo_artifact_lines() {
        let line = r#"{"reason":"compiler-artifact","executable":"/t/release/deps/kernel-0a1b","fresh":true}"#;
        assert_eq!(
            json_str(line, "executable").as_deref(),
            Some("/t/release/deps/kernel-0a1b")
        );
        assert_eq!(json_str(line, "missing"), None);
        assert_eq!(json_str(r#"{"k":"a\"b"}"#, "k").as_deref(), Some("a\"b"));
    }
}
