//! Process attestation: what a process is running (content hash of the very file it executes),
//! where it sits (cgroup v2), who it runs as, and when it started, all read from `/proc`.
//!
//! Hashes are cached under an [`ExeKey`] (device in the kernel's encoding, inode, size, mtime,
//! ctime), the same key the kernel programs build at exec, so a file rewritten in place never
//! keeps its old hash. Files whose timestamps are too fresh to be trusted ("racy timestamps")
//! are hashed but not cached.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use enforcer_common::{EnvPrefix, ExeKey, kernel_dev, loader_var, loader_var_name};
use sha2::{Digest, Sha256};

/// Size of the read buffer used while hashing.
pub const HASH_BUF: usize = 64 * 1024;
/// How many times hashing is retried when the file changes under it.
pub const HASH_RETRIES: u32 = 3;
/// Files whose mtime or ctime lies this close to now are not cached.
pub const RACY_NS: i128 = 2_000_000_000;
/// True when `/proc/PID/status` names a tracer (`TracerPid` not 0): someone holds the
/// process with ptrace. An unreadable status is not traced (the process is gone).
pub fn traced(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .map(|v| v.trim() != "0")
        })
        .unwrap_or(false)
}

/// `PF_KTHREAD` in the flags of `/proc/PID/stat` (field 9).
const PF_KTHREAD: u64 = 0x0020_0000;

const HINT_PERM: &str = "the agent must run as root (CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)";
const HINT_RETRY: &str = "check that /proc is mounted and readable, then retry";
const HINT_CGROUP: &str = "check that the cgroup exists under the cgroup2 mount";

/// Why a process, file or cgroup could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error(
        "{path} is not a cgroup2 file system; give the folder where the host's cgroup v2 hierarchy is mounted (e.g. /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host)"
    )]
    NotCgroup2 { path: PathBuf },
    /// The process exited (or its pid was reused) while it was being read.
    #[error("process {pid} is gone (while reading {what}); nothing to attest, skip it")]
    Gone { pid: u32, what: String },
    #[error(
        "process {pid} has no executable (kernel thread or zombie); it cannot be attested, skip it"
    )]
    NoExe { pid: u32 },
    #[error("cannot {action} {path}: {source}; {hint}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("cannot parse {path}: {detail}; this /proc format is not understood, report it")]
    Parse { path: PathBuf, detail: String },
    #[error(
        "no cgroup2 file system in /proc/self/mountinfo; mount one (e.g. `mount -t cgroup2 none \
         /sys/fs/cgroup/unified`): cgroup identities and enforcement need it"
    )]
    NoCgroup2,
    #[error(
        "process {pid} has no cgroup v2 entry (`0::` line) in /proc/{pid}/cgroup; mount cgroup2 \
         and run the agent in the host cgroup namespace"
    )]
    NoCgroupV2 { pid: u32 },
    #[error(
        "invalid cgroup path {path:?}: {detail}; give a path relative to the cgroup2 mount, \
         such as \"/system.slice/x.service\""
    )]
    BadCgroupPath { path: String, detail: &'static str },
    #[error(
        "{what} kept changing while it was hashed ({attempts} attempts); it is being rewritten, \
         attest it again once it is stable"
    )]
    Unstable { what: String, attempts: u32 },
}

impl AttestError {
    /// True when there is no process left to attest: it exited (ENOENT/ESRCH on `/proc/PID`),
    /// its pid was reused, or it has no executable any more (a zombie, or a kernel thread).
    /// Callers skip such processes silently.
    pub fn is_gone(&self) -> bool {
        matches!(self, AttestError::Gone { .. } | AttestError::NoExe { .. })
    }
}

fn vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn hint_for(e: &io::Error, default: &'static str) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => HINT_PERM,
        _ => default,
    }
}

