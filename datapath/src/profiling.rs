//! Profiling a running guest for the planner: for `n` intervals of `tau`,
//! which pages it writes (the source backend's dirty log), which it reads
//! (MINOR-fault sampling, [`ReadSampler`](crate::uffd::ReadSampler)), and
//! which disk chunks it reads, writes and overwrites in whole blocks (the
//! NBD request stream, [`ChunkLog`](crate::storage::ChunkLog)); written in
//! the planner's profile format (`model.md`).
//!
//! # Reads of pages
//!
//! Each interval watches one slice of guest RAM: with `read_slices = k`,
//! interval `i` watches pages whose index falls in slice `i mod k` (of `k`
//! equal, contiguous slices). The guest's first access to a watched page in
//! the interval costs it one MINOR fault (tens of microseconds); the other
//! pages cost nothing. A page is counted as *read* in a watched interval
//! when it was accessed and not written in it (a write is its own event; a
//! page both read and written in one interval counts as written only, so
//! `r + w` never counts one access twice). Each page is watched in `m ~ n /
//! k` of the `n` intervals, and its read count is scaled to the profile's
//! `n`: `r = round(r_watched * n / m)`. `k = 1` watches everything every
//! interval (exact, costliest); the guest's cost falls as `1 / k`.
//! Backends that cannot sample reads (or `read_slices = 0`) fall back to
//! `r = w` and say so.

use std::path::Path;
use std::time::{Duration, Instant};

use wanmig_planner::profile::{ProfileHeader, ProfileWriter, UnitCounters};

use crate::backend::{BackendError, SourceBackend};
use crate::engine::source::page_bitmap;
use crate::planning::{PlanningError, profile_err};

/// How to profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileOptions {
    /// Intervals (`n`).
    pub samples: u32,
    /// Interval length (`tau`).
    pub interval: Duration,
    /// Slices of RAM watched in turn for reads (see the module docs); 0:
    /// do not sample reads.
    pub read_slices: u32,
    /// The device-state estimate the profile records (bytes).
    pub state_bytes: u64,
}

impl ProfileOptions {
    /// Default read slices: each interval watches a quarter of RAM.
    pub const DEFAULT_READ_SLICES: u32 = 4;

    /// `samples` intervals of `interval`, reads sampled with the default
    /// slices.
    pub fn new(samples: u32, interval: Duration, state_bytes: u64) -> Self {
        ProfileOptions {
            samples,
            interval,
            read_slices: Self::DEFAULT_READ_SLICES,
            state_bytes,
        }
    }
}

/// What a profile of the running guest saw.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ProfileStats {
    /// Intervals.
    pub samples: u32,
    /// Interval length, s.
    pub interval_s: f64,
    /// Pages written at least once.
    pub pages_written: u64,
    /// Page-intervals with a write (sum of `w`).
    pub write_events: u64,
    /// Reads of pages were sampled (else `r = w`).
    pub reads_sampled: bool,
    /// Slices watched in turn for reads.
    pub read_slices: u32,
    /// Pages with `r > 0`.
    pub pages_read: u64,
    /// Watched page-intervals with an access (the MINOR faults the guest
    /// paid for).
    pub read_faults: u64,
    /// Chunks of the guest's disks (0 without disks).
    pub chunks: u64,
    /// Chunks read at least once.
    pub chunks_read: u64,
    /// Chunks written at least once.
    pub chunks_written: u64,
    /// Chunk-intervals whose writes were whole-block overwrites (sum of `o`).
    pub chunk_overwrites: u64,
}

impl ProfileStats {
    /// One line for a report's plan origin.
    pub fn describe(&self) -> String {
        let reads = if self.reads_sampled {
            format!(
                "{} read (sampled, 1/{} of RAM per interval)",
                self.pages_read, self.read_slices
            )
        } else {
            "reads not sampled, assumed where writes are".to_string()
        };
        let mut s = format!(
            "profiling for {} x {:.2} s ({} pages written, {reads}",
            self.samples, self.interval_s, self.pages_written
        );
        if self.chunks > 0 {
            s.push_str(&format!(
                "; {} of {} chunks read, {} written",
                self.chunks_read, self.chunks, self.chunks_written
            ));
        }
        s.push(')');
        s
    }
}

