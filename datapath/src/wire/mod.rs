//! The wanmig wire protocol: the one place the format spoken between a source
//! and a destination engine is defined.
//!
//! A migration uses two TCP connections opened by the source (client) to the
//! destination (server) (for a Xen guest the destination dials a listening
//! source instead, named by the [`Handoff`] in the toolstack's own stream;
//! the source is still the handshake's client): **bulk** carries pre-copy rounds, device state and the
//! background post-copy push; **fault** carries post-copy fault requests and
//! their answers, so that a fault never waits behind bulk data. Each connection
//! starts with an authenticated [handshake] (version negotiation,
//! migration id, guest [`Geometry`], HMAC-SHA256 challenge-response over a
//! pre-shared [`PskKey`]); only then do data frames flow.
//!
//! # Frames
//!
//! Every frame is a 32-byte little-endian [`Header`] followed by `payload_len`
//! payload bytes:
//!
//! | offset | size | field         | contents                                                     |
//! |-------:|-----:|---------------|--------------------------------------------------------------|
//! | 0      | 4    | magic         | `b"WMIG"`                                                    |
//! | 4      | 2    | version       | negotiated version; handshake frames: [`HANDSHAKE_VERSION`]  |
//! | 6      | 1    | frame type    | [`FrameType`]                                                |
//! | 7      | 1    | flags         | bit 0 [`FLAG_LZ4`], bit 1 [`FLAG_ZERO`]; other bits: error   |
//! | 8      | 1    | unit kind     | [`UnitKind`]: page, chunk, device state, control            |
//! | 9      | 3    | reserved      | zero                                                         |
//! | 12     | 4    | payload_len   | bytes after the header (≤ [`Limits::max_payload`])           |
//! | 16     | 8    | unit index    | Unit/Request/Digest: (first) index; else 0                   |
//! | 24     | 4    | unit_len      | Unit: uncompressed length; Request/Digest: unit count; else 0|
//! | 28     | 4    | crc32         | CRC32 of the header with this field zeroed, then the payload |
//!
//! | frame type        | kind               | payload                                                |
//! |-------------------|--------------------|--------------------------------------------------------|
//! | Hello 1           | Control            | [`Hello`] (88 bytes)                                   |
//! | Challenge 2       | Control            | [`Challenge`] (72 bytes)                               |
//! | Auth 3            | Control            | [`Auth`] (32 bytes)                                    |
//! | Accept 4          | Control            | empty                                                  |
//! | Reject 5          | Control            | [`Reject`] (8 bytes)                                   |
//! | Unit 0x10         | Page/Chunk/DevState| raw unit; LZ4 block (only if smaller); empty if ZERO   |
//! | Request 0x11      | Page/Chunk         | empty (index + count in the header)                    |
//! | Control 0x20      | Control            | [`ControlMsg`] (20 bytes) → [`ControlCode`]            |
//! | Ping 0x21/Pong 0x22 | Control          | [`PingMsg`]: nonce, sender timestamp (16 bytes)        |
//! | Goodbye 0x30      | Control            | empty                                                  |
//! | Digest 0x40       | Page/Chunk         | `count` CRC32s (u32 LE) of units `index..index+count`; [`HOLE_DIGEST`] for a page that is no memory (Xen) |
//!
//! Units are checked against the geometry: page units are exactly
//! `page_size` bytes with index `< page_count`; chunks are 1..=`chunk_size`
//! bytes with index `< chunk_count`; device state travels in pieces of
//! [`DEVICE_STATE_PIECE`] bytes (the last one shorter) where piece `i` holds the
//! bytes at `i * DEVICE_STATE_PIECE` and must end within `device_state_max`.
//!
//! Sending: copy the unit out of guest memory, then [`encode_unit`] into the
//! send buffer (zero check → LZ4 → raw, then the CRC). Receiving: feed the
//! bytes received so far to [`FrameDecoder::decode`]; it validates the header
//! before asking for the payload, so a hostile length never makes the receiver
//! buffer more than [`FrameDecoder::max_frame_len`]. Every malformed input is a
//! typed [`DecodeError`]; nothing panics on peer data.
//!
//! # A migration
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as Source (client)
//!     participant D as Destination (server)
//!     Note over S,D: each connection: bulk and fault, each inside TLS 1.3 (transport::tls) unless --plaintext
//!     S->>D: [bulk] TLS 1.3 handshake; both derive the exporter E
//!     S->>D: [bulk] Hello(versions, Bulk, migration id, nonce, geometry)
//!     D->>S: [bulk] Challenge(version, nonce, server proof over E)
//!     S->>D: [bulk] Auth(client proof over E)
//!     D->>S: [bulk] Accept
//!     S->>D: [fault] TLS 1.3 handshake
//!     S->>D: [fault] Hello(versions, Fault, same migration id, nonce, geometry)
//!     D->>S: [fault] Challenge(version, nonce, server proof)
//!     S->>D: [fault] Auth(client proof)
//!     D->>S: [fault] Accept
//!     loop pre-copy rounds (guest running)
//!         S->>D: [bulk] Control RoundBegin{round}
//!         S->>D: [bulk] Control ZeroPages{first, count} (round 0: holes of the pre-copy set)
//!         S->>D: [bulk] Unit(Page/Chunk, index, raw | LZ4 | ZERO) ×units_sent
//!         S->>D: [bulk] Control RoundEnd{round, units_sent}
//!     end
//!     D-->>S: [fault] Ping(nonce, sent_ns)
//!     S-->>D: [fault] Pong(same nonce, sent_ns): fault-path RTT under load
//!     S->>D: [bulk] Control Freeze (guest stopped)
//!     S->>D: [bulk] Unit(Page/Chunk, the dirty pre-copy remainder: all of it, or hottest first what fits the downtime target)
//!     S->>D: [bulk] Control AbsentPages{first, count} / AbsentChunks{first, count} (overflow freeze: the dirty pre-copy units that did not fit)
//!     S->>D: [bulk] Control ZeroPages{first, count} (every page not populated now, both sets)
//!     S->>D: [bulk] Unit(DeviceState, piece 0..k), exactly ceil(total_bytes / piece)
//!     S->>D: [bulk] Control DeviceStateEnd{total_bytes}
//!     Note over D: fault server live, QEMU loads the device state
//!     D->>S: [bulk] Control Loaded
//!     Note over S: commit point: until here any failure resumes the guest at the source
//!     S->>D: [bulk] Control PostcopyBegin
//!     Note over D: guest resumes at the destination
//!     D->>S: [bulk] Control Resumed
//!     par post-copy
//!         D->>S: [fault] Request(Page, index, count)
//!         S->>D: [fault] Unit(Page, index..index+count) (ahead of bulk)
//!     and background push
//!         S->>D: [bulk] Unit(the absent pages of the freeze first, then the remaining pages and chunks, each once)
//!     end
//!     S->>D: [bulk] Control Done{units_total}
//!     S->>D: [bulk] Digest(Page, first, CRC32 ×n) covering every page
//!     S->>D: [bulk] Goodbye
//!     Note over D: every page here: stop serving faults, release the guest
//!     D->>S: [fault] Goodbye
//!     S->>D: [fault] Goodbye
//!     D->>S: [bulk] Goodbye
//! ```
//!
//! Before `PostcopyBegin` either side may send `Control Abort{reason}` and
//! close both connections; the source then resumes the guest. The
//! destination answers a failed device-state load with
//! `Abort{DestinationFailed}` instead of `Loaded`, and the source gives up
//! if `Loaded` does not come within its freeze deadline. After `Loaded` the
//! destination waits for the source's decision (`PostcopyBegin` or `Abort`):
//! only the source decides where the guest runs. After `PostcopyBegin` the
//! destination owns the guest: if the bulk connection breaks it fetches any
//! page still missing over the fault connection, which the source keeps
//! serving until the destination's `Goodbye` on it.
//!
//! **A freeze that keeps the downtime target.** Under the overflow freeze
//! policy the source sends the dirty pre-copy units hottest first only
//! while they fit the downtime target; the others were sent in an earlier
//! round and are stale at the destination. `AbsentPages{first, count}`
//! (during the freeze, before `DeviceStateEnd`) tells the destination to
//! drop its copies and treat them as post-copy pages: absent, so the
//! guest's first access faults and fetches them, and the push sends them
//! first. `AbsentChunks{first, count}` does the same for disk chunks (their
//! blocks become absent in the destination's image). A destination that does not know the code refuses it before the
//! commit (the guest goes on at the source).
//!
//! # Versions
//!
//! The client offers `[MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]`, the server
//! picks the highest version in common (or rejects). Handshake frames always
//! carry [`HANDSHAKE_VERSION`] in their header and keep their layout forever;
//! data frames carry the negotiated version and [`FrameDecoder`] refuses any
//! other. Today only version 1 exists and the encoders write it; a second
//! version would add a version argument to the encoders (from the [`Session`]).
//!
//! # Example
//!
//! ```
//! use wanmig_datapath::wire::*;
//!
//! let geometry = Geometry::new(4096, 1024, 1 << 20, 16, 1 << 20);
//! let limits = Limits::from_geometry(&geometry)?;
//! let decoder = FrameDecoder::new(limits, PROTOCOL_VERSION);
//!
//! let page = vec![b'x'; 4096]; // the caller's private copy of the page
//! let mut send_buf = vec![0; encode_buffer_len(page.len(), Compression::Lz4)];
//! let sent = encode_unit(&mut send_buf, UnitKind::Page, 7, &page, Compression::Lz4)?;
//! assert_eq!(sent.encoding, Encoding::Lz4);
//!
//! let wire = &send_buf[..sent.len];
//! assert_eq!(decoder.decode(&wire[..10])?, Decoded::NeedMore { at_least: HEADER_LEN });
//! let Decoded::Frame { frame: FrameRef::Unit { kind, index, payload }, consumed } =
//!     decoder.decode(wire)?
//! else {
//!     panic!("not a unit")
//! };
//! let mut dst = vec![0; 4096];
//! payload.unpack_into(&mut dst)?;
//! assert_eq!((kind, index, consumed, dst), (UnitKind::Page, 7, sent.len, page));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod frame;
mod geometry;
pub mod handoff;
pub mod handshake;
mod header;
mod key;
mod msg;

