//! The kinds of site, and everything that tells them apart: the trampoline entry each kind is
//! compiled to reach, what its bytes must prove before it is ever written, the five bytes it
//! holds while unpatched ("home"), and the five bytes it holds for each target. The patcher
//! (`patcher.rs`) runs the same state table for every kind and asks this module, and only this
//! module, what differs.
//!
//! | kind | entry it calls | home | proof (`arch::x86_64`) | for `f` / null / return-zero |
//! |---|---|---|---|---|
//! | `Call`: `static_call!(KEY)(..)` | `static_call_trampoline_v*` | `call <entry>` | `prove_site`: `lea r11, [rip + KEY]`, NOPs, `call <entry>` | `call f` (or its thunk) / NOP5 / RET0 |
//! | `Tail`: `static_call_fn!` | `static_call_tail_trampoline_v*`, from the site's binding | `jmp <binding>` (site + 6) | `prove_tail_site`: `jmp <binding>`, `ret`, then the binding `lea r11, [rip + KEY]`, `lea r10, [rip + site]`, `jmp <entry>` | `jmp f` (or its thunk) / NOP5 / RET0, each followed by the `ret` |
//! | `Branch`: `static_branch!(KEY)`, `has_target!(KEY)` | `static_call_branch_v*`, from the site's stub | `jmp <stub>` | `prove_branch`: `jmp <stub>`, the stub's exact template (`lea r11, [rip + KEY]`, `call <entry>`, `jcc LABEL`, `jmp site + 5`) | on: `jmp LABEL` / off: NOP5 (swapped for likely-true sites); on = `RawTarget::branch_on` |
//! | `RunTime`: `key.call(..)`, `key.call_guarded(..)` | `static_call_run_time_trampoline_v*` | `call <entry>` | `prove_run_time_site`: `call <entry>`, and nothing about a key | not by target: `call <guard stub>` or the indirect call `call [r11]` (`guard.rs`) |
//!
//! A key can have sites of both kinds: `has_target!(HOOK)` is a branch site bound to a call key,
//! on while the key has a target. When an update switches such a key's branches, it writes the
//! two kinds in two ordered phases, each with its own core sync ([`phase`]).
//!
//! The soundness rule, per kind: a site is only ever written once its own bytes prove which key
//! it belongs to, *and* that it is of this kind: each kind reaches its own trampoline entry, and
//! each proof requires that entry, so no kind's proof can accept another kind's site. A run-time
//! site proves no key (its r11 is computed outside its asm block, and LLVM may even merge two
//! keys' `lea r11` in front of it, making bytes that look exactly like a call site): it is only
//! ever written into code that reads the key's contents on every call (a guard stub, or the
//! indirect call), which is correct for any key. So it is never *required*: no key change needs
//! it rewritten, it is in no key's list, and `update` never touches it.

use crate::arch::x86_64::{
    self as arch, Insn, PROLOGUE, STUB_LEN, SiteInsn, SiteWord, TAIL_BINDING, TAIL_CODE, WORD,
};
use crate::diagnostics::{Disabled, Reason};
use crate::key::{RawKey, RawTarget};
use crate::os::linux;
use crate::runtime::Runtime;
use crate::thunks::Thunks;

/// The kind of a site, as the registry stores it (`Slot::kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Kind {
    /// A call site: `static_call!(KEY)(args)`.
    Call = 0,
    /// A tail site: the body of a `static_call_fn!` wrapper.
    Tail = 1,
    /// A branch site: `static_branch!(KEY)`, `static_branch_likely!(KEY)`, `has_target!(KEY)`.
    Branch = 2,
    /// A run-time site: `key.call(args)` for a key known only at run time (`guard.rs`).
    RunTime = 3,
}

impl Kind {
    /// The kind stored as `n` (registry slots and trampoline entries hold only values written
    /// from a `Kind`).
    pub fn from_u32(n: u32) -> Kind {
        match n {
            0 => Kind::Call,
            1 => Kind::Tail,
            2 => Kind::Branch,
            3 => Kind::RunTime,
            _ => unreachable!("slot kind {n}"),
        }
    }
}

