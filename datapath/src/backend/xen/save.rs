//! A Xen domain's memory migration as the patched toolstack drives it: the
//! save side inside `xc_domain_save()`, the restore side inside
//! `xc_domain_restore()` (through the C ABI of `ffi/capi`).
//!
//! ```text
//! save (source dom0)                        restore (destination dom0)
//! open: check the domain, load the key,     open: check the new domain,
//!   listen                                    load the key
//! handoff → libxenguest writes record 0x13 ─▶ record 0x13 → receive_memory:
//! send_memory: accept the destination  ◀──── dial the address it names
//!   (handshake: this migration, this            (handshake: that migration)
//!   geometry), pre-copy rounds, suspend  ───▶ populate and write frames
//!   through the toolstack, the freeze,
//!   (verify=1: digests of the frozen   ───▶ (verify=1: compare every
//!   frames)                                     frame); report the pfns
//!                                               populated
//! return → libxenguest writes the CPU and   return → libxenguest reads them;
//!   device records, END                       libxl unpauses the domain
//! ```
//!
//! Options are one string of `name=value` pairs separated by commas (what
//! `xl migrate --wanmig` passes through); see [`SaveOptions`] and
//! [`RestoreOptions`].

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::source::SuspendFn;
use super::{Hypervisor, XEN_PAGE_SIZE, XenDest, XenError, XenSource};
use crate::connection::{self, ConnectError, LinkConfig};
use crate::engine::plan_channel::{Phase, Telemetry};
use crate::engine::{
    DestConfig, EngineError, NewPlan, PageOrder, PlanChannel, RoundReport, SourceConfig,
    run_destination, run_source, run_source_adaptive,
};
use crate::planning::{GuestUnits, PlanningError, plan_from_segment};
use crate::wire::{Geometry, Handoff, HandoffError, KeyError, MigrationId, PskKey, ServerPolicy};

/// Pfns of holes a guest's physmap may have beyond its frames (64 GiB of
/// pfn space: the MMIO hole below 4 GiB and Xen's special pages fit many
/// times over).
const MAX_PHYSMAP_HOLES: u64 = 1 << 24;

/// Chunk size named in a Xen migration's geometry (it has no disks: the
/// engine does not migrate a Xen guest's storage yet).
const NO_DISK_CHUNK: u32 = 1 << 16;

