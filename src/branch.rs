//! Static branches: `if static_branch!(KEY) { .. }` is a 5-byte NOP while the key is off and a
//! `jmp` to the block while it is on (the kernel's jump labels), and hooks over call keys:
//! `if has_target!(HOOK) { static_call!(HOOK)(args) }` costs, while the key has no target, what
//! an off branch costs, so the arguments are never built.
//!
//! # A branch site
//!
//! Each `static_branch!` is one `asm!` block with a `label` operand (asm goto):
//!
//! ```text
//!          .p2align 3,,4                 ; the jmp lies in one aligned quadword, as a call site's call
//! site:    jmp   stub                    ; E9 rel32: the five bytes the patcher rewrites
//! site+5:  <fall-through: the likely side>
//!
//!          .pushsection .text.unlikely.static_call_branch   ; out of line, same asm block
//! stub:    push  r11
//!          lea   r11, [rip + KEY]        ; the key binding the patcher proves
//!          call  <branch entry>          ; registers the site, returns the key's state in ZF
//!          pop   r11
//!          jnz   LABEL                   ; likely-false: LABEL is the `if` body; jz for likely-true
//!          jmp   site+5
//! ```
//!
//! The first run of a site goes through its stub: the branch entry (`asm/branch_x86_64.S`) saves
//! every register, the slow path below finds the site from the stub's bytes and registers it
//! (lock-free, as the call trampoline's does), and the stub takes the branch the key's state
//! says. The worker then proves the site from its own bytes (`arch::prove_branch`: the `jmp`, the
//! stub's exact template, the key of its `lea`, its label) and rewrites the five bytes to NOP5
//! (the fall-through) or `jmp LABEL` (the branch), which is exactly what the stub does for that
//! state. `enable`, `disable` and `set` rewrite every registered site before they return.
//!
//! Off, a likely-false site executes the padding NOP (at most one, in half the sites) and NOP5;
//! its stub is never reached again. The block declares no register clobber: the branch entry
//! preserves every register but the flags.

use crate::diagnostics::{Error, SiteInfo};
use crate::imp;
use crate::key::{Batch, Change, RawKey, RawTarget};

#[cfg(static_call_patching)]
mod entry {
    use super::*;
    use crate::arch::x86_64::{self as arch, STUB_LEN, STUB_RET};
    use crate::key::{MODE_MASK, MODE_NULL, MODE_OFF, MODE_WORD_OFFSET};
    use crate::kinds::Kind;
    use crate::os::linux;
    use crate::{runtime, trampoline};
    use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

