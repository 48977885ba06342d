//! Run-time sites and their guard stubs: `key.call(args)` for a key known only at run time (a
//! `&StaticCall` in a variable, in a heap object, replaced in place), made near-direct without
//! ever binding a site to a key.
//!
//! # The site
//!
//! A run-time site is one inline-asm block: the compiler puts the key's address in r11 (computed
//! *outside* the block, so LLVM may merge two keys' `lea r11` in front of it), NOP padding, and
//! `call <run-time entry>`, a trampoline entry of its own (`asm/trampoline_x86_64.S`). The entry
//! is what makes it a run-time site: the static proof (`arch::prove_site`) requires the static
//! entry, so a run-time site is never patched into a direct call, even when its bytes look
//! exactly like a call site of one key.
//!
//! # Guard stubs
//!
//! The patcher rewrites a run-time site into `call <stub>`, where the stub compares the *current
//! contents* of the key in r11 with the targets it was made for and jumps to the one it holds
//! (`arch::guard_stub`):
//!
//! ```text
//! stub:  mov r10, T1;  cmp qword ptr [r11], r10;  je T1      (or T1's near thunk)
//!        mov r10, T2;  cmp qword ptr [r11], r10;  je T2      (a polymorphic chain)
//!        jmp <run-time entry>                                 (a miss: the slow path)
//! ```
//!
//! It jumps to `T` only if the key holds `T` at that moment, so it is correct for any key: a
//! static, one on the heap, one replaced in place, a freed key whose address was reused. (A guard
//! on the key's *address* would not be.) On a miss, the run-time entry jumps to the key's current
//! target, notes it in the site's registry slot (`seen`) and, after `MISSES_TO_REQUEUE` misses,
//! hands the site back to the patcher, which gives it a new stub.
//!
//! # States of a run-time site, and why each transition is sound
//!
//! Every form a run-time site takes reads the key's contents on every call, so every form is
//! correct whatever any key holds, at every moment, and so is every transition between two of
//! them (one locked compare-exchange of the site's quadword: a thread sees the old or the new
//! instruction, both correct). That is why a run-time site is never *required* (`kinds.rs`), is in
//! no key's list, and why `update` never touches one: after an update, its stub misses (the key
//! no longer holds the old target), the miss path jumps to the new target, and the site is
//! re-patched later.
//!
//! | form (its five bytes) | what a call does | next, on enough misses | `SiteState` |
//! |---|---|---|---|
//! | home: `call <run-time entry>` | the slow path: jumps to the key's target | a stub for the target seen | `Trampoline(why)` |
//! | `call <stub T1..Tn>`, n = 1 | `je Ti` if the key holds Ti, else the slow path | a stub for T1..Tn and the target seen, or megamorphic | `Monomorphic { target }` |
//! | `call <stub T1..Tn>`, 1 < n ≤ `MAX_ENTRIES` | same | same | `Polymorphic { targets: n }` |
//! | megamorphic: `call qword ptr [r11]` (normal build), `call <megamorphic stub>` (retpoline) | an indirect call through the key | — (final) | `Megamorphic(why)` |
//!
//! A target is dropped from a stub's set when some key was updated away from it after the site's
//! last change (`Stubs::retire`): after `KEY.update(g)` a site is re-patched to `g`'s stub, not a
//! chain of `f` and `g`. A site changes form at most `MAX_CHANGES` times in a row, earning one
//! change back per `REFILL_MS`; beyond that it goes megamorphic (`Reason::TooManyChanges`).
//!
//! What makes writing a stub sound is the thunks' rule (`thunks.rs`, `code_pool.rs`): a stub is
//! written once, into code no one has ever jumped to, the cores are synced before any site is
//! rewritten to call it (two batches: stubs, then sites), and it never changes after. A site
//! still running an old stub (it was preempted there) is still correct: that stub, too, compares
//! the key's contents.
//!
//! Memory ordering: `update` stores the key's target with `Release` (`RawKey::set_target`); a
//! stub's `cmp` is a plain load, which x86-TSO orders after every load and store that came before
//! it in program order. So a call that starts after `update` returned (as the caller knows it,
//! through any synchronisation) reads the new target: the stub misses, or matches the new target.

#[cfg(static_call_patching)]
pub(crate) use patching::*;

/// Whether `key.call(args)` is a guarded run-time site in this build (`build.rs`:
/// `cfg(static_call_guards)`), rather than a plain indirect call.
#[cfg_attr(not(static_call_patching), allow(dead_code))] // (`status()` says false there)
pub(crate) const GUARDS: bool = cfg!(static_call_guards);

