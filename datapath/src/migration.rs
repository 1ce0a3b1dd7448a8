//! One whole migration on one machine: both QEMUs, both engines, the report.
//!
//! This is what `wanmig migrate` and `wanmig demo` run (and the end-to-end
//! tests): a source QEMU running the guest, a destination QEMU waiting for
//! it, the two engines connected over TCP (across an emulated WAN when the
//! caller puts the two sockets in two network namespaces), then a look at the
//! guest at the destination. On real hosts the same engines run one per host
//! (`wanmig source` / `wanmig destination`).
//!
//! Whatever happens, the files of the migration (the two RAM files in
//! `/dev/shm`, the registration and device-state sockets) are removed once
//! nothing uses them any more; and a migration that fails before the commit
//! hands back the source QEMU, its guest running, inside the error
//! ([`MigrationError::SourceKept`]) instead of killing it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::backend::qemu::{GuestSpec, QemuDest, QemuPaths, QemuSource, SerialLog};
use crate::backend::{BackendError, SourceBackend};
use crate::connection::{self, ConnectError, ConnectionPair, LinkConfig};
use crate::engine::{
    DestConfig, DestReport, EngineError, PageOrder, PageOrderError, SourceConfig, run_destination,
    run_source, run_source_adaptive,
};
use crate::planning::{EnginePlan, GuestUnits, PlanningError, plan_from_segment, plan_in_process};
use crate::profiling::{ProfileOptions, profile_guest};
use crate::qemu::RunState;
use crate::report::MigrationReport;
use crate::wire::{Geometry, MigrationId, PskKey, ServerPolicy};
pub use wanmig_planner::model::FreezePolicy;
use wanmig_planner::units::Rate;

/// Where the plan comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Planning {
    /// Fixed fractions, pages and chunks in address order (no profile),
    /// the engine's round limit, and the freeze by the plan's shape
    /// ([`PageOrder::freeze_policy`]): a plan that post-copies anything
    /// keeps the downtime target, `M = S = 1` is classic pre-copy.
    Fixed {
        /// `M`.
        m: f64,
        /// `S` (ignored for a guest without disks).
        s: f64,
    },
    /// Fixed fractions (address order, no profile) with a pre-copy
    /// strategy of their own: see [`Planning::qemu_hybrid`],
    /// [`Planning::precopy_overflow`], [`Planning::classic_precopy`].
    FixedStrategy {
        /// `M`.
        m: f64,
        /// `S` (ignored for a guest without disks).
        s: f64,
        /// What the freeze does with a dirty set that does not fit the
        /// downtime target.
        freeze: FreezePolicy,
        /// Pre-copy rounds at most, round 0 included (`None`: the
        /// engine's, [`SourceConfig::max_rounds`]).
        max_rounds: Option<u32>,
    },
    /// The planner library on a profile file, for a link.
    Profile {
        /// The profile.
        path: PathBuf,
        /// The link rate assumed.
        rate: Rate,
        /// The RTT assumed.
        rtt: Duration,
        /// Downtime target.
        downtime_target: Option<Duration>,
    },
    /// Profile the running guest's writes first, then plan in process.
    ProfileNow {
        /// Where to write the profile.
        path: PathBuf,
        /// Intervals.
        samples: u32,
        /// Interval length.
        interval: Duration,
        /// The link rate assumed.
        rate: Rate,
        /// The RTT assumed.
        rtt: Duration,
        /// Downtime target.
        downtime_target: Option<Duration>,
    },
    /// The plan a `wanmig-planner serve` publishes in shared memory.
    Segment {
        /// Segment name.
        name: String,
        /// The profile the planner serves from.
        profile: PathBuf,
    },
}

impl Planning {
    /// What QEMU's hybrid migration does: one pre-copy pass over all of
    /// memory and storage, then post-copy of what the guest dirtied
    /// meanwhile (the freeze sends what fits the downtime target, hottest
    /// first, and post-copies the rest).
    pub fn qemu_hybrid() -> Planning {
        Planning::FixedStrategy {
            m: 1.0,
            s: 1.0,
            freeze: FreezePolicy::Overflow,
            max_rounds: Some(1),
        }
    }

