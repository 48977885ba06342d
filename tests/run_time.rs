//! Run-time sites (`key.call_guarded`, and `key.call` where the build makes it guarded), proven
//! on the bytes: a site is `call <run-time entry>` until its first call, then `call <guard
//! stub>` whose every entry compares the key's *contents* with a target and jumps there, then a
//! longer chain, then the indirect call through the key. Every call reaches the target its key
//! holds when it is made, whatever key reaches the site: one of several in rotation or at
//! random, a key replaced in place, a heap key freed and another allocated at its address, a key
//! updated.
//!
//! Each test uses its own sites (and, where it changes them, its own keys): tests run in
//! parallel in one process and share the patcher. Site states change only at `flush()` here (the
//! worker may settle a site earlier, never differently).
#![cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]

mod common;

use std::sync::Mutex;

use common::{RunTimeForm, patching, run_time_form, run_time_sites_in, run_time_state};
use static_call::{Reason, SiteState, StaticCall, define_static_call};

type Key = StaticCall<extern "C" fn(u64) -> u64>;

macro_rules! targets {
    ($all:ident: $($name:ident = $n:literal),*) => {
        $(
            #[inline(never)]
            extern "C" fn $name(x: u64) -> u64 {
                x << 5 | $n
            }
        )*
        const $all: [extern "C" fn(u64) -> u64; 16] = [$($name),*];
    };
}
targets!(TARGETS: t0 = 0, t1 = 1, t2 = 2, t3 = 3, t4 = 4, t5 = 5, t6 = 6, t7 = 7, t8 = 8,
    t9 = 9, t10 = 10, t11 = 11, t12 = 12, t13 = 13, t14 = 14, t15 = 15);
// Targets of the tests that update keys, and of no other: an update away from a target makes
// every site's next stub leave it out, which would change what the other tests see.
targets!(UPDATED: u0 = 16, u1 = 17, u2 = 18, u3 = 19, u4 = 20, u5 = 21, u6 = 22, u7 = 23,
    u8 = 24, u9 = 25, u10 = 26, u11 = 27, u12 = 28, u13 = 29, u14 = 30, u15 = 31);

/// Which target (0..32) a call reached, from its result.
fn reached(r: u64) -> usize {
    (r & 31) as usize
}

/// Keys of the sixteen targets, for the sites that only read keys: more than the longest chain
/// holds in any build.
static KEYS: [Key; 16] = [
    StaticCall::new(t0),
    StaticCall::new(t1),
    StaticCall::new(t2),
    StaticCall::new(t3),
    StaticCall::new(t4),
    StaticCall::new(t5),
    StaticCall::new(t6),
    StaticCall::new(t7),
    StaticCall::new(t8),
    StaticCall::new(t9),
    StaticCall::new(t10),
    StaticCall::new(t11),
    StaticCall::new(t12),
    StaticCall::new(t13),
    StaticCall::new(t14),
    StaticCall::new(t15),
];

/// The targets the first `n` of `KEYS` hold.
fn keys_targets(n: usize) -> Vec<usize> {
    KEYS[..n].iter().map(target_of).collect()
}

/// The address of the target `KEYS[i]` holds (what a stub compares with).
fn target_of(key: &Key) -> usize {
    key.query() as usize
}

/// The one run-time site in the function at `func`.
#[track_caller]
fn only_run_time_site(func: usize) -> usize {
    let sites = run_time_sites_in(func, 4096);
    assert_eq!(
        sites.len(),
        1,
        "one run-time site in {func:#x}:\n{}",
        common::disassemble(func, 4096)
    );
    sites[0]
}

/// A small deterministic random sequence (xorshift64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Functions whose body is one run-time site, each its own: the name, kept in a `black_box`,
/// makes their code differ, or LLVM would fold them into one function (and one site).
macro_rules! sites {
    ($($name:ident)*) => {$(
        #[inline(never)]
        fn $name(k: &Key, x: u64) -> u64 {
            std::hint::black_box(stringify!($name));
            k.call_guarded(x)
        }
    )*};
}

// --- the site and its first stub ---------------------------------------------------------------

sites!(first_site);

