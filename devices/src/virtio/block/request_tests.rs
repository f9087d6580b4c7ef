//! Unit tests of virtio-blk request parsing and execution, with no device and no KVM.

use super::*;
use crate::virtio::block::disk::MemDisk;
use crate::virtio::test_utils::{desc, mem, TestQueue};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::QueueOwnedT;

const W: u32 = VRING_DESC_F_WRITE;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const CAP: u64 = 1 << 20;

fn header(m: &GuestMemoryMmap, addr: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(addr)).unwrap();
}

/// Lays out `descs` as chain 0 of a fresh 256-entry queue and parses it.
fn parse_descs(m: &GuestMemoryMmap, descs: &[(u64, u32, u32)]) -> Result<Request, Rejected> {
    let tq = TestQueue::new(m, 256);
    tq.add_chain(0, descs);
    parse_head(m, &tq)
}

fn parse_head(m: &GuestMemoryMmap, tq: &TestQueue) -> Result<Request, Rejected> {
    let mut q = tq.queue();
    let chain = q.iter(m).unwrap().next().unwrap();
    parse(m, chain, CAP)
}

/// The rejection reason, asserting the status address is `STATUS` (answerable).
fn rejected(r: Result<Request, Rejected>) -> RequestError {
    let e = r.unwrap_err();
    assert_eq!(e.status, Some(GuestAddress(STATUS)), "{:?}", e.error);
    e.error
}

/// The rejection reason, asserting it cannot be answered.
fn dropped(r: Result<Request, Rejected>) -> RequestError {
    let e = r.unwrap_err();
    assert_eq!(e.status, None, "{:?}", e.error);
    assert_eq!(e.error.status(), None);
    e.error
}

#[test]
fn canonical_read() {
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 3);
    let r = parse_descs(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(
        r,
        Request {
            request_type: RequestType::In,
            sector: 3,
            data: vec![Segment {
                addr: GuestAddress(DATA),
                len: 1024
            }],
            data_len: 1024,
            status: GuestAddress(STATUS),
        }
    );
}

#[test]
fn any_layout_header_with_data_and_data_with_status() {
    let m = mem();
    // OUT: header and data share one readable descriptor.
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let r = parse_descs(&m, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)]).unwrap();
    assert_eq!(r.request_type, RequestType::Out);
    assert_eq!(
        r.data,
        vec![Segment {
            addr: GuestAddress(HDR + 16),
            len: 512
        }]
    );
    // IN: data and status share one writable descriptor; the status is its last byte.
    // The header is split over two descriptors.
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let r = parse_descs(
        &m,
        &[desc(HDR, 8, 0), desc(HDR + 8, 8, 0), desc(DATA, 513, W)],
    )
    .unwrap();
    assert_eq!(r.request_type, RequestType::In);
    assert_eq!(r.data_len, 512);
    assert_eq!(r.status, GuestAddress(DATA + 512));
}

#[test]
fn zero_length_descriptors_are_ignored() {
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let r = parse_descs(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(0, 0, 0),
            desc(DATA, 512, W),
            desc(0xffff_ffff_0000, 0, W),
            desc(STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(r.data.len(), 1);
    assert_eq!(r.data_len, 512);
}

#[test]
fn missing_status_drops_the_chain() {
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // Last descriptor is device-readable.
    let e = dropped(parse_descs(&m, &[desc(HDR, 16, 0), desc(DATA, 512, 0)]));
    assert!(matches!(e, RequestError::NoStatus));
    // Only a header.
    let e = dropped(parse_descs(&m, &[desc(HDR, 16, 0)]));
    assert!(matches!(e, RequestError::NoStatus));
    // Last descriptor writable but empty.
    let e = dropped(parse_descs(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 0, W)],
    ));
    assert!(matches!(e, RequestError::NoStatus));
    // Status outside guest memory, and at the very top of the address space.
    let e = dropped(parse_descs(
        &m,
        &[desc(HDR, 16, 0), desc(0x1_0000_0000, 1, W)],
    ));
    assert!(matches!(e, RequestError::NoStatus));
    let e = dropped(parse_descs(&m, &[desc(HDR, 16, 0), desc(u64::MAX, 2, W)]));
    assert!(matches!(e, RequestError::NoStatus));
}

