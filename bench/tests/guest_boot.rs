//! The built-in guest, for real: boots the image `scripts/setup` builds
//! (`scripts/guest-image`) under QEMU TCG with its RAM in a shared
//! `/dev/shm` file, as the engine runs it, and checks that it comes up, that
//! its workloads heartbeat, and that the page checker catches pages changed
//! behind its back (corrupted, zeroed, or brought back from an older copy) —
//! written straight into the guest's RAM file from here.
//!
//! The disk checker runs on a virtio disk that QEMU reaches over NBD from the
//! engine's own NBD server, and catches blocks changed in the image file.
//!
//! Image: `$WANMIG_GUEST_DIR`, else `${WANMIG_CACHE:-/var/cache/wanmig}/guest/current`.
//! Each guest is 256 MiB, TCG, one vCPU; the three tests take ~20 s on 2 cores.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const GUEST_MIB: u64 = 256;
const PAGE: usize = 4096;
const MAGIC: &[u8; 8] = b"WMPGCHK1";
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

struct Image {
    dir: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline_base: String,
}

fn image() -> Image {
    let dir = match std::env::var_os("WANMIG_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(
            std::env::var_os("WANMIG_CACHE").unwrap_or_else(|| "/var/cache/wanmig".into()),
        )
        .join("guest/current"),
    };
    let manifest = dir.join("manifest.json");
    let text = fs::read_to_string(&manifest).unwrap_or_else(|e| {
        panic!(
            "built-in guest image not found ({}: {e}): run scripts/setup (it builds the image with scripts/guest-image)",
            manifest.display()
        )
    });
    let m: serde_json::Value = serde_json::from_str(&text).expect("manifest.json is JSON");
    let path = |k: &str| {
        let p = dir.join(m["paths"][k].as_str().expect("manifest paths"));
        assert!(
            p.is_file(),
            "{} missing: run scripts/setup (scripts/guest-image)",
            p.display()
        );
        p
    };
    Image {
        kernel: path("kernel"),
        initrd: path("initramfs"),
        cmdline_base: m["guest"]["cmdline_base"]
            .as_str()
            .unwrap_or("console=ttyS0 quiet")
            .to_string(),
        dir,
    }
}

/// A running guest; killed and its files removed when dropped (panics too).
struct Guest {
    name: String,
    child: Child,
    serial: PathBuf,
    mem: PathBuf,
    started: Instant,
}

impl Guest {
    fn boot(tag: &str, params: &str) -> Guest {
        Guest::boot_with(tag, params, &[])
    }

    /// Boots with more QEMU arguments (disks).
    fn boot_with(tag: &str, params: &str, extra: &[String]) -> Guest {
        let img = image();
        let name = format!("wanmig-test-{}-{tag}", std::process::id());
        let serial = std::env::temp_dir().join(format!("{name}.serial"));
        let mem = PathBuf::from(format!("/dev/shm/{name}"));
        let _ = fs::remove_file(&serial);
        let _ = fs::remove_file(&mem);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", &GUEST_MIB.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={GUEST_MIB}M,mem-path={},share=on",
                mem.display()
            ))
            .args(["-machine", "pc,memory-backend=mem"])
            .arg("-kernel")
            .arg(&img.kernel)
            .arg("-initrd")
            .arg(&img.initrd)
            .arg("-append")
            .arg(format!("{} {params}", img.cmdline_base))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: the closure only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // QEMU dies with the test thread that started it, even on abort.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("start qemu-system-x86_64 (scripts/setup installs QEMU 10)");
        eprintln!("{name}: booting {} with {params:?}", img.dir.display());
        Guest {
            name,
            child,
            serial,
            mem,
            started: Instant::now(),
        }
    }

    /// The console so far, lines without `\r`.
    /// The console's complete lines: QEMU writes the serial port byte by
    /// byte as the UART sends them, so the file may end in half a line.
    fn console(&self) -> String {
        let bytes = fs::read(&self.serial).unwrap_or_default();
        let whole = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(&bytes[..0], |i| &bytes[..=i]);
        String::from_utf8_lossy(whole).replace('\r', "")
    }

    fn tail(&self) -> String {
        let c = self.console();
        let lines: Vec<&str> = c.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Polls the console until `f` finds something, or panics after `timeout`
    /// (or if QEMU exits) with the end of the console.
    fn wait_for<T>(&mut self, what: &str, timeout: Duration, f: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(&self.console()) {
                return v;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{}: QEMU exited ({st}) while waiting for {what}; console:\n{}",
                    self.name,
                    self.tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: no {what} within {timeout:?}; console:\n{}",
                    self.name,
                    self.tail()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the up marker; returns the seconds from QEMU's start.
    fn wait_up(&mut self) -> f64 {
        self.wait_for("WANMIG-GUEST-UP", BOOT_TIMEOUT, |c| {
            c.lines().find(|l| l.starts_with("WANMIG-GUEST-UP "))?;
            Some(())
        });
        let t = self.started.elapsed().as_secs_f64();
        eprintln!("{}: up marker after {t:.2} s", self.name);
        t
    }

    /// Waits until at least `n` heartbeats have been printed; returns them all.
    fn wait_heartbeats(&mut self, n: usize, timeout: Duration) -> Vec<Hb> {
        self.wait_for(&format!("{n} heartbeats"), timeout, |c| {
            let hbs = heartbeats(c);
            (hbs.len() >= n).then_some(hbs)
        })
    }

    /// The RAM file as QEMU shares it.
    fn ram(&self) -> File {
        File::options()
            .read(true)
            .write(true)
            .open(&self.mem)
            .expect("open the guest RAM file")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}: console at failure:\n{}", self.name, self.tail());
        }
        let _ = fs::remove_file(&self.serial);
        let _ = fs::remove_file(&self.mem);
    }
}

