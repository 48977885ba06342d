//! memchr's search functions dispatched through static calls: keys with memchr's own signatures,
//! targets chosen at start-up by CPU feature (a scalar loop, memchr's SSE2 searchers, its AVX2
//! searchers through adapters compiled with AVX2) and switched at run time.
//!
//! Run with `cargo run --release --example memchr_dispatch`. It prints:
//! 1. the targets this CPU can run, each checked against `memchr::memchr`/`memrchr`/`memchr2` on
//!    buffers of every length up to 300 bytes at several alignments;
//! 2. the target installed at start-up (the best this CPU has), and whether static calls are
//!    patched into direct calls in this process;
//! 3. what a search costs through each dispatch, on haystacks of 16, 64 and 4096 bytes whose
//!    only match is the last byte: `memchr::memchr` itself (its own dispatch: a function pointer
//!    it loads and calls), the static call to each target in turn (switched with `update` at run
//!    time), and an `AtomicPtr<fn>` holding the best target (what a user would write without
//!    this crate);
//! 4. the same search through `memchr_raw`, a public wrapper written with `static_call_fn!` over
//!    a C-ABI key (`unsafe extern "C" fn(u8, *const u8, usize) -> isize`): the one form of
//!    memchr's signature a tail-call wrapper can take (naked functions need a non-Rust ABI), so
//!    once patched its body is a single `jmp` to the searcher, with no adapter. The safe `find`
//!    over it is `#[inline]`, so a caller's only call is the wrapper's.
//!
//! The AVX2 targets are `#[target_feature(enable = "avx2")]` functions, which `update` cannot take
//! (they are not `Fn`: calling one is only sound on a CPU with AVX2). `target_feature!` checks the
//! CPU and writes their adapters (it returns `None` on a CPU without AVX2). On other
//! architectures only the scalar targets exist.
//!
//! What to expect: memchr's searchers are too big to inline into an adapter, so a static call to
//! one is a direct call of the adapter, which calls the searcher (a call frame it keeps for
//! catching a panic). That is about what `memchr::memchr`'s own dispatch costs (a load and an
//! indirect call) on a CPU that predicts the indirect call, a little more than an `AtomicPtr`
//! holding the searcher itself, and much less than either once indirect calls go through
//! retpolines (docs/benchmarks.md).

use std::hint::black_box;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Instant;

use static_call::{Adapter, SiteState, define_static_call, static_call, static_call_fn};

// Keys with memchr's own signatures.
define_static_call!(
    /// `memchr::memchr`: the first position of a byte.
    pub MEMCHR: fn(u8, &[u8]) -> Option<usize> = scalar::memchr
);
define_static_call!(
    /// `memchr::memrchr`: the last position of a byte.
    pub MEMRCHR: fn(u8, &[u8]) -> Option<usize> = scalar::memrchr
);
define_static_call!(
    /// `memchr::memchr2`: the first position of either of two bytes.
    pub MEMCHR2: fn(u8, u8, &[u8]) -> Option<usize> = scalar::memchr2
);

// The C-ABI form of `memchr` (pointer and length; -1 for no match), and its public wrapper: a
// naked function whose whole body is the site, patched into `jmp <target>`.
define_static_call!(
    /// `memchr` over a pointer and a length, for the tail-call wrapper `memchr_raw`.
    pub MEMCHR_RAW: unsafe extern "C" fn(u8, *const u8, usize) -> isize = raw::memchr_scalar
);
static_call_fn!(
    /// The first position of `n` in the `len` bytes at `p`, or -1.
    ///
    /// # Safety
    /// `p` must be valid for reads of `len` bytes.
    pub unsafe fn memchr_raw(n: u8, p: *const u8, len: usize) -> isize = MEMCHR_RAW
);

/// The safe API over `memchr_raw`; inlined, so the only call left is the wrapper's `jmp`.
#[inline]
pub fn find(n: u8, hay: &[u8]) -> Option<usize> {
    // SAFETY: a slice is valid for reads of its length.
    let r = unsafe { memchr_raw(n, hay.as_ptr(), hay.len()) };
    usize::try_from(r).ok()
}

mod raw {
    //! The C-ABI targets of `MEMCHR_RAW`. An `unsafe extern "C" fn` key can hold an AVX2
    //! function directly (no adapter): installing it is the caller's promise that the CPU has
    //! AVX2, which `main` checks first.

    fn to_isize(r: Option<usize>) -> isize {
        r.map_or(-1, |i| i as isize)
    }

    /// # Safety
    /// `p` must be valid for reads of `len` bytes.
    pub unsafe extern "C" fn memchr_scalar(n: u8, p: *const u8, len: usize) -> isize {
        // SAFETY: by the caller's promise.
        let hay = unsafe { core::slice::from_raw_parts(p, len) };
        to_isize(super::scalar::memchr(n, hay))
    }

