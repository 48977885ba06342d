// Rust-ABI keys compile, in every form: a macro key, a field key, an alias. (Also makes trybuild
// build rather than only check, so that the post-monomorphisation errors of
// tests/compile_fail show.)
use static_call::{StaticCall, define_static_call, static_call};

fn double(x: i32) -> i32 {
    2 * x
}
define_static_call!(DOUBLE: fn(i32) -> i32 = double);
static FIELD: StaticCall<fn(i32) -> i32> = StaticCall::to(double);
type Op = fn(i32) -> i32;
define_static_call!(ALIASED: Op = double);

fn main() {
    assert_eq!(static_call!(DOUBLE)(2) + static_call!(FIELD)(2) + static_call!(ALIASED)(2), 12);
}
