//! Fuzzes virtio-blk request handling: a guest-controlled descriptor table, available ring
//! and buffers go through `request::parse` + `Request::execute`, and through the whole
//! device queue loop (`Block::process_queue`), against an in-memory disk.
//!
//! Input layout (short inputs are zero-extended):
//!   [0]        options: bit0 read-only disk, bit1 failing disk
//!   [1]        number of available entries (mod 17)
//!   [2..18]    available ring heads (mod 32: indices 16..31 are outside the queue)
//!   [18..146]  16 descriptors of 8 bytes: addr u16, len u16, flags u8, next u8, ext u16
//!              flags: bit0 NEXT, bit1 WRITE, bit2 INDIRECT, bit3 huge length,
//!                     bit4 address beyond guest memory
//!              ext: high bits of addr (addr = ext << 16 | addr)
//!   [146..]    copied into guest memory at PAYLOAD: headers, data, indirect tables
#![no_main]

use std::sync::Arc;

use devices::virtio::block::disk::MemDisk;
use devices::virtio::block::request::{self, RequestType};
use devices::virtio::block::{Block, MAX_REQUEST_BYTES, SECTOR_SIZE};
use devices::virtio::{VirtioDevice, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x4_0000;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const PAYLOAD: u64 = 0x1000;
const DISK_SIZE: usize = 16 * 1024;

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
    // Descriptors.
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
    // Available ring: flags 0, idx, ring.
    let count = u16::from(byte(data, 1) % 17);
    mem.write_obj(count, GuestAddress(AVAIL + 2)).unwrap();
    for i in 0..QUEUE_SIZE {
        let head = u16::from(byte(data, 2 + usize::from(i)) % 32);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
            .unwrap();
    }
    if let Some(payload) = data.get(146..) {
        let n = payload.len().min(MEM_SIZE - PAYLOAD as usize);
        mem.write_slice(&payload[..n], GuestAddress(PAYLOAD))
            .unwrap();
    }
    mem
}

fn queue() -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    q
}

fn disk(opts: u8) -> MemDisk {
    let mut d = MemDisk::new(DISK_SIZE);
    d.fail = opts & 2 != 0;
    d
}

fuzz_target!(|data: &[u8]| {
    let opts = byte(data, 0);
    let read_only = opts & 1 != 0;
    let capacity = DISK_SIZE as u64;

    // 1. The parser and executor on their own, with invariants on what parse accepts.
    let mem = build_memory(data);
    let mut q = queue();
    let mut d = disk(opts);
    let serial = *b"fuzz-serial-0123456\0";
    let chains: Vec<_> = match q.iter(&mem) {
        Ok(it) => it.collect(),
        Err(_) => Vec::new(),
    };
    for chain in chains {
        if chain.head_index() >= QUEUE_SIZE {
            continue;
        }
        match request::parse(&mem, chain, capacity) {
            Ok(req) => {
                assert!(req.data_len <= MAX_REQUEST_BYTES);
                if matches!(req.request_type, RequestType::In | RequestType::Out) {
                    assert!(req.data_len > 0 && req.data_len % SECTOR_SIZE == 0);
                    assert!(req.sector * SECTOR_SIZE + req.data_len <= capacity);
                }
                let r = req.execute(&mem, &mut d, read_only, &serial);
                if let Ok(n) = r {
                    assert!(u64::from(n) <= req.data_len);
                }
            }
            Err(rejected) => {
                assert_eq!(rejected.status.is_some(), rejected.error.status().is_some());
            }
        }
    }

    // 2. The whole device: queue loop, status writes, used ring.
    let mem = build_memory(data);
    let mut block = Block::with_disk(Box::new(disk(opts)), read_only, None).unwrap();
    block
        .activate(mem.clone(), vec![queue()], Arc::new(NoInterrupt))
        .unwrap();
    block.process_queue();
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert!(used_idx <= u16::from(byte(data, 1) % 17));
});
