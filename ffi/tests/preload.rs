//! The preload library in a real process: a python3 child maps a
//! `/dev/shm` file with the library preloaded, and the test plays the engine
//! (accepts the registration, checks every field, receives the userfaultfd,
//! serves the child's missing-page faults with `UFFDIO_COPY` or reads its
//! write-protect state from `/proc/<pid>/pagemap`). Also: mappings the library
//! must leave alone, and every way the handshake can fail (the child must
//! abort, never run on).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use support::*;
use wanmig_ffi::proto::{ACK_ACCEPT, ACK_REFUSE, UffdMode};

const PAGES: u64 = 16;
const LEN: u64 = PAGES * PAGE as u64;
const WAIT: Duration = Duration::from_secs(30);

/// The child: maps `path` (`shared` or `private`), prints its address, reads
/// the first 16 bytes of the listed pages, writes `written!` at the start of
/// others, optionally waits for a line on stdin.
const CHILD: &str = r#"
import ctypes, mmap, os, sys
path, size, kind, reads, writes, wait = sys.argv[1:7]
size = int(size)
fd = os.open(path, os.O_RDWR)
flags = mmap.MAP_SHARED if kind == "shared" else mmap.MAP_PRIVATE
m = mmap.mmap(fd, size, flags=flags)
print("base", ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
pages = lambda s: range(size // 4096) if s == "all" else ([] if s == "-" else map(int, s.split(",")))
for p in pages(reads):
    print("page", p, m[p * 4096:p * 4096 + 16].hex(), flush=True)
for p in pages(writes):
    m[p * 4096:p * 4096 + 8] = b"written!"
print("written", flush=True)
if wait == "1":
    sys.stdin.readline()
print("done", flush=True)
"#;

fn spawn_child(
    file: &Path,
    kind: &str,
    reads: &str,
    writes: &str,
    wait: bool,
    env: &[(&str, &str)],
) -> Child {
    let mut c = preloaded(python());
    c.arg("-c")
        .arg(CHILD)
        .arg(file)
        .arg(LEN.to_string())
        .arg(kind)
        .arg(reads)
        .arg(writes)
        .arg(if wait { "1" } else { "0" });
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("spawn python3")
}

fn shm_file(tag: &str) -> TempFile {
    TempFile::sparse(Path::new("/dev/shm").join(unique(tag)), LEN)
}

/// The page the test engine serves for page `i`.
fn pattern(i: u64) -> [u8; PAGE] {
    let mut p = [(i as u8) ^ 0x5a; PAGE];
    p[..8].copy_from_slice(&(0xa5a5_0000 + i).to_le_bytes());
    p
}

fn check_fields(a: &Accepted, child: &Child, file: &Path, mode: UffdMode) {
    let r = &a.reg;
    assert_eq!(r.mode, mode);
    assert_eq!(r.pid as u32, child.id());
    assert_eq!(r.len, LEN);
    assert_eq!(r.file_offset, 0);
    assert_eq!(r.path(), file);
    assert_eq!(r.features, mode.api_features());
    assert!(r.has_ioctl(IOCTL_COPY), "ioctls {:#x}", r.ioctls);
    if mode.tracks_writes() {
        assert!(r.has_ioctl(IOCTL_WRITEPROTECT), "ioctls {:#x}", r.ioctls);
    }
}

fn base_from(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("base "))
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no base in {stdout:?}"))
}

fn mode_env(mode: UffdMode, engine: &Engine) -> [(&'static str, String); 2] {
    [
        ("WANMIG_UFFD_MODE", mode.env_value().to_string()),
        ("WANMIG_UFFD_SOCK", engine.path.display().to_string()),
    ]
}

fn env_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn missing_mode_faults_are_served_by_the_engine() {
    let file = shm_file("wanmig-t-missing");
    let engine = Engine::bind();
    let env = mode_env(UffdMode::Missing, &engine);
    let mut child = spawn_child(&file.0, "shared", "all", "5", false, &env_refs(&env));
    let a = engine.accept(WAIT, &mut child).expect("a registration");
    check_fields(&a, &child, &file.0, UffdMode::Missing);
    assert!(
        a.reg.has_ioctl(IOCTL_ZEROPAGE),
        "ioctls {:#x}",
        a.reg.ioctls
    );
    let base = a.reg.base;
    let stop = AtomicBool::new(false);
    let (finished, faults) = std::thread::scope(|s| {
        let server = s.spawn(|| {
            serve_faults(a.uffd.as_fd(), &stop, 0, |addr| {
                Some(pattern((addr - base) / PAGE as u64))
            })
        });
        let _stop = SetOnDrop(&stop);
        a.answer(ACK_ACCEPT);
        let finished = finish(child, WAIT);
        drop(_stop);
        (finished, server.join().unwrap())
    });
    assert!(finished.status.success(), "{}", finished.stderr);
    assert_eq!(base_from(&finished.stdout), base);
    for i in 0..PAGES {
        let want = format!("page {i} {}", hex(&pattern(i)[..16]));
        assert!(
            finished.stdout.lines().any(|l| l == want),
            "missing {want:?} in {}",
            finished.stdout
        );
    }
    // Every page faulted exactly once (the write to page 5 came after its read).
    let mut pages: Vec<u64> = faults.iter().map(|f| (f - base) / PAGE as u64).collect();
    pages.sort_unstable();
    assert_eq!(pages, (0..PAGES).collect::<Vec<_>>());
    // UFFDIO_COPY filled the shared file itself.
    let data = std::fs::read(&file.0).unwrap();
    for i in 0..PAGES {
        let mut want = pattern(i);
        if i == 5 {
            want[..8].copy_from_slice(b"written!");
        }
        assert!(data[i as usize * PAGE..][..PAGE] == want, "file page {i}");
    }
    assert!(
        finished.stderr.contains("registered missing"),
        "{}",
        finished.stderr
    );
}

/// Reads lines from the child's stdout until `written`.
fn wait_written(child: &mut Child) -> Vec<String> {
    let mut lines = Vec::new();
    let mut r = BufReader::new(child.stdout.as_mut().unwrap());
    loop {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "child ended: {lines:?}");
        let l = l.trim_end().to_string();
        let done = l == "written";
        lines.push(l);
        if done {
            return lines;
        }
    }
}

#[test]
fn wp_async_mode_tracks_the_childs_writes() {
    let file = shm_file("wanmig-t-wp");
    let engine = Engine::bind();
    let env = mode_env(UffdMode::WpAsync, &engine);
    let mut child = spawn_child(&file.0, "shared", "-", "1,3", true, &env_refs(&env));
    let a = engine.accept(WAIT, &mut child).expect("a registration");
    check_fields(&a, &child, &file.0, UffdMode::WpAsync);
    // As the source engine would: write-protect everything, then let QEMU go.
    write_protect(a.uffd.as_fd(), a.reg.base, a.reg.len).unwrap();
    a.answer(ACK_ACCEPT);
    let lines = wait_written(&mut child);
    assert_eq!(base_from(&lines.join("\n")), a.reg.base);
    let wp = uffd_wp_bits(child.id(), a.reg.base, a.reg.len);
    let written: Vec<usize> = (0..wp.len()).filter(|&i| !wp[i]).collect();
    assert_eq!(written, [1, 3], "pages that lost write-protection");
    child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let f = finish(child, WAIT);
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stdout.contains("done"));
}

