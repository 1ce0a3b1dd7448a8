//! The per-unit reference model (tests only): the same equations applied to
//! every unit separately, with the unit order taken literally (rank, then
//! pages before chunks, then address). The class model must agree with it.

use std::cmp::Ordering;

use super::overflow::COVER_TOLERANCE;
use super::postcopy::work_grid;
use super::rates::{RateTable, p_any};
use super::{FreezePolicy, Link, ModelParams, Policy, Selection, nonneg};
use crate::profile::{Kind, UnitCounters};

/// What the reference model predicts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefResult {
    pub precopy_s: f64,
    /// Link bytes sent during the freeze.
    pub remainder: f64,
    /// Dirty link bytes the freeze moved to post-copy.
    pub overflow: f64,
    /// Expected pages among them.
    pub overflow_pages: f64,
    /// Expected chunks among them.
    pub overflow_chunks: f64,
    pub rounds: u32,
    pub downtime: f64,
    pub uptime: f64,
    pub total: f64,
    pub penalty: f64,
    pub faults: f64,
    pub window_stall: f64,
    pub gamma: f64,
    pub gamma_weighted: f64,
}

/// A small per-unit profile.
#[derive(Debug, Clone)]
pub(crate) struct UnitProfile {
    pub samples: u32,
    pub interval_s: f64,
    pub page_size: u64,
    pub chunk_size: u64,
    pub state_bytes: u64,
    pub pages: Vec<UnitCounters>,
    pub chunks: Vec<UnitCounters>,
}

#[derive(Debug, Clone, Copy)]
struct U {
    kind: Kind,
    index: usize,
    c: UnitCounters,
    /// Link bytes of the unit.
    wire: f64,
    /// Stall of a fault on it.
    stall: f64,
    lam_w: f64,
    lam_a: f64,
}

