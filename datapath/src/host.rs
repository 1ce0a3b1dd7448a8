//! One engine per host: what `wanmig destination` and `wanmig source` run.
//!
//! The destination host starts its QEMU waiting for the guest and accepts
//! one migration (authenticated with the pre-shared key; the guest's shape
//! is checked by the engine); the source host starts (or runs) the guest,
//! plans, connects and migrates. Each reports what it can measure on its own
//! clock: the source its downtime estimate (its pause to the destination's
//! `Resumed`, minus half the RTT), the destination its post-copy figures and
//! the integrity check.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Instant;

use crate::backend::qemu::{GuestSpec, QemuDest, QemuPaths, QemuSource, SerialLog};
use crate::connection::{self, LinkConfig};
use crate::engine::{
    DestConfig, DestReport, SourceConfig, SourceReport, run_destination, run_source,
    run_source_adaptive,
};
use crate::migration::{
    KeptSource, Leftovers, MigrationError, Planned, Planning, plan, warm_up, write_pid,
};
use crate::qemu::RunState;
use crate::report::Figures;
use crate::wire::{MigrationId, PskKey, ServerPolicy};

/// One side's guest, files and link.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// The guest (the same on both hosts).
    pub guest: GuestSpec,
    /// Directory for sockets, logs and pid files.
    pub run_dir: PathBuf,
    /// Names the RAM file (`/dev/shm/wanmig-<tag>-<role>`).
    pub tag: String,
    /// The pre-shared key both engines hold.
    pub key: PskKey,
    /// Transport tuning.
    pub link: LinkConfig,
    /// Source: attach to this running QEMU instead of starting one.
    pub attach: Option<AttachTo>,
}

/// A running QEMU to migrate, started by someone else with the preload
/// library in attach mode (`WANMIG_UFFD_SOCK=attach`,
/// `WANMIG_UFFD_MODE=wp-async`).
#[derive(Debug, Clone)]
pub struct AttachTo {
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// Its guest-RAM file (`/dev/shm/wanmig-...`, `share=on`).
    pub ram: PathBuf,
}

/// A finished migration on the destination host: the guest runs here.
#[derive(Debug)]
pub struct DestinationOutcome {
    /// What the destination measured.
    pub report: DestReport,
    /// The QEMU running the guest.
    pub dest: QemuDest,
    /// Its serial console.
    pub log: SerialLog,
    /// Its paths.
    pub paths: QemuPaths,
}

/// Starts the destination QEMU, accepts one migration on `listener`, runs
/// the destination engine. On failure QEMU is killed and its files removed
/// (the guest goes on at the source).
pub fn run_destination_host(
    spec: &HostSpec,
    listener: TcpListener,
    cfg: &DestConfig,
) -> Result<DestinationOutcome, MigrationError> {
    std::fs::create_dir_all(&spec.run_dir).map_err(crate::migration::io(format!(
        "creating {}",
        spec.run_dir.display()
    )))?;
    let paths = QemuPaths::new(&spec.run_dir, &spec.tag, "destination");
    let mut files = Leftovers::default();
    files.add(&paths.ram);
    files.add(&paths.uffd_sock);
    files.add(&spec.run_dir.join("destination.migrate"));
    let mut dest = QemuDest::start(&spec.guest, &paths, &spec.run_dir)?;
    write_pid(&spec.run_dir, "destination", dest.pid())?;
    // Any migration id; the engine checks the guest's shape itself.
    let policy = ServerPolicy {
        expect_migration_id: None,
        expect_geometry: None,
        accept_conn: None,
    };
    let deadline = Instant::now() + spec.link.accept_timeout;
    let pair =
        connection::accept_until(&listener, &policy, &spec.key, &spec.link, deadline, &|| {
            false
        })?;
    let report = run_destination(&mut dest, pair, cfg)?;
    // The guest runs here now: its RAM file stays.
    files.keep(&paths.ram);
    let mut log = SerialLog::new(&paths.serial);
    let _ = log.poll();
    Ok(DestinationOutcome {
        report,
        dest,
        log,
        paths,
    })
}

/// A finished migration on the source host.
#[derive(Debug)]
pub struct SourceOutcome {
    /// What the source measured.
    pub report: SourceReport,
    /// The planner's prediction, if a profile was used.
    pub predicted: Option<Figures>,
    /// The plan's S.
    pub s: f64,
    /// Where the plan came from.
    pub plan_origin: String,
    /// The source QEMU (paused, its guest gone to the destination).
    pub source: QemuSource,
    /// Its serial console.
    pub log: SerialLog,
}

/// Starts the guest here, waits for its checkers, plans, connects to the
/// destination engine at `to` and migrates. A failure before the commit
/// hands the running source QEMU back ([`MigrationError::SourceKept`]).
pub fn run_source_host(
    spec: &HostSpec,
    to: SocketAddr,
    planning: &Planning,
    cfg: &SourceConfig,
    warmup: (usize, usize),
) -> Result<SourceOutcome, MigrationError> {
    std::fs::create_dir_all(&spec.run_dir).map_err(crate::migration::io(format!(
        "creating {}",
        spec.run_dir.display()
    )))?;
    let mut paths = QemuPaths::new(&spec.run_dir, &spec.tag, "source");
    let mut files = Leftovers::default();
    files.add(&spec.run_dir.join("source.migrate"));
    let mut source = match &spec.attach {
        None => {
            files.add(&paths.ram);
            files.add(&paths.uffd_sock);
            QemuSource::start(&spec.guest, &paths, &spec.run_dir)?
        }
        // Its files are not ours either.
        Some(a) => {
            paths.qmp = a.qmp.clone();
            paths.ram = a.ram.clone();
            QemuSource::attach(&paths, &spec.run_dir)?
        }
    };
    write_pid(&spec.run_dir, "source", source.pid())?;
    let mut log = SerialLog::new(&paths.serial);
    let mut engines_started = false;
    let attached = spec.attach.is_some();
    let result = (|| {
        if !attached {
            // An attached guest's console is not ours to read.
            warm_up(&mut log, warmup.0, warmup.1, &paths.serial)?;
        }
        let Planned {
            order,
            predicted,
            link: _,
            s,
            origin,
            geometry,
            mut channel,
        } = plan(planning, &mut source, cfg.device_state_estimate)?;
        let pair = connection::connect(to, MigrationId::random(), geometry, &spec.key, &spec.link)?;
        engines_started = true;
        let report = match channel.as_mut() {
            Some(ch) => run_source_adaptive(&mut source, pair, &order, cfg, ch)?,
            None => run_source(&mut source, pair, &order, cfg)?,
        };
        Ok::<_, MigrationError>((report, predicted, s, origin))
    })();
    match result {
        Ok((report, predicted, s, plan_origin)) => Ok(SourceOutcome {
            report,
            predicted,
            s,
            plan_origin,
            source,
            log,
        }),
        Err(cause) => {
            let running = source.process().is_running()
                && source
                    .process()
                    .qmp()
                    .query_status()
                    .is_ok_and(|s| s.status == RunState::Running);
            if !(running && (engines_started || matches!(cause, MigrationError::Connect(_)))) {
                return Err(cause);
            }
            files.keep(&paths.ram);
            let mut kept_files = Leftovers::default();
            if !attached {
                kept_files.add(&paths.ram);
            }
            Err(MigrationError::SourceKept {
                cause: Box::new(cause),
                kept: Box::new(KeptSource {
                    source,
                    source_log: log,
                    paths,
                    files: kept_files,
                }),
            })
        }
    }
}
