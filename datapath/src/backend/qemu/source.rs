//! The QEMU source: guest RAM read through a read-only mapping of its file,
//! guest writes logged through the write-protect-async userfaultfd the preload
//! library registered, with `PAGEMAP_SCAN` on QEMU's pagemap.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wanmig_preload_proto::UffdMode;

use super::launch::{GuestSpec, QemuPaths, QemuProcess};
use super::registration::RegistrationListener;
use super::{B, PAGE_SIZE, devstate};
use crate::backend::{BackendError, PageReader, SourceBackend};
use crate::guest::SourceMemory;
use crate::qemu::RunState;
use crate::uffd::{
    DirtyBitmap, Mode, PagemapScanner, ReadSampler, RemoteAddr, RemoteRange, Userfaultfd,
    write_protect_all,
};

impl PageReader for SourceMemory {
    fn copy_page(&self, index: u64, out: &mut [u8]) -> Result<(), BackendError> {
        SourceMemory::copy_page(self, index, out);
        Ok(())
    }
}

/// A QEMU guest on the source host.
#[derive(Debug)]
pub struct QemuSource {
    process: QemuProcess,
    uffd: Userfaultfd,
    range: RemoteRange,
    scanner: PagemapScanner,
    scratch: DirtyBitmap,
    memory: Arc<SourceMemory>,
    devstate_sock: PathBuf,
    pages: u64,
    /// After `process`: the disks' servers outlive QEMU.
    disks: Option<(super::disks::DiskServers, Arc<crate::storage::SourceDisks>)>,
    /// Access sampling while profiling.
    reads: Option<ReadSampler>,
}

impl QemuSource {
    /// Starts `guest` with its RAM registered for dirty logging. On failure
    /// QEMU is killed and its RAM file and registration socket are removed.
    pub fn start(
        guest: &GuestSpec,
        paths: &QemuPaths,
        run_dir: &std::path::Path,
    ) -> Result<Self, BackendError> {
        let started = Self::start_inner(guest, paths, run_dir);
        if started.is_err() {
            let _ = std::fs::remove_file(&paths.ram);
            let _ = std::fs::remove_file(&paths.uffd_sock);
        }
        started
    }

    fn start_inner(
        guest: &GuestSpec,
        paths: &QemuPaths,
        run_dir: &std::path::Path,
    ) -> Result<Self, BackendError> {
        let len = guest.memory_bytes();
        let listener = RegistrationListener::bind(&paths.uffd_sock)
            .map_err(|e| BackendError::new(B, "registration socket", e))?;
        let _ = std::fs::remove_file(&paths.ram);
        // QEMU connects to its disks as it starts.
        let disks = super::disks::serve_source(&guest.disks, guest.chunk_size, paths)?;
        let mut process = QemuProcess::spawn(guest, paths, UffdMode::WpAsync, false)
            .map_err(|e| BackendError::new(B, "starting QEMU", e))?;
        let reg = listener
            .accept(
                &paths.ram,
                len,
                UffdMode::WpAsync,
                Duration::from_secs(60),
                || match process.exit_status() {
                    Some(s) => Err(s),
                    None => Ok(()),
                },
            )
            .map_err(|e| BackendError::new(B, "RAM registration", e))?;
        process
            .connect_qmp()
            .map_err(|e| BackendError::new(B, "QMP", e))?;
        Self::with(process, reg, len, paths, run_dir, disks)
    }

    /// Attaches to a running QEMU that someone else started (a management
    /// stack) with the preload library in attach mode
    /// (`LD_PRELOAD=libwanmig_ffi.so WANMIG_UFFD_SOCK=attach
    /// WANMIG_UFFD_MODE=wp-async`) and its guest RAM in `paths.ram`: QMP on
    /// `paths.qmp`, the userfaultfd taken with `pidfd_getfd(2)`. Dropping
    /// the backend leaves QEMU running. Guests whose disks the engine does
    /// not serve are migrated memory-only.
    pub fn attach(paths: &QemuPaths, run_dir: &std::path::Path) -> Result<Self, BackendError> {
        let mut process =
            QemuProcess::attach(paths).map_err(|e| BackendError::new(B, "attaching to QEMU", e))?;
        let status = process
            .qmp()
            .query_status()
            .map_err(|e| BackendError::new(B, "query-status", e))?;
        if status.status != crate::qemu::RunState::Running {
            return Err(BackendError::new(
                B,
                "attaching to QEMU",
                format!("its guest is {:?}, not running", status.status),
            ));
        }
        let len = std::fs::metadata(&paths.ram)
            .map_err(|e| BackendError::new(B, "guest RAM file", e))?
            .len();
        let reg = super::registration::attach_registration(
            process.pid(),
            &paths.ram,
            len,
            UffdMode::WpAsync,
        )
        .map_err(|e| BackendError::new(B, "RAM registration", e))?;
        Self::with(process, reg, len, paths, run_dir, None)
    }

