//! What the lab's dom0 says on the serial console (`bench/xen/dom0-init`),
//! and what the bench makes of it.
//!
//! Two kinds of lines matter; everything else on the console (Xen's and the
//! dom0 kernel's messages) is kept for the log but not read:
//! - `WANMIG-XEN-LAB {json}`: an event, `{"event": <name>, "uptime": <dom0
//!   uptime s>, ...}`;
//! - `WANMIG-XEN-LOG <run> <what> <line>`: one line of a log the dom0
//!   dumps: `xl` (the migration's stderr, sender and receiver, each line
//!   stamped `<dom0 uptime s> ` as it arrived), `create`, `console:<file>`
//!   (a guest's console as xenconsoled logged it), `save.json` /
//!   `restore.json` (the engine's reports, one line each), `xl-list`...

use std::collections::BTreeMap;

use serde_json::Value;

/// The event marker.
pub const EVENT: &str = "WANMIG-XEN-LAB ";
/// The log marker.
pub const LOG: &str = "WANMIG-XEN-LOG ";

/// One parsed console line.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// An event.
    Event(Event),
    /// A log line: run, what, text.
    Log {
        /// The run (`engine`, `stock`).
        run: String,
        /// Which log.
        what: String,
        /// The line.
        text: String,
    },
    /// A marker whose JSON did not parse (garbled on the console).
    Garbled(String),
    /// Anything else.
    Other,
}

/// An event of the dom0 scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its name.
    pub name: String,
    /// dom0's uptime when it was said, s.
    pub uptime: f64,
    /// All its members.
    pub fields: serde_json::Map<String, Value>,
}

impl Event {
    /// A string member.
    pub fn str(&self, k: &str) -> Option<&str> {
        self.fields.get(k).and_then(Value::as_str)
    }
    /// A number member.
    pub fn f64(&self, k: &str) -> Option<f64> {
        self.fields.get(k).and_then(Value::as_f64)
    }
    /// An integer member.
    pub fn i64(&self, k: &str) -> Option<i64> {
        self.fields.get(k).and_then(Value::as_i64)
    }
}

/// Parses one console line. The markers may follow other output on the
/// same line (the hypervisor's console is shared).
pub fn parse_line(line: &str) -> Line {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(i) = line.find(EVENT) {
        let json = &line[i + EVENT.len()..];
        return match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(fields)) => match (
                fields.get("event").and_then(Value::as_str),
                fields.get("uptime").and_then(Value::as_f64),
            ) {
                (Some(name), Some(uptime)) => Line::Event(Event {
                    name: name.to_string(),
                    uptime,
                    fields,
                }),
                _ => Line::Garbled(line[i..].to_string()),
            },
            _ => Line::Garbled(line[i..].to_string()),
        };
    }
    if let Some(i) = line.find(LOG) {
        let mut it = line[i + LOG.len()..].splitn(3, ' ');
        let run = it.next().unwrap_or_default().to_string();
        let what = it.next().unwrap_or_default().to_string();
        let text = it.next().unwrap_or_default().to_string();
        if run.is_empty() || what.is_empty() {
            return Line::Garbled(line[i..].to_string());
        }
        return Line::Log { run, what, text };
    }
    Line::Other
}

/// Everything the console said, sorted out.
#[derive(Debug, Default, Clone)]
pub struct Transcript {
    /// Events in order.
    pub events: Vec<Event>,
    /// Logs by (run, what), lines in order.
    pub logs: BTreeMap<(String, String), Vec<String>>,
    /// Marker lines that did not parse.
    pub garbled: Vec<String>,
}

impl Transcript {
    /// Adds a console line; returns the event if it was one.
    pub fn push(&mut self, line: &str) -> Option<&Event> {
        match parse_line(line) {
            Line::Event(e) => {
                self.events.push(e);
                self.events.last()
            }
            Line::Log { run, what, text } => {
                self.logs.entry((run, what)).or_default().push(text);
                None
            }
            Line::Garbled(l) => {
                self.garbled.push(l);
                None
            }
            Line::Other => None,
        }
    }

    /// The first event of that name (for that run, if given).
    pub fn event(&self, name: &str, run: Option<&str>) -> Option<&Event> {
        self.events
            .iter()
            .find(|e| e.name == name && run.is_none_or(|r| e.str("run") == Some(r)))
    }

    /// A log's lines (empty if none).
    pub fn log(&self, run: &str, what: &str) -> &[String] {
        self.logs
            .get(&(run.to_string(), what.to_string()))
            .map_or(&[], Vec::as_slice)
    }

    /// The guest console logs of a run: (file name, lines).
    pub fn consoles(&self, run: &str) -> Vec<(&str, &[String])> {
        self.logs
            .iter()
            .filter(|((r, w), _)| r == run && w.starts_with("console:"))
            .map(|((_, w), l)| (&w["console:".len()..], l.as_slice()))
            .collect()
    }
}

/// A line of the migration's log: dom0's uptime when it arrived, and the text.
pub fn stamped(line: &str) -> Option<(f64, &str)> {
    let (t, rest) = line.split_once(' ')?;
    Some((t.parse().ok()?, rest))
}

/// What the stock toolstack's own verbose output (`xl -vvv migrate`) tells
/// of a migration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XlMigration {
    /// libxl asked the guest to suspend (dom0 uptime, s): the guest's
    /// kernel freezes its tasks from here on.
    pub suspend_requested: Option<f64>,
    /// libxl saw the guest suspended.
    pub suspended: Option<f64>,
    /// The receiver unpaused the migrated domain ("migration target:
    /// Domain started successsfully.", printed right after
    /// `libxl_domain_unpause`).
    pub resumed: Option<f64>,
    /// libxenguest's live pre-copy iterations ("Frames iteration N").
    pub iterations: Option<u64>,
    /// The sender's error lines, if any.
    pub errors: Vec<String>,
}

