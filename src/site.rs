//! The call site: how `static_call!(KEY)(args)` turns into one inline-asm block.
//!
//! A site is written once per *key* (or once per `static_call!(OPS.field)` expansion), not once
//! per signature, so its asm block has a fixed interface: a register file [`Regs`] holding the six
//! System V integer argument registers and xmm0–7, and a result [`Ret`] of rax, rdx and xmm0.
//! Unused registers are left uninitialised, which LLVM lowers to "whatever is there": no
//! instruction is spent on them. The traits below put each argument in its register and take the result out;
//! after inlining, all of that folds away and the site is
//!
//! ```text
//! lea   r11, [rip + KEY (+ field offset)]   ; 7 bytes: the key binding the patcher proves
//! <0..=4 bytes of NOP padding>              ; .p2align 3,,4, chosen by the assembler
//! call  <trampoline>                        ; E8 rel32 at an address ≡ 0..=3 (mod 8), so that
//!                                           ; its 5 bytes lie in one aligned quadword
//! ```
//!
//! Each site gets its own copy of the asm because the shim that contains it is generic over a
//! type declared fresh at every `static_call!` expansion (see `macros.rs`).

use core::mem::MaybeUninit;

#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub type Xmm = core::arch::x86_64::__m128;
#[cfg(not(target_arch = "x86_64"))]
#[doc(hidden)]
pub type Xmm = [u64; 2];

/// Number of integer argument registers (rdi, rsi, rdx, rcx, r8, r9).
pub const INT_REGS: usize = 6;
/// Number of vector argument registers (xmm0–xmm7).
pub const FLOAT_REGS: usize = 8;

/// The argument registers of a call, as the site's asm block takes them.
#[doc(hidden)]
pub struct Regs {
    pub gp: [MaybeUninit<u64>; INT_REGS],
    pub xmm: [MaybeUninit<Xmm>; FLOAT_REGS],
}

impl Regs {
    pub const UNINIT: Regs = Regs {
        gp: [MaybeUninit::uninit(); INT_REGS],
        xmm: [MaybeUninit::uninit(); FLOAT_REGS],
    };
}

/// The result registers of a call. (rdx carries the second half of a Rust key's 16-byte result,
/// see `adapter.rs`; `extern "C"` keys never read it.)
#[doc(hidden)]
pub struct Ret {
    pub rax: MaybeUninit<u64>,
    pub rdx: MaybeUninit<u64>,
    pub xmm0: MaybeUninit<Xmm>,
}

/// Where the next argument of each class goes.
#[doc(hidden)]
#[derive(Default)]
pub struct Cursor {
    gp: usize,
    xmm: usize,
}

/// The register class an argument or result travels in.
#[doc(hidden)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    /// Nothing (the `()` result).
    Void,
    /// One general-purpose register.
    Int,
    /// One xmm register.
    Float,
}

/// One inlined call-site asm block. Implemented by the types that `define_static_call!` and
/// `static_call!` declare; each implementation's `invoke` contains exactly one site.
///
/// # Safety
/// `invoke` must call the target of the key it binds, with the registers in `regs` as its
/// arguments, under the System V ABI, and `key` must return that key.
#[doc(hidden)]
pub unsafe trait Site {
    /// The key the site binds. The portable fallback calls its target from here.
    fn key() -> &'static crate::key::RawKey;
    /// # Safety
    /// `regs` must hold valid arguments for the key's signature in their System V registers.
    unsafe fn invoke(regs: Regs) -> Ret;
}

