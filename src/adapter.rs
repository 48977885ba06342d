//! Adapters: how a call site reaches a Rust function.
//!
//! A call site is one asm block with a fixed interface (`site.rs`): the System V argument
//! registers in, rax, rdx and xmm0 out. An `extern "C"` target takes that interface as it is. A
//! Rust-ABI target does not (its ABI is unspecified, and a panic must not unwind through the asm
//! block), so a Rust key's sites call an **adapter**: an `extern "C"` function, instantiated per
//! target, that takes the arguments as *register images*, calls the target (whose body inlines
//! into it), catches a panic, and returns the result as register images. The site turns the
//! images back into values. User types never appear in an `extern "C"` signature: only
//! `MaybeUninit<u64>` and `__m128` images do.
//!
//! # The protocol between a site and an adapter
//!
//! Both sides run the same code over the same list of types ([`Layout`], [`Cursor`]), so they
//! always agree. Each argument has a [`Class`], from its size and whether it is `f32`/`f64`:
//!
//! | class | travels in |
//! |---|---|
//! | zero-sized | nothing (moved by forgetting it at the site and conjuring it in the adapter) |
//! | `f32`, `f64` | the next xmm register (xmm0–7) |
//! | up to 8 bytes | the next general-purpose register, as its bytes |
//! | 9–16 bytes | the next two general-purpose registers |
//! | larger | a pointer, in the next register, to the value in the caller's frame |
//!
//! The general-purpose registers are rdi, rsi, rdx, rcx and r8; **r9 is reserved** for the
//! function pointer of the pointer path (below). A result larger than 16 bytes comes back through
//! an out-pointer, passed first (in rdi). If the arguments need more registers than there are,
//! the last general-purpose register instead carries a pointer to an array holding, for every
//! argument that did not fit, a pointer to it in the caller's frame. An argument that is passed
//! by pointer sits in the caller's frame in a `MaybeUninit` that the caller never drops: the
//! adapter reads it and so takes ownership, and every by-value argument is dropped exactly once
//! (by the target, or by its unwinding).
//!
//! Results of up to 16 bytes come back in rax:rdx as their bytes (`f32`/`f64` too: one
//! convention for every result keeps the adapter a single function whose address a `const` can
//! name), larger ones through the out-pointer.
//!
//! # The panic signal
//!
//! The adapter calls the target inside `catch_unwind`, which costs no instruction on the path
//! that does not panic. On a panic it keeps the payload in a thread-local and returns
//! [`SENTINEL`] in rax. The site compares rax with `SENTINEL` (one `cmp`/`je`) and, if equal,
//! calls a `#[cold]` function that takes the payload, if there is one, and resumes the unwind
//! with it. A result that happens to equal `SENTINEL` (or, for a result that is not in rax,
//! whatever rax holds) finds no payload and is returned as it is: the sentinel only decides
//! whether to look, the thread-local decides whether a panic happened.
//!
//! # Inlining
//!
//! In optimised builds every helper here is `#[inline(always)]`: the classes and the layout fold
//! to constants and a site is the few instructions that place its arguments. In builds with
//! debug assertions (unoptimised ones, normally) they are plain `#[inline]`, so that each site's
//! shim calls them instead of carrying a copy of every branch (several KiB per site at -O0).
//!
//! # Targets
//!
//! - A zero-sized target (a function item, or a closure without captures): the adapter is
//!   [`adapter`]`::<K, Zst<T>>`, whose callee is a constant function pointer to a function that
//!   conjures `T` and calls it, so that LLVM inlines the target into the adapter.
//! - A `#[target_feature]` function or an `unsafe fn`, which is not a Rust `Fn`:
//!   [`target_feature!`](crate::target_feature) (after checking the CPU) and
//!   [`unsafe_target!`](crate::unsafe_target) name it as the constant callee of an adapter.
//! - A function pointer chosen at run time: sites call `pointer_stub::<K>`, which loads the
//!   pointer from the key (every target is entered with its key's address in r11, and a Rust
//!   key holds the pointer at offset 16) into r9 and jumps to [`pointer_adapter`], which calls it.
//!   Slower: a jump and an indirect call more.

