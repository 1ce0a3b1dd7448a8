//! The binary profile format, version 1.
//!
//! One file per profiled guest, little-endian, written once by the engine's
//! profiler through [`ProfileWriter`] and read by [`Profile`].
//! A 1 TiB guest (268 M pages) with one-byte counters takes 2.125 bytes per
//! page; a chunk takes 3.125 bytes.
//!
//! ```text
//! offset size  field
//!      0    8  magic "WANMIGPF"
//!      8    4  format version (1)
//!     12    4  header length in bytes (128)
//!     16    4  flags: bit 0 = zero maps present; other bits must be 0
//!     20    4  counter width in bytes: 1, 2 or 4 (1 when n <= 255, else 2)
//!     24    4  n, the number of sample intervals (1..=65535)
//!     28    4  page size in bytes (> 0)
//!     32    4  chunk size in bytes (> 0)
//!     36    4  reserved, 0
//!     40    8  tau, the interval length in nanoseconds (> 0)
//!     48    8  page count
//!     56    8  chunk count
//!     64    8  device/CPU state size estimate in bytes
//!     72   56  reserved, 0
//!    128       page records: page count x (r, w), each a counter of `width` bytes
//!              page zero map (if flag bit 0): ceil(pages / 8) bytes, bit i%8 of
//!                byte i/8 set = page i was zero or never populated at profile end
//!              chunk records: chunk count x (r, w, o)
//!              chunk zero map (if flag bit 0)
//!    end       the file ends exactly here
//! ```
//!
//! Validation: [`Profile::open`] checks the header and the exact file size in
//! O(1); the counters (`r, w <= n`, `o <= w`, zero-map padding bits clear) are
//! checked by the one pass that builds the class histogram
//! ([`ClassProfile::from_profile`](crate::profile::ClassProfile::from_profile)) or by [`Profile::validate`]. Every error names the
//! file and, for counters, the unit index and byte offset.
//!
//! **Concurrent rewrites.** [`ProfileWriter::create`] writes a new profile
//! under a temporary name in the destination's directory and renames it
//! over the destination when finished (atomically): a reader that opened
//! the old file keeps reading the old, complete file. [`Profile`] does not
//! memory-map the file: it keeps the descriptor and reads it with `pread`
//! in blocks, so even a file truncated *in place* by another program (not
//! through this writer) cannot crash the reader with `SIGBUS`; the read
//! fails with [`ProfileReadError::Changed`]. What remains unprotected is an
//! in-place rewrite of the same length by another program: the reader may
//! then see a mix of old and new counters (each still validated).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::{Kind, UnitCounters};

/// The file magic.
pub const MAGIC: [u8; 8] = *b"WANMIGPF";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// The header length in bytes.
pub const HEADER_LEN: usize = 128;
/// Flag bit 0: per-unit zero maps follow the page and chunk records.
pub const FLAG_ZERO_MAPS: u32 = 1;

/// The on-disk header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    version: U32,
    header_len: U32,
    flags: U32,
    counter_width: U32,
    samples: U32,
    page_size: U32,
    chunk_size: U32,
    reserved0: U32,
    interval_ns: U64,
    page_count: U64,
    chunk_count: U64,
    state_bytes: U64,
    reserved: [u8; 56],
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);
const _: () = assert!(std::mem::offset_of!(RawHeader, interval_ns) == 40);
const _: () = assert!(std::mem::offset_of!(RawHeader, state_bytes) == 64);

/// What a profile header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProfileHeader {
    /// `n`: the number of sample intervals.
    pub samples: u32,
    /// `tau`: the interval length in nanoseconds.
    pub interval_ns: u64,
    /// Page size in bytes (4096).
    pub page_size: u32,
    /// Chunk size in bytes (65536 by default).
    pub chunk_size: u32,
    /// Number of memory pages.
    pub page_count: u64,
    /// Number of storage chunks.
    pub chunk_count: u64,
    /// Estimated device/CPU state size in bytes (sent during the freeze).
    pub state_bytes: u64,
}

impl ProfileHeader {
    /// The counter width in bytes that holds values up to `samples`.
    pub fn counter_width(&self) -> u32 {
        match self.samples {
            0..=0xff => 1,
            0x100..=0xffff => 2,
            _ => 4,
        }
    }

    /// `tau` in seconds.
    pub fn interval_s(&self) -> f64 {
        self.interval_ns as f64 * 1e-9
    }

    /// Memory size in bytes.
    pub fn memory_bytes(&self) -> u128 {
        u128::from(self.page_count) * u128::from(self.page_size)
    }

    /// Storage size in bytes.
    pub fn storage_bytes(&self) -> u128 {
        u128::from(self.chunk_count) * u128::from(self.chunk_size)
    }

    fn check(&self) -> Result<(), (&'static str, u64, &'static str)> {
        if self.samples == 0 {
            return Err(("samples", 0, "at least one interval is needed"));
        }
        if self.samples > crate::model::rates::MAX_SAMPLES {
            return Err((
                "samples",
                self.samples.into(),
                "at most 65535 intervals are supported",
            ));
        }
        if self.interval_ns == 0 {
            return Err(("interval_ns", 0, "the interval must be positive"));
        }
        if self.page_size == 0 {
            return Err(("page_size", 0, "must be positive"));
        }
        if self.chunk_size == 0 {
            return Err(("chunk_size", 0, "must be positive"));
        }
        Ok(())
    }
}

/// Byte offsets of the sections of a profile with a given header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Counter width in bytes.
    pub width: usize,
    /// Whether the zero maps are present.
    pub zero_maps: bool,
    /// Start of the page records.
    pub pages: u64,
    /// Start of the page zero map.
    pub page_zero: u64,
    /// Start of the chunk records.
    pub chunks: u64,
    /// Start of the chunk zero map.
    pub chunk_zero: u64,
    /// Total file size.
    pub total: u64,
}

