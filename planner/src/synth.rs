//! Synthetic profiles for tests, benchmarks and the demo.
//!
//! A workload is a mix of *tiers* per address space. A tier has a share of
//! the units, a read-rate range and a write-rate range (events per second;
//! each unit's rate is drawn log-uniformly from the range, discretised to
//! [`RATE_LEVELS`] geometric levels), an overwrite probability for storage
//! (the chance that a write interval is a whole-block overwrite), and
//! whether its units are zero/never populated. Given its rates, a unit's
//! counters are `r ~ Binomial(n, 1 - e^{-lambda_r tau})`,
//! `w ~ Binomial(n, 1 - e^{-lambda_w tau})` (independent levels), and
//! `o ~ Binomial(w, overwrite)`. Tiers are placed at random addresses.
//!
//! | workload | memory tiers (share: reads/s, writes/s) | storage tiers |
//! |---|---|---|
//! | `memory-heavy` (in-memory analytics, JS/JVM heaps) | hot 6 %: 0.5-20, 0.2-10; warm 24 %: 0.02-0.5, 0.005-0.1; cold 45 %: 1e-4-5e-3, 1e-5-1e-3; recycled zero pages 5 %: 0, 1e-3-0.02; never populated 20 % | hot 0.5 %: 0.01-0.5, 0.05-1 (overwrite 0.2); warm 5 %: 0.005-0.2, 1e-5-1e-3 (0.5); cold 64.5 %: 1e-6-1e-4 reads; holes 30 % |
//! | `io-heavy` (database, sysbench) | hot 4 %: 0.5-10, 0.1-5; page cache 40 %: 0.05-1, 0.01-0.3; cold 36 %: 1e-4-5e-3, 1e-5-1e-3; never 20 % | tables hot 3 %: 0.1-2, 0.1-2 (0.1); log 0.5 %: writes 0.5-5 (1.0); warm 12 %: 0.01-0.3, 1e-4-0.01 (0.3); cold 59.5 %: 1e-5-1e-3 reads; holes 25 % |
//! | `idle` | warm 2 %: 0.01-0.2, 0.005-0.05; cold 28 %: 1e-5-1e-3, 1e-6-1e-4; never 70 % | warm 0.2 %: 1e-3-0.02, 1e-4-5e-3 (0.5); cold 39.8 %: 1e-6-1e-5 reads; holes 60 % |
//! | `web` (web/app server) | hot 3 %: 1-20, 0.05-1; warm read-mostly 20 %: 0.05-1, 1e-3-0.01; cold 42 %: 1e-4-5e-3, 1e-5-1e-3; recycled 5 %: 0, 1e-3-0.02; never 30 % | static files 6 %: 0.01-0.5 reads; logs 0.3 %: writes 0.2-2 (1.0); cold 53.7 %: 1e-6-1e-4 reads; holes 40 % |
//!
//! Two generators share these distributions:
//!
//! - [`write_profile`] samples every unit (seeded xoshiro256**-style
//!   generator, reproducible across platforms and releases) and streams a
//!   binary profile; memory use is O(1) besides the writer's zero map.
//! - [`class_profile`] builds the *expected* class histogram directly
//!   (counts rounded by largest remainder), in time independent of the guest
//!   size: what the 1 TiB + 16 TiB benchmark plans from.

use std::io::Write;
use std::str::FromStr;

use crate::profile::classes::Histogram;
use crate::profile::{
    ClassProfile, Kind, ProfileHeader, ProfileWriteError, ProfileWriter, UnitCounters,
};

/// Rate levels per tier range.
pub const RATE_LEVELS: usize = 16;

/// A synthetic workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Large hot and warm memory sets, little storage activity.
    MemoryHeavy,
    /// Database-like storage activity with a large page cache.
    IoHeavy,
    /// Mostly unpopulated memory, little activity.
    Idle,
    /// Read-mostly memory and storage, append-only logs.
    Web,
}

impl Workload {
    /// All workloads.
    pub const ALL: [Workload; 4] = [
        Workload::MemoryHeavy,
        Workload::IoHeavy,
        Workload::Idle,
        Workload::Web,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::MemoryHeavy => "memory-heavy",
            Workload::IoHeavy => "io-heavy",
            Workload::Idle => "idle",
            Workload::Web => "web",
        }
    }
}

