//! Frame encoding (zero-allocation, into caller buffers) and streaming decoding.

use thiserror::Error;
use zerocopy::{FromBytes, IntoBytes};

use super::geometry::{DEVICE_STATE_PIECE, Limits, MAX_DIGEST_UNITS, MAX_REQUEST_UNITS};
use super::header::{
    FLAG_LZ4, FLAG_ZERO, FrameType, HANDSHAKE_VERSION, HEADER_LEN, Header, KNOWN_FLAGS, MAGIC,
    MAX_PAYLOAD, UnitKind,
};
use super::msg::{
    Auth, AuthWire, Challenge, ChallengeWire, ControlCode, ControlMsg, Hello, HelloWire,
    MAX_HANDSHAKE_PAYLOAD, PingMsg, PingWire, Reject, RejectWire, fixed_payload_len,
};

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Whether [`encode_unit`] may try LZ4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Send non-zero units raw.
    None,
    /// Try LZ4; keep it only when strictly smaller than the raw unit.
    Lz4,
}

/// How a unit went on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Payload = the unit's bytes.
    Raw,
    /// Payload = an LZ4 block.
    Lz4,
    /// All-zero unit: ZERO flag, empty payload.
    Zero,
}

/// What [`encode_unit`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncodedUnit {
    /// Frame length (header + payload): send `out[..len]`.
    pub len: usize,
    /// How the unit was encoded.
    pub encoding: Encoding,
    /// Payload bytes (0 for [`Encoding::Zero`]).
    pub payload_len: usize,
}

/// Why a frame could not be encoded (always a caller bug, never peer data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The output buffer is shorter than [`encode_buffer_len`] / the frame.
    #[error("output buffer of {got} bytes, need {needed}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// Units are at least one byte long.
    #[error("empty {kind:?} unit")]
    EmptyUnit {
        /// Kind of the unit.
        kind: UnitKind,
    },
    /// The unit is longer than [`MAX_PAYLOAD`].
    #[error("{kind:?} unit of {len} bytes is above the {max}-byte cap")]
    UnitTooLarge {
        /// Kind of the unit.
        kind: UnitKind,
        /// Its length.
        len: usize,
        /// [`MAX_PAYLOAD`].
        max: u32,
    },
    /// [`UnitKind::Control`] is not a unit kind (or a Request for device state).
    #[error("{kind:?} cannot be sent in a {frame_type:?} frame")]
    WrongKind {
        /// The frame being encoded.
        frame_type: FrameType,
        /// The refused kind.
        kind: UnitKind,
    },
    /// A Digest frame for zero or more than [`MAX_DIGEST_UNITS`] units.
    #[error("digest frame for {count} units (allowed 1..={max})")]
    DigestCount {
        /// Digests given.
        count: usize,
        /// [`MAX_DIGEST_UNITS`].
        max: u32,
    },
    /// A Request for zero or more than [`MAX_REQUEST_UNITS`] units.
    #[error("request for {count} units (allowed 1..={max})")]
    RequestCount {
        /// Requested count.
        count: u32,
        /// [`MAX_REQUEST_UNITS`].
        max: u32,
    },
}

/// Longest frame a unit of `unit_len` bytes can produce on the wire:
/// `HEADER_LEN + unit_len` (LZ4 is only sent when strictly smaller than raw).
pub const fn max_frame_len(unit_len: usize) -> usize {
    HEADER_LEN.saturating_add(unit_len)
}

/// Size the output buffer given to [`encode_unit`] must have for a unit of
/// `unit_len` bytes. With [`Compression::Lz4`] it is larger than
/// [`max_frame_len`]: the LZ4 encoder needs its worst-case output size as
/// scratch space even though only results smaller than raw are kept.
pub const fn encode_buffer_len(unit_len: usize, compression: Compression) -> usize {
    match compression {
        Compression::None => max_frame_len(unit_len),
        Compression::Lz4 => {
            HEADER_LEN.saturating_add(lz4_flex::block::get_maximum_output_size(unit_len))
        }
    }
}

/// True when every byte of `data` is zero (compares 64-byte blocks as u128 lanes).
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        let acc = block.chunks_exact(16).fold(0u128, |acc, lane| {
            acc | u128::from_ne_bytes(<[u8; 16]>::try_from(lane).unwrap_or([1; 16]))
        });
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

fn buffer(out: &mut [u8], needed: usize) -> Result<&mut [u8], EncodeError> {
    let got = out.len();
    out.get_mut(..needed)
        .ok_or(EncodeError::BufferTooSmall { needed, got })
}

/// Writes `header` (sealed over `out[HEADER_LEN..HEADER_LEN + payload_len]`)
/// into `out`, which must already hold the payload. Returns the frame length.
fn seal_in_place(out: &mut [u8], mut header: Header) -> Result<usize, EncodeError> {
    let len = max_frame_len(header.payload_len.get() as usize);
    let frame = buffer(out, len)?;
    let (head, payload) = frame.split_at_mut(HEADER_LEN);
    header.seal(payload);
    head.copy_from_slice(header.as_bytes());
    Ok(len)
}

/// Copies `payload` after the header and seals the frame. Returns its length.
fn write_frame(out: &mut [u8], header: Header, payload: &[u8]) -> Result<usize, EncodeError> {
    let frame = buffer(out, max_frame_len(payload.len()))?;
    if let Some(dst) = frame.get_mut(HEADER_LEN..) {
        dst.copy_from_slice(payload);
    }
    seal_in_place(out, header)
}

