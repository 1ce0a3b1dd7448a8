//! Phase 1 (live pre-copy rounds) and the freeze that ends it.
//!
//! State per write-rate group `w` (all pre-copied units with `w` write
//! intervals, pages and chunks together, in link bytes: each unit's size
//! times its [`WireCost`](super::WireCost)): `x_w` = bytes in the pre-copy
//! set. A round of length `t = bytes / B` leaves, in expectation,
//!
//! ```text
//! d_w = x_w * (1 - e^{-l t})      written at any time during the round
//! ```
//!
//! dirty, with `l = lambda_w`, and round `k + 1` sends `d_w`. This is what the
//! engine's dirty log does (QEMU's and Xen's alike): it is collected once at
//! each round boundary and reports every unit written since the last
//! collection, so a unit written during a round is sent again in the next
//! one whether the write came before or after the unit's own send in that
//! round. (A log re-armed per unit at its send would resend only what is
//! written after it, `1 - (1 - e^{-l t}) / (l t)` of the units sent: an
//! earlier version of this model assumed that and under-predicted every
//! round after the first, the freeze's remainder and the overflow; 11,235
//! overflow pages predicted against 16,189 measured on the evaluation's
//! memory workload.) Round 0 sends the whole set, except that
//! zero/never-populated units cost nothing then (a flag); once re-dirtied
//! they cost their full size. Units are grouped by `w` only, because the
//! dynamics depend on nothing else: O(distinct w) per round.
//!
//! Stop rule, checked after each round `k` with `rem = sum d_w`:
//! 1. `rem == 0` (nothing left to resend): stop;
//! 2. a downtime target is set and the freeze time the engine estimates,
//!    `(raw + state)/B + RTT + overhead`, meets it: stop. `raw` is the
//!    remainder's unit bytes (`sum d_w x raw_w`, `raw_w` the group's unit
//!    bytes per link byte): the engine cannot know how the dirty units will
//!    compress before it sends them, so its test counts them uncompressed,
//!    and the freeze that follows (`D`, at `rem`) is shorter than the
//!    target when they compress;
//! 3. *converged*: the remainder is at most `converged` (default 1 %) of
//!    the device state plus one unit:
//!    `rem <= converged * (state + max(page, chunk))`. Sending it adds at
//!    most ~1 % to the state's own transfer, so further rounds could not
//!    lower `D` noticeably (without this, a converging dirty set shrinks
//!    geometrically forever and only the round limit stops it). The
//!    threshold is in bytes and does not depend on `B`: an earlier version
//!    compared times (`rem / B <= converged (state / B + RTT + overhead)`),
//!    whose byte threshold grows with `B` and made a faster link stop
//!    earlier with a larger remainder, so more bandwidth could lower
//!    `Gamma`. The unit floor lets a guest with no device state converge;
//!    with state 0 the threshold is 1 % of a unit.
//! 4. the dirty set stopped shrinking: `rem >= (1 - min_shrink) * bytes_k`
//!    (within a relative 1e-9: [`not_shrinking_floor`])
//!    (default `min_shrink` 5 %): stop;
//! 5. `k + 1 == max_rounds` (default 30): stop.
//!
//! Rounds are pipelined: no per-round RTT (the source re-reads its dirty log
//! locally).
//!
//! # The freeze
//!
//! What the freeze does with the dirty remainder is the plan's
//! [`FreezePolicy`]:
//!
//! - [`FreezePolicy::Classic`]: everything dirty crosses while the guest is
//!   paused, however long that takes (classic pre-copy);
//! - [`FreezePolicy::Overflow`]: the freeze keeps the downtime limit `L`.
//!   Its budget is `(L - state/B - RTT - overhead) B` link bytes. The dirty
//!   units (pages and chunks) go hottest first (the merged ranking order)
//!   while they fit; those that do not, the coldest, become absent at the
//!   destination and are post-copied like any post-copy unit (pushed
//!   first, hottest first; fetched on a fault). When everything fits, the
//!   two policies are the same freeze. See the crate docs for how the
//!   overflow enters `D`, `U` and `P`.

use serde::{Deserialize, Serialize};

use super::rates::p_any;

/// What the freeze does with a dirty remainder that does not fit the
/// downtime limit (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezePolicy {
    /// Everything dirty crosses during the freeze (classic pre-copy).
    Classic,
    /// What fits the downtime limit crosses during the freeze, hottest
    /// first; the dirty pages that do not fit are post-copied.
    #[default]
    Overflow,
}

impl FreezePolicy {
    /// The policy's name (`classic`, `overflow`).
    pub fn name(self) -> &'static str {
        match self {
            FreezePolicy::Classic => "classic",
            FreezePolicy::Overflow => "overflow",
        }
    }
}

impl std::fmt::Display for FreezePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown freeze policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown freeze policy {0:?} (classic, overflow)")]
pub struct UnknownFreezePolicy(pub String);

impl std::str::FromStr for FreezePolicy {
    type Err = UnknownFreezePolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "classic" => Ok(FreezePolicy::Classic),
            "overflow" => Ok(FreezePolicy::Overflow),
            other => Err(UnknownFreezePolicy(other.to_string())),
        }
    }
}

/// How a plan pre-copies besides its `(M, S)`: the round limit and the
/// freeze policy. The planner's plan family is the `(M, S)` grid under the
/// parameters' strategy plus a few named strategies (see
/// [`search`](crate::search)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlanStrategy {
    /// Pre-copy rounds at most, round 0 included (1: one pass over the
    /// pre-copy set, then the freeze).
    pub max_rounds: u32,
    /// What the freeze does with a remainder that does not fit.
    pub freeze: FreezePolicy,
}

