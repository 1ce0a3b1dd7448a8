//! The hand-off: what a hypervisor toolstack's own migration stream carries
//! in place of the guest's memory (Xen: the body of libxenguest's record
//! `0x13`, written by the patched save side, read by the patched restore
//! side).
//!
//! It names where the source engine listens and which migration it is; the
//! destination engine dials that address twice (bulk, fault) and runs the
//! handshake's server side on each, expecting this migration id and
//! geometry, so the record itself needs no secret: a forged one gets a
//! connection that fails the handshake.
//!
//! | offset | size | field          | contents                                  |
//! |-------:|-----:|----------------|-------------------------------------------|
//! | 0      | 8    | magic          | `b"WMHANDOF"`                             |
//! | 8      | 2    | version        | [`HANDOFF_VERSION`]                       |
//! | 10     | 2    | port           | the source engine's TCP port (not 0)      |
//! | 12     | 2    | host_len       | bytes of `host` (1..=[`MAX_HANDOFF_HOST`])|
//! | 14     | 2    | reserved       | 0                                         |
//! | 16     | 16   | migration id   | [`MigrationId`]                           |
//! | 32     | 32   | geometry       | [`Geometry`] (as in `Hello`)              |
//! | 64     | n    | host           | UTF-8 host name or address, no NUL        |
//!
//! All integers little-endian; nothing may follow `host`.

use std::fmt;

use thiserror::Error;
use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::geometry::{Geometry, GeometryError};
use super::key::MigrationId;

/// The hand-off's magic.
pub const HANDOFF_MAGIC: [u8; 8] = *b"WMHANDOF";
/// The hand-off format this build writes and reads.
pub const HANDOFF_VERSION: u16 = 1;
/// Longest host name or address in a hand-off.
pub const MAX_HANDOFF_HOST: usize = 255;
/// Longest hand-off.
pub const MAX_HANDOFF_LEN: usize = HANDOFF_FIXED + MAX_HANDOFF_HOST;
const HANDOFF_FIXED: usize = 64;

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct Fixed {
    magic: [u8; 8],
    version: U16,
    port: U16,
    host_len: U16,
    reserved: U16,
    migration_id: [u8; 16],
    geometry: Geometry,
}

const _: () = assert!(core::mem::size_of::<Fixed>() == HANDOFF_FIXED);

/// Where and what the destination engine connects to.
#[derive(Clone, PartialEq, Eq)]
pub struct Handoff {
    /// The migration (the handshake must carry it).
    pub migration_id: MigrationId,
    /// The guest's shape (the handshake must carry it).
    pub geometry: Geometry,
    /// The source engine's host name or address.
    pub host: String,
    /// Its port.
    pub port: u16,
}

impl fmt::Debug for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handoff")
            .field("migration_id", &self.migration_id.to_string())
            .field("geometry", &self.geometry)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish()
    }
}

/// Why a hand-off was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandoffError {
    /// Shorter than the fixed part.
    #[error("hand-off of {len} bytes is shorter than its {HANDOFF_FIXED}-byte header")]
    Short {
        /// Its length.
        len: usize,
    },
    /// Not a hand-off.
    #[error("not a wanmig hand-off (magic {found:02x?})")]
    Magic {
        /// The first bytes found.
        found: [u8; 8],
    },
    /// A format this build does not know.
    #[error("hand-off version {found}, this build reads version {HANDOFF_VERSION}")]
    Version {
        /// The version found.
        found: u16,
    },
    /// The length does not match the host length.
    #[error("hand-off of {len} bytes for a {host_len}-byte host (expected {expected})")]
    Length {
        /// Its length.
        len: usize,
        /// The host length it claims.
        host_len: usize,
        /// The length that host length implies.
        expected: usize,
    },
    /// A field out of range.
    #[error("hand-off field {field}: {why}")]
    Field {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The geometry is not one an engine accepts.
    #[error("hand-off geometry")]
    Geometry(#[from] GeometryError),
}

impl Handoff {
    /// The encoded hand-off; fails if `host` is empty, too long, or holds a
    /// NUL, or the port is 0.
    pub fn encode(&self) -> Result<Vec<u8>, HandoffError> {
        check_host(&self.host)?;
        if self.port == 0 {
            return Err(HandoffError::Field {
                field: "port",
                why: "0".into(),
            });
        }
        self.geometry.validate()?;
        let fixed = Fixed {
            magic: HANDOFF_MAGIC,
            version: U16::new(HANDOFF_VERSION),
            port: U16::new(self.port),
            host_len: U16::new(self.host.len() as u16),
            reserved: U16::new(0),
            migration_id: self.migration_id.0,
            geometry: self.geometry,
        };
        let mut out = Vec::with_capacity(HANDOFF_FIXED + self.host.len());
        out.extend_from_slice(fixed.as_bytes());
        out.extend_from_slice(self.host.as_bytes());
        Ok(out)
    }

    /// Decodes and checks every field of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, HandoffError> {
        let (fixed, host) =
            Fixed::ref_from_prefix(bytes).map_err(|_| HandoffError::Short { len: bytes.len() })?;
        if fixed.magic != HANDOFF_MAGIC {
            return Err(HandoffError::Magic { found: fixed.magic });
        }
        if fixed.version.get() != HANDOFF_VERSION {
            return Err(HandoffError::Version {
                found: fixed.version.get(),
            });
        }
        let host_len = usize::from(fixed.host_len.get());
        if host.len() != host_len {
            return Err(HandoffError::Length {
                len: bytes.len(),
                host_len,
                expected: HANDOFF_FIXED + host_len,
            });
        }
        if fixed.reserved.get() != 0 {
            return Err(HandoffError::Field {
                field: "reserved",
                why: format!("{:#x}, not 0", fixed.reserved.get()),
            });
        }
        let port = fixed.port.get();
        if port == 0 {
            return Err(HandoffError::Field {
                field: "port",
                why: "0".into(),
            });
        }
        let host = std::str::from_utf8(host)
            .map_err(|e| HandoffError::Field {
                field: "host",
                why: format!("not UTF-8: {e}"),
            })?
            .to_string();
        check_host(&host)?;
        fixed.geometry.validate()?;
        Ok(Handoff {
            migration_id: MigrationId(fixed.migration_id),
            geometry: fixed.geometry,
            host,
            port,
        })
    }
}

