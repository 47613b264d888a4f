//! Environment variables that make the dynamic loader or a language runtime load code
//! (SECURITY.md guarantee 3). An exec whose environment holds one of them gets no identity
//! (`PROC_WITHHELD`): the code it names would otherwise run with the identity of the attested
//! executable.
//!
//! The kernel reads the first [`ENV_PREFIX`] bytes of each environment string of the new
//! process at exec and asks [`loader_var_in`] with `ENF_LOADENV`, the copy of [`ENV_TABLE`]
//! the agent writes before it attaches the programs; the agent asks [`loader_var`] (the same
//! matcher on [`ENV_TABLE`]) of `/proc/PID/environ`. The matcher is five probes of a perfect
//! hash table built at compile time (one slot, one 4-word compare each), whatever the
//! length of the list.
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

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;
const EQS: u64 = ONES * b'=' as u64;

/// `(bytes of w up to and including its first '=', all of w when it holds none; all ones
/// when w holds no '=', else 0)`. The classic "has a zero byte" test on `w ^ "========"`:
/// borrows only flag bytes ABOVE a true '=', so the lowest flagged byte is exactly the first
/// '='. No branch on the result: the kernel verifier then sees no constants to track.
#[inline(always)]
const fn upto_eq(w: u64) -> (u64, u64) {
    let x = w ^ EQS;
    let t = x.wrapping_sub(ONES) & !x & HIGHS;
    // The lowest flagged bit, 0 when none; then every byte up to it. f = 0 gives all ones;
    // f = bit 63 (the '=' is the last byte) gives f << 1 = 0, all ones too: both right.
    let f = t.isolate_lowest_one();
    let keep = (f << 1).wrapping_sub(1);
    (w & keep, ((t == 0) as u64).wrapping_neg())
}

/// The name of an environment string up to and including its first `=`, every byte after
/// it zeroed (the whole prefix when it holds no `=`): the key of an exact name.
///
/// Bytes after the string's NUL (the kernel's `bpf_probe_read_user_str` leaves the rest of
/// the buffer as it was) cannot make a false match: a NUL before the first `=` stays in the
/// key, and no name holds a NUL.
#[inline(always)]
pub const fn env_key(s: &EnvPrefix) -> [u64; WORDS] {
    let w = &s.0;
    let (k0, a0) = upto_eq(w[0]);
    let (k1, a1) = upto_eq(w[1]);
    let (k2, a2) = upto_eq(w[2]);
    let (k3, _) = upto_eq(w[3]);
    // A word is kept only while no earlier word held the '='.
    let a1 = a0 & a1;
    let a2 = a1 & a2;
    [k0, k1 & a0, k2 & a1, k3 & a2]
}

/// The words of one entry: the name's bytes, then `=` unless it is a prefix, zero-padded.
#[derive(Clone, Copy)]
struct Pattern {
    val: [u64; WORDS],
}

const fn pattern(e: LoaderVar) -> Pattern {
    let name = e.name.as_bytes();
    let mut bytes = [0u8; ENV_PREFIX];
    let mut i = 0;
    while i < name.len() {
        assert!(
            name[i] != b'=' && name[i] != 0,
            "a LOADER_ENV name holds '=' or NUL"
        );
        bytes[i] = name[i];
        i += 1;
    }
    if !e.prefix {
        bytes[i] = b'=';
        i += 1;
    }
    assert!(i < ENV_PREFIX, "a LOADER_ENV name does not fit ENV_PREFIX");
    let mut val = [0u64; WORDS];
    let mut w = 0;
    while w < WORDS {
        let mut b = 0;
        while b < 8 {
            val[w] |= (bytes[w * 8 + b] as u64) << (8 * b);
            b += 1;
        }
        w += 1;
    }
    Pattern { val }
}

/// Bits of the table's slot number.
const SLOT_BITS: u32 = 8;
/// Slots of [`ENV_TABLE`].
pub const ENV_SLOTS: usize = 1 << SLOT_BITS;

#[inline(always)]
const fn slot_of(k: &[u64; WORDS], m: u64) -> usize {
    let h = k[0] ^ k[1].rotate_left(17) ^ k[2].rotate_left(31) ^ k[3];
    (h.wrapping_mul(m) >> (64 - SLOT_BITS)) as usize & (ENV_SLOTS - 1)
}

