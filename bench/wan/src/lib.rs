//! The emulated WAN: two hosts, each behind its own WAN router, the routers
//! joined by a pair of TUN devices and a userspace delay line. The rate limit
//! (`tbf`: rate, burst, drop-tail queue) sits on each router's TUN egress, so
//! the bottleneck queue is remote to both hosts, as on a real WAN.
//!
//! ```text
//!  netns wanmig-<n>-src                    the source host
//!    src_addr on wm-<n>-h
//!        ║ veth   (crossing into another namespace ends TSQ's hold on a packet)
//!  netns wanmig-<n>-src-router             its WAN router (ip_forward)
//!    wm-<n>-r ─▶ forward ─▶ tbf ─▶ TUN wm-<n>-s ──fd──┐
//!    wm-<n>-r ◀─ forward ◀──────── TUN wm-<n>-s ◀─fd──┼──┐
//!                                                     ▼  │
//!  root netns: delay line thread (this process)       │  │
//!    src→dst FIFO: write to wm-<n>-d at arrival + d   │  │
//!    dst→src FIFO: write to wm-<n>-s at arrival + d   │  ▲
//!                                                     │  │
//!  netns wanmig-<n>-dst-router             its WAN router (ip_forward)
//!    wm-<n>-r ◀─ forward ◀──────── TUN wm-<n>-d ◀─fd──┘  │
//!    wm-<n>-r ─▶ forward ─▶ tbf ─▶ TUN wm-<n>-d ──fd─────┘
//!        ║ veth
//!  netns wanmig-<n>-dst                    the destination host
//!    dst_addr on wm-<n>-h
//!
//!  d = (rtt - base_rtt) / 2, optional loss. Each direction has its own tbf,
//!  on the TUN of the router it enters the WAN by.
//! ```
//!
//! - Each direction is limited by the tbf on its entry router's TUN ([`tc`]),
//!   then delayed in the delay line ([`delay_line`]), so a ping sees `rtt` and a
//!   bulk TCP flow sees `rate`. TCP runs end to end between the two hosts'
//!   stacks; the routers only forward. `base_rtt` is the emulator's own fastest
//!   round trip (four veth crossings, four forwards, two TUN round trips),
//!   measured when the WAN comes up and subtracted ([`calibrate`]).
//! - Why routers: Linux TCP Small Queues (TSQ) limits the bytes of each socket
//!   that sit in its own host's qdiscs and device queues to about 1 ms at its
//!   pacing rate (at least two packets, which with GSO can be two 64 KiB
//!   super-packets). With the tbf on a device of the sending host a bulk flow
//!   therefore never builds a queue at the bottleneck (9 ms round trips under
//!   a cubic flow with a 200 ms queue at 40 Mbit/s, 5 ms), unlike a real WAN
//!   where a remote router's buffer fills and delays every other flow. A
//!   packet that crosses the veth into the router's namespace is orphaned
//!   there (`ip_rcv` drops its socket reference), so TSQ no longer counts it,
//!   and the router's tbf fills like a real router's buffer (160 ms median
//!   round trip under the same cubic flow; see `bench/tests/wan.rs`).
//!   The routers' shaping also keeps the delay line's input at the link rate.
//!   Rejected alternatives, measured on this kernel (which has `ifb`, `mirred`
//!   and `u32`, but neither netem nor matchall): a tbf on an `ifb` fed from the
//!   destination TUN's ingress (after the delay line) fills too, but nothing
//!   then shapes what the sender pushes into the TUN ring and the single
//!   delay-line thread: at 1 Gbit/s, 5 ms iperf3 reached 709–802 Mbit/s with
//!   BBR and 731–954 with cubic (one run with 220 TUN-ring drops), against
//!   957–961 through the routers. Rate and queue inside the delay line would
//!   sit at the same place, with the same unshaped input and a userspace timer
//!   per packet besides.
//! - Addresses: an /29 per WAN picked by a hash of the name ([`address_plan`]):
//!   `+1` source host, `+2` destination host, `+3` source router, `+4`
//!   destination router, each as a `/32` with a point-to-point peer. Hosts
//!   route only the other host's address via their router; routers route the
//!   far host into their TUN and their own host into the veth. Every WAN has
//!   its own namespaces, so WANs never share a routing table or a queue, and
//!   even two names that hash to the same /29 can be up at once; distinct
//!   addresses only make traces and logs unambiguous.
//! - Names: `name` is 1–[`MAX_NAME_LEN`] characters `[a-z0-9]`, so that device
//!   names `wm-<name>-X` fit the kernel's 15-byte limit ([`WanNames`]). The
//!   veths are created straight into their namespaces, the TUNs inside theirs,
//!   so no device of a WAN ever exists in the root namespace.
//! - A [`Wan`] made by [`Wan::up`] owns everything: dropping it stops the delay
//!   line (closing the TUN fds deletes the devices) and deletes the four
//!   namespaces (which deletes the veths). A WAN kept by a daemon
//!   (`wanmig-bench wan up`) is found with [`Wan::attach`] and torn down with
//!   [`Wan::down_by_name`] ([`daemon`]).

