//! Failure paths: whatever step of patching fails, every site stays consistent with its key, and
//! `Ok` and every error kind mean what the docs say (docs/safety.md, "What an error leaves
//! behind").
//!
//! Failures are injected into the code writer through the crate's test seam
//! (`static_call::__private::faults`, on in test builds only): the n-th `mprotect`, site
//! compare-exchange (a debugger's `int3` lands on the site just before it), `membarrier` or thunk
//! mapping fails. Each case changes the whole process (patching may go off for good), so it runs
//! in a child process: the scenarios below, and the child of
//! `every_failure_of_every_step_leaves_every_site_consistent`, which tries every step of every
//! operation in turn.
#![cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]

mod common;

use std::ffi::{CStr, c_char};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use common::{
    assert_calls, call_destination, debugger_poke, mapping_of, read, rwx_mappings, scenario,
    trampoline,
};
use static_call::__private::faults::{self, Point, Step};
use static_call::static_call_fn;
use static_call::{
    Batch, Disabled, Error, ErrorKind, Reason, SiteInfo, SiteState, StaticCall, Target,
    WorkerStatus, define_static_branch, define_static_call, has_target, static_branch, static_call,
};

// --- keys, targets and the sites that call them --------------------------------------------

extern "C" fn inc(x: u64) -> u64 {
    x + 1
}
extern "C" fn dbl(x: u64) -> u64 {
    x * 2
}
extern "C" fn tri(x: u64) -> u64 {
    x * 3
}

/// What the hook has seen since it was last read.
static HOOKED: AtomicU64 = AtomicU64::new(0);
extern "C" fn note(x: u64) {
    HOOKED.fetch_add(x, Ordering::Relaxed);
}

/// `strlen` of our own, near the sites (libc's is usually beyond ±2 GiB: a thunk's target).
unsafe extern "C" fn my_strlen(s: *const c_char) -> usize {
    // SAFETY: callers pass a NUL-terminated string.
    unsafe { CStr::from_ptr(s) }.to_bytes().len()
}

define_static_call!(K: extern "C" fn(u64) -> u64 = inc);
define_static_call!(A: extern "C" fn(u64) -> u64 = inc);
define_static_call!(B: extern "C" fn(u64) -> u64 = dbl);
define_static_call!(H: extern "C" fn(u64) = note);
define_static_call!(Z: extern "C" fn(u64) -> u64 = inc);
define_static_call!(F: unsafe extern "C" fn(*const c_char) -> usize = my_strlen);
static_call_fn!(unsafe fn f_tail(s: *const c_char) -> usize = F);
define_static_branch!(BR: bool = false);
// A hook: a branch site (`has_target!`) and a call site of one call key.
define_static_call!(HK: extern "C" fn(u64) = None);

/// What the hook `HK` has seen since it was last read.
static HK_SEEN: AtomicU64 = AtomicU64::new(0);
extern "C" fn hk_note(x: u64) {
    HK_SEEN.fetch_add(x, Ordering::Relaxed);
}

/// Two keys called through one run-time site (a guard stub for both, once settled).
static R1: StaticCall<extern "C" fn(u64) -> u64> = StaticCall::new(inc);
static R2: StaticCall<extern "C" fn(u64) -> u64> = StaticCall::new(tri);

/// The run-time site of the systematic test.
#[inline(never)]
fn run_time(key: &StaticCall<extern "C" fn(u64) -> u64>, x: u64) -> u64 {
    key.call_guarded(x)
}

/// Two sites of `K`: 2x + 3 with `inc`, 4x + 2 with `dbl`.
#[inline(never)]
fn two_sites(x: u64) -> u64 {
    static_call!(K)(x) + static_call!(K)(x + 1)
}

/// Three sites of `K`: 3x + 6 with `inc`, 6x + 6 with `dbl`, 9x + 9 with `tri`.
#[inline(never)]
fn three_sites(x: u64) -> u64 {
    static_call!(K)(x) + static_call!(K)(x + 1) + static_call!(K)(x + 2)
}

/// One site of every key of the systematic test (and a run-time site of two keys), and what
/// each returned.
#[inline(never)]
fn every_key(x: u64) -> [u64; 8] {
    let a = static_call!(A)(x) + static_call!(A)(x + 1);
    let b = static_call!(B)(x);
    static_call!(H)(x);
    let z = static_call!(Z)(x);
    // SAFETY: a NUL-terminated string.
    let f = unsafe { static_call!(F)(c"hello".as_ptr()) + f_tail(c"tail".as_ptr()) } as u64;
    let br = u64::from(static_branch!(BR));
    if has_target!(HK) {
        static_call!(HK)(x);
    }
    let r = (0..2 * static_call::__private::MISSES_TO_REQUEUE)
        .map(|i| run_time(if i % 2 == 0 { &R1 } else { &R2 }, x))
        .fold(0u64, u64::wrapping_add);
    [
        a,
        b,
        HOOKED.swap(0, Ordering::Relaxed),
        z,
        f,
        br,
        HK_SEEN.swap(0, Ordering::Relaxed),
        r,
    ]
}

