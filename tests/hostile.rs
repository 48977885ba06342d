//! Hostile environments and unusual code: every way patching can be refused or subverted must
//! leave calls correct, say why, and never write where it should not.
//!
//! Each scenario changes the whole process (W^X, seccomp, environment, signals, fork, hand-made
//! code), so it runs in a child: this test binary runs again, filtered to one test, with
//! `STATIC_CALL_SCENARIO` naming it; in the child the test body runs, in the parent the test
//! only spawns the child (with a time limit) and checks that it passed.
#![cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{assert_calls, decode, rwx_mappings, scenario, trampoline};
use iced_x86::Code;
use static_call::{
    Disabled, ErrorKind, Reason, SiteInfo, SiteState, WorkerStatus, define_static_call, static_call,
};

// --- what the scenarios call ---------------------------------------------------------------

extern "C" fn inc(x: u64) -> u64 {
    x + 1
}
extern "C" fn dbl(x: u64) -> u64 {
    x * 2
}

define_static_call!(K: extern "C" fn(u64) -> u64 = inc);

/// Two sites: with `inc` it returns 2x + 3, with `dbl` 4x + 2.
#[inline(never)]
fn two_sites(x: u64) -> u64 {
    static_call!(K)(x) + static_call!(K)(x + 1)
}

#[inline(never)]
fn another_site(x: u64) -> u64 {
    static_call!(K)(x)
}

fn site_addresses() -> Vec<usize> {
    K.sites().iter().map(|s| s.address).collect()
}

const PR_SET_MDWE: i32 = 65;
const PR_MDWE_REFUSE_EXEC_GAIN: u64 = 1;

/// Forbids gaining execute permission for the rest of the process (W^X, as hardened services
/// do). False if the kernel does not know MDWE.
fn set_mdwe() -> bool {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0u64, 0u64, 0u64) };
    if r != 0 {
        let e = io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EINVAL),
            "prctl(PR_SET_MDWE): {e}"
        );
        println!("note: this kernel has no MDWE; the scenario checks nothing more");
    }
    r == 0
}

/// Installs a seccomp filter (see `common::install_seccomp`); the scenarios need it to work.
fn install_seccomp(deny: &[(i64, i32)]) {
    assert!(
        common::install_seccomp(deny),
        "seccomp: {}",
        io::Error::last_os_error()
    );
}

fn assert_all_on_trampoline(why: Reason) {
    let sites = K.sites();
    assert!(!sites.is_empty());
    for s in sites {
        assert_eq!(s.state, SiteState::Trampoline(why), "{s:?}");
        assert_calls(s.address, trampoline(), "trampoline");
    }
}

fn assert_all_patched() {
    let sites = K.sites();
    assert!(!sites.is_empty());
    for s in sites {
        assert_eq!(s.state, SiteState::Patched, "{s:?}");
        assert_calls(s.address, K.query() as usize, "the key's target");
    }
}

// --- code that cannot be written -----------------------------------------------------------

scenario! {
    /// W^X enforced before the first call: every call and update stays correct through the
    /// trampoline, each site says why, mprotect is tried once (not on every call), and no
    /// writable-executable mapping ever appears.
    fn mdwe_before_the_first_call() {
        if !set_mdwe() {
            return;
        }
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        let refused = Disabled::WriteRefused { errno: libc::EACCES };
        assert_eq!(static_call::status().patching, Err(refused));
        assert_all_on_trampoline(Reason::Disabled(refused));
        let attempts = static_call::stats().mprotects;
        assert!(attempts <= 1, "one refused attempt at most: {attempts}");
        for x in 0..10_000 {
            assert_eq!(two_sites(x), 2 * x + 3);
        }
        assert_eq!(another_site(1), 2);
        static_call::flush();
        K.update(dbl);
        assert_eq!(two_sites(1), 6);
        assert_eq!(another_site(1), 2);
        assert_all_on_trampoline(Reason::Disabled(refused));
        assert_eq!(static_call::stats().mprotects, attempts, "no retries");
        assert_eq!(rwx_mappings(), Vec::<String>::new());
    }
}

