//! A program that links three copies of static-call, for tests/two_copies.rs, which generates
//! its Cargo.toml, builds it and runs it:
//! - `sc_old`: this repository;
//! - `sc_new`: a copy with a semver-incompatible version (the major bumped);
//! - `sc_bypass`: another such copy whose cross-copy code lock symbol is renamed, so that it
//!   does not share the lock: two copies of the crate as they were before that lock existed.
//!
//! `two-copies MODE MILLIS`, MODE `shared` (sc_old against sc_new) or `bypass` (sc_old against
//! sc_bypass): the sites of both copies are interleaved in the same functions, so they share
//! pages; threads flip both copies' keys among three targets as fast as they can while other
//! threads keep calling every site and check each result. `shared` must survive and exits 0;
//! `bypass` is expected to die of SIGSEGV: one copy's `mprotect` back to `r-x` lands between the
//! other's `mprotect` to `rwx` and its write.
//!
//! `shared` also proves, before the hammering, that sc_old and sc_new wait on one lock word and
//! sc_bypass on another: while the test holds the word, updates of the copies that use it block.

use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

extern "C" fn o1(x: i64) -> i64 {
    x + 1
}
extern "C" fn o2(x: i64) -> i64 {
    x + 2
}
extern "C" fn o3(x: i64) -> i64 {
    x + 3
}
extern "C" fn n1(x: i64) -> i64 {
    x + 11
}
extern "C" fn n2(x: i64) -> i64 {
    x + 12
}
extern "C" fn n3(x: i64) -> i64 {
    x + 13
}
extern "C" fn b1(x: i64) -> i64 {
    x + 21
}
extern "C" fn b2(x: i64) -> i64 {
    x + 22
}
extern "C" fn b3(x: i64) -> i64 {
    x + 23
}

type F = extern "C" fn(i64) -> i64;
type Key = sc_old::StaticCall<F>;
type NewKey = sc_new::StaticCall<F>;
type BypassKey = sc_bypass::StaticCall<F>;

sc_old::define_static_call!(OLD_A: extern "C" fn(i64) -> i64 = o1);
sc_old::define_static_call!(OLD_B: extern "C" fn(i64) -> i64 = o2);
sc_new::define_static_call!(NEW_A: extern "C" fn(i64) -> i64 = n1);
sc_new::define_static_call!(NEW_B: extern "C" fn(i64) -> i64 = n2);
sc_bypass::define_static_call!(BYP_A: extern "C" fn(i64) -> i64 = b1);
sc_bypass::define_static_call!(BYP_B: extern "C" fn(i64) -> i64 = b2);

const OLD_TARGETS: [F; 3] = [o1, o2, o3];
const NEW_TARGETS: [F; 3] = [n1, n2, n3];
const BYPASS_TARGETS: [F; 3] = [b1, b2, b3];

// The lock word the copies merge into one (hidden common symbols), and the renamed one.
unsafe extern "C" {
    static static_call_code_lock_v1: AtomicU32;
    static static_call_code_lock_v1_bypass: AtomicU32;
}

/// Functions whose sites alternate between sc_old and the other copy: `[old A, other A, old
/// B, other B]`. Each adds its own constant around the calls, so that no two are identical and
/// the compiler cannot fold them into one (each keeps its own four sites).
macro_rules! mixed {
    ($family:ident, $other:ident, $oa:ident, $ob:ident, [$($name:ident = $k:literal)*]) => {
        $(
            #[inline(never)]
            fn $name(x: i64) -> [i64; 4] {
                [
                    sc_old::static_call!(OLD_A)(x + $k) - $k,
                    $other::static_call!($oa)(x + $k) - $k,
                    sc_old::static_call!(OLD_B)(x + $k) - $k,
                    $other::static_call!($ob)(x + $k) - $k,
                ]
            }
        )*
        const $family: &[fn(i64) -> [i64; 4]] = &[$($name),*];
    };
}

