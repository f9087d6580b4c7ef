//! virtio-blk requests (virtio 1.2 §5.2.6): parsing a descriptor chain into a [`Request`],
//! and executing a request against a [`Disk`].
//!
//! Parsing is pure (it only reads guest memory) and trusts nothing: the guest chooses every
//! address, length, flag and header field. The framing follows virtio 1.2 §2.7.4 (any
//! layout): the device-readable bytes are the 16-byte header followed by the OUT data, the
//! device-writable bytes are the IN data followed by the 1-byte status, wherever the
//! descriptor boundaries fall. A chain whose last descriptor is not device-writable has no
//! place for a status and cannot be answered; it is dropped.

use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::disk::Disk;
use super::{MAX_REQUEST_BYTES, SECTOR_SIZE, SEG_MAX};
use crate::virtio::queue_handler::Chain;

/// VIRTIO_BLK_T_IN: read sectors.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// VIRTIO_BLK_T_OUT: write sectors.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// VIRTIO_BLK_T_FLUSH: commit completed writes.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// VIRTIO_BLK_T_GET_ID: read the device serial.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the GET_ID answer (virtio 1.2 §5.2.6: VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
/// Size of the request header: type, reserved, sector.
pub const HEADER_LEN: usize = 16;
/// Descriptors one request may have: SEG_MAX data segments, a header and a status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Descriptors walked looking for the status before a chain is dropped unanswered. An
/// indirect table can hold 65535 descriptors; walking them all for every chain would let
/// a guest stall the event loop.
pub const MAX_CHAIN_WALK: usize = 1024;

/// Why a request failed. [`RequestError::status`] maps each to the guest-visible status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain has no descriptor.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain ends on a descriptor that still has NEXT set: a loop, an index out of the
    /// table, an unreadable descriptor or a length overflow cut it short.
    #[error("descriptor chain is broken")]
    BrokenChain,
    /// The last descriptor is not a device-writable buffer inside guest memory.
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    /// More descriptors than SEG_MAX allows.
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// So many descriptors that the status was not looked for.
    #[error("more than {MAX_CHAIN_WALK} descriptors in the chain")]
    ChainTooLong,
    /// A device-readable descriptor follows a device-writable one (virtio 1.2 §2.7.4.2).
    #[error("device-readable descriptor after a device-writable one")]
    BadOrder,
    /// Fewer than 16 device-readable bytes.
    #[error("request header is truncated")]
    ShortHeader,
    /// A type this device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Data in the wrong direction for the type (e.g. IN with device-readable data).
    #[error("data buffers have the wrong direction for the request type")]
    WrongDirection,
    /// IN/OUT without data, or a length not a multiple of 512 (virtio 1.2 §5.2.6.2).
    #[error("data length {0} is not a positive multiple of 512")]
    BadLength(u64),
    /// More data than [`MAX_REQUEST_BYTES`].
    #[error("data length {0} exceeds the per-request limit")]
    TooLong(u64),
    /// Sector range beyond the end of the disk (or overflowing).
    #[error("sector {sector} + {len} bytes is beyond the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length in bytes.
        len: u64,
    },
    /// A buffer is not inside guest memory.
    #[error("buffer outside guest memory")]
    Memory,
    /// A write to a read-only disk (virtio 1.2 §5.2.6.2).
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The backend failed.
    #[error("disk I/O failed")]
    Io(#[source] io::Error),
}

