//! The trampoline's CFI: stopped at any instruction of the trampoline, a debugger walks the
//! stack back to the function that made the static call. And the code pool's: a guard stub (or
//! a thunk) in the reserve is covered by one FDE, so unwinders walk out of it too. Without exact CFI for every push and
//! pop, the walk would stop or wander off in the middle of the trampoline.
//!
//! Runs this test binary again under `gdb -batch`, in a mode (`STATIC_CALL_UNWIND_CHILD`) where
//! it only makes one static call. Skipped, with a note, where gdb is not installed.

mod common;

use std::process::Command;

use static_call::{define_static_call, static_call};

extern "C" fn ident(x: u64) -> u64 {
    x
}

define_static_call!(UNWOUND: extern "C" fn(u64) -> u64 = ident);

const CHILD_ENV: &str = "STATIC_CALL_UNWIND_CHILD";

#[inline(never)]
fn makes_the_static_call(x: u64) -> u64 {
    static_call!(UNWOUND)(x)
}

/// The child's work (also harmless as an ordinary test).
#[test]
fn unwind_child_entry() {
    assert_eq!(makes_the_static_call(7), 7);
    if std::env::var_os(CHILD_ENV).is_some() {
        std::process::exit(0);
    }
}

/// Instructions in the call sites' trampoline entry, entry to final `jmp` (8 pushes, sub, 8
/// stores, 2 movs, sub, mov, call, mov, 8 loads, add, 8 pops, jmp).
const TRAMPOLINE_INSNS: usize = 41;