impl Layout {
    /// Computes the layout; `None` on arithmetic overflow.
    pub fn new(header: &ProfileHeader, width: u32, zero_maps: bool) -> Option<Layout> {
        let w = u64::from(width);
        let map = |n: u64| if zero_maps { n.div_ceil(8) } else { 0 };
        let pages = HEADER_LEN as u64;
        let page_zero = pages.checked_add(header.page_count.checked_mul(2 * w)?)?;
        let chunks = page_zero.checked_add(map(header.page_count))?;
        let chunk_zero = chunks.checked_add(header.chunk_count.checked_mul(3 * w)?)?;
        let total = chunk_zero.checked_add(map(header.chunk_count))?;
        Some(Layout {
            width: width as usize,
            zero_maps,
            pages,
            page_zero,
            chunks,
            chunk_zero,
            total,
        })
    }
}

/// Why a profile could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileReadError {
    /// The file could not be opened, inspected or read.
    #[error("{path}: cannot read the profile")]
    Io {
        /// The profile path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file became shorter than its header describes while being read
    /// (truncated in place by another program).
    #[error(
        "{path}: the profile changed while being read: {found} of {wanted} bytes at offset {offset} (truncated in place?)"
    )]
    Changed {
        /// The profile path.
        path: PathBuf,
        /// Byte offset of the read.
        offset: u64,
        /// Bytes wanted.
        wanted: u64,
        /// Bytes read.
        found: u64,
    },
    /// Shorter than the header.
    #[error("{path}: truncated header: {found} bytes, a profile header has {expected}")]
    TruncatedHeader {
        /// The profile path.
        path: PathBuf,
        /// Bytes present.
        found: u64,
        /// Header length.
        expected: u64,
    },
    /// Not a wanmig profile.
    #[error(
        "{path}: bad magic {found:02x?} at offset 0 (expected \"WANMIGPF\"): not a wanmig profile"
    )]
    BadMagic {
        /// The profile path.
        path: PathBuf,
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A format version this build does not read.
    #[error(
        "{path}: profile format version {found} at offset 8; this build reads version {supported}"
    )]
    UnsupportedVersion {
        /// The profile path.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version supported.
        supported: u32,
    },
    /// A header field has an impossible value.
    #[error("{path}: header field {field} at offset {offset} = {value}: {reason}")]
    BadHeader {
        /// The profile path.
        path: PathBuf,
        /// Field name.
        field: &'static str,
        /// Byte offset of the field.
        offset: u64,
        /// Value found.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The file ends before the last section does.
    #[error("{path}: truncated: {found} bytes, the header describes {expected}")]
    Truncated {
        /// The profile path.
        path: PathBuf,
        /// Size the header implies.
        expected: u64,
        /// Actual size.
        found: u64,
    },
    /// The file is longer than the header describes.
    #[error("{path}: {found} bytes, the header describes {expected}: trailing data")]
    TrailingData {
        /// The profile path.
        path: PathBuf,
        /// Size the header implies.
        expected: u64,
        /// Actual size.
        found: u64,
    },
    /// A counter exceeds the number of intervals.
    #[error(
        "{path}: {kind} {index} at offset {offset}: counter {field} = {value} exceeds n = {max}"
    )]
    CounterOutOfRange {
        /// The profile path.
        path: PathBuf,
        /// Page or chunk.
        kind: Kind,
        /// Unit index.
        index: u64,
        /// Byte offset of the counter.
        offset: u64,
        /// `"r"`, `"w"` or `"o"`.
        field: &'static str,
        /// Value found.
        value: u32,
        /// The sample count `n`.
        max: u32,
    },
    /// A chunk claims more whole-block overwrite intervals than write intervals.
    #[error("{path}: chunk {index} at offset {offset}: o = {o} exceeds w = {w}")]
    OverwritesExceedWrites {
        /// The profile path.
        path: PathBuf,
        /// Chunk index.
        index: u64,
        /// Byte offset of the `o` counter.
        offset: u64,
        /// Overwrite intervals.
        o: u32,
        /// Write intervals.
        w: u32,
    },
    /// Bits past the last unit of a zero map are set.
    #[error("{path}: {kind} zero map: padding bits set in the byte at offset {offset}")]
    ZeroMapPadding {
        /// The profile path.
        path: PathBuf,
        /// Page or chunk.
        kind: Kind,
        /// Byte offset.
        offset: u64,
    },
}

enum Backing {
    /// An open file, read with `pread` (never mapped: see the module docs).
    File(File),
    /// Bytes in memory.
    Owned(Vec<u8>),
}

/// Units per block of a scan (the records and zero-map bytes of one block
/// are read with one `pread` each).
const BLOCK_UNITS: u64 = 1 << 16;

/// A profile file, header validated; counters are read on demand.
pub struct Profile {
    path: PathBuf,
    data: Backing,
    header: ProfileHeader,
    layout: Layout,
    fingerprint: std::sync::OnceLock<u64>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Whether `bytes` start like a binary profile (the magic).
pub fn looks_binary(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..8] == MAGIC
}

