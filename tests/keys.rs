//! Every kind of key: a field of a static struct (nested too), a plain `static StaticCall`, a key
//! type in generic code (each monomorphised copy its own patched sites), and keys known only at
//! run time (in a variable, in a heap object, picked from an array), which are never bound to a
//! site and always reach their own current target.

mod common;

use common::assert_sites_call;
use static_call::{StaticCall, StaticCallKey, define_static_call, static_call};

extern "C" fn add1(x: i64) -> i64 {
    x + 1
}
extern "C" fn add2(x: i64) -> i64 {
    x + 2
}
extern "C" fn add3(x: i64) -> i64 {
    x + 3
}

type Op = StaticCall<extern "C" fn(i64) -> i64>;

// --- operation tables ------------------------------------------------------------------------

struct Driver {
    name: &'static str,
    ops: FileOps,
}
struct FileOps {
    open: Op,
    read: Op,
    io: IoOps,
}
struct IoOps {
    flush: Op,
}

static DRIVER: Driver = Driver {
    name: "null driver",
    ops: FileOps {
        open: StaticCall::new(add1),
        read: StaticCall::new(add2),
        io: IoOps {
            flush: StaticCall::new(add3),
        },
    },
};

#[inline(never)]
fn use_driver(x: i64) -> i64 {
    static_call!(DRIVER.ops.open)(x)
        + static_call!(DRIVER.ops.read)(x) * 10
        + static_call!(DRIVER.ops.io.flush)(x) * 100
}

#[test]
fn fields_and_nested_fields_of_a_static_are_patched_to_their_own_targets() {
    assert_eq!(DRIVER.name, "null driver");
    assert_eq!(use_driver(0), 1 + 20 + 300);
    assert_sites_call(
        || DRIVER.ops.open.sites(),
        DRIVER.ops.open.query() as usize,
        "add1",
    );
    assert_sites_call(
        || DRIVER.ops.read.sites(),
        DRIVER.ops.read.query() as usize,
        "add2",
    );
    assert_sites_call(
        || DRIVER.ops.io.flush.sites(),
        DRIVER.ops.io.flush.query() as usize,
        "add3",
    );
    // Swap the "driver": every field to another function.
    DRIVER.ops.open.update(add3);
    DRIVER.ops.io.flush.update(add1);
    assert_eq!(use_driver(0), 3 + 20 + 100);
    assert_sites_call(
        || DRIVER.ops.open.sites(),
        DRIVER.ops.open.query() as usize,
        "add3",
    );
    assert_sites_call(
        || DRIVER.ops.io.flush.sites(),
        DRIVER.ops.io.flush.query() as usize,
        "add1",
    );
    // Each field key is a distinct key: the sites of one are not in the list of another.
    if common::patching() {
        assert_eq!(DRIVER.ops.open.sites().len(), 1);
        assert_eq!(DRIVER.ops.io.flush.sites().len(), 1);
    }
}

// --- a plain static ------------------------------------------------------------------------

static PLAIN: Op = StaticCall::new(add1);

#[test]
fn a_plain_static_key() {
    assert_eq!(static_call!(PLAIN)(1), 2);
    assert_sites_call(|| PLAIN.sites(), PLAIN.query() as usize, "add1");
    PLAIN.update(add2);
    assert_eq!(static_call!(PLAIN)(1), 3);
}

// --- generic code --------------------------------------------------------------------------

define_static_call!(GEN_A: extern "C" fn(i64) -> i64 = add1);
define_static_call!(GEN_B: extern "C" fn(i64) -> i64 = add2);

#[inline(never)]
fn generic<K: StaticCallKey<Fn = extern "C" fn(i64) -> i64>>(x: i64) -> i64 {
    static_call!(<K>)(x)
}

fn twice<K: StaticCallKey<Fn = extern "C" fn(i64) -> i64>>(x: i64) -> i64 {
    generic::<K>(generic::<K>(x))
}

#[test]
fn each_monomorphised_copy_has_its_own_sites_bound_to_its_own_key() {
    assert_eq!(twice::<GEN_A>(0), 2);
    assert_eq!(twice::<GEN_B>(0), 4);
    assert_sites_call(|| GEN_A.sites(), GEN_A.query() as usize, "add1");
    assert_sites_call(|| GEN_B.sites(), GEN_B.query() as usize, "add2");
    let a: Vec<usize> = GEN_A.sites().iter().map(|s| s.address).collect();
    let b: Vec<usize> = GEN_B.sites().iter().map(|s| s.address).collect();
    assert!(
        a.iter().all(|s| !b.contains(s)),
        "the copies share no site: {a:x?} {b:x?}"
    );
    GEN_A.update(add3);
    assert_eq!(twice::<GEN_A>(0), 6);
    assert_eq!(twice::<GEN_B>(0), 4);
    // The key behind the type is reachable too.
    assert_eq!(<GEN_B as StaticCallKey>::key().call(10), 12);
}

// --- keys known only at run time -------------------------------------------------------------

static TABLE: [Op; 3] = [
    StaticCall::new(add1),
    StaticCall::new(add2),
    StaticCall::new(add3),
];
define_static_call!(RT_A: extern "C" fn(i64) -> i64 = add1);
define_static_call!(RT_B: extern "C" fn(i64) -> i64 = add2);

/// One place in the code, reached with whatever key it is given.
#[inline(never)]
fn through(key: &Op, x: i64) -> i64 {
    key.call(x)
}

/// The same, through a guarded run-time site (a guard stub once patched; in the portable
/// fallback, a load and an indirect call) and through the plain indirect call.
#[inline(never)]
fn through_both(key: &Op, x: i64) -> (i64, i64) {
    (key.call_guarded(x), key.call_indirect(x))
}

/// All three forms of a run-time call agree: `key.call`, `call_guarded`, `call_indirect`.
fn through_all(key: &Op, x: i64) -> i64 {
    let r = through(key, x);
    assert_eq!(through_both(key, x), (r, r));
    r
}

#[test]
fn run_time_keys_always_reach_their_own_current_target() {
    // Both keys are also patched at their own static sites.
    assert_eq!(static_call!(RT_A)(0) + static_call!(RT_B)(0), 3);
    static_call::flush();
    for round in 0..100 {
        assert_eq!(through_all(&RT_A, 0), 1, "round {round}");
        assert_eq!(through_all(&RT_B, 0), 2, "round {round}");
        let i = round % 3;
        assert_eq!(through_all(&TABLE[i], 0), i as i64 + 1);
    }
    let boxed: Box<Op> = Box::new(StaticCall::new(add3));
    assert_eq!(through_all(&boxed, 0), 3);
    boxed.update(add1);
    assert_eq!(through_all(&boxed, 0), 1);
    RT_A.update(add3);
    assert_eq!(through_all(&RT_A, 0), 3);
    assert_eq!(through_all(&RT_B, 0), 2);
    assert_eq!(static_call!(RT_A)(0), 3);
    // A run-time call registers no site of its key (a guarded one is in no key's list).
    if common::patching() {
        assert_eq!(RT_B.sites().len(), 1);
    }
}
