//! `wanmig`: the migration engine and its command line.
//!
//! ```text
//! wanmig keygen --out FILE                     a pre-shared key for the handshake
//! wanmig migrate [--m 0.5] [--rate 40mbit --rtt 5ms | --no-wan] [--json] ...
//!                                              migrate a QEMU guest on this machine,
//!                                              the two engines on either side of the
//!                                              emulated WAN
//! wanmig demo [--json]                         the built-in guest over 40 Mbit/s, 5 ms
//! ```
//!
//! `migrate`, `demo` and `destination` exit with 2 unless the integrity check
//! holds (`IntegrityFigures::holds`): the engine compared the destination
//! with the source's frozen memory (and disks), at least one populated page,
//! nothing differed and the guest reported no failure on its console. A
//! check that did not run is a failure, never a pass.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use wanmig_datapath::backend::qemu::{DiskSpec, GuestSpec};
use wanmig_datapath::connection::{self, LinkConfig};
use wanmig_datapath::engine::{DestConfig, SourceConfig};
use wanmig_datapath::host::{AttachTo, HostSpec, run_destination_host, run_source_host};
use wanmig_datapath::migration::{
    FreezePolicy, LocalMigration, LocalOutcome, MigrationError, Planning, run_local, run_over_wan,
};
use wanmig_datapath::report::{IntegrityFigures, MigrationReport};
use wanmig_datapath::transport::rate::RateConfig;
use wanmig_datapath::transport::{Encryption, IoPreference};
use wanmig_datapath::wire::PskKey;
use wanmig_planner::units::{Rate, format_duration, parse_duration};
use wanmig_wan::{Wan, WanConfig};

#[derive(Debug, Parser)]
#[command(
    name = "wanmig",
    version,
    about = "Adaptive live migration of virtual machines over a WAN"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a new pre-shared key (hex, mode 0600) for the engines' handshake.
    Keygen {
        /// Where to write it (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Migrate a QEMU guest started here, source and destination engines on
    /// either side of an emulated WAN.
    Migrate(Box<MigrateArgs>),
    /// On the destination host: start QEMU waiting for the guest, accept one
    /// migration, run the destination engine. The guest then runs here.
    Destination(Box<DestinationArgs>),
    /// Profile a running QEMU guest for the planner: pages written (dirty
    /// log) and read (MINOR-fault sampling) per interval, in the planner's
    /// profile format. The QEMU must have been started with the preload
    /// library in attach mode (as for `source --attach-qmp`); it runs on
    /// afterwards. Its disks are not the engine's: the profile has no chunks.
    Profile(ProfileArgs),
    /// On the source host: start the guest, plan, connect to the destination
    /// engine and migrate. (`--no-wan`, `--wan-name` and `--hold` do not
    /// apply.)
    Source(Box<SourceArgs>),
    /// The built-in guest (page checker, and the disk checker on a 64 MiB
    /// disk) profiled, planned and migrated over a 40 Mbit/s, 5 ms WAN.
    /// Exits with 2 unless the integrity check ran and holds.
    Demo {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Carry guest memory and disks unencrypted after the handshake
        /// (prints a warning).
        #[arg(long)]
        plaintext: bool,
    },
}

#[derive(Debug, Args, Clone)]
struct ProfileArgs {
    /// The running QEMU's QMP socket.
    #[arg(long)]
    attach_qmp: PathBuf,
    /// Its guest-RAM file (a memory-backend-file under /dev/shm/wanmig-,
    /// share=on).
    #[arg(long)]
    attach_ram: PathBuf,
    /// Intervals (n).
    #[arg(long, default_value_t = 20)]
    samples: u32,
    /// Interval length (tau).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    interval: Duration,
    /// The share of the guest's time read sampling may cost it (each
    /// interval watches as much of RAM, in turn, as that allows); 0: do not
    /// sample reads; "all": watch all of RAM every interval (exact, costly
    /// for a busy guest).
    #[arg(long, default_value = "0.05", value_parser = parse_budget)]
    read_budget: ReadBudget,
    /// Where to write the profile.
    #[arg(long)]
    out: PathBuf,
    /// Directory for sockets [default: /run/wanmig/<tag>].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Print what was seen as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args, Clone)]
struct DestinationArgs {
    /// Address to listen on for the source engine (e.g. 0.0.0.0:7700).
    #[arg(long)]
    listen: SocketAddr,
    /// The pre-shared key file (`wanmig keygen`), the same on both hosts.
    #[arg(long)]
    key: PathBuf,
    /// The guest (as on the source).
    #[command(flatten)]
    guest: GuestArgs,
    /// Keep the guest paused until everything has arrived.
    #[arg(long)]
    hold: bool,
    /// Directory for sockets, logs and pid files [default: /run/wanmig/<tag>].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Accept the migration unencrypted after the handshake (the source
    /// must say --plaintext too; prints a warning). Only for links already
    /// inside IPsec, WireGuard or a trusted network.
    #[arg(long)]
    plaintext: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args, Clone)]
