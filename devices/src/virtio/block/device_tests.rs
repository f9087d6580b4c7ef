//! Unit tests of the virtio-blk device: requests through a real queue against a temp file,
//! counters, the event loop, and the whole path through the MMIO transport.

use super::*;
use crate::bus::BusDevice;
use crate::virtio::block::disk::MemDisk;
use crate::virtio::block::request::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::virtio::block::SEG_MAX;
use crate::virtio::test_utils::{desc, mem, CountingInterrupt, TestQueue};
use crate::virtio::{MmioTransport, INTERRUPT_USED_BUFFER};
use event_manager::{EventManager, SubscriberOps};
use std::sync::Mutex;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Address, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

const W: u32 = VRING_DESC_F_WRITE;
const DISK_LEN: usize = 64 * 1024;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i % 253).unwrap()).collect()
}

/// A temp file holding `pattern(DISK_LEN)`.
fn image() -> TempFile {
    let t = TempFile::new().unwrap();
    std::fs::write(t.as_path(), pattern(DISK_LEN)).unwrap();
    t
}

/// Puts request `slot` on the queue: header and status live at a per-slot address, the
/// descriptors at table index `slot * 16`. Returns the status address.
fn submit(
    m: &GuestMemoryMmap,
    tq: &TestQueue,
    slot: u16,
    t: u32,
    sector: u64,
    data: &[(u64, u32, u32)],
) -> GuestAddress {
    let hdr = GuestAddress(0x40_0000 + u64::from(slot) * 0x100);
    let status = hdr.unchecked_add(0x80);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, hdr).unwrap();
    m.write_obj(0xffu8, status).unwrap();
    let mut descs = vec![desc(hdr.0, 16, 0)];
    descs.extend_from_slice(data);
    descs.push(desc(status.0, 1, W));
    tq.add_chain(slot * 16, &descs);
    status
}

fn status(m: &GuestMemoryMmap, at: GuestAddress) -> u8 {
    m.read_obj(at).unwrap()
}

fn activate(block: &mut Block, m: &GuestMemoryMmap, tq: &TestQueue) -> Arc<CountingInterrupt> {
    let irq = Arc::new(CountingInterrupt::default());
    block
        .activate(m.clone(), vec![tq.queue()], irq.clone())
        .unwrap();
    irq
}

fn counter(block: &Block, name: &str) -> u64 {
    block
        .metrics()
        .snapshot()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap()
}

#[test]
fn write_then_read_round_trip_through_a_file() {
    let img = image();
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    let mut block = Block::new(img.as_path(), false, None).unwrap();
    assert_eq!(block.capacity_sectors(), (DISK_LEN / 512) as u64);
    let irq = activate(&mut block, &m, &tq);

    let payload: Vec<u8> = (0..1024)
        .map(|i| u8::try_from(255 - i % 256).unwrap())
        .collect();
    m.write_slice(&payload, GuestAddress(0x10_0000)).unwrap();
    // Two data segments for the write, one for the read.
    let s0 = submit(
        &m,
        &tq,
        0,
        VIRTIO_BLK_T_OUT,
        4,
        &[desc(0x10_0000, 512, 0), desc(0x10_0200, 512, 0)],
    );
    let s1 = submit(&m, &tq, 1, VIRTIO_BLK_T_IN, 4, &[desc(0x20_0000, 1024, W)]);
    block.process_queue();

    assert_eq!(status(&m, s0), VIRTIO_BLK_S_OK);
    assert_eq!(status(&m, s1), VIRTIO_BLK_S_OK);
    assert_eq!(tq.used_elem(0), (0, 1), "write: status byte only");
    assert_eq!(tq.used_elem(1), (16, 1025), "read: data + status");
    let mut back = vec![0u8; 1024];
    m.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(back, payload);
    let file = std::fs::read(img.as_path()).unwrap();
    assert_eq!(file[2048..3072], payload[..]);
    assert_eq!(file[..2048], pattern(DISK_LEN)[..2048], "rest untouched");
    assert_eq!(irq.used_count(), 1, "one interrupt for the batch");
    assert_eq!(counter(&block, "bytes_written"), 1024);
    assert_eq!(counter(&block, "bytes_read"), 1024);
}

