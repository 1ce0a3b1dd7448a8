//! The fixed 32-byte frame header and the small enums carried in it.
//!
//! Every frame on a wanmig connection starts with a [`Header`]. Its layout is
//! frozen: a later protocol version may add frame types or payload layouts, but
//! the header keeps these offsets so that version negotiation itself can be read
//! by every version (handshake frames always carry [`HANDSHAKE_VERSION`]).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 32;
/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"WMIG";
/// Highest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Lowest protocol version this build speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Version written in the header of handshake frames, whatever gets negotiated.
pub const HANDSHAKE_VERSION: u16 = 1;
/// Hard cap on a frame's payload, whatever the geometry says.
pub const MAX_PAYLOAD: u32 = 16 << 20;

/// Header flag: the payload is an LZ4 block (lz4_flex block format).
pub const FLAG_LZ4: u8 = 1 << 0;
/// Header flag: the unit is all zeros; the payload is empty.
pub const FLAG_ZERO: u8 = 1 << 1;
/// Every flag bit this version knows; any other bit set is an error.
pub const KNOWN_FLAGS: u8 = FLAG_LZ4 | FLAG_ZERO;

/// The fixed little-endian frame header.
///
/// | offset | size | field         | meaning                                              |
/// |-------:|-----:|---------------|------------------------------------------------------|
/// | 0      | 4    | `magic`       | `b"WMIG"`                                            |
/// | 4      | 2    | `version`     | negotiated version (handshake: [`HANDSHAKE_VERSION`])|
/// | 6      | 1    | `frame_type`  | [`FrameType`]                                        |
/// | 7      | 1    | `flags`       | [`FLAG_LZ4`], [`FLAG_ZERO`]                          |
/// | 8      | 1    | `unit_kind`   | [`UnitKind`] ([`UnitKind::Control`] for non-units)   |
/// | 9      | 3    | `reserved`    | zero                                                 |
/// | 12     | 4    | `payload_len` | bytes after the header                               |
/// | 16     | 8    | `unit_index`  | unit index (Unit, Request), else zero                |
/// | 24     | 4    | `unit_len`    | uncompressed unit length (Unit), count (Request)     |
/// | 28     | 4    | `crc32`       | CRC32 of the header with this field zeroed, then payload |
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// Protocol version of this frame.
    pub version: U16,
    /// Raw [`FrameType`].
    pub frame_type: u8,
    /// Flag bits ([`FLAG_LZ4`], [`FLAG_ZERO`]).
    pub flags: u8,
    /// Raw [`UnitKind`].
    pub unit_kind: u8,
    /// Must be zero.
    pub reserved: [u8; 3],
    /// Number of payload bytes following the header.
    pub payload_len: U32,
    /// Unit index (Unit and Request frames), zero otherwise.
    pub unit_index: U64,
    /// Uncompressed unit length (Unit), unit count (Request), zero otherwise.
    pub unit_len: U32,
    /// CRC32 over the header with this field zeroed, then the payload.
    pub crc32: U32,
}

const _: () = assert!(core::mem::size_of::<Header>() == HEADER_LEN);

impl Header {
    /// A header with the given fields and a zero CRC (see [`Header::seal`]).
    pub fn new(frame_type: FrameType, flags: u8, kind: UnitKind, payload_len: u32) -> Self {
        let version = if frame_type.is_handshake() {
            HANDSHAKE_VERSION
        } else {
            PROTOCOL_VERSION
        };
        Self {
            magic: MAGIC,
            version: U16::new(version),
            frame_type: frame_type as u8,
            flags,
            unit_kind: kind as u8,
            reserved: [0; 3],
            payload_len: U32::new(payload_len),
            unit_index: U64::ZERO,
            unit_len: U32::ZERO,
            crc32: U32::ZERO,
        }
    }

    /// The same header with `unit_index` and `unit_len` set.
    pub fn with_unit(mut self, unit_index: u64, unit_len: u32) -> Self {
        self.unit_index = U64::new(unit_index);
        self.unit_len = U32::new(unit_len);
        self
    }

    /// CRC32 of this header (with its `crc32` field taken as zero) followed by `payload`.
    pub fn compute_crc(&self, payload: &[u8]) -> u32 {
        let mut zeroed = *self;
        zeroed.crc32 = U32::ZERO;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(zeroed.as_bytes());
        hasher.update(payload);
        hasher.finalize()
    }

    /// Sets `crc32` to the CRC of this header and `payload`.
    pub fn seal(&mut self, payload: &[u8]) {
        self.crc32 = U32::new(self.compute_crc(payload));
    }
}

