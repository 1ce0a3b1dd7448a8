//! Addresses in the *target* process's address space (QEMU's), which the
//! engine hands to the kernel and never dereferences.

use std::fmt;
use std::sync::OnceLock;

/// The base page size of this machine (`sysconf(_SC_PAGESIZE)`, 4096 on x86).
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(v)
            .ok()
            .filter(|v| v.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// An address in the target process (the one whose memory the userfaultfd or
/// pagemap file refers to). Not a pointer: nothing here dereferences it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RemoteAddr(pub u64);

impl RemoteAddr {
    /// The raw address value.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The address of a local pointer, for the case where the target process
    /// is this one (tests, and tools that register their own mappings).
    pub fn of_local<T>(ptr: *const T) -> Self {
        RemoteAddr(ptr as usize as u64)
    }

    /// `self + off`, or `None` on overflow.
    pub const fn checked_add(self, off: u64) -> Option<Self> {
        match self.0.checked_add(off) {
            Some(v) => Some(RemoteAddr(v)),
            None => None,
        }
    }

    /// `self - base` if `self >= base`.
    pub const fn offset_from(self, base: RemoteAddr) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// Rounds down to a multiple of `align` (a power of two).
    pub const fn align_down(self, align: u64) -> Self {
        RemoteAddr(self.0 & !(align.wrapping_sub(1)))
    }

    /// Whether the address is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & align.wrapping_sub(1) == 0
    }
}

impl fmt::Debug for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteAddr({:#x})", self.0)
    }
}

impl fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A range `[start, start + len)` in the target process.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RemoteRange {
    /// First byte.
    pub start: RemoteAddr,
    /// Length in bytes.
    pub len: u64,
}

impl RemoteRange {
    /// `[start, start + len)`.
    pub const fn new(start: RemoteAddr, len: u64) -> Self {
        RemoteRange { start, len }
    }

    /// The range of a local buffer, when the target process is this one.
    pub fn of_local(ptr: *const u8, len: usize) -> Self {
        RemoteRange::new(RemoteAddr::of_local(ptr), len as u64)
    }

    /// One past the last byte, or `None` if that overflows.
    pub const fn end(&self) -> Option<RemoteAddr> {
        self.start.checked_add(self.len)
    }

    /// Whether the range is empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether start and length are multiples of `page` (a power of two) and
    /// the end does not overflow.
    pub const fn is_aligned_to(&self, page: u64) -> bool {
        self.start.is_aligned(page) && self.len & page.wrapping_sub(1) == 0 && self.end().is_some()
    }

    /// [`is_aligned_to`](Self::is_aligned_to) the machine's [`page_size`].
    pub fn is_page_aligned(&self) -> bool {
        self.is_aligned_to(page_size())
    }

    /// Number of whole [`page_size`] pages.
    pub fn page_count(&self) -> u64 {
        self.len / page_size()
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: RemoteAddr) -> bool {
        addr.offset_from(self.start).is_some_and(|o| o < self.len)
    }

    /// Whether `other` lies entirely in the range.
    pub fn contains_range(&self, other: &RemoteRange) -> bool {
        other
            .start
            .offset_from(self.start)
            .is_some_and(|o| o.checked_add(other.len).is_some_and(|e| e <= self.len))
    }

    /// `[start + offset, start + offset + len)` if it lies inside the range.
    pub fn subrange(&self, offset: u64, len: u64) -> Option<RemoteRange> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(RemoteRange::new(self.start.checked_add(offset)?, len))
    }

    /// Pages `first .. first + count` of the range (in [`page_size`] units).
    pub fn pages(&self, first: u64, count: u64) -> Option<RemoteRange> {
        let ps = page_size();
        self.subrange(first.checked_mul(ps)?, count.checked_mul(ps)?)
    }
}

impl fmt::Debug for RemoteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteRange({self})")
    }
}

impl fmt::Display for RemoteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end() {
            Some(end) => write!(f, "[{}, {}) ({} bytes)", self.start, end, self.len),
            None => write!(f, "[{}, +{:#x}) (overflows)", self.start, self.len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_arithmetic() {
        let ps = page_size();
        let r = RemoteRange::new(RemoteAddr(0x10000), 4 * ps);
        assert!(r.is_page_aligned());
        assert_eq!(r.page_count(), 4);
        assert!(r.contains(RemoteAddr(0x10000)));
        assert!(!r.contains(RemoteAddr(0x10000 + 4 * ps)));
        assert!(!r.contains(RemoteAddr(0xffff)));
        assert_eq!(
            r.pages(1, 2),
            Some(RemoteRange::new(RemoteAddr(0x10000 + ps), 2 * ps))
        );
        assert_eq!(r.pages(3, 2), None);
        assert!(r.contains_range(&r.pages(0, 4).unwrap()));
        assert!(!r.contains_range(&RemoteRange::new(RemoteAddr(0x10000 + ps), 4 * ps)));
        assert!(!RemoteRange::new(RemoteAddr(u64::MAX - ps + 1), 2 * ps).is_page_aligned());
        assert!(!RemoteRange::new(RemoteAddr(0x10001), ps).is_page_aligned());
        assert_eq!(RemoteAddr(0x12345).align_down(0x1000), RemoteAddr(0x12000));
        assert_eq!(RemoteAddr(5).offset_from(RemoteAddr(6)), None);
        assert!(format!("{r}").starts_with("[0x10000, "));
    }
}
