pub struct Pair(u64, u64);
extern "C" fn pair() -> Pair {
    Pair(1, 2)
}
static_call::define_static_call!(PAIR: extern "C" fn() -> Pair = pair);
fn main() {}
