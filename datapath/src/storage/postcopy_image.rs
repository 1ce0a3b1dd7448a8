//! The destination's disk image during post-copy: an NBD [`BlockDevice`]
//! whose absent data is fetched on demand.
//!
//! - A read of absent blocks asks the [`ChunkFetcher`] for their chunks
//!   (once per chunk) and waits until they are here.
//! - A write covering whole absent blocks is applied with no fetch for them
//!   (a *whole-block overwrite*); a write covering part of an absent block
//!   fetches that block's chunk first and merges, so neither side's bytes are
//!   lost. `WRITE_ZEROES` and `TRIM` follow the same rule.
//! - Chunks arriving (pushed or fetched) through [`install_chunk`] fill only
//!   the blocks still absent: what the guest wrote since is never
//!   overwritten. Writes and installs of one chunk are serialised by a
//!   striped lock.
//! - `FLUSH` and `FUA` sync the image, then the presence file.
//! - Once the guest runs here, every guest request that waits for chunks
//!   (a read of absent data, a partial write's fetch) is timed: the
//!   [`waits`] are part of the post-copy penalty P.
//!
//! [`install_chunk`]: PostcopyImage::install_chunk
//! [`waits`]: PostcopyImage::waits

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::presence::{BLOCK, BlockPresence, BlockState, PresenceError};
use crate::nbd::{BlockDevice, DeviceError, FileImage};

/// Asks the source for chunks (the engine's fault connection).
pub trait ChunkFetcher: Send + Sync {
    /// Requests `count` chunks from `first`. The data arrives later through
    /// [`PostcopyImage::install_chunk`].
    fn fetch(&self, first: u64, count: u32);

    /// False while nothing can answer (no source connected yet).
    fn ready(&self) -> bool {
        true
    }
}

/// Counters of a post-copy image.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StorageCounters {
    /// Chunks requested on demand (a read or a partial write needed them).
    pub chunks_fetched: u64,
    /// Absent blocks written whole by the guest (no fetch).
    pub whole_block_overwrites: u64,
    /// Absent blocks written in part (fetched first, then merged).
    pub partial_block_merges: u64,
    /// Chunks installed from the source.
    pub chunks_installed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    chunks_fetched: AtomicU64,
    whole_block_overwrites: AtomicU64,
    partial_block_merges: AtomicU64,
    chunks_installed: AtomicU64,
}

/// Opening a post-copy image failed.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyImageError {
    /// The image file.
    #[error("image {path}")]
    Image {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The presence file.
    #[error(transparent)]
    Presence(#[from] PresenceError),
    /// The geometry is unusable.
    #[error("chunk size {chunk_size} is not a positive multiple of {BLOCK}")]
    ChunkSize {
        /// The chunk size asked for.
        chunk_size: u64,
    },
}

const STRIPES: usize = 256;

/// A destination disk image filled during post-copy.
pub struct PostcopyImage {
    image: FileImage,
    presence: BlockPresence,
    fetcher: Arc<dyn ChunkFetcher>,
    chunk_size: u64,
    /// Serialises writes and installs per chunk (`chunk % STRIPES`).
    stripes: Vec<Mutex<()>>,
    /// Bumped and notified whenever blocks become present.
    arrivals: Mutex<u64>,
    arrived: Condvar,
    fetch_timeout: Duration,
    counters: Counters,
    /// The guest runs here: pre-copy stores are refused, guest writes tracked.
    resumed: AtomicBool,
    /// Blocks the guest has modified since the resume, one bit each.
    written: crate::bits::AtomicBitmap,
    /// Guest requests that waited for chunks since the resume: (start, end).
    waits: Mutex<Vec<(Instant, Instant)>>,
}

impl std::fmt::Debug for PostcopyImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyImage")
            .field("image", &self.image.path())
            .field("chunk_size", &self.chunk_size)
            .field("missing_blocks", &self.presence.missing())
            .finish()
    }
}

