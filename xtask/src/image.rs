//! `cargo xtask image`: the agent's OCI image (a static musl binary on an empty base), and the
//! test images the node suite imports into containerd (a pause image and an enf-probe image).

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    build::build,
    cmd::{stable_cargo, status, step},
    oci,
    toolchain::MUSL_TARGET,
};

/// The workspace version (xtask's own is the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The largest agent image `cargo xtask image` accepts.
pub const MAX_IMAGE_BYTES: usize = 20 * 1024 * 1024;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write the image archive (default target/images/enforcer-agent-VERSION.tar).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The agent image's reference.
pub fn agent_reference() -> String {
    format!("localhost/enforcer-agent:{VERSION}")
}

pub fn images_dir(root: &Path) -> PathBuf {
    root.join("target").join("images")
}

pub fn image(root: &Path, args: &Args) -> Result<()> {
    let obj = build(root)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| images_dir(root).join(format!("enforcer-agent-{VERSION}.tar")));
    let digest = agent_image(root, &obj, &out)?;
    println!("{digest}");
    Ok(())
}

/// Builds the static agent and writes its image to `out`; returns the image digest.
pub fn agent_image(root: &Path, obj: &Path, out: &Path) -> Result<String> {
    let bin = build_musl(
        root,
        obj,
        &["-p", "enforcer-agent", "--bin", "enforcer-agent"],
    )?
    .join("enforcer-agent");
    let bytes = read_static(&bin)?;
    let archive = agent_archive(bytes)?;
    write_archive(out, &archive)?;
    step(&format!(
        "image {} -> {} ({:.1} MB, {})",
        agent_reference(),
        out.display(),
        archive.tar.len() as f64 / 1e6,
        archive.manifest_digest
    ));
    Ok(archive.manifest_digest)
}

/// The agent's image around a static agent binary; refused above [`MAX_IMAGE_BYTES`].
pub fn agent_archive(agent: Vec<u8>) -> Result<oci::Archive> {
    let archive = oci::write(&oci::Image {
        reference: agent_reference(),
        entrypoint: vec!["/enforcer-agent".to_string()],
        cmd: vec!["run".to_string()],
        files: vec![oci::File {
            path: "/enforcer-agent".to_string(),
            mode: 0o755,
            bytes: agent,
        }],
    })?;
    if archive.tar.len() > MAX_IMAGE_BYTES {
        bail!(
            "the agent image is {} bytes, above the limit of {MAX_IMAGE_BYTES} (20 MB): look for what grew the static binary",
            archive.tar.len()
        );
    }
    Ok(archive)
}

fn write_archive(out: &Path, archive: &oci::Archive) -> Result<()> {
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = out.with_extension("tar.tmp");
    fs::write(&tmp, &archive.tar).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, out).with_context(|| format!("renaming {} into place", tmp.display()))
}

/// `cargo build --release --target MUSL ARGS`; returns the folder of the built binaries.
fn build_musl(root: &Path, obj: &Path, args: &[&str]) -> Result<PathBuf> {
    let t0 = Instant::now();
    step(&format!(
        "building {} (static, {MUSL_TARGET})",
        args.join(" ")
    ));
    // ring (rustls' crypto, for the API-server client) compiles C: musl's gcc wrapper.
    crate::setup::ensure_debian(&[("musl-gcc", "musl-tools")])?;
    let mut c = stable_cargo(root, obj);
    c.args(["build", "--release", "--target", MUSL_TARGET])
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        // No symbols in an image: a quarter of the agent's size (22 -> 16.5 MB).
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .args(args);
    status(
        c,
        &format!("cargo build --target {MUSL_TARGET} {}", args.join(" ")),
    )?;
    step(&format!(
        "static build done in {:.1}s",
        t0.elapsed().as_secs_f64()
    ));
    Ok(root.join("target").join(MUSL_TARGET).join("release"))
}

/// Reads a binary and checks that it is a static x86-64 ELF (no program interpreter).
pub fn read_static(bin: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    check_static(&bytes).with_context(|| format!("{} is not a static binary", bin.display()))?;
    Ok(bytes)
}

