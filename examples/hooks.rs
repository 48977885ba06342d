//! A tracing hook that costs (almost) nothing while it is off, switched on and off at run time
//! while worker threads keep calling it: a key with no target (the kernel's
//! `DEFINE_STATIC_CALL_NULL` and `static_call_cond()`), the same idea as the kernel's tracepoints.
//!
//! Run with `cargo run --release --example hooks` (a debug build works too, but takes several
//! seconds and its timings mean little). It prints:
//! 1. where the hook's call site is (from `ON_REQUEST.sites()`) and whether it is patched;
//! 2. a timeline of seven 40 ms windows, off and on in turn. Two worker threads handle requests
//!    nonstop, and every request calls the hook `static_call!(ON_REQUEST)(id)`; the main thread
//!    switches the hook on with `ON_REQUEST.update(trace)` and off with `ON_REQUEST.set_null()`.
//!    For each window: the requests the workers handled (they count their own), the calls `trace`
//!    received (it counts them with an atomic): zero in every off window (asserted), about one
//!    per request in every on window; and the site's instruction, decoded: a 5-byte NOP while
//!    off, `call trace` while on;
//! 3. what one request costs, measured now: with no hook at all, with the static-call hook off,
//!    with the usual alternative off (an `AtomicPtr` that is null, i.e. an `Option<fn>` that can
//!    change at run time, checked on every request), and both hooks on.
//!
//! With patching off (`STATIC_CALL_DISABLE=1`) everything works the same, and the off windows
//! still see no `trace` call, but the site keeps calling the trampoline, which jumps to the key's
//! do-nothing function while the hook is off; section 3 then shows that slower path. The portable
//! fallback (other platforms) has no site to show.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, Mnemonic};
use static_call::{Disabled, SiteState, define_static_call, static_call};

define_static_call!(
    /// Called for every request. No target to begin with: calls do nothing, and once a site is
    /// patched it holds a 5-byte NOP instead of a call.
    pub ON_REQUEST: extern "C" fn(u64) = None
);

/// Calls `trace` received.
static TRACED: AtomicU64 = AtomicU64::new(0);

/// The hook: a stand-in for recording a trace event.
///
/// `#[inline(never)]` keeps one copy of it, so that its address (which section 2 looks for in
/// the site's `call`) is the same everywhere: small functions may otherwise be copied into each
/// codegen unit that uses them.
#[inline(never)]
extern "C" fn trace(request: u64) {
    black_box(request);
    TRACED.fetch_add(1, Ordering::Relaxed);
}

/// A stand-in for the real work of a request.
#[inline(always)]
fn work(id: u64) -> u64 {
    id.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
}

/// A request handler with a tracing hook: the one call site of `ON_REQUEST` in this program.
#[inline(never)]
fn handle_request(id: u64) -> u64 {
    static_call!(ON_REQUEST)(id);
    work(id)
}

const WORKERS: usize = 2;

/// Requests each worker has handled (on its own cache line, so the workers do not slow each
/// other down).
#[repr(align(128))]
struct Counter(AtomicU64);

static HANDLED: [Counter; WORKERS] = [const { Counter(AtomicU64::new(0)) }; WORKERS];
static STOP: AtomicBool = AtomicBool::new(false);

/// Stops the workers when dropped, even if the main thread panics (say, printing to a closed
/// pipe): `thread::scope` waits for them, and they would otherwise never stop.
struct StopWorkers;

impl Drop for StopWorkers {
    fn drop(&mut self) {
        STOP.store(true, Ordering::Relaxed);
    }
}

fn worker(n: usize) {
    let mut handled = 0;
    let mut acc = 0;
    while !STOP.load(Ordering::Relaxed) {
        acc ^= handle_request((n as u64) << 48 | handled);
        handled += 1;
        // Release: whoever sees this count also sees the hook call of every request counted.
        HANDLED[n].0.store(handled, Ordering::Release);
    }
    black_box(acc);
}

fn requests_handled() -> u64 {
    HANDLED.iter().map(|c| c.0.load(Ordering::Acquire)).sum()
}

