//! Unit tests of the vsock device through its queues, a real event manager and real unix
//! sockets in a temp dir. Each scenario is a function returning its harness, so the
//! counter test can replay them all and check every counter moved.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::*;
use crate::virtio::test_utils::CountingInterrupt;
use crate::virtio::vsock::connection::CONN_BUF_SIZE;
use crate::virtio::vsock::muxer::FIRST_EPHEMERAL_PORT;
use crate::virtio::vsock::packet::{Header, Op, SHUTDOWN_F_RECEIVE, SHUTDOWN_F_SEND};
use crate::virtio::vsock::test_utils::{
    closed, ghdr, read_line, read_n, Driver, Harness, GUEST_CID, W,
};
use crate::virtio::vsock::HOST_CID;
use vm_memory::Address;

fn rw(src: u32, dst: u32, data: &[u8]) -> Header {
    Header {
        len: u32::try_from(data.len()).unwrap(),
        ..ghdr(Op::Rw, src, dst)
    }
}

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

/// Reads what `s` has, pumping the device in between, until `n` bytes arrived.
fn drain(h: &mut Harness, s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = vec![];
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..1000 {
        h.pump();
        match s.read(&mut buf) {
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        if out.len() >= n {
            break;
        }
    }
    s.set_nonblocking(false).unwrap();
    out
}

#[test]
fn identity_config_and_construction_errors() {
    let h = Harness::new();
    let mut v = h.vsock.lock().unwrap();
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(v.queue_events().len(), 3);
    assert_eq!(v.avail_features(), 1 << 32);
    v.set_acked_features(u64::MAX);
    assert_eq!(v.acked_features(), 1 << 32);
    let mut cid = [0u8; 8];
    v.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    v.write_config(0, &[9; 8]);
    v.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID, "read-only");
    assert_eq!(v.guest_cid(), GUEST_CID);
    assert_eq!(v.uds_path(), h.uds.as_path());
    let irq = std::sync::Arc::new(CountingInterrupt::default());
    assert!(matches!(
        v.activate(h.drv.mem.clone(), h.drv.queues(), irq.clone()),
        Err(ActivateError::AlreadyActivated)
    ));
    drop(v);
    assert!(matches!(
        Vsock::new(2, &h.dir.as_path().join("x")),
        Err(VsockError::InvalidCid(2))
    ));
    let err = Vsock::new(3, &h.uds).err().unwrap();
    assert!(matches!(err, VsockError::Bind { .. }));
    assert!(err.to_string().contains(&*h.uds.to_string_lossy()));
    let mut fresh = Vsock::new(3, &h.dir.as_path().join("y")).unwrap();
    assert!(!fresh.is_activated());
    assert!(matches!(
        fresh.activate(h.drv.mem.clone(), vec![], irq),
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 0
        })
    ));
}

fn host_initiated_data_both_ways() -> Harness {
    let mut h = Harness::new();
    h.give_rx(16);
    let (mut client, port) = h.host_connection(52);
    assert_eq!(port, FIRST_EPHEMERAL_PORT);
    client.write_all(b"ping").unwrap();
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    let (hdr, data) = &pkts[0];
    assert_eq!(
        (hdr.op, hdr.src_cid, hdr.dst_cid),
        (Op::Rw as u16, HOST_CID, GUEST_CID)
    );
    assert_eq!(
        (hdr.src_port, hdr.dst_port, &data[..]),
        (port, 52, &b"ping"[..])
    );
    assert_eq!(hdr.buf_alloc, CONN_BUF_SIZE);
    h.send(&rw(52, port, b"pong"), b"pong");
    assert_eq!(read_n(&mut client, 4), b"pong");
    // A second client, while the first is live, gets another port; bytes it wrote right
    // after its CONNECT line wait for the guest's RESPONSE and are not lost.
    let mut c2 = UnixStream::connect(&h.uds).unwrap();
    c2.write_all(b"CONNECT 52\nearly").unwrap();
    h.pump();
    let req = h.recv()[0].0;
    assert_eq!(req.src_port, FIRST_EPHEMERAL_PORT + 1);
    h.send(&ghdr(Op::Response, 52, req.src_port), &[]);
    assert_eq!(read_line(&mut c2), format!("OK {}\n", req.src_port));
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(&pkts[0].1[..], b"early");
    assert_eq!(h.metric("host_conns_opened"), 2);
    assert_eq!(h.metric("bytes_to_guest"), 9);
    assert_eq!(h.metric("bytes_to_host"), 4);
    assert!(h.irq.used_count() > 0);
    h
}

