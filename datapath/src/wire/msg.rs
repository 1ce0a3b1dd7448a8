//! Payloads of the fixed-size frames: control messages, ping/pong and the
//! handshake messages, each as a zerocopy wire struct plus a typed Rust value.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::frame::DecodeError;
use super::geometry::Geometry;
use super::header::FrameType;
use super::key::MigrationId;

/// Length of the nonces exchanged in the handshake.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 proof.
pub const PROOF_LEN: usize = 32;

/// Payload of a Control frame (20 bytes, little endian).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct ControlMsg {
    /// A [`ControlCode`] discriminant.
    pub code: U32,
    /// First argument (meaning depends on `code`; zero when unused).
    pub arg0: U64,
    /// Second argument (meaning depends on `code`; zero when unused).
    pub arg1: U64,
}

/// Why a migration is aborted ([`ControlCode::Abort`]).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AbortReason {
    /// An operator cancelled the migration.
    Cancelled = 1,
    /// The source engine failed.
    SourceFailed = 2,
    /// The destination engine failed.
    DestinationFailed = 3,
    /// A deadline passed.
    Timeout = 4,
    /// The peer broke the protocol.
    ProtocolError = 5,
}

impl AbortReason {
    fn from_u64(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::Cancelled,
            2 => Self::SourceFailed,
            3 => Self::DestinationFailed,
            4 => Self::Timeout,
            5 => Self::ProtocolError,
            _ => return None,
        })
    }
}

/// A typed control message (the payload of a Control frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlCode {
    /// A pre-copy round starts (code 1, arg0 = round).
    RoundBegin {
        /// Round number, from 0.
        round: u64,
    },
    /// A pre-copy round ended (code 2, arg0 = round, arg1 = units sent in it).
    RoundEnd {
        /// Round number.
        round: u64,
        /// Units sent during the round.
        units_sent: u64,
    },
    /// The source guest is stopped; device state follows (code 3).
    Freeze,
    /// All device-state pieces were sent (code 4, arg0 = total bytes).
    DeviceStateEnd {
        /// Total device-state bytes, at most the geometry's `device_state_max`.
        total_bytes: u64,
    },
    /// The destination may resume the guest; missing units are post-copied (code 5).
    PostcopyBegin,
    /// Every unit was sent (code 6, arg0 = total units sent on the connection).
    Done {
        /// Units sent in the whole migration on this connection.
        units_total: u64,
    },
    /// The migration is aborted (code 7, arg0 = reason).
    Abort {
        /// Why.
        reason: AbortReason,
    },
    /// Pages `first..first + count` are all zero at the source (never
    /// populated): the destination must not fetch them (code 8, arg0 = first,
    /// arg1 = count ≥ 1, within the geometry).
    ZeroPages {
        /// First page.
        first: u64,
        /// Number of pages.
        count: u64,
    },
    /// Destination → source: the guest runs at the destination (code 9).
    Resumed,
    /// Destination → source: the device state is loaded, the destination is
    /// ready to run the guest (code 10). The source commits (sends
    /// [`PostcopyBegin`](Self::PostcopyBegin)) only after this.
    Loaded,
    /// Sent during the freeze: pages `first..first + count` were pre-copied
    /// but dirtied since, and the freeze has no room for them (the overflow
    /// freeze policy keeps the downtime target): whatever copy the
    /// destination holds is stale. It drops it and treats the pages as
    /// post-copy pages (absent: pushed later, fetched on a fault) (code 11,
    /// arg0 = first, arg1 = count ≥ 1, within the geometry).
    AbsentPages {
        /// First page.
        first: u64,
        /// Number of pages.
        count: u64,
    },
    /// [`AbsentPages`](Self::AbsentPages) for disk chunks `first..first +
    /// count`: the destination marks their blocks absent again, and they
    /// are post-copied (code 12, arg0 = first, arg1 = count ≥ 1, within the
    /// geometry).
    AbsentChunks {
        /// First chunk.
        first: u64,
        /// Number of chunks.
        count: u64,
    },
}