impl RequestError {
    /// The status byte the guest gets, or `None` when the chain cannot be answered.
    pub fn status(&self) -> Option<u8> {
        match self {
            RequestError::EmptyChain
            | RequestError::BrokenChain
            | RequestError::NoStatus
            | RequestError::ChainTooLong => None,
            RequestError::Unsupported(_) => Some(VIRTIO_BLK_S_UNSUPP),
            _ => Some(VIRTIO_BLK_S_IOERR),
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read `data_len` bytes from `sector` into the data buffers.
    In,
    /// Write the data buffers at `sector`.
    Out,
    /// Flush completed writes.
    Flush,
    /// Write the serial into the data buffers.
    GetId,
}

/// A guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A parsed, validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub request_type: RequestType,
    /// First sector (512 bytes each, whatever BLK_SIZE says: virtio 1.2 §5.2.6).
    pub sector: u64,
    /// Data buffers: device-readable for OUT, device-writable for IN and GET_ID.
    pub data: Vec<Segment>,
    /// Sum of the data buffer lengths.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A chain that parsed to an error. `status` is where to report it, if anywhere.
#[derive(Debug)]
pub struct Rejected {
    /// Address of the status byte; `None` when the chain cannot be answered.
    pub status: Option<GuestAddress>,
    /// The reason.
    pub error: RequestError,
}

/// Removes the first `n` bytes from a list of segments (all of them if there are fewer).
fn skip_bytes(segs: &mut Vec<Segment>, mut n: u64) {
    let mut drop = 0;
    for s in segs.iter_mut() {
        if n == 0 {
            break;
        }
        let len = u64::from(s.len);
        if len <= n {
            n -= len;
            drop += 1;
        } else {
            // n < len <= u32::MAX, so both conversions hold.
            let k = u32::try_from(n).unwrap_or(s.len);
            s.len -= k;
            s.addr = GuestAddress(s.addr.0.wrapping_add(u64::from(k)));
            n = 0;
        }
    }
    segs.drain(..drop);
}

/// Reads the 16-byte header from the front of the device-readable segments.
fn read_header(mem: &GuestMemoryMmap, segs: &[Segment]) -> Result<[u8; HEADER_LEN], RequestError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut filled = 0;
    for s in segs {
        if filled == HEADER_LEN {
            break;
        }
        let take = (HEADER_LEN - filled).min(usize::try_from(s.len).unwrap_or(usize::MAX));
        let dst = hdr
            .get_mut(filled..filled + take)
            .ok_or(RequestError::ShortHeader)?;
        mem.read_slice(dst, s.addr)
            .map_err(|_| RequestError::Memory)?;
        filled += take;
    }
    if filled < HEADER_LEN {
        return Err(RequestError::ShortHeader);
    }
    Ok(hdr)
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Parses one chain. `capacity` is the disk size in bytes, rounded down to whole sectors.
pub fn parse(mem: &GuestMemoryMmap, chain: Chain<'_>, capacity: u64) -> Result<Request, Rejected> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut count = 0usize;
    let mut bad_order = false;
    let mut last = None;
    // virtio-queue stops a chain after queue-size (or indirect-table-size) descriptors and
    // on any bad index or unreadable descriptor; we stop at MAX_CHAIN_WALK. Past
    // MAX_DESCRIPTORS we only walk on to find the status descriptor.
    for d in chain {
        count += 1;
        if count > MAX_CHAIN_WALK {
            return Err(Rejected {
                status: None,
                error: RequestError::ChainTooLong,
            });
        }
        last = Some(d);
        if count > MAX_DESCRIPTORS || d.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(seg);
        } else {
            bad_order |= !writable.is_empty();
            readable.push(seg);
        }
    }
    let drop = |error| Rejected {
        status: None,
        error,
    };
    let last = last.ok_or_else(|| drop(RequestError::EmptyChain))?;
    if last.has_next() {
        return Err(drop(RequestError::BrokenChain));
    }
    let status = last
        .len()
        .checked_sub(1)
        .and_then(|end| last.addr().0.checked_add(u64::from(end)))
        .map(GuestAddress)
        .filter(|&a| last.is_write_only() && GuestMemoryBackend::check_range(mem, a, 1))
        .ok_or_else(|| drop(RequestError::NoStatus))?;
    let reject = |error| Rejected {
        status: Some(status),
        error,
    };
    if count > MAX_DESCRIPTORS {
        return Err(reject(RequestError::TooManyDescriptors));
    }
    if bad_order {
        return Err(reject(RequestError::BadOrder));
    }
    // The status byte is the last writable byte; what comes before it is IN data.
    if let Some(s) = writable.last_mut() {
        s.len -= 1;
        if s.len == 0 {
            writable.pop();
        }
    }
    let hdr = read_header(mem, &readable).map_err(reject)?;
    skip_bytes(&mut readable, HEADER_LEN as u64);
    let mut type_bytes = [0u8; 4];
    let mut sector_bytes = [0u8; 8];
    type_bytes.copy_from_slice(hdr.get(0..4).unwrap_or(&[0; 4]));
    sector_bytes.copy_from_slice(hdr.get(8..16).unwrap_or(&[0; 8]));
    let sector = u64::from_le_bytes(sector_bytes);

    let request_type = match u32::from_le_bytes(type_bytes) {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        t => return Err(reject(RequestError::Unsupported(t))),
    };
    // Whatever is not the data must be empty: the header alone is readable for IN/GET_ID,
    // the status alone is writable for OUT, and FLUSH has no data at all.
    let (data, other) = match request_type {
        RequestType::In | RequestType::GetId => (writable, total(&readable)),
        RequestType::Out => (readable, total(&writable)),
        RequestType::Flush => (Vec::new(), total(&readable) + total(&writable)),
    };
    if other != 0 {
        return Err(reject(RequestError::WrongDirection));
    }
    let data_len = total(&data);
    if data_len > MAX_REQUEST_BYTES {
        return Err(reject(RequestError::TooLong(data_len)));
    }
    match request_type {
        RequestType::In | RequestType::Out => {
            if data_len == 0 || data_len & (SECTOR_SIZE - 1) != 0 {
                return Err(reject(RequestError::BadLength(data_len)));
            }
            let end = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(data_len));
            if end.is_none_or(|end| end > capacity) {
                return Err(reject(RequestError::OutOfRange {
                    sector,
                    len: data_len,
                }));
            }
        }
        RequestType::GetId if data_len == 0 => {
            return Err(reject(RequestError::BadLength(0)));
        }
        RequestType::GetId | RequestType::Flush => {}
    }
    // Check every buffer up front so a request never half-executes into a bad address.
    for s in &data {
        let len = usize::try_from(s.len).map_err(|_| reject(RequestError::Memory))?;
        if !GuestMemoryBackend::check_range(mem, s.addr, len) {
            return Err(reject(RequestError::Memory));
        }
    }
    Ok(Request {
        request_type,
        sector,
        data,
        data_len,
        status,
    })
}

