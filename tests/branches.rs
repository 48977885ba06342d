//! Static branches and hooks, proven on the bytes: every test finds its branch sites in the
//! machine code before they ever run (the `jmp` to an out-of-line stub binding the key, decoded
//! with iced-x86 independently of the library) and checks what their five bytes are in every
//! state: unregistered, registered while off, registered while on, and after `enable` and
//! `disable` of a site that never ran.
//!
//! Each test uses its own keys: tests run in parallel in one process and share the patcher.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{
    BranchBytes, BranchState, branch_state, only_branch, patched_branch, patching, scenario,
};
use static_call::{
    Batch, SiteState, StaticBranch, StaticCall, Target, define_static_branch, define_static_call,
    has_target, static_branch, static_branch_likely, static_call,
};

/// The branch site of `key` in `f`, found before it runs (or `None` without patching).
fn site_of(f: fn() -> bool, key: *const ()) -> Option<BranchBytes> {
    patching().then(|| only_branch(f as usize, key as usize))
}

#[track_caller]
fn assert_state(site: Option<BranchBytes>, want: BranchState) {
    if let Some(b) = site {
        assert_eq!(branch_state(&b), want, "{b:x?}");
    }
}

/// Checks the site's bytes are the patched form for `on`, and that `sites()` says so with
/// those bytes.
#[track_caller]
fn assert_patched(site: Option<BranchBytes>, key: &StaticBranch, on: bool) {
    let Some(b) = site else { return };
    assert_eq!(branch_state(&b), patched_branch(&b, on), "{b:x?}");
    let listed = key.sites();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].address, b.site);
    assert_eq!(listed[0].state, SiteState::Patched);
    assert_eq!(listed[0].bytes.unwrap().to_vec(), common::read(b.site, 5));
}

/// One key's life, checked on the bytes of its one site `f`, a branch of `key` that is
/// likely-false or likely-true (`f` returns whether it took the on side).
fn every_state(f: fn() -> bool, key: &'static StaticBranch, likely_true: bool) {
    let f = black_box(f);
    let site = site_of(f, key.as_ptr());
    if let Some(b) = site {
        assert_eq!(b.likely_true, likely_true);
    }
    assert!(!key.is_enabled());
    // Unregistered: the site is its home, `jmp stub`, and switching the key does not touch it.
    assert_state(site, BranchState::Home);
    assert!(
        key.sites().is_empty(),
        "a site that never ran is not registered"
    );
    key.enable();
    assert_state(site, BranchState::Home);
    key.disable();
    assert_state(site, BranchState::Home);
    assert!(key.sites().is_empty());

    // The first run goes through the stub and takes the branch the key says.
    assert!(!f(), "off");
    static_call::flush();
    assert_patched(site, key, false);
    assert!(!f());

    key.enable();
    // No flush: `enable` is synchronous.
    assert_patched(site, key, true);
    assert!(f(), "on");
    assert!(key.is_enabled());

    key.set(false);
    assert_patched(site, key, false);
    assert!(!f());
}

define_static_branch!(UNLIKELY: bool = false);
define_static_branch!(LIKELY: bool = false);

#[inline(never)]
fn unlikely_site() -> bool {
    static_branch!(UNLIKELY)
}

#[inline(never)]
fn likely_site() -> bool {
    static_branch_likely!(LIKELY)
}

#[test]
fn a_likely_false_site_decodes_as_its_key_says_in_every_state() {
    every_state(unlikely_site, &UNLIKELY, false);
}

#[test]
fn a_likely_true_site_decodes_as_its_key_says_in_every_state() {
    every_state(likely_site, &LIKELY, true);
}

define_static_branch!(ON_FIRST: bool = true);

#[inline(never)]
fn on_first_site() -> bool {
    static_branch!(ON_FIRST)
}

#[test]
fn a_first_run_takes_the_branch_the_key_says() {
    let f = black_box(on_first_site as fn() -> bool);
    let site = site_of(f, ON_FIRST.as_ptr());
    assert_state(site, BranchState::Home);
    assert!(f(), "the first run, through the stub, sees the key on");
    static_call::flush();
    assert_patched(site, &ON_FIRST, true);
    assert!(f());
}

