//! The nested Xen correctness lab (`wanmig-bench xen`, `scripts/xen-lab`).
//!
//! Boots Xen under QEMU TCG (`-cpu qemu64,+svm,+npt`) with a dom0
//! built by `bench/xen/dom0-image`, whose `/init` (`bench/xen/dom0-init`)
//! creates a PVH guest running the built-in guest's page checker on `hvc0`,
//! migrates it to localhost with `xl migrate` (through the engine with the
//! patched `xl migrate --wanmig`, then with stock `xl migrate`, each run on
//! a fresh guest of the same configuration), and reports on the serial
//! console ([`protocol`]). The guest runs on Xen's shadow page tables
//! (`hap = 0`, the patched hypervisor has them) under this host's QEMU:
//! on nested paging, guests die at once under QEMU 10's TCG, and under
//! bookworm's QEMU 7.2 about 4 migrations in 10 end with the guest's triple
//! fault, stock xl's as often as the engine's (`--paging hap` runs it so).
//! TCG timings say nothing of real speed: this is a correctness lab.
//!
//! Figures, the same way for every run (dom0's clock, 10 ms resolution):
//! - `total_s`: the `xl migrate` command's wall time, as its user sees it;
//! - `downtime_s`: from libxl's suspend request to the guest (its kernel
//!   freezes its tasks from then on) to the receiver's unpause of the
//!   migrated domain ("migration target: Domain started"), both lines of
//!   `xl -vvv migrate`'s own output, stamped by dom0 as they arrive (a
//!   reader on xl's stderr pipe: nothing polls the guest or the toolstack
//!   inside the measured interval);
//! - `rounds`: live pre-copy rounds (the guest running), without the final
//!   stop-and-copy: libxenguest's "Frames iteration N" progress for stock
//!   xl, the engine's `rounds` for the engine;
//!   Stock xl 4.17 prints neither rounds nor pages at any verbosity (its
//!   save helper's progress callbacks do not reach xl's output), so for the
//!   stock run `rounds` is null unless such lines appear;
//! - `pages_sent` / `bytes_sent`: the engine's report; for stock xl null
//!   rather than estimated (counting the stream would put a copy through a
//!   counter inside the baseline's measured interval);
//! - `guest_heartbeat_gap_s`: the guest's own view, the longest gap between
//!   the page checker's once-a-second heartbeats (indicative only: see the
//!   field);
//! - `verify_s`, `physmap_scan_s`: the engine's share of its downtime spent
//!   proving the copy (`verify=1`) and rescanning the physmap at the freeze.
//!
//! Integrity: `checker_errors` is the page checker's count (the last
//! heartbeat of the migrated guest, judged as `SerialLog::checker_errors`
//! judges a QEMU guest's console) and `checker_verified_after` the pages it
//! verified after the migration (0: the checker did not run there, and the
//! run fails); `checked`, `pages_compared`, `pages_differing` are the
//! engine's page-by-page comparison of the destination's frames with
//! digests of the source's frozen frames (restore.json). Stock xl has no
//! such comparison: `checked: false`, never a pass.

pub mod protocol;
pub mod provision;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use wanmig_datapath::backend::qemu::SerialLog;

use protocol::{Event, Transcript, XlMigration};
pub use provision::{Image, ProvisionOptions};

/// How to run the lab.
#[derive(Debug, Clone)]
pub struct XenOptions {
    /// The image to boot (from [`provision::provision`]).
    pub image: Image,
    /// Where the serial log, the runs' logs and the report go.
    pub dir: PathBuf,
    /// The runs, in order: `engine`, `stock`.
    pub runs: Vec<String>,
    /// Guest memory, MiB.
    pub guest_mib: u32,
    /// The guest's `wanmig.*` parameters (page checker: region, write and
    /// read rates).
    pub guest_params: Vec<String>,
    /// The engine's fraction M.
    pub m: f64,
    /// The whole boot may take this long.
    pub timeout: Duration,
    /// No event from dom0 for this long is a hang.
    pub stall: Duration,
    /// QEMU binary [default: the image's, `bench/xen/lab-qemu`].
    pub qemu: Option<PathBuf>,
    /// QEMU's `-accel` (`tcg`; `tcg,thread=single` runs every vCPU on one
    /// host thread).
    pub accel: String,
    /// The guest's paging: hardware-assisted (nested paging, `true`) or
    /// Xen's shadow page tables (`hap = 0`; the patched hypervisor has them).
    pub hap: bool,
}

impl XenOptions {
    /// The page checker on 32 MiB, writing 2 MiB/s and verifying 8 MiB/s:
    /// pre-copy has to iterate (under nested TCG a pass over the guest
    /// takes tens of seconds, enough for the whole region to be dirtied).
    pub fn default_guest_params() -> Vec<String> {
        [
            "wanmig.workload=pagecheck",
            "wanmig.mib=32",
            "wanmig.rate=2",
            "wanmig.readrate=8",
        ]
        .map(String::from)
        .to_vec()
    }
}