    /// # Safety
    /// As for `memchr_scalar`, on a CPU with AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub unsafe extern "C" fn memchr_avx2(n: u8, p: *const u8, len: usize) -> isize {
        // SAFETY: by the caller's promise.
        let hay = unsafe { core::slice::from_raw_parts(p, len) };
        to_isize(super::x86::memchr_avx2(n, hay))
    }

    /// # Safety
    /// As for `memchr_scalar`.
    #[cfg(target_arch = "x86_64")]
    pub unsafe extern "C" fn memchr_sse2(n: u8, p: *const u8, len: usize) -> isize {
        // SAFETY: by the caller's promise.
        let hay = unsafe { core::slice::from_raw_parts(p, len) };
        to_isize(super::x86::memchr_sse2(n, hay))
    }

    /// Installs the best C-ABI target this CPU has; returns its name.
    pub fn install_best() -> &'static str {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // `memchr_avx2` runs only where AVX2 is available: checked just above.
                super::MEMCHR_RAW.update(memchr_avx2);
                return "avx2";
            }
            super::MEMCHR_RAW.update(memchr_sse2);
            "sse2"
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            super::MEMCHR_RAW.update(memchr_scalar);
            "scalar"
        }
    }
}

mod scalar {
    //! The portable targets: plain loops.

    pub fn memchr(n: u8, hay: &[u8]) -> Option<usize> {
        hay.iter().position(|&b| b == n)
    }
    pub fn memrchr(n: u8, hay: &[u8]) -> Option<usize> {
        hay.iter().rposition(|&b| b == n)
    }
    pub fn memchr2(n1: u8, n2: u8, hay: &[u8]) -> Option<usize> {
        hay.iter().position(|&b| b == n1 || b == n2)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! memchr's searchers for x86-64. SSE2 is part of x86-64, so those are plain functions; the
    //! AVX2 ones are compiled with AVX2, and only reachable through an adapter that
    //! `target_feature!` wrote after checking the CPU. Each builds memchr's searcher for the
    //! needle and runs it: `One`/`Two` splat the needle, then search.

    use memchr::arch::x86_64::{avx2, sse2};

    pub fn memchr_sse2(n: u8, hay: &[u8]) -> Option<usize> {
        sse2::memchr::One::new(n)
            .expect("x86-64 has SSE2")
            .find(hay)
    }
    pub fn memrchr_sse2(n: u8, hay: &[u8]) -> Option<usize> {
        sse2::memchr::One::new(n)
            .expect("x86-64 has SSE2")
            .rfind(hay)
    }
    pub fn memchr2_sse2(n1: u8, n2: u8, hay: &[u8]) -> Option<usize> {
        sse2::memchr::Two::new(n1, n2)
            .expect("x86-64 has SSE2")
            .find(hay)
    }

    #[target_feature(enable = "avx2")]
    pub fn memchr_avx2(n: u8, hay: &[u8]) -> Option<usize> {
        // SAFETY: compiled with AVX2, so this only runs where AVX2 (and SSE2) is available.
        unsafe { avx2::memchr::One::new_unchecked(n) }.find(hay)
    }
    #[target_feature(enable = "avx2")]
    pub fn memrchr_avx2(n: u8, hay: &[u8]) -> Option<usize> {
        // SAFETY: as for `memchr_avx2`.
        unsafe { avx2::memchr::One::new_unchecked(n) }.rfind(hay)
    }
    #[target_feature(enable = "avx2")]
    pub fn memchr2_avx2(n1: u8, n2: u8, hay: &[u8]) -> Option<usize> {
        // SAFETY: as for `memchr_avx2`.
        unsafe { avx2::memchr::Two::new_unchecked(n1, n2) }.find(hay)
    }
}

type Find = fn(u8, &[u8]) -> Option<usize>;
type Find2 = fn(u8, u8, &[u8]) -> Option<usize>;

/// One set of targets for the three keys.
struct Targets {
    name: &'static str,
    /// Installs this set in the three keys (one `update` each).
    install: Box<dyn Fn()>,
    /// The `memchr` target as a function pointer, for the `AtomicPtr` comparison.
    memchr: Find,
}

/// The target sets this CPU can run, slowest first.
fn available() -> Vec<Targets> {
    #[allow(unused_mut)] // Only x86-64 adds sets.
    let mut sets = vec![Targets {
        name: "scalar",
        install: Box::new(|| {
            MEMCHR.update(scalar::memchr);
            MEMRCHR.update(scalar::memrchr);
            MEMCHR2.update(scalar::memchr2);
        }),
        memchr: scalar::memchr,
    }];
    #[cfg(target_arch = "x86_64")]
    {
        sets.push(Targets {
            name: "sse2",
            install: Box::new(|| {
                MEMCHR.update(x86::memchr_sse2);
                MEMRCHR.update(x86::memrchr_sse2);
                MEMCHR2.update(x86::memchr2_sse2);
            }),
            memchr: x86::memchr_sse2,
        });
        // `target_feature!` checks the CPU (`None` without AVX2) and writes each adapter.
        let avx2: Option<(Adapter<Find>, Adapter<Find>, Adapter<Find2>)> = (|| {
            Some((
                static_call::target_feature!(MEMCHR, "avx2", x86::memchr_avx2)?,
                static_call::target_feature!(MEMRCHR, "avx2", x86::memrchr_avx2)?,
                static_call::target_feature!(MEMCHR2, "avx2", x86::memchr2_avx2)?,
            ))
        })();
        if let Some((find, rfind, find2)) = avx2 {
            sets.push(Targets {
                name: "avx2",
                install: Box::new(move || {
                    MEMCHR.update_adapter(find);
                    MEMRCHR.update_adapter(rfind);
                    MEMCHR2.update_adapter(find2);
                }),
                // The adapter's Rust function: the AVX2 searcher itself (the CPU was checked).
                memchr: find.function(),
            });
        }
    }
    sets
}

/// Pseudo-random lowercase text.
fn make_text(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b'a' + (state % 26) as u8
        })
        .collect()
}

