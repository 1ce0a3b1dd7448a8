//! The seqlock and the writer locks across processes. Child processes are
//! this test binary, re-executed with a role in the environment:
//!
//! - a writer hammering telemetry while the parent reads it through its own
//!   mapping (no torn snapshot may be accepted);
//! - a writer that stops itself (`SIGSTOP`) in the middle of an update: the
//!   parent must never accept a torn snapshot, must be refused as a second
//!   writer while the stopped one holds the lock, sees the update complete
//!   after `SIGCONT`, and, when the stopped writer is killed instead, sees
//!   the region reported as abandoned and repairs it by publishing.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use wanmig_planner::segment::{Phase, Region, Segment, SegmentError, Telemetry};

const ROLE_ENV: &str = "WANMIG_SEGMENT_TEST_ROLE";
const NAME_ENV: &str = "WANMIG_SEGMENT_TEST_NAME";
const N: u64 = 200_000;

fn telemetry(i: u64) -> Telemetry {
    Telemetry {
        phase: Phase::from_raw(i % 6),
        round: i,
        plan_generation: i.wrapping_mul(3),
        bytes_sent: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        pages_sent: !i,
        chunks_sent: i.rotate_left(17),
        bandwidth_bps: i ^ 0x5555_5555_5555_5555,
        rtt_ns: i + 7,
        last_round: i.wrapping_sub(1),
        last_round_duration_ns: i << 3,
        dirty_pages_last_round: i * 5,
        dirty_chunks_last_round: i * 11,
        round_started_unix_ns: i + 1000,
        updated_unix_ns: i + 2000,
        faults_served: i.swap_bytes(),
    }
}

/// Runs the child role, if this process is a child. Returns whether it was.
fn child_role(test: &str) -> bool {
    let (Ok(role), Ok(name)) = (std::env::var(ROLE_ENV), std::env::var(NAME_ENV)) else {
        return false;
    };
    if role != test {
        return true; // another test's child: do nothing
    }
    let seg = Segment::open(&name).expect("child opens the segment");
    match role.as_str() {
        "hammer" => {
            for i in 1..=N {
                seg.publish_telemetry(&telemetry(i)).unwrap();
                if i % 16 == 0 {
                    std::thread::yield_now();
                }
            }
        }
        "stuck" => {
            seg.publish_telemetry(&telemetry(1)).unwrap();
            seg.__publish_telemetry_pausing(&telemetry(2), || {
                // SAFETY: raise has no memory-safety preconditions; the
                // process stops here, mid-update, until SIGCONT (or dies).
                unsafe { libc::raise(libc::SIGSTOP) };
            })
            .unwrap();
        }
        r => panic!("unknown role {r}"),
    }
    true
}

fn spawn(test: &str, name: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(ROLE_ENV, test)
        .env(NAME_ENV, name)
        .spawn()
        .unwrap()
}

fn temp_name(tag: &str) -> String {
    std::env::temp_dir()
        .join(format!("wanmig-xproc-{tag}-{}", std::process::id()))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn hammer() {
    if child_role("hammer") {
        return;
    }
    let name = temp_name("hammer");
    let seg = Segment::create(&name).unwrap();
    let mut child = spawn("hammer", &name);
    let start = Instant::now();
    let (mut reads, mut last, mut distinct) = (0u64, 0u64, 0u64);
    let mut spins = 0u64;
    loop {
        spins += 1;
        let exited = if spins % 1024 == 0 {
            child.try_wait().unwrap()
        } else {
            None
        };
        match seg.read_telemetry() {
            Ok(Some(t)) => {
                assert_eq!(t, telemetry(t.round), "torn snapshot accepted");
                assert!(t.round >= last, "went backwards: {} after {last}", t.round);
                if t.round != last {
                    distinct += 1;
                }
                last = t.round;
                reads += 1;
            }
            Ok(None) => {}
            Err(e) => panic!("{e}"),
        }
        if exited.is_some() || start.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(status.success(), "child failed or hung: {status}");
    assert_eq!(seg.read_telemetry().unwrap(), Some(telemetry(N)));
    eprintln!("{reads} snapshots read, {distinct} distinct, while the child wrote {N}");
    assert!(
        distinct > 10,
        "the reads did not overlap the writes ({distinct})"
    );
}

/// The process state letter from `/proc/PID/stat` (`T` = stopped).
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn wait_stopped(child: &mut Child) {
    let start = Instant::now();
    while state(child.id()) != Some('T') {
        assert!(child.try_wait().unwrap().is_none(), "child exited");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "child never stopped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own
    // child, not yet reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Reads for a while: every accepted snapshot must be whole (the old one);
/// the region must be reported busy (never torn).
fn never_torn_while_stopped(seg: &Segment) {
    let start = Instant::now();
    let mut busy = 0;
    while start.elapsed() < Duration::from_millis(300) {
        match seg.read_telemetry() {
            Ok(Some(t)) => panic!("accepted a snapshot from a region mid-update: {t:?}"),
            Ok(None) => panic!("telemetry vanished"),
            Err(SegmentError::Busy {
                region: Region::Telemetry,
                ..
            }) => busy += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy > 0);
}

#[test]
fn stuck() {
    if child_role("stuck") {
        return;
    }
    let name = temp_name("stuck");
    let seg = Segment::create(&name).unwrap();

    // 1. Stopped mid-update, then continued.
    let mut child = spawn("stuck", &name);
    wait_stopped(&mut child);
    // The child's seq is odd and half of telemetry(2) is stored.
    never_torn_while_stopped(&seg);
    // A second writer is refused while the stopped one holds the lock.
    assert!(matches!(
        seg.publish_telemetry(&telemetry(9)),
        Err(SegmentError::WriterBusy {
            region: Region::Telemetry,
            ..
        })
    ));
    signal(&child, libc::SIGCONT);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(seg.read_telemetry().unwrap(), Some(telemetry(2)));

    // 2. Stopped mid-update, then killed: the region is abandoned.
    let mut child = spawn("stuck", &name);
    wait_stopped(&mut child);
    never_torn_while_stopped(&seg);
    signal(&child, libc::SIGKILL);
    let _ = child.wait().unwrap();
    let start = Instant::now();
    assert!(matches!(
        seg.read_telemetry(),
        Err(SegmentError::WriterDied {
            region: Region::Telemetry,
            ..
        })
    ));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "readers do not spin"
    );
    // Its lock died with it: a new writer takes over and repairs.
    let engine = Segment::open(&name).unwrap();
    engine.publish_telemetry(&telemetry(3)).unwrap();
    assert_eq!(seg.read_telemetry().unwrap(), Some(telemetry(3)));
}
