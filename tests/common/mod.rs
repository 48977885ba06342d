//! Helpers shared by the integration tests: finding call sites in machine code and decoding
//! what they call, with iced-x86.
#![allow(dead_code)]

use iced_x86::{
    Code, Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic, OpKind,
    Register,
};

/// Whether sites get patched in this process: the build patches (not the portable fallback) and
/// nothing switched patching off (valgrind, `STATIC_CALL_DISABLE`...). Tests check site bytes
/// only then; `patching_is_on_unless_this_environment_switches_it_off` makes sure that "off" is
/// never an accident.
pub fn patching() -> bool {
    if static_call::trampoline_address().is_none() {
        return false;
    }
    static_call::init();
    static_call::status().patching.is_ok()
}

pub fn trampoline() -> usize {
    static_call::trampoline_address().expect("patching build")
}

/// The trampoline's entry for tail sites (`static_call_fn!`).
pub fn tail_entry() -> usize {
    #[cfg(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(feature = "force-fallback")
    ))]
    return static_call::__private::tail_trampoline as *const () as usize;
    #[cfg(not(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(feature = "force-fallback")
    )))]
    unreachable!("no tail entry without patching")
}

/// One line of /proc/self/maps.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub start: usize,
    pub end: usize,
    /// `r-xp`, `rwxp`...
    pub perms: String,
    pub inode: u64,
    /// The whole line, for messages.
    pub line: String,
}

/// The process's mappings, in address order.
pub fn mappings() -> Vec<Mapping> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (a, b) = f[0].split_once('-').unwrap();
            Mapping {
                start: usize::from_str_radix(a, 16).unwrap(),
                end: usize::from_str_radix(b, 16).unwrap(),
                perms: f[1].to_string(),
                inode: f[4].parse().unwrap(),
                line: line.to_string(),
            }
        })
        .collect()
}

/// The mapping that holds `addr`.
pub fn mapping_of(addr: usize) -> Mapping {
    mappings()
        .into_iter()
        .find(|m| m.start <= addr && addr < m.end)
        .unwrap_or_else(|| panic!("{addr:#x} is not mapped"))
}

/// The lines of every mapping that is writable and executable at once (there must be none once
/// a write is over).
pub fn rwx_mappings() -> Vec<String> {
    mappings()
        .into_iter()
        .filter(|m| m.perms.starts_with("rwx"))
        .map(|m| m.line)
        .collect()
}

/// The end of the run of contiguous mappings that holds `addr`. (Patching may split the text
/// mapping where it opened pages for writing.)
fn mapping_end(addr: usize) -> usize {
    let mut end = None;
    for m in mappings() {
        match end {
            None if m.start <= addr && addr < m.end => end = Some(m.end),
            Some(e) if m.start == e => end = Some(m.end),
            Some(e) => return e,
            None => {}
        }
    }
    end.unwrap_or_else(|| panic!("{addr:#x} is not mapped"))
}

/// Reads code bytes (volatile: the patcher may be rewriting them).
pub fn read(addr: usize, len: usize) -> Vec<u8> {
    let len = len.min(mapping_end(addr) - addr);
    (0..len)
        .map(|i| unsafe { core::ptr::read_volatile((addr + i) as *const u8) })
        .collect()
}

pub fn decode(addr: usize) -> Instruction {
    let bytes = read(addr, 15);
    Decoder::with_ip(64, &bytes, addr as u64, DecoderOptions::NONE).decode()
}

/// The target of the `call rel32` at `addr`, or None if the bytes there are something else.
pub fn call_target(addr: usize) -> Option<usize> {
    let insn = decode(addr);
    (insn.code() == Code::Call_rel32_64).then(|| insn.near_branch64() as usize)
}

/// Asserts that the site at `site` decodes as `call target`.
#[track_caller]
pub fn assert_calls(site: usize, target: usize, what: &str) {
    let insn = decode(site);
    assert_eq!(
        (insn.code(), insn.near_branch64() as usize),
        (Code::Call_rel32_64, target),
        "site {site:#x} should be `call {what}` ({target:#x}) but is `{}`",
        format(&insn)
    );
}