/// `key.call`'s body when the build makes it a guarded site (`cfg(static_call_guards)`), else a
/// plain indirect call: `default_call!(self, R; a, b)` on a `&StaticCall<F>`.
macro_rules! default_call {
    ($key:expr, $ret:ty; $($a:ident),*) => {{
        #[cfg(static_call_guards)]
        let r = $crate::guard::guarded_call!($key, $ret; $($a),*);
        #[cfg(not(static_call_guards))]
        let r = ($key.query())($($a),*);
        r
    }};
}
pub(crate) use default_call;

/// A guarded run-time site calling the key `$key` (a `&StaticCall<F>`) with the arguments, where
/// patching is compiled in; elsewhere (the portable fallback) a plain indirect call.
macro_rules! guarded_call {
    ($key:expr, $ret:ty; $($a:ident),*) => {{
        #[cfg(static_call_patching)]
        let r = {
            #[allow(unused_mut)]
            let mut regs = $crate::site::Regs::UNINIT;
            #[allow(unused_mut, unused_variables)]
            let mut cursor = $crate::site::Cursor::default();
            $( $crate::site::Arg::__place($a, &mut regs, &mut cursor); )*
            // SAFETY: the arguments were placed by their `Arg` impls, which follow System V, and
            // the key's type is the type of every target it holds; the reference keeps the key
            // alive for the whole call.
            let ret = unsafe { $crate::guard::invoke($key.__raw(), regs) };
            // SAFETY: `ret` comes from a call to a function whose result type is `$ret`.
            unsafe { <$ret as $crate::site::RetVal>::__from_ret(ret) }
        };
        #[cfg(not(static_call_patching))]
        let r = ($key.query())($($a),*);
        r
    }};
}
// Used by `default_call!` only in builds where `key.call` is guarded.
#[allow(unused_imports)]
pub(crate) use guarded_call;

/// The explicit forms of `key.call`, both ways: `call_guarded` and `call_indirect`.
macro_rules! impl_run_time_calls {
    ($($A:ident $a:ident)*) => {
        impl<R: RetVal, $($A: Arg),*> StaticCall<extern "C" fn($($A),*) -> R, CAbi> {
            /// Calls the key's current target through a guarded run-time site, whatever this
            /// build's default for [`call`](Self::call) is: the first call goes through the
            /// trampoline, then the site calls a guard stub that checks what the key holds and
            /// jumps straight to it (see [`run_time_sites`](crate::run_time_sites)). In the
            /// portable fallback, a plain indirect call.
            ///
            /// ```
            /// use static_call::StaticCall;
            /// extern "C" fn neg(x: i32) -> i32 { -x }
            /// extern "C" fn double(x: i32) -> i32 { 2 * x }
            /// let keys = [StaticCall::new(neg as extern "C" fn(i32) -> i32), StaticCall::new(double)];
            /// let results: Vec<i32> = keys.iter().map(|key| key.call_guarded(-3)).collect();
            /// assert_eq!(results, [3, -6]);
            /// static_call::flush(); // the site now calls a guard stub for `neg` (or both)
            /// ```
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            pub fn call_guarded(&self, $($a: $A),*) -> R {
                guarded_call!(self, R; $($a),*)
            }

            /// Calls the key's current target with a plain indirect call (an atomic load and
            /// `call`), whatever this build's default for [`call`](Self::call) is.
            ///
            /// ```
            /// use static_call::StaticCall;
            /// extern "C" fn twice(x: u8) -> u8 { 2 * x }
            /// let key = Box::new(StaticCall::new(twice as extern "C" fn(u8) -> u8));
            /// assert_eq!(key.call_indirect(4), 8);
            /// ```
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            pub fn call_indirect(&self, $($a: $A),*) -> R {
                (self.query())($($a),*)
            }
        }

        impl<R: RetVal, $($A: Arg),*> StaticCall<unsafe extern "C" fn($($A),*) -> R, CAbi> {
            /// Calls the key's current target through a guarded run-time site; see the safe
            /// form's `call_guarded`.
            ///
            /// # Safety
            /// Whatever the key's function type requires of its callers.
            ///
            /// ```
            /// use static_call::StaticCall;
            /// unsafe extern "C" fn read(p: *const u8) -> u8 { unsafe { *p } }
            /// let key = StaticCall::new(read as unsafe extern "C" fn(*const u8) -> u8);
            /// // SAFETY: a readable byte.
            /// assert_eq!(unsafe { key.call_guarded(&7) }, 7);
            /// ```
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn call_guarded(&self, $($a: $A),*) -> R {
                // (Unused where the call is a guarded site, which has its own.)
                #[allow(unused_unsafe)]
                // SAFETY: the caller upholds the target's contract.
                let r = unsafe { guarded_call!(self, R; $($a),*) };
                r
            }

            /// Calls the key's current target with a plain indirect call.
            ///
            /// # Safety
            /// Whatever the key's function type requires of its callers.
            ///
            /// ```
            /// use static_call::StaticCall;
            /// unsafe extern "C" fn read(p: *const u8) -> u8 { unsafe { *p } }
            /// let key = StaticCall::new(read as unsafe extern "C" fn(*const u8) -> u8);
            /// // SAFETY: a readable byte.
            /// assert_eq!(unsafe { key.call_indirect(&7) }, 7);
            /// ```
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn call_indirect(&self, $($a: $A),*) -> R {
                // SAFETY: the caller upholds the target's contract.
                unsafe { (self.query())($($a),*) }
            }
        }
    };
}

