//! One NBD client connection: fixed-newstyle option haggling, then
//! transmission with simple replies, up to [`WORKERS`] requests at a time.
//!
//! Whatever the client sends, the server answers with the protocol's error
//! (an option error reply, a request's `NBD_E*`) or closes the connection
//! with a typed [`NbdError`]; it never panics, and it never touches the
//! device outside its bounds. A write's payload is always read whole before
//! the reply, so a refused write keeps the stream in step.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::{Arc, Mutex};

use zerocopy::{FromBytes, IntoBytes};

use super::device::{BlockDevice, DeviceError};
use super::proto::*;

/// What a client did with the export, reported after each request that
/// succeeded (the source's dirty-chunk log and profiler listen here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Bytes read.
    Read,
    /// Bytes written with data.
    Write,
    /// Bytes discarded.
    Trim,
    /// Bytes zeroed.
    WriteZeroes,
}

/// Hears every successful request on an export.
pub trait RequestLog: Send + Sync {
    /// `len` bytes at `offset` were accessed.
    fn record(&self, access: Access, offset: u64, len: u64);
}

/// An export: a name and the device behind it.
#[derive(Clone)]
pub struct Export {
    /// The export's name (clients asking for `""` get it too).
    pub name: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// Told about every successful request.
    pub log: Option<Arc<dyn RequestLog>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.device.size())
            .field("read_only", &self.device.read_only())
            .finish()
    }
}

impl Export {
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    fn transmission_flags(&self) -> u16 {
        let mut f = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA;
        if self.device.read_only() {
            f |= TX_READ_ONLY;
        } else {
            f |= TX_SEND_TRIM | TX_SEND_WRITE_ZEROES;
        }
        f
    }
}

