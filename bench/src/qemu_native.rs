//! QEMU migrating the guest itself, as a QEMU or libvirt user would, over
//! the same emulated WAN as wanmig: the evaluation's baselines.
//!
//! Three modes ([`QemuMode`]):
//! - **pre-copy**: QEMU's default live migration, with a downtime limit
//!   (the planner's downtime target). A guest that dirties memory faster than
//!   the link carries never converges; after a timeout the source is paused
//!   and the migration finishes offline, as `virsh migrate --timeout` does
//!   (its default action is to suspend).
//! - **post-copy**: `postcopy-ram`, switched to post-copy at once
//!   (`migrate-start-postcopy` right after `migrate`).
//! - **hybrid**: pre-copy's first pass, then post-copy (`virsh migrate
//!   --postcopy-after-precopy`).
//!
//! Disks go as libvirt moves non-shared storage: the destination QEMU
//! exports its (empty) disks over NBD, the source mirrors each disk into it
//! (`blockdev-mirror`, `sync: full`) before the migration starts and keeps
//! mirroring until the source is paused, then completes the mirror
//! (`block-job-cancel` on a ready job), and the destination is resumed
//! (`cont`) only then. The destination's guest writes into a qcow2 overlay
//! over each raw image (libvirt users' usual format), and the mirror into
//! the raw image beneath it: after the resume the raw image keeps what
//! arrived, a snapshot that costs the migration nothing. The mirror runs in `write-blocking` copy mode
//! (libvirt's `--copy-storage-synchronous-writes`): in the default
//! background mode a disk the guest keeps writing need never become ready
//! (seen here: a 64 MiB disk under the disk checker was not ready after
//! 300 s once, ready after 37 s another time).
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source QEMU
//!     participant D as destination QEMU (-incoming defer -S)
//!     D->>D: nbd-server-start, block-export-add (each disk)
//!     S->>D: blockdev-mirror (write-blocking) until BLOCK_JOB_READY
//!     S->>D: migrate (pre-copy rounds)
//!     Note over S: post-copy / hybrid: migrate-start-postcopy
//!     S->>S: STOP (switchover)
//!     S->>D: block-job-cancel: the mirror completes
//!     Note over D: pre-copy: MIGRATION completed
//!     D->>D: nbd-server-stop, cont (RESUME)
//!     S-->>D: post-copy: the rest of RAM, and pages on request
//!     Note over S,D: after the run: disks compared
//! ```
//!
//! Figures, on this host's clock (QMP event timestamps): `T` from the first
//! command (the mirror, or `migrate` without disks) to the later of the
//! destination's resume and its `MIGRATION completed`; `D` from the source's
//! `STOP` to the destination's `RESUME`; `U` the post-copy after the resume;
//! `P` the destination's `postcopy-blocktime` (time the vCPU was blocked on
//! post-copy faults). QEMU reports blocktime only once post-copy ends, so
//! the stalls inside Gamma's window are exact when post-copy ends within it
//! and otherwise pro-rated (`P * dT / U`, which favours QEMU: faults
//! cluster early).
//!
//! Between `STOP` and `RESUME` this harness does only what libvirt does
//! there ([`LIBVIRT_STEPS_IN_DOWNTIME`]), each step on QEMU's events (no
//! polling); every command it sends is logged and those inside the interval
//! are reported ([`QemuReport::steps_in_downtime`]). The disks are compared
//! byte for byte after the run: the destination's raw images (as they were
//! at the resume) with the source's (frozen since its `STOP`).

use std::fs::File;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};
use wanmig_datapath::backend::qemu::{
    GuestSpec, LaunchError, NativeLaunch, QemuPaths, QemuProcess, SerialLog,
};
use wanmig_datapath::qemu::{MigrationInfo, MigrationStatus, QmpClient, QmpError, QmpEvent};
use wanmig_datapath::report::{Figures, gamma};
use wanmig_wan::Wan;

/// One of QEMU's own migration modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QemuMode {
    /// Pre-copy until it converges (or the timeout suspends the guest).
    Precopy,
    /// Post-copy from the start.
    Postcopy,
    /// One pre-copy pass, then post-copy.
    Hybrid,
}