impl ControlCode {
    /// The wire form of this message.
    pub fn to_wire(self) -> ControlMsg {
        let (code, arg0, arg1) = match self {
            Self::RoundBegin { round } => (1, round, 0),
            Self::RoundEnd { round, units_sent } => (2, round, units_sent),
            Self::Freeze => (3, 0, 0),
            Self::DeviceStateEnd { total_bytes } => (4, total_bytes, 0),
            Self::PostcopyBegin => (5, 0, 0),
            Self::Done { units_total } => (6, units_total, 0),
            Self::Abort { reason } => (7, reason as u64, 0),
            Self::ZeroPages { first, count } => (8, first, count),
            Self::Resumed => (9, 0, 0),
            Self::Loaded => (10, 0, 0),
            Self::AbsentPages { first, count } => (11, first, count),
            Self::AbsentChunks { first, count } => (12, first, count),
        };
        ControlMsg {
            code: U32::new(code),
            arg0: U64::new(arg0),
            arg1: U64::new(arg1),
        }
    }

    /// Parses a wire message; unknown codes, unknown abort reasons and non-zero
    /// unused arguments are [`DecodeError::BadControl`].
    pub fn from_wire(msg: &ControlMsg) -> Result<Self, DecodeError> {
        let (code, arg0, arg1) = (msg.code.get(), msg.arg0.get(), msg.arg1.get());
        let bad = DecodeError::BadControl { code, arg0, arg1 };
        let parsed = match (code, arg1) {
            (1, 0) => Self::RoundBegin { round: arg0 },
            (2, _) => Self::RoundEnd {
                round: arg0,
                units_sent: arg1,
            },
            (3, 0) if arg0 == 0 => Self::Freeze,
            (4, 0) => Self::DeviceStateEnd { total_bytes: arg0 },
            (5, 0) if arg0 == 0 => Self::PostcopyBegin,
            (6, 0) => Self::Done { units_total: arg0 },
            (7, 0) => Self::Abort {
                reason: AbortReason::from_u64(arg0).ok_or(bad)?,
            },
            (8, count) if count > 0 => Self::ZeroPages { first: arg0, count },
            (9, 0) if arg0 == 0 => Self::Resumed,
            (10, 0) if arg0 == 0 => Self::Loaded,
            (11, count) if count > 0 => Self::AbsentPages { first: arg0, count },
            (12, count) if count > 0 => Self::AbsentChunks { first: arg0, count },
            _ => return Err(bad),
        };
        Ok(parsed)
    }
}

/// Payload of Ping and Pong frames (a Pong echoes the Ping it answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PingMsg {
    /// Chosen by the pinger to match the Pong.
    pub nonce: u64,
    /// Pinger's clock (ns, e.g. CLOCK_MONOTONIC) when the Ping was queued.
    pub sent_ns: u64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub(crate) struct PingWire {
    nonce: U64,
    sent_ns: U64,
}

impl PingMsg {
    pub(crate) fn to_wire(self) -> PingWire {
        PingWire {
            nonce: U64::new(self.nonce),
            sent_ns: U64::new(self.sent_ns),
        }
    }

    pub(crate) fn from_wire(w: &PingWire) -> Self {
        Self {
            nonce: w.nonce.get(),
            sent_ns: w.sent_ns.get(),
        }
    }
}

/// Which of the two connections of a migration this is.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnKind {
    /// Pre-copy and background post-copy data, device state, control.
    Bulk = 1,
    /// Post-copy fault requests and their answers, RTT probes.
    Fault = 2,
}

impl TryFrom<u8> for ConnKind {
    type Error = u8;

    fn try_from(raw: u8) -> Result<Self, u8> {
        match raw {
            1 => Ok(Self::Bulk),
            2 => Ok(Self::Fault),
            other => Err(other),
        }
    }
}

/// Why a handshake was refused (payload of a Reject frame).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Malformed or unexpected frame.
    Protocol = 1,
    /// No protocol version in common.
    VersionMismatch = 2,
    /// A proof did not verify (the keys differ or the peer is an impostor).
    AuthFailed = 3,
    /// The server waits for another migration.
    MigrationIdMismatch = 4,
    /// The geometry differs from the one the server expects.
    GeometryMismatch = 5,
    /// The geometry is invalid.
    InvalidGeometry = 6,
    /// The server does not take this connection kind.
    ConnNotAccepted = 7,
}

impl TryFrom<u32> for RejectReason {
    type Error = u32;

    fn try_from(raw: u32) -> Result<Self, u32> {
        Ok(match raw {
            1 => Self::Protocol,
            2 => Self::VersionMismatch,
            3 => Self::AuthFailed,
            4 => Self::MigrationIdMismatch,
            5 => Self::GeometryMismatch,
            6 => Self::InvalidGeometry,
            7 => Self::ConnNotAccepted,
            other => return Err(other),
        })
    }
}

