//! The source's record of what the guest does to a disk, per chunk: which
//! chunks it dirtied since the last look (the storage dirty log for
//! pre-copy rounds), and what it did to each in the current profiling
//! interval (reads, writes, whole-block overwrites: the profile's `r`, `w`
//! and `o`, see `model.md`).
//!
//! An interval's writes to a chunk count as whole-block overwrites when
//! every one of them covered whole 4 KiB blocks and no read of the chunk
//! came before them in the interval: in post-copy such writes need no fetch
//! (presence is per 4 KiB block). The test is per chunk, not per block, so
//! it errs towards fetching (a read of one block before an overwrite of
//! another spoils the interval); it never claims an overwrite that would
//! have fetched.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::bits::AtomicBitmap;

use crate::nbd::{Access, RequestLog};
use crate::storage::BLOCK;

/// Interval flag: the chunk was read.
const READ: u8 = 1;
/// Interval flag: the chunk was written (written, zeroed or trimmed).
const WRITTEN: u8 = 2;
/// Interval flag: some write was partial (not whole 4 KiB blocks) or came
/// after a read of the chunk.
const FETCHING: u8 = 4;

/// Per-chunk dirty bits and interval flags of one disk, fed by its NBD
/// export.
#[derive(Debug)]
pub struct ChunkLog {
    chunk_size: u64,
    size: u64,
    dirty: AtomicBitmap,
    interval: Vec<AtomicU8>,
}

/// What the guest did to a chunk in one profiling interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkInterval {
    /// At least one read.
    pub read: bool,
    /// At least one write, zero or trim.
    pub written: bool,
    /// Written, and every write covered whole 4 KiB blocks with no read of
    /// the chunk before it (see the module docs).
    pub overwritten: bool,
}

impl ChunkLog {
    /// A log for a disk of `size` bytes in chunks of `chunk_size`.
    pub fn new(size: u64, chunk_size: u64) -> Self {
        assert!(chunk_size > 0, "chunk size must be positive");
        let chunks = size.div_ceil(chunk_size) as usize;
        ChunkLog {
            chunk_size,
            size,
            dirty: AtomicBitmap::new(chunks as u64),
            interval: (0..chunks).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.interval.len() as u64
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Marks every chunk dirty (before the first round: everything is to
    /// be sent).
    pub fn mark_all_dirty(&self) {
        self.dirty.set_all();
    }

    /// The chunks dirtied since the last call, in order; their bits are
    /// cleared.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.dirty.take(|c| out.push(c));
        out
    }

    /// Ends the current interval: calls `each(chunk, what)` for every chunk
    /// touched in it, in order, and starts the next.
    pub fn take_interval(&self, mut each: impl FnMut(u64, ChunkInterval)) {
        for (c, f) in self.interval.iter().enumerate() {
            // A load first: most chunks are untouched, and a swap of each
            // would dirty every cache line of the table.
            if f.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let f = f.swap(0, Ordering::Relaxed);
            each(
                c as u64,
                ChunkInterval {
                    read: f & READ != 0,
                    written: f & WRITTEN != 0,
                    overwritten: f & WRITTEN != 0 && f & FETCHING == 0,
                },
            );
        }
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
            let flags = &self.interval[i];
            match access {
                Access::Read => {
                    flags.fetch_or(READ, Ordering::Relaxed);
                }
                Access::Write | Access::Trim | Access::WriteZeroes => {
                    // This request's part of the chunk.
                    let from = offset.max(c * self.chunk_size);
                    let to = end.min((c + 1) * self.chunk_size);
                    let whole_blocks = from % BLOCK == 0 && (to % BLOCK == 0 || to == self.size);
                    let before = flags.fetch_or(WRITTEN, Ordering::Relaxed);
                    if !whole_blocks || before & READ != 0 {
                        flags.fetch_or(FETCHING, Ordering::Relaxed);
                    }
                    self.dirty.set(c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(log: &ChunkLog) -> Vec<(u64, ChunkInterval)> {
        let mut v = Vec::new();
        log.take_interval(|c, i| v.push((c, i)));
        v
    }

    const R: ChunkInterval = ChunkInterval {
        read: true,
        written: false,
        overwritten: false,
    };
    const W: ChunkInterval = ChunkInterval {
        read: false,
        written: true,
        overwritten: false,
    };
    const O: ChunkInterval = ChunkInterval {
        read: false,
        written: true,
        overwritten: true,
    };

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
    }

    #[test]
    fn an_interval_says_read_written_and_whole_block_overwritten() {
        let log = ChunkLog::new(8 * 65536 + 100, 65536);
        log.record(Access::Read, 0, 4096); // 0: read only
        log.record(Access::Write, 65536 + 512, 4096); // 1: unaligned
        log.record(Access::Write, 2 * 65536 + 8192, 4096); // 2: one whole block
        log.record(Access::Read, 3 * 65536, 512); // 3: read, then a whole block
        log.record(Access::Write, 3 * 65536 + 4096, 4096);
        log.record(Access::Write, 4 * 65536, 4096); // 4: a whole block, then a read
        log.record(Access::Read, 4 * 65536, 4096);
        log.record(Access::Write, 5 * 65536, 4096); // 5: whole, then partial
        log.record(Access::Write, 5 * 65536 + 4096, 10);
        // 6 and 7: one aligned write across both.
        log.record(Access::WriteZeroes, 6 * 65536 + 61440, 8192);
        log.record(Access::Trim, 8 * 65536, 100); // the short last chunk, whole
        let both = ChunkInterval { read: true, ..O };
        assert_eq!(
            interval(&log),
            vec![
                (0, R),
                (1, W),
                (2, O),
                (3, ChunkInterval { read: true, ..W }),
                (4, both),
                (5, W),
                (6, O),
                (7, O),
                (8, O),
            ]
        );
        assert!(interval(&log).is_empty(), "a new interval starts empty");
        log.record(Access::Write, 2 * 65536, 65536);
        assert_eq!(interval(&log), vec![(2, O)]);
    }

    #[test]
    fn all_dirty_means_every_chunk_and_no_more() {
        let log = ChunkLog::new(130 * 4096, 4096);
        log.mark_all_dirty();
        assert_eq!(log.take_dirty(), (0..130).collect::<Vec<_>>());
    }
}