#[test]
fn host_connect_handshake_and_data_both_ways() {
    host_initiated_data_both_ways();
}

fn guest_refusal_and_bad_handshakes() -> Harness {
    let mut h = Harness::new();
    h.give_rx(8);
    let (mut c, req) = h.host_connect(52);
    h.send(&ghdr(Op::Rst, 52, req.src_port), &[]);
    assert!(closed(&mut c), "the guest refused: client closed");
    assert_eq!(h.conns(), 0);
    assert_eq!(h.metric("rst_received"), 1);
    assert_eq!(h.metric("conns_closed"), 1);
    for garbage in [
        &b"HELLO 5\n"[..],
        &[b'7'; 40][..],
        &b"CONNECT 99999999999\n"[..],
    ] {
        let mut c = UnixStream::connect(&h.uds).unwrap();
        c.write_all(garbage).unwrap();
        h.pump();
        assert!(closed(&mut c), "{garbage:?}");
    }
    assert!(h.recv().is_empty(), "no REQUEST for garbage");
    assert_eq!(h.metric("handshake_errors"), 3);
    h
}

#[test]
fn guest_rst_and_garbage_close_host_clients() {
    guest_refusal_and_bad_handshakes();
}

fn guest_initiated_with_and_without_listener() -> Harness {
    let mut h = Harness::new();
    h.give_rx(8);
    h.send(&ghdr(Op::Request, 1000, 77), &[]);
    let pkts = h.recv();
    assert_eq!(ops(&pkts), [Op::Rst as u16]);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (77, 1000));
    assert_eq!(h.metric("conns_refused"), 1);
    let l = h.host_listen(77);
    let mut s = h.guest_connection(&l, 1001, 77);
    h.send(&rw(1001, 77, b"hello"), b"hello");
    assert_eq!(read_n(&mut s, 5), b"hello");
    s.write_all(b"world").unwrap();
    h.pump();
    let pkts = h.recv();
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (77, 1001));
    assert_eq!(&pkts[0].1[..], b"world");
    assert_eq!(h.metric("guest_conns_opened"), 1);
    assert_eq!(h.metric("rst_sent"), 1);
    // A second REQUEST on a live flow: the guest lost track, the flow is reset.
    h.send(&ghdr(Op::Request, 1001, 77), &[]);
    assert_eq!(ops(&h.recv()), [Op::Rst as u16]);
    assert!(closed(&mut s));
    assert_eq!(h.metric("protocol_errors"), 1);
    assert_eq!(h.conns(), 0);
    h
}

#[test]
fn guest_connects_to_uds_port_with_and_without_listener() {
    guest_initiated_with_and_without_listener();
}

fn credit_both_ways() -> Harness {
    let mut h = Harness::new();
    h.give_rx(64);
    let l = h.host_listen(60);
    // The guest offers only 5000 bytes of buffer.
    h.send(
        &Header {
            buf_alloc: 5000,
            ..ghdr(Op::Request, 1100, 60)
        },
        &[],
    );
    assert_eq!(ops(&h.recv()), [Op::Response as u16]);
    let (mut s, _) = l.accept().unwrap();
    s.write_all(&[1u8; 10_000]).unwrap();
    h.pump();
    let got: usize = h.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 5000, "never more than the guest's credit");
    h.send(
        &Header {
            buf_alloc: 5000,
            fwd_cnt: 5000,
            ..ghdr(Op::CreditUpdate, 1100, 60)
        },
        &[],
    );
    let got: usize = h.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 5000);
    // Guest to host: 240 KB consumed by the host brings a CREDIT_UPDATE.
    let chunk = vec![2u8; 60_000];
    for _ in 0..4 {
        h.drv.send(&rw(1100, 60, &chunk), &chunk);
    }
    h.kick(TX_QUEUE);
    let back = drain(&mut h, &mut s, 240_000);
    assert_eq!(back.len(), 240_000);
    h.pump();
    let upd: Vec<Header> = h.recv().into_iter().map(|(h, _)| h).collect();
    assert!(
        upd.iter()
            .any(|u| u.op == Op::CreditUpdate as u16 && u.fwd_cnt > 0),
        "the guest's view went stale: {upd:?}"
    );
    h.send(&ghdr(Op::CreditRequest, 1100, 60), &[]);
    let pkts = h.recv();
    assert_eq!(ops(&pkts), [Op::CreditUpdate as u16]);
    assert_eq!(pkts[0].0.fwd_cnt, 240_000);
    assert_eq!(h.metric("credit_requests"), 1);
    assert!(h.metric("credit_updates") >= 2);
    h
}

