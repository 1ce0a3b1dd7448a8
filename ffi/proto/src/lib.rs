//! The registration message the preload library sends to the engine.
//!
//! When QEMU maps guest RAM, the preload library creates a userfaultfd,
//! registers the mapping on it and connects to the engine's unix socket
//! (`WANMIG_UFFD_SOCK`). It sends exactly one [`RegistrationMsg`]
//! ([`REGISTRATION_LEN`] bytes) with the userfaultfd attached as `SCM_RIGHTS`
//! ancillary data, then waits for a single byte: [`ACK_ACCEPT`] lets QEMU go
//! on; anything else, or end of file, makes the library abort QEMU.
//!
//! All integers are little-endian, every field sits at a fixed offset:
//!
//! | offset | size | field         | meaning                                                  |
//! |-------:|-----:|---------------|----------------------------------------------------------|
//! | 0      | 8    | `magic`       | [`MAGIC`] (`b"WMUFFD01"` read as a little-endian `u64`)  |
//! | 8      | 4    | `version`     | [`VERSION`]                                              |
//! | 12     | 4    | `mode`        | [`UffdMode`] (`1` missing, `2` wp-async, `3` both)       |
//! | 16     | 4    | `pid`         | process id of the mapping process (QEMU)                 |
//! | 20     | 4    | `reserved`    | zero                                                     |
//! | 24     | 8    | `base`        | start address of the mapping in that process             |
//! | 32     | 8    | `len`         | registered length in bytes (page-rounded)                |
//! | 40     | 8    | `file_offset` | offset of `base` in the backing file                     |
//! | 48     | 8    | `features`    | userfaultfd features enabled by `UFFDIO_API`             |
//! | 56     | 8    | `ioctls`      | `ioctls` bitmask `UFFDIO_REGISTER` returned for the range |
//! | 64     | 256  | `path`        | backing file path, NUL-terminated and NUL-padded         |
//!
//! The message is built and parsed without allocation on the sending side
//! ([`RegistrationMsg::new`]); the engine decodes it with
//! [`UffdRegistration::parse`].

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use zerocopy::little_endian::{I32, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `b"WMUFFD01"` as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"WMUFFD01");
/// The only message version this crate speaks.
pub const VERSION: u32 = 1;
/// Bytes of the `path` field, terminating NUL included.
pub const PATH_LEN: usize = 256;
/// Bytes of one registration message.
pub const REGISTRATION_LEN: usize = 320;
/// The engine's answer that accepts a registration; any other byte refuses it.
pub const ACK_ACCEPT: u8 = b'A';
/// A conventional refusal byte (any byte but [`ACK_ACCEPT`] refuses).
pub const ACK_REFUSE: u8 = b'N';
/// Alignment every `base` and `len` has (the smallest Linux page size).
pub const MIN_PAGE: u64 = 4096;

/// `UFFDIO_REGISTER_MODE_MISSING` (linux/userfaultfd.h).
pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP` (linux/userfaultfd.h).
pub const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFD_FEATURE_MINOR_SHMEM`: MINOR faults on shmem (the source's read
/// sampling registers MINOR mode with it while profiling).
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect on shmem and hugetlbfs.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write-protect also marks unpopulated pages.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write-protect faults itself
/// (the dirty log is read with `PAGEMAP_SCAN`).
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// How the guest-RAM mapping is registered on its userfaultfd
/// (`WANMIG_UFFD_MODE`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UffdMode {
    /// Destination: missing-page faults are reported to the engine
    /// (`missing`).
    Missing = 1,
    /// Source: asynchronous write-protect, the dirty log (`wp-async`).
    WpAsync = 2,
    /// Destination that also tracks guest writes after resume: both on one
    /// registration (`missing+wp-async`).
    MissingWpAsync = 3,
}

impl UffdMode {
    /// Every mode, in wire order.
    pub const ALL: [UffdMode; 3] = [
        UffdMode::Missing,
        UffdMode::WpAsync,
        UffdMode::MissingWpAsync,
    ];