impl PostcopyImage {
    /// A new post-copy image at `image` (sized to `size`, every block
    /// absent) with its presence file at `presence`.
    pub fn create(
        image: &Path,
        presence: &Path,
        size: u64,
        chunk_size: u64,
        fetcher: Arc<dyn ChunkFetcher>,
        fetch_timeout: Duration,
    ) -> Result<Self, PostcopyImageError> {
        let err = |source| PostcopyImageError::Image {
            path: image.display().to_string(),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(image)
            .map_err(err)?;
        f.set_len(size).map_err(err)?;
        drop(f);
        let presence = BlockPresence::create(presence, size.div_ceil(BLOCK))?;
        Self::with(image, presence, chunk_size, fetcher, fetch_timeout)
    }

    /// Reopens the image and presence file an earlier engine left.
    pub fn reopen(
        image: &Path,
        presence: &Path,
        chunk_size: u64,
        fetcher: Arc<dyn ChunkFetcher>,
        fetch_timeout: Duration,
    ) -> Result<Self, PostcopyImageError> {
        let size = std::fs::metadata(image)
            .map_err(|source| PostcopyImageError::Image {
                path: image.display().to_string(),
                source,
            })?
            .len();
        let presence = BlockPresence::open(presence, size.div_ceil(BLOCK))?;
        Self::with(image, presence, chunk_size, fetcher, fetch_timeout)
    }

    fn with(
        image: &Path,
        presence: BlockPresence,
        chunk_size: u64,
        fetcher: Arc<dyn ChunkFetcher>,
        fetch_timeout: Duration,
    ) -> Result<Self, PostcopyImageError> {
        if chunk_size == 0 || chunk_size % BLOCK != 0 {
            return Err(PostcopyImageError::ChunkSize { chunk_size });
        }
        let image = FileImage::open(image, false).map_err(|source| PostcopyImageError::Image {
            path: image.display().to_string(),
            source,
        })?;
        let blocks = presence.blocks();
        Ok(PostcopyImage {
            image,
            presence,
            fetcher,
            chunk_size,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            arrivals: Mutex::new(0),
            arrived: Condvar::new(),
            fetch_timeout,
            counters: Counters::default(),
            resumed: AtomicBool::new(false),
            written: crate::bits::AtomicBitmap::new(blocks),
            waits: Mutex::new(Vec::new()),
        })
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.image.size().div_ceil(self.chunk_size)
    }

    /// Blocks not yet here.
    pub fn missing_blocks(&self) -> u64 {
        self.presence.missing()
    }

    /// True if some block of `chunk` is not here (it still needs data).
    pub fn chunk_needed(&self, chunk: u64) -> bool {
        self.blocks_of_chunk(chunk)
            .any(|b| self.presence.get(b) != BlockState::Present)
    }

    /// The counters so far.
    pub fn counters(&self) -> StorageCounters {
        let c = &self.counters;
        StorageCounters {
            chunks_fetched: c.chunks_fetched.load(Ordering::Relaxed),
            whole_block_overwrites: c.whole_block_overwrites.load(Ordering::Relaxed),
            partial_block_merges: c.partial_block_merges.load(Ordering::Relaxed),
            chunks_installed: c.chunks_installed.load(Ordering::Relaxed),
        }
    }

    /// Syncs the image, then the presence file.
    pub fn sync(&self) -> Result<(), DeviceError> {
        self.image.flush()?;
        self.presence.persist().map_err(|e| DeviceError {
            op: "persist presence",
            offset: 0,
            len: 0,
            image: self.image.path().display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn blocks_of_chunk(&self, chunk: u64) -> std::ops::Range<u64> {
        let first = chunk * self.chunk_size / BLOCK;
        let end = ((chunk + 1) * self.chunk_size).min(self.image.size());
        first..end.div_ceil(BLOCK)
    }

    fn chunk_of_block(&self, b: u64) -> u64 {
        b * BLOCK / self.chunk_size
    }

    /// Locks the stripes of chunks `first..=last`, in ascending stripe order.
    fn lock_chunks(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = (first..=last.min(first + STRIPES as u64))
            .map(|c| (c % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().expect("stripe lock"))
            .collect()
    }

    /// Stores a pre-copy chunk (`None`: all zeros) whole, replacing any
    /// earlier copy: before the resume the source's latest bytes win.
    /// Refused once the guest runs here.
    pub fn store_chunk(&self, chunk: u64, data: Option<&[u8]>) -> Result<(), DeviceError> {
        let blocks = self.blocks_of_chunk(chunk);
        let from = blocks.start * BLOCK;
        let to = (blocks.end * BLOCK).min(self.image.size());
        let refuse = |why: &str| DeviceError {
            op: "store pre-copy chunk",
            offset: from,
            len: to - from,
            image: self.image.path().display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string()),
        };
        if self.resumed.load(Ordering::Acquire) {
            return Err(refuse("the guest runs here: pre-copy data refused"));
        }
        let _g = self.lock_chunks(chunk, chunk);
        match data {
            Some(d) if d.len() as u64 == to - from => self.image.write_at(from, d, false)?,
            Some(_) => return Err(refuse("chunk data of the wrong length")),
            None => self.image.write_zeroes(from, to - from, true, false)?,
        }
        for b in blocks {
            self.presence.set_present(b);
        }
        Ok(())
    }

    /// Drops a pre-copy chunk the source's freeze left to post-copy (the
    /// guest dirtied it after it was sent, and the freeze had no room for
    /// it): its blocks are absent again, to be fetched or pushed like any
    /// post-copy chunk's (the stale bytes stay until then: an absent block
    /// is never read). Refused once the guest runs here.
    pub fn discard_chunk(&self, chunk: u64) -> Result<(), DeviceError> {
        let blocks = self.blocks_of_chunk(chunk);
        if self.resumed.load(Ordering::Acquire) {
            let from = blocks.start * BLOCK;
            return Err(DeviceError {
                op: "discard pre-copy chunk",
                offset: from,
                len: (blocks.end * BLOCK).min(self.image.size()) - from,
                image: self.image.path().display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the guest runs here: its blocks are its own",
                ),
            });
        }
        let _g = self.lock_chunks(chunk, chunk);
        for b in blocks {
            self.presence.set_absent(b);
        }
        Ok(())
    }

    /// The guest runs here from now on: its writes are tracked (for the
    /// integrity check) and pre-copy stores refused.
    pub fn mark_resumed(&self) {
        self.resumed.store(true, Ordering::Release);
    }

    /// Every wait of a guest request for chunks not here yet, since the
    /// resume (a read of absent data, or the fetch before a partial-block
    /// write): `(start, end)`, from the moment the request found a block
    /// absent until every block it needs was here (or its fetch timed out).
    /// Waits before the resume (QEMU's own reads while it loads) are not
    /// the guest's and are not recorded.
    pub fn waits(&self) -> Vec<(Instant, Instant)> {
        self.waits.lock().expect("waits lock").clone()
    }

    /// True if the guest has modified some block of `chunk` since the resume.
    pub fn chunk_written_since_resume(&self, chunk: u64) -> bool {
        self.blocks_of_chunk(chunk).any(|b| self.written.get(b))
    }

    /// CRC32 of `chunk` as it is in the image now.
    pub fn chunk_digest(&self, chunk: u64) -> Result<u32, DeviceError> {
        super::chunk_digest(&self.image, chunk, self.chunk_size)
    }

    /// Puts the source's bytes of `chunk` in place for every block still
    /// absent; blocks the guest has written are left alone. `data` is the
    /// whole chunk (shorter for the last one), or `None` for a zero chunk.
    pub fn install_chunk(&self, chunk: u64, data: Option<&[u8]>) -> Result<u64, DeviceError> {
        let base = chunk * self.chunk_size;
        let blocks = self.blocks_of_chunk(chunk);
        let _g = self.lock_chunks(chunk, chunk);
        let mut installed = 0;
        let mut b = blocks.start;
        while b < blocks.end {
            if self.presence.get(b) == BlockState::Present {
                b += 1;
                continue;
            }
            // A run of absent blocks: one write.
            let run = b;
            while b < blocks.end && self.presence.get(b) != BlockState::Present {
                b += 1;
            }
            let (from, to) = (run * BLOCK, (b * BLOCK).min(self.image.size()));
            match data {
                Some(d) => {
                    let slice = d
                        .get((from - base) as usize..(to - base) as usize)
                        .ok_or_else(|| DeviceError {
                            op: "install chunk",
                            offset: base,
                            len: d.len() as u64,
                            image: self.image.path().display().to_string(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::InvalidInput,
                                "chunk data shorter than the chunk",
                            ),
                        })?;
                    self.image.write_at(from, slice, false)?;
                }
                None => self.image.write_zeroes(from, to - from, true, false)?,
            }
            for x in run..b {
                self.presence.set_present(x);
            }
            installed += b - run;
        }
        drop(_g);
        self.counters
            .chunks_installed
            .fetch_add(1, Ordering::Relaxed);
        if installed > 0 {
            self.notify();
        }
        Ok(installed)
    }

    fn notify(&self) {
        *self.arrivals.lock().expect("arrivals lock") += 1;
        self.arrived.notify_all();
    }

    /// Makes every block in `blocks` present: requests the chunks of absent
    /// ones (once per chunk) and waits. A wait after the resume is recorded
    /// (see [`waits`](Self::waits)).
    fn ensure_present(&self, blocks: std::ops::Range<u64>) -> Result<(), DeviceError> {
        let start = Instant::now();
        let present = || {
            blocks
                .clone()
                .all(|b| self.presence.get(b) == BlockState::Present)
        };
        if present() {
            return Ok(());
        }
        let waited = self.fetch_and_wait(blocks.clone(), present);
        if self.resumed.load(Ordering::Acquire) {
            self.waits
                .lock()
                .expect("waits lock")
                .push((start, Instant::now()));
        }
        waited
    }

    /// Requests the chunks of the absent blocks in `blocks` (once per
    /// chunk), then waits until `present()` or the fetch timeout.
    fn fetch_and_wait(
        &self,
        blocks: std::ops::Range<u64>,
        present: impl Fn() -> bool,
    ) -> Result<(), DeviceError> {
        let mut asked: Option<(u64, u32)> = None;
        let flush = |run: &mut Option<(u64, u32)>| {
            if let Some((first, n)) = run.take() {
                self.counters
                    .chunks_fetched
                    .fetch_add(n.into(), Ordering::Relaxed);
                self.fetcher.fetch(first, n);
            }
        };
        let mut last_chunk = None;
        for b in blocks.clone() {
            if self.presence.get(b) == BlockState::Present {
                continue;
            }
            let c = self.chunk_of_block(b);
            if last_chunk == Some(c) {
                continue;
            }
            last_chunk = Some(c);
            // This chunk is ours to request if we move any of its blocks.
            let mut mine = false;
            for x in self.blocks_of_chunk(c) {
                mine |= self.presence.request(x);
            }
            if mine {
                match &mut asked {
                    Some((first, n)) if *first + u64::from(*n) == c => *n += 1,
                    _ => {
                        flush(&mut asked);
                        asked = Some((c, 1));
                    }
                }
            }
        }
        flush(&mut asked);
        let deadline = Instant::now() + self.fetch_timeout;
        let mut seen = self.arrivals.lock().expect("arrivals lock");
        loop {
            if present() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DeviceError {
                    op: "fetch from the source",
                    offset: blocks.start * BLOCK,
                    len: (blocks.end - blocks.start) * BLOCK,
                    image: self.image.path().display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("not here after {:?}", self.fetch_timeout),
                    ),
                });
            }
            seen = self
                .arrived
                .wait_timeout(seen, deadline - now)
                .expect("arrivals lock")
                .0;
        }
    }