fn payload_u32(len: usize) -> u32 {
    // Callers only pass lengths bounded by MAX_PAYLOAD.
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Encodes one unit into `out` and returns what was written (`out[..len]`).
///
/// `data` must be the caller's private copy of the unit: guest memory can change
/// under a concurrent writer, and the zero check, LZ4 and the CRC must all see
/// the same bytes. Copy the page/chunk out of guest memory into a scratch
/// buffer first (one `memcpy`, reused across units), then call this with the
/// send buffer as `out`.
///
/// Order: all-zero → ZERO flag and empty payload; else with [`Compression::Lz4`]
/// an LZ4 block if strictly smaller; else the raw bytes. `out` must be at least
/// [`encode_buffer_len`]`(data.len(), compress)` long. Only [`MAX_PAYLOAD`] is
/// checked here; the peer checks the geometry (page units must be exactly
/// `page_size`, chunks at most `chunk_size`, device-state pieces at most 1 MiB).
pub fn encode_unit(
    out: &mut [u8],
    kind: UnitKind,
    index: u64,
    data: &[u8],
    compress: Compression,
) -> Result<EncodedUnit, EncodeError> {
    if kind == UnitKind::Control {
        return Err(EncodeError::WrongKind {
            frame_type: FrameType::Unit,
            kind,
        });
    }
    if data.is_empty() {
        return Err(EncodeError::EmptyUnit { kind });
    }
    if data.len() > MAX_PAYLOAD as usize {
        return Err(EncodeError::UnitTooLarge {
            kind,
            len: data.len(),
            max: MAX_PAYLOAD,
        });
    }
    let unit_len = payload_u32(data.len());
    buffer(out, encode_buffer_len(data.len(), compress))?;
    let (encoding, payload_len) = place_payload(out, data, compress);
    let flags = match encoding {
        Encoding::Raw => 0,
        Encoding::Lz4 => FLAG_LZ4,
        Encoding::Zero => FLAG_ZERO,
    };
    let header = Header::new(FrameType::Unit, flags, kind, payload_u32(payload_len))
        .with_unit(index, unit_len);
    let len = seal_in_place(out, header)?;
    Ok(EncodedUnit {
        len,
        encoding,
        payload_len,
    })
}

/// Writes the payload of a unit after the header; `out` is large enough.
fn place_payload(out: &mut [u8], data: &[u8], compress: Compression) -> (Encoding, usize) {
    if is_zero(data) {
        return (Encoding::Zero, 0);
    }
    let Some(body) = out.get_mut(HEADER_LEN..) else {
        return (Encoding::Raw, 0); // unreachable: `out` was length-checked
    };
    if compress == Compression::Lz4 {
        if let Ok(n) = lz4_flex::block::compress_into(data, body) {
            if n < data.len() {
                return (Encoding::Lz4, n);
            }
        }
    }
    if let Some(dst) = body.get_mut(..data.len()) {
        dst.copy_from_slice(data);
    }
    (Encoding::Raw, data.len())
}

/// Encodes a post-copy fault Request for `count` consecutive units of `kind`
/// (Page or Chunk) from `index`. Returns the frame length ([`HEADER_LEN`]).
pub fn encode_request(
    out: &mut [u8],
    kind: UnitKind,
    index: u64,
    count: u32,
) -> Result<usize, EncodeError> {
    if !matches!(kind, UnitKind::Page | UnitKind::Chunk) {
        return Err(EncodeError::WrongKind {
            frame_type: FrameType::Request,
            kind,
        });
    }
    if count == 0 || count > MAX_REQUEST_UNITS {
        return Err(EncodeError::RequestCount {
            count,
            max: MAX_REQUEST_UNITS,
        });
    }
    let header = Header::new(FrameType::Request, 0, kind, 0).with_unit(index, count);
    write_frame(out, header, &[])
}

/// Encodes a Control frame. Returns its length.
pub fn encode_control(out: &mut [u8], code: ControlCode) -> Result<usize, EncodeError> {
    let msg = code.to_wire();
    write_plain(out, FrameType::Control, msg.as_bytes())
}

/// Encodes a Ping frame. Returns its length.
pub fn encode_ping(out: &mut [u8], ping: PingMsg) -> Result<usize, EncodeError> {
    write_plain(out, FrameType::Ping, ping.to_wire().as_bytes())
}

/// Encodes a Pong frame (echo the Ping's [`PingMsg`]). Returns its length.
pub fn encode_pong(out: &mut [u8], pong: PingMsg) -> Result<usize, EncodeError> {
    write_plain(out, FrameType::Pong, pong.to_wire().as_bytes())
}

/// Encodes a Goodbye frame. Returns its length ([`HEADER_LEN`]).
pub fn encode_goodbye(out: &mut [u8]) -> Result<usize, EncodeError> {
    write_plain(out, FrameType::Goodbye, &[])
}

/// Encodes the CRC32 digests of units `first..first + crcs.len()` of `kind`
/// (Page or Chunk). `out` must hold `HEADER_LEN + 4 * crcs.len()` bytes.
pub fn encode_digest(
    out: &mut [u8],
    kind: UnitKind,
    first: u64,
    crcs: &[u32],
) -> Result<usize, EncodeError> {
    if !matches!(kind, UnitKind::Page | UnitKind::Chunk) {
        return Err(EncodeError::WrongKind {
            frame_type: FrameType::Digest,
            kind,
        });
    }
    if crcs.is_empty() || crcs.len() > MAX_DIGEST_UNITS as usize {
        return Err(EncodeError::DigestCount {
            count: crcs.len(),
            max: MAX_DIGEST_UNITS,
        });
    }
    let payload_len = crcs.len() * 4;
    buffer(out, max_frame_len(payload_len))?;
    if let Some(body) = out.get_mut(HEADER_LEN..HEADER_LEN + payload_len) {
        for (dst, crc) in body.chunks_exact_mut(4).zip(crcs) {
            dst.copy_from_slice(&crc.to_le_bytes());
        }
    }
    let header = Header::new(FrameType::Digest, 0, kind, payload_u32(payload_len))
        .with_unit(first, payload_u32(crcs.len()));
    seal_in_place(out, header)
}

/// A frame without unit fields (kind Control, no flags).
fn write_plain(
    out: &mut [u8],
    frame_type: FrameType,
    payload: &[u8],
) -> Result<usize, EncodeError> {
    let header = Header::new(frame_type, 0, UnitKind::Control, payload_u32(payload.len()));
    write_frame(out, header, payload)
}

// ---------------------------------------------------------------------------
// Owned frames (tests, handshake)
// ---------------------------------------------------------------------------

/// An owned frame: convenient for tests and the handshake. The data path uses
/// the `encode_*` functions and [`FrameRef`] instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Challenge`].
    Challenge(Challenge),
    /// See [`Auth`].
    Auth(Auth),
    /// Handshake accepted.
    Accept,
    /// See [`Reject`].
    Reject(Reject),
    /// A unit (encoded with [`Compression::Lz4`] by [`Frame::encode_to_vec`]).
    Unit {
        /// Page, Chunk or DeviceState.
        kind: UnitKind,
        /// Unit index.
        index: u64,
        /// The uncompressed unit.
        data: Vec<u8>,
    },
    /// Post-copy fault request.
    Request {
        /// Page or Chunk.
        kind: UnitKind,
        /// First unit.
        index: u64,
        /// Consecutive units requested (1..=[`MAX_REQUEST_UNITS`]).
        count: u32,
    },
    /// A control message.
    Control(ControlCode),
    /// RTT probe.
    Ping(PingMsg),
    /// RTT probe answer.
    Pong(PingMsg),
    /// Orderly end of a connection.
    Goodbye,
    /// CRC32 digests of consecutive units.
    Digest {
        /// Page or Chunk.
        kind: UnitKind,
        /// First unit.
        first: u64,
        /// One CRC32 per unit (1..=[`MAX_DIGEST_UNITS`]).
        crcs: Vec<u32>,
    },
}

