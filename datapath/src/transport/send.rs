//! The sending half of a connection: frames are encoded straight into
//! page-aligned buffers, and whole runs of them leave in large sends.
//!
//! ```text
//!            reserve/commit (encode in place)
//!                          │
//!   ┌──────────┬──────────┬▼─────────┐
//!   │ slot 0   │ slot 1   │ slot 2   │  slots: front = oldest, back = open
//!   │ sent|in  │ queued   │ filling  │
//!   │ flight   │          │          │
//!   └──────────┴──────────┴──────────┘
//!     ▲ one SEND in flight per socket (ordering), MSG_WAITALL
//! ```
//!
//! - One send request is in flight per socket at a time, so bytes can never be
//!   reordered on the stream; the buffer (or a prefix of the open buffer) it
//!   covers is owned by the kernel until the completion arrives, while the
//!   caller keeps encoding after it.
//! - A [`Pacer`] may hold data back so that unacknowledged bytes stay near the
//!   bandwidth-delay product (see [`super::pacing`]).
//! - With the blocking backend the same structure issues plain `send(2)` calls.
//! - With TLS ([`super::tls`]) what the pacer lets go is sealed, at most
//!   [`SEAL_CHUNK`] bytes at a time, into TLS records in a ciphertext buffer
//!   of the sender's own, and that buffer is what the kernel gets; the slot
//!   is free as soon as it is sealed. The sealed run goes out whole before
//!   the next is sealed, so records leave in order.
//!
//! Zero-copy sends (`IORING_OP_SEND_ZC`) are deliberately not used: frames are
//! already a private copy of guest memory (taken before CRC and compression,
//! since the guest may be writing the page), and on loopback and veth the
//! kernel copies zero-copy payloads anyway; at WAN rates the single copy into
//! the socket costs well under 1 % of a core.

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};

use super::buf::IoBuf;
use super::pacing::{Pacer, PacingConfig};
use super::probe::{IoBackend, IoPreference, ProbeError, select_backend};
use super::rate::RateStats;
use super::tcp;
use super::tls::{SharedTls, TlsError};

/// Plaintext sealed into TLS records at a time: a run of frames the pacer
/// let go, at most this long.
pub const SEAL_CHUNK: usize = 256 << 10;
/// Room for a sealed run: each 16 KiB record adds 22 bytes (header, content
/// type, tag), plus queued alerts or a key update.
const CIPHER_BUFFER: usize = SEAL_CHUNK + (SEAL_CHUNK / 16384 + 1) * 32 + (32 << 10);

/// Tuning of a [`FrameSender`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SendConfig {
    /// Size of each send buffer; the largest frame must fit in one.
    pub buffer_size: usize,
    /// Number of send buffers.
    pub buffers: usize,
    /// Bulk pacing, or `None` to let TCP fill the path.
    pub pacing: Option<PacingConfig>,
    /// I/O backend preference.
    pub io: IoPreference,
    /// Unpaced, submit at least this many bytes at a time unless a flush
    /// (or a full buffer) lets a smaller tail go (0: every frame leaves at
    /// once). One send per frame costs a system call and a TCP push per
    /// page (on loopback the kernel's share of a 4 KiB-per-send stream was
    /// 3.4 s of CPU per GB), but a held tail leaves only with the next
    /// frame or a flush: a post-copy push that stalls between pages would
    /// hold a page the guest waits for, so migrations keep 0 (paced, the
    /// pacer's minimum send applies instead, and the engine flushes where
    /// it waits). The loopback benchmark batches.
    pub batch: usize,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            buffer_size: 1 << 20,
            buffers: 4,
            pacing: Some(PacingConfig::default()),
            io: IoPreference::Auto,
            batch: 0,
        }
    }
}

