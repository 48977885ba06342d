//! `define_static_call!` and `static_call!`.
//!
//! How a call expression becomes a patchable site:
//! - `define_static_call!(KEY: sig = f)` defines a `static KEY` and a type of the same name (a
//!   struct with named fields lives only in the type namespace, so both can be called `KEY`).
//!   The type implements [`StaticCallKey`](crate::StaticCallKey); its `__site::<U>()` returns a
//!   shim function whose body is the site asm block, naming the static `KEY` with a `sym`
//!   operand. The shim is written by this macro from the signature's tokens, so signatures with
//!   borrowed (higher-ranked) arguments work too.
//! - `static_call!(KEY)` and `static_call!(OPS.field)` declare a fresh type at the expansion
//!   whose `Site::invoke` is the asm block, naming the static with `sym` plus the key's constant
//!   offset in it (0 for a key that is the static). The key's type supplies a shim generic over
//!   that site type (`KeyShims`: written by `define_static_call!` for its keys, generic for
//!   `StaticCall<F>`). A new type means a new instance of the shim, and so a new copy of the asm
//!   block: every `static_call!` written in the source is its own site, in debug and release
//!   builds alike. The shim is `#[inline(always)]`, so in optimised builds calling the returned
//!   function pointer inlines the site into the caller. The asm also holds, in a comment, a
//!   number derived from the file, line and column, so that LLVM never merges the shims of two
//!   sites into one function.
//! - `static_call!(<K>)`, in generic code, asks the key type for `K::__site::<ThatType>()`,
//!   whose asm names the key's static from inside the key type's impl, so every monomorphised
//!   copy binds its own key.

