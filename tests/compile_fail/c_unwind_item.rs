// An `extern "C-unwind"` function item is not `Fn` (only Rust-ABI functions are): it becomes a
// target through a closure, `|x| double(x)`.
extern "C-unwind" fn double(x: i32) -> i32 {
    2 * x
}
static_call::define_static_call!(K: extern "C-unwind" fn(i32) -> i32 = double);
fn main() {}
