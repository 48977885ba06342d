#!/usr/bin/env python3
"""Turns the output of scripts/bench.sh into the chart and the results section of
docs/benchmarks.md. Standard library only (no matplotlib): the chart is written as SVG by hand.

Inputs (under $CARGO_TARGET_DIR, default target/bench-aligned):
  criterion/<group>/<bench>/round<N>/estimates.json   criterion, one baseline per round
  static-call-bench/round<N>/latency.json              benches/latency.rs, one per round
  static-call-bench/icount.json                        scripts/icount.py
  static-call-bench/machine.txt                        scripts/bench.sh
Outputs:
  docs/benchmarks-calls.svg
  docs/benchmarks.md, between the `results:begin` and `results:end` markers
"""
import glob
import html
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target", "bench-aligned"))
OUT = os.environ.get("STATIC_CALL_BENCH_OUT", os.path.join(TARGET, "static-call-bench"))
CRIT = os.path.join(TARGET, "criterion")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
SVG = os.path.join(ROOT, "docs", "benchmarks-calls.svg")

# Calls per criterion iteration (benches/common/mod.rs CHAIN; benches/pressure.rs).
PER_ITER = {"call": 1000, "unpatched": 1000, "disabled": 1000, "null_ret0": 1000, "far": 1000,
            "rust": 1000, "rust_memchr": 1000, "pressure1024": 1024, "pressure4096": 4096,
            "wrapper": 1000}


def rounds(prefix="round"):
    names = sorted({os.path.basename(p) for p in glob.glob(os.path.join(CRIT, "*", "*", prefix + "*"))},
                   key=lambda r: int(r[len(prefix):]))
    if prefix != "round":
        return names
    if not names:
        sys.exit(f"no criterion results under {CRIT}: run scripts/bench.sh")
    return names


def ns_per_call(group, bench, rnd):
    """Criterion's estimate for one round, in ns per call (slope if it has one, else median)."""
    path = os.path.join(CRIT, group, bench, rnd, "estimates.json")
    if not os.path.exists(path):
        return None
    est = json.load(open(path))
    e = est.get("slope") or est["median"]
    return e["point_estimate"] / PER_ITER[group]


def series(group, bench, rs):
    return [v for v in (ns_per_call(group, bench, r) for r in rs) if v is not None]


def ratios(group, bench, base, rs):
    out = []
    for r in rs:
        a, b = ns_per_call(group, bench, r), ns_per_call(group, base, r)
        if a is not None and b:
            out.append(a / b)
    return out


def med(v):
    return statistics.median(v) if v else float("nan")


def spread(v, fmt="{:.2f}"):
    if len(v) < 2:
        return ""
    return (fmt + "–" + fmt).format(min(v), max(v))


def latency_runs():
    runs = []
    for p in sorted(glob.glob(os.path.join(OUT, "round*", "latency.json"))):
        runs.append(json.load(open(p)))
    return runs


def get(d, path):
    for k in path.split("."):
        d = d[k]
    return d


def lat(runs, path):
    return [get(r, path) for r in runs if r]


# ---------------------------------------------------------------------------------------------

