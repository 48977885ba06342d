//! The patcher: decides what each registered site's five bytes should be and has the code writer
//! (`os/linux.rs`) put them there. Everything here runs under the patch lock, which serialises
//! the worker, `update`, `flush`, `unpatch_all` and `fork`.
//!
//! # A site's record
//!
//! Each registered site has a record ([`Info`], in its registry slot) that only the holder of
//! the patch lock changes:
//!
//! | record | meaning | in its key's list | bytes at the site |
//! |---|---|---|---|
//! | `UNSETTLED` | registered, not looked at yet | no | its *home*, as compiled |
//! | `BLOCKED(reason)` | its bytes did not prove its key, or patching was off | no | never written by us |
//! | `LIVE(ours, reason)` | proven; `ours` are the bytes we last wrote or verified there; `reason` says why they are home, if they are | yes | `ours`, or someone else's bytes over them (*foreign*) |
//!
//! A site's *home* is what its kind compiles to and keeps while unpatched: `call trampoline` for
//! a call site, `jmp <tail entry>` for a tail site, `jmp <stub>` for a branch site (`kinds.rs`
//! has every kind's). Foreign bytes are never recorded: every operation, and `sites()`, re-reads
//! the site. A LIVE site is *required* when `ours` is not home: it calls
//! a target directly (or is a NOP, or `xor eax, eax`), so it does not follow its key by itself
//! and must be rewritten when the key changes. A site at home reaches the trampoline, which is
//! correct whatever its key holds. A run-time site (`guard.rs`) is never required: each of its
//! forms (home, `call <guard stub>`, the indirect call) reads its key's contents on every call,
//! so it is in no key's list and no `update` needs it; its "key" in the table below is none.
//!
//! # Transitions
//!
//! Every change of a record follows one row of this table; the function named in the last
//! column makes it.
//!
//! | from | when | to | bytes written | where |
//! |---|---|---|---|---|
//! | UNSETTLED | patching is off | BLOCKED(Disabled) | — | `settle_one` |
//! | UNSETTLED | the bytes do not prove the key and the kind | BLOCKED(NotASite, KeyNotProven or ForeignBytes) | — | `settle_one` |
//! | UNSETTLED | proven | LIVE(home), linked to its key (a run-time site: to none); then planned as below | — | `settle_one` |
//! | LIVE(x), a run-time site, queued (its first call, or `MISSES_TO_REQUEUE` misses of its stub) | `guard::plan` | planned for `want` = x, a guard stub (made and synced first), or the megamorphic form (why) | — | `plan_live` |
//! | LIVE(x) | planned for `want` = x | LIVE(x, new reason) | — | `plan_site` |
//! | LIVE(x) | planned; foreign bytes, not required | LIVE(x): correct whatever the key holds, and once the bytes are back | — | `plan_site` |
//! | LIVE(x) | planned; foreign bytes, required | LIVE(x); an all-or-nothing operation fails before anything changed | — | `plan_site` |
//! | LIVE(x) | planned; not required, patching off | LIVE(x, Disabled) | — | `plan_site` |
//! | LIVE(x) | written | LIVE(want) | x → want | `record` |
//! | LIVE(x) | page refused (EACCES...) | LIVE(x, Disabled(WriteRefused)); patching off | — | `record` |
//! | LIVE(x) | page refused with ENOMEM, which may pass | LIVE(x, WriteFailed); retried later by the worker (a run-time site stops counting misses meanwhile) | — | `record` |
//! | LIVE(x) | compare-exchange lost: someone else wrote meanwhile | LIVE(x) | — | `record` |
//! | LIVE(want) | undone (an all-or-nothing operation failed) | LIVE(x) | want → x | `roll_back` |
//! | LIVE(want) | undo lost, or its page refused | LIVE(want) (the truth: `want` is under the foreign bytes) | — | `roll_back` |
//!
//! # Operations
//!
//! - **Settling new sites** (the worker, `flush`): site by site; a failure is recorded in the
//!   site's record and nothing is undone (every site planned here is at home, which is correct
//!   whatever happens, or a run-time site, which is correct in every form). Near thunks and
//!   guard stubs the plan calls are written, and the cores synced, before the plan.
//! - **`update` and `Batch`**: all or nothing over required sites. Planning fails, before
//!   anything changed, if a required site holds foreign bytes. If there is a required write,
//!   one core sync runs before anything is published, so that a failing `membarrier` is found
//!   while nothing has changed. Then the targets are published and the plan written; if a
//!   required write fails, the targets are restored and the writes undone (`roll_back`). A key
//!   whose branch sites switch on or off (a hook gaining or losing its target) is written in two
//!   phases, each published, written and synced in turn (`kinds::phase`: calls then branches
//!   when enabling, branches then calls when disabling); a failing second phase undoes itself,
//!   then the first (`undo_phases`).
//! - **`unpatch_all`**: site by site, every LIVE site back home; patching goes off only once
//!   every site is there.
//!
//! Invariants, under the lock:
//! - A site is in its key's list exactly when its record is LIVE.
//! - When no operation is under way, the `ours` of every LIVE site of a key agrees with the
//!   key's target (`kinds::wants`: for a call site, `call <target>` or of its near thunk, NOP5 or
//!   RET0), or its home with a reason. The one exception is the site named by
//!   `ErrorKind::UndoFailed`.
//! - `key.func` changes only here, under the lock; the worker reads it at patch time, never at
//!   queue time, so a site registered before an `update` is patched to the new target.
//! - A site enters its key's list in the same lock hold that patches it: an `update` either
//!   sees it in the list or runs before it is patched (and then the patch reads the new target).