#[test]
fn a_run_time_site_calls_its_own_entry_then_a_stub_that_compares_the_keys_contents() {
    let key = Box::new(StaticCall::new(t3 as extern "C" fn(u64) -> u64));
    if !patching() {
        assert_eq!(first_site(&key, 1), t3(1));
        return;
    }
    let site = only_run_time_site(first_site as *const () as usize);
    assert!(site % 8 + 5 <= 8, "the call lies in one aligned quadword");
    assert_eq!(run_time_form(site), RunTimeForm::Home);
    assert!(
        static_call::run_time_sites()
            .iter()
            .all(|s| s.address != site),
        "a site that never ran is not registered"
    );

    assert_eq!(
        first_site(&key, 1),
        t3(1),
        "the first call reaches the target"
    );
    static_call::flush();
    let (state, form) = run_time_state(site);
    let target = target_of(&key);
    assert_eq!(state, SiteState::Monomorphic { target });
    let RunTimeForm::Stub(stub) = form else {
        panic!("{form:?}")
    };
    assert_eq!(
        stub.entries,
        [(target, target)],
        "a near target is jumped to directly"
    );
    assert!(
        static_call::status().stubs >= 1,
        "{:?}",
        static_call::status()
    );
    let (lo, hi) = static_call::__private::code_pool_reserve();
    let stub_at = common::call_target(site).unwrap();
    assert!(
        (lo..hi).contains(&stub_at),
        "the stub is in the code pool's reserve in our text"
    );
    for x in 0..100 {
        assert_eq!(first_site(&key, x), t3(x));
    }
}

// --- one site, 1, 2, 3, 8 and 16 keys, in rotation and at random ------------------------------

sites!(rot1 rot2 rot3 rot8 rot16 rand1 rand2 rand3 rand8 rand16 staged);

/// Calls per round, between two `flush`es, and the most rounds before the site must be settled.
const CALLS: usize = 64;
const ROUNDS: usize = 24;

/// What a site that sees `n` keys ends as.
fn final_form_for(n: usize) -> &'static str {
    if n == 1 {
        "monomorphic"
    } else if n <= static_call::__private::MAX_ENTRIES {
        "polymorphic"
    } else {
        "megamorphic"
    }
}

fn form_name(state: &SiteState) -> &'static str {
    match state {
        SiteState::Monomorphic { .. } => "monomorphic",
        SiteState::Polymorphic { .. } => "polymorphic",
        SiteState::Megamorphic(_) => "megamorphic",
        _ => "home",
    }
}

/// Drives `site_fn` with `n` keys in rotation (or at random, `rng`) until it settles, checking
/// every result and decoding the site at every state; returns the forms it went through.
fn drive(site_fn: fn(&Key, u64) -> u64, n: usize, mut rng: Option<Rng>) -> Vec<RunTimeForm> {
    let keys = &KEYS[..n];
    let site = patching().then(|| only_run_time_site(site_fn as *const () as usize));
    let mut forms = Vec::new();
    if let Some(site) = site {
        forms.push(run_time_form(site));
    }
    let mut stable = 0;
    for round in 0..ROUNDS {
        // One call first, so that the site's first stub is seen (the worker may move on by
        // itself within a round).
        for i in 0..if round == 0 { 1 } else { CALLS } {
            let k = rng.as_mut().map_or(i % n, |r| r.below(n));
            let x = (round * CALLS + i) as u64;
            let r = site_fn(&keys[k], x);
            assert_eq!((r >> 5, reached(r)), (x, k), "round {round} call {i}");
        }
        static_call::flush();
        let Some(site) = site else { continue };
        let (state, form) = run_time_state(site);
        if let RunTimeForm::Stub(stub) = &form {
            let all: Vec<usize> = keys.iter().map(target_of).collect();
            assert!(
                stub.targets().iter().all(|t| all.contains(t)),
                "{stub:?} guards only targets its keys held"
            );
            if let Some(RunTimeForm::Stub(before)) = forms.last() {
                assert!(
                    stub.targets().starts_with(&before.targets()),
                    "a chain grows by the targets it missed: {before:?} then {stub:?}"
                );
            }
        }
        if forms.last() != Some(&form) {
            forms.push(form);
            stable = 0;
        } else {
            stable += 1;
        }
        if form_name(&state) == final_form_for(n) && stable >= 2 {
            if let SiteState::Megamorphic(why) = state {
                assert_eq!(why, Reason::TooManyTargets);
            }
            return forms;
        }
    }
    if let Some(site) = site {
        panic!(
            "{n} keys: the site did not settle as {}: {forms:?}, {:?}",
            final_form_for(n),
            run_time_state(site)
        );
    }
    forms
}

