//! Which 4 KiB blocks of a destination disk image are here, kept durable
//! alongside the image.
//!
//! A block goes `Absent` → `Requested` (a fetch of its chunk is out) →
//! `Present` (its bytes are in the image: fetched, pushed, or written by the
//! guest), and never back once the guest runs; before that, a pre-copied
//! block goes back to `Absent` when the source's freeze leaves its chunk to
//! post-copy ([`BlockPresence::set_absent`]). The states live in memory; [`BlockPresence::persist`]
//! writes the bitmap pages that changed since the last call to the presence
//! file and syncs it (called on every `FLUSH` and `FUA`, after the image is
//! synced), so that an engine restarted on the same files knows which blocks
//! the guest has written and never overwrites them with older data.
//!
//! Presence file: a 4 KiB header (`b"WMPRES01"`, block size, block count,
//! little-endian), then one bit per block (bit `b % 8` of byte `b / 8`).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

/// The unit of presence: the seed's storage "page".
pub const BLOCK: u64 = 4096;
const MAGIC: &[u8; 8] = b"WMPRES01";
const HEADER: u64 = 4096;
/// Bitmap bytes per persisted page (one page covers 32768 blocks).
const BITMAP_PAGE: usize = 4096;

/// A block's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    /// Not here, nobody asked.
    Absent = 0,
    /// A fetch of its chunk is out.
    Requested = 1,
    /// Its bytes are in the image.
    Present = 2,
}

/// The presence file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// Reading or writing it failed.
    #[error("presence file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// It belongs to another image shape, or is not a presence file.
    #[error("presence file {path}: {what}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Per-block presence of a disk image.
#[derive(Debug)]
pub struct BlockPresence {
    states: Vec<AtomicU8>,
    file: File,
    path: PathBuf,
    /// Bitmap pages changed since the last persist.
    dirty: Mutex<BTreeSet<usize>>,
}

