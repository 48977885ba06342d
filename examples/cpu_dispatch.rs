//! CPU-feature dispatch through a static call: count the newlines in a buffer with the fastest
//! version this CPU can run (scalar, SSE2 or AVX2), chosen once at start-up, next to the
//! `AtomicPtr` dispatch that crates like memchr use.
//!
//! Run with `cargo run --release --example cpu_dispatch` (a debug build works too, but takes
//! many seconds and its timings mean little). It prints:
//! 1. the versions this CPU can run (each is first checked against the scalar one on buffers of
//!    every length up to 300 bytes at every alignment, and on long all-newline buffers), the one
//!    chosen, and whether static calls are patched into direct calls in this process;
//! 2. the number of newlines in buffers of 16 B, 64 B, 256 B and 1 MiB, counted through the
//!    static call and through the `AtomicPtr`: the two columns are equal (asserted);
//! 3. a timing table, measured now: nanoseconds per call through each dispatch on each buffer,
//!    and their ratio, then how many of `COUNT`'s call sites are patched. In a tight loop like
//!    this one the branch predictor always guesses the `AtomicPtr`'s target, so expect the two
//!    to be close (the text under the table says where a static call does win);
//! 4. how fast each version counts the 1 MiB buffer, which is why dispatching is worth it.
//!
//! It runs everywhere. On other architectures only the scalar version exists. Where static calls
//! are not patched the counts are the same, and section 3 says why and what the static-call
//! column measures instead: the trampoline (`STATIC_CALL_DISABLE=1`), slower than the
//! `AtomicPtr`, or, on platforms that use the portable fallback, an atomic load and an indirect
//! call, like the `AtomicPtr`.

use std::hint::black_box;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Instant;

use static_call::{Disabled, SiteState, define_static_call, static_call};

/// The type of every version: counts the bytes equal to `needle` among the `len` bytes at `ptr`.
///
/// `unsafe` because it reads through a raw pointer (a slice cannot be passed to a static call:
/// arguments must fit in registers); memchr's internal function pointers have the same shape.
type CountFn = unsafe extern "C" fn(*const u8, usize, u8) -> usize;

define_static_call!(
    /// The version `count_byte` calls: the portable one until `main` installs the best one.
    pub COUNT: unsafe extern "C" fn(*const u8, usize, u8) -> usize = count_scalar
);

/// Counts the bytes equal to `needle` in `haystack`, through the static call `COUNT`.
#[inline]
pub fn count_byte(haystack: &[u8], needle: u8) -> usize {
    // SAFETY: every version reads exactly the `haystack.len()` bytes at `haystack.as_ptr()`.
    unsafe { static_call!(COUNT)(haystack.as_ptr(), haystack.len(), needle) }
}

/// The same dispatch done the way memchr does it: a function pointer in an `AtomicPtr`, stored at
/// run time (so the compiler cannot turn it into a constant), loaded and called on every call.
static COUNT_PTR: AtomicPtr<()> = AtomicPtr::new(count_scalar as *mut ());

/// Counts the bytes equal to `needle` in `haystack`, through `COUNT_PTR`.
#[inline]
pub fn count_byte_atomic(haystack: &[u8], needle: u8) -> usize {
    let f = COUNT_PTR.load(Ordering::Relaxed);
    // SAFETY: COUNT_PTR only ever holds a `CountFn` (see `main`), and every version reads exactly
    // the `haystack.len()` bytes at `haystack.as_ptr()`.
    unsafe {
        let f = core::mem::transmute::<*mut (), CountFn>(f);
        f(haystack.as_ptr(), haystack.len(), needle)
    }
}

