//! The vmstate file: a fixed header, the serialised [`VmState`], and a checksum.
//!
//! ```text
//! offset  size  field
//! 0       8     magic b"VMMSNAP\0"
//! 8       4     format version, u32 little endian (FORMAT_VERSION)
//! 12      8     payload length N, u64 little endian (at most MAX_PAYLOAD)
//! 20      N     payload: VmState in postcard (serde) encoding
//! 20+N    8     CRC-64/XZ of bytes 0..20+N, u64 little endian
//! ```
//!
//! Any change to `VmState`'s shape changes the encoding, so it bumps FORMAT_VERSION; a
//! file of another version is refused (no migration across versions yet).
//!
//! Loading never trusts the file: sizes are checked against the actual length before
//! anything is read, the payload is capped at [`MAX_PAYLOAD`], the checksum is verified
//! before decoding, decoding cannot allocate more than the input can describe (postcard
//! reads lengths from the input and serde caps pre-allocation), and the decoded state is
//! validated. Every refusal names the file and the problem.
//!
//! Writing is crash-safe: the file is written to `PATH.tmp`, fsynced, renamed over `PATH`,
//! and the directory fsynced, so `PATH` is either the old file or the whole new one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crc::{Crc, CRC_64_XZ};

use super::state::VmState;

/// First 8 bytes of a vmstate file.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Header length: magic, version, payload length.
pub const HEADER_LEN: usize = 20;
/// Trailer length: the CRC-64.
pub const TRAILER_LEN: usize = 8;
/// Largest payload accepted (a real state is tens of KiB per vCPU).
pub const MAX_PAYLOAD: u64 = 64 << 20;

const CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_XZ);

/// What is wrong with a vmstate file's contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Shorter than the header.
    #[error("truncated: {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    TruncatedHeader {
        /// The length found.
        len: u64,
    },
    /// Not a vmstate file.
    #[error("bad magic {found:02x?}, not a vmstate file")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// Written by another format version.
    #[error("format version {found}, this build supports version {FORMAT_VERSION}")]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// The header states a payload larger than allowed.
    #[error("payload length {stated} exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge {
        /// The stated length.
        stated: u64,
    },
    /// The file ends before the payload and checksum the header announces.
    #[error("truncated: header states a {stated}-byte payload, {available} bytes follow the header (payload plus {TRAILER_LEN}-byte checksum needed)")]
    TruncatedPayload {
        /// The stated payload length.
        stated: u64,
        /// Bytes after the header.
        available: u64,
    },
    /// Bytes after the checksum.
    #[error("{extra} unexpected bytes after the checksum")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// The checksum does not match.
    #[error("checksum mismatch: file says {stored:#018x}, contents give {computed:#018x}")]
    Checksum {
        /// The CRC in the file.
        stored: u64,
        /// The CRC computed.
        computed: u64,
    },
    /// The payload is not a valid encoding of the state.
    #[error("payload does not decode: {0}")]
    Decode(String),
    /// The decoded state is inconsistent.
    #[error("invalid state: {0}")]
    Invalid(String),
    /// The state is for another memory size.
    #[error("memory size mismatch: snapshot has {found} MiB, expected {expected} MiB")]
    MemorySize {
        /// The size in the state.
        found: u64,
        /// The size the caller expects.
        expected: u64,
    },
}

/// Errors reading or writing a vmstate file.
#[derive(Debug, thiserror::Error)]
pub enum VmStateFileError {
    /// The file's contents are refused.
    #[error("vmstate file {}: {problem}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: FormatError,
    },
    /// An I/O operation on the file failed.
    #[error("vmstate file {}: {what}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The state could not be encoded.
    #[error("vmstate file {}: cannot encode the state", path.display())]
    Encode {
        /// The file.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: postcard::Error,
    },
}

