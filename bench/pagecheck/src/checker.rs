//! The checker's state: the region of pages, the generation each page was
//! last written with, and the write and verification cursors.

use std::hint::black_box;

use crate::page::{Page, Verdict, splitmix64, verify};

/// Which pages the writer rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Sequentially through the write working set, wrapping around.
    Seq,
    /// Uniformly at random within the write working set.
    Rand,
}

impl Pattern {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Rand => "rand",
        }
    }
}

/// A page that failed verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageError {
    /// Index of the page in the region.
    pub page: usize,
    /// The generation the checker last wrote there.
    pub expected_gen: u64,
    /// What it found instead.
    pub found: Verdict,
}

/// Counters reported in the heartbeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pages rewritten since the initial fill (repairs included).
    pub written: u64,
    /// Pages verified by the read sweep.
    pub verified: u64,
    /// Pages found wrong, by the sweep or before a rewrite.
    pub errors: u64,
    /// Highest generation written so far.
    pub max_gen: u64,
}

/// The checker's region and bookkeeping.
#[derive(Debug)]
pub struct Checker {
    run: u64,
    pages: Vec<Page>,
    gens: Vec<u64>,
    wss: usize,
    pattern: Pattern,
    wcur: usize,
    rcur: usize,
    rng: u64,
    stats: Stats,
}

impl Checker {
    /// Allocates `npages` pages and writes every one of them (generation 1),
    /// so the whole region is resident and tagged before the loop starts.
    /// Writes go to the first `wss` pages (clamped to `1..=npages`).
    pub fn new(run: u64, npages: usize, wss: usize, pattern: Pattern) -> Result<Checker, String> {
        if npages == 0 {
            return Err("the region must hold at least one page".into());
        }
        let mut pages: Vec<Page> = Vec::new();
        pages
            .try_reserve_exact(npages)
            .map_err(|e| format!("cannot allocate {npages} pages: {e}"))?;
        let mut gens: Vec<u64> = Vec::new();
        gens.try_reserve_exact(npages)
            .map_err(|e| format!("cannot allocate the generation table: {e}"))?;
        // Filled in place: building a page on the stack and moving it in
        // would leave a stray tagged copy (pages are page-aligned, so one
        // that a host searching guest RAM for this run's pages would find).
        pages.resize(npages, Page::ZERO);
        for (i, p) in pages.iter_mut().enumerate() {
            p.fill(run, i as u64, 1);
        }
        gens.resize(npages, 1);
        Ok(Checker {
            run,
            pages,
            gens,
            wss: wss.clamp(1, npages),
            pattern,
            wcur: 0,
            rcur: 0,
            rng: splitmix64(run ^ 0x5eed) | 1,
            stats: Stats {
                max_gen: 1,
                ..Stats::default()
            },
        })
    }

    /// The run id every page carries.
    pub fn run(&self) -> u64 {
        self.run
    }

