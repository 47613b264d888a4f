//! Environment variables that make the dynamic loader or a language runtime load code
//! (SECURITY.md guarantee 3). An exec whose environment holds one of them gets no identity
//! (`PROC_WITHHELD`): the code it names would otherwise run with the identity of the attested
//! executable.
//!
//! The kernel reads the first [`ENV_PREFIX`] bytes of each environment string of the new
//! process at exec and asks [`loader_var`]; the agent asks the same function of
//! `/proc/PID/environ`. The matcher compares 8-byte words against masks computed at compile
//! time, so the kernel build is a short, branch-light sequence the verifier walks quickly.
//!
//! Each entry, and why it loads code:
//! - glibc / musl `ld.so`: `LD_PRELOAD` and `LD_AUDIT` (objects loaded into the process),
//!   `LD_LIBRARY_PATH` (where its libraries come from), `LD_ORIGIN_PATH` (what `$ORIGIN`
//!   means when the executable's own path is unknown: library search), `GCONV_PATH`
//!   (iconv modules, `dlopen`ed by glibc). Not listed, as they load no code: `LD_BIND_NOW`,
//!   `LD_DEBUG*`, `LD_PROFILE*` (writes a profile), `LD_SHOW_AUXV`, `LD_HWCAP_MASK` (picks
//!   among the trusted directories), `NLSPATH`/`LOCPATH` (data), `MALLOC_*`, `GLIBC_TUNABLES`.
//! - Node.js: `NODE_OPTIONS` (`--require`, `--import`, `--loader`), `NODE_PATH`.
//! - JVM: `JAVA_TOOL_OPTIONS`, `_JAVA_OPTIONS`, `JDK_JAVA_OPTIONS` (`-javaagent`,
//!   `-agentpath`), `CLASSPATH` (used when the command line gives none).
//! - Python: `PYTHONPATH`, `PYTHONSTARTUP`, `PYTHONHOME`, `PYTHONUSERBASE` (its `.pth` files
//!   run code at start), `PYTHONBREAKPOINT` (imports a callable), `PYTHONPYCACHEPREFIX` (where
//!   compiled modules are read from).
//! - Perl: `PERL5OPT` (`-M`), `PERL5LIB`, `PERLLIB`, `PERL5DB`.
//! - Ruby: `RUBYOPT` (`-r`), `RUBYLIB`.
//! - Shells: `BASH_ENV` and `ENV` (a file sourced at start), `BASH_FUNC_*` (exported
//!   functions, i.e. code), `SHELLOPTS` (`xtrace` evaluates `PS4`).
//! - Lua: `LUA_INIT*`, `LUA_PATH*`, `LUA_CPATH*` (any version suffix).
//! - Tcl: `TCLLIBPATH`. PHP: `PHPRC`, `PHP_INI_SCAN_DIR` (an ini file can prepend a script).
//! - .NET: `DOTNET_STARTUP_HOOKS`, `DOTNET_ADDITIONAL_DEPS`, `CORECLR_PROFILER_PATH*`.
//! - OpenSSL: `OPENSSL_CONF` (can load engines and providers), `OPENSSL_ENGINES`,
//!   `OPENSSL_MODULES`.
//! - GLib/GTK: `GIO_MODULE_DIR`, `GIO_EXTRA_MODULES`, `GTK_MODULES`, `GTK3_MODULES`.
//!
//! Secure execution (setuid, file capabilities: `AT_SECURE`) makes `ld.so` ignore most of
//! these; the enforcer does not rely on that and withholds the identity all the same.

/// Bytes of each environment string the kernel reads (the terminating NUL included): every
/// name below plus its `=` fits.
pub const ENV_PREFIX: usize = 32;
/// Environment strings the kernel examines at exec. An exec with more is withheld (fail
/// closed): the kernel could not see them all.
pub const MAX_ENV_VARS: u32 = 128;

/// One entry of [`LOADER_ENV`]: a variable name, or a name prefix (`prefix == true`: any
/// variable whose name starts with `name`, e.g. `LUA_PATH_5_4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderVar {
    pub name: &'static str,
    pub prefix: bool,
}

const fn v(name: &'static str) -> LoaderVar {
    LoaderVar {
        name,
        prefix: false,
    }
}

const fn p(name: &'static str) -> LoaderVar {
    LoaderVar { name, prefix: true }
}

