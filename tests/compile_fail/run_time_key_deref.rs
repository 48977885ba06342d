use static_call::{StaticCall, static_call};
extern "C" fn one() -> u32 {
    1
}
static KEYS: [StaticCall<extern "C" fn() -> u32>; 1] = [StaticCall::new(one)];
fn main() {
    let key = &KEYS[0];
    static_call!(*key)();
}
