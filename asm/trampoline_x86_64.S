/*
 * The static-call trampoline, x86-64 System V.  Pulled in by src/trampoline.rs with global_asm!,
 * which supplies two symbols:
 *   {tramp}  this trampoline; its name carries the crate version (two copies must both link)
 *   {slow}   the Rust slow path: extern "C" fn(key: *const RawKey, ret: usize) -> usize
 *
 * Every unpatched static-call site is
 *       lea   r11, [rip + KEY]
 *       <nop padding>
 *       call  {tramp}
 * so on entry:  r11 = the key's address, [rsp] = return address = call site + 5, every argument
 * register (rdi rsi rdx rcx r8 r9, xmm0-7, al for varargs) holds the caller's arguments, and any
 * stack arguments sit above the return address.
 *
 * The trampoline saves the argument registers, asks the slow path to register the site and
 * return the key's current target, restores everything and tail-jumps there.  rsp is back at its
 * entry value when it jumps, so the target sees exactly the frame the caller built.
 *
 * On exit r11 holds the key's address again, as it does when a patched site calls the target
 * directly (its `lea` ran just before): every target is entered with r11 = its key, whichever
 * way it was reached.  The jump goes through r10, which is neither an argument register nor
 * callee-saved under System V.
 *
 * Stack alignment invariant: on entry rsp = 8 (mod 16).  Eight 8-byte pushes keep it 8 (mod 16);
 * the 136-byte area (128 for xmm0-7, 8 of padding) makes it 0 (mod 16), so (1) the movaps stores
 * below are aligned and (2) the `call {slow}` happens with rsp = 0 (mod 16) as the ABI demands.
 * Changing the number of pushes or the size of that area breaks both; the slow path checks it on
 * every call with an aligned SSE store (`alignment_canary` in src/trampoline.rs).
 *
 * CFI is exact at every instruction (CFA = rsp + 8 + bytes pushed), through the final jmp, so
 * debuggers and unwinders can walk out of a target that was entered through here.
 */
    .pushsection .text.{tramp},"ax",@progbits
    .globl  {tramp}
    .hidden {tramp}
    .type   {tramp},@function
    .p2align 4
{tramp}:
    .cfi_startproc
    push    rdi
    .cfi_adjust_cfa_offset 8
    push    rsi
    .cfi_adjust_cfa_offset 8
    push    rdx
    .cfi_adjust_cfa_offset 8
    push    rcx
    .cfi_adjust_cfa_offset 8
    push    r8
    .cfi_adjust_cfa_offset 8
    push    r9
    .cfi_adjust_cfa_offset 8
    push    rax
    .cfi_adjust_cfa_offset 8
    push    r11
    .cfi_adjust_cfa_offset 8
    /* rsp = 0 (mod 16) from here until the matching add */
    sub     rsp, 136
    .cfi_adjust_cfa_offset 136
    movaps  xmmword ptr [rsp + 0], xmm0
    movaps  xmmword ptr [rsp + 16], xmm1
    movaps  xmmword ptr [rsp + 32], xmm2
    movaps  xmmword ptr [rsp + 48], xmm3
    movaps  xmmword ptr [rsp + 64], xmm4
    movaps  xmmword ptr [rsp + 80], xmm5
    movaps  xmmword ptr [rsp + 96], xmm6
    movaps  xmmword ptr [rsp + 112], xmm7
    mov     rdi, r11                    /* key */
    mov     rsi, qword ptr [rsp + 200]  /* return address: 136 (xmm, pad) + 8 * 8 (pushes) */
    call    {slow}
    mov     r10, rax                    /* target: r10 is neither an argument nor callee-saved */
    movaps  xmm0, xmmword ptr [rsp + 0]
    movaps  xmm1, xmmword ptr [rsp + 16]
    movaps  xmm2, xmmword ptr [rsp + 32]
    movaps  xmm3, xmmword ptr [rsp + 48]
    movaps  xmm4, xmmword ptr [rsp + 64]
    movaps  xmm5, xmmword ptr [rsp + 80]
    movaps  xmm6, xmmword ptr [rsp + 96]
    movaps  xmm7, xmmword ptr [rsp + 112]
    add     rsp, 136
    .cfi_adjust_cfa_offset -136
    pop     r11                         /* the key again */
    .cfi_adjust_cfa_offset -8
    pop     rax
    .cfi_adjust_cfa_offset -8
    pop     r9
    .cfi_adjust_cfa_offset -8
    pop     r8
    .cfi_adjust_cfa_offset -8
    pop     rcx
    .cfi_adjust_cfa_offset -8
    pop     rdx
    .cfi_adjust_cfa_offset -8
    pop     rsi
    .cfi_adjust_cfa_offset -8
    pop     rdi
    .cfi_adjust_cfa_offset -8
    jmp     r10
    .cfi_endproc
    .size   {tramp}, . - {tramp}
    .popsection
