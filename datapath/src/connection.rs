//! Opening a migration's two connections: TCP, socket tuning, TLS 1.3 (unless
//! [`Encryption::Plaintext`]), the authenticated handshake bound to it, then
//! the io_uring sender and receiver (sealing and opening TLS records).
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
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::tls::{
    Encryption, HandshakeStream, IoPath, SharedTls, TlsError, TlsHandshake, TlsRole,
};
use crate::transport::{
    ConnRole, FrameReceiver, FrameSender, IoPreference, RecvConfig, RecvError, SendConfig,
    SendError, tcp,
};
use crate::unit_stream::UnitSender;
use crate::wire::{
    Binding, ClientParams, Compression, ConnKind, Geometry, HANDSHAKE_TIMEOUT, HandshakeError,
    MigrationId, PskKey, ServerPolicy, Session, client_handshake, client_handshake_bound,
    server_handshake, server_handshake_bound,
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

impl Connection {
    /// How this connection's bytes travel (for reports).
    pub fn io_path(&self) -> IoPath {
        let tx = self.tx.frame_sender();
        IoPath {
            backend: tx.backend().to_string(),
            fallback: tx.fallback_reason().map(str::to_string),
            zero_copy: false,
            cipher: tx
                .tls()
                .map_or_else(|| "none".to_string(), |t| t.cipher().to_string()),
            cipher_in: tx.tls().map_or("none", |t| t.cipher_in()).to_string(),
        }
    }
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
    /// TLS 1.3 (the default) or plaintext; both ends must agree.
    pub encryption: Encryption,
    /// Congestion control of both connections (`None`: the host's default).
    pub congestion: Option<tcp::Congestion>,
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
            encryption: Encryption::Tls,
            congestion: None,
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
    /// TLS failed: a peer that does not speak TLS 1.3 (a plaintext engine,
    /// a stray client), a downgrade, a bad record during the handshake.
    #[error("{conn:?} connection with {peer}: TLS")]
    Tls {
        /// Which connection (as far as we know).
        conn: ConnKind,
        /// The peer address.
        peer: SocketAddr,
        /// The error.
        #[source]
        source: TlsError,
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
    #[error("no migration connected to {local} within {after:?}{}", refused_note(*.refused, .last_refused))]
    AcceptTimeout {
        /// The listening address.
        local: SocketAddr,
        /// How long it waited.
        after: Duration,
        /// Connections refused meanwhile (failed TLS or the handshake).
        refused: u64,
        /// Why the last of them was refused.
        last_refused: Option<String>,
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

fn refused_note(refused: u64, last: &Option<String>) -> String {
    match last {
        Some(why) if refused > 0 => format!(" ({refused} connection(s) refused, the last: {why})"),
        _ => String::new(),
    }
}

/// Says on stderr that a connection was refused: one line each for the
/// first few, then one in a hundred (a flood costs no more than that).
fn log_refusal(count: u64, e: &ConnectError) {
    if count <= 10 || count % 100 == 0 {
        eprintln!(
            "wanmig: refused connection #{count}: {}",
            crate::error_chain(e)
        );
    }
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
        let (session, tls) = client_side(&mut sock, &params, key, cfg, dst)?;
        finish(sock, session, dst, cfg, tls)
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
/// connection that fails TLS or the handshake (a port scan, a stray client,
/// a plaintext peer, the wrong key, another migration's second connection)
/// is dropped with one line on stderr (rate-limited) and the wait goes on:
/// nothing it sent has been accepted, and it cannot end the migration.
///
/// Gives up with [`ConnectError::AcceptTimeout`] at `deadline` (saying how
/// many were refused and why the last was), or with
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
    let result = accept_pair(listener, local, policy, key, cfg, &mut |refused| {
        if cancelled() {
            return Err(ConnectError::AcceptCancelled { local });
        }
        if Instant::now() >= deadline {
            return Err(ConnectError::AcceptTimeout {
                local,
                after: deadline.saturating_duration_since(started),
                refused: refused.0,
                last_refused: refused.1.clone(),
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

/// Connections refused so far, and why the last was.
type Refused = (u64, Option<String>);

fn accept_pair(
    listener: &TcpListener,
    local: SocketAddr,
    policy: &ServerPolicy,
    key: &PskKey,
    cfg: &LinkConfig,
    go_on: &mut dyn FnMut(&Refused) -> Result<(), ConnectError>,
) -> Result<ConnectionPair, ConnectError> {
    let mut policy = *policy;
    let mut bulk = None;
    let mut fault = None;
    let mut refused: Refused = (0, None);
    while bulk.is_none() || fault.is_none() {
        // The deadline holds however many strays keep connecting.
        go_on(&refused)?;
        let (mut sock, peer) = match listener.accept() {
            Ok(pair) => pair,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
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
        let (session, tls) = match server_side(
            &mut sock,
            &this_policy,
            key,
            cfg,
            want.unwrap_or(ConnKind::Bulk),
            peer,
        ) {
            Ok(s) => s,
            Err(e) => {
                // Not the source (a scan, a stray, the wrong key, a
                // plaintext peer): nothing it sent was accepted. Keep
                // waiting for the one that proves the key.
                refused.0 += 1;
                log_refusal(refused.0, &e);
                refused.1 = Some(crate::error_chain(&e));
                continue;
            }
        };
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
        *slot = Some(finish(sock, session, peer, cfg, tls)?);
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
                refused: refused.len() as u64,
                last_refused: refused.last().map(|e| crate::error_chain(e)),
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
            let (session, tls) = client_side(&mut sock, &params, key, cfg, peer)?;
            finish(sock, session, peer, cfg, tls)
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
        let (session, tls) = server_side(&mut sock, &this, key, cfg, conn, src)?;
        policy.expect_migration_id = Some(session.migration_id);
        policy.expect_geometry = Some(session.geometry);
        finish(sock, session, src, cfg, tls)
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

/// Bounds a whole handshake (TLS and the PSK proofs) to a limit. The
/// socket's timeouts bound each read and write, but a peer that trickles a
/// byte now and then would hold the handshake (and a destination's accept
/// loop) for as long as it likes: at the limit the socket is shut down,
/// which fails whatever the handshake is doing.
struct HandshakeDeadline {
    done: Option<std::sync::mpsc::Sender<()>>,
    watch: Option<std::thread::JoinHandle<()>>,
}

impl HandshakeDeadline {
    fn arm(sock: &TcpStream, limit: Duration) -> io::Result<Self> {
        let target = sock.try_clone()?;
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watch = std::thread::Builder::new()
            .name("handshake-deadline".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                    let _ = target.shutdown(std::net::Shutdown::Both);
                }
            })?;
        Ok(HandshakeDeadline {
            done: Some(done),
            watch: Some(watch),
        })
    }
}

impl Drop for HandshakeDeadline {
    fn drop(&mut self) {
        // Disconnecting ends the watch without touching the socket.
        drop(self.done.take());
        if let Some(w) = self.watch.take() {
            let _ = w.join();
        }
    }
}

/// The handshakes' client side (the source's, whoever dialled) on `sock`:
/// TLS 1.3 unless plaintext, then the PSK proofs, bound to the TLS session;
/// all within `cfg.handshake_timeout`.
fn client_side(
    sock: &mut TcpStream,
    params: &ClientParams,
    key: &PskKey,
    cfg: &LinkConfig,
    peer: SocketAddr,
) -> Result<(Session, Option<SharedTls>), ConnectError> {
    secured(
        sock,
        TlsRole::Client,
        cfg,
        params.conn,
        peer,
        |s| client_handshake(s, params, key),
        |s, binding| client_handshake_bound(s, params, key, binding),
    )
}

/// The handshakes' server side (the destination's) on `sock`, within
/// `cfg.handshake_timeout`; `conn` names the connection in errors until the
/// client said which it is.
fn server_side(
    sock: &mut TcpStream,
    policy: &ServerPolicy,
    key: &PskKey,
    cfg: &LinkConfig,
    conn: ConnKind,
    peer: SocketAddr,
) -> Result<(Session, Option<SharedTls>), ConnectError> {
    secured(
        sock,
        TlsRole::Server,
        cfg,
        conn,
        peer,
        |s| server_handshake(s, policy, key),
        |s, binding| server_handshake_bound(s, policy, key, binding),
    )
}

/// One side's handshakes on `sock` within `cfg.handshake_timeout`: `plain`
/// on the socket itself (plaintext), or TLS 1.3 in `role` and then `bound`
/// inside it, given the session's exporter.
fn secured(
    sock: &mut TcpStream,
    role: TlsRole,
    cfg: &LinkConfig,
    conn: ConnKind,
    peer: SocketAddr,
    plain: impl FnOnce(&mut TcpStream) -> Result<Session, HandshakeError>,
    bound: impl FnOnce(HandshakeStream<'_>, &Binding) -> Result<Session, HandshakeError>,
) -> Result<(Session, Option<SharedTls>), ConnectError> {
    let _deadline =
        HandshakeDeadline::arm(sock, cfg.handshake_timeout).map_err(tcp_err(conn, peer))?;
    let psk = |source| ConnectError::Handshake { conn, peer, source };
    let tls_err = |source| ConnectError::Tls { conn, peer, source };
    match cfg.encryption {
        Encryption::Plaintext => Ok((plain(sock).map_err(psk)?, None)),
        Encryption::Tls => {
            let mut tls = TlsHandshake::run(sock, role).map_err(tls_err)?;
            let binding = tls.binding().map_err(tls_err)?;
            let session = bound(tls.stream(sock), &binding).map_err(psk)?;
            Ok((session, Some(Arc::new(tls.into_channel()))))
        }
    }
}

fn finish(
    sock: TcpStream,
    session: Session,
    peer: SocketAddr,
    cfg: &LinkConfig,
    tls: Option<SharedTls>,
) -> Result<Connection, ConnectError> {
    let conn = session.conn;
    set_timeouts(&sock, None).map_err(tcp_err(conn, peer))?;
    let (role, send_cfg) = match conn {
        ConnKind::Bulk => (ConnRole::Bulk, cfg.bulk),
        ConnKind::Fault => (ConnRole::Fault, cfg.fault),
    };
    tcp::tune(&sock, role).map_err(tcp_err(conn, peer))?;
    if let Some(cc) = cfg.congestion {
        tcp::set_congestion(sock.as_fd(), cc).map_err(tcp_err(conn, peer))?;
    }
    let rx_sock = sock.try_clone().map_err(tcp_err(conn, peer))?;
    let mut sender = FrameSender::new(sock, send_cfg)?;
    if let Some(why) = sender.fallback_reason() {
        // Once per process: every connection falls back for the same reason.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| eprintln!("wanmig: io_uring unusable ({why}): blocking calls instead"));
    }
    let mut rx = FrameReceiver::new(rx_sock, cfg.recv)?;
    if let Some(t) = tls {
        sender = sender.with_tls(t.clone());
        rx = rx.with_tls(t);
    }
    let tx = UnitSender::new(sender, cfg.compression);
    Ok(Connection { session, tx, rx })
}

fn set_timeouts(sock: &TcpStream, t: Option<Duration>) -> io::Result<()> {
    sock.set_read_timeout(t)?;
    sock.set_write_timeout(t)
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Whether a failed connection is worth trying again: the destination was
/// not listening yet, or its accept loop was busy with another peer (our
/// handshake timed out waiting for it). A refusal of our key, a TLS
/// protocol error, or a peer that hung up (one that does not speak TLS) is
/// not.
fn worth_retrying(e: &ConnectError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
            );
        }
        cause = c.source();
    }
    false
}

/// Connects, retrying until `deadline` while the destination is not
/// listening yet (e.g. it is still starting) or is busy with another peer
/// (see [`worth_retrying`]).
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
            Err(e) if worth_retrying(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}
