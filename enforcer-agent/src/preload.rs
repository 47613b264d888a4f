//! The `preload:` grant (SECURITY.md guarantee 3): an exec whose environment names
//! `LD_PRELOAD` keeps its identity when every object it preloads is a file only root can
//! change, and the identity's `match` entry lists that file's sha256 in `preload:`.
//!
//! The kernel holds such an exec (SIGSTOP before its first instruction, while an agent lives
//! and the policy in force has a `preload:` list); the agent then reads
//! `/proc/PID/environ` (trustworthy: the process has not run), resolves and hashes each
//! entry here, and releases the process with its identity, or withheld as before.
//!
//! Why "only root can change": the file hashed is the file `ld.so` opens a moment later
//! only if nobody can swap it (or the directories on its path) in between, and its content
//! stays what was hashed only if nobody can write it while it is mapped (a library, unlike an
//! executable, can be written while in use). So every directory on the path (from the
//! process's root) and the file must be owned by root and writable by no one else; a sticky
//! directory (`/tmp`) is accepted when the entry in it belongs to root (only root can then
//! rename or remove it). Anything else is refused and the identity withheld.

use std::{
    collections::VecDeque,
    fs::File,
    os::fd::{AsFd, OwnedFd},
};

use enforcer_common::{EnvPrefix, LOADER_PRELOAD, loader_var, loader_var_name};
use nix::{
    fcntl::{OFlag, openat, readlinkat},
    sys::stat::{FileStat, Mode, SFlag, fstat},
};

use crate::attest::HashCache;

/// Symbolic links followed while resolving one entry (the kernel's limit).
const MAX_LINKS: usize = 40;

/// One object `LD_PRELOAD` names, hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preload {
    /// The entry as written in `LD_PRELOAD`.
    pub path: String,
    pub sha256: [u8; 32],
}

/// Why the preloads of a process cannot be granted (its identity stays withheld). The text
/// is what `identities` and the deny events show after `withheld: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Another loader variable than `LD_PRELOAD` (only `LD_PRELOAD` can be granted).
    #[error("{0}")]
    Other(&'static str),
    #[error("environment not readable")]
    Unreadable,
    #[error(
        "LD_PRELOAD entry {0:?} has no '/': ld.so searches the library path for it; name the file by its absolute path to grant it"
    )]
    Bare(String),
    #[error(
        "LD_PRELOAD entry {0:?} is relative to the working directory; name the file by its absolute path to grant it"
    )]
    Relative(String),
    #[error(
        "LD_PRELOAD entry {0:?} holds '$' (ld.so expands $ORIGIN, $LIB, $PLATFORM); name the file itself to grant it"
    )]
    Token(String),
    #[error("LD_PRELOAD entry is not UTF-8")]
    NotUtf8,
    #[error("LD_PRELOAD {path}: {why}; only a file that root alone can change can be granted")]
    Untrusted { path: String, why: String },
    #[error("LD_PRELOAD {path}: {why}")]
    Unusable { path: String, why: String },
    #[error("LD_PRELOAD {path} sha256 {sha256} not in preload: of {identity}")]
    NotGranted {
        path: String,
        sha256: String,
        identity: String,
    },
    #[error("LD_PRELOAD: no identity matches this process")]
    NoIdentity,
    #[error(
        "LD_PRELOAD: the process ran before the agent read its environment (continued by another process)"
    )]
    Ran,
}

/// The `LD_PRELOAD` entries of an environment (`/proc/PID/environ` bytes), in order and
/// without repeats, when `LD_PRELOAD` is its only loader variable (every occurrence counts:
/// `ld.so` takes the last). An entry must be an absolute path without `$`.
pub fn preload_entries(environ: &[u8]) -> Result<Vec<String>, Refusal> {
    let mut out: Vec<String> = Vec::new();
    for s in environ.split(|b| *b == 0) {
        let found = loader_var(&EnvPrefix::from_bytes(s));
        if found == 0 {
            continue;
        }
        if found != LOADER_PRELOAD + 1 {
            return Err(Refusal::Other(
                loader_var_name(found).unwrap_or("loader environment"),
            ));
        }
        let value = s.splitn(2, |b| *b == b'=').nth(1).unwrap_or_default();
        let value = std::str::from_utf8(value).map_err(|_| Refusal::NotUtf8)?;
        for e in value.split([' ', ':']).filter(|e| !e.is_empty()) {
            if !e.contains('/') {
                return Err(Refusal::Bare(e.to_string()));
            }
            if !e.starts_with('/') {
                return Err(Refusal::Relative(e.to_string()));
            }
            if e.contains('$') {
                return Err(Refusal::Token(e.to_string()));
            }
            if !out.iter().any(|o| o == e) {
                out.push(e.to_string());
            }
        }
    }
    Ok(out)
}