    fn with(
        mut process: QemuProcess,
        reg: super::registration::Registration,
        len: u64,
        paths: &QemuPaths,
        run_dir: &std::path::Path,
        disks: Option<(super::disks::DiskServers, Arc<crate::storage::SourceDisks>)>,
    ) -> Result<Self, BackendError> {
        process
            .qmp()
            .migrate_set_capabilities(&[("x-ignore-shared", true)])
            .map_err(|e| BackendError::new(B, "x-ignore-shared", e))?;
        let range = RemoteRange::new(RemoteAddr(reg.info.base), reg.info.len);
        let scanner = PagemapScanner::open(process.pid(), range)
            .map_err(|e| BackendError::new(B, "pagemap", e))?;
        let pages = len / PAGE_SIZE as u64;
        let memory = SourceMemory::open(&paths.ram, PAGE_SIZE, pages)
            .map_err(|e| BackendError::new(B, "guest RAM", e))?;
        Ok(QemuSource {
            process,
            uffd: reg.uffd,
            range,
            scanner,
            scratch: DirtyBitmap::new(range).map_err(|e| BackendError::new(B, "bitmap", e))?,
            memory: Arc::new(memory),
            devstate_sock: run_dir.join("source.migrate"),
            pages,
            disks,
            reads: None,
        })
    }

    /// The QEMU process (QMP, serial log).
    pub fn process(&mut self) -> &mut QemuProcess {
        &mut self.process
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Lets QEMU (and the guest) run on after this handle is gone; returns
    /// its pid.
    pub fn detach(self) -> u32 {
        self.process.detach()
    }
}

impl SourceBackend for QemuSource {
    fn disks(&self) -> Option<Arc<crate::storage::SourceDisks>> {
        self.disks.as_ref().map(|(_, d)| d.clone())
    }
    fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    fn page_count(&self) -> u64 {
        self.pages
    }

    fn device_state_max(&self) -> u64 {
        64 << 20
    }

    fn memory(&self) -> Arc<dyn PageReader> {
        self.memory.clone()
    }

    fn populated_runs(&self) -> Result<Vec<(u64, u64)>, BackendError> {
        self.memory
            .populated_runs()
            .map_err(|e| BackendError::new(B, "populated ranges", e))
    }

    fn dirty_log_start(&mut self) -> Result<(), BackendError> {
        write_protect_all(&self.uffd, self.range)
            .map_err(|e| BackendError::new(B, "arming the dirty log", e))
    }

    fn dirty_log_collect(&mut self, out: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.scratch.clear();
        self.scanner
            .scan_written_and_protect(&mut self.scratch)
            .map_err(|e| BackendError::new(B, "dirty scan", e))?;
        for (first, count) in self.scratch.iter_runs() {
            out.set_range(first, count);
        }
        Ok(())
    }

    fn read_sampling_start(&mut self) -> Result<bool, BackendError> {
        if self.reads.is_some() {
            return Ok(true);
        }
        self.memory
            .release_mappings()
            .map_err(|e| BackendError::new(B, "read sampling", e))?;
        let sampler = ReadSampler::start(&self.uffd, self.process.pid(), self.range, Mode::WP)
            .map_err(|e| BackendError::new(B, "read sampling", e))?;
        self.reads = Some(sampler);
        Ok(true)
    }

    fn read_sampling_interval(
        &mut self,
        out: &mut DirtyBitmap,
        watch: &[u64],
    ) -> Result<(), BackendError> {
        let Some(s) = &mut self.reads else {
            return Ok(());
        };
        s.take_touched(|p| out.set(p));
        if watch.is_empty() {
            return Ok(());
        }
        s.begin_interval_on(watch)
            .map_err(|e| BackendError::new(B, "read sampling", e))
    }

    fn read_sampling_stop(&mut self) -> Result<(), BackendError> {
        let Some(s) = self.reads.take() else {
            return Ok(());
        };
        let stopped = s
            .stop()
            .map_err(|e| BackendError::new(B, "stopping read sampling", e));
        // Going back cleared the write protection: arm the log afresh.
        write_protect_all(&self.uffd, self.range)
            .map_err(|e| BackendError::new(B, "re-arming the dirty log", e))?;
        stopped.map(drop)
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        self.process
            .qmp()
            .stop()
            .map_err(|e| BackendError::new(B, "stop", e))
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        let qmp = self.process.qmp();
        qmp.cont().map_err(|e| BackendError::new(B, "cont", e))?;
        // `cont` can return before a stopped migration lets the guest go:
        // check that it runs.
        let status = qmp
            .query_status()
            .map_err(|e| BackendError::new(B, "query-status after cont", e))?;
        if status.status != RunState::Running {
            return Err(BackendError::new(
                B,
                "resuming the guest",
                format!("QEMU is {:?} after cont", status.status),
            ));
        }
        Ok(())
    }

    fn save_device_state(
        &mut self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), BackendError>,
    ) -> Result<u64, BackendError> {
        let sock = self.devstate_sock.clone();
        devstate::save(
            self.process.qmp(),
            &sock,
            devstate::DOWNTIME_STEP_TIMEOUT,
            sink,
        )
    }
}
