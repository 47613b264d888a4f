//! Reading a guest's console log: libtest's test lines, the features a skipped test lacked,
//! the agent's start times, and the marked blocks (probe JSON, rejected program, dmesg).

use std::{collections::BTreeMap, time::Duration};

/// How one test ended in a guest.
#[derive(Clone, Copy, PartialEq)]
pub enum Outcome {
    Pass,
    Fail,
    Skipped,
}

/// What one guest ran and printed.
pub struct GuestResult {
    pub tests: BTreeMap<String, Outcome>,
    /// Tests libtest announced (`running N tests`).
    pub expected: Option<usize>,
    /// The test binary's exit code, when the guest reached the end.
    pub exit: Option<i32>,
    pub timed_out: bool,
    pub wall: Duration,
    /// Tests that returned early because the kernel lacks a feature: test -> feature.
    pub skipped_for: BTreeMap<String, String>,
    /// `enforcer-agent probe --json` run in the guest.
    pub probe: Option<serde_json::Value>,
    /// What `enforcer-agent load-program enf_reject --object ...` printed in the guest.
    pub reject: String,
    /// The guest's kernel log (only when its tests failed).
    pub dmesg: String,
    /// Verifier log blocks the agent printed (outside the `enf_reject` demonstration).
    pub verifier: Vec<String>,
    /// How long each agent start took, spawn to "agent ready", in ms (`vm-test: agent ready
    /// in N ms`, printed by the test harness past libtest's capture).
    pub ready_ms: Vec<u64>,
}

impl GuestResult {
    pub fn ok(&self) -> bool {
        self.exit == Some(0) && !self.timed_out && !self.tests.values().any(|o| *o == Outcome::Fail)
    }

    /// "median / max ms (N starts)" of the agent's start times, or "-".
    pub fn ready_summary(&self) -> String {
        let mut v = self.ready_ms.clone();
        v.sort_unstable();
        match (v.get(v.len() / 2), v.last()) {
            (Some(med), Some(max)) => format!("{med} / {max} ms ({} starts)", v.len()),
            _ => "-".into(),
        }
    }

    pub fn summary(&self) -> String {
        let n = |o| self.tests.values().filter(|x| **x == o).count();
        let mut s = format!(
            "{} passed, {} failed, {} skipped",
            n(Outcome::Pass),
            n(Outcome::Fail),
            n(Outcome::Skipped)
        );
        if let Some(e) = self.expected
            && e > self.tests.len()
        {
            s.push_str(&format!(", {} not reached", e - self.tests.len()));
        }
        if self.timed_out {
            s.push_str(", TIMED OUT");
        } else {
            match self.exit {
                Some(c) => s.push_str(&format!(", test binary exit {c}")),
                None => s.push_str(", guest stopped before the tests ended"),
            }
        }
        s
    }
}

