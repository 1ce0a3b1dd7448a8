//! A simulated hypervisor for the Xen backend's tests: domains whose frames
//! live in a memfd (pfn `p` at offset `p * 4096`), foreign mappings that map
//! those frames page by page into one reserved range (a live, shared view,
//! as privcmd gives; a frame that is not populated stays `PROT_NONE`, so a
//! backend that touches one it was told failed crashes the test), log-dirty
//! that records the simulated guest's writes and balloon operations, and
//! hooks that let a test write while the engine reads.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use super::{DomainInfo, ForeignMapping, Hypervisor, LogDirty, XEN_PAGE_SIZE, XenError};

const PS: usize = XEN_PAGE_SIZE;

/// What the simulated guest does while the engine works: called with the
/// domain (to write or balloon) on every dirty-bitmap collect and every
/// mapping, with how many of each happened so far.
pub type Activity = Box<dyn FnMut(&mut SimDomain, Event) + Send>;

/// When [`Activity`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Before a dirty-bitmap collect (the `n`-th).
    Clean(u64),
    /// Before a mapping (the `n`-th) of the source's frames.
    Map(u64),
}

/// One simulated domain.
pub struct SimDomain {
    pub hvm: bool,
    pub dying: bool,
    pub pfns: u64,
    mem: OwnedFd,
    pub populated: BTreeSet<u64>,
    pub log_dirty: bool,
    pub dirty: BTreeSet<u64>,
    /// Frozen by the toolstack's suspend: the guest no longer writes.
    pub suspended: bool,
    /// Sabotage: writes to these pfns are never logged dirty.
    pub unlogged: BTreeSet<u64>,
    /// Refuse log-dirty (a hypervisor without it for this guest).
    pub no_log_dirty: bool,
    /// Populated frames that refuse to be mapped (paged out, say).
    pub unmappable: BTreeSet<u64>,
    cleans: u64,
    maps: u64,
}

impl std::fmt::Debug for SimDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDomain")
            .field("pfns", &self.pfns)
            .field("populated", &self.populated.len())
            .finish()
    }
}

impl SimDomain {
    fn new(pfns: u64, hvm: bool) -> Self {
        // SAFETY: a plain memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"wanmig-sim-xen".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let mem = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a valid descriptor and length.
        let rc = unsafe { libc::ftruncate(mem.as_raw_fd(), (pfns as usize * PS) as libc::off_t) };
        assert_eq!(rc, 0);
        SimDomain {
            hvm,
            dying: false,
            pfns,
            mem,
            populated: BTreeSet::new(),
            log_dirty: false,
            dirty: BTreeSet::new(),
            suspended: false,
            unlogged: BTreeSet::new(),
            no_log_dirty: false,
            unmappable: BTreeSet::new(),
            cleans: 0,
            maps: 0,
        }
    }

    fn mark(&mut self, pfn: u64) {
        if self.log_dirty && !self.unlogged.contains(&pfn) {
            self.dirty.insert(pfn);
        }
    }

    /// The guest writes `data` to `pfn` (populating it if needed).
    pub fn write(&mut self, pfn: u64, data: &[u8]) {
        assert_eq!(data.len(), PS);
        assert!(!self.suspended, "a suspended guest does not write");
        self.populated.insert(pfn);
        self.pwrite(pfn, data);
        self.mark(pfn);
    }

    fn pwrite(&self, pfn: u64, data: &[u8]) {
        // SAFETY: `data` is PS readable bytes; the offset is inside the file.
        let n = unsafe {
            libc::pwrite(
                self.mem.as_raw_fd(),
                data.as_ptr().cast(),
                PS,
                (pfn as usize * PS) as libc::off_t,
            )
        };
        assert_eq!(n, PS as isize);
    }