fn untrusted(path: &str, why: String) -> Refusal {
    Refusal::Untrusted {
        path: path.to_string(),
        why,
    }
}

fn unusable(path: &str, why: String) -> Refusal {
    Refusal::Unusable {
        path: path.to_string(),
        why,
    }
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

const WRITE_OTHERS: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Why the directory `dir` (named `shown`) lets someone other than root change its entry
/// `entry`, if it does.
fn dir_problem(dir: &FileStat, entry: &FileStat, shown: &str) -> Option<String> {
    if dir.st_uid != 0 {
        return Some(format!("folder {shown} belongs to uid {}", dir.st_uid));
    }
    if dir.st_mode & WRITE_OTHERS != 0 && !(dir.st_mode & STICKY != 0 && entry.st_uid == 0) {
        return Some(format!(
            "folder {shown} is writable by others (mode {:o})",
            dir.st_mode & 0o7777
        ));
    }
    None
}

/// Opens the file `path` (absolute) as the process whose root is `root` would find it, and
/// checks that root alone can change it and every folder on the way (symbolic links
/// followed inside `root`). The file is opened read-only, without following a final link
/// swap, and must be a regular file.
pub fn open_trusted(root: &OwnedFd, path: &str) -> Result<File, Refusal> {
    let sys = |what: &str, e: nix::Error| unusable(path, format!("{what}: {}", e.desc()));
    let mut dirs: Vec<(OwnedFd, FileStat, String)> = Vec::new();
    let root_st = fstat(root.as_fd()).map_err(|e| sys("fstat /", e))?;
    let root_dup = root
        .try_clone()
        .map_err(|e| unusable(path, format!("dup: {e}")))?;
    dirs.push((root_dup, root_st, "/".to_string()));
    let mut todo: VecDeque<String> = path.split('/').map(str::to_string).collect();
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        match name.as_str() {
            "" | "." => continue,
            ".." => {
                if dirs.len() > 1 {
                    dirs.pop();
                }
                continue;
            }
            _ => {}
        }
        let last = todo.iter().all(|n| n.is_empty() || n == ".");
        let (dir, dir_st, dir_shown) = dirs
            .last()
            .ok_or_else(|| unusable(path, "no folder".into()))?;
        let shown = format!("{}/{name}", dir_shown.trim_end_matches('/'));
        let fd = openat(
            dir.as_fd(),
            name.as_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| sys(&format!("open {shown}"), e))?;
        let st = fstat(fd.as_fd()).map_err(|e| sys(&format!("fstat {shown}"), e))?;
        if let Some(why) = dir_problem(dir_st, &st, dir_shown) {
            return Err(untrusted(path, why));
        }
        match kind(&st) {
            SFlag::S_IFLNK => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(unusable(path, "too many symbolic links".into()));
                }
                let target = readlinkat(dir.as_fd(), name.as_str())
                    .map_err(|e| sys(&format!("readlink {shown}"), e))?;
                let target = target
                    .into_string()
                    .map_err(|_| unusable(path, format!("link {shown} is not UTF-8")))?;
                if target.starts_with('/') {
                    dirs.truncate(1);
                }
                for (i, part) in target.split('/').enumerate() {
                    todo.insert(i, part.to_string());
                }
            }
            SFlag::S_IFDIR if !last => dirs.push((fd, st, shown)),
            SFlag::S_IFREG if last => {
                if st.st_uid != 0 {
                    return Err(untrusted(
                        path,
                        format!("{shown} belongs to uid {}", st.st_uid),
                    ));
                }
                if st.st_mode & WRITE_OTHERS != 0 {
                    return Err(untrusted(
                        path,
                        format!(
                            "{shown} is writable by others (mode {:o})",
                            st.st_mode & 0o7777
                        ),
                    ));
                }
                let file = openat(
                    dir.as_fd(),
                    name.as_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| sys(&format!("open {shown}"), e))?;
                let again = fstat(file.as_fd()).map_err(|e| sys(&format!("fstat {shown}"), e))?;
                if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
                    return Err(unusable(
                        path,
                        format!("{shown} changed while it was opened"),
                    ));
                }
                return Ok(File::from(file));
            }
            _ => {
                return Err(unusable(
                    path,
                    format!("{shown} is not a regular file (or a folder on the way)"),
                ));
            }
        }
    }
    Err(unusable(path, "names no file".into()))
}

