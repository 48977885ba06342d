unsafe extern "C" {
    fn printf(format: *const u8, ...) -> i32;
}
static_call::define_static_call!(PRINT: unsafe extern "C" fn(*const u8, ...) -> i32 = printf);
fn main() {}
