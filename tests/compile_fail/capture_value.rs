// A closure that captures a value cannot be a target: a key holds no environment. (Reported when
// the target's adapter is instantiated: by `cargo build`, not `cargo check`.)
use static_call::define_static_call;

define_static_call!(K: fn(u32) -> u32 = |x| x);

fn main() {
    let offset = 7u32;
    K.update(move |x| x + offset);
}
