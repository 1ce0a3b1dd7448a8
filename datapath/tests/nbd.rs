//! The engine's NBD server against NBD clients nobody here wrote (QEMU's
//! `qemu-io` and `qemu-img`, libnbd's `nbdinfo` and `nbdcopy`), and against
//! a hostile client speaking raw bytes. Every test checks the image file's
//! bytes, not the server's word.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use wanmig_datapath::nbd::proto::*;
use wanmig_datapath::nbd::{
    Access, BlockDevice, Export, FileImage, NbdError, NbdServer, RequestLog, ServeEnd,
};

const SIZE: u64 = 16 << 20;

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("wanmig-nbd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Recorded(Mutex<Vec<(Access, u64, u64)>>);

impl RequestLog for Recorded {
    fn record(&self, access: Access, offset: u64, len: u64) {
        self.0.lock().unwrap().push((access, offset, len));
    }
}

/// A patterned image (every 4 KiB block distinct) served on a socket.
struct Served {
    _dir: Scratch,
    image: PathBuf,
    socket: PathBuf,
    server: Option<NbdServer>,
    log: Arc<Recorded>,
}

impl Served {
    fn new(tag: &str, read_only: bool) -> Self {
        let dir = Scratch::new(tag);
        let image = dir.path("disk.raw");
        let f = File::create(&image).unwrap();
        f.write_all_at(&pattern(0, SIZE as usize, 7), 0).unwrap();
        drop(f);
        let socket = dir.path("nbd.sock");
        let log = Arc::new(Recorded::default());
        let device: Arc<dyn BlockDevice> = Arc::new(FileImage::open(&image, read_only).unwrap());
        let server = NbdServer::start(
            &socket,
            Export {
                name: "disk0".into(),
                device,
                log: Some(log.clone()),
            },
        )
        .unwrap();
        Served {
            _dir: dir,
            image,
            socket,
            server: Some(server),
            log,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk0?socket={}", self.socket.display())
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }

    fn outcomes(&mut self) -> Vec<Result<ServeEnd, NbdError>> {
        self.server.take().unwrap().stop()
    }
}

/// Bytes that differ at every offset and with every seed.
fn pattern(offset: usize, len: usize, seed: u8) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| ((i / 4096) as u8) ^ (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/setup)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nbdinfo_sees_the_export_and_nbdcopy_moves_its_bytes_both_ways() {
    let mut s = Served::new("libnbd", false);
    let info = run(Command::new("nbdinfo").args(["--json", &s.uri()]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], SIZE, "{info}");
    assert_eq!(e["is_read_only"], false, "{info}");
    assert_eq!(e["can_flush"], true, "{info}");
    assert_eq!(e["can_fua"], true, "{info}");
    assert_eq!(e["can_trim"], true, "{info}");
    assert_eq!(e["can_zero"], true, "{info}");

    // Out of the export: the image's bytes.
    let out = s._dir.path("out.raw");
    run(Command::new("nbdcopy").args([&s.uri(), out.to_str().unwrap()]));
    assert!(std::fs::read(&out).unwrap() == s.bytes());

    // Into the export: new bytes land in the image.
    let src = s._dir.path("in.raw");
    std::fs::write(&src, pattern(0, SIZE as usize, 0x5a)).unwrap();
    run(Command::new("nbdcopy").args([src.to_str().unwrap(), &s.uri()]));
    assert!(s.bytes() == pattern(0, SIZE as usize, 0x5a));
    let written: u64 = s
        .log
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(a, _, _)| *a == Access::Write)
        .map(|(_, _, l)| l)
        .sum();
    assert!(written >= SIZE, "every written byte is logged: {written}");
    assert!(
        s.outcomes()
            .iter()
            .all(|o| matches!(o, Ok(ServeEnd::Disconnected))),
        "libnbd disconnects politely"
    );
}

#[test]
fn qemu_io_writes_zeroes_discards_and_flushes_in_place() {
    let mut s = Served::new("qemu-io", false);
    let before = s.bytes();
    run(Command::new("qemu-io").args([
        "--image-opts",
        &format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export=disk0",
            s.socket.display()
        ),
        "-c",
        "write -P 0xab 4096 65536",
        "-c",
        "write -f -P 0xcd 1048576 4096",
        "-c",
        "write -z 2097152 131072",
        "-c",
        "discard 4194304 65536",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 4096 65536",
        "-c",
        "read -P 0 2097152 131072",
    ]));
    let after = s.bytes();
    for (at, (&a, &b)) in after.iter().zip(&before).enumerate() {
        let at = at as u64;
        let want = match at {
            4096..69632 => 0xab,
            1048576..1052672 => 0xcd,
            2097152..2228224 | 4194304..4259840 => 0,
            _ => b,
        };
        assert_eq!(a, want, "byte {at}");
    }
    let log = s.log.0.lock().unwrap().clone();
    assert!(log.contains(&(Access::Write, 4096, 65536)), "{log:?}");
    assert!(log.contains(&(Access::Write, 1048576, 4096)), "{log:?}");
    assert!(
        log.iter()
            .any(|&(a, o, _)| a == Access::WriteZeroes && o == 2097152),
        "{log:?}"
    );
    assert!(log.contains(&(Access::Trim, 4194304, 65536)), "{log:?}");
    assert!(s.outcomes().iter().all(|o| o.is_ok()));
}

