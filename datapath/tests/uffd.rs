//! Real-kernel tests of `wanmig_datapath::uffd` (no mocks): userfaultfd
//! MISSING/MINOR/WP-async on shared memory, in this process and in a child
//! process that hands over its userfaultfd like QEMU's preload library does,
//! and `PAGEMAP_SCAN` dirty tracking. Needs Linux 6.7+ with userfaultfd
//! (root, or `/dev/userfaultfd` access).
//!
//! The `measure_*` tests print figures (they assert only correctness); for
//! clean numbers run them alone:
//! `cargo test -p wanmig-datapath --release --test uffd measure_ -- --nocapture --test-threads=1`.
//!
//! Cross-process tests re-execute this test binary as the *target* process
//! (`child_process_entry`, selected by an environment variable); the child
//! maps a `/dev/shm/wanmig-test-*` file, registers it and passes its
//! userfaultfd over a unix socket, then obeys line commands on that socket.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, mpsc};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};
use wanmig_datapath::uffd::{
    AdoptError, ApiError, CopyError, CopyFlags, CopyOutcome, DirtyBitmap, Errno, Event, Features,
    Mode, PagemapScanner, PollError, ReadError, ReadSampler, RegisterError, RemoteAddr,
    RemoteRange, ScanError, UnregisterError, Userfaultfd, WriteProtectError, ZeropageError,
    page_size, recv_fd, send_fd, write_protect_all,
};

const PS: usize = 4096;
const PS64: u64 = PS as u64;

// ---------------------------------------------------------------------------
// helpers

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = splitmix(self.0);
        self.0 % n
    }
}

/// The content of page `page` for `seed`: distinct for every page and seed.
fn fill_page(seed: u64, page: u64, out: &mut [u8]) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&splitmix(seed ^ (page << 20) ^ i as u64).to_le_bytes());
    }
}

/// `pages` pages of [`fill_page`] content.
fn image(seed: u64, pages: u64) -> Vec<u8> {
    let mut v = vec![0u8; pages as usize * PS];
    for (p, chunk) in v.chunks_exact_mut(PS).enumerate() {
        fill_page(seed, p as u64, chunk);
    }
    v
}

fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A `/dev/shm/wanmig-test-*` file, removed on drop.
struct ShmPath(PathBuf);
impl ShmPath {
    fn new(tag: &str) -> Self {
        ShmPath(PathBuf::from(format!(
            "/dev/shm/wanmig-test-{}-{tag}-{}",
            std::process::id(),
            unique()
        )))
    }
}
impl Drop for ShmPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A shared mapping of a fresh shm file of `pages` pages, in this process.
struct Region {
    _path: ShmPath,
    file: File,
    map: MmapRaw,
    pages: u64,
}

impl Region {
    fn new(tag: &str, pages: u64) -> Self {
        let path = ShmPath::new(tag);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path.0)
            .unwrap();
        file.set_len(pages * PS64).unwrap();
        let map = MmapOptions::new()
            .len(pages as usize * PS)
            .map_raw(&file)
            .unwrap();
        Region {
            _path: path,
            file,
            map,
            pages,
        }
    }
    fn range(&self) -> RemoteRange {
        RemoteRange::of_local(self.map.as_ptr(), self.pages as usize * PS)
    }
    fn addr(&self, page: u64) -> RemoteAddr {
        RemoteAddr::of_local(self.map.as_ptr())
            .checked_add(page * PS64)
            .unwrap()
    }
    fn base(&self) -> usize {
        self.map.as_ptr() as usize
    }
}

/// Reads one word of page `page` of the mapping at `base` (may fault).
fn touch_read(base: usize, page: u64) -> u64 {
    // SAFETY: `base` is a live shared mapping of more than `page` pages; a
    // volatile read of an aligned word inside it.
    unsafe { std::ptr::read_volatile((base + page as usize * PS) as *const u64) }
}

/// Writes one word of page `page` of the mapping at `base` (may fault).
fn touch_write(base: usize, page: u64, value: u64) {
    // SAFETY: as in `touch_read`; the mapping is writable.
    unsafe { std::ptr::write_volatile((base + page as usize * PS + 64) as *mut u64, value) }
}

/// Whether page `page` at `base` holds `expected` (after it has been touched).
fn page_equals(base: usize, page: u64, expected: &[u8]) -> bool {
    // SAFETY: the page is mapped and present (touched before); nothing writes
    // it while the test compares it.
    let got = unsafe { std::slice::from_raw_parts((base + page as usize * PS) as *const u8, PS) };
    got == expected
}

fn new_uffd(features: Features, mode: Mode, range: RemoteRange) -> Userfaultfd {
    let uffd = Userfaultfd::create(true).unwrap();
    uffd.api(features).unwrap();
    uffd.register(range, mode).unwrap();
    uffd
}