struct Flags {
    _pad: u64,
    trace: StaticBranch,
}
static FLAGS: Flags = Flags {
    _pad: 0,
    trace: StaticBranch::new(false),
};

#[inline(never)]
fn field_site() -> bool {
    static_branch!(FLAGS.trace)
}

#[test]
fn a_key_that_is_a_field_of_a_static_is_bound_by_its_own_address() {
    let f = black_box(field_site as fn() -> bool);
    let site = site_of(f, FLAGS.trace.as_ptr());
    assert!(!f());
    FLAGS.trace.enable();
    assert!(f());
    static_call::flush();
    assert_patched(site, &FLAGS.trace, true);
    FLAGS.trace.disable();
    assert!(!f());
    assert_patched(site, &FLAGS.trace, false);
}

define_static_branch!(COUNTED: bool = false);

/// A branch in a loop, with work on both sides, so that the block and the fall-through are
/// both real code.
#[inline(never)]
fn count_on(n: u64) -> (u64, u64) {
    let (mut on, mut off) = (0, 0);
    for i in 0..n {
        if static_branch!(COUNTED) {
            on += black_box(i) | 1;
        } else {
            off += 1;
        }
    }
    (on, off)
}

#[test]
fn a_branch_in_a_loop_follows_its_key() {
    assert_eq!(count_on(10), (0, 10));
    COUNTED.enable();
    assert_eq!(count_on(4).1, 0);
    assert_eq!(count_on(4).0, 1 + 1 + 3 + 3);
    COUNTED.disable();
    assert_eq!(count_on(10), (0, 10));
    static_call::flush();
    if patching() {
        let sites = COUNTED.sites();
        assert!(!sites.is_empty());
        assert!(
            sites.iter().all(|s| s.state == SiteState::Patched),
            "{sites:?}"
        );
    }
}

define_static_branch!(BATCHED_A: bool = false);
define_static_branch!(BATCHED_B: bool = true);
extern "C" fn seven() -> u32 {
    7
}
extern "C" fn eight() -> u32 {
    8
}
define_static_call!(BATCHED_CALL: extern "C" fn() -> u32 = seven);

#[inline(never)]
fn batched() -> (bool, bool, u32) {
    (
        static_branch!(BATCHED_A),
        static_branch!(BATCHED_B),
        static_call!(BATCHED_CALL)(),
    )
}

#[test]
fn a_batch_switches_branches_and_calls_together() {
    assert_eq!(batched(), (false, true, 7));
    static_call::flush();
    Batch::new()
        .enable(&BATCHED_A)
        .disable(&BATCHED_B)
        .update(&BATCHED_CALL, eight)
        .commit();
    assert_eq!(batched(), (true, false, 8));
    Batch::new()
        .set(&BATCHED_A, false)
        .set(&BATCHED_B, true)
        .update(&BATCHED_CALL, seven)
        .commit();
    assert_eq!(batched(), (false, true, 7));
    if patching() {
        static_call::flush();
        for s in BATCHED_A.sites().into_iter().chain(BATCHED_B.sites()) {
            assert_eq!(s.state, SiteState::Patched, "{s:?}");
        }
    }
}

// --- hooks -----------------------------------------------------------------------------------

/// A record that costs something to build.
pub struct Record {
    pub id: u64,
    pub text: String,
}

static BUILT: AtomicU64 = AtomicU64::new(0);
static SEEN: AtomicU64 = AtomicU64::new(0);

fn build_record(id: u64) -> Record {
    BUILT.fetch_add(1, Ordering::Relaxed);
    Record {
        id,
        text: format!("request {id}"),
    }
}

extern "C" fn trace(r: &Record) {
    assert_eq!(r.text, format!("request {}", r.id));
    SEEN.fetch_add(1, Ordering::Relaxed);
}

define_static_call!(ON_REQUEST: extern "C" fn(&Record) = None);

#[inline(never)]
fn handle(id: u64) {
    if has_target!(ON_REQUEST) {
        static_call!(ON_REQUEST)(&build_record(id));
    }
}

/// `handle`'s one branch site.
fn hook_branch() -> Option<BranchBytes> {
    patching().then(|| only_branch(handle as fn(u64) as usize, ON_REQUEST.as_ptr() as usize))
}

