unsafe extern "C" fn peek(p: *const u8) -> u8 {
    unsafe { *p }
}
static_call::define_static_call!(PEEK: unsafe extern "C" fn(*const u8) -> u8 = peek);
fn main() {
    let b = 1u8;
    static_call::static_call!(PEEK)(&b);
}