/// Asserts that the site at `site` decodes as `jmp target` (a patched tail site).
#[track_caller]
pub fn assert_jumps(site: usize, target: usize, what: &str) {
    let insn = decode(site);
    assert_eq!(
        (insn.code(), insn.near_branch64() as usize),
        (Code::Jmp_rel32_64, target),
        "site {site:#x} should be `jmp {what}` ({target:#x}) but is `{}`",
        format(&insn)
    );
}

/// Where a tail site's binding starts, from the site (after its five bytes and the `ret`); an
/// unpatched site jumps there.
pub const TAIL_BINDING: usize = 6;

/// The tail site of a `static_call_fn!` wrapper at `func` (whatever the site holds now): the
/// wrapper's first instruction after at most 4 bytes of padding, followed by `ret` and the
/// binding, `lea r11, [rip + key]` and `lea r10, [rip + site]`, whose second `lea` names it.
#[track_caller]
pub fn tail_site(func: usize) -> usize {
    let bytes = read(func, 4 + TAIL_BINDING + 14);
    let found: Vec<usize> = (0..=4)
        .filter(|&pad| {
            let binding = pad + TAIL_BINDING;
            let mut d = Decoder::with_ip(
                64,
                &bytes[binding..],
                (func + binding) as u64,
                DecoderOptions::NONE,
            );
            let (key, site) = (d.decode(), d.decode());
            bytes[pad + 5] == 0xc3
                && [(&key, Register::R11), (&site, Register::R10)]
                    .iter()
                    .all(|(lea, reg)| {
                        lea.code() == Code::Lea_r64_m
                            && lea.op0_register() == *reg
                            && lea.is_ip_rel_memory_operand()
                    })
                && site.ip_rel_memory_address() as usize == func + pad
        })
        .map(|pad| func + pad)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{func:#x} does not start as a tail site:\n{}",
        disassemble(func, 64)
    );
    found[0]
}

/// Asserts that the tail site at `site` is unpatched: it jumps to its binding, whose `jmp` goes
/// to the tail entry.
#[track_caller]
pub fn assert_tail_home(site: usize) {
    assert_jumps(site, site + TAIL_BINDING, "its binding");
    assert_jumps(site + TAIL_BINDING + 14, tail_entry(), "the tail entry");
}

pub fn format(insn: &Instruction) -> String {
    let mut out = String::new();
    IntelFormatter::new().format(insn, &mut out);
    out
}

/// Call sites of `key` in the code starting at `func` (up to `len` bytes): the address of every
/// `call` that follows `lea r11, [rip + key]` and NOP padding.
pub fn sites_in(func: usize, len: usize, key: usize) -> Vec<usize> {
    let bytes = read(func, len);
    let mut decoder = Decoder::with_ip(64, &bytes, func as u64, DecoderOptions::NONE);
    // A shim has one exit: stop at its `ret` so as not to run into the next function.
    let mut insns: Vec<Instruction> = Vec::new();
    for insn in decoder.iter() {
        let done = insn.mnemonic() == Mnemonic::Ret;
        insns.push(insn);
        if done {
            break;
        }
    }
    let mut sites = Vec::new();
    for (i, lea) in insns.iter().enumerate() {
        let binds = lea.code() == Code::Lea_r64_m
            && lea.op0_register() == Register::R11
            && lea.op1_kind() == OpKind::Memory
            && lea.is_ip_rel_memory_operand()
            && lea.ip_rel_memory_address() as usize == key;
        if !binds {
            continue;
        }
        if let Some(call) = insns[i + 1..]
            .iter()
            .find(|x| x.mnemonic() != Mnemonic::Nop)
            && call.code() == Code::Call_rel32_64
        {
            sites.push(call.ip() as usize);
        }
    }
    sites
}

/// The one site of `key` inside the function `func` (a shim returned by `static_call!`).
#[track_caller]
pub fn only_site(func: usize, key: usize) -> usize {
    let sites = sites_in(func, 8192, key);
    assert_eq!(
        sites.len(),
        1,
        "expected one site of key {key:#x} in {func:#x}, found {sites:x?} in\n{}",
        disassemble(func, 8192)
    );
    sites[0]
}

/// Address of a function pointer, as usize.
pub fn addr<T: Copy>(f: T) -> usize {
    assert_eq!(size_of::<T>(), size_of::<usize>());
    unsafe { core::mem::transmute_copy(&f) }
}

