//! Concurrent calls through run-time sites while another thread updates their keys: no call
//! that starts after an update returned reaches an older target, whatever state each site is in
//! at that moment (on the trampoline, monomorphic, polymorphic, megamorphic) and across every
//! change between them, which the worker makes while the calls go on.
//!
//! Four sites see 1, 2, 3 and 16 keys (heap keys), in rotation (16: more than the longest chain
//! holds in any build). The updater moves every key, in
//! one `Batch`, through three targets: after the `k`-th batch returns it publishes epoch `k`, in
//! which key `j` holds target `(k + j) % 3`. A caller reads the epoch before and after each
//! call; a call that saw epoch `e` before it started may only reach the target of batch `e` or of
//! a later one; when the epoch did not move during the call, that leaves two of the three, and
//! reaching the third is a stale call. The updater pauses between batches so that stubs get hit
//! too (long pauses at first, while the sites still have changes to spend, then short ones), and
//! samples the sites' states, which must include every state (all of them are there once before
//! the first update, when each site has settled for the keys it sees).
//!
//! Bounded: runs for `RUN_MS` milliseconds (`STATIC_CALL_STRESS_MS` overrides), after at most
//! `SETTLE` for the sites to settle.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use static_call::{Batch, SiteState, StaticCall};

const RUN_MS: u64 = 3000;
const CALLERS: usize = 3;
/// Keys each site sees.
const SITE_KEYS: [usize; 4] = [1, 2, 3, 16];
/// Pause between two batches of updates: long for the first `SLOW_BATCHES` (every site settles
/// between two, and is sampled), then short.
const SLOW_PAUSE: Duration = Duration::from_millis(20);
const SLOW_BATCHES: u64 = 20;
const PAUSE: Duration = Duration::from_micros(500);
/// Longest wait for every site to settle before the first update.
const SETTLE: Duration = Duration::from_secs(5);

type Key = StaticCall<extern "C" fn(u64) -> u64>;

extern "C" fn c0(x: u64) -> u64 {
    x << 2
}
extern "C" fn c1(x: u64) -> u64 {
    x << 2 | 1
}
extern "C" fn c2(x: u64) -> u64 {
    x << 2 | 2
}
const TARGETS: [extern "C" fn(u64) -> u64; 3] = [c0, c1, c2];

static EPOCH: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

macro_rules! sites {
    ($($name:ident)*) => {$(
        #[inline(never)]
        fn $name(k: &Key, x: u64) -> u64 {
            std::hint::black_box(stringify!($name));
            k.call_guarded(x)
        }
    )*};
}
sites!(site0 site1 site2 site3);
const SITES: [fn(&Key, u64) -> u64; 4] = [site0, site1, site2, site3];

fn run_for() -> Duration {
    let ms = std::env::var("STATIC_CALL_STRESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUN_MS);
    Duration::from_millis(ms)
}

#[derive(Default, Debug)]
struct Tally {
    calls: u64,
    checked: u64,
    stale: u64,
    wrong_result: u64,
}

fn caller(id: u64, keys: &[&'static Key]) -> Tally {
    let mut t = Tally::default();
    let mut i = id;
    while !STOP.load(Ordering::Relaxed) {
        i += 1;
        let s = (i % 4) as usize;
        let j = ((i / 4) % SITE_KEYS[s] as u64) as usize;
        let x = (id << 40) | i;
        // Acquire: the batch that published `before` happened before this call starts.
        let before = EPOCH.load(Ordering::Acquire);
        let r = SITES[s](keys[j], x);
        let after = EPOCH.load(Ordering::Acquire);
        t.calls += 1;
        if r >> 2 != x {
            t.wrong_result += 1;
            continue;
        }
        let reached = r & 3;
        if after == before {
            t.checked += 1;
            // Allowed: the target of batch `before`, or of batch `before + 1` (in progress).
            let now = (before + j as u64) % 3;
            let next = (before + 1 + j as u64) % 3;
            if reached != now && reached != next {
                t.stale += 1;
            }
        }
    }
    t
}

/// A name for the state of a run-time site, to collect which were seen.
fn state_name(s: &SiteState) -> &'static str {
    match s {
        SiteState::Pending | SiteState::Trampoline(_) => "trampoline",
        SiteState::Monomorphic { .. } => "monomorphic",
        SiteState::Polymorphic { .. } => "polymorphic",
        SiteState::Megamorphic(_) => "megamorphic",
        _ => "other",
    }
}

#[test]
fn no_call_after_update_returns_reaches_an_older_target_in_any_state() {
    let keys: Vec<&'static Key> = (0..16)
        .map(|j| &*Box::leak(Box::new(StaticCall::new(TARGETS[j % 3]))))
        .collect();
    let sites: Vec<usize> = if common::patching() {
        SITES
            .iter()
            .map(|f| common::run_time_sites_in(*f as *const () as usize, 4096)[0])
            .collect()
    } else {
        Vec::new()
    };
    let mut seen = BTreeSet::new();
    let updates = std::thread::scope(|s| {
        let callers: Vec<_> = (0..CALLERS as u64)
            .map(|id| {
                let keys = keys.clone();
                s.spawn(move || caller(id, &keys))
            })
            .collect();
        // Stops the callers however the updater leaves (a failed check panics).
        struct StopOnDrop;
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                STOP.store(true, Ordering::Relaxed);
            }
        }
        let stop = StopOnDrop;
        // Before the first update every site settles in the state its keys give it (1 key:
        // monomorphic; 2 or 3: a chain; 16: megamorphic), so that every state is seen however
        // the scheduler runs what follows: later samples, under load, may miss a short-lived
        // state. Bounded by SETTLE.
        let settle = Instant::now() + SETTLE;
        while common::patching() && Instant::now() < settle {
            static_call::flush();
            let settled: Vec<_> = static_call::run_time_sites()
                .into_iter()
                .filter(|info| sites.contains(&info.address))
                .filter(|info| state_name(&info.state) != "trampoline")
                .collect();
            if settled.len() == sites.len() {
                for info in &settled {
                    common::run_time_state(info.address);
                    seen.insert(state_name(&info.state));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let deadline = Instant::now() + run_for();
        let mut k = 0u64;
        while Instant::now() < deadline {
            k += 1;
            let batch = keys.iter().enumerate().fold(Batch::new(), |b, (j, key)| {
                b.update(*key, TARGETS[((k + j as u64) % 3) as usize])
            });
            batch.commit();
            // Release: pairs with the callers' Acquire loads.
            EPOCH.store(k, Ordering::Release);
            std::thread::sleep(if k <= SLOW_BATCHES { SLOW_PAUSE } else { PAUSE });
            if k <= SLOW_BATCHES || k.is_multiple_of(16) {
                for info in static_call::run_time_sites() {
                    if sites.contains(&info.address) {
                        // The bytes and the reported state agree, at every state.
                        common::run_time_state(info.address);
                        seen.insert(state_name(&info.state));
                    }
                }
            }
        }
        drop(stop);
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
    eprintln!("{updates} updates; states seen: {seen:?}");
    assert!(
        updates >= 3,
        "the updater must have cycled through every target"
    );
    if common::patching() {
        for state in ["monomorphic", "polymorphic", "megamorphic"] {
            assert!(seen.contains(state), "never saw a {state} site: {seen:?}");
        }
    }
}
