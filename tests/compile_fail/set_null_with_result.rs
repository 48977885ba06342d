use static_call::StaticCall;
extern "C" fn one() -> u32 {
    1
}
static ONE: StaticCall<extern "C" fn() -> u32> = StaticCall::new(one);
fn main() {
    ONE.set_null();
}
