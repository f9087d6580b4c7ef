//! Unit tests of the virtio-net device over an in-memory tap: transmit and receive
//! through real split queues, drops and their counters, flow control when the guest has
//! no buffers, reset, the event loop, and the path through the MMIO transport.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::features::*;
use super::test_utils::{frame, payload, rx_hdr, Bench, Driver, RX_RING, TX_RING};
use super::*;
use crate::bus::BusDevice;
use crate::virtio::test_utils::{mem, CountingInterrupt};
use crate::virtio::{
    feature, ActivateError, MmioTransport, VirtioDevice, INTERRUPT_USED_BUFFER, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
};

const W: u32 = VRING_DESC_F_WRITE;
const BUF: u64 = 0x10_0000;
const RXBUF: u64 = 0x40_0000;

fn f(bits: &[u32]) -> u64 {
    bits.iter()
        .fold(feature(VIRTIO_F_VERSION_1), |a, &b| a | feature(b))
}

fn all_offloads() -> u64 {
    f(&[
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_MTU,
    ])
}

#[test]
fn features_and_config_space() {
    let t = MemTap::new().unwrap();
    let n = Net::with_backend(Box::new(t.clone()), Some([2, 9, 8, 7, 6, 5]), None).unwrap();
    assert_eq!(n.device_type(), crate::virtio::TYPE_NET);
    assert_eq!(n.queue_max_sizes(), &[256, 256]);
    assert_eq!(n.queue_events().len(), 2);
    let av = n.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ] {
        assert_ne!(av & feature(bit), 0, "bit {bit}");
    }
    assert_eq!(
        av & feature(VIRTIO_NET_F_MTU),
        0,
        "no MTU offered without one"
    );
    let mut c = [0u8; 12];
    n.read_config(0, &mut c);
    assert_eq!(c, [2, 9, 8, 7, 6, 5, 1, 0, 1, 0, 0, 0]);

    let mut n = Net::with_backend(Box::new(t), None, Some(1400)).unwrap();
    assert_ne!(n.avail_features() & feature(VIRTIO_NET_F_MTU), 0);
    assert_eq!(n.mac()[0] & 3, 2, "random MAC is local unicast");
    assert_eq!(n.mtu(), Some(1400));
    let mut mtu = [0u8; 2];
    n.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 1400);
    // Writes are ignored; acked features are masked by the offer.
    n.write_config(0, &[0xff; 6]);
    let mut mac = [0u8; 6];
    n.read_config(0, &mut mac);
    assert_eq!(mac, n.mac());
    n.set_acked_features(u64::MAX);
    assert_eq!(n.acked_features(), n.avail_features());
}

#[test]
fn bad_mtu_is_refused() {
    let t = MemTap::new().unwrap();
    let e = Net::with_backend(Box::new(t), None, Some(67))
        .err()
        .unwrap();
    assert!(matches!(e, NetError::Mtu(67)), "{e}");
}

#[test]
fn tx_writes_one_frame_per_chain_whatever_the_split() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_CSUM]), None, 256);
    let h = VnetHdr {
        flags: HDR_F_NEEDS_CSUM | 0x40,
        hdr_len: 54,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 9,
        ..VnetHdr::default()
    };
    let f1 = frame(h, 100, 1);
    // The header itself split across two descriptors, then two data descriptors.
    let h1 = b.send(BUF, &f1, &[5, 20, 60]);
    let f2 = frame(VnetHdr::default(), 60, 2);
    let h2 = b.send(BUF + 0x1000, &f2, &[]);
    b.net.process_tx();

    let sent = b.tap.take_tx();
    assert_eq!(sent.len(), 2);
    // Unknown flag bits cleared and num_buffers zeroed in what reaches the tap.
    let mut want = frame(
        VnetHdr {
            flags: HDR_F_NEEDS_CSUM,
            num_buffers: 0,
            ..h
        },
        100,
        1,
    );
    assert_eq!(sent[0], want);
    want = f2.clone();
    assert_eq!(sent[1], want);
    assert_eq!(b.tx.used_idx(), 2);
    assert_eq!(b.tx.used_elem(0), (u32::from(h1), 0));
    assert_eq!(b.tx.used_elem(1), (u32::from(h2), 0));
    assert_eq!(b.irq.used_count(), 1, "one interrupt for the batch");
    assert_eq!(b.counter("tx_frames"), 2);
    assert_eq!(b.counter("tx_bytes"), 160);
    assert_eq!(b.counter("tx_dropped"), 0);
}

