//! The code pool: where the library writes the code it makes at run time, near thunks
//! (`thunks.rs`) and guard stubs (`guard.rs`). Both must be within ±2 GiB of every site (a site
//! reaches them with a `call rel32`) and both need CFI, so that unwinders, perf and gdb walk
//! through them.
//!
//! - **First, a reserve in our own text**: `POOL_BYTES` of `int3`, page-aligned, defined in
//!   `asm/stubs_x86_64.S` with one FDE of fixed CFI (CFA = rsp + 8, return address at [rsp]).
//!   Thunks and stubs are stack-neutral, so that CFI is exact for any of them, wherever they land
//!   in the reserve. Being in our text, every byte is within reach of every site.
//! - **Then pages mapped near our code** (`linux::map_code_near`, 16 at a time), at most
//!   `MAX_MAPPED_PAGES`, when the reserve is used up. These have no CFI (registering it would need
//!   `__register_frame` for unwinders and gdb's JIT interface for gdb): a backtrace taken inside
//!   a thunk or stub there may stop. docs/design.md has the trade-off.
//!
//! The rule is the thunks' rule (`thunks.rs`), for every piece of code in the pool: written once,
//! into bytes no one has ever jumped to (`int3`, never reused: the pool only grows), synced
//! before any site calls it, never changed after.
//!
//! Also here, because stubs and thunks go through them: the retpoline thunk for r10 and the
//! megamorphic stub (see the asm).

use std::sync::{Mutex, MutexGuard};

use crate::arch::x86_64::{self as arch, CODE_ALIGN};
use crate::os::linux::{self, Segment};
use crate::patcher::Locked;
use crate::runtime::Runtime;

/// Bytes of the reserve in our text (a multiple of the page size): 4,096 thunks, or 2,048
/// monomorphic guard stubs. It costs its size in the binary, and memory only for the pages
/// written (each becomes a private copy).
pub const POOL_BYTES: usize = 64 << 10;
/// Most pages mapped near our code once the reserve is used up: 256 KiB more, 16,384 thunks.
pub const MAX_MAPPED_PAGES: usize = 64;
/// Pages mapped at a time: fewer mappings (each one a VMA, and one more search for room within
/// reach), at the cost of filling 64 KiB with `int3` at once.
const MAP_PAGES: usize = 16;

/// Whether this is a retpoline build (`build.rs`): then no indirect branch may be written by hand.
pub(crate) const RETPOLINE: bool = cfg!(static_call_retpoline);

unsafe extern "C" {
    /// The retpoline thunk for r10 (`jmp r10`, speculation trapped). Not callable from Rust.
    #[link_name = concat!(
        "static_call_retpoline_r10_v",
        env!("CARGO_PKG_VERSION_MAJOR"), "_",
        env!("CARGO_PKG_VERSION_MINOR"), "_",
        env!("CARGO_PKG_VERSION_PATCH")
    )]
    pub fn retpoline_r10();

    /// The megamorphic stub of retpoline builds: jumps, through the retpoline, to what the key in
    /// r11 holds. Not callable from Rust.
    #[link_name = concat!(
        "static_call_megamorphic_v",
        env!("CARGO_PKG_VERSION_MAJOR"), "_",
        env!("CARGO_PKG_VERSION_MINOR"), "_",
        env!("CARGO_PKG_VERSION_PATCH")
    )]
    pub fn megamorphic();

    /// The first byte of the reserve. Not code until written: never call it.
    #[link_name = concat!(
        "static_call_code_pool_v",
        env!("CARGO_PKG_VERSION_MAJOR"), "_",
        env!("CARGO_PKG_VERSION_MINOR"), "_",
        env!("CARGO_PKG_VERSION_PATCH")
    )]
    fn code_pool();
}

core::arch::global_asm!(
    include_str!("../asm/stubs_x86_64.S"),
    retpoline_r10 = sym retpoline_r10,
    mega = sym megamorphic,
    pool = sym code_pool,
    pool_bytes = const POOL_BYTES,
    retpoline = const RETPOLINE as u32,
);

/// The retpoline thunk's address, in a retpoline build; `None` otherwise.
pub(crate) fn retpoline() -> Option<usize> {
    RETPOLINE.then_some(retpoline_r10 as *const () as usize)
}

/// The megamorphic stub's address.
pub(crate) fn megamorphic_stub() -> usize {
    megamorphic as *const () as usize
}

/// The reserve in our text, as a segment (page-aligned at both ends, so no other code shares
/// its pages).
pub(crate) fn reserve() -> Segment {
    let start = code_pool as *const () as usize;
    Segment {
        start,
        end: start + POOL_BYTES,
        prot: libc::PROT_READ | libc::PROT_EXEC,
    }
}

/// The pool: every region code can be written into, and how far it is used.
pub(crate) struct Pool {
    /// The reserve, then the mapped pages, in the order they were taken into use.
    segments: Vec<Segment>,
    /// The next free byte, in the last segment.
    next: usize,
    /// Pages mapped so far.
    mapped: usize,
}

/// Taken only under the patch lock (`lock` asks for the proof), so never contended and never
/// held across `fork` (the fork handlers hold the patch lock).
static POOL: Mutex<Pool> = Mutex::new(Pool {
    segments: Vec::new(),
    next: 0,
    mapped: 0,
});

/// The pool, for the holder of the patch lock.
pub(crate) fn lock(_: &Locked) -> MutexGuard<'static, Pool> {
    // Nothing panics while holding it; should something, the pool is still consistent (`next`
    // only moves forward, past bytes that are then never handed out again).
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    /// Takes `len` bytes (a multiple of `CODE_ALIGN`) of code no one has ever jumped to (all
    /// `int3`), within reach of every site of our object. Fails with the errno of mapping a page
    /// near our code (`ENOMEM`: no room within reach; `EACCES`: new executable memory refused),
    /// or with 0 when `MAX_MAPPED_PAGES` are used up.
    pub fn take(&mut self, rt: &Runtime, len: usize) -> Result<usize, i32> {
        debug_assert!(len.is_multiple_of(CODE_ALIGN) && len <= rt.page);
        if self.segments.is_empty() {
            let reserve = reserve();
            self.next = reserve.start;
            self.segments.push(reserve);
        }
        loop {
            let end = self.segments.last().map_or(0, |s| s.end);
            if self.next + len <= end {
                let at = self.next;
                self.next += len;
                return Ok(at);
            }
            if self.mapped == MAX_MAPPED_PAGES {
                return Err(0);
            }
            let (lo, hi) = rt
                .object
                .as_ref()
                .and_then(|o| o.code_span())
                .ok_or(libc::ENOENT)?;
            let pages = MAP_PAGES.min(MAX_MAPPED_PAGES - self.mapped);
            let chunk = linux::map_code_near(lo, hi, pages * rt.page, rt.page, |at, len| {
                arch::reaches(lo, hi, at, len)
            })?;
            self.mapped += pages;
            self.next = chunk.start;
            self.segments.push(chunk);
        }
    }

    /// Every region the pool hands code out of: what the code writer may open for writing it.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_page_aligned_int3_in_our_own_code() {
        let page = linux::page_size();
        let r = reserve();
        assert_eq!((r.start % page, r.end % page), (0, 0));
        let obj = linux::find_object(r.start, page).expect("our own object");
        assert!(obj.exec_segment(r.start, r.end).is_some());
        let mut bytes = vec![0u8; 64];
        // SAFETY: inside our executable segment (checked above).
        unsafe { linux::read_code(r.start, &mut bytes) };
        assert!(bytes.iter().all(|&b| b == 0xcc));
    }
}