/// A type that can be an argument of a static call: it travels in one System V register.
///
/// ```
/// use static_call::{Arg, StaticCall};
/// // Every argument type of a key implements `Arg`.
/// fn takes<A: Arg>(_: A) {}
/// takes(1u8);
/// takes(2.5f64);
/// takes(&"text");
/// extern "C" fn f(_: *const u8, _: f32, _: bool) {}
/// static K: StaticCall<extern "C" fn(*const u8, f32, bool)> = StaticCall::new(f);
/// ```
///
/// # Safety
/// `CLASS` must be the System V class of `Self` and `place` must put the value where an
/// `extern "C"` callee expects it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an argument of a static call",
    label = "not passed in a single System V register",
    note = "static-call arguments are integers up to 64 bits, bool, char, raw pointers, references to sized types, NonNull, Option<&T>, Option<NonNull<T>>, function pointers, f32 and f64",
    note = "structs by value, u128/i128 and slices are not supported: pass a pointer or reference instead"
)]
pub unsafe trait Arg: Sized {
    #[doc(hidden)]
    const CLASS: Class;
    #[doc(hidden)]
    fn __place(self, regs: &mut Regs, cursor: &mut Cursor);
}

/// A type that can be the result of a static call.
///
/// ```
/// use static_call::RetVal;
/// fn returns<R: RetVal>() {}
/// returns::<()>();
/// returns::<i64>();
/// returns::<Option<&'static u8>>();
/// returns::<f32>();
/// ```
///
/// # Safety
/// `CLASS` must be the System V class of `Self`, and `__from_ret` must read the value from where
/// an `extern "C"` callee leaves it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the result of a static call",
    label = "not returned in a single System V register",
    note = "static calls return (), integers up to 64 bits, bool, char, raw pointers, references to sized types, NonNull, Option<&T>, Option<NonNull<T>>, function pointers, f32 or f64"
)]
pub unsafe trait RetVal: Sized {
    #[doc(hidden)]
    const CLASS: Class;
    /// Whether `Self` is `ZeroableResult`.
    #[doc(hidden)]
    const ZEROABLE: bool = false;
    /// # Safety
    /// `ret` must come from a call to a function whose result type is `Self`.
    #[doc(hidden)]
    unsafe fn __from_ret(ret: Ret) -> Self;
    /// What a key with no target, or set to return zero, returns: nothing or zero. For a type
    /// that cannot be zero (references, `NonNull`, function pointers) it aborts; such keys cannot
    /// be given those targets, so it is never reached.
    #[doc(hidden)]
    fn __zero() -> Self;
}

/// A result type a key can be set to return zero with
/// ([`set_return_zero`](crate::StaticCall::set_return_zero)): zero is a valid value of it, and it
/// comes back in rax, which a patched site zeroes with `xor eax, eax`.
///
/// ```
/// use static_call::ZeroableResult;
/// fn can_return_zero<R: ZeroableResult>() {}
/// can_return_zero::<u32>();
/// can_return_zero::<bool>();
/// can_return_zero::<*const u8>();
/// can_return_zero::<Option<&'static u8>>();
/// ```
///
/// # Safety
/// All-zero bits must be a valid `Self`, returned in rax.
#[diagnostic::on_unimplemented(
    message = "a key returning `{Self}` cannot be set to return zero",
    label = "`{Self}` is never zero, or is not returned in rax",
    note = "return-zero works for integers, bool, char, raw pointers, Option<&T>, Option<NonNull<T>> and Option<fn>; a key returning () can be set to null instead"
)]
pub unsafe trait ZeroableResult: RetVal {}

/// The result type of a key that can have no target
/// ([`set_null`](crate::StaticCall::set_null)): `()`.
///
/// ```
/// use static_call::NoResult;
/// fn can_be_null<R: NoResult>() {}
/// can_be_null::<()>();
/// ```
#[diagnostic::on_unimplemented(
    message = "a key returning `{Self}` cannot have a null target",
    label = "only keys returning () can do nothing",
    note = "a key returning an integer, bool or pointer can be set to return zero instead"
)]
pub trait NoResult: RetVal {}

impl NoResult for () {}

/// Answers, as constants, questions about a concrete type that has no trait to ask through (a
/// Rust key's result, spelled out in `define_static_call!`): an inherent constant where the
/// answer is yes, [`ProbeFallback`]'s `false` otherwise. Only meaningful for concrete types.
#[doc(hidden)]
pub struct Probe<T: ?Sized>(core::marker::PhantomData<T>);