#[test]
fn tx_drops_and_counts_bad_chains_without_stopping() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_MTU]), Some(1500), 256);
    // Device-writable buffer in a transmit chain.
    b.tx.add_chain(&[(BUF, 12, 0), (BUF + 12, 100, W)]);
    // Shorter than header + Ethernet header.
    b.send(BUF, &[0u8; 25], &[]);
    // Outside guest memory.
    b.tx.add_chain(&[(BUF, 12, 0), (0xffff_0000_0000, 100, 0)]);
    // A GSO header the driver did not negotiate.
    let tso = VnetHdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        ..VnetHdr::default()
    };
    b.send(BUF + 0x1000, &frame(tso, 100, 0), &[]);
    // Over 64 KiB + header, in two descriptors; and a frame over the MTU.
    b.tx.add_chain(&[(BUF, 65_000, 0), (BUF, 1000, 0)]);
    b.send(BUF + 0x2_0000, &frame(VnetHdr::default(), 1519, 0), &[]);
    // A good frame still goes through after all that.
    b.send(BUF + 0x3_0000, &frame(VnetHdr::default(), 1518, 0), &[]);
    b.net.process_tx();

    assert_eq!(b.tap.take_tx().len(), 1);
    assert_eq!(b.tx.used_idx(), 7, "every chain is returned");
    assert_eq!(b.counter("tx_malformed"), 4);
    assert_eq!(b.counter("tx_oversized"), 2);
    assert_eq!(b.counter("tx_dropped"), 6);
    assert_eq!(b.counter("tx_frames"), 1);

    // The tap refusing a frame.
    b.tap.state().fail_writes = true;
    b.send(BUF, &frame(VnetHdr::default(), 60, 0), &[]);
    b.net.process_tx();
    assert_eq!(b.counter("tx_tap_errors"), 1);
    assert_eq!(b.counter("tx_dropped"), 7);
}

#[test]
fn tx_gso_frames_pass_when_negotiated() {
    let m = mem();
    let mut b = Bench::new(&m, all_offloads(), Some(1500), 256);
    let tso = VnetHdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: GSO_TCPV6,
        hdr_len: 74,
        gso_size: 1428,
        csum_start: 54,
        csum_offset: 16,
        num_buffers: 0,
    };
    let big = frame(tso, 65_000, 3);
    b.send(BUF, &big, &[12, 4096, 40_000]);
    b.net.process_tx();
    assert_eq!(b.tap.take_tx(), vec![big]);
    assert_eq!(b.counter("tx_bytes"), 65_000);
}

#[test]
fn rx_one_buffer_per_frame_without_mrg() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[]), None, 256);
    b.give_rx(RXBUF, 2, 1526);
    let f1 = frame(VnetHdr::default(), 100, 7);
    b.tap.push_rx(f1.clone()).unwrap();
    b.net.process_rx();
    assert_eq!(b.rx.used_idx(), 1);
    assert_eq!(b.rx.used_elem(0), (0, 112));
    let got = b.read(RXBUF, 112);
    assert_eq!(got[..12], rx_hdr(1));
    assert_eq!(got[12..], f1[12..]);
    assert_eq!(b.irq.used_count(), 1);
    assert_eq!(b.counter("rx_frames"), 1);
    assert_eq!(b.counter("rx_bytes"), 100);
}

