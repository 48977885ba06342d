//! Decides once whether this build patches code or uses the portable fallback, and exposes the
//! answer as `cfg(static_call_patching)` so the source does not repeat the condition.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(static_call_patching)");
    println!("cargo::rustc-check-cfg=cfg(loom)");
    println!("cargo::rerun-if-changed=build.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let forced = std::env::var_os("CARGO_FEATURE_FORCE_FALLBACK").is_some();
    if arch == "x86_64" && os == "linux" && !forced {
        println!("cargo::rustc-cfg=static_call_patching");
    }
}