impl QemuMode {
    /// All three, in the evaluation's order.
    pub const ALL: [QemuMode; 3] = [QemuMode::Precopy, QemuMode::Postcopy, QemuMode::Hybrid];

    /// The evaluation's name for it (`qemu_precopy`, ...).
    pub fn name(self) -> &'static str {
        match self {
            QemuMode::Precopy => "qemu_precopy",
            QemuMode::Postcopy => "qemu_postcopy",
            QemuMode::Hybrid => "qemu_hybrid",
        }
    }

    fn uses_postcopy(self) -> bool {
        self != QemuMode::Precopy
    }
}

/// One QEMU migration to run.
#[derive(Debug, Clone)]
pub struct QemuRun {
    /// The guest (its disks' images, if given, are the source's).
    pub guest: GuestSpec,
    /// The mode.
    pub mode: QemuMode,
    /// Files and sockets go here.
    pub run_dir: PathBuf,
    /// Gamma's window `dT`.
    pub dt: Duration,
    /// QEMU's `downtime-limit`.
    pub downtime_limit: Duration,
    /// Pre-copy that has not converged after this long is finished with the
    /// guest paused (`virsh migrate --timeout`).
    pub precopy_timeout: Duration,
    /// Page-checker heartbeats to wait for before migrating.
    pub warmup_heartbeats: usize,
    /// Disk-workload heartbeats to wait for before migrating (0: none).
    pub warmup_disk_heartbeats: usize,
    /// Heartbeats the destination must print after the migration.
    pub observe_heartbeats: usize,
}

/// Whether the stalls inside Gamma's window were measured or pro-rated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowStalls {
    /// Post-copy ended inside the window: all its blocktime is in it.
    Exact,
    /// Post-copy outlasted the window: `P * dT / U`.
    ProRated,
}

/// What a QEMU migration measured.
#[derive(Debug, Clone, Serialize)]
pub struct QemuReport {
    /// The mode.
    pub mode: QemuMode,
    /// T, U, D, P, faults (`postcopy-requests`), bytes (RAM stream plus the
    /// mirrors' work), Gamma.
    pub measured: Figures,
    /// How the stalls in Gamma's window were found.
    pub window_stalls: WindowStalls,
    /// QEMU's own `downtime` figure, ms (the source's view: stop to the end
    /// of the device state; the destination's resume comes later).
    pub qemu_downtime_ms: Option<u64>,
    /// Pre-copy did not converge: the guest was paused this many seconds
    /// after `migrate` to finish it.
    pub suspended_after_s: Option<f64>,
    /// Post-copy was asked for this many seconds after `migrate` (`None`:
    /// pre-copy).
    pub postcopy_after_s: Option<f64>,
    /// Bytes of the RAM migration stream.
    pub ram_bytes: u64,
    /// Bytes the disk mirrors copied (their jobs' final length).
    pub disk_bytes: u64,
    /// Seconds the mirrors took to become ready (0 without disks).
    pub mirror_ready_s: f64,
    /// Destination disk bytes compared with the source's (after the run:
    /// the destination's images as they were at the resume, the source's
    /// frozen).
    pub disk_bytes_compared: u64,
    /// Of those, 4 KiB blocks that differ (must be 0).
    pub disk_blocks_differing: u64,
    /// Errors the guest's checkers reported at the destination.
    pub checker_errors: u64,
    /// Pages the guest's page checker verified at the destination between
    /// its first and last heartbeat after the resume (QEMU's RAM cannot be
    /// read from here: this is the memory check; 0 means it did not run).
    pub pages_verified_after_resume: u64,
    /// What this harness did between the source's `STOP` and the
    /// destination's `RESUME` (`role: QMP command`, in order): only what
    /// libvirt itself does there (completing the mirrors, stopping the NBD
    /// server, `cont`).
    pub steps_in_downtime: Vec<String>,
}

/// The only steps a libvirt user's migration takes between the source's
/// `STOP` and the destination's `RESUME`.
pub const LIBVIRT_STEPS_IN_DOWNTIME: [&str; 3] = [
    "source: block-job-cancel",
    "destination: nbd-server-stop",
    "destination: cont",
];