/// The branch sites of `every_key` (of `BR` and `HK`), found in its code before it first runs.
static BRANCHES: std::sync::OnceLock<Vec<common::BranchBytes>> = std::sync::OnceLock::new();

fn find_branches() {
    let f = every_key as fn(u64) -> [u64; 8] as usize;
    let mut found = common::branch_sites_in(f, 8192, BR.as_ptr() as usize);
    found.extend(common::branch_sites_in(f, 8192, HK.as_ptr() as usize));
    assert_eq!(found.len(), 2, "{found:x?}");
    BRANCHES.set(found).unwrap();
}

fn branch_at(site: usize) -> Option<common::BranchBytes> {
    BRANCHES.get()?.iter().find(|b| b.site == site).copied()
}

/// What `every_key` must return with the keys' current targets.
fn every_key_expected(x: u64) -> [u64; 8] {
    let a = A.query();
    let hooked = match H.target() {
        Target::Null => 0,
        _ => x,
    };
    let z = match Z.target() {
        Target::ReturnZero => 0,
        _ => Z.query()(x),
    };
    let hk = match HK.target() {
        Target::Null => 0,
        _ => x,
    };
    let n = static_call::__private::MISSES_TO_REQUEUE;
    let r = (R1.query()(x).wrapping_add(R2.query()(x))).wrapping_mul(n);
    [
        a(x) + a(x + 1),
        B.query()(x),
        hooked,
        z,
        9,
        u64::from(BR.is_enabled()),
        hk,
        r,
    ]
}

/// Every run-time site's bytes are a form it may take (its entry, a well-formed guard stub that
/// misses to the entry, the indirect call), and `run_time_sites()` says what they are.
fn assert_run_time_sites_consistent() {
    let sites = static_call::run_time_sites();
    assert!(!sites.is_empty(), "the run-time site was registered");
    for s in sites {
        assert_ne!(s.state, SiteState::Foreign, "{s:?}");
        common::run_time_state(s.address);
    }
}

// --- checking sites against their keys -------------------------------------------------------

/// What a key's sites must do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Call(usize),
    Nop,
    Ret0,
    /// A branch key, on or off.
    Branch(bool),
    /// A hook key: its call sites as for `Call` (or `Nop` when it has no target), its branch
    /// sites on when it has a target.
    Hook(Option<usize>),
}

/// A hook key's expectation.
fn expect_hook(key: &StaticCall<extern "C" fn(u64)>) -> Expect {
    match key.target() {
        Target::Function(f) => Expect::Hook(Some(common::addr(f))),
        _ => Expect::Hook(None),
    }
}

fn expect<F: static_call::ExternC>(key: &StaticCall<F>) -> Expect {
    match key.target() {
        Target::Function(f) => Expect::Call(common::addr(f)),
        Target::Null => Expect::Nop,
        Target::ReturnZero => Expect::Ret0,
    }
}

const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const RET0: [u8; 5] = [0x2e, 0x2e, 0x2e, 0x31, 0xc0];

/// Whether the site's bytes do what its key says: call (or, a tail site, jump to) the target,
/// directly or through its thunk, be the NOP or the `xor` of a null or return-zero key, or be at
/// home.
fn agrees(site: usize, want: Expect) -> bool {
    let bytes = read(site, 5);
    if at_home(site) {
        return true;
    }
    if let Some(b) = branch_at(site) {
        let on = match want {
            Expect::Branch(on) => on,
            Expect::Hook(f) => f.is_some(),
            _ => return false,
        };
        return read(site, 5) == patched_bytes(&b, on);
    }
    match want {
        Expect::Call(f) | Expect::Hook(Some(f)) => call_destination(site) == Some(f),
        Expect::Nop | Expect::Hook(None) => bytes == NOP5,
        Expect::Ret0 => bytes == RET0,
        Expect::Branch(_) => false,
    }
}

/// The bytes of the patched branch site `b` for a key that is `on`.
fn patched_bytes(b: &common::BranchBytes, on: bool) -> Vec<u8> {
    match common::patched_branch(b, on) {
        common::BranchState::Jump => {
            let rel = (b.label as i64 - (b.site as i64 + 5)) as i32;
            let mut v = vec![0xe9];
            v.extend_from_slice(&rel.to_le_bytes());
            v
        }
        _ => NOP5.to_vec(),
    }
}