struct SourceArgs {
    /// The destination engine's address.
    #[arg(long)]
    connect: SocketAddr,
    /// The pre-shared key file (`wanmig keygen`), the same on both hosts.
    #[arg(long)]
    key: PathBuf,
    /// Migrate this running QEMU (its QMP socket) instead of starting the
    /// built-in guest. It must have been started with the preload library in
    /// attach mode: LD_PRELOAD=libwanmig_ffi.so WANMIG_UFFD_SOCK=attach
    /// WANMIG_UFFD_MODE=wp-async, guest RAM in a memory-backend-file under
    /// /dev/shm/wanmig- with share=on. The destination's guest options must
    /// describe the same machine.
    #[arg(long, requires = "attach_ram")]
    attach_qmp: Option<PathBuf>,
    /// With --attach-qmp: its guest-RAM file.
    #[arg(long, requires = "attach_qmp")]
    attach_ram: Option<PathBuf>,
    #[command(flatten)]
    migrate: MigrateArgs,
}

#[derive(Debug, Args, Clone)]
struct MigrateArgs {
    /// Fraction of memory to pre-copy (1 = classic pre-copy, 0 = classic
    /// post-copy), pages in address order. Without it, the plan comes from
    /// --profile, --segment or --profile-now.
    #[arg(long, conflicts_with_all = ["profile_now"])]
    m: Option<f64>,
    /// With --m: the fraction of disk chunks to pre-copy (1 = all, 0 = none:
    /// post-copy with on-demand fetch), chunks in address order.
    #[arg(long, default_value_t = 0.5, requires = "m")]
    s: f64,
    /// With --m: what the freeze does with a dirty set that does not fit the
    /// downtime target: `overflow` (what fits goes, hottest first; the
    /// other dirty pages are post-copied) or `classic` (all of it goes,
    /// however long it takes). Default: overflow when the plan post-copies
    /// anything, classic when it pre-copies everything (--m 1 with --s 1,
    /// or no disk). `--m 1 --s 1 --freeze overflow --max-rounds 1` is what
    /// QEMU's hybrid migration does.
    #[arg(long, requires = "m")]
    freeze: Option<FreezePolicy>,
    /// Pre-copy rounds at most, round 0 included (1: one pass over the
    /// pre-copy set, then the freeze); a planner's plan may set a lower
    /// limit of its own.
    #[arg(long, default_value_t = SourceConfig::default().max_rounds)]
    max_rounds: u32,
    /// Plan with this profile (the planner's format) for the WAN's rate and RTT;
    /// with --segment, the profile the planner serves from.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Take the plan from a running `wanmig-planner serve --segment NAME`.
    #[arg(long, requires = "profile")]
    segment: Option<String>,
    /// Profile the guest's writes at the source first (SAMPLESxINTERVAL, e.g.
    /// 20x250ms), then plan for the WAN's rate and RTT.
    #[arg(long)]
    profile_now: Option<String>,
    /// WAN rate.
    #[arg(long, default_value = "40mbit")]
    rate: Rate,
    /// WAN round-trip time.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    rtt: Duration,
    /// Connect the engines over loopback instead of an emulated WAN.
    #[arg(long)]
    no_wan: bool,
    /// Name of the emulated WAN (brought up and torn down by this command).
    #[arg(long, default_value = "mig")]
    wan_name: String,
    /// The guest.
    #[command(flatten)]
    guest: GuestArgs,
    /// Keep the destination paused until every page has arrived.
    #[arg(long)]
    hold: bool,
    /// Freeze once the predicted downtime is at most this.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    downtime_target: Duration,
    /// Directory for sockets, logs and pid files [default: /run/wanmig/<tag>].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// I/O backend: auto, uring or blocking.
    #[arg(long, default_value = "auto")]
    io: IoPreference,
    /// Carry guest memory and disks unencrypted after the handshake (the
    /// destination must say --plaintext too; prints a warning). Only for
    /// links already inside IPsec, WireGuard or a trusted network. By
    /// default every byte after TCP connect is TLS 1.3.
    #[arg(long)]
    plaintext: bool,
    /// Pace the bulk connection just below the bottleneck rate it measures,
    /// so post-copy faults never queue behind it (experimental: a host
    /// whose CPU is saturated can read as a queue and slow the push).
    #[arg(long)]
    rate_pacing: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The built-in guest: the same on both sides of a migration.
#[derive(Debug, Args, Clone)]
struct GuestArgs {
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// The built-in guest's workload: pagecheck, idle, stress-vm, sysbench-memory...
    #[arg(long, default_value = "pagecheck")]
    workload: String,
    /// More guest kernel parameters (e.g. "wanmig.rate=16 wanmig.mib=96").
    #[arg(long, default_value = "")]
    guest_params: String,
    /// Give the guest a virtio disk of this many MiB, served by the engine
    /// over NBD, with the guest's disk checker on its first 32 MiB (0: no
    /// disk).
    #[arg(long, default_value_t = 0)]
    disk_mib: u64,
    /// The disks' chunk size in KiB, the unit of transfer and profiling (a
    /// power of two, 4..=4096).
    #[arg(long, default_value_t = 64)]
    chunk_kib: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen { out } => keygen(&out),
        Command::Migrate(args) => migrate(&args),
        Command::Destination(args) => destination(&args),
        Command::Source(args) => source(&args),
        Command::Profile(args) => profile(&args),
        Command::Demo { json, plaintext } => migrate(&MigrateArgs {
            m: None,
            s: 0.5,
            freeze: None,
            max_rounds: SourceConfig::default().max_rounds,
            profile: None,
            segment: None,
            profile_now: Some("20x250ms".into()),
            rate: Rate::from_bits_per_second(40_000_000),
            rtt: Duration::from_millis(5),
            no_wan: false,
            wan_name: "demo".into(),
            guest: GuestArgs {
                memory_mib: 256,
                workload: "pagecheck".into(),
                guest_params: "wanmig.rate=8".into(),
                disk_mib: 64,
                chunk_kib: 64,
            },
            hold: false,
            downtime_target: Duration::from_millis(300),
            run_dir: None,
            io: IoPreference::Auto,
            plaintext,
            rate_pacing: false,
            json,
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wanmig: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn profile(args: &ProfileArgs) -> Result<ExitCode> {
    use wanmig_datapath::backend::qemu::{QemuPaths, QemuSource};
    use wanmig_datapath::profiling::{ProfileOptions, profile_guest};
    if unsafe_not_root() {
        bail!("must run as root (QEMU's userfaultfd and pagemap)");
    }
    let tag = format!("prof{}", std::process::id());
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/wanmig/{tag}")));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let mut paths = QemuPaths::new(&run_dir, &tag, "source");
    paths.qmp = args.attach_qmp.clone();
    paths.ram = args.attach_ram.clone();
    let mut src = QemuSource::attach(&paths, &run_dir)?;
    let opts = ProfileOptions {
        read_budget: args.read_budget.0,
        ..ProfileOptions::new(
            args.samples,
            args.interval,
            SourceConfig::default().device_state_estimate,
        )
    };
    let stats = profile_guest(&mut src, &opts, &args.out)?;
    let pid = src.detach();
    let _ = std::fs::remove_dir(&run_dir);
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "profile": args.out, "qemu_pid": pid, "stats": stats })
        );
    } else {
        println!(
            "wrote {}: {}; {} pages watched faulted in ({} per interval)",
            args.out.display(),
            stats.describe(),
            stats.read_faults,
            stats.read_faults / u64::from(stats.samples.max(1))
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A migration that failed before the destination ran the guest: the guest
/// runs on at the source. A guest with disks reaches them through this
/// process's NBD servers: stay, serving them, until its QEMU exits.
fn give_back(
    cause: MigrationError,
    mut kept: wanmig_datapath::migration::KeptSource,
    where_: &str,
) -> anyhow::Error {
    use wanmig_datapath::backend::SourceBackend;
    let (qmp, ram) = (kept.paths.qmp.clone(), kept.paths.ram.clone());
    let what = format!(
        "the migration failed before the destination ran the guest; it still runs {where_} (QEMU pid {}, QMP {}, RAM {})",
        kept.pid(),
        qmp.display(),
        ram.display()
    );
    if kept.source.disks().is_some() {
        eprintln!("wanmig: error: {cause:#}\n{what}: serving its disks until its QEMU exits");
        while kept.source.process().is_running() {
            std::thread::sleep(Duration::from_millis(200));
        }
        return anyhow::Error::new(cause).context(format!("{what}; it has exited"));
    }
    kept.detach();
    anyhow::Error::new(cause).context(what)
}

/// `--read-budget` (`None`: reads not sampled).
#[derive(Debug, Clone, Copy)]
struct ReadBudget(Option<f64>);

fn parse_budget(s: &str) -> std::result::Result<ReadBudget, String> {
    wanmig_datapath::profiling::ProfileOptions::parse_read_budget(s).map(ReadBudget)
}

fn keygen(out: &PathBuf) -> Result<ExitCode> {
    let key = PskKey::generate();
    key.write_new(out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote a {}-byte key to {} (fingerprint {})",
        key.len(),
        out.display(),
        key.fingerprint()
    );
    Ok(ExitCode::SUCCESS)
}

fn migrate(args: &MigrateArgs) -> Result<ExitCode> {
    if unsafe_not_root() {
        bail!("must run as root (QEMU's userfaultfd, network namespaces)");
    }
    let tag = format!("{}{}", args.wan_name, std::process::id());
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/wanmig/{tag}")));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let guest = guest_spec(&args.guest)?;
    let planning = planning(args, &run_dir)?;
    let spec = LocalMigration {
        guest,
        planning,
        source: SourceConfig {
            downtime_target: args.downtime_target,
            max_rounds: args.max_rounds,
            ..SourceConfig::default()
        },
        dest: DestConfig {
            hold: args.hold,
            ..DestConfig::default()
        },
        link: {
            let mut link = LinkConfig {
                encryption: encryption(args.plaintext),
                ..LinkConfig::default().with_io(args.io)
            };
            if let (true, Some(p)) = (args.rate_pacing, link.bulk.pacing.as_mut()) {
                p.rate = Some(RateConfig::default());
            }
            link
        },
        run_dir,
        tag,
        warmup_heartbeats: 3,
        warmup_disk_heartbeats: if args.guest.disk_mib > 0 { 2 } else { 0 },
        observe_heartbeats: 3,
    };
    if !args.json {
        eprintln!(
            "migrating a {} MiB guest ({}), plan: {}, over {}",
            args.guest.memory_mib,
            args.guest.workload,
            describe(&spec.planning),
            if args.no_wan {
                "loopback".to_string()
            } else {
                format!(
                    "an emulated {} / {} WAN",
                    args.rate,
                    format_duration(args.rtt)
                )
            }
        );
    }
    let outcome = if args.no_wan {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("binding the destination engine")?;
        run_local(&spec, listener, |addr, id, geometry, key, link| {
            connection::connect(addr, id, geometry, key, link)
        })
    } else {
        let wan = Wan::up(WanConfig::new(args.wan_name.clone(), args.rate, args.rtt))?;
        let outcome = run_over_wan(&spec, &wan);
        drop(wan);
        outcome
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(MigrationError::SourceKept { cause, kept }) => {
            // The guest is the user's: it runs on where it was.
            return Err(give_back(*cause, *kept, "at the source"));
        }
        Err(e) => return Err(e.into()),
    };
    let code = report(&outcome, args.json)?;
    outcome.cleanup();
    Ok(code)
}

/// The built-in guest as `g` says: its workload, more kernel parameters,
/// and a disk with the disk checker on it (if any).
fn guest_spec(g: &GuestArgs) -> Result<GuestSpec> {
    let mut params = format!("wanmig.workload={} {}", g.workload, g.guest_params);
    if g.disk_mib > 0 && !g.guest_params.contains("wanmig.disk=") {
        params.push_str(&format!(
            " wanmig.disk=check wanmig.diskmib={}",
            g.disk_mib.min(32)
        ));
    }
    let mut guest = GuestSpec::builtin(g.memory_mib, &params)?;
    if g.disk_mib > 0 {
        guest.disks.push(DiskSpec {
            size: g.disk_mib << 20,
            image: None,
        });
    }
    guest.chunk_size = g
        .chunk_kib
        .checked_mul(1024)
        .filter(|c| c.is_power_of_two() && (4096..=4 << 20).contains(c))
        .with_context(|| {
            format!(
                "--chunk-kib {}: must be a power of two in 4..=4096",
                g.chunk_kib
            )
        })?;
    Ok(guest)
}

/// The encryption `--plaintext` asks for; says so on stderr when it is
/// none.
fn encryption(plaintext: bool) -> Encryption {
    if plaintext {
        eprintln!("wanmig: {}", Encryption::PLAINTEXT_WARNING);
        Encryption::Plaintext
    } else {
        Encryption::Tls
    }
}

fn host_spec(
    guest: GuestSpec,
    key: &std::path::Path,
    run_dir: Option<&PathBuf>,
    role: &str,
    plaintext: bool,
) -> Result<HostSpec> {
    let key = PskKey::load(key).with_context(|| format!("reading the key {}", key.display()))?;
    let tag = format!("{role}{}", std::process::id());
    let run_dir = run_dir
        .cloned()
        .unwrap_or_else(|| PathBuf::from(format!("/run/wanmig/{tag}")));
    Ok(HostSpec {
        guest,
        run_dir,
        tag,
        key,
        link: LinkConfig {
            encryption: encryption(plaintext),
            ..LinkConfig::default()
        },
        attach: None,
    })
}

fn destination(args: &DestinationArgs) -> Result<ExitCode> {
    if unsafe_not_root() {
        bail!("must run as root (QEMU's userfaultfd)");
    }
    let guest = guest_spec(&args.guest)?;
    let spec = host_spec(
        guest,
        &args.key,
        args.run_dir.as_ref(),
        "dst",
        args.plaintext,
    )?;
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("listening on {}", args.listen))?;
    if !args.json {
        eprintln!("waiting for the source engine on {}", args.listen);
    }
    let cfg = DestConfig {
        hold: args.hold,
        ..DestConfig::default()
    };
    let out = run_destination_host(&spec, listener, &cfg)?;
    let r = &out.report;
    // What the guest printed on its console until now counts too.
    let integrity = IntegrityFigures::of(r, out.log.checker_errors());
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "destination": r,
                "integrity": integrity,
                "qemu": {
                    "pid": out.dest.pid(),
                    "qmp": out.paths.qmp,
                    "serial": out.paths.serial,
                    "ram": out.paths.ram,
                },
            })
        );
    } else {
        println!("link: {}", describe_io(&r.io));
        println!(
            "the guest runs here: QEMU pid {}, QMP {}, console {}",
            out.dest.pid(),
            out.paths.qmp.display(),
            out.paths.serial.display()
        );
        println!(
            "post-copy: remote uptime {:.2} s, penalty {:.3} s (pages {:.3} s over {} faults, disk chunks {:.3} s over {} waits); integrity: {:?}",
            r.uptime_s,
            r.penalty_s,
            r.page_stall_s,
            r.faults,
            r.chunk_stall_s,
            r.chunk_waits,
            integrity
        );
    }
    let mut dest = out.dest;
    if dest.has_disks() {
        // This process serves the guest's disks: stay until QEMU exits.
        if !args.json {
            eprintln!("serving the guest's disks until its QEMU exits");
        }
        while dest.process().is_running() {
            std::thread::sleep(Duration::from_millis(200));
        }
    } else {
        dest.detach();
    }
    integrity_exit(&integrity)
}

