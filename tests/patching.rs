//! Patching, proven on the bytes: every test decodes the call sites with iced-x86.
//!
//! Each test uses its own keys: tests run in parallel in one process and share the patcher.
//! A site is found before it ever runs by asking `static_call!` for the shim that holds it
//! (`black_box` keeps the compiler from inlining the shim, so the call runs that very site).
//!
//! Sites are compared with the pointer the key holds (`query()`), and the key's target is
//! identified by what it computes: a small `extern "C" fn` may have a copy in every codegen unit,
//! so `add as usize` here need not be the `add` the key was given.

mod common;

use std::hint::black_box;

use common::{addr, assert_calls, only_site, patching, scenario, trampoline};
use static_call::{SiteState, StaticCall, define_static_call, static_call};

extern "C" fn add(a: i64, b: i64) -> i64 {
    a + b
}
extern "C" fn mul(a: i64, b: i64) -> i64 {
    a * b
}
extern "C" fn sub(a: i64, b: i64) -> i64 {
    a - b
}

/// Tests check site bytes only where sites get patched. That must not be an accident: patching
/// is on unless the build is the portable fallback or the run says it expects it off
/// (`STATIC_CALL_TESTS_EXPECT_OFF`, as the valgrind run in .ci/run does).
#[test]
fn patching_is_on_unless_this_environment_switches_it_off() {
    static_call::init();
    match static_call::status().patching {
        Ok(()) => {}
        Err(static_call::Disabled::Unsupported) => {
            assert!(static_call::trampoline_address().is_none())
        }
        Err(why) => assert!(
            std::env::var_os("STATIC_CALL_TESTS_EXPECT_OFF").is_some(),
            "patching is off ({why}); set STATIC_CALL_TESTS_EXPECT_OFF=1 if that is intended"
        ),
    }
}

define_static_call!(FIRST: extern "C" fn(i64, i64) -> i64 = add);

#[test]
fn first_call_goes_through_trampoline_then_site_is_patched() {
    let f = black_box(static_call!(FIRST));
    if patching() {
        let site = only_site(addr(f), FIRST.as_ptr() as usize);
        assert_calls(site, trampoline(), "trampoline");
        assert!(
            FIRST.sites().is_empty(),
            "a site that never ran is not registered"
        );
        assert_eq!(f(2, 3), 5, "the first call already reaches the target");
        static_call::flush();
        assert_calls(site, FIRST.query() as usize, "add");
        assert_eq!(
            FIRST.sites(),
            [static_call::SiteInfo {
                address: site,
                state: SiteState::Patched,
                bytes: Some(common::read(site, 5).try_into().unwrap()),
            }]
        );
    }
    assert_eq!(f(2, 3), 5);
}

define_static_call!(TWO: extern "C" fn(i64, i64) -> i64 = add);

#[test]
fn two_sites_are_patched_independently_and_an_idle_site_is_untouched() {
    let a = black_box(static_call!(TWO));
    let b = black_box(static_call!(TWO));
    let idle = black_box(static_call!(TWO));
    assert_ne!(addr(a), addr(b), "every static_call! is its own site");
    if !patching() {
        return;
    }
    let key = TWO.as_ptr() as usize;
    let (sa, sb, si) = (
        only_site(addr(a), key),
        only_site(addr(b), key),
        only_site(addr(idle), key),
    );
    assert_eq!(a(1, 2), 3);
    static_call::flush();
    assert_calls(sa, TWO.query() as usize, "add");
    assert_calls(sb, trampoline(), "trampoline");
    assert_eq!(b(1, 2), 3);
    static_call::flush();
    assert_calls(sa, TWO.query() as usize, "add");
    assert_calls(sb, TWO.query() as usize, "add");
    assert_calls(si, trampoline(), "trampoline");
    let mut listed: Vec<usize> = TWO.sites().iter().map(|s| s.address).collect();
    listed.sort();
    let mut expected = vec![sa, sb];
    expected.sort();
    assert_eq!(listed, expected);
}

define_static_call!(UPD: extern "C" fn(i64, i64) -> i64 = add);

