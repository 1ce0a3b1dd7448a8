//! A small, blocking, typed QMP client over a unix socket.
//!
//! QMP is line-delimited JSON. On connection QEMU sends a greeting; the client
//! answers `qmp_capabilities` and may then `execute` commands. Every command
//! carries an `id` the reply echoes, so a late reply to a command that timed
//! out is recognised and dropped instead of being taken for the next one.
//! Asynchronous events (`STOP`, `RESUME`, `MIGRATION`, `MIGRATION_PASS`,
//! `SHUTDOWN`, ...) may arrive between replies; they are buffered and read
//! with [`QmpClient::take_events`] or [`QmpClient::wait_event`].
//!
//! Nothing QEMU sends can make the client panic: malformed input is a
//! [`QmpError::Protocol`], a closed socket is a [`QmpError::Disconnected`].
//! QEMU serves one QMP client per monitor socket at a time; a second
//! connection waits for the first to close (and then times out here).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::qapi::{MigrationInfo, StatusInfo};

/// The oldest QEMU the engine drives (x-ignore-shared, and TCG pre-copy
/// without the memory corruption of 7.2).
pub const MIN_QEMU_VERSION: QemuVersion = QemuVersion {
    major: 9,
    minor: 0,
    micro: 0,
};

/// Limit for one command's reply unless changed with
/// [`QmpClient::set_command_timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest line accepted from QEMU (`query-qmp-schema` is ~200 KiB).
pub const MAX_LINE: usize = 16 << 20;

/// Events kept while nobody takes them; the oldest go first.
pub const MAX_BUFFERED_EVENTS: usize = 4096;

/// Pause between attempts while the socket does not exist yet.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// A QEMU version, from the QMP greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QemuVersion {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// What QEMU announced when the client connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpGreeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// The distribution's package string (may be empty).
    pub package: String,
    /// Capabilities QEMU offers (`oob`); none is enabled by this client.
    pub capabilities: Vec<String>,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Its name (`STOP`, `RESUME`, `MIGRATION`, ...).
    pub name: String,
    /// Its `data` member (`Value::Null` when absent).
    pub data: Value,
    /// When QEMU emitted it (host wall clock), if it said.
    pub timestamp: Option<SystemTime>,
}

/// A QMP failure; `what`/`command` name the operation it happened in.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// A socket operation failed.
    #[error("QMP I/O error during {what}")]
    Io {
        /// The operation.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A limit passed before QEMU answered.
    #[error("QMP timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The limit.
        after: Duration,
    },
    /// QEMU sent something that is not valid QMP.
    #[error("QMP protocol error during {what}: {detail}")]
    Protocol {
        /// The operation.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU closed the connection (it quit or died).
    #[error("QMP connection closed by QEMU during {what}")]
    Disconnected {
        /// The operation.
        what: String,
    },
    /// QEMU is older than [`MIN_QEMU_VERSION`].
    #[error("QEMU {found} is too old: wanmig needs {min} or newer")]
    Version {
        /// The version QEMU announced.
        found: QemuVersion,
        /// The minimum.
        min: QemuVersion,
    },
}

impl QmpError {
    /// A reply to `what` that does not have the shape QEMU documents.
    pub fn protocol(what: &str, detail: impl Into<String>) -> Self {
        QmpError::Protocol {
            what: what.to_string(),
            detail: detail.into(),
        }
    }
}

/// One message from QEMU, sorted.
enum Incoming {
    Event(QmpEvent),
    Reply {
        id: Option<Value>,
        result: Result<Value, (String, String)>,
    },
}

/// A connected QMP client (see the module docs).
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    path: PathBuf,
    greeting: QmpGreeting,
    rbuf: Vec<u8>,
    /// Bytes of `rbuf` already known to hold no newline.
    scanned: usize,
    events: VecDeque<QmpEvent>,
    dropped_events: u64,
    next_id: u64,
    command_timeout: Duration,
    closed: bool,
}