fn pages_of(range: RemoteRange, addr: RemoteAddr) -> u64 {
    addr.offset_from(range.start).unwrap() / PS64
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn unpin() {
    // SAFETY: as in `pin_to_cpu`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// What a fault server saw.
#[derive(Debug, Default)]
struct Served {
    faults: u64,
    installed: u64,
    lost_races: u64,
    target_gone: Option<Errno>,
}

/// Serves MISSING faults on `range` from `image` until `stop` or the target is
/// gone; a lost race (page already installed) is answered with a wake.
fn serve_faults(
    uffd: &Userfaultfd,
    range: RemoteRange,
    image: &[u8],
    flags: CopyFlags,
    stop: &AtomicBool,
) -> Served {
    serve_faults_with(uffd, range, image, flags, stop, &|_| {})
}

/// [`serve_faults`], calling `before_copy(page)` before answering each fault.
fn serve_faults_with(
    uffd: &Userfaultfd,
    range: RemoteRange,
    image: &[u8],
    flags: CopyFlags,
    stop: &AtomicBool,
    before_copy: &(dyn Fn(u64) + Sync),
) -> Served {
    let mut served = Served::default();
    let mut events = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !uffd.poll_readable(Some(Duration::from_millis(5))).unwrap() {
            continue;
        }
        events.clear();
        uffd.read_events(&mut events).unwrap();
        for ev in &events {
            let Event::Pagefault { addr, .. } = ev else {
                panic!("unexpected event {ev:?}");
            };
            let addr = addr.align_down(PS64);
            let p = pages_of(range, addr) as usize;
            served.faults += 1;
            before_copy(p as u64);
            match uffd.copy(addr, &image[p * PS..(p + 1) * PS], flags) {
                Ok(o) => {
                    served.installed += o.installed;
                    if o.lost_race() {
                        served.lost_races += 1;
                        uffd.wake(RemoteRange::new(addr, PS64)).unwrap();
                    }
                }
                Err(CopyError::TargetGone { errno, .. }) => {
                    served.target_gone = Some(errno);
                    return served;
                }
                Err(e) => panic!("serving {addr}: {e}"),
            }
        }
    }
    served
}

// ---------------------------------------------------------------------------
// the child (target) process

const CHILD_ENV: &str = "WANMIG_UFFD_TEST_CHILD";

/// How the child registers its mapping.
#[derive(Clone, Copy)]
struct TargetSpec {
    features: Features,
    mode: Mode,
    pages: u64,
    /// Pages written before registration (populated).
    prepopulate: u64,
}

/// A child process whose mapping the test serves or tracks.
struct Target {
    child: Child,
    ctl: BufReader<UnixStream>,
    uffd: Option<Userfaultfd>,
    range: RemoteRange,
    pid: u32,
    _path: ShmPath,
}

impl Target {
    fn spawn(tag: &str, spec: TargetSpec) -> Target {
        let name = format!("wanmig-uffd-test-{}-{}", std::process::id(), unique());
        let listener =
            UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        listener.set_nonblocking(true).unwrap();
        let path = ShmPath::new(tag);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .env("WANMIG_UFFD_SOCK", &name)
            .env("WANMIG_UFFD_PATH", &path.0)
            .env("WANMIG_UFFD_FEATURES", spec.features.bits().to_string())
            .env("WANMIG_UFFD_MODE", spec.mode.bits().to_string())
            .env("WANMIG_UFFD_PAGES", spec.pages.to_string())
            .env("WANMIG_UFFD_PREPOPULATE", spec.prepopulate.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let sock = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(st) = child.try_wait().unwrap() {
                        panic!("target exited before connecting: {st}");
                    }
                    assert!(Instant::now() < deadline, "target never connected");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        sock.set_nonblocking(false).unwrap();
        let mut hello = [0u8; 20];
        let fd = recv_fd(&sock, &mut hello).unwrap();
        let base = u64::from_le_bytes(hello[0..8].try_into().unwrap());
        let len = u64::from_le_bytes(hello[8..16].try_into().unwrap());
        let pid = u32::from_le_bytes(hello[16..20].try_into().unwrap());
        assert_eq!(pid, child.id());
        assert_eq!(len, spec.pages * PS64);
        let uffd = Userfaultfd::from_owned_fd(fd).unwrap();
        Target {
            child,
            ctl: BufReader::new(sock),
            uffd: Some(uffd),
            range: RemoteRange::new(RemoteAddr(base), len),
            pid,
            _path: path,
        }
    }

    fn uffd(&self) -> &Userfaultfd {
        self.uffd.as_ref().unwrap()
    }

    /// Sends a command line without waiting for the answer.
    fn send(&mut self, line: &str) {
        let s = self.ctl.get_mut();
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
    }

    /// Reads the answer line of the last command.
    fn answer(&mut self) -> String {
        let mut line = String::new();
        let n = self.ctl.read_line(&mut line).unwrap();
        if n == 0 {
            let st = self.child.wait().unwrap();
            panic!("target closed its socket (exit status {st})");
        }
        line.trim_end().to_owned()
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.answer()
    }

    fn write_pages(&mut self, pages: &[u64]) {
        let list: Vec<String> = pages.iter().map(u64::to_string).collect();
        assert_eq!(self.cmd(&format!("write {}", list.join(" "))), "ok");
    }

    fn read_pages(&mut self, pages: &[u64]) {
        let list: Vec<String> = pages.iter().map(u64::to_string).collect();
        assert_eq!(self.cmd(&format!("read {}", list.join(" "))), "ok");
    }

    /// Parses "ok BAD MEDIAN_NS P99_NS MAX_NS" from a `verify` command.
    fn verify(&mut self, seed: u64, first: u64, count: u64) -> [u64; 4] {
        let a = self.cmd(&format!("verify {seed} {first} {count}"));
        parse_ok(&a)
    }

    fn exit(mut self) {
        assert_eq!(self.cmd("exit"), "bye");
        let st = self.child.wait().unwrap();
        assert!(st.success(), "target failed: {st}");
    }
}

fn parse_ok<const N: usize>(answer: &str) -> [u64; N] {
    let mut it = answer.split(' ');
    assert_eq!(it.next(), Some("ok"), "answer {answer:?}");
    let v: Vec<u64> = it.map(|x| x.parse().unwrap()).collect();
    v.try_into().unwrap_or_else(|_| panic!("answer {answer:?}"))
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Entry point of the child process (a no-op in a normal test run).
#[test]
fn child_process_entry() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let env = |k: &str| std::env::var(k).unwrap();
    let num = |k: &str| env(k).parse::<u64>().unwrap();
    let sock = UnixStream::connect_addr(
        &SocketAddr::from_abstract_name(env("WANMIG_UFFD_SOCK").as_bytes()).unwrap(),
    )
    .unwrap();
    let pages = num("WANMIG_UFFD_PAGES");
    let len = pages * PS64;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(env("WANMIG_UFFD_PATH"))
        .unwrap();
    file.set_len(len).unwrap();
    let map = MmapOptions::new().len(len as usize).map_raw(&file).unwrap();
    let base = map.as_ptr() as usize;
    for p in 0..num("WANMIG_UFFD_PREPOPULATE") {
        touch_write(base, p, 1);
    }
    let mode_bits = num("WANMIG_UFFD_MODE");
    let mode = Mode {
        missing: mode_bits & 1 != 0,
        wp: mode_bits & 2 != 0,
        minor: mode_bits & 4 != 0,
    };
    let range = RemoteRange::of_local(map.as_ptr(), len as usize);
    let uffd = Userfaultfd::create(false).unwrap();
    uffd.api(Features::from_bits(num("WANMIG_UFFD_FEATURES")))
        .unwrap();
    uffd.register(range, mode).unwrap();
    let mut hello = Vec::new();
    hello.extend_from_slice(&(base as u64).to_le_bytes());
    hello.extend_from_slice(&len.to_le_bytes());
    hello.extend_from_slice(&std::process::id().to_le_bytes());
    send_fd(&sock, uffd.as_fd(), &hello).unwrap();
    // Like the preload library, keep no copy: the registration lives on
    // through the engine's descriptor.
    drop(uffd);

    let mut reader = BufReader::new(sock.try_clone().unwrap());
    let mut out = sock;
    let mut expected = vec![0u8; PS];
    let mut line = String::new();
    let mut generation = 0u64;
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            return;
        }
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap();
        let args: Vec<u64> = words.map(|w| w.parse().unwrap()).collect();
        let answer = match cmd {
            // verify SEED FIRST COUNT: touch each page (timing the first
            // access) and compare it with the served content.
            "verify" => {
                let (seed, first, count) = (args[0], args[1], args[2]);
                let mut lat = Vec::with_capacity(count as usize);
                let mut bad = 0;
                for p in first..first + count {
                    let t = Instant::now();
                    touch_read(base, p);
                    lat.push(t.elapsed().as_nanos() as u64);
                    fill_page(seed, p, &mut expected);
                    if !page_equals(base, p, &expected) {
                        bad += 1;
                    }
                }
                lat.sort_unstable();
                format!(
                    "ok {bad} {} {} {}",
                    percentile(&lat, 0.5),
                    percentile(&lat, 0.99),
                    lat.last().copied().unwrap_or(0)
                )
            }
            "write" => {
                for &p in &args {
                    generation += 1;
                    touch_write(base, p, generation);
                }
                "ok".to_owned()
            }
            // write-random SEED COUNT: COUNT writes to random pages, as fast as
            // possible (the parent derives the same pages from SEED).
            "write-random" => {
                let mut rng = Rng(args[0]);
                for _ in 0..args[1] {
                    generation += 1;
                    touch_write(base, rng.below(pages), generation);
                }
                "ok".to_owned()
            }
            // write-range FIRST COUNT
            "write-range" => {
                for p in args[0]..args[0] + args[1] {
                    generation += 1;
                    touch_write(base, p, generation);
                }
                "ok".to_owned()
            }
            "read" => {
                for &p in &args {
                    touch_read(base, p);
                }
                "ok".to_owned()
            }
            "exit" => {
                writeln!(out, "bye").unwrap();
                return;
            }
            other => panic!("unknown command {other}"),
        };
        writeln!(out, "{answer}").unwrap();
    }
}

