//! Retpoline builds (`-C target-feature=+retpoline-indirect-calls,+retpoline-indirect-branches`,
//! detected by build.rs from `CARGO_ENCODED_RUSTFLAGS`): every indirect branch the crate writes
//! by hand goes through a retpoline, decoded here instruction by instruction: the three
//! trampoline entries, near thunks, the megamorphic stub, guard stubs and their miss path. In a
//! normal build, the same code is checked to be the plain form (`jmp r10`, `jmp [rip]`, `call
//! [r11]`), so that the test tells the builds apart. `.ci/run` runs it in both.
#![cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]

mod common;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use static_call::{SiteState, StaticCall, define_static_call, static_call};

use common::{RunTimeForm, patching, read, retpoline_r10, run_time_form, run_time_sites_in};

const RETPOLINE: bool = static_call::__private::RETPOLINE;

/// The instructions at `at`, up to and including the first unconditional jump or return.
fn straight_line(at: usize) -> Vec<Instruction> {
    let bytes = read(at, 512);
    let mut out = Vec::new();
    for insn in Decoder::with_ip(64, &bytes, at as u64, DecoderOptions::NONE).iter() {
        let end = matches!(insn.mnemonic(), Mnemonic::Jmp | Mnemonic::Ret);
        out.push(insn);
        if end {
            break;
        }
    }
    out
}

/// Whether `insn` is an indirect branch (`jmp`/`call` through a register or memory).
fn indirect(insn: &Instruction) -> bool {
    matches!(insn.mnemonic(), Mnemonic::Jmp | Mnemonic::Call)
        && matches!(insn.op0_kind(), OpKind::Register | OpKind::Memory)
}

/// Checks that the code at `at` ends in the build's form of "jump to r10": a direct `jmp` to the
/// retpoline thunk, or `jmp r10`; and that nothing before it is an indirect branch.
#[track_caller]
fn ends_in_jump_to_r10(at: usize, what: &str) {
    let code = straight_line(at);
    let (last, before) = code.split_last().unwrap();
    assert!(
        before.iter().all(|i| !indirect(i)),
        "{what}: an indirect branch before the end:\n{}",
        common::disassemble(at, 256)
    );
    if RETPOLINE {
        assert_eq!(
            (last.code(), last.near_branch64() as usize),
            (Code::Jmp_rel32_64, retpoline_r10()),
            "{what} ends in a jmp to the retpoline thunk"
        );
    } else {
        assert_eq!(
            (last.code(), last.op0_register()),
            (Code::Jmp_rm64, Register::R10),
            "{what} ends in jmp r10"
        );
    }
}

#[test]
fn the_trampoline_entries_jump_through_the_retpoline_in_a_retpoline_build() {
    if !patching() && static_call::trampoline_address().is_none() {
        return;
    }
    ends_in_jump_to_r10(common::trampoline(), "the call-site entry");
    ends_in_jump_to_r10(common::tail_entry(), "the tail entry");
    ends_in_jump_to_r10(common::run_time_entry(), "the run-time entry");
}

#[test]
fn the_retpoline_thunk_traps_speculation_and_jumps_to_r10() {
    if static_call::trampoline_address().is_none() {
        return;
    }
    let at = retpoline_r10();
    let bytes = read(at, 32);
    let insns: Vec<Instruction> = Decoder::with_ip(64, &bytes, at as u64, DecoderOptions::NONE)
        .iter()
        .take(6)
        .collect();
    let m: Vec<Mnemonic> = insns.iter().map(|i| i.mnemonic()).collect();
    assert_eq!(
        m,
        [
            Mnemonic::Call,
            Mnemonic::Pause,
            Mnemonic::Lfence,
            Mnemonic::Jmp,
            Mnemonic::Mov,
            Mnemonic::Ret
        ]
    );
    assert_eq!(
        insns[0].near_branch64(),
        insns[4].ip(),
        "call over the trap"
    );
    assert_eq!(insns[3].near_branch64(), insns[1].ip(), "the trap loops");
    assert_eq!(
        (insns[4].memory_base(), insns[4].op1_register()),
        (Register::RSP, Register::R10),
        "mov [rsp], r10: the ret goes to r10"
    );
}

#[test]
fn the_megamorphic_stub_is_the_builds_indirect_jump_through_the_key() {
    if static_call::trampoline_address().is_none() {
        return;
    }
    let at = common::megamorphic_stub();
    if RETPOLINE {
        // The key's target into r10, then the retpoline, written out.
        let bytes = read(at, 32);
        let insns: Vec<Instruction> = Decoder::with_ip(64, &bytes, at as u64, DecoderOptions::NONE)
            .iter()
            .take(7)
            .collect();
        let m: Vec<Mnemonic> = insns.iter().map(|i| i.mnemonic()).collect();
        assert_eq!(
            m,
            [
                Mnemonic::Mov,
                Mnemonic::Call,
                Mnemonic::Pause,
                Mnemonic::Lfence,
                Mnemonic::Jmp,
                Mnemonic::Mov,
                Mnemonic::Ret
            ],
            "{}",
            common::disassemble(at, 32)
        );
        assert_eq!(
            (insns[0].op0_register(), insns[0].memory_base()),
            (Register::R10, Register::R11)
        );
        assert_eq!(
            insns[1].near_branch64(),
            insns[5].ip(),
            "call over the trap"
        );
        assert_eq!(insns[4].near_branch64(), insns[2].ip(), "the trap loops");
        assert_eq!(
            (insns[5].memory_base(), insns[5].op1_register()),
            (Register::RSP, Register::R10)
        );
        assert!(insns.iter().all(|i| !indirect(i)));
    } else {
        let code = straight_line(at);
        assert_eq!(code.len(), 1);
        assert_eq!(
            (code[0].code(), code[0].memory_base()),
            (Code::Jmp_rm64, Register::R11)
        );
    }
}

