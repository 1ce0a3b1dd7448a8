//! Sending guest units (pages, chunks, device-state pieces) as frames: copy
//! the unit out of the memory it lives in, encode it (zero flag, LZ4 when it
//! pays, CRC) straight into the transport's send buffer.

use std::time::Instant;

use serde::Serialize;

use crate::transport::{FrameSender, SendError};
use crate::wire::{
    Compression, ControlCode, EncodeError, Encoding, PingMsg, UnitKind, encode_buffer_len,
    encode_control, encode_digest, encode_goodbye, encode_ping, encode_pong, encode_request,
    max_frame_len,
};

/// Why a unit could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum UnitSendError {
    /// The frame could not be encoded (a caller bug: wrong kind or size).
    #[error("cannot encode {kind:?} unit {index}")]
    Encode {
        /// Kind of the unit.
        kind: UnitKind,
        /// Its index.
        index: u64,
        /// What was wrong.
        #[source]
        source: EncodeError,
    },
    /// The connection failed.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// What a [`UnitSender`] has sent, by encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UnitStats {
    /// Units sent.
    pub units: u64,
    /// Units sent raw.
    pub raw: u64,
    /// Units sent LZ4-compressed.
    pub lz4: u64,
    /// All-zero units (sent as a flag).
    pub zero: u64,
    /// Uncompressed bytes of the units.
    pub unit_bytes: u64,
    /// Frame bytes (headers and payloads) put on the wire for them.
    pub wire_bytes: u64,
    /// Time spent copying units out of the memory they live in, ns.
    pub copy_ns: u64,
    /// Time spent encoding them (zero check, LZ4, CRC, into the send
    /// buffer), ns.
    pub encode_ns: u64,
}

impl UnitStats {
    /// Uncompressed bytes per wire byte (1.0 when nothing was sent).
    pub fn compression_ratio(&self) -> f64 {
        if self.wire_bytes == 0 {
            1.0
        } else {
            self.unit_bytes as f64 / self.wire_bytes as f64
        }
    }
}

/// Whether LZ4 is worth trying on the next unit: after a run of units LZ4
/// could not shrink (encrypted or already compressed memory, random data),
/// the next ones go raw without the attempt, for a span that doubles while
/// the probes keep failing; one unit that compresses ends the skipping.
/// (An attempt on an incompressible 4 KiB page costs about as much CPU as
/// sealing it: 0.25 s per GB on this machine kind.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Lz4Backoff {
    /// Consecutive attempts that did not pay.
    misses: u32,
    /// Units still to send without trying.
    skip: u32,
    /// The next skip span's exponent.
    level: u32,
}

impl Lz4Backoff {
    /// Misses in a row that start skipping.
    const MISSES: u32 = 16;
    /// The first skip span, units ...
    const FIRST_SPAN: u32 = 16;
    /// ... doubling up to this.
    const MAX_SPAN: u32 = 1024;

    /// Whether to try LZ4 on the next unit.
    fn attempt(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            false
        } else {
            true
        }
    }

    /// The outcome of an attempt (`Zero` units say nothing).
    fn record(&mut self, encoding: Encoding) {
        match encoding {
            Encoding::Lz4 => *self = Lz4Backoff::default(),
            Encoding::Raw => {
                self.misses += 1;
                if self.misses >= Self::MISSES {
                    self.skip = (Self::FIRST_SPAN << self.level.min(16)).min(Self::MAX_SPAN);
                    self.level += 1;
                    // One probe after the span decides the next one.
                    self.misses = Self::MISSES - 1;
                }
            }
            Encoding::Zero => {}
        }
    }
}

/// Encodes units into a [`FrameSender`].
#[derive(Debug)]
pub struct UnitSender {
    tx: FrameSender,
    compression: Compression,
    lz4: Lz4Backoff,
    scratch: Vec<u8>,
    stats: UnitStats,
}

impl UnitSender {
    /// Wraps a sender; `compression` decides whether LZ4 is tried.
    pub fn new(tx: FrameSender, compression: Compression) -> Self {
        UnitSender {
            tx,
            compression,
            lz4: Lz4Backoff::default(),
            scratch: Vec::new(),
            stats: UnitStats::default(),
        }
    }

    /// Sends one unit of `len` bytes. `copy_out` fills the sender's private
    /// scratch copy of it: guest memory may change while it is encoded, and the
    /// zero check, LZ4 and CRC must all see the same bytes.
    pub fn send_unit(
        &mut self,
        kind: UnitKind,
        index: u64,
        len: usize,
        copy_out: impl FnOnce(&mut [u8]),
    ) -> Result<Encoding, UnitSendError> {
        self.try_send_unit(kind, index, len, |out| {
            copy_out(out);
            Ok::<(), std::convert::Infallible>(())
        })
        .map(|r| r.unwrap_or_else(|e| match e {}))
    }