#[test]
fn a_hook_builds_its_argument_never_while_off_and_once_per_call_while_on() {
    const CALLS: u64 = 100;
    let branch = hook_branch();
    assert_state(branch, BranchState::Home);
    for id in 0..CALLS {
        handle(id);
    }
    assert_eq!(BUILT.load(Ordering::Relaxed), 0, "built while off");
    static_call::flush();
    assert_state(branch, BranchState::Nop);
    for id in 0..CALLS {
        handle(id);
    }
    assert_eq!(BUILT.load(Ordering::Relaxed), 0, "built while off, patched");

    ON_REQUEST.update(trace);
    assert_state(branch, BranchState::Jump);
    for id in 0..CALLS {
        handle(id);
    }
    assert_eq!(BUILT.load(Ordering::Relaxed), CALLS, "built once per call");
    assert_eq!(SEEN.load(Ordering::Relaxed), CALLS, "each reached the hook");
    static_call::flush();
    if patching() {
        // The call site inside the block, patched on its first run, calls the hook directly;
        // both kinds are listed, each agreeing with the key.
        let sites = ON_REQUEST.sites();
        assert_eq!(sites.len(), 2, "{sites:?}");
        assert!(
            sites.iter().all(|s| s.state == SiteState::Patched),
            "{sites:?}"
        );
        let call = sites
            .iter()
            .find(|s| s.address != branch.unwrap().site)
            .unwrap();
        common::assert_calls(call.address, ON_REQUEST.query() as usize, "trace");
    }

    ON_REQUEST.set_null();
    assert_state(branch, BranchState::Nop);
    for id in 0..CALLS {
        handle(id);
    }
    assert_eq!(
        BUILT.load(Ordering::Relaxed),
        CALLS,
        "built while off again"
    );
    assert_eq!(ON_REQUEST.target(), Target::Null);
}

// --- a hook over a Rust key -----------------------------------------------------------------

static RUST_BUILT: AtomicU64 = AtomicU64::new(0);
static RUST_SEEN: AtomicU64 = AtomicU64::new(0);

fn build_text(id: u64) -> String {
    RUST_BUILT.fetch_add(1, Ordering::Relaxed);
    format!("request {id}")
}

define_static_call!(ON_TEXT: fn(&str) = None);

#[inline(never)]
fn handle_text(id: u64) {
    if has_target!(ON_TEXT) {
        static_call!(ON_TEXT)(&build_text(id));
    }
}

/// A hook over a Rust key (an ordinary `fn(&str)`, targets that are closures) is the same branch:
/// its argument is built only while the key has a target, and a panic in the hook reaches the
/// caller through the branch and the adapter.
#[test]
fn a_hook_over_a_rust_key_follows_its_key_and_propagates_panics() {
    const CALLS: u64 = 50;
    let branch =
        patching().then(|| only_branch(handle_text as fn(u64) as usize, ON_TEXT.as_ptr() as usize));
    assert_state(branch, BranchState::Home);
    handle_text(0);
    static_call::flush();
    assert_state(branch, BranchState::Nop);
    for id in 0..CALLS {
        handle_text(id);
    }
    assert_eq!(RUST_BUILT.load(Ordering::Relaxed), 0, "built while off");

    ON_TEXT.update(|text| {
        assert!(text.starts_with("request "));
        RUST_SEEN.fetch_add(1, Ordering::Relaxed);
    });
    assert_state(branch, BranchState::Jump);
    for id in 0..CALLS {
        handle_text(id);
    }
    assert_eq!(RUST_BUILT.load(Ordering::Relaxed), CALLS);
    assert_eq!(RUST_SEEN.load(Ordering::Relaxed), CALLS);

    ON_TEXT.update(|text| panic!("hook saw {text}"));
    let caught = std::panic::catch_unwind(|| handle_text(7)).expect_err("the hook panicked");
    assert_eq!(
        caught.downcast_ref::<String>().map(String::as_str),
        Some("hook saw request 7")
    );

    ON_TEXT.set_null();
    assert_state(branch, BranchState::Nop);
    handle_text(8);
    assert_eq!(
        RUST_BUILT.load(Ordering::Relaxed),
        CALLS + 1,
        "built while off again"
    );
}

extern "C" fn count_u64(x: u64) {
    SEEN_U64.fetch_add(x, Ordering::Relaxed);
}
static SEEN_U64: AtomicU64 = AtomicU64::new(0);

