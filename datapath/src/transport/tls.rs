//! Encryption and authentication of every byte after TCP connect: TLS 1.3
//! (rustls with its default `aws-lc-rs` provider), with the project's
//! pre-shared-key handshake run inside it and bound to it.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source (TLS client, PSK client)
//!     participant D as destination (TLS server, PSK server)
//!     S->>D: TCP connect (or D dials S: a Xen migration)
//!     S->>D: TLS 1.3 ClientHello (X25519MLKEM768 key share)
//!     D->>S: ServerHello, ephemeral self-signed certificate, Finished
//!     S->>D: Finished
//!     Note over S,D: both compute E = TLS-Exporter("EXPORTER-wanmig-psk-binding", 32)
//!     S->>D: Hello (inside TLS)
//!     D->>S: Challenge, server_proof = HMAC(K, "wanmig-v2 server" ‖ … ‖ E)
//!     S->>D: Auth, client_proof = HMAC(K, "wanmig-v2 client" ‖ … ‖ E)
//!     D->>S: Accept
//!     Note over S,D: frames in TLS records (AES-128-GCM with AES instructions, else ChaCha20-Poly1305)
//! ```
//!
//! **Who proves what.** The certificate proves nothing: each destination
//! engine makes a fresh self-signed one, and the source accepts any
//! certificate whose handshake signature verifies. Authentication is the
//! PSK handshake ([`crate::wire::handshake`]): both proofs cover the TLS
//! exporter value `E` of *this* TLS session (channel binding, as
//! `tls-exporter` binds SCRAM in RFC 9266). A machine in the middle runs
//! two TLS sessions with two different exporters, so without the key it
//! can produce neither proof; with the key it is a legitimate peer anyway.
//! This keeps key setup to one command (`wanmig keygen`, one key for both
//! ends) with no certificates to manage, and every construction is TLS
//! 1.3's own: no cipher of the project's making.
//!
//! **What the records give.** Each record is sealed with an AEAD under
//! per-direction keys and an implicit sequence number, so a modified,
//! injected, replayed, reordered or dropped record fails to open
//! (`bad_record_mac`); a stream cut inside a record, or ended without the
//! peer's `close_notify`, is a truncation ([`TlsError::Truncated`]). Either
//! poisons the receiver before a byte of the record reaches the frame
//! decoder, so nothing from it is installed.
//!
//! **How it sits in the transport.** One [`TlsChannel`] per connection,
//! shared by its sender and its receiver (two threads): the sender seals a
//! run of committed frames into TLS records in a buffer of its own and
//! hands that to io_uring (or `send(2)`); the receiver receives ciphertext
//! into a buffer of its own and opens it into the frame buffer. Resumption,
//! session tickets and 0-RTT are off; TLS 1.2 is not offered. The key
//! exchange prefers the hybrid X25519MLKEM768 (rustls's post-quantum
//! default): guest memory recorded off the WAN today stays secret even
//! against a future quantum computer, as long as either half holds. Kernel TLS
//! would move the record work into the kernel, but this machine kind's
//! kernel is built without `CONFIG_TLS`: the userspace path is the one that
//! runs ([`TlsChannel::cipher_in`]).

use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs as provider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, Connection, DigitallySignedStruct, ServerConfig,
    ServerConnection, SignatureScheme,
};
use serde::{Deserialize, Serialize};

/// The TLS exporter label whose value the PSK proofs cover.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-wanmig-psk-binding";
/// Length of the exporter value (the channel binding).
pub const BINDING_LEN: usize = 32;
/// The name the source asks for (and the certificate carries): it is not
/// checked, see the module docs.
const SERVER_NAME: &str = "wanmig-destination";

/// Whether a migration's connections are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encryption {
    /// TLS 1.3 with the PSK handshake bound to it (the default).
    #[default]
    Tls,
    /// No encryption after the PSK handshake: only for links already
    /// inside IPsec or WireGuard (`--plaintext`). Both ends must agree.
    Plaintext,
}