/// The lab's report (`wanmig-bench xen --json`).
#[derive(Debug, Clone, Serialize)]
pub struct XenReport {
    /// `xl info`'s version (major.minor+extra).
    pub xen_version: Option<String>,
    /// Which hypervisor: "debian <version> (stock)" or "patched ...".
    pub hypervisor: String,
    /// Which toolstack.
    pub tools: String,
    /// The stock run's sender: Debian's own xl when the image carries it
    /// beside the patched tools, else the patched xl without `--wanmig`.
    pub stock_tools: Option<String>,
    /// The dom0 image's hash.
    pub image: String,
    /// Whether the engine run could run, and if not why.
    pub engine: EngineStatus,
    /// The runs, failed ones included.
    pub runs: Vec<RunReport>,
    /// Runs not made, and why.
    pub skipped: Vec<Skipped>,
    /// Bad input before the engine migrates (`abi-client`: the C ABI's
    /// client against the live domain; an engine stream into a receiver
    /// without `--wanmig`, which must fail and leave the guest running).
    pub checks: Vec<Check>,
    /// Where the time went.
    pub timings: LabTimings,
    /// Where the logs are.
    pub dir: PathBuf,
}

/// The engine's availability.
#[derive(Debug, Clone, Serialize)]
pub struct EngineStatus {
    /// The image has the patched xl and libwanmig.so.
    pub available: bool,
    /// Why not.
    pub missing: Option<String>,
}

/// A check of how bad input is handled.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it behaved.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// A run not made.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The run.
    pub run: String,
    /// The command it would have used.
    pub via: String,
    /// Why it was not made.
    pub reason: String,
}

/// Wall times of the lab, s (host clock unless said).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LabTimings {
    /// QEMU start to dom0's `/init`.
    pub boot_s: Option<f64>,
    /// QEMU start to the toolstack up (xenstored, xenconsoled).
    pub toolstack_s: Option<f64>,
    /// QEMU start to its exit.
    pub lab_s: f64,
}

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `precopy` (M = 1) or `hybrid`.
    pub mode: String,
    /// The run's name in the lab (`engine`, `stock`).
    pub run: String,
    /// Fraction of memory pre-copied.
    pub m: f64,
    /// Fraction of storage pre-copied (the engine: 0, it moves no Xen disks;
    /// null for stock xl, which assumes shared storage).
    pub s: Option<f64>,
    /// Guest type.
    pub guest: &'static str,
    /// The command.
    pub via: String,
    /// The migration succeeded and the migrated guest's checker went on
    /// without errors.
    pub ok: bool,
    /// What went wrong.
    pub error: Option<String>,
    /// The figures.
    pub measured: Measured,
    /// The integrity checks.
    pub integrity: Integrity,
    /// Where the run's time went (dom0 clock, s).
    pub timings: RunTimings,
}

/// A run's figures (see the module docs for how each is taken).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measured {
    /// `xl migrate`'s wall time, s.
    pub total_s: Option<f64>,
    /// Suspend request to the destination's unpause, s.
    pub downtime_s: Option<f64>,
    /// Live pre-copy rounds.
    pub rounds: Option<u64>,
    /// Pages sent (null: the tool does not say).
    pub pages_sent: Option<u64>,
    /// Bytes sent (null: the tool does not say).
    pub bytes_sent: Option<u64>,
    /// Of the downtime, the engine's verification (`verify=1`: the source
    /// digests every frozen frame, the destination compares every frame it
    /// wrote) while the domain was suspended, s; null for stock xl.
    pub verify_s: Option<f64>,
    /// Of the downtime, the engine's rescan of the physmap at the freeze
    /// (frames populated or given back since round 0), s; null for stock
    /// xl (which does not rescan).
    pub physmap_scan_s: Option<f64>,
    /// The guest's own view: the longest gap between consecutive
    /// page-checker heartbeats across the migration (the source's last to
    /// the migrated guest's first, and within each), s, on the guest's
    /// `/proc/uptime`. Indicative only: Linux resumes from a Xen suspend
    /// with the time it was away estimated from the wall clock (seen here:
    /// 4.7 s of heartbeat gap across a 9.5 s downtime, 5.6 s across 0.8 s).
    pub guest_heartbeat_gap_s: Option<f64>,
}

/// A run's integrity checks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Integrity {
    /// The destination's frames were compared with the source's frozen
    /// frames.
    pub checked: bool,
    /// The page checker's errors (source and destination).
    pub checker_errors: u64,
    /// Pages the checker verified after the migration.
    pub checker_verified_after: u64,
    /// Frames compared.
    pub pages_compared: u64,
    /// Frames that differ.
    pub pages_differing: u64,
}