/// Checks the installed targets against memchr's own functions. Returns the buffers checked.
fn check_installed(text: &[u8]) -> usize {
    let mut checked = 0;
    for offset in 0..8 {
        for len in 0..=300 {
            let hay = &text[offset..offset + len];
            for (n1, n2) in [(b'q', b'z'), (b'a', b'e'), (b'#', b'!')] {
                assert_eq!(static_call!(MEMCHR)(n1, hay), memchr::memchr(n1, hay));
                assert_eq!(static_call!(MEMRCHR)(n1, hay), memchr::memrchr(n1, hay));
                assert_eq!(
                    static_call!(MEMCHR2)(n1, n2, hay),
                    memchr::memchr2(n1, n2, hay)
                );
            }
            checked += 1;
        }
    }
    checked
}

/// `memchr` through a function pointer stored at run time: the usual dispatch without this crate.
static MEMCHR_PTR: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

fn memchr_through_pointer(n: u8, hay: &[u8]) -> Option<usize> {
    // SAFETY: MEMCHR_PTR only ever holds a `Find` (see `main`).
    let f = unsafe { core::mem::transmute::<*mut (), Find>(MEMCHR_PTR.load(Ordering::Relaxed)) };
    f(n, hay)
}

// One search loop per dispatch, never inlined, each a dependent chain (the next needle depends
// on the last result), so that every row times the same loop around a different call.

const SEARCHES: u64 = 400_000;

#[inline(never)]
fn loop_memchr(hay: &[u8]) -> usize {
    chain(hay, memchr::memchr)
}
#[inline(never)]
fn loop_static(hay: &[u8]) -> usize {
    chain(hay, |n, h| static_call!(MEMCHR)(n, h))
}
#[inline(never)]
fn loop_pointer(hay: &[u8]) -> usize {
    chain(hay, memchr_through_pointer)
}
#[inline(never)]
fn loop_tail_wrapper(hay: &[u8]) -> usize {
    chain(hay, find)
}

#[inline(always)]
fn chain(hay: &[u8], find: impl Fn(u8, &[u8]) -> Option<usize>) -> usize {
    let (mut needle, mut acc) = (b'z', 0usize);
    for _ in 0..SEARCHES {
        let r = find(needle, hay);
        needle = b'z' + r.is_none() as u8;
        acc = acc.wrapping_add(r.unwrap_or(0));
    }
    acc
}

/// Adds `ratio` to the row called `name`, made on first use (rows keep their first order).
fn push(rows: &mut Vec<(String, Vec<f64>)>, name: String, ratio: f64) {
    match rows.iter_mut().find(|(n, _)| *n == name) {
        Some(row) => row.1.push(ratio),
        None => rows.push((name, vec![ratio])),
    }
}

/// Nanoseconds per search of each loop, best of five rounds taken in turns.
fn ns_per_search(hay: &[u8], loops: &[fn(&[u8]) -> usize]) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; loops.len()];
    for _ in 0..5 {
        for (b, run) in best.iter_mut().zip(loops) {
            let start = Instant::now();
            black_box(run(black_box(hay)));
            *b = b.min(start.elapsed().as_nanos() as f64 / SEARCHES as f64);
        }
    }
    best
}

