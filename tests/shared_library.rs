//! A shared library with its own copy of this crate, loaded with `dlopen`.
//!
//! The library is tests/cdylib, built by the test (release, cached in target/nested). It reports
//! its own sites, their states and its keys' targets through `extern "C"` functions; the test
//! decodes those sites' bytes itself with iced-x86 (same address space). Proven here:
//! - its sites are patched, by its own copy, into `call <its key's target>`;
//! - no write lands outside its own pages: between two snapshots of both objects' code, the
//!   only bytes that changed are inside the sites of the copy that patched, and each copy's
//!   sites call into its own object;
//! - after `dlclose` it stays mapped and working, because its copy pins it
//!   (`dlopen(RTLD_NOLOAD | RTLD_NODELETE)` on itself at initialisation);
//! - and that pin is the library's own, not the accident that a live thread of a library keeps
//!   it loaded: in a child process whose library never got a worker thread (thread creation is
//!   refused by a seccomp filter on the calling thread), it still stays loaded, while the same
//!   library, loaded and closed without initialising static-call, is unloaded.

mod common;
mod nested;

use std::ffi::{CString, c_void};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{BranchState, assert_calls, branch_state, patching, scenario, sites_in};
use static_call::{define_static_call, static_call};

/// The library's report of one site (tests/cdylib/src/lib.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SiteRecord {
    key_index: u64,
    key: usize,
    address: usize,
    state: u64,
    target: usize,
}

/// Builds the library once per test process.
fn library_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let manifest = nested::root().join("tests/cdylib/Cargo.toml");
        let dir = nested::build_release(&manifest);
        dir.join("libstatic_call_test_cdylib.so")
    })
}

/// Whether this process patches; says why not otherwise.
fn skip() -> bool {
    if cfg!(feature = "force-fallback") || !patching() {
        eprintln!("skipped: the portable fallback never patches, so there is nothing to prove");
        return true;
    }
    static_call::init();
    if let Err(why) = static_call::status().patching {
        eprintln!("skipped: patching is off in this process ({why})");
        return true;
    }
    false
}

fn dlopen(path: &Path, flags: i32) -> *mut c_void {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    unsafe { libc::dlopen(c.as_ptr(), flags) }
}

fn dlerror() -> String {
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "no dlerror".into();
    }
    unsafe { std::ffi::CStr::from_ptr(e) }
        .to_string_lossy()
        .into_owned()
}

/// Whether the loader still has the library (RTLD_NOLOAD never loads it again).
fn still_loaded(path: &Path) -> bool {
    let h = dlopen(path, libc::RTLD_LAZY | libc::RTLD_NOLOAD);
    if h.is_null() {
        return false;
    }
    // RTLD_NOLOAD took a reference: give it back.
    assert_eq!(unsafe { libc::dlclose(h) }, 0);
    true
}

/// The library's exports, looked up with `dlsym`.
#[derive(Clone, Copy)]
struct Library {
    call: unsafe extern "C" fn(i64, *mut i64),
    update: extern "C" fn(u32),
    flush: extern "C" fn(),
    sites: unsafe extern "C" fn(*mut SiteRecord, usize) -> usize,
    trampoline: extern "C" fn() -> usize,
    status: unsafe extern "C" fn(*mut u8, usize) -> usize,
    writes: extern "C" fn() -> u64,
    spawn_parked_thread: extern "C" fn(),
}

