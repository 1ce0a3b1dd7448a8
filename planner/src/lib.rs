//! # wanmig planner
//!
//! The planner decides *how much* of a guest to copy before it moves. From a
//! profile of how often each memory page and storage chunk is read and
//! written, it predicts how a migration with pre-copy fractions `(M, S)`
//! will go over a given WAN link (pre-copy rounds, downtime `D`, post-copy
//! duration `U`, total `T`, fault penalty `P`), searches the `(M, S)` that
//! maximises the performance restoration agility `Gamma`, and hands the plan
//! to the engine through a shared-memory segment, re-planning when the
//! engine's telemetry says the link or the guest differ from the
//! assumptions. It implements `design/model.md` (the seed paper's model made
//! precise); this page records every decision that document leaves open.
//!
//! Pipeline: [`profile`] (binary per-unit profile, JSON summary) ->
//! [`profile::classes`] (class histogram) -> [`model`] (the three phases) ->
//! [`search`] (seed recursion + full grid) -> [`plan`] (prediction + rules)
//! -> [`segment`] / [`serve`] (shared memory, re-planning). [`synth`] makes
//! synthetic profiles, [`heatmap`] draws `Gamma` over the grid, [`units`]
//! parses `40mbit`, `4GiB`, `5ms` for the whole project.
//!
//! ## What the engine uses
//!
//! - [`segment::Segment`]: `open(name)`, `read_plan() -> Option<PlanSnapshot>`
//!   (`None` until a plan is published), `publish_telemetry(&Telemetry)`;
//!   the planner side uses `create`, `publish_plan`, `read_telemetry`.
//! - [`rule::PrecopyRule`] (in every [`segment::PlanSnapshot`], one for pages,
//!   one for chunks): `contains(counters, index)`, or `matcher()` for an O(1)
//!   per-unit test over a whole scan.
//! - [`profile::ProfileWriter`]: the profiler streams its counters into the
//!   binary format ([`profile::format`] documents it byte by byte).
//!
//! ## Model decisions (with formulas)
//!
//! Notation: `n` intervals of `tau` seconds; per unit `r`, `w`, `o` interval
//! counts (see [`profile::UnitCounters`]); link bandwidth `B` (bytes/s, shared
//! by memory and storage) and `RTT`; device state `state` bytes.
//!
//! **Rates and the clamp.** `lambda = -ln(1 - k/n) / tau` with
//! `k -> min(k, n - 1/2)`: a unit active in every interval is treated as
//! idle for half an interval, giving the finite maximum `ln(2n) / tau`; the
//! estimate is unchanged for `k < n` and stays strictly increasing. `k = 0`
//! gives `lambda = 0`: a profile cannot see events rarer than about one per
//! `n tau`, and the model trusts it ([`model::rates`]).
//!
//! **Ranking and the pre-copy set.** Score `1 - exp(-(lambda_r + lambda_w) H)`
//! (`H` defaults to `dT`; the order is the same for every `H > 0`, so `H` is
//! only reported). Ties: lower write rate first (as `model.md`), then (our
//! refinement) lower `o` for chunks, i.e. the higher post-copy fetch rate
//! first, then populated before zero units, then lower address. The two
//! added keys make every class a contiguous run of the order, which is what
//! makes the class model exact and lets a rule name one *boundary class*.
//! The pre-copy set of a kind is its top `round(M * units)` units; the same
//! order drives the post-copy push.
//!
//! **Pre-copy rounds** ([`model::precopy`]). Round 0 sends the whole set
//! (zero/never-populated units as a flag: 0 bytes). With `x_w` the set's bytes
//! of write rate `lambda_w` and `s_w` the bytes sent in round `k` (length
//! `t_k = bytes_k / B`), the bytes dirty at its end are
//! `d_w = s_w (1 - (1 - e^{-lambda t}) / (lambda t)) + (x_w - s_w)(1 - e^{-lambda t})`
//! and round `k + 1` sends `d_w`. Memory and storage share the rounds and `B`.
//! Only `w` matters, so the state is one number per distinct `w`. Stop after
//! round `k` when: nothing is dirty; or the freeze time meets the downtime
//! target; or it has *converged* (`rem / B <= 1 % x (state / B + RTT +
//! overhead)`, further rounds cannot lower `D` noticeably); or the dirty set
//! shrank by less than 5 % (`rem >= 0.95 bytes_k`); or 30 rounds. Rounds are
//! pipelined (no per-round RTT).
//!
//! **Freeze.** `D = (rem + state) / B + RTT + resume_overhead`
//! (`resume_overhead` defaults to 0, so a guest that never writes has exactly
//! `D = state / B + RTT` at `M = S = 1`). `D` is smallest at `M = S = 0`.
//!
//! **Post-copy arrival model** ([`model::postcopy`]). Everything outside the
//! pre-copy set is pushed once, in one merged rank order (pages before chunks
//! on a full tie). A populated unit costs `unit / B` of push time; a unit
//! that was zero at profile end costs nothing if it is still zero at the
//! freeze, which happens with probability `e^{-lambda_w T_pre}`, so it costs
//! `q = 1 - e^{-lambda_w T_pre}` of a unit in expectation (a still-zero unit
//! is mapped as zero at the destination: no push, no fault). The `j`-th unit
//! of a class starting at push time `a` arrives at `a + j q unit / B` after
//! resume and faults if first accessed before that:
//! `1 - e^{-lambda_a t}`, `lambda_a = lambda_r + lambda_w` for pages,
//! `lambda_r + lambda_w (1 - o/w)` for chunks. Summed per class in closed
//! form (a geometric series, exact for the sequential push; the continuous
//! "uniform arrival" average is its limit). Each fault stalls the guest
//! `RTT + unit / B`. `P` = expected stall time, `U` = total push time
//! (a fetched unit replaces its push, so faults do not lengthen `U`),
//! `T = T_pre + D + U`.
//!
//! **DeltaT** (first order). `DeltaT = dT +` the stalls met during `dT`
//! seconds of work: a unit stalls the window iff its first access comes
//! before `min(arrival, dT)`. Stalls are not fed back into the guest's clock
//! (a stalled guest touches slightly fewer units before they arrive), so `P`
//! and `DeltaT` are conservative upper bounds; the error is second order in
//! the stall fraction. No fixed-point refinement is done.
//! `Gamma = dT / (D + DeltaT)` (`dT` = 20 s); the weighted policy maximises
//! `1 / (w1 D + w2 P)` instead.
//!
//! **Search** ([`search`]). The seed recursion (memory instantly copied:
//! ternary on `S`; then `S` fixed: ternary on `M`) and the full 101 x 101
//! grid, both on the 1 % lattice; the plan uses the better (the grid on a
//! tie) and reports whether the ternary answer is the global optimum. With a
//! downtime target, a point whose `D` misses it scores `-D` (below every
//! feasible point, so searches move towards feasibility). **Live migration
//! is impossible** on a link iff, with memory instantly copied, no storage
//! fraction meets the downtime limit (the target, or `dT` without one); in
//! this model that is exactly `state / B + RTT + overhead > limit`.
//!
//! **Re-plan thresholds** ([`serve`]). Measured bandwidth departing from the
//! planned one by more than 20 %, or a pre-copy round's measured dirty bytes
//! departing from the model's expectation for that round (at its measured
//! duration) by more than 25 % (of at least 1 MiB), triggers a new search
//! with the measured bandwidth and RTT and a write-rate multiplier fitted to
//! the measured dirtying; the result is published as the next generation.
//!
//! **Exactness and cost.** The class model equals the per-unit model (the
//! same equations applied unit by unit) up to floating-point summation order
//! (relative 1e-9, checked by a property test). An evaluation for the search
//! costs O(distinct write rates x rounds) for pre-copy plus O(classes that
//! arrive within `dT`) for `DeltaT` (later classes contribute
//! `1 - e^{-lambda_a dT}`, summed once at build time), independent of the
//! guest size. A full plan for a 1 TiB + 16 TiB guest takes 15-30 ms on
//! this two-core machine, depending on its load (see the README).

#![warn(missing_docs)]

pub mod heatmap;
pub mod model;
pub mod plan;
pub mod profile;
pub mod rule;
pub mod search;
pub mod segment;
pub mod serve;
pub mod synth;
pub mod units;
