#!/usr/bin/env bash
# Runs every benchmark and regenerates the report: the one command behind docs/benchmarks.md.
#
#   scripts/bench.sh            # 3 rounds + 2 placements (about 10 minutes on 2 cores)
#   ROUNDS=1 scripts/bench.sh   # quicker, one round
#
# - Builds the benches in their own target directory with every loop aligned to 64 bytes
#   (`-C llvm-args=-align-loops=64`): where a loop falls relative to cache lines otherwise moves
#   the patched/direct ratio by up to 20%. The flags apply to this build only, never to the
#   repository's tests.
# - Runs the criterion benches (benches/calls.rs, rust.rs, pressure.rs, unpatched.rs, wrappers.rs,
#   and unpatched.rs again with STATIC_CALL_DISABLE=1, for the disabled path) ROUNDS times, each round
#   saved as criterion baseline `roundN`, and benches/latency.rs once per round; the report gives
#   the median over rounds and the spread, ratios always taken within one round.
# - Rebuilds benches/calls.rs and pressure.rs with every function aligned to 32 and to 64 bytes
#   and runs them once more for each (PLACEMENTS), to show how much code placement moves ratios.
# - Rebuilds benches/calls.rs and rust.rs with retpolines (every indirect call and jump through a
#   thunk, as Spectre-v2-mitigated kernels and some security-sensitive builds compile) and runs
#   them once (baseline `retpoline`). On stable rustc that is `-C target-feature=
#   +retpoline-indirect-calls,+retpoline-indirect-branches` (RETPOLINE_FLAGS overrides); rustc
#   warns that this form is being phased out in favour of the nightly-only `-Zretpoline`. The
#   script prints the flag it used, records it, and stops with an error if rustc refuses it or
#   the build has no retpoline thunk. RETPOLINE=0 skips this step.
# - Counts instructions per call with callgrind (scripts/icount.py).
# - Writes the chart (docs/benchmarks-calls.svg) and the results section of docs/benchmarks.md
#   (scripts/report.py).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
# Extra code placements for the per-call benches: every function aligned to 2^N bytes (the
# rounds above use LLVM's default, 16). Straight-line sites (the 1,024-site test) are not
# covered by loop alignment, so their spread across placements is reported instead.
PLACEMENTS=${PLACEMENTS:-"5 6"}
RETPOLINE=${RETPOLINE:-1}
RETPOLINE_FLAGS=${RETPOLINE_FLAGS:-"-C target-feature=+retpoline-indirect-calls,+retpoline-indirect-branches"}
WARMUP=${WARMUP:-0.5}
MEASURE=${MEASURE:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/bench-aligned}
export RUSTFLAGS="-C llvm-args=-align-loops=64"
export STATIC_CALL_BENCH_OUT=${STATIC_CALL_BENCH_OUT:-$CARGO_TARGET_DIR/static-call-bench}
out=$STATIC_CALL_BENCH_OUT
rm -rf "$out" "$CARGO_TARGET_DIR/criterion"
mkdir -p "$out"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "cpus: $(nproc)"
    echo "kernel: $(uname -srm)"
    echo "rustc: $(rustc -V)"
    echo "valgrind: $(valgrind --version 2>/dev/null || echo none)"
    echo "flags: $RUSTFLAGS"
} > "$out/machine.txt"
cat "$out/machine.txt"

cargo bench --no-run --quiet

for round in $(seq 1 "$ROUNDS"); do
    echo "==> round $round/$ROUNDS (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    echo "round $round load before: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"
    for bench in calls rust pressure unpatched wrappers run_time; do
        cargo bench --quiet --bench "$bench" -- --save-baseline "round$round" \
            --warm-up-time "$WARMUP" --measurement-time "$MEASURE" 2>&1 |
            grep -E '^[a-z0-9_]+/|time:' || true
    done
    # The disabled path: patching off from initialisation (group `disabled`).
    STATIC_CALL_DISABLE=1 cargo bench --quiet --bench unpatched -- --save-baseline "round$round" \
        --warm-up-time "$WARMUP" --measurement-time "$MEASURE" 2>&1 |
        grep -E '^[a-z0-9_]+/|time:' || true
    STATIC_CALL_BENCH_OUT="$out/round$round" cargo bench --quiet --bench latency
    echo "round $round load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"
done