#[test]
fn update_rewrites_every_registered_site_before_returning() {
    let a = black_box(static_call!(UPD));
    let b = black_box(static_call!(UPD));
    assert_eq!((a(2, 3), b(2, 3)), (5, 5));
    static_call::flush();
    UPD.update(mul);
    // No flush: `update` is synchronous.
    if patching() {
        for s in UPD.sites() {
            assert_calls(s.address, UPD.query() as usize, "mul");
        }
        assert_eq!(UPD.sites().len(), 2);
    }
    assert_eq!((a(2, 3), b(2, 3)), (6, 6));
    let q: extern "C" fn(i64, i64) -> i64 = UPD.query();
    assert_eq!(q(2, 5), 10, "query() returns the new target");
    UPD.update(add);
    if patching() {
        for s in UPD.sites() {
            assert_calls(s.address, UPD.query() as usize, "add");
        }
    }
    assert_eq!((a(2, 3), b(2, 3)), (5, 5));
}

define_static_call!(EARLY: extern "C" fn(i64, i64) -> i64 = add);

#[test]
fn update_before_a_sites_first_run_is_what_the_first_run_calls() {
    let f = black_box(static_call!(EARLY));
    EARLY.update(mul);
    assert_eq!(f(2, 3), 6);
    static_call::flush();
    if patching() {
        assert_calls(
            only_site(addr(f), EARLY.as_ptr() as usize),
            EARLY.query() as usize,
            "mul",
        );
    }
}

/// Calls the `i`-th of 64 call sites of `$key` with `(a, b)`. Each arm is its own inline asm
/// block, inlined into the calling function, so the 64 are distinct sites in every build; each
/// passes `a + n` and subtracts `n` again, so that LLVM sees 64 different arms and merges none.
/// (Shims taken as function pointers would not do: identical shims of one key are merged into
/// one function in release builds.)
macro_rules! sixty_four_sites {
    ($key:ident, $i:expr, $a:expr, $b:expr) => {
        sixty_four_sites!(@arms $key, $i, $a, $b; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18
            19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47
            48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63)
    };
    (@arms $key:ident, $i:expr, $a:expr, $b:expr; $($n:literal)*) => {
        match $i {
            $($n => static_call!($key)($a + $n, $b) - $n,)*
            _ => unreachable!(),
        }
    };
}

define_static_call!(RACE: extern "C" fn(i64, i64) -> i64 = add);

#[inline(never)]
fn race_sites(i: i64, a: i64, b: i64) -> i64 {
    sixty_four_sites!(RACE, i, a, b)
}

/// The worker must read the target when it patches, not when the site was queued: call 64
/// fresh sites once, then update at once, before the worker can have patched them all.
#[test]
fn sites_queued_before_an_update_are_patched_to_the_new_target() {
    for i in 0..64 {
        assert_eq!(race_sites(i, 7, 2), 9);
    }
    RACE.update(sub);
    static_call::flush();
    for i in 0..64 {
        assert_eq!(race_sites(i, 7, 2), 5);
    }
    if patching() {
        assert_eq!(RACE.sites().len(), 64, "64 distinct sites");
    }
    common::assert_sites_call(|| RACE.sites(), RACE.query() as usize, "sub");
}

define_static_call!(BURST: extern "C" fn(i64, i64) -> i64 = add);

#[inline(never)]
fn burst_sites(i: i64, a: i64, b: i64) -> i64 {
    sixty_four_sites!(BURST, i, a, b)
}

#[test]
fn flush_returns_with_a_burst_of_new_sites_patched() {
    for i in 0..64 {
        assert_eq!(burst_sites(i, 1, 1), 2);
    }
    static_call::flush();
    if patching() {
        let sites = BURST.sites();
        assert_eq!(sites.len(), 64, "64 distinct sites");
        assert!(
            sites.iter().all(|s| s.state == SiteState::Patched),
            "{sites:?}"
        );
        for s in &sites {
            assert_calls(s.address, BURST.query() as usize, "add");
        }
    }
}

define_static_call!(IDLE: extern "C" fn(i64, i64) -> i64 = add);

