//! Fault injection into the code writer, for the crate's own tests: make the n-th `mprotect`,
//! site compare-exchange, `membarrier` or code mapping fail, and run a hook at a few points where
//! a signal could land at the worst moment.
//!
//! Active only with the `fault-injection` feature, which this crate's test builds turn on for
//! themselves (a dev-dependency on itself) and which is never on for users: without it, every
//! check below returns at once (`cfg!` is a constant) and costs nothing. Reached through
//! `static_call::__private::faults`, which exists only with the feature and is not an API.
//!
//! A failed compare-exchange is simulated the way it happens in real life: just before the
//! n-th compare-exchange, the first byte of the instruction being rewritten is replaced by `int3`
//! (`0xCC`), as a debugger placing a breakpoint would do, so the real compare-exchange then fails
//! on the changed bytes. [`foreign`] says where and what bytes it replaced, so that a test can put
//! them back, as the debugger would when removing the breakpoint.

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};

/// A step of the code writer that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `mprotect` of a window of code pages (opening or restoring). Fails with the armed errno.
    Protect,
    /// The compare-exchange of one site's quadword: someone else's byte lands just before it.
    Cmpxchg,
    /// `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`. Fails with the armed errno.
    Sync,
    /// Mapping a page for near thunks. Fails with the armed errno.
    MapCode,
}

const STEPS: usize = 4;
/// Occurrences of one step that can be armed at once.
const SLOTS: usize = 4;

/// Occurrences of each step seen so far (counting from 1).
static SEEN: [AtomicU32; STEPS] = [const { AtomicU32::new(0) }; STEPS];
/// The occurrences of each step that fail (0 = unused slot).
static FAIL_AT: [[AtomicU32; SLOTS]; STEPS] =
    [const { [const { AtomicU32::new(0) }; SLOTS] }; STEPS];
/// The errno each step fails with.
static ERRNO: [AtomicI32; STEPS] = [const { AtomicI32::new(0) }; STEPS];
/// Where the simulated foreign bytes went, and the bytes they replaced, in order.
const MAX_FOREIGN: usize = 8;
static FOREIGN_AT: [AtomicUsize; MAX_FOREIGN] = [const { AtomicUsize::new(0) }; MAX_FOREIGN];
static FOREIGN_WAS: [AtomicU32; MAX_FOREIGN] = [const { AtomicU32::new(0) }; MAX_FOREIGN];
static FOREIGN_COUNT: AtomicUsize = AtomicUsize::new(0);

/// A point where a test can run code (typically: raise a signal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// In `runtime::get_or_init`, right after this thread won the right to initialise.
    InitWindow,
    /// In the patcher, right after an index was popped from the patch queue.
    AfterPop,
    /// In an update written in two phases (a hook gaining or losing its target), after the
    /// first phase's writes and core sync, before the second publishes anything.
    BetweenPhases,
}

const POINTS: usize = 3;
static HOOKS: [AtomicUsize; POINTS] = [const { AtomicUsize::new(0) }; POINTS];

/// Makes the `nth` occurrence (from 1, counting from the last [`reset`]) of `step` fail with
/// `errno` (ignored for `Cmpxchg`). Up to four occurrences per step.
pub fn arm(step: Step, nth: u32, errno: i32) {
    let slots = &FAIL_AT[step as usize];
    let free = slots
        .iter()
        .find(|s| s.load(Ordering::Relaxed) == 0)
        .expect("at most four armed occurrences per step");
    ERRNO[step as usize].store(errno, Ordering::Relaxed);
    // SeqCst: tests arm from one thread and the worker reads from another; the order of these
    // few stores against the patcher's loads is all that matters, and it is not a hot path.
    free.store(nth, Ordering::SeqCst);
}

/// Disarms everything and restarts the counts.
pub fn reset() {
    for step in 0..STEPS {
        SEEN[step].store(0, Ordering::SeqCst);
        for slot in &FAIL_AT[step] {
            slot.store(0, Ordering::SeqCst);
        }
    }
    FOREIGN_COUNT.store(0, Ordering::SeqCst);
}

/// How many times `step` ran (failed or not) since the last [`reset`].
pub fn seen(step: Step) -> u32 {
    SEEN[step as usize].load(Ordering::SeqCst)
}

/// Every simulated foreign byte since the last [`reset`], in the order written: its address and
/// the byte it replaced.
pub fn foreign() -> Vec<(usize, u8)> {
    let n = FOREIGN_COUNT.load(Ordering::SeqCst).min(MAX_FOREIGN);
    (0..n)
        .map(|i| {
            (
                FOREIGN_AT[i].load(Ordering::SeqCst),
                FOREIGN_WAS[i].load(Ordering::SeqCst) as u8,
            )
        })
        .collect()
}

/// Runs `hook` whenever the code reaches `point` (until replaced; `None` removes it).
pub fn set_hook(point: Point, hook: Option<fn()>) {
    HOOKS[point as usize].store(hook.map_or(0, |f| f as usize), Ordering::SeqCst);
}

/// Counts one occurrence of `step`; the errno to fail it with, if it is armed.
pub(crate) fn fails(step: Step) -> Option<i32> {
    if !cfg!(feature = "fault-injection") {
        return None;
    }
    let n = SEEN[step as usize].fetch_add(1, Ordering::SeqCst) + 1;
    FAIL_AT[step as usize]
        .iter()
        .any(|s| s.load(Ordering::SeqCst) == n)
        .then(|| ERRNO[step as usize].load(Ordering::SeqCst))
}

/// Records the simulated foreign byte written at `addr` over `was`.
pub(crate) fn note_foreign(addr: usize, was: u8) {
    let i = FOREIGN_COUNT.fetch_add(1, Ordering::SeqCst);
    if i < MAX_FOREIGN {
        FOREIGN_WAS[i].store(was as u32, Ordering::SeqCst);
        FOREIGN_AT[i].store(addr, Ordering::SeqCst);
    }
}

/// Runs the hook set for `point`, if any.
pub(crate) fn hook(point: Point) {
    if !cfg!(feature = "fault-injection") {
        return;
    }
    let f = HOOKS[point as usize].load(Ordering::SeqCst);
    if f != 0 {
        // SAFETY: a non-zero value was stored from an `fn()` by `set_hook`.
        let f: fn() = unsafe { core::mem::transmute::<usize, fn()>(f) };
        f();
    }
}
