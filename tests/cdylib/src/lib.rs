//! A shared library with its own copy of static-call, loaded with `dlopen` by
//! tests/shared_library.rs. Everything it exports is `extern "C"` and `no_mangle`, so the test
//! finds it with `dlsym`; the test decodes the library's site bytes itself (same address space).
//!
//! Its three call sites live in `sclib_call`: two of `LIB_A`, one of `LIB_B`. Its one branch site
//! (of `LIB_BRANCH`) lives in `sclib_branch`.

use static_call::{SiteState, define_static_branch, define_static_call, static_branch, static_call};

extern "C" fn add1(x: i64) -> i64 {
    x + 1
}
extern "C" fn add2(x: i64) -> i64 {
    x + 2
}
extern "C" fn add100(x: i64) -> i64 {
    x + 100
}
extern "C" fn add200(x: i64) -> i64 {
    x + 200
}

define_static_call!(LIB_A: extern "C" fn(i64) -> i64 = add1);
define_static_call!(LIB_B: extern "C" fn(i64) -> i64 = add100);

/// Runs the library's three sites: `out` gets `[A(x), A(x), B(x)]`.
///
/// # Safety
/// `out` points to three writable `i64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sclib_call(x: i64, out: *mut i64) {
    let r = [
        static_call!(LIB_A)(x),
        static_call!(LIB_A)(x),
        static_call!(LIB_B)(x),
    ];
    // SAFETY: by the caller's promise.
    unsafe { core::ptr::copy_nonoverlapping(r.as_ptr(), out, 3) };
}

/// `which == 0`: A = x+1, B = x+100; otherwise A = x+2, B = x+200. Synchronous, like `update`.
#[unsafe(no_mangle)]
pub extern "C" fn sclib_update(which: u32) {
    if which == 0 {
        LIB_A.update(add1);
        LIB_B.update(add100);
    } else {
        LIB_A.update(add2);
        LIB_B.update(add200);
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn sclib_flush() {
    static_call::flush();
}

/// One registered site, as the library's copy of static-call reports it.
#[repr(C)]
pub struct SiteRecord {
    /// 0 for `LIB_A`, 1 for `LIB_B`.
    pub key_index: u64,
    /// The key's address (what the site's `lea r11` must load).
    pub key: usize,
    /// The site's `call` instruction.
    pub address: usize,
    /// 0 pending, 1 patched, 2 on the trampoline.
    pub state: u64,
    /// The key's `query()`: what a patched site must call.
    pub target: usize,
}

/// Fills `out` with up to `cap` sites of both keys; returns how many there are.
///
/// # Safety
/// `out` points to `cap` writable records.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sclib_sites(out: *mut SiteRecord, cap: usize) -> usize {
    let keys: [(&static_call::StaticCall<extern "C" fn(i64) -> i64>, u64); 2] =
        [(&LIB_A, 0), (&LIB_B, 1)];
    let mut n = 0;
    for (key, index) in keys {
        let target = key.query() as usize;
        for site in key.sites() {
            if n < cap {
                let state = match site.state {
                    SiteState::Pending => 0,
                    SiteState::Patched => 1,
                    SiteState::Trampoline(_) => 2,
                    _ => 3,
                };
                let record = SiteRecord {
                    key_index: index,
                    key: key.as_ptr() as usize,
                    address: site.address,
                    state,
                    target,
                };
                // SAFETY: n < cap, by the caller's promise.
                unsafe { out.add(n).write(record) };
            }
            n += 1;
        }
    }
    n
}

/// The library's copy's trampoline.
#[unsafe(no_mangle)]
pub extern "C" fn sclib_trampoline() -> usize {
    static_call::trampoline_address().unwrap_or(0)
}

fn write_str(s: &str, buf: *mut u8, cap: usize) -> usize {
    let n = s.len().min(cap);
    // SAFETY: the caller of the exported function promised `cap` writable bytes at `buf`.
    unsafe { core::ptr::copy_nonoverlapping(s.as_ptr(), buf, n) };
    n
}

/// `format!("{:?}", static_call::status())` of the library's copy, into `buf`; returns its length.
///
/// # Safety
/// `buf` points to `cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sclib_status(buf: *mut u8, cap: usize) -> usize {
    write_str(&format!("{:?}", static_call::status()), buf, cap)
}

/// `static_call::stats().writes` of the library's copy.
#[unsafe(no_mangle)]
pub extern "C" fn sclib_writes() -> u64 {
    static_call::stats().writes
}