    /// The mode from its wire value.
    pub const fn from_wire(raw: u32) -> Option<UffdMode> {
        match raw {
            1 => Some(UffdMode::Missing),
            2 => Some(UffdMode::WpAsync),
            3 => Some(UffdMode::MissingWpAsync),
            _ => None,
        }
    }

    /// The mode from its `WANMIG_UFFD_MODE` spelling.
    pub fn from_env_value(value: &[u8]) -> Option<UffdMode> {
        UffdMode::ALL
            .into_iter()
            .find(|m| m.env_value().as_bytes() == value)
    }

    /// The `WANMIG_UFFD_MODE` spelling of the mode.
    pub const fn env_value(self) -> &'static str {
        match self {
            UffdMode::Missing => "missing",
            UffdMode::WpAsync => "wp-async",
            UffdMode::MissingWpAsync => "missing+wp-async",
        }
    }

    /// Whether missing-page faults are reported (the engine must serve them).
    pub const fn reports_missing(self) -> bool {
        matches!(self, UffdMode::Missing | UffdMode::MissingWpAsync)
    }

    /// Whether writes are tracked with asynchronous write-protect.
    pub const fn tracks_writes(self) -> bool {
        matches!(self, UffdMode::WpAsync | UffdMode::MissingWpAsync)
    }

    /// The `features` requested from `UFFDIO_API`.
    pub const fn api_features(self) -> u64 {
        match self {
            UffdMode::Missing => 0,
            // The source: writes logged, reads sampled while profiling.
            UffdMode::WpAsync => {
                FEATURE_WP_ASYNC
                    | FEATURE_WP_UNPOPULATED
                    | FEATURE_WP_HUGETLBFS_SHMEM
                    | FEATURE_MINOR_SHMEM
            }
            UffdMode::MissingWpAsync => {
                FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM
            }
        }
    }

    /// The `mode` bits passed to `UFFDIO_REGISTER`.
    pub const fn register_mode(self) -> u64 {
        let mut bits = 0;
        if self.reports_missing() {
            bits |= REGISTER_MODE_MISSING;
        }
        if self.tracks_writes() {
            bits |= REGISTER_MODE_WP;
        }
        bits
    }
}

impl std::fmt::Display for UffdMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.env_value())
    }
}

/// The registration message exactly as it travels (see the module docs).
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RegistrationMsg {
    /// Always [`MAGIC`].
    pub magic: U64,
    /// Always [`VERSION`].
    pub version: U32,
    /// Raw [`UffdMode`].
    pub mode: U32,
    /// Process id of the mapping process.
    pub pid: I32,
    /// Zero.
    pub reserved: U32,
    /// Start address of the mapping in that process.
    pub base: U64,
    /// Registered length in bytes.
    pub len: U64,
    /// Offset of `base` in the backing file.
    pub file_offset: U64,
    /// Features enabled by `UFFDIO_API`.
    pub features: U64,
    /// The `ioctls` bitmask `UFFDIO_REGISTER` returned.
    pub ioctls: U64,
    /// Backing file path, NUL-terminated and NUL-padded.
    pub path: [u8; PATH_LEN],
}

const _: () = assert!(core::mem::size_of::<RegistrationMsg>() == REGISTRATION_LEN);
const _: () = assert!(core::mem::align_of::<RegistrationMsg>() == 1);
const _: () = assert!(core::mem::offset_of!(RegistrationMsg, base) == 24);
const _: () = assert!(core::mem::offset_of!(RegistrationMsg, path) == 64);

impl std::fmt::Debug for RegistrationMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path_end = self.path.iter().position(|&b| b == 0).unwrap_or(PATH_LEN);
        f.debug_struct("RegistrationMsg")
            .field("magic", &format_args!("{:#x}", self.magic.get()))
            .field("version", &self.version.get())
            .field("mode", &self.mode.get())
            .field("pid", &self.pid.get())
            .field("reserved", &self.reserved.get())
            .field("base", &format_args!("{:#x}", self.base.get()))
            .field("len", &self.len.get())
            .field("file_offset", &self.file_offset.get())
            .field("features", &format_args!("{:#x}", self.features.get()))
            .field("ioctls", &format_args!("{:#x}", self.ioctls.get()))
            .field("path", &OsStr::from_bytes(&self.path[..path_end]))
            .finish()
    }
}

