//! Profiling a running guest for the planner: for `n` intervals of `tau`,
//! which pages it writes (the source backend's dirty log), which it reads
//! (MINOR-fault sampling, [`ReadSampler`](crate::uffd::ReadSampler)), and
//! which disk chunks it reads, writes and overwrites in whole blocks (the
//! NBD request stream, [`ChunkLog`](crate::storage::ChunkLog)); written in
//! the planner's profile format (`model.md`).
//!
//! # Reads of pages
//!
//! Each interval watches a window of guest RAM: the guest's first access to
//! a watched page in the interval costs it one MINOR fault (50-60 us on
//! this 2-core VM with the fault thread spinning; `wanmig-bench
//! profile-overhead` measures it), the other pages cost nothing. A page is
//! counted as *read* in a watched interval when it was accessed and not
//! written in it (a write is its own event; a page both read and written in
//! one interval counts as written only, so `r + w` never counts one access
//! twice).
//!
//! The window is budgeted: the guest may lose at most `read_budget` of its
//! time to these faults (default 5 %), i.e. at most `budget x tau /
//! fault_cost` faults per interval. The window is the next stretch of a
//! fixed permutation of RAM's pages (a stride coprime with the page count,
//! near `pages / phi`), so every window is a scattered sample of all of RAM
//! and its access density a steady estimate of the next one's: it starts
//! one page per allowed fault, then each interval is sized from the density
//! the last one saw (at most 4x larger), and the permutation wraps, so all
//! of RAM is watched in turn as far as the budget allows. Each
//! page's read count is scaled from the `m` intervals it was watched to the
//! profile's `n`: `r = round(r_watched x n / m)`. A page never watched (a
//! busy guest, a short profile) draws its `r` from the watched pages with
//! the same `w` (see `ReadImputation`); the stats say how much of RAM was
//! covered. `read_budget = None` does not sample reads
//! (`r = w` for every page), `Some(f64::INFINITY)` watches all of RAM every
//! interval (exact, and as costly as the guest's working set makes it).
//! Backends that cannot sample reads fall back to `r = w` and say so.

use std::path::Path;
use std::time::{Duration, Instant};

use wanmig_planner::profile::{ProfileHeader, ProfileWriter, UnitCounters};

use crate::backend::{BackendError, SourceBackend};
use crate::engine::source::page_bitmap;
use crate::planning::{PlanningError, WireRatios, profile_err};

/// How to profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileOptions {
    /// Intervals (`n`).
    pub samples: u32,
    /// Interval length (`tau`).
    pub interval: Duration,
    /// The share of the guest's time read sampling may cost it (see the
    /// module docs); `None`: do not sample reads.
    pub read_budget: Option<f64>,
    /// What one MINOR fault costs the guest, for the budget.
    pub fault_cost: Duration,
    /// The device-state estimate the profile records (bytes).
    pub state_bytes: u64,
}

impl ProfileOptions {
    /// Default read budget: 5 % of the guest's time.
    pub const DEFAULT_READ_BUDGET: f64 = 0.05;
    /// Default cost of one MINOR fault to the guest, for the budget: 50-60
    /// us measured with `wanmig-bench profile-overhead` on a 2-core VM
    /// (sysbench memory reading 32 MiB), rounded up so the default budget
    /// holds with a margin.
    pub const DEFAULT_FAULT_COST: Duration = Duration::from_micros(75);

    /// `samples` intervals of `interval`, reads sampled within the default
    /// budget.
    pub fn new(samples: u32, interval: Duration, state_bytes: u64) -> Self {
        ProfileOptions {
            samples,
            interval,
            read_budget: Some(Self::DEFAULT_READ_BUDGET),
            fault_cost: Self::DEFAULT_FAULT_COST,
            state_bytes,
        }
    }