#[test]
fn one_site_sees_one_two_three_eight_and_sixteen_keys_in_rotation_and_at_random() {
    type SiteFn = fn(&Key, u64) -> u64;
    let cases: [(SiteFn, usize, bool); 10] = [
        (rot1, 1, false),
        (rot2, 2, false),
        (rot3, 3, false),
        (rot8, 8, false),
        (rot16, 16, false),
        (rand1, 1, true),
        (rand2, 2, true),
        (rand3, 3, true),
        (rand8, 8, true),
        (rand16, 16, true),
    ];
    for (site_fn, n, random) in cases {
        let rng = random.then_some(Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64));
        let forms = drive(site_fn, n, rng);
        if !patching() {
            continue;
        }
        // Home, then a stub for the first key's target, then growing chains, then (beyond the
        // most a stub holds) the indirect call; never anything else. (The worker settles sites
        // on its own too, so a chain may come and go between two looks: `staged` below sees
        // every one.)
        assert_eq!(forms[0], RunTimeForm::Home, "{forms:?}");
        let first = keys_targets(n);
        assert!(
            matches!(&forms[1], RunTimeForm::Stub(s) if s.entries.len() == 1 && first.contains(&s.entries[0].0)),
            "{n} keys: {forms:?}"
        );
        let longest = forms
            .iter()
            .filter_map(|f| match f {
                RunTimeForm::Stub(s) => Some(s.entries.len()),
                _ => None,
            })
            .max()
            .unwrap();
        assert!(
            longest <= n.min(static_call::__private::MAX_ENTRIES),
            "{n} keys: {forms:?}"
        );
        if n <= static_call::__private::MAX_ENTRIES {
            assert_eq!(longest, n, "{n} keys: {forms:?}");
        }
        assert_eq!(
            forms.last() == Some(&RunTimeForm::Megamorphic),
            n > static_call::__private::MAX_ENTRIES,
            "{n} keys: {forms:?}"
        );
        println!(
            "{n} keys, {}: {} forms",
            if random { "random" } else { "rotation" },
            forms.len()
        );
    }
}

/// Every state in turn, on one site, each decoded: one more key at a time, so that each step
/// adds exactly one target (whenever the worker settles the site, the outcome is the same).
#[test]
fn each_new_key_adds_one_entry_until_the_site_goes_megamorphic() {
    let max = static_call::__private::MAX_ENTRIES;
    let site = patching().then(|| only_run_time_site(staged as *const () as usize));
    let mut x = 0;
    for n in 1..=max + 1 {
        // Enough calls of the new key to send the site back to the patcher.
        for _ in 0..3 * static_call::__private::MISSES_TO_REQUEUE {
            for (k, key) in KEYS[..n].iter().enumerate() {
                x += 1;
                let r = staged(key, x);
                assert_eq!((r >> 5, reached(r)), (x, k));
            }
        }
        static_call::flush();
        let Some(site) = site else { continue };
        let (state, form) = run_time_state(site);
        let want: Vec<usize> = KEYS[..n].iter().map(target_of).collect();
        match (n, state) {
            (1, SiteState::Monomorphic { target }) => assert_eq!(target, want[0]),
            (n, SiteState::Polymorphic { targets }) if n <= max => {
                assert_eq!(targets, n);
                let RunTimeForm::Stub(stub) = form else {
                    panic!("{form:?}")
                };
                assert_eq!(stub.targets(), want, "in the order they were first missed");
            }
            (n, SiteState::Megamorphic(Reason::TooManyTargets)) if n > max => {
                assert_eq!(form, RunTimeForm::Megamorphic)
            }
            (n, state) => panic!("{n} keys: {state:?}, {form:?}"),
        }
    }
}

// --- keys that change under the site ------------------------------------------------------------

/// A device whose operations table is replaced in place: `which` says which target `read` holds,
/// and both change together, under the lock.
struct Dev {
    which: usize,
    read: Key,
}

static DEV: Mutex<Dev> = Mutex::new(Dev {
    which: 0,
    read: StaticCall::new(t0),
});

