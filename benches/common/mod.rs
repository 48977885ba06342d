//! Helpers shared by the bench binaries: the trivial targets, finding a site's `call` in machine
//! code, and reading what the kernel says about this process (mappings, resident memory).
#![allow(dead_code)]

use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic};
use std::time::Duration;

/// The criterion settings of the per-call benches: short warm-up and measurement (the totals
/// matter less than the ratios within a run), overridable from the command line.
pub fn criterion_config() -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40)
        .configure_from_args()
}

/// The trivial target every per-call bench calls: one `lea` and a `ret`.
#[inline(never)]
pub extern "C" fn inc(x: u64) -> u64 {
    x.wrapping_add(1)
}

/// A second target of the same cost, for updates.
#[inline(never)]
pub extern "C" fn dec(x: u64) -> u64 {
    x.wrapping_sub(1)
}

/// Calls per criterion iteration in the single-site benches: the time criterion reports, divided
/// by this, is the time per call (the loop counter runs in parallel with the call chain).
pub const CHAIN: u64 = 1000;

/// A function pointer's address.
pub fn addr<T: Copy>(f: T) -> usize {
    assert_eq!(size_of::<T>(), size_of::<usize>());
    // SAFETY: same size; a function pointer's bits are its address.
    unsafe { core::mem::transmute_copy(&f) }
}

/// Reads `len` code bytes at `at` (volatile: the patcher may be rewriting them).
pub fn read_code(at: usize, len: usize) -> Vec<u8> {
    (0..len)
        // SAFETY: callers pass addresses inside mapped code (a function's body).
        .map(|i| unsafe { core::ptr::read_volatile((at + i) as *const u8) })
        .collect()
}

/// The target of the `call rel32` at `site`, or `None` if the bytes there are something else.
pub fn call_target(site: usize) -> Option<usize> {
    let bytes = read_code(site, 5);
    let insn = Decoder::with_ip(64, &bytes, site as u64, DecoderOptions::NONE).decode();
    (insn.code() == Code::Call_rel32_64).then(|| insn.near_branch64() as usize)
}

/// Every `call` in `func` (decoded up to its first `ret`, at most `len` bytes) that goes to `to`
/// and lies inside one aligned quadword (at offset 0-3 of it), as static-call sites do.
pub fn calls_to(func: usize, len: usize, to: usize) -> Vec<usize> {
    let bytes = read_code(func, len);
    let mut out = Vec::new();
    for insn in Decoder::with_ip(64, &bytes, func as u64, DecoderOptions::NONE).iter() {
        if insn.code() == Code::Call_rel32_64
            && insn.near_branch64() as usize == to
            && insn.ip() % 8 <= 3
        {
            out.push(insn.ip() as usize);
        }
        if insn.mnemonic() == Mnemonic::Ret {
            break;
        }
    }
    out
}

/// Number of mappings (VMAs) of this process.
pub fn vma_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// A field of /proc/self/status, in KiB (`VmRSS`, `RssAnon`, `RssFile`).
pub fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Percentile of a sorted slice (nearest rank).
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Panics unless every site of a key is patched: a per-call bench of a "patched" site that is
/// not patched would be a lie.
pub fn assert_all_patched(what: &str, sites: &[static_call::SiteInfo]) {
    assert!(!sites.is_empty(), "{what}: no site registered");
    for s in sites {
        assert_eq!(
            s.state,
            static_call::SiteState::Patched,
            "{what}: site {:#x} is not patched ({:?}); status: {:?}",
            s.address,
            s.state,
            static_call::status()
        );
    }
}
