//! The freeze's overflow ([`FreezePolicy::Overflow`](super::FreezePolicy)):
//! which dirty units leave the freeze, and their post-copy stalls.
//!
//! **Which units.** After the last round, write group `g` of the pre-copy
//! sets (pages' groups and chunks' groups are distinct) holds `d_g` of its
//! `x_g` link bytes dirty: every unit of the group is dirty with the same
//! probability `phi_g = d_g / x_g` (the recursion is linear in a unit's
//! bytes). The freeze sends the dirty units hottest first (the merged rank
//! order of pages and chunks) while they fit the budget; the rest,
//! `O = rem - budget` link bytes in expectation, are the coldest dirty
//! units. The model takes them from the cold end of the pre-copy sets in
//! merged order, class by class, until their expected dirty bytes cover
//! `O`: whole units (the class where the cut falls gives `ceil` of what it
//! must cover), so the units that stay fit and `D <= L`. A class `c` in
//! the overflow contributes `u_c` units, each absent with probability
//! `phi_g(c)`: in the post-copy integral it is a class of push weight
//! `q = phi` (as a unit zero at profile end is one of weight
//! `q = 1 - e^{-lambda_w T_pre}`), which faults at its kind's fetch rate
//! and costs its kind's stall.
//!
//! **When they arrive.** The engine pushes the overflow first, before the
//! rest of the post-copy set (those units were in the pre-copy sets:
//! hotter than every post-copy unit of their kind): the overflowed pages
//! hottest first, then the overflowed chunks hottest first. The push front
//! thus crosses the overflowed page classes in `[0, O_p)` pushed bytes,
//! the chunks in `[O_p, O_p + O_c)`, then the usual merged order shifted
//! by `O = O_p + O_c`. The pages' arrivals are integrated class by class;
//! the chunks' as if each arrived at a uniform point of their segment
//! (their absent mass falls linearly from the segment's start to its end).
//! That is pessimistic (the engine's hottest-first push brings the hot
//! chunks earlier, so fewer faults wait for them) and keeps an evaluation
//! independent of the number of chunk classes (tens of thousands for a
//! large disk), which the front would otherwise cross one by one.
//!
//! **Cost.** The overflowed pages' absent mass at a push front is a suffix
//! over their classes with weights `phi_g u_c`; the chunks' is their
//! whole mass (times the fraction of their segment not yet pushed). Per
//! write group a
//! [`StallTable`] over that group's classes (built once, `O(classes x
//! steps)` in all), read between the group's first class at or after the
//! front and its last overflow class, times `phi_g`; the (at most three)
//! classes only partly in the overflow are corrected directly. Where the
//! cut falls is found by bisection on per-group prefix sums of each kind's
//! written classes (bytes and units, kept at every [`STRIDE`]-th class:
//! `O(log classes x (groups + STRIDE))`), and the overflow's classes are
//! visited only as far as the push front reaches them: an evaluation costs
//! `O(groups)` per step while the front is in the overflow, plus the
//! classes it crosses.

use super::postcopy::StallTable;
use super::{Front, Model, NO_GROUP, RClass};

/// `covered(acc, target)`: the overflow's dirty bytes cover `target`, up to
/// rounding (the per-unit reference uses the same tolerance).
pub(crate) const COVER_TOLERANCE: f64 = 1e-12;

/// Written classes of a kind between two stored per-group prefix sums.
pub(crate) const STRIDE: usize = 32;

/// One class of the overflow, in push order (hottest first).
#[derive(Debug, Clone, Copy)]
struct OvEntry {
    /// Its kind (0 pages, 1 chunks) and index in that kind's written list.
    kind: u8,
    widx: u32,
    /// Its group's slot in [`Overflow::groups`].
    slot: u32,
    /// The write group.
    group: u32,
    /// Index of the class in its group's list.
    gidx: u32,
    /// Units of the class in the overflow.
    units: u64,
    /// Probability that one of its units is dirty (absent).
    phi: f64,
    /// Expected push bytes per unit (`phi x wire`).
    cost: f64,
    /// Overflow push bytes before its first unit.
    start: f64,
}

