//! The patch queue and the worker thread that drains it, and what `fork` does to both.
//!
//! The slow path pushes the registry index of each new site onto a bounded lock-free queue and
//! wakes the worker; the worker sleeps on a futex when there is nothing to do (no polling) and
//! otherwise hands whatever is queued to the patcher in batches.
//!
//! Wake-up protocol (a Dekker pair, hence the SeqCst fences):
//! - worker: `SLEEPING = 1; fence; if queue empty { futex_wait(SLEEPING, 1) }`;
//! - pusher: `push; fence; if SLEEPING == 1 { SLEEPING = 0; futex_wake }`.
//!
//! Either the worker sees the pushed item, or the pusher sees `SLEEPING == 1` and wakes it.
//!
//! The worker blocks every signal: a crossbeam `ArrayQueue` push spins while a pop of the same
//! slot is in progress, so a handler that pushed on the worker while it was half-way through a
//! pop would spin forever.

use core::sync::atomic::{
    AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};

use crossbeam_queue::ArrayQueue;

use crate::diagnostics::WorkerStatus;
use crate::os::linux::{futex_wait, futex_wait_for, futex_wake, monotonic_millis};
use crate::registry::{CLAIMING, QUEUED, RETRY};
use crate::{patcher, runtime};

/// Most entries the patch queue holds: a quarter of the registry's capacity, at most 4096. A
/// full queue is not an error: the site is queued again on its next call, or by the patcher's
/// next pass over the registry.
const MAX_QUEUE_CAPACITY: usize = 4096;

/// The capacity chosen at initialisation (kept for the fresh queue a forked child gets).
static QUEUE_CAPACITY: AtomicUsize = AtomicUsize::new(MAX_QUEUE_CAPACITY);

/// The patch queue. Replaced (and the old one abandoned) in a forked child, where another
/// thread may have been half-way through a push.
static QUEUE: AtomicPtr<ArrayQueue<u32>> = AtomicPtr::new(core::ptr::null_mut());

const NOT_STARTED: u32 = 0;
const STARTING: u32 = 1;
const RUNNING: u32 = 2;
const FAILED: u32 = 3;
static WORKER: AtomicU32 = AtomicU32::new(NOT_STARTED);
static WORKER_ERRNO: AtomicI32 = AtomicI32::new(0);

/// 1 while the worker sleeps (or is about to); the futex word.
static SLEEPING: AtomicU32 = AtomicU32::new(0);

/// Set when a push found the queue full: some slot is in RETRY.
static RETRY_PENDING: AtomicBool = AtomicBool::new(false);

/// When (`monotonic_millis`) to try again the sites whose write failed with an error that may
/// pass (`Reason::WriteFailed`); 0 when none waits. The wait doubles at every failure in a row,
/// from `FIRST_BACKOFF_MS` to `MAX_BACKOFF_MS`, so a lasting failure costs a few system calls
/// now and then, never a storm. Relaxed: read and written under the patch lock, except by the
/// sleeping worker, which only uses it to choose how long to sleep.
static RETRY_AT: AtomicU64 = AtomicU64::new(0);
static BACKOFF_MS: AtomicU64 = AtomicU64::new(0);
const FIRST_BACKOFF_MS: u64 = 10;
const MAX_BACKOFF_MS: u64 = 10_000;

fn queue() -> Option<&'static ArrayQueue<u32>> {
    // SAFETY: a non-null QUEUE points to a leaked ArrayQueue that is never freed.
    unsafe { QUEUE.load(Ordering::Acquire).as_ref() }
}

fn new_queue() -> *mut ArrayQueue<u32> {
    Box::into_raw(Box::new(ArrayQueue::new(
        QUEUE_CAPACITY.load(Ordering::Relaxed),
    )))
}

/// Creates the queue, for a registry of `sites` slots, if there is none yet. Allocates: part of
/// initialisation.
fn init_queue(sites: usize) {
    QUEUE_CAPACITY.store((sites / 4).clamp(16, MAX_QUEUE_CAPACITY), Ordering::Relaxed);
    if QUEUE.load(Ordering::Acquire).is_null() {
        let q = new_queue();
        if QUEUE
            .compare_exchange(
                core::ptr::null_mut(),
                q,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            // SAFETY: `q` was never shared.
            drop(unsafe { Box::from_raw(q) });
        }
    }
}

/// Queues a slot index. False if the queue is full (or not created yet).
pub(crate) fn push(index: u32) -> bool {
    queue().is_some_and(|q| q.push(index).is_ok())
}

/// Takes the next queued index. Called only under the patch lock, so that `fork` (whose prepare
/// handler takes that lock) never catches a pop half-way.
pub(crate) fn pop(_lock: &patcher::Locked) -> Option<u32> {
    queue()?.pop()
}

pub(crate) fn note_retry() {
    RETRY_PENDING.store(true, Ordering::Relaxed);
}

/// Whether some slot may be waiting in RETRY; clears the flag.
pub(crate) fn take_retry(_lock: &patcher::Locked) -> bool {
    RETRY_PENDING.swap(false, Ordering::Relaxed)
}