pub mod calibrate;
pub mod check;
pub mod cmd;
pub mod daemon;
pub mod delay_line;
pub mod netns;
pub mod tc;
pub mod tun;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use wanmig_planner::units::{Rate, format_duration};

use self::calibrate::CalibrationError;
use self::cmd::CommandError;
use self::delay_line::{DelayLine, DelayLineConfig, DelayLineError, DelayLineStats};
use self::netns::NetnsError;
use self::tc::{TbfParams, TcError};
use self::tun::{Tun, TunError};

pub use self::check::{WanMeasurement, iperf3_throughput, measure};

/// Longest WAN name.
pub const MAX_NAME_LEN: usize = 10;

/// The /16 that WAN address pairs are taken from.
pub const ADDRESS_BASE: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 0);

/// How long the TUN ring covers at full rate (see [`WanConfig::txqueuelen`]).
pub const TUN_RING_TIME: Duration = Duration::from_millis(20);

/// Floor of the default tbf queue (see [`WanConfig::default_queue`]).
pub const MIN_DEFAULT_QUEUE: Duration = Duration::from_millis(20);

/// A WAN name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid WAN name {name:?}: {reason}")]
pub struct NameError {
    /// The name given.
    pub name: String,
    /// Why it was refused.
    pub reason: &'static str,
}

/// Checks a WAN name: 1–[`MAX_NAME_LEN`] characters `[a-z0-9]`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_NAME_LEN {
        "too long: at most 10 characters (interface names are limited to 15 bytes)"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        "only lowercase letters a-z and digits 0-9 are allowed"
    } else {
        return Ok(());
    };
    Err(NameError {
        name: name.into(),
        reason,
    })
}

/// The names of a WAN's namespaces and devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WanNames {
    /// Source host namespace, `wanmig-<name>-src`.
    pub src_ns: String,
    /// Destination host namespace, `wanmig-<name>-dst`.
    pub dst_ns: String,
    /// The source host's router, `wanmig-<name>-src-router`.
    pub src_router_ns: String,
    /// The destination host's router, `wanmig-<name>-dst-router`.
    pub dst_router_ns: String,
    /// TUN device in the source router, `wm-<name>-s`; its tbf limits
    /// source → destination.
    pub src_tun: String,
    /// TUN device in the destination router, `wm-<name>-d`; its tbf limits
    /// destination → source.
    pub dst_tun: String,
    /// A host's end of the veth to its router, `wm-<name>-h` (the same name in
    /// both hosts).
    pub host_veth: String,
    /// A router's end of the veth to its host, `wm-<name>-r` (the same name in
    /// both routers).
    pub router_veth: String,
}

/// Suffixes of a WAN's namespace names after `wanmig-<name>`.
const NS_SUFFIXES: [&str; 4] = ["-src", "-dst", "-src-router", "-dst-router"];

impl WanNames {
    /// The names for WAN `name` (which must be valid).
    pub fn new(name: &str) -> Result<WanNames, NameError> {
        validate_name(name)?;
        Ok(WanNames {
            src_ns: format!("wanmig-{name}-src"),
            dst_ns: format!("wanmig-{name}-dst"),
            src_router_ns: format!("wanmig-{name}-src-router"),
            dst_router_ns: format!("wanmig-{name}-dst-router"),
            src_tun: format!("wm-{name}-s"),
            dst_tun: format!("wm-{name}-d"),
            host_veth: format!("wm-{name}-h"),
            router_veth: format!("wm-{name}-r"),
        })
    }