    /// The frame at `pfn` (zeros if none).
    pub fn read(&self, pfn: u64) -> Vec<u8> {
        let mut out = vec![0u8; PS];
        if self.populated.contains(&pfn) {
            // SAFETY: `out` is PS writable bytes; the offset is in the file.
            let n = unsafe {
                libc::pread(
                    self.mem.as_raw_fd(),
                    out.as_mut_ptr().cast(),
                    PS,
                    (pfn as usize * PS) as libc::off_t,
                )
            };
            assert_eq!(n, PS as isize);
        }
        out
    }

    /// The guest gets a frame at `pfn` (balloon in) and fills it with
    /// `data`, unlogged: as under Xen's log-dirty, a newly populated frame
    /// is writable until the next clean.
    pub fn balloon_in(&mut self, pfn: u64, data: &[u8]) {
        assert!(!self.populated.contains(&pfn), "pfn {pfn} is populated");
        self.populated.insert(pfn);
        self.pwrite(pfn, data);
    }

    /// The guest gives `pfn` back (balloon out).
    pub fn balloon_out(&mut self, pfn: u64) {
        self.depopulate_one(pfn);
        self.mark(pfn);
    }

    fn depopulate_one(&mut self, pfn: u64) {
        self.populated.remove(&pfn);
        self.pwrite(pfn, &[0u8; PS]);
    }
}

/// The simulated hypervisor.
#[derive(Default)]
pub struct SimXen {
    pub domains: Mutex<HashMap<u32, SimDomain>>,
    pub activity: Mutex<Option<(u32, Activity)>>,
    /// Pfns asked for in mappings that had no frame (holes, Xen's pages),
    /// by domain.
    pub holes_mapped: Mutex<BTreeSet<(u32, u64)>>,
}

impl std::fmt::Debug for SimXen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimXen")
    }
}

impl SimXen {
    pub fn new() -> Arc<Self> {
        Arc::new(SimXen::default())
    }

    /// Adds a domain of `pfns` pfns, none populated.
    pub fn add(&self, domid: u32, pfns: u64, hvm: bool) {
        self.domains
            .lock()
            .unwrap()
            .insert(domid, SimDomain::new(pfns, hvm));
    }

    /// Runs `f` on domain `domid`.
    pub fn with<T>(&self, domid: u32, f: impl FnOnce(&mut SimDomain) -> T) -> T {
        f(self
            .domains
            .lock()
            .unwrap()
            .get_mut(&domid)
            .expect("domain"))
    }

    /// The guest of `domid` acts on `event` (if an activity is set for it).
    fn act(&self, domid: u32, event: impl FnOnce(&mut SimDomain) -> Event) {
        let mut activity = self.activity.lock().unwrap();
        let mut doms = self.domains.lock().unwrap();
        let Some(d) = doms.get_mut(&domid) else {
            return;
        };
        let e = event(d);
        if let Some((who, f)) = activity.as_mut()
            && *who == domid
            && !d.suspended
        {
            f(d, e);
        }
    }

    fn dom<T>(
        &self,
        domid: u32,
        f: impl FnOnce(&mut SimDomain) -> Result<T, XenError>,
    ) -> Result<T, XenError> {
        match self.domains.lock().unwrap().get_mut(&domid) {
            Some(d) => f(d),
            None => Err(XenError::NoDomain { domid }),
        }
    }
}

fn einval(op: &'static str, domid: u32) -> XenError {
    XenError::Call {
        op,
        domid,
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    }
}

impl Hypervisor for SimXen {
    fn domain_info(&self, domid: u32) -> Result<DomainInfo, XenError> {
        self.dom(domid, |d| {
            Ok(DomainInfo {
                domid,
                hvm: d.hvm,
                dying: d.dying,
                shutdown: d.suspended,
                shutdown_reason: if d.suspended { 2 } else { 0 },
                paused: false,
                tot_pages: d.populated.len() as u64,
                max_pages: d.pfns,
            })
        })
    }

    fn max_gpfn(&self, domid: u32) -> Result<u64, XenError> {
        self.dom(domid, |d| Ok(d.pfns - 1))
    }