    unsafe extern "C" {
        /// The branch entry. Its symbol carries the crate version (two copies of the crate link
        /// side by side) and is `.hidden`, so stubs never call it through a PLT.
        ///
        /// Not callable from Rust: only a branch stub calls it, with the key in r11 and the
        /// stub's own bytes after its return address.
        #[link_name = concat!(
            "static_call_branch_v",
            env!("CARGO_PKG_VERSION_MAJOR"), "_",
            env!("CARGO_PKG_VERSION_MINOR"), "_",
            env!("CARGO_PKG_VERSION_PATCH")
        )]
        pub fn branch_entry();
    }

    /// Bytes of extended state the entry saves, and whether with XSAVE (bit 0); 0 until the
    /// first entry asks CPUID. Written and read by the entry only (plain aligned 32-bit moves).
    pub(super) static XSTATE_AREA: AtomicU32 = AtomicU32::new(0);

    /// Entries of the table of registered sites (a power of two).
    const SEEN: usize = 4096;

    /// The return addresses (stub `pop r11`s) of sites whose registration is done: the entry
    /// answers them from the key's mode word alone, without saving anything or calling Rust. A
    /// direct-mapped table indexed by `(ret >> 2) % SEEN`: a slot taken by another site, or
    /// cleared, only sends a run down the slow path again. Relaxed throughout: it is a hint, and
    /// what it stands for (the site's slot is queued or settled) never goes back.
    static REGISTERED: [AtomicUsize; SEEN] = [const { AtomicUsize::new(0) }; SEEN];

    core::arch::global_asm!(
        include_str!("../asm/branch_x86_64.S"),
        entry = sym branch_entry,
        slow = sym branch_slow_path,
        area = sym XSTATE_AREA,
        seen = sym REGISTERED,
        seen_mask = const SEEN - 1,
        mode_at = const MODE_WORD_OFFSET,
        mode_mask = const MODE_MASK,
        mode_null = const MODE_NULL,
        mode_off = const MODE_OFF,
    );

    /// Notes that the site whose stub returns to `ret` needs no more registering.
    fn remember(ret: usize) {
        REGISTERED[(ret >> 2) % SEEN].store(ret, Ordering::Relaxed);
    }

    /// Forgets every registered site (in a forked child, whose queued sites must queue again on
    /// their next run). Async-signal-safe: stores only.
    pub(crate) fn forget_registered() {
        for seen in &REGISTERED {
            seen.store(0, Ordering::Relaxed);
        }
    }

    /// The branch entry's address, which every branch stub calls.
    pub(crate) fn entry() -> usize {
        branch_entry as *const () as usize
    }

    /// Called by the branch entry with the key from r11 and the entry's return address (the
    /// stub's `pop r11`). Registers the site and answers whether the stub takes its branch.
    ///
    /// # Safety
    /// `key` must point to a live key (every stub binds the address of a `static`).
    unsafe extern "C" fn branch_slow_path(key: *const RawKey, ret: usize) -> bool {
        // SAFETY: by the stub's contract r11 held the address of a key, and keys are statics (or
        // fields of statics), so the reference is valid for 'static.
        let key: &'static RawKey = unsafe { &*key };
        trampoline::alignment_canary();
        let done = match site_of(ret) {
            Some(site) => trampoline::register(key, site, Kind::Branch),
            // Not one of our stubs (or the library is initialising): nothing to register.
            None => runtime::get().is_some(),
        };
        if done {
            remember(ret);
        }
        key.__branch_on()
    }

    /// The site whose stub returns to `ret`, from the stub's bytes, if `ret` lies in our own
    /// code (a return address that does not, registers nothing: its bytes are not read). Loads
    /// only: the slow path runs in whatever context the site does.
    fn site_of(ret: usize) -> Option<usize> {
        let object = runtime::get_or_init()?.object.as_ref()?;
        let end = ret.checked_add(STUB_LEN - STUB_RET)?;
        object.exec_segment(ret, end)?;
        let mut tail = [0; STUB_LEN - STUB_RET];
        // SAFETY: [ret, end) lies in one of our executable segments, which stay mapped.
        unsafe { linux::read_code(ret, &mut tail) };
        arch::branch_site_of(&tail, ret)
    }
}

#[cfg(static_call_patching)]
#[doc(hidden)]
pub use entry::branch_entry;
#[cfg(static_call_patching)]
pub(crate) use entry::{entry, forget_registered};

/// A static branch: a condition that is a 5-byte NOP while false and a `jmp` while true, for
/// code that is usually off (tracing, debugging aids, rarely used features). Define one with
/// [`define_static_branch!`](crate::define_static_branch) (or as a `static` or a field of one,
/// with [`StaticBranch::new`]) and test it with [`static_branch!`](crate::static_branch).
///
/// Switching is synchronous, as [`StaticCall::update`](crate::StaticCall::update) is: when
/// [`enable`](Self::enable) returns, every site that has run jumps into its block and every
/// core has been serialised, so no test of the branch that starts afterwards sees it off. Safe
/// to switch from any thread, at any time; no initialisation call and no linker section needed.
///
/// ```
/// use static_call::{define_static_branch, static_branch};
///
/// define_static_branch!(pub TRACING: bool = false);
///
/// fn handle(request: u32) -> u32 {
///     if static_branch!(TRACING) {
///         println!("request {request}"); // out of line; runs only while TRACING is on
///     }
///     request + 1
/// }
///
/// assert_eq!(handle(1), 2);
/// TRACING.enable();
/// assert!(TRACING.is_enabled());
/// assert_eq!(handle(2), 3); // prints
/// TRACING.set(false);
/// ```
///
/// A key is 16 bytes and `const`-constructible.
#[repr(C)]
pub struct StaticBranch {
    raw: RawKey,
}

