//! Per-call cost of a static call that stays on the trampoline, against a direct call in the
//! same run.
//!
//! A separate bench binary because the only way to keep a site unpatched for good,
//! `static_call::unpatch_all()`, switches patching off for the whole process. After it, every
//! call of the site enters the trampoline, which saves the argument registers, looks the site up
//! in the registry (a hash probe: loads only), restores the registers and jumps to the target.
//! This is also the cost of every call while patching is off (`STATIC_CALL_DISABLE`, no
//! `membarrier`, MDWE) and, once, of every site's first call.
//!
//! Run with `STATIC_CALL_DISABLE=1` (as `scripts/bench.sh` also does), the bench measures that
//! case instead, as the group `disabled`: patching off from initialisation, every call through
//! the trampoline. Both groups also time a Rust key (`fn(u64) -> u64`), whose trampoline jumps to
//! its adapter.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod common;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use crate::common::{CHAIN, inc};
    use core::hint::black_box;
    use criterion::{Criterion, Throughput};
    use static_call::{Disabled, SiteState, define_static_call, static_call};

    define_static_call!(INC: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(INC_RUST: fn(u64) -> u64 = |x| x.wrapping_add(1));

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
    fn run_static_rust(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = static_call!(INC_RUST)(x);
        }
        x
    }

    pub fn benches(c: &mut Criterion) {
        static_call::init();
        let disabled = std::env::var_os("STATIC_CALL_DISABLE").is_some();
        let (group, expected) = if disabled {
            ("disabled", Disabled::EnvVar)
        } else {
            static_call::unpatch_all().expect("unpatch_all");
            ("unpatched", Disabled::Unpatched)
        };
        assert_eq!(
            static_call::status().patching,
            Err(expected),
            "patching must be off for this bench"
        );
        assert_eq!(run_static(3, 0), 3);
        assert_eq!(run_static_rust(3, 0), 3);
        static_call::flush();
        for sites in [INC.sites(), INC_RUST.sites()] {
            assert_eq!(sites.len(), 1, "one registered site: {sites:?}");
            assert!(
                matches!(sites[0].state, SiteState::Trampoline(_)),
                "the site must stay on the trampoline: {sites:?}"
            );
        }

        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(CHAIN));
        g.bench_function("direct", |b| {
            b.iter(|| run_direct(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("static_unpatched", |b| {
            b.iter(|| run_static(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("static_unpatched_rust", |b| {
            b.iter(|| run_static_rust(black_box(CHAIN), black_box(0)))
        });
        g.finish();
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
criterion::criterion_group! {
    name = unpatched;
    config = common::criterion_config();
    targets = imp::benches
}
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
criterion::criterion_main!(unpatched);

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    eprintln!("static-call benches measure x86-64 Linux only");
}
