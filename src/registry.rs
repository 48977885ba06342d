//! The site registry: every call site that has reached the trampoline, found by the address of
//! its `call` instruction.
//!
//! A fixed-size open-addressing hash table with linear probing, mapped once when the library
//! initialises and never freed, moved or shrunk, so a slot's index is stable for the life of the
//! process. Its pages are mapped by the kernel as slots are first written; the hash spreads
//! sites over the table, so each of the first few hundred sites touches a page of its own. The trampoline's slow path looks sites up and claims new slots here without a lock:
//! one probe sequence of loads for a known site (no store to any shared cache line), one
//! compare-exchange for a new one.
//!
//! Who writes each field of a [`Slot`]:
//! - `site`: `0 → call address` once, by the thread whose compare-exchange claims the slot.
//!   Never changes again (except in a forked child's reset, where no other thread exists).
//! - `key`, `kind`: by the claimer, before it publishes the slot with a `Release` store of
//!   `state`. For a run-time site (`Kind::RunTime`), `key` is only the address of the key its
//!   first call had, which may since have been freed: it is never dereferenced
//!   ([`Slot::static_key`] returns `None` for such a site).
//! - `seen` (run-time sites only): the target the key held at the site's latest visit to the
//!   slow path (its first call, or a miss of its guard stub), and how many visits since the
//!   patcher last looked. Written lock-free by the slow path (one compare-exchange, which fails
//!   harmlessly when it races) and by the patcher under the lock; see `guard.rs`.
//! - `state`: by the slow path and the patcher, following this machine:
//!
//!   ```text
//!   CLAIMING --queued--> QUEUED --patcher--> SETTLED
//!       |                  ^
//!       +--queue full--> RETRY   (a later call of the site queues it again)
//!   CLAIMING --patching off--> SETTLED   (the claimer writes `info` first)
//!   SETTLED --enough misses of a run-time site's guard stub--> QUEUED (or RETRY)
//!   ```
//!   The last row is the only way back from SETTLED: the slow path moves a run-time site whose
//!   stub keeps missing back to QUEUED with one compare-exchange (`Release`, publishing `seen`),
//!   so that the patcher gives it a new stub (`guard.rs`).
//! - `next`, `info`, `aux`: only under the patch lock (`patcher.rs`), except that the claimer of
//!   a brand-new slot may write `info` before its `Release` store of `SETTLED`: nobody else looks
//!   at a slot's `info` until they have seen `SETTLED` with `Acquire`.

#[cfg(not(all(test, loom)))]
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
// Model checking (`RUSTFLAGS="--cfg loom" cargo test --release --lib loom`, see `loom_tests`):
// the same code on loom's atomics, which explore every interleaving and every value a load may
// return under the orderings used.
#[cfg(all(test, loom))]
use loom::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::key::RawKey;

/// The slot is being filled in by the thread that claimed it.
pub(crate) const CLAIMING: u32 = 0;
/// The slot's index is in the patch queue.
pub(crate) const QUEUED: u32 = 1;
/// The queue was full; the next call of the site queues it again.
pub(crate) const RETRY: u32 = 2;
/// The patcher (or a claimer, with patching off) has decided the site's fate; see `info`.
pub(crate) const SETTLED: u32 = 3;

/// How many slots the patch queue and the registry hold by default.
pub(crate) const DEFAULT_CAPACITY: usize = 1 << 14;
/// A lookup gives up after this many occupied slots: the table is too full to be worth it.
const MAX_PROBES: usize = 256;

/// One registered site. 64 bytes (asserted below).
#[repr(C, align(64))]
pub(crate) struct Slot {
    /// Address of the site's five rewritable bytes (its `call`, or its `jmp`); 0 while the slot
    /// is free.
    pub site: AtomicUsize,
    /// The key the site was first called with.
    pub key: AtomicPtr<RawKey>,
    /// `CLAIMING`, `QUEUED`, `RETRY` or `SETTLED`.
    pub state: AtomicU32,
    /// (patch lock) Index + 1 of the next slot in the same key's site list; 0 ends the list.
    pub next: AtomicU32,
    /// (patch lock) The patcher's record of the site, see `patcher::Info`.
    pub info: AtomicU64,
    /// The kind of site (`kinds::Kind` as a number), named by the trampoline entry it reached.
    pub kind: AtomicU32,
    /// (patch lock) What the patcher keeps about a site of this kind (see `kinds.rs`).
    pub aux: [AtomicU64; 2],
    /// Run-time sites only: the target last seen and the misses since (see `guard::Seen`).
    pub seen: AtomicU64,
}

