//! Latency and scale of patching: first call → site patched, `update` with 1, 100 and 10,000
//! sites, system calls per update (counted with `static_call::stats()`), page-window merging,
//! memory per key and per site, and growth of the mapping count.
//!
//! A plain `main` (no criterion): these are one-shot events (a site's first call happens once),
//! measured as distributions over many fresh sites. Prints a report and writes it as JSON to
//! `$STATIC_CALL_BENCH_OUT/latency.json` (default `target/static-call-bench/`), which
//! `scripts/report.py` turns into the tables of docs/benchmarks.md.
//!
//! Sites are generated as monomorphised copies of one small function (`site::<I>` for
//! I = 0..N): each copy is its own function with its own inlined call site, and the `^ I` keeps
//! the copies different, so the linker does not fold them into one.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod common;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() {
    imp::main();
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    eprintln!("static-call benches measure x86-64 Linux only");
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use crate::common::{addr, calls_to, dec, inc, pct, status_kib, vma_count};
    use core::hint::black_box;
    use std::fmt::Write as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use static_call::{
        SiteState, StaticCall, StaticCallKey, Stats, define_static_call, static_call,
    };

    type F = extern "C" fn(u64) -> u64;

    define_static_call!(LAT: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(SYNC: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(U1: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(U100: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(U10K: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(PACKED: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(GAPPED: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(W0: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(W1: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(W2: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(W3: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(W4: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(W5: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(W6: extern "C" fn(u64) -> u64 = inc);
    define_static_call!(W7: extern "C" fn(u64) -> u64 = inc);

    /// How long the update storm lasts (`STATIC_CALL_STORM_MS` to change it).
    const STORM_MS: u64 = 2000;
    /// Threads in the update storm: more than the machine's CPUs, so that updaters get
    /// preempted, some of them while they hold pages open.
    const STORM_THREADS: usize = 8;

    // ---- site generators ------------------------------------------------------------------

    /// `$d0 $d1 ..` (decimal digits) as one number, in a const context.
    macro_rules! num {
        (@ $acc:expr;) => { $acc };
        (@ $acc:expr; $d:literal $($rest:literal)*) => { num!(@ ($acc * 10 + $d); $($rest)*) };
    }

    /// Pushes `$f::<I>` onto `$v` for every I with as many decimal digits as there are `x`s.
    macro_rules! push_sites {
        ($v:ident $f:ident [$($p:literal)*] []) => {
            $v.push($f::<{ num!(@ 0; $($p)*) }> as fn(u64) -> u64);
        };
        ($v:ident $f:ident [$($p:literal)*] [x $($rest:tt)*]) => {
            push_sites!($v $f [$($p)* 0] [$($rest)*]);
            push_sites!($v $f [$($p)* 1] [$($rest)*]);
            push_sites!($v $f [$($p)* 2] [$($rest)*]);
            push_sites!($v $f [$($p)* 3] [$($rest)*]);
            push_sites!($v $f [$($p)* 4] [$($rest)*]);
            push_sites!($v $f [$($p)* 5] [$($rest)*]);
            push_sites!($v $f [$($p)* 6] [$($rest)*]);
            push_sites!($v $f [$($p)* 7] [$($rest)*]);
            push_sites!($v $f [$($p)* 8] [$($rest)*]);
            push_sites!($v $f [$($p)* 9] [$($rest)*]);
        };
    }

    /// A function with one site of `$key`, generic over a number that keeps the copies apart.
    macro_rules! site_fn {
        ($name:ident, $key:ident) => {
            #[inline(never)]
            fn $name<const I: u64>(x: u64) -> u64 {
                static_call!($key)(x) ^ I
            }
        };
        // The site follows `$skip` bytes of padding (jumped over), so that consecutive copies'
        // sites lie about that far apart. (Not `.p2align`: it would align the whole function.)
        ($name:ident, $key:ident, skip $skip:literal) => {
            #[inline(never)]
            fn $name<const I: u64>(x: u64) -> u64 {
                // SAFETY: jumps over padding; no register, flag or memory changes.
                unsafe {
                    core::arch::asm!(
                        "jmp 2f",
                        concat!(".skip ", $skip, ", 0xcc"),
                        "2:",
                        options(nomem, nostack, preserves_flags)
                    )
                };
                static_call!($key)(x) ^ I
            }
        };
    }

    site_fn!(lat_site, LAT);
    site_fn!(sync_site, SYNC);
    site_fn!(u100_site, U100);
    site_fn!(u10k_site, U10K);
    site_fn!(packed_site, PACKED, skip 4000);
    site_fn!(gapped_site, GAPPED, skip 12000);

    #[inline(never)]
    fn u1_site(x: u64) -> u64 {
        static_call!(U1)(x)
    }

    /// One site of the key `K`, for the update storm.
    #[inline(never)]
    fn storm_site<K: StaticCallKey<Fn = F>>(x: u64) -> u64 {
        static_call!(<K>)(x)
    }

    /// The windows of writable code opened while `run` ran: their number, and the duration
    /// (an upper bound, from the log2 histogram of `stats()`) under which half, 99% and all of
    /// them lasted, in µs.
    fn windows_during(run: impl FnOnce()) -> (u64, f64, f64, f64) {
        let s0 = static_call::stats();
        run();
        let d = stats_delta(s0, static_call::stats());
        let q = |x: f64| d.rwx_window_quantile(x).map_or(0.0, |n| n as f64 / 1e3);
        (d.rwx_windows.iter().sum(), q(0.5), q(0.99), q(1.0))
    }

    /// `STORM_THREADS` threads updating keys of their own (one patched site each) for
    /// `ms` milliseconds; the writable-code windows they opened.
    fn update_storm(ms: u64) -> (u64, f64, f64, f64) {
        /// A key and a function holding one of its sites.
        type Updater = (&'static StaticCall<F>, fn(u64) -> u64);
        let keys: [Updater; 8] = [
            (&W0, storm_site::<W0>),
            (&W1, storm_site::<W1>),
            (&W2, storm_site::<W2>),
            (&W3, storm_site::<W3>),
            (&W4, storm_site::<W4>),
            (&W5, storm_site::<W5>),
            (&W6, storm_site::<W6>),
            (&W7, storm_site::<W7>),
        ];
        for (i, (_, f)) in keys.iter().enumerate() {
            black_box(f(black_box(i as u64)));
        }
        static_call::flush();
        let stop = Arc::new(AtomicBool::new(false));
        windows_during(|| {
            let threads: Vec<_> = keys
                .iter()
                .take(STORM_THREADS)
                .map(|&(key, _)| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let mut r = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            key.update(if r.is_multiple_of(2) { dec } else { inc });
                            r += 1;
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(ms));
            stop.store(true, Ordering::Relaxed);
            for t in threads {
                t.join().unwrap();
            }
        })
    }

    // ---- measurement helpers --------------------------------------------------------------

    #[derive(Clone, Copy, Default)]
    struct Dist {
        n: usize,
        min: f64,
        p50: f64,
        p90: f64,
        p99: f64,
        max: f64,
    }

    /// Distribution in microseconds.
    fn dist(mut v: Vec<Duration>) -> Dist {
        v.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        Dist {
            n: v.len(),
            min: us(v[0]),
            p50: us(pct(&v, 50.0)),
            p90: us(pct(&v, 90.0)),
            p99: us(pct(&v, 99.0)),
            max: us(*v.last().unwrap()),
        }
    }

    fn stats_delta(a: Stats, b: Stats) -> Stats {
        Stats {
            batches: b.batches - a.batches,
            writes: b.writes - a.writes,
            mprotects: b.mprotects - a.mprotects,
            core_syncs: b.core_syncs - a.core_syncs,
            rwx_nanos: b.rwx_nanos - a.rwx_nanos,
            max_rwx_nanos: b.max_rwx_nanos,
            thunk_pages: b.thunk_pages - a.thunk_pages,
            rwx_windows: core::array::from_fn(|i| b.rwx_windows[i] - a.rwx_windows[i]),
        }
    }

    /// The aligned quadword that holds the call at `site`.
    fn word(site: usize) -> u64 {
        // SAFETY: the quadword holding a call site (at offset 0-3 of it) is in our mapped text.
        unsafe { core::ptr::read_volatile((site & !7) as *const u64) }
    }

    /// Kilobytes of this executable's text that are private copies (pages the patcher wrote).
    fn text_cow_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
        let exe = exe.to_string_lossy().into_owned();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let mut in_text = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let mut f = line.split_whitespace();
            let first = f.next().unwrap_or("");
            if first.contains('-') && !first.ends_with(':') {
                let perms = f.next().unwrap_or("");
                in_text = perms.contains('x') && line.ends_with(exe.as_str());
            } else if in_text && first == "Anonymous:" {
                kib += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        kib
    }

    struct Json(String);
    impl Json {
        fn num(&mut self, k: &str, v: f64) {
            let _ = write!(self.0, "\"{k}\": {v},");
        }
        fn dist(&mut self, k: &str, d: Dist) {
            let _ = write!(
                self.0,
                "\"{k}\": {{\"n\": {}, \"min\": {:.3}, \"p50\": {:.3}, \"p90\": {:.3}, \"p99\": {:.3}, \"max\": {:.3}}},",
                d.n, d.min, d.p50, d.p90, d.p99, d.max
            );
        }
        fn open(&mut self, k: &str) {
            let _ = write!(self.0, "\"{k}\": {{");
        }
        fn close(&mut self) {
            if self.0.ends_with(',') {
                self.0.pop();
            }
            self.0.push_str("},");
        }
        fn finish(mut self) -> String {
            if self.0.ends_with(',') {
                self.0.pop();
            }
            format!("{{{}}}\n", self.0)
        }
    }

    fn show(what: &str, d: Dist) {
        println!(
            "  {what:<44} p50 {:>9.2} µs  p90 {:>9.2}  p99 {:>9.2}  min {:>8.2}  max {:>9.2}  (n={})",
            d.p50, d.p90, d.p99, d.min, d.max, d.n
        );
    }

    // ---- floors: what the kernel charges, measured here and now --------------------------

    /// Wake-up latency of a parked thread (unpark -> it runs), and what the unpark costs the
    /// waker.
    /// With `cross_cpu`, the sleeper and this thread are pinned to different CPUs, as the
    /// worker and its caller are when the scheduler spreads them.
    fn floor_wake(cross_cpu: bool) -> (Dist, Dist) {
        let base = Instant::now();
        let woke = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (woke.clone(), stop.clone());
        if cross_cpu {
            pin(0, Some(0));
        }
        let sleeper = std::thread::spawn(move || {
            if cross_cpu {
                pin(0, Some(1));
            }
            while !s.load(Ordering::Acquire) {
                std::thread::park();
                w.store(base.elapsed().as_nanos() as u64, Ordering::Release);
            }
        });
        let (mut v, mut waker) = (Vec::new(), Vec::new());
        for _ in 0..400 {
            woke.store(0, Ordering::Relaxed);
            std::thread::sleep(Duration::from_micros(300));
            let t0 = base.elapsed().as_nanos() as u64;
            sleeper.thread().unpark();
            waker.push(Duration::from_nanos(base.elapsed().as_nanos() as u64 - t0));
            let mut t1;
            loop {
                t1 = woke.load(Ordering::Acquire);
                if t1 != 0 {
                    break;
                }
                core::hint::spin_loop();
            }
            v.push(Duration::from_nanos(t1.saturating_sub(t0)));
        }
        stop.store(true, Ordering::Release);
        sleeper.thread().unpark();
        sleeper.join().unwrap();
        pin(0, None);
        (dist(v), dist(waker))
    }

    /// `f`'s distribution while another thread of this process spins on the other CPU (so
    /// TLB shootdowns and `membarrier` have someone to interrupt), with both threads pinned.
    fn with_busy_cpu(f: impl FnOnce() -> Dist) -> Option<Dist> {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let spinner = std::thread::spawn(move || {
            pin(0, Some(1));
            while !s.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        });
        pin(0, Some(0));
        std::thread::sleep(Duration::from_millis(1));
        let d = f();
        stop.store(true, Ordering::Relaxed);
        spinner.join().unwrap();
        pin(0, None);
        Some(d)
    }

    #[inline(never)]
    fn floor_page_anchor() -> u64 {
        black_box(1)
    }

    /// An `mprotect` rwx + r-x pair on `page`, a page of our own text.
    fn floor_mprotect(page: usize) -> Dist {
        let mut v = Vec::new();
        for _ in 0..1000 {
            let t = Instant::now();
            // SAFETY: a page of our own text; the protection always keeps PROT_EXEC and goes
            // back to r-x, as the patcher does. Nothing is written.
            unsafe {
                let p = page as *mut libc::c_void;
                assert_eq!(
                    libc::mprotect(
                        p,
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC
                    ),
                    0
                );
                assert_eq!(
                    libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC),
                    0
                );
            }
            v.push(t.elapsed());
        }
        dist(v)
    }

    fn floor_membarrier() -> Dist {
        const SYNC_CORE: libc::c_int = 1 << 5;
        let mut v = Vec::new();
        for _ in 0..1000 {
            let t = Instant::now();
            // SAFETY: membarrier takes plain integers; the library registered this process for
            // SYNC_CORE in `init()`.
            let r = unsafe { libc::syscall(libc::SYS_membarrier, SYNC_CORE, 0, 0) };
            v.push(t.elapsed());
            assert_eq!(r, 0, "membarrier SYNC_CORE");
        }
        dist(v)
    }

    /// The patcher thread's id, found by its name.
    fn worker_tid() -> Option<i32> {
        for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.starts_with("static-call") {
                return e.file_name().to_str()?.parse().ok();
            }
        }
        None
    }

    /// Restricts thread `tid` (0: the calling thread) to `cpu`, or lets it run anywhere.
    fn pin(tid: i32, cpu: Option<usize>) -> bool {
        // SAFETY: plain libc calls on a local, fully initialised CPU set.
        unsafe {
            let mut set: libc::cpu_set_t = core::mem::zeroed();
            match cpu {
                Some(c) => libc::CPU_SET(c, &mut set),
                None => (0..libc::CPU_SETSIZE as usize).for_each(|c| libc::CPU_SET(c, &mut set)),
            }
            libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }

    /// For each fresh site: sleep (so the worker sleeps too), call it, and spin until its bytes
    /// change. Returns the durations of the first call and of first call -> bytes rewritten.
    fn first_calls(fns: &[fn(u64) -> u64], tramp: usize) -> [Vec<Duration>; 3] {
        let (mut first, mut patched, mut after) = (Vec::new(), Vec::new(), Vec::new());
        for (i, f) in fns.iter().enumerate() {
            let site = calls_to(addr(*f), 512, tramp);
            assert_eq!(site.len(), 1, "one site in site function {i}");
            let site = site[0];
            let before = word(site);
            std::thread::sleep(Duration::from_micros(500));
            let t0 = Instant::now();
            black_box(f(black_box(i as u64)));
            let t1 = Instant::now();
            while word(site) == before {
                core::hint::spin_loop();
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "site {i} never patched"
                );
            }
            let t2 = Instant::now();
            first.push(t1 - t0);
            patched.push(t2 - t0);
            after.push(t2 - t1);
        }
        [first, patched, after]
    }

    // ---- update ---------------------------------------------------------------------------

    struct UpdateResult {
        sites: usize,
        pages: usize,
        time: Dist,
        per_update: Stats,
        rwx_us: f64,
        vmas_before: usize,
        vmas_after: usize,
    }

    /// Registers every site in `fns`, lets them be patched, then times `reps` updates that
    /// alternate between two targets.
    fn update_bench(key: &StaticCall<F>, fns: &[fn(u64) -> u64], reps: usize) -> UpdateResult {
        for (i, f) in fns.iter().enumerate() {
            black_box(f(black_box(i as u64)));
        }
        static_call::flush();
        let sites = key.sites();
        assert_eq!(sites.len(), fns.len(), "every site registered");
        assert!(
            sites.iter().all(|s| s.state == SiteState::Patched),
            "every site patched"
        );
        let mut pages: Vec<usize> = sites.iter().map(|s| s.address / 4096).collect();
        pages.sort_unstable();
        pages.dedup();
        let vmas_before = vma_count();
        let s0 = static_call::stats();
        let mut times = Vec::with_capacity(reps);
        for r in 0..reps {
            let target: F = if r % 2 == 0 { dec } else { inc };
            let t = Instant::now();
            key.update(target);
            times.push(t.elapsed());
        }
        let s1 = static_call::stats();
        let vmas_after = vma_count();
        key.update(inc);
        for (i, f) in fns.iter().enumerate().take(64) {
            assert_eq!(f(i as u64), (i as u64 + 1) ^ i as u64, "site calls inc");
        }
        let d = stats_delta(s0, s1);
        let per = |x: u64| x / reps as u64;
        UpdateResult {
            sites: sites.len(),
            pages: pages.len(),
            time: dist(times),
            per_update: Stats {
                batches: per(d.batches),
                writes: per(d.writes),
                mprotects: per(d.mprotects),
                core_syncs: per(d.core_syncs),
                rwx_nanos: per(d.rwx_nanos),
                max_rwx_nanos: d.max_rwx_nanos,
                thunk_pages: d.thunk_pages,
                rwx_windows: d.rwx_windows,
            },
            rwx_us: d.rwx_nanos as f64 / reps as f64 / 1e3,
            vmas_before,
            vmas_after,
        }
    }

    fn show_update(what: &str, r: &UpdateResult) {
        show(what, r.time);
        println!(
            "  {:<44} {} sites on {} pages; per update: {} mprotect, {} core sync, {} batch, {} writes; pages rwx {:.1} µs; VMAs {} -> {}",
            "",
            r.sites,
            r.pages,
            r.per_update.mprotects,
            r.per_update.core_syncs,
            r.per_update.batches,
            r.per_update.writes,
            r.rwx_us,
            r.vmas_before,
            r.vmas_after
        );
    }

    fn json_update(j: &mut Json, k: &str, r: &UpdateResult) {
        j.open(k);
        j.num("sites", r.sites as f64);
        j.num("pages", r.pages as f64);
        j.dist("time_us", r.time);
        j.num("mprotects", r.per_update.mprotects as f64);
        j.num("core_syncs", r.per_update.core_syncs as f64);
        j.num("batches", r.per_update.batches as f64);
        j.num("writes", r.per_update.writes as f64);
        j.num("rwx_us", r.rwx_us);
        j.num("vmas_before", r.vmas_before as f64);
        j.num("vmas_after", r.vmas_after as f64);
        j.close();
    }

    // ---- main -----------------------------------------------------------------------------

    pub fn main() {
        let mut j = Json(String::new());
        let vmas_start = vma_count();
        let anon_start = status_kib("RssAnon");

        println!("static-call latency and scale (times in µs)");
        static_call::init();
        let status = static_call::status();
        assert_eq!(status.patching, Ok(()), "patching must be on: {status:?}");
        let anon_init = status_kib("RssAnon");
        let tramp = static_call::trampoline_address().unwrap();

        println!("floors (kernel work the patcher cannot avoid):");
        let (wake, waker) = floor_wake(false);
        show("wake a parked thread (futex)", wake);
        show("  what the wake costs the waker", waker);
        let two_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
        let (wake_x, waker_x) = floor_wake(two_cpus);
        if two_cpus {
            show("  the same, threads pinned to 2 CPUs", wake_x);
            show("  the same, what it costs the waker", waker_x);
        }
        let mprot = floor_mprotect(addr(floor_page_anchor as fn() -> u64) & !4095);
        show("mprotect rwx + r-x pair, one page", mprot);
        let mb = floor_membarrier();
        show("membarrier(SYNC_CORE)", mb);
        let page = addr(floor_page_anchor as fn() -> u64) & !4095;
        let mprot_busy = with_busy_cpu(|| floor_mprotect(page));
        let mb_busy = with_busy_cpu(floor_membarrier);
        if let (Some(a), Some(b)) = (mprot_busy, mb_busy) {
            show("mprotect pair, another thread running", a);
            show("membarrier, another thread running", b);
        }
        j.open("floors");
        j.dist("wake_us", wake);
        j.dist("mprotect_pair_us", mprot);
        j.dist("membarrier_us", mb);
        j.dist("waker_us", waker);
        if two_cpus {
            j.dist("wake_cross_us", wake_x);
            j.dist("waker_cross_us", waker_x);
        }
        if let (Some(a), Some(b)) = (mprot_busy, mb_busy) {
            j.dist("mprotect_pair_busy_us", a);
            j.dist("membarrier_busy_us", b);
        }
        j.close();

        // First call -> patched by the worker, which sleeps before every sample: half of the
        // sites with the threads where the scheduler puts them, half with this thread and the
        // worker pinned to different CPUs.
        let mut lat: Vec<fn(u64) -> u64> = Vec::new();
        push_sites!(lat lat_site [] [x x x]);
        let vmas_before_lat = vma_count();
        let cow_before = text_cow_kib();
        let anon_before = status_kib("RssAnon");
        let s0 = static_call::stats();
        let [first, patched, after] = first_calls(&lat[..500], tramp);
        let lat_stats = stats_delta(s0, static_call::stats());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let worker = worker_tid();
        let pinned = cpus >= 2 && worker.is_some_and(|w| pin(w, Some(1))) && pin(0, Some(0));
        let [first_pinned, patched_pinned, _] = first_calls(&lat[500..], tramp);
        if let Some(w) = worker {
            pin(w, None);
        }
        pin(0, None);
        static_call::flush();
        let anon_after = status_kib("RssAnon");
        let cow_after = text_cow_kib();
        let vmas_after_lat = vma_count();
        let lat_sites = LAT.sites();
        assert!(lat_sites.iter().all(|s| s.state == SiteState::Patched));
        let mut lat_pages: Vec<usize> = lat_sites.iter().map(|s| s.address / 4096).collect();
        lat_pages.sort_unstable();
        lat_pages.dedup();

        // First call, then `flush()` in the same thread: patching without waking anyone.
        let mut sync: Vec<fn(u64) -> u64> = Vec::new();
        push_sites!(sync sync_site [] [x x]);
        let mut synced = Vec::new();
        for (i, f) in sync.iter().enumerate() {
            let site = calls_to(addr(*f), 512, tramp)[0];
            let before = word(site);
            std::thread::sleep(Duration::from_micros(500));
            let t0 = Instant::now();
            black_box(f(black_box(i as u64)));
            static_call::flush();
            synced.push(t0.elapsed());
            assert_ne!(
                word(site),
                before,
                "flush() returned with the site unpatched"
            );
        }

        println!("first call of a fresh site:");
        let (first, patched, synced, after) =
            (dist(first), dist(patched), dist(synced), dist(after));
        show("the first call itself (trampoline, register)", first);
        show("first call -> site rewritten (worker wakes)", patched);
        show("  of which: call returned -> rewritten", after);
        println!(
            "  {:<44} per site: {:.1} batches, {:.1} mprotect, pages writable {:.1} µs",
            "",
            lat_stats.batches as f64 / 500.0,
            lat_stats.mprotects as f64 / 500.0,
            lat_stats.rwx_nanos as f64 / 500.0 / 1e3
        );
        let (first_pinned, patched_pinned) = (dist(first_pinned), dist(patched_pinned));
        if pinned {
            show(
                "  the same, caller and worker on 2 CPUs: call",
                first_pinned,
            );
            show(
                "  the same, caller and worker on 2 CPUs: patched",
                patched_pinned,
            );
        }
        show("first call + flush() (patched in the caller)", synced);
        println!(
            "  {} fresh sites on {} pages: +{} KiB anonymous RSS ({} KiB of it private text copies), VMAs {} -> {}",
            lat.len(),
            lat_pages.len(),
            anon_after as i64 - anon_before as i64,
            cow_after as i64 - cow_before as i64,
            vmas_before_lat,
            vmas_after_lat
        );
        j.open("first_call");
        j.dist("call_us", first);
        j.dist("patched_us", patched);
        j.dist("call_flush_us", synced);
        j.dist("after_call_us", after);
        j.num("rwx_us_per_site", lat_stats.rwx_nanos as f64 / 500.0 / 1e3);
        if pinned {
            j.dist("pinned_call_us", first_pinned);
            j.dist("pinned_patched_us", patched_pinned);
        }
        j.num("sites", lat.len() as f64);
        j.num("pages", lat_pages.len() as f64);
        j.num("rss_anon_kib", anon_after as f64 - anon_before as f64);
        j.num("text_cow_kib", cow_after as f64 - cow_before as f64);
        j.num("vmas_before", vmas_before_lat as f64);
        j.num("vmas_after", vmas_after_lat as f64);
        j.close();

        // update with 1, 100 and 10,000 sites.
        println!("update (alternating between two targets):");
        let u1 = update_bench(&U1, &[u1_site], 2000);
        show_update("1 site", &u1);
        // The same key while another thread of the process runs on the other CPU: the core
        // sync then has a CPU to interrupt.
        let u1_busy = with_busy_cpu(|| {
            let mut t = Vec::new();
            for r in 0..1000 {
                let a = Instant::now();
                U1.update(if r % 2 == 0 { dec } else { inc });
                t.push(a.elapsed());
            }
            U1.update(inc);
            dist(t)
        });
        if let Some(d) = u1_busy {
            show("1 site, another thread running", d);
        }
        // The floor again, on the page the patcher wrote (a private copy now).
        let cow_page = U1.sites()[0].address & !4095;
        let mprot_cow = floor_mprotect(cow_page);
        show("  floor: mprotect pair on that written page", mprot_cow);
        let mut u100: Vec<fn(u64) -> u64> = Vec::new();
        push_sites!(u100 u100_site [] [x x]);
        let u100 = update_bench(&U100, &u100, 1000);
        show_update("100 sites", &u100);

        let mut u10k: Vec<fn(u64) -> u64> = Vec::new();
        push_sites!(u10k u10k_site [] [x x x x]);
        let anon_before = status_kib("RssAnon");
        let cow_before = text_cow_kib();
        let s0 = static_call::stats();
        let t = Instant::now();
        for (i, f) in u10k.iter().enumerate() {
            black_box(f(black_box(i as u64)));
        }
        static_call::flush();
        let register_10k = t.elapsed();
        let reg = stats_delta(s0, static_call::stats());
        let anon_10k = status_kib("RssAnon") as i64 - anon_before as i64;
        let cow_10k = text_cow_kib() as i64 - cow_before as i64;
        println!(
            "  first calls of 10,000 sites until all patched: {:.2} ms ({} batches, {} core syncs, {} mprotect); +{} KiB anonymous RSS ({} KiB text copies)",
            register_10k.as_secs_f64() * 1e3,
            reg.batches,
            reg.core_syncs,
            reg.mprotects,
            anon_10k,
            cow_10k
        );
        let u10k = update_bench(&U10K, &u10k, 100);
        show_update("10,000 sites", &u10k);
        j.open("update");
        json_update(&mut j, "1", &u1);
        j.dist("mprotect_pair_written_page_us", mprot_cow);
        if let Some(d) = u1_busy {
            j.dist("busy_1_us", d);
        }
        json_update(&mut j, "100", &u100);
        json_update(&mut j, "10000", &u10k);
        j.close();
        j.open("register_10000");
        j.num("ms", register_10k.as_secs_f64() * 1e3);
        j.num("batches", reg.batches as f64);
        j.num("core_syncs", reg.core_syncs as f64);
        j.num("mprotects", reg.mprotects as f64);
        j.num("rss_anon_kib", anon_10k as f64);
        j.num("text_cow_kib", cow_10k as f64);
        j.close();

        // Windows: 100 sites about a page apart (contiguous pages, one window) or about three
        // pages apart (a window per page).
        println!("mprotect windows, 100 sites on 100 pages:");
        let mut packed: Vec<fn(u64) -> u64> = Vec::new();
        push_sites!(packed packed_site [] [x x]);
        let packed = update_bench(&PACKED, &packed, 400);
        show_update("contiguous pages (merged windows)", &packed);
        let mut gapped: Vec<fn(u64) -> u64> = Vec::new();
        push_sites!(gapped gapped_site [] [x x]);
        let gapped = update_bench(&GAPPED, &gapped, 400);
        show_update("pages apart (a window per page)", &gapped);
        j.open("windows");
        json_update(&mut j, "contiguous", &packed);
        json_update(&mut j, "gapped", &gapped);
        j.close();

        // How long code pages stay writable: updates one at a time, then a storm of updaters
        // (more threads than CPUs) that get preempted inside their windows.
        println!("windows of writable code (µs; log2-bucket upper bounds):");
        let quiet = windows_during(|| {
            for r in 0..2000 {
                U1.update(if r % 2 == 0 { dec } else { inc });
            }
        });
        let storm_ms = std::env::var("STATIC_CALL_STORM_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(STORM_MS);
        let storm = update_storm(storm_ms);
        for (what, (n, p50, p99, max)) in [
            ("updates one at a time", quiet),
            ("update storm, 8 threads on this machine's CPUs", storm),
        ] {
            println!("  {what:<44} {n} windows: p50 <= {p50:.1}, p99 <= {p99:.1}, max <= {max:.1}");
        }
        j.open("rwx_windows");
        for (k, (n, p50, p99, max)) in [("quiet", quiet), ("storm", storm)] {
            j.open(k);
            j.num("windows", n as f64);
            j.num("p50_us", p50);
            j.num("p99_us", p99);
            j.num("max_us", max);
            j.close();
        }
        j.close();

        // Memory.
        let status = static_call::status();
        let key = size_of::<StaticCall<F>>();
        let key_static = size_of_val(&LAT);
        println!("memory:");
        println!(
            "  key: {key} bytes (the static `define_static_call!` makes: {key_static}); registry: {} slots of 64 bytes = {} KiB virtual, {} sites registered",
            status.capacity,
            status.capacity * 64 / 1024,
            status.sites
        );
        println!(
            "  RssAnon: {} KiB at start, {} KiB after init(), {} KiB now; VMAs: {} at start, {} now",
            anon_start,
            anon_init,
            status_kib("RssAnon"),
            vmas_start,
            vma_count()
        );
        j.open("memory");
        j.num("key_bytes", key as f64);
        j.num("key_static_bytes", key_static as f64);
        j.num("registry_slots", status.capacity as f64);
        j.num("registry_kib", (status.capacity * 64 / 1024) as f64);
        j.num("sites", status.sites as f64);
        j.num("rss_anon_start_kib", anon_start as f64);
        j.num("rss_anon_init_kib", anon_init as f64);
        j.num("rss_anon_end_kib", status_kib("RssAnon") as f64);
        j.num("text_cow_end_kib", text_cow_kib() as f64);
        j.num("vmas_start", vmas_start as f64);
        j.num("vmas_end", vma_count() as f64);
        j.close();

        let dir = std::env::var("STATIC_CALL_BENCH_OUT")
            .unwrap_or_else(|_| "target/static-call-bench".into());
        let _ = std::fs::create_dir_all(&dir);
        let path = format!("{dir}/latency.json");
        std::fs::write(&path, j.finish()).expect("write latency.json");
        println!("wrote {path}");
    }
}
