extern "C" fn wide(x: u128) -> u64 {
    x as u64
}
static_call::define_static_call!(WIDE: extern "C" fn(u128) -> u64 = wide);
fn main() {}