/// Disassembles `len` bytes at `func`, up to the first `ret`, for failure messages.
pub fn disassemble(func: usize, len: usize) -> String {
    let bytes = read(func, len);
    let mut out = String::new();
    for insn in Decoder::with_ip(64, &bytes, func as u64, DecoderOptions::NONE).iter() {
        out += &format!("{:x}: {}\n", insn.ip(), format(&insn));
        let indirect_jmp =
            insn.mnemonic() == Mnemonic::Jmp && insn.op0_kind() != OpKind::NearBranch64;
        if matches!(insn.mnemonic(), Mnemonic::Ret | Mnemonic::Int3) || indirect_jmp {
            break;
        }
    }
    out
}

/// Flushes, then checks that every registered site of a key (`key.sites()`, taken after the
/// flush) is patched and passes `check`. Nothing to check where sites are not patched.
#[track_caller]
fn assert_patched_sites(
    sites: impl Fn() -> Vec<static_call::SiteInfo>,
    check: impl Fn(&static_call::SiteInfo),
) {
    if !patching() {
        return;
    }
    static_call::flush();
    let sites = sites();
    assert!(!sites.is_empty(), "no site registered");
    for s in &sites {
        assert_eq!(s.state, static_call::SiteState::Patched, "{s:?}");
        check(s);
    }
}

/// Every registered site of a key is patched and calls `target` (the key's `query()`).
#[track_caller]
pub fn assert_sites_call(
    sites: impl Fn() -> Vec<static_call::SiteInfo>,
    target: usize,
    what: &str,
) {
    assert_patched_sites(sites, |s| assert_calls(s.address, target, what));
}

/// Every registered site of a key holds exactly `bytes` (a NOP or `xor eax, eax`).
#[track_caller]
pub fn assert_sites_hold(
    sites: impl Fn() -> Vec<static_call::SiteInfo>,
    bytes: [u8; 5],
    what: &str,
) {
    assert_patched_sites(sites, |s| {
        let insn = decode(s.address);
        assert_eq!(
            (read(s.address, 5), insn.len()),
            (bytes.to_vec(), 5),
            "site {:#x} should be `{what}` but is `{}`",
            s.address,
            format(&insn)
        );
    });
}