/// `Proof::aux[0]` of a branch site: its stub's address, with this bit set for a likely-true
/// site (user-space addresses never have it).
const LIKELY_TRUE: u64 = 1 << 63;

/// What a site's bytes proved: the quadword holding its five bytes, the value read there, and
/// what the patcher keeps about it (`Slot::aux`): nothing for a call site; for a branch site,
/// its stub (and whether it is likely-true, `LIKELY_TRUE`) and its label.
pub(crate) struct Proof {
    pub at: SiteWord,
    pub word: u64,
    pub aux: [u64; 2],
}

/// The five bytes a site of `kind` at `site` holds while unpatched (as compiled).
pub(crate) fn home(rt: &Runtime, kind: Kind, site: usize, aux: [u64; 2]) -> Insn {
    let what = match kind {
        Kind::Call => SiteInsn::Call(rt.trampoline),
        Kind::Tail => SiteInsn::Jmp(site + TAIL_BINDING),
        Kind::Branch => SiteInsn::Jmp((aux[0] & !LIKELY_TRUE) as usize),
        Kind::RunTime => SiteInsn::Call(rt.run_time_trampoline),
    };
    arch::encode(site, what).expect("a site's home within rel32 of it")
}

/// Whether a site of `kind` holding `insn` (`home` is its home) is *required*: its bytes do not
/// follow its key by themselves (a direct call, a NOP, `xor eax, eax`, a branch's `jmp LABEL`), so
/// it must be rewritten when its key changes, and an all-or-nothing operation must fail if it
/// cannot be. A site at home reaches its entry, which reads the key; a run-time site never is
/// (every form it takes reads the key's contents on every call: the trampoline, a guard stub,
/// `call [r11]`).
pub(crate) fn required(kind: Kind, insn: Insn, home: Insn) -> bool {
    kind != Kind::RunTime && insn != home
}

/// Checks that `site` is a site of `kind` in our own code, bound to `key` (a static key: call,
/// tail and branch sites have one, run-time sites none), and still as compiled.
pub(crate) fn prove(
    rt: &Runtime,
    kind: Kind,
    site: usize,
    key: Option<&RawKey>,
) -> Result<Proof, Reason> {
    match (kind, key) {
        (Kind::Call, Some(key)) => prove_call(rt, site, key),
        (Kind::Tail, Some(key)) => prove_tail(rt, site, key),
        (Kind::Branch, Some(key)) => prove_branch(rt, site, key),
        (Kind::RunTime, _) => prove_run_time(rt, site),
        (_, None) => Err(Reason::KeyNotProven),
    }
}

/// In which of an update's two phases (0, then 1, each with its own core sync) a site of `kind`
/// is written, and its key's part of the target published, when the key goes from `from` to
/// `to`.
///
/// A key whose branch sites switch on (a hook given a target) writes its calls first and its
/// branches second; one whose branches switch off writes its branches first and its calls
/// second. So at every moment, a branch that is on guards a call that calls the target (never
/// the NOP of a hook without one). Any other change is one phase. (Run-time sites are in no
/// key's list: an update never writes them.)
pub(crate) fn phase(kind: Kind, from: RawTarget, to: RawTarget) -> usize {
    let enabling = !from.branch_on() && to.branch_on();
    let disabling = from.branch_on() && !to.branch_on();
    match kind {
        Kind::Call | Kind::Tail | Kind::RunTime => usize::from(disabling),
        Kind::Branch => usize::from(enabling),
    }
}