use core::mem::MaybeUninit;

use crate::site::{FLOAT_REGS, Regs, Ret};

/// What rax holds when an adapter returns after a panic. A sign-extended 32-bit immediate, so
/// that the site's comparison is one `cmp rax, imm32`: as a pointer it is in kernel space, as an
/// integer an arbitrary negative number, as the first word of an enum no discriminant.
pub const SENTINEL: u64 = 0xffff_ffff_9e37_79b9;

/// General-purpose registers that carry arguments: rdi, rsi, rdx, rcx, r8.
pub const ARG_GPRS: usize = 5;
/// Index in [`Regs::gp`] of r9, which carries the function pointer of the pointer path.
#[cfg_attr(not(static_call_patching), allow(dead_code))]
pub const CALLEE_GPR: usize = 5;

/// How one argument or result travels.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    /// Zero-sized: nothing travels.
    Zst,
    /// `f32` or `f64`: one xmm register (arguments only).
    Xmm,
    /// Up to 8 bytes: one general-purpose register.
    Gp1,
    /// 9 to 16 bytes: two general-purpose registers.
    Gp2,
    /// More: by pointer.
    Indirect,
}

/// Whether `T` is `f32` or `f64`. Decided by name because it must work for any type, lifetimes
/// included (`TypeId` needs `'static`), and it folds to a constant. Both sides of a call use this
/// same function, so even a wrong answer would only cost speed: an xmm register and a general
/// purpose one carry the same 8 bytes.
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
pub fn is_float<T>() -> bool {
    let name = core::any::type_name::<T>();
    size_of::<T>() <= 8 && (name == "f64" || name == "f32")
}

/// The class of an argument of type `T`.
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
pub fn arg_class<T>() -> Class {
    match size_of::<T>() {
        0 => Class::Zst,
        _ if is_float::<T>() => Class::Xmm,
        1..=8 => Class::Gp1,
        9..=16 => Class::Gp2,
        _ => Class::Indirect,
    }
}

/// The class of a result of type `T` (never `Xmm`: results of up to 16 bytes use rax:rdx).
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
pub const fn ret_class<T>() -> Class {
    match size_of::<T>() {
        0 => Class::Zst,
        1..=8 => Class::Gp1,
        9..=16 => Class::Gp2,
        _ => Class::Indirect,
    }
}

/// Which registers a signature's arguments may use, computed the same way on both sides from
/// the classes of its arguments and result.
#[derive(Clone, Copy)]
pub struct Layout {
    /// The first argument register (1 when rdi carries the out-pointer).
    first_gpr: usize,
    /// One past the last argument register.
    end_gpr: usize,
    /// Whether some argument does not fit, so that `end_gpr` carries the spill array.
    spills: bool,
}

impl Layout {
    /// The layout of a call with arguments of classes `args` and a result of class `ret`.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub fn new(args: &[Class], ret: Class) -> Layout {
        let first_gpr = (ret == Class::Indirect) as usize;
        let (mut gprs, mut xmms) = (first_gpr, 0);
        for class in args {
            match class {
                Class::Zst => {}
                Class::Xmm => xmms += 1,
                Class::Gp1 | Class::Indirect => gprs += 1,
                Class::Gp2 => gprs += 2,
            }
        }
        let spills = gprs > ARG_GPRS || xmms > FLOAT_REGS;
        Layout {
            first_gpr,
            end_gpr: if spills { ARG_GPRS - 1 } else { ARG_GPRS },
            spills,
        }
    }

    /// A cursor at the first argument.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub fn cursor(self) -> Cursor {
        Cursor {
            gpr: self.first_gpr,
            xmm: 0,
            arg: 0,
            layout: self,
        }
    }
}

