//! From a profile to the engine's page order: the planner's ranking and `M`.
//!
//! - [`profile_writes`] samples the running guest's writes through the
//!   source backend's dirty log (`n` intervals of `tau`) and writes a profile
//!   in the planner's format. It does not see reads yet (that takes
//!   missing-page sampling of the mapping); until it does, it assumes a page
//!   is read in the intervals it is written (`r = w`) and says so.
//! - [`plan_in_process`] runs the planner library on a profile for a link.
//! - [`plan_from_segment`] takes the plan a separate `wanmig-planner serve`
//!   published in shared memory.
//! - [`order_from_rule`] turns the profile and the plan's page rule into a
//!   [`PageOrder`]: every page ranked exactly as the planner ranks it
//!   (integer key, then fewer writes, then populated first, then address),
//!   the top `round(M × pages)` pre-copied, checked page by page against the
//!   rule.

use std::path::Path;
use std::time::{Duration, Instant};

use wanmig_planner::model::{Link, ModelParams, rates::rank_cmp};
use wanmig_planner::profile::{
    ClassProfile, Kind, Profile, ProfileHeader, ProfileWriter, UnitCounters,
};
use wanmig_planner::rule::PrecopyRule;
use wanmig_planner::search::SearchOptions;
use wanmig_planner::segment::{PlanSnapshot, Segment};
use wanmig_planner::units::Rate;

use crate::backend::{BackendError, SourceBackend};
use crate::engine::source::page_bitmap;
use crate::engine::{PageOrder, PageOrderError};
use crate::report::Figures;

/// Planning failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanningError {
    /// The backend failed while profiling.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The profile could not be written or read.
    #[error("profile {path}: {message}")]
    Profile {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The planner refused.
    #[error("planner: {0}")]
    Planner(String),
    /// The profile does not describe this guest.
    #[error("the profile has {profile} pages, the guest {guest}")]
    Mismatch {
        /// Pages in the profile.
        profile: u64,
        /// Pages of the guest.
        guest: u64,
    },
    /// The order disagrees with the planner's rule (a bug or a foreign
    /// profile).
    #[error("page {page} is {what} the planner's pre-copy set but the ranking says otherwise")]
    RuleDisagrees {
        /// The page.
        page: u64,
        /// "in" or "not in".
        what: &'static str,
    },
    /// The plan does not fit the guest.
    #[error(transparent)]
    Order(#[from] PageOrderError),
}

fn profile_err(path: &Path) -> impl Fn(String) -> PlanningError + '_ {
    move |message| PlanningError::Profile {
        path: path.display().to_string(),
        message,
    }
}

/// What a write profile saw.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct WriteProfileStats {
    /// Intervals.
    pub samples: u32,
    /// Interval length, s.
    pub interval_s: f64,
    /// Pages written at least once.
    pub pages_written: u64,
    /// Page-intervals with a write (sum of `w`).
    pub write_events: u64,
}

/// Profiles the guest's writes for `samples` intervals of `interval` and
/// writes the profile to `out` (reads assumed where writes are; see the
/// module docs). `state_bytes` is the device-state estimate it records.
pub fn profile_writes(
    backend: &mut dyn SourceBackend,
    samples: u32,
    interval: Duration,
    state_bytes: u64,
    out: &Path,
) -> Result<WriteProfileStats, PlanningError> {
    let pages = backend.page_count();
    let ps = backend.page_size();
    let mut w = vec![0u16; pages as usize];
    let mut dirty = page_bitmap(pages, ps);
    backend.dirty_log_start()?;
    let start = Instant::now();
    for i in 1..=samples {
        let due = start + interval * i;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        dirty.clear();
        backend.dirty_log_collect(&mut dirty)?;
        for p in dirty.iter_set() {
            if let Some(c) = w.get_mut(p as usize) {
                *c = c.saturating_add(1);
            }
        }
    }
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
    let header = ProfileHeader {
        samples,
        interval_ns: interval.as_nanos() as u64,
        page_size: ps as u32,
        chunk_size: 64 << 10,
        page_count: pages,
        chunk_count: 0,
        state_bytes,
    };
    let err = profile_err(out);
    let mut writer = ProfileWriter::create(out, &header).map_err(|e| err(e.to_string()))?;
    let (mut pages_written, mut write_events) = (0u64, 0u64);
    for (p, &k) in w.iter().enumerate() {
        let k = u32::from(k);
        pages_written += u64::from(k > 0);
        write_events += u64::from(k);
        writer
            .push_page(UnitCounters {
                r: k,
                w: k,
                o: 0,
                zero: !populated.get(p as u64) && k == 0,
            })
            .map_err(|e| err(e.to_string()))?;
    }
    writer.finish().map_err(|e| err(e.to_string()))?;
    Ok(WriteProfileStats {
        samples,
        interval_s: interval.as_secs_f64(),
        pages_written,
        write_events,
    })
}