fn source(args: &SourceArgs) -> Result<ExitCode> {
    if unsafe_not_root() {
        bail!("must run as root (QEMU's userfaultfd)");
    }
    let m = &args.migrate;
    let guest = guest_spec(&m.guest)?;
    let mut spec = host_spec(guest, &args.key, m.run_dir.as_ref(), "src", m.plaintext)?;
    if let (Some(qmp), Some(ram)) = (&args.attach_qmp, &args.attach_ram) {
        spec.attach = Some(AttachTo {
            qmp: qmp.clone(),
            ram: ram.clone(),
        });
    }
    std::fs::create_dir_all(&spec.run_dir)
        .with_context(|| format!("creating {}", spec.run_dir.display()))?;
    let planning = planning(m, &spec.run_dir)?;
    let cfg = SourceConfig {
        downtime_target: m.downtime_target,
        max_rounds: m.max_rounds,
        ..SourceConfig::default()
    };
    let warmup = (3, if m.guest.disk_mib > 0 { 2 } else { 0 });
    let mut out = match run_source_host(&spec, args.connect, &planning, &cfg, warmup) {
        Ok(o) => o,
        Err(MigrationError::SourceKept { cause, kept }) => {
            return Err(give_back(*cause, *kept, "here"));
        }
        Err(e) => return Err(e.into()),
    };
    let r = &out.report;
    if m.json {
        println!(
            "{}",
            serde_json::json!({
                "plan": { "m": r.m, "s": out.s, "origin": out.plan_origin },
                "predicted": out.predicted,
                "source": r,
            })
        );
    } else {
        println!(
            "plan: M = {:.2}, S = {:.2} ({})",
            r.m, out.s, out.plan_origin
        );
        println!("link: {}", describe_io(&r.io));
        println!(
            "downtime (source clock): {} (upper bound {}), {:.1} MB sent, pre-copy {:.2} s, push {:.2} s",
            r.downtime_estimate_s
                .map_or("n/a".into(), |d| format!("{:.0} ms", d * 1e3)),
            r.downtime_upper_s
                .map_or("n/a".into(), |d| format!("{:.0} ms", d * 1e3)),
            r.bytes_sent as f64 / 1e6,
            r.precopy_s,
            r.push_s
        );
    }
    // The guest runs at the destination: this QEMU holds a stale copy. An
    // attached one is left (paused) to whoever started it.
    if !out.source.process().is_attached() {
        out.source.process().qmp().quit().ok();
    }
    Ok(ExitCode::SUCCESS)
}

