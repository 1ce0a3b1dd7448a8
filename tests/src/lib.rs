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

/// SIGKILL to `pid` (no error if it is gone). A QEMU's guest-RAM file
/// (`mem-path=/dev/shm/wanmig-...` on its command line) is removed too: a
/// QEMU left running by design leaves it behind, 256 MiB of memory a test
/// run would otherwise leak.
pub fn kill(pid: u32) {
    let ram = ram_file_of(pid);
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    if let Some(ram) = ram {
        let _ = std::fs::remove_file(ram);
    }
}

/// The wanmig guest-RAM file of QEMU `pid`, from its command line.
fn ram_file_of(pid: u32) -> Option<std::path::PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmdline
        .split(|&b| b == 0)
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .flat_map(|arg| arg.split(','))
        .filter_map(|kv| kv.strip_prefix("mem-path="))
        .find(|p| p.starts_with("/dev/shm/wanmig-"))
        .map(std::path::PathBuf::from)
}

/// Kills `pid` when dropped (a QEMU left running by design).
#[derive(Debug)]
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(self.0);
    }
}
