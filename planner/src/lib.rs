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
//! synthetic profiles, `heatmap` draws `Gamma` over the grid, [`units`]
//! parses `40mbit`, `4GiB`, `5ms` for the whole project.
//!
//! ## Features
//!
//! `cli` (the `wanmig-planner` binary: clap, anyhow) and `heatmap`
//! (plotters) are on by default. The library needs neither: the engine
//! depends on it with `default-features = false` and gets profiles, the
//! model, rules, the segment and units with libc, memmap2, serde,
//! serde_json, thiserror and zerocopy only.
//!
//! ## What the engine uses
//!
//! - [`segment::Segment`]: `open(name)`, `read_plan() -> Result<Option<PlanSnapshot>>`
//!   (`None` until a plan is published; an error for an undecodable rule or
//!   a planner that died mid-update), `publish_telemetry(&Telemetry)` (the
//!   first call takes the telemetry region's writer lock;
//!   `claim_telemetry_writer()` takes it up front). The planner side uses
//!   `create`, `publish_plan`, `read_telemetry`. One writer per region,
//!   enforced with OFD locks (see the module docs).
//! - [`rule::PrecopyRule`] (in every [`segment::PlanSnapshot`], one for pages,
//!   one for chunks): `contains(counters, index)` (O(1), no allocation,
//!   exact integer ranking) for resolved rules, `scanner()` for an
//!   address-order scan (exact for unresolved rules too), `resolve(&Profile)`
//!   to find the cutoff, which checks that the profile is the one the plan
//!   was made from: the plan carries the class profile's fingerprint
//!   ([`profile::ClassProfile::fingerprint`], also
//!   [`profile::Profile::fingerprint`] and
//!   [`segment::PlanSnapshot::profile_fingerprint`]).
//! - [`profile::ProfileWriter`]: the profiler streams its counters into the
//!   binary format ([`profile::format`] documents it byte by byte);
//!   `ProfileWriter::create(path, ..)` writes a temporary file and renames
//!   it into place, so readers never see a partial or truncated profile.
//!
//! ## Model decisions (with formulas)
//!
//! Notation: `n` intervals of `tau` seconds (`1 <= n <= 65535`,
//! `tau >= 1 ns`); per unit `r`, `w`, `o` interval counts (see
//! [`profile::UnitCounters`]); link bandwidth `B` (bytes/s, shared by memory
//! and storage) and `RTT`; device state `state` bytes; `dT` = 20 s.
//!
//! **Wire bytes.** The engine compresses units on the link, and content
//! compresses differently: the working data a guest rewrites, the rest of
//! its RAM, a disk's data. A unit of kind `k` costs `unit x c(k, w > 0)`
//! link bytes ([`model::WireCost`]: a cost per kind for units the profile
//! saw written and for the rest; the engine measures them on the guest
//! while profiling). Every byte count below is in link bytes: round 0
//! sends the pre-copy set at its own mix, later rounds and the freeze resend
//! written units, the push sends each unit at its own cost in its order.
//! With every cost 1 (the default), link bytes are unit bytes.
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
//! only reported). The order is decided **exactly, with integers**: the
//! score increases with `-ln((1 - r'/n)(1 - w'/n))`, so hotter means a
//! smaller `key = max(2(n - r), 1) * max(2(n - w), 1)` (a u64; the `max`
//! is the clamp doubled). Ties (equal keys are equal scores, e.g. `n = 3`,
//! `(r, w) = (1, 3)` and `(2, 2)`): lower `w` first (as `model.md`), then
//! (our refinement) lower `o` for chunks, i.e. the higher post-copy fetch
//! rate first, then populated before zero units, then lower address. The
//! added keys make every class a contiguous run of the order, which is what
//! makes the class model exact and lets a rule name one *boundary class*.
//! The pre-copy set of a kind is its top `round(M * units)` units; the same
//! order drives the post-copy push. The ranking uses the profile's counters
//! even when re-planning scales the write rates (`write_scale`, below): the
//! engine must evaluate rules exactly from counters with integer
//! arithmetic, and the scale is a fitted correction of the *aggregate*
//! dirty rate, not a per-unit access estimate; the model evaluates the set
//! so ranked with the scaled rates (pre-copy dirtying and post-copy fetch
//! rates), so its predictions describe exactly what the engine executes.
//!
//! **Pre-copy rounds** ([`model::precopy`]). Round 0 sends the whole set
//! (zero/never-populated units as a flag: 0 bytes). With `x_w` the set's bytes
//! of write rate `lambda_w`, round `k` (length `t_k = bytes_k / B`) leaves
//! `d_w = x_w (1 - e^{-lambda t})` bytes dirty, every unit written at any
//! time during it (the engine collects its dirty log once per round, so a
//! unit written before its own send in the round is resent all the same),
//! and round `k + 1` sends `d_w`. Memory and storage share the rounds and `B`.
//! Only `w` matters, so the state is one number per distinct `w`. Stop after
//! round `k` when: nothing is dirty (`Clean`); or the freeze time meets the
//! downtime target (`TargetMet`; as the engine tests it, with the dirty
//! units counted uncompressed, since it cannot know how they compress
//! before sending them: the freeze `D` below then takes less when they
//! compress); or it has *converged*: the remainder is
//! at most 1 % of (state + one unit) bytes, `rem <= 0.01 (state + max(page,
//! chunk))` (`Converged`; a threshold in bytes, independent of `B`); or the
//! dirty set shrank by less than 5 % (`rem >= 0.95 bytes_k`,
//! `NotShrinking`); or 30 rounds (`RoundLimit`). Rounds are pipelined (no
//! per-round RTT).
//!
//! **Freeze.** `D = (sent + state) / B + RTT + resume_overhead`
//! (`resume_overhead` defaults to 0, so a guest that never writes has exactly
//! `D = state / B + RTT` at `M = S = 1`), where `sent` is what the plan's
//! freeze policy ([`model::FreezePolicy`]) sends of the dirty remainder
//! `rem`. *Classic*: all of it. *Overflow* (the default): all of it when
//! that meets the downtime limit `L`; otherwise the dirty units (pages and
//! chunks, in merged rank order) hottest first within the budget `(L -
//! state / B - RTT - overhead) B`, and the coldest dirty units, whole units
//! until their expected dirty bytes cover the excess, leave the freeze for
//! post-copy.
//! In the model a unit of write group `w` is dirty at the freeze with
//! probability `phi_w = d_w / x_w`, so an overflowed class of `u` units is
//! a post-copy class of push weight `phi_w` (as a zero unit's is `q`
//! below), pushed before the rest of the post-copy set, hottest first, and
//! faulting like any post-copy unit ([`model`]'s `overflow` module gives
//! the cost: per write group a stall table, `O(groups)` per step while the
//! push front is in the overflow). Hence `D <= L` whenever the device state
//! fits, and the two policies agree wherever the classic freeze meets `L`. A plan's [`model::PlanStrategy`] is its freeze
//! policy and round limit.
//!
//! **Post-copy arrivals** ([`model::postcopy`]). Everything outside the
//! pre-copy set is pushed once, in one merged rank order (pages before
//! chunks on a full tie). A populated unit costs `unit c` link bytes of push; a
//! unit that was zero at profile end costs nothing if it is still zero at
//! the freeze, which happens with probability `e^{-lambda_w T_pre}`, so it
//! costs `q = 1 - e^{-lambda_w T_pre}` of a unit in expectation (a
//! still-zero unit is mapped as zero at the destination: no push, no
//! fault). The `j`-th unit of a class whose push starts at `a` bytes
//! arrives at wall time `(a + j q unit c) / B` after resume. A fault fetches
//! its unit on demand and the push later skips it: faults do not move other
//! arrivals (the fetch's own `unit / B` of link time is neglected there),
//! and `U` = the total push time, `T = T_pre + D + U`.
//!
//! **Stalls in wall-clock time.** The resumed guest does *work*; its wall
//! clock is `W(t) = t + S(t)` after `t` seconds of work, `S` the stall so
//! far. A unit's first access comes at work time `t_u ~ Exp(lambda_a)`
//! (`lambda_a = lambda_r + lambda_w` for pages, `lambda_r + lambda_w (1 -
//! o/w)` for chunks: whole-block overwrites never fetch); it faults iff the
//! unit has not arrived by then in **wall** time, `W(t_u) < A_u`, and each
//! fault stalls the guest `2 RTT + unit c(k, written) / B` (one round trip of
//! bulk data queued ahead of the reply: [`model::FAULT_QUEUE_RTTS`]). The push goes on while the
//! guest stalls, so a stalled guest finds more units present when it
//! resumes. In expectation (mean field),
//! `dS/dt = sum over units not arrived by W(t) of q lambda_a e^{-lambda_a t} stall`,
//! integrated over a fixed work-time grid (geometric, ratio <= 1.3, from
//! `min(1e-4 dT, 0.01 / lambda_max)` to `dT` (~36 steps), then on to the
//! push time of everything, beyond which all units have arrived) with a
//! predictor-corrector on the moving arrival front: over step `[t_k,
//! t_{k+1}]` an absent unit contributes `q (e^{-lambda_a t_k} -
//! e^{-lambda_a t_{k+1}})` faults; with `M_k(W)` the stall-weighted sum over
//! the units not arrived by wall time `W`, `a = M_k(t_k + S_k)`,
//! `b = M_k(t_{k+1} + S_k + a)`, `S_{k+1} = S_k + (a + b) / 2`. The
//! absent units are a suffix of the push order, so per-step suffix sums
//! over each kind's rank order (built once in `Model::new`, O(classes x
//! steps)) make an evaluation O(steps x log classes), plus the classes
//! zero at profile end but written (their `q` depends on the plan).
//!
//! **`DeltaT`, `P`, `Gamma`.** `DeltaT = dT + S(dT)`: the wall time the
//! resumed guest needs for `dT` seconds of work (`model.md`).
//! `P = S(end)`: the expected fault stall time over the whole post-copy
//! (`model.md`'s "expected stall time from post-copy faults"), so
//! `P >= DeltaT - dT`. `Gamma = dT / (D + DeltaT)`; the weighted policy
//! maximises `1 / (w1 D + w2 P)` instead.
//!
//! **Accuracy of the post-copy model**, against a per-unit Monte Carlo of
//! the same assumptions (random first-access times, stalls fed back into
//! the wall clock; tests in `model`): within the Monte Carlo noise (under
//! 1 %) on guests with hundreds of faults or more (for example a 4 GiB web
//! guest at 40 Mbit/s, `M = S = 0`: `DeltaT` 506.7 s against 506.9 s, where
//! a first-order model comparing arrivals with *work* time said 1747 s);
//! on tiny guests with a handful of large stalls the mean field
//! underestimates the stalls by up to ~8 % (the stall is right-skewed;
//! tested with a 12 % bound, `DeltaT` within 6 %).
//!
//! **Downtime limit and feasibility.** `L` = the downtime target, or `dT`
//! without one. A plan with `D > L` is infeasible: its objective is `-D`
//! (below every feasible plan, larger the closer it is to feasible), and it
//! is never reported as live. Infeasible grid points skip the post-copy
//! integration (their `Gamma` is not needed).
//!
//! **Search** ([`search`]). The seed recursion (memory instantly copied:
//! ternary on `S`; then `S` fixed: ternary on `M`; plateaus handled) and
//! the full 101 x 101 grid, both on the 1 % lattice, under the parameters'
//! strategy (by default the overflow freeze and 30 rounds); then the named
//! fixed strategies the grid does not hold (classic pre-copy, `M = S = 1`
//! with the overflow freeze, QEMU's hybrid: `M = S = 1`, one pass, the
//! overflow freeze; pure post-copy). The plan is the best of the grid's
//! optimum and the named strategies (the ternary answer is one of the
//! grid's points; the report says whether it reaches the grid's optimum
//! and where the plan comes from). **Live migration is possible**
//! iff some storage fraction `S >= 1 %`, with memory instantly copied,
//! pre-copies to convergence (stop `Clean`, `Converged` or `TargetMet`)
//! with `D <= L`; the largest such `S` is reported. Impossible means the
//! device state alone misses `L`, or even the hottest 1 % of storage is
//! rewritten faster than the link can pre-copy it. `plan` still prints the
//! best plan (often post-copy heavy) and exits with status 2.
//!
//! **Bandwidth monotonicity.** More bandwidth shortens every round and
//! every push, but the stop rules are discrete: a faster link can reach the
//! converged threshold (or the downtime target) a round earlier, with a
//! larger remainder, so `Gamma*` can drop slightly. The bound, with
//! `A(B) = dT / Gamma*(B) = D + DeltaT` at the optimum and `B1 < B2`:
//! `A(B2) <= A(B1) + thr / B2` without a target (`thr` = the converged
//! threshold in bytes; a few microseconds to a millisecond), plus
//! `max(0, L - D(B1))` with a target, where `TargetMet` stops pre-copy as
//! soon as `D <= L` by design (`model.md`). Checked by a property test over
//! random small profiles; strictly monotone on the synthetic workloads.
//!
//! **Re-plan thresholds** ([`serve`]). Measured bandwidth departing from the
//! planned one by more than 20 %, or a pre-copy round's measured dirty bytes
//! departing from the model's expectation for that round (at its measured
//! duration) by more than 25 % (of at least 1 MiB), triggers a new search
//! with the measured bandwidth and RTT and a write-rate multiplier
//! (`write_scale`) fitted to the measured dirtying; the result is published
//! as the next generation. A failed re-plan (for example the profile file
//! truncated under the planner) leaves the previous generation published.
//!
//! **Exactness and cost.** The class model equals the per-unit model (the
//! same equations, including the time grid and the predictor-corrector,
//! applied unit by unit) up to floating-point summation order (relative
//! 1e-9, checked by property tests, the overflow freeze's included). A
//! full plan for a 1 TiB + 16 TiB guest from its class histogram takes
//! 0.16-1 s on this two-core machine under load when the default freeze
//! overflows in most plans (every plan then integrates its post-copy
//! window; the planner before the overflow freeze: 25-67 ms in the same
//! session, most of those plans infeasible and skipped), 64-137 ms when
//! none overflows; see the planner's README.

#![warn(missing_docs)]

#[cfg(feature = "heatmap")]
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
