//! The disk checker: the page checker's tags on the 4 KiB blocks of a disk.
//!
//! Every block of its region (from the start of the disk) is written with
//! the page format of [`crate::page`] (run id, block index, generation,
//! checksum) using `O_DIRECT`, so every read really reaches the disk, never
//! the guest's page cache. Blocks are rewritten at one rate and the whole
//! region is verified at another, as for RAM. With `split`, each block is
//! written as two direct writes cut at a random 512-byte boundary, so the
//! disk sees writes that cover only part of a 4 KiB block (a post-copy disk
//! must fetch and merge them) and a lost byte on either side of the cut is
//! caught by the checksum.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use crate::checker::{PageError, Pattern, Stats, next_write};
use crate::page::{PAGE_SIZE, Page, Verdict, splitmix64, verify};

/// Reads and writes whole blocks; the checker's view of a disk.
pub trait BlockIo {
    /// Reads block `i`.
    fn read_block(&mut self, i: u64, out: &mut Page) -> std::io::Result<()>;
    /// Writes `data` (a range of block `i`'s bytes) at byte `at` of block `i`.
    fn write_part(&mut self, i: u64, at: usize, data: &[u8]) -> std::io::Result<()>;
}

/// A block device (or file) opened with `O_DIRECT`.
#[derive(Debug)]
pub struct DirectDisk(File);

impl DirectDisk {
    /// Opens `path` for direct I/O.
    pub fn open(path: &str) -> std::io::Result<Self> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map(DirectDisk)
    }
}

impl BlockIo for DirectDisk {
    fn read_block(&mut self, i: u64, out: &mut Page) -> std::io::Result<()> {
        // Page is 4096-aligned: a valid O_DIRECT buffer.
        let bytes: &mut [u8; PAGE_SIZE] = bytemuck_page_mut(out);
        self.0.read_exact_at(bytes, i * PAGE_SIZE as u64)
    }

    fn write_part(&mut self, i: u64, at: usize, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all_at(data, i * PAGE_SIZE as u64 + at as u64)
    }
}

fn bytemuck_page_mut(p: &mut Page) -> &mut [u8; PAGE_SIZE] {
    // SAFETY: Page is `repr(C)` over `[u64; 512]`: 4096 initialised bytes
    // with no padding, and u8 has no alignment or validity requirement.
    unsafe { &mut *(p as *mut Page).cast::<[u8; PAGE_SIZE]>() }
}

fn page_bytes(p: &Page) -> &[u8; PAGE_SIZE] {
    // SAFETY: as in bytemuck_page_mut, read-only.
    unsafe { &*(p as *const Page).cast::<[u8; PAGE_SIZE]>() }
}

/// The disk checker's state.
#[derive(Debug)]
pub struct DiskChecker<D: BlockIo> {
    io: D,
    run: u64,
    gens: Vec<u64>,
    wss: usize,
    pattern: Pattern,
    split: bool,
    blind: bool,
    wcur: usize,
    rcur: usize,
    rng: u64,
    buf: Box<Page>,
    stats: Stats,
}

/// A block could not be read or written at all.
#[derive(Debug)]
pub struct IoFailure {
    /// The block.
    pub block: usize,
    /// The error.
    pub error: std::io::Error,
}

impl std::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "block {}: {}", self.block, self.error)
    }
}

impl<D: BlockIo> DiskChecker<D> {
    /// Writes every block of the region (generation 1).
    pub fn new(
        io: D,
        run: u64,
        blocks: usize,
        wss: usize,
        pattern: Pattern,
        split: bool,
    ) -> Result<Self, IoFailure> {
        let mut c = DiskChecker {
            io,
            run,
            gens: vec![0; blocks],
            wss: wss.clamp(1, blocks.max(1)),
            pattern,
            split,
            blind: false,
            wcur: 0,
            rcur: 0,
            rng: splitmix64(run ^ 0xd15c) | 1,
            buf: Box::new(Page::ZERO),
            stats: Stats::default(),
        };
        for i in 0..blocks {
            c.rewrite(i)?;
        }
        c.stats = Stats {
            max_gen: 1,
            ..Stats::default()
        };
        Ok(c)
    }

    /// Rewrites without reading the block first (the sweep still verifies
    /// every block): the disk sees writes of whole blocks it was not asked
    /// to read.
    pub fn blind_writes(mut self, blind: bool) -> Self {
        self.blind = blind;
        self
    }

    /// Blocks in the region.
    pub fn len(&self) -> usize {
        self.gens.len()
    }