/// A unit's interval counts while profiling.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    r: u16,
    w: u16,
    o: u16,
}

/// The slice of `pages` watched in interval `i` (0-based) of `k` slices:
/// `(first, count)`.
fn slice(pages: u64, k: u32, i: u32) -> (u64, u64) {
    let k = u64::from(k.max(1));
    let s = u64::from(i) % k;
    let first = pages * s / k;
    (first, pages * (s + 1) / k - first)
}

/// Profiles the running guest as `opts` says and writes the profile to
/// `out` (see the module docs).
pub fn profile_guest(
    backend: &mut dyn SourceBackend,
    opts: &ProfileOptions,
    out: &Path,
) -> Result<ProfileStats, PlanningError> {
    let (samples, interval) = (opts.samples, opts.interval);
    let pages = backend.page_count();
    let ps = backend.page_size();
    let disks = backend.disks();
    let chunks = disks.as_ref().map_or(0, |d| d.space().chunks());
    let mut tally = vec![Tally::default(); pages as usize];
    let mut chunk_tally = vec![Tally::default(); chunks as usize];
    let mut dirty = page_bitmap(pages, ps);
    let mut touched = page_bitmap(pages, ps);
    let k = opts.read_slices;
    if k > samples {
        return Err(PlanningError::Planner(format!(
            "{k} read slices need at least {k} samples, not {samples}"
        )));
    }
    backend.dirty_log_start()?;
    let sampling = k > 0 && backend.read_sampling_start()?;
    let result = (|| {
        if sampling {
            let (first, count) = slice(pages, k, 0);
            backend.read_sampling_interval(&mut touched, first, count)?;
            touched.clear();
        }
        if let Some(d) = &disks {
            // What the guest did before the first interval is not in it.
            d.take_interval(|_, _| {});
        }
        let mut read_faults = 0u64;
        let start = Instant::now();
        for i in 1..=samples {
            let due = start + interval * i;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            dirty.clear();
            backend.dirty_log_collect(&mut dirty)?;
            if sampling {
                let (next_first, next_count) = slice(pages, k, i);
                backend.read_sampling_interval(&mut touched, next_first, next_count)?;
                let (first, count) = slice(pages, k, i - 1);
                for p in touched
                    .iter_set()
                    .filter(|&p| p >= first && p < first + count)
                {
                    read_faults += 1;
                    if !dirty.get(p) {
                        tally[p as usize].r += 1;
                    }
                }
                touched.clear();
            }
            for p in dirty.iter_set() {
                if let Some(t) = tally.get_mut(p as usize) {
                    t.w = t.w.saturating_add(1);
                }
            }
            if let Some(d) = &disks {
                d.take_interval(|c, what| {
                    let t = &mut chunk_tally[c as usize];
                    t.r += u16::from(what.read);
                    t.w += u16::from(what.written);
                    t.o += u16::from(what.overwritten);
                });
            }
        }
        Ok::<_, BackendError>(read_faults)
    })();
    // Whatever happened, the guest must not be left with MINOR faults no
    // one serves.
    let stopped = if sampling {
        backend.read_sampling_stop()
    } else {
        Ok(())
    };
    let read_faults = result?;
    stopped?;
    // Each page's watched intervals: its slice came up in `m` of them.
    let watched = |p: u64| -> u32 {
        (0..samples)
            .filter(|&i| {
                let (first, count) = slice(pages, k, i);
                p >= first && p < first + count
            })
            .count() as u32
    };
    let mut watched_by_slice = Vec::new();
    if sampling {
        for s in 0..k {
            let (first, _) = slice(pages, k, s);
            watched_by_slice.push((first, watched(first)));
        }
    }
    let scale = |p: u64, r: u16| -> u32 {
        // The slice holding p: the last whose first page is <= p.
        let m = watched_by_slice
            .iter()
            .rev()
            .find(|&&(first, _)| first <= p)
            .map_or(samples, |&(_, m)| m);
        if m == 0 {
            return 0;
        }
        ((f64::from(r) * f64::from(samples) / f64::from(m)).round() as u32).min(samples)
    };
    // Zero at the end: never populated, or populated and all zero (the
    // engine never fetches either).
    let mut populated = page_bitmap(pages, ps);
    for (first, count) in backend.populated_runs()? {
        populated.set_range(first, count);
    }
    let mem = backend.memory();
    let mut page = vec![0u8; ps];
    for p in 0..pages {
        if populated.get(p) {
            mem.copy_page(p, &mut page);
            if crate::wire::is_zero(&page) {
                populated.unset(p);
            }
        }
    }
    // Chunks that hold no data (holes of a sparse image) are zero; chunks
    // with data are not read to find zeros (a TiB disk would take minutes).
    let with_data = match &disks {
        Some(d) => d
            .chunks_with_data()
            .map_err(|e| PlanningError::Backend(BackendError::new("profile", "disk extents", e)))?,
        None => Vec::new(),
    };
    let header = ProfileHeader {
        samples,
        interval_ns: interval.as_nanos() as u64,
        page_size: ps as u32,
        chunk_size: disks
            .as_ref()
            .map_or(crate::storage::DEFAULT_CHUNK_SIZE, |d| {
                d.space().chunk_size()
            }) as u32,
        page_count: pages,
        chunk_count: chunks,
        state_bytes: opts.state_bytes,
    };
    let err = profile_err(out);
    let mut writer = ProfileWriter::create(out, &header).map_err(|e| err(e.to_string()))?;
    let mut stats = ProfileStats {
        samples,
        interval_s: interval.as_secs_f64(),
        pages_written: 0,
        write_events: 0,
        reads_sampled: sampling,
        read_slices: if sampling { k } else { 0 },
        pages_read: 0,
        read_faults,
        chunks,
        chunks_read: 0,
        chunks_written: 0,
        chunk_overwrites: 0,
    };
    for (p, t) in tally.iter().enumerate() {
        let w = u32::from(t.w);
        // Without sampling, a page is assumed read where it is written.
        let r = if sampling { scale(p as u64, t.r) } else { w };
        stats.pages_written += u64::from(w > 0);
        stats.pages_read += u64::from(r > 0);
        stats.write_events += u64::from(w);
        writer
            .push_page(UnitCounters {
                r,
                w,
                o: 0,
                zero: !populated.get(p as u64) && w == 0 && r == 0,
            })
            .map_err(|e| err(e.to_string()))?;
    }
    for (c, t) in chunk_tally.iter().enumerate() {
        stats.chunks_read += u64::from(t.r > 0);
        stats.chunks_written += u64::from(t.w > 0);
        stats.chunk_overwrites += u64::from(t.o);
        writer
            .push_chunk(UnitCounters {
                r: t.r.into(),
                w: t.w.into(),
                o: t.o.into(),
                zero: !with_data[c] && t.w == 0,
            })
            .map_err(|e| err(e.to_string()))?;
    }
    writer.finish().map_err(|e| err(e.to_string()))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_every_page_once_in_turn() {
        for (pages, k) in [(10u64, 3u32), (65536, 4), (7, 7), (5, 1)] {
            let mut seen = vec![0u32; pages as usize];
            for i in 0..k {
                let (first, count) = slice(pages, k, i);
                for p in first..first + count {
                    seen[p as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{pages} pages, {k} slices");
            assert_eq!(slice(pages, k, k), slice(pages, k, 0), "in turn");
        }
    }
}
