//! [`DirtyBitmap`]: one bit per page of a [`RemoteRange`].

use std::fmt;

use super::{RemoteAddr, RemoteRange, page_size};

/// Errors of [`DirtyBitmap`] construction and combination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The range is not a whole number of pages, or the page size is not a
    /// power of two.
    #[error("bitmap range {range} is not aligned to {page_size}-byte pages")]
    Misaligned {
        /// The range.
        range: RemoteRange,
        /// The page size.
        page_size: u64,
    },
    /// Too many pages to index in memory.
    #[error("bitmap range {range} has too many pages")]
    TooLarge {
        /// The range.
        range: RemoteRange,
    },
    /// Two bitmaps of different ranges or page sizes.
    #[error("bitmaps cover different ranges: {ours} and {theirs}")]
    GeometryMismatch {
        /// This bitmap's range.
        ours: RemoteRange,
        /// The other's.
        theirs: RemoteRange,
    },
    /// An address range outside the bitmap, or not page-aligned.
    #[error("[{start}, {end}) is not a page-aligned part of {range}")]
    OutOfRange {
        /// The bitmap's range.
        range: RemoteRange,
        /// Start asked for.
        start: RemoteAddr,
        /// End asked for.
        end: RemoteAddr,
    },
}

/// A set of pages of a range: bit `i` stands for the page at
/// `range.start + i * page_size`.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    range: RemoteRange,
    page_shift: u32,
    pages: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty set over `range` with the machine's [`page_size`].
    pub fn new(range: RemoteRange) -> Result<Self, BitmapError> {
        Self::with_page_size(range, page_size())
    }

    /// An empty set over `range` in pages of `page_size` bytes.
    pub fn with_page_size(range: RemoteRange, page_size: u64) -> Result<Self, BitmapError> {
        if !page_size.is_power_of_two() || !range.is_aligned_to(page_size) {
            return Err(BitmapError::Misaligned { range, page_size });
        }
        let pages = range.len / page_size;
        let words =
            usize::try_from(pages.div_ceil(64)).map_err(|_| BitmapError::TooLarge { range })?;
        Ok(DirtyBitmap {
            range,
            page_shift: page_size.trailing_zeros(),
            pages,
            words: vec![0; words],
        })
    }

    /// The range covered.
    pub fn range(&self) -> RemoteRange {
        self.range
    }

    /// Bytes per page (per bit).
    pub fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// Pages in the range (bits in the map).
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// The address of page `page` (`page < page_count()`; larger values wrap).
    pub fn page_addr(&self, page: u64) -> RemoteAddr {
        RemoteAddr(
            self.range
                .start
                .get()
                .wrapping_add(page.wrapping_shl(self.page_shift)),
        )
    }

    /// Adds page `page`.
    ///
    /// # Panics
    /// If `page >= page_count()` (like slice indexing).
    pub fn set(&mut self, page: u64) {
        assert!(page < self.pages, "page {page} out of {}", self.pages);
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    /// Removes `page`.
    ///
    /// # Panics
    /// If `page >= page_count()` (like slice indexing).
    pub fn unset(&mut self, page: u64) {
        assert!(page < self.pages, "page {page} out of {}", self.pages);
        self.words[(page / 64) as usize] &= !(1 << (page % 64));
    }

    /// Adds pages `first .. first + count`.
    ///
    /// # Panics
    /// If the run does not lie in the map.
    pub fn set_range(&mut self, first: u64, count: u64) {
        let end = first.checked_add(count);
        assert!(
            end.is_some_and(|e| e <= self.pages),
            "pages {first}+{count} out of {}",
            self.pages
        );
        self.fill(first, first + count);
    }

    /// Adds the pages of `[start, end)` (page-aligned, inside the range);
    /// checked, for addresses that come from the kernel.
    pub fn set_addr_range(
        &mut self,
        start: RemoteAddr,
        end: RemoteAddr,
    ) -> Result<(), BitmapError> {
        let bad = || BitmapError::OutOfRange {
            range: self.range,
            start,
            end,
        };
        let ps = self.page_size();
        let (Some(a), Some(b)) = (
            start.offset_from(self.range.start),
            end.offset_from(self.range.start),
        ) else {
            return Err(bad());
        };
        if a > b || b > self.range.len || a % ps != 0 || b % ps != 0 {
            return Err(bad());
        }
        self.fill(a >> self.page_shift, b >> self.page_shift);
        Ok(())
    }

    /// Sets bits `[a, b)`, both within the map.
    fn fill(&mut self, a: u64, b: u64) {
        let mut i = a;
        while i < b {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (b - (i - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            self.words[w] |= mask;
            i = i - lo + hi;
        }
    }

    /// Whether page `page` is in the set (`false` outside the map).
    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether any page is in the set.
    pub fn any(&self) -> bool {
        self.words.iter().any(|&w| w != 0)
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Adds every page of `other` (same range and page size).
    pub fn union(&mut self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        if self.range != other.range || self.page_shift != other.page_shift {
            return Err(BitmapError::GeometryMismatch {
                ours: self.range,
                theirs: other.range,
            });
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        Ok(())
    }

    /// The set as words: page `p` is bit `p % 64` of word `p / 64`; bits
    /// past the last page are clear.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Adds the pages of a bitmap in the layout of [`words`](Self::words)
    /// (e.g. one a hypervisor filled); bits past the last page, and words
    /// past the map, are ignored.
    pub fn or_words(&mut self, words: &[u64]) {
        for (a, b) in self.words.iter_mut().zip(words) {
            *a |= b;
        }
        let tail = self.pages % 64;
        if tail != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << tail) - 1;
        }
    }

    /// The pages in the set, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let base = i as u64 * 64;
            BitsOf(w).map(move |b| base + u64::from(b))
        })
    }

    /// The set as maximal runs `(first page, count)`, ascending.
    pub fn iter_runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut it = self.iter_set().peekable();
        std::iter::from_fn(move || {
            let first = it.next()?;
            let mut count = 1;
            while it.next_if(|&p| p == first + count).is_some() {
                count += 1;
            }
            Some((first, count))
        })
    }
}