/// The destination's case: missing faults served write-protected
/// (`UFFDIO_COPY_MODE_WP`), so writes after resume are tracked on the same
/// registration.
#[test]
fn missing_and_wp_async_on_one_registration() {
    let file = shm_file("wanmig-t-both");
    let engine = Engine::bind();
    let env = mode_env(UffdMode::MissingWpAsync, &engine);
    let mut child = spawn_child(&file.0, "shared", "all", "2", true, &env_refs(&env));
    let a = engine.accept(WAIT, &mut child).expect("a registration");
    check_fields(&a, &child, &file.0, UffdMode::MissingWpAsync);
    let base = a.reg.base;
    let stop = AtomicBool::new(false);
    let (lines, wp, faults) = std::thread::scope(|s| {
        let server = s.spawn(|| {
            serve_faults(a.uffd.as_fd(), &stop, UFFDIO_COPY_MODE_WP, |addr| {
                Some(pattern((addr - base) / PAGE as u64))
            })
        });
        let _stop = SetOnDrop(&stop);
        a.answer(ACK_ACCEPT);
        let lines = wait_written(&mut child);
        let wp = uffd_wp_bits(child.id(), base, LEN);
        drop(_stop);
        (lines, wp, server.join().unwrap())
    });
    assert_eq!(faults.len() as u64, PAGES, "one missing fault per page");
    assert!(lines.contains(&format!("page 7 {}", hex(&pattern(7)[..16]))));
    let written: Vec<usize> = (0..wp.len()).filter(|&i| !wp[i]).collect();
    assert_eq!(written, [2], "pages that lost write-protection");
    child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let f = finish(child, WAIT);
    assert!(f.status.success(), "{}", f.stderr);
}