/// Whether the site is at its home: a call site calling the trampoline, a tail site jumping to
/// its binding (whose `jmp` goes to the tail entry), a branch site jumping to its stub.
fn at_home(site: usize) -> bool {
    let insn = common::decode(site);
    let to = insn.near_branch64() as usize;
    match (branch_at(site), insn.code()) {
        (Some(b), iced_x86::Code::Jmp_rel32_64) => to == b.stub,
        (Some(_), _) => false,
        (None, iced_x86::Code::Call_rel32_64) => to == trampoline(),
        (None, iced_x86::Code::Jmp_rel32_64) => {
            to == site + common::TAIL_BINDING
                && common::decode(to + 14).near_branch64() as usize == common::tail_entry()
        }
        (None, _) => false,
    }
}

/// Checks that `sites()` reports exactly the bytes at each site, and what they are.
#[track_caller]
fn assert_reported_truly(s: &SiteInfo, want: Expect) {
    let bytes: [u8; 5] = read(s.address, 5).try_into().unwrap();
    assert_eq!(
        s.bytes,
        Some(bytes),
        "{s:?}: sites() must report the bytes there"
    );
    let on_trampoline = at_home(s.address);
    match s.state {
        SiteState::Trampoline(_) => assert!(on_trampoline, "{s:?} says trampoline"),
        SiteState::Patched => assert!(
            !on_trampoline && agrees(s.address, want),
            "{s:?} says patched, for {want:?}"
        ),
        SiteState::Foreign => assert_eq!(bytes[0], 0xcc, "{s:?}: only our int3 is foreign here"),
        SiteState::Stale => assert!(!agrees(s.address, want), "{s:?} says stale, for {want:?}"),
        other => panic!("{s:?}: unexpected state {other:?}"),
    }
}

/// Every site of every key agrees with its key's current target and `sites()` says so, except
/// the site `stuck` (the one an `UndoFailed` error names). Foreign bytes are a failure here:
/// take them away first.
#[track_caller]
fn assert_consistent(keys: &[(&str, Vec<SiteInfo>, Expect)], stuck: Option<usize>) {
    for (name, sites, want) in keys {
        assert!(!sites.is_empty(), "{name}: no site");
        for s in sites {
            assert_ne!(s.state, SiteState::Foreign, "{name}: {s:?}");
            assert_reported_truly(s, *want);
            if Some(s.address) == stuck {
                assert_eq!(
                    s.state,
                    SiteState::Stale,
                    "{name}: the site UndoFailed named"
                );
            } else {
                assert!(
                    agrees(s.address, *want),
                    "{name}: site {s:?} does not agree with its key ({want:?}): {}",
                    common::format(&common::decode(s.address))
                );
            }
        }
    }
}

fn keys_now() -> Vec<(&'static str, Vec<SiteInfo>, Expect)> {
    vec![
        ("A", A.sites(), expect(&A)),
        ("B", B.sites(), expect(&B)),
        ("H", H.sites(), expect(&H)),
        ("Z", Z.sites(), expect(&Z)),
        ("F", F.sites(), expect(&F)),
        ("BR", BR.sites(), Expect::Branch(BR.is_enabled())),
        ("HK", HK.sites(), expect_hook(&HK)),
    ]
}

fn k_sites() -> Vec<(&'static str, Vec<SiteInfo>, Expect)> {
    vec![("K", K.sites(), expect(&K))]
}

/// The sites of `K`, by address.
fn k_addresses() -> Vec<usize> {
    let mut a: Vec<usize> = K.sites().iter().map(|s| s.address).collect();
    a.sort();
    a
}

fn state_of(site: usize) -> SiteState {
    K.sites()
        .into_iter()
        .find(|s| s.address == site)
        .expect("a site of K")
        .state
}

fn install_seccomp(deny: &[(i64, i32)]) {
    assert!(
        common::install_seccomp(deny),
        "seccomp: {}",
        std::io::Error::last_os_error()
    );
}

/// Makes thread creation fail, so that no worker runs and the calling thread does its job.
fn no_worker() {
    install_seccomp(&[
        (libc::SYS_clone3, libc::EAGAIN),
        (libc::SYS_clone, libc::EAGAIN),
    ]);
}

// --- defect 1: a breakpoint that lands during an update ------------------------------------

scenario! {
    /// A debugger's breakpoint lands on a patched site between the moment `update` reads it and
    /// its write. The update fails and changes nothing; while the breakpoint is there, every
    /// update that would have to rewrite the site fails too (a later `Ok` would leave the site
    /// on the old target once the debugger puts its byte back); `sites()` shows the bytes that
    /// are really there; once the byte is back, the site calls what its key holds, and updates
    /// work again.
    fn a_breakpoint_landing_during_an_update_never_leaves_a_stale_direct_call() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_consistent(&k_sites(), None);
        let first = k_addresses()[0];

        faults::reset();
        faults::arm(Step::Cmpxchg, 1, 0);
        let err = K.try_update(dbl).unwrap_err();
        assert_eq!((err.kind, err.site), (ErrorKind::ForeignBytes, Some(first)), "{err}");
        let (at, was) = faults::foreign()[0];
        assert_eq!((at, was), (first, 0xe8), "the breakpoint landed");
        assert_eq!(K.query()(1), 2, "the key keeps its old target");
        assert_eq!(state_of(first), SiteState::Foreign);
        for s in K.sites().into_iter().filter(|s| s.address != first) {
            assert_calls(s.address, K.query() as usize, "inc, as before");
        }

        let again = K.try_update(dbl).unwrap_err();
        assert_eq!((again.kind, again.site), (ErrorKind::ForeignBytes, Some(first)));
        assert_eq!(K.query()(1), 2);

        debugger_poke(first, was);
        assert_consistent(&k_sites(), None);
        assert_calls(first, K.query() as usize, "inc: the site agrees with its key again");
        K.update(dbl);
        assert_consistent(&k_sites(), None);
        assert_eq!(two_sites(1), 6);
    }
}