/// Installs a seccomp filter on the calling thread (and the threads it creates) that makes each
/// listed system call fail with the given errno and allows everything else. False if seccomp is
/// unavailable.
pub fn install_seccomp(deny: &[(i64, i32)]) -> bool {
    #[repr(C)]
    struct SockFilter {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    let insn = |code, jt, jf, k| SockFilter { code, jt, jf, k };
    let mut filter = vec![
        insn(LD_W_ABS, 0, 0, 4), // seccomp_data.arch: other architectures pass untouched
        insn(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        insn(RET_K, 0, 0, RET_ALLOW),
        insn(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
    ];
    for &(nr, errno) in deny {
        filter.push(insn(JEQ_K, 0, 1, nr as u32));
        filter.push(insn(RET_K, 0, 0, RET_ERRNO | errno as u32));
    }
    filter.push(insn(RET_K, 0, 0, RET_ALLOW));
    let prog = SockFprog {
        len: filter.len() as u16,
        filter: filter.as_ptr(),
    };
    // SAFETY: prctl with integer arguments and a valid, live filter program.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1u64, 0u64, 0u64, 0u64) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as u64,
                &prog as *const SockFprog,
            ) == 0
    }
}

// --- tests that run alone in a child process ------------------------------------------------

/// Names the scenario a child process runs; unset in the parent.
pub const SCENARIO_ENV: &str = "STATIC_CALL_SCENARIO";
/// How long a child may take before it counts as hung (a deadlock).
pub const CHILD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Defines a test whose body runs alone in a child process (this test binary again, filtered to
/// the one test, with [`SCENARIO_ENV`] naming it and the environment `$env`), because it changes
/// the whole process or reads process-wide counters that other tests would move. In the parent,
/// the test only spawns the child and checks that it passed within [`CHILD_TIMEOUT`].
// Not every test binary that includes this module defines scenarios.
#[allow(unused_macros)]
macro_rules! scenario {
    ($(#[$m:meta])* fn $name:ident() $(env [$($k:literal = $v:literal),* $(,)?])? $body:block) => {
        $(#[$m])*
        #[test]
        fn $name() {
            if std::env::var($crate::common::SCENARIO_ENV).as_deref() == Ok(stringify!($name)) {
                $body
                println!("scenario {} passed", stringify!($name));
                return;
            }
            $crate::common::run_in_child(stringify!($name), &[$($(($k, $v)),*)?]);
        }
    };
}
#[allow(unused_imports)]
pub(crate) use scenario;

/// Runs the test `name` of this binary in a child process and asserts that it printed its
/// "passed" line and exited successfully within [`CHILD_TIMEOUT`] (it is killed after that).
pub fn run_in_child(name: &str, env: &[(&str, &str)]) {
    run_child(name, env);
}

/// As [`run_in_child`], and returns what the child printed on its standard output.
pub fn run_child(name: &str, env: &[(&str, &str)]) -> String {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(SCENARIO_ENV, name);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes on their own threads, so that a talkative child never blocks on a full
    // pipe while the parent is polling for its exit.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + CHILD_TIMEOUT;
    // Poll with try_wait rather than signalling by pid: the child is not reaped until try_wait
    // reports it, so kill() can never hit a recycled pid.
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break (status, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break (child.wait().unwrap(), true);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        !timed_out,
        "scenario {name} {env:?} hung (deadlock?):\n{stdout}\n{stderr}"
    );
    assert!(
        status.success() && stdout.contains(&format!("scenario {name} passed")),
        "scenario {name} {env:?} failed ({status}):\n{stdout}\n{stderr}"
    );
    stdout
}

/// Where the `call` or `jmp` (a tail site) at `site` ends up: its target, or, when that target is
/// a near thunk, the address the thunk jumps to. `None` if the bytes at `site` are neither a
/// `call rel32` nor a `jmp rel32`.
pub fn call_destination(site: usize) -> Option<usize> {
    let insn = decode(site);
    let target = match insn.code() {
        Code::Call_rel32_64 | Code::Jmp_rel32_64 => insn.near_branch64() as usize,
        _ => return None,
    };
    Some(thunk_target(target).unwrap_or(target))
}

/// If the code at `at` is a near thunk, the address it jumps to. A thunk is `jmp qword ptr
/// [rip + 0]` followed by the address; in a retpoline build, `mov r10, imm64` then `jmp` to the
/// retpoline thunk for r10.
pub fn thunk_target(at: usize) -> Option<usize> {
    let jmp = decode(at);
    if jmp.code() == Code::Jmp_rm64
        && jmp.is_ip_rel_memory_operand()
        && jmp.ip_rel_memory_address() == at as u64 + 6
    {
        return Some(u64::from_le_bytes(read(at + 6, 8).try_into().unwrap()) as usize);
    }
    let bytes = read(at, 15);
    let mut d = Decoder::with_ip(64, &bytes, at as u64, DecoderOptions::NONE);
    let (mov, jmp) = (d.decode(), d.decode());
    (mov.code() == Code::Mov_r64_imm64
        && mov.op0_register() == Register::R10
        && jmp.code() == Code::Jmp_rel32_64
        && jmp.near_branch64() as usize == retpoline_r10())
    .then(|| mov.immediate64() as usize)
}

// --- run-time sites and guard stubs ----------------------------------------------------------

/// The entry of run-time sites (`key.call_guarded`), where guard stubs go when they miss.
pub fn run_time_entry() -> usize {
    #[cfg(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(feature = "force-fallback")
    ))]
    return static_call::__private::run_time_trampoline as *const () as usize;
    #[cfg(not(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(feature = "force-fallback")
    )))]
    unreachable!("no run-time entry without patching")
}

/// The retpoline thunk for r10.
pub fn retpoline_r10() -> usize {
    #[cfg(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(feature = "force-fallback")
    ))]
    return static_call::__private::retpoline_r10 as *const () as usize;
    #[cfg(not(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(feature = "force-fallback")
    )))]
    unreachable!("no retpoline thunk without patching")
}

/// The megamorphic stub (what megamorphic run-time sites call in a retpoline build).
pub fn megamorphic_stub() -> usize {
    #[cfg(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(feature = "force-fallback")
    ))]
    return static_call::__private::megamorphic as *const () as usize;
    #[cfg(not(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(feature = "force-fallback")
    )))]
    unreachable!("no megamorphic stub without patching")
}

