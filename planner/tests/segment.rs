//! The seqlock across processes: a child process (this test binary,
//! re-executed) publishes telemetry derived from a counter while the parent
//! reads it through its own mapping; no torn snapshot may be accepted.

use std::process::Command;
use std::time::{Duration, Instant};

use wanmig_planner::segment::{Phase, Segment, Telemetry};

const CHILD_ENV: &str = "WANMIG_SEGMENT_TEST_CHILD";
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

#[test]
fn telemetry_is_never_torn_across_processes() {
    if let Ok(name) = std::env::var(CHILD_ENV) {
        // Child: the engine side.
        let seg = Segment::open(&name).expect("child opens the segment");
        for i in 1..=N {
            seg.publish_telemetry(&telemetry(i));
            if i % 16 == 0 {
                std::thread::yield_now();
            }
        }
        return;
    }
    let name = std::env::temp_dir()
        .join(format!("wanmig-xproc-{}", std::process::id()))
        .to_string_lossy()
        .into_owned();
    let seg = Segment::create(&name).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "telemetry_is_never_torn_across_processes",
            "--nocapture",
        ])
        .env(CHILD_ENV, &name)
        .spawn()
        .unwrap();
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
        if let Some(t) = seg.read_telemetry() {
            assert_eq!(t, telemetry(t.round), "torn snapshot accepted");
            assert!(t.round >= last, "went backwards: {} after {last}", t.round);
            if t.round != last {
                distinct += 1;
            }
            last = t.round;
            reads += 1;
        }
        if exited.is_some() || start.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(status.success(), "child failed or hung: {status}");
    assert_eq!(seg.read_telemetry(), Some(telemetry(N)));
    eprintln!("{reads} snapshots read, {distinct} distinct, while the child wrote {N}");
    assert!(
        distinct > 10,
        "the reads did not overlap the writes ({distinct})"
    );
}