scenario! {
    /// `unpatch_all` with a breakpoint landing on one site: every other site is back on the
    /// trampoline, that one is untouched, and patching is not reported off (it is not: a site
    /// still calls its target directly). Once the byte is back, `unpatch_all` completes.
    fn unpatch_all_with_a_breakpoint_landing_reports_what_it_did() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        let first = k_addresses()[0];
        faults::reset();
        faults::arm(Step::Cmpxchg, 1, 0);
        let err = static_call::unpatch_all().unwrap_err();
        assert_eq!((err.kind, err.site), (ErrorKind::ForeignBytes, Some(first)), "{err}");
        assert_eq!(static_call::status().patching, Ok(()));
        assert_eq!(state_of(first), SiteState::Foreign);
        for s in K.sites().into_iter().filter(|s| s.address != first) {
            assert_calls(s.address, trampoline(), "trampoline");
        }
        let (_, was) = faults::foreign()[0];
        debugger_poke(first, was);
        static_call::unpatch_all().expect("nothing in the way now");
        assert_eq!(static_call::status().patching, Err(Disabled::Unpatched));
        for s in K.sites() {
            assert_calls(s.address, trampoline(), "trampoline");
        }
        K.update(dbl);
        assert_eq!(two_sites(1), 6);
    }
}

// --- defect 2: membarrier failing after start-up --------------------------------------------

scenario! {
    /// A seccomp filter installed after start-up denies `membarrier`: `update` finds out before
    /// it publishes anything, so nothing changes, and patching is reported off.
    fn a_membarrier_denied_after_start_up_fails_update_before_anything_changes() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        install_seccomp(&[(libc::SYS_membarrier, libc::EPERM)]);
        let err = K.try_update(dbl).unwrap_err();
        assert_eq!(err.kind, ErrorKind::CoreSyncFailed { errno: libc::EPERM }, "{err}");
        assert_eq!(K.query()(1), 2, "the key keeps its old target");
        assert_eq!(two_sites(1), 5);
        for s in K.sites() {
            assert_eq!(s.state, SiteState::Patched);
            assert_calls(s.address, K.query() as usize, "inc, as before");
        }
        assert_eq!(
            static_call::status().patching,
            Err(Disabled::NoCoreSync { errno: libc::EPERM })
        );
    }
}

scenario! {
    /// `membarrier` fails after the writes: the error says that the change was made (the key
    /// and every site are on the new target), never that nothing changed.
    fn a_membarrier_failing_after_the_writes_says_the_change_was_made() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        faults::reset();
        // The first sync is the check before anything is published; the second follows the
        // writes.
        faults::arm(Step::Sync, 2, libc::EPERM);
        let err = K.try_update(dbl).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotSynced { errno: libc::EPERM }, "{err}");
        assert_eq!(K.query()(1), 2, "the new target (dbl) is in place");
        assert_consistent(&k_sites(), None);
        assert_eq!(two_sites(1), 6);
        assert_eq!(
            static_call::status().patching,
            Err(Disabled::NoCoreSync { errno: libc::EPERM })
        );
    }
}

// --- defect 3: a signal during initialisation -------------------------------------------------

static IN_HANDLER: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
fn site_the_handler_calls(x: u64) -> u64 {
    static_call!(K)(x)
}

extern "C" fn on_signal_make_a_static_call(_: libc::c_int) {
    IN_HANDLER.store(site_the_handler_calls(41), Ordering::Relaxed);
}

fn raise_usr1() {
    // SAFETY: raise has no preconditions; SIGUSR1's handler is installed by the scenario.
    unsafe { libc::raise(libc::SIGUSR1) };
}

fn handle_usr1(handler: extern "C" fn(libc::c_int)) {
    // SAFETY: installs a plain handler for SIGUSR1 with an initialised sigaction.
    unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, core::ptr::null_mut()),
            0
        );
    }
}

