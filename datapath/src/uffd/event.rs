//! Decoding `struct uffd_msg` into [`Event`].

use std::os::fd::{FromRawFd, OwnedFd};

use super::RemoteAddr;
use super::abi;

/// One message read from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread of the target faulted on a registered range and waits until
    /// the page is installed (MISSING: `copy`/`zeropage`; MINOR: `continue_`;
    /// WP: `write_protect(.., false, ..)`) or a `wake`.
    Pagefault {
        /// Faulting address, rounded down to the page unless the fd has
        /// `EXACT_ADDRESS`.
        addr: RemoteAddr,
        /// The access was a write.
        write: bool,
        /// A write-protect fault (never seen with `WP_ASYNC`: the kernel
        /// resolves those itself).
        wp: bool,
        /// A MINOR fault (the page is in the page cache, not mapped).
        minor: bool,
        /// The faulting thread (with `THREAD_ID`), else `None`.
        thread_id: Option<u32>,
    },
    /// The target forked (`EVENT_FORK`): the child's userfaultfd, installed in
    /// this process by the kernel and now owned here.
    Fork {
        /// The child's userfaultfd.
        uffd: OwnedFd,
    },
    /// A registered range moved (`EVENT_REMAP`).
    Remap {
        /// Old start.
        from: RemoteAddr,
        /// New start.
        to: RemoteAddr,
        /// Length.
        len: u64,
    },
    /// Pages were dropped from a registered range (`EVENT_REMOVE`:
    /// `MADV_DONTNEED`, `MADV_REMOVE`).
    Remove {
        /// Start.
        start: RemoteAddr,
        /// End (exclusive).
        end: RemoteAddr,
    },
    /// A registered range was unmapped (`EVENT_UNMAP`).
    Unmap {
        /// Start.
        start: RemoteAddr,
        /// End (exclusive).
        end: RemoteAddr,
    },
}

impl Event {
    /// Decodes one message; `Err(event type)` for an unknown type.
    pub(super) fn decode(msg: &abi::uffd_msg) -> Result<Event, u8> {
        Ok(match msg.event {
            abi::UFFD_EVENT_PAGEFAULT => {
                let pf: abi::uffd_msg_pagefault = zerocopy::transmute!(msg.arg);
                Event::Pagefault {
                    addr: RemoteAddr(pf.address),
                    write: pf.flags & abi::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    wp: pf.flags & abi::UFFD_PAGEFAULT_FLAG_WP != 0,
                    minor: pf.flags & abi::UFFD_PAGEFAULT_FLAG_MINOR != 0,
                    thread_id: (pf.ptid != 0).then_some(pf.ptid),
                }
            }
            abi::UFFD_EVENT_FORK => {
                let fork: abi::uffd_msg_fork = zerocopy::transmute!(msg.arg);
                let Ok(raw) = i32::try_from(fork.ufd) else {
                    return Err(msg.event);
                };
                // SAFETY: for UFFD_EVENT_FORK the kernel installs a new
                // descriptor in the reading process's table and hands its
                // number over in this message; nothing else owns it.
                let uffd = unsafe { OwnedFd::from_raw_fd(raw) };
                Event::Fork { uffd }
            }
            abi::UFFD_EVENT_REMAP => {
                let r: abi::uffd_msg_remap = zerocopy::transmute!(msg.arg);
                Event::Remap {
                    from: RemoteAddr(r.from),
                    to: RemoteAddr(r.to),
                    len: r.len,
                }
            }
            abi::UFFD_EVENT_REMOVE | abi::UFFD_EVENT_UNMAP => {
                let r: abi::uffd_msg_remove = zerocopy::transmute!(msg.arg);
                let (start, end) = (RemoteAddr(r.start), RemoteAddr(r.end));
                if msg.event == abi::UFFD_EVENT_REMOVE {
                    Event::Remove { start, end }
                } else {
                    Event::Unmap { start, end }
                }
            }
            other => return Err(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn msg(event: u8, arg: &[u64; 3]) -> abi::uffd_msg {
        let mut m = abi::uffd_msg {
            event,
            ..Default::default()
        };
        m.arg.copy_from_slice(arg.as_bytes());
        m
    }

    #[test]
    fn decodes_pagefault() {
        let flags = abi::UFFD_PAGEFAULT_FLAG_WRITE | abi::UFFD_PAGEFAULT_FLAG_MINOR;
        let tid = 1234u64;
        let m = msg(abi::UFFD_EVENT_PAGEFAULT, &[flags, 0x7f00_0000_1000, tid]);
        match Event::decode(&m) {
            Ok(Event::Pagefault {
                addr,
                write,
                wp,
                minor,
                thread_id,
            }) => {
                assert_eq!(addr, RemoteAddr(0x7f00_0000_1000));
                assert!(write && minor && !wp);
                assert_eq!(thread_id, Some(1234));
            }
            other => panic!("unexpected {other:?}"),
        }
        let m = msg(abi::UFFD_EVENT_PAGEFAULT, &[0, 0x1000, 0]);
        assert!(matches!(
            Event::decode(&m),
            Ok(Event::Pagefault {
                thread_id: None,
                write: false,
                ..
            })
        ));
    }

    #[test]
    fn decodes_range_events_and_rejects_unknown() {
        let m = msg(abi::UFFD_EVENT_REMOVE, &[0x1000, 0x3000, 0]);
        assert!(matches!(
            Event::decode(&m),
            Ok(Event::Remove {
                start: RemoteAddr(0x1000),
                end: RemoteAddr(0x3000)
            })
        ));
        let m = msg(abi::UFFD_EVENT_UNMAP, &[0x1000, 0x3000, 0]);
        assert!(matches!(Event::decode(&m), Ok(Event::Unmap { .. })));
        let m = msg(abi::UFFD_EVENT_REMAP, &[0x1000, 0x9000, 0x2000]);
        assert!(matches!(
            Event::decode(&m),
            Ok(Event::Remap { len: 0x2000, .. })
        ));
        assert_eq!(Event::decode(&msg(0x42, &[0; 3])).err(), Some(0x42));
        assert_eq!(Event::decode(&msg(0, &[0; 3])).err(), Some(0));
    }
}