#[inline(never)]
fn idle_site(a: i64, b: i64) -> i64 {
    static_call!(IDLE)(a, b)
}

scenario! {
    /// With nothing queued, `flush` does no work at all: no batch, no `mprotect`, no core sync.
    /// It runs alone in a child, because the counters are process-wide and the other tests of
    /// this binary patch their own sites while it runs.
    fn flush_with_nothing_queued_writes_nothing() {
        assert_eq!(idle_site(2, 3), 5);
        static_call::flush();
        let before = static_call::stats();
        if patching() {
            assert!(before.batches >= 1, "the site was patched: {before:?}");
        }
        for _ in 0..10 {
            static_call::flush();
        }
        assert_eq!(static_call::stats(), before);
        assert_eq!(idle_site(2, 3), 5);
    }
}

define_static_call!(KEY_A: extern "C" fn(i64, i64) -> i64 = add);
define_static_call!(KEY_B: extern "C" fn(i64, i64) -> i64 = mul);

/// Calls the trampoline from hand-written code that loads r11 from a register: the site's bytes
/// do not prove a key, so it must never be patched, whatever key reaches it.
#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]
#[inline(never)]
fn call_with_runtime_key(
    key: &'static StaticCall<extern "C" fn(i64, i64) -> i64>,
    a: i64,
    b: i64,
) -> i64 {
    let out: i64;
    unsafe {
        core::arch::asm!(
            "mov r11, {key}",
            ".p2align 3",
            "call {trampoline}",
            key = in(reg) key.as_ptr(),
            trampoline = sym static_call::__private::trampoline,
            inout("rdi") a => _, inout("rsi") b => _,
            lateout("rax") out,
            clobber_abi("C"),
        );
    }
    out
}

/// The same, through `call reg`: the return address does not follow a `call rel32` at all.
#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]
#[inline(never)]
fn call_trampoline_through_pointer(
    key: &'static StaticCall<extern "C" fn(i64, i64) -> i64>,
    a: i64,
) -> i64 {
    let out: i64;
    let f: unsafe extern "C" fn() = static_call::__private::trampoline;
    unsafe {
        core::arch::asm!(
            "mov r11, {key}",
            "call {f}",
            key = in(reg) key.as_ptr(),
            f = in(reg) f,
            inout("rdi") a => _, inout("rsi") a => _,
            lateout("rax") out,
            clobber_abi("C"),
        );
    }
    out
}

#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]
#[test]
fn a_site_reached_with_two_keys_is_never_patched_and_always_calls_the_right_target() {
    // Both keys also have ordinary sites, which do get patched.
    let (pa, pb) = (
        black_box(static_call!(KEY_A)),
        black_box(static_call!(KEY_B)),
    );
    assert_eq!((pa(3, 4), pb(3, 4)), (7, 12));
    static_call::flush();
    if patching() {
        assert_calls(
            only_site(addr(pa), KEY_A.as_ptr() as usize),
            KEY_A.query() as usize,
            "add",
        );
    }

    for round in 0..50 {
        assert_eq!(call_with_runtime_key(&KEY_A, 3, 4), 7, "round {round}");
        assert_eq!(call_with_runtime_key(&KEY_B, 3, 4), 12, "round {round}");
        assert_eq!(
            call_trampoline_through_pointer(&KEY_A, 3),
            6,
            "round {round}"
        );
        assert_eq!(
            call_trampoline_through_pointer(&KEY_B, 3),
            9,
            "round {round}"
        );
        if round == 10 {
            static_call::flush();
            KEY_A.update(sub);
            KEY_A.update(add);
        }
    }
    static_call::flush();
    if !patching() {
        return;
    }
    // The hand-written sites are registered under whichever key reached them first, and stay on
    // the trampoline with the reason.
    let hand_made: Vec<_> = KEY_A
        .sites()
        .into_iter()
        .chain(KEY_B.sites())
        .filter(|s| s.state != SiteState::Patched)
        .collect();
    assert_eq!(hand_made.len(), 2, "{hand_made:?}");
    for s in &hand_made {
        assert!(
            matches!(
                s.state,
                SiteState::Trampoline(
                    static_call::Reason::KeyNotProven | static_call::Reason::NotASite
                )
            ),
            "{s:?}"
        );
    }
    let aligned = hand_made
        .iter()
        .find(|s| s.state == SiteState::Trampoline(static_call::Reason::KeyNotProven));
    let aligned =
        aligned.expect("the `call rel32` site is recognised as a site without a proven key");
    assert_eq!(common::call_target(aligned.address), Some(trampoline()));
}

