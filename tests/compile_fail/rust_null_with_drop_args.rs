// A patched site of a key with no target is a NOP, which cannot drop by-value arguments.
static_call::define_static_call!(LOG: fn(String) = None);
fn main() {
    static_call::static_call!(LOG)(String::from("leaked?"));
}