/// Every variable that withholds the identity; see the module documentation for why each.
pub const LOADER_ENV: [LoaderVar; 46] = [
    v("LD_PRELOAD"),
    v("LD_AUDIT"),
    v("LD_LIBRARY_PATH"),
    v("LD_ORIGIN_PATH"),
    v("GCONV_PATH"),
    v("NODE_OPTIONS"),
    v("NODE_PATH"),
    v("JAVA_TOOL_OPTIONS"),
    v("_JAVA_OPTIONS"),
    v("JDK_JAVA_OPTIONS"),
    v("CLASSPATH"),
    v("PYTHONPATH"),
    v("PYTHONSTARTUP"),
    v("PYTHONHOME"),
    v("PYTHONUSERBASE"),
    v("PYTHONBREAKPOINT"),
    v("PYTHONPYCACHEPREFIX"),
    v("PERL5OPT"),
    v("PERL5LIB"),
    v("PERLLIB"),
    v("PERL5DB"),
    v("RUBYOPT"),
    v("RUBYLIB"),
    v("BASH_ENV"),
    v("ENV"),
    p("BASH_FUNC_"),
    v("SHELLOPTS"),
    p("LUA_INIT"),
    p("LUA_PATH"),
    p("LUA_CPATH"),
    v("TCLLIBPATH"),
    v("PHPRC"),
    v("PHP_INI_SCAN_DIR"),
    v("DOTNET_STARTUP_HOOKS"),
    v("DOTNET_ADDITIONAL_DEPS"),
    p("CORECLR_PROFILER_PATH"),
    v("OPENSSL_CONF"),
    v("OPENSSL_ENGINES"),
    v("OPENSSL_MODULES"),
    v("GIO_MODULE_DIR"),
    v("GIO_EXTRA_MODULES"),
    v("GTK_MODULES"),
    v("GTK3_MODULES"),
    v("GST_PLUGIN_PATH"),
    v("GST_PLUGIN_SYSTEM_PATH"),
    v("QT_PLUGIN_PATH"),
];

/// Index in [`LOADER_ENV`] of the entries the `preload:` selector can grant (the agent hashes
/// the files they name): `LD_PRELOAD`.
pub const LOADER_PRELOAD: u32 = 0;

const WORDS: usize = ENV_PREFIX / 8;

/// (value, mask) words of one entry: the name's bytes, then `=` unless it is a prefix.
#[derive(Clone, Copy)]
struct Pattern {
    val: [u64; WORDS],
    mask: [u64; WORDS],
}

const fn pattern(e: LoaderVar) -> Pattern {
    let name = e.name.as_bytes();
    let mut bytes = [0u8; ENV_PREFIX];
    let mut care = [0u8; ENV_PREFIX];
    let mut i = 0;
    while i < name.len() {
        bytes[i] = name[i];
        care[i] = 0xff;
        i += 1;
    }
    if !e.prefix {
        bytes[i] = b'=';
        care[i] = 0xff;
        i += 1;
    }
    assert!(i < ENV_PREFIX, "a LOADER_ENV name does not fit ENV_PREFIX");
    let mut val = [0u64; WORDS];
    let mut mask = [0u64; WORDS];
    let mut w = 0;
    while w < WORDS {
        let mut b = 0;
        while b < 8 {
            val[w] |= (bytes[w * 8 + b] as u64) << (8 * b);
            mask[w] |= (care[w * 8 + b] as u64) << (8 * b);
            b += 1;
        }
        w += 1;
    }
    Pattern { val, mask }
}

const PATTERNS: [Pattern; LOADER_ENV.len()] = {
    let mut out = [Pattern {
        val: [0; WORDS],
        mask: [0; WORDS],
    }; LOADER_ENV.len()];
    let mut i = 0;
    while i < LOADER_ENV.len() {
        out[i] = pattern(LOADER_ENV[i]);
        i += 1;
    }
    out
};

/// The first [`ENV_PREFIX`] bytes of an environment string as little-endian words (the
/// kernel reads them straight into this, 8-byte aligned).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnvPrefix(pub [u64; WORDS]);

impl EnvPrefix {
    /// From bytes (user space; bytes past `s` are zero).
    pub fn from_bytes(s: &[u8]) -> Self {
        let mut out = [0u64; WORDS];
        let mut i = 0;
        while i < s.len() && i < ENV_PREFIX {
            out[i / 8] |= (s[i] as u64) << (8 * (i % 8));
            i += 1;
        }
        Self(out)
    }
}

#[inline(always)]
fn matches(w: &[u64; WORDS], p: &Pattern) -> bool {
    // Straight-line: no loop for the verifier, words with an empty mask fold away.
    (w[0] & p.mask[0]) == p.val[0]
        && (p.mask[1] == 0 || (w[1] & p.mask[1]) == p.val[1])
        && (p.mask[2] == 0 || (w[2] & p.mask[2]) == p.val[2])
        && (p.mask[3] == 0 || (w[3] & p.mask[3]) == p.val[3])
}

