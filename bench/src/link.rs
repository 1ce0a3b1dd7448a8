//! `wanmig-bench link`: how close the real datapath comes to what TCP itself
//! achieves on the same emulated link, in the same run.
//!
//! One run brings up the emulated WAN, measures iperf3 across it, then moves a
//! region of pages from a source to a destination through the engine's own
//! datapath: the authenticated handshake on a `bulk` and a `fault` connection,
//! pages copied out and encoded (zero flag, LZ4 when it pays, CRC) straight into
//! io_uring send buffers, paced bulk, and decoded at the destination into a
//! second region. While the bulk transfer runs, the destination sends post-copy
//! fault requests on the fault connection at a fixed interval and times the
//! answers, which shows what pacing does for faults. At the end every
//! destination page is compared with the source page.
//!
//! Figures (JSON with `--json`):
//! - `goodput_mbps`: frame bytes (headers + payloads) the destination received
//!   per second on both connections (the bulk push and the answers to the
//!   fault probes share the link), comparable to iperf3's goodput;
//! - `ratio` = `goodput_mbps / iperf3_mbps`;
//! - `effective_mbps`: uncompressed page bytes per second;
//! - `compression_ratio`: page bytes per frame byte.
//!
//! Targets: on random pages `ratio >= 0.98`; on compressible content
//! `effective_mbps >= 0.9 × compression_ratio × iperf3_mbps`; and with the
//! push saturating the link, fault round trips p50 <= RTT + 1.5 ms and p99
//! <= 2 × RTT. With `--no-wan` (one namespace's loopback, unpaced) the
//! target is the engine's own speed: `effective_mbps >= 10000`, encrypted,
//! and the report breaks the engines' CPU time down by stage ([`CpuCost`]).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use wanmig_datapath::connection::{self, Connection, LinkConfig};
use wanmig_datapath::transport::rate::RateConfig;
use wanmig_datapath::transport::tcp::{self, Congestion};
use wanmig_datapath::transport::{Encryption, IoPath};
use wanmig_datapath::transport::{Flow, IoPreference, PacingConfig, RecvStats, SendStats};
use wanmig_datapath::unit_stream::UnitStats;
use wanmig_datapath::wire::{
    Compression, DecodeError, FrameRef, Geometry, MigrationId, PingMsg, PskKey, ServerPolicy,
    UnitKind,
};
use wanmig_planner::units::Rate;

use crate::content::{Content, fill_page, fill_region};
use crate::wan::{Wan, WanConfig, WanError, check, netns};

/// Bytes per send of the unpaced bulk sender on loopback.
pub const LOOPBACK_BATCH: usize = 256 << 10;

/// Guest page size used by the benchmark.
pub const PAGE: usize = 4096;

/// What to run.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// WAN name (namespaces `wanmig-<name>-src/dst`).
    pub wan_name: String,
    /// Link rate.
    pub rate: Rate,
    /// Round-trip time.
    pub rtt: Duration,
    /// The path's queue (tbf) as time at full rate; `None` = the WAN default.
    pub queue: Option<Duration>,
    /// Page contents.
    pub content: Content,
    /// Bytes of pages to move.
    pub size: u64,
    /// Length of the iperf3 reference run (0 skips it).
    pub iperf_seconds: u64,
    /// Whether the bulk sender is paced.
    pub pacing: bool,
    /// The pacer's tuning when it is on.
    pub pacing_config: PacingConfig,
    /// I/O backend.
    pub io: IoPreference,
    /// TLS 1.3 (the default) or plaintext.
    pub encryption: Encryption,
    /// Whether LZ4 is tried.
    pub compression: Compression,
    /// Interval between fault probes during the transfer.
    pub probe_interval: Duration,
    /// Seed of the page contents.
    pub seed: u64,
    /// Congestion control of iperf3 and both engines' connections (`None`:
    /// the host's default).
    pub congestion: Option<Congestion>,
    /// No WAN: both engines (and iperf3) in one namespace over its
    /// loopback, unpaced, to measure what the engine itself can move.
    pub no_wan: bool,
}