    /// All of memory and storage pre-copied (the engine's round limit),
    /// the dirty pages that do not fit the freeze's downtime target
    /// post-copied.
    pub fn precopy_overflow() -> Planning {
        Planning::FixedStrategy {
            m: 1.0,
            s: 1.0,
            freeze: FreezePolicy::Overflow,
            max_rounds: None,
        }
    }

    /// Classic pre-copy: everything pre-copied, the freeze sends all that
    /// is dirty however long it takes (what `Fixed { m: 1, s: 1 }` does).
    pub fn classic_precopy() -> Planning {
        Planning::FixedStrategy {
            m: 1.0,
            s: 1.0,
            freeze: FreezePolicy::Classic,
            max_rounds: None,
        }
    }
}

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct LocalMigration {
    /// The guest.
    pub guest: GuestSpec,
    /// Where `M` and the page order come from.
    pub planning: Planning,
    /// Source engine tuning.
    pub source: SourceConfig,
    /// Destination engine tuning.
    pub dest: DestConfig,
    /// Transport tuning.
    pub link: LinkConfig,
    /// Directory for sockets, logs and pid files.
    pub run_dir: PathBuf,
    /// Names the RAM files (`/dev/shm/wanmig-<tag>-source`...).
    pub tag: String,
    /// Heartbeats to see at the source before migrating.
    pub warmup_heartbeats: usize,
    /// Disk-checker heartbeats (`DHB`) to see at the source before
    /// migrating (0: do not wait for the disk checker).
    pub warmup_disk_heartbeats: usize,
    /// Heartbeats to see at the destination afterwards.
    pub observe_heartbeats: usize,
}

