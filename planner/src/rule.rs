//! Pre-copy rules: which units are in the pre-copy set, as a test the engine
//! evaluates per unit from the profile's counters and the unit's index.
//!
//! The pre-copy set of a kind is the top `selected` units in rank order
//! ([`rank_cmp`], then address). Since every class is a contiguous run of
//! that order, the set is:
//!
//! - every unit whose class ranks strictly before the *boundary class*;
//! - the boundary class's `take` lowest-addressed units (index below
//!   `cutoff`);
//! - nothing else.
//!
//! The rank comparison is exact integer arithmetic on the counters and `n`
//! (no rate table, no floating point: see [`crate::model::rates`]), so
//! [`PrecopyRule::contains`] allocates nothing and costs a few multiplies.
//!
//! `cutoff` needs a pass over the per-unit profile ([`PrecopyRule::resolve`],
//! done once per plan, outside the search, checking that the profile is the
//! one the plan was made from: [`PrecopyRule::profile`] is the class
//! histogram's fingerprint). A rule made from a JSON summary has no cutoff:
//! an engine that scans units in address order uses
//! [`PrecopyRule::scanner`], which takes the first `take` boundary-class
//! units it meets, and selects exactly the same set.

use std::cmp::Ordering;
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::model::RankBoundary;
use crate::model::rates::{MAX_SAMPLES, rank_cmp};
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
    /// Fingerprint of the class profile the plan was made from
    /// ([`ClassProfile::fingerprint`](crate::profile::ClassProfile::fingerprint));
    /// 0 = not recorded (not checked).
    pub profile: u64,
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
    /// The profile is not the one the plan was made from.
    #[error(
        "{kind} rule made for profile fingerprint {expected:#018x}, {path} has {found:#018x}: not the profile the plan was made from"
    )]
    WrongProfile {
        /// Pages or chunks.
        kind: Kind,
        /// The profile path.
        path: std::path::PathBuf,
        /// The rule's fingerprint.
        expected: u64,
        /// The profile's.
        found: u64,
    },
}

/// A rule word block that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pre-copy rule encoding: word {word} = {value}: {reason}")]
pub struct RuleDecodeError {
    /// Index of the bad word.
    pub word: usize,
    /// Its value.
    pub value: u64,
    /// Why it is refused.
    pub reason: &'static str,
}

/// Number of `u64` words of an encoded rule.
pub const RULE_WORDS: usize = 10;

