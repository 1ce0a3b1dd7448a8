//! wanmig's C ABI for hypervisor toolstacks: `libwanmig.so` and its header
//! `ffi/include/wanmig.h` (generated from this crate by cbindgen; a test
//! fails when the checked-in header differs, `WANMIG_BLESS=1` rewrites it).
//!
//! The patched Xen toolstack (`xen-patches/`) loads it into
//! `libxl-save-helper`: on the save side libxenguest hands a domain's memory
//! migration to it instead of its own pre-copy loop; on the restore side it
//! hands it the engine's hand-off record. It is a separate library from the
//! QEMU preload library (`libwanmig_ffi.so`, which interposes `mmap` and
//! must never be loaded into the toolstack).
//!
//! # The calls, in order
//!
//! Save (source dom0, inside `xc_domain_save()`):
//! 1. `wanmig_save_open(domid, options, &save)`: checks the domain (a live
//!    HVM or PVH guest), loads the key, starts listening;
//! 2. `wanmig_save_handoff(save, buf, cap, &len)`: the body of the hand-off
//!    record to write into the stream (where to dial, which migration);
//! 3. `wanmig_save_memory(save, suspend, opaque)`: waits for the
//!    destination engine, pre-copies, calls `suspend(opaque)` exactly once
//!    on the calling thread, sends the rest; returns once the destination
//!    holds every frame;
//! 4. `wanmig_save_close(save)`.
//!
//! Restore (destination dom0, inside `xc_domain_restore()`):
//! 1. `wanmig_restore_open(domid, options, &restore)`;
//! 2. `wanmig_restore_memory(restore, handoff, len, populated, opaque)`:
//!    dials the source engine, populates and writes every frame (with
//!    `verify=1` on both sides, compares each with the source's frozen
//!    frame), calls `populated` with every pfn it populated;
//! 3. `wanmig_restore_close(restore)`.
//!
//! # Rules
//! - Every call returns a `wanmig_status`; after a failure
//!   `wanmig_last_error()` names the cause (per thread).
//! - No panic crosses the boundary; every pointer and length is checked; a
//!   null, closed or unknown handle gives `WANMIG_ERR_BAD_HANDLE`.
//! - Thread safety: every function may be called from any thread. A handle
//!   serves one call at a time: a call on a handle another thread is inside
//!   returns `WANMIG_ERR_STATE`. Callbacks run on the thread that made the
//!   call that takes them.
//! - A failed save leaves the domain as it is (running, or suspended if
//!   `suspend` ran): the toolstack resumes it, as after any failed save. A
//!   failed restore leaves frames populated in a domain the toolstack then
//!   destroys; nothing is ever unpaused by wanmig.

mod handles;
mod status;

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Arc;

use wanmig_datapath::backend::xen::{
    Hypervisor, RestoreOptions, SaveOptions, XenMigrationError, XenRestore, XenSave,
};
use wanmig_datapath::wire::MAX_HANDOFF_LEN;

use handles::Registry;
pub use status::*;
use status::{Failure, guard};

/// The ABI version this library implements (`wanmig_abi_version()`); a
/// toolstack built against another header must refuse to use it.
pub const WANMIG_ABI_VERSION: u32 = 1;

/// Room enough for any hand-off record's body (`wanmig_save_handoff`).
pub const WANMIG_HANDOFF_MAX: usize = 512;

const _: () = assert!(WANMIG_HANDOFF_MAX >= MAX_HANDOFF_LEN);

/// An open save side of one domain's migration.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct wanmig_save {
    _opaque: [u8; 0],
}

/// An open restore side of one domain's migration.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct wanmig_restore {
    _opaque: [u8; 0],
}

/// Suspends the domain (libxenguest's suspend); returns 0 once it is
/// suspended, anything else on failure.
#[allow(non_camel_case_types)]
pub type wanmig_suspend_cb = Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>;

/// Told `count` pfns the restore engine populated in the new domain (any
/// number of calls, ascending); returns 0 to go on, anything else fails the
/// restore.
#[allow(non_camel_case_types)]
pub type wanmig_populated_cb =
    Option<unsafe extern "C" fn(opaque: *mut c_void, pfns: *const u64, count: usize) -> c_int>;

static SAVES: Registry<XenSave> = Registry::new(1, "save");
static RESTORES: Registry<XenRestore> = Registry::new(2, "restore");

/// The ABI version of this library: `WANMIG_ABI_VERSION` of the header it
/// was built with.
#[unsafe(no_mangle)]
pub extern "C" fn wanmig_abi_version() -> u32 {
    WANMIG_ABI_VERSION
}

/// The message of the last failed call on this thread ("" after a
/// success). Valid until this thread's next call into the library; never
/// NULL.
#[unsafe(no_mangle)]
pub extern "C" fn wanmig_last_error() -> *const c_char {
    status::last_error()
}

