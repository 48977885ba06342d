//! Rust functions as targets: keys of Rust function types, every class of argument and result,
//! panics that propagate with their payload, exact drop counts, and every kind of key and target.
//!
//! Each signature class is checked three ways: through the trampoline (the first call), patched
//! (the site decoded after `flush`, calling the key's adapter), and after `update`. Every
//! position gets a distinct value, so that a mix-up of registers changes the result.

mod common;

use std::hint::black_box;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{
    addr, assert_calls, assert_site_patched_to_func, assert_sites_hold, func_of, only_site,
    patching, trampoline, word_of,
};
use static_call::{
    Batch, StaticCall, StaticCallKey, Target, define_static_call, static_call, target_feature,
    unsafe_target,
};

/// The payload of a panic, as text.
fn message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => s.to_string(),
            Err(_) => "<not a string>".to_string(),
        },
    }
}

/// Runs `f` and returns the message of its panic.
fn panic_message<R>(f: impl FnOnce() -> R) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("expected a panic"),
        Err(payload) => message(payload),
    }
}

/// A value that counts its drops.
#[derive(Debug)]
struct Counted {
    id: u32,
    drops: &'static AtomicUsize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

// --- layout ------------------------------------------------------------------------------------

#[test]
fn rust_keys_are_24_bytes_and_extern_c_keys_stay_16() {
    assert_eq!(size_of::<StaticCall<fn(u64) -> u64>>(), 24);
    assert_eq!(size_of::<StaticCall<unsafe fn(&'static str)>>(), 24);
    assert_eq!(size_of::<StaticCall<extern "C-unwind" fn(u8) -> u8>>(), 24);
    assert_eq!(size_of::<StaticCall<extern "C" fn(u64) -> u64>>(), 16);
    assert_eq!(size_of_val(&FIND), 24);
}

// --- the motivating signature: memchr's ------------------------------------------------------

fn find_scalar(n: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == n)
}
define_static_call!(pub FIND: fn(u8, &[u8]) -> Option<usize> = find_scalar);

#[test]
fn a_slice_and_an_option_through_a_patched_site() {
    let f = black_box(static_call!(FIND));
    assert_site_patched_to_func(f, &*FIND, || assert_eq!(f(b'x', b"abxd"), Some(2)));
    assert_eq!(f(b'x', b"abxd"), Some(2));
    assert_eq!(f(b'z', b"abxd"), None);
    // The site calls the adapter; `query()` returns a Rust function of the key's type.
    assert_ne!(func_of(&*FIND), word_of(&*FIND));
    assert_eq!((FIND.query())(b'd', b"abxd"), Some(3));
    FIND.update(|n, h| h.iter().rposition(|&b| b == n)); // argument types inferred
    assert_eq!(f(b'x', b"xax"), Some(2));
    if patching() {
        let site = only_site(addr(f), FIND.as_ptr() as usize);
        assert_calls(site, func_of(&*FIND), "the closure's adapter");
    }
    FIND.update(find_scalar);
    assert_eq!(f(b'x', b"xax"), Some(0));
}

// --- scalars of every width, and bool/char results --------------------------------------------

fn narrow(a: u8, b: i16, c: bool, d: char, e: u32, f: i64) -> i64 {
    a as i64 + 3 * b as i64 + 5 * c as i64 + 7 * d as i64 + 11 * e as i64 + 13 * f
}
define_static_call!(NARROW: fn(u8, i16, bool, char, u32, i64) -> i64 = narrow);
define_static_call!(IS_EVEN: fn(u64) -> bool = |x| x % 2 == 0);
define_static_call!(NEXT_CHAR: fn(char) -> char = |c| char::from_u32(c as u32 + 1).unwrap());

#[test]
fn integers_of_every_width_bool_and_char() {
    let f = black_box(static_call!(NARROW));
    let args = (250, -300, true, 'Ω', 4_000_000_000, -5_000_000_000);
    let expected = narrow(args.0, args.1, args.2, args.3, args.4, args.5);
    assert_site_patched_to_func(f, &*NARROW, || {
        assert_eq!(f(args.0, args.1, args.2, args.3, args.4, args.5), expected)
    });
    assert_eq!(f(args.0, args.1, args.2, args.3, args.4, args.5), expected);
    NARROW.update(|a, b, c, d, e, f| -narrow(a, b, c, d, e, f));
    assert_eq!(f(args.0, args.1, args.2, args.3, args.4, args.5), -expected);

    let even = black_box(static_call!(IS_EVEN));
    assert_site_patched_to_func(even, &*IS_EVEN, || assert!(even(4)));
    assert!(!even(7));
    let next = black_box(static_call!(NEXT_CHAR));
    assert_site_patched_to_func(next, &*NEXT_CHAR, || assert_eq!(next('λ'), 'μ'));
    assert_eq!(next('y'), 'z');
}

// --- floats: in xmm registers, more than eight spill -----------------------------------------

#[allow(clippy::too_many_arguments)]
fn weigh(a: f32, b: f64, i: u8, c: f32, d: f64) -> f64 {
    a as f64 + 2.0 * b + 4.0 * i as f64 + 8.0 * c as f64 + 16.0 * d
}
define_static_call!(WEIGH: fn(f32, f64, u8, f32, f64) -> f64 = weigh);

#[allow(clippy::too_many_arguments)]
fn ten_floats(
    a: f64,
    b: f32,
    c: f64,
    d: f32,
    e: f64,
    f: f32,
    g: f64,
    h: f32,
    i: f64,
    j: f32,
) -> f32 {
    let all = [
        a, b as f64, c, d as f64, e, f as f64, g, h as f64, i, j as f64,
    ];
    all.iter()
        .enumerate()
        .map(|(k, v)| v * (k + 1) as f64)
        .sum::<f64>() as f32
}
define_static_call!(TEN_FLOATS: fn(f64, f32, f64, f32, f64, f32, f64, f32, f64, f32) -> f32 = ten_floats);

#[test]
fn floats_in_xmm_registers_and_more_than_eight() {
    let f = black_box(static_call!(WEIGH));
    let expected = weigh(1.5, 2.25, 3, 4.125, 5.0625);
    assert_site_patched_to_func(f, &*WEIGH, || {
        assert_eq!(f(1.5, 2.25, 3, 4.125, 5.0625), expected)
    });
    assert_eq!(f(1.5, 2.25, 3, 4.125, 5.0625), expected);

    let g = black_box(static_call!(TEN_FLOATS));
    let args = (0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5);
    let expected = ten_floats(
        args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9,
    );
    assert_site_patched_to_func(g, &*TEN_FLOATS, || {
        let r = g(
            args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9,
        );
        assert_eq!(r, expected)
    });
    let r = g(
        args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9,
    );
    assert_eq!(r, expected);
}

// --- more arguments than registers; large arguments by pointer -------------------------------

#[allow(clippy::too_many_arguments)]
fn eight_ints(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, g: u64, h: u64) -> u64 {
    [a, b, c, d, e, f, g, h]
        .iter()
        .enumerate()
        .map(|(k, v)| v << (8 * k))
        .sum()
}
define_static_call!(EIGHT: fn(u64, u64, u64, u64, u64, u64, u64, u64) -> u64 = eight_ints);

fn strings(a: String, b: String, c: &str, d: String, e: String, f: String) -> String {
    [a, b, c.to_string(), d, e, f].join("|")
}
define_static_call!(STRINGS: fn(String, String, &str, String, String, String) -> String = strings);

#[test]
fn more_arguments_than_registers() {
    let f = black_box(static_call!(EIGHT));
    let expected = eight_ints(1, 2, 3, 4, 5, 6, 7, 8);
    assert_site_patched_to_func(f, &*EIGHT, || {
        assert_eq!(f(1, 2, 3, 4, 5, 6, 7, 8), expected)
    });
    assert_eq!(f(1, 2, 3, 4, 5, 6, 7, 8), expected);
    EIGHT.update(|a, _, _, _, _, _, _, h| a * 100 + h);
    assert_eq!(f(1, 2, 3, 4, 5, 6, 7, 8), 108);

    // Five 24-byte `String`s by pointer and a 16-byte `&str`: seven registers' worth.
    let g = black_box(static_call!(STRINGS));
    let s = |x: &str| x.to_string();
    assert_site_patched_to_func(g, &*STRINGS, || {
        assert_eq!(
            g(s("a"), s("b"), "c", s("d"), s("e"), s("f")),
            "a|b|c|d|e|f"
        )
    });
    assert_eq!(
        g(s("1"), s("2"), "3", s("4"), s("5"), s("6")),
        "1|2|3|4|5|6"
    );
}

// --- Option, Result, tuples, u128, structs by value, zero-sized values ------------------------

fn parse(s: Option<&str>) -> Result<u32, String> {
    match s {
        Some(s) => s.parse().map_err(|e| format!("{s:?}: {e}")),
        None => Err("nothing".to_string()),
    }
}
define_static_call!(PARSE: fn(Option<&str>) -> Result<u32, String> = parse);

fn split(t: (u8, u16, u32)) -> (u64, u64) {
    (t.0 as u64 + t.1 as u64, t.2 as u64 * 2)
}
define_static_call!(SPLIT: fn((u8, u16, u32)) -> (u64, u64) = split);

fn wide(a: u128, b: i128) -> u128 {
    a.wrapping_mul(3).wrapping_add(b as u128)
}
define_static_call!(WIDE: fn(u128, i128) -> u128 = wide);

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Big([u64; 8]);
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    a: u32,
    b: u8,
}

fn reverse(big: Big, p: Pair) -> Big {
    let mut r = big.0;
    r.reverse();
    r[0] += p.a as u64 * 1000 + p.b as u64;
    Big(r)
}
define_static_call!(REVERSE: fn(Big, Pair) -> Big = reverse);

fn zsts(_: (), p: PhantomData<u8>, x: u8) -> ((), PhantomData<u8>, u8) {
    ((), p, x + 1)
}
define_static_call!(ZSTS: fn((), PhantomData<u8>, u8) -> ((), PhantomData<u8>, u8) = zsts);

#[test]
fn options_results_tuples_wide_integers_and_structs_by_value() {
    let f = black_box(static_call!(PARSE));
    assert_site_patched_to_func(f, &*PARSE, || assert_eq!(f(Some("42")), Ok(42)));
    assert_eq!(f(None), Err("nothing".to_string()));
    assert!(f(Some("x")).unwrap_err().starts_with("\"x\""));

    let g = black_box(static_call!(SPLIT));
    assert_site_patched_to_func(g, &*SPLIT, || assert_eq!(g((1, 2, 3)), (3, 6)));
    assert_eq!(g((250, 60000, 4_000_000_000)), (60250, 8_000_000_000));

    let h = black_box(static_call!(WIDE));
    let (a, b) = (u128::MAX / 5 + 7, -(1i128 << 100));
    assert_site_patched_to_func(h, &*WIDE, || assert_eq!(h(a, b), wide(a, b)));
    assert_eq!(h(a, b), wide(a, b));

    let r = black_box(static_call!(REVERSE));
    let big = Big([1, 2, 3, 4, 5, 6, 7, 8]);
    let p = Pair { a: 9, b: 10 };
    assert_site_patched_to_func(r, &*REVERSE, || assert_eq!(r(big, p), reverse(big, p)));
    assert_eq!(r(big, p), Big([9018, 7, 6, 5, 4, 3, 2, 1]));

    let z = black_box(static_call!(ZSTS));
    assert_site_patched_to_func(z, &*ZSTS, || {
        assert_eq!(z((), PhantomData, 1), ((), PhantomData, 2))
    });
}

// --- borrows: &mut, results borrowed from arguments, several named lifetimes ------------------

fn push_all(v: &mut Vec<u32>, n: u32) -> usize {
    v.extend(0..n);
    v.len()
}
define_static_call!(PUSH: fn(&mut Vec<u32>, u32) -> usize = push_all);

fn trim_first(s: &str) -> &str {
    &s[1..]
}
define_static_call!(TRIM: fn(&str) -> &str = trim_first);

pub struct Record<'a> {
    name: &'a str,
    tags: &'a [&'a str],
}