impl Request {
    /// Runs the request. Returns how many data bytes were written into guest memory
    /// (the used length, not counting the status byte).
    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        disk: &mut dyn Disk,
        read_only: bool,
        serial: &[u8; ID_BYTES],
    ) -> Result<u32, RequestError> {
        match self.request_type {
            RequestType::In => {
                disk.read_vectored_at(self.offset(), &self.slices(mem)?)
                    .map_err(RequestError::Io)?;
                u32::try_from(self.data_len).map_err(|_| RequestError::TooLong(self.data_len))
            }
            RequestType::Out => {
                if read_only {
                    return Err(RequestError::ReadOnly);
                }
                disk.write_vectored_at(self.offset(), &self.slices(mem)?)
                    .map_err(RequestError::Io)?;
                Ok(0)
            }
            RequestType::Flush => {
                // Nothing can be dirty on a read-only disk.
                if !read_only {
                    disk.flush().map_err(RequestError::Io)?;
                }
                Ok(0)
            }
            RequestType::GetId => {
                // virtio 1.2 §5.2.6: up to 20 bytes, NUL-padded, not NUL-terminated if 20.
                let mut left = serial
                    .get(
                        ..usize::try_from(self.data_len)
                            .unwrap_or(ID_BYTES)
                            .min(ID_BYTES),
                    )
                    .unwrap_or(serial);
                let n = left.len();
                for s in &self.data {
                    if left.is_empty() {
                        break;
                    }
                    let k = left.len().min(usize::try_from(s.len).unwrap_or(usize::MAX));
                    let (now, rest) = left.split_at(k);
                    mem.write_slice(now, s.addr)
                        .map_err(|_| RequestError::Memory)?;
                    left = rest;
                }
                u32::try_from(n).map_err(|_| RequestError::Memory)
            }
        }
    }

    /// Where the data starts on the disk. parse() checked `sector * 512 + data_len`
    /// against the capacity.
    fn offset(&self) -> u64 {
        self.sector.saturating_mul(SECTOR_SIZE)
    }

    /// The data buffers as host slices, in order (a buffer that spans guest memory regions
    /// gives one slice per region).
    fn slices<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Vec<vm_memory::VolatileSlice<'m>>, RequestError> {
        let mut out = Vec::with_capacity(self.data.len());
        for s in &self.data {
            let len = usize::try_from(s.len).map_err(|_| RequestError::Memory)?;
            for slice in GuestMemoryBackend::get_slices(mem, s.addr, len) {
                out.push(slice.map_err(|_| RequestError::Memory)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
