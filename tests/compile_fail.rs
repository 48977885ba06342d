//! Unsupported signatures and misuses are compile errors that say what is wrong. The expected
//! messages are in `tests/compile_fail/*.stderr`; regenerate them with `TRYBUILD=overwrite` after
//! reading the diff.

// The expected messages are those of the patching build; the fallback reports the same errors,
// but one of them (a run-time key named in `static_call!`) in other words.
#[cfg_attr(feature = "force-fallback", ignore)]
#[test]
fn unsupported_signatures_and_misuse_fail_to_compile() {
    let t = trybuild::TestCases::new();
    // A program that must build. trybuild then builds every case instead of only checking it,
    // so that errors found when generic code is instantiated (a closure that captures a value)
    // show too.
    t.pass("tests/compile_pass/*.rs");
    t.compile_fail("tests/compile_fail/*.rs");
}
