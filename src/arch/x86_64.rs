//! x86-64 instruction encoding for static-call sites: what the five bytes of a site can be, and
//! the proof that a piece of code is one of our sites and which key it binds.
//!
//! A site, as `site.rs` emits it:
//!
//! ```text
//! C - 7 - p:  4C 8D 1D d32     lea  r11, [rip + KEY]   the key binding (7 bytes)
//! C - p:      <p bytes of NOP> padding, 0 <= p <= 4    `.p2align 3,,4`, chosen by the assembler
//! C:          E8 r32           call <trampoline>       C = 0..=3 (mod 8): the aligned quadword
//!                                                      holding C holds the whole call
//! ```
//!
//! `.p2align 3,,4` aligns the call to 8 only when that costs at most 4 bytes of padding, so the
//! call starts at offset 0, 1, 2 or 3 of its quadword, and its five bytes always fit in it. Half
//! the sites need no padding at all (a plain `.p2align 3` would pad 7 sites in 8).
//!
//! A tail site, as `static_call_fn!` emits it (a whole naked function):
//!
//! ```text
//! J - 14 - p: 4C 8D 1D d32     lea  r11, [rip + KEY]   the key binding (7 bytes)
//! J - 7 - p:  4C 8D 15 d32     lea  r10, [rip + J]     the site's own address, for the entry
//! J - p:      <p bytes of NOP> padding, 0 <= p <= 4
//! J:          E9 r32           jmp  <tail entry>       J = 0..=3 (mod 8)
//! J + 5:      C3               ret                     reached when the jmp is a NOP or `xor`
//! ```
//!
//! A run-time site, as `key.call(args)` emits it (`guard.rs`), where the compiler put the key's
//! address in r11 before the block (so nothing in the bytes binds a key):
//!
//! ```text
//! R - p:      <p bytes of NOP> padding, 0 <= p <= 4
//! R:          E8 r32           call <run-time entry>   R = 0..=3 (mod 8)
//! ```
//!
//! Only the five bytes at `C` (or `J`, or `R`) are ever rewritten, and always into one
//! instruction of five bytes (never two: a thread preempted between two instructions would
//! resume inside the next rewrite's rel32). A run-time site becomes `call <guard stub>` or the
//! indirect call through its key, `call qword ptr [r11 + 0]` ([`INDIRECT`]).

use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind, Register};

use crate::diagnostics::Reason;

/// Length of every instruction a site can hold.
pub const INSN_LEN: usize = 5;
/// Length of the key binding `lea r11, [rip + disp32]`.
const LEA_LEN: usize = 7;
/// Most padding `.p2align 3,,4` puts between the `lea` and the `call`.
const MAX_PAD: usize = 4;
/// Bytes the verifier reads before the call: the longest `lea` + padding.
pub const PROLOGUE: usize = LEA_LEN + MAX_PAD;
/// Where a tail site's binding starts, counted from the site: after its five bytes and the `ret`.
/// The site's home is `jmp` there.
pub const TAIL_BINDING: usize = INSN_LEN + 1;
/// Bytes the verifier reads of a tail site, from the site: its five bytes, the `ret`, and the
/// binding (`lea r11, [rip + key]`, `lea r10, [rip + site]`, `jmp <tail entry>`).
pub const TAIL_CODE: usize = TAIL_BINDING + 2 * LEA_LEN + INSN_LEN;
/// Size (and alignment) of the word that is swapped to rewrite a site.
pub const WORD: usize = 8;

/// Five bytes of code.
pub type Insn = [u8; INSN_LEN];

/// `nopl 0x0(%rax,%rax,1)`: what a site of a key with no target becomes.
pub const NOP5: Insn = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `cs cs cs xor eax, eax`: one instruction that returns 0 in rax (a 32-bit `xor` clears the
/// upper half too), for a key set to return zero. The redundant prefixes pad it to five bytes,
/// as the kernel does: it must stay one instruction.
pub const RET0: Insn = [0x2e, 0x2e, 0x2e, 0x31, 0xc0];

/// `call qword ptr [r11 + 0]` (REX.B, FF /2, a SIB with no index, disp8 0): one 5-byte
/// instruction that calls the function a key holds, r11 being the key's address at every site.
/// What a run-time site with too many targets becomes in a normal build (`guard.rs`): a plain
/// indirect call, as `key.call` was before it had guard stubs.
pub const INDIRECT: Insn = [0x41, 0xff, 0x54, 0x23, 0x00];

/// What a site's five bytes do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteInsn {
    /// `call dest`.
    Call(usize),
    /// `jmp dest`: a tail site's target, or the label of a branch site that takes its branch.
    Jmp(usize),
    /// Nothing (a key with no target).
    Nop,
    /// `rax = 0` (a key that returns zero).
    Ret0,
    /// `call qword ptr [r11]`: whatever the key in r11 holds (a megamorphic run-time site).
    CallKey,
}

