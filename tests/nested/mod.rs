//! Building the small crates that some tests load or run (a cdylib, a binary that links two
//! versions of this crate): always in release, into a target directory of their own under
//! target/ (`target/nested`), so that repeated runs, `cargo test` and `cargo test --release`
//! share one cached build.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The root of this repository (the static-call package).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/nested`, or `$CARGO_TARGET_DIR/nested` if the outer build has its own target dir.
pub fn target_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root().join(d))
        .unwrap_or_else(|| root().join("target"));
    base.join("nested")
}

/// The cargo that runs these tests (cargo sets `CARGO` for them), else the one on PATH.
fn cargo() -> OsString {
    std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(OsString::from))
        .unwrap_or_else(|| "cargo".into())
}

/// Writes `bytes` to `path` unless it already holds them, so that cargo's mtime-based
/// fingerprints stay fresh and the next build is a no-op.
pub fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Copies the tree at `from` to `to` (files only), passing each file's bytes through `edit`,
/// and writing only what changed.
pub fn copy_tree(from: &Path, to: &Path, edit: &dyn Fn(&Path, Vec<u8>) -> Vec<u8>) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst, edit);
        } else {
            write_if_changed(&dst, &edit(&src, std::fs::read(&src).unwrap()));
        }
    }
}

/// `cargo build --release` of the package at `manifest`, into [`target_dir`]. The package's
/// Cargo.lock, if it has none yet, starts as a copy of this repository's: the same versions of
/// the same dependencies, already downloaded. Returns `target/nested/release`.
pub fn build_release(manifest: &Path) -> PathBuf {
    let lock = manifest.with_file_name("Cargo.lock");
    if !lock.exists() {
        std::fs::copy(root().join("Cargo.lock"), &lock).unwrap();
    }
    let started = Instant::now();
    let out = Command::new(cargo())
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(manifest)
        .env("CARGO_TARGET_DIR", target_dir())
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "cargo build --release --manifest-path {} failed:\n{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("built {} in {:.1?}", manifest.display(), started.elapsed());
    target_dir().join("release")
}