main_target=$CARGO_TARGET_DIR
for log2 in $PLACEMENTS; do
    echo "==> placement: functions aligned to $((1 << log2)) bytes"
    CARGO_TARGET_DIR="$main_target/place$log2" CRITERION_HOME="$main_target/criterion" \
        RUSTFLAGS="$RUSTFLAGS -C llvm-args=-align-all-functions=$log2" \
        cargo bench --quiet --bench calls --bench pressure -- --save-baseline "place$((1 << log2))" \
        --warm-up-time "$WARMUP" --measurement-time "$MEASURE" 'call/|pressure' 2>&1 |
        grep -E '^[a-z0-9_]+/|time:' || true
done

if [ "$RETPOLINE" != 0 ]; then
    echo "==> retpoline build: RUSTFLAGS += $RETPOLINE_FLAGS"
    probe=$(mktemp -d)
    echo 'fn main() { let f: fn() = std::hint::black_box(main as fn()); let _ = f; }' > "$probe/p.rs"
    # shellcheck disable=SC2086 # the flags are several words on purpose
    if ! rustc -O $RETPOLINE_FLAGS -o "$probe/p" "$probe/p.rs" 2> "$probe/err"; then
        cat "$probe/err" >&2
        echo "error: rustc refuses the retpoline flags '$RETPOLINE_FLAGS'" >&2
        echo "       (set RETPOLINE_FLAGS to what this rustc takes, e.g. -Zretpoline on nightly, or RETPOLINE=0)" >&2
        exit 1
    fi
    if grep -q warning "$probe/err"; then
        echo "note: rustc warns: $(grep -m1 warning "$probe/err" | sed 's/^warning: //')"
    fi
    rm -rf "$probe"
    echo "retpoline flags: $RETPOLINE_FLAGS" >> "$out/machine.txt"
    # (Built first on its own, so that rustc's warning about the flag, repeated for every crate,
    # stays in a log unless the build fails.)
    if ! CARGO_TARGET_DIR="$main_target/retpoline" RUSTFLAGS="$RUSTFLAGS $RETPOLINE_FLAGS" \
        cargo bench --quiet --bench calls --bench rust --bench wrappers --no-run > "$out/retpoline-build.log" 2>&1; then
        cat "$out/retpoline-build.log" >&2
        echo "error: the retpoline build failed" >&2
        exit 1
    fi
    exe=$(find "$main_target/retpoline/release/deps" -name 'rust-*' -type f -executable | head -1)
    # (grep without -q: with pipefail, `grep -q` stopping early would fail `nm` with SIGPIPE.)
    if ! nm "$exe" | grep retpoline > /dev/null; then
        echo "error: the retpoline build of benches/rust.rs has no retpoline thunk: the flags did not take" >&2
        exit 1
    fi
    CARGO_TARGET_DIR="$main_target/retpoline" CRITERION_HOME="$main_target/criterion" \
        RUSTFLAGS="$RUSTFLAGS $RETPOLINE_FLAGS" \
        cargo bench --quiet --bench calls --bench rust --bench wrappers -- --save-baseline retpoline \
        --warm-up-time "$WARMUP" --measurement-time "$MEASURE" 'call/|rust|wrapper/' 2>&1 |
        grep -E '^[a-z0-9_]+/|time:' || true
fi

# Run-time keys (benches/run_time.rs, and pressure.rs's run-time mechanisms) in a retpoline build
# as well: there an indirect call costs a retpoline, which guard stubs avoid. Own target dir and
# criterion home (scripts/report_run_time.py reads both).
echo "==> run-time keys, retpoline build"
for round in $(seq 1 "$ROUNDS"); do
    CARGO_TARGET_DIR="$main_target/retpoline" CRITERION_HOME="$main_target/criterion-retpoline" \
        RUSTFLAGS="$RUSTFLAGS -C target-feature=+retpoline-indirect-calls,+retpoline-indirect-branches" \
        cargo bench --quiet --bench run_time --bench pressure -- --save-baseline "round$round" \
        --warm-up-time "$WARMUP" --measurement-time "$MEASURE" 'runtime/|pressure' 2>&1 |
        grep -E '^[a-z0-9_]+/|time:' || true
done

echo "==> instruction counts (callgrind)"
scripts/icount.py

echo "==> report"
scripts/report.py
scripts/report_run_time.py