/// The one table of transforms: the bytes that make the site at `site` do `what`, or `None` if
/// that cannot be encoded there (a call target beyond a rel32).
pub fn encode(site: usize, what: SiteInsn) -> Option<Insn> {
    match what {
        SiteInsn::Call(dest) => rel32(0xe8, site, dest),
        SiteInsn::Jmp(dest) => rel32(0xe9, site, dest),
        SiteInsn::Nop => Some(NOP5),
        SiteInsn::Ret0 => Some(RET0),
        SiteInsn::CallKey => Some(INDIRECT),
    }
}

/// `opcode rel32` at `site` reaching `dest`, if it reaches.
fn rel32(opcode: u8, site: usize, dest: usize) -> Option<Insn> {
    let rel = i32::try_from((dest as i64).wrapping_sub(site as i64 + INSN_LEN as i64)).ok()?;
    let r = rel.to_le_bytes();
    Some([opcode, r[0], r[1], r[2], r[3]])
}

/// Length of a near thunk (one per far target, see `thunks.rs`).
pub const THUNK_LEN: usize = 16;

/// A near thunk at `at`: the bytes that jump to `target` from anywhere, for sites whose
/// `call rel32` cannot reach it.
///
/// - Normally `jmp qword ptr [rip + 0]` (6 bytes), which reads the absolute address stored right
///   after it (8 bytes), and two `int3`.
/// - In a retpoline build (`retpoline` is the address of the retpoline thunk for r10), an
///   indirect jump must not be written by hand: `mov r10, imm64` (10 bytes) and `jmp rel32` to
///   the retpoline thunk (5 bytes), and one `int3`. r10 is neither an argument nor callee-saved,
///   and the trampoline clobbers it too. `None` if the retpoline thunk is out of rel32 reach.
///
/// Either way 16 bytes, so that thunks never share a 16-byte fetch block and nothing falls
/// through, and stack-neutral (the pool's fixed CFI describes it, see `code_pool.rs`).
pub fn thunk(at: usize, target: usize, retpoline: Option<usize>) -> Option<[u8; THUNK_LEN]> {
    let mut t = [0xcc; THUNK_LEN];
    match retpoline {
        None => {
            t[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
            t[6..14].copy_from_slice(&(target as u64).to_le_bytes());
        }
        Some(thunk) => {
            t[..2].copy_from_slice(&MOV_R10_IMM64);
            t[2..10].copy_from_slice(&(target as u64).to_le_bytes());
            t[10..15].copy_from_slice(&rel32(0xe9, at + 10, thunk)?);
        }
    }
    Some(t)
}

/// `mov r10, imm64` (REX.W REX.B, B8+2), followed by the 8 bytes of the immediate.
const MOV_R10_IMM64: [u8; 2] = [0x49, 0xba];
/// `cmp qword ptr [r11], r10` (REX.W REX.R REX.B, 39 /r, ModRM 00 010 011).
const CMP_KEY_R10: [u8; 3] = [0x4d, 0x39, 0x13];
/// Length of one entry of a guard stub: `mov r10, imm64` (10), `cmp qword ptr [r11], r10` (3),
/// `je rel32` (6).
pub const GUARD_ENTRY_LEN: usize = 19;
/// Length of a guard stub's miss path: `jmp rel32` to the run-time entry.
pub const GUARD_MISS_LEN: usize = 5;
/// Alignment (and size granule) of guard stubs and thunks in the code pool.
pub const CODE_ALIGN: usize = 16;

/// Bytes a guard stub of `entries` entries takes in the code pool.
pub const fn guard_stub_len(entries: usize) -> usize {
    (entries * GUARD_ENTRY_LEN + GUARD_MISS_LEN).next_multiple_of(CODE_ALIGN)
}

/// A guard stub at `at`, for a run-time site (`guard.rs`): for each `(target, dest)` of
/// `entries`, in order, "if the key in r11 holds `target`, jump to `dest`" (the target itself,
/// or its near thunk); if none matches, jump to `miss` (the run-time entry of the trampoline).
///
/// ```text
///     mov  r10, T1                    49 BA imm64
///     cmp  qword ptr [r11], r10       4D 39 13        the key's *current* target, read now
///     je   dest1                      0F 84 rel32
///     ...                             (one entry per target)
///     jmp  miss                       E9 rel32
///     int3 ...                        to a multiple of 16 bytes
/// ```
///
/// Each entry compares the key's contents, never its address: the stub jumps to `target` only
/// if the key holds `target` at that moment, whichever key r11 names (a static, one on the heap,
/// one replaced in place, a freed key whose address was reused). It changes nothing but r10 and
/// the flags, neither of which a call preserves, and never touches the stack. `None` if a `je`
/// or the `jmp` does not reach its destination with a rel32.
pub fn guard_stub(at: usize, entries: &[(usize, usize)], miss: usize) -> Option<Vec<u8>> {
    let mut code = Vec::with_capacity(guard_stub_len(entries.len()));
    for &(target, dest) in entries {
        code.extend_from_slice(&MOV_R10_IMM64);
        code.extend_from_slice(&(target as u64).to_le_bytes());
        code.extend_from_slice(&CMP_KEY_R10);
        // `je rel32` is 6 bytes (0F 84): the rel32 counts from its end.
        let je_end = at + code.len() + 6;
        let rel = i32::try_from((dest as i64).wrapping_sub(je_end as i64)).ok()?;
        code.extend_from_slice(&[0x0f, 0x84]);
        code.extend_from_slice(&rel.to_le_bytes());
    }
    code.extend_from_slice(&rel32(0xe9, at + code.len(), miss)?);
    code.resize(guard_stub_len(entries.len()), 0xcc);
    Some(code)
}

/// Whether a `call rel32` anywhere in `[lo, hi)` reaches every byte of `[to, to + len)`: the
/// reach of a site of an object whose code spans `[lo, hi)`.
pub fn reaches(lo: usize, hi: usize, to: usize, len: usize) -> bool {
    let span_lo = lo.min(to);
    let span_hi = hi.max(to.saturating_add(len));
    // The rel32 of a call at `s` counts from `s + 5`; a span under 2^31 - 5 always fits.
    span_hi - span_lo < (1usize << 31) - INSN_LEN
}

/// The aligned quadword holding a site's five bytes, and where in it they start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteWord {
    /// Address of the quadword (8-aligned).
    pub addr: usize,
    offset: usize,
}