impl PrecopyRule {
    /// The rule for a rank boundary computed by the model, made from the
    /// class profile with fingerprint `profile`.
    pub fn from_boundary(kind: Kind, samples: u32, b: &RankBoundary, profile: u64) -> PrecopyRule {
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
            profile,
        }
    }

    /// Whether the cutoff is known (always for modes other than boundary).
    pub fn is_resolved(&self) -> bool {
        self.cutoff.is_some()
    }

    /// Checks that `profile` is the one this rule was made for: same `n`,
    /// same fingerprint (when recorded; computing a profile's fingerprint
    /// takes a pass over it unless it was loaded with
    /// [`ClassProfile::from_profile`](crate::profile::ClassProfile::from_profile)).
    pub fn check_profile(&self, profile: &Profile) -> Result<(), ResolveError> {
        if profile.header().samples != self.samples {
            return Err(ResolveError::SampleCount {
                kind: self.kind,
                expected: self.samples,
                found: profile.header().samples,
            });
        }
        if self.profile != 0 {
            let found = profile.fingerprint()?;
            if found != self.profile {
                return Err(ResolveError::WrongProfile {
                    kind: self.kind,
                    path: profile.path().to_path_buf(),
                    expected: self.profile,
                    found,
                });
            }
        }
        Ok(())
    }

    /// Checks the profile ([`PrecopyRule::check_profile`]) and finds the
    /// cutoff: a pass over the profile's units of this kind up to the
    /// `take`-th unit of the boundary class, split over `threads` threads
    /// (blocks of 4 Mi units scanned in parallel, in address order).
    pub fn resolve_with(&mut self, profile: &Profile, threads: usize) -> Result<(), ResolveError> {
        self.check_profile(profile)?;
        if self.is_resolved() {
            return Ok(());
        }
        let (found, cutoff) = nth_of_class(
            profile,
            self.kind,
            self.boundary,
            self.take,
            threads,
            RESOLVE_BLOCK,
        )?;
        match cutoff {
            Some(c) => {
                self.cutoff = Some(c);
                Ok(())
            }
            None => Err(ResolveError::Mismatch {
                kind: self.kind,
                boundary: self.boundary,
                expected: self.take,
                found,
            }),
        }
    }

    /// [`PrecopyRule::resolve_with`] on the available CPUs.
    pub fn resolve(&mut self, profile: &Profile) -> Result<(), ResolveError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.resolve_with(profile, threads)
    }

    /// Whether unit `index` with counters `c` is in the pre-copy set.
    ///
    /// Exact for a resolved rule. An unresolved rule (made from a summary)
    /// cannot tell which boundary-class units are in from one unit alone and
    /// answers `false` for all of them: use [`PrecopyRule::scanner`] then.
    /// No allocation; a few integer operations.
    #[inline]
    pub fn contains(&self, c: UnitCounters, index: u64) -> bool {
        match self.mode {
            RuleMode::None => false,
            RuleMode::All => true,
            RuleMode::Boundary => match rank_cmp(self.samples, &c, &self.boundary) {
                Ordering::Less => true,
                Ordering::Equal => self.cutoff.is_some_and(|cut| index < cut),
                Ordering::Greater => false,
            },
        }
    }

    /// The rule as a per-unit matcher (kept for compatibility: the rule
    /// itself is now the O(1) matcher).
    pub fn matcher(&self) -> PrecopyMatcher {
        PrecopyMatcher { rule: *self }
    }

    /// A stateful matcher for a scan in ascending address order: exact for
    /// resolved *and* unresolved rules (it takes the first `take` units of
    /// the boundary class it meets).
    pub fn scanner(&self) -> RuleScanner {
        RuleScanner {
            rule: *self,
            seen: 0,
            next: 0,
        }
    }

    /// The rule as [`RULE_WORDS`] words (the shared-memory encoding):
    /// `mode, samples, r, w, o, zero, take, cutoff (u64::MAX = none),
    /// selected, profile`.
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
            self.profile,
        ]
    }

    /// Decodes [`PrecopyRule::encode`]'s words, refusing values no plan
    /// produces (`n` outside `1..=65535`, counters above `n`, `o > w`).
    pub fn decode(kind: Kind, w: &[u64; RULE_WORDS]) -> Result<PrecopyRule, RuleDecodeError> {
        let bad = |word: usize, reason| RuleDecodeError {
            word,
            value: w[word],
            reason,
        };
        let mode = match w[0] {
            0 => RuleMode::None,
            1 => RuleMode::All,
            2 => RuleMode::Boundary,
            _ => return Err(bad(0, "unknown mode")),
        };
        let samples = match u32::try_from(w[1]) {
            Ok(n) if (1..=MAX_SAMPLES).contains(&n) => n,
            _ => return Err(bad(1, "n must be in 1..=65535")),
        };
        let counter = |i: usize| -> Result<u32, RuleDecodeError> {
            match u32::try_from(w[i]) {
                Ok(v) if v <= samples => Ok(v),
                _ => Err(bad(i, "counter above n")),
            }
        };
        let (r, wc, o) = (counter(2)?, counter(3)?, counter(4)?);
        if o > wc {
            return Err(bad(4, "o above w"));
        }
        if w[5] > 1 {
            return Err(bad(5, "zero flag must be 0 or 1"));
        }
        if w[6] > w[8] {
            return Err(bad(6, "take above selected"));
        }
        Ok(PrecopyRule {
            kind,
            samples,
            mode,
            boundary: UnitCounters {
                r,
                w: wc,
                o,
                zero: w[5] == 1,
            },
            take: w[6],
            cutoff: (w[7] != u64::MAX).then_some(w[7]),
            selected: w[8],
            profile: w[9],
        })
    }
}

