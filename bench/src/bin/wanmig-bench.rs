//! `wanmig-bench`: benchmarks and the emulated WAN.
//!
//! ```text
//! wanmig-bench wan up     --rate 40mbit --rtt 5ms [--name N] [--mtu M] [--loss-ppm P] [--queue Q] [--foreground]
//! wanmig-bench wan down   [--name N]
//! wanmig-bench wan status [--name N] [--json]
//! wanmig-bench wan check  [--name N] [--rate R --rtt T] [--seconds S] [--json]
//! wanmig-bench link       --rate 40mbit --rtt 5ms --content random|text|zero|mixed [--size 256MiB] [--json]
//! wanmig-bench nbd        [--size 256MiB] [--runs 3] [--dir /dev/shm] [--json]
//! wanmig-bench eval       [--workloads memory,idle,io,mixed] [--rate 40mbit --rtt 5ms] [--repeat N] [--json] [--out F] [--markdown F]
//! wanmig-bench profile-overhead [--oper read|write] [--block-mib 32] [--budgets 0,0.05,0.2,all] [--rounds 2] [--json]
//! wanmig-bench xen        [--json] [--out F] [--stock] [--keep-going] [--runs engine,stock] [--guest-mib 256]
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use wanmig_bench::content::Content;
use wanmig_bench::link::{self, LinkOptions, LinkReport};
use wanmig_bench::wan::check::{self, WanMeasurement};
use wanmig_bench::wan::daemon::{self, Probe, WanState};
use wanmig_bench::wan::{self, Wan, WanConfig};
use wanmig_datapath::transport::tcp::Congestion;
use wanmig_datapath::transport::{Encryption, IoPreference};
use wanmig_datapath::wire::Compression;
use wanmig_planner::units::{ByteSize, Rate, format_duration, parse_duration};

/// Default WAN name.
const DEFAULT_NAME: &str = "wan";

#[derive(Debug, Parser)]
#[command(
    name = "wanmig-bench",
    version,
    about = "wanmig benchmarks and the emulated WAN"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The emulated WAN: two host namespaces, each behind a router namespace whose tbf is the
    /// bottleneck, the routers joined by a userspace delay line.
    #[command(subcommand)]
    Wan(WanCommand),
    /// Push pages through the real datapath over the emulated WAN and compare
    /// the goodput with iperf3 on the same link in the same run.
    Link(LinkBenchArgs),
    /// The engine's NBD server against qemu-nbd on the same image, both read
    /// and written by nbdcopy in the same run.
    Nbd(NbdBenchArgs),
    /// What profiling costs the guest: sysbench memory's throughput in the
    /// built-in guest while the engine profiles it against quiet windows.
    ProfileOverhead(OverheadArgs),
    /// Per workload: profile, plan, migrate; predicted vs measured, and
    /// Gamma of the planned plan, classic pre-copy and post-copy through
    /// the engine, and QEMU's own pre-copy, post-copy and hybrid.
    Eval(EvalArgs),
    /// The nested Xen correctness lab: Xen under QEMU TCG, a PVH guest
    /// running the page checker migrated to localhost with the patched
    /// `xl migrate --wanmig` (the engine) and with stock `xl migrate`.
    Xen(XenArgs),
}