impl Encryption {
    /// The warning a plaintext migration prints (one line).
    pub const PLAINTEXT_WARNING: &'static str = "warning: --plaintext: guest memory and disks cross the link unencrypted and unauthenticated after the handshake (use only inside IPsec, WireGuard or a trusted network)";
}

/// Why TLS failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The TLS protocol failed: a bad record (modified, injected, replayed,
    /// reordered), a downgrade, a peer that does not speak TLS 1.3...
    #[error("TLS: {0}")]
    Protocol(#[source] rustls::Error),
    /// The socket failed during the TLS handshake (including its timeout).
    #[error("TLS handshake I/O")]
    Io(#[source] io::Error),
    /// The peer ended the stream inside a record or without `close_notify`.
    #[error("the TLS stream was cut (no close_notify): truncated")]
    Truncated,
    /// The local TLS configuration could not be built.
    #[error("TLS setup: {0}")]
    Setup(String),
}

impl TlsError {
    /// Sorts an error of rustls's `io::Read`/`io::Write` glue.
    fn from_io(e: io::Error) -> TlsError {
        if e.get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .is_some()
        {
            let inner = e.into_inner().expect("checked above");
            match inner.downcast::<rustls::Error>() {
                Ok(tls) => TlsError::Protocol(*tls),
                Err(other) => TlsError::Io(io::Error::other(other)),
            }
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            TlsError::Truncated
        } else {
            TlsError::Io(e)
        }
    }
}

fn provider_arc() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let mut p = provider::default_provider();
        // With AES instructions AES-128-GCM is the fastest AEAD (and 128-bit
        // keys are TLS 1.3's mandatory strength); without them, software
        // AES is several times slower than ChaCha20-Poly1305, which then
        // goes first (as BoringSSL and Go choose). Both ends offer and
        // follow the same order. A nested hypervisor under emulation (the
        // Xen lab's dom0) has no AES instructions.
        let aes = hardware_aes();
        p.cipher_suites.sort_by_key(|s| match (s.suite(), aes) {
            (rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, true) => 0,
            (rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256, false) => 0,
            (rustls::CipherSuite::TLS13_AES_128_GCM_SHA256, false) => 1,
            (rustls::CipherSuite::TLS13_AES_256_GCM_SHA384, _) => 2,
            _ => 3,
        });
        Arc::new(p)
    })
    .clone()
}

/// Whether this CPU seals AES-GCM in hardware (AES and carry-less
/// multiply instructions).
fn hardware_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The source's certificate check: any certificate, as long as the
/// handshake's signature over the transcript verifies under it (see the
/// module docs: the PSK proofs bound to the exporter authenticate).
#[derive(Debug)]
struct AnyCertificateBoundByPsk(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificateBoundByPsk {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOfferedOrEnabled,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Result<Arc<ClientConfig>, TlsError> {
    static C: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    C.get_or_init(|| {
        let p = provider_arc();
        let mut c = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificateBoundByPsk(p)))
            .with_no_client_auth();
        c.resumption = rustls::client::Resumption::disabled();
        c.enable_early_data = false;
        Ok(Arc::new(c))
    })
    .clone()
    .map_err(TlsError::Setup)
}

fn server_config() -> Result<Arc<ServerConfig>, TlsError> {
    static S: OnceLock<Result<Arc<ServerConfig>, String>> = OnceLock::new();
    S.get_or_init(|| {
        // A fresh key pair per process: it authenticates nothing (see the
        // module docs), so nothing needs to be kept or distributed.
        let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| format!("generating the ephemeral certificate: {e}"))?;
        let key = PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let mut s = ServerConfig::builder_with_provider(provider_arc())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .map_err(|e| e.to_string())?;
        s.send_tls13_tickets = 0;
        s.max_early_data_size = 0;
        Ok(Arc::new(s))
    })
    .clone()
    .map_err(TlsError::Setup)
}

