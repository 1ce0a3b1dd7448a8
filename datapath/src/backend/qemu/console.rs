//! The guest's serial console, as QEMU writes it to a file: markers and the
//! page checker's heartbeats (`HB <n> t=<s> written=<p> verified=<p>
//! errors=<n> gen=<g>`), the disk checker's (`DHB ...`, same fields) and
//! the sysbench fileio disk workload's (`SBHB <s> ...`).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One heartbeat of the page checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Heartbeat {
    /// Sequence number.
    pub n: u64,
    /// Pages written so far.
    pub written: u64,
    /// Pages verified so far.
    pub verified: u64,
    /// Verification errors so far.
    pub errors: u64,
}

impl Heartbeat {
    /// Parses a heartbeat line of the page checker.
    pub fn parse(line: &str) -> Option<Heartbeat> {
        Self::parse_with("HB", line)
    }

    /// Parses a heartbeat line of the disk checker (`DHB`).
    pub fn parse_disk(line: &str) -> Option<Heartbeat> {
        Self::parse_with("DHB", line)
    }

    /// Parses a heartbeat line of the sysbench fileio disk workload
    /// (`SBHB <s> reads=.. writes=..`: only `n`, the seconds sysbench has
    /// run, is set).
    pub fn parse_sysbench(line: &str) -> Option<Heartbeat> {
        Self::parse_with("SBHB", line)
    }

    fn parse_with(prefix: &str, line: &str) -> Option<Heartbeat> {
        let mut it = line.split_whitespace();
        if it.next()? != prefix {
            return None;
        }
        let n = it.next()?.parse().ok()?;
        let mut hb = Heartbeat {
            n,
            ..Heartbeat::default()
        };
        for field in it {
            let (k, v) = field.split_once('=')?;
            let v: u64 = match v.parse() {
                Ok(v) => v,
                Err(_) => continue,
            };
            match k {
                "written" => hb.written = v,
                "verified" => hb.verified = v,
                "errors" => hb.errors = v,
                _ => {}
            }
        }
        Some(hb)
    }
}

/// Follows a serial log file.
#[derive(Debug)]
pub struct SerialLog {
    path: PathBuf,
    file: Option<File>,
    partial: String,
    lines: Vec<String>,
    heartbeats: Vec<(Instant, Heartbeat)>,
    disk_heartbeats: Vec<(Instant, Heartbeat)>,
    sysbench_heartbeats: Vec<(Instant, Heartbeat)>,
}

impl SerialLog {
    /// Follows `path` (it may not exist yet).
    pub fn new(path: &Path) -> Self {
        SerialLog {
            path: path.to_path_buf(),
            file: None,
            partial: String::new(),
            lines: Vec::new(),
            heartbeats: Vec::new(),
            disk_heartbeats: Vec::new(),
            sysbench_heartbeats: Vec::new(),
        }
    }