/// Why a local migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A QEMU or its guest failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The engines failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Connecting failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The plan does not fit the guest.
    #[error(transparent)]
    Plan(#[from] PageOrderError),
    /// Profiling or planning failed.
    #[error(transparent)]
    Planning(#[from] PlanningError),
    /// The guest misbehaved.
    #[error("guest: {0}")]
    Guest(String),
    /// Files or directories.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The migration failed before the destination ran the guest: it still
    /// runs at the source, whose QEMU is handed back (killed when dropped,
    /// unless [detached](KeptSource::detach)).
    #[error("the migration failed; the guest still runs at the source (QEMU pid {})", kept.pid())]
    SourceKept {
        /// Why the migration failed.
        #[source]
        cause: Box<MigrationError>,
        /// The source QEMU, its guest running.
        kept: Box<KeptSource>,
    },
}

impl MigrationError {
    /// The error under [`SourceKept`](Self::SourceKept), or this one.
    pub fn cause(&self) -> &MigrationError {
        match self {
            MigrationError::SourceKept { cause, .. } => cause,
            other => other,
        }
    }
}

/// Files removed when dropped (a migration's RAM files and sockets).
#[derive(Debug, Default)]
pub(crate) struct Leftovers {
    paths: Vec<PathBuf>,
}

impl Leftovers {
    pub(crate) fn add(&mut self, p: &Path) {
        self.paths.push(p.to_path_buf());
    }

    /// Takes `p` out: it is no longer removed.
    pub(crate) fn keep(&mut self, p: &Path) {
        self.paths.retain(|x| x != p);
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The source QEMU of a migration that failed before the commit, its guest
/// running. Dropping it kills QEMU and removes its RAM file;
/// [`detach`](Self::detach) leaves both.
#[derive(Debug)]
pub struct KeptSource {
    /// The source QEMU.
    pub source: QemuSource,
    /// Its serial console.
    pub source_log: SerialLog,
    /// Its paths.
    pub paths: QemuPaths,
    // Last: dropped after QEMU is killed.
    pub(crate) files: Leftovers,
}

impl KeptSource {
    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.source.pid()
    }

    /// Leaves the guest running after this process is gone: QEMU is not
    /// killed and its RAM file and disk images stay (a guest with disks
    /// loses them with this process, which serves them: keep it alive if
    /// the guest must go on). Returns QEMU's pid.
    pub fn detach(mut self) -> u32 {
        self.files.paths.clear();
        self.source.detach()
    }
}

/// A finished migration, with both QEMUs still there (the source paused with
/// its frozen RAM, the destination running the guest). Dropping it kills
/// both and removes their RAM files.
#[derive(Debug)]
pub struct LocalOutcome {
    /// The report.
    pub report: MigrationReport,
    /// The plan's order: pages (and the disks' chunks) in priority order,
    /// the pre-copied prefix first.
    pub order: PageOrder,
    /// The source QEMU (paused).
    pub source: QemuSource,
    /// The destination QEMU.
    pub dest: QemuDest,
    /// The source's serial console.
    pub source_log: SerialLog,
    /// The destination's serial console.
    pub dest_log: SerialLog,
    /// Source paths.
    pub source_paths: QemuPaths,
    /// Destination paths.
    pub dest_paths: QemuPaths,
    // Last: dropped after the QEMUs are killed.
    _files: Leftovers,
}

impl LocalOutcome {
    /// Kills both QEMUs and removes their RAM files (what dropping does).
    pub fn cleanup(self) {
        drop(self);
    }
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
    let what = what.into();
    move |source| MigrationError::Io { what, source }
}

/// Runs a whole migration. `listener` is the destination engine's listening
/// socket (bind it where the destination lives); `connect` opens the source
/// engine's connections to it (from where the source lives).
///
/// If the engines fail and the guest still runs at the source (the failure
/// came before the commit), the error is [`MigrationError::SourceKept`],
/// with the source QEMU in it.
pub fn run_local(
    spec: &LocalMigration,
    listener: TcpListener,
    connect: impl FnOnce(
        SocketAddr,
        MigrationId,
        Geometry,
        &PskKey,
        &LinkConfig,
    ) -> Result<ConnectionPair, ConnectError>,
) -> Result<LocalOutcome, MigrationError> {
    std::fs::create_dir_all(&spec.run_dir)
        .map_err(io(format!("creating {}", spec.run_dir.display())))?;
    let source_paths = QemuPaths::new(&spec.run_dir, &spec.tag, "source");
    let dest_paths = QemuPaths::new(&spec.run_dir, &spec.tag, "destination");
    let mut files = Leftovers::default();
    for paths in [&source_paths, &dest_paths] {
        files.add(&paths.ram);
        files.add(&paths.uffd_sock);
    }
    files.add(&spec.run_dir.join("source.migrate"));
    files.add(&spec.run_dir.join("destination.migrate"));
    // Both sides' disks are this run's: the destination's image and
    // presence map, and the source's image unless the caller gave it.
    for (i, d) in spec.guest.disks.iter().enumerate() {
        if d.image.is_none() {
            files.add(&source_paths.disk_image(i));
        }
        files.add(&source_paths.disk_socket(i));
        files.add(&dest_paths.disk_image(i));
        files.add(&dest_paths.disk_presence(i));
        files.add(&dest_paths.disk_socket(i));
    }

    let mut source = QemuSource::start(&spec.guest, &source_paths, &spec.run_dir)?;
    write_pid(&spec.run_dir, "source", source.process().pid())?;
    let mut source_log = SerialLog::new(&source_paths.serial);
    let mut engines_started = false;
    match migrate(
        spec,
        listener,
        connect,
        &mut source,
        &mut source_log,
        &dest_paths,
        &mut engines_started,
    ) {
        Ok(m) => Ok(LocalOutcome {
            report: m.report,
            order: m.order,
            source,
            dest: m.dest,
            source_log,
            dest_log: m.dest_log,
            source_paths,
            dest_paths,
            _files: files,
        }),
        Err(cause) => {
            // A failure before the commit leaves the guest running at the
            // source: hand it back rather than kill it.
            let running = engines_started
                && source.process().is_running()
                && source
                    .process()
                    .qmp()
                    .query_status()
                    .is_ok_and(|s| s.status == RunState::Running);
            if !running {
                return Err(cause);
            }
            // The guest's RAM and disks go with it.
            let mut kept_files = Leftovers::default();
            let mut kept = vec![source_paths.ram.clone()];
            for (i, d) in spec.guest.disks.iter().enumerate() {
                if d.image.is_none() {
                    kept.push(source_paths.disk_image(i));
                }
            }
            for p in &kept {
                files.keep(p);
                kept_files.add(p);
            }
            Err(MigrationError::SourceKept {
                cause: Box::new(cause),
                kept: Box::new(KeptSource {
                    source,
                    source_log,
                    paths: source_paths,
                    files: kept_files,
                }),
            })
        }
    }
}

/// What [`migrate`] hands back.
struct Migrated {
    report: MigrationReport,
    order: PageOrder,
    dest: QemuDest,
    dest_log: SerialLog,
}

fn migrate(
    spec: &LocalMigration,
    listener: TcpListener,
    connect: impl FnOnce(
        SocketAddr,
        MigrationId,
        Geometry,
        &PskKey,
        &LinkConfig,
    ) -> Result<ConnectionPair, ConnectError>,
    source: &mut QemuSource,
    source_log: &mut SerialLog,
    dest_paths: &QemuPaths,
    engines_started: &mut bool,
) -> Result<Migrated, MigrationError> {
    warm_up(
        source_log,
        spec.warmup_heartbeats,
        spec.warmup_disk_heartbeats,
        &source.process().paths.serial.clone(),
    )?;
    let mut dest = QemuDest::start(&spec.guest, dest_paths, &spec.run_dir)?;
    write_pid(&spec.run_dir, "destination", dest.process().pid())?;

    let Planned {
        order,
        predicted,
        link: planner_link,
        s,
        origin,
        geometry,
        mut channel,
    } = plan(&spec.planning, source, spec.source.device_state_estimate)?;
    let key = PskKey::generate();
    let id = MigrationId::random();
    let addr = listener.local_addr().map_err(io("listening socket"))?;

    let dest_cfg = spec.dest.clone();
    let link = spec.link;
    let server_key = key.clone();
    // The source calls the destination off when it cannot connect.
    let called_off = Arc::new(AtomicBool::new(false));
    let dest_called_off = called_off.clone();
    *engines_started = true;
    let dest_thread = std::thread::Builder::new()
        .name("wanmig-destination".into())
        .spawn(move || {
            let policy = ServerPolicy {
                expect_migration_id: Some(id),
                expect_geometry: Some(geometry),
                accept_conn: None,
            };
            let deadline = Instant::now() + link.accept_timeout;
            let result =
                connection::accept_until(&listener, &policy, &server_key, &link, deadline, &|| {
                    dest_called_off.load(Ordering::Acquire)
                })
                .map_err(MigrationError::from)
                .and_then(|pair| {
                    run_destination(&mut dest, pair, &dest_cfg).map_err(MigrationError::from)
                });
            (result, dest)
        })
        .map_err(io("starting the destination engine"))?;

    let source_result = match connect(addr, id, geometry, &key, &spec.link) {
        Ok(pair) => match channel.as_mut() {
            Some(ch) => run_source_adaptive(source, pair, &order, &spec.source, ch),
            None => run_source(source, pair, &order, &spec.source),
        }
        .map_err(MigrationError::from),
        Err(e) => {
            called_off.store(true, Ordering::Release);
            Err(MigrationError::from(e))
        }
    };
    let (dest_result, mut dest) = dest_thread
        .join()
        .map_err(|_| MigrationError::Guest("the destination engine panicked".into()))?;
    // A connect failure is the story (the destination only heard it was
    // called off); otherwise the destination's error explains a source
    // failure better than the other way round (a broken connection is
    // usually its echo).
    if let Err(e @ MigrationError::Connect(_)) = source_result {
        return Err(e);
    }
    let dest_report = dest_result?;
    let source_report = source_result?;

    let mut dest_log = SerialLog::new(&dest_paths.serial);
    let after = dest_report.times.map_or_else(Instant::now, |t| t.resumed);
    // A held guest is still paused: the caller looks at it.
    let observe = if spec.dest.hold {
        0
    } else {
        spec.observe_heartbeats
    };
    let alive = dest_log
        .wait_heartbeats(observe, after, Duration::from_secs(60))
        .map_err(io("reading the destination console"))?;
    if !alive {
        return Err(MigrationError::Guest(format!(
            "the guest did not keep running at the destination (see {}): {}",
            dest_paths.serial.display(),
            stalled_guest_diagnosis(&mut dest, &dest_report)
        )));
    }
    // Every failure the guest reported at the destination: its checkers'
    // error counts and every failure line (a checker that failed, sysbench's
    // validation failures, ext4 errors, stress-ng's failures, a crash).
    let checker_errors = dest_log.checker_errors();
    let mut report =
        MigrationReport::combine(source_report, dest_report, checker_errors, spec.dest.dt, s);
    report.predicted = predicted;
    report.plan_origin = origin;
    report.planner_link = planner_link;
    Ok(Migrated {
        report,
        order,
        dest,
        dest_log,
    })
}

/// What a destination guest that stopped printing heartbeats looks like
/// from here: QEMU's run state, where its threads sleep in the kernel (a
/// vCPU in `handle_userfault` waits on a page nobody installs), and what the
/// destination engine saw (integrity, faults, a late error).
fn stalled_guest_diagnosis(dest: &mut QemuDest, report: &DestReport) -> String {
    let pid = dest.pid();
    let state = match dest.process().qmp().query_status() {
        Ok(s) => format!("QEMU {:?} (running: {})", s.status, s.running),
        Err(e) => format!("QEMU status unknown ({e})"),
    };
    let mut waits: BTreeMap<String, usize> = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            let wchan = if wchan.is_empty() || wchan == "0" {
                "running".to_string()
            } else {
                wchan
            };
            *waits.entry(wchan).or_default() += 1;
        }
    }
    let threads: Vec<String> = waits.iter().map(|(w, n)| format!("{n} in {w}")).collect();
    let integrity = report.integrity.map_or_else(
        || "no integrity check".to_string(),
        |i| {
            format!(
                "{} of {} pages compared differ ({} of them holes)",
                i.pages_differing, i.pages_compared, i.holes
            )
        },
    );
    format!(
        "{state}; threads: {}; {integrity}; {} faults, longest stall {:.3} s{}",
        threads.join(", "),
        report.faults,
        report.max_stall_s,
        report
            .late_error
            .as_deref()
            .map_or_else(String::new, |e| format!("; late error: {e}"))
    )
}