#[test]
fn rx_mrg_spreads_a_frame_over_chains() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_MRG_RXBUF]), None, 256);
    b.give_rx(RXBUF, 6, 64);
    let f1 = frame(VnetHdr::default(), 188, 3);
    b.tap.push_rx(f1.clone()).unwrap();
    let f2 = frame(VnetHdr::default(), 40, 4);
    b.tap.push_rx(f2.clone()).unwrap();
    b.net.process_rx();
    // 200 bytes: three full 64-byte buffers and 8 bytes of a fourth (virtio 1.2 §5.1.6.4).
    assert_eq!(b.rx.used_idx(), 5);
    let lens: Vec<_> = (0..5).map(|i| b.rx.used_elem(i)).collect();
    assert_eq!(lens, vec![(0, 64), (1, 64), (2, 64), (3, 8), (4, 52)]);
    let got = b.read(RXBUF, 200);
    assert_eq!(got[..12], rx_hdr(4));
    assert_eq!(got[12..], f1[12..]);
    let got = b.read(RXBUF + 4 * 64, 52);
    assert_eq!(got[..12], rx_hdr(1));
    assert_eq!(got[12..], f2[12..]);
    assert_eq!(b.counter("rx_frames"), 2);
}

#[test]
fn rx_without_buffers_leaves_frames_in_the_tap_until_the_guest_adds_some() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_MRG_RXBUF]), None, 256);
    b.tap.push_rx(frame(VnetHdr::default(), 50, 0)).unwrap();
    b.tap.push_rx(frame(VnetHdr::default(), 50, 1)).unwrap();
    b.net.process_rx();
    assert_eq!(b.tap.state().rx.len(), 2, "nothing read");
    assert!(!b.net.rx_pending());
    assert_eq!(b.counter("rx_no_buffers"), 1);
    assert_eq!(b.rx.used_flags(&m) & 1, 0, "kicks enabled while waiting");
    // A second wake-up without buffers does not read either (no busy loop, no loss).
    b.net.tap_event();
    assert_eq!(b.tap.state().rx.len(), 2);

    // The guest adds one buffer and kicks: one frame moves, the other stays.
    b.give_rx(RXBUF, 1, 2048);
    b.net.process_rx();
    assert_eq!(b.rx.used_idx(), 1);
    assert_eq!(b.tap.state().rx.len(), 1);
    assert_eq!(b.counter("rx_no_buffers"), 3);
    b.give_rx(RXBUF + 0x1000, 1, 2048);
    b.net.process_rx();
    assert_eq!(b.tap.state().rx.len(), 0);
    assert_eq!(b.counter("rx_frames"), 2);
}

#[test]
fn rx_frame_waits_held_until_enough_buffers_arrive() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_MRG_RXBUF]), None, 256);
    b.give_rx(RXBUF, 1, 64);
    let f1 = frame(VnetHdr::default(), 188, 5);
    b.tap.push_rx(f1.clone()).unwrap();
    b.net.process_rx();
    assert!(b.net.rx_pending(), "read, then held for more buffers");
    assert_eq!(b.rx.used_idx(), 0);
    assert_eq!(b.counter("rx_no_buffers"), 1);
    b.give_rx(RXBUF + 64, 3, 64);
    b.net.process_rx();
    assert!(!b.net.rx_pending());
    assert_eq!(b.rx.used_idx(), 4);
    let got = b.read(RXBUF, 200);
    assert_eq!(got[..12], rx_hdr(4));
    assert_eq!(got[12..], f1[12..]);
}

#[test]
fn rx_frame_bigger_than_a_full_ring_is_dropped_and_the_buffers_reused() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_MRG_RXBUF]), None, 16);
    b.give_rx(RXBUF, 16, 16);
    b.tap.push_rx(frame(VnetHdr::default(), 300, 0)).unwrap();
    let small = frame(VnetHdr::default(), 30, 9);
    b.tap.push_rx(small.clone()).unwrap();
    b.net.process_rx();
    assert_eq!(b.counter("rx_dropped"), 1);
    assert_eq!(b.counter("rx_frames"), 1);
    // 42 bytes over three 16-byte buffers.
    assert_eq!(b.rx.used_idx(), 3);
    assert_eq!(b.read(RXBUF, 42)[12..], small[12..]);
}

