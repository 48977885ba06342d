//! Branch-predictor pressure: many distinct call sites, each with its own target, run
//! round-robin, through direct calls, patched static calls, a per-site `AtomicPtr` and a
//! per-site `&dyn Trait`.
//!
//! 4,096 leaves (`leaves::aN::bM`), each with a target function (`x + salt`, a distinct salt so
//! the linker cannot fold them), a static-call key, an `AtomicPtr` and a `dyn` object. The key is
//! also called as a run-time key (a table of `&StaticCall`, as the `dyn` objects are), through a
//! guarded run-time site (`call_guarded`: a monomorphic guard stub each, in the code pool) and
//! through `call_indirect`. `pressure1024_mapped` runs 1,024 run-time sites whose stubs landed
//! in pages mapped after the pool's reserve in our text was used up, against the same number in
//! the reserve. The sites
//! live in 128 functions of 32 sites, one per mechanism in each module `aN` (LLVM's compile time
//! for one function grows steeply past ~600 asm sites). `pressure1024` runs the first 32 of
//! those functions, `pressure4096` all 128; every mechanism gets the same layout and the same
//! extra direct call per 32 sites. Each indirect site always goes to the same target, as in a
//! program that chose its functions at start-up: what is measured is the cost of holding that
//! many targets in the branch predictor and that much code in the instruction cache.

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
    use crate::common::assert_all_patched;
    use core::hint::black_box;
    use core::sync::atomic::{AtomicUsize, Ordering};
    use criterion::{Criterion, Throughput};

    pub trait Op {
        fn call(&self, x: u64) -> u64;
    }

    #[inline(always)]
    pub(crate) fn load_fn(p: &AtomicUsize) -> extern "C" fn(u64) -> u64 {
        // SAFETY: only ever stores `extern "C" fn(u64) -> u64` values (see `setup`).
        unsafe {
            core::mem::transmute::<usize, extern "C" fn(u64) -> u64>(p.load(Ordering::Relaxed))
        }
    }

    /// FNV-1a, to give every generated target a distinct constant (identical functions would
    /// be merged by the compiler).
    pub(crate) const fn fnv(s: &str) -> u64 {
        let b = s.as_bytes();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i = 0;
        while i < b.len() {
            h = (h ^ b[i] as u64).wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        h
    }

    /// `$m!(args.. [a0 .. a127])`: the 128 modules.
    macro_rules! outer {
        ($m:ident!($($pre:tt)*)) => {
            $m! {
                $($pre)* [
                    a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15
                    a16 a17 a18 a19 a20 a21 a22 a23 a24 a25 a26 a27 a28 a29 a30 a31
                    a32 a33 a34 a35 a36 a37 a38 a39 a40 a41 a42 a43 a44 a45 a46 a47
                    a48 a49 a50 a51 a52 a53 a54 a55 a56 a57 a58 a59 a60 a61 a62 a63
                    a64 a65 a66 a67 a68 a69 a70 a71 a72 a73 a74 a75 a76 a77 a78 a79
                    a80 a81 a82 a83 a84 a85 a86 a87 a88 a89 a90 a91 a92 a93 a94 a95
                    a96 a97 a98 a99 a100 a101 a102 a103 a104 a105 a106 a107 a108 a109 a110 a111
                    a112 a113 a114 a115 a116 a117 a118 a119 a120 a121 a122 a123 a124 a125 a126 a127
                ]
            }
        };
    }

    /// `$m!(args.. [b0 .. b31])`: the 32 leaves of a module.
    macro_rules! inner {
        ($m:ident!($($pre:tt)*)) => {
            $m! {
                $($pre)* [
                    b0 b1 b2 b3 b4 b5 b6 b7 b8 b9 b10 b11 b12 b13 b14 b15
                    b16 b17 b18 b19 b20 b21 b22 b23 b24 b25 b26 b27 b28 b29 b30 b31
                ]
            }
        };
    }

    /// One leaf: a target, its static-call key, its `AtomicPtr` and its `dyn` object.
    macro_rules! leaf {
        () => {
            const SALT: u64 = crate::imp::fnv(module_path!()) | 1;
            #[inline(never)]
            pub extern "C" fn target(x: u64) -> u64 {
                x.wrapping_add(SALT)
            }
            static_call::define_static_call!(pub K: extern "C" fn(u64) -> u64 = target);
            pub static PTR: core::sync::atomic::AtomicUsize =
                core::sync::atomic::AtomicUsize::new(0);
            pub struct Obj;
            impl crate::imp::Op for Obj {
                fn call(&self, x: u64) -> u64 {
                    x.wrapping_add(SALT)
                }
            }
        };
    }

    /// Module `$a`: its 32 leaves, and one function per mechanism running their sites in a
    /// chain.
    macro_rules! module {
        ([$($a:ident)*]) => {
            $( pub mod $a { inner!(module!(@leaves)); } )*
        };
        (@leaves [$($b:ident)*]) => {
            $( pub mod $b { leaf!(); } )*

            #[inline(never)]
            pub fn direct(mut x: u64) -> u64 {
                $( x = $b::target(x); )*
                x
            }

            #[inline(never)]
            pub fn static_calls(mut x: u64) -> u64 {
                $( x = static_call::static_call!($b::K)(x); )*
                x
            }

            #[inline(never)]
            pub fn atomic(mut x: u64) -> u64 {
                $( x = crate::imp::load_fn(&$b::PTR)(x); )*
                x
            }

            #[inline(never)]
            pub fn dyn_trait(mut x: u64, objs: &[&'static dyn crate::imp::Op; 32]) -> u64 {
                let mut i = 0;
                $(
                    let _ = stringify!($b);
                    x = objs[i].call(x);
                    i += 1;
                )*
                let _ = i;
                x
            }

            #[inline(never)]
            pub fn run_time_guarded(mut x: u64, keys: &[&'static crate::imp::Key; 32]) -> u64 {
                // The module's name makes this function's code its own: the 128 would be
                // identical, and LLVM would fold them into one (32 sites for 4,096 keys).
                core::hint::black_box(module_path!());
                let mut i = 0;
                $(
                    let _ = stringify!($b);
                    x = keys[i].call_guarded(x);
                    i += 1;
                )*
                let _ = i;
                x
            }

            #[inline(never)]
            pub fn run_time_indirect(mut x: u64, keys: &[&'static crate::imp::Key; 32]) -> u64 {
                // The module's name makes this function's code its own: the 128 would be
                // identical, and LLVM would fold them into one (32 sites for 4,096 keys).
                core::hint::black_box(module_path!());
                let mut i = 0;
                $(
                    let _ = stringify!($b);
                    x = keys[i].call_indirect(x);
                    i += 1;
                )*
                let _ = i;
                x
            }
        };
    }

    /// A key as a run-time value.
    pub type Key = static_call::StaticCall<extern "C" fn(u64) -> u64>;

    pub mod leaves {
        outer!(module!());
    }

    /// `$m!(a b)` for every leaf, in order.
    macro_rules! for_leaves {
        ($m:ident [$($a:ident)*]) => {
            $( inner!(for_leaves!(@b $m $a)); )*
        };
        (@b $m:ident $a:ident [$($b:ident)*]) => {
            $( $m!($a $b); )*
        };
    }

    /// `$x = leaves::$a::$f($x)` for every module `$a` of the list.
    macro_rules! chain {
        ($x:ident $f:ident $extra:tt [$($a:ident)*]) => {{
            let mut _k = 0usize;
            $( chain!(@one $x $f $a _k $extra); _k += 1; )*
        }};
        (@one $x:ident $f:ident $a:ident $k:ident ()) => {
            $x = super::leaves::$a::$f($x);
        };
        (@one $x:ident $f:ident $a:ident $k:ident ($objs:ident)) => {
            $x = super::leaves::$a::$f($x, &$objs[$k]);
        };
        (@one $x:ident $f:ident $a:ident $k:ident ($objs:ident $base:literal)) => {
            $x = super::leaves::$a::$f($x, &$objs[$base + $k]);
        };
    }

    pub const MODULES: usize = 128;
    type DynTable = [[&'static dyn Op; 32]; MODULES];
    type KeyTable = [[&'static Key; 32]; MODULES];

    /// The four mechanisms over the modules in `$list`.
    macro_rules! scenario {
        ($name:ident, $list:tt) => {
            mod $name {
                use super::{DynTable, KeyTable};

                #[inline(never)]
                pub fn direct(mut x: u64) -> u64 {
                    chain!(x direct () $list);
                    x
                }

                #[inline(never)]
                pub fn static_calls(mut x: u64) -> u64 {
                    chain!(x static_calls () $list);
                    x
                }

                #[inline(never)]
                pub fn atomic(mut x: u64) -> u64 {
                    chain!(x atomic () $list);
                    x
                }

                #[inline(never)]
                pub fn dyn_trait(mut x: u64, objs: &DynTable) -> u64 {
                    chain!(x dyn_trait (objs) $list);
                    x
                }

                #[inline(never)]
                pub fn run_time_guarded(mut x: u64, keys: &KeyTable) -> u64 {
                    chain!(x run_time_guarded (keys) $list);
                    x
                }

                #[inline(never)]
                pub fn run_time_indirect(mut x: u64, keys: &KeyTable) -> u64 {
                    chain!(x run_time_indirect (keys) $list);
                    x
                }
            }
        };
    }

    /// The 1,024 run-time sites of modules a64..a95, whose stubs are made after the first
    /// 2,048 (`setup` settles the modules in order): past the pool's reserve, in mapped pages.
    mod s1024_mapped {
        use super::KeyTable;

        #[inline(never)]
        pub fn direct(mut x: u64) -> u64 {
            chain!(x direct () [
                a64 a65 a66 a67 a68 a69 a70 a71 a72 a73 a74 a75 a76 a77 a78 a79
                a80 a81 a82 a83 a84 a85 a86 a87 a88 a89 a90 a91 a92 a93 a94 a95
            ]);
            x
        }

        #[inline(never)]
        pub fn run_time_guarded(mut x: u64, keys: &KeyTable) -> u64 {
            chain!(x run_time_guarded (keys 64) [
                a64 a65 a66 a67 a68 a69 a70 a71 a72 a73 a74 a75 a76 a77 a78 a79
                a80 a81 a82 a83 a84 a85 a86 a87 a88 a89 a90 a91 a92 a93 a94 a95
            ]);
            x
        }
    }

    scenario!(s1024, [
                    a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15
                    a16 a17 a18 a19 a20 a21 a22 a23 a24 a25 a26 a27 a28 a29 a30 a31
    ]);
    outer!(scenario!(s4096,));

    fn setup() -> (Box<DynTable>, Box<KeyTable>) {
        let mut objs: Vec<&'static dyn Op> = Vec::with_capacity(MODULES * 32);
        let mut keys: Vec<&'static Key> = Vec::with_capacity(MODULES * 32);
        macro_rules! store {
            ($a:ident $b:ident) => {
                leaves::$a::$b::PTR.store(
                    leaves::$a::$b::target as *const () as usize,
                    Ordering::Relaxed,
                );
                objs.push(&leaves::$a::$b::Obj);
                keys.push(&*leaves::$a::$b::K);
            };
        }
        outer!(for_leaves!(store));
        let rows: Vec<[&'static dyn Op; 32]> =
            objs.chunks(32).map(|c| c.try_into().unwrap()).collect();
        let table: Box<DynTable> = Box::new(rows.try_into().unwrap_or_else(|_| unreachable!()));
        let rows: Vec<[&'static Key; 32]> =
            keys.chunks(32).map(|c| c.try_into().unwrap()).collect();
        let keys: Box<KeyTable> = Box::new(rows.try_into().unwrap_or_else(|_| unreachable!()));
        setup_run_time(&keys);

        // Run every static-call site once, let the worker patch them, and check.
        let want = s4096::direct(7);
        assert_eq!(s4096::static_calls(7), want);
        static_call::flush();
        macro_rules! check {
            ($a:ident $b:ident) => {
                assert_all_patched(stringify!($a::$b), &leaves::$a::$b::K.sites());
            };
        }
        outer!(for_leaves!(check));
        assert_eq!(s4096::static_calls(7), want);
        assert_eq!(s4096::atomic(7), want);
        assert_eq!(s4096::dyn_trait(7, &table), want);
        let want = s1024::direct(7);
        assert_eq!(s1024::static_calls(7), want);
        assert_eq!(s1024::atomic(7), want);
        assert_eq!(s1024::dyn_trait(7, &table), want);
        (table, keys)
    }

    /// Settles the run-time sites module by module, in order (so that the first 2,048 stubs fill
    /// the pool's reserve and the rest go to mapped pages), and checks that every one is
    /// monomorphic, and where its stub is.
    fn setup_run_time(keys: &KeyTable) {
        let want = s4096::direct(7);
        for chunk in 0..MODULES / 16 {
            macro_rules! settle_modules {
                ([$($a:ident)*]) => {{
                    let mut m = 0;
                    $(
                        if m / 16 == chunk {
                            let mut x = 7;
                            x = leaves::$a::run_time_guarded(x, &keys[m]);
                            let _ = x;
                        }
                        m += 1;
                    )*
                    let _ = m;
                }};
            }
            outer!(settle_modules!());
            static_call::flush();
        }
        assert_eq!(s4096::run_time_guarded(7, keys), want);
        assert_eq!(s4096::run_time_indirect(7, keys), want);
        assert_eq!(s1024::run_time_guarded(7, keys), s1024::direct(7));
        assert_eq!(
            s1024_mapped::run_time_guarded(7, keys),
            s1024_mapped::direct(7)
        );
        static_call::flush();
        if static_call::status().patching.is_ok() {
            let sites = static_call::run_time_sites();
            let mono = sites
                .iter()
                .filter(|s| matches!(s.state, static_call::SiteState::Monomorphic { .. }))
                .count();
            let mut others = std::collections::BTreeMap::new();
            for s in &sites {
                if !matches!(s.state, static_call::SiteState::Monomorphic { .. }) {
                    *others.entry(format!("{:?}", s.state)).or_insert(0) += 1;
                }
            }
            assert_eq!(
                mono,
                MODULES * 32,
                "every run-time site is monomorphic; the others: {others:?}; {:?}",
                static_call::status()
            );
            let (lo, hi) = static_call::__private::code_pool_reserve();
            let in_reserve = sites
                .iter()
                .filter_map(|s| crate::common::call_target(s.address))
                .filter(|t| (lo..hi).contains(t))
                .count();
            eprintln!(
                "run-time sites: {mono} monomorphic, {in_reserve} of their stubs in the reserve, \
                 {} in mapped pages ({} pages)",
                mono - in_reserve,
                static_call::stats().thunk_pages
            );
        }
    }

    pub fn benches(c: &mut Criterion) {
        let (table, keys) = setup();
        let mut g = c.benchmark_group("pressure1024");
        g.throughput(Throughput::Elements(1024));
        g.bench_function("direct", |b| b.iter(|| s1024::direct(black_box(0))));
        g.bench_function("static_patched", |b| {
            b.iter(|| s1024::static_calls(black_box(0)))
        });
        g.bench_function("atomic_ptr", |b| b.iter(|| s1024::atomic(black_box(0))));
        g.bench_function("dyn_trait", |b| {
            b.iter(|| s1024::dyn_trait(black_box(0), &table))
        });
        g.bench_function("run_time_guarded", |b| {
            b.iter(|| s1024::run_time_guarded(black_box(0), &keys))
        });
        g.bench_function("run_time_indirect", |b| {
            b.iter(|| s1024::run_time_indirect(black_box(0), &keys))
        });
        g.finish();

        let mut g = c.benchmark_group("pressure1024_mapped");
        g.throughput(Throughput::Elements(1024));
        g.bench_function("direct", |b| b.iter(|| s1024_mapped::direct(black_box(0))));
        g.bench_function("run_time_guarded", |b| {
            b.iter(|| s1024_mapped::run_time_guarded(black_box(0), &keys))
        });
        g.finish();

        let mut g = c.benchmark_group("pressure4096");
        g.throughput(Throughput::Elements(4096));
        g.bench_function("direct", |b| b.iter(|| s4096::direct(black_box(0))));
        g.bench_function("static_patched", |b| {
            b.iter(|| s4096::static_calls(black_box(0)))
        });
        g.bench_function("atomic_ptr", |b| b.iter(|| s4096::atomic(black_box(0))));
        g.bench_function("dyn_trait", |b| {
            b.iter(|| s4096::dyn_trait(black_box(0), &table))
        });
        g.bench_function("run_time_guarded", |b| {
            b.iter(|| s4096::run_time_guarded(black_box(0), &keys))
        });
        g.bench_function("run_time_indirect", |b| {
            b.iter(|| s4096::run_time_indirect(black_box(0), &keys))
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
    name = pressure;
    config = common::criterion_config();
    targets = imp::benches
}
#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]
criterion::criterion_main!(pressure);

#[cfg(not(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
)))]
fn main() {
    eprintln!("static-call benches measure x86-64 Linux only");
}
