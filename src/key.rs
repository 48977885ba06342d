//! Keys: what a static call calls, and the list of sites that call it.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::diagnostics::{Error, ErrorKind, SiteInfo};
use crate::imp;
use crate::site::{Arg, Class, NoResult, RetVal, Site, ZeroableResult, check_signature};

/// What a key's sites do when called: the internal, untyped form of [`Target`].
///
/// Each variant holds the function the trampoline jumps to. For `Null` and `Ret0` that is the
/// signature's zero function (which returns nothing, or zero); patched sites do not call it at
/// all: they hold a 5-byte NOP or `xor eax, eax`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RawTarget {
    /// Call this function.
    Call(*const ()),
    /// Do nothing (the key returns `()`).
    Null(*const ()),
    /// Return zero (the key returns an integer, a pointer, `bool`...).
    Ret0(*const ()),
}

const MODE_CALL: usize = 0;
const MODE_NULL: usize = 1;
const MODE_RET0: usize = 2;
const MODE_MASK: usize = 3;
const MODE_BITS: u32 = 2;

impl RawTarget {
    /// The function the trampoline jumps to for this target.
    pub(crate) fn func(self) -> *const () {
        match self {
            RawTarget::Call(f) | RawTarget::Null(f) | RawTarget::Ret0(f) => f,
        }
    }

    fn mode(self) -> usize {
        match self {
            RawTarget::Call(_) => MODE_CALL,
            RawTarget::Null(_) => MODE_NULL,
            RawTarget::Ret0(_) => MODE_RET0,
        }
    }
}

/// The untyped part of a key: 16 bytes, the layout the kernel settled on.
///
/// - `func`: the function the trampoline jumps to. Written only under the patch lock
///   (`Release`), read by the trampoline's slow path with `Acquire`, so that a target published by
///   `update` (freshly generated code, say) is seen complete.
/// - `sites`: the key's mode (call, null, return zero) in the low two bits, and above them the
///   head of its list of patched sites as registry index + 1 (0 = empty). Read and written only
///   under the patch lock (or before any site exists), so `Relaxed` suffices.
#[repr(C)]
#[doc(hidden)]
pub struct RawKey {
    pub(crate) func: AtomicPtr<()>,
    sites: AtomicUsize,
}

impl RawKey {
    const fn new(target: RawTarget) -> Self {
        let mode = match target {
            RawTarget::Call(_) => MODE_CALL,
            RawTarget::Null(_) => MODE_NULL,
            RawTarget::Ret0(_) => MODE_RET0,
        };
        let func = match target {
            RawTarget::Call(f) | RawTarget::Null(f) | RawTarget::Ret0(f) => f,
        };
        RawKey {
            func: AtomicPtr::new(func as *mut ()),
            sites: AtomicUsize::new(mode),
        }
    }

    /// The function the trampoline jumps to.
    #[inline]
    pub(crate) fn func(&self) -> *const () {
        self.func.load(Ordering::Acquire)
    }

    /// The function a call reaches now, for the fallback's shims.
    #[doc(hidden)]
    #[inline]
    pub fn __func(&self) -> *const () {
        self.func()
    }

    /// The current target. Exact under the patch lock; otherwise a snapshot.
    pub(crate) fn target(&self) -> RawTarget {
        let f = self.func();
        match self.sites.load(Ordering::Relaxed) & MODE_MASK {
            MODE_NULL => RawTarget::Null(f),
            MODE_RET0 => RawTarget::Ret0(f),
            _ => RawTarget::Call(f),
        }
    }

    /// Sets the target. Under the patch lock (or in the fallback, where there are no sites).
    pub(crate) fn set_target(&self, target: RawTarget) {
        let head = self.sites.load(Ordering::Relaxed) & !MODE_MASK;
        self.sites.store(head | target.mode(), Ordering::Relaxed);
        // Release: a thread that reads the new function through the trampoline sees the
        // function's code and data as the updater published them.
        self.func.store(target.func() as *mut (), Ordering::Release);
    }

    /// Registry index + 1 of the first site in the key's list; 0 if none. Under the patch lock.
    #[cfg_attr(not(static_call_patching), allow(dead_code))]
    pub(crate) fn head(&self) -> u32 {
        (self.sites.load(Ordering::Relaxed) >> MODE_BITS) as u32
    }

    /// Under the patch lock.
    #[cfg_attr(not(static_call_patching), allow(dead_code))]
    pub(crate) fn set_head(&self, head: u32) {
        let mode = self.sites.load(Ordering::Relaxed) & MODE_MASK;
        self.sites
            .store((head as usize) << MODE_BITS | mode, Ordering::Relaxed);
    }

    /// The key's address: what a site's `lea r11, [rip + KEY]` computes.
    #[cfg_attr(not(static_call_patching), allow(dead_code))]
    pub(crate) fn addr(&self) -> usize {
        self as *const RawKey as usize
    }
}

