//! Keys: what a static call calls, and the list of sites that call it.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::diagnostics::{Error, SiteInfo};
use crate::imp;
use crate::site::{Arg, RetVal, Site, check_signature};

/// What a key's sites should do when called. Internal form of a key's target.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Target {
    /// Call this function.
    Call(*const ()),
}

impl Target {
    /// The function the trampoline jumps to for this target.
    pub(crate) fn func(self) -> *const () {
        match self {
            Target::Call(f) => f,
        }
    }
}

/// The untyped part of a key: 16 bytes, the layout the kernel settled on.
///
/// - `func`: the current target. Written only under the patch lock (`Release`), read by the
///   trampoline's slow path with `Acquire` so that a target published by `update` (for example
///   freshly generated code) is seen complete.
/// - `sites`: the head of the key's list of patched sites, as registry index + 1 (0 = empty).
///   Read and written only under the patch lock, so `Relaxed` suffices.
#[repr(C)]
#[doc(hidden)]
pub struct RawKey {
    pub(crate) func: AtomicPtr<()>,
    pub(crate) sites: AtomicUsize,
}

impl RawKey {
    const fn new(func: *const ()) -> Self {
        RawKey {
            func: AtomicPtr::new(func as *mut ()),
            sites: AtomicUsize::new(0),
        }
    }

    /// The current target, as the trampoline sees it.
    #[inline]
    pub(crate) fn func(&self) -> *const () {
        self.func.load(Ordering::Acquire)
    }

    pub(crate) fn target(&self) -> Target {
        Target::Call(self.func())
    }

    /// The key's address: what a site's `lea r11, [rip + KEY]` computes.
    pub(crate) fn addr(&self) -> usize {
        self as *const RawKey as usize
    }
}

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
    pub const fn new(f: F) -> Self {
        let () = F::CHECK;
        // SAFETY: `F: Signature` is implemented only for `extern "C"` function pointers.
        unsafe { Self::__new_unchecked(f) }
    }
}

impl<F: Copy> StaticCall<F> {
    /// # Safety
    /// `F` must be an `extern "C"` or `unsafe extern "C"` function-pointer type.
    #[doc(hidden)]
    pub const unsafe fn __new_unchecked(f: F) -> Self {
        StaticCall {
            raw: RawKey::new(fn_to_ptr(f)),
            _sig: PhantomData,
        }
    }

    /// Makes every call through this key call `f`.
    ///
    /// Synchronous: when `update` returns, every registered site of this key has been rewritten
    /// to `call f` and every core has been serialised, so no call that starts afterwards reaches
    /// the old target. Sites not yet patched go through the trampoline, which reads the new
    /// target. All or nothing: if some site cannot be rewritten, nothing changes.
    ///
    /// Not async-signal-safe: it takes the patch lock.
    ///
    /// # Panics
    /// If a site that already calls the old target directly can no longer be rewritten (its page
    /// cannot be made writable, or someone else changed its bytes). The key then keeps its old
    /// target everywhere. Use [`try_update`](Self::try_update) to handle that case.
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
        if let Err(e) = self.try_update(f) {
            panic!("static_call: update failed, the key keeps its old target: {e}");
        }
    }

    /// Like [`update`](Self::update), but reports failure instead of panicking. On `Err`, the
    /// key and every site keep the old target.
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
        imp::update(&self.raw, Target::Call(fn_to_ptr(f)))
    }

    /// The current target.
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
/// # Safety
/// Implemented only by this crate, for `extern "C"` function-pointer types.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a static-call signature",
    label = "not an `extern \"C\" fn` whose arguments all travel in registers",
    note = "a key's type is `extern \"C\" fn(A0, ..) -> R` or `unsafe extern \"C\" fn(A0, ..) -> R`; Rust-ABI `fn(..)` and variadic functions cannot be static calls",
    note = "signatures with borrowed arguments (`extern \"C\" fn(&T)`) need `define_static_call!`"
)]
pub unsafe trait Signature: Copy + Send + Sync + 'static {
    /// Compile-time check that the arguments fit in registers.
    #[doc(hidden)]
    const CHECK: ();
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
            const CHECK: () = check_signature(&[$(<$A as Arg>::CLASS),*]);

            #[inline(always)]
            fn __shim<S: Site>() -> Self {
                #[inline(always)]
                #[allow(improper_ctypes_definitions)]
                extern "C" fn shim<S: Site, R: RetVal, $($A: Arg),*>($($a: $A),*) -> R {
                    $crate::__shim_body!(S, R; $($a),*)
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

/// A key that is one particular `static`, as [`define_static_call!`] defines it. Generic code
/// takes "some key with this signature" through this trait and calls it with
/// `static_call!(K)(args)`; every monomorphised copy gets its own, patchable, call sites.
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
///     static_call!(K)(x)
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
    /// The key itself.
    fn key() -> &'static StaticCall<Self::Fn>;
    /// A function of type `Fn` whose body is a call site of this key, distinct for every `U`.
    #[doc(hidden)]
    fn __site<U: crate::site::SiteId>() -> Self::Fn;
}