/// What a proven site of `kind` should hold for `target`, and why that is its home, if it is: a
/// direct call if it reaches, else a call to the target's thunk if it has one
/// (`Thunks::make_for` ran for it first), else home.
pub(crate) fn wants(
    rt: &Runtime,
    kind: Kind,
    site: usize,
    aux: [u64; 2],
    target: RawTarget,
    thunks: &Thunks,
) -> (Insn, Option<Reason>) {
    let (what, via): (SiteInsn, fn(usize) -> SiteInsn) = match (kind, target) {
        (Kind::Call, RawTarget::Call(f)) => (SiteInsn::Call(f as usize), SiteInsn::Call),
        (Kind::Call, RawTarget::Null(_)) => (SiteInsn::Nop, SiteInsn::Call),
        (Kind::Call, RawTarget::Ret0(_)) => (SiteInsn::Ret0, SiteInsn::Call),
        (Kind::Tail, RawTarget::Call(f)) => (SiteInsn::Jmp(f as usize), SiteInsn::Jmp),
        (Kind::Tail, RawTarget::Null(_)) => (SiteInsn::Nop, SiteInsn::Jmp),
        (Kind::Tail, RawTarget::Ret0(_)) => (SiteInsn::Ret0, SiteInsn::Jmp),
        // Never LIVE: a call or tail site's proof binds a call key's address, never a branch
        // key's.
        (Kind::Call | Kind::Tail, RawTarget::Branch(_)) => {
            return (home(rt, kind, site, aux), None);
        }
        (Kind::Branch, target) => {
            let jumps = target.branch_on() != (aux[0] & LIKELY_TRUE != 0);
            let label = aux[1] as usize;
            let what = if jumps {
                SiteInsn::Jmp(label)
            } else {
                SiteInsn::Nop
            };
            (what, SiteInsn::Jmp)
        }
        // A run-time site has no key of its own: `guard::wants` decides what it holds.
        (Kind::RunTime, _) => return (home(rt, kind, site, aux), Some(Reason::NotASite)),
    };
    let via_thunk = || match (kind, target) {
        (Kind::Call | Kind::Tail, RawTarget::Call(f)) => {
            arch::encode(site, via(thunks.get(f as usize)?))
        }
        _ => None,
    };
    match arch::encode(site, what).or_else(via_thunk) {
        Some(insn) => (insn, None),
        None => (home(rt, kind, site, aux), Some(Reason::TargetOutOfRange)),
    }
}

/// The proof for a call site: its bytes, read from our own code, are `lea r11, [rip + key]`,
/// NOP padding and `call <trampoline>`, with the call inside one aligned quadword.
fn prove_call(rt: &Runtime, site: usize, key: &RawKey) -> Result<Proof, Reason> {
    read_and_prove(rt, site, key, PROLOGUE, arch::INSN_LEN, |code, start| {
        arch::prove_site(code, start, rt.trampoline as u64)
    })
}

/// The proof for a tail site: `jmp` to its binding inside one aligned quadword, `ret`, then the
/// binding: `lea r11, [rip + key]`, `lea r10, [rip + site]`, `jmp <tail entry>`.
fn prove_tail(rt: &Runtime, site: usize, key: &RawKey) -> Result<Proof, Reason> {
    read_and_prove(rt, site, key, 0, TAIL_CODE, |code, start| {
        arch::prove_tail_site(code, start, rt.tail_trampoline as u64)
    })
}

/// The proof for a run-time site: its five bytes, read from our own code, are `call <run-time
/// entry>`, inside one aligned quadword. There is no key to prove (see the module's table).
fn prove_run_time(rt: &Runtime, site: usize) -> Result<Proof, Reason> {
    let object = rt
        .object
        .as_ref()
        .ok_or(Reason::Disabled(Disabled::ObjectNotFound))?;
    let at = SiteWord::of(site).ok_or(Reason::NotASite)?;
    object
        .exec_segment(at.addr, at.addr + WORD)
        .ok_or(Reason::NotASite)?;
    // SAFETY: the quadword lies in one of our executable segments, which stay mapped (our own
    // object is pinned), and `at.addr` is 8-aligned.
    let word = unsafe { linux::read_word(at.addr) };
    arch::prove_run_time_site(&at.insn(word), site as u64, rt.run_time_trampoline as u64)?;
    Ok(Proof {
        at,
        word,
        aux: [0; 2],
    })
}

