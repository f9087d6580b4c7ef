//! Transport save/restore with a real device (virtio-blk over an in-memory disk, and over
//! a file): a request submitted after restore is served at the right ring index, pending
//! interrupts are raised again, and bad states are refused.

use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::block::request::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use crate::virtio::block::{Block, BlockRestoreError, MemDisk};
use crate::virtio::rng::Rng;
use crate::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use crate::virtio::test_utils::{desc, drive_transport, mem, TestQueue};

const W: u32 = VRING_DESC_F_WRITE;
const DISK: usize = 64 * 1024;
const FEATURES: u64 = 1 << 32;

fn disk() -> MemDisk {
    let mut d = MemDisk::new(DISK);
    for (i, b) in d.data.iter_mut().enumerate() {
        *b = u8::try_from(i / 512).unwrap();
    }
    d
}

/// Offers request `k`: read sector `k` into a per-request buffer. Returns the status
/// address.
fn read_request(m: &GuestMemoryMmap, tq: &TestQueue, k: u16) -> GuestAddress {
    let hdr = 0x40_0000 + u64::from(k) * 0x1000;
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..].copy_from_slice(&u64::from(k).to_le_bytes());
    m.write_slice(&h, GuestAddress(hdr)).unwrap();
    m.write_obj(0xffu8, GuestAddress(hdr + 0x800)).unwrap();
    tq.add_chain(
        k * 3,
        &[
            desc(hdr, 16, 0),
            desc(hdr + 0x200, 512, W),
            desc(hdr + 0x800, 1, W),
        ],
    );
    GuestAddress(hdr + 0x800)
}

fn sector_read(m: &GuestMemoryMmap, k: u16) -> u8 {
    m.read_obj(GuestAddress(0x40_0000 + u64::from(k) * 0x1000 + 0x200))
        .unwrap()
}

