//! Measuring a WAN against its settings with the standard tools: `iperf3` for
//! the rate (TCP goodput from the source to the destination namespace) and
//! `ping` for the round-trip time.
//!
//! Targets (issue 2): iperf3 reaches at least [`RATE_TARGET`] of the set rate
//! (TCP/IP headers cost about 3.5 % at MTU 1500, see [`super::tc`]), and ping's
//! average RTT is within [`RTT_TOLERANCE`] of the setting. Ping runs first, on
//! the idle link, so it measures the delay line and not a queue.
//!
//! Every child runs with `PR_SET_PDEATHSIG = SIGKILL`, so it cannot outlive this
//! process if it is killed or exits on a signal.

use std::io::{self, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cmd::{self, CommandError};
use super::netns::{self, NetnsError};
use super::{Wan, WanConfig};

/// iperf3 must reach this fraction of the set rate.
pub const RATE_TARGET: f64 = 0.94;

/// Ping's average RTT must be within this relative error of the setting.
pub const RTT_TOLERANCE: f64 = 0.05;

/// With a zero RTT setting the relative error is undefined; the average must
/// then stay below this (milliseconds).
pub const ZERO_RTT_LIMIT_MS: f64 = 0.5;

/// Interval between pings.
pub const PING_INTERVAL: &str = "0.05";

/// How long to wait for `iperf3 -s` to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// `iperf3` or `ping` is not installed.
    #[error(transparent)]
    ToolMissing(CommandError),
    /// A tool could not be started.
    #[error("cannot start `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The error.
        source: io::Error,
    },
    /// A tool failed.
    #[error(transparent)]
    Failed(CommandError),
    /// Working in a namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The iperf3 server never listened.
    #[error(
        "iperf3 server in {ns} did not listen on {addr}:{port} within {LISTEN_TIMEOUT:?}: {stderr}"
    )]
    ServerNotListening {
        /// Namespace.
        ns: String,
        /// Address.
        addr: Ipv4Addr,
        /// Port.
        port: u16,
        /// What the server printed.
        stderr: String,
    },
    /// iperf3 printed no usable JSON or reported an error.
    #[error("`{command}`: {message}")]
    Iperf3 {
        /// The command line.
        command: String,
        /// What was wrong.
        message: String,
    },
    /// ping printed no RTT summary (all packets lost?).
    #[error("`{command}`: no RTT summary in its output: {output}")]
    Ping {
        /// The command line.
        command: String,
        /// Its output.
        output: String,
    },
}

/// An iperf3 run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Iperf3Result {
    /// Goodput at the receiver (`end.sum_received.bits_per_second`), Mbit/s.
    pub mbps: f64,
    /// TCP retransmissions reported by the sender.
    pub retransmits: Option<u64>,
    /// Test length, seconds.
    pub seconds: f64,
}

/// A ping run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PingResult {
    /// Echo requests sent.
    pub sent: u64,
    /// Replies received.
    pub received: u64,
    /// Smallest RTT, ms.
    pub min_ms: f64,
    /// Average RTT, ms.
    pub avg_ms: f64,
    /// Largest RTT, ms.
    pub max_ms: f64,
    /// Mean deviation, ms.
    pub mdev_ms: f64,
}

/// A WAN measured against its settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WanMeasurement {
    /// WAN name.
    pub name: String,
    /// The set rate, Mbit/s.
    pub rate_mbps: f64,
    /// The set RTT, ms.
    pub rtt_ms: f64,
    /// iperf3 goodput, Mbit/s.
    pub iperf3_mbps: f64,
    /// iperf3 sender retransmissions.
    pub iperf3_retransmits: Option<u64>,
    /// iperf3 test length, seconds.
    pub iperf3_seconds: f64,
    /// `iperf3_mbps / rate_mbps`.
    pub rate_ratio: f64,
    /// Ping's average RTT, ms.
    pub rtt_ms_avg: f64,
    /// Ping's minimum RTT, ms.
    pub rtt_ms_min: f64,
    /// Ping's maximum RTT, ms.
    pub rtt_ms_max: f64,
    /// Ping's mean deviation, ms.
    pub rtt_ms_mdev: f64,
    /// Pings sent.
    pub ping_sent: u64,
    /// Pings answered.
    pub ping_received: u64,
    /// `(rtt_ms_avg - rtt_ms) / rtt_ms` (0 when the setting is 0).
    pub rtt_error: f64,
    /// [`RATE_TARGET`].
    pub rate_target: f64,
    /// [`RTT_TOLERANCE`].
    pub rtt_tolerance: f64,
    /// `rate_ratio >= rate_target`.
    pub rate_pass: bool,
    /// `|rtt_error| <= rtt_tolerance` (with a zero setting: average below
    /// [`ZERO_RTT_LIMIT_MS`]).
    pub rtt_pass: bool,
}