impl Frame {
    /// Buffer size [`Frame::encode_into`] needs for this frame.
    pub fn encode_buffer_len(&self) -> usize {
        match self {
            Self::Unit { data, .. } => encode_buffer_len(data.len(), Compression::Lz4),
            Self::Digest { crcs, .. } => max_frame_len(crcs.len() * 4),
            _ => max_frame_len(fixed_payload_len(self.frame_type()).unwrap_or(0)),
        }
    }

    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::Hello,
            Self::Challenge(_) => FrameType::Challenge,
            Self::Auth(_) => FrameType::Auth,
            Self::Accept => FrameType::Accept,
            Self::Reject(_) => FrameType::Reject,
            Self::Unit { .. } => FrameType::Unit,
            Self::Request { .. } => FrameType::Request,
            Self::Control(_) => FrameType::Control,
            Self::Ping(_) => FrameType::Ping,
            Self::Pong(_) => FrameType::Pong,
            Self::Goodbye => FrameType::Goodbye,
            Self::Digest { .. } => FrameType::Digest,
        }
    }

    /// Encodes into `out` (at least [`Frame::encode_buffer_len`] long); returns the length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        match self {
            Self::Hello(h) => write_plain(out, FrameType::Hello, h.to_wire().as_bytes()),
            Self::Challenge(c) => write_plain(out, FrameType::Challenge, c.to_wire().as_bytes()),
            Self::Auth(a) => write_plain(out, FrameType::Auth, a.to_wire().as_bytes()),
            Self::Accept => write_plain(out, FrameType::Accept, &[]),
            Self::Reject(r) => write_plain(out, FrameType::Reject, r.to_wire().as_bytes()),
            Self::Unit { kind, index, data } => {
                encode_unit(out, *kind, *index, data, Compression::Lz4).map(|e| e.len)
            }
            Self::Request { kind, index, count } => encode_request(out, *kind, *index, *count),
            Self::Control(c) => encode_control(out, *c),
            Self::Ping(p) => encode_ping(out, *p),
            Self::Pong(p) => encode_pong(out, *p),
            Self::Goodbye => encode_goodbye(out),
            Self::Digest { kind, first, crcs } => encode_digest(out, *kind, *first, crcs),
        }
    }

    /// Encodes into a new vector holding exactly the frame.
    pub fn encode_to_vec(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = vec![0; self.encode_buffer_len()];
        let len = self.encode_into(&mut out)?;
        out.truncate(len);
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Why bytes from the peer were refused. Any of these ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The frame does not start with `b"WMIG"`.
    #[error("bad magic {got:02x?}")]
    BadMagic {
        /// The four bytes found.
        got: [u8; 4],
    },
    /// The header's version is not the negotiated (or handshake) version.
    #[error("protocol version {got}, expected {expected}")]
    UnsupportedVersion {
        /// Version in the header.
        got: u16,
        /// Version this decoder accepts.
        expected: u16,
    },
    /// Unknown frame type byte.
    #[error("unknown frame type {got:#04x}")]
    UnknownFrameType {
        /// The raw byte.
        got: u8,
    },
    /// A handshake frame after the handshake, or a data frame during it.
    #[error("{frame_type:?} frame not allowed {}", if *.during_handshake { "during the handshake" } else { "after the handshake" })]
    UnexpectedFrame {
        /// The frame's type.
        frame_type: FrameType,
        /// Whether the decoder was in handshake mode.
        during_handshake: bool,
    },
    /// Flag bits this version does not know.
    #[error("unknown flag bits in {flags:#04x}")]
    UnknownFlags {
        /// The flags byte.
        flags: u8,
    },
    /// The reserved header bytes are not zero.
    #[error("reserved header bytes {reserved:02x?} are not zero")]
    ReservedNotZero {
        /// The reserved bytes.
        reserved: [u8; 3],
    },
    /// Unknown unit kind byte.
    #[error("unknown unit kind {got}")]
    UnknownUnitKind {
        /// The raw byte.
        got: u8,
    },
    /// The unit kind does not fit the frame type (e.g. a Unit of kind Control).
    #[error("{kind:?} kind in a {frame_type:?} frame")]
    KindMismatch {
        /// The frame's type.
        frame_type: FrameType,
        /// The kind found.
        kind: UnitKind,
    },
    /// Known flags in a bad combination: flags on a non-Unit frame, LZ4+ZERO,
    /// ZERO with a payload, or a raw/LZ4 unit with an empty payload.
    #[error("flags {flags:#04x} with {payload_len} payload bytes in a {frame_type:?} frame")]
    FlagsMismatch {
        /// The frame's type.
        frame_type: FrameType,
        /// The flags byte.
        flags: u8,
        /// The header's payload length.
        payload_len: u32,
    },
    /// A Unit payload longer than the negotiated limit.
    #[error("{frame_type:?} payload of {payload_len} bytes exceeds the limit {limit}")]
    PayloadTooLong {
        /// The frame's type.
        frame_type: FrameType,
        /// The header's payload length.
        payload_len: u32,
        /// The limit.
        limit: u32,
    },
    /// A fixed-size frame with another payload length.
    #[error("{frame_type:?} payload of {payload_len} bytes, expected {expected}")]
    BadPayloadLength {
        /// The frame's type.
        frame_type: FrameType,
        /// The header's payload length.
        payload_len: u32,
        /// The fixed length.
        expected: u32,
    },
    /// Header or payload corrupted.
    #[error("CRC mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    CrcMismatch {
        /// CRC carried in the header.
        expected: u32,
        /// CRC computed over what was received.
        actual: u32,
    },
    /// A unit or request index past the geometry.
    #[error("{kind:?} index {index} out of range (limit {limit})")]
    IndexOutOfRange {
        /// Unit kind.
        kind: UnitKind,
        /// The index.
        index: u64,
        /// Exclusive limit.
        limit: u64,
    },
    /// A unit length the geometry does not allow (pages: exactly `page_size`;
    /// chunks: 1..=`chunk_size`; device state: 1..=1 MiB and within `device_state_max`).
    #[error("{kind:?} unit {index} of {unit_len} bytes (allowed {min}..={max})")]
    BadUnitLength {
        /// Unit kind.
        kind: UnitKind,
        /// Unit index.
        index: u64,
        /// Length in the header.
        unit_len: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// The payload length does not match the unit length: raw payloads are
    /// exactly `unit_len`, LZ4 payloads strictly shorter.
    #[error("{encoding:?} payload of {payload_len} bytes for a {unit_len}-byte unit")]
    UnitPayloadMismatch {
        /// How the payload is encoded.
        encoding: Encoding,
        /// The header's payload length.
        payload_len: u32,
        /// The header's unit length.
        unit_len: u32,
    },
    /// A Digest frame whose count or payload does not fit.
    #[error(
        "digest frame for {count} {kind:?} units from {first} with {payload_len} payload bytes (allowed 1..={max} units, 4 bytes each)"
    )]
    BadDigest {
        /// Kind of the units.
        kind: UnitKind,
        /// First unit.
        first: u64,
        /// Announced count.
        count: u32,
        /// Payload bytes.
        payload_len: u32,
        /// Most units allowed from `first`.
        max: u64,
    },
    /// A Request for 0 units or past the limits.
    #[error("request for {count} {kind:?} units from {index} (allowed 1..={max})")]
    BadRequestCount {
        /// Unit kind.
        kind: UnitKind,
        /// First index.
        index: u64,
        /// Count in the header.
        count: u32,
        /// Largest count allowed from this index.
        max: u64,
    },
    /// Unknown control code, unknown abort reason, non-zero unused arguments,
    /// or a device-state total above the geometry's bound.
    #[error("bad control message code {code} arg0 {arg0} arg1 {arg1}")]
    BadControl {
        /// Raw code.
        code: u32,
        /// Raw first argument.
        arg0: u64,
        /// Raw second argument.
        arg1: u64,
    },
    /// A field with a value it may not have (unused header fields must be zero,
    /// handshake enums must be known, reserved payload bytes zero).
    #[error("{frame_type:?} field {field} has bad value {value:#x}")]
    BadField {
        /// The frame's type.
        frame_type: FrameType,
        /// Field name.
        field: &'static str,
        /// Offending value.
        value: u64,
    },
    /// [`UnitPayload::unpack_into`] got a destination of the wrong length.
    #[error("destination of {dst_len} bytes for a {unit_len}-byte unit")]
    DstLength {
        /// The unit's length.
        unit_len: u32,
        /// The destination's length.
        dst_len: usize,
    },
    /// The LZ4 block is truncated or corrupt.
    #[error("corrupt LZ4 block for a {unit_len}-byte unit: {fault:?}")]
    Lz4Corrupt {
        /// The unit's length.
        unit_len: u32,
        /// What the LZ4 decoder found.
        fault: Lz4Fault,
    },
    /// The LZ4 block decompresses to more than `unit_len` bytes.
    #[error("LZ4 block decompresses past the {unit_len}-byte unit")]
    Lz4Overrun {
        /// The unit's length.
        unit_len: u32,
    },
    /// The LZ4 block decompresses to fewer than `unit_len` bytes.
    #[error("LZ4 block decompresses to {produced} bytes, unit is {unit_len}")]
    Lz4Underrun {
        /// The unit's length.
        unit_len: u32,
        /// Bytes produced.
        produced: usize,
    },
}

