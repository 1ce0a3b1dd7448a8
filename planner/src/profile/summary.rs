//! The JSON profile summary: the class histogram plus derived figures.
//!
//! ```json
//! { "format": "wanmig-profile-summary", "version": 1,
//!   "samples": 60, "interval_s": 1.0, "page_size": 4096, "chunk_size": 65536,
//!   "page_count": 1048576, "chunk_count": 524288, "state_bytes": 1048576,
//!   "pages": [ { "r": 0, "w": 0, "o": 0, "zero": true, "count": 600000 }, ... ],
//!   "chunks": [ ... ],
//!   "stats": { ... derived, ignored when read back ... } }
//! ```
//!
//! The planner plans from a summary exactly as from the binary profile (the
//! model only needs classes); what a summary cannot give is the address
//! cutoff inside the boundary class of a pre-copy rule (see
//! [`crate::rule::PrecopyRule`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Kind;
use super::classes::{ClassProfile, ClassProfileError};
use crate::model::rates::RateTable;

/// The `format` tag of a summary.
pub const SUMMARY_FORMAT: &str = "wanmig-profile-summary";
/// The summary version written and read.
pub const SUMMARY_VERSION: u32 = 1;

/// Derived figures (written for people; ignored when reading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryStats {
    /// Memory size in bytes.
    pub memory_bytes: u64,
    /// Storage size in bytes.
    pub storage_bytes: u64,
    /// Number of page classes.
    pub page_classes: usize,
    /// Number of chunk classes.
    pub chunk_classes: usize,
    /// Pages zero or never populated.
    pub zero_pages: u64,
    /// Chunks zero or never populated (holes).
    pub zero_chunks: u64,
    /// Pages written at least once.
    pub written_pages: u64,
    /// Chunks written at least once.
    pub written_chunks: u64,
    /// Expected bytes/s of newly dirtied pages if all memory were clean:
    /// `sum count * page_size * lambda_w` (an upper bound on the dirty rate).
    pub page_dirty_bytes_per_s: f64,
    /// The same for storage.
    pub chunk_dirty_bytes_per_s: f64,
}

/// A summary document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Always [`SUMMARY_FORMAT`].
    pub format: String,
    /// Always [`SUMMARY_VERSION`].
    pub version: u32,
    /// The classes and header figures.
    #[serde(flatten)]
    pub profile: ClassProfile,
    /// Derived figures.
    pub stats: SummaryStats,
}

