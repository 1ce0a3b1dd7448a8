//! Killing the engine in the middle of pre-copy leaves the source guest
//! running, intact: the dirty log needs nothing from the engine (write faults
//! are resolved by the kernel, write-protect async), and nothing was paused.
//!
//! The engine runs as the real `wanmig migrate` process and is killed with
//! SIGKILL, so no destructor or signal handler gets a say.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wanmig_datapath::backend::qemu::SerialLog;
use wanmig_datapath::qemu::{QmpClient, RunState};

fn pid_in(dir: &Path, role: &str) -> Option<i32> {
    std::fs::read_to_string(dir.join(format!("{role}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn kill(pid: i32) {
    // SAFETY: kill(2) with a pid we started; no memory involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[test]
fn killing_the_engine_mid_precopy_leaves_the_source_guest_running() {
    let dir = std::env::temp_dir().join(format!("wanmig-test-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // 8 Mbit/s: round 0 of the populated memory takes far longer than the
    // few seconds this test waits, so the kill lands in pre-copy.
    let mut engine = Command::new(env!("CARGO_BIN_EXE_wanmig"))
        .args([
            "migrate",
            "--m",
            "1",
            "--rate",
            "8mbit",
            "--rtt",
            "5ms",
            "--wan-name",
            "tkill",
        ])
        .arg("--run-dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Pre-copy starts once the destination QEMU is up.
    let deadline = Instant::now() + Duration::from_secs(120);
    while pid_in(&dir, "destination").is_none() {
        assert!(
            Instant::now() < deadline,
            "the migration never got to pre-copy"
        );
        assert!(engine.try_wait().unwrap().is_none(), "wanmig exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let source_pid = pid_in(&dir, "source").unwrap();
    let dest_pid = pid_in(&dir, "destination").unwrap();
    engine.kill().unwrap();
    engine.wait().unwrap();

    // The source guest keeps running, and its checker keeps finding every
    // page intact.
    let mut log = SerialLog::new(&dir.join("source.serial"));
    let killed = Instant::now();
    let alive = log
        .wait_heartbeats(4, killed, Duration::from_secs(30))
        .unwrap();
    let mut qmp = QmpClient::connect(dir.join("source.qmp"), Duration::from_secs(10)).unwrap();
    let status = qmp.query_status().unwrap();
    drop(qmp);
    kill(source_pid);
    kill(dest_pid);
    let _ = wanmig_wan::Wan::down_by_name("tkill");
    for f in std::fs::read_dir("/dev/shm").unwrap().flatten() {
        let name = f.file_name().to_string_lossy().to_string();
        if name.starts_with("wanmig-tkill") {
            let _ = std::fs::remove_file(f.path());
        }
    }
    assert!(alive, "the source guest stopped after the engine died");
    assert_eq!(status.status, RunState::Running);
    let hb = log.last_heartbeat().unwrap();
    assert_eq!(hb.errors, 0, "the source guest's memory was damaged");
    assert_eq!(log.error_lines().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
