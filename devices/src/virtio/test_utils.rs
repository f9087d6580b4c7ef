//! Test helpers: a driver-side view of a split virtqueue laid out with virtio-queue's
//! `MockSplitQueue`, plus counting interrupts.

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::VirtioInterrupt;

/// Size of the test guest memory.
pub const MEM_SIZE: usize = 0x100_0000;

/// 16 MiB of guest memory at 0. Queues sit at 0, buffers from 0x10_0000 up.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A descriptor as the driver writes it: (address, length, flags). NEXT is filled in by
/// [`TestQueue::add_chain`].
pub fn desc(addr: u64, len: u32, flags: u32) -> (u64, u32, u32) {
    (addr, len, flags)
}

/// The driver's side of one queue.
pub struct TestQueue<'a> {
    mq: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
}

impl<'a> TestQueue<'a> {
    /// Lays out a queue of `size` entries at guest address 0.
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        TestQueue {
            mq: MockSplitQueue::new(mem, size),
            size,
        }
    }

    /// The device's `Queue`, configured and ready, as the transport would build it.
    pub fn queue(&self) -> Queue {
        self.mq.create_queue().unwrap()
    }

    /// Address of the available ring.
    pub fn avail_addr(&self) -> GuestAddress {
        self.mq.avail_addr()
    }

    /// Writes `descs` at table index `start..`, chained with NEXT, and offers the head.
    pub fn add_chain(&self, start: u16, descs: &[(u64, u32, u32)]) {
        let n = descs.len();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = start + u16::try_from(i).unwrap();
            let (flags, next) = if i + 1 < n {
                (flags | VRING_DESC_F_NEXT, idx + 1)
            } else {
                (flags, 0)
            };
            let d = Descriptor::new(addr, len, u16::try_from(flags).unwrap(), next);
            self.mq
                .desc_table()
                .store(idx, RawDescriptor::from(d))
                .unwrap();
        }
        self.add_raw_head(start);
    }

    /// Writes one raw descriptor (flags and next as given) at table index `idx`.
    pub fn set_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        self.mq
            .desc_table()
            .store(idx, RawDescriptor::from(d))
            .unwrap();
    }

    /// Offers `head` in the available ring, whatever it points at.
    pub fn add_raw_head(&self, head: u16) {
        let avail = self.mq.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
    }

    /// The used ring's idx.
    pub fn used_idx(&self) -> u16 {
        self.mq.used().idx().load()
    }

    /// Used element `i` as (descriptor id, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let e = self
            .mq
            .used()
            .ring()
            .ref_at(usize::from(i % self.size))
            .unwrap()
            .load();
        (e.id(), e.len())
    }
}

/// A [`VirtioInterrupt`] that counts.
#[derive(Default)]
pub struct CountingInterrupt {
    /// Used-buffer signals.
    pub used: AtomicU32,
    /// Config-change signals.
    pub config: AtomicU32,
}

impl CountingInterrupt {
    /// Used-buffer signals so far.
    pub fn used_count(&self) -> u32 {
        self.used.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal_used_queue(&self) {
        self.used.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config_change(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// Plays a guest driver on `t` up to DRIVER_OK (virtio 1.2 §3.1.1): accepts `features`,
/// then gives each queue the size and ring addresses of the matching entry of `queues`
/// (as the device tests lay them out) and marks it ready. Returns the Status read back.
pub fn drive_transport(
    t: &mut crate::virtio::MmioTransport,
    features: u64,
    queues: &[Queue],
) -> u32 {
    use crate::bus::BusDevice;
    use crate::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
    use virtio_queue::QueueT;
    let mut w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let half = |v: u64| u32::try_from(v & 0xffff_ffff).unwrap();
    w(0x70, ACKNOWLEDGE);
    w(0x70, ACKNOWLEDGE | DRIVER);
    for sel in 0..2u32 {
        w(0x24, sel);
        w(0x20, half(features >> (32 * sel)));
    }
    w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    for (i, q) in queues.iter().enumerate() {
        w(0x30, u32::try_from(i).unwrap());
        w(0x38, u32::from(q.size()));
        for (reg, addr) in [
            (0x80, q.desc_table()),
            (0x90, q.avail_ring()),
            (0xa0, q.used_ring()),
        ] {
            w(reg, half(addr));
            w(reg + 4, half(addr >> 32));
        }
        w(0x44, 1);
    }
    w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let mut st = [0u8; 4];
    t.read(0x70, &mut st);
    u32::from_le_bytes(st)
}
