//! Per-call cost of a static call against what users would write instead.
//!
//! Every bench calls a trivial target in a *dependent* chain (`x = f(x)`), so what is measured
//! is the latency of one call and return, the cost that a dispatch mechanism adds to. Run with
//! `scripts/bench.sh`, which builds with loops aligned to 64 bytes (`-C
//! llvm-args=-align-loops=64`): loop placement alone moves these ratios by up to 20% otherwise.
//!
//! Groups:
//! - `call/*`: one call site, `CHAIN` calls per iteration, through a direct call, a patched
//!   static call, an `AtomicPtr` loaded at every call, `&dyn Trait`, an enum `match` and a
//!   retpoline thunk. (The unpatched static call is in `benches/unpatched.rs`: switching
//!   patching off is process-wide.)
//! - `null_ret0/*`: a NULL key (patched to a 5-byte NOP) and a return-zero key (patched to
//!   `xor eax, eax`) against the `Option<fn>` check they replace, and against a real call of a
//!   function that returns 0.
//!
//! - `far/*`: a target beyond ±2 GiB of the site (JIT-like code in a far anonymous page, as a
//!   function in another shared library would be): a static call through its near thunk, and
//!   an `AtomicPtr` call, against the near direct call.
//!
//! Many sites with many targets (branch-predictor pressure) are in `benches/pressure.rs`.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod common;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use crate::common::{CHAIN, assert_all_patched, inc};
    use core::hint::black_box;
    use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use criterion::{Criterion, Throughput};
    use static_call::{define_static_call, static_call};

    define_static_call!(INC: extern "C" fn(u64) -> u64 = inc);

    /// The `AtomicPtr` pattern (memchr's CPU-feature dispatch): a static holding the function,
    /// loaded at every call. Stored at run time: LLVM folds a static that is never stored to
    /// into a constant, which would make this a direct call.
    static FPTR: AtomicUsize = AtomicUsize::new(0);

    #[inline(always)]
    pub(crate) fn load_fn(p: &AtomicUsize) -> extern "C" fn(u64) -> u64 {
        // SAFETY: only ever stores `extern "C" fn(u64) -> u64` values (see `setup`).
        unsafe {
            core::mem::transmute::<usize, extern "C" fn(u64) -> u64>(p.load(Ordering::Relaxed))
        }
    }

    pub trait Op {
        fn call(&self, x: u64) -> u64;
    }
    struct IncOp;
    impl Op for IncOp {
        fn call(&self, x: u64) -> u64 {
            x.wrapping_add(1)
        }
    }

    // `Dec` and `Double` are only ever made by `kind()`'s transmute: they are there so that the
    // `match` has four arms, as a real one would.
    #[allow(dead_code)]
    #[derive(Clone, Copy)]
    #[repr(u8)]
    enum Kind {
        Inc = 0,
        Dec = 1,
        Double = 2,
        Half = 3,
    }
    #[inline(never)]
    extern "C" fn double(x: u64) -> u64 {
        x.wrapping_mul(2)
    }
    #[inline(never)]
    extern "C" fn half(x: u64) -> u64 {
        x / 2
    }
    /// The enum's discriminant, read at every call as a `match self.kind` would be: a relaxed
    /// load that LLVM may not hoist out of the loop, so the `match` is not unswitched away.
    static KIND: AtomicU8 = AtomicU8::new(Kind::Half as u8);

    #[inline(always)]
    fn kind() -> Kind {
        // SAFETY: KIND only ever holds discriminants of `Kind`.
        unsafe { core::mem::transmute::<u8, Kind>(KIND.load(Ordering::Relaxed)) }
    }

    // A retpoline thunk (the kernel's `__x86_indirect_thunk_r11`): the indirect branch becomes
    // a `call` to a return whose prediction is trapped in a `pause; lfence` loop.
    core::arch::global_asm!(
        ".pushsection .text.static_call_bench_retpoline_r11,\"ax\",@progbits",
        ".globl static_call_bench_retpoline_r11",
        ".hidden static_call_bench_retpoline_r11",
        ".p2align 5",
        "static_call_bench_retpoline_r11:",
        "    call 3f",
        "2:  pause",
        "    lfence",
        "    jmp 2b",
        "3:  mov qword ptr [rsp], r11",
        "    ret",
        ".popsection",
    );
    unsafe extern "C" {
        fn static_call_bench_retpoline_r11();
    }

    /// `f(x)` compiled as a retpoline build compiles an indirect call: the target in r11 and a
    /// `call` to the thunk.
    #[inline(always)]
    fn retpoline_call(f: extern "C" fn(u64) -> u64, x: u64) -> u64 {
        let r: u64;
        // SAFETY: the thunk jumps to `f` with the caller's registers and stack, as a `call f`
        // would; `f` is an `extern "C" fn(u64) -> u64`, which `clobber_abi("C")` describes.
        unsafe {
            core::arch::asm!(
                "call {thunk}",
                thunk = sym static_call_bench_retpoline_r11,
                in("r11") f as usize,
                inlateout("rdi") x => _,
                lateout("rax") r,
                clobber_abi("C"),
            );
        }
        r
    }

    #[inline(never)]
    fn run_direct(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = inc(x);
        }
        x
    }

    #[inline(never)]
    fn run_static(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = static_call!(INC)(x);
        }
        x
    }

    #[inline(never)]
    fn run_atomic(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = load_fn(&FPTR)(x);
        }
        x
    }

    #[inline(never)]
    fn run_dyn(n: u64, mut x: u64, op: &dyn Op) -> u64 {
        for _ in 0..n {
            x = op.call(x);
        }
        x
    }

    #[inline(never)]
    fn run_enum(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = match kind() {
                Kind::Inc => inc(x),
                Kind::Dec => crate::common::dec(x),
                Kind::Double => double(x),
                Kind::Half => half(x),
            };
        }
        x
    }

    #[inline(never)]
    fn run_retpoline(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = retpoline_call(load_fn(&FPTR), x);
        }
        x
    }

    // ---- a far target: through a near thunk ---------------------------------------------

    define_static_call!(FAR: extern "C" fn(u64) -> u64 = inc);
    static FAR_FPTR: AtomicUsize = AtomicUsize::new(0);

    /// Maps `lea rax, [rdi + 1]; ret` (what `inc` does) in a fresh anonymous page, which the
    /// kernel places among the shared libraries, beyond ±2 GiB of a PIE program's code.
    fn far_inc() -> extern "C" fn(u64) -> u64 {
        // SAFETY: a fresh anonymous page, filled, then made read-execute; the code is a
        // complete `extern "C" fn(u64) -> u64`.
        unsafe {
            let p = libc::mmap(
                core::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let code = [0x48u8, 0x8d, 0x47, 0x01, 0xc3];
            core::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
            assert_eq!(
                libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC),
                0
            );
            core::mem::transmute::<*mut libc::c_void, extern "C" fn(u64) -> u64>(p)
        }
    }

    #[inline(never)]
    fn run_static_far(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = static_call!(FAR)(x);
        }
        x
    }

    #[inline(never)]
    fn run_atomic_far(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = load_fn(&FAR_FPTR)(x);
        }
        x
    }

    /// Points `FAR` at far code and checks that its site calls a thunk (not the target, which
    /// no rel32 reaches, and not the trampoline).
    fn setup_far() {
        let f = far_inc();
        FAR_FPTR.store(f as usize, Ordering::Relaxed);
        FAR.update(f);
        assert_eq!(run_static_far(3, 0), 3);
        static_call::flush();
        let sites = FAR.sites();
        assert_all_patched("FAR", &sites);
        let called = crate::common::call_target(sites[0].address).expect("a call");
        let far = (f as usize).abs_diff(sites[0].address) > (2usize << 30);
        assert_eq!(
            called != f as usize,
            far,
            "a far target is called through a thunk"
        );
        if !far {
            eprintln!("note: the far code landed within 2 GiB; far/static_thunk is a direct call");
        }
        assert_eq!(run_atomic_far(3, 0), 3);
    }

    // ---- NULL and return-zero keys against an `Option<fn>` check ------------------------

    define_static_call!(HOOK: extern "C" fn(u64) = None);
    define_static_call!(COUNT: extern "C" fn(u64) -> u64 = ReturnZero);
    /// `Option<extern "C" fn(u64)>`, stored at run time (0 = `None`).
    static OPT_HOOK: AtomicUsize = AtomicUsize::new(0);
    static OPT_COUNT: AtomicUsize = AtomicUsize::new(0);

    /// A function that returns 0. The zero comes out of an asm block: a plain `0` would be
    /// propagated into the caller (LLVM's IPSCCP), and a `pure` one would let LLVM hoist the
    /// call out of the loop: the block is volatile, so every call stays.
    #[inline(never)]
    extern "C" fn zero(_: u64) -> u64 {
        let r: u64;
        // SAFETY: clears a register; touches nothing else.
        unsafe { core::arch::asm!("xor {0:e}, {0:e}", out(reg) r, options(nostack)) };
        r
    }

    #[inline(always)]
    fn load_opt_hook() -> Option<extern "C" fn(u64)> {
        // SAFETY: holds 0 or an `extern "C" fn(u64)`; `Option<fn>` has the null niche.
        unsafe {
            core::mem::transmute::<usize, Option<extern "C" fn(u64)>>(
                OPT_HOOK.load(Ordering::Relaxed),
            )
        }
    }

    /// A hook that is usually absent: `if let Some(f) = HOOK { f(i) }`.
    #[inline(never)]
    fn run_option_none(n: u64) {
        for i in 0..n {
            if let Some(f) = load_opt_hook() {
                f(i);
            }
        }
    }

    #[inline(never)]
    fn run_static_null(n: u64) {
        for i in 0..n {
            static_call!(HOOK)(i);
        }
    }

    /// A counter that is usually absent: `HOOK.map_or(0, |f| f(x))`, in a dependent chain.
    #[inline(never)]
    fn run_option_ret0(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            let f = load_fn_opt(&OPT_COUNT);
            x = x.wrapping_add(f.map_or(0, |f| f(x))) ^ 1;
        }
        x
    }

    #[inline(always)]
    fn load_fn_opt(p: &AtomicUsize) -> Option<extern "C" fn(u64) -> u64> {
        // SAFETY: holds 0 or an `extern "C" fn(u64) -> u64`.
        unsafe {
            core::mem::transmute::<usize, Option<extern "C" fn(u64) -> u64>>(
                p.load(Ordering::Relaxed),
            )
        }
    }

    #[inline(never)]
    fn run_static_ret0(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = x.wrapping_add(static_call!(COUNT)(x)) ^ 1;
        }
        x
    }

    /// What a return-zero key replaces: a call to a function that returns 0.
    #[inline(never)]
    fn run_direct_ret0(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = x.wrapping_add(zero(x)) ^ 1;
        }
        x
    }

    fn setup() {
        FPTR.store(inc as *const () as usize, Ordering::Relaxed);
        // `None`, but stored at run time: LLVM folds a static that is never stored to.
        OPT_HOOK.store(black_box(0), Ordering::Relaxed);
        OPT_COUNT.store(black_box(0), Ordering::Relaxed);
        // Run every static-call site once, let the worker patch them, and check.
        assert_eq!(run_static(3, 0), 3);
        assert_eq!(run_enum(4, 17), 1);
        run_static_null(3);
        assert_eq!(run_static_ret0(3, 0), 1);
        static_call::flush();
        assert_all_patched("INC", &INC.sites());
        assert_all_patched("HOOK", &HOOK.sites());
        assert_all_patched("COUNT", &COUNT.sites());
        assert_eq!(run_option_ret0(3, 0), 1);
        assert_eq!(run_direct_ret0(3, 0), 1);
        assert_eq!(run_retpoline(5, 1), 6);
        setup_far();
    }

    pub fn benches(c: &mut Criterion) {
        setup();

        let mut g = c.benchmark_group("call");
        g.throughput(Throughput::Elements(CHAIN));
        g.bench_function("direct", |b| {
            b.iter(|| run_direct(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("static_patched", |b| {
            b.iter(|| run_static(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("atomic_ptr", |b| {
            b.iter(|| run_atomic(black_box(CHAIN), black_box(0)))
        });
        let op: &dyn Op = &IncOp;
        g.bench_function("dyn_trait", |b| {
            b.iter(|| run_dyn(black_box(CHAIN), black_box(0), black_box(op)))
        });
        KIND.store(Kind::Inc as u8, Ordering::Relaxed);
        g.bench_function("enum_match", |b| {
            b.iter(|| run_enum(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("retpoline", |b| {
            b.iter(|| run_retpoline(black_box(CHAIN), black_box(0)))
        });
        g.finish();

        let mut g = c.benchmark_group("far");
        g.throughput(Throughput::Elements(CHAIN));
        g.bench_function("direct_near", |b| {
            b.iter(|| run_direct(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("static_thunk", |b| {
            b.iter(|| run_static_far(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("atomic_ptr_far", |b| {
            b.iter(|| run_atomic_far(black_box(CHAIN), black_box(0)))
        });
        g.finish();

        let mut g = c.benchmark_group("null_ret0");
        g.throughput(Throughput::Elements(CHAIN));
        g.bench_function("option_none", |b| {
            b.iter(|| run_option_none(black_box(CHAIN)))
        });
        g.bench_function("static_null", |b| {
            b.iter(|| run_static_null(black_box(CHAIN)))
        });
        g.bench_function("option_none_ret0", |b| {
            b.iter(|| run_option_ret0(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("static_ret0", |b| {
            b.iter(|| run_static_ret0(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("direct_ret0", |b| {
            b.iter(|| run_direct_ret0(black_box(CHAIN), black_box(0)))
        });
        g.finish();
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
criterion::criterion_group! {
    name = calls;
    config = common::criterion_config();
    targets = imp::benches
}
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
criterion::criterion_main!(calls);

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    eprintln!("static-call benches measure x86-64 Linux only");
}
