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
/// A key's type can also be a Rust function type, with any sized arguments and result, and
/// targets that are Rust functions or closures without captures; a panic in the target unwinds
/// to the caller:
///
/// ```
/// use static_call::{define_static_call, static_call};
///
/// fn find_scalar(n: u8, hay: &[u8]) -> Option<usize> { hay.iter().position(|&b| b == n) }
/// define_static_call!(pub FIND: fn(u8, &[u8]) -> Option<usize> = find_scalar);
///
/// assert_eq!(static_call!(FIND)(b'x', b"abxd"), Some(2));
/// FIND.update(|n, h| h.iter().rposition(|&b| b == n)); // argument types inferred
/// assert_eq!(static_call!(FIND)(b'x', b"xax"), Some(2));
/// let f: fn(u8, &[u8]) -> Option<usize> = FIND.query();
/// assert_eq!(f(b'a', b"xax"), Some(1));
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
/// define_static_call!(pub ON_EVENT: fn(&str) = None);
///
/// static_call!(ON_TICK)(1); // nothing happens
/// static_call!(ON_EVENT)("start");
/// assert_eq!(static_call!(PENDING)(), 0);
/// ```
///
/// The form is `[attributes] [visibility] NAME: SIGNATURE = INITIAL_TARGET`, where `SIGNATURE`
/// is, optionally higher-ranked (`for<'a> fn(&'a T, &U) -> &'a T`):
/// - `extern "C" fn(A0, …) -> R` or `unsafe extern "C" fn(A0, …) -> R`: arguments must travel in
///   registers under System V (up to 6 integer-class and 8 `f32`/`f64` arguments, in any
///   order); the result is `()`, an integer-class type, `f32` or `f64`; targets are called
///   directly. Anything else is a compile error that names what is unsupported.
/// - `fn(A0, …) -> R`, `unsafe fn(..)`, `extern "C-unwind" fn(..)` or
///   `unsafe extern "C-unwind" fn(..)`: up to 16 arguments of any sized types, any sized
///   result; targets are function items or closures that capture nothing (the initial target
///   may be a closure, whose argument types are inferred), reached through an adapter (see
///   [`StaticCall::to`](crate::StaticCall::to)).
/// - a type alias of either, as long as its arguments do not borrow: the macro cannot see the
///   lifetimes of an alias, and a generic impl cannot cover a higher-ranked type, so a signature
///   that borrows must be spelled out here (the compile error says so).
///
/// The macro defines a `static NAME` (the key) and a type `NAME` that dereferences to
/// [`StaticCall`](crate::StaticCall) and implements [`StaticCallKey`](crate::StaticCallKey). The
/// type also has `set_null`, `set_return_zero` (and their `try_` forms) of its own, and for a
/// Rust key `update`, `try_update`, `update_pointer` and `try_update_pointer`, written from the
/// signature, so that they work for signatures that borrow too.
///
/// A Rust key of a signature that borrows has no `key.call(args)` (the run-time call of a key
/// reached through a reference): Rust's lifetime elision would tie an elided result lifetime to
/// the key rather than to the arguments. Write `(key.query())(args)`, which is what `call` does.
/// Keys of other signatures get `call` from [`StaticCall`](crate::StaticCall).
#[macro_export]
macro_rules! define_static_call {
    // Variadic functions: their callee cannot know how many arguments a site passed.
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $(for<$($lt:lifetime),+ $(,)?>)? $(unsafe)? extern $abi:literal
            fn ( $($arg:ty,)* ... ) $(-> $ret:ty)? = $($init:tt)+
    ) => {
        ::core::compile_error!(::core::concat!(
            "static_call: `", ::core::stringify!($name), "` has a variadic signature; ",
            "variadic functions cannot be static calls (an `extern \"C\" fn` with fixed ",
            "arguments, or a Rust `fn`, can)"
        ));
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $(for<$($lt:lifetime),+ $(,)?>)?
            unsafe extern "C" fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $($init:tt)+
    ) => {
        $crate::__define_static_call!(@names [c] [$(#[$attr])*] [$vis] $name
            [[$($($lt),+)?] unsafe] [$($ret)?] [$($init)+] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $(for<$($lt:lifetime),+ $(,)?>)?
            extern "C" fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $($init:tt)+
    ) => {
        $crate::__define_static_call!(@names [c] [$(#[$attr])*] [$vis] $name
            [[$($($lt),+)?]] [$($ret)?] [$($init)+] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $(for<$($lt:lifetime),+ $(,)?>)?
            unsafe extern "C-unwind" fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $($init:tt)+
    ) => {
        $crate::__define_static_call!(@names [rust [extern "C-unwind"]] [$(#[$attr])*] [$vis]
            $name [[$($($lt),+)?] unsafe] [$($ret)?] [$($init)+] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $(for<$($lt:lifetime),+ $(,)?>)?
            extern "C-unwind" fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $($init:tt)+
    ) => {
        $crate::__define_static_call!(@names [rust [extern "C-unwind"]] [$(#[$attr])*] [$vis]
            $name [[$($($lt),+)?]] [$($ret)?] [$($init)+] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $(for<$($lt:lifetime),+ $(,)?>)?
            unsafe fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $($init:tt)+
    ) => {
        $crate::__define_static_call!(@names [rust []] [$(#[$attr])*] [$vis] $name
            [[$($($lt),+)?] unsafe] [$($ret)?] [$($init)+] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $(for<$($lt:lifetime),+ $(,)?>)?
            fn ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? = $($init:tt)+
    ) => {
        $crate::__define_static_call!(@names [rust []] [$(#[$attr])*] [$vis] $name
            [[$($($lt),+)?]] [$($ret)?] [$($init)+] [] [$($arg),*]
            [a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15]);
    };
    // Anything else: a type whose tokens the macro cannot see (an alias), or no function type at
    // all. Goes through the generic impls of `Signature`, which say what is wrong.
    (
        $(#[$attr:meta])*
        $vis:vis $name:ident : $sig:ty = $($init:tt)+
    ) => {
        $crate::__define_static_call!(@alias [$(#[$attr])*] [$vis] $name [$sig] [$($init)+]);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __define_static_call {
    // Give each argument a name for the shim's parameter list.
    (@names $kind:tt $attrs:tt $vis:tt $name:ident $unsafe:tt $ret:tt $init:tt [$($done:tt)*]
        [$t:ty $(, $rest:ty)*] [$n:ident $($names:ident)*]) => {
        $crate::__define_static_call!(@names $kind $attrs $vis $name $unsafe $ret $init
            [$($done)* ($n: $t)] [$($rest),*] [$($names)*]);
    };
    (@names [c] $attrs:tt $vis:tt $name:ident $unsafe:tt $ret:tt $init:tt $done:tt
        [$t:ty $(, $rest:ty)*] []) => {
        ::core::compile_error!("static_call: too many arguments (at most 6 integer-class and 8 float arguments)");
    };
    (@names [rust $abi:tt] $attrs:tt $vis:tt $name:ident $unsafe:tt $ret:tt $init:tt $done:tt
        [$t:ty $(, $rest:ty)*] []) => {
        ::core::compile_error!("static_call: too many arguments (a Rust key takes at most 16)");
    };
    (@names $kind:tt $attrs:tt $vis:tt $name:ident $unsafe:tt [] $init:tt $done:tt [] $names:tt) => {
        $crate::__define_static_call!(@emit $kind $attrs $vis $name $unsafe [()] $init $done);
    };
    (@names $kind:tt $attrs:tt $vis:tt $name:ident $unsafe:tt [$ret:ty] $init:tt $done:tt [] $names:tt) => {
        $crate::__define_static_call!(@emit $kind $attrs $vis $name $unsafe [$ret] $init $done);
    };

    // ---- an `extern "C"` key -------------------------------------------------------------
    (@emit [c] [$($attr:tt)*] [$vis:vis] $name:ident [[$($lt:lifetime),*] $($unsafe:tt)?] [$ret:ty]
        [$($init:tt)+] [$(($n:ident : $t:ty))*]) => {
        #[allow(non_camel_case_types)]
        #[doc = ::core::concat!(
            "The type of the static-call key [`", ::core::stringify!($name), "`](static@",
            ::core::stringify!($name), "); it dereferences to [`StaticCall`](",
            "::static_call::StaticCall).")]
        #[repr(transparent)]
        $vis struct $name {
            __key: $crate::StaticCall<for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret, $crate::CAbi>,
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
            // (The `PhantomData` gives it the signature's implied bounds, e.g. `'b: 'a` for
            // `&'a T<'b>`.)
            const fn check<$($lt),*>(_: ::core::marker::PhantomData<($($t,)*)>) {
                $crate::__private::check_signature(&[$(<$t as $crate::__private::Arg>::CLASS),*]);
                let _ = <$ret as $crate::__private::RetVal>::CLASS;
            }
            check(::core::marker::PhantomData)
        };

        impl ::core::ops::Deref for $name {
            type Target = $crate::StaticCall<for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret, $crate::CAbi>;
            #[inline(always)]
            fn deref(&self) -> &Self::Target {
                &self.__key
            }
        }

        // SAFETY: the change sets the key to a function of its type.
        unsafe impl $crate::__private::Accepts<for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret> for $name {
            #[inline]
            fn __change(
                &self,
                target: for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret,
            ) -> $crate::__private::Change<'_> {
                $crate::__private::Accepts::__change(&self.__key, target)
            }
        }

        $crate::__define_static_call!(@zero_methods $name);

        // SAFETY: `__site` returns a shim whose body is a site bound (by `sym`) to this static.
        unsafe impl $crate::StaticCallKey for $name {
            type Fn = for<$($lt),*> $($unsafe)? extern "C" fn($($t),*) -> $ret;
            type Abi = $crate::CAbi;
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
            fn key() -> &'static $crate::StaticCall<Self::Fn, Self::Abi> {
                &$name.__key
            }

            $crate::__define_static_call!(@site $name);

            unsafe fn __try_set_zero(null: bool) -> ::core::result::Result<(), $crate::Error> {
                let target = if null { $crate::Target::Null } else { $crate::Target::ReturnZero };
                // SAFETY: `__zero` does nothing or returns zero; the caller checked the result.
                unsafe { $name.__key.__try_set(target, $name::__zero) }
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
        unsafe { $crate::StaticCall::<$fnty, $crate::CAbi>::__new_zero_unchecked($name::__zero, true) }
    }};
    (@init $name:ident [$fnty:ty] ReturnZero) => {{
        const _: () = ::core::assert!(
            <$name as $crate::StaticCallKey>::__ZEROABLE,
            "a key defined `= ReturnZero` must return a type that can be zero (an integer, bool, char, a raw pointer, an Option of a reference)"
        );
        // SAFETY: the type is spelled `extern "C" fn(..)`; `__zero` returns zero.
        unsafe { $crate::StaticCall::<$fnty, $crate::CAbi>::__new_zero_unchecked($name::__zero, false) }
    }};
    (@init $name:ident [$fnty:ty] $init:expr) => {
        // SAFETY: the type is spelled `extern "C" fn(..)` right here.
        unsafe { $crate::StaticCall::<$fnty, $crate::CAbi>::__new_unchecked($init) }
    };

    // ---- a Rust key ------------------------------------------------------------------------
    (@emit [rust [$($abi:tt)*]] [$($attr:tt)*] [$vis:vis] $name:ident
        [[$($lt:lifetime),*] $($unsafe:tt)?] [$ret:ty] [$($init:tt)+] [$(($n:ident : $t:ty))*]) => {
        #[allow(non_camel_case_types)]
        #[doc = ::core::concat!(
            "The type of the static-call key [`", ::core::stringify!($name), "`](static@",
            ::core::stringify!($name), "); it dereferences to [`StaticCall`](",
            "::static_call::StaticCall).")]
        #[repr(transparent)]
        $vis struct $name {
            __key: $crate::StaticCall<
                for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret,
                $crate::RustAbi,
            >,
        }

        $($attr)*
        $vis static $name: $name = $name {
            __key: $crate::__define_static_call!(@rust_init $name $($init)+),
        };

        impl ::core::ops::Deref for $name {
            type Target = $crate::StaticCall<
                for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret,
                $crate::RustAbi,
            >;
            #[inline(always)]
            fn deref(&self) -> &Self::Target {
                &self.__key
            }
        }

        $crate::__rust_signature! {
            holder [$name]
            params []
            lifetimes [$($lt),*]
            abi [$($abi)*]
            unsafe [$($unsafe)?]
            args [$(($n: $t))*]
            ret [$ret]
            key |this| &this.__key
        }

        impl $name {
            /// Makes every call through this key call `target`, a function or a closure that
            /// captures nothing; see [`StaticCall::update`](::static_call::StaticCall::update).
            #[allow(dead_code)]
            pub fn update<T: for<$($lt),*> Fn($($t),*) -> $ret + Copy + 'static>(&self, target: T) {
                $crate::StaticCall::<
                    for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret,
                    $crate::RustAbi,
                >::__expect(self.try_update(target))
            }

            /// Like `update`, reporting failure instead of panicking.
            #[allow(dead_code)]
            pub fn try_update<T: for<$($lt),*> Fn($($t),*) -> $ret + Copy + 'static>(
                &self,
                target: T,
            ) -> ::core::result::Result<(), $crate::Error> {
                $crate::StaticCall::<
                    for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret,
                    $crate::RustAbi,
                >::__commit(&[$crate::__private::Accepts::<T>::__change(self, target)])
            }

            /// Makes every call through this key call the function pointer `f` (the slower
            /// path); see [`StaticCall::update_pointer`](::static_call::StaticCall::update_pointer).
            #[allow(dead_code)]
            pub fn update_pointer(&self, f: for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret) {
                $crate::StaticCall::<
                    for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret,
                    $crate::RustAbi,
                >::__expect(self.try_update_pointer(f))
            }

            /// Like `update_pointer`, reporting failure instead of panicking.
            #[allow(dead_code)]
            pub fn try_update_pointer(
                &self,
                f: for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret,
            ) -> ::core::result::Result<(), $crate::Error> {
                $crate::StaticCall::<
                    for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret,
                    $crate::RustAbi,
                >::__commit(&[self.__key.__change_to_pointer::<$name>(f)])
            }

        }

        $crate::__define_static_call!(@zero_methods $name);

        // SAFETY: `__site` returns a shim whose body is a site bound (by `sym`) to this static.
        unsafe impl $crate::StaticCallKey for $name {
            type Fn = for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret;
            type Abi = $crate::RustAbi;
            const __RESULT: $crate::__private::Class = {
                const fn class<$($lt),*>(
                    _: ::core::marker::PhantomData<($($t,)*)>,
                ) -> $crate::__private::Class {
                    #[allow(unused_imports)]
                    use $crate::__private::ProbeFallback as _;
                    if $crate::__private::Probe::<$ret>::IS_UNIT {
                        $crate::__private::Class::Void
                    } else {
                        $crate::__private::Class::Int
                    }
                }
                class(::core::marker::PhantomData)
            };
            const __ZEROABLE: bool = {
                const fn zeroable<$($lt),*>(_: ::core::marker::PhantomData<($($t,)*)>) -> bool {
                    #[allow(unused_imports)]
                    use $crate::__private::ProbeFallback as _;
                    $crate::__private::Probe::<$ret>::ZEROABLE
                        && ::core::mem::size_of::<$ret>() <= 8
                }
                zeroable(::core::marker::PhantomData)
            };
            const __ARGS_NEED_DROP: bool = {
                const fn needs_drop<$($lt),*>(_: ::core::marker::PhantomData<($($t,)*)>) -> bool {
                    false $(|| ::core::mem::needs_drop::<$t>())*
                }
                needs_drop(::core::marker::PhantomData)
            };

            #[inline(always)]
            fn key() -> &'static $crate::StaticCall<Self::Fn, Self::Abi> {
                &$name.__key
            }

            $crate::__define_static_call!(@site $name);

            unsafe fn __try_set_zero(null: bool) -> ::core::result::Result<(), $crate::Error> {
                // SAFETY: the zero adapter and the key's zero function; the caller checked the
                // result and the arguments.
                unsafe {
                    $name.__key.__try_set_zero(
                        null,
                        $crate::__private::zero_adapter as *const (),
                        $crate::__private::fn_to_ptr(<$name as $crate::__private::RustSig>::ZERO),
                    )
                }
            }
        }

        // SAFETY: the shim is the conventions' shim (`__rust_signature!`).
        unsafe impl $crate::__private::KeyShims for $name {
            type Fn = for<$($lt),*> $($unsafe)? $($abi)* fn($($t),*) -> $ret;

            #[inline(always)]
            fn __shim<S: $crate::__private::Site>() -> Self::Fn {
                <$name as $crate::__private::RustSig>::__shim::<S>()
            }
        }
    };
    // A Rust key's initial target: `None`, `ReturnZero`, or a function item or closure.
    (@rust_init $name:ident None) => {
        $crate::__private::rust_zero_key::<$name>(true)
    };
    (@rust_init $name:ident ReturnZero) => {
        $crate::__private::rust_zero_key::<$name>(false)
    };
    (@rust_init $name:ident $init:expr) => {
        $crate::__private::rust_key_to::<$name, _>($init)
    };

    // ---- a signature the macro cannot see (a type alias) ------------------------------------
    (@alias [$($attr:tt)*] [$vis:vis] $name:ident [$sig:ty] [$($init:tt)+]) => {
        #[allow(non_camel_case_types)]
        #[doc = ::core::concat!(
            "The type of the static-call key [`", ::core::stringify!($name), "`](static@",
            ::core::stringify!($name), "); it dereferences to [`StaticCall`](",
            "::static_call::StaticCall).")]
        #[repr(transparent)]
        $vis struct $name {
            // Named through this trait, whose name says what to do when the signature borrows
            // (a higher-ranked type, which no generic impl covers): the first error is then
            // "implementation of `BorrowingSignatureMustBeSpelledOutInDefineStaticCall` is not
            // general enough".
            __key: $crate::StaticCall<
                $sig,
                <$sig as $crate::__private::BorrowingSignatureMustBeSpelledOutInDefineStaticCall>::Abi,
            >,
        }

        $($attr)*
        $vis static $name: $name = $name {
            __key: $crate::__define_static_call!(@alias_init [$sig] $($init)+),
        };

        impl ::core::ops::Deref for $name {
            type Target = $crate::StaticCall<$sig>;
            #[inline(always)]
            fn deref(&self) -> &Self::Target {
                &self.__key
            }
        }

        // SAFETY: the change is the one the key's own type makes.
        unsafe impl<T> $crate::__private::Accepts<T> for $name
        where
            $crate::StaticCall<$sig>: $crate::__private::Accepts<T>,
        {
            #[inline]
            fn __change(&self, target: T) -> $crate::__private::Change<'_> {
                $crate::__private::Accepts::__change(&self.__key, target)
            }
        }

        $crate::__define_static_call!(@zero_methods $name);

        // SAFETY: `__site` returns a shim whose body is a site bound (by `sym`) to this static.
        unsafe impl $crate::StaticCallKey for $name {
            type Fn = $sig;
            type Abi = <$sig as $crate::Signature>::Abi;
            const __RESULT: $crate::__private::Class = {
                #[allow(unused_imports)]
                use $crate::__private::ProbeFallback as _;
                if $crate::__private::Probe::<<$sig as $crate::Signature>::Output>::IS_UNIT {
                    $crate::__private::Class::Void
                } else {
                    $crate::__private::Class::Int
                }
            };
            const __ZEROABLE: bool = {
                #[allow(unused_imports)]
                use $crate::__private::ProbeFallback as _;
                $crate::__private::Probe::<<$sig as $crate::Signature>::Output>::ZEROABLE
            };
            const __ARGS_NEED_DROP: bool = <$sig as $crate::Signature>::__ARGS_NEED_DROP;

            #[inline(always)]
            fn key() -> &'static $crate::StaticCall<Self::Fn, Self::Abi> {
                &$name.__key
            }

            $crate::__define_static_call!(@site $name);

            unsafe fn __try_set_zero(null: bool) -> ::core::result::Result<(), $crate::Error> {
                // SAFETY: the signature's zero functions; the caller checked the result.
                unsafe {
                    $name.__key.__try_set_zero(
                        null,
                        <$sig as $crate::Signature>::__ZERO_FUNC,
                        <$sig as $crate::Signature>::__ZERO_RUST,
                    )
                }
            }
        }

        // SAFETY: the shims of `StaticCall<$sig>`, for the same signature.
        unsafe impl $crate::__private::KeyShims for $name {
            type Fn = $sig;

            #[inline(always)]
            fn __shim<S: $crate::__private::Site>() -> Self::Fn {
                <$crate::StaticCall<$sig> as $crate::__private::KeyShims>::__shim::<S>()
            }
        }
    };
    (@alias_init [$sig:ty] None) => {
        $crate::StaticCall::<$sig>::null()
    };
    (@alias_init [$sig:ty] ReturnZero) => {
        $crate::StaticCall::<$sig>::return_zero()
    };
    (@alias_init [$sig:ty] $init:expr) => {
        $crate::StaticCall::<$sig>::__init($init)
    };

    // ---- pieces every key type has --------------------------------------------------------
    // `StaticCallKey::__site`: the site of generic code (`static_call!(<K>)`).
    (@site $name:ident) => {
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
    };
    // `set_null` and `set_return_zero` as the key type's own methods, so that they need no
    // `use StaticCallKey` (they also work where the signature borrows).
    (@zero_methods $name:ident) => {
        impl $name {
            /// Removes the key's target: calls do nothing; see
            /// [`StaticCall::set_null`](::static_call::StaticCall::set_null). Fails to compile
            /// for a key that returns a value.
            #[allow(dead_code)]
            pub fn set_null(&self) {
                <Self as $crate::StaticCallKey>::set_null(self)
            }

            /// Like `set_null`, reporting failure instead of panicking.
            #[allow(dead_code)]
            pub fn try_set_null(&self) -> ::core::result::Result<(), $crate::Error> {
                <Self as $crate::StaticCallKey>::try_set_null(self)
            }

            /// Makes every call return zero; see
            /// [`StaticCall::set_return_zero`](::static_call::StaticCall::set_return_zero).
            /// Fails to compile for a key whose result cannot be zero.
            #[allow(dead_code)]
            pub fn set_return_zero(&self) {
                <Self as $crate::StaticCallKey>::set_return_zero(self)
            }

            /// Like `set_return_zero`, reporting failure instead of panicking.
            #[allow(dead_code)]
            pub fn try_set_return_zero(&self) -> ::core::result::Result<(), $crate::Error> {
                <Self as $crate::StaticCallKey>::try_set_return_zero(self)
            }
        }
    };
}

/// An adapter for a `#[target_feature]` function as a Rust key's target, with the CPU check that
/// makes calling it sound. Returns an [`Adapter`](crate::Adapter), installed with
/// `update_adapter` (or [`Batch::update_adapter`](crate::Batch::update_adapter)).
///
/// A `#[target_feature]` function is not a Rust `Fn` (calling it is only sound where the CPU has
/// its features), so `update` cannot take it; this macro names it, checks the CPU, and writes the
/// adapter where the function is named:
/// - `target_feature!(KEY, "avx2", function)` (or `["avx2", "bmi2"]`) checks the CPU with
///   `is_x86_feature_detected!` and returns `Some(adapter)`, or `None` if a feature is missing;
/// - `target_feature!(unchecked KEY, "avx2", function)` returns the adapter without checking,
///   and must be written inside `unsafe { }`: the caller promises the CPU has the features.
///
/// `KEY` is the key's type: the name given to `define_static_call!`, or
/// `StaticCall<fn(..) -> R>` for a key in a struct field. `function` is a path to a function
/// of the key's signature (safe or `unsafe`, of the key's ABI).
///
/// The function keeps its features and runs at full speed; sites reach it through an adapter
/// that calls it directly (a `jmp` where LLVM knows it cannot unwind, else a call), with no
/// indirect call. An adapter compiled with the features themselves could let a small target
/// inline into it, but LLVM does not inline `catch_unwind`'s helpers into a function with target
/// features around a call that stays a call, so a target too big to inline (most SIMD searches)
/// ended up three calls deep; docs/design.md ("Adapters") has the measurements.
///
/// ```
/// # #[cfg(target_arch = "x86_64")] {
/// use static_call::{define_static_call, static_call, target_feature};
///
/// #[target_feature(enable = "avx2")]
/// fn sum_avx2(v: &[u32]) -> u64 { v.iter().map(|&x| x as u64).sum() }
/// fn sum_plain(v: &[u32]) -> u64 { v.iter().map(|&x| x as u64).sum() }
///
/// define_static_call!(SUM: fn(&[u32]) -> u64 = sum_plain);
/// if let Some(avx2) = target_feature!(SUM, "avx2", sum_avx2) {
///     SUM.update_adapter(avx2);
/// }
/// assert_eq!(static_call!(SUM)(&[1, 2, 3]), 6);
/// # }
/// ```
#[macro_export]
macro_rules! target_feature {
    (unchecked $key:ty, [$($feature:tt),+ $(,)?], $target:path $(,)?) => {
        $crate::__adapter_of!($key, [$($feature),+], $target)
    };
    (unchecked $key:ty, $feature:tt, $target:path $(,)?) => {
        $crate::__adapter_of!($key, [$feature], $target)
    };
    ($key:ty, [$($feature:tt),+ $(,)?], $target:path $(,)?) => {
        if true $(&& ::std::is_x86_feature_detected!($feature))+ {
            // SAFETY: this CPU has every feature the adapter is compiled with.
            ::core::option::Option::Some(unsafe {
                $crate::__adapter_of!($key, [$($feature),+], $target)
            })
        } else {
            ::core::option::Option::None
        }
    };
    ($key:ty, $feature:tt, $target:path $(,)?) => {
        $crate::target_feature!($key, [$feature], $target)
    };
}

/// Writes the adapter of an `unsafe fn` (or any function the generic adapter cannot call, such
/// as a safe `#[target_feature]` function on a CPU known to have its features) for a Rust key.
/// Must be written inside `unsafe { }`: the caller promises that calling `function` through the
/// key is sound, for whatever arguments the key's callers pass (for an `unsafe` key, under the
/// promise its callers make). Returns an [`Adapter`](crate::Adapter).
///
/// `KEY` is the key's type, as for [`target_feature!`](crate::target_feature).
///
/// ```
/// use static_call::{define_static_call, static_call, unsafe_target};
///
/// /// # Safety
/// /// `i < v.len()`.
/// unsafe fn get(v: &[u8], i: usize) -> u8 { unsafe { *v.get_unchecked(i) } }
/// define_static_call!(GET: unsafe fn(&[u8], usize) -> u8 = |v, i| v[i]);
///
/// // SAFETY: `GET` is an unsafe key whose callers promise `i < v.len()`, as `get` requires.
/// GET.update_adapter(unsafe { unsafe_target!(GET, get) });
/// assert_eq!(unsafe { static_call!(GET)(&[5, 6, 7], 2) }, 7);
/// ```
#[macro_export]
macro_rules! unsafe_target {
    ($key:ty, $target:path $(,)?) => {
        $crate::__adapter_of!($key, [], $target)
    };
}

/// An `Adapter` for `$target` under the conventions of the key type `$key` (`$feature` names
/// the target features the caller checked or vouches for). Expands to a call of an `unsafe fn`.
#[doc(hidden)]
#[macro_export]
macro_rules! __adapter_of {
    ($key:ty, [$($feature:tt),*], $target:path) => {{
        /// The target, as a constant (`ConstCallee`): the adapter calls it directly.
        struct __StaticCallTarget;
        impl $crate::__private::ConstCallee<$key> for __StaticCallTarget {
            const CALLEE: <$key as $crate::__private::RustSig>::Callee = $target;
        }
        // Only the CPU check (or the caller's promise) concerns the features: the adapter is a
        // plain one, which calls the target directly (a `jmp` where the target cannot unwind).
        // An adapter compiled with the features would let a small target inline into it, but
        // LLVM does not inline `catch_unwind`'s helpers into a function with target features
        // around a call it keeps (a target too large to inline), and a big target then sat
        // three calls deep (measured: docs/design.md, "Adapters").
        let _: &[&str] = &[$($feature),*];
        let callee: <$key as $crate::__private::RustSig>::Callee = $target;
        $crate::Adapter::<<$key as $crate::__private::RustSig>::Fn>::__new(
            $crate::__private::adapter::<$key, __StaticCallTarget> as *const (),
            ::core::mem::transmute::<
                <$key as $crate::__private::RustSig>::Callee,
                <$key as $crate::__private::RustSig>::Fn,
            >(callee),
        )
    }};
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
    // `*key`: a key reached through a reference, known only at run time.
    (* $($key:tt)+) => {
        ::core::compile_error!(::core::concat!(
            "static_call!(*", ::core::stringify!($($key)+), ") names a key known only at run ",
            "time, which no call site can be bound to: call it with `",
            ::core::stringify!($($key)+), ".call(args)` (or name a `static` key here)"
        ))
    };
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

/// A site bound to the key `$key`, which is the static `$base` (offset 0) or a field of it (at
/// the constant offset `$off`).
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