impl Profile {
    /// Opens `path`, validating the header and the file size. The file
    /// stays open (not mapped); counters are read on demand.
    pub fn open(path: impl AsRef<Path>) -> Result<Profile, ProfileReadError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| ProfileReadError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER_LEN as u64 {
            return Err(ProfileReadError::TruncatedHeader {
                path,
                found: len,
                expected: HEADER_LEN as u64,
            });
        }
        let mut head = [0u8; HEADER_LEN];
        read_exact_at(&file, &path, 0, &mut head)?;
        Profile::from_parts(path, Backing::File(file), &head, len)
    }

    /// Reads a profile held in memory (tests, small tools).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Profile, ProfileReadError> {
        let path = PathBuf::from("<memory>");
        if bytes.len() < HEADER_LEN {
            return Err(ProfileReadError::TruncatedHeader {
                path,
                found: bytes.len() as u64,
                expected: HEADER_LEN as u64,
            });
        }
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(&bytes[..HEADER_LEN]);
        let len = bytes.len() as u64;
        Profile::from_parts(path, Backing::Owned(bytes), &head, len)
    }

    fn from_parts(
        path: PathBuf,
        data: Backing,
        head: &[u8; HEADER_LEN],
        found: u64,
    ) -> Result<Profile, ProfileReadError> {
        let raw = RawHeader::read_from_bytes(head).expect("HEADER_LEN bytes");
        let bad = |field, offset, value: u64, reason| ProfileReadError::BadHeader {
            path: path.clone(),
            field,
            offset,
            value,
            reason,
        };
        if raw.magic != MAGIC {
            return Err(ProfileReadError::BadMagic {
                path,
                found: raw.magic,
            });
        }
        if raw.version.get() != VERSION {
            return Err(ProfileReadError::UnsupportedVersion {
                path,
                found: raw.version.get(),
                supported: VERSION,
            });
        }
        if raw.header_len.get() as usize != HEADER_LEN {
            return Err(bad(
                "header_len",
                12,
                raw.header_len.get().into(),
                "version 1 headers are 128 bytes",
            ));
        }
        let flags = raw.flags.get();
        if flags & !FLAG_ZERO_MAPS != 0 {
            return Err(bad("flags", 16, flags.into(), "unknown flag bits"));
        }
        let header = ProfileHeader {
            samples: raw.samples.get(),
            interval_ns: raw.interval_ns.get(),
            page_size: raw.page_size.get(),
            chunk_size: raw.chunk_size.get(),
            page_count: raw.page_count.get(),
            chunk_count: raw.chunk_count.get(),
            state_bytes: raw.state_bytes.get(),
        };
        if let Err((field, value, reason)) = header.check() {
            let offset = match field {
                "samples" => 24,
                "interval_ns" => 40,
                "page_size" => 28,
                _ => 32,
            };
            return Err(bad(field, offset, value, reason));
        }
        let width = raw.counter_width.get();
        if !matches!(width, 1 | 2 | 4) {
            return Err(bad("counter_width", 20, width.into(), "must be 1, 2 or 4"));
        }
        if width < header.counter_width() {
            return Err(bad(
                "counter_width",
                20,
                width.into(),
                "too narrow for the sample count",
            ));
        }
        if raw.reserved0.get() != 0 || raw.reserved.iter().any(|&b| b != 0) {
            return Err(bad("reserved", 36, 0, "reserved header bytes must be zero"));
        }
        let layout = Layout::new(&header, width, flags & FLAG_ZERO_MAPS != 0).ok_or_else(|| {
            bad(
                "page_count",
                48,
                header.page_count,
                "unit counts overflow the file size",
            )
        })?;
        if found < layout.total {
            return Err(ProfileReadError::Truncated {
                path,
                expected: layout.total,
                found,
            });
        }
        if found > layout.total {
            return Err(ProfileReadError::TrailingData {
                path,
                expected: layout.total,
                found,
            });
        }
        Ok(Profile {
            path,
            data,
            header,
            layout,
            fingerprint: std::sync::OnceLock::new(),
        })
    }

    /// The `len` bytes at `offset`: borrowed from memory, or read into
    /// `buf` from the file.
    fn bytes<'a>(
        &'a self,
        offset: u64,
        len: usize,
        buf: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], ProfileReadError> {
        match &self.data {
            Backing::Owned(v) => Ok(&v[offset as usize..offset as usize + len]),
            Backing::File(file) => {
                buf.resize(len, 0);
                read_exact_at(file, &self.path, offset, buf)?;
                Ok(&buf[..])
            }
        }
    }

    /// The header.
    pub fn header(&self) -> &ProfileHeader {
        &self.header
    }

    /// The section layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The path the profile was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of units of a kind.
    pub fn count(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Page => self.header.page_count,
            Kind::Chunk => self.header.chunk_count,
        }
    }

    /// The counters of unit `index` of `kind` (unvalidated; panics when
    /// `index` is out of range).
    pub fn unit(&self, kind: Kind, index: u64) -> Result<UnitCounters, ProfileReadError> {
        assert!(index < self.count(kind), "{kind} {index} out of range");
        let w = self.layout.width;
        let (base, fields, zbase) = match kind {
            Kind::Page => (self.layout.pages, 2, self.layout.page_zero),
            Kind::Chunk => (self.layout.chunks, 3, self.layout.chunk_zero),
        };
        let mut buf = Vec::new();
        let off = base + index * (fields * w) as u64;
        let b = self.bytes(off, fields * w, &mut buf)?;
        let get = |i: usize| read_counter(&b[i * w..(i + 1) * w]);
        let (r, wc, o) = (get(0), get(1), if fields == 3 { get(2) } else { 0 });
        let zero = self.layout.zero_maps && {
            let z = self.bytes(zbase + index / 8, 1, &mut buf)?;
            z[0] >> (index % 8) & 1 == 1
        };
        Ok(UnitCounters { r, w: wc, o, zero })
    }

    /// A fingerprint of the profile's content (header figures and class
    /// histogram; [`ClassProfile::fingerprint`](crate::profile::ClassProfile::fingerprint)).
    /// Computed by one pass over the file unless already known (it is set by
    /// [`ClassProfile::from_profile`](crate::profile::ClassProfile::from_profile)).
    pub fn fingerprint(&self) -> Result<u64, ProfileReadError> {
        if let Some(&f) = self.fingerprint.get() {
            return Ok(f);
        }
        let c = crate::profile::ClassProfile::from_profile(self)?;
        Ok(c.fingerprint())
    }

    /// Records the fingerprint computed from this profile's classes.
    pub(crate) fn set_fingerprint(&self, f: u64) {
        let _ = self.fingerprint.set(f);
    }

    /// Calls `f(index, counters)` for every unit of `kind` in address order,
    /// validating as it goes. This is the one pass every whole-profile
    /// computation uses.
    pub fn for_each(
        &self,
        kind: Kind,
        mut f: impl FnMut(u64, UnitCounters),
    ) -> Result<(), ProfileReadError> {
        self.for_each_until(kind, |i, c| {
            f(i, c);
            ControlFlow::Continue(())
        })
    }

    /// Like [`Profile::for_each`], stopping early when `f` breaks (the
    /// units after that point are neither visited nor validated).
    pub fn for_each_until(
        &self,
        kind: Kind,
        f: impl FnMut(u64, UnitCounters) -> ControlFlow<()>,
    ) -> Result<(), ProfileReadError> {
        self.for_each_in(kind, 0..self.count(kind), f)
    }

    /// Like [`Profile::for_each_until`], over the units in `range` only
    /// (for splitting a scan across threads).
    pub fn for_each_in(
        &self,
        kind: Kind,
        range: std::ops::Range<u64>,
        f: impl FnMut(u64, UnitCounters) -> ControlFlow<()>,
    ) -> Result<(), ProfileReadError> {
        let range = range.start.min(self.count(kind))..range.end.min(self.count(kind));
        match self.layout.width {
            1 => self.scan::<1>(kind, range, f),
            2 => self.scan::<2>(kind, range, f),
            _ => self.scan::<4>(kind, range, f),
        }
    }

    fn scan<const W: usize>(
        &self,
        kind: Kind,
        range: std::ops::Range<u64>,
        mut f: impl FnMut(u64, UnitCounters) -> ControlFlow<()>,
    ) -> Result<(), ProfileReadError> {
        let n = self.header.samples;
        let count = self.count(kind);
        let (base, fields, zbase) = match kind {
            Kind::Page => (self.layout.pages, 2usize, self.layout.page_zero),
            Kind::Chunk => (self.layout.chunks, 3usize, self.layout.chunk_zero),
        };
        let rec = fields * W;
        let (mut rbuf, mut zbuf) = (Vec::new(), Vec::new());
        let mut i0 = range.start;
        while i0 < range.end {
            let i1 = (i0 + BLOCK_UNITS).min(range.end);
            // Zero-map bytes of units i0..i1.
            let (z0, z1) = (i0 / 8, (i1 - 1) / 8 + 1);
            let zmap: &[u8] = if self.layout.zero_maps {
                self.bytes(zbase + z0, (z1 - z0) as usize, &mut zbuf)?
            } else {
                &[]
            };
            let roff = base + i0 * rec as u64;
            let records = self.bytes(roff, (i1 - i0) as usize * rec, &mut rbuf)?;
            for (k, r) in records.chunks_exact(rec).enumerate() {
                let i = i0 + k as u64;
                let get = |k: usize| -> u32 {
                    let mut v = [0u8; 4];
                    v[..W].copy_from_slice(&r[k * W..(k + 1) * W]);
                    u32::from_le_bytes(v)
                };
                let c = UnitCounters {
                    r: get(0),
                    w: get(1),
                    o: if fields == 3 { get(2) } else { 0 },
                    zero: !zmap.is_empty() && zmap[(i / 8 - z0) as usize] >> (i % 8) & 1 == 1,
                };
                if c.r > n || c.w > n || c.o > n {
                    let (field, value, k) = if c.r > n {
                        ("r", c.r, 0)
                    } else if c.w > n {
                        ("w", c.w, 1)
                    } else {
                        ("o", c.o, 2)
                    };
                    return Err(ProfileReadError::CounterOutOfRange {
                        path: self.path.clone(),
                        kind,
                        index: i,
                        offset: base + i * rec as u64 + (k * W) as u64,
                        field,
                        value,
                        max: n,
                    });
                }
                if c.o > c.w {
                    return Err(ProfileReadError::OverwritesExceedWrites {
                        path: self.path.clone(),
                        index: i,
                        offset: base + i * rec as u64 + (2 * W) as u64,
                        o: c.o,
                        w: c.w,
                    });
                }
                if f(i, c).is_break() {
                    return Ok(());
                }
            }
            if i1 == count && count % 8 != 0 && !zmap.is_empty() {
                let last = zmap[zmap.len() - 1];
                if last >> (count % 8) != 0 {
                    return Err(ProfileReadError::ZeroMapPadding {
                        path: self.path.clone(),
                        kind,
                        offset: zbase + count.div_ceil(8) - 1,
                    });
                }
            }
            i0 = i1;
        }
        Ok(())
    }

    /// Calls `f(first, records, zero_map, zero_offset)` for the units of
    /// `kind` in `range`, block by block in address order: `records` holds
    /// the raw records of units `first..` (`2 x width` bytes per page, `3 x
    /// width` per chunk, little-endian counters), `zero_map` the zero-map
    /// bytes from byte `first / 8` (empty without zero maps; bit `i % 8` of
    /// byte `i / 8 - first / 8` is unit `i`). Nothing is validated: for fast
    /// scans over a profile already validated by its load pass. `f` returns
    /// `Break` to stop.
    pub fn for_each_block(
        &self,
        kind: Kind,
        range: std::ops::Range<u64>,
        mut f: impl FnMut(u64, &[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), ProfileReadError> {
        let range = range.start.min(self.count(kind))..range.end.min(self.count(kind));
        let w = self.layout.width;
        let (base, fields, zbase) = match kind {
            Kind::Page => (self.layout.pages, 2usize, self.layout.page_zero),
            Kind::Chunk => (self.layout.chunks, 3usize, self.layout.chunk_zero),
        };
        let rec = (fields * w) as u64;
        let (mut rbuf, mut zbuf) = (Vec::new(), Vec::new());
        let mut i0 = range.start;
        while i0 < range.end {
            let i1 = (i0 + 4 * BLOCK_UNITS).min(range.end);
            let (z0, z1) = (i0 / 8, (i1 - 1) / 8 + 1);
            let zmap: &[u8] = if self.layout.zero_maps {
                self.bytes(zbase + z0, (z1 - z0) as usize, &mut zbuf)?
            } else {
                &[]
            };
            let records = self.bytes(base + i0 * rec, ((i1 - i0) * rec) as usize, &mut rbuf)?;
            if f(i0, records, zmap).is_break() {
                return Ok(());
            }
            i0 = i1;
        }
        Ok(())
    }

    /// Validates every counter (one pass over the file).
    pub fn validate(&self) -> Result<(), ProfileReadError> {
        self.for_each(Kind::Page, |_, _| {})?;
        self.for_each(Kind::Chunk, |_, _| {})
    }
}

/// `pread` of exactly `buf.len()` bytes at `offset`; a short read means
/// the file shrank after it was opened ([`ProfileReadError::Changed`]).
fn read_exact_at(
    file: &File,
    path: &Path,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ProfileReadError> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(ProfileReadError::Changed {
                    path: path.to_path_buf(),
                    offset,
                    wanted: buf.len() as u64,
                    found: done as u64,
                });
            }
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ProfileReadError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    Ok(())
}