/// What a key's sites do when called, as [`StaticCall::target`] reports it.
///
/// ```
/// use static_call::{StaticCall, Target};
///
/// extern "C" fn log(_: u32) {}
/// static HOOK: StaticCall<extern "C" fn(u32)> = StaticCall::null();
///
/// assert_eq!(HOOK.target(), Target::Null);
/// HOOK.update(log);
/// assert!(matches!(HOOK.target(), Target::Function(_)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<F> {
    /// Call this function.
    Function(F),
    /// Do nothing: the key has no target (the kernel's `DEFINE_STATIC_CALL_NULL`). Patched sites
    /// are a 5-byte NOP.
    Null,
    /// Return zero (0, null, `false`): the kernel's `__static_call_return0`. Patched sites are
    /// the single instruction `xor eax, eax` (with prefixes, 5 bytes).
    ReturnZero,
}

/// Marks a key defined to return zero: `define_static_call!(K: extern "C" fn() -> u64 = ReturnZero)`.
///
/// ```
/// use static_call::{Target, define_static_call, static_call};
///
/// define_static_call!(PENDING_WORK: extern "C" fn() -> usize = ReturnZero);
/// assert_eq!(static_call!(PENDING_WORK)(), 0);
/// assert_eq!(PENDING_WORK.target(), Target::ReturnZero);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ReturnZero;

/// A static-call key: the current target of a family of call sites, of type `F`.
///
/// `F` is the key's function-pointer type, `extern "C" fn(A0, …) -> R` or
/// `unsafe extern "C" fn(A0, …) -> R`. Define keys with [`define_static_call!`]; a
/// `StaticCall` can also be a field of a `static` struct (an operations table), constructed with
/// [`StaticCall::new`] and called with `static_call!(OPS.field)(args)`.
///
/// A key is 16 bytes, needs no heap before its first call, and is `const`-constructible.
///
/// ```
/// use static_call::{StaticCall, static_call};
///
/// extern "C" fn disk_read(block: u64) -> i32 { (block % 7) as i32 }
/// extern "C" fn ram_read(_block: u64) -> i32 { 0 }
///
/// pub struct Ops {
///     pub read: StaticCall<extern "C" fn(u64) -> i32>,
/// }
/// pub static OPS: Ops = Ops { read: StaticCall::new(disk_read) };
///
/// assert_eq!(static_call!(OPS.read)(9), 2);
/// OPS.read.update(ram_read);
/// assert_eq!(static_call!(OPS.read)(9), 0);
/// assert_eq!(size_of::<StaticCall<extern "C" fn(u64) -> i32>>(), 16);
/// ```
///
/// [`define_static_call!`]: crate::define_static_call
#[repr(C)]
pub struct StaticCall<F> {
    raw: RawKey,
    _sig: PhantomData<F>,
}

impl<F: Signature> StaticCall<F> {
    /// A key whose target is `f`.
    ///
    /// For signatures whose arguments borrow (`extern "C" fn(&T)`), define the key with
    /// [`define_static_call!`](crate::define_static_call) instead: such function types are
    /// higher-ranked and only the macro can build their call sites.
    ///
    /// ```
    /// use static_call::{StaticCall, static_call};
    /// extern "C" fn first(x: u8) -> u8 { x }
    /// static KEY: StaticCall<extern "C" fn(u8) -> u8> = StaticCall::new(first);
    /// assert_eq!(static_call!(KEY)(9), 9);
    /// ```
    pub const fn new(f: F) -> Self {
        let () = F::CHECK;
        // SAFETY: `F: Signature` is implemented only for `extern "C"` function pointers.
        unsafe { Self::__new_unchecked(f) }
    }

    /// A key with no target: calls do nothing (the kernel's `DEFINE_STATIC_CALL_NULL`). Only
    /// for keys that return `()`.
    ///
    /// ```
    /// use static_call::{StaticCall, Target};
    /// static HOOK: StaticCall<extern "C" fn(u32)> = StaticCall::null();
    /// assert_eq!(HOOK.target(), Target::Null);
    /// ```
    pub const fn null() -> Self
    where
        F::Output: NoResult,
    {
        let () = F::CHECK;
        StaticCall {
            raw: RawKey::new(RawTarget::Null(fn_to_ptr(F::__ZERO))),
            _sig: PhantomData,
        }
    }

    /// A key whose calls return zero (the kernel's `DEFINE_STATIC_CALL_RET0`). Only for keys
    /// that return an integer, `bool`, `char`, a raw pointer or an `Option` of a reference.
    ///
    /// ```
    /// use static_call::StaticCall;
    /// static COUNT: StaticCall<extern "C" fn() -> u64> = StaticCall::return_zero();
    /// assert_eq!(COUNT.query()(), 0);
    /// ```
    pub const fn return_zero() -> Self
    where
        F::Output: ZeroableResult,
    {
        let () = F::CHECK;
        StaticCall {
            raw: RawKey::new(RawTarget::Ret0(fn_to_ptr(F::__ZERO))),
            _sig: PhantomData,
        }
    }

