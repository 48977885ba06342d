//! Rust keys: keys whose type is a Rust function-pointer type (`fn(..) -> R`, `unsafe fn`,
//! `extern "C-unwind" fn`), with Rust functions as targets.
//!
//! # Layout
//!
//! A Rust key is `StaticCall<F, RustAbi>`, 24 bytes:
//!
//! | offset | field | holds |
//! |---|---|---|
//! | 0 | `RawKey::func` | what sites call: the target's adapter (`adapter.rs`) |
//! | 8 | `RawKey::sites` | the key's mode and list of sites, as for every key |
//! | 16 | [`RustAbi`] | the Rust function [`query`](crate::StaticCall::query) returns |
//!
//! The first 16 bytes are a `RawKey`, so the trampoline, the patcher and the registry treat a
//! Rust key exactly like an `extern "C"` key: they read `func` and never the word after it. The
//! word at offset 16 always holds a function of type `F` that calls the key's target (a
//! function that conjures a zero-sized target and calls it, the function pointer given to
//! `update_pointer`, or the key's zero function), because the pointer path calls whatever it
//! holds (`adapter::pointer_stub` loads it from `[r11 + 16]`).
//!
//! # Changing a target
//!
//! A change is a new `func` (through the patcher, like any key) and a new word. Both happen
//! under [`lock`]: `func` first (the patcher's `update`, all or nothing), then, only if that
//! succeeded, the word. A call that starts after `update` returned therefore finds both new; a
//! call during it finds `func` and the word each old or new, and either way a function of the
//! key's type. The lock makes concurrent updates of one key leave `func` and the word from the
//! same update. It is taken before the patch lock, never after, and `fork` is handled by taking
//! it in a `pthread_atfork` prepare handler registered after the patcher's (so that it runs
//! first, keeping that order).

use core::sync::atomic::{AtomicPtr, Ordering};

use crate::adapter::RustSig;
use crate::diagnostics::Error;
use crate::imp;
use crate::key::{Change, RawKey, StaticCall, fn_to_ptr};

/// The word a Rust key has after its [`RawKey`]: the Rust function its target is, which
/// [`query`](crate::StaticCall::query) returns and the pointer path calls. The second type
/// parameter of a Rust key's [`StaticCall`]; see [`Abi`](crate::Abi).
///
/// ```
/// use static_call::{RustAbi, StaticCall};
/// fn twice(x: u64) -> u64 { 2 * x }
/// static K: StaticCall<fn(u64) -> u64> = StaticCall::to(twice);
/// let _: &StaticCall<fn(u64) -> u64, RustAbi> = &K;
/// assert_eq!(size_of::<StaticCall<fn(u64) -> u64>>(), 24);
/// ```
#[repr(transparent)]
pub struct RustAbi {
    rust: AtomicPtr<()>,
}

/// Offset of a Rust key's [`RustAbi`] word: right after its 16-byte [`RawKey`].
pub(crate) const RUST_WORD_OFFSET: usize = 16;

const _: () = assert!(
    core::mem::offset_of!(StaticCall<fn(), RustAbi>, abi) == RUST_WORD_OFFSET
        && size_of::<StaticCall<fn(), RustAbi>>() == 24
        && size_of::<RawKey>() == RUST_WORD_OFFSET
);

impl RustAbi {
    /// A word holding `rust`.
    pub(crate) const fn new(rust: *const ()) -> RustAbi {
        RustAbi {
            rust: AtomicPtr::new(rust as *mut ()),
        }
    }

    /// The Rust function. `Acquire` pairs with the `Release` of [`commit`]: a caller that sees
    /// a new function sees what the updater published before it.
    #[inline]
    pub(crate) fn get(&self) -> *const () {
        self.rust.load(Ordering::Acquire)
    }

