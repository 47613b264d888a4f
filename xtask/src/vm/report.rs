//! Reporting the guests' results: the terminal table, what a failed guest leaves to read,
//! the Markdown kernel x feature and kernel x test tables, and README.md's generated section.

use std::{collections::BTreeSet, fs, path::Path};

use anyhow::{Context as _, Result, bail};

use super::log::{GuestResult, Outcome};

/// The kernel x test table on the terminal, and each guest's agent start times.
pub fn print_table(results: &[(String, GuestResult)]) {
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for (_, r) in results {
        names.extend(r.tests.keys().map(String::as_str));
    }
    let w0 = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4);
    let widths: Vec<usize> = results.iter().map(|(l, _)| l.len().max(7)).collect();
    println!();
    print!("{:w0$}", "test");
    for ((l, _), w) in results.iter().zip(&widths) {
        print!("  {l:w$}");
    }
    println!();
    print!("{}", "-".repeat(w0));
    for w in &widths {
        print!("  {}", "-".repeat(*w));
    }
    println!();
    for n in &names {
        print!("{n:w0$}");
        for ((_, r), w) in results.iter().zip(&widths) {
            let cell = test_cell(r, n);
            print!("  {cell:w$}");
        }
        println!();
    }
    print!("{:w0$}", "(guest)");
    for ((_, r), w) in results.iter().zip(&widths) {
        let cell = if r.ok() {
            "ok"
        } else if r.timed_out {
            "TIMEOUT"
        } else if r.exit.is_none() {
            "DIED"
        } else {
            "FAILED"
        };
        print!("  {cell:w$}");
    }
    println!();
    println!("\nagent start, spawn to ready (median / max):");
    for (l, r) in results {
        println!("  {l}: {}", r.ready_summary());
    }
}