impl LinkOptions {
    /// The default run: 256 MiB over 40 Mbit/s, 5 ms.
    pub fn new(wan_name: impl Into<String>, rate: Rate, rtt: Duration, content: Content) -> Self {
        LinkOptions {
            wan_name: wan_name.into(),
            rate,
            rtt,
            queue: None,
            content,
            size: 256 << 20,
            iperf_seconds: 10,
            pacing: true,
            pacing_config: PacingConfig {
                rate: Some(RateConfig::default()),
                ..PacingConfig::default()
            },
            io: IoPreference::Auto,
            encryption: Encryption::Tls,
            compression: Compression::Lz4,
            probe_interval: Duration::from_millis(100),
            seed: 1,
            congestion: None,
            no_wan: false,
        }
    }
}

/// Post-copy fault round trips measured on the fault connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FaultLatency {
    /// Median with the link idle, ms.
    pub idle_p50_ms: f64,
    /// Median while the bulk transfer runs, ms.
    pub loaded_p50_ms: f64,
    /// 99th percentile while the bulk transfer runs, ms.
    pub loaded_p99_ms: f64,
    /// Worst while the bulk transfer runs, ms.
    pub loaded_max_ms: f64,
    /// Probes answered while loaded.
    pub loaded_samples: usize,
    /// Answers whose page differed from the source's.
    pub wrong_answers: u64,
}

/// Page-by-page comparison of the two regions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Integrity {
    /// Pages compared.
    pub pages_compared: u64,
    /// Pages whose bytes differ.
    pub pages_differing: u64,
}

/// The target that applies to this content and whether it was met.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The rule.
    pub rule: String,
    /// The threshold the measured figure is held to.
    pub threshold: f64,
    /// The measured figure.
    pub measured: f64,
    /// Whether it was met.
    pub met: bool,
}

impl Target {
    fn at_least(rule: &str, threshold: f64, measured: f64) -> Self {
        Target {
            rule: rule.into(),
            threshold,
            measured,
            met: measured >= threshold,
        }
    }

    fn at_most(rule: &str, threshold: f64, measured: f64) -> Self {
        Target {
            rule: rule.into(),
            threshold,
            measured,
            met: measured <= threshold,
        }
    }
}

/// CPU time of the two engines' threads (source: bulk sender and fault
/// server; destination: bulk receiver and fault prober), in seconds per GB
/// of page data moved (10^9 bytes of guest pages).
///
/// The stages are measured where they run: userspace stages with the clock
/// around each call, the kernel's share of sending and receiving as the
/// bulk threads' system time; `other` is the rest of the threads' CPU time
/// (framing, the loops, the fault threads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuCost {
    /// User plus system time of the engines' threads, s.
    pub seconds: f64,
    /// `seconds` per GB moved.
    pub seconds_per_gb: f64,
    /// Copying pages out of the source region, s/GB.
    pub read: f64,
    /// Encoding (zero check, LZ4, CRC) into the send buffers, s/GB.
    pub compress: f64,
    /// Sealing TLS records, s/GB.
    pub seal: f64,
    /// The kernel's send path (the bulk sender's system time), s/GB.
    pub send: f64,
    /// The kernel's receive path (the bulk receiver's system time), s/GB.
    pub receive: f64,
    /// Opening TLS records, s/GB.
    pub open: f64,
    /// Decoding frames and installing pages (CRC check, LZ4, copy), s/GB.
    pub install: f64,
    /// Everything else, s/GB.
    pub other: f64,
}

/// User and system CPU time of the calling thread.
#[derive(Debug, Clone, Copy, Default)]
struct ThreadCpu {
    user: Duration,
    sys: Duration,
}

