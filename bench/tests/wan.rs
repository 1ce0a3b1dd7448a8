//! The emulated WAN, for real: namespaces, TUN devices, tbf and the delay line
//! (needs root, `ip`, `tc`, `iperf3`, `ping`: `scripts/setup`).
//!
//! Every test uses its own WAN name (a tag plus this process's pid), so tests
//! run in parallel, and next to other runs of this file, without meeting.
//! Timing assertions are loose on purpose: the machine is shared and noisy;
//! `wanmig-bench wan check` is the benchmark.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use wanmig_bench::wan::{
    self, TeardownError, Wan, WanConfig, WanError, WanNames, check, daemon, netns,
};
use wanmig_planner::units::Rate;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the WAN tests need root (network namespaces, TUN, tc); run them as root after scripts/setup"
    );
}

/// A WAN name unique to this test and this process: `tag` (at most 6
/// characters) and 4 hex digits of the pid.
fn unique(tag: &str) -> String {
    assert!(tag.len() <= 6);
    format!("{tag}{:04x}", std::process::id() & 0xffff)
}

fn rate(s: &str) -> Rate {
    s.parse().unwrap()
}

fn up(tag: &str, r: &str, rtt_ms: u64) -> Wan {
    require_root();
    Wan::up(WanConfig::new(
        unique(tag),
        rate(r),
        Duration::from_millis(rtt_ms),
    ))
    .expect("wan up")
}

/// A listener on `addr:0` created inside namespace `ns`.
fn listen_in(ns: &str, addr: Ipv4Addr) -> TcpListener {
    netns::run_in(ns, move || TcpListener::bind((addr, 0)))
        .unwrap()
        .unwrap()
}

/// A TCP connection made from inside namespace `ns`.
fn connect_from(ns: &str, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    netns::run_in(ns, move || TcpStream::connect_timeout(&to, timeout)).unwrap()
}

/// Echoes everything on one accepted connection until EOF.
fn echo_once(listener: TcpListener) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// Round-trip times of `rounds` 1-byte TCP ping-pongs from `from_ns` to an echo
/// server on `server` (after a few warm-up rounds), `gap` apart.
fn tcp_round_trips(
    from_ns: &str,
    server: TcpListener,
    rounds: u32,
    gap: Duration,
) -> Vec<Duration> {
    let to = server.local_addr().unwrap();
    let echo = echo_once(server);
    let mut c = connect_from(from_ns, to, Duration::from_secs(2)).unwrap();
    c.set_nodelay(true).unwrap();
    let mut b = [0u8; 1];
    let mut rtts = Vec::with_capacity(rounds as usize);
    for i in 0..rounds + 3 {
        let t = Instant::now();
        c.write_all(&[i as u8]).unwrap();
        c.read_exact(&mut b).unwrap();
        let rtt = t.elapsed();
        assert_eq!(b[0], i as u8);
        if i >= 3 {
            rtts.push(rtt);
        }
        // Like ping: one exchange at a time with idle gaps, not back to back.
        thread::sleep(gap);
    }
    drop(c);
    echo.join().unwrap();
    rtts
}

/// `(min, mean)` of `rounds` TCP ping-pongs 2 ms apart; see [`tcp_round_trips`].
fn tcp_ping_pong(from_ns: &str, server: TcpListener, rounds: u32) -> (Duration, Duration) {
    let rtts = tcp_round_trips(from_ns, server, rounds, Duration::from_millis(2));
    let min = rtts.iter().copied().min().unwrap();
    (min, rtts.iter().sum::<Duration>() / rounds)
}

fn assert_rtt_near(what: &str, setting: Duration, (min, mean): (Duration, Duration)) {
    let s = setting.as_secs_f64();
    assert!(
        min.as_secs_f64() >= 0.98 * s,
        "{what}: min RTT {min:?} is below the setting {setting:?}"
    );
    assert!(
        mean.as_secs_f64() <= 1.3 * s,
        "{what}: mean RTT {mean:?} is more than 30 % above the setting {setting:?}"
    );
}

