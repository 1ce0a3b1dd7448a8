//! A guest's disks as one chunk index space, as the wire protocol sees them:
//! disk 0's chunks first, then disk 1's, and so on.

use std::sync::Arc;

use crate::nbd::{BlockDevice, DeviceError};

/// Where a global chunk index lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkAddr {
    /// Which disk.
    pub disk: usize,
    /// The chunk within that disk.
    pub chunk: u64,
    /// Its byte offset within that disk.
    pub offset: u64,
    /// Its length (the last chunk of a disk may be short).
    pub len: u64,
}

/// The chunk layout of a guest's disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSpace {
    chunk_size: u64,
    sizes: Vec<u64>,
    /// `starts[i]`: the global index of disk `i`'s chunk 0; one more entry
    /// holds the total.
    starts: Vec<u64>,
}

impl ChunkSpace {
    /// Disks of `sizes` bytes in chunks of `chunk_size` (a positive
    /// multiple of 4096).
    pub fn new(chunk_size: u64, sizes: Vec<u64>) -> Self {
        assert!(
            chunk_size > 0 && chunk_size % 4096 == 0,
            "chunk size {chunk_size} is not a positive multiple of 4096"
        );
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        let mut n = 0;
        for s in &sizes {
            starts.push(n);
            n += s.div_ceil(chunk_size);
        }
        starts.push(n);
        ChunkSpace {
            chunk_size,
            sizes,
            starts,
        }
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Chunks over all disks.
    pub fn chunks(&self) -> u64 {
        *self.starts.last().expect("one entry at least")
    }

    /// Disk sizes.
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Total bytes over all disks.
    pub fn bytes(&self) -> u64 {
        self.sizes.iter().sum()
    }

    /// Where global chunk `index` is, or `None` past the end.
    pub fn locate(&self, index: u64) -> Option<ChunkAddr> {
        if index >= self.chunks() {
            return None;
        }
        // The last disk whose first chunk is at or before `index`, skipping
        // empty disks (they start where the next one does).
        let disk = self.starts.partition_point(|&s| s <= index) - 1;
        let chunk = index - self.starts[disk];
        let offset = chunk * self.chunk_size;
        Some(ChunkAddr {
            disk,
            chunk,
            offset,
            len: (self.sizes[disk] - offset).min(self.chunk_size),
        })
    }

    /// The global index of `disk`'s chunk `chunk`.
    pub fn global(&self, disk: usize, chunk: u64) -> u64 {
        self.starts[disk] + chunk
    }
}

/// Reads whole chunks of a guest's disks by global index (the source's
/// side of the stream: pre-copy, push and fault answers).
#[derive(Clone)]
pub struct ChunkReader {
    space: ChunkSpace,
    disks: Vec<Arc<dyn BlockDevice>>,
}

impl std::fmt::Debug for ChunkReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkReader")
            .field("space", &self.space)
            .finish()
    }
}

impl ChunkReader {
    /// Reads `disks` in chunks of `chunk_size`.
    pub fn new(chunk_size: u64, disks: Vec<Arc<dyn BlockDevice>>) -> Self {
        let space = ChunkSpace::new(chunk_size, disks.iter().map(|d| d.size()).collect());
        ChunkReader { space, disks }
    }

    /// The layout.
    pub fn space(&self) -> &ChunkSpace {
        &self.space
    }

    /// For every global chunk, whether it may hold data (`false`: it reads
    /// as zeros), from the disks' data extents; devices that cannot tell
    /// count as all data.
    pub fn chunks_with_data(&self) -> Result<Vec<bool>, DeviceError> {
        let cs = self.space.chunk_size();
        let mut out = vec![false; self.space.chunks() as usize];
        for (i, d) in self.disks.iter().enumerate() {
            let base = self.space.global(i, 0);
            let n = d.size().div_ceil(cs);
            match d.data_extents()? {
                None => out[base as usize..(base + n) as usize].fill(true),
                Some(extents) => {
                    for (o, l) in extents.into_iter().filter(|&(_, l)| l > 0) {
                        let first = base + o / cs;
                        let last = base + ((o + l - 1) / cs).min(n - 1);
                        out[first as usize..=last as usize].fill(true);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads global chunk `index` into `out` (resized to the chunk's
    /// length); returns its address.
    pub fn read(&self, index: u64, out: &mut Vec<u8>) -> Result<ChunkAddr, DeviceError> {
        let a = self.space.locate(index).ok_or_else(|| DeviceError {
            op: "read chunk",
            offset: index,
            len: 0,
            image: format!("chunk {index} of {}", self.space.chunks()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no such chunk"),
        })?;
        out.resize(a.len as usize, 0);
        self.disks[a.disk].read_at(a.offset, out)?;
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_follow_each_other_and_short_last_chunks_are_short() {
        let k = 65536;
        let s = ChunkSpace::new(k, vec![3 * k + 512, 0, 2 * k]);
        assert_eq!(s.chunks(), 4 + 2);
        assert_eq!(
            s.locate(3),
            Some(ChunkAddr {
                disk: 0,
                chunk: 3,
                offset: 3 * k,
                len: 512
            })
        );
        // The empty disk 1 holds no chunk: index 4 is disk 2's first.
        assert_eq!(
            s.locate(4).map(|a| (a.disk, a.chunk, a.len)),
            Some((2, 0, k))
        );
        assert_eq!(s.locate(5).map(|a| (a.disk, a.chunk)), Some((2, 1)));
        assert_eq!(s.locate(6), None);
        assert_eq!(s.global(2, 1), 5);
        assert_eq!(s.bytes(), 5 * k + 512);
    }

    #[test]
    fn no_disk_no_chunk() {
        let s = ChunkSpace::new(4096, vec![]);
        assert_eq!(s.chunks(), 0);
        assert_eq!(s.locate(0), None);
    }
}