#[test]
fn descriptor_loop_and_bad_next_are_broken_chains() {
    let m = mem();
    let tq = TestQueue::new(&m, 16);
    let next = u16::try_from(VRING_DESC_F_NEXT).unwrap();
    let w = u16::try_from(W).unwrap();
    // 0 -> 1 -> 0 -> ...: virtio-queue's TTL stops it after 16 descriptors.
    tq.set_desc(0, HDR, 16, next, 1);
    tq.set_desc(1, STATUS, 1, next | w, 0);
    tq.add_raw_head(0);
    assert!(matches!(
        dropped(parse_head(&m, &tq)),
        RequestError::BrokenChain
    ));
    // Next index beyond the table.
    let tq = TestQueue::new(&m, 16);
    tq.set_desc(0, HDR, 16, next, 100);
    tq.add_raw_head(0);
    assert!(matches!(
        dropped(parse_head(&m, &tq)),
        RequestError::BrokenChain
    ));
}

#[test]
fn empty_indirect_table_is_an_empty_chain() {
    let m = mem();
    let tq = TestQueue::new(&m, 16);
    tq.set_desc(0, DATA, 0, u16::try_from(VRING_DESC_F_INDIRECT).unwrap(), 0);
    tq.add_raw_head(0);
    assert!(matches!(
        dropped(parse_head(&m, &tq)),
        RequestError::EmptyChain
    ));
}

#[test]
fn too_many_descriptors_is_an_error_not_an_allocation() {
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![desc(HDR, 16, 0)];
    for i in 0..MAX_DESCRIPTORS as u64 {
        descs.push(desc(DATA + i * 512, 512, W));
    }
    descs.push(desc(STATUS, 1, W));
    assert!(matches!(
        rejected(parse_descs(&m, &descs)),
        RequestError::TooManyDescriptors
    ));
    // One fewer data segment is exactly the limit and parses.
    descs.remove(1);
    descs.remove(1);
    assert_eq!(descs.len(), MAX_DESCRIPTORS);
    assert!(parse_descs(&m, &descs).is_ok());
}

#[test]
fn huge_indirect_chain_is_dropped_without_walking_it_all() {
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // An indirect table of 4096 descriptors: header, 4094 data, status.
    let table = 0x80_0000u64;
    let n: u16 = 4096;
    let next = u16::try_from(VRING_DESC_F_NEXT).unwrap();
    let w = u16::try_from(W).unwrap();
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, next),
            i if i == n - 1 => (STATUS, 1, w),
            _ => (DATA, 512, next | w),
        };
        let d = virtio_queue::desc::split::Descriptor::new(addr, len, flags, i + 1);
        m.write_obj(
            virtio_queue::desc::RawDescriptor::from(d),
            GuestAddress(table + 16 * u64::from(i)),
        )
        .unwrap();
    }
    let tq = TestQueue::new(&m, 16);
    let indirect = u16::try_from(VRING_DESC_F_INDIRECT).unwrap();
    tq.set_desc(0, table, u32::from(n) * 16, indirect, 0);
    tq.add_raw_head(0);
    assert!(matches!(
        dropped(parse_head(&m, &tq)),
        RequestError::ChainTooLong
    ));
}

#[test]
fn readable_after_writable_is_refused() {
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let e = rejected(parse_descs(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(DATA + 512, 512, 0),
            desc(STATUS, 1, W),
        ],
    ));
    assert!(matches!(e, RequestError::BadOrder));
}

#[test]
fn short_header() {
    let m = mem();
    let e = rejected(parse_descs(&m, &[desc(HDR, 15, 0), desc(STATUS, 1, W)]));
    assert!(matches!(e, RequestError::ShortHeader));
    // No readable bytes at all.
    let e = rejected(parse_descs(&m, &[desc(DATA, 512, W), desc(STATUS, 1, W)]));
    assert!(matches!(e, RequestError::ShortHeader));
    // Header outside guest memory.
    let e = rejected(parse_descs(
        &m,
        &[desc(0x7000_0000, 16, 0), desc(STATUS, 1, W)],
    ));
    assert!(matches!(e, RequestError::Memory));
}