#[test]
fn rx_without_mrg_a_too_small_buffer_drops_the_frame_not_the_buffer() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[]), None, 256);
    b.give_rx(RXBUF, 1, 100);
    b.tap.push_rx(frame(VnetHdr::default(), 200, 0)).unwrap();
    b.tap.push_rx(frame(VnetHdr::default(), 50, 0)).unwrap();
    b.net.process_rx();
    assert_eq!(b.counter("rx_dropped"), 1);
    assert_eq!(b.rx.used_idx(), 1);
    assert_eq!(b.rx.used_elem(0), (0, 62));
}

#[test]
fn rx_unusable_chains_are_returned_empty() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_MRG_RXBUF]), None, 256);
    b.rx.add_chain(&[(RXBUF, 100, 0)]);
    b.rx.add_chain(&[(0xffff_0000_0000, 100, W)]);
    b.rx.add_chain(&[(RXBUF, 11, W)]);
    b.rx.add_chain(&[(RXBUF, 0, W), (RXBUF, 2000, W)]);
    b.tap.push_rx(frame(VnetHdr::default(), 60, 0)).unwrap();
    b.net.process_rx();
    assert_eq!(b.counter("rx_bad_buffers"), 3);
    assert_eq!(b.rx.used_idx(), 4);
    for i in 0..3 {
        assert_eq!(b.rx.used_elem(i), (u32::from(i), 0));
    }
    assert_eq!(b.rx.used_elem(3), (3, 72));
    assert_eq!(b.counter("rx_frames"), 1);
}

#[test]
fn rx_headers_are_checked_against_what_the_guest_accepted() {
    let m = mem();
    let tso4 = VnetHdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        ..VnetHdr::default()
    };
    let valid = VnetHdr {
        flags: HDR_F_DATA_VALID,
        ..VnetHdr::default()
    };
    // No offloads accepted: GSO and partial checksums are dropped, DATA_VALID cleared.
    let mut b = Bench::new(
        &m,
        f(&[VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU]),
        Some(1500),
        256,
    );
    b.give_rx(RXBUF, 8, 4096);
    for fr in [
        frame(tso4, 3000, 0),
        frame(
            VnetHdr {
                gso_type: 0,
                ..tso4
            },
            100,
            0,
        ),
        frame(VnetHdr::default(), 1519, 0),
        vec![0u8; 25],
        vec![0u8; MAX_BUFFER_LEN + 1],
        frame(valid, 100, 0),
    ] {
        b.tap.push_rx(fr).unwrap();
    }
    b.net.process_rx();
    assert_eq!(b.counter("rx_dropped"), 5);
    assert_eq!(b.rx.used_idx(), 1);
    assert_eq!(b.read(RXBUF, 12), rx_hdr(1));

    // All accepted: both pass as they are.
    let mut b = Bench::new(&m, all_offloads(), Some(1500), 256);
    b.give_rx(RXBUF, 8, 4096);
    b.tap.push_rx(frame(tso4, 3000, 0)).unwrap();
    b.tap.push_rx(frame(valid, 100, 0)).unwrap();
    b.net.process_rx();
    assert_eq!(b.counter("rx_dropped"), 0);
    let want = VnetHdr {
        num_buffers: 1,
        ..tso4
    };
    assert_eq!(b.read(RXBUF, 12), want.to_bytes());
    let got = b.read(RXBUF + 4096, 12);
    assert_eq!(got[0], HDR_F_DATA_VALID);
}

#[test]
fn rx_tap_errors_are_counted_and_do_not_spin() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[]), None, 256);
    b.give_rx(RXBUF, 1, 2048);
    b.tap.state().fail_reads = true;
    b.net.process_rx();
    assert_eq!(b.counter("rx_tap_errors"), 1);
    // Until the next edge the tap is not read again.
    b.net.process_rx();
    assert_eq!(b.counter("rx_tap_errors"), 1);
    b.net.tap_event();
    assert_eq!(b.counter("rx_tap_errors"), 2);
}

