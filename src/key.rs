//! Keys: what a static call calls, and the list of sites that call it.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::adapter::RustSig;
use crate::diagnostics::{Error, ErrorKind, SiteInfo};
use crate::imp;
use crate::rust_key::{Adapter, RustAbi, RustTarget, commit};
use crate::site::{Arg, Class, NoResult, RetVal, Site, ZeroableResult, check_signature};

/// What a key's sites do when called: the internal, untyped form of [`Target`], and of a
/// branch key's state.
///
/// Each call variant holds the function the trampoline jumps to. For `Null` and `Ret0` that is
/// the signature's zero function (which returns nothing, or zero); patched sites do not call it
/// at all: they hold a 5-byte NOP or `xor eax, eax`. `Branch` is the state of a
/// [`StaticBranch`](crate::StaticBranch): no call site is ever bound to such a key.
///
/// A branch site (`static_branch!`, `has_target!`) is *on* for `Branch(true)` and for every call
/// target but `Null` ([`RawTarget::branch_on`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RawTarget {
    /// Call this function.
    Call(*const ()),
    /// Do nothing (the key returns `()`).
    Null(*const ()),
    /// Return zero (the key returns an integer, a pointer, `bool`...).
    Ret0(*const ()),
    /// A branch key, on or off.
    Branch(bool),
}

const MODE_CALL: usize = 0;
pub(crate) const MODE_NULL: usize = 1;
const MODE_RET0: usize = 2;
pub(crate) const MODE_OFF: usize = 3;
const MODE_ON: usize = 4;
pub(crate) const MODE_MASK: usize = 7;
const MODE_BITS: u32 = 3;

impl RawTarget {
    /// The function the trampoline jumps to for this target (null for a branch key, whose
    /// sites never reach the trampoline).
    pub(crate) const fn func(self) -> *const () {
        match self {
            RawTarget::Call(f) | RawTarget::Null(f) | RawTarget::Ret0(f) => f,
            RawTarget::Branch(_) => core::ptr::null(),
        }
    }

    const fn mode(self) -> usize {
        match self {
            RawTarget::Call(_) => MODE_CALL,
            RawTarget::Null(_) => MODE_NULL,
            RawTarget::Ret0(_) => MODE_RET0,
            RawTarget::Branch(false) => MODE_OFF,
            RawTarget::Branch(true) => MODE_ON,
        }
    }

    /// Whether the branch sites of a key with this target take their branch: a branch key that
    /// is on, or a call key that has a target (anything but `Null`).
    #[cfg_attr(not(static_call_patching), allow(dead_code))]
    pub(crate) const fn branch_on(self) -> bool {
        mode_is_on(self.mode())
    }
}