impl SiteWord {
    /// The quadword of the call at `site`, or `None` if the five bytes would cross into the next
    /// quadword (then the site cannot be rewritten with one swap, and is not one of ours).
    pub fn of(site: usize) -> Option<SiteWord> {
        let offset = site % WORD;
        (offset + INSN_LEN <= WORD).then_some(SiteWord {
            addr: site - offset,
            offset,
        })
    }

    /// Where in the quadword the five bytes start (0..=3).
    pub fn offset(self) -> usize {
        self.offset
    }

    /// The site's five bytes in the quadword's value `word` (little-endian).
    pub fn insn(self, word: u64) -> Insn {
        let b = word.to_le_bytes();
        b[self.offset..self.offset + INSN_LEN]
            .try_into()
            .expect("five bytes")
    }

    /// `word` with the site's five bytes replaced by `insn`, the other three unchanged.
    pub fn with(self, word: u64, insn: Insn) -> u64 {
        let mut b = word.to_le_bytes();
        b[self.offset..self.offset + INSN_LEN].copy_from_slice(&insn);
        u64::from_le_bytes(b)
    }
}

/// Packs five bytes into the low 40 bits of a u64, for storing.
pub fn pack(insn: Insn) -> u64 {
    let mut b = [0; WORD];
    b[..INSN_LEN].copy_from_slice(&insn);
    u64::from_le_bytes(b)
}

/// The five bytes `pack` stored in the low 40 bits of `v`.
pub fn unpack(v: u64) -> Insn {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4]]
}

/// Proves that `code` is one of our call sites and returns the key it binds.
///
/// `code` holds the `PROLOGUE` bytes before the call followed by the five bytes of the call; its
/// first byte is at address `start`. The proof:
/// 1. the five bytes at the end are `call trampoline`;
/// 2. for exactly one padding length `p` in 0..=7, the bytes before the call decode as
///    `lea r11, [rip + disp32]` followed by nothing but NOPs up to the call.
///
/// Exactly one: if two paddings decode, the bytes are ambiguous and prove nothing. An asm block
/// is indivisible (the compiler cannot jump into it), so a proven `lea` is the one every
/// execution of this `call` has just run, and r11 holds the address it computes.
///
/// What this relies on: decoding backwards from the call, it assumes the `lea` starts an
/// instruction, which our asm block guarantees (it starts there). Hand-written assembly that
/// calls the hidden trampoline could hide these bytes inside a longer instruction (a
/// `mov r11, [rip + x]` whose displacement bytes spell a `lea`); `tests/verifier.rs` shows one.
/// No backward decoder can tell; that code is outside the contract (see docs/safety.md).
pub fn prove_site(code: &[u8], start: u64, trampoline: u64) -> Result<u64, Reason> {
    if code.len() != PROLOGUE + INSN_LEN {
        return Err(Reason::NotASite);
    }
    let call_at = start.checked_add(PROLOGUE as u64).ok_or(Reason::NotASite)?;
    let call = decode_one(&code[PROLOGUE..], call_at).ok_or(Reason::NotASite)?;
    if call.code() != Code::Call_rel32_64 || call.near_branch64() != trampoline {
        return Err(Reason::NotASite);
    }
    let mut proven = None;
    for pad in 0..=MAX_PAD {
        let from = PROLOGUE - LEA_LEN - pad;
        if let Some(key) = key_binding(&code[from..PROLOGUE], start + from as u64) {
            if proven.is_some() {
                return Err(Reason::KeyNotProven);
            }
            proven = Some(key);
        }
    }
    proven.ok_or(Reason::KeyNotProven)
}

