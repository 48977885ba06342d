/*
 * The static-call trampolines, x86-64 System V.  Pulled in by src/trampoline.rs with
 * global_asm!, which supplies these symbols and constants:
 *   {tramp}  the entry of call sites; its name carries the crate version (two copies must link)
 *   {tail}   the entry of tail (`jmp`) sites, made by `static_call_fn!`
 *   {rt}     the entry of run-time sites (`key.call`, src/guard.rs): a call site whose r11 was
 *            computed outside its asm block, so its bytes prove no key.  Guard stubs jump here
 *            too when they miss (the return address is still the site's).
 *   {slow}   the Rust slow path: extern "C" fn(key: *const RawKey, site: usize, kind: u32)
 *            -> target
 *   {retpoline}     1 in a retpoline build (build.rs), else 0
 *   {retpoline_r10} the retpoline thunk for r10 (asm/stubs_x86_64.S)
 *
 * An unpatched call site is                 An unpatched tail site (a whole function) is
 *       lea   r11, [rip + KEY]                    lea   r11, [rip + KEY]
 *       <nop padding>                             lea   r10, [rip + 1f]
 *       call  {tramp}                             <nop padding>
 *                                              1: jmp   {tail}
 *                                                 ret
 * and an unpatched run-time site is  <r11 = the key, set by the compiler>  <nop padding>
 * call {rt}.  Each kind of site reaches its own entry, which is what tells the kinds apart: LLVM
 * may merge two run-time keys' `lea r11` in front of one run-time site, making bytes that look
 * exactly like a call site of one of them, and only the entry says they are not.
 *
 * So on entry to any of them: r11 = the key's address, every argument register (rdi rsi rdx rcx r8
 * r9, xmm0-7, al for varargs) holds the caller's arguments, stack arguments sit above [rsp],
 * and rsp = 8 (mod 16).  [rsp] is the call site's return address (call site + 5) for {tramp};
 * (so also for {rt});
 * for {tail} it is the return address of whoever called the wrapper, and r10 holds the tail
 * site's own address instead (r10 is neither an argument nor callee-saved under System V).
 *
 * Each entry saves the argument registers, asks the slow path to register the site (with the
 * entry's kind: the entry a site reached is what says which kind it is) and return the key's
 * current target, restores everything and tail-jumps there.  rsp is back at its entry value
 * when it jumps, so the target sees exactly the frame the caller built: for a tail site, the
 * target returns straight to the wrapper's caller.
 *
 * On exit r11 holds the key's address again, as it does when a patched site calls the target
 * directly (its `lea` ran just before): every target is entered with r11 = its key, whichever
 * way it was reached.  The jump goes through r10: `jmp r10`, or in a retpoline build a direct
 * `jmp` to the retpoline thunk for r10, so that no indirect branch the crate writes by hand is
 * left unprotected in a hardened program.
 *
 * Stack alignment invariant: on entry rsp = 8 (mod 16).  Eight 8-byte pushes keep it 8 (mod 16);
 * the 136-byte area (128 for xmm0-7, 8 of padding) makes it 0 (mod 16), so (1) the movaps stores
 * below are aligned and (2) the `call {slow}` happens with rsp = 0 (mod 16) as the ABI demands.
 * Changing the number of pushes or the size of that area breaks both; the slow path checks it on
 * every call with an aligned SSE store (`alignment_canary` in src/trampoline.rs).
 *
 * CFI is exact at every instruction (CFA = rsp + 8 + bytes pushed), through the final jmp, so
 * debuggers and unwinders can walk out of a target that was entered through here.
 *
 * Both entries come from one macro, purged after use: under fat LTO the module-level assembly of
 * two copies of this crate (two major versions) ends up in one file, where a second definition of
 * a macro that was not purged would fail to assemble.
 */
.macro static_call_entry name, kind, tail
    .pushsection .text.\name,"ax",@progbits
    .globl  \name
    .hidden \name
    .type   \name,@function
    .p2align 4
\name:
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
    .if \tail
    mov     rsi, r10                    /* the tail site's own address */
    .else
    mov     rsi, qword ptr [rsp + 200]  /* return address: 136 (xmm, pad) + 8 * 8 (pushes) */
    sub     rsi, 5                      /* the call instruction before it */
    .endif
    mov     edx, \kind
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
    .if {retpoline}
    jmp     {retpoline_r10}
    .else
    jmp     r10
    .endif
    .cfi_endproc
    .size   \name, . - \name
    .popsection
.endm

    static_call_entry {tramp}, {call_kind}, 0
    static_call_entry {tail}, {tail_kind}, 1
    static_call_entry {rt}, {rt_kind}, 0
.purgem static_call_entry