/// The name of a status code (`"WANMIG_ERR_XEN"`, ...; `"unknown"` for
/// another value); a static string, never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn wanmig_status_name(status: wanmig_status) -> *const c_char {
    status::name(status).as_ptr()
}

/// A NUL-terminated UTF-8 string from C.
///
/// # Safety
/// `s` is NULL or points to a NUL-terminated string.
unsafe fn string<'a>(s: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if s.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-null and NUL-terminated, as the caller promised.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|e| Failure::invalid(format!("{what} is not UTF-8: {e}")))
}

fn hypervisor() -> Result<Arc<dyn Hypervisor>, Failure> {
    wanmig_datapath::backend::xen::open_hypervisor()
        .map_err(|e| Failure::from(XenMigrationError::Xen(e)))
}

/// Opens the save side for domain `domid` with `options` (comma-separated
/// `name=value`: `key=PATH` (required), `m=1`, `s=0`, `segment=NAME` with
/// `profile=PATH`, `listen=IP:PORT`, `advertise=HOST`, `downtime-ms=300`,
/// `max-rounds=30`, `verify=0`, `timeout-s=60`, `report=PATH`,
/// `progress=1`; README.md, "Xen (dom0)", says what each does). On success
/// `*out` is the new handle; on failure it is NULL.
///
/// # Safety
/// `options` is NULL or a NUL-terminated string; `out` is NULL or points to
/// writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wanmig_save_open(
    domid: u32,
    options: *const c_char,
    out: *mut *mut wanmig_save,
) -> wanmig_status {
    guard("wanmig_save_open", || {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        // SAFETY: `out` is non-null and points to storage for a pointer.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: as the caller promised.
        let options = unsafe { string(options, "options") }?;
        // Bad options are reported as such on any host.
        SaveOptions::parse(options)?;
        let save = XenSave::open(hypervisor()?, domid, options)?;
        let token = SAVES.insert(save);
        // SAFETY: as above.
        unsafe { out.write(std::ptr::without_provenance_mut(token)) };
        Ok(())
    })
}

/// Writes the body of the hand-off record (at most `WANMIG_HANDOFF_MAX`
/// bytes) into `buf` and its length into `*len`. If `cap` is too small,
/// nothing is written to `buf`, `*len` is the length needed and the call
/// fails with `WANMIG_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `buf` is NULL or points to `cap` writable bytes; `len` is NULL or points
/// to a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wanmig_save_handoff(
    save: *mut wanmig_save,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> wanmig_status {
    guard("wanmig_save_handoff", || {
        if len.is_null() {
            return Err(Failure::invalid("len is NULL"));
        }
        SAVES.with(save as usize, |s| {
            let body = s.handoff()?;
            // SAFETY: `len` is non-null and writable.
            unsafe { len.write(body.len()) };
            if buf.is_null() || cap < body.len() {
                return Err(Failure::invalid(format!(
                    "the hand-off needs {} bytes, the buffer has {cap}{}",
                    body.len(),
                    if buf.is_null() { " (buf is NULL)" } else { "" }
                )));
            }
            // SAFETY: `buf` holds `cap >= body.len()` writable bytes that do
            // not overlap `body` (ours).
            unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), buf, body.len()) };
            Ok(())
        })
    })
}

/// The C suspend callback, callable from the engine's side.
struct Suspend {
    cb: unsafe extern "C" fn(*mut c_void) -> c_int,
    opaque: *mut c_void,
}

// SAFETY: the engine calls the suspend closure on the thread that called
// `wanmig_save_memory` (the pre-copy loop runs there), as the header
// promises; it is only moved, never shared.
unsafe impl Send for Suspend {}

impl Suspend {
    fn call(&self) -> c_int {
        // SAFETY: `cb` is safe to call with `opaque` on this thread, as the
        // caller of `wanmig_save_memory` promised.
        unsafe { (self.cb)(self.opaque) }
    }
}

/// Migrates the domain's memory: waits for the destination engine to dial
/// (the address of the hand-off), runs the pre-copy rounds, calls
/// `suspend(opaque)` exactly once on this thread, sends what the guest
/// dirtied (and with `verify=1` the digests of the frozen frames), and
/// returns once the destination holds every frame. Then the toolstack writes the CPU and
/// device records as it always does. Call `wanmig_save_handoff` first.
///
/// # Safety
/// `suspend` is a function safe to call with `opaque` from this thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wanmig_save_memory(
    save: *mut wanmig_save,
    suspend: wanmig_suspend_cb,
    opaque: *mut c_void,
) -> wanmig_status {
    guard("wanmig_save_memory", || {
        let cb = suspend.ok_or_else(|| Failure::invalid("suspend is NULL"))?;
        SAVES.with(save as usize, |s| {
            let call = Suspend { cb, opaque };
            let suspend = Box::new(move || {
                let rc = call.call();
                if rc == 0 {
                    Ok(())
                } else {
                    Err(format!("the toolstack's suspend callback returned {rc}"))
                }
            });
            s.send_memory(suspend)?;
            Ok(())
        })
    })
}

