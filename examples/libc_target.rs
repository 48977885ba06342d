//! A key whose target lives in another shared library: C's `strlen`, from libc.
//!
//! Run with `cargo run --release --example libc_target`. In a position-independent program the
//! shared libraries are mapped far from the program's own code, beyond the ±2 GiB that a
//! `call rel32` reaches, so a site cannot call libc directly. It calls a 16-byte thunk that
//! static_call writes next to the program's code instead (`jmp qword ptr [rip]` to the target):
//! still no indirect call through a pointer that the program loads, and no trampoline.
//!
//! The example starts with a portable byte-by-byte `strlen`, switches the key to libc's (which
//! glibc picks per CPU), and prints where each site stands after each step.

use std::ffi::{CStr, c_char};

use static_call::{SiteState, define_static_call, static_call};

/// Counts the bytes before the NUL, one at a time: the portable version.
///
/// # Safety
/// `s` must point to a NUL-terminated string.
unsafe extern "C" fn strlen_bytewise(s: *const c_char) -> usize {
    let mut n = 0;
    // SAFETY: the caller promises a NUL within the string, so every byte read up to it is in it.
    while unsafe { *s.add(n) } != 0 {
        n += 1;
    }
    n
}

define_static_call!(
    /// The `strlen` that `length` uses.
    STRLEN: unsafe extern "C" fn(*const c_char) -> usize = strlen_bytewise
);

/// The call site this example watches.
#[inline(never)]
fn length(s: &CStr) -> usize {
    // SAFETY: `s` is NUL-terminated, as both targets require.
    unsafe { static_call!(STRLEN)(s.as_ptr()) }
}

/// Reads `N` bytes of code at `addr`.
fn code<const N: usize>(addr: usize) -> [u8; N] {
    // SAFETY: `addr` is a site's call instruction, or the thunk it calls: mapped, readable code.
    // Volatile, as the patcher may rewrite a site at any time.
    core::array::from_fn(|i| unsafe { core::ptr::read_volatile((addr + i) as *const u8) })
}

/// What the 5-byte instruction at `site` calls, following a thunk (`jmp qword ptr [rip + 0]`,
/// then the target's address) if it is one.
fn describe(site: usize, names: &[(usize, &str)]) -> String {
    let name = |a: usize| {
        names
            .iter()
            .find(|&&(n, _)| n == a)
            .map_or(format!("{a:#x}"), |&(_, n)| n.to_string())
    };
    let [op, r @ ..] = code::<5>(site);
    if op != 0xe8 {
        return format!("not a call ({:02x?})", code::<5>(site));
    }
    let callee = (site + 5).wrapping_add_signed(i32::from_le_bytes(r) as isize);
    let jmp = code::<14>(callee);
    if jmp[..6] == [0xff, 0x25, 0, 0, 0, 0] {
        let target = u64::from_le_bytes(jmp[6..].try_into().unwrap()) as usize;
        format!(
            "call {callee:#x}, a thunk: jmp qword ptr [rip] -> {}",
            name(target)
        )
    } else {
        format!("call {}", name(callee))
    }
}

/// Prints each registered site of `STRLEN`: its state and what its bytes call.
fn show_sites(step: &str) {
    println!("{step}");
    let names = [
        (strlen_bytewise as *const () as usize, "strlen_bytewise"),
        (libc::strlen as *const () as usize, "libc's strlen"),
        (
            static_call::trampoline_address().unwrap_or(0),
            "the trampoline",
        ),
    ];
    for site in STRLEN.sites() {
        let how = match site.state {
            SiteState::Patched => describe(site.address, &names),
            SiteState::Pending => "waiting for the patcher".to_string(),
            SiteState::Trampoline(why) => format!("through the trampoline: {why}"),
            other => format!("{other:?}"),
        };
        println!("   site {:#x}: {how}", site.address);
    }
}

fn main() {
    let text = c"static calls reach into shared libraries too";
    let expected = text.to_bytes().len();

    assert_eq!(length(text), expected);
    static_call::flush();
    show_sites("1. STRLEN = strlen_bytewise (in this program, a direct call):");
    let status = static_call::status();
    if let Err(why) = status.patching {
        println!("   (patching is off here: {why}; calls still reach the right function)");
    }

    let libc_strlen = libc::strlen as *const () as usize;
    let distance = libc_strlen.abs_diff(length as *const () as usize);
    STRLEN.update(libc::strlen);
    assert_eq!(length(text), expected);
    let how = match (status.patching.is_ok(), distance >> 31 != 0) {
        (false, _) => "patching is off: the call reaches it all the same",
        (true, true) => "beyond a rel32, so the site calls a near thunk",
        (true, false) => "within a rel32, so the site calls it directly",
    };
    show_sites(&format!(
        "2. STRLEN = libc's strlen, {} GiB away from this code ({how}):",
        distance >> 30
    ));
    let status = static_call::status();
    println!(
        "   thunks made so far: {}{}",
        status.thunks,
        status
            .thunk_error
            .map_or(String::new(), |e| format!(" (last failure: errno {e})"))
    );
    if status.patching.is_ok() {
        assert!(STRLEN.sites().iter().all(|s| s.state == SiteState::Patched));
    }

    STRLEN.update(strlen_bytewise);
    assert_eq!(length(text), expected);
    show_sites("3. Back to strlen_bytewise: a direct call again (the thunk stays for later):");
    println!("\nlength({text:?}) = {expected} every time.");
}