    /// Parses a read budget as the commands take it: a share of the
    /// guest's time in (0, 1], `0` (do not sample reads: `None`) or `all`
    /// (all of RAM every interval: infinite).
    pub fn parse_read_budget(s: &str) -> Result<Option<f64>, String> {
        if s == "all" {
            return Ok(Some(f64::INFINITY));
        }
        match s.parse::<f64>() {
            Ok(0.0) => Ok(None),
            Ok(b) if b > 0.0 && b <= 1.0 => Ok(Some(b)),
            _ => Err(format!(
                "{s:?}: a share of the guest's time (0..=1), 0 or \"all\""
            )),
        }
    }

    /// Faults allowed per interval (at least one page).
    fn faults_per_interval(&self) -> f64 {
        match self.read_budget {
            None => 0.0,
            Some(b) => {
                (b * self.interval.as_secs_f64() / self.fault_cost.as_secs_f64().max(1e-9)).max(1.0)
            }
        }
    }
}

/// What a profile of the running guest saw.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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
    /// Pages with `r > 0`.
    pub pages_read: u64,
    /// Watched page-intervals with an access (the MINOR faults the guest
    /// paid for).
    pub read_faults: u64,
    /// Page-intervals watched.
    pub pages_watched: u64,
    /// Share of RAM watched in at least one interval (the rest fell back to
    /// `r = w`).
    pub read_coverage: f64,
    /// Chunks of the guest's disks (0 without disks).
    pub chunks: u64,
    /// Chunks read at least once.
    pub chunks_read: u64,
    /// Chunks written at least once.
    pub chunks_written: u64,
    /// Chunk-intervals whose writes were whole-block overwrites (sum of `o`).
    pub chunk_overwrites: u64,
    /// Why reads could not be sampled, if they were to be and were not.
    pub read_sampling_error: Option<String>,
    /// How the guest's content compresses on the wire: raw bytes over
    /// frame bytes (LZ4 and headers, as the engine sends them) of a
    /// scattered sample of the units of each kind the guest wrote while
    /// profiled and of the others with data (up to 16 MiB of each set).
    pub wire: WireRatios,
}

impl ProfileStats {
    /// The ratios the planner plans the link with.
    pub fn wire_ratios(&self) -> WireRatios {
        self.wire
    }

