//! Tail sites (`static_call_fn!`), proven on the bytes: a wrapper is (after at most 4 bytes of
//! padding) the site, `jmp <binding>`, then `ret`, then the binding `lea r11, [rip + KEY]`, `lea
//! r10, [rip + site]`, `jmp <tail entry>`; once patched, the site's `jmp` goes to the target (or
//! its thunk), so the wrapper's whole path is one `jmp`, and it follows `update`, null and
//! return-zero keys.
//!
//! Each test uses its own keys: tests run in parallel in one process and share the patcher.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{addr, assert_jumps, patching, read, tail_site};
use static_call::{SiteState, StaticCall, define_static_call, static_call, static_call_fn};

extern "C" fn inc(x: u64) -> u64 {
    x + 1
}
extern "C" fn dbl(x: u64) -> u64 {
    x * 2
}

const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const RET0: [u8; 5] = [0x2e, 0x2e, 0x2e, 0x31, 0xc0];
const RET: u8 = 0xc3;

/// The bytes at a tail site and the byte after them (the wrapper's `ret`).
fn site_and_ret(site: usize) -> ([u8; 5], u8) {
    let b = read(site, 6);
    (b[..5].try_into().unwrap(), b[5])
}

define_static_call!(FIRST: extern "C" fn(u64) -> u64 = inc);
static_call_fn!(
    /// `FIRST`, as a function whose body is one jump.
    fn first(x: u64) -> u64 = FIRST
);

#[test]
fn a_wrapper_jumps_to_its_binding_then_straight_to_its_target() {
    if !patching() {
        assert_eq!(first(1), 2);
        return;
    }
    let f = addr(black_box(first as extern "C" fn(u64) -> u64));
    let site = tail_site(f);
    common::assert_tail_home(site);
    assert_eq!(site_and_ret(site).1, RET, "the ret after the jmp");
    assert!(site % 8 + 5 <= 8, "the jmp lies in one aligned quadword");
    assert!(
        FIRST.sites().is_empty(),
        "a wrapper that never ran is not registered"
    );

    assert_eq!(first(1), 2, "the first call already reaches the target");
    static_call::flush();
    assert_jumps(site, FIRST.query() as usize, "inc");
    let sites = FIRST.sites();
    assert_eq!(sites.len(), 1);
    assert_eq!(
        (sites[0].address, sites[0].state),
        (site, SiteState::Patched)
    );
    assert_eq!(first(41), 42);
}

define_static_call!(RETARGET: extern "C" fn(u64) -> u64 = inc);
static_call_fn!(fn retarget(x: u64) -> u64 = RETARGET);

#[test]
fn update_and_return_zero_rewrite_the_wrapper_before_returning() {
    assert_eq!(retarget(1), 2);
    static_call::flush();
    RETARGET.update(dbl);
    assert_eq!(retarget(5), 10);
    RETARGET.set_return_zero();
    assert_eq!(retarget(5), 0, "a return-zero key's wrapper returns zero");
    if patching() {
        let site = tail_site(addr(retarget as extern "C" fn(u64) -> u64));
        assert_eq!(site_and_ret(site), (RET0, RET), "xor eax, eax; ret");
        RETARGET.update(inc);
        assert_jumps(site, RETARGET.query() as usize, "inc");
    } else {
        RETARGET.update(inc);
    }
    assert_eq!(retarget(5), 6);
}

static HOOKED: AtomicU64 = AtomicU64::new(0);
extern "C" fn note(x: u64) {
    HOOKED.fetch_add(x, Ordering::Relaxed);
}
define_static_call!(HOOK: extern "C" fn(u64) = note);
static_call_fn!(fn hook(x: u64) = HOOK);

#[test]
fn a_null_keys_wrapper_returns_at_once() {
    hook(3);
    static_call::flush();
    assert_eq!(HOOKED.swap(0, Ordering::Relaxed), 3);
    HOOK.set_null();
    hook(4);
    assert_eq!(
        HOOKED.load(Ordering::Relaxed),
        0,
        "no target: nothing called"
    );
    if patching() {
        let site = tail_site(addr(hook as extern "C" fn(u64)));
        assert_eq!(site_and_ret(site), (NOP5, RET), "a NOP, then the ret");
        assert_eq!(HOOK.sites()[0].state, SiteState::Patched);
    }
    HOOK.update(note);
    hook(5);
    assert_eq!(HOOKED.swap(0, Ordering::Relaxed), 5);
}