def chart(rows, pressure):
    """Horizontal bars, ns per call; a thin line spans the rounds' min..max."""
    width, left, right, bar, gap = 760, 250, 150, 18, 8
    sections = [("One call site, dependent chain (ns per call)", rows),
                ("N sites with N targets, round-robin (ns per call)", pressure)]
    height = 40 + sum(30 + len(r) * (bar + gap) for _, r in sections) + 30
    vmax = max(max(v) for _, r in sections for _, v, _ in r if v) * 1.05
    scale = (width - left - right) / vmax
    colors = {"static": "#2b7bb9", "direct": "#555555"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
           f'static-call: cost per call (lower is better)</text>']
    y = 40
    for title, rs in sections:
        out.append(f'<text x="10" y="{y + 16}" font-weight="bold">{html.escape(title)}</text>')
        y += 30
        for label, vals, note in rs:
            if not vals:
                continue
            m = med(vals)
            color = next((c for k, c in colors.items() if label.startswith(k)), "#c0504d")
            w = max(m * scale, 1)
            out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">{html.escape(label)}</text>')
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" fill="{color}"/>')
            if len(vals) > 1:
                x0, x1 = left + min(vals) * scale, left + max(vals) * scale
                out.append(f'<line x1="{x0:.1f}" y1="{y + bar / 2}" x2="{x1:.1f}" y2="{y + bar / 2}" '
                           f'stroke="black" stroke-width="1.5"/>')
            out.append(f'<text x="{left + max(max(vals) * scale, w) + 6:.1f}" y="{y + 13}">'
                       f'{m:.2f} ns {note}</text>')
            y += bar + gap
    out.append(f'<text x="10" y="{height - 10}" font-size="10" fill="#555">bars: median over rounds; '
               f'lines: min–max over rounds; ratios are to the direct call of the same round. '
               f'Generated by scripts/report.py from criterion output.</text>')
    out.append("</svg>")
    with open(SVG, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def fmt_ratio(v):
    return f"{med(v):.2f}×" + (f" ({spread(v)})" if len(v) > 1 else "")


RUST_GOALS = [("`fn(u64) -> u64`", "rust", "static", "direct"),
              ("`fn([u64; 8]) -> u64`", "rust", "static_array8", "direct_array8")] + [
    (f"memchr, {n} B", "rust_memchr", f"static_{n}", f"direct_{n}") for n in (16, 32, 64, 4096)]


def rust_section(md, rs, retpoline):
    """Rust keys: benches/rust.rs."""
    if not series("rust", "static", rs):
        return
    md.append("### Rust keys\n")
    md.append("Rust-ABI keys (issue 10): sites call an adapter made for the target, into which it "
              "inlines. Each row is a dependent chain; \"direct\" is a call of a function that is "
              "not inlined and does the same work, which is what an adapter is.\n")
    md.append("| call | ns per call | ÷ direct (same run) |" + (" retpoline build: ÷ direct |" if retpoline else ""))
    md.append("|---|---:|---:|" + ("---:|" if retpoline else ""))
    for label, b, base in [
        ("`fn(u64) -> u64`, direct", "direct", "direct"),
        ("… static call (the target inlined into its adapter)", "static", "direct"),
        ("… `AtomicPtr<fn>`", "atomic_ptr", "direct"),
        ("… static call to a function pointer (`update_pointer`)", "static_pointer", "direct"),
        ("`fn([u64; 8]) -> u64` (by pointer), direct", "direct_array8", "direct_array8"),
        ("… static call", "static_array8", "direct_array8"),
        ("`fn(f64) -> f64`, direct", "direct_f64", "direct_f64"),
        ("… static call (the result comes back in rax)", "static_f64", "direct_f64"),
    ]:
        v = series("rust", b, rs)
        if not v:
            continue
        row = f"| {label} | {med(v):.2f} | {fmt_ratio(ratios('rust', b, base, rs))} |"
        if retpoline:
            a, d = ns_per_call("rust", b, "retpoline"), ns_per_call("rust", base, "retpoline")
            row += f" {a / d:.2f}× |" if a and d else " |"
        md.append(row)
    md.append("")
    md.append("memchr's own signature, `fn(u8, &[u8]) -> Option<usize>`, on a haystack whose only match "
              "is its last byte (ns per search; ÷ the direct call of `memchr::memchr` in the same run):\n")
    sizes = [16, 32, 64, 4096]
    md.append("| search | " + " | ".join(f"{n} B" for n in sizes) + " |")
    md.append("|---|" + "---:|" * len(sizes))
    variants = [("`memchr::memchr`, direct (not inlined)", "direct"),
                ("`memchr::memchr` through a static call", "static"),
                ("`memchr::memchr` through an `AtomicPtr<fn>`", "atomic_ptr"),
                ("static call to `memchr::arch`'s searcher, `target_feature!` adapter", "static_arch"),
                ("static call to `memchr::arch`'s searcher, plain adapter", "static_arch_plain")]
    for label, b in variants:
        cells = []
        for n in sizes:
            v = series("rust_memchr", f"{b}_{n}", rs)
            r = ratios("rust_memchr", f"{b}_{n}", f"direct_{n}", rs)
            cells.append(f"{med(v):.2f} ({med(r):.2f}×)" if v else "")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    if retpoline:
        md.append("")
        md.append("The same searches in the retpoline build (one run; ÷ the direct call of "
                  "`memchr::memchr`, whose own dispatch is then a retpolined indirect call):\n")
        md.append("| search | " + " | ".join(f"{n} B" for n in sizes) + " |")
        md.append("|---|" + "---:|" * len(sizes))
        for label, b in variants:
            cells = []
            for n in sizes:
                a, d = ns_per_call("rust_memchr", f"{b}_{n}", "retpoline"), ns_per_call(
                    "rust_memchr", f"direct_{n}", "retpoline")
                cells.append(f"{a:.2f} ({a / d:.2f}×)" if a and d else "")
            md.append(f"| {label} | " + " | ".join(cells) + " |")
    md.append("")


def main():
    rs = rounds()
    runs = latency_runs()
    icount = json.load(open(os.path.join(OUT, "icount.json"))) if os.path.exists(
        os.path.join(OUT, "icount.json")) else None
    machine = open(os.path.join(OUT, "machine.txt")).read() if os.path.exists(
        os.path.join(OUT, "machine.txt")) else ""

    calls = [
        ("direct call (not inlined)", "call", "direct", "direct"),
        ("static call, patched", "call", "static_patched", "direct"),
        ("static call, patched, Rust key (`fn(u64) -> u64`)", "rust", "static", "direct"),
        ("static call, unpatched (trampoline)", "unpatched", "static_unpatched", "direct"),
        ("static call, unpatched, Rust key", "unpatched", "static_unpatched_rust", "direct"),
        ("static call, patching disabled (`STATIC_CALL_DISABLE=1`)", "disabled", "static_unpatched",
         "direct"),
        ("`AtomicPtr` fn pointer", "call", "atomic_ptr", "direct"),
        ("`&dyn Trait`", "call", "dyn_trait", "direct"),
        ("enum `match` (4 arms)", "call", "enum_match", "direct"),
        ("retpoline indirect call (hand-written thunk)", "call", "retpoline", "direct"),
    ]
    retpoline = os.path.exists(os.path.join(CRIT, "call", "direct", "retpoline"))
    md = []
    md.append(f"Measured {len(rs)} round(s); each cell is the median over rounds, with the "
              "min–max over rounds in brackets. Ratios are taken within a round, then the median "
              "of those is shown.\n")
    md.append("```text\n" + machine.strip() + "\n```\n")
    md.append("### Cost per call\n")
    if retpoline:
        md.append("| call | ns per call | ÷ direct (same run) | retpoline build: ns per call | "
                  "÷ direct |")
        md.append("|---|---:|---:|---:|---:|")
    else:
        md.append("| call | ns per call | ÷ direct (same run) |")
        md.append("|---|---:|---:|")
    chart_rows = []
    for label, g, b, base in calls:
        v = series(g, b, rs)
        if not v:
            continue
        r = ratios(g, b, base, rs)
        row = f"| {label} | {med(v):.2f} | {fmt_ratio(r)} |"
        if retpoline:
            rv, rr = ns_per_call(g, b, "retpoline"), ns_per_call(g, base, "retpoline")
            row += f" {rv:.2f} | {rv / rr:.2f}× |" if rv and rr else " | |"
        md.append(row)
        short = {("call", "direct"): "direct call", ("call", "static_patched"): "static call, patched",
                 ("rust", "static"): "static call, Rust key",
                 ("unpatched", "static_unpatched"): "static call, unpatched",
                 ("unpatched", "static_unpatched_rust"): "unpatched, Rust key",
                 ("disabled", "static_unpatched"): "patching disabled",
                 ("call", "atomic_ptr"): "AtomicPtr fn pointer", ("call", "dyn_trait"): "&dyn Trait",
                 ("call", "enum_match"): "enum match", ("call", "retpoline"): "retpoline"}[(g, b)]
        chart_rows.append((short, v, f"({med(r):.2f}× direct)"))
    st = series("call", "static_patched", rs)
    rp = series("call", "retpoline", rs)
    md.append("")
    note = ("The unpatched rows come from their own process (benches/unpatched.rs, patching "
            "switched off with `unpatch_all()`), the disabled row from another (the same bench run "
            "with `STATIC_CALL_DISABLE=1`); their ratios are to the direct call measured in that "
            "process. The Rust-key row's direct call is a call of a function that is not inlined "
            "and does the same work (benches/rust.rs).")
    if retpoline:
        flags = next((l.split(": ", 1)[1] for l in machine.splitlines()
                      if l.startswith("retpoline flags:")), "?")
        note += (f" The retpoline columns come from one run of a build with `{flags}`, in which "
                 "every indirect call of the benches goes through LLVM's retpoline thunk (the "
                 "precompiled standard library keeps plain indirect calls).")
    md.append(note + "\n")
    rust_section(md, rs, retpoline)

    if series("far", "static_thunk", rs):
        md.append("### A far target (beyond ±2 GiB of the site)\n")
        md.append("The target is `inc` copied into a far anonymous page (where a function of "
                  "another shared library would be); the site calls it through its near thunk "
                  "(`jmp qword ptr [rip]`).\n")
        md.append("| call | ns per call | ÷ near direct call (same run) |")
        md.append("|---|---:|---:|")
        for label, b in [("near direct call", "direct_near"),
                         ("static call through a thunk", "static_thunk"),
                         ("`AtomicPtr` to the far code", "atomic_ptr_far")]:
            v = series("far", b, rs)
            md.append(f"| {label} | {med(v):.2f} | {fmt_ratio(ratios('far', b, 'direct_near', rs))} |")
        md.append("")

    md.append("### Branch-predictor pressure: N sites, N targets, round-robin\n")
    md.append("| call | N = 1,024: ns per call | ÷ static call | N = 4,096: ns per call | ÷ static call |")
    md.append("|---|---:|---:|---:|---:|")
    pressure_rows = []
    for label, b in [("direct calls", "direct"), ("static calls, patched", "static_patched"),
                     ("`AtomicPtr` per site", "atomic_ptr"), ("`&dyn Trait` per site", "dyn_trait")]:
        v1, v4 = series("pressure1024", b, rs), series("pressure4096", b, rs)
        if not v1:
            continue
        md.append(f"| {label} | {med(v1):.2f} | {fmt_ratio(ratios('pressure1024', b, 'static_patched', rs))} | "
                  f"{med(v4):.2f} | {fmt_ratio(ratios('pressure4096', b, 'static_patched', rs))} |")
        for n, v, g in [("1,024", v1, "pressure1024"), ("4,096", v4, "pressure4096")]:
            pressure_rows.append((f"{label.replace('`', '')}, {n}", v,
                                  f"({med(ratios(g, b, 'static_patched', rs)):.2f}× static)"))

    places = rounds("place")
    if places:
        md.append("")
        md.append("### Spread across code placements\n")
        md.append("The same benches rebuilt with every function aligned to 32 and to 64 bytes "
                  "(one run each; the first row is the median of the rounds above, LLVM's default "
                  "16-byte function alignment). Loop alignment fixes the single-site loops, but "
                  "the straight-line sites of the pressure tests move with their functions.\n")
        md.append("| functions aligned to | patched ÷ direct | 1,024 sites: `AtomicPtr` ÷ static | "
                  "1,024: direct ÷ static | 4,096 sites: `AtomicPtr` ÷ static | 4,096: direct ÷ static |")
        md.append("|---|---:|---:|---:|---:|---:|")
        def prow(label, rr):
            md.append(f"| {label} | {med(ratios('call', 'static_patched', 'direct', rr)):.2f} | "
                      f"{med(ratios('pressure1024', 'atomic_ptr', 'static_patched', rr)):.2f} | "
                      f"{med(ratios('pressure1024', 'direct', 'static_patched', rr)):.2f} | "
                      f"{med(ratios('pressure4096', 'atomic_ptr', 'static_patched', rr)):.2f} | "
                      f"{med(ratios('pressure4096', 'direct', 'static_patched', rr)):.2f} |")
        prow("16 bytes (default)", rs)
        for p in places:
            prow(f"{p[5:]} bytes", [p])

    md.append("")
    md.append("### NULL and return-zero keys against an `Option<fn>` check\n")
    md.append("| loop body | ns per iteration | ÷ `Option` check |")
    md.append("|---|---:|---:|")
    for label, b, base in [
        ("`if let Some(f) = HOOK { f(i) }`, `HOOK` = `None`", "option_none", "option_none"),
        ("`static_call!(HOOK)(i)`, NULL key (patched to a 5-byte NOP)", "static_null", "option_none"),
        ("`x += HOOK.map_or(0, \\|f\\| f(x))`, `HOOK` = `None`", "option_none_ret0", "option_none_ret0"),
        ("`x += static_call!(COUNT)(x)`, return-zero key (patched to `xor eax, eax`)", "static_ret0",
         "option_none_ret0"),
        ("`x += zero(x)`, a direct call of a function returning 0", "direct_ret0", "option_none_ret0"),
    ]:
        v = series("null_ret0", b, rs)
        if v:
            md.append(f"| {label} | {med(v):.2f} | {fmt_ratio(ratios('null_ret0', b, base, rs))} |")

    if series("wrapper", "direct", rs):
        md.append("")
        md.append("### Thin wrappers: `fn w(x) { dispatched(x) }`\n")
        md.append("Each wrapper is `#[inline(never)]` and called in a dependent chain "
                  "(benches/wrappers.rs).\n")
        wr_retpoline = ns_per_call("wrapper", "direct", "retpoline") is not None
        md.append("| wrapper body | machine code | ns per call | ÷ direct wrapper |"
                  + (" retpoline build: ÷ direct wrapper |" if wr_retpoline else ""))
        md.append("|---|---|---:|---:|" + ("---:|" if wr_retpoline else ""))
        for label, code, b in [
            ("`inc(x)` (direct)", "`jmp inc`", "direct"),
            ("`static_call!(K)(x)`, patched", "`push; lea r11; call inc; pop; ret`", "static_natural"),
            ("`static_call_fn!(fn w(x: u64) -> u64 = K)`, patched", "`jmp inc`",
             "static_call_fn"),
            ("`static_call!(R)(x)` over a Rust key (`fn(u64) -> u64`), patched",
             "`push; lea r11; call <adapter>; cmp rax, SENTINEL; je; pop; ret`", "static_rust_natural"),
            ("`AtomicPtr` load + call", "`mov rax, [PTR]; jmp rax`", "atomic_ptr"),
            ("`&dyn Trait`", "`jmp [vtable + 24]`", "dyn_trait"),
        ]:
            v = series("wrapper", b, rs)
            if v:
                row = (f"| {label} | {code} | {med(v):.2f} | "
                       f"{fmt_ratio(ratios('wrapper', b, 'direct', rs))} |")
                if wr_retpoline:
                    rv, rd = ns_per_call("wrapper", b, "retpoline"), ns_per_call(
                        "wrapper", "direct", "retpoline")
                    row += f" {rv / rd:.2f}× |" if rv and rd else " |"
                md.append(row)

    if runs:
        def d(path, k="p50"):
            return lat(runs, path + "." + k)

        def cell(path, k="p50", fmt="{:.1f}"):
            v = d(path, k)
            return fmt.format(med(v)) + (f" ({spread(v, fmt)})" if len(v) > 1 else "")

        md.append("")
        md.append("### Latency (µs)\n")
        md.append("| event | p50 | p99 |")
        md.append("|---|---:|---:|")
        rows = [
            ("floor: wake a sleeping thread (futex), placed by the scheduler", "floors.wake_us"),
            ("floor: … what that wake costs the waker", "floors.waker_us"),
            ("floor: wake a thread pinned to the other CPU", "floors.wake_cross_us"),
            ("floor: … what that wake costs the waker", "floors.waker_cross_us"),
            ("floor: `mprotect` rwx + r-x pair, untouched text page", "floors.mprotect_pair_us"),
            ("floor: `mprotect` pair, a page the patcher wrote before", "update.mprotect_pair_written_page_us"),
            ("floor: `membarrier(SYNC_CORE)`, other threads asleep", "floors.membarrier_us"),
            ("floor: `membarrier(SYNC_CORE)`, another thread running", "floors.membarrier_busy_us"),
            ("first call of a fresh site: the call itself", "first_call.call_us"),
            ("first call → site rewritten by the worker", "first_call.patched_us"),
            ("… of which: call returned → rewritten", "first_call.after_call_us"),
            ("… caller and worker pinned to 2 CPUs: the call", "first_call.pinned_call_us"),
            ("… caller and worker pinned to 2 CPUs: → rewritten", "first_call.pinned_patched_us"),
            ("first call + `flush()` in the caller", "first_call.call_flush_us"),
            ("`update`, 1 site", "update.1.time_us"),
            ("`update`, 1 site, another thread running", "update.busy_1_us"),
            ("`update`, 100 sites", "update.100.time_us"),
            ("`update`, 10,000 sites", "update.10000.time_us"),
        ]
        for label, path in rows:
            try:
                md.append(f"| {label} | {cell(path)} | {cell(path, 'p99')} |")
            except KeyError:
                pass

        md.append("")
        md.append("### System calls per `update` (from `static_call::stats()`)\n")
        md.append("| sites | code pages | `mprotect` | `mprotect` per page | core syncs | batches | "
                  "pages writable (µs) |")
        md.append("|---:|---:|---:|---:|---:|---:|---:|")
        for k in ["1", "100", "10000"]:
            u = runs[-1]["update"][k]
            md.append(f"| {int(u['sites'])} | {int(u['pages'])} | {int(u['mprotects'])} | "
                      f"{u['mprotects'] / u['pages']:.2f} | {int(u['core_syncs'])} | {int(u['batches'])} | "
                      f"{med(lat(runs, f'update.{k}.rwx_us')):.1f} |")
        r10k = runs[-1]["register_10000"]
        md.append("")
        md.append(f"First calls of the 10,000 sites, until all were patched: "
                  f"{med(lat(runs, 'register_10000.ms')):.1f} ms, in {int(r10k['batches'])} batches "
                  f"({int(r10k['core_syncs'])} core syncs, {int(r10k['mprotects'])} `mprotect`).\n")

        md.append("### Page windows: 100 sites on 100 pages\n")
        md.append("| layout | `update` p50 (µs) | `mprotect` per update | pages writable (µs) | VMAs after |")
        md.append("|---|---:|---:|---:|---:|")
        for label, k in [("pages contiguous: one window", "contiguous"),
                         ("pages apart: one window per page", "gapped")]:
            w = runs[-1]["windows"][k]
            md.append(f"| {label} | {cell('windows.' + k + '.time_us')} | {int(w['mprotects'])} | "
                      f"{med(lat(runs, 'windows.' + k + '.rwx_us')):.1f} | {int(w['vmas_after'])} |")

        if all("rwx_windows" in r for r in runs):
            md.append("")
            md.append("### How long code pages stay writable (`stats().rwx_windows`)\n")
            md.append("Every window, from the first `mprotect` to the second, is counted in a log2 "
                      "histogram; the quantiles below are bucket upper bounds (µs), the median over "
                      "rounds with the min–max. The storm is 8 threads updating keys of their own "
                      "(one patched site each) on this machine's CPUs, so that updaters are "
                      "preempted, some inside their windows.\n")
            md.append("| load | windows | p50 (µs) | p99 (µs) | max (µs) |")
            md.append("|---|---:|---:|---:|---:|")
            def wcell(k, q):
                v = lat(runs, f"rwx_windows.{k}.{q}_us")
                sp = spread(v, "{:.1f}")
                return f"{med(v):.1f}" + (f" ({sp})" if sp else "")
            for label, k in [("updates one at a time", "quiet"), ("update storm, 8 threads", "storm")]:
                n = med(lat(runs, f"rwx_windows.{k}.windows"))
                md.append(f"| {label} | {int(n)} | "
                          + " | ".join(wcell(k, q) for q in ["p50", "p99", "max"]) + " |")

        m = runs[-1]["memory"]
        fc = runs[-1]["first_call"]
        md.append("")
        md.append("### Memory and mappings\n")
        md.append(f"- Key: {int(m['key_bytes'])} bytes (`StaticCall<F>`; the static that "
                  f"`define_static_call!` makes is {int(m['key_static_bytes'])} bytes).")
        md.append(f"- Registry: {int(m['registry_slots'])} slots × 64 bytes = {int(m['registry_kib'])} KiB. "
                  f"Anonymous RSS went from {int(m['rss_anon_start_kib'])} KiB to "
                  f"{int(m['rss_anon_init_kib'])} KiB at `init()`, before any site registered.")
        md.append(f"- {int(fc['sites'])} fresh sites on {int(fc['pages'])} code pages: "
                  f"+{int(fc['rss_anon_kib'])} KiB anonymous RSS, of which {int(fc['text_cow_kib'])} KiB "
                  f"are private copies of the code pages written.")
        md.append(f"- 10,000 sites: +{int(r10k['rss_anon_kib'])} KiB anonymous RSS, "
                  f"{int(r10k['text_cow_kib'])} KiB of it private code pages.")
        md.append(f"- Mappings (lines of /proc/self/maps): {int(m['vmas_start'])} at start, "
                  f"{int(fc['vmas_before'])} before the first patch, {int(fc['vmas_after'])} after "
                  f"patching {int(fc['pages'])} pages, {int(m['vmas_end'])} at the end "
                  f"({int(m['sites'])} sites).")

    if icount:
        md.append("")
        md.append("### Instructions per call (callgrind, `scripts/icount.py`)\n")
        md.append("| loop iteration (call + `dec; jne`) | instructions | vs direct |")
        md.append("|---|---:|---:|")
        for label, k in [("direct call", "direct"), ("patched static call", "static_patched"),
                         ("`AtomicPtr` fn pointer", "atomic_ptr"),
                         ("unpatched static call", "static_unpatched")]:
            md.append(f"| {label} | {icount[k]:.2f} | {icount[k] - icount['direct']:+.2f} |")
        if "direct_rust" in icount:
            for label, k in [("direct call of a Rust function (not inlined)", "direct_rust"),
                             ("patched static call, Rust key", "static_rust"),
                             ("unpatched static call, Rust key", "static_unpatched_rust")]:
                md.append(f"| {label} | {icount[k]:.2f} | {icount[k] - icount['direct_rust']:+.2f} |")

    # Goals.
    md.append("")
    md.append("### Goals (issues 5 and 10)\n")
    md.append("| goal | measured | met |")
    md.append("|---|---|:---:|")

    def goal(name, value, ok):
        md.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")

    r = ratios("call", "static_patched", "direct", rs)
    goal("patched ÷ direct ≤ 1.02", fmt_ratio(r), med(r) <= 1.02)
    if icount:
        goal("≤ 2 extra instructions per call", f"{icount['extra_patched']:+.0f}", icount["extra_patched"] <= 2)
    rr = [a / b for a, b in zip(rp, st)]
    goal("≥ 4× faster than a retpoline call", fmt_ratio(rr), med(rr) >= 4)
    for n in ["1024", "4096"]:
        pa = ratios("pressure" + n, "atomic_ptr", "static_patched", rs)
        pp = [med(ratios("pressure" + n, "atomic_ptr", "static_patched", [p])) for p in places]
        goal(f"faster than `AtomicPtr` under predictor pressure ({int(n):,} sites)",
             "AtomicPtr ÷ static " + fmt_ratio(pa)
             + ("; other placements " + ", ".join(f"{v:.2f}×" for v in pp) if pp else ""),
             med(pa) > 1 and all(v > 1 for v in pp))
    un = series("unpatched", "static_unpatched", rs)
    goal("unpatched ≤ 20 ns", f"{med(un):.1f} ns", med(un) <= 20)
    for label, g, b, base in RUST_GOALS:
        r = ratios(g, b, base, rs)
        if r:
            goal(f"Rust key, {label}: static ÷ direct ≤ 1.02 (issue 10)", fmt_ratio(r), med(r) <= 1.02)
    if runs:
        fp = lat(runs, "first_call.patched_us.p50")
        goal("first call → patched p50 ≤ 25 µs", f"{med(fp):.1f} µs", med(fp) <= 25)
        u1 = lat(runs, "update.1.time_us.p50")
        goal("`update` 1 site ≤ 10 µs", f"{med(u1):.1f} µs", med(u1) <= 10)
        u = runs[-1]["update"]["10000"]
        u10 = lat(runs, "update.10000.time_us.p50")
        goal("`update` 10,000 sites ≤ 5 ms", f"{med(u10) / 1000:.2f} ms", med(u10) <= 5000)
        goal("≤ 2 `mprotect` per page, 1 sync per batch",
             f"{u['mprotects'] / u['pages']:.2f} per page, {int(u['core_syncs'])} sync",
             u["mprotects"] / u["pages"] <= 2 and u["core_syncs"] == 1)
        goal("key ≤ 16 bytes", f"{int(runs[-1]['memory']['key_bytes'])} bytes",
             runs[-1]["memory"]["key_bytes"] <= 16)

    chart(chart_rows, pressure_rows)
    md.append("")
    md.append("![cost per call](benchmarks-calls.svg)")
    text = "\n".join(md) + "\n"

    begin, end = "<!-- results:begin (scripts/report.py) -->", "<!-- results:end -->"
    if os.path.exists(DOC) and begin in open(DOC, encoding="utf-8").read():
        doc = open(DOC, encoding="utf-8").read()
        a, b = doc.index(begin) + len(begin), doc.index(end)
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(doc[:a] + "\n" + text + doc[b:])
        print(f"updated {os.path.relpath(DOC, ROOT)} and {os.path.relpath(SVG, ROOT)}")
    else:
        print(text)
        print(f"wrote {os.path.relpath(SVG, ROOT)}")


if __name__ == "__main__":
    main()
