//! The NBD protocol's numbers and fixed layouts (server side, fixed newstyle).
//!
//! Everything on an NBD connection is big-endian. The structs here are the
//! fixed-size parts of the messages; variable parts (option data, export
//! names, read and write payloads) follow them on the wire. Numbers are from
//! the NBD protocol specification (`doc/proto.md` of the NBD project).

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The first eight bytes a server sends: `NBDMAGIC`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle negotiation marker, also the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag (server): fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag (server): no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the flags field is valid.
pub const TX_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TX_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TX_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TX_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TX_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Command flag: force unit access (the write is durable when acknowledged).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`WRITE_ZEROES`): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Largest option payload a client may send before it is disconnected.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest export name.
pub const MAX_EXPORT_NAME: u32 = 4096;
/// Largest read or write payload (the spec's recommended 32 MiB cap).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Option: `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// Option: `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// Option: `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// Option: `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;

/// Option reply: acknowledged.
pub const REP_ACK: u32 = 1;
/// Option reply: one export (to `NBD_OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// Option reply: information about the export (to `INFO`/`GO`).
pub const REP_INFO: u32 = 3;
/// Option reply error bit.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option reply: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option reply: the option is malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option reply: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ServerGreeting {
    /// [`NBD_MAGIC`].
    pub magic: U64,
    /// [`IHAVEOPT`].
    pub ihaveopt: U64,
    /// [`FLAG_FIXED_NEWSTYLE`] | [`FLAG_NO_ZEROES`].
    pub flags: U16,
}

/// An option request's fixed part; `len` bytes of data follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct OptionHeader {
    /// [`IHAVEOPT`].
    pub magic: U64,
    /// The option.
    pub option: U32,
    /// Bytes of data after this header.
    pub len: U32,
}

/// An option reply's fixed part; `len` bytes of data follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct OptionReply {
    /// [`OPTION_REPLY_MAGIC`].
    pub magic: U64,
    /// The option answered.
    pub option: U32,
    /// The reply type ([`REP_ACK`], ...).
    pub reply: U32,
    /// Bytes of data after this header.
    pub len: U32,
}

impl OptionReply {
    /// A reply to `option` of type `reply` with `len` bytes of data.
    pub fn new(option: u32, reply: u32, len: u32) -> Self {
        OptionReply {
            magic: OPTION_REPLY_MAGIC.into(),
            option: option.into(),
            reply: reply.into(),
            len: len.into(),
        }
    }
}

/// `NBD_INFO_EXPORT`, the data of an `NBD_REP_INFO` reply.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct InfoExport {
    /// [`INFO_EXPORT`].
    pub info: U16,
    /// Export size in bytes.
    pub size: U64,
    /// Transmission flags.
    pub flags: U16,
}

/// `NBD_INFO_BLOCK_SIZE`, the data of an `NBD_REP_INFO` reply.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct InfoBlockSize {
    /// [`INFO_BLOCK_SIZE`].
    pub info: U16,
    /// Minimum block size.
    pub minimum: U32,
    /// Preferred block size.
    pub preferred: U32,
    /// Maximum payload.
    pub maximum: U32,
}

/// The answer to `NBD_OPT_EXPORT_NAME` (followed by 124 zero bytes unless
/// the client asked for none).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: U64,
    /// Transmission flags.
    pub flags: U16,
}

/// A transmission request; a write's payload follows it.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct Request {
    /// [`REQUEST_MAGIC`].
    pub magic: U32,
    /// Command flags.
    pub flags: U16,
    /// The command.
    pub command: U16,
    /// Echoed in the reply.
    pub cookie: U64,
    /// Byte offset.
    pub offset: U64,
    /// Byte length.
    pub length: U32,
}

/// A simple reply; a successful read's data follows it.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct SimpleReply {
    /// [`SIMPLE_REPLY_MAGIC`].
    pub magic: U32,
    /// 0 or an [`Errno`].
    pub error: U32,
    /// The request's cookie.
    pub cookie: U64,
}

impl SimpleReply {
    /// The reply to the request with `cookie`.
    pub fn new(cookie: u64, error: Option<Errno>) -> Self {
        SimpleReply {
            magic: SIMPLE_REPLY_MAGIC.into(),
            error: error.map_or(0, |e| e as u32).into(),
            cookie: cookie.into(),
        }
    }
}

const _: () = {
    assert!(size_of::<ServerGreeting>() == 18);
    assert!(size_of::<OptionHeader>() == 16);
    assert!(size_of::<OptionReply>() == 20);
    assert!(size_of::<InfoExport>() == 12);
    assert!(size_of::<InfoBlockSize>() == 14);
    assert!(size_of::<ExportNameReply>() == 10);
    assert!(size_of::<Request>() == 28);
    assert!(size_of::<SimpleReply>() == 16);
};

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE` (a payload follows the request).
    Write,
    /// `NBD_CMD_DISC`: the client is done.
    Disconnect,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else (answered with `EINVAL`).
    Unknown(u16),
}

impl Command {
    /// Decodes the request's command field.
    pub fn from_wire(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            other => Command::Unknown(other),
        }
    }

    /// Command flags this server accepts with the command.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Command::Write | Command::Trim => CMD_FLAG_FUA,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => 0,
        }
    }
}

/// The error numbers of NBD replies (not the host's errno values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// `NBD_EPERM`: a write to a read-only export.
    Perm = 1,
    /// `NBD_EIO`: the image could not be read or written.
    Io = 5,
    /// `NBD_ENOMEM`.
    NoMem = 12,
    /// `NBD_EINVAL`: a malformed request (unknown command or flag, range past
    /// the end for reads and trims).
    Inval = 22,
    /// `NBD_ENOSPC`: a write past the end.
    NoSpc = 28,
    /// `NBD_EOVERFLOW`: a request larger than the server takes.
    Overflow = 75,
    /// `NBD_ENOTSUP`.
    NotSup = 95,
    /// `NBD_ESHUTDOWN`: the server is going away.
    Shutdown = 108,
}
