//! The authenticated handshake run on each connection before any data flows.
//!
//! The source engine is the client; it connects twice (bulk, fault) to the
//! destination engine, the server. Each connection runs, on a blocking socket:
//!
//! 1. client → `Hello { min_version, max_version, conn, migration_id, client_nonce, geometry }`
//! 2. server → `Challenge { version, server_nonce, server_proof }` (or `Reject`
//!    when no version is in common)
//! 3. client verifies `server_proof`, → `Auth { client_proof }` (or `Reject`)
//! 4. server verifies `client_proof`, checks its policy (connection kind,
//!    migration id, geometry), → `Accept` or `Reject { reason }`.
//!
//! With `H` = the complete Hello frame as sent (header included), `v` the chosen
//! version (2 bytes LE), `Ns` the server nonce and `K` the pre-shared key:
//!
//! - `server_proof = HMAC-SHA256(K, "wanmig-v1 server" || H || v || Ns)`
//! - `client_proof = HMAC-SHA256(K, "wanmig-v1 client" || H || v || Ns || server_proof)`
//!
//! Each proof covers both nonces (the client nonce is inside `H`), so it is
//! bound to one connection and cannot be replayed on another; the role labels
//! (both 16 bytes) keep a server proof from passing as a client proof.
//!
//! Inside TLS ([`crate::transport::tls`], the default) the handshake is
//! *bound* to the TLS session: the labels are `"wanmig-v2 server"` and
//! `"wanmig-v2 client"` and each proof also covers `E`, the session's
//! 32-byte TLS exporter value (appended last). A proof made for one TLS
//! session (or for none) fails in every other, so a machine in the middle
//! that terminates TLS on both sides cannot relay the proofs. Proofs
//! are compared in constant time. The server checks its policy only after the
//! client proved knowledge of the key, so an unauthenticated peer learns
//! nothing but the supported versions.
//!
//! Handshake frames use the normal header and CRC with the frozen
//! [`HANDSHAKE_VERSION`](super::HANDSHAKE_VERSION) and fixed payload sizes;
//! any other frame (Unit, Request, Control, …) during the handshake is refused
//! from its header alone. The handshake reads exactly its own frames and never
//! past them, so the socket can be handed to the io_uring transport afterwards
//! with nothing left in a user-space buffer. The client must not send data
//! frames before it received Accept.
//!
//! Callers set read and write timeouts on the socket (e.g.
//! [`HANDSHAKE_TIMEOUT`]) so that a silent peer cannot hold a handshake open;
//! a timeout surfaces as [`HandshakeError::Io`].

use std::io::{self, Read, Write};
use std::time::Duration;

use hmac::Mac;
use thiserror::Error;
use zerocopy::IntoBytes;

use super::frame::{DecodeError, Decoded, Frame, FrameDecoder};
use super::geometry::{Geometry, GeometryError, Limits};
use super::header::{
    FrameType, HEADER_LEN, Header, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, UnitKind,
};
use super::key::{HmacSha256, MigrationId, PskKey, fill_random};
use super::msg::{
    Auth, Challenge, ConnKind, HELLO_LEN, Hello, MAX_HANDSHAKE_PAYLOAD, NONCE_LEN, PROOF_LEN,
    Reject, RejectReason,
};

/// Suggested read/write timeout for sockets during the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const SERVER_LABEL: &[u8; 16] = b"wanmig-v1 server";
const CLIENT_LABEL: &[u8; 16] = b"wanmig-v1 client";
/// The labels of a handshake bound to a TLS session.
const BOUND_SERVER_LABEL: &[u8; 16] = b"wanmig-v2 server";
const BOUND_CLIENT_LABEL: &[u8; 16] = b"wanmig-v2 client";

/// A TLS session's exporter value the proofs are bound to.
pub type Binding = [u8; 32];
const HELLO_FRAME_LEN: usize = HEADER_LEN + HELLO_LEN;
const MAX_HANDSHAKE_FRAME: usize = HEADER_LEN + MAX_HANDSHAKE_PAYLOAD;

/// A side of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The connecting side (the source engine).
    Client,
    /// The listening side (the destination engine).
    Server,
}

/// What the client announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientParams {
    /// Which connection this is.
    pub conn: ConnKind,
    /// The migration it belongs to.
    pub migration_id: MigrationId,
    /// The guest's geometry.
    pub geometry: Geometry,
}

/// What the server accepts (`None` = anything valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerPolicy {
    /// The migration the server waits for.
    pub expect_migration_id: Option<MigrationId>,
    /// The geometry the server prepared for.
    pub expect_geometry: Option<Geometry>,
    /// The connection kind the server waits for on this socket.
    pub accept_conn: Option<ConnKind>,
}

/// The outcome of a successful handshake; both sides get equal sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Negotiated protocol version.
    pub version: u16,
    /// Which connection this is.
    pub conn: ConnKind,
    /// The migration.
    pub migration_id: MigrationId,
    /// The validated geometry.
    pub geometry: Geometry,
    /// Limits derived from it.
    pub limits: Limits,
}

impl Session {
    /// The data-phase decoder for this connection.
    pub fn decoder(&self) -> FrameDecoder {
        FrameDecoder::new(self.limits, self.version)
    }
}