/// Calls the device's `read` (a run-time site), under its lock, and says which target it should
/// have reached.
#[inline(never)]
fn read_dev(x: u64) -> (u64, usize) {
    let dev = DEV.lock().unwrap();
    (dev.read.call_guarded(x), dev.which)
}

/// Threads call through the lock while another replaces the key in place
/// (`*DEV.lock() = Dev { .. }`, never `update`): a guard on the key's address would keep calling
/// the first target; the stub compares what the key holds.
#[test]
fn a_key_replaced_in_place_inside_a_mutex_is_called_as_it_is_now() {
    const REPLACEMENTS: usize = 300;
    const CALLERS: usize = 2;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let site = patching().then(|| only_run_time_site(read_dev as *const () as usize));
    let done = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    std::thread::scope(|s| {
        let callers: Vec<_> = (0..CALLERS)
            .map(|c| {
                let (done, calls) = (&done, &calls);
                s.spawn(move || {
                    let mut mine = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        let x = mine << 2 | c as u64;
                        let (r, which) = read_dev(x);
                        assert_eq!((r >> 5, reached(r)), (x, which), "call {mine}");
                        mine += 1;
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    mine
                })
            })
            .collect();
        // The callers are calling before the first replacement.
        while calls.load(Ordering::Relaxed) < 100 {
            std::thread::yield_now();
        }
        for i in 1..=REPLACEMENTS {
            let which = i % 3;
            *DEV.lock().unwrap() = Dev {
                which,
                read: StaticCall::new(TARGETS[which]),
            };
            for x in 0..8 {
                let (r, w) = read_dev(x);
                assert_eq!((reached(r), w), (which, which));
            }
            if i % 50 == 0 {
                static_call::flush();
            }
        }
        done.store(true, Ordering::Relaxed);
        for c in callers {
            c.join().unwrap();
        }
    });
    if let Some(site) = site {
        let (state, _) = run_time_state(site);
        assert!(
            !matches!(state, SiteState::Pending | SiteState::Trampoline(_)),
            "{state:?}"
        );
    }
}

sites!(call_boxed);

/// A heap key whose site is patched to its target's stub is freed, and another key, holding
/// another target, is allocated at the same address: its calls reach its own target.
#[test]
fn a_freed_heap_key_and_a_new_key_at_its_address_each_reach_their_own_target() {
    let site = patching().then(|| only_run_time_site(call_boxed as *const () as usize));
    let a: Box<Key> = Box::new(StaticCall::new(t1));
    let at = &*a as *const Key as usize;
    for x in 0..20 {
        assert_eq!(call_boxed(&a, x), t1(x));
    }
    static_call::flush();
    if let Some(site) = site {
        assert_eq!(
            run_time_state(site).0,
            SiteState::Monomorphic {
                target: target_of(&a)
            }
        );
    }
    drop(a);
    // The allocator hands the freed block out again for a block of the same size, soon (glibc's
    // per-thread cache is last in, first out; when it is full the block waits in a fast bin).
    let b = allocate_at(at, t2);
    for x in 0..20 {
        assert_eq!(call_boxed(&b, x), t2(x), "the stub for t1 must miss");
    }
    static_call::flush();
    for x in 0..20 {
        assert_eq!(call_boxed(&b, x), t2(x));
    }
    if let Some(site) = site {
        let (state, _) = run_time_state(site);
        assert_eq!(
            state,
            SiteState::Polymorphic { targets: 2 },
            "t1's key and t2's, one address"
        );
    }
    drop(b);
    let c = allocate_at(at, t1);
    assert_eq!(call_boxed(&c, 5), t1(5));
}

/// A new key holding `f`, allocated where a key was just freed: allocates keys (holding on to
/// them) until one lands at `at`, within a bounded number of tries. Allocates nothing else: a
/// large request would make glibc merge the freed block into its neighbours.
#[track_caller]
fn allocate_at(at: usize, f: extern "C" fn(u64) -> u64) -> Box<Key> {
    let mut others: [Option<Box<Key>>; 64] = [const { None }; 64];
    for other in &mut others {
        let k: Box<Key> = Box::new(StaticCall::new(f));
        if &*k as *const Key as usize == at {
            return k;
        }
        *other = Some(k);
    }
    panic!("no key was allocated at {at:#x} again");
}

// --- update ---------------------------------------------------------------------------------------