/// The units of `kind` in blocks of this many, for a parallel resolve.
const RESOLVE_BLOCK: u64 = 1 << 22;

/// Counts the units of class `key` in `range` (raw records, no
/// validation: the load pass validated the profile), stopping at the
/// `want`-th: `(seen, Some(index + 1 of the want-th))`.
fn count_class(
    profile: &Profile,
    kind: Kind,
    key: UnitCounters,
    range: std::ops::Range<u64>,
    want: u64,
) -> Result<(u64, Option<u64>), ProfileReadError> {
    let w = profile.layout().width;
    let fields = match kind {
        Kind::Page => 2,
        Kind::Chunk => 3,
    };
    // The key's record bytes (counters that do not fit never match).
    let mut pattern = Vec::with_capacity(fields * w);
    for (i, v) in [key.r, key.w, key.o].into_iter().take(fields).enumerate() {
        let bytes = v.to_le_bytes();
        if bytes[w..].iter().any(|&b| b != 0) || (i == 2 && kind == Kind::Page) {
            return Ok((0, None));
        }
        pattern.extend_from_slice(&bytes[..w]);
    }
    let zero_maps = profile.layout().zero_maps;
    match pattern.len() {
        2 => scan_records::<2>(profile, kind, key.zero, zero_maps, &pattern, range, want),
        3 => scan_records::<3>(profile, kind, key.zero, zero_maps, &pattern, range, want),
        4 => scan_records::<4>(profile, kind, key.zero, zero_maps, &pattern, range, want),
        6 => scan_records::<6>(profile, kind, key.zero, zero_maps, &pattern, range, want),
        8 => scan_records::<8>(profile, kind, key.zero, zero_maps, &pattern, range, want),
        _ => scan_records::<12>(profile, kind, key.zero, zero_maps, &pattern, range, want),
    }
}