fn io_err(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> AttestError {
    let hint = hint_for(&source, HINT_RETRY);
    AttestError::Io {
        action,
        path: path.into(),
        source,
        hint,
    }
}

/// An I/O error on `/proc/PID/...`: "gone" when the process vanished.
fn proc_err(pid: u32, action: &'static str, path: PathBuf, source: io::Error) -> AttestError {
    if vanished(&source) {
        AttestError::Gone {
            pid,
            what: path.display().to_string(),
        }
    } else {
        io_err(action, path, source)
    }
}

fn proc_path(pid: u32, leaf: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{leaf}"))
}

fn read_proc(pid: u32, leaf: &str) -> Result<String, AttestError> {
    let path = proc_path(pid, leaf);
    fs::read_to_string(&path).map_err(|e| proc_err(pid, "read", path, e))
}

// ---------------------------------------------------------------------------------------------
// cgroups

/// Undo the octal escapes (`\040` for a space...) of a mountinfo field.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where cgroup2 is mounted according to a mountinfo text. A mount of the whole hierarchy
/// (root `/`) is preferred over a bind mount of a sub-cgroup; the first one wins.
pub fn cgroup2_mount_from(mountinfo: &str) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        // id parent major:minor root mountpoint options [optional...] - fstype source super
        let Some(sep) = fields.iter().skip(6).position(|f| *f == "-").map(|p| p + 6) else {
            continue;
        };
        if fields.get(sep + 1) != Some(&"cgroup2") {
            continue;
        }
        let (Some(root), Some(mnt)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mnt = PathBuf::from(unescape_mountinfo(mnt));
        if *root == "/" {
            return Some(mnt);
        }
        fallback.get_or_insert(mnt);
    }
    fallback
}

/// The cgroup2 mount given on the command line (`run --cgroup2`), which wins over mountinfo.
static CGROUP2_MOUNT: OnceLock<PathBuf> = OnceLock::new();

/// Uses `dir` as the cgroup2 mount from now on (a container that sees the host's cgroup2 at
/// another place, e.g. a DaemonSet's `/host/sys/fs/cgroup`). Refused unless `dir` is the root
/// of a cgroup2 file system.
pub fn use_cgroup2_mount(dir: &Path) -> Result<(), AttestError> {
    let st =
        nix::sys::statfs::statfs(dir).map_err(|e| io_err("statfs", dir, io::Error::from(e)))?;
    if st.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(AttestError::NotCgroup2 {
            path: dir.to_path_buf(),
        });
    }
    let _ = CGROUP2_MOUNT.set(dir.to_path_buf());
    Ok(())
}

/// Where cgroup2 is mounted: `run --cgroup2` if given, else read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, AttestError> {
    if let Some(dir) = CGROUP2_MOUNT.get() {
        return Ok(dir.clone());
    }
    let path = "/proc/self/mountinfo";
    let text = fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
    cgroup2_mount_from(&text).ok_or(AttestError::NoCgroup2)
}

/// The cgroup v2 path in a `/proc/PID/cgroup` text.
pub fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// cgroup v2 path of a process relative to the cgroup2 root, e.g. `/system.slice/x.service`.
pub fn process_cgroup(pid: u32) -> Result<String, AttestError> {
    parse_cgroup(&read_proc(pid, "cgroup")?).ok_or(AttestError::NoCgroupV2 { pid })
}

/// `mount` joined with a cgroup path relative to it, refusing paths that leave the mount.
pub fn cgroup_dir(mount: &Path, rel: &str) -> Result<PathBuf, AttestError> {
    let bad = |detail| AttestError::BadCgroupPath {
        path: rel.to_string(),
        detail,
    };
    if rel.contains('\0') {
        return Err(bad("it contains a NUL byte"));
    }
    let mut dir = mount.to_path_buf();
    for c in Path::new(rel).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => dir.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad("`..` would leave the cgroup2 mount"));
            }
        }
    }
    Ok(dir)
}

