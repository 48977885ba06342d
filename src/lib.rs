//! Static calls for user space: a call through a function chosen at run time that costs exactly
//! a direct `call`.
//!
//! ```
//! use static_call::{define_static_call, static_call};
//!
//! fn find_scalar(n: u8, hay: &[u8]) -> Option<usize> { hay.iter().position(|&b| b == n) }
//! define_static_call!(pub FIND: fn(u8, &[u8]) -> Option<usize> = find_scalar);
//!
//! let hay = b"axbx";
//! let i = static_call!(FIND)(b'x', hay);              // Some(1): patched into a direct call
//! FIND.update(|n, h| h.iter().rposition(|&b| b == n)); // a closure without captures
//! let j = static_call!(FIND)(b'x', hay);              // Some(3)
//! let f: fn(u8, &[u8]) -> Option<usize> = FIND.query();
//! static_call::flush();                               // every site queued so far is patched
//! assert_eq!((i, j, f(b'a', hay)), (Some(1), Some(3), Some(0)));
//! ```
//!
//! `extern "C"` functions are targets too, called with no adapter at all:
//!
//! ```
//! use static_call::{define_static_call, static_call};
//!
//! extern "C" fn add(a: i64, b: i64) -> i64 { a + b }
//! extern "C" fn mul(a: i64, b: i64) -> i64 { a * b }
//!
//! define_static_call!(pub CALC: extern "C" fn(i64, i64) -> i64 = add);
//!
//! let x = static_call!(CALC)(2, 3); // 5: the first run goes through the trampoline
//! CALC.update(mul);                 // returns once every registered site calls `mul`
//! let y = static_call!(CALC)(2, 3); // 6
//! assert_eq!((x, y), (5, 6));
//! ```
//!
//! # How it works
//!
//! Each `static_call!(KEY)(args)` compiles to one inline-asm block: `lea r11, [rip + KEY]`, NOP
//! padding, and a `call` to one shared trampoline, placed so that the five bytes of the call lie
//! in one aligned quadword. The first time a site runs, the trampoline registers it (lock-free)
//! and jumps to the key's current target; a worker thread then verifies the site's bytes and
//! rewrites the call into `call <target>` with one locked 8-byte compare-exchange, followed by a
//! core-serialising `membarrier`. [`StaticCall::update`] stores the new target and rewrites every
//! registered site the same way before it returns. A Rust key's sites call an adapter instead of
//! the target itself (docs/design.md, "Adapters"). A site whose bytes do not prove which key it
//! belongs to is never patched; it keeps calling through the trampoline, which is always correct.
//!
//! # Branches and hooks
//!
//! [`static_branch!`] is the kernel's jump label: a 5-byte NOP while its [`StaticBranch`] is off,
//! a `jmp` into the block while it is on, switched synchronously from any thread.
//! [`has_target!`] is the same branch over a call key, on while the key has a target, so that a
//! hook's arguments are built only when someone listens:
//!
//! ```
//! use static_call::{define_static_branch, define_static_call, has_target, static_branch, static_call};
//!
//! define_static_branch!(pub VERBOSE: bool = false);
//! define_static_call!(pub ON_STEP: extern "C" fn(u64) = None);
//! extern "C" fn show(step: u64) { println!("step {step}") }
//!
//! for step in 0..3 {
//!     if static_branch!(VERBOSE) {
//!         println!("verbose");
//!     }
//!     if has_target!(ON_STEP) {
//!         static_call!(ON_STEP)(step * 10); // evaluated only with a target
//!     }
//! }
//! VERBOSE.enable();
//! ON_STEP.update(show); // calls first, then branches: no hook branch ever meets a NOP
//! ```
//!
//! # Keys chosen at run time
//!
//! A key known only at run time (a `&StaticCall` in a variable, on the heap) is called with
//! [`StaticCall::call`]: in retpoline builds (or with `STATIC_CALL_GUARDS=on` at build time) a
//! *run-time site*, which is never bound to a key but patched to a guard stub that checks what
//! the key holds on every call and jumps straight there; otherwise a plain indirect call.
//! [`StaticCall::call_guarded`] and [`StaticCall::call_indirect`] choose per call, and
//! [`run_time_sites`] shows what each run-time site has become.
//!
//! ```
//! use static_call::StaticCall;
//!
//! extern "C" fn read_disk(block: u64) -> u64 { block * 2 }
//! extern "C" fn read_ram(block: u64) -> u64 { block }
//!
//! struct Dev { read: StaticCall<extern "C" fn(u64) -> u64> }
//! let devs = [Dev { read: StaticCall::new(read_disk) }, Dev { read: StaticCall::new(read_ram) }];
//! let total: u64 = devs.iter().map(|d| d.read.call_guarded(10)).sum();
//! assert_eq!(total, 30);
//! ```
//!
//! # Platforms
//!
//! Patching happens on x86-64 Linux (kernel 4.16 or later, for `membarrier` sync-core). Every
//! other target, and builds with the `force-fallback` feature, compile the same API as an atomic
//! load plus an indirect call. [`status`] tells which applies at run time, and why.
//!
//! # Rules for targets
//!
//! - A key's type is a Rust function type (`fn(..) -> R`, `unsafe fn`, `extern "C-unwind" fn`),
//!   with any sized arguments and result, or an `extern "C"` one whose arguments travel in
//!   registers. See [`define_static_call!`] and [`StaticCall`].
//! - A Rust key's targets are function items and closures that capture nothing (they are called
//!   without a value: a zero-sized `Copy + 'static` type), reached through an adapter into which
//!   they inline; `#[target_feature]` functions through [`target_feature!`], `unsafe fn`s through
//!   [`unsafe_target!`], function pointers through `update_pointer` (slower). A panic in a Rust
//!   target unwinds to the caller with its payload; by-value arguments are dropped exactly once.
//! - A panic in an `extern "C"` target aborts the process (an `extern "C"` function cannot
//!   unwind).
//! - The first static call in a process (and the first after `fork`, in the child) initialises
//!   the library, which allocates and starts a thread. If that first call may happen inside a
//!   signal handler, call [`init`] beforehand. After that, static calls are async-signal-safe;
//!   `update` is not.
//! - Patching is switched off (everything still works, through the trampoline) when the
//!   environment variable `STATIC_CALL_DISABLE` is set, when `membarrier` cannot serialise cores,
//!   or when code pages cannot be made writable (`prctl(PR_SET_MDWE)`, SELinux).

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod adapter;
mod branch;
mod diagnostics;
mod guard;
mod key;
mod macros;
mod rust_key;
mod site;
mod tail;