/// The argument registers as an adapter receives them. The xmm registers are taken as `f64`
/// images (only `f32`/`f64` arguments travel there, in the low lane), which keeps every adapter
/// parameter FFI-safe.
pub struct Incoming {
    /// rdi, rsi, rdx, rcx, r8, r9.
    pub gp: [MaybeUninit<u64>; 6],
    /// xmm0–7, low 8 bytes.
    pub xmm: [MaybeUninit<f64>; FLOAT_REGS],
}

/// Where the next argument goes (site) or comes from (adapter). Both sides move it through the
/// same arguments in the same order, so each argument lands where the other side looks.
pub struct Cursor {
    gpr: usize,
    xmm: usize,
    arg: usize,
    layout: Layout,
}

/// Where one argument travels, as the cursor decided.
enum Place {
    Nothing,
    Xmm(usize),
    Gpr(usize),
    Gprs(usize),
    Pointer(usize),
    Spilled(usize),
}

impl Cursor {
    /// Decides where the next argument, of class `class`, travels, and moves past it.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn place(&mut self, class: Class) -> Place {
        let arg = self.arg;
        self.arg += 1;
        let free = self.layout.end_gpr - self.gpr;
        let (place, gprs) = match class {
            Class::Zst => (Place::Nothing, 0),
            Class::Xmm if self.xmm < FLOAT_REGS => {
                self.xmm += 1;
                (Place::Xmm(self.xmm - 1), 0)
            }
            Class::Gp1 if free >= 1 => (Place::Gpr(self.gpr), 1),
            Class::Gp2 if free >= 2 => (Place::Gprs(self.gpr), 2),
            Class::Indirect if free >= 1 => (Place::Pointer(self.gpr), 1),
            _ => (Place::Spilled(arg), 0),
        };
        self.gpr += gprs;
        place
    }

    // --- the site's side ---------------------------------------------------------------------

    /// Passes the out-pointer of a result larger than 16 bytes.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub fn put_out<R>(&self, regs: &mut Regs, out: &mut MaybeUninit<R>) {
        if self.layout.first_gpr == 1 {
            regs.gp[0] = MaybeUninit::new(out.as_mut_ptr() as u64);
        }
    }

    /// Passes the next argument. `slot` is where it lives if it goes by pointer, `spill` the
    /// array of pointers to arguments that do not fit.
    ///
    /// Ownership of `a` passes to the adapter: its bytes travel in registers, or it is written
    /// to `slot`, which the caller never drops.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub fn put<A>(
        &mut self,
        a: A,
        regs: &mut Regs,
        slot: &mut MaybeUninit<A>,
        spill: &mut [MaybeUninit<*mut u8>],
    ) {
        match self.place(arg_class::<A>()) {
            Place::Nothing => core::mem::forget(a),
            Place::Xmm(i) => regs.xmm[i] = image(a),
            Place::Gpr(i) => regs.gp[i] = image(a),
            Place::Gprs(i) => {
                let [lo, hi] = images2(a);
                regs.gp[i] = lo;
                regs.gp[i + 1] = hi;
            }
            Place::Pointer(i) => regs.gp[i] = MaybeUninit::new(slot.write(a) as *mut A as u64),
            Place::Spilled(arg) => {
                spill[arg] = MaybeUninit::new(slot.write(a) as *mut A as *mut u8)
            }
        }
    }

    /// Passes the spill array, if some argument did not fit. Call after the last `put`.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub fn put_spill(&self, regs: &mut Regs, spill: &mut [MaybeUninit<*mut u8>]) {
        if self.layout.spills {
            regs.gp[self.layout.end_gpr] = MaybeUninit::new(spill.as_mut_ptr() as u64);
        }
    }

    // --- the adapter's side ------------------------------------------------------------------

    /// Where to write a result larger than 16 bytes (null for other results).
    ///
    /// # Safety
    /// `regs` must be what a site of this layout passed.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub unsafe fn take_out<R>(&self, regs: &Incoming) -> *mut R {
        if self.layout.first_gpr == 1 {
            // SAFETY: the site put the out-pointer in rdi (`put_out`).
            unsafe { regs.gp[0].assume_init() as *mut R }
        } else {
            core::ptr::null_mut()
        }
    }

    /// The spill array (null if every argument fits in registers).
    ///
    /// # Safety
    /// `regs` must be what a site of this layout passed.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub unsafe fn take_spill(&self, regs: &Incoming) -> *const *mut u8 {
        if self.layout.spills {
            // SAFETY: the site put the array's address there (`put_spill`).
            unsafe { regs.gp[self.layout.end_gpr].assume_init() as *const *mut u8 }
        } else {
            core::ptr::null()
        }
    }

    /// Takes the next argument, of type `A`.
    ///
    /// # Safety
    /// `regs` and `spill` must be what a site passed for a signature whose next argument has
    /// type `A` (so that every earlier argument was taken with its own type), and each argument
    /// may be taken once.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub unsafe fn take<A>(&mut self, regs: &Incoming, spill: *const *mut u8) -> A {
        // SAFETY: by the caller's promise the site placed a valid, owned `A` exactly where this
        // same cursor logic says, and nothing else will read or drop it.
        unsafe {
            match self.place(arg_class::<A>()) {
                Place::Nothing => conjure(),
                Place::Xmm(i) => read_image(&regs.xmm[i]),
                Place::Gpr(i) => read_image(&regs.gp[i]),
                Place::Gprs(i) => read_images2([regs.gp[i], regs.gp[i + 1]]),
                Place::Pointer(i) => (regs.gp[i].assume_init() as *const A).read(),
                Place::Spilled(arg) => (*spill.add(arg) as *const A).read(),
            }
        }
    }
}