/// What was wrong with an LZ4 block (a copyable summary of lz4_flex's error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lz4Fault {
    /// A literal run reaches past the end of the block.
    LiteralOutOfBounds,
    /// The block ends in the middle of a sequence.
    ExpectedAnotherByte,
    /// A match with offset 0.
    OffsetZero,
    /// A match reaching before the start of the output.
    OffsetOutOfBounds,
    /// Another error reported by lz4_flex.
    Other,
}

/// Result of [`FrameDecoder::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// `buf` must hold at least `at_least` bytes (counted from its start)
    /// before a frame can be decoded. Never more than the decoder's
    /// [`FrameDecoder::max_frame_len`]: the header is validated first.
    NeedMore {
        /// Total bytes needed from the start of `buf`.
        at_least: usize,
    },
    /// A complete, verified frame.
    Frame {
        /// The frame, borrowing the payload from `buf`.
        frame: FrameRef<'a>,
        /// Bytes of `buf` it occupied; drop them before decoding the next frame.
        consumed: usize,
    },
}

/// A decoded frame borrowing from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameRef<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Challenge`].
    Challenge(Challenge),
    /// See [`Auth`].
    Auth(Auth),
    /// Handshake accepted.
    Accept,
    /// See [`Reject`].
    Reject(Reject),
    /// A unit with a verified index and length.
    Unit {
        /// Page, Chunk or DeviceState.
        kind: UnitKind,
        /// Index (within the geometry).
        index: u64,
        /// The payload: call [`UnitPayload::unpack_into`].
        payload: UnitPayload<'a>,
    },
    /// A post-copy fault request (index and count within the geometry).
    Request {
        /// Page or Chunk.
        kind: UnitKind,
        /// First unit.
        index: u64,
        /// Consecutive units (1..=[`MAX_REQUEST_UNITS`]).
        count: u32,
    },
    /// A control message.
    Control(ControlCode),
    /// RTT probe: answer with a Pong echoing it.
    Ping(PingMsg),
    /// RTT probe answer.
    Pong(PingMsg),
    /// Orderly end of the connection.
    Goodbye,
    /// CRC32 digests of consecutive units (count and range verified).
    Digest {
        /// Page or Chunk.
        kind: UnitKind,
        /// First unit.
        first: u64,
        /// The digests.
        crcs: DigestList<'a>,
    },
}

