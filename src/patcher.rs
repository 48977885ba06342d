//! The patcher: decides what each registered site's five bytes should be and has the code writer
//! (`os/linux.rs`) put them there. Everything here runs under the patch lock, which serialises
//! the worker, `update`, `flush` and `fork`.
//!
//! Invariants, under the lock:
//! - A site is in its key's list exactly when its `Info` is LIVE: its bytes were verified as one
//!   of our sites, bound to that key (`arch::prove_site`).
//! - A LIVE site's `insn` is the five bytes at the site, as we last wrote or verified them.
//! - A LIVE site's bytes are `call <key's target>` (or of its near thunk, for a target beyond
//!   ±2 GiB; `thunks.rs`), or `call <trampoline>` with `reason` saying why not (no thunk for a
//!   far target, writes refused).
//! - `key.func` changes only here, under the lock; the worker reads it at patch time, never at
//!   queue time, so a site registered before an `update` is patched to the new target.
//! - A site enters its key's list in the same lock hold that patches it: an `update` either
//!   sees it in the list or runs before it is patched (and then the patch reads the new target).

use core::cell::UnsafeCell;
use core::sync::atomic::Ordering;

use crate::arch::x86_64::{self as arch, Insn, PROLOGUE, SiteInsn, SiteWord, WORD};
use crate::diagnostics::{Disabled, Error, ErrorKind, Reason, SiteInfo, SiteState, Status};
use crate::key::{RawKey, RawTarget};
use crate::os::linux::{self, Write, WriteError};
use crate::registry::{QUEUED, RETRY, SETTLED, Slot};
use crate::runtime::{self, Runtime};
use crate::thunks::{self, Thunks};
use crate::worker;

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

/// A write the patcher wants, and what it is for.
#[derive(Clone, Copy)]
struct Planned {
    index: u32,
    /// The site's call instruction.
    site: usize,
    /// The five bytes being written there.
    insn: Insn,
    /// The swap of the site's quadword.
    write: Write,
    /// The site currently calls something other than the trampoline, so leaving it unwritten
    /// would leave it on the old target.
    required: bool,
    /// Why the new bytes are `call trampoline`, if they are.
    reason: Option<Reason>,
    /// The site's record before this write, for a rollback.
    before: Info,
}

impl Planned {
    /// Writing `insn` over the site at `site`, whose quadword (`at`) holds `word`.
    fn new(index: u32, site: usize, at: SiteWord, word: u64, insn: Insn, before: Info) -> Planned {
        Planned {
            index,
            site,
            insn,
            write: Write {
                addr: at.addr,
                old: word,
                new: at.with(word, insn),
                done: false,
            },
            required: false,
            reason: None,
            before,
        }
    }
}

/// `call trampoline` at `site`; always encodable, the trampoline lives in the same object.
fn trampoline_insn(rt: &Runtime, site: usize) -> Insn {
    arch::encode(site, SiteInsn::Call(rt.trampoline)).expect("trampoline within rel32 of its sites")
}

/// What a LIVE site should hold for `target`, and why that is the trampoline if it is: a direct
/// call if it reaches, else a call to the target's thunk if it has one (`Thunks::make_for` ran
/// for it first), else the trampoline.
fn desired(
    rt: &Runtime,
    site: usize,
    target: RawTarget,
    thunks: &Thunks,
) -> (Insn, Option<Reason>) {
    let what = match target {
        RawTarget::Call(f) => SiteInsn::Call(f as usize),
        RawTarget::Null(_) => SiteInsn::Nop,
        RawTarget::Ret0(_) => SiteInsn::Ret0,
    };
    let via_thunk = || match target {
        RawTarget::Call(f) => arch::encode(site, SiteInsn::Call(thunks.get(f as usize)?)),
        _ => None,
    };
    match arch::encode(site, what).or_else(via_thunk) {
        Some(insn) => (insn, None),
        None => (trampoline_insn(rt, site), Some(Reason::TargetOutOfRange)),
    }
}