#[test]
fn tcp_crosses_the_wan_both_ways() {
    let wan = up("tcp", "200mbit", 2);
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    for (server_ns, server_addr, client_ns) in [
        (wan.dst_ns(), wan.dst_addr(), wan.src_ns()),
        (wan.src_ns(), wan.src_addr(), wan.dst_ns()),
    ] {
        let listener = listen_in(server_ns, server_addr);
        let to = listener.local_addr().unwrap();
        let echo = echo_once(listener);
        let mut c = connect_from(client_ns, to, Duration::from_secs(2)).unwrap();
        let writer = {
            let mut c = c.try_clone().unwrap();
            let payload = payload.clone();
            thread::spawn(move || c.write_all(&payload).unwrap())
        };
        let mut back = vec![0u8; payload.len()];
        c.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        assert!(
            back == payload,
            "echo through {client_ns} -> {server_ns} corrupted"
        );
        drop(c);
        echo.join().unwrap();
    }
    let stats = wan.stats().unwrap();
    assert!(stats.src_to_dst.forwarded_bytes >= 2 * payload.len() as u64);
    assert!(stats.dst_to_src.forwarded_bytes >= 2 * payload.len() as u64);
    assert_eq!(stats.src_to_dst.dropped() + stats.dst_to_src.dropped(), 0);
}

#[test]
fn tcp_round_trip_matches_the_setting() {
    let wan = up("rtt", "100mbit", 10);
    let server = listen_in(wan.dst_ns(), wan.dst_addr());
    let measured = tcp_ping_pong(wan.src_ns(), server, 30);
    assert_rtt_near("10ms WAN", wan.config().rtt, measured);
}

#[test]
fn namespaces_reach_each_other_only_through_the_wan() {
    let wan = up("iso", "100mbit", 1);
    let n = wan.names();
    // Each host has its loopback and its veth to its router; each router has
    // its loopback, its veth to its host and its TUN.
    for (ns, devices) in [
        (wan.src_ns(), vec![n.host_veth.as_str()]),
        (wan.src_router_ns(), vec![&n.router_veth, &n.src_tun]),
        (wan.dst_router_ns(), vec![&n.router_veth, &n.dst_tun]),
        (wan.dst_ns(), vec![&n.host_veth]),
    ] {
        let dev = netns::run_in(ns, || std::fs::read_to_string("/proc/thread-self/net/dev"))
            .unwrap()
            .unwrap();
        let mut ifaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next().map(str::trim))
            .collect();
        ifaces.sort();
        let mut want = devices;
        want.push("lo");
        want.sort();
        assert_eq!(ifaces, want, "interfaces in {ns}");
    }
    // Only the routers forward.
    for (ns, forwarding) in [
        (wan.src_ns(), "0"),
        (wan.src_router_ns(), "1"),
        (wan.dst_router_ns(), "1"),
        (wan.dst_ns(), "0"),
    ] {
        let v = netns::run_in(ns, || {
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap()
        })
        .unwrap();
        assert_eq!(v.trim(), forwarding, "ip_forward in {ns}");
    }
    let short = Duration::from_millis(300);

    // A server on all addresses of dst: reachable from src through the WAN
    // address, not from the root namespace, and not on src's own loopback.
    let any = listen_in(wan.dst_ns(), Ipv4Addr::UNSPECIFIED);
    let port = any.local_addr().unwrap().port();
    let via_wan = SocketAddr::from((wan.dst_addr(), port));
    let echo = echo_once(any);
    let c = connect_from(wan.src_ns(), via_wan, Duration::from_secs(2));
    assert!(c.is_ok(), "src cannot reach dst through the WAN: {c:?}");
    drop(c);
    echo.join().unwrap();
    let lo = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(
        connect_from(wan.src_ns(), lo, short).is_err(),
        "src's loopback reached dst's server"
    );
    assert!(
        TcpStream::connect_timeout(&lo, short).is_err(),
        "the root namespace's loopback reached dst's server"
    );

    // A server on dst's loopback is reachable from dst only.
    let local = listen_in(wan.dst_ns(), Ipv4Addr::LOCALHOST);
    let lo = local.local_addr().unwrap();
    assert!(connect_from(wan.src_ns(), lo, short).is_err());
    assert!(connect_from(wan.dst_ns(), lo, short).is_ok());
}