/// The CRC32 digests carried by a Digest frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestList<'a> {
    bytes: &'a [u8],
}

impl DigestList<'_> {
    /// Number of digests.
    pub fn len(&self) -> usize {
        self.bytes.len() / 4
    }

    /// Whether there are none (never true for a decoded frame).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The digests in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }
}

/// A unit's payload as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitPayload<'a> {
    /// The unit's bytes.
    Raw(&'a [u8]),
    /// An LZ4 block decompressing to `unit_len` bytes.
    Lz4 {
        /// The block.
        compressed: &'a [u8],
        /// Uncompressed length.
        unit_len: u32,
    },
    /// `unit_len` zero bytes.
    Zero {
        /// Uncompressed length.
        unit_len: u32,
    },
}

impl UnitPayload<'_> {
    /// The unit's uncompressed length.
    pub fn unit_len(&self) -> u32 {
        match self {
            Self::Raw(bytes) => payload_u32(bytes.len()),
            Self::Lz4 { unit_len, .. } | Self::Zero { unit_len } => *unit_len,
        }
    }

    /// How the unit was encoded.
    pub fn encoding(&self) -> Encoding {
        match self {
            Self::Raw(_) => Encoding::Raw,
            Self::Lz4 { .. } => Encoding::Lz4,
            Self::Zero { .. } => Encoding::Zero,
        }
    }

    /// Writes the uncompressed unit into `dst`, whose length must be exactly
    /// [`UnitPayload::unit_len`]. LZ4 output must fill `dst` exactly.
    /// On error `dst` holds garbage.
    pub fn unpack_into(&self, dst: &mut [u8]) -> Result<(), DecodeError> {
        let unit_len = self.unit_len();
        let expected = match self {
            Self::Raw(bytes) => bytes.len(),
            _ => unit_len as usize,
        };
        if dst.len() != expected {
            return Err(DecodeError::DstLength {
                unit_len,
                dst_len: dst.len(),
            });
        }
        match self {
            Self::Raw(bytes) => dst.copy_from_slice(bytes),
            Self::Zero { .. } => dst.fill(0),
            Self::Lz4 { compressed, .. } => decompress_exact(compressed, dst, unit_len)?,
        }
        Ok(())
    }
}