/// The `failures:` section libtest prints (when present) and the last lines of the console.
pub fn log_tail(log: &Path) -> String {
    let text = fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    if let Some(i) = lines.iter().position(|l| *l == "failures:") {
        let end = (i + 200).min(lines.len());
        for l in &lines[i..end] {
            out.push_str(l);
            out.push('\n');
        }
        if end < lines.len() {
            out.push_str("[...]\n");
        }
    }
    let start = lines.len().saturating_sub(60);
    out.push_str("--- last console lines ---\n");
    for l in &lines[start..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// One cell of the kernel x test table.
fn test_cell(r: &GuestResult, test: &str) -> String {
    match r.tests.get(test) {
        Some(Outcome::Pass) => "pass".into(),
        Some(Outcome::Fail) => "FAIL".into(),
        Some(Outcome::Skipped) => match r.skipped_for.get(test) {
            Some(f) => format!("skipped ({f})"),
            None => "skipped".into(),
        },
        None => "-".into(),
    }
}

/// Kernel log lines printed for a failed guest.
const DMESG_TAIL: usize = 200;

/// What a failed guest leaves to read: verifier logs of rejected programs and the kernel log.
pub fn failure_details(label: &str, r: &GuestResult) -> String {
    let mut out = String::new();
    for v in &r.verifier {
        out.push_str(&format!(
            "\n--- {label}: a program was rejected by the verifier ---\n{v}\n"
        ));
    }
    if r.dmesg.trim().is_empty() {
        out.push_str(&format!(
            "\n--- {label}: no kernel log (the guest stopped before it could print one) ---\n"
        ));
    } else {
        // The end of the kernel log is where a failure shows; the boot is in the console log.
        let lines: Vec<&str> = r.dmesg.lines().collect();
        let start = lines.len().saturating_sub(DMESG_TAIL);
        out.push_str(&format!(
            "\n--- {label}: kernel log (dmesg, last {} of {} lines; all of it is in the console log) ---\n{}\n--- end of kernel log ---\n",
            lines.len() - start,
            lines.len(),
            lines[start..].join("\n")
        ));
    }
    out
}

/// The kernel x feature table (from each guest's `enforcer-agent probe --json`), the kernel x
/// test table, and what a rejected program prints on the oldest kernel, as Markdown.
pub fn matrix_markdown(names: &[&str], results: &[(String, GuestResult)]) -> String {
    let col = |i: usize, r: &GuestResult| -> String {
        let release = r
            .probe
            .as_ref()
            .and_then(|p| p["release"].as_str())
            .unwrap_or("?");
        format!("{} (`{release}`)", names.get(i).copied().unwrap_or("?"))
    };
    let header = |first: &str| -> String {
        let mut h = format!("| {first} |");
        let mut sep = String::from("| --- |");
        for (i, (_, r)) in results.iter().enumerate() {
            h.push_str(&format!(" {} |", col(i, r)));
            sep.push_str(" --- |");
        }
        format!("{h}\n{sep}\n")
    };
    let mut md = String::new();
    md.push_str("Kernel x feature, as `enforcer-agent probe` finds it in each guest (required: the agent refuses to start without it; optional: it starts and says what it loses):\n\n");
    md.push_str(&header("feature"));
    // Rows in the probe's order, from the first guest that printed one.
    let mut rows: Vec<(String, bool, String)> = Vec::new();
    for (_, r) in results {
        if let Some(fs) = r.probe.as_ref().and_then(|p| p["features"].as_array()) {
            for f in fs {
                let name = f["name"].as_str().unwrap_or("?").to_string();
                if !rows.iter().any(|(n, _, _)| *n == name) {
                    rows.push((
                        name,
                        f["required"] == true,
                        f["without"].as_str().unwrap_or("").to_string(),
                    ));
                }
            }
        }
    }
    for (name, required, _) in &rows {
        let need = if *required { "required" } else { "optional" };
        md.push_str(&format!("| `{name}` ({need}) |"));
        for (_, r) in results {
            let f = r.probe.as_ref().and_then(|p| {
                p["features"]
                    .as_array()?
                    .iter()
                    .find(|f| f["name"] == name.as_str())
                    .cloned()
            });
            let cell = match f {
                Some(f) if f["found"] == true => "yes",
                Some(_) => "**missing**",
                None => "-",
            };
            md.push_str(&format!(" {cell} |"));
        }
        md.push('\n');
    }
    md.push_str("| agent starts |");
    for (_, r) in results {
        let cell = match r.probe.as_ref().map(|p| p["supported"] == true) {
            Some(true) => "yes",
            Some(false) => "**refuses**",
            None => "-",
        };
        md.push_str(&format!(" {cell} |"));
    }
    md.push_str("\n\nWithout an optional feature:\n\n");
    for (name, required, without) in &rows {
        if !required {
            md.push_str(&format!("- `{name}`: {without}.\n"));
        }
    }
    md.push_str("\nKernel x test (`tests/tests/kernel.rs` and `tests/tests/operator.rs`, run inside each guest):\n\n");
    md.push_str(&header("test"));
    let mut tests: BTreeSet<&str> = BTreeSet::new();
    for (_, r) in results {
        tests.extend(r.tests.keys().map(String::as_str));
    }
    for t in &tests {
        md.push_str(&format!("| `{t}` |"));
        for (_, r) in results {
            md.push_str(&format!(" {} |", test_cell(r, t)));
        }
        md.push('\n');
    }
    md.push_str("| (guest) |");
    for (_, r) in results {
        md.push_str(&format!(" {} |", if r.ok() { "ok" } else { "**FAILED**" }));
    }
    md.push('\n');
    md.push_str("| agent start, spawn to ready (median / max) |");
    for (_, r) in results {
        md.push_str(&format!(" {} |", r.ready_summary()));
    }
    md.push('\n');
    if let Some((i, (_, r))) = results
        .iter()
        .enumerate()
        .find(|(_, (_, r))| !r.reject.trim().is_empty())
    {
        md.push_str(&format!(
            "\nWhat the agent prints when the kernel verifier rejects one of its programs (`enforcer-agent load-program enf_reject --object enforcer-test.o`, a program that is wrong on purpose), on {}:\n\n```text\n{}\n```\n",
            col(i, r),
            r.reject
                .lines()
                // Timings change from run to run; the table should not.
                .map(|l| if l.starts_with("verification time") {
                    "verification time … usec"
                } else {
                    l
                })
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
        ));
    }
    md
}

const README_BEGIN: &str = "<!-- kernel-matrix:begin -->";
const README_END: &str = "<!-- kernel-matrix:end -->";

/// Replaces the marked section of README.md with the tables.
pub fn update_readme(readme: &Path, md: &str) -> Result<()> {
    let text =
        fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(b), Some(e)) = (text.find(README_BEGIN), text.find(README_END)) else {
        bail!(
            "{} has no `{README_BEGIN}` ... `{README_END}` section; add the two markers where the tables go",
            readme.display()
        );
    };
    if e < b {
        bail!(
            "{}: `{README_END}` comes before `{README_BEGIN}`",
            readme.display()
        );
    }
    let new = format!(
        "{}{README_BEGIN}\n<!-- generated by `cargo xtask vm-test --kernel all --update-readme`; do not edit by hand -->\n\n{}\n{}",
        &text[..b],
        md.trim_end(),
        &text[e..]
    );
    fs::write(readme, new).with_context(|| format!("writing {}", readme.display()))?;
    eprintln!("xtask: updated the kernel matrix in {}", readme.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        super::log::{SAMPLE_LOG, parse_log},
        *,
    };

    #[test]
    fn cells_details_and_markdown_show_a_failed_guest() {
        let r = parse_log(SAMPLE_LOG);
        assert_eq!(test_cell(&r, "needs_btf"), "skipped (btf)");
        assert_eq!(test_cell(&r, "a_test"), "pass");
        assert_eq!(test_cell(&r, "broken"), "FAIL");
        assert_eq!(test_cell(&r, "never_ran"), "-");
        let details = failure_details("5.10", &r);
        assert!(details.contains("rejected by the verifier") && details.contains("kernel log"));
        let md = matrix_markdown(&["5.10"], &[("5.10".into(), r)]);
        assert!(md.contains("| `btf` (optional) | **missing** |"), "{md}");
        assert!(md.contains("| `needs_btf` | skipped (btf) |"), "{md}");
        assert!(md.contains("| (guest) | **FAILED** |"), "{md}");
        assert!(md.contains("rejected text"), "{md}");
        assert!(
            md.contains(
                "| agent start, spawn to ready (median / max) | 900 / 1200 ms (3 starts) |"
            ),
            "{md}"
        );
    }

    #[test]
    fn readme_section_is_replaced_between_markers() {
        let dir = std::env::temp_dir().join(format!("vmtest-readme-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let readme = dir.join("README.md");
        fs::write(
            &readme,
            format!("a\n{README_BEGIN}\nold\n{README_END}\nb\n"),
        )
        .expect("write");
        update_readme(&readme, "new table\n").expect("update");
        let text = fs::read_to_string(&readme).expect("read");
        assert!(text.starts_with("a\n") && text.ends_with(&format!("{README_END}\nb\n")));
        assert!(
            text.contains("new table") && !text.contains("old"),
            "{text}"
        );
        fs::write(&readme, "no markers").expect("write");
        assert!(update_readme(&readme, "x").is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