    /// Removes the key's target: calls do nothing, and patched sites become a 5-byte NOP.
    /// Synchronous like [`update`](Self::update). Only for keys that return `()`.
    ///
    /// # Panics
    /// When [`try_set_null`](Self::try_set_null) would fail.
    ///
    /// ```
    /// use static_call::{StaticCall, Target, static_call};
    /// extern "C" fn log(_: u32) {}
    /// static HOOK: StaticCall<extern "C" fn(u32)> = StaticCall::new(log);
    /// HOOK.set_null();
    /// static_call!(HOOK)(7); // does nothing
    /// assert_eq!(HOOK.target(), Target::Null);
    /// ```
    pub fn set_null(&self)
    where
        F::Output: NoResult,
    {
        expect_set(self.try_set_null());
    }

    /// Like [`set_null`](Self::set_null), reporting failure instead of panicking.
    ///
    /// ```
    /// use static_call::StaticCall;
    /// extern "C" fn log(_: u32) {}
    /// static HOOK: StaticCall<extern "C" fn(u32)> = StaticCall::new(log);
    /// if let Err(e) = HOOK.try_set_null() {
    ///     eprintln!("the hook stays on: {e}");
    /// }
    /// ```
    pub fn try_set_null(&self) -> Result<(), Error>
    where
        F::Output: NoResult,
    {
        imp::update(&[(&self.raw, RawTarget::Null(fn_to_ptr(F::__ZERO)))])
    }

    /// Makes every call return zero (0, null, `false`); patched sites become the single
    /// instruction `xor eax, eax`. Synchronous like [`update`](Self::update).
    ///
    /// # Panics
    /// When [`try_set_return_zero`](Self::try_set_return_zero) would fail.
    ///
    /// ```
    /// use static_call::{StaticCall, static_call};
    /// extern "C" fn answer() -> i32 { 42 }
    /// static Q: StaticCall<extern "C" fn() -> i32> = StaticCall::new(answer);
    /// Q.set_return_zero();
    /// assert_eq!(static_call!(Q)(), 0);
    /// ```
    pub fn set_return_zero(&self)
    where
        F::Output: ZeroableResult,
    {
        expect_set(self.try_set_return_zero());
    }

    /// Like [`set_return_zero`](Self::set_return_zero), reporting failure instead of panicking.
    ///
    /// ```
    /// use static_call::StaticCall;
    /// extern "C" fn pending() -> usize { 3 }
    /// static PENDING: StaticCall<extern "C" fn() -> usize> = StaticCall::new(pending);
    /// PENDING.try_set_return_zero().expect("code is writable here");
    /// assert_eq!(PENDING.query()(), 0);
    /// ```
    pub fn try_set_return_zero(&self) -> Result<(), Error>
    where
        F::Output: ZeroableResult,
    {
        imp::update(&[(&self.raw, RawTarget::Ret0(fn_to_ptr(F::__ZERO)))])
    }
}

/// Panics on a failed update, saying what the error leaves behind (see [`ErrorKind`]).
fn expect_set(result: Result<(), Error>) {
    if let Err(e) = result {
        let left = match e.kind {
            ErrorKind::NotSynced { .. } => "the change was made, but cores were not serialised",
            ErrorKind::UndoFailed => "every key keeps its old target, one site may not",
            _ => "nothing changed: every key keeps its old target",
        };
        panic!("static_call: update failed ({left}): {e}");
    }
}

impl<F: Copy> StaticCall<F> {
    /// # Safety
    /// `F` must be an `extern "C"` or `unsafe extern "C"` function-pointer type.
    #[doc(hidden)]
    pub const unsafe fn __new_unchecked(f: F) -> Self {
        StaticCall {
            raw: RawKey::new(RawTarget::Call(fn_to_ptr(f))),
            _sig: PhantomData,
        }
    }

    /// A key with no target (`null`) or that returns zero (`!null`), whose zero function is
    /// `zero`.
    ///
    /// # Safety
    /// As for `__new_unchecked`, and `zero` must return nothing (`null`) or zero.
    #[doc(hidden)]
    pub const unsafe fn __new_zero_unchecked(zero: F, null: bool) -> Self {
        let zero = fn_to_ptr(zero);
        let target = if null {
            RawTarget::Null(zero)
        } else {
            RawTarget::Ret0(zero)
        };
        StaticCall {
            raw: RawKey::new(target),
            _sig: PhantomData,
        }
    }