#[test]
fn custom_prefix_is_honoured_and_other_paths_are_left_alone() {
    // A file outside the default prefix: untouched, nobody contacted.
    let other = shm_file("other");
    let engine = Engine::bind();
    let env = mode_env(UffdMode::Missing, &engine);
    let child = spawn_child(&other.0, "shared", "all", "0", false, &env_refs(&env));
    let f = finish(child, WAIT);
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stdout.contains("done"));
    assert!(!engine.was_contacted());
    assert!(f.stderr.is_empty(), "{}", f.stderr);

    // The same kind of file under WANMIG_PREFIX: registered.
    let custom = shm_file("wmtest-prefix");
    let mut env = env_refs(&env);
    env.push(("WANMIG_PREFIX", "/dev/shm/wmtest-"));
    env[0].1 = "wp-async";
    let mut child = spawn_child(&custom.0, "shared", "-", "0", false, &env);
    let a = engine.accept(WAIT, &mut child).expect("a registration");
    assert_eq!(a.reg.path(), custom.0);
    a.answer(ACK_ACCEPT);
    let f = finish(child, WAIT);
    assert!(f.status.success(), "{}", f.stderr);
}

#[test]
fn private_mappings_are_left_alone() {
    let file = shm_file("wanmig-t-private");
    let engine = Engine::bind();
    let env = mode_env(UffdMode::Missing, &engine);
    let child = spawn_child(&file.0, "private", "all", "0", false, &env_refs(&env));
    let f = finish(child, WAIT);
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stdout.contains("done"));
    assert!(!engine.was_contacted());
}

fn expect_abort(f: &Finished, needles: &[&str]) {
    assert!(
        f.aborted(),
        "expected SIGABRT, got {} (stdout {:?}, stderr {:?})",
        f.status,
        f.stdout,
        f.stderr
    );
    assert!(
        !f.stdout.contains("written"),
        "the child ran on: {}",
        f.stdout
    );
    for n in needles {
        assert!(f.stderr.contains(n), "stderr lacks {n:?}: {}", f.stderr);
    }
}

#[test]
fn a_refusal_aborts_the_process() {
    let file = shm_file("wanmig-t-refused");
    let engine = Engine::bind();
    let env = mode_env(UffdMode::Missing, &engine);
    let mut child = spawn_child(&file.0, "shared", "0", "-", false, &env_refs(&env));
    let a = engine.accept(WAIT, &mut child).expect("a registration");
    a.answer(ACK_REFUSE);
    expect_abort(&finish(child, WAIT), &["refused the registration", "0x4e"]);
}

#[test]
fn an_engine_that_hangs_up_aborts_the_process() {
    let file = shm_file("wanmig-t-eof");
    let engine = Engine::bind();
    let env = mode_env(UffdMode::WpAsync, &engine);
    let mut child = spawn_child(&file.0, "shared", "0", "-", false, &env_refs(&env));
    drop(engine.accept(WAIT, &mut child).expect("a registration"));
    expect_abort(&finish(child, WAIT), &["without answering"]);
}

#[test]
fn no_engine_aborts_the_process() {
    let file = shm_file("wanmig-t-nosock");
    let sock = std::env::temp_dir().join(unique("wanmig-ffi-absent"));
    let sock = sock.display().to_string();
    let child = spawn_child(
        &file.0,
        "shared",
        "0",
        "-",
        false,
        &[("WANMIG_UFFD_MODE", "missing"), ("WANMIG_UFFD_SOCK", &sock)],
    );
    expect_abort(
        &finish(child, WAIT),
        &[&format!("WANMIG_UFFD_SOCK={sock}"), "ENOENT"],
    );
    // Unset socket variable.
    let child = spawn_child(
        &file.0,
        "shared",
        "0",
        "-",
        false,
        &[("WANMIG_UFFD_MODE", "missing")],
    );
    expect_abort(&finish(child, WAIT), &["WANMIG_UFFD_SOCK", "not set"]);
}

#[test]
fn a_missing_or_unknown_mode_aborts_the_process() {
    let file = shm_file("wanmig-t-mode");
    let engine = Engine::bind();
    let sock = engine.path.display().to_string();
    let child = spawn_child(
        &file.0,
        "shared",
        "0",
        "-",
        false,
        &[("WANMIG_UFFD_SOCK", &sock)],
    );
    expect_abort(&finish(child, WAIT), &["WANMIG_UFFD_MODE is not set"]);
    let child = spawn_child(
        &file.0,
        "shared",
        "0",
        "-",
        false,
        &[("WANMIG_UFFD_SOCK", &sock), ("WANMIG_UFFD_MODE", "wp")],
    );
    expect_abort(&finish(child, WAIT), &["WANMIG_UFFD_MODE=wp is none of"]);
    assert!(!engine.was_contacted());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// This test executable links the `rlib`, so its `mmap` is the crate's
/// wrapper (as it would be in the engine): mapping a matching file here must
/// neither register nor abort, only forward.
#[test]
fn linking_the_rlib_does_not_interpose() {
    let file = shm_file("wanmig-t-inprocess");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file.0)
        .unwrap();
    // SAFETY: a shared mapping of the test's own file, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` maps LEN bytes, unmapped once.
    unsafe {
        p.cast::<u8>().write(1);
        assert_eq!(libc::munmap(p, LEN as usize), 0);
    }
}
