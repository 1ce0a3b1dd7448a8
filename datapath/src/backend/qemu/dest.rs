//! The QEMU destination: guest RAM in a sparse file the engine fills with
//! `pwrite` before the resume and with `UFFDIO_COPY` after it; post-copy
//! faults arrive on the missing-page userfaultfd; guest writes after the
//! resume are tracked on the same registration (write-protect async) so the
//! integrity check can skip the pages the guest changed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wanmig_preload_proto::UffdMode;

use super::launch::{GuestSpec, QemuPaths, QemuProcess};
use super::registration::RegistrationListener;
use super::{B, PAGE_SIZE, devstate};
use crate::backend::{BackendError, DestBackend, Install, PageInstaller};
use crate::guest::DestMemory;
use crate::uffd::{
    CopyFlags, DirtyBitmap, Event, PagemapScanner, RemoteAddr, RemoteRange, Userfaultfd,
    write_protect_all,
};

/// Installs pages into QEMU's guest RAM through its userfaultfd.
#[derive(Debug)]
pub struct UffdInstaller {
    uffd: Userfaultfd,
    range: RemoteRange,
    zero: Vec<u8>,
    pages: u64,
}

impl UffdInstaller {
    fn addr(&self, index: u64) -> Result<RemoteAddr, BackendError> {
        if index >= self.pages {
            return Err(BackendError::new(
                B,
                "install",
                format!("page {index} out of {}", self.pages),
            ));
        }
        Ok(RemoteAddr(self.range.start.0 + index * PAGE_SIZE as u64))
    }

    fn copy(&self, index: u64, data: &[u8]) -> Result<Install, BackendError> {
        let addr = self.addr(index)?;
        // Write-protected, so the page counts as written only when the guest
        // writes it (the integrity check relies on that).
        let flags = CopyFlags {
            dontwake: false,
            wp: true,
        };
        let outcome = self
            .uffd
            .copy(addr, data, flags)
            .map_err(|e| BackendError::new(B, "UFFDIO_COPY", e))?;
        if outcome.lost_race() {
            self.wake(index)?;
            Ok(Install::AlreadyPresent)
        } else {
            Ok(Install::Installed)
        }
    }
}

impl PageInstaller for UffdInstaller {
    fn wait_faults(&self, timeout: Duration, out: &mut Vec<u64>) -> Result<(), BackendError> {
        if !self
            .uffd
            .poll_readable(Some(timeout))
            .map_err(|e| BackendError::new(B, "poll userfaultfd", e))?
        {
            return Ok(());
        }
        let mut events = Vec::new();
        self.uffd
            .read_events(&mut events)
            .map_err(|e| BackendError::new(B, "read userfaultfd", e))?;
        for ev in events {
            if let Event::Pagefault { addr, .. } = ev {
                if self.range.contains(addr) {
                    out.push((addr.0 - self.range.start.0) / PAGE_SIZE as u64);
                }
            }
        }
        Ok(())
    }

    fn install(&self, index: u64, data: &[u8]) -> Result<Install, BackendError> {
        self.copy(index, data)
    }

    fn install_run(&self, first: u64, data: &[u8]) -> Result<u64, BackendError> {
        let count = (data.len() / PAGE_SIZE) as u64;
        if count == 0 {
            return Ok(0);
        }
        let addr = self.addr(first)?;
        self.addr(first + count - 1)?;
        let flags = CopyFlags {
            dontwake: false,
            wp: true,
        };
        let outcome = self
            .uffd
            .copy(addr, data, flags)
            .map_err(|e| BackendError::new(B, "UFFDIO_COPY", e))?;
        if outcome.lost_race() {
            self.uffd
                .wake(RemoteRange::new(addr, count * PAGE_SIZE as u64))
                .map_err(|e| BackendError::new(B, "UFFDIO_WAKE", e))?;
        }
        Ok(outcome.installed / PAGE_SIZE as u64)
    }

    fn install_zero(&self, index: u64) -> Result<Install, BackendError> {
        // Not UFFDIO_ZEROPAGE: a zero page installed that way counts as
        // written by the guest.
        self.copy(index, &self.zero)
    }

    fn wake(&self, index: u64) -> Result<(), BackendError> {
        let addr = self.addr(index)?;
        self.uffd
            .wake(RemoteRange::new(addr, PAGE_SIZE as u64))
            .map_err(|e| BackendError::new(B, "UFFDIO_WAKE", e))
    }
}

/// A QEMU guest arriving on the destination host.
#[derive(Debug)]
pub struct QemuDest {
    process: QemuProcess,
    memory: DestMemory,
    installer: Arc<UffdInstaller>,
    devstate_sock: PathBuf,
    pages: u64,
    /// After `process`: the disks' servers outlive QEMU.
    disks: Option<(super::disks::DiskServers, Arc<crate::storage::DestDisks>)>,
}