sites!(call_updated);

/// `update` never touches a run-time site: its stub misses at once (the key no longer holds the
/// old target), and the site is re-patched to the new target's stub, without the old one (some
/// key was updated away from it).
#[test]
fn after_an_update_the_stub_misses_and_the_site_gets_the_new_targets_stub() {
    let site = patching().then(|| only_run_time_site(call_updated as *const () as usize));
    let key: Box<Key> = Box::new(StaticCall::new(u4));
    for x in 0..20 {
        assert_eq!(call_updated(&key, x), u4(x));
    }
    static_call::flush();
    let before = static_call::stats();
    key.update(u5);
    assert_eq!(
        static_call::stats().writes,
        before.writes,
        "update wrote no code: the run-time site is no key's"
    );
    assert_eq!(call_updated(&key, 3), u5(3), "the first call after update");
    for x in 0..20 {
        assert_eq!(call_updated(&key, x), u5(x));
    }
    static_call::flush();
    if let Some(site) = site {
        assert_eq!(
            run_time_state(site).0,
            SiteState::Monomorphic {
                target: target_of(&key)
            },
            "u4 was dropped: a key was updated away from it"
        );
    }
}

sites!(call_churned);

/// A site whose key keeps changing changes form a bounded number of times, then stays
/// megamorphic.
#[test]
fn a_site_that_keeps_changing_goes_megamorphic() {
    let site = patching().then(|| only_run_time_site(call_churned as *const () as usize));
    let key: Box<Key> = Box::new(StaticCall::new(u0));
    let changes = static_call::__private::MAX_CHANGES as usize;
    for round in 0..changes + 3 {
        let which = round % 16;
        key.update(UPDATED[which]);
        for x in 0..2 * static_call::__private::MISSES_TO_REQUEUE {
            assert_eq!(reached(call_churned(&key, x)), 16 + which);
        }
        static_call::flush();
    }
    if let Some(site) = site {
        assert_eq!(
            run_time_state(site).0,
            SiteState::Megamorphic(Reason::TooManyChanges)
        );
        assert_eq!(run_time_form(site), RunTimeForm::Megamorphic);
    }
    assert_eq!(reached(call_churned(&key, 1)), 16 + (changes + 2) % 16);
}

// --- static keys, and what key.call is ------------------------------------------------------------

define_static_call!(NAMED: extern "C" fn(u64) -> u64 = t6);

#[inline(never)]
fn named_guarded(x: u64) -> u64 {
    NAMED.call_guarded(x)
}

/// `call_guarded` on a named key is still a run-time site: it belongs to no key, is not listed
/// by the key's `sites()`, and is never patched into a direct call.
#[test]
fn a_named_keys_call_guarded_is_a_run_time_site_and_no_keys_site() {
    let site = patching().then(|| only_run_time_site(named_guarded as *const () as usize));
    for x in 0..20 {
        assert_eq!(named_guarded(x), t6(x));
    }
    static_call::flush();
    assert!(NAMED.sites().is_empty(), "{:?}", NAMED.sites());
    if let Some(site) = site {
        assert_eq!(
            run_time_state(site).0,
            SiteState::Monomorphic {
                target: NAMED.query() as usize
            }
        );
    }
}

#[inline(never)]
fn default_call(k: &Key, x: u64) -> u64 {
    std::hint::black_box("default_call");
    k.call(x)
}

#[inline(never)]
fn indirect_call(k: &Key, x: u64) -> u64 {
    std::hint::black_box("indirect_call");
    k.call_indirect(x)
}

/// `key.call` is a guarded site exactly when `status().guards` says so (retpoline builds, or
/// `STATIC_CALL_GUARDS=on` at build time); `call_indirect` never is.
#[test]
fn key_call_is_a_guarded_site_exactly_when_status_says_so() {
    if !patching() {
        assert_eq!(default_call(&KEYS[2], 3), t2(3));
        assert_eq!(indirect_call(&KEYS[2], 3), t2(3));
        assert!(!static_call::status().guards);
        return;
    }
    // Looked for before the first call: a patched site no longer calls the run-time entry.
    let sites = run_time_sites_in(default_call as *const () as usize, 4096);
    assert_eq!(default_call(&KEYS[2], 3), t2(3));
    assert_eq!(indirect_call(&KEYS[2], 3), t2(3));
    let guards = static_call::status().guards;
    assert_eq!(
        guards,
        static_call::__private::RETPOLINE || option_env!("STATIC_CALL_GUARDS") == Some("on"),
        "on by default in retpoline builds"
    );
    assert_eq!(sites.len(), usize::from(guards), "key.call in this build");
    assert!(run_time_sites_in(indirect_call as *const () as usize, 4096).is_empty());
}

