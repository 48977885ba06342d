//! The code writer, and the Linux facts it relies on. This is the only module that changes
//! instruction bytes or page protections.
//!
//! The rule, in three lines:
//! 1. A site is written with one locked 8-byte compare-exchange on the aligned quadword holding
//!    its whole instruction, only if that quadword still holds what was verified; the old and the
//!    new instruction are each correct to execute at every moment.
//! 2. A page goes from the protection it has now (read under the code lock) to that plus write,
//!    and back to exactly what it was; execute is never dropped (a thread running there would
//!    fault), and no page the library made writable is left writable.
//! 3. After every batch of writes, before anyone relies on them, every core running this process
//!    is serialised with `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)` (Intel SDM vol. 3 §8.1.3).

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::diagnostics::Stats;
use crate::os::faults::{self, Step};

// <linux/membarrier.h>
const MEMBARRIER_CMD_QUERY: c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: c_int = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: c_int = 1 << 6;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn membarrier(cmd: c_int) -> Result<i64, i32> {
    // SAFETY: membarrier takes (cmd, flags, cpu_id) by value and touches no user memory.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as c_int, 0 as c_int) };
    if r < 0 { Err(errno()) } else { Ok(r) }
}

/// Registers this process for core-serialising membarriers. Needed once; survives `fork`.
pub(crate) fn register_core_sync() -> Result<(), i32> {
    let supported = membarrier(MEMBARRIER_CMD_QUERY)?;
    let needed = (MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE
        | MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) as i64;
    if supported & needed != needed {
        return Err(libc::EINVAL);
    }
    membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE).map(drop)
}

/// Serialises every core that runs a thread of this process: after it returns, no thread can
/// execute an instruction fetched before our last write. `update` also runs it once before it
/// publishes anything, to find out that it would fail while nothing has changed yet.
pub(crate) fn sync_cores() -> Result<(), i32> {
    STATS.core_syncs.fetch_add(1, Ordering::Relaxed);
    if let Some(errno) = faults::fails(Step::Sync) {
        return Err(errno);
    }
    membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE).map(drop)
}

/// Sleeps while `word` holds `expected` (or until woken; spurious wake-ups happen).
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32) {
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; no timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            core::ptr::null::<libc::timespec>(),
        );
    }
}

/// Sleeps while `word` holds `expected`, for at most `millis` milliseconds.
pub(crate) fn futex_wait_for(word: &AtomicU32, expected: u32, millis: u64) {
    let timeout = libc::timespec {
        tv_sec: (millis / 1000) as libc::time_t,
        tv_nsec: ((millis % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 and `timeout` a valid relative timespec for the
    // duration of the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &timeout as *const libc::timespec,
        );
    }
}

/// Milliseconds of `CLOCK_MONOTONIC`.
pub(crate) fn monotonic_millis() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
}