/// Why a Xen memory migration could not be set up or failed.
#[derive(Debug, thiserror::Error)]
pub enum XenMigrationError {
    /// A malformed or contradictory option.
    #[error("option {name}: {why}")]
    Option {
        /// The option.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// What was asked cannot be done by this build or for this domain.
    #[error("{0}")]
    Unsupported(String),
    /// The key file.
    #[error("key file {path}")]
    Key {
        /// Its path.
        path: PathBuf,
        /// Why it was refused.
        #[source]
        source: KeyError,
    },
    /// The hypervisor.
    #[error(transparent)]
    Xen(#[from] XenError),
    /// The hand-off record.
    #[error("the hand-off record")]
    Handoff(#[from] HandoffError),
    /// Listening, dialling or the handshake.
    #[error("connecting the engines")]
    Network(#[source] ConnectError),
    /// The destination did not connect in time, and the connections that
    /// did were refused (the last one's reason is the source).
    #[error("{timeout}; {refused} connections failed the handshake, the last one")]
    NoDestination {
        /// The timeout.
        timeout: Box<ConnectError>,
        /// How many were refused.
        refused: usize,
        /// The last refusal.
        #[source]
        last: Box<ConnectError>,
    },
    /// Finding the address the hand-off names.
    #[error("resolving {host}:{port}")]
    Resolve {
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The toolstack's suspend callback failed.
    #[error("suspending the domain: {0}")]
    Suspend(String),
    /// The planner.
    #[error("planning")]
    Planning(#[from] PlanningError),
    /// The migration itself.
    #[error("migrating memory")]
    Engine(#[from] EngineError),
    /// The destination's frames differ from the source's frozen frames.
    #[error("{differing} of {compared} frames differ from the source's frozen frames")]
    Integrity {
        /// Frames compared.
        compared: u64,
        /// Frames that differ.
        differing: u64,
    },
    /// The destination could not check its frames and the options require it.
    #[error("the source sent no digests of its frozen frames, so nothing was checked")]
    NotChecked,
    /// The caller's callback refused the populated pfns.
    #[error("the toolstack refused the populated pfns: {0}")]
    Populated(String),
    /// The report file cannot be written.
    #[error("the report file {path}")]
    Report {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A call out of order.
    #[error("{0}")]
    State(&'static str),
}

fn option(name: &str, why: impl Into<String>) -> XenMigrationError {
    XenMigrationError::Option {
        name: name.into(),
        why: why.into(),
    }
}

/// `name=value` pairs, each name at most once, none unknown.
fn pairs<'a>(
    options: &'a str,
    known: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, XenMigrationError> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for item in options.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| option(item, "expected name=value"))?;
        let (name, value) = (name.trim(), value.trim());
        if !known.contains(&name) {
            return Err(option(
                name,
                format!("unknown (known: {})", known.join(", ")),
            ));
        }
        if value.is_empty() {
            return Err(option(name, "empty value"));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(option(name, "given twice"));
        }
        out.push((name, value));
    }
    Ok(out)
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, XenMigrationError>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| option(name, format!("{value:?}: {e}")))
}

fn flag(name: &str, value: &str) -> Result<bool, XenMigrationError> {
    match value {
        "1" | "yes" | "on" | "true" => Ok(true),
        "0" | "no" | "off" | "false" => Ok(false),
        _ => Err(option(name, format!("{value:?}: expected 0 or 1"))),
    }
}

fn load_key(path: &str) -> Result<PskKey, XenMigrationError> {
    PskKey::load(path).map_err(|source| XenMigrationError::Key {
        path: path.into(),
        source,
    })
}

/// The save side's options.
///
/// | option         | default     | meaning                                                |
/// |----------------|-------------|--------------------------------------------------------|
/// | `key`          | (required)  | the pre-shared key file (`wanmig keygen`), on both hosts |
/// | `m`            | 1           | fraction of memory pre-copied; only 1 for Xen so far   |
/// | `s`            | 0           | fraction of storage pre-copied; only 0 (no disks) so far |
/// | `segment`      |             | take the plan from `wanmig-planner serve --segment` (with `profile`) |
/// | `profile`      |             | the profile that planner planned from                  |
/// | `listen`       | `0.0.0.0:0` | where the source engine listens (port 0: any free port) |
/// | `advertise`    | see below   | the host name or address the destination dials         |
/// | `downtime-ms`  | 300         | freeze once the predicted downtime is at most this     |
/// | `max-rounds`   | 30          | freeze after this many rounds at the latest            |
/// | `verify`       | 0           | send digests of the frozen frames for the destination's check (costs downtime: see below) |
/// | `timeout-s`    | 60          | how long to wait for the destination to dial           |
/// | `report`       |             | write the report here as JSON                          |
/// | `progress`     | 1           | a line on stderr per round and phase (the toolstack's log) |
///
/// `advertise` defaults to the `listen` address when that is a specific
/// one, else to this host's name (`gethostname`).
///
/// `verify=1` proves the copy: after the last frame, the source reads every
/// frozen frame again and sends its digest, and the destination reads every
/// frame it wrote and compares, all while the domain is suspended (the
/// toolstack unpauses it only after the engine returns), so it adds about
/// two reads of the guest's memory to the downtime. A mismatch fails the
/// restore, and the toolstack resumes the guest at the source.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveOptions {
    /// The key file.
    pub key: PathBuf,
    /// Memory fraction.
    pub m: f64,
    /// Storage fraction.
    pub s: f64,
    /// Planner segment and its profile.
    pub segment: Option<(String, PathBuf)>,
    /// Listening address.
    pub listen: SocketAddr,
    /// What the hand-off names.
    pub advertise: Option<String>,
    /// The source engine's tuning.
    pub engine: SourceConfig,
    /// Wait for the destination's connections.
    pub accept_timeout: Duration,
    /// JSON report.
    pub report: Option<PathBuf>,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl SaveOptions {
    /// Parses `options` (see the table above).
    pub fn parse(options: &str) -> Result<Self, XenMigrationError> {
        const KNOWN: &[&str] = &[
            "key",
            "m",
            "s",
            "segment",
            "profile",
            "listen",
            "advertise",
            "downtime-ms",
            "max-rounds",
            "verify",
            "timeout-s",
            "report",
            "progress",
        ];
        let mut o = SaveOptions {
            key: PathBuf::new(),
            m: 1.0,
            s: 0.0,
            segment: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            advertise: None,
            engine: SourceConfig {
                integrity: false,
                ..SourceConfig::default()
            },
            accept_timeout: Duration::from_secs(60),
            report: None,
            progress: true,
        };
        let (mut key, mut segment, mut profile, mut m_given) = (None, None, None, false);
        for (name, value) in pairs(options, KNOWN)? {
            match name {
                "key" => key = Some(PathBuf::from(value)),
                "m" | "s" => {
                    let f: f64 = number(name, value)?;
                    if !(0.0..=1.0).contains(&f) {
                        return Err(option(name, format!("{f} is not in 0..=1")));
                    }
                    if name == "m" {
                        o.m = f;
                        m_given = true;
                    } else {
                        o.s = f;
                    }
                }
                "segment" => segment = Some(value.to_string()),
                "profile" => profile = Some(PathBuf::from(value)),
                "listen" => o.listen = number(name, value)?,
                "advertise" => o.advertise = Some(value.to_string()),
                "downtime-ms" => {
                    o.engine.downtime_target = Duration::from_millis(number(name, value)?)
                }
                "max-rounds" => o.engine.max_rounds = number(name, value)?,
                "verify" => o.engine.integrity = flag(name, value)?,
                "timeout-s" => o.accept_timeout = Duration::from_secs(number(name, value)?),
                "report" => o.report = Some(PathBuf::from(value)),
                "progress" => o.progress = flag(name, value)?,
                _ => unreachable!("{name} is in KNOWN"),
            }
        }
        o.key = key.ok_or_else(|| option("key", "required (the pre-shared key file)"))?;
        o.segment = match (segment, profile) {
            (Some(s), Some(p)) => Some((s, p)),
            (None, None) => None,
            (Some(_), None) => return Err(option("segment", "needs profile= as well")),
            (None, Some(_)) => return Err(option("profile", "only with segment=")),
        };
        if o.segment.is_some() && m_given {
            return Err(option(
                "m",
                "the plan comes from the segment: give one of m= and segment=",
            ));
        }
        if o.m < 1.0 {
            return Err(XenMigrationError::Unsupported(format!(
                "m={}: post-copy of Xen guests is not supported yet (it needs mem_paging): plan m=1",
                o.m
            )));
        }
        if o.s > 0.0 {
            return Err(XenMigrationError::Unsupported(format!(
                "s={}: the engine does not migrate Xen guests' disks yet (shared storage, as stock xl migrate assumes)",
                o.s
            )));
        }
        if let Some(a) = &o.advertise {
            Handoff {
                migration_id: MigrationId([0; 16]),
                geometry: Geometry::new(4096, 1, NO_DISK_CHUNK, 0, 0),
                host: a.clone(),
                port: 1,
            }
            .encode()
            .map_err(|e| option("advertise", e.to_string()))?;
        }
        Ok(o)
    }
}

/// The restore side's options.
///
/// | option      | default    | meaning                                                  |
/// |-------------|------------|----------------------------------------------------------|
/// | `key`       | (required) | the pre-shared key file, the same as the source's        |
/// | `verify`    | 0          | fail unless the frames were compared with the source's frozen frames (the source's `verify=1`); without it the report says whether they were |
/// | `timeout-s` | 60         | how long the engines may take to connect                 |
/// | `report`    |            | write the report here as JSON                            |
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreOptions {
    /// The key file.
    pub key: PathBuf,
    /// Require the integrity check.
    pub verify: bool,
    /// Connect timeout.
    pub timeout: Duration,
    /// JSON report.
    pub report: Option<PathBuf>,
}

impl RestoreOptions {
    /// Parses `options` (see the table above).
    pub fn parse(options: &str) -> Result<Self, XenMigrationError> {
        let mut o = RestoreOptions {
            key: PathBuf::new(),
            verify: false,
            timeout: Duration::from_secs(60),
            report: None,
        };
        let mut key = None;
        for (name, value) in pairs(options, &["key", "verify", "timeout-s", "report"])? {
            match name {
                "key" => key = Some(PathBuf::from(value)),
                "verify" => o.verify = flag(name, value)?,
                "timeout-s" => o.timeout = Duration::from_secs(number(name, value)?),
                "report" => o.report = Some(PathBuf::from(value)),
                _ => unreachable!("{name} is known"),
            }
        }
        o.key = key.ok_or_else(|| option("key", "required (the pre-shared key file)"))?;
        Ok(o)
    }
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `at` on the wall clock, given that `now` is `wall_now`.
fn wall(at: Instant, now: Instant, wall_now: SystemTime) -> u64 {
    unix_ns(wall_now - now.saturating_duration_since(at))
}

/// Creates (empties) the report file when the side opens: a path that
/// cannot be written fails the open, before anything is migrated.
fn create_report(path: &Option<PathBuf>) -> Result<(), XenMigrationError> {
    let Some(path) = path else { return Ok(()) };
    std::fs::write(path, b"").map_err(|source| XenMigrationError::Report {
        path: path.clone(),
        source,
    })
}

/// Writes the report once the migration is done. A failure now must not
/// fail a migration that succeeded (the toolstack would throw away the
/// destination): it is said on stderr (the toolstack's log) instead.
fn write_report<T: Serialize>(path: &Option<PathBuf>, report: &T) {
    let Some(path) = path else { return };
    let written = serde_json::to_vec_pretty(report)
        .map_err(std::io::Error::from)
        .and_then(|json| std::fs::write(path, json));
    if let Err(e) = written {
        eprintln!("wanmig: writing the report {}: {e}", path.display());
    }
}

/// What the save side did.
#[derive(Debug, Clone, Serialize)]
pub struct SaveReport {
    /// The domain.
    pub domid: u32,
    /// Memory fraction pre-copied.
    pub m: f64,
    /// Storage fraction pre-copied (0: the engine moves no Xen disks).
    pub s: f64,
    /// Pfns of the domain (`max_gpfn + 1`).
    pub pages: u64,
    /// Populated frames when it was suspended.
    pub populated_pages: u64,
    /// The live rounds.
    pub rounds: Vec<RoundReport>,
    /// Why pre-copy stopped.
    pub stop_reason: String,
    /// Frames sent (every round and the freeze).
    pub pages_sent: u64,
    /// Bytes on both connections.
    pub bytes_sent: u64,
    /// From the first round to the suspend, s.
    pub precopy_s: f64,
    /// From the last frame sent to the destination's goodbye, s: with
    /// `verify=1` the source's digests of every frozen frame and the
    /// destination's comparison of every frame, all while the domain is
    /// suspended (part of the downtime); without, a round trip.
    pub verify_s: f64,
    /// The freeze's scan of the physmap for frames populated or given back
    /// since round 0 (Xen's log-dirty reports neither), s: part of the
    /// downtime.
    pub physmap_scan_s: f64,
    /// From `send_memory` to its return, s (waiting for the destination to
    /// dial included).
    pub total_s: f64,
    /// Handshakes refused while waiting for the destination.
    pub refused_connections: usize,
    /// Where the plan came from.
    pub plan: String,
    /// `send_memory` started.
    pub started_unix_ns: u64,
    /// The suspend callback returned.
    pub suspended_unix_ns: u64,
    /// `send_memory` returned.
    pub finished_unix_ns: u64,
}

/// What the restore side did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The domain.
    pub domid: u32,
    /// Frames written (rewrites included).
    pub pages_received: u64,
    /// Pfns the engine populated (all reported to libxenguest).
    pub pfns_populated: u64,
    /// The integrity check.
    pub integrity: RestoreIntegrity,
    /// From the hand-off to the return, s.
    pub total_s: f64,
    /// `receive_memory` started.
    pub started_unix_ns: u64,
    /// `receive_memory` returned.
    pub finished_unix_ns: u64,
}

/// The restore side's integrity check: every frame the domain has, and
/// every pfn it has none at, against the source's digests of its frozen
/// frames.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RestoreIntegrity {
    /// Whether the comparison ran.
    pub checked: bool,
    /// Populated frames compared.
    pub pages_compared: u64,
    /// Of those, the ones that differ.
    pub pages_differing: u64,
    /// Pfns without a frame, compared as zero pages.
    pub holes_compared: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Open,
    HandedOff,
    Finished,
}

/// The save side of one domain's memory migration.
#[derive(Debug)]
pub struct XenSave {
    hv: Arc<dyn Hypervisor>,
    domid: u32,
    opts: SaveOptions,
    key: PskKey,
    listener: TcpListener,
    handoff: Handoff,
    stage: Stage,
}

impl XenSave {
    /// Checks the domain (a live HVM/PVH guest), loads the key and starts
    /// listening for the destination.
    pub fn open(
        hv: Arc<dyn Hypervisor>,
        domid: u32,
        options: &str,
    ) -> Result<Self, XenMigrationError> {
        let opts = SaveOptions::parse(options)?;
        super::check_domain(hv.as_ref(), domid)?;
        let key = load_key(&opts.key.to_string_lossy())?;
        create_report(&opts.report)?;
        let pages = hv.max_gpfn(domid)? + 1;
        let listener = TcpListener::bind(opts.listen).map_err(|source| {
            XenMigrationError::Network(ConnectError::Tcp {
                conn: crate::wire::ConnKind::Bulk,
                peer: opts.listen,
                source,
            })
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| {
                XenMigrationError::Network(ConnectError::Tcp {
                    conn: crate::wire::ConnKind::Bulk,
                    peer: opts.listen,
                    source,
                })
            })?
            .port();
        let host = match &opts.advertise {
            Some(h) => h.clone(),
            None if !opts.listen.ip().is_unspecified() => opts.listen.ip().to_string(),
            None => hostname().ok_or_else(|| {
                option(
                    "advertise",
                    "this host has no name to advertise: give advertise=HOST",
                )
            })?,
        };
        let handoff = Handoff {
            migration_id: MigrationId::random(),
            geometry: Geometry::new(XEN_PAGE_SIZE as u32, pages, NO_DISK_CHUNK, 0, 0),
            host,
            port,
        };
        handoff.encode()?;
        Ok(XenSave {
            hv,
            domid,
            opts,
            key,
            listener,
            handoff,
            stage: Stage::Open,
        })
    }

    /// The hand-off record's body: where this engine listens and which
    /// migration it is.
    pub fn handoff(&mut self) -> Result<Vec<u8>, XenMigrationError> {
        if self.stage == Stage::Finished {
            return Err(XenMigrationError::State(
                "the migration is over: open a new handle",
            ));
        }
        let bytes = self.handoff.encode()?;
        self.stage = Stage::HandedOff;
        Ok(bytes)
    }

    /// The options in force.
    pub fn options(&self) -> &SaveOptions {
        &self.opts
    }

    /// The hand-off this side made.
    pub fn handoff_info(&self) -> &Handoff {
        &self.handoff
    }

    /// Whether [`send_memory`](Self::send_memory) ran (successfully or not).
    /// A save that ends without it did not go through the engine: the
    /// toolstack's libxenguest never handed the memory over (not the
    /// patched one, or not a live save).
    pub fn memory_attempted(&self) -> bool {
        self.stage == Stage::Finished
    }

    /// Migrates the domain's memory: waits for the destination engine to
    /// dial, pre-copies, calls `suspend` once (from this thread), sends the
    /// rest (and with `verify=1` the digests of the frozen frames), and
    /// returns once the destination has all of it. On failure the domain is left as it is (running, or suspended
    /// if `suspend` ran): the toolstack resumes it, as after any failed save.
    pub fn send_memory(&mut self, suspend: SuspendFn<'_>) -> Result<SaveReport, XenMigrationError> {
        match self.stage {
            Stage::Open => {
                return Err(XenMigrationError::State(
                    "send_memory before handoff: the destination would not know where to dial",
                ));
            }
            Stage::Finished => {
                return Err(XenMigrationError::State(
                    "the migration is over: open a new handle",
                ));
            }
            Stage::HandedOff => {}
        }
        self.stage = Stage::Finished;
        let started = SystemTime::now();
        let t0 = Instant::now();
        let suspend_error = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let mut suspend = suspend;
        let seen = suspend_error.clone();
        let watched: SuspendFn<'_> = Box::new(move || {
            suspend().inspect_err(|e| {
                *seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.clone());
            })
        });
        let mut source = XenSource::new(self.hv.clone(), self.domid, watched)?;
        let pages = source_pages(&source);
        if pages != self.handoff.geometry.page_count() {
            return Err(XenMigrationError::Unsupported(format!(
                "the domain's physmap changed from {} to {pages} pfns since the hand-off",
                self.handoff.geometry.page_count()
            )));
        }
        let (order, mut channel, plan) = match &self.opts.segment {
            None => (
                PageOrder::by_address(pages, self.opts.m)
                    .map_err(|e| XenMigrationError::Unsupported(e.to_string()))?,
                None,
                format!("m={} (pfn order)", self.opts.m),
            ),
            Some((name, profile)) => {
                let (plan, channel) = plan_from_segment(
                    name,
                    profile,
                    GuestUnits { pages, chunks: 0 },
                    Duration::from_secs(5),
                )?;
                if plan.order.m() < 1.0 || plan.has_chunks {
                    return Err(XenMigrationError::Unsupported(format!(
                        "the planner's plan (M = {:.3}, S = {:.3}) needs post-copy or disks, which Xen guests do not have yet: plan M = 1",
                        plan.order.m(),
                        plan.s
                    )));
                }
                (plan.order, Some(channel), plan.origin)
            }
        };
        let mut refused = Vec::new();
        let pair = connection::accept_destination(
            &self.listener,
            self.handoff.migration_id,
            self.handoff.geometry,
            &self.key,
            &LinkConfig::default(),
            Instant::now() + self.opts.accept_timeout,
            &mut refused,
        )
        .map_err(|e| match (e, refused.pop()) {
            (e @ ConnectError::AcceptTimeout { .. }, Some(last)) => {
                XenMigrationError::NoDestination {
                    timeout: Box::new(e),
                    refused: refused.len() + 1,
                    last: Box::new(last),
                }
            }
            (e, _) => XenMigrationError::Network(e),
        })?;
        let ran = if self.opts.progress || channel.is_some() {
            let mut progress = Progress {
                domid: self.domid,
                print: self.opts.progress,
                inner: channel.as_mut().map(|c| c as &mut dyn PlanChannel),
                last: None,
            };
            run_source_adaptive(&mut source, pair, &order, &self.opts.engine, &mut progress)
        } else {
            run_source(&mut source, pair, &order, &self.opts.engine)
        };
        let populated_pages = source.last_populated();
        let physmap_scan_s = source.last_scan_seconds();
        drop(source);
        let report = match ran {
            Ok(r) => r,
            Err(e) => {
                let why = suspend_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                return Err(match why {
                    Some(why) => XenMigrationError::Suspend(why),
                    None => XenMigrationError::Engine(e),
                });
            }
        };
        let now = Instant::now();
        let wall_now = SystemTime::now();
        let times = report.times.expect("a finished source has its times");
        let out = SaveReport {
            domid: self.domid,
            m: report.m,
            s: 0.0,
            pages,
            populated_pages,
            pages_sent: report.rounds.iter().map(|r| r.pages).sum::<u64>()
                + report.remainder_pages
                + report.postcopy_pushed
                + report.fault_pages_served,
            rounds: report.rounds,
            stop_reason: report.stop_reason,
            bytes_sent: report.bytes_sent,
            precopy_s: report.precopy_s,
            verify_s: times
                .end
                .saturating_duration_since(times.push_done)
                .as_secs_f64(),
            physmap_scan_s,
            total_s: now.duration_since(t0).as_secs_f64(),
            refused_connections: refused.len(),
            plan,
            started_unix_ns: unix_ns(started),
            suspended_unix_ns: wall(times.paused, now, wall_now),
            finished_unix_ns: unix_ns(wall_now),
        };
        write_report(&self.opts.report, &out);
        Ok(out)
    }
}

/// The engine's telemetry as one line on stderr per round and phase (what
/// `xl migrate` shows of the helper), passed on to the planner's segment
/// when there is one.
struct Progress<'a> {
    domid: u32,
    print: bool,
    inner: Option<&'a mut dyn PlanChannel>,
    last: Option<(Phase, u64)>,
}

impl PlanChannel for Progress<'_> {
    fn publish(&mut self, t: &Telemetry) {
        if let Some(c) = self.inner.as_mut() {
            c.publish(t);
        }
        if !self.print || self.last == Some((t.phase, t.round)) {
            return;
        }
        self.last = Some((t.phase, t.round));
        let mb = t.bytes_sent as f64 / 1e6;
        let line = match t.phase {
            Phase::Precopy if t.round == 0 => {
                "pre-copy: round 0 (every populated frame)".to_string()
            }
            Phase::Precopy => format!(
                "pre-copy: round {} took {:.2} s{}; {mb:.1} MB sent so far{}",
                t.last_round,
                t.last_round_duration_ns as f64 / 1e9,
                if t.last_round > 0 {
                    format!(", {} frames dirtied during it", t.dirty_pages_last_round)
                } else {
                    String::new()
                },
                if t.bandwidth_bps > 0 {
                    format!(" at {:.1} Mbit/s", t.bandwidth_bps as f64 / 1e6)
                } else {
                    String::new()
                }
            ),
            Phase::Freeze => format!("suspending the domain after round {}; the freeze", t.round),
            Phase::Postcopy => format!("every frame sent ({mb:.1} MB); checking"),
            Phase::Done => format!("done: {mb:.1} MB sent"),
            Phase::Failed => "failed".to_string(),
            _ => return,
        };
        eprintln!("wanmig: domain {}: {line}", self.domid);
    }

