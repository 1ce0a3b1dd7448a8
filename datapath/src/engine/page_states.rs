//! What the destination knows about each page, shared by the bulk receiver,
//! the fault requester and the fault-answer receiver.
//!
//! Every change goes through an atomic swap or compare-exchange, so exactly
//! one thread sees each transition (the one that resolves a stall sees the
//! old state `Requested`), and a counter of the pages still missing (absent
//! or requested) is kept alongside: waiting for completion never scans the
//! pages.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// The state of one destination page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Not here yet: a fault must fetch it.
    Absent = 0,
    /// Zero at the source: a fault installs a zero page locally.
    Zero = 1,
    /// Requested from the source by the fault path, answer pending.
    Requested = 2,
    /// In place.
    Present = 3,
}

impl PageState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => PageState::Zero,
            2 => PageState::Requested,
            3 => PageState::Present,
            _ => PageState::Absent,
        }
    }

    /// Whether the page still has to come from the source.
    pub fn is_missing(self) -> bool {
        matches!(self, PageState::Absent | PageState::Requested)
    }
}

/// One atomic state per page.
#[derive(Debug)]
pub struct PageStates {
    states: Vec<AtomicU8>,
    missing: AtomicU64,
}

impl PageStates {
    /// `pages` pages, all absent.
    pub fn new(pages: u64) -> Self {
        PageStates {
            states: (0..pages)
                .map(|_| AtomicU8::new(PageState::Absent as u8))
                .collect(),
            missing: AtomicU64::new(pages),
        }
    }

    /// Pages tracked.
    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    /// Whether there are no pages.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    fn slot(&self, p: u64) -> Option<&AtomicU8> {
        let slot = self.states.get(p as usize);
        debug_assert!(slot.is_some(), "page {p} out of {}", self.states.len());
        slot
    }

    /// The state of page `p`. A page out of range is a caller bug (panics in
    /// debug builds); it reads as absent, never as present.
    pub fn get(&self, p: u64) -> PageState {
        self.slot(p).map_or(PageState::Absent, |s| {
            PageState::from_u8(s.load(Ordering::Acquire))
        })
    }

    fn account(&self, old: PageState, new: PageState) {
        match (old.is_missing(), new.is_missing()) {
            (true, false) => {
                self.missing.fetch_sub(1, Ordering::AcqRel);
            }
            (false, true) => {
                self.missing.fetch_add(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }

    /// Sets page `p` and returns its previous state (out of range: nothing
    /// changes and it returns `state`).
    pub fn swap(&self, p: u64, state: PageState) -> PageState {
        let Some(s) = self.slot(p) else {
            return state;
        };
        let old = PageState::from_u8(s.swap(state as u8, Ordering::AcqRel));
        self.account(old, state);
        old
    }

    /// Sets page `p`.
    pub fn set(&self, p: u64, state: PageState) {
        self.swap(p, state);
    }

    /// Moves page `p` from `from` to `to`; false if it was not in `from`.
    pub fn transition(&self, p: u64, from: PageState, to: PageState) -> bool {
        let moved = self.slot(p).is_some_and(|s| {
            s.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        if moved {
            self.account(from, to);
        }
        moved
    }

    /// Pages still absent or requested (O(1)).
    pub fn missing(&self) -> u64 {
        self.missing.load(Ordering::Acquire)
    }

    /// Pages in `state` (scans every page).
    pub fn count(&self, state: PageState) -> u64 {
        self.states
            .iter()
            .filter(|s| s.load(Ordering::Acquire) == state as u8)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_happen_once() {
        let s = PageStates::new(4);
        assert_eq!(s.get(2), PageState::Absent);
        assert_eq!(s.missing(), 4);
        assert!(s.transition(2, PageState::Absent, PageState::Requested));
        assert!(!s.transition(2, PageState::Absent, PageState::Requested));
        assert_eq!(s.missing(), 4, "requested is still missing");
        assert_eq!(s.swap(2, PageState::Present), PageState::Requested);
        assert_eq!(s.swap(2, PageState::Present), PageState::Present);
        assert_eq!(s.count(PageState::Present), 1);
        assert_eq!(s.count(PageState::Absent), 3);
        assert_eq!(s.missing(), 3);
        s.set(0, PageState::Zero);
        s.set(1, PageState::Zero);
        assert_eq!(s.missing(), 1);
        // A discarded page is missing again.
        s.set(1, PageState::Absent);
        assert_eq!(s.missing(), 2);
        assert!(s.transition(1, PageState::Absent, PageState::Zero));
        assert!(s.transition(0, PageState::Zero, PageState::Present));
        assert_eq!(s.missing(), 1);
    }

    #[test]
    fn the_missing_counter_survives_racing_threads() {
        let s = std::sync::Arc::new(PageStates::new(10_000));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for p in 0..10_000 {
                        match (p + t) % 3 {
                            0 => {
                                s.transition(p, PageState::Absent, PageState::Requested);
                            }
                            1 => {
                                s.swap(p, PageState::Present);
                            }
                            _ => {
                                s.transition(p, PageState::Absent, PageState::Zero);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let missing = s.count(PageState::Absent) + s.count(PageState::Requested);
        assert_eq!(s.missing(), missing);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "out of")]
    fn a_page_out_of_range_is_a_bug() {
        PageStates::new(4).get(99);
    }
}