// ---------------------------------------------------------------------------
// negotiation and hostile input

#[test]
fn kernel_offers_the_features_the_engine_needs() {
    assert_eq!(page_size(), PS64, "these tests assume 4 KiB pages");
    let offered = Userfaultfd::probe_features().unwrap();
    let needed = Features::WP_ASYNC
        | Features::WP_UNPOPULATED
        | Features::MISSING_SHMEM
        | Features::MINOR_SHMEM;
    assert!(
        offered.contains(needed),
        "this kernel lacks userfaultfd features {} (offers {offered}); the engine needs Linux 6.7+ with them",
        needed - offered
    );
    println!("userfaultfd features offered: {offered}");

    // The same through /dev/userfaultfd, and the API answers on a real fd.
    let dev = Userfaultfd::create_via_device(true).unwrap();
    assert!(dev.api(needed).unwrap().contains(needed));
    // fdinfo reports what was enabled (WP_ASYNC adds WP_UNPOPULATED).
    let uffd = Userfaultfd::create(true).unwrap();
    assert_eq!(uffd.negotiated_features().unwrap(), None);
    uffd.api(Features::WP_ASYNC | Features::MISSING_SHMEM)
        .unwrap();
    assert_eq!(
        uffd.negotiated_features().unwrap(),
        Some(Features::WP_ASYNC | Features::WP_UNPOPULATED | Features::MISSING_SHMEM)
    );
    // Once per descriptor.
    assert!(matches!(
        uffd.api(Features::EMPTY),
        Err(ApiError::AlreadyNegotiated { .. })
    ));
    // A feature no kernel has is named as missing, and the fd stays usable.
    let fresh = Userfaultfd::create(true).unwrap();
    let bogus = Features::from_bits(1 << 40);
    match fresh.api(bogus | Features::MISSING_SHMEM) {
        Err(ApiError::Unsupported { missing, .. }) => assert_eq!(missing, bogus),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    fresh.api(Features::MISSING_SHMEM).unwrap();
}

#[test]
fn received_descriptor_that_is_not_a_userfaultfd_is_refused() {
    let (a, b) = UnixStream::pair().unwrap();
    let (_r, w) = std::io::pipe().unwrap();
    send_fd(&a, w.as_fd(), b"hello").unwrap();
    let mut buf = [0u8; 5];
    let fd = recv_fd(&b, &mut buf).unwrap();
    match Userfaultfd::from_owned_fd(fd) {
        Err(AdoptError::NotUserfaultfd { kind, .. }) => {
            assert!(kind.starts_with("pipe:"), "{kind}")
        }
        other => panic!("expected NotUserfaultfd, got {other:?}"),
    }

    // A userfaultfd whose API was never negotiated: typed errors everywhere.
    let raw = Userfaultfd::create(false).unwrap();
    send_fd(&a, raw.as_fd(), b"hello").unwrap();
    let uffd = Userfaultfd::from_owned_fd(recv_fd(&b, &mut buf).unwrap()).unwrap();
    assert_eq!(uffd.negotiated_features().unwrap(), None);
    let mut events = Vec::new();
    assert!(matches!(
        uffd.read_events(&mut events),
        Err(ReadError::NotInitialized { .. })
    ));
    assert!(matches!(
        uffd.poll_readable(Some(Duration::ZERO)),
        Err(PollError::NotInitialized)
    ));
    let region = Region::new("uninit", 4);
    assert!(matches!(
        uffd.register(region.range(), Mode::MISSING),
        Err(RegisterError::Invalid { .. })
    ));
    assert!(matches!(
        uffd.register(RemoteRange::new(region.range().start, 100), Mode::MISSING),
        Err(RegisterError::Misaligned { .. })
    ));
}

// ---------------------------------------------------------------------------
// MISSING in this process

#[test]
fn missing_faults_in_process_are_served_with_copy() {
    let pages = 256;
    let region = Region::new("missing", pages);
    let range = region.range();
    let uffd = new_uffd(Features::MISSING_SHMEM, Mode::MISSING, range);
    let img = image(7, pages);
    let stop = AtomicBool::new(false);
    let base = region.base();
    let (bad, served) = std::thread::scope(|s| {
        let server = s.spawn(|| serve_faults(&uffd, range, &img, CopyFlags::default(), &stop));
        let mut bad = 0;
        let mut rng = Rng(1);
        // Every page, in random order.
        let mut order: Vec<u64> = (0..pages).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for p in order {
            touch_read(base, p);
            if !page_equals(base, p, &img[p as usize * PS..][..PS]) {
                bad += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        (bad, server.join().unwrap())
    });
    assert_eq!(bad, 0);
    assert_eq!(served.faults, pages, "one fault per page");
    assert_eq!(served.installed, pages * PS64);
    assert_eq!(served.lost_races, 0);
}

#[test]
fn zeropage_fills_zeros_and_skips_present_pages() {
    let region = Region::new("zero", 16);
    let range = region.range();
    let uffd = new_uffd(Features::MISSING_SHMEM, Mode::MISSING, range);
    let img = image(3, 16);
    // Page 4 installed first; zero the rest around it without anyone faulting.
    uffd.copy(region.addr(4), &img[4 * PS..5 * PS], CopyFlags::default())
        .unwrap();
    let o = uffd.zeropage(region.addr(0), 16 * PS64, false).unwrap();
    assert_eq!(
        o,
        CopyOutcome {
            installed: 15 * PS64,
            skipped: PS64,
            ioctls: 3
        }
    );
    let base = region.base();
    for p in 0..16 {
        touch_read(base, p);
        let expected = if p == 4 {
            img[4 * PS..5 * PS].to_vec()
        } else {
            vec![0; PS]
        };
        assert!(page_equals(base, p, &expected), "page {p}");
    }
    assert!(matches!(
        uffd.zeropage(RemoteAddr(region.addr(0).get() + 1), PS64, false),
        Err(ZeropageError::Misaligned { .. })
    ));
}

#[test]
fn copy_continues_partial_progress_and_counts_skipped_pages() {
    let region = Region::new("partial", 32);
    let range = region.range();
    let uffd = new_uffd(Features::MISSING_SHMEM, Mode::MISSING, range);
    let first = image(11, 32);
    let second = image(12, 32);
    uffd.copy(region.addr(5), &first[5 * PS..6 * PS], CopyFlags::default())
        .unwrap();
    uffd.copy(
        region.addr(9),
        &first[9 * PS..11 * PS],
        CopyFlags::default(),
    )
    .unwrap();
    // Pages 5, 9, 10 present: EAGAIN(5 pages) EEXIST EAGAIN(3) EEXIST EEXIST rest.
    let o = uffd
        .copy(region.addr(0), &second[..16 * PS], CopyFlags::default())
        .unwrap();
    assert_eq!(o.installed, 13 * PS64);
    assert_eq!(o.skipped, 3 * PS64);
    assert!(o.lost_race());
    assert_eq!(o.ioctls, 6);
    let base = region.base();
    for p in 0..16u64 {
        touch_read(base, p);
        let src = if [5, 9, 10].contains(&p) {
            &first
        } else {
            &second
        };
        assert!(
            page_equals(base, p, &src[p as usize * PS..][..PS]),
            "page {p}"
        );
    }
    // Misaligned source length.
    assert!(matches!(
        uffd.copy(region.addr(20), &second[..100], CopyFlags::default()),
        Err(CopyError::Misaligned { .. })
    ));
    // A range running past the registered mapping.
    let past = uffd.copy(region.addr(30), &second[..4 * PS], CopyFlags::default());
    println!("copy across the end of the registered mapping: {past:?}");
    assert!(past.is_err());
}

#[test]
fn racing_installers_resolve_each_fault_once_with_right_data() {
    let pages = 200u64;
    let region = Region::new("race", pages);
    let range = region.range();
    let uffd = new_uffd(Features::MISSING_SHMEM, Mode::MISSING, range);
    let img = image(21, pages);
    let base = region.base();
    let barrier = Barrier::new(2);
    let mut faults_per_page = vec![0u32; pages as usize];
    let mut outcomes: Vec<[Option<CopyOutcome>; 2]> = vec![[None, None]; pages as usize];
    let bad = std::thread::scope(|s| {
        let faulter = s.spawn(|| {
            let mut bad = 0;
            for p in 0..pages {
                touch_read(base, p);
                if !page_equals(base, p, &img[p as usize * PS..][..PS]) {
                    bad += 1;
                }
            }
            bad
        });
        let (otx, orx) = mpsc::channel::<(usize, u64, CopyOutcome)>();
        let mut txs = Vec::new();
        for who in 0..2usize {
            let (tx, rx) = mpsc::channel::<u64>();
            txs.push(tx);
            let (otx, barrier, uffd, img) = (otx.clone(), &barrier, &uffd, &img);
            s.spawn(move || {
                // Installer 0 is the "background push" (dontwake), 1 the
                // fault path; both install the same page at the same time.
                for p in rx {
                    barrier.wait();
                    let addr = RemoteAddr(range.start.get() + p * PS64);
                    let flags = CopyFlags {
                        dontwake: who == 0,
                        wp: false,
                    };
                    let o = uffd
                        .copy(addr, &img[p as usize * PS..][..PS], flags)
                        .unwrap();
                    if o.lost_race() {
                        uffd.wake(RemoteRange::new(addr, PS64)).unwrap();
                    }
                    otx.send((who, p, o)).unwrap();
                }
            });
        }
        let mut events = Vec::new();
        while !faulter.is_finished() {
            if !uffd.poll_readable(Some(Duration::from_millis(5))).unwrap() {
                continue;
            }
            events.clear();
            uffd.read_events(&mut events).unwrap();
            for ev in &events {
                let Event::Pagefault { addr, .. } = ev else {
                    panic!("unexpected {ev:?}");
                };
                let p = pages_of(range, *addr);
                faults_per_page[p as usize] += 1;
                for tx in &txs {
                    tx.send(p).unwrap();
                }
                for _ in 0..2 {
                    let (who, p, o) = orx.recv().unwrap();
                    outcomes[p as usize][who] = Some(o);
                }
            }
        }
        drop(txs);
        faulter.join().unwrap()
    });
    assert_eq!(bad, 0, "the faulting thread saw wrong data");
    assert!(
        faults_per_page.iter().all(|&n| n == 1),
        "a page faulted more than once (woken before it was installed)"
    );
    let mut wins = [0u64; 2];
    for (p, o) in outcomes.iter().enumerate() {
        let [Some(a), Some(b)] = o else {
            panic!("page {p}: missing outcome");
        };
        let one_each = (a.installed, a.skipped, b.installed, b.skipped);
        assert!(
            one_each == (PS64, 0, 0, PS64) || one_each == (0, PS64, PS64, 0),
            "page {p}: {a:?} / {b:?}"
        );
        wins[usize::from(b.installed > 0)] += 1;
    }
    println!(
        "race winners: background {} / fault path {}",
        wins[0], wins[1]
    );
}

#[test]
fn background_push_and_fault_path_install_every_page_exactly_once() {
    let pages = 4096u64;
    let region = Region::new("push", pages);
    let range = region.range();
    let uffd = new_uffd(Features::MISSING_SHMEM, Mode::MISSING, range);
    let img = image(33, pages);
    let base = region.base();
    let stop = AtomicBool::new(false);
    let (bad, served, pushed) = std::thread::scope(|s| {
        let server = s.spawn(|| serve_faults(&uffd, range, &img, CopyFlags::default(), &stop));
        let pusher = s.spawn(|| {
            let mut total = CopyOutcome::default();
            for chunk in 0..pages / 16 {
                let off = chunk * 16 * PS64;
                let o = uffd
                    .copy(
                        RemoteAddr(range.start.get() + off),
                        &img[off as usize..][..16 * PS],
                        CopyFlags {
                            dontwake: true,
                            wp: false,
                        },
                    )
                    .unwrap();
                total.installed += o.installed;
                total.skipped += o.skipped;
                total.ioctls += o.ioctls;
            }
            total
        });
        let mut rng = Rng(5);
        let mut bad = 0;
        for _ in 0..3000 {
            let p = rng.below(pages);
            touch_read(base, p);
            if !page_equals(base, p, &img[p as usize * PS..][..PS]) {
                bad += 1;
            }
        }
        let pushed = pusher.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        (bad, server.join().unwrap(), pushed)
    });
    assert_eq!(bad, 0);
    assert_eq!(pushed.installed + pushed.skipped, pages * PS64);
    assert_eq!(
        pushed.installed + served.installed,
        pages * PS64,
        "every page installed exactly once (push {pushed:?}, faults {served:?})"
    );
    println!(
        "push: {} pages installed, {} skipped in {} ioctls; fault path: {} faults, {} lost races",
        pushed.installed / PS64,
        pushed.skipped / PS64,
        pushed.ioctls,
        served.faults,
        served.lost_races
    );
}

#[test]
fn minor_faults_are_resolved_with_continue() {
    let pages = 8u64;
    let region = Region::new("minor", pages);
    let img = image(44, pages);
    // Page cache populated through the file, not the mapping: no PTEs yet.
    (&region.file).write_all(&img).unwrap();
    let range = region.range();
    let uffd = new_uffd(Features::MINOR_SHMEM, Mode::MINOR, range);
    let base = region.base();
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            (0..pages)
                .filter(|&p| {
                    touch_read(base, p);
                    !page_equals(base, p, &img[p as usize * PS..][..PS])
                })
                .count()
        });
        let mut seen = 0;
        let mut events = Vec::new();
        while seen < pages {
            assert!(uffd.poll_readable(Some(Duration::from_secs(10))).unwrap());
            events.clear();
            uffd.read_events(&mut events).unwrap();
            for ev in &events {
                let Event::Pagefault {
                    addr, minor, write, ..
                } = ev
                else {
                    panic!("unexpected {ev:?}");
                };
                assert!(*minor && !*write);
                let o = uffd
                    .continue_(RemoteRange::new(*addr, PS64), false)
                    .unwrap();
                assert_eq!(o.installed, PS64);
                seen += 1;
            }
        }
        assert_eq!(reader.join().unwrap(), 0);
    });
}