fn decompress_exact(compressed: &[u8], dst: &mut [u8], unit_len: u32) -> Result<(), DecodeError> {
    use lz4_flex::block::DecompressError as E;
    match lz4_flex::block::decompress_into(compressed, dst) {
        Ok(n) if n == dst.len() => Ok(()),
        Ok(produced) => Err(DecodeError::Lz4Underrun { unit_len, produced }),
        Err(E::OutputTooSmall { .. }) => Err(DecodeError::Lz4Overrun { unit_len }),
        Err(e) => {
            let fault = match e {
                E::LiteralOutOfBounds => Lz4Fault::LiteralOutOfBounds,
                E::ExpectedAnotherByte => Lz4Fault::ExpectedAnotherByte,
                E::OffsetZero => Lz4Fault::OffsetZero,
                E::OffsetOutOfBounds => Lz4Fault::OffsetOutOfBounds,
                _ => Lz4Fault::Other,
            };
            Err(DecodeError::Lz4Corrupt { unit_len, fault })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Handshake,
    Data { limits: Limits, version: u16 },
}

/// Streaming frame decoder: give it the bytes received so far, it returns a
/// frame or how many bytes it needs. It holds no buffer and no state besides
/// its configuration, so it is `Copy` and can be shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameDecoder {
    mode: Mode,
}

impl FrameDecoder {
    /// A decoder for the data phase (after the handshake) with the negotiated
    /// `version` and the geometry's `limits` (see `Session::decoder`).
    pub fn new(limits: Limits, version: u16) -> Self {
        Self {
            mode: Mode::Data { limits, version },
        }
    }

    /// A decoder that accepts only handshake frames.
    pub fn handshake() -> Self {
        Self {
            mode: Mode::Handshake,
        }
    }

    /// Longest frame this decoder accepts: size the receive buffer with it.
    pub fn max_frame_len(&self) -> usize {
        match self.mode {
            Mode::Handshake => max_frame_len(MAX_HANDSHAKE_PAYLOAD),
            Mode::Data { limits, .. } => limits.max_frame_len(),
        }
    }

    /// Decodes the frame at the start of `buf` (see [`Decoded`]). The header
    /// is checked as soon as [`HEADER_LEN`] bytes are there, so a hostile
    /// length is refused before the caller buffers its payload; the CRC and
    /// the geometry (indices, lengths) are checked once the payload is there.
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Decoded<'a>, DecodeError> {
        let Ok((header, _)) = Header::read_from_prefix(buf) else {
            return Ok(Decoded::NeedMore {
                at_least: HEADER_LEN,
            });
        };
        let (frame_type, kind) = self.check_header(&header)?;
        let total = max_frame_len(header.payload_len.get() as usize);
        let Some(payload) = buf.get(HEADER_LEN..total) else {
            return Ok(Decoded::NeedMore { at_least: total });
        };
        let actual = header.compute_crc(payload);
        if actual != header.crc32.get() {
            return Err(DecodeError::CrcMismatch {
                expected: header.crc32.get(),
                actual,
            });
        }
        let frame = self.parse(&header, frame_type, kind, payload)?;
        Ok(Decoded::Frame {
            frame,
            consumed: total,
        })
    }

    /// Structural checks that need only the header (before any payload).
    fn check_header(&self, h: &Header) -> Result<(FrameType, UnitKind), DecodeError> {
        if h.magic != MAGIC {
            return Err(DecodeError::BadMagic { got: h.magic });
        }
        let expected = match self.mode {
            Mode::Handshake => HANDSHAKE_VERSION,
            Mode::Data { version, .. } => version,
        };
        if h.version.get() != expected {
            return Err(DecodeError::UnsupportedVersion {
                got: h.version.get(),
                expected,
            });
        }
        let frame_type = FrameType::try_from(h.frame_type)
            .map_err(|got| DecodeError::UnknownFrameType { got })?;
        let during_handshake = self.mode == Mode::Handshake;
        if frame_type.is_handshake() != during_handshake {
            return Err(DecodeError::UnexpectedFrame {
                frame_type,
                during_handshake,
            });
        }
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::UnknownFlags { flags: h.flags });
        }
        if h.reserved != [0; 3] {
            return Err(DecodeError::ReservedNotZero {
                reserved: h.reserved,
            });
        }
        let kind =
            UnitKind::try_from(h.unit_kind).map_err(|got| DecodeError::UnknownUnitKind { got })?;
        check_kind(frame_type, kind)?;
        check_flags(frame_type, h.flags, h.payload_len.get())?;
        self.check_payload_len(frame_type, h.payload_len.get())?;
        Ok((frame_type, kind))
    }

    fn check_payload_len(
        &self,
        frame_type: FrameType,
        payload_len: u32,
    ) -> Result<(), DecodeError> {
        if let Some(fixed) = fixed_payload_len(frame_type) {
            let expected = payload_u32(fixed);
            if payload_len != expected {
                return Err(DecodeError::BadPayloadLength {
                    frame_type,
                    payload_len,
                    expected,
                });
            }
            return Ok(());
        }
        let limit = match self.mode {
            Mode::Handshake => 0, // unreachable: Unit is refused in handshake mode
            Mode::Data { limits, .. } => limits.max_payload(),
        };
        if payload_len > limit {
            return Err(DecodeError::PayloadTooLong {
                frame_type,
                payload_len,
                limit,
            });
        }
        Ok(())
    }

    /// Semantic checks and payload parsing, after the CRC matched.
    fn parse<'a>(
        &self,
        h: &Header,
        frame_type: FrameType,
        kind: UnitKind,
        payload: &'a [u8],
    ) -> Result<FrameRef<'a>, DecodeError> {
        let limits = match self.mode {
            Mode::Data { limits, .. } => Some(limits),
            Mode::Handshake => None,
        };
        match (frame_type, limits) {
            (FrameType::Unit, Some(l)) => parse_unit(&l, h, kind, payload),
            (FrameType::Request, Some(l)) => parse_request(&l, h, kind),
            (FrameType::Digest, Some(l)) => parse_digest(&l, h, kind, payload),
            _ => {
                check_unused(h, frame_type)?;
                parse_fixed(frame_type, payload, limits.as_ref())
            }
        }
    }
}