/// Why a handshake failed. The connection must be dropped.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// Reading or writing the socket failed (including timeouts).
    #[error("handshake I/O failed while trying to {op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// The peer closed the connection mid-handshake.
    #[error(
        "peer closed the connection while we waited for {expecting:?} ({received} bytes of it received)"
    )]
    PeerClosed {
        /// The frame we waited for.
        expecting: FrameType,
        /// Bytes of it received.
        received: usize,
    },
    /// The peer sent a malformed frame.
    #[error("malformed frame while waiting for {expecting:?}")]
    Decode {
        /// The frame we waited for.
        expecting: FrameType,
        /// What was wrong.
        source: DecodeError,
    },
    /// The peer sent a well-formed frame that does not belong here (including
    /// data frames before the handshake finished).
    #[error("unexpected {got:?} frame while waiting for {expected:?}")]
    UnexpectedFrame {
        /// The frame we waited for.
        expected: FrameType,
        /// What came.
        got: FrameType,
    },
    /// A proof did not verify: the keys differ or the peer is an impostor.
    #[error("authentication with the {peer_role:?} failed ({})", if *.reported_by_peer { "it refused our proof" } else { "its proof is wrong" })]
    AuthFailed {
        /// The peer's role.
        peer_role: Role,
        /// True when the peer refused our proof, false when we refused its.
        reported_by_peer: bool,
    },
    /// No protocol version in common.
    #[error("no common protocol version: ours {ours:?}, theirs {theirs:?}")]
    VersionMismatch {
        /// Our (min, max).
        ours: (u16, u16),
        /// The peer's (min, max).
        theirs: (u16, u16),
    },
    /// The peer refused the handshake.
    #[error("peer rejected the handshake: {reason:?}")]
    Rejected {
        /// Its reason.
        reason: RejectReason,
    },
    /// The client belongs to another migration.
    #[error("migration id {got} is not the expected {expected}")]
    MigrationIdMismatch {
        /// The id the server waits for.
        expected: MigrationId,
        /// The id the client sent.
        got: MigrationId,
    },
    /// The client's geometry differs from the one the server prepared for.
    #[error("geometry {got:?} differs from the expected {expected:?}")]
    GeometryMismatch {
        /// The server's geometry.
        expected: Geometry,
        /// The client's.
        got: Geometry,
    },
    /// The geometry (ours as a client, the client's as a server) is invalid.
    #[error("invalid geometry")]
    Geometry(#[from] GeometryError),
    /// The server does not take this connection kind here.
    #[error("connection kind {got:?} refused, expected {expected:?}")]
    ConnNotAccepted {
        /// The kind the server waits for.
        expected: ConnKind,
        /// The kind the client announced.
        got: ConnKind,
    },
    /// The kernel random source failed.
    #[error("cannot draw a nonce")]
    Random {
        /// The getrandom error.
        source: io::Error,
    },
}

/// Knobs the tests turn; production uses [`Options::default`].
#[derive(Clone, Copy)]
struct Options {
    versions: (u16, u16),
    rng: fn(&mut [u8]) -> io::Result<()>,
    binding: Option<Binding>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            versions: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            rng: fill_random,
            binding: None,
        }
    }
}

impl Options {
    /// The defaults, bound to a TLS session.
    fn bound(binding: &Binding) -> Self {
        Options {
            binding: Some(*binding),
            ..Options::default()
        }
    }
}

/// Runs the client (source) side of the handshake on a blocking stream.
pub fn client_handshake<S: Read + Write>(
    stream: S,
    params: &ClientParams,
    key: &PskKey,
) -> Result<Session, HandshakeError> {
    client_with(stream, params, key, Options::default())
}

/// [`client_handshake`] inside a TLS session whose exporter value is
/// `binding` (see the module docs).
pub fn client_handshake_bound<S: Read + Write>(
    stream: S,
    params: &ClientParams,
    key: &PskKey,
    binding: &Binding,
) -> Result<Session, HandshakeError> {
    client_with(stream, params, key, Options::bound(binding))
}

/// [`server_handshake`] inside a TLS session whose exporter value is
/// `binding` (see the module docs).
pub fn server_handshake_bound<S: Read + Write>(
    stream: S,
    policy: &ServerPolicy,
    key: &PskKey,
    binding: &Binding,
) -> Result<Session, HandshakeError> {
    server_with(stream, policy, key, Options::bound(binding))
}

/// Runs the server (destination) side of the handshake on a blocking stream.
pub fn server_handshake<S: Read + Write>(
    stream: S,
    policy: &ServerPolicy,
    key: &PskKey,
) -> Result<Session, HandshakeError> {
    server_with(stream, policy, key, Options::default())
}

/// A handshake frame without unit fields, encoded into a new vector.
fn frame_bytes(frame_type: FrameType, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut header = Header::new(frame_type, 0, UnitKind::Control, len);
    header.seal(payload);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn transcript_mac(
    key: &PskKey,
    label: &[u8; 16],
    hello_frame: &[u8],
    version: u16,
    server_nonce: &[u8; NONCE_LEN],
) -> HmacSha256 {
    let mut mac = key.mac();
    mac.update(label);
    mac.update(hello_frame);
    mac.update(&version.to_le_bytes());
    mac.update(server_nonce);
    mac
}

fn server_mac(
    key: &PskKey,
    hello_frame: &[u8],
    version: u16,
    nonce: &[u8; NONCE_LEN],
    binding: Option<&Binding>,
) -> HmacSha256 {
    let label = if binding.is_some() {
        BOUND_SERVER_LABEL
    } else {
        SERVER_LABEL
    };
    let mut mac = transcript_mac(key, label, hello_frame, version, nonce);
    if let Some(b) = binding {
        mac.update(b);
    }
    mac
}

fn client_mac(
    key: &PskKey,
    hello_frame: &[u8],
    c: &Challenge,
    binding: Option<&Binding>,
) -> HmacSha256 {
    let label = if binding.is_some() {
        BOUND_CLIENT_LABEL
    } else {
        CLIENT_LABEL
    };
    let mut mac = transcript_mac(key, label, hello_frame, c.version, &c.server_nonce);
    mac.update(&c.server_proof);
    if let Some(b) = binding {
        mac.update(b);
    }
    mac
}

fn tag(mac: HmacSha256) -> [u8; PROOF_LEN] {
    mac.finalize().into_bytes().into()
}

/// Highest version in both inclusive ranges.
fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    let lo = ours.0.max(theirs.0);
    let hi = ours.1.min(theirs.1);
    (theirs.0 <= theirs.1 && lo <= hi).then_some(hi)
}

