//! virtio-vsock packets (virtio 1.2 §5.10.6): the 44-byte header, parsing a TX chain into a
//! header plus payload, and writing a packet into an RX chain.
//!
//! Pure: these functions only read and write guest memory. The guest chooses every address,
//! length, flag and header field, so nothing here trusts them: chains are walked at most
//! [`MAX_CHAIN_DESCRIPTORS`] deep, the payload is bounded by [`MAX_PKT_DATA`], and a
//! rejected packet says whether its header is trustworthy enough to answer with a RST.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::HOST_CID;
use crate::virtio::queue_handler::Chain;

/// Size of `struct virtio_vsock_hdr` (virtio 1.2 §5.10.6).
pub const HDR_LEN: usize = 44;
/// Largest payload accepted from or sent to the guest in one packet. Linux never sends
/// more (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); it bounds the copy one chain can cause.
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// Descriptors walked per chain before the chain is dropped.
pub const MAX_CHAIN_DESCRIPTORS: usize = 256;
/// VIRTIO_VSOCK_TYPE_STREAM (virtio 1.2 §5.10.6.2). The only type this device supports.
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will not receive any more data (virtio 1.2 §5.10.6.5).
pub const SHUTDOWN_F_RECEIVE: u32 = 1;
/// SHUTDOWN flag: the sender will not send any more data (virtio 1.2 §5.10.6.5).
pub const SHUTDOWN_F_SEND: u32 = 2;

/// Packet operations (virtio 1.2 §5.10.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection refused or aborted.
    Rst = 3,
    /// One or both directions are closed; see the SHUTDOWN_F_* flags.
    Shutdown = 4,
    /// Payload.
    Rw = 5,
    /// Unsolicited or requested credit information.
    CreditUpdate = 6,
    /// Asks the peer for a CREDIT_UPDATE.
    CreditRequest = 7,
}

impl Op {
    /// The op for a header value, if known.
    pub fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, all fields little endian on the wire.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`Op`]).
    pub op: u16,
    /// Op-specific flags (SHUTDOWN_F_*).
    pub flags: u32,
    /// Sender's receive buffer size for this flow.
    pub buf_alloc: u32,
    /// Sender's free-running count of bytes it consumed.
    pub fwd_cnt: u32,
}

/// Splits a fixed-size array off the front of `b`.
fn take<const N: usize>(b: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some((head, rest)) = b.split_first_chunk::<N>() {
        out = *head;
        *b = rest;
    }
    out
}

impl Header {
    /// Decodes the wire layout.
    pub fn from_bytes(bytes: &[u8; HDR_LEN]) -> Header {
        let mut b: &[u8] = bytes;
        Header {
            src_cid: u64::from_le_bytes(take(&mut b)),
            dst_cid: u64::from_le_bytes(take(&mut b)),
            src_port: u32::from_le_bytes(take(&mut b)),
            dst_port: u32::from_le_bytes(take(&mut b)),
            len: u32::from_le_bytes(take(&mut b)),
            type_: u16::from_le_bytes(take(&mut b)),
            op: u16::from_le_bytes(take(&mut b)),
            flags: u32::from_le_bytes(take(&mut b)),
            buf_alloc: u32::from_le_bytes(take(&mut b)),
            fwd_cnt: u32::from_le_bytes(take(&mut b)),
        }
    }

    /// Encodes the wire layout.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        let fields: [&[u8]; 10] = [
            &self.src_cid.to_le_bytes(),
            &self.dst_cid.to_le_bytes(),
            &self.src_port.to_le_bytes(),
            &self.dst_port.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.type_.to_le_bytes(),
            &self.op.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.buf_alloc.to_le_bytes(),
            &self.fwd_cnt.to_le_bytes(),
        ];
        let mut at = 0;
        for f in fields {
            if let Some(dst) = out.get_mut(at..at + f.len()) {
                dst.copy_from_slice(f);
            }
            at += f.len();
        }
        out
    }

    /// The operation, if known.
    pub fn op(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }

    /// A RST answering this header: addresses swapped, no credit information of ours
    /// (there is no connection to describe).
    pub fn rst_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        }
    }
}

