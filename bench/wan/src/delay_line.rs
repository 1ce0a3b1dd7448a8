//! The delay line: a userspace replacement for netem's delay and loss (this
//! kernel has no netem).
//!
//! One thread holds the fds of both TUN devices. Every packet read from one
//! device is stamped `release = arrival + one_way_delay` and appended to that
//! direction's FIFO queue; when its time comes it is written into the other
//! device, which hands it to the other router's stack (which forwards it to its
//! host). The delay is the same for every packet of a direction, so release
//! times are monotonic and a FIFO per direction is an exact timer wheel.
//!
//! The thread sleeps in `ppoll` on both TUN fds and a stop `eventfd`, with a
//! timeout that ends at the earliest release time; the thread's timer slack is
//! 1 ns (`PR_SET_TIMERSLACK`), so the kernel wakes it within its own scheduling
//! latency of that time rather than up to 50 µs later. What lateness remains
//! (timer interrupt, softirq, context switch: tens of µs in a VM) is measured on
//! every timed wake-up and compensated: wake-ups and releases are scheduled
//! earlier by the smallest recent lateness (the *wake lead*, reported in
//! [`DelayLineStats::wake_lead_ns`]), never by more than the kernel has
//! always been late, so packets do not leave before their time. Reads are
//! drained in batches of up to [`READ_BATCH`] packets per wake-up. It never
//! spins: when no packet is due and none is readable, it blocks.
//!
//! Delay and loss can be changed while the line runs ([`DelayLine::set`]);
//! [`super::Wan::up`] starts it with neither, calibrates, then sets both.
//!
//! Optional loss drops each packet independently with probability
//! `loss_ppm / 1e6`, in each direction (xorshift64* generator). A direction
//! whose queue already holds its limit drops new packets (counted as overflow):
//! with the tbf in front, the limit is only reached if the delay line itself
//! cannot keep up.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most packets read from one device per wake-up before the queues are served
/// again.
pub const READ_BATCH: usize = 64;

/// Starting or running the delay line failed.
#[derive(Debug, thiserror::Error)]
pub enum DelayLineError {
    /// The stop eventfd could not be created.
    #[error("cannot create the delay line's eventfd: {0}")]
    EventFd(io::Error),
    /// The thread could not be started.
    #[error("cannot start the delay line thread: {0}")]
    Thread(io::Error),
    /// `ppoll` failed.
    #[error("delay line: ppoll failed: {0}")]
    Poll(io::Error),
    /// Reading a TUN device failed (device deleted under it?).
    #[error("delay line: reading the {direction} TUN device failed")]
    Read {
        /// `"src → dst"` or `"dst → src"`.
        direction: &'static str,
        /// The read error.
        source: io::Error,
    },
    /// The thread panicked.
    #[error("the delay line thread panicked")]
    Panicked,
}

/// Upper bound of the wake-up lead (see [`DelayLineStats::wake_lead_ns`]).
pub const MAX_LEAD_NS: u64 = 200_000;

/// Only wake-ups from a `ppoll` timeout at least this long are sampled for
/// the lead (a shorter one may return without sleeping).
const MIN_SAMPLED_WAIT_NS: u64 = 50_000;

/// Timed wake-ups over which the lead is the smallest lateness.
pub const LEAD_WINDOW: usize = 32;

/// Settings of a delay line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayLineConfig {
    /// Delay added to every packet, each direction.
    pub one_way: Duration,
    /// Packets lost per million, each direction.
    pub loss_ppm: u32,
    /// Largest packet (the devices' MTU); reads use buffers of this size.
    pub mtu: u32,
    /// Most packets queued per direction.
    pub queue_limit: usize,
    /// Seed of the loss generator.
    pub seed: u64,
}

/// Counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirectionStats {
    /// Packets written to the far device.
    pub forwarded_packets: u64,
    /// Bytes written to the far device.
    pub forwarded_bytes: u64,
    /// Packets dropped by the emulated loss.
    pub dropped_loss: u64,
    /// Packets dropped because the queue was full.
    pub dropped_overflow: u64,
    /// Packets the far device refused (down or deleted).
    pub write_errors: u64,
    /// Packets in the queue right now.
    pub queued: u64,
}

impl DirectionStats {
    /// All drops: loss, overflow and write errors.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss + self.dropped_overflow + self.write_errors
    }
}

/// A snapshot of the delay line's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DelayLineStats {
    /// Source host towards destination host.
    pub src_to_dst: DirectionStats,
    /// Destination host towards source host.
    pub dst_to_src: DirectionStats,
    /// The smallest lateness of the kernel's last [`LEAD_WINDOW`] timed
    /// wake-ups from `ppoll`, in ns. The delay line schedules its wake-ups and
    /// releases this much early (but never by more than half the one-way delay
    /// or [`MAX_LEAD_NS`]), which the kernel's wake-up latency makes up for.
    #[serde(default)]
    pub wake_lead_ns: u64,
}

#[derive(Debug, Default)]
struct Counters {
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_overflow: AtomicU64,
    write_errors: AtomicU64,
    queued: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            forwarded_packets: self.forwarded_packets.load(Ordering::Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Ordering::Relaxed),
            dropped_loss: self.dropped_loss.load(Ordering::Relaxed),
            dropped_overflow: self.dropped_overflow.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
        }
    }
}

/// State shared between the handle and the thread.
#[derive(Debug, Default)]
struct Shared {
    counters: [Counters; 2],
    wake_lead_ns: AtomicU64,
    /// Current one-way delay, read by the thread for every batch.
    delay_ns: AtomicU64,
    /// Current loss, read by the thread for every batch.
    loss_ppm: AtomicU32,
}

fn bump(counter: &AtomicU64, by: u64) {
    // Single writer: a load and a store are enough and avoid a locked add.
    counter.store(counter.load(Ordering::Relaxed) + by, Ordering::Relaxed);
}

/// A running delay line. Dropping it stops the thread and closes both devices.
#[derive(Debug)]
pub struct DelayLine {
    stop: File,
    thread: Option<JoinHandle<Result<(), DelayLineError>>>,
    shared: Arc<Shared>,
}

