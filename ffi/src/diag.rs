//! Messages on stderr without touching the heap: the preload library prints
//! from inside `mmap`, where allocating could recurse into the allocator.

use core::fmt;

/// A fixed-size message buffer; text past its end is cut off.
pub(crate) struct StackMsg {
    buf: [u8; 1024],
    len: usize,
}

impl StackMsg {
    pub(crate) const fn new() -> Self {
        StackMsg {
            buf: [0; 1024],
            len: 0,
        }
    }

    /// Writes the message, with a trailing newline, to stderr.
    pub(crate) fn emit(&mut self) {
        if self.len == self.buf.len() {
            self.buf[self.len - 1] = b'\n';
        } else {
            self.buf[self.len] = b'\n';
            self.len += 1;
        }
        let mut rest = &self.buf[..self.len];
        while !rest.is_empty() {
            // SAFETY: `rest` is a valid, initialised byte slice for its length.
            let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                return;
            }
            rest = rest.get(n as usize..).unwrap_or_default();
        }
    }
}

impl fmt::Write for StackMsg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Displays bytes (a path) as text, invalid UTF-8 as `\xNN`, without allocating.
pub(crate) struct Bytes<'a>(pub &'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// The calling thread's `errno`.
pub(crate) fn errno() -> i32 {
    // SAFETY: `__errno_location` always returns a valid pointer to this
    // thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's `errno`.
pub(crate) fn set_errno(value: i32) {
    // SAFETY: as in `errno`; the location is writable by its thread.
    unsafe { *libc::__errno_location() = value }
}

/// An errno value shown as its name and number (`ENOENT (2)`).
#[derive(Clone, Copy)]
pub(crate) struct Errno(pub i32);

impl Errno {
    /// The calling thread's errno.
    pub(crate) fn last() -> Self {
        Errno(errno())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            libc::EPERM => "EPERM: operation not permitted",
            libc::ENOENT => "ENOENT: no such file or directory",
            libc::EINTR => "EINTR",
            libc::EBADF => "EBADF: bad file descriptor",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM: out of memory",
            libc::EACCES => "EACCES: permission denied",
            libc::EFAULT => "EFAULT: bad address",
            libc::EBUSY => "EBUSY: already registered",
            libc::EEXIST => "EEXIST",
            libc::EINVAL => "EINVAL: invalid argument (unsupported feature or mode?)",
            libc::ENOSPC => "ENOSPC",
            libc::EPIPE => "EPIPE: peer closed",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            libc::ENOSYS => "ENOSYS: not implemented by this kernel",
            libc::ENOTSOCK => "ENOTSOCK: not a socket",
            libc::EPROTOTYPE => "EPROTOTYPE: wrong socket type",
            libc::EOPNOTSUPP => "EOPNOTSUPP: not supported",
            libc::ECONNRESET => "ECONNRESET: connection reset",
            libc::ECONNREFUSED => "ECONNREFUSED: nobody listening",
            _ => "",
        };
        if name.is_empty() {
            write!(f, "errno {}", self.0)
        } else {
            write!(f, "{name} (errno {})", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn message_is_cut_at_capacity() {
        let mut m = StackMsg::new();
        for _ in 0..200 {
            write!(m, "0123456789").unwrap();
        }
        assert_eq!(m.len, 1024);
    }

    #[test]
    fn bytes_escape_invalid_utf8() {
        let mut m = StackMsg::new();
        write!(m, "{}", Bytes(b"/dev/shm/a\xffb")).unwrap();
        assert_eq!(&m.buf[..m.len], b"/dev/shm/a\\xffb");
        let mut m = StackMsg::new();
        write!(m, "{} / {}", Errno(libc::ENOENT), Errno(9999)).unwrap();
        assert_eq!(
            &m.buf[..m.len],
            b"ENOENT: no such file or directory (errno 2) / errno 9999"
        );
    }
}