mixed!(SHARED, sc_new, NEW_A, NEW_B, [
    s0 = 100 s1 = 101 s2 = 102 s3 = 103 s4 = 104 s5 = 105 s6 = 106 s7 = 107
    s8 = 108 s9 = 109 s10 = 110 s11 = 111 s12 = 112 s13 = 113 s14 = 114 s15 = 115
]);
mixed!(BYPASS, sc_bypass, BYP_A, BYP_B, [
    b0 = 200 x1 = 201 x2 = 202 x3 = 203 x4 = 204 x5 = 205 x6 = 206 x7 = 207
    x8 = 208 x9 = 209 x10 = 210 x11 = 211 x12 = 212 x13 = 213 x14 = 214 x15 = 215
]);

/// On SIGSEGV, prints `segv addr=<fault address> code=<si_code>` and dies of it: the test checks
/// that the fault is a permission fault (SEGV_ACCERR, 2) on a site's quadword. Only
/// async-signal-safe work: format into a stack buffer, `write`, return (SA_RESETHAND: the
/// faulting write runs again and kills the process with the default action).
extern "C" fn on_segv(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    let mut buf = [0u8; 64];
    let mut n = 0;
    for &b in b"segv addr=0x" {
        buf[n] = b;
        n += 1;
    }
    for i in (0..16).rev() {
        buf[n] = b"0123456789abcdef"[(addr >> (i * 4)) & 0xf];
        n += 1;
    }
    for &b in b" code=" {
        buf[n] = b;
        n += 1;
    }
    buf[n] = b'0' + (code.clamp(0, 9) as u8);
    buf[n + 1] = b'\n';
    unsafe { libc::write(1, buf.as_ptr().cast(), n + 2) };
}

fn catch_segv() {
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigaction(libc::SIGSEGV, &sa, core::ptr::null_mut());
    }
}

#[inline(never)]
fn lone_bypass_site(x: i64) -> i64 {
    sc_bypass::static_call!(BYP_A)(x)
}

fn fail(msg: String) -> ! {
    eprintln!("FAIL: {msg}");
    exit(1)
}

fn page_size() -> usize {
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// The target of the `call rel32` at `addr`, if that is what it holds.
fn call_target(addr: usize) -> Option<usize> {
    let b: Vec<u8> = (0..5)
        .map(|i| unsafe { core::ptr::read_volatile((addr + i) as *const u8) })
        .collect();
    (b[0] == 0xe8).then(|| {
        let rel = i32::from_le_bytes([b[1], b[2], b[3], b[4]]);
        (addr as i64 + 5 + rel as i64) as usize
    })
}

/// Every registered site of the key: patched into `call <query()>`. Returns their addresses.
fn check_patched(name: &str, sites: Vec<(usize, bool)>, target: usize) -> Vec<usize> {
    if sites.is_empty() {
        fail(format!("{name}: no site registered"));
    }
    for &(addr, patched) in &sites {
        if !patched || call_target(addr) != Some(target) {
            fail(format!(
                "{name}: site {addr:#x} is not `call {target:#x}` (patched: {patched})"
            ));
        }
    }
    sites.into_iter().map(|(a, _)| a).collect()
}

fn old_sites(k: &Key) -> Vec<(usize, bool)> {
    let s = k.sites();
    s.iter()
        .map(|s| (s.address, s.state == sc_old::SiteState::Patched))
        .collect()
}
fn new_sites(k: &NewKey) -> Vec<(usize, bool)> {
    let s = k.sites();
    s.iter()
        .map(|s| (s.address, s.state == sc_new::SiteState::Patched))
        .collect()
}
fn bypass_sites(k: &BypassKey) -> Vec<(usize, bool)> {
    let s = k.sites();
    s.iter()
        .map(|s| (s.address, s.state == sc_bypass::SiteState::Patched))
        .collect()
}

/// Takes `word` by the code lock's protocol (0 free, 1 held, 2 held with waiters).
fn hold(word: &AtomicU32) {
    while word
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::yield_now();
    }
}

