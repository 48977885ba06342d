unsafe extern "C" fn peek(p: *const u8) -> u8 {
    unsafe { *p }
}
static_call::define_static_call!(PEEK: unsafe extern "C" fn(*const u8) -> u8 = peek);
// A safe wrapper over an unsafe key would let safe code pass any pointer.
static_call::static_call_fn!(pub fn peek_safely(p: *const u8) -> u8 = PEEK);
fn main() {}