impl Slot {
    /// The key a site of a kind whose bytes bind a static key belongs to; `None` for a run-time
    /// site, whose key may be freed by now and must never be dereferenced.
    pub fn static_key(&self) -> Option<&'static RawKey> {
        if self.kind.load(Ordering::Relaxed) == crate::kinds::Kind::RunTime as u32 {
            return None;
        }
        // SAFETY: for call and tail sites `key` is set from a `&'static RawKey` (their bytes bind
        // a static, or a field of one) before the slot leaves CLAIMING, and callers only look at
        // slots past CLAIMING.
        Some(unsafe { &*self.key.load(Ordering::Relaxed) })
    }
}

#[cfg(not(all(test, loom)))]
const _: () = assert!(size_of::<Slot>() == 64, "one slot per cache line");

/// The outcome of [`Registry::find_or_claim`].
pub(crate) enum Lookup<'a> {
    /// The site was registered before.
    Found(&'a Slot, u32),
    /// The caller claimed a free slot for the site and must fill it in.
    Claimed(&'a Slot, u32),
    /// No room: the site stays unregistered (and on the trampoline).
    Full,
}

pub(crate) struct Registry {
    slots: &'static [Slot],
    shift: u32,
    /// Sites registered, for `status()`. Relaxed: a statistic.
    pub count: AtomicUsize,
}

impl Registry {
    /// A registry for `capacity` sites (rounded up to a power of two, at least 64).
    pub fn new(capacity: usize) -> Registry {
        let capacity = capacity.clamp(64, 1 << 30).next_power_of_two();
        Registry::exactly(capacity)
    }

    /// A registry of exactly `capacity` slots, a power of two (at least 2).
    fn exactly(capacity: usize) -> Registry {
        debug_assert!(capacity.is_power_of_two() && capacity >= 2);
        Registry {
            slots: free_slots(capacity),
            shift: 64 - capacity.trailing_zeros(),
            count: AtomicUsize::new(0),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Fibonacci hashing of the call address (always 8-aligned).
    fn home(&self, site: usize) -> usize {
        (((site >> 3) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// Finds the slot of `site`, claiming a free one if it has none. Lock-free and
    /// async-signal-safe: loads along the probe sequence, one compare-exchange to claim.
    pub fn find_or_claim(&self, site: usize) -> Lookup<'_> {
        debug_assert!(site != 0);
        let mask = self.slots.len() - 1;
        let mut i = self.home(site);
        for _ in 0..MAX_PROBES.min(self.slots.len()) {
            let slot = &self.slots[i];
            // Acquire pairs with the claimer's compare-exchange, so that a later Acquire load of
            // `state` that sees QUEUED/SETTLED also sees `key`.
            let cur = slot.site.load(Ordering::Acquire);
            if cur == site {
                return Lookup::Found(slot, i as u32);
            }
            if cur == 0 {
                match slot
                    .site
                    .compare_exchange(0, site, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        self.count.fetch_add(1, Ordering::Relaxed);
                        return Lookup::Claimed(slot, i as u32);
                    }
                    Err(other) if other == site => return Lookup::Found(slot, i as u32),
                    Err(_) => {}
                }
            }
            i = (i + 1) & mask;
        }
        Lookup::Full
    }

    pub fn slot(&self, index: u32) -> &Slot {
        &self.slots[index as usize]
    }

    /// Every claimed slot, with its index. For diagnostics and the fork handler.
    pub fn claimed(&self) -> impl Iterator<Item = (u32, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.site.load(Ordering::Acquire) != 0)
            .map(|(i, s)| (i as u32, s))
    }
}

/// `capacity` free slots in fresh anonymous memory. Zero pages are free slots, and the kernel
/// maps a page only when a slot on it is first written, so an unused registry costs no memory.
/// (The global allocator would not do: for `Slot`'s 64-byte alignment, its `alloc_zeroed`
/// allocates and then writes zeros over every page.)
#[cfg(not(all(test, loom)))]
fn free_slots(capacity: usize) -> &'static [Slot] {
    let bytes = capacity * size_of::<Slot>();
    // SAFETY: a fresh private anonymous mapping: no other reference to it exists.
    let ptr = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        panic!(
            "static_call: cannot map a site registry of {bytes} bytes: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the mapping is `bytes` long, page-aligned (so aligned for `Slot`) and reads as
    // zeros, and all-zero bytes are a valid free `Slot` (atomics holding 0, a null pointer). It
    // is never unmapped: the registry lives as long as the process (tests leak theirs).
    unsafe { core::slice::from_raw_parts(ptr as *const Slot, capacity) }
}

/// `capacity` free slots, built one by one: loom's atomics are not plain memory, so zeroed bytes
/// are not loom atomics holding 0.
#[cfg(all(test, loom))]
fn free_slots(capacity: usize) -> &'static [Slot] {
    (0..capacity)
        .map(|_| Slot {
            site: AtomicUsize::new(0),
            key: AtomicPtr::new(core::ptr::null_mut()),
            state: AtomicU32::new(CLAIMING),
            next: AtomicU32::new(0),
            info: AtomicU64::new(0),
            kind: AtomicU32::new(0),
            aux: [AtomicU64::new(0), AtomicU64::new(0)],
            seen: AtomicU64::new(0),
        })
        .collect::<Vec<_>>()
        .leak()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn finds_what_it_claimed_and_fills_up() {
        let r = Registry::new(64);
        let mut claimed = Vec::new();
        for n in 1..=64usize {
            match r.find_or_claim(n * 8) {
                Lookup::Claimed(_, i) => claimed.push(i),
                _ => panic!("site {n} not claimed"),
            }
        }
        claimed.sort();
        claimed.dedup();
        assert_eq!(claimed.len(), 64);
        for n in 1..=64usize {
            match r.find_or_claim(n * 8) {
                Lookup::Found(s, _) => assert_eq!(s.site.load(Ordering::Relaxed), n * 8),
                _ => panic!("site {n} lost"),
            }
        }
        assert!(matches!(r.find_or_claim(65 * 8), Lookup::Full));
        assert_eq!(r.claimed().count(), 64);
        assert_eq!(r.count.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn concurrent_claims_of_one_site_agree() {
        const THREADS: usize = 8;
        const SITES: usize = 500;
        let r = Registry::new(4096);
        let claims = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    for n in 1..=SITES {
                        if let Lookup::Claimed(..) = r.find_or_claim(n * 8) {
                            claims.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(claims.load(Ordering::Relaxed), SITES);
        assert_eq!(r.claimed().count(), SITES);
    }
}

/// Model checks with loom: every interleaving of two spawned threads and the main thread, and
/// every value each load may return under the orderings used (loom's C11 model), on a tiny table.
/// The slow path's and the patcher's uses of a slot (`trampoline.rs`, `patcher.rs`) are restated
/// here with the same orderings; keep them in step. Run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    // A plain Arc: its reference counts are not what is being checked, and loom's would add
    // scheduling points to every model.
    use std::sync::Arc;

    use loom::thread;

    const SLOTS: usize = 4;

    /// A new registry of `SLOTS` slots, and the first `n` call addresses (8-aligned, non-zero)
    /// whose home slot is `home`.
    fn setup(home: usize, n: usize) -> (Arc<Registry>, Vec<usize>) {
        let r = Registry::exactly(SLOTS);
        let sites = (1..)
            .map(|i| i * 8)
            .filter(|&site| r.home(site) == home)
            .take(n)
            .collect();
        (Arc::new(r), sites)
    }

    /// A stand-in key address; never dereferenced.
    fn key(n: usize) -> *mut RawKey {
        core::ptr::without_provenance_mut(0x1000 * n)
    }

    /// `find_or_claim` as (claimed?, index), checking that the slot is the index's.
    fn claim(r: &Registry, site: usize) -> Option<(bool, u32)> {
        let (claimed, slot, index) = match r.find_or_claim(site) {
            Lookup::Claimed(slot, index) => (true, slot, index),
            Lookup::Found(slot, index) => (false, slot, index),
            Lookup::Full => return None,
        };
        assert!(core::ptr::eq(slot, r.slot(index)));
        Some((claimed, index))
    }

    /// Runs `f(site)` for each site on its own thread, the last on the model's main thread.
    fn race<T: Send + 'static>(
        r: &Arc<Registry>,
        sites: [usize; 3],
        f: fn(&Registry, usize) -> T,
    ) -> [T; 3] {
        let spawn = |site| {
            let r = r.clone();
            thread::spawn(move || f(&r, site))
        };
        let (a, b) = (spawn(sites[0]), spawn(sites[1]));
        let c = f(r, sites[2]);
        [a.join().unwrap(), b.join().unwrap(), c]
    }

    /// Three threads register one site: exactly one claims it, and all get the same slot.
    #[test]
    fn loom_one_claimer_per_site() {
        loom::model(|| {
            let (r, s) = setup(SLOTS - 1, 1);
            let got = race(&r, [s[0]; 3], |r, site| claim(r, site).expect("room"));
            assert_eq!(got.iter().filter(|(claimed, _)| *claimed).count(), 1);
            assert!(got.iter().all(|&(_, index)| index == got[0].1));
            assert_eq!(r.slot(got[0].1).site.load(Ordering::Relaxed), s[0]);
            assert_eq!(r.count.load(Ordering::Relaxed), 1);
            assert_eq!(r.claimed().count(), 1);
        });
    }

    /// Two sites with the same home slot, the first registered by two threads: each site gets
    /// exactly one claimer and its own slot, and later lookups find both where they were claimed.
    #[test]
    fn loom_colliding_sites_get_their_own_slots() {
        loom::model(|| {
            let (r, s) = setup(0, 2);
            let [x0, x1, y] = race(&r, [s[0], s[0], s[1]], |r, site| {
                claim(r, site).expect("room")
            });
            assert!(x0.0 != x1.0, "exactly one claimer of the first site");
            assert_eq!(x0.1, x1.1);
            assert!(y.0, "the second site is claimed by its only caller");
            assert_ne!(x0.1, y.1);
            assert_eq!(claim(&r, s[0]), Some((false, x0.1)));
            assert_eq!(claim(&r, s[1]), Some((false, y.1)));
            assert_eq!(r.count.load(Ordering::Relaxed), 2);
        });
    }

    /// One free slot left and two new sites: exactly one gets it, the other is told `Full`, and a
    /// site registered before is still found meanwhile.
    #[test]
    fn loom_last_free_slot_goes_to_one_site() {
        loom::model(|| {
            let (r, s) = setup(1, SLOTS + 1);
            for &site in &s[..SLOTS - 1] {
                assert!(matches!(claim(&r, site), Some((true, _))));
            }
            let got = race(&r, [s[SLOTS - 1], s[SLOTS], s[0]], claim);
            match (got[0], got[1]) {
                (Some((true, _)), None) | (None, Some((true, _))) => {}
                other => panic!("both or neither new site got the last slot: {other:?}"),
            }
            assert!(matches!(got[2], Some((false, _))));
            assert_eq!(r.count.load(Ordering::Relaxed), SLOTS);
        });
    }

    /// The slow path for a site called with key `n` (`trampoline::register`): the claimer records
    /// the key, then publishes QUEUED; a thread that finds the slot QUEUED (Acquire) must see the
    /// key. Returns the key this thread stored (claimer) or saw (finder), or 0.
    fn register(r: &Registry, site: usize, n: usize, queued: Ordering) -> usize {
        match r.find_or_claim(site) {
            Lookup::Claimed(slot, _) => {
                slot.key.store(key(n), Ordering::Relaxed);
                slot.state.store(QUEUED, queued);
                key(n) as usize
            }
            Lookup::Found(slot, _) => {
                if slot.state.load(Ordering::Acquire) == QUEUED {
                    let seen = slot.key.load(Ordering::Relaxed);
                    assert!(!seen.is_null(), "QUEUED seen before the key");
                    seen as usize
                } else {
                    0
                }
            }
            Lookup::Full => unreachable!(),
        }
    }

    /// Two threads call one new site with different keys while the patcher looks at the slot
    /// (a claimed slot whose state is QUEUED, as its retry pass and `sites()` look at slots):
    /// whoever sees QUEUED sees the claimer's key.
    fn publication(queued: Ordering) {
        loom::model(move || {
            let (r, s) = setup(2, 1);
            let (r1, r2) = (r.clone(), r.clone());
            let site = s[0];
            let a = thread::spawn(move || register(&r1, site, 1, queued));
            let b = thread::spawn(move || register(&r2, site, 2, queued));
            // The patcher.
            let slot = r.slot(2);
            if slot.site.load(Ordering::Acquire) == site
                && slot.state.load(Ordering::Acquire) == QUEUED
            {
                assert!(!slot.key.load(Ordering::Relaxed).is_null());
            }
            let seen = [a.join().unwrap(), b.join().unwrap()];
            let stored = slot.key.load(Ordering::Relaxed) as usize;
            assert_eq!(slot.state.load(Ordering::Relaxed), QUEUED);
            assert!(stored == key(1) as usize || stored == key(2) as usize);
            // The claimer returns its key; the other thread the same key, or 0 (not QUEUED yet).
            assert!(seen.contains(&stored));
            assert!(seen.iter().all(|&k| k == stored || k == 0));
        });
    }

    #[test]
    fn loom_key_is_visible_with_queued() {
        publication(Ordering::Release);
    }

    /// The model has teeth: were QUEUED stored Relaxed, loom finds an execution in which another
    /// thread sees QUEUED but not the key.
    #[test]
    #[should_panic(expected = "QUEUED seen before the key")]
    fn loom_relaxed_queued_would_be_caught() {
        publication(Ordering::Relaxed);
    }

    /// `trampoline::requeue` and the patcher's retry pass (`patcher::drain_locked`): RETRY ->
    /// QUEUED by compare-exchange. Returns whether this thread moved the slot; if so it must see
    /// the key the claimer stored before its Release store of RETRY.
    fn take_retry(slot: &Slot) -> bool {
        let won = slot
            .state
            .compare_exchange(RETRY, QUEUED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
        if won {
            assert!(
                !slot.key.load(Ordering::Relaxed).is_null(),
                "RETRY taken before the key"
            );
        }
        won
    }

    /// A site waits in RETRY (its first push found the queue full); a call of the site and the
    /// patcher's retry pass race to take it: exactly one does, and sees the key.
    #[test]
    fn loom_retry_is_taken_once() {
        loom::model(|| {
            let (r, s) = setup(3, 1);
            let site = s[0];
            let r1 = r.clone();
            let claimer = thread::spawn(move || {
                let Lookup::Claimed(slot, _) = r1.find_or_claim(site) else {
                    unreachable!()
                };
                slot.key.store(key(1), Ordering::Relaxed);
                slot.state.store(QUEUED, Ordering::Release);
                slot.state.store(RETRY, Ordering::Release); // `trampoline::enqueue`: queue full
            });
            claimer.join().unwrap();
            let r2 = r.clone();
            let caller = thread::spawn(move || match r2.find_or_claim(site) {
                // `trampoline::register`: a Relaxed look first, then the compare-exchange.
                Lookup::Found(slot, _) => {
                    slot.state.load(Ordering::Relaxed) == RETRY && take_retry(slot)
                }
                _ => unreachable!(),
            });
            let slot = r.slot(3);
            let patcher = slot.site.load(Ordering::Acquire) != 0 && take_retry(slot);
            let caller = caller.join().unwrap();
            assert!(caller != patcher, "exactly one takes the site");
            assert_eq!(slot.state.load(Ordering::Relaxed), QUEUED);
        });
    }

    /// The whole cycle, with nothing run in order: two threads call a new site (its first push
    /// finds the queue full, later pushes succeed) while the patcher's retry pass runs. Whoever
    /// takes the site (pushes it, or settles it) sees the key, and the site ends up taken exactly
    /// once, unless it still waits in RETRY for a later call.
    #[test]
    fn loom_retry_cycle_takes_the_site_once() {
        // Push attempts (the first fails), and times the site was taken.
        loom::lazy_static! {
            static ref PUSHES: AtomicUsize = AtomicUsize::new(0);
            static ref TAKEN: AtomicUsize = AtomicUsize::new(0);
        }
        fn enqueue(slot: &Slot) {
            if PUSHES.fetch_add(1, Ordering::Relaxed) > 0 {
                TAKEN.fetch_add(1, Ordering::Relaxed);
            } else {
                slot.state.store(RETRY, Ordering::Release);
            }
        }
        fn call(r: &Registry, site: usize) {
            match r.find_or_claim(site) {
                Lookup::Claimed(slot, _) => {
                    slot.key.store(key(1), Ordering::Relaxed);
                    slot.state.store(QUEUED, Ordering::Release);
                    enqueue(slot);
                }
                Lookup::Found(slot, _) => {
                    if slot.state.load(Ordering::Relaxed) == RETRY && take_retry(slot) {
                        enqueue(slot);
                    }
                }
                Lookup::Full => unreachable!(),
            }
        }
        loom::model(|| {
            let (r, s) = setup(3, 1);
            let site = s[0];
            let (r1, r2) = (r.clone(), r.clone());
            let a = thread::spawn(move || call(&r1, site));
            let b = thread::spawn(move || call(&r2, site));
            // The patcher's retry pass over this slot.
            let slot = r.slot(3);
            if slot.site.load(Ordering::Acquire) != 0 && take_retry(slot) {
                TAKEN.fetch_add(1, Ordering::Relaxed);
                slot.state.store(SETTLED, Ordering::Release);
            }
            a.join().unwrap();
            b.join().unwrap();
            let state = slot.state.load(Ordering::Relaxed);
            let taken = TAKEN.load(Ordering::Relaxed);
            assert_eq!(taken, usize::from(state != RETRY), "state {state}");
        });
    }
}
