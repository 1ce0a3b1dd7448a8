//! From a profile to the engine's page order: the planner's ranking and `M`.
//!
//! - [`profile_guest`](crate::profiling::profile_guest) (in
//!   [`profiling`](crate::profiling)) writes the profile these read.
//! - [`plan_in_process`] runs the planner library on a profile for a link.
//! - [`plan_from_segment`] takes the plan a separate `wanmig-planner serve`
//!   published in shared memory.
//! - [`order_from_rule`] turns the profile and the plan's page rule into a
//!   [`PageOrder`]: every page ranked exactly as the planner ranks it
//!   (integer key, then fewer writes, then populated first, then address),
//!   the top `round(M × pages)` pre-copied, checked page by page against the
//!   rule. The order carries the plan's strategy (round limit and freeze
//!   policy, [`PageOrder::with_strategy`]): the engine executes the plan
//!   the planner chose, a one-pass pre-copy or a freeze that post-copies
//!   what does not fit the downtime target included.

use std::path::Path;
use std::time::{Duration, Instant};

use wanmig_planner::model::{Link, ModelParams, WireCost, rates::rank_cmp};
use wanmig_planner::profile::{ClassProfile, Kind, Profile, UnitCounters};
use wanmig_planner::rule::PrecopyRule;
use wanmig_planner::search::SearchOptions;
use wanmig_planner::segment::{PlanSnapshot, Segment};
use wanmig_planner::units::Rate;

use crate::backend::BackendError;
use crate::engine::{NO_PAGE, PageOrder, PageOrderError};
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
    #[error("the profile has {profile} {what}s, the guest {guest}")]
    Mismatch {
        /// "page" or "chunk".
        what: &'static str,
        /// Pages in the profile.
        profile: u64,
        /// Pages of the guest.
        guest: u64,
    },
    /// The order disagrees with the planner's rule (a bug or a foreign
    /// profile).
    #[error("{what} {unit} is {set} the planner's pre-copy set but the ranking says otherwise")]
    RuleDisagrees {
        /// "page" or "chunk".
        what: &'static str,
        /// The unit.
        unit: u64,
        /// "in" or "not in".
        set: &'static str,
    },
    /// The plan does not fit the guest.
    #[error(transparent)]
    Order(#[from] PageOrderError),
}

pub(crate) fn profile_err(path: &Path) -> impl Fn(String) -> PlanningError + '_ {
    move |message| PlanningError::Profile {
        path: path.display().to_string(),
        message,
    }
}

/// A plan the engine can execute.
#[derive(Debug, Clone)]
pub struct EnginePlan {
    /// The page order with its pre-copy prefix, and the chunk order (its
    /// prefix the plan's `S`) if the profile has chunks.
    pub order: PageOrder,
    /// Whether the profile had chunks (`order` carries their order).
    pub has_chunks: bool,
    /// Storage fraction.
    pub s: f64,
    /// The planner's prediction.
    pub predicted: Figures,
    /// The link the planner assumed (`None`: planned elsewhere).
    pub link: Option<Link>,
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

/// How many unit bytes the engine carries per byte on the link (LZ4 and
/// frame headers), by kind and by whether the profile saw the unit
/// written: the working data the guest rewrites (what pre-copy rounds and
/// the freeze resend, and faults fetch) compresses differently from the
/// rest (most of round 0 and of the post-copy push).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct WireRatios {
    /// Pages the guest wrote while profiled.
    pub page_written: f64,
    /// The other non-zero pages.
    pub page_unwritten: f64,
    /// Chunks the guest wrote while profiled.
    pub chunk_written: f64,
    /// The other chunks with data.
    pub chunk_unwritten: f64,
}

impl WireRatios {
    /// One line for a report: how pages (and chunks, `with_chunks`)
    /// compress on the wire.
    pub fn describe(&self, with_chunks: bool) -> String {
        let mut s = format!(
            "on the wire pages compress {:.2}x, {:.2}x those the guest rewrites",
            self.page_unwritten, self.page_written
        );
        if with_chunks {
            s.push_str(&format!(
                ", chunks {:.2}x, {:.2}x those it rewrites",
                self.chunk_unwritten, self.chunk_written
            ));
        }
        s
    }

    /// The planner's link bytes per unit byte (a ratio below 1e-3 is taken
    /// as 1e-3: no content expands a thousandfold).
    pub fn costs(&self) -> WireCost {
        let cost = |r: f64| 1.0 / r.max(1e-3);
        WireCost {
            page_written: cost(self.page_written),
            page_unwritten: cost(self.page_unwritten),
            chunk_written: cost(self.chunk_written),
            chunk_unwritten: cost(self.chunk_unwritten),
        }
    }
}

