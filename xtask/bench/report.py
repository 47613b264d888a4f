#!/usr/bin/env python3
"""Render `cargo xtask bench` results as a PNG plot and a Markdown section.

Usage: python3 report.py RESULTS_JSON OUT_PNG OUT_MD

RESULTS_JSON is written by the bench harness: an object whose "rows" list holds
one object per (workload, config, rules, caller) with p50_ns, mean_ns,
added_p50_ns and ratio_mean. "rows" is required; every other key ("machine",
"command", "rounds", "apply", "notes") is optional, as are most per-row fields
(added_p50_ns and ratio_mean are derived from the workload's "none" row when
absent). Rows with a "rules" count are plotted as added p50 latency
versus rule count for the workloads in PLOT_WORKLOADS; every workload gets a
table in the Markdown output.

Requires matplotlib (see requirements.txt next to this file).
"""

import importlib.util
import json
import math
import os
import sys

PROG = "report.py"
USAGE = f"usage: python3 {PROG} RESULTS_JSON OUT_PNG OUT_MD"

# Workloads that get a subplot, in this order (those present in the data).
PLOT_WORKLOADS = ["udp-connect4", "sendto4", "tcp-connect4"]

# Preferred orders; anything not listed sorts after, in order of appearance.
CONFIG_ORDER = ["none", "empty-prog", "enforcer", "nftables", "iptables", "opensnitch"]
CALLER_ORDER = ["attested", "unattested", "denied", "-"]

FLOOR_CONFIG = "empty-prog"
BASELINE_CONFIG = "none"
# Workloads (by prefix) on which the allow-only program runs: a cgroup connect or sendmsg
# hook. Connected sends and getpid run no program.
FLOOR_WORKLOADS = ("udp-connect", "sendto", "tcp-connect")


def die(msg, code=1):
    print(f"{PROG}: {msg}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------- parsing


def num(v):
    """A finite float from a JSON value, or None (bools and junk -> None)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def text(v, default="-"):
    if v is None:
        return default
    s = str(v).strip()
    return s if s else default


def load(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        die(f"cannot read {path}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        die(f"{path} is not UTF-8 text: {e.reason}")
    except json.JSONDecodeError as e:
        die(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(data, dict):
        die(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    rows = data.get("rows")
    if not isinstance(rows, list):
        die(f"{path}: \"rows\" must be a list of result objects"
            + (" (missing)" if rows is None else ""))
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        die(f"{path}: rows[{bad[0]}] is not an object")
    return data


class Row:
    __slots__ = ("workload", "config", "caller", "rules", "p50", "mean",
                 "added", "ratio", "idx")

    def __init__(self, raw, idx):
        self.idx = idx
        self.workload = text(raw.get("workload"), "(unnamed)")
        self.config = text(raw.get("config"), "(unknown)")
        self.caller = text(raw.get("caller"), "-")
        r = num(raw.get("rules"))
        self.rules = int(r) if r is not None and r == int(r) else r
        self.p50 = num(raw.get("p50_ns"))
        self.mean = num(raw.get("mean_ns"))
        self.added = num(raw.get("added_p50_ns"))
        self.ratio = num(raw.get("ratio_mean"))


def build_rows(data):
    rows = [Row(r, i) for i, r in enumerate(data.get("rows") or [])]
    # Fill derived values the producer left out, from the workload's baseline.
    base = {}
    for r in rows:
        if r.config == BASELINE_CONFIG and r.workload not in base:
            base[r.workload] = r
    for r in rows:
        b = base.get(r.workload)
        if b is None:
            continue
        if r.added is None and r.p50 is not None and b.p50 is not None:
            r.added = r.p50 - b.p50
        if r.ratio is None and r.mean is not None and b.mean:
            r.ratio = r.mean / b.mean
    return rows


def rank(order, value, seen):
    if value in order:
        return (0, order.index(value))
    return (1, seen.setdefault(value, len(seen)))


def sort_rows(rows):
    cfg_seen, caller_seen = {}, {}
    for r in rows:  # register first-appearance order before sorting
        rank(CONFIG_ORDER, r.config, cfg_seen)
        rank(CALLER_ORDER, r.caller, caller_seen)
    return sorted(rows, key=lambda r: (
        rank(CONFIG_ORDER, r.config, cfg_seen),
        (0, r.rules) if r.rules is not None else (-1, 0),
        rank(CALLER_ORDER, r.caller, caller_seen),
        r.idx,
    ))


def by_workload(rows):
    out = {}
    for r in rows:
        out.setdefault(r.workload, []).append(r)
    return out


# ---------------------------------------------------------------- formatting


def fmt_ns(v):
    if v is None:
        return "-"
    s = f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def fmt_ratio(v):
    return "-" if v is None else f"{v:.3f}"


def fmt_ms(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_rules(v):
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:g}"


def fmt_rules_short(v):
    """Axis tick label: 10, 100, 1k, 10k, 1M."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def cell(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def machine_line(data):
    m = data.get("machine")
    if not isinstance(m, dict):
        return text(m, "unknown machine") if m else "unknown machine"
    parts = []
    if m.get("kernel") not in (None, ""):
        parts.append(f"Linux {text(m['kernel'])}")
    if m.get("cpu") not in (None, ""):
        parts.append(text(m["cpu"]))
    cores = num(m.get("cores"))
    if cores is not None:
        c = int(cores) if cores == int(cores) else cores
        parts.append(f"{c} core{'s' if c != 1 else ''}")
    elif m.get("cores") not in (None, ""):
        parts.append(f"{text(m['cores'])} cores")
    known = {"kernel", "cpu", "cores", "date"}
    for k, v in m.items():
        if k not in known and v not in (None, "") and not isinstance(v, (dict, list)):
            parts.append(f"{k} {text(v)}")
    if m.get("date") not in (None, ""):
        parts.append(text(m["date"]))
    return ", ".join(parts) if parts else "unknown machine"


def table(header, body):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if h in ("config", "caller", "target", "this run", "verdict", "what") else "---:"
                            for h in header) + "|"]
    for row in body:
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return lines