#[test]
fn bad_requests_get_ioerr_or_are_dropped() {
    let img = image();
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    let mut block = Block::new(img.as_path(), false, None).unwrap();
    let _irq = activate(&mut block, &m, &tq);
    let sectors = block.capacity_sectors();

    let out_of_range = submit(
        &m,
        &tq,
        0,
        VIRTIO_BLK_T_IN,
        sectors,
        &[desc(0x10_0000, 512, W)],
    );
    let wrong_dir = submit(&m, &tq, 1, VIRTIO_BLK_T_IN, 0, &[desc(0x10_0000, 512, 0)]);
    let unsupported = submit(&m, &tq, 2, 13, 0, &[]);
    // Header only: no status descriptor.
    m.write_slice(&[0u8; 16], GuestAddress(0x50_0000)).unwrap();
    tq.add_chain(3 * 16, &[desc(0x50_0000, 16, 0)]);
    block.process_queue();

    assert_eq!(status(&m, out_of_range), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&m, wrong_dir), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&m, unsupported), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(tq.used_idx(), 4);
    assert_eq!(tq.used_elem(0), (0, 1));
    assert_eq!(tq.used_elem(3), (48, 0), "dropped chain is returned empty");
    assert_eq!(counter(&block, "invalid_requests"), 2);
    assert_eq!(counter(&block, "unsupported_requests"), 1);
    assert_eq!(counter(&block, "dropped_chains"), 1);
    let mut buf = [0u8; 512];
    m.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(buf, [0u8; 512], "nothing read into the buffer");
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_the_file() {
    let img = image();
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    let mut block = Block::new(img.as_path(), true, None).unwrap();
    assert_ne!(block.avail_features() & feature(VIRTIO_BLK_F_RO), 0);
    let _irq = activate(&mut block, &m, &tq);
    m.write_slice(&[0x5a; 512], GuestAddress(0x10_0000))
        .unwrap();
    let w = submit(&m, &tq, 0, VIRTIO_BLK_T_OUT, 0, &[desc(0x10_0000, 512, 0)]);
    let f = submit(&m, &tq, 1, VIRTIO_BLK_T_FLUSH, 0, &[]);
    let r = submit(&m, &tq, 2, VIRTIO_BLK_T_IN, 1, &[desc(0x20_0000, 512, W)]);
    block.process_queue();
    assert_eq!(status(&m, w), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&m, f), VIRTIO_BLK_S_OK);
    assert_eq!(status(&m, r), VIRTIO_BLK_S_OK);
    assert_eq!(std::fs::read(img.as_path()).unwrap(), pattern(DISK_LEN));
    let mut buf = vec![0u8; 512];
    m.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(buf, pattern(DISK_LEN)[512..1024]);
    assert_eq!(counter(&block, "read_only_refusals"), 1);
}

