//! Near thunks for far targets. A site's `call rel32` reaches ±2 GiB; a target beyond that (a
//! function in another shared library, JIT code) gets a thunk in the code pool (`code_pool.rs`:
//! a reserve in our own text, with CFI, then pages mapped near our code), and the site calls the
//! thunk, which jumps to the target (`arch::thunk`: through the retpoline in a retpoline build).
//!
//! The rule, in three lines:
//! 1. A thunk is written once, into a slot no site has ever called, and never changes after.
//! 2. Thunks are written (and the cores synced) before any site that calls them is written.
//! 3. Retargeting never touches a thunk: the *site* is rewritten (to the target, to another
//!    thunk, or to the trampoline), like any other patch, all or nothing.
//!
//! Thunks are written by the code writer, in an rwx window with a core sync, like sites. They
//! are never freed: one thunk per distinct far target. When no thunk can be made (the pool is
//! used up, or new code is refused), the site stays on the trampoline with
//! `Reason::TargetOutOfRange`, and [`Status::thunk_error`](crate::Status::thunk_error) says why.
//! Guard stubs (`guard.rs`) reach far targets through these same thunks.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::arch::x86_64::{self as arch, THUNK_LEN, WORD};
use crate::code_pool::{self, Pool};
use crate::os::linux::{self, Write, WriteError};
use crate::patcher::Locked;
use crate::runtime::Runtime;

/// What an unwritten slot holds: `int3` in every byte.
pub(crate) const EMPTY: u64 = u64::from_ne_bytes([0xcc; WORD]);

/// The thunks made so far.
pub(crate) struct Thunks {
    /// `(target, thunk)`, sorted by target.
    made: Vec<(usize, usize)>,
    /// Why the last attempt to make thunks failed: an errno, or 0 when the pool is used up.
    error: Option<i32>,
}

/// Taken only under the patch lock (`lock` asks for the proof), so it is never contended and
/// never held across `fork` (the fork handlers hold the patch lock).
static THUNKS: Mutex<Thunks> = Mutex::new(Thunks::new());

/// Copies of `made.len()` and `error` (-1 for none), for `status()`, which must not wait for the
/// patch lock. Relaxed: each is one number, stored under the lock and read on its own.
static MADE: AtomicUsize = AtomicUsize::new(0);
static ERROR: AtomicI32 = AtomicI32::new(-1);

/// The thunks, for the holder of the patch lock.
pub(crate) fn lock(_: &Locked) -> MutexGuard<'static, Thunks> {
    // Nothing panics while holding it; should something, the table is still consistent (a
    // thunk is recorded only once written).
    THUNKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How many thunks exist and why the last attempt to make more failed, for `status()`.
pub(crate) fn summary() -> (usize, Option<i32>) {
    let error = ERROR.load(Ordering::Relaxed);
    (MADE.load(Ordering::Relaxed), (error >= 0).then_some(error))
}

/// What making code needs from the OS and the pool, passed in so that the bookkeeping can be
/// tested without writing code. Guard stubs (`guard.rs`) use it too.
pub(crate) trait CodeOs {
    /// Takes `len` bytes of empty (`int3`) code within reach of our code, or says why not (an
    /// errno, or 0 when the pool is used up).
    fn take(&mut self, len: usize) -> Result<usize, i32>;
    /// Writes `writes` into code the pool handed out and syncs the cores.
    fn write(&mut self, writes: &mut [Write]) -> Result<(), i32>;
    /// The retpoline thunk to jump through, in a retpoline build.
    fn retpoline(&self) -> Option<usize>;
}

/// The real one: the code pool and the code writer.
pub(crate) struct Linux<'a> {
    pub rt: &'a Runtime,
    pub pool: &'a mut Pool,
}

impl CodeOs for Linux<'_> {
    fn take(&mut self, len: usize) -> Result<usize, i32> {
        self.pool.take(self.rt, len)
    }

    fn write(&mut self, writes: &mut [Write]) -> Result<(), i32> {
        linux::write_batch(writes, self.pool.segments(), self.rt.page).map_err(|e| match e {
            WriteError::Protect(errno) | WriteError::Sync(errno) => errno,
        })
    }

    fn retpoline(&self) -> Option<usize> {
        code_pool::retpoline()
    }
}

/// The writes that put `code` (a multiple of 8 bytes) into the empty slot at `at`.
pub(crate) fn writes_for(at: usize, code: &[u8]) -> impl Iterator<Item = Write> + '_ {
    code.chunks(WORD).enumerate().map(move |(i, word)| Write {
        addr: at + i * WORD,
        insn_at: 0,
        old: EMPTY,
        new: u64::from_ne_bytes(word.try_into().expect("8 bytes")),
        done: false,
    })
}

/// Whether every write to `[at, at + len)` was done (`writes` sorted by address, as
/// `write_batch` leaves them).
pub(crate) fn all_done(writes: &[Write], at: usize, len: usize) -> bool {
    let i = writes.partition_point(|w| w.addr < at);
    writes[i..i + len / WORD].iter().all(|w| w.done)
}