impl QmpClient {
    /// The pid of the process at the other end of the QMP socket
    /// (`SO_PEERCRED`): QEMU's.
    pub fn peer_pid(&self) -> Option<u32> {
        use std::os::fd::AsRawFd;
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: SO_PEERCRED writes one `struct ucred` of `len` bytes into
        // `cred`, a live local.
        let r = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
    }

    /// Connects to the QMP socket at `path`, retrying until it appears and
    /// accepts (QEMU starting), reads the greeting, checks the version and
    /// negotiates capabilities, all within `timeout`.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<QmpClient, QmpError> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if Instant::now() + CONNECT_RETRY > deadline {
                        return Err(QmpError::Timeout {
                            what: format!("QMP socket {} to accept a connection", path.display()),
                            after: timeout,
                        });
                    }
                    std::thread::sleep(CONNECT_RETRY);
                }
                Err(source) => {
                    return Err(QmpError::Io {
                        what: format!("connecting to {}", path.display()),
                        source,
                    });
                }
            }
        };
        Self::handshake(stream, path.to_path_buf(), deadline, timeout)
    }

    /// Runs the greeting and capabilities negotiation on an already
    /// connected stream (`path` is only used in messages).
    pub fn from_stream(
        stream: UnixStream,
        path: impl Into<PathBuf>,
        timeout: Duration,
    ) -> Result<QmpClient, QmpError> {
        Self::handshake(stream, path.into(), Instant::now() + timeout, timeout)
    }

    fn handshake(
        stream: UnixStream,
        path: PathBuf,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<QmpClient, QmpError> {
        let mut client = QmpClient {
            stream,
            path,
            greeting: QmpGreeting {
                version: QemuVersion {
                    major: 0,
                    minor: 0,
                    micro: 0,
                },
                package: String::new(),
                capabilities: Vec::new(),
            },
            rbuf: Vec::new(),
            scanned: 0,
            events: VecDeque::new(),
            dropped_events: 0,
            next_id: 1,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            closed: false,
        };
        let what = "the QMP greeting";
        let line = client.read_value(deadline, timeout, what)?;
        client.greeting = parse_greeting(&line)?;
        if client.greeting.version < MIN_QEMU_VERSION {
            return Err(QmpError::Version {
                found: client.greeting.version,
                min: MIN_QEMU_VERSION,
            });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        client.execute_within(
            "qmp_capabilities",
            None,
            remaining.max(Duration::from_millis(1)),
        )?;
        Ok(client)
    }

    /// What QEMU announced.
    pub fn greeting(&self) -> &QmpGreeting {
        &self.greeting
    }

    /// The socket path this client was connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the limit for each command's reply.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Whether the connection is still open, as far as the client has seen
    /// (a closed socket is noticed on the next read or write).
    pub fn is_connected(&self) -> bool {
        !self.closed
    }

    /// Events dropped because more than [`MAX_BUFFERED_EVENTS`] were waiting.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// Runs `command` with `args` (a JSON object, or `None`) and returns its
    /// `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_within(command, args, self.command_timeout)
    }

    fn execute_within(
        &mut self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.closed {
            return Err(QmpError::Disconnected {
                what: command.to_string(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::from(command));
        match args {
            None => {}
            Some(Value::Object(a)) => {
                msg.insert("arguments".into(), Value::Object(a));
            }
            Some(other) => {
                return Err(QmpError::protocol(
                    command,
                    format!("arguments must be a JSON object, not {other}"),
                ));
            }
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = Value::Object(msg).to_string();
        line.push('\n');
        self.send_all(line.as_bytes(), command)?;

        let deadline = Instant::now() + timeout;
        loop {
            match self.read_incoming(deadline, timeout, command)? {
                Incoming::Event(e) => self.buffer_event(e),
                Incoming::Reply { id: Some(got), .. } if got.as_u64() != Some(id) => {
                    // A reply to an earlier command that timed out: drop it.
                }
                Incoming::Reply { id: None, result } => {
                    return Err(QmpError::protocol(
                        command,
                        format!("reply without id: {result:?}"),
                    ));
                }
                Incoming::Reply { result, .. } => {
                    return result.map_err(|(class, desc)| QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    });
                }
            }
        }
    }

    /// Runs `command` and decodes its reply as `T`.
    pub fn execute_as<T: DeserializeOwned>(
        &mut self,
        command: &str,
        args: Option<Value>,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, args)?;
        serde_json::from_value(v).map_err(|e| QmpError::protocol(command, e.to_string()))
    }

    /// The events received so far (including any already waiting on the
    /// socket), oldest first; the buffer is emptied.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.pump_nonblocking();
        self.events.drain(..).collect()
    }

    /// Waits for the next event called `name` (a buffered one first) and
    /// removes it from the buffer; other events stay buffered.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e.name == name) {
            return Ok(self.events.remove(i).expect("index from position"));
        }
        let what = format!("event {name}");
        if self.closed {
            return Err(QmpError::Disconnected { what });
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_incoming(deadline, timeout, &what)? {
                Incoming::Event(e) if e.name == name => return Ok(e),
                Incoming::Event(e) => self.buffer_event(e),
                Incoming::Reply { .. } => {}
            }
        }
    }

    /// Waits for the next event, whatever its name (a buffered one first),
    /// and removes it from the buffer.
    pub fn next_event(&mut self, timeout: Duration) -> Result<QmpEvent, QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        let what = "the next event";
        if self.closed {
            return Err(QmpError::Disconnected { what: what.into() });
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_incoming(deadline, timeout, what)? {
                Incoming::Event(e) => return Ok(e),
                Incoming::Reply { .. } => {}
            }
        }
    }

    /// `stop`: pauses the guest.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// `cont`: resumes the guest.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        self.execute_as("query-status", None)
    }

    /// `migrate-set-capabilities` with `(name, state)` pairs
    /// (e.g. `("x-ignore-shared", true)`).
    pub fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({"capability": c, "state": s}))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(drop)
    }

    /// `migrate` to `uri` (`unix:/path`, `tcp:host:port`, `fd:name`, ...);
    /// returns once the migration started (see [`QmpClient::query_migrate`]).
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `migrate-incoming` on `uri` (QEMU started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `migrate_cancel`.
    pub fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None).map(drop)
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        self.execute_as("query-migrate", None)
    }

    /// Polls `query-migrate` every `interval` until the migration completed,
    /// failed or was cancelled, and returns that last reply.
    pub fn wait_migration(
        &mut self,
        timeout: Duration,
        interval: Duration,
    ) -> Result<MigrationInfo, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            if info.status.as_ref().is_some_and(|s| s.is_finished()) {
                return Ok(info);
            }
            if Instant::now() + interval > deadline {
                return Err(QmpError::Timeout {
                    what: format!("the migration to finish (last status {:?})", info.status),
                    after: timeout,
                });
            }
            std::thread::sleep(interval);
        }
    }

    /// `quit`: QEMU exits. A connection closed before the reply counts as
    /// success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Disconnected { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    // --- plumbing -------------------------------------------------------------

    fn buffer_event(&mut self, e: QmpEvent) {
        if self.events.len() >= MAX_BUFFERED_EVENTS {
            self.events.pop_front();
            self.dropped_events += 1;
        }
        self.events.push_back(e);
    }

    fn send_all(&mut self, mut bytes: &[u8], what: &str) -> Result<(), QmpError> {
        while !bytes.is_empty() {
            // SAFETY: `bytes` is a valid buffer for its length; MSG_NOSIGNAL
            // turns a closed peer into EPIPE instead of SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                bytes = &bytes[n as usize..];
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::NotConnected => {
                    self.closed = true;
                    return Err(QmpError::Disconnected {
                        what: what.to_string(),
                    });
                }
                _ => {
                    return Err(QmpError::Io {
                        what: format!("sending {what}"),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// Takes one complete line out of the buffer, if there is one.
    fn take_line(&mut self) -> Option<Vec<u8>> {
        let Some(pos) = self.rbuf[self.scanned..].iter().position(|&b| b == b'\n') else {
            self.scanned = self.rbuf.len();
            return None;
        };
        let pos = self.scanned + pos;
        self.scanned = 0;
        let mut line: Vec<u8> = self.rbuf.drain(..=pos).collect();
        line.pop();
        Some(line)
    }

    /// Reads once from the socket into the buffer (blocking until `deadline`).
    /// `Ok(false)`: nothing arrived before the deadline.
    fn fill(&mut self, deadline: Option<Instant>, what: &str) -> Result<bool, QmpError> {
        if self.rbuf.len() > MAX_LINE {
            return Err(QmpError::protocol(
                what,
                format!("a line longer than {MAX_LINE} bytes"),
            ));
        }
        let wait = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Ok(false),
            },
            None => None,
        };
        self.stream
            .set_read_timeout(wait)
            .map_err(|source| QmpError::Io {
                what: format!("setting the read timeout for {what}"),
                source,
            })?;
        let mut chunk = [0u8; 16 << 10];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    return Err(QmpError::Disconnected {
                        what: what.to_string(),
                    });
                }
                Ok(n) => {
                    self.rbuf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(false),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                        self.closed = true;
                        return Err(QmpError::Disconnected {
                            what: what.to_string(),
                        });
                    }
                    _ => {
                        return Err(QmpError::Io {
                            what: format!("reading {what}"),
                            source: e,
                        });
                    }
                },
            }
        }
    }

    /// The next non-empty JSON object from QEMU.
    fn read_value(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) -> Result<Map<String, Value>, QmpError> {
        loop {
            while let Some(line) = self.take_line() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return match serde_json::from_slice::<Value>(&line) {
                    Ok(Value::Object(m)) => Ok(m),
                    Ok(other) => Err(QmpError::protocol(
                        what,
                        format!(
                            "expected a JSON object, got {}",
                            abbreviate(&other.to_string())
                        ),
                    )),
                    Err(e) => Err(QmpError::protocol(
                        what,
                        format!(
                            "bad JSON ({e}): {}",
                            abbreviate(&String::from_utf8_lossy(&line))
                        ),
                    )),
                };
            }
            if !self.fill(Some(deadline), what)? {
                return Err(QmpError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                });
            }
        }
    }

    fn read_incoming(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) -> Result<Incoming, QmpError> {
        let m = self.read_value(deadline, timeout, what)?;
        classify(m, what)
    }

    /// Reads whatever is already waiting on the socket, without blocking,
    /// and buffers its events. A closed or broken socket only marks the
    /// client closed (the next command reports it).
    fn pump_nonblocking(&mut self) {
        if self.closed || self.stream.set_nonblocking(true).is_err() {
            return;
        }
        while let Ok(true) = self.fill(None, "pending events") {}
        let _ = self.stream.set_nonblocking(false);
        while let Some(line) = self.take_line() {
            let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if let Ok(Incoming::Event(e)) = classify(m, "pending events") {
                self.buffer_event(e);
            }
        }
    }
}