fn check_host(host: &str) -> Result<(), HandoffError> {
    let why = if host.is_empty() {
        "empty"
    } else if host.len() > MAX_HANDOFF_HOST {
        "longer than 255 bytes"
    } else if host.bytes().any(|b| b == 0 || b.is_ascii_whitespace()) {
        "holds a NUL or white space"
    } else {
        return Ok(());
    };
    Err(HandoffError::Field {
        field: "host",
        why: why.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Handoff {
        Handoff {
            migration_id: MigrationId([7; 16]),
            geometry: Geometry::new(4096, 0x100000, 1 << 16, 0, 0),
            host: "dom0-a.example".into(),
            port: 7700,
        }
    }

    #[test]
    fn a_handoff_round_trips_at_its_documented_offsets() {
        let h = sample();
        let bytes = h.encode().unwrap();
        assert_eq!(bytes.len(), 64 + h.host.len());
        assert_eq!(&bytes[..8], b"WMHANDOF");
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), HANDOFF_VERSION);
        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 7700);
        assert_eq!(bytes[16..32], [7; 16]);
        assert_eq!(&bytes[64..], h.host.as_bytes());
        assert_eq!(Handoff::decode(&bytes).unwrap(), h);
        assert!(bytes.len() <= MAX_HANDOFF_LEN);
    }

    #[test]
    fn every_malformed_handoff_gets_its_own_error() {
        let good = sample().encode().unwrap();
        assert_eq!(
            Handoff::decode(&good[..63]),
            Err(HandoffError::Short { len: 63 })
        );
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            Handoff::decode(&b),
            Err(HandoffError::Magic { .. })
        ));
        let mut b = good.clone();
        b[8] = 2;
        assert_eq!(Handoff::decode(&b), Err(HandoffError::Version { found: 2 }));
        let mut b = good.clone();
        b.push(b'x');
        assert!(matches!(
            Handoff::decode(&b),
            Err(HandoffError::Length { .. })
        ));
        let mut b = good.clone();
        b[10] = 0;
        b[11] = 0;
        assert!(matches!(
            Handoff::decode(&b),
            Err(HandoffError::Field { field: "port", .. })
        ));
        let mut b = good.clone();
        b[14] = 1;
        assert!(matches!(
            Handoff::decode(&b),
            Err(HandoffError::Field {
                field: "reserved",
                ..
            })
        ));
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] = 0xff;
        assert!(matches!(
            Handoff::decode(&b),
            Err(HandoffError::Field { field: "host", .. })
        ));
        // A geometry no engine accepts (page size 3).
        let mut b = good.clone();
        b[32] = 3;
        b[33] = 0;
        assert!(matches!(
            Handoff::decode(&b),
            Err(HandoffError::Geometry(_))
        ));
        for host in ["", "a b", "nul\0"] {
            let h = Handoff {
                host: host.into(),
                ..sample()
            };
            assert!(h.encode().is_err(), "{host:?}");
        }
    }
}