    /// What the key's sites do now.
    ///
    /// ```
    /// use static_call::{StaticCall, Target};
    /// extern "C" fn one() -> u8 { 1 }
    /// static K: StaticCall<extern "C" fn() -> u8> = StaticCall::new(one);
    /// assert!(matches!(K.target(), Target::Function(f) if f() == 1));
    /// K.set_return_zero();
    /// assert_eq!(K.target(), Target::ReturnZero);
    /// ```
    pub fn target(&self) -> Target<F> {
        match self.raw.target() {
            // SAFETY: a `Call` target only ever holds a value converted from an `F`.
            RawTarget::Call(f) => Target::Function(unsafe { ptr_to_fn(f) }),
            RawTarget::Null(_) => Target::Null,
            RawTarget::Ret0(_) => Target::ReturnZero,
        }
    }

    /// Makes every call through this key call `f`.
    ///
    /// Synchronous: when `update` returns, every registered site of this key has been rewritten
    /// to `call f` and every core has been serialised, so no call that starts afterwards reaches
    /// the old target. Sites not yet patched go through the trampoline, which reads the new
    /// target. All or nothing: if some site cannot be rewritten, nothing changes.
    ///
    /// Calls that started before may still be running the old target when `update` returns (as
    /// with the kernel's `static_call_update`): before freeing what the old target uses, wait for
    /// those calls with your own means (a grace period, a reference count).
    ///
    /// Not async-signal-safe: it takes the patch lock.
    ///
    /// # Panics
    /// When [`try_update`](Self::try_update) fails: a site that already calls the old target
    /// directly could not be rewritten (its page cannot be made writable, someone else's bytes
    /// are over it) or `membarrier` failed. The message says what the error leaves behind:
    /// nearly always nothing changed, and the key keeps its old target everywhere; the
    /// exceptions are [`ErrorKind::NotSynced`] and [`ErrorKind::UndoFailed`]. Use `try_update`
    /// to handle these cases.
    ///
    /// ```
    /// static_call::define_static_call!(OP: extern "C" fn(i32) -> i32 = double);
    /// extern "C" fn double(x: i32) -> i32 { 2 * x }
    /// extern "C" fn square(x: i32) -> i32 { x * x }
    ///
    /// assert_eq!(static_call::static_call!(OP)(5), 10);
    /// OP.update(square);
    /// assert_eq!(static_call::static_call!(OP)(5), 25);
    /// ```
    pub fn update(&self, f: F) {
        expect_set(self.try_update(f));
    }

    /// Like [`update`](Self::update), but reports failure instead of panicking.
    ///
    /// # Errors
    /// Each [`ErrorKind`] says what it leaves behind (docs/safety.md has them side by side):
    /// - [`WriteRefused`](ErrorKind::WriteRefused), [`ForeignBytes`](ErrorKind::ForeignBytes)
    ///   and [`CoreSyncFailed`](ErrorKind::CoreSyncFailed): nothing changed; the key and every
    ///   site keep the old target;
    /// - [`NotSynced`](ErrorKind::NotSynced): the change was made (the key holds `f`, the sites
    ///   call it), but `membarrier` failed afterwards;
    /// - [`UndoFailed`](ErrorKind::UndoFailed): the key keeps its old target, and one site, the
    ///   error names, may not (two foreign writers raced with this update).
    ///
    /// ```
    /// static_call::define_static_call!(OP: extern "C" fn() -> u8 = one);
    /// extern "C" fn one() -> u8 { 1 }
    /// extern "C" fn two() -> u8 { 2 }
    ///
    /// OP.try_update(two).expect("code pages are writable here");
    /// assert_eq!(static_call::static_call!(OP)(), 2);
    /// ```
    pub fn try_update(&self, f: F) -> Result<(), Error> {
        imp::update(&[(&self.raw, RawTarget::Call(fn_to_ptr(f)))])
    }

    /// Sets the target from a [`Target`]: what `update`, `set_null` and `set_return_zero` do,
    /// for a zero function the caller provides.
    ///
    /// # Safety
    /// `zero` must be a function that returns nothing (for `Null`) or zero (for `ReturnZero`).
    #[doc(hidden)]
    pub unsafe fn __try_set(&self, target: Target<F>, zero: F) -> Result<(), Error> {
        let target = match target {
            Target::Function(f) => RawTarget::Call(fn_to_ptr(f)),
            Target::Null => RawTarget::Null(fn_to_ptr(zero)),
            Target::ReturnZero => RawTarget::Ret0(fn_to_ptr(zero)),
        };
        imp::update(&[(&self.raw, target)])
    }

    /// The function a call reaches now: the target, or for a key set to
    /// [`Null`](Target::Null) or [`ReturnZero`](Target::ReturnZero), a function of the key's
    /// type that does nothing or returns zero. [`target`](Self::target) tells which.
    ///
    /// ```
    /// static_call::define_static_call!(OP: extern "C" fn() -> u8 = one);
    /// extern "C" fn one() -> u8 { 1 }
    ///
    /// let f: extern "C" fn() -> u8 = OP.query();
    /// assert_eq!(f(), 1);
    /// ```
    pub fn query(&self) -> F {
        // SAFETY: `func` only ever holds values converted from an `F`.
        unsafe { ptr_to_fn(self.raw.func()) }
    }

