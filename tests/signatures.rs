//! Every signature class: integers of every width, bool, char, pointers, references, `Option`s,
//! function pointers, f32 and f64, interleaved, up to 6 integer-class and 8 float arguments.
//! Every position gets a distinct value and every target folds all of them into its result with
//! a distinct weight, so a register mix-up (two arguments swapped, a float read from the wrong
//! xmm register, an upper half not extended) changes the result. Each key is checked through its
//! trampoline path (first call), patched (decoded after `flush`), and after `update`.

// `char` is not a C type, so rustc warns about it in `extern "C"` functions; System V passes it
// as a 32-bit integer, and both sides here are Rust.
#![allow(improper_ctypes_definitions)]

mod common;

use std::ptr::NonNull;

use common::assert_sites_call;
use static_call::{StaticCall, define_static_call, static_call};

// --- six integer-class arguments of different widths and signedness -----------------------

extern "C" fn ints_a(a: u8, b: i16, c: u32, d: i64, e: bool, f: char) -> i64 {
    a as i64 + 3 * b as i64 + 5 * c as i64 + 7 * d + 11 * e as i64 + 13 * f as i64
}
extern "C" fn ints_b(a: u8, b: i16, c: u32, d: i64, e: bool, f: char) -> i64 {
    -ints_a(a, b, c, d, e, f)
}
define_static_call!(INTS: extern "C" fn(u8, i16, u32, i64, bool, char) -> i64 = ints_a);

#[inline(never)]
fn call_ints() -> i64 {
    static_call!(INTS)(250, -300, 4_000_000_000, -5_000_000_000, true, 'Ω')
}

#[test]
fn six_integer_arguments_of_every_width() {
    let expected = ints_a(250, -300, 4_000_000_000, -5_000_000_000, true, 'Ω');
    assert_eq!(call_ints(), expected);
    static_call::flush();
    assert_eq!(call_ints(), expected);
    assert_sites_call(|| INTS.sites(), INTS.query() as usize, "ints_a");
    INTS.update(ints_b);
    assert_eq!(call_ints(), -expected);
    assert_sites_call(|| INTS.sites(), INTS.query() as usize, "ints_b");
}

// --- eight floats, f32 and f64 mixed --------------------------------------------------------

extern "C" fn floats_a(a: f32, b: f64, c: f32, d: f64, e: f32, f: f64, g: f32, h: f64) -> f64 {
    a as f64
        + 2.0 * b
        + 4.0 * c as f64
        + 8.0 * d
        + 16.0 * e as f64
        + 32.0 * f
        + 64.0 * g as f64
        + 128.0 * h
}
extern "C" fn floats_b(a: f32, b: f64, c: f32, d: f64, e: f32, f: f64, g: f32, h: f64) -> f64 {
    floats_a(a, b, c, d, e, f, g, h) + 0.5
}
define_static_call!(FLOATS: extern "C" fn(f32, f64, f32, f64, f32, f64, f32, f64) -> f64 = floats_a);

#[inline(never)]
fn call_floats() -> f64 {
    static_call!(FLOATS)(1.5, 2.25, 3.125, 4.0625, 5.5, 6.75, 7.875, 8.5)
}

#[test]
fn eight_float_arguments_f32_and_f64_mixed() {
    let expected = floats_a(1.5, 2.25, 3.125, 4.0625, 5.5, 6.75, 7.875, 8.5);
    assert_eq!(call_floats(), expected);
    static_call::flush();
    assert_eq!(call_floats(), expected);
    assert_sites_call(|| FLOATS.sites(), FLOATS.query() as usize, "floats_a");
    FLOATS.update(floats_b);
    assert_eq!(call_floats(), expected + 0.5);
}

// --- six integers and eight floats, interleaved ---------------------------------------------

#[allow(clippy::too_many_arguments)]
extern "C" fn mixed(
    f0: f64,
    i0: i32,
    f1: f32,
    i1: u64,
    f2: f64,
    f3: f32,
    i2: *const u8,
    f4: f64,
    i3: bool,
    f5: f32,
    i4: i8,
    f6: f64,
    f7: f32,
    i5: u16,
) -> f64 {
    let floats = [f0, f1 as f64, f2, f3 as f64, f4, f5 as f64, f6, f7 as f64];
    let ints = [
        i0 as f64,
        i1 as f64,
        i2 as usize as f64,
        i3 as u8 as f64,
        i4 as f64,
        i5 as f64,
    ];
    let mut acc = 0.0;
    for (k, v) in floats.iter().enumerate() {
        acc += v * (k + 1) as f64;
    }
    for (k, v) in ints.iter().enumerate() {
        acc += v * (100 + k) as f64;
    }
    acc
}
define_static_call!(MIXED: extern "C" fn(f64, i32, f32, u64, f64, f32, *const u8, f64, bool, f32, i8, f64, f32, u16) -> f64 = mixed);

#[inline(never)]
fn call_mixed() -> f64 {
    static_call!(MIXED)(
        0.5,
        -7,
        1.25,
        1 << 40,
        2.5,
        3.75,
        0x1234 as *const u8,
        4.5,
        true,
        5.25,
        -3,
        6.5,
        7.75,
        65000,
    )
}