fn first_tag<'a, 'b>(r: &'a Record<'b>, fallback: &'a str) -> &'a str {
    r.tags.first().copied().unwrap_or(fallback)
}
fn name_of<'a, 'b>(r: &'a Record<'b>, _: &'a str) -> &'a str {
    r.name
}
define_static_call!(TAG: for<'a, 'b> fn(&'a Record<'b>, &'a str) -> &'a str = first_tag);

#[test]
fn borrowed_arguments_and_results_borrowed_from_them() {
    let f = black_box(static_call!(PUSH));
    let mut v = vec![7];
    assert_site_patched_to_func(f, &*PUSH, || assert_eq!(f(&mut v, 3), 4));
    assert_eq!(v, [7, 0, 1, 2]);

    let t = black_box(static_call!(TRIM));
    let owned = String::from("xhello");
    assert_site_patched_to_func(t, &*TRIM, || assert_eq!(t(&owned), "hello"));
    let back = t(&owned);
    assert!(std::ptr::eq(back.as_ptr(), owned[1..].as_ptr()));
    TRIM.update(|s| s.trim_end_matches('o'));
    assert_eq!(t("hellooo"), "hell");

    let tags = ["fast", "safe"];
    let r = Record {
        name: "static_call",
        tags: &tags,
    };
    let g = black_box(static_call!(TAG));
    assert_site_patched_to_func(g, &*TAG, || assert_eq!(g(&r, "none"), "fast"));
    TAG.update(name_of);
    assert_eq!(g(&r, "none"), "static_call");
    let empty = Record {
        name: "",
        tags: &[],
    };
    TAG.update(first_tag);
    assert_eq!(g(&empty, "none"), "none");
}

// --- unsafe fn and extern "C-unwind" keys -----------------------------------------------------

/// # Safety
/// `i < v.len()`.
unsafe fn get_unchecked(v: &[u8], i: usize) -> u8 {
    // SAFETY: the caller's promise.
    unsafe { *v.get_unchecked(i) }
}
define_static_call!(GET: unsafe fn(&[u8], usize) -> u8 = |v, i| v[i]);

extern "C-unwind" fn c_unwind_double(x: i32) -> i32 {
    if x < 0 {
        panic!("negative: {x}");
    }
    2 * x
}
// An `extern "C-unwind"` function item is not `Fn` (Rust gives only Rust-ABI functions the `Fn`
// traits): it becomes a target through a closure, which inlines to nothing.
define_static_call!(C_UNWIND: extern "C-unwind" fn(i32) -> i32 = |x| c_unwind_double(x));
define_static_call!(UNSAFE_C_UNWIND: unsafe extern "C-unwind" fn(u8) -> u8 = |x| x ^ 0xff);

#[test]
fn unsafe_and_c_unwind_keys() {
    let f = black_box(static_call!(GET));
    // SAFETY: the index is in bounds.
    assert_site_patched_to_func(f, &*GET, || assert_eq!(unsafe { f(&[1, 2, 3], 2) }, 3));
    // SAFETY: `GET`'s callers promise an index in bounds, as `get_unchecked` needs.
    GET.update_adapter(unsafe { unsafe_target!(GET, get_unchecked) });
    // SAFETY: in bounds.
    assert_eq!(unsafe { f(&[4, 5, 6], 1) }, 5);
    if patching() {
        let site = only_site(addr(f), GET.as_ptr() as usize);
        assert_calls(site, func_of(&*GET), "the unsafe target's adapter");
    }
    assert_eq!(
        GET.query() as usize,
        get_unchecked as unsafe fn(&[u8], usize) -> u8 as usize
    );

    let g = black_box(static_call!(C_UNWIND));
    assert_site_patched_to_func(g, &*C_UNWIND, || assert_eq!(g(21), 42));
    assert_eq!(panic_message(|| g(-1)), "negative: -1");
    assert_eq!(C_UNWIND.call(4), 8);

    let h = black_box(static_call!(UNSAFE_C_UNWIND));
    // SAFETY: the target has no precondition.
    assert_site_patched_to_func(h, &*UNSAFE_C_UNWIND, || {
        assert_eq!(unsafe { h(0x0f) }, 0xf0)
    });
}

// --- panics: payload, drops, nesting, and the site keeps working ------------------------------

fn boom(x: u32) -> u32 {
    if x == 13 {
        panic!("unlucky {x}");
    }
    x
}
define_static_call!(BOOM: fn(u32) -> u32 = boom);

#[derive(Debug, PartialEq)]
struct Custom(u64);
define_static_call!(CUSTOM: fn() = || std::panic::panic_any(Custom(77)));

#[test]
fn a_panic_unwinds_to_the_caller_with_its_payload() {
    let f = black_box(static_call!(BOOM));
    // The first call panics: the payload comes back through the trampoline path too.
    assert_eq!(panic_message(|| f(13)), "unlucky 13");
    static_call::flush();
    assert_eq!(panic_message(|| f(13)), "unlucky 13");
    assert_eq!(f(12), 12, "the site works after a panic");
    if patching() {
        let site = only_site(addr(f), BOOM.as_ptr() as usize);
        assert_calls(site, func_of(&*BOOM), "boom's adapter");
    }
    let payload = catch_unwind(|| static_call!(CUSTOM)()).unwrap_err();
    assert_eq!(payload.downcast_ref::<Custom>(), Some(&Custom(77)));
}

#[test]
#[should_panic(expected = "unlucky 13")]
fn should_panic_sees_the_targets_panic() {
    static_call!(BOOM)(13);
}

/// A result equal to the panic sentinel (or whatever rax holds for a result not in rax) is
/// returned as it is: only a stashed payload means a panic.
#[test]
fn a_result_equal_to_the_sentinel_is_a_result() {
    define_static_call!(SENTINEL_LIKE: fn(u64) -> u64 = |x| x);
    let f = black_box(static_call!(SENTINEL_LIKE));
    let sentinel = 0xffff_ffff_9e37_79b9;
    assert_eq!(f(sentinel), sentinel);
    static_call::flush();
    assert_eq!(f(sentinel), sentinel);
    assert_eq!(f(1), 1);
}

static NEST_DROPS: AtomicUsize = AtomicUsize::new(0);
fn inner(c: Counted) -> u32 {
    if c.id == 0 {
        panic!("inner {}", c.id);
    }
    c.id
}
define_static_call!(INNER: fn(Counted) -> u32 = inner);
define_static_call!(OUTER: fn(Counted, Counted) -> u32 = |a, b| static_call!(INNER)(a) + b.id);

#[test]
fn a_panic_crosses_nested_static_calls_and_drops_each_argument_once() {
    let c = |id| Counted {
        id,
        drops: &NEST_DROPS,
    };
    assert_eq!(static_call!(OUTER)(c(1), c(2)), 3);
    assert_eq!(NEST_DROPS.load(Ordering::SeqCst), 2);
    static_call::flush();
    assert_eq!(panic_message(|| static_call!(OUTER)(c(0), c(5))), "inner 0");
    assert_eq!(
        NEST_DROPS.load(Ordering::SeqCst),
        4,
        "both arguments dropped once, by the unwinding"
    );
}

static BY_VALUE_DROPS: AtomicUsize = AtomicUsize::new(0);
fn keep_second(a: Counted, b: Counted, s: String) -> Counted {
    assert_eq!(s, "payload");
    if a.id == b.id {
        panic!("same");
    }
    b
}
define_static_call!(KEEP: fn(Counted, Counted, String) -> Counted = keep_second);

#[test]
fn by_value_arguments_and_results_are_dropped_exactly_once() {
    let c = |id| Counted {
        id,
        drops: &BY_VALUE_DROPS,
    };
    let kept = static_call!(KEEP)(c(1), c(2), "payload".to_string());
    assert_eq!((kept.id, BY_VALUE_DROPS.load(Ordering::SeqCst)), (2, 1));
    drop(kept);
    assert_eq!(BY_VALUE_DROPS.load(Ordering::SeqCst), 2);
    static_call::flush();
    let _ = panic_message(|| static_call!(KEEP)(c(3), c(3), "payload".to_string()));
    assert_eq!(BY_VALUE_DROPS.load(Ordering::SeqCst), 4);
    let kept = static_call!(KEEP)(c(4), c(5), "payload".to_string());
    drop(kept);
    assert_eq!(BY_VALUE_DROPS.load(Ordering::SeqCst), 6);
}

// --- targets: closures, the pointer path, #[target_feature] -----------------------------------

define_static_call!(OP: fn(u64) -> u64 = |x| x + 1);

fn triple(x: u64) -> u64 {
    3 * x
}
fn negate(x: u64) -> u64 {
    x.wrapping_neg()
}

#[test]
fn a_closure_that_captures_a_zero_sized_copy_value_is_a_target() {
    let f = triple; // a function item: zero-sized and `Copy`
    OP.update(move |x| f(x) + 1);
    assert_eq!(static_call!(OP)(2), 7);
}

define_static_call!(PTR: fn(u64) -> u64 = |x| x + 1);

#[test]
fn a_function_pointer_chosen_at_run_time_takes_the_pointer_path() {
    let f = black_box(static_call!(PTR));
    assert_site_patched_to_func(f, &*PTR, || assert_eq!(f(1), 2));
    let table: [fn(u64) -> u64; 2] = [triple, negate];
    PTR.update_pointer(table[black_box(0)]);
    assert_eq!(f(5), 15);
    assert_eq!(
        PTR.query() as usize,
        table[0] as usize,
        "query() is the pointer"
    );
    let stub = func_of(&*PTR);
    if patching() {
        let site = only_site(addr(f), PTR.as_ptr() as usize);
        assert_calls(site, stub, "the pointer stub");
    }
    // Another pointer: only the word changes; sites keep calling the stub.
    PTR.update_pointer(table[black_box(1)]);
    assert_eq!(func_of(&*PTR), stub);
    assert_eq!(f(5), 5u64.wrapping_neg());
    PTR.update_pointer(|x| {
        if x == 0 {
            panic!("zero through a pointer")
        }
        x
    });
    assert_eq!(panic_message(|| f(0)), "zero through a pointer");
    // Back to a function item: the adapter again.
    PTR.update(triple);
    assert_ne!(func_of(&*PTR), stub);
    assert_eq!(f(2), 6);
}

#[cfg(target_arch = "x86_64")]
mod features {
    use super::*;

    /// Sums bytes with AVX2 where the CPU has it (the caller checks).
    #[target_feature(enable = "avx2")]
    pub fn sum_avx2(v: &[u8]) -> u64 {
        v.iter().map(|&b| b as u64).sum::<u64>() + 1_000_000
    }
    #[target_feature(enable = "sse2")]
    pub fn sum_sse2(v: &[u8]) -> u64 {
        v.iter().map(|&b| b as u64).sum::<u64>() + 2_000_000
    }
    pub fn sum_scalar(v: &[u8]) -> u64 {
        v.iter().map(|&b| b as u64).sum()
    }

    define_static_call!(pub SUM: fn(&[u8]) -> u64 = sum_scalar);

    #[test]
    fn target_feature_functions_through_their_own_adapters() {
        let f = black_box(static_call!(SUM));
        assert_site_patched_to_func(f, &*SUM, || assert_eq!(f(&[1, 2, 3]), 6));
        // SSE2 is part of x86-64: the checked form always finds it.
        let sse2 = target_feature!(SUM, "sse2", sum_sse2).expect("x86-64 has SSE2");
        SUM.update_adapter(sse2);
        assert_eq!(f(&[1, 2, 3]), 2_000_006);
        if patching() {
            let site = only_site(addr(f), SUM.as_ptr() as usize);
            assert_calls(site, func_of(&*SUM), "the #[target_feature] adapter");
        }
        match target_feature!(SUM, ["avx2", "sse2"], sum_avx2) {
            Some(avx2) => {
                assert!(std::is_x86_feature_detected!("avx2"));
                SUM.update_adapter(avx2);
                assert_eq!(f(&[1, 2, 3]), 1_000_006);
            }
            None => assert!(!std::is_x86_feature_detected!("avx2")),
        }
        // SAFETY: every x86-64 CPU has SSE2.
        let unchecked = unsafe { target_feature!(unchecked SUM, "sse2", sum_sse2) };
        Batch::new().update_adapter(&SUM, unchecked).commit();
        assert_eq!(f(&[1]), 2_000_001);
    }
}

// --- every kind of key -------------------------------------------------------------------------

fn plus_ten(x: u64) -> u64 {
    x + 10
}

pub struct Ops {
    scale: StaticCall<fn(f64, f64) -> f64>,
    name: StaticCall<fn(u32) -> String>,
    hook: StaticCall<fn(&'static str)>,
}
static OPS: Ops = Ops {
    scale: StaticCall::to(|x: f64, k: f64| x * k),
    name: StaticCall::to(|n: u32| format!("#{n}")),
    hook: StaticCall::null(),
};

#[test]
fn struct_field_keys() {
    let f = black_box(static_call!(OPS.scale));
    assert_site_patched_to_func(f, &OPS.scale, || assert_eq!(f(1.5, 4.0), 6.0));
    OPS.scale.update(|x, k| x / k);
    assert_eq!(f(1.5, 4.0), 0.375);
    let g = black_box(static_call!(OPS.name));
    assert_site_patched_to_func(g, &OPS.name, || assert_eq!(g(7), "#7"));
    assert_eq!(OPS.hook.target(), Target::Null);
    static_call!(OPS.hook)("nothing happens");
}

define_static_call!(GEN_A: fn(u64) -> u64 = triple);
define_static_call!(GEN_B: fn(u64) -> u64 = plus_ten);

#[inline(never)]
fn generic<K: StaticCallKey<Fn = fn(u64) -> u64>>(x: u64) -> u64 {
    static_call!(<K>)(x)
}

#[test]
fn generic_keys_bind_each_copy_to_its_own_key() {
    assert_eq!(generic::<GEN_A>(2), 6);
    assert_eq!(generic::<GEN_B>(2), 12);
    static_call::flush();
    common::assert_sites_call(|| GEN_A.sites(), func_of(&*GEN_A), "GEN_A's adapter");
    common::assert_sites_call(|| GEN_B.sites(), func_of(&*GEN_B), "GEN_B's adapter");
    GEN_B.update(negate);
    assert_eq!(generic::<GEN_B>(2), 2u64.wrapping_neg());
    assert_eq!(generic::<GEN_A>(2), 6);
}

type Op = fn(u64) -> u64;
define_static_call!(ALIASED: Op = triple);

type U64Key = StaticCall<fn(u64) -> u64>;
static RUN_TIME: [U64Key; 2] = [StaticCall::to(triple), StaticCall::to(negate)];

#[test]
fn an_aliased_signature_and_run_time_keys() {
    let f = black_box(static_call!(ALIASED));
    assert_site_patched_to_func(f, &*ALIASED, || assert_eq!(f(3), 9));
    ALIASED.update(|x| x * 4);
    assert_eq!(f(3), 12);
    // A key known only at run time: `key.call`, an indirect call of `query()`.
    for (i, key) in RUN_TIME.iter().enumerate() {
        let key = black_box(key);
        assert_eq!(key.call(5), [15, 5u64.wrapping_neg()][i]);
    }
    assert_eq!(OP.call(3), OP.query()(3));
    // A borrowing signature has no `call` (elision would tie the result to the key): `query`.
    assert_eq!((FIND.query())(b'b', b"ab"), Some(1));
    assert_eq!(
        (TAG.query())(
            &Record {
                name: "n",
                tags: &[]
            },
            "fb"
        ),
        "fb"
    );
    assert!(
        RUN_TIME[0].sites().is_empty(),
        "a run-time call registers no site"
    );
}

// --- no target, return zero -------------------------------------------------------------------

define_static_call!(ON_EVENT: fn(&str, u32) = None);
define_static_call!(PENDING: fn(u32) -> usize = ReturnZero);
define_static_call!(FOUND: fn(&[u8]) -> Option<&'static u8> = |_| Some(&7));

const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const XOR_EAX: [u8; 5] = [0x2e, 0x2e, 0x2e, 0x31, 0xc0];

static EVENTS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn null_and_return_zero_keys() {
    static_call!(ON_EVENT)("start", 1);
    assert_eq!(ON_EVENT.target(), Target::Null);
    assert_sites_hold(|| ON_EVENT.sites(), NOP5, "a 5-byte NOP");
    ON_EVENT.update(|_, n| {
        EVENTS.fetch_add(n as usize, Ordering::SeqCst);
    });
    static_call!(ON_EVENT)("tick", 5);
    assert_eq!(EVENTS.load(Ordering::SeqCst), 5);
    ON_EVENT.set_null();
    static_call!(ON_EVENT)("tick", 5);
    assert_eq!(EVENTS.load(Ordering::SeqCst), 5);
    assert_sites_hold(|| ON_EVENT.sites(), NOP5, "a 5-byte NOP");

    assert_eq!(static_call!(PENDING)(3), 0);
    assert_sites_hold(|| PENDING.sites(), XOR_EAX, "xor eax, eax");
    assert_eq!(static_call!(PENDING)(3), 0);
    PENDING.update(|n| n as usize * 2);
    assert_eq!(static_call!(PENDING)(3), 6);

    let f = black_box(static_call!(FOUND));
    let site = patching().then(|| only_site(addr(f), FOUND.as_ptr() as usize));
    assert_eq!(f(b"x"), Some(&7));
    FOUND.set_return_zero();
    assert_eq!(FOUND.target(), Target::ReturnZero);
    assert_eq!(f(b"x"), None);
    static_call::flush();
    assert_eq!(f(b"x"), None);
    assert_eq!((FOUND.query())(b"x"), None);
    if let Some(site) = site {
        assert_eq!(common::read(site, 5), XOR_EAX);
    }
    FOUND.update(|s: &[u8]| if s.is_empty() { None } else { Some(&7) });
}

// --- Batch ------------------------------------------------------------------------------------

define_static_call!(B_UPPER: fn(&str) -> String = |s| s.to_uppercase());
define_static_call!(B_LEN: fn(&str) -> usize = |s| s.len());
define_static_call!(B_HOOK: fn(u32) = |_| {});
extern "C" fn c_one() -> u32 {
    1
}
extern "C" fn c_two() -> u32 {
    2
}
define_static_call!(B_C: extern "C" fn() -> u32 = c_one);

#[test]
fn a_batch_takes_rust_and_extern_c_keys_and_closures() {
    let upper = black_box(static_call!(B_UPPER));
    let len = black_box(static_call!(B_LEN));
    assert_eq!(
        (upper("ab"), len("ab"), static_call!(B_C)()),
        ("AB".into(), 2, 1)
    );
    static_call::flush();
    Batch::new()
        .update(&B_UPPER, |s| s.to_lowercase())
        .update(&B_LEN, |s: &str| s.chars().count())
        .update(&B_C, c_two)
        .set_null(&*B_HOOK)
        .update(&B_UPPER, |s| s.repeat(2)) // the last change of a key wins
        .commit();
    assert_eq!(
        (upper("Ab"), len("ü"), static_call!(B_C)()),
        ("AbAb".into(), 1, 2)
    );
    assert_eq!(B_HOOK.target(), Target::Null);
    if patching() {
        for (shim, key, func) in [
            (addr(upper), B_UPPER.as_ptr() as usize, func_of(&*B_UPPER)),
            (addr(len), B_LEN.as_ptr() as usize, func_of(&*B_LEN)),
        ] {
            assert_calls(only_site(shim, key), func, "the new adapter");
        }
    }
}

// --- the trampoline path is the same call ------------------------------------------------------

/// A site that stays on the trampoline (never flushed before the call) reaches the adapter with
/// the same registers: results, big results and panics all come back the same way.
#[test]
fn the_first_call_through_the_trampoline_is_complete() {
    define_static_call!(FIRST: fn(String, Big) -> (String, Big) = |s, b| (s + "!", b));
    let f = black_box(static_call!(FIRST));
    if patching() {
        assert_calls(
            only_site(addr(f), FIRST.as_ptr() as usize),
            trampoline(),
            "trampoline",
        );
    }
    let big = Big([9; 8]);
    assert_eq!(f("hi".into(), big), ("hi!".into(), big));
}