impl SendConfig {
    /// The configuration for the latency-critical fault connection: small
    /// buffers, no pacing (its traffic is tiny and must never wait).
    pub fn fault() -> Self {
        SendConfig {
            buffer_size: 4 << 20,
            buffers: 2,
            pacing: None,
            io: IoPreference::Auto,
            batch: 0,
        }
    }
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A frame larger than a send buffer was reserved.
    #[error("a frame of {len} bytes does not fit a {buffer_size}-byte send buffer")]
    FrameTooLarge {
        /// Requested length.
        len: usize,
        /// Configured buffer size.
        buffer_size: usize,
    },
    /// The socket failed.
    #[error("send failed after {sent} bytes")]
    Io {
        /// Bytes that left before the failure.
        sent: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("the peer closed the connection after {sent} bytes")]
    Closed {
        /// Bytes that left before the close.
        sent: u64,
    },
    /// The pacer held the stream back this long without the peer
    /// acknowledging anything: the peer stopped reading.
    #[error("no progress for {0:?}: the peer acknowledges nothing")]
    Stalled(std::time::Duration),
    /// io_uring is unusable and was required.
    #[error(transparent)]
    Backend(#[from] ProbeError),
    /// The ring could not be created.
    #[error("cannot create an io_uring: {0}")]
    RingSetup(#[source] io::Error),
    /// An earlier error left the stream in an unknown state.
    #[error("the sender failed earlier and cannot continue")]
    Poisoned,
    /// Sealing TLS records failed.
    #[error("sealing TLS records")]
    Tls(#[source] TlsError),
}

/// What a sender has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SendStats {
    /// Frames committed.
    pub frames: u64,
    /// Bytes committed.
    pub bytes_committed: u64,
    /// Bytes the kernel accepted.
    pub bytes_sent: u64,
    /// Send requests issued.
    pub sends: u64,
    /// Sends that the kernel completed short (resubmitted).
    pub short_sends: u64,
    /// Times the pacer held data back.
    pub pacing_waits: u64,
    /// Time spent held back by the pacer, ns.
    pub pacing_wait_ns: u64,
    /// Largest pacing limit applied, bytes.
    pub max_pacing_limit: u64,
    /// The rate controller's counters (`None`: rate pacing off, or refused
    /// by the kernel).
    pub rate: Option<RateStats>,
    /// Pacing rate the socket has now, bytes/s (0: uncapped).
    pub pacing_rate: u64,
    /// Times the socket's pacing rate was changed.
    pub pacing_rate_changes: u64,
    /// Time spent sealing TLS records, ns.
    pub seal_ns: u64,
}

#[derive(Debug)]
struct Slot {
    mem: IoBuf,
    /// Bytes encoded.
    len: usize,
    /// Bytes accepted by the kernel.
    sent: usize,
    /// No more frames will be appended.
    closed: bool,
}

/// The ciphertext of the sealed run being sent.
#[derive(Debug)]
struct Sealed {
    chan: SharedTls,
    mem: IoBuf,
    /// Ciphertext bytes in `mem`.
    len: usize,
    /// Of them, accepted by the kernel.
    sent: usize,
}

impl Sealed {
    fn pending(&self) -> usize {
        self.len - self.sent
    }
}

enum Engine {
    Uring {
        ring: Box<IoUring>,
        /// Length of the send in flight, which starts at the front slot's `sent`.
        in_flight: Option<usize>,
    },
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

/// What the front of the queue allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NextSend {
    /// Submit this many bytes.
    Go(usize),
    /// Nothing worth sending.
    Idle,
    /// The pacer holds data back until this many bytes drain.
    Paced(usize),
}

const SEND_TAG: u64 = 1;
const CANCEL_TAG: u64 = 2;

/// Sends frames on one TCP connection.
#[derive(Debug)]
pub struct FrameSender {
    sock: TcpStream,
    engine: Engine,
    slots: VecDeque<Slot>,
    free: Vec<IoBuf>,
    cfg: SendConfig,
    pacer: Pacer,
    stats: SendStats,
    poisoned: bool,
    fallback_reason: Option<String>,
    /// Since when the pacer has held every send back (and `bytes_sent`
    /// then).
    paced_since: Option<(Instant, u64)>,
    /// TLS: the run sealed last (`None`: plaintext).
    tls: Option<Sealed>,
}

/// How long the pacer may hold the stream back without the peer
/// acknowledging anything before the stream fails (the liveness limit the
/// kernel applies to unacknowledged data, `TCP_USER_TIMEOUT`).
const PACED_STALL: std::time::Duration = super::tcp::USER_TIMEOUT;

/// How long a TLS sender being dropped waits for room for its
/// `close_notify`.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

impl FrameSender {
    /// Wraps a connected socket.
    pub fn new(sock: TcpStream, cfg: SendConfig) -> Result<Self, SendError> {
        let choice = select_backend(cfg.io)?;
        let engine = match choice.backend {
            IoBackend::Uring => Engine::Uring {
                ring: Box::new(IoUring::new(8).map_err(SendError::RingSetup)?),
                in_flight: None,
            },
            IoBackend::Blocking => Engine::Blocking,
        };
        let buffers = cfg.buffers.max(2);
        Ok(FrameSender {
            sock,
            engine,
            slots: VecDeque::with_capacity(buffers),
            free: (0..buffers).map(|_| IoBuf::new(cfg.buffer_size)).collect(),
            pacer: cfg.pacing.map_or_else(Pacer::disabled, Pacer::new),
            cfg,
            stats: SendStats::default(),
            poisoned: false,
            fallback_reason: choice.fallback_reason,
            paced_since: None,
            tls: None,
        })
    }

    /// Seals everything this sender sends into `chan`'s TLS records.
    pub fn with_tls(mut self, chan: SharedTls) -> Self {
        self.tls = Some(Sealed {
            chan,
            mem: IoBuf::new(CIPHER_BUFFER),
            len: 0,
            sent: 0,
        });
        self
    }

    /// The TLS session, if the sender seals.
    pub fn tls(&self) -> Option<&SharedTls> {
        self.tls.as_ref().map(|t| &t.chan)
    }

    /// Ciphertext sealed and not yet accepted by the kernel, or queued in
    /// the TLS session.
    fn tls_pending(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.pending() > 0 || t.chan.wants_write())
    }

    /// The backend in use.
    pub fn backend(&self) -> IoBackend {
        match self.engine {
            Engine::Uring { .. } => IoBackend::Uring,
            Engine::Blocking => IoBackend::Blocking,
        }
    }

    /// Why io_uring is not in use, when the preference allowed a fallback.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// The socket.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Counters so far.
    pub fn stats(&self) -> SendStats {
        SendStats {
            rate: self.pacer.rate_stats(),
            ..self.stats
        }
    }

    /// The pacer (for telemetry: bandwidth and RTT estimates).
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    /// Space for one frame of at most `max_len` bytes; encode into it and
    /// call [`commit`](Self::commit) with the length used. Blocks when every
    /// buffer is queued or in flight.
    pub fn reserve(&mut self, max_len: usize) -> Result<&mut [u8], SendError> {
        self.check()?;
        let size = self.cfg.buffer_size;
        if max_len > size {
            return Err(SendError::FrameTooLarge {
                len: max_len,
                buffer_size: size,
            });
        }
        let fits = self
            .slots
            .back()
            .is_some_and(|s| !s.closed && size - s.len >= max_len);
        if !fits {
            if let Some(back) = self.slots.back_mut() {
                back.closed = true;
            }
            while self.free.is_empty() {
                self.progress(true)?;
            }
            let mem = self.free.pop().expect("a free buffer after progress");
            self.slots.push_back(Slot {
                mem,
                len: 0,
                sent: 0,
                closed: false,
            });
        }
        let back = self.slots.back_mut().expect("an open slot");
        let start = back.len;
        Ok(back.mem.slice_mut(start, start + max_len))
    }

    /// Commits `len` bytes of the space returned by the last
    /// [`reserve`](Self::reserve) as one frame.
    ///
    /// # Panics
    /// If `len` exceeds the reserved space.
    pub fn commit(&mut self, len: usize) -> Result<(), SendError> {
        self.check()?;
        let size = self.cfg.buffer_size;
        let back = self.slots.back_mut().expect("commit without reserve");
        assert!(
            !back.closed && back.len + len <= size,
            "commit past the reserved space"
        );
        back.len += len;
        self.stats.frames += 1;
        self.stats.bytes_committed += len as u64;
        self.progress(false)
    }

    /// Copies a ready-made frame in (convenience for small control frames).
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<(), SendError> {
        self.reserve(frame.len())?.copy_from_slice(frame);
        self.commit(frame.len())
    }

    /// Sends everything committed so far, ignoring the pacer's minimum send
    /// size, and waits until the kernel has accepted it.
    pub fn flush(&mut self) -> Result<(), SendError> {
        self.check()?;
        if let Some(back) = self.slots.back_mut() {
            back.closed = true;
        }
        while !self.slots.is_empty() || self.tls_pending() {
            self.progress(true)?;
        }
        Ok(())
    }

    /// Flushes, then waits until the peer has acknowledged every byte (or
    /// `timeout` passes; returns whether it drained).
    pub fn drain(&mut self, timeout: Duration) -> Result<bool, SendError> {
        self.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            let q = tcp::outq(self.sock.as_fd()).map_err(|source| self.io_error(source))?;
            if q == 0 {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn check(&self) -> Result<(), SendError> {
        if self.poisoned {
            Err(SendError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn io_error(&mut self, source: io::Error) -> SendError {
        self.poisoned = true;
        let sent = self.stats.bytes_sent;
        match source.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                SendError::Closed { sent }
            }
            _ => SendError::Io { sent, source },
        }
    }

    /// Releases fully sent slots and decides what may go next.
    fn next_send(&mut self) -> Result<NextSend, SendError> {
        // A sealed run (or ciphertext the session queued) goes out whole,
        // before anything else is sealed: the pacer let it go already.
        if let Some(t) = &mut self.tls {
            if t.pending() == 0 && t.chan.wants_write() {
                t.sent = 0;
                t.len = 0;
                let n = t
                    .chan
                    .drain(t.mem.slice_mut(0, CIPHER_BUFFER))
                    .map_err(|e| {
                        self.poisoned = true;
                        SendError::Tls(e)
                    })?;
                t.len = n;
            }
            if t.pending() > 0 {
                return Ok(NextSend::Go(t.pending()));
            }
        }
        while self
            .slots
            .front()
            .is_some_and(|f| f.closed && f.sent == f.len)
        {
            let slot = self.slots.pop_front().expect("front exists");
            self.free.push(slot.mem);
        }
        let Some(front) = self.slots.front() else {
            return Ok(NextSend::Idle);
        };
        let pending = front.len - front.sent;
        let finishing = front.closed;
        if pending == 0 {
            return Ok(NextSend::Idle);
        }
        if !self.pacer.enabled() {
            // A held tail needs a later call to leave (a flush, the next
            // frame): callers that stall between frames keep `batch` at 0.
            let go = pending >= self.cfg.batch || finishing;
            return Ok(if go {
                NextSend::Go(pending)
            } else {
                NextSend::Idle
            });
        }
        let info = tcp::tcp_info(self.sock.as_fd()).map_err(|e| self.io_error(e))?;
        self.pacer.observe(&info, Instant::now());
        self.apply_pacing_rate();
        let queued = tcp::outq(self.sock.as_fd()).map_err(|e| self.io_error(e))?;
        let limit = self.pacer.limit();
        self.stats.max_pacing_limit = self.stats.max_pacing_limit.max(limit as u64);
        let n = pending.min(self.pacer.allowance(queued));
        if n == 0 {
            Ok(NextSend::Paced(self.pacer.deficit(queued)))
        } else if n >= self.pacer.min_send() || (n == pending && finishing) {
            Ok(NextSend::Go(n))
        } else {
            // A small tail of the open slot: wait for more frames (or a flush).
            Ok(NextSend::Idle)
        }
    }

    /// Gives the socket the pacing rate the pacer wants, when it moved by
    /// more than 0.5 %. A kernel that refuses the option leaves the
    /// in-flight limit alone in charge.
    fn apply_pacing_rate(&mut self) {
        let want = self.pacer.pacing_rate();
        let have = (self.stats.pacing_rate > 0).then_some(self.stats.pacing_rate);
        let moved = match (want, have) {
            (Some(w), Some(h)) => (w as f64 - h as f64).abs() > 0.005 * h as f64,
            (w, h) => w != h,
        };
        if !moved {
            return;
        }
        match tcp::set_max_pacing_rate(self.sock.as_fd(), want) {
            Ok(()) => {
                self.stats.pacing_rate = want.unwrap_or(0);
                self.stats.pacing_rate_changes += 1;
            }
            Err(_) => self.pacer.disable_rate(),
        }
    }

    /// Moves data: submits what may go and reaps completions; with `wait`,
    /// blocks until something changed (a completion, or a pacing interval).
    fn progress(&mut self, wait: bool) -> Result<(), SendError> {
        let in_flight = matches!(
            self.engine,
            Engine::Uring {
                in_flight: Some(_),
                ..
            }
        );
        if !in_flight {
            match self.next_send()? {
                NextSend::Go(n) => self.submit(n)?,
                NextSend::Idle => {
                    if wait {
                        // Someone waits for buffers or a flush: let the open
                        // slot's small remainder go too.
                        if let Some(back) = self.slots.back_mut() {
                            back.closed = true;
                        }
                    }
                    return Ok(());
                }
                NextSend::Paced(deficit) => {
                    // Held back while nothing gets acknowledged: a peer that
                    // stopped reading (the kernel sees no unacknowledged
                    // data, so its own timeout never fires).
                    let sent = self.stats.bytes_sent;
                    match self.paced_since {
                        Some((t, at)) if at == sent => {
                            if t.elapsed() >= PACED_STALL {
                                self.poisoned = true;
                                return Err(SendError::Stalled(PACED_STALL));
                            }
                        }
                        _ => self.paced_since = Some((Instant::now(), sent)),
                    }
                    if wait {
                        let pause = self.pacer.wait_hint(deficit);
                        let t = Instant::now();
                        std::thread::sleep(pause);
                        self.stats.pacing_waits += 1;
                        self.stats.pacing_wait_ns += t.elapsed().as_nanos() as u64;
                    }
                    return Ok(());
                }
            }
        }
        self.reap(wait)
    }

    fn submit(&mut self, n: usize) -> Result<(), SendError> {
        let (ptr, len) = match &mut self.tls {
            None => {
                let front = self.slots.front().expect("submit with a queued slot");
                (front.mem.ptr_at(front.sent), n.min(u32::MAX as usize))
            }
            Some(t) => {
                if t.pending() == 0 {
                    // Seal the next run of the front slot; the slot is free
                    // of it from here on.
                    let front = self.slots.front_mut().expect("submit with a queued slot");
                    let run = n.min(SEAL_CHUNK);
                    let plain = front.mem.slice(front.sent, front.sent + run);
                    let t0 = Instant::now();
                    let sealed = t.chan.seal(plain, t.mem.slice_mut(0, CIPHER_BUFFER));
                    self.stats.seal_ns += t0.elapsed().as_nanos() as u64;
                    match sealed {
                        Ok(0) if run > 0 => {
                            // rustls refuses to seal past its sequence limit
                            // (never reached: it updates its keys first).
                            self.poisoned = true;
                            return Err(SendError::Tls(TlsError::Setup(
                                "the TLS session sealed nothing".into(),
                            )));
                        }
                        Ok(c) => {
                            front.sent += run;
                            t.len = c;
                            t.sent = 0;
                        }
                        Err(e) => {
                            self.poisoned = true;
                            return Err(SendError::Tls(e));
                        }
                    }
                }
                (t.mem.ptr_at(t.sent), t.pending().min(u32::MAX as usize))
            }
        };
        if len == 0 {
            return Ok(());
        }
        self.stats.sends += 1;
        let fd = self.sock.as_raw_fd();
        match &mut self.engine {
            Engine::Uring { ring, in_flight } => {
                let sqe = opcode::Send::new(types::Fd(fd), ptr, len as u32)
                    .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(SEND_TAG);
                // SAFETY: `ptr..ptr+len` lies in the front slot's buffer (or,
                // with TLS, the sealed run's), which stays allocated and is
                // never handed out for writing (only bytes past `len` of the
                // open slot are; a sealed run is replaced only once wholly
                // sent) until the completion is reaped; `Drop` waits for or
                // cancels the request before the buffers and the socket go
                // away.
                unsafe { ring.submission().push(&sqe) }
                    .expect("the send ring holds at most one request");
                *in_flight = Some(len);
                // Errors here are reported by the completion or the next
                // submit_and_wait (EINTR/EBUSY just mean "enter again").
                match ring.submit() {
                    Ok(_) => Ok(()),
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
                    Err(e) => Err(SendError::RingSetup(e)),
                }
            }
            Engine::Blocking => {
                // SAFETY: `ptr..ptr+len` is initialised memory of the front
                // slot (or the sealed run); the call completes before we
                // return.
                let rc =
                    unsafe { libc::send(fd, ptr.cast_const().cast(), len, libc::MSG_NOSIGNAL) };
                if rc < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        return Ok(());
                    }
                    return Err(self.io_error(e));
                }
                self.account(rc as usize, len);
                Ok(())
            }
        }
    }

    fn account(&mut self, done: usize, requested: usize) {
        if done < requested {
            self.stats.short_sends += 1;
        }
        self.stats.bytes_sent += done as u64;
        if let Some(t) = &mut self.tls {
            t.sent += done;
            return;
        }
        let front = self.slots.front_mut().expect("accounted send has a slot");
        front.sent += done;
    }

    fn reap(&mut self, wait: bool) -> Result<(), SendError> {
        let Engine::Uring { ring, in_flight } = &mut self.engine else {
            return Ok(());
        };
        let Some(requested) = *in_flight else {
            return Ok(());
        };
        if wait {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => return Ok(()),
                Err(e) => return Err(SendError::RingSetup(e)),
            }
        }
        let mut result = None;
        for cqe in ring.completion() {
            if cqe.user_data() == SEND_TAG {
                result = Some(cqe.result());
            }
        }
        let Some(res) = result else { return Ok(()) };
        *in_flight = None;
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(self.io_error(e));
        }
        if res == 0 && requested > 0 {
            return Err(self.io_error(io::Error::from(io::ErrorKind::WriteZero)));
        }
        self.account(res as usize, requested);
        Ok(())
    }
}

