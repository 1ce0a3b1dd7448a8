//! Access profiles: what the planner knows about a guest.
//!
//! - [`format`](mod@format): the versioned binary per-unit profile (`pread` reader,
//!   streaming [`ProfileWriter`] for the engine's profiler).
//! - [`classes`]: class compression into a histogram ([`ClassProfile`]).
//! - [`summary`]: the JSON summary (the class histogram plus derived figures),
//!   which the planner can also plan from.

pub mod classes;
pub mod format;
pub mod summary;

pub use classes::{Class, ClassProfile};
pub use format::{
    AtomicFile, Profile, ProfileFileWriter, ProfileHeader, ProfileReadError, ProfileWriteError,
    ProfileWriter,
};

use serde::{Deserialize, Serialize};

/// Which address space a unit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A guest memory page.
    Page,
    /// A storage chunk.
    Chunk,
}

impl Kind {
    /// `"page"` or `"chunk"`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Page => "page",
            Kind::Chunk => "chunk",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The profile counters of one unit, which are also its class key.
///
/// `r`, `w`: intervals (out of the profile's `n`) with at least one read /
/// write; `o`: intervals whose writes covered whole 4 KiB blocks with no
/// read of them first (storage only, `o <= w`; always 0 for pages); `zero`:
/// the unit was zero or never populated when profiling ended.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub struct UnitCounters {
    /// Intervals with at least one read.
    pub r: u32,
    /// Intervals with at least one write.
    pub w: u32,
    /// Intervals with whole-block overwrites (storage; `o <= w`).
    #[serde(default)]
    pub o: u32,
    /// Zero or never populated at the end of profiling.
    #[serde(default)]
    pub zero: bool,
}

impl UnitCounters {
    /// A populated unit with read and write counters (no overwrites).
    pub const fn rw(r: u32, w: u32) -> Self {
        UnitCounters {
            r,
            w,
            o: 0,
            zero: false,
        }
    }

    /// A zero / never-populated unit that was never touched.
    pub const ZERO: UnitCounters = UnitCounters {
        r: 0,
        w: 0,
        o: 0,
        zero: true,
    };
}

/// A profile loaded for planning: its classes, and the per-unit data when the
/// source was a binary profile (needed to resolve address cutoffs).
#[derive(Debug)]
pub struct LoadedProfile {
    /// The class histogram.
    pub classes: ClassProfile,
    /// The per-unit profile (open, read on demand), if the source was binary.
    pub units: Option<Profile>,
}

/// Why a profile (binary or JSON summary) could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("{path}: cannot read the profile")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A binary profile is malformed.
    #[error(transparent)]
    Binary(#[from] ProfileReadError),
    /// A JSON summary is malformed.
    #[error(transparent)]
    Summary(#[from] summary::SummaryError),
}

/// Loads a binary profile (by its magic) or a JSON summary, and compresses it
/// into classes (the validating pass for a binary profile).
pub fn load(path: impl AsRef<std::path::Path>) -> Result<LoadedProfile, LoadError> {
    use std::io::Read;
    let path = path.as_ref();
    let mut head = [0u8; 8];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let first = head[..n].iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        let s = summary::Summary::read(path)?;
        return Ok(LoadedProfile {
            classes: s.profile,
            units: None,
        });
    }
    let p = Profile::open(path)?;
    let classes = ClassProfile::from_profile(&p)?;
    Ok(LoadedProfile {
        classes,
        units: Some(p),
    })
}