fn main() {
    println!("memchr_dispatch: memchr's searchers behind static calls");
    println!("=======================================================\n");

    let text = make_text(4096 + 64);
    let sets = available();
    let names: Vec<&str> = sets.iter().map(|s| s.name).collect();
    let mut checked = 0;
    for set in &sets {
        (set.install)();
        checked = check_installed(&text);
    }
    println!(
        "1. Targets this CPU can run: {} (each agrees with memchr's own functions on {checked}\n   \
         buffers, for memchr, memrchr and memchr2).",
        names.join(", ")
    );

    let best = sets.last().expect("the scalar set is always there");
    (best.install)();
    MEMCHR_PTR.store(black_box(best.memchr as *mut ()), Ordering::Relaxed);
    static_call::flush();
    let patching = static_call::status().patching;
    println!(
        "2. Installed at start-up: {} (the best this CPU has). Static calls here {}.\n",
        best.name,
        match patching {
            Ok(()) => "are patched into direct calls".to_string(),
            Err(why) => format!("are not patched ({why}): they go through the trampoline"),
        }
    );

    println!(
        "3. Nanoseconds per search (best of 5, dependent chain; the match is the last byte; the\n   \
         machine may be busy, so read the ratios, which compare runs of the same moment):\n"
    );
    let sizes = [16usize, 64, 4096];
    print!("   {:<34}", "dispatch");
    for len in sizes {
        print!(" {:>16}", format!("{len} B"));
    }
    println!();
    // Row 0: memchr::memchr itself; then the static call to each target, switched at run time
    // with `update`; then the AtomicPtr to the best target.
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut base = Vec::new();
    for len in sizes {
        let mut hay = text[..len].to_vec();
        hay[len - 1] = b'z';
        hay[..len - 1].iter_mut().for_each(|b| {
            if *b == b'z' {
                *b = b'y'
            }
        });
        for set in &sets {
            (set.install)();
            // The loop's site runs once and is patched before it is timed.
            loop_static(&hay[..1]);
            static_call::flush();
            let t = ns_per_search(&hay, &[loop_memchr, loop_static]);
            // Scaled to memchr::memchr timed in the same round.
            push(
                &mut rows,
                format!("static call -> {}", set.name),
                t[1] / t[0],
            );
        }
        (best.install)();
        let t = ns_per_search(&hay, &[loop_memchr, loop_pointer]);
        base.push(t[0]);
        push(
            &mut rows,
            format!("AtomicPtr<fn> -> {}", best.name),
            t[1] / t[0],
        );
        // The tail-call wrapper over the C-ABI key, holding the best searcher itself.
        let raw_best = raw::install_best();
        loop_tail_wrapper(&hay[..1]);
        static_call::flush();
        let t = ns_per_search(&hay, &[loop_memchr, loop_tail_wrapper]);
        push(
            &mut rows,
            format!("static_call_fn! memchr_raw -> {raw_best}"),
            t[1] / t[0],
        );
    }
    print!("   {:<34}", "memchr::memchr (its own dispatch)");
    for ns in &base {
        print!(" {:>16}", format!("{ns:.2} (1.00x)"));
    }
    println!();
    for (name, ratios) in &rows {
        print!("   {name:<34}");
        for (r, ns) in ratios.iter().zip(&base) {
            print!(" {:>16}", format!("{:.2} ({r:.2}x)", r * ns));
        }
        println!();
    }

    let sites = MEMCHR.sites();
    let patched = sites
        .iter()
        .filter(|s| s.state == SiteState::Patched)
        .count();
    println!(
        "\n   {patched} of the {} call sites of MEMCHR that ran are patched; every `update` above\n   \
         rewrote them all before returning.",
        sites.len()
    );
    let tail = MEMCHR_RAW.sites();
    println!(
        "   memchr_raw's body (a tail site): {:?}, so `find` is a `jmp` to the searcher.",
        tail.first().map(|s| s.state)
    );
    if patching.is_ok() {
        assert!(
            tail.iter().all(|s| s.state == SiteState::Patched),
            "the wrapper's site is patched: {tail:?}"
        );
    }
    println!(
        "\n   memchr::memchr loads a function pointer and calls it on every search; a static call\n   \
         to one of its searchers is a direct call of an adapter that calls the searcher. In a\n   \
         tight loop on a CPU that predicts the pointer they are close, and an AtomicPtr holding\n   \
         the searcher itself (no adapter frame) can be a little faster. With retpolines\n   \
         (scripts/bench.sh builds that too) every indirect call costs a thunk and the static\n   \
         call none (docs/benchmarks.md)."
    );
}
