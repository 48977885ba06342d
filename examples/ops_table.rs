//! An operations table, like the Linux kernel's `struct file_operations`: a `static` struct whose
//! fields are static-call keys, called as `static_call!(DEVICE.read)(..)` by code that does not
//! know which driver is behind it, and a driver swapped at run time by updating every field in
//! one `Batch` (one pass over the code and one core sync for the whole table, all or nothing).
//!
//! Run with `cargo run --release --example ops_table`. There are two drivers: a RAM disk, and a
//! null device that reads zeros and discards writes (its `write` returns zero without calling
//! anything, its `flush` is no target at all). The program installs the RAM disk, then the null
//! device, then the RAM disk again, and each time prints:
//! - the results of the same five calls: read block 1, write a message to it, read it back, read
//!   block 99 (out of range: an error from the RAM disk), and flush (with the number of blocks
//!   the RAM disk made durable). What the RAM disk stored in block 1 is still there when it comes
//!   back; what was written to the null device went nowhere;
//! - each field's target (`DEVICE.read.target()`, ...) and its call site from
//!   `DEVICE.read.sites()`, ...: address, state, and the instruction there, decoded (`call
//!   ram_read`, `xor eax,eax` for return-zero, a 5-byte NOP for no target).
//!
//! With patching off (`STATIC_CALL_DISABLE=1`) the results are the same, every site is listed in
//! state "trampoline" as a `call` to the trampoline (which jumps to the field's current target),
//! and a note at the end says why. The portable fallback (other platforms) has no sites to list.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, Mnemonic};
use static_call::{Batch, Reason, SiteInfo, SiteState, StaticCall, Target, static_call};

/// Bytes in a block (tiny, so that a block prints on one line).
const BLOCK_SIZE: usize = 16;
/// Blocks on the RAM disk.
const BLOCKS: usize = 8;
/// "Invalid argument": the error for a block number past the end of the device.
const EINVAL: i32 = 22;

/// Reads block `n` into the `BLOCK_SIZE` bytes at `buf`; returns 0 or a negative errno.
/// `unsafe` because it writes through a raw pointer: static-call arguments are passed in
/// registers, so a table of keys takes pointers, as the kernel's tables do.
type ReadFn = unsafe extern "C" fn(u64, *mut u8) -> i32;
/// Writes the `BLOCK_SIZE` bytes at `buf` to block `n`; returns 0 or a negative errno.
type WriteFn = unsafe extern "C" fn(u64, *const u8) -> i32;
/// Makes the writes so far durable.
type FlushFn = extern "C" fn();

/// A block device's operations. Each field is a key: every place that calls it through
/// `static_call!(DEVICE.field)` is patched into a direct call to the current driver's function.
pub struct BlockDevOps {
    /// Reads a block.
    pub read: StaticCall<ReadFn>,
    /// Writes a block.
    pub write: StaticCall<WriteFn>,
    /// Makes the writes so far durable.
    pub flush: StaticCall<FlushFn>,
}

/// The block device this program uses. It starts with the RAM disk driver.
pub static DEVICE: BlockDevOps = BlockDevOps {
    read: StaticCall::new(ram_read),
    write: StaticCall::new(ram_write),
    flush: StaticCall::new(ram_flush),
};

// ---- The code that uses the device: it knows the table, not the driver. ---------------------

/// Reads block `n`. Each function here holds one call site of one field.
#[inline(never)]
fn read_block(n: u64) -> Result<[u8; BLOCK_SIZE], i32> {
    let mut buf = [0; BLOCK_SIZE];
    // SAFETY: `buf` is the BLOCK_SIZE writable bytes every driver's `read` expects.
    match unsafe { static_call!(DEVICE.read)(n, buf.as_mut_ptr()) } {
        0 => Ok(buf),
        errno => Err(errno),
    }
}

#[inline(never)]
fn write_block(n: u64, data: &[u8; BLOCK_SIZE]) -> Result<(), i32> {
    // SAFETY: `data` is the BLOCK_SIZE readable bytes every driver's `write` expects.
    match unsafe { static_call!(DEVICE.write)(n, data.as_ptr()) } {
        0 => Ok(()),
        errno => Err(errno),
    }
}

#[inline(never)]
fn flush_device() {
    static_call!(DEVICE.flush)();
}

// ---- Driver 1: a RAM disk. --------------------------------------------------------------------
//
// The driver functions are `#[inline(never)]` so that each has one address, which the site
// listing below recognises in a `call`: small functions may otherwise be copied into each codegen
// unit that uses them. They must not panic: a panic in an `extern "C"` function aborts.