// ---------------------------------------------------------------------------
// across processes

#[test]
fn cross_process_missing_faults_are_served_into_the_child() {
    let pages = 1024;
    let mut t = Target::spawn(
        "xmissing",
        TargetSpec {
            features: Features::MISSING_SHMEM,
            mode: Mode::MISSING,
            pages,
            prepopulate: 0,
        },
    );
    assert_eq!(
        t.uffd().negotiated_features().unwrap(),
        Some(Features::MISSING_SHMEM)
    );
    let img = image(99, pages);
    let stop = AtomicBool::new(false);
    let range = t.range;
    let uffd = t.uffd.take().unwrap();
    let (res, served) = std::thread::scope(|s| {
        let server = s.spawn(|| serve_faults(&uffd, range, &img, CopyFlags::default(), &stop));
        let res = t.verify(99, 0, pages);
        stop.store(true, Ordering::Relaxed);
        (res, server.join().unwrap())
    });
    assert_eq!(res[0], 0, "the child saw wrong bytes");
    assert_eq!(served.faults, pages);
    println!(
        "cross-process fault round trip over {pages} faults: median {} ns, p99 {} ns, max {} ns",
        res[1], res[2], res[3]
    );
    t.uffd = Some(uffd);
    t.exit();
}

/// Kills `pid` and waits until it is a zombie: its address space is gone
/// then, though nobody has reaped it.
fn kill_and_wait_zombie(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        if matches!(state, Some("Z" | "X") | None) {
            return;
        }
        assert!(Instant::now() < deadline, "{pid} did not die");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn target_exit_mid_serve_ends_the_server_cleanly() {
    let pages = 64;
    let mut t = Target::spawn(
        "xexit",
        TargetSpec {
            features: Features::MISSING_SHMEM,
            mode: Mode::MISSING,
            pages,
            prepopulate: 0,
        },
    );
    let img = image(5, pages);
    // The child faults on every page in turn; the server answers ten, and
    // while the eleventh is pending the child dies.
    t.send(&format!("verify 5 0 {pages}"));
    let uffd = t.uffd.take().unwrap();
    let (range, pid) = (t.range, t.pid);
    let stop = AtomicBool::new(false);
    let served = serve_faults_with(&uffd, range, &img, CopyFlags::default(), &stop, &|p| {
        if p == 10 {
            kill_and_wait_zombie(pid);
        }
    });
    assert_eq!(served.faults, 11);
    assert_eq!(served.installed, 10 * PS64);
    let errno = served.target_gone.expect("the server ends on TargetGone");
    println!("copy after the target exited: {errno}");
    assert_eq!(errno, Errno(libc::ESRCH));
    // Every other call fails the same way or finds nothing; none blocks.
    assert!(matches!(
        uffd.zeropage(range.start, PS64, false),
        Err(ZeropageError::TargetGone { .. })
    ));
    assert!(!uffd.poll_readable(Some(Duration::from_millis(20))).unwrap());
    let mut events = Vec::new();
    assert_eq!(uffd.read_events(&mut events).unwrap(), 0);
    uffd.wake(range).unwrap();
    // Unregistering finds the mappings torn down: ENOMEM, not ESRCH.
    assert!(matches!(
        uffd.unregister(range),
        Err(UnregisterError::NotMapped { .. })
    ));
    t.child.wait().unwrap();
}

/// Distinct random pages.
fn random_pages(rng: &mut Rng, pages: u64, n: usize) -> Vec<u64> {
    let mut set = std::collections::BTreeSet::new();
    while set.len() < n {
        set.insert(rng.below(pages));
    }
    set.into_iter().collect()
}

fn bitmap_pages(b: &DirtyBitmap) -> Vec<u64> {
    b.iter_set().collect()
}

#[test]
fn cross_process_wp_async_dirty_log_is_exact() {
    let pages = 4096u64; // 16 MiB: first half populated, second half never
    let mut t = Target::spawn(
        "xwp",
        TargetSpec {
            features: Features::WP_ASYNC | Features::WP_UNPOPULATED,
            mode: Mode::WP,
            pages,
            prepopulate: pages / 2,
        },
    );
    let negotiated = t.uffd().negotiated_features().unwrap().unwrap();
    assert!(negotiated.contains(Features::WP_ASYNC), "{negotiated}");
    let range = t.range;
    let mut scanner = PagemapScanner::open(t.pid, range).unwrap();
    let mut small = PagemapScanner::open(t.pid, range)
        .unwrap()
        .with_region_capacity(7);
    let mut dirty = DirtyBitmap::new(range).unwrap();
    write_protect_all(t.uffd(), range).unwrap();

    let s = scanner.scan_written_and_protect(&mut dirty).unwrap();
    assert_eq!(
        s.pages,
        0,
        "written pages right after arming: {:?}",
        bitmap_pages(&dirty)
    );

    let mut rng = Rng(2024);
    for round in 0..3 {
        // A random set, some pages written several times, in both halves.
        let set = random_pages(&mut rng, pages, 300);
        let mut writes = set.clone();
        writes.extend(set.iter().step_by(3));
        writes.extend(set.iter().step_by(7));
        t.write_pages(&writes);
        // Reads (of populated and never-populated pages) are not writes.
        let reads: Vec<u64> = random_pages(&mut rng, pages, 200)
            .into_iter()
            .filter(|p| set.binary_search(p).is_err())
            .collect();
        t.read_pages(&reads);

        // Read-only scans see the set and change nothing (small vector: many
        // continuation calls through walk_end).
        let mut check = DirtyBitmap::new(range).unwrap();
        let st = small.scan_written(&mut check).unwrap();
        assert_eq!(bitmap_pages(&check), set, "round {round}: read-only scan");
        assert!(st.ioctls > 1);
        check.clear();
        scanner.scan_written(&mut check).unwrap();
        assert_eq!(
            bitmap_pages(&check),
            set,
            "round {round}: second read-only scan"
        );

        dirty.clear();
        let st = scanner.scan_written_and_protect(&mut dirty).unwrap();
        assert_eq!(bitmap_pages(&dirty), set, "round {round}: scan and protect");
        assert_eq!(st.pages, set.len() as u64);

        // Nothing written since: empty.
        dirty.clear();
        scanner.scan_written_and_protect(&mut dirty).unwrap();
        assert!(!dirty.any(), "round {round}: {:?}", bitmap_pages(&dirty));
    }
    let uffd = t.uffd.take().unwrap();
    t.exit();
    // The target is gone: the scan says so instead of reporting "clean".
    let err = scanner.scan_written_and_protect(&mut dirty).unwrap_err();
    assert!(matches!(err, ScanError::TargetGone { .. }), "{err}");
    let err = write_protect_all(&uffd, range).unwrap_err();
    assert!(matches!(err, WriteProtectError::TargetGone { .. }), "{err}");
}

#[test]
fn wp_async_scans_racing_a_busy_writer_miss_nothing() {
    let pages = 65_536u64; // 256 MiB
    let mut t = Target::spawn(
        "xbusy",
        TargetSpec {
            features: Features::WP_ASYNC,
            mode: Mode::WP,
            pages,
            prepopulate: pages / 4,
        },
    );
    let range = t.range;
    write_protect_all(t.uffd(), range).unwrap();
    let mut scanner = PagemapScanner::open(t.pid, range).unwrap();
    let (seed, writes) = (4242u64, 60_000u64);
    let mut union = DirtyBitmap::new(range).unwrap();
    let mut scans = 0u64;
    let mut reported = 0u64;
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let t = &mut t;
        let done = &done;
        s.spawn(move || {
            assert_eq!(t.cmd(&format!("write-random {seed} {writes}")), "ok");
            done.store(true, Ordering::Release);
        });
        let mut dirty = DirtyBitmap::new(range).unwrap();
        loop {
            let last = done.load(Ordering::Acquire);
            dirty.clear();
            reported += scanner.scan_written_and_protect(&mut dirty).unwrap().pages;
            union.union(&dirty).unwrap();
            scans += 1;
            if last {
                break;
            }
        }
    });
    let mut expected = DirtyBitmap::new(range).unwrap();
    let mut rng = Rng(seed);
    for _ in 0..writes {
        expected.set(rng.below(pages));
    }
    println!(
        "{writes} writes to {} distinct pages during {scans} scans: {reported} page reports",
        expected.count()
    );
    assert!(
        union == expected,
        "missed {:?}, extra {:?}",
        expected
            .iter_set()
            .filter(|&p| !union.get(p))
            .take(10)
            .collect::<Vec<_>>(),
        union
            .iter_set()
            .filter(|&p| !expected.get(p))
            .take(10)
            .collect::<Vec<_>>()
    );
    t.exit();
}