def find_row(rows, workload, config, rules, caller):
    for r in rows:
        if (r.workload, r.config, r.rules, r.caller) == (workload, config, rules, caller):
            return r
    return None


def floor_ratios(rows, tcp):
    """(workload, p50 ratio, mean ratio) of the allow-only program against the same round's
    baseline, for the TCP or the UDP workloads it runs on. The p50 ratio is
    1 + added p50 / baseline p50 (the added p50 is the median of per-round differences);
    the mean ratio is the row's (median of per-round ratios)."""
    base = {}
    for r in rows:
        if r.config == BASELINE_CONFIG:
            base.setdefault(r.workload, r)
    out = []
    for r in rows:
        if (r.config != FLOOR_CONFIG or not r.workload.startswith(FLOOR_WORKLOADS)
                or r.workload.startswith("tcp") != tcp):
            continue
        b = base.get(r.workload)
        p50 = None if r.added is None or b is None or not b.p50 else 1 + r.added / b.p50
        out.append((r.workload, p50, r.ratio))
    return out


def render_targets(data, rows):
    """The issue's targets, each checked against this run's numbers."""
    out = ["#### Targets", "",
           "Each line is computed from this run's results (nothing typed in by hand).", ""]
    body = []

    def line(target, value, ok):
        verdict = "-" if ok is None else ("met" if ok else "MISSED")
        body.append([target, value, verdict])

    r = find_row(rows, "udp-connect4", "enforcer", 1_000_000, "attested")
    v = r.added if r else None
    line("UDP connect added p50 at 1M rules <= 0.30 us",
         "-" if v is None else f"{v / 1e3:.2f} us", None if v is None else v <= 300)
    r = find_row(rows, "tcp-connect4", "enforcer", 100_000, "attested")
    v = r.ratio if r else None
    line("TCP connect mean <= 1.03x baseline at 100k rules",
         "-" if v is None else f"{v:.3f}x", None if v is None else v <= 1.03)
    pr = data.get("prog_run_ns") if isinstance(data.get("prog_run_ns"), dict) else {}
    base = find_row(rows, "tcp-connect4", "none", None, "-")
    run100k = num(pr.get("enforcer-100000-connect4"))
    if base and base.mean and run100k is not None:
        bound = 1 + run100k / base.mean
        line("TCP connect at 100k rules, from the kernel's own accounting: "
             "1 + connect4 program run time / baseline mean",
             f"{bound:.4f}x ({run100k:.0f} ns on {base.mean / 1e3:.1f} us)", bound <= 1.03)
    # An allow-only program cannot make a call faster: a ratio below 1 against the baseline
    # would show that the order of measurement, not the program, decided it.
    for tcp, proto in ((True, "TCP"), (False, "UDP")):
        fr = floor_ratios(rows, tcp)
        if not fr:
            continue
        vals = [v for _, p, m in fr for v in (p, m)]
        ok = None if any(v is None for v in vals) else min(vals) >= 1
        line(f"{proto}: the allow-only (empty) program against the baseline: "
             "p50 / mean ratio >= 1 (no measurement-order bias)",
             ", ".join(f"{w} {fmt_ratio(p)}x / {fmt_ratio(m)}x" for w, p, m in fr), ok)
    a, b = num(pr.get("enforcer-10-connect4")), num(pr.get("enforcer-1000000-connect4"))
    v = None if a is None or b is None else b - a
    line("connect4 program run time growth 10 -> 1M rules <= 150 ns",
         "-" if v is None else f"{v:+.0f} ns ({a:.0f} -> {b:.0f} ns)",
         None if v is None else v <= 150)
    extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
    ex = extra.get("exec") if isinstance(extra.get("exec"), dict) else {}
    lost, rate = num(ex.get("events_lost")), num(ex.get("rate_per_s"))
    blost = num(ex.get("burst_events_lost"))
    if lost is not None:
        total = lost + (blost or 0)
        line("0 exec events lost at the machine's max exec rate (and in 10x bursts)",
             f"{total:.0f} lost at {rate or 0:.0f} exec/s", total == 0)
    runs = [a for a in data.get("apply_runs") or [] if isinstance(a, dict)]
    for n, limit in ((10_000, 20.0), (1_000_000, 2000.0)):
        a = next((x for x in runs if num(x.get("rules")) == n and x.get("what") == "apply"), None)
        v = num(a.get("apply_ms")) if a else None
        dec = num(a.get("decode_ms")) if a else None
        extra_txt = "" if dec is None else f" (+ {dec:.0f} ms to decode the bundle first)"
        line(f"apply of {fmt_rules(n)} rules <= {limit:.0f} ms (to the flip)",
             "-" if v is None else f"{v:.1f} ms{extra_txt}", None if v is None else v <= limit)
    rss, cpu = num(ex.get("agent_rss_kib")), num(ex.get("agent_cpu_pct"))
    if rss is not None:
        line("agent RSS <= 25 MiB", f"{rss / 1024:.1f} MiB", rss / 1024 <= 25)
    if cpu is not None and rate:
        per_k = cpu * 1000 / rate
        line("agent CPU <= 5% of a core at 1k exec/s", f"{per_k:.1f}% per 1k exec/s", per_k <= 5)
    cs = container_start_rows(data)
    k8s = next((r for r in cs if r.get("config") == "agent-k8s"), None)
    v = num(k8s.get("added_p50_ms")) if k8s else None
    if k8s is not None:
        line("container start: delay the agent adds at p50 (k8s selectors, enforce: the first "
             "exec held until the runtime named the pod), against the same round's start "
             "with no agent <= 5 ms",
             "-" if v is None else f"{v:+.2f} ms ({fmt_ms(num(k8s.get('p50_ms')))} ms "
             "per start)", None if v is None else v <= 5)
    sc = syscall_cost_rows(data)
    gp = next((r for r in sc if r.get("op") == "getppid"), None)
    if gp is not None:
        v = num(gp.get("added_ns"))
        line("tamper programs (raw tracepoints sys_enter/sys_exit): added to an unrelated "
             "syscall (getppid) at the median <= 100 ns",
             "-" if v is None else f"{v:+.0f} ns ({fmt_ratio(num(gp.get('ratio')))} of "
             f"{num(gp.get('base_ns')):.0f} ns)", None if v is None else v <= 100)
    for t, v, ok in time_bound_targets(data):
        line(t, v, ok)
    fails = sum(num((x.get("inflight") or {}).get("failed")) or 0 for x in runs)
    if runs:
        line("no connect fails while an apply is in flight", f"{fails:.0f} failed", fails == 0)
    out += table(["target", "this run", "verdict"], body)
    out.append("")
    return out