fn read_counter(b: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    v[..b.len()].copy_from_slice(b);
    u32::from_le_bytes(v)
}

/// Why a profile could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileWriteError {
    /// The output failed.
    #[error("writing the profile at offset {offset} failed")]
    Io {
        /// Byte offset being written.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
    /// The header is invalid.
    #[error("invalid profile header: {field} = {value}: {reason}")]
    BadHeader {
        /// Field name.
        field: &'static str,
        /// Value given.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A counter exceeds `n` or `o > w`, or a page has `o != 0`.
    #[error("{kind} {index}: invalid counters {counters:?} for n = {samples}")]
    BadCounters {
        /// Page or chunk.
        kind: Kind,
        /// Unit index.
        index: u64,
        /// The counters given.
        counters: UnitCounters,
        /// The sample count.
        samples: u32,
    },
    /// More units of a kind than the header announced, or chunks before all pages.
    #[error(
        "{kind} {index} pushed but the header announces {expected} {kind}s (pages go first, then chunks)"
    )]
    UnexpectedUnit {
        /// Page or chunk.
        kind: Kind,
        /// Index it would have.
        index: u64,
        /// Count in the header.
        expected: u64,
    },
    /// Fewer units than the header announced when finishing.
    #[error("{kind}s: {found} written, the header announces {expected}")]
    MissingUnits {
        /// Page or chunk.
        kind: Kind,
        /// Count in the header.
        expected: u64,
        /// Units written.
        found: u64,
    },
}