#[test]
fn get_id_and_flush() {
    let img = image();
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    let mut block = Block::new(img.as_path(), false, Some("vm42-root".into())).unwrap();
    assert_eq!(block.avail_features() & feature(VIRTIO_BLK_F_RO), 0);
    let _irq = activate(&mut block, &m, &tq);
    m.write_slice(&[0xee; 20], GuestAddress(0x10_0000)).unwrap();
    let g = submit(
        &m,
        &tq,
        0,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[desc(0x10_0000, 20, W)],
    );
    let f = submit(&m, &tq, 1, VIRTIO_BLK_T_FLUSH, 0, &[]);
    block.process_queue();
    assert_eq!(status(&m, g), VIRTIO_BLK_S_OK);
    assert_eq!(status(&m, f), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(&id[..9], b"vm42-root");
    assert_eq!(id[9..], [0u8; 11]);
    assert_eq!(tq.used_elem(0), (0, 21));
    assert_eq!(counter(&block, "flush_requests"), 1);
}

#[test]
fn construction_errors() {
    let e = Block::new(std::path::Path::new("/nonexistent/disk.img"), false, None)
        .err()
        .unwrap();
    assert!(matches!(e, BlockError::Open { .. }));
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    let e = Block::with_disk(Box::new(MemDisk::new(512)), false, Some("x".repeat(21)))
        .err()
        .unwrap();
    assert!(matches!(e, BlockError::SerialTooLong(21)));
    assert!(Block::with_disk(Box::new(MemDisk::new(512)), false, Some("y".repeat(20))).is_ok());
}

#[test]
fn config_space_and_features() {
    // A disk whose size is not a multiple of 512 exposes whole sectors only.
    let mut block = Block::with_disk(Box::new(MemDisk::new(4096 + 100)), false, None).unwrap();
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    let mut b = [0u8; 4];
    block.read_config(12, &mut b);
    assert_eq!(u32::from_le_bytes(b), SEG_MAX);
    block.read_config(1000, &mut b);
    assert_eq!(b, [0; 4]);
    block.write_config(0, &[0xff; 8]);
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8, "config is read-only");
    block.set_acked_features(u64::MAX);
    assert_eq!(block.acked_features(), block.avail_features());
    block.reset();
    assert_eq!(block.acked_features(), 0);
}

