//! Near thunks for far targets. A site's `call rel32` reaches ±2 GiB; a target beyond that (a
//! function in another shared library, JIT code) gets a thunk in a page mapped near our object,
//! and the site calls the thunk, which jumps to the target (`arch::thunk`).
//!
//! The rule, in three lines:
//! 1. A thunk is written once, into a slot no site has ever called, and never changes after.
//! 2. Thunks are written (and the cores synced) before any site that calls them is written.
//! 3. Retargeting never touches a thunk: the *site* is rewritten (to the target, to another
//!    thunk, or to the trampoline), like any other patch, all or nothing.
//!
//! Thunk pages are mapped near our object's code, read-execute and filled with `int3`
//! (`linux::map_code_near`); thunks are written into them by the code writer, in an rwx window
//! with a core sync, like sites. They are never freed: one thunk per distinct far target, at
//! most `MAX_PAGES` pages. When no thunk can be made (the pages are used up, or new code is
//! refused), the site stays on the trampoline with `Reason::TargetOutOfRange`, and
//! [`Status::thunk_error`](crate::Status::thunk_error) says why.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::arch::x86_64::{self as arch, THUNK_LEN, WORD};
use crate::os::linux::{self, Segment, Write, WriteError};
use crate::patcher::Locked;
use crate::runtime::Runtime;

/// Most pages mapped for thunks: 16 pages of 4 KiB hold 4,096 far targets.
const MAX_PAGES: usize = 16;
/// What an unwritten slot holds: `int3` in every byte.
const EMPTY: u64 = u64::from_ne_bytes([0xcc; WORD]);

/// The thunks made so far, and the pages that hold them.
pub(crate) struct Thunks {
    /// `(target, thunk)`, sorted by target.
    made: Vec<(usize, usize)>,
    /// The thunk pages, in the order they were mapped; slots fill them in that order.
    pages: Vec<Segment>,
    /// Slots used so far (written, or spoiled by a failed write).
    used: usize,
    /// Why the last attempt to make thunks failed: an errno, or 0 when `MAX_PAGES` are used.
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

/// What making thunks needs from the OS, passed in so that the bookkeeping can be tested
/// without mapping code.
trait ThunkOs {
    /// Maps an empty (`int3`-filled, read-execute) thunk page within reach of our code.
    fn map_page(&mut self) -> Result<Segment, i32>;
    /// Writes `writes` into the thunk pages `pages` and syncs the cores.
    fn write(&mut self, writes: &mut [Write], pages: &[Segment]) -> Result<(), i32>;
}

/// The real one: `linux::map_code_near` and the code writer.
struct Linux<'a> {
    rt: &'a Runtime,
    lo: usize,
    hi: usize,
}

impl ThunkOs for Linux<'_> {
    fn map_page(&mut self) -> Result<Segment, i32> {
        let (lo, hi) = (self.lo, self.hi);
        linux::map_code_near(lo, hi, self.rt.page, self.rt.page, |at, len| {
            arch::reaches(lo, hi, at, len)
        })
    }

    fn write(&mut self, writes: &mut [Write], pages: &[Segment]) -> Result<(), i32> {
        linux::write_batch(writes, pages, self.rt.page).map_err(|e| match e {
            WriteError::Protect(errno) | WriteError::Sync(errno) => errno,
        })
    }
}