#[test]
fn data_both_ways_respects_credit() {
    credit_both_ways();
}

#[test]
fn a_non_reading_host_peer_does_not_block_another_connection() {
    let mut h = Harness::new();
    h.give_rx(128);
    let l = h.host_listen(80);
    let mut a = h.guest_connection(&l, 2000, 80);
    let mut b = h.guest_connection(&l, 2001, 80);
    // The guest sends to A as long as A's credit allows; A's host never reads.
    let chunk = vec![5u8; 64 * 1024];
    let (mut sent, mut fwd) = (0u32, 0u32);
    for _ in 0..64 {
        let credit = CONN_BUF_SIZE - (sent - fwd);
        if credit == 0 {
            break;
        }
        let n = chunk.len().min(credit as usize);
        h.send(&rw(2000, 80, &chunk[..n]), &chunk[..n]);
        sent += u32::try_from(n).unwrap();
        for (p, _) in h.recv() {
            assert_ne!(
                p.op,
                Op::Rst as u16,
                "a guest within its credit is never reset"
            );
            if p.dst_port == 2000 {
                fwd = p.fwd_cnt;
            }
        }
    }
    assert_eq!(
        CONN_BUF_SIZE - (sent - fwd),
        0,
        "the guest ran out of credit: it waits"
    );
    assert_eq!(h.conns(), 2);
    // B is unaffected, both ways, and the loop does not spin (pump checks).
    h.send(&rw(2001, 80, b"to-b"), b"to-b");
    assert_eq!(read_n(&mut b, 4), b"to-b");
    b.write_all(b"from-b").unwrap();
    h.pump();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].0.dst_port, &pkts[0].1[..]), (2001, &b"from-b"[..]));
    // A's host reads at last: everything arrives and the guest gets credit back.
    let all = drain(&mut h, &mut a, sent as usize);
    assert_eq!(all.len(), sent as usize);
    let upd = h.recv();
    assert!(upd
        .iter()
        .any(|(p, _)| p.op == Op::CreditUpdate as u16 && p.dst_port == 2000));
}

fn connection_cap() -> Harness {
    let mut h = Harness::with_limits(|l| l.max_conns = 2);
    h.give_rx(8);
    let l = h.host_listen(90);
    let _a = h.guest_connection(&l, 3000, 90);
    let _b = h.guest_connection(&l, 3001, 90);
    h.send(&ghdr(Op::Request, 3002, 90), &[]);
    assert_eq!(ops(&h.recv()), [Op::Rst as u16]);
    let mut c = UnixStream::connect(&h.uds).unwrap();
    h.pump();
    assert!(closed(&mut c), "host clients beyond the cap are closed");
    assert_eq!(h.metric("conn_limit_hits"), 2);
    assert_eq!(h.conns(), 2);
    h
}

#[test]
fn connections_beyond_the_cap_are_refused() {
    connection_cap();
}

fn malformed_packets() -> Harness {
    let mut h = Harness::new();
    // A device-readable RX buffer is unusable; the next one takes the packet.
    h.drv.add_chain(RX_QUEUE, &[(0x90_0000, 200, 0)]);
    h.give_rx(8);
    h.drv.send_raw(&[0u8; 20], &[]);
    h.kick(TX_QUEUE);
    h.pump();
    assert!(h.recv().is_empty(), "short header: dropped");
    h.send(
        &Header {
            src_cid: 9,
            ..ghdr(Op::Request, 1, 2)
        },
        &[],
    );
    assert!(h.recv().is_empty(), "foreign source CID: dropped");
    h.send(
        &Header {
            type_: 2,
            ..ghdr(Op::Request, 1, 2)
        },
        &[],
    );
    h.send(
        &Header {
            dst_cid: 5,
            ..ghdr(Op::Request, 1, 2)
        },
        &[],
    );
    h.send(
        &Header {
            op: 99,
            ..ghdr(Op::Request, 1, 2)
        },
        &[],
    );
    h.send(
        &Header {
            type_: 2,
            ..ghdr(Op::Rst, 1, 2)
        },
        &[],
    );
    let pkts = h.recv();
    assert_eq!(ops(&pkts), [Op::Rst as u16; 3], "bad type, CID or op: RST");
    assert_eq!(pkts[1].0.src_cid, 5, "from the address the guest tried");
    assert_eq!(h.metric("malformed_packets"), 6);
    // Well-formed but for no connection: RST, except for a RST.
    h.send(&rw(1, 2, b"x"), b"x");
    h.send(&ghdr(Op::Rst, 1, 2), &[]);
    h.send(&ghdr(Op::Shutdown, 1, 2), &[]);
    assert_eq!(ops(&h.recv()), [Op::Rst as u16; 2]);
    assert_eq!(h.metric("rx_chain_errors"), 1);
    assert_eq!(h.metric("tx_packets"), 3);
    h
}