/// What a frame is. Values 1..=5 are handshake frames, the rest flow after it.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// Client → server: versions, connection kind, migration id, nonce, geometry.
    Hello = 1,
    /// Server → client: chosen version, server nonce, server proof.
    Challenge = 2,
    /// Client → server: client proof.
    Auth = 3,
    /// Server → client: handshake accepted.
    Accept = 4,
    /// Either side: handshake refused, with a reason.
    Reject = 5,
    /// A page, chunk or device-state piece.
    Unit = 0x10,
    /// Post-copy fault request: `count` units from `index` (empty payload).
    Request = 0x11,
    /// A [`ControlMsg`](super::ControlMsg) (round boundaries, freeze, done, …).
    Control = 0x20,
    /// RTT probe: nonce + sender timestamp.
    Ping = 0x21,
    /// Answer to a [`FrameType::Ping`], echoing its payload.
    Pong = 0x22,
    /// Orderly end of a connection.
    Goodbye = 0x30,
    /// CRC32 digests of consecutive units as the source froze them, for the
    /// destination's end-to-end integrity check: `unit_index` = first unit,
    /// `unit_len` = count, payload = `count` little-endian u32.
    Digest = 0x40,
}

impl FrameType {
    /// True for the frames exchanged during the handshake.
    pub fn is_handshake(self) -> bool {
        matches!(
            self,
            Self::Hello | Self::Challenge | Self::Auth | Self::Accept | Self::Reject
        )
    }
}

impl TryFrom<u8> for FrameType {
    type Error = u8;

    fn try_from(raw: u8) -> Result<Self, u8> {
        Ok(match raw {
            1 => Self::Hello,
            2 => Self::Challenge,
            3 => Self::Auth,
            4 => Self::Accept,
            5 => Self::Reject,
            0x10 => Self::Unit,
            0x11 => Self::Request,
            0x20 => Self::Control,
            0x21 => Self::Ping,
            0x22 => Self::Pong,
            0x30 => Self::Goodbye,
            0x40 => Self::Digest,
            other => return Err(other),
        })
    }
}

/// What a unit is; [`UnitKind::Control`] marks frames that carry no unit.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitKind {
    /// A guest memory page (`page_size` bytes).
    Page = 1,
    /// A storage chunk (up to `chunk_size` bytes; the last one may be short).
    Chunk = 2,
    /// A piece of the hypervisor's device state (up to 1 MiB).
    DeviceState = 3,
    /// Not a unit: handshake, request-less control, ping, goodbye frames.
    Control = 4,
}

impl TryFrom<u8> for UnitKind {
    type Error = u8;

    fn try_from(raw: u8) -> Result<Self, u8> {
        Ok(match raw {
            1 => Self::Page,
            2 => Self::Chunk,
            3 => Self::DeviceState,
            4 => Self::Control,
            other => return Err(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_offsets() {
        let mut h = Header::new(FrameType::Unit, FLAG_LZ4, UnitKind::Chunk, 0x0102_0304)
            .with_unit(0x1122_3344_5566_7788, 0x99aa_bbcc);
        h.crc32 = U32::new(0xdead_beef);
        let b = h.as_bytes();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(&b[0..4], b"WMIG");
        assert_eq!(&b[4..6], &1u16.to_le_bytes());
        assert_eq!(b[6], 0x10);
        assert_eq!(b[7], FLAG_LZ4);
        assert_eq!(b[8], 2);
        assert_eq!(&b[9..12], &[0, 0, 0]);
        assert_eq!(&b[12..16], &0x0102_0304u32.to_le_bytes());
        assert_eq!(&b[16..24], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[24..28], &0x99aa_bbccu32.to_le_bytes());
        assert_eq!(&b[28..32], &0xdead_beefu32.to_le_bytes());
    }

    #[test]
    fn crc_ignores_its_own_field() {
        let mut h = Header::new(FrameType::Goodbye, 0, UnitKind::Control, 0);
        let before = h.compute_crc(b"");
        h.crc32 = U32::new(7);
        assert_eq!(h.compute_crc(b""), before);
        h.seal(b"");
        assert_eq!(h.crc32.get(), before);
    }

    #[test]
    fn enums_round_trip_through_u8() {
        for raw in 0..=u8::MAX {
            if let Ok(t) = FrameType::try_from(raw) {
                assert_eq!(t as u8, raw);
                assert_eq!(t.is_handshake(), (1..=5).contains(&raw));
            }
            if let Ok(k) = UnitKind::try_from(raw) {
                assert_eq!(k as u8, raw);
            }
        }
        assert_eq!(FrameType::try_from(0x12), Err(0x12));
        assert_eq!(UnitKind::try_from(0), Err(0));
    }
}