scenario! {
    /// A signal lands on the initialising thread right after it won the right to initialise,
    /// and its handler makes a static call: that call must not wait for the initialisation it
    /// interrupted (it would wait for ever). It goes through the trampoline, unregistered, and
    /// reaches its target.
    fn a_signal_during_initialisation_whose_handler_makes_a_static_call_does_not_hang() {
        handle_usr1(on_signal_make_a_static_call);
        faults::set_hook(Point::InitWindow, Some(raise_usr1));
        assert_eq!(two_sites(1), 5, "the first static call of the process initialises");
        faults::set_hook(Point::InitWindow, None);
        assert_eq!(IN_HANDLER.load(Ordering::Relaxed), 42, "the handler's call reached inc");
        assert_eq!(site_the_handler_calls(1), 2);
        static_call::flush();
        assert_consistent(&k_sites(), None);
    }
}

// --- defect 4: protections are restored to what they were ------------------------------------

fn protect(page: usize, prot: libc::c_int) {
    // SAFETY: a text page of this program, kept executable.
    assert_eq!(unsafe { libc::mprotect(page as *mut _, 4096, prot) }, 0);
}

scenario! {
    /// The program (its own patcher, an instrumentation library) has made a text page `rwx`:
    /// an update that writes a site on that page leaves it `rwx`, as it found it, so the
    /// program's next write there still works. A page the library opened itself goes back to
    /// `r-x`.
    fn an_update_gives_a_page_back_the_protection_it_had() {
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        let site = k_addresses()[0];
        let page = site & !4095;
        let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        protect(page, rwx);
        K.update(dbl);
        assert_eq!(&mapping_of(site).perms[..3], "rwx", "the program's own rwx page");
        // The program writes to its page, as it had planned to (the same byte: harmless).
        // SAFETY: the page is writable (checked above) and the byte is rewritten unchanged.
        unsafe {
            let p = (page + 4095) as *mut u8;
            p.write_volatile(p.read_volatile());
        }
        assert_calls(site, K.query() as usize, "dbl");
        protect(page, libc::PROT_READ | libc::PROT_EXEC);
        K.update(inc);
        assert_eq!(&mapping_of(site).perms[..3], "r-x");
        assert_eq!(rwx_mappings(), Vec::<String>::new());
        assert_eq!(two_sites(1), 5);
    }
}

// --- defect 6: the patch queue is popped with signals blocked --------------------------------

static POPS: AtomicUsize = AtomicUsize::new(0);
static POPS_UNBLOCKED: AtomicUsize = AtomicUsize::new(0);

fn note_signal_mask_at_pop() {
    // SAFETY: reads the calling thread's signal mask into a local set.
    let blocked = unsafe {
        let mut cur: libc::sigset_t = core::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, core::ptr::null(), &mut cur);
        libc::sigismember(&cur, libc::SIGUSR1) == 1
    };
    POPS.fetch_add(1, Ordering::Relaxed);
    if !blocked {
        POPS_UNBLOCKED.fetch_add(1, Ordering::Relaxed);
    }
}

scenario! {
    /// `flush` pops the patch queue on the caller's thread (here there is no worker). A signal
    /// handler that made a first static call there, half-way through a pop, would push and spin
    /// for ever against that pop: every pop happens with signals blocked.
    fn the_patch_queue_is_popped_with_signals_blocked() env ["STATIC_CALL_SECCOMP" = "allow"] {
        no_worker();
        faults::set_hook(Point::AfterPop, Some(note_signal_mask_at_pop));
        assert_eq!(two_sites(1), 5);
        assert!(matches!(static_call::status().worker, WorkerStatus::Failed { .. }));
        static_call::flush();
        static_call::unpatch_all().unwrap();
        faults::set_hook(Point::AfterPop, None);
        assert!(POPS.load(Ordering::Relaxed) >= 2, "the two sites were popped here");
        assert_eq!(POPS_UNBLOCKED.load(Ordering::Relaxed), 0, "pops with signals unblocked");
    }
}

// --- defect 7: update does the worker's job when there is none --------------------------------

scenario! {
    /// With no worker thread, `update` patches what is queued itself, as the docs say: no call
    /// to `flush` is needed.
    fn update_patches_queued_sites_when_there_is_no_worker() env ["STATIC_CALL_SECCOMP" = "allow"] {
        no_worker();
        assert_eq!(two_sites(1), 5);
        assert!(K.sites().iter().all(|s| s.state == SiteState::Pending));
        K.update(dbl);
        assert!(K.sites().iter().all(|s| s.state == SiteState::Patched), "{:?}", K.sites());
        assert_consistent(&k_sites(), None);
        assert_eq!(two_sites(1), 6);
    }
}

// --- defect 8: bookkeeping ------------------------------------------------------------------