fn release(word: &AtomicU32) {
    if word.swap(0, Ordering::Release) == 2 {
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            )
        };
    }
}

/// Whether `update` (which must write code) waits on `word`: we hold the word, and either the
/// update finishes (it does not use the word) or a waiter marks the word contended (2), which
/// only a copy of the crate taking that very word does.
fn waits_on(word: &'static AtomicU32, update: fn()) -> bool {
    hold(word);
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let t = std::thread::spawn(move || {
        update();
        flag.store(true, Ordering::SeqCst);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let waited = loop {
        if word.load(Ordering::SeqCst) == 2 {
            break true;
        }
        if done.load(Ordering::SeqCst) {
            break false;
        }
        if Instant::now() > deadline {
            fail("an update neither finished nor waited on the lock word".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    release(word);
    t.join().unwrap();
    waited
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("shared");
    let millis: u64 = args.get(2).and_then(|m| m.parse().ok()).unwrap_or(1500);
    let bypass = match mode {
        "shared" => false,
        "bypass" => true,
        _ => fail(format!("unknown mode {mode}")),
    };

    catch_segv();
    let trampolines = [
        sc_old::trampoline_address(),
        sc_new::trampoline_address(),
        sc_bypass::trampoline_address(),
    ];
    println!("trampolines={trampolines:x?}");
    if trampolines.iter().any(Option::is_none)
        || trampolines[0] == trampolines[1]
        || trampolines[0] == trampolines[2]
        || trampolines[1] == trampolines[2]
    {
        fail("the three copies need three trampolines".into());
    }
    // Patching can be off for the whole process (STATIC_CALL_DISABLE, valgrind, ...): exit 2,
    // which the test reports as a skip.
    sc_old::init();
    sc_new::init();
    sc_bypass::init();
    let off = [
        sc_old::status().patching.err().map(|e| e.to_string()),
        sc_new::status().patching.err().map(|e| e.to_string()),
        sc_bypass::status().patching.err().map(|e| e.to_string()),
    ];
    if off.iter().any(Option::is_some) {
        println!("patching-off {off:?}");
        exit(2);
    }

    // First runs, then every site patched by its own copy.
    // In `bypass` mode, the two copies' workers already race here, patching the first runs.
    let family = if bypass { BYPASS } else { SHARED };
    println!("phase=first-runs");
    for f in family {
        f(0);
    }
    sc_old::flush();
    sc_new::flush();
    sc_bypass::flush();
    let old: Vec<usize> = [
        check_patched("OLD_A", old_sites(&OLD_A), OLD_A.query() as usize),
        check_patched("OLD_B", old_sites(&OLD_B), OLD_B.query() as usize),
    ]
    .concat();
    let other: Vec<usize> = if bypass {
        [
            check_patched("BYP_A", bypass_sites(&BYP_A), BYP_A.query() as usize),
            check_patched("BYP_B", bypass_sites(&BYP_B), BYP_B.query() as usize),
        ]
        .concat()
    } else {
        [
            check_patched("NEW_A", new_sites(&NEW_A), NEW_A.query() as usize),
            check_patched("NEW_B", new_sites(&NEW_B), NEW_B.query() as usize),
        ]
        .concat()
    };
    let page = page_size();
    let mut shared_pages: Vec<usize> = old
        .iter()
        .map(|a| a / page)
        .filter(|p| other.iter().any(|b| b / page == *p))
        .collect();
    shared_pages.sort();
    shared_pages.dedup();
    println!(
        "sites old={} other={} pages-with-both={}",
        old.len(),
        other.len(),
        shared_pages.len()
    );
    if shared_pages.is_empty() {
        fail("no page holds sites of both copies".into());
    }
    let list: Vec<String> = old.iter().chain(&other).map(|a| format!("{a:x}")).collect();
    println!("site-addresses={}", list.join(","));

    if !bypass {
        // A site of sc_bypass for the lock check, patched while the other copies are idle (it
        // has no lock in common with them).
        assert_eq!(lone_bypass_site(0), 21);
        sc_bypass::flush();
        check_patched("BYP_A", bypass_sites(&BYP_A), BYP_A.query() as usize);
        let (v1, v1_bypass) =
            unsafe { (&static_call_code_lock_v1, &static_call_code_lock_v1_bypass) };
        println!(
            "code-lock-words v1={:#x} v1_bypass={:#x}",
            v1.as_ptr() as usize,
            v1_bypass.as_ptr() as usize
        );
        let waits = [
            waits_on(v1, || OLD_A.update(o3)),
            waits_on(v1, || NEW_A.update(n3)),
            waits_on(v1, || BYP_A.update(b3)),
            waits_on(v1_bypass, || BYP_A.update(b1)),
            waits_on(v1_bypass, || OLD_A.update(o1)),
        ];
        println!(
            "lock-waits old-on-v1={} new-on-v1={} bypass-on-v1={} bypass-on-v1_bypass={} old-on-v1_bypass={}",
            waits[0], waits[1], waits[2], waits[3], waits[4]
        );
        if waits != [true, true, false, true, false] {
            fail(format!(
                "sc_old and sc_new must share one code lock word: {waits:?}"
            ));
        }
        NEW_A.update(n1);
        BYP_A.update(b1);
    }

    // The hammering.
    println!("phase=hammer");
    let stop = AtomicBool::new(false);
    let updates = [AtomicU64::new(0), AtomicU64::new(0)];
    let calls = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_millis(millis);
    let other_ok = |v: i64| {
        if bypass {
            (21..=23).contains(&v)
        } else {
            (11..=13).contains(&v)
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                OLD_A.update(OLD_TARGETS[i % 3]);
                OLD_B.update(OLD_TARGETS[(i + 1) % 3]);
                i += 1;
            }
            updates[0].store(i as u64, Ordering::Relaxed);
        });
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if bypass {
                    BYP_A.update(BYPASS_TARGETS[i % 3]);
                    BYP_B.update(BYPASS_TARGETS[(i + 1) % 3]);
                } else {
                    NEW_A.update(NEW_TARGETS[i % 3]);
                    NEW_B.update(NEW_TARGETS[(i + 1) % 3]);
                }
                i += 1;
            }
            updates[1].store(i as u64, Ordering::Relaxed);
        });
        for _ in 0..2 {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for f in family {
                        let r = f(0);
                        if !(1..=3).contains(&r[0])
                            || !other_ok(r[1])
                            || !(1..=3).contains(&r[2])
                            || !other_ok(r[3])
                        {
                            fail(format!("a call reached a foreign target: {r:?}"));
                        }
                    }
                    n += 1;
                }
                calls.fetch_add(n * family.len() as u64 * 4, Ordering::Relaxed);
            });
        }
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
    });

    // Settle on known targets: every site calls exactly them.
    OLD_A.update(o2);
    OLD_B.update(o3);
    let other_expect = if bypass {
        BYP_A.update(b2);
        BYP_B.update(b3);
        [22, 23]
    } else {
        NEW_A.update(n2);
        NEW_B.update(n3);
        [12, 13]
    };
    for f in family {
        let r = f(0);
        if r != [2, other_expect[0], 3, other_expect[1]] {
            fail(format!("after the last updates: {r:?}"));
        }
    }
    check_patched("OLD_A", old_sites(&OLD_A), OLD_A.query() as usize);
    check_patched("OLD_B", old_sites(&OLD_B), OLD_B.query() as usize);
    if bypass {
        check_patched("BYP_A", bypass_sites(&BYP_A), BYP_A.query() as usize);
    } else {
        check_patched("NEW_A", new_sites(&NEW_A), NEW_A.query() as usize);
        check_patched("NEW_B", new_sites(&NEW_B), NEW_B.query() as usize);
    }
    println!(
        "survived mode={mode} updates-old={} updates-other={} calls={}",
        updates[0].load(Ordering::Relaxed),
        updates[1].load(Ordering::Relaxed),
        calls.load(Ordering::Relaxed)
    );
}