scenario! {
    /// W^X enforced after sites were patched: they can no longer be rewritten, so `update` fails
    /// as a whole and changes nothing: the key, the patched sites and the trampoline path all
    /// keep the old target.
    fn mdwe_after_patching_makes_update_all_or_nothing() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_all_patched();
        let before: Vec<_> = site_addresses().iter().map(|&a| decode(a).near_branch64()).collect();
        if !set_mdwe() {
            return;
        }
        let err = K.try_update(dbl).unwrap_err();
        assert_eq!(err.kind, ErrorKind::WriteRefused { errno: libc::EACCES }, "{err}");
        assert!(err.site.is_some());
        assert_eq!(K.query()(1), 2, "the key keeps its old target");
        let after: Vec<_> = site_addresses().iter().map(|&a| decode(a).near_branch64()).collect();
        assert_eq!(before, after, "no site changed");
        assert_eq!(two_sites(1), 5);
        // A fresh site goes through the trampoline, to the same (old) target.
        assert_eq!(another_site(1), 2);
        assert!(K.try_update(dbl).is_err(), "and again, without crashing");
        assert_eq!(two_sites(1), 5);
    }
}

scenario! {
    /// Returning every site to the trampoline before sandboxing keeps `update` working after.
    fn unpatch_all_before_mdwe_keeps_update_working() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_all_patched();
        static_call::unpatch_all().unwrap();
        assert_all_on_trampoline(Reason::Disabled(Disabled::Unpatched));
        if !set_mdwe() {
            return;
        }
        K.update(dbl);
        assert_eq!(two_sites(1), 6);
        assert_eq!(another_site(1), 2);
        static_call::flush();
        assert_all_on_trampoline(Reason::Disabled(Disabled::Unpatched));
        assert_eq!(static_call::status().patching, Err(Disabled::Unpatched));
    }
}

scenario! {
    /// The documented off switch.
    fn the_environment_variable_switches_patching_off() env ["STATIC_CALL_DISABLE" = "1"] {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_eq!(static_call::status().patching, Err(Disabled::EnvVar));
        assert_eq!(static_call::status().worker, WorkerStatus::NotStarted);
        assert_all_on_trampoline(Reason::Disabled(Disabled::EnvVar));
        K.update(dbl);
        assert_eq!(two_sites(1), 6);
        assert_eq!(static_call::stats().mprotects, 0);
    }
}

scenario! {
    /// An old kernel without core-serialising membarriers (injected: the filter makes
    /// membarrier fail with ENOSYS): no patching, correct calls. An mprotect round trip is no
    /// substitute, so there is no fallback that patches.
    fn without_membarrier_sync_core_nothing_is_patched() env ["STATIC_CALL_SECCOMP" = "allow"] {
        install_seccomp(&[(libc::SYS_membarrier, libc::ENOSYS)]);
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        let off = Disabled::NoCoreSync { errno: libc::ENOSYS };
        assert_eq!(static_call::status().patching, Err(off));
        assert_all_on_trampoline(Reason::Disabled(off));
        K.update(dbl);
        assert_eq!(two_sites(1), 6);
        assert_eq!(static_call::stats().mprotects, 0);
    }
}

scenario! {
    /// The seccomp policy: a filter active when the library initialises switches patching off,
    /// because some filters kill the process on membarrier or mprotect(PROT_EXEC).
    fn a_seccomp_filter_switches_patching_off() {
        install_seccomp(&[]);
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_eq!(static_call::status().patching, Err(Disabled::Seccomp));
        assert_all_on_trampoline(Reason::Disabled(Disabled::Seccomp));
        K.update(dbl);
        assert_eq!(two_sites(1), 6);
    }
}

scenario! {
    /// The worker thread cannot start (thread creation fails with EAGAIN, as at a thread
    /// limit): calls stay correct, the status says why, and flush() patches in the caller.
    fn when_the_worker_cannot_start_calls_stay_correct() env ["STATIC_CALL_SECCOMP" = "allow"] {
        install_seccomp(&[(libc::SYS_clone3, libc::EAGAIN), (libc::SYS_clone, libc::EAGAIN)]);
        assert_eq!(two_sites(1), 5);
        assert_eq!(static_call::status().worker, WorkerStatus::Failed { errno: libc::EAGAIN });
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_all_patched();
        K.update(dbl);
        assert_eq!(two_sites(1), 6);
        assert_all_patched();
    }
}