impl QemuReport {
    /// Every check ran and held: disks equal, the page checker verified
    /// pages at the destination, no checker error.
    pub fn intact(&self) -> bool {
        self.disk_blocks_differing == 0
            && self.checker_errors == 0
            && self.pages_verified_after_resume > 0
    }
}

/// A QEMU migration failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuRunError {
    /// QEMU did not start.
    #[error("starting the {role} QEMU")]
    Launch {
        /// `source` or `destination`.
        role: &'static str,
        /// Why.
        #[source]
        source: LaunchError,
    },
    /// A QMP command failed.
    #[error("{role} QEMU: {step}")]
    Qmp {
        /// `source` or `destination`.
        role: &'static str,
        /// What was being done.
        step: String,
        /// The QMP error.
        #[source]
        source: QmpError,
    },
    /// QEMU's migration failed.
    #[error("QEMU's migration ended {status:?}: {desc}")]
    Migration {
        /// Its final state.
        status: Option<MigrationStatus>,
        /// QEMU's `error-desc`.
        desc: String,
    },
    /// A disk mirror failed or never became ready.
    #[error("disk mirror {job}: {message}")]
    Mirror {
        /// The job.
        job: String,
        /// What happened.
        message: String,
    },
    /// Waiting for something took too long.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The guest misbehaved (no heartbeat).
    #[error("{0}")]
    Guest(String),
    /// A file.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The destination's NBD port (inside its own network namespace).
const NBD_PORT: u16 = 10809;
/// Longest wait for a mirror to become ready, or post-copy to finish.
const LONG_WAIT: Duration = Duration::from_secs(900);

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuRunError {
    let what = what.into();
    move |source| QemuRunError::Io { what, source }
}

/// One side: its QEMU and the events it sent that matter here.
struct Side {
    role: &'static str,
    qemu: QemuProcess,
    events: Vec<QmpEvent>,
    /// Every QMP command this harness sent, when (`role: command`).
    commands: Vec<(SystemTime, String)>,
}

impl Side {
    fn start(
        role: &'static str,
        guest: &GuestSpec,
        paths: &QemuPaths,
        launch: &NativeLaunch<'_>,
    ) -> Result<Side, QemuRunError> {
        let launch_err = |source| QemuRunError::Launch { role, source };
        let mut qemu = QemuProcess::spawn_native(guest, paths, launch).map_err(launch_err)?;
        qemu.connect_qmp().map_err(launch_err)?;
        Ok(Side {
            role,
            qemu,
            events: Vec::new(),
            commands: Vec::new(),
        })
    }

    fn qmp_err(&self, step: &str) -> impl FnOnce(QmpError) -> QemuRunError {
        let (role, step) = (self.role, step.to_string());
        move |source| QemuRunError::Qmp { role, step, source }
    }

