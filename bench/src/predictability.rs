//! Per-unit predictability, as in the seed's Tables I and II: for every page
//! and chunk, did the profile predict that the guest would read (write) it
//! within the post-copy horizon, and did it?
//!
//! Two predictors read the same profile (`n` intervals of `tau`), side by
//! side; each predicts a unit to be accessed within the horizon `H` when
//! its Poisson rate gives `1 - exp(-rate H) >= 1/2`:
//!
//! - **per unit** (the seed's tables): a unit whose counter is `k` has the
//!   rate `ell(k) / tau`, its own count and nothing else;
//! - **the planner's** ([`PlannerPredictability`]): the rates the planner's
//!   model uses for fault probabilities, taken from the planner's own code
//!   ([`ClassProfile::read_rates`]): populated pages' read rates pooled
//!   across the guest's pages and populated chunks' across its chunks
//!   ([`ModelParams::pool_reads`], the default), so a unit the profile never
//!   saw read keeps a small rate; writes scaled by
//!   [`ModelParams::write_scale`] (1 by default); never-populated pages and
//!   chunks read at their own `ell(k) / tau`. Only reads differ from the
//!   per-unit predictor under the default parameters. (The planner's
//!   *ranking* is by the per-unit counters whatever the pooling; the pooled
//!   rates decide how often the pages left to post-copy fault.)
//!
//! The truth is a second profile taken right after the first, one window
//! of `H`, reads sampled on all of RAM (exact, at a cost to the guest that
//! only this measurement pays): a unit was read (written) if its counter
//! there is non-zero.
//!
//! "Read" is what the profiler's read sampling sees: the first access of an
//! interval to a page (a write that finds the page unmapped counts too),
//! and NBD reads of a chunk; "written" is the write log's and the NBD
//! writes'.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use wanmig_datapath::backend::qemu::{GuestSpec, QemuPaths, QemuSource, SerialLog};
use wanmig_datapath::migration::warm_up;
use wanmig_datapath::profiling::{ProfileOptions, profile_guest};
use wanmig_planner::model::ModelParams;
use wanmig_planner::model::rates::{RateTable, p_any, unscaled_rate};
use wanmig_planner::profile::{ClassProfile, Kind, Profile, UnitCounters};

/// A 2x2 table: predicted to be accessed within the horizon or not, against
/// accessed or not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    /// Predicted and accessed.
    pub predicted_and_accessed: u64,
    /// Predicted, not accessed.
    pub predicted_not_accessed: u64,
    /// Accessed, not predicted.
    pub accessed_not_predicted: u64,
    /// Neither.
    pub neither: u64,
}

impl Confusion {
    fn add(&mut self, predicted: bool, accessed: bool) {
        match (predicted, accessed) {
            (true, true) => self.predicted_and_accessed += 1,
            (true, false) => self.predicted_not_accessed += 1,
            (false, true) => self.accessed_not_predicted += 1,
            (false, false) => self.neither += 1,
        }
    }

    /// Units in the table.
    pub fn units(&self) -> u64 {
        self.predicted_and_accessed
            + self.predicted_not_accessed
            + self.accessed_not_predicted
            + self.neither
    }

    /// The share of units predicted right (`NaN` for an empty table).
    pub fn accuracy(&self) -> f64 {
        (self.predicted_and_accessed + self.neither) as f64 / self.units() as f64
    }
}

/// One kind of access to one kind of unit: the table and its accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Predictability {
    /// The share predicted right.
    pub accuracy: f64,
    /// The table.
    pub table: Confusion,
}

impl From<Confusion> for Predictability {
    fn from(table: Confusion) -> Self {
        Predictability {
            accuracy: table.accuracy(),
            table,
        }
    }
}

/// The evaluation's `unit_prediction_accuracy`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct UnitPredictionAccuracy {
    /// The horizon `H`, s.
    pub horizon_s: f64,
    /// Pages read, per-unit predictor.
    pub memory_read: Predictability,
    /// Pages written, per-unit predictor.
    pub memory_write: Predictability,
    /// Chunks read, per-unit predictor (`null`: no disk).
    pub storage_read: Option<Predictability>,
    /// Chunks written, per-unit predictor (`null`: no disk).
    pub storage_write: Option<Predictability>,
    /// The same units and truth, predicted by the planner's own rates.
    pub planner: PlannerPredictability,
}