def fmt_ratio(v):
    return "-" if v is None else f"{v:.3f}x"


def syscall_cost_rows(data):
    sc = data.get("syscall_cost")
    if not isinstance(sc, dict):
        return []
    return [r for r in sc.get("rows") or [] if isinstance(r, dict)]


def render_syscall_cost(data):
    rows = syscall_cost_rows(data)
    if not rows:
        return []
    sc = data.get("syscall_cost")
    out = ["#### Tamper programs: cost of every other syscall", ""]
    body = []
    for r in rows:
        body.append([text(r.get("op")), f"{num(r.get('base_ns')):.1f}",
                     f"{num(r.get('hook_ns')):.1f}", f"{num(r.get('added_ns')):+.1f}",
                     fmt_ratio(num(r.get("ratio")))])
    out += table(["syscall", "without (ns)", "with (ns)", "added (ns)", "ratio"], body)
    out.append("")
    notes = sc.get("notes") if isinstance(sc, dict) else None
    for n in notes if isinstance(notes, list) else []:
        if text(n, ""):
            out.append(f"- {text(n)}")
    out.append("")
    return out


def time_bound_data(data):
    tb = data.get("time_bound")
    return tb if isinstance(tb, dict) else {}


def time_bound_targets(data):
    """The time-bound entries' target lines: [target, this run, verdict ok/None]."""
    tb = time_bound_data(data)
    out = []
    rows = [r for r in tb.get("rows") or [] if isinstance(r, dict)]
    r4 = next((r for r in rows if r.get("workload") == "udp-connect4"), None)
    if r4 is not None:
        v = num(r4.get("timed_minus_plain_p50_ns"))
        out.append(["UDP connect added p50 with time-bound entries - without (10 rules, "
                    "same rounds) <= 0.10 us",
                    "-" if v is None else
                    f"{v / 1e3:+.3f} us (added {fmt_ns_signed(num(r4.get('timed_added_p50_ns')))}"
                    f" vs {fmt_ns_signed(num(r4.get('plain_added_p50_ns')))} ns)",
                    None if v is None else v <= 100])
    run4 = next((r for r in tb.get("run") or []
                 if isinstance(r, dict) and r.get("hook") == "connect4"), None)
    if run4 is not None:
        v = num(run4.get("timed_minus_plain_ns"))
        out.append(["connect4 program run time with time-bound entries - without <= 100 ns",
                    "-" if v is None else
                    f"{v:+.0f} ns ({num(run4.get('plain_ns')):.0f} -> "
                    f"{num(run4.get('timed_ns')):.0f} ns)",
                    None if v is None else v <= 100])
    return out


