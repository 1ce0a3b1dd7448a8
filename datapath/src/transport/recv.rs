//! The receiving half of a connection: bytes arrive in one page-aligned
//! buffer, complete frames are decoded in place and handed to a callback.
//!
//! One receive request is in flight at a time (a byte stream must not be
//! reordered) and it is always waited for before the buffer is touched, so
//! the kernel never writes where a decoded frame is being read. A partial
//! frame at the end of the buffer is moved to the front before the next
//! receive. The decoder checks each header as soon as it arrives, so a peer
//! announcing a huge payload is refused before anything is buffered for it.
//!
//! [`FrameReceiver::run_with`] adds a deadline (the receiver waits for
//! readability with `poll(2)` before it issues a receive, so nothing is in
//! flight when it gives up and it stays usable) and a [`FrameHandler`] that
//! is also told whenever every complete frame in the buffer has been
//! delivered, before the receiver waits for more bytes (a consumer batching
//! work flushes there).
//!
//! With TLS ([`super::tls`]) the kernel fills a ciphertext buffer of the
//! receiver's own and records are opened from it into the frame buffer; a
//! record that fails to open (modified, injected, replayed, reordered) or a
//! stream cut without `close_notify` poisons the receiver with
//! [`RecvError::Tls`] before any byte of it reaches the decoder.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{IoUring, opcode, types};

use super::buf::IoBuf;
use super::probe::{IoBackend, IoPreference, ProbeError, select_backend};
use super::tls::{Opened, SharedTls, TlsError};
use crate::wire::{DecodeError, Decoded, FrameDecoder, FrameRef};

/// The ciphertext buffer of a TLS receiver.
const CIPHER_BUFFER: usize = 512 << 10;

/// Tuning of a [`FrameReceiver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvConfig {
    /// Initial buffer size; it grows to the largest frame the decoder allows.
    pub buffer_size: usize,
    /// I/O backend preference.
    pub io: IoPreference,
}

impl Default for RecvConfig {
    fn default() -> Self {
        RecvConfig {
            buffer_size: 2 << 20,
            io: IoPreference::Auto,
        }
    }
}

/// What the frame callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Deliver the next frame.
    Continue,
    /// Return from [`FrameReceiver::run`]; later frames stay buffered.
    Stop,
}

/// What [`FrameReceiver::run_with`] hands frames to.
pub trait FrameHandler<E> {
    /// One frame (borrowed from the receive buffer).
    fn on_frame(&mut self, frame: FrameRef<'_>) -> Result<Flow, E>;
    /// Every complete frame in the buffer has been delivered; the receiver is
    /// about to wait for more bytes (a consumer batching work flushes here).
    fn on_drained(&mut self) -> Result<(), E> {
        Ok(())
    }
}

/// A pair of closures: frames, and drained buffers.
impl<E, F, D> FrameHandler<E> for (F, D)
where
    F: FnMut(FrameRef<'_>) -> Result<Flow, E>,
    D: FnMut() -> Result<(), E>,
{
    fn on_frame(&mut self, frame: FrameRef<'_>) -> Result<Flow, E> {
        (self.0)(frame)
    }
    fn on_drained(&mut self) -> Result<(), E> {
        (self.1)()
    }
}

/// How [`FrameReceiver::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvEnd {
    /// The callback returned [`Flow::Stop`].
    Stopped,
    /// The peer closed the connection at a frame boundary.
    Closed,
}

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError<E> {
    /// The peer sent bytes that are not a valid frame.
    #[error("bad frame at stream offset {offset}")]
    Decode {
        /// Offset of the frame in the byte stream.
        offset: u64,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// The connection ended inside a frame.
    #[error(
        "the peer closed the connection inside a frame at stream offset {offset} ({buffered} bytes of it received)"
    )]
    Truncated {
        /// Offset of the incomplete frame.
        offset: u64,
        /// Bytes of it that arrived.
        buffered: usize,
    },
    /// The socket failed.
    #[error("receive failed after {received} bytes")]
    Io {
        /// Bytes received before the failure.
        received: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The frame callback failed.
    #[error("frame handler failed: {0}")]
    Handler(E),
    /// io_uring is unusable and was required.
    #[error(transparent)]
    Backend(#[from] ProbeError),
    /// The ring could not be created or entered.
    #[error("io_uring: {0}")]
    Ring(#[source] io::Error),
    /// An earlier error left the stream in an unknown state.
    #[error("the receiver failed earlier and cannot continue")]
    Poisoned,
    /// Nothing arrived before the deadline of [`FrameReceiver::run_with`].
    /// The receiver is still usable: a partial frame stays buffered.
    #[error("no frame arrived before the deadline")]
    TimedOut,
    /// A TLS record failed to open, or the TLS stream was cut: nothing of
    /// it was delivered.
    #[error("TLS record refused after plaintext stream offset {offset}")]
    Tls {
        /// Plaintext stream offset of the first undelivered byte.
        offset: u64,
        /// What was wrong.
        #[source]
        source: TlsError,
    },
}

/// What a receiver has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecvStats {
    /// Frames delivered.
    pub frames: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Receive requests completed.
    pub recvs: u64,
    /// Time spent opening TLS records, ns.
    pub open_ns: u64,
    /// Time spent in the frame handler (decoding and installing what the
    /// frames carry), ns.
    pub handle_ns: u64,
}

enum Engine {
    Uring { ring: Box<IoUring>, in_flight: bool },
    Blocking,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::Uring { in_flight, .. } => f
                .debug_struct("Uring")
                .field("in_flight", in_flight)
                .finish(),
            Engine::Blocking => f.write_str("Blocking"),
        }
    }
}

