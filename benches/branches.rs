//! Static branches and hooks against what users write instead.
//!
//! Every bench runs a loop of `CHAIN` iterations of a small dependent computation (`work`: a
//! multiply and a rotate, about 4 cycles) with one test per iteration, so what is measured is
//! what the test adds to real work. Run with `scripts/bench.sh` or, for these alone,
//! `RUSTFLAGS="-C llvm-args=-align-loops=64" cargo bench --bench branches` (loop placement alone
//! moves ratios by several percent otherwise); add
//! `-C target-feature=+retpoline-indirect-calls,+retpoline-indirect-branches` for a retpoline
//! build.
//!
//! Groups:
//! - `off/*`: the test is false. An empty loop (the work alone), a patched `static_branch!`
//!   (a NOP5), an `AtomicBool` load, the `log` crate's level check (`log_enabled!`) and the
//!   static-keys crate's `static_branch_unlikely!` (its NOP).
//! - `on/*`: the test is true and the block does a little more work: a patched
//!   `static_branch!` (`jmp` into the block and back), an `AtomicBool`, static-keys.
//! - `hook/*`: a hook that receives a `log::Record` built at the call, off and on:
//!   `if has_target!(HOOK) { static_call!(HOOK)(&record) }` against `log::trace!`, with the same
//!   sink behind both (on: a logger that counts records).

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod common;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use crate::common::{CHAIN, assert_all_patched};
    use core::hint::black_box;
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use criterion::{Criterion, Throughput};
    use static_call::{
        define_static_branch, define_static_call, has_target, static_branch, static_call,
    };

    /// The work of one iteration: a dependent multiply and rotate.
    #[inline(always)]
    fn work(x: u64) -> u64 {
        x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
    }

    /// What an on branch does besides: out of line, so that it costs a call and stays out of the
    /// way of the off path.
    #[inline(never)]
    fn extra(x: u64) -> u64 {
        x ^ 0x5555
    }

    define_static_branch!(OFF: bool = false);
    define_static_branch!(ON: bool = true);
    /// Stored at run time: LLVM folds a static that is never stored to into a constant.
    static FLAG_OFF: AtomicBool = AtomicBool::new(true);
    static FLAG_ON: AtomicBool = AtomicBool::new(false);

    static_keys::define_static_key_false!(SK_OFF);
    static_keys::define_static_key_false!(SK_ON);

    /// An empty asm block: no instruction, but LLVM no longer unrolls the loop around it, so
    /// that every loop below has the same shape (one test per iteration, `dec; jne`) whatever its
    /// test, as it has when the test is a branch site (an asm block too).
    #[inline(always)]
    fn same_shape() {
        // SAFETY: an empty asm block does nothing.
        unsafe { core::arch::asm!("", options(nomem, nostack, preserves_flags)) };
    }

    macro_rules! loops {
        ($($(#[$doc:meta])* $name:ident: |$x:ident| $test:expr;)*) => {$(
            $(#[$doc])*
            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn $name(n: u64, mut $x: u64) -> u64 {
                for _ in 0..n {
                    same_shape();
                    $x = work($x);
                    if $test {
                        $x = extra($x);
                    }
                }
                $x
            }
        )*};
    }

    loops! {
        /// The work alone (the test is a constant `false`).
        branches_empty: |x| false;
        branches_static_off: |x| static_branch!(OFF);
        branches_atomic_off: |x| FLAG_OFF.load(Ordering::Relaxed);
        branches_log_level_off: |x| log::log_enabled!(log::Level::Trace);
        branches_static_keys_off: |x| static_keys::static_branch_unlikely!(SK_OFF);
        branches_static_on: |x| static_branch!(ON);
        branches_atomic_on: |x| FLAG_ON.load(Ordering::Relaxed);
        branches_static_keys_on: |x| static_keys::static_branch_unlikely!(SK_ON);
    }

    /// What the logger and the hook do with a record: count it, and look at its arguments.
    static RECORDS: AtomicU64 = AtomicU64::new(0);

    #[inline(never)]
    fn sink(record: &log::Record) {
        black_box(record.args());
        RECORDS.fetch_add(1, Ordering::Relaxed);
    }

    struct Counting;
    impl log::Log for Counting {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            sink(record);
        }
        fn flush(&self) {}
    }
    static LOGGER: Counting = Counting;

    extern "C" fn on_record(record: &log::Record) {
        sink(record);
    }

    define_static_call!(HOOK: extern "C" fn(&log::Record) = None);

    /// The hook pattern: the record is built only when the hook has a target.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn branches_hook(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            same_shape();
            x = work(x);
            if has_target!(HOOK) {
                // A copy: the record borrows it, not the loop's variable, which then stays in a
                // register (the same in `branches_log_trace`).
                let value = x;
                static_call!(HOOK)(
                    &log::Record::builder()
                        .args(format_args!("value {value}"))
                        .level(log::Level::Trace)
                        .target("bench")
                        .build(),
                );
            }
        }
        x
    }

    /// `log::trace!`: a level check, and the record built and passed to the logger (a `dyn Log`
    /// call) when it passes.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn branches_log_trace(n: u64, mut x: u64) -> u64 {
        for _ in 0..n {
            same_shape();
            x = work(x);
            let value = x;
            log::trace!(target: "bench", "value {value}");
        }
        x
    }

    /// Runs every loop once, patches every site and checks it is patched as it must be.
    fn set_up() {
        static_call::init();
        FLAG_OFF.store(false, Ordering::Relaxed);
        FLAG_ON.store(true, Ordering::Relaxed);
        static_keys::global_init();
        // SAFETY: static-keys requires `global_init` first (above) and no concurrent switching:
        // this runs before any bench thread.
        unsafe { SK_ON.enable() };
        log::set_logger(&LOGGER).expect("the only logger");
        log::set_max_level(log::LevelFilter::Off);
        for (_, f) in ALL {
            black_box(f(2, 1));
        }
        HOOK.update(on_record);
        black_box(branches_hook(2, 1));
        HOOK.set_null();
        static_call::flush();
        assert_all_patched("OFF", &OFF.sites());
        assert_all_patched("ON", &ON.sites());
        assert_all_patched("HOOK", &HOOK.sites());
    }

    fn bench(c: &mut Criterion, group: &str, loops: &[(&str, extern "C" fn(u64, u64) -> u64)]) {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(CHAIN));
        for &(name, f) in loops {
            g.bench_function(name, |b| b.iter(|| f(black_box(CHAIN), black_box(1))));
        }
        g.finish();
    }

    /// The exported loops, by name, for `icount` mode.
    const ALL: [(&str, extern "C" fn(u64, u64) -> u64); 10] = [
        ("branches_empty", branches_empty),
        ("branches_static_off", branches_static_off),
        ("branches_atomic_off", branches_atomic_off),
        ("branches_log_level_off", branches_log_level_off),
        ("branches_static_keys_off", branches_static_keys_off),
        ("branches_static_on", branches_static_on),
        ("branches_atomic_on", branches_atomic_on),
        ("branches_static_keys_on", branches_static_keys_on),
        ("branches_hook", branches_hook),
        ("branches_log_trace", branches_log_trace),
    ];

    /// `branches icount N`: runs every loop N times (hooks off), for callgrind
    /// (`scripts/branch_icount.py`), instead of criterion.
    fn icount(n: u64) {
        for (name, f) in ALL {
            black_box(f(n, black_box(1)));
            println!("{name}: {n} iterations");
        }
    }

    pub fn main() {
        set_up();
        let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
        if args.next().as_deref() == Some("icount") {
            let n = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
            return icount(n);
        }
        let mut c = crate::common::criterion_config();
        bench(
            &mut c,
            "off",
            &[
                ("empty_loop", branches_empty),
                ("static_branch", branches_static_off),
                ("atomic_bool", branches_atomic_off),
                ("log_level", branches_log_level_off),
                ("static_keys", branches_static_keys_off),
            ],
        );
        bench(
            &mut c,
            "on",
            &[
                ("static_branch", branches_static_on),
                ("atomic_bool", branches_atomic_on),
                ("static_keys", branches_static_keys_on),
            ],
        );
        bench(
            &mut c,
            "hook",
            &[
                ("off_has_target", branches_hook),
                ("off_log_trace", branches_log_trace),
            ],
        );
        HOOK.update(on_record);
        log::set_max_level(log::LevelFilter::Trace);
        bench(
            &mut c,
            "hook",
            &[
                ("on_has_target", branches_hook),
                ("on_log_trace", branches_log_trace),
            ],
        );
        assert!(RECORDS.load(Ordering::Relaxed) > 0);
        c.final_summary();
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