    /// The four namespaces in path order: source host, source router,
    /// destination router, destination host.
    pub fn namespaces(&self) -> [&str; 4] {
        [
            &self.src_ns,
            &self.src_router_ns,
            &self.dst_router_ns,
            &self.dst_ns,
        ]
    }

    /// Every device of the WAN with its namespace, in path order.
    pub fn devices(&self) -> [(&str, &str); 6] {
        [
            (&self.src_ns, &self.host_veth),
            (&self.src_router_ns, &self.router_veth),
            (&self.src_router_ns, &self.src_tun),
            (&self.dst_router_ns, &self.dst_tun),
            (&self.dst_router_ns, &self.router_veth),
            (&self.dst_ns, &self.host_veth),
        ]
    }

    /// The WAN name back from one of its namespace names,
    /// `wanmig-<name>-src|dst|src-router|dst-router`.
    pub fn wan_of_namespace(ns: &str) -> Option<&str> {
        let rest = ns.strip_prefix("wanmig-")?;
        let name = NS_SUFFIXES
            .iter()
            .find_map(|suffix| rest.strip_suffix(suffix))?;
        validate_name(name).ok().map(|()| name)
    }
}

/// The addresses of one WAN (see [`address_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WanAddresses {
    /// The source host, `+1`.
    pub src: Ipv4Addr,
    /// The destination host, `+2`.
    pub dst: Ipv4Addr,
    /// The source router (its veth to the source host), `+3`.
    pub src_router: Ipv4Addr,
    /// The destination router (its veth to the destination host), `+4`.
    pub dst_router: Ipv4Addr,
}

/// The addresses of WAN `name`: hosts 1 and 2 of a /29 in [`ADDRESS_BASE`]/16
/// chosen by an FNV-1a hash of the name, routers 3 and 4.
pub fn address_plan(name: &str) -> WanAddresses {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let subnet = (h % (1 << 13)) << 3; // one of 8192 /29s
    let base = u32::from(ADDRESS_BASE) | subnet;
    WanAddresses {
        src: Ipv4Addr::from(base + 1),
        dst: Ipv4Addr::from(base + 2),
        src_router: Ipv4Addr::from(base + 3),
        dst_router: Ipv4Addr::from(base + 4),
    }
}

/// The hosts' address pair of WAN `name`: `(src, dst)` (see [`address_plan`]).
pub fn addresses(name: &str) -> (Ipv4Addr, Ipv4Addr) {
    let a = address_plan(name);
    (a.src, a.dst)
}

/// The settings of an emulated WAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WanConfig {
    /// Name (1–10 of `[a-z0-9]`); namespaces are
    /// `wanmig-<name>-src|dst|src-router|dst-router`.
    pub name: String,
    /// Rate of each direction (IP bytes; see [`tc`]).
    pub rate: Rate,
    /// Round-trip time between the two hosts: the smallest ICMP round trip
    /// is this (the delay line delays each direction by
    /// `(rtt - base_rtt) / 2`, see [`calibrate`]).
    pub rtt: Duration,
    /// MTU of every device on the path (veths and TUNs); default 1500.
    pub mtu: u32,
    /// Packets lost per million, independently in each direction; default 0.
    pub loss_ppm: u32,
    /// The bottleneck queue (each router's tbf) as time at full rate (tc's
    /// `latency`): the most queueing delay a packet can see before it is
    /// dropped. A loss-based bulk flow (cubic) keeps it mostly full, and every
    /// other flow in that direction waits behind it. Default
    /// [`WanConfig::default_queue`].
    pub queue: Duration,
}

impl WanConfig {
    /// A WAN with the default MTU (1500), no loss and the default queue.
    pub fn new(name: impl Into<String>, rate: Rate, rtt: Duration) -> WanConfig {
        WanConfig {
            name: name.into(),
            rate,
            rtt,
            mtu: 1500,
            loss_ppm: 0,
            queue: WanConfig::default_queue(rtt),
        }
    }

