//! `wanmig-pagecheck`: the page checker that runs inside the built-in guest.
//!
//! Like the guest of QEMU's own migration test, it owns a region of guest RAM,
//! tags every page it writes with a self-describing header (run id, page
//! index, generation, checksum; see [`page`]) and keeps the generation it last
//! wrote for each page. While it runs it rewrites pages at a set rate and
//! sweeps the whole region at another, verifying every page, so a page that a
//! migration lost, zeroed, corrupted or brought back from an older copy is
//! reported, whether the guest writes that page or not.
//!
//! Output (stdout, one line each, see `bench/guest/README.md`):
//! - `PAGECHECK-START run=<hex> pages=<n> ...` once the region is filled;
//! - `HB <n> t=<uptime s> written=<pages> verified=<pages> errors=<n> gen=<max generation>`
//!   exactly once per second;
//! - `PAGECHECK-ERROR page=<i> expected_gen=<g> found=<kind> [key=value...]`
//!   for each of the first `--max-print` errors (then counts only);
//! - `PAGECHECK-END ...` when `--duration` runs out.
//!
//! With `--disk DEV` it checks the blocks of a disk instead ([`disk`]), with
//! the same lines prefixed `DISKCHECK-` and the heartbeat `DHB`.

pub mod checker;
pub mod config;
pub mod disk;
pub mod pacer;
pub mod page;

use std::fmt::Write as _;

pub use checker::{Checker, PageError, Pattern, Stats};
pub use config::Config;
pub use pacer::Pacer;

/// The heartbeat line (without the newline): `HB` for RAM, `DHB` for a disk.
pub fn heartbeat_line(n: u64, uptime: f64, s: &Stats) -> String {
    heartbeat_line_for("HB", n, uptime, s)
}

/// The heartbeat line with its prefix.
pub fn heartbeat_line_for(prefix: &str, n: u64, uptime: f64, s: &Stats) -> String {
    format!(
        "{prefix} {n} t={uptime:.2} written={} verified={} errors={} gen={}",
        s.written, s.verified, s.errors, s.max_gen
    )
}

/// The error line (without the newline).
pub fn error_line(e: &PageError) -> String {
    error_line_for("PAGECHECK", e)
}

/// The error line with its prefix (`PAGECHECK` or `DISKCHECK`).
pub fn error_line_for(prefix: &str, e: &PageError) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{prefix}-ERROR page={} expected_gen={} found={}",
        e.page, e.expected_gen, e.found
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::Verdict;

    #[test]
    fn line_formats() {
        let s = Stats {
            written: 10,
            verified: 20,
            errors: 1,
            max_gen: 3,
        };
        assert_eq!(
            heartbeat_line(7, 12.345, &s),
            "HB 7 t=12.35 written=10 verified=20 errors=1 gen=3"
        );
        let e = PageError {
            page: 4,
            expected_gen: 9,
            found: Verdict::Stale { generation: 8 },
        };
        assert_eq!(
            error_line(&e),
            "PAGECHECK-ERROR page=4 expected_gen=9 found=stale gen=8"
        );
    }
}