/// Every signal blocked on the calling thread until dropped, when the previous mask comes back.
pub(crate) struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    pub(crate) fn new() -> SignalsBlocked {
        // SAFETY: plain libc calls on local signal sets; `all` is initialised by sigfillset and
        // `old` written by pthread_sigmask before it is read.
        unsafe {
            let mut all: libc::sigset_t = core::mem::zeroed();
            let mut old: libc::sigset_t = core::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new` on this same thread (the guard is not Send:
        // `sigset_t` is plain data, but it is only created and dropped within one function).
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, core::ptr::null_mut()) };
    }
}

/// Wakes up to `n` threads sleeping on `word`. Async-signal-safe.
pub(crate) fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not dereference anything else.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        );
    }
}

/// Whether a seccomp filter (or strict mode) applies to the calling thread. Filters are per
/// thread: the one that initialises the library is the one whose filters the worker inherits.
/// (`/proc/self/status` would describe the main thread.)
pub(crate) fn seccomp_filtered() -> bool {
    let status = std::fs::read_to_string("/proc/thread-self/status")
        .or_else(|_| std::fs::read_to_string("/proc/self/status"));
    status.is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .is_some_and(|mode| mode.trim() != "0")
    })
}

/// Whether the process runs under valgrind: valgrind's `RUNNING_ON_VALGRIND` client request. On
/// a real CPU the magic sequence does nothing (four rotations of rdi by 128 bits in all, and
/// `xchg rbx, rbx`) and rdx keeps its default, 0; valgrind recognises it and returns the number
/// of valgrinds it runs under.
pub(crate) fn running_on_valgrind() -> bool {
    const VG_USERREQ_RUNNING_ON_VALGRIND: u64 = 0x1001;
    let request: [u64; 6] = [VG_USERREQ_RUNNING_ON_VALGRIND, 0, 0, 0, 0, 0];
    let mut result: u64 = 0;
    // SAFETY: on hardware the block only rotates rdi back to its value (declared clobbered
    // anyway) and exchanges rbx with itself; under valgrind it reads `request` through rax and
    // writes rdx. No stack use. The rotations write CF and OF, so the block does not claim
    // `preserves_flags`.
    unsafe {
        core::arch::asm!(
            "rol rdi, 3",
            "rol rdi, 13",
            "rol rdi, 61",
            "rol rdi, 51",
            "xchg rbx, rbx",
            in("rax") request.as_ptr(),
            inout("rdx") result,
            inout("rdi") 0u64 => _,
            options(nostack),
        );
    }
    result != 0
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

/// A page-aligned range of one executable segment, with the protection the loader gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub start: usize,
    pub end: usize,
    pub prot: c_int,
}

impl Segment {
    pub fn contains(&self, start: usize, end: usize) -> bool {
        self.start <= start && end <= self.end
    }
}

/// The loaded object (executable or shared library) that holds this copy of the library.
#[derive(Debug)]
pub(crate) struct Object {
    /// Its executable PT_LOAD segments, trimmed to pages no other segment shares.
    pub exec: Vec<Segment>,
    /// All its PT_LOAD segments, as byte ranges: where its keys can be.
    pub loaded: Vec<(usize, usize)>,
    /// True for the main program (first in `dl_iterate_phdr` order).
    pub is_main: bool,
}

impl Object {
    pub fn exec_segment(&self, start: usize, end: usize) -> Option<&Segment> {
        self.exec.iter().find(|s| s.contains(start, end))
    }

    /// The lowest and highest address of its executable segments: every site lies in between.
    pub fn code_span(&self) -> Option<(usize, usize)> {
        let lo = self.exec.iter().map(|s| s.start).min()?;
        let hi = self.exec.iter().map(|s| s.end).max()?;
        Some((lo, hi))
    }

    pub fn holds_data(&self, addr: usize, len: usize) -> bool {
        self.loaded
            .iter()
            .any(|&(s, e)| s <= addr && addr + len <= e)
    }
}

/// Finds the object whose executable segment contains `addr`.
pub(crate) fn find_object(addr: usize, page: usize) -> Option<Object> {
    struct Search {
        addr: usize,
        page: usize,
        index: usize,
        found: Option<Object>,
    }

    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the `Search` passed below, `info` is valid during the callback.
        let (search, info) = unsafe { (&mut *(data as *mut Search), &*info) };
        let index = search.index;
        search.index += 1;
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: the loader guarantees dlpi_phnum headers at dlpi_phdr.
        let phdrs =
            unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        let base = info.dlpi_addr as usize;
        let loads: Vec<_> = phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD).collect();
        let holds = loads.iter().any(|p| {
            let start = base + p.p_vaddr as usize;
            p.p_flags & libc::PF_X != 0
                && start <= search.addr
                && search.addr < start + p.p_memsz as usize
        });
        if !holds {
            return 0;
        }
        let page = search.page;
        let down = |a: usize| a & !(page - 1);
        let up = |a: usize| (a + page - 1) & !(page - 1);
        let ranges: Vec<(usize, usize, u32)> = loads
            .iter()
            .map(|p| {
                let start = base + p.p_vaddr as usize;
                (start, start + p.p_memsz as usize, p.p_flags)
            })
            .collect();
        let mut exec = Vec::new();
        for &(start, end, flags) in ranges.iter().filter(|r| r.2 & libc::PF_X != 0) {
            let mut seg = Segment {
                start: down(start),
                end: up(end),
                prot: prot_of(flags),
            };
            // A page shared with another segment has someone else's protection: leave it out.
            for &(os, oe, of) in &ranges {
                if (os, oe, of) == (start, end, flags) {
                    continue;
                }
                if down(os) < seg.start + page && up(oe) > seg.start {
                    seg.start += page;
                }
                if down(os) < seg.end && up(oe) > seg.end - page {
                    seg.end -= page;
                }
            }
            if seg.start < seg.end {
                exec.push(seg);
            }
        }
        let loaded = ranges.iter().map(|&(s, e, _)| (s, e)).collect();
        search.found = Some(Object {
            exec,
            loaded,
            is_main: index == 0,
        });
        1
    }

    let mut search = Search {
        addr,
        page,
        index: 0,
        found: None,
    };
    // SAFETY: `visit` matches the callback type and only uses `search` during this call.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut search as *mut Search as *mut c_void) };
    search.found
}

fn prot_of(flags: u32) -> c_int {
    let mut prot = 0;
    if flags & libc::PF_R != 0 {
        prot |= libc::PROT_READ;
    }
    if flags & libc::PF_W != 0 {
        prot |= libc::PROT_WRITE;
    }
    if flags & libc::PF_X != 0 {
        prot |= libc::PROT_EXEC;
    }
    prot
}

/// Keeps the shared library holding `addr` loaded for good. Its code runs on the worker
/// thread, so unloading it would pull the code from under a running thread. Returns false if
/// the library could not be pinned.
pub(crate) fn pin_object_of(addr: usize) -> bool {
    // SAFETY: dladdr only reads loader state; `info` is plain data.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0 || info.dli_fname.is_null() {
        return false;
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the loader. RTLD_NOLOAD never loads
    // anything new; RTLD_NODELETE marks the already-loaded object as never to be unloaded. The
    // handle is deliberately never closed.
    let handle = unsafe {
        libc::dlopen(
            info.dli_fname,
            libc::RTLD_LAZY | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
        )
    };
    !handle.is_null()
}

/// Reads `buf.len()` bytes of code at `addr`.
///
/// # Safety
/// The range must be mapped and readable (inside one of our object's executable segments).
pub(crate) unsafe fn read_code(addr: usize, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        // SAFETY: in range by the caller's promise. Volatile: the bytes are code that may be
        // rewritten outside Rust's model (by another patcher or a debugger).
        *b = unsafe { core::ptr::read_volatile((addr + i) as *const u8) };
    }
}

/// Reads the aligned quadword at `addr`.
///
/// # Safety
/// `addr` must be 8-aligned and inside one of our object's executable segments.
pub(crate) unsafe fn read_word(addr: usize) -> u64 {
    // SAFETY: aligned and mapped by the caller's promise; an atomic load so that it pairs with
    // the compare-exchange writers.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }.load(Ordering::Relaxed)
}

/// One site to rewrite: the aligned quadword at `addr`, from `old` to `new`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Write {
    pub addr: usize,
    /// Where in the quadword the instruction being rewritten starts (0 for thunk code).
    pub insn_at: usize,
    pub old: u64,
    pub new: u64,
    /// Set by `write_batch`: the quadword held `old` and now holds `new`.
    pub done: bool,
}

/// Why a batch failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// A page could not be made writable (errno). Nothing was written.
    Protect(i32),
    /// The writes were made but the cores could not be serialised (errno).
    Sync(i32),
}

/// Where `map_code_near` looks for a free page range, relative to the code it must be near:
/// first just below it, `NEAR_TRIES` ranges `NEAR_STEP` apart, then farther below and above,
/// `FAR_TRIES` ranges `FAR_STEP` apart on each side (all well inside ±2 GiB).
const NEAR_TRIES: usize = 16;
const NEAR_STEP: usize = 64 << 10;
const FAR_TRIES: usize = 24;
const FAR_STEP: usize = 64 << 20;

/// Maps `len` bytes (a multiple of the page size) of new code near `[lo, hi)`, where a
/// `call rel32` from anywhere in that range reaches all of it (`reaches`), filled with `int3`,
/// and returns its address. The pages are mapped read-write, filled, then made read-execute, the
/// protection they keep: code is put there later with `write_batch`, like any site, inside an
/// rwx window and followed by a core sync.
///
/// Placement never replaces a mapping (`MAP_FIXED_NOREPLACE`; on kernels before 4.17 the flag
/// is ignored, the address is only a hint, and a result out of reach is unmapped). Ranges just
/// below the code come first, so as not to take the room the heap grows into above a program's
/// data.
///
/// Fails with ENOMEM if no range within reach is free, or with the errno of `mprotect` if new
/// executable memory is refused (MDWE, SELinux `execmem`).
pub(crate) fn map_code_near(
    lo: usize,
    hi: usize,
    len: usize,
    page: usize,
    reaches: impl Fn(usize, usize) -> bool,
) -> Result<Segment, i32> {
    if let Some(errno) = faults::fails(Step::MapCode) {
        return Err(errno);
    }
    let below = lo & !(page - 1);
    let above = hi.next_multiple_of(page);
    let near = (0..NEAR_TRIES).map(|k| below.checked_sub(len + k * NEAR_STEP));
    let far = (1..=FAR_TRIES).flat_map(|k| {
        [
            below.checked_sub(len + k * FAR_STEP),
            above.checked_add(k * FAR_STEP),
        ]
    });
    for hint in near.chain(far).flatten() {
        if !reaches(hint, len) {
            continue;
        }
        // SAFETY: a fresh private anonymous mapping; MAP_FIXED_NOREPLACE fails rather than
        // replace anything already mapped at `hint`.
        let p = unsafe {
            libc::mmap(
                hint as *mut c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            match errno() {
                libc::EEXIST | libc::EPERM => continue, // taken, or below mmap_min_addr
                e => return Err(e),
            }
        }
        let at = p as usize;
        if !reaches(at, len) {
            // SAFETY: the mapping was just made, by us, and nothing refers to it.
            unsafe { libc::munmap(p, len) };
            continue;
        }
        // SAFETY: `len` writable bytes were just mapped at `p`; int3 everywhere, so that a jump
        // to a slot not yet written traps instead of running zeros.
        unsafe { core::ptr::write_bytes(p as *mut u8, 0xcc, len) };
        let prot = libc::PROT_READ | libc::PROT_EXEC;
        // SAFETY: our own fresh mapping, never executed yet; from now on it is code.
        if unsafe { libc::mprotect(p, len, prot) } != 0 {
            let e = errno();
            // SAFETY: as above; nothing refers to it.
            unsafe { libc::munmap(p, len) };
            return Err(e);
        }
        STATS
            .thunk_pages
            .fetch_add((len / page) as u64, Ordering::Relaxed);
        return Ok(Segment {
            start: at,
            end: at + len,
            prot,
        });
    }
    Err(libc::ENOMEM)
}

/// Counters for `stats()`. Relaxed: they order nothing.
pub(crate) struct Counters {
    pub batches: AtomicU64,
    pub writes: AtomicU64,
    pub mprotects: AtomicU64,
    pub core_syncs: AtomicU64,
    pub rwx_nanos: AtomicU64,
    pub max_rwx_nanos: AtomicU64,
    pub thunk_pages: AtomicU64,
    /// Windows by duration: entry `i` counts those of `2^i ..= 2^(i+1) - 1` nanoseconds.
    pub rwx_windows: [AtomicU64; RWX_BUCKETS],
}

/// Buckets of the window-duration histogram: the last one takes everything from 2^31 ns (2 s).
pub(crate) const RWX_BUCKETS: usize = 32;

pub(crate) static STATS: Counters = Counters {
    batches: AtomicU64::new(0),
    writes: AtomicU64::new(0),
    mprotects: AtomicU64::new(0),
    core_syncs: AtomicU64::new(0),
    rwx_nanos: AtomicU64::new(0),
    max_rwx_nanos: AtomicU64::new(0),
    thunk_pages: AtomicU64::new(0),
    rwx_windows: [const { AtomicU64::new(0) }; RWX_BUCKETS],
};

pub(crate) fn stats() -> Stats {
    let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Stats {
        batches: r(&STATS.batches),
        writes: r(&STATS.writes),
        mprotects: r(&STATS.mprotects),
        core_syncs: r(&STATS.core_syncs),
        rwx_nanos: r(&STATS.rwx_nanos),
        max_rwx_nanos: r(&STATS.max_rwx_nanos),
        thunk_pages: r(&STATS.thunk_pages),
        rwx_windows: core::array::from_fn(|i| r(&STATS.rwx_windows[i])),
    }
}

/// The code lock: one futex word shared by every copy of this crate linked into the same object
/// (two semver-incompatible versions in one executable). Each copy has its own patch lock and
/// registry, but they patch pages of the same text, and one copy's `mprotect` back to `r-x`
/// would fault the other's write in progress. So every copy holds this lock while it has pages
/// open for writing.
///
/// The copies find the same word without sharing a Rust symbol: each defines it as a hidden
/// *common* symbol, which the linker (and the assembler, under fat LTO) merges into one. Hidden,
/// so a shared library's copy has its own: its pages are its own too.
///
/// Its protocol is an ABI between crate versions and must never change (a new protocol needs a
/// new name): 0 unlocked, 1 locked, 2 locked with waiters; lock by compare-exchange 0 → 1, else
/// swap in 2 and `FUTEX_WAIT` while the swap returns non-zero; unlock by swapping in 0 and
/// `FUTEX_WAKE`ing one waiter if the old value was 2.
mod code_lock {
    use core::sync::atomic::{AtomicU32, Ordering};

    core::arch::global_asm!(
        ".hidden static_call_code_lock_v1",
        ".comm static_call_code_lock_v1, 4, 4"
    );

    unsafe extern "C" {
        static static_call_code_lock_v1: AtomicU32;
    }

    fn word() -> &'static AtomicU32 {
        // SAFETY: a 4-byte, 4-aligned zero-initialised common symbol, only ever accessed
        // atomically, by every copy of this crate.
        unsafe { &static_call_code_lock_v1 }
    }

    /// Held while code pages are writable.
    pub(crate) struct Held(());

    pub(crate) fn lock() -> Held {
        let w = word();
        // Acquire: the previous holder's writes (and page restores) happen before ours.
        if w.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while w.swap(2, Ordering::Acquire) != 0 {
                super::futex_wait(w, 2);
            }
        }
        Held(())
    }

    impl Drop for Held {
        fn drop(&mut self) {
            // Release: our writes and restores happen before the next holder's.
            if word().swap(0, Ordering::Release) == 2 {
                super::futex_wake(word(), 1);
            }
        }
    }

    /// The lock word's address, for tests that check the copies share it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn address() -> usize {
        word() as *const AtomicU32 as usize
    }
}

/// A run of contiguous pages opened for writing together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    start: usize,
    len: usize,
    /// The protection the pages have now (before opening), and get back.
    prot: c_int,
}

/// The page ranges covering `writes` (sorted by address), each inside one segment of `exec`:
/// contiguous pages share one range. That costs no extra exposure: every window of a batch is
/// open at once anyway (so that a refusal leaves nothing written), it only saves system calls.
/// Their protections are not known yet (`prot` is the segment's, a placeholder): they are read
/// under the code lock by `with_current_protection`.
fn windows(writes: &[Write], exec: &[Segment], page: usize) -> Vec<Window> {
    let mut out: Vec<Window> = Vec::new();
    for w in writes {
        let p = w.addr & !(page - 1);
        let seg = exec
            .iter()
            .find(|s| s.contains(p, p + page))
            .expect("verified site outside segment");
        match out.last_mut() {
            Some(last) if last.start + last.len > p => {}
            Some(last) if last.start + last.len == p && seg.contains(last.start, p + page) => {
                last.len += page
            }
            _ => out.push(Window {
                start: p,
                len: page,
                prot: seg.prot,
            }),
        }
    }
    out
}

/// `windows` split where the pages' current protections differ, each piece with the protection
/// its pages have now. Runs under the code lock, so that no other copy of this crate has pages
/// open meanwhile: what it reads is what the program (or the loader) set, never another copy's
/// temporary `rwx`.
fn with_current_protection(windows: &[Window]) -> Result<Vec<Window>, i32> {
    let mut out: Vec<Window> = Vec::with_capacity(windows.len());
    for w in windows {
        let end = w.start + w.len;
        let mut at = w.start;
        while at < end {
            let (vma_end, prot) = protection_at(at)?;
            let to = vma_end.min(end);
            match out.last_mut() {
                Some(last) if last.start + last.len == at && last.prot == prot => {
                    last.len += to - at
                }
                _ => out.push(Window {
                    start: at,
                    len: to - at,
                    prot,
                }),
            }
            at = to;
        }
    }
    Ok(out)
}

/// The protection of the mapping that holds `addr`, and where that mapping ends. Asks the kernel
/// with the `PROCMAP_QUERY` ioctl on `/proc/self/maps` (Linux 6.11+, about half a microsecond),
/// else reads `/proc/self/maps` (older kernels, and valgrind, which does not know the ioctl).
fn protection_at(addr: usize) -> Result<(usize, c_int), i32> {
    match procmap_query(addr) {
        Err(libc::ENOTTY | libc::EINVAL | libc::ENOSYS) | Err(NO_QUERY) => {
            maps::protection_at(addr)
        }
        other => other,
    }
}

/// Not an errno: `PROCMAP_QUERY` is not to be tried (valgrind).
const NO_QUERY: i32 = -1;

// <linux/fs.h>: struct procmap_query and PROCMAP_QUERY = _IOWR('f', 17, struct procmap_query).
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}
const PROCMAP_QUERY: libc::c_ulong =
    (3 << 30) | ((size_of::<ProcmapQuery>() as libc::c_ulong) << 16) | (0x66 << 8) | 17;
const PROCMAP_QUERY_VMA_READABLE: u64 = 1;
const PROCMAP_QUERY_VMA_WRITABLE: u64 = 2;
const PROCMAP_QUERY_VMA_EXECUTABLE: u64 = 4;

fn procmap_query(addr: usize) -> Result<(usize, c_int), i32> {
    let fd = maps::fd()?;
    let mut q = ProcmapQuery {
        size: size_of::<ProcmapQuery>() as u64,
        query_addr: addr as u64,
        ..ProcmapQuery::default()
    };
    // SAFETY: PROCMAP_QUERY reads and writes the `size` bytes of `q`; no name or build-id
    // buffers are given (their sizes are 0).
    if unsafe { libc::ioctl(fd, PROCMAP_QUERY, &mut q as *mut ProcmapQuery) } != 0 {
        return Err(errno());
    }
    let mut prot = 0;
    for (flag, p) in [
        (PROCMAP_QUERY_VMA_READABLE, libc::PROT_READ),
        (PROCMAP_QUERY_VMA_WRITABLE, libc::PROT_WRITE),
        (PROCMAP_QUERY_VMA_EXECUTABLE, libc::PROT_EXEC),
    ] {
        if q.vma_flags & flag != 0 {
            prot |= p;
        }
    }
    Ok((q.vma_end as usize, prot))
}

/// `/proc/self/maps`: an open descriptor for `PROCMAP_QUERY`, and the text for older kernels.
mod maps {
    use core::ffi::c_int;
    use core::sync::atomic::{AtomicI32, Ordering};

    /// The descriptor, and the process that opened it: after `fork` it still describes the
    /// parent, so a child opens its own. Relaxed: only used under the code lock.
    static FD: AtomicI32 = AtomicI32::new(-1);
    static PID: AtomicI32 = AtomicI32::new(0);

    /// The descriptor of this process's `/proc/self/maps`, opened the first time.
    pub(super) fn fd() -> Result<c_int, i32> {
        if super::running_on_valgrind() {
            return Err(super::NO_QUERY);
        }
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        let fd = FD.load(Ordering::Relaxed);
        if fd >= 0 && PID.load(Ordering::Relaxed) == pid {
            return Ok(fd);
        }
        if fd >= 0 {
            // The parent's descriptor, inherited through fork: not ours to query.
            // SAFETY: a descriptor this module opened and nothing else uses.
            unsafe { libc::close(fd) };
            FD.store(-1, Ordering::Relaxed);
        }
        // SAFETY: a NUL-terminated path; the descriptor is kept for the life of the process.
        let fd = unsafe {
            libc::open(
                c"/proc/self/maps".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(super::errno());
        }
        FD.store(fd, Ordering::Relaxed);
        PID.store(pid, Ordering::Relaxed);
        Ok(fd)
    }

    /// The protection of the mapping holding `addr` and its end, from the text of
    /// `/proc/self/maps`.
    pub(super) fn protection_at(addr: usize) -> Result<(usize, c_int), i32> {
        let text = std::fs::read_to_string("/proc/self/maps")
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        text.lines()
            .find_map(|line| {
                let (range, rest) = line.split_once(' ')?;
                let (a, b) = range.split_once('-')?;
                let (start, end) = (
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                );
                if !(start..end).contains(&addr) {
                    return None;
                }
                let perms = rest.as_bytes();
                let mut prot = 0;
                for (i, (c, p)) in [
                    (b'r', libc::PROT_READ),
                    (b'w', libc::PROT_WRITE),
                    (b'x', libc::PROT_EXEC),
                ]
                .into_iter()
                .enumerate()
                {
                    if perms.get(i) == Some(&c) {
                        prot |= p;
                    }
                }
                Some((end, prot))
            })
            .ok_or(libc::ENOMEM)
    }
}

fn protect(start: usize, len: usize, prot: c_int) -> Result<(), i32> {
    STATS.mprotects.fetch_add(1, Ordering::Relaxed);
    if let Some(errno) = faults::fails(Step::Protect) {
        return Err(errno);
    }
    // SAFETY: the range is page-aligned and inside one of our object's executable segments (or
    // our own thunk pages); the protection keeps whatever execute permission the pages had, so
    // code running there keeps running.
    let r = unsafe { libc::mprotect(start as *mut c_void, len, prot) };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

/// Writes a batch: reads the pages' protections, opens the pages, compare-exchanges each site,
/// restores the pages, then serialises all cores once. `exec` are the segments the sites were
/// verified to lie in.
///
/// All or nothing with respect to protections: if any page cannot be opened, the ones already
/// opened are restored and nothing is written. A site whose quadword no longer holds `old` is
/// left alone (`done` stays false). Between opening and restoring there is nothing but the
/// compare-exchanges: no allocation, no lock, no system call.
pub(crate) fn write_batch(
    writes: &mut [Write],
    exec: &[Segment],
    page: usize,
) -> Result<(), WriteError> {
    if writes.is_empty() {
        return Ok(());
    }
    writes.sort_unstable_by_key(|w| w.addr);
    let spans = windows(writes, exec, page);
    let held = code_lock::lock();
    let windows = with_current_protection(&spans).map_err(WriteError::Protect)?;
    let opened_at = Instant::now();
    for (i, w) in windows.iter().enumerate() {
        if w.prot & libc::PROT_WRITE != 0 {
            continue;
        }
        if let Err(e) = protect(w.start, w.len, w.prot | libc::PROT_WRITE) {
            restore(&windows[..i]);
            return Err(WriteError::Protect(e));
        }
    }
    let mut written = 0;
    for w in writes.iter_mut() {
        // SAFETY: `addr` is an 8-aligned site quadword inside a page opened above; the
        // compare-exchange is atomic, so a thread fetching these bytes sees either the old or
        // the new instruction, each complete.
        let word = unsafe { AtomicU64::from_ptr(w.addr as *mut u64) };
        if faults::fails(Step::Cmpxchg).is_some() {
            simulate_foreign_byte(word, w);
        }
        w.done = word
            .compare_exchange(w.old, w.new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        written += w.done as u64;
    }
    restore(&windows);
    drop(held);
    note_window(opened_at.elapsed().as_nanos() as u64);
    STATS.batches.fetch_add(1, Ordering::Relaxed);
    STATS.writes.fetch_add(written, Ordering::Relaxed);
    if written == 0 {
        return Ok(());
    }
    sync_cores().map_err(WriteError::Sync)
}

/// Fault injection: a debugger's breakpoint lands on the instruction just before we write it
/// (on an empty thunk slot, already all `int3`, some other byte does).
fn simulate_foreign_byte(word: &AtomicU64, w: &Write) {
    let mut bytes = word.load(Ordering::SeqCst).to_le_bytes();
    let was = bytes[w.insn_at];
    faults::note_foreign(w.addr + w.insn_at, was);
    bytes[w.insn_at] = if was == 0xcc { 0xf4 } else { 0xcc };
    word.store(u64::from_le_bytes(bytes), Ordering::SeqCst);
}

fn restore(windows: &[Window]) {
    for w in windows.iter().filter(|w| w.prot & libc::PROT_WRITE == 0) {
        // Dropping write access is always allowed (MDWE only forbids gaining exec); retry once
        // in case of a transient ENOMEM while the kernel splits or merges mappings.
        if protect(w.start, w.len, w.prot).is_err() {
            let _ = protect(w.start, w.len, w.prot);
        }
    }
}

/// Counts one window during which pages were writable and executable, of `nanos`.
fn note_window(nanos: u64) {
    STATS.rwx_nanos.fetch_add(nanos, Ordering::Relaxed);
    STATS.max_rwx_nanos.fetch_max(nanos, Ordering::Relaxed);
    let bucket = (u64::BITS - 1 - nanos.max(1).leading_zeros()) as usize;
    STATS.rwx_windows[bucket.min(RWX_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(addr: usize) -> Write {
        Write {
            addr,
            insn_at: 0,
            old: 0,
            new: 0,
            done: false,
        }
    }

    #[test]
    fn windows_merge_contiguous_pages_within_a_segment() {
        let page = 4096;
        let exec = [Segment {
            start: 0x10000,
            end: 0x40000,
            prot: 5,
        }];
        let ws = [
            write(0x10008),
            write(0x10ff8),
            write(0x11000),
            write(0x13000),
        ];
        assert_eq!(
            windows(&ws, &exec, page),
            vec![
                Window {
                    start: 0x10000,
                    len: 0x2000,
                    prot: 5
                },
                Window {
                    start: 0x13000,
                    len: 0x1000,
                    prot: 5
                }
            ]
        );
    }

    #[test]
    fn windows_span_every_contiguous_page_of_a_segment() {
        let page = 4096;
        let exec = [
            Segment {
                start: 0,
                end: 0x100000,
                prot: 5,
            },
            Segment {
                start: 0x100000,
                end: 0x200000,
                prot: 7,
            },
        ];
        let mut ws: Vec<_> = (0..40).map(|i| write(i * page)).collect();
        ws.extend((0..4).map(|i| write(0x100000 + i * page)));
        let w = windows(&ws, &exec, page);
        assert_eq!(
            w,
            vec![
                Window {
                    start: 0,
                    len: 40 * page,
                    prot: 5
                },
                Window {
                    start: 0x100000,
                    len: 4 * page,
                    prot: 7
                },
            ],
            "one window per run of pages, never across segments"
        );
    }

    /// Three fresh pages, `r-x`, `rwx`, `r-x`: one window over them comes back as three, each
    /// with the protection it has now, and the ioctl and the text of /proc/self/maps agree.
    #[test]
    fn current_protections_split_a_window_where_they_differ() {
        let page = page_size();
        let rx = libc::PROT_READ | libc::PROT_EXEC;
        let rwx = rx | libc::PROT_WRITE;
        // SAFETY: a fresh private mapping of our own, changed and unmapped only here.
        let p = unsafe {
            let p = libc::mmap(
                core::ptr::null_mut(),
                3 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mprotect(p, 3 * page, rx), 0);
            assert_eq!(libc::mprotect(p.byte_add(page), page, rwx), 0);
            p as usize
        };
        let window = Window {
            start: p,
            len: 3 * page,
            prot: 0,
        };
        let got = with_current_protection(&[window]).unwrap();
        let at = |i: usize, prot| Window {
            start: p + i * page,
            len: page,
            prot,
        };
        assert_eq!(got, vec![at(0, rx), at(1, rwx), at(2, rx)]);
        for i in 0..3 {
            let text = maps::protection_at(p + i * page).unwrap();
            match procmap_query(p + i * page) {
                Ok(by_ioctl) => assert_eq!(by_ioctl, text, "page {i}"),
                Err(e) => println!("note: PROCMAP_QUERY unavailable here ({e})"),
            }
        }
        // SAFETY: our own mapping, no longer used.
        unsafe { libc::munmap(p as *mut c_void, 3 * page) };
    }

    #[test]
    fn the_code_lock_is_a_real_word_and_not_held() {
        let held = code_lock::lock();
        drop(held);
        let again = code_lock::lock();
        drop(again);
        assert_ne!(code_lock::address(), 0);
    }

    #[test]
    fn not_under_valgrind_or_seccomp_here() {
        // The unit tests do not run under valgrind or a seccomp filter in CI; the client request
        // must answer 0 on hardware.
        if std::env::var_os("STATIC_CALL_EXPECT_VALGRIND").is_none() {
            assert!(!running_on_valgrind());
        }
    }

    #[test]
    fn own_object_is_found_with_an_executable_segment() {
        let page = page_size();
        let here = own_object_is_found_with_an_executable_segment as *const () as usize;
        let obj = find_object(here, page).expect("test binary");
        assert!(obj.is_main);
        assert!(obj.exec_segment(here, here + 1).is_some());
        assert!(
            obj.exec
                .iter()
                .all(|s| s.prot & libc::PROT_EXEC != 0 && s.prot & libc::PROT_WRITE == 0)
        );
        static DATA: u8 = 0;
        assert!(obj.holds_data(&DATA as *const u8 as usize, 1));
    }
}