/// Asks for the sites whose write failed with an error that may pass to be tried again after a
/// back-off (once per failed pass: later calls before the retry change nothing).
pub(crate) fn schedule_retry() {
    if RETRY_AT.load(Ordering::Relaxed) != 0 {
        return;
    }
    let backoff = (BACKOFF_MS.load(Ordering::Relaxed) * 2).clamp(FIRST_BACKOFF_MS, MAX_BACKOFF_MS);
    BACKOFF_MS.store(backoff, Ordering::Relaxed);
    RETRY_AT.store(monotonic_millis() + backoff, Ordering::Relaxed);
    // The worker may be asleep with no deadline: wake it so that it sleeps with this one.
    if SLEEPING.swap(0, Ordering::Relaxed) == 1 {
        futex_wake(&SLEEPING, 1);
    }
}

/// Whether the back-off of failed writes has passed; clears it.
pub(crate) fn retry_due(_lock: &patcher::Locked) -> bool {
    let at = RETRY_AT.load(Ordering::Relaxed);
    let due = at != 0 && monotonic_millis() >= at;
    if due {
        RETRY_AT.store(0, Ordering::Relaxed);
    }
    due
}

/// The retried writes went through: the next failure starts from the first back-off again.
pub(crate) fn retry_succeeded() {
    BACKOFF_MS.store(0, Ordering::Relaxed);
}

/// After a push: wake the worker if it sleeps, start it if there is none. Async-signal-safe
/// except for the very first start of the worker (see `runtime.rs`).
pub(crate) fn notify() {
    fence(Ordering::SeqCst);
    if SLEEPING.load(Ordering::Relaxed) == 1 && SLEEPING.swap(0, Ordering::Relaxed) == 1 {
        futex_wake(&SLEEPING, 1);
    }
    if WORKER.load(Ordering::Relaxed) == NOT_STARTED {
        start();
    }
}

fn start() {
    if WORKER
        .compare_exchange(NOT_STARTED, STARTING, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("static-call-patcher".into())
        .spawn(run);
    match spawned {
        Ok(_) => {
            let _ =
                WORKER.compare_exchange(STARTING, RUNNING, Ordering::Relaxed, Ordering::Relaxed);
        }
        Err(e) => {
            WORKER_ERRNO.store(e.raw_os_error().unwrap_or(0), Ordering::Relaxed);
            WORKER.store(FAILED, Ordering::Relaxed);
        }
    }
}

/// Starts the worker now if it has not started; used by `init()`.
pub(crate) fn ensure_started() {
    if WORKER.load(Ordering::Relaxed) == NOT_STARTED && runtime::mode().is_ok() {
        start();
    }
}

pub(crate) fn status() -> WorkerStatus {
    match WORKER.load(Ordering::Relaxed) {
        RUNNING | STARTING => WorkerStatus::Running,
        FAILED => WorkerStatus::Failed {
            errno: WORKER_ERRNO.load(Ordering::Relaxed),
        },
        _ => WorkerStatus::NotStarted,
    }
}

fn run() {
    // For good: the guard is never dropped.
    core::mem::forget(crate::os::linux::SignalsBlocked::new());
    loop {
        patcher::drain();
        sleep_until_work();
    }
}

fn sleep_until_work() {
    SLEEPING.store(1, Ordering::Relaxed);
    fence(Ordering::SeqCst);
    if queue().is_some_and(|q| !q.is_empty()) {
        SLEEPING.store(0, Ordering::Relaxed);
        return;
    }
    while SLEEPING.load(Ordering::Relaxed) == 1 {
        match RETRY_AT.load(Ordering::Relaxed) {
            0 => futex_wait(&SLEEPING, 1),
            at => {
                let now = monotonic_millis();
                if now >= at {
                    SLEEPING.store(0, Ordering::Relaxed);
                    return;
                }
                futex_wait_for(&SLEEPING, 1, at - now);
            }
        }
    }
}

/// Creates the queue and registers the `pthread_atfork` handlers, once.
pub(crate) fn init(sites: usize) {
    init_queue(sites);
    // SAFETY: the handlers are `extern "C" fn()` with no preconditions beyond those documented.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

/// Before `fork`: hold the patch lock, so that the child never inherits a batch in flight, an
/// open writable window or a half-done pop.
extern "C" fn prepare() {
    patcher::lock_for_fork();
}

extern "C" fn parent() {
    patcher::unlock_after_fork();
}

/// In the child, which has only the forking thread: give it a fresh queue (another thread may
/// have been half-way through a push), turn every site that was queued or being claimed back into
/// one that its next call queues again, note that there is no worker, and release the lock.
extern "C" fn child() {
    QUEUE.store(new_queue(), Ordering::Release);
    crate::branch::forget_registered();
    WORKER.store(NOT_STARTED, Ordering::Relaxed);
    SLEEPING.store(0, Ordering::Relaxed);
    runtime::reset_in_child();
    if let Some(rt) = runtime::get() {
        for (_, slot) in rt.registry.claimed() {
            let state = slot.state.load(Ordering::Relaxed);
            let has_key = !slot.key.load(Ordering::Relaxed).is_null();
            if state == QUEUED || (state == CLAIMING && has_key) {
                slot.state.store(RETRY, Ordering::Relaxed);
                RETRY_PENDING.store(true, Ordering::Relaxed);
            }
        }
    }
    patcher::unlock_after_fork();
}