/// Why pre-copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Nothing was dirtied in the last round (or nothing is pre-copied).
    Clean,
    /// The predicted freeze time meets the downtime target.
    TargetMet,
    /// The remainder is at most `converged` x (state + one unit) bytes.
    Converged,
    /// The dirty set shrank by less than `min_shrink` in the last round.
    NotShrinking,
    /// The round limit was reached.
    RoundLimit,
}

/// One predicted pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// Round number, from 0.
    pub index: u32,
    /// Link bytes sent in the round.
    pub bytes: f64,
    /// Round duration in seconds.
    pub duration_s: f64,
    /// Expected link bytes of the pre-copy set dirty when the round ends.
    pub dirty_bytes: f64,
}

/// Inputs the round recursion needs besides the per-group state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrecopyLink {
    pub bandwidth: f64,
    pub freeze_fixed: f64,
    pub target: Option<f64>,
    pub max_rounds: u32,
    pub min_shrink: f64,
    /// The converged threshold in bytes (rule 3).
    pub converged_bytes: f64,
}

impl PrecopyLink {
    /// The stop rule after round `k` that sent `bytes` and left `rem` link
    /// bytes (`raw` unit bytes) dirty.
    pub(crate) fn stop(&self, k: u32, bytes: f64, rem: f64, raw: f64) -> Option<StopReason> {
        let remainder_time = raw / self.bandwidth;
        if rem <= 0.0 {
            Some(StopReason::Clean)
        } else if self
            .target
            .is_some_and(|target| remainder_time + self.freeze_fixed <= target)
        {
            Some(StopReason::TargetMet)
        } else if rem <= self.converged_bytes {
            Some(StopReason::Converged)
        } else if rem >= not_shrinking_floor(self.min_shrink, bytes) {
            Some(StopReason::NotShrinking)
        } else if k + 1 >= self.max_rounds {
            Some(StopReason::RoundLimit)
        } else {
            None
        }
    }
}

/// Rule 4's threshold: `(1 - min_shrink) bytes`, less a relative `1e-9`.
/// With `min_shrink = 0` and every unit of the set rewritten (`1 - e^{-x}`
/// rounds to 1 for `x > 37`) the remainder equals the round's bytes, and
/// which of two equal sums is larger is rounding: the margin makes "did not
/// shrink" hold whichever way the sums were added up.
pub(crate) fn not_shrinking_floor(min_shrink: f64, bytes: f64) -> f64 {
    (1.0 - min_shrink) * bytes * (1.0 - 1e-9)
}

/// The outcome of the pre-copy phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PrecopyOutcome {
    pub duration: f64,
    pub remainder: f64,
    pub rounds: u32,
    pub stop: StopReason,
}

/// One write-rate group: `lambda_w` (per second) and the link bytes in the
/// set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Group {
    pub lambda: f64,
    pub bytes: f64,
    /// Unit bytes per link byte of the group's units (`1 / cost`: one kind
    /// per group, all written), what the engine's freeze estimate counts.
    pub raw: f64,
    /// The group's index among all write groups (pages' groups first).
    pub id: u32,
}

/// Runs the recursion. `groups` holds only groups with `lambda > 0` and
/// `bytes > 0` (never-written units never need resending); `round0` is the
/// round-0 byte count (every pre-copied populated unit). `dirty` receives
/// each group's dirty bytes when pre-copy stops (what the freeze must send
/// of it). Each round is appended to `record` when given.
pub(crate) fn run(
    groups: &[Group],
    round0: f64,
    link: &PrecopyLink,
    dirty: &mut Vec<f64>,
    mut record: Option<&mut Vec<Round>>,
) -> PrecopyOutcome {
    dirty.clear();
    dirty.resize(groups.len(), 0.0);
    let mut bytes = round0;
    let mut duration = 0.0;
    for k in 0..link.max_rounds.max(1) {
        let t = bytes / link.bandwidth;
        duration += t;
        let (mut rem, mut raw) = (0.0, 0.0);
        for (g, d) in groups.iter().zip(dirty.iter_mut()) {
            *d = g.bytes * p_any(g.lambda * t);
            rem += *d;
            raw += *d * g.raw;
        }
        if let Some(r) = record.as_deref_mut() {
            r.push(Round {
                index: k,
                bytes,
                duration_s: t,
                dirty_bytes: rem,
            });
        }
        let stop = link.stop(k, bytes, rem, raw);
        if let Some(stop) = stop {
            return PrecopyOutcome {
                duration,
                remainder: super::nonneg(rem),
                rounds: k + 1,
                stop,
            };
        }
        bytes = rem;
    }
    unreachable!("the round limit stops the loop")
}

/// Expected bytes of the pre-copy set dirtied during one round, as a
/// function of its duration and of a multiplier on the write rates (the
/// planner fits the multiplier to telemetry). Every round of a plan dirties
/// alike for the same duration (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundDirty {
    pub(crate) groups: Vec<Group>,
}

impl RoundDirty {
    /// Expected dirty link bytes at the end of a round of `duration` seconds with
    /// every write rate multiplied by `factor`. Increasing in both.
    pub fn bytes(&self, duration: f64, factor: f64) -> f64 {
        self.groups
            .iter()
            .map(|g| g.bytes * p_any(g.lambda * factor * duration))
            .sum()
    }

    /// The multiplier that makes [`RoundDirty::bytes`] equal `measured`,
    /// searched in `[1e-4, 1e4]` (bisection on its logarithm); clamped to
    /// the range when no multiplier fits.
    pub fn fit_factor(&self, duration: f64, measured: f64) -> f64 {
        let (mut lo, mut hi) = (1e-4f64.ln(), 1e4f64.ln());
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if self.bytes(duration, mid.exp()) < measured {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (0.5 * (lo + hi)).exp()
    }
}