    /// The word of the Rust key whose `RawKey` is `raw`.
    ///
    /// # Safety
    /// `raw` must be the first field of a `StaticCall<_, RustAbi>`.
    #[doc(hidden)]
    #[inline(always)]
    pub unsafe fn of_raw(raw: &RawKey) -> &RustAbi {
        // SAFETY: `StaticCall` is `repr(C)` with the `RawKey` at 0 and the word at
        // `RUST_WORD_OFFSET`; the caller guarantees `raw` is such a key's.
        unsafe {
            &*(raw as *const RawKey)
                .cast::<u8>()
                .add(RUST_WORD_OFFSET)
                .cast::<RustAbi>()
        }
    }

    /// A change that also sets this word to `rust`.
    pub(crate) fn with(&self, rust: *const ()) -> Option<(&AtomicPtr<()>, *const ())> {
        Some((&self.rust, rust))
    }
}

/// A target for a Rust key that its generic adapter cannot reach at full speed: a
/// `#[target_feature]` function, or an `unsafe fn`. Made by
/// [`target_feature!`](crate::target_feature) and [`unsafe_target!`](crate::unsafe_target),
/// which write its adapter where the function is named; installed with
/// [`StaticCall::update_adapter`] or [`Batch::update_adapter`](crate::Batch::update_adapter).
///
/// ```
/// use static_call::{define_static_call, static_call, unsafe_target};
///
/// /// # Safety
/// /// `p` must point to a readable byte.
/// unsafe fn read(p: *const u8) -> u8 { unsafe { *p } }
/// unsafe fn zero(_: *const u8) -> u8 { 0 }
/// define_static_call!(READ: unsafe fn(*const u8) -> u8 = |_| 0);
///
/// // SAFETY: `READ` is an `unsafe` key whose callers promise what `read` requires.
/// READ.update_adapter(unsafe { unsafe_target!(READ, read) });
/// let byte = 7u8;
/// assert_eq!(unsafe { static_call!(READ)(&byte) }, 7);
/// # let _ = zero;
/// ```
pub struct Adapter<F> {
    func: *const (),
    rust: F,
}

impl<F: Copy> Clone for Adapter<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Copy> Copy for Adapter<F> {}

// SAFETY: two addresses of code, which any thread may call.
unsafe impl<F> Send for Adapter<F> {}
// SAFETY: as for `Send`; an `Adapter` is never mutated.
unsafe impl<F> Sync for Adapter<F> {}

impl<F: Copy> Adapter<F> {
    /// An adapter whose sites call `func`, and whose key's `query()` returns `rust`.
    ///
    /// # Safety
    /// `func` must be an adapter (`adapter.rs`) for the conventions of a key of type `F`,
    /// calling `rust`'s function; calling `rust` through `F` must be sound.
    #[doc(hidden)]
    pub const unsafe fn __new(func: *const (), rust: F) -> Self {
        Adapter { func, rust }
    }

    /// The Rust function that [`query`](crate::StaticCall::query) returns once this adapter is
    /// installed.
    ///
    /// ```
    /// use static_call::{define_static_call, unsafe_target};
    /// unsafe fn id(x: u32) -> u32 { x }
    /// define_static_call!(K: unsafe fn(u32) -> u32 = |x| x);
    /// // SAFETY: `id` has no precondition.
    /// let a = unsafe { unsafe_target!(K, id) };
    /// assert_eq!(unsafe { (a.function())(5) }, 5);
    /// ```
    pub fn function(&self) -> F {
        self.rust
    }

    pub(crate) fn change<'a>(&self, key: &'a StaticCall<F, RustAbi>) -> Change<'a> {
        Change::call(key.__raw(), self.func, key.abi.with(fn_to_ptr(self.rust)))
    }
}