/// An unknown workload name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown workload {0:?} (memory-heavy, io-heavy, idle, web)")]
pub struct UnknownWorkload(pub String);

impl FromStr for Workload {
    type Err = UnknownWorkload;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| UnknownWorkload(s.to_string()))
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tier of a workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tier {
    /// Name, for documentation and reports.
    pub name: &'static str,
    /// Share of the address space.
    pub share: f64,
    /// Read-rate range (events/s); `(0, 0)` = never read.
    pub read: (f64, f64),
    /// Write-rate range (events/s); `(0, 0)` = never written.
    pub write: (f64, f64),
    /// Probability that a write interval is a whole-block overwrite.
    pub overwrite: f64,
    /// Units are zero / never populated at profile end.
    pub zero: bool,
}

const fn tier(
    name: &'static str,
    share: f64,
    read: (f64, f64),
    write: (f64, f64),
    overwrite: f64,
    zero: bool,
) -> Tier {
    Tier {
        name,
        share,
        read,
        write,
        overwrite,
        zero,
    }
}

const NONE: (f64, f64) = (0.0, 0.0);

/// The tiers of a workload for one address space (see the module table).
pub fn tiers(workload: Workload, kind: Kind) -> &'static [Tier] {
    use Kind::*;
    use Workload::*;
    const COLD_MEM: (f64, f64) = (1e-4, 5e-3);
    const COLD_MEM_W: (f64, f64) = (1e-5, 1e-3);
    match (workload, kind) {
        (MemoryHeavy, Page) => {
            const T: &[Tier] = &[
                tier("hot", 0.06, (0.5, 20.0), (0.2, 10.0), 0.0, false),
                tier("warm", 0.24, (0.02, 0.5), (0.005, 0.1), 0.0, false),
                tier("cold", 0.45, COLD_MEM, COLD_MEM_W, 0.0, false),
                tier("recycled", 0.05, NONE, (1e-3, 0.02), 0.0, true),
                tier("never", 0.20, NONE, NONE, 0.0, true),
            ];
            T
        }
        (MemoryHeavy, Chunk) => {
            const T: &[Tier] = &[
                tier("hot", 0.005, (0.01, 0.5), (0.05, 1.0), 0.2, false),
                tier("warm", 0.05, (0.005, 0.2), (1e-5, 1e-3), 0.5, false),
                tier("cold", 0.645, (1e-6, 1e-4), NONE, 0.0, false),
                tier("hole", 0.30, NONE, NONE, 0.0, true),
            ];
            T
        }
        (IoHeavy, Page) => {
            const T: &[Tier] = &[
                tier("hot", 0.04, (0.5, 10.0), (0.1, 5.0), 0.0, false),
                tier("page-cache", 0.40, (0.05, 1.0), (0.01, 0.3), 0.0, false),
                tier("cold", 0.36, COLD_MEM, COLD_MEM_W, 0.0, false),
                tier("never", 0.20, NONE, NONE, 0.0, true),
            ];
            T
        }
        (IoHeavy, Chunk) => {
            const T: &[Tier] = &[
                tier("tables-hot", 0.03, (0.1, 2.0), (0.1, 2.0), 0.1, false),
                tier("log", 0.005, NONE, (0.5, 5.0), 1.0, false),
                tier("warm", 0.12, (0.01, 0.3), (1e-4, 0.01), 0.3, false),
                tier("cold", 0.595, (1e-5, 1e-3), NONE, 0.0, false),
                tier("hole", 0.25, NONE, NONE, 0.0, true),
            ];
            T
        }
        (Idle, Page) => {
            const T: &[Tier] = &[
                tier("warm", 0.02, (0.01, 0.2), (0.005, 0.05), 0.0, false),
                tier("cold", 0.28, (1e-5, 1e-3), (1e-6, 1e-4), 0.0, false),
                tier("never", 0.70, NONE, NONE, 0.0, true),
            ];
            T
        }
        (Idle, Chunk) => {
            const T: &[Tier] = &[
                tier("warm", 0.002, (1e-3, 0.02), (1e-4, 5e-3), 0.5, false),
                tier("cold", 0.398, (1e-6, 1e-5), NONE, 0.0, false),
                tier("hole", 0.60, NONE, NONE, 0.0, true),
            ];
            T
        }
        (Web, Page) => {
            const T: &[Tier] = &[
                tier("hot", 0.03, (1.0, 20.0), (0.05, 1.0), 0.0, false),
                tier("warm-read", 0.20, (0.05, 1.0), (1e-3, 0.01), 0.0, false),
                tier("cold", 0.42, COLD_MEM, COLD_MEM_W, 0.0, false),
                tier("recycled", 0.05, NONE, (1e-3, 0.02), 0.0, true),
                tier("never", 0.30, NONE, NONE, 0.0, true),
            ];
            T
        }
        (Web, Chunk) => {
            const T: &[Tier] = &[
                tier("static", 0.06, (0.01, 0.5), NONE, 0.0, false),
                tier("logs", 0.003, NONE, (0.2, 2.0), 1.0, false),
                tier("cold", 0.537, (1e-6, 1e-4), NONE, 0.0, false),
                tier("hole", 0.40, NONE, NONE, 0.0, true),
            ];
            T
        }
    }
}

