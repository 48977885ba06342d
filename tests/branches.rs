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
    Batch, SiteState, StaticBranch, StaticCall, StaticCallKey, Target, define_static_branch,
    define_static_call, has_target, static_branch, static_branch_likely, static_call,
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

// --- two phases --------------------------------------------------------------------------------

extern "C" fn phased_target(_: u64) {}
define_static_call!(PHASED: extern "C" fn(u64) = None);

#[inline(never)]
fn phased(x: u64) {
    if has_target!(PHASED) {
        static_call!(PHASED)(x);
    }
}

/// The bytes of `phased`'s branch site and of its call site, between the two phases.
static BETWEEN: std::sync::Mutex<Vec<(BranchState, Vec<u8>)>> = std::sync::Mutex::new(Vec::new());
static PHASED_SITES: std::sync::OnceLock<(BranchBytes, usize)> = std::sync::OnceLock::new();

fn note_between_phases() {
    let (branch, call) = PHASED_SITES.get().unwrap();
    BETWEEN
        .lock()
        .unwrap()
        .push((branch_state(branch), common::read(*call, 5)));
}

scenario! {
    /// A hook gaining a target writes its call sites first (and syncs), then its branch sites;
    /// losing it writes the branches first, then the calls. Checked on the bytes, between the
    /// phases: a branch that is on never guards a call that is still a NOP.
    fn a_hook_update_writes_calls_and_branches_in_two_ordered_phases() {
        use static_call::__private::faults::{self, Point};
        if !patching() {
            return;
        }
        let branch = only_branch(phased as fn(u64) as usize, PHASED.as_ptr() as usize);
        PHASED.update(phased_target);
        phased(1); // registers the branch (on) and the call (calls the target)
        static_call::flush();
        PHASED.set_null();
        let call = PHASED.sites().into_iter().map(|s| s.address).find(|&a| a != branch.site);
        let call = call.expect("the call site");
        PHASED_SITES.set((branch, call)).unwrap();
        assert_eq!(branch_state(&branch), BranchState::Nop);
        assert_eq!(common::read(call, 5), [0x0f, 0x1f, 0x44, 0x00, 0x00]);
        let syncs = static_call::stats().core_syncs;

        faults::set_hook(Point::BetweenPhases, Some(note_between_phases));
        PHASED.update(phased_target);
        let enabled_syncs = static_call::stats().core_syncs - syncs;
        PHASED.set_null();
        faults::set_hook(Point::BetweenPhases, None);

        let between = BETWEEN.lock().unwrap().clone();
        assert_eq!(between.len(), 2, "one hook call per update: {between:?}");
        // Enabling: the call is written, the branch still off.
        assert_eq!(between[0].0, BranchState::Nop);
        assert_eq!(between[0].1[0], 0xe8, "the call site calls the target: {:02x?}", between[0].1);
        // Disabling: the branch is off already, the call still calls the target.
        assert_eq!(between[1].0, BranchState::Nop);
        assert_eq!(between[1].1[0], 0xe8, "{:02x?}", between[1].1);
        // And after each update, both agree with the key.
        assert_eq!(branch_state(&branch), BranchState::Nop);
        assert_eq!(common::read(call, 5), [0x0f, 0x1f, 0x44, 0x00, 0x00]);
        // One check before anything is published, then one sync per phase.
        assert_eq!(enabled_syncs, 3);
    }
}

// --- registers ---------------------------------------------------------------------------------

static REGS_KEY: StaticBranch = StaticBranch::new(true);

