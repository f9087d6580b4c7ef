//! Test helpers for virtio-net: the driver's side of a queue placed anywhere in guest
//! memory (the device has two), frame builders, and a ready-made active device.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{MemTap, Net, VnetHdr, VNET_HDR_LEN};
use crate::virtio::test_utils::CountingInterrupt;
use crate::virtio::VirtioDevice;

/// Receive queue ring address.
pub const RX_RING: u64 = 0;
/// Transmit queue ring address.
pub const TX_RING: u64 = 0x8000;

/// The driver's side of one queue.
pub struct Driver<'a> {
    mq: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    /// Lays out a queue of `size` entries at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Driver {
            mq: MockSplitQueue::create(mem, GuestAddress(base), size),
            size,
            next_desc: 0,
        }
    }

    /// The device's `Queue`, configured and ready.
    pub fn queue(&self) -> Queue {
        self.mq.create_queue().unwrap()
    }

    /// Address of the available ring.
    pub fn avail_addr(&self) -> GuestAddress {
        self.mq.avail_addr()
    }

    /// Address of the used ring.
    pub fn used_addr(&self) -> GuestAddress {
        self.mq.used_addr()
    }

    /// Writes `descs` (addr, len, flags) at the next free table slots, chained, and
    /// offers the head. Returns the head index.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u32)]) -> u16 {
        let head = self.next_desc;
        let n = descs.len();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + u16::try_from(i).unwrap()) % self.size;
            let (flags, next) = if i + 1 < n {
                (flags | VRING_DESC_F_NEXT, (idx + 1) % self.size)
            } else {
                (flags, 0)
            };
            let d = Descriptor::new(addr, len, u16::try_from(flags).unwrap(), next);
            self.mq
                .desc_table()
                .store(idx, RawDescriptor::from(d))
                .unwrap();
        }
        self.next_desc = (head + u16::try_from(n).unwrap()) % self.size;
        self.offer(head);
        head
    }

    /// Offers `head` in the available ring, whatever it points at.
    pub fn offer(&self, head: u16) {
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

    /// The used ring's flags (bit 0: VRING_USED_F_NO_NOTIFY, the device wants no kicks).
    pub fn used_flags(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(self.used_addr()).unwrap()
    }
}

/// `len` payload bytes following a pattern that starts at `seed`.
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap()))
        .collect()
}

/// Header + `len` payload bytes.
pub fn frame(h: VnetHdr, len: usize, seed: u8) -> Vec<u8> {
    let mut f = h.to_bytes().to_vec();
    f.extend(payload(len, seed));
    f
}

/// An active device over a [`MemTap`], driver queues at [`RX_RING`] and [`TX_RING`].
pub struct Bench<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub net: Net,
    pub tap: MemTap,
    pub rx: Driver<'a>,
    pub tx: Driver<'a>,
    pub irq: Arc<CountingInterrupt>,
}

impl<'a> Bench<'a> {
    /// Negotiates `acked` (masked by what the device offers), queues of `size`.
    pub fn new(mem: &'a GuestMemoryMmap, acked: u64, mtu: Option<u16>, size: u16) -> Self {
        let tap = MemTap::new().unwrap();
        let mut net =
            Net::with_backend(Box::new(tap.clone()), Some([2, 0, 0, 0, 0, 1]), mtu).unwrap();
        net.set_acked_features(acked);
        let rx = Driver::new(mem, RX_RING, size);
        let tx = Driver::new(mem, TX_RING, size);
        let irq = Arc::new(CountingInterrupt::default());
        net.activate(mem.clone(), vec![rx.queue(), tx.queue()], irq.clone())
            .unwrap();
        Bench {
            mem,
            net,
            tap,
            rx,
            tx,
            irq,
        }
    }

    /// Puts `bytes` at `addr` and offers them as one transmit chain split at `cuts`.
    pub fn send(&mut self, addr: u64, bytes: &[u8], cuts: &[usize]) -> u16 {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        let mut descs = vec![];
        let mut at = 0usize;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let len = u32::try_from(c - at).unwrap();
            descs.push((addr + at as u64, len, 0));
            at = c;
        }
        self.tx.add_chain(&descs)
    }

    /// Offers `n` receive chains of one `len`-byte buffer each, from `addr` up.
    pub fn give_rx(&mut self, addr: u64, n: usize, len: u32) {
        for i in 0..n {
            let a = addr + (i as u64) * u64::from(len);
            self.rx.add_chain(&[(
                a,
                len,
                virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE,
            )]);
        }
    }

    /// The counter `name`.
    pub fn counter(&self, name: &str) -> u64 {
        counter(&self.net, name)
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// The counter `name` of `net`.
pub fn counter(net: &Net, name: &str) -> u64 {
    net.metrics()
        .snapshot()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap()
}

/// The header a device writes for a plain received frame in `n` buffers.
pub fn rx_hdr(n: u16) -> [u8; VNET_HDR_LEN] {
    VnetHdr {
        num_buffers: n,
        ..VnetHdr::default()
    }
    .to_bytes()
}