/// A run's phases, dom0 clock, s.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunTimings {
    /// `xl create`.
    pub create_s: Option<f64>,
    /// Created to the checker's first heartbeats.
    pub ready_s: Option<f64>,
    /// `xl migrate`.
    pub migrate_s: Option<f64>,
    /// Migration end to the migrated guest's verdict.
    pub after_s: Option<f64>,
}

/// Progress lines on stderr, with the seconds since the lab started.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
}

impl Progress {
    /// Starts the clock.
    pub fn new() -> Self {
        Progress {
            start: Instant::now(),
        }
    }
    /// Prints one line.
    pub fn say(&self, what: &str) {
        eprintln!("[{:7.1} s] {what}", self.start.elapsed().as_secs_f64());
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// The command line of dom0's kernel for these options.
fn dom0_cmdline(o: &XenOptions) -> String {
    // Lists are ':'-separated: QEMU splits the module list at commas.
    let mut c = vec![
        "console=hvc0".to_string(),
        "earlyprintk=xen".to_string(),
        "loglevel=4".to_string(),
        format!("xenlab.runs={}", o.runs.join(":")),
        format!("xenlab.mem={}", o.guest_mib),
        format!("xenlab.gparams={}", o.guest_params.join(":")),
        format!("xenlab.m={}", o.m),
        format!("xenlab.hap={}", u8::from(o.hap)),
    ];
    c.retain(|s| !s.is_empty());
    c.join(" ")
}

/// Boots the lab and reads its console until dom0 powers off.
pub fn run(o: &XenOptions, progress: &Progress) -> Result<XenReport> {
    std::fs::create_dir_all(&o.dir).with_context(|| format!("creating {}", o.dir.display()))?;
    for p in [&o.image.hypervisor, &o.image.kernel, &o.image.initramfs] {
        if !p.exists() {
            bail!("{} is missing (rebuild the image)", p.display());
        }
    }
    // One lab per directory at a time (its serial log and run logs).
    let lock = File::create(o.dir.join(".lock")).context("creating the directory's lock")?;
    // SAFETY: flock on a descriptor we own; it is released when `lock` drops.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        bail!("another lab is running in {} (give --dir)", o.dir.display());
    }
    let serial = o.dir.join("serial.log");
    let _ = std::fs::remove_file(&serial);
    let cmdline = dom0_cmdline(o);
    if cmdline.contains(',') {
        bail!("dom0's command line may not contain a comma (QEMU's module separator): {cmdline}");
    }
    let qemu_bin = o
        .qemu
        .clone()
        .or_else(|| o.image.qemu.clone())
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    let mut cmd = Command::new(&qemu_bin);
    cmd.args([
        "-accel",
        o.accel.as_str(),
        "-cpu",
        "qemu64,+svm,+npt",
        "-m",
        "3072",
        "-smp",
        "2",
    ])
    .args([
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
    ])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .arg("-kernel")
    .arg(&o.image.hypervisor)
    .arg("-append")
    .arg("console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 noreboot")
    .arg("-initrd")
    .arg(format!(
        "{} {},{}",
        o.image.kernel.display(),
        cmdline,
        o.image.initramfs.display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::from(
        File::create(o.dir.join("qemu.out")).context("creating qemu.out")?,
    ))
    .stderr(Stdio::from(
        File::create(o.dir.join("qemu.err")).context("creating qemu.err")?,
    ));
    progress.say(&format!(
        "booting Xen ({}) under QEMU TCG; console: {}",
        o.image.hypervisor_label,
        serial.display()
    ));
    let started = Instant::now();
    let mut qemu = QemuGuard(
        cmd.spawn()
            .with_context(|| format!("starting {}", qemu_bin.display()))?,
    );

    let mut log = SerialLog::new(&serial);
    let mut t = Transcript::default();
    let mut seen = 0;
    let mut last_event = Instant::now();
    let mut boot_s = None;
    let mut toolstack_s = None;
    let mut done = false;
    let exit;
    loop {
        log.poll().context("reading the serial log")?;
        let lines = log.lines();
        while seen < lines.len() {
            if let Some(e) = t.push(&lines[seen]) {
                last_event = Instant::now();
                match e.name.as_str() {
                    "dom0-up" => boot_s = Some(started.elapsed().as_secs_f64()),
                    "toolstack-up" => toolstack_s = Some(started.elapsed().as_secs_f64()),
                    "done" => done = true,
                    _ => {}
                }
                if let Some(s) = describe(e) {
                    progress.say(&s);
                }
            }
            seen += 1;
        }
        if let Some(status) = qemu.0.try_wait().context("waiting for QEMU")? {
            exit = Some(status);
            log.poll().context("reading the serial log")?;
            let lines = log.lines();
            while seen < lines.len() {
                t.push(&lines[seen]);
                seen += 1;
            }
            break;
        }
        if started.elapsed() > o.timeout || last_event.elapsed() > o.stall {
            let why = if started.elapsed() > o.timeout {
                format!("the lab took more than {} s", o.timeout.as_secs())
            } else {
                format!(
                    "dom0 said nothing for {} s (last: {})",
                    o.stall.as_secs(),
                    t.events
                        .last()
                        .map_or("nothing".to_string(), |e| e.name.clone())
                )
            };
            drop(qemu);
            let tail: Vec<&String> = log.lines().iter().rev().take(15).collect();
            let tail: Vec<&str> = tail.iter().rev().map(|s| s.as_str()).collect();
            bail!(
                "{why}: QEMU killed. Last console lines:\n  {}\n(full log: {})",
                tail.join("\n  "),
                serial.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let lab_s = started.elapsed().as_secs_f64();
    drop(qemu);
    if !done {
        let err = std::fs::read_to_string(o.dir.join("qemu.err")).unwrap_or_default();
        bail!(
            "QEMU exited ({}) before dom0 finished{}; console: {}",
            exit.map_or("?".to_string(), |s| s.to_string()),
            if err.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", err.trim())
            },
            serial.display()
        );
    }
    if let Some(f) = t.event("fail", None) {
        bail!(
            "dom0 failed at {}: {} (console: {})",
            f.str("stage").unwrap_or("?"),
            f.str("message").unwrap_or("?"),
            serial.display()
        );
    }
    let mut report = assemble(&t, o, &o.dir)?;
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    report.timings = LabTimings {
        boot_s: boot_s.map(r1),
        toolstack_s: toolstack_s.map(r1),
        lab_s: r1(lab_s),
    };
    Ok(report)
}

/// Kills QEMU when dropped.
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A progress line for an event.
fn describe(e: &Event) -> Option<String> {
    let run = e.str("run").unwrap_or("");
    let via = e.str("via").unwrap_or("");
    Some(match e.name.as_str() {
        "dom0-up" => format!("dom0 up (uptime {:.1} s)", e.uptime),
        "toolstack-up" => format!(
            "toolstack up: Xen {} ({})",
            e.str("xen_version").unwrap_or("?"),
            e.str("virt_caps").unwrap_or("?")
        ),
        "capabilities" => match e.fields.get("engine").and_then(Value::as_bool) {
            Some(true) => "engine available (patched xl, libwanmig.so)".to_string(),
            _ => format!(
                "engine not available: {}",
                e.str("engine_missing").unwrap_or("?")
            ),
        },
        "create-start" => format!(
            "{run}: creating PVH guest g1 ({} MiB)",
            e.i64("memory_mib").unwrap_or(0)
        ),
        "guest-created" => format!(
            "{run}: g1 created in {:.1} s",
            e.f64("seconds").unwrap_or(0.0)
        ),
        "waiting" => format!(
            "{run}: waiting for {} ({} s; last line: {})",
            e.str("for").unwrap_or("?"),
            e.i64("seconds").unwrap_or(0),
            e.str("last_line").unwrap_or("")
        ),
        "guest-ready" => format!(
            "{run}: guest g1 up, checker running ({:.1} s after create)",
            e.f64("seconds").unwrap_or(0.0)
        ),
        "migrate-start" => format!("{run}: migrating via {via}"),
        "migrate-end" => format!(
            "{run}: {via} {} in {:.1} s",
            if e.i64("rc") == Some(0) {
                "succeeded"
            } else {
                "FAILED"
            },
            e.f64("total_s").unwrap_or(0.0)
        ),
        "guest-after" => format!(
            "{run}: migrated guest running ({} heartbeats in {})",
            e.i64("heartbeats").unwrap_or(0),
            e.str("console").unwrap_or("?")
        ),
        "run-failed" => format!(
            "{run}: FAILED at {}: {}",
            e.str("stage").unwrap_or("?"),
            e.str("message").unwrap_or("?")
        ),
        "run-skipped" => format!("{run}: skipped: {}", e.str("message").unwrap_or("?")),
        "check" => format!(
            "check {}: {} ({})",
            e.str("name").unwrap_or("?"),
            if e.fields.get("ok").and_then(Value::as_bool) == Some(true) {
                "ok"
            } else {
                "FAILED"
            },
            e.str("detail").unwrap_or("")
        ),
        "fail" => format!(
            "dom0 FAILED at {}: {}",
            e.str("stage").unwrap_or("?"),
            e.str("message").unwrap_or("?")
        ),
        "done" => "dom0 done, powering off".to_string(),
        _ => return None,
    })
}

/// Builds the report from the transcript.
pub fn assemble(t: &Transcript, o: &XenOptions, dir: &Path) -> Result<XenReport> {
    let ts = t.event("toolstack-up", None);
    let caps = t.event("capabilities", None);
    let engine = EngineStatus {
        available: caps
            .and_then(|c| c.fields.get("engine"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        // Provisioning knows best why (no patched build, no wanmig-capi...).
        missing: o.image.engine_missing.clone().or_else(|| {
            caps.and_then(|c| c.str("engine_missing"))
                .filter(|s| !s.is_empty())
                .map(String::from)
        }),
    };
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for run in &o.runs {
        if let Some(s) = t.event("run-skipped", Some(run)) {
            skipped.push(Skipped {
                run: run.clone(),
                via: s.str("via").unwrap_or("").to_string(),
                reason: engine
                    .missing
                    .clone()
                    .unwrap_or_else(|| s.str("message").unwrap_or("").to_string()),
            });
            continue;
        }
        runs.push(run_report(t, run, o.m, dir)?);
    }
    let checks = t
        .events
        .iter()
        .filter(|e| e.name == "check")
        .map(|e| Check {
            name: e.str("name").unwrap_or("?").to_string(),
            ok: e.fields.get("ok").and_then(Value::as_bool) == Some(true),
            detail: e.str("detail").unwrap_or("").to_string(),
        })
        .collect();
    Ok(XenReport {
        xen_version: ts.and_then(|e| e.str("xen_version")).map(String::from),
        hypervisor: o.image.hypervisor_label.clone(),
        tools: o.image.tools_label.clone(),
        stock_tools: caps
            .and_then(|c| c.str("stock_tools"))
            .filter(|s| !s.is_empty())
            .map(String::from),
        image: o.image.hash.clone(),
        engine,
        runs,
        skipped,
        checks,
        timings: LabTimings::default(),
        dir: dir.to_path_buf(),
    })
}

/// One run's report from the transcript.
fn run_report(t: &Transcript, run: &str, m_requested: f64, dir: &Path) -> Result<RunReport> {
    let via = match run {
        "engine" => "xl migrate --wanmig",
        _ => "xl migrate",
    };
    let mut errors: Vec<String> = Vec::new();
    if t.event("create-start", Some(run)).is_none() {
        errors.push("the run did not start (no create-start from dom0)".to_string());
    }
    for e in t
        .events
        .iter()
        .filter(|e| e.name == "run-failed" && e.str("run") == Some(run))
    {
        errors.push(format!(
            "{}: {}",
            e.str("stage").unwrap_or("?"),
            e.str("message").unwrap_or("?")
        ));
    }
    let created = t.event("guest-created", Some(run));
    let ready = t.event("guest-ready", Some(run));
    let mig_start = t.event("migrate-start", Some(run));
    let mig_end = t.event("migrate-end", Some(run));
    let after = t.event("guest-after", Some(run));
    let run_end = t.event("run-end", Some(run));
    if let Some(e) = mig_end
        && e.i64("rc") != Some(0)
    {
        let msg = format!(
            "xl migrate exited with {}",
            e.fields.get("rc").map_or("?".into(), Value::to_string)
        );
        if !errors.iter().any(|x| x.contains("migrate")) {
            errors.push(msg);
        }
    }

    // Save the run's logs for whoever reads the report.
    let rdir = dir.join(run);
    std::fs::create_dir_all(&rdir).with_context(|| format!("creating {}", rdir.display()))?;
    for ((r, what), lines) in &t.logs {
        if r != run {
            continue;
        }
        let name: String = what
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut f = File::create(rdir.join(format!("{name}.log")))?;
        for l in lines {
            writeln!(f, "{l}")?;
        }
    }

    // The guest's consoles: the source's (guest-g1.log) and the migrated
    // domain's (the one dom0 named in guest-after, else any other).
    let consoles = t.consoles(run);
    let dst_name = after
        .and_then(|e| e.str("console"))
        .map(String::from)
        .or_else(|| {
            consoles
                .iter()
                .map(|(n, _)| *n)
                .find(|n| *n != "guest-g1.log")
                .map(String::from)
        });
    let judge = |name: &str| -> Result<Option<SerialLog>> {
        let Some((_, lines)) = consoles.iter().find(|(n, _)| *n == name) else {
            return Ok(None);
        };
        let p = rdir.join(format!("judge-{name}"));
        let mut f = File::create(&p)?;
        for l in *lines {
            writeln!(f, "{l}")?;
        }
        drop(f);
        let mut s = SerialLog::new(&p);
        s.poll()?;
        Ok(Some(s))
    };
    let src = judge("guest-g1.log")?;
    let dst = match &dst_name {
        Some(n) if n != "guest-g1.log" => judge(n)?,
        _ => None,
    };
    let src_hb = src.as_ref().and_then(SerialLog::last_heartbeat);
    let dst_hb = dst.as_ref().and_then(SerialLog::last_heartbeat);
    // Each console's errors: its checkers' counts (their error lines count
    // even without a heartbeat) and every other failure line.
    let checker_errors = src
        .as_ref()
        .map_or(0, SerialLog::checker_errors)
        .max(dst.as_ref().map_or(0, SerialLog::checker_errors));
    // The migrated guest's last heartbeat against the source's last one.
    let verified_after = match (src_hb, dst_hb) {
        (Some(s), Some(d)) => d.verified.saturating_sub(s.verified),
        (None, Some(d)) => d.verified,
        _ => 0,
    };
    let mig_ok = mig_end.is_some_and(|e| e.i64("rc") == Some(0));
    if mig_ok && verified_after == 0 {
        errors.push(
            "the page checker verified no page after the migration (its errors cannot count as none)"
                .to_string(),
        );
    }
    // A guest that came up broken or crashed is no evidence either way.
    for (name, log) in [("source", src.as_ref()), ("migrated", dst.as_ref())] {
        if let Some(l) = log.and_then(|l| {
            l.lines().iter().find(|x| {
                x.contains("Initramfs unpacking failed")
                    || x.contains("Out of memory")
                    || x.contains("Kernel panic")
                    || x.contains("BUG:")
                    || x.contains("Oops")
            })
        }) {
            errors.push(format!("the {name} guest's console: {l}"));
        }
    }
    if checker_errors > 0 {
        errors.push(format!("the page checker found {checker_errors} bad pages"));
    }

    let xl = XlMigration::parse(t.log(run, "xl"));
    let mut measured = Measured {
        total_s: mig_end.and_then(|e| e.f64("total_s")),
        downtime_s: xl.downtime_s().map(|d| (d * 1000.0).round() / 1000.0),
        rounds: None,
        pages_sent: None,
        bytes_sent: None,
        verify_s: None,
        physmap_scan_s: None,
        guest_heartbeat_gap_s: heartbeat_gap(src.as_ref(), dst.as_ref()),
    };
    let mut integrity = Integrity {
        checked: false,
        checker_errors,
        checker_verified_after: verified_after,
        pages_compared: 0,
        pages_differing: 0,
    };
    let mut m = 1.0;
    let mut s_frac = None;
    if run == "engine" {
        m = m_requested;
        let save = t
            .log(run, "save.json")
            .first()
            .and_then(|l| serde_json::from_str::<Value>(l).ok());
        let restore = t
            .log(run, "restore.json")
            .first()
            .and_then(|l| serde_json::from_str::<Value>(l).ok());
        match &save {
            Some(s) => {
                s_frac = s.get("s").and_then(Value::as_f64);
                measured.rounds = s
                    .get("rounds")
                    .and_then(Value::as_array)
                    .map(|r| r.len() as u64);
                measured.pages_sent = s.get("pages_sent").and_then(Value::as_u64);
                measured.bytes_sent = s.get("bytes_sent").and_then(Value::as_u64);
                measured.verify_s = s.get("verify_s").and_then(Value::as_f64);
                measured.physmap_scan_s = s.get("physmap_scan_s").and_then(Value::as_f64);
                // The destination must hold a frame exactly where the
                // source had one when it froze.
                let frozen = s.get("populated_pages").and_then(Value::as_u64);
                let arrived = restore
                    .as_ref()
                    .and_then(|r| r.get("pfns_populated"))
                    .and_then(Value::as_u64);
                if let (Some(f), Some(a)) = (frozen, arrived)
                    && f != a
                {
                    errors.push(format!(
                        "the destination populated {a} pfns, the frozen source had {f}"
                    ));
                }
                if let Some(x) = s.get("m").and_then(Value::as_f64) {
                    m = x;
                }
            }
            None if mig_ok => errors.push("the engine wrote no save.json report".to_string()),
            None => {}
        }
        match restore.as_ref().and_then(|r| r.get("integrity")) {
            Some(i) => {
                integrity.checked = i.get("checked").and_then(Value::as_bool).unwrap_or(false);
                integrity.pages_compared =
                    i.get("pages_compared").and_then(Value::as_u64).unwrap_or(0);
                integrity.pages_differing = i
                    .get("pages_differing")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                if !integrity.checked {
                    errors.push(
                        "the engine did not compare the frames (integrity.checked false)".into(),
                    );
                } else if integrity.pages_differing > 0 {
                    errors.push(format!(
                        "{} of {} frames differ from the source's frozen frames",
                        integrity.pages_differing, integrity.pages_compared
                    ));
                }
            }
            None if mig_ok => {
                errors.push("the engine wrote no restore.json integrity section".into())
            }
            None => {}
        }
    } else {
        measured.rounds = xl.iterations;
    }
    let d = |a: Option<&Event>, b: Option<&Event>| match (a, b) {
        (Some(a), Some(b)) => Some(((b.uptime - a.uptime) * 100.0).round() / 100.0),
        _ => None,
    };
    let timings = RunTimings {
        create_s: created.and_then(|e| e.f64("seconds")),
        ready_s: ready.and_then(|e| e.f64("seconds")),
        migrate_s: mig_end.and_then(|e| e.f64("total_s")),
        after_s: d(mig_end, after.or(run_end)),
    };
    errors.dedup();
    Ok(RunReport {
        mode: if m >= 1.0 { "precopy" } else { "hybrid" }.to_string(),
        run: run.to_string(),
        m,
        s: s_frac,
        guest: "pvh",
        via: mig_start
            .and_then(|e| e.str("via"))
            .unwrap_or(via)
            .to_string(),
        ok: errors.is_empty() && mig_ok && after.is_some(),
        error: if errors.is_empty() {
            (!(mig_ok && after.is_some())).then(|| "the run did not finish".to_string())
        } else {
            Some(errors.join("; "))
        },
        measured,
        integrity,
        timings,
    })
}

/// The longest gap between consecutive heartbeats (their `t=`, the guest's
/// uptime), the source's and then the migrated guest's.
fn heartbeat_gap(src: Option<&SerialLog>, dst: Option<&SerialLog>) -> Option<f64> {
    let ts: Vec<f64> = [src, dst]
        .into_iter()
        .flatten()
        .flat_map(|l| l.lines().iter())
        .filter(|l| l.starts_with("HB "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("t="))
                .and_then(|t| t.parse::<f64>().ok())
        })
        .collect();
    if dst.is_none_or(|d| d.last_heartbeat().is_none()) {
        return None;
    }
    ts.windows(2)
        .map(|w| w[1] - w[0])
        .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))))
        .map(|g| (g * 100.0).round() / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(runs: &[&str]) -> XenOptions {
        XenOptions {
            image: Image {
                dir: PathBuf::from("/nonexistent"),
                hash: "0123456789abcdef".into(),
                hypervisor: PathBuf::new(),
                kernel: PathBuf::new(),
                initramfs: PathBuf::new(),
                hypervisor_label: "patched (xen-patches test)".into(),
                tools_label: "patched (xen-patches test)".into(),
                engine: true,
                engine_missing: None,
                qemu: None,
            },
            dir: PathBuf::new(),
            runs: runs.iter().map(|s| s.to_string()).collect(),
            guest_mib: 192,
            guest_params: XenOptions::default_guest_params(),
            m: 1.0,
            timeout: Duration::from_secs(1),
            stall: Duration::from_secs(1),
            qemu: None,
            accel: "tcg".into(),
            hap: false,
        }
    }

    /// A run as dom0 reports it: events, the migration log, consoles.
    fn run_lines(run: &str, rc: i32, verified_after: bool, errors: u64) -> Vec<String> {
        let via = if run == "engine" {
            "xl migrate --wanmig"
        } else {
            "xl migrate"
        };
        let ev = |name: &str, up: f64, more: &str| {
            format!(
                "WANMIG-XEN-LAB {{\"event\":\"{name}\",\"uptime\":{up},\"run\":\"{run}\",\"via\":\"{via}\"{more}}}"
            )
        };
        let log = |what: &str, l: &str| format!("WANMIG-XEN-LOG {run} {what} {l}");
        let mut v = vec![
            ev("create-start", 10.0, ""),
            ev("guest-created", 18.0, ",\"seconds\":8.0,\"domid\":1"),
            ev("guest-ready", 50.0, ",\"seconds\":32.0,\"heartbeats\":3"),
            ev("migrate-start", 50.2, ""),
            log(
                "xl",
                "60.00 libxl: debug: x: Domain 1:issuing PVH/HVM suspend request via XenBus control node",
            ),
            log(
                "xl",
                "64.50 migration target: Domain started successsfully.",
            ),
            log("xl", &format!("66.00 WANMIG-XL-EXIT {rc}")),
            ev(
                "migrate-end",
                66.1,
                &format!(",\"rc\":{rc},\"t_start\":50.3,\"t_end\":66.0,\"total_s\":15.70"),
            ),
            log(
                "console:guest-g1.log",
                "PAGECHECK-START run=1 pages=8192 mib=32",
            ),
            log(
                "console:guest-g1.log",
                "HB 1 t=40.0 written=10 verified=100 errors=0 gen=1",
            ),
            log(
                "console:guest-g1.log",
                "HB 2 t=41.0 written=20 verified=200 errors=0 gen=1",
            ),
        ];
        if rc == 0 {
            let after = if verified_after { 300 } else { 200 };
            v.push(log(
                "console:guest-g1--incoming.log",
                &format!("HB 9 t=48.5 written=30 verified={after} errors={errors} gen=2"),
            ));
            v.push(ev(
                "guest-after",
                75.0,
                ",\"console\":\"guest-g1--incoming.log\",\"heartbeats\":5",
            ));
        } else {
            v.push(format!(
                "WANMIG-XEN-LAB {{\"event\":\"run-failed\",\"uptime\":66.2,\"run\":\"{run}\",\"via\":\"{via}\",\"stage\":\"migrate\",\"message\":\"libxl: error: boom\"}}"
            ));
        }
        if run == "engine" {
            v.push(log("save.json", r#"{"domid":1,"m":1.0,"pages":49152,"rounds":[{"round":0},{"round":1},{"round":2}],"pages_sent":60000,"bytes_sent":250000000}"#));
            v.push(log("restore.json", r#"{"domid":2,"integrity":{"checked":true,"pages_compared":49152,"pages_differing":0}}"#));
        }
        v.push(ev("run-end", 76.0, ""));
        v
    }

    fn assemble_lines(runs: &[&str], lines: &[String]) -> XenReport {
        let mut t = Transcript::default();
        for l in lines {
            t.push(l);
        }
        // One directory per call: the tests run in parallel.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wanmig-xen-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let r = assemble(&t, &options(runs), &dir).expect("assemble");
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn engine_and_stock_runs_carry_their_figures_and_integrity() {
        let mut lines = run_lines("engine", 0, true, 0);
        lines.extend(run_lines("stock", 0, true, 0));
        let r = assemble_lines(&["engine", "stock"], &lines);
        assert_eq!(r.runs.len(), 2);
        let e = &r.runs[0];
        assert!(e.ok, "{:?}", e.error);
        assert_eq!(
            (e.mode.as_str(), e.via.as_str(), e.guest),
            ("precopy", "xl migrate --wanmig", "pvh")
        );
        assert_eq!(e.measured.total_s, Some(15.7));
        assert_eq!(e.measured.downtime_s, Some(4.5));
        assert_eq!(e.measured.rounds, Some(3));
        assert_eq!(e.measured.pages_sent, Some(60000));
        assert!(e.integrity.checked);
        assert_eq!(
            (e.integrity.pages_compared, e.integrity.pages_differing),
            (49152, 0)
        );
        assert_eq!(e.integrity.checker_verified_after, 100);
        let s = &r.runs[1];
        assert!(s.ok, "{:?}", s.error);
        assert_eq!(s.via, "xl migrate");
        // Stock xl compares no frames and says nothing of rounds or pages.
        assert!(!s.integrity.checked);
        assert_eq!(
            (s.integrity.pages_compared, s.integrity.pages_differing),
            (0, 0)
        );
        assert_eq!(
            (
                s.measured.rounds,
                s.measured.pages_sent,
                s.measured.bytes_sent
            ),
            (None, None, None)
        );
        assert_eq!(s.measured.downtime_s, Some(4.5));
        assert_eq!(s.measured.guest_heartbeat_gap_s, Some(7.5));
    }

    #[test]
    fn a_failed_migration_is_a_failed_run_never_dropped() {
        let r = assemble_lines(&["stock"], &run_lines("stock", 1, true, 0));
        assert_eq!(r.runs.len(), 1);
        assert!(!r.runs[0].ok);
        let err = r.runs[0].error.as_deref().unwrap_or("");
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn a_checker_that_verified_nothing_after_the_migration_fails_the_run() {
        let r = assemble_lines(&["stock"], &run_lines("stock", 0, false, 0));
        assert!(!r.runs[0].ok);
        assert_eq!(r.runs[0].integrity.checker_verified_after, 0);
        let r = assemble_lines(&["stock"], &run_lines("stock", 0, true, 2));
        assert!(!r.runs[0].ok);
        assert_eq!(r.runs[0].integrity.checker_errors, 2);
    }

    #[test]
    fn a_skipped_engine_run_is_reported_with_its_reason() {
        let lines = vec![
            "WANMIG-XEN-LAB {\"event\":\"capabilities\",\"uptime\":5,\"engine\":false,\"engine_missing\":\"libwanmig.so is not in the image\"}".to_string(),
            "WANMIG-XEN-LAB {\"event\":\"run-skipped\",\"uptime\":6,\"run\":\"engine\",\"via\":\"xl migrate --wanmig\",\"message\":\"libwanmig.so is not in the image\"}".to_string(),
        ];
        let r = assemble_lines(&["engine"], &lines);
        assert!(r.runs.is_empty());
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(r.skipped[0].reason, "libwanmig.so is not in the image");
        assert!(!r.engine.available);
    }

    #[test]
    fn bad_input_checks_are_reported_failed_ones_as_failed() {
        let lines = vec![
            "WANMIG-XEN-LAB {\"event\":\"check\",\"uptime\":5,\"name\":\"abi-client\",\"ok\":true,\"detail\":\"rc 0, 12 passed, 0 failed\"}".to_string(),
            "WANMIG-XEN-LAB {\"event\":\"check\",\"uptime\":9,\"name\":\"engine-stream-into-a-receiver-without-wanmig\",\"ok\":false,\"detail\":\"xl migrate exited 0\"}".to_string(),
        ];
        let r = assemble_lines(&[], &lines);
        assert_eq!(r.checks.len(), 2);
        assert!(r.checks[0].ok && r.checks[0].name == "abi-client");
        assert!(!r.checks[1].ok);
        assert_eq!(r.checks[1].detail, "xl migrate exited 0");
    }
}