#[cfg(static_call_patching)]
mod arch {
    pub(crate) mod x86_64;
}
#[cfg(static_call_patching)]
mod os {
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    pub(crate) mod faults;
    pub(crate) mod linux;
}
#[cfg(static_call_patching)]
mod code_pool;
#[cfg(static_call_patching)]
mod kinds;
#[cfg(static_call_patching)]
mod patcher;
#[cfg(static_call_patching)]
mod registry;
#[cfg(static_call_patching)]
mod runtime;
#[cfg(static_call_patching)]
mod thunks;
#[cfg(static_call_patching)]
mod trampoline;
#[cfg(static_call_patching)]
mod worker;

#[cfg(not(static_call_patching))]
mod fallback;

#[cfg(not(static_call_patching))]
use fallback as imp;
#[cfg(static_call_patching)]
use patcher as imp;

pub use branch::StaticBranch;
pub use diagnostics::{
    Disabled, Error, ErrorKind, Reason, SiteInfo, SiteState, Stats, Status, WorkerStatus,
};
pub use key::{
    Abi, Batch, CAbi, ExternC, ReturnZero, Signature, StaticCall, StaticCallKey, Target,
};
pub use rust_key::{Adapter, RustAbi};
pub use site::{Arg, NoResult, RetVal, ZeroableResult};

/// Blocks until every site queued so far has been patched or given up on.
///
/// Does the worker's job in the calling thread (with every signal blocked while it does), so it
/// returns even if the worker could not start; `update` does the same when there is no worker.
/// Returns at once when nothing is queued. A site whose write failed in a way that may pass
/// (`Reason::WriteFailed`) is left to the worker's retry. Not async-signal-safe.
///
/// ```
/// static_call::define_static_call!(K: extern "C" fn() -> i32 = seven);
/// extern "C" fn seven() -> i32 { 7 }
///
/// assert_eq!(static_call::static_call!(K)(), 7);
/// static_call::flush();
/// for site in K.sites() {
///     assert_ne!(site.state, static_call::SiteState::Pending);
/// }
/// ```
pub fn flush() {
    imp::flush();
}

/// Initialises the library now instead of at the first static call: allocates the site registry
/// and the patch queue, registers for `membarrier`, installs the `fork` handlers and starts the
/// worker thread. Idempotent.
///
/// Call it before the first static call if that call may run inside a signal handler, and in a
/// `fork`ed child before its first static call for the same reason.
///
/// ```
/// static_call::init();
/// println!("{:?}", static_call::status());
/// ```
pub fn init() {
    imp::init();
}