pub(crate) fn predict(
    p: &UnitProfile,
    link: Link,
    params: &ModelParams,
    sel: Selection,
    memory_magic: bool,
) -> RefResult {
    let rates = RateTable::new(p.samples);
    let lam = |k: u32| rates.ell(k) / p.interval_s;
    let reads = |units: &[UnitCounters]| {
        super::read_rates(p.samples, units.iter().map(|&c| (c, 1)), params.pool_reads)
    };
    let (page_reads, chunk_reads) = (reads(&p.pages), reads(&p.chunks));
    let lam_r = |kind: Kind, c: UnitCounters| {
        let k = c.r.min(p.samples.max(1)) as usize;
        match kind {
            _ if c.zero => lam(c.r),
            Kind::Page => page_reads[k] / p.interval_s,
            Kind::Chunk => chunk_reads[k] / p.interval_s,
        }
    };
    let unit = |kind: Kind, index: usize, c: UnitCounters| {
        let size = match kind {
            Kind::Page => p.page_size as f64,
            Kind::Chunk => p.chunk_size as f64,
        };
        let lam_w = lam(c.w) * params.write_scale;
        let fetch = match kind {
            Kind::Page => 1.0,
            Kind::Chunk if c.w > 0 => 1.0 - f64::from(c.o) / f64::from(c.w),
            Kind::Chunk => 0.0,
        };
        U {
            kind,
            index,
            c,
            wire: size * link.wire.of(kind, c.w > 0),
            stall: link.fault_stall(size * link.wire.of(kind, true)),
            lam_w,
            lam_a: lam_r(kind, c) + lam_w * fetch,
        }
    };
    let order = |a: &U, b: &U| -> Ordering {
        rates
            .rank_cmp(&a.c, &b.c)
            .then(a.kind.cmp(&b.kind))
            .then(a.index.cmp(&b.index))
    };
    let mut pages: Vec<U> = p
        .pages
        .iter()
        .enumerate()
        .map(|(i, &c)| unit(Kind::Page, i, c))
        .collect();
    let mut chunks: Vec<U> = p
        .chunks
        .iter()
        .enumerate()
        .map(|(i, &c)| unit(Kind::Chunk, i, c))
        .collect();
    pages.sort_by(order);
    chunks.sort_by(order);
    let kp = if memory_magic { 0 } else { sel.pages as usize };
    let ks = sel.chunks as usize;
    let mut set: Vec<U> = pages[..kp].to_vec();
    set.extend_from_slice(&chunks[..ks]);
    let mut rest: Vec<U> = if memory_magic {
        Vec::new()
    } else {
        pages[kp..].to_vec()
    };
    rest.extend_from_slice(&chunks[ks..]);
    rest.sort_by(order);

    // Pre-copy, per unit, in bytes.
    let b = link.bandwidth;
    let state = params.state_bytes.unwrap_or(p.state_bytes) as f64;
    let fixed = state / b + link.rtt + params.resume_overhead;
    let mut sent: Vec<f64> = set.iter().map(|u| u.wire).collect();
    let mut bytes: f64 = set.iter().filter(|u| !u.c.zero).map(|u| u.wire).sum();
    let mut duration = 0.0;
    let mut rounds = 0;
    let remainder;
    let mut k = 0;
    loop {
        let t = bytes / b;
        duration += t;
        let (mut rem, mut raw) = (0.0, 0.0);
        for (u, s) in set.iter().zip(sent.iter_mut()) {
            let x = u.lam_w * t;
            // Written at any time during the round: sent again.
            let d = u.wire * p_any(x);
            *s = d;
            rem += d;
            // The engine's estimate: written units, uncompressed.
            raw += d / link.wire.of(u.kind, true);
        }
        rounds += 1;
        let met = params
            .downtime_target
            .is_some_and(|target| raw / b + fixed <= target);
        let unit = p.page_size.max(p.chunk_size) as f64;
        let converged = rem <= params.converged * (state + unit);
        if rem <= 0.0
            || met
            || converged
            || rem >= super::precopy::not_shrinking_floor(params.min_shrink, bytes)
            || k + 1 >= params.max_rounds
        {
            remainder = rem;
            break;
        }
        bytes = rem;
        k += 1;
    }
    // The freeze (see `overflow`): with the overflow policy and a
    // remainder that misses the limit, the dirty units go hottest first
    // (merged order) while they fit; the coldest, unit by unit, are
    // post-copied, each absent with its dirty probability.
    let limit = params.downtime_limit();
    let mut frozen = remainder;
    let mut overflow: Vec<(U, f64)> = Vec::new();
    let (mut overflow_bytes, mut overflow_pages, mut overflow_chunks) = (0.0, 0.0, 0.0);
    if params.freeze == FreezePolicy::Overflow && remainder / b + fixed > limit * (1.0 + 1e-12) {
        let budget = nonneg((limit - fixed) * b);
        let target = remainder - budget;
        if target > 0.0 {
            let cover = target * (1.0 - COVER_TOLERANCE);
            let mut merged: Vec<usize> = (0..set.len()).collect();
            merged.sort_by(|&x, &y| order(&set[x], &set[y]));
            for &i in merged.iter().rev() {
                let (u, d) = (set[i], sent[i]);
                if d.is_nan() || d <= 0.0 {
                    continue;
                }
                if overflow_bytes >= cover {
                    break;
                }
                overflow_bytes += d;
                match u.kind {
                    Kind::Page => overflow_pages += d / u.wire,
                    Kind::Chunk => overflow_chunks += d / u.wire,
                }
                overflow.push((u, d / u.wire));
            }
            overflow.reverse();
            frozen = super::sent_in_freeze(remainder, overflow_bytes, budget);
        }
    }
    let downtime = frozen / b + fixed;

    // Post-copy, unit by unit (see `postcopy`): the same work-time grid and
    // predictor-corrector, with every unit's arrival (in pushed bytes)
    // explicit and the absent set summed unit by unit.
    let dt = params.delta_t;
    let lam_max = pages
        .iter()
        .chain(&chunks)
        .map(|u| u.lam_a)
        .fold(0.0, f64::max);
    let u_max = pages
        .iter()
        .chain(&chunks)
        .filter(|u| !u.c.zero || u.c.w > 0)
        .map(|u| u.wire)
        .sum::<f64>()
        / b;
    let (grid, window) = work_grid(dt, lam_max, u_max);
    // (arrival in pushed bytes, q, lambda_a, stall)
    let mut arrivals = Vec::new();
    let mut pushed = 0.0;
    // The overflow first: its pages hottest first, then its chunks, each
    // chunk absent for a uniform point of their segment (see `overflow`).
    for (u, q) in overflow.iter().filter(|(u, _)| u.kind == Kind::Page) {
        pushed += q * u.wire;
        arrivals.push((pushed, *q, u.lam_a, u.stall));
    }
    let segment = (
        pushed,
        overflow
            .iter()
            .filter(|(u, _)| u.kind == Kind::Chunk)
            .map(|(u, q)| q * u.wire)
            .sum::<f64>(),
    );
    let chunk_overflow: Vec<(f64, f64, f64)> = overflow
        .iter()
        .filter(|(u, _)| u.kind == Kind::Chunk)
        .map(|(u, q)| (*q, u.lam_a, u.stall))
        .collect();
    pushed += segment.1;
    for u in &rest {
        let q = if u.c.zero {
            p_any(u.lam_w * duration)
        } else {
            1.0
        };
        pushed += q * u.wire;
        arrivals.push((pushed, q, u.lam_a, u.stall));
    }
    let absent = |x: f64, k: usize| -> (f64, f64) {
        let (mut stall, mut faults) = (0.0, 0.0);
        if segment.1 > 0.0 {
            let left = 1.0 - ((x - segment.0) / segment.1).clamp(0.0, 1.0);
            for &(q, lam, st) in &chunk_overflow {
                let m = left * q * ((-lam * grid[k]).exp() - (-lam * grid[k + 1]).exp());
                faults += m;
                stall += m * st;
            }
        }
        for &(arrive, q, lam, st) in &arrivals {
            if arrive > x && q > 0.0 {
                let m = q * ((-lam * grid[k]).exp() - (-lam * grid[k + 1]).exp());
                faults += m;
                stall += m * st;
            }
        }
        (stall, faults)
    };
    let (mut s, mut faults, mut window_stall) = (0.0, 0.0, None);
    for k in 0..grid.len() - 1 {
        let x = (grid[k] + s) * b;
        if x >= pushed {
            break;
        }
        let (a, af) = absent(x, k);
        if af > 0.0 {
            let (c, cf) = absent((grid[k + 1] + s + a) * b, k);
            s += 0.5 * (a + c);
            faults += 0.5 * (af + cf);
        }
        if k + 1 == window {
            window_stall = Some(s);
        }
    }
    let window = window_stall.unwrap_or(s);
    let penalty = s;
    let a = pushed / b;
    let (w1, w2) = match params.policy {
        Policy::Weighted { w1, w2 } => (w1, w2),
        Policy::Gamma => (1.0, 1.0),
    };
    RefResult {
        precopy_s: duration,
        remainder: frozen,
        overflow: overflow_bytes,
        overflow_pages,
        overflow_chunks,
        rounds,
        downtime,
        uptime: a,
        total: duration + downtime + a,
        penalty,
        faults,
        window_stall: window,
        gamma: dt / (downtime + dt + window),
        gamma_weighted: {
            let den = w1 * downtime + w2 * penalty;
            if den < 1e-12 { 1e12 } else { 1.0 / den }
        },
    }
}