/// A zero-sized value out of nothing.
///
/// # Safety
/// `T` must be zero-sized, and creating a `T` must be allowed: the caller owns a `T` that it
/// forgot (a moved argument), or `T` is `Copy` and a value of it was handed over earlier (a
/// target).
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
pub unsafe fn conjure<T>() -> T {
    // (Not a `const` assertion: the cursor's `match` instantiates this for every argument type,
    // and calls it only for zero-sized ones. The test folds away.)
    assert!(size_of::<T>() == 0);
    // SAFETY: a zero-sized read from a dangling, aligned pointer reads nothing; validity is the
    // caller's promise.
    unsafe { core::ptr::NonNull::<T>::dangling().read() }
}

/// `v`'s bytes in the low bytes of a register image; the bytes above are left undefined.
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
fn image<T, R>(v: T) -> MaybeUninit<R> {
    // A run-time check (it folds away): `match`es over classes instantiate this for every type.
    assert!(size_of::<T>() <= size_of::<R>() && align_of::<T>() <= align_of::<R>());
    let mut r = MaybeUninit::<R>::uninit();
    // SAFETY: the assertion makes the write fit, aligned.
    unsafe { r.as_mut_ptr().cast::<T>().write(v) };
    r
}

/// Reads a `T` from the low bytes of a register image.
///
/// # Safety
/// The image must hold a valid `T` (written by `image`).
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
unsafe fn read_image<T, R>(r: &MaybeUninit<R>) -> T {
    assert!(size_of::<T>() <= size_of::<R>() && align_of::<T>() <= align_of::<R>());
    // SAFETY: in bounds and aligned by the assertion; validity is the caller's promise.
    unsafe { r.as_ptr().cast::<T>().read() }
}

/// `v`'s bytes (up to 16, of any alignment) in two register images.
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
fn images2<T>(v: T) -> [MaybeUninit<u64>; 2] {
    assert!(size_of::<T>() <= 16);
    let mut r = [MaybeUninit::<u64>::uninit(); 2];
    // SAFETY: 16 bytes of room; unaligned, since `T` may be 16-aligned (u128).
    unsafe { r.as_mut_ptr().cast::<T>().write_unaligned(v) };
    r
}