const RECV_TAG: u64 = 1;
const CANCEL_TAG: u64 = 2;

/// Receives frames from one TCP connection.
#[derive(Debug)]
pub struct FrameReceiver {
    sock: TcpStream,
    engine: Engine,
    buf: IoBuf,
    /// Start of undelivered bytes.
    start: usize,
    /// End of received bytes.
    end: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    stats: RecvStats,
    poisoned: bool,
    /// TLS: ciphertext received and not yet opened (`None`: plaintext).
    tls: Option<Opening>,
}

/// Ciphertext waiting to be opened.
#[derive(Debug)]
struct Opening {
    chan: SharedTls,
    mem: IoBuf,
    start: usize,
    end: usize,
    /// The socket reached end of stream.
    eof: bool,
}

impl FrameReceiver {
    /// Wraps a connected socket.
    pub fn new(
        sock: TcpStream,
        cfg: RecvConfig,
    ) -> Result<Self, RecvError<std::convert::Infallible>> {
        let choice = select_backend(cfg.io)?;
        let engine = match choice.backend {
            IoBackend::Uring => Engine::Uring {
                ring: Box::new(IoUring::new(4).map_err(RecvError::Ring)?),
                in_flight: false,
            },
            IoBackend::Blocking => Engine::Blocking,
        };
        Ok(FrameReceiver {
            sock,
            engine,
            buf: IoBuf::new(cfg.buffer_size.max(64 << 10)),
            start: 0,
            end: 0,
            offset: 0,
            stats: RecvStats::default(),
            poisoned: false,
            tls: None,
        })
    }

    /// Opens everything this receiver receives from `chan`'s TLS records
    /// (bytes the TLS session already holds come first).
    pub fn with_tls(mut self, chan: SharedTls) -> Self {
        self.tls = Some(Opening {
            chan,
            mem: IoBuf::new(CIPHER_BUFFER),
            start: 0,
            end: 0,
            eof: false,
        });
        self
    }

    /// The backend in use.
    pub fn backend(&self) -> IoBackend {
        match self.engine {
            Engine::Uring { .. } => IoBackend::Uring,
            Engine::Blocking => IoBackend::Blocking,
        }
    }

    /// The socket.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Counters so far.
    pub fn stats(&self) -> RecvStats {
        self.stats
    }

