//! Concurrent calls and updates: no call that starts after `update` returned reaches an older
//! target, and every call gets its own arguments back.
//!
//! The updater cycles the key through three targets; after the `k`-th update returns it
//! publishes epoch `k` (target `k % 3`). A caller reads the epoch before and after each call.
//! A call that saw epoch `e` before it started may only reach the target of update `e` or of a
//! later one; when the epoch did not move during the call, that leaves two of the three targets,
//! and reaching the third is a stale call.
//!
//! Bounded: runs for `RUN_MS` milliseconds (`STATIC_CALL_STRESS_MS` overrides, for longer
//! torture runs), over `SITES` call sites, a tail site (a `static_call_fn!` wrapper) and a plain
//! load of the target.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use static_call::{SiteState, define_static_call, static_call, static_call_fn};

const RUN_MS: u64 = 3000;
const CALLERS: usize = 3;
/// Static-call sites in `call`.
const SITES: u64 = 64;

extern "C" fn t0(x: u64) -> u64 {
    x << 2
}
extern "C" fn t1(x: u64) -> u64 {
    x << 2 | 1
}
extern "C" fn t2(x: u64) -> u64 {
    x << 2 | 2
}
const TARGETS: [extern "C" fn(u64) -> u64; 3] = [t0, t1, t2];

define_static_call!(HOT: extern "C" fn(u64) -> u64 = t0);
static_call_fn!(fn hot_tail(x: u64) -> u64 = HOT);

static EPOCH: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

fn run_for() -> Duration {
    let ms = std::env::var("STATIC_CALL_STRESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUN_MS);
    Duration::from_millis(ms)
}

/// One call through one of `SITES` static-call sites, the tail site, or a plain load of the
/// target. Each site adds its own offset to the argument, and the caller checks the result
/// carries it.
#[inline(never)]
fn call(which: u64, x: u64) -> u64 {
    macro_rules! sites {
        ($($n:literal)*) => {
            match which % (SITES + 2) {
                $($n => static_call!(HOT)(x + $n) - ($n << 2),)*
                SITES => hot_tail(x),
                _ => HOT.query()(x),
            }
        };
    }
    sites!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
        32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61
        62 63)
}

#[derive(Default, Debug)]
struct Tally {
    calls: u64,
    checked: u64,
    stale: u64,
    wrong_result: u64,
}

fn caller(id: u64) -> Tally {
    let mut t = Tally::default();
    let mut x = id << 40;
    while !STOP.load(Ordering::Relaxed) {
        x += 1;
        // Acquire: the update that published `before` happened before this call starts.
        let before = EPOCH.load(Ordering::Acquire);
        let r = call(x, x);
        let after = EPOCH.load(Ordering::Acquire);
        t.calls += 1;
        if r >> 2 != x {
            t.wrong_result += 1;
            continue;
        }
        let reached = r & 3;
        if after == before {
            t.checked += 1;
            // Allowed: the target of update `before`, or of update `before + 1` (in progress).
            if reached != before % 3 && reached != (before + 1) % 3 {
                t.stale += 1;
            }
        }
    }
    t
}

#[test]
fn no_call_after_update_returns_reaches_an_older_target() {
    let deadline = Instant::now() + run_for();
    let updates = std::thread::scope(|s| {
        let callers: Vec<_> = (0..CALLERS as u64)
            .map(|id| s.spawn(move || caller(id)))
            .collect();
        let mut k = 0u64;
        while Instant::now() < deadline {
            k += 1;
            HOT.update(TARGETS[(k % 3) as usize]);
            // Release: pairs with the callers' Acquire loads.
            EPOCH.store(k, Ordering::Release);
        }
        STOP.store(true, Ordering::Relaxed);
        let tallies: Vec<Tally> = callers.into_iter().map(|c| c.join().unwrap()).collect();
        for (i, t) in tallies.iter().enumerate() {
            eprintln!("caller {i}: {t:?}");
            assert_eq!(t.wrong_result, 0, "caller {i} got another call's result");
            assert_eq!(
                t.stale, 0,
                "caller {i} reached a target older than the last finished update"
            );
            assert!(
                t.checked > 0,
                "caller {i} never made a call that could be checked"
            );
        }
        k
    });
    eprintln!("{updates} updates");
    assert!(
        updates >= 3,
        "the updater must have cycled through every target"
    );

    static_call::flush();
    // Function addresses are not unique (a small `extern "C" fn` may have a copy in each
    // codegen unit), so identify the last target by what it does, then compare the sites with the
    // pointer the key holds.
    let current = HOT.query();
    assert_eq!(current(5), TARGETS[(updates % 3) as usize](5));
    if common::patching() {
        let sites = HOT.sites();
        assert_eq!(sites.len() as u64, SITES + 1, "{sites:?}");
        for s in sites {
            assert_eq!(s.state, SiteState::Patched);
            if common::call_target(s.address).is_some() {
                common::assert_calls(s.address, current as usize, "the last target");
            } else {
                common::assert_jumps(s.address, current as usize, "the last target");
            }
        }
    }
}

