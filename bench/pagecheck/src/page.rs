//! The self-describing page format and its verification.
//!
//! Every 4 KiB page the checker owns holds, as native (little-endian) `u64`
//! words:
//!
//! | word | content |
//! | --- | --- |
//! | 0 | [`MAGIC`] (`"WMPGCHK1"`) |
//! | 1 | the run id (random per run, printed in `PAGECHECK-START run=`) |
//! | 2 | the page's index in the checker's region |
//! | 3 | the page's generation (1 after the initial fill, +1 per write) |
//! | 4 | [`checksum`] of every other word of the page |
//! | 5..512 | a pseudo-random body derived from (run, index, generation) |
//!
//! So a host can find the checker's pages in guest RAM by the first two words,
//! and the guest can tell a good page from a zero page, a page of some other
//! content, a corrupted page, a page that landed at the wrong place, and a
//! stale page (an older generation than the one it last wrote).

use std::fmt;

/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;
/// `u64` words per page.
pub const WORDS: usize = PAGE_SIZE / 8;
/// Word 0 of every page: `"WMPGCHK1"` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"WMPGCHK1");

/// Index of the magic word.
pub const W_MAGIC: usize = 0;
/// Index of the run-id word.
pub const W_RUN: usize = 1;
/// Index of the page-index word.
pub const W_INDEX: usize = 2;
/// Index of the generation word.
pub const W_GEN: usize = 3;
/// Index of the checksum word.
pub const W_SUM: usize = 4;
/// First word of the body.
pub const BODY_START: usize = 5;

/// One page, aligned so that it is exactly one guest page.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(4096))]
pub struct Page(pub [u64; WORDS]);

impl Page {
    /// An all-zero page.
    pub const ZERO: Page = Page([0; WORDS]);

    /// A page tagged for (`run`, `index`, `generation`).
    pub fn tagged(run: u64, index: u64, generation: u64) -> Page {
        let mut p = Page::ZERO;
        p.fill(run, index, generation);
        p
    }

    /// Rewrites the whole page for (`run`, `index`, `generation`).
    pub fn fill(&mut self, run: u64, index: u64, generation: u64) {
        let w = &mut self.0;
        let mut x = splitmix64(
            run ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ generation.wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
        ) | 1;
        for word in w[BODY_START..].iter_mut() {
            // xorshift64*: cheap enough under TCG, never all-zero.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            *word = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        }
        w[W_MAGIC] = MAGIC;
        w[W_RUN] = run;
        w[W_INDEX] = index;
        w[W_GEN] = generation;
        w[W_SUM] = 0;
        w[W_SUM] = checksum(w);
    }
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.0;
        f.debug_struct("Page")
            .field("magic", &format_args!("{:#018x}", w[W_MAGIC]))
            .field("run", &format_args!("{:#018x}", w[W_RUN]))
            .field("index", &w[W_INDEX])
            .field("generation", &w[W_GEN])
            .field("sum", &format_args!("{:#018x}", w[W_SUM]))
            .finish_non_exhaustive()
    }
}

/// SplitMix64 finaliser (a bijection of `u64`).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checksum of every word of the page except [`W_SUM`], position-sensitive.
///
/// Each step maps the running value through a bijection that depends on the
/// word, so any change confined to a single word (any number of bits in it)
/// always changes the result.
pub fn checksum(words: &[u64; WORDS]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, &w) in words.iter().enumerate() {
        let w = if i == W_SUM { 0 } else { w };
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    h ^ (h >> 32)
}

/// What verification found in a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The expected run, index and generation, checksum good.
    Ok,
    /// Every byte is zero (a page that never arrived, or was zeroed).
    Zero,
    /// Not one of this run's pages (wrong magic or run id, not all zero).
    Foreign {
        /// Word 0 as found.
        magic: u64,
        /// Word 1 as found.
        run: u64,
    },
    /// This run's header, but the checksum does not match the content.
    Corrupt {
        /// Index word as found.
        index: u64,
        /// Generation word as found.
        generation: u64,
    },
    /// A good page of this run, but for another index.
    Misplaced {
        /// Index word as found.
        index: u64,
        /// Generation word as found.
        generation: u64,
    },
    /// A good page, but an older generation than the last one written.
    Stale {
        /// Generation as found.
        generation: u64,
    },
    /// A good page with a newer generation than the last one written.
    Ahead {
        /// Generation as found.
        generation: u64,
    },
}

impl Verdict {
    /// The one-word kind printed after `found=`.
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Zero => "zero",
            Verdict::Foreign { .. } => "foreign",
            Verdict::Corrupt { .. } => "corrupt",
            Verdict::Misplaced { .. } => "misplaced",
            Verdict::Stale { .. } => "stale",
            Verdict::Ahead { .. } => "ahead",
        }
    }
}

impl fmt::Display for Verdict {
    /// `<kind>` followed by ` key=value` details, no other spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())?;
        match *self {
            Verdict::Ok | Verdict::Zero => Ok(()),
            Verdict::Foreign { magic, run } => write!(f, " magic={magic:#018x} run={run:016x}"),
            Verdict::Corrupt { index, generation } | Verdict::Misplaced { index, generation } => {
                write!(f, " gen={generation} idx={index}")
            }
            Verdict::Stale { generation } | Verdict::Ahead { generation } => {
                write!(f, " gen={generation}")
            }
        }
    }
}