// --- the static proof never accepts a run-time site ---------------------------------------------

#[inline(never)]
fn named_site_bytes(x: u64) -> u64 {
    NAMED.call_guarded(x) + 1
}

/// A run-time site for a named key, in an optimised build, has `lea r11, [rip + NAMED]` right in
/// front of it: byte for byte a call site of `NAMED`, but for the entry it calls. The static
/// proof rejects it, and would accept the same bytes calling the static entry: the entry is all
/// that tells them apart (the merged-`lea` trap is the same shape, see tests/merged_lea.rs).
#[test]
fn the_static_proof_never_accepts_a_run_time_site() {
    if !patching() {
        assert_eq!(named_site_bytes(1), t6(1) + 1);
        return;
    }
    let site = only_run_time_site(named_site_bytes as *const () as usize);
    let pro = static_call::__private::SITE_PROLOGUE;
    let start = site - pro;
    let mut code = common::read(start, pro + 5);
    assert_eq!(named_site_bytes(1), t6(1) + 1);
    static_call::flush();
    assert!(
        NAMED.sites().is_empty(),
        "never registered as a site of NAMED"
    );
    let (tramp, entry) = (common::trampoline() as u64, common::run_time_entry() as u64);
    code[pro..].copy_from_slice(&call_bytes(site, entry));
    assert!(static_call::__private::prove_site(&code, start as u64, tramp).is_err());
    assert_eq!(
        static_call::__private::prove_run_time_site(&code[pro..], site as u64, entry),
        Ok(())
    );
    code[pro..].copy_from_slice(&call_bytes(site, tramp));
    match static_call::__private::prove_site(&code, start as u64, tramp) {
        Ok(key) => {
            assert_eq!(key as usize, NAMED.as_ptr() as usize);
            println!("the bytes before the site are `lea r11, [rip + NAMED]`: the trap's shape");
        }
        Err(e) => println!("note: this build computes r11 some other way ({e:?})"),
    }
}

/// `call dest` encoded at `site`.
fn call_bytes(site: usize, dest: u64) -> [u8; 5] {
    let rel = (dest as i64 - (site as i64 + 5)) as i32;
    let r = rel.to_le_bytes();
    [0xe8, r[0], r[1], r[2], r[3]]
}

// --- everything else still holds: each in a child process of its own ---------------------------

use common::scenario;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

sites!(forked signalled mdwe_site mdwe_later unpatched_a unpatched_b);

/// Drives the site `f` with `KEYS[..n]` in rotation, enough for it to settle with them (each
/// round adds at least one target, until the most a stub holds), and returns its address (found
/// before its first call).
fn settle_with(f: fn(&Key, u64) -> u64, n: usize) -> usize {
    let site = only_run_time_site(f as *const () as usize);
    for round in 0..static_call::__private::MAX_ENTRIES + 3 {
        for i in 0..4 * static_call::__private::MISSES_TO_REQUEUE as usize {
            let k = i % n;
            let x = (round * 1000 + i) as u64;
            assert_eq!(f(&KEYS[k], x), TARGETS[k](x));
        }
        static_call::flush();
    }
    site
}

scenario! {
    /// fork() with a run-time site patched to a stub: the child's calls through it are right,
    /// its misses go through a new worker (the child's), which re-patches the site in the
    /// child only; the parent's site is as it was.
    fn run_time_sites_survive_fork() {
        let site = settle_with(forked, 1);
        let before = run_time_state(site).0;
        assert!(matches!(before, SiteState::Monomorphic { .. }), "{before:?}");
        // SAFETY: the child only runs the closure below, then exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let verdict = std::panic::catch_unwind(|| {
                for x in 0..64 {
                    assert_eq!(forked(&KEYS[(x % 2) as usize], x), TARGETS[(x % 2) as usize](x));
                }
                static_call::flush();
                assert_eq!(run_time_state(site).0, SiteState::Polymorphic { targets: 2 });
                assert_eq!(static_call::status().worker, static_call::WorkerStatus::Running);
            });
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(if verdict.is_ok() { 0 } else { 1 }) }
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child: {status:#x}");
        assert_eq!(run_time_state(site).0, before, "the parent's site is its own");
        assert_eq!(forked(&KEYS[0], 3), t0(3));
    }
}