/// `RawTarget::branch_on` of the target whose mode is `mode`.
const fn mode_is_on(mode: usize) -> bool {
    mode != MODE_NULL && mode != MODE_OFF
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

/// Where in a key its mode word is, for the branch entry's fast path (`asm/branch_x86_64.S`),
/// which reads the mode in its low byte (little-endian).
#[cfg_attr(not(static_call_patching), allow(dead_code))]
pub(crate) const MODE_WORD_OFFSET: usize = core::mem::offset_of!(RawKey, sites);

impl RawKey {
    pub(crate) const fn new(target: RawTarget) -> Self {
        RawKey {
            func: AtomicPtr::new(target.func() as *mut ()),
            sites: AtomicUsize::new(target.mode()),
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
            MODE_OFF => RawTarget::Branch(false),
            MODE_ON => RawTarget::Branch(true),
            _ => RawTarget::Call(f),
        }
    }

    /// Whether the key's branch sites take their branch now ([`RawTarget::branch_on`]): what an
    /// unpatched branch site asks, and the portable fallback's `static_branch!`. One load.
    ///
    /// Acquire pairs with the Release store of `set_mode`: a thread that sees a branch on also
    /// sees what the thread that switched it on wrote before.
    #[inline]
    pub fn __branch_on(&self) -> bool {
        mode_is_on(self.sites.load(Ordering::Acquire) & MODE_MASK)
    }

    /// Sets the target: `set_mode`, then `set_func`. Under the patch lock (or in the fallback,
    /// where there are no sites).
    ///
    /// In the order `kinds::phase` gives the patcher, for code that reads the key itself (the
    /// portable fallback, sites before the runtime exists): the function first when the key's
    /// branches go on, the mode first otherwise. So a hook branch that reads "on" (Acquire)
    /// always finds the function it guards, never the zero function of a key without a target.
    pub(crate) fn set_target(&self, target: RawTarget) {
        if !self.target().branch_on() && target.branch_on() {
            self.set_func(target);
            self.set_mode(target);
        } else {
            self.set_mode(target);
            self.set_func(target);
        }
    }

    /// Sets the part of the target that branch sites read (and `target()` reports): its mode.
    /// Under the patch lock, or in the fallback. A hook update publishes it in its own phase
    /// (`patcher::update`).
    pub(crate) fn set_mode(&self, target: RawTarget) {
        let head = self.sites.load(Ordering::Relaxed) & !MODE_MASK;
        // Release: pairs with `__branch_on`'s Acquire (see there).
        self.sites.store(head | target.mode(), Ordering::Release);
    }

    /// Sets the part of the target that the call trampoline reads: the function. Under the
    /// patch lock, or in the fallback.
    pub(crate) fn set_func(&self, target: RawTarget) {
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
/// `F` is the key's function-pointer type:
/// - `extern "C" fn(A0, …) -> R` or `unsafe extern "C" fn(A0, …) -> R`, with arguments that
///   travel in registers: sites call the target directly. 16 bytes.
/// - a Rust function type, `fn(A0, …) -> R`, `unsafe fn(..)`, `extern "C-unwind" fn(..)`, with
///   any sized arguments and result: sites call an adapter into which the target inlines, and a
///   panic in the target unwinds to the caller (see [`to`](StaticCall::to)). 24 bytes.
///
/// `A`, the key's [`Abi`], follows from `F` and is written only where `F` borrows (see
/// [`Signature`]). Define keys with [`define_static_call!`]; a `StaticCall` can also be a field
/// of a `static` struct (an operations table), constructed with [`StaticCall::new`] (an
/// `extern "C"` key) or [`StaticCall::to`] (a Rust key), and called with
/// `static_call!(OPS.field)(args)`.
///
/// A key needs no heap before its first call and is `const`-constructible.
///
/// ```
/// use static_call::{StaticCall, static_call};
///
/// extern "C" fn disk_read(block: u64) -> i32 { (block % 7) as i32 }
/// extern "C" fn ram_read(_block: u64) -> i32 { 0 }
/// fn find(hay: &'static str) -> Option<usize> { hay.find('x') }
///
/// pub struct Ops {
///     pub read: StaticCall<extern "C" fn(u64) -> i32>,
///     pub find: StaticCall<fn(&'static str) -> Option<usize>>,
/// }
/// pub static OPS: Ops = Ops { read: StaticCall::new(disk_read), find: StaticCall::to(find) };
///
/// assert_eq!(static_call!(OPS.read)(9), 2);
/// OPS.read.update(ram_read);
/// assert_eq!(static_call!(OPS.read)(9), 0);
/// assert_eq!(static_call!(OPS.find)("abxd"), Some(2));
/// OPS.find.update(|hay| hay.rfind('d'));
/// assert_eq!(static_call!(OPS.find)("abxd"), Some(3));
/// assert_eq!(size_of::<StaticCall<extern "C" fn(u64) -> i32>>(), 16);
/// assert_eq!(size_of::<StaticCall<fn(&'static str) -> Option<usize>>>(), 24);
/// ```
///
/// [`define_static_call!`]: crate::define_static_call
#[repr(C)]
pub struct StaticCall<F, A = <F as Signature>::Abi> {
    raw: RawKey,
    pub(crate) abi: A,
    _sig: PhantomData<F>,
}

/// How a key's sites reach its target, and what the key holds besides its [`RawKey`]: the second
/// type parameter of [`StaticCall`]. Implemented by [`CAbi`] and [`RustAbi`] only.
///
/// ```
/// use static_call::{Abi, CAbi, RustAbi, Signature};
/// fn abi_of<F: Signature>() -> &'static str {
///     if F::Abi::IS_RUST { "Rust" } else { "C" }
/// }
/// assert_eq!(abi_of::<extern "C" fn(u8)>(), "C");
/// assert_eq!(abi_of::<fn(u8)>(), "Rust");
/// # let _: (Option<CAbi>, Option<RustAbi>) = (None, None);
/// ```
pub trait Abi: sealed::Sealed + Sync + 'static {
    /// Whether the key's targets are Rust functions, reached through adapters.
    const IS_RUST: bool;
    /// The function `query()` returns, given the key's `RawKey`.
    #[doc(hidden)]
    fn __function(&self, raw: &RawKey) -> *const ();
    /// A change of the key's target that also sets this word to `rust` (Rust keys), or not.
    #[doc(hidden)]
    fn __with(&self, rust: *const ()) -> Option<(&AtomicPtr<()>, *const ())>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::CAbi {}
    impl Sealed for crate::RustAbi {}
}

/// The [`Abi`] of an `extern "C"` key: nothing besides the [`RawKey`]; sites call the target
/// directly.
///
/// ```
/// use static_call::{CAbi, StaticCall};
/// extern "C" fn one() -> u8 { 1 }
/// static K: StaticCall<extern "C" fn() -> u8, CAbi> = StaticCall::new(one);
/// assert_eq!(size_of_val(&K), 16);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct CAbi;

impl Abi for CAbi {
    const IS_RUST: bool = false;
    fn __function(&self, raw: &RawKey) -> *const () {
        raw.func()
    }
    fn __with(&self, _: *const ()) -> Option<(&AtomicPtr<()>, *const ())> {
        None
    }
}

impl Abi for RustAbi {
    const IS_RUST: bool = true;
    fn __function(&self, _: &RawKey) -> *const () {
        self.get()
    }
    fn __with(&self, rust: *const ()) -> Option<(&AtomicPtr<()>, *const ())> {
        self.with(rust)
    }
}

/// The `A` of a key whose Rust function (ignored by `CAbi`) is `rust`.
const fn abi_word<A: Abi>(rust: *const ()) -> A {
    const {
        assert!(
            size_of::<A>() == 0 || size_of::<A>() == size_of::<*const ()>(),
            "an Abi is empty (CAbi) or one pointer (RustAbi)"
        )
    };
    union Cast<A> {
        p: *const (),
        a: core::mem::ManuallyDrop<A>,
    }
    // SAFETY: `A` is `CAbi` (zero-sized: nothing is read) or `RustAbi` (a transparent
    // `AtomicPtr<()>`, whose bits are a pointer's).
    core::mem::ManuallyDrop::into_inner(unsafe { Cast { p: rust }.a })
}

/// One change of a key's target: its new `RawTarget`, and for a Rust key its new word.
#[doc(hidden)]
pub struct Change<'a> {
    pub(crate) raw: &'a RawKey,
    pub(crate) target: RawTarget,
    pub(crate) rust: Option<(&'a AtomicPtr<()>, *const ())>,
}

impl<'a> Change<'a> {
    /// A change of `raw` alone: an `extern "C"` key's target, or a branch's state.
    pub(crate) fn raw(raw: &'a RawKey, target: RawTarget) -> Self {
        Change {
            raw,
            target,
            rust: None,
        }
    }

    pub(crate) fn call(
        raw: &'a RawKey,
        func: *const (),
        rust: Option<(&'a AtomicPtr<()>, *const ())>,
    ) -> Self {
        Change {
            raw,
            target: RawTarget::Call(func),
            rust,
        }
    }
}

/// "`Self` is a key that can take `T` as its target": `F` for an `extern "C"` key of type `F`,
/// any zero-sized function of its signature for a Rust key. What [`Batch::update`] and a Rust
/// key's `update` accept.
///
/// # Safety
/// `__change` must describe a change to a target of the key's type.
#[doc(hidden)]
pub unsafe trait Accepts<T> {
    fn __change(&self, target: T) -> Change<'_>;
}

// SAFETY: the target is a function of the key's type.
unsafe impl<F: Copy> Accepts<F> for StaticCall<F, CAbi> {
    fn __change(&self, target: F) -> Change<'_> {
        Change::call(&self.raw, fn_to_ptr(target), None)
    }
}

impl<F: Copy, A: Abi> StaticCall<F, A> {
    /// A key from its parts.
    #[doc(hidden)]
    pub const fn __from_parts(raw: RawKey, abi: A) -> Self {
        StaticCall {
            raw,
            abi,
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
            RawTarget::Call(_) => Target::Function(self.query()),
            RawTarget::Null(_) => Target::Null,
            RawTarget::Ret0(_) => Target::ReturnZero,
            // A `StaticCall` is never given a branch state.
            RawTarget::Branch(_) => unreachable!("a call key holds a call target"),
        }
    }

    /// The function a call reaches now: the target, or for a key set to
    /// [`Null`](Target::Null) or [`ReturnZero`](Target::ReturnZero), a function of the key's
    /// type that does nothing or returns zero. [`target`](Self::target) tells which.
    ///
    /// For a Rust key whose target is a function item or a closure, this is a function of the
    /// key's type that calls the target (not necessarily at the target's own address).
    ///
    /// ```
    /// static_call::define_static_call!(OP: extern "C" fn() -> u8 = one);
    /// extern "C" fn one() -> u8 { 1 }
    ///
    /// let f: extern "C" fn() -> u8 = OP.query();
    /// assert_eq!(f(), 1);
    /// ```
    pub fn query(&self) -> F {
        // SAFETY: `func` of an `extern "C"` key, and the word of a Rust key, only ever hold
        // functions of type `F`.
        unsafe { ptr_to_fn(self.abi.__function(&self.raw)) }
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

    /// Sets the key to its zero function (`null`: nothing; else: zero). For `StaticCallKey`.
    ///
    /// # Safety
    /// `func` must be the key's zero function for its conventions (an `extern "C"` function of
    /// type `F`, or the zero adapter), `rust` (Rust keys) a function of type `F` that does the
    /// same, and the key's result `()` (`null`) or a `ZeroableResult`.
    #[doc(hidden)]
    pub unsafe fn __try_set_zero(
        &self,
        null: bool,
        func: *const (),
        rust: *const (),
    ) -> Result<(), Error> {
        let target = if null {
            RawTarget::Null(func)
        } else {
            RawTarget::Ret0(func)
        };
        commit(&[Change {
            raw: &self.raw,
            target,
            rust: self.abi.__with(rust),
        }])
    }
}

impl<F: Signature> StaticCall<F, F::Abi> {
    /// An `extern "C"` key whose target is `f`.
    ///
    /// For signatures whose arguments borrow (`extern "C" fn(&T)`), define the key with
    /// [`define_static_call!`](crate::define_static_call) instead: such function types are
    /// higher-ranked and only the macro can build their call sites. A Rust key is built with
    /// [`StaticCall::to`].
    ///
    /// ```
    /// use static_call::{StaticCall, static_call};
    /// extern "C" fn first(x: u8) -> u8 { x }
    /// static KEY: StaticCall<extern "C" fn(u8) -> u8> = StaticCall::new(first);
    /// assert_eq!(static_call!(KEY)(9), 9);
    /// ```
    pub const fn new(f: F) -> Self
    where
        F: ExternC,
    {
        let () = F::CHECK;
        Self::__from_parts(
            RawKey::new(RawTarget::Call(fn_to_ptr(f))),
            abi_word(core::ptr::null()),
        )
    }

    /// A key with no target: calls do nothing (the kernel's `DEFINE_STATIC_CALL_NULL`). Only
    /// for keys that return `()` (and, for a Rust key, whose arguments need no dropping: a
    /// patched site that does nothing cannot drop them).
    ///
    /// ```
    /// use static_call::{StaticCall, Target};
    /// static HOOK: StaticCall<extern "C" fn(u32)> = StaticCall::null();
    /// static RUST_HOOK: StaticCall<fn(&'static str)> = StaticCall::null();
    /// assert_eq!(HOOK.target(), Target::Null);
    /// assert_eq!(RUST_HOOK.target(), Target::Null);
    /// ```
    pub const fn null() -> Self
    where
        F::Output: NoResult,
    {
        let () = F::CHECK;
        const { assert_zero_target_drops_nothing::<F>() };
        Self::__from_parts(
            RawKey::new(RawTarget::Null(F::__ZERO_FUNC)),
            abi_word(F::__ZERO_RUST),
        )
    }

    /// A key whose calls return zero (the kernel's `DEFINE_STATIC_CALL_RET0`). Only for keys
    /// that return an integer, `bool`, `char`, a raw pointer or an `Option` of a reference (and,
    /// for a Rust key, whose arguments need no dropping).
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
        const { assert_zero_target_drops_nothing::<F>() };
        Self::__from_parts(
            RawKey::new(RawTarget::Ret0(F::__ZERO_FUNC)),
            abi_word(F::__ZERO_RUST),
        )
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
        const { assert_zero_target_drops_nothing::<F>() };
        // SAFETY: the signature's zero functions, for a key returning `()`.
        unsafe { self.__try_set_zero(true, F::__ZERO_FUNC, F::__ZERO_RUST) }
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
        const { assert_zero_target_drops_nothing::<F>() };
        // SAFETY: the signature's zero functions, for a key returning a `ZeroableResult`.
        unsafe { self.__try_set_zero(false, F::__ZERO_FUNC, F::__ZERO_RUST) }
    }
}

/// A Rust key can do nothing, or return zero, only if no argument needs dropping: a patched site
/// that is a NOP (or `xor eax, eax`) runs no code that could drop them.
#[doc(hidden)]
pub const fn assert_zero_target_drops_nothing<F: Signature>() {
    assert!(
        !F::__ARGS_NEED_DROP,
        "static_call: a key whose arguments need dropping cannot do nothing or return zero (a patched NOP would leak them): give it a target that takes them, such as `|_| {{}}`"
    );
}

/// Panics on a failed update, saying what the error leaves behind (see [`ErrorKind`]).
pub(crate) fn expect_set(result: Result<(), Error>) {
    if let Err(e) = result {
        let left = match e.kind {
            ErrorKind::NotSynced { .. } => "the change was made, but cores were not serialised",
            ErrorKind::UndoFailed => "every key keeps its old target, one site may not",
            _ => "nothing changed: every key keeps its old target",
        };
        panic!("static_call: update failed ({left}): {e}");
    }
}

impl<F: Copy> StaticCall<F, CAbi> {
    /// # Safety
    /// `F` must be an `extern "C"` or `unsafe extern "C"` function-pointer type.
    #[doc(hidden)]
    pub const unsafe fn __new_unchecked(f: F) -> Self {
        Self::__from_parts(RawKey::new(RawTarget::Call(fn_to_ptr(f))), CAbi)
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
        Self::__from_parts(RawKey::new(target), CAbi)
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
}

impl<F: Copy> StaticCall<F, RustAbi> {
    /// A Rust key whose target is `target`: a function item, or a closure that captures
    /// nothing. Sites call an adapter made for `target`, into which its body inlines, so a
    /// patched call costs what a direct call of `target` does.
    ///
    /// A target must be zero-sized, `Copy` and `'static`, since it is called without a value of
    /// it: a closure that captures anything is refused at compile time (one capturing a
    /// zero-sized value that is not `Copy`, such as a drop guard, with an error that names it).
    ///
    /// ```
    /// use static_call::{StaticCall, static_call};
    ///
    /// fn sum(v: Vec<u32>) -> u64 { v.iter().map(|&x| x as u64).sum() }
    ///
    /// struct Ops {
    ///     sum: StaticCall<fn(Vec<u32>) -> u64>,
    ///     scale: StaticCall<fn(f64, f64) -> f64>,
    /// }
    /// static OPS: Ops = Ops { sum: StaticCall::to(sum), scale: StaticCall::to(|x: f64, k: f64| x * k) };
    ///
    /// assert_eq!(static_call!(OPS.sum)(vec![1, 2, 3]), 6);
    /// assert_eq!(static_call!(OPS.scale)(1.5, 2.0), 3.0);
    /// ```
    pub const fn to<T: Copy>(target: T) -> Self
    where
        Self: RustTarget<T>,
    {
        let _ = target; // `Copy`, zero-sized: the key conjures it when called
        crate::rust_key::key_from_parts(
            <Self as RustTarget<T>>::FUNC,
            <Self as RustTarget<T>>::RUST,
        )
    }

    /// Makes every call through this key call `target`, a function item or a closure that
    /// captures nothing (see [`to`](Self::to)). Synchronous and all or nothing, like an
    /// `extern "C"` key's [`update`](StaticCall::update).
    ///
    /// # Panics
    /// When [`try_update`](Self::try_update) would fail; then the key keeps its old target.
    ///
    /// ```
    /// use static_call::{StaticCall, static_call};
    /// static LEN: StaticCall<fn(String) -> usize> = StaticCall::to(|s: String| s.len());
    /// assert_eq!(static_call!(LEN)("four".to_string()), 4);
    /// LEN.update(|s| s.chars().count());
    /// assert_eq!(static_call!(LEN)("ünï".to_string()), 3);
    /// ```
    pub fn update<T>(&self, target: T)
    where
        Self: Accepts<T>,
    {
        expect_set(self.try_update(target));
    }

    /// Like [`update`](Self::update), reporting failure (after which the key keeps its old
    /// target) instead of panicking.
    ///
    /// ```
    /// use static_call::StaticCall;
    /// static NEG: StaticCall<fn(i64) -> i64> = StaticCall::to(|x: i64| -x);
    /// NEG.try_update(|x: i64| x.abs()).expect("code is writable here");
    /// assert_eq!(NEG.query()(-5), 5);
    /// ```
    pub fn try_update<T>(&self, target: T) -> Result<(), Error>
    where
        Self: Accepts<T>,
    {
        commit(&[self.__change(target)])
    }

    /// Installs an [`Adapter`]: a `#[target_feature]` function or an `unsafe fn`, adapted where
    /// it was named. Synchronous and all or nothing, like [`update`](Self::update).
    ///
    /// ```
    /// use static_call::{define_static_call, static_call, unsafe_target};
    /// unsafe fn first(v: &[u8]) -> u8 { unsafe { *v.get_unchecked(0) } }
    /// define_static_call!(FIRST: unsafe fn(&[u8]) -> u8 = |v| v[0]);
    /// // SAFETY: callers of the unsafe key `FIRST` promise a non-empty slice.
    /// FIRST.update_adapter(unsafe { unsafe_target!(FIRST, first) });
    /// assert_eq!(unsafe { static_call!(FIRST)(&[4, 5]) }, 4);
    /// ```
    pub fn update_adapter(&self, adapter: Adapter<F>) {
        expect_set(self.try_update_adapter(adapter));
    }

    /// Like [`update_adapter`](Self::update_adapter), reporting failure instead of panicking.
    ///
    /// ```
    /// use static_call::{define_static_call, unsafe_target};
    /// unsafe fn id(x: u8) -> u8 { x }
    /// define_static_call!(ID: unsafe fn(u8) -> u8 = |x| x);
    /// // SAFETY: `id` has no precondition.
    /// ID.try_update_adapter(unsafe { unsafe_target!(ID, id) }).expect("code is writable here");
    /// ```
    pub fn try_update_adapter(&self, adapter: Adapter<F>) -> Result<(), Error> {
        commit(&[adapter.change(self)])
    }

    /// Makes every call through this key call the function pointer `f`, chosen at run time.
    ///
    /// The slower path: sites call a stub that loads `f` from the key and jumps to an adapter
    /// that calls it, which costs a jump and an indirect call more than a function item given
    /// to [`update`](Self::update) (whose body inlines into its adapter). Use it when the
    /// target is only known as a pointer (from a table, a plug-in).
    ///
    /// ```
    /// use static_call::{StaticCall, static_call};
    /// fn inc(x: u64) -> u64 { x + 1 }
    /// fn dec(x: u64) -> u64 { x - 1 }
    /// static OP: StaticCall<fn(u64) -> u64> = StaticCall::to(inc);
    ///
    /// let table: [fn(u64) -> u64; 2] = [inc, dec];
    /// OP.update_pointer(table[std::hint::black_box(1)]);
    /// assert_eq!(static_call!(OP)(10), 9);
    /// assert_eq!(OP.query() as usize, dec as fn(u64) -> u64 as usize);
    /// ```
    pub fn update_pointer(&self, f: F)
    where
        Self: RustSig<Fn = F>,
    {
        expect_set(self.try_update_pointer(f));
    }

    /// Like [`update_pointer`](Self::update_pointer), reporting failure instead of panicking.
    ///
    /// ```
    /// use static_call::StaticCall;
    /// fn inc(x: u64) -> u64 { x + 1 }
    /// static OP: StaticCall<fn(u64) -> u64> = StaticCall::to(|x: u64| x);
    /// OP.try_update_pointer(inc).expect("code is writable here");
    /// assert_eq!(OP.query()(1), 2);
    /// ```
    pub fn try_update_pointer(&self, f: F) -> Result<(), Error>
    where
        Self: RustSig<Fn = F>,
    {
        commit(&[self.__change_to_pointer::<Self>(f)])
    }

    /// The change to the pointer target `f`, for a key of conventions `K`.
    #[doc(hidden)]
    pub fn __change_to_pointer<K: RustSig>(&self, f: F) -> Change<'_> {
        self.__change_to(crate::adapter::pointer_stub::<K> as *const (), fn_to_ptr(f))
    }

    /// The change to the adapter `func`, with the Rust function `rust`.
    #[doc(hidden)]
    pub fn __change_to(&self, func: *const (), rust: *const ()) -> Change<'_> {
        Change::call(&self.raw, func, self.abi.with(rust))
    }

    /// Makes the changes. For the methods `define_static_call!` writes.
    #[doc(hidden)]
    pub fn __commit(changes: &[Change<'_>]) -> Result<(), Error> {
        commit(changes)
    }

    /// The function `key.call(args)` calls: the one place that decides how a run-time call of a
    /// Rust key is made (today: the key's Rust function, through a plain indirect call).
    #[doc(hidden)]
    #[inline]
    pub fn __run_time_target(&self) -> F {
        self.query()
    }

    /// Panics with the message `update` gives when `result` is an error.
    #[doc(hidden)]
    pub fn __expect(result: Result<(), Error>) {
        expect_set(result);
    }
}

impl<F: Copy, A: Abi> core::fmt::Debug for StaticCall<F, A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StaticCall")
            .field("key", &self.as_ptr())
            .field("target", &self.raw.func())
            .field("function", &self.abi.__function(&self.raw))
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
/// Rust keys take function items and closures, as their own `update` does: a closure's
/// argument types are inferred from the key.
///
/// ```
/// use static_call::{Batch, StaticCall, define_static_call, static_call};
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
/// define_static_call!(NAME: fn(&str) -> String = |s| s.to_uppercase());
///
/// assert_eq!(static_call!(OPS.read)(7), 7);
/// Batch::new()
///     .update(&OPS.read, null_read)
///     .set_return_zero(&OPS.write)
///     .set_null(&OPS.trace)
///     .update(&NAME, |s| s.to_lowercase())
///     .commit();
/// assert_eq!(static_call!(OPS.read)(7), -1);
/// assert_eq!(static_call!(OPS.write)(7), 0);
/// assert_eq!(static_call!(NAME)("AbC"), "abc");
/// ```
#[must_use = "a batch changes nothing until it is committed"]
#[derive(Default)]
pub struct Batch<'a> {
    changes: Vec<Change<'a>>,
}

impl<'a> Batch<'a> {
    /// An empty batch.
    pub fn new() -> Self {
        Batch {
            changes: Vec::new(),
        }
    }

    /// Adds `key.update(target)`: a function of an `extern "C"` key's type, or a function item
    /// or closure for a Rust key. A key given twice takes its last target.
    pub fn update<K: Accepts<T> + ?Sized, T>(self, key: &'a K, target: T) -> Self {
        self.with(key.__change(target))
    }

    /// Adds `key.update_adapter(adapter)` (a Rust key).
    ///
    /// ```
    /// use static_call::{Batch, define_static_call, static_call, unsafe_target};
    /// unsafe fn id(x: u8) -> u8 { x }
    /// define_static_call!(ID: unsafe fn(u8) -> u8 = |x| x + 1);
    /// // SAFETY: `id` has no precondition.
    /// Batch::new().update_adapter(&ID, unsafe { unsafe_target!(ID, id) }).commit();
    /// assert_eq!(unsafe { static_call!(ID)(3) }, 3);
    /// ```
    pub fn update_adapter<F: Copy>(
        self,
        key: &'a StaticCall<F, RustAbi>,
        adapter: Adapter<F>,
    ) -> Self {
        self.with(adapter.change(key))
    }

    /// Adds `key.set_null()`.
    pub fn set_null<F: Signature>(self, key: &'a StaticCall<F, F::Abi>) -> Self
    where
        F::Output: NoResult,
    {
        const { assert_zero_target_drops_nothing::<F>() };
        self.with(Change {
            raw: &key.raw,
            target: RawTarget::Null(F::__ZERO_FUNC),
            rust: key.abi.__with(F::__ZERO_RUST),
        })
    }

    /// Adds `key.set_return_zero()`.
    pub fn set_return_zero<F: Signature>(self, key: &'a StaticCall<F, F::Abi>) -> Self
    where
        F::Output: ZeroableResult,
    {
        const { assert_zero_target_drops_nothing::<F>() };
        self.with(Change {
            raw: &key.raw,
            target: RawTarget::Ret0(F::__ZERO_FUNC),
            rust: key.abi.__with(F::__ZERO_RUST),
        })
    }

    pub(crate) fn with(mut self, change: Change<'a>) -> Self {
        match self
            .changes
            .iter_mut()
            .find(|c| core::ptr::eq(c.raw, change.raw))
        {
            Some(old) => *old = change,
            None => self.changes.push(change),
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
        commit(&self.changes)
    }
}

/// Converts a function pointer of type `F` to an untyped pointer.
#[doc(hidden)]
pub const fn fn_to_ptr<F: Copy>(f: F) -> *const () {
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

/// A function-pointer type that a [`StaticCall`] can have, with the generic code that calls it:
/// - `extern "C" fn(A0, …) -> R` or `unsafe extern "C" fn(A0, …) -> R` with arguments that
///   travel in registers (up to 6 integer-class and 8 `f32`/`f64`, in any order) and a result
///   of `()`, an integer-class type, `f32` or `f64` ([`Abi`] [`CAbi`]);
/// - `fn(A0, …) -> R`, `unsafe fn`, `extern "C-unwind" fn` and `unsafe extern "C-unwind" fn`
///   with up to 12 sized arguments of any type and any sized result ([`RustAbi`]).
///
/// Implemented here for every such type **without borrowed arguments**. A type whose arguments
/// borrow (`fn(&[u8])`, `extern "C" fn(&T)`) is higher-ranked over the lifetime, which no
/// generic impl covers: rustc reports it as "implementation of `Signature` is not general
/// enough". Spell such a signature out in [`define_static_call!`](crate::define_static_call),
/// which writes its call code from the tokens.
///
/// ```
/// use static_call::{Signature, StaticCall};
///
/// // Generic over any signature: a key with no target, for keys that return ().
/// const fn no_target<F: Signature<Output = ()>>() -> StaticCall<F> {
///     StaticCall::null()
/// }
/// static HOOK: StaticCall<fn(&'static str)> = no_target();
/// static C_HOOK: StaticCall<extern "C" fn(u32)> = no_target();
/// static_call::static_call!(HOOK)("nothing happens");
/// static_call::static_call!(C_HOOK)(7);
/// ```
///
/// # Safety
/// Implemented only by this crate.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a static-call signature",
    label = "not an `extern \"C\" fn` with register arguments, nor a Rust `fn` of sized types",
    note = "a key's type is `extern \"C\" fn(A0, ..) -> R` (arguments in registers), or `fn(A0, ..) -> R`, `unsafe fn(..)`, `extern \"C-unwind\" fn(..)` (any sized arguments, up to 12); variadic functions cannot be static calls",
    note = "a signature whose arguments borrow (`fn(&[u8])`) must be spelled out in `define_static_call!`"
)]
pub unsafe trait Signature: Copy + Send + Sync + 'static {
    /// The result type.
    type Output;
    /// How sites reach a target: [`CAbi`] or [`RustAbi`].
    type Abi: Abi;
    /// Compile-time check that the arguments fit in registers.
    #[doc(hidden)]
    const CHECK: ();
    /// A function of this type that returns nothing, or zero: the target of a key that is
    /// null or returns zero.
    #[doc(hidden)]
    const __ZERO: Self;
    /// What such a key's sites call: `__ZERO` itself, or the zero adapter.
    #[doc(hidden)]
    const __ZERO_FUNC: *const ();
    /// The Rust function such a Rust key holds (null for `extern "C"` keys).
    #[doc(hidden)]
    const __ZERO_RUST: *const ();
    /// Whether some argument needs dropping (then the key cannot be null or return zero).
    #[doc(hidden)]
    const __ARGS_NEED_DROP: bool;
    /// A function of this type whose body is the call site `S`.
    #[doc(hidden)]
    fn __shim<S: Site>() -> Self;
}

/// The `extern "C"` signatures: those whose targets sites call directly, and whose keys are
/// built from a function pointer with [`StaticCall::new`]. Implemented for every [`Signature`]
/// whose [`Abi`] is [`CAbi`].
///
/// ```
/// use static_call::{ExternC, StaticCall};
///
/// // Generic over the `extern "C"` signatures, e.g. to build keys in const contexts.
/// const fn key_for<F: ExternC>(f: F) -> StaticCall<F> {
///     StaticCall::new(f)
/// }
/// extern "C" fn mix(a: u32, b: f64) -> f64 { a as f64 * b }
/// static MIX: StaticCall<extern "C" fn(u32, f64) -> f64> = key_for(mix);
/// assert_eq!(MIX.call(2, 1.5), 3.0);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is a Rust function type: build its key from the target with `StaticCall::to(f)`",
    label = "`StaticCall::new` takes an `extern \"C\"` function",
    note = "a Rust key's sites call an adapter made for its target's type, which a function pointer has lost; a pointer chosen at run time is installed with `update_pointer`"
)]
pub trait ExternC: Signature<Abi = CAbi> {}