/// `key=value` from a line of space-separated fields.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

#[derive(Debug, Clone, Copy)]
struct Hb {
    n: u64,
    t: f64,
    written: u64,
    verified: u64,
    errors: u64,
    generation: u64,
}

/// Every heartbeat line: `HB <n> t=<s> written=<p> verified=<p> errors=<n> gen=<g>`.
fn heartbeats(console: &str) -> Vec<Hb> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("HB ")?;
            Some(Hb {
                n: rest.split_whitespace().next()?.parse().ok()?,
                t: field(l, "t")?.parse().ok()?,
                written: field(l, "written")?.parse().ok()?,
                verified: field(l, "verified")?.parse().ok()?,
                errors: field(l, "errors")?.parse().ok()?,
                generation: field(l, "gen")?.parse().ok()?,
            })
        })
        .collect()
}

/// Heartbeats are numbered 1, 2, 3..., a second apart, counters never go
/// back, and (with `progress`) written and verified both grow.
fn check_heartbeats(hbs: &[Hb], progress: bool) {
    for (i, w) in hbs.windows(2).enumerate() {
        let (a, b) = (w[0], w[1]);
        assert_eq!(b.n, a.n + 1, "heartbeat numbers: {hbs:?}");
        assert_eq!(a.n, i as u64 + 1, "heartbeat numbers: {hbs:?}");
        assert!(
            // About a second apart; loose, for a loaded 2-core CI machine.
            b.t > a.t && b.t - a.t < 10.0,
            "heartbeats about a second apart: {hbs:?}"
        );
        assert!(b.written >= a.written && b.verified >= a.verified && b.generation >= a.generation);
        if progress {
            assert!(b.written > a.written, "written grows: {hbs:?}");
            assert!(b.verified > a.verified, "verified grows: {hbs:?}");
        }
    }
}

/// Where each of run `run`'s pages sits in the RAM file: page index -> file
/// offsets (a page found twice would be a stray copy).
fn find_checker_pages(ram: &File, run: u64) -> HashMap<u64, Vec<u64>> {
    let mut tag = [0u8; 16];
    tag[..8].copy_from_slice(MAGIC);
    tag[8..].copy_from_slice(&run.to_le_bytes());
    let mut found: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut buf = vec![0u8; 1 << 20];
    let len = ram.metadata().expect("stat RAM file").len();
    let mut off = 0u64;
    while off < len {
        let n = ram.read_at(&mut buf, off).expect("read RAM file");
        if n == 0 {
            break;
        }
        for (i, p) in buf[..n].chunks_exact(PAGE).enumerate() {
            if p[..16] == tag {
                let index = u64::from_le_bytes(p[16..24].try_into().unwrap());
                found
                    .entry(index)
                    .or_default()
                    .push(off + (i * PAGE) as u64);
            }
        }
        off += n as u64;
    }
    found
}