    /// [`send_unit`](Self::send_unit) with a copy that can fail: when
    /// `copy_out` fails nothing is sent and its error comes back (inside an
    /// `Ok`: the connection is fine).
    pub fn try_send_unit<E>(
        &mut self,
        kind: UnitKind,
        index: u64,
        len: usize,
        copy_out: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Result<Encoding, E>, UnitSendError> {
        self.scratch.resize(len, 0);
        let t0 = Instant::now();
        if let Err(e) = copy_out(&mut self.scratch) {
            return Ok(Err(e));
        }
        let t1 = Instant::now();
        let tried = self.compression == Compression::Lz4 && self.lz4.attempt();
        let compression = if tried {
            Compression::Lz4
        } else {
            Compression::None
        };
        let out = self.tx.reserve(encode_buffer_len(len, compression))?;
        let t2 = Instant::now();
        let encoded = crate::wire::encode_unit(out, kind, index, &self.scratch, compression)
            .map_err(|source| UnitSendError::Encode {
                kind,
                index,
                source,
            })?;
        let t3 = Instant::now();
        if tried {
            self.lz4.record(encoded.encoding);
        }
        self.tx.commit(encoded.len)?;
        let s = &mut self.stats;
        s.copy_ns += (t1 - t0).as_nanos() as u64;
        s.encode_ns += (t3 - t2).as_nanos() as u64;
        s.units += 1;
        s.unit_bytes += len as u64;
        s.wire_bytes += encoded.len as u64;
        match encoded.encoding {
            Encoding::Raw => s.raw += 1,
            Encoding::Lz4 => s.lz4 += 1,
            Encoding::Zero => s.zero += 1,
        }
        Ok(Ok(encoded.encoding))
    }

    /// Sends a control message.
    pub fn send_control(&mut self, code: ControlCode) -> Result<(), UnitSendError> {
        self.small(|out| encode_control(out, code))
    }

    /// Sends a post-copy request for `count` units from `index`.
    pub fn send_request(
        &mut self,
        kind: UnitKind,
        index: u64,
        count: u32,
    ) -> Result<(), UnitSendError> {
        self.small(|out| encode_request(out, kind, index, count))
    }

    /// Sends a ping (fault-path latency probe).
    pub fn send_ping(&mut self, ping: PingMsg) -> Result<(), UnitSendError> {
        self.small(|out| encode_ping(out, ping))
    }

    /// Answers a ping.
    pub fn send_pong(&mut self, pong: PingMsg) -> Result<(), UnitSendError> {
        self.small(|out| encode_pong(out, pong))
    }

    /// Sends the CRC32 digests of units `first..first + crcs.len()`.
    pub fn send_digest(
        &mut self,
        kind: UnitKind,
        first: u64,
        crcs: &[u32],
    ) -> Result<(), UnitSendError> {
        let out = self.tx.reserve(max_frame_len(crcs.len() * 4))?;
        let n = encode_digest(out, kind, first, crcs).map_err(|source| UnitSendError::Encode {
            kind,
            index: first,
            source,
        })?;
        self.tx.commit(n)?;
        Ok(())
    }

    /// Sends the end-of-stream frame.
    pub fn send_goodbye(&mut self) -> Result<(), UnitSendError> {
        self.small(encode_goodbye)
    }

    fn small(
        &mut self,
        encode: impl FnOnce(&mut [u8]) -> Result<usize, EncodeError>,
    ) -> Result<(), UnitSendError> {
        const SMALL_FRAME: usize = 256;
        let out = self.tx.reserve(SMALL_FRAME)?;
        let n = encode(out).map_err(|source| UnitSendError::Encode {
            kind: UnitKind::Control,
            index: 0,
            source,
        })?;
        self.tx.commit(n)?;
        Ok(())
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> Result<(), UnitSendError> {
        Ok(self.tx.flush()?)
    }

    /// Unit counters.
    pub fn stats(&self) -> UnitStats {
        self.stats
    }

    /// The underlying frame sender (stats, pacer, socket).
    pub fn sender(&mut self) -> &mut FrameSender {
        &mut self.tx
    }

    /// The frame sender, to look at.
    pub fn frame_sender(&self) -> &FrameSender {
        &self.tx
    }

    /// Gives the frame sender back.
    pub fn into_inner(self) -> FrameSender {
        self.tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_backoff_skips_incompressible_runs_and_resumes_on_a_hit() {
        let mut b = Lz4Backoff::default();
        for _ in 0..Lz4Backoff::MISSES {
            assert!(b.attempt());
            b.record(Encoding::Raw);
        }
        // Skipping: the first span.
        let skipped = (0..1000).take_while(|_| !b.attempt()).count() as u32;
        assert_eq!(skipped, Lz4Backoff::FIRST_SPAN);
        // The probe fails again: the span doubles.
        b.record(Encoding::Raw);
        let skipped = (0..1000).take_while(|_| !b.attempt()).count() as u32;
        assert_eq!(skipped, 2 * Lz4Backoff::FIRST_SPAN);
        // Zero units say nothing; a unit that compresses ends the skipping.
        b.record(Encoding::Zero);
        b.record(Encoding::Lz4);
        assert!((0..100).all(|_| b.attempt()));
        // The span is bounded.
        let mut b = Lz4Backoff::default();
        let mut longest = 0;
        for _ in 0..40 {
            if b.attempt() {
                b.record(Encoding::Raw);
            } else {
                let n = 1 + (0..5000).take_while(|_| !b.attempt()).count() as u32;
                longest = longest.max(n);
                b.record(Encoding::Raw);
            }
        }
        assert_eq!(longest, Lz4Backoff::MAX_SPAN);
    }
}
