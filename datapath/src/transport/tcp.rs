//! TCP socket knobs the transport needs: queue depth (`SIOCOUTQ`), the
//! kernel's own transfer statistics (`TCP_INFO`), and per-connection tuning.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use zerocopy::{FromBytes, Immutable, KnownLayout};

/// The leading part of the kernel's `struct tcp_info` (`linux/tcp.h`), up to
/// `tcpi_bytes_retrans`. The kernel copies `min(optlen, its size)` bytes, so a
/// prefix is a stable ABI; offsets are checked below against the header.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, Immutable, KnownLayout)]
pub struct TcpInfo {
    /// `TCP_ESTABLISHED` = 1, ...
    pub state: u8,
    /// Congestion-avoidance state.
    pub ca_state: u8,
    /// Retransmits of the current segment.
    pub retransmits: u8,
    /// Zero-window probes.
    pub probes: u8,
    /// Back-off.
    pub backoff: u8,
    /// `TCPI_OPT_*` bits.
    pub options: u8,
    /// Send (low nibble) and receive (high nibble) window scale.
    pub wscale: u8,
    /// Bit 0: the last delivery-rate sample was application limited.
    pub app_limited_bits: u8,
    /// Retransmission timeout, us.
    pub rto: u32,
    /// Delayed-ACK timeout, us.
    pub ato: u32,
    /// Sender MSS.
    pub snd_mss: u32,
    /// Receiver MSS.
    pub rcv_mss: u32,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// SACKed segments.
    pub sacked: u32,
    /// Segments considered lost.
    pub lost: u32,
    /// Segments being retransmitted.
    pub retrans: u32,
    /// Unused (always 0).
    pub fackets: u32,
    /// ms since the last data sent.
    pub last_data_sent: u32,
    /// ms since the last ACK sent.
    pub last_ack_sent: u32,
    /// ms since the last data received.
    pub last_data_recv: u32,
    /// ms since the last ACK received.
    pub last_ack_recv: u32,
    /// Path MTU.
    pub pmtu: u32,
    /// Receive slow-start threshold.
    pub rcv_ssthresh: u32,
    /// Smoothed RTT, us.
    pub rtt: u32,
    /// RTT variance, us.
    pub rttvar: u32,
    /// Send slow-start threshold.
    pub snd_ssthresh: u32,
    /// Congestion window, segments.
    pub snd_cwnd: u32,
    /// Advertised MSS.
    pub advmss: u32,
    /// Reordering metric.
    pub reordering: u32,
    /// Receiver-side RTT estimate, us.
    pub rcv_rtt: u32,
    /// Receive space.
    pub rcv_space: u32,
    /// Total retransmitted segments.
    pub total_retrans: u32,
    /// Current pacing rate, bytes/s.
    pub pacing_rate: u64,
    /// `SO_MAX_PACING_RATE`, bytes/s.
    pub max_pacing_rate: u64,
    /// Bytes acknowledged by the peer.
    pub bytes_acked: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Segments sent.
    pub segs_out: u32,
    /// Segments received.
    pub segs_in: u32,
    /// Bytes queued and not yet sent.
    pub notsent_bytes: u32,
    /// Minimum RTT seen on the connection, us.
    pub min_rtt: u32,
    /// Data segments received.
    pub data_segs_in: u32,
    /// Data segments sent.
    pub data_segs_out: u32,
    /// Latest delivery-rate sample, bytes/s.
    pub delivery_rate: u64,
    /// Time busy sending, us.
    pub busy_time: u64,
    /// Time limited by the receive window, us.
    pub rwnd_limited: u64,
    /// Time limited by the send buffer, us.
    pub sndbuf_limited: u64,
    /// Segments delivered.
    pub delivered: u32,
    /// Segments delivered with an ECN CE mark.
    pub delivered_ce: u32,
    /// Bytes sent including retransmissions.
    pub bytes_sent: u64,
    /// Bytes retransmitted.
    pub bytes_retrans: u64,
}