struct Hooks {
    on_tick: StaticCall<extern "C" fn(u64)>,
}
static HOOKS: Hooks = Hooks {
    on_tick: StaticCall::null(),
};

#[inline(never)]
fn tick(x: u64) -> bool {
    if has_target!(HOOKS.on_tick) {
        static_call!(HOOKS.on_tick)(x);
        return true;
    }
    false
}

#[test]
fn a_hook_over_a_field_key() {
    assert!(!tick(1));
    HOOKS.on_tick.update(count_u64);
    assert!(tick(5));
    assert_eq!(SEEN_U64.load(Ordering::Relaxed), 5);
    HOOKS.on_tick.set_null();
    assert!(!tick(7));
    assert_eq!(SEEN_U64.load(Ordering::Relaxed), 5);
}

// --- hostile environments ----------------------------------------------------------------------

define_static_branch!(HOSTILE: bool = false);

#[inline(never)]
fn hostile_site() -> bool {
    static_branch!(HOSTILE)
}

#[inline(never)]
fn hostile_site_never_run_before() -> bool {
    static_branch!(HOSTILE)
}

const PR_SET_MDWE: i32 = 65;
const PR_MDWE_REFUSE_EXEC_GAIN: u64 = 1;

/// Forbids gaining execute permission for the rest of the process; false if the kernel has no
/// MDWE (then the scenario checks nothing more).
fn set_mdwe() -> bool {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0u64, 0u64, 0u64) };
    if r != 0 {
        println!("note: this kernel has no MDWE; the scenario checks nothing more");
    }
    r == 0
}

scenario! {
    /// W^X after a branch site was patched: it can no longer be rewritten, so `enable` fails as
    /// a whole and changes nothing: the key stays off, the site stays a NOP, a site that never
    /// ran (through its stub) agrees, and so does the next try.
    fn mdwe_after_patching_makes_enable_fail_cleanly() {
        // (A closure, so that `return` still reports the scenario passed.)
        let run = || {
            let f = black_box(hostile_site as fn() -> bool);
            let fresh = black_box(hostile_site_never_run_before as fn() -> bool);
            let (site, fresh_site) = (site_of(f, HOSTILE.as_ptr()), site_of(fresh, HOSTILE.as_ptr()));
            assert!(!f());
            static_call::flush();
            assert_patched(site, &HOSTILE, false);
            if !patching() || !set_mdwe() {
                return;
            }
            let err = HOSTILE.try_set(true).unwrap_err();
            assert_eq!(err.kind, static_call::ErrorKind::WriteRefused { errno: libc::EACCES }, "{err}");
            assert!(!HOSTILE.is_enabled(), "the key stays off");
            assert_state(site, BranchState::Nop);
            assert!(!f());
            assert!(!fresh(), "a first run through the stub agrees");
            assert_state(fresh_site, BranchState::Home);
            assert!(HOSTILE.try_set(true).is_err(), "and again, without crashing");
            assert!(!f() && !fresh());
        };
        run();
    }
}

scenario! {
    /// `unpatch_all` returns branch sites to their stubs; switching keeps working without
    /// writing code, through the stubs.
    fn unpatch_all_returns_branch_sites_to_their_stubs() {
        // (A closure, so that `return` still reports the scenario passed.)
        let run = || {
            let f = black_box(hostile_site as fn() -> bool);
            let site = site_of(f, HOSTILE.as_ptr());
            assert!(!f());
            HOSTILE.enable();
            static_call::flush();
            assert_patched(site, &HOSTILE, true);
            static_call::unpatch_all().unwrap();
            assert_state(site, BranchState::Home);
            if !set_mdwe() {
                return;
            }
            HOSTILE.disable();
            assert!(!f());
            HOSTILE.enable();
            assert!(f());
            assert_state(site, BranchState::Home);
            let listed = HOSTILE.sites();
            assert!(
                listed.iter().all(|s| matches!(s.state, SiteState::Trampoline(_))),
                "{listed:?}"
            );
        };
        run();
    }
}