#[test]
fn rx_yields_after_its_budget_and_rearms_itself() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_MRG_RXBUF]), None, 256);
    b.give_rx(RXBUF, 256, 128);
    for i in 0..(rx::RX_BUDGET + 10) {
        b.tap
            .push_rx(frame(
                VnetHdr::default(),
                60,
                u8::try_from(i % 200).unwrap(),
            ))
            .unwrap();
    }
    b.net.process_rx();
    assert_eq!(b.counter("rx_frames"), rx::RX_BUDGET as u64);
    assert_eq!(b.tap.state().rx.len(), 10);
    assert_eq!(b.net.queue_events()[RX_QUEUE].read().unwrap(), 1);
}

#[test]
fn offloads_follow_the_accepted_features_per_activation() {
    let m = mem();
    let mut b = Bench::new(&m, all_offloads(), None, 256);
    assert_eq!(b.tap.state().offload, None, "not on the vCPU thread");
    b.net.process_rx();
    let want = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(b.tap.state().offload, Some(want));
    b.tap.state().offload = None;
    b.net.process_tx();
    assert_eq!(b.tap.state().offload, None, "once per activation");

    b.net.reset();
    b.net.set_acked_features(f(&[VIRTIO_NET_F_GUEST_TSO4]));
    let irq = Arc::new(CountingInterrupt::default());
    b.net
        .activate(m.clone(), vec![b.rx.queue(), b.tx.queue()], irq)
        .unwrap();
    b.net.process_tx();
    assert_eq!(
        b.tap.state().offload,
        Some(0),
        "TSO without CSUM is not set"
    );
    assert_eq!(
        Net::offload_flags(f(&[VIRTIO_NET_F_GUEST_CSUM])),
        libc::TUN_F_CSUM
    );

    // A failing ioctl is survived (logged once).
    b.net.reset();
    b.tap.state().fail_offload = true;
    let irq = Arc::new(CountingInterrupt::default());
    b.net
        .activate(m.clone(), vec![b.rx.queue(), b.tx.queue()], irq)
        .unwrap();
    b.net.process_rx();
}

#[test]
fn reset_returns_to_inactive_and_keeps_the_tap() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_MRG_RXBUF]), None, 256);
    b.give_rx(RXBUF, 1, 64);
    b.tap.push_rx(frame(VnetHdr::default(), 188, 0)).unwrap();
    b.net.process_rx();
    assert!(b.net.rx_pending());
    b.net.reset();
    assert!(!b.net.is_activated());
    assert!(
        !b.net.rx_pending(),
        "the held frame belonged to the old driver"
    );
    assert_eq!(b.net.acked_features(), 0);
    // Inactive: nothing moves.
    b.tap.push_rx(frame(VnetHdr::default(), 50, 0)).unwrap();
    b.net.tap_event();
    b.net.process_tx();
    assert_eq!(b.tap.state().rx.len(), 1);

    // A new driver starts over on fresh queues and gets the frame left in the tap.
    let rx = Driver::new(&m, RX_RING, 256);
    let mut tx = Driver::new(&m, TX_RING, 256);
    let irq = Arc::new(CountingInterrupt::default());
    b.net.set_acked_features(f(&[]));
    b.net
        .activate(m.clone(), vec![rx.queue(), tx.queue()], irq.clone())
        .unwrap();
    let mut rx = rx;
    rx.add_chain(&[(RXBUF, 1526, W)]);
    b.net.process_rx();
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(irq.used_count(), 1);
    m.write_slice(&frame(VnetHdr::default(), 60, 0), GuestAddress(BUF))
        .unwrap();
    tx.add_chain(&[(BUF, 72, 0)]);
    b.net.process_tx();
    assert_eq!(b.tap.take_tx().len(), 1);
}

#[test]
fn activation_is_checked() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[]), None, 256);
    let irq = Arc::new(CountingInterrupt::default());
    let r = b
        .net
        .activate(m.clone(), vec![b.rx.queue(), b.tx.queue()], irq.clone());
    assert!(matches!(r, Err(ActivateError::AlreadyActivated)));
    b.net.reset();
    let r = b.net.activate(m.clone(), vec![b.rx.queue()], irq);
    assert!(matches!(
        r,
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 1
        })
    ));
}