use crate::key::{CAbi, StaticCall};
use crate::site::{Arg, RetVal};

impl_run_time_calls!();
impl_run_time_calls!(A0 a0);
impl_run_time_calls!(A0 a0 A1 a1);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2 A3 a3);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10);
impl_run_time_calls!(A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11);
impl_run_time_calls!(
    A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11 A12 a12
);
impl_run_time_calls!(
    A0 a0 A1 a1 A2 a2 A3 a3 A4 a4 A5 a5 A6 a6 A7 a7 A8 a8 A9 a9 A10 a10 A11 a11 A12 a12 A13 a13
);

/// Everything that exists only where code is patched.
#[cfg(static_call_patching)]
pub mod patching {
    use core::sync::atomic::{AtomicUsize, Ordering};
    use std::collections::BTreeMap;
    use std::sync::{Mutex, MutexGuard};

    use crate::arch::x86_64::{self as arch, Insn, SiteInsn};
    use crate::code_pool::{self, Pool, RETPOLINE};
    use crate::diagnostics::{Reason, SiteState};
    use crate::key::RawKey;
    use crate::kinds::{self, Kind};
    use crate::os::linux::{self, Write};
    use crate::patcher::Locked;
    use crate::registry::Slot;
    use crate::runtime::{self, Runtime};
    use crate::site::{Regs, Ret};
    use crate::thunks::{self, CodeOs, Thunks};

    /// Most targets in one guard stub: a chain of compares costs one more compare per entry, and
    /// an indirect call costs a normal build little (docs/benchmarks.md, "Run-time keys"), a
    /// retpoline build a lot.
    pub const MAX_ENTRIES: usize = if RETPOLINE { 8 } else { 2 };
    /// Misses of a site's stub (calls reaching the slow path) after which the site goes back to
    /// the patcher. Each change of form costs two core syncs, which interrupt every thread of the
    /// process: a few rare misses are cheaper than that.
    pub const MISSES_TO_REQUEUE: u64 = 8;
    /// Changes of form a site may make in a row before it goes megamorphic: enough to grow the
    /// longest chain one target at a time, and as many again.
    pub const MAX_CHANGES: u32 = 2 * MAX_ENTRIES as u32 + 4;
    /// A site earns back one change per this many milliseconds.
    pub(crate) const REFILL_MS: u64 = 1000;

    // ---- the site ---------------------------------------------------------------------------

    /// The run-time site: `call <run-time entry>` with the key's address in r11, placed so that
    /// the five bytes of the call lie in one aligned quadword. Every inlined copy of this block
    /// is a site of its own.
    ///
    /// # Safety
    /// `key` must be a live key of the signature that `regs` holds the arguments of, under
    /// System V, for the whole call.
    #[inline(always)]
    pub(crate) unsafe fn invoke(key: &RawKey, regs: Regs) -> Ret {
        let rax;
        let rdx;
        let xmm0;
        // SAFETY: the block calls the run-time entry with r11 = the key, which preserves every
        // argument register and tail-calls the key's current target; once patched it calls a
        // guard stub, which jumps to that target only if the key holds it (else to the entry),
        // or `call [r11]`, the target itself. Either way the callee is an `extern "C"` function
        // of the key's signature, and `clobber_abi("C")` declares everything it may clobber (r10
        // and r11 included). Not `nostack`, and r15 clobbered, as for call sites (`site.rs`):
        // the stack is aligned for a call.
        unsafe {
            core::arch::asm!(
                "/* static_call run-time site */",
                ".p2align 3,,4",
                "call {entry}",
                entry = sym crate::trampoline::run_time_trampoline,
                in("r11") key as *const RawKey,
                in("rdi") regs.gp[0], in("rsi") regs.gp[1], in("rdx") regs.gp[2],
                in("rcx") regs.gp[3], in("r8") regs.gp[4], in("r9") regs.gp[5],
                in("xmm0") regs.xmm[0], in("xmm1") regs.xmm[1], in("xmm2") regs.xmm[2],
                in("xmm3") regs.xmm[3], in("xmm4") regs.xmm[4], in("xmm5") regs.xmm[5],
                in("xmm6") regs.xmm[6], in("xmm7") regs.xmm[7],
                lateout("rax") rax, lateout("rdx") rdx, lateout("xmm0") xmm0,
                lateout("r15") _,
                clobber_abi("C"),
            );
        }
        Ret { rax, rdx, xmm0 }
    }