    /// Pages in the region.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Always false: a checker holds at least one page.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Pages the writer cycles through.
    pub fn wss(&self) -> usize {
        self.wss
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The generation page `i` was last written with.
    pub fn expected_gen(&self, i: usize) -> u64 {
        self.gens[i]
    }

    /// Direct access to a page, for tests that corrupt one.
    pub fn page_mut(&mut self, i: usize) -> &mut Page {
        &mut self.pages[i]
    }

    fn check(&mut self, i: usize) -> Option<PageError> {
        // black_box: the page must really be read from memory each time, as
        // someone else (a migration) may have replaced it behind our back.
        let page = black_box(&self.pages[i]);
        let expected_gen = self.gens[i];
        match verify(page, self.run, i as u64, expected_gen) {
            Verdict::Ok => None,
            found => {
                self.stats.errors += 1;
                Some(PageError {
                    page: i,
                    expected_gen,
                    found,
                })
            }
        }
    }

    fn rewrite(&mut self, i: usize) {
        let g = self.gens[i] + 1;
        self.pages[i].fill(self.run, i as u64, g);
        self.gens[i] = g;
        self.stats.written += 1;
        self.stats.max_gen = self.stats.max_gen.max(g);
    }

    /// Rewrites the next page of the write pattern with the next generation,
    /// verifying it first (a corrupted page in the write set is reported,
    /// not silently overwritten).
    pub fn write_one(&mut self) -> Option<PageError> {
        let i = next_write(self.pattern, &mut self.wcur, &mut self.rng, self.wss);
        let err = self.check(i);
        self.rewrite(i);
        err
    }

    /// Verifies the next page of the sweep over the whole region. A bad
    /// page is reported once and repaired (rewritten with a new generation),
    /// so one corruption counts as one error.
    pub fn verify_one(&mut self) -> Option<PageError> {
        let i = self.rcur;
        self.rcur = if i + 1 >= self.pages.len() { 0 } else { i + 1 };
        self.stats.verified += 1;
        let err = self.check(i);
        if err.is_some() {
            self.rewrite(i);
        }
        err
    }
}

/// The next unit to rewrite within the first `wss`: in order from `cur`, or
/// from the xorshift state `rng`.
pub(crate) fn next_write(pattern: Pattern, cur: &mut usize, rng: &mut u64, wss: usize) -> usize {
    match pattern {
        Pattern::Seq => {
            let i = *cur;
            *cur = if i + 1 >= wss { 0 } else { i + 1 };
            i
        }
        Pattern::Rand => {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % wss as u64) as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{Page, W_GEN};

    const RUN: u64 = 0xfeed_f00d_1234_5678;

    #[test]
    fn fresh_region_verifies_clean() {
        let mut c = Checker::new(RUN, 64, 64, Pattern::Seq).unwrap();
        for _ in 0..128 {
            assert_eq!(c.verify_one(), None);
        }
        let s = c.stats();
        assert_eq!((s.written, s.verified, s.errors, s.max_gen), (0, 128, 0, 1));
    }

    #[test]
    fn sequential_writes_bump_generations_within_the_wss() {
        let mut c = Checker::new(RUN, 16, 4, Pattern::Seq).unwrap();
        for _ in 0..10 {
            assert_eq!(c.write_one(), None);
        }
        // pages 0,1 written three times, 2,3 twice, the rest never.
        assert_eq!(
            (0..16).map(|i| c.expected_gen(i)).collect::<Vec<_>>(),
            [4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        );
        assert_eq!(c.stats().max_gen, 4);
        assert_eq!(c.stats().written, 10);
        for _ in 0..16 {
            assert_eq!(c.verify_one(), None);
        }
    }

    #[test]
    fn random_writes_stay_in_the_wss_and_verify() {
        let mut c = Checker::new(RUN, 32, 8, Pattern::Rand).unwrap();
        for _ in 0..500 {
            assert_eq!(c.write_one(), None);
        }
        assert!((8..32).all(|i| c.expected_gen(i) == 1));
        assert_eq!((0..8).map(|i| c.expected_gen(i) - 1).sum::<u64>(), 500);
        for _ in 0..32 {
            assert_eq!(c.verify_one(), None);
        }
    }

    #[test]
    fn sweep_finds_a_corrupt_page_once_and_repairs_it() {
        let mut c = Checker::new(RUN, 8, 8, Pattern::Seq).unwrap();
        c.page_mut(5).0[700 / 8] ^= 1;
        let errs: Vec<_> = (0..8).filter_map(|_| c.verify_one()).collect();
        assert_eq!(
            errs,
            [PageError {
                page: 5,
                expected_gen: 1,
                found: Verdict::Corrupt {
                    index: 5,
                    generation: 1
                }
            }]
        );
        // Repaired: the next sweep is clean, the count stays at one.
        assert!((0..8).all(|_| c.verify_one().is_none()));
        assert_eq!(c.stats().errors, 1);
        assert_eq!(c.expected_gen(5), 2);
    }

    #[test]
    fn stale_and_zero_pages_are_caught_by_the_sweep() {
        // A page that was rewritten, then "migrated" from an old copy.
        let mut c = Checker::new(RUN, 4, 4, Pattern::Seq).unwrap();
        let old = *c.page_mut(0);
        c.write_one();
        *c.page_mut(0) = old;
        *c.page_mut(2) = Page::ZERO;
        let errs: Vec<_> = (0..4).filter_map(|_| c.verify_one()).collect();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].page, 0);
        assert_eq!(errs[0].expected_gen, 2);
        assert_eq!(errs[0].found, Verdict::Stale { generation: 1 });
        assert_eq!(errs[1].page, 2);
        assert_eq!(errs[1].found, Verdict::Zero);
    }

    #[test]
    fn writes_verify_before_overwriting() {
        let mut c = Checker::new(RUN, 4, 4, Pattern::Seq).unwrap();
        c.page_mut(0).0[W_GEN] = 0;
        let e = c
            .write_one()
            .expect("corruption in the write set is reported");
        assert_eq!(e.page, 0);
        assert_eq!(e.found.kind(), "corrupt");
        assert_eq!(c.stats().errors, 1);
        assert_eq!(c.stats().verified, 0);
        assert_eq!(c.verify_one(), None);
    }

    #[test]
    fn pages_are_page_aligned_in_memory() {
        let mut c = Checker::new(RUN, 3, 3, Pattern::Seq).unwrap();
        for i in 0..3 {
            assert_eq!(c.page_mut(i) as *mut Page as usize % 4096, 0);
        }
    }

    #[test]
    fn empty_region_is_refused() {
        assert!(Checker::new(RUN, 0, 0, Pattern::Seq).is_err());
    }
}
