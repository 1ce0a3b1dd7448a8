//! Tunnelling QEMU's device state through the engine.
//!
//! With `x-ignore-shared` on both sides QEMU's own migration stream carries
//! only device and CPU state plus the small unshared blocks (firmware, ROMs):
//! about 0.3 MB for the built-in guest. The source engine has QEMU `migrate`
//! to a unix socket the engine listens on and reads the stream; the
//! destination engine has QEMU `migrate-incoming` on a unix socket and writes
//! the stream into it.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::BackendError;
use crate::qemu::{MigrationStatus, QmpClient, RunState};

const B: &str = "qemu";

/// Bytes per piece handed to the sink (the wire's device-state piece).
pub const PIECE: usize = crate::wire::DEVICE_STATE_PIECE as usize;

/// Saves the paused source's device state through `sock`, feeding `sink`.
pub fn save(
    qmp: &mut QmpClient,
    sock: &Path,
    timeout: Duration,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), BackendError>,
) -> Result<u64, BackendError> {
    let _ = std::fs::remove_file(sock);
    let listener =
        UnixListener::bind(sock).map_err(|e| BackendError::new(B, "device-state socket", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| BackendError::new(B, "device-state socket", e))?;
    qmp.migrate(&format!("unix:{}", sock.display()))
        .map_err(|e| BackendError::new(B, "migrate (device state)", e))?;
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(BackendError::new(B, "device state", "QEMU did not connect"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(BackendError::new(B, "device-state accept", e)),
        }
    };
    let _ = std::fs::remove_file(sock);
    stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(timeout)))
        .map_err(|e| BackendError::new(B, "device-state socket", e))?;
    let mut buf = vec![0u8; PIECE];
    let mut total = 0u64;
    loop {
        // Fill whole pieces: the destination expects piece i at i * PIECE.
        let mut filled = 0;
        while filled < PIECE {
            match stream.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BackendError::new(B, "reading the device state", e)),
            }
        }
        if filled > 0 {
            sink(&buf[..filled])?;
            total += filled as u64;
        }
        if filled < PIECE {
            break;
        }
    }
    let info = qmp
        .wait_migration(timeout, Duration::from_millis(2))
        .map_err(|e| BackendError::new(B, "device-state migration", e))?;
    if info.status != Some(MigrationStatus::Completed) {
        return Err(BackendError::new(
            B,
            "device-state migration",
            format!(
                "ended {:?}: {}",
                info.status,
                info.error_desc.unwrap_or_default()
            ),
        ));
    }
    Ok(total)
}

/// Loads `state` into the destination QEMU through `sock` and waits until
/// QEMU has taken it (the guest stays paused).
pub fn load(
    qmp: &mut QmpClient,
    sock: &Path,
    state: &[u8],
    timeout: Duration,
) -> Result<(), BackendError> {
    let _ = std::fs::remove_file(sock);
    qmp.migrate_incoming(&format!("unix:{}", sock.display()))
        .map_err(|e| BackendError::new(B, "migrate-incoming", e))?;
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(BackendError::new(B, "connecting to migrate-incoming", e)),
        }
    };
    stream
        .write_all(state)
        .and_then(|_| stream.shutdown(std::net::Shutdown::Write))
        .map_err(|e| BackendError::new(B, "writing the device state", e))?;
    loop {
        let status = qmp
            .query_status()
            .map_err(|e| BackendError::new(B, "query-status", e))?;
        match status.status {
            RunState::InMigrate => {}
            RunState::Paused | RunState::PostMigrate | RunState::Prelaunch => break,
            other => {
                return Err(BackendError::new(
                    B,
                    "loading the device state",
                    format!("QEMU went to state {other:?}"),
                ));
            }
        }
        if Instant::now() >= deadline {
            return Err(BackendError::new(
                B,
                "loading the device state",
                "timed out",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = std::fs::remove_file(sock);
    Ok(())
}