    fn initial_generation(&self) -> u64 {
        self.inner.as_ref().map_or(0, |c| c.initial_generation())
    }

    fn newer_plan(&mut self) -> Option<NewPlan> {
        self.inner.as_mut().and_then(|c| c.newer_plan())
    }
}

fn source_pages(s: &XenSource<'_>) -> u64 {
    crate::backend::SourceBackend::page_count(s)
}

/// This host's name, if it has one.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the live
    // buffer and keeps no pointer to it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim().to_string();
    (!name.is_empty() && name != "(none)").then_some(name)
}

/// The restore side of one domain's memory migration.
#[derive(Debug)]
pub struct XenRestore {
    hv: Arc<dyn Hypervisor>,
    domid: u32,
    opts: RestoreOptions,
    key: PskKey,
    finished: bool,
}

impl XenRestore {
    /// Checks the new domain (live, HVM/PVH) and loads the key.
    pub fn open(
        hv: Arc<dyn Hypervisor>,
        domid: u32,
        options: &str,
    ) -> Result<Self, XenMigrationError> {
        let opts = RestoreOptions::parse(options)?;
        super::check_domain(hv.as_ref(), domid)?;
        let key = load_key(&opts.key.to_string_lossy())?;
        create_report(&opts.report)?;
        Ok(XenRestore {
            hv,
            domid,
            opts,
            key,
            finished: false,
        })
    }