    /// The default queue: `max(rtt, 20 ms)`. One bandwidth-delay product of
    /// buffering (the classic rule for a bottleneck router) lets a single TCP
    /// flow keep the link busy through its congestion-window cuts; the 20 ms
    /// floor absorbs the bursts of short-RTT flows.
    pub fn default_queue(rtt: Duration) -> Duration {
        rtt.max(MIN_DEFAULT_QUEUE)
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), WanError> {
        validate_name(&self.name)?;
        let bad = |msg: String| Err(WanError::InvalidConfig(msg));
        if !(576..=65_535).contains(&self.mtu) {
            return bad(format!("mtu {} out of range 576..=65535", self.mtu));
        }
        if self.loss_ppm > 1_000_000 {
            return bad(format!("loss {} ppm is above 1000000", self.loss_ppm));
        }
        if self.rtt > Duration::from_secs(60) || self.queue > Duration::from_secs(60) {
            return bad("rtt and queue must be at most 60s".into());
        }
        Ok(())
    }

    /// Nominal one-way delay, `rtt / 2` (the delay line applies
    /// [`Wan::one_way_delay`], which also takes out the emulator's own time).
    pub fn one_way(&self) -> Duration {
        self.rtt / 2
    }

    /// The tbf parameters used on both routers' TUN devices.
    pub fn tbf(&self) -> TbfParams {
        TbfParams::for_link(self.rate, self.mtu, self.queue)
    }

    /// The delay line's settings: its queue holds four times what the link
    /// can have in flight plus queued, and at least 4096 packets.
    pub fn delay_line(&self) -> DelayLineConfig {
        let tbf = self.tbf();
        let bytes =
            self.rate.bytes_per_second() * self.one_way().as_secs_f64() + tbf.limit_bytes as f64;
        let packets = (bytes / f64::from(self.mtu)).ceil() as usize;
        DelayLineConfig {
            one_way: self.one_way(),
            loss_ppm: self.loss_ppm,
            mtu: self.mtu,
            queue_limit: (4 * packets).max(4096),
            seed: seed(),
        }
    }

    /// The TUN devices' `txqueuelen`: the ring between the tbf and the delay
    /// line's reads. It holds [`TUN_RING_TIME`] at the full rate in MTU-sized
    /// packets (500..=20000), so that a delay line thread held off the CPU
    /// that long loses nothing (a full ring drops, it does not push back).
    pub fn txqueuelen(&self) -> u64 {
        let packets =
            self.rate.bytes_per_second() * TUN_RING_TIME.as_secs_f64() / f64::from(self.mtu);
        (packets.ceil() as u64).clamp(500, 20_000)
    }

    /// `40mbit rtt 5ms mtu 1500 loss 0ppm queue 20ms`.
    pub fn summary(&self) -> String {
        format!(
            "{} rtt {} mtu {} loss {}ppm queue {}",
            self.rate,
            format_duration(self.rtt),
            self.mtu,
            self.loss_ppm,
            format_duration(self.queue)
        )
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32) | 1
}

/// Bringing a WAN up (or attaching to one) failed.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    /// The name is not usable.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Some other setting is out of range.
    #[error("invalid WAN configuration: {0}")]
    InvalidConfig(String),
    /// Not running as root.
    #[error(
        "must run as root: network namespaces, TUN devices and tc need CAP_SYS_ADMIN and CAP_NET_ADMIN"
    )]
    NotRoot,
    /// `/dev/net/tun` does not exist.
    #[error(
        "{} is missing: the kernel has no TUN support loaded (try `modprobe tun`; run scripts/setup)",
        tun::TUN_DEVICE
    )]
    TunDeviceMissing,
    /// A required program (`ip`, `tc`, ...) is not installed.
    #[error(transparent)]
    ToolMissing(CommandError),
    /// A leftover WAN of the same name could not be removed first.
    #[error("removing a leftover WAN {name:?} first")]
    Cleanup {
        /// WAN name.
        name: String,
        /// What failed.
        source: Box<TeardownError>,
    },
    /// Creating a namespace failed.
    #[error("creating network namespace {ns}")]
    Netns {
        /// Namespace name.
        ns: String,
        /// What failed.
        source: Box<NetnsError>,
    },
    /// Setting a sysctl (IP forwarding, IPv6 off) in a namespace failed.
    #[error(transparent)]
    Sysctl(Box<NetnsError>),
    /// Creating a TUN device failed.
    #[error(transparent)]
    Tun(#[from] TunError),
    /// Creating a veth or configuring addresses, routes, MTU or links with
    /// `ip` failed.
    #[error("configuring {dev} in {ns}")]
    Link {
        /// Namespace.
        ns: String,
        /// Device.
        dev: String,
        /// The failed `ip` run.
        source: Box<CommandError>,
    },
    /// Installing the tbf failed.
    #[error(transparent)]
    Tc(Box<TcError>),
    /// Starting the delay line failed.
    #[error(transparent)]
    DelayLine(#[from] DelayLineError),
    /// Measuring the emulator's own round trip failed.
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    /// [`Wan::attach`]: no live daemon-managed WAN of that name.
    #[error("WAN {name:?} is not up ({reason}); start it with `wanmig-bench wan up --name {name}`")]
    NotUp {
        /// WAN name.
        name: String,
        /// What is missing.
        reason: String,
    },
}

impl From<TcError> for WanError {
    fn from(e: TcError) -> Self {
        WanError::Tc(Box::new(e))
    }
}

/// Tearing a WAN down failed.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    /// The name is not usable.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Deleting a namespace or listing its processes failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Deleting a stray device failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A process would not exit even after SIGKILL.
    #[error("process {pid} ({what}) did not exit after SIGTERM and SIGKILL")]
    ProcessSurvived {
        /// Its pid.
        pid: u32,
        /// What it was.
        what: String,
    },
    /// Removing a state file failed.
    #[error("cannot remove {path}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The delay line had stopped with an error.
    #[error(transparent)]
    DelayLine(#[from] DelayLineError),
}

/// Checks that WANs can be built here: root, `/dev/net/tun`, and `tools` (e.g.
/// `["ip", "tc"]`) installed.
pub fn preflight(tools: &[&str]) -> Result<(), WanError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(WanError::NotRoot);
    }
    if !Path::new(tun::TUN_DEVICE).exists() {
        return Err(WanError::TunDeviceMissing);
    }
    for tool in tools {
        cmd::find_tool(tool).map_err(WanError::ToolMissing)?;
    }
    Ok(())
}

