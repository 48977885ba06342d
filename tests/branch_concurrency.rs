//! Concurrent branch tests and switches: no branch site executed after `enable()` returned
//! takes the off path (nor the on path after `disable()`), and no hook branch taken while its key
//! gains a target reaches a call that does nothing.
//!
//! The switcher moves a key through windows, publishing each (`window`) once it holds: "on
//! (k)" after the k-th `enable()` returned, "switching off (k)" just before `disable()` is called,
//! "off (k)" after it returned, "switching on (k + 1)" before the next `enable()`. A tester
//! reads the window before and after each test of the branch; when both reads see the same stable
//! window, every site it ran in between must have taken the side that window says. (A read that
//! sees `ON(k)` was ordered after `enable()`'s core sync, so the site's bytes it then executes
//! are the patched ones or its stub, which reads the key; a read after it that still sees
//! `ON(k)` means `disable()` had not begun.)
//!
//! Bounded: runs for `RUN_MS` milliseconds (`STATIC_CALL_STRESS_MS` overrides), over `SITES`
//! branch sites, and then on (up to `MAX_RUNS` times as long) only until every tester has
//! checked a test in a stable window of each side: on a loaded 2-core machine a tester can be
//! descheduled through every window of one side, and a run that checked nothing proves nothing.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use static_call::{
    SiteState, define_static_branch, define_static_call, has_target, static_branch, static_call,
};

const RUN_MS: u64 = 2000;
/// The run goes on past `RUN_MS` until every tester checked both sides, but never past this many
/// times `RUN_MS`.
const MAX_RUNS: u32 = 5;
const TESTERS: usize = 3;
/// Branch sites in `test_branch`.
const SITES: u64 = 64;
/// How long the switcher holds each stable window.
const HOLD: Duration = Duration::from_micros(200);

/// Window values: `4k` while the k-th `set(true)` runs (the key being switched on, or a hook
/// given its target), `4k + 1` once it returned, `4k + 2` while the k-th `set(false)` runs,
/// `4k + 3` once it returned. Every value is used once, so a tester that is preempted across
/// several windows never sees the same value before and after (no ABA).
fn window(k: u64, phase: u64) -> u64 {
    4 * k + phase
}

/// The side a stable window says, `None` while switching.
fn side(window: u64) -> Option<bool> {
    match window % 4 {
        1 => Some(true),
        3 => Some(false),
        _ => None,
    }
}

/// Whether the key is being switched off in this window.
fn switching_off(window: u64) -> bool {
    window % 4 == 2
}

fn run_for() -> Duration {
    let ms = std::env::var("STATIC_CALL_STRESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUN_MS);
    Duration::from_millis(ms)
}

define_static_branch!(FLIP: bool = false);

/// One test of `FLIP` through one of `SITES` branch sites: whether it took the on side.
#[inline(never)]
fn test_branch(which: u64) -> Outcome {
    macro_rules! sites {
        ($($n:literal)*) => {
            match which % SITES {
                $($n => (static_branch!(FLIP), false),)*
                _ => unreachable!(),
            }
        };
    }
    sites!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
        32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61
        62 63)
}

/// What one test did: whether it took the on side, and whether it took it but the call behind
/// it (a hook's) did nothing.
type Outcome = (bool, bool);

#[derive(Default, Debug)]
struct Tally {
    tests: u64,
    checked_on: u64,
    checked_off: u64,
    /// Tests inside a stable window that took the other side.
    wrong: u64,
    /// Hook branches taken, while the key was on or being switched on, whose call did nothing.
    dropped: u64,
}

/// Bits of a tester's coverage word: it checked a test in a stable on (off) window.
const CHECKED_ON: u8 = 1;
const CHECKED_OFF: u8 = 2;

/// The two tests of this file share the worker and the code lock; run one at a time so that
/// neither starves the other's switcher on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// Tests branches (through `test`) until `stop`, checking each test that ran inside one window,
/// and recording in `coverage` which sides it checked.
fn tester(
    id: u64,
    window: &AtomicU64,
    stop: &AtomicBool,
    coverage: &AtomicU8,
    test: fn(u64) -> Outcome,
) -> Tally {
    let mut t = Tally::default();
    let mut i = id;
    while !stop.load(Ordering::Relaxed) {
        i = i.wrapping_add(TESTERS as u64);
        // Acquire: what the switcher did before publishing the window happened before this test.
        let before = window.load(Ordering::Acquire);
        let (on, dropped) = test(i);
        let after = window.load(Ordering::Acquire);
        t.tests += 1;
        if before != after {
            continue;
        }
        if dropped && !switching_off(before) {
            t.dropped += 1;
        }
        if let Some(want_on) = side(before) {
            if want_on {
                t.checked_on += 1;
            } else {
                t.checked_off += 1;
            }
            // Relaxed: only the switcher's decision to go on reads it, never a check.
            coverage.fetch_or(
                if want_on { CHECKED_ON } else { CHECKED_OFF },
                Ordering::Relaxed,
            );
            t.wrong += u64::from(on != want_on);
        }
    }
    t
}