    /// The blocks touching `[offset, offset + len)`, and whether the first
    /// and last are only partly covered.
    fn span(&self, offset: u64, len: u64) -> (std::ops::Range<u64>, bool, bool) {
        let end = offset + len;
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let covered =
            |b: u64| offset <= b * BLOCK && end >= ((b + 1) * BLOCK).min(self.image.size());
        (first..last + 1, !covered(first), !covered(last))
    }

    /// A guest modification of `[offset, offset + len)`: partly covered
    /// absent blocks are fetched first, then `apply` runs with the chunks
    /// locked, then every covered block is present.
    fn modify(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        apply: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let (blocks, head_partial, tail_partial) = self.span(offset, len);
        let (first, last) = (blocks.start, blocks.end - 1);
        let mut edges = Vec::new();
        if head_partial && self.presence.get(first) != BlockState::Present {
            edges.push(first);
        }
        if tail_partial && last != first && self.presence.get(last) != BlockState::Present {
            edges.push(last);
        }
        for &e in &edges {
            self.ensure_present(e..e + 1)?;
        }
        self.counters
            .partial_block_merges
            .fetch_add(edges.len() as u64, Ordering::Relaxed);
        {
            let _g = self.lock_chunks(self.chunk_of_block(first), self.chunk_of_block(last));
            apply()?;
            let mut whole = 0;
            let track = self.resumed.load(Ordering::Acquire);
            for b in blocks {
                if self.presence.set_present(b) {
                    whole += 1;
                }
                if track {
                    self.written.set(b);
                }
            }
            self.counters
                .whole_block_overwrites
                .fetch_add(whole, Ordering::Relaxed);
        }
        self.notify();
        if fua { self.sync() } else { Ok(()) }
    }
}

