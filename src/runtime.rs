//! Process-wide state and its one-time initialisation.
//!
//! Initialisation is everything that allocates or asks the OS: the registry and the patch
//! queue, finding (and pinning) our own object, registering for core-serialising membarriers,
//! the fork handlers and the worker thread. It runs once, at the first registration of a site
//! or at an explicit [`init`](crate::init). After it, the trampoline's slow path takes no lock
//! and allocates nothing. Threads whose first call comes while another thread initialises wait
//! for it (bounded), so that no site's first call goes unregistered; a signal handler that
//! interrupts initialisation on the initialising thread does not wait (it would wait for itself):
//! its call goes through the trampoline unregistered. A program whose first static call may run
//! inside a signal handler must call `init()` first.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use once_cell::race::OnceBox;

use crate::diagnostics::Disabled;
use crate::os::faults::{self, Point};
use crate::os::linux::{self, Object};
use crate::registry::{DEFAULT_CAPACITY, Registry};
use crate::{trampoline, worker};

/// Environment variable that switches patching off (any value but empty or `0`).
pub(crate) const ENV_DISABLE: &str = "STATIC_CALL_DISABLE";
/// Environment variable that sets the registry's capacity (number of sites).
pub(crate) const ENV_MAX_SITES: &str = "STATIC_CALL_MAX_SITES";
/// `allow`: patch even though a seccomp filter is active (it permits mprotect and membarrier).
pub(crate) const ENV_SECCOMP: &str = "STATIC_CALL_SECCOMP";
/// `patch`: patch even under valgrind (which then needs `--smc-check=all`).
pub(crate) const ENV_VALGRIND: &str = "STATIC_CALL_VALGRIND";

/// The parts of the runtime that never change once built.
pub(crate) struct Runtime {
    pub registry: Registry,
    /// Our own object, if it was found (patching is off otherwise).
    pub object: Option<Object>,
    pub page: usize,
    /// The trampoline's entry for call sites, for tail sites, and for run-time sites.
    pub trampoline: usize,
    pub tail_trampoline: usize,
    pub run_time_trampoline: usize,
}

static RUNTIME: OnceBox<Runtime> = OnceBox::new();

const UNINIT: u64 = 0;
const DONE: u64 = u64::MAX;
/// Guards initialisation so that it runs once without a lock: `UNINIT`, then the thread id of
/// the thread initialising, then `DONE`. The thread that moves it from `UNINIT` to its own id
/// initialises; the others wait for it. One word for both facts, so that the initialising thread
/// recognises its own re-entry (a signal handler that makes a static call) from the very first
/// instruction after it won: a separate "who" word stored afterwards would leave a window in which
/// the handler took itself for another thread and waited for itself for ever.
static INIT: AtomicU64 = AtomicU64::new(UNINIT);

/// 0 while patching is on; otherwise a `Disabled` code. Relaxed: it only ever moves from "on" to
/// a reason, and a reader that sees it late merely queues a site that the patcher then settles
/// as disabled.
static MODE: AtomicU32 = AtomicU32::new(0);

/// Set once a site could not be registered because the registry was full.
pub(crate) static REGISTRY_FULL: AtomicBool = AtomicBool::new(false);

/// The runtime, if initialised. Lock-free and async-signal-safe.
#[inline]
pub(crate) fn get() -> Option<&'static Runtime> {
    RUNTIME.get()
}

/// The runtime, initialising it if nobody has.
///
/// If another thread is initialising, waits for it (initialisation is bounded: a few
/// allocations and system calls), so that a site's first call always registers it. Returns
/// `None` only on re-entry into a thread's own initialisation (a signal handler, or a static call
/// made by the allocator): that call goes through the trampoline unregistered.
pub(crate) fn get_or_init() -> Option<&'static Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Some(rt);
    }
    let me = current_tid() as u64;
    match INIT.compare_exchange(UNINIT, me, Ordering::Acquire, Ordering::Acquire) {
        Ok(_) => {
            faults::hook(Point::InitWindow);
            let rt = build();
            worker::init(rt.registry.capacity());
            // `set` publishes with Release: whoever gets the runtime sees it complete.
            let _ = RUNTIME.set(Box::new(rt));
            INIT.store(DONE, Ordering::Release);
            RUNTIME.get()
        }
        // Re-entered on the initialising thread: this call goes unregistered.
        Err(owner) if owner == me => RUNTIME.get(),
        Err(_) => wait_initialised(),
    }
}

/// Waits for initialisation by another thread to finish; `None` if nobody has started it.
pub(crate) fn wait_initialised() -> Option<&'static Runtime> {
    loop {
        if let Some(rt) = RUNTIME.get() {
            return Some(rt);
        }
        if INIT.load(Ordering::Acquire) == UNINIT {
            return None;
        }
        // sched_yield: async-signal-safe.
        std::thread::yield_now();
    }
}

fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions; thread ids are positive.
    unsafe { libc::gettid() as u32 }
}

/// Whether patching is on.
#[inline]
pub(crate) fn mode() -> Result<(), Disabled> {
    match MODE.load(Ordering::Relaxed) {
        0 => Ok(()),
        code => Err(Disabled::from_code(code as u16).unwrap_or(Disabled::Unsupported)),
    }
}

/// Switches patching off for good, keeping the first reason given.
pub(crate) fn disable(why: Disabled) {
    let _ = MODE.compare_exchange(
        0,
        why.to_code() as u32,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

fn env_is(name: &str, value: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == value)
}

fn build() -> Runtime {
    let page = linux::page_size();
    let trampoline = trampoline::address();
    let capacity = std::env::var(ENV_MAX_SITES)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_CAPACITY);
    let object = linux::find_object(trampoline, page);
    if env_flag(ENV_DISABLE) {
        disable(Disabled::EnvVar);
    }
    if linux::seccomp_filtered() && !env_is(ENV_SECCOMP, "allow") {
        disable(Disabled::Seccomp);
    }
    if linux::running_on_valgrind() && !env_is(ENV_VALGRIND, "patch") {
        disable(Disabled::Valgrind);
    }
    match &object {
        None => disable(Disabled::ObjectNotFound),
        Some(obj) if !obj.is_main && !linux::pin_object_of(trampoline) => {
            disable(Disabled::PinFailed)
        }
        Some(_) => {}
    }
    if mode().is_ok()
        && let Err(errno) = linux::register_core_sync()
    {
        disable(Disabled::NoCoreSync { errno });
    }
    Runtime {
        registry: Registry::new(capacity),
        object,
        page,
        trampoline,
        tail_trampoline: trampoline::tail_address(),
        run_time_trampoline: trampoline::run_time_address(),
    }
}

/// In a forked child: forget an initialisation that another parent thread had under way (it
/// does not exist in the child). Nothing of it was published.
pub(crate) fn reset_in_child() {
    if RUNTIME.get().is_none() {
        INIT.store(UNINIT, Ordering::Relaxed);
    }
}