/// A zero-sized target `T` for the key type `Self`: its adapter and its Rust function, as
/// constants (for `const` construction). Implemented by `__rust_signature!` for every `T` that
/// implements the key's `Fn` signature.
///
/// # Safety
/// `FUNC` must be `T`'s adapter for `Self`'s conventions and `RUST` a function of the key's
/// type that calls `T`.
#[doc(hidden)]
pub unsafe trait RustTarget<T> {
    /// The adapter.
    const FUNC: *const ();
    /// The Rust function (of the key's type).
    const RUST: *const ();
}

/// Checks, when a target is instantiated, that it can be called without a value of it: it is
/// zero-sized (a function item, or a closure without captures). Also `Copy` and `'static`, which
/// the bounds that call this require: a closure that captures a zero-sized value that is not
/// `Copy` (a drop guard) fails there, naming the capture.
#[doc(hidden)]
pub const fn assert_target_is_zero_sized<T>() {
    assert!(
        size_of::<T>() == 0,
        "static_call: a target must be a function or a closure that captures nothing (it is called without its environment); for a function pointer chosen at run time use `update_pointer`"
    );
}

/// Builds a key from its parts. `func` and `rust` must belong together.
#[doc(hidden)]
pub const fn key_from_parts<F: Copy>(func: *const (), rust: *const ()) -> StaticCall<F, RustAbi> {
    StaticCall::__from_parts(
        RawKey::new(crate::key::RawTarget::Call(func)),
        RustAbi::new(rust),
    )
}

/// Makes a batch of changes, some of which may set a Rust key's word: the patcher first, then the
/// words, all under [`lock`] (see the module comment).
pub(crate) fn commit(changes: &[Change<'_>]) -> Result<(), Error> {
    let raw: Vec<_> = changes.iter().map(|c| (c.raw, c.target)).collect();
    if changes.iter().all(|c| c.rust.is_none()) {
        return imp::update(&raw);
    }
    let _locked = lock();
    imp::update(&raw)?;
    for (word, rust) in changes.iter().filter_map(|c| c.rust) {
        // Release: a thread that loads the new function sees what the updater wrote before.
        word.store(rust as *mut (), Ordering::Release);
    }
    Ok(())
}

/// The lock that keeps a Rust key's `func` and word from the same update.
#[cfg(unix)]
mod update_lock {
    use core::cell::UnsafeCell;
    use std::sync::Once;

    struct Lock(UnsafeCell<libc::pthread_mutex_t>);
    // SAFETY: a pthread mutex is made to be shared between threads.
    unsafe impl Sync for Lock {}

    static LOCK: Lock = Lock(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));
    static FORK_HANDLERS: Once = Once::new();

    /// Held while the lock is held; unlocks on drop.
    pub(crate) struct Guard(());

    impl Drop for Guard {
        fn drop(&mut self) {
            unlock();
        }
    }

    fn lock_raw() {
        // SAFETY: a statically initialised mutex; this thread does not hold it (no re-entry:
        // nothing under the lock takes it again).
        unsafe { libc::pthread_mutex_lock(LOCK.0.get()) };
    }

    fn unlock() {
        // SAFETY: held by this thread (by a `Guard`, or by `prepare` before `fork`).
        unsafe { libc::pthread_mutex_unlock(LOCK.0.get()) };
    }

    extern "C" fn prepare() {
        lock_raw();
    }

    extern "C" fn after() {
        unlock();
    }

    /// Takes the lock. The first call registers the `fork` handlers, after the patcher's
    /// (initialising the runtime first, which registers those), so that before `fork` this lock
    /// is taken first and the patch lock second, the order `commit` takes them in.
    pub(crate) fn lock() -> Guard {
        FORK_HANDLERS.call_once(|| {
            #[cfg(static_call_patching)]
            let _ = crate::runtime::get_or_init();
            // SAFETY: the handlers are `extern "C" fn()` that lock and unlock the mutex.
            unsafe { libc::pthread_atfork(Some(prepare), Some(after), Some(after)) };
        });
        lock_raw();
        Guard(())
    }
}

#[cfg(not(unix))]
mod update_lock {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    pub(crate) type Guard = std::sync::MutexGuard<'static, ()>;