impl Probe<()> {
    /// `()` is the one result a key without a target can have.
    pub const IS_UNIT: bool = true;
}

impl<T: ZeroableResult> Probe<T> {
    /// All-zero bits are a valid `T`, returned in rax.
    pub const ZEROABLE: bool = true;
}

/// The "no" answers of [`Probe`].
#[doc(hidden)]
pub trait ProbeFallback {
    /// Not `()`.
    const IS_UNIT: bool = false;
    /// Not a `ZeroableResult`.
    const ZEROABLE: bool = false;
}

impl<T: ?Sized> ProbeFallback for Probe<T> {}

/// Stores `v` in the low bytes of a register image; the bytes above are left undefined, which
/// is what System V allows for 32- and 64-bit values and what costs no instruction.
#[inline(always)]
fn low_bytes<T, R>(v: T) -> MaybeUninit<R> {
    const {
        assert!(size_of::<T>() <= size_of::<R>() && align_of::<T>() <= align_of::<R>());
    }
    let mut r = MaybeUninit::<R>::uninit();
    // SAFETY: the const assertion above makes the write fit inside `r`, and suitably aligned.
    unsafe { r.as_mut_ptr().cast::<T>().write(v) };
    r
}

/// Reads a `T` from the low bytes of a register image.
///
/// # Safety
/// The low `size_of::<T>()` bytes must hold a valid `T`.
#[inline(always)]
unsafe fn read_low<T, R>(r: MaybeUninit<R>) -> T {
    const {
        assert!(size_of::<T>() <= size_of::<R>() && align_of::<T>() <= align_of::<R>());
    }
    // SAFETY: in bounds and aligned by the assertion; validity is the caller's promise.
    unsafe { r.as_ptr().cast::<T>().read() }
}

#[inline(always)]
fn put_gp(regs: &mut Regs, cursor: &mut Cursor, v: MaybeUninit<u64>) {
    regs.gp[cursor.gp] = v;
    cursor.gp += 1;
}

#[inline(always)]
fn put_xmm(regs: &mut Regs, cursor: &mut Cursor, v: MaybeUninit<Xmm>) {
    regs.xmm[cursor.xmm] = v;
    cursor.xmm += 1;
}

/// Integer-class types whose upper register bytes may be anything (32 and 64 bits wide).
/// `zero` marks those for which all-zero bits are a valid value; `never` those that are never
/// zero (references, `NonNull`, function pointers).
macro_rules! int_class_wide {
    ($($kind:ident [$($g:tt)*] $t:ty),* $(,)?) => {$(
        // SAFETY: INTEGER class, passed in the next general-purpose register; System V leaves
        // the bits above a 32-bit value undefined, so writing only the low bytes is enough.
        unsafe impl<$($g)*> Arg for $t {
            const CLASS: Class = Class::Int;
            #[inline(always)]
            fn __place(self, regs: &mut Regs, cursor: &mut Cursor) {
                put_gp(regs, cursor, low_bytes(self));
            }
        }
        // SAFETY: INTEGER class results come back in rax; the callee's type guarantees that the
        // low bytes hold a valid value.
        unsafe impl<$($g)*> RetVal for $t {
            const CLASS: Class = Class::Int;
            const ZEROABLE: bool = int_class_wide!(@zeroable_const $kind);
            #[inline(always)]
            unsafe fn __from_ret(ret: Ret) -> Self {
                // SAFETY: see the impl comment.
                unsafe { read_low(ret.rax) }
            }
            fn __zero() -> Self {
                int_class_wide!(@zero $kind)
            }
        }
        int_class_wide!(@zeroable $kind [$($g)*] $t);
    )*};
    (@zero zero) => {
        // SAFETY: `zero` types are valid when all-zero (checked by `ZeroableResult` below).
        unsafe { core::mem::zeroed() }
    };
    (@zero never) => {
        // Unreachable: only keys whose result is `ZeroableResult` get a zero target.
        std::process::abort()
    };
    (@zeroable zero [$($g:tt)*] $t:ty) => {
        // SAFETY: all-zero bits are a valid value (0, null, None), returned in rax.
        unsafe impl<$($g)*> ZeroableResult for $t {}
    };
    (@zeroable never [$($g:tt)*] $t:ty) => {};
    (@zeroable_const zero) => { true };
    (@zeroable_const never) => { false };
}