impl StaticBranch {
    /// A branch key, on or off.
    ///
    /// ```
    /// use static_call::{StaticBranch, static_branch};
    ///
    /// struct Debug { checks: StaticBranch }
    /// static DEBUG: Debug = Debug { checks: StaticBranch::new(true) };
    ///
    /// let checked = static_branch!(DEBUG.checks);
    /// assert!(checked);
    /// ```
    pub const fn new(on: bool) -> Self {
        StaticBranch {
            raw: RawKey::new(RawTarget::Branch(on)),
        }
    }

    /// Switches the branch on: when it returns, every registered site jumps into its block and
    /// every core has been serialised. Sites that have not run yet take the branch the first
    /// time they do.
    ///
    /// Not async-signal-safe: it takes the patch lock.
    ///
    /// # Panics
    /// When [`try_set`](Self::try_set) fails (code can no longer be written and a site was
    /// patched, someone else's bytes are over a site, `membarrier` failed); nearly always
    /// nothing changed then.
    ///
    /// ```
    /// static_call::define_static_branch!(CHECKS: bool = false);
    /// CHECKS.enable();
    /// assert!(static_call::static_branch!(CHECKS));
    /// ```
    pub fn enable(&self) {
        self.set(true);
    }

    /// Switches the branch off, synchronously as [`enable`](Self::enable) switches it on.
    ///
    /// # Panics
    /// When [`try_set`](Self::try_set) fails.
    ///
    /// ```
    /// static_call::define_static_branch!(CHECKS: bool = true);
    /// CHECKS.disable();
    /// assert!(!static_call::static_branch!(CHECKS));
    /// ```
    pub fn disable(&self) {
        self.set(false);
    }

    /// Switches the branch on or off.
    ///
    /// # Panics
    /// When [`try_set`](Self::try_set) fails.
    ///
    /// ```
    /// static_call::define_static_branch!(VERBOSE: bool = false);
    /// let verbose = std::env::var_os("VERBOSE").is_some();
    /// VERBOSE.set(verbose);
    /// assert_eq!(VERBOSE.is_enabled(), verbose);
    /// ```
    pub fn set(&self, on: bool) {
        crate::key::expect_set(self.try_set(on));
    }

    /// Like [`set`](Self::set), reporting failure instead of panicking. All or nothing, as
    /// [`StaticCall::try_update`](crate::StaticCall::try_update): each
    /// [`ErrorKind`](crate::ErrorKind) says what it leaves behind (nearly always: nothing
    /// changed, the key and every site keep the old state).
    ///
    /// ```
    /// static_call::define_static_branch!(VERBOSE: bool = false);
    /// if let Err(e) = VERBOSE.try_set(true) {
    ///     eprintln!("still off: {e}");
    /// }
    /// ```
    pub fn try_set(&self, on: bool) -> Result<(), Error> {
        imp::update(&[(&self.raw, RawTarget::Branch(on))])
    }

    /// Whether the branch is on now (a snapshot: another thread may switch it right after).
    /// An atomic load; use [`static_branch!`](crate::static_branch) in hot code.
    ///
    /// ```
    /// static_call::define_static_branch!(ON: bool = true);
    /// assert!(ON.is_enabled());
    /// ```
    pub fn is_enabled(&self) -> bool {
        self.raw.__branch_on()
    }

    /// Every site of this branch that has run at least once: the address of its five rewritable
    /// bytes, and whether they are patched (a NOP or a `jmp` into the block, as the key's state
    /// says) or still reach the branch entry through the site's stub
    /// ([`SiteState::Trampoline`](crate::SiteState::Trampoline), with the reason).
    ///
    /// Takes the patch lock and scans the site registry: a diagnostic, not a fast path.
    ///
    /// ```
    /// use static_call::{define_static_branch, static_branch};
    /// define_static_branch!(B: bool = false);
    ///
    /// let _ = static_branch!(B);
    /// static_call::flush();
    /// for site in B.sites() {
    ///     println!("{:#x}: {:?}", site.address, site.state);
    /// }
    /// ```
    pub fn sites(&self) -> Vec<SiteInfo> {
        imp::sites(&self.raw)
    }

    /// The key's address, which its sites' stubs load into r11.
    ///
    /// ```
    /// use static_call::StaticBranch;
    /// static A: StaticBranch = StaticBranch::new(false);
    /// static B: StaticBranch = StaticBranch::new(false);
    /// assert_ne!(A.as_ptr(), B.as_ptr());
    /// ```
    pub fn as_ptr(&self) -> *const () {
        self as *const Self as *const ()
    }