/// A write group with classes in the overflow.
#[derive(Debug, Clone, Copy)]
struct OvGroup {
    group: u32,
    /// Its overflow classes are `first..end` of the group's list.
    first: u32,
    end: u32,
    phi: f64,
    /// Stall of a fault on one of its units.
    stall: f64,
}

/// A class only partly in the overflow: its table counts `missing` units
/// that are not.
#[derive(Debug, Clone, Copy)]
struct Partial {
    /// Merged position.
    pos: u32,
    group: u32,
    gidx: u32,
    phi: f64,
    missing: u64,
    stall: f64,
}

/// One kind's part of the overflow.
#[derive(Debug, Clone, Copy, Default)]
struct KindPart {
    /// The pre-copy set's written classes are `written[..end]`; the last
    /// gives `take` units when partly pre-copied (`tail_take`).
    end: usize,
    tail_take: Option<u64>,
    /// The overflow's are `written[first..end]`.
    first: usize,
    /// The next class to visit.
    next: usize,
}

/// The overflow of one evaluation (reusable scratch space).
#[derive(Debug, Clone, Default)]
pub(crate) struct Overflow {
    /// Whether the freeze overflowed.
    pub active: bool,
    /// Expected link bytes of the overflow (its push length).
    pub bytes: f64,
    /// Of those, the pages' (pushed first) and the chunks'.
    page_bytes: f64,
    chunk_bytes: f64,
    /// Expected pages and chunks in it.
    pub units: [f64; 2],
    /// Per write group: the probability that a unit is dirty at the freeze.
    pub phi: Vec<f64>,
    parts: [KindPart; 2],
    /// The cut class: its merged position and units in the overflow.
    cut_pos: u32,
    cut_units: u64,
    /// The classes visited so far, in push order.
    entries: Vec<OvEntry>,
    /// Push bytes of the entries so far.
    pushed: f64,
    /// The pages' write groups in the overflow, and the chunks'.
    groups: Vec<OvGroup>,
    cgroups: Vec<OvGroup>,
    slot_of: Vec<u32>,
    /// Classes only partly in the overflow: pages, chunks.
    partial: Vec<Partial>,
    cpartial: Vec<Partial>,
    /// `(step, faults, stall)` of every overflowed chunk at that step.
    chunk_mass: Option<(usize, f64, f64)>,
    /// Per slot: the group's first class at or after the front entry `at`.
    cur: Vec<u32>,
    at: usize,
    /// The same for the predictor-corrector's look-ahead front (which also
    /// only moves forward, step after step).
    probe: Vec<u32>,
    probe_at: usize,
    /// The last front's `(step, entry, faults and stall of the entries from
    /// it on)`.
    last: Option<(usize, usize, f64, f64)>,
    /// `(step, sum over groups of phi x the table's suffix at the group's
    /// end, the same times the stall)`: what every front's sum subtracts.
    ends: Option<(usize, f64, f64)>,
    /// Per kind: dirty `(bytes, units)` of the pre-copy set's written
    /// classes, whole.
    set_dirty: [(f64, f64); 2],
    /// Per-group class counts (prefix sums at the overflow's start and at
    /// the set's end).
    classes_at: Vec<u32>,
    classes_end: Vec<u32>,
}

impl Overflow {
    /// No overflow.
    pub fn clear(&mut self) {
        self.active = false;
        self.bytes = 0.0;
        self.units = [0.0; 2];
        self.page_bytes = 0.0;
        self.chunk_bytes = 0.0;
        self.entries.clear();
        self.groups.clear();
        self.cgroups.clear();
        self.partial.clear();
        self.cpartial.clear();
        self.last = None;
        self.ends = None;
        self.chunk_mass = None;
    }

