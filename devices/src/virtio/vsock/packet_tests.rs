//! Unit tests of vsock packet parsing: headers over any descriptor layout, every way a
//! TX chain can be wrong, and RX buffer writes.

use super::*;
use crate::virtio::vsock::test_utils::{ghdr, Driver, GUEST_CID, W};
use crate::virtio::vsock::{RX_QUEUE, TX_QUEUE};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Address;

const A: u64 = 0x50_0000;

/// Lays out `descs` on queue `q` and runs `f` on the resulting chain.
fn with_chain<T>(
    drv: &mut Driver,
    q: usize,
    descs: &[(u64, u32, u32)],
    f: impl FnOnce(&GuestMemoryMmap, Chain<'_>) -> T,
) -> T {
    drv.add_chain(q, descs);
    let mut queue = drv.queues().swap_remove(q);
    // Start at the chain just added.
    let idx: u16 = drv
        .mem
        .read_obj(drv.avail_addr(q).unchecked_add(2))
        .unwrap();
    queue.set_next_avail(idx.wrapping_sub(1));
    let mem = drv.mem.clone();
    let chain = queue.iter(&mem).unwrap().next().unwrap();
    f(&mem, chain)
}

fn parse(drv: &mut Driver, descs: &[(u64, u32, u32)]) -> Result<(Header, Vec<u8>), Rejected> {
    with_chain(drv, TX_QUEUE, descs, |mem, chain| {
        let mut data = vec![0xaa; 3];
        parse_tx(mem, chain, GUEST_CID, &mut data).map(|h| (h, data))
    })
}

fn write_hdr(drv: &Driver, hdr: &Header, at: u64) {
    drv.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(at))
        .unwrap();
}