    // ---- the slow path's notes (lock-free, async-signal-safe) -------------------------------

    /// `Slot::seen`: the target the key held at the site's latest visit to the slow path in the
    /// low 48 bits (user-space addresses fit), and in the top 16 the visits since the patcher
    /// last looked, or `FROZEN` when the patcher wants none counted (a megamorphic site, or one
    /// that cannot change).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct Seen(u64);

    const TARGET_MASK: u64 = (1 << 48) - 1;
    const FROZEN: u64 = 0xffff;

    impl Seen {
        fn new(target: usize, misses: u64) -> Seen {
            Seen((target as u64 & TARGET_MASK) | misses.min(FROZEN) << 48)
        }

        pub fn target(self) -> usize {
            (self.0 & TARGET_MASK) as usize
        }

        pub fn misses(self) -> u64 {
            self.0 >> 48
        }

        fn frozen(self) -> bool {
            self.misses() == FROZEN
        }

        fn load(slot: &Slot) -> Seen {
            Seen(slot.seen.load(Ordering::Relaxed))
        }
    }

    /// The first call of a new run-time site (its claimer, before publishing the slot): the
    /// target its key holds now, what its first stub will be for.
    pub(crate) fn note_first_call(slot: &Slot, key: &RawKey) {
        let misses = if runtime::mode().is_ok() { 0 } else { FROZEN };
        // Relaxed: published by the claimer's Release store of `state`.
        slot.seen
            .store(Seen::new(key.func() as usize, misses).0, Ordering::Relaxed);
    }