/// Every unpatched run-time site in the code at `func` (up to its first `ret`, indirect `jmp`
/// (a tail call through a pointer, which is how `key.call` may end at opt-level z) or `int3`
/// (padding after the function), at most `len` bytes): the address of each
/// `call <run-time entry>`.
pub fn run_time_sites_in(func: usize, len: usize) -> Vec<usize> {
    let entry = run_time_entry() as u64;
    let bytes = read(func, len);
    let mut out = Vec::new();
    for insn in Decoder::with_ip(64, &bytes, func as u64, DecoderOptions::NONE).iter() {
        if insn.code() == Code::Call_rel32_64 && insn.near_branch64() == entry {
            out.push(insn.ip() as usize);
        }
        let indirect_jmp =
            insn.mnemonic() == Mnemonic::Jmp && insn.op0_kind() != OpKind::NearBranch64;
        if matches!(insn.mnemonic(), Mnemonic::Ret | Mnemonic::Int3) || indirect_jmp {
            break;
        }
    }
    out
}

/// A guard stub, decoded: for each entry, the target it compares the key's contents with and
/// where its `je` goes (the target, or a near thunk), then where it goes on a miss.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stub {
    pub entries: Vec<(usize, usize)>,
    pub miss: usize,
}

impl Stub {
    /// The targets, in the order they are compared.
    pub fn targets(&self) -> Vec<usize> {
        self.entries.iter().map(|e| e.0).collect()
    }
}

/// Decodes the guard stub at `at`, checking every instruction: entries of exactly
/// `mov r10, imm64; cmp qword ptr [r11], r10; je rel32`, then `jmp rel32`. `None` if the code
/// there is anything else.
pub fn decode_guard_stub(at: usize) -> Option<Stub> {
    let bytes = read(at, 256);
    let mut d = Decoder::with_ip(64, &bytes, at as u64, DecoderOptions::NONE);
    let mut entries = Vec::new();
    loop {
        let first = d.decode();
        if first.code() == Code::Jmp_rel32_64 {
            return (!entries.is_empty()).then(|| Stub {
                entries,
                miss: first.near_branch64() as usize,
            });
        }
        let (cmp, je) = (d.decode(), d.decode());
        let ok = first.code() == Code::Mov_r64_imm64
            && first.op0_register() == Register::R10
            && cmp.code() == Code::Cmp_rm64_r64
            && cmp.memory_base() == Register::R11
            && cmp.memory_index() == Register::None
            && cmp.memory_displacement64() == 0
            && cmp.op1_register() == Register::R10
            && je.code() == Code::Je_rel32_64;
        if !ok {
            return None;
        }
        entries.push((first.immediate64() as usize, je.near_branch64() as usize));
    }
}

/// What a run-time site's five bytes make it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunTimeForm {
    /// `call <run-time entry>`.
    Home,
    /// `call <guard stub>`.
    Stub(Stub),
    /// The indirect call through the key: `call qword ptr [r11]`, or in a retpoline build a call
    /// of the megamorphic stub.
    Megamorphic,
}

/// Decodes the run-time site at `site`; panics on bytes a run-time site never holds.
#[track_caller]
pub fn run_time_form(site: usize) -> RunTimeForm {
    let insn = decode(site);
    assert_eq!(
        insn.len(),
        5,
        "a site is always one 5-byte instruction: {}",
        format(&insn)
    );
    if insn.code() == Code::Call_rm64
        && insn.memory_base() == Register::R11
        && insn.memory_index() == Register::None
        && insn.memory_displacement64() == 0
    {
        return RunTimeForm::Megamorphic;
    }
    assert_eq!(
        insn.code(),
        Code::Call_rel32_64,
        "{site:#x}: `{}`",
        format(&insn)
    );
    let to = insn.near_branch64() as usize;
    if to == run_time_entry() {
        return RunTimeForm::Home;
    }
    if to == megamorphic_stub() {
        return RunTimeForm::Megamorphic;
    }
    let stub = decode_guard_stub(to).unwrap_or_else(|| {
        panic!(
            "{site:#x} calls {to:#x}, not a guard stub:\n{}",
            disassemble(to, 64)
        )
    });
    assert_eq!(
        stub.miss,
        run_time_entry(),
        "a stub misses to the run-time entry"
    );
    for &(target, dest) in &stub.entries {
        assert!(
            dest == target || thunk_target(dest) == Some(target),
            "{site:#x}: the stub's entry for {target:#x} jumps to {dest:#x}"
        );
    }
    RunTimeForm::Stub(stub)
}