/// Whether `m` sends every entry of [`LOADER_ENV`] to its own slot.
const fn perfect(m: u64) -> bool {
    let mut used = [false; ENV_SLOTS];
    let mut i = 0;
    while i < LOADER_ENV.len() {
        let s = slot_of(&pattern(LOADER_ENV[i]).val, m);
        if used[s] {
            return false;
        }
        used[s] = true;
        i += 1;
    }
    true
}

/// The multiplier of the perfect hash: the first odd number from a fixed start (a 64-bit
/// golden-ratio constant) that gives every entry its own slot, found at compile time;
/// changing [`LOADER_ENV`] re-runs the search.
const HASH_MUL: u64 = {
    let mut m: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut tries = 0;
    while !perfect(m) {
        m = m.wrapping_add(2);
        tries += 1;
        assert!(
            tries < 100_000,
            "no perfect hash for LOADER_ENV: raise SLOT_BITS"
        );
    }
    m
};

/// One slot of [`ENV_TABLE`]: an entry's bytes (`NAME=` for a name, `NAME` for a prefix) as
/// zero-padded words, and `1 + index` in [`LOADER_ENV`] (0: an empty slot, all zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnvSlot {
    pub key: [u64; WORDS],
    pub found: u64,
}

/// Every entry of [`LOADER_ENV`] at the slot its bytes hash to (no two share one). A
/// `static`: the kernel build indexes it in `.rodata` with the slot it computes.
pub static ENV_TABLE: [EnvSlot; ENV_SLOTS] = {
    let mut t = [EnvSlot {
        key: [0; WORDS],
        found: 0,
    }; ENV_SLOTS];
    let mut i = 0;
    while i < LOADER_ENV.len() {
        let key = pattern(LOADER_ENV[i]).val;
        t[slot_of(&key, HASH_MUL)] = EnvSlot {
            key,
            found: i as u64 + 1,
        };
        i += 1;
    }
    t
};

/// The lengths of the prefix entries of [`LOADER_ENV`] (`LUA_INIT`, `LUA_PATH`: 8,
/// `LUA_CPATH`: 9, `BASH_FUNC_`: 10, `CORECLR_PROFILER_PATH`: 21); checked at compile time.
const PREFIX_LENS: [usize; 4] = [8, 9, 10, 21];
const _: () = {
    let mut i = 0;
    while i < LOADER_ENV.len() {
        if LOADER_ENV[i].prefix {
            let n = LOADER_ENV[i].name.len();
            let mut j = 0;
            while j < PREFIX_LENS.len() && PREFIX_LENS[j] != n {
                j += 1;
            }
            assert!(
                j < PREFIX_LENS.len(),
                "PREFIX_LENS misses a prefix entry's length"
            );
        }
        i += 1;
    }
};

/// Word masks keeping the first `n` bytes.
const fn first_bytes(n: usize) -> [u64; WORDS] {
    let mut m = [0u64; WORDS];
    let mut i = 0;
    while i < n {
        m[i / 8] |= 0xff << (8 * (i % 8));
        i += 1;
    }
    m
}

/// `found` of the slot `k` hashes to when that slot holds `k`, else 0.
#[inline(always)]
fn probe<'a>(k: &[u64; WORDS], table: &impl Fn(u32) -> Option<&'a EnvSlot>) -> u32 {
    match table((slot_of(k, HASH_MUL) & (ENV_SLOTS - 1)) as u32) {
        Some(e) if e.key[0] == k[0] && e.key[1] == k[1] && e.key[2] == k[2] && e.key[3] == k[3] => {
            e.found as u32
        }
        _ => 0,
    }
}

/// 1 + the index in [`LOADER_ENV`] of the entry that the environment string starting with
/// `s` matches, or 0 when it matches none. Bytes after the string's NUL may hold anything.
///
/// Five probes of the perfect-hash [`ENV_TABLE`], each one slot and one 4-word compare:
/// [`env_key`] (the name with its `=`: finds the exact names), then the first 8, 9, 10 and
/// 21 bytes (finds the prefixes). Any hit is right: a key equal to an entry `E` (no NUL in
/// it, zero-padded) means the string starts with `E`, or is `E`, and for a name `E` ends
/// with `=`. The kernel build is straight-line arithmetic and a few compares of unknown
/// values per string, whatever the length of the list (46 unrolled compares cost half a
/// million verified instructions over 128 strings).
#[inline(always)]
pub fn loader_var(s: &EnvPrefix) -> u32 {
    loader_var_in(s, &|i| ENV_TABLE.get(i as usize))
}