scenario! {
    /// A full patch queue and a full registry lose no call. With no worker (thread creation
    /// fails), a registry of 64 sites and so a queue of 16, the first 40 sites fill the queue and
    /// the rest wait in RETRY; flush() patches all 40. Sites beyond the registry's 64 stay
    /// unregistered, on the trampoline, and the status says the registry is full.
    fn a_full_queue_and_a_full_registry_lose_no_call()
        env ["STATIC_CALL_SECCOMP" = "allow", "STATIC_CALL_MAX_SITES" = "64"]
    {
        install_seccomp(&[(libc::SYS_clone3, libc::EAGAIN), (libc::SYS_clone, libc::EAGAIN)]);
        let expect = |i: u64| (i + i % 64) + 1;
        for i in 0..40 {
            assert_eq!(many_sites(i), expect(i));
        }
        let status = static_call::status();
        assert_eq!((status.sites, status.capacity, status.registry_full), (40, 64, false));
        static_call::flush();
        let sites = KEY_A.sites();
        assert_eq!(sites.len(), 40);
        for s in sites {
            assert_eq!(s.state, SiteState::Patched, "{s:?}");
            assert_calls(s.address, KEY_A.query() as usize, "inc");
        }
        for i in 40..128 {
            assert_eq!(many_sites(i), expect(i));
        }
        assert_eq!(two_sites(1), 5, "sites the full registry cannot hold still work");
        let status = static_call::status();
        assert_eq!((status.sites, status.registry_full), (64, true));
        assert!(K.sites().is_empty());
        K.update(dbl);
        assert_eq!(two_sites(1), 6);
    }
}

// --- code that is not ordinary -------------------------------------------------------------

/// Writes one byte of code, as a debugger placing a breakpoint does.
fn poke_code(addr: usize, byte: u8) {
    let page = addr & !4095;
    // SAFETY: the page is a text page of this program; it stays executable throughout, and no
    // other thread runs the byte being changed (the scenario is single-threaded apart from the
    // idle patcher).
    unsafe {
        assert_eq!(
            libc::mprotect(
                page as *mut _,
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC
            ),
            0
        );
        core::ptr::write_volatile(addr as *mut u8, byte);
        assert_eq!(
            libc::mprotect(page as *mut _, 4096, libc::PROT_READ | libc::PROT_EXEC),
            0
        );
    }
}

scenario! {
    /// A site whose bytes someone else changed (a debugger's int3 over a patched call) is never
    /// overwritten; `update` fails and changes nothing; once the bytes are back, it works.
    fn foreign_bytes_are_never_overwritten() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_all_patched();
        let victim = site_addresses()[0];
        poke_code(victim, 0xcc);
        let err = K.try_update(dbl).unwrap_err();
        assert_eq!((err.kind, err.site), (ErrorKind::ForeignBytes, Some(victim)), "{err}");
        assert_eq!(common::read(victim, 1), vec![0xcc], "the int3 is still there");
        assert_eq!(K.query()(1), 2, "the key keeps its old target");
        for s in site_addresses().into_iter().filter(|&s| s != victim) {
            assert_calls(s, K.query() as usize, "the old target");
        }
        poke_code(victim, 0xe8);
        K.update(dbl);
        assert_all_patched();
        assert_eq!(two_sites(1), 6);
    }
}

extern "C" fn triple(x: u64) -> u64 {
    x * 3
}

define_static_call!(OTHER: extern "C" fn(u64) -> u64 = dbl);

#[inline(never)]
fn both_keys(x: u64) -> (u64, u64) {
    (static_call!(K)(x), static_call!(OTHER)(x))
}

