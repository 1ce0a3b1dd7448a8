//! Class compression: units with equal counters are interchangeable for the
//! model, so a profile collapses into a histogram `(r, w, o, zero) -> count`.
//!
//! With `n` samples there are at most `2 (n+1)^2` page classes and
//! `2 (n+1)^2 (n+2) / 2` chunk classes whatever the guest size, and in
//! practice far fewer; every model evaluation is O(classes).
//!
//! The histogram is built in one pass over the profile. Counts go into a
//! dense array indexed by the key when it has at most 2^23 cells (64 MiB;
//! always for pages with `n <= 2047`, for chunks with `n <= 160`) and no
//! more cells than the units it will count (plus 65536), else into a hash
//! map: a small profile never pays for a large dense array.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::format::{Profile, ProfileReadError};
use super::{Kind, UnitCounters};
use crate::model::MIN_INTERVAL_S;
use crate::model::rates::MAX_SAMPLES;

/// One class: a counter key and how many units share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Class {
    /// The counters every unit of the class has.
    #[serde(flatten)]
    pub key: UnitCounters,
    /// Number of units.
    pub count: u64,
}

/// A class-compressed profile: everything the model needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassProfile {
    /// `n`: sample intervals.
    pub samples: u32,
    /// `tau`: interval length in seconds.
    pub interval_s: f64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Number of pages.
    pub page_count: u64,
    /// Number of chunks.
    pub chunk_count: u64,
    /// Device/CPU state estimate in bytes.
    pub state_bytes: u64,
    /// Page classes, sorted by key, counts > 0.
    pub pages: Vec<Class>,
    /// Chunk classes, sorted by key, counts > 0.
    pub chunks: Vec<Class>,
}

/// A class profile that breaks its own invariants.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ClassProfileError {
    /// A header figure is impossible.
    #[error("{field} = {value}: {reason}")]
    BadField {
        /// Field name.
        field: &'static str,
        /// Value.
        value: f64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A class has counters out of range (`> n`, `o > w`, `o != 0` on a page).
    #[error("{kind} class {index}: counters {key:?} invalid for n = {samples}")]
    BadClass {
        /// Page or chunk.
        kind: Kind,
        /// Position in the class list.
        index: usize,
        /// Its key.
        key: UnitCounters,
        /// The sample count.
        samples: u32,
    },
    /// Class counts do not add up to the unit count.
    #[error("{kind} classes hold {found} units, the profile has {expected}")]
    CountMismatch {
        /// Page or chunk.
        kind: Kind,
        /// Units in the profile.
        expected: u64,
        /// Sum of class counts.
        found: u64,
    },
    /// The unit counts of a kind do not fit in 64 bits.
    #[error("{kind} class counts overflow 64 bits")]
    CountOverflow {
        /// Page or chunk.
        kind: Kind,
    },
    /// The same key appears twice, or keys are not sorted.
    #[error("{kind} class {index}: key {key:?} duplicated or out of order")]
    Unsorted {
        /// Page or chunk.
        kind: Kind,
        /// Position in the class list.
        index: usize,
        /// Its key.
        key: UnitCounters,
    },
}

const DENSE_LIMIT: u64 = 1 << 23;
/// Sections with fewer units are scanned by one thread.
const SPLIT_MIN: u64 = 1 << 22;

/// Builds a class histogram one unit at a time.
#[derive(Debug)]
pub struct Histogram {
    kind: Kind,
    dim: u64,
    dense: Vec<u64>,
    sparse: HashMap<UnitCounters, u64>,
}

impl Histogram {
    /// An empty histogram for units of `kind` with counters up to `samples`
    /// (dense whenever the key space allows it).
    pub fn new(kind: Kind, samples: u32) -> Self {
        Self::for_units(kind, samples, u64::MAX)
    }

