// The macro cannot see a type alias's tokens, and no generic impl covers a signature that
// borrows (it is higher-ranked): the error says to spell it out.
type Find = fn(u8, &[u8]) -> Option<usize>;
fn find(n: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == n)
}
static_call::define_static_call!(FIND: Find = find);
fn main() {}