/// The functions that `targets` call (NULL and return-zero targets need no thunk).
fn called(targets: impl IntoIterator<Item = RawTarget>) -> impl Iterator<Item = usize> {
    targets.into_iter().filter_map(|t| match t {
        RawTarget::Call(f) => Some(f as usize),
        _ => None,
    })
}

/// Checks that `site` is one of our sites bound to `key`; returns its quadword and its value.
fn verify(rt: &Runtime, site: usize, key: &RawKey) -> Result<(SiteWord, u64), Reason> {
    let object = rt
        .object
        .as_ref()
        .ok_or(Reason::Disabled(Disabled::ObjectNotFound))?;
    let at = SiteWord::of(site).ok_or(Reason::NotASite)?;
    let start = site.checked_sub(PROLOGUE).ok_or(Reason::NotASite)?;
    object
        .exec_segment(start, at.addr + WORD)
        .ok_or(Reason::NotASite)?;
    let mut code = [0u8; PROLOGUE + arch::INSN_LEN];
    // SAFETY: [start, at.addr + WORD) lies in one of our executable segments, which stay mapped
    // (our own object is pinned), and `at.addr` is 8-aligned.
    let word = unsafe {
        linux::read_code(start, &mut code);
        linux::read_word(at.addr)
    };
    if code[PROLOGUE..] != at.insn(word) {
        return Err(Reason::ForeignBytes);
    }
    let bound = arch::prove_site(&code, start as u64, rt.trampoline as u64)?;
    if bound != key.addr() as u64 || !object.holds_data(key.addr(), size_of::<RawKey>()) {
        return Err(Reason::KeyNotProven);
    }
    Ok((at, word))
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

/// Patches every queued site (and those waiting in RETRY). The worker's job; `flush` does it too.
pub(crate) fn drain() {
    if let Some(rt) = runtime::wait_initialised() {
        let locked = lock();
        drain_locked(rt, &locked);
    }
}

fn drain_locked(rt: &Runtime, locked: &Locked) {
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
    loop {
        let batch: Vec<u32> = core::iter::from_fn(|| worker::pop(locked))
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
    let mut thunks = thunks::lock(locked);
    if runtime::mode().is_ok() {
        let targets = batch.iter().filter(|i| queued(i));
        thunks.make_for(
            rt,
            called(targets.map(|&i| rt.registry.slot(i).key().target())),
        );
    }
    for &index in batch {
        if !queued(&index) {
            continue;
        }
        let slot = rt.registry.slot(index);
        settle_one(rt, slot, index, &mut plan, &thunks, locked).store(slot);
        settled.push(slot);
    }
    if let Err(e) = write(rt, &mut plan) {
        match e {
            WriteError::Protect(errno) => runtime::disable(Disabled::WriteRefused { errno }),
            WriteError::Sync(errno) => runtime::disable(Disabled::NoCoreSync { errno }),
        }
    }
    for slot in settled {
        slot.state.store(SETTLED, Ordering::Release);
    }
}

fn settle_one(
    rt: &Runtime,
    slot: &Slot,
    index: u32,
    plan: &mut Vec<Planned>,
    thunks: &Thunks,
    locked: &Locked,
) -> Info {
    if let Err(why) = runtime::mode() {
        return Info::blocked(Reason::Disabled(why));
    }
    let key = slot.key();
    let site = slot.site.load(Ordering::Relaxed);
    let (at, word) = match verify(rt, site, key) {
        Ok(found) => found,
        Err(reason) => return Info::blocked(reason),
    };
    link(rt, key, index, locked);
    let here = at.insn(word);
    let (want, reason) = desired(rt, site, key.target(), thunks);
    let info = Info::live(here, reason);
    if want != here {
        plan.push(Planned {
            reason,
            ..Planned::new(index, site, at, word, want, info)
        });
    }
    info
}

/// Has the code writer carry out `plan`, and records the outcome in each site's `Info`:
/// written sites hold their new bytes; a site whose bytes changed under us is blocked; if the
/// pages could not be opened, nothing was written and every planned site says why.
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
        let slot = rt.registry.slot(p.index);
        let info = match result {
            Err(WriteError::Protect(errno)) => {
                let refused = Reason::Disabled(Disabled::WriteRefused { errno });
                Info {
                    reason: refused.to_code(),
                    ..Info::load(slot)
                }
            }
            _ if p.write.done => Info::live(p.insn, p.reason),
            _ => Info::blocked(Reason::ForeignBytes),
        };
        info.store(slot);
    }
    result
}

