//! Which pages (and disk chunks) are pre-copied, and in what order
//! everything is sent.
//!
//! The plan's `M` selects the pre-copy set: the first `round(M × pages)` pages
//! of a priority order (hottest first). The same order drives the post-copy
//! background push, so the pages the guest is most likely to touch after the
//! resume arrive first. Without a profile the order is address order (the
//! guest's low memory, where kernels keep their hottest data, first); with a
//! profile it is the planner's ranking.
//!
//! A plan also says how the source pre-copies besides its sets: a round
//! limit and a freeze policy ([`PageOrder::with_strategy`]). Without them
//! the engine's round limit applies, and the freeze follows the plan's
//! shape ([`PageOrder::freeze_policy`]): a plan that post-copies anything
//! keeps the downtime target (the overflow policy), a plan that pre-copies
//! everything is classic pre-copy.

use wanmig_planner::model::FreezePolicy;

/// A priority order of all pages and the size of its pre-copy prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageOrder {
    order: Vec<u64>,
    precopy: usize,
    in_precopy: Vec<u64>,
    /// The disks' chunks, in the same kind of order with `S` as prefix.
    chunks: Option<Box<PageOrder>>,
    /// Where each chunk (by position in the chunk order) goes in the
    /// post-copy push: after this page ([`NO_PAGE`]: before every page).
    /// `None`: every chunk after every page.
    chunk_after: Option<Vec<u64>>,
    /// The plan's freeze policy (`None`: by the plan's shape).
    freeze: Option<FreezePolicy>,
    /// The plan's round limit, round 0 included (`None`: the engine's).
    max_rounds: Option<u32>,
}

/// The post-copy push of a [`PageOrder`], unit by unit.
#[derive(Debug, Clone)]
pub struct PushSequence<'a> {
    pages: &'a [u64],
    /// The position of `pages[0]` in the whole order.
    first: u64,
    chunks: &'a [u64],
    /// `chunks[j]` goes before the page at whole-order position `ahead[j]`.
    ahead: Vec<u64>,
    i: usize,
    j: usize,
}

impl Iterator for PushSequence<'_> {
    type Item = PushUnit;

    fn next(&mut self) -> Option<PushUnit> {
        let chunk_next = self.j < self.chunks.len()
            && (self.i == self.pages.len() || self.ahead[self.j] <= self.first + self.i as u64);
        if chunk_next {
            self.j += 1;
            Some(PushUnit::Chunk(self.chunks[self.j - 1]))
        } else if self.i < self.pages.len() {
            self.i += 1;
            Some(PushUnit::Page(self.pages[self.i - 1]))
        } else {
            None
        }
    }
}

/// In [`PageOrder::with_ranked_chunks`]: a chunk that ranks ahead of every
/// page.
pub const NO_PAGE: u64 = u64::MAX;

/// One unit of the post-copy push ([`PageOrder::push_sequence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushUnit {
    /// A page.
    Page(u64),
    /// A chunk of the disks.
    Chunk(u64),
}

/// A plan that cannot be applied to this guest.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PageOrderError {
    /// `M` outside [0, 1].
    #[error("memory fraction M = {0} is outside [0, 1]")]
    Fraction(f64),
    /// The order is not a permutation of the guest's pages.
    #[error("the page order is not a permutation of the guest's {pages} pages: {why}")]
    NotAPermutation {
        /// Pages of the guest.
        pages: u64,
        /// What is wrong.
        why: String,
    },
}

impl PageOrder {
    /// Address order with the first `round(m × pages)` pages pre-copied.
    pub fn by_address(pages: u64, m: f64) -> Result<Self, PageOrderError> {
        Self::new((0..pages).collect(), m)
    }

