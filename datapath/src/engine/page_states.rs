//! What the destination knows about each page, shared by the bulk receiver,
//! the fault requester and the fault-answer receiver.

use std::sync::atomic::{AtomicU8, Ordering};

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
}

/// One atomic state per page.
#[derive(Debug)]
pub struct PageStates {
    states: Vec<AtomicU8>,
}

impl PageStates {
    /// `pages` pages, all absent.
    pub fn new(pages: u64) -> Self {
        PageStates {
            states: (0..pages)
                .map(|_| AtomicU8::new(PageState::Absent as u8))
                .collect(),
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

    /// The state of page `p` (out of range reads as present: nothing to do).
    pub fn get(&self, p: u64) -> PageState {
        self.states.get(p as usize).map_or(PageState::Present, |s| {
            PageState::from_u8(s.load(Ordering::Acquire))
        })
    }

    /// Sets page `p`.
    pub fn set(&self, p: u64, state: PageState) {
        if let Some(s) = self.states.get(p as usize) {
            s.store(state as u8, Ordering::Release);
        }
    }

    /// Moves page `p` from `from` to `to`; false if it was not in `from`.
    pub fn transition(&self, p: u64, from: PageState, to: PageState) -> bool {
        self.states.get(p as usize).is_some_and(|s| {
            s.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// Pages in `state`.
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
        assert!(s.transition(2, PageState::Absent, PageState::Requested));
        assert!(!s.transition(2, PageState::Absent, PageState::Requested));
        s.set(2, PageState::Present);
        assert_eq!(s.count(PageState::Present), 1);
        assert_eq!(s.count(PageState::Absent), 3);
        assert_eq!(s.get(99), PageState::Present);
    }
}
