//! The trampolines (`asm/trampoline_x86_64.S`) and their slow path.
//!
//! Every unpatched call site calls the trampoline with its key in r11; every unpatched tail site
//! (`static_call_fn!`) jumps to the tail entry with its key in r11 and its own address in r10;
//! every unpatched run-time site (`key.call`) calls the run-time entry with its key in r11, and
//! so does a guard stub that missed (`guard.rs`), from the site's call.
//! The slow path registers the site, as the kind its entry says, and returns the key's current
//! target, which the entry tail-jumps to. The slow path
//! runs in whatever context the caller is in, a signal handler included, so once the library is
//! initialised it takes no lock, allocates nothing and never waits: one probe of the registry,
//! at most one compare-exchange, one queue push and one futex wake.

use core::sync::atomic::Ordering;

use crate::diagnostics::Reason;
use crate::key::RawKey;
use crate::kinds::Kind;
use crate::patcher::Info;
use crate::registry::{Lookup, QUEUED, RETRY, SETTLED, Slot};
use crate::{code_pool, guard, runtime, worker};

unsafe extern "C" {
    /// The trampoline. Its symbol carries the crate version so that two copies of this crate
    /// (two semver-incompatible versions) link side by side; it is `.hidden`, so calls to it
    /// never go through a PLT.
    ///
    /// Not callable from Rust: it expects the key's address in r11 and forwards every argument
    /// register to the key's target.
    #[link_name = concat!(
        "static_call_trampoline_v",
        env!("CARGO_PKG_VERSION_MAJOR"), "_",
        env!("CARGO_PKG_VERSION_MINOR"), "_",
        env!("CARGO_PKG_VERSION_PATCH")
    )]
    pub fn trampoline();

    /// The entry of tail sites (`static_call_fn!`): like `trampoline`, with the site's own
    /// address in r10 (its return address belongs to the wrapper's caller).
    #[link_name = concat!(
        "static_call_tail_trampoline_v",
        env!("CARGO_PKG_VERSION_MAJOR"), "_",
        env!("CARGO_PKG_VERSION_MINOR"), "_",
        env!("CARGO_PKG_VERSION_PATCH")
    )]
    pub fn tail_trampoline();

    /// The entry of run-time sites (`key.call`, `guard.rs`), and where their guard stubs go when
    /// the key holds none of the stub's targets: like `trampoline` (the return address is the
    /// site's), for sites whose bytes prove no key.
    #[link_name = concat!(
        "static_call_run_time_trampoline_v",
        env!("CARGO_PKG_VERSION_MAJOR"), "_",
        env!("CARGO_PKG_VERSION_MINOR"), "_",
        env!("CARGO_PKG_VERSION_PATCH")
    )]
    pub fn run_time_trampoline();
}

core::arch::global_asm!(
    include_str!("../asm/trampoline_x86_64.S"),
    tramp = sym trampoline,
    tail = sym tail_trampoline,
    rt = sym run_time_trampoline,
    slow = sym slow_path,
    call_kind = const Kind::Call as u32,
    tail_kind = const Kind::Tail as u32,
    rt_kind = const Kind::RunTime as u32,
    retpoline = const code_pool::RETPOLINE as u32,
    retpoline_r10 = sym code_pool::retpoline_r10,
);

/// The trampoline's address.
pub(crate) fn address() -> usize {
    trampoline as *const () as usize
}

/// The tail entry's address.
pub(crate) fn tail_address() -> usize {
    tail_trampoline as *const () as usize
}

/// The run-time entry's address.
pub(crate) fn run_time_address() -> usize {
    run_time_trampoline as *const () as usize
}

/// Called by a trampoline entry with the key from r11, the site's address and the entry's kind.
///
/// # Safety
/// `key` must point to a live key: a static for call and tail sites (their bytes name it), and
/// for run-time sites a key its caller holds a reference to for the whole call.
unsafe extern "C" fn slow_path(key: *const RawKey, site: usize, kind: u32) -> *const () {
    // SAFETY: by the trampoline's contract r11 holds the address of a key that is live for the
    // duration of this call. Nothing below keeps the reference beyond it: a run-time site's slot
    // records only the key's address (never dereferenced again) and the target read here.
    let key: &RawKey = unsafe { &*key };
    alignment_canary();
    register(key, site, Kind::from_u32(kind));
    key.func()
}