    /// Every site of this key that has run at least once, with its address (the address of its
    /// `call` instruction) and whether it is patched.
    ///
    /// Takes the patch lock and scans the site registry: a diagnostic, not a fast path.
    ///
    /// ```
    /// use static_call::{SiteState, define_static_call, static_call};
    /// define_static_call!(OP: extern "C" fn() -> u8 = one);
    /// extern "C" fn one() -> u8 { 1 }
    ///
    /// static_call!(OP)();
    /// static_call::flush();
    /// for site in OP.sites() {
    ///     println!("{:#x}: {:?}", site.address, site.state);
    /// }
    /// # if cfg!(all(target_arch = "x86_64", target_os = "linux")) && static_call::status().patching.is_ok() {
    /// #     assert!(OP.sites().iter().all(|s| s.state == SiteState::Patched));
    /// # }
    /// ```
    pub fn sites(&self) -> Vec<SiteInfo> {
        imp::sites(&self.raw)
    }

    /// The key's address, which is what its sites load into r11.
    ///
    /// ```
    /// use static_call::StaticCall;
    /// extern "C" fn f() {}
    /// static A: StaticCall<extern "C" fn()> = StaticCall::new(f);
    /// static B: StaticCall<extern "C" fn()> = StaticCall::new(f);
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

impl<F: Copy> core::fmt::Debug for StaticCall<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StaticCall")
            .field("key", &self.as_ptr())
            .field("target", &self.raw.func())
            .finish()
    }
}

/// Changes of several keys made together: every site of every key is rewritten in one pass over
/// the code (one `mprotect` window per run of pages, one core sync), all or nothing. Made for
/// swapping an operations table: when [`commit`](Self::commit) returns, no call that starts
/// reaches an old target of any of the keys, and if any site could not be rewritten, no key
/// changed.
///
/// Calls made *during* the commit may see some keys switched and others not yet, as with
/// separate updates: a batch makes the switch cheaper and all or nothing, not instantaneous.
///
/// ```
/// use static_call::{Batch, StaticCall, static_call};
///
/// extern "C" fn ram_read(block: u64) -> i64 { block as i64 }
/// extern "C" fn ram_write(_: u64) -> i64 { 0 }
/// extern "C" fn null_read(_: u64) -> i64 { -1 }
/// extern "C" fn log(_: u64) {}
///
/// pub struct Ops {
///     read: StaticCall<extern "C" fn(u64) -> i64>,
///     write: StaticCall<extern "C" fn(u64) -> i64>,
///     trace: StaticCall<extern "C" fn(u64)>,
/// }
/// static OPS: Ops = Ops {
///     read: StaticCall::new(ram_read),
///     write: StaticCall::new(ram_write),
///     trace: StaticCall::new(log),
/// };
///
/// assert_eq!(static_call!(OPS.read)(7), 7);
/// Batch::new()
///     .update(&OPS.read, null_read)
///     .set_return_zero(&OPS.write)
///     .set_null(&OPS.trace)
///     .commit();
/// assert_eq!(static_call!(OPS.read)(7), -1);
/// assert_eq!(static_call!(OPS.write)(7), 0);
/// ```
#[must_use = "a batch changes nothing until it is committed"]
#[derive(Default)]
pub struct Batch<'a> {
    changes: Vec<(&'a RawKey, RawTarget)>,
}

impl<'a> Batch<'a> {
    /// An empty batch.
    pub fn new() -> Self {
        Batch {
            changes: Vec::new(),
        }
    }

    /// Adds `key.update(f)`. A key given twice takes its last target.
    pub fn update<F: Copy>(self, key: &'a StaticCall<F>, f: F) -> Self {
        self.with(&key.raw, RawTarget::Call(fn_to_ptr(f)))
    }