/// Checks that what `run_time_sites()` reports for the site at `site` is what its bytes are,
/// and returns both.
#[track_caller]
pub fn run_time_state(site: usize) -> (static_call::SiteState, RunTimeForm) {
    use static_call::SiteState;
    let info = static_call::run_time_sites()
        .into_iter()
        .find(|s| s.address == site)
        .unwrap_or_else(|| panic!("{site:#x} is not a registered run-time site"));
    let form = run_time_form(site);
    assert_eq!(
        info.bytes,
        Some(read(site, 5).try_into().unwrap()),
        "{info:?}"
    );
    match (&info.state, &form) {
        (SiteState::Pending | SiteState::Trampoline(_), RunTimeForm::Home) => {}
        (SiteState::Monomorphic { target }, RunTimeForm::Stub(stub)) => {
            assert_eq!(stub.targets(), [*target], "{info:?}")
        }
        (SiteState::Polymorphic { targets }, RunTimeForm::Stub(stub)) => {
            assert!(
                *targets > 1 && stub.entries.len() == *targets,
                "{info:?} {stub:?}"
            )
        }
        (SiteState::Megamorphic(_), RunTimeForm::Megamorphic) => {}
        (state, form) => panic!("{site:#x}: reported {state:?}, but the bytes are {form:?}"),
    }
    (info.state, form)
}

/// Writes one byte of code the way a debugger does (through `/proc/self/mem`, which writes
/// read-only pages without changing their protection): to place or remove a breakpoint.
pub fn debugger_poke(addr: usize, byte: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .expect("/proc/self/mem");
    mem.seek(SeekFrom::Start(addr as u64)).unwrap();
    mem.write_all(&[byte])
        .expect("write through /proc/self/mem");
}

// --- branch sites ----------------------------------------------------------------------------

/// A branch site found in machine code before its first run, from its own bytes: the `jmp` to
/// its out-of-line stub, and what the stub says (decoded here independently of the library).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchBytes {
    /// The five rewritable bytes (`jmp stub` until patched).
    pub site: usize,
    pub stub: usize,
    /// Where the site jumps when it takes its branch (the stub's `jcc` target).
    pub label: usize,
    /// `jz` in the stub: the fall-through is the *on* side.
    pub likely_true: bool,
    /// The key the stub's `lea r11` binds.
    pub key: usize,
}

/// What a branch site's five bytes are now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchState {
    /// `jmp stub`: unpatched, every run asks the branch entry.
    Home,
    /// The 5-byte NOP: falls through.
    Nop,
    /// `jmp label`: takes the branch.
    Jump,
}

/// Decodes the stub a branch site's `jmp` reaches, if it is one.
pub fn decode_stub(site: usize, stub: usize) -> Option<BranchBytes> {
    let bytes = read(stub, 27);
    let mut d = Decoder::with_ip(64, &bytes, stub as u64, DecoderOptions::NONE);
    let push = d.decode();
    let lea = d.decode();
    let call = d.decode();
    let pop = d.decode();
    let jcc = d.decode();
    let back = d.decode();
    let ok = push.code() == Code::Push_r64
        && push.op0_register() == Register::R11
        && lea.code() == Code::Lea_r64_m
        && lea.op0_register() == Register::R11
        && lea.is_ip_rel_memory_operand()
        && call.code() == Code::Call_rel32_64
        && pop.code() == Code::Pop_r64
        && pop.op0_register() == Register::R11
        && matches!(jcc.code(), Code::Jne_rel32_64 | Code::Je_rel32_64)
        && back.code() == Code::Jmp_rel32_64
        && back.near_branch64() as usize == site + 5;
    ok.then(|| BranchBytes {
        site,
        stub,
        label: jcc.near_branch64() as usize,
        likely_true: jcc.code() == Code::Je_rel32_64,
        key: lea.ip_rel_memory_address() as usize,
    })
}