const _: () = {
    assert!(std::mem::offset_of!(TcpInfo, rto) == 8);
    assert!(std::mem::offset_of!(TcpInfo, rtt) == 68);
    assert!(std::mem::offset_of!(TcpInfo, snd_cwnd) == 80);
    assert!(std::mem::offset_of!(TcpInfo, pacing_rate) == 104);
    assert!(std::mem::offset_of!(TcpInfo, bytes_acked) == 120);
    assert!(std::mem::offset_of!(TcpInfo, notsent_bytes) == 144);
    assert!(std::mem::offset_of!(TcpInfo, min_rtt) == 148);
    assert!(std::mem::offset_of!(TcpInfo, delivery_rate) == 160);
    assert!(std::mem::offset_of!(TcpInfo, bytes_sent) == 200);
    assert!(std::mem::size_of::<TcpInfo>() == 216);
};

impl TcpInfo {
    /// Whether the latest delivery-rate sample was limited by the application
    /// (then it under-states the path's bandwidth).
    pub fn delivery_rate_app_limited(&self) -> bool {
        self.app_limited_bits & 1 != 0
    }
}

/// Reads socket option `name` at `level` into `out`; returns the length
/// the kernel wrote.
fn getsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    out: &mut [u8],
) -> io::Result<usize> {
    let mut len = out.len() as libc::socklen_t;
    // SAFETY: `out` is a writable buffer of `len` bytes that outlives the
    // call; the kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            out.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((len as usize).min(out.len()))
}

/// Sets socket option `name` at `level` to the bytes of `value`.
fn setsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live byte slice and its exact length;
    // the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads `TCP_INFO` for a TCP socket.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    let mut raw = [0u8; std::mem::size_of::<TcpInfo>()];
    getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut raw)?;
    // Older kernels return a shorter struct; the missing tail stays zero.
    Ok(TcpInfo::read_from_bytes(&raw).unwrap_or_default())
}

/// Bytes in the socket's send queue that the peer has not acknowledged yet
/// (`SIOCOUTQ`: unsent plus in flight).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ) writes one `int` through the pointer,
    // which points at a live local.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Caps the kernel's pacing of the socket (`SO_MAX_PACING_RATE`, bytes/s;
/// `None` removes the cap). TCP paces itself at this rate with any
/// congestion control (no `fq` qdisc needed).
pub fn set_max_pacing_rate(fd: BorrowedFd<'_>, rate: Option<u64>) -> io::Result<()> {
    // The kernel takes a 64-bit rate when the option is 8 bytes long.
    let v: u64 = rate.unwrap_or(u64::MAX);
    setsockopt_bytes(
        fd,
        libc::SOL_SOCKET,
        libc::SO_MAX_PACING_RATE,
        &v.to_ne_bytes(),
    )
}

/// A congestion-control algorithm for the migration's connections
/// (`TCP_CONGESTION`; unset, the host's default applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// BBR (this kernel's default).
    Bbr,
    /// CUBIC (what many WAN paths still run).
    Cubic,
}

impl Congestion {
    /// The kernel's name.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
        }
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            other => Err(format!(
                "unknown congestion control {other:?} (bbr or cubic)"
            )),
        }
    }
}

/// Sets the socket's congestion control. A root process may pick any
/// algorithm the kernel has (`tcp_available_congestion_control`), others
/// only the allowed ones.
pub fn set_congestion(fd: BorrowedFd<'_>, cc: Congestion) -> io::Result<()> {
    setsockopt_bytes(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_CONGESTION,
        cc.name().as_bytes(),
    )
}

/// The socket's congestion control, by the kernel's name.
pub fn congestion(fd: BorrowedFd<'_>) -> io::Result<String> {
    let mut name = [0u8; 16];
    let len = getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, &mut name)?;
    let name = &name[..len];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// How a connection is used, which decides its socket options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRole {
    /// Large, paced transfers: Nagle off too (frames are batched by the
    /// sender itself), big buffers left to autotuning.
    Bulk,
    /// Small, latency-critical request/response: Nagle off, quick ACKs.
    Fault,
}

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Unanswered probes before the connection is declared dead.
pub const KEEPALIVE_COUNT: u32 = 5;
/// Longest time sent data may stay unacknowledged before the connection is
/// declared dead (`TCP_USER_TIMEOUT`).
pub const USER_TIMEOUT: Duration = Duration::from_secs(20);