    /// An empty histogram that will count about `units` units: dense only
    /// when the dense array is not larger than the units (plus 65536).
    pub fn for_units(kind: Kind, samples: u32, units: u64) -> Self {
        let dim = u64::from(samples) + 1;
        let cells = match kind {
            Kind::Page => dim.checked_mul(dim).and_then(|c| c.checked_mul(2)),
            Kind::Chunk => dim
                .checked_mul(dim)
                .and_then(|c| c.checked_mul(dim))
                .and_then(|c| c.checked_mul(2)),
        };
        let dense = match cells {
            Some(c) if c <= DENSE_LIMIT && c <= units.saturating_add(1 << 16) => {
                vec![0; c as usize]
            }
            _ => Vec::new(),
        };
        Histogram {
            kind,
            dim,
            dense,
            sparse: HashMap::new(),
        }
    }

    /// Adds `count` units with counters `c` (which must be within `n`).
    #[inline]
    pub fn add(&mut self, c: UnitCounters, count: u64) {
        if self.dense.is_empty() {
            *self.sparse.entry(c).or_insert(0) += count;
            return;
        }
        let d = self.dim;
        let mut i = (u64::from(c.zero) * d + u64::from(c.r)) * d + u64::from(c.w);
        if self.kind == Kind::Chunk {
            i = i * d + u64::from(c.o);
        }
        self.dense[i as usize] += count;
    }

    /// Merges another histogram of the same kind and counter range (dense
    /// or sparse, either way).
    pub fn merge(&mut self, other: Histogram) {
        if self.dense.len() == other.dense.len() && other.sparse.is_empty() {
            for (a, b) in self.dense.iter_mut().zip(&other.dense) {
                *a += b;
            }
            return;
        }
        for c in other.into_classes() {
            self.add(c.key, c.count);
        }
    }

    /// The classes, sorted by key, empty ones dropped.
    pub fn into_classes(self) -> Vec<Class> {
        let d = self.dim;
        let mut out: Vec<Class> = if self.dense.is_empty() {
            self.sparse
                .into_iter()
                .filter(|&(_, count)| count > 0)
                .map(|(key, count)| Class { key, count })
                .collect()
        } else {
            let chunk = self.kind == Kind::Chunk;
            self.dense
                .iter()
                .enumerate()
                .filter(|&(_, &count)| count > 0)
                .map(|(i, &count)| {
                    let mut i = i as u64;
                    let o = if chunk {
                        let o = i % d;
                        i /= d;
                        o
                    } else {
                        0
                    };
                    let w = i % d;
                    i /= d;
                    let r = i % d;
                    let zero = i / d == 1;
                    Class {
                        key: UnitCounters {
                            r: r as u32,
                            w: w as u32,
                            o: o as u32,
                            zero,
                        },
                        count,
                    }
                })
                .collect()
        };
        out.sort_unstable_by_key(|c| c.key);
        out
    }
}

impl ClassProfile {
    /// Builds the histogram from a binary profile in one validating pass per
    /// section.
    ///
    /// Large sections are split across the available CPUs (each thread fills
    /// its own histogram; they are merged). On error, the error of the
    /// lowest-addressed part is returned.
    pub fn from_profile(p: &Profile) -> Result<ClassProfile, ProfileReadError> {
        let h = p.header();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pages = Self::histogram(p, Kind::Page, threads, SPLIT_MIN)?;
        let chunks = Self::histogram(p, Kind::Chunk, threads, SPLIT_MIN)?;
        let c = ClassProfile {
            samples: h.samples,
            interval_s: h.interval_s(),
            page_size: h.page_size.into(),
            chunk_size: h.chunk_size.into(),
            page_count: h.page_count,
            chunk_count: h.chunk_count,
            state_bytes: h.state_bytes,
            pages: pages.into_classes(),
            chunks: chunks.into_classes(),
        };
        p.set_fingerprint(c.fingerprint());
        Ok(c)
    }

