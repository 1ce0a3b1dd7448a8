//! Opening a migration's two connections: TCP, socket tuning, the
//! authenticated handshake, then the io_uring sender and receiver.
//!
//! The source connects (`bulk` first, then `fault`); the destination accepts
//! both, in whatever order they arrive, and insists that the second belongs to
//! the same migration and geometry as the first. For a Xen guest the
//! direction is reversed ([`accept_destination`], [`connect_to_source`]): the
//! source listens where the hand-off record in the toolstack's stream says,
//! the destination dials; the source remains the handshake's client. Every connection carries
//! frames both ways, so each becomes a [`Connection`]: a [`UnitSender`] and a
//! [`FrameReceiver`] on two descriptors of the same socket.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::transport::{
    ConnRole, FrameReceiver, FrameSender, IoPreference, RecvConfig, RecvError, SendConfig,
    SendError, tcp,
};
use crate::unit_stream::UnitSender;
use crate::wire::{
    ClientParams, Compression, ConnKind, Geometry, HANDSHAKE_TIMEOUT, HandshakeError, MigrationId,
    PskKey, ServerPolicy, Session, client_handshake, server_handshake,
};

/// One authenticated connection, ready for frames in both directions.
#[derive(Debug)]
pub struct Connection {
    /// What the handshake settled.
    pub session: Session,
    /// Frames to the peer.
    pub tx: UnitSender,
    /// Frames from the peer.
    pub rx: FrameReceiver,
}

/// A migration's connections.
#[derive(Debug)]
pub struct ConnectionPair {
    /// Pre-copy rounds, device state, background post-copy push.
    pub bulk: Connection,
    /// Post-copy fault requests and answers.
    pub fault: Connection,
}

/// Transport settings for both connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// The bulk connection's sender (paced by default).
    pub bulk: SendConfig,
    /// The fault connection's sender (never paced).
    pub fault: SendConfig,
    /// Receivers.
    pub recv: RecvConfig,
    /// Whether units may be LZ4-compressed.
    pub compression: Compression,
    /// Limit for the TCP connect and the handshake of each connection.
    pub handshake_timeout: Duration,
    /// How long [`accept`] waits for the source's two connections.
    pub accept_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            bulk: SendConfig::default(),
            fault: SendConfig::fault(),
            recv: RecvConfig::default(),
            compression: Compression::Lz4,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            accept_timeout: Duration::from_secs(60),
        }
    }
}

impl LinkConfig {
    /// The same settings with every connection on the given I/O backend.
    pub fn with_io(mut self, io: IoPreference) -> Self {
        self.bulk.io = io;
        self.fault.io = io;
        self.recv.io = io;
        self
    }
}