    /// True for an empty region.
    pub fn is_empty(&self) -> bool {
        self.gens.is_empty()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn rewrite(&mut self, i: usize) -> Result<(), IoFailure> {
        let g = self.gens[i] + 1;
        self.buf.fill(self.run, i as u64, g);
        let fail = |error| IoFailure { block: i, error };
        let bytes = page_bytes(&self.buf);
        if self.split {
            self.rng = splitmix64(self.rng);
            let cut = 512 * (1 + (self.rng % 7) as usize);
            self.io
                .write_part(i as u64, 0, &bytes[..cut])
                .map_err(fail)?;
            self.io
                .write_part(i as u64, cut, &bytes[cut..])
                .map_err(|error| IoFailure { block: i, error })?;
        } else {
            self.io.write_part(i as u64, 0, bytes).map_err(fail)?;
        }
        self.gens[i] = g;
        self.stats.written += 1;
        self.stats.max_gen = self.stats.max_gen.max(g);
        Ok(())
    }

    fn check(&mut self, i: usize) -> Result<Option<PageError>, IoFailure> {
        self.io
            .read_block(i as u64, &mut self.buf)
            .map_err(|error| IoFailure { block: i, error })?;
        let expected_gen = self.gens[i];
        Ok(match verify(&self.buf, self.run, i as u64, expected_gen) {
            Verdict::Ok => None,
            found => {
                self.stats.errors += 1;
                Some(PageError {
                    page: i,
                    expected_gen,
                    found,
                })
            }
        })
    }

    /// Verifies, then rewrites, the next block of the write pattern.
    pub fn write_one(&mut self) -> Result<Option<PageError>, IoFailure> {
        let i = next_write(self.pattern, &mut self.wcur, &mut self.rng, self.wss);
        let err = if self.blind { None } else { self.check(i)? };
        self.rewrite(i)?;
        Ok(err)
    }

    /// Verifies the next block of the sweep (a bad one is reported once and
    /// rewritten).
    pub fn verify_one(&mut self) -> Result<Option<PageError>, IoFailure> {
        let i = self.rcur;
        self.rcur = if i + 1 >= self.gens.len() { 0 } else { i + 1 };
        self.stats.verified += 1;
        let err = self.check(i)?;
        if err.is_some() {
            self.rewrite(i)?;
        }
        Ok(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk in memory that logs every write's (offset in block, length).
    struct MemDisk {
        bytes: Vec<u8>,
        writes: Vec<(usize, usize)>,
    }

    impl BlockIo for MemDisk {
        fn read_block(&mut self, i: u64, out: &mut Page) -> std::io::Result<()> {
            let at = i as usize * PAGE_SIZE;
            bytemuck_page_mut(out).copy_from_slice(&self.bytes[at..at + PAGE_SIZE]);
            Ok(())
        }
        fn write_part(&mut self, i: u64, at: usize, data: &[u8]) -> std::io::Result<()> {
            let off = i as usize * PAGE_SIZE + at;
            self.bytes[off..off + data.len()].copy_from_slice(data);
            self.writes.push((at, data.len()));
            Ok(())
        }
    }

    fn disk(blocks: usize) -> MemDisk {
        MemDisk {
            bytes: vec![0; blocks * PAGE_SIZE],
            writes: Vec::new(),
        }
    }

    #[test]
    fn a_clean_disk_verifies_and_a_lost_half_block_is_caught() {
        let mut c = DiskChecker::new(disk(8), 42, 8, 8, Pattern::Seq, true).unwrap();
        for _ in 0..16 {
            assert!(c.write_one().unwrap().is_none());
            assert!(c.verify_one().unwrap().is_none());
        }
        // Every write was split at a 512-byte boundary inside the block.
        assert!(
            c.io.writes
                .iter()
                .all(|&(at, len)| at % 512 == 0 && len % 512 == 0 && len < PAGE_SIZE)
        );
        // The second part of block 3's last write lost: stale bytes there.
        let b = 3 * PAGE_SIZE;
        c.io.bytes[b + 3584..b + PAGE_SIZE].fill(0xaa);
        let errors: Vec<_> = (0..8).filter_map(|_| c.verify_one().unwrap()).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].page, 3);
        assert_eq!(c.stats().errors, 1);
    }

    #[test]
    fn whole_block_writes_are_single_aligned_writes() {
        let mut c = DiskChecker::new(disk(4), 7, 4, 2, Pattern::Rand, false).unwrap();
        for _ in 0..10 {
            assert!(c.write_one().unwrap().is_none());
        }
        assert!(c.io.writes.iter().all(|&w| w == (0, PAGE_SIZE)));
        assert_eq!(c.stats().written, 10);
    }
}
