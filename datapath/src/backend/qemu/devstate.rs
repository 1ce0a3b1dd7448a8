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

/// Limit for each wait inside the guest's downtime (QEMU connecting, the
/// stream, the migration finishing): the device state is well under 1 MB.
pub const DOWNTIME_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Saves the paused source's device state through `sock`, feeding `sink`.
///
/// If anything fails, the migration QEMU started is cancelled and waited for
/// (cancelled, failed or completed) before this returns, so that the guest
/// can be resumed with `cont` right away.
pub fn save(
    qmp: &mut QmpClient,
    sock: &Path,
    timeout: Duration,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), BackendError>,
) -> Result<u64, BackendError> {
    let result = save_stream(qmp, sock, timeout, sink);
    let _ = std::fs::remove_file(sock);
    if result.is_err() {
        cancel_migration(qmp, timeout);
    }
    result
}

/// Cancels QEMU's outgoing migration, if any, and waits until it is over.
fn cancel_migration(qmp: &mut QmpClient, timeout: Duration) {
    let _ = qmp.migrate_cancel();
    let deadline = Instant::now() + timeout;
    while let Ok(info) = qmp.query_migrate() {
        match info.status {
            None | Some(MigrationStatus::None) => return,
            Some(s) if s.is_finished() => return,
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn save_stream(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#;

    fn read_cmd(r: &mut BufReader<UnixStream>) -> Option<(String, serde_json::Value)> {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&l).ok()?;
        Some((v["execute"].as_str()?.to_string(), v))
    }

    /// A fake QEMU whose migration streams more than a piece, then hangs on:
    /// the save fails in the sink while QEMU's migration is under way. It
    /// must be cancelled, and over, before `save` returns.
    #[test]
    fn a_failed_save_cancels_qemus_migration_and_waits_for_it() {
        let (a, b) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = BufReader::new(b);
            writeln!(w, "{GREETING}").unwrap();
            let mut seen = Vec::new();
            let mut cancelled = false;
            let mut stream = None;
            while let Some((cmd, v)) = read_cmd(&mut r) {
                let id = v["id"].clone();
                let reply = match cmd.as_str() {
                    "migrate" => {
                        let uri = v["arguments"]["uri"].as_str().unwrap();
                        let path = uri.strip_prefix("unix:").unwrap().to_string();
                        // QEMU streams from its migration thread, and keeps
                        // the connection open.
                        stream = Some(std::thread::spawn(move || {
                            let mut s = UnixStream::connect(path).unwrap();
                            let _ = s.write_all(&vec![7u8; PIECE + PIECE / 2]);
                            s
                        }));
                        serde_json::json!({})
                    }
                    "migrate_cancel" => {
                        cancelled = true;
                        serde_json::json!({})
                    }
                    "query-migrate" => {
                        // Cancelling takes a moment.
                        let n = seen.iter().filter(|c| *c == "query-migrate").count();
                        let status = match (cancelled, n) {
                            (false, _) => "active",
                            (true, 0) => "cancelling",
                            (true, _) => "cancelled",
                        };
                        serde_json::json!({ "status": status })
                    }
                    _ => serde_json::json!({}),
                };
                seen.push(cmd);
                writeln!(w, "{}", serde_json::json!({ "return": reply, "id": id })).unwrap();
            }
            drop(stream.map(|t| t.join()));
            seen
        });
        let mut qmp = QmpClient::from_stream(a, "pair", Duration::from_secs(5)).unwrap();
        let sock =
            std::env::temp_dir().join(format!("wanmig-devstate-test-{}", std::process::id()));
        let mut pieces = 0;
        let r = save(&mut qmp, &sock, Duration::from_secs(5), &mut |piece| {
            pieces += 1;
            assert_eq!(piece.len(), PIECE);
            Err(BackendError::new("test", "sending", "the link broke"))
        });
        assert!(r.is_err());
        assert_eq!(pieces, 1);
        assert!(!sock.exists(), "the socket is removed");
        drop(qmp);
        let seen = fake.join().unwrap();
        assert_eq!(
            seen,
            [
                "qmp_capabilities",
                "migrate",
                "migrate_cancel",
                "query-migrate",
                "query-migrate"
            ],
            "the save must cancel QEMU's migration and wait until it is over"
        );
    }
}
