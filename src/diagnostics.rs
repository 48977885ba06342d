//! What the library reports: the state of each site, why a site is not patched, why patching is
//! off, and counters of the work done. Nothing degrades silently: every site that stays on the
//! trampoline says why, and [`status`](crate::status) says why patching is off.

use core::fmt;

/// Why patching is switched off for the whole process. Calls stay correct: every site keeps
/// going through the trampoline, which always jumps to the key's current target.
/// ```
/// use static_call::{Disabled, status};
///
/// static_call::init();
/// match status().patching {
///     Ok(()) => println!("patching"),
///     Err(Disabled::Unsupported) => println!("portable fallback build"),
///     Err(why) => println!("patching is off: {why}"),
/// }
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disabled {
    /// This build uses the portable fallback (not x86-64 Linux, or the `force-fallback`
    /// feature): every call is an atomic load and an indirect call.
    Unsupported,
    /// The `STATIC_CALL_DISABLE` environment variable was set (to anything but `0` or empty)
    /// when the library initialised.
    EnvVar,
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` is unavailable, so cores that
    /// run patched code could not be serialised. Holds the errno of the failed registration at
    /// start-up, or of a later call that failed (a seccomp filter installed afterwards).
    NoCoreSync {
        /// errno from `membarrier`.
        errno: i32,
    },
    /// The library could not find its own object among the loaded ones (`dl_iterate_phdr`).
    ObjectNotFound,
    /// The library lives in a shared library that it could not pin in memory
    /// (`dlopen(RTLD_NOLOAD | RTLD_NODELETE)` failed). Its worker thread runs the library's
    /// code, so patching stays off rather than risk the code being unloaded under it.
    PinFailed,
    /// `mprotect` refused to make a code page writable and executable (`prctl(PR_SET_MDWE)`,
    /// SELinux `execmem`/`execmod`). Holds the errno, usually `EACCES`.
    WriteRefused {
        /// errno from `mprotect`.
        errno: i32,
    },
    /// [`unpatch_all`](crate::unpatch_all) returned every site to the trampoline.
    Unpatched,
    /// A seccomp filter was active when the library initialised. Some filters kill the process
    /// on `membarrier` or `mprotect(PROT_EXEC)`, so patching stays off unless
    /// `STATIC_CALL_SECCOMP=allow` says the filter permits both.
    Seccomp,
    /// Running under valgrind, which keeps executing its old translation of a rewritten site
    /// unless run with `--smc-check=all`. `STATIC_CALL_VALGRIND=patch` patches anyway (for runs
    /// with that flag).
    Valgrind,
}

impl fmt::Display for Disabled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disabled::Unsupported => f.write_str("this platform uses the portable fallback"),
            Disabled::EnvVar => f.write_str("STATIC_CALL_DISABLE is set"),
            Disabled::NoCoreSync { errno } => write!(
                f,
                "membarrier(PRIVATE_EXPEDITED_SYNC_CORE) is unavailable ({})",
                errno_name(*errno)
            ),
            Disabled::ObjectNotFound => {
                f.write_str("could not find this library's own code segment")
            }
            Disabled::PinFailed => {
                f.write_str("could not pin the shared library this copy of static_call lives in")
            }
            Disabled::WriteRefused { errno } => write!(
                f,
                "mprotect to read-write-execute was refused ({}; MDWE or SELinux?)",
                errno_name(*errno)
            ),
            Disabled::Unpatched => {
                f.write_str("unpatch_all() returned every site to the trampoline")
            }
            Disabled::Seccomp => f.write_str(
                "a seccomp filter is active (set STATIC_CALL_SECCOMP=allow if it permits mprotect and membarrier)",
            ),
            Disabled::Valgrind => f.write_str(
                "running under valgrind (set STATIC_CALL_VALGRIND=patch if it runs with --smc-check=all)",
            ),
        }
    }
}

/// Why a site keeps going through the trampoline instead of calling its target directly, or,
/// for a run-time site, why it is a plain indirect call ([`SiteState::Megamorphic`]).
///
/// ```
/// use static_call::{Reason, SiteState, define_static_call, static_call};
///
/// define_static_call!(K: extern "C" fn() -> u32 = one);
/// extern "C" fn one() -> u32 { 1 }
///
/// static_call!(K)();
/// static_call::flush();
/// for site in K.sites() {
///     if let SiteState::Trampoline(reason) = site.state {
///         println!("{:#x} is not patched: {reason}", site.address);
///     }
/// }
/// # let _ = Reason::TargetOutOfRange;
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Patching is off for the whole process.
    Disabled(Disabled),
    /// The return address does not follow one of this library's call sites inside its own
    /// object's code: the trampoline was reached some other way (a function pointer, a forged
    /// return address, hand-written code).
    NotASite,
    /// The site's bytes do not prove that it belongs to the key it was called with. Reached by a
    /// key other than its own, such a site must never be bound to either key.
    KeyNotProven,
    /// Someone else changed the site's bytes (a debugger's breakpoint, say) before its first
    /// patch, so they did not prove its key. They are never overwritten.
    ForeignBytes,
    /// The key's target is more than ±2 GiB from the site, beyond a `call rel32`, and no near
    /// thunk could be made for it ([`Status::thunk_error`] says why). The site is patched again
    /// once the key points somewhere it can reach.
    TargetOutOfRange,
    /// `mprotect` failed with an error that may pass (`ENOMEM`, near `vm.max_map_count`): the
    /// worker tries again later, backing off, and patching stays on.
    WriteFailed {
        /// errno from `mprotect`.
        errno: i32,
    },
    /// A run-time site saw more targets than a guard stub holds (2 in a normal build, 8 in a
    /// retpoline build): it calls whatever its key holds with one indirect call.
    TooManyTargets,
    /// A run-time site changed form too often (more than 8 times in a row, 20 in a retpoline
    /// build, earning one change back per second), so it stopped following its keys' targets:
    /// an indirect call.
    TooManyChanges,
    /// No guard stub could be made for a run-time site (the code pool is used up, new executable
    /// memory was refused, or a far target has no thunk): an indirect call.
    NoRoomForStub,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Disabled(d) => write!(f, "patching is off: {d}"),
            Reason::NotASite => {
                f.write_str("the return address is not after one of our call sites")
            }
            Reason::KeyNotProven => f.write_str("the site's bytes do not prove its key"),
            Reason::ForeignBytes => f.write_str("the site's bytes were changed by someone else"),
            Reason::TargetOutOfRange => {
                f.write_str("the target is beyond ±2 GiB of the site and has no near thunk")
            }
            Reason::WriteFailed { errno } => write!(
                f,
                "mprotect failed ({}); the patcher tries again later",
                errno_name(*errno)
            ),
            Reason::TooManyTargets => {
                f.write_str("the run-time site saw more targets than a guard stub holds")
            }
            Reason::TooManyChanges => f.write_str("the run-time site changed form too often"),
            Reason::NoRoomForStub => f.write_str("no guard stub could be made for the site"),
        }
    }
}