    /// Takes the lock (no `fork` on these platforms).
    pub(crate) fn lock() -> Guard {
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }
}

use update_lock::lock;

/// Writes the conventions of one Rust signature for a key type `holder`: its [`RustSig`] impl
/// (the site's shim, the adapter's body, the zero function), and, for every zero-sized target
/// `T` of that signature, its constant callee, its [`RustTarget`] constants and its `Accepts`
/// impl. Used by the generic impls below (for `StaticCall<fn(..), RustAbi>`) and by
/// `define_static_call!` (for its key types, from the signature's tokens, so that higher-ranked
/// signatures work). One macro for both, so both follow the same conventions.
///
/// [`RustSig`]: crate::adapter::RustSig
#[doc(hidden)]
#[macro_export]
macro_rules! __rust_signature {
    (
        holder [$holder:ty]
        params [$($P:ident),*]
        lifetimes [$($lt:lifetime),*]
        abi [$($abi:tt)*]
        unsafe [$($unsafe:tt)?]
        args [$(($n:ident : $t:ty))*]
        ret [$ret:ty]
        key |$this:ident| $key:expr
    ) => {
        const _: () = {
        // Everything in one anonymous block: `__adapt_with` and `__Call` are written once per key
        // type (and per generic impl), so they need a scope of their own.

        // SAFETY: `__adapt` takes the arguments as `__rust_shim_body!` places them (both use
        // `Layout`/`Cursor` over the same types) and returns through `run`.
        unsafe impl<$($P: 'static),*> $crate::__private::RustSig for $holder {
            type Fn = for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret;
            type Callee = for<$($lt),*> unsafe $($abi)* fn($($t),*) -> $ret;

            const ZERO: Self::Fn = {
                #[allow(improper_ctypes_definitions, unused_variables, clippy::too_many_arguments, clippy::ptr_arg)]
                $($unsafe)? $($abi)* fn zero<$($lt,)* $($P),*>($($n: $t),*) -> $ret {
                    // SAFETY: a key gets this function only as a null target (result `()`) or a
                    // return-zero target (result `ZeroableResult`); see `rust_key.rs`.
                    unsafe { $crate::__private::zero_result() }
                }
                zero::<$($P),*>
            };

            #[inline(always)]
            unsafe fn __adapt(
                regs: &$crate::__private::Incoming,
                f: Self::Callee,
            ) -> $crate::__private::Images {
                // SAFETY: passed on from the caller; `f` is the key's target.
                $crate::__private::catching(|| unsafe {
                    __call_packed::<$($P),*>(
                        regs,
                        move |$($n),*| f($($n),*),
                        ::core::marker::PhantomData,
                    )
                })
            }

            #[inline(always)]
            unsafe fn __adapt_const<C: $crate::__private::ConstCallee<Self>>(
                regs: &$crate::__private::Incoming,
            ) -> $crate::__private::Images {
                // SAFETY: passed on from the caller.
                $crate::__private::catching(|| unsafe { Self::__adapt_body::<C>(regs) })
            }

            #[inline(always)]
            unsafe fn __adapt_body<C: $crate::__private::ConstCallee<Self>>(
                regs: &$crate::__private::Incoming,
            ) -> $crate::__private::Images {
                // SAFETY: passed on from the caller. The target is named through `C` inside the
                // call, not captured, so that the call is direct whatever LLVM inlines.
                unsafe {
                    __call_packed::<$($P),*>(
                        regs,
                        |$($n),*| (C::CALLEE)($($n),*),
                        ::core::marker::PhantomData,
                    )
                }
            }

            #[inline(always)]
            fn __key(&self) -> &$crate::StaticCall<Self::Fn, $crate::RustAbi> {
                let $this = self;
                $key
            }

            #[inline(always)]
            fn __shim<S: $crate::__private::Site>() -> Self::Fn {
                #[inline(always)]
                #[allow(improper_ctypes_definitions, clippy::too_many_arguments, clippy::ptr_arg)]
                $($unsafe)? $($abi)* fn shim<$($lt,)* S: $crate::__private::Site, $($P),*>(
                    $($n: $t),*
                ) -> $ret {
                    $crate::__rust_shim_body!(
                        S, $ret, $($unsafe)? $($abi)* fn($($t),*) -> $ret; $($n: $t),*
                    )
                }
                shim::<S, $($P),*>
            }
        }

        /// The adapter's side of a call of this signature, without catching: take the arguments
        /// from `regs`, run `call` on them, return the result's images.
        ///
        /// # Safety
        /// `regs` must be what a site of this signature passed, and `call` sound to run on them.
        #[inline(always)]
        #[allow(clippy::too_many_arguments, non_snake_case, dead_code)]
        unsafe fn __call_packed<$($lt,)* $($P),*>(
            regs: &$crate::__private::Incoming,
            call: impl FnOnce($($t),*) -> $ret,
            // Only for its type: it gives this function the implied bounds of the signature
            // (`for<'a, 'b> fn(&'a T<'b>)` implies `'b: 'a`), as one taking the arguments would.
            _: ::core::marker::PhantomData<($($t,)*)>,
        ) -> $crate::__private::Images {
            let layout = $crate::__private::Layout::new(
                &[$($crate::__private::arg_class::<$t>()),*],
                $crate::__private::ret_class::<$ret>(),
            );
            #[allow(unused_mut)]
            let mut cursor = layout.cursor();
            // SAFETY (all four): `regs` is what a site of this signature passed (the caller's
            // promise), and each argument is taken once, in order, with its own type.
            let out = unsafe { cursor.take_out::<$ret>(regs) };
            #[allow(unused_variables)]
            let spill = unsafe { cursor.take_spill(regs) };
            $( let $n: $t = unsafe { cursor.take::<$t>(regs, spill) }; )*
            // SAFETY: `out` is the site's out-pointer.
            unsafe { $crate::__private::Images::of(call($($n),*), out) }
        }

        // The zero-sized target `T`: a function that conjures it and calls it. A struct with an
        // impl, rather than a nested function, so that the function's lifetimes stay late-bound
        // (the `Fn` bound sits on the impl), and it coerces to the key's higher-ranked type.
            #[allow(non_camel_case_types)]
            pub struct __Call<T, $($P),*>(::core::marker::PhantomData<fn() -> (T, $($P),*)>);

            impl<
                T: for<$($lt),*> Fn($($t),*) -> $ret + Copy + 'static,
                $($P: 'static),*
            > __Call<T, $($P),*> {
                #[inline(always)]
                #[allow(improper_ctypes_definitions, clippy::too_many_arguments, clippy::ptr_arg)]
                $($unsafe)? $($abi)* fn call<$($lt),*>($($n: $t),*) -> $ret {
                    // SAFETY: `T` is zero-sized (asserted where its adapter is named) and `Copy`,
                    // and a `T` was handed to the key when it became the target.
                    let target = unsafe { $crate::__private::conjure::<T>() };
                    target($($n),*)
                }
            }

            impl<
                T: for<$($lt),*> Fn($($t),*) -> $ret + Copy + 'static,
                $($P: 'static),*
            > $crate::__private::ConstCallee<$holder> for $crate::__private::Zst<T> {
                const CALLEE: <$holder as $crate::__private::RustSig>::Callee =
                    __Call::<T, $($P),*>::call;
            }

            // SAFETY: the adapter of `Zst<T>` for this signature, and the function it calls.
            unsafe impl<
                T: for<$($lt),*> Fn($($t),*) -> $ret + Copy + 'static,
                $($P: 'static),*
            > $crate::__private::RustTarget<T> for $holder {
                const FUNC: *const () = {
                    $crate::__private::assert_target_is_zero_sized::<T>();
                    $crate::__private::adapter::<$holder, $crate::__private::Zst<T>>
                        as *const ()
                };
                const RUST: *const () = {
                    let f: <$holder as $crate::__private::RustSig>::Fn = __Call::<T, $($P),*>::call;
                    $crate::__private::fn_to_ptr(f)
                };
            }

            // SAFETY: the change installs `T`'s adapter and function, which belong together.
            unsafe impl<
                T: for<$($lt),*> Fn($($t),*) -> $ret + Copy + 'static,
                $($P: 'static),*
            > $crate::__private::Accepts<T> for $holder {
                #[inline]
                fn __change(&self, target: T) -> $crate::__private::Change<'_> {
                    let _ = target; // `Copy`, zero-sized: nothing to keep
                    $crate::__private::RustSig::__key(self).__change_to(
                        <$holder as $crate::__private::RustTarget<T>>::FUNC,
                        <$holder as $crate::__private::RustTarget<T>>::RUST,
                    )
                }
            }
        };
    };
}

/// The body of a Rust key's shim: place the arguments as images, run the site, resume a panic or
/// take the result. (`$fnty` is for the fallback's version.)
#[cfg(static_call_patching)]
#[doc(hidden)]
#[macro_export]
macro_rules! __rust_shim_body {
    ($site:ty, $ret:ty, $fnty:ty; $($n:ident : $t:ty),*) => {{
        let layout = $crate::__private::Layout::new(
            &[$($crate::__private::arg_class::<$t>()),*],
            $crate::__private::ret_class::<$ret>(),
        );
        #[allow(unused_mut)]
        let mut cursor = layout.cursor();
        let mut regs = $crate::__private::Regs::UNINIT;
        let mut out = ::core::mem::MaybeUninit::<$ret>::uninit();
        #[allow(unused_mut)]
        let mut spill = [::core::mem::MaybeUninit::<*mut u8>::uninit(); 0 $(+ $crate::__one!($n))*];
        cursor.put_out(&mut regs, &mut out);
        // Each argument with the slot it lives in if it goes by pointer (never dropped here:
        // the adapter takes ownership).
        $( #[allow(unused_mut)] let mut $n = ($n, ::core::mem::MaybeUninit::<$t>::uninit()); )*
        $( cursor.put($n.0, &mut regs, &mut $n.1, &mut spill); )*
        cursor.put_spill(&mut regs, &mut spill);
        // SAFETY: the arguments were placed by `Cursor::put`, as the adapters of this key's
        // signature take them, and the site binds a key of this signature.
        let ret = unsafe { <$site as $crate::__private::Site>::invoke(regs) };
        // SAFETY: `ret` comes from that call, whose result type is `$ret`, with `out` passed.
        unsafe { $crate::__private::finish::<$ret>(ret, out) }
    }};
}

/// The portable fallback's body of a Rust key's shim: call the Rust function the key holds now.
#[cfg(not(static_call_patching))]
#[doc(hidden)]
#[macro_export]
macro_rules! __rust_shim_body {
    ($site:ty, $ret:ty, $fnty:ty; $($n:ident : $t:ty),*) => {{
        // SAFETY: the site binds a Rust key of this signature, whose word holds an `$fnty`.
        let f = unsafe {
            let word = $crate::RustAbi::of_raw(<$site as $crate::__private::Site>::key());
            ::core::mem::transmute::<*const (), $fnty>(word.__get())
        };
        #[allow(unused_unsafe)]
        // SAFETY: calling the key's target is what the shim's caller asked for; for an `unsafe`
        // key, the caller's `unsafe` block vouches for it.
        unsafe {
            f($($n),*)
        }
    }};
}

#[doc(hidden)]
#[macro_export]
macro_rules! __one {
    ($x:tt) => {
        1
    };
}

impl RustAbi {
    /// The Rust function, for the fallback's shims.
    #[doc(hidden)]
    #[inline]
    pub fn __get(&self) -> *const () {
        self.get()
    }
}

/// The generic impls for Rust function-pointer types of up to 12 arguments, in each of the four
/// kinds (`fn`, `unsafe fn`, `extern "C-unwind" fn`, `unsafe extern "C-unwind" fn`): the
/// conventions of `StaticCall<F, RustAbi>`, `Signature for F`, and `key.call(args)`.
macro_rules! impl_rust {
    ($($A:ident $a:ident)*) => {
        impl_rust!(@one [] [] $($A $a)*);
        impl_rust!(@one [unsafe] [] $($A $a)*);
        impl_rust!(@one [] [extern "C-unwind"] $($A $a)*);
        impl_rust!(@one [unsafe] [extern "C-unwind"] $($A $a)*);
    };
    (@one [$($unsafe:tt)?] [$($abi:tt)*] $($A:ident $a:ident)*) => {
        $crate::__rust_signature! {
            holder [StaticCall<$($unsafe)? $($abi)* fn($($A),*) -> R, RustAbi>]
            params [$($A,)* R]
            lifetimes []
            abi [$($abi)*]
            unsafe [$($unsafe)?]
            args [$(($a: $A))*]
            ret [R]
            key |this| this
        }

        impl<R, $($A),*> BorrowingSignatureMustBeSpelledOutInDefineStaticCall
            for $($unsafe)? $($abi)* fn($($A),*) -> R
        {
            type Abi = RustAbi;
        }

        // SAFETY: a Rust function pointer; its shim and adapters follow `__rust_signature!`.
        #[diagnostic::do_not_recommend]
        unsafe impl<R: 'static, $($A: 'static),*> crate::key::Signature
            for $($unsafe)? $($abi)* fn($($A),*) -> R
        {
            type Output = R;
            type Abi = RustAbi;
            const CHECK: () = ();
            const __ZERO: Self = <StaticCall<Self, RustAbi> as crate::adapter::RustSig>::ZERO;
            const __ZERO_FUNC: *const () = crate::adapter::zero_adapter as *const ();
            const __ZERO_RUST: *const () = fn_to_ptr(Self::__ZERO);
            const __ARGS_NEED_DROP: bool = false $(|| core::mem::needs_drop::<$A>())*;

            #[inline(always)]
            fn __shim<S: crate::site::Site>() -> Self {
                <StaticCall<Self, RustAbi> as crate::adapter::RustSig>::__shim::<S>()
            }
        }

        impl<R, $($A),*> StaticCall<$($unsafe)? $($abi)* fn($($A),*) -> R, RustAbi> {
            /// Calls the key's current target, for a key known only at run time (see
            /// [`static_call!`](crate::static_call) for named keys): an indirect call of the
            /// key's Rust function ([`query`](StaticCall::query)).
            ///
            /// ```
            /// use static_call::StaticCall;
            /// static KEYS: [StaticCall<fn(i32) -> i32>; 2] =
            ///     [StaticCall::to(|x: i32| -x), StaticCall::to(|x: i32| x.abs())];
            /// let key = &KEYS[1];
            /// assert_eq!(key.call(-3), 3);
            /// ```
            ///
            /// # Safety
            /// For an `unsafe` key, whatever its function type requires of its callers.
            #[inline]
            #[allow(clippy::too_many_arguments, clippy::missing_safety_doc)]
            pub $($unsafe)? fn call(&self, $($a: $A),*) -> R {
                let f = self.__run_time_target();
                #[allow(unused_unsafe)]
                // SAFETY: for an `unsafe` key, the caller upholds the target's contract.
                unsafe { f($($a),*) }
            }
        }
    };
}

impl_rust!();
impl_rust!(A0 a0);
impl_rust!(A0 a0 A1 a1);
impl_rust!(A0 a0 A1 a1 A2 a2);
impl_rust!(A0 a0 A1 a1 A2 a2 A3 a3);
impl_rust!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4);
impl_rust!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5);
impl_rust!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6);
impl_rust!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7);
impl_rust!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8);
impl_rust!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9);
impl_rust!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10);
impl_rust!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11);