/// cgroup v2 id (inode number of the cgroup directory, as `bpf_get_current_cgroup_id`) of a
/// path relative to the mount.
pub fn cgroup_id(mount: &Path, rel: &str) -> Result<u64, AttestError> {
    let dir = cgroup_dir(mount, rel)?;
    let meta = fs::metadata(&dir).map_err(|e| AttestError::Io {
        action: "stat cgroup",
        hint: hint_for(&e, HINT_CGROUP),
        path: dir.clone(),
        source: e,
    })?;
    Ok(meta.ino())
}

/// Every cgroup under the mount, the root (`/`) included: (relative path, id), sorted by path.
/// Cgroups removed during the walk are skipped, as are names that are not UTF-8.
pub fn walk_cgroups(mount: &Path) -> Result<Vec<(String, u64)>, AttestError> {
    let root = fs::metadata(mount).map_err(|e| io_err("stat cgroup2 mount", mount, e))?;
    let mut out = vec![("/".to_string(), root.ino())];
    let mut stack = vec![(mount.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if vanished(&e) && !rel.is_empty() => continue,
            Err(e) => return Err(io_err("list cgroup", dir, e)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(x) => x,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(io_err("list cgroup", dir.clone(), e)),
            };
            let path = entry.path();
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(io_err("stat cgroup", path, e)),
            };
            if !meta.is_dir() {
                continue;
            }
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let child = format!("{rel}/{name}");
            out.push((child.clone(), meta.ino()));
            stack.push((path, child));
        }
    }
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// hashing

/// The cache key of an open file, from its `fstat`.
fn exe_key(m: &Metadata) -> ExeKey {
    let dev = m.dev();
    let major = nix::sys::stat::major(dev) & 0xfff;
    let minor = nix::sys::stat::minor(dev) & 0xf_ffff;
    ExeKey {
        dev: kernel_dev(major as u32, minor as u32),
        _pad0: 0,
        ino: m.ino(),
        size: m.size(),
        mtime_sec: m.mtime(),
        mtime_nsec: u32::try_from(m.mtime_nsec()).unwrap_or(0),
        ctime_nsec: u32::try_from(m.ctime_nsec()).unwrap_or(0),
        ctime_sec: m.ctime(),
    }
}

fn ns(sec: i64, nsec: u32) -> i128 {
    i128::from(sec) * 1_000_000_000 + i128::from(nsec)
}

/// True when a rewrite in the same timestamp granule could keep this key: mtime within
/// [`RACY_NS`] of `now` (either side), or ctime not at least [`RACY_NS`] in the past.
fn racy(key: &ExeKey, now: SystemTime) -> bool {
    let now = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    };
    let mtime = ns(key.mtime_sec, key.mtime_nsec);
    let ctime = ns(key.ctime_sec, key.ctime_nsec);
    (now - mtime).abs() < RACY_NS || now - ctime < RACY_NS
}

/// SHA-256 of a whole file read with positional reads (the file offset is left alone).
fn sha256_of(file: &File) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut off = 0u64;
    loop {
        match file.read_at(&mut buf, off) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hasher.finalize().into())
}

/// Result of hashing one executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashed {
    pub sha256: [u8; 32],
    pub key: ExeKey,
    /// False when the timestamps were too fresh to cache the result (racy timestamps).
    pub cacheable: bool,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    sha256: [u8; 32],
    used: u64,
}

/// Bounded LRU cache of executable hashes keyed by [`ExeKey`].
#[derive(Debug)]
pub struct HashCache {
    capacity: usize,
    map: HashMap<ExeKey, Entry>,
    clock: u64,
    hits: u64,
    misses: u64,
}