/// Streams a profile: the header, then every page in address order, then
/// every chunk. Memory use is the output buffer plus one bit per unit of the
/// section being written (its zero map, written at the end of the section).
///
/// ```no_run
/// use wanmig_planner::profile::{ProfileHeader, ProfileWriter, UnitCounters};
/// let header = ProfileHeader {
///     samples: 60, interval_ns: 1_000_000_000, page_size: 4096, chunk_size: 65536,
///     page_count: 2, chunk_count: 1, state_bytes: 300_000,
/// };
/// let mut w = ProfileWriter::create("guest.wmp", &header)?;
/// w.push_page(UnitCounters::rw(3, 1))?;
/// w.push_page(UnitCounters::ZERO)?;
/// w.push_chunk(UnitCounters { r: 0, w: 2, o: 2, zero: false })?;
/// w.finish()?;
/// # Ok::<(), wanmig_planner::profile::ProfileWriteError>(())
/// ```
pub struct ProfileWriter<W: Write> {
    out: W,
    header: ProfileHeader,
    width: usize,
    offset: u64,
    pages: u64,
    chunks: u64,
    zero_map: Vec<u8>,
    buf: Vec<u8>,
}

impl<W: Write> std::fmt::Debug for ProfileWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileWriter")
            .field("header", &self.header)
            .field("offset", &self.offset)
            .field("pages", &self.pages)
            .field("chunks", &self.chunks)
            .finish_non_exhaustive()
    }
}

impl ProfileWriter<BufWriter<AtomicFile>> {
    /// Starts writing the profile `path` atomically: the data goes to a
    /// temporary file in the same directory, and
    /// [`ProfileFileWriter::finish`] renames it over `path`. A reader of
    /// the old file (if any) is never disturbed; an unfinished writer
    /// leaves `path` untouched and removes its temporary file.
    // The constructor of the file writer lives here so that
    // `ProfileWriter::create(path, ..)` reads naturally.
    #[allow(clippy::new_ret_no_self)]
    pub fn create(
        path: impl AsRef<Path>,
        header: &ProfileHeader,
    ) -> Result<ProfileFileWriter, ProfileWriteError> {
        let file = AtomicFile::create(path)
            .map_err(|source| ProfileWriteError::Io { offset: 0, source })?;
        Ok(ProfileFileWriter {
            inner: ProfileWriter::new(BufWriter::with_capacity(1 << 20, file), header)?,
        })
    }
}

/// A profile being written to a file (see [`ProfileWriter::create`]).
#[derive(Debug)]
pub struct ProfileFileWriter {
    inner: ProfileWriter<BufWriter<AtomicFile>>,
}

impl ProfileFileWriter {
    /// Appends the next page (address order).
    pub fn push_page(&mut self, c: UnitCounters) -> Result<(), ProfileWriteError> {
        self.inner.push_page(c)
    }

    /// Appends the next chunk (address order, after every page).
    pub fn push_chunk(&mut self, c: UnitCounters) -> Result<(), ProfileWriteError> {
        self.inner.push_chunk(c)
    }

    /// Checks every announced unit was written, flushes, syncs and renames
    /// the file into place.
    pub fn finish(self) -> Result<(), ProfileWriteError> {
        let out = self.inner.finish()?;
        let offset = out.get_ref().written;
        let file = out.into_inner().map_err(|e| ProfileWriteError::Io {
            offset,
            source: e.into_error(),
        })?;
        file.commit()
            .map_err(|source| ProfileWriteError::Io { offset, source })
    }
}