    /// Runs `f` (QMP command `what`) on this side's QMP, keeping the
    /// events that came with the reply.
    fn qmp<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut QmpClient) -> Result<T, QmpError>,
    ) -> Result<T, QemuRunError> {
        self.commands
            .push((SystemTime::now(), format!("{}: {what}", self.role)));
        let r = f(self.qemu.qmp()).map_err(self.qmp_err(what));
        self.drain();
        r
    }

    fn execute(&mut self, command: &str, args: Value) -> Result<Value, QemuRunError> {
        let args = (!args.is_null()).then_some(args);
        self.qmp(command, |q| q.execute(command, args))
    }

    fn query_migrate(&mut self) -> Result<MigrationInfo, QemuRunError> {
        self.qmp("query-migrate", QmpClient::query_migrate)
    }

    /// QEMU's migration ended badly on this side: the error, with QEMU's
    /// own description.
    fn migration_failure(&mut self) -> Result<QemuRunError, QemuRunError> {
        let info = self.query_migrate()?;
        Ok(QemuRunError::Migration {
            status: info.status,
            desc: info.error_desc.unwrap_or_default(),
        })
    }

    /// Keeps the events this module reads that came so far.
    fn drain(&mut self) {
        let new = self.qemu.qmp().take_events();
        self.events.extend(new.into_iter().filter(kept));
    }

    /// Waits, without polling, until an event satisfying `pred` has come
    /// (`None`: `deadline` passed first).
    fn wait_until(
        &mut self,
        deadline: Instant,
        pred: impl Fn(&QmpEvent) -> bool,
    ) -> Result<Option<QmpEvent>, QemuRunError> {
        loop {
            self.drain();
            if let Some(e) = self.events.iter().find(|e| pred(e)) {
                return Ok(Some(e.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.qemu.qmp().next_event(left) {
                Ok(e) if kept(&e) => self.events.push(e),
                Ok(_) | Err(QmpError::Timeout { .. }) => {}
                Err(e) => return Err(self.qmp_err("waiting for events")(e)),
            }
        }
    }

    /// [`wait_until`](Self::wait_until) `timeout` from now; its passing is
    /// an error naming `what`.
    fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&QmpEvent) -> bool,
    ) -> Result<QmpEvent, QemuRunError> {
        self.wait_until(Instant::now() + timeout, pred)?
            .ok_or_else(|| QemuRunError::Timeout {
                what: what.to_string(),
                after: timeout,
            })
    }

    /// When the first event `name` whose data satisfies `pred` came.
    fn event_time(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Option<SystemTime> {
        self.events
            .iter()
            .find(|e| e.name == name && pred(&e.data))
            .and_then(|e| e.timestamp)
    }

    fn migration_event(&self, status: &str) -> Option<SystemTime> {
        self.event_time("MIGRATION", |d| d["status"] == status)
    }
}

/// A `MIGRATION` event saying the migration failed or was cancelled.
fn ended_badly(e: &QmpEvent) -> bool {
    e.name == "MIGRATION" && matches!(e.data["status"].as_str(), Some("failed" | "cancelled"))
}

/// The events this module reads (the mirror's job-status flood is left
/// out).
fn kept(e: &QmpEvent) -> bool {
    matches!(
        e.name.as_str(),
        "STOP" | "RESUME" | "MIGRATION" | "MIGRATION_PASS"
    ) || e.name.starts_with("BLOCK_JOB_")
}

fn since(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Runs one QEMU migration of `run.guest` across `wan`.
pub fn run(run: &QemuRun, wan: &Wan) -> Result<QemuReport, QemuRunError> {
    std::fs::create_dir_all(&run.run_dir)
        .map_err(io_err(format!("creating {}", run.run_dir.display())))?;
    let tag = format!("qn{}", std::process::id());
    let src_paths = QemuPaths::new(&run.run_dir, &tag, "source");
    let dst_paths = QemuPaths::new(&run.run_dir, &tag, "destination");
    let images = DiskImages::create(&run.guest, &src_paths, &dst_paths)?;
    let result = migrate(run, wan, &src_paths, &dst_paths, &images);
    images.remove();
    result
}

/// The disks' raw images on both sides (the source's made here unless the
/// guest names its own).
struct DiskImages {
    source: Vec<PathBuf>,
    destination: Vec<PathBuf>,
    /// The destination guest's qcow2 overlays over `destination`.
    overlays: Vec<PathBuf>,
    made: Vec<PathBuf>,
}

impl DiskImages {
    fn create(
        guest: &GuestSpec,
        src: &QemuPaths,
        dst: &QemuPaths,
    ) -> Result<DiskImages, QemuRunError> {
        let mut images = DiskImages {
            source: Vec::new(),
            destination: Vec::new(),
            overlays: Vec::new(),
            made: Vec::new(),
        };
        let sparse = |path: &Path, size: u64| -> Result<(), QemuRunError> {
            let f = File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
            f.set_len(size)
                .map_err(io_err(format!("sizing {}", path.display())))
        };
        for (i, d) in guest.disks.iter().enumerate() {
            let source = match &d.image {
                Some(p) => p.clone(),
                None => {
                    let p = src.disk_image(i);
                    sparse(&p, d.size)?;
                    images.made.push(p.clone());
                    p
                }
            };
            let dest = dst.disk_image(i);
            sparse(&dest, d.size)?;
            images.made.push(dest.clone());
            let overlay = dest.with_extension("overlay.qcow2");
            images.made.push(overlay.clone());
            qcow2_overlay(&overlay, d.size)?;
            images.source.push(source);
            images.destination.push(dest);
            images.overlays.push(overlay);
        }
        Ok(images)
    }

    fn remove(&self) {
        for p in &self.made {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Compares each destination image with its source: (bytes compared,
    /// 4 KiB blocks differing).
    fn compare(&self) -> Result<(u64, u64), QemuRunError> {
        let (mut compared, mut differing) = (0, 0);
        for (s, d) in self.source.iter().zip(&self.destination) {
            let (c, n) = compare_files(s, d)?;
            compared += c;
            differing += n;
        }
        Ok((compared, differing))
    }
}

/// Makes an empty qcow2 image of `size` bytes at `path` (`qemu-img`).
fn qcow2_overlay(path: &Path, size: u64) -> Result<(), QemuRunError> {
    let what = format!("qemu-img create -f qcow2 {} {size}", path.display());
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(io_err(what.clone()))?;
    if !out.status.success() {
        return Err(QemuRunError::Io {
            what,
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

/// Bytes compared and 4 KiB blocks differing between two files (a length
/// difference counts as differing blocks).
fn compare_files(a: &Path, b: &Path) -> Result<(u64, u64), QemuRunError> {
    const BLOCK: usize = 4096;
    let open = |p: &Path| File::open(p).map_err(io_err(format!("opening {}", p.display())));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let (mut compared, mut differing) = (0u64, 0u64);
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(io_err(format!("reading {}", a.display())))?;
        let nb = read_full(&mut fb, &mut bb).map_err(io_err(format!("reading {}", b.display())))?;
        let n = na.max(nb);
        if n == 0 {
            return Ok((compared, differing));
        }
        // A short side reads as missing bytes: its blocks differ.
        ba[na..n].fill(0);
        bb[nb..n].fill(0);
        for (i, (x, y)) in ba[..n].chunks(BLOCK).zip(bb[..n].chunks(BLOCK)).enumerate() {
            let past_shorter = na != nb && i * BLOCK + x.len() > na.min(nb);
            if x != y || past_shorter {
                differing += 1;
            }
        }
        compared += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn migrate(
    run: &QemuRun,
    wan: &Wan,
    src_paths: &QemuPaths,
    dst_paths: &QemuPaths,
    images: &DiskImages,
) -> Result<QemuReport, QemuRunError> {
    let dst_addr: Ipv4Addr = wan.dst_addr();
    let mut src = Side::start(
        "source",
        &run.guest,
        src_paths,
        &NativeLaunch {
            netns: Some(wan.src_ns()),
            disk_images: &images.source,
            incoming: false,
            overlays: &[],
        },
    )?;
    let mut src_log = SerialLog::new(&src_paths.serial);
    wanmig_datapath::migration::warm_up(
        &mut src_log,
        run.warmup_heartbeats,
        run.warmup_disk_heartbeats,
        &src_paths.serial,
    )
    .map_err(|e| QemuRunError::Guest(e.to_string()))?;
    let mut dst = Side::start(
        "destination",
        &run.guest,
        dst_paths,
        &NativeLaunch {
            netns: Some(wan.dst_ns()),
            disk_images: &images.destination,
            incoming: true,
            overlays: &images.overlays,
        },
    )?;

    let mut caps = vec![json!({"capability": "events", "state": true})];
    if run.mode.uses_postcopy() {
        caps.push(json!({"capability": "postcopy-ram", "state": true}));
        caps.push(json!({"capability": "postcopy-blocktime", "state": true}));
    }
    for side in [&mut src, &mut dst] {
        side.execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    }
    src.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": run.downtime_limit.as_millis() as u64 }),
    )?;
    let disks = images.source.len();
    if disks > 0 {
        dst.execute(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": dst_addr.to_string(), "port": NBD_PORT.to_string()}}}),
        )?;
        // The raw node beneath the guest's overlay: what the mirror writes
        // stays there, frozen at the resume, for the comparison afterwards.
        for i in 0..disks {
            dst.execute(
                "block-export-add",
                json!({"type": "nbd", "id": format!("wmexport{i}"), "node-name": format!("wmdisk{i}"),
                       "name": format!("disk{i}"), "writable": true}),
            )?;
        }
    }
    dst.execute(
        "migrate-incoming",
        json!({ "uri": format!("tcp:{dst_addr}:0") }),
    )?;
    let port = incoming_port(&mut dst)?;

    // T starts with the first byte the migration moves.
    let t0 = SystemTime::now();
    let started = Instant::now();
    for i in 0..disks {
        src.execute(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": format!("wmmirror{i}"),
                   "server": {"type": "inet", "host": dst_addr.to_string(), "port": NBD_PORT.to_string()},
                   "export": format!("disk{i}")}),
        )?;
        src.execute(
            "blockdev-mirror",
            json!({"job-id": format!("wmmirror{i}"), "device": format!("wmdisk{i}"),
                   "target": format!("wmmirror{i}"), "sync": "full", "copy-mode": "write-blocking"}),
        )?;
    }
    wait_mirrors_ready(&mut src, disks)?;
    let mirror_ready_s = started.elapsed().as_secs_f64();

    src.execute(
        "migrate",
        json!({ "uri": format!("tcp:{dst_addr}:{port}") }),
    )?;
    let migrate_at = Instant::now();
    if run.mode == QemuMode::Postcopy {
        src.execute("migrate-start-postcopy", Value::Null)?;
    }
    let mut postcopy_after_s = (run.mode == QemuMode::Postcopy).then_some(0.0);
    let mut suspended_after_s = None;
    // Until the source is paused for good (pre-copy completed, or post-copy
    // running), driven by QEMU's events as libvirt is: `MIGRATION_PASS`
    // for `--postcopy-after-precopy`, a timer for `--timeout`.
    let switched_over = |e: &QmpEvent, postcopy: bool| {
        e.name == "MIGRATION"
            && match e.data["status"].as_str() {
                Some("completed" | "failed" | "cancelled") => true,
                Some("postcopy-active") => postcopy,
                _ => false,
            }
    };
    loop {
        let awaiting_pass = run.mode == QemuMode::Hybrid && postcopy_after_s.is_none();
        let timer = run.mode == QemuMode::Precopy && suspended_after_s.is_none();
        let deadline = migrate_at
            + if timer {
                run.precopy_timeout
            } else {
                LONG_WAIT
            };
        let event = src.wait_until(deadline, |e| {
            switched_over(e, run.mode.uses_postcopy())
                // The second dirty sync ends the first pass over RAM.
                || (awaiting_pass
                    && e.name == "MIGRATION_PASS"
                    && e.data["pass"].as_u64().is_some_and(|p| p >= 2))
        })?;
        match event {
            None if timer => {
                src.execute("stop", Value::Null)?;
                suspended_after_s = Some(migrate_at.elapsed().as_secs_f64());
            }
            None => {
                return Err(QemuRunError::Timeout {
                    what: "QEMU's migration to switch over".into(),
                    after: LONG_WAIT,
                });
            }
            Some(e) if e.name == "MIGRATION_PASS" => {
                src.execute("migrate-start-postcopy", Value::Null)?;
                postcopy_after_s = Some(migrate_at.elapsed().as_secs_f64());
            }
            Some(e) if ended_badly(&e) => return Err(src.migration_failure()?),
            Some(_) => break,
        }
    }
    let disk_bytes = complete_mirrors(&mut src, disks)?;
    // Pre-copy: libvirt resumes the destination once its side of the
    // migration completed. Post-copy: at once (`cont` while the device
    // state is still loading starts the guest as soon as it is loaded).
    if !run.mode.uses_postcopy() {
        let e = dst.wait_for(LONG_WAIT, "the destination's MIGRATION completed", |e| {
            switched_over(e, false)
        })?;
        if ended_badly(&e) {
            return Err(dst.migration_failure()?);
        }
    }
    if disks > 0 {
        dst.execute("nbd-server-stop", Value::Null)?;
    }
    dst.execute("cont", Value::Null)?;
    dst.wait_for(LONG_WAIT, "the destination's RESUME", |e| {
        e.name == "RESUME"
    })?;
    let resumed_at = Instant::now();

    // Post-copy: until the destination has every page.
    dst.wait_for(LONG_WAIT, "QEMU's post-copy to complete", |e| {
        switched_over(e, false)
    })?;
    let dest_info = dst.query_migrate()?;
    if !matches!(dest_info.status, Some(MigrationStatus::Completed)) {
        return Err(QemuRunError::Migration {
            status: dest_info.status,
            desc: dest_info.error_desc.unwrap_or_default(),
        });
    }
    let src_info = wait_source_done(&mut src)?;

    // The guest runs on at the destination.
    let mut dst_log = SerialLog::new(&dst_paths.serial);
    let alive = dst_log
        .wait_heartbeats(run.observe_heartbeats, resumed_at, Duration::from_secs(120))
        .map_err(io_err("reading the destination console"))?;
    if !alive {
        return Err(QemuRunError::Guest(format!(
            "the guest did not keep running at the destination after QEMU's {} (see {})",
            run.mode.name(),
            dst_paths.serial.display()
        )));
    }
    let checker_errors = dst_log.checker_errors();
    let after: Vec<u64> = dst_log
        .heartbeats()
        .iter()
        .filter(|(t, _)| *t > resumed_at)
        .map(|(_, h)| h.verified)
        .collect();
    let pages_verified_after_resume = match (after.first(), after.last()) {
        (Some(first), Some(last)) => last.saturating_sub(*first),
        _ => 0,
    };
    src.drain();
    dst.drain();

    let missing = |what: &str| QemuRunError::Guest(format!("QEMU sent no {what} event"));
    let stop = src
        .event_time("STOP", |_| true)
        .ok_or_else(|| missing("STOP"))?;
    let resume = dst
        .event_time("RESUME", |_| true)
        .ok_or_else(|| missing("RESUME"))?;
    let completed = dst
        .migration_event("completed")
        .ok_or_else(|| missing("MIGRATION completed"))?;

    // Outside every measured interval: the destination's raw images hold
    // what arrived before the resume (the guest writes into its overlays
    // since), the source's are frozen.
    let compare_at = SystemTime::now();
    let (disk_bytes_compared, disk_blocks_differing) = images.compare()?;
    let mut steps: Vec<(SystemTime, String)> = src.commands.clone();
    steps.extend(dst.commands.iter().cloned());
    steps.push((compare_at, "harness: compare disk images".into()));
    steps.sort_by_key(|(t, _)| *t);
    let steps_in_downtime = steps
        .into_iter()
        .filter(|(t, _)| *t >= stop && *t <= resume)
        .map(|(_, s)| s)
        .collect();

    let downtime_s = since(stop, resume);
    let end = completed.max(resume);
    let uptime_s = if run.mode.uses_postcopy() {
        since(resume, completed).max(0.0)
    } else {
        0.0
    };
    let penalty_s = dest_info.postcopy_blocktime_ms.unwrap_or(0) as f64 / 1000.0;
    let window = run.dt.as_secs_f64();
    let (stalls, window_stalls) = if uptime_s <= window {
        (penalty_s, WindowStalls::Exact)
    } else {
        (penalty_s * window / uptime_s, WindowStalls::ProRated)
    };
    let ram = src_info.ram.clone().unwrap_or_default();
    Ok(QemuReport {
        mode: run.mode,
        measured: Figures {
            total_s: since(t0, end),
            uptime_s,
            downtime_s,
            penalty_s,
            faults: ram.postcopy_requests,
            bytes_sent: ram.transferred + disk_bytes,
            gamma: gamma(run.dt, downtime_s, stalls),
        },
        window_stalls,
        qemu_downtime_ms: src_info.downtime_ms,
        suspended_after_s,
        postcopy_after_s,
        ram_bytes: ram.transferred,
        disk_bytes,
        mirror_ready_s,
        disk_bytes_compared,
        disk_blocks_differing,
        checker_errors,
        pages_verified_after_resume,
        steps_in_downtime,
    })
}

/// The port the destination listens on (it was asked for port 0).
fn incoming_port(dst: &mut Side) -> Result<u16, QemuRunError> {
    let v = dst.execute("query-migrate", Value::Null)?;
    let port = &v["socket-address"][0]["port"];
    port.as_str()
        .and_then(|p| p.parse().ok())
        .or_else(|| port.as_u64().and_then(|p| u16::try_from(p).ok()))
        .filter(|p| *p != 0)
        .ok_or_else(|| QemuRunError::Qmp {
            role: "destination",
            step: "finding the incoming port".into(),
            source: QmpError::protocol("query-migrate", format!("no listening port in {v}")),
        })
}

fn job_of(e: &QmpEvent) -> &str {
    e.data["device"].as_str().unwrap_or("")
}

/// Waits until each of the `disks` mirrors is ready (fully copied and
/// mirroring).
fn wait_mirrors_ready(src: &mut Side, disks: usize) -> Result<(), QemuRunError> {
    let deadline = Instant::now() + LONG_WAIT;
    for i in 0..disks {
        let job = format!("wmmirror{i}");
        let e = src.wait_until(deadline, |e| {
            job_of(e) == job
                && matches!(
                    e.name.as_str(),
                    "BLOCK_JOB_READY"
                        | "BLOCK_JOB_COMPLETED"
                        | "BLOCK_JOB_CANCELLED"
                        | "BLOCK_JOB_ERROR"
                )
        })?;
        match e {
            Some(e) if e.name == "BLOCK_JOB_READY" => {}
            Some(e) => {
                return Err(QemuRunError::Mirror {
                    job,
                    message: format!("{} before it was ready: {}", e.name, e.data),
                });
            }
            None => {
                return Err(QemuRunError::Mirror {
                    job,
                    message: format!("not ready after {LONG_WAIT:?}"),
                });
            }
        }
    }
    Ok(())
}

/// Completes the ready mirrors (the source is paused: nothing new to copy)
/// and returns the bytes they copied.
fn complete_mirrors(src: &mut Side, disks: usize) -> Result<u64, QemuRunError> {
    for i in 0..disks {
        src.execute(
            "block-job-cancel",
            json!({ "device": format!("wmmirror{i}") }),
        )?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut bytes = 0;
    for i in 0..disks {
        let job = format!("wmmirror{i}");
        let done = src
            .wait_until(deadline, |e| {
                job_of(e) == job
                    && matches!(
                        e.name.as_str(),
                        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"
                    )
            })?
            .ok_or_else(|| QemuRunError::Mirror {
                job: job.clone(),
                message: "did not complete within 120 s of block-job-cancel".into(),
            })?;
        if let Some(err) = done.data.get("error") {
            return Err(QemuRunError::Mirror {
                job,
                message: format!("completed with an error: {err}"),
            });
        }
        bytes += done.data["len"].as_u64().unwrap_or(0);
    }
    Ok(bytes)
}

/// The source's final `query-migrate` (its post-copy ends when the last
/// page is sent).
fn wait_source_done(src: &mut Side) -> Result<MigrationInfo, QemuRunError> {
    let started = Instant::now();
    loop {
        let info = src.query_migrate()?;
        if info
            .status
            .as_ref()
            .is_some_and(MigrationStatus::is_finished)
        {
            return Ok(info);
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(QemuRunError::Timeout {
                what: "the source to see QEMU's migration end".into(),
                after: Duration::from_secs(60),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_comparison_counts_differing_blocks() {
        let dir = std::env::temp_dir().join(format!("wanmig-cmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let mut data = vec![7u8; 3 << 20];
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, &data).unwrap();
        assert_eq!(compare_files(&a, &b).unwrap(), (3 << 20, 0));
        // One byte in block 5, one in the last block of the first MiB and
        // one in the first block of the second: three blocks.
        for off in [5 * 4096 + 17, (1 << 20) - 1, 1 << 20] {
            data[off] ^= 1;
        }
        std::fs::write(&b, &data).unwrap();
        assert_eq!(compare_files(&a, &b).unwrap(), (3 << 20, 3));
        // A shorter copy: its missing blocks differ.
        std::fs::write(&b, &data[..(3 << 20) - 8192]).unwrap();
        let (_, differing) = compare_files(&a, &b).unwrap();
        assert_eq!(differing, 3 + 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