#[derive(Debug, Args)]
struct XenArgs {
    /// Print the JSON report instead of the summary.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Debian's own Xen (hypervisor and tools) even if xen-patches/build is there.
    #[arg(long)]
    stock: bool,
    /// A failed patched-Xen or engine build falls back to Debian's Xen
    /// (the report says why the engine run is missing) instead of stopping.
    #[arg(long)]
    keep_going: bool,
    /// The runs, in order: engine (xl migrate --wanmig), stock (xl migrate).
    #[arg(long, value_delimiter = ',', default_value = "engine,stock")]
    runs: Vec<String>,
    /// Guest memory, MiB (the built-in guest's kernel and initramfs need
    /// about 170 MB while it unpacks: at 192 it fails, "Initramfs unpacking
    /// failed: write error").
    #[arg(long, default_value_t = 256)]
    guest_mib: u32,
    /// The guest's wanmig.* parameters [default: the page checker, 32 MiB,
    /// writing 2 MiB/s, reading 8 MiB/s].
    #[arg(long, value_delimiter = ',')]
    guest_params: Option<Vec<String>>,
    /// The engine's fraction M.
    #[arg(long, default_value_t = 1.0)]
    m: f64,
    /// The whole boot may take this long.
    #[arg(long, default_value = "900s", value_parser = parse_duration)]
    timeout: Duration,
    /// No word from dom0 for this long is a hang.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    stall: Duration,
    /// Directory for the console log, the runs' logs and the report.
    #[arg(long, default_value = "/run/wanmig/xen-lab")]
    dir: std::path::PathBuf,
    /// The repository [default: the current directory or a parent holding bench/xen/dom0-image].
    #[arg(long)]
    repo: Option<std::path::PathBuf>,
    /// QEMU [default: this host's, or bookworm's 7.2 from bench/xen/lab-qemu
    /// with --paging hap].
    #[arg(long)]
    qemu: Option<std::path::PathBuf>,
    /// QEMU's -accel: tcg (a host thread per vCPU) or tcg,thread=single.
    #[arg(long, default_value = "tcg")]
    accel: String,
    /// The guest's paging: shadow (Xen's shadow page tables, hap = 0: the
    /// patched hypervisor has them; reliable under TCG), hap (nested paging:
    /// needs bookworm's QEMU 7.2, which bench/xen/lab-qemu fetches, and even
    /// there about 4 in 10 guests triple-fault during a migration, stock or
    /// engine) [default: shadow, hap with --stock (Debian's hypervisor has
    /// no shadow paging)].
    #[arg(long, value_parser = ["hap", "shadow"])]
    paging: Option<String>,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Workloads, comma-separated (memory, idle, io, mixed).
    #[arg(long, value_delimiter = ',', default_value = "memory,idle,io,mixed")]
    workloads: Vec<String>,
    /// WAN rate.
    #[arg(long, default_value = "40mbit")]
    rate: Rate,
    /// WAN round-trip time.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    rtt: Duration,
    /// Profile intervals.
    #[arg(long, default_value_t = 20)]
    samples: u32,
    /// Profile interval length.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    interval: Duration,
    /// Directory for the runs.
    #[arg(long, default_value = "/run/wanmig/eval")]
    dir: std::path::PathBuf,
    /// Print the JSON report instead of the Markdown.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Also write the Markdown tables here.
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
    /// The post-copy horizon of the per-unit predictability tables (a
    /// guest of its own per workload, profiled, then observed this long
    /// with every read sampled); 0 skips them.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    horizon: Duration,
    /// The downtime target: the planner's, and QEMU's downtime-limit.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    downtime_target: Duration,
    /// QEMU's own modes to run as baselines, comma-separated (precopy,
    /// postcopy, hybrid), or "none".
    #[arg(long, value_delimiter = ',', default_value = "precopy,postcopy,hybrid")]
    qemu_modes: Vec<String>,
    /// QEMU pre-copy that has not converged after this long finishes with
    /// the guest paused, as `virsh migrate --timeout` does.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    qemu_precopy_timeout: Duration,
    /// Runs of every mode: a mode's Gamma is the median over them, its
    /// spread reported beside it (the regret target is 0.01 for 3 or more
    /// runs, 0.02 for one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// The workload whose planned migration is plotted: its timeline
    /// (bytes, phases, faults) and the planner's Gamma heatmap; "none": no
    /// plots [default: mixed if it runs, else the first workload].
    #[arg(long)]
    plot: Option<String>,
    /// Where the plots go [default: next to --out, else the run directory].
    #[arg(long)]
    plot_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct OverheadArgs {
    /// sysbench memory's operation (read: what read sampling costs most).
    #[arg(long, default_value = "read")]
    oper: String,
    /// sysbench memory's buffer (the working set), MiB.
    #[arg(long, default_value_t = 32)]
    block_mib: u64,
    /// Read budgets to measure, comma-separated: a share of the guest's
    /// time, 0 (the write log alone) or "all" (all of RAM every interval).
    #[arg(long, value_delimiter = ',', default_value = "0,0.05,0.2,all")]
    budgets: Vec<String>,
    /// Profile intervals per window.
    #[arg(long, default_value_t = 20)]
    samples: u32,
    /// Interval length.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    interval: Duration,
    /// Rounds (a quiet window, then one per mode).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Directory for the guest's files.
    #[arg(long, default_value = "/run/wanmig/bench-overhead")]
    dir: std::path::PathBuf,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct NbdBenchArgs {
    /// Image size.
    #[arg(long, default_value = "256MiB")]
    size: ByteSize,
    /// Runs of each measurement (the best is kept).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Directory for the image (tmpfs: the servers' costs, not the disk's).
    #[arg(long, default_value = "/dev/shm")]
    dir: std::path::PathBuf,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct LinkBenchArgs {
    /// Name of the WAN the benchmark brings up (and tears down).
    #[arg(long, default_value = "bench")]
    name: String,
    /// Link rate, e.g. 40mbit.
    #[arg(long, default_value = "40mbit")]
    rate: Rate,
    /// Round-trip time, e.g. 5ms.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    rtt: Duration,
    /// The path's queue (tbf) as time at full rate [default: max(rtt, 20ms)];
    /// real WAN routers often buffer 100 ms or more.
    #[arg(long, value_parser = parse_duration)]
    queue: Option<Duration>,
    /// Page contents: random, text, zero or mixed.
    #[arg(long, default_value = "random")]
    content: Content,
    /// Bytes of pages to move.
    #[arg(long, default_value = "256MiB")]
    size: ByteSize,
    /// Length of the iperf3 reference run, seconds.
    #[arg(long, default_value_t = 10)]
    iperf_seconds: u64,
    /// Turn bulk pacing off (TCP fills the path's queue).
    #[arg(long)]
    no_pacing: bool,
    /// Smallest in-flight limit of the pacer [default: the engine's].
    #[arg(long)]
    pacing_floor: Option<ByteSize>,
    /// The pacer's multiple of the estimated bandwidth-delay product.
    #[arg(long)]
    pacing_gain: Option<f64>,
    /// The rate pacer's steady multiple of the measured bottleneck rate
    /// [default: the engine's].
    #[arg(long)]
    cruise_gain: Option<f64>,
    /// Pace by the in-flight limit only (no rate pacing below the
    /// bottleneck).
    #[arg(long)]
    no_rate_pacing: bool,
    /// Never try LZ4.
    #[arg(long)]
    no_compression: bool,
    /// No WAN: both engines and iperf3 in one namespace over its loopback,
    /// unpaced (what the engine itself can move, and its CPU cost).
    #[arg(long, conflicts_with_all = ["queue", "no_pacing", "pacing_floor", "pacing_gain", "cruise_gain"])]
    no_wan: bool,
    /// Congestion control of iperf3 and the engines' connections: bbr or
    /// cubic [default: the host's].
    #[arg(long)]
    congestion: Option<Congestion>,
    /// I/O backend: auto, uring or blocking.
    #[arg(long, default_value = "auto")]
    io: IoPreference,
    /// Move the pages unencrypted (prints a warning); by default the
    /// engines' TLS 1.3 carries them, as in a migration.
    #[arg(long)]
    plaintext: bool,
    /// Interval between post-copy fault probes during the transfer.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    probe_interval: Duration,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum WanCommand {
    /// Bring a WAN up (idempotent). Without --foreground a detached daemon keeps it up.
    Up(UpArgs),
    /// Tear a WAN down (idempotent; nothing up is not an error).
    Down(NameArg),
    /// Show what is up.
    Status(StatusArgs),
    /// Measure a WAN with iperf3 and ping against its settings (exit 1 if a target is missed).
    Check(CheckArgs),
    /// The daemon started by `wan up` (internal).
    #[command(hide = true)]
    DelayLine(LinkArgs),
}

#[derive(Debug, Args)]
struct NameArg {
    /// WAN name (1-10 of a-z0-9): hosts wanmig-NAME-src and wanmig-NAME-dst, routers
    /// wanmig-NAME-src-router and wanmig-NAME-dst-router.
    #[arg(long, default_value = DEFAULT_NAME)]
    name: String,
}

#[derive(Debug, Args)]
struct LinkArgs {
    #[command(flatten)]
    name: NameArg,
    /// Rate of each direction, e.g. 40mbit, 1gbit.
    #[arg(long, default_value = "40mbit")]
    rate: Rate,
    /// Round-trip time added by the delay line, e.g. 5ms.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    rtt: Duration,
    /// MTU of the link.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Packets lost per million, in each direction.
    #[arg(long, default_value_t = 0)]
    loss_ppm: u32,
    /// Bottleneck queue (the routers' tbf) as time at full rate [default: max(rtt, 20ms)].
    #[arg(long, value_parser = parse_duration)]
    queue: Option<Duration>,
}

impl LinkArgs {
    fn config(&self) -> WanConfig {
        let mut c = WanConfig::new(self.name.name.clone(), self.rate, self.rtt);
        c.mtu = self.mtu;
        c.loss_ppm = self.loss_ppm;
        if let Some(q) = self.queue {
            c.queue = q;
        }
        c
    }
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    link: LinkArgs,
    /// Stay in the foreground until Ctrl-C/SIGTERM, then tear down (replaces a WAN of that name that is up).
    #[arg(long)]
    foreground: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Only this WAN [default: all].
    #[arg(long)]
    name: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    name: NameArg,
    /// Rate for a WAN brought up for the check [default: 40mbit].
    #[arg(long)]
    rate: Option<Rate>,
    /// RTT for a WAN brought up for the check [default: 5ms].
    #[arg(long, value_parser = parse_duration)]
    rtt: Option<Duration>,
    /// MTU for a WAN brought up for the check.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Loss for a WAN brought up for the check (ppm).
    #[arg(long, default_value_t = 0)]
    loss_ppm: u32,
    /// Bottleneck queue for a WAN brought up for the check [default: max(rtt, 20ms)].
    #[arg(long, value_parser = parse_duration)]
    queue: Option<Duration>,
    /// iperf3 test length in seconds (ping runs about half as long before it).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Wan(cmd) => run_wan(cmd),
        Command::Link(args) => link_cmd(args),
        Command::Nbd(args) => nbd_cmd(args),
        Command::ProfileOverhead(args) => overhead_cmd(args),
        Command::Eval(args) => eval_cmd(args),
        Command::Xen(args) => xen_cmd(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wanmig-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_wan(cmd: WanCommand) -> Result<ExitCode> {
    match cmd {
        WanCommand::Up(args) => up(args),
        WanCommand::Down(args) => down(&args.name),
        WanCommand::Status(args) => status(args),
        WanCommand::Check(args) => check_cmd(args),
        WanCommand::DelayLine(args) => serve(args.config(), false),
    }
}

/// A flag set by SIGINT, SIGTERM and SIGHUP.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, flag.clone()).context("installing a signal handler")?;
    }
    Ok(flag)
}

fn describe(state: &WanState) -> String {
    format!(
        "WAN {:?}: {}  {} {} <-> {} {}",
        state.name,
        state.config().summary(),
        state.src_ns,
        state.src_addr,
        state.dst_ns,
        state.dst_addr
    )
}

fn up(args: UpArgs) -> Result<ExitCode> {
    let config = args.link.config();
    config.validate()?;
    wan::preflight(&["ip", "tc", "ping"])?;
    if args.foreground {
        return serve(config, true);
    }
    match daemon::probe(&config.name) {
        Probe::Up(state) if state.config() == config => {
            println!("{} (pid {}) is already up", describe(&state), state.pid);
            return Ok(ExitCode::SUCCESS);
        }
        Probe::Up(state) => println!(
            "WAN {:?} is up with other settings ({}): rebuilding",
            config.name,
            state.config().summary()
        ),
        Probe::Broken { reason, .. } => {
            println!("WAN {:?} is broken ({reason}): rebuilding", config.name)
        }
        Probe::Down => {}
    }
    Wan::down_by_name(&config.name)?;
    let exe = std::env::current_exe().context("locating the wanmig-bench binary")?;
    let state = daemon::spawn_detached(&exe, &config, Duration::from_secs(15))?;
    println!(
        "{} is up; delay line daemon pid {}, log {}",
        describe(&state),
        state.pid,
        daemon::log_path(&config.name).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Holds a WAN until a signal: `wan up --foreground` and the daemon.
fn serve(config: WanConfig, foreground: bool) -> Result<ExitCode> {
    let stop = stop_flag()?;
    let stats = daemon::serve(config, foreground, &stop, |_, state| {
        println!("{} is up (pid {})", describe(state), state.pid);
        if foreground {
            println!("press Ctrl-C to tear it down");
        }
    })?;
    println!(
        "torn down; delay line forwarded {} / {} packets (src->dst / dst->src), dropped {} / {}",
        stats.src_to_dst.forwarded_packets,
        stats.dst_to_src.forwarded_packets,
        stats.src_to_dst.dropped(),
        stats.dst_to_src.dropped()
    );
    Ok(ExitCode::SUCCESS)
}

fn down(name: &str) -> Result<ExitCode> {
    wan::validate_name(name)?;
    let was = daemon::probe(name);
    Wan::down_by_name(name)?;
    match was {
        Probe::Down => println!("WAN {name:?} was not up"),
        _ => println!("WAN {name:?} is down"),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, serde::Serialize)]
struct StatusEntry {
    name: String,
    status: &'static str,
    reason: Option<String>,
    state: Option<WanState>,
}

fn status(args: StatusArgs) -> Result<ExitCode> {
    let names = match &args.name {
        Some(n) => {
            wan::validate_name(n)?;
            vec![n.clone()]
        }
        None => daemon::known_wans(),
    };
    let entries: Vec<StatusEntry> = names
        .into_iter()
        .map(|name| match daemon::probe(&name) {
            Probe::Down => StatusEntry {
                name,
                status: "down",
                reason: None,
                state: None,
            },
            Probe::Up(state) => StatusEntry {
                name,
                status: "up",
                reason: None,
                state: Some(state),
            },
            Probe::Broken { reason, state } => StatusEntry {
                name,
                status: "broken",
                reason: Some(reason),
                state,
            },
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        println!("no WAN is up");
    }
    for e in &entries {
        match (&e.state, e.status) {
            (Some(s), "up") => {
                println!("{}", describe(s));
                if s.foreground {
                    println!("  up: foreground process {}", s.pid);
                } else {
                    println!(
                        "  up: daemon pid {}, log {}",
                        s.pid,
                        daemon::log_path(&s.name).display()
                    );
                }
                if let Ok(names) = wan::WanNames::new(&s.name) {
                    let a = wan::address_plan(&s.name);
                    println!(
                        "  routers: {} {} (tbf on {}), {} {} (tbf on {})",
                        names.src_router_ns,
                        a.src_router,
                        names.src_tun,
                        names.dst_router_ns,
                        a.dst_router,
                        names.dst_tun
                    );
                }
                println!(
                    "  emulator's own round trip {} us (subtracted from the delay)",
                    s.base_rtt_ns / 1000
                );
                if let Some(st) = &s.stats {
                    println!(
                        "  delay line: src->dst {} pkts {} B, {} dropped; dst->src {} pkts {} B, {} dropped; wake lead {} us",
                        st.src_to_dst.forwarded_packets,
                        st.src_to_dst.forwarded_bytes,
                        st.src_to_dst.dropped(),
                        st.dst_to_src.forwarded_packets,
                        st.dst_to_src.forwarded_bytes,
                        st.dst_to_src.dropped(),
                        st.wake_lead_ns / 1000
                    );
                }
            }
            _ => println!(
                "WAN {:?}: {}{}",
                e.name,
                e.status,
                e.reason
                    .as_ref()
                    .map(|r| format!(
                        " ({r}); `wanmig-bench wan down --name {}` cleans up",
                        e.name
                    ))
                    .unwrap_or_default()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_cmd(args: CheckArgs) -> Result<ExitCode> {
    let name = args.name.name.clone();
    wan::validate_name(&name)?;
    wan::preflight(&["ip", "tc", "iperf3", "ping"])?;
    let stop = stop_flag()?;
    let duration = Duration::from_secs(args.seconds.max(1));

    let (wan, ours) = match daemon::probe(&name) {
        Probe::Up(state) => {
            let running = state.config();
            if args.rate.is_some_and(|r| r != running.rate)
                || args.rtt.is_some_and(|t| t != running.rtt)
            {
                eprintln!(
                    "note: WAN {name:?} is up with {}; measuring it as it is",
                    running.summary()
                );
            }
            (Wan::attach(&name)?, false)
        }
        _ => {
            let mut c = WanConfig::new(
                name.clone(),
                args.rate.unwrap_or(Rate::from_bits_per_second(40_000_000)),
                args.rtt.unwrap_or(Duration::from_millis(5)),
            );
            c.mtu = args.mtu;
            c.loss_ppm = args.loss_ppm;
            if let Some(q) = args.queue {
                c.queue = q;
            }
            if !args.json {
                println!("bringing up WAN {name:?} ({}) for the check", c.summary());
            }
            (Wan::up(c)?, true)
        }
    };

    // The measurement runs on its own thread so that a signal can end the
    // command while iperf3/ping are still running.
    let wan = Arc::new(wan);
    let worker = {
        let wan = wan.clone();
        std::thread::spawn(move || check::measure(&wan, duration))
    };
    while !worker.is_finished() && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if stop.load(Ordering::Relaxed) {
        // Tear down what we built and exit; our iperf3/ping children die with
        // us (PR_SET_PDEATHSIG).
        eprintln!("interrupted");
        if ours {
            let _ = Wan::down_by_name(&name);
        }
        std::process::exit(130);
    }
    let measurement = match worker.join() {
        Ok(r) => r,
        Err(_) => bail!("the measuring thread panicked"),
    };
    if ours {
        if let Ok(wan) = Arc::try_unwrap(wan) {
            wan.down()?;
        }
    }
    let measurement = measurement?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&measurement)?);
    } else {
        print_measurement(&measurement);
    }
    Ok(if measurement.pass() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

fn print_measurement(m: &WanMeasurement) {
    println!(
        "iperf3: {:.2} Mbit/s = {:.1} % of {} Mbit/s (target >= {:.0} %, {} retransmits, {:.0} s)  {}",
        m.iperf3_mbps,
        m.rate_ratio * 100.0,
        m.rate_mbps,
        m.rate_target * 100.0,
        m.iperf3_retransmits
            .map_or("?".to_string(), |r| r.to_string()),
        m.iperf3_seconds,
        verdict(m.rate_pass)
    );
    println!(
        "ping:   rtt avg {:.3} ms (min {:.3}, max {:.3}, mdev {:.3}; {}/{} replies) = {:+.2} % vs {} (target within {:.0} %)  {}",
        m.rtt_ms_avg,
        m.rtt_ms_min,
        m.rtt_ms_max,
        m.rtt_ms_mdev,
        m.ping_received,
        m.ping_sent,
        m.rtt_error * 100.0,
        format_duration(Duration::from_secs_f64(m.rtt_ms / 1e3)),
        m.rtt_tolerance * 100.0,
        verdict(m.rtt_pass)
    );
}

fn link_cmd(args: LinkBenchArgs) -> Result<ExitCode> {
    wan::validate_name(&args.name)?;
    wan::preflight(&["ip", "tc", "iperf3", "ping"])?;
    let stop = stop_flag()?;
    let mut opts = LinkOptions::new(args.name.clone(), args.rate, args.rtt, args.content);
    opts.size = args.size.bytes();
    opts.queue = args.queue;
    opts.iperf_seconds = args.iperf_seconds;
    opts.pacing = !args.no_pacing;
    if let Some(f) = args.pacing_floor {
        opts.pacing_config.floor = f.bytes() as usize;
    }
    if let Some(g) = args.pacing_gain {
        opts.pacing_config.gain = g;
    }
    if args.no_rate_pacing {
        opts.pacing_config.rate = None;
    }
    if let (Some(g), Some(rate)) = (args.cruise_gain, opts.pacing_config.rate.as_mut()) {
        rate.cruise_gain = g;
    }
    opts.io = args.io;
    opts.congestion = args.congestion;
    opts.no_wan = args.no_wan;
    if args.plaintext {
        eprintln!("wanmig-bench: {}", Encryption::PLAINTEXT_WARNING);
        opts.encryption = Encryption::Plaintext;
    }
    opts.probe_interval = args.probe_interval;
    if args.no_compression {
        opts.compression = Compression::None;
    }
    if !args.json {
        let over = if args.no_wan {
            "loopback (no WAN, unpaced)".to_string()
        } else {
            format!("{} / {}", args.rate, format_duration(args.rtt))
        };
        println!(
            "link benchmark: {} of {} pages over {over} (iperf3 reference {} s first)",
            args.size, args.content, args.iperf_seconds
        );
    }
    // The run owns the WAN it brings up; on Ctrl-C tear it down by name.
    let worker = std::thread::spawn(move || link::run(&opts));
    while !worker.is_finished() && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if stop.load(Ordering::Relaxed) {
        eprintln!("interrupted");
        let _ = Wan::down_by_name(&args.name);
        std::process::exit(130);
    }
    let report = match worker.join() {
        Ok(r) => r?,
        Err(_) => bail!("the benchmark thread panicked"),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_link(&report);
    }
    if report.integrity.pages_differing != 0 || report.fault_latency.wrong_answers != 0 {
        eprintln!("wanmig-bench: DATA MISMATCH: the destination does not hold the source's pages");
        return Ok(ExitCode::from(2));
    }
    Ok(if report.targets_met() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_link(r: &LinkReport) {
    let u = &r.units;
    println!(
        "link: {} ({}), I/O {}",
        r.io.cipher,
        if r.io.cipher == "none" {
            "unencrypted".to_string()
        } else {
            format!("sealed in {}", r.io.cipher_in)
        },
        r.io.backend
    );
    println!(
        "moved {} MiB in {:.2} s: goodput {:.2} Mbit/s, iperf3 {:.2} Mbit/s, ratio {:.3}",
        r.size_bytes >> 20,
        r.seconds,
        r.goodput_mbps,
        r.iperf3_mbps,
        r.ratio
    );
    println!(
        "effective {:.2} Mbit/s of page data, compression {:.2}x ({} raw, {} lz4, {} zero pages)",
        r.effective_mbps, r.compression_ratio, u.raw, u.lz4, u.zero
    );
    let f = &r.fault_latency;
    println!(
        "fault round trip: idle p50 {:.2} ms; during the push p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} probes)",
        f.idle_p50_ms, f.loaded_p50_ms, f.loaded_p99_ms, f.loaded_max_ms, f.loaded_samples
    );
    println!(
        "pacing: {} (largest in-flight limit {} KiB, {} waits); congestion control {}; backend {}",
        if r.pacing { "on" } else { "off" },
        r.send.max_pacing_limit >> 10,
        r.send.pacing_waits,
        r.congestion,
        r.backend
    );
    if let Some(rate) = &r.send.rate {
        println!(
            "rate pacing: bottleneck {:.2} Mbit/s measured, socket paced at {:.2} Mbit/s at the end ({} probes, {} drains, {} of {} windows saturated)",
            rate.bottleneck_bytes_per_s as f64 * 8e-6,
            r.send.pacing_rate as f64 * 8e-6,
            rate.probes,
            rate.drains,
            rate.saturated_windows,
            rate.windows
        );
    }
    let c = &r.cpu;
    println!(
        "CPU: {:.2} s in both engines, {:.3} s per GB moved: read {:.3}, compress {:.3}, seal {:.3}, send {:.3}, receive {:.3}, open {:.3}, install {:.3}, other {:.3}",
        c.seconds,
        c.seconds_per_gb,
        c.read,
        c.compress,
        c.seal,
        c.send,
        c.receive,
        c.open,
        c.install,
        c.other
    );
    println!(
        "integrity: {} pages compared, {} differing",
        r.integrity.pages_compared, r.integrity.pages_differing
    );
    for t in &r.targets {
        println!(
            "target: {} -> measured {:.3} vs {:.3}: {}",
            t.rule,
            t.measured,
            t.threshold,
            if t.met { "MET" } else { "MISSED" }
        );
    }
}

fn nbd_cmd(args: NbdBenchArgs) -> Result<ExitCode> {
    let r = wanmig_bench::nbd::run(&wanmig_bench::nbd::NbdBenchOptions {
        dir: args.dir,
        size: args.size.bytes(),
        runs: args.runs,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "nbdcopy over a unix socket, {} MiB image, best of {} runs (MiB/s):",
            r.size >> 20,
            args.runs
        );
        println!("            read      write");
        println!(
            "wanmig   {:>8.1}  {:>8.1}",
            r.wanmig.read_mib_s, r.wanmig.write_mib_s
        );
        println!(
            "qemu-nbd {:>8.1}  {:>8.1}",
            r.qemu_nbd.read_mib_s, r.qemu_nbd.write_mib_s
        );
        println!("ratio    {:>8.3}  {:>8.3}", r.read_ratio, r.write_ratio);
    }
    Ok(ExitCode::SUCCESS)
}

fn overhead_cmd(args: OverheadArgs) -> Result<ExitCode> {
    use wanmig_bench::profile_overhead::{OverheadOptions, run};
    if args.oper != "read" && args.oper != "write" {
        bail!("--oper must be read or write, not {:?}", args.oper);
    }
    let budgets = args
        .budgets
        .iter()
        .map(|b| {
            wanmig_datapath::profiling::ProfileOptions::parse_read_budget(b)
                .map_err(|e| anyhow::anyhow!("--budgets: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let r = run(&OverheadOptions {
        dir: args.dir,
        memory_mib: 256,
        block_mib: args.block_mib,
        oper: args.oper,
        samples: args.samples,
        interval: args.interval,
        budgets,
        rounds: args.rounds,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "sysbench memory --memory-oper={} ({} MiB buffer) in the built-in guest: {:.1} MiB/s with nothing watching",
            r.oper, r.block_mib, r.quiet_mib_s
        );
        println!("profiling     MiB/s   ratio   read faults/s   RAM watched");
        for m in &r.modes {
            println!(
                "{:<12} {:>7.1}  {:>6.3}  {:>13.0}   {:>9.0} %",
                m.mode,
                m.mib_s,
                m.ratio,
                m.read_faults_per_s,
                m.read_coverage * 100.0
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn eval_cmd(args: EvalArgs) -> Result<ExitCode> {
    use wanmig_bench::eval::{EvalOptions, Workload, markdown, run};
    use wanmig_bench::qemu_native::QemuMode;
    let builtin = Workload::builtin();
    let workloads = args
        .workloads
        .iter()
        .map(|n| {
            builtin
                .iter()
                .find(|w| &w.name == n)
                .cloned()
                .with_context(|| format!("no workload {n:?} (memory, idle, io, mixed)"))
        })
        .collect::<Result<Vec<_>>>()?;
    let qemu_modes = args
        .qemu_modes
        .iter()
        .filter(|m| m.as_str() != "none")
        .map(|m| {
            QemuMode::ALL
                .into_iter()
                .find(|q| q.name().strip_prefix("qemu_") == Some(m.as_str()))
                .with_context(|| format!("no QEMU mode {m:?} (precopy, postcopy, hybrid, none)"))
        })
        .collect::<Result<Vec<_>>>()?;
    let plot_workload = match args.plot.as_deref() {
        Some("none") => None,
        Some(w) if !args.workloads.iter().any(|x| x == w) => {
            bail!(
                "--plot {w:?} is not among the workloads run ({})",
                args.workloads.join(",")
            )
        }
        Some(w) => Some(w.to_string()),
        None => args
            .workloads
            .iter()
            .find(|w| *w == "mixed")
            .or(args.workloads.first())
            .cloned(),
    };
    let plot_dir = args.plot_dir.clone().unwrap_or_else(|| {
        args.out
            .as_ref()
            .and_then(|p| p.parent())
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| args.dir.clone(), std::path::Path::to_path_buf)
    });
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let r = run(&EvalOptions {
        workloads,
        rate: args.rate,
        rtt: args.rtt,
        samples: args.samples,
        interval: args.interval,
        memory_mib: 256,
        dir: args.dir,
        predictability_horizon: (!args.horizon.is_zero()).then_some(args.horizon),
        downtime_target: args.downtime_target,
        qemu_modes,
        qemu_precopy_timeout: args.qemu_precopy_timeout,
        repeat: args.repeat,
        plot_workload,
        plot_dir,
    })?;
    let json = serde_json::to_string_pretty(&r)?;
    let md = markdown(&r);
    if let Some(p) = &args.out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.markdown {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{}", if args.json { json } else { md });
    // Figures that miss a target are a result; a run whose integrity does
    // not hold, or was not checked, is a failure of the evaluation.
    if r.workloads.iter().all(|w| w.intact) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("eval: INTEGRITY FAILED or NOT CHECKED in a run (see the report)");
        Ok(ExitCode::FAILURE)
    }
}

fn xen_cmd(args: XenArgs) -> Result<ExitCode> {
    use wanmig_bench::xen::{self, Progress, ProvisionOptions, XenOptions};
    for r in &args.runs {
        if r != "engine" && r != "stock" {
            bail!("--runs: no run {r:?} (engine, stock)");
        }
    }
    if !(args.m > 0.0 && args.m <= 1.0) {
        bail!("--m must be in (0, 1]");
    }
    let repo = match &args.repo {
        Some(r) => r.clone(),
        None => {
            let cwd = std::env::current_dir().context("the current directory")?;
            xen::provision::find_repo(&cwd).context(
                "not in the wanmig repository (no bench/xen/dom0-image here or above): give --repo",
            )?
        }
    };
    let hap = match args.paging.as_deref() {
        Some(p) => p == "hap",
        None => args.stock,
    };
    let progress = Progress::new();
    let image = xen::provision::provision(
        &ProvisionOptions {
            repo,
            stock: args.stock,
            keep_going: args.keep_going,
            lab_qemu: hap && args.qemu.is_none(),
        },
        &progress,
    )?;
    let report = xen::run(
        &XenOptions {
            image,
            dir: args.dir.clone(),
            runs: args.runs.clone(),
            guest_mib: args.guest_mib,
            guest_params: args
                .guest_params
                .clone()
                .unwrap_or_else(XenOptions::default_guest_params),
            m: args.m,
            timeout: args.timeout,
            stall: args.stall,
            qemu: args.qemu.clone(),
            accel: args.accel.clone(),
            hap,
        },
        &progress,
    )?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(args.dir.join("report.json"), &json)
        .with_context(|| format!("writing {}", args.dir.join("report.json").display()))?;
    if let Some(p) = &args.out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_xen(&report);
    }
    Ok(
        if report.runs.iter().all(|r| r.ok) && report.checks.iter().all(|c| c.ok) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

fn print_xen(r: &wanmig_bench::xen::XenReport) {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let int = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "Xen {} ({}), tools {}; dom0 image {}",
        r.xen_version.as_deref().unwrap_or("?"),
        r.hypervisor,
        r.tools,
        r.image
    );
    println!(
        "lab: {} s (dom0 up at {} s, toolstack at {} s); TCG: correctness, not speed",
        opt(Some(r.timings.lab_s)),
        opt(r.timings.boot_s),
        opt(r.timings.toolstack_s)
    );
    println!(
        "{:<8} {:<22} {:>8} {:>10} {:>6} {:>10} {:>12}  integrity",
        "mode", "via", "total s", "downtime s", "rounds", "pages", "bytes"
    );
    for run in &r.runs {
        let i = &run.integrity;
        println!(
            "{:<8} {:<22} {:>8} {:>10} {:>6} {:>10} {:>12}  checker errors {} ({} pages verified after), frames {}{}",
            run.mode,
            run.via,
            opt(run.measured.total_s),
            opt(run.measured.downtime_s),
            int(run.measured.rounds),
            int(run.measured.pages_sent),
            int(run.measured.bytes_sent),
            i.checker_errors,
            i.checker_verified_after,
            if i.checked {
                format!(
                    "{} compared, {} differing",
                    i.pages_compared, i.pages_differing
                )
            } else {
                "not compared".to_string()
            },
            run.error
                .as_ref()
                .map_or(String::new(), |e| format!("  FAILED: {e}"))
        );
    }
    for s in &r.skipped {
        println!("{:<8} {:<22} skipped: {}", s.run, s.via, s.reason);
    }
    println!("logs: {}", r.dir.display());
}