impl DelayLine {
    /// Starts the delay line between the packet files of two TUN devices
    /// (non-blocking, `IFF_NO_PI`): `src` is the source router's device,
    /// `dst` the destination's.
    pub fn start(
        src: File,
        dst: File,
        config: DelayLineConfig,
    ) -> Result<DelayLine, DelayLineError> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(DelayLineError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let stop = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let stop_rx = stop.try_clone().map_err(DelayLineError::EventFd)?;
        let shared = Arc::new(Shared::default());
        shared
            .delay_ns
            .store(config.one_way.as_nanos() as u64, Ordering::Relaxed);
        shared.loss_ppm.store(config.loss_ppm, Ordering::Relaxed);
        let worker = Worker {
            files: [src, dst],
            stop: stop_rx,
            config,
            shared: shared.clone(),
            queues: [VecDeque::new(), VecDeque::new()],
            pool: Vec::new(),
            scratch: vec![0; config.mtu as usize].into_boxed_slice(),
            rng: config.seed | 1,
            epoch: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("wan-delay-line".into())
            .spawn(move || worker.run())
            .map_err(DelayLineError::Thread)?;
        Ok(DelayLine {
            stop,
            thread: Some(thread),
            shared,
        })
    }

    /// Changes the one-way delay and the loss. Packets already queued keep
    /// their release times; packets read from now on get the new settings.
    pub fn set(&self, one_way: Duration, loss_ppm: u32) {
        self.shared
            .delay_ns
            .store(one_way.as_nanos() as u64, Ordering::Relaxed);
        self.shared.loss_ppm.store(loss_ppm, Ordering::Relaxed);
    }

    /// The one-way delay in force.
    pub fn one_way(&self) -> Duration {
        Duration::from_nanos(self.shared.delay_ns.load(Ordering::Relaxed))
    }

    /// The counters now.
    pub fn stats(&self) -> DelayLineStats {
        DelayLineStats {
            src_to_dst: self.shared.counters[0].snapshot(),
            dst_to_src: self.shared.counters[1].snapshot(),
            wake_lead_ns: self.shared.wake_lead_ns.load(Ordering::Relaxed),
        }
    }

    /// Whether the thread is still running (it stops on its own only on an
    /// error, e.g. a device deleted under it).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread, closes both devices (which deletes them) and returns
    /// the final counters, or the error that stopped the thread earlier.
    pub fn stop(mut self) -> Result<DelayLineStats, DelayLineError> {
        self.shutdown()?;
        Ok(self.stats())
    }

    fn shutdown(&mut self) -> Result<(), DelayLineError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // An eventfd write of 1 cannot block or fail short of overflow.
        let _ = (&self.stop).write(&1u64.to_ne_bytes());
        thread.join().map_err(|_| DelayLineError::Panicked)?
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

struct Packet {
    release_ns: u64,
    len: usize,
    buf: Box<[u8]>,
}

struct Worker {
    /// `[src, dst]`; direction `d` reads `files[d]` and writes `files[1 - d]`.
    files: [File; 2],
    stop: File,
    config: DelayLineConfig,
    shared: Arc<Shared>,
    queues: [VecDeque<Packet>; 2],
    /// Packet buffers not in a queue.
    pool: Vec<Box<[u8]>>,
    /// Where packets that are dropped on arrival are read to.
    scratch: Box<[u8]>,
    rng: u64,
    epoch: Instant,
}

const DIRECTION: [&str; 2] = ["src → dst", "dst → src"];

impl Worker {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn run(mut self) -> Result<(), DelayLineError> {
        // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects only
        // the calling thread.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        // Wake-up lead: packets are released `lead` early and ppoll is asked
        // to return `lead` early, where `lead` is the smallest lateness of the
        // last LEAD_WINDOW timed wake-ups: the kernel has not managed to wake
        // us sooner than that, so asking that much earlier does not release
        // packets before their time, while most of the systematic lateness is
        // removed. Zero until the window is full.
        let mut lateness = [0u64; LEAD_WINDOW];
        let mut samples = 0usize;
        let mut lead_learned: u64 = 0;
        loop {
            let lead = lead_learned;
            let delay_ns = self.shared.delay_ns.load(Ordering::Relaxed);
            let max_lead = (delay_ns / 2).min(MAX_LEAD_NS);
            let lead = lead.min(max_lead);
            let now = self.now_ns();
            self.release_due(0, now + lead);
            self.release_due(1, now + lead);
            let wake_at = self
                .queues
                .iter()
                .filter_map(|q| q.front().map(|p| p.release_ns.saturating_sub(lead)))
                .min();
            let mut fds = [
                libc::pollfd {
                    fd: self.files[0].as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.files[1].as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let wait_ns = wake_at.map_or(0, |t| t.saturating_sub(self.now_ns()));
            let timeout = wake_at.map(|_| libc::timespec {
                tv_sec: (wait_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (wait_ns % 1_000_000_000) as libc::c_long,
            });
            let timeout_ptr = timeout
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: `fds` is a valid array of 3 pollfds and `timeout_ptr` is
            // null or points to `timeout`; both outlive the call. No signal mask.
            let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 3, timeout_ptr, std::ptr::null()) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DelayLineError::Poll(e));
            }
            if rc == 0 && wait_ns >= MIN_SAMPLED_WAIT_NS {
                if let Some(target) = wake_at {
                    // A timed wake-up that really slept: how late was it?
                    lateness[samples % LEAD_WINDOW] = self.now_ns().saturating_sub(target);
                    samples += 1;
                    if samples >= LEAD_WINDOW {
                        let min = lateness.iter().copied().min().unwrap_or(0);
                        self.shared.wake_lead_ns.store(min, Ordering::Relaxed);
                        lead_learned = min;
                    }
                }
            }
            if fds[2].revents != 0 {
                return Ok(());
            }
            let readable = [fds[0].revents != 0, fds[1].revents != 0];
            for (d, _) in readable.iter().enumerate().filter(|(_, r)| **r) {
                self.read_batch(d)?;
            }
        }
    }

    /// Writes every packet of direction `d` whose release time has come.
    fn release_due(&mut self, d: usize, now: u64) {
        let counters = &self.shared.counters[d];
        let mut released = 0u64;
        while self.queues[d].front().is_some_and(|p| p.release_ns <= now) {
            let Some(p) = self.queues[d].pop_front() else {
                break;
            };
            match (&self.files[1 - d]).write(&p.buf[..p.len]) {
                Ok(_) => {
                    bump(&counters.forwarded_packets, 1);
                    bump(&counters.forwarded_bytes, p.len as u64);
                }
                Err(_) => bump(&counters.write_errors, 1),
            }
            self.pool.push(p.buf);
            released += 1;
        }
        if released > 0 {
            counters
                .queued
                .store(self.queues[d].len() as u64, Ordering::Relaxed);
        }
    }

    /// Reads up to [`READ_BATCH`] packets from direction `d`'s device.
    fn read_batch(&mut self, d: usize) -> Result<(), DelayLineError> {
        let shared = Arc::clone(&self.shared);
        let counters = &shared.counters[d];
        // Loaded now, not before ppoll: it may have changed while we slept.
        let delay_ns = shared.delay_ns.load(Ordering::Relaxed);
        let loss_ppm = shared.loss_ppm.load(Ordering::Relaxed);
        for _ in 0..READ_BATCH {
            let full = self.queues[d].len() >= self.config.queue_limit;
            let mut buf = if full {
                None
            } else {
                Some(
                    self.pool
                        .pop()
                        .unwrap_or_else(|| vec![0; self.config.mtu as usize].into_boxed_slice()),
                )
            };
            let target: &mut [u8] = match buf.as_mut() {
                Some(b) => b,
                None => &mut self.scratch,
            };
            let len = match (&self.files[d]).read(target) {
                Ok(len) => len,
                Err(e) => {
                    if let Some(b) = buf {
                        self.pool.push(b);
                    }
                    return match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                        _ => Err(DelayLineError::Read {
                            direction: DIRECTION[d],
                            source: e,
                        }),
                    };
                }
            };
            let Some(buf) = buf else {
                bump(&counters.dropped_overflow, 1);
                continue;
            };
            if lose(&mut self.rng, loss_ppm) {
                bump(&counters.dropped_loss, 1);
                self.pool.push(buf);
                continue;
            }
            // With a constant delay release times only grow; after a change
            // to a shorter delay a packet waits for the one ahead of it (FIFO).
            let release_ns = self.now_ns() + delay_ns;
            self.queues[d].push_back(Packet {
                release_ns,
                len,
                buf,
            });
        }
        counters
            .queued
            .store(self.queues[d].len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Whether the next packet is lost, with probability `loss_ppm / 1e6`
/// (xorshift64* on `state`, which must not be 0).
fn lose(state: &mut u64, loss_ppm: u32) -> bool {
    if loss_ppm == 0 {
        return false;
    }
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
    (r >> 11) % 1_000_000 < u64::from(loss_ppm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_rate_follows_ppm() {
        let mut state = 0x1234_5678_9abc_def1;
        let lost = (0..1_000_000).filter(|_| lose(&mut state, 20_000)).count();
        assert!((19_000..21_000).contains(&lost), "{lost}");
        assert!(!(0..1000).any(|_| lose(&mut state, 0)));
        assert!((0..1000).all(|_| lose(&mut state, 1_000_000)));
    }
}
