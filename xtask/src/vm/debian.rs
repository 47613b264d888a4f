//! Debian's archive through a private apt configuration (the machine's sources are never
//! touched): `apt-get`/`apt-cache` per suite, list freshness, .deb lookup, extraction and
//! Debian version order.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};

use crate::cmd::status;

pub const MIRROR: &str = "http://deb.debian.org/debian";
pub const SECURITY: &str = "http://deb.debian.org/debian-security";
/// apt lists younger than this are reused without `apt-get update`.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// `apt-get`/`apt-cache` with the private config of one suite.
pub fn apt(aptdir: &Path, program: &str) -> Command {
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
pub fn lists_fresh(aptdir: &Path) -> bool {
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

pub fn find_deb(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
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

pub fn extract_deb(deb: &Path, dir: &Path) -> Result<()> {
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

/// Debian-ish version order: runs of digits compare as numbers, the rest as bytes.
pub fn vercmp(a: &str, b: &str) -> std::cmp::Ordering {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vercmp_orders_runs_of_digits_as_numbers() {
        use std::cmp::Ordering::{Equal, Greater, Less};
        assert_eq!(
            vercmp("linux-image-6.1.0-9-amd64", "linux-image-6.1.0-10-amd64"),
            Less
        );
        assert_eq!(
            vercmp("linux-image-5.10.0-46-amd64", "linux-image-5.10.0-32-amd64"),
            Greater
        );
        assert_eq!(vercmp("6.12.007", "6.12.7"), Equal);
        assert_eq!(vercmp("6.1", "6.1.0"), Less);
        let mut v = ["7.2.1", "6.12.10", "6.12.9", "6.1.0"];
        v.sort_by(|a, b| vercmp(a, b));
        assert_eq!(v, ["6.1.0", "6.12.9", "6.12.10", "7.2.1"]);
    }
}