/// Waits until each worker has finished the request it was handling when this was called.
///
/// `set_null` guarantees that no call *starting* after it returns reaches `trace`, but a worker
/// may still be inside a `trace` that started just before. Once every worker has finished one
/// more request, none is (the kernel's `tracepoint_synchronize_unregister()`, by hand).
fn wait_for_requests_in_flight() {
    let seen: Vec<u64> = HANDLED
        .iter()
        .map(|c| c.0.load(Ordering::Acquire))
        .collect();
    for (counter, seen) in HANDLED.iter().zip(seen) {
        while counter.0.load(Ordering::Acquire) == seen {
            thread::yield_now();
        }
    }
}

fn main() {
    println!("hooks: a tracing hook that is a 5-byte NOP while it is off");
    println!("===========================================================\n");

    let names = Names::new();
    let window = Duration::from_millis(40);
    thread::scope(|scope| {
        let _stop = StopWorkers;
        for n in 0..WORKERS {
            scope.spawn(move || worker(n));
        }
        // Wait until the workers have run the hook's site once, which registers it, and
        // `flush` until the patcher has dealt with it.
        while HANDLED.iter().any(|c| c.0.load(Ordering::Acquire) == 0) {
            thread::yield_now();
        }
        static_call::flush();
        let site = ON_REQUEST.sites().first().copied();
        match site {
            Some(site) => println!(
                "1. The hook's call site in `handle_request` is at {:#x}, and is {}.",
                site.address,
                state_text(site.state)
            ),
            None => println!(
                "1. This build uses the portable fallback: each call loads the key's target and\n   \
                 calls it, and there is no call site to show."
            ),
        }
        if site.is_some() && static_call::status().patching.is_err() {
            println!(
                "   So it keeps calling the trampoline, which jumps to the hook while it is on,"
            );
            println!("   and to a function that does nothing while it is off.");
        }

        println!(
            "\n2. {WORKERS} workers handle requests nonstop; every {} ms the main thread switches the hook:\n",
            window.as_millis()
        );
        println!(
            "   {:<6} {:>10} {:>12}   the hook's call site",
            "hook", "requests", "trace calls"
        );
        for round in 0..7 {
            let on = round % 2 == 1;
            if on {
                ON_REQUEST.update(trace);
            } else {
                ON_REQUEST.set_null();
                wait_for_requests_in_flight();
            }
            // From here to the end of the window, every request calls `trace` (hook on) or
            // nothing (hook off).
            let (traced, requests) = (TRACED.load(Ordering::Relaxed), requests_handled());
            thread::sleep(window);
            let requests = requests_handled() - requests;
            let traced = TRACED.load(Ordering::Relaxed) - traced;
            if !on {
                assert_eq!(traced, 0, "the hook ran while it was off");
            }
            let instruction = site.map_or("-".to_string(), |s| describe(s.address, &names));
            let hook = if on { "on" } else { "off" };
            println!("   {hook:<6} {requests:>10} {traced:>12}   {instruction}");
        }
    });
    println!(
        "\n   While on, the two counts may differ slightly: they are read one after the other while\n   \
         the workers run. While off, they are read after every request in flight has finished."
    );

    timing_table();
}

/// The usual alternative: the hook as a function pointer that may be null, checked on each call.
static HOOK_PTR: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

#[inline(never)]
fn handle_request_with_pointer_hook(id: u64) -> u64 {
    let hook = HOOK_PTR.load(Ordering::Relaxed);
    if !hook.is_null() {
        // SAFETY: HOOK_PTR only ever holds null or `trace`, an `extern "C" fn(u64)`.
        let hook = unsafe { core::mem::transmute::<*mut (), extern "C" fn(u64)>(hook) };
        hook(id);
    }
    work(id)
}

#[inline(never)]
fn handle_request_without_hook(id: u64) -> u64 {
    work(id)
}

const CALLS: u64 = 10_000_000;

/// Nanoseconds per request: one run of a dependent chain of requests.
fn ns_per_request(handle: fn(u64) -> u64) -> f64 {
    let start = Instant::now();
    let mut acc = 0u64;
    for i in 0..CALLS {
        acc = handle(acc ^ i);
    }
    black_box(acc);
    start.elapsed().as_nanos() as f64 / CALLS as f64
}

/// Switches both hooks on or off.
fn set_hooks(on: bool) {
    if on {
        ON_REQUEST.update(trace);
        HOOK_PTR.store(trace as *mut (), Ordering::Relaxed);
    } else {
        ON_REQUEST.set_null();
        HOOK_PTR.store(core::ptr::null_mut(), Ordering::Relaxed);
    }
}