    /// A 64-bit fingerprint of everything the model reads: `n`, `tau`, the
    /// unit sizes and counts, the state estimate and every class (key and
    /// count). A binary profile and its JSON summary have the same
    /// fingerprint; any change to the histogram or the header changes it
    /// (with overwhelming probability: not a cryptographic hash, it guards
    /// against mix-ups, not against forgery). The plan carries it so the
    /// engine can check it applies the plan to the profile it was made
    /// from. Stable across runs and builds of the same layout version.
    pub fn fingerprint(&self) -> u64 {
        // FxHash-style word mixing with a splitmix64 finaliser.
        let mut h: u64 = 0x7761_6e6d_6967_6670; // "wanmigfp"
        let mut mix = |w: u64| h = (h.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
        mix(self.samples.into());
        mix(self.interval_s.to_bits());
        mix(self.page_size);
        mix(self.chunk_size);
        mix(self.page_count);
        mix(self.chunk_count);
        mix(self.state_bytes);
        for (tag, classes) in [(1u64, &self.pages), (2, &self.chunks)] {
            mix(tag);
            mix(classes.len() as u64);
            for c in classes {
                let k = c.key;
                mix(u64::from(k.r) | u64::from(k.w) << 32);
                mix(u64::from(k.o) | u64::from(k.zero) << 32);
                mix(c.count);
            }
        }
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn histogram(
        p: &Profile,
        kind: Kind,
        threads: usize,
        split_min: u64,
    ) -> Result<Histogram, ProfileReadError> {
        let count = p.count(kind);
        let samples = p.header().samples;
        let scan = |range: std::ops::Range<u64>| {
            let mut h = Histogram::for_units(kind, samples, range.end - range.start);
            p.for_each_in(kind, range, |_, c| {
                h.add(c, 1);
                std::ops::ControlFlow::Continue(())
            })
            .map(|()| h)
        };
        if threads <= 1 || count < split_min {
            return scan(0..count);
        }
        let step = count.div_ceil(threads as u64);
        let parts: Vec<Result<Histogram, ProfileReadError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads as u64)
                .map(|t| {
                    let range = (t * step).min(count)..((t + 1) * step).min(count);
                    s.spawn(move || scan(range))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("histogram worker panicked"))
                .collect()
        });
        let mut total: Option<Histogram> = None;
        for part in parts {
            let part = part?;
            match total.as_mut() {
                None => total = Some(part),
                Some(t) => t.merge(part),
            }
        }
        Ok(total.expect("at least one part"))
    }

    /// Builds the histogram from per-unit counters held in memory.
    #[allow(clippy::too_many_arguments)]
    pub fn from_units(
        samples: u32,
        interval_s: f64,
        page_size: u64,
        chunk_size: u64,
        state_bytes: u64,
        pages: &[UnitCounters],
        chunks: &[UnitCounters],
    ) -> ClassProfile {
        let mut hp = Histogram::for_units(Kind::Page, samples, pages.len() as u64);
        pages.iter().for_each(|&c| hp.add(c, 1));
        let mut hc = Histogram::for_units(Kind::Chunk, samples, chunks.len() as u64);
        chunks.iter().for_each(|&c| hc.add(c, 1));
        ClassProfile {
            samples,
            interval_s,
            page_size,
            chunk_size,
            page_count: pages.len() as u64,
            chunk_count: chunks.len() as u64,
            state_bytes,
            pages: hp.into_classes(),
            chunks: hc.into_classes(),
        }
    }

    /// The classes of one kind.
    pub fn classes(&self, kind: Kind) -> &[Class] {
        match kind {
            Kind::Page => &self.pages,
            Kind::Chunk => &self.chunks,
        }
    }