/// A blocking stream plus a buffer for one handshake frame.
struct Conn<S> {
    stream: S,
    buf: [u8; MAX_HANDSHAKE_FRAME],
    versions: (u16, u16),
}

impl<S: Read + Write> Conn<S> {
    fn send(&mut self, bytes: &[u8], op: &'static str) -> Result<(), HandshakeError> {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|source| HandshakeError::Io { op, source })
    }

    /// Sends a Reject (best effort: the connection is failing anyway) and
    /// returns `err`.
    fn refuse(&mut self, reason: RejectReason, err: HandshakeError) -> HandshakeError {
        let reject = Reject {
            reason,
            min_version: self.versions.0,
            max_version: self.versions.1,
        };
        let _ = self.send(
            &frame_bytes(FrameType::Reject, reject.to_wire().as_bytes()),
            "send Reject",
        );
        err
    }

    /// Reads exactly one handshake frame; returns it and its length in `buf`.
    fn recv(&mut self, expecting: FrameType) -> Result<(Frame, usize), HandshakeError> {
        let decoder = FrameDecoder::handshake();
        let mut filled = 0;
        loop {
            let need = match decoder.decode(self.buf.get(..filled).unwrap_or(&[])) {
                Ok(Decoded::Frame { frame, consumed }) => {
                    let frame = frame
                        .to_frame()
                        .map_err(|source| HandshakeError::Decode { expecting, source })?;
                    return Ok((frame, consumed));
                }
                Ok(Decoded::NeedMore { at_least }) => at_least,
                Err(DecodeError::UnexpectedFrame { frame_type, .. }) => {
                    let err = HandshakeError::UnexpectedFrame {
                        expected: expecting,
                        got: frame_type,
                    };
                    return Err(self.refuse(RejectReason::Protocol, err));
                }
                Err(source) => {
                    let err = HandshakeError::Decode { expecting, source };
                    return Err(self.refuse(RejectReason::Protocol, err));
                }
            };
            let dst = self.buf.get_mut(filled..need).unwrap_or(&mut []);
            read_full(&mut self.stream, dst, expecting, filled)?;
            filled = need;
        }
    }

    /// Turns a frame that is neither the expected one nor a Reject into an error.
    fn unexpected(&mut self, expected: FrameType, got: &Frame) -> HandshakeError {
        let err = HandshakeError::UnexpectedFrame {
            expected,
            got: got.frame_type(),
        };
        self.refuse(RejectReason::Protocol, err)
    }
}

/// Fills `dst` from `stream`; `before` bytes of the frame were read earlier.
fn read_full<S: Read>(
    stream: &mut S,
    dst: &mut [u8],
    expecting: FrameType,
    before: usize,
) -> Result<(), HandshakeError> {
    let mut got = 0;
    while let Some(rest) = dst.get_mut(got..) {
        if rest.is_empty() {
            break;
        }
        match stream.read(rest) {
            Ok(0) => {
                return Err(HandshakeError::PeerClosed {
                    expecting,
                    received: before.saturating_add(got),
                });
            }
            Ok(n) => got = got.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                let op = match expecting {
                    FrameType::Hello => "receive Hello",
                    FrameType::Challenge => "receive Challenge",
                    FrameType::Auth => "receive Auth",
                    _ => "receive Accept",
                };
                return Err(HandshakeError::Io { op, source });
            }
        }
    }
    Ok(())
}

/// The error a Reject from the peer means.
fn rejected(r: &Reject, ours: (u16, u16), peer_role: Role) -> HandshakeError {
    match r.reason {
        RejectReason::AuthFailed => HandshakeError::AuthFailed {
            peer_role,
            reported_by_peer: true,
        },
        RejectReason::VersionMismatch => HandshakeError::VersionMismatch {
            ours,
            theirs: (r.min_version, r.max_version),
        },
        reason => HandshakeError::Rejected { reason },
    }
}