    /// Adds `key.set_null()`.
    pub fn set_null<F: Signature>(self, key: &'a StaticCall<F>) -> Self
    where
        F::Output: NoResult,
    {
        self.with(&key.raw, RawTarget::Null(fn_to_ptr(F::__ZERO)))
    }

    /// Adds `key.set_return_zero()`.
    pub fn set_return_zero<F: Signature>(self, key: &'a StaticCall<F>) -> Self
    where
        F::Output: ZeroableResult,
    {
        self.with(&key.raw, RawTarget::Ret0(fn_to_ptr(F::__ZERO)))
    }

    fn with(mut self, key: &'a RawKey, target: RawTarget) -> Self {
        match self
            .changes
            .iter_mut()
            .find(|(k, _)| core::ptr::eq(*k, key))
        {
            Some(change) => change.1 = target,
            None => self.changes.push((key, target)),
        }
        self
    }

    /// Makes every change, or none. Not async-signal-safe: it takes the patch lock.
    ///
    /// # Panics
    /// When [`try_commit`](Self::try_commit) fails; the message says what the error leaves
    /// behind (nearly always: no key changed).
    pub fn commit(self) {
        expect_set(self.try_commit());
    }

    /// Like [`commit`](Self::commit), reporting failure.
    ///
    /// # Errors
    /// As for [`StaticCall::try_update`], across every key of the batch: after
    /// [`WriteRefused`](ErrorKind::WriteRefused), [`ForeignBytes`](ErrorKind::ForeignBytes) or
    /// [`CoreSyncFailed`](ErrorKind::CoreSyncFailed) no key changed; after
    /// [`NotSynced`](ErrorKind::NotSynced) every key changed; after
    /// [`UndoFailed`](ErrorKind::UndoFailed) no key changed, and the site it names may disagree.
    pub fn try_commit(self) -> Result<(), Error> {
        imp::update(&self.changes)
    }
}

/// Converts a function pointer of type `F` to an untyped pointer.
const fn fn_to_ptr<F: Copy>(f: F) -> *const () {
    const {
        assert!(
            size_of::<F>() == size_of::<*const ()>(),
            "a key's type must be a function pointer"
        );
    }
    union Cast<F: Copy> {
        f: F,
        p: *const (),
    }
    // SAFETY: same size (asserted); a function pointer's bits are a valid raw pointer.
    unsafe { Cast { f }.p }
}

/// # Safety
/// `p` must have come from `fn_to_ptr::<F>`.
unsafe fn ptr_to_fn<F: Copy>(p: *const ()) -> F {
    const {
        assert!(
            size_of::<F>() == size_of::<*const ()>(),
            "a key's type must be a function pointer"
        );
    }
    // SAFETY: same size; the caller guarantees `p` is an `F`.
    unsafe { core::mem::transmute_copy(&p) }
}

/// A function-pointer type that a [`StaticCall`] can have: `extern "C" fn(A0, …) -> R` or
/// `unsafe extern "C" fn(A0, …) -> R` with arguments that travel in registers (up to 6
/// integer-class and 8 `f32`/`f64`, in any order) and a result of `()`, an integer-class type,
/// `f32` or `f64`.
///
/// Implemented here for every such type without borrowed arguments. Signatures that borrow
/// (`extern "C" fn(&T)`, higher-ranked over the lifetime) are supported by
/// [`define_static_call!`](crate::define_static_call), which writes their call code itself.
///
/// ```
/// use static_call::{Signature, StaticCall};
///
/// // Generic over any signature, e.g. to build keys in const contexts.
/// const fn key_for<F: Signature>(f: F) -> StaticCall<F> {
///     StaticCall::new(f)
/// }
/// extern "C" fn mix(a: u32, b: f64) -> f64 { a as f64 * b }
/// static MIX: StaticCall<extern "C" fn(u32, f64) -> f64> = key_for(mix);
/// assert_eq!(MIX.call(2, 1.5), 3.0);
/// ```
///
/// # Safety
/// Implemented only by this crate, for `extern "C"` function-pointer types.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a static-call signature",
    label = "not an `extern \"C\" fn` whose arguments all travel in registers",
    note = "a key's type is `extern \"C\" fn(A0, ..) -> R` or `unsafe extern \"C\" fn(A0, ..) -> R`; Rust-ABI `fn(..)` and variadic functions cannot be static calls",
    note = "signatures with borrowed arguments (`extern \"C\" fn(&T)`) need `define_static_call!`"
)]
pub unsafe trait Signature: Copy + Send + Sync + 'static {
    /// The result type.
    type Output: RetVal;
    /// Compile-time check that the arguments fit in registers.
    #[doc(hidden)]
    const CHECK: ();
    /// A function of this type that returns nothing, or zero: the target of a key that is
    /// null or returns zero.
    #[doc(hidden)]
    const __ZERO: Self;
    /// A function of this type whose body is the call site `S`.
    #[doc(hidden)]
    fn __shim<S: Site>() -> Self;
}

macro_rules! impl_signature {
    ($($A:ident $a:ident)*) => {
        impl_signature!(@one [] $($A $a)*);
        impl_signature!(@one [unsafe] $($A $a)*);
    };
    (@one [$($unsafe:tt)?] $($A:ident $a:ident)*) => {
        // SAFETY: an `extern "C"` function pointer; its shim places the arguments by System V.
        unsafe impl<R: RetVal + 'static, $($A: Arg + 'static),*> Signature
            for $($unsafe)? extern "C" fn($($A),*) -> R
        {
            type Output = R;

            const CHECK: () = check_signature(&[$(<$A as Arg>::CLASS),*]);

            const __ZERO: Self = {
                #[allow(improper_ctypes_definitions)]
                extern "C" fn zero<R: RetVal, $($A),*>($(_: $A),*) -> R {
                    R::__zero()
                }
                zero::<R, $($A),*>
            };

            #[inline(always)]
            fn __shim<S: Site>() -> Self {
                #[inline(always)]
                #[allow(improper_ctypes_definitions)]
                extern "C" fn shim<S: Site, R: RetVal, $($A: Arg),*>($($a: $A),*) -> R {
                    $crate::__shim_body!(
                        S,
                        R,
                        // SAFETY: `key_site` ties the site to a key of this type, and a key's
                        // function only ever holds values of its type.
                        unsafe {
                            ::core::mem::transmute::<*const (), $($unsafe)? extern "C" fn($($A),*) -> R>(
                                S::key().__func(),
                            )
                        };
                        $($a),*
                    )
                }
                shim::<S, R, $($A),*>
            }
        }
    };
}