#[test]
fn missing_and_wp_async_on_one_registration() {
    let pages = 64u64;
    let mut t = Target::spawn(
        "xboth",
        TargetSpec {
            features: Features::MISSING_SHMEM | Features::WP_ASYNC,
            mode: Mode {
                missing: true,
                wp: true,
                minor: false,
            },
            pages,
            prepopulate: 0,
        },
    );
    let range = t.range;
    let img = image(77, pages);
    let mut scanner = PagemapScanner::open(t.pid, range).unwrap();
    let mut dirty = DirtyBitmap::new(range).unwrap();
    let uffd = t.uffd.take().unwrap();
    // Arm first (markers on the never-populated pages), then install.
    write_protect_all(&uffd, range).unwrap();
    let at = |p: u64| RemoteAddr(range.start.get() + p * PS64);
    let src = |p: u64| &img[p as usize * PS..][..PS];
    let wp = CopyFlags {
        dontwake: false,
        wp: true,
    };
    for p in 0..16 {
        uffd.copy(at(p), src(p), wp).unwrap(); // pages 0..16: copy, write-protected
    }
    for p in 16..20 {
        uffd.copy(at(p), src(p), CopyFlags::default()).unwrap(); // 16..20: plain copy
    }
    uffd.zeropage(at(20), 4 * PS64, false).unwrap(); // 20..24: zeropage
    scanner.scan_written(&mut dirty).unwrap();
    let after_install = bitmap_pages(&dirty);
    println!(
        "written right after installing (0..16 COPY_MODE_WP, 16..20 COPY, 20..24 ZEROPAGE): {after_install:?}"
    );
    assert_eq!(after_install, (16..24).collect::<Vec<_>>());
    dirty.clear();
    scanner.scan_written_and_protect(&mut dirty).unwrap();

    let stop = AtomicBool::new(false);
    let served = std::thread::scope(|s| {
        let server = s.spawn(|| serve_faults(&uffd, range, &img, wp, &stop));
        // The child reads pages 0..8 (installed) and 30..40 (served on
        // fault), writes 2, 5, 31 and 50 (50: a write fault on a missing
        // page, served write-protected, then the write goes through).
        let r = t.verify(77, 0, 8);
        assert_eq!(r[0], 0);
        let r = t.verify(77, 30, 10);
        assert_eq!(r[0], 0);
        t.write_pages(&[2, 5, 31, 50]);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap()
    });
    assert_eq!(served.faults, 11, "10 read faults + 1 write fault");
    dirty.clear();
    scanner.scan_written_and_protect(&mut dirty).unwrap();
    assert_eq!(bitmap_pages(&dirty), vec![2, 5, 31, 50]);
    dirty.clear();
    scanner.scan_written_and_protect(&mut dirty).unwrap();
    assert!(!dirty.any());
    t.uffd = Some(uffd);
    t.exit();
}