fn check_kind(frame_type: FrameType, kind: UnitKind) -> Result<(), DecodeError> {
    let ok = match frame_type {
        FrameType::Unit => kind != UnitKind::Control,
        FrameType::Request | FrameType::Digest => matches!(kind, UnitKind::Page | UnitKind::Chunk),
        _ => kind == UnitKind::Control,
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::KindMismatch { frame_type, kind })
    }
}

fn check_flags(frame_type: FrameType, flags: u8, payload_len: u32) -> Result<(), DecodeError> {
    let ok = match frame_type {
        FrameType::Unit => match flags {
            0 | FLAG_LZ4 => payload_len > 0,
            FLAG_ZERO => payload_len == 0,
            _ => false,
        },
        _ => flags == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::FlagsMismatch {
            frame_type,
            flags,
            payload_len,
        })
    }
}

/// Non-unit frames carry zero `unit_index` and `unit_len`.
fn check_unused(h: &Header, frame_type: FrameType) -> Result<(), DecodeError> {
    let bad = |field, value| DecodeError::BadField {
        frame_type,
        field,
        value,
    };
    if h.unit_index.get() != 0 {
        return Err(bad("unit_index", h.unit_index.get()));
    }
    if h.unit_len.get() != 0 {
        return Err(bad("unit_len", h.unit_len.get().into()));
    }
    Ok(())
}

fn check_index(limits: &Limits, kind: UnitKind, index: u64) -> Result<(), DecodeError> {
    let limit = limits.index_limit(kind);
    if index >= limit {
        return Err(DecodeError::IndexOutOfRange { kind, index, limit });
    }
    Ok(())
}

fn check_unit_len(
    limits: &Limits,
    kind: UnitKind,
    index: u64,
    unit_len: u32,
) -> Result<(), DecodeError> {
    let (min, mut max) = limits.unit_len_range(kind);
    if kind == UnitKind::DeviceState {
        // The piece must end within device_state_max (index is in range, so
        // the offset is below it and cannot overflow).
        let offset = index.saturating_mul(u64::from(DEVICE_STATE_PIECE));
        let room = limits.geometry().device_state_max().saturating_sub(offset);
        max = max.min(u32::try_from(room).unwrap_or(u32::MAX));
    }
    if unit_len < min || unit_len > max {
        return Err(DecodeError::BadUnitLength {
            kind,
            index,
            unit_len,
            min,
            max,
        });
    }
    Ok(())
}

fn parse_unit<'a>(
    limits: &Limits,
    h: &Header,
    kind: UnitKind,
    payload: &'a [u8],
) -> Result<FrameRef<'a>, DecodeError> {
    let (index, unit_len) = (h.unit_index.get(), h.unit_len.get());
    check_index(limits, kind, index)?;
    check_unit_len(limits, kind, index, unit_len)?;
    let payload_len = payload_u32(payload.len());
    let (encoding, ok) = match h.flags {
        FLAG_ZERO => (Encoding::Zero, payload.is_empty()),
        FLAG_LZ4 => (Encoding::Lz4, payload_len < unit_len),
        _ => (Encoding::Raw, payload_len == unit_len),
    };
    if !ok {
        return Err(DecodeError::UnitPayloadMismatch {
            encoding,
            payload_len,
            unit_len,
        });
    }
    let payload = match encoding {
        Encoding::Zero => UnitPayload::Zero { unit_len },
        Encoding::Lz4 => UnitPayload::Lz4 {
            compressed: payload,
            unit_len,
        },
        Encoding::Raw => UnitPayload::Raw(payload),
    };
    Ok(FrameRef::Unit {
        kind,
        index,
        payload,
    })
}

fn parse_request<'a>(
    limits: &Limits,
    h: &Header,
    kind: UnitKind,
) -> Result<FrameRef<'a>, DecodeError> {
    let (index, count) = (h.unit_index.get(), h.unit_len.get());
    check_index(limits, kind, index)?;
    let room = limits.index_limit(kind).saturating_sub(index);
    let max = room.min(u64::from(MAX_REQUEST_UNITS));
    if count == 0 || u64::from(count) > max {
        return Err(DecodeError::BadRequestCount {
            kind,
            index,
            count,
            max,
        });
    }
    Ok(FrameRef::Request { kind, index, count })
}

fn parse_digest<'a>(
    limits: &Limits,
    h: &Header,
    kind: UnitKind,
    payload: &'a [u8],
) -> Result<FrameRef<'a>, DecodeError> {
    let (first, count) = (h.unit_index.get(), h.unit_len.get());
    check_index(limits, kind, first)?;
    let room = limits.index_limit(kind).saturating_sub(first);
    let max = room.min(u64::from(MAX_DIGEST_UNITS));
    let payload_len = payload_u32(payload.len());
    if count == 0 || u64::from(count) > max || u64::from(payload_len) != u64::from(count) * 4 {
        return Err(DecodeError::BadDigest {
            kind,
            first,
            count,
            payload_len,
            max,
        });
    }
    Ok(FrameRef::Digest {
        kind,
        first,
        crcs: DigestList { bytes: payload },
    })
}

