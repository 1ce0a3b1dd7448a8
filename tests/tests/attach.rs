//! Attaching the engine to a QEMU it did not start, as with a QEMU started
//! by a management stack: the preload library in attach mode registers the
//! guest RAM and keeps the userfaultfd; the engine takes a copy with
//! `pidfd_getfd(2)` and drives the guest through its QMP socket.
//!
//! - The attached backend tracks the running guest's writes, pauses and
//!   resumes it, and dropping it leaves QEMU running (it is not ours).
//! - A QEMU started without the preload library is refused with an error
//!   that says what is missing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wanmig_datapath::backend::SourceBackend;
use wanmig_datapath::backend::qemu::{GuestSpec, QemuPaths, QemuSource, SerialLog, locate_preload};
use wanmig_datapath::qemu::{QmpClient, RunState};
use wanmig_datapath::uffd::{DirtyBitmap, RemoteAddr, RemoteRange};

/// A QEMU started by "someone else", killed when dropped.
struct Foreign {
    child: Child,
    paths: QemuPaths,
    dir: PathBuf,
}

impl Foreign {
    fn start(tag: &str, preload: bool) -> Self {
        let guest =
            GuestSpec::builtin(256, "wanmig.workload=pagecheck wanmig.mib=32 wanmig.rate=4")
                .expect("run scripts/setup");
        let dir = std::env::temp_dir().join(format!("wanmig-attach-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let paths = QemuPaths::new(
            &dir,
            &format!("attach{tag}{}", std::process::id()),
            "source",
        );
        let _ = std::fs::remove_file(&paths.ram);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-m")
        .arg("256")
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=ram0,size=256M,mem-path={},share=on",
            paths.ram.display()
        ))
        .args(["-machine", "pc,memory-backend=ram0"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .arg("-append")
        .arg(&guest.append)
        .arg("-serial")
        .arg(format!("file:{}", paths.serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", paths.qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if preload {
            cmd.env("LD_PRELOAD", locate_preload().unwrap())
                .env("WANMIG_UFFD_SOCK", "attach")
                .env("WANMIG_UFFD_MODE", "wp-async");
        }
        let child = cmd.spawn().unwrap();
        let mut log = SerialLog::new(&paths.serial);
        assert!(
            log.wait_heartbeats(2, std::time::Instant::now(), Duration::from_secs(60))
                .unwrap(),
            "the guest heartbeats"
        );
        Foreign { child, paths, dir }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.paths.ram);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn an_attached_backend_tracks_writes_pauses_resumes_and_leaves_qemu_running() {
    let mut q = Foreign::start("ok", true);
    let mut src = QemuSource::attach(&q.paths, &q.dir).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(src.pid(), q.child.id(), "the pid comes from the QMP socket");
    assert!(src.process().is_attached());
    // The checker rewrites 4 MiB/s: the dirty log sees it.
    src.dirty_log_start().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let pages = src.page_count();
    let mut dirty =
        DirtyBitmap::with_page_size(RemoteRange::new(RemoteAddr(0), pages * 4096), 4096).unwrap();
    src.dirty_log_collect(&mut dirty).unwrap();
    assert!(dirty.count() > 100, "{} pages dirtied", dirty.count());
    src.pause().unwrap();
    assert_eq!(
        src.process().qmp().query_status().unwrap().status,
        RunState::Paused
    );
    src.resume().unwrap();
    drop(src);
    // Not ours: still running, still answering.
    std::thread::sleep(Duration::from_millis(200));
    assert!(q.child.try_wait().unwrap().is_none(), "QEMU runs on");
    let mut qmp = QmpClient::connect(&q.paths.qmp, Duration::from_secs(10)).unwrap();
    assert_eq!(qmp.query_status().unwrap().status, RunState::Running);
}

#[test]
fn a_qemu_without_the_preload_library_is_refused_with_the_reason() {
    let q = Foreign::start("none", false);
    let e = QemuSource::attach(&q.paths, &q.dir).unwrap_err();
    let chain = format!("{e}: {:?}", e);
    assert!(chain.contains("WANMIG_UFFD_SOCK=attach"), "{chain}");
}

#[test]
fn an_attached_qemu_migrates_to_a_per_host_destination() {
    use wanmig_tests::{KillOnDrop, alive, wanmig, wanmig_in};
    use wanmig_wan::{Wan, WanConfig};
    let q = Foreign::start("mig", true);
    let key = q.dir.join("key");
    let o = Command::new(wanmig())
        .args(["keygen", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    let wan = Wan::up(WanConfig::new(
        "att",
        "400mbit".parse().unwrap(),
        Duration::from_millis(2),
    ))
    .unwrap();
    let addr = format!("{}:7713", wan.dst_addr());
    // The destination describes the same machine.
    let dst = wanmig_in(wan.dst_ns())
        .args([
            "destination",
            "--listen",
            &addr,
            "--key",
            key.to_str().unwrap(),
        ])
        .args([
            "--workload",
            "pagecheck",
            "--guest-params",
            "wanmig.mib=32 wanmig.rate=4",
        ])
        .args(["--run-dir", q.dir.join("dst").to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let src = wanmig_in(wan.src_ns())
        .args(["source", "--connect", &addr, "--key", key.to_str().unwrap()])
        .args(["--attach-qmp", q.paths.qmp.to_str().unwrap()])
        .args(["--attach-ram", q.paths.ram.to_str().unwrap()])
        .args([
            "--m",
            "0.5",
            "--run-dir",
            q.dir.join("src").to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    let dst = dst.wait_with_output().unwrap();
    assert!(
        src.status.success() && dst.status.success(),
        "source: {}\ndestination: {}",
        String::from_utf8_lossy(&src.stderr),
        String::from_utf8_lossy(&dst.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&dst.stdout).unwrap();
    let guard = KillOnDrop(d["qemu"]["pid"].as_u64().unwrap() as u32);
    assert_eq!(d["destination"]["integrity"]["pages_differing"], 0, "{d}");
    assert!(
        d["destination"]["integrity"]["pages_compared"]
            .as_u64()
            .unwrap()
            > 40_000,
        "{d}"
    );
    // The attached QEMU is left to whoever started it: alive, paused.
    assert!(alive(q.child.id()));
    let mut qmp = QmpClient::connect(&q.paths.qmp, Duration::from_secs(10)).unwrap();
    assert_ne!(qmp.query_status().unwrap().status, RunState::Running);
    // The guest's checker goes on at the destination with no error.
    let serial = PathBuf::from(d["qemu"]["serial"].as_str().unwrap());
    let mut log = SerialLog::new(&serial);
    assert!(
        log.wait_heartbeats(3, std::time::Instant::now(), Duration::from_secs(60))
            .unwrap()
    );
    assert_eq!(log.last_heartbeat().unwrap().errors, 0);
    drop(guard);
}

#[test]
fn wanmig_profile_samples_an_attached_guests_writes_and_reads_and_leaves_it_running() {
    use wanmig_planner::profile::{Kind, Profile};
    use wanmig_tests::wanmig;
    let q = Foreign::start("prof", true);
    let out = q.dir.join("guest.wmp");
    let run = |budget: &str| {
        let o = Command::new(wanmig())
            .args(["profile", "--attach-qmp", q.paths.qmp.to_str().unwrap()])
            .args(["--attach-ram", q.paths.ram.to_str().unwrap()])
            .args([
                "--samples",
                "8",
                "--interval",
                "250ms",
                "--read-budget",
                budget,
            ])
            .args(["--out", out.to_str().unwrap(), "--json"])
            .args(["--run-dir", q.dir.join("prof").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["stats"].clone()
    };
    let st = run("all");
    // The checker rewrites 4 MiB/s of its 32 MiB and reads it back: both
    // seen, every page watched every interval.
    assert_eq!(st["reads_sampled"], true, "{st}");
    assert_eq!(st["read_coverage"], 1.0, "{st}");
    assert!(st["pages_written"].as_u64().unwrap() > 500, "{st}");
    assert!(st["pages_read"].as_u64().unwrap() > 100, "{st}");
    let p = Profile::open(&out).unwrap();
    assert_eq!(p.header().samples, 8);
    assert_eq!(p.count(Kind::Page), 256 * 256);
    assert_eq!(
        p.count(Kind::Chunk),
        0,
        "an attached guest's disks are not ours"
    );
    // Some page was read in an interval it was not written in.
    let mut read_only = 0u64;
    p.for_each(Kind::Page, |_, u| {
        read_only += u64::from(u.r > 0 && u.w == 0)
    })
    .unwrap();
    assert!(read_only > 0, "{st}");
    // Again, within the default budget: less of RAM watched, and the guest
    // (not ours) runs on, its checker clean, through both profiles.
    let st = run("0.05");
    let cov = st["read_coverage"].as_f64().unwrap();
    assert!(cov > 0.0 && cov <= 1.0, "{st}");
    let mut log = SerialLog::new(&q.paths.serial);
    log.poll().unwrap();
    let before = log.last_heartbeat().unwrap();
    assert!(
        log.wait_heartbeats(3, std::time::Instant::now(), Duration::from_secs(30))
            .unwrap(),
        "the guest runs on"
    );
    let after = log.last_heartbeat().unwrap();
    assert!(after.n > before.n && after.errors == 0, "{after:?}");
    assert_eq!(log.error_lines().count(), 0);
    let mut qmp = QmpClient::connect(&q.paths.qmp, Duration::from_secs(10)).unwrap();
    assert_eq!(qmp.query_status().unwrap().status, RunState::Running);
}
