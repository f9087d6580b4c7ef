//! Fuzzes the virtio-net transmit path: a guest-controlled descriptor table, available ring
//! and buffers go through `Net::process_tx` (chain walk, header checks, gathered write)
//! into an in-memory tap, under a fuzzed set of negotiated features. Optionally the receive
//! path runs too, with fuzzed frames from the tap into fuzzed receive chains.
//!
//! Input layout (short inputs are zero-extended):
//!   [0]        options: bit0 CSUM, bit1 HOST_TSO4, bit2 HOST_TSO6, bit3 MTU 1500,
//!              bit4 MRG_RXBUF, bit5 GUEST_CSUM + GUEST_TSO4/6, bit6 tap writes fail,
//!              bit7 run the receive path too
//!   [1]        low nibble: TX available entries (0..=15); high nibble: RX entries
//!   [2..18]    available ring heads (mod 32: 16..31 are outside the queue); TX uses them
//!              in order, RX in reverse
//!   [18..146]  16 descriptors of 8 bytes: addr u16, len u16, flags u8, next u8, ext u16
//!              flags: bit0 NEXT, bit1 WRITE, bit2 INDIRECT, bit3 huge length,
//!                     bit4 address beyond guest memory
//!              ext: high bits of addr (addr = ext << 16 | addr)
//!   [146..150] two u16 lengths of frames queued on the tap (bit7 only), cut from [150..]
//!   [150..]    copied into guest memory at PAYLOAD: headers, frames, indirect tables
#![no_main]

use devices::virtio::net::features::*;
use devices::virtio::net::{
    MemTap, Net, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_NEEDS_CSUM, MAX_BUFFER_LEN, VNET_HDR_LEN,
};
use devices::virtio::{feature, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x10_0000;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const TX_AVAIL: u64 = 0x100;
const TX_USED: u64 = 0x200;
const RX_AVAIL: u64 = 0x300;
const RX_USED: u64 = 0x400;
const PAYLOAD: u64 = 0x1000;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_used_queue(&self) {}
    fn signal_config_change(&self) {}
}

fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

fn u16_at(data: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([byte(data, i), byte(data, i + 1)])
}

fn build_memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    for i in 0..usize::from(QUEUE_SIZE) {
        let at = 18 + i * 8;
        let flags_in = byte(data, at + 4);
        let mut addr = (u64::from(u16_at(data, at + 6)) << 16) | u64::from(u16_at(data, at));
        if flags_in & 0x10 != 0 {
            addr |= 0xffff_0000_0000;
        }
        let mut len = u32::from(u16_at(data, at + 2));
        if flags_in & 0x08 != 0 {
            len |= 0xffff_0000;
        }
        let flags = u16::from(flags_in & 0x07);
        let next = u16::from(byte(data, at + 5) % 32);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DESC_TABLE + 16 * i as u64))
            .unwrap();
    }
    let counts = byte(data, 1);
    let (tx_count, rx_count) = (u16::from(counts & 0x0f), u16::from(counts >> 4));
    mem.write_obj(tx_count, GuestAddress(TX_AVAIL + 2)).unwrap();
    mem.write_obj(rx_count, GuestAddress(RX_AVAIL + 2)).unwrap();
    for i in 0..QUEUE_SIZE {
        let head = u16::from(byte(data, 2 + usize::from(i)) % 32);
        mem.write_obj(head, GuestAddress(TX_AVAIL + 4 + 2 * u64::from(i)))
            .unwrap();
        let head = u16::from(byte(data, 17 - usize::from(i)) % 32);
        mem.write_obj(head, GuestAddress(RX_AVAIL + 4 + 2 * u64::from(i)))
            .unwrap();
    }
    if let Some(payload) = data.get(150..) {
        let n = payload.len().min(MEM_SIZE - PAYLOAD as usize);
        mem.write_slice(&payload[..n], GuestAddress(PAYLOAD))
            .unwrap();
    }
    mem
}

fn queue(avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_ready(true);
    q
}

fuzz_target!(|data: &[u8]| {
    let opts = byte(data, 0);
    let mut acked = feature(VIRTIO_F_VERSION_1);
    let bits: [(u8, &[u32]); 6] = [
        (0x01, &[VIRTIO_NET_F_CSUM]),
        (0x02, &[VIRTIO_NET_F_HOST_TSO4]),
        (0x04, &[VIRTIO_NET_F_HOST_TSO6]),
        (0x08, &[VIRTIO_NET_F_MTU]),
        (0x10, &[VIRTIO_NET_F_MRG_RXBUF]),
        (
            0x20,
            &[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
            ],
        ),
    ];
    for (mask, features) in bits {
        if opts & mask != 0 {
            for &f in features {
                acked |= feature(f);
            }
        }
    }

    let mem = build_memory(data);
    let tap = MemTap::new().unwrap();
    tap.state().fail_writes = opts & 0x40 != 0;
    let mut net =
        Net::with_backend(Box::new(tap.clone()), Some([2, 0, 0, 0, 0, 1]), Some(1500)).unwrap();
    net.set_acked_features(acked);
    let acked = net.acked_features();
    net.activate(
        mem.clone(),
        vec![queue(RX_AVAIL, RX_USED), queue(TX_AVAIL, TX_USED)],
        Arc::new(NoInterrupt),
    )
    .unwrap();
    net.process_tx();

    // Every chain put in the used ring was either sent or counted as dropped.
    let tx_used: u16 = mem.read_obj(GuestAddress(TX_USED + 2)).unwrap();
    assert!(tx_used <= u16::from(byte(data, 1) & 0x0f));
    let snap: std::collections::HashMap<_, _> = net.metrics().snapshot().into_iter().collect();
    assert_eq!(snap["tx_frames"] + snap["tx_dropped"], u64::from(tx_used));
    // What reached the tap is bounded and carries a header the guest was allowed to send.
    let sent = tap.take_tx();
    assert_eq!(sent.len() as u64, snap["tx_frames"]);
    for f in &sent {
        assert!(f.len() >= VNET_HDR_LEN + 14 && f.len() <= MAX_BUFFER_LEN);
        assert_eq!(f[0] & !HDR_F_NEEDS_CSUM, 0);
        assert_eq!(f[10..12], [0, 0], "num_buffers zero on transmit");
        let gso_ok = match f[1] {
            GSO_NONE => true,
            GSO_TCPV4 => acked & feature(VIRTIO_NET_F_HOST_TSO4) != 0,
            GSO_TCPV6 => acked & feature(VIRTIO_NET_F_HOST_TSO6) != 0,
            _ => false,
        };
        assert!(gso_ok, "gso type {} not negotiated", f[1]);
        if f[0] & HDR_F_NEEDS_CSUM != 0 {
            assert_ne!(acked & feature(VIRTIO_NET_F_CSUM), 0);
        }
    }

    // A second pass finds nothing new.
    net.process_tx();
    let again: u16 = mem.read_obj(GuestAddress(TX_USED + 2)).unwrap();
    assert_eq!(again, tx_used);

    if opts & 0x80 != 0 {
        let frames = data.get(150..).unwrap_or_default();
        let mut at = 0usize;
        for i in 0..2 {
            let len = usize::from(u16_at(data, 146 + 2 * i));
            let end = (at + len).min(frames.len());
            tap.push_rx(frames[at..end].to_vec()).unwrap();
            at = end;
        }
        net.process_rx();
        net.tap_event();
        // Receive buffers may overlap the rings (the guest's own business), so the rings
        // are not checked after this: only that nothing panics.
    }
});