#[test]
fn unknown_type_is_unsupported() {
    let m = mem();
    for t in [2u32, 11, 13, 99, u32::MAX] {
        header(&m, HDR, t, 0);
        let e = rejected(parse_descs(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]));
        assert!(matches!(e, RequestError::Unsupported(x) if x == t));
        assert_eq!(e.status(), Some(VIRTIO_BLK_S_UNSUPP));
    }
}

#[test]
fn wrong_data_direction() {
    let m = mem();
    let cases = [
        // IN with device-readable data.
        (VIRTIO_BLK_T_IN, vec![desc(HDR, 16, 0), desc(DATA, 512, 0)]),
        // OUT with device-writable data.
        (VIRTIO_BLK_T_OUT, vec![desc(HDR, 16, 0), desc(DATA, 512, W)]),
        // FLUSH with data either way.
        (
            VIRTIO_BLK_T_FLUSH,
            vec![desc(HDR, 16, 0), desc(DATA, 512, W)],
        ),
        (VIRTIO_BLK_T_FLUSH, vec![desc(HDR, 16 + 512, 0)]),
        // GET_ID with device-readable data.
        (VIRTIO_BLK_T_GET_ID, vec![desc(HDR, 36, 0)]),
    ];
    for (t, mut descs) in cases {
        header(&m, HDR, t, 0);
        descs.push(desc(STATUS, 1, W));
        let e = rejected(parse_descs(&m, &descs));
        assert!(matches!(e, RequestError::WrongDirection), "type {t}: {e:?}");
        assert_eq!(e.status(), Some(VIRTIO_BLK_S_IOERR));
    }
}

#[test]
fn zero_unaligned_and_huge_lengths() {
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let e = rejected(parse_descs(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]));
    assert!(matches!(e, RequestError::BadLength(0)));
    let e = rejected(parse_descs(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)],
    ));
    assert!(matches!(e, RequestError::BadLength(100)));
    // 256 MiB, twice the per-request cap: refused on length alone, before any address
    // is looked at. (virtio-queue itself cuts chains whose total overflows u32.)
    let e = rejected(parse_descs(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 0x1000_0000, W),
            desc(STATUS, 1, W),
        ],
    ));
    assert!(matches!(e, RequestError::TooLong(_)));
    header(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let e = rejected(parse_descs(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]));
    assert!(matches!(e, RequestError::BadLength(0)));
}

#[test]
fn sector_range_is_checked_without_overflow() {
    let m = mem();
    let last = CAP / SECTOR_SIZE - 1;
    for (sector, ok) in [
        (last, true),
        (last + 1, false),
        (u64::MAX, false),
        (u64::MAX / SECTOR_SIZE, false),
        (u64::MAX / SECTOR_SIZE + 1, false),
    ] {
        header(&m, HDR, VIRTIO_BLK_T_IN, sector);
        let r = parse_descs(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        if ok {
            assert!(r.is_ok(), "sector {sector}");
        } else {
            assert!(
                matches!(rejected(r), RequestError::OutOfRange { .. }),
                "sector {sector}"
            );
        }
    }
    // Two sectors starting at the last one run off the end.
    header(&m, HDR, VIRTIO_BLK_T_OUT, last);
    let e = rejected(parse_descs(
        &m,
        &[desc(HDR, 16, 0), desc(DATA, 1024, 0), desc(STATUS, 1, W)],
    ));
    assert!(matches!(e, RequestError::OutOfRange { .. }));
}

#[test]
fn data_outside_guest_memory() {
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let e = rejected(parse_descs(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(crate::virtio::test_utils::MEM_SIZE as u64 - 256, 512, W),
            desc(STATUS, 1, W),
        ],
    ));
    assert!(matches!(e, RequestError::Memory));
}

// ---- execution ----

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
}

fn req(t: RequestType, sector: u64, data: &[(u64, u32)]) -> Request {
    Request {
        request_type: t,
        sector,
        data: data
            .iter()
            .map(|&(a, len)| Segment {
                addr: GuestAddress(a),
                len,
            })
            .collect(),
        data_len: data.iter().map(|&(_, l)| u64::from(l)).sum(),
        status: GuestAddress(STATUS),
    }
}