/// The portable version: a plain loop (which the compiler may vectorise for the baseline ISA).
///
/// # Safety
/// The `len` bytes at `ptr` must be readable.
unsafe extern "C" fn count_scalar(ptr: *const u8, len: usize, needle: u8) -> usize {
    // SAFETY: the caller guarantees that the `len` bytes at `ptr` are readable.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
    bytes.iter().filter(|&&b| b == needle).count()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD versions. Both compare a block of bytes with the needle (`pcmpeqb`: 0xff where
    //! equal, which is -1), subtract the result from per-byte counters (adding 1 per match), and
    //! every 255 blocks, before a counter could wrap, sum the counters with `psadbw`.

    use std::arch::x86_64::*;

    /// SSE2, 16 bytes per step. SSE2 is part of x86-64, so every x86-64 CPU can run this (the
    /// attribute is still needed to call SSE2 intrinsics without `unsafe`).
    ///
    /// # Safety
    /// The `len` bytes at `ptr` must be readable.
    #[target_feature(enable = "sse2")]
    pub unsafe extern "C" fn count_sse2(ptr: *const u8, len: usize, needle: u8) -> usize {
        let needles = _mm_set1_epi8(needle as i8);
        let mut total = 0;
        let mut i = 0;
        while len - i >= 16 {
            let blocks = ((len - i) / 16).min(255);
            let mut counters = _mm_setzero_si128();
            for _ in 0..blocks {
                // SAFETY: `i + 16 <= len`, and the caller guarantees `len` readable bytes.
                let bytes = unsafe { _mm_loadu_si128(ptr.add(i).cast()) };
                counters = _mm_sub_epi8(counters, _mm_cmpeq_epi8(bytes, needles));
                i += 16;
            }
            total += sum_u64s(_mm_sad_epu8(counters, _mm_setzero_si128()));
        }
        // SAFETY: the last `len - i` (< 16) bytes, readable as the caller guarantees.
        total + unsafe { super::count_scalar(ptr.add(i), len - i, needle) }
    }

    /// AVX2, 32 bytes per step.
    ///
    /// # Safety
    /// The CPU must support AVX2, and the `len` bytes at `ptr` must be readable.
    #[target_feature(enable = "avx2")]
    pub unsafe extern "C" fn count_avx2(ptr: *const u8, len: usize, needle: u8) -> usize {
        let needles = _mm256_set1_epi8(needle as i8);
        let mut total = 0;
        let mut i = 0;
        while len - i >= 32 {
            let blocks = ((len - i) / 32).min(255);
            let mut counters = _mm256_setzero_si256();
            for _ in 0..blocks {
                // SAFETY: `i + 32 <= len`, and the caller guarantees `len` readable bytes.
                let bytes = unsafe { _mm256_loadu_si256(ptr.add(i).cast()) };
                counters = _mm256_sub_epi8(counters, _mm256_cmpeq_epi8(bytes, needles));
                i += 32;
            }
            let sums = _mm256_sad_epu8(counters, _mm256_setzero_si256());
            let halves = _mm_add_epi64(
                _mm256_castsi256_si128(sums),
                _mm256_extracti128_si256::<1>(sums),
            );
            total += sum_u64s(halves);
        }
        // SAFETY: the last `len - i` (< 32) bytes, readable as the caller guarantees.
        total + unsafe { count_sse2(ptr.add(i), len - i, needle) }
    }

    /// The sum of the two 64-bit lanes of `v`.
    #[target_feature(enable = "sse2")]
    fn sum_u64s(v: __m128i) -> usize {
        (_mm_cvtsi128_si64(v) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(v, v))) as usize
    }
}

/// One version of the counter.
struct Version {
    name: &'static str,
    f: CountFn,
}

/// The versions this CPU can run, slowest first.
fn available_versions() -> Vec<Version> {
    #[allow(unused_mut)] // Only x86-64 adds versions.
    let mut versions = vec![Version {
        name: "scalar",
        f: count_scalar,
    }];
    #[cfg(target_arch = "x86_64")]
    {
        // SSE2 is always there on x86-64; the check is kept for symmetry.
        if is_x86_feature_detected!("sse2") {
            versions.push(Version {
                name: "sse2",
                f: x86::count_sse2,
            });
        }
        if is_x86_feature_detected!("avx2") {
            versions.push(Version {
                name: "avx2",
                f: x86::count_avx2,
            });
        }
    }
    versions
}

/// Calls `version` on `haystack` directly (no dispatch).
fn count_with(version: &Version, haystack: &[u8], needle: u8) -> usize {
    // SAFETY: `version` came from `available_versions`, so this CPU can run it, and it reads
    // exactly the bytes of `haystack`.
    unsafe { (version.f)(haystack.as_ptr(), haystack.len(), needle) }
}

/// Checks every version against the scalar one. Returns the number of buffers checked.
fn check_versions(versions: &[Version], text: &[u8]) -> usize {
    let all_newlines = vec![b'\n'; 20_000]; // long runs of matches: the counters' 255 limit
    let mut buffers: Vec<&[u8]> = vec![&all_newlines, &all_newlines[3..]];
    for offset in 0..32 {
        for len in 0..=300 {
            buffers.push(&text[offset..offset + len]);
        }
    }
    for buffer in &buffers {
        let expected = count_with(&versions[0], buffer, b'\n');
        for version in &versions[1..] {
            assert_eq!(
                count_with(version, buffer, b'\n'),
                expected,
                "{}",
                version.name
            );
        }
    }
    buffers.len()
}

/// Pseudo-random lowercase text with a newline every 40 bytes on average.
fn make_text(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            match state % 40 {
                0 => b'\n',
                r => b'a' + (r % 26) as u8,
            }
        })
        .collect()
}

/// Nanoseconds per call of `count` on `haystack`, over one run of many calls.
///
/// A first call runs this function's copy of the call site (if `count` is `count_byte`), and
/// `static_call::flush()` waits until it is patched, so the run times the patched site.
fn ns_per_call(count: impl Fn(&[u8], u8) -> usize, haystack: &[u8]) -> f64 {
    black_box(count(haystack, b'\n'));
    static_call::flush();
    let calls = if haystack.len() <= 4096 {
        1_000_000
    } else {
        (64 << 20) / haystack.len()
    };
    let start = Instant::now();
    let mut sum = 0;
    for _ in 0..calls {
        sum += count(black_box(haystack), b'\n');
    }
    black_box(sum);
    start.elapsed().as_nanos() as f64 / calls as f64
}

