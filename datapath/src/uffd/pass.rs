//! Passing one file descriptor with a byte payload over a unix socket
//! (`SCM_RIGHTS`): how QEMU's preload library hands its userfaultfd to the
//! engine.
//!
//! The descriptor travels with the first byte of the payload. The receiver
//! takes exactly one descriptor: a message with none, with several, or whose
//! control data was truncated is refused, and every descriptor that did arrive
//! is closed (none leaks into the engine). Received descriptors are
//! close-on-exec (`MSG_CMSG_CLOEXEC`).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use super::Errno;

/// Descriptors the receive buffer has room for: more than one so that a
/// message with several is recognised (and all closed) rather than truncated.
const MAX_FDS: usize = 4;

/// Control buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; cmsg_space(MAX_FDS)]);

/// `CMSG_SPACE(n * sizeof(int))` (`libc::CMSG_SPACE` is not `const` here).
const fn cmsg_space(fds: usize) -> usize {
    let align = size_of::<usize>();
    let hdr = size_of::<libc::cmsghdr>().div_ceil(align) * align;
    hdr + (fds * size_of::<RawFd>()).div_ceil(align) * align
}

/// Sending with [`send_fd`].
#[derive(Debug, thiserror::Error)]
pub enum SendFdError {
    /// A descriptor must travel with at least one byte on a stream socket.
    #[error("send_fd: the payload must not be empty")]
    EmptyPayload,
    /// `sendmsg` failed.
    #[error("send_fd: sendmsg: {errno}")]
    Sendmsg {
        /// errno.
        errno: Errno,
    },
    /// Writing the rest of the payload failed.
    #[error("send_fd: writing the payload after {sent} of {len} bytes")]
    Payload {
        /// Bytes sent before.
        sent: usize,
        /// Payload length.
        len: usize,
        /// Cause.
        source: io::Error,
    },
}

/// Receiving with [`recv_fd`].
#[derive(Debug, thiserror::Error)]
pub enum RecvFdError {
    /// `recvmsg` failed.
    #[error("recv_fd: recvmsg: {errno}")]
    Recvmsg {
        /// errno.
        errno: Errno,
    },
    /// The peer closed the connection before sending anything.
    #[error("recv_fd: the peer closed the connection")]
    PeerClosed,
    /// The message carried no descriptor.
    #[error("recv_fd: a message of {bytes} bytes carried no file descriptor")]
    NoFd {
        /// Payload bytes received.
        bytes: usize,
    },
    /// The message carried several descriptors (all closed).
    #[error("recv_fd: the message carried {count} file descriptors, expected one (all closed)")]
    TooManyFds {
        /// How many arrived.
        count: usize,
    },
    /// `MSG_CTRUNC`: the control data did not fit (more descriptors than the
    /// buffer holds); those that arrived were closed.
    #[error(
        "recv_fd: control data truncated (MSG_CTRUNC); {received} descriptors received and closed"
    )]
    ControlTruncated {
        /// Descriptors that arrived.
        received: usize,
    },
    /// The payload ended early (the descriptor was closed).
    #[error("recv_fd: payload truncated: {got} of {want} bytes")]
    ShortPayload {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// Reading the rest of the payload failed (the descriptor was closed).
    #[error("recv_fd: reading the payload after {got} of {want} bytes")]
    Payload {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
        /// Cause.
        source: io::Error,
    },
}

/// Sends `fd` with `payload` (not empty) on `sock`. The receiver gets its own
/// descriptor for the same open file; the caller still owns `fd`.
pub fn send_fd(sock: &UnixStream, fd: BorrowedFd<'_>, payload: &[u8]) -> Result<(), SendFdError> {
    if payload.is_empty() {
        return Err(SendFdError::EmptyPayload);
    }
    let mut cbuf = CmsgBuf([0; cmsg_space(MAX_FDS)]);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast::<libc::c_void>(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast::<libc::c_void>();
    msg.msg_controllen = cmsg_space(1) as _;
    // SAFETY: `msg` describes `cbuf`, which holds at least CMSG_SPACE(int)
    // aligned bytes, so the first header exists and its data has room for one
    // int; we write only inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd.as_raw_fd());
    }
    let sent = loop {
        // SAFETY: `msg` points to `iov` (the live payload, only read) and
        // `cbuf`, both alive for the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        match usize::try_from(r) {
            Ok(n) => break n,
            Err(_) => {
                let errno = Errno::last();
                if errno.0 != libc::EINTR {
                    return Err(SendFdError::Sendmsg { errno });
                }
            }
        }
    };
    if sent < payload.len() {
        // A stream socket may take part of the payload; the descriptor went
        // with the first byte.
        let mut w = sock;
        w.write_all(&payload[sent..])
            .map_err(|source| SendFdError::Payload {
                sent,
                len: payload.len(),
                source,
            })?;
    }
    Ok(())
}

