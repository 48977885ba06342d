use static_call::StaticCall;
static VALUE: u32 = 7;
extern "C" fn get() -> &'static u32 {
    &VALUE
}
static GET: StaticCall<extern "C" fn() -> &'static u32> = StaticCall::new(get);
fn main() {
    GET.set_return_zero();
}