#[test]
fn drop_tears_everything_down() {
    let wan = up("drop", "100mbit", 1);
    let names = wan.names().clone();
    // Handles keep the namespaces reachable after their names are deleted.
    let src_router = netns::open(&names.src_router_ns).unwrap();
    let dst_router = netns::open(&names.dst_router_ns).unwrap();
    assert!(src_router.has_interface(&names.src_tun).unwrap());
    drop(wan);
    let listed = netns::list().unwrap();
    let ip = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for ns in names.namespaces() {
        assert!(!listed.iter().any(|l| l == ns), "{ns} still listed");
        assert!(
            !ip.lines().any(|l| l.split_whitespace().next() == Some(ns)),
            "{ip}"
        );
    }
    // The delay line stopped and closed its fds, so the TUNs are gone. A
    // child forked by a parallel test holds a copy of every fd until its exec
    // (close-on-exec), so allow a moment for the last copy to close.
    let deadline = Instant::now() + Duration::from_secs(2);
    let gone = |h: &netns::NsHandle, dev: &str| !h.has_interface(dev).unwrap();
    while !(gone(&src_router, &names.src_tun) && gone(&dst_router, &names.dst_tun)) {
        assert!(
            Instant::now() < deadline,
            "TUN devices still exist after drop"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn down_by_name_is_idempotent() {
    require_root();
    let name = unique("idem");
    Wan::down_by_name(&name).unwrap();
    Wan::down_by_name(&name).unwrap();

    // A WAN torn down by name under its owner, then dropped.
    let wan = up("idem", "100mbit", 1);
    Wan::down_by_name(&name).unwrap();
    assert!(!wan.names().namespaces().iter().any(|ns| netns::exists(ns)));
    Wan::down_by_name(&name).unwrap();
    drop(wan);

    // Leftovers of a crash: namespaces, a process inside one, and a pidfile
    // naming a process that is gone.
    let names = WanNames::new(&name).unwrap();
    for ns in names.namespaces() {
        netns::add(ns).unwrap();
    }
    let mut sleeper = netns::command(&names.dst_router_ns, "sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    std::fs::create_dir_all(daemon::RUN_DIR).unwrap();
    std::fs::write(daemon::pid_path(&name), format!("{} 1\n", gone.id())).unwrap();
    assert!(matches!(daemon::probe(&name), daemon::Probe::Broken { .. }));
    Wan::down_by_name(&name).unwrap();
    assert!(
        sleeper.try_wait().unwrap().is_some(),
        "process in the namespace survived"
    );
    assert!(!names.namespaces().iter().any(|ns| netns::exists(ns)));
    assert!(!daemon::pid_path(&name).exists());
    assert_eq!(daemon::probe(&name), daemon::Probe::Down);
    Wan::down_by_name(&name).unwrap();
}

#[test]
fn two_wans_at_once_keep_their_own_settings() {
    let a = up("twoa", "100mbit", 4);
    let b = up("twob", "100mbit", 16);
    assert_ne!(a.src_ns(), b.src_ns());
    let sa = listen_in(a.dst_ns(), a.dst_addr());
    let sb = listen_in(b.dst_ns(), b.dst_addr());
    let (na, nb) = (a.src_ns().to_string(), b.src_ns().to_string());
    let ta = thread::spawn(move || tcp_ping_pong(&na, sa, 20));
    let tb = thread::spawn(move || tcp_ping_pong(&nb, sb, 20));
    assert_rtt_near("WAN a (4ms)", a.config().rtt, ta.join().unwrap());
    assert_rtt_near("WAN b (16ms)", b.config().rtt, tb.join().unwrap());
    // a's namespaces cannot reach b's addresses.
    let b_server = listen_in(b.dst_ns(), Ipv4Addr::UNSPECIFIED);
    let to = SocketAddr::from((b.dst_addr(), b_server.local_addr().unwrap().port()));
    assert!(connect_from(a.src_ns(), to, Duration::from_millis(300)).is_err());
}

#[test]
fn loss_drops_about_the_set_fraction() {
    require_root();
    let mut config = WanConfig::new(unique("loss"), rate("100mbit"), Duration::from_millis(1));
    config.loss_ppm = 100_000; // 10 %
    let wan = Wan::up(config).unwrap();
    let receiver = netns::run_in(wan.dst_ns(), {
        let dst = wan.dst_addr();
        move || UdpSocket::bind((dst, 0))
    })
    .unwrap()
    .unwrap();
    let to = receiver.local_addr().unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let sender = netns::run_in(wan.src_ns(), || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap()
        .unwrap();
    const SENT: u32 = 3000;
    // Calibration echoes went through the delay line too.
    let before = wan.stats().unwrap().src_to_dst;
    let counter = thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut got = 0u32;
        while receiver.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    for i in 0..SENT {
        sender.send_to(&i.to_le_bytes(), to).unwrap();
        if i % 50 == 49 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    let received = counter.join().unwrap();
    let fraction = f64::from(SENT - received) / f64::from(SENT);
    assert!(
        (0.07..=0.13).contains(&fraction),
        "lost {fraction:.3} of the datagrams with 10 % loss set"
    );
    let after = wan.stats().unwrap().src_to_dst;
    let lost = after.dropped_loss - before.dropped_loss;
    assert!((210..=390).contains(&lost), "{after:?}");
    assert_eq!(
        after.forwarded_packets - before.forwarded_packets,
        u64::from(received)
    );
}

#[test]
fn invalid_names_are_typed_errors() {
    for bad in ["", "UPPER", "has-dash", "waytoolong1", "sp ace"] {
        let c = WanConfig::new(bad, rate("40mbit"), Duration::from_millis(5));
        match Wan::up(c) {
            Err(WanError::InvalidName(e)) => assert_eq!(e.name, bad),
            other => panic!("{bad:?}: expected InvalidName, got {other:?}"),
        }
        assert!(matches!(
            Wan::down_by_name(bad),
            Err(TeardownError::InvalidName(_))
        ));
    }
    assert!(wan::validate_name("ok123").is_ok());
}

#[test]
fn commands_and_threads_run_inside_the_namespace() {
    let wan = up("cmd", "100mbit", 1);
    let out = netns::command(wan.src_ns(), "cat")
        .arg("/proc/self/net/dev")
        .output()
        .unwrap();
    let dev = String::from_utf8_lossy(&out.stdout);
    assert!(dev.contains(&wan.names().host_veth), "{dev}");
    let ping = netns::command(wan.src_ns(), "ping")
        .args(["-c", "2", "-i", "0.05", "-q", &wan.dst_addr().to_string()])
        .output()
        .unwrap();
    assert!(ping.status.success(), "{ping:?}");
    let joined = netns::spawn_in(wan.dst_ns(), || {
        std::fs::read_to_string("/proc/thread-self/net/dev").unwrap()
    })
    .unwrap()
    .join()
    .unwrap();
    assert!(joined.contains(&wan.names().host_veth));
}

#[test]
fn iperf3_reaches_most_of_the_rate() {
    let wan = up("iperf", "40mbit", 5);
    let m = check::measure(&wan, Duration::from_secs(2)).unwrap();
    assert!(m.rate_ratio >= 0.8, "{m:?}");
    assert!(m.rtt_error.abs() <= 0.3, "{m:?}");
    assert_eq!(m.ping_received, m.ping_sent);
}

#[test]
fn cli_daemon_keeps_the_wan_up_until_down() {
    require_root();
    let exe = env!("CARGO_BIN_EXE_wanmig-bench");
    let name = unique("cli");
    let run = |args: &[&str]| {
        let out = Command::new(exe).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    /// Tears the daemon's WAN down even if an assertion fails.
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Wan::down_by_name(&self.0);
            let _ = std::fs::remove_file(daemon::log_path(&self.0));
        }
    }
    let _cleanup = Cleanup(name.clone());
    run(&[
        "wan", "up", "--name", &name, "--rate", "100mbit", "--rtt", "2ms",
    ]);
    let again = run(&[
        "wan", "up", "--name", &name, "--rate", "100mbit", "--rtt", "2ms",
    ]);
    assert!(again.contains("already up"), "{again}");
    let status = run(&["wan", "status", "--name", &name]);
    assert!(status.contains("up: daemon"), "{status}");

    let wan = Wan::attach(&name).unwrap();
    assert_eq!(wan.config().rtt, Duration::from_millis(2));
    let server = listen_in(wan.dst_ns(), wan.dst_addr());
    let (min, _) = tcp_ping_pong(wan.src_ns(), server, 5);
    assert!(min >= Duration::from_micros(1960), "{min:?}");
    drop(wan); // an attached handle leaves the WAN up
    assert!(matches!(daemon::probe(&name), daemon::Probe::Up(_)));

    run(&["wan", "down", "--name", &name]);
    assert_eq!(daemon::probe(&name), daemon::Probe::Down);
    let twice = run(&["wan", "down", "--name", &name]);
    assert!(twice.contains("was not up"), "{twice}");
}

/// Sets a socket's congestion control (`TCP_CONGESTION`).
fn set_congestion_control(s: &TcpStream, name: &str) {
    // SAFETY: the fd is an open TCP socket for the whole call; the option value
    // is `name.len()` readable bytes.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "TCP_CONGESTION {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// What [`round_trips_under_bulk_load`] saw.
struct LoadedRtt {
    /// Median TCP round trip on the idle WAN.
    idle: Duration,
    /// TCP round trips while the bulk flow ran, sorted.
    loaded: Vec<Duration>,
    /// The bulk flow's goodput, Mbit/s.
    bulk_mbps: f64,
}

fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

/// Brings up a 40 Mbit/s, 5 ms WAN with a bottleneck queue of `queue`, starts
/// one bulk TCP flow from the source to the destination, and times 1-byte TCP
/// ping-pongs on a second connection, in the same direction, while it runs.
///
/// The bulk flow uses cubic, a loss-based congestion control like most bulk
/// senders: it grows its window until the bottleneck queue overflows, so at
/// a bottleneck that behaves like a router the queue stays between about 70 %
/// and 100 % full and every other flow waits behind it. (BBR, this machine's
/// default, paces itself and keeps the queue short on its own.)
fn round_trips_under_bulk_load(tag: &str, queue: Duration) -> LoadedRtt {
    require_root();
    let mut config = WanConfig::new(unique(tag), rate("40mbit"), Duration::from_millis(5));
    config.queue = queue;
    let wan = Wan::up(config).unwrap();
    let idle = {
        let mut rtts = tcp_round_trips(
            wan.src_ns(),
            listen_in(wan.dst_ns(), wan.dst_addr()),
            10,
            Duration::from_millis(10),
        );
        rtts.sort();
        median(&rtts)
    };

    let sink = listen_in(wan.dst_ns(), wan.dst_addr());
    let to = sink.local_addr().unwrap();
    let sink = thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break total,
                Ok(n) => total += n as u64,
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut bulk = connect_from(wan.src_ns(), to, Duration::from_secs(2)).unwrap();
    set_congestion_control(&bulk, "cubic");
    let started = Instant::now();
    let sender = thread::spawn({
        let stop = stop.clone();
        move || {
            let chunk = vec![0x5au8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                bulk.write_all(&chunk).unwrap();
            }
            bulk.shutdown(std::net::Shutdown::Write).unwrap();
        }
    });
    // Slow start overshoots and then settles into the sawtooth.
    thread::sleep(Duration::from_millis(1500));
    let mut loaded = tcp_round_trips(
        wan.src_ns(),
        listen_in(wan.dst_ns(), wan.dst_addr()),
        20,
        Duration::from_millis(20),
    );
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let bytes = sink.join().unwrap();
    let bulk_mbps = bytes as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e6;
    loaded.sort();
    eprintln!(
        "queue {queue:?}: idle {idle:?}; under load median {:?}, min {:?}, max {:?}; bulk {bulk_mbps:.1} Mbit/s",
        median(&loaded),
        loaded[0],
        loaded[loaded.len() - 1]
    );
    LoadedRtt {
        idle,
        loaded,
        bulk_mbps,
    }
}

/// The bottleneck is a router's queue, remote to both hosts: a bulk flow fills
/// it and a concurrent flow's round trip grows by up to the queue. If the queue
/// were on a device of the sending host's own stack, TCP Small Queues would let
/// each socket keep only about two 64 KiB GSO packets in it (~26 ms at 40
/// Mbit/s; 9 ms measured with the tbf on the source host's TUN), and the
/// deep queue would never fill.
#[test]
fn a_bulk_flow_fills_a_deep_bottleneck_queue() {
    let queue = Duration::from_millis(200);
    let rtt = Duration::from_millis(5);
    let m = round_trips_under_bulk_load("deepq", queue);
    let loaded = median(&m.loaded);
    assert!(m.idle < 2 * rtt, "idle RTT {:?}", m.idle);
    assert!(
        m.bulk_mbps > 30.0,
        "bulk flow only {:.1} Mbit/s",
        m.bulk_mbps
    );
    let floor = (3 * rtt).max(queue / 4);
    assert!(
        loaded > floor,
        "median RTT under load {loaded:?} is not above {floor:?}: the bulk flow does not fill the {queue:?} bottleneck queue"
    );
    // ... and the queue is bounded by its setting.
    let ceiling = queue + rtt + Duration::from_millis(30);
    assert!(
        loaded < ceiling,
        "median RTT under load {loaded:?} is above {ceiling:?}: the queue is longer than set"
    );
}

/// With a short queue the same load delays other flows by at most the queue.
#[test]
fn a_short_bottleneck_queue_bounds_the_delay() {
    let queue = Duration::from_millis(20);
    let rtt = Duration::from_millis(5);
    let m = round_trips_under_bulk_load("shortq", queue);
    let loaded = median(&m.loaded);
    assert!(
        m.bulk_mbps > 30.0,
        "bulk flow only {:.1} Mbit/s",
        m.bulk_mbps
    );
    let ceiling = 2 * rtt + queue;
    assert!(
        loaded < ceiling,
        "median RTT under load {loaded:?} is above {ceiling:?} with a {queue:?} queue"
    );
}