#[test]
fn malformed_headers_are_counted_and_answered_only_when_trusted() {
    malformed_packets();
}

fn shutdowns() -> Harness {
    let mut h = Harness::new();
    h.give_rx(32);
    let l = h.host_listen(81);
    // Guest stops sending; host finishes; RST ends it.
    let mut s = h.guest_connection(&l, 4000, 81);
    h.send(&rw(4000, 81, b"bye"), b"bye");
    h.send(
        &Header {
            flags: SHUTDOWN_F_SEND,
            ..ghdr(Op::Shutdown, 4000, 81)
        },
        &[],
    );
    let mut got = vec![];
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye", "EOF after the bytes");
    s.write_all(b"ok").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    h.pump();
    let pkts = h.recv();
    assert_eq!(
        ops(&pkts),
        [Op::Rw as u16, Op::Shutdown as u16, Op::Rst as u16]
    );
    // Both ends of the host stream are shut now (it reports a hang-up), so RECEIVE may
    // come along with SEND.
    assert_ne!(pkts[1].0.flags & SHUTDOWN_F_SEND, 0);
    assert_eq!(h.conns(), 0);
    // Guest closes (both flags): RST at once, host sees EOF.
    let mut s = h.guest_connection(&l, 4001, 81);
    let both = SHUTDOWN_F_SEND | SHUTDOWN_F_RECEIVE;
    h.send(
        &Header {
            flags: both,
            ..ghdr(Op::Shutdown, 4001, 81)
        },
        &[],
    );
    assert_eq!(ops(&h.recv()), [Op::Rst as u16]);
    assert!(closed(&mut s));
    // Host client goes away: SHUTDOWN with both flags; the guest's RST forgets it.
    let (c, port) = h.host_connection(53);
    drop(c);
    h.pump();
    let pkts = h.recv();
    assert_eq!(ops(&pkts), [Op::Shutdown as u16]);
    assert_eq!(pkts[0].0.flags, both);
    h.send(&ghdr(Op::Rst, 53, port), &[]);
    assert_eq!(h.conns(), 0);
    assert_eq!(h.metric("conns_closed"), 3);
    h
}

#[test]
fn clean_shutdown_both_ways() {
    shutdowns();
}

fn rx_backlog_and_tx_stall() -> Harness {
    let mut h = Harness::with_limits(|l| l.max_replies = 2);
    // No RX buffers yet: the REQUEST waits inside the device.
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    h.pump();
    assert_eq!(h.conns(), 1);
    for i in 0..5 {
        h.drv.send(&ghdr(Op::Request, 5000 + i, 99), &[]);
    }
    h.kick(TX_QUEUE);
    h.pump();
    assert!(h.metric("tx_stalls") >= 1);
    let first = h.drv.used(TX_QUEUE).len();
    assert!(first < 5, "TX paused while replies pile up");
    h.give_rx(10);
    let pkts = h.recv();
    assert_eq!(
        pkts.iter().filter(|(p, _)| p.op == Op::Rst as u16).count(),
        5
    );
    assert_eq!(
        pkts.iter()
            .filter(|(p, _)| p.op == Op::Request as u16)
            .count(),
        1
    );
    assert_eq!(first + h.drv.used(TX_QUEUE).len(), 5, "TX resumed");
    h
}

#[test]
fn rx_packets_wait_for_buffers_and_tx_pauses_when_replies_pile_up() {
    rx_backlog_and_tx_stall();
}