/// The state of one call site.
///
/// ```
/// use static_call::{SiteState, define_static_call, static_call};
///
/// define_static_call!(K: extern "C" fn() -> u32 = one);
/// extern "C" fn one() -> u32 { 1 }
///
/// static_call!(K)();
/// static_call::flush();
/// let patched = K.sites().iter().filter(|s| s.state == SiteState::Patched).count();
/// println!("{patched} of {} sites call their target directly", K.sites().len());
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteState {
    /// Registered by its first call and waiting for the patcher; calls go through the trampoline.
    Pending,
    /// The site's bytes are the key's target: a direct `call` (for a target beyond ±2 GiB, a
    /// direct call of the target's near thunk), a NOP for a NULL key, `xor eax, eax` for a
    /// return-zero key.
    Patched,
    /// Calls keep going through the trampoline (correct, but slower), for this reason.
    Trampoline(Reason),
    /// Someone else's bytes are at the site now, over the library's own (a debugger's
    /// breakpoint, say): [`SiteInfo::bytes`] shows them. The library never writes over them.
    /// While they are there, an update of the key that would have to rewrite this site fails
    /// with [`ErrorKind::ForeignBytes`] and changes nothing, so that the library's bytes,
    /// once put back, still agree with the key.
    Foreign,
    /// The site's bytes are the library's, but call a target its key no longer holds. This
    /// happens only after an update failed with [`ErrorKind::UndoFailed`] naming this site, once
    /// the foreign bytes that were over it are gone; the next update of the key rewrites it.
    Stale,
    /// A run-time site ([`run_time_sites`](crate::run_time_sites)) that calls a guard stub for
    /// one target: when its key holds `target`, a call costs a direct call, a compare and a
    /// jump; otherwise the stub misses and the call goes through the trampoline.
    Monomorphic {
        /// The function the stub checks for (and jumps to).
        target: usize,
    },
    /// A run-time site that calls a guard stub for `targets` targets (a chain of compares).
    Polymorphic {
        /// How many targets the stub checks for.
        targets: usize,
    },
    /// A run-time site that calls whatever its key holds with an indirect call (through a
    /// retpoline in a retpoline build), for this reason.
    Megamorphic(Reason),
}

