//! Pre-copy rules: which units are in the pre-copy set, as a test the engine
//! evaluates per unit from the profile's counters and the unit's index.
//!
//! The pre-copy set of a kind is the top `selected` units in rank order
//! ([`RateTable::rank_cmp`], then address). Since every class is a contiguous
//! run of that order, the set is:
//!
//! - every unit whose class ranks strictly before the *boundary class*;
//! - the boundary class's units with index below `cutoff` (its `take`
//!   lowest-addressed units);
//! - nothing else.
//!
//! `cutoff` needs one pass over the per-unit profile
//! ([`PrecopyRule::resolve`]), done once per plan, outside the search. A rule
//! built from a JSON summary has no cutoff; an engine that scans units in
//! address order can instead take the first `take` boundary units it meets
//! ([`PrecopyRule::take`]).

use std::cmp::Ordering;
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::model::RankBoundary;
use crate::model::rates::RateTable;
use crate::profile::{Kind, Profile, ProfileReadError, UnitCounters};

/// The shape of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u64)]
pub enum RuleMode {
    /// Nothing is pre-copied.
    None = 0,
    /// Everything is pre-copied.
    All = 1,
    /// Classes above the boundary, and the boundary class below the cutoff.
    Boundary = 2,
}

/// Which units of one kind are pre-copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecopyRule {
    /// Pages or chunks.
    pub kind: Kind,
    /// The profile's sample count `n` (the ranking depends on it).
    pub samples: u32,
    /// The rule's shape.
    pub mode: RuleMode,
    /// The boundary class (meaningful in [`RuleMode::Boundary`]).
    pub boundary: UnitCounters,
    /// Boundary-class units included (the lowest-addressed ones).
    pub take: u64,
    /// Boundary-class units with index `< cutoff` are included; `None` until
    /// resolved against the per-unit profile.
    pub cutoff: Option<u64>,
    /// Units in the pre-copy set.
    pub selected: u64,
}

/// A rule could not be resolved against a profile.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The profile could not be read.
    #[error(transparent)]
    Read(#[from] ProfileReadError),
    /// The profile does not hold the classes the plan was made from.
    #[error(
        "{kind} rule: the profile has {found} units of boundary class {boundary:?}, the plan takes {expected}"
    )]
    Mismatch {
        /// Pages or chunks.
        kind: Kind,
        /// The boundary class.
        boundary: UnitCounters,
        /// Units the plan takes from it.
        expected: u64,
        /// Units the profile has.
        found: u64,
    },
    /// The profile's sample count differs from the rule's.
    #[error("{kind} rule made for n = {expected}, the profile has n = {found}")]
    SampleCount {
        /// Pages or chunks.
        kind: Kind,
        /// The rule's `n`.
        expected: u32,
        /// The profile's `n`.
        found: u32,
    },
}

/// A rule word block that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pre-copy rule encoding: word {word} = {value}")]
pub struct RuleDecodeError {
    /// Index of the bad word.
    pub word: usize,
    /// Its value.
    pub value: u64,
}

/// Number of `u64` words of an encoded rule.
pub const RULE_WORDS: usize = 9;

impl PrecopyRule {
    /// The rule for a rank boundary computed by the model.
    pub fn from_boundary(kind: Kind, samples: u32, b: &RankBoundary) -> PrecopyRule {
        let (mode, boundary, take, cutoff) = if b.selected == 0 {
            (RuleMode::None, UnitCounters::default(), 0, Some(0))
        } else if b.selected >= b.total {
            (RuleMode::All, UnitCounters::default(), 0, Some(0))
        } else {
            let key = b
                .boundary
                .expect("a partial selection has a boundary class");
            (RuleMode::Boundary, key, b.take, (b.take == 0).then_some(0))
        };
        PrecopyRule {
            kind,
            samples,
            mode,
            boundary,
            take,
            cutoff,
            selected: b.selected,
        }
    }

    /// Whether the cutoff is known (always for modes other than boundary).
    pub fn is_resolved(&self) -> bool {
        self.cutoff.is_some()
    }