/// The side of the TLS handshake (the PSK handshake's side: the source is
/// the client whoever dialled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRole {
    /// The source.
    Client,
    /// The destination.
    Server,
}

/// A TLS session during the PSK handshake: a blocking `Read + Write` over
/// the socket whose bytes are TLS records.
#[derive(Debug)]
pub struct TlsHandshake {
    conn: Connection,
}

impl TlsHandshake {
    /// Runs the TLS 1.3 handshake on `sock` (blocking; the caller's socket
    /// timeouts bound it).
    pub fn run(sock: &mut TcpStream, role: TlsRole) -> Result<TlsHandshake, TlsError> {
        let mut conn: Connection = match role {
            TlsRole::Client => {
                let name = ServerName::try_from(SERVER_NAME)
                    .map_err(|e| TlsError::Setup(e.to_string()))?;
                ClientConnection::new(client_config()?, name)
                    .map_err(TlsError::Protocol)?
                    .into()
            }
            TlsRole::Server => ServerConnection::new(server_config()?)
                .map_err(TlsError::Protocol)?
                .into(),
        };
        while conn.is_handshaking() {
            conn.complete_io(sock).map_err(TlsError::from_io)?;
        }
        // The client's Finished may still sit in the buffer.
        while conn.wants_write() {
            conn.write_tls(sock).map_err(TlsError::from_io)?;
        }
        Ok(TlsHandshake { conn })
    }

    /// The channel binding the PSK proofs cover.
    pub fn binding(&self) -> Result<[u8; BINDING_LEN], TlsError> {
        self.conn
            .export_keying_material([0u8; BINDING_LEN], EXPORTER_LABEL, None)
            .map_err(TlsError::Protocol)
    }

    /// A blocking stream of plaintext over `sock` (for the PSK handshake's
    /// frames).
    pub fn stream<'a>(&'a mut self, sock: &'a mut TcpStream) -> HandshakeStream<'a> {
        HandshakeStream {
            conn: &mut self.conn,
            sock,
        }
    }

    /// The session, ready to carry frames (any bytes already read past the
    /// handshake stay in it, for the receiver).
    pub fn into_channel(self) -> TlsChannel {
        let suite = self
            .conn
            .negotiated_cipher_suite()
            .map_or_else(|| "unknown".to_string(), |s| format!("{:?}", s.suite()));
        TlsChannel {
            conn: Mutex::new(self.conn),
            suite,
        }
    }
}

/// [`TlsHandshake::stream`].
#[derive(Debug)]
pub struct HandshakeStream<'a> {
    conn: &'a mut Connection,
    sock: &'a mut TcpStream,
}

impl io::Read for HandshakeStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.conn.read_tls(self.sock)? == 0 {
                // End of stream: the reader now says how (close_notify or cut).
                self.conn.process_new_packets().map_err(io::Error::other)?;
                return self.conn.reader().read(buf);
            }
            self.conn.process_new_packets().map_err(io::Error::other)?;
        }
    }
}

impl io::Write for HandshakeStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(self.sock)?;
        }
        Ok(())
    }
}

/// What [`TlsChannel::open`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opened {
    /// This many plaintext bytes.
    Plain(usize),
    /// Nothing until more ciphertext arrives.
    NeedCipher,
    /// The peer closed the stream with `close_notify`.
    Closed,
}

/// One connection's TLS session after the handshakes, shared by its sender
/// and receiver.
#[derive(Debug)]
pub struct TlsChannel {
    conn: Mutex<Connection>,
    suite: String,
}

impl TlsChannel {
    /// The negotiated cipher suite (`TLS13_AES_128_GCM_SHA256`...).
    pub fn cipher(&self) -> &str {
        &self.suite
    }

