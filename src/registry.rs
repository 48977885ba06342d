//! The site registry: every call site that has reached the trampoline, found by the address of
//! its `call` instruction.
//!
//! A fixed-size open-addressing hash table with linear probing, allocated once when the library
//! initialises and never freed, moved or shrunk, so a slot's index is stable for the life of the
//! process. The trampoline's slow path looks sites up and claims new slots here without a lock:
//! one probe sequence of loads for a known site (no store to any shared cache line), one
//! compare-exchange for a new one.
//!
//! Who writes each field of a [`Slot`]:
//! - `site`: `0 → call address` once, by the thread whose compare-exchange claims the slot.
//!   Never changes again (except in a forked child's reset, where no other thread exists).
//! - `key`: by the claimer, before it publishes the slot with a `Release` store of `state`.
//! - `state`: by the slow path and the patcher, following this machine:
//!
//!   ```text
//!   CLAIMING --queued--> QUEUED --patcher--> SETTLED
//!       |                  ^
//!       +--queue full--> RETRY   (a later call of the site queues it again)
//!   CLAIMING --patching off--> SETTLED   (the claimer writes `info` first)
//!   ```
//! - `next`, `info`: only under the patch lock (`patcher.rs`), except that the claimer of a
//!   brand-new slot may write `info` before its `Release` store of `SETTLED`: nobody else looks
//!   at a slot's `info` until they have seen `SETTLED` with `Acquire`.

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

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
pub(crate) const DEFAULT_CAPACITY: usize = 1 << 16;
/// A lookup gives up after this many occupied slots: the table is too full to be worth it.
const MAX_PROBES: usize = 256;

/// One registered site. 32 bytes.
#[repr(C, align(32))]
pub(crate) struct Slot {
    /// Address of the site's `call` instruction; 0 while the slot is free.
    pub site: AtomicUsize,
    /// The key the site was first called with.
    pub key: AtomicPtr<RawKey>,
    /// `CLAIMING`, `QUEUED`, `RETRY` or `SETTLED`.
    pub state: AtomicU32,
    /// (patch lock) Index + 1 of the next slot in the same key's site list; 0 ends the list.
    pub next: AtomicU32,
    /// (patch lock) The patcher's record of the site, see `patcher::Info`.
    pub info: AtomicU64,
}

impl Slot {
    pub fn key(&self) -> &'static RawKey {
        // SAFETY: `key` is set from a `&'static RawKey` (every key is a static or lives in one)
        // before the slot leaves CLAIMING, and callers only look at slots past CLAIMING.
        unsafe { &*self.key.load(Ordering::Relaxed) }
    }
}

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
    slots: Box<[Slot]>,
    shift: u32,
    /// Sites registered, for `status()`. Relaxed: a statistic.
    pub count: AtomicUsize,
}

impl Registry {
    /// A registry for `capacity` sites (rounded up to a power of two, at least 64).
    pub fn new(capacity: usize) -> Registry {
        let capacity = capacity.clamp(64, 1 << 30).next_power_of_two();
        let layout = std::alloc::Layout::array::<Slot>(capacity).expect("registry size");
        // SAFETY: the layout is non-zero-sized. All-zero bytes are a valid free `Slot` (atomics
        // holding 0, a null pointer), so the zeroed allocation is `capacity` initialised slots
        // and may be owned by a `Box<[Slot]>` with the same layout. Large zeroed allocations
        // come straight from mmap: pages nobody touches cost no memory.
        let slots = unsafe {
            let ptr = std::alloc::alloc_zeroed(layout) as *mut Slot;
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            Box::from_raw(core::ptr::slice_from_raw_parts_mut(ptr, capacity))
        };
        Registry {
            slots,
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

#[cfg(test)]
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