impl HashCache {
    /// A cache of at most `capacity` entries (0: nothing is cached).
    pub fn new(capacity: usize) -> Self {
        HashCache {
            capacity,
            map: HashMap::with_capacity(capacity.min(4096)),
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Lookups answered without reading the file.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Lookups that had to read the file.
    pub fn misses(&self) -> u64 {
        self.misses
    }

    fn lookup(&mut self, key: &ExeKey) -> Option<[u8; 32]> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(key).map(|e| {
            e.used = clock;
            e.sha256
        })
    }

    fn insert(&mut self, key: ExeKey, sha256: [u8; 32]) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            // Evicting scans the map, but only after a miss, which read a whole file anyway.
            if let Some(old) = self.map.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| *k) {
                self.map.remove(&old);
            }
        }
        self.clock += 1;
        self.map.insert(
            key,
            Entry {
                sha256,
                used: self.clock,
            },
        );
    }

    /// Hash the executable process `pid` is actually running: `/proc/PID/exe` is opened once
    /// and everything (key, content) comes from that descriptor.
    pub fn hash_process(&mut self, pid: u32) -> Result<Hashed, AttestError> {
        let file = open_exe(pid)?;
        self.hash_described(&file, &|| format!("/proc/{pid}/exe"))
    }

    /// Hash an open file; see [`HashCache::hash_process`].
    pub fn hash_file(&mut self, file: &File) -> Result<Hashed, AttestError> {
        self.hash_described(file, &|| describe_fd(file))
    }

    fn hash_described(
        &mut self,
        file: &File,
        what: &dyn Fn() -> String,
    ) -> Result<Hashed, AttestError> {
        let stat = || file.metadata().map_err(|e| io_err("fstat", what(), e));
        for _ in 0..=HASH_RETRIES {
            let key = exe_key(&stat()?);
            if let Some(sha256) = self.lookup(&key) {
                self.hits += 1;
                return Ok(Hashed {
                    sha256,
                    key,
                    cacheable: true,
                });
            }
            self.misses += 1;
            let sha256 = sha256_of(file).map_err(|e| io_err("read", what(), e))?;
            let after = exe_key(&stat()?);
            if after != key {
                continue;
            }
            let cacheable = !racy(&key, SystemTime::now());
            if cacheable {
                self.insert(key, sha256);
            }
            return Ok(Hashed {
                sha256,
                key,
                cacheable,
            });
        }
        Err(AttestError::Unstable {
            what: what(),
            attempts: HASH_RETRIES + 1,
        })
    }
}

/// A name for an open file in messages: its path as `/proc/self/fd/N` shows it.
fn describe_fd(file: &File) -> String {
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    match fs::read_link(&link) {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(_) => link,
    }
}

/// Open what process `pid` executes (works for deleted files and other mount namespaces).
fn open_exe(pid: u32) -> Result<File, AttestError> {
    let path = proc_path(pid, "exe");
    File::open(&path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOENT) && Path::new(&format!("/proc/{pid}")).exists() {
            AttestError::NoExe { pid }
        } else {
            proc_err(pid, "open", path, e)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// process facts

/// Fields of `/proc/PID/stat` the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub flags: u64,
    pub start_ticks: u64,
}

/// Parse `/proc/PID/stat`; the command name (field 2) may hold spaces and parentheses.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3; field N is f[N - 3].
    Some(Stat {
        state: f.first()?.chars().next()?,
        flags: f.get(9 - 3)?.parse().ok()?,
        start_ticks: f.get(22 - 3)?.parse().ok()?,
    })
}

fn read_stat(pid: u32) -> Result<Stat, AttestError> {
    let text = read_proc(pid, "stat")?;
    parse_stat(&text).ok_or_else(|| AttestError::Parse {
        path: proc_path(pid, "stat"),
        detail: "expected at least 22 fields after the command name".into(),
    })
}

/// Real uid and gid from a `/proc/PID/status` text.
pub fn parse_status_ids(text: &str) -> Option<(u32, u32)> {
    let first = |tag: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(tag))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
    };
    Some((first("Uid:")?, first("Gid:")?))
}

/// What the agent knows about one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub pid: u32,
    /// Path of the executable as `/proc/PID/exe` reads (a ` (deleted)` suffix is kept).
    pub exe_path: String,
    pub sha256: [u8; 32],
    pub key: ExeKey,
    /// cgroup v2 path relative to the cgroup2 mount.
    pub cgroup: String,
    /// Real uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot).
    pub start_ticks: u64,
    /// False when the file changed too recently for its key to be trusted later (racy
    /// timestamps): the hash holds now, but must not be cached or put in `ENF_EXES`.
    pub cacheable: bool,
}