def fmt_ns_signed(v):
    return "-" if v is None else f"{v:+.0f}"


def render_time_bound(data, with_targets):
    tb = time_bound_data(data)
    rows = [r for r in tb.get("rows") or [] if isinstance(r, dict)]
    if not rows:
        return []
    out = ["#### Time-bound entries", ""]
    if text(tb.get("command"), ""):
        out += [f"Measured by `{text(tb.get('command'))}`, {num(tb.get('rounds')) or 0:.0f} rounds.", ""]
    body = []
    for r in rows:
        g = lambda k: num(r.get(k))
        body.append([text(r.get("workload")), fmt_ns(g("base_p50_ns")),
                     fmt_ns(g("plain_p50_ns")), fmt_ns(g("timed_p50_ns")),
                     fmt_ns_signed(g("plain_added_p50_ns")),
                     fmt_ns_signed(g("timed_added_p50_ns")),
                     fmt_ns_signed(g("timed_minus_plain_p50_ns")),
                     fmt_ns_signed(g("timed_minus_plain_mean_ns"))])
    out += table(["workload", "baseline p50 (ns)", "without p50 (ns)", "with p50 (ns)",
                  "without added p50 (ns)", "with added p50 (ns)", "with - without p50 (ns)",
                  "with - without mean (ns)"], body)
    out.append("")
    run = [r for r in tb.get("run") or [] if isinstance(r, dict)]
    if run:
        body = [[text(r.get("hook")), fmt_ns(num(r.get("plain_ns"))),
                 fmt_ns(num(r.get("timed_ns"))),
                 fmt_ns_signed(num(r.get("timed_minus_plain_ns")))] for r in run]
        out += table(["program", "run time without (ns)", "run time with (ns)",
                      "with - without (ns)"], body)
        out.append("")
    if with_targets:
        body = []
        for t, v, ok in time_bound_targets(data):
            body.append([t, v, "-" if ok is None else ("met" if ok else "MISSED")])
        if body:
            out += ["Targets of this part, computed from its results:", ""]
            out += table(["target", "this run", "verdict"], body)
            out.append("")
    notes = tb.get("notes")
    for n in notes if isinstance(notes, list) else []:
        if text(n, ""):
            out.append(f"- {text(n)}")
    out.append("")
    return out