impl Library {
    fn load(handle: *mut c_void) -> Library {
        /// The function `name`, as a `T` (an `extern "C" fn` type).
        fn sym<T: Copy>(handle: *mut c_void, name: &str) -> T {
            assert_eq!(size_of::<T>(), size_of::<usize>());
            let c = CString::new(name).unwrap();
            let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
            assert!(!p.is_null(), "dlsym({name}): {}", dlerror());
            // SAFETY: the caller names the type of the `extern "C"` function of that name in
            // tests/cdylib/src/lib.rs.
            unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) }
        }
        Library {
            call: sym(handle, "sclib_call"),
            update: sym(handle, "sclib_update"),
            flush: sym(handle, "sclib_flush"),
            sites: sym(handle, "sclib_sites"),
            trampoline: sym(handle, "sclib_trampoline"),
            status: sym(handle, "sclib_status"),
            writes: sym(handle, "sclib_writes"),
            spawn_parked_thread: sym(handle, "sclib_spawn_parked_thread"),
        }
    }

    fn call(&self, x: i64) -> [i64; 3] {
        let mut out = [0i64; 3];
        unsafe { (self.call)(x, out.as_mut_ptr()) };
        out
    }

    fn sites(&self) -> Vec<SiteRecord> {
        let mut out = vec![SiteRecord::default(); 16];
        let n = unsafe { (self.sites)(out.as_mut_ptr(), out.len()) };
        assert!(n <= out.len());
        out.truncate(n);
        out
    }

    fn status(&self) -> String {
        let mut buf = vec![0u8; 512];
        let n = unsafe { (self.status)(buf.as_mut_ptr(), buf.len()) };
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Flushes the library's queue, then checks that all three of its sites are patched and
    /// decode as `call <the key's query()>`, as the library itself reports them.
    #[track_caller]
    fn assert_patched(&self, what: &str) -> Vec<SiteRecord> {
        (self.flush)();
        let sites = self.sites();
        assert_eq!(
            sites.len(),
            3,
            "{what}: the library's three sites: {sites:x?}"
        );
        for s in &sites {
            assert_eq!(s.state, 1, "{what}: site {s:x?} is not patched");
            assert_calls(s.address, s.target, what);
        }
        sites
    }
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// Whether /proc/self/maps shows the file.
fn mapped(path: &Path) -> bool {
    let ino = inode(path);
    common::mappings().iter().any(|m| m.inode == ino)
}

/// The executable ranges of the file's mappings (contiguous ones merged: patching splits them).
fn code_ranges(path: &Path) -> Vec<(usize, usize)> {
    let ino = inode(path);
    let mut out: Vec<(usize, usize)> = Vec::new();
    for m in common::mappings()
        .iter()
        .filter(|m| m.inode == ino && m.perms.contains('x'))
    {
        match out.last_mut() {
            Some(last) if last.1 == m.start => last.1 = m.end,
            _ => out.push((m.start, m.end)),
        }
    }
    assert!(!out.is_empty(), "{} has no code mapped", path.display());
    out
}

/// A copy of the code of an object, to compare after the other copy of the crate has patched.
struct Snapshot {
    ranges: Vec<(usize, usize, Vec<u8>)>,
}

impl Snapshot {
    fn take(path: &Path) -> Snapshot {
        let ranges = code_ranges(path)
            .into_iter()
            .map(|(s, e)| {
                let bytes = (s..e)
                    .map(|a| unsafe { core::ptr::read_volatile(a as *const u8) })
                    .collect();
                (s, e, bytes)
            })
            .collect();
        Snapshot { ranges }
    }

    /// Addresses of the bytes that differ now.
    fn changed(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (s, _, bytes) in &self.ranges {
            for (i, b) in bytes.iter().enumerate() {
                if unsafe { core::ptr::read_volatile((s + i) as *const u8) } != *b {
                    out.push(s + i);
                }
            }
        }
        out
    }

    fn contains(&self, addr: usize) -> bool {
        self.ranges.iter().any(|&(s, e, _)| s <= addr && addr < e)
    }
}

/// Every changed byte must lie inside the 5-byte `call` of one of `sites`.
#[track_caller]
fn assert_only_sites_changed(changed: &[usize], sites: &[usize], what: &str) {
    for &a in changed {
        assert!(
            sites.iter().any(|&s| s <= a && a < s + 5),
            "{what}: byte {a:#x} changed outside every site ({sites:x?})"
        );
    }
}

fn no_rwx_mapping() -> bool {
    common::rwx_mappings().is_empty()
}

extern "C" fn main_add1000(x: i64) -> i64 {
    x + 1000
}
extern "C" fn main_add2000(x: i64) -> i64 {
    x + 2000
}

define_static_call!(MAIN: extern "C" fn(i64) -> i64 = main_add1000);

#[inline(never)]
fn main_sites(x: i64) -> [i64; 2] {
    [static_call!(MAIN)(x), static_call!(MAIN)(x)]
}

#[test]
fn a_dlopened_library_patches_its_own_sites_and_stays_mapped() {
    if skip() {
        return;
    }
    let path = library_path();
    let exe = std::env::current_exe().unwrap();
    let handle = dlopen(path, libc::RTLD_NOW | libc::RTLD_LOCAL);
    assert!(!handle.is_null(), "dlopen: {}", dlerror());
    let lib = Library::load(handle);

    // Two copies of the crate, each with its own trampoline in its own object.
    let lib_code = Snapshot::take(path);
    let main_code = Snapshot::take(&exe);
    let (lib_tramp, main_tramp) = ((lib.trampoline)(), common::trampoline());
    assert!(
        lib_code.contains(lib_tramp),
        "library trampoline {lib_tramp:#x}"
    );
    assert!(
        main_code.contains(main_tramp),
        "main trampoline {main_tramp:#x}"
    );

    // The main binary's sites, patched by the main copy.
    assert_eq!(main_sites(1), [1001, 1001]);
    static_call::flush();
    common::assert_sites_call(|| MAIN.sites(), MAIN.query() as usize, "main_add1000");
    let main_site_addrs: Vec<usize> = MAIN.sites().iter().map(|s| s.address).collect();
    assert_eq!(main_site_addrs.len(), 2);
    let main_code = Snapshot::take(&exe);
    let lib_code_before = Snapshot::take(path);

    // (1) The library's sites run, are registered by its copy and patched into direct calls to
    // its keys' targets. The test finds the sites in the library's code itself (the `lea r11`
    // of each key) and they are exactly the ones the library lists.
    assert_eq!(lib.call(5), [6, 6, 105]);
    let sites = lib.assert_patched("the library's first targets");
    let call_fn = lib.call as usize;
    for key in 0..2 {
        let key_addr = sites.iter().find(|s| s.key_index == key).unwrap().key;
        let mut listed: Vec<usize> = sites
            .iter()
            .filter(|s| s.key_index == key)
            .map(|s| s.address)
            .collect();
        listed.sort();
        assert_eq!(sites_in(call_fn, 512, key_addr), listed, "key {key}");
    }
    let lib_sites: Vec<usize> = sites.iter().map(|s| s.address).collect();
    for s in &sites {
        assert!(
            lib_code.contains(s.address) && lib_code.contains(s.target),
            "{s:x?}"
        );
        assert_ne!(s.target, lib_tramp);
    }
    assert_eq!(lib.call(5), [6, 6, 105]);

    // (3) Its copy wrote only its own sites; the main binary's code did not change at all.
    assert_eq!(main_code.changed(), Vec::<usize>::new(), "main binary code");
    let changed = lib_code_before.changed();
    assert_only_sites_changed(&changed, &lib_sites, "library code");
    assert!(!changed.is_empty());
    assert!((lib.writes)() >= 3);

    // An update in the library: its sites follow, the main binary's do not move.
    (lib.update)(1);
    assert_eq!(lib.call(5), [7, 7, 205]);
    lib.assert_patched("the library's second targets");
    assert_eq!(main_code.changed(), Vec::<usize>::new(), "main binary code");
    assert_only_sites_changed(&lib_code_before.changed(), &lib_sites, "library code");
    for &s in &main_site_addrs {
        assert_calls(s, MAIN.query() as usize, "main_add1000");
    }

    // And the other way round: the main copy's update leaves the library's code alone.
    let lib_code = Snapshot::take(path);
    MAIN.update(main_add2000);
    assert_eq!(main_sites(1), [2001, 2001]);
    common::assert_sites_call(|| MAIN.sites(), MAIN.query() as usize, "main_add2000");
    assert_eq!(lib_code.changed(), Vec::<usize>::new(), "library code");
    assert_only_sites_changed(&main_code.changed(), &main_site_addrs, "main binary code");
    assert!(no_rwx_mapping(), "an rwx mapping was left behind");

    // (2) dlclose drops the only reference the program holds, yet the library stays: its copy
    // pinned it (its worker thread runs its code).
    let status = lib.status();
    assert!(
        status.contains("patching: Ok(())") && status.contains("worker: Running"),
        "library status: {status}"
    );
    assert_eq!(unsafe { libc::dlclose(handle) }, 0, "{}", dlerror());
    assert!(still_loaded(path), "the library was unloaded by dlclose");
    assert!(mapped(path), "/proc/self/maps no longer lists the library");
    assert_eq!(lib.call(5), [7, 7, 205]);
    (lib.update)(0);
    assert_eq!(lib.call(5), [6, 6, 105]);
    lib.assert_patched("after dlclose");
    assert_eq!(lib.status(), status);
    assert!(no_rwx_mapping(), "an rwx mapping was left behind");
}

/// Installs, on the calling thread only, a seccomp filter under which `clone3` fails with
/// ENOSYS and `clone` with EAGAIN: `pthread_create` then fails with EAGAIN, and so does the
/// library's attempt to start its worker. False if seccomp is unavailable.
fn refuse_threads_on_this_thread() -> bool {
    common::install_seccomp(&[
        (libc::SYS_clone3, libc::ENOSYS),
        (libc::SYS_clone, libc::EAGAIN),
    ])
}

/// One scenario, in a child process of this test (the library can be pinned only once per
/// process). Prints `still-loaded=<bool>` after `dlclose`.
fn child_scenario(scenario: &str, path: &Path) {
    let handle = dlopen(path, libc::RTLD_NOW | libc::RTLD_LOCAL);
    assert!(!handle.is_null(), "dlopen: {}", dlerror());
    let lib = Library::load(handle);
    match scenario {
        // Nothing of static-call runs: nothing pins the library.
        "untouched" => {}
        // A thread of the library's, static-call untouched: the accident.
        "thread" => (lib.spawn_parked_thread)(),
        // static-call initialises (and pins) but its worker cannot start: the sites are patched
        // by `flush` on the calling thread, and no thread of the library remains. That thread
        // ends before dlclose, so thread-local destructors it registered pin nothing either.
        "no-worker" => {
            let report = std::thread::spawn(move || {
                if !refuse_threads_on_this_thread() {
                    return None;
                }
                assert_eq!(lib.call(5), [6, 6, 105]);
                lib.assert_patched("no worker");
                Some(lib.status())
            })
            .join()
            .unwrap();
            let Some(status) = report else {
                println!("seccomp-unavailable");
                return;
            };
            println!("library-status={status}");
            assert!(status.contains("patching: Ok(())"), "{status}");
            assert!(
                status.contains("worker: Failed { errno: 11 }"),
                "the worker should have failed to start: {status}"
            );
        }
        other => panic!("unknown scenario {other}"),
    }
    assert_eq!(unsafe { libc::dlclose(handle) }, 0, "{}", dlerror());
    let loaded = still_loaded(path);
    assert_eq!(
        loaded,
        mapped(path),
        "the loader and /proc/self/maps disagree"
    );
    if loaded && scenario == "no-worker" {
        // Its code is still there and still patched.
        assert_eq!(lib.call(5), [6, 6, 105]);
    }
    println!("still-loaded={loaded}");
}

const SCENARIO_ENV: &str = "STATIC_CALL_TEST_CDYLIB_SCENARIO";
const PATH_ENV: &str = "STATIC_CALL_TEST_CDYLIB_PATH";

#[test]
fn the_library_pins_itself_rather_than_relying_on_its_thread() {
    if let Some(scenario) = std::env::var_os(SCENARIO_ENV) {
        let path = PathBuf::from(std::env::var_os(PATH_ENV).unwrap());
        child_scenario(scenario.to_str().unwrap(), &path);
        return;
    }
    if skip() {
        return;
    }
    let path = library_path();
    let run = |scenario: &str| -> String {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "the_library_pins_itself_rather_than_relying_on_its_thread",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SCENARIO_ENV, scenario)
            .env(PATH_ENV, path)
            // The filter applies to one thread only; never let it switch patching off.
            .env("STATIC_CALL_SECCOMP", "allow")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "scenario {scenario}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("scenario {scenario}: {}", stdout.trim());
        stdout
    };
    // The control: dlclose does unload this library when nothing holds it, so "still loaded"
    // below means something holds it.
    assert!(run("untouched").contains("still-loaded=false"));
    // The accident, for the record: a live std thread of the library keeps it loaded.
    let thread = run("thread");
    eprintln!(
        "a live thread of the library keeps it loaded: {}",
        thread.contains("still-loaded=true")
    );
    // The library's own pin, with no thread of its own alive.
    let no_worker = run("no-worker");
    if no_worker.contains("seccomp-unavailable") {
        eprintln!("skipped the no-worker scenario: seccomp filters are unavailable here");
        return;
    }
    assert!(
        no_worker.contains("still-loaded=true"),
        "without a worker thread, nothing but static-call's own pin can keep the library \
         loaded, and it was unloaded:\n{no_worker}"
    );
}