impl Thunks {
    const fn new() -> Thunks {
        Thunks {
            made: Vec::new(),
            error: None,
        }
    }

    /// The thunk that jumps to `target`, if one was made.
    pub fn get(&self, target: usize) -> Option<usize> {
        let i = self.made.binary_search_by_key(&target, |&(t, _)| t).ok()?;
        Some(self.made[i].1)
    }

    /// Makes a thunk for each of `targets` that a site of our object cannot reach directly and
    /// that has none yet, so that `get` finds them. A failure is recorded (see `summary`); the
    /// targets left without a thunk keep their sites on the trampoline.
    pub fn make_for(
        &mut self,
        rt: &Runtime,
        pool: &mut Pool,
        targets: impl IntoIterator<Item = usize>,
    ) {
        let Some((lo, hi)) = rt.object.as_ref().and_then(|o| o.code_span()) else {
            return;
        };
        let mut os = Linux { rt, pool };
        let before = self.made.len();
        match self.make(lo, hi, targets, &mut os) {
            Err(errno) => self.error = Some(errno),
            Ok(()) if self.made.len() > before => self.error = None,
            Ok(()) => {}
        }
        MADE.store(self.made.len(), Ordering::Relaxed);
        ERROR.store(self.error.unwrap_or(-1), Ordering::Relaxed);
    }

