//! What only a patching build has: the branch entry's register invariant, and the order in which
//! a hook update writes its two kinds of site, checked on the bytes between the two phases
//! through the crate's test seam (`static_call::__private::faults`).
#![cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "force-fallback")
))]

mod common;

use common::{BranchBytes, BranchState, branch_state, only_branch, patching, scenario};
use static_call::{StaticBranch, define_static_call, has_target, static_call};

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
// and `vec_out`. The first call goes down the entry's slow path (saving everything, calling Rust),
// later ones down its fast path (the return address is then known). The stack is misaligned for
// the call on purpose (rsp = 0 mod 16 at the entry), which the entry must cope with.
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
    // A stub's tail (`pop r11`, `jnz rel32`, `jmp rel32`), written as bytes so the assembler
    // cannot shorten the jumps: the slow path reads it, takes the `jmp` for a site (which its
    // proof then refuses: it is no branch site), registers it and remembers the return address,
    // so that the next call goes down the entry's fast path. Both jumps land on `42:`, leaving
    // the flags as the entry set them.
    "pop r11",
    ".byte 0x0f, 0x85",
    ".long 42f - . - 4",
    ".byte 0xe9",
    ".long 42f - . - 4",
    "42:",
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
    /// as the CPU has them. First in a fresh process, where the entry's slow path initialises the
    /// library (allocations, libc's AVX memcpy...), then again, down its fast path (the site is
    /// known), with the key on and off.
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