#[test]
fn gdb_backtraces_walk_through_every_instruction_of_the_trampoline() {
    if !common::patching() {
        return;
    }
    if Command::new("gdb").arg("--version").output().is_err() {
        eprintln!("note: gdb is not installed; the CFI check is skipped");
        return;
    }
    let trampoline = format!(
        "static_call_trampoline_v{}_{}_{}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH")
    );
    // Stop at the trampoline's entry, then take a backtrace before every instruction, stepping
    // over the call into the slow path, until the final jump has left the trampoline.
    let script = format!(
        "set pagination off\nbreak {trampoline}\nrun\nset $i = 0\nwhile $i <= {TRAMPOLINE_INSNS}\n\
         echo ==step==\\n\nbt 8\nnexti\nset $i = $i + 1\nend\nkill\n"
    );
    let script_path =
        std::env::temp_dir().join(format!("static-call-unwind-{}.gdb", std::process::id()));
    std::fs::write(&script_path, script).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-x"])
        .arg(&script_path)
        .arg("--args")
        .arg(&exe)
        .args(["unwind_child_entry", "--exact", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&script_path);
    let text = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    // A sandbox that forbids ptrace (some containers) stops gdb before the first instruction:
    // that says nothing about our CFI, so say so instead of failing on an empty trace.
    if errors.contains("ptrace: Operation not permitted") {
        eprintln!("note: this machine forbids ptrace; the CFI check is skipped:\n{errors}");
        return;
    }
    let steps: Vec<&str> = text.split("==step==").skip(1).collect();
    let inside = steps
        .iter()
        .filter(|s| {
            s.lines()
                .any(|l| l.starts_with("#0") && l.contains(&trampoline))
        })
        .count();
    assert_eq!(
        inside, TRAMPOLINE_INSNS,
        "stopped at every trampoline instruction:\n{text}\n{errors}"
    );
    for (i, step) in steps.iter().enumerate() {
        // Frame #1 must be the caller itself (in debug builds, the shim holding the site, which
        // gdb shows as the inlined `invoke`/`shim` frames of the caller): with a wrong CFA, gdb
        // shows a bogus frame there (`0x7 in ?? ()`) before its heuristics recover.
        let caller = step
            .lines()
            .find(|l| l.starts_with("#1"))
            .unwrap_or_default();
        let is_caller = ["makes_the_static_call", "invoke", "shim"]
            .iter()
            .any(|n| caller.contains(n));
        assert!(
            is_caller && !step.contains("?? (") && !step.contains("Backtrace stopped"),
            "step {i}: frame #1 is not the caller of the static call:\n{step}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// --- guard stubs: the code pool's fixed CFI ------------------------------------------------------

const STUB_CHILD_ENV: &str = "STATIC_CALL_UNWIND_STUB_CHILD";

#[inline(never)]
fn makes_the_guarded_call(key: &static_call::StaticCall<extern "C" fn(u64) -> u64>, x: u64) -> u64 {
    key.call_guarded(x)
}

/// Where gdb starts stepping: just before the call through a patched run-time site.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn static_call_unwind_marker() {
    std::hint::black_box(());
}

/// The child's work for the stub test (also harmless as an ordinary test): a run-time site
/// patched to a guard stub, then one call through it.
#[test]
fn unwind_stub_child_entry() {
    let key = static_call::StaticCall::new(ident as extern "C" fn(u64) -> u64);
    assert_eq!(makes_the_guarded_call(&key, 7), 7);
    static_call::flush();
    static_call_unwind_marker();
    assert_eq!(makes_the_guarded_call(&key, 8), 8);
    if std::env::var_os(STUB_CHILD_ENV).is_some() {
        std::process::exit(0);
    }
}

/// Instructions stepped after the marker returns, enough to go through the stub in a debug
/// build (argument placement first).
const STUB_STEPS: usize = 400;

/// gdb, stopped at each instruction of a guard stub, shows the function that made the run-time
/// call as the caller. (gdb would manage that for stack-neutral code even without CFI, by its
/// heuristics; `one_fde_covers_the_whole_code_pool_reserve…` below checks the CFI itself.)
#[test]
fn gdb_backtraces_walk_through_every_instruction_of_a_guard_stub() {
    if !common::patching() {
        return;
    }
    if Command::new("gdb").arg("--version").output().is_err() {
        eprintln!("note: gdb is not installed; the CFI check is skipped");
        return;
    }
    let pool = format!(
        "static_call_code_pool_v{}_{}_{}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH")
    );
    let script = format!(
        "set pagination off\nbreak static_call_unwind_marker\nrun\nfinish\nset $i = 0\n\
         while $i < {STUB_STEPS}\nstepi\necho ==step==\\n\nbt 6\nset $i = $i + 1\nend\nkill\n"
    );
    let script_path = std::env::temp_dir().join(format!(
        "static-call-unwind-stub-{}.gdb",
        std::process::id()
    ));
    std::fs::write(&script_path, script).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-x"])
        .arg(&script_path)
        .arg("--args")
        .arg(&exe)
        .args(["unwind_stub_child_entry", "--exact", "--test-threads=1"])
        .env(STUB_CHILD_ENV, "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&script_path);
    let text = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    if errors.contains("ptrace: Operation not permitted") {
        eprintln!("note: this machine forbids ptrace; the CFI check is skipped:\n{errors}");
        return;
    }
    let in_stub: Vec<&str> = text
        .split("==step==")
        .skip(1)
        .filter(|s| s.lines().any(|l| l.starts_with("#0") && l.contains(&pool)))
        .collect();
    // mov r10, T; cmp [r11], r10; je T: the stub for one target.
    assert_eq!(
        in_stub.len(),
        3,
        "stopped at every instruction of the stub, in the code pool:\n{text}\n{errors}"
    );
    for step in in_stub {
        let caller = step
            .lines()
            .find(|l| l.starts_with("#1"))
            .unwrap_or_default();
        // Frame #1 is the caller (in debug builds, the inlined frames of the site in it).
        let is_caller = ["makes_the_guarded_call", "invoke", "call_guarded"]
            .iter()
            .any(|n| caller.contains(n));
        assert!(
            is_caller && step.contains("makes_the_guarded_call") && !step.contains("?? ("),
            "inside the stub, frame #1 is not the caller of the run-time site:\n{step}"
        );
    }
}

// The unwinder's own view: libgcc's `_Unwind_Find_FDE` (what `std::backtrace`, C++ exceptions
// and `_Unwind_Backtrace` use) finds the FDE that covers an address, and says where its code
// starts. (gdb, above, unwinds a stack-neutral stub even without CFI, by its own heuristics:
// this is the check that needs the CFI.)

#[cfg(not(feature = "force-fallback"))]
#[repr(C)]
struct DwarfEhBases {
    tbase: *const u8,
    dbase: *const u8,
    func: *const u8,
}

#[cfg(not(feature = "force-fallback"))]
unsafe extern "C" {
    fn _Unwind_Find_FDE(pc: *const u8, bases: *mut DwarfEhBases) -> *const u8;
}

/// The start of the code described by the FDE covering `pc`, if there is one.
#[cfg(not(feature = "force-fallback"))]
fn fde_start(pc: usize) -> Option<usize> {
    let mut bases = DwarfEhBases {
        tbase: core::ptr::null(),
        dbase: core::ptr::null(),
        func: core::ptr::null(),
    };
    // SAFETY: `_Unwind_Find_FDE` only reads the unwind tables of loaded objects and writes
    // `bases`.
    let fde = unsafe { _Unwind_Find_FDE(pc as *const u8, &mut bases) };
    (!fde.is_null()).then_some(bases.func as usize)
}

#[test]
#[cfg(not(feature = "force-fallback"))] // (the fallback has no code pool)
fn one_fde_covers_the_whole_code_pool_reserve_where_stubs_and_thunks_live() {
    if !common::patching() {
        return;
    }
    let key = static_call::StaticCall::new(ident as extern "C" fn(u64) -> u64);
    assert_eq!(makes_the_guarded_call(&key, 7), 7);
    static_call::flush();
    let stub = static_call::run_time_sites()
        .iter()
        .find_map(|s| match common::run_time_form(s.address) {
            common::RunTimeForm::Stub(_) => common::call_target(s.address),
            _ => None,
        })
        .expect("a run-time site patched to a stub");
    let (lo, hi) = static_call::__private::code_pool_reserve();
    assert!((lo..hi).contains(&stub), "the stub is in the reserve");
    for pc in [stub, stub + 10, lo, hi - 1] {
        assert_eq!(fde_start(pc), Some(lo), "the pool's FDE covers {pc:#x}");
    }
    assert_ne!(fde_start(hi), Some(lo), "and ends with the reserve");
    // The trampoline entries and the retpoline thunk have FDEs of their own.
    for entry in [
        common::trampoline(),
        common::run_time_entry(),
        common::retpoline_r10(),
    ] {
        assert_eq!(fde_start(entry + 1), Some(entry));
    }
}
