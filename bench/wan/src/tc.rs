//! The rate limit and the bottleneck queue: a token bucket filter (`tbf`) as
//! the root qdisc of each router's TUN device. A TUN device's egress is what the
//! delay line reads, so the tbf on the source router's TUN limits source →
//! destination and the one on the destination router's TUN limits the way back.
//!
//! The tbf is in a router's namespace, not a host's, so that it behaves like a
//! real bottleneck router's buffer: the packets in it were forwarded from
//! another namespace and no longer belong to the sending socket, so TCP Small
//! Queues (which bounds a socket's bytes in its own host's qdiscs to about
//! 1 ms of its pacing rate) does not keep a bulk flow from filling it (see the
//! [module docs](super)).
//!
//! On a TUN device the qdisc sees bare IP packets (no link-layer header), so the
//! rate counts IP bytes: TCP goodput over it is at most
//! `(mtu - 52) / mtu` of the rate (96.5 % at MTU 1500 with TCP timestamps).
//!
//! # Parameters
//! - `rate`: the link rate.
//! - `burst` (bucket size, bytes) = `max(rate × BURST_TIME, BURST_MIN_PACKETS × mtu)`.
//!   The qdisc is woken by a timer; every microsecond a wake-up is late, the
//!   link is idle unless the bucket holds enough tokens to cover the delay. With
//!   `BURST_TIME` of timer/softirq latency covered, the set rate is reached at
//!   40 Mbit/s and at 1 Gbit/s alike (at 1 Gbit/s one MTU is only 12 µs of
//!   tokens). The floor of a few MTUs keeps slow links from stalling on a
//!   bucket smaller than a packet (tbf drops packets bigger than its bucket).
//! - `limit` (queue, bytes) = `rate × queue + burst`, i.e. what `tc`'s
//!   `latency` option would compute: the worst queueing delay a packet sees is
//!   `queue`. It is a drop-tail queue: a loss-based bulk flow keeps it between
//!   about 70 % and 100 % full, which every other flow in that direction waits
//!   through.
//!
//! A host's TCP hands its veth GSO super-packets of up to 64 KiB, and the
//! router forwards them whole. tbf splits one into MTU packets on arrival only
//! if it is larger than the bucket (`burst`), which holds at rates below about
//! 260 Mbit/s (burst < 64 KiB); above that, the queue takes and drops whole
//! super-packets, so a full queue loses up to ~44 consecutive packets at once
//! where a real router would lose one. TCP's SACK recovery handles it (1 Gbit/s,
//! cubic, 20 ms queue: 5 such drops and 2 recoveries in 32 s, 958–961 Mbit/s),
//! but the loss pattern is burstier than a real router's.

use std::time::Duration;

use wanmig_planner::units::Rate;

use super::cmd::{self, CommandError};

/// Timer latency that `burst` covers at full rate.
pub const BURST_TIME: Duration = Duration::from_millis(2);

/// Minimum `burst`, in packets of the link MTU.
pub const BURST_MIN_PACKETS: u64 = 8;

/// Setting up the rate limit failed.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    /// The `tc` command failed (its command line and stderr are inside).
    #[error("setting tbf on {dev} in namespace {ns}")]
    Tbf {
        /// Namespace.
        ns: String,
        /// Device.
        dev: String,
        /// The failed `tc` run.
        source: CommandError,
    },
}

/// The parameters of one tbf qdisc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TbfParams {
    /// Token rate.
    pub rate: Rate,
    /// Bucket size in bytes.
    pub burst_bytes: u64,
    /// Queue limit in bytes.
    pub limit_bytes: u64,
}

impl TbfParams {
    /// The parameters for a link of `rate` and `mtu` whose queue holds `queue`
    /// worth of data at the full rate (see the module docs for the formulas).
    pub fn for_link(rate: Rate, mtu: u32, queue: Duration) -> TbfParams {
        let burst_bytes = burst_bytes(rate, mtu);
        let queue_bytes = (rate.bytes_per_second() * queue.as_secs_f64()).ceil() as u64;
        TbfParams {
            rate,
            burst_bytes,
            limit_bytes: queue_bytes + burst_bytes,
        }
    }

    /// The `tc` arguments after `root`: `tbf rate R burst B limit L`.
    pub fn tc_args(&self) -> Vec<String> {
        vec![
            "tbf".into(),
            "rate".into(),
            format!("{}bit", self.rate.bits_per_second()),
            "burst".into(),
            self.burst_bytes.to_string(),
            "limit".into(),
            self.limit_bytes.to_string(),
        ]
    }
}

/// `burst = max(rate × BURST_TIME, BURST_MIN_PACKETS × mtu)` in bytes.
pub fn burst_bytes(rate: Rate, mtu: u32) -> u64 {
    let timer = (rate.bytes_per_second() * BURST_TIME.as_secs_f64()).ceil() as u64;
    timer.max(BURST_MIN_PACKETS * u64::from(mtu))
}

/// Installs (or replaces) the tbf as root qdisc of `dev` in namespace `ns`.
pub fn apply_tbf(ns: &str, dev: &str, params: &TbfParams) -> Result<(), TcError> {
    let mut args: Vec<String> = ["-n", ns, "qdisc", "replace", "dev", dev, "root"]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(params.tc_args());
    cmd::run("tc", &args).map_err(|source| TcError::Tbf {
        ns: ns.into(),
        dev: dev.into(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    #[test]
    fn burst_covers_timer_latency_and_a_few_packets() {
        // 40 Mbit/s: 2 ms is 10 kB, less than 8 packets.
        assert_eq!(burst_bytes(rate("40mbit"), 1500), 12_000);
        // 1 Gbit/s: 2 ms of tokens.
        assert_eq!(burst_bytes(rate("1gbit"), 1500), 250_000);
        let p = TbfParams::for_link(rate("40mbit"), 1500, Duration::from_millis(20));
        assert_eq!(p.limit_bytes, 100_000 + 12_000);
        assert_eq!(
            p.tc_args().join(" "),
            "tbf rate 40000000bit burst 12000 limit 112000"
        );
    }
}
