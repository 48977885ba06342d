//! The kinds of site, and everything that tells them apart: the trampoline entry each kind is
//! compiled to reach, what its bytes must prove before it is ever written, the five bytes it
//! holds while unpatched ("home"), and the five bytes it holds for each target. The patcher
//! (`patcher.rs`) runs the same state table for every kind and asks this module, and only this
//! module, what differs.
//!
//! | kind | entry it calls | home | proof (`arch::x86_64`) | for `f` / null / return-zero |
//! |---|---|---|---|---|
//! | `Call`: `static_call!(KEY)(..)` | `static_call_trampoline_v*` | `call <entry>` | `prove_site`: `lea r11, [rip + KEY]`, NOPs, `call <entry>` | `call f` (or its thunk) / NOP5 / RET0 |
//! | `Tail`: `static_call_fn!` | `static_call_tail_trampoline_v*` | `jmp <entry>` | `prove_tail_site`: `lea r11, [rip + KEY]`, `lea r10, [rip + site]`, NOPs, `jmp <entry>`, `ret` | `jmp f` (or its thunk) / NOP5 / RET0, each followed by the `ret` |
//! | `RunTime`: `key.call(..)`, `key.call_guarded(..)` | `static_call_run_time_trampoline_v*` | `call <entry>` | `prove_run_time_site`: `call <entry>`, and nothing about a key | not by target: `call <guard stub>` or the indirect call `call [r11]` (`guard.rs`) |
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
    self as arch, Insn, PROLOGUE, SiteInsn, SiteWord, TAIL_CODE, TAIL_PROLOGUE, WORD,
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
    /// A run-time site: `key.call(args)` for a key known only at run time (`guard.rs`).
    RunTime = 2,
}

impl Kind {
    /// The kind stored as `n` (registry slots and trampoline entries hold only values written
    /// from a `Kind`).
    pub fn from_u32(n: u32) -> Kind {
        match n {
            1 => Kind::Tail,
            2 => Kind::RunTime,
            _ => Kind::Call,
        }
    }
}

/// What a site's bytes proved: the quadword holding its five bytes, the value read there, and
/// what the patcher keeps about it (`Slot::aux`; unused by `Call` sites).
pub(crate) struct Proof {
    pub at: SiteWord,
    pub word: u64,
    pub aux: [u64; 2],
}

/// The five bytes a site of `kind` at `site` holds while unpatched (as compiled).
pub(crate) fn home(rt: &Runtime, kind: Kind, site: usize, _aux: [u64; 2]) -> Insn {
    let entry = match kind {
        Kind::Call => SiteInsn::Call(rt.trampoline),
        Kind::Tail => SiteInsn::Jmp(rt.tail_trampoline),
        Kind::RunTime => SiteInsn::Call(rt.run_time_trampoline),
    };
    arch::encode(site, entry).expect("trampoline within rel32 of its sites")
}

/// Whether a site of `kind` holding `insn` (`home` is its home) is *required*: its bytes do not
/// follow its key by themselves (a direct call, a NOP, `xor eax, eax`), so it must be rewritten
/// when its key changes, and an all-or-nothing operation must fail if it cannot be. A site at
/// home reaches the trampoline, which reads the key; a run-time site never is (every form it
/// takes reads the key's contents on every call: the trampoline, a guard stub, `call [r11]`).
pub(crate) fn required(kind: Kind, insn: Insn, home: Insn) -> bool {
    kind != Kind::RunTime && insn != home
}

/// Checks that `site` is a site of `kind` in our own code, bound to `key` (a static key: call
/// and tail sites have one, run-time sites none), and still as compiled.
pub(crate) fn prove(
    rt: &Runtime,
    kind: Kind,
    site: usize,
    key: Option<&RawKey>,
) -> Result<Proof, Reason> {
    match (kind, key) {
        (Kind::Call, Some(key)) => prove_call(rt, site, key),
        (Kind::Tail, Some(key)) => prove_tail(rt, site, key),
        (Kind::RunTime, _) => prove_run_time(rt, site),
        (_, None) => Err(Reason::KeyNotProven),
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
        // A run-time site has no key of its own: `guard::wants` decides what it holds.
        (Kind::RunTime, _) => return (home(rt, kind, site, aux), Some(Reason::NotASite)),
    };
    let via_thunk = || match target {
        RawTarget::Call(f) => arch::encode(site, via(thunks.get(f as usize)?)),
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

/// The proof for a tail site: `lea r11, [rip + key]`, `lea r10, [rip + site]`, NOP padding,
/// `jmp <tail entry>` inside one aligned quadword, and `ret`.
fn prove_tail(rt: &Runtime, site: usize, key: &RawKey) -> Result<Proof, Reason> {
    read_and_prove(
        rt,
        site,
        key,
        TAIL_PROLOGUE,
        arch::INSN_LEN + 1,
        |code, start| arch::prove_tail_site(code, start, rt.tail_trampoline as u64),
    )
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
