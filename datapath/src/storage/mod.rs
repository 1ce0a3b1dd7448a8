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

mod chunk_log;
mod postcopy_image;
mod presence;

pub use chunk_log::{ChunkCounts, ChunkLog};
pub use postcopy_image::{ChunkFetcher, PostcopyImage, PostcopyImageError, StorageCounters};
pub use presence::{BLOCK, BlockPresence, BlockState, PresenceError};

/// Default chunk size: the unit of transfer and profiling for disks.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;
