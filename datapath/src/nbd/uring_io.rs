//! Positioned reads and writes through io_uring: one small ring per thread
//! (the NBD request threads), submitted and reaped by that thread, the
//! caller's buffer borrowed for exactly the time the kernel owns it (until
//! the completion is reaped, before the call returns).

use std::cell::RefCell;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

use crate::transport::uring_support;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// True if this kernel runs io_uring reads and writes (probed once).
pub fn available() -> bool {
    uring_support().is_ok_and(|s| s.read_write)
}

enum Op<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

fn run(fd: RawFd, offset: u64, op: Op<'_>) -> std::io::Result<usize> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoUring::new(4)?);
        }
        let ring = slot.as_mut().expect("set above");
        let entry = match op {
            Op::Read(b) => opcode::Read::new(types::Fd(fd), b.as_mut_ptr(), b.len() as u32)
                .offset(offset)
                .build(),
            Op::Write(b) => opcode::Write::new(types::Fd(fd), b.as_ptr(), b.len() as u32)
                .offset(offset)
                .build(),
        };
        // SAFETY: the buffer is borrowed for the whole call, and the call
        // returns only once the completion is reaped, or with the entry
        // never submitted (its ring leaked, see below).
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // io_uring_enter(2) fails only if it consumed no entry:
                    // ours is still in the submission queue. Leak the ring
                    // so that it is never submitted after the buffer is gone.
                    std::mem::forget(slot.take());
                    return Err(e);
                }
            }
        }
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| std::io::Error::other("io_uring: no completion"))?;
        let res = cqe.result();
        if res < 0 {
            Err(std::io::Error::from_raw_os_error(-res))
        } else {
            Ok(res as usize)
        }
    })
}

/// Fills `buf` from `offset` of `fd` (short reads continued; end of file is
/// an error).
pub fn read_exact_at(fd: RawFd, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = run(fd, offset, Op::Read(&mut *buf))?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Writes all of `buf` at `offset` of `fd`.
pub fn write_all_at(fd: RawFd, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = run(fd, offset, Op::Write(buf))?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}