scenario! {
    /// A batch rewrites the sites of several keys in one pass with one core sync (after one
    /// more, before anything is published, that checks membarrier still works), and is all or
    /// nothing across keys: foreign bytes at one key's site leave every key as it was.
    fn a_batch_is_one_sync_and_all_or_nothing_across_keys() {
        assert_eq!(both_keys(5), (6, 10));
        static_call::flush();
        let before = static_call::stats();
        static_call::Batch::new().update(&K, triple).update(&OTHER, inc).commit();
        let after = static_call::stats();
        assert_eq!((after.batches - before.batches, after.core_syncs - before.core_syncs), (1, 2));
        assert_eq!(both_keys(5), (15, 6));
        for s in K.sites().into_iter().chain(OTHER.sites()) {
            assert_eq!(s.state, SiteState::Patched);
        }
        assert_calls(K.sites()[0].address, K.query() as usize, "triple");
        assert_calls(OTHER.sites()[0].address, OTHER.query() as usize, "inc");

        let victim = OTHER.sites()[0].address;
        poke_code(victim, 0xcc);
        let err = static_call::Batch::new().update(&K, dbl).update(&OTHER, dbl).try_commit().unwrap_err();
        assert_eq!((err.kind, err.site), (ErrorKind::ForeignBytes, Some(victim)));
        assert_eq!(K.query()(5), 15, "K kept its target although only OTHER's site was foreign");
        assert_calls(K.sites()[0].address, K.query() as usize, "triple");
        poke_code(victim, 0xe8);
        static_call::Batch::new().update(&K, dbl).update(&OTHER, dbl).commit();
        assert_eq!(both_keys(5), (10, 10));
    }
}

define_static_call!(KEY_A: extern "C" fn(u64) -> u64 = inc);
define_static_call!(KEY_B: extern "C" fn(u64) -> u64 = dbl);

/// Maps a page of anonymous code within ±2 GiB of `near`, so that its rel32 calls reach.
fn map_code_near(near: usize) -> *mut u8 {
    for step in 1..64usize {
        let hint = (near & !0xfff_ffff).wrapping_sub(step << 24);
        // SAFETY: a fresh anonymous mapping at a free address (MAP_FIXED_NOREPLACE never
        // replaces an existing mapping).
        let p = unsafe {
            libc::mmap(
                hint as *mut _,
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return p as *mut u8;
        }
    }
    panic!("no free page near {near:#x}");
}

fn rel32(from_end: usize, to: usize) -> [u8; 4] {
    i32::try_from(to as i64 - from_end as i64)
        .unwrap()
        .to_le_bytes()
}

scenario! {
    /// Code that copies our exact site bytes into anonymous memory and adds a second entry that
    /// jumps straight to the `call` with another key in r11: both entries always reach their
    /// own key's target, and the copy, not being in a loaded object's code, is never patched.
    /// A misaligned copy is refused too.
    fn copied_sites_in_anonymous_memory_are_never_patched() {
        let page = map_code_near(trampoline());
        let base = page as usize;
        // Each entry first pushes 8 bytes, as compiled code does, so that the trampoline is
        // entered with the stack aligned as the ABI requires.
        let mut code = Vec::new();
        // Entry A at 0: push rax; lea r11, [rip + KEY_A]; call trampoline (at 8, aligned);
        // pop rcx; ret.
        code.push(0x50);
        code.extend([0x4c, 0x8d, 0x1d]);
        code.extend(rel32(base + 8, KEY_A.as_ptr() as usize));
        code.push(0xe8);
        code.extend(rel32(base + 13, trampoline()));
        code.extend([0x59, 0xc3]);
        code.resize(16, 0xcc);
        // Entry B at 16: push rax; mov r11, rsi; jmp 8 (straight to the call).
        code.extend([0x50, 0x49, 0x89, 0xf3, 0xeb, (8i32 - 22) as u8]);
        code.resize(33, 0xcc);
        // A misaligned copy at 33: push rax; lea; nop; call at 42; pop rcx; ret.
        code.push(0x50);
        code.extend([0x4c, 0x8d, 0x1d]);
        code.extend(rel32(base + 41, KEY_A.as_ptr() as usize));
        code.push(0x90);
        code.push(0xe8);
        code.extend(rel32(base + 47, trampoline()));
        code.extend([0x59, 0xc3]);
        // SAFETY: the page is ours, writable, and `code` fits in it.
        unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), page, code.len()) };
        // SAFETY: entry A is `extern "C" fn(u64) -> u64` (the key's target gets rdi); entry B
        // additionally takes the key in rsi; the misaligned copy is like entry A.
        let (entry_a, entry_b, misaligned): (
            extern "C" fn(u64) -> u64,
            extern "C" fn(u64, *const ()) -> u64,
            extern "C" fn(u64) -> u64,
        ) = unsafe {
            (
                core::mem::transmute::<*mut u8, extern "C" fn(u64) -> u64>(page),
                core::mem::transmute::<*mut u8, extern "C" fn(u64, *const ()) -> u64>(page.add(16)),
                core::mem::transmute::<*mut u8, extern "C" fn(u64) -> u64>(page.add(33)),
            )
        };
        for round in 0..100u64 {
            assert_eq!(entry_a(round), KEY_A.query()(round), "round {round}");
            assert_eq!(entry_b(round, KEY_B.as_ptr()), KEY_B.query()(round), "round {round}");
            assert_eq!(entry_b(round, KEY_A.as_ptr()), KEY_A.query()(round), "round {round}");
            assert_eq!(misaligned(round), KEY_A.query()(round), "round {round}");
            if round % 10 == 0 {
                static_call::flush();
            }
            if round == 50 {
                KEY_A.update(dbl);
                KEY_B.update(inc);
            }
        }
        static_call::flush();
        let copied: Vec<_> = KEY_A.sites().into_iter().chain(KEY_B.sites()).collect();
        assert_eq!(copied.len(), 2, "{copied:?}");
        for s in copied {
            assert_eq!(s.state, SiteState::Trampoline(Reason::NotASite), "{s:?}");
            assert_calls(s.address, trampoline(), "trampoline");
        }
    }
}

