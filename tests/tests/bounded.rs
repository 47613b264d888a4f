//! Bounded state, on the real kernel: churn far past the capacity of the kernel's cgroup and
//! executable maps, with enforcement checked along the way.
//!
//! Heavy (tens of thousands of cgroups, about 200,000 executables): they run on the host in
//! `cargo xtask test`, not in the QEMU/TCG guests of `cargo xtask vm-test` (whose suites are
//! `kernel` and `operator` only), where they would take hours.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use enforcer_common::{ExeKey, MAX_CGROUPS, MAX_EXES};
use enforcer_tests::*;

const PROBE_BIN: &str = env!("CARGO_BIN_EXE_enf-probe");
const OK: i32 = 0;
const EPERM: i32 = 13;

/// Entries of a pinned hash map, read from the kernel.
fn map_len<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &str) -> usize {
    let data = aya::maps::MapData::from_pin(pin_dir.join(name))
        .unwrap_or_else(|e| panic!("opening pinned {name}: {e}"));
    let map: aya::maps::HashMap<_, K, V> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
            .unwrap_or_else(|e| panic!("{name} is not a hash map: {e}"));
    map.keys().count()
}

/// In any log line of the agent about a failed write to (or removal from) `ENF_CGROUPS`.
const MAP_FULL_CGROUPS: &str = "ENF_CGROUPS";

fn yaml(scope: &str, app_sha: &str, cgroup: Option<&str>, l: &Listeners) -> String {
    let cg = cgroup.map_or(String::new(), |c| format!("\n        cgroup: [\"{c}\"]"));
    format!(
        "apiVersion: enforcer/v1\nkind: Policy\ntrustDomain: t.org\nmode: enforce\nunattested: deny\nscope: [\"{scope}\"]\nidentities:\n  - name: app\n    match:\n      - binarySha256: [{app_sha}]{cg}\nrules:\n  - identity: app\n    egress:\n      - to: {{cidr: 127.0.0.1/32, ports: [{}], protocol: tcp}}\n",
        l.tcp4.port()
    )
}