/// [`loader_var`] with [`ENV_TABLE`] read through `table` (slot number -> slot). The
/// kernel passes its copy, the `ENF_LOADENV` array the agent fills with [`ENV_TABLE`]
/// before it attaches the programs: an index into `.rodata` computed from the string makes
/// the verifier track the hash's inputs precisely, and its cost explode.
#[inline(always)]
pub fn loader_var_in<'a>(s: &EnvPrefix, table: &impl Fn(u32) -> Option<&'a EnvSlot>) -> u32 {
    let w = &s.0;
    let found = probe(&env_key(s), table);
    if found != 0 {
        return found;
    }
    macro_rules! try_prefixes {
        ($($i:literal)+) => {
            $(
                let m = const { first_bytes(PREFIX_LENS[$i]) };
                let found = probe(&[w[0] & m[0], w[1] & m[1], w[2] & m[2], w[3] & m[3]], table);
                if found != 0 {
                    return found;
                }
            )+
        };
    }
    try_prefixes!(0 1 2 3);
    0
}

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

    #[test]
    fn env_key_keeps_the_name_and_the_first_equals_only() {
        let key = |s: &[u8]| env_key(&EnvPrefix::from_bytes(s));
        let words = |s: &[u8]| EnvPrefix::from_bytes(s).0;
        assert_eq!(key(b"LD_PRELOAD=/x.so"), words(b"LD_PRELOAD="));
        assert_eq!(key(b"A=B=C"), words(b"A="));
        assert_eq!(key(b"=x"), words(b"="));
        // '=' as the last byte of a word (bit 63 case) and as the first of the next word.
        assert_eq!(key(b"ABCDEFG=xyz"), words(b"ABCDEFG="));
        assert_eq!(key(b"ABCDEFGH=xyz"), words(b"ABCDEFGH="));
        assert_eq!(
            key(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ01234="),
            words(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ01234=")
        );
        // No '=' at all: the whole prefix.
        assert_eq!(key(b"NOEQUALS"), words(b"NOEQUALS"));
        // Every byte value next to '=' (borrows of the word trick), at every position.
        for pos in 0..ENV_PREFIX {
            for b in 0..=255u8 {
                let mut s = [b'A'; ENV_PREFIX];
                s[pos] = b'=';
                if pos > 0 {
                    s[pos - 1] = b;
                }
                if pos + 1 < ENV_PREFIX {
                    s[pos + 1] = b;
                }
                let first = s.iter().position(|c| *c == b'=').unwrap_or(ENV_PREFIX);
                assert_eq!(
                    key(&s),
                    words(&s[..=first.min(ENV_PREFIX - 1)]),
                    "{pos} {b}"
                );
            }
        }
    }

    #[test]
    fn stale_bytes_after_the_nul_never_match() {
        // The kernel buffer: a short string, its NUL, then what a longer one left behind.
        for (i, e) in LOADER_ENV.iter().enumerate() {
            let full = format!("{}=/tmp/x.so", e.name);
            for cut in 0..e.name.len() {
                let mut b = [0u8; ENV_PREFIX];
                let n = full.len().min(ENV_PREFIX);
                b[..n].copy_from_slice(&full.as_bytes()[..n]);
                b[cut] = 0;
                let got = loader_var(&EnvPrefix::from_bytes(&b));
                assert_eq!(got, 0, "{} cut at {cut}", LOADER_ENV[i].name);
            }
        }
    }

    #[test]
    fn every_entry_has_its_own_slot() {
        let mut seen = 0;
        for (i, e) in LOADER_ENV.iter().enumerate() {
            let key = match e.prefix {
                true => EnvPrefix::from_bytes(e.name.as_bytes()).0,
                false => env_key(&EnvPrefix::from_bytes(format!("{}=v", e.name).as_bytes())),
            };
            let slot = ENV_TABLE[slot_of(&key, HASH_MUL)];
            assert_eq!((slot.key, slot.found), (key, i as u64 + 1), "{}", e.name);
            seen += 1;
        }
        let used = ENV_TABLE.iter().filter(|s| s.found != 0).count();
        assert_eq!(used, seen);
    }
}