/// Proves that `code` is one of our tail sites (`static_call_fn!`), unpatched, and returns the
/// key it binds.
///
/// `code` holds the `TAIL_CODE` bytes from the site, which is at address `start` (the wrapper's
/// first instruction, after at most 4 bytes of padding). The proof:
/// 1. the five bytes are `jmp start + TAIL_BINDING` (`E9` and a rel32 of 1), and the byte after
///    them is `ret`;
/// 2. at `start + TAIL_BINDING`: `lea r11, [rip + disp32]` (the key), `lea r10, [rip + disp32]`
///    computing `start`, and `jmp entry`, the tail entry, which only a tail site's binding jumps
///    to (a call site calls the call entry; a branch stub calls the branch entry).
///
/// The binding follows a `ret` and is reached only from the site's own `jmp`; a naked function
/// is entered only at its first instruction, the site. Once patched, the site jumps to the
/// target directly and the binding is dead code, kept for the trampoline.
pub fn prove_tail_site(code: &[u8], start: u64, entry: u64) -> Result<u64, Reason> {
    if code.len() != TAIL_CODE {
        return Err(Reason::NotASite);
    }
    let binding = start
        .checked_add(TAIL_BINDING as u64)
        .ok_or(Reason::NotASite)?;
    let home = decode_one(&code[..INSN_LEN], start).ok_or(Reason::NotASite)?;
    if home.code() != Code::Jmp_rel32_64
        || home.near_branch64() != binding
        || code[INSN_LEN] != 0xc3
    {
        return Err(Reason::NotASite);
    }
    let lea_r10 = TAIL_BINDING + LEA_LEN;
    let jmp_at = lea_r10 + LEA_LEN;
    let jmp = decode_one(&code[jmp_at..], start + jmp_at as u64).ok_or(Reason::NotASite)?;
    if jmp.code() != Code::Jmp_rel32_64 || jmp.near_branch64() != entry {
        return Err(Reason::NotASite);
    }
    let key = lea_rip(&code[TAIL_BINDING..lea_r10], binding, Register::R11)
        .ok_or(Reason::KeyNotProven)?;
    if lea_rip(
        &code[lea_r10..jmp_at],
        start + lea_r10 as u64,
        Register::R10,
    ) != Some(start)
    {
        return Err(Reason::KeyNotProven);
    }
    Ok(key)
}

/// Proves that the five bytes `code` at address `start` are an unpatched run-time site: exactly
/// `call entry`, `entry` being the run-time entry of the trampoline, which only run-time sites
/// call (and guard stubs jump to).
///
/// There is no key to prove: a run-time site's r11 is computed outside its asm block, so the
/// site may see any key, and it is only ever written into a guard stub (which checks the key's
/// contents on every call) or an indirect call through r11 (which reads them). What matters is
/// the other direction: the static proof (`prove_site`) requires the static entry, so it never
/// accepts a run-time site, even one that LLVM gave a `lea r11` of a static key right in front
/// (two run-time keys' loads merged in front of one call).
pub fn prove_run_time_site(code: &[u8], start: u64, entry: u64) -> Result<(), Reason> {
    let call = decode_one(code, start).ok_or(Reason::NotASite)?;
    if code.len() != INSN_LEN || call.code() != Code::Call_rel32_64 || call.near_branch64() != entry
    {
        return Err(Reason::NotASite);
    }
    Ok(())
}

/// Where the five bytes `insn` at `site` call, if they are a `call rel32`.
pub fn call_destination(site: usize, insn: Insn) -> Option<usize> {
    let call = decode_one(&insn, site as u64)?;
    (call.code() == Code::Call_rel32_64).then(|| call.near_branch64() as usize)
}

/// If `bytes` (at address `ip`) are exactly `lea r11, [rip + disp32]` then NOPs to the end,
/// the address the `lea` computes.
fn key_binding(bytes: &[u8], ip: u64) -> Option<u64> {
    let key = lea_rip(bytes.get(..LEA_LEN)?, ip, Register::R11)?;
    only_nops(&bytes[LEA_LEN..], ip + LEA_LEN as u64).then_some(key)
}