def container_start_rows(data):
    cs = data.get("container_start")
    if not isinstance(cs, dict):
        return []
    return [r for r in cs.get("rows") or [] if isinstance(r, dict)]


def render_container_start(data):
    cs = data.get("container_start")
    rows = container_start_rows(data)
    if not rows:
        return []
    out = ["#### Container start (containerd node)", "",
           "CreateContainer + StartContainer until the container's process runs its binary; "
           "added = difference with the same round's start with no agent (p50/p90 over "
           "rounds); start only = from the StartContainer call (where the agent's hold "
           "falls).", ""]
    body = []
    for r in rows:
        body.append([text(r.get("config")), fmt_rules(num(r.get("starts")) and int(num(r.get("starts")))),
                     fmt_ms(num(r.get("p50_ms"))), fmt_ms(num(r.get("p90_ms"))),
                     fmt_ms(num(r.get("added_p50_ms"))), fmt_ms(num(r.get("added_p90_ms"))),
                     fmt_ms(num(r.get("start_p50_ms"))), fmt_ms(num(r.get("added_start_p50_ms")))])
    out += table(["config", "starts", "p50 (ms)", "p90 (ms)", "added p50 (ms)",
                  "added p90 (ms)", "start only p50 (ms)", "start only added p50 (ms)"], body)
    out.append("")
    notes = cs.get("notes") if isinstance(cs, dict) else None
    for n in notes if isinstance(notes, list) else []:
        if text(n, ""):
            out.append(f"- {text(n)}")
    out.append("")
    return out


