//! `wanmig-pagecheck`: see the library documentation and `--help`.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use wanmig_pagecheck::disk::{BlockIo, DirectDisk, DiskChecker};
use wanmig_pagecheck::{
    Checker, Config, Pacer, PageError, Stats, config::USAGE, error_line_for, heartbeat_line_for,
};

/// How much work the pacers bank at most (seconds of their rate).
const BURST_SECS: f64 = 0.5;

fn main() -> ExitCode {
    let cfg = match Config::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) if e == "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("wanmig-pagecheck: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let locked = lock_memory();
    let run = cfg.run_id.unwrap_or_else(random_id);
    let t0 = Instant::now();
    match &cfg.disk {
        None => {
            let ck = match Checker::new(run, cfg.pages(), cfg.wss_pages(), cfg.pattern) {
                Ok(c) => c,
                Err(e) => {
                    emit(&format!("PAGECHECK-FAILED {e}"));
                    return ExitCode::from(2);
                }
            };
            emit(&format!(
                "PAGECHECK-START run={run:016x} pages={} mib={} rate={} readrate={} wss_pages={} \
                 pattern={} slice_ms={} locked={} init_s={:.2}",
                ck.len(),
                cfg.mib,
                cfg.rate,
                cfg.readrate,
                ck.wss(),
                cfg.pattern.name(),
                cfg.slice_ms(),
                u8::from(locked),
                t0.elapsed().as_secs_f64()
            ));
            run_loop(&cfg, run, Memory(ck), "PAGECHECK", "HB")
        }
        Some(dev) => {
            let ck = DirectDisk::open(dev)
                .map_err(|e| format!("{dev}: {e}"))
                .and_then(|d| {
                    DiskChecker::new(d, run, cfg.pages(), cfg.wss_pages(), cfg.pattern, cfg.split)
                        .map(|c| c.blind_writes(cfg.blind))
                        .map_err(|e| e.to_string())
                });
            let ck = match ck {
                Ok(c) => c,
                Err(e) => {
                    emit(&format!("DISKCHECK-FAILED {e}"));
                    return ExitCode::from(2);
                }
            };
            emit(&format!(
                "DISKCHECK-START run={run:016x} blocks={} mib={} rate={} readrate={} disk={dev} \
                 split={} blind={} pattern={} init_s={:.2}",
                ck.len(),
                cfg.mib,
                cfg.rate,
                cfg.readrate,
                u8::from(cfg.split),
                u8::from(cfg.blind),
                cfg.pattern.name(),
                t0.elapsed().as_secs_f64()
            ));
            run_loop(&cfg, run, ck, "DISKCHECK", "DHB")
        }
    }
}

/// What the loop drives: the RAM checker or the disk checker.
trait Work {
    fn write_one(&mut self) -> Result<Option<PageError>, String>;
    fn verify_one(&mut self) -> Result<Option<PageError>, String>;
    fn stats(&self) -> Stats;
}

struct Memory(Checker);

impl Work for Memory {
    fn write_one(&mut self) -> Result<Option<PageError>, String> {
        Ok(self.0.write_one())
    }
    fn verify_one(&mut self) -> Result<Option<PageError>, String> {
        Ok(self.0.verify_one())
    }
    fn stats(&self) -> Stats {
        self.0.stats()
    }
}

impl<D: BlockIo> Work for DiskChecker<D> {
    fn write_one(&mut self) -> Result<Option<PageError>, String> {
        DiskChecker::write_one(self).map_err(|e| e.to_string())
    }
    fn verify_one(&mut self) -> Result<Option<PageError>, String> {
        DiskChecker::verify_one(self).map_err(|e| e.to_string())
    }
    fn stats(&self) -> Stats {
        DiskChecker::stats(self)
    }
}

/// Writes and verifies at the configured rates, one heartbeat a second.
fn run_loop(cfg: &Config, run: u64, mut ck: impl Work, prefix: &str, hb_prefix: &str) -> ExitCode {
    let mut wp = Pacer::new(cfg.write_pages_per_sec(), BURST_SECS);
    let mut rp = Pacer::new(cfg.read_pages_per_sec(), BURST_SECS);
    let slice = Duration::from_millis(cfg.slice_ms());
    let start = Instant::now();
    let mut last = start;
    let mut next_tick = start + slice;
    let mut next_hb = start + Duration::from_secs(1);
    let mut hb = 0u64;
    let mut printed = 0u64;
    let mut report = |e: PageError| {
        if printed < cfg.max_print {
            emit(&error_line_for(prefix, &e));
            printed += 1;
            if printed == cfg.max_print {
                emit(&format!(
                    "{prefix}-ERROR-LIMIT printed={printed}: further errors are only counted ({hb_prefix} errors=)"
                ));
            }
        }
    };
    loop {
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        let mut failed = None;
        for _ in 0..wp.take(dt) {
            match ck.write_one() {
                Ok(Some(e)) => report(e),
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        }
        for _ in 0..rp.take(dt) {
            match ck.verify_one() {
                Ok(Some(e)) => report(e),
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            // An I/O error is not a wrong block: say so and stop.
            emit(&format!("{prefix}-FAILED {e}"));
            return ExitCode::from(2);
        }
        let now = Instant::now();
        if now >= next_hb {
            hb += 1;
            emit(&heartbeat_line_for(
                hb_prefix,
                hb,
                uptime(start),
                &ck.stats(),
            ));
            // One line per second: after a stall, skip the missed seconds.
            next_hb = start + Duration::from_secs(now.duration_since(start).as_secs() + 1);
        }
        if cfg.duration > 0.0 && now.duration_since(start).as_secs_f64() >= cfg.duration {
            let s = ck.stats();
            emit(&format!(
                "{prefix}-END run={run:016x} written={} verified={} errors={} gen={} seconds={:.2}",
                s.written,
                s.verified,
                s.errors,
                s.max_gen,
                now.duration_since(start).as_secs_f64()
            ));
            return if s.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        next_tick += slice;
        let now = Instant::now();
        if next_tick <= now {
            next_tick = now + slice;
        }
        std::thread::sleep(next_tick - now);
    }
}

/// Writes one whole line to stdout (one `write` per line, so lines from other
/// processes on the same console do not cut into it).
fn emit(line: &str) {
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(buf.as_bytes());
    let _ = out.flush();
}

/// Seconds since boot (`/proc/uptime`), or since the loop started if that
/// cannot be read.
fn uptime(start: Instant) -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| start.elapsed().as_secs_f64())
}

/// A random run id. `getrandom(GRND_INSECURE)`: never blocks and, unlike a
/// read of `/dev/urandom` early after boot, does not make the kernel spend a
/// second generating jitter entropy (it did, under TCG). Falls back to time
/// and pid; the id only has to differ between runs.
fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: the buffer is valid for writes of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_INSECURE) };
    if n == b.len() as isize {
        let v = u64::from_le_bytes(b);
        if v != 0 {
            return v;
        }
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    wanmig_pagecheck::page::splitmix64(t ^ (u64::from(std::process::id()) << 32)) | 1
}

/// Locks the region in RAM so the guest kernel never moves the checker's
/// pages (compaction, reclaim): a host looking for a page by its tag then
/// finds the one the checker reads. Best effort.
fn lock_memory() -> bool {
    // SAFETY: mlockall takes flags only and touches no memory of ours.
    unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) == 0 }
}