/// A connection ended in error (the client is disconnected).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed (or the client went away mid-message).
    #[error("NBD connection: {during}")]
    Io {
        /// What was being read or written.
        during: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The client does not speak fixed newstyle, or sent unknown flags.
    #[error("NBD client flags {0:#x}: fixed newstyle required, no other flag known")]
    ClientFlags(u32),
    /// An option request without the option magic.
    #[error("NBD option with bad magic {0:#018x}")]
    OptionMagic(u64),
    /// An option too large to be read.
    #[error("NBD option {option} with {len} bytes of data (at most {MAX_OPTION_LEN})")]
    OptionTooLong {
        /// The option.
        option: u32,
        /// Its length.
        len: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` for an export that is not here (the protocol's
    /// only answer is to disconnect).
    #[error("NBD client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// A request without the request magic: the stream is out of step.
    #[error("NBD request with bad magic {0:#010x}")]
    RequestMagic(u32),
    /// A write whose payload is too large to read (the stream cannot be kept
    /// in step without reading it).
    #[error("NBD write of {0} bytes (at most {MAX_PAYLOAD})")]
    WriteTooLarge(u32),
    /// The device failed in a way a reply cannot report.
    #[error("NBD device")]
    Device(#[from] DeviceError),
}

/// How a connection ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// `NBD_OPT_ABORT` during negotiation.
    Aborted,
    /// `NBD_CMD_DISC`.
    Disconnected,
    /// The client closed the socket between messages.
    Closed,
}

fn io(during: &'static str) -> impl FnOnce(std::io::Error) -> NbdError {
    move |source| NbdError::Io { during, source }
}

/// Reads exactly `buf`, or reports a clean end of stream as `None`.
fn read_or_eof(
    r: &mut impl Read,
    buf: &mut [u8],
    during: &'static str,
) -> Result<Option<()>, NbdError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(NbdError::Io {
                    during,
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(during)(e)),
        }
    }
    Ok(Some(()))
}

/// Serves one client on `stream` until it disconnects.
pub fn serve<S>(stream: &S, export: &Export) -> Result<ServeEnd, NbdError>
where
    for<'a> &'a S: Read + Write,
    S: Sync,
{
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let mut w = BufWriter::with_capacity(256 << 10, stream);
    match negotiate(&mut r, &mut w, export)? {
        Negotiated::Aborted => Ok(ServeEnd::Aborted),
        Negotiated::Closed => Ok(ServeEnd::Closed),
        Negotiated::Transmission => transmit(&mut r, w, export),
    }
}

enum Negotiated {
    Transmission,
    Aborted,
    Closed,
}

fn negotiate(
    r: &mut impl Read,
    w: &mut impl Write,
    export: &Export,
) -> Result<Negotiated, NbdError> {
    let greeting = ServerGreeting {
        magic: NBD_MAGIC.into(),
        ihaveopt: IHAVEOPT.into(),
        flags: (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).into(),
    };
    w.write_all(greeting.as_bytes()).map_err(io("greeting"))?;
    w.flush().map_err(io("greeting"))?;
    let mut flags = [0u8; 4];
    if read_or_eof(r, &mut flags, "client flags")?.is_none() {
        return Ok(Negotiated::Closed);
    }
    let flags = u32::from_be_bytes(flags);
    if flags & CLIENT_FIXED_NEWSTYLE == 0
        || flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
    {
        return Err(NbdError::ClientFlags(flags));
    }
    let no_zeroes = flags & CLIENT_NO_ZEROES != 0;
    loop {
        let mut h = [0u8; size_of::<OptionHeader>()];
        if read_or_eof(r, &mut h, "option")?.is_none() {
            return Ok(Negotiated::Closed);
        }
        let h = OptionHeader::read_from_bytes(&h).expect("sized");
        if h.magic.get() != IHAVEOPT {
            return Err(NbdError::OptionMagic(h.magic.get()));
        }
        let (option, len) = (h.option.get(), h.len.get());
        if len > MAX_OPTION_LEN {
            return Err(NbdError::OptionTooLong { option, len });
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).map_err(io("option data"))?;
        match option {
            OPT_EXPORT_NAME => {
                if !export.matches(&data) {
                    return Err(NbdError::UnknownExport(
                        String::from_utf8_lossy(&data).into_owned(),
                    ));
                }
                let reply = ExportNameReply {
                    size: export.device.size().into(),
                    flags: export.transmission_flags().into(),
                };
                w.write_all(reply.as_bytes()).map_err(io("export"))?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).map_err(io("export"))?;
                }
                w.flush().map_err(io("export"))?;
                return Ok(Negotiated::Transmission);
            }
            OPT_ABORT => {
                option_reply(w, option, REP_ACK, &[])?;
                return Ok(Negotiated::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_error(w, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let name = export.name.as_bytes();
                let mut server = Vec::with_capacity(4 + name.len());
                server.extend_from_slice(&(name.len() as u32).to_be_bytes());
                server.extend_from_slice(name);
                option_reply(w, option, REP_SERVER, &server)?;
                option_reply(w, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, infos)) = parse_info_request(&data) else {
                    option_error(w, option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO")?;
                    continue;
                };
                if !export.matches(name) {
                    option_error(w, option, REP_ERR_UNKNOWN, "no such export")?;
                    continue;
                }
                let info = InfoExport {
                    info: INFO_EXPORT.into(),
                    size: export.device.size().into(),
                    flags: export.transmission_flags().into(),
                };
                option_reply(w, option, REP_INFO, info.as_bytes())?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let bs = InfoBlockSize {
                        info: INFO_BLOCK_SIZE.into(),
                        minimum: 1.into(),
                        preferred: 4096.into(),
                        maximum: MAX_PAYLOAD.into(),
                    };
                    option_reply(w, option, REP_INFO, bs.as_bytes())?;
                }
                option_reply(w, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(Negotiated::Transmission);
                }
            }
            // Structured replies, meta contexts, TLS, extended headers...:
            // the client goes on without them.
            _ => option_error(w, option, REP_ERR_UNSUP, "option not supported")?,
        }
    }
}

/// `NBD_OPT_INFO`/`GO` data: name length, name, count of info requests,
/// the requests.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let n = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
    if n > MAX_EXPORT_NAME {
        return None;
    }
    let name = data.get(4..4 + n as usize)?;
    let rest = &data[4 + n as usize..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    Some((
        name,
        list.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

fn option_reply(w: &mut impl Write, option: u32, reply: u32, data: &[u8]) -> Result<(), NbdError> {
    let h = OptionReply::new(option, reply, data.len() as u32);
    w.write_all(h.as_bytes()).map_err(io("option reply"))?;
    w.write_all(data).map_err(io("option reply"))?;
    w.flush().map_err(io("option reply"))
}

fn option_error(
    w: &mut impl Write,
    option: u32,
    reply: u32,
    message: &str,
) -> Result<(), NbdError> {
    option_reply(w, option, reply, message.as_bytes())
}

/// Requests executed at once per connection (a read waiting for post-copy
/// data must not hold up the others).
pub const WORKERS: usize = 4;

/// Request buffers handed back by the workers for the reader to reuse (a
/// fresh large allocation is a fresh mapping, faulted in page by page).
#[derive(Default)]
struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// A buffer of `len` bytes (contents unspecified).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self.0.lock().expect("pool lock").pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn give(&self, b: Vec<u8>) {
        let mut pool = self.0.lock().expect("pool lock");
        if pool.len() < 2 * WORKERS {
            pool.push(b);
        }
    }
}

/// A request passed to a worker.
struct Job {
    cookie: u64,
    command: Command,
    flags: u16,
    offset: u64,
    len: u32,
    /// A write's payload.
    payload: Vec<u8>,
}

/// Reads requests and hands them to [`WORKERS`] threads, which reply as
/// they finish (in any order: the cookie says which request a reply is
/// for). A malformed request is answered by the reader itself. On
/// `NBD_CMD_DISC` the requests already read are finished and answered
/// before the connection ends.
fn transmit<S>(r: &mut impl Read, w: BufWriter<&S>, export: &Export) -> Result<ServeEnd, NbdError>
where
    for<'a> &'a S: Read + Write,
    S: Sync,
{
    let w = Mutex::new(w);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(WORKERS);
    let rx = Mutex::new(rx);
    let failed: Mutex<Option<NbdError>> = Mutex::new(None);
    let pool = BufferPool::default();
    let end = std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                loop {
                    let job = rx.lock().expect("job queue lock").recv();
                    let Ok(job) = job else { return };
                    if let Err(e) = execute(job, export, &w, &pool) {
                        failed.lock().expect("failure lock").get_or_insert(e);
                        return;
                    }
                }
            });
        }
        let end = read_requests(r, export, &w, &tx, &pool);
        drop(tx);
        end
    });
    // A reply that could not be sent is the story, if the reader saw none.
    match (end, failed.into_inner().expect("failure lock")) {
        (Ok(_), Some(e)) => Err(e),
        (end, _) => end,
    }
}

fn read_requests<S>(
    r: &mut impl Read,
    export: &Export,
    w: &Mutex<BufWriter<&S>>,
    jobs: &std::sync::mpsc::SyncSender<Job>,
    pool: &BufferPool,
) -> Result<ServeEnd, NbdError>
where
    for<'a> &'a S: Write,
{
    let dev = export.device.as_ref();
    let size = dev.size();
    loop {
        let mut raw = [0u8; size_of::<Request>()];
        if read_or_eof(r, &mut raw, "request")?.is_none() {
            return Ok(ServeEnd::Closed);
        }
        let req = Request::read_from_bytes(&raw).expect("sized");
        if req.magic.get() != REQUEST_MAGIC {
            return Err(NbdError::RequestMagic(req.magic.get()));
        }
        let (cookie, offset, len) = (req.cookie.get(), req.offset.get(), req.length.get());
        let flags = req.flags.get();
        let command = Command::from_wire(req.command.get());
        // Only a write carries a payload; read it whatever the verdict.
        let mut payload = Vec::new();
        if command == Command::Write {
            if len > MAX_PAYLOAD {
                return Err(NbdError::WriteTooLarge(len));
            }
            payload = pool.take(len as usize);
            r.read_exact(&mut payload).map_err(io("write payload"))?;
        }
        let in_range = len > 0
            && offset
                .checked_add(u64::from(len))
                .is_some_and(|e| e <= size);
        let refusal = if flags & !command.allowed_flags() != 0 {
            Some(Errno::Inval)
        } else {
            match command {
                Command::Disconnect => return Ok(ServeEnd::Disconnected),
                Command::Unknown(_) => Some(Errno::Inval),
                Command::Read if len > MAX_PAYLOAD => Some(Errno::Overflow),
                Command::Read | Command::Trim if !in_range => Some(Errno::Inval),
                Command::Write | Command::WriteZeroes | Command::Trim if dev.read_only() => {
                    Some(Errno::Perm)
                }
                Command::Write | Command::WriteZeroes if !in_range => {
                    Some(if len == 0 { Errno::Inval } else { Errno::NoSpc })
                }
                _ => None,
            }
        };
        if let Some(errno) = refusal {
            reply(w, cookie, Some(errno), &[])?;
            continue;
        }
        let job = Job {
            cookie,
            command,
            flags,
            offset,
            len,
            payload,
        };
        if jobs.send(job).is_err() {
            // Every worker is gone: a reply failed; the caller reports it.
            return Ok(ServeEnd::Closed);
        }
    }
}

fn execute<S>(
    job: Job,
    export: &Export,
    w: &Mutex<BufWriter<&S>>,
    pool: &BufferPool,
) -> Result<(), NbdError>
where
    for<'a> &'a S: Write,
{
    let dev = export.device.as_ref();
    let Job {
        cookie,
        command,
        flags,
        offset,
        len,
        mut payload,
    } = job;
    let fua = flags & CMD_FLAG_FUA != 0;
    let verdict = match command {
        Command::Read => {
            payload = pool.take(len as usize);
            device(dev.read_at(offset, &mut payload)).map(|()| Some(Access::Read))
        }
        Command::Write => device(dev.write_at(offset, &payload, fua)).map(|()| Some(Access::Write)),
        Command::Flush => device(dev.flush()).map(|()| None),
        Command::Trim => device(dev.trim(offset, len.into(), fua)).map(|()| Some(Access::Trim)),
        Command::WriteZeroes => {
            let may_punch = flags & CMD_FLAG_NO_HOLE == 0;
            device(dev.write_zeroes(offset, len.into(), may_punch, fua))
                .map(|()| Some(Access::WriteZeroes))
        }
        Command::Disconnect | Command::Unknown(_) => unreachable!("answered by the reader"),
    };
    // Logged before the reply: whoever hears the reply finds it logged.
    if let (Ok(Some(access)), Some(log)) = (verdict, &export.log) {
        log.record(access, offset, len.into());
    }
    let data = if command == Command::Read && verdict.is_ok() {
        &payload[..]
    } else {
        &[]
    };
    let sent = reply(w, cookie, verdict.err(), data);
    pool.give(payload);
    sent
}

fn reply<S>(
    w: &Mutex<BufWriter<&S>>,
    cookie: u64,
    error: Option<Errno>,
    data: &[u8],
) -> Result<(), NbdError>
where
    for<'a> &'a S: Write,
{
    let mut w = w.lock().expect("reply lock");
    w.write_all(SimpleReply::new(cookie, error).as_bytes())
        .map_err(io("reply"))?;
    w.write_all(data).map_err(io("read data"))?;
    w.flush().map_err(io("reply"))
}

/// A device failure becomes the request's error; the connection goes on.
fn device(r: Result<(), DeviceError>) -> Result<(), Errno> {
    r.map_err(|e| {
        if e.is_no_space() {
            Errno::NoSpc
        } else {
            Errno::Io
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_are_parsed_and_malformed_ones_refused() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        let (name, infos) = parse_info_request(&d).unwrap();
        assert_eq!(name, b"abc");
        assert_eq!(infos, vec![0, 3]);
        assert!(
            parse_info_request(&d[..d.len() - 1]).is_none(),
            "short list"
        );
        assert!(parse_info_request(&d[..5]).is_none(), "short name");
        let mut huge = d.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            parse_info_request(&huge).is_none(),
            "name length past the data"
        );
        assert!(parse_info_request(&[]).is_none());
    }
}