/// A file written under a temporary name (`.NAME.tmp-PID-N`, created
/// exclusively, mode 0644 less the umask) in the destination's directory,
/// and renamed over the destination by [`AtomicFile::commit`] after an
/// `fsync`. Dropped without a commit, it removes the temporary file.
#[derive(Debug)]
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
    written: u64,
}

impl AtomicFile {
    /// Creates the temporary file for `path`.
    pub fn create(path: impl AsRef<Path>) -> io::Result<AtomicFile> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let path = path.as_ref().to_path_buf();
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let tmp_name = format!(
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = dir.map_or_else(|| PathBuf::from(&tmp_name), |d| d.join(&tmp_name));
        let file = File::options().write(true).create_new(true).open(&tmp)?;
        Ok(AtomicFile {
            file: Some(file),
            tmp,
            path,
            written: 0,
        })
    }

    /// Syncs the data and renames the file over the destination.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("committed once");
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.as_mut().expect("not committed").write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl<W: Write> ProfileWriter<W> {
    /// Writes the header to `out`.
    pub fn new(out: W, header: &ProfileHeader) -> Result<Self, ProfileWriteError> {
        if let Err((field, value, reason)) = header.check() {
            return Err(ProfileWriteError::BadHeader {
                field,
                value,
                reason,
            });
        }
        let width = header.counter_width();
        Layout::new(header, width, true).ok_or(ProfileWriteError::BadHeader {
            field: "page_count",
            value: header.page_count,
            reason: "unit counts overflow the file size",
        })?;
        let raw = RawHeader {
            magic: MAGIC,
            version: VERSION.into(),
            header_len: (HEADER_LEN as u32).into(),
            flags: FLAG_ZERO_MAPS.into(),
            counter_width: width.into(),
            samples: header.samples.into(),
            page_size: header.page_size.into(),
            chunk_size: header.chunk_size.into(),
            reserved0: 0.into(),
            interval_ns: header.interval_ns.into(),
            page_count: header.page_count.into(),
            chunk_count: header.chunk_count.into(),
            state_bytes: header.state_bytes.into(),
            reserved: [0; 56],
        };
        let mut w = ProfileWriter {
            out,
            header: *header,
            width: width as usize,
            offset: 0,
            pages: 0,
            chunks: 0,
            zero_map: Vec::new(),
            buf: Vec::with_capacity(1 << 16),
        };
        w.write(raw.as_bytes())?;
        w.zero_map = vec![0; header.page_count.div_ceil(8) as usize];
        if header.page_count == 0 {
            w.end_section(header.chunk_count)?;
        }
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), ProfileWriteError> {
        self.out
            .write_all(bytes)
            .map_err(|source| ProfileWriteError::Io {
                offset: self.offset,
                source,
            })?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<(), ProfileWriteError> {
        let buf = std::mem::take(&mut self.buf);
        let r = self.write(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    fn record(&mut self, kind: Kind, index: u64, c: UnitCounters) -> Result<(), ProfileWriteError> {
        let n = self.header.samples;
        if c.r > n || c.w > n || c.o > c.w || (kind == Kind::Page && c.o != 0) {
            return Err(ProfileWriteError::BadCounters {
                kind,
                index,
                counters: c,
                samples: n,
            });
        }
        let fields: &[u32] = match kind {
            Kind::Page => &[c.r, c.w],
            Kind::Chunk => &[c.r, c.w, c.o],
        };
        for &v in fields {
            self.buf.extend_from_slice(&v.to_le_bytes()[..self.width]);
        }
        if c.zero {
            self.zero_map[(index / 8) as usize] |= 1 << (index % 8);
        }
        if self.buf.len() >= 1 << 16 {
            self.flush_buf()?;
        }
        Ok(())
    }

    /// Appends the next page (address order).
    pub fn push_page(&mut self, c: UnitCounters) -> Result<(), ProfileWriteError> {
        if self.pages >= self.header.page_count {
            return Err(ProfileWriteError::UnexpectedUnit {
                kind: Kind::Page,
                index: self.pages,
                expected: self.header.page_count,
            });
        }
        self.record(Kind::Page, self.pages, c)?;
        self.pages += 1;
        if self.pages == self.header.page_count {
            self.end_section(self.header.chunk_count)?;
        }
        Ok(())
    }

    fn end_section(&mut self, next_count: u64) -> Result<(), ProfileWriteError> {
        self.flush_buf()?;
        let map = std::mem::take(&mut self.zero_map);
        self.write(&map)?;
        self.zero_map = vec![0; next_count.div_ceil(8) as usize];
        Ok(())
    }

    /// Appends the next chunk (address order, after every page).
    pub fn push_chunk(&mut self, c: UnitCounters) -> Result<(), ProfileWriteError> {
        if self.pages < self.header.page_count || self.chunks >= self.header.chunk_count {
            return Err(ProfileWriteError::UnexpectedUnit {
                kind: Kind::Chunk,
                index: self.chunks,
                expected: self.header.chunk_count,
            });
        }
        self.record(Kind::Chunk, self.chunks, c)?;
        self.chunks += 1;
        if self.chunks == self.header.chunk_count {
            self.end_section(0)?;
        }
        Ok(())
    }

    /// Checks every announced unit was written, flushes, and returns the output.
    pub fn finish(mut self) -> Result<W, ProfileWriteError> {
        if self.pages < self.header.page_count {
            return Err(ProfileWriteError::MissingUnits {
                kind: Kind::Page,
                expected: self.header.page_count,
                found: self.pages,
            });
        }
        if self.chunks < self.header.chunk_count {
            return Err(ProfileWriteError::MissingUnits {
                kind: Kind::Chunk,
                expected: self.header.chunk_count,
                found: self.chunks,
            });
        }
        self.flush_buf()?;
        self.out.flush().map_err(|source| ProfileWriteError::Io {
            offset: self.offset,
            source,
        })?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::ClassProfile;

    fn header(samples: u32, pages: u64, chunks: u64) -> ProfileHeader {
        ProfileHeader {
            samples,
            interval_ns: 500_000_000,
            page_size: 4096,
            chunk_size: 65536,
            page_count: pages,
            chunk_count: chunks,
            state_bytes: 12345,
        }
    }

    fn units(samples: u32, pages: u64, chunks: u64) -> (Vec<UnitCounters>, Vec<UnitCounters>) {
        let p = (0..pages)
            .map(|i| UnitCounters {
                r: (i * 7 % (samples as u64 + 1)) as u32,
                w: (i * 3 % (samples as u64 + 1)) as u32,
                o: 0,
                zero: i % 5 == 0,
            })
            .collect();
        let c = (0..chunks)
            .map(|i| {
                let w = (i * 5 % (samples as u64 + 1)) as u32;
                UnitCounters {
                    r: (i % (samples as u64 + 1)) as u32,
                    w,
                    o: w / 2,
                    zero: i % 3 == 0,
                }
            })
            .collect();
        (p, c)
    }

    fn write(samples: u32, pages: u64, chunks: u64) -> Vec<u8> {
        let (p, c) = units(samples, pages, chunks);
        let mut w = ProfileWriter::new(Vec::new(), &header(samples, pages, chunks)).unwrap();
        p.into_iter().for_each(|u| w.push_page(u).unwrap());
        c.into_iter().for_each(|u| w.push_chunk(u).unwrap());
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_preserves_every_unit() {
        for (samples, pages, chunks) in [
            (60, 37, 11),
            (300, 9, 17),
            (65_535, 3, 2),
            (5, 0, 4),
            (5, 4, 0),
            (1, 0, 0),
        ] {
            let bytes = write(samples, pages, chunks);
            let p = Profile::from_bytes(bytes).unwrap();
            let h = header(samples, pages, chunks);
            assert_eq!(p.header(), &h);
            assert_eq!(p.layout().width as u32, h.counter_width());
            let (up, uc) = units(samples, pages, chunks);
            for (i, u) in up.iter().enumerate() {
                assert_eq!(p.unit(Kind::Page, i as u64).unwrap(), *u);
            }
            for (i, u) in uc.iter().enumerate() {
                assert_eq!(p.unit(Kind::Chunk, i as u64).unwrap(), *u);
            }
            let classes = ClassProfile::from_profile(&p).unwrap();
            let direct = ClassProfile::from_units(samples, 0.5, 4096, 65536, 12345, &up, &uc);
            assert_eq!(classes, direct);
        }
    }

    #[test]
    fn one_byte_counters_cost_a_few_bytes_per_unit() {
        let bytes = write(255, 800, 800);
        let body = bytes.len() - HEADER_LEN;
        assert_eq!(body, 800 * 2 + 100 + 800 * 3 + 100);
    }

    fn read(bytes: Vec<u8>) -> ProfileReadError {
        Profile::from_bytes(bytes)
            .and_then(|p| p.validate().map(|_| p))
            .unwrap_err()
    }

    #[test]
    fn header_errors_are_typed() {
        let good = write(60, 16, 8);
        assert!(matches!(
            read(good[..100].to_vec()),
            ProfileReadError::TruncatedHeader { found: 100, .. }
        ));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(read(b), ProfileReadError::BadMagic { .. }));
        let mut b = good.clone();
        b[8] = 2;
        assert!(matches!(
            read(b),
            ProfileReadError::UnsupportedVersion { found: 2, .. }
        ));
        let mut b = good.clone();
        b[12] = 64;
        assert!(matches!(
            read(b),
            ProfileReadError::BadHeader {
                field: "header_len",
                offset: 12,
                ..
            }
        ));
        let mut b = good.clone();
        b[16] |= 4;
        assert!(matches!(
            read(b),
            ProfileReadError::BadHeader { field: "flags", .. }
        ));
        let mut b = good.clone();
        b[20] = 3;
        assert!(matches!(
            read(b),
            ProfileReadError::BadHeader {
                field: "counter_width",
                ..
            }
        ));
        let mut b = write(300, 4, 4);
        b[20] = 1;
        assert!(matches!(
            read(b),
            ProfileReadError::BadHeader { field: "counter_width", reason, .. } if reason.contains("narrow")
        ));
        let mut b = good.clone();
        b[24..28].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read(b),
            ProfileReadError::BadHeader {
                field: "samples",
                offset: 24,
                ..
            }
        ));
        // n above 65535 (would need 4-byte counters and huge tables).
        let mut b = good.clone();
        b[20] = 4;
        b[24..28].copy_from_slice(&65_536u32.to_le_bytes());
        assert!(matches!(
            read(b),
            ProfileReadError::BadHeader {
                field: "samples",
                offset: 24,
                value: 65_536,
                ..
            }
        ));
        let mut b = good.clone();
        b[40..48].copy_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            read(b),
            ProfileReadError::BadHeader {
                field: "interval_ns",
                offset: 40,
                ..
            }
        ));
        let mut b = good.clone();
        b[100] = 1;
        assert!(matches!(
            read(b),
            ProfileReadError::BadHeader {
                field: "reserved",
                ..
            }
        ));
        let mut b = good.clone();
        b[48..56].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read(b),
            ProfileReadError::BadHeader {
                field: "page_count",
                ..
            }
        ));
    }

    #[test]
    fn size_errors_are_typed() {
        let good = write(60, 16, 8);
        let n = good.len() as u64;
        assert!(matches!(
            read(good[..good.len() - 1].to_vec()),
            ProfileReadError::Truncated { expected, found, .. } if expected == n && found == n - 1
        ));
        let mut b = good.clone();
        b.push(0);
        assert!(
            matches!(read(b), ProfileReadError::TrailingData { expected, .. } if expected == n)
        );
    }

    #[test]
    fn counter_errors_name_unit_and_offset() {
        let good = write(60, 16, 8);
        let p = Profile::from_bytes(good.clone()).unwrap();
        let l = *p.layout();
        // Page 5's w counter.
        let mut b = good.clone();
        let off = l.pages as usize + 5 * 2 + 1;
        b[off] = 61;
        match read(b) {
            ProfileReadError::CounterOutOfRange {
                kind: Kind::Page,
                index: 5,
                offset,
                field: "w",
                value: 61,
                max: 60,
                ..
            } => {
                assert_eq!(offset, off as u64)
            }
            e => panic!("{e}"),
        }
        // Chunk 3's o counter above its w.
        let mut b = good.clone();
        let base = l.chunks as usize + 3 * 3;
        b[base + 1] = 2;
        b[base + 2] = 3;
        match read(b) {
            ProfileReadError::OverwritesExceedWrites {
                index: 3,
                offset,
                o: 3,
                w: 2,
                ..
            } => {
                assert_eq!(offset, base as u64 + 2)
            }
            e => panic!("{e}"),
        }
        // A set padding bit in the chunk zero map (8 chunks: no padding) and
        // the page map (16 pages: none either), so use 10 pages.
        let good = write(60, 10, 8);
        let p = Profile::from_bytes(good.clone()).unwrap();
        let mut b = good.clone();
        let last = p.layout().page_zero as usize + 1;
        b[last] |= 0x80;
        assert!(matches!(
            read(b),
            ProfileReadError::ZeroMapPadding {
                kind: Kind::Page,
                ..
            }
        ));
        // Messages carry the offset.
        let mut b = good;
        b[p.layout().pages as usize] = 200;
        let msg = read(b).to_string();
        assert!(
            msg.contains("offset 128") && msg.contains("page 0"),
            "{msg}"
        );
    }

    #[test]
    fn writer_refuses_bad_counters_and_counts() {
        let h = header(10, 2, 1);
        let mut w = ProfileWriter::new(Vec::new(), &h).unwrap();
        assert!(matches!(
            w.push_page(UnitCounters::rw(11, 0)),
            Err(ProfileWriteError::BadCounters { .. })
        ));
        assert!(matches!(
            w.push_chunk(UnitCounters::rw(1, 1)),
            Err(ProfileWriteError::UnexpectedUnit {
                kind: Kind::Chunk,
                ..
            })
        ));
        w.push_page(UnitCounters::rw(1, 1)).unwrap();
        w.push_page(UnitCounters::rw(1, 1)).unwrap();
        assert!(matches!(
            w.push_page(UnitCounters::rw(1, 1)),
            Err(ProfileWriteError::UnexpectedUnit { .. })
        ));
        let bad = UnitCounters {
            r: 0,
            w: 1,
            o: 2,
            zero: false,
        };
        assert!(matches!(
            w.push_chunk(bad),
            Err(ProfileWriteError::BadCounters { .. })
        ));
        assert!(matches!(
            w.finish(),
            Err(ProfileWriteError::MissingUnits {
                kind: Kind::Chunk,
                expected: 1,
                found: 0
            })
        ));
        let mut bad_header = h;
        bad_header.samples = 0;
        assert!(matches!(
            ProfileWriter::new(Vec::new(), &bad_header),
            Err(ProfileWriteError::BadHeader { .. })
        ));
    }

    #[test]
    fn files_are_read_on_demand() {
        let dir = std::env::temp_dir().join(format!("wanmig-format-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.wmp");
        std::fs::write(&path, write(60, 33, 5)).unwrap();
        let p = Profile::open(&path).unwrap();
        assert_eq!(p.count(Kind::Page), 33);
        p.validate().unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            Profile::open(&path),
            Err(ProfileReadError::TruncatedHeader { found: 5, .. })
        ));
        assert!(matches!(
            Profile::open(dir.join("missing")),
            Err(ProfileReadError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A profile truncated in place while open (what a program rewriting
    /// it with `File::create` does) gives a typed error, not SIGBUS as a
    /// memory-mapped reader would.
    #[test]
    fn truncation_in_place_while_open_is_an_error_not_a_crash() {
        let dir = std::env::temp_dir().join(format!("wanmig-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.wmp");
        std::fs::write(&path, write(60, 100_000, 5000)).unwrap();
        let p = Profile::open(&path).unwrap();
        std::fs::File::create(&path).unwrap(); // truncate to 0 in place
        match p.validate() {
            Err(ProfileReadError::Changed { found, .. }) => assert_eq!(found, 0),
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            p.unit(Kind::Chunk, 4999),
            Err(ProfileReadError::Changed { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `ProfileWriter::create` writes a temporary file and renames it into
    /// place: an open reader keeps the old, complete file; an unfinished
    /// writer leaves the destination untouched and no temporary file.
    #[test]
    fn file_writers_replace_profiles_atomically() {
        let dir = std::env::temp_dir().join(format!("wanmig-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.wmp");
        let old = write(60, 64, 8);
        std::fs::write(&path, &old).unwrap();
        let reader = Profile::open(&path).unwrap();
        let h = header(60, 2, 1);
        let mut w = ProfileWriter::create(&path, &h).unwrap();
        w.push_page(UnitCounters::rw(3, 1)).unwrap();
        // Mid-write: the destination is still the old file.
        assert_eq!(std::fs::read(&path).unwrap(), old);
        w.push_page(UnitCounters::ZERO).unwrap();
        w.push_chunk(UnitCounters {
            r: 0,
            w: 2,
            o: 2,
            zero: false,
        })
        .unwrap();
        w.finish().unwrap();
        let new = Profile::open(&path).unwrap();
        assert_eq!(new.count(Kind::Page), 2);
        // The reader still sees the old profile, complete.
        assert_eq!(reader.count(Kind::Page), 64);
        reader.validate().unwrap();
        // An abandoned writer leaves nothing behind.
        let mut w = ProfileWriter::create(&path, &h).unwrap();
        w.push_page(UnitCounters::rw(1, 1)).unwrap();
        drop(w);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("p.wmp")]);
        assert_eq!(Profile::open(&path).unwrap().count(Kind::Page), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