    /// Records that `missing` units of written class `w` (of `kind`: 0
    /// pages, 1 chunks) are overflowed, each dirty with its group's
    /// probability and stalling `stall` per fault.
    fn push_partial(&mut self, kind: usize, w: &Written, missing: u64, stall: f64) {
        let partial = Partial {
            pos: w.pos,
            group: w.group,
            gidx: w.gidx,
            phi: self.phi[w.group as usize],
            missing,
            stall,
        };
        if kind == 0 {
            self.partial.push(partial);
        } else {
            self.cpartial.push(partial);
        }
    }
}

/// A class with `w > 0`, as the overflow sees it.
#[derive(Debug, Clone, Copy)]
struct Written {
    /// The class's index in its kind's ranked classes.
    class: u32,
    /// Its position in the merged order.
    pos: u32,
    /// Its write group.
    group: u32,
    /// Its index in its group's list.
    gidx: u32,
    /// Units.
    count: u64,
    /// Link bytes of one unit.
    wire: f64,
}

/// Per write group, the classes (in rank order) and a stall table over
/// them with every unit counted (zero-at-profile-end classes too: once
/// dirty they hold data), and per kind, per-group prefix sums over its
/// written classes.
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupTables {
    /// One table per write group.
    tables: Vec<StallTable>,
    /// Per kind, the classes with `w > 0`, in rank order.
    written: [Vec<Written>; 2],
    /// Write groups.
    groups: usize,
    /// Per kind, at `[c * groups + g]`, over `written[kind][..c * STRIDE]`:
    /// group `g`'s link bytes (`count x wire`), units and classes.
    cp_bytes: [Vec<f64>; 2],
    cp_units: [Vec<f64>; 2],
    cp_classes: [Vec<u32>; 2],
}

impl GroupTables {
    /// Builds the tables for `groups` write groups over each kind's ranked
    /// classes (`group`, `lam_parts`, `count`, `pos`) on grid `t`.
    pub fn build(t: &[f64], groups: usize, kinds: [&[RClass]; 2]) -> GroupTables {
        let mut parts: Vec<Vec<(f64, f64)>> = vec![Vec::new(); groups];
        let mut weight: Vec<Vec<f64>> = vec![Vec::new(); groups];
        let mut written: [Vec<Written>; 2] = Default::default();
        for (k, classes) in kinds.iter().enumerate() {
            for (i, c) in classes.iter().enumerate() {
                if c.group == NO_GROUP {
                    continue;
                }
                let g = c.group as usize;
                written[k].push(Written {
                    class: i as u32,
                    pos: c.pos,
                    group: c.group,
                    gidx: parts[g].len() as u32,
                    count: c.count,
                    wire: c.wire,
                });
                parts[g].push(c.lam_parts);
                weight[g].push(c.count as f64);
            }
        }
        let tables = parts
            .iter()
            .zip(weight)
            .map(|(p, w)| StallTable::build(t, p, w, &[]).0)
            .collect();
        let mut out = GroupTables {
            tables,
            groups,
            ..GroupTables::default()
        };
        for (k, written) in written.iter().enumerate() {
            let rows = written.len() / STRIDE + 1;
            let (mut cb, mut cu, mut cc) = (
                vec![0.0; rows * groups],
                vec![0.0; rows * groups],
                vec![0u32; rows * groups],
            );
            let (mut b, mut u, mut n) = (vec![0.0; groups], vec![0.0; groups], vec![0u32; groups]);
            for i in 0..=written.len() {
                if i % STRIDE == 0 {
                    let r = i / STRIDE * groups;
                    cb[r..r + groups].copy_from_slice(&b);
                    cu[r..r + groups].copy_from_slice(&u);
                    cc[r..r + groups].copy_from_slice(&n);
                }
                if let Some(w) = written.get(i) {
                    let g = w.group as usize;
                    b[g] += w.count as f64 * w.wire;
                    u[g] += w.count as f64;
                    n[g] += 1;
                }
            }
            out.cp_bytes[k] = cb;
            out.cp_units[k] = cu;
            out.cp_classes[k] = cc;
        }
        out.written = written;
        out
    }