unsafe extern "C" {
    fn labs(x: i64) -> i64;
}

extern "C" fn neg(x: i64) -> i64 {
    -x
}

define_static_call!(FAR: unsafe extern "C" fn(i64) -> i64 = labs);

#[inline(never)]
fn far_site(x: i64) -> i64 {
    // SAFETY: every target of FAR is safe to call with any i64.
    unsafe { static_call!(FAR)(x) }
}

/// Asserts that the site at `site` calls a near thunk that jumps to `target` (`jmp qword ptr
/// [rip + 0]` followed by the target's address, in a read-execute page, never writable), and
/// returns the thunk's address.
#[track_caller]
fn assert_calls_through_thunk(site: usize, target: usize, what: &str) -> usize {
    let thunk = common::call_target(site).unwrap_or_else(|| {
        panic!(
            "site {site:#x} should call a thunk to {what}: {:?}",
            decode(site)
        )
    });
    assert_ne!(
        thunk,
        trampoline(),
        "site {site:#x} is on the trampoline, not on a thunk"
    );
    assert_ne!(thunk, target, "a far target cannot be called directly");
    let jmp = decode(thunk);
    assert_eq!(
        jmp.code(),
        Code::Jmp_rm64,
        "thunk {thunk:#x}: {}",
        common::format(&jmp)
    );
    assert!(jmp.is_ip_rel_memory_operand() && jmp.ip_rel_memory_address() == thunk as u64 + 6);
    let held = u64::from_le_bytes(common::read(thunk + 6, 8).try_into().unwrap()) as usize;
    assert_eq!(
        held, target,
        "thunk {thunk:#x} should jump to {what} ({target:#x})"
    );
    let perms = common::mapping_of(thunk).perms;
    assert_eq!(&perms[..3], "r-x", "thunk page of {thunk:#x}");
    thunk
}

/// Copies `code` into fresh anonymous memory, wherever the kernel puts it (usually far from the
/// program, among the shared libraries), makes it read-execute and returns its address.
fn map_code(code: &[u8]) -> usize {
    let len = code.len().next_multiple_of(4096);
    // SAFETY: a fresh anonymous mapping, filled then made read-execute.
    unsafe {
        let p = libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        core::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
        assert_eq!(libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC), 0);
        p as usize
    }
}

/// `lea rax, [rdi + n]; ret`: a function `x + n`, 5 bytes.
fn add_n(n: i8) -> [u8; 5] {
    [0x48, 0x8d, 0x47, n as u8, 0xc3]
}