// --- Rust keys: a target is two words (what sites call, and the Rust function) ---------------

fn r0(v: &[u64]) -> u64 {
    v[0] << 2
}
fn r1(v: &[u64]) -> u64 {
    v[0] << 2 | 1
}
fn r2(v: &[u64]) -> u64 {
    v[0] << 2 | 2
}
define_static_call!(RUST_HOT: fn(&[u64]) -> u64 = r0);

/// Moves `RUST_HOT` to target `k % 3`, alternating the two ways a Rust key holds a target: a
/// function item (its own adapter) and a function pointer (the pointer stub, which loads the
/// pointer from the key at every call).
fn set_rust_target(k: u64) {
    const FNS: [fn(&[u64]) -> u64; 3] = [r0, r1, r2];
    if k.is_multiple_of(2) {
        RUST_HOT.update_pointer(FNS[(k % 3) as usize]);
    } else {
        match k % 3 {
            0 => RUST_HOT.update(r0),
            1 => RUST_HOT.update(r1),
            _ => RUST_HOT.update(r2),
        }
    }
}

#[inline(never)]
fn call_rust(x: u64) -> u64 {
    static_call!(RUST_HOT)(&[x])
}

/// While the key moves between function items and function pointers (which changes what its
/// sites call, the Rust function, or both), every call gets its own argument back and reaches a
/// target no older than the last finished update.
#[test]
fn rust_key_calls_during_updates_reach_a_current_target() {
    let epoch = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + run_for() / 2;
    std::thread::scope(|s| {
        let callers: Vec<_> = (0..CALLERS as u64)
            .map(|id| {
                let (epoch, stop) = (&epoch, &stop);
                s.spawn(move || {
                    let mut t = Tally::default();
                    let mut x = id << 40;
                    while !stop.load(Ordering::Relaxed) {
                        x += 1;
                        let before = epoch.load(Ordering::Acquire);
                        let r = call_rust(x);
                        let after = epoch.load(Ordering::Acquire);
                        t.calls += 1;
                        if r >> 2 != x {
                            t.wrong_result += 1;
                            continue;
                        }
                        if after == before {
                            t.checked += 1;
                            let reached = r & 3;
                            if reached != before % 3 && reached != (before + 1) % 3 {
                                t.stale += 1;
                            }
                        }
                    }
                    t
                })
            })
            .collect();
        let mut k = 0u64;
        while Instant::now() < deadline {
            k += 1;
            set_rust_target(k);
            epoch.store(k, Ordering::Release);
        }
        stop.store(true, Ordering::Relaxed);
        for (i, c) in callers.into_iter().enumerate() {
            let t = c.join().unwrap();
            eprintln!("rust caller {i}: {t:?}");
            assert_eq!(t.wrong_result, 0, "caller {i} got another call's result");
            assert_eq!(t.stale, 0, "caller {i} reached an older target");
        }
    });
}

fn q0(x: u64) -> u64 {
    x << 2
}
fn q1(x: u64) -> u64 {
    x << 2 | 1
}
define_static_call!(RACED: fn(u64) -> u64 = q0);

/// Two threads update one Rust key at once, each with its own target. Whatever order they
/// finish in, the key ends with the two words of one update: its sites and its `query()` reach
/// the same target. (Without the Rust-key update lock, one thread's adapter could end up next to
/// the other's Rust function.)
#[test]
fn concurrent_updates_of_a_rust_key_leave_it_consistent() {
    let rounds = 1000;
    for round in 0..rounds {
        std::thread::scope(|s| {
            s.spawn(|| RACED.update(q0));
            s.spawn(|| RACED.update(q1));
        });
        let through_sites = static_call!(RACED)(round);
        assert_eq!(
            through_sites,
            (RACED.query())(round),
            "round {round}: sites and query() disagree"
        );
    }
}
