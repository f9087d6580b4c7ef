//! The transmit path: one TX descriptor chain becomes one frame written to the backend
//! with a single gathered write, straight from guest memory.
//!
//! A chain is device-readable buffers only: the 12-byte `virtio_net_hdr` followed by the
//! Ethernet frame, split across descriptors any way the driver likes (virtio 1.2 §5.1.6.2,
//! VERSION_1 implies any layout). The header is copied out, checked against the
//! negotiated features and passed on from that copy, so the guest cannot change it after
//! the check. Bad chains are dropped and reported as a [`TxOutcome`]; nothing here panics
//! on guest input.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::backend::NetBackend;
use super::features::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MTU,
};
use super::tap::MAX_IOVECS;
use super::{
    VnetHdr, ETH_HLEN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_NEEDS_CSUM, MAX_BUFFER_LEN, VLAN_HLEN,
    VNET_HDR_LEN,
};
use crate::virtio::feature;
use crate::virtio::queue_handler::Chain;

/// At most this many descriptors of a chain are walked (an indirect table can hold 65535).
pub const MAX_TX_DESCRIPTORS: usize = 1024;

/// What became of one TX chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    /// Written to the backend: this many frame bytes, header excluded.
    Sent(u64),
    /// Broken chain: device-writable buffer, memory outside the guest, too many
    /// descriptors, shorter than header + Ethernet header, or a header using an offload
    /// that was not negotiated.
    Malformed,
    /// Longer than [`MAX_BUFFER_LEN`], or a non-GSO frame over the negotiated MTU.
    Oversized,
    /// The backend refused the frame or took only part of it.
    BackendError,
}

/// The header as the device passes it on, or why the frame is dropped. `frame_len` is the
/// Ethernet frame length, header excluded.
pub fn check_tx_header(
    h: VnetHdr,
    frame_len: usize,
    acked: u64,
    mtu: Option<u16>,
) -> Result<VnetHdr, TxOutcome> {
    let has = |bit: u32| acked & feature(bit) != 0;
    let needs_csum = h.flags & HDR_F_NEEDS_CSUM != 0;
    // virtio 1.2 §5.1.6.2.1: NEEDS_CSUM only with VIRTIO_NET_F_CSUM.
    if needs_csum {
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if !has(VIRTIO_NET_F_CSUM) || end > frame_len {
            return Err(TxOutcome::Malformed);
        }
    }
    // virtio 1.2 §5.1.6.2.1: a GSO type only if its HOST_* feature was negotiated (no
    // HOST_ECN, HOST_UFO or HOST_USO offered), and then NEEDS_CSUM and gso_size are set.
    let gso_ok = match h.gso_type {
        GSO_NONE => true,
        GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        _ => false,
    };
    if !gso_ok || (h.gso_type != GSO_NONE && (!needs_csum || h.gso_size == 0)) {
        return Err(TxOutcome::Malformed);
    }
    // virtio 1.2 §5.1.4.2: with MTU negotiated, non-GSO packets are at most mtu plus the
    // link-level header (a VLAN tag tolerated).
    if let (Some(mtu), true, GSO_NONE) = (mtu, has(VIRTIO_NET_F_MTU), h.gso_type) {
        if frame_len > usize::from(mtu) + ETH_HLEN + VLAN_HLEN {
            return Err(TxOutcome::Oversized);
        }
    }
    // virtio 1.2 §5.1.6.2.2: unknown flag bits are ignored (so cleared), csum fields unused
    // without NEEDS_CSUM, hdr_len only a hint (clamped so the tap does not refuse it), and
    // num_buffers unused on transmit.
    let frame_len16 = u16::try_from(frame_len).unwrap_or(u16::MAX);
    Ok(VnetHdr {
        flags: h.flags & HDR_F_NEEDS_CSUM,
        hdr_len: h.hdr_len.min(frame_len16),
        csum_start: if needs_csum { h.csum_start } else { 0 },
        csum_offset: if needs_csum { h.csum_offset } else { 0 },
        num_buffers: 0,
        ..h
    })
}

