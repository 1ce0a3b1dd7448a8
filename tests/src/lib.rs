//! Cross-crate end-to-end tests live in `tests/tests/`; this library holds
//! what several of them share.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `wanmig` binary of this build (`scripts/test` builds the workspace
/// before testing); panics with what to do if it is missing.
pub fn wanmig() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .join("wanmig");
    assert!(
        p.is_file(),
        "{} missing: build the workspace first (`cargo build --workspace`, as scripts/test does)",
        p.display()
    );
    p
}

/// `wanmig` run inside network namespace `ns`.
pub fn wanmig_in(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(wanmig());
    c
}

/// True if process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// SIGKILL to `pid` (no error if it is gone).
pub fn kill(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Kills `pid` when dropped (a QEMU left running by design).
#[derive(Debug)]
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(self.0);
    }
}