/// Why a migration's connections could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect or accept failed.
    #[error("{conn:?} connection to {peer}")]
    Tcp {
        /// Which connection.
        conn: ConnKind,
        /// The peer address (or the listening address when accepting).
        peer: SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The handshake failed (wrong key, version, geometry, migration id...).
    #[error("{conn:?} connection handshake with {peer}")]
    Handshake {
        /// Which connection (as far as we know).
        conn: ConnKind,
        /// The peer address.
        peer: SocketAddr,
        /// The error.
        #[source]
        source: HandshakeError,
    },
    /// The source's connections did not arrive in time.
    #[error("no migration connected to {local} within {after:?}")]
    AcceptTimeout {
        /// The listening address.
        local: SocketAddr,
        /// How long it waited.
        after: Duration,
    },
    /// Waiting for the source's connections was called off.
    #[error("stopped waiting for connections on {local}")]
    AcceptCancelled {
        /// The listening address.
        local: SocketAddr,
    },
    /// A second connection of the same kind arrived.
    #[error("a second {conn:?} connection arrived from {peer}")]
    Duplicate {
        /// The kind.
        conn: ConnKind,
        /// The peer.
        peer: SocketAddr,
    },
    /// The transport could not be set up.
    #[error("transport setup")]
    Send(#[from] SendError),
    /// The receive side could not be set up.
    #[error("transport setup")]
    Recv(#[from] RecvError<std::convert::Infallible>),
}

fn tcp_err(conn: ConnKind, peer: SocketAddr) -> impl FnOnce(io::Error) -> ConnectError {
    move |source| ConnectError::Tcp { conn, peer, source }
}

/// Source side: connects `bulk` then `fault` to `dst`.
pub fn connect(
    dst: SocketAddr,
    migration_id: MigrationId,
    geometry: Geometry,
    key: &PskKey,
    cfg: &LinkConfig,
) -> Result<ConnectionPair, ConnectError> {
    let open = |conn: ConnKind| -> Result<Connection, ConnectError> {
        let mut sock =
            TcpStream::connect_timeout(&dst, cfg.handshake_timeout).map_err(tcp_err(conn, dst))?;
        set_timeouts(&sock, Some(cfg.handshake_timeout)).map_err(tcp_err(conn, dst))?;
        let params = ClientParams {
            conn,
            migration_id,
            geometry,
        };
        let session = client_handshake(&mut sock, &params, key).map_err(|source| {
            ConnectError::Handshake {
                conn,
                peer: dst,
                source,
            }
        })?;
        finish(sock, session, dst, cfg)
    };
    let bulk = open(ConnKind::Bulk)?;
    let fault = open(ConnKind::Fault)?;
    Ok(ConnectionPair { bulk, fault })
}

/// Destination side: accepts the two connections of one migration on
/// `listener`, in either order, within `cfg.accept_timeout` (see
/// [`accept_until`]).
pub fn accept(
    listener: &TcpListener,
    policy: &ServerPolicy,
    key: &PskKey,
    cfg: &LinkConfig,
) -> Result<ConnectionPair, ConnectError> {
    let deadline = Instant::now() + cfg.accept_timeout;
    accept_until(listener, policy, key, cfg, deadline, &|| false)
}

/// How often [`accept_until`] looks at its deadline and its cancel check.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// Destination side: accepts the two connections of one migration on
/// `listener`, in either order. `policy` may pin the migration id and
/// geometry; the second connection must match the first either way. A
/// connection that fails its handshake is dropped and reported: nothing it
/// sent has been accepted.
///
/// Gives up with [`ConnectError::AcceptTimeout`] at `deadline`, or with
/// [`ConnectError::AcceptCancelled`] as soon as `cancelled` returns true
/// (looked at every few milliseconds while no connection is pending): the
/// listener is polled, never blocked on. It is left in blocking mode.
pub fn accept_until(
    listener: &TcpListener,
    policy: &ServerPolicy,
    key: &PskKey,
    cfg: &LinkConfig,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<ConnectionPair, ConnectError> {
    let local = listener
        .local_addr()
        .map_err(tcp_err(ConnKind::Bulk, unspecified()))?;
    listener
        .set_nonblocking(true)
        .map_err(tcp_err(ConnKind::Bulk, local))?;
    let started = Instant::now();
    let result = accept_pair(listener, local, policy, key, cfg, &mut || {
        if cancelled() {
            return Err(ConnectError::AcceptCancelled { local });
        }
        if Instant::now() >= deadline {
            return Err(ConnectError::AcceptTimeout {
                local,
                after: deadline.saturating_duration_since(started),
            });
        }
        Ok(())
    });
    let restored = listener
        .set_nonblocking(false)
        .map_err(tcp_err(ConnKind::Bulk, local));
    let pair = result?;
    restored?;
    Ok(pair)
}

fn accept_pair(
    listener: &TcpListener,
    local: SocketAddr,
    policy: &ServerPolicy,
    key: &PskKey,
    cfg: &LinkConfig,
    go_on: &mut dyn FnMut() -> Result<(), ConnectError>,
) -> Result<ConnectionPair, ConnectError> {
    let mut policy = *policy;
    let mut bulk = None;
    let mut fault = None;
    while bulk.is_none() || fault.is_none() {
        let (mut sock, peer) = match listener.accept() {
            Ok(pair) => pair,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                go_on()?;
                wait_for_connection(listener, ACCEPT_POLL)
                    .map_err(tcp_err(ConnKind::Bulk, local))?;
                continue;
            }
            Err(e) => return Err(tcp_err(ConnKind::Bulk, local)(e)),
        };
        // Accepted sockets do not inherit O_NONBLOCK on Linux; be explicit.
        sock.set_nonblocking(false)
            .map_err(tcp_err(ConnKind::Bulk, peer))?;
        set_timeouts(&sock, Some(cfg.handshake_timeout)).map_err(tcp_err(ConnKind::Bulk, peer))?;
        let want = match (&bulk, &fault) {
            (None, None) => None,
            (Some(_), None) => Some(ConnKind::Fault),
            _ => Some(ConnKind::Bulk),
        };
        let this_policy = ServerPolicy {
            accept_conn: want,
            ..policy
        };
        let session = server_handshake(&mut sock, &this_policy, key).map_err(|source| {
            ConnectError::Handshake {
                conn: want.unwrap_or(ConnKind::Bulk),
                peer,
                source,
            }
        })?;
        // The second connection must belong to the same migration.
        policy.expect_migration_id = Some(session.migration_id);
        policy.expect_geometry = Some(session.geometry);
        let slot = match session.conn {
            ConnKind::Bulk => &mut bulk,
            ConnKind::Fault => &mut fault,
        };
        if slot.is_some() {
            return Err(ConnectError::Duplicate {
                conn: session.conn,
                peer,
            });
        }
        *slot = Some(finish(sock, session, peer, cfg)?);
    }
    Ok(ConnectionPair {
        bulk: bulk.expect("loop ends with both"),
        fault: fault.expect("loop ends with both"),
    })
}

/// Source side when the destination dials (a Xen migration: the hand-off
/// record in the toolstack's stream names this listener): accepts on
/// `listener` until one connection completed the handshake as `bulk`, then
/// one as `fault`. The source is still the handshake's client; a connection
/// that fails it (a stray peer, a wrong key) is dropped and the wait goes on,
/// so it cannot end the migration. Gives up at `deadline` with
/// [`ConnectError::AcceptTimeout`] (naming the last refused handshake, if
/// any, in `refused`).
pub fn accept_destination(
    listener: &TcpListener,
    migration_id: MigrationId,
    geometry: Geometry,
    key: &PskKey,
    cfg: &LinkConfig,
    deadline: Instant,
    refused: &mut Vec<ConnectError>,
) -> Result<ConnectionPair, ConnectError> {
    let local = listener
        .local_addr()
        .map_err(tcp_err(ConnKind::Bulk, unspecified()))?;
    listener
        .set_nonblocking(true)
        .map_err(tcp_err(ConnKind::Bulk, local))?;
    let started = Instant::now();
    let mut bulk: Option<Connection> = None;
    let result = loop {
        let conn = if bulk.is_none() {
            ConnKind::Bulk
        } else {
            ConnKind::Fault
        };
        // The deadline holds however many strays keep connecting.
        if Instant::now() >= deadline {
            break Err(ConnectError::AcceptTimeout {
                local,
                after: deadline.saturating_duration_since(started),
            });
        }
        let (mut sock, peer) = match listener.accept() {
            Ok(pair) => pair,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                if let Err(e) = wait_for_connection(listener, ACCEPT_POLL) {
                    break Err(tcp_err(conn, local)(e));
                }
                continue;
            }
            Err(e) => break Err(tcp_err(conn, local)(e)),
        };
        let opened = (|| {
            sock.set_nonblocking(false).map_err(tcp_err(conn, peer))?;
            set_timeouts(&sock, Some(cfg.handshake_timeout)).map_err(tcp_err(conn, peer))?;
            let params = ClientParams {
                conn,
                migration_id,
                geometry,
            };
            let session = client_handshake(&mut sock, &params, key)
                .map_err(|source| ConnectError::Handshake { conn, peer, source })?;
            finish(sock, session, peer, cfg)
        })();
        match opened {
            Ok(c) if conn == ConnKind::Bulk => bulk = Some(c),
            Ok(fault) => {
                break Ok(ConnectionPair {
                    bulk: bulk.take().expect("bulk before fault"),
                    fault,
                });
            }
            // Not our destination: drop it, keep waiting.
            Err(e) => refused.push(e),
        }
    };
    let restored = listener
        .set_nonblocking(false)
        .map_err(tcp_err(ConnKind::Bulk, local));
    let pair = result?;
    restored?;
    Ok(pair)
}

/// Destination side when it dials the source ([`accept_destination`]):
/// connects `bulk` then `fault` to `src` and runs the handshake's server side
/// on each, insisting on `policy` (the migration id the hand-off named).
pub fn connect_to_source(
    src: SocketAddr,
    policy: &ServerPolicy,
    key: &PskKey,
    cfg: &LinkConfig,
) -> Result<ConnectionPair, ConnectError> {
    let mut policy = *policy;
    let mut open = |conn: ConnKind| -> Result<Connection, ConnectError> {
        let mut sock =
            TcpStream::connect_timeout(&src, cfg.handshake_timeout).map_err(tcp_err(conn, src))?;
        set_timeouts(&sock, Some(cfg.handshake_timeout)).map_err(tcp_err(conn, src))?;
        let this = ServerPolicy {
            accept_conn: Some(conn),
            ..policy
        };
        let session =
            server_handshake(&mut sock, &this, key).map_err(|source| ConnectError::Handshake {
                conn,
                peer: src,
                source,
            })?;
        policy.expect_migration_id = Some(session.migration_id);
        policy.expect_geometry = Some(session.geometry);
        finish(sock, session, src, cfg)
    };
    let bulk = open(ConnKind::Bulk)?;
    let fault = open(ConnKind::Fault)?;
    Ok(ConnectionPair { bulk, fault })
}

/// Waits up to `timeout` for a pending connection on `listener`.
fn wait_for_connection(listener: &TcpListener, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(listener),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that lives across the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn finish(
    sock: TcpStream,
    session: Session,
    peer: SocketAddr,
    cfg: &LinkConfig,
) -> Result<Connection, ConnectError> {
    let conn = session.conn;
    set_timeouts(&sock, None).map_err(tcp_err(conn, peer))?;
    let (role, send_cfg) = match conn {
        ConnKind::Bulk => (ConnRole::Bulk, cfg.bulk),
        ConnKind::Fault => (ConnRole::Fault, cfg.fault),
    };
    tcp::tune(&sock, role).map_err(tcp_err(conn, peer))?;
    let rx_sock = sock.try_clone().map_err(tcp_err(conn, peer))?;
    let tx = UnitSender::new(FrameSender::new(sock, send_cfg)?, cfg.compression);
    let rx = FrameReceiver::new(rx_sock, cfg.recv)?;
    Ok(Connection { session, tx, rx })
}

fn set_timeouts(sock: &TcpStream, t: Option<Duration>) -> io::Result<()> {
    sock.set_read_timeout(t)?;
    sock.set_write_timeout(t)
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Connects, retrying while the destination is not listening yet (e.g. it is
/// still starting), until `deadline`.
pub fn connect_with_retry(
    dst: SocketAddr,
    migration_id: MigrationId,
    geometry: Geometry,
    key: &PskKey,
    cfg: &LinkConfig,
    deadline: Instant,
) -> Result<ConnectionPair, ConnectError> {
    loop {
        match connect(dst, migration_id, geometry, key, cfg) {
            Err(ConnectError::Tcp { source, .. })
                if source.kind() == io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}
