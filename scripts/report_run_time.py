#!/usr/bin/env python3
"""The "Run-time keys" section of docs/benchmarks.md and its chart, from the criterion results of
benches/run_time.rs and the run-time mechanisms of benches/pressure.rs, in a normal build and in
a retpoline build (scripts/bench.sh runs both). Standard library only.

Inputs:
  $CARGO_TARGET_DIR/criterion/<group>/<bench>/<baseline>/{estimates,sample}.json    normal build
  $CARGO_TARGET_DIR/criterion-retpoline/<group>/<bench>/<baseline>/...            retpoline build
Outputs:
  docs/benchmarks-run-time.svg
  docs/benchmarks.md, between the `run-time:begin` and `run-time:end` markers

Each cell is a ratio to the direct call of the same group, within one round of one build: the
median over rounds of criterion's estimate, and (in brackets) the ratio of the fastest samples,
which a loaded machine disturbs least (every sample is CHAIN calls, and one preemption only ever
makes a sample slower).
"""
import glob
import html
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target", "bench-aligned"))
BUILDS = {"normal": os.path.join(TARGET, "criterion"),
          "retpoline": os.path.join(TARGET, "criterion-retpoline")}
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
SVG = os.path.join(ROOT, "docs", "benchmarks-run-time.svg")
PER_ITER = {"runtime": 1000, "pressure1024": 1024, "pressure4096": 4096,
            "pressure1024_mapped": 1024}

RUNTIME_ROWS = [
    ("static_patched", "static call, patched"),
    ("rt_mono", "**run-time key, cached: 1 key (monomorphic stub)**"),
    ("indirect_mono", "run-time key, `call_indirect` (no cache): 1 key"),
    ("rt_poly2", "**cached: 2 keys alternating (2-entry chain)**"),
    ("indirect_poly2", "no cache: 2 keys alternating"),
    ("rt_rot4", "**cached: 4 keys in rotation (megamorphic; a 4-entry chain in retpoline builds)**"),
    ("indirect_rot4", "no cache: 4 keys in rotation"),
    ("rt_rot8", "**cached: 8 keys in rotation (megamorphic; an 8-entry chain in retpoline builds)**"),
    ("indirect_rot8", "no cache: 8 keys in rotation"),
    ("rt_rot16", "**cached: 16 keys in rotation (megamorphic)**"),
    ("indirect_rot16", "no cache: 16 keys in rotation"),
    ("atomic_ptr", "`AtomicPtr` function pointer"),
    ("dyn_trait", "`&dyn Trait`"),
]
PRESSURE_ROWS = [
    ("static_patched", "static calls, patched"),
    ("run_time_guarded", "**run-time keys, cached (one monomorphic stub each)**"),
    ("run_time_indirect", "run-time keys, no cache"),
    ("atomic_ptr", "`AtomicPtr`"),
    ("dyn_trait", "`&dyn Trait`"),
]


def baselines(crit, group):
    names = {os.path.basename(p) for p in glob.glob(os.path.join(crit, group, "*", "round*"))}
    return sorted(names, key=lambda r: int(r[5:]))


def load(crit, group, bench, rnd):
    d = os.path.join(crit, group, bench, rnd)
    if not os.path.exists(os.path.join(d, "estimates.json")):
        return None
    est = json.load(open(os.path.join(d, "estimates.json")))
    e = est.get("slope") or est["median"]
    sample = json.load(open(os.path.join(d, "sample.json")))
    fastest = min(t / i for t, i in zip(sample["times"], sample["iters"]))
    n = PER_ITER[group]
    return e["point_estimate"] / n, fastest / n


def ratio(build, group, bench, base="direct"):
    """(median of the per-round ratios of criterion's estimates, ratio of the fastest samples
    over all rounds), or None."""
    crit = BUILDS[build]
    meds, fast_a, fast_b = [], [], []
    for r in baselines(crit, group):
        a, b = load(crit, group, bench, r), load(crit, group, base, r)
        if a and b:
            meds.append(a[0] / b[0])
            fast_a.append(a[1])
            fast_b.append(b[1])
    if not meds:
        return None
    return statistics.median(meds), min(fast_a) / min(fast_b)


def ns(build, group, bench):
    crit = BUILDS[build]
    v = [load(crit, group, bench, r) for r in baselines(crit, group)]
    v = [x for x in v if x]
    return (statistics.median(x[0] for x in v), min(x[1] for x in v)) if v else None


def cell(r):
    return "—" if r is None else f"{r[0]:.2f}× ({r[1]:.2f}×)"


