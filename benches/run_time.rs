//! Keys chosen at run time: `key.call_guarded` (a run-time site patched to a guard stub) against
//! `key.call_indirect` (an atomic load and an indirect call: `key.call` without the cache), and
//! the usual references (a direct call, a patched static call, `&dyn Trait`, an `AtomicPtr`).
//!
//! Every bench calls trivial targets in a dependent chain, `CHAIN` calls per iteration, as in
//! `benches/calls.rs`. The keys are heap keys reached through a table (so they are values to the
//! compiler), and a site sees 1, 2, 4 or 8 of them in rotation:
//! - `rt_mono`: one key; the site calls a monomorphic stub;
//! - `rt_poly2`: two keys alternating; a 2-entry chain stub;
//! - `rt_rot4`, `rt_rot8`: four and eight keys in rotation; a 4- and an 8-entry chain in a
//!   retpoline build, megamorphic (the indirect call through the key) in a normal build, where
//!   stubs hold 2;
//! - `rt_rot16`: sixteen keys; megamorphic in every build;
//! - `indirect_*`: the same keys, the same rotation, `call_indirect`;
//! - `atomic_ptr`, `dyn_trait`: one target.
//!
//! Run with `scripts/bench.sh`, which also builds and runs these in a retpoline build
//! (`-C target-feature=+retpoline-indirect-calls,+retpoline-indirect-branches`), where every
//! indirect call goes through a retpoline thunk.

#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]
mod common;

#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]
mod imp {
    use crate::common::{CHAIN, assert_all_patched, inc};
    use core::hint::black_box;
    use core::sync::atomic::{AtomicUsize, Ordering};
    use criterion::{Criterion, Throughput};
    use static_call::{SiteState, StaticCall, define_static_call, static_call};

    type Key = StaticCall<extern "C" fn(u64) -> u64>;

    macro_rules! adders {
        ($($name:ident = $n:literal),*) => {
            $(
                /// One of the rotation's targets: the same cost as `inc`.
                #[inline(never)]
                pub extern "C" fn $name(x: u64) -> u64 {
                    x.wrapping_add($n)
                }
            )*
            const ADDERS: [extern "C" fn(u64) -> u64; 16] = [$($name),*];
        };
    }
    adders!(
        add1 = 1,
        add2 = 2,
        add3 = 3,
        add4 = 4,
        add5 = 5,
        add6 = 6,
        add7 = 7,
        add8 = 8,
        add9 = 9,
        add10 = 10,
        add11 = 11,
        add12 = 12,
        add13 = 13,
        add14 = 14,
        add15 = 15,
        add16 = 16
    );

    define_static_call!(INC: extern "C" fn(u64) -> u64 = inc);

    static FPTR: AtomicUsize = AtomicUsize::new(0);

