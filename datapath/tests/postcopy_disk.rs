//! The destination's post-copy disk image behind the NBD server, driven by
//! QEMU's own NBD client (`qemu-io`, `qemu-img`). The chunks come from a
//! source image file through a fetcher thread that answers requests the way
//! the engine's fault connection does (later, from another thread). Every
//! test compares bytes of the image files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use wanmig_datapath::nbd::{BlockDevice, Export, NbdServer};
use wanmig_datapath::storage::{BLOCK, ChunkFetcher, PostcopyImage, StorageCounters};

const SIZE: u64 = 8 << 20;
const CHUNK: u64 = 64 << 10;

/// Answers chunk requests from the source image, on its own thread.
struct FromSource {
    tx: Mutex<mpsc::Sender<(u64, u32)>>,
    requests: Mutex<Vec<(u64, u32)>>,
}

impl ChunkFetcher for FromSource {
    fn fetch(&self, first: u64, count: u32) {
        self.requests.lock().unwrap().push((first, count));
        let _ = self.tx.lock().unwrap().send((first, count));
    }
}

/// A fetcher nobody answers.
struct Silent;

impl ChunkFetcher for Silent {
    fn fetch(&self, _: u64, _: u32) {}
}

struct Setup {
    dir: PathBuf,
    source: Vec<u8>,
    image: Arc<PostcopyImage>,
    server: Option<NbdServer>,
    fetcher: Arc<FromSource>,
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 4096) as u8).wrapping_mul(7) ^ (i as u8).wrapping_mul(13) ^ 0x5c)
        .collect()
}

impl Setup {
    fn new(tag: &str) -> Self {
        Self::answering_after(tag, Duration::from_millis(2))
    }

    /// The "source engine" answers each request `delay` after it.
    fn answering_after(tag: &str, delay: Duration) -> Self {
        let dir = std::env::temp_dir().join(format!("wanmig-pcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = pattern(SIZE as usize);
        let (tx, rx) = mpsc::channel::<(u64, u32)>();
        let fetcher = Arc::new(FromSource {
            tx: Mutex::new(tx),
            requests: Mutex::default(),
        });
        let image = Arc::new(
            PostcopyImage::create(
                &dir.join("disk.raw"),
                &dir.join("disk.presence"),
                SIZE,
                CHUNK,
                fetcher.clone(),
                Duration::from_secs(30),
            )
            .unwrap(),
        );
        // The "source engine": answers after a while, from its own thread.
        let slot: Arc<OnceLock<std::sync::Weak<PostcopyImage>>> = Arc::default();
        slot.set(Arc::downgrade(&image)).unwrap();
        let src = source.clone();
        std::thread::spawn(move || {
            while let Ok((first, n)) = rx.recv() {
                std::thread::sleep(delay);
                let Some(img) = slot.get().and_then(|w| w.upgrade()) else {
                    return;
                };
                for c in first..first + u64::from(n) {
                    let from = (c * CHUNK) as usize;
                    let to = (from + CHUNK as usize).min(src.len());
                    img.install_chunk(c, Some(&src[from..to])).unwrap();
                }
            }
        });
        let server = Self::serve(&dir, image.clone());
        Setup {
            dir,
            source,
            image,
            server: Some(server),
            fetcher,
        }
    }

    fn serve(dir: &Path, image: Arc<PostcopyImage>) -> NbdServer {
        NbdServer::start(
            &dir.join("nbd.sock"),
            Export {
                name: "disk0".into(),
                device: image,
                log: None,
            },
        )
        .unwrap()
    }

    fn qemu_io(&self, cmds: &[&str]) -> std::process::Output {
        let mut c = Command::new("qemu-io");
        c.args([
            "--image-opts",
            &format!(
                "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export=disk0",
                self.dir.join("nbd.sock").display()
            ),
        ]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.output().expect("qemu-io (run scripts/setup)")
    }

    fn qemu_io_ok(&self, cmds: &[&str]) {
        let o = self.qemu_io(cmds);
        let out =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && !out.contains("failed"),
            "{cmds:?}: {out}"
        );
    }

    fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("disk.raw")).unwrap()
    }