/// What a null or return-zero Rust key's function returns: nothing, or all zero bits.
///
/// # Safety
/// `R` must be `()` or a [`ZeroableResult`](crate::ZeroableResult).
#[doc(hidden)]
#[inline(always)]
pub unsafe fn zero_result<R>() -> R {
    // SAFETY: all-zero bits are a valid `()` and a valid `ZeroableResult` (the caller's promise).
    unsafe { core::mem::zeroed() }
}

/// The key `define_static_call!` makes for a Rust key whose initial target is the function item
/// or closure `target` (whose argument types are inferred from the key's type `K`).
#[doc(hidden)]
pub const fn rust_key_to<K: RustSig + RustTarget<T>, T: Copy>(
    target: T,
) -> StaticCall<K::Fn, RustAbi> {
    let _ = target; // `Copy`, zero-sized: the key conjures it when called
    key_from_parts(K::FUNC, K::RUST)
}

/// The key `define_static_call!` makes for a Rust key defined `= None` (`null`) or
/// `= ReturnZero`.
#[doc(hidden)]
pub const fn rust_zero_key<K: RustSig + crate::StaticCallKey>(
    null: bool,
) -> StaticCall<<K as RustSig>::Fn, RustAbi> {
    if null {
        assert!(
            matches!(K::__RESULT, crate::site::Class::Void),
            "a key defined `= None` (no target) must return ()"
        );
    } else {
        assert!(
            K::__ZEROABLE,
            "a key defined `= ReturnZero` must return a type that can be zero (an integer, bool, char, a raw pointer, an Option of a reference)"
        );
    }
    assert!(
        !K::__ARGS_NEED_DROP,
        "static_call: a key whose arguments need dropping cannot do nothing or return zero (a patched NOP would leak them): give it a target that takes them, such as `|_| {{}}`"
    );
    let func = fn_to_ptr(crate::adapter::zero_adapter as extern "C" fn() -> _);
    let target = if null {
        crate::key::RawTarget::Null(func)
    } else {
        crate::key::RawTarget::Ret0(func)
    };
    StaticCall::__from_parts(
        RawKey::new(target),
        RustAbi::new(fn_to_ptr(<K as RustSig>::ZERO)),
    )
}