    #[inline(always)]
    fn load_fn(p: &AtomicUsize) -> extern "C" fn(u64) -> u64 {
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

    /// A loop over `keys` in rotation (`MASK + 1` of them), through one run-time site per
    /// function: each function below is its own site.
    macro_rules! rotations {
        ($($name:ident: $mask:literal $how:ident;)*) => {$(
            #[inline(never)]
            fn $name(n: u64, mut x: u64, keys: &[&'static Key; 16]) -> u64 {
                for i in 0..n {
                    x = keys[(i & $mask) as usize].$how(x);
                }
                x
            }
        )*};
    }
    rotations! {
        run_rt_mono: 0 call_guarded;
        run_rt_poly2: 1 call_guarded;
        run_rt_rot4: 3 call_guarded;
        run_rt_rot8: 7 call_guarded;
        run_rt_rot16: 15 call_guarded;
        run_indirect_mono: 0 call_indirect;
        run_indirect_poly2: 1 call_indirect;
        run_indirect_rot4: 3 call_indirect;
        run_indirect_rot8: 7 call_indirect;
        run_indirect_rot16: 15 call_indirect;
    }

    type Run = fn(u64, u64, &[&'static Key; 16]) -> u64;

    /// The run-time benches: name, function, and how many keys it rotates through.
    const RUN_TIME: [(&str, Run, usize); 10] = [
        ("rt_mono", run_rt_mono, 1),
        ("rt_poly2", run_rt_poly2, 2),
        ("rt_rot4", run_rt_rot4, 4),
        ("rt_rot8", run_rt_rot8, 8),
        ("rt_rot16", run_rt_rot16, 16),
        ("indirect_mono", run_indirect_mono, 1),
        ("indirect_poly2", run_indirect_poly2, 2),
        ("indirect_rot4", run_indirect_rot4, 4),
        ("indirect_rot8", run_indirect_rot8, 8),
        ("indirect_rot16", run_indirect_rot16, 16),
    ];

    /// What `run(n, x)` returns over `keys` in rotation through `k` of them.
    fn expected(n: u64, x: u64, k: usize) -> u64 {
        (0..n).fold(x, |x, i| ADDERS[(i % k as u64) as usize](x))
    }

    /// The state a guarded site that sees `k` keys settles in.
    fn settled(k: usize) -> &'static str {
        match k {
            1 => "monomorphic",
            k if k <= static_call::__private::MAX_ENTRIES => "polymorphic",
            _ => "megamorphic",
        }
    }

    fn setup() -> [&'static Key; 16] {
        FPTR.store(inc as *const () as usize, Ordering::Relaxed);
        let keys: [&'static Key; 16] =
            core::array::from_fn(|i| &*Box::leak(Box::new(StaticCall::new(ADDERS[i]))));
        let before: Vec<usize> = static_call::run_time_sites()
            .iter()
            .map(|s| s.address)
            .collect();
        // Run every site until it settles, and check what it settled as: a bench of a "cached"
        // call that is not would be a lie.
        for _ in 0..20 {
            for &(name, run, k) in &RUN_TIME {
                assert_eq!(run(64, 0, &keys), expected(64, 0, k), "{name}");
            }
            static_call::flush();
        }
        assert_eq!(run_static(3, 0), 3);
        static_call::flush();
        assert_all_patched("INC", &INC.sites());
        if static_call::status().patching.is_ok() {
            let mut states: Vec<SiteState> = static_call::run_time_sites()
                .into_iter()
                .filter(|s| !before.contains(&s.address))
                .map(|s| s.state)
                .collect();
            states.sort_by_key(|s| format!("{s:?}"));
            eprintln!("run-time sites: {states:?}");
            for k in [1, 2, 4, 8, 16] {
                let want = settled(k);
                let found = states.iter().any(|s| match s {
                    SiteState::Monomorphic { .. } => want == "monomorphic",
                    SiteState::Polymorphic { targets } => want == "polymorphic" && *targets == k,
                    SiteState::Megamorphic(_) => want == "megamorphic",
                    _ => false,
                });
                assert!(found, "no {want} site for {k} keys: {states:?}");
            }
        }
        keys
    }

    /// Minimum over many short samples of each bench, interleaved (robust to preemption on a
    /// loaded machine): ns per call.
    pub fn minimums() {
        let keys = setup();
        let op: &dyn Op = &IncOp;
        type Sampled = (&'static str, Box<dyn Fn() -> u64>);
        let mut runs: Vec<Sampled> = vec![
            (
                "direct",
                Box::new(|| run_direct(black_box(CHAIN), black_box(0))),
            ),
            (
                "static_patched",
                Box::new(|| run_static(black_box(CHAIN), black_box(0))),
            ),
            (
                "atomic_ptr",
                Box::new(|| run_atomic(black_box(CHAIN), black_box(0))),
            ),
            (
                "dyn_trait",
                Box::new(move || run_dyn(black_box(CHAIN), black_box(0), black_box(op))),
            ),
        ];
        for &(name, run, _) in &RUN_TIME {
            runs.push((
                name,
                Box::new(move || run(black_box(CHAIN), black_box(0), black_box(&keys))),
            ));
        }
        let mut best = vec![f64::MAX; runs.len()];
        for _ in 0..2000 {
            for (i, (_, f)) in runs.iter().enumerate() {
                let t = std::time::Instant::now();
                black_box(f());
                let ns = t.elapsed().as_nanos() as f64 / CHAIN as f64;
                best[i] = best[i].min(ns);
            }
        }
        for (i, (name, _)) in runs.iter().enumerate() {
            println!(
                "{name:16} {:.3} ns  {:.2}x direct",
                best[i],
                best[i] / best[0]
            );
        }
    }

    pub fn benches(c: &mut Criterion) {
        if std::env::var_os("STATIC_CALL_BENCH_MIN").is_some() {
            minimums();
            std::process::exit(0);
        }
        let keys = setup();
        let mut g = c.benchmark_group("runtime");
        g.throughput(Throughput::Elements(CHAIN));
        g.bench_function("direct", |b| {
            b.iter(|| run_direct(black_box(CHAIN), black_box(0)))
        });
        g.bench_function("static_patched", |b| {
            b.iter(|| run_static(black_box(CHAIN), black_box(0)))
        });
        for &(name, run, _) in &RUN_TIME {
            g.bench_function(name, |b| {
                b.iter(|| run(black_box(CHAIN), black_box(0), black_box(&keys)))
            });
        }
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

#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]
criterion::criterion_group! {
    name = run_time;
    config = common::criterion_config();
    targets = imp::benches
}
#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]
criterion::criterion_main!(run_time);

#[cfg(not(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
)))]
fn main() {
    eprintln!("static-call benches measure x86-64 Linux only");
}