fn planning(args: &MigrateArgs, run_dir: &std::path::Path) -> Result<Planning> {
    let downtime_target = Some(args.downtime_target);
    Ok(
        match (&args.m, &args.profile, &args.segment, &args.profile_now) {
            (Some(m), None, None, None) => match args.freeze {
                None => Planning::Fixed { m: *m, s: args.s },
                Some(freeze) => Planning::FixedStrategy {
                    m: *m,
                    s: args.s,
                    freeze,
                    max_rounds: None,
                },
            },
            (None, Some(p), Some(name), None) => Planning::Segment {
                name: name.clone(),
                profile: p.clone(),
            },
            (None, Some(p), None, None) => Planning::Profile {
                path: p.clone(),
                rate: args.rate,
                rtt: args.rtt,
                downtime_target,
            },
            (None, None, None, Some(spec)) => {
                let (n, tau) = spec
                    .split_once('x')
                    .context("--profile-now takes SAMPLESxINTERVAL, e.g. 20x250ms")?;
                Planning::ProfileNow {
                    path: run_dir.join("profile.wmp"),
                    samples: n.parse().context("--profile-now: sample count")?,
                    interval: parse_duration(tau)?,
                    rate: args.rate,
                    rtt: args.rtt,
                    downtime_target,
                }
            }
            (None, None, None, None) => Planning::Fixed { m: 0.5, s: args.s },
            _ => bail!("give one of --m, --profile [--segment], --profile-now"),
        },
    )
}