    /// `order` (hottest first; a permutation of `0..pages`) with the first
    /// `round(m × pages)` pages pre-copied.
    pub fn new(order: Vec<u64>, m: f64) -> Result<Self, PageOrderError> {
        if !(0.0..=1.0).contains(&m) {
            return Err(PageOrderError::Fraction(m));
        }
        let pages = order.len() as u64;
        let mut seen = vec![0u64; order.len().div_ceil(64)];
        for &p in &order {
            let bad = |why: String| PageOrderError::NotAPermutation { pages, why };
            if p >= pages {
                return Err(bad(format!("page {p} out of range")));
            }
            let (w, b) = ((p / 64) as usize, p % 64);
            if seen[w] & (1 << b) != 0 {
                return Err(bad(format!("page {p} appears twice")));
            }
            seen[w] |= 1 << b;
        }
        let precopy = ((m * pages as f64).round() as usize).min(order.len());
        Ok(Self::with_prefix(order, precopy))
    }

    /// `order` (already checked) with its first `precopy` units pre-copied.
    fn with_prefix(order: Vec<u64>, precopy: usize) -> Self {
        let mut in_precopy = vec![0u64; order.len().div_ceil(64)];
        for &p in &order[..precopy] {
            in_precopy[(p / 64) as usize] |= 1 << (p % 64);
        }
        PageOrder {
            order,
            precopy,
            in_precopy,
            chunks: None,
            chunk_after: None,
            freeze: None,
            max_rounds: None,
        }
    }

    /// This order with the plan's pre-copy strategy: its freeze policy
    /// (`None`: by the plan's shape, see [`freeze_policy`](Self::freeze_policy))
    /// and round limit, round 0 included (`None`: the engine's; `Some(1)`:
    /// one pass over the pre-copy set, then the freeze).
    pub fn with_strategy(mut self, freeze: Option<FreezePolicy>, max_rounds: Option<u32>) -> Self {
        self.freeze = freeze;
        self.max_rounds = max_rounds;
        self
    }

    /// What the freeze does with a dirty set that does not fit the downtime
    /// target: the plan's policy, else [`FreezePolicy::Overflow`] when the
    /// plan leaves pages or chunks to post-copy (its freeze keeps the
    /// target, the post-copy phase takes the rest) and
    /// [`FreezePolicy::Classic`] when it pre-copies everything (classic
    /// pre-copy, `M = S = 1`).
    pub fn freeze_policy(&self) -> FreezePolicy {
        self.freeze.unwrap_or_else(|| {
            let post = !self.postcopy().is_empty()
                || self.chunks().is_some_and(|c| !c.postcopy().is_empty());
            if post {
                FreezePolicy::Overflow
            } else {
                FreezePolicy::Classic
            }
        })
    }

    /// Each chunk's place in the merged ranking of pages and chunks (the
    /// post-copy push's), indexed by chunk: `(2 r + 2, j)` for a chunk that
    /// follows the page of rank `r` (`(0, j)` ahead of every page;
    /// `(u64::MAX, j)` without a joint ranking: after every page), `j` its
    /// position in the chunk order. A page of rank `r` sits at `(2 r + 1,
    /// 0)`. `page_ranks` gives each page's rank (its position in
    /// [`units`](Self::units)). `None` without chunks.
    pub fn merged_chunk_keys(&self, page_ranks: &[u32]) -> Option<Vec<(u64, u64)>> {
        let chunks = self.chunks()?;
        let mut keys = vec![(u64::MAX, 0); chunks.pages() as usize];
        for (j, &c) in chunks.units().iter().enumerate() {
            let after = self.chunk_after.as_ref().map(|a| a[j]);
            let k = match after {
                None => u64::MAX,
                Some(NO_PAGE) => 0,
                Some(p) => {
                    2 * u64::from(page_ranks.get(p as usize).copied().unwrap_or(u32::MAX)) + 2
                }
            };
            keys[c as usize] = (k, j as u64);
        }
        Some(keys)
    }

    /// The plan's own freeze policy, if it gave one.
    pub fn planned_freeze(&self) -> Option<FreezePolicy> {
        self.freeze
    }

    /// The plan's round limit, round 0 included, if it gave one.
    pub fn max_rounds(&self) -> Option<u32> {
        self.max_rounds
    }

