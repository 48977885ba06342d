//! Keys without a target (NULL) and keys that return zero: calls do nothing / return zero, and
//! patched sites hold one 5-byte instruction (`0F 1F 44 00 00` and `2E 2E 2E 31 C0`), written in
//! one quadword swap. Every transition is checked on the bytes, both ways.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use common::{assert_sites_call, assert_sites_hold};
use static_call::{StaticCall, Target, define_static_call, static_call};

const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const XOR_EAX: [u8; 5] = [0x2e, 0x2e, 0x2e, 0x31, 0xc0];

static SEEN: AtomicU32 = AtomicU32::new(0);

extern "C" fn record(x: u32) {
    SEEN.fetch_add(x, Ordering::Relaxed);
}

define_static_call!(HOOK: extern "C" fn(u32) = None);

#[inline(never)]
fn fire(x: u32) {
    static_call!(HOOK)(x);
    static_call!(HOOK)(x);
}

#[test]
fn null_key_is_a_nop_and_goes_call_nop_call() {
    assert_eq!(HOOK.target(), Target::Null);
    fire(1);
    assert_eq!(SEEN.load(Ordering::Relaxed), 0, "a null key does nothing");
    assert_sites_hold(|| HOOK.sites(), NOP5, "nop");
    // Registered (in a patching build) even where patching is switched off.
    let registered = if static_call::trampoline_address().is_some() {
        2
    } else {
        0
    };
    assert_eq!(HOOK.sites().len(), registered);
    fire(1);
    assert_eq!(SEEN.load(Ordering::Relaxed), 0);

    HOOK.update(record);
    assert!(matches!(HOOK.target(), Target::Function(_)));
    assert_sites_call(|| HOOK.sites(), HOOK.query() as usize, "record");
    fire(5);
    assert_eq!(SEEN.load(Ordering::Relaxed), 10);

    HOOK.set_null();
    assert_eq!(HOOK.target(), Target::Null);
    assert_sites_hold(|| HOOK.sites(), NOP5, "nop");
    fire(5);
    assert_eq!(SEEN.load(Ordering::Relaxed), 10);
    // query() still returns a function of the key's type: one that does nothing.
    HOOK.query()(100);
    assert_eq!(SEEN.load(Ordering::Relaxed), 10);

    // ... and back: nop -> call.
    HOOK.update(record);
    assert_sites_call(|| HOOK.sites(), HOOK.query() as usize, "record");
    fire(1);
    assert_eq!(SEEN.load(Ordering::Relaxed), 12);
}

extern "C" fn forty_two() -> u64 {
    42
}

define_static_call!(COUNT: extern "C" fn() -> u64 = ReturnZero);

#[inline(never)]
fn count() -> u64 {
    static_call!(COUNT)()
}

#[test]
fn return_zero_key_returns_zero_and_goes_call_ret0_call() {
    assert_eq!(COUNT.target(), Target::ReturnZero);
    assert_eq!(count(), 0);
    assert_sites_hold(|| COUNT.sites(), XOR_EAX, "xor eax, eax");
    assert_eq!(count(), 0);
    assert_eq!(COUNT.query()(), 0);

    COUNT.update(forty_two);
    assert_sites_call(|| COUNT.sites(), COUNT.query() as usize, "forty_two");
    assert_eq!(count(), 42);

    COUNT.set_return_zero();
    assert_sites_hold(|| COUNT.sites(), XOR_EAX, "xor eax, eax");
    assert_eq!(count(), 0, "the xor clears all of rax, not only eax");
    // ... and back: ret0 -> call.
    COUNT.update(forty_two);
    assert_sites_call(|| COUNT.sites(), COUNT.query() as usize, "forty_two");
    assert_eq!(count(), 42);
}

// Return-zero for results that are zero in other ways: null, false, None, '\0'.

extern "C" fn some_ptr() -> *const u8 {
    0x1000 as *const u8
}
extern "C" fn yes() -> bool {
    true
}
extern "C" fn some_ref() -> Option<&'static u32> {
    static V: u32 = 3;
    Some(&V)
}

static PTR: StaticCall<extern "C" fn() -> *const u8> = StaticCall::new(some_ptr);
static FLAG: StaticCall<extern "C" fn() -> bool> = StaticCall::new(yes);
static REF: StaticCall<extern "C" fn() -> Option<&'static u32>> = StaticCall::return_zero();

#[test]
fn return_zero_means_null_false_and_none() {
    assert_eq!(static_call!(PTR)(), 0x1000 as *const u8);
    assert!(static_call!(FLAG)());
    assert_eq!(static_call!(REF)(), None);
    PTR.set_return_zero();
    FLAG.set_return_zero();
    assert!(static_call!(PTR)().is_null());
    assert!(!static_call!(FLAG)());
    assert_sites_hold(|| PTR.sites(), XOR_EAX, "xor eax, eax");
    assert_sites_hold(|| FLAG.sites(), XOR_EAX, "xor eax, eax");
    assert_sites_hold(|| REF.sites(), XOR_EAX, "xor eax, eax");
    REF.update(some_ref);
    assert_eq!(static_call!(REF)(), Some(&3));
    assert_sites_call(|| REF.sites(), REF.query() as usize, "some_ref");
}

// A field key with no target, and a macro key whose signature borrows (its higher-ranked type
// has no generic `Signature`, so `set_null` is the key type's own method: no trait to import).

pub struct Event {
    pub id: u32,
}

extern "C" fn on_event(e: &Event) {
    SEEN_EVENTS.fetch_add(e.id, Ordering::Relaxed);
}
static SEEN_EVENTS: AtomicU32 = AtomicU32::new(0);

struct Hooks {
    before: StaticCall<extern "C" fn(u32)>,
}
static HOOKS: Hooks = Hooks {
    before: StaticCall::null(),
};

define_static_call!(ON_EVENT: extern "C" fn(&Event) = on_event);

#[test]
fn null_field_keys_and_borrowing_signatures() {
    static_call!(HOOKS.before)(3);
    assert_sites_hold(|| HOOKS.before.sites(), NOP5, "nop");
    HOOKS.before.update(record);
    assert_sites_call(
        || HOOKS.before.sites(),
        HOOKS.before.query() as usize,
        "record",
    );

    static_call!(ON_EVENT)(&Event { id: 7 });
    assert_eq!(SEEN_EVENTS.load(Ordering::Relaxed), 7);
    ON_EVENT.set_null();
    static_call!(ON_EVENT)(&Event { id: 7 });
    assert_eq!(SEEN_EVENTS.load(Ordering::Relaxed), 7);
    assert_sites_hold(|| ON_EVENT.sites(), NOP5, "nop");
    assert_eq!(ON_EVENT.target(), Target::Null);
    ON_EVENT.update(on_event);
    static_call!(ON_EVENT)(&Event { id: 1 });
    assert_eq!(SEEN_EVENTS.load(Ordering::Relaxed), 8);
}

// Sites that have never run are untouched by any of this, and a site registered while the key is
// null is patched to a NOP at once.

define_static_call!(LATE: extern "C" fn(u32) = record);

#[test]
fn a_site_first_run_while_the_key_is_null_becomes_a_nop() {
    LATE.set_null();
    static_call!(LATE)(1000);
    assert_sites_hold(|| LATE.sites(), NOP5, "nop");
}