impl WanMeasurement {
    /// Combines the runs and judges them against `config`.
    pub fn judge(config: &WanConfig, iperf3: &Iperf3Result, ping: &PingResult) -> WanMeasurement {
        let rate_mbps = config.rate.mbit();
        let rtt_ms = config.rtt.as_secs_f64() * 1e3;
        let rate_ratio = iperf3.mbps / rate_mbps;
        let (rtt_error, rtt_pass) = if rtt_ms > 0.0 {
            let e = (ping.avg_ms - rtt_ms) / rtt_ms;
            (e, e.abs() <= RTT_TOLERANCE)
        } else {
            (0.0, ping.avg_ms <= ZERO_RTT_LIMIT_MS)
        };
        WanMeasurement {
            name: config.name.clone(),
            rate_mbps,
            rtt_ms,
            iperf3_mbps: iperf3.mbps,
            iperf3_retransmits: iperf3.retransmits,
            iperf3_seconds: iperf3.seconds,
            rate_ratio,
            rtt_ms_avg: ping.avg_ms,
            rtt_ms_min: ping.min_ms,
            rtt_ms_max: ping.max_ms,
            rtt_ms_mdev: ping.mdev_ms,
            ping_sent: ping.sent,
            ping_received: ping.received,
            rtt_error,
            rate_target: RATE_TARGET,
            rtt_tolerance: RTT_TOLERANCE,
            rate_pass: rate_ratio >= RATE_TARGET,
            rtt_pass: rtt_pass && ping.received > 0,
        }
    }

    /// Both targets met.
    pub fn pass(&self) -> bool {
        self.rate_pass && self.rtt_pass
    }
}

/// Measures `wan`: ping for about half of `duration` (at least 20 pings, one
/// every 50 ms), then an iperf3 TCP test of `duration` (whole seconds, at least
/// 1) from the source to the destination namespace.
pub fn measure(wan: &Wan, duration: Duration) -> Result<WanMeasurement, CheckError> {
    let count = ((duration.as_secs_f64() * 10.0) as u32).max(20);
    let ping = ping_rtt(wan, count)?;
    let iperf3 = iperf3_throughput(wan, duration, None)?;
    Ok(WanMeasurement::judge(wan.config(), &iperf3, &ping))
}

/// A child that is killed if it is still running when this is dropped.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// `tool` inside namespace `ns`, with SIGKILL on our death.
fn tool_in(ns: &str, tool: &str) -> Result<Command, CheckError> {
    let path = cmd::find_tool(tool).map_err(CheckError::ToolMissing)?;
    let mut command = netns::command(ns, path);
    // SAFETY: runs in the child between fork and exec; prctl is
    // async-signal-safe and takes only integers.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    Ok(command)
}

fn spawn(command: &mut Command) -> Result<Reaper, CheckError> {
    command
        .spawn()
        .map(Reaper)
        .map_err(|source| CheckError::Spawn {
            command: cmd::display(command),
            source,
        })
}

/// A free TCP port on `addr` in namespace `ns`.
fn free_port(ns: &str, addr: Ipv4Addr) -> Result<u16, CheckError> {
    let port = netns::run_in(ns, move || {
        TcpListener::bind((addr, 0)).and_then(|l| l.local_addr().map(|a| a.port()))
    })?;
    port.map_err(|source| CheckError::Spawn {
        command: format!("bind {addr}:0 in {ns}"),
        source,
    })
}

