//! Cgroup path globs: `*` matches any characters within one path segment, a `**` segment
//! matches any number of segments (zero included). Empty segments are ignored, so `/` is the
//! empty path and `/a/**` matches `/a` itself and everything below it.

fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// Does the glob segment `pat` (with `*` wildcards) match the segment `s`?
fn seg_match(pat: &[u8], s: &[u8]) -> bool {
    // Classic greedy wildcard matching with backtracking to the last star.
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if p < pat.len() && pat[p] == s[i] {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Does the cgroup glob `pattern` match the cgroup v2 path `path` (relative to the root)?
pub fn cgroup_glob_match(pattern: &str, path: &str) -> bool {
    let pat = segments(pattern);
    let segs = segments(path);
    // reach[j]: pattern prefix matched path prefix of length j.
    let mut reach = vec![false; segs.len() + 1];
    reach[0] = true;
    for p in &pat {
        let mut next = vec![false; segs.len() + 1];
        if *p == "**" {
            let mut any = false;
            for j in 0..=segs.len() {
                any |= reach[j];
                next[j] = any;
            }
        } else {
            for j in 0..segs.len() {
                if reach[j] && seg_match(p.as_bytes(), segs[j].as_bytes()) {
                    next[j + 1] = true;
                }
            }
        }
        reach = next;
    }
    reach[segs.len()]
}

/// Does the name glob `pattern` (`*` matches any characters, `/` included) match `value`?
/// The glob of Kubernetes names and label values, which are single names, not paths.
pub(crate) fn name_glob_match(pattern: &str, value: &str) -> bool {
    seg_match(pattern.as_bytes(), value.as_bytes())
}

/// Can some name match both name globs ([`name_glob_match`])?
pub(crate) fn name_globs_intersect(a: &str, b: &str) -> bool {
    seg_intersect(a.as_bytes(), b.as_bytes())
}

/// Can some single segment match both segment globs?
fn seg_intersect(a: &[u8], b: &[u8]) -> bool {
    // reach[i][j]: some string drives a to i and b to j.
    let (n, m) = (a.len(), b.len());
    let mut reach = vec![vec![false; m + 1]; n + 1];
    reach[0][0] = true;
    // Epsilon moves (skipping a star) and char moves only go forward, so one pass in order works.
    for i in 0..=n {
        for j in 0..=m {
            if !reach[i][j] {
                continue;
            }
            let sa = i < n && a[i] == b'*';
            let sb = j < m && b[j] == b'*';
            if sa {
                reach[i + 1][j] = true;
            }
            if sb {
                reach[i][j + 1] = true;
            }
            if i < n && j < m {
                if !sa && !sb && a[i] == b[j] {
                    reach[i + 1][j + 1] = true;
                } else if sa && !sb {
                    reach[i][j + 1] = true;
                } else if sb && !sa {
                    reach[i + 1][j] = true;
                }
            }
        }
    }
    reach[n][m]
}

/// Can some cgroup path match both globs?
pub(crate) fn globs_intersect(a: &str, b: &str) -> bool {
    let a = segments(a);
    let b = segments(b);
    let (n, m) = (a.len(), b.len());
    let mut reach = vec![vec![false; m + 1]; n + 1];
    reach[0][0] = true;
    for i in 0..=n {
        for j in 0..=m {
            if !reach[i][j] {
                continue;
            }
            let da = i < n && a[i] == "**";
            let db = j < m && b[j] == "**";
            if da {
                reach[i + 1][j] = true;
            }
            if db {
                reach[i][j + 1] = true;
            }
            if i < n && j < m {
                if da && !db {
                    reach[i][j + 1] = true; // ** eats b's segment
                } else if db && !da {
                    reach[i + 1][j] = true;
                } else if !da && !db && seg_intersect(a[i].as_bytes(), b[j].as_bytes()) {
                    reach[i + 1][j + 1] = true;
                }
            }
        }
    }
    reach[n][m]
}

/// Why `pattern` is not a valid cgroup glob, if it is not.
pub(crate) fn glob_problem(pattern: &str) -> Option<String> {
    if !pattern.starts_with('/') {
        return Some(format!(
            "cgroup glob {pattern:?} must start with \"/\" (a cgroup v2 path relative to the cgroup2 root, e.g. \"/system.slice/x.service\")"
        ));
    }
    for seg in segments(pattern) {
        if seg == "." || seg == ".." {
            return Some(format!(
                "cgroup glob {pattern:?} contains a {seg:?} segment; write the path without it"
            ));
        }
        if seg.contains("**") && seg != "**" {
            return Some(format!(
                "cgroup glob {pattern:?}: \"**\" must be a whole path segment (\"/a/**\"); use \"*\" within a segment"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        assert!(cgroup_glob_match("/kubepods.slice/**", "/kubepods.slice"));
        assert!(cgroup_glob_match(
            "/kubepods.slice/**",
            "/kubepods.slice/a/b"
        ));
        assert!(!cgroup_glob_match("/kubepods.slice/**", "/system.slice"));
        assert!(cgroup_glob_match("/**", "/"));
        assert!(cgroup_glob_match("/", "/"));
        assert!(!cgroup_glob_match("/", "/a"));
        assert!(cgroup_glob_match(
            "/system.slice/*.service",
            "/system.slice/x.service"
        ));
        assert!(!cgroup_glob_match(
            "/system.slice/*.service",
            "/system.slice/a/x.service"
        ));
        assert!(cgroup_glob_match("/a/**/c", "/a/c"));
        assert!(cgroup_glob_match("/a/**/c", "/a/b/b/c"));
        assert!(!cgroup_glob_match("/a/**/c", "/a/b/b/d"));
        assert!(cgroup_glob_match("/a/*x*y", "/a/zxqxy"));
        assert!(!cgroup_glob_match("/a/*x*y", "/a/zxqx"));
    }

    #[test]
    fn name_globs() {
        assert!(name_glob_match("payments", "payments"));
        assert!(name_glob_match("pay*", "payments"));
        assert!(name_glob_match("*", ""));
        assert!(name_glob_match("", ""));
        assert!(!name_glob_match("pay*", "shop"));
        assert!(!name_glob_match("payments", "payments-2"));
        assert!(name_globs_intersect("pay*", "*ments"));
        assert!(!name_globs_intersect("pay*", "shop*"));
    }

    #[test]
    fn intersection() {
        assert!(globs_intersect("/a/**", "/a/b/*.service"));
        assert!(globs_intersect("/**", "/x"));
        assert!(!globs_intersect("/a/**", "/b/**"));
        assert!(globs_intersect("/a/*.service", "/a/x*"));
        assert!(!globs_intersect("/a/*.service", "/a/*.scope"));
        assert!(!globs_intersect("/a/b", "/a/b/c"));
        assert!(globs_intersect("/a/**/c", "/a/b/**"));
        assert!(globs_intersect("/a/b/**", "/a/b"));
    }

    #[test]
    fn intersection_agrees_with_matching() {
        let pats = [
            "/", "/**", "/a", "/a/**", "/a/*", "/*/b", "/a/b", "/**/b", "/a*", "/*a", "/b/**/a",
        ];
        let paths = [
            "/", "/a", "/b", "/a/b", "/b/a", "/ab", "/ba", "/a/a", "/b/b/a", "/a/b/b",
        ];
        for a in pats {
            for b in pats {
                let witness = paths
                    .iter()
                    .any(|p| cgroup_glob_match(a, p) && cgroup_glob_match(b, p));
                if witness {
                    assert!(globs_intersect(a, b), "{a} {b}");
                }
            }
        }
    }
}