use core::cell::UnsafeCell;
use core::sync::atomic::Ordering;

use crate::arch::x86_64::{self as arch, Insn, SiteWord};
use crate::code_pool::{self, Pool};
use crate::diagnostics::{
    Disabled, Error, ErrorKind, Reason, SiteInfo, SiteState, Status, WorkerStatus,
};
use crate::guard::{self, Stubs};
use crate::key::{RawKey, RawTarget};
use crate::kinds::{self, Kind};
use crate::os::faults::{self, Point};
use crate::os::linux::{self, Write, WriteError};
use crate::registry::{CLAIMING, QUEUED, RETRY, SETTLED, Slot};
use crate::runtime::{self, Runtime};
use crate::thunks::{self, Thunks};
use crate::worker;
use std::sync::MutexGuard;

/// Most sites settled in one batch (one core sync each).
const BATCH: usize = 1024;

/// The patch lock: a plain pthread mutex, so that the fork handlers can take it in `prepare`
/// and give it back in `parent` / reinitialise it in `child`.
struct PatchLock(UnsafeCell<libc::pthread_mutex_t>);
// SAFETY: a pthread mutex is made to be shared between threads.
unsafe impl Sync for PatchLock {}
static LOCK: PatchLock = PatchLock(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));

/// Proof that the patch lock is held; releases it when dropped.
pub(crate) struct Locked(core::marker::PhantomData<*const ()>);

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: this thread locked it in `lock()`.
        unsafe { libc::pthread_mutex_unlock(LOCK.0.get()) };
    }
}

fn lock() -> Locked {
    // SAFETY: LOCK is a statically initialised mutex that lives forever.
    unsafe { libc::pthread_mutex_lock(LOCK.0.get()) };
    Locked(core::marker::PhantomData)
}

pub(crate) fn lock_for_fork() {
    // SAFETY: as in `lock`; released by `unlock_after_fork` in the parent or the child.
    unsafe { libc::pthread_mutex_lock(LOCK.0.get()) };
}

pub(crate) fn unlock_after_fork() {
    // SAFETY: the forking thread locked it in `lock_for_fork` (in the child, that thread is the
    // only one, and a normal mutex does not check the owner).
    unsafe { libc::pthread_mutex_unlock(LOCK.0.get()) };
}

const UNSETTLED: u8 = 0;
const LIVE: u8 = 1;
const BLOCKED: u8 = 2;

/// The patcher's record of a site, packed into `Slot::info`: the site's five bytes (LIVE only),
/// its status and the reason code of why it is not a direct call (0 if it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Info {
    insn: Insn,
    status: u8,
    reason: u16,
}

impl Info {
    pub fn blocked(reason: Reason) -> Info {
        Info {
            insn: [0; 5],
            status: BLOCKED,
            reason: reason.to_code(),
        }
    }

    fn live(insn: Insn, reason: Option<Reason>) -> Info {
        Info {
            insn,
            status: LIVE,
            reason: reason.map_or(0, Reason::to_code),
        }
    }

    fn with_reason(self, reason: Reason) -> Info {
        Info {
            reason: reason.to_code(),
            ..self
        }
    }

    fn reason(self) -> Option<Reason> {
        Reason::from_code(self.reason)
    }

    pub fn pack(self) -> u64 {
        arch::pack(self.insn) | (self.status as u64) << 40 | (self.reason as u64) << 48
    }

    fn unpack(v: u64) -> Info {
        Info {
            insn: arch::unpack(v),
            status: (v >> 40) as u8,
            reason: (v >> 48) as u16,
        }
    }

    fn load(slot: &Slot) -> Info {
        Info::unpack(slot.info.load(Ordering::Relaxed))
    }

    fn store(self, slot: &Slot) {
        slot.info.store(self.pack(), Ordering::Relaxed);
    }
}

/// A write an operation wants at one LIVE site.
#[derive(Clone, Copy)]
struct Planned {
    index: u32,
    /// The site's call instruction.
    site: usize,
    /// The five bytes being written there.
    want: Insn,
    /// Why `want` is `call trampoline`, if it is.
    reason: Option<Reason>,
    /// The swap of the site's quadword.
    write: Write,
    /// The site's record before: its bytes do not go through the trampoline, so leaving it
    /// unwritten would leave it on the old target.
    required: bool,
    /// The site's record before this write, for `roll_back`.
    before: Info,
}

/// The kind of the site in `slot`.
fn kind(slot: &Slot) -> Kind {
    Kind::from_u32(slot.kind.load(Ordering::Relaxed))
}