fn describe(p: &Planning) -> String {
    match p {
        Planning::Fixed { m, s } => format!("M = {m}, S = {s} (address order)"),
        Planning::FixedStrategy { m, s, freeze, .. } => {
            format!("M = {m}, S = {s} (address order), {freeze} freeze")
        }
        Planning::Profile { path, .. } => format!("planner on {}", path.display()),
        Planning::ProfileNow {
            samples, interval, ..
        } => {
            format!(
                "profile {samples} x {} then planner",
                format_duration(*interval)
            )
        }
        Planning::Segment { name, .. } => format!("planner segment {name:?}"),
    }
}

/// One line: the cipher, where it ran, the I/O backend (and why it fell
/// back).
fn describe_io(io: &wanmig_datapath::transport::IoPath) -> String {
    let cipher = if io.cipher == "none" {
        "unencrypted (--plaintext)".to_string()
    } else {
        format!("{}, sealed in {}", io.cipher, io.cipher_in)
    };
    let fallback = io
        .fallback
        .as_deref()
        .map_or(String::new(), |why| format!(" (io_uring unusable: {why})"));
    format!(
        "{cipher}; I/O {}{fallback}{}",
        io.backend,
        if io.zero_copy { ", zero-copy" } else { "" }
    )
}

fn report(outcome: &LocalOutcome, json: bool) -> Result<ExitCode> {
    let r: &MigrationReport = &outcome.report;
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        let m = &r.measured;
        println!(
            "plan: M = {:.2}, S = {:.2} ({})",
            r.plan.m, r.plan.s, r.plan_origin
        );
        println!("link: {}", describe_io(&r.io));
        if let Some(p) = &r.predicted {
            println!(
                "predicted: total {:.2} s, downtime {:.0} ms, remote uptime {:.2} s, penalty {:.3} s, Gamma {:.3}",
                p.total_s,
                p.downtime_s * 1e3,
                p.uptime_s,
                p.penalty_s,
                p.gamma
            );
        }
        println!(
            "measured: total {:.2} s, downtime {:.0} ms, remote uptime {:.2} s, penalty {:.3} s over {} faults, {:.1} MB sent, Gamma {:.3}",
            m.total_s,
            m.downtime_s * 1e3,
            m.uptime_s,
            m.penalty_s,
            m.faults,
            m.bytes_sent as f64 / 1e6,
            m.gamma
        );
        let d = &r.destination;
        println!(
            "penalty: the guest waited {:.3} s for pages ({} faults fetching, {} on pages on their way, {} on zero pages) and {:.3} s for disk chunks ({} requests), overlaps counted once",
            d.page_stall_s,
            d.faults,
            d.faults_in_flight,
            d.zero_faults,
            d.chunk_stall_s,
            d.chunk_waits
        );
        let s = &r.source;
        println!(
            "pre-copy: {} rounds ({}), remainder {} pages, device state {} KiB; post-copy: {} pushed, {} fetched by faults",
            s.rounds.len(),
            s.stop_reason,
            s.remainder_pages,
            s.device_state_bytes >> 10,
            s.postcopy_pushed,
            s.fault_pages_served
        );
        for a in &s.plans_applied {
            println!(
                "re-planned: generation {} applied from round {} (M = {:.2}{}; {} pages, {} chunks added to the pre-copy set)",
                a.generation,
                a.round,
                a.m,
                a.s.map_or(String::new(), |s| format!(", S = {s:.2}")),
                a.pages_added,
                a.chunks_added
            );
        }
        if let Some(st) = &r.storage {
            println!(
                "storage: {} chunks fetched on demand, {} whole-block overwrites (no fetch), {} partial-block merges, {:.1} MB of chunks sent",
                st.chunks_fetched,
                st.whole_block_overwrites,
                st.partial_block_merges,
                st.bytes_sent as f64 / 1e6
            );
        }
        let i = &r.integrity;
        if i.checked {
            println!(
                "integrity: checker errors {}, {} populated pages compared with the source's frozen memory ({} holes apart: pages it announced empty), {} differing",
                i.checker_errors, i.pages_compared, i.holes_compared, i.pages_differing
            );
            if r.storage.is_some() {
                println!(
                    "           {} disk chunks compared with the source's frozen disks, {} differing",
                    i.chunks_compared, i.chunks_differing
                );
            }
        } else {
            println!(
                "integrity: NOT CHECKED (the engine compared nothing); checker errors {}",
                i.checker_errors
            );
        }
    }
    integrity_exit(&r.integrity)
}

/// The exit status a migration's integrity earns: success only if the check
/// ran and found the guest intact ([`IntegrityFigures::holds`]); 2 otherwise,
/// with the reasons.
fn integrity_exit(i: &IntegrityFigures) -> Result<ExitCode> {
    let failures = i.failures();
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let what = if i.checked {
        "DATA MISMATCH: the guest did not arrive intact"
    } else {
        "INTEGRITY NOT CHECKED: nothing shows the guest arrived intact"
    };
    eprintln!("wanmig: {what}: {}", failures.join("; "));
    Ok(ExitCode::from(2))
}

fn unsafe_not_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() != 0 }
}