/// An emulated WAN between two host namespaces (see the module docs).
///
/// Made by [`Wan::up`], it owns the namespaces, devices and delay line, and
/// dropping it tears them down. Made by [`Wan::attach`], it only describes a
/// WAN kept by a daemon, and dropping it changes nothing.
#[derive(Debug)]
pub struct Wan {
    config: WanConfig,
    names: WanNames,
    addresses: WanAddresses,
    base_rtt: Duration,
    delay_line: Option<DelayLine>,
    owned: bool,
}

/// Deletes the namespaces created so far if `up` fails half-way.
struct NamespaceGuard(Vec<String>);

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = netns::delete(ns);
        }
    }
}

impl Wan {
    /// Brings WAN `config.name` up: the four namespaces, the two veths, the
    /// TUN devices, addresses and routes, IP forwarding in the routers, the
    /// tbf on each router's TUN, and the delay line thread (in this process).
    ///
    /// A leftover WAN of the same name (from a crashed run, or a daemon) is torn
    /// down first with [`Wan::down_by_name`].
    pub fn up(config: WanConfig) -> Result<Wan, WanError> {
        config.validate()?;
        preflight(&["ip", "tc", "ping"])?;
        let names = WanNames::new(&config.name)?;
        Wan::down_by_name(&config.name).map_err(|source| WanError::Cleanup {
            name: config.name.clone(),
            source: Box::new(source),
        })?;

        let mut guard = NamespaceGuard(Vec::new());
        for ns in names.namespaces() {
            netns::add(ns).map_err(|source| WanError::Netns {
                ns: ns.into(),
                source: Box::new(source),
            })?;
            guard.0.push(ns.into());
            // No IPv6 on the devices created from now on: no router
            // solicitations, MLD reports or DAD on the path, so the delay
            // line carries only the traffic under test and its counters are
            // exact.
            sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
            ip(ns, "lo", ["link", "set", "dev", "lo", "up"])?;
        }
        for router in [&names.src_router_ns, &names.dst_router_ns] {
            sysctl(router, "net.ipv4.ip_forward", "1")?;
        }
        for (host, router) in [
            (&names.src_ns, &names.src_router_ns),
            (&names.dst_ns, &names.dst_router_ns),
        ] {
            // Created straight into both namespaces: never in the root one.
            ip(
                host,
                &names.host_veth,
                [
                    "link",
                    "add",
                    &names.host_veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &names.router_veth,
                    "netns",
                    router,
                ],
            )?;
        }
        let src_tun = Tun::create_in(&names.src_router_ns, &names.src_tun)?;
        let dst_tun = Tun::create_in(&names.dst_router_ns, &names.dst_tun)?;
        let addresses = address_plan(&config.name);
        configure_side(
            &config,
            [&names.src_ns, &names.src_router_ns],
            [&names.host_veth, &names.router_veth, &names.src_tun],
            [addresses.src, addresses.src_router, addresses.dst],
        )?;
        configure_side(
            &config,
            [&names.dst_ns, &names.dst_router_ns],
            [&names.host_veth, &names.router_veth, &names.dst_tun],
            [addresses.dst, addresses.dst_router, addresses.src],
        )?;
        let tbf = config.tbf();
        tc::apply_tbf(&names.src_router_ns, &names.src_tun, &tbf)?;
        tc::apply_tbf(&names.dst_router_ns, &names.dst_tun, &tbf)?;
        // Start without delay or loss, measure the emulator's own round trip,
        // then delay by what is left of the RTT (see `calibrate`).
        let settings = config.delay_line();
        let delay_line = DelayLine::start(
            src_tun.into_file(),
            dst_tun.into_file(),
            DelayLineConfig {
                one_way: Duration::ZERO,
                loss_ppm: 0,
                ..settings
            },
        )?;
        let base_rtt = calibrate::base_rtt(&names.src_ns, addresses.dst)?;
        delay_line.set(config.rtt.saturating_sub(base_rtt) / 2, config.loss_ppm);
        guard.0.clear();
        Ok(Wan {
            config,
            names,
            addresses,
            base_rtt,
            delay_line: Some(delay_line),
            owned: true,
        })
    }