/// What the patcher keeps about the site in `slot` (`kinds::Proof::aux`).
fn aux(slot: &Slot) -> [u64; 2] {
    [
        slot.aux[0].load(Ordering::Relaxed),
        slot.aux[1].load(Ordering::Relaxed),
    ]
}

/// The bytes of the site in `slot` while unpatched: `call trampoline` for a call site.
fn home(rt: &Runtime, slot: &Slot) -> Insn {
    kinds::home(rt, kind(slot), slot.site.load(Ordering::Relaxed), aux(slot))
}

/// What the LIVE site in `slot` should hold for `target`, and why that is its home, if it is.
fn wants(rt: &Runtime, slot: &Slot, target: RawTarget, thunks: &Thunks) -> (Insn, Option<Reason>) {
    let site = slot.site.load(Ordering::Relaxed);
    kinds::wants(rt, kind(slot), site, aux(slot), target, thunks)
}

/// The code the patcher writes besides sites (the code pool, and the near thunks and guard
/// stubs in it), for the holder of the patch lock.
struct Made {
    pool: MutexGuard<'static, Pool>,
    thunks: MutexGuard<'static, Thunks>,
    stubs: MutexGuard<'static, Stubs>,
}

fn made(locked: &Locked) -> Made {
    Made {
        pool: code_pool::lock(locked),
        thunks: thunks::lock(locked),
        stubs: guard::lock(locked),
    }
}

/// Makes, before `slots` are planned, the thunks and guard stubs their plans will call: thunks
/// for the far targets of their keys (call and tail sites) and of the stubs that run-time sites
/// want, then those stubs. Each is its own batch, synced before the plan is written. Returns
/// what the guard policy decided for each run-time site (`None` for the others), decided once
/// here, so that a miss noted meanwhile cannot make the plan ask for a stub no one made.
fn prepare(
    rt: &Runtime,
    slots: &[(u32, &Slot)],
    made: &mut Made,
    now_ms: u64,
) -> Vec<Option<guard::Next>> {
    let mut targets = Vec::new();
    let decisions: Vec<Option<guard::Next>> = slots
        .iter()
        .map(|(_, slot)| match slot.static_key() {
            Some(key) => {
                targets.push(key.target());
                None
            }
            None => {
                let info = Info::load(slot);
                let current = if info.status == LIVE {
                    info.insn
                } else {
                    home(rt, slot)
                };
                Some(guard::decide(rt, slot, current, &made.stubs, now_ms))
            }
        })
        .collect();
    if runtime::mode().is_ok() {
        let sets: Vec<Vec<usize>> = decisions
            .iter()
            .flatten()
            .filter_map(guard::wanted_stub)
            .collect();
        let far = sets.iter().flatten().copied();
        let Made {
            pool,
            thunks,
            stubs,
        } = made;
        thunks.make_for(rt, pool, called(targets).chain(far));
        stubs.make_for(rt, pool, thunks, sets);
    }
    decisions
}

/// The functions that `targets` call (NULL and return-zero targets need no thunk).
fn called(targets: impl IntoIterator<Item = RawTarget>) -> impl Iterator<Item = usize> {
    targets.into_iter().filter_map(|t| match t {
        RawTarget::Call(f) => Some(f as usize),
        _ => None,
    })
}

/// The five bytes at a LIVE site now, read from its quadword.
fn bytes_at(site: usize) -> (SiteWord, u64) {
    let at = SiteWord::of(site).expect("a verified site");
    // SAFETY: LIVE sites were verified to lie in our executable segments, which stay mapped;
    // `at.addr` is 8-aligned.
    (at, unsafe { linux::read_word(at.addr) })
}

/// Iterates over a key's list of LIVE sites.
fn list<'a>(rt: &'a Runtime, key: &RawKey, _: &Locked) -> impl Iterator<Item = (u32, &'a Slot)> {
    let mut next = key.head();
    core::iter::from_fn(move || {
        let index = next.checked_sub(1)?;
        let slot = rt.registry.slot(index);
        next = slot.next.load(Ordering::Relaxed);
        Some((index, slot))
    })
}

fn link(rt: &Runtime, key: &RawKey, index: u32, _: &Locked) {
    let slot = rt.registry.slot(index);
    slot.next.store(key.head(), Ordering::Relaxed);
    key.set_head(index + 1);
}

/// Every LIVE site of the registry.
fn live_sites<'a>(rt: &'a Runtime, _: &Locked) -> impl Iterator<Item = (u32, &'a Slot)> {
    rt.registry
        .claimed()
        .filter(|(_, slot)| Info::load(slot).status == LIVE)
}

/// Patches every queued site (and those waiting in RETRY). The worker's job; `flush` does it too.
pub(crate) fn drain() {
    if let Some(rt) = runtime::wait_initialised() {
        let locked = lock();
        drain_locked(rt, &locked);
    }
}