/// Integer-class types narrower than 32 bits: callers extend them to 32 bits (zero for unsigned
/// and bool, sign for signed), which LLVM-compiled callees rely on.
macro_rules! int_class_narrow {
    ($($t:ty => $ext:ty),* $(,)?) => {$(
        // SAFETY: INTEGER class, extended to 32 bits as clang and rustc callees expect.
        unsafe impl Arg for $t {
            const CLASS: Class = Class::Int;
            #[inline(always)]
            fn __place(self, regs: &mut Regs, cursor: &mut Cursor) {
                put_gp(regs, cursor, low_bytes(self as $ext));
            }
        }
        // SAFETY: the value is in the low bytes of rax.
        unsafe impl RetVal for $t {
            const CLASS: Class = Class::Int;
            const ZEROABLE: bool = true;
            #[inline(always)]
            unsafe fn __from_ret(ret: Ret) -> Self {
                // SAFETY: see the impl comment; every bit pattern is a valid integer.
                unsafe { read_low(ret.rax) }
            }
            fn __zero() -> Self {
                0
            }
        }
        // SAFETY: zero is a valid integer, returned in rax.
        unsafe impl ZeroableResult for $t {}
    )*};
}

int_class_narrow!(u8 => u32, u16 => u32, i8 => i32, i16 => i32);

// SAFETY: bool is INTEGER class; System V requires bit 0 to hold the value and bits 1–7 to be
// zero, and callers zero-extend to 32 bits. Returned bools are valid by the callee's type.
unsafe impl Arg for bool {
    const CLASS: Class = Class::Int;
    #[inline(always)]
    fn __place(self, regs: &mut Regs, cursor: &mut Cursor) {
        put_gp(regs, cursor, low_bytes(self as u32));
    }
}
// SAFETY: see the Arg impl.
unsafe impl RetVal for bool {
    const CLASS: Class = Class::Int;
    const ZEROABLE: bool = true;
    #[inline(always)]
    unsafe fn __from_ret(ret: Ret) -> Self {
        // SAFETY: an `extern "C"` function returning bool leaves 0 or 1 in al.
        unsafe { read_low(ret.rax) }
    }
    fn __zero() -> Self {
        false
    }
}
// SAFETY: zero is `false`, returned in al.
unsafe impl ZeroableResult for bool {}