#[test]
fn activation_rules() {
    let m = mem();
    let tq = TestQueue::new(&m, 16);
    let mut block = Block::with_disk(Box::new(MemDisk::new(4096)), false, None).unwrap();
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(CountingInterrupt::default());
    assert!(matches!(
        block.activate(m.clone(), vec![tq.queue(), tq.queue()], irq.clone()),
        Err(ActivateError::QueueCount {
            expected: 1,
            got: 2
        })
    ));
    assert!(!block.is_activated());
    block
        .activate(m.clone(), vec![tq.queue()], irq.clone())
        .unwrap();
    assert_eq!(block.activate_evt().read().unwrap(), 1);
    assert!(matches!(
        block.activate(m.clone(), vec![tq.queue()], irq),
        Err(ActivateError::AlreadyActivated)
    ));
    block.reset();
    assert!(!block.is_activated());
    // Inactive: processing does nothing.
    submit(&m, &tq, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    block.process_queue();
    assert_eq!(tq.used_idx(), 0);
}

/// Runs one scenario per counter family, across devices, and checks that every declared
/// counter moved at least once: dead counters are a defect.
#[test]
fn every_counter_is_incremented_by_some_scenario() {
    let m = mem();
    let mut totals: Vec<(&'static str, u64)> = vec![];
    let mut add = |b: &Block| {
        for (i, (name, v)) in b.metrics().snapshot().into_iter().enumerate() {
            if totals.len() <= i {
                totals.push((name, 0));
            }
            totals[i].1 += v;
        }
    };

    // Healthy disk: every request type, a bad request, a dropped chain, a bad head.
    let tq = TestQueue::new(&m, 256);
    let mut b =
        Block::with_disk(Box::new(MemDisk::new(DISK_LEN)), false, Some("s".into())).unwrap();
    let _irq = activate(&mut b, &m, &tq);
    submit(&m, &tq, 0, VIRTIO_BLK_T_IN, 0, &[desc(0x10_0000, 512, W)]);
    submit(&m, &tq, 1, VIRTIO_BLK_T_OUT, 0, &[desc(0x10_0000, 512, 0)]);
    submit(&m, &tq, 2, VIRTIO_BLK_T_FLUSH, 0, &[]);
    submit(
        &m,
        &tq,
        3,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[desc(0x10_0000, 20, W)],
    );
    submit(
        &m,
        &tq,
        4,
        VIRTIO_BLK_T_IN,
        1 << 40,
        &[desc(0x10_0000, 512, W)],
    );
    submit(&m, &tq, 5, 99, 0, &[]);
    tq.add_chain(6 * 16, &[desc(0x10_0000, 16, 0)]);
    tq.add_raw_head(1000);
    b.process_queue();
    // An avail index running far ahead: a queue error.
    m.write_obj(1000u16, tq.avail_addr().unchecked_add(2))
        .unwrap();
    b.process_queue();
    add(&b);

    // Failing backend: I/O error. Read-only: refused write.
    for (disk_fails, read_only) in [(true, false), (false, true)] {
        let tq = TestQueue::new(&m, 256);
        let mut disk = MemDisk::new(DISK_LEN);
        disk.fail = disk_fails;
        let mut b = Block::with_disk(Box::new(disk), read_only, None).unwrap();
        let _irq = activate(&mut b, &m, &tq);
        submit(&m, &tq, 0, VIRTIO_BLK_T_OUT, 0, &[desc(0x10_0000, 512, 0)]);
        b.process_queue();
        add(&b);
    }

    assert_eq!(totals.len(), 13);
    for (name, v) in totals {
        assert!(v > 0, "counter {name} never incremented");
    }
}

#[test]
fn event_loop_processes_after_activation() {
    let img = image();
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    let block = Arc::new(Mutex::new(Block::new(img.as_path(), false, None).unwrap()));
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(block.clone());
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);

    let s0 = submit(&m, &tq, 0, VIRTIO_BLK_T_IN, 0, &[desc(0x10_0000, 512, W)]);
    let irq = Arc::new(CountingInterrupt::default());
    block
        .lock()
        .unwrap()
        .activate(m.clone(), vec![tq.queue()], irq.clone())
        .unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(status(&m, s0), VIRTIO_BLK_S_OK);

    let s1 = submit(&m, &tq, 1, VIRTIO_BLK_T_FLUSH, 0, &[]);
    block.lock().unwrap().queue_events()[0].write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(status(&m, s1), VIRTIO_BLK_S_OK);
    assert_eq!(irq.used_count(), 2);
}

/// The VMM's view: a guest driver programs the transport over MMIO, notifies through
/// QueueNotify (no ioeventfd), the event loop serves the request, the irqfd fires.
#[test]
fn guest_driver_through_transport_and_event_loop() {
    use crate::virtio::status::*;
    let img = image();
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    let block = Arc::new(Mutex::new(Block::new(img.as_path(), false, None).unwrap()));
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(block.clone(), m.clone(), irqfd.try_clone().unwrap()).unwrap();
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(block.clone());

    let mut w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(0x70, ACKNOWLEDGE);
    w(0x70, ACKNOWLEDGE | DRIVER);
    w(0x24, 1);
    w(0x20, 1); // VIRTIO_F_VERSION_1
    w(0x24, 0);
    w(0x20, 1 << VIRTIO_BLK_F_FLUSH);
    w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    w(0x30, 0);
    w(0x38, 256);
    let mut q = tq.queue();
    use virtio_queue::QueueT;
    for (reg, addr) in [
        (0x80, q.desc_table()),
        (0x90, q.avail_ring()),
        (0xa0, q.used_ring()),
    ] {
        w(reg, u32::try_from(addr & 0xffff_ffff).unwrap());
        w(reg + 4, u32::try_from(addr >> 32).unwrap());
    }
    q.set_ready(false);
    w(0x44, 1);
    w(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let mut st = [0u8; 4];
    t.read(0x70, &mut st);
    assert_eq!(
        u32::from_le_bytes(st),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert_eq!(
        block.lock().unwrap().acked_features(),
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BLK_F_FLUSH)
    );
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK_LEN / 512) as u64);

    assert_eq!(em.run_with_timeout(100).unwrap(), 1, "activation event");
    let s = submit(&m, &tq, 0, VIRTIO_BLK_T_IN, 2, &[desc(0x10_0000, 512, W)]);
    t.write(0x50, &0u32.to_le_bytes());
    assert_eq!(em.run_with_timeout(100).unwrap(), 1, "queue event");
    assert_eq!(status(&m, s), VIRTIO_BLK_S_OK);
    let mut buf = vec![0u8; 512];
    m.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(buf, pattern(DISK_LEN)[1024..1536]);
    assert_eq!(irqfd.read().unwrap(), 1);
    let mut isr = [0u8; 4];
    t.read(0x60, &mut isr);
    assert_eq!(u32::from_le_bytes(isr), INTERRUPT_USED_BUFFER);
}