/// Calls `FAR`'s site once (with `FAR` on libc's `labs`) and waits until it is settled; returns
/// its sites, or `None`, with a note, where libc lies within 2 GiB of the program (then there is
/// no far target to test with).
fn far_site_settled() -> Option<Vec<SiteInfo>> {
    let distance = (labs as *const () as usize).abs_diff(far_site as *const () as usize);
    if distance < (2usize << 30) {
        println!("note: libc is within 2 GiB of the program here; nothing to check");
        return None;
    }
    assert_eq!(far_site(-5), 5);
    static_call::flush();
    Some(FAR.sites())
}

scenario! {
    /// A target beyond ±2 GiB of a site (a libc function, code in a far anonymous page) is
    /// never called with a truncated rel32: the site calls a near thunk that jumps to it. One
    /// thunk per far target, reused when the key comes back to it; `update` moves sites between
    /// direct calls and thunks, all before it returns.
    fn far_targets_are_reached_through_a_near_thunk() {
        let Some(sites) = far_site_settled() else { return };
        assert_eq!(sites.len(), 1);
        let site = sites[0].address;
        assert_eq!(sites[0].state, SiteState::Patched);
        let to_labs = assert_calls_through_thunk(site, labs as *const () as usize, "labs");
        assert_eq!(far_site(-5), 5);
        assert_eq!(static_call::status().thunks, 1);
        assert_eq!(static_call::status().thunk_error, None);
        let (reserve, reserve_end) = static_call::__private::code_pool_reserve();
        assert!(
            (reserve..reserve_end).contains(&common::call_target(site).unwrap()),
            "the thunk is in the code pool's reserve in our own text, which has CFI"
        );
        let pages = static_call::stats().thunk_pages;
        assert_eq!(pages, 0, "no page mapped while the reserve has room");

        FAR.update(neg);
        assert_calls(site, FAR.query() as usize, "neg");
        assert_eq!(far_site(-5), 5, "neg(-5)");

        // JIT-like code far away gets its own thunk, in the same page.
        // SAFETY: `x + 7` is a function of this signature.
        let jit: unsafe extern "C" fn(i64) -> i64 =
            unsafe { core::mem::transmute(map_code(&add_n(7))) };
        if (jit as usize).abs_diff(site) >= (2usize << 30) {
            FAR.update(jit);
            let to_jit = assert_calls_through_thunk(site, jit as usize, "the JIT code");
            assert_ne!(to_jit, to_labs);
            assert_eq!(far_site(5), 12);
            assert_eq!(static_call::status().thunks, 2);
        }
        // Back to libc: the same thunk, nothing new mapped or written.
        FAR.update(labs);
        assert_eq!(assert_calls_through_thunk(site, labs as *const () as usize, "labs"), to_labs);
        assert_eq!(far_site(-5), 5);
        assert_eq!(static_call::stats().thunk_pages, pages);
        assert!(rwx_mappings().is_empty(), "{:?}", rwx_mappings());

        FAR.update(neg);
        assert_calls(site, FAR.query() as usize, "neg");
        assert_eq!(far_site(5), -5);
    }
}

/// Pages the library maps at most once the code pool's reserve is used up, and thunks per page:
/// 4 KiB pages of 16-byte thunks; and thunks in the reserve.
const THUNK_PAGES: usize = static_call::__private::MAX_MAPPED_PAGES;
const THUNKS_PER_PAGE: usize = 4096 / 16;
const RESERVE_THUNKS: usize = static_call::__private::POOL_BYTES / 16;
/// Keys with no site, whose updates make thunks in bulk.
static FILLERS: [static_call::StaticCall<unsafe extern "C" fn(i64) -> i64>; 1024] =
    [const { static_call::StaticCall::new(labs as unsafe extern "C" fn(i64) -> i64) }; 1024];