    /// A handle on WAN `name` kept up by a daemon (`wanmig-bench wan up`): its
    /// settings come from the daemon's state file. Dropping the handle leaves
    /// the WAN up.
    pub fn attach(name: &str) -> Result<Wan, WanError> {
        let names = WanNames::new(name)?;
        match daemon::probe(name) {
            daemon::Probe::Up(state) => Ok(Wan {
                config: state.config(),
                names,
                addresses: WanAddresses {
                    src: state.src_addr,
                    dst: state.dst_addr,
                    ..address_plan(name)
                },
                base_rtt: Duration::from_nanos(state.base_rtt_ns),
                delay_line: None,
                owned: false,
            }),
            daemon::Probe::Broken { reason, .. } => Err(WanError::NotUp {
                name: name.into(),
                reason,
            }),
            daemon::Probe::Down => Err(WanError::NotUp {
                name: name.into(),
                reason: "nothing of it exists".into(),
            }),
        }
    }

    /// Tears down WAN `name`, whatever is left of it: stops its daemon (from the
    /// pidfile; SIGTERM, then SIGKILL), ends the processes still inside its
    /// namespaces (never this process), deletes the four namespaces (with them
    /// the veths) and any device of its names left in the root namespace, and
    /// removes its state files. Nothing left is not an error, so this is
    /// idempotent.
    pub fn down_by_name(name: &str) -> Result<(), TeardownError> {
        let names = WanNames::new(name)?;
        daemon::stop_daemon(name)?;
        for ns in names.namespaces() {
            daemon::end_processes(&netns::pids(ns)?, &format!("process in {ns}"))?;
            netns::delete(ns)?;
        }
        for dev in [
            &names.src_tun,
            &names.dst_tun,
            &names.host_veth,
            &names.router_veth,
        ] {
            if Path::new("/sys/class/net").join(dev).exists() {
                cmd::run("ip", ["link", "del", "dev", dev.as_str()])?;
            }
        }
        daemon::remove_files(name)
    }

    /// Tears this WAN down and returns the delay line's final counters
    /// (`None` for an attached WAN, which is left up).
    pub fn down(mut self) -> Result<Option<DelayLineStats>, TeardownError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<Option<DelayLineStats>, TeardownError> {
        if !self.owned {
            return Ok(None);
        }
        self.owned = false;
        let stats = self.delay_line.take().map(DelayLine::stop).transpose();
        for ns in self.names.namespaces() {
            netns::delete(ns)?;
        }
        Ok(stats?)
    }

    /// The settings it was brought up with ([`set_rate`](Self::set_rate)
    /// changes the link, not these).
    pub fn config(&self) -> &WanConfig {
        &self.config
    }

