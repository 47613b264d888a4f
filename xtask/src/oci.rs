//! OCI image archives written by the project, with no container engine and no registry.
//!
//! One tar holds an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`: what
//! `ctr images import`, `podman load` and Docker >= 25 read) and, beside it, a docker-archive
//! `manifest.json` pointing at the same blobs (what older `docker load` reads), as Docker 25,
//! crane and skopeo write them. The image has one uncompressed layer.
//!
//! Reproducible: the same files give the same bytes (entries sorted, mtime 0, uid/gid 0, no
//! user names, a fixed `created` time, JSON with sorted keys), so the same digest.

use std::{collections::BTreeSet, str::FromStr as _};

use anyhow::{Context as _, Result, bail};
use oci_spec::image::{
    ANNOTATION_REF_NAME, Arch, ConfigBuilder, Descriptor, Digest, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
    Sha256Digest,
};
use sha2::{Digest as _, Sha256};

/// containerd's annotation naming the image an OCI layout entry is imported as.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The fixed creation time of every image (the epoch: nothing of the build host leaks in).
pub const CREATED: &str = "1970-01-01T00:00:00Z";

/// One regular file of the image's single layer.
#[derive(Debug, Clone)]
pub struct File {
    /// Absolute path inside the image, e.g. `/enforcer-agent`.
    pub path: String,
    pub mode: u32,
    pub bytes: Vec<u8>,
}

/// What the image holds and how it runs.
#[derive(Debug, Clone)]
pub struct Image {
    /// Full reference, e.g. `localhost/enforcer-agent:0.1.0`.
    pub reference: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub files: Vec<File>,
}

/// A written archive.
#[derive(Debug)]
pub struct Archive {
    pub tar: Vec<u8>,
    /// Digest of the image manifest (`sha256:...`): the image's digest as containerd lists it.
    pub manifest_digest: String,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn digest(hex: &str) -> Result<Digest> {
    Ok(Sha256Digest::from_str(hex)
        .with_context(|| format!("{hex} is not a sha256 digest"))?
        .into())
}

/// JSON with sorted object keys (oci-spec keeps annotations in a HashMap, whose order
/// changes from run to run; a `serde_json::Value` object is a BTreeMap).
fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    let v = serde_json::to_value(v).context("serializing an OCI document")?;
    Ok(serde_json::to_vec(&v)?)
}

/// A tar header with nothing of the host in it: mtime 0, uid/gid 0, no names.
fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .with_context(|| format!("{path} does not fit a tar header"))?;
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_username("")?;
    h.set_groupname("")?;
    h.set_cksum();
    Ok(h)
}

/// A tar entry: its path, and a file's mode and bytes (none: a directory).
type Entry<'a> = (String, Option<(u32, &'a [u8])>);

/// A tar of `files` (path without the leading `/`) and the directories above them, sorted.
fn tar_of(files: &[(String, u32, &[u8])]) -> Result<Vec<u8>> {
    let mut dirs = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (path, _, _) in files {
        if path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|c| c == ".." || c.is_empty())
        {
            bail!("bad path {path:?} in an image archive (relative, no `..`, no empty parts)");
        }
        if !seen.insert(path.as_str()) {
            bail!("{path} is twice in one image archive");
        }
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            dirs.insert(format!("{}/", &path[..at + i]));
            at += i + 1;
        }
    }
    let mut entries: Vec<Entry> = dirs.into_iter().map(|d| (d, None)).collect();
    entries.extend(files.iter().map(|(p, m, b)| (p.clone(), Some((*m, *b)))));
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut t = tar::Builder::new(Vec::new());
    for (path, file) in entries {
        match file {
            None => {
                let h = header(&path, tar::EntryType::Directory, 0o755, 0)?;
                t.append(&h, std::io::empty())?;
            }
            Some((mode, bytes)) => {
                let h = header(&path, tar::EntryType::Regular, mode, bytes.len() as u64)?;
                t.append(&h, bytes)?;
            }
        }
    }
    Ok(t.into_inner()?)
}