/// The accident the library must not rely on: a std thread, without any static call. While a
/// thread of this library is alive, glibc keeps the library loaded (the thread's thread-local
/// destructors name it), whatever static-call does.
#[unsafe(no_mangle)]
pub extern "C" fn sclib_spawn_parked_thread() {
    std::thread::spawn(|| {
        loop {
            std::thread::park();
        }
    });
}

define_static_branch!(LIB_BRANCH: bool = false);

/// The library's branch site.
#[inline(never)]
fn lib_branch_site() -> bool {
    static_branch!(LIB_BRANCH)
}

/// Switches `LIB_BRANCH` (`set` 0 or 1; -1 leaves it) and runs its site: 1 if it took its branch.
#[unsafe(no_mangle)]
pub extern "C" fn sclib_branch(set: i32) -> i32 {
    if set >= 0 {
        LIB_BRANCH.set(set == 1);
    }
    i32::from(lib_branch_site())
}

/// The branch site's address and state (0 pending, 1 patched, 2 stub, 3 other) into `out`, as
/// the library's copy reports it; returns the number of sites.
///
/// # Safety
/// `out` points to two writable `usize`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sclib_branch_site(out: *mut usize) -> usize {
    static_call::flush();
    let sites = LIB_BRANCH.sites();
    if let Some(site) = sites.first() {
        let state = match site.state {
            SiteState::Pending => 0,
            SiteState::Patched => 1,
            SiteState::Trampoline(_) => 2,
            _ => 3,
        };
        // SAFETY: by the caller's promise.
        unsafe { out.write(site.address) };
        // SAFETY: by the caller's promise.
        unsafe { out.add(1).write(state) };
    }
    sites.len()
}

/// The function holding the branch site, whose code the test scans for the site before it runs.
#[unsafe(no_mangle)]
pub extern "C" fn sclib_branch_function() -> usize {
    lib_branch_site as fn() -> bool as usize
}

/// `LIB_BRANCH`'s address, which the branch site's stub binds.
#[unsafe(no_mangle)]
pub extern "C" fn sclib_branch_key() -> usize {
    LIB_BRANCH.as_ptr() as usize
}

// --- a Rust key in the library -------------------------------------------------------------------

fn find(n: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == n)
}
define_static_call!(LIB_FIND: fn(u8, &[u8]) -> Option<usize> = find);

/// Where the library's Rust-key site is and what it must call, for the test to decode.
#[repr(C)]
#[derive(Default)]
pub struct RustReport {
    /// 0 if every check passed, else the number of the first that failed.
    pub failed: u64,
    /// The site's `call` instruction (0 if none is registered).
    pub site: usize,
    /// What `LIB_FIND`'s sites must call: the key's first word, its adapter.
    pub func: usize,
}

#[inline(never)]
fn find_x(hay: &[u8]) -> Option<usize> {
    static_call!(LIB_FIND)(b'x', hay)
}

/// Runs a Rust key inside the library: results, patching, `update` with a closure, and a panic
/// caught in the library (its payload travels through the library's own thread-local, which in
/// a shared library is reached through `__tls_get_addr`).
#[unsafe(no_mangle)]
pub extern "C" fn sclib_rust(out: &mut RustReport) {
    out.failed = sclib_rust_checks();
    static_call::flush();
    out.site = LIB_FIND.sites().first().map_or(0, |s| s.address);
    // SAFETY: a key's first word is its `func`, an aligned pointer-sized atomic.
    out.func = unsafe {
        (*(&*LIB_FIND as *const _ as *const core::sync::atomic::AtomicUsize))
            .load(core::sync::atomic::Ordering::Acquire)
    };
}

fn sclib_rust_checks() -> u64 {
    if find_x(b"axb") != Some(1) {
        return 1;
    }
    static_call::flush();
    if find_x(b"abx") != Some(2) {
        return 2;
    }
    LIB_FIND.update(|n, h| h.iter().rposition(|&b| b == n));
    if find_x(b"xax") != Some(2) {
        return 3;
    }
    LIB_FIND.update(|_, _| panic!("in the library"));
    match std::panic::catch_unwind(|| find_x(b"x")) {
        Err(p) if p.downcast_ref::<&str>() == Some(&"in the library") => {}
        _ => return 4,
    }
    LIB_FIND.update(find);
    if find_x(b"xx") != Some(0) {
        return 5;
    }
    0
}