    /// Reads what is new; returns the number of new complete lines.
    pub fn poll(&mut self) -> io::Result<usize> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(e),
            }
        }
        let mut buf = Vec::new();
        if let Some(f) = self.file.as_mut() {
            f.read_to_end(&mut buf)?;
        }
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let now = Instant::now();
        let mut new = 0;
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            if let Some(hb) = Heartbeat::parse(&line) {
                self.heartbeats.push((now, hb));
            } else if let Some(hb) = Heartbeat::parse_disk(&line) {
                self.disk_heartbeats.push((now, hb));
            } else if let Some(hb) = Heartbeat::parse_sysbench(&line) {
                self.sysbench_heartbeats.push((now, hb));
            }
            self.lines.push(line);
            new += 1;
        }
        Ok(new)
    }

    /// All complete lines so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Heartbeats so far, with the time they were read.
    pub fn heartbeats(&self) -> &[(Instant, Heartbeat)] {
        &self.heartbeats
    }

    /// The latest heartbeat.
    pub fn last_heartbeat(&self) -> Option<Heartbeat> {
        self.heartbeats.last().map(|&(_, h)| h)
    }

    /// The disk checker's heartbeats so far.
    pub fn disk_heartbeats(&self) -> &[(Instant, Heartbeat)] {
        &self.disk_heartbeats
    }

    /// The sysbench fileio disk workload's heartbeats so far.
    pub fn sysbench_heartbeats(&self) -> &[(Instant, Heartbeat)] {
        &self.sysbench_heartbeats
    }

    /// sysbench's validation failures so far (`DISKSB-ERROR ... Validation
    /// failed ...`: it stops at the first).
    pub fn sysbench_failures(&self) -> u64 {
        self.lines
            .iter()
            .filter(|l| l.starts_with("DISKSB-ERROR") && l.contains("Validation failed"))
            .count() as u64
    }

    /// Every failure the guest reported so far, the figure that judges a
    /// migrated guest: each checker's error count (the page checker's and
    /// the disk checker's, the larger of the last heartbeat's `errors` and
    /// the checker's error lines, so an error printed before its heartbeat
    /// still counts), plus one for every other failure line (see
    /// [`error_lines`](Self::error_lines): a checker that failed, sysbench's
    /// validation failures, ext4 errors, stress-ng failures, a workload that
    /// exited with an error, a kernel crash).
    pub fn checker_errors(&self) -> u64 {
        let count =
            |prefix: &str| self.lines.iter().filter(|l| l.starts_with(prefix)).count() as u64;
        let pages = self
            .last_heartbeat()
            .map_or(0, |h| h.errors)
            .max(count("PAGECHECK-ERROR "));
        let disk = self
            .last_disk_heartbeat()
            .map_or(0, |h| h.errors)
            .max(count("DISKCHECK-ERROR "));
        let others = self
            .error_lines()
            .filter(|l| !l.starts_with("PAGECHECK-ERROR") && !l.starts_with("DISKCHECK-ERROR"))
            .count() as u64;
        pages + disk + others
    }

    /// The disk workloads the guest started (`WANMIG-DISK-WORKLOAD
    /// mode=<m>`), in order.
    pub fn disk_workloads(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("WANMIG-DISK-WORKLOAD mode="))
            .filter_map(|r| r.split_whitespace().next())
            .collect()
    }

    /// The disk checker's latest heartbeat.
    pub fn last_disk_heartbeat(&self) -> Option<Heartbeat> {
        self.disk_heartbeats.last().map(|&(_, h)| h)
    }

    /// Lines reporting a failure: a checker's error or its failure
    /// (`PAGECHECK-`, `DISKCHECK-`, `DISKSB-ERROR`, `DISKSB-FAILED`; the
    /// checkers' `-ERROR-LIMIT` lines too), a damaged file system (`EXT4-fs
    /// error`), stress-ng's failures and errors (`stress-ng: fail:`, its
    /// `--verify` finding bad memory, and `stress-ng: error:`), a workload
    /// that ended with an error (`WANMIG-WORKLOAD-EXIT`, `WANMIG-DISK-
    /// WORKLOAD-EXIT` with `rc` not 0), or a kernel crash (`Kernel panic`,
    /// `BUG:`, `Oops:`).
    pub fn error_lines(&self) -> impl Iterator<Item = &String> {
        self.lines.iter().filter(|l| is_failure_line(l))
    }

    /// Waits until a line containing `marker` appears.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            self.poll()?;
            if self.lines[seen..].iter().any(|l| l.contains(marker)) {
                return Ok(true);
            }
            seen = self.lines.len();
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `count` heartbeats arrived after `after`.
    pub fn wait_heartbeats(
        &mut self,
        count: usize,
        after: Instant,
        timeout: Duration,
    ) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll()?;
            if self.heartbeats.iter().filter(|(t, _)| *t > after).count() >= count {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a console line reports a failure (see [`SerialLog::error_lines`]).
fn is_failure_line(l: &str) -> bool {
    const PREFIXES: [&str; 6] = [
        "PAGECHECK-ERROR",
        "PAGECHECK-FAILED",
        "DISKCHECK-ERROR",
        "DISKCHECK-FAILED",
        "DISKSB-ERROR",
        "DISKSB-FAILED",
    ];
    const ANYWHERE: [&str; 4] = [
        "EXT4-fs error",
        "Kernel panic",
        "stress-ng: fail:",
        "stress-ng: error:",
    ];
    PREFIXES.iter().any(|p| l.starts_with(p))
        || ANYWHERE.iter().any(|w| l.contains(w))
        || ["BUG:", "Oops:"].iter().any(|w| has_word(l, w))
        || ((l.starts_with("WANMIG-WORKLOAD-EXIT ") || l.starts_with("WANMIG-DISK-WORKLOAD-EXIT "))
            && l.split_whitespace()
                .filter_map(|f| f.strip_prefix("rc="))
                .any(|rc| rc != "0"))
}

/// Whether `word` occurs in `line` not preceded by a letter (`BUG:` in a
/// kernel line, not in `DEBUG:`).
fn has_word(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(i, _)| {
        !line[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphabetic())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_parse() {
        let hb = Heartbeat::parse("HB 12 t=5.3 written=100 verified=2000 errors=0 gen=7").unwrap();
        assert_eq!(
            hb,
            Heartbeat {
                n: 12,
                written: 100,
                verified: 2000,
                errors: 0
            }
        );
        assert_eq!(Heartbeat::parse("HB x t=1").map(|h| h.n), None);
        assert_eq!(Heartbeat::parse("WANMIG-GUEST-UP uptime=1"), None);
        let sb = "SBHB 31 reads=0.41 writes=0.27 fsyncs=8.00";
        assert_eq!(Heartbeat::parse_sysbench(sb).map(|h| h.n), Some(31));
        assert_eq!(Heartbeat::parse(sb), None);
        assert_eq!(Heartbeat::parse_disk(sb), None);
        assert_eq!(
            Heartbeat::parse_disk("DHB 4 written=1 verified=2 errors=0").map(|h| h.verified),
            Some(2)
        );
    }

    #[test]
    fn the_log_is_followed_line_by_line() {
        let p = std::env::temp_dir().join(format!("wanmig-serial-test-{}", std::process::id()));
        std::fs::write(
            &p,
            "WANMIG-GUEST-UP uptime=1\nHB 1 t=1 written=5 verified=6 errors=0 gen=1\nHB 2 t=2 wri",
        )
        .unwrap();
        let mut log = SerialLog::new(&p);
        assert_eq!(log.poll().unwrap(), 2);
        assert_eq!(log.last_heartbeat().unwrap().n, 1);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(
            b"tten=9 verified=9 errors=1 gen=2\nPAGECHECK-ERROR page=3 expected_gen=2 found=zero\n",
        )
        .unwrap();
        assert_eq!(log.poll().unwrap(), 2);
        assert_eq!(log.last_heartbeat().unwrap().errors, 1);
        assert_eq!(log.error_lines().count(), 1);
        std::fs::remove_file(&p).unwrap();
    }

    /// A log holding `text`.
    fn log_of(tag: &str, text: &str) -> SerialLog {
        let p = std::env::temp_dir().join(format!("wanmig-serial-{tag}-{}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        let mut log = SerialLog::new(&p);
        log.poll().unwrap();
        std::fs::remove_file(&p).unwrap();
        log
    }

    #[test]
    fn every_failure_line_the_guest_prints_counts_as_a_checker_error() {
        let log = log_of(
            "failures",
            "WANMIG-GUEST-UP uptime=1\n\
             HB 1 t=1 written=5 verified=6 errors=0 gen=1\n\
             DHB 1 t=1 written=5 verified=6 errors=0 gen=1\n\
             PAGECHECK-FAILED mlock: Cannot allocate memory\n\
             DISKCHECK-FAILED read /dev/vda block 12: Input/output error\n\
             DISKSB-ERROR FATAL: Validation failed on file test_file.1, offset 0x1000\n\
             DISKSB-FAILED sysbench run stopped (rc 1)\n\
             [   42.123456] EXT4-fs error (device vda): ext4_find_entry:1453: inode #2: comm ls: reading directory lblock 0\n\
             stress-ng: fail:  [211] vm: detected 7 bit errors while stressing memory\n\
             stress-ng: error: [212] vm: mmap failed\n\
             WANMIG-WORKLOAD-EXIT name=stress-vm rc=2 uptime=80\n\
             [   50.0] BUG: kernel NULL pointer dereference, address: 0000000000000000\n\
             [   50.1] Oops: 0000 [#1] PREEMPT SMP\n\
             [   50.2] Kernel panic - not syncing: Fatal exception\n",
        );
        assert_eq!(log.error_lines().count(), 11);
        assert_eq!(log.checker_errors(), 11);

        // Lines that report no failure.
        let log = log_of(
            "fine",
            "HB 1 t=1 written=5 verified=6 errors=0 gen=1\n\
             stress-ng: info:  [211] dispatching hogs: 1 vm\n\
             stress-ng: info:  [211] successful run completed in 10.00s\n\
             WANMIG-WORKLOAD-EXIT name=stress-vm rc=0 uptime=80\n\
             WANMIG-DISK-WORKLOAD-EXIT mode=check rc=0 uptime=80\n\
             DEBUG: nothing wrong\n\
             PAGECHECK-START run=0123456789abcdef pages=4096 mib=16\n",
        );
        assert_eq!(log.error_lines().count(), 0, "{:?}", log.lines());
        assert_eq!(log.checker_errors(), 0);
    }

    #[test]
    fn checker_errors_count_once_whether_in_lines_or_heartbeats() {
        // Two bad pages printed, the heartbeat counting them not read yet:
        // they count.
        let log = log_of(
            "before-hb",
            "HB 1 t=1 written=5 verified=6 errors=0 gen=1\n\
             PAGECHECK-ERROR page=3 expected_gen=2 found=zero\n\
             PAGECHECK-ERROR page=9 expected_gen=2 found=stale gen=1\n",
        );
        assert_eq!(log.checker_errors(), 2);
        // The heartbeat counts more than the lines printed (the checker
        // prints the first 20): the heartbeat's count, not the sum.
        let log = log_of(
            "limit",
            "PAGECHECK-ERROR page=3 expected_gen=2 found=zero\n\
             PAGECHECK-ERROR-LIMIT\n\
             HB 2 t=2 written=5 verified=6 errors=25 gen=1\n\
             DISKCHECK-ERROR page=7 expected_gen=1 found=corrupt\n\
             DHB 2 t=2 written=5 verified=6 errors=1 gen=1\n",
        );
        assert_eq!(log.checker_errors(), 25 + 1);
    }
}
