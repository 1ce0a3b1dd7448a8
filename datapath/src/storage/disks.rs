//! A guest's disks as the engines see them: the source's images with their
//! chunk logs, the destination's post-copy images, both addressed by global
//! chunk index ([`ChunkSpace`]).

use std::sync::{Arc, Mutex};

use super::chunk_log::{ChunkInterval, ChunkLog};
use super::disk_set::{ChunkReader, ChunkSpace};
use super::postcopy_image::{ChunkFetcher, PostcopyImage, StorageCounters};
use crate::nbd::{BlockDevice, DeviceError};

/// The source's disks: read by global chunk index, dirty chunks from each
/// disk's export log.
#[derive(Debug)]
pub struct SourceDisks {
    reader: ChunkReader,
    logs: Vec<Arc<ChunkLog>>,
}

impl SourceDisks {
    /// `disks[i]` with its export's log `logs[i]` (same chunk size).
    pub fn new(
        chunk_size: u64,
        disks: Vec<Arc<dyn BlockDevice>>,
        logs: Vec<Arc<ChunkLog>>,
    ) -> Self {
        assert_eq!(disks.len(), logs.len(), "one log per disk");
        SourceDisks {
            reader: ChunkReader::new(chunk_size, disks),
            logs,
        }
    }

    /// The layout.
    pub fn space(&self) -> &ChunkSpace {
        self.reader.space()
    }

    /// Reads global chunk `index` into `out`.
    pub fn read(&self, index: u64, out: &mut Vec<u8>) -> Result<(), DeviceError> {
        self.reader.read(index, out).map(drop)
    }

    /// For every global chunk, whether it may hold data (see
    /// [`ChunkReader::chunks_with_data`]).
    pub fn chunks_with_data(&self) -> Result<Vec<bool>, DeviceError> {
        self.reader.chunks_with_data()
    }

    /// Ends the current profiling interval of every disk: `each(global
    /// chunk, what)` for the chunks touched in it, in order.
    pub fn take_interval(&self, mut each: impl FnMut(u64, ChunkInterval)) {
        for (disk, log) in self.logs.iter().enumerate() {
            let base = self.space().global(disk, 0);
            log.take_interval(|c, i| each(base + c, i));
        }
    }

    /// The global chunks dirtied since the last call (bits cleared).
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (disk, log) in self.logs.iter().enumerate() {
            out.extend(
                log.take_dirty()
                    .into_iter()
                    .map(|c| self.space().global(disk, c)),
            );
        }
        out
    }
}

/// Chunk requests from the destination's images, held until the engine's
/// fault connection is up, then passed straight on.
#[derive(Default)]
pub struct ChunkRequests {
    inner: Mutex<RequestsInner>,
}

#[derive(Default)]
struct RequestsInner {
    queued: Vec<(u64, u32)>,
    sink: Option<Box<dyn Fn(u64, u32) + Send + Sync>>,
}

impl std::fmt::Debug for ChunkRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.inner.lock().expect("requests lock");
        f.debug_struct("ChunkRequests")
            .field("queued", &i.queued.len())
            .field("attached", &i.sink.is_some())
            .finish()
    }
}

impl ChunkRequests {
    /// Requests `count` global chunks from `first`.
    pub fn request(&self, first: u64, count: u32) {
        let mut i = self.inner.lock().expect("requests lock");
        match &i.sink {
            Some(sink) => sink(first, count),
            None => i.queued.push((first, count)),
        }
    }

    /// From now on requests go to `sink`; the queued ones first.
    pub fn attach(&self, sink: Box<dyn Fn(u64, u32) + Send + Sync>) {
        let mut i = self.inner.lock().expect("requests lock");
        for (first, count) in std::mem::take(&mut i.queued) {
            sink(first, count);
        }
        i.sink = Some(sink);
    }

    /// True once a sink is attached.
    pub fn attached(&self) -> bool {
        self.inner.lock().expect("requests lock").sink.is_some()
    }

    /// Requests are queued again (the connection is gone).
    pub fn detach(&self) {
        self.inner.lock().expect("requests lock").sink = None;
    }
}

/// The [`ChunkFetcher`] of disk `disk`: its chunk indices made global.
#[derive(Debug)]
pub struct DiskFetcher {
    requests: Arc<ChunkRequests>,
    base: u64,
}