    #[doc(hidden)]
    pub fn __raw(&self) -> &RawKey {
        &self.raw
    }
}

impl core::fmt::Debug for StaticBranch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StaticBranch")
            .field("key", &self.as_ptr())
            .field("on", &self.is_enabled())
            .finish()
    }
}

impl<'a> Batch<'a> {
    /// Adds `branch.enable()`. A key given twice takes its last state.
    ///
    /// ```
    /// use static_call::{Batch, StaticBranch, StaticCall, static_branch};
    /// extern "C" fn fast() -> u32 { 1 }
    /// static CHECKS: StaticBranch = StaticBranch::new(false);
    /// static STATS: StaticBranch = StaticBranch::new(true);
    /// static ALLOC: StaticCall<extern "C" fn() -> u32> = StaticCall::return_zero();
    ///
    /// Batch::new().enable(&CHECKS).disable(&STATS).update(&ALLOC, fast).commit();
    /// assert!(static_branch!(CHECKS) && !static_branch!(STATS));
    /// ```
    pub fn enable(self, branch: &'a StaticBranch) -> Self {
        self.with(Change::raw(&branch.raw, RawTarget::Branch(true)))
    }

    /// Adds `branch.disable()`.
    ///
    /// ```
    /// use static_call::{Batch, StaticBranch};
    /// static B: StaticBranch = StaticBranch::new(true);
    /// Batch::new().disable(&B).commit();
    /// assert!(!B.is_enabled());
    /// ```
    pub fn disable(self, branch: &'a StaticBranch) -> Self {
        self.with(Change::raw(&branch.raw, RawTarget::Branch(false)))
    }

    /// Adds `branch.set(on)`.
    ///
    /// ```
    /// use static_call::{Batch, StaticBranch};
    /// static B: StaticBranch = StaticBranch::new(false);
    /// Batch::new().set(&B, true).commit();
    /// assert!(B.is_enabled());
    /// ```
    pub fn set(self, branch: &'a StaticBranch, on: bool) -> Self {
        self.with(Change::raw(&branch.raw, RawTarget::Branch(on)))
    }
}

/// Checks, at compile time, that `static_branch!` names a [`StaticBranch`].
#[doc(hidden)]
#[inline(always)]
pub fn branch_key(key: &StaticBranch) -> &RawKey {
    &key.raw
}

/// Checks, at compile time, that `has_target!` names a static-call key (a `StaticCall` or a key
/// `define_static_call!` defined), whose address is its `RawKey`'s.
#[doc(hidden)]
#[inline(always)]
pub fn hook_key<K: crate::key::KeyShims + ?Sized>(key: &K) -> &K {
    key
}