/// Reads `before` bytes before `site` and `after` from it, all inside our own code, checks that
/// the site's five bytes lie in one aligned quadword and are what was read, and has `prove`
/// say which key the code binds, which must be `key`, in our own object.
fn read_and_prove(
    rt: &Runtime,
    site: usize,
    key: &RawKey,
    before: usize,
    after: usize,
    prove: impl FnOnce(&[u8], u64) -> Result<u64, Reason>,
) -> Result<Proof, Reason> {
    let object = rt
        .object
        .as_ref()
        .ok_or(Reason::Disabled(Disabled::ObjectNotFound))?;
    let at = SiteWord::of(site).ok_or(Reason::NotASite)?;
    let start = site.checked_sub(before).ok_or(Reason::NotASite)?;
    let end = (site + after).max(at.addr + WORD);
    object.exec_segment(start, end).ok_or(Reason::NotASite)?;
    let mut code = [0u8; TAIL_CODE];
    let code = &mut code[..before + after];
    // SAFETY: [start, end) lies in one of our executable segments, which stay mapped (our own
    // object is pinned), and `at.addr` is 8-aligned.
    let word = unsafe {
        linux::read_code(start, code);
        linux::read_word(at.addr)
    };
    if code[before..before + arch::INSN_LEN] != at.insn(word) {
        return Err(Reason::ForeignBytes);
    }
    let bound = prove(code, start as u64)?;
    if bound != key.addr() as u64 || !object.holds_data(key.addr(), size_of::<RawKey>()) {
        return Err(Reason::KeyNotProven);
    }
    Ok(Proof {
        at,
        word,
        aux: [0; 2],
    })
}

/// The proof for a branch site: its five bytes, read from our own code, are `jmp <stub>`, and
/// the stub, in our own code too, is exactly the template `arch::prove_branch` checks, reaching
/// the branch entry and returning to this site. The key it binds must be the key the site was
/// registered with.
fn prove_branch(rt: &Runtime, site: usize, key: &RawKey) -> Result<Proof, Reason> {
    let object = rt
        .object
        .as_ref()
        .ok_or(Reason::Disabled(Disabled::ObjectNotFound))?;
    let at = SiteWord::of(site).ok_or(Reason::NotASite)?;
    object
        .exec_segment(at.addr, at.addr + WORD)
        .ok_or(Reason::NotASite)?;
    // SAFETY: `at.addr` is 8-aligned and inside one of our executable segments, which stay
    // mapped (our own object is pinned).
    let word = unsafe { linux::read_word(at.addr) };
    let insn = at.insn(word);
    let stub = arch::branch_stub(&insn, site as u64).ok_or(Reason::NotASite)? as usize;
    let end = stub.checked_add(STUB_LEN).ok_or(Reason::NotASite)?;
    object.exec_segment(stub, end).ok_or(Reason::NotASite)?;
    let mut code = [0u8; STUB_LEN];
    // SAFETY: [stub, end) lies in one of our executable segments, which stay mapped.
    unsafe { linux::read_code(stub, &mut code) };
    let proven = arch::prove_branch(&insn, site as u64, &code, crate::branch::entry() as u64)?;
    if proven.key != key.addr() as u64 || !object.holds_data(key.addr(), size_of::<RawKey>()) {
        return Err(Reason::KeyNotProven);
    }
    // The label is our code too (the compiler's, inside the same function).
    let label = proven.label as usize;
    object
        .exec_segment(label, label + 1)
        .ok_or(Reason::NotASite)?;
    let likely = if proven.likely_true { LIKELY_TRUE } else { 0 };
    Ok(Proof {
        at,
        word,
        aux: [proven.stub | likely, proven.label],
    })
}