#[test]
fn link_status_changes_reach_the_guest() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_STATUS]), None, 256);
    assert!(b.net.link_up());
    b.net.set_link_up(false);
    let mut st = [0u8; 2];
    b.net.read_config(6, &mut st);
    assert_eq!(st, [0, 0]);
    assert_eq!(b.irq.config.load(std::sync::atomic::Ordering::SeqCst), 1);
    b.net.set_link_up(false);
    assert_eq!(
        b.irq.config.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no change"
    );
    b.net.set_link_up(true);
    b.net.read_config(6, &mut st);
    assert_eq!(st, [1, 0]);
}

#[test]
fn queue_errors_are_counted_not_fatal() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[]), None, 16);
    b.tx.offer(200);
    b.rx.offer(300);
    b.tap.push_rx(frame(VnetHdr::default(), 50, 0)).unwrap();
    b.net.process_tx();
    b.net.process_rx();
    assert_eq!(b.counter("queue_errors"), 2, "one bad head per queue");
    m.write_obj(1000u16, b.tx.avail_addr().unchecked_add(2))
        .unwrap();
    m.write_obj(1000u16, b.rx.avail_addr().unchecked_add(2))
        .unwrap();
    b.net.process_tx();
    b.net.tap_event();
    assert_eq!(b.counter("queue_errors"), 4);
}

/// Runs one scenario per counter family and checks that every declared counter moved at
/// least once: dead counters are a defect.
#[test]
fn every_counter_is_incremented_by_some_scenario() {
    let m = mem();
    let mut b = Bench::new(&m, f(&[VIRTIO_NET_F_MRG_RXBUF]), None, 16);
    // TX: a good frame, a malformed one, an oversized one, a tap failure.
    b.send(BUF, &frame(VnetHdr::default(), 60, 0), &[]);
    b.tx.add_chain(&[(BUF, 100, W)]);
    b.tx.add_chain(&[(BUF, 70_000, 0)]);
    b.net.process_tx();
    b.tap.state().fail_writes = true;
    b.send(BUF, &frame(VnetHdr::default(), 60, 0), &[]);
    b.net.process_tx();
    // RX: no buffers, then a bad buffer, a good frame, a dropped one, a tap error.
    b.tap.push_rx(frame(VnetHdr::default(), 60, 0)).unwrap();
    b.net.process_rx();
    b.rx.add_chain(&[(RXBUF, 100, 0)]);
    b.give_rx(RXBUF, 2, 1000);
    b.tap.push_rx(vec![0u8; 20]).unwrap();
    b.net.process_rx();
    b.tap.state().fail_reads = true;
    b.net.tap_event();
    // A bad head.
    b.tx.offer(100);
    b.tap.state().fail_writes = false;
    b.net.process_tx();

    let snap = b.net.metrics().snapshot();
    assert_eq!(snap.len(), 14);
    for (name, v) in snap {
        assert!(v > 0, "counter {name} never incremented");
    }
}