#[test]
fn header_wire_layout_round_trips() {
    let h = Header {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 2,
        src_port: 0x1112_1314,
        dst_port: 0x2122_2324,
        len: 0x3132_3334,
        type_: 1,
        op: 5,
        flags: 0x4142_4344,
        buf_alloc: 0x5152_5354,
        fwd_cnt: 0x6162_6364,
    };
    let b = h.to_bytes();
    assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(&b[8..16], &[2, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&b[16..20], &[0x14, 0x13, 0x12, 0x11]);
    assert_eq!(&b[24..28], &[0x34, 0x33, 0x32, 0x31]);
    assert_eq!(&b[28..32], &[1, 0, 5, 0]);
    assert_eq!(&b[40..44], &[0x64, 0x63, 0x62, 0x61]);
    assert_eq!(Header::from_bytes(&b), h);
    assert_eq!(h.op(), Some(Op::Rw));
    let r = h.rst_reply();
    assert_eq!((r.src_cid, r.dst_cid), (2, h.src_cid));
    assert_eq!((r.src_port, r.dst_port), (h.dst_port, h.src_port));
    assert_eq!((r.op, r.type_, r.len), (Op::Rst as u16, TYPE_STREAM, 0));
    for v in 1..=7 {
        assert_eq!(Op::from_u16(v).map(|o| o as u16), Some(v));
    }
    assert_eq!(Op::from_u16(0), None);
    assert_eq!(Op::from_u16(8), None);
}

#[test]
fn rw_packet_with_payload_in_its_own_descriptor() {
    let mut drv = Driver::new();
    let mut h = ghdr(Op::Rw, 1000, 52);
    h.len = 5;
    write_hdr(&drv, &h, A);
    drv.mem
        .write_slice(b"hello", GuestAddress(A + 0x100))
        .unwrap();
    let (got, data) = parse(&mut drv, &[(A, 44, 0), (A + 0x100, 5, 0)]).unwrap();
    assert_eq!(got, h);
    assert_eq!(data, b"hello");
}

#[test]
fn header_split_across_descriptors_and_sharing_one_with_the_payload() {
    let mut drv = Driver::new();
    let mut h = ghdr(Op::Rw, 7, 9);
    h.len = 6;
    let mut bytes = h.to_bytes().to_vec();
    bytes.extend_from_slice(b"abcdef");
    // 10 + 0 (empty, skipped) + 30 + 10 (4 header bytes + "abcdef") bytes.
    drv.mem.write_slice(&bytes[..10], GuestAddress(A)).unwrap();
    drv.mem
        .write_slice(&bytes[10..40], GuestAddress(A + 0x100))
        .unwrap();
    drv.mem
        .write_slice(&bytes[40..], GuestAddress(A + 0x200))
        .unwrap();
    let descs = [
        (A, 10, 0),
        (A + 0x80, 0, 0),
        (A + 0x100, 30, 0),
        (A + 0x200, 10, 0),
    ];
    let (got, data) = parse(&mut drv, &descs).unwrap();
    assert_eq!(got, h);
    assert_eq!(data, b"abcdef");
}

#[test]
fn control_packets_ignore_trailing_bytes_and_extra_room_is_ignored() {
    let mut drv = Driver::new();
    let mut h = ghdr(Op::Request, 7, 9);
    h.len = 1000; // Ignored: only RW carries payload.
    write_hdr(&drv, &h, A);
    let (got, data) = parse(&mut drv, &[(A, 44, 0)]).unwrap();
    assert_eq!(got.op, Op::Request as u16);
    assert!(data.is_empty(), "scratch is cleared");
    // An RW whose buffers are longer than len: only len bytes are payload.
    let mut h = ghdr(Op::Rw, 7, 9);
    h.len = 2;
    write_hdr(&drv, &h, A);
    drv.mem.write_slice(b"xyz", GuestAddress(A + 44)).unwrap();
    let (_, data) = parse(&mut drv, &[(A, 100, 0)]).unwrap();
    assert_eq!(data, b"xy");
}

fn rejected(drv: &mut Driver, hdr: &Header, descs: &[(u64, u32, u32)]) -> Rejected {
    write_hdr(drv, hdr, A);
    parse(drv, descs).unwrap_err()
}

#[test]
fn untrusted_headers_are_dropped_without_an_answer() {
    let mut drv = Driver::new();
    let h = ghdr(Op::Request, 1, 2);
    let r = rejected(&mut drv, &h, &[(A, 44, W)]);
    assert_eq!(
        r,
        Rejected {
            hdr: None,
            error: PacketError::WrongDirection
        }
    );
    let r = rejected(&mut drv, &h, &[(A, 20, 0), (A + 20, 20, 0)]);
    assert_eq!(r.error, PacketError::ShortHeader);
    assert_eq!(r.hdr, None);
    let mut bad = h;
    bad.src_cid = 4;
    let r = rejected(&mut drv, &bad, &[(A, 44, 0)]);
    assert_eq!(
        r,
        Rejected {
            hdr: None,
            error: PacketError::SrcCid(4)
        }
    );
    let mut bad = h;
    bad.src_cid = GUEST_CID | 1 << 32;
    let r = rejected(&mut drv, &bad, &[(A, 44, 0)]);
    assert!(
        matches!(r.error, PacketError::SrcCid(_)),
        "upper CID bits count"
    );
}

#[test]
fn trusted_but_bad_headers_come_back_for_a_rst() {
    let mut drv = Driver::new();
    let h = ghdr(Op::Rw, 1, 2);
    let cases: [(Header, PacketError); 3] = [
        (Header { dst_cid: 7, ..h }, PacketError::DstCid(7)),
        (Header { type_: 2, ..h }, PacketError::Type(2)),
        (Header { op: 0, ..h }, PacketError::Op(0)),
    ];
    for (hdr, err) in cases {
        let r = rejected(&mut drv, &hdr, &[(A, 44, 0)]);
        assert_eq!(
            r,
            Rejected {
                hdr: Some(hdr),
                error: err
            }
        );
    }
    let long = Header {
        len: 64 * 1024 + 1,
        ..h
    };
    let r = rejected(&mut drv, &long, &[(A, 44, 0), (A + 0x100, 0x1_0001, 0)]);
    assert_eq!(r.error, PacketError::TooLong(64 * 1024 + 1));
    let short = Header { len: 100, ..h };
    let r = rejected(&mut drv, &short, &[(A, 44, 0), (A + 0x100, 50, 0)]);
    assert_eq!(r.error, PacketError::ShortData { len: 100, got: 50 });
    assert_eq!(r.hdr, Some(short));
    let r = rejected(
        &mut drv,
        &Header { len: 8, ..h },
        &[(A, 44, 0), (0x2000_0000, 8, 0)],
    );
    assert_eq!(r.error, PacketError::Memory);
}

#[test]
fn max_payload_is_accepted() {
    let mut drv = Driver::new();
    let h = Header {
        len: 64 * 1024,
        ..ghdr(Op::Rw, 1, 2)
    };
    write_hdr(&drv, &h, A);
    let (_, data) = parse(&mut drv, &[(A, 44, 0), (A + 0x100, 0x1_0000, 0)]).unwrap();
    assert_eq!(data.len(), MAX_PKT_DATA);
}

#[test]
fn broken_and_overlong_chains_are_dropped() {
    let mut drv = Driver::new();
    write_hdr(&drv, &ghdr(Op::Rw, 1, 2), A);
    // NEXT pointing outside the table ends the chain early.
    drv.add_chain(TX_QUEUE, &[(A, 44, 0)]);
    let mut q = drv.queues().swap_remove(TX_QUEUE);
    let d = virtio_queue::desc::split::Descriptor::new(
        A,
        44,
        u16::try_from(VRING_DESC_F_NEXT).unwrap(),
        999,
    );
    let raw: virtio_queue::desc::RawDescriptor = d.into();
    drv.mem.write_obj(raw, GuestAddress(0x1_0000)).unwrap();
    let mem = drv.mem.clone();
    let chain = q.iter(&mem).unwrap().next().unwrap();
    let r = parse_tx(&mem, chain, GUEST_CID, &mut Vec::new()).unwrap_err();
    assert_eq!(r.error, PacketError::BrokenChain);

    // An indirect table of 300 one-byte descriptors: more than MAX_CHAIN_DESCRIPTORS.
    let table = 0x60_0000u64;
    for i in 0..300u16 {
        let d = virtio_queue::desc::split::Descriptor::new(
            A,
            1,
            u16::try_from(VRING_DESC_F_NEXT).unwrap(),
            i + 1,
        );
        let raw: virtio_queue::desc::RawDescriptor = d.into();
        drv.mem
            .write_obj(raw, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }
    let r = with_chain(
        &mut drv,
        TX_QUEUE,
        &[(table, 300 * 16, VRING_DESC_F_INDIRECT)],
        |m, c| parse_tx(m, c, GUEST_CID, &mut Vec::new()),
    );
    assert_eq!(r.unwrap_err().error, PacketError::ChainTooLong);
}

#[test]
fn rx_buffer_takes_header_and_payload_across_descriptors() {
    let mut drv = Driver::new();
    let h = ghdr(Op::Rw, 5, 6);
    let buf = with_chain(
        &mut drv,
        RX_QUEUE,
        &[(A, 30, W), (A + 0x100, 100, W)],
        RxBuffer::parse,
    )
    .unwrap();
    assert_eq!(buf.data_capacity(), 130 - 44);
    let data: Vec<u8> = (0..86).collect();
    assert_eq!(buf.write(&drv.mem, &h, &data).unwrap(), 130);
    let mut raw = [0u8; 44];
    drv.mem.read_slice(&mut raw[..30], GuestAddress(A)).unwrap();
    drv.mem
        .read_slice(&mut raw[30..], GuestAddress(A + 0x100))
        .unwrap();
    assert_eq!(Header::from_bytes(&raw), Header { len: 86, ..h });
    let mut back = vec![0u8; 86];
    drv.mem
        .read_slice(&mut back, GuestAddress(A + 0x100 + 14))
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(
        buf.write(&drv.mem, &h, &[0; 87]),
        Err(PacketError::TooLong(87)),
        "never truncated"
    );
    assert_eq!(buf.write(&drv.mem, &h, &[]).unwrap(), 44);
}

#[test]
fn unusable_rx_buffers_are_refused() {
    let mut drv = Driver::new();
    let mut parse_rx =
        |descs: &[(u64, u32, u32)]| with_chain(&mut drv, RX_QUEUE, descs, RxBuffer::parse);
    assert_eq!(parse_rx(&[(A, 100, 0)]), Err(PacketError::WrongDirection));
    assert_eq!(parse_rx(&[(A, 43, W)]), Err(PacketError::ShortHeader));
    assert_eq!(parse_rx(&[(0xFF_FFF0, 100, W)]), Err(PacketError::Memory));
    let big = parse_rx(&[(A, 0x2_0000, W)]).unwrap();
    assert_eq!(big.data_capacity(), MAX_PKT_DATA, "capped");
}
