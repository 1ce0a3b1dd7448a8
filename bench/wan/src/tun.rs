//! TUN devices: one in each router namespace, the two ends of the delay line.
//!
//! A device is created with `TUNSETIFF` (`IFF_TUN | IFF_NO_PI`: raw IP packets,
//! no packet-information header) by a helper thread that has first `setns`ed
//! into the target namespace, so the device is born there.
//!
//! Both placements were tried on this kernel (6.18) and both work: creating the
//! device in the root namespace and then moving it with
//! `ip link set dev X netns NS` keeps the file descriptor attached (packets routed
//! into the moved device are read from the fd). Creating it in place was chosen
//! because the device never exists in the root namespace, so names of parallel
//! WANs cannot clash there and a crash between "create" and "move" cannot leave
//! a stray device behind.
//!
//! The devices are not persistent: when the last fd closes (the delay line stops
//! or its process dies) the kernel deletes them, with their addresses and qdiscs.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::netns::{self, NetnsError};

/// The TUN clone device.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// The longest interface name the kernel accepts (`IFNAMSIZ - 1`).
pub const MAX_IFNAME: usize = libc::IFNAMSIZ - 1;

/// Creating a TUN device failed.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The interface name is empty, too long or has a byte the kernel refuses.
    #[error(
        "invalid interface name {name:?}: must be 1..={MAX_IFNAME} bytes without '/', ':', whitespace or NUL"
    )]
    InvalidName {
        /// The name asked for.
        name: String,
    },
    /// `/dev/net/tun` is missing.
    #[error(
        "{TUN_DEVICE} is missing: this kernel has no TUN support loaded (try `modprobe tun`; run scripts/setup)"
    )]
    DeviceMissing,
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_DEVICE}")]
    Open {
        /// The error.
        source: io::Error,
    },
    /// The `TUNSETIFF` ioctl failed (name in use, not root, ...).
    #[error("TUNSETIFF {name:?} in namespace {ns:?} failed")]
    SetIff {
        /// Interface name.
        name: String,
        /// Namespace it was created in.
        ns: String,
        /// The ioctl error.
        source: io::Error,
    },
    /// Entering the namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// An open TUN device: the fd carries raw IP packets (`IFF_NO_PI`) and is in
/// non-blocking mode.
#[derive(Debug)]
pub struct Tun {
    name: String,
    ns: String,
    file: File,
}

impl Tun {
    /// Creates TUN device `name` inside network namespace `ns`.
    ///
    /// IPv6 is switched off on the device so that the kernel sends no router
    /// solicitations or MLD reports through the WAN: the delay line then carries
    /// only the traffic of the programs under test, and its counters are exact.
    pub fn create_in(ns: &str, name: &str) -> Result<Tun, TunError> {
        validate_ifname(name)?;
        let (ns_owned, name_owned) = (ns.to_string(), name.to_string());
        netns::run_in(ns, move || create_here(&ns_owned, &name_owned))?
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace the device lives in.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The packet file (non-blocking; one `read` returns one packet).
    pub fn into_file(self) -> File {
        self.file
    }
}

/// Checks an interface name the way the kernel will.
pub fn validate_ifname(name: &str) -> Result<(), TunError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(TunError::InvalidName { name: name.into() })
    }
}

/// Creates the device in the calling thread's namespace.
fn create_here(ns: &str, name: &str) -> Result<Tun, TunError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(TUN_DEVICE)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                TunError::DeviceMissing
            } else {
                TunError::Open { source }
            }
        })?;
    // SAFETY: ifreq is plain old data (a name array and a union of integers,
    // sockaddrs and a pointer); all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // validate_ifname guarantees at most IFNAMSIZ - 1 bytes, so the name stays
    // NUL-terminated.
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `file` is an open /dev/net/tun fd and `ifr` a valid, initialised
    // ifreq that TUNSETIFF reads and may write back for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc < 0 {
        return Err(TunError::SetIff {
            name: name.into(),
            ns: ns.into(),
            source: io::Error::last_os_error(),
        });
    }
    // /proc/sys/net follows the namespace of the thread that opens the file. A
    // kernel without IPv6 has no such file, which is fine.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    Ok(Tun {
        name: name.into(),
        ns: ns.into(),
        file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(validate_ifname("wm-abc-s").is_ok());
        assert!(validate_ifname("123456789012345").is_ok());
        for bad in ["", "1234567890123456", "a/b", "a:b", "a b", "."] {
            assert!(
                matches!(validate_ifname(bad), Err(TunError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }
}