/// Runs the testers against a switcher that calls `set(on)` to move the key through its
/// windows, and checks every tally. Returns the number of on/off cycles.
fn run(test: fn(u64) -> Outcome, set: fn(bool)) -> u64 {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let window = AtomicU64::new(self::window(0, 3));
    let stop = AtomicBool::new(false);
    let coverage: [AtomicU8; TESTERS] = [const { AtomicU8::new(0) }; TESTERS];
    let start = Instant::now();
    let (deadline, give_up) = (start + run_for(), start + run_for() * MAX_RUNS);
    let covered = || {
        coverage
            .iter()
            .all(|c| c.load(Ordering::Relaxed) == CHECKED_ON | CHECKED_OFF)
    };
    let mut k = 0;
    std::thread::scope(|s| {
        let testers: Vec<_> = (0..TESTERS as u64)
            .map(|id| {
                let (window, stop, coverage) = (&window, &stop, &coverage[id as usize]);
                s.spawn(move || tester(id, window, stop, coverage, test))
            })
            .collect();
        loop {
            let now = Instant::now();
            if now >= give_up || (now >= deadline && covered()) {
                break;
            }
            k += 1;
            for (on, switching) in [(true, 0), (false, 2)] {
                // SeqCst: the store is globally visible before the switch writes code.
                window.store(self::window(k, switching), Ordering::SeqCst);
                set(on);
                // Release: pairs with the testers' Acquire loads.
                window.store(self::window(k, switching + 1), Ordering::Release);
                let held = Instant::now();
                while held.elapsed() < HOLD {
                    std::hint::spin_loop();
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        for (i, t) in testers.into_iter().map(|t| t.join().unwrap()).enumerate() {
            eprintln!("tester {i}: {t:?}");
            assert_eq!(t.wrong, 0, "tester {i} took the side of an older state");
            assert_eq!(
                t.dropped, 0,
                "tester {i} took a hook branch whose call was a NOP"
            );
            assert!(
                t.checked_on > 0 && t.checked_off > 0,
                "tester {i} never ran inside a stable window of each side: {t:?}"
            );
        }
    });
    eprintln!("{k} on/off cycles in {:?}", start.elapsed());
    assert!(k >= 2, "the switcher must have switched both ways");
    k
}

#[test]
fn no_branch_after_enable_returns_takes_the_off_path() {
    run(test_branch, |on| FLIP.set(on));
    static_call::flush();
    if common::patching() {
        let sites = FLIP.sites();
        assert_eq!(sites.len() as u64, SITES, "{sites:?}");
        assert!(
            sites.iter().all(|s| s.state == SiteState::Patched),
            "{sites:?}"
        );
    }
}

// --- hooks -----------------------------------------------------------------------------------

/// Calls the hook received, per tester thread (`i % TESTERS`).
static REACHED: [AtomicU64; TESTERS] = [const { AtomicU64::new(0) }; TESTERS];

extern "C" fn hook(tester: u64) {
    REACHED[tester as usize].fetch_add(1, Ordering::Relaxed);
}

define_static_call!(HOOK: extern "C" fn(u64) = None);

/// One test through one of 8 hook sites: whether its branch was taken, and whether it was taken
/// but the call behind it did nothing (the call site still, or already, a NOP).
#[inline(never)]
fn test_hook(i: u64) -> Outcome {
    let me = i % TESTERS as u64;
    let before = REACHED[me as usize].load(Ordering::Relaxed);
    macro_rules! sites {
        ($($n:literal)*) => {
            match (i / TESTERS as u64) % 8 {
                $($n => if has_target!(HOOK) {
                    static_call!(HOOK)(me);
                    true
                } else {
                    false
                },)*
                _ => unreachable!(),
            }
        };
    }
    let taken = sites!(0 1 2 3 4 5 6 7);
    (
        taken,
        taken && REACHED[me as usize].load(Ordering::Relaxed) == before,
    )
}

/// While a hook is on, and while it is being given its target (calls are written before
/// branches), a taken hook branch always reaches the hook. (While the target is being removed,
/// a test that took the branch just before may find the call gone: such a test started before
/// the switch, and is not counted.)
#[test]
fn a_hook_branch_never_guards_a_call_that_is_not_there_yet() {
    run(test_hook, |on| {
        if on {
            HOOK.update(hook)
        } else {
            HOOK.set_null()
        }
    });
    static_call::flush();
    if common::patching() {
        let sites = HOOK.sites();
        assert!(
            sites.iter().all(|s| s.state == SiteState::Patched),
            "{sites:?}"
        );
        assert_eq!(
            sites.len(),
            16,
            "8 branch sites and 8 call sites: {sites:?}"
        );
    }
}
