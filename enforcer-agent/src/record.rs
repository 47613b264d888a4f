//! The decision record: a bounded, persistent summary of the connects the agent has seen,
//! for `learn` and `policy diff` (which replays it against a candidate policy).
//!
//! Not a log: one entry per (process facts, destination), with a count, when it was first
//! and last seen, and the last verdict and identity. At most [`MAX_ENTRIES`] entries (the
//! least recently seen leave first) and none older than [`MAX_AGE`]; kept in the agent's
//! state folder (`decisions.json`, written atomically every [`SAVE_EVERY`] when it changed
//! and at a clean exit) and read back at start.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{api, k8s::PodMeta};

/// Entries kept; past it the least recently seen leave.
pub const MAX_ENTRIES: usize = 65_536;
/// Entries not seen for this long leave.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The record is written to disk this often when it changed (and at a clean exit).
pub const SAVE_EVERY: Duration = Duration::from_secs(30);
/// The file in the state folder.
pub const FILE: &str = "decisions.json";
/// Format version of the file.
const VERSION: u32 = 1;

/// The pod a process ran in (what `k8s` selectors select on).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub pod_name: String,
    pub container: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Pod {
    pub fn from_meta(m: &PodMeta) -> Self {
        Pod {
            namespace: m.namespace.clone(),
            pod_name: m.pod_name.clone(),
            container: m.container.clone(),
            service_account: m.service_account.clone(),
            labels: m.labels.clone(),
        }
    }

    /// The pod metadata the policy's `k8s` selectors read.
    pub fn to_meta(&self) -> PodMeta {
        PodMeta {
            namespace: self.namespace.clone(),
            pod_name: self.pod_name.clone(),
            pod_uid: String::new(),
            labels: self.labels.clone(),
            container: self.container.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

/// What the identity of the process that connected came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProcFacts {
    /// sha256 hex of the executable (empty: the process was not attested).
    pub sha256: String,
    pub exe: String,
    /// cgroup v2 path.
    pub cgroup: String,
    pub uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Pod>,
}

/// One (process facts, destination) and what was seen of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key {
    pub facts: ProcFacts,
    pub dst: IpAddr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub count: u64,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// `allow`, `audit` or `deny`, as last decided.
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    entries: Vec<(Key, Seen)>,
}

/// Errors of reading or writing the record file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("writing the decision record {path}: {err}")]
    Write { path: String, err: std::io::Error },
    #[error(
        "the decision record {path} is unreadable ({err}); it is set aside as {path}.bad and a new one begins"
    )]
    Corrupt { path: String, err: String },
}