/// Positions of the set bits of a word, ascending.
struct BitsOf(u64);

impl Iterator for BitsOf {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("range", &self.range)
            .field("page_size", &self.page_size())
            .field("set", &self.count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const PS: u64 = 4096;

    fn map(pages: u64) -> DirtyBitmap {
        DirtyBitmap::with_page_size(RemoteRange::new(RemoteAddr(0x40_0000), pages * PS), PS)
            .unwrap()
    }

    #[test]
    fn construction_checks_alignment() {
        assert!(DirtyBitmap::with_page_size(RemoteRange::new(RemoteAddr(1), PS), PS).is_err());
        assert!(DirtyBitmap::with_page_size(RemoteRange::new(RemoteAddr(0), 3), PS).is_err());
        assert!(DirtyBitmap::with_page_size(RemoteRange::new(RemoteAddr(0), PS), 3000).is_err());
        let m = map(0);
        assert_eq!(m.count(), 0);
        assert_eq!(m.iter_set().count(), 0);
    }

    #[test]
    fn addr_ranges_are_checked() {
        let mut m = map(100);
        let base = m.range().start.get();
        assert!(
            m.set_addr_range(RemoteAddr(base + PS), RemoteAddr(base + 3 * PS))
                .is_ok()
        );
        assert_eq!(m.iter_set().collect::<Vec<_>>(), vec![1, 2]);
        for (a, b) in [
            (base - PS, base + PS),
            (base, base + 101 * PS),
            (base + 1, base + PS),
            (base + 2 * PS, base + PS),
        ] {
            assert!(
                m.set_addr_range(RemoteAddr(a), RemoteAddr(b)).is_err(),
                "{a:#x}..{b:#x}"
            );
        }
        assert_eq!(m.count(), 2);
        assert_eq!(m.page_addr(2), RemoteAddr(base + 2 * PS));
    }

    #[test]
    fn union_needs_same_geometry() {
        let mut a = map(10);
        let b = map(11);
        assert!(matches!(
            a.union(&b),
            Err(BitmapError::GeometryMismatch { .. })
        ));
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(
            pages in 1u64..700,
            ops in proptest::collection::vec((0u64..700, 0u64..200), 0..40),
            other in proptest::collection::vec(0u64..700, 0..40),
        ) {
            let mut m = map(pages);
            let mut model = BTreeSet::new();
            for (first, count) in ops {
                let first = first % pages;
                let count = count.min(pages - first);
                if count == 1 { m.set(first) } else { m.set_range(first, count) }
                model.extend(first..first + count);
            }
            let mut o = map(pages);
            for p in other {
                let p = p % pages;
                o.set(p);
                model.insert(p);
            }
            m.union(&o).unwrap();
            prop_assert_eq!(m.iter_set().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(m.count(), model.len() as u64);
            prop_assert_eq!(m.any(), !model.is_empty());
            for p in 0..pages + 2 {
                prop_assert_eq!(m.get(p), model.contains(&p));
            }
            let runs: Vec<_> = m.iter_runs().collect();
            let expanded: Vec<u64> = runs.iter().flat_map(|&(f, c)| f..f + c).collect();
            prop_assert_eq!(expanded, model.iter().copied().collect::<Vec<_>>());
            for w in runs.windows(2) {
                prop_assert!(w[0].0 + w[0].1 < w[1].0, "runs not maximal: {:?}", w);
            }
            m.clear();
            prop_assert_eq!(m.count(), 0);
        }
    }
}