/// The branch sites of `key` in the code at `func` (up to its first `ret`, at most `len` bytes),
/// found by their `jmp` to a stub that binds `key`. Only sites that have not been patched yet
/// can be found this way.
pub fn branch_sites_in(func: usize, len: usize, key: usize) -> Vec<BranchBytes> {
    let bytes = read(func, len);
    let mut out = Vec::new();
    for insn in Decoder::with_ip(64, &bytes, func as u64, DecoderOptions::NONE).iter() {
        if insn.code() == Code::Jmp_rel32_64
            && let Some(b) = decode_stub(insn.ip() as usize, insn.near_branch64() as usize)
            && b.key == key
        {
            out.push(b);
        }
        let indirect_jmp =
            insn.mnemonic() == Mnemonic::Jmp && insn.op0_kind() != OpKind::NearBranch64;
        if matches!(insn.mnemonic(), Mnemonic::Ret | Mnemonic::Int3) || indirect_jmp {
            break;
        }
    }
    out
}

/// The one branch site of `key` in `func`.
#[track_caller]
pub fn only_branch(func: usize, key: usize) -> BranchBytes {
    let sites = branch_sites_in(func, 4096, key);
    assert_eq!(
        sites.len(),
        1,
        "expected one branch site of {key:#x} in {func:#x}, found {sites:x?} in\n{}",
        disassemble(func, 4096)
    );
    sites[0]
}

/// What the branch site `b` holds now; panics on anything but its home, NOP5 or `jmp label`.
#[track_caller]
pub fn branch_state(b: &BranchBytes) -> BranchState {
    let insn = decode(b.site);
    let bytes = read(b.site, 5);
    match (insn.code(), insn.near_branch64() as usize) {
        (Code::Jmp_rel32_64, to) if to == b.stub => BranchState::Home,
        (Code::Jmp_rel32_64, to) if to == b.label => BranchState::Jump,
        _ if bytes == [0x0f, 0x1f, 0x44, 0x00, 0x00] => BranchState::Nop,
        _ => panic!(
            "branch site {:#x} holds `{}` ({bytes:02x?}), none of its three states",
            b.site,
            format(&insn)
        ),
    }
}

/// Whether the patched branch site `b` takes its branch with the key `on`: what its bytes must
/// be, patched.
pub fn patched_branch(b: &BranchBytes, on: bool) -> BranchState {
    if on != b.likely_true {
        BranchState::Jump
    } else {
        BranchState::Nop
    }
}

// --- Rust keys -------------------------------------------------------------------------------

/// What a key's sites call: its first word (`RawKey::func`; the layout is in docs/design.md).
/// For a Rust key that is the target's adapter, not the function `query()` returns.
pub fn func_of<T>(key: &T) -> usize {
    // SAFETY: every key starts with its `func` word, an aligned pointer-sized atomic.
    unsafe {
        (*(key as *const T as *const std::sync::atomic::AtomicUsize))
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The word after a Rust key's `RawKey`: the Rust function `query()` returns.
pub fn word_of<T>(key: &T) -> usize {
    assert_eq!(size_of::<T>(), 24, "a Rust key is 24 bytes");
    // SAFETY: a Rust key's third word is an aligned pointer-sized atomic.
    unsafe {
        (*(key as *const T as *const std::sync::atomic::AtomicUsize).add(2))
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Checks the one site of `key` inside the shim `shim` (a function pointer `static_call!`
/// returned): before its first call (`first` runs it) it calls the trampoline; once flushed it
/// calls what the key's first word holds (for a Rust key, its adapter). Nothing to check where
/// sites are not patched.
#[track_caller]
pub fn assert_site_patched_to_func<K, F: Copy>(shim: F, key: &K, first: impl FnOnce()) {
    let key_addr = key as *const K as usize;
    let site = patching().then(|| only_site(addr(shim), key_addr));
    if let Some(site) = site
        && call_target(site) != Some(func_of(key))
    {
        assert_calls(site, trampoline(), "trampoline");
    }
    first();
    static_call::flush();
    if let Some(site) = site {
        assert_calls(site, func_of(key), "the key's function (adapter)");
    }
}