static RAM: Mutex<[[u8; BLOCK_SIZE]; BLOCKS]> = Mutex::new([[0; BLOCK_SIZE]; BLOCKS]);
/// Bit `n` is set while block `n` has been written but not flushed.
static DIRTY: AtomicU32 = AtomicU32::new(0);
/// Blocks made durable by `ram_flush` so far.
static FLUSHED: AtomicU32 = AtomicU32::new(0);

fn ram() -> std::sync::MutexGuard<'static, [[u8; BLOCK_SIZE]; BLOCKS]> {
    RAM.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// # Safety
/// `buf` must point to `BLOCK_SIZE` writable bytes.
#[inline(never)]
unsafe extern "C" fn ram_read(n: u64, buf: *mut u8) -> i32 {
    let Some(block) = ram().get(n as usize).copied() else {
        return -EINVAL;
    };
    // SAFETY: the caller guarantees BLOCK_SIZE writable bytes at `buf`.
    unsafe { buf.copy_from_nonoverlapping(block.as_ptr(), BLOCK_SIZE) };
    0
}

/// # Safety
/// `buf` must point to `BLOCK_SIZE` readable bytes.
#[inline(never)]
unsafe extern "C" fn ram_write(n: u64, buf: *const u8) -> i32 {
    let mut ram = ram();
    let Some(block) = ram.get_mut(n as usize) else {
        return -EINVAL;
    };
    // SAFETY: the caller guarantees BLOCK_SIZE readable bytes at `buf`.
    unsafe { block.as_mut_ptr().copy_from_nonoverlapping(buf, BLOCK_SIZE) };
    DIRTY.fetch_or(1 << n, Ordering::Relaxed);
    0
}

#[inline(never)]
extern "C" fn ram_flush() {
    let dirty = DIRTY.swap(0, Ordering::Relaxed);
    FLUSHED.fetch_add(dirty.count_ones(), Ordering::Relaxed);
}

/// Installs the RAM disk: every field at once, in one `Batch` (one pass over the code, one core
/// sync, all or nothing).
fn install_ramdisk() {
    Batch::new()
        .update(&DEVICE.read, ram_read)
        .update(&DEVICE.write, ram_write)
        .update(&DEVICE.flush, ram_flush)
        .commit();
}

// ---- Driver 2: a null device. ----------------------------------------------------------------

/// Reads zeros, from any block, like `/dev/zero`.
///
/// # Safety
/// `buf` must point to `BLOCK_SIZE` writable bytes.
#[inline(never)]
unsafe extern "C" fn null_read(_n: u64, buf: *mut u8) -> i32 {
    // SAFETY: the caller guarantees BLOCK_SIZE writable bytes at `buf`.
    unsafe { buf.write_bytes(0, BLOCK_SIZE) };
    0
}

fn install_nulldev() {
    Batch::new()
        .update(&DEVICE.read, null_read)
        // Writes succeed and go nowhere, like `/dev/null`: 0 means success, and a return-zero
        // key returns 0 without calling anything (its patched sites are `xor eax, eax`).
        .set_return_zero(&DEVICE.write)
        // Nothing to flush: no target (its patched sites are a 5-byte NOP).
        .set_null(&DEVICE.flush)
        .commit();
}

// ---- The demonstration. -----------------------------------------------------------------------

fn main() {
    println!("ops_table: a block device's operations table, with the driver swapped at run time");
    println!("==================================================================================");

    let names = Names::new();
    let steps = [
        Step {
            install: install_ramdisk,
            title: "install_ramdisk()",
            message: b"ramdisk, pass 1 ",
        },
        Step {
            install: install_nulldev,
            title: "install_nulldev()",
            message: b"nulldev, pass 2 ",
        },
        Step {
            install: install_ramdisk,
            title: "install_ramdisk() again",
            message: b"ramdisk, pass 3 ",
        },
    ];
    let mut reasons = Vec::new();
    for (number, step) in steps.iter().enumerate() {
        // Every field is updated one by one, each `update` returning once all of that field's
        // sites call the new target. Between two updates the table is half one driver and half
        // the other: a program with other threads using the device would stop them first.
        (step.install)();
        println!("\n{}. {}, then the same calls:\n", number + 1, step.title);
        let line = |call: &str, result: String| println!("   {call:<35} -> {result}");
        line("read_block(1)", show(read_block(1)));
        line(
            &format!(
                "write_block(1, {:?})",
                String::from_utf8_lossy(step.message)
            ),
            format!("{:?}", write_block(1, step.message)),
        );
        line("read_block(1)", show(read_block(1)));
        line("read_block(99)", show(read_block(99)));
        let flushed = FLUSHED.load(Ordering::Relaxed);
        flush_device();
        let flushed = FLUSHED.load(Ordering::Relaxed) - flushed;
        line("flush_device()", format!("{flushed} block(s) made durable"));
        // Wait until the sites that ran for the first time just now are patched.
        static_call::flush();
        println!(
            "\n   {:<13} {:<12} {:<16} {:<11} instruction at the site",
            "field", "target", "call site", "state"
        );
        print_field(
            "DEVICE.read",
            DEVICE.read.target(),
            &DEVICE.read.sites(),
            &names,
            &mut reasons,
        );
        print_field(
            "DEVICE.write",
            DEVICE.write.target(),
            &DEVICE.write.sites(),
            &names,
            &mut reasons,
        );
        print_field(
            "DEVICE.flush",
            DEVICE.flush.target(),
            &DEVICE.flush.sites(),
            &names,
            &mut reasons,
        );
    }
    for reason in reasons {
        println!("\n(Sites marked \"trampoline\" are not patched: {reason}.");
        println!(
            "Their calls go through the trampoline, which jumps to the field's current target,"
        );
        println!("so the results are the same.)");
    }
}