#[test]
fn event_loop_moves_frames_both_ways() {
    let m = mem();
    let tap = MemTap::new().unwrap();
    let net = Arc::new(Mutex::new(
        Net::with_backend(Box::new(tap.clone()), None, None).unwrap(),
    ));
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(net.clone());
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);

    let mut rx = Driver::new(&m, RX_RING, 256);
    let mut tx = Driver::new(&m, TX_RING, 256);
    let irq = Arc::new(CountingInterrupt::default());
    {
        let mut n = net.lock().unwrap();
        n.set_acked_features(f(&[VIRTIO_NET_F_MRG_RXBUF]));
        n.activate(m.clone(), vec![rx.queue(), tx.queue()], irq.clone())
            .unwrap();
    }
    assert_eq!(em.run_with_timeout(100).unwrap(), 1, "activation");

    // A frame arriving on the tap with no buffer waits; the guest's kick delivers it.
    let f1 = frame(VnetHdr::default(), 80, 1);
    tap.push_rx(f1.clone()).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1, "tap edge");
    assert_eq!(tap.state().rx.len(), 1);
    rx.add_chain(&[(RXBUF, 2048, W)]);
    net.lock().unwrap().queue_events()[RX_QUEUE]
        .write(1)
        .unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1, "rx kick");
    assert_eq!(rx.used_elem(0), (0, 92));
    let mut got = vec![0u8; 80];
    m.read_slice(&mut got, GuestAddress(RXBUF + 12)).unwrap();
    assert_eq!(got, payload(80, 1));

    // Edge-triggered: a second frame is a new edge and goes straight in.
    rx.add_chain(&[(RXBUF + 0x1000, 2048, W)]);
    tap.push_rx(frame(VnetHdr::default(), 80, 2)).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(rx.used_idx(), 2);
    // No more events pending: nothing spins.
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);

    let out = frame(VnetHdr::default(), 64, 3);
    m.write_slice(&out, GuestAddress(BUF)).unwrap();
    tx.add_chain(&[(BUF, 76, 0)]);
    net.lock().unwrap().queue_events()[TX_QUEUE]
        .write(1)
        .unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1, "tx kick");
    assert_eq!(tap.take_tx(), vec![out]);
    assert_eq!(irq.used_count(), 3);
}

/// The VMM's view: a guest driver negotiates through the MMIO transport, notifies through
/// QueueNotify, the event loop sends the frame, the irqfd fires.
#[test]
fn guest_driver_through_transport_and_event_loop() {
    use crate::virtio::status::*;
    let m: GuestMemoryMmap = mem();
    let tap = MemTap::new().unwrap();
    let net = Arc::new(Mutex::new(
        Net::with_backend(Box::new(tap.clone()), None, Some(1500)).unwrap(),
    ));
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(net.clone(), m.clone(), irqfd.try_clone().unwrap()).unwrap();
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(net.clone());

    let mut w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(0x70, ACKNOWLEDGE);
    w(0x70, ACKNOWLEDGE | DRIVER);
    w(0x24, 1);
    w(0x20, 1); // VIRTIO_F_VERSION_1
    w(0x24, 0);
    w(0x20, (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU));
    w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let rxd = Driver::new(&m, RX_RING, 256);
    let mut txd = Driver::new(&m, TX_RING, 256);
    for (i, d) in [&rxd, &txd].into_iter().enumerate() {
        use virtio_queue::QueueT;
        let q = d.queue();
        w(0x30, u32::try_from(i).unwrap());
        w(0x38, 256);
        for (reg, addr) in [
            (0x80, q.desc_table()),
            (0x90, q.avail_ring()),
            (0xa0, q.used_ring()),
        ] {
            w(reg, u32::try_from(addr & 0xffff_ffff).unwrap());
            w(reg + 4, u32::try_from(addr >> 32).unwrap());
        }
        w(0x44, 1);
    }
    w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let mut st = [0u8; 4];
    t.read(0x70, &mut st);
    assert_eq!(u32::from_le_bytes(st) & DRIVER_OK, DRIVER_OK);
    let mut cfg = [0u8; 2];
    t.read(0x100 + 10, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg), 1500);

    assert_eq!(em.run_with_timeout(100).unwrap(), 1, "activation event");
    let out = frame(VnetHdr::default(), 100, 0);
    m.write_slice(&out, GuestAddress(BUF)).unwrap();
    txd.add_chain(&[(BUF, 112, 0)]);
    t.write(0x50, &1u32.to_le_bytes());
    assert_eq!(em.run_with_timeout(100).unwrap(), 1, "tx queue event");
    assert_eq!(tap.take_tx(), vec![out]);
    assert_eq!(irqfd.read().unwrap(), 1);
    let mut isr = [0u8; 4];
    t.read(0x60, &mut isr);
    assert_eq!(u32::from_le_bytes(isr), INTERRUPT_USED_BUFFER);
    drop(rxd);
}