/// Reads a console log (`timed_out` and `wall` are left to the caller).
pub fn parse_log(text: &str) -> GuestResult {
    let mut tests = BTreeMap::new();
    let mut expected = None;
    let mut exit = None;
    let mut pending: Option<String> = None;
    let mut skipped_for = BTreeMap::new();
    let mut block: Option<(&str, Vec<String>)> = None;
    let mut probe_text = String::new();
    let mut reject = String::new();
    let mut dmesg = String::new();
    let mut verifier: Vec<String> = Vec::new();
    let mut in_verifier: Option<Vec<String>> = None;
    let mut ready_ms = Vec::new();
    let outcome = |s: &str| -> Option<Outcome> {
        let s = s.trim();
        if s.starts_with("ok") {
            Some(Outcome::Pass)
        } else if s.starts_with("FAILED") {
            Some(Outcome::Fail)
        } else if s.starts_with("ignored") {
            Some(Outcome::Skipped)
        } else {
            None
        }
    };
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        let line = line.find("=== VMTEST").map_or(line, |i| &line[i..]);
        // Marked blocks: the probe's JSON, the rejection demonstration, the kernel log.
        if let Some(rest) = line.strip_prefix("=== VMTEST ") {
            match rest.trim().split_once(' ') {
                Some((what, "BEGIN")) if what != "EXIT" => {
                    block = Some(match what {
                        "PROBE" => ("probe", Vec::new()),
                        "REJECT" => ("reject", Vec::new()),
                        _ => ("dmesg", Vec::new()),
                    });
                    continue;
                }
                Some((_, "END")) => {
                    if let Some((what, lines)) = block.take() {
                        let text = lines.join("\n");
                        match what {
                            "probe" => probe_text = text,
                            "reject" => reject = text,
                            _ => dmesg = text,
                        }
                    }
                    continue;
                }
                _ => {}
            }
        }
        if let Some((what, lines)) = &mut block {
            if *what != "probe" || !line.starts_with('[') || line.trim() == "[" {
                lines.push(line.to_string());
            }
            continue;
        }
        // A verifier log the agent printed (a rejected program), kept whole.
        if line.contains("--- verifier log of ") {
            in_verifier = Some(Vec::new());
        }
        if let Some(v) = &mut in_verifier {
            v.push(line.to_string());
            if line.contains("--- end of verifier log ---") {
                verifier.push(v.join("\n"));
                in_verifier = None;
            }
        }
        if let Some(i) = line.find("vm-test: agent ready in ") {
            let rest = &line[i + "vm-test: agent ready in ".len()..];
            if let Some(ms) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                ready_ms.push(ms);
            }
        }
        if let Some(i) = line.find("vm-test: skipped: kernel lacks ") {
            let rest = &line[i + "vm-test: skipped: kernel lacks ".len()..];
            let feature = rest.split_whitespace().next().unwrap_or("?").to_string();
            let test = rest
                .split_once("(test ")
                .and_then(|(_, t)| t.split_once(')'))
                .map(|(t, _)| t.to_string())
                .or_else(|| pending.clone());
            if let Some(t) = test {
                skipped_for.insert(t, feature);
            }
        }
        if let Some(rest) = line.strip_prefix("=== VMTEST EXIT ") {
            exit = rest.trim().parse().ok();
            continue;
        }
        if let Some(rest) = line.strip_prefix("running ")
            && let Some(n) = rest.strip_suffix(" tests").or(rest.strip_suffix(" test"))
        {
            // One `running N tests` line per suite: the guest runs them all.
            if let Ok(n) = n.trim().parse::<usize>() {
                expected = Some(expected.unwrap_or(0) + n);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, after)) = rest.split_once(" ... ")
            && !name.contains(' ')
        {
            match outcome(after) {
                Some(o) => {
                    tests.insert(name.to_string(), o);
                    pending = None;
                }
                None => pending = Some(name.to_string()),
            }
            continue;
        }
        if let Some(p) = &pending {
            // Output of a child process (or the kernel) landed between the name and the verdict.
            for word in ["ok", "FAILED", "ignored"] {
                if line.trim_end().ends_with(word) || line.trim() == word {
                    if let Some(o) = outcome(word) {
                        tests.insert(p.clone(), o);
                    }
                    pending = None;
                    break;
                }
            }
        }
    }
    if let Some(v) = in_verifier {
        verifier.push(v.join("\n"));
    }
    for t in skipped_for.keys() {
        if let Some(o) = tests.get_mut(t)
            && *o == Outcome::Pass
        {
            *o = Outcome::Skipped;
        }
    }
    GuestResult {
        tests,
        expected,
        exit,
        timed_out: false,
        wall: Duration::ZERO,
        skipped_for,
        probe: serde_json::from_str(probe_text.trim()).ok(),
        reject,
        dmesg,
        verifier,
        ready_ms,
    }
}

/// A console log with every kind of line `parse_log` reads (for this module's and
/// `report.rs`'s tests).
#[cfg(test)]
pub const SAMPLE_LOG: &str = "\
=== VMTEST BEGIN 5.10.0-46-amd64 cpus=2\r
running 3 tests\r
test a_test ... vm-test: agent ready in 900 ms\r
vm-test: agent ready in 1200 ms\r
vm-test: agent ready in 700 ms\r
ok\r
test needs_btf ... vm-test: skipped: kernel lacks btf (test needs_btf): \"no BTF\"\r
ok\r
test broken ... [   12.3] some kernel line\r
enforcer-agent: error: the kernel (release 5.10) refused to load program enf_x (raw_tracepoint): Permission denied\r
--- verifier log of enf_x: 2 of 2 lines ---\r
0: (b7) r0 = 0\r
invalid bpf_context access off=4000 size=4\r
--- end of verifier log ---\r
FAILED\r
=== VMTEST EXIT 101\r
=== VMTEST PROBE BEGIN\r
{\"release\": \"5.10.0-46-amd64\", \"supported\": true,\r
 \"features\": [{\"name\": \"btf\", \"required\": false, \"found\": false, \"without\": \"held\"}]}\r
=== VMTEST PROBE END\r
=== VMTEST REJECT BEGIN\r
rejected text\r
=== VMTEST REJECT END\r
=== VMTEST DMESG BEGIN\r
[    0.0] Linux version 5.10\r
=== VMTEST DMESG END\r
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_log_reads_tests_skips_ready_times_and_blocks() {
        let r = parse_log(SAMPLE_LOG);
        assert_eq!(r.expected, Some(3));
        assert_eq!(r.exit, Some(101));
        assert!(r.tests["a_test"] == Outcome::Pass);
        assert!(r.tests["needs_btf"] == Outcome::Skipped);
        assert!(r.tests["broken"] == Outcome::Fail);
        assert!(!r.ok());
        assert_eq!(r.skipped_for["needs_btf"], "btf");
        assert_eq!(r.ready_ms, [900, 1200, 700]);
        assert_eq!(r.ready_summary(), "900 / 1200 ms (3 starts)");
        let probe = r.probe.as_ref().expect("probe JSON parsed");
        assert_eq!(probe["release"], "5.10.0-46-amd64");
        assert_eq!(r.reject, "rejected text");
        assert!(r.dmesg.contains("Linux version"), "{}", r.dmesg);
        assert_eq!(r.verifier.len(), 1);
        assert!(r.verifier[0].contains("invalid bpf_context access"));
    }
}