/// What to synthesise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthConfig {
    /// Memory size in bytes.
    pub ram: u64,
    /// Storage size in bytes.
    pub disk: u64,
    /// The workload.
    pub workload: Workload,
    /// `n` (default 60).
    pub samples: u32,
    /// `tau` in nanoseconds (default 1 s).
    pub interval_ns: u64,
    /// Page size (default 4096).
    pub page_size: u32,
    /// Chunk size (default 65536).
    pub chunk_size: u32,
    /// Device-state estimate in bytes (default 1 MiB).
    pub state_bytes: u64,
    /// Generator seed (default 1).
    pub seed: u64,
}

impl SynthConfig {
    /// Defaults for a guest of `ram` and `disk` bytes.
    pub fn new(ram: u64, disk: u64, workload: Workload) -> SynthConfig {
        SynthConfig {
            ram,
            disk,
            workload,
            samples: 60,
            interval_ns: 1_000_000_000,
            page_size: 4096,
            chunk_size: 65536,
            state_bytes: 1 << 20,
            seed: 1,
        }
    }

    /// The profile header.
    pub fn header(&self) -> ProfileHeader {
        ProfileHeader {
            samples: self.samples,
            interval_ns: self.interval_ns,
            page_size: self.page_size,
            chunk_size: self.chunk_size,
            page_count: self.ram.div_ceil(self.page_size.max(1).into()),
            chunk_count: self.disk.div_ceil(self.chunk_size.max(1).into()),
            state_bytes: self.state_bytes,
        }
    }
}

/// The binomial pmf `P(X = k)`, `X ~ Binomial(n, p)`, for `k = 0..=n`.
fn binomial_pmf(n: u32, p: f64) -> Vec<f64> {
    let n_us = n as usize;
    let mut out = vec![0.0; n_us + 1];
    if p <= 0.0 {
        out[0] = 1.0;
        return out;
    }
    if p >= 1.0 {
        out[n_us] = 1.0;
        return out;
    }
    // Log-space to stay accurate for large n.
    let (lp, lq) = (p.ln(), (-p).ln_1p());
    let mut log_choose = 0.0f64;
    for (k, o) in out.iter_mut().enumerate() {
        if k > 0 {
            log_choose += ((n_us - k + 1) as f64).ln() - (k as f64).ln();
        }
        *o = (log_choose + k as f64 * lp + (n_us - k) as f64 * lq).exp();
    }
    out
}

/// The counter pmf of a rate range: a mixture of binomials over
/// [`RATE_LEVELS`] log-uniform levels.
fn counter_pmf(n: u32, tau: f64, range: (f64, f64)) -> Vec<f64> {
    let (lo, hi) = range;
    if hi <= 0.0 {
        return binomial_pmf(n, 0.0);
    }
    let mut out = vec![0.0; n as usize + 1];
    for level in 0..RATE_LEVELS {
        let f = (level as f64 + 0.5) / RATE_LEVELS as f64;
        let rate = lo.max(1e-12) * (hi / lo.max(1e-12)).powf(f);
        let p = -(-rate * tau).exp_m1();
        for (o, b) in out.iter_mut().zip(binomial_pmf(n, p)) {
            *o += b / RATE_LEVELS as f64;
        }
    }
    out
}

