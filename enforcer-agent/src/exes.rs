//! The exe registry: which small integer (`exe_id`) stands for which hashed executable.
//!
//! Ids are what the kernel keys identity classes by (`ENF_BINCLASS`), so there are at most
//! [`MAX_EXES`] of them. The registry keeps them bounded:
//! - one id per content: the same (sha256, path) always gets the same id, so a file younger
//!   than the racy-timestamp window, re-hashed at each exec, no longer takes a new id each time;
//! - ids are reused: [`ExeRegistry::collect`] frees every id that no process and no kernel
//!   entry refers to (the caller, which sees the kernel, says which ids are referenced);
//! - its log (`exes.log`, read back by a restarted agent that takes over pinned maps) is
//!   rewritten with only the live ids when it has grown well past them.
//!
//! Pure: no kernel access, unit-tested without root.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use enforcer_common::{EXE_UNKNOWN, ExeKey, MAX_EXES};

/// One executable the agent hashed, by its `exe_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exe {
    pub sha256: [u8; 32],
    pub path: String,
}

/// Errors of the registry, each naming what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ExeError {
    #[error(
        "all {0} executable ids are in use by running processes or kernel entries; the process stays pending (denied in enforce mode) until some exit"
    )]
    Full(u32),
    #[error("writing the executable log {path}: {err}; check the state folder (--state-dir)")]
    Log { path: PathBuf, err: std::io::Error },
}

/// Executables by id, by content and by inode key, with the free ids and the log.
pub struct ExeRegistry {
    exes: HashMap<u32, Exe>,
    by_content: HashMap<([u8; 32], String), u32>,
    /// Inode keys this agent told the kernel about (`ENF_EXES`), and the fstat keys of the
    /// same files: a hit skips hashing (after a sha256 check by the caller).
    by_key: HashMap<ExeKey, u32>,
    /// Ids freed by [`ExeRegistry::collect`], reused before new ones.
    free: Vec<u32>,
    /// The next never-used id.
    next: u32,
    /// Ids the registry may hand out: `1..capacity` (0 is [`EXE_UNKNOWN`]).
    capacity: u32,
    log_path: PathBuf,
    log: fs::File,
    /// Lines in the log (live or superseded), to know when to compact it.
    log_lines: usize,
}

/// The log is rewritten when it holds more than this many lines per live id (plus a floor).
const COMPACT_FACTOR: usize = 2;
const COMPACT_FLOOR: usize = 1024;

impl ExeRegistry {
    /// Opens the registry over `log_path`. `keep`: ids a previous agent handed out are read
    /// back (a takeover: the pinned kernel maps may refer to them); otherwise the log starts
    /// empty.
    pub fn open(log_path: &Path, keep: bool) -> Result<Self, ExeError> {
        Self::with_capacity(log_path, keep, MAX_EXES)
    }

    /// [`ExeRegistry::open`] with ids `1..capacity` (unit tests use a small one).
    pub fn with_capacity(log_path: &Path, keep: bool, capacity: u32) -> Result<Self, ExeError> {
        let log_err = |err| ExeError::Log {
            path: log_path.to_path_buf(),
            err,
        };
        let (exes, lines) = if keep {
            read_log(log_path)
        } else {
            (HashMap::new(), 0)
        };
        let mut r = Self {
            by_content: exes
                .iter()
                .map(|(&id, e)| ((e.sha256, e.path.clone()), id))
                .collect(),
            next: exes.keys().max().map_or(1, |m| m + 1).max(1),
            exes,
            by_key: HashMap::new(),
            free: Vec::new(),
            capacity: capacity.min(MAX_EXES),
            log_path: log_path.to_path_buf(),
            log: open_append(log_path, !keep).map_err(log_err)?,
            log_lines: lines,
        };
        // Ids below `next` that the log does not name are free.
        r.free = (1..r.next).filter(|i| !r.exes.contains_key(i)).collect();
        r.compact_if_needed()?;
        Ok(r)
    }

    pub fn get(&self, id: u32) -> Option<&Exe> {
        self.exes.get(&id)
    }