/// The trampoline promises a 16-byte aligned stack at its `call` (see the invariant in
/// `asm/trampoline_x86_64.S`). Code generated for the slow path may use aligned SSE stores on
/// its frame, which fault if that promise breaks, but only now and then, depending on what the
/// compiler emits. This store makes every slow-path call check it: `movaps`/`movdqa` to a
/// 16-aligned local faults at once on a misaligned stack. It costs two instructions on a path
/// that is about to do a hash lookup.
#[inline(always)]
pub(crate) fn alignment_canary() {
    use core::arch::x86_64::{__m128i, _mm_setzero_si128, _mm_store_si128};
    let mut slot = core::mem::MaybeUninit::<__m128i>::uninit();
    // SAFETY: `slot` is a local `__m128i`, 16-aligned if the stack is (which is what this
    // checks); SSE2 is part of x86-64.
    unsafe { _mm_store_si128(slot.as_mut_ptr(), _mm_setzero_si128()) };
    core::hint::black_box(&slot);
}

/// Makes sure the site of `kind` whose five rewritable bytes are at `site` is registered and, if
/// it is new, queued for the patcher. Best effort: whatever happens, the caller then calls the
/// key's current target through the trampoline, which is always correct.
///
/// Returns whether later runs of the site need not come here again: it is queued or settled (or
/// the registry is full). False while the library initialises (re-entry) or while the site
/// waits in RETRY for a later run to queue it.
pub(crate) fn register(key: &RawKey, site: usize, kind: Kind) -> bool {
    let Some(rt) = runtime::get_or_init() else {
        return false;
    };
    let slot = match rt.registry.find_or_claim(site) {
        // The common case for a site that keeps running through the trampoline (unpatchable, or
        // still queued): loads only. A run-time site also notes the target and the miss, and
        // may go back to the patcher (one compare-exchange, maybe one push).
        Lookup::Found(slot, index) => {
            if slot.state.load(Ordering::Relaxed) == RETRY {
                requeue(slot, index);
            } else if kind == Kind::RunTime
                && guard::note_miss(slot, key)
                && slot
                    .state
                    .compare_exchange(SETTLED, QUEUED, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
            {
                // Release: the patcher, which reads `state` with Acquire, sees `seen`.
                enqueue(slot, index);
            }
            slot
        }
        Lookup::Claimed(slot, index) => {
            slot.key
                .store(key as *const RawKey as *mut RawKey, Ordering::Relaxed);
            slot.kind.store(kind as u32, Ordering::Relaxed);
            if kind == Kind::RunTime {
                guard::note_first_call(slot, key);
            }
            match runtime::mode() {
                Ok(()) => {
                    // Release: the patcher, which reads `state` with Acquire, sees `key`.
                    slot.state.store(QUEUED, Ordering::Release);
                    enqueue(slot, index);
                }
                Err(why) => {
                    slot.info.store(
                        Info::blocked(Reason::Disabled(why)).pack(),
                        Ordering::Relaxed,
                    );
                    slot.state.store(SETTLED, Ordering::Release);
                }
            }
            slot
        }
        Lookup::Full => {
            if !runtime::REGISTRY_FULL.load(Ordering::Relaxed) {
                runtime::REGISTRY_FULL.store(true, Ordering::Relaxed);
            }
            return true;
        }
    };
    // Relaxed: a hint for the branch entry's cache; a stale answer only costs a slow path.
    matches!(slot.state.load(Ordering::Relaxed), QUEUED | SETTLED)
}

/// Pushes a QUEUED slot; on a full queue, leaves it for a later call (RETRY).
fn enqueue(slot: &Slot, index: u32) {
    if worker::push(index) {
        worker::notify();
    } else {
        slot.state.store(RETRY, Ordering::Release);
        worker::note_retry();
    }
}

/// A site whose first push found the queue full: whoever moves it back to QUEUED pushes it.
fn requeue(slot: &Slot, index: u32) {
    if slot
        .state
        .compare_exchange(RETRY, QUEUED, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
    {
        enqueue(slot, index);
    }
}