    /// The order to go on with when a newer plan arrives between pre-copy
    /// rounds: the newer plan's ranking, with a pre-copy set that keeps
    /// every unit of this one (they may have been sent: the dirty log must
    /// go on covering them, or the destination would keep a stale copy) and
    /// adds the newer plan's. Chunks alike. Returns the order and the units
    /// it adds, hottest first.
    pub fn adopt(&self, newer: &PageOrder) -> Result<Adopted, PageOrderError> {
        let (order, pages) = self.adopt_one(newer)?;
        let order = order.with_strategy(newer.freeze, newer.max_rounds);
        let (order, chunks) = match (self.chunks(), newer.chunks()) {
            (Some(a), Some(b)) => {
                let (c, added) = a.adopt_one(b)?;
                let mut order = order.with_chunks(c);
                // By page: still right where the newer plan moved units.
                order.chunk_after = newer.chunk_after.clone();
                (order, added)
            }
            (Some(a), None) => (order.with_chunks(a.clone()), Vec::new()),
            (None, Some(_)) => {
                return Err(PageOrderError::NotAPermutation {
                    pages: 0,
                    why: "the newer plan has chunks, the guest none".into(),
                });
            }
            (None, None) => (order, Vec::new()),
        };
        Ok(Adopted {
            order,
            pages,
            chunks,
        })
    }

    fn adopt_one(&self, newer: &PageOrder) -> Result<(PageOrder, Vec<u64>), PageOrderError> {
        if newer.pages() != self.pages() {
            return Err(PageOrderError::NotAPermutation {
                pages: self.pages(),
                why: format!("the newer plan has {} units", newer.pages()),
            });
        }
        let added: Vec<u64> = newer
            .precopy()
            .iter()
            .copied()
            .filter(|&p| !self.is_precopy(p))
            .collect();
        let kept = newer
            .postcopy()
            .iter()
            .copied()
            .filter(|&p| self.is_precopy(p));
        let rest = newer
            .postcopy()
            .iter()
            .copied()
            .filter(|&p| !self.is_precopy(p));
        let order: Vec<u64> = newer
            .precopy()
            .iter()
            .copied()
            .chain(kept)
            .chain(rest)
            .collect();
        let precopy =
            newer.precopy().len() + (self.precopy - (newer.precopy().len() - added.len()));
        Ok((Self::with_prefix(order, precopy), added))
    }

    /// This order for the memory, with `chunks` the order of the disks'
    /// chunks (its fraction is the plan's `S`); the push sends every page
    /// before any chunk.
    pub fn with_chunks(mut self, chunks: PageOrder) -> Self {
        self.chunks = Some(Box::new(chunks));
        self.chunk_after = None;
        self
    }

    /// [`with_chunks`](Self::with_chunks), with both kinds ranked together
    /// as the planner's model merges them: `after[j]` is the page that the
    /// chunk at position `j` of the chunk order follows in the push (the
    /// last page ranking ahead of it, [`NO_PAGE`] if none).
    pub fn with_ranked_chunks(
        self,
        chunks: PageOrder,
        after: Vec<u64>,
    ) -> Result<Self, PageOrderError> {
        let bad = |why: String| PageOrderError::NotAPermutation {
            pages: self.pages(),
            why,
        };
        if after.len() as u64 != chunks.pages() {
            return Err(bad(format!(
                "{} chunk positions for {} chunks",
                after.len(),
                chunks.pages()
            )));
        }
        if let Some(&p) = after.iter().find(|&&p| p != NO_PAGE && p >= self.pages()) {
            return Err(bad(format!("a chunk follows page {p}, out of range")));
        }
        let mut order = self.with_chunks(chunks);
        order.chunk_after = Some(after);
        Ok(order)
    }

