//! Tail sites: `static_call_fn!`, a function whose whole body is a call through a key, which
//! patching turns into a single `jmp` to the target.
//!
//! A thin public wrapper (`pub fn find(..) -> isize { static_call!(FIND)(..) }`) cannot
//! tail-call: an asm block cannot end its function, so the wrapper keeps a `call`/`ret` pair,
//! plus a push and a pop to keep the stack aligned for that call. `static_call_fn!` writes the
//! wrapper as a naked `extern "C"` function instead, whose body *is* the site:
//!
//! ```text
//! find:   lea   r11, [rip + FIND]         ; the key binding (the trampoline's interface)
//!         lea   r10, [rip + 1f]           ; the site's own address, for the tail entry
//!         <nop padding>                   ; .p2align 3,,4: the jmp in one aligned quadword
//!     1:  jmp   <tail entry>              ; the five rewritable bytes: `jmp target` once
//!                                         ; patched, NOP5 for a null key, `xor eax, eax`
//!                                         ; (cs cs cs) for a return-zero key
//!         ret                             ; reached only after the NOP or the `xor`
//! ```
//!
//! The target then returns straight to the wrapper's caller. The tail entry of the trampoline
//! (`asm/trampoline_x86_64.S`) takes the site's address from r10, since its return address is
//! the caller's; it registers the site as a tail site, which only a tail site's bytes can prove
//! (`arch::prove_tail_site`, and `kinds.rs`).
//!
//! A naked function's body is never type-checked, so the declared signature is checked against
//! the key's type at compile time: exactly the key's type, `unsafe` included (`same_signature`).