    fn log_dirty(&self, domid: u32, mode: LogDirty) -> Result<(), XenError> {
        self.dom(domid, |d| {
            if d.no_log_dirty && mode == LogDirty::Enable {
                return Err(XenError::Call {
                    op: "enabling log-dirty mode",
                    domid,
                    source: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
                });
            }
            d.log_dirty = mode == LogDirty::Enable;
            d.dirty.clear();
            Ok(())
        })
    }

    fn log_dirty_clean(
        &self,
        domid: u32,
        bitmap: &mut [u64],
        pages: u64,
        _last: bool,
    ) -> Result<(), XenError> {
        self.act(domid, |d| {
            d.cleans += 1;
            Event::Clean(d.cleans)
        });
        self.dom(domid, |d| {
            if !d.log_dirty {
                return Err(einval("collecting the dirty bitmap", domid));
            }
            bitmap.fill(0);
            for p in std::mem::take(&mut d.dirty) {
                if p < pages {
                    bitmap[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            Ok(())
        })
    }

    fn populated(&self, domid: u32, pfns: &[u64], out: &mut Vec<bool>) -> Result<(), XenError> {
        self.dom(domid, |d| {
            out.extend(pfns.iter().map(|p| d.populated.contains(p)));
            Ok(())
        })
    }

    fn map(&self, domid: u32, pfns: &[u64], write: bool) -> Result<ForeignMapping, XenError> {
        if !write {
            self.act(domid, |d| {
                d.maps += 1;
                Event::Map(d.maps)
            });
        }
        self.dom(domid, |d| {
            let n = pfns.len();
            if n == 0 {
                // As xenforeignmemory_map: mapping nothing is EINVAL.
                return Err(einval("mapping guest frames", domid));
            }
            // SAFETY: a fresh anonymous PROT_NONE reservation of n pages.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    n * PS,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
            let mut errs = vec![0i32; n];
            for (i, &p) in pfns.iter().enumerate() {
                if d.unmappable.contains(&p) {
                    errs[i] = -libc::ENOENT;
                    continue;
                }
                if p >= d.pfns || !d.populated.contains(&p) {
                    errs[i] = -libc::EINVAL;
                    self.holes_mapped.lock().unwrap().insert((domid, p));
                    continue;
                }
                // SAFETY: page `i` of our own reservation, replaced by the
                // domain's frame `p` from its memfd (shared: a live view).
                let at = unsafe {
                    libc::mmap(
                        base.cast::<u8>().add(i * PS).cast(),
                        PS,
                        prot,
                        libc::MAP_SHARED | libc::MAP_FIXED,
                        d.mem.as_raw_fd(),
                        (p as usize * PS) as libc::off_t,
                    )
                };
                assert_ne!(at, libc::MAP_FAILED);
            }
            let len = n * PS;
            let unmap = Box::new(move |base: *mut u8, _frames: usize| {
                // SAFETY: the reservation made above, unmapped once.
                unsafe { libc::munmap(base.cast(), len) };
            });
            // SAFETY: n pages at `base`, each mapped (with `prot`) where its
            // error is 0, owned by the returned value.
            Ok(unsafe { ForeignMapping::new(NonNull::new(base.cast()).unwrap(), n, errs, unmap) })
        })
    }

    fn populate(&self, domid: u32, pfns: &[u64]) -> Result<(), XenError> {
        self.dom(domid, |d| {
            for &p in pfns {
                if p >= d.pfns || d.populated.contains(&p) {
                    // Xen refuses to populate over a frame (EEXIST-like).
                    return Err(einval("populating frames", domid));
                }
            }
            for &p in pfns {
                d.populated.insert(p);
                d.pwrite(p, &[0u8; PS]);
            }
            Ok(())
        })
    }

    fn depopulate(&self, domid: u32, pfns: &[u64]) -> Result<(), XenError> {
        self.dom(domid, |d| {
            for &p in pfns {
                if !d.populated.contains(&p) {
                    return Err(einval("giving frames back", domid));
                }
                d.depopulate_one(p);
            }
            Ok(())
        })
    }
}