/// Reads a `T` from two register images.
///
/// # Safety
/// The images must hold a valid `T` (written by `images2`).
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
unsafe fn read_images2<T>(r: [MaybeUninit<u64>; 2]) -> T {
    assert!(size_of::<T>() <= 16);
    // SAFETY: in bounds; unaligned read; validity is the caller's promise.
    unsafe { r.as_ptr().cast::<T>().read_unaligned() }
}

/// What every adapter returns: a result's bytes in rax:rdx, or `SENTINEL` in rax after a
/// panic. `#[repr(C)]` with two 8-byte integer-class fields: System V returns it in rax:rdx.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Images {
    /// rax.
    pub rax: MaybeUninit<u64>,
    /// rdx.
    pub rdx: MaybeUninit<u64>,
}

impl Images {
    /// What an adapter returns after a panic.
    pub const PANICKED: Images = Images {
        rax: MaybeUninit::new(SENTINEL),
        rdx: MaybeUninit::uninit(),
    };

    /// What the zero adapter returns: zero in rax (nothing, or a zero result).
    pub const ZERO: Images = Images {
        rax: MaybeUninit::new(0),
        rdx: MaybeUninit::uninit(),
    };

    /// The images of a result `r`; one larger than 16 bytes is written to `out` instead.
    ///
    /// # Safety
    /// For a result larger than 16 bytes, `out` must be the site's out-pointer.
    #[cfg_attr(debug_assertions, inline)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    pub unsafe fn of<R>(r: R, out: *mut R) -> Images {
        match ret_class::<R>() {
            Class::Zst => {
                core::mem::forget(r);
                Images {
                    rax: MaybeUninit::uninit(),
                    rdx: MaybeUninit::uninit(),
                }
            }
            Class::Gp1 | Class::Xmm => Images {
                rax: image(r),
                rdx: MaybeUninit::uninit(),
            },
            Class::Gp2 => {
                let [rax, rdx] = images2(r);
                Images { rax, rdx }
            }
            Class::Indirect => {
                // SAFETY: the caller passes the site's out-pointer, to room for an `R`.
                unsafe { out.write(r) };
                Images {
                    rax: MaybeUninit::uninit(),
                    rdx: MaybeUninit::uninit(),
                }
            }
        }
    }
}

/// The result of a site's call: resumes a panic if the adapter signalled one, else reads the
/// result from rax:rdx (or from `out`, for one larger than 16 bytes).
///
/// # Safety
/// `ret` must come from a site of a Rust key whose result type is `R`, and `out` be the
/// out-pointer that site passed. Patched sites of a key set to nothing (a NOP) or to return zero
/// (`xor eax, eax`) leave a valid `R` too: `()`, or an all-zero `ZeroableResult` in rax.
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
pub unsafe fn finish<R>(ret: Ret, out: MaybeUninit<R>) -> R {
    let mut images = Images {
        rax: ret.rax,
        rdx: ret.rdx,
    };
    // SAFETY: an asm output is the register's bits: always initialised.
    if unsafe { ret.rax.assume_init() } == SENTINEL {
        // Through the cold function, so that the result need not be kept in callee-saved
        // registers across the call.
        images = resume_if_panicked(images);
    }
    // SAFETY: no panic, so the adapter (or the patched NOP/`xor eax, eax`) left a valid `R`.
    unsafe {
        match ret_class::<R>() {
            Class::Zst => conjure(),
            Class::Gp1 | Class::Xmm => read_image(&images.rax),
            Class::Gp2 => read_images2([images.rax, images.rdx]),
            Class::Indirect => out.assume_init(),
        }
    }
}

/// The adapter's side of a call: `call` takes the arguments, runs the target and returns the
/// result's images; a panic in it becomes the panic signal.
#[cfg_attr(debug_assertions, inline)]
#[cfg_attr(not(debug_assertions), inline(always))]
pub fn catching(call: impl FnOnce() -> Images) -> Images {
    match std::panic::catch_unwind(core::panic::AssertUnwindSafe(call)) {
        Ok(images) => images,
        Err(payload) => {
            stash(payload);
            Images::PANICKED
        }
    }
}