unsafe extern "C" {
    fn labs(x: i64) -> i64;
}

define_static_call!(FAR: unsafe extern "C" fn(i64) -> i64 = labs);

#[inline(never)]
fn far_site(x: i64) -> i64 {
    // SAFETY: labs takes any i64.
    unsafe { static_call!(FAR)(x) }
}

#[test]
fn a_near_thunk_jumps_through_the_retpoline_in_a_retpoline_build() {
    assert_eq!(far_site(-4), 4);
    if !patching() {
        return;
    }
    let far = labs as *const () as usize;
    if far.abs_diff(far_site as *const () as usize) < (2usize << 30) {
        println!("note: libc is within 2 GiB of the program here; nothing to check");
        return;
    }
    static_call::flush();
    let sites = FAR.sites();
    assert_eq!(sites[0].state, SiteState::Patched);
    let thunk = common::call_target(sites[0].address).expect("a call");
    assert_eq!(common::thunk_target(thunk), Some(far));
    let code = straight_line(thunk);
    if RETPOLINE {
        assert_eq!(code[0].code(), Code::Mov_r64_imm64);
        ends_in_jump_to_r10(thunk, "a thunk");
    } else {
        assert_eq!(code.len(), 1);
        assert!(code[0].is_ip_rel_memory_operand() && code[0].code() == Code::Jmp_rm64);
    }
}

type Key = StaticCall<extern "C" fn(u64) -> u64>;

macro_rules! adders {
    ($($name:ident = $n:literal),*) => {
        $(
            extern "C" fn $name(x: u64) -> u64 {
                x + $n
            }
        )*
        /// More keys than the longest chain holds in any build.
        static KEYS: [Key; 9] = [$(StaticCall::new($name)),*];
    };
}
adders!(
    r0 = 0,
    r1 = 1,
    r2 = 2,
    r3 = 3,
    r4 = 4,
    r5 = 5,
    r6 = 6,
    r7 = 7,
    r8 = 8
);

#[inline(never)]
fn run_time_site(k: &Key, x: u64) -> u64 {
    k.call_guarded(x)
}

/// Guard stubs never branch indirectly (their miss path is a direct `jmp` to the run-time entry,
/// whose own jump is the retpoline), hold 8 entries in a retpoline build and 2 otherwise, and a
/// site that sees more becomes the build's megamorphic form: a call of the megamorphic stub in
/// a retpoline build, `call [r11]` otherwise.
#[test]
fn guard_stubs_hold_eight_entries_and_megamorphic_sites_call_the_retpoline_stub() {
    let site = patching().then(|| run_time_sites_in(run_time_site as *const () as usize, 4096)[0]);
    let max = static_call::__private::MAX_ENTRIES;
    assert_eq!(max, if RETPOLINE { 8 } else { 2 });
    let mut x = 0;
    for n in 1..=max + 1 {
        for _ in 0..3 * static_call::__private::MISSES_TO_REQUEUE {
            for (k, key) in KEYS[..n].iter().enumerate() {
                x += 1;
                assert_eq!(run_time_site(key, x), x + k as u64);
            }
        }
        static_call::flush();
        let Some(site) = site else { continue };
        match common::run_time_state(site) {
            (_, RunTimeForm::Stub(stub)) => {
                assert_eq!(stub.entries.len(), n);
                let to = common::call_target(site).unwrap();
                let code = read(to, 128);
                let n_insns = 3 * n + 1;
                let insns: Vec<Instruction> =
                    Decoder::with_ip(64, &code, to as u64, DecoderOptions::NONE)
                        .iter()
                        .take(n_insns)
                        .collect();
                assert!(insns.iter().all(|i| !indirect(i)), "{stub:?}");
            }
            (state, RunTimeForm::Megamorphic) => {
                assert_eq!(n, max + 1, "{state:?}");
                let insn = common::decode(site);
                if RETPOLINE {
                    assert_eq!(
                        (insn.code(), insn.near_branch64() as usize),
                        (Code::Call_rel32_64, common::megamorphic_stub())
                    );
                } else {
                    assert_eq!(insn.code(), Code::Call_rm64);
                }
            }
            other => panic!("{n} keys: {other:?}"),
        }
    }
    if let Some(site) = site {
        assert_eq!(run_time_form(site), RunTimeForm::Megamorphic);
    }
}
