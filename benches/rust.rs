//! Per-call cost of static calls with Rust signatures (Rust keys, reached through adapters),
//! against the direct call and the `AtomicPtr` dispatch they replace.
//!
//! Groups (each bench is a dependent chain of `CHAIN` calls; build with `scripts/bench.sh`, which
//! aligns loops to 64 bytes):
//! - `rust/*`: `fn(u64) -> u64` (the target inlines into its adapter), by-value `[u64; 8]` (an
//!   argument passed by pointer) and `fn(f64) -> f64` (an xmm argument, a result in rax), each
//!   against a direct call of a non-inlined function doing the same work; and the slower paths:
//!   `AtomicPtr<fn>` and a key given a function *pointer* (`update_pointer`).
//! - `rust_memchr/*_N`: memchr's own signature, `fn(u8, &[u8]) -> Option<usize>`, on haystacks
//!   of N = 16, 32, 64 and 4096 bytes whose only match is the last byte: `memchr::memchr` called
//!   directly (through a non-inlined function, as the adapter is one), through a static call,
//!   through an `AtomicPtr<fn>` holding it; and static calls straight to the CPU's best searcher
//!   of `memchr::arch` (AVX2 where the CPU has it, else SSE2), which skip memchr's own run-time
//!   dispatch: `static_arch` through the adapter `target_feature!` writes (compiled with AVX2),
//!   `static_arch_plain` through a plain adapter that calls the searcher (`unsafe_target!`). The
//!   searcher is too big to inline and may panic, which is the case where a plain adapter wins
//!   (see `target_feature!`).
//!
//! "Direct" is a call of a function that is not inlined: what an adapter is. A static call cannot
//! be cheaper than that, and should cost no more.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod common;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use crate::common::{CHAIN, assert_all_patched};
    use core::hint::black_box;
    use core::sync::atomic::{AtomicPtr, Ordering};
    use criterion::{Criterion, Throughput};
    use static_call::{define_static_call, static_call, target_feature, unsafe_target};

    // ---- fn(u64) -> u64, [u64; 8] by value, f64 -------------------------------------------

    fn inc(x: u64) -> u64 {
        x.wrapping_add(1)
    }
    fn sum8(a: [u64; 8]) -> u64 {
        a.iter().fold(0u64, |s, &v| s.wrapping_add(v))
    }
    fn halve(x: f64) -> f64 {
        x * 0.5 + 1.0
    }

    /// The direct calls: each a function that is not inlined and contains the target, as an
    /// adapter does.
    #[inline(never)]
    fn direct_inc(x: u64) -> u64 {
        inc(x)
    }
    #[inline(never)]
    fn direct_sum8(a: [u64; 8]) -> u64 {
        sum8(a)
    }
    #[inline(never)]
    fn direct_halve(x: f64) -> f64 {
        halve(x)
    }

    define_static_call!(INC: fn(u64) -> u64 = inc);
    define_static_call!(INC_PTR: fn(u64) -> u64 = inc);
    define_static_call!(SUM8: fn([u64; 8]) -> u64 = sum8);
    define_static_call!(HALVE: fn(f64) -> f64 = halve);

    /// `AtomicPtr<fn>` dispatch, stored at run time (through `black_box`: LLVM turns a static
    /// that only ever holds one function into a direct call).
    static INC_FPTR: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

    #[inline(always)]
    fn load_inc() -> fn(u64) -> u64 {
        // SAFETY: INC_FPTR only ever holds a `fn(u64) -> u64` (see `setup`).
        unsafe { core::mem::transmute::<*mut (), fn(u64) -> u64>(INC_FPTR.load(Ordering::Relaxed)) }
    }

    macro_rules! chain {
        ($name:ident, $x:ident: $t:ty => $next:expr) => {
            #[inline(never)]
            fn $name(n: u64, mut $x: $t) -> $t {
                for _ in 0..n {
                    $x = $next;
                }
                $x
            }
        };
    }
    chain!(run_direct, x: u64 => direct_inc(x));
    chain!(run_static, x: u64 => static_call!(INC)(x));
    chain!(run_atomic, x: u64 => load_inc()(x));
    chain!(run_static_pointer, x: u64 => static_call!(INC_PTR)(x));
    chain!(run_direct_sum8, x: u64 => direct_sum8([x, 1, 2, 3, 4, 5, 6, 7]));
    chain!(run_static_sum8, x: u64 => static_call!(SUM8)([x, 1, 2, 3, 4, 5, 6, 7]));
    chain!(run_direct_halve, x: f64 => direct_halve(x));
    chain!(run_static_halve, x: f64 => static_call!(HALVE)(x));

    // ---- memchr ----------------------------------------------------------------------------

    type Find = fn(u8, &[u8]) -> Option<usize>;

    define_static_call!(FIND: fn(u8, &[u8]) -> Option<usize> = memchr::memchr);
    define_static_call!(FIND_ARCH: fn(u8, &[u8]) -> Option<usize> = memchr::memchr);
    define_static_call!(FIND_ARCH_PLAIN: fn(u8, &[u8]) -> Option<usize> = memchr::memchr);
    static FIND_FPTR: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

    #[inline(never)]
    fn direct_memchr(n: u8, hay: &[u8]) -> Option<usize> {
        memchr::memchr(n, hay)
    }

    #[inline(always)]
    fn load_find() -> Find {
        // SAFETY: FIND_FPTR only ever holds a `Find` (see `setup`).
        unsafe { core::mem::transmute::<*mut (), Find>(FIND_FPTR.load(Ordering::Relaxed)) }
    }

    /// memchr's AVX2 searcher, compiled with AVX2 so that it inlines into its adapter.
    ///
    /// # Safety
    /// The CPU must have AVX2 (`target_feature!` checks).
    #[target_feature(enable = "avx2")]
    fn find_avx2(n: u8, hay: &[u8]) -> Option<usize> {
        // SAFETY: this function only runs where AVX2 (and so SSE2) is available.
        unsafe { memchr::arch::x86_64::avx2::memchr::One::new_unchecked(n) }.find(hay)
    }

    fn find_sse2(n: u8, hay: &[u8]) -> Option<usize> {
        memchr::arch::x86_64::sse2::memchr::One::new(n)
            .expect("x86-64 has SSE2")
            .find(hay)
    }

    /// A dependent chain of searches: the next needle is `z` if the last search found it (it
    /// always does: the haystack's last byte), so each search waits for the one before.
    macro_rules! search_chain {
        ($name:ident, $f:expr) => {
            #[inline(never)]
            fn $name(n: u64, hay: &[u8]) -> usize {
                let mut needle = b'z';
                let mut acc = 0usize;
                for _ in 0..n {
                    let r = $f(needle, hay);
                    needle = b'z' + r.is_none() as u8;
                    acc = acc.wrapping_add(r.unwrap_or(0));
                }
                acc
            }
        };
    }
    search_chain!(search_direct, direct_memchr);
    search_chain!(search_static, static_call!(FIND));
    search_chain!(search_atomic, load_find());
    search_chain!(search_static_arch, static_call!(FIND_ARCH));
    search_chain!(search_static_arch_plain, static_call!(FIND_ARCH_PLAIN));

    const SIZES: [usize; 4] = [16, 32, 64, 4096];

    fn haystack(len: usize) -> Vec<u8> {
        let mut h = vec![b'a'; len];
        h[len - 1] = b'z';
        h
    }

    fn setup() -> &'static str {
        INC_FPTR.store(
            black_box(inc as fn(u64) -> u64 as *mut ()),
            Ordering::Relaxed,
        );
        FIND_FPTR.store(
            black_box(memchr::memchr as Find as *mut ()),
            Ordering::Relaxed,
        );
        INC_PTR.update_pointer(black_box(inc as fn(u64) -> u64));
        let arch = match target_feature!(FIND_ARCH, "avx2", find_avx2) {
            Some(avx2) => {
                FIND_ARCH.update_adapter(avx2);
                // SAFETY: `target_feature!` just found AVX2 on this CPU.
                FIND_ARCH_PLAIN
                    .update_adapter(unsafe { unsafe_target!(FIND_ARCH_PLAIN, find_avx2) });
                "avx2"
            }
            None => {
                FIND_ARCH.update(find_sse2);
                FIND_ARCH_PLAIN.update(find_sse2);
                "sse2"
            }
        };
        // Run every site once, let the worker patch it, and check.
        assert_eq!(run_static(3, 0), 3);
        assert_eq!(run_static_pointer(3, 0), 3);
        assert_eq!(run_static_sum8(1, 0), 28);
        assert_eq!(run_static_halve(1, 2.0), 2.0);
        let hay = haystack(16);
        for f in [
            search_direct,
            search_static,
            search_atomic,
            search_static_arch,
            search_static_arch_plain,
        ] {
            assert_eq!(f(2, &hay), 30);
        }
        static_call::flush();
        for (name, sites) in [
            ("INC", INC.sites()),
            ("INC_PTR", INC_PTR.sites()),
            ("SUM8", SUM8.sites()),
            ("HALVE", HALVE.sites()),
            ("FIND", FIND.sites()),
            ("FIND_ARCH", FIND_ARCH.sites()),
            ("FIND_ARCH_PLAIN", FIND_ARCH_PLAIN.sites()),
        ] {
            assert_all_patched(name, &sites);
        }
        arch
    }

    pub fn benches(c: &mut Criterion) {
        let arch = setup();
        eprintln!("rust_memchr/static_arch_*: memchr::arch::x86_64::{arch}");

        let mut g = c.benchmark_group("rust");
        g.throughput(Throughput::Elements(CHAIN));
        g.bench_function("direct", |b| b.iter(|| run_direct(black_box(CHAIN), 0)));
        g.bench_function("static", |b| b.iter(|| run_static(black_box(CHAIN), 0)));
        g.bench_function("atomic_ptr", |b| b.iter(|| run_atomic(black_box(CHAIN), 0)));
        g.bench_function("static_pointer", |b| {
            b.iter(|| run_static_pointer(black_box(CHAIN), 0))
        });
        g.bench_function("direct_array8", |b| {
            b.iter(|| run_direct_sum8(black_box(CHAIN), 0))
        });
        g.bench_function("static_array8", |b| {
            b.iter(|| run_static_sum8(black_box(CHAIN), 0))
        });
        g.bench_function("direct_f64", |b| {
            b.iter(|| run_direct_halve(black_box(CHAIN), 1.0))
        });
        g.bench_function("static_f64", |b| {
            b.iter(|| run_static_halve(black_box(CHAIN), 1.0))
        });
        g.finish();

        let mut g = c.benchmark_group("rust_memchr");
        g.throughput(Throughput::Elements(CHAIN));
        for len in SIZES {
            let hay = haystack(len);
            let hay = hay.as_slice();
            for (name, f) in [
                ("direct", search_direct as fn(u64, &[u8]) -> usize),
                ("static", search_static),
                ("atomic_ptr", search_atomic),
                ("static_arch", search_static_arch),
                ("static_arch_plain", search_static_arch_plain),
            ] {
                g.bench_function(format!("{name}_{len}"), |b| {
                    b.iter(|| f(black_box(CHAIN), black_box(hay)))
                });
            }
        }
        g.finish();
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
criterion::criterion_group! {
    name = rust;
    config = common::criterion_config();
    targets = imp::benches
}
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
criterion::criterion_main!(rust);

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    eprintln!("static-call benches measure x86-64 Linux only");
}