// `static_call_test_through_entry(gp_in, gp_out, vec_in, vec_out, level)`: loads every
// general-purpose register but rsp from `gp_in` (rax rbx rcx rdx rsi rdi rbp r8 r9 r10 r12 r13
// r14 r15, then r11) and the vector registers from `vec_in` (level 0: xmm0-15; 1: ymm0-15; 2:
// zmm0-31 and k1-k7), calls the branch entry exactly as a stub does (`push r11; lea r11, [rip +
// KEY]; call entry; pop r11`), and stores them all into `gp_out` (then the flags, at index 15)
// and `vec_out`. Not a stub's tail after the call, so nothing is registered; the stack is
// misaligned for the call on purpose (rsp = 0 mod 16 at the entry), which the entry must cope with.
core::arch::global_asm!(
    ".pushsection .text.static_call_test_through_entry,\"ax\",@progbits",
    ".globl static_call_test_through_entry",
    ".hidden static_call_test_through_entry",
    ".p2align 4",
    "static_call_test_through_entry:",
    "push rbx", "push rbp", "push r12", "push r13", "push r14", "push r15",
    "push rsi", "push rcx", "push r8",
    "mov r10, rdx",
    "cmp r8d, 2", "jae 22f",
    "cmp r8d, 1", "jae 21f",
    "movdqu xmm0, [r10 + 0]", "movdqu xmm1, [r10 + 16]", "movdqu xmm2, [r10 + 32]",
    "movdqu xmm3, [r10 + 48]", "movdqu xmm4, [r10 + 64]", "movdqu xmm5, [r10 + 80]",
    "movdqu xmm6, [r10 + 96]", "movdqu xmm7, [r10 + 112]", "movdqu xmm8, [r10 + 128]",
    "movdqu xmm9, [r10 + 144]", "movdqu xmm10, [r10 + 160]", "movdqu xmm11, [r10 + 176]",
    "movdqu xmm12, [r10 + 192]", "movdqu xmm13, [r10 + 208]", "movdqu xmm14, [r10 + 224]",
    "movdqu xmm15, [r10 + 240]",
    "jmp 23f",
    "21:",
    "vmovdqu ymm0, [r10 + 0]", "vmovdqu ymm1, [r10 + 32]", "vmovdqu ymm2, [r10 + 64]",
    "vmovdqu ymm3, [r10 + 96]", "vmovdqu ymm4, [r10 + 128]", "vmovdqu ymm5, [r10 + 160]",
    "vmovdqu ymm6, [r10 + 192]", "vmovdqu ymm7, [r10 + 224]", "vmovdqu ymm8, [r10 + 256]",
    "vmovdqu ymm9, [r10 + 288]", "vmovdqu ymm10, [r10 + 320]", "vmovdqu ymm11, [r10 + 352]",
    "vmovdqu ymm12, [r10 + 384]", "vmovdqu ymm13, [r10 + 416]", "vmovdqu ymm14, [r10 + 448]",
    "vmovdqu ymm15, [r10 + 480]",
    "jmp 23f",
    "22:",
    "vmovdqu64 zmm0, [r10 + 0]", "vmovdqu64 zmm1, [r10 + 64]", "vmovdqu64 zmm2, [r10 + 128]",
    "vmovdqu64 zmm3, [r10 + 192]", "vmovdqu64 zmm4, [r10 + 256]", "vmovdqu64 zmm5, [r10 + 320]",
    "vmovdqu64 zmm6, [r10 + 384]", "vmovdqu64 zmm7, [r10 + 448]", "vmovdqu64 zmm8, [r10 + 512]",
    "vmovdqu64 zmm9, [r10 + 576]", "vmovdqu64 zmm10, [r10 + 640]", "vmovdqu64 zmm11, [r10 + 704]",
    "vmovdqu64 zmm12, [r10 + 768]", "vmovdqu64 zmm13, [r10 + 832]", "vmovdqu64 zmm14, [r10 + 896]",
    "vmovdqu64 zmm15, [r10 + 960]", "vmovdqu64 zmm16, [r10 + 1024]", "vmovdqu64 zmm17, [r10 + 1088]",
    "vmovdqu64 zmm18, [r10 + 1152]", "vmovdqu64 zmm19, [r10 + 1216]", "vmovdqu64 zmm20, [r10 + 1280]",
    "vmovdqu64 zmm21, [r10 + 1344]", "vmovdqu64 zmm22, [r10 + 1408]", "vmovdqu64 zmm23, [r10 + 1472]",
    "vmovdqu64 zmm24, [r10 + 1536]", "vmovdqu64 zmm25, [r10 + 1600]", "vmovdqu64 zmm26, [r10 + 1664]",
    "vmovdqu64 zmm27, [r10 + 1728]", "vmovdqu64 zmm28, [r10 + 1792]", "vmovdqu64 zmm29, [r10 + 1856]",
    "vmovdqu64 zmm30, [r10 + 1920]", "vmovdqu64 zmm31, [r10 + 1984]",
    "kmovq k1, [r10 + 2048]", "kmovq k2, [r10 + 2056]", "kmovq k3, [r10 + 2064]",
    "kmovq k4, [r10 + 2072]", "kmovq k5, [r10 + 2080]", "kmovq k6, [r10 + 2088]",
    "kmovq k7, [r10 + 2096]",
    "23:",
    "mov r11, rdi",
    "mov rax, [r11 + 0]", "mov rbx, [r11 + 8]", "mov rcx, [r11 + 16]",
    "mov rdx, [r11 + 24]", "mov rsi, [r11 + 32]", "mov rdi, [r11 + 40]",
    "mov rbp, [r11 + 48]", "mov r8, [r11 + 56]", "mov r9, [r11 + 64]",
    "mov r10, [r11 + 72]", "mov r12, [r11 + 80]", "mov r13, [r11 + 88]",
    "mov r14, [r11 + 96]", "mov r15, [r11 + 104]", "mov r11, [r11 + 112]",
    "push r11",
    "lea r11, [rip + {key}]",
    "call {entry}",
    "pop r11",
    "pushfq",
    "push r11",
    "mov r11, [rsp + 32]",
    "mov [r11 + 0], rax", "mov [r11 + 8], rbx", "mov [r11 + 16], rcx",
    "mov [r11 + 24], rdx", "mov [r11 + 32], rsi", "mov [r11 + 40], rdi",
    "mov [r11 + 48], rbp", "mov [r11 + 56], r8", "mov [r11 + 64], r9",
    "mov [r11 + 72], r10", "mov [r11 + 80], r12", "mov [r11 + 88], r13",
    "mov [r11 + 96], r14", "mov [r11 + 104], r15",
    "pop rax", "mov [r11 + 112], rax",
    "pop rax", "mov [r11 + 120], rax",
    "pop r8", "pop r10", "pop rsi",
    "cmp r8d, 2", "jae 32f",
    "cmp r8d, 1", "jae 31f",
    "movdqu [r10 + 0], xmm0", "movdqu [r10 + 16], xmm1", "movdqu [r10 + 32], xmm2",
    "movdqu [r10 + 48], xmm3", "movdqu [r10 + 64], xmm4", "movdqu [r10 + 80], xmm5",
    "movdqu [r10 + 96], xmm6", "movdqu [r10 + 112], xmm7", "movdqu [r10 + 128], xmm8",
    "movdqu [r10 + 144], xmm9", "movdqu [r10 + 160], xmm10", "movdqu [r10 + 176], xmm11",
    "movdqu [r10 + 192], xmm12", "movdqu [r10 + 208], xmm13", "movdqu [r10 + 224], xmm14",
    "movdqu [r10 + 240], xmm15",
    "jmp 33f",
    "31:",
    "vmovdqu [r10 + 0], ymm0", "vmovdqu [r10 + 32], ymm1", "vmovdqu [r10 + 64], ymm2",
    "vmovdqu [r10 + 96], ymm3", "vmovdqu [r10 + 128], ymm4", "vmovdqu [r10 + 160], ymm5",
    "vmovdqu [r10 + 192], ymm6", "vmovdqu [r10 + 224], ymm7", "vmovdqu [r10 + 256], ymm8",
    "vmovdqu [r10 + 288], ymm9", "vmovdqu [r10 + 320], ymm10", "vmovdqu [r10 + 352], ymm11",
    "vmovdqu [r10 + 384], ymm12", "vmovdqu [r10 + 416], ymm13", "vmovdqu [r10 + 448], ymm14",
    "vmovdqu [r10 + 480], ymm15",
    "vzeroupper",
    "jmp 33f",
    "32:",
    "vmovdqu64 [r10 + 0], zmm0", "vmovdqu64 [r10 + 64], zmm1", "vmovdqu64 [r10 + 128], zmm2",
    "vmovdqu64 [r10 + 192], zmm3", "vmovdqu64 [r10 + 256], zmm4", "vmovdqu64 [r10 + 320], zmm5",
    "vmovdqu64 [r10 + 384], zmm6", "vmovdqu64 [r10 + 448], zmm7", "vmovdqu64 [r10 + 512], zmm8",
    "vmovdqu64 [r10 + 576], zmm9", "vmovdqu64 [r10 + 640], zmm10", "vmovdqu64 [r10 + 704], zmm11",
    "vmovdqu64 [r10 + 768], zmm12", "vmovdqu64 [r10 + 832], zmm13", "vmovdqu64 [r10 + 896], zmm14",
    "vmovdqu64 [r10 + 960], zmm15", "vmovdqu64 [r10 + 1024], zmm16", "vmovdqu64 [r10 + 1088], zmm17",
    "vmovdqu64 [r10 + 1152], zmm18", "vmovdqu64 [r10 + 1216], zmm19", "vmovdqu64 [r10 + 1280], zmm20",
    "vmovdqu64 [r10 + 1344], zmm21", "vmovdqu64 [r10 + 1408], zmm22", "vmovdqu64 [r10 + 1472], zmm23",
    "vmovdqu64 [r10 + 1536], zmm24", "vmovdqu64 [r10 + 1600], zmm25", "vmovdqu64 [r10 + 1664], zmm26",
    "vmovdqu64 [r10 + 1728], zmm27", "vmovdqu64 [r10 + 1792], zmm28", "vmovdqu64 [r10 + 1856], zmm29",
    "vmovdqu64 [r10 + 1920], zmm30", "vmovdqu64 [r10 + 1984], zmm31",
    "kmovq [r10 + 2048], k1", "kmovq [r10 + 2056], k2", "kmovq [r10 + 2064], k3",
    "kmovq [r10 + 2072], k4", "kmovq [r10 + 2080], k5", "kmovq [r10 + 2088], k6",
    "kmovq [r10 + 2096], k7",
    "vzeroupper",
    "33:",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop rbp", "pop rbx",
    "ret",
    ".size static_call_test_through_entry, . - static_call_test_through_entry",
    ".popsection",
    key = sym REGS_KEY,
    entry = sym static_call::__private::branch_entry,
);

