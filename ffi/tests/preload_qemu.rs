//! The preload library inside a real QEMU 10: guest RAM as a 256 MiB
//! `memory-backend-file` on `/dev/shm/wanmig-qtest-*`, started with `-S` and
//! the library preloaded, in each mode. The test plays the engine: it accepts
//! every registration, checks it, serves missing faults with zero pages, then
//! drives QEMU over QMP (query-status, a second of running the firmware, quit)
//! and reports how QEMU mapped the file (run with `--nocapture` to see it).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;
use wanmig_ffi::proto::{ACK_ACCEPT, UffdMode, UffdRegistration};

const RAM: u64 = 256 << 20;

fn qemu_cmd(ram: &Path, qmp: &Path) -> Command {
    let mut c = preloaded("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-m", "256", "-object"])
        .arg(format!(
            "memory-backend-file,id=ram0,size=256M,mem-path={},share=on",
            ram.display()
        ))
        .args([
            "-machine",
            "pc,memory-backend=ram0",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null());
    c
}

/// A bare QMP line protocol, enough to drive the test (the engine's typed
/// client lives in `wanmig-datapath`).
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, qemu: &mut Child) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(60);
        let s = loop {
            if let Ok(s) = UnixStream::connect(path) {
                break s;
            }
            assert!(qemu.try_wait().unwrap().is_none(), "QEMU exited");
            assert!(Instant::now() < deadline, "no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = q.line();
        assert!(greeting.contains("\"QMP\""), "{greeting}");
        q.cmd("qmp_capabilities");
        q
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }

    /// Runs a command; returns its response line (events skipped).
    fn cmd(&mut self, name: &str) -> String {
        writeln!(self.w, "{{\"execute\": \"{name}\"}}").unwrap();
        loop {
            let l = self.line();
            if l.is_empty() || !l.contains("\"event\"") {
                assert!(!l.contains("\"error\""), "{name}: {l}");
                return l;
            }
        }
    }
}

/// Stops the test's threads on drop, and kills QEMU unless disarmed (it is
/// disarmed once QEMU has been reaped, so a reused pid is never hit).
struct KillOnPanic<'a> {
    _stop: SetOnDrop<'a>,
    pid: u32,
    armed: bool,
}

impl KillOnPanic<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for KillOnPanic<'_> {
    fn drop(&mut self) {
        if self.armed {
            // SAFETY: kill(2) on QEMU's pid, which has not been reaped yet.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

#[derive(Default)]
struct Served {
    regs: Mutex<Vec<(Duration, UffdRegistration)>>,
    faults: AtomicUsize,
}

fn run(mode: UffdMode) {
    let ram = TempFile::sparse(
        PathBuf::from(format!("/dev/shm/{}", unique("wanmig-qtest"))),
        RAM,
    );
    let qmp_path = std::env::temp_dir().join(format!("{}.qmp", unique("wanmig-ffi")));
    let engine = Engine::bind();
    let t0 = Instant::now();
    let mut qemu = qemu_cmd(&ram.0, &qmp_path)
        .env("WANMIG_UFFD_MODE", mode.env_value())
        .env("WANMIG_UFFD_SOCK", &engine.path)
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let served = Served::default();
    let stop = AtomicBool::new(false);
    let (maps, status, finished) = std::thread::scope(|s| {
        // On any panic below: stop the helper threads and kill QEMU.
        let guard = KillOnPanic {
            _stop: SetOnDrop(&stop),
            pid: qemu.id(),
            armed: true,
        };
        // The engine: accept every registration, serve it, say yes.
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                let Ok((stream, _)) = engine.listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let a = receive(stream);
                served
                    .regs
                    .lock()
                    .unwrap()
                    .push((t0.elapsed(), a.reg.clone()));
                let (served, stop) = (&served, &stop);
                s.spawn(move || {
                    // Serving before answering: QEMU may touch RAM as soon
                    // as mmap returns.
                    std::thread::scope(|inner| {
                        let server = inner.spawn(|| {
                            serve_faults(a.uffd.as_fd(), stop, 0, |_| {
                                served.faults.fetch_add(1, Ordering::Relaxed);
                                None
                            })
                        });
                        a.answer(ACK_ACCEPT);
                        server.join().unwrap();
                    });
                });
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while served.regs.lock().unwrap().is_empty() {
            assert!(
                qemu.try_wait().unwrap().is_none(),
                "QEMU exited before registering"
            );
            assert!(Instant::now() < deadline, "no registration from QEMU");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut q = Qmp::connect(&qmp_path, &mut qemu);
        let t_qmp = t0.elapsed();
        let status = q.cmd("query-status");
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", qemu.id())).unwrap();
        let faults_prelaunch = served.faults.load(Ordering::Relaxed);
        q.cmd("cont");
        std::thread::sleep(Duration::from_secs(1));
        q.cmd("stop");
        let faults_run = served.faults.load(Ordering::Relaxed);
        eprintln!(
            "[{mode}] QMP ready {t_qmp:?} after start; missing faults served: \
             {faults_prelaunch} before the guest ran, {faults_run} after 1 s of firmware"
        );
        // The firmware ran on RAM the engine served (or, in wp-async mode,
        // that nobody had to serve).
        assert_eq!(
            faults_run > 0,
            mode.reports_missing(),
            "{faults_run} faults"
        );
        let _ = q.cmd("quit");
        let finished = finish(qemu, Duration::from_secs(30));
        guard.disarm();
        (maps, status, finished)
    });
    let _ = std::fs::remove_file(&qmp_path);
    assert!(
        finished.status.success(),
        "QEMU: {} {}",
        finished.status,
        finished.stderr
    );
    assert!(status.contains("prelaunch"), "{status}");
    let regs = served.regs.into_inner().unwrap();
    for (t, r) in &regs {
        eprintln!("[{mode}] registration {t:?} after start: {r:?}");
    }
    assert_eq!(regs.len(), 1, "one registration");
    let r = &regs[0].1;
    assert_eq!(r.mode, mode);
    assert_eq!(r.len, RAM);
    assert_eq!(r.file_offset, 0);
    assert_eq!(r.path(), ram.0);
    assert_eq!(r.features, mode.api_features());
    let name = ram.0.display().to_string();
    let lines: Vec<&str> = maps.lines().filter(|l| l.ends_with(&name)).collect();
    eprintln!(
        "[{mode}] QEMU's mappings of the RAM file (/proc/pid/maps):\n  {}",
        lines.join("\n  ")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{:x}-", r.base)) && l.contains(" rw-s ")),
        "the registered range is a shared mapping: {lines:?}"
    );
    eprintln!("[{mode}] QEMU stderr:\n{}", finished.stderr);
    assert!(finished.stderr.contains(&format!("registered {mode}")));
}

#[test]
fn qemu_registers_its_ram_in_wp_async_mode() {
    run(UffdMode::WpAsync);
}

#[test]
fn qemu_registers_its_ram_in_missing_mode() {
    run(UffdMode::Missing);
}

#[test]
fn qemu_registers_its_ram_in_missing_wp_async_mode() {
    run(UffdMode::MissingWpAsync);
}