/// A plan the engine can execute.
#[derive(Debug, Clone)]
pub struct EnginePlan {
    /// The page order with its pre-copy prefix.
    pub order: PageOrder,
    /// Storage fraction.
    pub s: f64,
    /// The planner's prediction.
    pub predicted: Figures,
    /// Where the plan came from.
    pub origin: String,
}

fn figures(p: &wanmig_planner::segment::PlanFigures, expected_faults: f64) -> Figures {
    Figures {
        total_s: p.total_s,
        uptime_s: p.uptime_s,
        downtime_s: p.downtime_s,
        penalty_s: p.penalty_s,
        faults: expected_faults.round() as u64,
        bytes_sent: 0,
        gamma: p.gamma,
    }
}

/// Plans in-process: the planner library on `profile` for a link.
pub fn plan_in_process(
    profile_path: &Path,
    rate: Rate,
    rtt: Duration,
    downtime_target: Option<Duration>,
    guest_pages: u64,
) -> Result<EnginePlan, PlanningError> {
    let err = profile_err(profile_path);
    let profile = Profile::open(profile_path).map_err(|e| err(e.to_string()))?;
    let classes = ClassProfile::from_profile(&profile).map_err(|e| err(e.to_string()))?;
    let params = ModelParams {
        downtime_target: downtime_target.map(|d| d.as_secs_f64()),
        ..ModelParams::default()
    };
    let plan = wanmig_planner::plan::make_plan(
        &classes,
        Some(&profile),
        Link::new(rate, rtt),
        params,
        &SearchOptions::default(),
    )
    .map_err(|e| PlanningError::Planner(e.to_string()))?;
    let snapshot = PlanSnapshot::from_plan(&plan);
    let order = order_from_rule(&profile, &snapshot.page_rule, snapshot.m, guest_pages)?;
    Ok(EnginePlan {
        order,
        s: snapshot.s,
        predicted: figures(&snapshot.predicted, plan.prediction.expected_faults),
        origin: format!(
            "planner (in process) on {} at {rate} / {}",
            profile_path.display(),
            wanmig_planner::units::format_duration(rtt)
        ),
    })
}

/// Takes the plan a `wanmig-planner serve --segment NAME` published.
pub fn plan_from_segment(
    name: &str,
    profile_path: &Path,
    guest_pages: u64,
    wait: Duration,
) -> Result<EnginePlan, PlanningError> {
    let segment = Segment::open(name).map_err(|e| PlanningError::Planner(e.to_string()))?;
    let deadline = Instant::now() + wait;
    let snapshot = loop {
        match segment
            .read_plan()
            .map_err(|e| PlanningError::Planner(e.to_string()))?
        {
            Some(s) => break s,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            None => {
                return Err(PlanningError::Planner(format!(
                    "no plan in segment {name:?} yet"
                )));
            }
        }
    };
    let err = profile_err(profile_path);
    let profile = Profile::open(profile_path).map_err(|e| err(e.to_string()))?;
    let order = order_from_rule(&profile, &snapshot.page_rule, snapshot.m, guest_pages)?;
    Ok(EnginePlan {
        order,
        s: snapshot.s,
        predicted: figures(&snapshot.predicted, f64::NAN),
        origin: format!(
            "planner segment {name:?}, generation {}",
            snapshot.generation
        ),
    })
}