int_class_wide!(
    zero [] u32, zero [] i32, zero [] u64, zero [] i64, zero [] usize, zero [] isize, zero [] char,
    zero [T] *const T, zero [T] *mut T,
    never ['a, T] &'a T, never ['a, T] &'a mut T,
    never [T] core::ptr::NonNull<T>,
    zero ['a, T] Option<&'a T>, zero ['a, T] Option<&'a mut T>,
    zero [T] Option<core::ptr::NonNull<T>>,
);

/// Function pointers are pointers: INTEGER class.
macro_rules! int_class_fn_ptrs {
    ($($A:ident)*) => {
        int_class_wide!(
            never [R, $($A),*] extern "C" fn($($A),*) -> R,
            never [R, $($A),*] unsafe extern "C" fn($($A),*) -> R,
            never [R, $($A),*] fn($($A),*) -> R,
            never [R, $($A),*] unsafe fn($($A),*) -> R,
            zero [R, $($A),*] Option<extern "C" fn($($A),*) -> R>,
            zero [R, $($A),*] Option<unsafe extern "C" fn($($A),*) -> R>,
            zero [R, $($A),*] Option<fn($($A),*) -> R>,
            zero [R, $($A),*] Option<unsafe fn($($A),*) -> R>,
        );
    };
}
int_class_fn_ptrs!();
int_class_fn_ptrs!(A0);
int_class_fn_ptrs!(A0 A1);
int_class_fn_ptrs!(A0 A1 A2);
int_class_fn_ptrs!(A0 A1 A2 A3);
int_class_fn_ptrs!(A0 A1 A2 A3 A4);
int_class_fn_ptrs!(A0 A1 A2 A3 A4 A5);

macro_rules! float_class {
    ($($t:ty),*) => {$(
        // SAFETY: SSE class, passed in the low lane of the next xmm register; the upper lanes
        // are undefined under System V.
        unsafe impl Arg for $t {
            const CLASS: Class = Class::Float;
            #[inline(always)]
            fn __place(self, regs: &mut Regs, cursor: &mut Cursor) {
                put_xmm(regs, cursor, low_bytes(self));
            }
        }
        // SAFETY: SSE class results come back in the low lane of xmm0.
        unsafe impl RetVal for $t {
            const CLASS: Class = Class::Float;
            #[inline(always)]
            unsafe fn __from_ret(ret: Ret) -> Self {
                // SAFETY: every bit pattern is a valid float.
                unsafe { read_low(ret.xmm0) }
            }
            fn __zero() -> Self {
                // Unreachable: a patched `xor eax, eax` would not zero xmm0, so float keys are
                // not `ZeroableResult`.
                std::process::abort()
            }
        }
    )*};
}
float_class!(f32, f64);

// SAFETY: nothing is returned; the registers are ignored.
unsafe impl RetVal for () {
    const CLASS: Class = Class::Void;
    #[inline(always)]
    unsafe fn __from_ret(_: Ret) -> Self {}
    fn __zero() -> Self {}
}

/// Checks, at compile time, that a signature's arguments fit in registers. Called from a
/// `const` item so that a bad signature fails where the key is defined.
#[doc(hidden)]
pub const fn check_signature(args: &[Class]) {
    let mut ints = 0;
    let mut floats = 0;
    let mut i = 0;
    while i < args.len() {
        match args[i] {
            Class::Int => ints += 1,
            Class::Float => floats += 1,
            Class::Void => {}
        }
        i += 1;
    }
    if ints > INT_REGS {
        panic!(
            "static call signature not supported: more than 6 integer-class arguments (a 7th would go on the stack)"
        );
    }
    if floats > FLOAT_REGS {
        panic!(
            "static call signature not supported: more than 8 f32/f64 arguments (a 9th would go on the stack)"
        );
    }
}

/// The body of every shim: place the arguments, run the site, read the result. (`$target` is
/// for the fallback, below.)
#[cfg(static_call_patching)]
#[doc(hidden)]
#[macro_export]
macro_rules! __shim_body {
    ($site:ty, $ret:ty, $target:expr; $($a:ident),*) => {{
        #[allow(unused_mut)]
        let mut regs = $crate::__private::Regs::UNINIT;
        #[allow(unused_mut, unused_variables)]
        let mut cursor = $crate::__private::Cursor::default();
        $( $crate::__private::Arg::__place($a, &mut regs, &mut cursor); )*
        // SAFETY: the arguments were placed by their `Arg` impls, which follow System V, and the
        // key's type (checked by the compiler against these argument types) is the target's.
        let ret = unsafe { <$site as $crate::__private::Site>::invoke(regs) };
        // SAFETY: `ret` comes from a call to a function whose result type is `$ret`.
        unsafe { <$ret as $crate::__private::RetVal>::__from_ret(ret) }
    }};
}

/// The portable fallback's shim body: call `$target`, the key's current target loaded now, so
/// that a `static_call!(KEY)` kept as a function pointer follows `update` as a patched site does.
#[cfg(not(static_call_patching))]
#[doc(hidden)]
#[macro_export]
macro_rules! __shim_body {
    ($site:ty, $ret:ty, $target:expr; $($a:ident),*) => {{
        let target = $target;
        #[allow(unused_unsafe)]
        // SAFETY: calling the key's target is what the shim's caller asked for; for an `unsafe`
        // key, the caller's `unsafe` block vouches for it.
        unsafe {
            target($($a),*)
        }
    }};
}

/// A number that names one `static_call!` in the source, from its file, line and column.
///
/// Written into the site's asm as a comment: it costs no byte of machine code, but two sites of
/// the same key are then different inline asm to LLVM, which therefore never merges their shims
/// into one function. (Merging would be harmless, since both bind the same key, but then taking
/// `static_call!(KEY)` as a function pointer in two places would give one site, not two.)
#[doc(hidden)]
pub trait SiteId {
    const ID: u64;
}

/// FNV-1a of the file name, mixed with the line and column.
#[doc(hidden)]
pub const fn site_id(file: &str, line: u32, column: u32) -> u64 {
    let bytes = file.as_bytes();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    (h ^ ((line as u64) << 32 | column as u64)).wrapping_mul(0x0100_0000_01b3)
}

/// The call-site asm block. `$base` is a static and `$off` the constant offset of the key inside
/// it (0 for a key that is the static itself); `$id` is the site's `SiteId`.
#[cfg(static_call_patching)]
#[doc(hidden)]
#[macro_export]
macro_rules! __site_asm {
    ($base:path, $off:expr, $id:expr, $regs:expr) => {{
        let regs: $crate::__private::Regs = $regs;
        let rax;
        let rdx;
        let xmm0;
        // SAFETY: the block loads the key's address into r11 and calls the trampoline, which
        // preserves every argument register and tail-calls the key's current target; after
        // patching the call goes to that target directly. Either way the callee is an
        // `extern "C"` function of the key's signature, and `clobber_abi("C")` tells the compiler
        // everything such a call may clobber. The stack is aligned for a call because the block
        // does not claim `nostack` and clobbers r15 (see below).
        unsafe {
            ::core::arch::asm!(
                "/* static_call site {id} */",
                "lea r11, [rip + {key} + {off}]",
                ".p2align 3,,4",
                "call {trampoline}",
                key = sym $base,
                off = const $off,
                id = const $id,
                trampoline = sym $crate::__private::trampoline,
                in("rdi") regs.gp[0], in("rsi") regs.gp[1], in("rdx") regs.gp[2],
                in("rcx") regs.gp[3], in("r8") regs.gp[4], in("r9") regs.gp[5],
                in("xmm0") regs.xmm[0], in("xmm1") regs.xmm[1], in("xmm2") regs.xmm[2],
                in("xmm3") regs.xmm[3], in("xmm4") regs.xmm[4], in("xmm5") regs.xmm[5],
                in("xmm6") regs.xmm[6], in("xmm7") regs.xmm[7],
                lateout("rax") rax, lateout("rdx") rdx, lateout("xmm0") xmm0,
                // Not used: declaring a callee-saved register clobbered makes LLVM place the
                // function's prologue, and with it the 16-byte stack alignment a `call` needs,
                // before this block. Without it, LLVM's shrink-wrapping can leave the prologue
                // on another path (e.g. a `match` whose other arm panics) and the `call` runs
                // with rsp misaligned by 8, which breaks the trampoline and every target.
                lateout("r15") _,
                clobber_abi("C"),
            );
        }
        $crate::__private::Ret { rax, rdx, xmm0 }
    }};
}

/// Without patching there is no asm site: calls load the key's target instead (see
/// `fallback.rs`), so `invoke` is never reached. The key's offset is still evaluated as a
/// constant, so that naming a run-time key (a local) is the same compile error everywhere.
#[cfg(not(static_call_patching))]
#[doc(hidden)]
#[macro_export]
macro_rules! __site_asm {
    ($base:path, $off:expr, $id:expr, $regs:expr) => {{
        let _ = $regs;
        let _: usize = const { $off };
        ::core::unreachable!("static_call: call sites are not compiled on this platform")
    }};
}