static HANDLED: AtomicU64 = AtomicU64::new(0);
static HANDLER_WRONG: AtomicU64 = AtomicU64::new(0);
/// The key the handler calls through: updated by the main thread meanwhile.
static HOOK: Key = StaticCall::new(u0);

/// A signal handler whose run-time calls include the first call of its site, and then misses
/// of that site's stub (the key keeps changing): the slow path, in a handler, while the
/// interrupted thread may hold the patch lock in `update`.
extern "C" fn on_timer(_: libc::c_int) {
    let n = HANDLED.fetch_add(1, Ordering::Relaxed);
    let r = signalled(&HOOK, n);
    let k = reached(r);
    if r >> 5 != n || !(k == 16 || k == 17) {
        HANDLER_WRONG.fetch_add(1, Ordering::Relaxed);
    }
}

scenario! {
    /// A high-rate timer signal whose handler makes run-time calls (a first call, then stub
    /// hits and misses), interrupting a thread that keeps updating the key and taking the patch
    /// lock: no deadlock, every call right.
    fn run_time_calls_in_signal_handlers_never_deadlock() {
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
            let period = libc::timespec { tv_sec: 0, tv_nsec: 20_000 };
            let spec = libc::itimerspec { it_interval: period, it_value: period };
            assert_eq!(libc::timer_settime(timer, 0, &spec, core::ptr::null_mut()), 0);
            let deadline = Instant::now() + Duration::from_millis(1500);
            let mut i = 0u64;
            while Instant::now() < deadline {
                HOOK.update(if i.is_multiple_of(2) { u0 } else { u1 });
                i += 1;
            }
            assert_eq!(libc::timer_delete(timer), 0);
        }
        let handled = HANDLED.load(Ordering::Relaxed);
        println!("{handled} signals handled");
        assert!(handled > 100, "the timer fired: {handled}");
        assert_eq!(HANDLER_WRONG.load(Ordering::Relaxed), 0);
        static_call::flush();
        let site = static_call::run_time_sites();
        assert_eq!(site.len(), 1, "the handler's site was registered: {site:?}");
    }
}

const PR_SET_MDWE: i32 = 65;
const PR_MDWE_REFUSE_EXEC_GAIN: u64 = 1;

/// Forbids gaining execute permission for the rest of the process. False if the kernel does not
/// know MDWE.
fn set_mdwe() -> bool {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0u64, 0u64, 0u64) };
    if r != 0 {
        println!("note: this kernel has no MDWE; the scenario checks nothing more");
    }
    r == 0
}

scenario! {
    /// W^X before the first run-time call: the site stays on its entry, says why, every call is
    /// right, and no miss makes the library try to write again.
    fn mdwe_before_the_first_run_time_call() {
        if !patching() || !set_mdwe() {
            return;
        }
        let site = only_run_time_site(mdwe_site as *const () as usize);
        for x in 0..1000 {
            let k = (x % 3) as usize;
            assert_eq!(mdwe_site(&KEYS[k], x), TARGETS[k](x));
        }
        static_call::flush();
        let refused = static_call::Disabled::WriteRefused { errno: libc::EACCES };
        assert_eq!(run_time_state(site).0, SiteState::Trampoline(Reason::Disabled(refused)));
        let attempts = static_call::stats().mprotects;
        for x in 0..10_000 {
            let k = (x % 3) as usize;
            assert_eq!(mdwe_site(&KEYS[k], x), TARGETS[k](x));
        }
        static_call::flush();
        assert_eq!(static_call::stats().mprotects, attempts, "no retries");
        assert_eq!(common::rwx_mappings(), Vec::<String>::new());
    }
}

