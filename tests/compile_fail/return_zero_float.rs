static_call::define_static_call!(RATIO: extern "C" fn() -> f64 = ReturnZero);
fn main() {}