/// Applies the per-role socket options, and on every connection the
/// liveness limits: keepalive probes after [`KEEPALIVE_IDLE`] of silence
/// (every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_COUNT`] of them) and
/// [`USER_TIMEOUT`] for unacknowledged data, so that a peer host that
/// vanishes ends a blocked send or receive with an error (`ETIMEDOUT`)
/// instead of leaving it blocked forever.
pub fn tune(sock: &TcpStream, role: ConnRole) -> io::Result<()> {
    sock.set_nodelay(true)?;
    if role == ConnRole::Fault {
        set_int(sock, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1)?;
    }
    set_int(sock, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_int(
        sock,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        KEEPALIVE_IDLE.as_secs() as libc::c_int,
    )?;
    set_int(
        sock,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        KEEPALIVE_INTERVAL.as_secs() as libc::c_int,
    )?;
    set_int(
        sock,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        KEEPALIVE_COUNT as libc::c_int,
    )?;
    set_int(
        sock,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        USER_TIMEOUT.as_millis() as libc::c_int,
    )?;
    Ok(())
}

/// Reads an integer socket option.
pub fn get_int(sock: &TcpStream, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v = [0u8; std::mem::size_of::<libc::c_int>()];
    getsockopt_bytes(sock.as_fd(), level, name, &mut v)?;
    Ok(libc::c_int::from_ne_bytes(v))
}

fn set_int(
    sock: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    setsockopt_bytes(sock.as_fd(), level, name, &v.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::fd::AsFd;

    #[test]
    fn tcp_info_and_outq_track_a_real_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let info = tcp_info(c.as_fd()).unwrap();
        assert_eq!(info.state, 1, "established");
        assert!(info.snd_mss > 0);
        c.write_all(&[7u8; 100_000]).unwrap();
        let mut got = vec![0u8; 100_000];
        s.read_exact(&mut got).unwrap();
        // Once the peer has read everything, acknowledgements drain the queue.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while outq(c.as_fd()).unwrap() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "send queue never drained"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let info = tcp_info(c.as_fd()).unwrap();
        assert!(info.bytes_acked >= 100_000, "acked {}", info.bytes_acked);
        tune(&c, ConnRole::Fault).unwrap();
        assert!(c.nodelay().unwrap());
        set_max_pacing_rate(c.as_fd(), Some(5_000_000)).unwrap();
        assert_eq!(tcp_info(c.as_fd()).unwrap().max_pacing_rate, 5_000_000);
        set_max_pacing_rate(c.as_fd(), None).unwrap();
        assert_eq!(tcp_info(c.as_fd()).unwrap().max_pacing_rate, u64::MAX);
        for cc in [Congestion::Cubic, Congestion::Bbr] {
            set_congestion(c.as_fd(), cc).unwrap();
            assert_eq!(congestion(c.as_fd()).unwrap(), cc.name());
        }
        assert!("vegas".parse::<Congestion>().is_err());
    }

    #[test]
    fn tuned_connections_have_keepalive_and_a_user_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let opt = |sock: &TcpStream, level, name| get_int(sock, level, name).unwrap();
        assert_eq!(opt(&c, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        assert_eq!(opt(&c, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 0);
        for (sock, role) in [(&c, ConnRole::Bulk), (&s, ConnRole::Fault)] {
            tune(sock, role).unwrap();
            assert_eq!(opt(sock, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
            assert_eq!(opt(sock, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 5);
            assert_eq!(opt(sock, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 2);
            assert_eq!(opt(sock, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 5);
            assert_eq!(opt(sock, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 20_000);
        }
    }

    #[test]
    fn tcp_info_on_a_non_tcp_socket_is_an_error() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(tcp_info(a.as_fd()).is_err());
    }
}