    /// `(bytes, units)` of the dirty units of `written[kind][..i]` whole,
    /// with each group's units dirty with probability `phi[g]`: one stored
    /// row and at most [`STRIDE`] classes.
    fn dirty_before(&self, kind: usize, phi: &[f64], i: usize) -> (f64, f64) {
        let r = i / STRIDE * self.groups;
        let row = r..r + self.groups;
        let mut bytes: f64 = phi
            .iter()
            .zip(&self.cp_bytes[kind][row.clone()])
            .map(|(p, b)| p * b)
            .sum();
        let mut units: f64 = phi
            .iter()
            .zip(&self.cp_units[kind][row])
            .map(|(p, u)| p * u)
            .sum();
        for w in &self.written[kind][i / STRIDE * STRIDE..i] {
            let p = phi[w.group as usize];
            bytes += p * w.count as f64 * w.wire;
            units += p * w.count as f64;
        }
        (bytes, units)
    }

    /// Adds, per group, the classes of `written[kind][..i]` to `classes`.
    fn classes_before(&self, kind: usize, i: usize, classes: &mut [u32]) {
        let r = i / STRIDE * self.groups;
        for (c, n) in classes
            .iter_mut()
            .zip(&self.cp_classes[kind][r..r + self.groups])
        {
            *c += n;
        }
        for w in &self.written[kind][i / STRIDE * STRIDE..i] {
            classes[w.group as usize] += 1;
        }
    }
}

impl Model {
    /// Per kind, `(bytes, units)` of the dirty units of the pre-copy sets'
    /// written classes at merged positions `>= p`.
    fn overflow_rest(&self, ov: &Overflow, p: u32) -> [(f64, f64); 2] {
        let t = &self.group_tables;
        std::array::from_fn(|k| {
            let part = &ov.parts[k];
            let written = &t.written[k][..part.end];
            let i = written.partition_point(|w| w.pos < p);
            let (before, before_units) = t.dirty_before(k, &ov.phi, i);
            let (mut bytes, mut units) =
                (ov.set_dirty[k].0 - before, ov.set_dirty[k].1 - before_units);
            if let (Some(take), Some(w)) = (part.tail_take, written.last()) {
                if i < part.end {
                    let phi = ov.phi[w.group as usize];
                    let missing = (w.count - take) as f64;
                    bytes -= phi * missing * w.wire;
                    units -= phi * missing;
                }
            }
            (bytes.max(0.0), units.max(0.0))
        })
    }

    /// Units of `written[kind][i]` in its pre-copy set.
    fn set_units(&self, ov: &Overflow, kind: usize, i: usize) -> u64 {
        let part = &ov.parts[kind];
        match part.tail_take {
            Some(take) if i + 1 == part.end => take,
            _ => self.group_tables.written[kind][i].count,
        }
    }

