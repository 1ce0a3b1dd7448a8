//! What the lab needs before it boots, built when missing: the built-in
//! guest (`scripts/guest-image`), the patched Xen (`xen-patches/build`, when
//! the repository has it), the engine (`libwanmig.so` of `wanmig-capi` with
//! the `xen` feature, and `wanmig` for `wanmig keygen`, when the patched xl
//! has `--wanmig`), the dom0 image (`bench/xen/dom0-image`) and the QEMU
//! that boots it when the guest runs on nested paging (`bench/xen/lab-qemu`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::Progress;

/// What to provision.
#[derive(Debug, Clone)]
pub struct ProvisionOptions {
    /// The repository (holds `bench/xen/dom0-image`).
    pub repo: PathBuf,
    /// Debian's own Xen even if the patched build is there.
    pub stock: bool,
    /// A failed patched build or engine build falls back to Debian's Xen
    /// (the report says why the engine run is missing) instead of failing.
    pub keep_going: bool,
    /// Fetch bookworm's QEMU 7.2 for the lab (`bench/xen/lab-qemu`): guests
    /// on nested paging (HAP) die at once under QEMU 10's TCG.
    pub lab_qemu: bool,
}

/// A built dom0 image (`${WANMIG_CACHE}/xen-lab/<hash>/`).
#[derive(Debug, Clone)]
pub struct Image {
    /// Its directory.
    pub dir: PathBuf,
    /// Its hash.
    pub hash: String,
    /// The hypervisor (multiboot ELF).
    pub hypervisor: PathBuf,
    /// dom0's kernel.
    pub kernel: PathBuf,
    /// dom0's initramfs.
    pub initramfs: PathBuf,
    /// "debian <version> (stock)" or "patched ...".
    pub hypervisor_label: String,
    /// The toolstack's label.
    pub tools_label: String,
    /// The image holds libwanmig.so.
    pub engine: bool,
    /// Why the engine is not in it (when it is not).
    pub engine_missing: Option<String>,
    /// The QEMU that boots it when not the host's (`bench/xen/lab-qemu`:
    /// bookworm's 7.2, for guests on nested paging).
    pub qemu: Option<PathBuf>,
}

/// Finds the repository: `start` or one of its parents holding
/// `bench/xen/dom0-image`.
pub fn find_repo(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join("bench/xen/dom0-image").is_file())
        .map(Path::to_path_buf)
}

fn run_step(progress: &Progress, what: &str, cmd: &mut Command) -> Result<String> {
    progress.say(what);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("{what}: starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{what}: {:?} failed ({})", cmd.get_program(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The patched Xen: its dist tree and hypervisor, from `xen-patches/build`
/// (which builds when its cache misses). None if the repository has no
/// build script.
fn patched_xen(repo: &Path, progress: &Progress) -> Result<Option<(PathBuf, PathBuf, String)>> {
    let build = repo.join("xen-patches/build");
    if !build.is_file() {
        return Ok(None);
    }
    run_step(
        progress,
        "patched Xen: xen-patches/build (builds when its cache misses: ~7 min on 2 cores)",
        Command::new(&build).current_dir(repo).stdout(Stdio::null()),
    )?;
    let dist = run_step(
        progress,
        "patched Xen: xen-patches/build --print-dist",
        Command::new(&build).arg("--print-dist").current_dir(repo),
    )?;
    let dist = PathBuf::from(dist.lines().last().unwrap_or_default().trim());
    if !dist.is_dir() {
        bail!(
            "xen-patches/build --print-dist printed {}, not a directory",
            dist.display()
        );
    }
    let parent = dist.parent().unwrap_or(&dist).to_path_buf();
    let hv = ["xen.gz", "xen"]
        .iter()
        .map(|n| parent.join(n))
        .chain(["boot/xen.gz"].iter().map(|n| dist.join(n)))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no xen.gz or xen beside {} (or in its boot/)",
                dist.display()
            )
        })?;
    // "patched <Debian version> (xen-patches <hash>)", the version from the build's manifest.
    let version = std::fs::read(parent.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|m| m["version"].as_str().map(|v| format!(" {v}")))
        .unwrap_or_default();
    let hash: String = parent.file_name().map_or("?".into(), |n| {
        n.to_string_lossy().chars().take(16).collect()
    });
    let label = format!("patched{version} (xen-patches {hash})");
    Ok(Some((dist, hv, label)))
}