scenario! {
    /// When no thunk can be made (here: every thunk slot is used, in the reserve and in every
    /// page the pool may map), a far target is still called correctly, through the trampoline,
    /// and the site and `status()` say why.
    fn when_thunks_run_out_far_targets_stay_on_the_trampoline() {
        let Some(sites) = far_site_settled() else { return };
        let site = sites[0].address;
        // Far code with one function every 8 bytes: `lea rax, [rdi + 1]; ret`.
        let n = RESERVE_THUNKS + THUNK_PAGES * THUNKS_PER_PAGE;
        let mut code = Vec::with_capacity(n * 8);
        for _ in 0..n {
            code.extend_from_slice(&add_n(1));
            code.extend_from_slice(&[0xcc; 3]);
        }
        let base = map_code(&code);
        if base.abs_diff(site) < (2usize << 30) {
            println!("note: the far code landed within 2 GiB; nothing to check");
            return;
        }
        // labs took one slot: n - 1 more fill every slot. A batch makes the thunks of all its
        // targets in one pass, whether or not their keys have sites: spare keys, `FILLERS` at a
        // time, then FAR itself for the last one.
        let far_fn = |i: usize| -> unsafe extern "C" fn(i64) -> i64 {
            // SAFETY: each 8-byte slot holds a function of this signature.
            unsafe { core::mem::transmute(base + 8 * i) }
        };
        for chunk in (0..n - 2).collect::<Vec<_>>().chunks(FILLERS.len()) {
            let batch = chunk
                .iter()
                .zip(&FILLERS)
                .fold(static_call::Batch::new(), |b, (&i, key)| b.update(key, far_fn(i)));
            batch.commit();
        }
        FAR.update(far_fn(n - 2));
        assert_calls_through_thunk(site, base + 8 * (n - 2), "the last far function");
        assert_eq!(far_site(1), 2);
        let status = static_call::status();
        assert_eq!((status.thunks, status.thunk_error), (n, None));
        assert_eq!(static_call::stats().thunk_pages, THUNK_PAGES as u64);

        // One more far target: no slot left.
        // SAFETY: as above.
        let last: unsafe extern "C" fn(i64) -> i64 =
            unsafe { core::mem::transmute(base + 8 * (n - 1)) };
        FAR.update(last);
        assert_eq!(FAR.sites()[0].state, SiteState::Trampoline(Reason::TargetOutOfRange));
        assert_calls(site, trampoline(), "trampoline");
        assert_eq!(far_site(1), 2);
        assert_eq!(static_call::status().thunk_error, Some(0), "pages used up");
        // Targets with a thunk still get it.
        FAR.update(labs);
        assert_eq!(FAR.sites()[0].state, SiteState::Patched);
        assert_calls_through_thunk(site, labs as *const () as usize, "labs");
        assert_eq!(far_site(-5), 5);
        assert!(rwx_mappings().is_empty(), "{:?}", rwx_mappings());
    }
}

// --- fork ----------------------------------------------------------------------------------

#[inline(never)]
fn site_only_the_child_runs(x: u64) -> u64 {
    static_call!(K)(x)
}

/// In a forked child: inherited patched sites work, a new site gets patched (a new worker
/// starts), `update` works. Exits the child with the verdict.
fn check_forked_child() -> ! {
    let verdict = std::panic::catch_unwind(|| {
        let expected = |x: u64| K.query()(x);
        assert_eq!(two_sites(1), expected(1) + expected(2));
        assert_eq!(site_only_the_child_runs(1), expected(1));
        static_call::flush();
        for s in K.sites() {
            assert_eq!(s.state, SiteState::Patched, "{s:?}");
            assert_calls(s.address, K.query() as usize, "the key's target");
        }
        assert_eq!(
            static_call::status().worker,
            WorkerStatus::Running,
            "a new worker"
        );
        K.update(dbl);
        assert_eq!(two_sites(1), 6);
        for s in K.sites() {
            assert_calls(s.address, K.query() as usize, "dbl");
        }
    });
    // SAFETY: _exit ends the child without running the parent's atexit handlers twice.
    unsafe { libc::_exit(if verdict.is_ok() { 0 } else { 1 }) }
}

fn fork_and_check() {
    // SAFETY: the child only runs `check_forked_child`, which exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        check_forked_child();
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: status {status:#x}"
    );
}