impl DiskFetcher {
    /// The fetcher of the disk whose chunk 0 is global chunk `base`.
    pub fn new(requests: Arc<ChunkRequests>, base: u64) -> Self {
        DiskFetcher { requests, base }
    }
}

impl ChunkFetcher for DiskFetcher {
    fn fetch(&self, first: u64, count: u32) {
        self.requests.request(self.base + first, count);
    }

    fn ready(&self) -> bool {
        self.requests.attached()
    }
}

/// The destination's disks.
#[derive(Debug)]
pub struct DestDisks {
    space: ChunkSpace,
    images: Vec<Arc<PostcopyImage>>,
    requests: Arc<ChunkRequests>,
}

impl DestDisks {
    /// `images` (whose fetchers are [`DiskFetcher`]s on `requests`, made for
    /// this layout).
    pub fn new(images: Vec<Arc<PostcopyImage>>, requests: Arc<ChunkRequests>) -> Self {
        let chunk_size = images.first().map_or(64 << 10, |i| i.chunk_size());
        let space = ChunkSpace::new(chunk_size, images.iter().map(|i| i.size()).collect());
        DestDisks {
            space,
            images,
            requests,
        }
    }

    /// The layout.
    pub fn space(&self) -> &ChunkSpace {
        &self.space
    }

    /// Where chunk requests go.
    pub fn requests(&self) -> &Arc<ChunkRequests> {
        &self.requests
    }

    fn at(&self, index: u64) -> Result<(&PostcopyImage, u64), DeviceError> {
        let a = self.space.locate(index).ok_or_else(|| DeviceError {
            op: "locate chunk",
            offset: index,
            len: 0,
            image: format!("chunk {index} of {}", self.space.chunks()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no such chunk"),
        })?;
        Ok((&self.images[a.disk], a.chunk))
    }

    /// A pre-copy chunk (`None`: zero), replacing any earlier copy.
    pub fn store(&self, index: u64, data: Option<&[u8]>) -> Result<(), DeviceError> {
        let (img, c) = self.at(index)?;
        img.store_chunk(c, data)
    }

    /// Drops a pre-copied chunk before the resume: the freeze left it to
    /// post-copy ([`PostcopyImage::discard_chunk`]).
    pub fn discard(&self, index: u64) -> Result<(), DeviceError> {
        let (img, c) = self.at(index)?;
        img.discard_chunk(c)
    }

    /// A chunk after the resume: fills the blocks still absent.
    pub fn install(&self, index: u64, data: Option<&[u8]>) -> Result<(), DeviceError> {
        let (img, c) = self.at(index)?;
        img.install_chunk(c, data).map(drop)
    }

    /// True if chunk `index` still lacks blocks.
    pub fn needed(&self, index: u64) -> bool {
        self.at(index).is_ok_and(|(img, c)| img.chunk_needed(c))
    }

    /// Chunks still lacking blocks.
    pub fn missing_chunks(&self) -> u64 {
        (0..self.space.chunks()).filter(|&c| self.needed(c)).count() as u64
    }

    /// The guest runs here now.
    pub fn mark_resumed(&self) {
        for i in &self.images {
            i.mark_resumed();
        }
    }

    /// True if the guest modified chunk `index` since the resume.
    pub fn written_since_resume(&self, index: u64) -> bool {
        self.at(index)
            .is_ok_and(|(img, c)| img.chunk_written_since_resume(c))
    }

    /// CRC32 of chunk `index` as it is now.
    pub fn digest(&self, index: u64) -> Result<u32, DeviceError> {
        let (img, c) = self.at(index)?;
        img.chunk_digest(c)
    }

    /// Every wait of a guest request for chunks since the resume, on every
    /// disk: `(start, end)` (see [`PostcopyImage::waits`]).
    pub fn waits(&self) -> Vec<(std::time::Instant, std::time::Instant)> {
        self.images.iter().flat_map(|i| i.waits()).collect()
    }

    /// Counters summed over the disks.
    pub fn counters(&self) -> StorageCounters {
        let mut t = StorageCounters::default();
        for i in &self.images {
            let c = i.counters();
            t.chunks_fetched += c.chunks_fetched;
            t.whole_block_overwrites += c.whole_block_overwrites;
            t.partial_block_merges += c.partial_block_merges;
            t.chunks_installed += c.chunks_installed;
        }
        t
    }

    /// Syncs every image and presence file.
    pub fn sync(&self) -> Result<(), DeviceError> {
        for i in &self.images {
            i.sync()?;
        }
        Ok(())
    }
}