impl ThreadCpu {
    fn now() -> Self {
        // SAFETY: an all-zero `rusage` is a valid value of the plain C
        // struct, which getrusage overwrites.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a live, writable rusage for the duration of the
        // call.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        if rc != 0 {
            return ThreadCpu::default();
        }
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        ThreadCpu {
            user: tv(ru.ru_utime),
            sys: tv(ru.ru_stime),
        }
    }

    fn since(self, start: ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            user: self.user.saturating_sub(start.user),
            sys: self.sys.saturating_sub(start.sys),
        }
    }

    fn total(self) -> Duration {
        self.user + self.sys
    }
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkReport {
    /// Set rate, Mbit/s.
    pub rate_mbps: f64,
    /// Set RTT, ms.
    pub rtt_ms: f64,
    /// Page contents.
    pub content: Content,
    /// Bytes of pages moved.
    pub size_bytes: u64,
    /// I/O backend of the bulk sender.
    pub backend: String,
    /// How the bulk connection's bytes travelled: backend, cipher and
    /// where records were sealed.
    pub io: IoPath,
    /// Whether the bulk sender was paced.
    pub pacing: bool,
    /// Frame bytes per second at the destination (both connections), Mbit/s.
    pub goodput_mbps: f64,
    /// iperf3 on the same link in the same run, Mbit/s.
    pub iperf3_mbps: f64,
    /// `goodput_mbps / iperf3_mbps`.
    pub ratio: f64,
    /// Uncompressed page bytes per second, Mbit/s.
    pub effective_mbps: f64,
    /// Page bytes per frame byte.
    pub compression_ratio: f64,
    /// Transfer time, s.
    pub seconds: f64,
    /// Frame bytes the destination received (bulk push and fault answers:
    /// both cross the same link).
    pub wire_bytes: u64,
    /// Of those, on the bulk connection.
    pub bulk_wire_bytes: u64,
    /// Units by encoding.
    pub units: UnitStats,
    /// Bulk sender counters (sends, pacing).
    pub send: SendStats,
    /// Fault round trips.
    pub fault_latency: FaultLatency,
    /// Data integrity.
    pub integrity: Integrity,
    /// Congestion control the bulk connection ran (the kernel's name).
    pub congestion: String,
    /// Whether the run went over loopback instead of the emulated WAN.
    pub no_wan: bool,
    /// CPU the two engines spent, in all and by stage.
    pub cpu: CpuCost,
    /// The targets that apply to this run: goodput (against iperf3, or the
    /// compressed equivalent) and fault latency under load (p50 <= RTT +
    /// 1.5 ms, p99 <= 2 RTT).
    pub targets: Vec<Target>,
}