    pub fn contains(&self, id: u32) -> bool {
        self.exes.contains_key(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &Exe)> {
        self.exes.iter().map(|(&id, e)| (id, e))
    }

    /// Ids in use.
    pub fn len(&self) -> usize {
        self.exes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exes.is_empty()
    }

    /// Ids the registry can hand out in all.
    pub fn capacity(&self) -> usize {
        self.capacity.saturating_sub(1) as usize
    }

    /// The id of a file known by this inode key, when its content is still `sha256`.
    pub fn by_key(&self, key: &ExeKey, sha256: &[u8; 32]) -> Option<u32> {
        let id = *self.by_key.get(key)?;
        (self.exes.get(&id)?.sha256 == *sha256).then_some(id)
    }

    /// Remembers that `key` names the file of `id`.
    pub fn remember_key(&mut self, key: ExeKey, id: u32) {
        self.by_key.insert(key, id);
    }

    /// Forgets an inode key (the kernel's entry for it was removed).
    pub fn forget_key(&mut self, key: &ExeKey) {
        self.by_key.remove(key);
    }

    /// The id of this content: the existing one, or a new (possibly reused) one, logged before
    /// the kernel can see it. Returns (id, true when new: the caller writes its classes).
    pub fn intern(&mut self, sha256: [u8; 32], path: &str) -> Result<(u32, bool), ExeError> {
        if let Some(&id) = self.by_content.get(&(sha256, path.to_string())) {
            return Ok((id, false));
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.next < self.capacity => {
                self.next += 1;
                self.next - 1
            }
            None => return Err(ExeError::Full(self.capacity() as u32)),
        };
        debug_assert_ne!(id, EXE_UNKNOWN);
        // Logged before the kernel can see the id, so a restarted agent knows every id.
        let logged = writeln!(self.log, "{id} {} {path}", hex::encode(sha256));
        if let Err(err) = logged {
            self.free.push(id);
            return Err(ExeError::Log {
                path: self.log_path.clone(),
                err,
            });
        }
        self.log_lines += 1;
        let exe = Exe {
            sha256,
            path: path.to_string(),
        };
        self.by_content.insert((sha256, exe.path.clone()), id);
        self.exes.insert(id, exe);
        // The id is logged already: a log that cannot be compacted now only stays longer.
        if let Err(e) = self.compact_if_needed() {
            tracing::warn!("{e}");
        }
        Ok((id, true))
    }

    /// Frees every id not in `referenced` (ids of live processes, in the agent's table or the
    /// kernel's, and ids of `ENF_EXES` entries). Inode keys of freed ids are forgotten. The
    /// log is compacted when it grew well past the live ids. Returns the freed ids.
    pub fn collect(&mut self, referenced: &HashSet<u32>) -> Result<Vec<u32>, ExeError> {
        let freed: Vec<u32> = self
            .exes
            .keys()
            .copied()
            .filter(|id| !referenced.contains(id))
            .collect();
        for id in &freed {
            if let Some(e) = self.exes.remove(id) {
                self.by_content.remove(&(e.sha256, e.path));
            }
        }
        let gone: HashSet<u32> = freed.iter().copied().collect();
        self.by_key.retain(|_, id| !gone.contains(id));
        self.free.extend(&freed);
        // Lowest ids first, so a compacted log stays short and ids stay small.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        self.compact_if_needed()?;
        Ok(freed)
    }

    /// Gives back an id just interned whose kernel entries could not be written.
    pub fn release(&mut self, id: u32) {
        if let Some(e) = self.exes.remove(&id) {
            self.by_content.remove(&(e.sha256, e.path));
            self.by_key.retain(|_, i| *i != id);
            self.free.push(id);
        }
    }

    /// Ids still free to hand out.
    pub fn available(&self) -> usize {
        self.free.len() + self.capacity.saturating_sub(self.next) as usize
    }

    /// Lines in the log now.
    pub fn log_lines(&self) -> usize {
        self.log_lines
    }

    fn compact_if_needed(&mut self) -> Result<(), ExeError> {
        if self.log_lines <= COMPACT_FACTOR * self.exes.len() + COMPACT_FLOOR {
            return Ok(());
        }
        self.compact()
    }

    /// Rewrites the log with one line per live id (to a temporary file, then renamed over it:
    /// a crash leaves the old log or the new, never a mix).
    pub fn compact(&mut self) -> Result<(), ExeError> {
        let err = |err| ExeError::Log {
            path: self.log_path.clone(),
            err,
        };
        let tmp = self.log_path.with_extension("log.tmp");
        let mut ids: Vec<u32> = self.exes.keys().copied().collect();
        ids.sort_unstable();
        let mut text = String::new();
        for id in &ids {
            let e = &self.exes[id];
            text.push_str(&format!("{id} {} {}\n", hex::encode(e.sha256), e.path));
        }
        fs::write(&tmp, text).map_err(err)?;
        fs::rename(&tmp, &self.log_path).map_err(err)?;
        self.log = open_append(&self.log_path, false).map_err(err)?;
        self.log_lines = ids.len();
        Ok(())
    }
}

fn open_append(path: &Path, truncate: bool) -> std::io::Result<fs::File> {
    if truncate {
        let _ = fs::remove_file(path);
    }
    fs::OpenOptions::new().create(true).append(true).open(path)
}

/// Ids a previous agent handed out (from its log; a later line for the same id wins, since
/// ids are reused), and the number of lines read.
fn read_log(path: &Path) -> (HashMap<u32, Exe>, usize) {
    let mut exes = HashMap::new();
    let mut lines = 0;
    if let Ok(text) = fs::read_to_string(path) {
        for line in text.lines() {
            lines += 1;
            let mut it = line.splitn(3, ' ');
            let (Some(id), Some(sha), Some(p)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let (Ok(id), Ok(bytes)) = (id.parse::<u32>(), hex::decode(sha)) else {
                continue;
            };
            let Ok(sha256) = <[u8; 32]>::try_from(bytes.as_slice()) else {
                continue;
            };
            if id == EXE_UNKNOWN || id >= MAX_EXES {
                continue;
            }
            exes.insert(
                id,
                Exe {
                    sha256,
                    path: p.to_string(),
                },
            );
        }
    }
    (exes, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!(
                "enforcer-exes-{}-{tag}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).expect("temp dir");
            Self(d)
        }
        fn log(&self) -> PathBuf {
            self.0.join("exes.log")
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sha(n: u32) -> [u8; 32] {
        let mut s = [0u8; 32];
        s[..4].copy_from_slice(&n.to_le_bytes());
        s
    }

    #[test]
    fn the_same_content_keeps_its_id() {
        let d = Dir::new("dedup");
        let mut r = ExeRegistry::open(&d.log(), false).expect("open");
        let (a, new_a) = r.intern(sha(1), "/bin/a").expect("a");
        let (a2, new_a2) = r.intern(sha(1), "/bin/a").expect("a again");
        let (b, _) = r.intern(sha(2), "/bin/a").expect("b");
        let (c, _) = r
            .intern(sha(1), "/bin/c")
            .expect("same content, other path");
        assert!(new_a && !new_a2);
        assert_eq!(a, a2);
        assert_ne!(a, b);
        assert_ne!(
            a, c,
            "binaryPath selectors see the path: it is part of the identity"
        );
        assert_eq!(r.len(), 3);
        assert_eq!(fs::read_to_string(d.log()).expect("log").lines().count(), 3);
    }

    #[test]
    fn unreferenced_ids_are_collected_and_reused() {
        let d = Dir::new("reuse");
        let mut r = ExeRegistry::with_capacity(&d.log(), false, 4).expect("open");
        let ids: Vec<u32> = (0..3)
            .map(|n| r.intern(sha(n), "/x").expect("intern").0)
            .collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert!(matches!(r.intern(sha(9), "/x"), Err(ExeError::Full(3))));
        r.remember_key(ExeKey::default(), 2);
        let freed = r.collect(&HashSet::from([2])).expect("collect");
        assert_eq!(freed.len(), 2);
        assert!(r.contains(2) && !r.contains(1) && !r.contains(3));
        assert_eq!(r.by_key(&ExeKey::default(), &sha(1)), Some(2));
        let (again, new) = r.intern(sha(9), "/x").expect("a freed id is reused");
        assert!(new && (again == 1 || again == 3));
        assert_eq!(r.get(again).map(|e| e.sha256), Some(sha(9)));
        // A freed id's inode key no longer leads to it.
        r.collect(&HashSet::new()).expect("collect all");
        assert_eq!(r.by_key(&ExeKey::default(), &sha(1)), None);
        assert_eq!(r.available(), 3);
    }

    #[test]
    fn a_takeover_reads_the_live_ids_back_and_never_hands_them_out() {
        let d = Dir::new("takeover");
        {
            let mut r = ExeRegistry::open(&d.log(), false).expect("open");
            for n in 0..5 {
                r.intern(sha(n), "/x").expect("intern");
            }
            r.collect(&HashSet::from([2, 4])).expect("collect");
            // Id 1 reused for new content: the later log line wins.
            assert_eq!(r.intern(sha(7), "/y").expect("reuse").0, 1);
        }
        let mut r = ExeRegistry::open(&d.log(), true).expect("reopen");
        assert_eq!(r.get(1).map(|e| e.sha256), Some(sha(7)));
        assert!(r.contains(2) && r.contains(4));
        assert!(
            r.contains(3) && r.contains(5),
            "an id the old agent freed is kept until collected"
        );
        let (id, _) = r.intern(sha(8), "/z").expect("new");
        assert_eq!(id, 6);
        // Without a takeover the log starts empty.
        let r = ExeRegistry::open(&d.log(), false).expect("fresh");
        assert!(r.is_empty());
    }

    #[test]
    fn the_log_is_compacted_to_the_live_ids() {
        let d = Dir::new("compact");
        let mut r = ExeRegistry::with_capacity(&d.log(), false, 64).expect("open");
        let mut n = 0;
        // Churn: far more ids handed out over time than are alive at once.
        for _round in 0..100 {
            for _ in 0..40 {
                r.intern(sha(n), "/churn").expect("intern");
                n += 1;
            }
            let keep: HashSet<u32> = r.iter().map(|(id, _)| id).take(3).collect();
            r.collect(&keep).expect("collect");
        }
        assert!(n > 3000);
        let lines = fs::read_to_string(d.log()).expect("log").lines().count();
        assert!(
            lines <= COMPACT_FACTOR * r.len() + COMPACT_FLOOR + 40,
            "{lines} lines for {} live ids",
            r.len()
        );
        r.compact().expect("compact");
        let back = ExeRegistry::open(&d.log(), true).expect("reopen");
        assert_eq!(back.len(), r.len());
        for (id, e) in r.iter() {
            assert_eq!(back.get(id), Some(e));
        }
        assert_eq!(
            fs::read_to_string(d.log()).expect("log").lines().count(),
            r.len()
        );
    }
}
