use static_call::StaticCall;
fn double(x: i32) -> i32 {
    2 * x
}
static DOUBLE: StaticCall<fn(i32) -> i32> = StaticCall::new(double);
fn main() {}