impl BlockPresence {
    /// Creates a presence file at `path` for `blocks` blocks, all absent
    /// (an existing file is replaced).
    pub fn create(path: &Path, blocks: u64) -> Result<Self, PresenceError> {
        let io = |source| PresenceError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        let mut h = vec![0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        h[12..20].copy_from_slice(&blocks.to_le_bytes());
        file.write_all_at(&h, 0).map_err(io)?;
        file.set_len(HEADER + blocks.div_ceil(8)).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(BlockPresence {
            states: (0..blocks).map(|_| AtomicU8::new(0)).collect(),
            file,
            path: path.to_path_buf(),
            dirty: Mutex::default(),
        })
    }

    /// Opens the presence file an earlier engine left for `blocks` blocks:
    /// the blocks it recorded are present, the others absent.
    pub fn open(path: &Path, blocks: u64) -> Result<Self, PresenceError> {
        let io = |source| PresenceError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mismatch = |what: String| PresenceError::Mismatch {
            path: path.to_path_buf(),
            what,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let mut h = vec![0u8; 20];
        file.read_exact_at(&mut h, 0).map_err(io)?;
        if &h[..8] != MAGIC {
            return Err(mismatch("not a presence file".into()));
        }
        let bs = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let n = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
        if u64::from(bs) != BLOCK || n != blocks {
            return Err(mismatch(format!(
                "{n} blocks of {bs} bytes, the image has {blocks} of {BLOCK}"
            )));
        }
        let mut bits = vec![0u8; blocks.div_ceil(8) as usize];
        file.read_exact_at(&mut bits, HEADER).map_err(io)?;
        let states = (0..blocks)
            .map(|b| {
                let present = bits[(b / 8) as usize] & (1 << (b % 8)) != 0;
                AtomicU8::new(if present {
                    BlockState::Present as u8
                } else {
                    0
                })
            })
            .collect();
        Ok(BlockPresence {
            states,
            file,
            path: path.to_path_buf(),
            dirty: Mutex::default(),
        })
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.states.len() as u64
    }

    /// Block `b`'s state.
    pub fn get(&self, b: u64) -> BlockState {
        match self.states[b as usize].load(Ordering::Acquire) {
            0 => BlockState::Absent,
            1 => BlockState::Requested,
            _ => BlockState::Present,
        }
    }

    /// `Absent` → `Requested`; true if this call made the change.
    pub fn request(&self, b: u64) -> bool {
        self.states[b as usize]
            .compare_exchange(
                BlockState::Absent as u8,
                BlockState::Requested as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Marks `b` present (its bytes are in the image); true if it was not.
    pub fn set_present(&self, b: u64) -> bool {
        self.set_state(b, BlockState::Present) != BlockState::Present as u8
    }

    /// Marks `b` absent again (before the guest runs: the source's copy
    /// here went stale and the chunk is post-copied); true if it was present.
    pub fn set_absent(&self, b: u64) -> bool {
        self.set_state(b, BlockState::Absent) == BlockState::Present as u8
    }

    /// Sets `b` to `state`, marking its bitmap page for the next save if the
    /// state changed; returns the state it had.
    fn set_state(&self, b: u64, state: BlockState) -> u8 {
        let was = self.states[b as usize].swap(state as u8, Ordering::AcqRel);
        if was != state as u8 {
            self.dirty
                .lock()
                .expect("presence lock")
                .insert(b as usize / 8 / BITMAP_PAGE);
        }
        was
    }

    /// Blocks not present.
    pub fn missing(&self) -> u64 {
        self.states
            .iter()
            .filter(|s| s.load(Ordering::Acquire) != BlockState::Present as u8)
            .count() as u64
    }

    /// Writes the bitmap pages changed since the last call and syncs the
    /// file. Call after the image itself is synced.
    pub fn persist(&self) -> Result<(), PresenceError> {
        let pages = std::mem::take(&mut *self.dirty.lock().expect("presence lock"));
        if pages.is_empty() {
            return Ok(());
        }
        let io = |source| PresenceError::Io {
            path: self.path.clone(),
            source,
        };
        let total = self.states.len().div_ceil(8);
        let mut bytes = vec![0u8; BITMAP_PAGE];
        for &p in &pages {
            let first = p * BITMAP_PAGE;
            let n = (total - first).min(BITMAP_PAGE);
            for (i, byte) in bytes[..n].iter_mut().enumerate() {
                let mut v = 0u8;
                for bit in 0..8 {
                    let b = (first + i) * 8 + bit;
                    if b < self.states.len()
                        && self.states[b].load(Ordering::Acquire) == BlockState::Present as u8
                    {
                        v |= 1 << bit;
                    }
                }
                *byte = v;
            }
            if let Err(e) = self.file.write_all_at(&bytes[..n], HEADER + first as u64) {
                // Keep what was not written for the next call.
                self.dirty.lock().expect("presence lock").extend(pages);
                return Err(io(e));
            }
        }
        if let Err(e) = self.file.sync_data() {
            self.dirty.lock().expect("presence lock").extend(pages);
            return Err(io(e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("wanmig-presence-{tag}-{}", std::process::id()))
    }

    #[test]
    fn states_only_go_forward_and_survive_a_reopen_once_persisted() {
        let p = path("reopen");
        let blocks = 100_000; // more than one bitmap page
        let pr = BlockPresence::create(&p, blocks).unwrap();
        assert_eq!(pr.missing(), blocks);
        assert!(pr.request(5));
        assert!(!pr.request(5), "already requested");
        assert!(pr.set_present(5));
        assert!(!pr.request(5), "present stays present");
        assert_eq!(pr.get(5), BlockState::Present);
        assert!(pr.set_present(99_999));
        assert!(pr.set_present(40_000));
        pr.persist().unwrap();
        // Not persisted: lost with the engine, like an unflushed write.
        assert!(pr.set_present(7));
        drop(pr);

        let pr = BlockPresence::open(&p, blocks).unwrap();
        for b in [5, 40_000, 99_999] {
            assert_eq!(pr.get(b), BlockState::Present, "block {b}");
        }
        assert_eq!(pr.get(7), BlockState::Absent);
        assert_eq!(pr.missing(), blocks - 3);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_block_dropped_before_the_resume_is_absent_again_and_stays_so() {
        let p = path("absent");
        let pr = BlockPresence::create(&p, 70_000).unwrap();
        for b in [3, 4, 65_000] {
            assert!(pr.set_present(b));
        }
        pr.persist().unwrap();
        // The freeze left the chunk of blocks 3 and 4 to post-copy.
        assert!(pr.set_absent(3));
        assert!(pr.set_absent(4));
        assert!(!pr.set_absent(5), "it was not present");
        assert_eq!(pr.get(3), BlockState::Absent);
        assert_eq!(pr.missing(), 70_000 - 1);
        assert!(pr.request(3), "a fetch may go out for it");
        pr.persist().unwrap();
        drop(pr);
        let pr = BlockPresence::open(&p, 70_000).unwrap();
        assert_eq!(pr.get(3), BlockState::Absent);
        assert_eq!(pr.get(4), BlockState::Absent);
        assert_eq!(pr.get(65_000), BlockState::Present);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_presence_file_for_another_shape_or_no_presence_file_is_refused() {
        let p = path("shape");
        drop(BlockPresence::create(&p, 64).unwrap());
        let e = BlockPresence::open(&p, 65).unwrap_err();
        assert!(e.to_string().contains("64 blocks"), "{e}");
        std::fs::write(&p, b"hello world, not a presence file").unwrap();
        let e = BlockPresence::open(&p, 64).unwrap_err();
        assert!(matches!(e, PresenceError::Mismatch { .. }), "{e}");
        let _ = std::fs::remove_file(&p);
    }
}