unsafe extern "C" {
    fn static_call_test_through_entry(
        gp_in: *const u64,
        gp_out: *mut u64,
        vec_in: *const u8,
        vec_out: *mut u8,
        level: u32,
    );
}

/// Bytes of vector state per level (xmm0-15; ymm0-15; zmm0-31 and k1-k7).
const VEC_BYTES: [usize; 3] = [256, 512, 2048 + 7 * 8];
/// The general-purpose registers `static_call_test_through_entry` loads, in its order.
const GP_NAMES: [&str; 15] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r12", "r13", "r14", "r15",
    "r11",
];

/// Runs the entry with recognisable values in every register, and checks they all came back.
/// Returns whether the entry said "on".
fn registers_survive(level: u32, seed: u64) -> bool {
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x
    };
    let gp_in: [u64; 16] = core::array::from_fn(|_| next());
    let mut gp_out = [0u64; 16];
    let len = VEC_BYTES[level as usize];
    let vec_in: Vec<u8> = (0..len).map(|_| next() as u8).collect();
    let mut vec_out = vec![0u8; len];
    // SAFETY: the buffers have the sizes the function reads and writes for `level`, and the
    // caller checked the CPU has the registers of `level`.
    unsafe {
        static_call_test_through_entry(
            gp_in.as_ptr(),
            gp_out.as_mut_ptr(),
            vec_in.as_ptr(),
            vec_out.as_mut_ptr(),
            level,
        )
    };
    for (i, name) in GP_NAMES.iter().enumerate() {
        assert_eq!(gp_out[i], gp_in[i], "{name} changed (level {level})");
    }
    for (i, (a, b)) in vec_in.chunks(16).zip(vec_out.chunks(16)).enumerate() {
        assert_eq!(
            a,
            b,
            "vector state bytes {}..{} changed (level {level})",
            16 * i,
            16 * i + 16
        );
    }
    const ZF: u64 = 1 << 6;
    gp_out[15] & ZF == 0
}