fn size_name(len: usize) -> String {
    if len >= 1 << 20 {
        format!("{} MiB", len >> 20)
    } else {
        format!("{len} B")
    }
}

fn main() {
    println!("cpu_dispatch: count newlines with the best code this CPU has");
    println!("============================================================\n");

    let text = make_text(1 << 20);
    let versions = available_versions();
    let checked = check_versions(&versions, &text);
    let best = versions.last().expect("the scalar version is always there");

    // The whole point: choose once, then every call goes straight to the chosen version.
    COUNT.update(best.f);
    COUNT_PTR.store(best.f as *mut (), Ordering::Relaxed);

    let names: Vec<&str> = versions.iter().map(|v| v.name).collect();
    println!(
        "1. Versions this CPU can run: {} (all agree with scalar on {checked} buffers).",
        names.join(", ")
    );
    println!(
        "   Chosen once at start-up: {0}. `COUNT.update(count_{0})` installed it in the static",
        best.name
    );
    println!("   call, `COUNT_PTR.store(..)` in the AtomicPtr.\n");

    let sizes = [16, 64, 256, 1 << 20];
    println!("2. Newlines counted through each dispatch (asserted equal):\n");
    println!(
        "   {:>8} {:>13} {:>13}",
        "buffer", "static call", "AtomicPtr"
    );
    for &len in &sizes {
        let haystack = &text[..len];
        let through_static = count_byte(haystack, b'\n');
        let through_atomic = count_byte_atomic(haystack, b'\n');
        assert_eq!(through_static, through_atomic);
        println!(
            "   {:>8} {through_static:>13} {through_atomic:>13}",
            size_name(len)
        );
    }

    println!(
        "\n3. Nanoseconds per call, measured now (best of 5; the machine may be busy, so read the\n   \
         ratio, which compares runs of the same moment)."
    );
    // Asked after the first static calls, which initialise the library (and read
    // STATIC_CALL_DISABLE).
    let patching = static_call::status().patching;
    match patching {
        Ok(()) => println!(
            "   Static calls are patched in this process: each site is `call count_{}`.\n",
            best.name
        ),
        Err(Disabled::Unsupported) => println!(
            "   This build uses the portable fallback, where a static call is an atomic load and an\n   \
             indirect call: the AtomicPtr pattern itself, so expect the same times.\n"
        ),
        Err(why) => println!(
            "   Static calls are NOT patched in this process ({why}):\n   \
             they stay correct but go through the trampoline, so expect them to be slower than\n   \
             the AtomicPtr here.\n"
        ),
    }
    println!(
        "   {:>8} {:>13} {:>13} {:>22}",
        "buffer", "static call", "AtomicPtr", "AtomicPtr/static call"
    );
    for &len in &sizes {
        let haystack = &text[..len];
        // Best of five rounds, each timing both, so that a slow moment of the machine does not
        // fall on one of them only.
        let (mut through_static, mut through_atomic) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            through_static = through_static.min(ns_per_call(count_byte, haystack));
            through_atomic = through_atomic.min(ns_per_call(count_byte_atomic, haystack));
        }
        println!(
            "   {:>8} {through_static:>13.2} {through_atomic:>13.2} {:>21.2}x",
            size_name(len),
            through_atomic / through_static
        );
    }

    let sites = COUNT.sites();
    let patched = sites
        .iter()
        .filter(|site| site.state == SiteState::Patched)
        .count();
    if !sites.is_empty() {
        println!(
            "\n   {patched} of the {} call sites of COUNT that ran are patched (from `COUNT.sites()`):\n   \
             there is one `static_call!` in the source, but the compiler inlined `count_byte` into\n   \
             several places, and each inlined copy is a call site of its own.",
            sites.len()
        );
    }
    if patching.is_ok() {
        println!(
            "\n   A correctly predicted indirect call is cheap, so in this loop the two are close.\n   \
         A static call saves the load of the pointer and the indirect branch. That shows when\n   \
         the pointer's cache line is cold, when the branch predictor misses (big programs), and\n   \
         under Spectre-v2 mitigations (retpolines), which is why the Linux kernel uses them."
        );
    }

    println!("\n4. Each version on the 1 MiB buffer, called directly:\n");
    let best_of_3 = |version: &Version| {
        (0..3)
            .map(|_| ns_per_call(|h, n| count_with(version, h, n), &text))
            .fold(f64::INFINITY, f64::min)
    };
    let scalar_ns = best_of_3(&versions[0]);
    for version in &versions {
        let ns = best_of_3(version);
        println!(
            "   {:<8} {:>7.2} GB/s {:>7.1}x scalar",
            version.name,
            text.len() as f64 / ns,
            scalar_ns / ns
        );
    }
}