/// Defines a static branch: `define_static_branch!(pub NAME: bool = false)`.
///
/// The form is `[attributes] [visibility] NAME: bool = INITIAL_STATE`; it defines a
/// `static NAME: StaticBranch` (see [`StaticBranch`](crate::StaticBranch)).
///
/// ```
/// use static_call::{define_static_branch, static_branch};
///
/// define_static_branch!(
///     /// Extra consistency checks, off in production.
///     pub PARANOID: bool = false
/// );
///
/// let mut checks = 0;
/// for _ in 0..3 {
///     if static_branch!(PARANOID) {
///         checks += 1;
///     }
/// }
/// assert_eq!(checks, 0);
/// PARANOID.enable();
/// if static_branch!(PARANOID) {
///     checks += 1;
/// }
/// assert_eq!(checks, 1);
/// ```
#[macro_export]
macro_rules! define_static_branch {
    ($(#[$attr:meta])* $vis:vis $name:ident : bool = $init:expr) => {
        $(#[$attr])*
        $vis static $name: $crate::StaticBranch = $crate::StaticBranch::new($init);
    };
}

/// Tests a static branch: `if static_branch!(KEY) { .. }`, likely false.
///
/// An expression of type `bool`. While the key is off, a patched site is a 5-byte NOP (plus, in
/// half the sites, one padding NOP) and execution falls through; while it is on, the five bytes
/// are a `jmp` into the block. The block is where the compiler puts the unlikely side: out of
/// the hot path. No register is clobbered either way. For a branch that is usually on, use
/// [`static_branch_likely!`](crate::static_branch_likely).
///
/// The key is a [`StaticBranch`](crate::StaticBranch): a `static` (`static_branch!(TRACING)`,
/// `static_branch!(crate::debug::TRACING)`) or a field of one (`static_branch!(FLAGS.trace)`).
///
/// Every place it is written is its own site, registered on its first run and patched by the
/// worker thread soon after; until then it reaches the branch entry through its stub, which
/// answers correctly whatever the key's state. In the portable fallback it is an atomic load
/// and a branch.
///
/// ```
/// use static_call::{StaticBranch, static_branch};
///
/// struct Flags { trace: StaticBranch, audit: StaticBranch }
/// static FLAGS: Flags = Flags { trace: StaticBranch::new(false), audit: StaticBranch::new(true) };
///
/// let mut log = Vec::new();
/// if static_branch!(FLAGS.trace) { log.push("trace"); }
/// if static_branch!(FLAGS.audit) { log.push("audit"); }
/// assert_eq!(log, ["audit"]);
/// ```
#[macro_export]
macro_rules! static_branch {
    ($($key:tt)+) => {
        $crate::__static_branch_split!(branch unlikely [] $($key)+)
    };
}

/// Tests a static branch that is usually on: `if static_branch_likely!(KEY) { .. }`.
///
/// As [`static_branch!`](crate::static_branch), with the sides swapped: while the key is on, a
/// patched site is a NOP and execution falls through into the block; while it is off, the site
/// jumps over it (the kernel's `static_branch_likely`).
///
/// ```
/// use static_call::{define_static_branch, static_branch_likely};
///
/// define_static_branch!(CACHE: bool = true);
/// let mut hits = 0;
/// if static_branch_likely!(CACHE) { hits += 1; }
/// CACHE.disable();
/// if static_branch_likely!(CACHE) { hits += 1; }
/// assert_eq!(hits, 1);
/// ```
#[macro_export]
macro_rules! static_branch_likely {
    ($($key:tt)+) => {
        $crate::__static_branch_split!(branch likely [] $($key)+)
    };
}

/// Whether a static-call key has a target, as a static branch: the hook spelling
/// `if has_target!(HOOK) { static_call!(HOOK)(build_record()) }`.
///
/// While the key has no target ([`Target::Null`](crate::Target::Null)) this costs what an off
/// [`static_branch!`](crate::static_branch) costs: a 5-byte NOP. The block, where the arguments
/// are built and the call made, is out of line and never runs. With a target, the site jumps
/// into it. (A key that returns zero counts as having a target.)
///
/// Changing the key's target switches its branch sites in the same operation, in an order that
/// keeps every hook consistent while other threads run it: giving the key a target rewrites its
/// call sites first, then (after a core sync) its branch sites; removing it rewrites the branch
/// sites first, then the calls. When `update` or `set_null` returns, both kinds of site agree
/// with the key.
///
/// The key is a static-call key ([`define_static_call!`](crate::define_static_call), a
/// `static` [`StaticCall`](crate::StaticCall) or a field of one), named as in
/// [`static_call!`](crate::static_call).
///
/// ```
/// use static_call::{StaticCallKey, define_static_call, has_target, static_call};
/// use std::sync::atomic::{AtomicU32, Ordering};
///
/// pub struct Record { pub id: u32, pub text: String }
/// extern "C" fn log(r: &Record) { assert!(r.text.starts_with("request")); }
/// define_static_call!(pub ON_REQUEST: extern "C" fn(&Record) = None);
///
/// static BUILT: AtomicU32 = AtomicU32::new(0);
/// fn build(id: u32) -> Record {
///     BUILT.fetch_add(1, Ordering::Relaxed);
///     Record { id, text: format!("request {id}") }
/// }
///
/// fn handle(id: u32) {
///     if has_target!(ON_REQUEST) {
///         static_call!(ON_REQUEST)(&build(id));
///     }
/// }
///
/// handle(1); // no target: the record is never built
/// ON_REQUEST.update(log);
/// handle(2);
/// ON_REQUEST.set_null();
/// handle(3);
/// assert_eq!(BUILT.load(Ordering::Relaxed), 1);
/// ```
#[macro_export]
macro_rules! has_target {
    ($($key:tt)+) => {
        $crate::__static_branch_split!(hook unlikely [] $($key)+)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __static_branch_split {
    // `BASE.field...`: a key that is a field of the static BASE.
    ($what:tt $likely:tt [$($base:tt)+] . $($field:tt)+) => {
        $crate::__static_branch_site!($what $likely [$($base)+] [$($base)+ . $($field)+])
    };
    ($what:tt $likely:tt [$($path:tt)*] $next:tt $($rest:tt)*) => {
        $crate::__static_branch_split!($what $likely [$($path)* $next] $($rest)*)
    };
    // `PATH`: a key that is a static itself.
    ($what:tt $likely:tt [$($path:tt)+]) => {
        $crate::__static_branch_site!($what $likely [$($path)+] [$($path)+])
    };
}

/// The type check of a branch site's key: a `StaticBranch` for `static_branch!`, a static-call
/// key for `has_target!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __static_branch_key {
    (branch $($key:tt)+) => {
        $crate::__private::branch_key(&$($key)+)
    };
    (hook $($key:tt)+) => {
        $crate::__private::hook_key(&$($key)+).__raw()
    };
}

/// A branch site bound to the key `$key`, which is the static `$base` or a field of it:
/// `unlikely` (fall through while off) or `likely` (fall through while on).
#[cfg(static_call_patching)]
#[doc(hidden)]
#[macro_export]
macro_rules! __static_branch_site {
    ($what:tt $likely:tt [$($base:tt)+] [$($key:tt)+]) => {{
        let _ = $crate::__static_branch_key!($what $($key)+);
        $crate::__static_branch_asm!(
            $likely,
            $($base)+,
            // SAFETY: both pointers are into the same static.
            unsafe { (&raw const $($key)+).byte_offset_from(&raw const $($base)+) as usize },
            $crate::__private::site_id(::core::file!(), ::core::line!(), ::core::column!())
        )
    }};
}

/// The portable fallback's branch: an atomic load of the key's state and an ordinary branch.
#[cfg(not(static_call_patching))]
#[doc(hidden)]
#[macro_export]
macro_rules! __static_branch_site {
    ($what:tt $likely:tt [$($base:tt)+] [$($key:tt)+]) => {{
        let _: usize = const {
            // SAFETY: both pointers are into the same static.
            unsafe { (&raw const $($key)+).byte_offset_from(&raw const $($base)+) as usize }
        };
        $crate::__static_branch_key!($what $($key)+).__branch_on()
    }};
}

/// The asm block of a branch site (see the module documentation of `branch.rs`), as an
/// expression of type `bool`. `$id` (`site_id` of the `static_branch!` in the source) goes into
/// a comment, so that LLVM never merges two functions that differ only by which site they hold.
#[cfg(static_call_patching)]
#[doc(hidden)]
#[macro_export]
macro_rules! __static_branch_asm {
    // Likely-false: the stub jumps to the label (the on side) when the key is on.
    (unlikely, $base:path, $off:expr, $id:expr) => {
        $crate::__static_branch_asm!(@site "jnz", true, $base, $off, $id)
    };
    // Likely-true: the stub jumps to the label (the off side) when the key is off.
    (likely, $base:path, $off:expr, $id:expr) => {
        $crate::__static_branch_asm!(@site "jz", false, $base, $off, $id)
    };
    (@site $jcc:literal, $to_label:literal, $base:path, $off:expr, $id:expr) => {
        '__static_branch: {
            // SAFETY: the block clobbers nothing but the flags: unpatched, its stub saves and
            // restores r11 around the branch entry, which preserves every other register;
            // patched, it is a NOP or a `jmp` to the label. The stub pushes below rsp, which an
            // asm block without `nostack` may do.
            unsafe {
                ::core::arch::asm!(
                    "/* static_call branch {id} */",
                    ".p2align 3,,4",
                    "jmp 3f",
                    "4:",
                    ".pushsection .text.unlikely.static_call_branch,\"ax\",@progbits",
                    "3:",
                    "push r11",
                    "lea r11, [rip + {key} + {off}]",
                    "call {entry}",
                    "pop r11",
                    ::core::concat!($jcc, " {label}"),
                    "jmp 4b",
                    ".popsection",
                    key = sym $base,
                    off = const $off,
                    entry = sym $crate::__private::branch_entry,
                    id = const $id,
                    label = label { break '__static_branch $to_label },
                );
            }
            !$to_label
        }
    };
}