/// A request handler to time, and whether its hook is on.
struct Handler {
    name: &'static str,
    handle: fn(u64) -> u64,
    hook_on: bool,
}

fn timing_table() {
    let handlers = [
        Handler {
            name: "no hook at all",
            handle: handle_request_without_hook,
            hook_on: false,
        },
        Handler {
            name: "static-call hook, off",
            handle: handle_request,
            hook_on: false,
        },
        Handler {
            name: "AtomicPtr hook, off (null check)",
            handle: handle_request_with_pointer_hook,
            hook_on: false,
        },
        Handler {
            name: "static-call hook, on",
            handle: handle_request,
            hook_on: true,
        },
        Handler {
            name: "AtomicPtr hook, on (indirect call)",
            handle: handle_request_with_pointer_hook,
            hook_on: true,
        },
    ];
    // The best of five rounds. Each round times every handler, so that a slow moment of the
    // machine does not fall on one handler only.
    let mut best = [f64::INFINITY; 5];
    for _ in 0..5 {
        for (handler, best) in handlers.iter().zip(&mut best) {
            set_hooks(handler.hook_on);
            *best = best.min(ns_per_request(handler.handle));
        }
    }
    set_hooks(false);

    println!(
        "\n3. What a request costs, measured now on one thread ({CALLS} dependent requests, best of 5;\n   \
         the machine may be busy, so compare within this run):\n"
    );
    println!(
        "   {:<36} {:>10} {:>10}",
        "request handler", "ns", "vs none"
    );
    for (handler, ns) in handlers.iter().zip(best) {
        println!("   {:<36} {ns:>10.2} {:>9.2}x", handler.name, ns / best[0]);
    }
    match static_call::status().patching {
        Ok(()) => println!(
            "\n   Off, both cost about nothing in a loop like this one, where the pointer stays in\n   \
             the cache and the branch is always predicted. The NOP needs neither: no data to load\n   \
             (no cache miss once the hook's pointer has gone cold) and no branch predictor entry.\n   \
             It still counts as a call for the compiler, which saves registers around it."
        ),
        Err(Disabled::Unsupported) => println!(
            "\n   In the portable fallback, a static-call hook that is off is still an atomic load and\n   \
             an indirect call to a function that does nothing: it is patching that makes it a NOP."
        ),
        Err(_) => println!(
            "\n   Patching is off, so the static-call hook goes through the trampoline on every\n   \
             request, on or off: correct, but that is the cost a patched site avoids."
        ),
    }
}

fn state_text(state: SiteState) -> String {
    match state {
        SiteState::Patched => "patched".to_string(),
        SiteState::Pending => "waiting for the patcher".to_string(),
        SiteState::Trampoline(why) => format!("not patched\n   ({why})"),
        SiteState::Foreign => "holds someone else's bytes (a breakpoint?)".to_string(),
        other => format!("{other:?}"),
    }
}

/// Addresses worth naming in a disassembly.
struct Names(Vec<(u64, &'static str)>);

impl Names {
    fn new() -> Names {
        let mut names = vec![(trace as *const () as u64, "trace")];
        if let Some(t) = static_call::trampoline_address() {
            names.push((t as u64, "static_call trampoline"));
        }
        Names(names)
    }

    fn of(&self, addr: u64) -> Option<&'static str> {
        self.0.iter().find(|(a, _)| *a == addr).map(|(_, n)| *n)
    }
}

/// The instruction at a site's address (its five bytes), decoded: `call <name>` or a NOP.
fn describe(address: usize, names: &Names) -> String {
    // SAFETY: `address` is a call site from `sites()`, in this program's mapped, readable code;
    // volatile because the patcher may rewrite those bytes at any time.
    let bytes: Vec<u8> = (0..5)
        .map(|i| unsafe { core::ptr::read_volatile((address + i) as *const u8) })
        .collect();
    let insn = Decoder::with_ip(64, &bytes, address as u64, DecoderOptions::NONE).decode();
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    if insn.mnemonic() == Mnemonic::Call {
        if let Some(name) = names.of(insn.near_branch64()) {
            text = format!("call {name}");
        }
    } else if insn.mnemonic() == Mnemonic::Nop {
        text = format!("{text}   (a {}-byte NOP)", insn.len());
    }
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{:<16} {text}", hex.join(" "))
}