    /// `make_for`'s work, with the OS passed in: makes the missing thunks it can, and returns why
    /// some could not be made, if any could not.
    fn make(
        &mut self,
        lo: usize,
        hi: usize,
        targets: impl IntoIterator<Item = usize>,
        os: &mut impl CodeOs,
    ) -> Result<(), i32> {
        let mut wanted: Vec<usize> = targets
            .into_iter()
            .filter(|&t| !arch::reaches(lo, hi, t, 1) && self.get(t).is_none())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut short = Ok(());
        // The slots are taken whatever happens next: one whose write failed halfway is spoiled.
        let mut made: Vec<(usize, usize, [u8; THUNK_LEN])> = Vec::new();
        for &target in &wanted {
            let at = match os.take(THUNK_LEN) {
                Ok(at) => at,
                Err(errno) => {
                    short = Err(errno);
                    break;
                }
            };
            // Out of reach of the retpoline thunk: cannot happen for code within reach of ours.
            if let Some(code) = arch::thunk(at, target, os.retpoline()) {
                made.push((target, at, code));
            }
        }
        if made.is_empty() {
            return short;
        }
        let mut writes: Vec<Write> = made
            .iter()
            .flat_map(|(_, at, code)| writes_for(*at, code))
            .collect();
        os.write(&mut writes)?;
        // `write_batch` sorted the writes by address: a thunk's quadwords are adjacent.
        writes.sort_unstable_by_key(|w| w.addr);
        for &(target, at, _) in &made {
            if all_done(&writes, at, THUNK_LEN) {
                self.made.push((target, at));
            }
        }
        self.made.sort_unstable();
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;
    const LO: usize = 0x5555_0000_0000;
    const HI: usize = 0x5555_0010_0000;
    const FAR: usize = 0x7f00_0000_0000;
    /// The fake pool's size, in pages.
    const PAGES: usize = 4;

    /// A pool of `PAGES` pages below `LO`, "written" into a byte copy, with failures on demand.
    #[derive(Default)]
    struct Fake {
        mapped: Vec<Vec<u8>>,
        next: usize,
        refuse_map: Option<i32>,
        refuse_write: Option<i32>,
        batches: usize,
        retpoline: Option<usize>,
    }

    impl Fake {
        fn base(i: usize) -> usize {
            LO - (i + 1) * PAGE
        }

        /// The page holding `addr`, and the offset of `addr` in it.
        fn page(&self, addr: usize) -> (usize, usize) {
            let i = (0..self.mapped.len())
                .find(|&i| (Fake::base(i)..Fake::base(i) + PAGE).contains(&addr))
                .expect("an address in a mapped page");
            (i, addr - Fake::base(i))
        }

        /// The bytes at `addr`, from the copies.
        fn read(&self, addr: usize, len: usize) -> &[u8] {
            let (i, off) = self.page(addr);
            &self.mapped[i][off..off + len]
        }
    }

    impl CodeOs for Fake {
        fn take(&mut self, len: usize) -> Result<usize, i32> {
            let end = self
                .mapped
                .len()
                .checked_sub(1)
                .map_or(0, |i| Fake::base(i) + PAGE);
            if self.mapped.is_empty() || self.next + len > end {
                if self.mapped.len() == PAGES {
                    return Err(0);
                }
                if let Some(e) = self.refuse_map {
                    return Err(e);
                }
                self.mapped.push(vec![0xcc; PAGE]);
                self.next = Fake::base(self.mapped.len() - 1);
            }
            let at = self.next;
            self.next += len;
            Ok(at)
        }

        fn write(&mut self, writes: &mut [Write]) -> Result<(), i32> {
            if let Some(e) = self.refuse_write {
                return Err(e);
            }
            self.batches += 1;
            writes.sort_unstable_by_key(|w| w.addr);
            for w in writes.iter_mut() {
                let (i, off) = self.page(w.addr);
                let cur = u64::from_ne_bytes(self.mapped[i][off..off + WORD].try_into().unwrap());
                if cur == w.old {
                    self.mapped[i][off..off + WORD].copy_from_slice(&w.new.to_ne_bytes());
                    w.done = true;
                }
            }
            Ok(())
        }

        fn retpoline(&self) -> Option<usize> {
            self.retpoline
        }
    }

    fn thunk_at(at: usize, target: usize) -> [u8; THUNK_LEN] {
        arch::thunk(at, target, None).unwrap()
    }

    #[test]
    fn one_thunk_per_far_target_written_into_slots_in_order() {
        let mut t = Thunks::new();
        let mut os = Fake::default();
        let near = HI + 0x1000;
        assert_eq!(t.make(LO, HI, [FAR, near, FAR + 16, FAR], &mut os), Ok(()));
        assert_eq!((os.mapped.len(), os.batches), (1, 1), "one page, one batch");
        assert_eq!(t.get(near), None, "a near target needs no thunk");
        let (a, b) = (t.get(FAR).unwrap(), t.get(FAR + 16).unwrap());
        assert_eq!((a, b), (Fake::base(0), Fake::base(0) + THUNK_LEN));
        assert_eq!(os.read(a, THUNK_LEN), thunk_at(a, FAR));
        assert_eq!(os.read(b, THUNK_LEN), thunk_at(b, FAR + 16));
        assert_eq!(
            os.read(b + THUNK_LEN, 1),
            [0xcc],
            "the next slot is still empty"
        );

        // Asking again makes nothing; a new target takes the next slot of the same page.
        assert_eq!(t.make(LO, HI, [FAR, FAR + 16], &mut os), Ok(()));
        assert_eq!(os.batches, 1);
        assert_eq!(t.make(LO, HI, [FAR + 32], &mut os), Ok(()));
        assert_eq!(t.get(FAR + 32), Some(b + THUNK_LEN));
        assert_eq!(
            os.read(b + THUNK_LEN, THUNK_LEN),
            thunk_at(b + THUNK_LEN, FAR + 32)
        );
        assert_eq!(os.mapped.len(), 1);
    }

    #[test]
    fn in_a_retpoline_build_thunks_jump_through_the_retpoline() {
        let mut t = Thunks::new();
        let retpoline = LO + 0x40;
        let mut os = Fake {
            retpoline: Some(retpoline),
            ..Fake::default()
        };
        assert_eq!(t.make(LO, HI, [FAR], &mut os), Ok(()));
        let at = t.get(FAR).unwrap();
        assert_eq!(
            os.read(at, THUNK_LEN),
            arch::thunk(at, FAR, Some(retpoline)).unwrap()
        );
    }

    #[test]
    fn the_pool_fills_up_and_then_says_so() {
        let mut t = Thunks::new();
        let mut os = Fake::default();
        let all = PAGES * PAGE / THUNK_LEN;
        assert_eq!(
            t.make(LO, HI, (0..all - 1).map(|i| FAR + 16 * i), &mut os),
            Ok(())
        );
        assert_eq!(os.mapped.len(), PAGES);
        // One slot left: the first of two new targets gets it, the second is refused.
        let (x, y) = (FAR + 16 * all, FAR + 16 * (all + 1));
        assert_eq!(t.make(LO, HI, [x, y], &mut os), Err(0));
        assert!(t.get(x).is_some());
        assert_eq!(t.get(y), None);
        let at = t.get(x).unwrap();
        assert_eq!(os.read(at, THUNK_LEN), thunk_at(at, x));
    }

    #[test]
    fn refusals_leave_targets_without_thunks_and_spoil_no_recorded_one() {
        let mut t = Thunks::new();
        let mut os = Fake {
            refuse_map: Some(libc::EACCES),
            ..Fake::default()
        };
        assert_eq!(t.make(LO, HI, [FAR], &mut os), Err(libc::EACCES));
        assert_eq!(t.get(FAR), None);

        os.refuse_map = None;
        os.refuse_write = Some(libc::EACCES);
        assert_eq!(t.make(LO, HI, [FAR], &mut os), Err(libc::EACCES));
        assert_eq!(t.get(FAR), None, "not recorded: its slot was not written");

        os.refuse_write = None;
        assert_eq!(t.make(LO, HI, [FAR], &mut os), Ok(()));
        let at = t.get(FAR).unwrap();
        assert_eq!(
            at,
            Fake::base(0) + THUNK_LEN,
            "the refused slot stays spoiled"
        );
        assert_eq!(os.read(at, THUNK_LEN), thunk_at(at, FAR));
    }
}