/// [`count_class`] for records of `R` bytes (fixed-size compares).
fn scan_records<const R: usize>(
    profile: &Profile,
    kind: Kind,
    zero: bool,
    zero_maps: bool,
    pattern: &[u8],
    range: std::ops::Range<u64>,
    want: u64,
) -> Result<(u64, Option<u64>), ProfileReadError> {
    let pattern: [u8; R] = pattern.try_into().expect("record size");
    let (mut seen, mut at) = (0u64, None);
    profile.for_each_block(kind, range, |first, records, zmap| {
        let z0 = first / 8;
        for (k, r) in records.chunks_exact(R).enumerate() {
            let r: &[u8; R] = r.try_into().expect("chunks of R bytes");
            if *r != pattern {
                continue;
            }
            let i = first + k as u64;
            let z = zero_maps && zmap[(i / 8 - z0) as usize] >> (i % 8) & 1 == 1;
            if z == zero {
                seen += 1;
                if seen == want {
                    at = Some(i + 1);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    })?;
    Ok((seen, at))
}

/// `(units of class key seen, index + 1 of its n-th unit)` in address order.
fn nth_of_class(
    profile: &Profile,
    kind: Kind,
    key: UnitCounters,
    n: u64,
    threads: usize,
    block: u64,
) -> Result<(u64, Option<u64>), ProfileReadError> {
    let count = profile.count(kind);
    let scan =
        |range: std::ops::Range<u64>, want: u64| count_class(profile, kind, key, range, want);
    if threads <= 1 || count <= block {
        return scan(0..count, n);
    }
    let mut seen = 0u64;
    let mut start = 0u64;
    while start < count {
        // One block per thread, counted in parallel.
        let blocks: Vec<std::ops::Range<u64>> = (0..threads as u64)
            .map(|t| {
                let a = (start + t * block).min(count);
                a..(a + block).min(count)
            })
            .filter(|r| !r.is_empty())
            .collect();
        let counts: Vec<Result<(u64, Option<u64>), ProfileReadError>> = std::thread::scope(|s| {
            let handles: Vec<_> = blocks
                .iter()
                .map(|r| {
                    let r = r.clone();
                    s.spawn(move || scan(r, u64::MAX))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("resolve worker panicked"))
                .collect()
        });
        for (range, c) in blocks.iter().zip(counts) {
            let (k, _) = c?;
            if seen + k >= n {
                let (_, at) = scan(range.clone(), n - seen)?;
                return Ok((n, at));
            }
            seen += k;
        }
        start = blocks.last().map_or(count, |r| r.end);
    }
    Ok((seen, None))
}

/// A [`PrecopyRule`] as a per-unit test (see [`PrecopyRule::contains`]).
#[derive(Debug, Clone, Copy)]
pub struct PrecopyMatcher {
    rule: PrecopyRule,
}

impl PrecopyMatcher {
    /// The rule.
    pub fn rule(&self) -> &PrecopyRule {
        &self.rule
    }

    /// Whether unit `index` with counters `c` is in the pre-copy set.
    #[inline]
    pub fn contains(&self, c: UnitCounters, index: u64) -> bool {
        self.rule.contains(c, index)
    }
}

/// A stateful rule test for a scan of every unit of the kind in ascending
/// address order (see [`PrecopyRule::scanner`]).
#[derive(Debug, Clone)]
pub struct RuleScanner {
    rule: PrecopyRule,
    /// Boundary-class units seen so far.
    seen: u64,
    /// The lowest index the next call may pass.
    next: u64,
}

impl RuleScanner {
    /// Whether unit `index` with counters `c` is in the pre-copy set.
    ///
    /// Units must come in strictly ascending `index` order, and every unit
    /// of the boundary class must be passed (the scanner counts them).
    ///
    /// # Panics
    ///
    /// When `index` does not increase.
    #[inline]
    pub fn contains(&mut self, c: UnitCounters, index: u64) -> bool {
        assert!(
            index >= self.next,
            "units must be scanned in ascending address order ({index} after {})",
            self.next.wrapping_sub(1)
        );
        self.next = index + 1;
        match self.rule.mode {
            RuleMode::None => false,
            RuleMode::All => true,
            RuleMode::Boundary => match rank_cmp(self.rule.samples, &c, &self.rule.boundary) {
                Ordering::Less => true,
                Ordering::Equal => {
                    self.seen += 1;
                    match self.rule.cutoff {
                        Some(cut) => index < cut,
                        None => self.seen <= self.rule.take,
                    }
                }
                Ordering::Greater => false,
            },
        }
    }

    /// Boundary-class units met so far.
    pub fn boundary_seen(&self) -> u64 {
        self.seen
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::rates::RateTable;
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
            let model = Model::new(&classes, Link { bandwidth: 1e6, rtt: 0.0, wire: crate::model::WireCost::ONE }, ModelParams::default()).unwrap();
            let rates = RateTable::new(n);
            for (kind, units) in [(Kind::Page, &pages), (Kind::Chunk, &chunks)] {
                let mut order: Vec<usize> = (0..units.len()).collect();
                order.sort_by(|&a, &b| rates.rank_cmp(&units[a], &units[b]).then(a.cmp(&b)));
                for k in 0..=units.len() {
                    let fp = classes.fingerprint();
                    let unresolved = PrecopyRule::from_boundary(kind, n, &model.boundary(kind, k as u64), fp);
                    let mut rule = unresolved;
                    rule.resolve_with(&profile, 1).unwrap();
                    prop_assert_eq!(rule.selected, k as u64);
                    // The parallel resolve (tiny blocks) finds the same cutoff.
                    let mut par = unresolved;
                    if !par.is_resolved() {
                        let (_, cut) = nth_of_class(&profile, kind, par.boundary, par.take, 3, 2).unwrap();
                        par.cutoff = cut;
                    }
                    prop_assert_eq!(par, rule);
                    let matcher = rule.matcher();
                    let mut want = vec![false; units.len()];
                    order[..k].iter().for_each(|&i| want[i] = true);
                    let mut scan = rule.scanner();
                    let mut scan_unresolved = unresolved.scanner();
                    for (i, &u) in units.iter().enumerate() {
                        prop_assert_eq!(matcher.contains(u, i as u64), want[i], "{:?} k={} unit {}", rule, k, i);
                        prop_assert_eq!(rule.contains(u, i as u64), want[i]);
                        prop_assert_eq!(scan.contains(u, i as u64), want[i]);
                        // From a summary (no cutoff), the scanner still
                        // selects exactly the top k.
                        prop_assert_eq!(scan_unresolved.contains(u, i as u64), want[i]);
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
        w[1] = 60;
        w[0] = 7;
        assert_eq!(PrecopyRule::decode(Kind::Page, &w).unwrap_err().word, 0);
        w[0] = 2;
        w[2] = u64::MAX;
        assert_eq!(PrecopyRule::decode(Kind::Page, &w).unwrap_err().word, 2);
        w[2] = 61;
        assert_eq!(PrecopyRule::decode(Kind::Page, &w).unwrap_err().word, 2);
        w[2] = 0;
        w[3] = 2;
        w[4] = 3;
        assert_eq!(PrecopyRule::decode(Kind::Page, &w).unwrap_err().word, 4);
        w[4] = 0;
        w[5] = 2;
        assert_eq!(PrecopyRule::decode(Kind::Page, &w).unwrap_err().word, 5);
        w[5] = 0;
        w[6] = 5;
        assert_eq!(PrecopyRule::decode(Kind::Page, &w).unwrap_err().word, 6);
        w[6] = 0;
        assert!(PrecopyRule::decode(Kind::Page, &w).is_ok());
    }

    /// A hostile segment cannot make a reader build a huge table or rank
    /// with an absurd `n`: the sample count is capped at 65535.
    #[test]
    fn decode_caps_the_sample_count() {
        let mut w = [0u64; RULE_WORDS];
        w[0] = 2;
        for bad in [0, 65_536, u64::from(u32::MAX), u64::MAX] {
            w[1] = bad;
            let e = PrecopyRule::decode(Kind::Chunk, &w).unwrap_err();
            assert_eq!(e.word, 1, "{bad}");
        }
        w[1] = 65_535;
        let rule = PrecopyRule::decode(Kind::Chunk, &w).unwrap();
        // Ranking with the largest n is plain integer arithmetic.
        assert!(rule.contains(UnitCounters::rw(65_535, 65_535), 0));
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
            profile: 0,
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

    #[test]
    fn resolve_refuses_another_profile() {
        let units = [
            UnitCounters::rw(2, 0),
            UnitCounters::rw(2, 0),
            UnitCounters::rw(1, 0),
        ];
        let profile = profile_bytes(4, &units, &[]);
        let classes = ClassProfile::from_profile(&profile).unwrap();
        let model = Model::new(
            &classes,
            Link {
                bandwidth: 1e6,
                rtt: 0.0,
                wire: crate::model::WireCost::ONE,
            },
            ModelParams::default(),
        )
        .unwrap();
        let b = model.boundary(Kind::Page, 1);
        let mut rule = PrecopyRule::from_boundary(Kind::Page, 4, &b, classes.fingerprint());
        // Same n, same classes but one more unit: another profile.
        let other = profile_bytes(4, &[units[0], units[1], units[2], units[2]], &[]);
        match rule.resolve(&other) {
            Err(ResolveError::WrongProfile {
                expected, found, ..
            }) => {
                assert_eq!(expected, classes.fingerprint());
                assert_ne!(found, expected);
            }
            r => panic!("{r:?}"),
        }
        rule.resolve(&profile).unwrap();
        assert_eq!(rule.cutoff, Some(1));
        // A rule without a recorded fingerprint is not checked.
        let mut unchecked = PrecopyRule::from_boundary(Kind::Page, 4, &b, 0);
        unchecked.resolve(&other).unwrap();
    }

    #[test]
    #[should_panic(expected = "ascending address order")]
    fn scanners_refuse_out_of_order_units() {
        let rule = PrecopyRule {
            kind: Kind::Page,
            samples: 4,
            mode: RuleMode::All,
            boundary: UnitCounters::default(),
            take: 0,
            cutoff: Some(0),
            selected: 1,
            profile: 0,
        };
        let mut s = rule.scanner();
        s.contains(UnitCounters::rw(1, 1), 5);
        s.contains(UnitCounters::rw(1, 1), 5);
    }
}