// A target that returns rsp mod 16 as it was on entry: 8 when the caller respected the ABI.
#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".globl static_call_test_rsp_mod16",
    "static_call_test_rsp_mod16:",
    "mov rax, rsp",
    "and eax, 15",
    "add rax, rdi",
    "ret",
);
#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    /// Returns rsp mod 16 as it was on entry (8 when the caller respected the ABI), plus `x`.
    fn static_call_test_rsp_mod16(x: i64) -> i64;
}

#[cfg(target_arch = "x86_64")]
define_static_call!(RSP: unsafe extern "C" fn(i64) -> i64 = static_call_test_rsp_mod16);

/// Sites in the shape that once broke: a `match` whose default arm panics, where LLVM's
/// shrink-wrapping put the prologue (and the stack alignment) on the panicking path only.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
fn rsp_at_entry(i: i64, x: i64) -> i64 {
    // SAFETY: the target only reads rsp.
    unsafe {
        match i {
            0 => static_call!(RSP)(x),
            1 => static_call!(RSP)(x + 1) - 1,
            2 => static_call!(RSP)(x + 2) - 2,
            3 => static_call!(RSP)(x + 3) - 3,
            _ => unreachable!(),
        }
    }
}

/// Every site calls with the stack aligned as System V requires, through the trampoline (which
/// tail-jumps with the caller's rsp) and once patched, whatever the shape of the caller.
#[cfg(target_arch = "x86_64")]
#[test]
fn sites_call_with_the_stack_aligned() {
    for round in 0..2 {
        for i in 0..4 {
            assert_eq!(
                rsp_at_entry(black_box(i), 100),
                108,
                "site {i}, round {round}"
            );
        }
        static_call::flush();
    }
    if patching() {
        assert_eq!(RSP.sites().len(), 4);
        assert!(RSP.sites().iter().all(|s| s.state == SiteState::Patched));
    }
}

#[test]
fn keys_are_sixteen_bytes_and_const_constructible() {
    assert_eq!(size_of::<StaticCall<extern "C" fn(i64, i64) -> i64>>(), 16);
    assert_eq!(size_of_val(&*FIRST), 16);
    static K: StaticCall<extern "C" fn(i64, i64) -> i64> = StaticCall::new(add);
    assert_eq!(K.query()(2, 3), 5);
}

// A target that returns r11 as it was on entry.
#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".globl static_call_test_r11",
    "static_call_test_r11:",
    "mov rax, r11",
    "ret",
);
#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    /// Returns r11 as it was on entry.
    fn static_call_test_r11() -> usize;
}

#[cfg(target_arch = "x86_64")]
define_static_call!(R11: unsafe extern "C" fn() -> usize = static_call_test_r11);

/// Every target is entered with its key's address in r11: through the trampoline (which restores
/// it before its jump) and once patched (the site's `lea` ran just before the call). Pointer
/// adapters and guard stubs rely on it.
#[cfg(target_arch = "x86_64")]
#[test]
fn targets_are_entered_with_the_key_in_r11() {
    let f = black_box(static_call!(R11));
    if !patching() {
        return;
    }
    let key = R11.as_ptr() as usize;
    let site = only_site(addr(f), key);
    assert_calls(site, trampoline(), "trampoline");
    // SAFETY: the target only reads r11.
    assert_eq!(unsafe { f() }, key, "through the trampoline");
    static_call::flush();
    assert_calls(site, R11.query() as usize, "the r11 probe");
    // SAFETY: as above.
    assert_eq!(unsafe { f() }, key, "patched");
}
