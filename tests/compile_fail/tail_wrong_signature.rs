extern "C" fn inc(x: u64) -> u64 {
    x + 1
}
static_call::define_static_call!(INC: extern "C" fn(u64) -> u64 = inc);
// The naked body is never type-checked: the declared signature must be the key's.
static_call::static_call_fn!(pub fn inc32(x: u32) -> u32 = INC);
fn main() {}