def table(rows, group, title_ns=True):
    out = ["| call | normal build | retpoline build |", "|---|---:|---:|"]
    d = {b: ns(b, group, "direct") for b in BUILDS}
    if title_ns:
        out.append("| direct call (ns per call: median (fastest)) | "
                   + " | ".join("—" if d[b] is None else f"{d[b][0]:.2f} ({d[b][1]:.2f})" for b in BUILDS)
                   + " |")
    for bench, label in rows:
        out.append(f"| {label} | " + " | ".join(cell(ratio(b, group, bench)) for b in BUILDS) + " |")
    return out


def verdicts():
    """Where the cache wins, ties and loses against no cache, per build (on the fastest
    samples, the least disturbed)."""
    pairs = [("runtime", "rt_mono", "indirect_mono", "1 key"),
             ("runtime", "rt_poly2", "indirect_poly2", "2 keys"),
             ("runtime", "rt_rot4", "indirect_rot4", "4 keys"),
             ("runtime", "rt_rot8", "indirect_rot8", "8 keys"),
             ("runtime", "rt_rot16", "indirect_rot16", "16 keys"),
             ("pressure1024", "run_time_guarded", "run_time_indirect", "1,024 sites"),
             ("pressure4096", "run_time_guarded", "run_time_indirect", "4,096 sites")]
    out = ["| case | cached ÷ no cache, normal build | retpoline build |", "|---|---:|---:|"]
    for group, cached, plain, label in pairs:
        cells = []
        for b in BUILDS:
            r = ratio(b, group, cached, base=plain)
            cells.append("—" if r is None else f"{r[0]:.2f} ({r[1]:.2f})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def chart():
    """Bars: ratio to a direct call (fastest samples), per build, for the single-site benches."""
    rows = [(label.strip("*").split(" (")[0], bench) for bench, label in RUNTIME_ROWS]
    w, left, bar, gap = 760, 330, 9, 6
    h = 40 + len(rows) * (2 * bar + gap) + 40
    vals = [ratio(b, "runtime", bench) for _, bench in rows for b in BUILDS]
    top = max([v[1] for v in vals if v] + [2.0])
    scale = (w - left - 60) / top
    colors = {"normal": "#4c78a8", "retpoline": "#e45756"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="16" font-size="13">ratio to a direct call (fastest samples); lower is better</text>']
    y = 30
    for label, bench in rows:
        out.append(f'<text x="{left - 6}" y="{y + bar + 3}" text-anchor="end">{html.escape(label)}</text>')
        for b in BUILDS:
            r = ratio(b, "runtime", bench)
            if r:
                out.append(f'<rect x="{left}" y="{y}" width="{r[1] * scale:.1f}" height="{bar}" fill="{colors[b]}"/>')
                out.append(f'<text x="{left + r[1] * scale + 4:.1f}" y="{y + bar - 1}">{r[1]:.2f}</text>')
            y += bar
        y += gap
    x1 = left + scale
    out.append(f'<line x1="{x1:.1f}" y1="26" x2="{x1:.1f}" y2="{y}" stroke="#888" stroke-dasharray="3,3"/>')
    for i, b in enumerate(BUILDS):
        out.append(f'<rect x="{left + i * 120}" y="{y + 12}" width="10" height="10" fill="{colors[b]}"/>')
        out.append(f'<text x="{left + i * 120 + 14}" y="{y + 21}">{b} build</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if not any(baselines(c, "runtime") for c in BUILDS.values()):
        sys.exit("no results for benches/run_time.rs: run scripts/bench.sh")
    lines = ["", "![run-time keys: ratio to a direct call](benchmarks-run-time.svg)", "",
             "One site, dependent chain (`benches/run_time.rs`); each cell: median ratio to a direct "
             "call over rounds (ratio of the fastest samples):", ""]
    lines += table(RUNTIME_ROWS, "runtime")
    for group, what in [("pressure1024", "1,024 sites, one key each, round-robin"),
                        ("pressure4096", "4,096 sites, one key each, round-robin"),
                        ("pressure1024_mapped", "1,024 sites whose stubs are in mapped pages, past the reserve")]:
        lines += ["", f"{what} (`benches/pressure.rs`):", ""]
        rows = PRESSURE_ROWS if group != "pressure1024_mapped" else [("run_time_guarded", PRESSURE_ROWS[1][1])]
        lines += table(rows, group, title_ns=False)
    lines += ["", "The cache against no cache (`cached ÷ call_indirect`, median (fastest)): below 1 "
              "it wins, above 1 it loses.", ""]
    lines += verdicts()
    text = open(DOC).read()
    begin, end = "<!-- run-time:begin (scripts/report_run_time.py) -->", "<!-- run-time:end -->"
    a, b = text.index(begin) + len(begin), text.index(end)
    open(DOC, "w").write(text[:a] + "\n".join(lines) + "\n\n" + text[b:])
    open(SVG, "w").write(chart())
    print(f"wrote {DOC} (run-time section) and {SVG}")


if __name__ == "__main__":
    main()