scenario! {
    /// With patching off, branch sites stay on their stubs and still follow their keys.
    fn with_patching_off_branches_go_through_their_stubs() env ["STATIC_CALL_DISABLE" = "1"] {
        // (A closure, so that `return` still reports the scenario passed.)
        let run = || {
            let f = black_box(hostile_site as fn() -> bool);
            assert!(!f());
            HOSTILE.enable();
            assert!(f());
            HOSTILE.disable();
            assert!(!f());
            static_call::flush();
            if static_call::trampoline_address().is_none() {
                return; // the portable fallback: no sites
            }
            let listed = HOSTILE.sites();
            assert_eq!(listed.len(), 1, "{listed:?}");
            assert!(matches!(listed[0].state, SiteState::Trampoline(_)), "{listed:?}");
            if let Some(b) = site_of(f, HOSTILE.as_ptr()) {
                assert_eq!(branch_state(&b), BranchState::Home);
            }
        };
        run();
    }
}

define_static_branch!(FORKED: bool = false);

#[inline(never)]
fn forked_site() -> bool {
    static_branch!(FORKED)
}

#[inline(never)]
fn forked_site_only_the_child_runs() -> bool {
    static_branch!(FORKED)
}

scenario! {
    /// fork(): in the child, inherited patched branch sites work, a new one gets patched, and
    /// `enable` rewrites both; the parent is unaffected.
    fn a_forked_child_switches_its_own_branches() {
        let f = black_box(forked_site as fn() -> bool);
        let g = black_box(forked_site_only_the_child_runs as fn() -> bool);
        let (site, child_site) = (site_of(f, FORKED.as_ptr()), site_of(g, FORKED.as_ptr()));
        assert!(!f());
        static_call::flush();
        // SAFETY: the child only runs the closure below, then exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let verdict = std::panic::catch_unwind(|| {
                assert!(!f() && !g());
                static_call::flush();
                assert_state(child_site, BranchState::Nop);
                FORKED.enable();
                assert!(f() && g());
                assert_state(site, BranchState::Jump);
                assert_state(child_site, BranchState::Jump);
            });
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(i32::from(verdict.is_err())) }
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child: {status:#x}");
        assert!(!f(), "the parent's key is still off");
        assert_state(site, BranchState::Nop);
        assert_state(child_site, BranchState::Home);
    }
}

define_static_branch!(IN_HANDLER: bool = true);
static HANDLER_TAKEN: AtomicU64 = AtomicU64::new(0);
static HANDLER_RUNS: AtomicU64 = AtomicU64::new(0);

/// A branch that only the signal handler runs: its first run (registration) happens there.
extern "C" fn on_signal(_: libc::c_int) {
    HANDLER_RUNS.fetch_add(1, Ordering::Relaxed);
    if static_branch!(IN_HANDLER) {
        HANDLER_TAKEN.fetch_add(1, Ordering::Relaxed);
    }
}

scenario! {
    /// Branch sites whose first run is in a signal handler, interrupting a thread that keeps
    /// switching the key (holding the patch lock): no deadlock, and every run right.
    fn branches_in_signal_handlers_never_deadlock() {
        static_call::init();
        // SAFETY: installs a handler for SIGUSR1, which this thread raises below.
        unsafe {
            let mut action: libc::sigaction = core::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            assert_eq!(libc::sigaction(libc::SIGUSR1, &action, core::ptr::null_mut()), 0);
        }
        let switcher = std::thread::spawn(|| {
            for i in 0..2000 {
                IN_HANDLER.set(i % 2 == 0);
            }
            IN_HANDLER.enable();
        });
        let mut raised = 0;
        while !switcher.is_finished() {
            // SAFETY: raise has no preconditions; the handler is installed.
            unsafe { libc::raise(libc::SIGUSR1) };
            raised += 1;
        }
        switcher.join().unwrap();
        let before = HANDLER_TAKEN.load(Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { libc::raise(libc::SIGUSR1) };
        assert_eq!(HANDLER_TAKEN.load(Ordering::Relaxed), before + 1, "on after enable()");
        assert_eq!(HANDLER_RUNS.load(Ordering::Relaxed), raised + 1);
        println!("{raised} signals raised while switching");
        static_call::flush();
        if patching() {
            let listed = IN_HANDLER.sites();
            assert_eq!(listed.len(), 1, "{listed:?}");
            assert_eq!(listed[0].state, SiteState::Patched);
        }
    }
}