fn cdf(pmf: &[f64]) -> Vec<f64> {
    let mut acc = 0.0;
    let mut c: Vec<f64> = pmf
        .iter()
        .map(|p| {
            acc += p;
            acc
        })
        .collect();
    if let Some(last) = c.last_mut() {
        *last = f64::INFINITY; // rounding never falls off the end
    }
    c
}

/// Precomputed sampling tables of one tier.
#[derive(Debug, Clone)]
struct TierTables {
    tier: Tier,
    r_pmf: Vec<f64>,
    w_pmf: Vec<f64>,
    r_cdf: Vec<f64>,
    w_cdf: Vec<f64>,
    /// `o_cdf[w]`: CDF of `Binomial(w, overwrite)`.
    o_cdf: Vec<Vec<f64>>,
    o_pmf: Vec<Vec<f64>>,
}

fn tables(cfg: &SynthConfig, kind: Kind) -> Vec<TierTables> {
    let tau = cfg.interval_ns as f64 * 1e-9;
    let n = cfg.samples;
    tiers(cfg.workload, kind)
        .iter()
        .map(|&t| {
            let r_pmf = counter_pmf(n, tau, t.read);
            let w_pmf = counter_pmf(n, tau, t.write);
            let o_pmf: Vec<Vec<f64>> = (0..=n)
                .map(|w| {
                    if kind == Kind::Chunk {
                        binomial_pmf(w, t.overwrite)
                    } else {
                        binomial_pmf(w, 0.0)
                    }
                })
                .collect();
            TierTables {
                tier: t,
                r_cdf: cdf(&r_pmf),
                w_cdf: cdf(&w_pmf),
                o_cdf: o_pmf.iter().map(|p| cdf(p)).collect(),
                r_pmf,
                w_pmf,
                o_pmf,
            }
        })
        .collect()
}

/// A small, fast, seeded generator (SplitMix64 seeding a xoshiro256**).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `seed` and stream `stream`.
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut x = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[inline]
fn pick(cdf: &[f64], u: f64) -> u32 {
    cdf.partition_point(|&c| c <= u).min(cdf.len() - 1) as u32
}

fn sample(t: &[TierTables], tier_cdf: &[f64], rng: &mut Rng) -> UnitCounters {
    let tt = &t[pick(tier_cdf, rng.unit()) as usize];
    let r = pick(&tt.r_cdf, rng.unit());
    let w = pick(&tt.w_cdf, rng.unit());
    let o = if w > 0 && tt.o_cdf[w as usize].len() > 1 {
        pick(&tt.o_cdf[w as usize], rng.unit())
    } else {
        0
    };
    UnitCounters {
        r,
        w,
        o,
        zero: tt.tier.zero,
    }
}

fn tier_cdf(t: &[TierTables]) -> Vec<f64> {
    let shares: Vec<f64> = t.iter().map(|t| t.tier.share).collect();
    let total: f64 = shares.iter().sum();
    cdf(&shares.iter().map(|s| s / total).collect::<Vec<_>>())
}

/// Samples every unit and streams the binary profile into `out`.
pub fn write_profile<W: Write>(cfg: &SynthConfig, out: W) -> Result<W, ProfileWriteError> {
    let header = cfg.header();
    let mut w = ProfileWriter::new(out, &header)?;
    for (kind, count) in [
        (Kind::Page, header.page_count),
        (Kind::Chunk, header.chunk_count),
    ] {
        let t = tables(cfg, kind);
        let tc = tier_cdf(&t);
        let mut rng = Rng::new(cfg.seed, kind as u64 + 1);
        for _ in 0..count {
            let c = sample(&t, &tc, &mut rng);
            match kind {
                Kind::Page => w.push_page(c)?,
                Kind::Chunk => w.push_chunk(c)?,
            }
        }
    }
    w.finish()
}

/// Splits `total` into integer parts proportional to `weights` (largest
/// remainder; ties to the lower index): deterministic and exact.
fn apportion(total: u64, weights: &[f64]) -> Vec<u64> {
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 || total == 0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<f64> = weights.iter().map(|w| w / sum * total as f64).collect();
    let mut parts: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
    let assigned: u64 = parts.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in order.iter().take(total.saturating_sub(assigned) as usize) {
        parts[i] += 1;
    }
    parts
}

