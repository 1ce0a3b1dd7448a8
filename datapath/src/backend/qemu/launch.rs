//! Starting QEMU for a migration: the same machine on both sides, guest RAM
//! in a shared `/dev/shm` file, the preload library that hands the engine the
//! RAM's userfaultfd, QMP on a unix socket, the serial console in a file.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wanmig_preload_proto::UffdMode;

use crate::qemu::{QmpClient, QmpError};

/// The guest to run: kernel, initramfs, command line, memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// Uncompressed kernel (PVH boot).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub append: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// More QEMU arguments (devices): identical on both sides.
    pub extra_args: Vec<String>,
    /// The guest's disks (virtio-blk, served by the engine over NBD), in
    /// order: `/dev/vda`, `/dev/vdb`...
    pub disks: Vec<DiskSpec>,
    /// The disks' chunk size, the unit of transfer and profiling (a power
    /// of two in 4 KiB..=4 MiB; the same on both sides).
    pub chunk_size: u64,
}

/// One guest disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Size in bytes (a multiple of 4096).
    pub size: u64,
    /// The source's raw image; `None`: a new sparse (all-zero) image in the
    /// run directory.
    pub image: Option<PathBuf>,
}

/// The QEMU arguments of disk `i`, reached over NBD on `socket`: the same
/// node and device names on both sides (migration matches devices by them).
pub fn disk_args(i: usize, socket: &Path) -> [String; 4] {
    [
        "-blockdev".into(),
        format!(
            "driver=nbd,node-name=wmdisk{i},server.type=unix,server.path={},export=disk{i}",
            socket.display()
        ),
        "-device".into(),
        format!("virtio-blk-pci,drive=wmdisk{i},id=wmvd{i}"),
    ]
}

/// Default location of the built-in guest built by `scripts/setup`.
pub const DEFAULT_GUEST_DIR: &str = "/var/cache/wanmig/guest/current";

impl GuestSpec {
    /// The built-in guest (`WANMIG_GUEST_DIR` or [`DEFAULT_GUEST_DIR`]) with
    /// the given `wanmig.*` parameters appended to its command line.
    pub fn builtin(memory_mib: u64, params: &str) -> Result<Self, LaunchError> {
        let dir = std::env::var_os("WANMIG_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR));
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("initramfs.cpio");
        for p in [&kernel, &initrd] {
            if !p.is_file() {
                return Err(LaunchError::GuestMissing { path: p.clone() });
            }
        }
        Ok(GuestSpec {
            kernel,
            initrd,
            append: format!("console=ttyS0 quiet {params}").trim().to_string(),
            memory_mib,
            extra_args: Vec::new(),
            disks: Vec::new(),
            chunk_size: crate::storage::DEFAULT_CHUNK_SIZE,
        })
    }

    /// Bytes of guest RAM.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// Where one QEMU's sockets and files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPaths {
    /// Guest RAM file (must start with the preload library's prefix,
    /// `/dev/shm/wanmig-`).
    pub ram: PathBuf,
    /// QMP socket.
    pub qmp: PathBuf,
    /// Serial console log.
    pub serial: PathBuf,
    /// QEMU's stderr.
    pub log: PathBuf,
    /// The engine's socket the preload library registers with.
    pub uffd_sock: PathBuf,
    /// Directory for disk images, presence files and NBD sockets.
    pub disk_dir: PathBuf,
    /// This side's role (`source`, `destination`).
    pub role: String,
}

impl QemuPaths {
    /// Paths for `role` of migration `tag` under `run_dir`.
    pub fn new(run_dir: &Path, tag: &str, role: &str) -> Self {
        QemuPaths {
            ram: PathBuf::from(format!("/dev/shm/wanmig-{tag}-{role}")),
            qmp: run_dir.join(format!("{role}.qmp")),
            serial: run_dir.join(format!("{role}.serial")),
            log: run_dir.join(format!("{role}.log")),
            uffd_sock: run_dir.join(format!("{role}.uffd")),
            disk_dir: run_dir.to_path_buf(),
            role: role.to_string(),
        }
    }