/// Full facts of one process. If the pid is reused while it is read, the result is
/// [`AttestError::Gone`].
pub fn attest_pid(cache: &mut HashCache, pid: u32) -> Result<Facts, AttestError> {
    let start = read_stat(pid)?.start_ticks;
    let file = open_exe(pid)?;
    // The path of the descriptor that is hashed, not a second lookup of /proc/PID/exe.
    let exe_path = describe_fd(&file);
    let hashed = cache.hash_described(&file, &|| format!("/proc/{pid}/exe ({exe_path})"))?;
    let cgroup = process_cgroup(pid)?;
    let status = read_proc(pid, "status")?;
    let (uid, gid) = parse_status_ids(&status).ok_or_else(|| AttestError::Parse {
        path: proc_path(pid, "status"),
        detail: "no numeric Uid:/Gid: lines".into(),
    })?;
    if read_stat(pid)?.start_ticks != start {
        return Err(AttestError::Gone {
            pid,
            what: "pid reused during attestation".into(),
        });
    }
    Ok(Facts {
        pid,
        exe_path,
        sha256: hashed.sha256,
        key: hashed.key,
        cgroup,
        uid,
        gid,
        start_ticks: start,
        cacheable: hashed.cacheable,
    })
}

/// Why a process's identity is withheld by its environment (SECURITY.md guarantee 3): the
/// first [`enforcer_common::LOADER_ENV`] variable in `environ` (the bytes of
/// `/proc/PID/environ`), or `None` when there is none.
pub fn loader_env_in(environ: &[u8]) -> Option<&'static str> {
    environ
        .split(|b| *b == 0)
        .map(|s| loader_var(&EnvPrefix::from_bytes(s)))
        .find(|f| *f != 0)
        .and_then(loader_var_name)
}

/// [`loader_env_in`] of a live process. An environment that cannot be read withholds too
/// (`Some("environment not readable")`): never trust what was not seen.
pub fn loader_env(pid: u32) -> Option<&'static str> {
    match fs::read(proc_path(pid, "environ")) {
        Ok(env) => loader_env_in(&env),
        Err(_) => Some("environment not readable"),
    }
}

/// All thread-group leaders in `/proc`, without kernel threads and zombies (no executable).
pub fn list_pids() -> Result<Vec<u32>, AttestError> {
    let entries = fs::read_dir("/proc").map_err(|e| io_err("list", "/proc", e))?;
    let mut pids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_err("list", "/proc", e))?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = fs::read_to_string(proc_path(pid, "stat")) else {
            continue; // gone
        };
        match parse_stat(&text) {
            Some(s) if s.flags & PF_KTHREAD != 0 || matches!(s.state, 'Z' | 'X' | 'x') => {}
            Some(_) => pids.push(pid),
            None => {}
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        // SAFETY: sysconf has no preconditions; it only reads a system constant.
        let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        u64::try_from(v).ok().filter(|&t| t > 0).unwrap_or(100)
    })
}