/// Plans in-process: the planner library on `profile` for a link of `rate`
/// on which units cost what `wire` says (how the guest's content
/// compresses on the wire).
pub fn plan_in_process(
    profile_path: &Path,
    rate: Rate,
    rtt: Duration,
    downtime_target: Option<Duration>,
    guest: GuestUnits,
    wire: WireRatios,
) -> Result<EnginePlan, PlanningError> {
    let err = profile_err(profile_path);
    let profile = Profile::open(profile_path).map_err(|e| err(e.to_string()))?;
    let classes = ClassProfile::from_profile(&profile).map_err(|e| err(e.to_string()))?;
    let params = ModelParams {
        downtime_target: downtime_target.map(|d| d.as_secs_f64()),
        ..ModelParams::default()
    };
    let link = Link {
        wire: wire.costs(),
        ..Link::new(rate, rtt)
    };
    let plan = wanmig_planner::plan::make_plan(
        &classes,
        Some(&profile),
        link,
        params,
        &SearchOptions::default(),
    )
    .map_err(|e| PlanningError::Planner(e.to_string()))?;
    let snapshot = PlanSnapshot::from_plan(&plan);
    let (order, has_chunks) = orders(&profile, &snapshot, guest)?;
    Ok(EnginePlan {
        order,
        has_chunks,
        s: snapshot.s,
        predicted: figures(&snapshot.predicted, plan.prediction.expected_faults),
        link: Some(link),
        origin: format!(
            "planner (in process) on {} at {rate} / {}",
            profile_path.display(),
            wanmig_planner::units::format_duration(rtt)
        ),
    })
}

/// Takes the plan a `wanmig-planner serve --segment NAME` published, and
/// the channel that keeps the engine in that planner's loop (telemetry out,
/// newer plans in).
pub fn plan_from_segment(
    name: &str,
    profile_path: &Path,
    guest: GuestUnits,
    wait: Duration,
) -> Result<(EnginePlan, SegmentChannel), PlanningError> {
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
    let (order, has_chunks) = orders(&profile, &snapshot, guest)?;
    let plan = EnginePlan {
        order,
        has_chunks,
        s: snapshot.s,
        predicted: figures(&snapshot.predicted, f64::NAN),
        link: None,
        origin: format!(
            "planner segment {name:?}, generation {}",
            snapshot.generation
        ),
    };
    let channel = SegmentChannel {
        segment,
        profile,
        guest,
        generation: snapshot.generation,
        refused: Vec::new(),
    };
    Ok((plan, channel))
}

/// The engine's side of a `wanmig-planner serve` segment: telemetry out,
/// newer plans in (ranked against the same profile as the first).
pub struct SegmentChannel {
    segment: Segment,
    profile: Profile,
    guest: GuestUnits,
    generation: u64,
    /// Newer plans that could not be applied, and why (the engine goes on
    /// with the one it has).
    pub refused: Vec<(u64, String)>,
}

impl std::fmt::Debug for SegmentChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentChannel")
            .field("segment", &self.segment.path())
            .field("generation", &self.generation)
            .finish()
    }
}

impl crate::engine::PlanChannel for SegmentChannel {
    fn publish(&mut self, t: &crate::engine::plan_channel::Telemetry) {
        // Best effort: a planner that went away must not stop a migration.
        let _ = self.segment.publish_telemetry(t);
    }

    fn initial_generation(&self) -> u64 {
        self.generation
    }

    fn newer_plan(&mut self) -> Option<crate::engine::NewPlan> {
        let snap = self.segment.read_plan().ok().flatten()?;
        if snap.generation <= self.generation {
            return None;
        }
        let generation = snap.generation;
        self.generation = generation;
        let built = orders(&self.profile, &snap, self.guest).and_then(|(order, has_chunks)| {
            Ok(if !has_chunks && self.guest.chunks > 0 {
                // As for the first plan: disks the profile did not see
                // are pre-copied whole.
                order.with_chunks(PageOrder::by_address(self.guest.chunks, 1.0)?)
            } else {
                order
            })
        });
        match built {
            Ok(order) => Some(crate::engine::NewPlan { generation, order }),
            Err(e) => {
                self.refused.push((generation, e.to_string()));
                None
            }
        }
    }
}

/// How many pages and chunks the guest has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestUnits {
    /// Pages of RAM.
    pub pages: u64,
    /// Chunks of all its disks (0 without disks).
    pub chunks: u64,
}