    /// Finds the cutoff: one pass over the profile's units of this kind.
    pub fn resolve(&mut self, profile: &Profile) -> Result<(), ResolveError> {
        if profile.header().samples != self.samples {
            return Err(ResolveError::SampleCount {
                kind: self.kind,
                expected: self.samples,
                found: profile.header().samples,
            });
        }
        if self.is_resolved() {
            return Ok(());
        }
        let mut seen = 0u64;
        let mut cutoff = None;
        profile.for_each_until(self.kind, |i, c| {
            if c == self.boundary {
                seen += 1;
                if seen == self.take {
                    cutoff = Some(i + 1);
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })?;
        match cutoff {
            Some(c) => {
                self.cutoff = Some(c);
                Ok(())
            }
            None => Err(ResolveError::Mismatch {
                kind: self.kind,
                boundary: self.boundary,
                expected: self.take,
                found: seen,
            }),
        }
    }

    /// Whether unit `index` with counters `c` is in the pre-copy set.
    ///
    /// Computes two logarithms per call; for a scan over many units use
    /// [`PrecopyRule::matcher`]. An unresolved rule treats its boundary class
    /// as excluded.
    pub fn contains(&self, c: UnitCounters, index: u64) -> bool {
        self.matcher().contains(c, index)
    }

    /// A matcher with the rate table precomputed (O(1) per unit).
    pub fn matcher(&self) -> PrecopyMatcher {
        PrecopyMatcher {
            rule: *self,
            rates: RateTable::new(self.samples),
        }
    }

    /// The rule as [`RULE_WORDS`] words (the shared-memory encoding):
    /// `mode, samples, r, w, o, zero, take, cutoff (u64::MAX = none), selected`.
    pub fn encode(&self) -> [u64; RULE_WORDS] {
        [
            self.mode as u64,
            self.samples.into(),
            self.boundary.r.into(),
            self.boundary.w.into(),
            self.boundary.o.into(),
            self.boundary.zero.into(),
            self.take,
            self.cutoff.unwrap_or(u64::MAX),
            self.selected,
        ]
    }

    /// Decodes [`PrecopyRule::encode`]'s words.
    pub fn decode(kind: Kind, w: &[u64; RULE_WORDS]) -> Result<PrecopyRule, RuleDecodeError> {
        let small = |i: usize| -> Result<u32, RuleDecodeError> {
            u32::try_from(w[i]).map_err(|_| RuleDecodeError {
                word: i,
                value: w[i],
            })
        };
        let mode = match w[0] {
            0 => RuleMode::None,
            1 => RuleMode::All,
            2 => RuleMode::Boundary,
            v => return Err(RuleDecodeError { word: 0, value: v }),
        };
        if w[5] > 1 {
            return Err(RuleDecodeError {
                word: 5,
                value: w[5],
            });
        }
        Ok(PrecopyRule {
            kind,
            samples: small(1)?,
            mode,
            boundary: UnitCounters {
                r: small(2)?,
                w: small(3)?,
                o: small(4)?,
                zero: w[5] == 1,
            },
            take: w[6],
            cutoff: (w[7] != u64::MAX).then_some(w[7]),
            selected: w[8],
        })
    }
}

/// A [`PrecopyRule`] with its rate table, for per-unit scans.
#[derive(Debug, Clone)]
pub struct PrecopyMatcher {
    rule: PrecopyRule,
    rates: RateTable,
}

impl PrecopyMatcher {
    /// The rule.
    pub fn rule(&self) -> &PrecopyRule {
        &self.rule
    }

    /// Whether unit `index` with counters `c` is in the pre-copy set.
    #[inline]
    pub fn contains(&self, c: UnitCounters, index: u64) -> bool {
        match self.rule.mode {
            RuleMode::None => false,
            RuleMode::All => true,
            RuleMode::Boundary => match self.rates.rank_cmp(&c, &self.rule.boundary) {
                Ordering::Less => true,
                Ordering::Equal => self.rule.cutoff.is_some_and(|cut| index < cut),
                Ordering::Greater => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{Link, Model, ModelParams};
    use crate::profile::{ClassProfile, ProfileHeader, ProfileWriter};

    fn counters(n: u32, chunk: bool) -> impl Strategy<Value = UnitCounters> {
        (0..=n, 0..=n, 0..=n, prop::bool::weighted(0.2)).prop_map(move |(r, w, o, zero)| {
            UnitCounters {
                r,
                w,
                o: if chunk { o.min(w) } else { 0 },
                zero,
            }
        })
    }

    fn profile_bytes(n: u32, pages: &[UnitCounters], chunks: &[UnitCounters]) -> Profile {
        let h = ProfileHeader {
            samples: n,
            interval_ns: 1_000_000_000,
            page_size: 4096,
            chunk_size: 65536,
            page_count: pages.len() as u64,
            chunk_count: chunks.len() as u64,
            state_bytes: 0,
        };
        let mut w = ProfileWriter::new(Vec::new(), &h).unwrap();
        pages.iter().for_each(|&u| w.push_page(u).unwrap());
        chunks.iter().for_each(|&u| w.push_chunk(u).unwrap());
        Profile::from_bytes(w.finish().unwrap()).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// The resolved rule selects exactly the top `k` units in
        /// (rank, address) order, for every `k`.
        #[test]
        fn resolved_rules_select_exactly_the_top_k(
            (n, pages, chunks) in (1u32..=5).prop_flat_map(|n| (
                Just(n),
                prop::collection::vec(counters(n, false), 0..30),
                prop::collection::vec(counters(n, true), 0..30),
            )),
        ) {
            let profile = profile_bytes(n, &pages, &chunks);
            let classes = ClassProfile::from_profile(&profile).unwrap();
            let model = Model::new(&classes, Link { bandwidth: 1e6, rtt: 0.0 }, ModelParams::default()).unwrap();
            let rates = RateTable::new(n);
            for (kind, units) in [(Kind::Page, &pages), (Kind::Chunk, &chunks)] {
                let mut order: Vec<usize> = (0..units.len()).collect();
                order.sort_by(|&a, &b| rates.rank_cmp(&units[a], &units[b]).then(a.cmp(&b)));
                for k in 0..=units.len() {
                    let mut rule = PrecopyRule::from_boundary(kind, n, &model.boundary(kind, k as u64));
                    rule.resolve(&profile).unwrap();
                    prop_assert_eq!(rule.selected, k as u64);
                    let matcher = rule.matcher();
                    let mut want = vec![false; units.len()];
                    order[..k].iter().for_each(|&i| want[i] = true);
                    for (i, &u) in units.iter().enumerate() {
                        prop_assert_eq!(matcher.contains(u, i as u64), want[i], "{:?} k={} unit {}", rule, k, i);
                        prop_assert_eq!(rule.contains(u, i as u64), want[i]);
                    }
                    let back = PrecopyRule::decode(kind, &rule.encode()).unwrap();
                    prop_assert_eq!(back, rule);
                }
            }
        }
    }

    #[test]
    fn decode_refuses_garbage() {
        let mut w = [0u64; RULE_WORDS];
        w[0] = 7;
        assert_eq!(PrecopyRule::decode(Kind::Page, &w).unwrap_err().word, 0);
        w[0] = 2;
        w[2] = u64::MAX;
        assert_eq!(PrecopyRule::decode(Kind::Page, &w).unwrap_err().word, 2);
        w[2] = 0;
        w[5] = 2;
        assert_eq!(PrecopyRule::decode(Kind::Page, &w).unwrap_err().word, 5);
    }

    #[test]
    fn unresolved_rules_exclude_the_boundary_class() {
        let rule = PrecopyRule {
            kind: Kind::Page,
            samples: 4,
            mode: RuleMode::Boundary,
            boundary: UnitCounters::rw(2, 0),
            take: 3,
            cutoff: None,
            selected: 10,
        };
        assert!(!rule.is_resolved());
        assert!(rule.contains(UnitCounters::rw(4, 0), 0));
        assert!(!rule.contains(UnitCounters::rw(2, 0), 0));
        assert!(!rule.contains(UnitCounters::rw(1, 0), 0));
        let profile = profile_bytes(5, &[UnitCounters::rw(2, 0)], &[]);
        let mut r = rule;
        assert!(matches!(
            r.resolve(&profile),
            Err(ResolveError::SampleCount { .. })
        ));
        let profile = profile_bytes(4, &[UnitCounters::rw(2, 0)], &[]);
        assert!(matches!(
            r.resolve(&profile),
            Err(ResolveError::Mismatch {
                found: 1,
                expected: 3,
                ..
            })
        ));
    }
}