    /// A later call of a registered run-time site that reached the slow path: a miss of its stub
    /// (or a call while it waits at home). Records the target the key holds and counts the miss;
    /// returns whether the site should go back to the patcher. One load and one
    /// compare-exchange, which may fail when another thread notes a miss at the same moment (a
    /// miss uncounted: a heuristic, never a correctness matter).
    pub(crate) fn note_miss(slot: &Slot, key: &RawKey) -> bool {
        if slot.kind.load(Ordering::Relaxed) != Kind::RunTime as u32 {
            return false;
        }
        let old = Seen::load(slot);
        if old.frozen() {
            return false;
        }
        let new = Seen::new(key.func() as usize, old.misses() + 1);
        // Relaxed: published to the patcher by the Release compare-exchange of `state` that
        // follows, if any; a later miss publishes a later one.
        slot.seen
            .compare_exchange(old.0, new.0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && new.misses() >= MISSES_TO_REQUEUE
            && runtime::mode().is_ok()
    }

    // ---- the stub table ---------------------------------------------------------------------

    /// The guard stubs made so far, and the targets that keys were updated away from.
    pub(crate) struct Stubs {
        /// Stub address by its targets, in the order they are compared.
        by_targets: BTreeMap<Vec<usize>, usize>,
        /// Targets by stub address.
        by_addr: BTreeMap<usize, Vec<usize>>,
        /// The generation at which some key was last updated away from a target.
        retired: BTreeMap<usize, u32>,
        /// Bumped by every `retire`.
        generation: u32,
    }

    /// Taken only under the patch lock (`lock` asks for the proof), like the thunks.
    static STUBS: Mutex<Stubs> = Mutex::new(Stubs {
        by_targets: BTreeMap::new(),
        by_addr: BTreeMap::new(),
        retired: BTreeMap::new(),
        generation: 0,
    });

    /// A copy of how many stubs exist, for `status()`. Relaxed: one number.
    static MADE: AtomicUsize = AtomicUsize::new(0);

    /// The stub table, for the holder of the patch lock.
    pub(crate) fn lock(_: &Locked) -> MutexGuard<'static, Stubs> {
        // Nothing panics while holding it; should something, the table is still consistent (a
        // stub is recorded only once written).
        STUBS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many guard stubs exist, for `status()`.
    pub(crate) fn made() -> usize {
        MADE.load(Ordering::Relaxed)
    }

    impl Stubs {
        /// The stub for exactly these targets, in this order.
        pub fn get(&self, targets: &[usize]) -> Option<usize> {
            self.by_targets.get(targets).copied()
        }

        /// The targets of the stub at `stub`, if it is one.
        pub fn targets(&self, stub: usize) -> Option<&[usize]> {
            self.by_addr.get(&stub).map(Vec::as_slice)
        }

        /// Notes that keys were updated away from `targets` (`patcher::update`): a site whose
        /// stub was made before holds them only for keys that may no longer exist, and drops
        /// them at its next change (see `next`).
        pub fn retire(&mut self, targets: impl IntoIterator<Item = usize>) {
            self.generation = self.generation.wrapping_add(1);
            for t in targets {
                self.retired.insert(t, self.generation);
            }
        }

        /// Whether `target` was retired after `generation`.
        fn retired_since(&self, target: usize, generation: u32) -> bool {
            self.retired
                .get(&target)
                .is_some_and(|&r| (r.wrapping_sub(generation) as i32) > 0)
        }

        /// Makes a stub for each of `sets` that has none, in the code pool: one batch of writes,
        /// synced, before any site is rewritten to call them. A far target is reached through
        /// its thunk (made before, by `Thunks::make_for`); a set with a far target that has no
        /// thunk, or for which the pool has no room, gets no stub (its sites go megamorphic).
        pub fn make_for(
            &mut self,
            rt: &Runtime,
            pool: &mut Pool,
            thunks: &Thunks,
            sets: impl IntoIterator<Item = Vec<usize>>,
        ) {
            let mut os = thunks::Linux { rt, pool };
            let _ = self.make(sets, rt.run_time_trampoline, |t| thunks.get(t), &mut os);
            MADE.store(self.by_addr.len(), Ordering::Relaxed);
        }

        /// `make_for`'s work, with the OS passed in.
        fn make(
            &mut self,
            sets: impl IntoIterator<Item = Vec<usize>>,
            miss: usize,
            thunk: impl Fn(usize) -> Option<usize>,
            os: &mut impl CodeOs,
        ) -> Result<(), i32> {
            let mut wanted: Vec<Vec<usize>> = sets
                .into_iter()
                .filter(|s| !s.is_empty() && self.get(s).is_none())
                .collect();
            wanted.sort_unstable();
            wanted.dedup();
            let mut made: Vec<(Vec<usize>, usize, Vec<u8>)> = Vec::new();
            for set in wanted {
                let len = arch::guard_stub_len(set.len());
                // Taken whatever happens next: a slot whose write failed is spoiled.
                let at = os.take(len)?;
                let dest = |t: usize| {
                    if arch::reaches(at, at + len, t, 1) {
                        Some(t)
                    } else {
                        thunk(t)
                    }
                };
                let entries: Option<Vec<(usize, usize)>> =
                    set.iter().map(|&t| Some((t, dest(t)?))).collect();
                if let Some(code) = entries.and_then(|e| arch::guard_stub(at, &e, miss)) {
                    made.push((set, at, code));
                }
            }
            if made.is_empty() {
                return Ok(());
            }
            let mut writes: Vec<Write> = made
                .iter()
                .flat_map(|(_, at, code)| thunks::writes_for(*at, code))
                .collect();
            os.write(&mut writes)?;
            writes.sort_unstable_by_key(|w| w.addr);
            for (set, at, code) in made {
                if thunks::all_done(&writes, at, code.len()) {
                    self.by_addr.insert(at, set.clone());
                    self.by_targets.insert(set, at);
                }
            }
            Ok(())
        }
    }

    // ---- the policy -------------------------------------------------------------------------

    /// The form of a run-time site, from its five bytes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Form {
        /// `call <run-time entry>`.
        Home,
        /// `call <stub>`.
        Stub(usize),
        /// The indirect call through the key.
        Megamorphic,
    }

