#[derive(Clone, Copy)]
pub struct Point {
    x: i64,
    y: i64,
}
extern "C" fn len(p: Point) -> i64 {
    p.x + p.y
}
static_call::define_static_call!(LEN: extern "C" fn(Point) -> i64 = len);
fn main() {}