/// Resolves and hashes every entry for process `pid` (paths inside its root).
pub fn hash_preloads(
    cache: &mut HashCache,
    pid: u32,
    entries: &[String],
) -> Result<Vec<Preload>, Refusal> {
    let root_path = format!("/proc/{pid}/root");
    let root: OwnedFd = openat(
        nix::fcntl::AT_FDCWD,
        root_path.as_str(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| unusable(&root_path, e.desc().to_string()))?;
    let mut out = Vec::new();
    for e in entries {
        let file = open_trusted(&root, e)?;
        let h = cache
            .hash_file(&file)
            .map_err(|err| unusable(e, err.to_string()))?;
        out.push(Preload {
            path: e.clone(),
            sha256: h.sha256,
        });
    }
    Ok(out)
}

/// True when process `pid` is still stopped where the kernel held it: at the return of its
/// `execve`, its stack pointer on the new program's initial stack. A process another
/// process continued (SIGCONT) has run `ld.so` and perhaps rewritten its environment; one
/// stopped again is stopped elsewhere.
///
/// The exec event may reach the agent before the process has taken its stop (the SIGSTOP is
/// delivered on its way back to user space): it is waited for, up to [`STOP_WAIT`].
pub fn untouched_since_exec(pid: u32) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let stopped = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            == Some("T");
        if stopped {
            let Ok(sys) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) else {
                return false;
            };
            let ok = stopped_at_exec(&stat, &sys);
            if !ok {
                tracing::debug!(pid, syscall = %sys.trim(), "held process not where the kernel stopped it");
            }
            return ok;
        }
        if t0.elapsed() >= STOP_WAIT {
            tracing::debug!(pid, "held process not stopped after {STOP_WAIT:?}");
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// How long [`untouched_since_exec`] waits for a held process to take its stop.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// [`untouched_since_exec`] on the text of `/proc/PID/stat` and `/proc/PID/syscall`.
fn stopped_at_exec(stat: &str, syscall: &str) -> bool {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    // Fields after the command: state is field 3, startstack field 28.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (Some(state), Some(start_stack)) = (f.first(), f.get(25)) else {
        return false;
    };
    if *state != "T" {
        return false;
    }
    let Ok(start_stack) = start_stack.parse::<u64>() else {
        return false;
    };
    // "NR ARG1 .. ARG6 SP PC" while blocked in (or stopped on the way out of) a syscall.
    let s: Vec<&str> = syscall.split_whitespace().collect();
    if s.len() != 9 {
        return false;
    }
    let exec = matches!(s[0], "59" | "322"); // x86_64 execve, execveat
    let sp = s[7]
        .strip_prefix("0x")
        .and_then(|h| u64::from_str_radix(h, 16).ok());
    exec && sp == Some(start_stack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_the_environment() {
        let env = b"PATH=/bin\0LD_PRELOAD=/a/x.so:/b/y.so /a/x.so\0HOME=/\0";
        assert_eq!(
            preload_entries(env),
            Ok(vec!["/a/x.so".to_string(), "/b/y.so".to_string()])
        );
        assert_eq!(preload_entries(b"PATH=/bin\0"), Ok(vec![]));
        assert_eq!(
            preload_entries(b"LD_PRELOAD=libx.so\0"),
            Err(Refusal::Bare("libx.so".into()))
        );
        assert_eq!(
            preload_entries(b"LD_PRELOAD=./x.so\0"),
            Err(Refusal::Relative("./x.so".into()))
        );
        assert_eq!(
            preload_entries(b"LD_PRELOAD=/$LIB/x.so\0"),
            Err(Refusal::Token("/$LIB/x.so".into()))
        );
        assert_eq!(
            preload_entries(b"LD_PRELOAD=/a.so\0NODE_OPTIONS=--require=x\0"),
            Err(Refusal::Other("NODE_OPTIONS"))
        );
        assert_eq!(
            preload_entries(b"LD_LIBRARY_PATH=/tmp\0LD_PRELOAD=/a.so\0"),
            Err(Refusal::Other("LD_LIBRARY_PATH"))
        );
        // Every occurrence counts (ld.so takes the last one).
        assert_eq!(
            preload_entries(b"LD_PRELOAD=/a.so\0LD_PRELOAD=b.so\0"),
            Err(Refusal::Bare("b.so".into()))
        );
    }

    #[test]
    fn stopped_at_exec_reads_stat_and_syscall() {
        let stat = "42 (svc) T 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0 \
                    18446744073709551615 0 0 140736000000000 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let at_exec = "59 0x0 0x0 0x0 0x0 0x0 0x0 0x7fffa7498000 0x7f00000000";
        assert_eq!(format!("{:x}", 140_736_000_000_000u64), "7fffa7498000");
        assert!(stopped_at_exec(stat, at_exec));
        assert!(!stopped_at_exec(&stat.replace(" T ", " S "), at_exec));
        assert!(!stopped_at_exec(stat, "-1 0x7fff7fb69000 0x7f00001000"));
        assert!(!stopped_at_exec(
            stat,
            "230 0x0 0x0 0x0 0x0 0x0 0x0 0x7fff7fb69f00 0x7f00000000"
        ));
        assert!(!stopped_at_exec(stat, "running"));
    }

    #[test]
    fn only_files_root_alone_can_change_are_opened() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (files owned by root and by another uid)");
            return;
        }
        use std::os::unix::fs::{PermissionsExt as _, symlink};
        let base = std::env::temp_dir().join(format!("enf-preload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("ok")).expect("mkdir");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(base.join("ok"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(base.join("ok/a.so"), b"A").expect("w");
        std::fs::set_permissions(base.join("ok/a.so"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        symlink("a.so", base.join("ok/link.so")).expect("symlink");
        std::fs::create_dir_all(base.join("open")).expect("mkdir");
        std::fs::set_permissions(base.join("open"), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        std::fs::write(base.join("open/b.so"), b"B").expect("w");
        std::fs::write(base.join("ok/w.so"), b"W").expect("w");
        std::fs::set_permissions(base.join("ok/w.so"), std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
        std::fs::write(base.join("ok/u.so"), b"U").expect("w");
        std::os::unix::fs::chown(base.join("ok/u.so"), Some(65534), None).expect("chown");
        let root: OwnedFd = File::open("/").expect("/").into();
        let p = |n: &str| base.join(n).to_string_lossy().into_owned();
        // Whether the temp folder's parents (e.g. /tmp, sticky and root-owned) are accepted.
        let ok = open_trusted(&root, &p("ok/a.so"));
        match &ok {
            Ok(_) => {
                assert!(open_trusted(&root, &p("ok/link.so")).is_ok());
                assert!(open_trusted(&root, &p("ok/../ok/a.so")).is_ok());
            }
            Err(e) => eprintln!("the temp folder itself is not root-only here: {e}"),
        }
        for bad in ["open/b.so", "ok/w.so", "ok/u.so"] {
            let r = open_trusted(&root, &p(bad));
            assert!(matches!(r, Err(Refusal::Untrusted { .. })), "{bad}: {r:?}");
        }
        assert!(matches!(
            open_trusted(&root, &p("ok")),
            Err(Refusal::Unusable { .. })
        ));
        assert!(matches!(
            open_trusted(&root, &p("ok/missing.so")),
            Err(Refusal::Unusable { .. })
        ));
        let _ = std::fs::remove_dir_all(&base);
    }
}