#[test]
fn six_integers_and_eight_floats_interleaved() {
    let expected = mixed(
        0.5,
        -7,
        1.25,
        1 << 40,
        2.5,
        3.75,
        0x1234 as *const u8,
        4.5,
        true,
        5.25,
        -3,
        6.5,
        7.75,
        65000,
    );
    assert_eq!(call_mixed(), expected);
    static_call::flush();
    assert_eq!(call_mixed(), expected);
    assert_sites_call(|| MIXED.sites(), MIXED.query() as usize, "mixed");
}

// --- pointers, references and options; every result class -----------------------------------

#[derive(Debug, PartialEq)]
pub struct Point {
    x: i64,
    y: i64,
}

extern "C" fn pick<'a>(
    p: &'a Point,
    q: &mut Point,
    r: Option<&Point>,
    n: NonNull<Point>,
    f: extern "C" fn(i64) -> i64,
) -> &'a Point {
    q.x += f(p.x) + r.map_or(0, |r| r.y) + unsafe { n.as_ref() }.x;
    p
}
define_static_call!(PICK: for<'a> extern "C" fn(&'a Point, &mut Point, Option<&Point>, NonNull<Point>, extern "C" fn(i64) -> i64) -> &'a Point = pick);

extern "C" fn triple(x: i64) -> i64 {
    3 * x
}

#[test]
fn references_options_nonnull_and_function_pointers() {
    let p = Point { x: 10, y: 20 };
    let mut q = Point { x: 1, y: 0 };
    let r = Point { x: 0, y: 300 };
    let n = Point { x: 4000, y: 0 };
    for round in 0..2 {
        let back = static_call!(PICK)(&p, &mut q, Some(&r), NonNull::from(&n), triple);
        assert!(std::ptr::eq(back, &p));
        assert_eq!(q.x, 1 + (round + 1) * (30 + 300 + 4000));
        static_call::flush();
    }
    let back = static_call!(PICK)(&p, &mut q, None, NonNull::from(&n), triple);
    assert!(std::ptr::eq(back, &p));
    assert_sites_call(|| PICK.sites(), PICK.query() as usize, "pick");
}

macro_rules! result_class {
    ($test:ident, $key:ident, $t:ty, $a:expr, $b:expr) => {
        #[test]
        fn $test() {
            extern "C" fn first() -> $t {
                $a
            }
            extern "C" fn second() -> $t {
                $b
            }
            define_static_call!($key: extern "C" fn() -> $t = first);
            assert_eq!(static_call!($key)(), $a);
            static_call::flush();
            assert_eq!(static_call!($key)(), $a);
            $key.update(second);
            assert_eq!(static_call!($key)(), $b);
            assert_sites_call(|| $key.sites(), $key.query() as usize, "second");
        }
    };
}

result_class!(returns_u8, R_U8, u8, 0xfe, 7);
result_class!(returns_i16, R_I16, i16, -2, 30000);
result_class!(returns_u32, R_U32, u32, 0xffff_fff0, 1);
result_class!(returns_i64, R_I64, i64, -1 << 40, 5);
result_class!(returns_bool, R_BOOL, bool, true, false);
result_class!(returns_char, R_CHAR, char, 'λ', 'z');
result_class!(returns_f32, R_F32, f32, 1.5, -0.25);
result_class!(returns_f64, R_F64, f64, 1e300, -2.5);
result_class!(
    returns_ptr,
    R_PTR,
    *const u8,
    0x10 as *const u8,
    core::ptr::null()
);
result_class!(
    returns_option_ref,
    R_OPT,
    Option<&'static u8>,
    Some(&7),
    None
);

// --- unsafe keys and fields -----------------------------------------------------------------

unsafe extern "C" fn read_byte(p: *const u8) -> u8 {
    unsafe { *p }
}
define_static_call!(READ: unsafe extern "C" fn(*const u8) -> u8 = read_byte);

#[test]
fn unsafe_keys_are_called_in_unsafe_code() {
    let byte = 42u8;
    assert_eq!(unsafe { static_call!(READ)(&byte) }, 42);
    static_call::flush();
    assert_eq!(unsafe { static_call!(READ)(&byte) }, 42);
    assert_sites_call(|| READ.sites(), READ.query() as usize, "read_byte");
}

struct Codecs {
    encode: StaticCall<extern "C" fn(u32, f32) -> f64>,
}
extern "C" fn encode(a: u32, b: f32) -> f64 {
    a as f64 * 10.0 + b as f64
}
static CODECS: Codecs = Codecs {
    encode: StaticCall::new(encode),
};

#[test]
fn a_field_key_with_mixed_arguments() {
    assert_eq!(static_call!(CODECS.encode)(7, 0.5), 70.5);
    static_call::flush();
    assert_eq!(static_call!(CODECS.encode)(7, 0.5), 70.5);
    assert_sites_call(
        || CODECS.encode.sites(),
        CODECS.encode.query() as usize,
        "encode",
    );
}