/// The tables of the planner's own predictor: the rates its model gives
/// each unit (see the module docs), same horizon, same truth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PlannerPredictability {
    /// Whether page reads were pooled across the guest
    /// ([`ModelParams::pool_reads`]; the planner's default is true).
    pub pooled_reads: bool,
    /// Pages read.
    pub memory_read: Predictability,
    /// Pages written.
    pub memory_write: Predictability,
    /// Chunks read (`null`: no disk).
    pub storage_read: Option<Predictability>,
    /// Chunks written (`null`: no disk).
    pub storage_write: Option<Predictability>,
}

/// The profiles do not describe the same guest.
#[derive(Debug, thiserror::Error)]
pub enum PredictabilityError {
    /// A profile could not be read.
    #[error("profile {path}: {message}")]
    Profile {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The two profiles have different unit counts.
    #[error("the profiles differ: {what} {predicted} vs {observed}")]
    Mismatch {
        /// Pages or chunks.
        what: &'static str,
        /// In the predicting profile.
        predicted: u64,
        /// In the observed one.
        observed: u64,
    },
    /// Running the guest or profiling it.
    #[error("{0}")]
    Guest(String),
}

fn counters(
    p: &Profile,
    path: &Path,
    kind: Kind,
) -> Result<Vec<UnitCounters>, PredictabilityError> {
    let mut out = Vec::with_capacity(p.count(kind) as usize);
    p.for_each(kind, |_, c| out.push(c))
        .map_err(|e| PredictabilityError::Profile {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    Ok(out)
}

/// The tables of the profile at `predicting` against the one at
/// `observed` (its window is the horizon), the planner's predictor with the
/// planner's default parameters.
pub fn compare(
    predicting: &Path,
    observed: &Path,
) -> Result<UnitPredictionAccuracy, PredictabilityError> {
    compare_with(predicting, observed, &ModelParams::default())
}

/// [`compare`], the planner's predictor with `params` (its `pool_reads` and
/// `write_scale`).
pub fn compare_with(
    predicting: &Path,
    observed: &Path,
    params: &ModelParams,
) -> Result<UnitPredictionAccuracy, PredictabilityError> {
    let open = |path: &Path| {
        Profile::open(path).map_err(|e| PredictabilityError::Profile {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    };
    let (a, b) = (open(predicting)?, open(observed)?);
    let (ha, hb) = (a.header(), b.header());
    let horizon = hb.interval_ns as f64 * 1e-9 * f64::from(hb.samples);
    let tau = ha.interval_ns as f64 * 1e-9;
    let n = ha.samples;
    // Predicted within H: 1 - exp(-ell H / tau) >= 1/2, ell unscaled.
    let within = |ell: f64| p_any(ell * horizon / tau) >= 0.5;
    let per_unit = |k: u32| k > 0 && within(unscaled_rate(k, n));
    // The planner's rates, from the class profile it plans with.
    let classes = ClassProfile::from_profile(&a).map_err(|e| PredictabilityError::Profile {
        path: predicting.display().to_string(),
        message: e.to_string(),
    })?;
    let reads = [Kind::Page, Kind::Chunk].map(|k| classes.read_rates(k, params.pool_reads));
    let own = RateTable::new(n);
    let planner_read = |kind: Kind, c: &UnitCounters| {
        within(if c.zero {
            own.ell(c.r)
        } else {
            reads[usize::from(kind == Kind::Chunk)][c.r.min(n) as usize]
        })
    };
    let planner_write = |c: &UnitCounters| within(own.ell(c.w) * params.write_scale);
    // [kind][read, write] of [per unit, planner].
    let mut tables = [[[Confusion::default(); 2]; 2]; 2];
    for (i, kind) in [Kind::Page, Kind::Chunk].into_iter().enumerate() {
        let (ca, cb) = (
            counters(&a, predicting, kind)?,
            counters(&b, observed, kind)?,
        );
        if ca.len() != cb.len() {
            return Err(PredictabilityError::Mismatch {
                what: if i == 0 { "pages" } else { "chunks" },
                predicted: ca.len() as u64,
                observed: cb.len() as u64,
            });
        }
        for (x, y) in ca.iter().zip(&cb) {
            let (read, written) = (y.r > 0, y.w > 0);
            tables[i][0][0].add(per_unit(x.r), read);
            tables[i][1][0].add(per_unit(x.w), written);
            tables[i][0][1].add(planner_read(kind, x), read);
            tables[i][1][1].add(planner_write(x), written);
        }
    }
    let chunks = a.count(Kind::Chunk) > 0;
    let side = |p: usize| {
        (
            tables[0][0][p].into(),
            tables[0][1][p].into(),
            chunks.then(|| tables[1][0][p].into()),
            chunks.then(|| tables[1][1][p].into()),
        )
    };
    let (memory_read, memory_write, storage_read, storage_write) = side(0);
    let planner = {
        let (memory_read, memory_write, storage_read, storage_write) = side(1);
        PlannerPredictability {
            pooled_reads: params.pool_reads,
            memory_read,
            memory_write,
            storage_read,
            storage_write,
        }
    };
    Ok(UnitPredictionAccuracy {
        horizon_s: horizon,
        memory_read,
        memory_write,
        storage_read,
        storage_write,
        planner,
    })
}

/// How to measure.
#[derive(Debug, Clone)]
pub struct PredictabilityOptions {
    /// The predicting profile's intervals.
    pub samples: u32,
    /// Their length.
    pub interval: Duration,
    /// The horizon, observed as this many intervals ...
    pub horizon_samples: u32,
    /// ... of this length.
    pub horizon_interval: Duration,
}

/// Starts `guest` alone (no migration), lets its workloads warm up,
/// profiles it as the planner would, then observes it for the horizon with
/// every read sampled, and compares.
pub fn measure(
    guest: &GuestSpec,
    o: &PredictabilityOptions,
    dir: &Path,
    tag: &str,
) -> Result<UnitPredictionAccuracy, PredictabilityError> {
    let g =
        |what: &'static str| move |e: String| PredictabilityError::Guest(format!("{what}: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| g("run directory")(e.to_string()))?;
    let paths = QemuPaths::new(dir, tag, "source");
    let mut src = QemuSource::start(guest, &paths, dir)
        .map_err(|e| g("starting the guest")(e.to_string()))?;
    let (predicting, observed) = (dir.join("predicting.wmp"), dir.join("observed.wmp"));
    let result = (|| {
        // The page checker's heartbeats, and each disk workload's (sysbench
        // makes a file system first).
        let mut log = SerialLog::new(&paths.serial);
        let disk_heartbeats = usize::from(!guest.disks.is_empty()) * 2;
        warm_up(&mut log, 3, disk_heartbeats, &paths.serial)
            .map_err(|e| g("warming up")(e.to_string()))?;
        let state = 300_000;
        profile_guest(
            &mut src,
            &ProfileOptions::new(o.samples, o.interval, state),
            &predicting,
        )
        .map_err(|e| g("profiling")(e.to_string()))?;
        let truth = ProfileOptions {
            read_budget: Some(f64::INFINITY),
            ..ProfileOptions::new(o.horizon_samples, o.horizon_interval, state)
        };
        profile_guest(&mut src, &truth, &observed).map_err(|e| g("observing")(e.to_string()))?;
        compare(&predicting, &observed)
    })();
    drop(src);
    for f in [&paths.ram, &paths.uffd_sock, &predicting, &observed] {
        let _ = std::fs::remove_file(f);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use wanmig_planner::profile::{ProfileHeader, ProfileWriter};

    /// Counters `(r, w)`, never populated when both are 0.
    fn c(&(r, w): &(u32, u32)) -> UnitCounters {
        UnitCounters {
            r,
            w,
            o: 0,
            zero: r == 0 && w == 0,
        }
    }

    fn write(
        path: &Path,
        samples: u32,
        interval_ms: u64,
        pages: &[(u32, u32)],
        chunks: &[(u32, u32)],
    ) {
        let pages: Vec<UnitCounters> = pages.iter().map(c).collect();
        let chunks: Vec<UnitCounters> = chunks.iter().map(c).collect();
        write_units(path, samples, interval_ms, &pages, &chunks);
    }

    fn write_units(
        path: &Path,
        samples: u32,
        interval_ms: u64,
        pages: &[UnitCounters],
        chunks: &[UnitCounters],
    ) {
        let header = ProfileHeader {
            samples,
            interval_ns: interval_ms * 1_000_000,
            page_size: 4096,
            chunk_size: 64 << 10,
            page_count: pages.len() as u64,
            chunk_count: chunks.len() as u64,
            state_bytes: 0,
        };
        let mut w = ProfileWriter::create(path, &header).unwrap();
        for &p in pages {
            w.push_page(p).unwrap();
        }
        for &ch in chunks {
            w.push_chunk(ch).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn tables_count_each_unit_once_against_the_horizon() {
        let dir = std::env::temp_dir().join(format!("wanmig-pred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.wmp"), dir.join("b.wmp"));
        // Predicting: 20 x 250 ms. Observed: one window of 20 s (20 x 1 s).
        // Page 0: read in 10 of 20 intervals (rate 2.8/s: surely within
        // 20 s), read then. Page 1: never, never. Page 2: read in 1 of 20
        // (0.2/s: p = 0.98 within 20 s, predicted), not read (a miss).
        // Page 3: never read in the profile, read later (a miss).
        write(
            &a,
            20,
            250,
            &[(10, 0), (0, 0), (1, 1), (0, 3)],
            &[(0, 2), (5, 0)],
        );
        write(
            &b,
            20,
            1000,
            &[(4, 0), (0, 0), (0, 1), (2, 0)],
            &[(0, 1), (0, 0)],
        );
        let t = compare(&a, &b).unwrap();
        assert_eq!(t.horizon_s, 20.0);
        assert_eq!(
            t.memory_read.table,
            Confusion {
                predicted_and_accessed: 1,
                predicted_not_accessed: 1,
                accessed_not_predicted: 1,
                neither: 1
            }
        );
        assert_eq!(t.memory_read.accuracy, 0.5);
        // Writes: page 2 and 3 predicted; 2 written; 0, 1 neither.
        assert_eq!(t.memory_write.table.predicted_and_accessed, 1);
        assert_eq!(t.memory_write.table.predicted_not_accessed, 1);
        assert_eq!(t.memory_write.table.neither, 2);
        assert_eq!(t.memory_write.accuracy, 0.75);
        let sr = t.storage_read.unwrap();
        assert_eq!(sr.table.predicted_not_accessed, 1);
        assert_eq!(sr.table.neither, 1);
        assert_eq!(t.storage_write.unwrap().accuracy, 1.0);
        // A short horizon predicts a rare access will not come.
        write(
            &b,
            1,
            1000,
            &[(0, 0), (0, 0), (0, 0), (0, 0)],
            &[(0, 0), (0, 0)],
        );
        let short = compare(&a, &b).unwrap();
        assert_eq!(short.memory_read.table.predicted_and_accessed, 0);
        assert_eq!(
            short.memory_read.table.predicted_not_accessed, 1,
            "only page 0"
        );
        // Different guests are refused.
        write(&b, 20, 1000, &[(0, 0)], &[]);
        assert!(matches!(
            compare(&a, &b),
            Err(PredictabilityError::Mismatch { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A sweep: 16 populated pages never seen read, 4 seen read once in 20
    /// intervals of 250 ms, and one never-populated page. The planner pools
    /// the populated pages' reads (a read in 1 % of the intervals each: p =
    /// 0.55 within 20 s), so it predicts every populated page read; the
    /// per-unit predictor only the 4. Both leave the never-populated page
    /// at rate 0. A table built from unpooled rates fails here.
    #[test]
    fn the_planner_table_follows_the_planners_pooled_reads() {
        let dir = std::env::temp_dir().join(format!("wanmig-pred-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.wmp"), dir.join("b.wmp"));
        let populated = |r: u32, w: u32| UnitCounters {
            r,
            w,
            o: 0,
            zero: false,
        };
        // Pages 0..4 read once (4..8 written once too), 4..20 never seen
        // read, 20 never populated.
        let mut pages: Vec<UnitCounters> = (0..20)
            .map(|i| populated(u32::from(i < 4), u32::from((4..8).contains(&i))))
            .collect();
        pages.push(UnitCounters {
            r: 0,
            w: 0,
            o: 0,
            zero: true,
        });
        let chunks = [populated(1, 0), populated(0, 3)];
        write_units(&a, 20, 250, &pages, &chunks);
        // Observed over 20 s: pages 0, 1 and 10..16 read, the unpopulated
        // page 20 read too; pages 4, 5 written; chunk 1 written.
        let observed: Vec<(u32, u32)> = (0..21)
            .map(|i| {
                (
                    u32::from(i < 2 || (10..16).contains(&i) || i == 20),
                    u32::from(i == 4 || i == 5),
                )
            })
            .collect();
        write(&b, 20, 1000, &observed, &[(0, 0), (0, 1)]);

        // The premise, from the planner's own code: pooling makes an unseen
        // populated page likely read within the horizon (H / tau = 80),
        // while its own count gives it rate 0.
        let classes = ClassProfile::from_profile(&Profile::open(&a).unwrap()).unwrap();
        let pooled = classes.read_rates(Kind::Page, true);
        assert!(ModelParams::default().pool_reads, "the planner pools");
        assert!(p_any(pooled[0] * 80.0) >= 0.5, "{pooled:?}");
        assert_eq!(classes.read_rates(Kind::Page, false)[0], 0.0);

        let t = compare(&a, &b).unwrap();
        // Per unit: pages 0..4 predicted (0, 1 read; 2, 3 not); of the
        // rest, 10..16 and 20 read unpredicted, 4..10 and 16..20 neither.
        assert_eq!(
            t.memory_read.table,
            Confusion {
                predicted_and_accessed: 2,
                predicted_not_accessed: 2,
                accessed_not_predicted: 7,
                neither: 10
            }
        );
        // The planner: all 20 populated pages predicted, page 20 not.
        assert!(t.planner.pooled_reads);
        assert_eq!(
            t.planner.memory_read.table,
            Confusion {
                predicted_and_accessed: 8,
                predicted_not_accessed: 12,
                accessed_not_predicted: 1,
                neither: 0
            }
        );
        assert_eq!(t.planner.memory_read.accuracy, 8.0 / 21.0);
        // Writes are not pooled: the same tables.
        assert_eq!(t.planner.memory_write, t.memory_write);
        assert_eq!(t.planner.storage_write, t.storage_write);
        // Chunks' reads are pooled across the chunks: chunk 1, never seen
        // read, is predicted read beside chunk 0 (neither was).
        assert_eq!(
            t.storage_read.unwrap().table,
            Confusion {
                predicted_and_accessed: 0,
                predicted_not_accessed: 1,
                accessed_not_predicted: 0,
                neither: 1
            }
        );
        assert_eq!(
            t.planner.storage_read.unwrap().table,
            Confusion {
                predicted_and_accessed: 0,
                predicted_not_accessed: 2,
                accessed_not_predicted: 0,
                neither: 0
            }
        );
        assert_eq!(t.memory_write.table.predicted_and_accessed, 2);
        assert_eq!(t.memory_write.table.predicted_not_accessed, 2);

        // The planner without pooling is the per-unit predictor.
        let own = ModelParams {
            pool_reads: false,
            ..ModelParams::default()
        };
        let u = compare_with(&a, &b, &own).unwrap();
        assert!(!u.planner.pooled_reads);
        assert_eq!(u.planner.memory_read, u.memory_read);
        assert_eq!(u.memory_read, t.memory_read);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
