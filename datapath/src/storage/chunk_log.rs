//! The source's record of what the guest does to a disk, per chunk: which
//! chunks it dirtied since the last look (the storage dirty log for
//! pre-copy rounds), and how often it read and wrote each (the profile).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::nbd::{Access, RequestLog};

/// Per-chunk dirty bits and access counts of one disk, fed by its NBD
/// export.
#[derive(Debug)]
pub struct ChunkLog {
    chunk_size: u64,
    size: u64,
    dirty: Vec<AtomicU64>,
    reads: Vec<AtomicU32>,
    writes: Vec<AtomicU32>,
    whole_overwrites: Vec<AtomicU32>,
}

/// A chunk's access counts since the last [`ChunkLog::take_counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkCounts {
    /// Read requests touching the chunk.
    pub reads: u32,
    /// Write, zero and trim requests touching the chunk.
    pub writes: u32,
    /// Of those, requests that covered the whole chunk.
    pub whole_overwrites: u32,
}

impl ChunkLog {
    /// A log for a disk of `size` bytes in chunks of `chunk_size`.
    pub fn new(size: u64, chunk_size: u64) -> Self {
        assert!(chunk_size > 0, "chunk size must be positive");
        let chunks = size.div_ceil(chunk_size) as usize;
        let counters = || (0..chunks).map(|_| AtomicU32::new(0)).collect();
        ChunkLog {
            chunk_size,
            size,
            dirty: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            reads: counters(),
            writes: counters(),
            whole_overwrites: counters(),
        }
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.reads.len() as u64
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Marks every chunk dirty (before the first round: everything is to
    /// be sent).
    pub fn mark_all_dirty(&self) {
        let n = self.chunks();
        for (i, w) in self.dirty.iter().enumerate() {
            let bits = (n - i as u64 * 64).min(64);
            w.store(
                if bits == 64 {
                    u64::MAX
                } else {
                    (1 << bits) - 1
                },
                Ordering::Release,
            );
        }
    }

    /// The chunks dirtied since the last call, in order; their bits are
    /// cleared.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.dirty.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(i as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Each chunk's counts since the last call (reset).
    pub fn take_counts(&self) -> Vec<ChunkCounts> {
        (0..self.reads.len())
            .map(|c| ChunkCounts {
                reads: self.reads[c].swap(0, Ordering::Relaxed),
                writes: self.writes[c].swap(0, Ordering::Relaxed),
                whole_overwrites: self.whole_overwrites[c].swap(0, Ordering::Relaxed),
            })
            .collect()
    }
}

impl RequestLog for ChunkLog {
    fn record(&self, access: Access, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        let first = offset / self.chunk_size;
        let last = (end - 1) / self.chunk_size;
        for c in first..=last {
            let i = c as usize;
            match access {
                Access::Read => {
                    self.reads[i].fetch_add(1, Ordering::Relaxed);
                }
                Access::Write | Access::Trim | Access::WriteZeroes => {
                    self.writes[i].fetch_add(1, Ordering::Relaxed);
                    let whole = offset <= c * self.chunk_size
                        && end >= ((c + 1) * self.chunk_size).min(self.size);
                    if whole {
                        self.whole_overwrites[i].fetch_add(1, Ordering::Relaxed);
                    }
                    self.dirty[i / 64].fetch_or(1 << (i % 64), Ordering::AcqRel);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_dirty_the_chunks_they_touch_and_reads_do_not() {
        let log = ChunkLog::new(10 * 65536 + 100, 65536);
        assert_eq!(log.chunks(), 11);
        log.record(Access::Read, 0, 4096);
        log.record(Access::Write, 65535, 2); // chunks 0 and 1
        log.record(Access::WriteZeroes, 3 * 65536, 65536); // whole chunk 3
        log.record(Access::Trim, 10 * 65536, 100); // the short last chunk, whole
        assert_eq!(log.take_dirty(), vec![0, 1, 3, 10]);
        assert!(log.take_dirty().is_empty(), "taken");
        let c = log.take_counts();
        assert_eq!(
            c[0],
            ChunkCounts {
                reads: 1,
                writes: 1,
                whole_overwrites: 0
            }
        );
        assert_eq!(c[3].whole_overwrites, 1);
        assert_eq!(c[10].whole_overwrites, 1);
        assert_eq!(log.take_counts()[0], ChunkCounts::default());
    }

    #[test]
    fn all_dirty_means_every_chunk_and_no_more() {
        let log = ChunkLog::new(130 * 4096, 4096);
        log.mark_all_dirty();
        assert_eq!(log.take_dirty(), (0..130).collect::<Vec<_>>());
    }
}
