//! The pre-shared key both engines prove knowledge of, its key file, the
//! migration id, and the kernel random source they are drawn from.
//!
//! Key file format: the key as hex text (64..=128 hex digits, i.e. 32..=64
//! bytes), surrounding whitespace ignored. The file must not be readable or
//! writable by group or others (`chmod 600`); [`PskKey::write_new`] creates it so.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Shortest accepted key in bytes.
pub const MIN_KEY_LEN: usize = 32;
/// Longest accepted key in bytes (the SHA-256 block size).
pub const MAX_KEY_LEN: usize = 64;
/// Key files larger than this are refused without being read.
const MAX_KEY_FILE: u64 = 4096;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`), retrying on EINTR
/// and short reads.
pub(crate) fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        // SAFETY: `rest` is a live, exclusively borrowed buffer of exactly
        // `rest.len()` writable bytes; getrandom writes at most that many bytes
        // into it and keeps no pointer after returning.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled = filled.saturating_add(n),
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// Random bytes; panics only if getrandom(2) is missing (Linux < 3.17).
fn random_array<const N: usize>() -> [u8; N] {
    let mut out = [0; N];
    if let Err(e) = fill_random(&mut out) {
        panic!("getrandom(2) failed: {e}");
    }
    out
}

/// The pre-shared key (32..=64 bytes). Its `Debug` never shows the key.
#[derive(Clone)]
pub struct PskKey {
    /// The key zero-padded to the HMAC block size (HMAC pads keys the same way).
    padded: [u8; MAX_KEY_LEN],
    len: usize,
}

/// Why a key could not be built, loaded or stored.
#[derive(Debug, Error)]
pub enum KeyError {
    /// A key of the wrong length in bytes.
    #[error("key of {len} bytes (allowed {MIN_KEY_LEN}..={MAX_KEY_LEN})")]
    BadLength {
        /// Length given.
        len: usize,
    },
    /// The key file could not be opened, inspected or read.
    #[error("cannot read key file {}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The key file is not a regular file.
    #[error("key file {} is not a regular file", path.display())]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
    /// Group or others may read or write the key file.
    #[error("key file {} has mode {mode:04o}: group/other access must be off (chmod 600)", path.display())]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is suspiciously large.
    #[error("key file {} is {size} bytes, far more than a key", path.display())]
    FileTooLarge {
        /// The key file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A character that is not a hex digit (the character itself is not shown).
    #[error("key file {} is not hex: bad character at offset {offset}", path.display())]
    NotHex {
        /// The key file.
        path: PathBuf,
        /// Offset in the trimmed text.
        offset: usize,
    },
    /// An odd number of hex digits.
    #[error("key file {} has an odd number of hex digits ({digits})", path.display())]
    OddDigits {
        /// The key file.
        path: PathBuf,
        /// Digits found.
        digits: usize,
    },
    /// Fewer than 64 or more than 128 hex digits.
    #[error("key file {} has {digits} hex digits (allowed {}..={})", path.display(), 2 * MIN_KEY_LEN, 2 * MAX_KEY_LEN)]
    WrongDigitCount {
        /// The key file.
        path: PathBuf,
        /// Digits found.
        digits: usize,
    },
    /// The key file could not be created (it may already exist) or written.
    #[error("cannot write new key file {}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

impl PskKey {
    /// A key from raw bytes (32..=64 of them).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let len = bytes.len();
        if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&len) {
            return Err(KeyError::BadLength { len });
        }
        let mut padded = [0; MAX_KEY_LEN];
        if let Some(dst) = padded.get_mut(..len) {
            dst.copy_from_slice(bytes);
        }
        Ok(Self { padded, len })
    }

    /// A fresh random 32-byte key.
    ///
    /// # Panics
    /// If `getrandom(2)` is unavailable (Linux older than 3.17).
    pub fn generate() -> Self {
        let mut padded = [0; MAX_KEY_LEN];
        let random: [u8; MIN_KEY_LEN] = random_array();
        if let Some(dst) = padded.get_mut(..MIN_KEY_LEN) {
            dst.copy_from_slice(&random);
        }
        Self {
            padded,
            len: MIN_KEY_LEN,
        }
    }

    /// Key length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (keys have at least [`MIN_KEY_LEN`] bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key bytes.
    fn bytes(&self) -> &[u8] {
        self.padded.get(..self.len).unwrap_or(&[])
    }

    /// An HMAC-SHA256 instance keyed with this key.
    pub(crate) fn mac(&self) -> HmacSha256 {
        <HmacSha256 as hmac::digest::KeyInit>::new(&self.padded.into())
    }

    /// A short, non-secret identifier of the key (16 hex digits of an HMAC of a
    /// fixed label) for logs: equal keys have equal fingerprints.
    pub fn fingerprint(&self) -> String {
        let mut mac = self.mac();
        mac.update(b"wanmig-v1 fingerprint");
        let tag = mac.finalize().into_bytes();
        hex(tag.get(..8).unwrap_or(&[]))
    }

    /// Loads a key file, refusing one that group or others can access.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let read_err = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        // O_NONBLOCK: opening a FIFO planted at the key path must not hang
        // (it has no effect on the regular file we go on to read).
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_KEY_FILE {
            return Err(KeyError::FileTooLarge {
                path: path.to_owned(),
                size: meta.len(),
            });
        }
        let mut text = Vec::new();
        Read::by_ref(&mut file)
            .take(MAX_KEY_FILE)
            .read_to_end(&mut text)
            .map_err(read_err)?;
        let key = Self::parse_hex(path, &text);
        text.fill(0);
        key
    }

    fn parse_hex(path: &Path, text: &[u8]) -> Result<Self, KeyError> {
        let text = text.trim_ascii();
        if let Some(offset) = text.iter().position(|b| !b.is_ascii_hexdigit()) {
            return Err(KeyError::NotHex {
                path: path.to_owned(),
                offset,
            });
        }
        let digits = text.len();
        if digits % 2 != 0 {
            return Err(KeyError::OddDigits {
                path: path.to_owned(),
                digits,
            });
        }
        if !(2 * MIN_KEY_LEN..=2 * MAX_KEY_LEN).contains(&digits) {
            return Err(KeyError::WrongDigitCount {
                path: path.to_owned(),
                digits,
            });
        }
        let mut padded = [0; MAX_KEY_LEN];
        for (dst, pair) in padded.iter_mut().zip(text.chunks_exact(2)) {
            *dst = pair.iter().fold(0u8, |acc, &c| (acc << 4) | hex_value(c));
        }
        Ok(Self {
            padded,
            len: digits / 2,
        })
    }

    /// Writes the key to a new file (created with `O_EXCL`, mode 0600); fails
    /// if the file already exists.
    pub fn write_new(&self, path: impl AsRef<Path>) -> Result<(), KeyError> {
        let path = path.as_ref();
        let write_err = |source| KeyError::Write {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_err)?;
        let mut text = hex(self.bytes()).into_bytes();
        text.push(b'\n');
        let written = file
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(&text))
            .and_then(|()| file.sync_all());
        text.fill(0);
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(write_err(e));
        }
        Ok(())
    }
}

impl Drop for PskKey {
    fn drop(&mut self) {
        self.padded.fill(0);
        std::hint::black_box(&mut self.padded);
    }
}

impl fmt::Debug for PskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskKey")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

fn hex_value(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        for nibble in [b >> 4, b & 0xf] {
            s.push(char::from(
                DIGITS.get(usize::from(nibble)).copied().unwrap_or(b'0'),
            ));
        }
    }
    s
}

/// Identifies one migration; both connections of it carry the same id.
/// Shown and parsed as 32 hex digits.
#[repr(transparent)]
#[derive(
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct MigrationId(pub [u8; 16]);

impl MigrationId {
    /// A fresh random id.
    ///
    /// # Panics
    /// If `getrandom(2)` is unavailable (Linux older than 3.17).
    pub fn random() -> Self {
        Self(random_array())
    }
}

impl From<[u8; 16]> for MigrationId {
    fn from(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({self})")
    }
}

/// Why a string is not a [`MigrationId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ParseMigrationIdError {
    /// Not 32 characters.
    #[error("migration id must be 32 hex digits, got {len} characters")]
    BadLength {
        /// Characters (bytes) given.
        len: usize,
    },
    /// A character that is not a hex digit.
    #[error("migration id has a non-hex character at offset {offset}")]
    NotHex {
        /// Offset of the first bad character.
        offset: usize,
    },
}

