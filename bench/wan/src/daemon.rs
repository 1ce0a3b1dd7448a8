//! Keeping a WAN up after the command that made it returns, and finding it again.
//!
//! The delay line must live as long as the WAN (the TUN devices vanish with its
//! fds), so `wanmig-bench wan up` starts a detached child, `wanmig-bench wan
//! delay-line …` (a new session via `setsid`, stdin from `/dev/null`, output to a
//! log file), which calls [`serve`]: it brings the WAN up in-process with
//! [`Wan::up`], records itself, and holds the WAN until SIGTERM/SIGINT.
//! `wan up --foreground` runs the same [`serve`] in the foreground process.
//!
//! Files, per WAN, under [`RUN_DIR`] (`/run/wanmig`, a tmpfs: a reboot clears
//! them together with the namespaces):
//! - `<name>.pid`: `"<pid> <start time>"`. The start time (field 22 of
//!   `/proc/<pid>/stat`, in clock ticks since boot) tells a live daemon from an
//!   unrelated process that got the same pid after a crash.
//! - `<name>.json`: [`WanState`], the settings, addresses and the delay line's
//!   counters, rewritten every second. Written (atomically) only once the WAN is
//!   up, so its appearance is the readiness signal for `wan up`.
//! - `<name>.log`: the daemon's stdout and stderr.

use std::fs;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wanmig_planner::units::{Rate, format_duration};

use super::delay_line::DelayLineStats;
use super::{TeardownError, Wan, WanConfig, WanError, WanNames, netns};

/// Where pid, state and log files live.
pub const RUN_DIR: &str = "/run/wanmig";

/// How often [`serve`] refreshes the counters in the state file.
pub const STATE_INTERVAL: Duration = Duration::from_secs(1);

/// How long [`stop_daemon`] waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Running or finding a daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A file under [`RUN_DIR`] could not be written or read.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("{path}: malformed state file")]
    Json {
        /// The file.
        path: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// Bringing the WAN up failed.
    #[error(transparent)]
    Up(Box<WanError>),
    /// Tearing the WAN down failed.
    #[error(transparent)]
    Down(Box<TeardownError>),
    /// The daemon could not be started.
    #[error("cannot start `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The error.
        source: io::Error,
    },
    /// The daemon exited before the WAN was up.
    #[error(
        "the delay line daemon exited ({status}) before the WAN was up; its log {log}:\n{log_tail}"
    )]
    Exited {
        /// How it exited.
        status: String,
        /// The log file.
        log: String,
        /// The end of the log.
        log_tail: String,
    },
    /// The daemon did not report ready in time.
    #[error("the delay line daemon did not bring the WAN up within {seconds} s; see {log}")]
    Timeout {
        /// The time waited.
        seconds: u64,
        /// The log file.
        log: String,
    },
    /// The delay line thread stopped on its own.
    #[error("the delay line stopped unexpectedly: {0}")]
    DelayLineStopped(String),
}

impl From<WanError> for DaemonError {
    fn from(e: WanError) -> Self {
        DaemonError::Up(Box::new(e))
    }
}

impl From<TeardownError> for DaemonError {
    fn from(e: TeardownError) -> Self {
        DaemonError::Down(Box::new(e))
    }
}

/// What a daemon records about its WAN (`<name>.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WanState {
    /// WAN name.
    pub name: String,
    /// Link rate.
    pub rate: Rate,
    /// Round-trip time, nanoseconds.
    pub rtt_ns: u64,
    /// MTU.
    pub mtu: u32,
    /// Loss per million packets, each direction.
    pub loss_ppm: u32,
    /// tbf queue, nanoseconds.
    pub queue_ns: u64,
    /// The process holding the delay line.
    pub pid: u32,
    /// Its start time (see the module docs).
    pub pid_start: u64,
    /// Whether it is a `--foreground` process rather than a detached daemon.
    pub foreground: bool,
    /// Source namespace.
    pub src_ns: String,
    /// Destination namespace.
    pub dst_ns: String,
    /// Source address.
    pub src_addr: Ipv4Addr,
    /// Destination address.
    pub dst_addr: Ipv4Addr,
    /// When the WAN came up (Unix seconds).
    pub started_unix: u64,
    /// The emulator's own round trip subtracted from the delay, nanoseconds
    /// (see [`super::calibrate`]).
    #[serde(default)]
    pub base_rtt_ns: u64,
    /// The delay line's counters at the last refresh.
    pub stats: Option<DelayLineStats>,
}