// --- every form of key and signature ---------------------------------------------------------

extern "C" fn mix(a: f64, b: u32, c: f32, d: i8, e: u64) -> f64 {
    a * b as f64 + c as f64 + d as f64 + e as f64
}
extern "C" fn first_of<'a>(a: &'a u8, _b: &u8) -> &'a u8 {
    a
}
unsafe extern "C" fn read_byte(p: *const u8) -> u8 {
    // SAFETY: callers pass a readable pointer.
    unsafe { *p }
}
extern "C" fn seven() -> i32 {
    7
}

define_static_call!(MIX: extern "C" fn(f64, u32, f32, i8, u64) -> f64 = mix);
define_static_call!(FIRST_OF: for<'a> extern "C" fn(&'a u8, &u8) -> &'a u8 = first_of);
define_static_call!(READ: unsafe extern "C" fn(*const u8) -> u8 = read_byte);

pub struct Ops {
    pub seven: StaticCall<extern "C" fn() -> i32>,
    pub inner: Inner,
}
pub struct Inner {
    pub inc: StaticCall<extern "C" fn(u64) -> u64>,
}
pub static OPS: Ops = Ops {
    seven: StaticCall::new(seven),
    inner: Inner {
        inc: StaticCall::new(inc),
    },
};

static_call_fn!(pub fn mixed(a: f64, b: u32, c: f32, d: i8, e: u64) -> f64 = MIX);
static_call_fn!(pub fn pick<'a>(a: &'a u8, b: &u8) -> &'a u8 = FIRST_OF);
static_call_fn!(
    /// # Safety
    /// `p` must be readable.
    pub unsafe fn read_through(p: *const u8) -> u8 = READ
);
static_call_fn!(pub fn ops_seven() -> i32 = OPS.seven);
static_call_fn!(pub fn ops_inc(x: u64) -> u64 = OPS.inner.inc);

#[test]
fn wrappers_take_every_key_and_signature_a_site_does() {
    for round in 0..2 {
        assert_eq!(mixed(1.5, 2, 0.25, -3, 10), 10.25, "round {round}");
        let (a, b) = (1u8, 2u8);
        assert!(std::ptr::eq(pick(&a, &b), &a));
        // SAFETY: a readable byte.
        assert_eq!(unsafe { read_through(&9) }, 9);
        assert_eq!(ops_seven(), 7);
        assert_eq!(ops_inc(1), 2);
        static_call::flush();
    }
    if patching() {
        for (name, f, target) in [
            (
                "mixed",
                addr(mixed as extern "C" fn(f64, u32, f32, i8, u64) -> f64),
                addr(MIX.query()),
            ),
            (
                "read_through",
                addr(read_through as unsafe extern "C" fn(*const u8) -> u8),
                addr(READ.query()),
            ),
            (
                "ops_seven",
                addr(ops_seven as extern "C" fn() -> i32),
                addr(OPS.seven.query()),
            ),
            (
                "ops_inc",
                addr(ops_inc as extern "C" fn(u64) -> u64),
                addr(OPS.inner.inc.query()),
            ),
        ] {
            assert_jumps(tail_site(f), target, name);
        }
        assert_eq!(OPS.inner.inc.sites()[0].state, SiteState::Patched);
    }
}

define_static_call!(SHARED: extern "C" fn(u64) -> u64 = inc);
static_call_fn!(fn shared_tail(x: u64) -> u64 = SHARED);

#[inline(never)]
fn shared_call(x: u64) -> u64 {
    static_call!(SHARED)(x)
}

/// A wrapper is a site of its key like any other: listed, updated with the call sites, and
/// usable as a function pointer.
#[test]
fn a_wrapper_and_call_sites_of_one_key_move_together() {
    let as_pointer: extern "C" fn(u64) -> u64 = black_box(shared_tail);
    assert_eq!((as_pointer(1), shared_call(1)), (2, 2));
    static_call::flush();
    SHARED.update(dbl);
    assert_eq!((as_pointer(4), shared_call(4)), (8, 8));
    if patching() {
        let sites = SHARED.sites();
        assert_eq!(sites.len(), 2, "{sites:?}");
        assert!(
            sites.iter().all(|s| s.state == SiteState::Patched),
            "{sites:?}"
        );
        assert_jumps(tail_site(addr(as_pointer)), SHARED.query() as usize, "dbl");
    }
}