fn client_with<S: Read + Write>(
    stream: S,
    params: &ClientParams,
    key: &PskKey,
    opts: Options,
) -> Result<Session, HandshakeError> {
    let limits = Limits::from_geometry(&params.geometry)?;
    let mut conn = Conn {
        stream,
        buf: [0; MAX_HANDSHAKE_FRAME],
        versions: opts.versions,
    };
    let mut client_nonce = [0; NONCE_LEN];
    (opts.rng)(&mut client_nonce).map_err(|source| HandshakeError::Random { source })?;
    let hello = Hello {
        min_version: opts.versions.0,
        max_version: opts.versions.1,
        conn: params.conn,
        migration_id: params.migration_id,
        client_nonce,
        geometry: params.geometry,
    };
    let hello_frame = frame_bytes(FrameType::Hello, hello.to_wire().as_bytes());
    conn.send(&hello_frame, "send Hello")?;

    let challenge = match conn.recv(FrameType::Challenge)?.0 {
        Frame::Challenge(c) => c,
        Frame::Reject(r) => return Err(rejected(&r, opts.versions, Role::Server)),
        other => return Err(conn.unexpected(FrameType::Challenge, &other)),
    };
    let expected_proof = server_mac(
        key,
        &hello_frame,
        challenge.version,
        &challenge.server_nonce,
        opts.binding.as_ref(),
    );
    if expected_proof
        .verify_slice(&challenge.server_proof)
        .is_err()
    {
        let err = HandshakeError::AuthFailed {
            peer_role: Role::Server,
            reported_by_peer: false,
        };
        return Err(conn.refuse(RejectReason::AuthFailed, err));
    }
    let (min, max) = opts.versions;
    if !(min..=max).contains(&challenge.version) {
        let err = HandshakeError::VersionMismatch {
            ours: opts.versions,
            theirs: (challenge.version, challenge.version),
        };
        return Err(conn.refuse(RejectReason::VersionMismatch, err));
    }
    let auth = Auth {
        client_proof: tag(client_mac(
            key,
            &hello_frame,
            &challenge,
            opts.binding.as_ref(),
        )),
    };
    conn.send(
        &frame_bytes(FrameType::Auth, auth.to_wire().as_bytes()),
        "send Auth",
    )?;

    match conn.recv(FrameType::Accept)?.0 {
        Frame::Accept => Ok(Session {
            version: challenge.version,
            conn: params.conn,
            migration_id: params.migration_id,
            geometry: params.geometry,
            limits,
        }),
        Frame::Reject(r) => Err(rejected(&r, opts.versions, Role::Server)),
        other => Err(conn.unexpected(FrameType::Accept, &other)),
    }
}

fn server_with<S: Read + Write>(
    stream: S,
    policy: &ServerPolicy,
    key: &PskKey,
    opts: Options,
) -> Result<Session, HandshakeError> {
    let mut conn = Conn {
        stream,
        buf: [0; MAX_HANDSHAKE_FRAME],
        versions: opts.versions,
    };
    let (hello, hello_len) = match conn.recv(FrameType::Hello)? {
        (Frame::Hello(h), len) => (h, len),
        (other, _) => return Err(conn.unexpected(FrameType::Hello, &other)),
    };
    // Hello has a fixed size, so `hello_len == HELLO_FRAME_LEN`.
    let hello_frame: [u8; HELLO_FRAME_LEN] = conn
        .buf
        .get(..hello_len)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; HELLO_FRAME_LEN]);

    let theirs = (hello.min_version, hello.max_version);
    let Some(version) = negotiate(opts.versions, theirs) else {
        let err = HandshakeError::VersionMismatch {
            ours: opts.versions,
            theirs,
        };
        return Err(conn.refuse(RejectReason::VersionMismatch, err));
    };
    let mut server_nonce = [0; NONCE_LEN];
    (opts.rng)(&mut server_nonce).map_err(|source| HandshakeError::Random { source })?;
    let challenge = Challenge {
        version,
        server_nonce,
        server_proof: tag(server_mac(
            key,
            &hello_frame,
            version,
            &server_nonce,
            opts.binding.as_ref(),
        )),
    };
    let challenge_bytes = frame_bytes(FrameType::Challenge, challenge.to_wire().as_bytes());
    conn.send(&challenge_bytes, "send Challenge")?;

    let auth = match conn.recv(FrameType::Auth)?.0 {
        Frame::Auth(a) => a,
        Frame::Reject(r) => return Err(rejected(&r, opts.versions, Role::Client)),
        other => return Err(conn.unexpected(FrameType::Auth, &other)),
    };
    if client_mac(key, &hello_frame, &challenge, opts.binding.as_ref())
        .verify_slice(&auth.client_proof)
        .is_err()
    {
        let err = HandshakeError::AuthFailed {
            peer_role: Role::Client,
            reported_by_peer: false,
        };
        return Err(conn.refuse(RejectReason::AuthFailed, err));
    }
    let limits = match check_policy(policy, &hello) {
        Ok(limits) => limits,
        Err((reason, err)) => return Err(conn.refuse(reason, err)),
    };
    conn.send(&frame_bytes(FrameType::Accept, &[]), "send Accept")?;
    Ok(Session {
        version,
        conn: hello.conn,
        migration_id: hello.migration_id,
        geometry: hello.geometry,
        limits,
    })
}