impl WanState {
    /// The settings the WAN was brought up with.
    pub fn config(&self) -> WanConfig {
        WanConfig {
            name: self.name.clone(),
            rate: self.rate,
            rtt: Duration::from_nanos(self.rtt_ns),
            mtu: self.mtu,
            loss_ppm: self.loss_ppm,
            queue: Duration::from_nanos(self.queue_ns),
        }
    }
}

/// `/run/wanmig/<name>.pid`.
pub fn pid_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.pid"))
}

/// `/run/wanmig/<name>.json`.
pub fn state_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.json"))
}

/// `/run/wanmig/<name>.log`.
pub fn log_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.log"))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads WAN `name`'s state file, if there is one.
pub fn read_state(name: &str) -> Result<Option<WanState>, DaemonError> {
    let path = state_path(name);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| DaemonError::Json {
            path: path.display().to_string(),
            source,
        })
}

/// Writes a state file atomically (temporary file, then rename).
pub fn write_state(state: &WanState) -> Result<(), DaemonError> {
    let path = state_path(&state.name);
    fs::create_dir_all(RUN_DIR).map_err(io_err(Path::new(RUN_DIR)))?;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(state).map_err(|source| DaemonError::Json {
        path: path.display().to_string(),
        source,
    })?;
    fs::write(&tmp, text + "\n").map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads `(pid, start time)` from WAN `name`'s pidfile.
pub fn read_pidfile(name: &str) -> Option<(u32, u64)> {
    let text = fs::read_to_string(pid_path(name)).ok()?;
    let mut it = text.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    Some((pid, start))
}

fn write_pidfile(name: &str, pid: u32, start: u64) -> Result<(), DaemonError> {
    fs::create_dir_all(RUN_DIR).map_err(io_err(Path::new(RUN_DIR)))?;
    let path = pid_path(name);
    fs::write(&path, format!("{pid} {start}\n")).map_err(io_err(&path))
}

/// Removes WAN `name`'s pid and state files (the log stays for post-mortems).
pub fn remove_files(name: &str) -> Result<(), TeardownError> {
    for path in [pid_path(name), state_path(name)] {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TeardownError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The start time of a live (not zombie) process, field 22 of
/// `/proc/<pid>/stat`.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace(); // field 3 onwards
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

/// Whether the process recorded as `(pid, start)` is still alive.
pub fn is_alive(pid: u32, start: u64) -> bool {
    process_start_time(pid) == Some(start)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill takes plain integers; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Ends processes: SIGTERM, up to a second's grace, then SIGKILL. Never
/// signals this process.
pub fn end_processes(pids: &[u32], what: &str) -> Result<(), TeardownError> {
    let me = std::process::id();
    let targets: Vec<(u32, u64)> = pids
        .iter()
        .filter(|&&p| p != me)
        .filter_map(|&p| process_start_time(p).map(|s| (p, s)))
        .collect();
    end_recorded(&targets, Duration::from_secs(1), what)
}

fn end_recorded(targets: &[(u32, u64)], grace: Duration, what: &str) -> Result<(), TeardownError> {
    if targets.is_empty() {
        return Ok(());
    }
    for &(pid, _) in targets {
        signal(pid, libc::SIGTERM);
    }
    let all_gone = |deadline: Instant| loop {
        if targets.iter().all(|&(p, s)| !is_alive(p, s)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if all_gone(Instant::now() + grace) {
        return Ok(());
    }
    for &(pid, start) in targets {
        if is_alive(pid, start) {
            signal(pid, libc::SIGKILL);
        }
    }
    if all_gone(Instant::now() + Duration::from_secs(2)) {
        return Ok(());
    }
    let (pid, _) = targets
        .iter()
        .copied()
        .find(|&(p, s)| is_alive(p, s))
        .unwrap_or((0, 0));
    Err(TeardownError::ProcessSurvived {
        pid,
        what: what.into(),
    })
}

/// Stops the process recorded in WAN `name`'s pidfile, if it is alive and not
/// this process: SIGTERM (it tears its WAN down), [`STOP_GRACE`], then SIGKILL.
pub fn stop_daemon(name: &str) -> Result<(), TeardownError> {
    match read_pidfile(name) {
        Some((pid, start)) if pid != std::process::id() && is_alive(pid, start) => {
            end_recorded(&[(pid, start)], STOP_GRACE, "delay line daemon")
        }
        _ => Ok(()),
    }
}

/// What is found of a WAN.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// Nothing: no namespaces, no files.
    Down,
    /// Kept up by a live daemon (or `--foreground` process): its state file, a
    /// live recorded process, all four namespaces and all six devices.
    Up(WanState),
    /// Some of it exists but not all (crashed daemon, a WAN held by another
    /// process without a daemon, ...).
    Broken {
        /// What is missing or wrong.
        reason: String,
        /// The state file, if readable.
        state: Option<WanState>,
    },
}

/// Finds out what exists of WAN `name`.
pub fn probe(name: &str) -> Probe {
    let Ok(names) = WanNames::new(name) else {
        return Probe::Down;
    };
    let state = read_state(name);
    let pidfile = read_pidfile(name);
    let any_ns = names.namespaces().iter().any(|ns| netns::exists(ns));
    let state = match state {
        Ok(s) => s,
        Err(e) => {
            return Probe::Broken {
                reason: e.to_string(),
                state: None,
            };
        }
    };
    if state.is_none() && pidfile.is_none() && !any_ns {
        return Probe::Down;
    }
    let broken = |reason: String, state: Option<WanState>| Probe::Broken { reason, state };
    let Some(state) = state else {
        return broken(
            "namespaces exist but no daemon state file (held by another process, or left by a crash)"
                .into(),
            None,
        );
    };
    if !is_alive(state.pid, state.pid_start) {
        return broken(
            format!("delay line process {} is gone", state.pid),
            Some(state),
        );
    }
    for (ns, dev) in names.devices() {
        match netns::has_interface(ns, dev) {
            Ok(true) => {}
            Ok(false) => return broken(format!("device {dev} missing in {ns}"), Some(state)),
            Err(e) => return broken(e.to_string(), Some(state)),
        }
    }
    Probe::Up(state)
}

/// Names of all WANs that have a state file or a namespace.
pub fn known_wans() -> Vec<String> {
    let mut names: Vec<String> = netns::list()
        .unwrap_or_default()
        .iter()
        .filter_map(|ns| WanNames::wan_of_namespace(ns).map(str::to_string))
        .collect();
    if let Ok(entries) = fs::read_dir(RUN_DIR) {
        for e in entries.filter_map(|e| e.ok()) {
            let file = e.file_name();
            let file = file.to_string_lossy();
            if let Some(name) = file
                .strip_suffix(".json")
                .or_else(|| file.strip_suffix(".pid"))
            {
                if super::validate_name(name).is_ok() {
                    names.push(name.to_string());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The arguments after the program name that make `wanmig-bench` run the
/// daemon for `config`: `wan delay-line --name … --rate … --rtt … --mtu …
/// --loss-ppm … --queue …`.
pub fn delay_line_args(config: &WanConfig) -> Vec<String> {
    vec![
        "wan".into(),
        "delay-line".into(),
        "--name".into(),
        config.name.clone(),
        "--rate".into(),
        config.rate.to_string(),
        "--rtt".into(),
        format_duration(config.rtt),
        "--mtu".into(),
        config.mtu.to_string(),
        "--loss-ppm".into(),
        config.loss_ppm.to_string(),
        "--queue".into(),
        format_duration(config.queue),
    ]
}

/// Starts `exe` (a `wanmig-bench` binary) as a detached daemon holding WAN
/// `config.name` and waits until it reports the WAN up (its state file names
/// it), at most `timeout`. Tear the WAN down beforehand if needed: the daemon's
/// [`Wan::up`] replaces whatever is there.
pub fn spawn_detached(
    exe: &Path,
    config: &WanConfig,
    timeout: Duration,
) -> Result<WanState, DaemonError> {
    fs::create_dir_all(RUN_DIR).map_err(io_err(Path::new(RUN_DIR)))?;
    let log = log_path(&config.name);
    let log_file = fs::File::create(&log).map_err(io_err(&log))?;
    let log_err = log_file.try_clone().map_err(io_err(&log))?;
    let mut command = Command::new(exe);
    command
        .args(delay_line_args(config))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // SAFETY: the hook runs in the child between fork and exec and only calls
    // setsid, which is async-signal-safe, touches no memory and cannot fail in
    // a freshly forked child that is not a process-group leader.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| DaemonError::Spawn {
        command: super::cmd::display(&command),
        source,
    })?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(state)) = read_state(&config.name) {
            if state.pid == child.id() {
                return Ok(state);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DaemonError::Exited {
                status: status.to_string(),
                log: log.display().to_string(),
                log_tail: tail(&log, 20),
            });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(DaemonError::Timeout {
                seconds: timeout.as_secs(),
                log: log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Brings WAN `config.name` up in this process, records it (pidfile, state
/// file), calls `ready`, and holds it until `stop` becomes true; then tears it
/// down and removes the files. Returns the delay line's final counters.
///
/// `stop` is typically set by a SIGTERM/SIGINT handler.
pub fn serve(
    config: WanConfig,
    foreground: bool,
    stop: &AtomicBool,
    ready: impl FnOnce(&Wan, &WanState),
) -> Result<DelayLineStats, DaemonError> {
    let wan = Wan::up(config)?;
    let pid = std::process::id();
    let pid_start = process_start_time(pid).unwrap_or(0);
    let c = wan.config();
    let mut state = WanState {
        name: c.name.clone(),
        rate: c.rate,
        rtt_ns: c.rtt.as_nanos() as u64,
        mtu: c.mtu,
        loss_ppm: c.loss_ppm,
        queue_ns: c.queue.as_nanos() as u64,
        pid,
        pid_start,
        foreground,
        src_ns: wan.src_ns().into(),
        dst_ns: wan.dst_ns().into(),
        src_addr: wan.src_addr(),
        dst_addr: wan.dst_addr(),
        started_unix: unix_now(),
        base_rtt_ns: wan.base_rtt().as_nanos() as u64,
        stats: wan.stats(),
    };
    write_pidfile(&state.name, pid, pid_start)?;
    write_state(&state)?;
    ready(&wan, &state);
    let mut last = Instant::now();
    let mut failure = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if !wan.is_running() {
            failure = Some("the delay line thread exited".to_string());
            break;
        }
        if last.elapsed() >= STATE_INTERVAL {
            last = Instant::now();
            state.stats = wan.stats();
            write_state(&state)?;
        }
    }
    let name = state.name.clone();
    let result = wan.down();
    // Remove the files only if they are still ours.
    if read_pidfile(&name).is_some_and(|(p, _)| p == pid) {
        remove_files(&name)?;
    }
    match (result, failure) {
        (Err(e), _) => Err(DaemonError::DelayLineStopped(e.to_string())),
        (Ok(_), Some(f)) => Err(DaemonError::DelayLineStopped(f)),
        (Ok(stats), None) => Ok(stats.unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_has_a_start_time() {
        let me = std::process::id();
        let start = process_start_time(me).expect("start time");
        assert!(is_alive(me, start));
        assert!(!is_alive(me, start + 1));
        assert!(process_start_time(u32::MAX).is_none());
    }

    #[test]
    fn state_round_trips_and_daemon_args_parse_back() {
        let c = WanConfig::new("abc", "40mbit".parse().unwrap(), Duration::from_millis(5));
        let args = delay_line_args(&c).join(" ");
        assert_eq!(
            args,
            "wan delay-line --name abc --rate 40mbit --rtt 5ms --mtu 1500 --loss-ppm 0 --queue 20ms"
        );
        let s = WanState {
            name: "abc".into(),
            rate: c.rate,
            rtt_ns: 5_000_000,
            mtu: 1500,
            loss_ppm: 0,
            queue_ns: 20_000_000,
            pid: 1,
            pid_start: 2,
            foreground: false,
            src_ns: "wanmig-abc-src".into(),
            dst_ns: "wanmig-abc-dst".into(),
            src_addr: Ipv4Addr::new(10, 213, 0, 1),
            dst_addr: Ipv4Addr::new(10, 213, 0, 2),
            started_unix: 0,
            base_rtt_ns: 50_000,
            stats: Some(DelayLineStats::default()),
        };
        let back: WanState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.config(), c);
    }
}
