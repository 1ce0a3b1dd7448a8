//! The datapath across the emulated WAN, end to end: two network namespaces,
//! tbf and the TUN delay line between them, the authenticated bulk and fault
//! connections, io_uring transport with pacing. Every page must arrive intact,
//! and post-copy fault requests sent during the bulk transfer must be answered
//! with the right page. (Throughput is the link benchmark's business, not a
//! test's: these machines are shared.)

use std::time::Duration;

use wanmig_bench::content::Content;
use wanmig_bench::link::{self, LinkOptions};
use wanmig_datapath::transport::IoPreference;

fn small_run(name: &str, content: Content, io: IoPreference) -> link::LinkReport {
    let mut opts = LinkOptions::new(
        name,
        "400mbit".parse().unwrap(),
        Duration::from_millis(2),
        content,
    );
    opts.size = 24 << 20;
    opts.iperf_seconds = 0;
    opts.io = io;
    opts.probe_interval = Duration::from_millis(10);
    link::run(&opts).unwrap()
}

#[test]
fn mixed_pages_cross_the_wan_intact_with_faults_answered_during_the_push() {
    let r = small_run("tlnkmix", Content::Mixed, IoPreference::Uring);
    assert_eq!(r.integrity.pages_compared, (24 << 20) / 4096);
    assert_eq!(r.integrity.pages_differing, 0);
    assert_eq!(r.fault_latency.wrong_answers, 0);
    assert!(
        r.fault_latency.loaded_samples > 0,
        "no fault probe ran during the push"
    );
    // The fault path crosses the delay line: never faster than the RTT.
    assert!(
        r.fault_latency.idle_p50_ms >= 2.0 * 0.95,
        "{:?}",
        r.fault_latency
    );
    let u = r.units;
    assert_eq!(u.units, r.integrity.pages_compared);
    assert!(
        u.zero > 0 && u.lz4 > 0 && u.raw > 0,
        "mixed content uses every encoding: {u:?}"
    );
    assert!(r.compression_ratio > 1.5, "ratio {}", r.compression_ratio);
    assert_eq!(r.backend, "io_uring");
}

#[test]
fn random_pages_cross_the_wan_intact_on_the_blocking_backend() {
    let r = small_run("tlnkblk", Content::Random, IoPreference::Blocking);
    assert_eq!(r.integrity.pages_differing, 0);
    assert_eq!(r.fault_latency.wrong_answers, 0);
    assert_eq!(r.units.raw, r.units.units);
    assert_eq!(r.backend, "blocking");
}