/// The vector levels this CPU has: 0 (SSE), 1 (AVX), 2 (AVX-512).
fn levels() -> Vec<u32> {
    let mut l = vec![0];
    if std::arch::is_x86_feature_detected!("avx") {
        l.push(1);
    }
    if std::arch::is_x86_feature_detected!("avx512f") {
        l.push(2);
    }
    l
}

scenario! {
    /// The branch entry gives back every register, as a branch site's asm block (which declares
    /// no clobbers) needs: the general-purpose ones, xmm0-15, ymm0-15, zmm0-31 and k1-k7 as far
    /// as the CPU has them. First in a fresh process, where the entry initialises the library
    /// (allocations, libc's AVX memcpy...), then again.
    fn the_branch_entry_preserves_every_register() {
        let levels = levels();
        let top = *levels.last().unwrap();
        assert!(registers_survive(top, 1), "REGS_KEY is on: ZF clear");
        for &level in &levels {
            for seed in 2..6 {
                assert!(registers_survive(level, seed));
            }
        }
        REGS_KEY.disable();
        for &level in &levels {
            assert!(!registers_survive(level, 9), "off: ZF set");
        }
        println!("levels checked: {levels:?}");
    }
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
        let f = black_box(hostile_site as fn() -> bool);
        let fresh = black_box(hostile_site_never_run_before as fn() -> bool);
        let (site, fresh_site) = (site_of(f, HOSTILE.as_ptr()), site_of(fresh, HOSTILE.as_ptr()));
        assert!(!f());
        static_call::flush();
        assert_patched(site, &HOSTILE, false);
        if !set_mdwe() {
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
    }
}

scenario! {
    /// `unpatch_all` returns branch sites to their stubs; switching keeps working without
    /// writing code, through the stubs.
    fn unpatch_all_returns_branch_sites_to_their_stubs() {
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
    }
}

scenario! {
    /// With patching off, branch sites stay on their stubs and still follow their keys.
    fn with_patching_off_branches_go_through_their_stubs() env ["STATIC_CALL_DISABLE" = "1"] {
        let f = black_box(hostile_site as fn() -> bool);
        assert!(!f());
        HOSTILE.enable();
        assert!(f());
        HOSTILE.disable();
        assert!(!f());
        static_call::flush();
        let listed = HOSTILE.sites();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(matches!(listed[0].state, SiteState::Trampoline(_)), "{listed:?}");
        if let Some(b) = site_of(f, HOSTILE.as_ptr()) {
            assert_eq!(branch_state(&b), BranchState::Home);
        }
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