/// The fields of a registration, before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationFields<'a> {
    /// How the range is registered.
    pub mode: UffdMode,
    /// Process id of the mapping process.
    pub pid: i32,
    /// Start address of the mapping.
    pub base: u64,
    /// Registered length in bytes.
    pub len: u64,
    /// Offset of `base` in the backing file.
    pub file_offset: u64,
    /// Features enabled by `UFFDIO_API`.
    pub features: u64,
    /// The `ioctls` bitmask `UFFDIO_REGISTER` returned.
    pub ioctls: u64,
    /// Backing file path (no NUL, at most [`PATH_LEN`]` - 1` bytes).
    pub path: &'a [u8],
}

impl RegistrationMsg {
    /// Encodes `fields`, checking them as [`UffdRegistration::parse`] would.
    /// Does not allocate (the preload library calls it inside `mmap`).
    pub fn new(fields: &RegistrationFields<'_>) -> Result<RegistrationMsg, RegistrationError> {
        if fields.path.len() >= PATH_LEN {
            return Err(RegistrationError::PathTooLong {
                len: fields.path.len(),
            });
        }
        if fields.path.contains(&0) {
            return Err(RegistrationError::PathContainsNul);
        }
        let mut path = [0u8; PATH_LEN];
        path[..fields.path.len()].copy_from_slice(fields.path);
        let msg = RegistrationMsg {
            magic: U64::new(MAGIC),
            version: U32::new(VERSION),
            mode: U32::new(fields.mode as u32),
            pid: I32::new(fields.pid),
            reserved: U32::ZERO,
            base: U64::new(fields.base),
            len: U64::new(fields.len),
            file_offset: U64::new(fields.file_offset),
            features: U64::new(fields.features),
            ioctls: U64::new(fields.ioctls),
            path,
        };
        msg.check()?;
        Ok(msg)
    }

    /// The field checks shared by encoding and parsing; returns the mode and
    /// the path length.
    fn check(&self) -> Result<(UffdMode, usize), RegistrationError> {
        let magic = self.magic.get();
        if magic != MAGIC {
            return Err(RegistrationError::BadMagic { found: magic });
        }
        let version = self.version.get();
        if version != VERSION {
            return Err(RegistrationError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let raw_mode = self.mode.get();
        let mode = UffdMode::from_wire(raw_mode)
            .ok_or(RegistrationError::UnknownMode { found: raw_mode })?;
        let pid = self.pid.get();
        if pid <= 0 {
            return Err(RegistrationError::BadPid { found: pid });
        }
        let reserved = self.reserved.get();
        if reserved != 0 {
            return Err(RegistrationError::ReservedNotZero { found: reserved });
        }
        let (base, len, file_offset) = (self.base.get(), self.len.get(), self.file_offset.get());
        if len == 0 {
            return Err(RegistrationError::ZeroLength);
        }
        for (field, value) in [("base", base), ("len", len), ("file_offset", file_offset)] {
            if value % MIN_PAGE != 0 {
                return Err(RegistrationError::Unaligned { field, value });
            }
        }
        if base.checked_add(len).is_none() {
            return Err(RegistrationError::RangeOverflow { base, len });
        }
        let path_len = self
            .path
            .iter()
            .position(|&b| b == 0)
            .ok_or(RegistrationError::PathNotTerminated)?;
        if path_len == 0 {
            return Err(RegistrationError::EmptyPath);
        }
        if self.path[path_len..].iter().any(|&b| b != 0) {
            return Err(RegistrationError::PathNotPadded);
        }
        Ok((mode, path_len))
    }
}

/// A decoded, checked registration (the engine's view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UffdRegistration {
    /// How the range is registered.
    pub mode: UffdMode,
    /// Process id of the mapping process (QEMU).
    pub pid: i32,
    /// Start address of the mapping in that process.
    pub base: u64,
    /// Registered length in bytes (a multiple of the page size).
    pub len: u64,
    /// Offset of `base` in the backing file.
    pub file_offset: u64,
    /// Features enabled by `UFFDIO_API`.
    pub features: u64,
    /// The `ioctls` bitmask `UFFDIO_REGISTER` returned for the range.
    pub ioctls: u64,
    /// Backing file path, as `readlink("/proc/self/fd/N")` gave it (a file
    /// unlinked after opening ends in `" (deleted)"`).
    pub path: PathBuf,
}

impl UffdRegistration {
    /// Decodes and checks one message of exactly [`REGISTRATION_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Result<UffdRegistration, RegistrationError> {
        let msg =
            RegistrationMsg::read_from_bytes(bytes).map_err(|_| RegistrationError::Length {
                got: bytes.len(),
                expected: REGISTRATION_LEN,
            })?;
        let (mode, path_len) = msg.check()?;
        Ok(UffdRegistration {
            mode,
            pid: msg.pid.get(),
            base: msg.base.get(),
            len: msg.len.get(),
            file_offset: msg.file_offset.get(),
            features: msg.features.get(),
            ioctls: msg.ioctls.get(),
            path: PathBuf::from(OsStr::from_bytes(&msg.path[..path_len])),
        })
    }