/// Defines a function whose whole body is a call through a key: once patched, it is a single
/// `jmp` to the key's target (or its near thunk), the cheapest thin wrapper there is.
///
/// ```
/// use static_call::{define_static_call, static_call_fn};
///
/// extern "C" fn find_scalar(n: u8, p: *const u8, len: usize) -> isize {
///     // SAFETY: callers pass a valid buffer.
///     let hay = unsafe { std::slice::from_raw_parts(p, len) };
///     hay.iter().position(|&b| b == n).map_or(-1, |i| i as isize)
/// }
/// define_static_call!(pub FIND: extern "C" fn(u8, *const u8, usize) -> isize = find_scalar);
///
/// static_call_fn!(
///     /// The position of `n` in `len` bytes at `p`, or -1.
///     pub fn find(n: u8, p: *const u8, len: usize) -> isize = FIND
/// );
///
/// let hay = b"static calls";
/// assert_eq!(find(b'c', hay.as_ptr(), hay.len()), 5);
/// let f: extern "C" fn(u8, *const u8, usize) -> isize = find; // an ordinary function pointer
/// assert_eq!(f(b'z', hay.as_ptr(), hay.len()), -1);
/// ```
///
/// The form is `[attributes] [visibility] [unsafe] fn NAME[<'a, ..>](ARG: TYPE, ..) [-> RESULT]
/// = KEY`,
/// where `KEY` is a key `static_call!` accepts by name: a static (`FIND`, `crate::ops::FIND`)
/// or a field of one (`OPS.read`). The function is `extern "C"`, as the key's type is, and must
/// be declared with exactly the key's signature: `unsafe fn` when the key's type is
/// `unsafe extern "C" fn`. Anything else fails to compile:
///
/// ```compile_fail
/// use static_call::{define_static_call, static_call_fn};
/// unsafe extern "C" fn raw(p: *const u8) -> u8 { unsafe { *p } }
/// define_static_call!(READ: unsafe extern "C" fn(*const u8) -> u8 = raw);
/// // A safe wrapper over an unsafe key would let safe code pass any pointer: refused.
/// static_call_fn!(pub fn read(p: *const u8) -> u8 = READ);
/// ```
///
/// The wrapper follows everything its key does: `update`, [`Batch`](crate::Batch),
/// [`unpatch_all`](crate::unpatch_all), `sites()` (it is one site of its key, listed once it has
/// run), null keys (the wrapper returns at once) and return-zero keys (it returns zero).
///
/// For keys of Rust signatures (`fn(..)`, not `extern "C"`), naked functions are not available
/// on stable Rust: write the wrapper as an ordinary function around `static_call!`, which costs
/// a call and a return more (docs/benchmarks.md, "Thin wrappers").
///
/// On platforms without patching (the portable fallback), the wrapper is an ordinary function
/// that loads the key's target and calls it.
#[macro_export]
macro_rules! static_call_fn {
    (
        $(#[$attr:meta])*
        $vis:vis unsafe fn $name:ident $(<$($lt:lifetime),+ $(,)?>)?
            ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)? = $($key:tt)+
    ) => {
        $crate::__static_call_split! { __static_call_fn {
            [$(#[$attr])*] [$vis] [unsafe] $name [$($($lt),+)?] [$($arg : $ty),*] [$($ret)?]
        } [] $($key)+ }
    };
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident $(<$($lt:lifetime),+ $(,)?>)?
            ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)? = $($key:tt)+
    ) => {
        $crate::__static_call_split! { __static_call_fn {
            [$(#[$attr])*] [$vis] [] $name [$($($lt),+)?] [$($arg : $ty),*] [$($ret)?]
        } [] $($key)+ }
    };
}

/// `static_call_fn!` once the key is split into its static and its path.
#[doc(hidden)]
#[macro_export]
macro_rules! __static_call_fn {
    ({
        [$($attr:tt)*] [$vis:vis] [$($unsafe:tt)?] $name:ident [$($lt:lifetime),*]
        [$($arg:ident : $ty:ty),*] [$($ret:ty)?]
    } [$($base:tt)+] [$($key:tt)+]) => {
        $crate::__tail_fn_body! {
            [$($attr)*] [$vis] [$($unsafe)?] $name [$($lt),*] [$($arg : $ty),*] [$($ret)?]
            [$($base)+] [$($key)+]
        }

        // The declared signature must be exactly the key's type: a naked body is never
        // type-checked, so a mismatch would pass garbage to the target.
        const _: () = {
            #[allow(dead_code, improper_ctypes_definitions)]
            fn check() {
                // First the key's type, then the declared one against it.
                let key: &$crate::StaticCall<_, $crate::CAbi> = &$($key)+;
                $crate::__private::same_signature::<
                    for<$($lt),*> $($unsafe)? extern "C" fn($($ty),*) $(-> $ret)?,
                >(key);
            }
        };
    };
}

/// The wrapper itself: the tail site, as a naked function.
#[cfg(static_call_patching)]
#[doc(hidden)]
#[macro_export]
macro_rules! __tail_fn_body {
    ([$($attr:tt)*] [$vis:vis] [$($unsafe:tt)?] $name:ident [$($lt:lifetime),*]
        [$($arg:ident : $ty:ty),*] [$($ret:ty)?] [$($base:tt)+] [$($key:tt)+]) => {
        $($attr)*
        #[unsafe(naked)]
        #[allow(improper_ctypes_definitions)]
        $vis $($unsafe)? extern "C" fn $name<$($lt),*>($($arg : $ty),*) $(-> $ret)? {
            // The layout `arch::prove_tail_site` proves: the site first (after at most 4 bytes
            // of padding, so that it lies in one aligned quadword), a `jmp rel32` to the binding
            // right after the `ret` (spelled out: the assembler would pick a 2-byte jmp), then
            // the `ret` that a NOP or `xor eax, eax` in its place falls through to, then the
            // binding the tail entry needs: the key in r11, the site's address in r10. Patched,
            // the wrapper's whole path is the site's `jmp f`.
            ::core::arch::naked_asm!(
                ".p2align 3,,4",
                "2: .byte 0xe9",
                ".long 3f - 2b - 5",
                "ret",
                "3: lea r11, [rip + {key} + {off}]",
                "lea r10, [rip + 2b]",
                "jmp {tail}",
                key = sym $($base)+,
                off = const $crate::__static_call_offset!([$($base)+] [$($key)+]),
                tail = sym $crate::__private::tail_trampoline,
            )
        }
    };
}

/// Without patching, the wrapper loads the key's target and calls it.
#[cfg(not(static_call_patching))]
#[doc(hidden)]
#[macro_export]
macro_rules! __tail_fn_body {
    ([$($attr:tt)*] [$vis:vis] [$($unsafe:tt)?] $name:ident [$($lt:lifetime),*]
        [$($arg:ident : $ty:ty),*] [$($ret:ty)?] [$($base:tt)+] [$($key:tt)+]) => {
        $($attr)*
        #[allow(improper_ctypes_definitions)]
        $vis $($unsafe)? extern "C" fn $name<$($lt),*>($($arg : $ty),*) $(-> $ret)? {
            let target = $($key)+.query();
            #[allow(unused_unsafe)]
            // SAFETY: for an `unsafe` key the wrapper is `unsafe` too (checked against the key's
            // type), and its caller vouches for the call.
            unsafe {
                target($($arg),*)
            }
        }
    };
}

/// Compiles only when `key` is a key of type `D`, the wrapper's declared signature: a reference
/// to a `StaticCall` does not coerce, so a safe `extern "C" fn` never passes for an `unsafe` one,
/// and a mismatch is reported as "expected safe fn, found unsafe fn" or with both types. Never
/// called: `static_call_fn!` names it inside a function that exists for the type check alone.
#[doc(hidden)]
pub fn same_signature<D>(key: &crate::StaticCall<D, crate::CAbi>) {
    let _ = key;
}