/// Defines a static-call key.
///
/// ```
/// use static_call::{define_static_call, static_call};
///
/// extern "C" fn add(a: i64, b: i64) -> i64 { a + b }
/// extern "C" fn mul(a: i64, b: i64) -> i64 { a * b }
///
/// define_static_call!(
///     /// The arithmetic operation used by `calc`.
///     pub CALC: extern "C" fn(i64, i64) -> i64 = add
/// );
///
/// assert_eq!(static_call!(CALC)(2, 3), 5);
/// CALC.update(mul);
/// assert_eq!(static_call!(CALC)(2, 3), 6);
/// ```
///
/// The initial target can also be `None` (no target: calls do nothing, for keys returning `()`;
/// the kernel's `DEFINE_STATIC_CALL_NULL`) or `ReturnZero` (calls return zero; the kernel's
/// `DEFINE_STATIC_CALL_RET0`):
///
/// ```
/// use static_call::{define_static_call, static_call};
///
/// define_static_call!(pub ON_TICK: extern "C" fn(u64) = None);
/// define_static_call!(pub PENDING: extern "C" fn() -> usize = ReturnZero);
///
/// static_call!(ON_TICK)(1); // nothing happens
/// assert_eq!(static_call!(PENDING)(), 0);
/// ```
///
/// The form is `[attributes] [visibility] NAME: SIGNATURE = INITIAL_TARGET`, where `SIGNATURE` is
/// `extern "C" fn(A0, …) -> R` or `unsafe extern "C" fn(A0, …) -> R`, optionally
/// higher-ranked (`for<'a> extern "C" fn(&'a T, &U) -> &'a T`). Arguments must travel in
/// registers under System V (up to 6 integer-class and 8 `f32`/`f64` arguments, in any order);
/// the result is `()`, an integer-class type, `f32` or `f64`. Anything else is a compile error
/// that names what is unsupported.
///
/// The macro defines a `static NAME` (the key) and a type `NAME` that dereferences to
/// [`StaticCall`](crate::StaticCall) and implements [`StaticCallKey`](crate::StaticCallKey).
#[macro_export]
macro_rules! define_static_call {
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $(for<$($lt:lifetime),+ $(,)?>)?
            unsafe extern "C" fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $($init:tt)+
    ) => {
        $crate::__define_static_call!(@names [$(#[$attr])*] [$vis] $name [[$($($lt),+)?] unsafe]
            [$($ret)?] [$($init)+] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $(for<$($lt:lifetime),+ $(,)?>)?
            extern "C" fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $($init:tt)+
    ) => {
        $crate::__define_static_call!(@names [$(#[$attr])*] [$vis] $name [[$($($lt),+)?]]
            [$($ret)?] [$($init)+] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $sig:ty = $($init:tt)+
    ) => {
        ::core::compile_error!(::core::concat!(
            "static_call: `", ::core::stringify!($sig), "` is not a static-call signature; ",
            "a key's type must be `extern \"C\" fn(..) -> R` or `unsafe extern \"C\" fn(..) -> R` ",
            "(Rust-ABI and variadic functions cannot be static calls)"
        ));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __define_static_call {
    // Give each argument a name for the shim's parameter list.
    (@names $attrs:tt $vis:tt $name:ident $unsafe:tt $ret:tt $init:tt [$($done:tt)*]
        [$t:ty $(, $rest:ty)*] [$n:ident $($names:ident)*]) => {
        $crate::__define_static_call!(@names $attrs $vis $name $unsafe $ret $init
            [$($done)* ($n: $t)] [$($rest),*] [$($names)*]);
    };
    (@names $attrs:tt $vis:tt $name:ident $unsafe:tt $ret:tt $init:tt $done:tt
        [$t:ty $(, $rest:ty)*] []) => {
        ::core::compile_error!("static_call: too many arguments (at most 6 integer-class and 8 float arguments)");
    };
    (@names $attrs:tt $vis:tt $name:ident $unsafe:tt [] $init:tt $done:tt [] $names:tt) => {
        $crate::__define_static_call!(@emit $attrs $vis $name $unsafe [()] $init $done);
    };
    (@names $attrs:tt $vis:tt $name:ident $unsafe:tt [$ret:ty] $init:tt $done:tt [] $names:tt) => {
        $crate::__define_static_call!(@emit $attrs $vis $name $unsafe [$ret] $init $done);
    };
    (@emit [$($attr:tt)*] [$vis:vis] $name:ident [[$($lt:lifetime),*] $($unsafe:tt)?] [$ret:ty]
        [$($init:tt)+] [$(($n:ident : $t:ty))*]) => {
        #[allow(non_camel_case_types)]
        #[doc = ::core::concat!(
            "The type of the static-call key [`", ::core::stringify!($name), "`](static@",
            ::core::stringify!($name), "); it dereferences to [`StaticCall`](",
            "::static_call::StaticCall).")]
        #[repr(transparent)]
        $vis struct $name {
            __key: $crate::StaticCall<for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret>,
        }

        $($attr)*
        $vis static $name: $name = $name {
            __key: $crate::__define_static_call!(@init $name
                [for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret] $($init)+),
        };

        impl $name {
            /// The key's zero function: does nothing, or returns zero.
            #[doc(hidden)]
            #[allow(improper_ctypes_definitions, unused_variables)]
            pub $($unsafe)? extern "C" fn __zero<$($lt),*>($($n: $t),*) -> $ret {
                <$ret as $crate::__private::RetVal>::__zero()
            }
        }

        // Compile-time checks of the signature. In a `const fn` generic over the signature's
        // named lifetimes, so that `for<'a>` signatures can be named outside their binder.
        const _: () = {
            const fn check<$($lt),*>() {
                $crate::__private::check_signature(&[$(<$t as $crate::__private::Arg>::CLASS),*]);
                let _ = <$ret as $crate::__private::RetVal>::CLASS;
            }
            check()
        };

        impl ::core::ops::Deref for $name {
            type Target = $crate::StaticCall<for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret>;
            #[inline(always)]
            fn deref(&self) -> &Self::Target {
                &self.__key
            }
        }

        // SAFETY: `__site` returns a shim whose body is a site bound (by `sym`) to this static.
        unsafe impl $crate::StaticCallKey for $name {
            type Fn = for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret;
            const __RESULT: $crate::__private::Class = {
                const fn class<$($lt),*>() -> $crate::__private::Class {
                    <$ret as $crate::__private::RetVal>::CLASS
                }
                class()
            };
            const __ZEROABLE: bool = {
                const fn zeroable<$($lt),*>() -> bool {
                    <$ret as $crate::__private::RetVal>::ZEROABLE
                }
                zeroable()
            };

            #[inline(always)]
            fn __zero() -> Self::Fn {
                $name::__zero
            }

            #[inline(always)]
            fn key() -> &'static $crate::StaticCall<Self::Fn> {
                &$name.__key
            }

            #[inline(always)]
            fn __site<U: $crate::__private::SiteId>() -> Self::Fn {
                struct Binding<U>(::core::marker::PhantomData<U>);
                // SAFETY: the asm block binds this key and calls its target with `regs`.
                unsafe impl<U: $crate::__private::SiteId> $crate::__private::Site for Binding<U> {
                    #[inline(always)]
                    fn key() -> &'static $crate::__private::RawKey {
                        $name.__raw()
                    }

                    #[inline(always)]
                    unsafe fn invoke(regs: $crate::__private::Regs) -> $crate::__private::Ret {
                        $crate::__site_asm!($name, 0, U::ID, regs)
                    }
                }
                $crate::__private::key_site::<Binding<U>, _>(&$name)
            }
        }

        // SAFETY: the shim places the arguments by System V for this signature.
        unsafe impl $crate::__private::KeyShims for $name {
            type Fn = for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret;

            #[inline(always)]
            fn __shim<S: $crate::__private::Site>() -> Self::Fn {
                #[inline(always)]
                #[allow(improper_ctypes_definitions)]
                $($unsafe)? extern "C" fn shim<$($lt,)* S: $crate::__private::Site>($($n: $t),*) -> $ret {
                    // (A key type's shims serve its own static only, so the fallback calls that.)
                    $crate::__shim_body!(S, $ret, $name.__key.query(); $($n),*)
                }
                shim::<S>
            }

        }
    };
    // The key's initial target: `None` (no target), `ReturnZero`, or a function.
    (@init $name:ident [$fnty:ty] None) => {{
        const _: () = ::core::assert!(
            ::core::matches!(
                <$name as $crate::StaticCallKey>::__RESULT,
                $crate::__private::Class::Void
            ),
            "a key defined `= None` (no target) must return ()"
        );
        // SAFETY: the type is spelled `extern "C" fn(..)`; `__zero` returns nothing.
        unsafe { $crate::StaticCall::<$fnty>::__new_zero_unchecked($name::__zero, true) }
    }};
    (@init $name:ident [$fnty:ty] ReturnZero) => {{
        const _: () = ::core::assert!(
            <$name as $crate::StaticCallKey>::__ZEROABLE,
            "a key defined `= ReturnZero` must return a type that can be zero (an integer, bool, char, a raw pointer, an Option of a reference)"
        );
        // SAFETY: the type is spelled `extern "C" fn(..)`; `__zero` returns zero.
        unsafe { $crate::StaticCall::<$fnty>::__new_zero_unchecked($name::__zero, false) }
    }};
    (@init $name:ident [$fnty:ty] $init:expr) => {
        // SAFETY: the type is spelled `extern "C" fn(..)` right here.
        unsafe { $crate::StaticCall::<$fnty>::__new_unchecked($init) }
    };
}

/// Calls through a static-call key: `static_call!(KEY)(args)`.
///
/// An ordinary call expression (the kernel's `static_call(key)(args)`), usable anywhere an
/// expression is. Every place it is written is its own call site: the first time a site runs it
/// goes through the trampoline, which registers it and calls the key's current target; the
/// patcher then rewrites it into a direct `call <target>`.
///
/// The key can be
/// - a `static`: one defined with [`define_static_call!`], or a plain
///   `static K: StaticCall<F>`: `static_call!(CALC)(2, 3)`, `static_call!(crate::ops::CALC)(2, 3)`;
/// - a [`StaticCall`](crate::StaticCall) field of a `static`, nested fields included:
///   `static_call!(OPS.read)(fd, buf)`;
/// - in generic code, a type parameter bounded by [`StaticCallKey`](crate::StaticCallKey),
///   written in angle brackets: `static_call!(<K>)(x)`.
///
/// Each form names its key in the site's own bytes (a `sym` operand, plus the field's offset),
/// which is what lets the patcher prove the binding. A key known only at run time (a
/// `&StaticCall` in a variable) cannot be named here; call it with `key.call(args)` instead: a
/// plain indirect call, or in retpoline builds a *run-time site* patched to a guard stub that
/// checks what the key holds ([`StaticCall::call_guarded`](crate::StaticCall::call_guarded)
/// chooses that form in any build).
///
/// ```
/// use static_call::{StaticCall, StaticCallKey, define_static_call, static_call};
///
/// extern "C" fn twice(x: u32) -> u32 { 2 * x }
/// define_static_call!(TWICE: extern "C" fn(u32) -> u32 = twice);
///
/// static PLAIN: StaticCall<extern "C" fn(u32) -> u32> = StaticCall::new(twice);
///
/// struct Table { inner: Inner }
/// struct Inner { op: StaticCall<extern "C" fn(u32) -> u32> }
/// static TABLE: Table = Table { inner: Inner { op: StaticCall::new(twice) } };
///
/// fn generic<K: StaticCallKey<Fn = extern "C" fn(u32) -> u32>>(x: u32) -> u32 {
///     static_call!(<K>)(x)
/// }
///
/// let a = static_call!(TWICE)(1);
/// let b = static_call!(PLAIN)(a);
/// let c = static_call!(TABLE.inner.op)(b);
/// assert_eq!(generic::<TWICE>(c), 16);
/// ```
#[macro_export]
macro_rules! static_call {
    // `<K>`: a key type (generic code). The site lives in the key type's own impl, which names
    // the key's static.
    (< $key:ty >) => {{
        struct __StaticCallSite;
        impl $crate::__private::SiteId for __StaticCallSite {
            const ID: u64 =
                $crate::__private::site_id(::core::file!(), ::core::line!(), ::core::column!());
        }
        <$key as $crate::StaticCallKey>::__site::<__StaticCallSite>()
    }};
    ($($key:tt)+) => {
        $crate::__static_call_split!(__static_call_site {} [] $($key)+)
    };
}

/// Splits a key expression into the static it lives in and the path to the key, then hands
/// both to the macro `$then` (after the tokens `$with`): `$then!($with [BASE] [KEY])`.
#[doc(hidden)]
#[macro_export]
macro_rules! __static_call_split {
    // `BASE.field...`: a key that is a field of the static BASE.
    // (Braces, so that the expansion works where an item is expected as well as an expression.)
    ($then:ident $with:tt [$($base:tt)+] . $($field:tt)+) => {
        $crate::$then! { $with [$($base)+] [$($base)+ . $($field)+] }
    };
    ($then:ident $with:tt [$($path:tt)*] $next:tt $($rest:tt)*) => {
        $crate::__static_call_split! { $then $with [$($path)* $next] $($rest)* }
    };
    // `PATH`: a key that is a static itself.
    ($then:ident $with:tt [$($path:tt)+]) => {
        $crate::$then! { $with [$($path)+] [$($path)+] }
    };
}

/// The constant offset of the key `$key` inside the static `$base` (0 when it is the static).
#[doc(hidden)]
#[macro_export]
macro_rules! __static_call_offset {
    ([$($base:tt)+] [$($key:tt)+]) => {
        // SAFETY: both pointers are into the same static.
        unsafe { (&raw const $($key)+).byte_offset_from(&raw const $($base)+) as usize }
    };
}

/// A site bound to the key `$key`, which is the static `$base` or a field of it.
#[doc(hidden)]
#[macro_export]
macro_rules! __static_call_site {
    ({} [$($base:tt)+] [$($key:tt)+]) => {{
        struct __StaticCallSite;
        // SAFETY: the asm block binds the key (the static plus the key's offset in it) and
        // `key_site` gives the shim the signature of the key's type.
        unsafe impl $crate::__private::Site for __StaticCallSite {
            #[inline(always)]
            fn key() -> &'static $crate::__private::RawKey {
                $($key)+.__raw()
            }

            #[inline(always)]
            unsafe fn invoke(regs: $crate::__private::Regs) -> $crate::__private::Ret {
                $crate::__site_asm!(
                    $($base)+,
                    $crate::__static_call_offset!([$($base)+] [$($key)+]),
                    $crate::__private::site_id(::core::file!(), ::core::line!(), ::core::column!()),
                    regs
                )
            }
        }
        $crate::__private::key_site::<__StaticCallSite, _>(&$($key)+)
    }};
}
