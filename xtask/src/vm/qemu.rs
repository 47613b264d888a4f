//! Booting a guest under QEMU/TCG with the serial console written to a file, showing its
//! test lines as they arrive, and stopping it at the time-out.

use std::{
    fs,
    io::BufReader,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::log::{GuestResult, parse_log};
use crate::cmd::clean_command;

/// Boots `kernel` with `initrd`, the console written to `log`; stops QEMU past `timeout`.
pub fn boot(kernel: &Path, initrd: &Path, log: &Path, timeout: Duration) -> Result<GuestResult> {
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