/// Why a chain did not yield a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain has no descriptor.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain ends on a descriptor that still has NEXT set (loop, bad index, ...).
    #[error("descriptor chain is broken")]
    BrokenChain,
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("more than {MAX_CHAIN_DESCRIPTORS} descriptors in the chain")]
    ChainTooLong,
    /// A TX chain with a device-writable buffer, or an RX chain with a device-readable
    /// one (virtio 1.2 §5.10.6.4).
    #[error("buffer has the wrong direction for its queue")]
    WrongDirection,
    /// Fewer than 44 bytes for the header.
    #[error("packet header is truncated")]
    ShortHeader,
    /// `src_cid` is not the guest's CID (virtio 1.2 §5.10.6.4).
    #[error("source CID {0} is not the guest's")]
    SrcCid(u64),
    /// `dst_cid` is not the host: this device only reaches the host.
    #[error("destination CID {0} is not the host")]
    DstCid(u64),
    /// A type other than stream.
    #[error("unsupported socket type {0}")]
    Type(u16),
    /// An unknown operation.
    #[error("unknown operation {0}")]
    Op(u16),
    /// A payload longer than [`MAX_PKT_DATA`].
    #[error("payload of {0} bytes is too long")]
    TooLong(u32),
    /// The chain holds fewer payload bytes than `len` says.
    #[error("payload truncated: header says {len} bytes, chain holds {got}")]
    ShortData {
        /// `len` from the header.
        len: u32,
        /// Bytes after the header in the chain.
        got: u64,
    },
    /// A buffer is not inside guest memory.
    #[error("buffer outside guest memory")]
    Memory,
}

/// A TX chain that did not parse. `hdr` is the header if it was read and came from the
/// guest's own CID: only then may the device answer with a RST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The header, when it can be answered.
    pub hdr: Option<Header>,
    /// The reason.
    pub error: PacketError,
}

/// A guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// Walks a chain, keeping its non-empty buffers, which must all be device-writable
/// (`writable`) or all device-readable.
fn segments(chain: Chain<'_>, writable: bool) -> Result<Vec<Segment>, PacketError> {
    let mut segs = Vec::new();
    let mut count = 0usize;
    let mut last_has_next = None;
    for d in chain {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(PacketError::ChainTooLong);
        }
        last_has_next = Some(d.has_next());
        if d.is_write_only() != writable {
            return Err(PacketError::WrongDirection);
        }
        if d.len() > 0 {
            let len = usize::try_from(d.len()).map_err(|_| PacketError::Memory)?;
            segs.push(Segment {
                addr: d.addr(),
                len,
            });
        }
    }
    match last_has_next {
        None => Err(PacketError::EmptyChain),
        Some(true) => Err(PacketError::BrokenChain),
        Some(false) => Ok(segs),
    }
}

/// Copies `dst.len()` bytes from the segments, starting `skip` bytes in. Returns how many
/// bytes were available (at most `dst.len()`).
fn gather(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    mut skip: usize,
    dst: &mut [u8],
) -> Result<usize, PacketError> {
    let mut filled = 0usize;
    for s in segs {
        if filled == dst.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let avail = s.len - skip;
        let take = avail.min(dst.len() - filled);
        let addr = s
            .addr
            .0
            .checked_add(u64::try_from(skip).map_err(|_| PacketError::Memory)?)
            .ok_or(PacketError::Memory)?;
        let out = dst
            .get_mut(filled..filled + take)
            .ok_or(PacketError::Memory)?;
        mem.read_slice(out, GuestAddress(addr))
            .map_err(|_| PacketError::Memory)?;
        filled += take;
        skip = 0;
    }
    Ok(filled)
}