/// Hello: the client's opening message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Lowest version the client speaks.
    pub min_version: u16,
    /// Highest version the client speaks.
    pub max_version: u16,
    /// Which connection this is.
    pub conn: ConnKind,
    /// The migration this connection belongs to.
    pub migration_id: MigrationId,
    /// Fresh random client nonce.
    pub client_nonce: [u8; NONCE_LEN],
    /// The guest's geometry (validated by the server after authentication).
    pub geometry: Geometry,
}

/// Challenge: the server's answer to Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// The chosen version (highest in common).
    pub version: u16,
    /// Fresh random server nonce.
    pub server_nonce: [u8; NONCE_LEN],
    /// HMAC proving the server knows the key.
    pub server_proof: [u8; PROOF_LEN],
}

/// Auth: the client's proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    /// HMAC proving the client knows the key.
    pub client_proof: [u8; PROOF_LEN],
}

/// Reject: a refused handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// Why.
    pub reason: RejectReason,
    /// Lowest version the sender speaks (for version mismatches).
    pub min_version: u16,
    /// Highest version the sender speaks.
    pub max_version: u16,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub(crate) struct HelloWire {
    min_version: U16,
    max_version: U16,
    conn: u8,
    reserved: [u8; 3],
    migration_id: [u8; 16],
    client_nonce: [u8; NONCE_LEN],
    geometry: Geometry,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub(crate) struct ChallengeWire {
    version: U16,
    reserved: [u8; 6],
    server_nonce: [u8; NONCE_LEN],
    server_proof: [u8; PROOF_LEN],
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub(crate) struct AuthWire {
    client_proof: [u8; PROOF_LEN],
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub(crate) struct RejectWire {
    reason: U32,
    min_version: U16,
    max_version: U16,
}

/// Fixed payload length of Hello.
pub const HELLO_LEN: usize = core::mem::size_of::<HelloWire>();
/// Fixed payload length of Challenge.
pub const CHALLENGE_LEN: usize = core::mem::size_of::<ChallengeWire>();
/// Fixed payload length of Auth.
pub const AUTH_LEN: usize = core::mem::size_of::<AuthWire>();
/// Fixed payload length of Reject.
pub const REJECT_LEN: usize = core::mem::size_of::<RejectWire>();
/// Fixed payload length of Control.
pub const CONTROL_LEN: usize = core::mem::size_of::<ControlMsg>();
/// Fixed payload length of Ping and Pong.
pub const PING_LEN: usize = core::mem::size_of::<PingWire>();

const _: () = assert!(HELLO_LEN == 88);
const _: () = assert!(CHALLENGE_LEN == 72);
const _: () = assert!(AUTH_LEN == 32);
const _: () = assert!(REJECT_LEN == 8);
const _: () = assert!(CONTROL_LEN == 20);
const _: () = assert!(PING_LEN == 16);

/// The fixed payload length of `frame_type`, `None` for Unit (variable).
pub(crate) fn fixed_payload_len(frame_type: FrameType) -> Option<usize> {
    Some(match frame_type {
        FrameType::Hello => HELLO_LEN,
        FrameType::Challenge => CHALLENGE_LEN,
        FrameType::Auth => AUTH_LEN,
        FrameType::Reject => REJECT_LEN,
        FrameType::Control => CONTROL_LEN,
        FrameType::Ping | FrameType::Pong => PING_LEN,
        FrameType::Accept | FrameType::Request | FrameType::Goodbye => 0,
        FrameType::Unit | FrameType::Digest => return None,
    })
}

/// Largest handshake payload.
pub(crate) const MAX_HANDSHAKE_PAYLOAD: usize = HELLO_LEN;

fn bad_field(frame_type: FrameType, field: &'static str, value: u64) -> DecodeError {
    DecodeError::BadField {
        frame_type,
        field,
        value,
    }
}

fn reserved_value(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0u64, |acc, &b| acc.rotate_left(8) | u64::from(b))
}

impl Hello {
    pub(crate) fn to_wire(self) -> HelloWire {
        HelloWire {
            min_version: U16::new(self.min_version),
            max_version: U16::new(self.max_version),
            conn: self.conn as u8,
            reserved: [0; 3],
            migration_id: self.migration_id.0,
            client_nonce: self.client_nonce,
            geometry: self.geometry,
        }
    }

    pub(crate) fn from_wire(w: &HelloWire) -> Result<Self, DecodeError> {
        let conn = ConnKind::try_from(w.conn)
            .map_err(|raw| bad_field(FrameType::Hello, "conn", raw.into()))?;
        if w.reserved != [0; 3] {
            let value = reserved_value(&w.reserved);
            return Err(bad_field(FrameType::Hello, "reserved", value));
        }
        Ok(Self {
            min_version: w.min_version.get(),
            max_version: w.max_version.get(),
            conn,
            migration_id: MigrationId(w.migration_id),
            client_nonce: w.client_nonce,
            geometry: w.geometry,
        })
    }
}

impl Challenge {
    pub(crate) fn to_wire(self) -> ChallengeWire {
        ChallengeWire {
            version: U16::new(self.version),
            reserved: [0; 6],
            server_nonce: self.server_nonce,
            server_proof: self.server_proof,
        }
    }

    pub(crate) fn from_wire(w: &ChallengeWire) -> Result<Self, DecodeError> {
        if w.reserved != [0; 6] {
            let value = reserved_value(&w.reserved);
            return Err(bad_field(FrameType::Challenge, "reserved", value));
        }
        Ok(Self {
            version: w.version.get(),
            server_nonce: w.server_nonce,
            server_proof: w.server_proof,
        })
    }
}

impl Auth {
    pub(crate) fn to_wire(self) -> AuthWire {
        AuthWire {
            client_proof: self.client_proof,
        }
    }

    pub(crate) fn from_wire(w: &AuthWire) -> Self {
        Self {
            client_proof: w.client_proof,
        }
    }
}

impl Reject {
    pub(crate) fn to_wire(self) -> RejectWire {
        RejectWire {
            reason: U32::new(self.reason as u32),
            min_version: U16::new(self.min_version),
            max_version: U16::new(self.max_version),
        }
    }

    pub(crate) fn from_wire(w: &RejectWire) -> Result<Self, DecodeError> {
        let reason = RejectReason::try_from(w.reason.get())
            .map_err(|raw| bad_field(FrameType::Reject, "reason", raw.into()))?;
        Ok(Self {
            reason,
            min_version: w.min_version.get(),
            max_version: w.max_version.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_codes_round_trip() {
        let all = [
            ControlCode::RoundBegin { round: 3 },
            ControlCode::RoundEnd {
                round: 3,
                units_sent: 99,
            },
            ControlCode::Freeze,
            ControlCode::DeviceStateEnd { total_bytes: 777 },
            ControlCode::PostcopyBegin,
            ControlCode::Done { units_total: 5 },
            ControlCode::Abort {
                reason: AbortReason::Timeout,
            },
            ControlCode::ZeroPages { first: 4, count: 2 },
            ControlCode::Resumed,
            ControlCode::Loaded,
            ControlCode::AbsentPages { first: 9, count: 3 },
            ControlCode::AbsentChunks { first: 2, count: 5 },
        ];
        for c in all {
            assert_eq!(ControlCode::from_wire(&c.to_wire()), Ok(c));
        }
    }

    #[test]
    fn bad_control_messages() {
        let msg = |code: u32, arg0: u64, arg1: u64| ControlMsg {
            code: U32::new(code),
            arg0: U64::new(arg0),
            arg1: U64::new(arg1),
        };
        for (code, arg0, arg1) in [
            (0, 0, 0),
            (8, 0, 0),
            (11, 5, 0),
            (12, 5, 0),
            (u32::MAX, 1, 2),
            (1, 0, 1),
            (3, 1, 0),
            (3, 0, 1),
            (5, 9, 0),
            (7, 0, 0),
            (7, 6, 0),
            (7, 1 << 40, 0),
            (6, 1, 1),
            (9, 1, 0),
            (10, 1, 0),
            (10, 0, 1),
            (11, 0, 0),
        ] {
            assert_eq!(
                ControlCode::from_wire(&msg(code, arg0, arg1)),
                Err(DecodeError::BadControl { code, arg0, arg1 })
            );
        }
    }

    #[test]
    fn reject_reasons_round_trip() {
        for raw in 0..=10u32 {
            if let Ok(r) = RejectReason::try_from(raw) {
                assert_eq!(r as u32, raw);
            }
        }
        assert_eq!(ConnKind::try_from(3), Err(3));
    }
}