#[test]
fn read_and_write_move_the_right_bytes() {
    let m = mem();
    let mut disk = MemDisk::new(8192);
    disk.data = pattern(8192);
    let serial = [0u8; ID_BYTES];
    // Read sectors 2..4 into two buffers.
    let r = req(RequestType::In, 2, &[(DATA, 512), (DATA + 0x1000, 512)]);
    assert_eq!(r.execute(&m, &mut disk, false, &serial).unwrap(), 1024);
    let mut a = vec![0u8; 512];
    m.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    assert_eq!(a, disk.data[1024..1536]);
    m.read_slice(&mut a, GuestAddress(DATA + 0x1000)).unwrap();
    assert_eq!(a, disk.data[1536..2048]);

    // Write them back at sector 10.
    let w = req(RequestType::Out, 10, &[(DATA, 512), (DATA + 0x1000, 512)]);
    assert_eq!(w.execute(&m, &mut disk, false, &serial).unwrap(), 0);
    assert_eq!(disk.data[5120..6144], pattern(8192)[1024..2048]);
}

#[test]
fn buffer_spanning_two_memory_regions() {
    let m = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x10_0000), 0x10_0000),
    ])
    .unwrap();
    let mut disk = MemDisk::new(4096);
    disk.data = pattern(4096);
    let r = req(RequestType::In, 0, &[(0x10_0000 - 1024, 2048)]);
    assert_eq!(r.execute(&m, &mut disk, false, &[0; 20]).unwrap(), 2048);
    let mut a = vec![0u8; 2048];
    m.read_slice(&mut a, GuestAddress(0x10_0000 - 1024))
        .unwrap();
    assert_eq!(a, disk.data[..2048]);
}

#[test]
fn read_only_refuses_writes_and_skips_flush() {
    let m = mem();
    let mut disk = MemDisk::new(4096);
    m.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    let w = req(RequestType::Out, 0, &[(DATA, 512)]);
    assert!(matches!(
        w.execute(&m, &mut disk, true, &[0; 20]),
        Err(RequestError::ReadOnly)
    ));
    assert!(disk.data.iter().all(|&b| b == 0));
    let f = req(RequestType::Flush, 0, &[]);
    assert_eq!(f.execute(&m, &mut disk, true, &[0; 20]).unwrap(), 0);
    assert_eq!(disk.flushes, 0);
    assert_eq!(f.execute(&m, &mut disk, false, &[0; 20]).unwrap(), 0);
    assert_eq!(disk.flushes, 1);
}

#[test]
fn get_id_writes_the_serial_truncated_to_the_buffer() {
    let m = mem();
    let mut disk = MemDisk::new(512);
    let mut serial = [0u8; ID_BYTES];
    serial[..6].copy_from_slice(b"disk-7");
    m.write_slice(&[0xff; 32], GuestAddress(DATA)).unwrap();
    let g = req(RequestType::GetId, 0, &[(DATA, 4), (DATA + 16, 16)]);
    assert_eq!(g.execute(&m, &mut disk, false, &serial).unwrap(), 20);
    let mut out = [0u8; 32];
    m.read_slice(&mut out, GuestAddress(DATA)).unwrap();
    assert_eq!(&out[..4], b"disk");
    assert_eq!(&out[4..16], &[0xff; 12], "gap between buffers untouched");
    assert_eq!(&out[16..18], b"-7");
    assert_eq!(&out[18..32], &[0; 14]);
    // A buffer shorter than 20 bytes gets a prefix.
    let g = req(RequestType::GetId, 0, &[(DATA + 0x100, 3)]);
    assert_eq!(g.execute(&m, &mut disk, false, &serial).unwrap(), 3);
}

#[test]
fn backend_failure_is_an_io_error() {
    let m = mem();
    let mut disk = MemDisk::new(4096);
    disk.fail = true;
    let r = req(RequestType::In, 0, &[(DATA, 512)]);
    let e = r.execute(&m, &mut disk, false, &[0; 20]).unwrap_err();
    assert!(matches!(e, RequestError::Io(_)));
    assert_eq!(e.status(), Some(VIRTIO_BLK_S_IOERR));
    let f = req(RequestType::Flush, 0, &[]);
    assert!(matches!(
        f.execute(&m, &mut disk, false, &[0; 20]),
        Err(RequestError::Io(_))
    ));
}