impl VmStateFileError {
    /// The format problem, if that is what it is.
    pub fn problem(&self) -> Option<&FormatError> {
        match self {
            VmStateFileError::Format { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// Encodes `state` as a whole vmstate file image.
pub fn encode(state: &VmState) -> Result<Vec<u8>, postcard::Error> {
    Ok(frame_payload(&postcard::to_allocvec(state)?))
}

/// Wraps an encoded payload in the header and checksum (for [`encode`], and for fuzzing
/// the decoder past the checksum).
pub fn frame_payload(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks the header of a file of `total` bytes whose first bytes are `head` (at least
/// [`HEADER_LEN`] of them). Returns the payload length.
fn check_header(head: &[u8], total: u64) -> Result<u64, FormatError> {
    let (Some(magic), Some(version), Some(len)) = (
        head.get(..8),
        head.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok()),
        head.get(12..20).and_then(|b| <[u8; 8]>::try_from(b).ok()),
    ) else {
        return Err(FormatError::TruncatedHeader { len: total });
    };
    if magic != MAGIC {
        let mut found = [0u8; 8];
        found.copy_from_slice(magic);
        return Err(FormatError::BadMagic { found });
    }
    let version = u32::from_le_bytes(version);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let stated = u64::from_le_bytes(len);
    if stated > MAX_PAYLOAD {
        return Err(FormatError::TooLarge { stated });
    }
    let available = total - HEADER_LEN as u64;
    let needed = stated + TRAILER_LEN as u64;
    if available < needed {
        return Err(FormatError::TruncatedPayload { stated, available });
    }
    if available > needed {
        return Err(FormatError::TrailingBytes {
            extra: available - needed,
        });
    }
    Ok(stated)
}

/// Decodes a whole vmstate file image. With `expected_mem_mib`, a state for another memory
/// size is refused.
pub fn decode(bytes: &[u8], expected_mem_mib: Option<u64>) -> Result<VmState, FormatError> {
    let total = bytes.len() as u64;
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::TruncatedHeader { len: total });
    }
    let len = check_header(bytes, total)?;
    // check_header proved HEADER_LEN + len + TRAILER_LEN == bytes.len().
    let body_end = bytes.len() - TRAILER_LEN;
    let (body, trailer) = bytes.split_at(body_end);
    let stored = u64::from_le_bytes(<[u8; 8]>::try_from(trailer).map_err(|_| {
        FormatError::TruncatedPayload {
            stated: len,
            available: total - HEADER_LEN as u64,
        }
    })?);
    let computed = CRC64.checksum(body);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    let payload = body.get(HEADER_LEN..).unwrap_or_default();
    let (state, rest): (VmState, &[u8]) =
        postcard::take_from_bytes(payload).map_err(|e| FormatError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FormatError::Decode(format!(
            "{} bytes left after the state",
            rest.len()
        )));
    }
    state.validate().map_err(FormatError::Invalid)?;
    if let Some(expected) = expected_mem_mib {
        if state.machine.mem_size_mib != expected {
            return Err(FormatError::MemorySize {
                found: state.machine.mem_size_mib,
                expected,
            });
        }
    }
    Ok(state)
}

/// Reads and checks the vmstate file at `path` (see the module doc). With
/// `expected_mem_mib`, a state for another memory size is refused.
pub fn load(path: &Path, expected_mem_mib: Option<u64>) -> Result<VmState, VmStateFileError> {
    let io = |what| {
        let path = path.to_path_buf();
        move |source| VmStateFileError::Io { path, what, source }
    };
    let format = |problem| VmStateFileError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let mut file = File::open(path).map_err(io("cannot open"))?;
    let total = file.metadata().map_err(io("cannot stat"))?.len();
    let mut head = [0u8; HEADER_LEN];
    if total < HEADER_LEN as u64 {
        return Err(format(FormatError::TruncatedHeader { len: total }));
    }
    file.read_exact(&mut head).map_err(io("cannot read"))?;
    // Refuse on the header alone, before allocating for the payload.
    check_header(&head, total).map_err(format)?;
    // Bounded: check_header capped the total at HEADER_LEN + MAX_PAYLOAD + TRAILER_LEN.
    let mut bytes = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    bytes.extend_from_slice(&head);
    file.take(total - HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map_err(io("cannot read"))?;
    decode(&bytes, expected_mem_mib).map_err(format)
}

/// `PATH.tmp` for `PATH`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes `bytes` to `path` crash-safely: `PATH.tmp`, fsync, rename, fsync the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    if result.is_err() {
        // Best effort: do not leave a partial file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fsyncs the directory holding `path`, making a rename into it durable.
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Writes `state` to the vmstate file `path`, crash-safely. Returns the file's size.
pub fn save(path: &Path, state: &VmState) -> Result<u64, VmStateFileError> {
    let bytes = encode(state).map_err(|source| VmStateFileError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    let payload = (bytes.len() - HEADER_LEN - TRAILER_LEN) as u64;
    if payload > MAX_PAYLOAD {
        return Err(VmStateFileError::Format {
            path: path.to_path_buf(),
            problem: FormatError::TooLarge { stated: payload },
        });
    }
    write_atomically(path, &bytes).map_err(|source| VmStateFileError::Io {
        path: path.to_path_buf(),
        what: "cannot write",
        source,
    })?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
