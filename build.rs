//! Decides once, for this build, what the source should not have to repeat:
//! - `cfg(static_call_patching)`: this build patches code (x86-64 Linux, without the
//!   `force-fallback` feature); otherwise it uses the portable fallback.
//! - `cfg(static_call_retpoline)`: the build is a retpoline build (`-C target-feature=+retpoline…`
//!   in the rustflags), so every indirect branch the crate writes by hand (trampoline, thunks,
//!   guard stubs) must go through a retpoline too. `cfg!(target_feature = "retpoline-…")` is false
//!   even then (rustc does not expose these features to `cfg`), so the flags are read here, from
//!   `CARGO_ENCODED_RUSTFLAGS`.
//! - `cfg(static_call_guards)`: `key.call(args)` is a guarded run-time site (`src/guard.rs`)
//!   rather than a plain indirect call. On by default only in retpoline builds of the patching
//!   platform, where it always wins (docs/benchmarks.md, "Run-time keys"); the environment
//!   variable `STATIC_CALL_GUARDS=on` or `=off`, seen by the build, overrides the default.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(static_call_patching)");
    println!("cargo::rustc-check-cfg=cfg(static_call_retpoline)");
    println!("cargo::rustc-check-cfg=cfg(static_call_guards)");
    println!("cargo::rustc-check-cfg=cfg(loom)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=STATIC_CALL_GUARDS");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let forced = std::env::var_os("CARGO_FEATURE_FORCE_FALLBACK").is_some();
    let patching = arch == "x86_64" && os == "linux" && !forced;
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let retpoline = retpoline(&flags);
    if patching {
        println!("cargo::rustc-cfg=static_call_patching");
    }
    if patching && retpoline {
        println!("cargo::rustc-cfg=static_call_retpoline");
    }
    let guards = match std::env::var("STATIC_CALL_GUARDS").as_deref() {
        Ok("on") => true,
        Ok("off") => false,
        Ok(other) if !other.is_empty() => {
            panic!("STATIC_CALL_GUARDS must be `on` or `off`, not `{other}`")
        }
        _ => retpoline,
    };
    if patching && guards {
        println!("cargo::rustc-cfg=static_call_guards");
    }
}

/// Whether the rustflags (as cargo encodes them: separated by 0x1f) turn on a retpoline feature:
/// `-C target-feature=+retpoline-indirect-calls,…`, in any of its spellings (`-Ctarget-feature=`,
/// `-C` and `target-feature=` as two flags, `--codegen target-feature=`), the later of `+f` and
/// `-f` winning, as rustc does. `retpoline` is both features at once.
fn retpoline(encoded: &str) -> bool {
    let (mut calls, mut branches) = (false, false);
    let mut args = encoded.split('\x1f').filter(|a| !a.is_empty());
    while let Some(arg) = args.next() {
        let value = match arg {
            "-C" | "--codegen" => args.next().unwrap_or_default(),
            _ => arg
                .strip_prefix("-C")
                .or_else(|| arg.strip_prefix("--codegen="))
                .unwrap_or_default(),
        };
        let Some(features) = value.strip_prefix("target-feature=") else {
            continue;
        };
        for f in features.split(',') {
            let (on, name) = match f.split_at_checked(1) {
                Some(("+", name)) => (true, name),
                Some(("-", name)) => (false, name),
                _ => continue,
            };
            match name {
                "retpoline" => (calls, branches) = (on, on),
                "retpoline-indirect-calls" => calls = on,
                "retpoline-indirect-branches" => branches = on,
                _ => {}
            }
        }
    }
    calls || branches
}