    /// Unit size of a kind in bytes.
    pub fn unit_size(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Page => self.page_size,
            Kind::Chunk => self.chunk_size,
        }
    }

    /// Unit count of a kind.
    pub fn count(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Page => self.page_count,
            Kind::Chunk => self.chunk_count,
        }
    }

    /// Total number of classes.
    pub fn class_count(&self) -> usize {
        self.pages.len() + self.chunks.len()
    }

    /// The unscaled read rates `ell(0..=n)`, by read count, that
    /// [`Model::new`](crate::model::Model::new) gives this profile's
    /// populated units of `kind`: pooled across them with `pool`
    /// ([`ModelParams::pool_reads`](crate::model::ModelParams::pool_reads)),
    /// else each unit's own. (Never-populated units keep the per-unit
    /// [`RateTable`](crate::model::rates::RateTable).)
    pub fn read_rates(&self, kind: Kind, pool: bool) -> Vec<f64> {
        crate::model::read_rates(
            self.samples,
            self.classes(kind).iter().map(|c| (c.key, c.count)),
            pool,
        )
    }

    /// Checks the invariants (used on summaries read from JSON).
    pub fn validate(&self) -> Result<(), ClassProfileError> {
        let bad = |field, value: f64, reason| ClassProfileError::BadField {
            field,
            value,
            reason,
        };
        if self.samples == 0 {
            return Err(bad("samples", 0.0, "at least one interval is needed"));
        }
        if self.samples > MAX_SAMPLES {
            return Err(bad(
                "samples",
                self.samples.into(),
                "at most 65535 intervals are supported",
            ));
        }
        if !(self.interval_s.is_finite() && self.interval_s >= MIN_INTERVAL_S) {
            return Err(bad(
                "interval_s",
                self.interval_s,
                "must be at least 1e-9 s (1 ns)",
            ));
        }
        // The binary format stores sizes in 32 bits; so must a summary.
        for (field, size) in [
            ("page_size", self.page_size),
            ("chunk_size", self.chunk_size),
        ] {
            if size == 0 || size > u64::from(u32::MAX) {
                return Err(bad(field, size as f64, "must be in 1..=4294967295"));
            }
        }
        for kind in [Kind::Page, Kind::Chunk] {
            let mut sum = 0u64;
            let classes = self.classes(kind);
            for (index, c) in classes.iter().enumerate() {
                let k = c.key;
                let n = self.samples;
                if k.r > n || k.w > n || k.o > k.w || (kind == Kind::Page && k.o != 0) {
                    return Err(ClassProfileError::BadClass {
                        kind,
                        index,
                        key: k,
                        samples: n,
                    });
                }
                if index > 0 && classes[index - 1].key >= k {
                    return Err(ClassProfileError::Unsorted {
                        kind,
                        index,
                        key: k,
                    });
                }
                sum = sum
                    .checked_add(c.count)
                    .ok_or(ClassProfileError::CountOverflow { kind })?;
            }
            if sum != self.count(kind) {
                return Err(ClassProfileError::CountMismatch {
                    kind,
                    expected: self.count(kind),
                    found: sum,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_and_sparse_histograms_agree() {
        let units: Vec<UnitCounters> = (0..500u32)
            .map(|i| UnitCounters {
                r: i % 7,
                w: i % 5,
                o: (i % 5) / 2,
                zero: i % 11 == 0,
            })
            .collect();
        let mut dense = Histogram::new(Kind::Chunk, 10);
        let mut sparse = Histogram::new(Kind::Chunk, 10);
        sparse.dense.clear();
        for &u in &units {
            dense.add(u, 1);
            sparse.add(u, 1);
        }
        let a = dense.into_classes();
        assert_eq!(a, sparse.into_classes());
        assert_eq!(a.iter().map(|c| c.count).sum::<u64>(), 500);
        assert!(a.windows(2).all(|w| w[0].key < w[1].key));
    }

    #[test]
    fn split_scans_merge_to_the_same_histogram() {
        use crate::synth::{SynthConfig, Workload, write_profile};
        let cfg = SynthConfig::new(8 << 20, 64 << 20, Workload::Web);
        let p = Profile::from_bytes(write_profile(&cfg, Vec::new()).unwrap()).unwrap();
        for kind in [Kind::Page, Kind::Chunk] {
            let one = ClassProfile::histogram(&p, kind, 1, 0)
                .unwrap()
                .into_classes();
            for threads in [2, 3, 7] {
                let many = ClassProfile::histogram(&p, kind, threads, 0)
                    .unwrap()
                    .into_classes();
                assert_eq!(one, many, "{kind} with {threads} threads");
            }
        }
    }
}