fn abbreviate(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

fn classify(mut m: Map<String, Value>, what: &str) -> Result<Incoming, QmpError> {
    if let Some(name) = m.get("event") {
        let Some(name) = name.as_str() else {
            return Err(QmpError::protocol(what, "event name is not a string"));
        };
        let name = name.to_string();
        let timestamp = m.get("timestamp").and_then(|t| {
            let s = u64::try_from(t.get("seconds")?.as_i64()?).ok()?;
            let us = u64::try_from(t.get("microseconds")?.as_i64()?).ok()?;
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s) + Duration::from_micros(us))
        });
        let data = m.remove("data").unwrap_or(Value::Null);
        return Ok(Incoming::Event(QmpEvent {
            name,
            data,
            timestamp,
        }));
    }
    let id = m.remove("id");
    if let Some(ret) = m.remove("return") {
        return Ok(Incoming::Reply {
            id,
            result: Ok(ret),
        });
    }
    if let Some(err) = m.remove("error") {
        let class = err
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("(no class)")
            .to_string();
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("(no description)")
            .to_string();
        return Ok(Incoming::Reply {
            id,
            result: Err((class, desc)),
        });
    }
    let keys: Vec<&String> = m.keys().collect();
    Err(QmpError::protocol(
        what,
        format!("a message that is neither event nor reply (keys {keys:?})"),
    ))
}