// ---------------------------------------------------------------------------
// what "written" means (this process)

#[test]
fn written_means_written_through_the_tracked_mapping() {
    let pages = 64u64;
    let region = Region::new("semantics", pages);
    let base = region.base();
    for p in 0..32 {
        touch_write(base, p, 1); // 0..32 populated, 32..64 never
    }
    let range = region.range();
    let uffd = new_uffd(Features::WP_ASYNC, Mode::WP, range);
    let mut scanner = PagemapScanner::open_self(range).unwrap();
    let mut dirty = DirtyBitmap::new(range).unwrap();
    let mut scan = |scanner: &mut PagemapScanner| {
        dirty.clear();
        scanner.scan_written_and_protect(&mut dirty).unwrap();
        bitmap_pages(&dirty)
    };
    // Registered but not armed: populated pages count as written, once
    // (and, on 6.18, the never-populated ones that share their page table).
    let unarmed = scan(&mut scanner);
    println!("first scan of a registered, unarmed range (0..32 populated): {unarmed:?}");
    assert!((0..32).all(|p| unarmed.binary_search(&p).is_ok()));
    assert_eq!(
        scan(&mut scanner),
        Vec::<u64>::new(),
        "that scan armed them"
    );
    write_protect_all(&uffd, range).unwrap();
    assert_eq!(scan(&mut scanner), Vec::<u64>::new());

    // Reads, of populated and never-populated pages, are not writes.
    for p in (0..8).chain(32..40) {
        touch_read(base, p);
    }
    assert_eq!(scan(&mut scanner), Vec::<u64>::new(), "reads");

    // Writes through the mapping, including first-touch writes.
    touch_write(base, 1, 2);
    touch_write(base, 40, 2);
    touch_write(base, 41, 2);
    touch_write(base, 41, 3);
    assert_eq!(scan(&mut scanner), vec![1, 40, 41]);

    // The kernel writing into the mapping on the process's behalf.
    let (mut r, mut w) = std::io::pipe().unwrap();
    w.write_all(&[7u8; 16]).unwrap();
    // SAFETY: page 5 of the live mapping has room for 16 bytes.
    let into = unsafe { std::slice::from_raw_parts_mut((base + 5 * PS) as *mut u8, 16) };
    r.read_exact(into).unwrap();
    assert_eq!(scan(&mut scanner), vec![5], "read(2) into the mapping");
    let data = [3u8; 16];
    let local = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: (base + 8 * PS + 128) as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: both iovecs describe live memory of 16 bytes (the remote one in
    // this very process, page 8 of the mapping).
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    assert_eq!(n, 16);
    assert_eq!(
        scan(&mut scanner),
        vec![8],
        "process_vm_writev into the mapping"
    );

    // Writes to the file through another path bypass the tracked PTEs.
    use std::os::unix::fs::FileExt;
    region.file.write_all_at(&[9u8; 8], 6 * PS64).unwrap();
    region.file.write_all_at(&[9u8; 8], 50 * PS64).unwrap();
    let other = MmapOptions::new()
        .len(pages as usize * PS)
        .map_raw(&region.file)
        .unwrap();
    touch_write(other.as_ptr() as usize, 7, 9);
    touch_write(other.as_ptr() as usize, 51, 9);
    let seen = scan(&mut scanner);
    println!(
        "pwrite(2) to pages 6, 50 and writes through a second mapping to 7, 51: scan reports {seen:?}"
    );
    assert_eq!(seen, Vec::<u64>::new());

    // Once the userfaultfd is closed the registration is gone: the scan
    // refuses (PM_SCAN_CHECK_WPASYNC) instead of answering.
    drop(uffd);
    dirty.clear();
    let err = scanner.scan_written_and_protect(&mut dirty).unwrap_err();
    assert!(matches!(err, ScanError::NotWpAsync { .. }), "{err}");
}

#[test]
fn scan_continuation_matches_with_any_vector_size() {
    // 3000 isolated written pages = 3000 regions: more than the kernel's
    // internal 512-entry buffer (the stale walk_end case) and, for the small
    // vectors, several calls.
    let pages = 6000u64;
    let region = Region::new("regions", pages);
    let range = region.range();
    let uffd = new_uffd(Features::WP_ASYNC, Mode::WP, range);
    write_protect_all(&uffd, range).unwrap();
    let base = region.base();
    let expected: Vec<u64> = (0..pages).step_by(2).collect();
    for &p in &expected {
        touch_write(base, p, 1);
    }
    for (cap, min_calls) in [(4096, 1), (3000, 2), (2999, 2), (512, 6), (1, 3000)] {
        let mut scanner = PagemapScanner::open_self(range)
            .unwrap()
            .with_region_capacity(cap);
        let mut dirty = DirtyBitmap::new(range).unwrap();
        let st = scanner.scan_written(&mut dirty).unwrap();
        assert_eq!(bitmap_pages(&dirty), expected, "capacity {cap}");
        assert_eq!(
            st.pages,
            expected.len() as u64,
            "capacity {cap}: pages double-counted"
        );
        assert!(st.ioctls >= min_calls, "capacity {cap}: {st:?}");
        if cap == 4096 {
            assert_eq!(
                st.ioctls, 1,
                "a complete walk must not follow a stale walk_end"
            );
        }
    }
    let mut scanner = PagemapScanner::open_self(range)
        .unwrap()
        .with_region_capacity(100);
    let mut dirty = DirtyBitmap::new(range).unwrap();
    scanner.scan_written_and_protect(&mut dirty).unwrap();
    assert_eq!(bitmap_pages(&dirty), expected);
    dirty.clear();
    scanner.scan_written(&mut dirty).unwrap();
    assert!(!dirty.any());
    // A bitmap of another range is refused.
    let mut wrong = DirtyBitmap::new(RemoteRange::new(range.start, PS64)).unwrap();
    assert!(matches!(
        scanner.scan_written(&mut wrong),
        Err(ScanError::BitmapMismatch { .. })
    ));
}

// ---------------------------------------------------------------------------
// measurements (printed, not asserted)

#[test]
fn measure_fault_round_trip_in_process() {
    for (name, faulter_cpu, server_cpu) in [("same CPU", 0, 0), ("cross CPU", 0, 1)] {
        let pages = 2000u64;
        let region = Region::new("rtt", pages);
        let range = region.range();
        let uffd = new_uffd(Features::MISSING_SHMEM, Mode::MISSING, range);
        let img = image(1, pages);
        let base = region.base();
        let stop = AtomicBool::new(false);
        let mut lat = std::thread::scope(|s| {
            let server = s.spawn(|| {
                pin_to_cpu(server_cpu);
                let r = serve_faults(&uffd, range, &img, CopyFlags::default(), &stop);
                unpin();
                r
            });
            let faulter = s.spawn(|| {
                pin_to_cpu(faulter_cpu);
                // Let the server reach poll before the first fault.
                std::thread::sleep(Duration::from_millis(20));
                let lat: Vec<u64> = (0..pages)
                    .map(|p| {
                        let t = Instant::now();
                        touch_read(base, p);
                        t.elapsed().as_nanos() as u64
                    })
                    .collect();
                unpin();
                lat
            });
            let lat = faulter.join().unwrap();
            stop.store(true, Ordering::Relaxed);
            assert_eq!(server.join().unwrap().faults, pages);
            lat
        });
        lat.sort_unstable();
        println!(
            "MEASURE fault round trip in-process ({name}, poll+read+UFFDIO_COPY): median {:.1} us, p99 {:.1} us over {pages} faults",
            percentile(&lat, 0.5) as f64 / 1e3,
            percentile(&lat, 0.99) as f64 / 1e3
        );
    }
}

#[test]
fn measure_fault_round_trip_cross_process() {
    let pages = 2000;
    let mut t = Target::spawn(
        "xrtt",
        TargetSpec {
            features: Features::MISSING_SHMEM,
            mode: Mode::MISSING,
            pages,
            prepopulate: 0,
        },
    );
    let img = image(2, pages);
    let stop = AtomicBool::new(false);
    let range = t.range;
    let uffd = t.uffd.take().unwrap();
    let res = std::thread::scope(|s| {
        let server = s.spawn(|| serve_faults(&uffd, range, &img, CopyFlags::default(), &stop));
        let res = t.verify(2, 0, pages);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        res
    });
    assert_eq!(res[0], 0);
    println!(
        "MEASURE fault round trip cross-process (child faults, parent serves): median {:.1} us, p99 {:.1} us, max {:.1} us over {pages} faults",
        res[1] as f64 / 1e3,
        res[2] as f64 / 1e3,
        res[3] as f64 / 1e3
    );
    t.uffd = Some(uffd);
    t.exit();
}

#[test]
fn measure_copy_throughput() {
    let pages = 65536u64; // 256 MiB
    let img = image(3, pages);
    for batch in [PS, 2 << 20] {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let region = Region::new("tput", pages);
            let range = region.range();
            let uffd = new_uffd(Features::MISSING_SHMEM, Mode::MISSING, range);
            let t = Instant::now();
            for (i, chunk) in img.chunks(batch).enumerate() {
                let o = uffd
                    .copy(
                        RemoteAddr(range.start.get() + (i * batch) as u64),
                        chunk,
                        CopyFlags {
                            dontwake: true,
                            wp: false,
                        },
                    )
                    .unwrap();
                assert_eq!(o.installed, chunk.len() as u64);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "MEASURE UFFDIO_COPY {} KiB batches into 256 MiB of shmem: {:.2} GB/s (best of 3)",
            batch / 1024,
            img.len() as f64 / best / 1e9
        );
    }
}

#[test]
fn measure_pagemap_scan_1gib() {
    let pages = 262_144u64; // 1 GiB
    let region = Region::new("scan", pages);
    let base = region.base();
    for p in 0..pages {
        touch_write(base, p, 1);
    }
    let range = region.range();
    let uffd = new_uffd(Features::WP_ASYNC, Mode::WP, range);
    let t = Instant::now();
    write_protect_all(&uffd, range).unwrap();
    let arm = t.elapsed();
    let mut scanner = PagemapScanner::open_self(range).unwrap();
    let mut dirty = DirtyBitmap::new(range).unwrap();
    let mut clean = Vec::new();
    for _ in 0..5 {
        dirty.clear();
        let st = scanner.scan_written_and_protect(&mut dirty).unwrap();
        assert_eq!(st.pages, 0);
        clean.push(st.elapsed);
    }
    let mut all = Vec::new();
    for round in 0..3 {
        for p in 0..pages {
            touch_write(base, p, round);
        }
        dirty.clear();
        let st = scanner.scan_written_and_protect(&mut dirty).unwrap();
        assert_eq!(st.pages, pages);
        all.push((st.elapsed, st.ioctls, st.regions));
    }
    clean.sort();
    all.sort();
    println!(
        "MEASURE PAGEMAP_SCAN 1 GiB (populated, WP-async): arm {:.2} ms; clean scan median {:.3} ms; all-written scan+re-protect median {:.2} ms ({} ioctl, {} regions)",
        arm.as_secs_f64() * 1e3,
        clean[2].as_secs_f64() * 1e3,
        all[1].0.as_secs_f64() * 1e3,
        all[1].1,
        all[1].2
    );
}

#[test]
fn measure_pagemap_scan_1gib_cross_process() {
    let pages = 262_144u64; // 1 GiB, populated by the child before registering
    let mut t = Target::spawn(
        "xscan",
        TargetSpec {
            features: Features::WP_ASYNC,
            mode: Mode::WP,
            pages,
            prepopulate: pages,
        },
    );
    let range = t.range;
    let t0 = Instant::now();
    write_protect_all(t.uffd(), range).unwrap();
    let arm = t0.elapsed();
    let mut scanner = PagemapScanner::open(t.pid, range).unwrap();
    let mut dirty = DirtyBitmap::new(range).unwrap();
    let mut clean = Vec::new();
    for _ in 0..5 {
        dirty.clear();
        clean.push(
            scanner
                .scan_written_and_protect(&mut dirty)
                .unwrap()
                .elapsed,
        );
        assert!(!dirty.any());
    }
    let mut all = Vec::new();
    let mut written = Vec::new();
    for _ in 0..3 {
        let t1 = Instant::now();
        assert_eq!(t.cmd(&format!("write-range 0 {pages}")), "ok");
        written.push(t1.elapsed());
        dirty.clear();
        let st = scanner.scan_written_and_protect(&mut dirty).unwrap();
        assert_eq!(st.pages, pages);
        all.push(st.elapsed);
    }
    clean.sort();
    all.sort();
    written.sort();
    println!(
        "MEASURE PAGEMAP_SCAN 1 GiB of another (idle) process: arm {:.2} ms; clean scan median {:.3} ms; all-written scan+re-protect median {:.2} ms; the child's 262144 first writes after arming {:.1} ms ({:.0} ns/page)",
        arm.as_secs_f64() * 1e3,
        clean[2].as_secs_f64() * 1e3,
        all[1].as_secs_f64() * 1e3,
        written[1].as_secs_f64() * 1e3,
        written[1].as_secs_f64() * 1e9 / pages as f64
    );
    t.exit();
}

// ---------------------------------------------------------------------------
// read sampling (MINOR faults beside the write log)

#[test]
fn read_sampling_sees_the_pages_touched_and_leaves_the_write_log_exact() {
    let pages = 2048u64; // 8 MiB, all populated (page cache)
    let mut t = Target::spawn(
        "xrs",
        TargetSpec {
            features: Features::WP_ASYNC | Features::WP_UNPOPULATED | Features::MINOR_SHMEM,
            mode: Mode::WP,
            pages,
            prepopulate: pages,
        },
    );
    let range = t.range;
    let mut scanner = PagemapScanner::open(t.pid, range).unwrap();
    let mut dirty = DirtyBitmap::new(range).unwrap();
    write_protect_all(t.uffd(), range).unwrap();
    scanner.scan_written_and_protect(&mut dirty).unwrap();
    let mut sampler = ReadSampler::start(t.uffd(), t.pid, range, Mode::WP).unwrap();
    let mut rng = Rng(7);
    let mut seen_fraction = Vec::new();
    for round in 0..4 {
        // Written before the zap, read after it: still a write (the page
        // must come back unprotected).
        let early = round >= 2;
        if early {
            t.write_pages(&[9]);
        }
        sampler.begin_interval().unwrap();
        let reads: Vec<u64> = (0..300)
            .map(|_| rng.below(pages))
            .chain(early.then_some(9))
            .collect();
        let writes: Vec<u64> = (0..200).map(|_| rng.below(pages)).collect();
        t.read_pages(&reads);
        t.write_pages(&writes);
        // A page written last round and only read now: a read, not a write.
        if round > 0 {
            t.read_pages(&[0, 1, 2]);
        }
        let mut touched = std::collections::BTreeSet::new();
        sampler.take_touched(|p| {
            touched.insert(p);
        });
        dirty.clear();
        scanner.scan_written_and_protect(&mut dirty).unwrap();
        let written: std::collections::BTreeSet<u64> = dirty.iter_set().collect();
        let want_written: std::collections::BTreeSet<u64> =
            writes.iter().copied().chain(early.then_some(9)).collect();
        assert_eq!(
            written, want_written,
            "round {round}: the write log must be exact under read sampling"
        );
        let mut accessed: std::collections::BTreeSet<u64> =
            reads.iter().chain(&writes).copied().collect();
        if round > 0 {
            accessed.extend([0, 1, 2]);
        }
        let extra: Vec<_> = touched.difference(&accessed).collect();
        assert!(extra.is_empty(), "round {round}: never accessed: {extra:?}");
        seen_fraction.push(touched.len() as f64 / accessed.len() as f64);
        if round == 0 {
            // Written at the end of this round, read (only) in the next.
            t.write_pages(&[0, 1, 2]);
            dirty.clear();
            scanner.scan_written_and_protect(&mut dirty).unwrap();
            assert_eq!(dirty.iter_set().collect::<Vec<_>>(), vec![0, 1, 2]);
        }
    }
    // MADV_PAGEOUT leaves a page mapped now and then (busy in reclaim):
    // nearly every access is seen.
    assert!(
        seen_fraction.iter().all(|&f| f > 0.9),
        "accesses seen per round: {seen_fraction:?}"
    );
    // Watching a few pages only: the others stay mapped and unseen (all
    // mapped first: a page zapped earlier and not touched since would
    // still fault).
    t.read_pages(&(0..pages).collect::<Vec<_>>());
    sampler.take_touched(|_| {});
    sampler
        .begin_interval_on(&[10, 11, 500, pages + 7])
        .unwrap();
    t.read_pages(&[10, 12, 500, 501]);
    let mut touched = Vec::new();
    sampler.take_touched(|p| touched.push(p));
    assert_eq!(touched, vec![10, 500]);
    let st = sampler.stop().unwrap();
    assert!(st.faults >= 400, "{st:?}");
    assert_eq!(st.intervals, 5);
    // Back to WP only: zapped pages fault in by themselves, nothing hangs,
    // and, the log re-armed, writes are logged.
    t.read_pages(&(0..pages).collect::<Vec<_>>());
    write_protect_all(t.uffd(), range).unwrap();
    dirty.clear();
    scanner.scan_written_and_protect(&mut dirty).unwrap();
    assert!(!dirty.any(), "re-armed: nothing written yet");
    t.write_pages(&[5, 6]);
    dirty.clear();
    scanner.scan_written_and_protect(&mut dirty).unwrap();
    assert_eq!(dirty.iter_set().collect::<Vec<_>>(), vec![5, 6]);
    t.exit();
}