/// The `PAGECHECK-ERROR` line for `page`, if printed.
fn error_for(console: &str, page: u64) -> Option<String> {
    console
        .lines()
        .find(|l| l.starts_with("PAGECHECK-ERROR ") && field(l, "page") == Some(&page.to_string()))
        .map(str::to_string)
}

#[test]
fn pagecheck_heartbeats_and_catches_pages_changed_behind_its_back() {
    // 32 MiB region; writes (1 MiB/s) go to its first MiB only, so those
    // pages are rewritten every second; the sweep reads it all every 2 s.
    let mut g = Guest::boot(
        "pc",
        "wanmig.workload=pagecheck wanmig.mib=32 wanmig.rate=1 wanmig.readrate=16 wanmig.wss=1",
    );
    g.wait_up();
    let start = g.wait_for("PAGECHECK-START", Duration::from_secs(15), |c| {
        c.lines()
            .find(|l| l.starts_with("PAGECHECK-START "))
            .map(str::to_string)
    });
    let run = u64::from_str_radix(field(&start, "run").expect("run="), 16).expect("hex run id");
    let pages: u64 = field(&start, "pages").unwrap().parse().unwrap();
    assert_eq!(pages, 32 * 256);
    assert_eq!(field(&start, "locked"), Some("1"), "{start}");

    g.wait_heartbeats(1, Duration::from_secs(15));
    eprintln!(
        "{}: first heartbeat after {:.2} s",
        g.name,
        g.started.elapsed().as_secs_f64()
    );
    let hbs = g.wait_heartbeats(3, Duration::from_secs(15));
    check_heartbeats(&hbs, true);
    assert!(hbs.iter().all(|h| h.errors == 0), "{hbs:?}");
    let last = hbs.last().unwrap();
    // 1 MiB/s = 256 pages/s, 16 MiB/s = 4096 pages/s per heartbeat: never
    // over (+20 % for timing jitter), and at least half even on a loaded
    // machine (an idle one gives the exact figures).
    let per_sec = |x: u64| x as f64 / last.n as f64;
    assert!((128.0..310.0).contains(&per_sec(last.written)), "{last:?}");
    assert!(
        (2048.0..4900.0).contains(&per_sec(last.verified)),
        "{last:?}"
    );

    // Every page of the region is in the shared RAM file, exactly once.
    let ram = g.ram();
    let found = find_checker_pages(&ram, run);
    assert_eq!(
        found.len() as u64,
        pages,
        "distinct checker pages in guest RAM"
    );
    assert!(
        found.values().all(|v| v.len() == 1),
        "stray copies of checker pages"
    );
    let at = |i: u64| found[&i][0];

    // 1. One flipped bit in a page the checker only reads.
    let cold = pages / 2 + 17;
    let mut b = [0u8; 1];
    ram.read_exact_at(&mut b, at(cold) + 2048).unwrap();
    ram.write_all_at(&[b[0] ^ 0x10], at(cold) + 2048).unwrap();
    // 2. A page zeroed (as if it never arrived).
    let zeroed = pages - 3;
    ram.write_all_at(&[0u8; PAGE], at(zeroed)).unwrap();
    // 3. A page of the write set put back to an older copy of itself.
    let hot = 100;
    let mut old = vec![0u8; PAGE];
    ram.read_exact_at(&mut old, at(hot)).unwrap();
    let old_gen = u64::from_le_bytes(old[24..32].try_into().unwrap());
    g.wait_for("a rewrite of the hot page", Duration::from_secs(10), |_| {
        let mut cur = [0u8; 32];
        ram.read_exact_at(&mut cur, at(hot)).unwrap();
        (u64::from_le_bytes(cur[24..32].try_into().unwrap()) > old_gen).then_some(())
    });
    ram.write_all_at(&old, at(hot)).unwrap();

    let t0 = Instant::now();
    let lines = g.wait_for(
        "PAGECHECK-ERROR for the three pages",
        Duration::from_secs(10),
        |c| {
            Some([
                error_for(c, cold)?,
                error_for(c, zeroed)?,
                error_for(c, hot)?,
            ])
        },
    );
    eprintln!(
        "{}: the three changes reported within {:.2} s:\n{}",
        g.name,
        t0.elapsed().as_secs_f64(),
        lines.join("\n")
    );
    assert_eq!(field(&lines[0], "found"), Some("corrupt"), "{}", lines[0]);
    assert_eq!(field(&lines[1], "found"), Some("zero"), "{}", lines[1]);
    // A stale page, unless the write-back raced with the guest's own write
    // of that page (then it is torn, which the checksum catches).
    let kind = field(&lines[2], "found").unwrap();
    assert!(kind == "stale" || kind == "corrupt", "{}", lines[2]);
    if kind == "stale" {
        assert_eq!(field(&lines[2], "gen"), Some(old_gen.to_string().as_str()));
    }

    // The heartbeat counts them once each and the checker carries on.
    let n = heartbeats(&g.console()).len();
    let hbs = g.wait_heartbeats(n + 2, Duration::from_secs(10));
    check_heartbeats(&hbs, true);
    assert_eq!(hbs.last().unwrap().errors, 3, "{:?}", hbs.last());
}

