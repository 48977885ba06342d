//! Instruction counts per call, for callgrind (`scripts/icount.py` runs it; the counts are
//! deterministic, so they make a regression guard where timings are noise).
//!
//! `icount [patched|unpatched] [N]` runs each loop below N times, one call per iteration, after
//! making sure the static-call site (and the run-time site, a monomorphic guard stub) is patched (or, with `unpatched`, that it stays on the
//! trampoline). The loops are exported under fixed names so that `callgrind_annotate` finds
//! them (each takes the start value as an argument, so that it stays in a register); the
//! script runs two values of N and divides the difference, which cancels the one-time
//! cost of the first call.
//!
//! Run by `cargo bench` without arguments it does a short run and says how to get the counts.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod common;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use crate::common::inc;
    use core::hint::black_box;
    use core::sync::atomic::{AtomicUsize, Ordering};
    use static_call::{SiteState, define_static_call, static_call};

    define_static_call!(INC: extern "C" fn(u64) -> u64 = inc);
    static FPTR: AtomicUsize = AtomicUsize::new(0);

    /// A Rust target: its body inlines into the adapter that `INC_RUST`'s sites call.
    fn inc_rust(x: u64) -> u64 {
        x.wrapping_add(1)
    }
    define_static_call!(INC_RUST: fn(u64) -> u64 = inc_rust);

    /// The direct call a Rust key's patched call is measured against: a call of a function that
    /// is not inlined and holds the same body (as the adapter does).
    #[inline(never)]
    fn direct_inc_rust(x: u64) -> u64 {
        inc_rust(x)
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn icount_direct_rust(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = direct_inc_rust(x);
        }
        x
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn icount_static_rust(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = static_call!(INC_RUST)(x);
        }
        x
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn icount_direct(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = inc(x);
        }
        x
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn icount_static(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            x = static_call!(INC)(x);
        }
        x
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn icount_atomic_ptr(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            // SAFETY: FPTR holds `inc` (stored in `main`).
            let f = unsafe {
                core::mem::transmute::<usize, extern "C" fn(u64) -> u64>(
                    FPTR.load(Ordering::Relaxed),
                )
            };
            x = f(x);
        }
        x
    }

    /// A run-time key: a guarded site (a monomorphic stub once patched), and the same key
    /// called indirectly (`key.call` without the cache).
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn icount_run_time_guarded(n: u64, mut x: u64, key: &Key) -> u64 {
        for _ in 0..n {
            x = key.call_guarded(x);
        }
        x
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn icount_run_time_indirect(n: u64, mut x: u64, key: &Key) -> u64 {
        for _ in 0..n {
            x = key.call_indirect(x);
        }
        x
    }

    type Key = static_call::StaticCall<extern "C" fn(u64) -> u64>;

    pub fn main() {
        let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
        let mode = args.next().unwrap_or_else(|| "patched".into());
        let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
        FPTR.store(inc as *const () as usize, Ordering::Relaxed);
        static_call::init();
        let unpatched = match mode.as_str() {
            "patched" => false,
            "unpatched" => {
                static_call::unpatch_all().expect("unpatch_all");
                true
            }
            other => panic!("mode must be `patched` or `unpatched`, not {other:?}"),
        };
        assert_eq!(icount_static(1, 0), 1);
        assert_eq!(icount_static_rust(1, 0), 1);
        let key: &Key = Box::leak(Box::new(static_call::StaticCall::new(
            inc as extern "C" fn(u64) -> u64,
        )));
        assert_eq!(icount_run_time_guarded(1, 0, key), 1);
        static_call::flush();
        if !unpatched {
            let rt = static_call::run_time_sites();
            assert!(
                matches!(
                    rt[..],
                    [static_call::SiteInfo {
                        state: SiteState::Monomorphic { .. },
                        ..
                    }]
                ),
                "the run-time site must be a monomorphic stub: {rt:?}"
            );
        }
        let sites = INC.sites();
        assert_eq!(sites.len(), 1, "one site: {sites:?}");
        assert_eq!(INC_RUST.sites().len(), 1, "one Rust-key site");
        assert_eq!(INC_RUST.sites()[0].state, sites[0].state);
        let state = sites[0].state;
        if unpatched {
            assert!(matches!(state, SiteState::Trampoline(_)), "{state:?}");
        } else {
            assert_eq!(
                state,
                SiteState::Patched,
                "the site must be patched (under valgrind: STATIC_CALL_VALGRIND=patch and \
                 --smc-check=all); status: {:?}",
                static_call::status()
            );
        }
        let x = black_box(0);
        let r = (
            icount_direct(n, x),
            icount_static(n, x),
            icount_atomic_ptr(n, x),
            icount_direct_rust(n, x),
            icount_static_rust(n, x),
            icount_run_time_guarded(n, x, key),
            icount_run_time_indirect(n, x, key),
        );
        assert_eq!(r, (n, n, n, n, n, n, n));
        println!("icount {mode} n={n}: site {state:?}");
        if std::env::args().any(|a| a == "--bench") {
            println!("instruction counts per call: scripts/icount.py (callgrind)");
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() {
    imp::main();
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    eprintln!("static-call benches measure x86-64 Linux only");
}