impl QemuDest {
    /// Starts `guest` waiting for an incoming migration, its RAM file empty
    /// and registered for missing-page faults and write tracking. On failure
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
        let pages = len / PAGE_SIZE as u64;
        let _ = std::fs::remove_file(&paths.ram);
        let memory = DestMemory::create(&paths.ram, PAGE_SIZE, pages)
            .map_err(|e| BackendError::new(B, "guest RAM file", e))?;
        let listener = RegistrationListener::bind(&paths.uffd_sock)
            .map_err(|e| BackendError::new(B, "registration socket", e))?;
        let mode = UffdMode::MissingWpAsync;
        // QEMU connects to its disks as it starts.
        let disks = super::disks::serve_destination(&guest.disks, guest.chunk_size, paths)?;
        let mut process = QemuProcess::spawn(guest, paths, mode, true)
            .map_err(|e| BackendError::new(B, "starting QEMU", e))?;
        let reg = listener
            .accept(
                &paths.ram,
                len,
                mode,
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
        process
            .qmp()
            .migrate_set_capabilities(&[("x-ignore-shared", true)])
            .map_err(|e| BackendError::new(B, "x-ignore-shared", e))?;
        let range = RemoteRange::new(RemoteAddr(reg.info.base), reg.info.len);
        Ok(QemuDest {
            process,
            memory,
            installer: Arc::new(UffdInstaller {
                uffd: reg.uffd,
                range,
                zero: vec![0; PAGE_SIZE],
                pages,
            }),
            devstate_sock: run_dir.join("destination.migrate"),
            pages,
            disks,
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
    /// its pid. Its disks' NBD servers stop with this process: detach only
    /// a guest without disks.
    pub fn detach(self) -> u32 {
        self.process.detach()
    }

    /// True if the guest has disks (served by this process).
    pub fn has_disks(&self) -> bool {
        self.disks.is_some()
    }

    fn scan_written(&self, out: &mut DirtyBitmap) -> Result<(), BackendError> {
        let range = self.installer.range;
        let mut scanner = PagemapScanner::open(self.process_pid(), range)
            .map_err(|e| BackendError::new(B, "pagemap", e))?;
        let mut local = DirtyBitmap::new(range).map_err(|e| BackendError::new(B, "bitmap", e))?;
        scanner
            .scan_written(&mut local)
            .map_err(|e| BackendError::new(B, "written-page scan", e))?;
        for (first, count) in local.iter_runs() {
            out.set_range(first, count);
        }
        Ok(())
    }

    fn process_pid(&self) -> u32 {
        self.process.pid()
    }
}

impl DestBackend for QemuDest {
    fn disks(&self) -> Option<Arc<crate::storage::DestDisks>> {
        self.disks.as_ref().map(|(_, d)| d.clone())
    }
    fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    fn page_count(&self) -> u64 {
        self.pages
    }

    fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), BackendError> {
        self.memory
            .write_page(index, data)
            .map_err(|e| BackendError::new(B, "write page", e))
    }

    fn discard_page(&mut self, index: u64) -> Result<(), BackendError> {
        self.discard_pages(index, 1)
    }

    fn discard_pages(&mut self, first: u64, count: u64) -> Result<(), BackendError> {
        // One hole for the run (a hole per page costs a syscall and a TLB
        // shootdown each, while the guest is paused).
        self.memory
            .punch(first, count)
            .map_err(|e| BackendError::new(B, "discard page", e))
    }

    fn installer(&self) -> Arc<dyn PageInstaller> {
        self.installer.clone()
    }

    fn track_writes(&mut self) -> Result<(), BackendError> {
        write_protect_all(&self.installer.uffd, self.installer.range)
            .map_err(|e| BackendError::new(B, "arming write tracking", e))
    }

    fn load_device_state(&mut self, state: &[u8]) -> Result<(), BackendError> {
        let sock = self.devstate_sock.clone();
        devstate::load(
            self.process.qmp(),
            &sock,
            state,
            devstate::DOWNTIME_STEP_TIMEOUT,
        )
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        self.process
            .qmp()
            .cont()
            .map_err(|e| BackendError::new(B, "cont", e))
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        let qmp = self.process.qmp();
        // A vCPU blocked on a page that never comes keeps QEMU from
        // completing `stop`: do not wait for it long.
        qmp.set_command_timeout(Duration::from_secs(5));
        let stopped = qmp.stop().map_err(|e| BackendError::new(B, "stop", e));
        qmp.set_command_timeout(crate::qemu::qmp::DEFAULT_COMMAND_TIMEOUT);
        stopped
    }

    fn written_pages(&mut self, out: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.scan_written(out)
    }

    fn read_page(&self, index: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.memory
            .read_page(index, out)
            .map_err(|e| BackendError::new(B, "read page", e))
    }

    fn release(&mut self) -> Result<(), BackendError> {
        self.installer
            .uffd
            .unregister(self.installer.range)
            .map_err(|e| BackendError::new(B, "releasing guest RAM", e))
    }
}