/// One call site, as [`StaticCall::sites`](crate::StaticCall::sites) lists it.
///
/// ```
/// use static_call::{define_static_call, static_call};
///
/// define_static_call!(K: extern "C" fn() -> u32 = one);
/// extern "C" fn one() -> u32 { 1 }
///
/// static_call!(K)();
/// for site in K.sites() {
///     println!("{site:?}"); // address in hex, state, and the five bytes there now
/// }
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SiteInfo {
    /// Address of the site's 5-byte `call` instruction.
    pub address: usize,
    /// Whether it is patched.
    pub state: SiteState,
    /// The five bytes at the site when it was listed, read from the code; `None` if the address
    /// is not inside this library's own code (a return address that follows no site of ours).
    pub bytes: Option<[u8; 5]>,
}

impl fmt::Debug for SiteInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Hex(usize);
        impl fmt::Debug for Hex {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
        struct Bytes([u8; 5]);
        impl fmt::Debug for Bytes {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let [a, b, c, d, e] = self.0;
                write!(f, "{a:02x} {b:02x} {c:02x} {d:02x} {e:02x}")
            }
        }
        f.debug_struct("SiteInfo")
            .field("address", &Hex(self.address))
            .field("state", &self.state)
            .field("bytes", &self.bytes.map(Bytes))
            .finish()
    }
}

/// An update, a [`Batch`](crate::Batch) or [`unpatch_all`](crate::unpatch_all) that could not
/// be carried out. What it leaves behind depends on the [`kind`](Self::kind); each kind's
/// documentation says, and docs/safety.md has them side by side ("What an error leaves behind").
///
/// ```
/// use static_call::{ErrorKind, define_static_call};
///
/// define_static_call!(K: extern "C" fn() -> u32 = one);
/// extern "C" fn one() -> u32 { 1 }
/// extern "C" fn two() -> u32 { 2 }
///
/// match K.try_update(two) {
///     Ok(()) => {}
///     Err(e) if matches!(e.kind, ErrorKind::WriteRefused { .. }) => {
///         eprintln!("code is no longer writable, {:?} kept its old target: {e}", K.query());
///     }
///     Err(e) => eprintln!("update failed: {e}"),
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error {
    /// The site that could not be rewritten, if one site was the cause.
    pub site: Option<usize>,
    /// What went wrong, and so what the keys and sites hold now.
    pub kind: ErrorKind,
}

