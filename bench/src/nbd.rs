//! The engine's NBD server against `qemu-nbd` serving the same image, with
//! the same client (`nbdcopy`) in the same run: read and write throughput
//! and their ratios.
//!
//! The image lives in `/dev/shm` by default, so the figures are the
//! servers' own costs, not the disk's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use wanmig_datapath::nbd::{Export, FileImage, NbdServer};

/// What to measure.
#[derive(Debug, Clone)]
pub struct NbdBenchOptions {
    /// Directory for the image and sockets.
    pub dir: PathBuf,
    /// Image size in bytes.
    pub size: u64,
    /// Runs of each measurement (the best is kept).
    pub runs: u32,
}

/// One server's figures, MiB/s.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServerFigures {
    /// `nbdcopy` export to `null:`.
    pub read_mib_s: f64,
    /// `nbdcopy` file to export.
    pub write_mib_s: f64,
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct NbdReport {
    /// Image size, bytes.
    pub size: u64,
    /// The engine's server.
    pub wanmig: ServerFigures,
    /// `qemu-nbd` on the same image.
    pub qemu_nbd: ServerFigures,
    /// wanmig / qemu-nbd, reads.
    pub read_ratio: f64,
    /// wanmig / qemu-nbd, writes.
    pub write_ratio: f64,
}

/// The benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdBenchError {
    /// A file or process.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A client or reference server failed.
    #[error("{0}")]
    Tool(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NbdBenchError {
    let what = what.into();
    move |source| NbdBenchError::Io { what, source }
}

/// Kills the reference server when dropped.
struct Reference(Child);

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the benchmark.
pub fn run(opts: &NbdBenchOptions) -> Result<NbdReport, NbdBenchError> {
    let dir = opts
        .dir
        .join(format!("wanmig-nbd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let result = measure(opts, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(opts: &NbdBenchOptions, dir: &Path) -> Result<NbdReport, NbdBenchError> {
    let image = dir.join("disk.raw");
    let input = dir.join("input.raw");
    // Incompressible-looking, non-zero bytes (zero runs could be skipped).
    let mut bytes = vec![0u8; opts.size as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for c in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    std::fs::write(&image, &bytes).map_err(io("writing the image"))?;
    std::fs::write(&input, &bytes).map_err(io("writing the input"))?;
    drop(bytes);

    let ours = dir.join("wanmig.sock");
    let device = FileImage::open(&image, false).map_err(io("opening the image"))?;
    let server = NbdServer::start(
        &ours,
        Export {
            name: "disk0".into(),
            device: Arc::new(device),
            log: None,
        },
    )
    .map_err(|e| NbdBenchError::Tool(e.to_string()))?;
    let reference = dir.join("qemu-nbd.sock");
    let child = Command::new("qemu-nbd")
        .arg(format!("--socket={}", reference.display()))
        .args([
            "--format=raw",
            "--export-name=disk0",
            "--persistent",
            "--shared=8",
        ])
        .args(["--cache=writeback", "--aio=threads"])
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting qemu-nbd (scripts/setup installs qemu-utils)"))?;
    let _reference = Reference(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reference.exists() {
        if Instant::now() > deadline {
            return Err(NbdBenchError::Tool(
                "qemu-nbd did not create its socket".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let uri = |sock: &Path| format!("nbd+unix:///disk0?socket={}", sock.display());
    let input = input.to_str().expect("utf-8 path").to_string();
    // Alternating runs, best of each: both servers see the same machine.
    let mut t = [[Duration::MAX; 2]; 2]; // [server][read, write]
    for _ in 0..opts.runs.max(1) {
        for (i, sock) in [&ours, &reference].into_iter().enumerate() {
            t[i][0] = t[i][0].min(nbdcopy(&uri(sock), "null:")?);
            t[i][1] = t[i][1].min(nbdcopy(&input, &uri(sock))?);
        }
    }
    drop(server);
    let mib = opts.size as f64 / (1 << 20) as f64;
    let figures = |t: [Duration; 2]| ServerFigures {
        read_mib_s: mib / t[0].as_secs_f64(),
        write_mib_s: mib / t[1].as_secs_f64(),
    };
    let (wanmig, qemu_nbd) = (figures(t[0]), figures(t[1]));
    Ok(NbdReport {
        size: opts.size,
        wanmig,
        qemu_nbd,
        read_ratio: wanmig.read_mib_s / qemu_nbd.read_mib_s,
        write_ratio: wanmig.write_mib_s / qemu_nbd.write_mib_s,
    })
}

fn nbdcopy(from: &str, to: &str) -> Result<Duration, NbdBenchError> {
    let t = Instant::now();
    let out = Command::new("nbdcopy")
        .args([from, to])
        .output()
        .map_err(io("running nbdcopy (scripts/setup installs libnbd-bin)"))?;
    if !out.status.success() {
        return Err(NbdBenchError::Tool(format!(
            "nbdcopy {from} {to}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(t.elapsed())
}