/// The image archive: OCI layout plus docker-archive `manifest.json`.
pub fn write(image: &Image) -> Result<Archive> {
    let files: Vec<(String, u32, &[u8])> = image
        .files
        .iter()
        .map(|f| {
            let p = f.path.strip_prefix('/').unwrap_or(&f.path).to_string();
            (p, f.mode, f.bytes.as_slice())
        })
        .collect();
    let layer = tar_of(&files)?;
    let layer_hex = sha256_hex(&layer);

    let config = ImageConfigurationBuilder::default()
        .created(CREATED)
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .entrypoint(image.entrypoint.clone())
                .cmd(image.cmd.clone())
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![format!("sha256:{layer_hex}")])
                .build()?,
        )
        .build()?;
    let config = json(&config)?;
    let config_hex = sha256_hex(&config);

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config.len() as u64,
            digest(&config_hex)?,
        ))
        .layers(vec![Descriptor::new(
            MediaType::ImageLayer,
            layer.len() as u64,
            digest(&layer_hex)?,
        )])
        .build()?;
    let manifest = json(&manifest)?;
    let manifest_hex = sha256_hex(&manifest);

    let tag = image
        .reference
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map(|(_, t)| t.to_string())
        .with_context(|| format!("image reference {} has no tag", image.reference))?;
    let mut desc = Descriptor::new(
        MediaType::ImageManifest,
        manifest.len() as u64,
        digest(&manifest_hex)?,
    );
    desc.set_platform(Some(
        PlatformBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .build()?,
    ));
    desc.set_annotations(Some(
        [
            (ANNOTATION_REF_NAME.to_string(), tag),
            (
                ANNOTATION_CONTAINERD_NAME.to_string(),
                image.reference.clone(),
            ),
        ]
        .into_iter()
        .collect(),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![desc])
        .build()?;
    let index = json(&index)?;

    // docker-archive: Config and Layers are paths inside this tar (Docker 25 writes the same).
    let docker = serde_json::json!([{
        "Config": format!("blobs/sha256/{config_hex}"),
        "RepoTags": [image.reference],
        "Layers": [format!("blobs/sha256/{layer_hex}")],
    }]);
    let docker = serde_json::to_vec(&docker)?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;

    let blob = |h: &str| format!("blobs/sha256/{h}");
    let outer = tar_of(&[
        ("oci-layout".to_string(), 0o644, layout.as_slice()),
        ("index.json".to_string(), 0o644, &index),
        ("manifest.json".to_string(), 0o644, &docker),
        (blob(&layer_hex), 0o644, &layer),
        (blob(&config_hex), 0o644, &config),
        (blob(&manifest_hex), 0o644, &manifest),
    ])?;
    Ok(Archive {
        tar: outer,
        manifest_digest: format!("sha256:{manifest_hex}"),
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Read as _};

    use super::*;

    fn image(bin: &[u8]) -> Image {
        Image {
            reference: "localhost/demo:1.2.3".to_string(),
            entrypoint: vec!["/demo".to_string()],
            cmd: vec!["run".to_string()],
            files: vec![
                File {
                    path: "/demo".to_string(),
                    mode: 0o755,
                    bytes: bin.to_vec(),
                },
                File {
                    path: "/etc/demo/conf".to_string(),
                    mode: 0o644,
                    bytes: b"x".to_vec(),
                },
            ],
        }
    }

    /// (path, header, content) of every entry.
    fn entries(tar: &[u8]) -> Vec<(String, tar::Header, Vec<u8>)> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .expect("a tar")
            .map(|e| {
                let mut e = e.expect("an entry");
                let path = e.path().expect("path").to_string_lossy().into_owned();
                let h = e.header().clone();
                let mut b = Vec::new();
                e.read_to_end(&mut b).expect("read");
                (path, h, b)
            })
            .collect()
    }

    fn blobs(tar: &[u8]) -> BTreeMap<String, Vec<u8>> {
        entries(tar).into_iter().map(|(p, _, b)| (p, b)).collect()
    }

    #[test]
    fn same_input_gives_the_same_bytes() {
        // Many runs: oci-spec's annotation HashMap iterates in a new order each time.
        let first = write(&image(b"\x7fELF-demo")).expect("write");
        for _ in 0..16 {
            let again = write(&image(b"\x7fELF-demo")).expect("write");
            assert!(
                again.tar == first.tar,
                "two archives of the same image differ"
            );
            assert_eq!(again.manifest_digest, first.manifest_digest);
        }
        let other = write(&image(b"\x7fELF-demO")).expect("write");
        assert_ne!(other.manifest_digest, first.manifest_digest);
    }

    #[test]
    fn entries_carry_nothing_of_the_host_and_are_sorted() {
        let a = write(&image(b"bin")).expect("write");
        let outer = entries(&a.tar);
        let layer_name = outer
            .iter()
            .find(|(p, _, b)| p.starts_with("blobs/sha256/") && b.len() > 1024)
            .map(|(p, _, _)| p.clone())
            .expect("a layer blob");
        let layer = blobs(&a.tar)[&layer_name].clone();
        for tar in [&a.tar, &layer] {
            let es = entries(tar);
            let names: Vec<&String> = es.iter().map(|(p, _, _)| p).collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted, "entries are sorted");
            for (p, h, _) in &es {
                assert_eq!(h.mtime().expect("mtime"), 0, "{p}");
                assert_eq!(h.uid().expect("uid"), 0, "{p}");
                assert_eq!(h.gid().expect("gid"), 0, "{p}");
                assert_eq!(h.username().expect("user"), Some(""), "{p}");
            }
        }
        let layer_entries = entries(&layer);
        let paths: Vec<(&str, u32)> = layer_entries
            .iter()
            .map(|(p, h, _)| (p.as_str(), h.mode().expect("mode")))
            .collect();
        assert_eq!(
            paths,
            [
                ("demo", 0o755),
                ("etc/", 0o755),
                ("etc/demo/", 0o755),
                ("etc/demo/conf", 0o644)
            ]
        );
    }

    #[test]
    fn digests_in_the_index_match_the_blobs() {
        let a = write(&image(b"payload")).expect("write");
        let b = blobs(&a.tar);
        let check = |d: &serde_json::Value| -> Vec<u8> {
            let digest = d["digest"].as_str().expect("digest");
            let hex = digest.strip_prefix("sha256:").expect("sha256");
            let blob = b
                .get(&format!("blobs/sha256/{hex}"))
                .unwrap_or_else(|| panic!("no blob {digest}"));
            assert_eq!(sha256_hex(blob), hex, "blob content matches its name");
            assert_eq!(d["size"].as_u64(), Some(blob.len() as u64));
            blob.clone()
        };
        assert_eq!(b["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: serde_json::Value = serde_json::from_slice(&b["index.json"]).expect("json");
        assert_eq!(index["schemaVersion"], 2);
        let m = &index["manifests"][0];
        assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(m["annotations"][ANNOTATION_REF_NAME], "1.2.3");
        assert_eq!(
            m["annotations"][ANNOTATION_CONTAINERD_NAME],
            "localhost/demo:1.2.3"
        );
        assert_eq!(m["digest"], a.manifest_digest);
        let manifest: serde_json::Value = serde_json::from_slice(&check(m)).expect("json");
        let config: serde_json::Value =
            serde_json::from_slice(&check(&manifest["config"])).expect("json");
        let layer = check(&manifest["layers"][0]);
        assert_eq!(
            manifest["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar"
        );
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", sha256_hex(&layer))
        );
        assert_eq!(config["os"], "linux");
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["created"], CREATED);
        assert_eq!(config["config"]["Entrypoint"][0], "/demo");
        assert_eq!(config["config"]["Cmd"][0], "run");
        let demo = entries(&layer)
            .into_iter()
            .find(|(p, _, _)| p == "demo")
            .expect("/demo in the layer");
        assert_eq!(demo.2, b"payload");

        // docker-archive manifest.json names the same blobs.
        let docker: serde_json::Value = serde_json::from_slice(&b["manifest.json"]).expect("json");
        let d = &docker[0];
        assert_eq!(d["RepoTags"][0], "localhost/demo:1.2.3");
        assert_eq!(
            d["Config"],
            format!(
                "blobs/sha256/{}",
                manifest["config"]["digest"]
                    .as_str()
                    .and_then(|s| s.strip_prefix("sha256:"))
                    .expect("hex")
            )
        );
        assert!(b.contains_key(d["Layers"][0].as_str().expect("layer path")));
    }

    #[test]
    fn bad_paths_and_references_are_refused() {
        let mut i = image(b"x");
        i.files[1].path = "/etc/../demo".to_string();
        assert!(write(&i).is_err());
        let mut i = image(b"x");
        i.files[1].path = "/demo".to_string();
        assert!(write(&i).is_err(), "a path twice");
        let mut i = image(b"x");
        i.reference = "localhost:5000/demo".to_string();
        assert!(write(&i).is_err(), "no tag");
    }
}