    /// Fills `ov` with the coldest dirty units of the pre-copy sets (per
    /// kind, classes `..b` and `take` units of class `b`; `None`: the kind
    /// has no set) whose expected dirty bytes cover `target`, given
    /// `ov.phi`; returns their expected bytes.
    pub(crate) fn overflow_region(
        &self,
        ov: &mut Overflow,
        cuts: [Option<(usize, u64)>; 2],
        target: f64,
    ) -> f64 {
        ov.clear();
        let t = &self.group_tables;
        let cover = target * (1.0 - COVER_TOLERANCE);
        for (k, cut) in cuts.iter().enumerate() {
            let written = &t.written[k];
            let (end, tail_take) = match *cut {
                None => (0, None),
                Some((b, take)) => {
                    let end = written.partition_point(|w| {
                        (w.class as usize) < b || (take > 0 && w.class as usize == b)
                    });
                    let tail = written[..end]
                        .last()
                        .filter(|w| w.class as usize == b && take < w.count)
                        .map(|_| take);
                    (end, tail)
                }
            };
            ov.parts[k] = KindPart {
                end,
                tail_take,
                first: end,
                next: end,
            };
            let whole = t.dirty_before(k, &ov.phi, end);
            ov.set_dirty[k] = whole;
        }
        if cover.is_nan() || cover <= 0.0 || ov.parts.iter().all(|p| p.end == 0) {
            return 0.0;
        }
        let total = |r: [(f64, f64); 2]| r[0].0 + r[1].0;
        // The cut: the first merged position `a` whose colder units fall
        // short of `cover` (taking units from the cold end, the class at
        // `a` is the last one reached).
        let (mut lo, mut hi) = (0u32, self.merged.len() as u32);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if total(self.overflow_rest(ov, mid + 1)) >= cover {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        // The class there (or the next one with dirty units).
        let dirty_class = |ov: &Overflow, p: u32| -> Option<(usize, usize, f64)> {
            let (k, c) = self.merged[p as usize];
            let k = k as usize;
            let part = &ov.parts[k];
            let written = &t.written[k][..part.end];
            let i = written.partition_point(|w| (w.class as usize) < c as usize);
            let w = written.get(i).filter(|w| w.class == c)?;
            let d = ov.phi[w.group as usize] * w.wire;
            (d > 0.0).then_some((k, i, d))
        };
        let mut a = lo;
        let cut = loop {
            if a as usize >= self.merged.len() {
                return 0.0;
            }
            if let Some(found) = dirty_class(ov, a) {
                break found;
            }
            a += 1;
        };
        let (ka, ia, d) = cut;
        let colder = self.overflow_rest(ov, a + 1);
        let w = t.written[ka][ia];
        let n = self.set_units(ov, ka, ia);
        // Units are taken while the dirty bytes taken so far fall short of
        // `cover`: all of the class, or where it is cut.
        let k = if total(colder) + n as f64 * d < cover {
            n
        } else {
            let need = ((cover - total(colder)) / d).ceil();
            if need >= n as f64 {
                n
            } else {
                (need as u64).clamp(1, n)
            }
        };
        let phi = ov.phi[w.group as usize];
        ov.cut_pos = a;
        ov.cut_units = k;
        ov.page_bytes = colder[0].0;
        ov.chunk_bytes = colder[1].0;
        if ka == 0 {
            ov.page_bytes += k as f64 * d;
        } else {
            ov.chunk_bytes += k as f64 * d;
        }
        ov.bytes = ov.page_bytes + ov.chunk_bytes;
        ov.units = [colder[0].1, colder[1].1];
        ov.units[ka] += k as f64 * phi;
        // Each kind's overflow classes, the groups they hold, and where
        // these start and end.
        ov.classes_at.clear();
        ov.classes_at.resize(t.groups, 0);
        ov.classes_end.clear();
        ov.classes_end.resize(t.groups, 0);
        for kind in 0..2 {
            let part = &mut ov.parts[kind];
            let written = &t.written[kind][..part.end];
            part.first = written.partition_point(|w| w.pos < a);
            part.next = part.first;
            t.classes_before(kind, part.first, &mut ov.classes_at);
            t.classes_before(kind, part.end, &mut ov.classes_end);
        }
        ov.slot_of.clear();
        ov.slot_of.resize(t.groups, u32::MAX);
        for g in 0..t.groups {
            let (first, end) = (ov.classes_at[g], ov.classes_end[g]);
            if first < end && ov.phi[g] > 0.0 {
                let group = OvGroup {
                    group: g as u32,
                    first,
                    end,
                    phi: ov.phi[g],
                    stall: self.group_stall(g),
                };
                if g < self.page_groups {
                    ov.slot_of[g] = ov.groups.len() as u32;
                    ov.groups.push(group);
                } else {
                    ov.cgroups.push(group);
                }
            }
        }
        if k < w.count {
            ov.push_partial(ka, &w, w.count - k, self.kinds[ka].stall);
        }
        for kind in 0..2 {
            let part = ov.parts[kind];
            if let Some(take) = part.tail_take {
                let tail = part.end - 1;
                if tail >= part.first && !(kind == ka && tail == ia) {
                    let w = t.written[kind][tail];
                    ov.push_partial(kind, &w, w.count - take, self.kinds[kind].stall);
                }
            }
        }
        ov.pushed = 0.0;
        ov.cur.clear();
        ov.cur.extend(ov.groups.iter().map(|g| g.first));
        ov.at = 0;
        ov.probe.clone_from(&ov.cur);
        ov.probe_at = 0;
        ov.last = None;
        ov.active = true;
        ov.bytes
    }

    /// The stall of a fault on a unit of write group `g` (pages' groups
    /// come first).
    fn group_stall(&self, g: usize) -> f64 {
        if g < self.page_groups {
            self.kinds[0].stall
        } else {
            self.kinds[1].stall
        }
    }

    /// Visits the overflowed page classes, hottest first, until one holds
    /// push position `x` (or none is left).
    fn overflow_visit(&self, ov: &mut Overflow, x: f64) {
        let t = &self.group_tables;
        let kind = 0;
        loop {
            if ov
                .entries
                .last()
                .is_some_and(|e| e.start + e.units as f64 * e.cost > x)
                || ov.parts[kind].next >= ov.parts[kind].end
            {
                return;
            }
            let i = ov.parts[kind].next;
            ov.parts[kind].next += 1;
            let w = t.written[kind][i];
            let phi = ov.phi[w.group as usize];
            let d = phi * w.wire;
            if d.is_nan() || d <= 0.0 {
                continue;
            }
            let units = if w.pos == ov.cut_pos {
                ov.cut_units
            } else {
                self.set_units(ov, kind, i)
            };
            ov.entries.push(OvEntry {
                kind: kind as u8,
                widx: i as u32,
                slot: ov.slot_of[w.group as usize],
                group: w.group,
                gidx: w.gidx,
                units,
                phi,
                cost: d,
                start: ov.pushed,
            });
            ov.pushed += units as f64 * d;
        }
    }

    /// The expected `(stall, faults)` over step `k` of the overflow units
    /// not yet pushed once `x` overflow bytes are pushed. `probe`: leave the
    /// front where it is (the predictor-corrector's look ahead); otherwise
    /// `x` must not decrease from call to call.
    pub(crate) fn overflow_absent(
        &self,
        ov: &mut Overflow,
        x: f64,
        k: usize,
        probe: bool,
    ) -> (f64, f64) {
        if !ov.active || x >= ov.bytes {
            return (0.0, 0.0);
        }
        let (mut stall, mut faults) = (0.0, 0.0);
        // The chunks, their segment after the pages' (see the module docs).
        if ov.chunk_bytes > 0.0 {
            let left = 1.0 - ((x - ov.page_bytes) / ov.chunk_bytes).clamp(0.0, 1.0);
            if left > 0.0 {
                let (cf, cs) = self.overflow_chunk_mass(ov, k);
                faults += left * cf;
                stall += left * cs;
            }
        }
        if x < ov.page_bytes {
            let (s, f) = self.overflow_pages_absent(ov, x, k, probe);
            stall += s;
            faults += f;
        }
        (stall, faults)
    }

    /// `(faults, stall)` over step `k` of every overflowed chunk, absent.
    fn overflow_chunk_mass(&self, ov: &mut Overflow, k: usize) -> (f64, f64) {
        if let Some((ck, f, s)) = ov.chunk_mass {
            if ck == k {
                return (f, s);
            }
        }
        let tables = &self.group_tables.tables;
        let (mut f, mut s) = (0.0, 0.0);
        for g in &ov.cgroups {
            let t = &tables[g.group as usize];
            let m = g.phi * (t.suffix(k, g.first as usize) - t.suffix(k, g.end as usize));
            f += m;
            s += m * g.stall;
        }
        for p in &ov.cpartial {
            let m =
                p.missing as f64 * p.phi * tables[p.group as usize].unit_mass(k, p.gidx as usize);
            f -= m;
            s -= m * p.stall;
        }
        ov.chunk_mass = Some((k, f, s));
        (f, s)
    }

    /// The overflowed pages' `(stall, faults)` over step `k` once `x <`
    /// their bytes are pushed (see [`overflow_absent`](Self::overflow_absent)).
    fn overflow_pages_absent(
        &self,
        ov: &mut Overflow,
        x: f64,
        k: usize,
        probe: bool,
    ) -> (f64, f64) {
        self.overflow_visit(ov, x);
        if ov.entries.is_empty() {
            return (0.0, 0.0);
        }
        let j = ov.entries.partition_point(|e| e.start <= x).max(1) - 1;
        let tables = &self.group_tables.tables;
        let unit_mass = |group: u32, gidx: u32, phi: f64| {
            phi * tables[group as usize].unit_mass(k, gidx as usize)
        };
        let kind_stall = |kind: u8| self.kinds[kind as usize].stall;
        // The absent faults and stall of the entries from `j` on.
        let (faults, stall) = match ov.last {
            // The predictor-corrector's look ahead, at the same step and a
            // few classes on: from the front's, less the entries passed.
            Some((lk, lj, f, s)) if probe && lk == k && lj <= j && j - lj <= 8 => {
                let (mut f, mut s) = (f, s);
                for e in &ov.entries[lj..j] {
                    let m = e.units as f64 * unit_mass(e.group, e.gidx, e.phi);
                    f -= m;
                    s -= m * kind_stall(e.kind);
                }
                (f, s)
            }
            _ => {
                let Overflow {
                    entries,
                    groups,
                    partial,
                    cur,
                    at,
                    probe: probe_cur,
                    probe_at,
                    ends: ov_ends,
                    ..
                } = &mut *ov;
                let (cursor, cursor_at) = if probe {
                    if j < *probe_at {
                        // The look-ahead front moved back: from the front.
                        probe_cur.clone_from(cur);
                        *probe_at = *at;
                    }
                    (probe_cur, probe_at)
                } else {
                    (cur, at)
                };
                if j < *cursor_at {
                    // The front moved back (not in the integration, which
                    // only moves it forward): start over from the first
                    // entry.
                    cursor.clear();
                    cursor.extend(groups.iter().map(|g| g.first));
                    *cursor_at = 0;
                }
                for e in &entries[*cursor_at..j] {
                    cursor[e.slot as usize] = e.gidx + 1;
                }
                *cursor_at = j;
                // Per group, its classes from the cursor to its end: the
                // suffix at the cursor less the suffix at the end (the
                // latter summed once per step).
                let (ef, es) = match ov_ends {
                    Some((ek, f, s)) if *ek == k => (*f, *s),
                    _ => {
                        let (mut f, mut s) = (0.0, 0.0);
                        for g in groups.iter() {
                            let m = g.phi * tables[g.group as usize].suffix(k, g.end as usize);
                            f += m;
                            s += m * g.stall;
                        }
                        *ov_ends = Some((k, f, s));
                        (f, s)
                    }
                };
                let (mut f, mut s) = (-ef, -es);
                for (g, &c) in groups.iter().zip(cursor.iter()) {
                    let m = g.phi * tables[g.group as usize].suffix(k, c as usize);
                    f += m;
                    s += m * g.stall;
                }
                let front = self.group_tables.written[entries[j].kind as usize]
                    [entries[j].widx as usize]
                    .pos;
                for p in partial.iter().filter(|p| p.pos >= front) {
                    let m = p.missing as f64 * unit_mass(p.group, p.gidx, p.phi);
                    f -= m;
                    s -= m * p.stall;
                }
                (f, s)
            }
        };
        if !probe {
            ov.last = Some((k, j, faults, stall));
        }
        let e = &ov.entries[j];
        let unit = unit_mass(e.group, e.gidx, e.phi);
        let front = Front {
            start: e.start,
            cost: e.cost,
            units: e.units,
            stall,
            faults,
            unit_stall: unit * kind_stall(e.kind),
            unit_faults: unit,
        };
        front.absent(x)
    }
}
