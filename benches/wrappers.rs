//! Thin wrappers: `pub fn find(..) { dispatched(..) }`, the most common shape of a dispatched
//! call (memchr's `memchr()`, crc32fast's `hash()`). Each wrapper is `#[inline(never)]` and is
//! called in a dependent chain (`x = w(x)`), `CHAIN` calls per iteration, so what is measured
//! is a call of the wrapper plus whatever its body costs.
//!
//! Group `wrapper/*`:
//! - `direct`: `fn w(x) { inc(x) }`, which compiles to `jmp inc`: the baseline;
//! - `static_natural`: `fn w(x) { static_call!(K)(x) }`, a patched site inside the wrapper,
//!   which cannot tail-call (an asm block cannot end its function): `call` + `ret`, and a push
//!   and pop to align the stack;
//! - `static_call_fn`: `static_call_fn!(fn w(x: u64) -> u64 = K)`, patched to `jmp inc`;
//! - `static_rust_natural`: `fn w(x) { static_call!(R)(x) }` over a Rust key (`fn(u64) -> u64`,
//!   target `inc_rust`): `static_call_fn!` takes `extern "C"` keys only (a naked function with
//!   the Rust ABI is not stable), so this is what a Rust key's wrapper costs;
//! - `atomic_ptr`: `fn w(x) { PTR.load()(x) }`: `mov rax, [PTR]; jmp rax`;
//! - `dyn_trait`: `fn w(op: &dyn Op, x) { op.call(x) }`.
//!
//! `scripts/bench.sh` runs it in a normal and in a retpoline build (`-C
//! target-feature=+retpoline-indirect-calls,+retpoline-indirect-branches`), where the
//! `AtomicPtr` and `dyn` wrappers' indirect jumps become retpolines and the static ones stay
//! direct.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod common;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use crate::common::{CHAIN, addr, assert_all_patched, inc, read_code};
    use core::hint::black_box;
    use core::sync::atomic::{AtomicUsize, Ordering};
    use criterion::{Criterion, Throughput};
    use iced_x86::{Code, Decoder, DecoderOptions};
    use static_call::{define_static_call, static_call, static_call_fn};

    define_static_call!(NATURAL: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(TAIL: extern "C" fn(u64) -> u64 = inc);

    /// The Rust-key target: `inc`'s body as a Rust function.
    #[inline(never)]
    fn inc_rust(x: u64) -> u64 {
        x.wrapping_add(1)
    }
    define_static_call!(RUST: fn(u64) -> u64 = inc_rust);

    /// The `AtomicPtr` pattern, stored at run time (a static never stored to is folded into a
    /// constant, which would make the wrapper a direct jump).
    static FPTR: AtomicUsize = AtomicUsize::new(0);

    pub trait Op {
        fn call(&self, x: u64) -> u64;
    }
    struct IncOp;
    impl Op for IncOp {
        #[inline(never)]
        fn call(&self, x: u64) -> u64 {
            x.wrapping_add(1)
        }
    }

    #[inline(never)]
    extern "C" fn w_direct(x: u64) -> u64 {
        inc(x)
    }

    #[inline(never)]
    extern "C" fn w_natural(x: u64) -> u64 {
        static_call!(NATURAL)(x)
    }

    static_call_fn!(fn w_tail(x: u64) -> u64 = TAIL);

    #[inline(never)]
    fn w_rust(x: u64) -> u64 {
        static_call!(RUST)(x)
    }

    #[inline(never)]
    extern "C" fn w_atomic(x: u64) -> u64 {
        // SAFETY: FPTR only ever holds an `extern "C" fn(u64) -> u64` (see `setup`).
        let f = unsafe {
            core::mem::transmute::<usize, extern "C" fn(u64) -> u64>(FPTR.load(Ordering::Relaxed))
        };
        f(x)
    }

    #[inline(never)]
    fn w_dyn(op: &dyn Op, x: u64) -> u64 {
        op.call(x)
    }

    /// The chain through one wrapper, given as a function pointer so that one loop serves all
    /// (the loop's own call is the same direct call for every wrapper).
    macro_rules! chain {
        ($name:ident, $w:expr) => {
            #[inline(never)]
            fn $name(n: u64, mut x: u64) -> u64 {
                for _ in 0..n {
                    x = $w(x);
                }
                x
            }
        };
    }
    chain!(run_direct, w_direct);
    chain!(run_natural, w_natural);
    chain!(run_tail, w_tail);
    chain!(run_rust, w_rust);
    chain!(run_atomic, w_atomic);

    #[inline(never)]
    fn run_dyn(n: u64, mut x: u64, op: &dyn Op) -> u64 {
        for _ in 0..n {
            x = w_dyn(op, x);
        }
        x
    }

    /// The first instruction of `f`, decoded.
    fn first_insn(f: usize) -> iced_x86::Instruction {
        let bytes = read_code(f, 16);
        Decoder::with_ip(64, &bytes, f as u64, DecoderOptions::NONE).decode()
    }

    fn setup() {
        FPTR.store(black_box(inc as *const () as usize), Ordering::Relaxed);
        assert_eq!(run_natural(3, 0), 3);
        assert_eq!(run_tail(3, 0), 3);
        assert_eq!(run_rust(3, 0), 3);
        assert_eq!(run_direct(3, 0), 3);
        assert_eq!(run_atomic(3, 0), 3);
        assert_eq!(run_dyn(3, 0, &IncOp), 3);
        static_call::flush();
        assert_all_patched("NATURAL", &NATURAL.sites());
        assert_all_patched("TAIL", &TAIL.sites());
        assert_all_patched("RUST", &RUST.sites());
        // What each wrapper is, so that a reader of the numbers knows what was measured.
        let jmp = |f: usize| {
            let i = first_insn(f);
            (i.code() == Code::Jmp_rel32_64).then(|| i.near_branch64() as usize)
        };
        eprintln!(
            "direct wrapper starts with a jmp to inc: {}",
            jmp(addr(w_direct as extern "C" fn(u64) -> u64)).is_some()
        );
        let tail_site = TAIL.sites()[0].address;
        let tail_jmp = Decoder::with_ip(
            64,
            &read_code(tail_site, 5),
            tail_site as u64,
            DecoderOptions::NONE,
        )
        .decode();
        assert_eq!(
            (tail_jmp.code(), tail_jmp.near_branch64() as usize),
            (Code::Jmp_rel32_64, TAIL.query() as usize),
            "static_call_fn! patched into jmp inc"
        );
    }

    pub fn benches(c: &mut Criterion) {
        setup();
        let mut g = c.benchmark_group("wrapper");
        g.throughput(Throughput::Elements(CHAIN));
        g.bench_function("direct", |b| {
            b.iter(|| run_direct(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("static_natural", |b| {
            b.iter(|| run_natural(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("static_call_fn", |b| {
            b.iter(|| run_tail(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("static_rust_natural", |b| {
            b.iter(|| run_rust(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("atomic_ptr", |b| {
            b.iter(|| run_atomic(black_box(CHAIN), black_box(0)))
        });
        let op: &dyn Op = &IncOp;
        g.bench_function("dyn_trait", |b| {
            b.iter(|| run_dyn(black_box(CHAIN), black_box(0), black_box(op)))
        });
        g.finish();
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
criterion::criterion_group! {
    name = wrappers;
    config = common::criterion_config();
    targets = imp::benches
}
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
criterion::criterion_main!(wrappers);

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    eprintln!("static-call benches measure x86-64 Linux only");
}