/// The server's checks on an authenticated Hello.
fn check_policy(
    policy: &ServerPolicy,
    hello: &Hello,
) -> Result<Limits, (RejectReason, HandshakeError)> {
    if let Some(expected) = policy.accept_conn.filter(|&c| c != hello.conn) {
        let err = HandshakeError::ConnNotAccepted {
            expected,
            got: hello.conn,
        };
        return Err((RejectReason::ConnNotAccepted, err));
    }
    if let Some(expected) = policy
        .expect_migration_id
        .filter(|&m| m != hello.migration_id)
    {
        let err = HandshakeError::MigrationIdMismatch {
            expected,
            got: hello.migration_id,
        };
        return Err((RejectReason::MigrationIdMismatch, err));
    }
    let limits = Limits::from_geometry(&hello.geometry)
        .map_err(|e| (RejectReason::InvalidGeometry, HandshakeError::Geometry(e)))?;
    if let Some(expected) = policy.expect_geometry.filter(|&g| g != hello.geometry) {
        let err = HandshakeError::GeometryMismatch {
            expected,
            got: hello.geometry,
        };
        return Err((RejectReason::GeometryMismatch, err));
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{Compression, encode_control, encode_unit};
    use crate::wire::geometry::tests::test_geometry;
    use crate::wire::msg::ControlCode;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn key(fill: u8) -> PskKey {
        PskKey::from_bytes(&[fill; 32]).unwrap()
    }

    fn params(conn: ConnKind) -> ClientParams {
        ClientParams {
            conn,
            migration_id: MigrationId([7; 16]),
            geometry: test_geometry(),
        }
    }

    fn strict_policy() -> ServerPolicy {
        ServerPolicy {
            expect_migration_id: Some(MigrationId([7; 16])),
            expect_geometry: Some(test_geometry()),
            accept_conn: None,
        }
    }

    /// Runs `server` on a thread and `client` here over a socket pair.
    fn run<C, R, T>(client: C, server: impl FnOnce(UnixStream) -> T + Send + 'static) -> (R, T)
    where
        C: FnOnce(UnixStream) -> R,
        T: Send + 'static,
    {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).unwrap();
        b.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).unwrap();
        let server = thread::spawn(move || server(b));
        let c = client(a);
        (c, server.join().unwrap())
    }

    fn honest_pair(
        client_key: PskKey,
        server_key: PskKey,
        params: ClientParams,
        policy: ServerPolicy,
    ) -> (
        Result<Session, HandshakeError>,
        Result<Session, HandshakeError>,
    ) {
        run(
            move |s| client_handshake(s, &params, &client_key),
            move |s| server_handshake(s, &policy, &server_key),
        )
    }

    /// Reads one handshake frame from a raw stream (for fake peers).
    fn read_frame(s: &mut UnixStream) -> (Frame, Vec<u8>) {
        let mut conn = Conn {
            stream: s,
            buf: [0; MAX_HANDSHAKE_FRAME],
            versions: (1, 1),
        };
        let (frame, len) = conn.recv(FrameType::Hello).unwrap();
        (frame, conn.buf[..len].to_vec())
    }

    fn hello_bytes(geometry: Geometry, nonce: [u8; 32]) -> Vec<u8> {
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            conn: ConnKind::Bulk,
            migration_id: MigrationId([7; 16]),
            client_nonce: nonce,
            geometry,
        };
        frame_bytes(FrameType::Hello, hello.to_wire().as_bytes())
    }

    fn auth_bytes(proof: [u8; 32]) -> Vec<u8> {
        frame_bytes(
            FrameType::Auth,
            Auth {
                client_proof: proof,
            }
            .to_wire()
            .as_bytes(),
        )
    }

    fn expect_reject(s: &mut UnixStream, reason: RejectReason) {
        match read_frame(s).0 {
            Frame::Reject(r) => assert_eq!(r.reason, reason),
            other => panic!("expected Reject, got {other:?}"),
        }
    }

    #[test]
    fn success_gives_equal_sessions() {
        for conn in [ConnKind::Bulk, ConnKind::Fault] {
            let (c, s) = honest_pair(key(1), key(1), params(conn), strict_policy());
            let (c, s) = (c.unwrap(), s.unwrap());
            assert_eq!(c, s);
            assert_eq!(c.version, PROTOCOL_VERSION);
            assert_eq!(c.conn, conn);
            assert_eq!(c.migration_id, MigrationId([7; 16]));
            assert_eq!(c.decoder(), s.decoder());
        }
        let any = ServerPolicy::default();
        let (c, s) = honest_pair(key(2), key(2), params(ConnKind::Fault), any);
        assert_eq!(c.unwrap(), s.unwrap());
    }

    #[test]
    fn session_decoder_accepts_data_frames() {
        let (c, s) = honest_pair(key(1), key(1), params(ConnKind::Bulk), strict_policy());
        let (c, s) = (c.unwrap(), s.unwrap());
        let mut out = vec![0; 64];
        let n = encode_control(&mut out, ControlCode::Freeze).unwrap();
        let d = s.decoder().decode(&out[..n]).unwrap();
        assert!(matches!(d, Decoded::Frame { consumed, .. } if consumed == n));
        assert_eq!(c.limits.max_payload(), 1 << 20);
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (c, s) = honest_pair(key(1), key(2), params(ConnKind::Bulk), strict_policy());
        assert!(matches!(
            c,
            Err(HandshakeError::AuthFailed {
                peer_role: Role::Server,
                reported_by_peer: false
            })
        ));
        assert!(matches!(
            s,
            Err(HandshakeError::AuthFailed {
                peer_role: Role::Client,
                reported_by_peer: true
            })
        ));
    }

    /// Proofs bound to one TLS session fail in another (a machine in the
    /// middle relaying them between its two sessions) and against an
    /// unbound peer; equal bindings succeed.
    #[test]
    fn proofs_bound_to_another_session_fail_on_both_sides() {
        let ok = run(
            move |s| client_handshake_bound(s, &params(ConnKind::Bulk), &key(1), &[7; 32]),
            move |s| server_handshake_bound(s, &strict_policy(), &key(1), &[7; 32]),
        );
        assert!(ok.0.is_ok() && ok.1.is_ok(), "{ok:?}");
        let mismatched = run(
            move |s| client_handshake_bound(s, &params(ConnKind::Bulk), &key(1), &[7; 32]),
            move |s| server_handshake_bound(s, &strict_policy(), &key(1), &[8; 32]),
        );
        let unbound = run(
            move |s| client_handshake(s, &params(ConnKind::Bulk), &key(1)),
            move |s| server_handshake_bound(s, &strict_policy(), &key(1), &[0; 32]),
        );
        for (c, s) in [mismatched, unbound] {
            assert!(
                matches!(
                    c,
                    Err(HandshakeError::AuthFailed {
                        peer_role: Role::Server,
                        reported_by_peer: false
                    })
                ),
                "{c:?}"
            );
            assert!(
                matches!(
                    s,
                    Err(HandshakeError::AuthFailed {
                        peer_role: Role::Client,
                        reported_by_peer: true
                    })
                ),
                "{s:?}"
            );
        }
    }

    #[test]
    fn version_mismatch_fails_on_both_sides() {
        let p = params(ConnKind::Bulk);
        let (c, s) = run(
            move |s| {
                let opts = Options {
                    versions: (5, 7),
                    ..Options::default()
                };
                client_with(s, &p, &key(1), opts)
            },
            |s| server_handshake(s, &strict_policy(), &key(1)),
        );
        match c {
            Err(HandshakeError::VersionMismatch { ours, theirs }) => {
                assert_eq!(ours, (5, 7));
                assert_eq!(theirs, (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION));
            }
            other => panic!("{other:?}"),
        }
        match s {
            Err(HandshakeError::VersionMismatch { ours, theirs }) => {
                assert_eq!(ours, (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION));
                assert_eq!(theirs, (5, 7));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn negotiation_picks_highest_common() {
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((1, 3), (1, 1)), Some(1));
        assert_eq!(negotiate((1, 3), (4, 5)), None);
        assert_eq!(negotiate((1, 3), (3, 2)), None);
    }

    #[test]
    fn server_choosing_a_version_outside_ours_is_refused() {
        // A fake server (with the right key) answers version 9.
        let (c, ()) = run(
            |s| client_handshake(s, &params(ConnKind::Bulk), &key(1)),
            |mut s| {
                let (_, hello) = read_frame(&mut s);
                let nonce = [3; 32];
                let challenge = Challenge {
                    version: 9,
                    server_nonce: nonce,
                    server_proof: tag(server_mac(&key(1), &hello, 9, &nonce, None)),
                };
                s.write_all(&frame_bytes(
                    FrameType::Challenge,
                    challenge.to_wire().as_bytes(),
                ))
                .unwrap();
                expect_reject(&mut s, RejectReason::VersionMismatch);
            },
        );
        assert!(matches!(
            c,
            Err(HandshakeError::VersionMismatch {
                ours: (1, 1),
                theirs: (9, 9)
            })
        ));
    }

    #[test]
    fn migration_id_mismatch() {
        let mut p = params(ConnKind::Bulk);
        p.migration_id = MigrationId([8; 16]);
        let (c, s) = honest_pair(key(1), key(1), p, strict_policy());
        assert!(matches!(
            c,
            Err(HandshakeError::Rejected {
                reason: RejectReason::MigrationIdMismatch
            })
        ));
        match s {
            Err(HandshakeError::MigrationIdMismatch { expected, got }) => {
                assert_eq!(expected, MigrationId([7; 16]));
                assert_eq!(got, MigrationId([8; 16]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn geometry_mismatch() {
        let mut p = params(ConnKind::Bulk);
        p.geometry = Geometry::new(4096, 1 << 17, 64 << 10, 4096, 1 << 20);
        let (c, s) = honest_pair(key(1), key(1), p, strict_policy());
        assert!(matches!(
            c,
            Err(HandshakeError::Rejected {
                reason: RejectReason::GeometryMismatch
            })
        ));
        match s {
            Err(HandshakeError::GeometryMismatch { expected, got }) => {
                assert_eq!(expected, test_geometry());
                assert_eq!(got, p.geometry);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conn_kind_not_accepted() {
        let policy = ServerPolicy {
            accept_conn: Some(ConnKind::Fault),
            ..strict_policy()
        };
        let (c, s) = honest_pair(key(1), key(1), params(ConnKind::Bulk), policy);
        assert!(matches!(
            c,
            Err(HandshakeError::Rejected {
                reason: RejectReason::ConnNotAccepted
            })
        ));
        assert!(matches!(
            s,
            Err(HandshakeError::ConnNotAccepted {
                expected: ConnKind::Fault,
                got: ConnKind::Bulk
            })
        ));
    }

    #[test]
    fn client_refuses_its_own_invalid_geometry_before_sending() {
        let mut p = params(ConnKind::Bulk);
        p.geometry = Geometry::new(1000, 1, 4096, 1, 0);
        let (c, s) = honest_pair(key(1), key(1), p, ServerPolicy::default());
        assert!(matches!(
            c,
            Err(HandshakeError::Geometry(GeometryError::PageSize {
                page_size: 1000
            }))
        ));
        assert!(matches!(
            s,
            Err(HandshakeError::PeerClosed {
                expecting: FrameType::Hello,
                received: 0
            })
        ));
    }

    /// A client that follows the protocol with `key` but sends `geometry` as is.
    fn raw_client(s: &mut UnixStream, key: &PskKey, geometry: Geometry) -> Vec<u8> {
        let hello = hello_bytes(geometry, [9; 32]);
        s.write_all(&hello).unwrap();
        let Frame::Challenge(c) = read_frame(s).0 else {
            panic!("no challenge")
        };
        s.write_all(&auth_bytes(tag(client_mac(key, &hello, &c, None))))
            .unwrap();
        hello
    }

    #[test]
    fn server_refuses_invalid_geometry() {
        let (s, ()) = run(
            |s| server_handshake(s, &ServerPolicy::default(), &key(1)),
            |mut s| {
                raw_client(&mut s, &key(1), Geometry::new(4096, 1, 3000, 1, 0));
                expect_reject(&mut s, RejectReason::InvalidGeometry);
            },
        );
        assert!(matches!(
            s,
            Err(HandshakeError::Geometry(GeometryError::ChunkSize {
                chunk_size: 3000
            }))
        ));
    }

    #[test]
    fn raw_client_with_right_key_is_accepted() {
        let (s, ()) = run(
            |s| server_handshake(s, &strict_policy(), &key(1)),
            |mut s| {
                raw_client(&mut s, &key(1), test_geometry());
                assert_eq!(read_frame(&mut s).0, Frame::Accept);
            },
        );
        assert_eq!(s.unwrap().geometry, test_geometry());
    }

    #[test]
    fn unit_frame_instead_of_hello_is_refused_from_its_header() {
        let (s, ()) = run(
            |s| server_handshake(s, &ServerPolicy::default(), &key(1)),
            |mut s| {
                let mut out = vec![0; 8192];
                let data = vec![0xa5; 4096];
                let e = encode_unit(&mut out, UnitKind::Page, 0, &data, Compression::None).unwrap();
                // Only the header is needed for the server to refuse.
                s.write_all(&out[..HEADER_LEN]).unwrap();
                expect_reject(&mut s, RejectReason::Protocol);
                let _ = s.write_all(&out[HEADER_LEN..e.len]);
            },
        );
        assert!(matches!(
            s,
            Err(HandshakeError::UnexpectedFrame {
                expected: FrameType::Hello,
                got: FrameType::Unit
            })
        ));
    }

    #[test]
    fn control_frame_instead_of_auth_is_refused() {
        let (s, ()) = run(
            |s| server_handshake(s, &ServerPolicy::default(), &key(1)),
            |mut s| {
                s.write_all(&hello_bytes(test_geometry(), [1; 32])).unwrap();
                let _ = read_frame(&mut s);
                let mut out = [0; 64];
                let n = encode_control(&mut out, ControlCode::Freeze).unwrap();
                s.write_all(&out[..n]).unwrap();
                expect_reject(&mut s, RejectReason::Protocol);
            },
        );
        assert!(matches!(
            s,
            Err(HandshakeError::UnexpectedFrame {
                expected: FrameType::Auth,
                got: FrameType::Control
            })
        ));
    }

    #[test]
    fn handshake_frame_out_of_order_is_refused() {
        // An Accept sent by a "client" in place of Hello.
        let (s, ()) = run(
            |s| server_handshake(s, &ServerPolicy::default(), &key(1)),
            |mut s| {
                s.write_all(&frame_bytes(FrameType::Accept, &[])).unwrap();
                expect_reject(&mut s, RejectReason::Protocol);
            },
        );
        assert!(matches!(
            s,
            Err(HandshakeError::UnexpectedFrame {
                expected: FrameType::Hello,
                got: FrameType::Accept
            })
        ));
        // A server answering Hello with Accept (skipping authentication).
        let (c, ()) = run(
            |s| client_handshake(s, &params(ConnKind::Bulk), &key(1)),
            |mut s| {
                let _ = read_frame(&mut s);
                s.write_all(&frame_bytes(FrameType::Accept, &[])).unwrap();
            },
        );
        assert!(matches!(
            c,
            Err(HandshakeError::UnexpectedFrame {
                expected: FrameType::Challenge,
                got: FrameType::Accept
            })
        ));
    }

    /// Wraps a stream and records what is written to it.
    struct Recorder<S> {
        inner: S,
        written: Vec<u8>,
    }

    impl<S: Read> Read for Recorder<S> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl<S: Write> Write for Recorder<S> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn replayed_hello_and_auth_are_refused() {
        // Capture a real client's Hello and Auth.
        let (captured, s) = run(
            |s| {
                let mut rec = Recorder {
                    inner: s,
                    written: Vec::new(),
                };
                client_handshake(&mut rec, &params(ConnKind::Bulk), &key(1)).unwrap();
                rec.written
            },
            |s| server_handshake(s, &strict_policy(), &key(1)),
        );
        s.unwrap();
        assert_eq!(captured.len(), HELLO_FRAME_LEN + HEADER_LEN + 32);
        // Replay them, byte for byte, to a new server with the same key.
        let (s, ()) = run(
            |s| server_handshake(s, &strict_policy(), &key(1)),
            move |mut s| {
                s.write_all(&captured[..HELLO_FRAME_LEN]).unwrap();
                assert!(matches!(read_frame(&mut s).0, Frame::Challenge(_)));
                s.write_all(&captured[HELLO_FRAME_LEN..]).unwrap();
                expect_reject(&mut s, RejectReason::AuthFailed);
            },
        );
        assert!(matches!(
            s,
            Err(HandshakeError::AuthFailed {
                peer_role: Role::Client,
                reported_by_peer: false
            })
        ));
    }

    #[test]
    fn reflected_server_proof_is_refused() {
        let (s, ()) = run(
            |s| server_handshake(s, &strict_policy(), &key(1)),
            |mut s| {
                s.write_all(&hello_bytes(test_geometry(), [4; 32])).unwrap();
                let Frame::Challenge(c) = read_frame(&mut s).0 else {
                    panic!("no challenge")
                };
                s.write_all(&auth_bytes(c.server_proof)).unwrap();
                expect_reject(&mut s, RejectReason::AuthFailed);
            },
        );
        assert!(matches!(
            s,
            Err(HandshakeError::AuthFailed {
                peer_role: Role::Client,
                reported_by_peer: false
            })
        ));
    }

    #[test]
    fn client_maps_reject_after_auth() {
        // A fake server with the right key that still refuses the client proof.
        let (c, ()) = run(
            |s| client_handshake(s, &params(ConnKind::Bulk), &key(1)),
            |mut s| {
                let (_, hello) = read_frame(&mut s);
                let nonce = [5; 32];
                let challenge = Challenge {
                    version: 1,
                    server_nonce: nonce,
                    server_proof: tag(server_mac(&key(1), &hello, 1, &nonce, None)),
                };
                s.write_all(&frame_bytes(
                    FrameType::Challenge,
                    challenge.to_wire().as_bytes(),
                ))
                .unwrap();
                assert!(matches!(read_frame(&mut s).0, Frame::Auth(_)));
                let reject = Reject {
                    reason: RejectReason::AuthFailed,
                    min_version: 1,
                    max_version: 1,
                };
                s.write_all(&frame_bytes(FrameType::Reject, reject.to_wire().as_bytes()))
                    .unwrap();
            },
        );
        assert!(matches!(
            c,
            Err(HandshakeError::AuthFailed {
                peer_role: Role::Server,
                reported_by_peer: true
            })
        ));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let (s, ()) = run(
            |s| server_handshake(s, &ServerPolicy::default(), &key(1)),
            |mut s| {
                s.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
                    .unwrap();
                expect_reject(&mut s, RejectReason::Protocol);
            },
        );
        match s {
            Err(HandshakeError::Decode {
                expecting: FrameType::Hello,
                source: DecodeError::BadMagic { got },
            }) => assert_eq!(&got, b"GET "),
            other => panic!("{other:?}"),
        }
        // A corrupted Hello (valid header, flipped payload bit).
        let (s, ()) = run(
            |s| server_handshake(s, &ServerPolicy::default(), &key(1)),
            |mut s| {
                let mut hello = hello_bytes(test_geometry(), [1; 32]);
                hello[HEADER_LEN + 40] ^= 1;
                s.write_all(&hello).unwrap();
                expect_reject(&mut s, RejectReason::Protocol);
            },
        );
        assert!(matches!(
            s,
            Err(HandshakeError::Decode {
                expecting: FrameType::Hello,
                source: DecodeError::CrcMismatch { .. }
            })
        ));
    }

    #[test]
    fn early_eof() {
        let (s, ()) = run(
            |s| server_handshake(s, &ServerPolicy::default(), &key(1)),
            |mut s| {
                let hello = hello_bytes(test_geometry(), [1; 32]);
                s.write_all(&hello[..50]).unwrap();
            },
        );
        assert!(matches!(
            s,
            Err(HandshakeError::PeerClosed {
                expecting: FrameType::Hello,
                received: 50
            })
        ));
        let (c, ()) = run(
            |s| client_handshake(s, &params(ConnKind::Fault), &key(1)),
            |mut s| {
                let _ = read_frame(&mut s);
            },
        );
        assert!(matches!(
            c,
            Err(HandshakeError::PeerClosed {
                expecting: FrameType::Challenge,
                received: 0
            })
        ));
    }

    /// A stream whose reads fail.
    struct Broken;

    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::TimedOut))
        }
    }

    impl Write for Broken {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn io_errors_and_timeouts() {
        match server_handshake(Broken, &ServerPolicy::default(), &key(1)) {
            Err(HandshakeError::Io { op, source }) => {
                assert_eq!(op, "receive Hello");
                assert_eq!(source.kind(), io::ErrorKind::TimedOut);
            }
            other => panic!("{other:?}"),
        }
        match client_handshake(Broken, &params(ConnKind::Bulk), &key(1)) {
            Err(HandshakeError::Io { op, .. }) => assert_eq!(op, "receive Challenge"),
            other => panic!("{other:?}"),
        }
        // A real timeout on a silent peer.
        let (a, _b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        assert!(matches!(
            client_handshake(a, &params(ConnKind::Bulk), &key(1)),
            Err(HandshakeError::Io {
                op: "receive Challenge",
                ..
            })
        ));
    }

    #[test]
    fn random_source_failure() {
        let opts = Options {
            rng: |_| Err(io::Error::from_raw_os_error(libc::ENOSYS)),
            ..Options::default()
        };
        match client_with(Broken, &params(ConnKind::Bulk), &key(1), opts) {
            Err(HandshakeError::Random { source }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSYS));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_display_context() {
        let e = HandshakeError::VersionMismatch {
            ours: (1, 1),
            theirs: (2, 3),
        };
        assert_eq!(
            e.to_string(),
            "no common protocol version: ours (1, 1), theirs (2, 3)"
        );
        let e = HandshakeError::AuthFailed {
            peer_role: Role::Client,
            reported_by_peer: false,
        };
        assert!(e.to_string().contains("its proof is wrong"));
    }
}