    /// Delivers frames to `on_frame` until it returns [`Flow::Stop`] or the
    /// peer closes the connection.
    pub fn run<E>(
        &mut self,
        decoder: &FrameDecoder,
        on_frame: impl FnMut(FrameRef<'_>) -> Result<Flow, E>,
    ) -> Result<RecvEnd, RecvError<E>> {
        self.run_with(decoder, None, &mut (on_frame, || Ok(())))
    }

    /// Like [`run`](Self::run), with a [`FrameHandler`] that also hears when
    /// the buffer is drained, and:
    /// with a `deadline`, returns [`RecvError::TimedOut`] when it has to
    /// wait for bytes and none arrive before it (looked at only when no
    /// complete frame is buffered).
    pub fn run_with<E>(
        &mut self,
        decoder: &FrameDecoder,
        deadline: Option<Instant>,
        handler: &mut impl FrameHandler<E>,
    ) -> Result<RecvEnd, RecvError<E>> {
        if self.poisoned {
            return Err(RecvError::Poisoned);
        }
        loop {
            // Deliver every complete frame in the buffer.
            let need = loop {
                let window = self.buf.slice(self.start, self.end);
                match decoder.decode(window) {
                    Ok(Decoded::Frame { frame, consumed }) => {
                        self.start += consumed;
                        self.offset += consumed as u64;
                        self.stats.frames += 1;
                        let t0 = Instant::now();
                        let flow = handler.on_frame(frame);
                        self.stats.handle_ns += t0.elapsed().as_nanos() as u64;
                        match flow {
                            Ok(Flow::Continue) => {}
                            Ok(Flow::Stop) => return Ok(RecvEnd::Stopped),
                            Err(e) => {
                                self.poisoned = true;
                                return Err(RecvError::Handler(e));
                            }
                        }
                    }
                    Ok(Decoded::NeedMore { at_least }) => break at_least,
                    Err(source) => {
                        self.poisoned = true;
                        return Err(RecvError::Decode {
                            offset: self.offset,
                            source,
                        });
                    }
                }
            };
            if let Err(e) = handler.on_drained() {
                self.poisoned = true;
                return Err(RecvError::Handler(e));
            }
            // Wait (within the deadline) and receive until bytes of the
            // stream arrive: with TLS a receive may bring only part of a
            // record, and the deadline holds for the rest of it too.
            let n = loop {
                if let Some(deadline) = deadline {
                    if !self.wait_readable(deadline)? {
                        return Err(RecvError::TimedOut);
                    }
                }
                self.make_room(need);
                if let Some(n) = self.receive()? {
                    break n;
                }
            };
            if n == 0 {
                return if self.start == self.end {
                    Ok(RecvEnd::Closed)
                } else {
                    self.poisoned = true;
                    Err(RecvError::Truncated {
                        offset: self.offset,
                        buffered: self.end - self.start,
                    })
                };
            }
        }
    }

    /// Waits until the socket is readable (or has an error or hang-up for the
    /// next receive to report); false once `deadline` passed without.
    fn wait_readable<E>(&mut self, deadline: Instant) -> Result<bool, RecvError<E>> {
        if let Some(t) = &self.tls {
            // Ciphertext or plaintext already here needs no socket.
            if t.start < t.end || t.eof || t.chan.has_plaintext() {
                return Ok(true);
            }
        }
        if matches!(
            self.engine,
            Engine::Uring {
                in_flight: true,
                ..
            }
        ) {
            // A receive is already waiting (never the case between calls).
            return Ok(true);
        }
        loop {
            // A passed deadline still gets one non-blocking look. Round up:
            // never spin on a sub-millisecond remainder.
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd that lives across the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.poisoned = true;
                return Err(RecvError::Io {
                    received: self.stats.bytes,
                    source: e,
                });
            }
            if rc > 0 {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// Makes sure `need` bytes (counted from `start`) fit: compacts, and grows
    /// the buffer when one frame is larger than it.
    fn make_room(&mut self, need: usize) {
        let buffered = self.end - self.start;
        let want = need.max(buffered + 1);
        if want > self.buf.capacity() {
            let mut bigger = IoBuf::new(want.next_power_of_two());
            bigger
                .slice_mut(0, buffered)
                .copy_from_slice(self.buf.slice(self.start, self.end));
            self.buf = bigger;
        } else if self.start > 0
            && (self.start == self.end || self.buf.capacity() - self.end < want - buffered)
        {
            self.buf.compact(self.start, self.end);
        } else {
            return;
        }
        self.start = 0;
        self.end = buffered;
    }

    /// Bytes into the free tail of the buffer from one receive (plaintext)
    /// or from what the TLS session already holds and at most one receive
    /// of ciphertext (TLS); `Some(0)` means end of stream, `None` that the
    /// ciphertext received so far opens no plaintext yet (part of a record).
    fn receive<E>(&mut self) -> Result<Option<usize>, RecvError<E>> {
        if self.tls.is_none() {
            let cap = self.buf.capacity();
            let ptr = self.buf.ptr_at(self.end);
            let len = (cap - self.end).min(u32::MAX as usize);
            let n = self.receive_raw(ptr, len)?;
            self.end += n;
            return Ok(Some(n));
        }
        let mut received = false;
        loop {
            let cap = self.buf.capacity();
            let t = self.tls.as_mut().expect("checked above");
            let mut cipher = t.mem.slice(t.start, t.end);
            let before = cipher.len();
            let t0 = Instant::now();
            let opened = t
                .chan
                .open(&mut cipher, t.eof, self.buf.slice_mut(self.end, cap));
            self.stats.open_ns += t0.elapsed().as_nanos() as u64;
            t.start += before - cipher.len();
            match opened {
                Ok(Opened::Plain(n)) => {
                    self.end += n;
                    return Ok(Some(n));
                }
                Ok(Opened::Closed) => return Ok(Some(0)),
                Ok(Opened::NeedCipher) if received => return Ok(None),
                Ok(Opened::NeedCipher) => {}
                Err(source) => {
                    self.poisoned = true;
                    return Err(RecvError::Tls {
                        offset: self.offset + (self.end - self.start) as u64,
                        source,
                    });
                }
            }
            // Everything received was handed to the session: receive more.
            t.start = 0;
            t.end = 0;
            let ptr = t.mem.ptr_at(0);
            let len = t.mem.capacity().min(u32::MAX as usize);
            let n = self.receive_raw(ptr, len)?;
            let t = self.tls.as_mut().expect("checked above");
            t.end = n;
            t.eof = n == 0;
            received = true;
        }
    }

    /// One receive of at most `len` bytes at `ptr` (the free tail of the
    /// frame buffer, or the ciphertext buffer); 0 means end of stream.
    fn receive_raw<E>(&mut self, ptr: *mut u8, len: usize) -> Result<usize, RecvError<E>> {
        let fd = self.sock.as_raw_fd();
        loop {
            let res: i32 = match &mut self.engine {
                Engine::Uring { ring, in_flight } => {
                    if !*in_flight {
                        let sqe = opcode::Recv::new(types::Fd(fd), ptr, len as u32)
                            .build()
                            .user_data(RECV_TAG);
                        // SAFETY: `ptr..ptr+len` is the unused tail of the
                        // frame buffer or the emptied ciphertext buffer; no
                        // Rust reference to it exists until the completion is
                        // reaped below, and `Drop` cancels an outstanding
                        // request before the buffers are freed.
                        unsafe { ring.submission().push(&sqe) }
                            .expect("the receive ring holds at most one request");
                        *in_flight = true;
                    }
                    match ring.submit_and_wait(1) {
                        Ok(_) => {}
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {
                            continue;
                        }
                        Err(e) => {
                            self.poisoned = true;
                            return Err(RecvError::Ring(e));
                        }
                    }
                    let Some(cqe) = ring.completion().find(|c| c.user_data() == RECV_TAG) else {
                        continue;
                    };
                    *in_flight = false;
                    cqe.result()
                }
                Engine::Blocking => {
                    // SAFETY: `ptr..ptr+len` is the unused tail of the frame
                    // buffer or the emptied ciphertext buffer, written by the
                    // kernel before the call returns.
                    let rc = unsafe { libc::recv(fd, ptr.cast(), len, 0) };
                    if rc < 0 {
                        -io::Error::last_os_error()
                            .raw_os_error()
                            .unwrap_or(libc::EIO)
                    } else {
                        rc as i32
                    }
                }
            };
            if res == -libc::EINTR || res == -libc::EAGAIN {
                continue;
            }
            if res < 0 {
                self.poisoned = true;
                return Err(RecvError::Io {
                    received: self.stats.bytes,
                    source: io::Error::from_raw_os_error(-res),
                });
            }
            let n = res as usize;
            self.stats.bytes += n as u64;
            self.stats.recvs += 1;
            return Ok(n);
        }
    }
}

impl Drop for FrameReceiver {
    fn drop(&mut self) {
        let Engine::Uring { ring, in_flight } = &mut self.engine else {
            return;
        };
        if !*in_flight {
            return;
        }
        // The kernel may still write into the buffer: cancel and wait for the
        // request, or leak the buffer rather than free memory it writes to.
        let cancel = opcode::AsyncCancel::new(RECV_TAG)
            .build()
            .user_data(CANCEL_TAG);
        let mut done = false;
        // SAFETY: a cancel request carries no buffers.
        let pushed = unsafe { ring.submission().push(&cancel) }.is_ok();
        if pushed {
            for _ in 0..1000 {
                if ring.submit_and_wait(1).is_err() {
                    break;
                }
                if ring.completion().any(|c| c.user_data() == RECV_TAG) {
                    done = true;
                    break;
                }
            }
        }
        if !done {
            let leaked = std::mem::replace(&mut self.buf, IoBuf::new(1));
            std::mem::forget(leaked);
        }
    }
}