/// If `bytes` (at address `ip`) are exactly one `lea reg, [rip + disp32]`, the address it
/// computes.
fn lea_rip(bytes: &[u8], ip: u64, reg: Register) -> Option<u64> {
    let lea = decode_one(bytes, ip)?;
    let is_lea = lea.code() == Code::Lea_r64_m
        && lea.len() == LEA_LEN
        && lea.op0_register() == reg
        && lea.op1_kind() == OpKind::Memory
        && lea.is_ip_rel_memory_operand()
        && lea.memory_index() == Register::None;
    is_lea.then(|| lea.ip_rel_memory_address())
}

/// Whether `bytes` (at address `ip`) decode as nothing but NOPs (or are empty).
fn only_nops(bytes: &[u8], ip: u64) -> bool {
    let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    while decoder.can_decode() {
        let pad = decoder.decode();
        if pad.is_invalid() || pad.mnemonic() != Mnemonic::Nop {
            return false;
        }
    }
    // `can_decode` is false exactly when every byte was consumed; an instruction running past
    // the end would have decoded as invalid above.
    true
}

/// A branch site's out-of-line stub, as `branch.rs` emits it (`STUB_LEN` bytes at `S`):
///
/// ```text
/// S + 0:   41 53           push r11
/// S + 2:   4C 8D 1D d32    lea  r11, [rip + KEY]    the key binding
/// S + 9:   E8 r32          call <branch entry>      returns the key's state in ZF (1 = off)
/// S + 14:  41 5B           pop  r11
/// S + 16:  0F 85 r32       jnz  LABEL               likely-false sites; `0F 84` (jz) for likely-true
/// S + 22:  E9 r32          jmp  SITE + 5            back to the fall-through path
/// ```
///
/// and the site itself is the five bytes `E9 rel32` (`jmp S`) inside one aligned quadword.
pub const STUB_LEN: usize = 27;
/// Offset in the stub of the instruction the branch entry returns to (`pop r11`).
pub const STUB_RET: usize = 14;

/// What the bytes of a branch site and its stub prove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchSite {
    /// The key the stub's `lea` binds.
    pub key: u64,
    /// Where the site jumps when it takes its branch: the `jcc` target.
    pub label: u64,
    /// The stub (the site's home is `jmp stub`).
    pub stub: u64,
    /// Likely-true: the fall-through is the *on* path and the stub's `jcc` is `jz` (to the off
    /// path). Likely-false (the default): fall-through off, `jnz` to the on path.
    pub likely_true: bool,
}

/// The address of the stub a branch site at `site` jumps to while unpatched, if its five bytes
/// `insn` are a `jmp rel32`.
pub fn branch_stub(insn: &Insn, site: u64) -> Option<u64> {
    let jmp = decode_one(insn, site)?;
    (jmp.code() == Code::Jmp_rel32_64).then(|| jmp.near_branch64())
}

/// Proves that `insn` (the five bytes at `site`) and `stub` (the `STUB_LEN` bytes at
/// `branch_stub(insn, site)`) are one of our branch sites as compiled, reaching the branch
/// entry `entry`, and returns what they bind.
///
/// Every instruction of the stub is decoded and must be exactly the template above: its
/// `call` must reach `entry` (which only branch stubs call: a call site's `call <trampoline>`
/// fails step one here, a branch site fails the call proof's), and its last `jmp` must return to
/// `site + 5`, so the stub belongs to this very site. Then a patched site does what the stub
/// does for the key's state: `jmp LABEL` is the `jcc` taken, a NOP5 the `jmp site + 5`.
///
/// As for call sites, an asm block is indivisible: the compiler never jumps into the stub, so
/// every execution of the site's `jmp` runs the proven `lea` and `jcc`.
pub fn prove_branch(insn: &Insn, site: u64, stub: &[u8], entry: u64) -> Result<BranchSite, Reason> {
    let at = branch_stub(insn, site).ok_or(Reason::NotASite)?;
    if stub.len() != STUB_LEN {
        return Err(Reason::NotASite);
    }
    let mut decoder = Decoder::with_ip(64, stub, at, DecoderOptions::NONE);
    // The next instruction if it is `code`, `len` bytes long (`Code::INVALID`: whatever it is).
    let mut next = |code: Code, len: usize| {
        let insn = decoder.decode();
        let wanted = code == Code::INVALID || (insn.code() == code && insn.len() == len);
        (!insn.is_invalid() && wanted).then_some(insn)
    };
    let push = next(Code::Push_r64, 2).filter(|i| i.op0_register() == Register::R11);
    push.ok_or(Reason::NotASite)?;
    let lea = next(Code::Lea_r64_m, LEA_LEN).ok_or(Reason::NotASite)?;
    let call = next(Code::Call_rel32_64, INSN_LEN).filter(|c| c.near_branch64() == entry);
    call.ok_or(Reason::NotASite)?;
    let pop = next(Code::Pop_r64, 2).filter(|i| i.op0_register() == Register::R11);
    pop.ok_or(Reason::NotASite)?;
    let jcc = next(Code::INVALID, 0).unwrap_or_else(iced_x86::Instruction::default);
    let likely_true = match (jcc.code(), jcc.len()) {
        (Code::Jne_rel32_64, 6) => false,
        (Code::Je_rel32_64, 6) => true,
        _ => return Err(Reason::NotASite),
    };
    let back = next(Code::Jmp_rel32_64, INSN_LEN).filter(|j| j.near_branch64() == site + 5);
    back.ok_or(Reason::NotASite)?;
    let binds = lea.op0_register() == Register::R11
        && lea.is_ip_rel_memory_operand()
        && lea.memory_index() == Register::None;
    if !binds {
        return Err(Reason::KeyNotProven);
    }
    Ok(BranchSite {
        key: lea.ip_rel_memory_address(),
        label: jcc.near_branch64(),
        stub: at,
        likely_true,
    })
}