/// Returns every patched site to `call <trampoline>` and switches patching off for the rest of
/// the process. Calls stay correct (the trampoline always jumps to the key's current target) and
/// `update` keeps working without ever writing code again.
///
/// Call it before the program sandboxes itself in a way that forbids writable code
/// (`prctl(PR_SET_MDWE)`, a seccomp filter without `mprotect`): after that, a patched site could
/// no longer be rewritten, and `update` would have to fail.
///
/// Works site by site (a site back on the trampoline is correct whatever happens to the others)
/// and switches patching off only once every site is unpatched. Fails if code can already no
/// longer be written ([`ErrorKind::WriteRefused`]: nothing was rewritten), if someone else's
/// bytes are over a patched site ([`ErrorKind::ForeignBytes`]: every other site is on the
/// trampoline, that one is unchanged, patching stays on; call again once the bytes are gone), or
/// if `membarrier` failed after the writes ([`ErrorKind::NotSynced`]). Not async-signal-safe.
///
/// ```
/// static_call::define_static_call!(K: extern "C" fn() -> i32 = one);
/// extern "C" fn one() -> i32 { 1 }
/// extern "C" fn two() -> i32 { 2 }
///
/// static_call::static_call!(K)();
/// static_call::unpatch_all().expect("code is still writable");
/// K.update(two); // no code is written now
/// assert_eq!(static_call::static_call!(K)(), 2);
/// ```
pub fn unpatch_all() -> Result<(), Error> {
    imp::unpatch_all()
}

/// Every run-time site that has run (a `key.call(..)` in a build where it is guarded, or a
/// `key.call_guarded(..)`), with its state: waiting on the trampoline, monomorphic (a guard stub
/// for one target), polymorphic (a chain of them) or megamorphic (an indirect call), and why.
///
/// Run-time sites belong to no key (any key may reach them), so no key's
/// [`sites`](StaticCall::sites) lists them. Takes the patch lock and scans the site registry: a
/// diagnostic, not a fast path. Empty in the portable fallback.
///
/// ```
/// use static_call::{SiteState, StaticCall};
/// extern "C" fn one() -> u32 { 1 }
///
/// let key = Box::new(StaticCall::new(one as extern "C" fn() -> u32));
/// assert_eq!(key.call_guarded(), 1);
/// static_call::flush();
/// for site in static_call::run_time_sites() {
///     match site.state {
///         SiteState::Monomorphic { target } => println!("{:#x} guards {target:#x}", site.address),
///         other => println!("{:#x}: {other:?}", site.address),
///     }
/// }
/// ```
pub fn run_time_sites() -> Vec<SiteInfo> {
    imp::run_time_sites()
}

/// Whether patching is on, why not if it is off, and the state of the worker and the registry.
///
/// Initialises the library if no static call has yet (allocating the registry; the worker thread
/// starts with the first site to patch), since whether patching is on is decided then.
///
/// ```
/// let status = static_call::status();
/// match status.patching {
///     Ok(()) => println!("sites are patched into direct calls"),
///     Err(why) => println!("static calls go through the trampoline: {why}"),
/// }
/// ```
pub fn status() -> Status {
    imp::status()
}

/// Counters of the patching work so far: batches, writes, `mprotect` and `membarrier` calls,
/// and how long pages were writable and executable.
///
/// ```
/// let before = static_call::stats();
/// // ... static calls, updates ...
/// let after = static_call::stats();
/// assert!(after.core_syncs >= before.core_syncs);
/// ```
pub fn stats() -> Stats {
    imp::stats()
}

/// The address of the trampoline that unpatched sites call, or `None` in the portable fallback.
/// Useful to tell, from a site's bytes, whether it has been patched.
///
/// ```
/// if let Some(t) = static_call::trampoline_address() {
///     println!("trampoline at {t:#x}");
/// }
/// ```
pub fn trampoline_address() -> Option<usize> {
    #[cfg(static_call_patching)]
    return Some(trampoline::address());
    #[cfg(not(static_call_patching))]
    return None;
}

/// The README's examples, compiled and run as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