/// The page order (with the chunk order merged into its push, if the
/// profile has chunks), and whether it has chunks. Each kind's counters are
/// read once, for its ranking and for the merge.
fn orders(
    profile: &Profile,
    plan: &PlanSnapshot,
    guest: GuestUnits,
) -> Result<(PageOrder, bool), PlanningError> {
    let n = profile.header().samples;
    let page_counters = counters_of(profile, Kind::Page, guest.pages)?;
    let pages = rank_units(n, Kind::Page, &page_counters, &plan.page_rule, plan.m)?
        .with_strategy(Some(plan.strategy.freeze), Some(plan.strategy.max_rounds));
    if profile.count(Kind::Chunk) == 0 {
        return Ok((pages, false));
    }
    let chunk_counters = counters_of(profile, Kind::Chunk, guest.chunks)?;
    let chunks = rank_units(n, Kind::Chunk, &chunk_counters, &plan.chunk_rule, plan.s)?;
    let after = chunks_after(n, &page_counters, &pages, &chunk_counters, &chunks);
    Ok((pages.with_ranked_chunks(chunks, after)?, true))
}

/// For each chunk of `chunks` (in its order), the last page of `pages`
/// that ranks ahead of it ([`NO_PAGE`] if none): the post-copy push sends
/// both kinds in one ranking, as the model integrates it (a page before a
/// chunk of the same rank).
fn chunks_after(
    n: u32,
    page_counters: &[UnitCounters],
    pages: &PageOrder,
    chunk_counters: &[UnitCounters],
    chunks: &PageOrder,
) -> Vec<u64> {
    let page_units = pages.units();
    let mut i = 0;
    chunks
        .units()
        .iter()
        .map(|&c| {
            while i < page_units.len()
                && rank_cmp(
                    n,
                    &page_counters[page_units[i] as usize],
                    &chunk_counters[c as usize],
                ) != std::cmp::Ordering::Greater
            {
                i += 1;
            }
            if i == 0 { NO_PAGE } else { page_units[i - 1] }
        })
        .collect()
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Page => "page",
        Kind::Chunk => "chunk",
    }
}

/// Every unit's counters of `kind`, in address order, for a guest with
/// `guest_units` of them.
fn counters_of(
    profile: &Profile,
    kind: Kind,
    guest_units: u64,
) -> Result<Vec<UnitCounters>, PlanningError> {
    let units = profile.count(kind);
    if units != guest_units {
        return Err(PlanningError::Mismatch {
            what: kind_name(kind),
            profile: units,
            guest: guest_units,
        });
    }
    let err = profile_err(profile.path());
    let mut counters = Vec::with_capacity(units as usize);
    profile
        .for_each(kind, |_, c| counters.push(c))
        .map_err(|e| err(e.to_string()))?;
    Ok(counters)
}

/// Ranks every unit of `kind` in `profile` as the planner does and
/// pre-copies the top `round(fraction × units)`, checking each against
/// `rule`.
pub fn order_from_rule(
    profile: &Profile,
    kind: Kind,
    rule: &PrecopyRule,
    fraction: f64,
    guest_units: u64,
) -> Result<PageOrder, PlanningError> {
    let counters = counters_of(profile, kind, guest_units)?;
    rank_units(profile.header().samples, kind, &counters, rule, fraction)
}

