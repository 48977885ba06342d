//! A tracing hook over a non-trivial record, switched on and off from another thread while
//! workers keep handling requests: `if has_target!(ON_REQUEST) { static_call!(ON_REQUEST)(&record) }`.
//!
//! While the hook has no target, its branch site is a 5-byte NOP and the record (a struct with a
//! formatted `String`) is never built; with a target, the site jumps into the block, which
//! builds the record and calls the hook directly (a patched call, no indirect call).
//!
//! Run with `cargo run --release --example tracing_hook`. It prints:
//! 1. the hook's sites, decoded: the branch site (a NOP while off, a `jmp` while on) and the call
//!    site in its block;
//! 2. a timeline of windows, off and on in turn, switched by a control thread while two workers
//!    handle requests: the requests handled and the records built in each window (none while
//!    off: asserted);
//! 3. what a request costs with no hook at all, with the hook off, with the `log` crate's level
//!    check off (`log::trace!` with the level below trace), and both on.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use static_call::{SiteInfo, define_static_call, has_target, static_call};

/// What a trace event carries: built only while the hook is on.
pub struct Record {
    pub request: u64,
    pub worker: u32,
    pub path: String,
}

impl Record {
    fn build(request: u64, worker: u32) -> Record {
        BUILT.fetch_add(1, Ordering::Relaxed);
        Record {
            request,
            worker,
            path: format!("/api/items/{}", request % 1000),
        }
    }
}

define_static_call!(
    /// Called with every request's record while tracing is on; no target otherwise.
    pub ON_REQUEST: extern "C" fn(&Record) = None
);

/// Records built, and records the hook received.
static BUILT: AtomicU64 = AtomicU64::new(0);
static TRACED: AtomicU64 = AtomicU64::new(0);

/// The hook: a stand-in for writing a trace event.
extern "C" fn trace(record: &Record) {
    black_box((record.request, record.worker, record.path.len()));
    TRACED.fetch_add(1, Ordering::Relaxed);
}

/// A stand-in for the real work of a request.
#[inline(always)]
fn work(id: u64) -> u64 {
    id.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
}

/// A request handler with the hook: the one branch site of `ON_REQUEST` in this program.
#[inline(never)]
fn handle(id: u64, worker: u32) -> u64 {
    if has_target!(ON_REQUEST) {
        static_call!(ON_REQUEST)(&Record::build(id, worker));
    }
    work(id)
}

#[inline(never)]
fn handle_no_hook(id: u64) -> u64 {
    work(id)
}

/// The same record through the `log` crate.
#[inline(never)]
fn handle_log(id: u64, worker: u32) -> u64 {
    log::trace!("request {id} worker {worker} path /api/items/{}", id % 1000);
    work(id)
}

struct Sink;
impl log::Log for Sink {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        black_box(record.args());
        TRACED.fetch_add(1, Ordering::Relaxed);
    }
    fn flush(&self) {}
}
static SINK: Sink = Sink;

fn describe(site: &SiteInfo) -> String {
    let Some(bytes) = site.bytes else {
        return format!("{:#x}: {:?}", site.address, site.state);
    };
    let insn = Decoder::with_ip(64, &bytes, site.address as u64, DecoderOptions::NONE).decode();
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    format!("{:#x}: {text:<28} {:?}", site.address, site.state)
}

fn print_sites(when: &str) {
    static_call::flush();
    println!("  {when}:");
    for site in ON_REQUEST.sites() {
        println!("    {}", describe(&site));
    }
}

/// Nanoseconds per call of `f` over `n` calls.
fn time(n: u64, f: impl Fn(u64) -> u64) -> f64 {
    let start = Instant::now();
    let mut acc = 0u64;
    for i in 0..n {
        acc = acc.wrapping_add(f(black_box(i)));
    }
    black_box(acc);
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    log::set_logger(&SINK).expect("the only logger");
    log::set_max_level(log::LevelFilter::Info);
    println!("patching: {:?}", static_call::status().patching);

    // 1. The sites.
    println!("1. the hook's sites");
    handle(0, 0);
    print_sites("off (never on yet: the branch site only)");
    ON_REQUEST.update(trace);
    handle(0, 0);
    print_sites("on");
    ON_REQUEST.set_null();
    print_sites("off again");
    assert_eq!(
        BUILT.load(Ordering::Relaxed),
        1,
        "built once: the one call while on"
    );

    // 2. Switched from another thread while workers handle requests.
    println!("2. timeline (a control thread switches the hook every 40 ms)");
    let stop = AtomicBool::new(false);
    let handled = AtomicU64::new(0);
    thread::scope(|s| {
        for worker in 0..2u32 {
            let (stop, handled) = (&stop, &handled);
            s.spawn(move || {
                let mut id = u64::from(worker) << 40;
                while !stop.load(Ordering::Relaxed) {
                    black_box(handle(id, worker));
                    id += 1;
                    handled.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let control = s.spawn(|| {
            for window in 0..6 {
                let on = window % 2 == 1;
                if on {
                    ON_REQUEST.update(trace);
                } else {
                    ON_REQUEST.set_null();
                }
                // Only now, with the switch done, count this window's requests and records.
                let (h0, b0) = (
                    handled.load(Ordering::Relaxed),
                    BUILT.load(Ordering::Relaxed),
                );
                thread::sleep(Duration::from_millis(40));
                let built = BUILT.load(Ordering::Relaxed) - b0;
                let requests = handled.load(Ordering::Relaxed) - h0;
                println!(
                    "  window {window} ({}): {requests:>9} requests, {built:>9} records built",
                    if on { "on " } else { "off" }
                );
                if !on {
                    assert_eq!(built, 0, "a record built while the hook was off");
                }
            }
            ON_REQUEST.set_null();
        });
        control.join().unwrap();
        stop.store(true, Ordering::Relaxed);
    });

    // 3. Costs.
    println!("3. ns per request (work: a multiply and a rotate)");
    const N: u64 = 20_000_000;
    let none = time(N, handle_no_hook);
    let hook_off = time(N, |i| handle(i, 0));
    let log_off = time(N, |i| handle_log(i, 0));
    ON_REQUEST.update(trace);
    log::set_max_level(log::LevelFilter::Trace);
    let n_on = N / 20;
    let hook_on = time(n_on, |i| handle(i, 0));
    let log_on = time(n_on, |i| handle_log(i, 0));
    ON_REQUEST.set_null();
    println!("  no hook at all            {none:6.2}");
    println!(
        "  has_target! hook, off     {hook_off:6.2}  ({:.2}x no hook)",
        hook_off / none
    );
    println!(
        "  log::trace!, level off    {log_off:6.2}  ({:.2}x no hook)",
        log_off / none
    );
    println!("  has_target! hook, on      {hook_on:6.2}  (builds the record and calls the hook)");
    println!("  log::trace!, on           {log_on:6.2}  (formats through `dyn Log`)");
}