/// Items the macros expand to. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::adapter::{
        ConstCallee, Images, Incoming, Layout, RustSig, Zst, adapter, arg_class, catching, conjure,
        finish, pointer_stub, resume_if_panicked, ret_class, zero_adapter,
    };
    #[cfg(static_call_patching)]
    pub use crate::branch::branch_entry;
    pub use crate::branch::{branch_key, hook_key};
    pub use crate::key::{
        Accepts, Change, KeyShims, RawKey, assert_zero_target_drops_nothing, fn_to_ptr,
    };
    pub use crate::rust_key::{
        BorrowingSignatureMustBeSpelledOutInDefineStaticCall, RustTarget,
        assert_target_is_zero_sized, key_from_parts, rust_key_to, rust_zero_key, zero_result,
    };
    pub use crate::site::{
        Arg, Class, Cursor, Regs, Ret, RetVal, Site, SiteId, Xmm, check_signature, site_id,
    };
    pub use crate::site::{Probe, ProbeFallback};
    pub use crate::tail::same_signature;
    #[cfg(static_call_patching)]
    pub use crate::trampoline::{tail_trampoline, trampoline};

    /// The site verifier, for property tests: see `arch::x86_64::prove_site`.
    #[cfg(static_call_patching)]
    pub fn prove_site(code: &[u8], start: u64, trampoline: u64) -> Result<u64, crate::Reason> {
        crate::arch::x86_64::prove_site(code, start, trampoline)
    }
    /// The branch-site verifier, for property tests: see `arch::x86_64::prove_branch`. Returns
    /// the key, the label and whether the site is likely-true.
    #[cfg(static_call_patching)]
    pub fn prove_branch(
        insn: &[u8; 5],
        site: u64,
        stub: &[u8],
        entry: u64,
    ) -> Result<(u64, u64, bool), crate::Reason> {
        crate::arch::x86_64::prove_branch(insn, site, stub, entry)
            .map(|b| (b.key, b.label, b.likely_true))
    }
    /// Length of a branch site's stub, which `prove_branch` reads.
    #[cfg(static_call_patching)]
    pub const BRANCH_STUB_LEN: usize = crate::arch::x86_64::STUB_LEN;
    /// Bytes before the `call` that `prove_site` reads.
    #[cfg(static_call_patching)]
    pub const SITE_PROLOGUE: usize = crate::arch::x86_64::PROLOGUE;

    /// The tail-site verifier, for property tests: see `arch::x86_64::prove_tail_site`.
    #[cfg(static_call_patching)]
    pub fn prove_tail_site(code: &[u8], start: u64, entry: u64) -> Result<u64, crate::Reason> {
        crate::arch::x86_64::prove_tail_site(code, start, entry)
    }
    /// Bytes of a tail site, from the site, that `prove_tail_site` reads.
    #[cfg(static_call_patching)]
    pub const TAIL_CODE: usize = crate::arch::x86_64::TAIL_CODE;

    /// The run-time-site verifier, for property tests: see `arch::x86_64::prove_run_time_site`.
    #[cfg(static_call_patching)]
    pub fn prove_run_time_site(code: &[u8], start: u64, entry: u64) -> Result<(), crate::Reason> {
        crate::arch::x86_64::prove_run_time_site(code, start, entry)
    }
    /// The code pool: the reserve in our text and the most pages mapped after it.
    #[cfg(static_call_patching)]
    pub use crate::code_pool::{MAX_MAPPED_PAGES, POOL_BYTES};
    /// The megamorphic stub (retpoline builds), and the retpoline thunk for r10.
    #[cfg(static_call_patching)]
    pub use crate::code_pool::{megamorphic, retpoline_r10};
    /// The entry of run-time sites (and of guard stubs' misses).
    #[cfg(static_call_patching)]
    pub use crate::trampoline::run_time_trampoline;
    /// The reserve's address range.
    #[cfg(static_call_patching)]
    pub fn code_pool_reserve() -> (usize, usize) {
        let r = crate::code_pool::reserve();
        (r.start, r.end)
    }
    /// Guard stubs' limits: entries per stub, misses before a site goes back to the patcher,
    /// changes in a row.
    #[cfg(static_call_patching)]
    pub use crate::guard::patching::{MAX_CHANGES, MAX_ENTRIES, MISSES_TO_REQUEUE};
    /// Whether this build is a retpoline build (`build.rs`).
    pub const RETPOLINE: bool = cfg!(static_call_retpoline);

    /// Fault injection into the code writer, for this crate's own tests (see `os/faults.rs`).
    #[cfg(all(static_call_patching, feature = "fault-injection"))]
    pub mod faults {
        pub use crate::os::faults::{Point, Step, arm, foreign, reset, seen, set_hook};
    }

    /// Whether call sites are asm blocks (true) or loads of the target (false).
    pub const PATCHING: bool = cfg!(static_call_patching);

    /// The function a `static_call!` expansion calls: the shim holding its site `S`, which binds
    /// `key` (the argument only ties the site's type to the key's type).
    #[inline(always)]
    pub fn key_site<S: Site, K: KeyShims + ?Sized>(key: &K) -> K::Fn {
        let _ = key;
        K::__shim::<S>()
    }
}