    /// Where records are sealed and opened: `userspace` (kernel TLS is not
    /// used; see the module docs).
    pub fn cipher_in(&self) -> &'static str {
        "userspace"
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while sealing or opening leaves the session unusable;
        // the next record then fails, which poisons that side.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seals `plain` into records and copies as much ciphertext as fits
    /// (records queued earlier first) into `out`; returns the bytes
    /// written. What does not fit stays queued for [`Self::drain`].
    pub(crate) fn seal(&self, plain: &[u8], out: &mut [u8]) -> Result<usize, TlsError> {
        let mut c = self.lock();
        // No limit on what may be queued: the caller bounds `plain`.
        c.set_buffer_limit(None);
        io::Write::write_all(&mut c.writer(), plain).map_err(TlsError::from_io)?;
        Self::emit(&mut c, out)
    }

    /// Copies queued ciphertext (an alert, a key update, what did not fit
    /// last time) into `out`; returns the bytes written.
    pub(crate) fn drain(&self, out: &mut [u8]) -> Result<usize, TlsError> {
        Self::emit(&mut self.lock(), out)
    }

    /// Whether ciphertext is queued.
    pub(crate) fn wants_write(&self) -> bool {
        self.lock().wants_write()
    }

    fn emit(c: &mut Connection, out: &mut [u8]) -> Result<usize, TlsError> {
        let mut w: &mut [u8] = out;
        let room = w.len();
        while c.wants_write() && !w.is_empty() {
            if c.write_tls(&mut w).map_err(TlsError::from_io)? == 0 {
                break;
            }
        }
        Ok(room - w.len())
    }

    /// Queues `close_notify`: the end of what this side sends.
    pub(crate) fn close(&self) {
        self.lock().send_close_notify();
    }

    /// Opens ciphertext into `out`: first plaintext already opened, then
    /// records from `cipher` (advanced past what rustls took). `eof`: the
    /// socket reached end of stream and `cipher` holds all that is left.
    pub(crate) fn open(
        &self,
        cipher: &mut &[u8],
        eof: bool,
        out: &mut [u8],
    ) -> Result<Opened, TlsError> {
        let mut c = self.lock();
        loop {
            match c.reader().read(out) {
                Ok(0) if !out.is_empty() => return Ok(Opened::Closed),
                Ok(n) => return Ok(Opened::Plain(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(TlsError::Truncated);
                }
                Err(e) => return Err(TlsError::from_io(e)),
            }
            if cipher.is_empty() {
                if !eof {
                    return Ok(Opened::NeedCipher);
                }
                // Tell rustls the stream ended; the reader then says
                // whether it ended cleanly.
                c.read_tls(&mut io::empty()).map_err(TlsError::from_io)?;
                c.process_new_packets().map_err(TlsError::Protocol)?;
                return match c.reader().read(out) {
                    Ok(0) => Ok(Opened::Closed),
                    Ok(n) => Ok(Opened::Plain(n)),
                    Err(_) => Err(TlsError::Truncated),
                };
            }
            c.read_tls(cipher).map_err(TlsError::from_io)?;
            c.process_new_packets().map_err(TlsError::Protocol)?;
        }
    }

    /// Whether plaintext is ready to read without more ciphertext.
    pub(crate) fn has_plaintext(&self) -> bool {
        !self.lock().wants_read()
    }
}

/// How a connection's bytes travel: for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoPath {
    /// `io_uring` or `blocking`.
    pub backend: String,
    /// Why `--io auto` fell back to blocking calls (`null`: it did not).
    pub fallback: Option<String>,
    /// Whether any bytes went from guest memory to the socket without a
    /// userspace copy (not yet: every unit is copied into a send buffer).
    pub zero_copy: bool,
    /// The TLS cipher suite, or `none` (`--plaintext`).
    pub cipher: String,
    /// Where records are sealed and opened: `userspace`, `kernel`, or
    /// `none`.
    pub cipher_in: String,
}

/// Shared handle, for the sender and the receiver.
pub type SharedTls = Arc<TlsChannel>;