std::thread_local! {
    /// The payload of a panic caught by an adapter on this thread, until its site resumes it.
    static PANIC: core::cell::Cell<Option<Box<dyn core::any::Any + Send>>> =
        const { core::cell::Cell::new(None) };
}

/// Keeps a caught panic's payload for the site.
#[cold]
#[inline(never)]
fn stash(payload: Box<dyn core::any::Any + Send>) {
    if PANIC.try_with(|p| p.set(Some(payload))).is_err() {
        // The thread is tearing down its thread-locals: the panic cannot be carried back.
        eprintln!("static_call: a target panicked while its thread was exiting; aborting");
        std::process::abort();
    }
}

/// Called by a site that saw `SENTINEL`: resumes the panic its adapter caught, if any, and
/// otherwise returns the result's images as they were (a result that happened to look like the
/// sentinel).
#[cold]
#[inline(never)]
pub fn resume_if_panicked(images: Images) -> Images {
    if let Some(payload) = PANIC.try_with(|p| p.take()).ok().flatten() {
        std::panic::resume_unwind(payload);
    }
    images
}

/// The conventions of one Rust signature: implemented for each Rust key type (by the generic
/// impls in `rust_key.rs` for `StaticCall<fn(..), RustAbi>`, by `define_static_call!` for its
/// key types), by the same macro, `__rust_signature!`.
///
/// # Safety
/// `__adapt` must take the arguments as a site of this signature passes them (`Cursor`), call
/// `f` with them and return its result with `run`; `Fn` and `Callee` must be the key's
/// function-pointer type and the same signature as an `unsafe fn` of the same ABI.
pub unsafe trait RustSig: Sync + 'static {
    /// The key's function-pointer type (`fn(..) -> R`, `unsafe fn`, `extern "C-unwind" fn`...).
    type Fn: Copy;
    /// The same signature as an `unsafe` function pointer: what an adapter calls.
    type Callee: Copy;
    /// The key's function that does nothing or returns zero (for a key that has no target).
    const ZERO: Self::Fn;
    /// Takes the arguments from `regs`, calls `f`, and returns the result's images.
    ///
    /// # Safety
    /// `regs` must be what a site of this signature passed.
    unsafe fn __adapt(regs: &Incoming, f: Self::Callee) -> Images;
    /// Like `__adapt`, calling `C::CALLEE`: a constant, named inside the call (not captured),
    /// so that the call is direct however much of `catch_unwind` LLVM inlines.
    ///
    /// # Safety
    /// As for `__adapt`.
    unsafe fn __adapt_const<C: ConstCallee<Self>>(regs: &Incoming) -> Images
    where
        Self: Sized;
    /// `__adapt_const` without catching a panic: take the arguments, call, pack the result.
    ///
    /// # Safety
    /// As for `__adapt`.
    unsafe fn __adapt_body<C: ConstCallee<Self>>(regs: &Incoming) -> Images
    where
        Self: Sized;
    /// The key itself.
    fn __key(&self) -> &crate::StaticCall<Self::Fn, crate::RustAbi>;
    /// A function of the key's type whose body is the call site `S`.
    fn __shim<S: crate::site::Site>() -> Self::Fn;
}

/// A target known at compile time: the function an adapter calls, as a constant, so that it
/// inlines.
pub trait ConstCallee<K: RustSig> {
    /// The function.
    const CALLEE: K::Callee;
}

/// The zero-sized target `T`, as a [`ConstCallee`] (`__rust_signature!` implements it).
pub struct Zst<T>(core::marker::PhantomData<T>);