/// Closes the save side; NULL is a no-op that succeeds. A closed handle
/// must not be used again (it is refused with `WANMIG_ERR_BAD_HANDLE`).
/// Fails with `WANMIG_ERR_STATE` (the handle is closed all the same) if
/// `wanmig_save_memory` never ran: the memory did not go through the
/// engine, so the save that asked for it must not count as one (a
/// toolstack whose libxenguest is not the patched one runs its own loop
/// instead and would otherwise report success).
#[unsafe(no_mangle)]
pub extern "C" fn wanmig_save_close(save: *mut wanmig_save) -> wanmig_status {
    guard("wanmig_save_close", || {
        if save.is_null() {
            return Ok(());
        }
        let attempted = SAVES.with(save as usize, |s| Ok(s.memory_attempted()));
        SAVES.remove(save as usize)?;
        match attempted {
            Ok(true) => Ok(()),
            Ok(false) => Err(Failure::new(
                WANMIG_ERR_STATE,
                "the save never handed the memory to the engine (wanmig_save_memory did not run: \
                 is the toolstack's libxenguest the patched one, and the save live?)",
            )),
            Err(f) => Err(f),
        }
    })
}

/// Opens the restore side for the new domain `domid` with `options`
/// (`key=PATH` (required), `verify=1`, `timeout-s=60`, `report=PATH`). On
/// success `*out` is the new handle; on failure it is NULL.
///
/// # Safety
/// As `wanmig_save_open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wanmig_restore_open(
    domid: u32,
    options: *const c_char,
    out: *mut *mut wanmig_restore,
) -> wanmig_status {
    guard("wanmig_restore_open", || {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        // SAFETY: `out` is non-null and points to storage for a pointer.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: as the caller promised.
        let options = unsafe { string(options, "options") }?;
        RestoreOptions::parse(options)?;
        let restore = XenRestore::open(hypervisor()?, domid, options)?;
        let token = RESTORES.insert(restore);
        // SAFETY: as above.
        unsafe { out.write(std::ptr::without_provenance_mut(token)) };
        Ok(())
    })
}

/// Receives the memory the hand-off record (`handoff`, `len` bytes) names:
/// dials the source engine, populates and writes every frame (with
/// `verify=1` on both sides, compares each with the source's frozen frame),
/// and calls `populated(opaque, pfns, n)` (unless NULL) with every pfn it
/// populated before it returns. Returns
/// once every frame is in place; the domain stays paused.
///
/// # Safety
/// `handoff` is NULL or points to `len` readable bytes; `populated` is a
/// function safe to call with `opaque` from this thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wanmig_restore_memory(
    restore: *mut wanmig_restore,
    handoff: *const u8,
    len: usize,
    populated: wanmig_populated_cb,
    opaque: *mut c_void,
) -> wanmig_status {
    guard("wanmig_restore_memory", || {
        if handoff.is_null() {
            return Err(Failure::invalid("handoff is NULL"));
        }
        if len > WANMIG_HANDOFF_MAX {
            return Err(Failure::invalid(format!(
                "a hand-off of {len} bytes (at most {WANMIG_HANDOFF_MAX})"
            )));
        }
        // SAFETY: non-null, `len` readable bytes, as the caller promised;
        // copied before anything else runs.
        let bytes = unsafe { std::slice::from_raw_parts(handoff, len) }.to_vec();
        RESTORES.with(restore as usize, |r| {
            let mut report = |pfns: &[u64]| -> Result<(), String> {
                let Some(cb) = populated else { return Ok(()) };
                // SAFETY: `pfns` is a live slice of `pfns.len()` u64s; the
                // callback is safe to call with `opaque` on this thread.
                let rc = unsafe { cb(opaque, pfns.as_ptr(), pfns.len()) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(format!("the populated callback returned {rc}"))
                }
            };
            r.receive_memory(&bytes, &mut report)?;
            Ok(())
        })
    })
}

/// Closes the restore side; NULL is a no-op that succeeds.
#[unsafe(no_mangle)]
pub extern "C" fn wanmig_restore_close(restore: *mut wanmig_restore) -> wanmig_status {
    guard("wanmig_restore_close", || {
        if restore.is_null() {
            return Ok(());
        }
        RESTORES.remove(restore as usize)
    })
}
