#!/usr/bin/env python3
"""Instructions per call, counted by callgrind: patched static call vs direct call.

Deterministic (no timing involved), so it doubles as a regression guard:

    scripts/icount.py            # build benches/icount.rs, run it under callgrind, print a table
    scripts/icount.py --check    # also fail unless a patched call costs <= 2 instructions more

Method: benches/icount.rs runs five exported loops (`icount_direct`, `icount_static`,
`icount_atomic_ptr`, and for a Rust key `icount_direct_rust`, `icount_static_rust`) N times each. Callgrind counts the instructions of each loop inclusive of
what it calls; the script runs N1 and N2 = 2 * N1 and divides the difference by N1, which cancels
the one-time cost of a site's first call (trampoline, registration, patching). The `unpatched`
run calls `static_call::unpatch_all()` first, so the static-call loop measures the trampoline
path. Valgrind must see the patched code: `--smc-check=all` (it re-translates code that was
written) and `STATIC_CALL_VALGRIND=patch` (the library switches patching off under valgrind
otherwise).

Writes $STATIC_CALL_BENCH_OUT/icount.json (default target/static-call-bench/).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N1 = 100_000
LOOPS = ["icount_direct", "icount_static", "icount_atomic_ptr", "icount_direct_rust",
         "icount_static_rust", "icount_run_time_guarded", "icount_run_time_indirect"]


def build():
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", os.path.join(ROOT, "target", "bench-aligned"))
    env.setdefault("RUSTFLAGS", "-C llvm-args=-align-loops=64")
    out = subprocess.run(
        ["cargo", "bench", "--no-run", "--bench", "icount", "--message-format=json"],
        cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "icount":
            if msg.get("executable"):
                return msg["executable"]
    sys.exit("icount bench executable not found")


def parse_inclusive(path):
    """Inclusive instruction counts per function, from a callgrind output file: a function's
    own cost lines plus the cost of the calls it makes (callgrind_annotate splits both by
    source file when there is debug info, so the raw format is simpler to add up)."""
    names, incl = {}, {}
    current, call_next = None, False
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fn="):
                m = re.match(r"fn=\((\d+)\)(?: (.*))?", line)
                if m:
                    if m.group(2) is not None:
                        names[m.group(1)] = m.group(2)
                    current = names.get(m.group(1))
                else:
                    current = line[3:]
                continue
            if line.startswith("calls="):
                call_next = True
                continue
            if line and (line[0].isdigit() or line[0] in "+-*"):
                parts = line.split()
                if len(parts) >= 2 and current is not None:
                    incl[current] = incl.get(current, 0) + int(parts[1])
                call_next = False
    return incl


def inclusive_counts(binary, mode, n):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        env = dict(os.environ, STATIC_CALL_VALGRIND="patch")
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--smc-check=all", "--compress-strings=no",
             f"--callgrind-out-file={out}", binary, mode, str(n)],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        incl = parse_inclusive(out)
    counts = {f: incl[f] for f in LOOPS if f in incl}
    missing = [f for f in LOOPS if f not in counts]
    if missing:
        sys.exit(f"callgrind output lacks {missing}")
    return counts


def per_call(binary, mode):
    a = inclusive_counts(binary, mode, N1)
    b = inclusive_counts(binary, mode, 2 * N1)
    return {f: (b[f] - a[f]) / N1 for f in LOOPS}


def main():
    binary = build()
    patched = per_call(binary, "patched")
    unpatched = per_call(binary, "unpatched")
    direct = patched["icount_direct"]
    rows = [
        ("direct call", direct),
        ("patched static call", patched["icount_static"]),
        ("AtomicPtr fn pointer", patched["icount_atomic_ptr"]),
        ("unpatched static call (trampoline)", unpatched["icount_static"]),
        ("run-time key, guard stub", patched["icount_run_time_guarded"]),
        ("run-time key, call_indirect", patched["icount_run_time_indirect"]),
    ]
    rust_direct = patched["icount_direct_rust"]
    rust_rows = [
        ("direct call of a Rust fn (not inlined)", rust_direct),
        ("patched static call, Rust key", patched["icount_static_rust"]),
        ("unpatched static call, Rust key", unpatched["icount_static_rust"]),
    ]
    print("instructions per loop iteration (one call + `dec; jne`), callgrind, inclusive:")
    for name, v in rows:
        print(f"  {name:<40} {v:7.2f}   ({v - direct:+.2f} vs direct)")
    for name, v in rust_rows:
        print(f"  {name:<40} {v:7.2f}   ({v - rust_direct:+.2f} vs direct)")
    result = {
        "direct": direct,
        "static_patched": patched["icount_static"],
        "atomic_ptr": patched["icount_atomic_ptr"],
        "static_unpatched": unpatched["icount_static"],
        "extra_patched": patched["icount_static"] - direct,
        "direct_rust": rust_direct,
        "static_rust": patched["icount_static_rust"],
        "static_unpatched_rust": unpatched["icount_static_rust"],
        "extra_rust": patched["icount_static_rust"] - rust_direct,
        "run_time_guarded": patched["icount_run_time_guarded"],
        "run_time_indirect": patched["icount_run_time_indirect"],
        "n": N1,
    }
    out_dir = os.environ.get("STATIC_CALL_BENCH_OUT", os.path.join(ROOT, "target", "static-call-bench"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "icount.json"), "w") as f:
        json.dump(result, f, indent=1)
    if "--check" in sys.argv and result["extra_patched"] > 2:
        sys.exit(f"a patched call costs {result['extra_patched']:.2f} instructions more than a direct call (goal: <= 2)")


if __name__ == "__main__":
    main()