/// Create and remove 3 x MAX_CGROUPS cgroups (and some), a process exec'ing in each, inside
/// an enforced scope whose policy selects by cgroup (so every new cgroup makes the exec
/// pending: held until the agent gives the kernel its class). `ENF_CGROUPS` stays bounded and
/// enforcement stays right: spot checks in fresh cgroups after every batch.
#[test]
fn cgroup_churn_keeps_the_cgroup_map_bounded() {
    if !require_root("cgroup_churn_keeps_the_cgroup_map_bounded") {
        return;
    }
    let parent = TestCgroup::new("cgchurn");
    let l = Listeners::new();
    let dir = TempDir::new("cgchurn");
    let (app, _) = probe_pair(Path::new(PROBE_BIN), &dir);
    let selector = format!("{}/a-*", parent.rel);
    let agent = Agent::start(&yaml(&parent.rel, &sha256_file(&app), Some(&selector), &l));
    let total = 3 * MAX_CGROUPS as usize + 1024;
    let batch = 4096;
    let workers = 4;
    let t0 = Instant::now();
    let done = AtomicUsize::new(0);
    let mut max_fill = 0;
    let mut checks = 0;
    for (b, start) in (0..total).step_by(batch).enumerate() {
        let end = (start + batch).min(total);
        std::thread::scope(|s| {
            for w in 0..workers {
                let (parent, done) = (&parent, &done);
                s.spawn(move || {
                    for i in (start + w..end).step_by(workers) {
                        let cg = parent.child(&format!("c-{i}"));
                        let code = run_in(&cg, Path::new("/bin/true"), &[]);
                        assert_eq!(code, 0, "/bin/true in {}", cg.rel);
                        drop(cg);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        // Spot checks in cgroups the kernel has never seen: the selector's cgroups give `app`
        // its identity, others leave it unattested (denied).
        let a = parent.child(&format!("a-spot-{b}"));
        assert_eq!(
            run_in(&a, &app, &["tcp", &l.tcp4.to_string()]),
            OK,
            "{}",
            agent.log()
        );
        assert_eq!(run_in(&a, &app, &["tcp", &l.extra4.to_string()]), EPERM);
        let other = parent.child(&format!("b-spot-{b}"));
        assert_eq!(run_in(&other, &app, &["tcp", &l.tcp4.to_string()]), EPERM);
        drop((a, other));
        checks += 3;
        let fill = map_len::<u64, enforcer_common::CgroupValue>(
            &agent.pin_dir,
            enforcer_common::MAP_CGROUPS,
        );
        max_fill = max_fill.max(fill);
        eprintln!(
            "{} cgroups created and removed, ENF_CGROUPS holds {fill}, {:.1} s",
            done.load(Ordering::Relaxed),
            t0.elapsed().as_secs_f64()
        );
        assert!(
            fill <= MAX_CGROUPS as usize * 3 / 4,
            "ENF_CGROUPS holds {fill} entries after {} cgroups came and went (capacity {MAX_CGROUPS})",
            done.load(Ordering::Relaxed)
        );
    }
    assert_eq!(done.load(Ordering::Relaxed), total);
    // Other processes of the machine may come and go before the agent reads them; what
    // must never happen is a full cgroup map.
    assert_eq!(agent.count_log(MAP_FULL_CGROUPS), 0, "{}", agent.log());
    eprintln!(
        "cgroup churn: {total} cgroups, {checks} spot checks, max ENF_CGROUPS fill {max_fill}, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// The smallest static x86-64 executable that exits 0, with `tag` after its code: a distinct
/// file (content, so sha256) for each tag, 140 bytes.
fn tiny_exe(tag: u64) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const CODE: [u8; 12] = [
        0x31, 0xff, // xor edi, edi
        0xb8, 0x3c, 0x00, 0x00, 0x00, // mov eax, 60 (exit)
        0x0f, 0x05, // syscall
        0x90, 0x90, 0x90, // nop padding
    ];
    let len = 64 + 56 + CODE.len() as u64 + 8;
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    b.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&(BASE + 120).to_le_bytes()); // entry
    b.extend_from_slice(&64u64.to_le_bytes()); // phoff
    b.extend_from_slice(&0u64.to_le_bytes()); // shoff
    b.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 0, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, sh*
    }
    b.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    b.extend_from_slice(&5u32.to_le_bytes()); // R X
    for v in [0, BASE, BASE, len, len, 0x1000] {
        b.extend_from_slice(&v.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    b.extend_from_slice(&CODE);
    b.extend_from_slice(&tag.to_le_bytes());
    b
}

/// Writes `n` distinct tiny executables (tags from `first`) into a new folder `dir`.
fn write_exes(dir: &Path, first: u64, n: u64) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    for t in first..first + n {
        let p = dir.join(format!("x{t}"));
        fs::write(&p, tiny_exe(t)).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

/// Executes every file of the folders, in parallel (one shell loop each, inside `cg`).
fn exec_all(cg: &TestCgroup, dirs: &[PathBuf]) {
    let children: Vec<_> = dirs
        .iter()
        .map(|d| {
            let script = format!("for f in {}/*; do \"$f\" || exit 1; done", d.display());
            (d, spawn_in(cg, Path::new("/bin/sh"), &["-c", &script]))
        })
        .collect();
    let t0 = Instant::now();
    for (d, mut c) in children {
        let status = loop {
            if let Some(st) = c.try_wait().expect("waiting for the exec loop") {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(300) {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "the exec loop over {} hung (a held process never released?)",
                    d.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            status.success(),
            "exec loop over {} failed: {status}",
            d.display()
        );
    }
}

/// Execute 3 x MAX_EXES distinct, freshly written files in an enforced scope: each is
/// held at exec and attested. Half run at once (too young to be cached by inode), half after
/// they settled (cached in `ENF_EXES`). Exe ids are reused, `ENF_EXES` never fills, and the
/// last files still get identities and verdicts.
#[test]
fn exe_churn_keeps_exe_ids_and_the_exe_map_bounded() {
    if !require_root("exe_churn_keeps_exe_ids_and_the_exe_map_bounded") {
        return;
    }
    if !cfg!(target_arch = "x86_64") {
        panic!("the exe churn test writes x86-64 executables; port tiny_exe to this architecture");
    }
    let cg = TestCgroup::new("exechurn");
    let l = Listeners::new();
    let dir = TempDir::new("exechurn");
    let (app, other) = probe_pair(Path::new(PROBE_BIN), &dir);
    let app_sha = sha256_file(&app);
    let agent = Agent::start(&yaml(&cg.rel, &app_sha, None, &l));
    let total = 3 * MAX_EXES as u64 + 4096;
    let chunk = 4096u64;
    let t0 = Instant::now();
    let mut next = 0u64;
    let mut round = 0;
    let (mut max_exes, mut max_ids) = (0, 0);
    while next < total {
        // Fresh: written and executed at once. Settled: written now, executed once older
        // than the agent's racy-timestamp window (2 s), so their inode keys are cached.
        let fresh: Vec<PathBuf> = (0..2)
            .map(|i| dir.0.join(format!("f{round}-{i}")))
            .collect();
        let settled: Vec<PathBuf> = (0..2)
            .map(|i| dir.0.join(format!("s{round}-{i}")))
            .collect();
        let written = Instant::now();
        for d in &settled {
            write_exes(d, next, chunk / 2);
            next += chunk / 2;
        }
        for d in &fresh {
            write_exes(d, next, chunk / 2);
            next += chunk / 2;
        }
        exec_all(&cg, &fresh);
        let age = written.elapsed();
        if age < Duration::from_millis(2300) {
            std::thread::sleep(Duration::from_millis(2300) - age);
        }
        exec_all(&cg, &settled);
        for d in fresh.iter().chain(&settled) {
            fs::remove_dir_all(d).unwrap_or_else(|e| panic!("removing {}: {e}", d.display()));
        }
        round += 1;
        // Never-seen files still get their identity and verdict: a fresh copy of `app` (same
        // content, new file) is allowed, a fresh copy of `other` is denied.
        let app_n = dir.path(&format!("app-{round}"));
        let other_n = dir.path(&format!("other-{round}"));
        fs::copy(&app, &app_n).expect("copy app");
        fs::copy(&other, &other_n).expect("copy other");
        assert_eq!(
            run_in(&cg, &app_n, &["tcp", &l.tcp4.to_string()]),
            OK,
            "{}",
            agent.log()
        );
        assert_eq!(run_in(&cg, &app_n, &["tcp", &l.extra4.to_string()]), EPERM);
        assert_eq!(run_in(&cg, &other_n, &["tcp", &l.tcp4.to_string()]), EPERM);
        let in_kernel = map_len::<ExeKey, u32>(&agent.pin_dir, enforcer_common::MAP_EXES);
        let ids = agent.status_counter("exe_ids_in_use");
        max_exes = max_exes.max(in_kernel);
        max_ids = max_ids.max(ids);
        eprintln!(
            "{next} executables run; ENF_EXES holds {in_kernel}, {ids} exe ids in use, {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        assert!(in_kernel < MAX_EXES as usize, "ENF_EXES is full");
    }
    // The agent sees every exec of the machine (others come and go before it reads them);
    // what must never happen is running out of exe ids (today's message, and the old one).
    for needle in ["executable ids are in use", "executable slots are used"] {
        assert_eq!(agent.count_log(needle), 0, "{}", agent.log());
    }
    let log_lines = fs::read_to_string(agent.state_dir.path("exes.log"))
        .expect("exes.log")
        .lines()
        .count();
    assert!(
        log_lines <= 2 * MAX_EXES as usize + 1025,
        "exes.log has {log_lines} lines: it is not compacted"
    );
    eprintln!(
        "exe churn: {next} distinct executables, max ENF_EXES {max_exes}, max exe ids {max_ids}, exes.log {log_lines} lines, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