/// What made an [`Error`], and what it leaves behind.
///
/// For `update`, `try_update`, `set_null`, `set_return_zero` and [`Batch`](crate::Batch), every
/// kind but [`NotSynced`](Self::NotSynced) and [`UndoFailed`](Self::UndoFailed) means that
/// **nothing changed**: every key keeps its old target and every site holds what it held.
/// [`unpatch_all`](crate::unpatch_all) works site by site instead (a site back on the
/// trampoline is correct whatever happens): after an error, the sites it could rewrite are on
/// the trampoline and the others are unchanged.
///
/// ```
/// use static_call::ErrorKind;
///
/// fn explain(kind: ErrorKind) -> &'static str {
///     match kind {
///         ErrorKind::WriteRefused { .. } => "call unpatch_all() before forbidding writable code",
///         ErrorKind::ForeignBytes => "remove the breakpoint on the site and try again",
///         _ => "see docs/safety.md",
///     }
/// }
/// assert!(explain(ErrorKind::ForeignBytes).contains("breakpoint"));
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A page holding a site that had to change could not be made writable; holds the errno
    /// (usually `EACCES`, after `prctl(PR_SET_MDWE)`). Nothing was written. Patching is off from
    /// now on ([`Disabled::WriteRefused`]), except for `ENOMEM`, which may pass: then patching
    /// stays on and the operation can simply be tried again. Call
    /// [`unpatch_all`](crate::unpatch_all) before sandboxing to keep `update` working.
    WriteRefused {
        /// errno from `mprotect`.
        errno: i32,
    },
    /// The named site calls the old target directly (or is a NOP, or `xor eax, eax`), and
    /// someone else's bytes are over it now (a debugger's breakpoint), found before writing or
    /// in the middle of the write. Any write already made was undone. [`SiteState::Foreign`]
    /// marks the site; once its bytes are back, the update can be tried again.
    ForeignBytes,
    /// `membarrier(SYNC_CORE)` failed (holds the errno) when tried before anything was
    /// published, so nothing changed. Patching is off from now on ([`Disabled::NoCoreSync`]);
    /// keys whose sites are all on the trampoline can still be updated, others cannot: call
    /// [`unpatch_all`](crate::unpatch_all) before installing a seccomp filter that denies
    /// `membarrier`.
    CoreSyncFailed {
        /// errno from `membarrier`.
        errno: i32,
    },
    /// **The change was made** (or, after a failure, undone): the keys hold the targets
    /// [`query`](crate::StaticCall::query) reports and every site's bytes agree with them, but
    /// `membarrier(SYNC_CORE)` failed afterwards (holds the errno), so a core that fetched a
    /// site's previous instruction before the write may still run it until that core is next
    /// serialised. Patching is off from now on ([`Disabled::NoCoreSync`]).
    NotSynced {
        /// errno from `membarrier`.
        errno: i32,
    },
    /// Two foreign writes within one update: it failed as for
    /// [`ForeignBytes`](Self::ForeignBytes), and while it undid its writes, someone else's bytes
    /// landed on the named site too (or its page could no longer be written). The keys hold
    /// the targets [`query`](crate::StaticCall::query) reports and every other site agrees with
    /// them; the named site ([`SiteState::Foreign`]) has this update's instruction under the
    /// foreign bytes, so once they are removed it may run a target its key does not hold, until
    /// the key is next updated. Nothing but a second code writer racing with this one can cause
    /// it.
    UndoFailed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::WriteRefused { errno } => write!(
                f,
                "a patched site's page cannot be made writable ({})",
                errno_name(errno)
            )?,
            ErrorKind::ForeignBytes => {
                f.write_str("a patched site's bytes were changed by someone else")?
            }
            ErrorKind::CoreSyncFailed { errno } => write!(
                f,
                "membarrier(SYNC_CORE) failed ({}); nothing changed",
                errno_name(errno)
            )?,
            ErrorKind::NotSynced { errno } => write!(
                f,
                "the change was made but membarrier(SYNC_CORE) failed afterwards ({})",
                errno_name(errno)
            )?,
            ErrorKind::UndoFailed => f.write_str(
                "a site's bytes were changed by someone else, and another changed while undoing",
            )?,
        }
        if let Some(site) = self.site {
            write!(f, " at site {site:#x}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// The worker thread that patches newly registered sites.
///
/// ```
/// use static_call::WorkerStatus;
///
/// static_call::init();
/// if let WorkerStatus::Failed { errno } = static_call::status().worker {
///     eprintln!("no patcher thread (errno {errno}): call static_call::flush() to patch");
/// }
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerStatus {
    /// Not started yet: no site has been queued in this process (or since `fork`).
    NotStarted,
    /// Running (sleeping when there is nothing to patch).
    Running,
    /// Could not be started; holds the OS error code. New sites are patched only by
    /// [`flush`](crate::flush) and `update`, which do the worker's job themselves.
    Failed {
        /// The OS error code from spawning the thread, or 0 if none was given.
        errno: i32,
    },
}

/// Process-wide state, from [`status`](crate::status).
///
/// ```
/// let status = static_call::status();
/// println!(
///     "patching: {:?}, worker: {:?}, {} of {} registry slots used",
///     status.patching, status.worker, status.sites, status.capacity
/// );
/// assert!(!status.registry_full);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// `Ok` if sites get patched; otherwise why not.
    pub patching: Result<(), Disabled>,
    /// The patcher thread.
    pub worker: WorkerStatus,
    /// Sites registered so far.
    pub sites: usize,
    /// How many sites the registry can hold (`STATIC_CALL_MAX_SITES`).
    pub capacity: usize,
    /// True once a site could not be registered because the registry was full. Such sites
    /// keep working through the trampoline.
    pub registry_full: bool,
    /// Far targets (beyond ±2 GiB of the code, e.g. in another shared library) that sites reach
    /// through a near thunk.
    pub thunks: usize,
    /// Why the last attempt to make a thunk failed, if it did: an errno from mapping new code
    /// near ours (`ENOMEM`: no free room within reach; `EACCES`: new executable memory refused),
    /// or 0 when all thunk pages are used. Sites of such targets stay on the trampoline with
    /// [`Reason::TargetOutOfRange`].
    pub thunk_error: Option<i32>,
    /// Whether [`StaticCall::call`](crate::StaticCall::call) is a guarded run-time site in this
    /// build (on by default in retpoline builds; `STATIC_CALL_GUARDS=on` or `off` at build time
    /// overrides that), rather than a plain indirect call. `call_guarded` and `call_indirect`
    /// choose per call.
    pub guards: bool,
    /// Guard stubs written so far (one per distinct list of targets that run-time sites guard).
    pub stubs: usize,
}

/// Counters of the patching work done so far in this process, from [`stats`](crate::stats).
///
/// ```
/// use static_call::{define_static_call, static_call};
///
/// define_static_call!(K: extern "C" fn() -> u32 = one);
/// extern "C" fn one() -> u32 { 1 }
/// extern "C" fn two() -> u32 { 2 }
///
/// static_call!(K)();
/// static_call::flush();
/// let before = static_call::stats();
/// K.update(two);
/// let after = static_call::stats();
/// println!(
///     "update: {} mprotect calls, {} core syncs",
///     after.mprotects - before.mprotects,
///     after.core_syncs - before.core_syncs
/// );
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Batches of writes (each ends with one core sync).
    pub batches: u64,
    /// Sites written (one locked 8-byte compare-exchange each).
    pub writes: u64,
    /// `mprotect` calls (opening and restoring counted separately).
    pub mprotects: u64,
    /// `membarrier(SYNC_CORE)` calls.
    pub core_syncs: u64,
    /// Total nanoseconds during which some page was writable and executable.
    pub rwx_nanos: u64,
    /// Longest single window, in nanoseconds, during which some page was writable and executable.
    pub max_rwx_nanos: u64,
    /// Pages mapped near the code for thunks to far targets (never writable once executable).
    pub thunk_pages: u64,
    /// How long each window of writable and executable pages lasted, as a histogram: entry `i`
    /// counts the windows of `2^i` to `2^(i+1) - 1` nanoseconds (the last entry, everything from
    /// about 2 s). A window lasts as long as the writing thread runs between its two `mprotect`
    /// calls, so its tail is set by the scheduler: see docs/safety.md.
    pub rwx_windows: [u64; 32],
}

