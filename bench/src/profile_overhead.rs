//! What profiling costs the guest: `sysbench memory` inside the built-in
//! guest reports its throughput once a second; the benchmark compares the
//! seconds in which the engine profiles it (the write log alone, then with
//! reads sampled within each read budget asked) with the
//! seconds in which nothing watches it, windows alternated in the same run
//! so that drift on a shared machine hits every mode alike.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use wanmig_datapath::backend::qemu::{GuestSpec, QemuPaths, QemuSource, SerialLog};
use wanmig_datapath::profiling::{ProfileOptions, ProfileStats, profile_guest};

/// What to measure.
#[derive(Debug, Clone)]
pub struct OverheadOptions {
    /// Directory for the guest's files.
    pub dir: PathBuf,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// sysbench memory's buffer (the working set), MiB.
    pub block_mib: u64,
    /// sysbench memory's operation: `read` or `write`.
    pub oper: String,
    /// Profile intervals per window.
    pub samples: u32,
    /// Interval length.
    pub interval: Duration,
    /// Read budgets to measure (`None`: the write log alone;
    /// `f64::INFINITY`: all of RAM every interval).
    pub budgets: Vec<Option<f64>>,
    /// Rounds: each is a quiet window, then one window per mode.
    pub rounds: u32,
}

/// One mode's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ModeFigures {
    /// `writes` (the write log alone), `reads 5%` or `reads all`.
    pub mode: String,
    /// The read budget (`None`: reads not sampled; infinite: all of RAM).
    pub read_budget: Option<f64>,
    /// sysbench's mean throughput while profiled, MiB/s.
    pub mib_s: f64,
    /// That over the quiet windows' mean.
    pub ratio: f64,
    /// Pages faulted in by read sampling per second.
    pub read_faults_per_s: f64,
    /// Share of RAM watched at least once per profile (mean).
    pub read_coverage: f64,
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadReport {
    /// sysbench memory's operation.
    pub oper: String,
    /// Its buffer, MiB.
    pub block_mib: u64,
    /// Mean throughput with nothing watching, MiB/s.
    pub quiet_mib_s: f64,
    /// One entry per mode.
    pub modes: Vec<ModeFigures>,
}

/// The benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum OverheadError {
    /// The guest or the engine.
    #[error("{what}: {message}")]
    Guest {
        /// What was being done.
        what: &'static str,
        /// What went wrong.
        message: String,
    },
}

fn guest_err(what: &'static str) -> impl Fn(String) -> OverheadError {
    move |message| OverheadError::Guest { what, message }
}

/// sysbench's report lines so far: `(second, MiB/s)`.
fn reports(log: &SerialLog) -> Vec<(u64, f64)> {
    log.lines()
        .iter()
        .filter_map(|l| {
            // "[ 12s ] 1234.56 MiB/sec"
            let rest = l.strip_prefix("[ ")?;
            let (secs, rest) = rest.split_once("s ] ")?;
            let (rate, unit) = rest.trim().split_once(' ')?;
            (unit == "MiB/sec").then_some((secs.parse().ok()?, rate.parse().ok()?))
        })
        .collect()
}

/// The last report's second, after polling.
fn now_second(log: &mut SerialLog) -> Result<u64, OverheadError> {
    log.poll()
        .map_err(|e| guest_err("reading the console")(e.to_string()))?;
    Ok(reports(log).last().map_or(0, |r| r.0))
}

/// Mean throughput of the reports in seconds `(from, to]` (the first
/// second after `from` overlaps the window's start: skipped).
fn window_mean(log: &SerialLog, from: u64, to: u64) -> Option<f64> {
    let v: Vec<f64> = reports(log)
        .into_iter()
        .filter(|&(s, _)| s > from + 1 && s <= to)
        .map(|(_, r)| r)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Runs the benchmark.
pub fn run(o: &OverheadOptions) -> Result<OverheadReport, OverheadError> {
    std::fs::create_dir_all(&o.dir).map_err(|e| guest_err("run directory")(e.to_string()))?;
    let params = format!(
        "wanmig.workload=sysbench-memory wanmig.check=0 wanmig.memblock={}M wanmig.memoper={}",
        o.block_mib, o.oper
    );
    let guest = GuestSpec::builtin(o.memory_mib, &params)
        .map_err(|e| guest_err("the built-in guest (run scripts/setup)")(e.to_string()))?;
    let tag = format!("ovh{}", std::process::id());
    let paths = QemuPaths::new(&o.dir, &tag, "source");
    let mut src = QemuSource::start(&guest, &paths, &o.dir)
        .map_err(|e| guest_err("starting the guest")(e.to_string()))?;
    let result = measure(o, &mut src, &paths);
    drop(src);
    let _ = std::fs::remove_file(&paths.ram);
    let _ = std::fs::remove_file(&paths.uffd_sock);
    result
}

fn measure(
    o: &OverheadOptions,
    src: &mut QemuSource,
    paths: &QemuPaths,
) -> Result<OverheadReport, OverheadError> {
    let mut log = SerialLog::new(&paths.serial);
    // Warm: a few reports first.
    let deadline = Instant::now() + Duration::from_secs(120);
    while now_second(&mut log)? < 3 {
        if Instant::now() > deadline {
            return Err(guest_err("sysbench memory")(format!(
                "no throughput report in 120 s (see {})",
                paths.serial.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let window = o.interval * o.samples;
    let profile = o.dir.join("overhead.wmp");
    let mut quiet = Vec::new();
    let mut modes: Vec<(Option<f64>, Vec<f64>, Vec<ProfileStats>)> = o
        .budgets
        .iter()
        .map(|&b| (b, Vec::new(), Vec::new()))
        .collect();
    for _ in 0..o.rounds {
        let from = now_second(&mut log)?;
        std::thread::sleep(window + Duration::from_millis(1100));
        let to = now_second(&mut log)?;
        quiet.extend(window_mean(&log, from, to));
        for (k, means, stats) in &mut modes {
            let from = now_second(&mut log)?;
            let opts = ProfileOptions {
                read_budget: *k,
                ..ProfileOptions::new(o.samples, o.interval, 300_000)
            };
            let st = profile_guest(src, &opts, &profile)
                .map_err(|e| guest_err("profiling")(e.to_string()))?;
            // The report of the window's last second.
            std::thread::sleep(Duration::from_millis(1100));
            let to = now_second(&mut log)?.saturating_sub(1);
            means.extend(window_mean(&log, from, to));
            stats.push(st);
        }
    }
    let _ = std::fs::remove_file(&profile);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let quiet_mib_s = mean(&quiet);
    Ok(OverheadReport {
        oper: o.oper.clone(),
        block_mib: o.block_mib,
        quiet_mib_s,
        modes: modes
            .into_iter()
            .map(|(k, means, stats)| {
                let faults: u64 = stats.iter().map(|s| s.read_faults).sum();
                let secs = window.as_secs_f64() * stats.len().max(1) as f64;
                let coverage =
                    stats.iter().map(|s| s.read_coverage).sum::<f64>() / stats.len().max(1) as f64;
                ModeFigures {
                    mode: match k {
                        None => "writes".to_string(),
                        Some(b) if b.is_infinite() => "reads all".to_string(),
                        Some(b) => format!("reads {:.0}%", b * 100.0),
                    },
                    read_budget: k,
                    read_coverage: coverage,
                    mib_s: mean(&means),
                    ratio: mean(&means) / quiet_mib_s,
                    read_faults_per_s: faults as f64 / secs,
                }
            })
            .collect(),
    })
}