fn drain_locked(rt: &Runtime, locked: &Locked) {
    // A signal handler that makes a first call on this thread pushes onto the queue; if it ran
    // half-way through one of our pops of the same slot, its push would spin for ever. The worker
    // blocks every signal for good; `flush` and `unpatch_all` run this on the caller's thread.
    let _blocked = linux::SignalsBlocked::new();
    if worker::take_retry(locked) {
        let retries: Vec<u32> = rt
            .registry
            .claimed()
            .filter(|(_, s)| {
                s.state
                    .compare_exchange(RETRY, QUEUED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            })
            .map(|(i, _)| i)
            .collect();
        for chunk in retries.chunks(BATCH) {
            settle(rt, chunk, locked);
        }
    }
    if worker::retry_due(locked) {
        retry_failed_writes(rt, locked);
    }
    loop {
        let batch: Vec<u32> = core::iter::from_fn(|| {
            let index = worker::pop(locked);
            faults::hook(Point::AfterPop);
            index
        })
        .take(BATCH)
        .collect();
        if batch.is_empty() {
            return;
        }
        settle(rt, &batch, locked);
    }
}

/// Decides the fate of newly queued sites and patches the ones that can be.
fn settle(rt: &Runtime, batch: &[u32], locked: &Locked) {
    let mut plan = Vec::new();
    let mut settled = Vec::with_capacity(batch.len());
    // Acquire pairs with the slow path's Release store of QUEUED: `key` is visible.
    let queued = |&index: &u32| rt.registry.slot(index).state.load(Ordering::Acquire) == QUEUED;
    let slots: Vec<(u32, &Slot)> = batch
        .iter()
        .filter(|i| queued(i))
        .map(|&i| (i, rt.registry.slot(i)))
        .collect();
    let mut made = made(locked);
    let decisions = prepare(rt, &slots, &mut made, guard::now_ms());
    for (&(index, slot), decision) in slots.iter().zip(decisions) {
        settle_one(rt, slot, index, &mut plan, &made, decision, locked);
        settled.push(slot);
    }
    // Every site planned here is on the trampoline, correct whatever happens: a failure only
    // decides whether patching goes on.
    if let Err(e) = write(rt, &mut plan) {
        note_failure(e);
    }
    for slot in settled {
        slot.state.store(SETTLED, Ordering::Release);
    }
}

/// Settles one queued site: the first rows of the table for a new site, then `plan_site`.
fn settle_one(
    rt: &Runtime,
    slot: &Slot,
    index: u32,
    plan: &mut Vec<Planned>,
    made: &Made,
    decision: Option<guard::Next>,
    locked: &Locked,
) {
    let key = slot.static_key();
    let site = slot.site.load(Ordering::Relaxed);
    if Info::load(slot).status != LIVE {
        let proof = runtime::mode()
            .map_err(Reason::Disabled)
            .and_then(|()| kinds::prove(rt, kind(slot), site, key));
        let proof = match proof {
            Ok(proof) => proof,
            Err(reason) => {
                // Never written: a run-time site must not come back on every few misses.
                guard::settle_misses(slot, true);
                return Info::blocked(reason).store(slot);
            }
        };
        for (kept, value) in slot.aux.iter().zip(proof.aux) {
            kept.store(value, Ordering::Relaxed);
        }
        if let Some(key) = key {
            link(rt, key, index, locked);
        }
        Info::live(proof.at.insn(proof.word), None).store(slot);
    }
    // A site planned here is on the trampoline (new, or queued again) or a run-time site, so
    // never required: an error (foreign bytes on a required site) cannot happen, and would leave
    // it as it is.
    let _ = plan_live(rt, index, slot, plan, made, decision);
}

/// Plans the LIVE site in `slot` for what it should hold now: its key's target (call and tail
/// sites), or what the guard policy decided in `prepare` (run-time sites), once `prepare` made
/// the code it calls.
fn plan_live(
    rt: &Runtime,
    index: u32,
    slot: &Slot,
    plan: &mut Vec<Planned>,
    made: &Made,
    decision: Option<guard::Next>,
) -> Result<(), usize> {
    let (want, reason) = match (slot.static_key(), decision) {
        (Some(key), _) => wants(rt, slot, key.target(), &made.thunks),
        (None, Some(next)) => {
            let info = Info::load(slot);
            let p = guard::plan(rt, slot, info.insn, info.reason(), next, &made.stubs);
            (p.want, p.reason)
        }
        (None, None) => return Ok(()),
    };
    plan_site(rt, index, slot, want, reason, plan)
}

/// Plans turning the LIVE site in `slot` into `want` (`reason`: why that is the trampoline, if
/// it is), following the table's "planned" rows. Returns the site's address if it is required
/// and holds foreign bytes: nothing is planned for it then.
fn plan_site(
    rt: &Runtime,
    index: u32,
    slot: &Slot,
    want: Insn,
    reason: Option<Reason>,
    plan: &mut Vec<Planned>,
) -> Result<(), usize> {
    let info = Info::load(slot);
    debug_assert_eq!(info.status, LIVE);
    let site = slot.site.load(Ordering::Relaxed);
    if want == info.insn {
        Info::live(want, reason).store(slot);
        return Ok(());
    }
    let required = kinds::required(kind(slot), info.insn, home(rt, slot));
    let (at, word) = bytes_at(site);
    if at.insn(word) != info.insn {
        return if required { Err(site) } else { Ok(()) };
    }
    if !required && let Err(why) = runtime::mode() {
        info.with_reason(Reason::Disabled(why)).store(slot);
        return Ok(());
    }
    plan.push(Planned {
        index,
        site,
        want,
        reason,
        write: Write {
            addr: at.addr,
            insn_at: at.offset(),
            old: word,
            new: at.with(word, want),
            done: false,
        },
        required,
        before: info,
    });
    Ok(())
}

/// Has the code writer carry out `plan` and records the outcome in each site's record
/// (`record`).
fn write(rt: &Runtime, plan: &mut [Planned]) -> Result<(), WriteError> {
    if plan.is_empty() {
        return Ok(());
    }
    let mut writes: Vec<Write> = plan.iter().map(|p| p.write).collect();
    let exec = rt.object.as_ref().map_or(&[][..], |o| &o.exec[..]);
    let result = linux::write_batch(&mut writes, exec, rt.page);
    // `write_batch` sorted `writes`; match them back by address.
    writes.sort_unstable_by_key(|w| w.addr);
    for p in plan.iter_mut() {
        let i = writes
            .binary_search_by_key(&p.write.addr, |w| w.addr)
            .expect("planned write");
        p.write.done = writes[i].done;
        record(rt, p, result);
    }
    result
}

/// The table's "written", "page refused" and "compare-exchange lost" rows for one planned site.
fn record(rt: &Runtime, p: &Planned, result: Result<(), WriteError>) {
    let slot = rt.registry.slot(p.index);
    match result {
        // Nothing was written. Only a site on the trampoline says why: it is where it stays.
        Err(WriteError::Protect(errno)) if !p.required => {
            p.before.with_reason(refused(errno)).store(slot);
            // A run-time site waits for the worker's retry (or for good), not for its misses.
            if kind(slot) == Kind::RunTime {
                guard::settle_misses(slot, true);
            }
            if transient(errno) {
                worker::schedule_retry();
            }
        }
        Err(WriteError::Protect(_)) => {}
        _ if p.write.done => Info::live(p.want, p.reason).store(slot),
        // Lost: someone else's bytes are there now; the record keeps ours, under them.
        _ => {}
    }
}

/// Whether an `mprotect` errno may pass (and the write be tried again later).
fn transient(errno: i32) -> bool {
    errno == libc::ENOMEM || errno == libc::EAGAIN
}

/// Why a site on the trampoline stays there after `mprotect` failed with `errno`.
fn refused(errno: i32) -> Reason {
    if transient(errno) {
        Reason::WriteFailed { errno }
    } else {
        Reason::Disabled(Disabled::WriteRefused { errno })
    }
}

/// What a failed write means for the whole process: patching goes off for good, unless the
/// failure may pass.
fn note_failure(e: WriteError) {
    match e {
        WriteError::Protect(errno) if transient(errno) => {}
        WriteError::Protect(errno) => runtime::disable(Disabled::WriteRefused { errno }),
        WriteError::Sync(errno) => runtime::disable(Disabled::NoCoreSync { errno }),
    }
}

/// Tries again the sites whose write failed with an error that may pass (the table's
/// `WriteFailed` row): the worker's job, once the back-off has passed.
fn retry_failed_writes(rt: &Runtime, locked: &Locked) {
    if runtime::mode().is_err() {
        return;
    }
    let waiting: Vec<(u32, &Slot)> = live_sites(rt, locked)
        .filter(|(_, s)| matches!(Info::load(s).reason(), Some(Reason::WriteFailed { .. })))
        .collect();
    let mut made = made(locked);
    let decisions = prepare(rt, &waiting, &mut made, guard::now_ms());
    let mut plan = Vec::new();
    for (&(index, slot), decision) in waiting.iter().zip(decisions) {
        let _ = plan_live(rt, index, slot, &mut plan, &made, decision);
    }
    match write(rt, &mut plan) {
        Ok(()) => worker::retry_succeeded(),
        Err(e) => note_failure(e),
    }
}

/// Points each key at its target and rewrites all their sites (see `StaticCall::try_update`,
/// `StaticBranch::try_set` and `Batch`). All or nothing: on failure no key and no site changes,
/// except as `ErrorKind::NotSynced` and `UndoFailed` say. Each key appears at most once in
/// `changes`.
///
/// One batch (one pass over the pages, one core sync), unless a key's branch sites switch on or
/// off (a hook gains or loses its target): then the sites are written in two phases, each
/// with its own core sync, in the order `kinds::phase` gives (calls before branches when
/// enabling, branches before calls when disabling), and each phase publishes, just before its
/// writes, the part of the key its sites follow while unpatched (the function for call sites,
/// the mode for branch sites). So an unpatched site and a patched one agree at every moment, and
/// a branch that is on never guards a call that does not call the target yet.
pub(crate) fn update(changes: &[(&RawKey, RawTarget)]) -> Result<(), Error> {
    let locked = lock();
    let Some(rt) = runtime::get() else {
        // No site has ever been registered: only the trampoline path exists.
        for &(key, target) in changes {
            key.set_target(target);
        }
        return Ok(());
    };
    if worker::status() != WorkerStatus::Running {
        // Nobody else will patch what is queued: do the worker's job first.
        drain_locked(rt, &locked);
    }
    let mut made = made(&locked);
    if runtime::mode().is_ok() {
        let Made { pool, thunks, .. } = &mut made;
        thunks.make_for(rt, pool, called(changes.iter().map(|&(_, target)| target)));
    }
    let old: Vec<RawTarget> = changes.iter().map(|(key, _)| key.target()).collect();
    let mut plans: [Vec<Planned>; PHASES] = Default::default();
    for (&(key, target), &from) in changes.iter().zip(&old) {
        for (index, slot) in list(rt, key, &locked) {
            let (want, reason) = wants(rt, slot, target, &made.thunks);
            let plan = &mut plans[kinds::phase(kind(slot), from, target)];
            plan_site(rt, index, slot, want, reason, plan).map_err(|site| Error {
                site: Some(site),
                kind: ErrorKind::ForeignBytes,
            })?;
        }
    }
    if plans.iter().flatten().any(|p| p.required)
        && let Err(errno) = linux::sync_cores()
    {
        // Found before anything was published: nothing changed.
        runtime::disable(Disabled::NoCoreSync { errno });
        return Err(Error {
            site: None,
            kind: ErrorKind::CoreSyncFailed { errno },
        });
    }
    // Publishes (`new`) or restores the part of each key's target whose sites `phase` writes.
    let publish = |phase: usize, new: bool| {
        for (&(key, target), &from) in changes.iter().zip(&old) {
            let now = if new { target } else { from };
            if kinds::phase(Kind::Branch, from, target) == phase {
                key.set_mode(now);
            }
            if kinds::phase(Kind::Call, from, target) == phase {
                key.set_func(now);
            }
        }
    };
    let result = commit(rt, &mut plans, publish);
    if result.is_ok() {
        // Run-time sites are not rewritten (their stubs compare the key's contents, so they
        // miss now and get the new targets' stubs later); the old targets are noted, so that a
        // site's next stub leaves them out (a heuristic only).
        let gone = changes
            .iter()
            .zip(&old)
            .filter(|&(&(_, new), old)| new.func() != old.func());
        made.stubs.retire(gone.map(|(_, old)| old.func() as usize));
    }
    result
}

/// Phases of an update (`kinds::phase`).
const PHASES: usize = 2;

/// Writes the phases of an all-or-nothing operation in order, each after publishing its part
/// of the new targets (`publish(phase, true)`; `false` restores the old part), and turns the
/// outcome into the operation's result. A phase that fails undoes itself (`commit_phase`);
/// then the phases before it are undone too, latest first, so that nothing changed.
fn commit(
    rt: &Runtime,
    plans: &mut [Vec<Planned>; PHASES],
    publish: impl Fn(usize, bool),
) -> Result<(), Error> {
    let mut result = Ok(());
    for phase in 0..PHASES {
        if phase > 0 && plans[..phase].iter().any(|p| !p.is_empty()) && !plans[phase].is_empty() {
            faults::hook(Point::BetweenPhases);
        }
        publish(phase, true);
        match commit_phase(rt, &mut plans[phase], |new| publish(phase, new)) {
            Phase::Stands(r) => result = result.and(r),
            Phase::Undone(e) => return Err(undo_phases(rt, &plans[..phase], &publish, e)),
        }
    }
    result
}

/// Undoes `done`, phases that were written, latest first, after a later phase failed with
/// `error` and undid itself: restores their part of the old targets and their sites. Returns
/// the operation's error: `error`, unless an undo fails too.
fn undo_phases(
    rt: &Runtime,
    done: &[Vec<Planned>],
    publish: &impl Fn(usize, bool),
    mut error: Error,
) -> Error {
    for (phase, plan) in done.iter().enumerate().rev() {
        publish(phase, false);
        match roll_back(rt, plan) {
            Ok(()) => {}
            Err(Undo::Sync(errno)) => {
                error = Error {
                    site: None,
                    kind: ErrorKind::NotSynced { errno },
                }
            }
            Err(Undo::Refused) => {
                // Its writes stand: so does its part of the new targets. (A key whose branches
                // were switching then has its calls on the new target and its branches on the
                // old state; the next update of the key repairs it.)
                publish(phase, true);
                return Error {
                    site: plan.iter().find(|p| p.write.done).map(|p| p.site),
                    kind: ErrorKind::UndoFailed,
                };
            }
            Err(Undo::Lost(site)) => {
                return Error {
                    site: Some(site),
                    kind: ErrorKind::UndoFailed,
                };
            }
        }
    }
    error
}

/// What became of one phase of an operation.
enum Phase {
    /// Its writes and its part of the new targets stand (the result says whether cores were
    /// synced, or which site an undo could not reach).
    Stands(Result<(), Error>),
    /// Nothing of it is left: its part of the old targets is back, and every write was undone.
    Undone(Error),
}

/// Writes the plan of one phase whose new targets are published; `set_targets(false)` restores
/// the old targets, `set_targets(true)` publishes the new ones again.
fn commit_phase(rt: &Runtime, plan: &mut [Planned], set_targets: impl Fn(bool)) -> Phase {
    let result = write(rt, plan);
    if let Err(e) = result {
        note_failure(e);
    }
    let lost = plan.iter().find(|p| p.required && !p.write.done);
    match (result, lost) {
        (Ok(()), None) => Phase::Stands(Ok(())),
        // Only sites on the trampoline were not upgraded: they are correct where they are. Or
        // the writes were made and only the sync failed, which cannot harm a site whose
        // previous instruction was the trampoline.
        (Err(WriteError::Protect(_)), None) | (Err(WriteError::Sync(_)), None)
            if !plan.iter().any(|p| p.required) =>
        {
            Phase::Stands(Ok(()))
        }
        (Err(WriteError::Protect(errno)), _) => {
            // Nothing was written; the required sites still call the old targets directly.
            set_targets(false);
            Phase::Undone(Error {
                site: plan.iter().find(|p| p.required).map(|p| p.site),
                kind: ErrorKind::WriteRefused { errno },
            })
        }
        (Err(WriteError::Sync(errno)), None) => Phase::Stands(Err(Error {
            site: None,
            kind: ErrorKind::NotSynced { errno },
        })),
        (result, Some(lost)) => {
            let site = lost.site;
            set_targets(false);
            match roll_back(rt, plan) {
                Ok(()) => Phase::Undone(match result {
                    Err(WriteError::Sync(errno)) => Error {
                        site: None,
                        kind: ErrorKind::NotSynced { errno },
                    },
                    _ => Error {
                        site: Some(site),
                        kind: ErrorKind::ForeignBytes,
                    },
                }),
                Err(Undo::Sync(errno)) => Phase::Undone(Error {
                    site: None,
                    kind: ErrorKind::NotSynced { errno },
                }),
                Err(Undo::Refused) => {
                    // Nothing could be undone: every written site calls the new targets, which
                    // the keys hold again; only `site` is left under foreign bytes.
                    set_targets(true);
                    Phase::Stands(Err(Error {
                        site: Some(site),
                        kind: ErrorKind::UndoFailed,
                    }))
                }
                Err(Undo::Lost(stuck)) => Phase::Undone(Error {
                    site: Some(stuck),
                    kind: ErrorKind::UndoFailed,
                }),
            }
        }
    }
}

/// Why undoing the writes of a failed operation failed.
enum Undo {
    /// The pages could not be opened: nothing was undone.
    Refused,
    /// Someone else's bytes landed on this site before its undo: it keeps the new instruction,
    /// under them.
    Lost(usize),
    /// Everything was undone, but the cores could not be serialised (errno).
    Sync(i32),
}

/// Undoes the writes of a failed operation (the table's "undone" and "undo lost" rows): each
/// undone site gets its previous record back; a site whose undo failed keeps the record of
/// what is really under its foreign bytes.
fn roll_back(rt: &Runtime, plan: &[Planned]) -> Result<(), Undo> {
    let mut undo: Vec<Planned> = plan
        .iter()
        .filter(|p| p.write.done)
        .map(|p| Planned {
            want: p.before.insn,
            reason: p.before.reason(),
            write: Write {
                old: p.write.new,
                new: p.write.old,
                done: false,
                ..p.write
            },
            required: true,
            ..*p
        })
        .collect();
    let result = write(rt, &mut undo);
    if let Err(e) = result {
        note_failure(e);
    }
    match result {
        Err(WriteError::Protect(_)) => Err(Undo::Refused),
        _ if undo.iter().any(|u| !u.write.done) => Err(Undo::Lost(
            undo.iter()
                .find(|u| !u.write.done)
                .expect("a lost undo")
                .site,
        )),
        Err(WriteError::Sync(errno)) => Err(Undo::Sync(errno)),
        Ok(()) => Ok(()),
    }
}

/// Returns every patched site to `call trampoline` and keeps patching off from then on; see
/// [`crate::unpatch_all`]. Site by site: a site back on the trampoline is correct whatever
/// happens to the others.
pub(crate) fn unpatch_all() -> Result<(), Error> {
    let locked = lock();
    let Some(rt) = runtime::get() else {
        runtime::disable(Disabled::Unpatched);
        return Ok(());
    };
    // Queued sites are settled first (patched, if patching is on): then every registered site
    // is either LIVE, and rewritten below, or BLOCKED, and never was written.
    drain_locked(rt, &locked);
    let why = Reason::Disabled(runtime::mode().err().unwrap_or(Disabled::Unpatched));
    let mut plan = Vec::new();
    let mut foreign = None;
    for (index, slot) in live_sites(rt, &locked) {
        let home = home(rt, slot);
        if let Err(site) = plan_site(rt, index, slot, home, Some(why), &mut plan) {
            foreign.get_or_insert(site);
        }
    }
    let result = write(rt, &mut plan);
    if let Err(e) = result {
        note_failure(e);
    }
    let lost = plan.iter().find(|p| !p.write.done).map(|p| p.site);
    match result {
        Err(WriteError::Protect(errno)) => Err(Error {
            site: plan.first().map(|p| p.site),
            kind: ErrorKind::WriteRefused { errno },
        }),
        Err(WriteError::Sync(errno)) => Err(Error {
            site: None,
            kind: ErrorKind::NotSynced { errno },
        }),
        Ok(()) => match foreign.or(lost) {
            Some(site) => Err(Error {
                site: Some(site),
                kind: ErrorKind::ForeignBytes,
            }),
            None => {
                runtime::disable(Disabled::Unpatched);
                Ok(())
            }
        },
    }
}

/// Every site registered with `key`, for `StaticCall::sites`.
pub(crate) fn sites(key: &RawKey) -> Vec<SiteInfo> {
    let locked = lock();
    let Some(rt) = runtime::get() else {
        return Vec::new();
    };
    let thunks = thunks::lock(&locked);
    let me = key as *const RawKey as *mut RawKey;
    rt.registry
        .claimed()
        .filter(|(_, s)| s.key.load(Ordering::Relaxed) == me && kind(s) != Kind::RunTime)
        .map(|(_, s)| site_info(rt, s, key, &thunks))
        .collect()
}

/// Every run-time site registered so far, for [`crate::run_time_sites`].
pub(crate) fn run_time_sites() -> Vec<SiteInfo> {
    let locked = lock();
    let Some(rt) = runtime::get() else {
        return Vec::new();
    };
    let stubs = guard::lock(&locked);
    rt.registry
        .claimed()
        .filter(|(_, s)| kind(s) == Kind::RunTime && s.state.load(Ordering::Acquire) != CLAIMING)
        .map(|(_, s)| run_time_info(rt, s, &stubs))
        .collect()
}

/// A run-time site as `run_time_sites()` reports it, from its record and the bytes there now.
fn run_time_info(rt: &Runtime, slot: &Slot, stubs: &Stubs) -> SiteInfo {
    let address = slot.site.load(Ordering::Relaxed);
    let bytes = read_site(rt, address);
    let info = Info::load(slot);
    let state = match info.status {
        LIVE if bytes != Some(info.insn) => SiteState::Foreign,
        LIVE => guard::state(rt, address, info.insn, info.reason(), stubs),
        BLOCKED => SiteState::Trampoline(info.reason().unwrap_or(Reason::NotASite)),
        _ => SiteState::Pending,
    };
    SiteInfo {
        address,
        state,
        bytes,
    }
}

/// A site as `sites()` reports it, from its record, its key and the bytes there now.
fn site_info(rt: &Runtime, slot: &Slot, key: &RawKey, thunks: &Thunks) -> SiteInfo {
    let address = slot.site.load(Ordering::Relaxed);
    let bytes = read_site(rt, address);
    let info = Info::load(slot);
    let state = if slot.state.load(Ordering::Acquire) != SETTLED {
        SiteState::Pending
    } else {
        match info.status {
            LIVE if bytes != Some(info.insn) => SiteState::Foreign,
            LIVE if info.insn == home(rt, slot) => {
                SiteState::Trampoline(info.reason().unwrap_or(Reason::NotASite))
            }
            LIVE if info.insn == wants(rt, slot, key.target(), thunks).0 => SiteState::Patched,
            LIVE => SiteState::Stale,
            BLOCKED => SiteState::Trampoline(info.reason().unwrap_or(Reason::NotASite)),
            _ => SiteState::Pending,
        }
    };
    SiteInfo {
        address,
        state,
        bytes,
    }
}

/// The five bytes at `site`, if they lie inside our own code (a registered address may be any
/// return address, which must not be read blindly).
fn read_site(rt: &Runtime, site: usize) -> Option<Insn> {
    let object = rt.object.as_ref()?;
    let end = site.checked_add(arch::INSN_LEN)?;
    object.exec_segment(site, end)?;
    let mut insn = [0; arch::INSN_LEN];
    // SAFETY: inside one of our executable segments, which stay mapped.
    unsafe { linux::read_code(site, &mut insn) };
    Some(insn)
}

/// See [`crate::flush`].
pub(crate) fn flush() {
    drain();
}

/// See [`crate::init`].
pub(crate) fn init() {
    runtime::get_or_init();
    worker::ensure_started();
}

/// See [`crate::status`].
pub(crate) fn status() -> Status {
    // Initialise (without starting the worker) so that the answer is the one calls will get:
    // whether patching is on is decided at initialisation.
    let rt = runtime::get_or_init();
    let (thunks, thunk_error) = thunks::summary();
    Status {
        patching: runtime::mode(),
        worker: worker::status(),
        sites: rt.map_or(0, |rt| rt.registry.count.load(Ordering::Relaxed)),
        capacity: rt.map_or(0, |rt| rt.registry.capacity()),
        registry_full: runtime::REGISTRY_FULL.load(Ordering::Relaxed),
        thunks,
        thunk_error,
        guards: guard::GUARDS,
        stubs: guard::made(),
    }
}

pub(crate) use linux::stats;

const _: () = assert!(UNSETTLED == 0, "a zeroed slot must read as unsettled");