impl Stats {
    /// The duration (an upper bound, in nanoseconds) under which a fraction `q` (0.0–1.0) of
    /// the windows of writable code lasted, from [`rwx_windows`](Self::rwx_windows); `None` if
    /// there was none.
    ///
    /// ```
    /// let stats = static_call::stats();
    /// if let Some(p99) = stats.rwx_window_quantile(0.99) {
    ///     println!("99% of the writable-code windows lasted under {p99} ns");
    /// }
    /// ```
    pub fn rwx_window_quantile(&self, q: f64) -> Option<u64> {
        let total: u64 = self.rwx_windows.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.rwx_windows.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some((1u64 << (i + 1)) - 1);
            }
        }
        Some(u64::MAX)
    }
}

/// A short name for an errno value.
pub(crate) fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ENOMEM => "ENOMEM",
        libc::EINVAL => "EINVAL",
        libc::ENOSYS => "ENOSYS",
        libc::EAGAIN => "EAGAIN",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// Compact encodings, for storing a reason in an atomic word: a tag byte and an errno byte.
#[cfg_attr(not(static_call_patching), allow(dead_code))]
impl Disabled {
    pub(crate) fn to_code(self) -> u16 {
        let (tag, errno) = match self {
            Disabled::Unsupported => (1, 0),
            Disabled::EnvVar => (2, 0),
            Disabled::NoCoreSync { errno } => (3, errno),
            Disabled::ObjectNotFound => (4, 0),
            Disabled::WriteRefused { errno } => (5, errno),
            Disabled::Unpatched => (6, 0),
            Disabled::Seccomp => (7, 0),
            Disabled::Valgrind => (8, 0),
            Disabled::PinFailed => (9, 0),
        };
        (tag << 8) | errno.clamp(0, 255) as u16
    }

