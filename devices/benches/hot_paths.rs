//! Criterion micro-benchmarks of the device hot paths, on guest memory only (no KVM, no
//! event loop, no disk or socket I/O):
//!
//! - `virtqueue/pop_push_1`: pop one chain from the available ring, walk its descriptors,
//!   put it in the used ring, with the virtio-queue calls the devices make.
//! - `virtqueue/drain_queue_256`: [`drain_queue`], the loop every device runs, over 256
//!   available chains.
//! - `block/parse_read_4k`: [`request::parse`] on a virtio-blk read (16-byte header,
//!   4 KiB device-writable data, status byte).
//! - `vsock/parse_tx_rw_4k`: [`packet::parse_tx`] on a TX chain of a 44-byte RW header and
//!   a 4 KiB payload (the payload is copied out, as the device does).
//! - `vsock/parse_tx_credit_update`: the same on a header-only packet.
//!
//! Run with `cargo bench -p devices --bench hot_paths` (add `-- --quick` for a short run).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use devices::virtio::block::request::{self, RequestType, VIRTIO_BLK_T_IN};
use devices::virtio::queue_handler::{drain_queue, Chain};
use devices::virtio::vsock::packet::{self, Header, Op, HDR_LEN, TYPE_STREAM};
use devices::virtio::vsock::HOST_CID;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: 16 MiB at 0. The rings sit below 1 MiB, buffers from 1 MiB up.
const MEM_SIZE: usize = 0x100_0000;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1_0000;
const USED_RING: u64 = 0x2_0000;
const BUFFERS: u64 = 0x10_0000;
/// Queue size of the block and vsock devices.
const QUEUE_SIZE: u16 = 256;
/// Descriptor flag: chained to `next` (virtio 1.2 §2.7.5).
const NEXT: u16 = 1;
/// Descriptor flag: device-writable (virtio 1.2 §2.7.5).
const WRITE: u16 = 2;
const _: () = assert!(NEXT as u32 == VRING_DESC_F_NEXT && WRITE as u32 == VRING_DESC_F_WRITE);
/// Guest CID of the vsock benches.
const GUEST_CID: u64 = 3;

/// The driver's side of a split virtqueue laid out in its own guest memory.
struct Driver {
    mem: GuestMemoryMmap,
}

impl Driver {
    fn new() -> Driver {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        Driver { mem }
    }

    /// Writes descriptor `idx` of the table (virtio 1.2 §2.7.5: le64 addr, le32 len,
    /// le16 flags, le16 next).
    fn set_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = DESC_TABLE + 16 * u64::from(idx);
        self.mem
            .write_slice(&raw, GuestAddress(at))
            .expect("descriptor");
    }

    /// Writes `descs` (address, length, flags) at table index `start..`, chained with NEXT.
    fn set_chain(&self, start: u16, descs: &[(u64, u32, u16)]) {
        let last = descs.len().saturating_sub(1);
        for (idx, (i, &(addr, len, flags))) in (start..).zip(descs.iter().enumerate()) {
            if i < last {
                self.set_desc(idx, addr, len, flags | NEXT, idx + 1);
            } else {
                self.set_desc(idx, addr, len, flags, 0);
            }
        }
    }

    /// Puts `head` at position `slot` of the available ring.
    fn set_avail_entry(&self, slot: u16, head: u16) {
        let at = AVAIL_RING + 4 + 2 * u64::from(slot % QUEUE_SIZE);
        self.mem
            .write_obj(head, GuestAddress(at))
            .expect("avail entry");
    }

    /// Offers the next `n` ring entries: moves the available index forward by `n`.
    fn publish(&self, n: u16) {
        let at = GuestAddress(AVAIL_RING + 2);
        let idx: u16 = self.mem.read_obj(at).expect("avail idx");
        self.mem
            .write_obj(idx.wrapping_add(n), at)
            .expect("avail idx");
    }

    /// The device's queue over these rings, configured as the transport would.
    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).expect("queue");
        q.set_size(QUEUE_SIZE);
        let half = |a: u64| {
            (
                Some(u32::try_from(a).expect("address below 4 GiB")),
                Some(0),
            )
        };
        let (lo, hi) = half(DESC_TABLE);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = half(AVAIL_RING);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = half(USED_RING);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        assert!(q.is_valid(&self.mem), "queue layout");
        q
    }

    /// Offers `descs` as one chain at table index 0 and pops it, as a device would.
    fn pop_one(&self, descs: &[(u64, u32, u16)]) -> Chain<'_> {
        self.set_chain(0, descs);
        self.set_avail_entry(0, 0);
        self.publish(1);
        let mut q = self.queue();
        let chain = q.iter(&self.mem).expect("avail ring").next();
        chain.expect("a chain")
    }
}