fn reg(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

struct Running {
    block: Arc<Mutex<Block>>,
    t: MmioTransport,
}

/// A block device driven to DRIVER_OK that has served `served` requests.
fn running_block(m: &GuestMemoryMmap, tq: &TestQueue, served: u16) -> Running {
    let block = Arc::new(Mutex::new(
        Block::with_disk(Box::new(disk()), false, Some("snap".into())).unwrap(),
    ));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(block.clone(), m.clone(), irq).unwrap();
    let st = drive_transport(&mut t, FEATURES, &[tq.queue()]);
    assert_eq!(st, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    for k in 0..served {
        read_request(m, tq, k);
    }
    block.lock().unwrap().process_queue();
    assert_eq!(tq.used_idx(), served);
    Running { block, t }
}

#[test]
fn a_request_after_restore_is_served_at_the_next_index() {
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    let old = running_block(&m, &tq, 3);
    let dev_state = old.block.lock().unwrap().save_state();
    let t_state = old.t.save_state();
    assert_eq!(dev_state.queues.as_ref().unwrap()[0].next_avail, 3);
    assert_eq!(dev_state.serial.as_deref(), Some("snap"));
    assert_eq!(
        t_state.interrupt_status,
        crate::virtio::INTERRUPT_USED_BUFFER
    );
    assert_eq!(t_state.queues[0].size, 256);
    drop(old);

    let block = Arc::new(Mutex::new(
        Block::restore_with_disk(&dev_state, Box::new(disk())).unwrap(),
    ));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::restore(
        block.clone(),
        m.clone(),
        irq.try_clone().unwrap(),
        &t_state,
        dev_state.queues.as_deref(),
    )
    .unwrap();
    assert_eq!(
        reg(&mut t, 0x70),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert_eq!(reg(&mut t, 0x60), crate::virtio::INTERRUPT_USED_BUFFER);
    assert_eq!(
        irq.read().unwrap(),
        1,
        "the pending interrupt is raised again"
    );
    assert!(block.lock().unwrap().is_activated());
    assert_eq!(block.lock().unwrap().acked_features(), FEATURES);
    assert_eq!(t.save_state(), t_state, "the registers are back as saved");

    let status = read_request(&m, &tq, 3);
    block.lock().unwrap().process_queue();
    assert_eq!(tq.used_idx(), 4);
    assert_eq!(tq.used_elem(3), (9, 513), "head 9, data + status");
    assert_eq!(m.read_obj::<u8>(status).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(sector_read(&m, 3), 3);
    // Driver reset still works on a restored transport.
    t.write(0x70, &0u32.to_le_bytes());
    assert!(!block.lock().unwrap().is_activated());
}

#[test]
fn a_state_saved_mid_setup_lets_the_driver_finish() {
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    let block = Arc::new(Mutex::new(
        Block::with_disk(Box::new(disk()), false, None).unwrap(),
    ));
    let mut t = MmioTransport::new(block.clone(), m.clone(), EventFd::new(0).unwrap()).unwrap();
    t.write(0x70, &ACKNOWLEDGE.to_le_bytes());
    t.write(0x70, &(ACKNOWLEDGE | DRIVER).to_le_bytes());
    let (ds, ts) = (block.lock().unwrap().save_state(), t.save_state());
    assert!(ds.queues.is_none());

    let block = Arc::new(Mutex::new(
        Block::restore_with_disk(&ds, Box::new(disk())).unwrap(),
    ));
    let mut t = MmioTransport::restore(
        block.clone(),
        m.clone(),
        EventFd::new(0).unwrap(),
        &ts,
        None,
    )
    .unwrap();
    assert!(!block.lock().unwrap().is_activated());
    assert_eq!(reg(&mut t, 0x70), ACKNOWLEDGE | DRIVER);
    let st = drive_transport(&mut t, FEATURES, &[tq.queue()]);
    assert_eq!(st & DRIVER_OK, DRIVER_OK);
    read_request(&m, &tq, 0);
    block.lock().unwrap().process_queue();
    assert_eq!(tq.used_idx(), 1);
}

#[test]
fn bad_states_are_refused() {
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    let old = running_block(&m, &tq, 1);
    let ds = old.block.lock().unwrap().save_state();
    let ts = old.t.save_state();
    let pos = ds.queues.clone().unwrap();
    let fresh = || -> Arc<Mutex<Block>> {
        Arc::new(Mutex::new(
            Block::restore_with_disk(&ds, Box::new(disk())).unwrap(),
        ))
    };
    let restore =
        |dev: Arc<Mutex<dyn VirtioDevice>>, ts: &MmioState, pos: Option<&[QueuePosition]>| {
            MmioTransport::restore(dev, m.clone(), EventFd::new(0).unwrap(), ts, pos).map(|_| ())
        };

    let rng: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Rng::new().unwrap()));
    assert!(matches!(
        restore(rng, &ts, Some(&pos)),
        Err(MmioRestoreError::DeviceType {
            saved: 2,
            actual: 4
        })
    ));
    assert!(matches!(
        restore(fresh(), &ts, None),
        Err(MmioRestoreError::Positions {
            expected: 1,
            got: 0
        })
    ));
    let mut bad = ts.clone();
    bad.driver_features |= 1 << 60;
    assert!(matches!(
        restore(fresh(), &bad, Some(&pos)),
        Err(MmioRestoreError::Features { .. })
    ));
    let mut bad = ts.clone();
    bad.queues[0].desc = 0x1_0000_0000;
    assert!(matches!(
        restore(fresh(), &bad, Some(&pos)),
        Err(MmioRestoreError::Queue(TransportError::QueueMemory {
            index: 0
        }))
    ));
    let mut bad = ts.clone();
    bad.queues[0].size = 300;
    assert!(matches!(
        restore(fresh(), &bad, Some(&pos)),
        Err(MmioRestoreError::Queue(TransportError::QueueConfig { .. }))
    ));
    let mut bad = ts.clone();
    bad.queues.push(QueueConfigState::default());
    assert!(matches!(
        restore(fresh(), &bad, Some(&pos)),
        Err(MmioRestoreError::QueueCount {
            saved: 2,
            actual: 1
        })
    ));
    let mut bad = ts.clone();
    bad.status = DRIVER_OK;
    assert!(matches!(
        restore(fresh(), &bad, Some(&pos)),
        Err(MmioRestoreError::Status(_))
    ));
}

#[test]
fn a_block_device_reopens_its_image_by_path() {
    let img = TempFile::new().unwrap();
    std::fs::write(img.as_path(), vec![7u8; DISK]).unwrap();
    let b = Block::new(img.as_path(), true, None).unwrap();
    let s = b.save_state();
    assert_eq!(s.path.as_deref(), Some(img.as_path()));
    assert!(s.read_only && s.serial.is_none());
    let again = Block::restore(&s, None).unwrap();
    assert_eq!(again.save_state(), s);

    // Another path can be given; a resized image is refused with both sizes.
    let other = TempFile::new().unwrap();
    std::fs::write(other.as_path(), vec![0u8; 2 * DISK]).unwrap();
    let Err(e) = Block::restore(&s, Some(other.as_path())) else {
        panic!("a resized image must be refused");
    };
    assert!(matches!(
        e,
        BlockRestoreError::Capacity {
            saved: 128,
            actual: 256,
            ..
        }
    ));
    assert!(e
        .to_string()
        .contains(&other.as_path().display().to_string()));
    let mut s2 = s.clone();
    s2.path = None;
    assert!(matches!(
        Block::restore(&s2, None),
        Err(BlockRestoreError::NoPath)
    ));
}