impl FrameSender {
    /// Ends the TLS stream with `close_notify`, the peer's proof that the
    /// stream ended here and was not cut. Only when everything committed
    /// left (a sender dropped with frames unsent must look cut, not
    /// finished); it waits at most [`CLOSE_WAIT`] for room in the socket.
    fn close_tls(&mut self) {
        let Some(t) = &mut self.tls else { return };
        let unsent = self.slots.iter().any(|s| s.sent < s.len);
        if self.poisoned || t.pending() > 0 || unsent {
            return;
        }
        t.chan.close();
        let Ok(n) = t.chan.drain(t.mem.slice_mut(0, CIPHER_BUFFER)) else {
            return;
        };
        let fd = self.sock.as_raw_fd();
        let deadline = Instant::now() + CLOSE_WAIT;
        let mut off = 0;
        while off < n && Instant::now() < deadline {
            let ptr = t.mem.ptr_at(off);
            // SAFETY: `ptr..ptr+(n-off)` is initialised memory of the sealed
            // run's buffer, nothing else uses it (no send is in flight), and
            // the call completes before we return.
            let rc = unsafe {
                libc::send(
                    fd,
                    ptr.cast_const().cast(),
                    n - off,
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                off += rc as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if rc == 0 || e.kind() != io::ErrorKind::WouldBlock {
                return;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd that lives across the call.
            unsafe { libc::poll(&mut pfd, 1, 10) };
        }
    }
}

impl Drop for FrameSender {
    fn drop(&mut self) {
        let Engine::Uring { ring, in_flight } = &mut self.engine else {
            self.close_tls();
            return;
        };
        if in_flight.is_none() {
            self.close_tls();
            return;
        }
        // The kernel still reads from a slot: cancel and wait, or leak the
        // buffers rather than free memory it uses.
        let cancel = opcode::AsyncCancel::new(SEND_TAG)
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: a cancel request carries no buffers.
        let pushed = unsafe { ring.submission().push(&cancel) }.is_ok();
        let mut done = false;
        if pushed {
            for _ in 0..1000 {
                if ring.submit_and_wait(1).is_err() {
                    break;
                }
                if ring.completion().any(|c| c.user_data() == SEND_TAG) {
                    done = true;
                    break;
                }
            }
        }
        if !done {
            for slot in self.slots.drain(..) {
                std::mem::forget(slot.mem);
            }
        }
    }
}