impl_signature!();
impl_signature!(A0 a0);
impl_signature!(A0 a0 A1 a1);
impl_signature!(A0 a0 A1 a1 A2 a2);
impl_signature!(A0 a0 A1 a1 A2 a2 A3 a3);
impl_signature!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4);
impl_signature!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5);
impl_signature!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6);
impl_signature!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7);
impl_signature!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8);
impl_signature!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9);
impl_signature!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10);
impl_signature!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11);
impl_signature!(
    A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11 A12 a12
);
impl_signature!(
    A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11 A12 a12 A13 a13
);

/// `key.call(args)`: calls a key that is only known at run time (a `&StaticCall` in a variable,
/// in a heap object, picked from an array). No site can prove which key it belongs to, so none
/// is ever bound to one: where the build makes it a guarded run-time site (`guard.rs`), the site
/// is patched to a guard stub that checks what the key holds on every call; otherwise it is an
/// atomic load of the current target and an indirect call. `call_guarded` and `call_indirect`
/// (in `guard.rs`) choose per call.
macro_rules! impl_call {
    ($($A:ident $a:ident)*) => {
        impl<R: RetVal, $($A: Arg),*> StaticCall<extern "C" fn($($A),*) -> R> {
            /// Calls the key's current target, for a key known only at run time; see
            /// [`static_call!`](crate::static_call) for named keys.
            ///
            /// In a retpoline build (or with `STATIC_CALL_GUARDS=on` at build time) this is a
            /// guarded run-time site, patched to a stub that checks what the key holds and jumps
            /// straight there; otherwise a plain indirect call. [`status`](crate::status)`().guards`
            /// says which; `call_guarded` and `call_indirect` choose per call. Either way every
            /// call reaches the target the key holds when it is made.
            ///
            /// ```
            /// use static_call::StaticCall;
            /// extern "C" fn neg(x: i32) -> i32 { -x }
            /// extern "C" fn abs(x: i32) -> i32 { x.abs() }
            /// static KEYS: [StaticCall<extern "C" fn(i32) -> i32>; 2] =
            ///     [StaticCall::new(neg), StaticCall::new(abs)];
            /// let key = &KEYS[1];
            /// assert_eq!(key.call(-3), 3);
            /// ```
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            pub fn call(&self, $($a: $A),*) -> R {
                crate::guard::default_call!(self, R; $($a),*)
            }
        }

        impl<R: RetVal, $($A: Arg),*> StaticCall<unsafe extern "C" fn($($A),*) -> R> {
            /// Calls the key's current target, for a key known only at run time: a guarded
            /// run-time site or a plain indirect call, as for the safe form.
            ///
            /// # Safety
            /// Whatever the key's function type requires of its callers.
            ///
            /// ```
            /// use static_call::StaticCall;
            /// unsafe extern "C" fn read(p: *const u8) -> u8 { unsafe { *p } }
            /// let key = StaticCall::new(read as unsafe extern "C" fn(*const u8) -> u8);
            /// // SAFETY: a readable byte.
            /// assert_eq!(unsafe { key.call(&7) }, 7);
            /// ```
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn call(&self, $($a: $A),*) -> R {
                // (Unused in builds where the call is a guarded site, which has its own.)
                #[allow(unused_unsafe)]
                // SAFETY: the caller upholds the target's contract.
                let r = unsafe { crate::guard::default_call!(self, R; $($a),*) };
                r
            }
        }
    };
}

impl_call!();
impl_call!(A0 a0);
impl_call!(A0 a0 A1 a1);
impl_call!(A0 a0 A1 a1 A2 a2);
impl_call!(A0 a0 A1 a1 A2 a2 A3 a3);
impl_call!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4);
impl_call!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5);
impl_call!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6);
impl_call!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7);
impl_call!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8);
impl_call!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9);
impl_call!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10);
impl_call!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11);
impl_call!(
    A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11 A12 a12
);
impl_call!(
    A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11 A12 a12 A13 a13
);