fn parse_greeting(m: &Map<String, Value>) -> Result<QmpGreeting, QmpError> {
    let what = "the QMP greeting";
    let qmp = m
        .get("QMP")
        .ok_or_else(|| QmpError::protocol(what, "no \"QMP\" member (not a QMP socket?)"))?;
    let v = qmp
        .get("version")
        .and_then(|v| v.get("qemu"))
        .ok_or_else(|| QmpError::protocol(what, "no version.qemu"))?;
    let num = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::protocol(what, format!("version.qemu.{k} is not a number")))
    };
    let version = QemuVersion {
        major: num("major")?,
        minor: num("minor")?,
        micro: num("micro")?,
    };
    let package = qmp
        .get("version")
        .and_then(|v| v.get("package"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim()
        .to_string();
    let capabilities = qmp
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Ok(QmpGreeting {
        version,
        package,
        capabilities,
    })
}

#[cfg(test)]
mod tests {
    //! The client against a scripted peer on a real socket pair: everything
    //! a broken or hostile QMP server can send ends in a typed error.

    use super::*;
    use std::io::{BufRead, BufReader, Write};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2 "}, "capabilities": ["oob"]}}"#;

    /// Runs `script` as the server side; returns the connected client's result.
    fn with_server(
        script: impl FnOnce(&mut BufReader<UnixStream>, &mut UnixStream) + Send + 'static,
        timeout: Duration,
    ) -> (Result<QmpClient, QmpError>, std::thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = BufReader::new(b);
            script(&mut r, &mut w);
        });
        (QmpClient::from_stream(a, "pair", timeout), server)
    }

    /// Reads one command and returns its id.
    fn read_cmd(r: &mut BufReader<UnixStream>) -> (String, Value) {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let v: Value = serde_json::from_str(&l).unwrap();
        (v["execute"].as_str().unwrap().to_string(), v["id"].clone())
    }

    fn greet(r: &mut BufReader<UnixStream>, w: &mut UnixStream) {
        writeln!(w, "{GREETING}").unwrap();
        let (cmd, id) = read_cmd(r);
        assert_eq!(cmd, "qmp_capabilities");
        writeln!(w, r#"{{"return": {{}}, "id": {id}}}"#).unwrap();
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn greeting_capabilities_events_and_stale_replies() {
        let (client, server) = with_server(
            |r, w| {
                greet(r, w);
                let (cmd, id) = read_cmd(r);
                assert_eq!(cmd, "query-status");
                // An event, a stale reply and a blank line before the answer.
                writeln!(
                    w,
                    r#"{{"timestamp": {{"seconds": 1700000000, "microseconds": 5}}, "event": "STOP"}}"#
                )
                .unwrap();
                writeln!(w, r#"{{"return": {{"stale": true}}, "id": 999}}"#).unwrap();
                writeln!(w).unwrap();
                writeln!(
                    w,
                    r#"{{"return": {{"status": "paused", "running": false}}, "id": {id}}}"#
                )
                .unwrap();
                writeln!(w, r#"{{"event": "RESUME", "data": {{"x": 1}}}}"#).unwrap();
                writeln!(w, r#"{{"event": "SHUTDOWN"}}"#).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            },
            T,
        );
        let mut c = client.unwrap();
        assert_eq!(
            c.greeting().version,
            QemuVersion {
                major: 10,
                minor: 0,
                micro: 2
            }
        );
        assert_eq!(c.greeting().package, "Debian 1:10.0.2");
        assert_eq!(c.greeting().capabilities, ["oob"]);
        let s = c.query_status().unwrap();
        assert_eq!(s.status, super::super::qapi::RunState::Paused);
        // SHUTDOWN is waited for first; RESUME stays buffered.
        let e = c.wait_event("SHUTDOWN", T).unwrap();
        assert_eq!(e.data, Value::Null);
        let rest = c.take_events();
        assert_eq!(
            rest.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["STOP", "RESUME"]
        );
        assert_eq!(
            rest[0].timestamp,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5_000))
        );
        assert_eq!(rest[1].data["x"], 1);
        server.join().unwrap();
        assert!(matches!(
            c.execute("query-status", None),
            Err(QmpError::Disconnected { .. })
        ));
        assert!(!c.is_connected());
        assert!(c.quit().is_ok());
    }

    #[test]
    fn next_event_takes_buffered_events_first_then_waits_for_any_name() {
        let (client, server) = with_server(
            |r, w| {
                greet(r, w);
                let (_, id) = read_cmd(r);
                writeln!(w, r#"{{"event": "STOP"}}"#).unwrap();
                writeln!(w, r#"{{"return": {{}}, "id": {id}}}"#).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                writeln!(
                    w,
                    r#"{{"event": "MIGRATION", "data": {{"status": "completed"}}}}"#
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(300));
            },
            T,
        );
        let mut c = client.unwrap();
        c.execute("stop", None).unwrap();
        assert_eq!(c.next_event(T).unwrap().name, "STOP");
        let e = c.next_event(T).unwrap();
        assert_eq!(
            (e.name.as_str(), &e.data["status"]),
            ("MIGRATION", &json!("completed"))
        );
        assert!(matches!(
            c.next_event(Duration::from_millis(50)),
            Err(QmpError::Timeout { .. })
        ));
        server.join().unwrap();
        assert!(c.next_event(T).is_err());
    }

    #[test]
    fn command_errors_carry_class_and_description() {
        let (client, server) = with_server(
            |r, w| {
                greet(r, w);
                let (_, id) = read_cmd(r);
                writeln!(
                    w,
                    r#"{{"id": {id}, "error": {{"class": "CommandNotFound", "desc": "The command nope has not been found"}}}}"#
                )
                .unwrap();
                let (_, id) = read_cmd(r);
                writeln!(w, r#"{{"id": {id}, "error": 7}}"#).unwrap();
            },
            T,
        );
        let mut c = client.unwrap();
        match c.execute("nope", None) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "nope");
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("nope"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.execute("odd", None),
            Err(QmpError::Command { class, .. }) if class == "(no class)"
        ));
        server.join().unwrap();
    }

    #[test]
    fn garbage_is_a_protocol_error_never_a_panic() {
        let cases: Vec<(&str, &str)> = vec![
            ("not json at all", "bad JSON"),
            ("[1, 2, 3]", "expected a JSON object"),
            (r#"{"hello": 1}"#, "no \"QMP\" member"),
            (
                r#"{"QMP": {"version": {"qemu": {"major": "ten"}}}}"#,
                "major",
            ),
            (r#"{"QMP": {}}"#, "version.qemu"),
            ("\u{0}\u{1}\u{2}{", "bad JSON"),
        ];
        for (greeting, needle) in cases {
            let g = greeting.to_string();
            let (client, server) = with_server(
                move |_, w| {
                    let _ = writeln!(w, "{g}");
                },
                T,
            );
            match client {
                Err(QmpError::Protocol { detail, .. }) => {
                    assert!(detail.contains(needle), "{greeting}: {detail}")
                }
                other => panic!("{greeting}: {other:?}"),
            }
            server.join().unwrap();
        }
        // Garbage after a good handshake.
        let (client, server) = with_server(
            |r, w| {
                greet(r, w);
                let (_, _) = read_cmd(r);
                writeln!(w, r#"{{"neither": true}}"#).unwrap();
                let (_, id) = read_cmd(r);
                writeln!(w, r#"{{"return": {{"status": 5}}, "id": {id}}}"#).unwrap();
                let (_, _) = read_cmd(r);
                writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
                let (_, _) = read_cmd(r);
                writeln!(w, r#"{{"event": 12}}"#).unwrap();
            },
            T,
        );
        let mut c = client.unwrap();
        let e = c.execute("a", None).unwrap_err();
        assert!(matches!(e, QmpError::Protocol { .. }), "{e}");
        let e = c.query_status().unwrap_err();
        assert!(
            matches!(&e, QmpError::Protocol { what, .. } if what == "query-status"),
            "{e}"
        );
        let e = c.execute("b", None).unwrap_err();
        assert!(e.to_string().contains("reply without id"), "{e}");
        let e = c.execute("c", None).unwrap_err();
        assert!(e.to_string().contains("event name"), "{e}");
        server.join().unwrap();
    }

    #[test]
    fn old_qemu_silence_and_hangups() {
        let (client, server) = with_server(
            |_, w| {
                writeln!(
                    w,
                    r#"{{"QMP": {{"version": {{"qemu": {{"micro": 1, "minor": 2, "major": 7}}, "package": ""}}, "capabilities": []}}}}"#
                )
                .unwrap();
            },
            T,
        );
        assert!(matches!(
            client,
            Err(QmpError::Version { found, .. }) if found.major == 7
        ));
        server.join().unwrap();

        // A peer that says nothing.
        let (client, server) = with_server(
            |_, _| std::thread::sleep(Duration::from_millis(400)),
            Duration::from_millis(100),
        );
        assert!(matches!(client, Err(QmpError::Timeout { .. })));
        server.join().unwrap();

        // A peer that closes mid-line.
        let (client, server) = with_server(
            |_, w| {
                w.write_all(br#"{"QMP": {"ver"#).unwrap();
            },
            T,
        );
        assert!(matches!(client, Err(QmpError::Disconnected { .. })));
        server.join().unwrap();

        // A reply that never comes; then a late one is dropped as stale.
        let (client, server) = with_server(
            |r, w| {
                greet(r, w);
                let (_, id1) = read_cmd(r);
                let (_, id2) = read_cmd(r);
                writeln!(w, r#"{{"return": 1, "id": {id1}}}"#).unwrap();
                writeln!(w, r#"{{"return": 2, "id": {id2}}}"#).unwrap();
            },
            T,
        );
        let mut c = client.unwrap();
        c.set_command_timeout(Duration::from_millis(100));
        assert!(matches!(
            c.execute("slow", None),
            Err(QmpError::Timeout { .. })
        ));
        c.set_command_timeout(T);
        assert_eq!(c.execute("next", None).unwrap(), 2);
        server.join().unwrap();

        // Arguments must be an object.
        let (client, server) = with_server(greet, T);
        let mut c = client.unwrap();
        assert!(matches!(
            c.execute("x", Some(Value::from(3))),
            Err(QmpError::Protocol { .. })
        ));
        server.join().unwrap();
    }

    #[test]
    fn endless_lines_are_refused() {
        let (client, server) = with_server(
            |_, w| {
                let chunk = vec![b'x'; 1 << 20];
                for _ in 0..(MAX_LINE >> 20) + 2 {
                    if w.write_all(&chunk).is_err() {
                        return;
                    }
                }
            },
            Duration::from_secs(20),
        );
        assert!(
            matches!(&client, Err(QmpError::Protocol { detail, .. }) if detail.contains("longer")),
            "{client:?}"
        );
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn connect_waits_for_the_socket_and_times_out() {
        let dir = std::env::temp_dir().join(format!("wanmig-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("late.qmp");
        let _ = std::fs::remove_file(&path);
        let p2 = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            let l = std::os::unix::net::UnixListener::bind(&p2).unwrap();
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            greet(&mut r, &mut w);
        });
        let c = QmpClient::connect(&path, T).unwrap();
        assert_eq!(c.path(), path);
        server.join().unwrap();
        let missing = dir.join("never.qmp");
        let t = Instant::now();
        let e = QmpClient::connect(&missing, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