    fn counters(&self) -> StorageCounters {
        self.image.counters()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn reads_of_absent_data_are_fetched_and_equal_the_source() {
    let s = Setup::new("read");
    let out = s.dir.join("copy.raw");
    let o = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!(
                "nbd+unix:///disk0?socket={}",
                s.dir.join("nbd.sock").display()
            ),
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read(&out).unwrap() == s.source,
        "the guest reads the source's bytes"
    );
    assert!(s.image_bytes() == s.source, "and they are in the image");
    assert_eq!(s.image.missing_blocks(), 0);
    let c = s.counters();
    assert_eq!(
        c.chunks_fetched,
        SIZE / CHUNK,
        "each chunk fetched once: {c:?}"
    );
    assert_eq!(c.whole_block_overwrites, 0);
}

#[test]
fn whole_block_overwrites_need_no_fetch_and_are_never_clobbered_by_the_push() {
    let s = Setup::new("whole");
    // 4 KiB-aligned writes of whole blocks: 16 blocks in chunk 1, 3 in chunk 5.
    s.qemu_io_ok(&[
        "write -P 0x11 65536 65536",
        &format!("write -P 0x33 {} {}", 5 * CHUNK + 4096, 3 * 4096),
    ]);
    let c = s.counters();
    assert_eq!(c.chunks_fetched, 0, "{c:?}");
    assert_eq!(c.whole_block_overwrites, 19, "{c:?}");
    assert!(s.fetcher.requests.lock().unwrap().is_empty());
    // The push arrives later with the source's (older) bytes.
    for chunk in [1, 5] {
        let from = (chunk * CHUNK) as usize;
        s.image
            .install_chunk(chunk, Some(&s.source[from..from + CHUNK as usize]))
            .unwrap();
    }
    let img = s.image_bytes();
    for (at, (&got, &src)) in img.iter().zip(&s.source).enumerate() {
        let at = at as u64;
        let want = if (CHUNK..2 * CHUNK).contains(&at) {
            0x11
        } else if (5 * CHUNK + 4096..5 * CHUNK + 4 * 4096).contains(&at) {
            0x33
        } else if (5 * CHUNK..6 * CHUNK).contains(&at) {
            src // the rest of chunk 5 came with the push
        } else {
            0 // not here yet (sparse)
        };
        assert_eq!(got, want, "byte {at}");
    }
    // Reading it all back through NBD: the guest's bytes where it wrote.
    s.qemu_io_ok(&["read -P 0x11 65536 65536"]);
}

#[test]
fn a_partial_write_to_an_absent_block_fetches_then_merges_every_byte() {
    let s = Setup::new("partial");
    // Unaligned: bytes 1000..4000 of block 0 (chunk 0); bytes 4090..8200
    // of chunk 3, over the end of block 48, all of 49, the start of 50.
    let c3 = 3 * CHUNK as usize;
    s.qemu_io_ok(&[
        "write -P 0x22 1000 3000",
        &format!("write -P 0x44 {} 4110", c3 + 4090),
    ]);
    let c = s.counters();
    assert_eq!(c.chunks_fetched, 2, "one fetch per chunk: {c:?}");
    assert_eq!(c.partial_block_merges, 3, "blocks 0, 48 and 50: {c:?}");
    let img = s.image_bytes();
    for at in (0..CHUNK as usize).chain(c3..c3 + CHUNK as usize) {
        let want = match at {
            1000..4000 => 0x22,
            a if (c3 + 4090..c3 + 8200).contains(&a) => 0x44,
            _ => s.source[at],
        };
        assert_eq!(img[at], want, "byte {at}");
    }
}

#[test]
fn a_fua_write_survives_an_engine_restart_and_is_not_refetched() {
    let mut s = Setup::new("restart");
    s.qemu_io_ok(&["write -f -P 0x77 131072 8192"]);
    drop(s.server.take());
    let dir = s.dir.clone();
    // A new engine on the same files.
    let reopened = Arc::new(
        PostcopyImage::reopen(
            &dir.join("disk.raw"),
            &dir.join("disk.presence"),
            CHUNK,
            Arc::new(Silent),
            Duration::from_millis(200),
        )
        .unwrap(),
    );
    assert_eq!(reopened.missing_blocks(), SIZE / BLOCK - 2);
    // The push does not overwrite what the guest wrote.
    let from = 2 * CHUNK as usize;
    reopened
        .install_chunk(2, Some(&s.source[from..from + CHUNK as usize]))
        .unwrap();
    let mut buf = vec![0u8; CHUNK as usize];
    reopened.read_at(2 * CHUNK, &mut buf).unwrap();
    for (i, &b) in buf.iter().enumerate() {
        let want = if i < 8192 { 0x77 } else { s.source[from + i] };
        assert_eq!(b, want, "byte {}", from + i);
    }
    // A block nobody sends: the read fails instead of inventing data.
    let e = reopened.read_at(0, &mut buf[..4096]).unwrap_err();
    assert!(e.to_string().contains("fetch from the source"), "{e}");
    s.server = Some(Setup::serve(&dir, reopened));
    let o = s.qemu_io(&["read 0 4096"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("Input/output error"), "{out}");
}

#[test]
fn concurrent_guest_writes_and_pushes_never_lose_the_guests_bytes() {
    let s = Setup::new("race");
    let img = s.image.clone();
    let src = s.source.clone();
    // Push every chunk while the guest writes whole blocks everywhere.
    let pusher = std::thread::spawn(move || {
        for c in 0..SIZE / CHUNK {
            // Slow enough to overlap qemu-io's writes.
            std::thread::sleep(Duration::from_millis(3));
            let from = (c * CHUNK) as usize;
            img.install_chunk(c, Some(&src[from..from + CHUNK as usize]))
                .unwrap();
        }
    });
    let mut cmds = Vec::new();
    for c in 0..SIZE / CHUNK {
        cmds.push(format!("write -P 0x99 {} 4096", c * CHUNK + 8192));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    s.qemu_io_ok(&refs);
    pusher.join().unwrap();
    let got = s.image_bytes();
    for c in 0..SIZE / CHUNK {
        let b = (c * CHUNK + 8192) as usize;
        assert!(
            got[b..b + 4096].iter().all(|&x| x == 0x99),
            "chunk {c}: the guest's block"
        );
        assert_eq!(
            got[b - 4096..b],
            s.source[b - 4096..b],
            "chunk {c}: the source's block"
        );
    }
    assert_eq!(s.image.missing_blocks(), 0);
}

#[test]
fn precopy_stores_replace_until_the_resume_then_guest_writes_are_tracked() {
    let s = Setup::new("precopy");
    let chunk = |c: u64| &s.source[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize];
    // Round 0 sends chunk 4 as it was; round 1 its newer bytes: they win.
    s.image
        .store_chunk(4, Some(&[0xee; CHUNK as usize]))
        .unwrap();
    s.image.store_chunk(4, Some(chunk(4))).unwrap();
    s.image.store_chunk(6, None).unwrap();
    assert!(
        s.image.store_chunk(7, Some(&[1; 10])).is_err(),
        "wrong length"
    );
    let img = s.image_bytes();
    assert!(img[4 * CHUNK as usize..5 * CHUNK as usize] == *chunk(4));
    assert!(
        img[6 * CHUNK as usize..7 * CHUNK as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(!s.image.chunk_needed(4) && !s.image.chunk_needed(6));

    s.image.mark_resumed();
    let e = s.image.store_chunk(4, Some(chunk(4))).unwrap_err();
    assert!(e.to_string().contains("store pre-copy chunk"), "{e}");
    // The guest writes one block of chunk 4; chunk 6 is left alone.
    s.qemu_io_ok(&[&format!("write -P 0x10 {} 4096", 4 * CHUNK + 8192)]);
    assert!(s.image.chunk_written_since_resume(4));
    assert!(!s.image.chunk_written_since_resume(6));
    assert_eq!(
        s.image.chunk_digest(6).unwrap(),
        crc32(&[0; CHUNK as usize])
    );
    assert_ne!(s.image.chunk_digest(4).unwrap(), crc32(chunk(4)));
    assert_eq!(s.counters().chunks_fetched, 0, "chunk 4 was here");
}

fn crc32(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(b);
    h.finalize()
}

#[test]
fn libnbd_reads_and_writes_the_post_copy_export() {
    let s = Setup::new("libnbd");
    let uri = format!(
        "nbd+unix:///disk0?socket={}",
        s.dir.join("nbd.sock").display()
    );
    let info = Command::new("nbdinfo")
        .args(["--json", &uri])
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["exports"][0]["export-size"], SIZE);
    // Copying the export out fetches every chunk: the source's bytes.
    let out = s.dir.join("out.raw");
    let o = Command::new("nbdcopy")
        .args([&uri, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == s.source);
    assert_eq!(s.counters().chunks_fetched, SIZE / CHUNK);
    // Copying into it: whole blocks, no fetch needed; the bytes land.
    let input = s.dir.join("in.raw");
    let new: Vec<u8> = s.source.iter().map(|b| b ^ 0xff).collect();
    std::fs::write(&input, &new).unwrap();
    let o = Command::new("nbdcopy")
        .args([input.to_str().unwrap(), &uri])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(s.image_bytes() == new);
}

#[test]
fn a_guest_read_waiting_for_a_chunk_is_timed_as_its_wait() {
    // The answer takes 300 ms (a slow link): QEMU's read of an absent chunk
    // waits that long, and the image records the wait (the engine counts
    // it in the post-copy penalty), once the guest runs here.
    let delay = Duration::from_millis(300);
    let s = Setup::answering_after("wait", delay);
    // Before the resume (QEMU's own reads): fetched, not the guest's wait.
    s.qemu_io_ok(&[&format!("read {CHUNK} 512")]);
    assert!(s.image.waits().is_empty());
    s.image.mark_resumed();
    let off = 5 * CHUNK + 4096;
    let t = std::time::Instant::now();
    let o = s.qemu_io(&[&format!("read -v {off} 512")]);
    let took = t.elapsed();
    assert!(o.status.success(), "{o:?}");
    let waits = s.image.waits();
    assert_eq!(waits.len(), 1, "one read, one wait: {waits:?}");
    let (start, end) = waits[0];
    assert!(start >= t, "{waits:?}");
    let waited = end - start;
    assert!(
        waited >= delay && waited <= took,
        "the read waited {waited:?} for a {delay:?} fetch (qemu-io ran {took:?})"
    );
    assert_eq!(
        s.fetcher.requests.lock().unwrap().as_slice(),
        &[(1, 1), (5, 1)]
    );
    // The bytes are the source's.
    let img = s.image_bytes();
    let at = off as usize;
    assert!(img[at..at + 512] == s.source[at..at + 512]);
    // Read again: here now, no wait.
    s.qemu_io_ok(&[&format!("read {off} 512")]);
    assert_eq!(s.image.waits().len(), 1);
}