/// Gathers one chain and writes it to `backend`. The used length of a TX chain is 0: the
/// device writes nothing into it.
pub fn transmit(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    backend: &mut dyn NetBackend,
    acked: u64,
    mtu: Option<u16>,
) -> TxOutcome {
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut hdr_got = 0usize;
    let mut payload: Vec<VolatileSlice<'_>> = Vec::new();
    let mut total = 0usize;
    for (i, d) in chain.enumerate() {
        // virtio 1.2 §2.7.5.2: a transmit chain has device-readable buffers only.
        if i >= MAX_TX_DESCRIPTORS || d.is_write_only() {
            return TxOutcome::Malformed;
        }
        let len = usize::try_from(d.len()).unwrap_or(usize::MAX);
        total = total.saturating_add(len);
        if total > MAX_BUFFER_LEN {
            // Stop walking here: the work a chain causes stays bounded.
            return TxOutcome::Oversized;
        }
        for s in GuestMemoryBackend::get_slices(mem, d.addr(), len) {
            let Ok(mut s) = s else {
                return TxOutcome::Malformed;
            };
            if hdr_got < VNET_HDR_LEN {
                let want = (VNET_HDR_LEN - hdr_got).min(s.len());
                let (Some(dst), Ok(src)) =
                    (hdr.get_mut(hdr_got..hdr_got + want), s.subslice(0, want))
                else {
                    return TxOutcome::Malformed;
                };
                src.copy_to(dst);
                hdr_got += want;
                match s.offset(want) {
                    Ok(rest) => s = rest,
                    Err(_) => return TxOutcome::Malformed,
                }
            }
            if !s.is_empty() {
                if payload.len() + 1 >= MAX_IOVECS {
                    return TxOutcome::Malformed;
                }
                payload.push(s);
            }
        }
    }
    if total < VNET_HDR_LEN + ETH_HLEN {
        return TxOutcome::Malformed;
    }
    let frame_len = total - VNET_HDR_LEN;
    let h = match check_tx_header(VnetHdr::from_bytes(&hdr), frame_len, acked, mtu) {
        Ok(h) => h,
        Err(o) => return o,
    };
    match backend.write_frame(&h.to_bytes(), &payload) {
        Ok(n) if n == total => TxOutcome::Sent(frame_len as u64),
        _ => TxOutcome::BackendError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_HOST_TSO4;

    fn acked(bits: &[u32]) -> u64 {
        bits.iter().map(|&b| feature(b)).sum()
    }

    #[test]
    fn plain_header_is_passed_on_sanitized() {
        let h = VnetHdr {
            flags: 0xf0 | 2,
            hdr_len: 5000,
            csum_start: 3,
            csum_offset: 4,
            num_buffers: 7,
            ..VnetHdr::default()
        };
        let out = check_tx_header(h, 100, 0, None).unwrap();
        assert_eq!(
            out,
            VnetHdr {
                hdr_len: 100,
                ..VnetHdr::default()
            }
        );
    }

    #[test]
    fn checksum_offload_needs_the_feature_and_a_range_inside_the_frame() {
        let h = VnetHdr {
            flags: HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        let csum = acked(&[VIRTIO_NET_F_CSUM]);
        assert_eq!(check_tx_header(h, 100, 0, None), Err(TxOutcome::Malformed));
        assert_eq!(check_tx_header(h, 100, csum, None).unwrap(), h);
        assert_eq!(check_tx_header(h, 52, csum, None).unwrap(), h);
        assert_eq!(
            check_tx_header(h, 51, csum, None),
            Err(TxOutcome::Malformed)
        );
    }

    #[test]
    fn gso_needs_its_feature_csum_and_a_segment_size() {
        let tso = VnetHdr {
            flags: HDR_F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        let all = acked(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]);
        assert!(check_tx_header(tso, 60_000, all, None).is_ok());
        let no_tso = acked(&[VIRTIO_NET_F_CSUM]);
        assert_eq!(
            check_tx_header(tso, 60_000, no_tso, None),
            Err(TxOutcome::Malformed)
        );
        for bad in [
            VnetHdr { gso_size: 0, ..tso },
            VnetHdr { flags: 0, ..tso },
            VnetHdr {
                gso_type: GSO_TCPV4 | super::super::GSO_ECN,
                ..tso
            },
            VnetHdr {
                gso_type: super::super::GSO_UDP,
                ..tso
            },
            VnetHdr {
                gso_type: GSO_TCPV6,
                ..tso
            },
            VnetHdr { gso_type: 5, ..tso },
        ] {
            assert_eq!(
                check_tx_header(bad, 60_000, all, None),
                Err(TxOutcome::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn mtu_bounds_only_non_gso_frames_and_only_once_negotiated() {
        let mtu = acked(&[VIRTIO_NET_F_MTU, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]);
        let plain = VnetHdr::default();
        assert!(check_tx_header(plain, 1518, mtu, Some(1500)).is_ok());
        assert_eq!(
            check_tx_header(plain, 1519, mtu, Some(1500)),
            Err(TxOutcome::Oversized)
        );
        // Not negotiated: the driver may use any MTU.
        assert!(check_tx_header(plain, 9000, 0, Some(1500)).is_ok());
        let tso = VnetHdr {
            flags: HDR_F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..VnetHdr::default()
        };
        assert!(check_tx_header(tso, 60_000, mtu, Some(1500)).is_ok());
    }
}