    /// Changes the bottleneck rate in both directions now (the tbf on each
    /// router is replaced, with the same queue time), as a WAN whose
    /// available bandwidth changes under a running migration.
    pub fn set_rate(&self, rate: Rate) -> Result<(), WanError> {
        let tbf = TbfParams::for_link(rate, self.config.mtu, self.config.queue);
        let n = &self.names;
        tc::apply_tbf(&n.src_router_ns, &n.src_tun, &tbf)?;
        tc::apply_tbf(&n.dst_router_ns, &n.dst_tun, &tbf)?;
        Ok(())
    }

    /// The WAN's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The namespace and device names.
    pub fn names(&self) -> &WanNames {
        &self.names
    }

    /// The source host's namespace.
    pub fn src_ns(&self) -> &str {
        &self.names.src_ns
    }

    /// The destination host's namespace.
    pub fn dst_ns(&self) -> &str {
        &self.names.dst_ns
    }

    /// The source host's router (holds the source → destination tbf).
    pub fn src_router_ns(&self) -> &str {
        &self.names.src_router_ns
    }

    /// The destination host's router (holds the destination → source tbf).
    pub fn dst_router_ns(&self) -> &str {
        &self.names.dst_router_ns
    }

    /// The source host's address (in [`Wan::src_ns`]).
    pub fn src_addr(&self) -> Ipv4Addr {
        self.addresses.src
    }

    /// The destination host's address (in [`Wan::dst_ns`]).
    pub fn dst_addr(&self) -> Ipv4Addr {
        self.addresses.dst
    }

    /// All addresses, routers' included.
    pub fn addresses(&self) -> WanAddresses {
        self.addresses
    }

    /// The emulator's own smallest round trip, measured when the WAN came up
    /// and subtracted from the delay (see [`calibrate`]).
    pub fn base_rtt(&self) -> Duration {
        self.base_rtt
    }

    /// The delay each direction actually gets: `(rtt - base_rtt) / 2`.
    pub fn one_way_delay(&self) -> Duration {
        self.config.rtt.saturating_sub(self.base_rtt) / 2
    }

    /// The delay line's counters: live for a WAN made by [`Wan::up`], the
    /// daemon's last report (at most a second old) for an attached one.
    pub fn stats(&self) -> Option<DelayLineStats> {
        match &self.delay_line {
            Some(dl) => Some(dl.stats()),
            None => daemon::read_state(&self.config.name)
                .ok()
                .flatten()
                .and_then(|s| s.stats),
        }
    }

    /// Whether the delay line is running (for an attached WAN: whether the
    /// daemon is).
    pub fn is_running(&self) -> bool {
        match &self.delay_line {
            Some(dl) => dl.is_running(),
            None => matches!(daemon::probe(&self.config.name), daemon::Probe::Up(_)),
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("wanmig: tearing down WAN {:?}: {e}", self.config.name);
        }
    }
}

/// Sets a sysctl inside `ns`.
fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), WanError> {
    netns::set_sysctl(ns, key, value).map_err(|e| WanError::Sysctl(Box::new(e)))
}

/// Runs `ip -n <ns> <args>`; a failure names `dev`.
fn ip<I, S>(ns: &str, dev: &str, args: I) -> Result<(), WanError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut full: Vec<std::ffi::OsString> = vec!["-n".into(), ns.into()];
    full.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
    cmd::run("ip", full).map_err(|source| WanError::Link {
        ns: ns.into(),
        dev: dev.into(),
        source: Box::new(source),
    })?;
    Ok(())
}