def render_md(data, rows, png_name):
    out = ["### Benchmark results", ""]
    out.append(f"- Machine: {machine_line(data)}")
    cmd = data.get("command")
    if cmd not in (None, ""):
        out.append(f"- Command: `{text(cmd)}`")
    rounds = num(data.get("rounds"))
    if rounds is not None:
        out.append(f"- Rounds: {int(rounds) if rounds == int(rounds) else rounds}")
    elif data.get("rounds") not in (None, ""):
        out.append(f"- Rounds: {text(data['rounds'])}")
    out.append("")
    out.append("Added p50 and mean ratio are against the baseline (config `none`) "
               "measured in the same round; the baseline's place in the round rotates with "
               "every other configuration's.")
    out.append("")

    out += render_targets(data, rows)

    groups = by_workload(rows)
    if not groups:
        out += ["_No benchmark rows in the results._", ""]
    header = ["config", "rules", "caller", "p50 (ns)", "mean (ns)",
              "added p50 (ns)", "mean ratio"]
    for wl, wrows in groups.items():
        out.append(f"#### {wl}")
        out.append("")
        body = [[r.config, fmt_rules(r.rules), r.caller, fmt_ns(r.p50),
                 fmt_ns(r.mean), fmt_ns(r.added), fmt_ratio(r.ratio)]
                for r in sort_rows(wrows)]
        out += table(header, body)
        out.append("")

    apply_rows = data.get("apply")
    if isinstance(apply_rows, list) and apply_rows:
        items = [a for a in apply_rows if isinstance(a, dict)]
        items.sort(key=lambda a: (num(a.get("rules")) is None, num(a.get("rules")) or 0))
        out.append("#### First apply (agent start with the policy)")
        out.append("")
        body = []
        for a in items:
            r = num(a.get("rules"))
            if r is not None and r == int(r):
                r = int(r)
            body.append([fmt_rules(r), fmt_ms(num(a.get("apply_ms")))])
        out += table(["rules", "apply (ms)"], body)
        out.append("")

    runs = data.get("apply_runs")
    if isinstance(runs, list) and runs:
        out.append("#### Policy compile and apply, with connects in flight")
        out.append("")
        out.append("`policy compile` is the CLI turning YAML into a bundle; apply is the agent's "
                   "time from the decoded policy to the flip (compile to map entries, "
                   "kernel writes, one 4-byte store); end to end is `policy apply` of the "
                   "bundle as the operator sees it. A worker in the enforced cgroup does UDP "
                   "connect() to an allowed destination throughout; failed must be 0.")
        out.append("")
        body = []
        for a in runs:
            if not isinstance(a, dict):
                continue
            inf = a.get("inflight") if isinstance(a.get("inflight"), dict) else {}
            outs = a.get("outside") if isinstance(a.get("outside"), dict) else {}
            r = num(a.get("rules"))
            if r is not None and r == int(r):
                r = int(r)
            us = lambda d, k: "-" if num(d.get(k)) is None else f"{num(d.get(k)) / 1e3:.2f}"
            body.append([
                fmt_rules(r), text(a.get("what")), fmt_ms(num(a.get("compile_ms"))),
                fmt_ms(num(a.get("apply_ms"))), fmt_ms(num(a.get("cli_ms"))),
                fmt_ns(num(a.get("kernel_writes"))),
                f"{us(inf, 'p50_ns')} / {us(inf, 'p99_ns')} / {us(inf, 'max_ns')}",
                f"{us(outs, 'p50_ns')} / {us(outs, 'p99_ns')} / {us(outs, 'max_ns')}",
                fmt_ns(num(inf.get("failed"))),
            ])
        out += table(["rules", "what", "compile (ms)", "apply (ms)", "end to end (ms)",
                      "kernel writes", "connect during apply p50/p99/max (us)",
                      "connect otherwise p50/p99/max (us)", "failed"], body)
        out.append("")

    out += render_container_start(data)
    out += render_syscall_cost(data)
    out += render_time_bound(data, False)

    notes = data.get("notes")
    if isinstance(notes, str):
        notes = [notes]
    if isinstance(notes, list):
        notes = [text(n, "") for n in notes if text(n, "")]
        if notes:
            out.append("#### Notes")
            out.append("")
            out += [f"- {n}" for n in notes]
            out.append("")

    out.append(f"![added latency vs rules]({png_name})")
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- plotting


def series_label(config, caller):
    return config if caller in ("-", "") else f"{config} ({caller})"