/// Parses a TX chain (guest to device). The payload of an RW packet is copied into
/// `data` (cleared first); other ops carry no payload and any bytes after their header
/// are ignored. Checks `src_cid == guest_cid`, `dst_cid == HOST_CID`, the type and the op.
pub fn parse_tx(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    guest_cid: u64,
    data: &mut Vec<u8>,
) -> Result<Header, Rejected> {
    data.clear();
    let drop = |error| Rejected { hdr: None, error };
    let segs = segments(chain, false).map_err(drop)?;
    let mut raw = [0u8; HDR_LEN];
    if gather(mem, &segs, 0, &mut raw).map_err(drop)? < HDR_LEN {
        return Err(drop(PacketError::ShortHeader));
    }
    let hdr = Header::from_bytes(&raw);
    if hdr.src_cid != guest_cid {
        return Err(drop(PacketError::SrcCid(hdr.src_cid)));
    }
    let reject = |error| Rejected {
        hdr: Some(hdr),
        error,
    };
    if hdr.dst_cid != HOST_CID {
        return Err(reject(PacketError::DstCid(hdr.dst_cid)));
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(reject(PacketError::Type(hdr.type_)));
    }
    let op = hdr.op().ok_or_else(|| reject(PacketError::Op(hdr.op)))?;
    if op != Op::Rw {
        return Ok(hdr);
    }
    let len = usize::try_from(hdr.len)
        .ok()
        .filter(|&l| l <= MAX_PKT_DATA)
        .ok_or_else(|| reject(PacketError::TooLong(hdr.len)))?;
    let total: u64 = segs.iter().map(|s| s.len as u64).sum();
    let got = total.saturating_sub(HDR_LEN as u64);
    if got < u64::from(hdr.len) {
        return Err(reject(PacketError::ShortData { len: hdr.len, got }));
    }
    data.resize(len, 0);
    gather(mem, &segs, HDR_LEN, data).map_err(reject)?;
    Ok(hdr)
}

/// A validated RX chain (device to guest): device-writable buffers inside guest memory,
/// with room for at least a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxBuffer {
    segs: Vec<Segment>,
    capacity: usize,
}

impl RxBuffer {
    /// Checks an RX chain. Every buffer must be device-writable and inside guest memory,
    /// and together they must hold at least [`HDR_LEN`] bytes.
    pub fn parse(mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<RxBuffer, PacketError> {
        let segs = segments(chain, true)?;
        let mut capacity = 0usize;
        for s in &segs {
            if !GuestMemoryBackend::check_range(mem, s.addr, s.len) {
                return Err(PacketError::Memory);
            }
            capacity = capacity.saturating_add(s.len);
        }
        if capacity < HDR_LEN {
            return Err(PacketError::ShortHeader);
        }
        Ok(RxBuffer { segs, capacity })
    }

    /// How much payload fits after the header, capped at [`MAX_PKT_DATA`].
    pub fn data_capacity(&self) -> usize {
        self.capacity.saturating_sub(HDR_LEN).min(MAX_PKT_DATA)
    }

    /// Writes `hdr` (with `len` set to `data.len()`) and `data`; returns the used length.
    /// `data` longer than [`RxBuffer::data_capacity`] is an error, nothing is truncated.
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        data: &[u8],
    ) -> Result<u32, PacketError> {
        let len = u32::try_from(data.len()).map_err(|_| PacketError::Memory)?;
        if data.len() > self.data_capacity() {
            return Err(PacketError::TooLong(len));
        }
        let mut h = *hdr;
        h.len = len;
        let raw = h.to_bytes();
        let mut parts: [&[u8]; 2] = [&raw, data];
        let mut written = 0usize;
        for s in &self.segs {
            let mut room = s.len;
            let mut addr = s.addr;
            for part in parts.iter_mut() {
                if room == 0 {
                    break;
                }
                let n = part.len().min(room);
                let (now, rest) = part.split_at(n);
                if n > 0 {
                    mem.write_slice(now, addr)
                        .map_err(|_| PacketError::Memory)?;
                }
                *part = rest;
                room -= n;
                let step = u64::try_from(n).map_err(|_| PacketError::Memory)?;
                addr = GuestAddress(addr.0.checked_add(step).ok_or(PacketError::Memory)?);
                written += n;
            }
        }
        u32::try_from(written).map_err(|_| PacketError::Memory)
    }
}

#[cfg(test)]
#[path = "packet_tests.rs"]
mod tests;
