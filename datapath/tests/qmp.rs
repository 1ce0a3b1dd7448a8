//! The QMP client against a real QEMU 10 (TCG): capabilities, run states,
//! stop/cont events, QEMU's own errors, a killed QEMU, and a device-state
//! migration between two QEMUs with `x-ignore-shared` (guest RAM in shared
//! `/dev/shm` files that the test copies while both are stopped, as the
//! engine would move it). Run with `--nocapture` for the measurements.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use wanmig_datapath::qemu::{MigrationStatus, QmpClient, QmpError, RunState};

const T: Duration = Duration::from_secs(30);

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A QEMU process, killed on drop, with its QMP socket and stderr log.
struct Qemu {
    child: Child,
    qmp: PathBuf,
    log: PathBuf,
}

impl Qemu {
    fn spawn(args: &[String]) -> Qemu {
        let name = unique("wanmig-qmp-test");
        let dir = std::env::temp_dir();
        let qmp = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-nodefaults", "-no-user-config"])
            .args(["-display", "none"])
            .args(args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn qemu-system-x86_64 (QEMU 10 is required)");
        Qemu { child, qmp, log }
    }

    /// A small paused PC (no RAM file).
    fn small() -> Qemu {
        Qemu::spawn(&args(&["-machine", "pc", "-m", "64", "-S"]))
    }

    fn connect(&self) -> QmpClient {
        QmpClient::connect(&self.qmp, T)
            .unwrap_or_else(|e| panic!("QMP: {e}; QEMU log: {}", self.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for QEMU to exit by itself.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "QEMU did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.log);
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn capabilities_run_states_and_stop_cont_events() {
    let q = Qemu::small();
    let mut c = q.connect();
    let g = c.greeting().clone();
    assert!(g.version.major >= 9, "{g:?}");
    eprintln!("QEMU {} ({})", g.version, g.package);

    let s = c.query_status().unwrap();
    assert_eq!(s.status, RunState::Prelaunch);
    assert!(!s.running);

    c.cont().unwrap();
    c.wait_event("RESUME", T).unwrap();
    let s = c.query_status().unwrap();
    assert_eq!(s.status, RunState::Running);
    assert!(s.running);

    c.stop().unwrap();
    let stop = c.wait_event("STOP", T).unwrap();
    assert!(stop.timestamp.is_some());
    assert_eq!(c.query_status().unwrap().status, RunState::Paused);

    // Events arrive unasked too: cont, then find RESUME among taken events.
    c.cont().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let names: Vec<String> = c.take_events().into_iter().map(|e| e.name).collect();
    assert!(names.iter().any(|n| n == "RESUME"), "{names:?}");
    assert!(c.take_events().is_empty());

    // No migration yet.
    let m = c.query_migrate().unwrap();
    assert!(
        matches!(m.status, None | Some(MigrationStatus::None)),
        "{m:?}"
    );
}

#[test]
fn qemu_errors_come_back_with_their_class() {
    let q = Qemu::small();
    let mut c = q.connect();
    match c.execute("no-such-command", None) {
        Err(QmpError::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("{other:?}"),
    }
    let e = c
        .migrate_set_capabilities(&[("no-such-capability", true)])
        .unwrap_err();
    assert!(
        matches!(&e, QmpError::Command { class, .. } if class == "GenericError"),
        "{e}"
    );
    // Not started with -incoming.
    let e = c.migrate_incoming("unix:/nonexistent/x").unwrap_err();
    assert!(matches!(e, QmpError::Command { .. }), "{e}");
    eprintln!("migrate-incoming without -incoming: {e}");
    // The connection is still good afterwards.
    assert_eq!(c.query_status().unwrap().status, RunState::Prelaunch);
}

#[test]
fn a_killed_qemu_is_disconnected_and_quit_ends_qemu() {
    let mut q = Qemu::small();
    let mut c = q.connect();
    q.child.kill().unwrap();
    q.child.wait().unwrap();
    match c.query_status() {
        Err(QmpError::Disconnected { what }) => assert_eq!(what, "query-status"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.execute("query-status", None),
        Err(QmpError::Disconnected { .. })
    ));
    assert!(matches!(
        c.wait_event("STOP", Duration::from_millis(50)),
        Err(QmpError::Disconnected { .. })
    ));

    let mut q = Qemu::small();
    let mut c = q.connect();
    c.quit().unwrap();
    assert!(q.wait_exit(T).success(), "{}", q.log());
    c.wait_event("SHUTDOWN", T).unwrap();
}

/// Copies `src` to `dst` (same size) in place, skipping all-zero chunks: `dst`
/// is a fresh sparse file, already mapped by the destination QEMU.
fn copy_ram(src: &Path, dst: &Path) -> (u64, u64) {
    let s = File::open(src).unwrap();
    let d = std::fs::OpenOptions::new().write(true).open(dst).unwrap();
    let len = s.metadata().unwrap().len();
    let mut buf = vec![0u8; 1 << 20];
    let zero = vec![0u8; 1 << 20];
    let mut copied = 0;
    let mut off = 0;
    while off < len {
        let n = buf.len().min((len - off) as usize);
        s.read_exact_at(&mut buf[..n], off).unwrap();
        if buf[..n] != zero[..n] {
            d.write_all_at(&buf[..n], off).unwrap();
            copied += n as u64;
        }
        off += n as u64;
    }
    (len, copied)
}

struct RamFile(PathBuf);

impl RamFile {
    fn new(tag: &str, len: u64) -> RamFile {
        let p = Path::new("/dev/shm").join(unique(tag));
        File::create(&p).unwrap().set_len(len).unwrap();
        RamFile(p)
    }
}

impl Drop for RamFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn guest_args(ram: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(&["-m", "256", "-object"]);
    a.push(format!(
        "memory-backend-file,id=ram0,size=256M,mem-path={},share=on",
        ram.display()
    ));
    a.extend(args(&["-machine", "pc,memory-backend=ram0"]));
    a.extend(args(extra));
    a
}

#[test]
fn device_state_migration_with_x_ignore_shared() {
    let src_ram = RamFile::new("wanmig-qmp-src", 256 << 20);
    let dst_ram = RamFile::new("wanmig-qmp-dst", 256 << 20);
    let uri_path = std::env::temp_dir().join(format!("{}.mig", unique("wanmig-qmp")));
    let uri = format!("unix:{}", uri_path.display());

    let src = Qemu::spawn(&guest_args(&src_ram.0, &["-S"]));
    let dst = Qemu::spawn(&guest_args(&dst_ram.0, &["-incoming", "defer"]));
    let mut s = src.connect();
    let mut d = dst.connect();
    assert_eq!(d.query_status().unwrap().status, RunState::InMigrate);

    // Let the source's firmware run a little, so there is state to move.
    s.cont().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.stop().unwrap();
    assert_eq!(s.query_status().unwrap().status, RunState::Paused);

    for c in [&mut s, &mut d] {
        c.migrate_set_capabilities(&[("x-ignore-shared", true), ("events", true)])
            .unwrap();
    }
    d.migrate_incoming(&uri).unwrap();

    // The engine's job, done here by hand while both are stopped.
    let t_copy = Instant::now();
    let (len, copied) = copy_ram(&src_ram.0, &dst_ram.0);
    let copy_time = t_copy.elapsed();

    let t0 = Instant::now();
    s.migrate(&uri).unwrap();
    let info = s.wait_migration(T, Duration::from_millis(2)).unwrap();
    let wall = t0.elapsed();
    assert_eq!(
        info.status,
        Some(MigrationStatus::Completed),
        "{info:?}; src log: {}",
        src.log()
    );
    // The destination finishes loading on its own schedule.
    let deadline = Instant::now() + T;
    let dinfo = loop {
        let i = d.query_migrate().unwrap();
        if i.status.as_ref().is_some_and(|s| s.is_finished()) || Instant::now() > deadline {
            break i;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(
        dinfo.status,
        Some(MigrationStatus::Completed),
        "{dinfo:?}; dst log: {}",
        dst.log()
    );
    assert_eq!(s.query_status().unwrap().status, RunState::PostMigrate);
    // The source was paused, so the destination stays paused until cont.
    let before = d.query_status().unwrap();
    assert!(!before.running, "{before:?}");
    d.cont().unwrap();
    d.wait_event("RESUME", T).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = d.query_status().unwrap();
    assert_eq!(after.status, RunState::Running, "dst log: {}", dst.log());

    let ram = info.ram.clone().unwrap_or_default();
    let src_events: Vec<String> = s
        .take_events()
        .into_iter()
        .filter(|e| e.name == "MIGRATION")
        .filter_map(|e| e.data["status"].as_str().map(str::to_string))
        .collect();
    eprintln!(
        "x-ignore-shared migration of a paused 256 MiB pc (TCG, SeaBIOS ran 0.5 s):\n  \
         RAM file {len} bytes, {copied} non-zero bytes copied in {copy_time:?}\n  \
         migrate -> completed: {wall:?} wall; QEMU: total {:?} ms, setup {:?} ms, downtime {:?} ms\n  \
         transferred {} bytes (ram.total {}, normal pages {} = {} bytes, mbps {:.1}, precopy {} / downtime {} bytes)\n  \
         destination before cont: {:?}; MIGRATION events on the source: {src_events:?}",
        info.total_time_ms,
        info.setup_time_ms,
        info.downtime_ms,
        ram.transferred,
        ram.total,
        ram.normal,
        ram.normal_bytes,
        ram.mbps,
        ram.precopy_bytes,
        ram.downtime_bytes,
        before.status,
    );
    // Only device state and the small unshared RAM blocks (pc.bios, pc.rom:
    // 520 KiB) went through QEMU, never the 256 MiB of shared guest RAM.
    assert!(ram.total < 1 << 20, "the shared RAM is not QEMU's: {ram:?}");
    assert!(ram.transferred > 0 && ram.transferred < 2 << 20, "{ram:?}");
    assert!(
        src_events.iter().any(|e| e == "completed"),
        "{src_events:?}"
    );

    s.quit().unwrap();
    d.quit().unwrap();
    let _ = std::fs::remove_file(&uri_path);
}