/// Whether process `pid` (in its own namespace) has a TCP socket listening on
/// `addr:port`, from `/proc/<pid>/net/tcp`.
fn listens(pid: u32, addr: Ipv4Addr, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    // /proc shows the address as the in-memory (little-endian here) u32 in hex.
    let want = format!("{:08X}:{:04X}", u32::from_ne_bytes(addr.octets()), port);
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace();
        let local = f.nth(1);
        let state = f.nth(1);
        local == Some(want.as_str()) && state == Some("0A")
    })
}

/// Runs iperf3 over `wan` for `duration` (whole seconds, at least 1): a
/// one-shot server (`iperf3 -s -1`) in the destination namespace, the client
/// (`iperf3 -c <dst> -t N -J`) in the source namespace. Returns the goodput the
/// receiver saw. `congestion`: the client's congestion control (`-C`;
/// `None`: the namespace's default).
pub fn iperf3_throughput(
    wan: &Wan,
    duration: Duration,
    congestion: Option<&str>,
) -> Result<Iperf3Result, CheckError> {
    iperf3_between(
        wan.src_ns(),
        wan.dst_ns(),
        wan.dst_addr(),
        duration,
        congestion,
    )
}

/// [`iperf3_throughput`] between any two namespaces (or one, over its
/// loopback): the server on `dst` in `dst_ns`, the client in `src_ns`.
pub fn iperf3_between(
    src_ns: &str,
    dst_ns: &str,
    dst: Ipv4Addr,
    duration: Duration,
    congestion: Option<&str>,
) -> Result<Iperf3Result, CheckError> {
    let seconds = duration.as_secs_f64().round().max(1.0) as u64;
    let port = free_port(dst_ns, dst)?;
    let mut server_cmd = tool_in(dst_ns, "iperf3")?;
    server_cmd
        .args(["-s", "-1", "-B", &dst.to_string(), "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut server = spawn(&mut server_cmd)?;
    let started = Instant::now();
    while !listens(server.0.id(), dst, port) {
        let exited = matches!(server.0.try_wait(), Ok(Some(_)));
        if exited || started.elapsed() > LISTEN_TIMEOUT {
            let _ = server.0.kill();
            let mut stderr = String::new();
            if let Some(mut e) = server.0.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            return Err(CheckError::ServerNotListening {
                ns: dst_ns.into(),
                addr: dst,
                port,
                stderr: stderr.trim().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut client = tool_in(src_ns, "iperf3")?;
    client.args([
        "-c",
        &dst.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]);
    if let Some(cc) = congestion {
        client.args(["-C", cc]);
    }
    let command = cmd::display(&client);
    let output = client.output().map_err(|source| CheckError::Spawn {
        command: command.clone(),
        source,
    })?;
    // The one-shot server exits after the test; the reaper collects it.
    drop(server);
    parse_iperf3_json(&String::from_utf8_lossy(&output.stdout)).map_err(|message| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        CheckError::Iperf3 {
            command,
            message: if stderr.trim().is_empty() {
                message
            } else {
                format!("{message}; stderr: {}", stderr.trim())
            },
        }
    })
}

/// Extracts the receiver's goodput from `iperf3 -J` output.
pub fn parse_iperf3_json(text: &str) -> Result<Iperf3Result, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("no JSON in iperf3 output ({e})"))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3 reported: {err}"));
    }
    let received = &v["end"]["sum_received"];
    let bps = received["bits_per_second"]
        .as_f64()
        .ok_or("no end.sum_received.bits_per_second in iperf3 output")?;
    Ok(Iperf3Result {
        mbps: bps / 1e6,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64(),
        seconds: received["seconds"].as_f64().unwrap_or(0.0),
    })
}

/// Pings the destination from the source namespace `count` times, one every
/// 50 ms (`ping -c N -i 0.05 -q`).
pub fn ping_rtt(wan: &Wan, count: u32) -> Result<PingResult, CheckError> {
    let mut ping = tool_in(wan.src_ns(), "ping")?;
    ping.args([
        "-c",
        &count.to_string(),
        "-i",
        PING_INTERVAL,
        "-q",
        "-W",
        "2",
        &wan.dst_addr().to_string(),
    ]);
    let command = cmd::display(&ping);
    let output = ping.output().map_err(|source| CheckError::Spawn {
        command: command.clone(),
        source,
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_ping(&text).ok_or_else(|| CheckError::Ping {
        command,
        output: format!(
            "{}{}",
            text.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    })
}

/// Parses ping's summary: `N packets transmitted, M received, …` and
/// `rtt min/avg/max/mdev = a/b/c/d ms`.
pub fn parse_ping(text: &str) -> Option<PingResult> {
    let mut sent = None;
    let mut received = None;
    let mut rtt = None;
    for line in text.lines() {
        if line.contains("packets transmitted") {
            let mut numbers = line
                .split(',')
                .filter_map(|part| part.split_whitespace().next()?.parse::<u64>().ok());
            sent = numbers.next();
            received = numbers.next();
        } else if line.contains("min/avg/max") {
            let values = line.split('=').nth(1)?.split_whitespace().next()?;
            let v: Vec<f64> = values.split('/').filter_map(|x| x.parse().ok()).collect();
            if v.len() >= 3 {
                rtt = Some(v);
            }
        }
    }
    let rtt = rtt?;
    Some(PingResult {
        sent: sent?,
        received: received?,
        min_ms: rtt[0],
        avg_ms: rtt[1],
        max_ms: rtt[2],
        mdev_ms: rtt.get(3).copied().unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_ping_summary() {
        let text = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\n\
            --- 10.0.0.2 ping statistics ---\n\
            40 packets transmitted, 39 received, 2.5% packet loss, time 1982ms\n\
            rtt min/avg/max/mdev = 5.041/5.112/5.402/0.061 ms\n";
        let p = parse_ping(text).unwrap();
        assert_eq!((p.sent, p.received), (40, 39));
        assert_eq!(
            (p.min_ms, p.avg_ms, p.max_ms, p.mdev_ms),
            (5.041, 5.112, 5.402, 0.061)
        );
        let lost = "3 packets transmitted, 0 received, 100% packet loss, time 2ms\n";
        assert!(parse_ping(lost).is_none());
    }

    #[test]
    fn parses_iperf3_json() {
        let text = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"seconds":10.0,"bits_per_second":38500000.0,"retransmits":12},
            "sum_received":{"seconds":10.004,"bits_per_second":38200000.0}}}"#;
        let r = parse_iperf3_json(text).unwrap();
        assert_eq!(r.mbps, 38.2);
        assert_eq!(r.retransmits, Some(12));
        let err = parse_iperf3_json(r#"{"error":"unable to connect"}"#).unwrap_err();
        assert!(err.contains("unable to connect"));
        assert!(parse_iperf3_json("garbage").is_err());
    }

    #[test]
    fn judges_against_targets() {
        let config = WanConfig::new("x", "40mbit".parse().unwrap(), Duration::from_millis(5));
        let iperf = Iperf3Result {
            mbps: 38.0,
            retransmits: None,
            seconds: 10.0,
        };
        let ping = PingResult {
            sent: 20,
            received: 20,
            min_ms: 5.0,
            avg_ms: 5.2,
            max_ms: 5.5,
            mdev_ms: 0.1,
        };
        let m = WanMeasurement::judge(&config, &iperf, &ping);
        assert!(m.rate_pass && m.rtt_pass && m.pass());
        assert!((m.rtt_error - 0.04).abs() < 1e-9);
        let slow = Iperf3Result {
            mbps: 37.0,
            ..iperf
        };
        let late = PingResult {
            avg_ms: 5.3,
            ..ping
        };
        let m = WanMeasurement::judge(&config, &slow, &late);
        assert!(!m.rate_pass && !m.rtt_pass);
    }

    #[test]
    fn reads_listening_sockets_from_proc() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listens(std::process::id(), Ipv4Addr::LOCALHOST, port));
        drop(l);
        // The table is the network namespace's: another process (a test
        // running beside this one) may listen on the freed port by now, and
        // stop again between two looks. Whatever /proc says must match
        // whether a connection is accepted there, in a moment when the port
        // holds still (the same answer from /proc before and after).
        let settled = (0..20).any(|_| {
            let before = listens(std::process::id(), Ipv4Addr::LOCALHOST, port);
            let accepted = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok();
            let after = listens(std::process::id(), Ipv4Addr::LOCALHOST, port);
            before == after && before == accepted
        });
        assert!(settled, "port {port}: /proc and connect(2) never agreed");
    }
}
