//! The C client (`tests/c/abi_client.c`), compiled against
//! `ffi/include/wanmig.h` and linked with the `libwanmig.so` built beside
//! this test, exercises the ABI's error paths on this host.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `libwanmig.so` next to the test executable (`target/<profile>/deps`) or
/// one level up.
fn cdylib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a directory");
    [
        deps.to_path_buf(),
        deps.parent().map(Path::to_path_buf).unwrap_or_default(),
    ]
    .into_iter()
    .find(|d| d.join("libwanmig.so").is_file())
    .unwrap_or_else(|| {
        panic!(
            "libwanmig.so not found near {}; cargo build -p wanmig-capi",
            deps.display()
        )
    })
}

#[test]
fn the_c_client_gets_a_typed_error_and_a_message_for_every_bad_call() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("wanmig-abi-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("abi_client");
    let lib = cdylib_dir();
    let out = Command::new("gcc")
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
        ])
        .arg("-I")
        .arg(here.join("../include"))
        .arg(here.join("tests/c/abi_client.c"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lwanmig", "-lpthread", "-o"])
        .arg(&exe)
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "the C client does not compile against wanmig.h:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = dir.join("key");
    wanmig_datapath::wire::PskKey::generate()
        .write_new(&key)
        .unwrap();
    let run = Command::new(&exe)
        .arg("--no-xen")
        .arg(&key)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        run.status.success(),
        "the C client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // Every check ran and passed (the count guards against a client that
    // exits early).
    assert!(!stdout.contains("FAILED"), "{stdout}");
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count() >= 25,
        "{stdout}"
    );
}
