//! virtio-net (virtio 1.2 §5.1): a guest Ethernet NIC backed by a host tap device.
//!
//! This module holds the public type, feature bits, the config space and the
//! `virtio_net_hdr` layout. The device state machine is in `device`, the transmit path in
//! `tx`, the receive path in `rx`, the event-loop glue in `event_handler`, counters in
//! `metrics`. The host side sits behind [`NetBackend`] (`backend`): the real [`Tap`]
//! (`tap`) or the in-memory [`MemTap`] used by tests and fuzzing.
//!
//! The boundary: everything the guest controls (descriptor chains, headers, lengths) is
//! validated here before it reaches the tap; the tap (the host kernel) validates again.

pub mod backend;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod rx;
pub mod tap;
pub mod tx;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod test_utils;

use std::io;

pub use backend::{MemTap, NetBackend};
pub use device::persist::NetState;
pub use device::Net;
pub use metrics::NetMetrics;
pub use tap::Tap;

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (receiveq1, virtio 1.2 §5.1.2).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (transmitq1, virtio 1.2 §5.1.2).
pub const TX_QUEUE: usize = 1;

/// Length of `struct virtio_net_hdr` with `num_buffers`: always this size once
/// VIRTIO_F_VERSION_1 is negotiated, which the transport requires (virtio 1.2 §5.1.6).
pub const VNET_HDR_LEN: usize = 12;
/// Ethernet header length: the "low level ethernet header length" the MTU rules add.
pub const ETH_HLEN: usize = 14;
/// An 802.1Q tag, tolerated on top of the MTU.
pub const VLAN_HLEN: usize = 4;
/// Largest header + frame the device moves in either direction: 64 KiB of IP packet plus
/// headers (the buffer size virtio 1.2 §5.1.6.3.1 asks of drivers that accept TSO).
pub const MAX_BUFFER_LEN: usize = 65562;
/// Smallest MTU the device may advertise (virtio 1.2 §5.1.4.1).
pub const MIN_MTU: u16 = 68;

/// VIRTIO_NET_F_* feature bit numbers offered by this device (virtio 1.2 §5.1.3).
pub mod features {
    pub use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    };
}

/// `virtio_net_hdr.flags`: the packet needs a checksum at csum_start + csum_offset.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags`: the checksum has been validated (receive only).
pub const HDR_F_DATA_VALID: u8 = 2;
/// `virtio_net_hdr.gso_type` values (virtio 1.2 §5.1.6).
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation.
pub const GSO_UDP: u8 = 3;
/// TCP over IPv6 segmentation.
pub const GSO_TCPV6: u8 = 4;
/// Flag bit in `gso_type`: the TCP packet has ECN set.
pub const GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr` (virtio 1.2 §5.1.6), little endian on the wire.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VnetHdr {
    /// HDR_F_* bits.
    pub flags: u8,
    /// GSO_* value, possibly with GSO_ECN.
    pub gso_type: u8,
    /// Length of the headers to replicate per segment (a hint).
    pub hdr_len: u16,
    /// Segment payload size (MSS).
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, after csum_start, the checksum goes.
    pub csum_offset: u16,
    /// How many receive buffers the packet spans (receive only, MRG_RXBUF).
    pub num_buffers: u16,
}

impl VnetHdr {
    /// Decodes the wire layout.
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> VnetHdr {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        }
    }

    /// Encodes the wire layout.
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        let fields = [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ];
        for (dst, v) in b[2..].chunks_exact_mut(2).zip(fields) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// Bytes of config space exposed: `struct virtio_net_config` up to and including `mtu`
/// (virtio 1.2 §5.1.4); later fields belong to features not offered.
pub const CONFIG_LEN: usize = 12;
/// `status` bit: the link is up (virtio 1.2 §5.1.4).
pub const STATUS_LINK_UP: u16 = 1;

/// Builds the config space (little endian, virtio 1.2 §5.1.4):
/// mac [u8; 6] @0, status u16 @6, max_virtqueue_pairs u16 @8, mtu u16 @10.
pub fn config_space(mac: [u8; 6], status: u16, mtu: Option<u16>) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&status.to_le_bytes());
    c[8..10].copy_from_slice(&1u16.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    c
}

/// A random locally administered unicast MAC (IEEE 802: bit 1 of the first octet set,
/// bit 0 clear).
pub fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut done = 0usize;
    while done < mac.len() {
        let rest = mac.get_mut(done..).unwrap_or_default();
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes; getrandom
        // writes at most that many.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            done += n.unsigned_abs();
        } else {
            let e = io::Error::last_os_error();
            if n == 0 || e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    mac[0] = (mac[0] & !0x01) | 0x02;
    Ok(mac)
}

/// Errors creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap name is empty, too long for IFNAMSIZ, or has a NUL byte.
    #[error("invalid tap name {0:?}")]
    TapName(String),
    /// A tap operation failed.
    #[error("tap {name}: {what}")]
    Tap {
        /// The tap.
        name: String,
        /// What failed.
        what: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The MTU is outside what virtio allows.
    #[error("mtu {0} outside {MIN_MTU}..=65535")]
    Mtu(u16),
    /// No random MAC could be drawn.
    #[error("cannot generate a MAC address")]
    Random(#[source] io::Error),
    /// An EventFd could not be created.
    #[error("cannot create an EventFd")]
    EventFd(#[source] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let c = config_space([2, 1, 2, 3, 4, 5], STATUS_LINK_UP, Some(1500));
        assert_eq!(&c[..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(&c[6..8], &[1, 0]);
        assert_eq!(&c[8..10], &[1, 0]);
        assert_eq!(&c[10..12], &1500u16.to_le_bytes());
        assert_eq!(&config_space([0; 6], 0, None)[10..], &[0, 0]);
    }

    #[test]
    fn header_round_trip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: GSO_TCPV6,
            hdr_len: 0x0102,
            gso_size: 1448,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(b[..4], [1, 4, 2, 1]);
        assert_eq!(b[10..], [3, 0]);
        assert_eq!(VnetHdr::from_bytes(&b), h);
    }

    #[test]
    fn random_mac_is_local_unicast_and_varies() {
        let a = random_mac().unwrap();
        let b = random_mac().unwrap();
        for m in [a, b] {
            assert_eq!(m[0] & 0x03, 0x02, "{m:x?}");
        }
        assert_ne!(a, b);
    }
}
