//! A QEMU guest's disks: each one a virtio-blk device whose backend is an
//! NBD export served by the engine (see [`crate::nbd`]), started before QEMU
//! connects to it.
//!
//! - Source: the raw image (given, or a new sparse one), its requests heard
//!   by a [`ChunkLog`] (the dirty-chunk log for pre-copy rounds).
//! - Destination: a [`PostcopyImage`] per disk; reads of absent data become
//!   chunk requests, queued until the engine's fault connection is up.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::launch::{DiskSpec, QemuPaths};
use crate::backend::BackendError;
use crate::nbd::{BlockDevice, Export, FileImage, NbdServer};
use crate::storage::{
    ChunkLog, ChunkRequests, ChunkSpace, DestDisks, DiskFetcher, PostcopyImage, SourceDisks,
};

const B: &str = "qemu disks";

/// How long a guest read waits for a chunk from the source before it fails.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// The engine's NBD servers of one QEMU's disks (stopped when dropped: drop
/// QEMU first).
#[derive(Debug, Default)]
pub struct DiskServers {
    /// Held to be dropped (stopped) with the backend.
    _servers: Vec<NbdServer>,
}

fn export(i: usize, device: Arc<dyn BlockDevice>, log: Option<Arc<ChunkLog>>) -> Export {
    Export {
        name: format!("disk{i}"),
        device,
        log: log.map(|l| l as Arc<dyn crate::nbd::RequestLog>),
    }
}

fn serve(paths: &QemuPaths, i: usize, e: Export) -> Result<NbdServer, BackendError> {
    NbdServer::start(&paths.disk_socket(i), e).map_err(|e| BackendError::new(B, "NBD server", e))
}

fn check_chunk_size(chunk_size: u64) -> Result<(), BackendError> {
    use crate::wire::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
    let (min, max) = (u64::from(MIN_CHUNK_SIZE), u64::from(MAX_CHUNK_SIZE));
    if !chunk_size.is_power_of_two() || !(min..=max).contains(&chunk_size) {
        return Err(BackendError::new(
            B,
            "chunk size",
            format!("{chunk_size} bytes is not a power of two in {min}..={max}"),
        ));
    }
    Ok(())
}

fn check_size(d: &DiskSpec) -> Result<(), BackendError> {
    if d.size == 0 || d.size % 4096 != 0 {
        return Err(BackendError::new(
            B,
            "disk size",
            format!("{} bytes is not a positive multiple of 4096", d.size),
        ));
    }
    Ok(())
}

/// Serves the source's disks; the images are opened (or created sparse).
pub fn serve_source(
    disks: &[DiskSpec],
    chunk_size: u64,
    paths: &QemuPaths,
) -> Result<Option<(DiskServers, Arc<SourceDisks>)>, BackendError> {
    if disks.is_empty() {
        return Ok(None);
    }
    check_chunk_size(chunk_size)?;
    let mut servers = Vec::new();
    let mut devices: Vec<Arc<dyn BlockDevice>> = Vec::new();
    let mut logs = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        check_size(d)?;
        let path = match &d.image {
            Some(p) => p.clone(),
            None => {
                let p = paths.disk_image(i);
                create_sparse(&p, d.size)?;
                p
            }
        };
        let image = FileImage::open(&path, false).map_err(|e| {
            BackendError::new(
                B,
                "opening a disk image",
                format!("{}: {e}", path.display()),
            )
        })?;
        if image.size() != d.size {
            return Err(BackendError::new(
                B,
                "disk image size",
                format!(
                    "disk {i}: {} holds {} bytes, {} expected",
                    path.display(),
                    image.size(),
                    d.size
                ),
            ));
        }
        let device: Arc<dyn BlockDevice> = Arc::new(image);
        let log = Arc::new(ChunkLog::new(d.size, chunk_size));
        servers.push(serve(
            paths,
            i,
            export(i, device.clone(), Some(log.clone())),
        )?);
        devices.push(device);
        logs.push(log);
    }
    Ok(Some((
        DiskServers { _servers: servers },
        Arc::new(SourceDisks::new(chunk_size, devices, logs)),
    )))
}

/// Serves the destination's disks: new post-copy images, every block absent.
pub fn serve_destination(
    disks: &[DiskSpec],
    chunk_size: u64,
    paths: &QemuPaths,
) -> Result<Option<(DiskServers, Arc<DestDisks>)>, BackendError> {
    if disks.is_empty() {
        return Ok(None);
    }
    check_chunk_size(chunk_size)?;
    let space = ChunkSpace::new(chunk_size, disks.iter().map(|d| d.size).collect());
    let requests = Arc::new(ChunkRequests::default());
    let mut servers = Vec::new();
    let mut images = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        check_size(d)?;
        let image = Arc::new(
            PostcopyImage::create(
                &paths.disk_image(i),
                &paths.disk_presence(i),
                d.size,
                chunk_size,
                Arc::new(DiskFetcher::new(requests.clone(), space.global(i, 0))),
                FETCH_TIMEOUT,
            )
            .map_err(|e| BackendError::new(B, "destination disk image", e))?,
        );
        servers.push(serve(paths, i, export(i, image.clone(), None))?);
        images.push(image);
    }
    Ok(Some((
        DiskServers { _servers: servers },
        Arc::new(DestDisks::new(images, requests)),
    )))
}

fn create_sparse(p: &Path, size: u64) -> Result<(), BackendError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .map_err(|e| {
            BackendError::new(B, "creating a disk image", format!("{}: {e}", p.display()))
        })?;
    f.set_len(size)
        .map_err(|e| BackendError::new(B, "sizing a disk image", format!("{}: {e}", p.display())))
}
