// A closure that captures a zero-sized value that is not `Copy` (a drop guard) cannot be a
// target: it is called without its environment, so the guard would be conjured, and dropped, at
// every call. The error names the capture.
use static_call::define_static_call;

struct Guard;
impl Drop for Guard {
    fn drop(&mut self) {}
}

define_static_call!(K: fn(u32) -> u32 = |x| x);

fn main() {
    let guard = Guard;
    K.update(move |x| {
        let _keep = &guard;
        x + 1
    });
}
