//! The guest's geometry (exchanged in Hello) and the decoding limits derived from it.

use std::fmt;

use thiserror::Error;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::header::{MAX_PAYLOAD, UnitKind};

/// Smallest accepted page size.
pub const MIN_PAGE_SIZE: u32 = 4 << 10;
/// Largest accepted page size.
pub const MAX_PAGE_SIZE: u32 = 64 << 10;
/// Smallest accepted chunk size (chunks are power-of-two multiples of it).
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
/// Largest accepted chunk size.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// Device state travels in pieces of this size (the last one may be shorter):
/// piece `i` carries bytes `[i * DEVICE_STATE_PIECE, i * DEVICE_STATE_PIECE + unit_len)`.
pub const DEVICE_STATE_PIECE: u32 = 1 << 20;
/// Largest accepted `device_state_max`.
pub const MAX_DEVICE_STATE: u64 = 1 << 30;
/// Most units one post-copy Request may ask for.
pub const MAX_REQUEST_UNITS: u32 = 1024;
/// Most digests in one Digest frame (64 KiB of CRCs).
pub const MAX_DIGEST_UNITS: u32 = 16 << 10;
/// The digest of a page that is no memory at all (a Xen guest's
/// unpopulated pfn), told from a zero page's CRC32 (`b"HOLE"`, LE).
pub const HOLE_DIGEST: u32 = u32::from_le_bytes(*b"HOLE");

/// The shape of what is migrated: guest memory pages, storage chunks and the
/// upper bound of the device state. Sent by the client in Hello (32 bytes, LE).
#[repr(C)]
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct Geometry {
    page_size: U32,
    page_count: U64,
    chunk_size: U32,
    chunk_count: U64,
    device_state_max: U64,
}

const _: () = assert!(core::mem::size_of::<Geometry>() == 32);

/// Why a [`Geometry`] is refused by [`Geometry::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum GeometryError {
    /// The page size is not a power of two in 4 KiB..=64 KiB.
    #[error("page size {page_size} is not a power of two in {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}")]
    PageSize {
        /// The offending page size.
        page_size: u32,
    },
    /// The chunk size is not a power of two in 4 KiB..=4 MiB.
    #[error("chunk size {chunk_size} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize {
        /// The offending chunk size.
        chunk_size: u32,
    },
    /// A guest without memory.
    #[error("page count is zero")]
    NoPages,
    /// `page_count * page_size` does not fit in a u64.
    #[error("{page_count} pages of {page_size} bytes overflow u64")]
    MemoryOverflow {
        /// Number of pages.
        page_count: u64,
        /// Page size in bytes.
        page_size: u32,
    },
    /// `chunk_count * chunk_size` does not fit in a u64.
    #[error("{chunk_count} chunks of {chunk_size} bytes overflow u64")]
    StorageOverflow {
        /// Number of chunks.
        chunk_count: u64,
        /// Chunk size in bytes.
        chunk_size: u32,
    },
    /// The device-state bound is above [`MAX_DEVICE_STATE`].
    #[error("device state bound {device_state_max} bytes is above {max}")]
    DeviceStateTooLarge {
        /// The requested bound.
        device_state_max: u64,
        /// [`MAX_DEVICE_STATE`].
        max: u64,
    },
}

impl Geometry {
    /// A geometry (not validated: see [`Geometry::validate`]).
    pub fn new(
        page_size: u32,
        page_count: u64,
        chunk_size: u32,
        chunk_count: u64,
        device_state_max: u64,
    ) -> Self {
        Self {
            page_size: U32::new(page_size),
            page_count: U64::new(page_count),
            chunk_size: U32::new(chunk_size),
            chunk_count: U64::new(chunk_count),
            device_state_max: U64::new(device_state_max),
        }
    }

    /// Bytes per guest page.
    pub fn page_size(&self) -> u32 {
        self.page_size.get()
    }

    /// Number of guest pages (page indices are `0..page_count`).
    pub fn page_count(&self) -> u64 {
        self.page_count.get()
    }

    /// Bytes per storage chunk.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size.get()
    }

    /// Number of storage chunks (chunk indices are `0..chunk_count`).
    pub fn chunk_count(&self) -> u64 {
        self.chunk_count.get()
    }

    /// Upper bound of the device state in bytes.
    pub fn device_state_max(&self) -> u64 {
        self.device_state_max.get()
    }

    /// Checks sizes and counts (see [`GeometryError`]).
    pub fn validate(&self) -> Result<(), GeometryError> {
        let (page_size, page_count) = (self.page_size(), self.page_count());
        let (chunk_size, chunk_count) = (self.chunk_size(), self.chunk_count());
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(GeometryError::PageSize { page_size });
        }
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(GeometryError::ChunkSize { chunk_size });
        }
        if page_count == 0 {
            return Err(GeometryError::NoPages);
        }
        if page_count.checked_mul(u64::from(page_size)).is_none() {
            return Err(GeometryError::MemoryOverflow {
                page_count,
                page_size,
            });
        }
        if chunk_count.checked_mul(u64::from(chunk_size)).is_none() {
            return Err(GeometryError::StorageOverflow {
                chunk_count,
                chunk_size,
            });
        }
        if self.device_state_max() > MAX_DEVICE_STATE {
            return Err(GeometryError::DeviceStateTooLarge {
                device_state_max: self.device_state_max(),
                max: MAX_DEVICE_STATE,
            });
        }
        Ok(())
    }
}