/// Why a summary could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SummaryError {
    /// File I/O failed.
    #[error("{path}: cannot read or write the summary")]
    Io {
        /// The summary path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not valid JSON or missing fields.
    #[error("{path}: invalid summary JSON at line {line}, column {column}")]
    Json {
        /// The summary path.
        path: PathBuf,
        /// Line of the error.
        line: usize,
        /// Column of the error.
        column: usize,
        /// The parser's message.
        source: serde_json::Error,
    },
    /// The `format` tag is not a profile summary.
    #[error("{path}: format {found:?}, expected {SUMMARY_FORMAT:?}")]
    WrongFormat {
        /// The summary path.
        path: PathBuf,
        /// Tag found.
        found: String,
    },
    /// A summary version this build does not read.
    #[error("{path}: summary version {found}, this build reads {SUMMARY_VERSION}")]
    UnsupportedVersion {
        /// The summary path.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// The classes break an invariant.
    #[error("{path}: invalid summary")]
    Invalid {
        /// The summary path.
        path: PathBuf,
        /// What is wrong.
        source: ClassProfileError,
    },
}

impl Summary {
    /// Validates a class profile, wraps it and computes the derived figures.
    pub fn new(profile: ClassProfile) -> Result<Summary, ClassProfileError> {
        profile.validate()?;
        let rates = RateTable::new(profile.samples);
        let tau = profile.interval_s;
        let mut stats = SummaryStats {
            memory_bytes: profile.page_count.saturating_mul(profile.page_size),
            storage_bytes: profile.chunk_count.saturating_mul(profile.chunk_size),
            page_classes: profile.pages.len(),
            chunk_classes: profile.chunks.len(),
            zero_pages: 0,
            zero_chunks: 0,
            written_pages: 0,
            written_chunks: 0,
            page_dirty_bytes_per_s: 0.0,
            chunk_dirty_bytes_per_s: 0.0,
        };
        for kind in [Kind::Page, Kind::Chunk] {
            let size = profile.unit_size(kind) as f64;
            for c in profile.classes(kind) {
                let (zero, written, rate) = match kind {
                    Kind::Page => (
                        &mut stats.zero_pages,
                        &mut stats.written_pages,
                        &mut stats.page_dirty_bytes_per_s,
                    ),
                    Kind::Chunk => (
                        &mut stats.zero_chunks,
                        &mut stats.written_chunks,
                        &mut stats.chunk_dirty_bytes_per_s,
                    ),
                };
                let overflow = || ClassProfileError::CountOverflow { kind };
                if c.key.zero {
                    *zero = zero.checked_add(c.count).ok_or_else(overflow)?;
                }
                if c.key.w > 0 {
                    *written = written.checked_add(c.count).ok_or_else(overflow)?;
                }
                *rate += c.count as f64 * size * rates.ell(c.key.w) / tau;
            }
        }
        Ok(Summary {
            format: SUMMARY_FORMAT.to_string(),
            version: SUMMARY_VERSION,
            profile,
            stats,
        })
    }

    /// Writes the summary as pretty JSON.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), SummaryError> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(self).expect("summaries always serialize");
        std::fs::write(path, text + "\n").map_err(|source| SummaryError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses and validates a summary from text.
    pub fn parse(path: &Path, text: &str) -> Result<Summary, SummaryError> {
        let path = path.to_path_buf();
        // The tag and version are checked first so a wrong file gets a clear
        // message rather than a missing-field error.
        #[derive(Deserialize)]
        struct Tag {
            format: String,
            version: u32,
        }
        let json = |source: serde_json::Error| SummaryError::Json {
            path: path.clone(),
            line: source.line(),
            column: source.column(),
            source,
        };
        let tag: Tag = serde_json::from_str(text).map_err(json)?;
        if tag.format != SUMMARY_FORMAT {
            return Err(SummaryError::WrongFormat {
                path,
                found: tag.format,
            });
        }
        if tag.version != SUMMARY_VERSION {
            return Err(SummaryError::UnsupportedVersion {
                path,
                found: tag.version,
            });
        }
        let s: Summary = serde_json::from_str(text).map_err(json)?;
        Summary::new(s.profile).map_err(|source| SummaryError::Invalid { path, source })
    }

    /// Reads and validates a summary file.
    pub fn read(path: impl AsRef<Path>) -> Result<Summary, SummaryError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SummaryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Summary::parse(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::UnitCounters;

    fn sample() -> ClassProfile {
        ClassProfile::from_units(
            10,
            1.0,
            4096,
            65536,
            1000,
            &[
                UnitCounters::rw(1, 2),
                UnitCounters::rw(1, 2),
                UnitCounters::ZERO,
            ],
            &[UnitCounters {
                r: 0,
                w: 4,
                o: 4,
                zero: false,
            }],
        )
    }

    #[test]
    fn round_trip() {
        let s = Summary::new(sample()).unwrap();
        let text = serde_json::to_string_pretty(&s).unwrap();
        let back = Summary::parse(Path::new("x.json"), &text).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.stats.zero_pages, 1);
        assert_eq!(back.stats.written_pages, 2);
        assert_eq!(back.stats.written_chunks, 1);
    }

    #[test]
    fn errors_are_typed() {
        let p = Path::new("s.json");
        let good = serde_json::to_value(Summary::new(sample()).unwrap()).unwrap();
        assert!(matches!(
            Summary::parse(p, "{ \"format\": "),
            Err(SummaryError::Json { line: 1, .. })
        ));
        let mut v = good.clone();
        v["format"] = "something-else".into();
        assert!(matches!(
            Summary::parse(p, &v.to_string()),
            Err(SummaryError::WrongFormat { .. })
        ));
        let mut v = good.clone();
        v["version"] = 9.into();
        assert!(matches!(
            Summary::parse(p, &v.to_string()),
            Err(SummaryError::UnsupportedVersion { found: 9, .. })
        ));
        let mut v = good.clone();
        v["page_count"] = 4.into();
        assert!(matches!(
            Summary::parse(p, &v.to_string()),
            Err(SummaryError::Invalid {
                source: ClassProfileError::CountMismatch { .. },
                ..
            })
        ));
        let mut v = good.clone();
        v["chunks"][0]["o"] = 5.into();
        assert!(matches!(
            Summary::parse(p, &v.to_string()),
            Err(SummaryError::Invalid {
                source: ClassProfileError::BadClass { .. },
                ..
            })
        ));
        // Hostile figures: n beyond 65535, counts overflowing 64 bits, a
        // sub-nanosecond interval, a 64-bit page size.
        let mut v = good.clone();
        v["samples"] = 4_000_000_000u64.into();
        assert!(matches!(
            Summary::parse(p, &v.to_string()),
            Err(SummaryError::Invalid {
                source: ClassProfileError::BadField {
                    field: "samples",
                    ..
                },
                ..
            })
        ));
        let mut v = good.clone();
        v["pages"][0]["count"] = u64::MAX.into();
        v["page_count"] = u64::MAX.into();
        assert!(matches!(
            Summary::parse(p, &v.to_string()),
            Err(SummaryError::Invalid {
                source: ClassProfileError::CountOverflow { .. },
                ..
            })
        ));
        let mut v = good.clone();
        v["interval_s"] = 5e-324.into();
        assert!(matches!(
            Summary::parse(p, &v.to_string()),
            Err(SummaryError::Invalid {
                source: ClassProfileError::BadField {
                    field: "interval_s",
                    ..
                },
                ..
            })
        ));
        let mut v = good.clone();
        v["page_size"] = u64::MAX.into();
        assert!(matches!(
            Summary::parse(p, &v.to_string()),
            Err(SummaryError::Invalid {
                source: ClassProfileError::BadField {
                    field: "page_size",
                    ..
                },
                ..
            })
        ));
        let mut v = good;
        v["pages"].as_array_mut().unwrap().reverse();
        assert!(matches!(
            Summary::parse(p, &v.to_string()),
            Err(SummaryError::Invalid {
                source: ClassProfileError::Unsorted { .. },
                ..
            })
        ));
    }
}