/// Verifies `page` as page `index` of run `run`, last written at
/// generation `expected_gen`.
pub fn verify(page: &Page, run: u64, index: u64, expected_gen: u64) -> Verdict {
    let w = &page.0;
    if w[W_MAGIC] != MAGIC || w[W_RUN] != run {
        if w.iter().all(|&x| x == 0) {
            return Verdict::Zero;
        }
        return Verdict::Foreign {
            magic: w[W_MAGIC],
            run: w[W_RUN],
        };
    }
    if checksum(w) != w[W_SUM] {
        return Verdict::Corrupt {
            index: w[W_INDEX],
            generation: w[W_GEN],
        };
    }
    let generation = w[W_GEN];
    if w[W_INDEX] != index {
        return Verdict::Misplaced {
            index: w[W_INDEX],
            generation,
        };
    }
    match generation.cmp(&expected_gen) {
        std::cmp::Ordering::Equal => Verdict::Ok,
        std::cmp::Ordering::Less => Verdict::Stale { generation },
        std::cmp::Ordering::Greater => Verdict::Ahead { generation },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: u64 = 0x0123_4567_89ab_cdef;

    #[test]
    fn layout_is_one_aligned_page() {
        assert_eq!(std::mem::size_of::<Page>(), PAGE_SIZE);
        assert_eq!(std::mem::align_of::<Page>(), PAGE_SIZE);
        let v = [Page::ZERO, Page::ZERO];
        assert_eq!(v.as_ptr() as usize % PAGE_SIZE, 0);
        assert_eq!(&MAGIC.to_le_bytes(), b"WMPGCHK1");
    }

    #[test]
    fn tagged_page_verifies_and_is_self_describing() {
        let p = Page::tagged(RUN, 42, 7);
        assert_eq!(verify(&p, RUN, 42, 7), Verdict::Ok);
        assert_eq!(p.0[W_MAGIC], MAGIC);
        assert_eq!(p.0[W_RUN], RUN);
        assert_eq!(p.0[W_INDEX], 42);
        assert_eq!(p.0[W_GEN], 7);
        // The body depends on the generation and the index: a stale or
        // misplaced page differs in (almost) every word, not just the header.
        let q = Page::tagged(RUN, 42, 8);
        let r = Page::tagged(RUN, 43, 7);
        let diff = |a: &Page, b: &Page| {
            a.0[BODY_START..]
                .iter()
                .zip(&b.0[BODY_START..])
                .filter(|(x, y)| x != y)
                .count()
        };
        assert!(diff(&p, &q) > WORDS - 10);
        assert!(diff(&p, &r) > WORDS - 10);
        // No body word is zero (xorshift* never yields 0 from a non-zero state).
        assert!(p.0[BODY_START..].iter().all(|&w| w != 0));
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let good = Page::tagged(RUN, 5, 3);
        for word in 0..WORDS {
            for bit in 0..64 {
                let mut p = good;
                p.0[word] ^= 1 << bit;
                let v = verify(&p, RUN, 5, 3);
                assert_ne!(
                    v,
                    Verdict::Ok,
                    "flip of word {word} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn any_change_to_one_word_is_caught() {
        let good = Page::tagged(RUN, 9, 1);
        let mut x = 1u64;
        for word in 0..WORDS {
            for _ in 0..8 {
                x = splitmix64(x);
                if x == good.0[word] {
                    continue;
                }
                let mut p = good;
                p.0[word] = x;
                assert_ne!(verify(&p, RUN, 9, 1), Verdict::Ok, "word {word} = {x:#x}");
            }
        }
    }

    #[test]
    fn verdicts_classify_failures() {
        assert_eq!(verify(&Page::ZERO, RUN, 0, 1), Verdict::Zero);

        let other_run = Page::tagged(RUN ^ 1, 3, 1);
        assert_eq!(
            verify(&other_run, RUN, 3, 1),
            Verdict::Foreign {
                magic: MAGIC,
                run: RUN ^ 1
            }
        );
        let mut junk = Page::ZERO;
        junk.0[100] = 0xdead;
        assert_eq!(
            verify(&junk, RUN, 3, 1),
            Verdict::Foreign { magic: 0, run: 0 }
        );

        let mut corrupt = Page::tagged(RUN, 3, 4);
        corrupt.0[300] ^= 0xff;
        assert_eq!(
            verify(&corrupt, RUN, 3, 4),
            Verdict::Corrupt {
                index: 3,
                generation: 4
            }
        );
        // A torn page: header of one generation, body of another.
        let mut torn = Page::tagged(RUN, 3, 4);
        torn.0[BODY_START..].copy_from_slice(&Page::tagged(RUN, 3, 5).0[BODY_START..]);
        assert_eq!(verify(&torn, RUN, 3, 4).kind(), "corrupt");

        assert_eq!(
            verify(&Page::tagged(RUN, 8, 2), RUN, 3, 2),
            Verdict::Misplaced {
                index: 8,
                generation: 2
            }
        );
        assert_eq!(
            verify(&Page::tagged(RUN, 3, 2), RUN, 3, 5),
            Verdict::Stale { generation: 2 }
        );
        assert_eq!(
            verify(&Page::tagged(RUN, 3, 6), RUN, 3, 5),
            Verdict::Ahead { generation: 6 }
        );
    }

    #[test]
    fn verdict_display_is_one_token_then_key_values() {
        assert_eq!(Verdict::Zero.to_string(), "zero");
        assert_eq!(Verdict::Stale { generation: 3 }.to_string(), "stale gen=3");
        assert_eq!(
            Verdict::Corrupt {
                index: 4,
                generation: 9
            }
            .to_string(),
            "corrupt gen=9 idx=4"
        );
        let s = Verdict::Foreign { magic: 1, run: 2 }.to_string();
        assert_eq!(s, "foreign magic=0x0000000000000001 run=0000000000000002");
    }
}