impl Thunks {
    const fn new() -> Thunks {
        Thunks {
            made: Vec::new(),
            pages: Vec::new(),
            used: 0,
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
    pub fn make_for(&mut self, rt: &Runtime, targets: impl IntoIterator<Item = usize>) {
        let Some((lo, hi)) = rt.object.as_ref().and_then(|o| o.code_span()) else {
            return;
        };
        let mut os = Linux { rt, lo, hi };
        let before = self.made.len();
        match self.make(lo, hi, rt.page, targets, &mut os) {
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
        page: usize,
        targets: impl IntoIterator<Item = usize>,
        os: &mut impl ThunkOs,
    ) -> Result<(), i32> {
        let mut wanted: Vec<usize> = targets
            .into_iter()
            .filter(|&t| !arch::reaches(lo, hi, t, 1) && self.get(t).is_none())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(());
        }
        let per_page = page / THUNK_LEN;
        let mut short = Ok(());
        while self.pages.len() * per_page < self.used + wanted.len() {
            if self.pages.len() == MAX_PAGES {
                short = Err(0);
                break;
            }
            match os.map_page() {
                Ok(p) => self.pages.push(p),
                Err(errno) => {
                    short = Err(errno);
                    break;
                }
            }
        }
        wanted.truncate(self.pages.len() * per_page - self.used);
        if wanted.is_empty() {
            return short;
        }
        let slot = |i: usize| self.pages[i / per_page].start + i % per_page * THUNK_LEN;
        let slots: Vec<usize> = (self.used..self.used + wanted.len()).map(slot).collect();
        // The slots are taken whatever happens next: one whose write failed halfway is spoiled.
        self.used += wanted.len();
        let mut writes: Vec<Write> = slots
            .iter()
            .zip(&wanted)
            .flat_map(|(&at, &target)| {
                let code = arch::thunk(target);
                (0..THUNK_LEN / WORD).map(move |i| Write {
                    addr: at + i * WORD,
                    insn_at: 0,
                    old: EMPTY,
                    new: u64::from_ne_bytes(code[i * WORD..][..WORD].try_into().expect("8 bytes")),
                    done: false,
                })
            })
            .collect();
        os.write(&mut writes, &self.pages)?;
        // `write_batch` sorted the writes by address: a thunk's quadwords are adjacent.
        writes.sort_unstable_by_key(|w| w.addr);
        for (&at, &target) in slots.iter().zip(&wanted) {
            let i = writes.partition_point(|w| w.addr < at);
            if writes[i..i + THUNK_LEN / WORD].iter().all(|w| w.done) {
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

    /// Pages below `LO`, "written" into a byte copy, with failures on demand.
    #[derive(Default)]
    struct Fake {
        mapped: Vec<Vec<u8>>,
        refuse_map: Option<i32>,
        refuse_write: Option<i32>,
        batches: usize,
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

    impl ThunkOs for Fake {
        fn map_page(&mut self) -> Result<Segment, i32> {
            if let Some(e) = self.refuse_map {
                return Err(e);
            }
            let start = Fake::base(self.mapped.len());
            self.mapped.push(vec![0xcc; PAGE]);
            Ok(Segment {
                start,
                end: start + PAGE,
                prot: libc::PROT_READ | libc::PROT_EXEC,
            })
        }

        fn write(&mut self, writes: &mut [Write], pages: &[Segment]) -> Result<(), i32> {
            if let Some(e) = self.refuse_write {
                return Err(e);
            }
            self.batches += 1;
            for w in writes.iter_mut() {
                assert!(pages.iter().any(|p| p.contains(w.addr, w.addr + WORD)));
                let (i, off) = self.page(w.addr);
                let cur = u64::from_ne_bytes(self.mapped[i][off..off + WORD].try_into().unwrap());
                if cur == w.old {
                    self.mapped[i][off..off + WORD].copy_from_slice(&w.new.to_ne_bytes());
                    w.done = true;
                }
            }
            Ok(())
        }
    }

    #[test]
    fn one_thunk_per_far_target_written_into_slots_in_order() {
        let mut t = Thunks::new();
        let mut os = Fake::default();
        let near = HI + 0x1000;
        assert_eq!(
            t.make(LO, HI, PAGE, [FAR, near, FAR + 16, FAR], &mut os),
            Ok(())
        );
        assert_eq!((os.mapped.len(), os.batches), (1, 1), "one page, one batch");
        assert_eq!(t.get(near), None, "a near target needs no thunk");
        let (a, b) = (t.get(FAR).unwrap(), t.get(FAR + 16).unwrap());
        assert_eq!((a, b), (Fake::base(0), Fake::base(0) + THUNK_LEN));
        assert_eq!(os.read(a, THUNK_LEN), arch::thunk(FAR));
        assert_eq!(os.read(b, THUNK_LEN), arch::thunk(FAR + 16));
        assert_eq!(
            os.read(b + THUNK_LEN, 1),
            [0xcc],
            "the next slot is still empty"
        );

        // Asking again makes nothing; a new target takes the next slot of the same page.
        assert_eq!(t.make(LO, HI, PAGE, [FAR, FAR + 16], &mut os), Ok(()));
        assert_eq!(os.batches, 1);
        assert_eq!(t.make(LO, HI, PAGE, [FAR + 32], &mut os), Ok(()));
        assert_eq!(t.get(FAR + 32), Some(b + THUNK_LEN));
        assert_eq!(os.read(b + THUNK_LEN, THUNK_LEN), arch::thunk(FAR + 32));
        assert_eq!(os.mapped.len(), 1);
    }

    #[test]
    fn pages_fill_up_to_the_limit_and_then_say_so() {
        let mut t = Thunks::new();
        let mut os = Fake::default();
        let per_page = PAGE / THUNK_LEN;
        let all = MAX_PAGES * per_page;
        assert_eq!(
            t.make(LO, HI, PAGE, (0..all - 1).map(|i| FAR + 16 * i), &mut os),
            Ok(())
        );
        assert_eq!(os.mapped.len(), MAX_PAGES);
        // One slot left: the first of two new targets gets it, the second is refused.
        let (x, y) = (FAR + 16 * all, FAR + 16 * (all + 1));
        assert_eq!(t.make(LO, HI, PAGE, [x, y], &mut os), Err(0));
        assert!(t.get(x).is_some());
        assert_eq!(t.get(y), None);
        assert_eq!(os.read(t.get(x).unwrap(), THUNK_LEN), arch::thunk(x));
    }

    #[test]
    fn refusals_leave_targets_without_thunks_and_spoil_no_recorded_one() {
        let mut t = Thunks::new();
        let mut os = Fake {
            refuse_map: Some(libc::EACCES),
            ..Fake::default()
        };
        assert_eq!(t.make(LO, HI, PAGE, [FAR], &mut os), Err(libc::EACCES));
        assert_eq!(t.get(FAR), None);

        os.refuse_map = None;
        os.refuse_write = Some(libc::EACCES);
        assert_eq!(t.make(LO, HI, PAGE, [FAR], &mut os), Err(libc::EACCES));
        assert_eq!(t.get(FAR), None, "not recorded: its slot was not written");

        os.refuse_write = None;
        assert_eq!(t.make(LO, HI, PAGE, [FAR], &mut os), Ok(()));
        let at = t.get(FAR).unwrap();
        assert_eq!(
            at,
            Fake::base(0) + THUNK_LEN,
            "the refused slot stays spoiled"
        );
        assert_eq!(os.read(at, THUNK_LEN), arch::thunk(FAR));
    }
}
