fn double(x: i32) -> i32 {
    2 * x
}
static_call::define_static_call!(DOUBLE: fn(i32) -> i32 = double);
fn main() {}