/// Implemented for every function type that [`Signature`](crate::Signature) covers: those whose
/// arguments do not borrow. `define_static_call!` names it for a signature it cannot see (a type
/// alias), so that a borrowing one fails with a message that says what to do: "implementation of
/// `BorrowingSignatureMustBeSpelledOutInDefineStaticCall` is not general enough". Implemented
/// by the same macros as `Signature` (a blanket impl over `Signature` would make the error name
/// `Signature` instead).
#[doc(hidden)]
pub trait BorrowingSignatureMustBeSpelledOutInDefineStaticCall {
    /// The signature's [`Abi`](crate::Abi), as `Signature` has it: `define_static_call!` names
    /// the key's type through this trait, so that its first error is this trait's.
    type Abi: crate::Abi;
}

impl<F: Copy> StaticCall<F, RustAbi> {
    /// `define_static_call!`'s initialiser for a key whose type it cannot see: [`to`](Self::to).
    #[doc(hidden)]
    pub const fn __init<T: Copy>(target: T) -> Self
    where
        Self: RustTarget<T>,
    {
        Self::to(target)
    }
}

impl<F: crate::key::ExternC> StaticCall<F, crate::CAbi> {
    /// `define_static_call!`'s initialiser for a key whose type it cannot see: `new`.
    #[doc(hidden)]
    pub const fn __init(f: F) -> Self {
        Self::new(f)
    }
}