/// A 64-bit little-endian x86-64 ELF executable with no PT_INTERP: it needs no dynamic loader
/// and no libc from the image.
pub fn check_static(b: &[u8]) -> Result<()> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8).map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
    };
    if b.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("not a 64-bit little-endian ELF file");
    }
    if u16_at(0x12) != Some(EM_X86_64) {
        bail!("not an x86-64 ELF file");
    }
    let phoff = u64_at(0x20).context("truncated ELF header")? as usize;
    let phentsize = u16_at(0x36).context("truncated ELF header")? as usize;
    let phnum = u16_at(0x38).context("truncated ELF header")? as usize;
    if phnum == 0 {
        bail!("no program headers");
    }
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let ty = u32_at(at).context("truncated program header table")?;
        if ty == PT_INTERP {
            bail!("it has a program interpreter (PT_INTERP): it is dynamically linked");
        }
    }
    Ok(())
}

/// Test images for the node suite: (reference, archive) of the pause image and the probe
/// image, plus the probe binary's sha256.
pub struct TestImages {
    pub pause: String,
    pub probe: String,
    pub probe_sha256: String,
}

pub const PAUSE_REFERENCE: &str = "localhost/enf-pause:test";
pub const PROBE_REFERENCE: &str = "localhost/enf-probe:test";

/// Builds enf-probe statically (from the `enf-probe-static` package: the same source with
/// only libc, not the tests crate's dependencies) and writes the pause and probe images into `dir`. The pause
/// image holds enf-probe with its marker byte changed (`enf-probe pause`), so the sandbox
/// process has another sha256 than the workload.
pub fn test_images(root: &Path, obj: &Path, dir: &Path) -> Result<TestImages> {
    let bin = build_musl(root, obj, &["-p", "enf-probe-static"])?.join("enf-probe-static");
    let probe = read_static(&bin)?;
    let mut pause = probe.clone();
    let marker = b"ENFPROBE-MARKER0";
    let at = pause
        .windows(marker.len())
        .position(|w| w == marker)
        .context("enf-probe holds no ENFPROBE-MARKER0")?;
    pause[at + marker.len() - 1] = b'P';
    let probe_sha256 = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&probe))
    };
    for (reference, name, bytes, cmd) in [
        (PAUSE_REFERENCE, "pause", pause, "pause"),
        (PROBE_REFERENCE, "enf-probe", probe, "sleep"),
    ] {
        let archive = oci::write(&oci::Image {
            reference: reference.to_string(),
            entrypoint: vec![format!("/{name}")],
            cmd: vec![cmd.to_string()],
            files: vec![oci::File {
                path: format!("/{name}"),
                mode: 0o755,
                bytes,
            }],
        })?;
        write_archive(&dir.join(format!("{name}.tar")), &archive)?;
    }
    Ok(TestImages {
        pause: dir.join("pause.tar").display().to_string(),
        probe: dir.join("enf-probe.tar").display().to_string(),
        probe_sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 x86-64 header with one program header of type `ty`.
    fn elf(ty: u32) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&ty.to_le_bytes());
        b
    }

    #[test]
    fn static_check_reads_the_program_headers() {
        assert!(check_static(&elf(1)).is_ok(), "PT_LOAD only: static");
        assert!(check_static(&elf(3)).is_err(), "PT_INTERP: dynamic");
        assert!(check_static(b"#!/bin/sh\n").is_err());
        assert!(check_static(&elf(1)[..0x30]).is_err(), "truncated");
        // The xtask binary itself is dynamically linked (glibc target).
        let me = fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert!(check_static(&me).is_err());
    }

    #[test]
    fn agent_image_is_refused_above_20_mb() {
        assert!(agent_archive(vec![0u8; 1024]).is_ok());
        let err = agent_archive(vec![0u8; MAX_IMAGE_BYTES]).expect_err("too big");
        assert!(err.to_string().contains("20 MB"), "{err}");
    }

    #[test]
    fn agent_image_runs_the_agent() {
        let a = agent_archive(b"agent".to_vec()).expect("image");
        let again = agent_archive(b"agent".to_vec()).expect("image");
        assert_eq!(a.manifest_digest, again.manifest_digest);
        let mut ar = tar::Archive::new(a.tar.as_slice());
        let index = ar
            .entries()
            .expect("tar")
            .filter_map(|e| e.ok())
            .find(|e| e.path().is_ok_and(|p| p.as_os_str() == "index.json"))
            .map(|e| serde_json::from_reader::<_, serde_json::Value>(e).expect("json"))
            .expect("index.json");
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            format!("localhost/enforcer-agent:{VERSION}")
        );
    }
}