/// One step of the demonstration: install a driver, then make the same calls.
struct Step {
    install: fn(),
    title: &'static str,
    /// What to write to block 1.
    message: &'static [u8; BLOCK_SIZE],
}

fn show(result: Result<[u8; BLOCK_SIZE], i32>) -> String {
    match result {
        Ok(block) if block == [0; BLOCK_SIZE] => "Ok(16 zero bytes)".to_string(),
        Ok(block) => format!("Ok({:?})", String::from_utf8_lossy(&block)),
        Err(errno) if errno == -EINVAL => "Err(-EINVAL)".to_string(),
        Err(errno) => format!("Err({errno})"),
    }
}

/// Prints a field's target and each of its call sites; collects the reasons why sites are not
/// patched.
fn print_field<F: Copy>(
    field: &str,
    target: Target<F>,
    sites: &[SiteInfo],
    names: &Names,
    reasons: &mut Vec<Reason>,
) {
    let target = match target {
        Target::Function(f) => {
            // SAFETY: `F` is a function-pointer type (the key's type), as large as a pointer.
            let address: usize = unsafe { core::mem::transmute_copy(&f) };
            names.of(address as u64).unwrap_or("?").to_string()
        }
        Target::Null => "no target".to_string(),
        Target::ReturnZero => "return zero".to_string(),
    };
    if sites.is_empty() {
        println!("   {field:<13} {target:<12} (none: the portable fallback has no call sites)");
    }
    for site in sites {
        let state = match site.state {
            SiteState::Patched => "patched",
            SiteState::Pending => "pending",
            SiteState::Trampoline(reason) => {
                if !reasons.contains(&reason) {
                    reasons.push(reason);
                }
                "trampoline"
            }
            _ => "other",
        };
        println!(
            "   {field:<13} {target:<12} {:<#16x} {state:<11} {}",
            site.address,
            describe(site.address, names)
        );
    }
}

/// Addresses worth naming in a disassembly.
struct Names(Vec<(u64, &'static str)>);

impl Names {
    fn new() -> Names {
        let mut names = vec![
            (ram_read as *const () as u64, "ram_read"),
            (ram_write as *const () as u64, "ram_write"),
            (ram_flush as *const () as u64, "ram_flush"),
            (null_read as *const () as u64, "null_read"),
        ];
        if let Some(t) = static_call::trampoline_address() {
            names.push((t as u64, "static_call trampoline"));
        }
        Names(names)
    }

    fn of(&self, addr: u64) -> Option<&'static str> {
        self.0.iter().find(|(a, _)| *a == addr).map(|(_, n)| *n)
    }
}

/// The instruction at a site's address (its five bytes), decoded.
fn describe(address: usize, names: &Names) -> String {
    // SAFETY: `address` is a call site from `sites()`, in this program's mapped, readable code;
    // volatile because the patcher may rewrite those bytes at any time.
    let bytes: Vec<u8> = (0..5)
        .map(|i| unsafe { core::ptr::read_volatile((address + i) as *const u8) })
        .collect();
    let insn = Decoder::with_ip(64, &bytes, address as u64, DecoderOptions::NONE).decode();
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    match insn.mnemonic() {
        Mnemonic::Call => {
            if let Some(name) = names.of(insn.near_branch64()) {
                text = format!("call {name}");
            }
        }
        Mnemonic::Nop => text = format!("{text} (a {}-byte NOP)", insn.len()),
        _ => {}
    }
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}  {text}", hex.join(" "))
}
