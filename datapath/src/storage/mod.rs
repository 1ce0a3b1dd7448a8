//! Guest disks during a migration, on both sides of it.
//!
//! - Source: the disk's NBD export feeds a [`ChunkLog`]: the chunks the guest
//!   dirtied since the last pre-copy round, and per-chunk read and write
//!   counts for the profile.
//! - Destination: a [`PostcopyImage`] is the export QEMU reads and writes
//!   after the resume. Presence is tracked per 4 KiB block
//!   ([`BlockPresence`], durable across an engine restart); chunks (64 KiB
//!   by default) stay the unit of transfer and profiling. Reads of absent
//!   data fetch it on demand; a write that covers whole absent blocks needs
//!   no fetch for them; a partial write to an absent block fetches it first.
//! - Both: a guest's disks form one chunk index space ([`ChunkSpace`]), disk
//!   after disk, as the wire protocol's chunk units see them.

mod chunk_log;
mod disk_set;
mod disks;
mod postcopy_image;
mod presence;

pub use chunk_log::{ChunkInterval, ChunkLog};
pub use disk_set::{ChunkAddr, ChunkReader, ChunkSpace};
pub use disks::{ChunkRequests, DestDisks, DiskFetcher, SourceDisks};
pub use postcopy_image::{ChunkFetcher, PostcopyImage, PostcopyImageError, StorageCounters};
pub use presence::{BLOCK, BlockPresence, BlockState, PresenceError};

/// Default chunk size: the unit of transfer and profiling for disks.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;

/// CRC32 of chunk `chunk` (of `chunk_size` bytes; the last one may be
/// shorter) of `dev`: the end-to-end integrity digest of a chunk.
pub fn chunk_digest(
    dev: &dyn crate::nbd::BlockDevice,
    chunk: u64,
    chunk_size: u64,
) -> Result<u32, crate::nbd::DeviceError> {
    let from = chunk * chunk_size;
    let to = (from + chunk_size).min(dev.size());
    let mut buf = vec![0u8; to.saturating_sub(from) as usize];
    dev.read_at(from, &mut buf)?;
    Ok(crc32fast::hash(&buf))
}