impl BlockDevice for PostcopyImage {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        // Before the guest runs here and before any source is connected,
        // only QEMU itself reads (its start-up probes of a disk it has just
        // opened, incoming): they see the image as it is, absent data as
        // zeros, as on the empty image a management stack would create.
        if !self.resumed.load(Ordering::Acquire) && !self.fetcher.ready() {
            return self.image.read_at(offset, buf);
        }
        let (blocks, _, _) = self.span(offset, buf.len() as u64);
        self.ensure_present(blocks)?;
        self.image.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.modify(offset, data.len() as u64, fua, || {
            self.image.write_at(offset, data, false)
        })
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.sync()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        // Advisory: discard the whole blocks only (they read back as zeros);
        // partial blocks keep their bytes, fetched or not.
        let start = offset.next_multiple_of(BLOCK);
        let end = if offset + len == self.image.size() {
            offset + len
        } else {
            (offset + len) / BLOCK * BLOCK
        };
        if end <= start {
            return Ok(());
        }
        self.modify(start, end - start, fua, || {
            self.image.trim(start, end - start, false)
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.modify(offset, len, fua, || {
            self.image.write_zeroes(offset, len, may_punch, false)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{OnceLock, Weak};

    use super::*;

    const CHUNK: u64 = 64 << 10;
    const DELAY: Duration = Duration::from_millis(150);

    /// Answers every request with a chunk of `0xab`s, `DELAY` later, from
    /// its own thread.
    #[derive(Default)]
    struct Delayed {
        image: OnceLock<Weak<PostcopyImage>>,
    }

    impl ChunkFetcher for Delayed {
        fn fetch(&self, first: u64, count: u32) {
            let image = self.image.get().cloned().expect("image set");
            std::thread::spawn(move || {
                std::thread::sleep(DELAY);
                if let Some(img) = image.upgrade() {
                    for c in first..first + u64::from(count) {
                        img.install_chunk(c, Some(&[0xab; CHUNK as usize])).unwrap();
                    }
                }
            });
        }
    }

    fn image(tag: &str) -> (Arc<PostcopyImage>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("wanmig-pci-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fetcher = Arc::new(Delayed::default());
        let img = Arc::new(
            PostcopyImage::create(
                &dir.join("disk.raw"),
                &dir.join("disk.presence"),
                8 * CHUNK,
                CHUNK,
                fetcher.clone(),
                Duration::from_secs(10),
            )
            .unwrap(),
        );
        fetcher.image.set(Arc::downgrade(&img)).ok().unwrap();
        (img, dir)
    }

    #[test]
    fn the_guests_waits_for_chunks_are_recorded_from_the_resume() {
        let (img, dir) = image("waits");
        let mut buf = vec![0u8; 8192];
        // Before the resume (QEMU's own reads while it loads): not the
        // guest's wait.
        img.read_at(0, &mut buf).unwrap();
        assert!(img.waits().is_empty());
        img.mark_resumed();
        // Present data: no wait.
        img.read_at(100, &mut buf).unwrap();
        assert!(img.waits().is_empty());
        // A read of an absent chunk waits for the delayed fetch.
        let t = Instant::now();
        img.read_at(3 * CHUNK + 10, &mut buf).unwrap();
        assert_eq!(buf, vec![0xab; 8192]);
        let w = img.waits();
        assert_eq!(w.len(), 1, "{w:?}");
        let (start, end) = w[0];
        assert!(start >= t && end <= Instant::now(), "{w:?}");
        assert!(end - start >= DELAY, "waited {:?}", end - start);
        // A write to part of an absent block fetches first: a wait too.
        img.write_at(5 * CHUNK + 100, &[1; 10], false).unwrap();
        let w = img.waits();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[1].1 - w[1].0 >= DELAY);
        // A write of whole absent blocks needs no fetch, hence no wait.
        img.write_at(6 * CHUNK, &[2; BLOCK as usize], false)
            .unwrap();
        assert_eq!(img.waits().len(), 2);
        drop(img);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
