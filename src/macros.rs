//! `define_static_call!` and `static_call!`.
//!
//! How a call expression becomes a patchable site:
//! - `define_static_call!(KEY: sig = f)` defines a `static KEY` and a type of the same name (a
//!   struct with named fields lives only in the type namespace, so both can be called `KEY`).
//!   The type implements [`StaticCallKey`](crate::StaticCallKey); its `__site::<U>()` returns a
//!   shim function whose body is the site asm block, naming the static `KEY` with a `sym`
//!   operand. The shim is written by this macro from the signature's tokens, so signatures with
//!   borrowed (higher-ranked) arguments work too.
//! - `static_call!(KEY)` declares a fresh type at the expansion and asks for
//!   `KEY::__site::<ThatType>()`. A new type means a new instance of the shim, and so a new copy
//!   of the asm block: every `static_call!` written in the source is its own site, in debug and
//!   release builds alike. The shim is `#[inline(always)]`, so in optimised builds calling the
//!   returned function pointer inlines the site into the caller. The type also carries a number
//!   derived from the file, line and column (`SiteId`), which the asm holds in a comment, so
//!   that LLVM never merges the shims of two sites into one function.
//! - `static_call!(OPS.field)` writes the asm block right there, with `sym OPS` plus the field's
//!   constant offset, and takes the signature from the field's type.

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
/// The form is `[attributes] [visibility] NAME: SIGNATURE = INITIAL_TARGET`, where `SIGNATURE` is
/// `extern "C" fn(A0, …) -> R` or `unsafe extern "C" fn(A0, …) -> R`. Arguments must travel in
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
        $vis:vis $name:ident : unsafe extern "C" fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $init:expr $(;)?
    ) => {
        $crate::__define_static_call!(@names [$(#[$attr])*] [$vis] $name [unsafe]
            [$($ret)?] [$init] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : extern "C" fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $init:expr $(;)?
    ) => {
        $crate::__define_static_call!(@names [$(#[$attr])*] [$vis] $name []
            [$($ret)?] [$init] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $sig:ty = $init:expr $(;)?
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
    (@emit [$($attr:tt)*] [$vis:vis] $name:ident [$($unsafe:tt)?] [$ret:ty] [$init:expr]
        [$(($n:ident : $t:ty))*]) => {
        #[allow(non_camel_case_types)]
        #[doc = ::core::concat!(
            "The type of the static-call key [`", ::core::stringify!($name), "`](static@",
            ::core::stringify!($name), "); it dereferences to [`StaticCall`](",
            "::static_call::StaticCall).")]
        $vis struct $name {
            __key: $crate::StaticCall<$($unsafe)? extern "C" fn($($t),*) -> $ret>,
        }

        $($attr)*
        $vis static $name: $name = $name {
            // SAFETY: the type is spelled `extern "C" fn(..)` right here.
            __key: unsafe {
                $crate::StaticCall::<$($unsafe)? extern "C" fn($($t),*) -> $ret>::__new_unchecked($init)
            },
        };

        const _: () = $crate::__private::check_signature(
            &[$(<$t as $crate::__private::Arg>::CLASS),*]);
        const _: $crate::__private::Class = <$ret as $crate::__private::RetVal>::CLASS;

        impl ::core::ops::Deref for $name {
            type Target = $crate::StaticCall<$($unsafe)? extern "C" fn($($t),*) -> $ret>;
            #[inline(always)]
            fn deref(&self) -> &Self::Target {
                &self.__key
            }
        }

        // SAFETY: `__site` returns a shim whose body is a site bound (by `sym`) to this static.
        unsafe impl $crate::StaticCallKey for $name {
            type Fn = $($unsafe)? extern "C" fn($($t),*) -> $ret;

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
                    unsafe fn invoke(regs: $crate::__private::Regs) -> $crate::__private::Ret {
                        $crate::__site_asm!($name, 0, U::ID, regs)
                    }
                }
                #[inline(always)]
                #[allow(improper_ctypes_definitions)]
                $($unsafe)? extern "C" fn shim<S: $crate::__private::Site>($($n: $t),*) -> $ret {
                    $crate::__shim_body!(S, $ret; $($n),*)
                }
                if $crate::__private::PATCHING {
                    shim::<Binding<U>>
                } else {
                    $name.__key.query()
                }
            }
        }
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
/// - a key defined with [`define_static_call!`]: `static_call!(CALC)(2, 3)`,
///   `static_call!(crate::ops::CALC)(2, 3)`;
/// - a type parameter bounded by [`StaticCallKey`](crate::StaticCallKey), in generic code:
///   `static_call!(K)(x)`;
/// - a [`StaticCall`](crate::StaticCall) field of a `static`, nested fields included:
///   `static_call!(OPS.read)(fd, buf)`.
///
/// A key known only at run time (a `&StaticCall` in a variable) cannot be named here, because the
/// site must prove which key it belongs to; call it with `key.query()(args)`, an atomic load and
/// an indirect call.
///
/// ```
/// use static_call::{StaticCall, define_static_call, static_call};
///
/// extern "C" fn twice(x: u32) -> u32 { 2 * x }
/// define_static_call!(TWICE: extern "C" fn(u32) -> u32 = twice);
///
/// struct Table { inner: Inner }
/// struct Inner { op: StaticCall<extern "C" fn(u32) -> u32> }
/// static TABLE: Table = Table { inner: Inner { op: StaticCall::new(twice) } };
///
/// let a = static_call!(TWICE)(4);
/// let b = static_call!(TABLE.inner.op)(a);
/// assert_eq!(b, 16);
/// ```
#[macro_export]
macro_rules! static_call {
    ($($key:tt)+) => {
        $crate::__static_call_split!([] $($key)+)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __static_call_split {
    // `BASE.field...`: a key that is a field of the static BASE.
    ([$($base:tt)+] . $($field:tt)+) => {{
        struct __StaticCallSite;
        // SAFETY: the asm block binds `BASE.field` (the static plus the field's offset) and
        // `__field_site` gives the shim the signature of the field's type.
        unsafe impl $crate::__private::Site for __StaticCallSite {
            #[inline(always)]
            unsafe fn invoke(regs: $crate::__private::Regs) -> $crate::__private::Ret {
                $crate::__site_asm!(
                    $($base)+,
                    // SAFETY: both pointers are into the same static.
                    unsafe {
                        (&raw const $($base)+ . $($field)+)
                            .byte_offset_from(&raw const $($base)+) as usize
                    },
                    $crate::__private::site_id(::core::file!(), ::core::line!(), ::core::column!()),
                    regs
                )
            }
        }
        $crate::__private::field_site::<__StaticCallSite, _>(&$($base)+ . $($field)+)
    }};
    ([$($path:tt)*] $next:tt $($rest:tt)*) => {
        $crate::__static_call_split!([$($path)* $next] $($rest)*)
    };
    // A key type: one defined by `define_static_call!`, or a type parameter.
    ([$($key:tt)+]) => {{
        struct __StaticCallSite;
        impl $crate::__private::SiteId for __StaticCallSite {
            const ID: u64 =
                $crate::__private::site_id(::core::file!(), ::core::line!(), ::core::column!());
        }
        <$($key)+ as $crate::StaticCallKey>::__site::<__StaticCallSite>()
    }};
}