#[cfg(test)]
mod frame_tests;
#[cfg(test)]
mod proptests;

pub use frame::{
    Compression, DecodeError, Decoded, DigestList, EncodeError, EncodedUnit, Encoding, Frame,
    FrameDecoder, FrameRef, Lz4Fault, UnitPayload, encode_buffer_len, encode_control,
    encode_digest, encode_goodbye, encode_ping, encode_pong, encode_request, encode_unit, is_zero,
    max_frame_len,
};
pub use geometry::{
    DEVICE_STATE_PIECE, Geometry, GeometryError, HOLE_DIGEST, Limits, MAX_CHUNK_SIZE,
    MAX_DEVICE_STATE, MAX_DIGEST_UNITS, MAX_PAGE_SIZE, MAX_REQUEST_UNITS, MIN_CHUNK_SIZE,
    MIN_PAGE_SIZE,
};
pub use handoff::{HANDOFF_VERSION, Handoff, HandoffError, MAX_HANDOFF_LEN};
pub use handshake::{
    Binding, ClientParams, HANDSHAKE_TIMEOUT, HandshakeError, Role, ServerPolicy, Session,
    client_handshake, client_handshake_bound, server_handshake, server_handshake_bound,
};
pub use header::{
    FLAG_LZ4, FLAG_ZERO, FrameType, HANDSHAKE_VERSION, HEADER_LEN, Header, KNOWN_FLAGS, MAGIC,
    MAX_PAYLOAD, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, UnitKind,
};
pub use key::{KeyError, MAX_KEY_LEN, MIN_KEY_LEN, MigrationId, ParseMigrationIdError, PskKey};
pub use msg::{
    AUTH_LEN, AbortReason, Auth, CHALLENGE_LEN, CONTROL_LEN, Challenge, ConnKind, ControlCode,
    ControlMsg, HELLO_LEN, Hello, NONCE_LEN, PING_LEN, PROOF_LEN, PingMsg, REJECT_LEN, Reject,
    RejectReason,
};