    /// The post-copy push: the post-copy pages in order, with the
    /// post-copy chunks merged in where the ranking puts them (or after
    /// every page, without a joint ranking). Holds a position per
    /// post-copy chunk, nothing per page.
    pub fn push_sequence(&self) -> PushSequence<'_> {
        let chunks = self.chunks();
        let post_chunks = chunks.map_or(&[][..], PageOrder::postcopy);
        let ahead: Vec<u64> = match (&self.chunk_after, chunks) {
            (Some(after), Some(c)) => {
                let after = &after[c.precopy..];
                // Where each page a chunk follows stands in this order.
                let mut pos: std::collections::HashMap<u64, u64> = after
                    .iter()
                    .filter(|&&p| p != NO_PAGE)
                    .map(|&p| (p, 0))
                    .collect();
                for (i, p) in self.order.iter().enumerate() {
                    if let Some(x) = pos.get_mut(p) {
                        *x = i as u64;
                    }
                }
                after
                    .iter()
                    .map(|p| pos.get(p).map_or(0, |&i| i + 1))
                    .collect()
            }
            _ => vec![u64::MAX; post_chunks.len()],
        };
        PushSequence {
            pages: self.postcopy(),
            first: self.precopy as u64,
            chunks: post_chunks,
            ahead,
            i: 0,
            j: 0,
        }
    }

    /// Every unit, hottest first (the pre-copy set, then the post-copy set).
    pub fn units(&self) -> &[u64] {
        &self.order
    }

    /// The order of the disks' chunks, if the plan has one.
    pub fn chunks(&self) -> Option<&PageOrder> {
        self.chunks.as_deref()
    }

    /// Pages of the guest.
    pub fn pages(&self) -> u64 {
        self.order.len() as u64
    }

    /// The pre-copy set, hottest first.
    pub fn precopy(&self) -> &[u64] {
        &self.order[..self.precopy]
    }

    /// The post-copy set, hottest first (the background push order).
    pub fn postcopy(&self) -> &[u64] {
        &self.order[self.precopy..]
    }

    /// The pre-copy set as words: page `p` is bit `p % 64` of word `p / 64`.
    pub fn precopy_words(&self) -> &[u64] {
        &self.in_precopy
    }

    /// Whether page `p` is in the pre-copy set.
    pub fn is_precopy(&self, p: u64) -> bool {
        self.in_precopy
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    /// The fraction actually pre-copied (`M` rounded to whole pages).
    pub fn m(&self) -> f64 {
        if self.order.is_empty() {
            0.0
        } else {
            self.precopy as f64 / self.order.len() as f64
        }
    }
}

