extern "C" fn sum(a: f32, b: f32, c: f32, d: f32, e: f32, f: f32, g: f32, h: f32, i: f32) -> f32 {
    a + b + c + d + e + f + g + h + i
}
static_call::define_static_call!(SUM: extern "C" fn(f32, f32, f32, f32, f32, f32, f32, f32, f32) -> f32 = sum);
fn main() {}