/// The exported function `name` of the library `handle`, as a `T` (an `extern "C" fn` type).
fn lookup<T: Copy>(handle: *mut c_void, name: &str) -> T {
    assert_eq!(size_of::<T>(), size_of::<usize>());
    let c = CString::new(name).unwrap();
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    assert!(!p.is_null(), "dlsym({name}): {}", dlerror());
    // SAFETY: the caller names the type of the `extern "C"` function of that name in
    // tests/cdylib/src/lib.rs.
    unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) }
}

scenario! {
    /// A `dlopen`ed library's own copy of the crate registers, proves and patches the library's
    /// branch site (through its own branch entry), and switches it: NOP5 while off, `jmp` to a
    /// label inside the library's code while on. In a child process, so that no other test sees
    /// the library's code change.
    fn a_dlopened_library_patches_its_own_branch_site() {
        // (A closure, so that `return` still reports the scenario passed.)
        let run = || {
            if skip() {
                return;
            }
            let path = library_path();
            let handle = dlopen(path, libc::RTLD_NOW | libc::RTLD_LOCAL);
            assert!(!handle.is_null(), "dlopen: {}", dlerror());
            let branch: extern "C" fn(i32) -> i32 = lookup(handle, "sclib_branch");
            let site_of: unsafe extern "C" fn(*mut usize) -> usize =
                lookup(handle, "sclib_branch_site");
            let function: extern "C" fn() -> usize = lookup(handle, "sclib_branch_function");
            let key: extern "C" fn() -> usize = lookup(handle, "sclib_branch_key");
            let b = common::only_branch(function(), key());
            assert!(
                code_ranges(path).iter().any(|&(s, e)| s <= b.site && b.site < e),
                "the site is the library's: {b:x?}"
            );
            assert_eq!(branch_state(&b), BranchState::Home);
            assert_eq!(branch(-1), 0, "off, through the stub");
            let mut reported = [0usize; 2];
            // SAFETY: two writable words.
            assert_eq!(unsafe { site_of(reported.as_mut_ptr()) }, 1);
            assert_eq!(reported, [b.site, 1], "registered and patched by the library's copy");
            assert_eq!(branch_state(&b), BranchState::Nop);
            assert_eq!(branch(1), 1);
            assert_eq!(branch_state(&b), BranchState::Jump);
            assert!(
                code_ranges(path).iter().any(|&(s, e)| s <= b.label && b.label < e),
                "the label is the library's code: {b:x?}"
            );
            assert_eq!(branch(0), 0);
            assert_eq!(branch_state(&b), BranchState::Nop);
        };
        run();
    }
}
scenario! {
/// A Rust key inside a `dlopen`ed library: its site is patched to the key's adapter, `update`
/// takes a closure, and a panic is caught with its payload, all inside the library (whose copy of
/// the crate keeps the payload in its own thread-local). In a child process of its own: it writes
/// the library's code, which `a_dlopened_library_patches_its_own_sites_and_stays_mapped` checks
/// nothing else does.
fn a_rust_key_in_a_dlopened_library() {
    // (No early `return`: the scenario prints its "passed" line after the body.)
    if !skip() {
        rust_key_in_library();
    }
}
}

fn rust_key_in_library() {
    let path = library_path();
    let handle = dlopen(path, libc::RTLD_NOW | libc::RTLD_LOCAL);
    assert!(!handle.is_null(), "dlopen: {}", dlerror());
    #[repr(C)]
    #[derive(Default, Debug)]
    struct RustReport {
        failed: u64,
        site: usize,
        func: usize,
    }
    let c = CString::new("sclib_rust").unwrap();
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    assert!(!p.is_null(), "dlsym(sclib_rust): {}", dlerror());
    // SAFETY: `sclib_rust` in tests/cdylib/src/lib.rs has this type.
    let run: extern "C" fn(&mut RustReport) = unsafe { std::mem::transmute(p) };
    let mut report = RustReport::default();
    run(&mut report);
    assert_eq!(
        report.failed, 0,
        "check {} failed in the library",
        report.failed
    );
    assert_ne!(
        report.site, 0,
        "the library registered its site: {report:x?}"
    );
    assert_calls(report.site, report.func, "the library key's adapter");
}