/// Waits for `heartbeats` page-checker heartbeats and `disk` heartbeats of
/// the disk workload (the disk checker's or sysbench's; 0: none) on the
/// source's console.
pub fn warm_up(
    log: &mut SerialLog,
    heartbeats: usize,
    disk: usize,
    serial: &Path,
) -> Result<(), MigrationError> {
    let warm = log
        .wait_heartbeats(heartbeats, Instant::now(), Duration::from_secs(120))
        .map_err(io("reading the source console"))?;
    if !warm {
        return Err(MigrationError::Guest(format!(
            "no heartbeat from the guest at the source (see {})",
            serial.display()
        )));
    }
    // Every disk workload the guest started (sysbench has a file system to
    // make first); the disk checker if none has said yet.
    if disk == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let modes = log.disk_workloads();
        let warm = |mode: &str| match mode {
            "sysbench" => log.sysbench_heartbeats().len() >= disk,
            _ => log.disk_heartbeats().len() >= disk,
        };
        if modes.is_empty() && warm("check") || !modes.is_empty() && modes.iter().all(|m| warm(m)) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::Guest(format!(
                "no disk-workload heartbeat from the guest at the source (see {})",
                serial.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
        log.poll().map_err(io("reading the source console"))?;
    }
    Ok(())
}

/// A plan ready for the engines.
pub(crate) struct Planned {
    /// Pages (and the disks' chunks) in priority order, M and S prefixes.
    pub order: PageOrder,
    /// The planner's prediction, if a profile was used.
    pub predicted: Option<crate::report::Figures>,
    /// The link the planner assumed, when it planned in this process.
    pub link: Option<wanmig_planner::model::Link>,
    /// S.
    pub s: f64,
    /// Where the plan came from.
    pub origin: String,
    /// The session geometry for this guest.
    pub geometry: Geometry,
    /// The planner's loop, if the plan came from a `serve` segment.
    pub channel: Option<crate::planning::SegmentChannel>,
}

/// Plans the migration of `source`'s guest as `planning` says.
pub(crate) fn plan(
    planning: &Planning,
    source: &mut QemuSource,
    device_state_estimate: u64,
) -> Result<Planned, MigrationError> {
    let pages = source.page_count();
    let disks = source.disks();
    let guest = GuestUnits {
        pages,
        chunks: disks.as_ref().map_or(0, |d| d.space().chunks()),
    };
    let planned = |p: EnginePlan| {
        (
            p.order,
            p.has_chunks,
            p.s,
            Some(p.predicted),
            p.origin,
            p.link,
        )
    };
    let mut channel = None;
    let (order, has_chunks, mut s, predicted, mut origin, link) = match planning {
        Planning::Fixed { m, s } => (
            PageOrder::by_address(pages, *m)?,
            false,
            *s,
            None,
            "fixed M and S, address order".to_string(),
            None,
        ),
        Planning::FixedStrategy {
            m,
            s,
            freeze,
            max_rounds,
        } => (
            PageOrder::by_address(pages, *m)?.with_strategy(Some(*freeze), *max_rounds),
            false,
            *s,
            None,
            format!(
                "fixed M and S, address order, {freeze} freeze, {}",
                max_rounds.map_or("the engine's round limit".to_string(), |r| format!(
                    "at most {r} round(s)"
                ))
            ),
            None,
        ),
        Planning::Profile {
            path,
            rate,
            rtt,
            downtime_target,
        } => {
            // How the guest's content compresses now, split as the
            // profile saw it written.
            let profile = wanmig_planner::profile::Profile::open(path)
                .map_err(|e| crate::planning::profile_err(path)(e.to_string()))?;
            let wire = crate::profiling::wire_ratios_for_profile(source, &profile)?;
            let mut p = plan_in_process(path, *rate, *rtt, *downtime_target, guest, wire)?;
            p.origin = format!("{} ({})", p.origin, wire.describe(guest.chunks > 0));
            planned(p)
        }
        Planning::ProfileNow {
            path,
            samples,
            interval,
            rate,
            rtt,
            downtime_target,
        } => {
            let opts = ProfileOptions::new(*samples, *interval, device_state_estimate);
            let stats = profile_guest(source, &opts, path)?;
            let mut p = plan_in_process(
                path,
                *rate,
                *rtt,
                *downtime_target,
                guest,
                stats.wire_ratios(),
            )?;
            p.origin = format!("{} after {}", p.origin, stats.describe());
            planned(p)
        }
        Planning::Segment { name, profile } => {
            let (p, ch) = plan_from_segment(name, profile, guest, Duration::from_secs(30))?;
            channel = Some(ch);
            planned(p)
        }
    };
    // The disks' chunks: the planner's order (merged with the pages' in the
    // push), or address order with S as prefix (a fixed plan, or a profile
    // without chunks: then S = 1, the safe choice, since the planner did
    // not see the disks).
    let (order, chunks) = match (&disks, has_chunks) {
        (Some(d), true) => (order, d.space().chunks()),
        (Some(d), false) => {
            if predicted.is_some() {
                s = 1.0;
                origin.push_str("; the profile has no chunks: the disks are pre-copied whole");
            }
            let n = d.space().chunks();
            (order.with_chunks(PageOrder::by_address(n, s)?), n)
        }
        (None, _) => (order, 1),
    };
    let geometry = Geometry::new(
        source.page_size() as u32,
        pages,
        disks
            .as_ref()
            .map_or(crate::storage::DEFAULT_CHUNK_SIZE, |d| {
                d.space().chunk_size()
            }) as u32,
        chunks,
        source.device_state_max(),
    );
    Ok(Planned {
        order,
        predicted,
        link,
        s,
        origin,
        geometry,
        channel,
    })
}

pub(crate) fn write_pid(dir: &std::path::Path, role: &str, pid: u32) -> Result<(), MigrationError> {
    let p = dir.join(format!("{role}.pid"));
    std::fs::write(&p, format!("{pid}\n")).map_err(io(format!("writing {}", p.display())))
}

/// Runs a whole migration across an emulated WAN: the destination engine
/// listens in the WAN's destination namespace, the source engine connects
/// from its source namespace.
pub fn run_over_wan(
    spec: &LocalMigration,
    wan: &wanmig_wan::Wan,
) -> Result<LocalOutcome, MigrationError> {
    use wanmig_wan::netns;
    let dst = wan.dst_addr();
    let listener = netns::run_in(wan.dst_ns(), move || TcpListener::bind((dst, 0)))
        .map_err(|e| MigrationError::Io {
            what: format!("entering {}", wan.dst_ns()),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(io("binding the destination engine"))?;
    let src_ns = wan.src_ns().to_string();
    run_local(spec, listener, move |addr, id, geometry, key, link| {
        let (key, link) = (key.clone(), *link);
        netns::run_in(&src_ns, move || {
            connection::connect(addr, id, geometry, &key, &link)
        })
        .map_err(|e| ConnectError::Tcp {
            conn: crate::wire::ConnKind::Bulk,
            peer: addr,
            source: std::io::Error::other(format!("entering the source namespace: {e}")),
        })?
    })
}
