//! Index sets the engine's threads share: a bitmap of atomic words (one
//! thread marks, another reads or takes), and runs of consecutive indices.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size set of indices `[0, len)`, marked and taken concurrently.
#[derive(Debug)]
pub(crate) struct AtomicBitmap {
    len: u64,
    words: Vec<AtomicU64>,
}

impl AtomicBitmap {
    /// An empty set of `len` indices.
    pub(crate) fn new(len: u64) -> Self {
        AtomicBitmap {
            len,
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The set whose word `k` holds indices `64 k ..= 64 k + 63` (bit `i %
    /// 64` for index `i`); missing words are empty, bits past `len` are
    /// dropped.
    pub(crate) fn from_words(len: u64, words: impl Iterator<Item = u64>) -> Self {
        let n = len.div_ceil(64) as usize;
        let mut v: Vec<AtomicU64> = words.take(n).map(AtomicU64::new).collect();
        v.resize_with(n, || AtomicU64::new(0));
        if len % 64 != 0 {
            if let Some(last) = v.last_mut() {
                *last.get_mut() &= (1 << (len % 64)) - 1;
            }
        }
        AtomicBitmap { len, words: v }
    }

    /// The number of indices it can hold.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Adds `i`; true if it was not in the set (false too if out of range).
    pub(crate) fn insert(&self, i: u64) -> bool {
        match self.words.get((i / 64) as usize) {
            Some(w) if i < self.len => {
                let bit = 1 << (i % 64);
                w.fetch_or(bit, Ordering::AcqRel) & bit == 0
            }
            _ => false,
        }
    }

    /// Adds `i` (ignored if out of range).
    pub(crate) fn set(&self, i: u64) {
        if let Some(w) = self.words.get((i / 64) as usize) {
            w.fetch_or(1 << (i % 64), Ordering::AcqRel);
        }
    }

    /// Whether `i` is in the set.
    pub(crate) fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Adds every index.
    pub(crate) fn set_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
            let bits = (self.len - i as u64 * 64).min(64);
            w.store(
                if bits == 64 {
                    u64::MAX
                } else {
                    (1 << bits) - 1
                },
                Ordering::Release,
            );
        }
    }

    /// Calls `each(i)` for every index in the set, in order, clearing it
    /// (word by word: an index set meanwhile is either taken or left set).
    pub(crate) fn take(&self, mut each: impl FnMut(u64)) {
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                each(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
    }
}

/// `(first, count)` runs of consecutive indices, in the order given
/// (ascending input gives maximal runs).
pub(crate) fn runs_of(indices: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in indices {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_read_taken_once_and_set_all_stops_at_len() {
        let b = AtomicBitmap::new(130);
        b.set(3);
        b.set(129);
        b.set(500); // out of range: ignored
        assert!(b.get(3) && b.get(129) && !b.get(4) && !b.get(500));
        let mut v = Vec::new();
        b.take(|i| v.push(i));
        assert_eq!(v, vec![3, 129]);
        b.take(|_| panic!("taken already"));
        b.set_all();
        let mut n = 0;
        b.take(|i| {
            assert_eq!(i, n);
            n += 1;
        });
        assert_eq!(n, 130);
    }

    #[test]
    fn insert_says_who_added_first_and_words_build_the_set() {
        let b = AtomicBitmap::new(70);
        assert!(b.insert(5));
        assert!(!b.insert(5));
        assert!(b.insert(69));
        assert!(!b.insert(70), "out of range");
        let w = AtomicBitmap::from_words(70, [0b1010u64, u64::MAX].into_iter());
        let mut v = Vec::new();
        w.take(|i| v.push(i));
        let mut want = vec![1, 3];
        want.extend(64..70);
        assert_eq!(v, want, "bits past len dropped");
        let short = AtomicBitmap::from_words(200, std::iter::once(1u64));
        assert!(short.get(0) && !short.get(199));
        assert!(short.insert(199));
    }

    #[test]
    fn runs_join_consecutive_indices() {
        assert_eq!(
            runs_of([1, 2, 3, 7, 8, 10].into_iter()),
            vec![(1, 3), (7, 2), (10, 1)]
        );
        assert!(runs_of(std::iter::empty()).is_empty());
    }
}