/// The site a branch stub belongs to, from the bytes `tail` that follow the stub's `call` (the
/// branch entry's return address is `ret`): `pop r11`, a `jcc rel32` and `jmp site + 5`. Byte
/// matching only (no decoder): the branch entry's slow path runs this, in any context.
pub fn branch_site_of(tail: &[u8; STUB_LEN - STUB_RET], ret: usize) -> Option<usize> {
    let jcc_ok = tail[2] == 0x0f && (tail[3] == 0x85 || tail[3] == 0x84);
    if tail[..2] != [0x41, 0x5b] || !jcc_ok || tail[8] != 0xe9 {
        return None;
    }
    let rel = i32::from_le_bytes(tail[9..13].try_into().expect("four bytes"));
    let end = ret.wrapping_add(tail.len());
    end.wrapping_add(rel as isize as usize)
        .checked_sub(INSN_LEN)
}

/// Decodes exactly one instruction that spans all of `bytes`.
fn decode_one(bytes: &[u8], ip: u64) -> Option<iced_x86::Instruction> {
    let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let insn = decoder.decode();
    (!insn.is_invalid() && insn.len() == bytes.len()).then_some(insn)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRAMP: u64 = 0x40_0000;

    /// Builds lea + `pad` padding + call trampoline, with the call at `call_at`.
    fn site(call_at: u64, key: u64, pad: &[u8]) -> (Vec<u8>, u64) {
        let start = call_at - PROLOGUE as u64;
        let lea_at = call_at - pad.len() as u64 - LEA_LEN as u64;
        let disp = (key as i64 - (lea_at as i64 + LEA_LEN as i64)) as i32;
        let mut code = vec![0xcc; PROLOGUE - LEA_LEN - pad.len()];
        code.extend_from_slice(&[0x4c, 0x8d, 0x1d]);
        code.extend_from_slice(&disp.to_le_bytes());
        code.extend_from_slice(pad);
        code.extend_from_slice(&encode(call_at as usize, SiteInsn::Call(TRAMP as usize)).unwrap());
        (code, start)
    }

    #[test]
    fn proves_every_padding_llvm_emits() {
        let pads: [&[u8]; 5] = [
            &[],
            &[0x90],
            &[0x66, 0x90],
            &[0x0f, 0x1f, 0x00],
            &[0x0f, 0x1f, 0x40, 0x00],
        ];
        for pad in pads {
            let (code, start) = site(0x50_0000, 0x60_1234, pad);
            assert_eq!(
                prove_site(&code, start, TRAMP),
                Ok(0x60_1234),
                "pad {pad:x?}"
            );
        }
    }

    #[test]
    fn rejects_wrong_call_or_binding() {
        let (mut code, start) = site(0x50_0000, 0x60_1234, &[0x90]);
        assert_eq!(prove_site(&code, start, TRAMP + 1), Err(Reason::NotASite));
        // int3 over the call
        let mut b = code.clone();
        b[PROLOGUE] = 0xcc;
        assert_eq!(prove_site(&b, start, TRAMP), Err(Reason::NotASite));
        // lea into r10 instead of r11
        code[PROLOGUE - 8] = 0x4c;
        code[PROLOGUE - 6] = 0x15;
        assert_eq!(prove_site(&code, start, TRAMP), Err(Reason::KeyNotProven));
        // padding that is not a NOP
        let (mut code, start) = site(0x50_0000, 0x60_1234, &[0x90]);
        code[PROLOGUE - 1] = 0x50; // push rax
        assert_eq!(prove_site(&code, start, TRAMP), Err(Reason::KeyNotProven));
    }

    #[test]
    fn encodes_calls_within_rel32_only() {
        let site = 0x7f00_0000_0000usize;
        assert_eq!(
            encode(site, SiteInsn::Call(site + 5)),
            Some([0xe8, 0, 0, 0, 0])
        );
        assert_eq!(
            encode(site, SiteInsn::Call(site)),
            Some([0xe8, 0xfb, 0xff, 0xff, 0xff])
        );
        let far = site + 5 + i32::MAX as usize + 1;
        assert_eq!(encode(site, SiteInsn::Call(far)), None);
        assert!(encode(site, SiteInsn::Call(far - 1)).is_some());
        let near_low = site + 5 - (1usize << 31);
        assert!(encode(site, SiteInsn::Call(near_low)).is_some());
        assert_eq!(encode(site, SiteInsn::Call(near_low - 1)), None);
        for dest in [site + 5, site, far - 1, near_low] {
            let call = encode(site, SiteInsn::Call(dest)).unwrap();
            let jmp = encode(site, SiteInsn::Jmp(dest)).unwrap();
            assert_eq!(
                (jmp[0], &jmp[1..]),
                (0xe9, &call[1..]),
                "same rel32, jmp opcode"
            );
            let decoded = decode_one(&jmp, site as u64).expect("one 5-byte instruction");
            assert_eq!(
                (decoded.code(), decoded.near_branch64()),
                (Code::Jmp_rel32_64, dest as u64)
            );
        }
        assert_eq!(encode(site, SiteInsn::Jmp(far)), None);
    }

    #[test]
    fn nop_and_ret0_are_single_five_byte_instructions() {
        for (insn, mnemonic) in [(NOP5, Mnemonic::Nop), (RET0, Mnemonic::Xor)] {
            let decoded =
                decode_one(&insn, 0x1000).expect("one instruction spanning all five bytes");
            assert_eq!(decoded.mnemonic(), mnemonic);
        }
        let xor = decode_one(&RET0, 0).unwrap();
        assert_eq!(
            (xor.op0_register(), xor.op1_register()),
            (Register::EAX, Register::EAX)
        );
        assert_eq!(encode(0x5000, SiteInsn::Nop), Some(NOP5));
        assert_eq!(encode(0x5000, SiteInsn::Ret0), Some(RET0));
    }

    #[test]
    fn a_thunk_is_one_rip_relative_jump_through_the_target_it_holds() {
        let target = 0x7f12_3456_789a_usize;
        let at = 0x5555_0000_1000_u64;
        let t = thunk(at as usize, target, None).unwrap();
        let jmp = decode_one(&t[..6], at).expect("one 6-byte instruction");
        assert_eq!(jmp.code(), Code::Jmp_rm64);
        assert!(jmp.is_ip_rel_memory_operand());
        assert_eq!(
            jmp.ip_rel_memory_address(),
            at + 6,
            "reads the quadword after it"
        );
        assert_eq!(
            u64::from_le_bytes(t[6..14].try_into().unwrap()),
            target as u64
        );
        assert_eq!(&t[14..], &[0xcc, 0xcc]);
    }

    #[test]
    fn a_retpoline_thunk_loads_the_target_into_r10_and_jumps_to_the_retpoline() {
        let (at, target, retpoline) = (
            0x5555_0000_1000usize,
            0x7f12_3456_789ausize,
            0x5555_0000_0040,
        );
        let t = thunk(at, target, Some(retpoline)).unwrap();
        let mut d = Decoder::with_ip(64, &t, at as u64, DecoderOptions::NONE);
        let (mov, jmp) = (d.decode(), d.decode());
        assert_eq!(mov.code(), Code::Mov_r64_imm64);
        assert_eq!(
            (mov.op0_register(), mov.immediate64()),
            (Register::R10, target as u64)
        );
        assert_eq!(
            (jmp.code(), jmp.near_branch64()),
            (Code::Jmp_rel32_64, retpoline as u64)
        );
        assert_eq!(t[15], 0xcc);
        assert_eq!(
            thunk(at, target, Some(at + (3usize << 30))),
            None,
            "out of reach"
        );
    }

    #[test]
    fn a_guard_stub_compares_the_key_contents_for_each_entry_then_misses() {
        let at = 0x5555_0000_2000usize;
        let miss = 0x5555_0000_0100usize;
        let entries = [
            (0x5555_1111_0000usize, 0x5555_1111_0000usize),
            (0x7f00_0000_1234, 0x5555_0000_3000),
        ];
        let code = guard_stub(at, &entries, miss).unwrap();
        assert_eq!(code.len(), guard_stub_len(2));
        assert_eq!(code.len() % CODE_ALIGN, 0);
        let mut d = Decoder::with_ip(64, &code, at as u64, DecoderOptions::NONE);
        for &(target, dest) in &entries {
            let (mov, cmp, je) = (d.decode(), d.decode(), d.decode());
            assert_eq!(
                (mov.code(), mov.op0_register()),
                (Code::Mov_r64_imm64, Register::R10)
            );
            assert_eq!(mov.immediate64(), target as u64);
            assert_eq!(cmp.code(), Code::Cmp_rm64_r64);
            assert_eq!(
                (cmp.memory_base(), cmp.op1_register()),
                (Register::R11, Register::R10)
            );
            assert_eq!(
                (cmp.memory_displacement64(), cmp.memory_index()),
                (0, Register::None)
            );
            assert_eq!(
                (je.code(), je.near_branch64()),
                (Code::Je_rel32_64, dest as u64)
            );
        }
        let jmp = d.decode();
        assert_eq!(
            (jmp.code(), jmp.near_branch64()),
            (Code::Jmp_rel32_64, miss as u64)
        );
        assert!(
            code[2 * GUARD_ENTRY_LEN + GUARD_MISS_LEN..]
                .iter()
                .all(|&b| b == 0xcc)
        );
        assert_eq!(
            guard_stub(at, &[(1, at + (3usize << 30))], miss),
            None,
            "out of reach"
        );
        assert_eq!(
            [guard_stub_len(1), guard_stub_len(2), guard_stub_len(4)],
            [32, 48, 96]
        );
    }

    #[test]
    fn indirect_is_one_five_byte_call_through_r11() {
        let call = decode_one(&INDIRECT, 0x1000).expect("one instruction spanning all five bytes");
        assert_eq!(call.code(), Code::Call_rm64);
        assert_eq!(call.memory_base(), Register::R11);
        assert_eq!(
            (call.memory_index(), call.memory_displacement64()),
            (Register::None, 0)
        );
        assert_eq!(encode(0x1000, SiteInsn::CallKey), Some(INDIRECT));
    }

    #[test]
    fn a_run_time_site_is_a_call_of_the_run_time_entry_only() {
        let (site, entry) = (0x50_0000usize, 0x40_0100u64);
        let call = encode(site, SiteInsn::Call(entry as usize)).unwrap();
        assert_eq!(prove_run_time_site(&call, site as u64, entry), Ok(()));
        assert_eq!(
            prove_run_time_site(&call, site as u64, entry + 1),
            Err(Reason::NotASite)
        );
        let jmp = encode(site, SiteInsn::Jmp(entry as usize)).unwrap();
        assert_eq!(
            prove_run_time_site(&jmp, site as u64, entry),
            Err(Reason::NotASite)
        );
        assert_eq!(
            prove_run_time_site(&INDIRECT, site as u64, entry),
            Err(Reason::NotASite)
        );
    }

    #[test]
    fn reach_covers_the_whole_code_range() {
        let (lo, hi) = (0x5555_0000_0000usize, 0x5555_0010_0000usize);
        assert!(reaches(lo, hi, lo - 0x1000, 0x1000));
        assert!(reaches(lo, hi, hi + 0x1000, 0x1000));
        let limit = (1usize << 31) - INSN_LEN;
        assert!(reaches(lo, hi, hi - limit + 1, 16));
        assert!(!reaches(lo, hi, lo - limit, 16));
        assert!(!reaches(lo, hi, lo + limit - 16, 16));
        // Every byte of a thunk page the check accepts is reached by a call from both ends.
        let page = hi + (1 << 30);
        assert!(reaches(lo, hi, page, 4096));
        for (from, to) in [(lo, page), (hi - 8, page + 4096 - 16), (hi - 8, page)] {
            assert!(encode(from, SiteInsn::Call(to)).is_some());
        }
    }

    #[test]
    fn site_words_keep_the_other_bytes() {
        let w = u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
        let insn = [0xe8, 0xaa, 0xbb, 0xcc, 0xdd];
        let at0 = SiteWord::of(0x1000).unwrap();
        assert_eq!(at0.addr, 0x1000);
        assert_eq!(
            at0.with(w, insn).to_le_bytes(),
            [0xe8, 0xaa, 0xbb, 0xcc, 0xdd, 6, 7, 8]
        );
        let at3 = SiteWord::of(0x1003).unwrap();
        assert_eq!(at3.addr, 0x1000);
        assert_eq!(
            at3.with(w, insn).to_le_bytes(),
            [1, 2, 3, 0xe8, 0xaa, 0xbb, 0xcc, 0xdd]
        );
        assert_eq!(at3.insn(at3.with(w, insn)), insn);
        assert_eq!(
            SiteWord::of(0x1004),
            None,
            "five bytes at offset 4 cross the quadword"
        );
        assert_eq!(SiteWord::of(0x1007), None);
        assert_eq!(unpack(pack(insn)), insn);
        assert_eq!(pack(insn) >> 40, 0);
    }
}