macro_rules! impl_signature {
    ($($A:ident $a:ident)*) => {
        impl_signature!(@one [] $($A $a)*);
        impl_signature!(@one [unsafe] $($A $a)*);
    };
    (@one [$($unsafe:tt)?] $($A:ident $a:ident)*) => {
        impl<R, $($A),*> crate::rust_key::BorrowingSignatureMustBeSpelledOutInDefineStaticCall
            for $($unsafe)? extern "C" fn($($A),*) -> R
        {
            type Abi = CAbi;
        }

        #[diagnostic::do_not_recommend]
        impl<R: RetVal + 'static, $($A: Arg + 'static),*> ExternC
            for $($unsafe)? extern "C" fn($($A),*) -> R
        {
        }

        // SAFETY: an `extern "C"` function pointer; its shim places the arguments by System V.
        #[diagnostic::do_not_recommend]
        unsafe impl<R: RetVal + 'static, $($A: Arg + 'static),*> Signature
            for $($unsafe)? extern "C" fn($($A),*) -> R
        {
            type Output = R;
            type Abi = CAbi;

            const CHECK: () = check_signature(&[$(<$A as Arg>::CLASS),*]);

            const __ZERO: Self = {
                #[allow(improper_ctypes_definitions)]
                extern "C" fn zero<R: RetVal, $($A),*>($(_: $A),*) -> R {
                    R::__zero()
                }
                zero::<R, $($A),*>
            };
            const __ZERO_FUNC: *const () = fn_to_ptr(Self::__ZERO);
            const __ZERO_RUST: *const () = core::ptr::null();
            const __ARGS_NEED_DROP: bool = false;

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
        impl<R: RetVal, $($A: Arg),*> StaticCall<extern "C" fn($($A),*) -> R, CAbi> {
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

        impl<R: RetVal, $($A: Arg),*> StaticCall<unsafe extern "C" fn($($A),*) -> R, CAbi> {
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
/// the function's arguments placed as the key's targets take them (System V for an `extern
/// "C"` key, register images for a Rust key).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a key that `static_call!` can name",
    label = "not a static key",
    note = "`static_call!(KEY)` takes a `static` key (or a field of one) by name; for a key known only at run time (a reference in a variable, `*key`), write `key.call(args)`"
)]
pub unsafe trait KeyShims {
    type Fn: Copy;
    fn __shim<S: Site>() -> Self::Fn;
}

// SAFETY: `Signature::__shim` is such a function.
#[diagnostic::do_not_recommend]
unsafe impl<F: Signature<Abi = CAbi>> KeyShims for StaticCall<F, CAbi> {
    type Fn = F;

    #[inline(always)]
    fn __shim<S: Site>() -> F {
        F::__shim::<S>()
    }
}

// SAFETY: `Signature::__shim` is such a function.
#[diagnostic::do_not_recommend]
unsafe impl<F: Signature<Abi = RustAbi>> KeyShims for StaticCall<F, RustAbi> {
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
    /// The key's [`Abi`]: [`CAbi`] or [`RustAbi`].
    type Abi: Abi;
    /// The class of the result: whether the key can be null or return zero.
    #[doc(hidden)]
    const __RESULT: Class;
    /// Whether the result type is `ZeroableResult`.
    #[doc(hidden)]
    const __ZEROABLE: bool;
    /// Whether some argument needs dropping (then the key cannot be null or return zero).
    #[doc(hidden)]
    const __ARGS_NEED_DROP: bool = false;
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
    fn key() -> &'static StaticCall<Self::Fn, Self::Abi>;
    /// A function of type `Fn` whose body is a call site of this key, distinct for every `U`.
    #[doc(hidden)]
    fn __site<U: crate::site::SiteId>() -> Self::Fn;
    /// Sets the key to do nothing (`null`) or return zero, with its zero functions.
    ///
    /// # Safety
    /// The key's result must be `()` (`null`) or a `ZeroableResult`, and no argument may need
    /// dropping.
    #[doc(hidden)]
    unsafe fn __try_set_zero(null: bool) -> Result<(), Error>;

    /// [`StaticCall::set_null`], for any key `define_static_call!` defines, including those whose
    /// signature borrows. Using it on a key that returns a value fails to compile.
    ///
    /// ```
    /// use static_call::{StaticCallKey, Target, define_static_call, static_call};
    /// pub struct Event { pub id: u32 }
    /// extern "C" fn trace(_: &Event) {}
    /// define_static_call!(ON_EVENT: extern "C" fn(&Event) = trace);
    ///
    /// fn silence<K: StaticCallKey>(key: &K) { key.set_null() }
    /// silence(&ON_EVENT);
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
            );
            assert!(
                !Self::__ARGS_NEED_DROP,
                "set_null: a key whose arguments need dropping cannot do nothing (a patched NOP would leak them)"
            );
        };
        // SAFETY: the assertions make this a key returning () whose arguments need no drop.
        unsafe { Self::__try_set_zero(true) }
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
            );
            assert!(
                !Self::__ARGS_NEED_DROP,
                "set_return_zero: a key whose arguments need dropping cannot return zero (a patched `xor eax, eax` would leak them)"
            );
        };
        // SAFETY: the assertions make this a key returning a `ZeroableResult` whose arguments
        // need no drop.
        unsafe { Self::__try_set_zero(false) }
    }
}
