//! One engine per host, as on real hosts: the `wanmig destination` and
//! `wanmig source` binaries, each in its own network namespace of the
//! emulated WAN (400 Mbit/s, 2 ms: correctness, not timing), with the same
//! pre-shared key file.
//!
//! - A migration: the destination's integrity check finds 0 differing pages,
//!   the guest's page checker goes on at the destination with 0 errors after
//!   both commands have exited (the destination QEMU was left running), the
//!   source QEMU is gone, and the source's own downtime figure (no shared
//!   clock) is positive and sane.
//! - A source with the wrong key: refused before any unit; the command fails
//!   saying the guest still runs at the source, and it does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wanmig_tests::{KillOnDrop, alive, wanmig, wanmig_in};
use wanmig_wan::{Wan, WanConfig};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(name: &str) -> (Scratch, PathBuf, Wan) {
    let dir = std::env::temp_dir().join(format!("wanmig-ph-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    let o = Command::new(wanmig())
        .args(["keygen", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let wan = Wan::up(WanConfig::new(
        name,
        "400mbit".parse().unwrap(),
        Duration::from_millis(2),
    ))
    .unwrap();
    (Scratch(dir), key, wan)
}

fn spawn_destination(wan: &Wan, key: &Path, run_dir: &Path, port: u16) -> Child {
    wanmig_in(wan.dst_ns())
        .args([
            "destination",
            "--listen",
            &format!("{}:{port}", wan.dst_addr()),
        ])
        .args(["--key", key.to_str().unwrap()])
        .args(["--guest-params", "wanmig.rate=2 wanmig.mib=32"])
        .args(["--run-dir", run_dir.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run_source(wan: &Wan, key: &Path, run_dir: &Path, port: u16) -> Output {
    wanmig_in(wan.src_ns())
        .args(["source", "--connect", &format!("{}:{port}", wan.dst_addr())])
        .args(["--key", key.to_str().unwrap(), "--m", "0.5"])
        .args(["--guest-params", "wanmig.rate=2 wanmig.mib=32"])
        .args(["--run-dir", run_dir.to_str().unwrap(), "--json"])
        .output()
        .unwrap()
}

fn json(o: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(o);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn a_guest_migrates_between_two_per_host_engines() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (dir, key, wan) = setup("ph1");
    let dst = spawn_destination(&wan, &key, &dir.0.join("dst"), 7711);
    let src = run_source(&wan, &key, &dir.0.join("src"), 7711);
    let dst = dst.wait_with_output().unwrap();
    assert!(
        src.status.success() && dst.status.success(),
        "source: {}\ndestination: {}",
        String::from_utf8_lossy(&src.stderr),
        String::from_utf8_lossy(&dst.stderr)
    );
    let s = json(&src.stdout);
    let d = json(&dst.stdout);
    let qemu = d["qemu"]["pid"].as_u64().unwrap() as u32;
    let guard = KillOnDrop(qemu);
    // The destination's integrity check, on its own clock and data.
    let i = &d["destination"]["integrity"];
    assert_eq!(i["pages_differing"], 0, "{d}");
    assert!(i["pages_compared"].as_u64().unwrap() > 40_000, "{d}");
    // The source's downtime, on its own clock.
    let est = s["source"]["downtime_estimate_s"].as_f64().unwrap();
    let upper = s["source"]["downtime_upper_s"].as_f64().unwrap();
    assert!(est > 0.0 && est <= upper && upper < 5.0, "{s}");
    // The source QEMU is gone; the destination's runs on, its guest's
    // checker heartbeating with no error.
    let src_pid: u32 = std::fs::read_to_string(dir.0.join("src/source.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t = Instant::now();
    while alive(src_pid) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(src_pid), "the source QEMU quit");
    assert!(alive(qemu), "the destination QEMU runs on");
    let serial = PathBuf::from(d["qemu"]["serial"].as_str().unwrap());
    let hb_count = |s: &str| s.lines().filter(|l| l.starts_with("HB ")).count();
    let before = hb_count(&std::fs::read_to_string(&serial).unwrap());
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&serial).unwrap();
        if hb_count(&text) >= before + 3 {
            let last = text.lines().rfind(|l| l.starts_with("HB ")).unwrap();
            assert!(last.contains(" errors=0 "), "{last}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no heartbeat at the destination"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(guard);
}

#[test]
fn a_source_with_the_wrong_key_is_refused_and_keeps_its_guest() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (dir, key, wan) = setup("ph2");
    let other = dir.0.join("other-key");
    let o = Command::new(wanmig())
        .args(["keygen", "--out", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    let dst_dir = dir.0.join("dst");
    let mut dst = spawn_destination(&wan, &key, &dst_dir, 7712);
    let src = run_source(&wan, &other, &dir.0.join("src"), 7712);
    assert!(!src.status.success());
    let err = String::from_utf8_lossy(&src.stderr).to_string();
    assert!(err.contains("still runs here"), "{err}");
    let pid: u32 = err
        .split("QEMU pid ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in: {err}"));
    let guard = KillOnDrop(pid);
    assert!(alive(pid), "the source guest runs on");
    // The destination refused the peer; stop it and its QEMU (and the RAM
    // file, named after the destination command's pid: `ip netns exec`
    // execs it).
    let dst_ram = format!("/dev/shm/wanmig-dst{}-destination", dst.id());
    let _ = dst.kill();
    let _ = dst.wait();
    if let Ok(p) = std::fs::read_to_string(dst_dir.join("destination.pid")) {
        wanmig_tests::kill(p.trim().parse().unwrap_or(0));
    }
    let _ = std::fs::remove_file(dst_ram);
    drop(guard);
}
