//! Handles: opaque tokens for objects kept here, so that a null, closed,
//! forged or wrongly typed handle is refused instead of dereferenced.
//!
//! A handle's value is a token, never a pointer to memory: `(serial << 4) |
//! kind`, unique for the life of the process (never reused, so a stale
//! handle stays stale). The object behind it sits in a registry of its kind;
//! a call clones it out of the registry and holds its lock for the call, so
//! a second call on the same handle from another thread gets
//! `WANMIG_ERR_STATE` instead of waiting, and a close during a call frees
//! the object only when that call returns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use crate::status::{Failure, WANMIG_ERR_BAD_HANDLE, WANMIG_ERR_STATE};

static SERIAL: AtomicUsize = AtomicUsize::new(1);

/// The objects of one kind behind their handles.
#[derive(Debug)]
pub(crate) struct Registry<T> {
    kind: usize,
    what: &'static str,
    live: Mutex<Option<HashMap<usize, Arc<Mutex<T>>>>>,
}

impl<T> Registry<T> {
    pub const fn new(kind: usize, what: &'static str) -> Self {
        Registry {
            kind,
            what,
            live: Mutex::new(None),
        }
    }

    fn map(&self) -> MutexGuard<'_, Option<HashMap<usize, Arc<Mutex<T>>>>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `object`; returns its handle.
    pub fn insert(&self, object: T) -> usize {
        let token = (SERIAL.fetch_add(1, Ordering::Relaxed) << 4) | self.kind;
        self.map()
            .get_or_insert_with(HashMap::new)
            .insert(token, Arc::new(Mutex::new(object)));
        token
    }

    fn get(&self, handle: usize) -> Result<Arc<Mutex<T>>, Failure> {
        if handle == 0 {
            return Err(Failure::new(
                WANMIG_ERR_BAD_HANDLE,
                format!("null {} handle", self.what),
            ));
        }
        self.map()
            .as_ref()
            .and_then(|m| m.get(&handle).cloned())
            .ok_or_else(|| {
                Failure::new(
                    WANMIG_ERR_BAD_HANDLE,
                    format!(
                        "{handle:#x} is not an open {} handle (closed, or never opened)",
                        self.what
                    ),
                )
            })
    }

    /// Runs `f` on the object behind `handle`, alone.
    pub fn with<R>(
        &self,
        handle: usize,
        f: impl FnOnce(&mut T) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        let object = self.get(handle)?;
        let mut guard = match object.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => {
                return Err(Failure::new(
                    WANMIG_ERR_STATE,
                    format!("the {} handle is in use by another call", self.what),
                ));
            }
            // A call that panicked left it: its state is not to be trusted.
            Err(TryLockError::Poisoned(_)) => {
                return Err(Failure::new(
                    WANMIG_ERR_STATE,
                    format!(
                        "an earlier call on this {} handle failed internally: close it",
                        self.what
                    ),
                ));
            }
        };
        f(&mut guard)
    }

    /// Forgets `handle`; its object goes once no call uses it.
    pub fn remove(&self, handle: usize) -> Result<(), Failure> {
        self.get(handle)?;
        if let Some(m) = self.map().as_mut() {
            m.remove(&handle);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_unique_typed_and_stay_stale_once_closed() {
        static A: Registry<u32> = Registry::new(1, "a");
        static B: Registry<u32> = Registry::new(2, "b");
        let a = A.insert(7);
        let b = B.insert(8);
        assert_ne!(a, b);
        assert_eq!(A.with(a, |v| Ok(*v)).unwrap(), 7);
        assert_eq!(
            A.with(b, |v| Ok(*v)).unwrap_err().status,
            WANMIG_ERR_BAD_HANDLE
        );
        assert_eq!(
            A.with(0, |v| Ok(*v)).unwrap_err().status,
            WANMIG_ERR_BAD_HANDLE
        );
        A.remove(a).unwrap();
        assert_eq!(
            A.with(a, |v| Ok(*v)).unwrap_err().status,
            WANMIG_ERR_BAD_HANDLE
        );
        assert_eq!(A.remove(a).unwrap_err().status, WANMIG_ERR_BAD_HANDLE);
        let a2 = A.insert(9);
        assert_ne!(a2, a);
        // A second call while one is inside: refused, not blocked.
        let inner = A.with(a2, |_| Ok(A.with(a2, |_| Ok(())).unwrap_err().status));
        assert_eq!(inner.unwrap(), WANMIG_ERR_STATE);
    }
}
