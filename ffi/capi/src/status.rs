//! Status codes, the per-thread error message, and the guard every entry
//! point runs its body in (no panic ever crosses into C).

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use wanmig_datapath::backend::xen::{XenError, XenMigrationError};

/// What every call returns: `WANMIG_OK` or one of the `WANMIG_ERR_*` codes;
/// the message of the last failure on the calling thread is
/// `wanmig_last_error()`.
#[allow(non_camel_case_types)]
pub type wanmig_status = i32;

/// Success.
pub const WANMIG_OK: wanmig_status = 0;
/// A null pointer, a length too small, malformed options or hand-off.
pub const WANMIG_ERR_INVALID_ARGUMENT: wanmig_status = 1;
/// A null, closed or unknown handle.
pub const WANMIG_ERR_BAD_HANDLE: wanmig_status = 2;
/// Called out of order, or while another thread is inside a call on the
/// same handle.
pub const WANMIG_ERR_STATE: wanmig_status = 3;
/// This build or this domain cannot do what was asked (built without Xen,
/// a PV guest, a plan that needs post-copy or disks).
pub const WANMIG_ERR_UNSUPPORTED: wanmig_status = 4;
/// A Xen call failed (no such domain, log-dirty refused, ...).
pub const WANMIG_ERR_XEN: wanmig_status = 5;
/// The key file is missing, unreadable, readable by others, or malformed.
pub const WANMIG_ERR_KEY: wanmig_status = 6;
/// Listening, dialling or the authenticated handshake with the peer engine
/// failed.
pub const WANMIG_ERR_NETWORK: wanmig_status = 7;
/// The toolstack's suspend callback failed.
pub const WANMIG_ERR_SUSPEND: wanmig_status = 8;
/// The migration failed (the peer gave up, a protocol violation, frames
/// that differ from the source's frozen frames).
pub const WANMIG_ERR_MIGRATION: wanmig_status = 9;
/// A bug in wanmig, caught at the boundary.
pub const WANMIG_ERR_INTERNAL: wanmig_status = 10;
/// A file named in the options (the report) could not be written.
pub const WANMIG_ERR_IO: wanmig_status = 11;

/// The name of `status` (`"WANMIG_OK"`, ...), or `"unknown"`.
pub(crate) fn name(status: wanmig_status) -> &'static CStr {
    match status {
        WANMIG_OK => c"WANMIG_OK",
        WANMIG_ERR_INVALID_ARGUMENT => c"WANMIG_ERR_INVALID_ARGUMENT",
        WANMIG_ERR_BAD_HANDLE => c"WANMIG_ERR_BAD_HANDLE",
        WANMIG_ERR_STATE => c"WANMIG_ERR_STATE",
        WANMIG_ERR_UNSUPPORTED => c"WANMIG_ERR_UNSUPPORTED",
        WANMIG_ERR_XEN => c"WANMIG_ERR_XEN",
        WANMIG_ERR_KEY => c"WANMIG_ERR_KEY",
        WANMIG_ERR_NETWORK => c"WANMIG_ERR_NETWORK",
        WANMIG_ERR_SUSPEND => c"WANMIG_ERR_SUSPEND",
        WANMIG_ERR_MIGRATION => c"WANMIG_ERR_MIGRATION",
        WANMIG_ERR_INTERNAL => c"WANMIG_ERR_INTERNAL",
        WANMIG_ERR_IO => c"WANMIG_ERR_IO",
        _ => c"unknown",
    }
}

/// A failed call: its status and message.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: wanmig_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: wanmig_status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(WANMIG_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<XenMigrationError> for Failure {
    fn from(e: XenMigrationError) -> Self {
        use XenMigrationError as E;
        let status = match &e {
            E::Option { .. } | E::Handoff(_) => WANMIG_ERR_INVALID_ARGUMENT,
            E::Unsupported(_) | E::Xen(XenError::NotBuilt | XenError::Unsupported { .. }) => {
                WANMIG_ERR_UNSUPPORTED
            }
            E::Xen(_) => WANMIG_ERR_XEN,
            E::Key { .. } => WANMIG_ERR_KEY,
            E::Network(_) | E::NoDestination { .. } | E::Resolve { .. } => WANMIG_ERR_NETWORK,
            E::Suspend(_) => WANMIG_ERR_SUSPEND,
            E::Planning(_)
            | E::Engine(_)
            | E::Integrity { .. }
            | E::NotChecked
            | E::Populated(_) => WANMIG_ERR_MIGRATION,
            E::Report { .. } => WANMIG_ERR_IO,
            E::State(_) => WANMIG_ERR_STATE,
        };
        Failure::new(status, wanmig_datapath::error_chain(&e))
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A NUL inside the message would cut it: show it as a space.
    let clean = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // `try_with`: a thread being torn down has no message to keep, and this
    // must never panic (it runs outside the guard).
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = clean);
}

/// The calling thread's last message (valid until its next call); "" on a
/// thread being torn down.
pub(crate) fn last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// Runs `body`: its failure, or a panic inside it, becomes a status and the
/// thread's message; success clears the message.
pub(crate) fn guard(what: &str, body: impl FnOnce() -> Result<(), Failure>) -> wanmig_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            WANMIG_OK
        }
        Ok(Err(f)) => {
            set_last_error(&format!("{what}: {}", f.message));
            f.status
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            set_last_error(&format!("{what}: internal error (a bug in wanmig): {why}"));
            WANMIG_ERR_INTERNAL
        }
    }
}