/// 1 + the index in [`LOADER_ENV`] of the entry that the environment string starting with
/// `s` matches, or 0 when it matches none. Bytes after the string's NUL may hold anything:
/// every pattern mismatches at the NUL (names hold no NUL).
///
/// Unrolled by hand with constant indices, so every mask and value is an immediate and the
/// kernel build is one compare-and-branch per entry for most strings: a loop over the table
/// (read from `.rodata`) gives the verifier several branches per entry and per environment
/// string, more than its limit of pending branches (8192) over 128 strings.
#[inline(always)]
pub fn loader_var(s: &EnvPrefix) -> u32 {
    let w = &s.0;
    macro_rules! try_all {
        ($($i:literal)+) => {
            $(
                if matches(w, &PATTERNS[$i]) {
                    return $i + 1;
                }
            )+
        };
    }
    try_all!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29
        30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45);
    0
}
const _: () = assert!(LOADER_ENV.len() == 46, "extend try_all! in loader_var");

/// The name of the entry [`loader_var`] returned (`1 + index`), for messages.
pub fn loader_var_name(found: u32) -> Option<&'static str> {
    let i = found.checked_sub(1)? as usize;
    if i < LOADER_ENV.len() {
        Some(LOADER_ENV[i].name)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, string::String};

    use super::*;

    /// The plain definition the word matcher must agree with.
    fn reference(s: &str) -> u32 {
        let name = s.split('=').next().unwrap_or("");
        for (i, e) in LOADER_ENV.iter().enumerate() {
            let hit = if e.prefix {
                s.starts_with(e.name)
            } else {
                s.contains('=') && name == e.name
            };
            if hit {
                return i as u32 + 1;
            }
        }
        0
    }

    fn check(s: &str) -> u32 {
        let got = loader_var(&EnvPrefix::from_bytes(s.as_bytes()));
        assert_eq!(got, reference(s), "{s}");
        got
    }

    #[test]
    fn every_entry_matches_with_a_value_and_nothing_else_does() {
        for (i, e) in LOADER_ENV.iter().enumerate() {
            let hit = i as u32 + 1;
            assert_eq!(check(&format!("{}=/tmp/x.so", e.name)), hit);
            assert_eq!(check(&format!("{}=", e.name)), hit);
            if e.prefix {
                assert_eq!(check(&format!("{}5_4=x", e.name)), hit);
            } else {
                // Longer or shorter names, and a name without '=' are not the variable.
                assert_eq!(check(&format!("{}X=1", e.name)), 0);
                assert_eq!(check(e.name), 0);
                assert_eq!(check(&e.name[..e.name.len() - 1]), 0);
                assert_eq!(check(&format!("X{}=1", e.name)), 0);
                // Lower case is another variable for ld.so and the runtimes.
                assert_eq!(check(&format!("{}=1", e.name.to_lowercase())), 0);
            }
        }
    }

    #[test]
    fn ordinary_environment_is_clean() {
        for s in [
            "PATH=/usr/bin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            "LD_BIND_NOW=1",
            "LD_DEBUG=all",
            "LD_PRELOADX=1",
            "NODE_ENV=production",
            "JAVA_HOME=/usr/lib/jvm",
            "PYTHONUNBUFFERED=1",
            "ENVIRONMENT=prod",
            "LS_COLORS=rs=0:di=01;34:ln=01;36:mh=00:pi=40;33:so=01;35:do=01;35",
            "",
            "=",
        ] {
            assert_eq!(check(s), 0, "{s}");
        }
    }

    #[test]
    fn long_strings_and_garbage_after_the_nul() {
        let long: String = "LD_PRELOAD="
            .chars()
            .chain("a".repeat(500).chars())
            .collect();
        assert_eq!(check(&long), 1);
        // What the kernel sees of a short string whose buffer held a longer one before.
        let mut b = [0u8; ENV_PREFIX];
        b[..ENV_PREFIX].copy_from_slice(&long.as_bytes()[..ENV_PREFIX]);
        b[2] = 0; // "LD\0PRELOAD=aaaa...": a variable named LD
        assert_eq!(loader_var(&EnvPrefix::from_bytes(&b)), 0);
        assert_eq!(loader_var_name(1), Some("LD_PRELOAD"));
        assert_eq!(loader_var_name(0), None);
        assert_eq!(loader_var_name(999), None);
    }
}