/// The expected class histogram of the workload, without sampling units:
/// O(tiers x n^3) whatever the guest size.
pub fn class_profile(cfg: &SynthConfig) -> ClassProfile {
    let header = cfg.header();
    let mut out = ClassProfile {
        samples: cfg.samples,
        interval_s: header.interval_s(),
        page_size: cfg.page_size.into(),
        chunk_size: cfg.chunk_size.into(),
        page_count: header.page_count,
        chunk_count: header.chunk_count,
        state_bytes: cfg.state_bytes,
        pages: Vec::new(),
        chunks: Vec::new(),
    };
    for (kind, count) in [
        (Kind::Page, header.page_count),
        (Kind::Chunk, header.chunk_count),
    ] {
        let t = tables(cfg, kind);
        let shares: Vec<f64> = t.iter().map(|t| t.tier.share).collect();
        let per_tier = apportion(count, &shares);
        let mut h = Histogram::new(kind, cfg.samples);
        for (tt, &units) in t.iter().zip(&per_tier) {
            let mut keys = Vec::new();
            let mut weights = Vec::new();
            for (r, &pr) in tt.r_pmf.iter().enumerate() {
                for (w, &pw) in tt.w_pmf.iter().enumerate() {
                    for (o, &po) in tt.o_pmf[w].iter().enumerate() {
                        let p = pr * pw * po;
                        if p > 0.0 {
                            keys.push(UnitCounters {
                                r: r as u32,
                                w: w as u32,
                                o: o as u32,
                                zero: tt.tier.zero,
                            });
                            weights.push(p);
                        }
                    }
                }
            }
            for (k, n) in keys.into_iter().zip(apportion(units, &weights)) {
                if n > 0 {
                    h.add(k, n);
                }
            }
        }
        match kind {
            Kind::Page => out.pages = h.into_classes(),
            Kind::Chunk => out.chunks = h.into_classes(),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_sum_to_one() {
        for w in Workload::ALL {
            for kind in [Kind::Page, Kind::Chunk] {
                let s: f64 = tiers(w, kind).iter().map(|t| t.share).sum();
                assert!((s - 1.0).abs() < 1e-12, "{w} {kind}: {s}");
            }
        }
    }

    #[test]
    fn pmfs_are_normalised() {
        for p in [0.0, 1e-9, 0.3, 0.999, 1.0] {
            let s: f64 = binomial_pmf(60, p).iter().sum();
            assert!((s - 1.0).abs() < 1e-9, "{p}");
        }
        let s: f64 = counter_pmf(255, 1.0, (1e-4, 20.0)).iter().sum();
        assert!((s - 1.0).abs() < 1e-9);
    }

    #[test]
    fn apportion_is_exact() {
        assert_eq!(apportion(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(apportion(7, &[0.0, 2.0]), vec![0, 7]);
        assert_eq!(apportion(0, &[1.0]), vec![0]);
    }

    #[test]
    fn sampled_profiles_follow_the_class_distribution() {
        let mut cfg = SynthConfig::new(64 << 20, 256 << 20, Workload::IoHeavy);
        cfg.samples = 20;
        let bytes = write_profile(&cfg, Vec::new()).unwrap();
        let p = crate::profile::Profile::from_bytes(bytes).unwrap();
        let sampled = ClassProfile::from_profile(&p).unwrap();
        let expected = class_profile(&cfg);
        expected.validate().unwrap();
        for kind in [Kind::Page, Kind::Chunk] {
            // Total variation distance between the two histograms.
            let mut all = std::collections::HashMap::new();
            for c in sampled.classes(kind) {
                all.entry(c.key).or_insert((0u64, 0u64)).0 = c.count;
            }
            for c in expected.classes(kind) {
                all.entry(c.key).or_insert((0, 0)).1 = c.count;
            }
            let n = sampled.count(kind) as f64;
            let tv: f64 = all
                .values()
                .map(|&(a, b)| (a as f64 - b as f64).abs())
                .sum::<f64>()
                / (2.0 * n);
            assert!(tv < 0.08, "{kind}: total variation {tv}");
        }
    }

    #[test]
    fn generation_is_reproducible() {
        let cfg = SynthConfig::new(1 << 20, 4 << 20, Workload::Web);
        let a = write_profile(&cfg, Vec::new()).unwrap();
        let b = write_profile(&cfg, Vec::new()).unwrap();
        assert_eq!(a, b);
        let mut other = cfg;
        other.seed = 2;
        assert_ne!(a, write_profile(&other, Vec::new()).unwrap());
    }
}