#[test]
fn stress_vm_runs_and_heartbeats() {
    let mut g = Guest::boot(
        "svm",
        "wanmig.workload=stress-vm wanmig.vmbytes=32M wanmig.mib=8 wanmig.rate=1 wanmig.readrate=8",
    );
    g.wait_up();
    g.wait_for(
        "stress-ng dispatching its vm hog",
        Duration::from_secs(20),
        |c| {
            c.lines()
                .find(|l| l.starts_with("stress-ng:") && l.contains("dispatching hogs: 1 vm"))
                .map(|_| ())
        },
    );
    let hbs = g.wait_heartbeats(3, Duration::from_secs(15));
    check_heartbeats(&hbs, true);
    assert!(hbs.iter().all(|h| h.errors == 0), "{hbs:?}");
    let c = g.console();
    assert!(
        !c.lines()
            .any(|l| l.contains("stress-ng: fail") || l.contains("stress-ng: error")),
        "stress-ng reported a failure:\n{c}"
    );
    // stress-ng is really running (and dirtying memory) next to the checker.
    assert!(
        !c.contains("WANMIG-WORKLOAD-EXIT"),
        "the workload ended early:\n{c}"
    );
}

#[test]
fn sysbench_cpu_runs_and_heartbeats() {
    let mut g = Guest::boot("sbc", "wanmig.workload=sysbench-cpu wanmig.cpuprime=2000");
    g.wait_up();
    // sysbench's own per-second report, and the companion checker's heartbeat.
    let eps = g.wait_for("two sysbench reports", Duration::from_secs(20), |c| {
        let eps: Vec<f64> = c
            .lines()
            .filter(|l| l.starts_with('[') && l.contains(" eps: "))
            .filter_map(|l| {
                l.split("eps: ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        (eps.len() >= 2).then_some(eps)
    });
    assert!(eps.iter().all(|&e| e > 0.0), "{eps:?}");
    let hbs = g.wait_heartbeats(2, Duration::from_secs(10));
    check_heartbeats(&hbs, true);
    assert!(hbs.iter().all(|h| h.errors == 0), "{hbs:?}");
}

/// Every disk heartbeat line (`DHB ...`, the fields of `HB`).
fn disk_heartbeats(console: &str) -> Vec<Hb> {
    let lines: String = console
        .lines()
        .filter_map(|l| l.strip_prefix("D").filter(|r| r.starts_with("HB ")))
        .map(|l| format!("{l}\n"))
        .collect();
    heartbeats(&lines)
}

#[test]
fn diskcheck_over_the_engines_nbd_server_catches_blocks_changed_behind_its_back() {
    use std::sync::Arc;
    use wanmig_datapath::nbd::{Export, FileImage, NbdServer};
    use wanmig_datapath::storage::ChunkLog;

    let dir = std::env::temp_dir().join(format!("wanmig-test-disk-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let image_path = dir.join("disk.raw");
    File::create(&image_path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let log = Arc::new(ChunkLog::new(64 << 20, 64 << 10));
    let sock = dir.join("nbd.sock");
    let _server = NbdServer::start(
        &sock,
        Export {
            name: "disk0".into(),
            device: Arc::new(FileImage::open(&image_path, false).unwrap()),
            log: Some(log.clone()),
        },
    )
    .unwrap();
    // 16 MiB checked; every block written as two direct writes (512-byte
    // cuts); rewrites at 1 MiB/s from block 0, the sweep at 8 MiB/s.
    let mut g = Guest::boot_with(
        "dk",
        "wanmig.workload=idle wanmig.disk=check wanmig.diskmib=16 wanmig.diskrate=1 \
         wanmig.diskreadrate=8 wanmig.disksplit=1",
        &[
            "-blockdev".into(),
            format!(
                "driver=nbd,node-name=disk0,server.type=unix,server.path={},export=disk0",
                sock.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=disk0".into(),
        ],
    );
    g.wait_up();
    let start = g.wait_for("DISKCHECK-START", Duration::from_secs(60), |c| {
        c.lines()
            .find(|l| l.starts_with("DISKCHECK-START ") || l.starts_with("DISKCHECK-FAILED"))
            .map(str::to_string)
    });
    assert!(start.starts_with("DISKCHECK-START "), "{start}");
    let run = u64::from_str_radix(field(&start, "run").unwrap(), 16).unwrap();
    let blocks: u64 = field(&start, "blocks").unwrap().parse().unwrap();
    assert_eq!(blocks, 16 * 256);
    let hbs = g.wait_for("3 disk heartbeats", Duration::from_secs(30), |c| {
        let h = disk_heartbeats(c);
        (h.len() >= 3).then_some(h)
    });
    check_heartbeats(&hbs, true);
    assert!(hbs.iter().all(|h| h.errors == 0), "{hbs:?}");

    // Block i of the disk is at byte i * 4096 of the image, tagged for it.
    let img = File::open(&image_path).unwrap();
    let mut b = vec![0u8; PAGE];
    for i in 0..blocks {
        img.read_exact_at(&mut b, i * PAGE as u64).unwrap();
        assert_eq!(&b[..8], MAGIC, "block {i}");
        assert_eq!(
            u64::from_le_bytes(b[8..16].try_into().unwrap()),
            run,
            "block {i}"
        );
        assert_eq!(
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
            i,
            "block {i}"
        );
    }
    // The export's log saw the writes: every chunk of the region dirty, and
    // the split writes never cover whole blocks.
    let dirty = log.take_dirty();
    assert!((0..256).all(|c| dirty.contains(&c)), "{dirty:?}");
    let mut split = Vec::new();
    log.take_interval(|c, i| split.push((c, i.written && !i.overwritten)));
    assert!(
        (0..256).all(|c| split.contains(&(c, true))),
        "every chunk of the region written, never whole blocks: {split:?}"
    );

    // Blocks the writer reaches last (it starts at 0): a flipped bit, a
    // zeroed block. The sweep must report both.
    let rw = File::options().write(true).open(&image_path).unwrap();
    let (cold, zeroed) = (blocks - 90, blocks - 5);
    img.read_exact_at(&mut b[..1], cold * PAGE as u64 + 3000)
        .unwrap();
    rw.write_all_at(&[b[0] ^ 0x04], cold * PAGE as u64 + 3000)
        .unwrap();
    rw.write_all_at(&[0u8; PAGE], zeroed * PAGE as u64).unwrap();
    let disk_error = |c: &str, block: u64| {
        c.lines()
            .find(|l| {
                l.starts_with("DISKCHECK-ERROR ") && field(l, "page") == Some(&block.to_string())
            })
            .map(str::to_string)
    };
    let lines = g.wait_for(
        "DISKCHECK-ERROR for both blocks",
        Duration::from_secs(15),
        |c| Some([disk_error(c, cold)?, disk_error(c, zeroed)?]),
    );
    assert_eq!(field(&lines[0], "found"), Some("corrupt"), "{}", lines[0]);
    assert_eq!(field(&lines[1], "found"), Some("zero"), "{}", lines[1]);
    let n = disk_heartbeats(&g.console()).len();
    let hbs = g.wait_for("2 more disk heartbeats", Duration::from_secs(10), |c| {
        let h = disk_heartbeats(c);
        (h.len() >= n + 2).then_some(h)
    });
    assert_eq!(hbs.last().unwrap().errors, 2, "{:?}", hbs.last());
    drop(g);
    let _ = fs::remove_dir_all(&dir);
}