def render_png(data, rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups = by_workload(rows)
    plotted = [w for w in PLOT_WORKLOADS if w in groups]
    title = f"Added p50 latency vs rule count\n{machine_line(data)}"

    if not plotted:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.axis("off")
        ax.text(0.5, 0.5, "no rows for " + ", ".join(PLOT_WORKLOADS),
                ha="center", va="center", fontsize=12, color="0.4")
        fig.suptitle(title, fontsize=11)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return

    # One colour per (config, caller), stable across subplots.
    keys = []
    for r in sort_rows([r for w in plotted for r in groups[w]]):
        if r.rules is not None and (r.config, r.caller) not in keys:
            keys.append((r.config, r.caller))
    cfg_seen, caller_seen = {}, {}
    keys.sort(key=lambda k: (rank(CONFIG_ORDER, k[0], cfg_seen),
                             rank(CALLER_ORDER, k[1], caller_seen)))
    cmap = plt.get_cmap("tab10")
    colour = {k: cmap(i % 10) for i, k in enumerate(keys)}
    markers = "osD^vP*X<>"
    caller_style = {"attested": "-", "unattested": "--", "denied": ":"}

    n = len(plotted)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 0.8, 4.6), squeeze=False)
    handles = {}
    skipped = 0
    xs_all = []
    for ax, wl in zip(axes[0], plotted):
        wrows = groups[wl]
        for key in keys:
            pts = sorted((r.rules, r.added) for r in wrows
                         if (r.config, r.caller) == key and r.rules is not None
                         and r.added is not None)
            good = [(x, y) for x, y in pts if x > 0]
            skipped += len(pts) - len(good)
            if not good:
                continue
            xs, ys = zip(*good)
            xs_all.extend(xs)
            (h,) = ax.plot(xs, ys, color=colour[key],
                           marker=markers[keys.index(key) % len(markers)],
                           linestyle=caller_style.get(key[1], "-"),
                           linewidth=1.6, markersize=5,
                           label=series_label(*key))
            handles.setdefault(series_label(*key), h)
        floor = [r.added for r in wrows
                 if r.config == FLOOR_CONFIG and r.added is not None]
        if floor:
            h = ax.axhline(floor[0], color="0.35", linestyle="--", linewidth=1.2,
                           label="empty program (floor)")
            handles.setdefault("empty program (floor)", h)
        ax.axhline(0, color="0.8", linewidth=0.8, zorder=0)
        ax.set_xscale("log")
        # Peers that go through user space add hundreds of us; ours add hundreds of ns,
        # and noise can be negative: a symmetric log scale shows all of it.
        ax.set_yscale("symlog", linthresh=100)
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_rules_short(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(wl, fontsize=11)
        ax.set_xlabel("rules (log scale)")
        ax.set_ylabel("added p50 latency (ns, symlog)")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="x", alpha=0.12)
        if not any(l.get_label() and not l.get_label().startswith("_")
                   for l in ax.lines):
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes,
                    ha="center", va="center", color="0.5")
    if skipped:
        print(f"{PROG}: warning: {skipped} point(s) with rules <= 0 left off the log-scale plot",
              file=sys.stderr)

    # Share the rule-count range so the subplots line up.
    if xs_all:
        lo, hi = min(xs_all), max(xs_all)
        if lo == hi:
            lo, hi = lo / 10, hi * 10
        for ax in axes[0]:
            ax.set_xlim(lo / 1.6, hi * 1.6)

    fig.suptitle(title, fontsize=11)
    labels = [series_label(*k) for k in keys if series_label(*k) in handles]
    if "empty program (floor)" in handles:
        labels.append("empty program (floor)")
    fig_h = fig.get_figheight()
    bottom = 0.02
    if labels:
        ncol = min(len(labels), 6)
        legend_rows = math.ceil(len(labels) / ncol)
        fig.legend([handles[k] for k in labels], labels, loc="lower center",
                   bbox_to_anchor=(0.5, 0.01), ncol=ncol, fontsize=9, frameon=False)
        bottom = (0.12 + 0.27 * legend_rows) / fig_h
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv):
    if len(argv) == 4 and argv[1] == "--time-bound-section":
        # Only the time-bound entries' section (with its targets), for a partial run that
        # keeps the other sections of BENCHMARKS.md.
        data = load(argv[2])
        try:
            with open(argv[3], "w", encoding="utf-8") as f:
                f.write("\n".join(render_time_bound(data, True)))
        except OSError as e:
            die(f"cannot write {argv[3]}: {e.strerror or e}")
        return 0
    if len(argv) != 4 or argv[1] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if len(argv) == 2 and argv[1] in ("-h", "--help") else 2
    results, out_png, out_md = argv[1:]
    data = load(results)
    rows = build_rows(data)
    if importlib.util.find_spec("matplotlib") is None:  # fail before writing
        die("matplotlib is not installed (pip install -r "
            f"{os.path.join(os.path.dirname(os.path.abspath(__file__)), 'requirements.txt')})")
    for p in (out_png, out_md):
        d = os.path.dirname(os.path.abspath(p))
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            die(f"cannot create {d}: {e.strerror or e}")
    try:
        render_png(data, rows, out_png)
    except OSError as e:
        die(f"cannot write {out_png}: {e.strerror or e}")
    md = render_md(data, rows, os.path.basename(out_png))
    try:
        with open(out_md, "w", encoding="utf-8") as f:
            f.write(md)
    except OSError as e:
        die(f"cannot write {out_md}: {e.strerror or e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