impl LinkReport {
    /// Whether every target was met.
    pub fn targets_met(&self) -> bool {
        self.targets.iter().all(|t| t.met)
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The WAN could not be brought up.
    #[error(transparent)]
    Wan(#[from] WanError),
    /// The iperf3 reference failed.
    #[error("iperf3 reference")]
    Iperf(#[from] check::CheckError),
    /// A namespace thread could not start or panicked.
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// Setting up the connections failed.
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    /// The transfer failed.
    #[error("{side}: {message}")]
    Transfer {
        /// Source or destination.
        side: &'static str,
        /// What happened.
        message: String,
    },
    /// A bad option.
    #[error("invalid option: {0}")]
    Options(String),
}

fn transfer(side: &'static str) -> impl Fn(String) -> LinkError {
    move |message| LinkError::Transfer { side, message }
}

/// What the destination measured.
struct DstOutcome {
    region: Vec<u8>,
    rx_bytes: u64,
    bulk_rx_bytes: u64,
    end: Instant,
    latency: FaultLatency,
    /// The bulk receiver thread's CPU during the push.
    bulk_cpu: ThreadCpu,
    /// The prober thread's CPU.
    prober_cpu: ThreadCpu,
    recv: RecvStats,
}

/// What the source measured.
struct SrcOutcome {
    start: Instant,
    units: UnitStats,
    send: SendStats,
    backend: String,
    io: IoPath,
    congestion: String,
    /// The bulk sender thread's CPU during the push.
    bulk_cpu: ThreadCpu,
    /// The fault server thread's CPU.
    server_cpu: ThreadCpu,
}

/// Runs the benchmark.
pub fn run(opts: &LinkOptions) -> Result<LinkReport, LinkError> {
    if opts.size < PAGE as u64 || opts.size % PAGE as u64 != 0 {
        return Err(LinkError::Options(format!(
            "size {} is not a positive multiple of {PAGE}",
            opts.size
        )));
    }
    let net = if opts.no_wan {
        Net::Loopback(LoopbackNs::up(&opts.wan_name)?)
    } else {
        let mut wan_config = WanConfig::new(opts.wan_name.clone(), opts.rate, opts.rtt);
        if let Some(q) = opts.queue {
            wan_config.queue = q;
        }
        Net::Wan(Box::new(Wan::up(wan_config)?))
    };
    let (src_ns, dst_ns, dst_addr) = net.endpoints();
    let iperf3_mbps = if opts.iperf_seconds > 0 {
        check::iperf3_between(
            &src_ns,
            &dst_ns,
            dst_addr,
            Duration::from_secs(opts.iperf_seconds),
            opts.congestion.map(Congestion::name),
        )?
        .mbps
    } else {
        f64::NAN
    };
    let pages = opts.size / PAGE as u64;
    let mut src = vec![0u8; opts.size as usize];
    fill_region(opts.content, opts.seed, PAGE, &mut src);
    let src = Arc::new(src);
    let (dst, source) = transfer_pages(&net, opts, pages, &src)?;
    drop(net);

    let integrity = compare(&src, &dst.region);
    let seconds = dst
        .end
        .saturating_duration_since(source.start)
        .as_secs_f64();
    let goodput_mbps = dst.rx_bytes as f64 * 8.0 / seconds / 1e6;
    let effective_mbps = source.units.unit_bytes as f64 * 8.0 / seconds / 1e6;
    let compression_ratio = source.units.compression_ratio();
    let ratio = goodput_mbps / iperf3_mbps;
    let goodput = if opts.content == Content::Random {
        Target::at_least("goodput_mbps / iperf3_mbps >= 0.98", 0.98, ratio)
    } else {
        Target::at_least(
            "effective_mbps >= 0.9 * compression_ratio * iperf3_mbps",
            0.9 * compression_ratio * iperf3_mbps,
            effective_mbps,
        )
    };
    let rtt_ms = opts.rtt.as_secs_f64() * 1e3;
    let mut targets = Vec::new();
    if opts.no_wan {
        // Loopback: what the engine itself moves, encrypted, on this host
        // (iperf3 there is a reference, not a target: it neither seals
        // nor encodes).
        targets.push(Target::at_least(
            "effective_mbps >= 10000 (loopback)",
            10_000.0,
            effective_mbps,
        ));
    } else {
        targets.push(goodput);
        targets.push(Target::at_most(
            "fault_latency.loaded_p50_ms <= rtt_ms + 1.5",
            rtt_ms + 1.5,
            dst.latency.loaded_p50_ms,
        ));
        targets.push(Target::at_most(
            "fault_latency.loaded_p99_ms <= 2 * rtt_ms",
            2.0 * rtt_ms,
            dst.latency.loaded_p99_ms,
        ));
    }
    let cpu = cpu_cost(&source, &dst);
    Ok(LinkReport {
        rate_mbps: if opts.no_wan {
            f64::NAN
        } else {
            opts.rate.mbit()
        },
        rtt_ms: if opts.no_wan { 0.0 } else { rtt_ms },
        content: opts.content,
        size_bytes: opts.size,
        backend: source.backend,
        io: source.io,
        pacing: opts.pacing && !opts.no_wan,
        goodput_mbps,
        iperf3_mbps,
        ratio,
        effective_mbps,
        compression_ratio,
        seconds,
        wire_bytes: dst.rx_bytes,
        bulk_wire_bytes: dst.bulk_rx_bytes,
        units: source.units,
        send: source.send,
        fault_latency: dst.latency,
        integrity,
        congestion: source.congestion,
        no_wan: opts.no_wan,
        cpu,
        targets,
    })
}

fn cpu_cost(src: &SrcOutcome, dst: &DstOutcome) -> CpuCost {
    let gb = src.units.unit_bytes as f64 / 1e9;
    let per_gb = |d: Duration| {
        if gb > 0.0 {
            d.as_secs_f64() / gb
        } else {
            f64::NAN
        }
    };
    let ns = |n: u64| per_gb(Duration::from_nanos(n));
    let total = src.bulk_cpu.total()
        + src.server_cpu.total()
        + dst.bulk_cpu.total()
        + dst.prober_cpu.total();
    let mut c = CpuCost {
        seconds: total.as_secs_f64(),
        seconds_per_gb: per_gb(total),
        read: ns(src.units.copy_ns),
        compress: ns(src.units.encode_ns),
        seal: ns(src.send.seal_ns),
        send: per_gb(src.bulk_cpu.sys),
        receive: per_gb(dst.bulk_cpu.sys),
        open: ns(dst.recv.open_ns),
        install: ns(dst.recv.handle_ns),
        other: 0.0,
    };
    let named = c.read + c.compress + c.seal + c.send + c.receive + c.open + c.install;
    c.other = (c.seconds_per_gb - named).max(0.0);
    c
}

/// Where the two engines run.
enum Net {
    /// The emulated WAN between two namespaces.
    Wan(Box<Wan>),
    /// One namespace's loopback.
    Loopback(LoopbackNs),
}

impl Net {
    /// Source namespace, destination namespace, destination address.
    fn endpoints(&self) -> (String, String, std::net::Ipv4Addr) {
        match self {
            Net::Wan(w) => (w.src_ns().into(), w.dst_ns().into(), w.dst_addr()),
            Net::Loopback(l) => (l.ns.clone(), l.ns.clone(), std::net::Ipv4Addr::LOCALHOST),
        }
    }
}

/// A namespace of its own with only `lo` up, deleted on drop (so that a
/// loopback run neither sees nor disturbs the host's own traffic).
struct LoopbackNs {
    ns: String,
}

impl LoopbackNs {
    fn up(name: &str) -> Result<Self, LinkError> {
        let ns = format!("wanmig-{name}-lo");
        netns::delete(&ns).map_err(|e| LinkError::Options(format!("namespace {ns}: {e}")))?;
        netns::add(&ns).map_err(|e| LinkError::Options(format!("namespace {ns}: {e}")))?;
        let lo = LoopbackNs { ns };
        let status = netns::command(&lo.ns, "ip")
            .args(["link", "set", "dev", "lo", "up"])
            .status()
            .map_err(|e| LinkError::Options(format!("ip link set lo up: {e}")))?;
        if !status.success() {
            return Err(LinkError::Options(format!(
                "ip link set lo up in {} failed",
                lo.ns
            )));
        }
        Ok(lo)
    }
}

impl Drop for LoopbackNs {
    fn drop(&mut self) {
        let _ = netns::delete(&self.ns);
    }
}

fn compare(src: &[u8], dst: &[u8]) -> Integrity {
    let pages_differing = src
        .chunks(PAGE)
        .zip(dst.chunks(PAGE))
        .filter(|(a, b)| a != b)
        .count() as u64;
    Integrity {
        pages_compared: (src.len() / PAGE) as u64,
        pages_differing,
    }
}

fn link_config(opts: &LinkOptions) -> LinkConfig {
    let mut cfg = LinkConfig::default().with_io(opts.io);
    cfg.encryption = opts.encryption;
    cfg.compression = opts.compression;
    cfg.bulk.pacing = (opts.pacing && !opts.no_wan).then_some(opts.pacing_config);
    if opts.no_wan {
        // The push never stalls between pages here: batch the unpaced sends.
        cfg.bulk.batch = LOOPBACK_BATCH;
    }
    cfg.congestion = opts.congestion;
    cfg
}

fn transfer_pages(
    net: &Net,
    opts: &LinkOptions,
    pages: u64,
    src: &Arc<Vec<u8>>,
) -> Result<(DstOutcome, SrcOutcome), LinkError> {
    let key = PskKey::generate();
    let id = MigrationId::random();
    let geometry = Geometry::new(PAGE as u32, pages, 64 << 10, 1, 1 << 20);
    let cfg = link_config(opts);
    let (src_ns, dst_ns, dst_addr) = net.endpoints();
    let listener = netns::run_in(&dst_ns, move || TcpListener::bind((dst_addr, 0)))?
        .map_err(|e| transfer("destination")(format!("listen: {e}")))?;
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(|e| transfer("destination")(e.to_string()))?;

    let dst_thread = netns::spawn_in(&dst_ns, {
        let (key, src, opts) = (key.clone(), src.clone(), opts.clone());
        move || destination(listener, &key, &cfg, geometry, &opts, &src)
    })?;
    let src_thread = netns::spawn_in(&src_ns, {
        let src = src.clone();
        move || source(addr, id, geometry, &key, &cfg, &src)
    })?;
    let src_res = src_thread
        .join()
        .map_err(|_| transfer("source")("panicked".into()));
    let dst_res = dst_thread
        .join()
        .map_err(|_| transfer("destination")("panicked".into()));
    // Report the destination's error first: a source failure is usually its echo.
    let dst_out = dst_res??;
    let src_out = src_res??;
    Ok((dst_out, src_out))
}

/// The source: serves fault requests on one thread, pushes every page on the
/// bulk connection once the destination says go.
fn source(
    dst: SocketAddr,
    id: MigrationId,
    geometry: Geometry,
    key: &PskKey,
    cfg: &LinkConfig,
    src: &Arc<Vec<u8>>,
) -> Result<SrcOutcome, LinkError> {
    let err = transfer("source");
    let deadline = Instant::now() + Duration::from_secs(10);
    let pair = connection::connect_with_retry(dst, id, geometry, key, cfg, deadline)?;
    let (mut bulk, fault) = (pair.bulk, pair.fault);
    let server = {
        let src = src.clone();
        std::thread::spawn(move || {
            let cpu0 = ThreadCpu::now();
            let served = serve_faults(fault, &src);
            (served, ThreadCpu::now().since(cpu0))
        })
    };
    // Wait for the destination's go (a Ping on bulk).
    let dec = bulk.session.decoder();
    bulk.rx
        .run(&dec, |f| -> Result<Flow, String> {
            match f {
                FrameRef::Ping(_) => Ok(Flow::Stop),
                other => Err(format!("expected the go ping, got {other:?}")),
            }
        })
        .map_err(|e| err(e.to_string()))?;
    let start = Instant::now();
    let cpu0 = ThreadCpu::now();
    for (i, page) in src.chunks(PAGE).enumerate() {
        bulk.tx
            .send_unit(UnitKind::Page, i as u64, PAGE, |out| {
                out.copy_from_slice(page)
            })
            .map_err(|e| err(e.to_string()))?;
    }
    bulk.tx.send_goodbye().map_err(|e| err(e.to_string()))?;
    bulk.tx.flush().map_err(|e| err(e.to_string()))?;
    let bulk_cpu = ThreadCpu::now().since(cpu0);
    let (served, server_cpu) = server
        .join()
        .map_err(|_| err("fault server panicked".into()))?;
    served.map_err(&err)?;
    let backend = bulk.tx.sender().backend().to_string();
    let congestion = tcp::congestion(bulk.tx.sender().socket().as_fd())
        .map_err(|e| err(format!("reading TCP_CONGESTION: {e}")))?;
    Ok(SrcOutcome {
        congestion,
        bulk_cpu,
        server_cpu,
        start,
        units: bulk.tx.stats(),
        send: bulk.tx.sender().stats(),
        backend,
        io: bulk.io_path(),
    })
}

/// Answers page requests until the destination says goodbye.
fn serve_faults(mut fault: Connection, src: &[u8]) -> Result<(), String> {
    let dec = fault.session.decoder();
    let Connection { tx, rx, .. } = &mut fault;
    rx.run(&dec, |f| -> Result<Flow, String> {
        match f {
            FrameRef::Request {
                kind: UnitKind::Page,
                index,
                count,
            } => {
                for i in index..index + u64::from(count) {
                    let at = i as usize * PAGE;
                    let page = src
                        .get(at..at + PAGE)
                        .ok_or(format!("page {i} out of range"))?;
                    tx.send_unit(UnitKind::Page, i, PAGE, |out| out.copy_from_slice(page))
                        .map_err(|e| e.to_string())?;
                }
                tx.flush().map_err(|e| e.to_string())?;
                Ok(Flow::Continue)
            }
            FrameRef::Goodbye => Ok(Flow::Stop),
            other => Err(format!(
                "unexpected frame on the fault connection: {other:?}"
            )),
        }
    })
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// One fault round trip: request a page, wait for it, check it.
fn probe_once(
    fault: &mut Connection,
    index: u64,
    expected: &[u8],
) -> Result<(Duration, bool), String> {
    let t = Instant::now();
    fault
        .tx
        .send_request(UnitKind::Page, index, 1)
        .map_err(|e| e.to_string())?;
    fault.tx.flush().map_err(|e| e.to_string())?;
    let dec = fault.session.decoder();
    let mut page = vec![0u8; PAGE];
    let mut got = None;
    fault
        .rx
        .run(&dec, |f| -> Result<Flow, DecodeError> {
            if let FrameRef::Unit {
                index: i, payload, ..
            } = f
            {
                payload.unpack_into(&mut page)?;
                got = Some(i);
            }
            Ok(Flow::Stop)
        })
        .map_err(|e| e.to_string())?;
    let rtt = t.elapsed();
    Ok((rtt, got == Some(index) && page == expected))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The destination: idle fault probes, then the bulk transfer with probes
/// running alongside.
fn destination(
    listener: TcpListener,
    key: &PskKey,
    cfg: &LinkConfig,
    geometry: Geometry,
    opts: &LinkOptions,
    src: &Arc<Vec<u8>>,
) -> Result<DstOutcome, LinkError> {
    let err = transfer("destination");
    let policy = ServerPolicy {
        expect_geometry: Some(geometry),
        ..ServerPolicy::default()
    };
    let pair = connection::accept(&listener, &policy, key, cfg)?;
    let (mut bulk, mut fault) = (pair.bulk, pair.fault);
    let pages = geometry.page_count();
    let expected = |i: u64| {
        let at = i as usize * PAGE;
        src[at..at + PAGE].to_vec()
    };
    let pick = move |n: u64| (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % pages;

    let mut idle = Vec::new();
    let mut wrong = 0u64;
    for n in 0..20 {
        let (rtt, ok) = probe_once(&mut fault, pick(n), &expected(pick(n))).map_err(&err)?;
        idle.push(rtt.as_secs_f64() * 1e3);
        wrong += u64::from(!ok);
    }

    // Only the answers that arrive during the push count towards goodput.
    let idle_fault_bytes = fault.rx.stats().bytes;
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (stop, src, interval) = (stop.clone(), src.clone(), opts.probe_interval);
        std::thread::spawn(move || -> Result<(Vec<f64>, u64, u64, ThreadCpu), String> {
            let cpu0 = ThreadCpu::now();
            let mut loaded = Vec::new();
            let mut wrong = 0u64;
            let mut n = 1000;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(interval);
                let i = pick(n);
                n += 1;
                let at = i as usize * PAGE;
                let (rtt, ok) = probe_once(&mut fault, i, &src[at..at + PAGE])?;
                loaded.push(rtt.as_secs_f64() * 1e3);
                wrong += u64::from(!ok);
            }
            fault.tx.send_goodbye().map_err(|e| e.to_string())?;
            fault.tx.flush().map_err(|e| e.to_string())?;
            Ok((
                loaded,
                wrong,
                fault.rx.stats().bytes,
                ThreadCpu::now().since(cpu0),
            ))
        })
    };

    // Populate the region before the push: the destination's guest memory
    // exists before a migration writes it, and the page allocator's work is
    // not the datapath's (on loopback it cost more CPU than the datapath).
    let mut region = vec![0u8; (pages as usize) * PAGE];
    region.fill(0xA5);
    bulk.tx
        .send_ping(PingMsg {
            nonce: 0,
            sent_ns: 0,
        })
        .and_then(|_| bulk.tx.flush())
        .map_err(|e| err(e.to_string()))?;
    let dec = bulk.session.decoder();
    let cpu0 = ThreadCpu::now();
    let received = bulk.rx.run(&dec, |f| -> Result<Flow, DecodeError> {
        match f {
            FrameRef::Unit {
                kind: UnitKind::Page,
                index,
                payload,
            } => {
                let at = index as usize * PAGE;
                payload.unpack_into(&mut region[at..at + PAGE])?;
                Ok(Flow::Continue)
            }
            _ => Ok(Flow::Stop),
        }
    });
    let end = Instant::now();
    let bulk_cpu = ThreadCpu::now().since(cpu0);
    stop.store(true, Ordering::Relaxed);
    let probes = prober.join().map_err(|_| err("prober panicked".into()))?;
    received.map_err(|e| err(e.to_string()))?;
    let (mut loaded, wrong_loaded, fault_rx_bytes, prober_cpu) = probes.map_err(&err)?;
    idle.sort_by(f64::total_cmp);
    loaded.sort_by(f64::total_cmp);
    Ok(DstOutcome {
        rx_bytes: bulk.rx.stats().bytes + fault_rx_bytes - idle_fault_bytes,
        bulk_rx_bytes: bulk.rx.stats().bytes,
        end,
        bulk_cpu,
        prober_cpu,
        recv: bulk.rx.stats(),
        latency: FaultLatency {
            idle_p50_ms: percentile(&idle, 0.5),
            loaded_p50_ms: percentile(&loaded, 0.5),
            loaded_p99_ms: percentile(&loaded, 0.99),
            loaded_max_ms: loaded.last().copied().unwrap_or(f64::NAN),
            loaded_samples: loaded.len(),
            wrong_answers: wrong + wrong_loaded,
        },
        region,
    })
}

/// Fills one page the way [`run`] does (for tests that check a region).
pub fn expected_page(opts: &LinkOptions, index: u64, out: &mut [u8]) {
    fill_page(opts.content, opts.seed, index, out);
}