impl FromStr for MigrationId {
    type Err = ParseMigrationIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.as_bytes();
        if let Some(offset) = text.iter().position(|b| !b.is_ascii_hexdigit()) {
            return Err(ParseMigrationIdError::NotHex { offset });
        }
        if text.len() != 32 {
            return Err(ParseMigrationIdError::BadLength { len: text.len() });
        }
        let mut id = [0u8; 16];
        for (dst, pair) in id.iter_mut().zip(text.chunks_exact(2)) {
            *dst = pair.iter().fold(0u8, |acc, &c| (acc << 4) | hex_value(c));
        }
        Ok(Self(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh path in the temp dir, removed when dropped.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(name: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir()
                .join(format!("wanmig-key-test-{}-{n}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&p);
            Self(p)
        }

        fn write(&self, content: &[u8], mode: u32) {
            std::fs::write(&self.0, content).unwrap();
            std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn write_new_then_load_round_trips() {
        let tmp = TempPath::new("roundtrip");
        let key = PskKey::generate();
        key.write_new(&tmp.0).unwrap();
        let meta = std::fs::metadata(&tmp.0).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let loaded = PskKey::load(&tmp.0).unwrap();
        assert_eq!(loaded.bytes(), key.bytes());
        assert_eq!(loaded.fingerprint(), key.fingerprint());
        assert_eq!(loaded.len(), 32);
    }

    #[test]
    fn write_new_refuses_existing_file() {
        let tmp = TempPath::new("exists");
        tmp.write(b"old", 0o600);
        let err = PskKey::generate().write_new(&tmp.0).unwrap_err();
        match err {
            KeyError::Write { path, source } => {
                assert_eq!(path, tmp.0);
                assert_eq!(source.kind(), io::ErrorKind::AlreadyExists);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&tmp.0).unwrap(), b"old");
    }

    #[test]
    fn load_accepts_whitespace_and_64_byte_keys() {
        let tmp = TempPath::new("ws");
        let hexkey = "AbCd".repeat(32); // 128 digits, 64 bytes
        tmp.write(format!("  \n{hexkey}\r\n\t").as_bytes(), 0o400);
        let key = PskKey::load(&tmp.0).unwrap();
        assert_eq!(key.len(), 64);
        assert_eq!(key.bytes(), [0xab, 0xcd].repeat(32).as_slice());
    }

    #[test]
    fn load_refuses_group_or_other_access() {
        for mode in [0o640, 0o604, 0o620, 0o602, 0o644, 0o666, 0o610] {
            let tmp = TempPath::new("perm");
            tmp.write("ab".repeat(32).as_bytes(), mode);
            match PskKey::load(&tmp.0).unwrap_err() {
                KeyError::InsecurePermissions { path, mode: got } => {
                    assert_eq!(path, tmp.0);
                    assert_eq!(got, mode);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn load_refuses_bad_content() {
        let tmp = TempPath::new("content");
        tmp.write(format!("{}xyz", "ab".repeat(32)).as_bytes(), 0o600);
        assert!(matches!(
            PskKey::load(&tmp.0),
            Err(KeyError::NotHex { offset: 64, .. })
        ));
        tmp.write("ab cd".as_bytes(), 0o600);
        assert!(matches!(
            PskKey::load(&tmp.0),
            Err(KeyError::NotHex { offset: 2, .. })
        ));
        tmp.write(format!("{}a", "ab".repeat(32)).as_bytes(), 0o600);
        assert!(matches!(
            PskKey::load(&tmp.0),
            Err(KeyError::OddDigits { digits: 65, .. })
        ));
        tmp.write("ab".repeat(31).as_bytes(), 0o600);
        assert!(matches!(
            PskKey::load(&tmp.0),
            Err(KeyError::WrongDigitCount { digits: 62, .. })
        ));
        tmp.write("ab".repeat(65).as_bytes(), 0o600);
        assert!(matches!(
            PskKey::load(&tmp.0),
            Err(KeyError::WrongDigitCount { digits: 130, .. })
        ));
        tmp.write(b"", 0o600);
        assert!(matches!(
            PskKey::load(&tmp.0),
            Err(KeyError::WrongDigitCount { digits: 0, .. })
        ));
        tmp.write(&[b'a'; 5000], 0o600);
        assert!(matches!(
            PskKey::load(&tmp.0),
            Err(KeyError::FileTooLarge { size: 5000, .. })
        ));
    }

    #[test]
    fn load_errors_on_missing_file_and_directory() {
        let tmp = TempPath::new("missing");
        match PskKey::load(&tmp.0).unwrap_err() {
            KeyError::Read { path, source } => {
                assert_eq!(path, tmp.0);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        let dir = std::env::temp_dir();
        assert!(matches!(
            PskKey::load(&dir),
            Err(KeyError::NotAFile { .. }) | Err(KeyError::InsecurePermissions { .. })
        ));
    }

    #[test]
    fn not_a_file_variant() {
        let dir = std::env::temp_dir().join(format!("wanmig-key-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = PskKey::load(&dir).unwrap_err();
        let _ = std::fs::remove_dir(&dir);
        assert!(matches!(err, KeyError::NotAFile { path } if path == dir));
        // A FIFO must be refused without blocking on open.
        let fifo = TempPath::new("fifo");
        let made = std::process::Command::new("mkfifo")
            .args(["-m", "600"])
            .arg(&fifo.0)
            .status();
        if made.is_ok_and(|s| s.success()) {
            assert!(matches!(
                PskKey::load(&fifo.0),
                Err(KeyError::NotAFile { .. })
            ));
        }
    }

    #[test]
    fn from_bytes_bounds() {
        for len in [0, 31, 65, 100] {
            assert!(matches!(
                PskKey::from_bytes(&vec![1; len]),
                Err(KeyError::BadLength { len: l }) if l == len
            ));
        }
        for len in [32, 48, 64] {
            assert_eq!(PskKey::from_bytes(&vec![7; len]).unwrap().len(), len);
        }
    }

    #[test]
    fn debug_hides_key_material() {
        let key = PskKey::from_bytes(&[0x5a; 32]).unwrap();
        let s = format!("{key:?}");
        assert!(!s.contains("5a") && !s.contains("90"), "{s}");
        assert!(s.contains("len: 32"));
    }

    #[test]
    fn padded_mac_equals_standard_hmac() {
        for len in [32, 40, 64] {
            let raw: Vec<u8> = (0..len as u8).collect();
            let key = PskKey::from_bytes(&raw).unwrap();
            let mut a = key.mac();
            a.update(b"message");
            let mut b = <HmacSha256 as Mac>::new_from_slice(&raw).unwrap();
            b.update(b"message");
            assert_eq!(a.finalize().into_bytes(), b.finalize().into_bytes());
        }
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(PskKey::generate().bytes(), PskKey::generate().bytes());
        assert_ne!(MigrationId::random(), MigrationId::random());
    }

    #[test]
    fn migration_id_hex() {
        let id = MigrationId([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0, 1, 2, 3, 4, 5, 6, 0xff,
        ]);
        let s = id.to_string();
        assert_eq!(s, "0123456789abcdef00010203040506ff");
        assert_eq!(s.parse::<MigrationId>(), Ok(id));
        assert_eq!(s.to_uppercase().parse::<MigrationId>(), Ok(id));
        assert_eq!(
            "abc".parse::<MigrationId>(),
            Err(ParseMigrationIdError::BadLength { len: 3 })
        );
        assert_eq!(
            "0123456789abcdef00010203040506fg".parse::<MigrationId>(),
            Err(ParseMigrationIdError::NotHex { offset: 31 })
        );
        assert_eq!(format!("{id:?}"), format!("MigrationId({s})"));
    }

    #[test]
    fn fill_random_fills_large_buffers() {
        let mut buf = vec![0u8; 1 << 20];
        fill_random(&mut buf).unwrap();
        assert!(buf.iter().filter(|&&b| b == 0).count() < 8192);
    }
}