/// What a key's type knows about calling it: a shim for each site, generic over the site.
/// Implemented for `StaticCall<F>` (with the generic shims of [`Signature`]) and by
/// `define_static_call!` for its key types (with shims written from the signature's tokens, so
/// that borrowed arguments work).
///
/// # Safety
/// `__shim::<S>()` must return a function of type `Fn` whose body is the site `S`, called with
/// the function's arguments placed by System V.
#[doc(hidden)]
pub unsafe trait KeyShims {
    type Fn: Copy;
    fn __shim<S: Site>() -> Self::Fn;
}

// SAFETY: `Signature::__shim` is such a function.
unsafe impl<F: Signature> KeyShims for StaticCall<F> {
    type Fn = F;

    #[inline(always)]
    fn __shim<S: Site>() -> F {
        F::__shim::<S>()
    }
}

/// A key that is one particular `static`, as [`define_static_call!`] defines it. Generic code
/// takes "some key with this signature" through this trait and calls it with
/// `static_call!(<K>)(args)`; every monomorphised copy gets its own, patchable, call sites.
///
/// ```
/// use static_call::{StaticCallKey, define_static_call, static_call};
///
/// define_static_call!(INC: extern "C" fn(u32) -> u32 = inc);
/// define_static_call!(DEC: extern "C" fn(u32) -> u32 = dec);
/// extern "C" fn inc(x: u32) -> u32 { x + 1 }
/// extern "C" fn dec(x: u32) -> u32 { x - 1 }
///
/// fn apply<K: StaticCallKey<Fn = extern "C" fn(u32) -> u32>>(x: u32) -> u32 {
///     static_call!(<K>)(x)
/// }
/// assert_eq!(apply::<INC>(10), 11);
/// assert_eq!(apply::<DEC>(10), 9);
/// ```
///
/// # Safety
/// Implemented by [`define_static_call!`] only: `__site` must return a function whose body is a
/// call site bound to `key()`.
///
/// [`define_static_call!`]: crate::define_static_call
pub unsafe trait StaticCallKey: Sync + 'static {
    /// The key's function-pointer type.
    type Fn: Copy;
    /// The class of the result: whether the key can be null or return zero.
    #[doc(hidden)]
    const __RESULT: Class;
    /// Whether the result type is `ZeroableResult`.
    #[doc(hidden)]
    const __ZEROABLE: bool;
    /// The key itself.
    ///
    /// ```
    /// use static_call::{StaticCallKey, define_static_call};
    /// define_static_call!(K: extern "C" fn() -> u8 = seven);
    /// extern "C" fn seven() -> u8 { 7 }
    ///
    /// fn current<K: StaticCallKey<Fn = extern "C" fn() -> u8>>() -> u8 {
    ///     K::key().query()()
    /// }
    /// assert_eq!(current::<K>(), 7);
    /// ```
    fn key() -> &'static StaticCall<Self::Fn>;
    /// A function of type `Fn` whose body is a call site of this key, distinct for every `U`.
    #[doc(hidden)]
    fn __site<U: crate::site::SiteId>() -> Self::Fn;
    /// A function of type `Fn` that returns nothing, or zero.
    #[doc(hidden)]
    fn __zero() -> Self::Fn;

    /// [`StaticCall::set_null`], for any key `define_static_call!` defines, including those whose
    /// signature borrows. Using it on a key that returns a value fails to compile.
    ///
    /// ```
    /// use static_call::{StaticCallKey, Target, define_static_call, static_call};
    /// pub struct Event { pub id: u32 }
    /// extern "C" fn trace(_: &Event) {}
    /// define_static_call!(ON_EVENT: extern "C" fn(&Event) = trace);
    ///
    /// ON_EVENT.set_null();
    /// static_call!(ON_EVENT)(&Event { id: 1 });
    /// assert_eq!(ON_EVENT.target(), Target::Null);
    /// ```
    fn set_null(&self) {
        expect_set(self.try_set_null());
    }

    /// [`StaticCall::try_set_null`], for any key `define_static_call!` defines.
    fn try_set_null(&self) -> Result<(), Error> {
        const {
            assert!(
                matches!(Self::__RESULT, Class::Void),
                "set_null: only a key that returns () can have a null target"
            )
        };
        // SAFETY: `__zero` returns nothing, and the assertion makes this a key returning ().
        unsafe { Self::key().__try_set(Target::Null, Self::__zero()) }
    }

    /// [`StaticCall::set_return_zero`], for any key `define_static_call!` defines. Using it on a
    /// key whose result cannot be zero fails to compile.
    fn set_return_zero(&self) {
        expect_set(self.try_set_return_zero());
    }

    /// [`StaticCall::try_set_return_zero`], for any key `define_static_call!` defines.
    fn try_set_return_zero(&self) -> Result<(), Error> {
        const {
            assert!(
                Self::__ZEROABLE,
                "set_return_zero: the key's result type cannot be zero (or is not returned in rax)"
            )
        };
        // SAFETY: `__zero` returns zero, a valid value of a `ZeroableResult` result.
        unsafe { Self::key().__try_set(Target::ReturnZero, Self::__zero()) }
    }
}