/// Receives exactly one descriptor and fills `payload` completely from `sock`.
///
/// The descriptor must come with the first byte of the payload (as
/// [`send_fd`] sends it). It is close-on-exec.
pub fn recv_fd(sock: &UnixStream, payload: &mut [u8]) -> Result<OwnedFd, RecvFdError> {
    let want = payload.len();
    let mut cbuf = CmsgBuf([0; cmsg_space(MAX_FDS)]);
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast::<libc::c_void>(),
        iov_len: want,
    };
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast::<libc::c_void>();
    msg.msg_controllen = cbuf.0.len() as _;
    let got = loop {
        // SAFETY: `msg` points to `iov` (the live, exclusively borrowed
        // payload) and `cbuf`, both alive for the call; the kernel writes
        // only inside them.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match usize::try_from(r) {
            Ok(n) => break n,
            Err(_) => {
                let errno = Errno::last();
                if errno.0 != libc::EINTR {
                    return Err(RecvFdError::Recvmsg { errno });
                }
            }
        }
    };
    // Take ownership of every descriptor first, so that each is closed on
    // any refusal below.
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: after recvmsg, `msg.msg_control`/`msg_controllen` describe the
    // part of `cbuf` the kernel filled; the CMSG_* macros walk only inside it
    // and every header they return is complete (its data lies in the buffer).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let header = data.offset_from(c.cast::<u8>()) as usize;
                let bytes = ((*c).cmsg_len as usize).saturating_sub(header);
                for i in 0..bytes / size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // The kernel installed this descriptor for us; nothing
                    // else owns it.
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(RecvFdError::ControlTruncated {
            received: fds.len(),
        });
    }
    if got == 0 && fds.is_empty() {
        return Err(RecvFdError::PeerClosed);
    }
    if fds.len() > 1 {
        return Err(RecvFdError::TooManyFds { count: fds.len() });
    }
    let Some(fd) = fds.pop() else {
        return Err(RecvFdError::NoFd { bytes: got });
    };
    let mut filled = got;
    let mut r = sock;
    while filled < want {
        match r.read(&mut payload[filled..]) {
            Ok(0) => return Err(RecvFdError::ShortPayload { got: filled, want }),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(RecvFdError::Payload {
                    got: filled,
                    want,
                    source,
                });
            }
        }
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Sends `fds` with a payload by hand (the API sends only one).
    fn send_raw(sock: &UnixStream, fds: &[RawFd], payload: &[u8]) {
        let mut cbuf = vec![0u64; 64];
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let data_len = std::mem::size_of_val(fds);
            msg.msg_control = cbuf.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE has no preconditions.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len as u32) } as _;
            // SAFETY: cbuf (512 bytes, aligned) holds the header and data.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
            }
        }
        // SAFETY: msg points to live iov and cbuf.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        assert_eq!(r, payload.len() as isize, "{}", io::Error::last_os_error());
    }

    /// A pipe whose write end is only ever passed (and then dropped here):
    /// `closed()` tells whether every copy of that write end is closed, i.e.
    /// whether the receiver leaked none.
    struct LeakProbe {
        reader: std::io::PipeReader,
        writer: Option<std::io::PipeWriter>,
    }

    impl LeakProbe {
        fn new() -> Self {
            let (reader, writer) = std::io::pipe().unwrap();
            // SAFETY: F_SETFL on a live descriptor.
            unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            LeakProbe {
                reader,
                writer: Some(writer),
            }
        }
        fn raw(&self) -> RawFd {
            self.writer.as_ref().unwrap().as_raw_fd()
        }
        fn closed(mut self) -> bool {
            self.writer = None;
            let mut b = [0u8; 1];
            matches!(self.reader.read(&mut b), Ok(0))
        }
    }

    #[test]
    fn passes_one_fd_with_payload() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut pr, pw) = std::io::pipe().unwrap();
        send_fd(&a, pw.as_fd(), b"hello world").unwrap();
        let mut buf = [0u8; 11];
        let fd = recv_fd(&b, &mut buf).unwrap();
        assert_eq!(&buf, b"hello world");
        // The received descriptor is the pipe's write end, close-on-exec.
        // SAFETY: F_GETFD on a live descriptor.
        let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert!(fl & libc::FD_CLOEXEC != 0);
        let mut w = std::fs::File::from(fd);
        w.write_all(b"x").unwrap();
        drop((w, pw));
        let mut s = String::new();
        pr.read_to_string(&mut s).unwrap();
        assert_eq!(s, "x");
        assert!(matches!(
            send_fd(&a, a.as_fd(), b""),
            Err(SendFdError::EmptyPayload)
        ));
    }

    #[test]
    fn refuses_no_fd_several_fds_and_truncation_without_leaking() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 4];

        send_raw(&a, &[], b"abcd");
        assert!(matches!(
            recv_fd(&b, &mut buf),
            Err(RecvFdError::NoFd { bytes: 4 })
        ));

        let probe = LeakProbe::new();
        send_raw(&a, &[probe.raw(), probe.raw()], b"abcd");
        assert!(matches!(
            recv_fd(&b, &mut buf),
            Err(RecvFdError::TooManyFds { count: 2 })
        ));
        assert!(probe.closed(), "a refused descriptor leaked");

        let probe = LeakProbe::new();
        send_raw(&a, &[probe.raw(); 9], b"abcd");
        assert!(matches!(
            recv_fd(&b, &mut buf),
            Err(RecvFdError::ControlTruncated { received: MAX_FDS })
        ));
        assert!(probe.closed(), "a refused descriptor leaked");

        // Short payload: the descriptor arrives, then the peer closes.
        let probe = LeakProbe::new();
        send_raw(&a, &[probe.raw()], b"ab");
        drop(a);
        assert!(matches!(
            recv_fd(&b, &mut buf),
            Err(RecvFdError::ShortPayload { got: 2, want: 4 })
        ));
        assert!(probe.closed(), "a refused descriptor leaked");
        assert!(matches!(
            recv_fd(&b, &mut buf),
            Err(RecvFdError::PeerClosed)
        ));
    }
}