#[test]
fn qemu_img_converts_the_export_byte_for_byte() {
    let s = Served::new("qemu-img", true);
    let out = s._dir.path("copy.raw");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &s.uri(),
        out.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&out).unwrap() == s.bytes());
    // A read-only export refuses writes, and the image is untouched.
    let before = s.bytes();
    let w = Command::new("qemu-io")
        .args(["-f", "raw", &s.uri(), "-c", "write -P 1 0 4096"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        said.contains("ermission denied")
            || said.contains("read-only")
            || said.contains("read only"),
        "{said}"
    );
    assert!(s.bytes() == before);
}

// ---- a hostile client, byte by byte ----

struct Raw {
    sock: UnixStream,
}

impl Raw {
    /// Connects and reads the greeting.
    fn connect(path: &Path) -> Self {
        let mut sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut g = [0u8; 18];
        sock.read_exact(&mut g).unwrap();
        assert_eq!(u64::from_be_bytes(g[..8].try_into().unwrap()), NBD_MAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        Raw { sock }
    }

    fn send(&mut self, b: &[u8]) {
        self.sock.write_all(b).unwrap();
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// One option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.sock.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.sock.read_exact(&mut d).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }

    /// Handshake to transmission with `NBD_OPT_GO`, after an unknown option.
    fn go(path: &Path) -> Self {
        let mut c = Raw::connect(path);
        c.send(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
        c.option(8, &[]); // NBD_OPT_STRUCTURED_REPLY
        assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
        c.option(OPT_GO, &go_data("disk0"));
        let (_, t, info) = c.option_reply();
        assert_eq!((t, &info[..2]), (REP_INFO, &INFO_EXPORT.to_be_bytes()[..]));
        assert_eq!(u64::from_be_bytes(info[2..10].try_into().unwrap()), SIZE);
        // Asked for: the block sizes.
        let (_, t, bs) = c.option_reply();
        assert_eq!(
            (t, &bs[..2]),
            (REP_INFO, &INFO_BLOCK_SIZE.to_be_bytes()[..])
        );
        assert_eq!(
            u32::from_be_bytes(bs[10..14].try_into().unwrap()),
            MAX_PAYLOAD
        );
        assert_eq!(c.option_reply().1, REP_ACK);
        c
    }

    fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&command.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.send(&m);
    }

    /// A simple reply: its error.
    fn reply(&mut self, cookie: u64) -> u32 {
        let (c, e) = self.any_reply();
        assert_eq!(c, cookie);
        e
    }

    /// The next simple reply: (cookie, error).
    fn any_reply(&mut self) -> (u64, u32) {
        let mut r = [0u8; 16];
        self.sock.read_exact(&mut r).unwrap();
        let magic = u32::from_be_bytes(r[..4].try_into().unwrap());
        assert_eq!(magic, SIMPLE_REPLY_MAGIC);
        (
            u64::from_be_bytes(r[8..].try_into().unwrap()),
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
        )
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.sock.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

#[test]
fn bad_requests_get_the_protocols_errors_and_the_connection_stays_in_step() {
    let mut s = Served::new("hostile-tx", false);
    let before = s.bytes();
    let mut c = Raw::go(&s.socket);
    // Past the end: reads and trims EINVAL, writes ENOSPC (payload consumed).
    c.request(0, 0, 1, SIZE - 4096, 8192);
    assert_eq!(c.reply(1), Errno::Inval as u32);
    c.request(0, 0, 2, u64::MAX - 10, 4096);
    assert_eq!(c.reply(2), Errno::Inval as u32, "offset + length overflows");
    c.request(1, 0, 3, SIZE, 4096);
    c.send(&[0xee; 4096]);
    assert_eq!(c.reply(3), Errno::NoSpc as u32);
    c.request(4, 0, 4, SIZE, 1);
    assert_eq!(c.reply(4), Errno::Inval as u32);
    // Unknown command, unknown flag, zero length, oversize read.
    c.request(42, 0, 5, 0, 4096);
    assert_eq!(c.reply(5), Errno::Inval as u32);
    c.request(0, 1 << 9, 6, 0, 4096);
    assert_eq!(c.reply(6), Errno::Inval as u32);
    c.request(0, 0, 7, 0, 0);
    assert_eq!(c.reply(7), Errno::Inval as u32);
    c.request(0, 0, 8, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.reply(8), Errno::Overflow as u32);
    // Still in step: a good read returns the image's bytes.
    c.request(0, 0, 9, 8192, 4096);
    assert_eq!(c.reply(9), 0);
    let mut data = vec![0u8; 4096];
    c.sock.read_exact(&mut data).unwrap();
    assert!(data == before[8192..12288]);
    // A write too large to read: disconnected.
    c.request(1, 0, 10, 0, MAX_PAYLOAD + 1);
    assert!(c.closed());
    // A request without magic: disconnected.
    let mut c = Raw::go(&s.socket);
    c.send(&[0u8; 28]);
    assert!(c.closed());
    // A request cut short: disconnected.
    let mut c = Raw::go(&s.socket);
    c.send(&REQUEST_MAGIC.to_be_bytes());
    drop(c);

    assert!(s.bytes() == before, "nothing was written");
    let ends = s.outcomes();
    assert!(
        ends.iter()
            .any(|e| matches!(e, Err(NbdError::WriteTooLarge(n)) if *n == MAX_PAYLOAD + 1)),
        "{ends:?}"
    );
    assert!(
        ends.iter()
            .any(|e| matches!(e, Err(NbdError::RequestMagic(0)))),
        "{ends:?}"
    );
    assert!(
        ends.iter().any(|e| matches!(
            e,
            Err(NbdError::Io {
                during: "request",
                ..
            })
        )),
        "{ends:?}"
    );
}

#[test]
fn a_broken_handshake_gets_an_error_reply_or_a_disconnect() {
    let mut s = Served::new("hostile-hs", false);
    // No fixed newstyle.
    let mut c = Raw::connect(&s.socket);
    c.send(&0u32.to_be_bytes());
    assert!(c.closed());
    // An unknown export, a malformed GO, a LIST with data: error replies,
    // then ABORT is acknowledged.
    let mut c = Raw::connect(&s.socket);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    c.option(OPT_GO, &go_data("nope"));
    assert_eq!(c.option_reply().1, REP_ERR_UNKNOWN);
    c.option(OPT_GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(OPT_LIST, b"junk");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(OPT_LIST, &[]);
    let (_, t, d) = c.option_reply();
    assert_eq!((t, &d[4..]), (REP_SERVER, &b"disk0"[..]));
    assert_eq!(c.option_reply().1, REP_ACK);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    assert!(c.closed());
    // An option too long to read, an option without magic, an unknown export
    // by NBD_OPT_EXPORT_NAME: disconnected.
    let mut c = Raw::connect(&s.socket);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    c.send(&m);
    assert!(c.closed());
    let mut c = Raw::connect(&s.socket);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    c.send(&[0x11; 16]);
    assert!(c.closed());
    let mut c = Raw::connect(&s.socket);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"other");
    assert!(c.closed());
    // NBD_OPT_EXPORT_NAME for the export: size and flags, then transmission.
    let mut c = Raw::connect(&s.socket);
    c.send(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"disk0");
    let mut r = [0u8; 10];
    c.sock.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE);
    c.request(2, 0, 1, 0, 0);
    assert!(c.closed());

    let ends = s.outcomes();
    assert!(
        ends.iter()
            .any(|e| matches!(e, Err(NbdError::ClientFlags(0)))),
        "{ends:?}"
    );
    assert!(
        ends.iter().any(|e| matches!(e, Ok(ServeEnd::Aborted))),
        "{ends:?}"
    );
    assert!(
        ends.iter()
            .any(|e| matches!(e, Err(NbdError::OptionTooLong { .. }))),
        "{ends:?}"
    );
    assert!(
        ends.iter()
            .any(|e| matches!(e, Err(NbdError::OptionMagic(_)))),
        "{ends:?}"
    );
    assert!(
        ends.iter()
            .any(|e| matches!(e, Err(NbdError::UnknownExport(n)) if n == "other")),
        "{ends:?}"
    );
    assert!(
        ends.iter().any(|e| matches!(e, Ok(ServeEnd::Disconnected))),
        "{ends:?}"
    );
}

/// A file image whose reads of the first block wait for a gate (a block a
/// post-copy destination is still fetching).
struct Gated {
    inner: FileImage,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), wanmig_datapath::nbd::DeviceError> {
        if offset < 4096 {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, o: u64, d: &[u8], f: bool) -> Result<(), wanmig_datapath::nbd::DeviceError> {
        self.inner.write_at(o, d, f)
    }
    fn flush(&self) -> Result<(), wanmig_datapath::nbd::DeviceError> {
        self.inner.flush()
    }
    fn trim(&self, o: u64, l: u64, f: bool) -> Result<(), wanmig_datapath::nbd::DeviceError> {
        self.inner.trim(o, l, f)
    }
    fn write_zeroes(
        &self,
        o: u64,
        l: u64,
        p: bool,
        f: bool,
    ) -> Result<(), wanmig_datapath::nbd::DeviceError> {
        self.inner.write_zeroes(o, l, p, f)
    }
}

#[test]
fn a_slow_read_does_not_hold_up_the_requests_behind_it_and_disc_waits_for_it() {
    let dir = Scratch::new("gated");
    let image = dir.path("disk.raw");
    std::fs::write(&image, pattern(0, 1 << 20, 3)).unwrap();
    let gated = Arc::new(Gated {
        inner: FileImage::open(&image, false).unwrap(),
        open: Mutex::new(false),
        opened: std::sync::Condvar::new(),
    });
    let socket = dir.path("nbd.sock");
    let server = NbdServer::start(
        &socket,
        Export {
            name: "disk0".into(),
            device: gated.clone(),
            log: None,
        },
    )
    .unwrap();
    let mut c = Raw::connect(&socket);
    c.send(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"disk0");
    let mut r = [0u8; 10];
    c.sock.read_exact(&mut r).unwrap();
    // Whatever happens, the gate opens at the end (a worker blocked on it
    // would hold the server's shutdown).
    struct OpenOnDrop(Arc<Gated>);
    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            *self.0.open.lock().unwrap() = true;
            self.0.opened.notify_all();
        }
    }
    let _open_at_end = OpenOnDrop(gated.clone());
    // Read 1 waits at the gate; write 2, then read 3, are answered meanwhile.
    c.request(0, 0, 1, 0, 4096);
    c.request(1, 0, 2, 65536, 4096);
    c.send(&[0x42; 4096]);
    assert_eq!(
        c.any_reply(),
        (2, 0),
        "the write is not held up by the read"
    );
    c.request(0, 0, 3, 65536, 4096);
    assert_eq!(c.any_reply(), (3, 0));
    let mut data = vec![0u8; 4096];
    c.sock.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x42), "read 3 sees write 2");
    // DISC with read 1 outstanding: it is answered before the close.
    c.request(2, 0, 4, 0, 0);
    std::thread::sleep(std::time::Duration::from_millis(100));
    *gated.open.lock().unwrap() = true;
    gated.opened.notify_all();
    assert_eq!(c.any_reply(), (1, 0));
    c.sock.read_exact(&mut data).unwrap();
    assert!(data == pattern(0, 4096, 3));
    assert!(c.closed());
    assert!(matches!(server.stop()[..], [Ok(ServeEnd::Disconnected)]));
}