impl XlMigration {
    /// Reads the stamped lines of `xl -vvv migrate ...`'s stderr.
    pub fn parse(lines: &[String]) -> XlMigration {
        let mut m = XlMigration::default();
        let mut max_iter: Option<u64> = None;
        for l in lines {
            let Some((t, text)) = stamped(l) else {
                continue;
            };
            if m.suspend_requested.is_none() && text.contains("suspend request") {
                m.suspend_requested = Some(t);
            }
            if m.suspended.is_none() && text.contains("guest has suspended") {
                m.suspended = Some(t);
            }
            if m.resumed.is_none() && text.contains("migration target: Domain started succ") {
                m.resumed = Some(t);
            }
            if let Some(i) = text.find("Frames iteration ") {
                let n: String = text[i + "Frames iteration ".len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(n) = n.parse::<u64>() {
                    max_iter = Some(max_iter.map_or(n, |m: u64| m.max(n)));
                }
            }
            if text.contains("error") || text.contains("Failed") || text.contains("failed") {
                m.errors.push(text.to_string());
            }
        }
        // Iterations are numbered from 0.
        m.iterations = max_iter.map(|n| n + 1);
        m
    }

    /// From the suspend request to the destination's unpause, s.
    pub fn downtime_s(&self) -> Option<f64> {
        Some(self.resumed? - self.suspend_requested?).filter(|d| *d >= 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_logs_are_sorted_out_and_junk_ignored() {
        let mut t = Transcript::default();
        let e = t
            .push("WANMIG-XEN-LAB {\"event\":\"migrate-end\",\"uptime\":12.5,\"run\":\"stock\",\"rc\":0,\"total_s\":9.25}\r")
            .cloned()
            .expect("an event");
        assert_eq!(e.name, "migrate-end");
        assert_eq!(e.uptime, 12.5);
        assert_eq!(e.i64("rc"), Some(0));
        assert_eq!(e.f64("total_s"), Some(9.25));
        // Output of the hypervisor before a marker on the same line.
        assert!(
            t.push("(XEN) noise WANMIG-XEN-LAB {\"event\":\"done\",\"uptime\":1}")
                .is_some()
        );
        assert!(t.push("WANMIG-XEN-LOG stock console:guest-g1.log HB 1 t=2 written=3 verified=4 errors=0 gen=1").is_none());
        assert!(
            t.push("WANMIG-XEN-LOG stock xl 12.01 libxl: debug: x")
                .is_none()
        );
        assert!(t.push("[    1.0] some kernel line").is_none());
        assert!(t.push("WANMIG-XEN-LAB {\"event\":\"cut off").is_none());
        assert!(t.push("WANMIG-XEN-LAB {\"uptime\":1}").is_none());
        assert_eq!(t.events.len(), 2);
        assert_eq!(t.garbled.len(), 2);
        assert_eq!(t.log("stock", "xl"), ["12.01 libxl: debug: x"]);
        let c = t.consoles("stock");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].0, "guest-g1.log");
        assert!(t.event("migrate-end", Some("stock")).is_some());
        assert!(t.event("migrate-end", Some("engine")).is_none());
    }
}

#[cfg(test)]
mod xl_tests {
    use super::*;

    /// Lines of a real stock run (Debian's xl 4.17.7, -vvv), abridged.
    const STOCK: &str = "\
87.48 migration target: Ready to receive domain.
87.83 xc: info: Saving domain 1, type x86 HVM
250.85 libxl: debug: libxl_dom_suspend.c:203:domain_suspend_callback_common: Domain 1:issuing PVH/HVM suspend request via XenBus control node
251.84 libxl: debug: libxl_dom_suspend.c:281:domain_suspend_common_pvcontrol_suspending: Domain 1:guest acknowledged suspend request
252.23 libxl: debug: libxl_dom_suspend.c:358:suspend_common_wait_guest_check: Domain 1:guest has suspended
258.58 migration target: Transfer complete, requesting permission to start domain.
259.68 migration target: Got permission, starting domain.
260.75 migration target: Domain started successsfully.
260.77 xencall:buffer: debug: cache hits:74 misses:3 toobig:15migration sender: Target reports successful startup.
263.76 Migration successful.
263.97 WANMIG-XL-EXIT 0";

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(String::from).collect()
    }

    #[test]
    fn downtime_runs_from_the_suspend_request_to_the_unpause() {
        let m = XlMigration::parse(&lines(STOCK));
        assert_eq!(m.suspend_requested, Some(250.85));
        assert_eq!(m.suspended, Some(252.23));
        assert_eq!(m.resumed, Some(260.75));
        let d = m.downtime_s().expect("downtime");
        assert!((d - 9.90).abs() < 1e-9, "{d}");
        // Stock xl prints no iteration lines: no rounds, not zero.
        assert_eq!(m.iterations, None);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
    }

    #[test]
    fn iterations_count_from_zero_and_a_missing_end_gives_no_downtime() {
        let m = XlMigration::parse(&lines(
            "1.0 xc: info: Frames iteration 0 of 5: 10/10 100%\n\
             2.0 xc: info: Frames iteration 3 of 5: 1/2 50%\n\
             3.0 libxl: debug: x: issuing PVH/HVM suspend request via XenBus control node\n\
             4.0 libxl: error: libxl_stream_write.c:1: write failed",
        ));
        assert_eq!(m.iterations, Some(4));
        assert_eq!(m.downtime_s(), None);
        assert_eq!(m.errors.len(), 1);
    }
}