scenario! {
    /// fork() while the parent's worker is idle.
    fn fork_with_an_idle_worker() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_all_patched();
        fork_and_check();
        // The parent is unaffected by what the child did.
        assert_eq!(two_sites(1), 5);
        assert_all_patched();
    }
}

/// Many distinct sites, to keep the worker busy registering and patching.
#[inline(never)]
fn many_sites(i: u64) -> u64 {
    macro_rules! arms {
        ($($n:literal)*) => {
            match i % 64 { $($n => static_call!(KEY_A)(i + $n),)* _ => unreachable!() }
        };
    }
    arms!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
        32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61
        62 63)
}

const BUSY_FORKS: usize = 20;

scenario! {
    /// fork() while the parent's worker is busy patching and other threads update and call:
    /// the child never inherits a lock held, a half-done pop or an open window.
    fn fork_with_a_busy_worker() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    KEY_A.update(if i.is_multiple_of(2) { dbl } else { inc });
                    i += 1;
                }
            });
            s.spawn(|| {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let r = many_sites(i);
                    let x = i + i % 64;
                    assert!(r == x + 1 || r == 2 * x, "{i}: {r}");
                    i += 1;
                }
            });
            for _ in 0..BUSY_FORKS {
                fork_and_check();
                std::thread::sleep(Duration::from_millis(2));
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
}

// --- signals -------------------------------------------------------------------------------

static HANDLED: AtomicU64 = AtomicU64::new(0);
static HANDLER_WRONG: AtomicU64 = AtomicU64::new(0);

/// Makes static calls, including the first call of sites that only the handler runs.
extern "C" fn on_timer(_: libc::c_int) {
    let n = HANDLED.fetch_add(1, Ordering::Relaxed);
    let first = static_call!(KEY_B)(n);
    let second = static_call!(KEY_B)(n + 1);
    let ok = |x: u64, r: u64| r == x + 1 || r == 2 * x;
    if !ok(n, first) || !ok(n + 1, second) {
        HANDLER_WRONG.fetch_add(1, Ordering::Relaxed);
    }
}

const SIGNAL_RUN: Duration = Duration::from_millis(1500);
const TIMER_PERIOD_NS: i64 = 20_000;

scenario! {
    /// A high-rate timer signal whose handler makes static calls, including first calls of new
    /// sites, interrupting a thread that keeps taking the patch lock in `update`: no deadlock,
    /// every call right.
    fn static_calls_in_signal_handlers_never_deadlock() {
        static_call::init();
        // SAFETY: installs an async-signal-safe handler and a timer that signals this thread.
        unsafe {
            let mut action: libc::sigaction = core::mem::zeroed();
            action.sa_sigaction = on_timer as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            assert_eq!(libc::sigaction(libc::SIGALRM, &action, core::ptr::null_mut()), 0);
            let mut event: libc::sigevent = core::mem::zeroed();
            event.sigev_notify = libc::SIGEV_THREAD_ID;
            event.sigev_signo = libc::SIGALRM;
            event.sigev_notify_thread_id = libc::gettid();
            let mut timer: libc::timer_t = core::ptr::null_mut();
            assert_eq!(libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer), 0);
            let period = libc::timespec { tv_sec: 0, tv_nsec: TIMER_PERIOD_NS };
            let spec = libc::itimerspec { it_interval: period, it_value: period };
            assert_eq!(libc::timer_settime(timer, 0, &spec, core::ptr::null_mut()), 0);
            let deadline = Instant::now() + SIGNAL_RUN;
            let mut i = 0u64;
            while Instant::now() < deadline {
                KEY_B.update(if i.is_multiple_of(2) { inc } else { dbl });
                let r = another_site(i);
                assert_eq!(r, i + 1);
                i += 1;
            }
            assert_eq!(libc::timer_delete(timer), 0);
        }
        let handled = HANDLED.load(Ordering::Relaxed);
        println!("{handled} signals handled");
        assert!(handled > 100, "the timer fired: {handled}");
        assert_eq!(HANDLER_WRONG.load(Ordering::Relaxed), 0);
        static_call::flush();
        for s in KEY_B.sites() {
            assert_eq!(s.state, SiteState::Patched, "{s:?}");
        }
    }
}