/// Whether a dist tree's xl knows `--wanmig` (its usage text is compiled in:
/// `xl help migrate` itself needs a running Xen).
fn xl_has_wanmig(dist: &Path) -> Result<bool> {
    for rel in ["usr/sbin/xl", "usr/local/sbin/xl", "sbin/xl"] {
        let p = dist.join(rel);
        if p.is_file() {
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            return Ok(bytes.windows(8).any(|w| w == b"--wanmig"));
        }
    }
    Ok(false)
}

/// The cargo target directory of the repository.
fn target_dir(repo: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { repo.join(p) })
        .unwrap_or_else(|| repo.join("target"))
}

/// The engine's pieces for dom0, built against the patched tree at `dist`.
#[derive(Debug, Clone)]
struct EngineBuild {
    /// `libwanmig.so` (the patched helper `dlopen`s it).
    lib: PathBuf,
    /// `wanmig` (for `wanmig keygen`).
    bin: PathBuf,
    /// The C ABI's client (`ffi/capi/tests/c/abi_client.c`), linked with
    /// `lib`, run in dom0 against a live domain.
    abi_client: PathBuf,
}

/// Builds [`EngineBuild`]: `cargo build --release` of wanmig-capi (feature
/// `xen`) and the `wanmig` binary, then the C client with gcc. `Err` inside
/// `Ok`: a build failed in a way the lab can go on without (`--keep-going`).
fn build_engine(
    repo: &Path,
    dist: &Path,
    progress: &Progress,
) -> Result<std::result::Result<EngineBuild, String>> {
    run_step(
        progress,
        "engine: cargo build --release -p wanmig-capi -p wanmig-datapath --features xen",
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "wanmig-capi",
                "-p",
                "wanmig-datapath",
                "--features",
                "wanmig-capi/xen",
            ])
            // The xen feature builds against the patched tree's headers and libraries.
            .env("WANMIG_XEN_DIST", dist)
            .current_dir(repo)
            .stdout(Stdio::null()),
    )?;
    let release = target_dir(repo).join("release");
    let (lib, bin) = (release.join("libwanmig.so"), release.join("wanmig"));
    for f in [&lib, &bin] {
        if !f.is_file() {
            return Ok(Err(format!(
                "cargo built the engine but {} is not there",
                f.display()
            )));
        }
    }
    let lib_dir = ["usr/lib64", "usr/lib"]
        .iter()
        .map(|d| dist.join(d))
        .find(|d| d.join("libxenctrl.so").exists())
        .unwrap_or_else(|| dist.join("usr/lib"));
    let abi_client = release.join("wanmig-abi-client");
    run_step(
        progress,
        "engine: gcc ffi/capi/tests/c/abi_client.c (the C ABI's client, for dom0)",
        Command::new("gcc")
            .args([
                "-std=c11",
                "-D_POSIX_C_SOURCE=200809L",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-O2",
            ])
            .arg("-I")
            .arg(repo.join("ffi/include"))
            .arg(repo.join("ffi/capi/tests/c/abi_client.c"))
            .arg("-L")
            .arg(&release)
            .arg(format!("-Wl,-rpath-link,{}", lib_dir.display()))
            .args(["-lwanmig", "-lpthread", "-o"])
            .arg(&abi_client)
            .current_dir(repo)
            .stdout(Stdio::null()),
    )?;
    Ok(Ok(EngineBuild {
        lib,
        bin,
        abi_client,
    }))
}

