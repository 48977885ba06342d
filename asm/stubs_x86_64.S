/*
 * Code the library jumps through besides the trampoline, x86-64.  Pulled in by
 * src/code_pool.rs with global_asm!, which supplies:
 *   {retpoline_r10}  the retpoline thunk for r10
 *   {mega}           the megamorphic stub of run-time sites in retpoline builds
 *   {pool}           the code pool: room for near thunks and guard stubs, written at run time
 *   {pool_bytes}     the pool's size (a multiple of the page size)
 *   {retpoline}      1 in a retpoline build (build.rs), else 0
 * Every name carries the crate version (two copies of the crate must link side by side) and is
 * .hidden (calls and jumps to it never go through a PLT).
 *
 * Everything here is stack-neutral at every instruction that runs architecturally, except the
 * retpolines between their `call` and their `ret`, whose CFI says so: an unwinder (or gdb)
 * stopped anywhere in here finds the return address at [rsp] (CFA = rsp + 8), the caller of the
 * stub or thunk, that is, the call site.
 */

/*
 * The retpoline thunk for r10 (the kernel's __x86_indirect_thunk_r10): `jmp r10` whose
 * speculation is trapped.  The `call` pushes a return address that the return-stack buffer
 * predicts, so a mispredicted `ret` speculates into the pause/lfence loop; the `ret`
 * architecturally goes to r10, written over that return address.  rsp is back at its entry value
 * when the target starts.  r11 (the key) is untouched.
 */
    .pushsection .text.{retpoline_r10},"ax",@progbits
    .globl  {retpoline_r10}
    .hidden {retpoline_r10}
    .type   {retpoline_r10},@function
    .p2align 5
{retpoline_r10}:
    .cfi_startproc
    call    3f
    .cfi_adjust_cfa_offset 8
2:  pause
    lfence
    jmp     2b
3:  mov     qword ptr [rsp], r10
    ret
    .cfi_endproc
    .size   {retpoline_r10}, . - {retpoline_r10}
    .popsection

/*
 * The megamorphic stub: a run-time site that sees too many targets for a chain stub calls this
 * in a retpoline build: the key's current target, through a retpoline written out here rather
 * than a jump to the thunk above (one taken branch less: as cheap as the retpoline LLVM emits
 * for an indirect call).  (A normal build needs no stub: the site itself becomes the 5-byte
 * `call qword ptr [r11 + 0]`.)
 */
    .pushsection .text.{mega},"ax",@progbits
    .globl  {mega}
    .hidden {mega}
    .type   {mega},@function
    .p2align 4
{mega}:
    .cfi_startproc
    .if {retpoline}
    mov     r10, qword ptr [r11]
    call    3f
    .cfi_adjust_cfa_offset 8
2:  pause
    lfence
    jmp     2b
3:  mov     qword ptr [rsp], r10
    ret
    .else
    jmp     qword ptr [r11]
    .endif
    .cfi_endproc
    .size   {mega}, . - {mega}
    .popsection

/*
 * The code pool: {pool_bytes} bytes of int3 in our own text, page-aligned, which the code writer
 * fills at run time with near thunks and guard stubs (src/code_pool.rs): each written once into
 * bytes no one has ever jumped to, synced before any site calls it, and never changed after.
 * Being in our text, every byte is within ±2 GiB of every site, and one FDE with the initial CFI
 * (CFA = rsp + 8, return address at [rsp]) describes all of it, which is exact for stack-neutral
 * code: unwinders, perf and gdb walk out of a stub or a thunk to the site that called it.
 */
    .pushsection .text.{pool},"ax",@progbits
    .globl  {pool}
    .hidden {pool}
    .type   {pool},@function
    .p2align 12
{pool}:
    .cfi_startproc
    .fill   {pool_bytes}, 1, 0xcc
    .cfi_endproc
    .size   {pool}, . - {pool}
    .popsection