/// Parses the fixed-size payloads (length already checked against the type).
fn parse_fixed<'a>(
    frame_type: FrameType,
    payload: &[u8],
    limits: Option<&Limits>,
) -> Result<FrameRef<'a>, DecodeError> {
    let bad_len = || DecodeError::BadPayloadLength {
        frame_type,
        payload_len: payload_u32(payload.len()),
        expected: payload_u32(fixed_payload_len(frame_type).unwrap_or(0)),
    };
    Ok(match frame_type {
        FrameType::Hello => FrameRef::Hello(Hello::from_wire(
            &HelloWire::read_from_bytes(payload).map_err(|_| bad_len())?,
        )?),
        FrameType::Challenge => FrameRef::Challenge(Challenge::from_wire(
            &ChallengeWire::read_from_bytes(payload).map_err(|_| bad_len())?,
        )?),
        FrameType::Auth => FrameRef::Auth(Auth::from_wire(
            &AuthWire::read_from_bytes(payload).map_err(|_| bad_len())?,
        )),
        FrameType::Accept => FrameRef::Accept,
        FrameType::Reject => FrameRef::Reject(Reject::from_wire(
            &RejectWire::read_from_bytes(payload).map_err(|_| bad_len())?,
        )?),
        FrameType::Control => {
            let msg = ControlMsg::read_from_bytes(payload).map_err(|_| bad_len())?;
            FrameRef::Control(parse_control(&msg, limits)?)
        }
        FrameType::Ping | FrameType::Pong => {
            let ping =
                PingMsg::from_wire(&PingWire::read_from_bytes(payload).map_err(|_| bad_len())?);
            if frame_type == FrameType::Ping {
                FrameRef::Ping(ping)
            } else {
                FrameRef::Pong(ping)
            }
        }
        FrameType::Goodbye => FrameRef::Goodbye,
        // Unit and Request are parsed by their own functions in data mode and
        // refused by check_header in handshake mode.
        FrameType::Unit | FrameType::Request | FrameType::Digest => {
            return Err(DecodeError::UnexpectedFrame {
                frame_type,
                during_handshake: limits.is_none(),
            });
        }
    })
}

fn parse_control(msg: &ControlMsg, limits: Option<&Limits>) -> Result<ControlCode, DecodeError> {
    let code = ControlCode::from_wire(msg)?;
    if let (
        ControlCode::ZeroPages { first, count } | ControlCode::AbsentPages { first, count },
        Some(l),
    ) = (code, limits)
    {
        let pages = l.index_limit(UnitKind::Page);
        if first >= pages || count > pages - first {
            return Err(DecodeError::BadControl {
                code: msg.code.get(),
                arg0: first,
                arg1: count,
            });
        }
    }
    if let (ControlCode::AbsentChunks { first, count }, Some(l)) = (code, limits) {
        let chunks = l.index_limit(UnitKind::Chunk);
        if first >= chunks || count > chunks - first {
            return Err(DecodeError::BadControl {
                code: msg.code.get(),
                arg0: first,
                arg1: count,
            });
        }
    }
    if let (ControlCode::DeviceStateEnd { total_bytes }, Some(l)) = (code, limits) {
        if total_bytes > l.geometry().device_state_max() {
            return Err(DecodeError::BadControl {
                code: msg.code.get(),
                arg0: msg.arg0.get(),
                arg1: msg.arg1.get(),
            });
        }
    }
    Ok(code)
}

impl FrameRef<'_> {
    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::Hello,
            Self::Challenge(_) => FrameType::Challenge,
            Self::Auth(_) => FrameType::Auth,
            Self::Accept => FrameType::Accept,
            Self::Reject(_) => FrameType::Reject,
            Self::Unit { .. } => FrameType::Unit,
            Self::Request { .. } => FrameType::Request,
            Self::Control(_) => FrameType::Control,
            Self::Ping(_) => FrameType::Ping,
            Self::Pong(_) => FrameType::Pong,
            Self::Goodbye => FrameType::Goodbye,
            Self::Digest { .. } => FrameType::Digest,
        }
    }

    /// An owned copy (units are unpacked into a new vector).
    pub fn to_frame(&self) -> Result<Frame, DecodeError> {
        Ok(match *self {
            Self::Hello(h) => Frame::Hello(h),
            Self::Challenge(c) => Frame::Challenge(c),
            Self::Auth(a) => Frame::Auth(a),
            Self::Accept => Frame::Accept,
            Self::Reject(r) => Frame::Reject(r),
            Self::Unit {
                kind,
                index,
                payload,
            } => {
                let mut data = vec![0; payload.unit_len() as usize];
                payload.unpack_into(&mut data)?;
                Frame::Unit { kind, index, data }
            }
            Self::Request { kind, index, count } => Frame::Request { kind, index, count },
            Self::Control(c) => Frame::Control(c),
            Self::Ping(p) => Frame::Ping(p),
            Self::Pong(p) => Frame::Pong(p),
            Self::Goodbye => Frame::Goodbye,
            Self::Digest { kind, first, crcs } => Frame::Digest {
                kind,
                first,
                crcs: crcs.iter().collect(),
            },
        })
    }
}