/// Provisions everything and builds (or reuses) the dom0 image.
pub fn provision(o: &ProvisionOptions, progress: &Progress) -> Result<Image> {
    let repo = &o.repo;
    run_step(
        progress,
        "built-in guest: scripts/guest-image",
        Command::new(repo.join("scripts/guest-image"))
            .current_dir(repo)
            .stdout(Stdio::null()),
    )?;

    let mut engine_missing = None;
    let mut patched = None;
    if o.stock {
        engine_missing = Some("--stock: Debian's Xen asked for".to_string());
    } else {
        match patched_xen(repo, progress) {
            Ok(Some(p)) => patched = Some(p),
            Ok(None) => {
                engine_missing =
                    Some("no xen-patches/build in the repository: Debian's stock Xen".to_string())
            }
            Err(e) if o.keep_going => {
                progress.say(&format!(
                    "patched Xen unavailable, going on with Debian's: {e:#}"
                ));
                engine_missing = Some(format!("the patched Xen build failed: {e:#}"));
            }
            Err(e) => return Err(e),
        }
    }
    let mut engine = None;
    if let Some((dist, _, _)) = &patched {
        if !xl_has_wanmig(dist)? {
            engine_missing = Some("the patched xl has no --wanmig".to_string());
        } else {
            match build_engine(repo, dist, progress) {
                Ok(Ok(e)) => engine = Some(e),
                Ok(Err(why)) => {
                    progress.say(&format!("engine not available: {why}"));
                    engine_missing = Some(why);
                }
                Err(e) if o.keep_going => {
                    progress.say(&format!("engine unavailable, going on without it: {e:#}"));
                    engine_missing = Some(format!("{e:#}"));
                }
                Err(e) => return Err(e),
            }
        }
    }

    let mut cmd = Command::new(repo.join("bench/xen/dom0-image"));
    cmd.current_dir(repo);
    if let Some((dist, hv, label)) = &patched {
        cmd.arg("--tools-dist")
            .arg(dist)
            .arg("--hypervisor")
            .arg(hv)
            .arg("--label")
            .arg(label);
    }
    if let Some(e) = &engine {
        cmd.arg("--wanmig-lib").arg(&e.lib);
        cmd.arg("--wanmig-bin").arg(&e.bin);
        cmd.arg("--wanmig-abi-client").arg(&e.abi_client);
    }
    let dir = run_step(progress, "dom0 image: bench/xen/dom0-image", &mut cmd)?;
    let qemu = if o.lab_qemu {
        let q = run_step(
            progress,
            "QEMU for the lab: bench/xen/lab-qemu (bookworm's 7.2: QEMU 10's TCG kills guests on nested paging)",
            Command::new(repo.join("bench/xen/lab-qemu")).current_dir(repo),
        )?;
        Some(PathBuf::from(q.lines().last().unwrap_or_default()))
    } else {
        None
    };
    let dir = PathBuf::from(dir.lines().last().unwrap_or_default());
    let manifest = dir.join("manifest.json");
    let m: Value = serde_json::from_slice(
        &std::fs::read(&manifest).with_context(|| format!("reading {}", manifest.display()))?,
    )
    .with_context(|| format!("parsing {}", manifest.display()))?;
    let s = |k: &str| m[k].as_str().unwrap_or("?").to_string();
    let path = |k: &str| dir.join(m["paths"][k].as_str().unwrap_or(k));
    let mut hypervisor_label = s("hypervisor");
    if patched.is_none() {
        hypervisor_label = format!("{hypervisor_label} (stock)");
    }
    Ok(Image {
        hash: s("hash"),
        hypervisor: path("hypervisor"),
        kernel: path("kernel"),
        initramfs: path("initramfs"),
        hypervisor_label,
        tools_label: s("tools"),
        engine: m["engine"].as_bool().unwrap_or(false),
        engine_missing,
        qemu,
        dir,
    })
}
