/*
 * The branch entry, x86-64 System V.  Pulled in by src/branch.rs with global_asm!, which
 * supplies three symbols:
 *   {entry}  this entry; its name carries the crate version (two copies must both link)
 *   {slow}   the Rust slow path: extern "C" fn(key: *const RawKey, ret: usize) -> bool
 *   {area}   a u32: bytes to reserve for the extended state, and in bit 0 whether to use
 *            XSAVE (1) or FXSAVE (0); 0 until the first entry has asked CPUID
 *   {seen}   a table of CACHE return addresses (u64) the slow path has registered for good
 *   and constants: {seen_mask} (CACHE - 1), {mode_at} (offset of the key's mode word),
 *   {mode_mask}, {mode_null}, {mode_off} (the modes in which a branch is off; see key.rs)
 *
 * Only the out-of-line stub of an unpatched branch site calls it (src/branch.rs emits both):
 *
 *   site:    jmp   stub                     ; E9 rel32, the five bytes that get rewritten
 *   site+5:  <the fall-through path>
 *   stub:    push  r11
 *            lea   r11, [rip + KEY]
 *            call  {entry}                  ; returns the key's state in ZF: 0 = on, 1 = off
 *            pop   r11
 *            jnz   LABEL                    ; jz for a likely-true site
 *            jmp   site+5
 *
 * Register invariant: the site's asm block declares no clobber at all (only the flags, which
 * every asm block may clobber), so that an off branch costs nothing around it.  So this entry
 * returns with every register as it found it, except the flags: the integer registers the ABI
 * lets the slow path clobber (rax rcx rdx rsi rdi r8-r11) are pushed, rbx (which it uses itself)
 * too, and the whole extended state (x87, SSE, AVX, AVX-512: every component XCR0 enables) is
 * saved with XSAVE and put back with XRSTOR.  A save chosen by the build's target features
 * would not do: the slow path's first run initialises the library, which calls into libc, whose
 * memcpy and friends use AVX2 or AVX-512 registers (ymm16-31 included) whatever this crate was
 * compiled for.  Without OSXSAVE (no AVX enabled by the OS) FXSAVE saves x87 and xmm0-15.  The
 * callee-saved rbp, r12-r15 are kept by the slow path itself, and rbp is the frame pointer here.
 * tests/branches.rs keeps values live in xmm, ymm and zmm registers and r8-r11 across a first
 * run.
 *
 * Stack invariant: nothing is assumed about rsp on entry (a branch site may sit where the
 * function has not aligned its stack: LLVM's shrink-wrapping can leave the prologue on another
 * path, and the site declares no clobber that would force it).  After the pushes, rsp is
 * rounded down to 64 (XSAVE's alignment) and the save area, a multiple of 64 bytes, is
 * reserved below it, so the `call {slow}` happens with rsp = 0 (mod 16) as the ABI demands.  The
 * slow path checks that on every call with an aligned SSE store.  The stack below the caller's
 * rsp is free to use: the site's asm block does not claim `nostack`, so the compiler keeps no
 * data in a red zone there.
 *
 * CFI: rbp is the frame pointer from the second instruction on (CFA = rbp + 16), so unwinders
 * walk out of here whatever rsp becomes.
 *
 * Fast path: a site whose registration is done (queued or settled: the slow path recorded its
 * return address in {seen}) needs nothing but the key's state, which is one load of its mode
 * word.  So the entry first looks the return address up in {seen} (three scratch registers,
 * pushed and popped; no vector register), and answers from the key if it is there: a few
 * nanoseconds per run for a site that stays unpatched (patching off, W^X, valgrind).  A miss,
 * or a slot another site took, only costs the slow path.  The fork handler clears the table
 * (the child's queued sites must queue again).
 *
 * Slow path cost: the save and restore of the extended state (about 2.7 KiB with AVX-512), a
 * registry lookup, and CPUID once per process: some hundreds of nanoseconds, once per site.
 */
    .pushsection .text.{entry},"ax",@progbits
    .globl  {entry}
    .hidden {entry}
    .type   {entry},@function
    .p2align 4
{entry}:
    .cfi_startproc
    push    rax
    .cfi_adjust_cfa_offset 8
    push    rcx
    .cfi_adjust_cfa_offset 8
    push    rdx
    .cfi_adjust_cfa_offset 8
    mov     rax, qword ptr [rsp + 24]   /* return address: the stub's `pop r11` */
    mov     ecx, eax
    shr     ecx, 2
    and     ecx, {seen_mask}
    lea     rdx, [rip + {seen}]
    cmp     rax, qword ptr [rdx + 8 * rcx]
    jne     8f
    mov     eax, dword ptr [r11 + {mode_at}]
    and     eax, {mode_mask}
    cmp     eax, {mode_null}
    je      9f                          /* ZF = 1: off */
    cmp     eax, {mode_off}             /* ZF = 1 exactly when off */
