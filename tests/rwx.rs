//! Page protections around patching: code pages never lose execute permission (a thread running
//! there would fault) and no page is left writable and executable. One test per process: the
//! checks read /proc/self/maps, so no other test may be patching at the same time.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use static_call::{define_static_call, static_call};

extern "C" fn one(x: u32) -> u32 {
    x + 1
}
extern "C" fn two(x: u32) -> u32 {
    x + 2
}

define_static_call!(PROT: extern "C" fn(u32) -> u32 = one);

const UPDATES: usize = 2000;

#[inline(never)]
fn sites(x: u32) -> u32 {
    static_call!(PROT)(x) + static_call!(PROT)(x) + static_call!(PROT)(x)
}

#[test]
fn code_pages_keep_exec_and_none_is_left_writable() {
    assert_eq!(sites(1), 6);
    static_call::flush();
    let addresses: Vec<usize> = PROT.sites().iter().map(|s| s.address).collect();
    assert_eq!(addresses.len(), if common::patching() { 3 } else { 0 });

    // While one thread updates as fast as it can and another keeps running the patched code,
    // sample the mappings that hold the sites: they must always be executable.
    let stop = AtomicBool::new(false);
    let samples = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let r = sites(1);
                assert!(r == 6 || r == 9 || r == 7 || r == 8, "{r}");
            }
        });
        let sampler = s.spawn(|| {
            let mut samples = 0;
            loop {
                for m in common::mappings() {
                    if addresses.iter().any(|&a| m.start <= a && a < m.end) {
                        assert!(
                            m.perms.starts_with("r-x") || m.perms.starts_with("rwx"),
                            "{}",
                            m.perms
                        );
                    }
                }
                samples += 1;
                if stop.load(Ordering::Relaxed) {
                    break samples;
                }
            }
        });
        for i in 0..UPDATES {
            PROT.update(if i % 2 == 0 { two } else { one });
        }
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap();
        sampler.join().unwrap()
    });
    assert!(samples > 0);

    if common::patching() {
        for m in common::mappings() {
            assert!(
                !(m.perms.starts_with("rw") && m.perms.contains('x')),
                "{:#x}-{:#x} {}",
                m.start,
                m.end,
                m.perms
            );
        }
        for a in addresses {
            let m = common::mapping_of(a);
            assert_eq!(
                &m.perms[..3],
                "r-x",
                "site {a:#x} is back on its original protection"
            );
        }
        let stats = static_call::stats();
        assert!(stats.mprotects >= 2 * UPDATES as u64, "{stats:?}");
        assert_eq!(
            stats.mprotects % 2,
            0,
            "every opened window was closed: {stats:?}"
        );
        eprintln!(
            "{stats:?}; mean rwx window {} ns",
            stats.rwx_nanos / stats.batches.max(1)
        );
    }
}
