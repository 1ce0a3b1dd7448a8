//! An export served on a unix socket, a thread per client, until dropped.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::server::{Export, NbdError, ServeEnd, serve};

/// The server could not be started.
#[derive(Debug, thiserror::Error)]
#[error("NBD socket {path}")]
pub struct NbdServerError {
    /// The socket path.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

/// How each finished connection ended.
type Outcomes = Arc<Mutex<Vec<Result<ServeEnd, NbdError>>>>;

/// An export on a unix socket. Dropping it (or [`stop`](Self::stop)) closes
/// every connection and removes the socket.
#[derive(Debug)]
pub struct NbdServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    clients: Arc<Mutex<Vec<Client>>>,
    outcomes: Outcomes,
    acceptor: Option<JoinHandle<()>>,
}

/// A connection's socket (to shut it down) and thread.
#[derive(Debug)]
struct Client {
    socket: UnixStream,
    thread: JoinHandle<()>,
}

impl NbdServer {
    /// Serves `export` on a new socket at `path` (a stale socket there is
    /// replaced).
    pub fn start(path: &Path, export: Export) -> Result<Self, NbdServerError> {
        let err = |source| NbdServerError {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(Mutex::new(Vec::new()));
        let outcomes: Outcomes = Arc::default();
        let acceptor = {
            let (stop, clients, outcomes) = (stop.clone(), clients.clone(), outcomes.clone());
            std::thread::Builder::new()
                .name("wanmig-nbd".into())
                .spawn(move || accept_loop(listener, export, &stop, &clients, &outcomes))
                .map_err(err)?
        };
        Ok(NbdServer {
            path: path.to_path_buf(),
            stop,
            clients,
            outcomes,
            acceptor: Some(acceptor),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the connections that ended so far ended (taken).
    pub fn take_outcomes(&self) -> Vec<Result<ServeEnd, NbdError>> {
        std::mem::take(&mut *self.outcomes.lock().expect("outcomes lock"))
    }

    /// Closes every connection, waits for their threads, removes the socket.
    pub fn stop(mut self) -> Vec<Result<ServeEnd, NbdError>> {
        self.shutdown();
        self.take_outcomes()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let clients = std::mem::take(&mut *self.clients.lock().expect("clients lock"));
        for c in &clients {
            let _ = c.socket.shutdown(std::net::Shutdown::Both);
        }
        for c in clients {
            let _ = c.thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: UnixListener,
    export: Export,
    stop: &AtomicBool,
    clients: &Mutex<Vec<Client>>,
    outcomes: &Outcomes,
) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let Ok(socket) = stream.try_clone() else {
                    continue;
                };
                if stream.set_nonblocking(false).is_err() {
                    continue;
                }
                let (export, outcomes) = (export.clone(), outcomes.clone());
                let spawned = std::thread::Builder::new()
                    .name("wanmig-nbd-client".into())
                    .spawn(move || {
                        let end = serve(&stream, &export);
                        // The acceptor holds a clone: close for real.
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        outcomes.lock().expect("outcomes lock").push(end);
                    });
                let mut clients = clients.lock().expect("clients lock");
                // Forget the connections that ended.
                clients.retain(|c| !c.thread.is_finished());
                if let Ok(thread) = spawned {
                    clients.push(Client { socket, thread });
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