9:
    pop     rdx
    .cfi_adjust_cfa_offset -8
    pop     rcx
    .cfi_adjust_cfa_offset -8
    pop     rax
    .cfi_adjust_cfa_offset -8
    ret
    .cfi_adjust_cfa_offset 24
8:
    pop     rdx
    .cfi_adjust_cfa_offset -8
    pop     rcx
    .cfi_adjust_cfa_offset -8
    pop     rax
    .cfi_adjust_cfa_offset -8
    push    rbp
    .cfi_adjust_cfa_offset 8
    .cfi_offset rbp, -16
    mov     rbp, rsp
    .cfi_def_cfa_register rbp
    push    rax
    push    rcx
    push    rdx
    push    rsi
    push    rdi
    push    r8
    push    r9
    push    r10
    push    r11
    push    rbx                         /* [rbp - 80] */
    .cfi_offset rbx, -96
    push    rbx                         /* [rbp - 88]: the slow path's answer goes here */
    mov     eax, dword ptr [rip + {area}]
    test    eax, eax
    jnz     3f
    /* First entry in the process: which save, and how large.  Every thread computes the same
     * value, so racing stores are harmless. */
    mov     eax, 1
    cpuid
    bt      ecx, 27                     /* OSXSAVE: the OS enabled XSAVE (and XCR0) */
    mov     eax, 512                    /* FXSAVE's area, bit 0 clear */
    jnc     2f
    mov     eax, 0xd
    xor     ecx, ecx
    cpuid                               /* ebx: XSAVE area size for the components in XCR0 */
    lea     eax, [rbx + 63]
    and     eax, -64
    or      eax, 1
2:
    mov     dword ptr [rip + {area}], eax
3:
    mov     ebx, eax                    /* bit 0: XSAVE */
    and     eax, -64
    and     rsp, -64
    sub     rsp, rax                    /* rsp = 0 (mod 64) from here until `lea rsp` below */
    test    bl, 1
    jz      4f
    xor     eax, eax                    /* XRSTOR faults unless the XSAVE header's reserved */
    mov     qword ptr [rsp + 512], rax  /* bytes are zero, and XSAVE writes only XSTATE_BV */
    mov     qword ptr [rsp + 520], rax
    mov     qword ptr [rsp + 528], rax
    mov     qword ptr [rsp + 536], rax
    mov     qword ptr [rsp + 544], rax
    mov     qword ptr [rsp + 552], rax
    mov     qword ptr [rsp + 560], rax
    mov     qword ptr [rsp + 568], rax
    mov     eax, -1                     /* every component XCR0 enables */
    mov     edx, -1
    xsave64 [rsp]
    jmp     5f
4:
    fxsave64 [rsp]
5:
    mov     rdi, r11                    /* key */
    mov     rsi, qword ptr [rbp + 8]    /* return address: the stub's `pop r11` */
    call    {slow}
    mov     byte ptr [rbp - 88], al
    test    bl, 1
    jz      6f
    mov     eax, -1
    mov     edx, -1
    xrstor64 [rsp]
    jmp     7f
6:
    fxrstor64 [rsp]
7:
    cmp     byte ptr [rbp - 88], 0      /* ZF = 1: off.  Nothing below changes the flags. */
    lea     rsp, [rbp - 80]
    pop     rbx
    pop     r11
    pop     r10
    pop     r9
    pop     r8
    pop     rdi
    pop     rsi
    pop     rdx
    pop     rcx
    pop     rax
    pop     rbp
    .cfi_def_cfa rsp, 8
    ret
    .cfi_endproc
    .size   {entry}, . - {entry}
    .popsection