/// Ranks every page of `profile` as the planner does and pre-copies the top
/// `round(m × pages)`, checking each page against `rule`.
pub fn order_from_rule(
    profile: &Profile,
    rule: &PrecopyRule,
    m: f64,
    guest_pages: u64,
) -> Result<PageOrder, PlanningError> {
    let n = profile.header().samples;
    let pages = profile.count(Kind::Page);
    if pages != guest_pages {
        return Err(PlanningError::Mismatch {
            profile: pages,
            guest: guest_pages,
        });
    }
    let path = profile.path().to_path_buf();
    let err = profile_err(&path);
    let mut counters = Vec::with_capacity(pages as usize);
    profile
        .for_each(Kind::Page, |_, c| counters.push(c))
        .map_err(|e| err(e.to_string()))?;
    let mut order: Vec<u64> = (0..pages).collect();
    order.sort_by(|&a, &b| {
        rank_cmp(n, &counters[a as usize], &counters[b as usize]).then(a.cmp(&b))
    });
    let order = PageOrder::new(order, m)?;
    let mut scanner = rule.scanner();
    for p in 0..pages {
        let planned = scanner.contains(counters[p as usize], p);
        if planned != order.is_precopy(p) {
            return Err(PlanningError::RuleDisagrees {
                page: p,
                what: if planned { "in" } else { "not in" },
            });
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile where page `i` has `w = r = (i * 7) % (n + 1)` and every
    /// fifth page is zero.
    fn write_profile(path: &Path, pages: u64, n: u32) {
        let header = ProfileHeader {
            samples: n,
            interval_ns: 250_000_000,
            page_size: 4096,
            chunk_size: 64 << 10,
            page_count: pages,
            chunk_count: 0,
            state_bytes: 300_000,
        };
        let mut w = ProfileWriter::create(path, &header).unwrap();
        for i in 0..pages {
            let k = ((i * 7) % u64::from(n + 1)) as u32;
            w.push_page(UnitCounters {
                r: k,
                w: k,
                o: 0,
                zero: i % 5 == 0 && k == 0,
            })
            .unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn the_order_matches_the_planners_rule_at_every_fraction() {
        let path = std::env::temp_dir().join(format!("wanmig-order-{}.wmp", std::process::id()));
        write_profile(&path, 5000, 20);
        let profile = Profile::open(&path).unwrap();
        let classes = ClassProfile::from_profile(&profile).unwrap();
        let rate: Rate = "40mbit".parse().unwrap();
        let plan = wanmig_planner::plan::make_plan(
            &classes,
            Some(&profile),
            Link::new(rate, Duration::from_millis(5)),
            ModelParams::default(),
            &SearchOptions::default(),
        )
        .unwrap();
        let snap = PlanSnapshot::from_plan(&plan);
        let order = order_from_rule(&profile, &snap.page_rule, snap.m, 5000).unwrap();
        assert_eq!(
            order.precopy().len() as u64,
            (snap.m * 5000.0).round() as u64
        );
        // Hottest first: the write counts along the order never increase
        // within the key order (r = w here, so the key orders by w).
        let w = |p: u64| (p * 7) % 21;
        let ws: Vec<u64> = order
            .precopy()
            .iter()
            .chain(order.postcopy())
            .map(|&p| w(p))
            .collect();
        assert!(ws.windows(2).all(|x| x[0] >= x[1]), "not hottest first");
        // A guest of another size is refused.
        assert!(matches!(
            order_from_rule(&profile, &snap.page_rule, snap.m, 4096),
            Err(PlanningError::Mismatch {
                profile: 5000,
                guest: 4096
            })
        ));
        // An M that disagrees with the rule is caught page by page.
        let other = if snap.m > 0.5 { 0.1 } else { 0.9 };
        assert!(matches!(
            order_from_rule(&profile, &snap.page_rule, other, 5000),
            Err(PlanningError::RuleDisagrees { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
