//! QEMU migrating the built-in guest itself over the emulated WAN (the
//! evaluation's baselines, `wanmig_bench::qemu_native`): pre-copy,
//! post-copy and pre-copy-then-post-copy, each with a disk mirrored over
//! NBD. Needs root, QEMU 10 and the guest image (`scripts/setup`); ~80 s.
//!
//! Each mode must move the guest intact (the destination's disk as it was at
//! the resume equal to the source's byte for byte, the page and disk
//! checkers silent, heartbeats at the destination), report figures that fit
//! what the mode is (pre-copy has no post-copy: U = P = 0, no faults;
//! post-copy and hybrid do: faults, blocktime; hybrid only after a full
//! pass), and be measured as a libvirt user sees it: between the source's
//! STOP and the destination's RESUME the harness does nothing but what
//! libvirt does there (no comparison, no polling).

use std::time::Duration;

use wanmig_bench::qemu_native::{self, LIBVIRT_STEPS_IN_DOWNTIME, QemuMode, QemuRun};
use wanmig_bench::wan::{Wan, WanConfig};
use wanmig_datapath::backend::qemu::{DiskSpec, GuestSpec};

const DISK_MIB: u64 = 32;

fn guest() -> GuestSpec {
    let mut g = GuestSpec::builtin(
        256,
        "wanmig.workload=pagecheck wanmig.mib=16 wanmig.rate=4 wanmig.disk=check \
         wanmig.diskmib=16 wanmig.diskrate=1",
    )
    .expect("the built-in guest (scripts/setup)");
    g.disks.push(DiskSpec {
        size: DISK_MIB << 20,
        image: None,
    });
    g
}

#[test]
fn qemu_moves_the_guest_and_its_disk_in_each_of_its_modes() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "needs root (network namespaces)");
    let wan = Wan::up(WanConfig::new(
        format!("qn{:04x}", std::process::id() & 0xffff),
        "100mbit".parse().unwrap(),
        Duration::from_millis(5),
    ))
    .expect("wan up");
    let dir = std::env::temp_dir().join(format!("wanmig-qemu-native-{}", std::process::id()));
    for mode in QemuMode::ALL {
        let run = QemuRun {
            guest: guest(),
            mode,
            run_dir: dir.join(mode.name()),
            dt: Duration::from_secs(20),
            downtime_limit: Duration::from_millis(300),
            // The guest dirties 4 MiB/s of a 12 MB/s link: pre-copy converges.
            precopy_timeout: Duration::from_secs(600),
            warmup_heartbeats: 3,
            warmup_disk_heartbeats: 2,
            observe_heartbeats: 3,
        };
        let r = qemu_native::run(&run, &wan).unwrap_or_else(|e| panic!("{}: {e:?}", mode.name()));
        eprintln!("{}: {r:?}", mode.name());
        let m = &r.measured;
        assert_eq!(r.disk_bytes_compared, DISK_MIB << 20, "{mode:?}");
        assert_eq!(r.disk_blocks_differing, 0, "{mode:?}: disks differ");
        assert_eq!(r.checker_errors, 0, "{mode:?}: the guest's checkers");
        assert!(
            r.pages_verified_after_resume > 0,
            "{mode:?}: the page checker verified nothing at the destination"
        );
        assert!(r.intact());
        // The downtime holds libvirt's steps, each once, in its order.
        assert_eq!(
            r.steps_in_downtime, LIBVIRT_STEPS_IN_DOWNTIME,
            "{mode:?}: harness work inside STOP..RESUME"
        );
        // The disk went through the mirror (the checker wrote into it), and
        // RAM through QEMU's stream: a booted guest has tens of MB of it.
        assert!(r.disk_bytes > 0, "{mode:?}");
        assert!(
            r.ram_bytes > 10 << 20,
            "{mode:?}: {} bytes of RAM",
            r.ram_bytes
        );
        assert_eq!(m.bytes_sent, r.ram_bytes + r.disk_bytes);
        assert!(
            m.downtime_s > 0.0 && m.total_s > m.downtime_s,
            "{mode:?}: {m:?}"
        );
        assert!(m.gamma > 0.0 && m.gamma < 1.0, "{mode:?}: {m:?}");
        match mode {
            QemuMode::Precopy => {
                assert_eq!(r.suspended_after_s, None, "pre-copy converged");
                assert_eq!(r.postcopy_after_s, None);
                assert_eq!((m.uptime_s, m.penalty_s, m.faults), (0.0, 0.0, 0));
                let expect = 20.0 / (20.0 + m.downtime_s);
                assert!((m.gamma - expect).abs() < 1e-9, "{m:?}");
            }
            QemuMode::Postcopy | QemuMode::Hybrid => {
                // The vCPU touched pages that were not there yet.
                assert!(m.faults > 0 && m.penalty_s > 0.0, "{mode:?}: {m:?}");
                assert!(
                    m.uptime_s > 0.0 && m.total_s >= m.uptime_s,
                    "{mode:?}: {m:?}"
                );
                let after = r.postcopy_after_s.expect("post-copy was asked for");
                if mode == QemuMode::Postcopy {
                    assert_eq!(after, 0.0);
                } else {
                    // After a whole pass over RAM.
                    assert!(after > 0.0);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