/// Convert a boottime in ns (`task->start_boottime`) to clock ticks, as field 22 of
/// `/proc/PID/stat`.
pub fn boot_ns_to_ticks(ns: u64) -> u64 {
    let per_tick = (1_000_000_000 / clk_tck()).max(1);
    ns / per_tick
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::time::Duration;

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir()
                .join(format!("enf-attest-{}-{tag}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).expect("scratch dir");
            Scratch(dir)
        }

        fn file(&self, name: &str, content: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            fs::write(&p, content).expect("write scratch file");
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn rewrite_in_place(p: &Path, content: &[u8]) {
        let f = OpenOptions::new().write(true).open(p).expect("open rw");
        f.write_all_at(content, 0).expect("rewrite");
        f.sync_all().expect("sync");
    }

    fn sha(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    #[test]
    fn rewrite_in_place_same_size_changes_key_even_with_mtime_restored() {
        let s = Scratch::new("rewrite");
        let p = s.file("exe", b"version one!");
        let mut cache = HashCache::new(8);
        let a = cache.hash_file(&File::open(&p).unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(50)); // cross the timestamp granule
        rewrite_in_place(&p, b"version two!");
        // Put mtime back exactly as it was: only ctime tells the rewrite apart.
        let f = File::open(&p).unwrap();
        let old = nix::sys::time::TimeSpec::new(a.key.mtime_sec, i64::from(a.key.mtime_nsec));
        nix::sys::stat::futimens(&f, &old, &old).expect("futimens");
        let b = cache.hash_file(&f).unwrap();
        assert_eq!(a.key.ino, b.key.ino);
        assert_eq!(a.key.size, b.key.size);
        assert_eq!(
            (a.key.mtime_sec, a.key.mtime_nsec),
            (b.key.mtime_sec, b.key.mtime_nsec)
        );
        assert_ne!(a.key, b.key, "ctime must differ");
        assert_ne!(a.sha256, b.sha256);
        assert_eq!(b.sha256, sha(b"version two!"));
    }

    #[test]
    fn cache_hits_and_rewrite_after_timestamps_settle() {
        let s = Scratch::new("settle");
        let p = s.file("exe", b"stable content");
        std::thread::sleep(Duration::from_millis(2100)); // let the timestamps age past RACY_NS
        let mut cache = HashCache::new(8);
        let f = File::open(&p).unwrap();
        let a = cache.hash_file(&f).unwrap();
        assert!(a.cacheable);
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (0, 1, 1));
        let b = cache.hash_file(&f).unwrap();
        assert_eq!(a, b);
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 1, 1));

        rewrite_in_place(&p, b"change content");
        let c = cache.hash_file(&f).unwrap();
        assert_ne!(a.key, c.key);
        assert_eq!(c.sha256, sha(b"change content"));
        assert!(!c.cacheable, "just rewritten: racy");
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 2, 1));
    }

    #[test]
    fn just_written_file_is_not_cacheable() {
        let s = Scratch::new("racy");
        let p = s.file("exe", b"fresh");
        let mut cache = HashCache::new(8);
        let h = cache.hash_file(&File::open(&p).unwrap()).unwrap();
        assert!(!h.cacheable);
        assert_eq!(h.sha256, sha(b"fresh"));
        assert_eq!(cache.len(), 0);
        assert!(cache.is_empty());
        cache.hash_file(&File::open(&p).unwrap()).unwrap();
        assert_eq!((cache.hits(), cache.misses()), (0, 2));
    }

    #[test]
    fn one_byte_changed_copy_hashes_differently() {
        let s = Scratch::new("copy");
        // Larger than the buffer, not a multiple of it: the streaming path is exercised.
        let data: Vec<u8> = (0..(3 * HASH_BUF + 123)).map(|i| (i % 251) as u8).collect();
        let mut changed = data.clone();
        changed[HASH_BUF + 7] ^= 1;
        let a = s.file("a", &data);
        let b = s.file("b", &changed);
        let mut cache = HashCache::new(8);
        let ha = cache.hash_file(&File::open(a).unwrap()).unwrap();
        let hb = cache.hash_file(&File::open(b).unwrap()).unwrap();
        assert_eq!(ha.sha256, sha(&data));
        assert_eq!(hb.sha256, sha(&changed));
        assert_ne!(ha.sha256, hb.sha256);
        assert_ne!(ha.key.ino, hb.key.ino);
    }

    #[test]
    fn hash_leaves_file_offset_alone() {
        let s = Scratch::new("offset");
        let p = s.file("f", b"0123456789");
        let mut f = File::open(p).unwrap();
        let mut head = [0u8; 3];
        std::io::Read::read_exact(&mut f, &mut head).unwrap();
        HashCache::new(1).hash_file(&f).unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut f, &mut rest).unwrap();
        assert_eq!(rest, "3456789");
    }

    #[test]
    fn own_process_hash_equals_file_hash() {
        let bytes = fs::read("/proc/self/exe").expect("read own exe");
        let mut cache = HashCache::new(8);
        let h = cache.hash_process(std::process::id()).expect("hash self");
        assert_eq!(h.sha256, sha(&bytes));
        let meta = fs::metadata("/proc/self/exe").unwrap();
        assert_eq!(h.key.ino, meta.ino());
        assert_eq!(h.key.size, meta.len());
        let major = nix::sys::stat::major(meta.dev()) as u32;
        let minor = nix::sys::stat::minor(meta.dev()) as u32;
        assert_eq!(h.key.dev, kernel_dev(major, minor));
    }

    #[test]
    fn attest_self() {
        let mut cache = HashCache::new(8);
        let pid = std::process::id();
        let f = attest_pid(&mut cache, pid).expect("attest self");
        assert_eq!(f.pid, pid);
        let exe = fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(f.exe_path, exe.to_string_lossy());
        assert_eq!(f.uid, nix::unistd::getuid().as_raw());
        assert_eq!(f.gid, nix::unistd::getgid().as_raw());
        assert_eq!(f.cgroup, process_cgroup(pid).unwrap());
        let stat = parse_stat(&fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert_eq!(f.start_ticks, stat.start_ticks);
        assert!(list_pids().unwrap().contains(&pid));
    }

    #[test]
    fn vanished_process_is_gone() {
        let mut cache = HashCache::new(8);
        let pid = 0x3fff_fff0; // above PID_MAX_LIMIT
        let e = attest_pid(&mut cache, pid).expect_err("no such process");
        assert!(e.is_gone(), "{e}");
        assert!(cache.hash_process(pid).unwrap_err().is_gone());
        assert!(process_cgroup(pid).unwrap_err().is_gone());
    }

    #[test]
    fn kernel_threads_are_not_listed() {
        let pids = list_pids().unwrap();
        // kthreadd is pid 2 in the initial pid namespace.
        if let Some(s) = fs::read_to_string("/proc/2/stat")
            .ok()
            .and_then(|t| parse_stat(&t))
            && s.flags & PF_KTHREAD != 0
        {
            assert!(!pids.contains(&2));
            let e = HashCache::new(1).hash_process(2).unwrap_err();
            assert!(matches!(e, AttestError::NoExe { pid: 2 }), "{e}");
            assert!(e.is_gone());
        }
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut c = HashCache::new(2);
        let k = |ino| ExeKey {
            ino,
            ..ExeKey::default()
        };
        c.insert(k(1), [1; 32]);
        c.insert(k(2), [2; 32]);
        assert_eq!(c.lookup(&k(1)), Some([1; 32])); // 2 is now the oldest
        c.insert(k(3), [3; 32]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.lookup(&k(2)), None);
        assert_eq!(c.lookup(&k(1)), Some([1; 32]));
        assert_eq!(c.lookup(&k(3)), Some([3; 32]));
        let mut none = HashCache::new(0);
        none.insert(k(1), [1; 32]);
        assert!(none.is_empty());
    }

    #[test]
    fn racy_window() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let key = |m: i64, c: i64| ExeKey {
            mtime_sec: m,
            ctime_sec: c,
            ..ExeKey::default()
        };
        assert!(!racy(&key(999_990, 999_990), now));
        assert!(racy(&key(999_999, 999_990), now));
        assert!(racy(&key(999_990, 999_999), now));
        assert!(racy(&key(1_000_001, 999_990), now));
        assert!(racy(&key(999_990, 1_000_100), now), "ctime in the future");
        assert!(!racy(&key(1_000_100, 999_990), now), "mtime set far ahead");
    }

    const HYBRID: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
