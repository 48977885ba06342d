#!/usr/bin/env python3
"""Instructions per loop iteration of the branch benches (benches/branches.rs), by callgrind.

    scripts/branch_icount.py           # build, run under callgrind twice, print a table
    scripts/branch_icount.py --check   # also fail unless an off static branch costs <= 3
                                       # instructions more per iteration than the empty loop

Same method as scripts/icount.py: run every exported loop N1 and 2*N1 times
(`branches icount N`), take the difference of the inclusive counts and divide by N1, which
cancels one-time costs. Valgrind must see the patched code: `--smc-check=all` and
`STATIC_CALL_VALGRIND=patch`. Writes $STATIC_CALL_BENCH_OUT/branch_icount.json.
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from icount import ROOT, parse_inclusive  # noqa: E402

N1 = 100_000
LOOPS = [
    ("branches_empty", "empty loop (the work alone)"),
    ("branches_static_off", "static_branch!, off (patched NOP5)"),
    ("branches_atomic_off", "AtomicBool, false"),
    ("branches_log_level_off", "log_enabled!(Trace), level off"),
    ("branches_static_keys_off", "static-keys, off"),
    ("branches_static_on", "static_branch!, on (jmp to the block)"),
    ("branches_atomic_on", "AtomicBool, true"),
    ("branches_static_keys_on", "static-keys, on"),
    ("branches_hook", "has_target! hook, no target"),
    ("branches_log_trace", "log::trace!, level off"),
]


def build():
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", os.path.join(ROOT, "target", "bench-aligned"))
    env.setdefault("RUSTFLAGS", "-C llvm-args=-align-loops=64")
    out = subprocess.run(
        ["cargo", "bench", "--no-run", "--bench", "branches", "--message-format=json"],
        cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "branches":
            if msg.get("executable"):
                return msg["executable"]
    sys.exit("branches bench executable not found")


def counts(binary, n):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        env = dict(os.environ, STATIC_CALL_VALGRIND="patch")
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--smc-check=all", "--compress-strings=no",
             f"--callgrind-out-file={out}", binary, "icount", str(n)],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        incl = parse_inclusive(out)
    missing = [f for f, _ in LOOPS if f not in incl]
    if missing:
        sys.exit(f"callgrind output lacks {missing}")
    return incl


def main():
    binary = build()
    a, b = counts(binary, N1), counts(binary, 2 * N1)
    per = {f: (b[f] - a[f]) / N1 for f, _ in LOOPS}
    empty = per["branches_empty"]
    print("instructions per loop iteration, callgrind, inclusive:")
    for f, what in LOOPS:
        print(f"  {what:<40} {per[f]:7.2f}   ({per[f] - empty:+.2f} vs empty loop)")
    result = dict(per, n=N1, extra_static_off=per["branches_static_off"] - empty)
    out_dir = os.environ.get("STATIC_CALL_BENCH_OUT", os.path.join(ROOT, "target", "static-call-bench"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "branch_icount.json"), "w") as f:
        json.dump(result, f, indent=1)
    if "--check" in sys.argv and result["extra_static_off"] > 3:
        sys.exit(f"an off static branch costs {result['extra_static_off']:.2f} instructions (goal: <= 3)")


if __name__ == "__main__":
    main()
