extern "C" fn sum(a: u8, b: u8, c: u8, d: u8, e: u8, f: u8, g: u8) -> u8 {
    a + b + c + d + e + f + g
}
static_call::define_static_call!(SUM: extern "C" fn(u8, u8, u8, u8, u8, u8, u8) -> u8 = sum);
fn main() {}