34 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
";
    const UNIFIED: &str = "\
24 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn mountinfo_parsing() {
        assert_eq!(
            cgroup2_mount_from(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_from(UNIFIED),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // No optional fields, an escaped space, and a sub-cgroup bind mount listed first.
        let odd = "\
40 1 0:30 /kubepods /var/lib/x rw - cgroup2 cgroup2 rw
41 1 0:30 / /mnt/cg\\040two rw - cgroup2 none rw
";
        assert_eq!(cgroup2_mount_from(odd), Some(PathBuf::from("/mnt/cg two")));
        assert_eq!(
            cgroup2_mount_from("40 1 0:30 /kubepods /var/lib/x rw - cgroup2 cgroup2 rw\n"),
            Some(PathBuf::from("/var/lib/x"))
        );
        let v1 = HYBRID.replace("cgroup2 cgroup2", "tmpfs tmpfs");
        assert_eq!(cgroup2_mount_from(&v1), None);
        assert_eq!(cgroup2_mount_from(""), None);
        assert_eq!(cgroup2_mount_from("garbage\n- cgroup2\n1 2 3 4\n"), None);
        assert_eq!(unescape_mountinfo("a\\011b\\\\c\\9"), "a\tb\\\\c\\9");
    }

    #[test]
    fn cgroup_of_self_and_ids() {
        let mount = cgroup2_mount().expect("cgroup2 mounted on this machine");
        let cg = process_cgroup(std::process::id()).unwrap();
        assert!(cg.starts_with('/'), "{cg}");
        let root = cgroup_id(&mount, "/").unwrap();
        assert_eq!(root, fs::metadata(&mount).unwrap().ino());
        let own = cgroup_id(&mount, &cg).unwrap();
        assert_ne!(own, 0);
        let all = walk_cgroups(&mount).unwrap();
        assert!(all.contains(&("/".to_string(), root)));
        assert!(all.contains(&(cg.clone(), own)), "{cg} not in walk");
        assert!(matches!(
            cgroup_id(&mount, "/../etc"),
            Err(AttestError::BadCgroupPath { .. })
        ));
        let e = cgroup_id(&mount, "/no-such-cgroup-here").unwrap_err();
        assert!(e.to_string().contains("no-such-cgroup-here"), "{e}");
    }

    #[test]
    fn proc_text_parsing() {
        assert_eq!(
            parse_cgroup("12:pids:/\n0::/a/b.service\n"),
            Some("/a/b.service".into())
        );
        assert_eq!(parse_cgroup("1:name=systemd:/\n"), None);
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 0 0";
        let s = parse_stat(stat).unwrap();
        assert_eq!((s.state, s.flags, s.start_ticks), ('S', 4_194_560, 12345));
        assert_eq!(parse_stat("42 (x) S 1 2"), None);
        assert_eq!(parse_stat("no paren"), None);
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t100\t0\t0\t0\n";
        assert_eq!(parse_status_ids(status), Some((1000, 100)));
        assert_eq!(parse_status_ids("Uid:\tx\n"), None);
    }

    #[test]
    fn boot_ns_conversion() {
        assert_eq!(boot_ns_to_ticks(1_000_000_000), clk_tck());
        assert_eq!(boot_ns_to_ticks(0), 0);
        // A process started after the current one cannot have a smaller start time.
        let mut boot = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut boot) },
            0
        );
        let now_ns = boot.tv_sec as u64 * 1_000_000_000 + boot.tv_nsec as u64;
        let own = parse_stat(&fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert!(boot_ns_to_ticks(now_ns) >= own.start_ticks);
    }
}

#[cfg(test)]
mod cgroup2_flag_tests {
    use super::*;

    #[test]
    fn a_folder_that_is_not_cgroup2_is_refused() {
        let err = use_cgroup2_mount(Path::new("/tmp")).unwrap_err();
        assert!(matches!(err, AttestError::NotCgroup2 { .. }), "{err}");
        assert!(err.to_string().contains("/tmp is not a cgroup2"), "{err}");
        assert!(
            CGROUP2_MOUNT.get().is_none(),
            "a refused folder is not used"
        );
    }
}