    /// Receives the memory the hand-off names: dials the source engine,
    /// populates and writes every frame, checks them against the source's
    /// digests when it sent them (`verify=1`), and hands every pfn it
    /// populated to `populated` (in ascending runs of at most 1024) before
    /// it returns.
    pub fn receive_memory(
        &mut self,
        handoff: &[u8],
        populated: &mut dyn FnMut(&[u64]) -> Result<(), String>,
    ) -> Result<RestoreReport, XenMigrationError> {
        if self.finished {
            return Err(XenMigrationError::State(
                "the migration is over: open a new handle",
            ));
        }
        self.finished = true;
        let started = SystemTime::now();
        let t0 = Instant::now();
        let h = Handoff::decode(handoff)?;
        // The pfn space the hand-off claims must fit this domain: at most
        // its frames plus the holes a guest's physmap has (the MMIO hole
        // below 4 GiB and the like), so a corrupt record cannot make the
        // engine size its bitmaps for a petabyte.
        let info = self.hv.domain_info(self.domid)?;
        let most = info.max_pages.saturating_add(MAX_PHYSMAP_HOLES);
        if h.geometry.page_count() > most {
            return Err(XenMigrationError::Unsupported(format!(
                "the hand-off names {} pfns; domain {} may hold {} frames (with holes, at most {most} pfns)",
                h.geometry.page_count(),
                self.domid,
                info.max_pages
            )));
        }
        let resolve = |source| XenMigrationError::Resolve {
            host: h.host.clone(),
            port: h.port,
            source,
        };
        let addrs: Vec<SocketAddr> = match h.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, h.port)],
            Err(_) => (h.host.as_str(), h.port)
                .to_socket_addrs()
                .map_err(resolve)?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(resolve(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no address",
            )));
        }
        let policy = ServerPolicy {
            expect_migration_id: Some(h.migration_id),
            expect_geometry: Some(h.geometry),
            accept_conn: None,
        };
        let link = LinkConfig {
            handshake_timeout: self.opts.timeout,
            ..LinkConfig::default()
        };
        // Every address the name has, in order, until one answers (a name
        // may resolve to an address family the source does not listen on).
        let mut pair = None;
        let mut last = None;
        for addr in &addrs {
            match connection::connect_to_source(*addr, &policy, &self.key, &link) {
                Ok(p) => {
                    pair = Some(p);
                    break;
                }
                Err(e @ ConnectError::Tcp { .. }) => last = Some(e),
                Err(e) => return Err(XenMigrationError::Network(e)),
            }
        }
        let pair = match (pair, last) {
            (Some(p), _) => p,
            (None, Some(e)) => return Err(XenMigrationError::Network(e)),
            (None, None) => unreachable!("at least one address was tried"),
        };
        // Sized by the geometry the authenticated handshake confirmed.
        let mut dest = XenDest::new(self.hv.clone(), self.domid, h.geometry.page_count())?;
        let report = run_destination(&mut dest, pair, &DestConfig::default())?;
        let integrity = match report.integrity {
            Some(i) => RestoreIntegrity {
                checked: true,
                pages_compared: i.pages_compared - i.holes,
                pages_differing: i.pages_differing,
                holes_compared: i.holes,
            },
            None => RestoreIntegrity {
                checked: false,
                pages_compared: 0,
                pages_differing: 0,
                holes_compared: 0,
            },
        };
        if integrity.pages_differing > 0 {
            return Err(XenMigrationError::Integrity {
                compared: integrity.pages_compared + integrity.holes_compared,
                differing: integrity.pages_differing,
            });
        }
        if !integrity.checked && self.opts.verify {
            return Err(XenMigrationError::NotChecked);
        }
        let pfns: Vec<u64> = dest.populated_pfns().collect();
        for run in pfns.chunks(1024) {
            populated(run).map_err(XenMigrationError::Populated)?;
        }
        let out = RestoreReport {
            domid: self.domid,
            pages_received: dest.pages_written(),
            pfns_populated: pfns.len() as u64,
            integrity,
            total_s: t0.elapsed().as_secs_f64(),
            started_unix_ns: unix_ns(started),
            finished_unix_ns: unix_ns(SystemTime::now()),
        };
        write_report(&self.opts.report, &out);
        Ok(out)
    }
}