    pub(crate) fn from_code(code: u16) -> Option<Disabled> {
        let errno = (code & 0xff) as i32;
        Some(match code >> 8 {
            1 => Disabled::Unsupported,
            2 => Disabled::EnvVar,
            3 => Disabled::NoCoreSync { errno },
            4 => Disabled::ObjectNotFound,
            5 => Disabled::WriteRefused { errno },
            6 => Disabled::Unpatched,
            7 => Disabled::Seccomp,
            8 => Disabled::Valgrind,
            9 => Disabled::PinFailed,
            _ => return None,
        })
    }
}

#[cfg_attr(not(static_call_patching), allow(dead_code))]
impl Reason {
    const NOT_A_SITE: u16 = 0x40 << 8;
    const KEY_NOT_PROVEN: u16 = 0x41 << 8;
    const FOREIGN_BYTES: u16 = 0x42 << 8;
    const TARGET_OUT_OF_RANGE: u16 = 0x43 << 8;
    const WRITE_FAILED: u16 = 0x44 << 8;
    const TOO_MANY_TARGETS: u16 = 0x45 << 8;
    const TOO_MANY_CHANGES: u16 = 0x46 << 8;
    const NO_ROOM_FOR_STUB: u16 = 0x47 << 8;

    pub(crate) fn to_code(self) -> u16 {
        match self {
            Reason::Disabled(d) => d.to_code(),
            Reason::NotASite => Self::NOT_A_SITE,
            Reason::KeyNotProven => Self::KEY_NOT_PROVEN,
            Reason::ForeignBytes => Self::FOREIGN_BYTES,
            Reason::TargetOutOfRange => Self::TARGET_OUT_OF_RANGE,
            Reason::WriteFailed { errno } => Self::WRITE_FAILED | errno.clamp(0, 255) as u16,
            Reason::TooManyTargets => Self::TOO_MANY_TARGETS,
            Reason::TooManyChanges => Self::TOO_MANY_CHANGES,
            Reason::NoRoomForStub => Self::NO_ROOM_FOR_STUB,
        }
    }

    /// `None` for 0 (no reason) or an unknown code.
    pub(crate) fn from_code(code: u16) -> Option<Reason> {
        Some(match code {
            Self::NOT_A_SITE => Reason::NotASite,
            Self::KEY_NOT_PROVEN => Reason::KeyNotProven,
            Self::FOREIGN_BYTES => Reason::ForeignBytes,
            Self::TARGET_OUT_OF_RANGE => Reason::TargetOutOfRange,
            Self::TOO_MANY_TARGETS => Reason::TooManyTargets,
            Self::TOO_MANY_CHANGES => Reason::TooManyChanges,
            Self::NO_ROOM_FOR_STUB => Reason::NoRoomForStub,
            _ if code & 0xff00 == Self::WRITE_FAILED => Reason::WriteFailed {
                errno: (code & 0xff) as i32,
            },
            _ => Reason::Disabled(Disabled::from_code(code)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_round_trip() {
        let all = [
            Reason::Disabled(Disabled::Unsupported),
            Reason::Disabled(Disabled::EnvVar),
            Reason::Disabled(Disabled::NoCoreSync {
                errno: libc::ENOSYS,
            }),
            Reason::Disabled(Disabled::ObjectNotFound),
            Reason::Disabled(Disabled::PinFailed),
            Reason::Disabled(Disabled::WriteRefused {
                errno: libc::EACCES,
            }),
            Reason::NotASite,
            Reason::KeyNotProven,
            Reason::ForeignBytes,
            Reason::TargetOutOfRange,
            Reason::WriteFailed {
                errno: libc::ENOMEM,
            },
            Reason::TooManyTargets,
            Reason::TooManyChanges,
            Reason::NoRoomForStub,
        ];
        for r in all {
            assert_ne!(r.to_code(), 0);
            assert_eq!(Reason::from_code(r.to_code()), Some(r));
        }
        assert_eq!(Reason::from_code(0), None);
    }
}
