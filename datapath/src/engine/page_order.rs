//! Which pages (and disk chunks) are pre-copied, and in what order
//! everything is sent.
//!
//! The plan's `M` selects the pre-copy set: the first `round(M × pages)` pages
//! of a priority order (hottest first). The same order drives the post-copy
//! background push, so the pages the guest is most likely to touch after the
//! resume arrive first. Without a profile the order is address order (the
//! guest's low memory, where kernels keep their hottest data, first); with a
//! profile it is the planner's ranking.

/// A priority order of all pages and the size of its pre-copy prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageOrder {
    order: Vec<u64>,
    precopy: usize,
    in_precopy: Vec<u64>,
    /// The disks' chunks, in the same kind of order with `S` as prefix.
    chunks: Option<Box<PageOrder>>,
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
        let mut in_precopy = vec![0u64; seen.len()];
        for &p in &order[..precopy] {
            in_precopy[(p / 64) as usize] |= 1 << (p % 64);
        }
        Ok(PageOrder {
            order,
            precopy,
            in_precopy,
            chunks: None,
        })
    }

    /// This order for the memory, with `chunks` the order of the disks'
    /// chunks (its fraction is the plan's `S`).
    pub fn with_chunks(mut self, chunks: PageOrder) -> Self {
        self.chunks = Some(Box::new(chunks));
        self
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