/// Points each key at its target and rewrites all their sites as one batch (one pass over the
/// pages, one core sync); see `StaticCall::try_update` and `Batch`. All or nothing: on failure no
/// key and no site changes. Each key appears at most once in `changes`.
pub(crate) fn update(changes: &[(&RawKey, RawTarget)]) -> Result<(), Error> {
    let locked = lock();
    let Some(rt) = runtime::get() else {
        // No site has ever been registered: only the trampoline path exists.
        for &(key, target) in changes {
            key.set_target(target);
        }
        return Ok(());
    };
    let mut thunks = thunks::lock(&locked);
    if runtime::mode().is_ok() {
        thunks.make_for(rt, called(changes.iter().map(|&(_, target)| target)));
    }
    let mut plan = Vec::new();
    for &(key, target) in changes {
        plan_retarget(rt, key, target, &mut plan, &thunks, &locked)?;
    }

    let old: Vec<RawTarget> = changes.iter().map(|(key, _)| key.target()).collect();
    let restore_targets = || {
        for (&(key, _), &target) in changes.iter().zip(&old) {
            key.set_target(target);
        }
    };
    for &(key, target) in changes {
        key.set_target(target);
    }
    commit(rt, &mut plan, restore_targets)
}

/// Writes `plan` and turns the outcome into the result of an all-or-nothing operation: if a
/// site that must change could not be written (its page refused, or its bytes changed during
/// the write), everything written is undone, `undo` restores whatever else the operation
/// changed, and the error names the site. Sites on the trampoline that could not be upgraded
/// are fine where they are.
fn commit(rt: &Runtime, plan: &mut [Planned], undo: impl FnOnce()) -> Result<(), Error> {
    let result = write(rt, plan);
    let first_required = plan.iter().find(|p| p.required).map(|p| p.site);
    match result {
        Err(WriteError::Protect(errno)) => {
            runtime::disable(Disabled::WriteRefused { errno });
            match first_required {
                // Nothing was written; the sites that call the old targets directly still do.
                Some(site) => {
                    undo();
                    Err(Error {
                        site: Some(site),
                        kind: ErrorKind::WriteRefused { errno },
                    })
                }
                // Only sites on the trampoline were to change; they are correct as they are.
                None => Ok(()),
            }
        }
        Err(WriteError::Sync(errno)) => {
            runtime::disable(Disabled::NoCoreSync { errno });
            Err(Error {
                site: None,
                kind: ErrorKind::CoreSyncFailed { errno },
            })
        }
        Ok(()) => match plan.iter().find(|p| p.required && !p.write.done) {
            None => Ok(()),
            Some(failed) => {
                let site = failed.site;
                undo();
                roll_back(rt, plan);
                Err(Error {
                    site: Some(site),
                    kind: ErrorKind::ForeignBytes,
                })
            }
        },
    }
}

/// Plans the rewrite of `key`'s live sites for `target`. Fails, before anything changed, if a
/// site that calls the old target directly no longer holds the bytes we wrote.
fn plan_retarget(
    rt: &Runtime,
    key: &RawKey,
    target: RawTarget,
    plan: &mut Vec<Planned>,
    thunks: &Thunks,
    locked: &Locked,
) -> Result<(), Error> {
    for (index, slot) in list(rt, key, locked) {
        let site = slot.site.load(Ordering::Relaxed);
        let (want, reason) = desired(rt, site, target, thunks);
        plan_site(rt, index, slot, want, reason, plan)?;
    }
    Ok(())
}

