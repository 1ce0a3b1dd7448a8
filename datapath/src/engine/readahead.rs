//! Sequential read-ahead for post-copy faults, at the source.
//!
//! A guest that sweeps memory (a checker, a scan, a copy) faults on one page
//! after another, and each fault costs a round trip. When the requests show
//! a forward stream, the source sends the pages after the requested one
//! right behind it on the fault connection, so they arrive before the guest
//! asks (QEMU's post-copy gets a similar effect by moving its background
//! stream to the faulting address; this keeps the planner's push order and
//! only adds a window behind the fault).
//!
//! As in the kernel's file read-ahead, a window is sent only for a stream
//! (a request just after an earlier one), it doubles while the stream goes
//! on, and the next window is sent when the guest asks for a page of the
//! current one past its marker (half-way): such a page is already on the
//! connection ahead of anything sent now, so the request itself needs no
//! answer. Random faults get no window: they would only wait behind one.
//! Up to [`Readahead::STREAMS`] streams are followed at once (a checker's
//! writer and verifier, two scanning threads).

use std::ops::Range;

/// One forward stream of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stream {
    /// The last page requested in it.
    last: u64,
    /// The end of what was sent ahead for it.
    end: u64,
    /// A request at or past this page sends the next window.
    marker: u64,
    /// The current window, pages (0: none sent yet).
    window: u64,
    /// When it was last used (for replacement).
    used: u64,
}

/// The read-ahead state of one fault connection.
#[derive(Debug, Clone)]
pub(crate) struct Readahead {
    units: u64,
    streams: Vec<Stream>,
    clock: u64,
}

impl Readahead {
    /// The first window, pages.
    pub(crate) const MIN_WINDOW: u64 = 4;
    /// The largest window, pages (256 KiB of 4 KiB pages: 50 ms at 40 Mbit/s,
    /// the longest another fault waits behind it).
    pub(crate) const MAX_WINDOW: u64 = 64;
    /// Streams followed at once.
    pub(crate) const STREAMS: usize = 4;
    /// A request this far past a stream's end still continues it (pages in
    /// between may be present, or zero, and never fault).
    pub(crate) const GAP: u64 = 16;

    /// Read-ahead over units `[0, units)`.
    pub(crate) fn new(units: u64) -> Self {
        Readahead {
            units,
            streams: Vec::with_capacity(Self::STREAMS),
            clock: 0,
        }
    }

    /// A request for unit `p`; `sent_ahead` says whether `p` already went
    /// out on this connection (read ahead). Returns the units to send ahead
    /// now (possibly none), after `p` if it needs an answer.
    pub(crate) fn on_request(&mut self, p: u64, sent_ahead: bool) -> Range<u64> {
        self.clock += 1;
        let clock = self.clock;
        let units = self.units;
        let found = self
            .streams
            .iter_mut()
            .find(|s| p > s.last && p <= s.end.max(s.last + 1) + Self::GAP);
        let Some(s) = found else {
            // A new stream: nothing ahead yet.
            let new = Stream {
                last: p,
                end: p + 1,
                marker: p + 1,
                window: 0,
                used: clock,
            };
            if self.streams.len() < Self::STREAMS {
                self.streams.push(new);
            } else if let Some(lru) = self.streams.iter_mut().min_by_key(|s| s.used) {
                *lru = new;
            }
            return 0..0;
        };
        s.last = p;
        s.used = clock;
        let start = if sent_ahead {
            // The guest reached the window in flight: the next one goes
            // once it is past the marker.
            if p < s.marker {
                return 0..0;
            }
            s.end
        } else {
            // Past what was sent: read ahead from here.
            p + 1
        };
        s.window = if s.window == 0 {
            Self::MIN_WINDOW
        } else {
            (s.window * 2).min(Self::MAX_WINDOW)
        };
        let end = start.saturating_add(s.window).min(units);
        s.end = end.max(s.end);
        s.marker = start + s.window / 2;
        start.min(end)..end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_requests_get_no_window() {
        let mut r = Readahead::new(1 << 20);
        for p in [5000, 90, 70_000, 12, 400_000, 3] {
            assert!(r.on_request(p, false).is_empty(), "{p}");
        }
    }

    #[test]
    fn a_sweep_gets_doubling_windows_sent_from_the_marker() {
        let mut r = Readahead::new(1 << 20);
        assert!(r.on_request(100, false).is_empty());
        // The next page: a stream.
        assert_eq!(r.on_request(101, false), 102..106);
        // Inside the window, before the marker (104): already on its way.
        assert!(r.on_request(102, true).is_empty());
        assert!(r.on_request(103, true).is_empty());
        // At the marker: the next window, twice as long, from its end.
        assert_eq!(r.on_request(104, true), 106..114);
        assert!(r.on_request(105, true).is_empty());
        assert_eq!(r.on_request(110, true), 114..130);
        // Windows stop growing at the maximum.
        let mut last = 114..130;
        let mut p = 122;
        for _ in 0..6 {
            let next = r.on_request(p, true);
            assert_eq!(next.start, last.end);
            assert!(next.end - next.start <= Readahead::MAX_WINDOW);
            p = next.start + (next.end - next.start) / 2;
            last = next;
        }
        assert_eq!(last.end - last.start, Readahead::MAX_WINDOW);
        // A miss just past the end (a page the window skipped) carries on
        // the stream with a window from there.
        let after = r.on_request(last.end + 3, false);
        assert_eq!(after.start, last.end + 4);
        assert_eq!(after.end - after.start, Readahead::MAX_WINDOW);
    }

    #[test]
    fn interleaved_streams_are_followed_apart() {
        let mut r = Readahead::new(1 << 20);
        assert!(r.on_request(1000, false).is_empty());
        assert!(r.on_request(50_000, false).is_empty());
        assert_eq!(r.on_request(1001, false), 1002..1006);
        assert_eq!(r.on_request(50_001, false), 50_002..50_006);
        assert_eq!(r.on_request(1004, true), 1006..1014);
        assert_eq!(r.on_request(50_004, true), 50_006..50_014);
        // A fifth stream replaces the least recently used one.
        for p in [7, 300_000, 600_000] {
            assert!(r.on_request(p, false).is_empty());
        }
        assert!(r.streams.len() == Readahead::STREAMS);
        assert!(r.streams.iter().all(|s| s.last != 1004), "{:?}", r.streams);
    }

    #[test]
    fn windows_end_at_the_last_unit() {
        let mut r = Readahead::new(103);
        assert!(r.on_request(100, false).is_empty());
        assert_eq!(r.on_request(101, false), 102..103);
        assert!(r.on_request(102, true).is_empty());
        // Past the last unit: nothing to send.
        assert!(r.on_request(104, false).is_empty());
    }
}