    /// Disk `i`'s image on this side (when not given).
    pub fn disk_image(&self, i: usize) -> PathBuf {
        self.disk_dir.join(format!("{}-disk{i}.raw", self.role))
    }

    /// Disk `i`'s presence file (destination).
    pub fn disk_presence(&self, i: usize) -> PathBuf {
        self.disk_dir
            .join(format!("{}-disk{i}.presence", self.role))
    }

    /// The engine's NBD socket for disk `i`.
    pub fn disk_socket(&self, i: usize) -> PathBuf {
        self.disk_dir.join(format!("{}-disk{i}.nbd", self.role))
    }
}

/// QEMU could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The built-in guest has not been built.
    #[error("guest image file {path} is missing: run scripts/setup")]
    GuestMissing {
        /// The missing file.
        path: PathBuf,
    },
    /// The preload library was not found.
    #[error(
        "the preload library libwanmig_ffi.so was not found (looked in {looked}); build it with `cargo build -p wanmig-ffi` or set WANMIG_PRELOAD"
    )]
    PreloadMissing {
        /// Where it was looked for.
        looked: String,
    },
    /// Spawning failed.
    #[error("starting {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Creating a file failed.
    #[error("{path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// QMP did not come up.
    #[error("QEMU's QMP socket")]
    Qmp(#[from] QmpError),
    /// QEMU exited early.
    #[error("QEMU exited during start-up ({status}); its log: {log}")]
    Exited {
        /// Exit status.
        status: String,
        /// The log file.
        log: PathBuf,
    },
}

/// Finds `libwanmig_ffi.so`: `WANMIG_PRELOAD`, else next to the running
/// executable or one directory up (cargo puts test binaries in `deps/`).
pub fn locate_preload() -> Result<PathBuf, LaunchError> {
    if let Some(p) = std::env::var_os("WANMIG_PRELOAD") {
        return Ok(PathBuf::from(p));
    }
    let mut looked = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join("libwanmig_ffi.so");
            if candidate.is_file() {
                return Ok(candidate);
            }
            looked.push(d.display().to_string());
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    Err(LaunchError::PreloadMissing {
        looked: looked.join(", "),
    })
}

