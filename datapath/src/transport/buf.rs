//! Heap buffers the kernel may read or write while Rust code works on other
//! parts of them.
//!
//! An io_uring request holds a raw pointer into a buffer until its completion
//! arrives. [`IoBuf`] hands out slices only for explicit byte ranges, so Rust
//! code never holds a reference overlapping the range lent to the kernel, and
//! the allocation cannot move or be freed by accident: dropping an `IoBuf`
//! with a request in flight is the owner's bug, which owners avoid by waiting
//! for (or cancelling) the request, or by leaking the buffer when they cannot.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ptr::NonNull;

/// Alignment of every buffer: a page, so that the kernel can pin it cheaply.
const ALIGN: usize = 4096;

/// A fixed-size, page-aligned, zero-initialised heap buffer.
#[derive(Debug)]
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: `IoBuf` owns its allocation exclusively (like `Box<[u8]>`); moving it
// to another thread moves that ownership.
unsafe impl Send for IoBuf {}

impl IoBuf {
    /// Allocates `cap` zeroed bytes (`cap` > 0).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer size overflows a Layout");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        IoBuf { ptr, cap }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Mutable access to `start..end`.
    ///
    /// # Panics
    /// If the range is out of bounds.
    pub fn slice_mut(&mut self, start: usize, end: usize) -> &mut [u8] {
        assert!(
            start <= end && end <= self.cap,
            "range {start}..{end} out of {}",
            self.cap
        );
        // SAFETY: in bounds of the live allocation (checked above); `&mut self`
        // guarantees no other Rust reference into it exists, and owners never
        // pass a range lent to the kernel.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), end - start) }
    }

    /// Shared access to `start..end`.
    ///
    /// # Panics
    /// If the range is out of bounds.
    pub fn slice(&self, start: usize, end: usize) -> &[u8] {
        assert!(
            start <= end && end <= self.cap,
            "range {start}..{end} out of {}",
            self.cap
        );
        // SAFETY: in bounds of the live allocation (checked above).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), end - start) }
    }

    /// A raw pointer to byte `offset`, to lend to the kernel.
    ///
    /// # Panics
    /// If `offset` is past the end.
    pub fn ptr_at(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.cap);
        // SAFETY: `offset` is within (or one past) the allocation.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// Moves `start..end` to the front of the buffer.
    pub fn compact(&mut self, start: usize, end: usize) {
        assert!(start <= end && end <= self.cap);
        if start > 0 {
            // SAFETY: both ranges lie within the allocation; `copy` handles overlap.
            unsafe { std::ptr::copy(self.ptr.as_ptr().add(start), self.ptr.as_ptr(), end - start) };
        }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let layout =
            Layout::from_size_align(self.cap, ALIGN).expect("layout was valid at allocation");
        // SAFETY: allocated in `new` with exactly this layout, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_independent_and_zeroed() {
        let mut b = IoBuf::new(8192);
        assert_eq!(b.ptr_at(0) as usize % ALIGN, 0);
        assert!(b.slice(0, 8192).iter().all(|&x| x == 0));
        b.slice_mut(10, 20).fill(7);
        assert_eq!(b.slice(9, 21), &[0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);
        b.compact(10, 20);
        assert_eq!(b.slice(0, 10), &[7; 10]);
    }

    #[test]
    #[should_panic(expected = "out of")]
    fn out_of_range_is_refused() {
        let mut b = IoBuf::new(16);
        b.slice_mut(8, 17);
    }
}