    /// One line for a report's plan origin.
    pub fn describe(&self) -> String {
        let reads = if self.reads_sampled {
            format!(
                "{} read (sampled on {:.0} % of RAM)",
                self.pages_read,
                self.read_coverage * 100.0
            )
        } else if let Some(e) = &self.read_sampling_error {
            format!("reads not sampled ({e}), assumed where writes are")
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
        s.push_str(&format!("; {})", self.wire.describe(self.chunks > 0)));
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

/// A fixed permutation of `[0, pages)`: `j -> (j x stride) mod pages`,
/// `stride` coprime with `pages` and near `pages / phi` (consecutive
/// entries land far apart).
#[derive(Debug, Clone, Copy)]
struct Permutation {
    pages: u64,
    stride: u64,
}

impl Permutation {
    fn new(pages: u64) -> Self {
        fn gcd(a: u64, b: u64) -> u64 {
            if b == 0 { a } else { gcd(b, a % b) }
        }
        let mut stride = ((pages as f64 / 1.618_033_988_75) as u64).max(1);
        while pages > 1 && gcd(stride, pages) != 1 {
            stride += 1;
        }
        Permutation { pages, stride }
    }

    /// Entries `[from, from + count)` (wrapping), at most all pages.
    fn window(&self, from: u64, count: u64) -> Vec<u64> {
        let n = self.pages.max(1);
        (from..from + count.min(self.pages))
            .map(|j| ((u128::from(j % n) * u128::from(self.stride)) % u128::from(n)) as u64)
            .collect()
    }
}

/// Read counts for pages the budget never let the sampler watch: for each
/// write count `w`, the distribution of `r` among the watched pages with
/// that `w` (or among all watched pages, if none had it); an unwatched page
/// draws from it by a hash of its index. The profile's classes (what the
/// model integrates) then keep the watched pages' proportions, where
/// assuming "no reads" would bias every unwatched read-only page to cold.
/// Without any watched page, `r = w`.
struct ReadImputation {
    /// `by_w[w][r]`: watched pages with those counts.
    by_w: Vec<Vec<u64>>,
    all: Vec<u64>,
}

impl ReadImputation {
    fn new(samples: u32, watched: impl Iterator<Item = (u32, u32)>) -> Self {
        let n = samples as usize + 1;
        let mut by_w = vec![vec![0u64; n]; n];
        let mut all = vec![0u64; n];
        for (w, r) in watched {
            let (w, r) = ((w as usize).min(n - 1), (r as usize).min(n - 1));
            by_w[w][r] += 1;
            all[r] += 1;
        }
        ReadImputation { by_w, all }
    }

    fn draw(&self, w: u32, page: u64) -> u32 {
        let hist = match self.by_w.get(w as usize) {
            Some(h) if h.iter().any(|&c| c > 0) => h,
            _ if self.all.iter().any(|&c| c > 0) => &self.all,
            _ => return w,
        };
        let total: u64 = hist.iter().sum();
        // A fixed, well-mixed hash of the page (splitmix64).
        let mut x = page.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        let mut at = x % total;
        for (r, &c) in hist.iter().enumerate() {
            if at < c {
                return r as u32;
            }
            at -= c;
        }
        unreachable!("at < total")
    }
}

/// Unit bytes sampled for each of [`ProfileStats::wire`]'s ratios (4096
/// pages, 256 chunks of 64 KiB).
const RATIO_SAMPLE_BYTES: u64 = 16 << 20;

/// Fewer units of a set than this: its ratio is its kind's whole.
const RATIO_MIN_SAMPLE: u64 = 64;

/// Raw bytes over frame bytes of `candidates`, at most
/// [`RATIO_SAMPLE_BYTES`] of them spread over the set, each read by
/// `read(unit, buffer)` (`false`: unreadable, skipped) and encoded as the
/// engine sends it (LZ4); `None` with fewer than `min` candidates or
/// nothing read.
fn wire_ratio(
    kind: crate::wire::UnitKind,
    unit_size: usize,
    candidates: &[u64],
    min: u64,
    mut read: impl FnMut(u64, &mut Vec<u8>) -> bool,
) -> Option<f64> {
    use crate::wire::{Compression, encode_buffer_len, encode_unit};
    let have = candidates.len() as u64;
    if have < min.max(1) || unit_size == 0 {
        return None;
    }
    let sample = (RATIO_SAMPLE_BYTES / unit_size as u64).max(1);
    let step = have.div_ceil(sample).max(1) as usize;
    let (mut raw, mut wire) = (0u64, 0u64);
    let mut unit = vec![0u8; unit_size];
    let mut out = vec![0u8; encode_buffer_len(unit_size, Compression::Lz4)];
    for &u in candidates.iter().step_by(step) {
        if !read(u, &mut unit) || unit.is_empty() {
            continue;
        }
        if let Ok(e) = encode_unit(&mut out, kind, u, &unit, Compression::Lz4) {
            raw += unit.len() as u64;
            wire += e.len as u64;
        }
    }
    (wire > 0).then(|| raw as f64 / wire as f64)
}

/// The `(written, unwritten)` ratios of one kind's `units` (non-zero pages
/// or chunks with data), split by whether the profile saw them `written`.
/// A set with fewer than [`RATIO_MIN_SAMPLE`] units takes the kind's whole
/// ratio, and a kind with nothing to sample 1.
fn written_and_unwritten_ratios(
    kind: crate::wire::UnitKind,
    unit_size: usize,
    units: &[u64],
    written: impl Fn(u64) -> bool,
    mut read: impl FnMut(u64, &mut Vec<u8>) -> bool,
) -> (f64, f64) {
    let (w, u): (Vec<u64>, Vec<u64>) = units.iter().partition(|&&i| written(i));
    let written = wire_ratio(kind, unit_size, &w, RATIO_MIN_SAMPLE, &mut read);
    let unwritten = wire_ratio(kind, unit_size, &u, RATIO_MIN_SAMPLE, &mut read);
    // The whole kind is sampled only for a set too small to stand alone.
    let whole = match (written, unwritten) {
        (Some(_), Some(_)) => 1.0,
        _ => wire_ratio(kind, unit_size, units, 1, &mut read).unwrap_or(1.0),
    };
    (written.unwrap_or(whole), unwritten.unwrap_or(whole))
}

/// [`WireRatios`] of the guest as it is now: its `pages` (non-zero) and
/// `chunks` (with data), split by what `page_written` and `chunk_written`
/// say the profile saw.
fn measure_wire_ratios(
    backend: &dyn SourceBackend,
    pages: &[u64],
    page_written: impl Fn(u64) -> bool,
    chunks: &[u64],
    chunk_written: impl Fn(u64) -> bool,
) -> WireRatios {
    let mem = backend.memory();
    let disks = backend.disks();
    let (page_written, page_unwritten) = written_and_unwritten_ratios(
        crate::wire::UnitKind::Page,
        backend.page_size(),
        pages,
        page_written,
        |p, buf| mem.copy_page(p, buf).is_ok(),
    );
    let chunk_size = disks
        .as_ref()
        .map_or(0, |d| d.space().chunk_size() as usize);
    let (chunk_written, chunk_unwritten) = written_and_unwritten_ratios(
        crate::wire::UnitKind::Chunk,
        chunk_size,
        chunks,
        chunk_written,
        |c, buf| disks.as_ref().is_some_and(|d| d.read(c, buf).is_ok()),
    );
    WireRatios {
        page_written,
        page_unwritten,
        chunk_written,
        chunk_unwritten,
    }
}

/// [`WireRatios`] for planning from a profile taken earlier (`wanmig
/// profile`): the guest's content as it is now, split by what the profile
/// saw written (at most 16 MiB of each set read and compressed).
pub fn wire_ratios_for_profile(
    backend: &dyn SourceBackend,
    profile: &wanmig_planner::profile::Profile,
) -> Result<WireRatios, PlanningError> {
    use wanmig_planner::profile::Kind;
    let err = profile_err(profile.path());
    let units = |kind: Kind, limit: u64| {
        let (mut nonzero, written) = (Vec::new(), crate::bits::AtomicBitmap::new(limit));
        profile
            .for_each(kind, |i, c| {
                if i < limit && !c.zero {
                    nonzero.push(i);
                    if c.w > 0 {
                        written.set(i);
                    }
                }
            })
            .map(|()| (nonzero, written))
            .map_err(|e| err(e.to_string()))
    };
    let chunks = backend.disks().map_or(0, |d| d.space().chunks());
    let (pages, pages_written) = units(Kind::Page, backend.page_count())?;
    let (chunks, chunks_written) = units(Kind::Chunk, chunks)?;
    Ok(measure_wire_ratios(
        backend,
        &pages,
        |p| pages_written.get(p),
        &chunks,
        |c| chunks_written.get(c),
    ))
}

/// The next window's length: as many pages as the budget allows at the
/// access density the last window saw.
fn next_count(pages: u64, allowed: f64, watched: u64, faults: u64) -> u64 {
    // Unknown density (nothing watched): assume every page is touched.
    let density = if watched == 0 {
        1.0
    } else {
        (faults as f64 / watched as f64).max(1.0 / watched as f64)
    };
    let grow = if watched == 0 {
        u64::MAX
    } else {
        watched.saturating_mul(4)
    };
    ((allowed / density) as u64)
        .min(grow)
        .clamp(1, pages.max(1))
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
    let allowed = opts.faults_per_interval();
    backend.dirty_log_start()?;
    // A backend that cannot sample (a QEMU whose preload library did not
    // negotiate MINOR faults, say) still gives a write profile.
    let mut read_sampling_error = None;
    let sampling = opts.read_budget.is_some()
        && pages > 0
        && backend.read_sampling_start().unwrap_or_else(|e| {
            read_sampling_error = Some(crate::error_chain(&e));
            false
        });
    // Per page: intervals watched, and of those, read.
    let mut watched = vec![0u16; if sampling { pages as usize } else { 0 }];
    let perm = Permutation::new(pages);
    let mut cursor = 0u64;
    let mut window = perm.window(cursor, next_count(pages, allowed, 0, 0));
    let mut read_faults = 0u64;
    let mut pages_watched = 0u64;
    let result = (|| {
        if sampling {
            backend.read_sampling_interval(&mut touched, &window)?;
            touched.clear();
        }
        if let Some(d) = &disks {
            // What the guest did before the first interval is not in it.
            d.take_interval(|_, _| {});
        }
        let start = Instant::now();
        for i in 1..=samples {
            let due = start + interval * i;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            dirty.clear();
            backend.dirty_log_collect(&mut dirty)?;
            if sampling {
                // Take this interval's accesses; the next window (sized
                // from them) is watched from just below.
                backend.read_sampling_interval(&mut touched, &[])?;
                let mut faults = 0u64;
                for &p in &window {
                    watched[p as usize] += 1;
                    if touched.get(p) {
                        faults += 1;
                        if !dirty.get(p) {
                            tally[p as usize].r += 1;
                        }
                    }
                }
                touched.clear();
                read_faults += faults;
                let n = window.len() as u64;
                pages_watched += n;
                if i < samples {
                    cursor += n;
                    window = perm.window(cursor, next_count(pages, allowed, n, faults));
                    backend.read_sampling_interval(&mut touched, &window)?;
                    touched.clear();
                }
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
        Ok::<_, BackendError>(())
    })();
    // Whatever happened, the guest must not be left with MINOR faults no
    // one serves.
    let stopped = if sampling {
        backend.read_sampling_stop()
    } else {
        Ok(())
    };
    result?;
    stopped?;
    let scale = |m: u16, r: u16| -> u32 {
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
            mem.copy_page(p, &mut page)?;
            if crate::wire::is_zero(&page) {
                populated.unset(p);
            }
        }
    }
    let nonzero: Vec<u64> = populated.iter_set().filter(|&p| p < pages).collect();
    // Chunks that hold no data (holes of a sparse image) are zero; chunks
    // with data are not read to find zeros (a TiB disk would take minutes).
    let with_data = match &disks {
        Some(d) => d
            .chunks_with_data()
            .map_err(|e| PlanningError::Backend(BackendError::new("profile", "disk extents", e)))?,
        None => Vec::new(),
    };
    let chunk_size = disks
        .as_ref()
        .map_or(crate::storage::DEFAULT_CHUNK_SIZE, |d| {
            d.space().chunk_size()
        });
    let data_chunks: Vec<u64> = (0..chunks).filter(|&c| with_data[c as usize]).collect();
    let wire = measure_wire_ratios(
        backend,
        &nonzero,
        |p| tally[p as usize].w > 0,
        &data_chunks,
        |c| chunk_tally[c as usize].w > 0,
    );
    let header = ProfileHeader {
        samples,
        interval_ns: interval.as_nanos() as u64,
        page_size: ps as u32,
        chunk_size: chunk_size as u32,
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
        pages_read: 0,
        read_faults,
        pages_watched,
        read_coverage: if sampling {
            watched.iter().filter(|&&m| m > 0).count() as f64 / pages.max(1) as f64
        } else {
            0.0
        },
        chunks,
        chunks_read: 0,
        chunks_written: 0,
        chunk_overwrites: 0,
        read_sampling_error,
        wire,
    };
    let reads = ReadImputation::new(
        samples,
        tally
            .iter()
            .zip(&watched)
            .filter(|&(_, &m)| m > 0)
            .map(|(t, &m)| (u32::from(t.w), scale(m, t.r))),
    );
    for (p, t) in tally.iter().enumerate() {
        let w = u32::from(t.w);
        let r = match watched.get(p) {
            Some(&m) if m > 0 => scale(m, t.r),
            // Never watched: drawn from what the watched pages with the
            // same writes showed (see `ReadImputation`); a page never
            // populated reads as zero, never fetched.
            Some(_) if populated.get(p as u64) || w > 0 => reads.draw(w, p as u64),
            Some(_) => 0,
            // Reads not sampled.
            None => w,
        };
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
    fn the_permutation_visits_every_page_once_per_turn_scattered() {
        for pages in [1u64, 2, 10, 4096, 65536, 65537, 1 << 20] {
            let p = Permutation::new(pages);
            let all = p.window(0, pages);
            let mut sorted = all.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..pages).collect::<Vec<_>>(), "{pages} pages");
            // Wraps: the next turn is the same order.
            assert_eq!(p.window(pages, pages.min(5)), all[..pages.min(5) as usize]);
            // At most all pages in one window.
            assert_eq!(p.window(3, 2 * pages).len() as u64, pages);
            if pages >= 4096 {
                // Scattered: a window of 1/8 of RAM touches every eighth.
                let w = p.window(17, pages / 8);
                let eighths: std::collections::BTreeSet<u64> =
                    w.iter().map(|&x| x * 8 / pages).collect();
                assert_eq!(eighths.len(), 8, "{pages} pages");
            }
        }
    }

    #[test]
    fn unwatched_pages_draw_reads_in_the_watched_pages_proportions() {
        // Watched: pages with w = 0 are read in every interval 1 time in 4;
        // pages with w = 2 always read in 10 of 20.
        let watched = (0..4000)
            .map(|i| (0, if i % 4 == 0 { 20 } else { 0 }))
            .chain((0..1000).map(|_| (2, 10)));
        let imp = ReadImputation::new(20, watched);
        let drawn: Vec<u32> = (0..40_000).map(|p| imp.draw(0, p)).collect();
        let read = drawn.iter().filter(|&&r| r == 20).count() as f64 / drawn.len() as f64;
        assert!((read - 0.25).abs() < 0.01, "{read}");
        assert!(drawn.iter().all(|&r| r == 0 || r == 20));
        assert!((0..100).all(|p| imp.draw(2, p) == 10));
        assert_eq!(imp.draw(0, 17), imp.draw(0, 17), "fixed per page");
        // A write count no watched page had: all watched pages.
        let r7: Vec<u32> = (0..1000).map(|p| imp.draw(7, p)).collect();
        assert!(r7.contains(&10) && r7.contains(&0));
        // Nothing watched: r = w.
        let none = ReadImputation::new(20, std::iter::empty());
        assert_eq!(none.draw(3, 5), 3);
    }

    #[test]
    fn read_budgets_parse_as_the_commands_take_them() {
        let p = ProfileOptions::parse_read_budget;
        assert_eq!(p("0.05"), Ok(Some(0.05)));
        assert_eq!(p("1"), Ok(Some(1.0)));
        assert_eq!(p("0"), Ok(None));
        assert_eq!(p("all"), Ok(Some(f64::INFINITY)));
        for bad in ["1.5", "-0.1", "half", "NaN"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_window_is_sized_to_the_fault_budget() {
        // 5 % of 250 ms at 50 us a fault: 250 faults an interval.
        let o = ProfileOptions {
            fault_cost: Duration::from_micros(50),
            ..ProfileOptions::new(20, Duration::from_millis(250), 0)
        };
        assert!((o.faults_per_interval() - 250.0).abs() < 1e-6);
        // Unknown density: one page per allowed fault.
        assert_eq!(next_count(65536, 250.0, 0, 0), 250);
        // Every other watched page touched: twice as many pages.
        assert_eq!(next_count(65536, 250.0, 1000, 500), 500);
        // Nothing touched: as if one page were, at most 4x larger, capped
        // at all of RAM.
        assert_eq!(next_count(65536, 250.0, 1000, 0), 4000);
        assert_eq!(next_count(65536, 250.0, 100_000, 0), 65536);
        // No budget: nothing watched.
        let off = ProfileOptions {
            read_budget: None,
            ..o
        };
        assert_eq!(off.faults_per_interval(), 0.0);
        let all = ProfileOptions {
            read_budget: Some(f64::INFINITY),
            ..o
        };
        let inf = all.faults_per_interval();
        assert_eq!(next_count(65536, inf, 0, 0), 65536, "all of RAM at once");
        assert_eq!(next_count(65536, inf, 65536, 65536), 65536, "and again");
    }

    /// Unit `index` of `len` bytes: even units random (incompressible),
    /// odd units a repeated word.
    fn halves(index: u64, out: &mut [u8]) {
        let mut x = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for (i, b) in out.iter_mut().enumerate() {
            *b = if index % 2 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                (i % 8) as u8
            };
        }
    }

    // The sampler's reader signature (a chunk reader resizes the buffer).
    #[allow(clippy::ptr_arg)]
    fn read_halves(index: u64, buf: &mut Vec<u8>) -> bool {
        halves(index, buf);
        true
    }

    #[test]
    fn the_wire_ratio_is_the_sampled_units_own() {
        use crate::wire::UnitKind;
        let even: Vec<u64> = (0..400).step_by(2).collect();
        let odd: Vec<u64> = (1..400).step_by(2).collect();
        let all: Vec<u64> = (0..400).collect();
        let r = |units: &[u64]| wire_ratio(UnitKind::Page, 4096, units, 64, read_halves).unwrap();
        let (random, repeated, mixed) = (r(&even), r(&odd), r(&all));
        // Random pages cost a little more than their size on the wire;
        // repeated words compress many times.
        assert!((0.95..=1.0).contains(&random), "{random}");
        assert!(repeated > 20.0, "{repeated}");
        // A mix is byte-weighted: about twice the random pages' ratio.
        assert!((1.8..2.1).contains(&mixed), "{mixed}");
        // Too few to sample: none (the caller falls back).
        assert_eq!(
            wire_ratio(UnitKind::Page, 4096, &even[..10], 64, read_halves),
            None
        );
        // Unreadable units are skipped; none readable: none.
        assert_eq!(
            wire_ratio(UnitKind::Chunk, 65536, &all, 1, |_, _| false),
            None
        );
        // A large set is sampled, not read whole: 16 MiB of 64 KiB chunks.
        let mut read = 0;
        let many: Vec<u64> = (0..10_000).collect();
        wire_ratio(UnitKind::Chunk, 65536, &many, 1, |c, buf| {
            read += 1;
            read_halves(c, buf)
        })
        .unwrap();
        assert!((250..=260).contains(&read), "{read} chunks read");
    }

    #[test]
    fn wire_ratios_split_written_from_unwritten_units() {
        use crate::wire::UnitKind;
        let split = |kind, size, n: u64, written: fn(u64) -> bool| {
            let units: Vec<u64> = (0..n).collect();
            written_and_unwritten_ratios(kind, size, &units, written, read_halves)
        };
        // Pages: the written ones (multiples of 4, all even: random) against
        // the rest (2 in 3 of them odd: repeated).
        let (w, u) = split(UnitKind::Page, 4096, 4000, |p| p % 4 == 0);
        assert!((0.95..=1.0).contains(&w), "{w}");
        assert!((2.5..3.2).contains(&u), "{u}");
        // Chunks: written ones odd (repeated), the others random.
        let (w, u) = split(UnitKind::Chunk, 65536, 400, |c| c % 2 == 1);
        assert!(w > 20.0, "{w}");
        assert!((0.95..=1.0).contains(&u), "{u}");
        // Too few written units to sample (10 pages): the kind's whole
        // ratio; nothing at all: 1.
        let (w, _) = split(UnitKind::Page, 4096, 4000, |p| p < 20 && p % 2 == 0);
        assert!((1.8..2.1).contains(&w), "{w}");
        assert_eq!(split(UnitKind::Chunk, 65536, 0, |_| true), (1.0, 1.0));
    }
}
