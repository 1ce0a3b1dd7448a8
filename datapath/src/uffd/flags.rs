//! Typed bit sets of the userfaultfd API: features, permitted ioctls,
//! registration modes and copy flags.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign, Sub};

use super::abi;

/// Defines a `u64` bit-set newtype with named flags. Unknown bits are kept
/// (a newer kernel may report more) and shown in hex.
macro_rules! bitset {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$fmeta:meta])* $flag:ident = $value:expr ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            $( $(#[$fmeta])* pub const $flag: $name = $name($value); )*
            /// No bits.
            pub const EMPTY: $name = $name(0);
            const NAMED: &'static [(&'static str, u64)] = &[$((stringify!($flag), $value)),*];

            /// From raw bits (unknown bits are kept).
            pub const fn from_bits(bits: u64) -> Self {
                $name(bits)
            }
            /// The raw bits.
            pub const fn bits(self) -> u64 {
                self.0
            }
            /// Whether every bit of `other` is set in `self`.
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }
            /// Whether no bit is set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }
            /// Bits of `self` that are not in `other`.
            pub const fn difference(self, other: $name) -> Self {
                $name(self.0 & !other.0)
            }
            /// Names of the set bits that have one.
            pub fn names(self) -> impl Iterator<Item = &'static str> {
                Self::NAMED
                    .iter()
                    .filter(move |(_, v)| self.0 & v == *v)
                    .map(|(n, _)| *n)
            }
        }

        impl BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }
        impl BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: $name) {
                self.0 |= rhs.0;
            }
        }
        impl BitAnd for $name {
            type Output = $name;
            fn bitand(self, rhs: $name) -> $name {
                $name(self.0 & rhs.0)
            }
        }
        impl Sub for $name {
            type Output = $name;
            fn sub(self, rhs: $name) -> $name {
                self.difference(rhs)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if self.0 == 0 {
                    return f.write_str("(none)");
                }
                let mut known = 0u64;
                let mut first = true;
                for (n, v) in Self::NAMED {
                    if self.0 & v == *v {
                        if !first {
                            f.write_str("|")?;
                        }
                        f.write_str(n)?;
                        first = false;
                        known |= v;
                    }
                }
                let rest = self.0 & !known;
                if rest != 0 {
                    if !first {
                        f.write_str("|")?;
                    }
                    write!(f, "{rest:#x}")?;
                }
                Ok(())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }
    };
}

bitset! {
    /// `UFFD_FEATURE_*`: optional behaviour negotiated by `UFFDIO_API`.
    Features {
        /// Write-protect faults report `UFFD_PAGEFAULT_FLAG_WP`.
        PAGEFAULT_FLAG_WP = abi::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        /// Fork events (needs `CAP_SYS_PTRACE`).
        EVENT_FORK = abi::UFFD_FEATURE_EVENT_FORK,
        /// mremap events.
        EVENT_REMAP = abi::UFFD_FEATURE_EVENT_REMAP,
        /// `MADV_DONTNEED`/`MADV_REMOVE` events.
        EVENT_REMOVE = abi::UFFD_FEATURE_EVENT_REMOVE,
        /// MISSING mode on hugetlbfs.
        MISSING_HUGETLBFS = abi::UFFD_FEATURE_MISSING_HUGETLBFS,
        /// MISSING mode on shmem (memfd, `/dev/shm`).
        MISSING_SHMEM = abi::UFFD_FEATURE_MISSING_SHMEM,
        /// munmap events.
        EVENT_UNMAP = abi::UFFD_FEATURE_EVENT_UNMAP,
        /// Faults raise `SIGBUS` instead of events.
        SIGBUS = abi::UFFD_FEATURE_SIGBUS,
        /// Pagefault events carry the faulting thread id.
        THREAD_ID = abi::UFFD_FEATURE_THREAD_ID,
        /// MINOR mode on hugetlbfs.
        MINOR_HUGETLBFS = abi::UFFD_FEATURE_MINOR_HUGETLBFS,
        /// MINOR mode on shmem.
        MINOR_SHMEM = abi::UFFD_FEATURE_MINOR_SHMEM,
        /// Fault addresses are not rounded down to the page.
        EXACT_ADDRESS = abi::UFFD_FEATURE_EXACT_ADDRESS,
        /// WP mode on hugetlbfs and shmem.
        WP_HUGETLBFS_SHMEM = abi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        /// `UFFDIO_WRITEPROTECT` also protects never-populated pages (markers).
        WP_UNPOPULATED = abi::UFFD_FEATURE_WP_UNPOPULATED,
        /// `UFFDIO_POISON`.
        POISON = abi::UFFD_FEATURE_POISON,
        /// Write-protect faults are resolved by the kernel (dirty tracking
        /// through `PAGEMAP_SCAN`); implies `WP_UNPOPULATED`.
        WP_ASYNC = abi::UFFD_FEATURE_WP_ASYNC,
        /// `UFFDIO_MOVE`.
        MOVE = abi::UFFD_FEATURE_MOVE,
    }
}

