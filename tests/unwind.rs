//! The trampoline's CFI: stopped at any instruction of the trampoline, a debugger walks the
//! stack back to the function that made the static call. Without exact CFI for every push and
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