/// Addresses, routes, MTU and links of one side of the WAN: a host and its
/// router. `[host_ns, router_ns]`, `[host_veth, router_veth, tun]`,
/// `[host_addr, router_addr, far_host_addr]`.
///
/// - host: `host_addr/32 peer router_addr` on its veth, and a route to the far
///   host via the router (nothing else is reachable);
/// - router: `router_addr/32 peer host_addr` on its veth, and a route to the
///   far host into its TUN (a point-to-point device: no neighbours, no
///   address needed); packets for its host arrive from the TUN and leave by
///   the veth's peer route.
fn configure_side(
    config: &WanConfig,
    [host, router]: [&str; 2],
    [host_veth, router_veth, tun]: [&str; 3],
    [host_addr, router_addr, far]: [Ipv4Addr; 3],
) -> Result<(), WanError> {
    let (host_addr, router_addr, far) = (
        host_addr.to_string(),
        router_addr.to_string(),
        far.to_string(),
    );
    let (mtu, txqueuelen) = (config.mtu.to_string(), config.txqueuelen().to_string());
    let up = |ns: &str, dev: &str, extra: &[&str]| {
        let mut args = vec!["link", "set", "dev", dev, "mtu", &mtu];
        args.extend_from_slice(extra);
        args.push("up");
        ip(ns, dev, args)
    };
    up(host, host_veth, &[])?;
    up(router, router_veth, &[])?;
    up(router, tun, &["txqueuelen", &txqueuelen])?;
    ip(
        host,
        host_veth,
        [
            "addr",
            "add",
            &host_addr,
            "peer",
            &router_addr,
            "dev",
            host_veth,
        ],
    )?;
    ip(
        router,
        router_veth,
        [
            "addr",
            "add",
            &router_addr,
            "peer",
            &host_addr,
            "dev",
            router_veth,
        ],
    )?;
    ip(
        host,
        host_veth,
        ["route", "add", &far, "via", &router_addr, "dev", host_veth],
    )?;
    ip(router, tun, ["route", "add", &far, "dev", tun])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_lowercase_alphanumerics() {
        assert!(validate_name("wan").is_ok());
        assert!(validate_name("a1b2c3d4e5").is_ok());
        for bad in ["", "a1b2c3d4e5f", "Wan", "w-an", "w_an", "wän", "w an"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let n = WanNames::new("a1b2c3d4e5").unwrap();
        assert_eq!(n.src_tun, "wm-a1b2c3d4e5-s");
        for (_, dev) in n.devices() {
            assert!(tun::validate_ifname(dev).is_ok(), "{dev}");
        }
        assert_eq!(n.dst_ns, "wanmig-a1b2c3d4e5-dst");
        assert_eq!(n.src_router_ns, "wanmig-a1b2c3d4e5-src-router");
        for ns in n.namespaces() {
            assert_eq!(WanNames::wan_of_namespace(ns), Some("a1b2c3d4e5"));
        }
        assert_eq!(WanNames::wan_of_namespace("wanmig-x1-dst"), Some("x1"));
        assert_eq!(
            WanNames::wan_of_namespace("wanmig-x1-dst-router"),
            Some("x1")
        );
        assert_eq!(WanNames::wan_of_namespace("wanmig-X-src"), None);
        assert_eq!(WanNames::wan_of_namespace("wanmig-x1-router"), None);
        assert_eq!(WanNames::wan_of_namespace("other"), None);
    }

    #[test]
    fn addresses_are_a_slash_29_in_the_base() {
        for name in ["wan", "a", "zz9", "test1", "test2"] {
            let a = address_plan(name);
            let s = u32::from(a.src);
            assert_eq!(s & 0xffff_0000, u32::from(ADDRESS_BASE));
            assert_eq!(s & 7, 1);
            assert_eq!(
                [a.dst, a.src_router, a.dst_router].map(u32::from),
                [s + 1, s + 2, s + 3]
            );
            assert_eq!(addresses(name), (a.src, a.dst));
        }
        assert_ne!(addresses("test1"), addresses("test2"));
    }

    #[test]
    fn errors_stay_small_enough_to_embed() {
        // Other error enums wrap these; clippy's result_large_err starts at 128.
        assert!(std::mem::size_of::<WanError>() <= 96);
        assert!(std::mem::size_of::<TeardownError>() <= 96);
        assert!(std::mem::size_of::<check::CheckError>() <= 96);
    }

    #[test]
    fn config_defaults_and_checks() {
        let c = WanConfig::new("wan", "40mbit".parse().unwrap(), Duration::from_millis(5));
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.queue, Duration::from_millis(20));
        assert_eq!(c.one_way(), Duration::from_micros(2500));
        assert!(c.validate().is_ok());
        assert!(c.delay_line().queue_limit >= 4096);
        let long = WanConfig::new("wan", "40mbit".parse().unwrap(), Duration::from_millis(50));
        assert_eq!(long.queue, Duration::from_millis(50));
        let bad = WanConfig {
            loss_ppm: 2_000_000,
            ..c.clone()
        };
        assert!(matches!(bad.validate(), Err(WanError::InvalidConfig(_))));
        let bad = WanConfig {
            name: "Bad".into(),
            ..c
        };
        assert!(matches!(bad.validate(), Err(WanError::InvalidName(_))));
    }
}