bitset! {
    /// `1 << _UFFDIO_*`: the ioctls the kernel allows (on a registered range,
    /// as returned by `UFFDIO_REGISTER`, or on the fd, by `UFFDIO_API`).
    Ioctls {
        /// `UFFDIO_REGISTER`.
        REGISTER = 1 << abi::_UFFDIO_REGISTER,
        /// `UFFDIO_UNREGISTER`.
        UNREGISTER = 1 << abi::_UFFDIO_UNREGISTER,
        /// `UFFDIO_WAKE`.
        WAKE = 1 << abi::_UFFDIO_WAKE,
        /// `UFFDIO_COPY`.
        COPY = 1 << abi::_UFFDIO_COPY,
        /// `UFFDIO_ZEROPAGE`.
        ZEROPAGE = 1 << abi::_UFFDIO_ZEROPAGE,
        /// `UFFDIO_MOVE`.
        MOVE = 1 << abi::_UFFDIO_MOVE,
        /// `UFFDIO_WRITEPROTECT`.
        WRITEPROTECT = 1 << abi::_UFFDIO_WRITEPROTECT,
        /// `UFFDIO_CONTINUE`.
        CONTINUE = 1 << abi::_UFFDIO_CONTINUE,
        /// `UFFDIO_POISON`.
        POISON = 1 << abi::_UFFDIO_POISON,
        /// `UFFDIO_API`.
        API = 1 << abi::_UFFDIO_API,
    }
}

/// Registration mode (`UFFDIO_REGISTER_MODE_*`); several may be combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mode {
    /// Faults on pages absent from the page cache (post-copy).
    pub missing: bool,
    /// Writes to write-protected pages (dirty tracking).
    pub wp: bool,
    /// Faults on pages in the page cache but not mapped (access sampling).
    pub minor: bool,
}

impl Mode {
    /// MISSING only.
    pub const MISSING: Mode = Mode {
        missing: true,
        wp: false,
        minor: false,
    };
    /// WP only.
    pub const WP: Mode = Mode {
        missing: false,
        wp: true,
        minor: false,
    };
    /// MINOR only.
    pub const MINOR: Mode = Mode {
        missing: false,
        wp: false,
        minor: true,
    };

    /// The `UFFDIO_REGISTER_MODE_*` bits.
    pub const fn bits(self) -> u64 {
        (if self.missing {
            abi::UFFDIO_REGISTER_MODE_MISSING
        } else {
            0
        }) | (if self.wp {
            abi::UFFDIO_REGISTER_MODE_WP
        } else {
            0
        }) | (if self.minor {
            abi::UFFDIO_REGISTER_MODE_MINOR
        } else {
            0
        })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.missing, "MISSING"),
            (self.wp, "WP"),
            (self.minor, "MINOR"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        if names.is_empty() {
            f.write_str("(none)")
        } else {
            f.write_str(&names.join("|"))
        }
    }
}

/// Options of [`Userfaultfd::copy`](super::Userfaultfd::copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CopyFlags {
    /// Do not wake threads waiting on the range (`UFFDIO_COPY_MODE_DONTWAKE`):
    /// for background batches; a later [`wake`](super::Userfaultfd::wake) or a
    /// waking copy must release any waiter.
    pub dontwake: bool,
    /// Install the pages write-protected (`UFFDIO_COPY_MODE_WP`): needed on a
    /// range that is also tracked with WP-async, or the installed pages count
    /// as written at the next scan.
    pub wp: bool,
}

impl CopyFlags {
    /// The `UFFDIO_COPY_MODE_*` bits.
    pub const fn bits(self) -> u64 {
        (if self.dontwake {
            abi::UFFDIO_COPY_MODE_DONTWAKE
        } else {
            0
        }) | (if self.wp { abi::UFFDIO_COPY_MODE_WP } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_render_and_combine() {
        let f = Features::WP_ASYNC | Features::WP_UNPOPULATED;
        assert_eq!(f.to_string(), "WP_UNPOPULATED|WP_ASYNC");
        assert!(f.contains(Features::WP_ASYNC));
        assert!(!f.contains(Features::MISSING_SHMEM));
        assert_eq!((f - Features::WP_ASYNC), Features::WP_UNPOPULATED);
        assert_eq!(Features::from_bits(1 << 40).to_string(), "0x10000000000");
        assert_eq!(Features::EMPTY.to_string(), "(none)");
        assert_eq!(
            format!("{:?}", Ioctls::COPY | Ioctls::WAKE),
            "Ioctls(WAKE|COPY)"
        );
    }

    #[test]
    fn mode_and_copy_bits() {
        assert_eq!(Mode::MISSING.bits(), 1);
        assert_eq!(
            Mode {
                missing: true,
                wp: true,
                minor: false
            }
            .bits(),
            3
        );
        assert_eq!(Mode::MINOR.bits(), 4);
        assert_eq!(Mode::default().to_string(), "(none)");
        assert_eq!(
            CopyFlags {
                dontwake: true,
                wp: true
            }
            .bits(),
            3
        );
    }
}