/// A queue of 256 one-descriptor chains (4 KiB device-writable buffers), each ring slot
/// `i` naming head `i`, so re-offering is a bump of the available index.
fn full_ring() -> Driver {
    let drv = Driver::new();
    for i in 0..QUEUE_SIZE {
        drv.set_desc(i, BUFFERS + 0x1000 * u64::from(i), 0x1000, WRITE, 0);
        drv.set_avail_entry(i, i);
    }
    drv
}

/// Bytes a chain offers: what a device walks before it can use a chain.
fn chain_len(chain: Chain<'_>) -> u32 {
    chain.fold(0u32, |n, d| n.wrapping_add(d.len()))
}

fn virtqueue(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtqueue");

    let drv = full_ring();
    let mut q = drv.queue();
    g.throughput(Throughput::Elements(1));
    g.bench_function("pop_push_1", |b| {
        b.iter(|| {
            drv.publish(1);
            let chain = q.iter(&drv.mem).expect("avail ring").next();
            let chain = chain.expect("a chain");
            let head = chain.head_index();
            let len = chain_len(chain);
            q.add_used(&drv.mem, head, black_box(len))
                .expect("used ring");
        });
    });

    let drv = full_ring();
    let mut q = drv.queue();
    g.throughput(Throughput::Elements(u64::from(QUEUE_SIZE)));
    g.bench_function("drain_queue_256", |b| {
        b.iter(|| {
            drv.publish(QUEUE_SIZE);
            let d = drain_queue(&mut q, &drv.mem, chain_len).expect("drain");
            assert_eq!(d.used, u64::from(QUEUE_SIZE));
            black_box(d)
        });
    });
    g.finish();
}

fn block(c: &mut Criterion) {
    const HDR: u64 = BUFFERS;
    const DATA: u64 = BUFFERS + 0x1000;
    const STATUS: u64 = BUFFERS + 0x3000;
    const CAPACITY: u64 = 1 << 30;
    let drv = Driver::new();
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    hdr[8..16].copy_from_slice(&8u64.to_le_bytes());
    drv.mem
        .write_slice(&hdr, GuestAddress(HDR))
        .expect("header");
    let chain = drv.pop_one(&[(HDR, 16, 0), (DATA, 4096, WRITE), (STATUS, 1, WRITE)]);
    let req = request::parse(&drv.mem, chain.clone(), CAPACITY).expect("valid request");
    assert_eq!(req.request_type, RequestType::In);
    assert_eq!((req.sector, req.data_len), (8, 4096));

    let mut g = c.benchmark_group("block");
    g.bench_function("parse_read_4k", |b| {
        b.iter(|| request::parse(&drv.mem, black_box(chain.clone()), CAPACITY))
    });
    g.finish();
}

/// Writes a guest-to-host stream header with `op` and payload length `len` at `at`.
fn vsock_header(drv: &Driver, at: u64, op: Op, len: u32) {
    let hdr = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1024,
        dst_port: 5000,
        len,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    };
    drv.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(at))
        .expect("header");
}

fn vsock(c: &mut Criterion) {
    const HDR: u64 = BUFFERS;
    const PAYLOAD: u64 = BUFFERS + 0x1000;
    let hdr_len = u32::try_from(HDR_LEN).expect("header length");
    let mut data = Vec::with_capacity(packet::MAX_PKT_DATA);
    let mut g = c.benchmark_group("vsock");

    let drv = Driver::new();
    vsock_header(&drv, HDR, Op::Rw, 4096);
    let chain = drv.pop_one(&[(HDR, hdr_len, 0), (PAYLOAD, 4096, 0)]);
    let h = packet::parse_tx(&drv.mem, chain.clone(), GUEST_CID, &mut data).expect("valid");
    assert_eq!((h.op(), data.len()), (Some(Op::Rw), 4096));
    g.throughput(Throughput::Bytes(u64::from(hdr_len) + 4096));
    g.bench_function("parse_tx_rw_4k", |b| {
        b.iter(|| {
            let h = packet::parse_tx(&drv.mem, black_box(chain.clone()), GUEST_CID, &mut data);
            black_box(&data);
            h
        })
    });

    let drv = Driver::new();
    vsock_header(&drv, HDR, Op::CreditUpdate, 0);
    let chain = drv.pop_one(&[(HDR, hdr_len, 0)]);
    let h = packet::parse_tx(&drv.mem, chain.clone(), GUEST_CID, &mut data).expect("valid");
    assert_eq!(h.op(), Some(Op::CreditUpdate));
    g.throughput(Throughput::Bytes(u64::from(hdr_len)));
    g.bench_function("parse_tx_credit_update", |b| {
        b.iter(|| packet::parse_tx(&drv.mem, black_box(chain.clone()), GUEST_CID, &mut data))
    });
    g.finish();
}

criterion_group!(benches, virtqueue, block, vsock);
criterion_main!(benches);