/// The record (see the module's documentation).
pub struct Record {
    entries: HashMap<Key, Seen>,
    path: Option<PathBuf>,
    dirty: bool,
    max: usize,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Record {
    /// An empty record kept in memory only (tests).
    pub fn in_memory(max: usize) -> Self {
        Record {
            entries: HashMap::new(),
            path: None,
            dirty: false,
            max: max.max(1),
        }
    }

    /// The record of the state folder `dir`; a missing file is an empty record, an
    /// unreadable one is set aside (the error says so) and an empty record begins.
    pub fn open(dir: &Path) -> (Self, Option<RecordError>) {
        let path = dir.join(FILE);
        let mut r = Record {
            entries: HashMap::new(),
            path: Some(path.clone()),
            dirty: false,
            max: MAX_ENTRIES,
        };
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (r, None),
            Err(e) => {
                return (
                    r,
                    Some(RecordError::Corrupt {
                        path: path.display().to_string(),
                        err: e.to_string(),
                    }),
                );
            }
        };
        match serde_json::from_slice::<OnDisk>(&bytes) {
            Ok(d) if d.version == VERSION => {
                r.entries = d.entries.into_iter().collect();
                r.prune(now_secs());
                (r, None)
            }
            other => {
                let err = match other {
                    Ok(d) => format!("format version {}, this agent reads {VERSION}", d.version),
                    Err(e) => e.to_string(),
                };
                let _ = fs::rename(&path, path.with_extension("json.bad"));
                (
                    r,
                    Some(RecordError::Corrupt {
                        path: path.display().to_string(),
                        err,
                    }),
                )
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Counts one connect decision at `now` (Unix seconds).
    pub fn observe(&mut self, key: Key, verdict: &str, identity: Option<&str>, now: u64) {
        self.dirty = true;
        if let Some(s) = self.entries.get_mut(&key) {
            s.count = s.count.saturating_add(1);
            s.last_seen = s.last_seen.max(now);
            s.verdict = verdict.to_string();
            s.identity = identity.map(str::to_string);
            return;
        }
        if self.entries.len() >= self.max {
            self.evict();
        }
        self.entries.insert(
            key,
            Seen {
                count: 1,
                first_seen: now,
                last_seen: now,
                verdict: verdict.to_string(),
                identity: identity.map(str::to_string),
            },
        );
    }

    /// Makes room: the least recently seen eighth leaves at once (amortised: not a scan per
    /// connect once full).
    fn evict(&mut self) {
        let mut seen: Vec<u64> = self.entries.values().map(|s| s.last_seen).collect();
        let n = (self.max / 8).max(1).min(seen.len());
        let (_, cut, _) = seen.select_nth_unstable(n - 1);
        let cut = *cut;
        let mut left = n;
        self.entries.retain(|_, s| {
            if s.last_seen <= cut && left > 0 {
                left -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Drops entries not seen for [`MAX_AGE`].
    pub fn prune(&mut self, now: u64) {
        let before = self.entries.len();
        let oldest = now.saturating_sub(MAX_AGE.as_secs());
        self.entries.retain(|_, s| s.last_seen >= oldest);
        if self.entries.len() != before {
            self.dirty = true;
        }
    }

    /// Entries last seen at or after `since` (Unix seconds), sorted by key.
    pub fn entries_since(&self, since: u64) -> Vec<(Key, Seen)> {
        let mut v: Vec<(Key, Seen)> = self
            .entries
            .iter()
            .filter(|(_, s)| s.last_seen >= since)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Writes the record (tmp file + rename) when it changed since the last write.
    pub fn save(&mut self) -> Result<(), RecordError> {
        match self.take_snapshot() {
            Some(snap) => snap.write().inspect_err(|_| self.dirty = true),
            None => Ok(()),
        }
    }

    /// What to write when the record changed since the last snapshot (a copy: the agent
    /// writes it off its event loop with [`Snapshot::write`]).
    pub fn take_snapshot(&mut self) -> Option<Snapshot> {
        let path = self.path.clone()?;
        if !self.dirty {
            return None;
        }
        self.prune(now_secs());
        self.dirty = false;
        Some(Snapshot {
            path,
            entries: self
                .entries
                .iter()
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect(),
        })
    }
}

/// A copy of the record, to be written.
pub struct Snapshot {
    path: PathBuf,
    entries: Vec<(Key, Seen)>,
}

impl Snapshot {
    /// Writes it sorted, atomically: a temporary file, synced, renamed over the record.
    pub fn write(mut self) -> Result<(), RecordError> {
        let path = self.path;
        self.entries.sort_by(|a, b| a.0.cmp(&b.0));
        let err = |err| RecordError::Write {
            path: path.display().to_string(),
            err,
        };
        let bytes = serde_json::to_vec(&OnDisk {
            version: VERSION,
            entries: self.entries,
        })
        .map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)?;
        Ok(())
    }
}

/// The record key of a connect decision (none for socket-creation events).
pub fn key_of(d: &api::Decision, pod: Option<&PodMeta>) -> Option<Key> {
    if d.socket.is_some() || (d.protocol != "tcp" && d.protocol != "udp") {
        return None;
    }
    let dst: IpAddr = d.dst.parse().ok()?;
    let port = u16::try_from(d.port).ok()?;
    Some(Key {
        facts: ProcFacts {
            sha256: d.sha256.clone().unwrap_or_default(),
            exe: d.exe.clone().unwrap_or_default(),
            cgroup: d.cgroup.clone().unwrap_or_default(),
            uid: d.uid,
            pod: pod.map(Pod::from_meta),
        },
        dst,
        port,
        protocol: d.protocol.clone(),
    })
}

/// Parses `30s`, `10m`, `24h`, `7d` (or plain seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mul).map(Duration::from_secs)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds.
pub fn rfc3339(secs: u64) -> String {
    let ns = i64::try_from(secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000_000_000);
    crate::policy::rfc3339(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> Key {
        Key {
            facts: ProcFacts {
                sha256: "ab".repeat(32),
                exe: "/bin/x".into(),
                cgroup: "/a".into(),
                uid: 0,
                pod: None,
            },
            dst: IpAddr::from([10, 0, (i >> 8) as u8, i as u8]),
            port: 80,
            protocol: "tcp".into(),
        }
    }

    #[test]
    fn counts_bounds_and_ages() {
        let mut r = Record::in_memory(16);
        r.observe(key(1), "audit", None, 100);
        r.observe(key(1), "allow", Some("spiffe://t/x"), 200);
        let e = r.entries_since(0);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].1.count, 2);
        assert_eq!((e[0].1.first_seen, e[0].1.last_seen), (100, 200));
        assert_eq!(e[0].1.verdict, "allow");
        // Full: the least recently seen leave first, never the newest.
        for i in 2..=40 {
            r.observe(key(i), "audit", None, 1000 + u64::from(i));
        }
        assert!(r.len() <= 16, "{}", r.len());
        assert!(r.entries_since(0).iter().any(|(k, _)| *k == key(40)));
        assert!(!r.entries_since(0).iter().any(|(k, _)| *k == key(1)));
        assert!(r.entries_since(1030).len() < r.len());
        r.prune(1040 + MAX_AGE.as_secs());
        assert_eq!(r.len(), 1);
        r.prune(1041 + MAX_AGE.as_secs());
        assert!(r.is_empty());
    }

    #[test]
    fn persists_atomically_and_survives_garbage() {
        let dir = std::env::temp_dir().join(format!("enf-record-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let (mut r, err) = Record::open(&dir);
        assert!(err.is_none());
        let now = now_secs();
        r.observe(key(7), "deny", None, now);
        r.save().expect("save");
        assert!(!dir.join("decisions.json.tmp").exists());
        let (back, err) = Record::open(&dir);
        assert!(err.is_none());
        assert_eq!(back.entries_since(0), r.entries_since(0));
        fs::write(dir.join(FILE), b"{not json").expect("w");
        let (back, err) = Record::open(&dir);
        assert!(back.is_empty());
        assert!(matches!(err, Some(RecordError::Corrupt { .. })), "{err:?}");
        assert!(dir.join("decisions.json.bad").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    /// A full record (65,536 entries of realistic size) is written and read back within a
    /// bounded time (the agent writes it on its event loop).
    #[test]
    fn a_full_record_saves_and_loads_quickly() {
        let dir = std::env::temp_dir().join(format!("enf-record-full-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let (mut r, _) = Record::open(&dir);
        let now = now_secs();
        for i in 0..MAX_ENTRIES as u32 {
            let mut k = key(i);
            k.facts.exe = format!("/usr/lib/app/bin/worker-{}", i % 50);
            k.facts.cgroup = format!("/system.slice/app-{}.service/worker", i % 200);
            k.dst = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            r.observe(k, "allow", Some("spiffe://prod.example.org/app"), now);
        }
        assert_eq!(r.len(), MAX_ENTRIES);
        let t0 = std::time::Instant::now();
        let snap = r.take_snapshot().expect("changed");
        let copy = t0.elapsed();
        snap.write().expect("write");
        let save = t0.elapsed();
        let bytes = fs::metadata(dir.join(FILE)).expect("file").len();
        let t0 = std::time::Instant::now();
        let (back, err) = Record::open(&dir);
        let load = t0.elapsed();
        assert!(err.is_none());
        assert_eq!(back.len(), MAX_ENTRIES);
        eprintln!(
            "full record: {} entries, {:.1} MiB on disk, copy (on the event loop) {copy:?}, save {save:?}, load {load:?}",
            MAX_ENTRIES,
            bytes as f64 / 1048576.0
        );
        assert!(save < Duration::from_secs(2) && load < Duration::from_secs(3));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn durations_and_dates() {
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("45"), Some(Duration::from_secs(45)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("1w"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_140_800), "2026-12-01T16:00:00Z");
    }
}
