//! Calibration: the round trip of the emulator itself, measured at zero delay.
//!
//! Even with no delay, a packet from one host to the other crosses two veths,
//! is forwarded by both routers, crosses two TUN devices and wakes the delay
//! line thread, and the answer does the same and wakes the sender; in this VM
//! that costs about 40–120 µs per round trip, 1–2 % of a 5 ms RTT.
//! [`Wan::up`] starts the delay line with no delay, measures the *smallest*
//! round trip of [`PROBES`] ICMP echoes sent by `ping` from the source
//! host's namespace ([`INTERVAL`] apart, so each starts from idle CPUs as sparse
//! traffic does), and then delays each direction by `(rtt - base_rtt) / 2`.
//!
//! The fastest exchange between the hosts (an echo the destination's
//! kernel answers without waking any process) then takes the set RTT, never
//! less; other exchanges see the setting plus only the part of the forwarding
//! cost that varies. `ping` runs as its own process, on whichever CPU the
//! scheduler picks, like the programs that will use the WAN: a probe thread
//! inside the delay line's process would share its CPU and measure a
//! best case (about 17 µs here) that no other program sees.
//!
//! [`Wan::up`]: super::Wan::up

use std::net::Ipv4Addr;
use std::time::Duration;

use super::check;
use super::cmd::{self, CommandError};
use super::netns;

/// Echoes sent.
pub const PROBES: u32 = 20;

/// Interval between echoes, as `ping -i` takes it (10 ms).
pub const INTERVAL: &str = "0.01";

/// Calibration failed.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// `ping` is not installed.
    #[error(transparent)]
    ToolMissing(CommandError),
    /// `ping` could not be run or printed no summary.
    #[error("calibration `{command}`: {message}")]
    Ping {
        /// The command line.
        command: String,
        /// What went wrong, with ping's output.
        message: String,
    },
    /// Too few echoes were answered: the WAN does not forward.
    #[error(
        "calibration: only {received} of {sent} echoes from {ns} to {dst} were answered: the WAN does not forward"
    )]
    NoReply {
        /// Namespace of the prober.
        ns: String,
        /// Address probed.
        dst: Ipv4Addr,
        /// Echoes sent.
        sent: u64,
        /// Replies received.
        received: u64,
    },
}

/// The smallest round trip of [`PROBES`] echoes from namespace `ns` to `dst`
/// (`ping -c 20 -i 0.01 -q`; about 0.2 s).
pub fn base_rtt(ns: &str, dst: Ipv4Addr) -> Result<Duration, CalibrationError> {
    let ping = cmd::find_tool("ping").map_err(CalibrationError::ToolMissing)?;
    let mut command = netns::command(ns, ping);
    command.args([
        "-c",
        &PROBES.to_string(),
        "-i",
        INTERVAL,
        "-q",
        "-W",
        "1",
        &dst.to_string(),
    ]);
    let line = cmd::display(&command);
    let output = command.output().map_err(|e| CalibrationError::Ping {
        command: line.clone(),
        message: e.to_string(),
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(result) = check::parse_ping(&text) else {
        return Err(CalibrationError::Ping {
            command: line,
            message: format!(
                "no RTT summary in its output: {} {}",
                text.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    };
    if result.received < u64::from(PROBES) / 2 {
        return Err(CalibrationError::NoReply {
            ns: ns.into(),
            dst,
            sent: result.sent,
            received: result.received,
        });
    }
    Ok(Duration::from_secs_f64(result.min_ms / 1e3))
}
