//! The merged-`lea` trap, built by tests/merged_lea.rs at opt-levels 1, 2, s and z.
//!
//! `pick_and_call` chooses one of two static keys at run time and calls it through one run-time
//! site. LLVM computes r11 on each path and merges the paths in front of the site:
//!
//! ```text
//!       call f1;  lea r11, [rip + A];  jmp L
//!       call f2;  lea r11, [rip + B]
//!   L:  call <run-time entry>
//! ```
//!
//! The bytes before the call are exactly a call site of `B`, and the A path reaches the same
//! call with r11 = A. Patched as a static site of B, the A path would call B's target: the one
//! bug the library must not have. This program checks, on its own bytes, that the trap is there
//! (the static proof, were the call to the static entry, would prove B), that the static proof
//! rejects it as it is, and that whatever the patcher makes of the site, every call reaches its
//! own key's target and the site is never a direct call. It prints what it found and exits 0, or
//! panics.

use std::sync::atomic::{AtomicU64, Ordering};

use static_call::{SiteState, StaticCall};

static SIDE: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
fn f1() {
    SIDE.fetch_add(1, Ordering::Relaxed);
}

#[inline(never)]
fn f2() {
    SIDE.fetch_add(2, Ordering::Relaxed);
}

extern "C" fn ta() -> u64 {
    1
}
extern "C" fn tb() -> u64 {
    2
}

pub static A: StaticCall<extern "C" fn() -> u64> = StaticCall::new(ta);
pub static B: StaticCall<extern "C" fn() -> u64> = StaticCall::new(tb);

/// No arguments, so that nothing but the merge sits between the `lea` and the call.
#[inline(never)]
pub fn pick_and_call(c: bool) -> u64 {
    let k = if c {
        f1();
        &A
    } else {
        f2();
        &B
    };
    k.call_guarded()
}

fn read(at: usize, len: usize) -> Vec<u8> {
    // SAFETY: callers read inside this program's own text.
    (0..len)
        .map(|i| unsafe { core::ptr::read_volatile((at + i) as *const u8) })
        .collect()
}

fn rel32_dest(at: usize, bytes: &[u8]) -> usize {
    let rel = i32::from_le_bytes(bytes[1..5].try_into().unwrap());
    (at as i64 + 5 + rel as i64) as usize
}

/// `call dest` encoded at `at`.
fn call_to(at: usize, dest: usize) -> [u8; 5] {
    let r = ((dest as i64 - (at as i64 + 5)) as i32).to_le_bytes();
    [0xe8, r[0], r[1], r[2], r[3]]
}

/// The run-time site in `pick_and_call`: the `E8` whose rel32 reaches the run-time entry.
fn find_site(entry: usize) -> usize {
    let f = pick_and_call as *const () as usize;
    let code = read(f, 256);
    (0..code.len() - 5)
        .map(|i| f + i)
        .find(|&at| read(at, 1)[0] == 0xe8 && rel32_dest(at, &read(at, 5)) == entry)
        .expect("a call of the run-time entry in pick_and_call")
}

fn main() {
    let opt = std::env::args().nth(1).unwrap_or_default();
    let entry = static_call::__private::run_time_trampoline as *const () as usize;
    let tramp = static_call::trampoline_address().expect("a patching build");
    let site = find_site(entry);
    let pro = static_call::__private::SITE_PROLOGUE;
    let mut code = read(site - pro, pro + 5);

    // The trap: the same bytes with a call of the static entry prove B, a key the A path does
    // not hold.
    let as_compiled = static_call::__private::prove_site(&code, (site - pro) as u64, tramp as u64);
    assert!(as_compiled.is_err(), "opt {opt}: the static proof accepted a run-time site");
    code[pro..].copy_from_slice(&call_to(site, tramp));
    let with_static_entry =
        static_call::__private::prove_site(&code, (site - pro) as u64, tramp as u64);
    let trap = with_static_entry == Ok(B.as_ptr() as u64);
    println!("opt {opt}: merged lea in front of the site: {trap}");

    // Both paths, many times, before and after the patcher: each reaches its own target.
    for round in 0..4 {
        for i in 0..64 {
            let c = (i + round) % 2 == 0;
            assert_eq!(pick_and_call(c), if c { 1 } else { 2 }, "opt {opt} round {round}");
        }
        static_call::flush();
        let bytes = read(site, 5);
        assert_eq!(bytes[0], 0xe8, "opt {opt}: the site is a call");
        let dest = rel32_dest(site, &bytes);
        assert_ne!(dest, A.query() as usize, "opt {opt}: a direct call of A's target");
        assert_ne!(dest, B.query() as usize, "opt {opt}: a direct call of B's target");
    }
    assert!(A.sites().is_empty() && B.sites().is_empty(), "never a static site of A or B");
    let info = static_call::run_time_sites()
        .into_iter()
        .find(|s| s.address == site)
        .expect("registered as a run-time site");
    assert_eq!(info.state, SiteState::Polymorphic { targets: 2 }, "opt {opt}");
    println!("opt {opt}: ok, {:?}", info.state);
}