scenario! {
    /// Two foreign writes in one update: the second site's write is lost (the update fails and
    /// undoes), then the first site's undo is lost too. The error names that site, whose record
    /// keeps what is really under the breakpoint (the new call): once both breakpoints are
    /// gone, the next update rewrites every site, and none is left behind.
    fn an_undo_that_fails_keeps_a_true_record() {
        assert_eq!(three_sites(1), 9);
        static_call::flush();
        let sites = k_addresses();
        assert_eq!(sites.len(), 3);
        faults::reset();
        faults::arm(Step::Cmpxchg, 2, 0); // the second site's write: lost
        let err_first = {
            faults::arm(Step::Cmpxchg, 4, 0); // the first site's undo: lost too
            K.try_update(dbl).unwrap_err()
        };
        assert_eq!((err_first.kind, err_first.site), (ErrorKind::UndoFailed, Some(sites[0])));
        assert_eq!(K.query()(1), 2, "the keys hold their old targets");
        assert_eq!(state_of(sites[0]), SiteState::Foreign);
        assert_eq!(state_of(sites[1]), SiteState::Foreign);
        assert_calls(sites[2], K.query() as usize, "inc: undone");
        // The debugger removes both breakpoints: the first site's bytes are this update's call.
        debugger_poke(sites[1], 0xe8);
        debugger_poke(sites[0], 0xe8);
        let under = call_destination(sites[0]).expect("a call");
        assert_ne!(under, K.query() as usize, "the failed update's call, as the error said");
        assert_eq!(state_of(sites[0]), SiteState::Stale);
        K.update(tri);
        assert_consistent(&k_sites(), None);
        assert_eq!(three_sites(1), 18);
    }
}

scenario! {
    /// `mprotect` failing with ENOMEM (near `vm.max_map_count`) may pass: patching stays on, the
    /// sites say why they wait, and they are tried again after a back-off (here, with no worker,
    /// by the next `flush` once the back-off has passed).
    fn a_transient_mprotect_failure_is_retried_later() env ["STATIC_CALL_SECCOMP" = "allow"] {
        no_worker();
        faults::reset();
        faults::arm(Step::Protect, 1, libc::ENOMEM);
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_eq!(static_call::status().patching, Ok(()));
        let waiting = K.sites();
        assert!(
            waiting.iter().all(|s| s.state
                == SiteState::Trampoline(Reason::WriteFailed { errno: libc::ENOMEM })),
            "{waiting:?}"
        );
        static_call::flush();
        assert_eq!(K.sites(), waiting, "not before the back-off has passed");
        std::thread::sleep(std::time::Duration::from_millis(20));
        static_call::flush();
        assert_consistent(&k_sites(), None);
        assert!(K.sites().iter().all(|s| s.state == SiteState::Patched));
        assert_eq!(two_sites(1), 5);
    }
}