/// Declares an adapter: an `extern "C"` function taking every argument register and returning
/// [`Images`].
macro_rules! __adapter_fn {
    ($(#[$attr:meta])* $vis:vis unsafe fn $name:ident $(<$($g:ident: $b:path),*>)?
        ($regs:ident) $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis unsafe extern "C" fn $name $(<$($g: $b),*>)? (
            g0: ::core::mem::MaybeUninit<u64>, g1: ::core::mem::MaybeUninit<u64>,
            g2: ::core::mem::MaybeUninit<u64>, g3: ::core::mem::MaybeUninit<u64>,
            g4: ::core::mem::MaybeUninit<u64>, g5: ::core::mem::MaybeUninit<u64>,
            x0: ::core::mem::MaybeUninit<f64>, x1: ::core::mem::MaybeUninit<f64>,
            x2: ::core::mem::MaybeUninit<f64>, x3: ::core::mem::MaybeUninit<f64>,
            x4: ::core::mem::MaybeUninit<f64>, x5: ::core::mem::MaybeUninit<f64>,
            x6: ::core::mem::MaybeUninit<f64>, x7: ::core::mem::MaybeUninit<f64>,
        ) -> $crate::__private::Images {
            let $regs = $crate::__private::Incoming {
                gp: [g0, g1, g2, g3, g4, g5],
                xmm: [x0, x1, x2, x3, x4, x5, x6, x7],
            };
            $body
        }
    };
}

__adapter_fn! {
    /// The adapter of the target `C` of a key with conventions `K`: what that key's sites call.
    /// `C::CALLEE` is a constant, so the target's body inlines here.
    ///
    /// # Safety
    /// Called only by a site of a key of signature `K` (or the trampoline, for one).
    pub unsafe fn adapter<K: RustSig, C: ConstCallee<K>>(regs) {
        // SAFETY: a site of `K` passed these registers.
        unsafe { K::__adapt_const::<C>(&regs) }
    }
}

__adapter_fn! {
    /// The pointer path's adapter: calls the function pointer in r9 (put there by
    /// `pointer_stub`).
    ///
    /// # Safety
    /// Called only through `pointer_stub::<K>`, by a site of a key of signature `K`.
    #[cfg_attr(not(static_call_patching), allow(dead_code))]
    pub unsafe fn pointer_adapter<K: RustSig>(regs) {
        // SAFETY: `pointer_stub` loaded r9 from the key's word, which holds a function of the
        // key's type (an `F`, the same signature as `K::Callee`).
        let f = unsafe { core::mem::transmute_copy::<u64, K::Callee>(&regs.gp[CALLEE_GPR].assume_init()) };
        // SAFETY: a site of `K` passed these registers.
        unsafe { K::__adapt(&regs, f) }
    }
}

/// The adapter of a key that has no target or returns zero: returns zero in rax (for `()`, and
/// for a zero result), touching no argument. (Such keys have no argument that needs dropping:
/// `rust_key.rs` checks that.)
pub extern "C" fn zero_adapter() -> Images {
    Images::ZERO
}

/// What a Rust key's sites call for a function-pointer target: loads the pointer from the key
/// (at offset 16, `rust_key::RUST_WORD_OFFSET`) into r9 and jumps to
/// `pointer_adapter::<K>`. Every target is entered with its key's address in r11
/// (`tests/patching.rs::targets_are_entered_with_the_key_in_r11`); r9 carries no argument of a
/// Rust key.
///
/// # Safety
/// Not callable from Rust: only as a Rust key's target, entered with that key in r11.
#[cfg(static_call_patching)]
#[unsafe(naked)]
pub unsafe extern "C" fn pointer_stub<K: RustSig>() {
    core::arch::naked_asm!(
        "mov r9, qword ptr [r11 + {word}]",
        "jmp {adapter}",
        word = const crate::rust_key::RUST_WORD_OFFSET,
        adapter = sym pointer_adapter::<K>,
    )
}

/// In the portable fallback no site calls a key's function: calls go through the Rust function
/// the key holds. The "stub" is then only a distinct address.
#[cfg(not(static_call_patching))]
pub extern "C" fn pointer_stub<K: RustSig>() {}