impl fmt::Debug for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Geometry")
            .field("page_size", &self.page_size())
            .field("page_count", &self.page_count())
            .field("chunk_size", &self.chunk_size())
            .field("chunk_count", &self.chunk_count())
            .field("device_state_max", &self.device_state_max())
            .finish()
    }
}

/// Decoding limits derived from a validated [`Geometry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    geometry: Geometry,
    max_payload: u32,
    device_state_pieces: u64,
}

impl Limits {
    /// Validates `geometry` and derives the limits from it.
    pub fn from_geometry(geometry: &Geometry) -> Result<Self, GeometryError> {
        geometry.validate()?;
        let widest = geometry
            .page_size()
            .max(geometry.chunk_size())
            .max(DEVICE_STATE_PIECE);
        Ok(Self {
            geometry: *geometry,
            max_payload: widest.min(MAX_PAYLOAD),
            device_state_pieces: geometry
                .device_state_max()
                .div_ceil(u64::from(DEVICE_STATE_PIECE)),
        })
    }

    /// The geometry these limits were derived from.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Largest payload a frame may carry.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Largest frame (header + payload) a receiver must be able to buffer.
    pub fn max_frame_len(&self) -> usize {
        super::HEADER_LEN.saturating_add(self.max_payload as usize)
    }

    /// Exclusive upper bound of unit indices of `kind` (0 for [`UnitKind::Control`]).
    pub fn index_limit(&self, kind: UnitKind) -> u64 {
        match kind {
            UnitKind::Page => self.geometry.page_count(),
            UnitKind::Chunk => self.geometry.chunk_count(),
            UnitKind::DeviceState => self.device_state_pieces,
            UnitKind::Control => 0,
        }
    }

    /// Inclusive range of uncompressed lengths a unit of `kind` may have
    /// (pages are exactly `page_size`; `(1, 0)`, an empty range, for Control).
    pub fn unit_len_range(&self, kind: UnitKind) -> (u32, u32) {
        match kind {
            UnitKind::Page => (self.geometry.page_size(), self.geometry.page_size()),
            UnitKind::Chunk => (1, self.geometry.chunk_size()),
            UnitKind::DeviceState => (1, DEVICE_STATE_PIECE),
            UnitKind::Control => (1, 0),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid geometry used by the wire tests.
    pub(crate) fn test_geometry() -> Geometry {
        Geometry::new(4096, 1 << 16, 64 << 10, 4096, (3 << 20) + 12345)
    }

    #[test]
    fn valid_geometries() {
        test_geometry().validate().unwrap();
        Geometry::new(65536, 1, 4 << 20, 0, 0).validate().unwrap();
        Geometry::new(
            4096,
            u64::MAX / 4096,
            4096,
            u64::MAX / 4096,
            MAX_DEVICE_STATE,
        )
        .validate()
        .unwrap();
    }

    #[test]
    fn every_geometry_error() {
        let g = |ps, pc, cs, cc, ds| Geometry::new(ps, pc, cs, cc, ds).validate();
        for ps in [0, 2048, 4095, 6144, 131_072, u32::MAX] {
            assert_eq!(
                g(ps, 1, 4096, 1, 0),
                Err(GeometryError::PageSize { page_size: ps })
            );
        }
        for cs in [0, 512, 12288, 8 << 20] {
            assert_eq!(
                g(4096, 1, cs, 1, 0),
                Err(GeometryError::ChunkSize { chunk_size: cs })
            );
        }
        assert_eq!(g(4096, 0, 4096, 1, 0), Err(GeometryError::NoPages));
        assert_eq!(
            g(8192, u64::MAX / 4096, 4096, 1, 0),
            Err(GeometryError::MemoryOverflow {
                page_count: u64::MAX / 4096,
                page_size: 8192
            })
        );
        assert_eq!(
            g(4096, 1, 1 << 20, u64::MAX, 0),
            Err(GeometryError::StorageOverflow {
                chunk_count: u64::MAX,
                chunk_size: 1 << 20
            })
        );
        assert_eq!(
            g(4096, 1, 4096, 1, MAX_DEVICE_STATE + 1),
            Err(GeometryError::DeviceStateTooLarge {
                device_state_max: MAX_DEVICE_STATE + 1,
                max: MAX_DEVICE_STATE
            })
        );
    }

    #[test]
    fn limits_follow_geometry() {
        let l = Limits::from_geometry(&test_geometry()).unwrap();
        assert_eq!(l.max_payload(), 1 << 20);
        assert_eq!(l.index_limit(UnitKind::Page), 1 << 16);
        assert_eq!(l.index_limit(UnitKind::Chunk), 4096);
        assert_eq!(l.index_limit(UnitKind::DeviceState), 4);
        assert_eq!(l.index_limit(UnitKind::Control), 0);
        assert_eq!(l.unit_len_range(UnitKind::Page), (4096, 4096));
        assert_eq!(l.unit_len_range(UnitKind::Chunk), (1, 64 << 10));
        let big = Limits::from_geometry(&Geometry::new(4096, 1, 4 << 20, 1, 0)).unwrap();
        assert_eq!(big.max_payload(), 4 << 20);
        assert_eq!(big.max_frame_len(), 32 + (4 << 20));
        assert_eq!(big.index_limit(UnitKind::DeviceState), 0);
        assert!(Limits::from_geometry(&Geometry::new(1, 1, 4096, 1, 0)).is_err());
    }

    #[test]
    fn debug_shows_numbers() {
        let s = format!("{:?}", test_geometry());
        assert!(s.contains("page_size: 4096"), "{s}");
    }
}