/// What [`PageOrder::adopt`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The order to go on with.
    pub order: PageOrder,
    /// Pages added to the pre-copy set, hottest first.
    pub pages: Vec<u64>,
    /// Chunks added to the pre-copy set, hottest first.
    pub chunks: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopting_a_newer_plan_keeps_every_unit_already_in_the_set() {
        // Old: pages 0 1 2 3 pre-copied of 8.
        let old = PageOrder::by_address(8, 0.5)
            .unwrap()
            .with_chunks(PageOrder::by_address(4, 0.25).unwrap());
        // Newer: ranked 7 6 5 4 3 2 1 0, M = 0.25 (7, 6); chunks 3 2 1 0, S = 0.5.
        let newer = PageOrder::new((0..8).rev().collect(), 0.25)
            .unwrap()
            .with_chunks(PageOrder::new(vec![3, 2, 1, 0], 0.5).unwrap());
        let a = old.adopt(&newer).unwrap();
        assert_eq!(a.pages, vec![7, 6]);
        assert_eq!(a.order.precopy(), &[7, 6, 3, 2, 1, 0]);
        assert_eq!(
            a.order.postcopy(),
            &[5, 4],
            "the push follows the newer ranking"
        );
        let c = a.order.chunks().unwrap();
        assert_eq!(a.chunks, vec![3, 2]);
        assert_eq!(c.precopy(), &[3, 2, 0]);
        assert_eq!(c.postcopy(), &[1]);
        // Nothing new: the same set.
        let same = a.order.adopt(&a.order).unwrap();
        assert!(same.pages.is_empty() && same.chunks.is_empty());
        assert_eq!(same.order, a.order);
        // Another guest is refused.
        assert!(old.adopt(&PageOrder::by_address(9, 0.5).unwrap()).is_err());
    }

    #[test]
    fn chunks_take_their_place_among_the_pages() {
        // Pages ranked 5 4 3 2 1 0; chunks ranked 1 0 2: chunk 1 ahead of
        // every page, chunk 0 after page 4, chunk 2 after page 0 (last).
        let pages = PageOrder::new((0..6).rev().collect(), 0.5).unwrap();
        let order = pages
            .with_ranked_chunks(
                PageOrder::new(vec![1, 0, 2], 1.0).unwrap(),
                vec![NO_PAGE, 4, 0],
            )
            .unwrap();
        let ranks: Vec<u32> = vec![5, 4, 3, 2, 1, 0];
        let keys = order.merged_chunk_keys(&ranks).unwrap();
        // Chunk 0 follows page 4 (rank 1): 2 x 1 + 2; chunk 2 page 0 (rank 5).
        assert_eq!(keys, vec![(4, 1), (0, 0), (12, 2)]);
        // Merged with the pages' keys (2 r + 1, 0): the push's order.
        let mut units: Vec<((u64, u64), PushUnit)> = (0..6)
            .map(|p| ((2 * u64::from(ranks[p]) + 1, 0), PushUnit::Page(p as u64)))
            .chain(
                keys.iter()
                    .enumerate()
                    .map(|(c, &k)| (k, PushUnit::Chunk(c as u64))),
            )
            .collect();
        units.sort_by_key(|u| u.0);
        let merged: Vec<PushUnit> = units.into_iter().map(|u| u.1).collect();
        use PushUnit::{Chunk, Page};
        assert_eq!(
            merged,
            [
                Chunk(1),
                Page(5),
                Page(4),
                Chunk(0),
                Page(3),
                Page(2),
                Page(1),
                Page(0),
                Chunk(2)
            ]
        );
        // Without a joint ranking every chunk comes after every page.
        let plain = PageOrder::by_address(4, 1.0)
            .unwrap()
            .with_chunks(PageOrder::by_address(2, 1.0).unwrap());
        assert_eq!(
            plain.merged_chunk_keys(&[0, 1, 2, 3]).unwrap(),
            vec![(u64::MAX, 0), (u64::MAX, 1)]
        );
        assert_eq!(
            PageOrder::by_address(4, 1.0)
                .unwrap()
                .merged_chunk_keys(&[]),
            None
        );
    }

    #[test]
    fn the_freeze_follows_the_plan_or_its_shape() {
        // Without a policy of its own: classic when everything is
        // pre-copied (chunks too), overflow when anything is post-copied.
        let all = PageOrder::by_address(8, 1.0).unwrap();
        assert_eq!(all.freeze_policy(), FreezePolicy::Classic);
        let disks = |s| {
            all.clone()
                .with_chunks(PageOrder::by_address(4, s).unwrap())
        };
        assert_eq!(disks(1.0).freeze_policy(), FreezePolicy::Classic);
        assert_eq!(disks(0.5).freeze_policy(), FreezePolicy::Overflow);
        let half = PageOrder::by_address(8, 0.5).unwrap();
        assert_eq!(half.freeze_policy(), FreezePolicy::Overflow);
        assert_eq!((half.planned_freeze(), half.max_rounds()), (None, None));
        // The plan's own policy and round limit win, and survive chunks.
        let hybrid = all
            .with_strategy(Some(FreezePolicy::Overflow), Some(1))
            .with_chunks(PageOrder::by_address(4, 1.0).unwrap());
        assert_eq!(hybrid.freeze_policy(), FreezePolicy::Overflow);
        assert_eq!(hybrid.max_rounds(), Some(1));
        let classic = half
            .clone()
            .with_strategy(Some(FreezePolicy::Classic), None);
        assert_eq!(classic.freeze_policy(), FreezePolicy::Classic);
        // A newer plan brings its own.
        let adopted = classic.adopt(&hybrid_pages()).unwrap().order;
        assert_eq!(adopted.planned_freeze(), Some(FreezePolicy::Overflow));
        assert_eq!(adopted.max_rounds(), Some(1));
    }

    fn hybrid_pages() -> PageOrder {
        PageOrder::by_address(8, 1.0)
            .unwrap()
            .with_strategy(Some(FreezePolicy::Overflow), Some(1))
    }

    #[test]
    fn the_prefix_is_the_precopy_set() {
        let o = PageOrder::new(vec![3, 1, 0, 2], 0.5).unwrap();
        assert_eq!(o.precopy(), &[3, 1]);
        assert_eq!(o.postcopy(), &[0, 2]);
        assert!(o.is_precopy(3) && o.is_precopy(1));
        assert!(!o.is_precopy(0) && !o.is_precopy(2) && !o.is_precopy(99));
        assert_eq!(
            PageOrder::by_address(10, 1.0).unwrap().postcopy(),
            &[] as &[u64]
        );
        assert_eq!(
            PageOrder::by_address(10, 0.0).unwrap().precopy(),
            &[] as &[u64]
        );
        assert_eq!(PageOrder::by_address(3, 0.5).unwrap().precopy().len(), 2);
    }

    #[test]
    fn bad_orders_and_fractions_are_refused() {
        assert!(matches!(
            PageOrder::new(vec![0, 0], 0.5),
            Err(PageOrderError::NotAPermutation { .. })
        ));
        assert!(matches!(
            PageOrder::new(vec![0, 2], 0.5),
            Err(PageOrderError::NotAPermutation { .. })
        ));
        assert!(matches!(
            PageOrder::by_address(4, 1.5),
            Err(PageOrderError::Fraction(_))
        ));
        assert!(matches!(
            PageOrder::by_address(4, f64::NAN),
            Err(PageOrderError::Fraction(_))
        ));
    }

    #[test]
    fn the_push_merges_chunks_where_they_rank() {
        use PushUnit::{Chunk, Page};
        // Pages ranked 0..6, the first two pre-copied; chunks ranked 0..4,
        // chunk 0 pre-copied. Chunk 1 ranks ahead of every page, chunk 2
        // right after page 3, chunk 3 after the last page.
        let pages = PageOrder::by_address(6, 2.0 / 6.0).unwrap();
        let chunks = PageOrder::by_address(4, 0.25).unwrap();
        let order = pages
            .clone()
            .with_ranked_chunks(chunks.clone(), vec![NO_PAGE, NO_PAGE, 3, 5])
            .unwrap();
        assert_eq!(
            order.push_sequence().collect::<Vec<_>>(),
            vec![
                Chunk(1),
                Page(2),
                Page(3),
                Chunk(2),
                Page(4),
                Page(5),
                Chunk(3)
            ]
        );
        // A chunk following a pre-copied page goes first.
        let early = pages
            .clone()
            .with_ranked_chunks(chunks.clone(), vec![NO_PAGE, 1, 1, 2])
            .unwrap();
        assert_eq!(
            early.push_sequence().take(3).collect::<Vec<_>>(),
            [Chunk(1), Chunk(2), Page(2)]
        );
        // Without a joint ranking: every page, then every chunk.
        let plain = pages.clone().with_chunks(chunks.clone());
        assert_eq!(
            plain.push_sequence().collect::<Vec<_>>(),
            vec![
                Page(2),
                Page(3),
                Page(4),
                Page(5),
                Chunk(1),
                Chunk(2),
                Chunk(3)
            ]
        );
        // The merge survives a re-plan: by page, in the adopted order.
        let adopted = plain.adopt(&order).unwrap().order;
        assert!(adopted.push_sequence().eq(order.push_sequence()));
        // Wrong lengths and pages out of range are refused.
        assert!(
            pages
                .clone()
                .with_ranked_chunks(chunks.clone(), vec![NO_PAGE])
                .is_err()
        );
        assert!(pages.with_ranked_chunks(chunks, vec![0, 0, 0, 6]).is_err());
    }
}