scenario! {
    /// The same with the worker: it sleeps until the back-off has passed, then patches the sites
    /// on its own. An update meeting the same failure is refused as a whole, and patching stays
    /// on.
    fn the_worker_retries_a_transient_mprotect_failure() {
        faults::reset();
        faults::arm(Step::Protect, 1, libc::ENOMEM);
        assert_eq!(two_sites(1), 5);
        static_call::flush();
        assert_eq!(static_call::status().patching, Ok(()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while K.sites().iter().any(|s| s.state != SiteState::Patched) {
            assert!(std::time::Instant::now() < deadline, "never retried: {:?}", K.sites());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_consistent(&k_sites(), None);
        // An update meeting the same failure is refused as a whole, and patching stays on.
        faults::arm(Step::Protect, faults::seen(Step::Protect) + 1, libc::ENOMEM);
        let err = K.try_update(dbl).unwrap_err();
        assert_eq!(err.kind, ErrorKind::WriteRefused { errno: libc::ENOMEM });
        assert_eq!(K.query()(1), 2);
        assert_eq!(static_call::status().patching, Ok(()));
        K.update(dbl);
        assert_consistent(&k_sites(), None);
    }
}

// --- every step of every operation, failed in turn -------------------------------------------

/// The operations of the systematic test.
const OPS: [&str; 6] = [
    "patch",
    "update",
    "batch",
    "unpatch_all",
    "hook_on",
    "hook_off",
];

/// Brings the keys to where `op` starts from: but for `patch`, the hook's call site (which runs
/// only while it has a target) has run, so that both its kinds of site are registered and
/// patched, and the hook is off, except for `hook_off`. (`patch` leaves every site to its first
/// run under the faults.)
fn set_up(op: &str) {
    find_branches();
    if op != "patch" {
        HK.update(hk_note);
        assert_eq!(every_key(1), every_key_expected(1));
        static_call::flush();
        if op != "hook_off" {
            HK.set_null();
        }
    }
}

/// Runs one operation (after setting up for it) with the faults armed by `arm`, and returns
/// its result.
fn run_op(op: &str, arm: impl FnOnce()) -> Result<(), Error> {
    if op == "patch" {
        arm();
        assert_eq!(every_key(1), every_key_expected(1));
        static_call::flush();
        return Ok(());
    }
    assert_eq!(every_key(1), every_key_expected(1));
    static_call::flush();
    assert_consistent(&keys_now(), None);
    arm();
    match op {
        "update" => A.try_update(PROBE_DBL.query()),
        "batch" => Batch::new()
            .update(&A, PROBE_TRI.query())
            .update(&B, PROBE_INC.query())
            .set_null(&H)
            .set_return_zero(&Z)
            .update(&F, PROBE_STRLEN.query())
            .enable(&BR)
            .update(&HK, PROBE_HK.query())
            .update(&R1, PROBE_DBL.query())
            .try_commit(),
        "unpatch_all" => static_call::unpatch_all(),
        // Two phases: calls, then branches.
        "hook_on" => HK.try_update(PROBE_HK.query()),
        // Two phases: branches, then calls.
        "hook_off" => HK.try_set_null(),
        _ => unreachable!(),
    }
}

// Functions are compared by the pointer a key holds, not by `dbl as usize`, which may be another
// copy of the function: these keys (never called) hold the pointers `run_op` passes.
static PROBE_INC: StaticCall<extern "C" fn(u64) -> u64> = StaticCall::new(inc);
static PROBE_DBL: StaticCall<extern "C" fn(u64) -> u64> = StaticCall::new(dbl);
static PROBE_TRI: StaticCall<extern "C" fn(u64) -> u64> = StaticCall::new(tri);
static PROBE_STRLEN: StaticCall<unsafe extern "C" fn(*const c_char) -> usize> =
    StaticCall::new(libc::strlen);
static PROBE_HK: StaticCall<extern "C" fn(u64)> = StaticCall::new(hk_note);

/// The keys' targets as `(A, B, H, Z, F, BR, HK, R1)` expectations.
fn targets_now() -> [Expect; 8] {
    [
        expect(&A),
        expect(&B),
        expect(&H),
        expect(&Z),
        expect(&F),
        Expect::Branch(BR.is_enabled()),
        expect_hook(&HK),
        expect(&R1),
    ]
}

/// The targets each operation's success gives.
fn targets_after_success(op: &str) -> [Expect; 8] {
    let mut after = targets_now();
    match op {
        "update" => after[0] = expect(&PROBE_DBL),
        "batch" => {
            after = [
                expect(&PROBE_TRI),
                expect(&PROBE_INC),
                Expect::Nop,
                Expect::Ret0,
                expect(&PROBE_STRLEN),
                Expect::Branch(true),
                expect_hook(&PROBE_HK),
                expect(&PROBE_DBL),
            ]
        }
        "hook_on" => after[6] = expect_hook(&PROBE_HK),
        "hook_off" => after[6] = Expect::Hook(None),
        _ => {}
    }
    after
}

fn parse_step(name: &str) -> Step {
    match name {
        "protect" => Step::Protect,
        "cmpxchg" => Step::Cmpxchg,
        "sync" => Step::Sync,
        "map" => Step::MapCode,
        _ => panic!("unknown step {name}"),
    }
}

/// The child: `FAULT_OP` names the operation, `FAULTS` the faults (`step:nth:errno,...`).
#[test]
fn fault_child() {
    if std::env::var(common::SCENARIO_ENV).as_deref() != Ok("fault_child") {
        return;
    }
    let op = std::env::var("FAULT_OP").unwrap();
    let spec = std::env::var("FAULTS").unwrap();
    let armed: Vec<(Step, u32, i32)> = spec
        .split(',')
        .map(|f| {
            let mut p = f.split(':');
            let step = parse_step(p.next().unwrap());
            let nth = p.next().unwrap().parse().unwrap();
            let errno = p.next().unwrap().parse().unwrap();
            (step, nth, errno)
        })
        .collect();
    set_up(&op);
    let before = targets_now();
    let success = targets_after_success(&op);
    let result = run_op(&op, || {
        faults::reset();
        for &(step, nth, errno) in &armed {
            faults::arm(step, nth, errno);
        }
    });
    let fired = armed
        .iter()
        .all(|&(step, nth, _)| faults::seen(step) >= nth);
    let after = targets_now();
    println!("op {op} faults {spec} fired {fired} result {result:?}");

    // What the result means for the keys.
    match result {
        Ok(()) => assert_eq!(after, success, "Ok: the new targets"),
        Err(e) => match e.kind {
            ErrorKind::WriteRefused { .. }
            | ErrorKind::ForeignBytes
            | ErrorKind::CoreSyncFailed { .. } => {
                assert_eq!(after, before, "{e}: nothing changed")
            }
            ErrorKind::NotSynced { .. } | ErrorKind::UndoFailed => {
                assert!(
                    after == before || after == success,
                    "{e}: old or new targets"
                )
            }
            other => panic!("unexpected error kind {other:?}"),
        },
    }
    if op == "unpatch_all" {
        assert_eq!(after, before, "unpatch_all changes no key");
        let off = static_call::status().patching == Err(Disabled::Unpatched);
        assert_eq!(
            off,
            result.is_ok(),
            "off exactly when every site was unpatched"
        );
    }
    if let Err(Error {
        kind: ErrorKind::WriteRefused {
            errno: libc::EACCES,
        },
        ..
    }) = result
    {
        assert!(
            static_call::status().patching.is_err(),
            "EACCES switches patching off"
        );
    }

    // A site that holds the simulated breakpoint says so; then the debugger takes it away.
    let stuck = match result {
        Err(Error {
            kind: ErrorKind::UndoFailed,
            site,
        }) => site,
        _ => None,
    };
    wait_for_retries();
    let mut all: Vec<SiteInfo> = keys_now().into_iter().flat_map(|k| k.1).collect();
    all.extend(static_call::run_time_sites());
    for (at, was) in faults::foreign() {
        if let Some(s) = all.iter().find(|s| s.address == at) {
            assert_eq!(s.state, SiteState::Foreign, "{s:?}");
        }
        debugger_poke(at, was);
    }
    assert_consistent(&keys_now(), stuck);
    assert_run_time_sites_consistent();
    if stuck.is_none() {
        // (The site an UndoFailed names does call the other target: that is what it says.)
        assert_eq!(
            every_key(7),
            every_key_expected(7),
            "calls reach the keys' targets"
        );
    }
    // The calls above may have sent the run-time site back to the worker: wait for it (flush
    // takes the patch lock, which the worker holds while pages are open).
    static_call::flush();
    assert_eq!(
        rwx_mappings(),
        Vec::<String>::new(),
        "no writable code left"
    );

    // With nothing in the way any more, an update succeeds and leaves no site behind.
    faults::reset();
    Batch::new()
        .update(&A, inc)
        .update(&B, tri)
        .update(&H, note)
        .update(&Z, dbl)
        .update(&F, my_strlen)
        .enable(&BR)
        .update(&HK, hk_note)
        .update(&R1, inc)
        .commit();
    assert_consistent(&keys_now(), None);
    assert_eq!(every_key(3), every_key_expected(3));
    static_call::flush();
    assert_run_time_sites_consistent();
    println!("scenario fault_child passed");
}

/// Waits until the worker has tried again the sites whose write failed with an error that may
/// pass (it does so on its own, after a back-off), so that nothing changes while they are
/// checked.
fn wait_for_retries() {
    let waiting = || {
        let run_time = static_call::run_time_sites().into_iter();
        keys_now()
            .into_iter()
            .flat_map(|k| k.1)
            .chain(run_time)
            .any(|s| {
                matches!(
                    s.state,
                    SiteState::Trampoline(Reason::WriteFailed { .. }) | SiteState::Pending
                )
            })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while waiting() {
        assert!(std::time::Instant::now() < deadline, "never retried");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Runs the child for one operation and set of faults; whether every fault fired.
fn try_faults(op: &str, faults: &str) -> bool {
    let out = common::run_child("fault_child", &[("FAULT_OP", op), ("FAULTS", faults)]);
    out.contains("fired true")
}

/// Fails each step of each operation in turn (the n-th `mprotect`, with a lasting and a
/// passing errno, the n-th compare-exchange, `membarrier` and thunk mapping, for every n at
/// which the operation still reaches it), then the same steps once more after a lost
/// compare-exchange, which is when an update undoes its writes. After every one, in its own
/// process, `fault_child` checks what the result means, that every site agrees with its key
/// (after a debugger takes its breakpoint away), that `sites()` says so and that no writable
/// code is left, and that the next update succeeds and leaves no site behind.
#[test]
fn every_failure_of_every_step_leaves_every_site_consistent() {
    if !common::patching() || std::env::var_os(common::SCENARIO_ENV).is_some() {
        return;
    }
    let steps = [
        ("protect", libc::EACCES),
        ("protect", libc::ENOMEM),
        ("cmpxchg", 0),
        ("sync", libc::EPERM),
        ("map", libc::ENOMEM),
    ];
    let mut cases = 0;
    for op in OPS {
        for (step, errno) in steps {
            for first_lost in [false, true] {
                if first_lost && (op == "patch" || op == "unpatch_all") {
                    continue; // nothing is undone there
                }
                for n in 1.. {
                    let mut spec = String::new();
                    if first_lost {
                        // The first write is lost; the step to fail comes after it.
                        spec += "cmpxchg:1:0,";
                    }
                    let nth = if first_lost && step == "cmpxchg" {
                        n + 1
                    } else {
                        n
                    };
                    spec += &format!("{step}:{nth}:{errno}");
                    cases += 1;
                    if !try_faults(op, &spec) {
                        break;
                    }
                }
            }
        }
    }
    println!("{cases} cases");
    assert!(
        cases > 40,
        "{cases} cases: the operations reach too few steps"
    );
}