    /// What a run-time site should become next.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Next {
        /// Stay as it is (the miss was for a target the stub already has, or the site is
        /// megamorphic).
        Stay,
        /// Call the stub for these targets, in this order.
        Stub(Vec<usize>),
        /// The plain indirect path, for this reason.
        Megamorphic(Reason),
    }

    /// The policy, as a pure function of what the patcher knows about a site: its form, the
    /// targets of its stub (`targets`, empty at home), the target its last miss saw, which
    /// targets to drop (retired since its last change), whether it may change again, and how
    /// many entries a stub may have. Every answer is sound (see the module's table): this only
    /// decides what is fast.
    pub(crate) fn next(
        form: Form,
        targets: &[usize],
        seen: usize,
        dropped: impl Fn(usize) -> bool,
        may_change: bool,
        max_entries: usize,
    ) -> Next {
        if form == Form::Megamorphic {
            return Next::Stay;
        }
        let mut wanted: Vec<usize> = targets.iter().copied().filter(|&t| !dropped(t)).collect();
        if !wanted.contains(&seen) {
            wanted.push(seen);
        }
        if form != Form::Home && wanted == targets {
            return Next::Stay;
        }
        if !may_change {
            Next::Megamorphic(Reason::TooManyChanges)
        } else if wanted.len() > max_entries {
            Next::Megamorphic(Reason::TooManyTargets)
        } else {
            Next::Stub(wanted)
        }
    }

    /// What the patcher keeps about a run-time site (`Slot::aux`): the changes it made lately,
    /// the stub generation of its last change, and when that was.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Book {
        spent: u32,
        generation: u32,
        at_ms: u64,
    }

    impl Book {
        fn of(aux: [u64; 2]) -> Book {
            Book {
                spent: aux[0] as u32,
                generation: (aux[0] >> 32) as u32,
                at_ms: aux[1],
            }
        }

        fn aux(self) -> [u64; 2] {
            [
                self.spent as u64 | (self.generation as u64) << 32,
                self.at_ms,
            ]
        }

        /// The changes still spent at `now_ms`: one comes back per `REFILL_MS`.
        fn spent_at(self, now_ms: u64) -> u32 {
            let back = now_ms.saturating_sub(self.at_ms) / REFILL_MS;
            self.spent.saturating_sub(back.min(u32::MAX as u64) as u32)
        }
    }

    /// The five bytes of a megamorphic run-time site at `site`: `call [r11]`, or in a retpoline
    /// build (where no indirect branch may be written by hand) a call to the megamorphic stub.
    fn megamorphic_insn(site: usize) -> Insn {
        let what = if RETPOLINE {
            SiteInsn::Call(code_pool::megamorphic_stub())
        } else {
            SiteInsn::CallKey
        };
        arch::encode(site, what).expect("our own code within rel32 of our sites")
    }

    /// The form of the run-time site at `site` holding `insn`; `None` for bytes we never write
    /// there (someone else's).
    pub(crate) fn form(rt: &Runtime, site: usize, insn: Insn, stubs: &Stubs) -> Option<Form> {
        if insn == kinds::home(rt, Kind::RunTime, site, [0; 2]) {
            return Some(Form::Home);
        }
        if insn == megamorphic_insn(site) {
            return Some(Form::Megamorphic);
        }
        let dest = arch::call_destination(site, insn)?;
        stubs.targets(dest).map(|_| Form::Stub(dest))
    }

    /// What the run-time site in `slot`, holding `current` (ours), should become, at `now_ms`.
    pub(crate) fn decide(
        rt: &Runtime,
        slot: &Slot,
        current: Insn,
        stubs: &Stubs,
        now_ms: u64,
    ) -> Next {
        let site = slot.site.load(Ordering::Relaxed);
        let Some(form) = form(rt, site, current, stubs) else {
            return Next::Stay;
        };
        let targets = match form {
            Form::Stub(s) => stubs.targets(s).unwrap_or_default(),
            _ => &[],
        };
        let book = Book::of(aux(slot));
        next(
            form,
            targets,
            Seen::load(slot).target(),
            |t| stubs.retired_since(t, book.generation),
            book.spent_at(now_ms) < MAX_CHANGES,
            MAX_ENTRIES,
        )
    }

    fn aux(slot: &Slot) -> [u64; 2] {
        [
            slot.aux[0].load(Ordering::Relaxed),
            slot.aux[1].load(Ordering::Relaxed),
        ]
    }

    /// The stub a decision asks for, so that it can be made before the site is planned.
    pub(crate) fn wanted_stub(next: &Next) -> Option<Vec<usize>> {
        match next {
            Next::Stub(targets) => Some(targets.clone()),
            _ => None,
        }
    }

    /// What a run-time site's bytes should be, and why they are not a stub, if they are not.
    pub(crate) struct Plan {
        pub want: Insn,
        pub reason: Option<Reason>,
    }

    /// Plans the LIVE run-time site in `slot`, holding `current` (ours, with `reason`), for the
    /// decision `next` (`decide`, made before the stubs it may want were made): what it should
    /// hold, and its bookkeeping (`aux`, and `seen`'s miss count reset, or frozen where no miss
    /// should ever bring it back). Under the patch lock.
    pub(crate) fn plan(
        rt: &Runtime,
        slot: &Slot,
        current: Insn,
        reason: Option<Reason>,
        next: Next,
        stubs: &Stubs,
    ) -> Plan {
        let site = slot.site.load(Ordering::Relaxed);
        let (plan, frozen) = match next {
            Next::Stay => match form(rt, site, current, stubs) {
                // A stub's bytes are there: whatever kept it from changing is over.
                Some(Form::Stub(_)) => (
                    Plan {
                        want: current,
                        reason: None,
                    },
                    false,
                ),
                Some(Form::Megamorphic) => (
                    Plan {
                        want: current,
                        reason,
                    },
                    true,
                ),
                _ => (
                    Plan {
                        want: current,
                        reason,
                    },
                    false,
                ),
            },
            Next::Stub(targets) => match stubs.get(&targets) {
                Some(stub) => (
                    Plan {
                        want: arch::encode(site, SiteInsn::Call(stub))
                            .expect("the code pool within rel32 of our sites"),
                        reason: None,
                    },
                    false,
                ),
                // `prepare` tried to make it: the pool is used up, new code was refused, or a
                // far target has no thunk.
                None => (megamorphic(site, Reason::NoRoomForStub), true),
            },
            Next::Megamorphic(why) => (megamorphic(site, why), true),
        };
        if plan.want != current {
            let now_ms = now_ms();
            let mut book = Book::of(aux(slot));
            book.spent = book.spent_at(now_ms) + 1;
            book.generation = stubs.generation;
            book.at_ms = now_ms;
            for (kept, value) in slot.aux.iter().zip(book.aux()) {
                kept.store(value, Ordering::Relaxed);
            }
        }
        settle_misses(slot, frozen);
        plan
    }

    fn megamorphic(site: usize, why: Reason) -> Plan {
        Plan {
            want: megamorphic_insn(site),
            reason: Some(why),
        }
    }

    /// Starts counting the site's misses afresh, or stops counting them (`frozen`): a site that
    /// can never change, or is being left where it is for good, must not come back to the
    /// patcher on every few calls. Under the patch lock; a racing `note_miss` fails its
    /// compare-exchange and counts nothing.
    pub(crate) fn settle_misses(slot: &Slot, frozen: bool) {
        let target = Seen::load(slot).target();
        let misses = if frozen { FROZEN } else { 0 };
        slot.seen
            .store(Seen::new(target, misses).0, Ordering::Relaxed);
    }

    /// The state `sites()` reports for a LIVE run-time site holding `ours` (what we wrote, and
    /// found there), with `reason`.
    pub(crate) fn state(
        rt: &Runtime,
        site: usize,
        ours: Insn,
        reason: Option<Reason>,
        stubs: &Stubs,
    ) -> SiteState {
        match form(rt, site, ours, stubs) {
            Some(Form::Home) | None => SiteState::Trampoline(reason.unwrap_or(Reason::NotASite)),
            Some(Form::Stub(s)) => match stubs.targets(s).unwrap_or_default() {
                [target] => SiteState::Monomorphic { target: *target },
                targets => SiteState::Polymorphic {
                    targets: targets.len(),
                },
            },
            Some(Form::Megamorphic) => {
                SiteState::Megamorphic(reason.unwrap_or(Reason::TooManyTargets))
            }
        }
    }

    /// Milliseconds of the monotonic clock, for the change budget.
    pub(crate) fn now_ms() -> u64 {
        linux::monotonic_millis()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const T: [usize; 5] = [0x1000, 0x2000, 0x3000, 0x4000, 0x5000];

        fn never(_: usize) -> bool {
            false
        }

        #[test]
        fn home_gets_a_stub_for_the_target_seen() {
            assert_eq!(
                next(Form::Home, &[], T[0], never, true, 2),
                Next::Stub(vec![T[0]])
            );
        }

        #[test]
        fn a_stub_grows_into_a_chain_then_goes_megamorphic() {
            let s = Form::Stub(0x9000);
            assert_eq!(
                next(s, &T[..1], T[1], never, true, 2),
                Next::Stub(T[..2].to_vec())
            );
            assert_eq!(
                next(s, &T[..2], T[2], never, true, 2),
                Next::Megamorphic(Reason::TooManyTargets)
            );
            assert_eq!(
                next(s, &T[..2], T[2], never, true, 4),
                Next::Stub(T[..3].to_vec())
            );
            assert_eq!(
                next(Form::Megamorphic, &[], T[4], never, true, 4),
                Next::Stay
            );
        }

        #[test]
        fn a_miss_on_a_target_the_stub_has_changes_nothing() {
            assert_eq!(
                next(Form::Stub(1), &T[..2], T[0], never, true, 2),
                Next::Stay
            );
            assert_eq!(
                next(Form::Stub(1), &T[..2], T[1], never, false, 2),
                Next::Stay
            );
        }

        #[test]
        fn retired_targets_are_dropped_so_an_update_gives_the_new_targets_stub() {
            let retired = |t| t == T[0];
            assert_eq!(
                next(Form::Stub(1), &T[..1], T[1], retired, true, 2),
                Next::Stub(vec![T[1]])
            );
            // A 2-entry chain that lost one entry takes the new one in its place.
            assert_eq!(
                next(Form::Stub(1), &T[..2], T[2], retired, true, 2),
                Next::Stub(vec![T[1], T[2]])
            );
        }

        #[test]
        fn a_site_out_of_changes_goes_megamorphic() {
            assert_eq!(
                next(Form::Stub(1), &T[..1], T[1], never, false, 2),
                Next::Megamorphic(Reason::TooManyChanges)
            );
        }

        #[test]
        fn changes_come_back_over_time() {
            let b = Book {
                spent: 8,
                generation: 3,
                at_ms: 10_000,
            };
            assert_eq!(Book::of(b.aux()), b);
            assert_eq!(b.spent_at(10_500), 8);
            assert_eq!(b.spent_at(11_000), 7);
            assert_eq!(b.spent_at(100_000), 0);
        }

        #[test]
        fn seen_packs_a_target_and_a_count() {
            let s = Seen::new(0x7fff_1234_5678, 3);
            assert_eq!(
                (s.target(), s.misses(), s.frozen()),
                (0x7fff_1234_5678, 3, false)
            );
            assert!(Seen::new(1, FROZEN + 5).frozen());
        }

        /// Stubs written into a fake pool: one batch, one stub per set, far targets through
        /// their thunk, sets without room get none.
        #[test]
        fn stubs_are_made_once_per_set_and_far_targets_go_through_thunks() {
            struct Fake {
                base: usize,
                next: usize,
                end: usize,
                batches: usize,
                code: Vec<(usize, u64)>,
            }
            impl CodeOs for Fake {
                fn take(&mut self, len: usize) -> Result<usize, i32> {
                    if self.next + len > self.end {
                        return Err(0);
                    }
                    self.next += len;
                    Ok(self.next - len)
                }
                fn write(&mut self, writes: &mut [Write]) -> Result<(), i32> {
                    self.batches += 1;
                    for w in writes.iter_mut() {
                        assert!(w.addr >= self.base && w.addr < self.end);
                        self.code.push((w.addr, w.new));
                        w.done = true;
                    }
                    Ok(())
                }
                fn retpoline(&self) -> Option<usize> {
                    None
                }
            }
            let base = 0x5555_0000_0000;
            let mut os = Fake {
                base,
                next: base,
                end: base + 32 + 48,
                batches: 0,
                code: Vec::new(),
            };
            let (near, far, thunk) = (base + 0x10_0000, base + (3usize << 30), base - 0x1000);
            let mut s = Stubs {
                by_targets: BTreeMap::new(),
                by_addr: BTreeMap::new(),
                retired: BTreeMap::new(),
                generation: 0,
            };
            let miss = base - 0x2000;
            let sets = [vec![near], vec![near, far], vec![near]];
            s.make(sets.clone(), miss, |t| (t == far).then_some(thunk), &mut os)
                .unwrap();
            assert_eq!(os.batches, 1);
            assert_eq!(s.get(&[near]), Some(base));
            assert_eq!(s.get(&[near, far]), Some(base + 32));
            assert_eq!(s.targets(base + 32), Some(&[near, far][..]));
            let mut bytes = vec![0u8; 48];
            for &(addr, word) in &os.code {
                if (base + 32..base + 80).contains(&addr) {
                    let off = addr - base - 32;
                    bytes[off..off + 8].copy_from_slice(&word.to_ne_bytes());
                }
            }
            assert_eq!(
                bytes,
                arch::guard_stub(base + 32, &[(near, near), (far, thunk)], miss).unwrap()
            );
            // No room for a third set: it gets no stub, and the others are untouched.
            assert_eq!(s.make([vec![far]], miss, |_| Some(thunk), &mut os), Err(0));
            assert_eq!(s.get(&[far]), None);
            // A far target without a thunk gets no stub either.
            os.end += 32;
            s.make([vec![far]], miss, |_| None, &mut os).unwrap();
            assert_eq!(s.get(&[far]), None);
        }
    }
}