fn transport_reset() -> Harness {
    let mut h = Harness::new();
    h.give_rx(8);
    let (mut c, _) = h.host_connection(52);
    let l = h.host_listen(82);
    let mut s = h.guest_connection(&l, 6000, 82);
    h.vsock.lock().unwrap().send_transport_reset();
    h.pump();
    assert!(closed(&mut c));
    assert!(closed(&mut s));
    assert_eq!(h.conns(), 0);
    assert!(h.drv.events().is_empty(), "no event buffer yet");
    h.drv.add_event_buffer();
    h.kick(EVENT_QUEUE);
    h.pump();
    assert_eq!(h.drv.events(), [EVENT_TRANSPORT_RESET]);
    assert_eq!(h.metric("transport_resets"), 1);
    // The host listener still works.
    let _c = h.host_connection(52);
    h
}

#[test]
fn transport_reset_event_drops_connections() {
    transport_reset();
}

fn timeouts() -> Harness {
    let ms = Duration::from_millis;
    let mut h = Harness::with_limits(|l| {
        l.handshake_timeout = ms(50);
        l.connect_timeout = ms(50);
        l.tick = ms(40);
    });
    h.give_rx(8);
    let mut idle = UnixStream::connect(&h.uds).unwrap();
    let (mut c, req) = h.host_connect(52);
    std::thread::sleep(ms(150));
    h.pump();
    assert!(closed(&mut idle), "no CONNECT line in time");
    assert!(closed(&mut c), "the guest never answered");
    let pkts = h.recv();
    assert_eq!(ops(&pkts), [Op::Rst as u16]);
    assert_eq!(pkts[0].0.src_port, req.src_port);
    assert_eq!(h.metric("timeouts"), 2);
    h
}

#[test]
fn handshakes_and_requests_time_out() {
    timeouts();
}

fn reset_and_reactivate() -> Harness {
    let mut h = Harness::new();
    h.give_rx(8);
    let (mut c, _) = h.host_connection(52);
    h.vsock.lock().unwrap().reset();
    h.pump();
    assert!(closed(&mut c), "reset closes host connections");
    assert!(!h.vsock.lock().unwrap().is_activated());
    h.drv = Driver::new();
    h.vsock
        .lock()
        .unwrap()
        .activate(h.drv.mem.clone(), h.drv.queues(), h.irq.clone())
        .unwrap();
    h.pump();
    h.give_rx(8);
    let _c = h.host_connection(52);
    // A host peer that vanished under a guest writing to it: host I/O error, RST.
    let l = h.host_listen(83);
    let s = h.guest_connection(&l, 7000, 83);
    drop(s);
    h.send(&rw(7000, 83, b"lost"), b"lost");
    let pkts = h.recv();
    assert!(pkts.iter().any(|(p, _)| p.op == Op::Rst as u16), "{pkts:?}");
    assert!(h.metric("host_io_errors") >= 1);
    // A broken available ring is a queue error, not a hang.
    let idx = h.drv.avail_addr(TX_QUEUE).unchecked_add(2);
    h.drv.mem.write_obj(1000u16, idx).unwrap();
    h.kick(TX_QUEUE);
    h.pump();
    assert!(h.metric("queue_errors") >= 1);
    h
}

#[test]
fn reset_closes_connections_and_the_device_comes_back() {
    reset_and_reactivate();
}

#[test]
fn event_buffers_too_small_are_skipped() {
    let mut h = Harness::new();
    h.drv.add_chain(EVENT_QUEUE, &[(0xE0_0000, 2, W)]);
    h.drv.add_event_buffer();
    h.vsock.lock().unwrap().send_transport_reset();
    h.pump();
    let used = h.drv.used(EVENT_QUEUE);
    assert_eq!(used.len(), 2);
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, 4);
}

/// Replays every scenario and checks that each declared counter moved at least once:
/// dead counters are a defect.
#[test]
fn every_counter_is_incremented_by_some_scenario() {
    let runs = [
        host_initiated_data_both_ways(),
        guest_refusal_and_bad_handshakes(),
        guest_initiated_with_and_without_listener(),
        credit_both_ways(),
        connection_cap(),
        malformed_packets(),
        shutdowns(),
        rx_backlog_and_tx_stall(),
        transport_reset(),
        timeouts(),
        reset_and_reactivate(),
    ];
    let mut totals: Vec<(&'static str, u64)> = vec![];
    for h in &runs {
        let snap = h.vsock.lock().unwrap().metrics().snapshot();
        for (i, (name, v)) in snap.into_iter().enumerate() {
            if totals.len() <= i {
                totals.push((name, 0));
            }
            totals[i].1 += v;
        }
    }
    assert_eq!(totals.len(), 23);
    for (name, v) in totals {
        assert!(v > 0, "counter {name} never incremented");
    }
}