/// [`order_from_rule`] on counters already read (`n` intervals).
fn rank_units(
    n: u32,
    kind: Kind,
    counters: &[UnitCounters],
    rule: &PrecopyRule,
    fraction: f64,
) -> Result<PageOrder, PlanningError> {
    let units = counters.len() as u64;
    let mut order: Vec<u64> = (0..units).collect();
    order.sort_by(|&a, &b| {
        rank_cmp(n, &counters[a as usize], &counters[b as usize]).then(a.cmp(&b))
    });
    let order = PageOrder::new(order, fraction)?;
    let mut scanner = rule.scanner();
    for u in 0..units {
        let planned = scanner.contains(counters[u as usize], u);
        if planned != order.is_precopy(u) {
            return Err(PlanningError::RuleDisagrees {
                what: kind_name(kind),
                unit: u,
                set: if planned { "in" } else { "not in" },
            });
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wanmig_planner::profile::{ProfileHeader, ProfileWriter};

    /// A profile where page `i` has `w = r = (i * 7) % (n + 1)` and every
    /// fifth page is zero.
    fn write_profile(path: &Path, pages: u64, n: u32) {
        write_profile_with_chunks(path, pages, 0, n)
    }

    /// The page counters of [`write_profile`].
    fn page_counters(i: u64, n: u32) -> UnitCounters {
        let k = ((i * 7) % u64::from(n + 1)) as u32;
        UnitCounters {
            r: k,
            w: k,
            o: 0,
            zero: i % 5 == 0 && k == 0,
        }
    }

    /// The chunk counters of [`write_profile_with_chunks`].
    fn chunk_counters(c: u64, n: u32) -> UnitCounters {
        let n = u64::from(n);
        let w = ((c * 5) % (n + 1)) as u32;
        UnitCounters {
            r: ((c * 3) % (n + 1)) as u32,
            w,
            o: w / 2,
            zero: c % 7 == 0 && w == 0,
        }
    }

    /// [`write_profile`] with `chunks` chunks as [`chunk_counters`] says.
    fn write_profile_with_chunks(path: &Path, pages: u64, chunks: u64, n: u32) {
        let header = ProfileHeader {
            samples: n,
            interval_ns: 250_000_000,
            page_size: 4096,
            chunk_size: 64 << 10,
            page_count: pages,
            chunk_count: chunks,
            state_bytes: 300_000,
        };
        let mut w = ProfileWriter::create(path, &header).unwrap();
        for i in 0..pages {
            w.push_page(page_counters(i, n)).unwrap();
        }
        for c in 0..chunks {
            w.push_chunk(chunk_counters(c, n)).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn chunks_are_ranked_as_the_planner_ranks_them_with_s_as_prefix() {
        let path = std::env::temp_dir().join(format!("wanmig-chunks-{}.wmp", std::process::id()));
        let (pages, chunks, n) = (4096, 3000, 10);
        write_profile_with_chunks(&path, pages, chunks, n);
        let profile = Profile::open(&path).unwrap();
        let classes = ClassProfile::from_profile(&profile).unwrap();
        let plan = wanmig_planner::plan::make_plan(
            &classes,
            Some(&profile),
            Link::new("40mbit".parse().unwrap(), Duration::from_millis(5)),
            // Each unit's own read count: with reads pooled, every unit
            // this profile never saw read would be pre-copied (M = S =
            // 0.99), leaving too little post-copy to interleave.
            ModelParams {
                pool_reads: false,
                ..ModelParams::default()
            },
            &SearchOptions::default(),
        )
        .unwrap();
        let snap = PlanSnapshot::from_plan(&plan);
        let guest = GuestUnits { pages, chunks };
        let (pages_order, has_chunks) = orders(&profile, &snap, guest).unwrap();
        assert!(has_chunks);
        let order = pages_order
            .chunks()
            .expect("the profile has chunks")
            .clone();
        assert_eq!(
            order.precopy().len() as u64,
            (snap.s * chunks as f64).round() as u64
        );
        // Every chunk once, ranked as the planner ranks: no chunk after
        // one it outranks.
        let all: Vec<u64> = order
            .precopy()
            .iter()
            .chain(order.postcopy())
            .copied()
            .collect();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..chunks).collect::<Vec<_>>());
        assert!(
            all.windows(2).all(|x| {
                rank_cmp(n, &chunk_counters(x[0], n), &chunk_counters(x[1], n)).is_le()
            })
        );
        assert_ne!(all, sorted, "ranked, not in address order");
        // The push merges both kinds in one ranking: no unit after one it
        // outranks, pages and chunks interleaved.
        let counters = |u: crate::engine::PushUnit| match u {
            crate::engine::PushUnit::Page(p) => page_counters(p, n),
            crate::engine::PushUnit::Chunk(c) => chunk_counters(c, n),
        };
        let push: Vec<_> = pages_order.push_sequence().collect();
        assert_eq!(
            push.len(),
            pages_order.postcopy().len() + order.postcopy().len()
        );
        assert!(
            push.windows(2)
                .all(|x| rank_cmp(n, &counters(x[0]), &counters(x[1])).is_le())
        );
        let first_chunk = push
            .iter()
            .position(|u| matches!(u, crate::engine::PushUnit::Chunk(_)))
            .unwrap();
        assert!(
            first_chunk < pages_order.postcopy().len(),
            "chunks are not all pushed after the pages"
        );
        // Another disk size is refused; another S disagrees with the rule.
        assert!(matches!(
            orders(&profile, &snap, GuestUnits { pages, chunks: 100 }),
            Err(PlanningError::Mismatch {
                what: "chunk",
                profile: 3000,
                guest: 100
            })
        ));
        let other = if snap.s > 0.5 { 0.1 } else { 0.9 };
        assert!(matches!(
            order_from_rule(&profile, Kind::Chunk, &snap.chunk_rule, other, chunks),
            Err(PlanningError::RuleDisagrees { what: "chunk", .. })
        ));
        std::fs::remove_file(&path).unwrap();
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
        let order = order_from_rule(&profile, Kind::Page, &snap.page_rule, snap.m, 5000).unwrap();
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
            order_from_rule(&profile, Kind::Page, &snap.page_rule, snap.m, 4096),
            Err(PlanningError::Mismatch {
                what: "page",
                profile: 5000,
                guest: 4096
            })
        ));
        // An M that disagrees with the rule is caught page by page.
        let other = if snap.m > 0.5 { 0.1 } else { 0.9 };
        assert!(matches!(
            order_from_rule(&profile, Kind::Page, &snap.page_rule, other, 5000),
            Err(PlanningError::RuleDisagrees { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
