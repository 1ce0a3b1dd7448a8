//! The engine's NBD server: how QEMU reaches a guest's disks through wanmig.
//!
//! Each guest disk is an NBD export (fixed newstyle, unix socket) served by
//! the engine. On the source it serves the local image and hears every
//! request (the dirty-chunk log and the profiler listen through a
//! [`RequestLog`]); on the destination it serves the image being filled, its
//! reads of absent data fetched ahead of the bulk stream.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant Q as QEMU (NBD client)
//!     participant S as wanmig (NBD server)
//!     S->>Q: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES
//!     Q->>S: client flags
//!     Q->>S: NBD_OPT_STRUCTURED_REPLY (and others)
//!     S->>Q: NBD_REP_ERR_UNSUP (simple replies only)
//!     Q->>S: NBD_OPT_GO "disk0"
//!     S->>Q: NBD_REP_INFO (size, flags), NBD_REP_ACK
//!     loop transmission, up to WORKERS requests at once
//!         Q->>S: request (READ, WRITE + data, FLUSH, TRIM, WRITE_ZEROES)
//!         S->>Q: simple reply (+ data for a READ)
//!     end
//!     Q->>S: NBD_CMD_DISC
//! ```
//!
//! Each connection has a reader thread and [`WORKERS`] request threads: a
//! read waiting for post-copy data does not hold up the requests behind it,
//! and replies go out as requests finish. `FLUSH` and `FUA` are kept: nothing acknowledged as durable is
//! lost. Bad input gets the protocol's error or a disconnect
//! ([`NbdError`]); nothing a client sends can reach the device out of bounds.

mod device;
pub mod proto;
mod server;
mod unix;
mod uring_io;

pub use device::{BlockDevice, DeviceError, FileImage};
pub use server::{Access, Export, NbdError, RequestLog, ServeEnd, WORKERS, serve};
pub use unix::{NbdServer, NbdServerError};