/// Plans turning the LIVE site in `slot` into `want` (`reason`: why that is the trampoline, if
/// it is). A site already holding `want` only gets its record refreshed; a site on the
/// trampoline stays there while writes are refused; a site whose bytes someone else changed is
/// left alone if it is on the trampoline, and fails the operation if it calls a target directly.
fn plan_site(
    rt: &Runtime,
    index: u32,
    slot: &Slot,
    want: Insn,
    reason: Option<Reason>,
    plan: &mut Vec<Planned>,
) -> Result<(), Error> {
    let info = Info::load(slot);
    if info.status != LIVE {
        return Ok(());
    }
    let site = slot.site.load(Ordering::Relaxed);
    if want == info.insn {
        Info::live(want, reason).store(slot);
        return Ok(());
    }
    let on_trampoline = info.insn == trampoline_insn(rt, site);
    if on_trampoline && runtime::mode().is_err() {
        // Writes are refused (or patching is off): the site is correct where it is.
        return Ok(());
    }
    let at = SiteWord::of(site).expect("a verified site");
    // SAFETY: LIVE sites were verified to lie in our executable segments; `at.addr` is aligned.
    let word = unsafe { linux::read_word(at.addr) };
    if at.insn(word) != info.insn {
        if on_trampoline {
            Info::blocked(Reason::ForeignBytes).store(slot);
            return Ok(());
        }
        return Err(Error {
            site: Some(site),
            kind: ErrorKind::ForeignBytes,
        });
    }
    plan.push(Planned {
        required: !on_trampoline,
        reason,
        ..Planned::new(index, site, at, word, want, info)
    });
    Ok(())
}

/// Undoes the writes of a failed update, giving each site back its previous record.
fn roll_back(rt: &Runtime, plan: &mut [Planned]) {
    let mut undo: Vec<Planned> = plan
        .iter()
        .filter(|p| p.write.done)
        .map(|p| Planned {
            write: Write {
                addr: p.write.addr,
                old: p.write.new,
                new: p.write.old,
                done: false,
            },
            ..*p
        })
        .collect();
    let _ = write(rt, &mut undo);
    for p in &undo {
        p.before.store(rt.registry.slot(p.index));
    }
}

/// Returns every patched site to `call trampoline` and keeps patching off from then on; see
/// [`crate::unpatch_all`].
pub(crate) fn unpatch_all() -> Result<(), Error> {
    let locked = lock();
    runtime::disable(Disabled::Unpatched);
    let Some(rt) = runtime::get() else {
        return Ok(());
    };
    // Queued sites settle as "patching off" now, without being written.
    drain_locked(rt, &locked);
    let why = Reason::Disabled(runtime::mode().err().unwrap_or(Disabled::Unpatched));
    let mut plan = Vec::new();
    for (index, slot) in rt.registry.claimed() {
        if slot.state.load(Ordering::Acquire) == SETTLED {
            let site = slot.site.load(Ordering::Relaxed);
            plan_site(
                rt,
                index,
                slot,
                trampoline_insn(rt, site),
                Some(why),
                &mut plan,
            )?;
        }
    }
    commit(rt, &mut plan, || {})
}

/// Every site registered with `key`, for `StaticCall::sites`.
pub(crate) fn sites(key: &RawKey) -> Vec<SiteInfo> {
    let _locked = lock();
    let Some(rt) = runtime::get() else {
        return Vec::new();
    };
    let me = key as *const RawKey as *mut RawKey;
    rt.registry
        .claimed()
        .filter(|(_, s)| s.key.load(Ordering::Relaxed) == me)
        .map(|(_, s)| {
            let address = s.site.load(Ordering::Relaxed);
            SiteInfo {
                address,
                state: site_state(rt, s, address),
            }
        })
        .collect()
}

fn site_state(rt: &Runtime, slot: &Slot, site: usize) -> SiteState {
    if slot.state.load(Ordering::Acquire) != SETTLED {
        return SiteState::Pending;
    }
    let info = Info::load(slot);
    let reason = Reason::from_code(info.reason);
    match info.status {
        LIVE if info.insn != trampoline_insn(rt, site) => SiteState::Patched,
        LIVE | BLOCKED => SiteState::Trampoline(reason.unwrap_or(Reason::NotASite)),
        _ => SiteState::Pending,
    }
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
    }
}

pub(crate) use linux::stats;

const _: () = assert!(UNSETTLED == 0, "a zeroed slot must read as unsettled");