    /// Encodes the registration (the inverse of [`UffdRegistration::parse`]).
    pub fn to_msg(&self) -> Result<RegistrationMsg, RegistrationError> {
        RegistrationMsg::new(&RegistrationFields {
            mode: self.mode,
            pid: self.pid,
            base: self.base,
            len: self.len,
            file_offset: self.file_offset,
            features: self.features,
            ioctls: self.ioctls,
            path: self.path.as_os_str().as_bytes(),
        })
    }

    /// The backing file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `UFFDIO_REGISTER` reported the ioctl with number `nr`
    /// (`_UFFDIO_COPY` = 3, `_UFFDIO_ZEROPAGE` = 4, `_UFFDIO_WRITEPROTECT` = 6, ...).
    pub fn has_ioctl(&self, nr: u32) -> bool {
        nr < 64 && self.ioctls & (1 << nr) != 0
    }
}

/// Why a registration message was refused (while encoding or parsing).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegistrationError {
    /// The message is not exactly [`REGISTRATION_LEN`] bytes.
    #[error("registration message is {got} bytes, expected {expected}")]
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes of a message.
        expected: usize,
    },
    /// The first eight bytes are not [`MAGIC`].
    #[error("registration magic is {found:#018x}, expected {MAGIC:#018x} (b\"WMUFFD01\")")]
    BadMagic {
        /// The magic received.
        found: u64,
    },
    /// A version this crate does not speak.
    #[error("registration version {found} is not supported (this side speaks {supported})")]
    UnsupportedVersion {
        /// The version received.
        found: u32,
        /// The version this side speaks.
        supported: u32,
    },
    /// The mode is none of [`UffdMode`].
    #[error("registration mode {found} is unknown (1 missing, 2 wp-async, 3 missing+wp-async)")]
    UnknownMode {
        /// The raw mode received.
        found: u32,
    },
    /// The process id is not positive.
    #[error("registration pid {found} is not a process id")]
    BadPid {
        /// The pid received.
        found: i32,
    },
    /// The reserved field is not zero.
    #[error("registration reserved field is {found:#x}, must be zero")]
    ReservedNotZero {
        /// The value received.
        found: u32,
    },
    /// The length is zero.
    #[error("registration length is zero")]
    ZeroLength,
    /// `base`, `len` or `file_offset` is not page-aligned.
    #[error("registration {field} {value:#x} is not a multiple of {MIN_PAGE}")]
    Unaligned {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// `base + len` overflows.
    #[error("registration range {base:#x} + {len:#x} overflows")]
    RangeOverflow {
        /// Start address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The path field has no terminating NUL.
    #[error("registration path is not NUL-terminated within {PATH_LEN} bytes")]
    PathNotTerminated,
    /// Bytes after the terminating NUL are not all NUL.
    #[error("registration path has non-NUL bytes after its terminator")]
    PathNotPadded,
    /// The path is empty.
    #[error("registration path is empty")]
    EmptyPath,
    /// The path does not fit (encoding only).
    #[error("path of {len} bytes does not fit the {PATH_LEN}-byte field with its NUL")]
    PathTooLong {
        /// The path's length.
        len: usize,
    },
    /// The path contains a NUL byte (encoding only).
    #[error("path contains a NUL byte")]
    PathContainsNul,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(path: &[u8]) -> RegistrationFields<'_> {
        RegistrationFields {
            mode: UffdMode::Missing,
            pid: 4242,
            base: 0x7f00_0000_0000,
            len: 256 << 20,
            file_offset: 0,
            features: 0,
            ioctls: 0x1c,
            path,
        }
    }

    fn encoded() -> [u8; REGISTRATION_LEN] {
        let msg = RegistrationMsg::new(&fields(b"/dev/shm/wanmig-vm1")).unwrap();
        let mut out = [0u8; REGISTRATION_LEN];
        out.copy_from_slice(msg.as_bytes());
        out
    }

    #[test]
    fn layout_is_fixed_little_endian() {
        let b = encoded();
        assert_eq!(&b[0..8], b"WMUFFD01");
        assert_eq!(&b[8..12], &1u32.to_le_bytes());
        assert_eq!(&b[12..16], &1u32.to_le_bytes());
        assert_eq!(&b[16..20], &4242i32.to_le_bytes());
        assert_eq!(&b[20..24], &[0; 4]);
        assert_eq!(&b[24..32], &0x7f00_0000_0000u64.to_le_bytes());
        assert_eq!(&b[32..40], &(256u64 << 20).to_le_bytes());
        assert_eq!(&b[40..48], &[0; 8]);
        assert_eq!(&b[48..56], &[0; 8]);
        assert_eq!(&b[56..64], &0x1cu64.to_le_bytes());
        assert_eq!(&b[64..83], b"/dev/shm/wanmig-vm1");
        assert!(b[83..].iter().all(|&x| x == 0));
    }

    #[test]
    fn round_trips() {
        for mode in UffdMode::ALL {
            let mut f = fields(b"/dev/shm/wanmig-x");
            f.mode = mode;
            f.features = mode.api_features();
            f.file_offset = 1 << 21;
            let msg = RegistrationMsg::new(&f).unwrap();
            let reg = UffdRegistration::parse(msg.as_bytes()).unwrap();
            assert_eq!(reg.mode, mode);
            assert_eq!(reg.pid, 4242);
            assert_eq!(reg.base, 0x7f00_0000_0000);
            assert_eq!(reg.len, 256 << 20);
            assert_eq!(reg.file_offset, 1 << 21);
            assert_eq!(reg.features, mode.api_features());
            assert_eq!(reg.path(), Path::new("/dev/shm/wanmig-x"));
            assert!(reg.has_ioctl(3) && reg.has_ioctl(4) && !reg.has_ioctl(6));
            assert!(!reg.has_ioctl(64));
            assert_eq!(reg.to_msg().unwrap().as_bytes(), msg.as_bytes());
        }
    }

    #[test]
    fn modes_map_to_kernel_bits() {
        assert_eq!(UffdMode::Missing.register_mode(), 1);
        assert_eq!(UffdMode::WpAsync.register_mode(), 2);
        assert_eq!(UffdMode::MissingWpAsync.register_mode(), 3);
        assert_eq!(UffdMode::Missing.api_features(), 0);
        assert_eq!(UffdMode::WpAsync.api_features(), 0xb400);
        assert_eq!(UffdMode::MissingWpAsync.api_features(), 0xb000);
        for m in UffdMode::ALL {
            assert_eq!(UffdMode::from_env_value(m.env_value().as_bytes()), Some(m));
            assert_eq!(UffdMode::from_wire(m as u32), Some(m));
        }
        assert_eq!(UffdMode::from_env_value(b"wp"), None);
        assert_eq!(UffdMode::from_env_value(b""), None);
        assert_eq!(UffdMode::from_wire(0), None);
        assert_eq!(UffdMode::from_wire(4), None);
    }

    fn parse_with(edit: impl FnOnce(&mut [u8; REGISTRATION_LEN])) -> RegistrationError {
        let mut b = encoded();
        edit(&mut b);
        UffdRegistration::parse(&b).unwrap_err()
    }

    #[test]
    fn refuses_malformed_messages() {
        let b = encoded();
        assert_eq!(
            UffdRegistration::parse(&b[..319]).unwrap_err(),
            RegistrationError::Length {
                got: 319,
                expected: 320
            }
        );
        let mut long = b.to_vec();
        long.push(0);
        assert!(matches!(
            UffdRegistration::parse(&long),
            Err(RegistrationError::Length { got: 321, .. })
        ));
        assert_eq!(
            parse_with(|b| b[7] = b'2'),
            RegistrationError::BadMagic {
                found: u64::from_le_bytes(*b"WMUFFD02")
            }
        );
        assert_eq!(
            parse_with(|b| b[8] = 2),
            RegistrationError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
        for bad in [0u32, 4, 0xffff_ffff] {
            assert_eq!(
                parse_with(|b| b[12..16].copy_from_slice(&bad.to_le_bytes())),
                RegistrationError::UnknownMode { found: bad }
            );
        }
        assert_eq!(
            parse_with(|b| b[16..20].copy_from_slice(&0i32.to_le_bytes())),
            RegistrationError::BadPid { found: 0 }
        );
        assert_eq!(
            parse_with(|b| b[20] = 1),
            RegistrationError::ReservedNotZero { found: 1 }
        );
        assert_eq!(
            parse_with(|b| b[32..40].fill(0)),
            RegistrationError::ZeroLength
        );
        assert_eq!(
            parse_with(|b| b[24] = 0x10),
            RegistrationError::Unaligned {
                field: "base",
                value: 0x7f00_0000_0010
            }
        );
        assert_eq!(
            parse_with(|b| b[40] = 1),
            RegistrationError::Unaligned {
                field: "file_offset",
                value: 1
            }
        );
        assert_eq!(
            parse_with(|b| b[24..32].copy_from_slice(&(u64::MAX - 4095).to_le_bytes())),
            RegistrationError::RangeOverflow {
                base: u64::MAX - 4095,
                len: 256 << 20
            }
        );
        assert_eq!(
            parse_with(|b| b[64..].fill(b'a')),
            RegistrationError::PathNotTerminated
        );
        assert_eq!(parse_with(|b| b[64] = 0), RegistrationError::EmptyPath);
        assert_eq!(
            parse_with(|b| b[319] = b'x'),
            RegistrationError::PathNotPadded
        );
    }

    #[test]
    fn refuses_unencodable_fields() {
        let long = [b'a'; PATH_LEN];
        assert_eq!(
            RegistrationMsg::new(&fields(&long)).unwrap_err(),
            RegistrationError::PathTooLong { len: 256 }
        );
        // 255 bytes plus the NUL fit exactly.
        let reg = UffdRegistration::parse(
            RegistrationMsg::new(&fields(&long[..255]))
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(reg.path.as_os_str().len(), 255);
        assert_eq!(
            RegistrationMsg::new(&fields(b"/dev/shm/a\0b")).unwrap_err(),
            RegistrationError::PathContainsNul
        );
        assert_eq!(
            RegistrationMsg::new(&fields(b"")).unwrap_err(),
            RegistrationError::EmptyPath
        );
        let mut f = fields(b"/p");
        f.len = 4095;
        assert!(matches!(
            RegistrationMsg::new(&f),
            Err(RegistrationError::Unaligned { field: "len", .. })
        ));
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let e = RegistrationError::BadMagic { found: 1 };
        assert!(e.to_string().contains("WMUFFD01"), "{e}");
        let e = RegistrationError::Unaligned {
            field: "len",
            value: 5,
        };
        assert!(e.to_string().contains("len 0x5"), "{e}");
    }
}
