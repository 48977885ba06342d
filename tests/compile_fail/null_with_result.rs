static_call::define_static_call!(COUNT: extern "C" fn() -> u32 = None);
fn main() {}