scenario! {
    /// W^X after a run-time site was patched to a stub: `update` of its key still succeeds (no
    /// run-time site has to be rewritten), and calls reach the new target, through the stub's
    /// miss path; the site can no longer change, and nothing keeps trying.
    fn mdwe_after_patching_leaves_run_time_sites_correct_and_updates_working() {
        let key: Box<Key> = Box::new(StaticCall::new(u2));
        let site = patching().then(|| only_run_time_site(mdwe_later as *const () as usize));
        for x in 0..32 {
            assert_eq!(mdwe_later(&key, x), u2(x));
        }
        static_call::flush();
        if !set_mdwe() {
            return;
        }
        key.try_update(u3).expect("no run-time site is required: update writes no code");
        for x in 0..10_000 {
            assert_eq!(mdwe_later(&key, x), u3(x), "the stub misses; the slow path is right");
        }
        static_call::flush();
        let attempts = static_call::stats().mprotects;
        for x in 0..10_000 {
            assert_eq!(mdwe_later(&key, x), u3(x));
        }
        static_call::flush();
        assert!(static_call::stats().mprotects <= attempts + 2, "no retry storm");
        if let Some(site) = site {
            let (state, _) = run_time_state(site);
            assert!(matches!(state, SiteState::Monomorphic { .. }), "{state:?}");
            assert!(static_call::status().patching.is_err());
        }
        assert_eq!(common::rwx_mappings(), Vec::<String>::new());
    }
}

unsafe extern "C" {
    fn labs(x: i64) -> i64;
}

type FarKey = StaticCall<unsafe extern "C" fn(i64) -> i64>;

#[inline(never)]
fn far_run_time(k: &FarKey, x: i64) -> i64 {
    // SAFETY: labs and neg take any i64.
    unsafe { k.call_guarded(x) }
}

extern "C" fn neg(x: i64) -> i64 {
    -x
}

scenario! {
    /// A key holding a target beyond ±2 GiB of the code (libc's `labs`): the stub's entry jumps
    /// to the target's near thunk, never with a truncated rel32; a near target in the same
    /// chain is jumped to directly.
    fn a_far_target_is_reached_through_its_thunk() {
        let far = labs as *const () as usize;
        if far.abs_diff(far_run_time as *const () as usize) < (2usize << 30) {
            println!("note: libc is within 2 GiB of the program here; nothing to check");
            return;
        }
        let site = only_run_time_site(far_run_time as *const () as usize);
        let a: FarKey = StaticCall::new(labs);
        let b: FarKey = StaticCall::new(neg as unsafe extern "C" fn(i64) -> i64);
        // The far key first, alone, so that the first stub is for it.
        assert_eq!(far_run_time(&a, -1), 1);
        static_call::flush();
        for x in 0..64i64 {
            assert_eq!(far_run_time(&a, -x), x);
            assert_eq!(far_run_time(&b, x), -x);
        }
        static_call::flush();
        let (state, form) = run_time_state(site);
        assert_eq!(state, SiteState::Polymorphic { targets: 2 });
        let RunTimeForm::Stub(stub) = form else { panic!("{form:?}") };
        let (target, dest) = stub.entries[0];
        assert_eq!(target, a.query() as usize);
        assert_ne!(dest, target, "a far target goes through a thunk");
        assert_eq!(common::thunk_target(dest), Some(target));
        assert_eq!(stub.entries[1].0, stub.entries[1].1, "a near target is jumped to directly");
        assert!(static_call::status().thunks >= 1);
    }
}

scenario! {
    /// `unpatch_all` returns every run-time site to its entry (whatever its form), says why,
    /// and calls stay right; no miss brings a site back to a stub afterwards.
    fn unpatch_all_returns_run_time_sites_to_their_entry() {
        if !patching() {
            return;
        }
        let mono = settle_with(unpatched_a, 1);
        let many = settle_with(unpatched_b, 16);
        assert_eq!(run_time_form(many), RunTimeForm::Megamorphic);
        static_call::unpatch_all().expect("code is writable here");
        for _ in 0..2 {
            for site in [mono, many] {
                assert_eq!(
                    run_time_state(site),
                    (SiteState::Trampoline(Reason::Disabled(static_call::Disabled::Unpatched)),
                     RunTimeForm::Home)
                );
            }
            for x in 0..100 {
                let k = (x % 16) as usize;
                assert_eq!(unpatched_a(&KEYS[0], x), t0(x));
                assert_eq!(unpatched_b(&KEYS[k], x), TARGETS[k](x));
            }
            static_call::flush();
        }
    }
}