/// The QEMU binary: `WANMIG_QEMU`, else `qemu-system-x86_64` on the path.
fn qemu_program() -> String {
    std::env::var("WANMIG_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// What every QEMU here runs with, whoever moves the guest: TCG, no
/// default devices, the guest's kernel and command line, the serial console
/// in a file, QMP on a unix socket, and the guest's extra arguments.
fn base_command(mut cmd: Command, guest: &GuestSpec, paths: &QemuPaths) -> Command {
    cmd.args([
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .arg("-kernel")
    .arg(&guest.kernel)
    .arg("-initrd")
    .arg(&guest.initrd)
    .arg("-append")
    .arg(&guest.append)
    .arg("-serial")
    .arg(format!("file:{}", paths.serial.display()))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", paths.qmp.display()))
    .args(&guest.extra_args);
    cmd
}

/// How QEMU runs on its own, migrating the guest itself (see
/// [`QemuProcess::spawn_native`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeLaunch<'a> {
    /// The network namespace to run in (`None`: this one).
    pub netns: Option<&'a str>,
    /// The disks' raw images, in order.
    pub disk_images: &'a [PathBuf],
    /// Wait for an incoming migration, paused.
    pub incoming: bool,
    /// Empty, or one qcow2 overlay per disk (made beforehand, no backing
    /// file of its own): the guest's device then writes into the overlay
    /// (node `wmover{i}`, backed by the raw node `wmdisk{i}`, which stays
    /// writable for an NBD export beneath it). The raw image keeps what
    /// arrived before the guest ran here: a snapshot at the resume that
    /// costs the migration nothing.
    pub overlays: &'a [PathBuf],
}

/// The `-blockdev` arguments of disk `i`'s raw image `image`: file node
/// `wmfile{i}` under raw node `wmdisk{i}`.
fn raw_blockdev_args(i: usize, image: &Path) -> [String; 4] {
    [
        "-blockdev".into(),
        format!(
            "driver=file,filename={},node-name=wmfile{i}",
            image.display()
        ),
        "-blockdev".into(),
        format!("driver=raw,file=wmfile{i},node-name=wmdisk{i}"),
    ]
}

/// The QEMU arguments of disk `i` as a raw image file QEMU opens itself:
/// the same device and node names as [`disk_args`].
pub fn native_disk_args(i: usize, image: &Path) -> Vec<String> {
    let mut args = raw_blockdev_args(i, image).to_vec();
    args.extend([
        "-device".into(),
        format!("virtio-blk-pci,drive=wmdisk{i},id=wmvd{i}"),
    ]);
    args
}

/// The QEMU arguments of disk `i` as raw image `image` under qcow2 overlay
/// `overlay`: the device (`wmvd{i}`, sharing writes so that the raw node
/// beneath may be written too) on overlay node `wmover{i}`, whose backing is
/// the raw node `wmdisk{i}`.
pub fn native_overlaid_disk_args(i: usize, image: &Path, overlay: &Path) -> Vec<String> {
    let mut args = raw_blockdev_args(i, image).to_vec();
    args.extend([
        "-blockdev".into(),
        format!(
            "driver=file,filename={},node-name=wmoverfile{i}",
            overlay.display()
        ),
        "-blockdev".into(),
        format!("driver=qcow2,file=wmoverfile{i},backing=wmdisk{i},node-name=wmover{i}"),
        "-device".into(),
        format!("virtio-blk-pci,drive=wmover{i},id=wmvd{i},share-rw=on"),
    ]);
    args
}

/// A running QEMU: started here (killed when dropped), or attached to
/// (left running when dropped: it belongs to whoever started it).
#[derive(Debug)]
pub struct QemuProcess {
    /// `None` for an attached QEMU.
    child: Option<Child>,
    pid: u32,
    /// Its QMP connection (after [`connect_qmp`](Self::connect_qmp)).
    qmp: Option<QmpClient>,
    /// Its paths.
    pub paths: QemuPaths,
}

impl QemuProcess {
    /// Starts QEMU for `guest`. With `incoming` it waits for the device state
    /// (`-incoming defer`) and stays paused (`-S`). The preload library
    /// registers the RAM mapping in `mode` with the engine listening on
    /// `paths.uffd_sock` (bind it first: QEMU blocks until it is answered,
    /// then call [`connect_qmp`](Self::connect_qmp)).
    pub fn spawn(
        guest: &GuestSpec,
        paths: &QemuPaths,
        mode: UffdMode,
        incoming: bool,
    ) -> Result<Self, LaunchError> {
        let preload = locate_preload()?;
        let mut cmd = base_command(Command::new(qemu_program()), guest, paths);
        cmd.arg("-object")
            .arg(format!(
                "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
                guest.memory_mib,
                paths.ram.display()
            ))
            .args(["-machine", "pc,memory-backend=ram0"]);
        for i in 0..guest.disks.len() {
            cmd.args(disk_args(i, &paths.disk_socket(i)));
        }
        if incoming {
            cmd.args(["-incoming", "defer", "-S"]);
        }
        cmd.env("LD_PRELOAD", &preload)
            .env("WANMIG_UFFD_SOCK", &paths.uffd_sock)
            .env("WANMIG_UFFD_MODE", mode.env_value());
        Self::start(cmd, paths)
    }

    /// Starts QEMU for `guest` as a QEMU user runs it when QEMU migrates
    /// the guest itself: RAM is QEMU's own (no shared file, no preload
    /// library), each disk a raw image file QEMU opens (`disk_images[i]`,
    /// node `wmdisk{i}` as with [`disk_args`]), inside network namespace
    /// `launch.netns` if given. With `incoming`, as [`spawn`](Self::spawn).
    /// Call [`connect_qmp`](Self::connect_qmp) next.
    pub fn spawn_native(
        guest: &GuestSpec,
        paths: &QemuPaths,
        launch: &NativeLaunch<'_>,
    ) -> Result<Self, LaunchError> {
        let program = qemu_program();
        let cmd = match launch.netns {
            Some(ns) => wanmig_wan::netns::command(ns, &program),
            None => Command::new(&program),
        };
        let mut cmd = base_command(cmd, guest, paths);
        cmd.arg("-m")
            .arg(guest.memory_mib.to_string())
            .args(["-machine", "pc"]);
        for (i, image) in launch.disk_images.iter().enumerate() {
            match launch.overlays.get(i) {
                Some(overlay) => cmd.args(native_overlaid_disk_args(i, image, overlay)),
                None => cmd.args(native_disk_args(i, image)),
            };
        }
        if launch.incoming {
            cmd.args(["-incoming", "defer", "-S"]);
        }
        Self::start(cmd, paths)
    }

    /// Spawns `cmd` with its output in `paths.log`.
    fn start(mut cmd: Command, paths: &QemuPaths) -> Result<Self, LaunchError> {
        let log = File::create(&paths.log).map_err(|source| LaunchError::File {
            path: paths.log.clone(),
            source,
        })?;
        let log_err = log.try_clone().map_err(|source| LaunchError::File {
            path: paths.log.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&paths.qmp);
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        Ok(QemuProcess {
            pid: child.id(),
            child: Some(child),
            qmp: None,
            paths: paths.clone(),
        })
    }

    /// Attaches to a QEMU someone else started, through its QMP socket
    /// `paths.qmp`; its pid comes from the socket (`SO_PEERCRED`).
    pub fn attach(paths: &QemuPaths) -> Result<Self, LaunchError> {
        let qmp = QmpClient::connect(&paths.qmp, Duration::from_secs(10))?;
        let pid = qmp.peer_pid().ok_or_else(|| LaunchError::File {
            path: paths.qmp.clone(),
            source: io::Error::other("no peer credentials on the QMP socket"),
        })?;
        Ok(QemuProcess {
            child: None,
            pid,
            qmp: Some(qmp),
            paths: paths.clone(),
        })
    }

    /// Connects to QMP (after the RAM registration was answered: QEMU maps
    /// guest RAM, and waits for the engine, before it serves QMP).
    pub fn connect_qmp(&mut self) -> Result<(), LaunchError> {
        match QmpClient::connect(&self.paths.qmp, Duration::from_secs(30)) {
            Ok(qmp) => {
                self.qmp = Some(qmp);
                Ok(())
            }
            Err(e) => match self.exit_status() {
                Some(status) => Err(LaunchError::Exited {
                    status,
                    log: self.paths.log.clone(),
                }),
                None => Err(e.into()),
            },
        }
    }

    /// The QMP connection.
    ///
    /// # Panics
    /// Before [`connect_qmp`](Self::connect_qmp) succeeded.
    pub fn qmp(&mut self) -> &mut QmpClient {
        self.qmp.as_mut().expect("QMP is connected after start-up")
    }

    /// Why QEMU is gone, if it is.
    pub fn exit_status(&mut self) -> Option<String> {
        match &mut self.child {
            Some(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            None => (!std::path::Path::new(&format!("/proc/{}", self.pid)).exists())
                .then(|| "exited".to_string()),
        }
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True if this process did not start QEMU (it is never killed here).
    pub fn is_attached(&self) -> bool {
        self.child.is_none()
    }

    /// Lets QEMU run on after this handle (and this process) is gone: it is
    /// no longer killed on drop. Returns its pid.
    pub fn detach(self) -> u32 {
        let pid = self.pid();
        let mut me = std::mem::ManuallyDrop::new(self);
        // Close the QMP connection; the child handle is left behind.
        drop(me.qmp.take());
        pid
    }

    /// Whether QEMU still runs.
    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Asks QEMU to quit, then kills it if it does not.
    pub fn shutdown(mut self) {
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.quit();
        }
        for _ in 0..50 {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        // An attached QEMU is not ours to kill.
        if let Some(child) = &mut self.child {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
