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

#[test]
fn the_bulk_stream_measures_the_bottleneck_and_paces_just_below_it() {
    // 40 Mbit/s, 5 ms: the rate controller's saturated windows must find
    // the tbf's rate (TCP payload: 40 Mbit/s less ~3.5 % of headers), and
    // the socket must end the push paced below it, not at or above it
    // (which would queue behind every fault answer).
    let mut opts = LinkOptions::new(
        "tlnkrate",
        "40mbit".parse().unwrap(),
        Duration::from_millis(5),
        Content::Random,
    );
    opts.size = 16 << 20;
    opts.iperf_seconds = 0;
    opts.probe_interval = Duration::from_millis(50);
    let r = link::run(&opts).unwrap();
    assert_eq!(r.integrity.pages_differing, 0);
    let rate = r.send.rate.expect("rate pacing ran");
    let measured_mbps = rate.bottleneck_bytes_per_s as f64 * 8e-6;
    assert!(
        (36.0..=41.0).contains(&measured_mbps),
        "bottleneck measured at {measured_mbps:.2} Mbit/s: {rate:?}"
    );
    assert!(
        r.send.pacing_rate > 0 && r.send.pacing_rate < rate.bottleneck_bytes_per_s,
        "paced at {} B/s against a bottleneck of {} B/s",
        r.send.pacing_rate,
        rate.bottleneck_bytes_per_s
    );
    assert!(rate.probes + rate.drains > 0, "{rate:?}");
    assert!(!r.congestion.is_empty());
}

#[test]
fn a_loopback_run_accounts_the_engines_cpu_by_stage() {
    // `--no-wan`: one namespace's loopback, unpaced, TLS on. Every stage
    // that ran must show its cost, the named stages must fit in the
    // threads' CPU time, and an unpaced bulk sender must batch its sends
    // (one send per 4 KiB frame cost 3.4 s of kernel CPU per GB).
    let mut opts = LinkOptions::new(
        "tlnklo",
        "40mbit".parse().unwrap(),
        Duration::from_millis(5),
        Content::Random,
    );
    opts.no_wan = true;
    opts.size = 64 << 20;
    opts.iperf_seconds = 0;
    let r = link::run(&opts).unwrap();
    assert!(r.no_wan && !r.pacing);
    assert_eq!(r.integrity.pages_differing, 0);
    assert_eq!(r.integrity.pages_compared, (64 << 20) / 4096);
    assert_ne!(r.io.cipher, "none");
    let c = r.cpu;
    for (stage, v) in [
        ("read", c.read),
        ("compress", c.compress),
        ("seal", c.seal),
        ("send", c.send),
        ("open", c.open),
        ("install", c.install),
    ] {
        assert!(v > 0.0, "{stage} shows no cost: {c:?}");
    }
    // (Userspace stages are clocked by wall time, which a busy two-core
    // host inflates with preemption: the bound is loose.)
    let named = c.read + c.compress + c.seal + c.send + c.receive + c.open + c.install;
    assert!(named <= c.seconds_per_gb * 2.0, "{c:?}");
    assert!(
        r.send.sends * 64 * 1024 <= r.send.bytes_sent,
        "{} sends for {} bytes: not batched",
        r.send.sends,
        r.send.bytes_sent
    );
    assert_eq!(r.targets.len(), 1, "{:?}", r.targets);
}
