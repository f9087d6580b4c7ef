//! Unit tests of one connection over a real socket pair: the state machine, credit in both
//! directions, bounded buffering and shutdowns.

use super::*;
use crate::virtio::vsock::test_utils::{ghdr, GUEST_CID};
use std::io::Write;
use std::time::Duration;

const KEY: ConnKey = ConnKey {
    local_port: 52,
    peer_port: 1000,
};

/// A guest-initiated, established connection (RESPONSE already sent) and the host peer.
fn established() -> (Connection, UnixStream, VsockMetrics) {
    let (ours, host) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let m = VsockMetrics::default();
    let mut c = Connection::guest_initiated(ours, KEY, GUEST_CID, &ghdr(Op::Request, 1000, 52));
    let h = c.next_packet(4096, &mut Vec::new(), &m).unwrap();
    assert_eq!(h.op, Op::Response as u16);
    assert_eq!((h.src_port, h.dst_port, h.dst_cid), (52, 1000, GUEST_CID));
    assert_eq!((h.buf_alloc, h.fwd_cnt), (CONN_BUF_SIZE, 0));
    assert!(!c.wants_rx());
    (c, host, m)
}

fn rw(len: usize) -> Header {
    Header {
        len: u32::try_from(len).unwrap(),
        ..ghdr(Op::Rw, 1000, 52)
    }
}

#[test]
fn peer_credit_follows_the_spec_formula() {
    let (mut c, _host, m) = established();
    assert_eq!(c.peer_credit(), CONN_BUF_SIZE);
    c.rx_cnt = 1000;
    c.handle_guest(
        &Header {
            buf_alloc: 4096,
            fwd_cnt: 500,
            ..ghdr(Op::CreditUpdate, 1000, 52)
        },
        Op::CreditUpdate,
        &[],
        &m,
    );
    assert_eq!(c.peer_credit(), 4096 - 500);
    // Free-running counters wrap.
    c.rx_cnt = 10;
    c.handle_guest(
        &Header {
            buf_alloc: 4096,
            fwd_cnt: u32::MAX - 9,
            ..ghdr(Op::CreditUpdate, 1000, 52)
        },
        Op::CreditUpdate,
        &[],
        &m,
    );
    assert_eq!(c.peer_credit(), 4096 - 20);
    // A guest claiming it consumed more than we sent gets nothing, not 4 GiB.
    c.handle_guest(
        &Header {
            buf_alloc: 4096,
            fwd_cnt: 11,
            ..ghdr(Op::CreditUpdate, 1000, 52)
        },
        Op::CreditUpdate,
        &[],
        &m,
    );
    assert_eq!(c.peer_credit(), 0);
    assert_eq!(c.state(), State::Established);
}

#[test]
fn guest_bytes_reach_the_host_and_credit_flows_back() {
    let (mut c, mut host, m) = established();
    let data = vec![7u8; 60_000];
    for _ in 0..4 {
        c.handle_guest(&rw(data.len()), Op::Rw, &data, &m);
    }
    let mut got = vec![0u8; 240_000];
    let mut read = 0;
    while read < got.len() {
        c.host_event(EventSet::OUT, &m);
        read += host.read(&mut got[read..]).unwrap();
    }
    assert!(got.iter().all(|&b| b == 7));
    assert_eq!(c.fwd_cnt, 240_000);
    assert_eq!(
        m.bytes_to_host.load(std::sync::atomic::Ordering::Relaxed),
        240_000
    );
    // The guest thinks only 256K - 240K is free: an update is due.
    assert!(c.wants_rx());
    let h = c.next_packet(4096, &mut Vec::new(), &m).unwrap();
    assert_eq!(h.op, Op::CreditUpdate as u16);
    assert_eq!((h.buf_alloc, h.fwd_cnt), (CONN_BUF_SIZE, 240_000));
    assert!(!c.wants_rx(), "the guest is up to date");
    // A CREDIT_REQUEST is always answered.
    c.handle_guest(
        &ghdr(Op::CreditRequest, 1000, 52),
        Op::CreditRequest,
        &[],
        &m,
    );
    let h = c.next_packet(4096, &mut Vec::new(), &m).unwrap();
    assert_eq!(h.op, Op::CreditUpdate as u16);
}

#[test]
fn a_stalled_host_is_buffered_up_to_the_credit_and_an_overrun_resets() {
    let (mut c, _host, m) = established();
    let chunk = vec![1u8; 64 * 1024];
    // Honour the credit we advertise: never more than buf_alloc - (sent - fwd_cnt).
    let mut sent: u32 = 0;
    loop {
        let free = CONN_BUF_SIZE - (sent - c.fwd_cnt);
        if free == 0 {
            break;
        }
        let n = chunk.len().min(free as usize);
        c.handle_guest(&rw(n), Op::Rw, &chunk[..n], &m);
        sent += u32::try_from(n).unwrap();
        assert_eq!(c.state(), State::Established);
    }
    assert!(c.buffered() > 0 && c.buffered() <= CONN_BUF_SIZE as usize);
    assert_eq!(c.interest(), Some(EventSet::IN | EventSet::OUT));
    // One byte beyond the credit is a protocol error: RST, stream closed.
    c.handle_guest(&rw(CONN_BUF_SIZE as usize), Op::Rw, &chunk, &m);
    assert_eq!(c.state(), State::Killed);
    assert_eq!(
        m.protocol_errors.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(c.take_stream().is_some());
    assert_eq!(c.interest(), None);
    let h = c.next_packet(4096, &mut Vec::new(), &m).unwrap();
    assert_eq!(h.op, Op::Rst as u16);
    assert!(c.is_finished());
}

#[test]
fn buffered_bytes_drain_when_the_host_reads() {
    let (mut c, mut host, m) = established();
    let chunk = vec![3u8; 64 * 1024];
    while c.buffered() == 0 {
        c.handle_guest(&rw(chunk.len()), Op::Rw, &chunk, &m);
    }
    let total = c.recv_cnt as usize;
    let mut got = vec![0u8; total];
    let mut read = 0;
    while read < total {
        c.host_event(EventSet::OUT, &m);
        read += host.read(&mut got[read..]).unwrap();
    }
    assert_eq!(c.buffered(), 0);
    assert_eq!(c.fwd_cnt as usize, total);
    assert_eq!(
        c.interest(),
        Some(EventSet::IN),
        "no OUT interest once drained"
    );
}

#[test]
fn host_bytes_go_out_within_credit_and_buffer_room() {
    let (mut c, mut host, m) = established();
    assert_eq!(c.interest(), Some(EventSet::IN));
    host.write_all(&[9u8; 10_000]).unwrap();
    c.host_event(EventSet::IN, &m);
    assert_eq!(
        c.interest(),
        Some(EventSet::empty()),
        "no IN while we know it is readable"
    );
    let mut buf = vec![];
    let h = c.next_packet(4096, &mut buf, &m).unwrap();
    assert_eq!((h.op, h.len, buf.len()), (Op::Rw as u16, 4096, 4096));
    // The guest allows only 100 more bytes.
    let upd = Header {
        buf_alloc: 4196,
        fwd_cnt: 0,
        ..ghdr(Op::CreditUpdate, 1000, 52)
    };
    c.handle_guest(&upd, Op::CreditUpdate, &[], &m);
    let h = c.next_packet(4096, &mut buf, &m).unwrap();
    assert_eq!(h.len, 100);
    assert!(!c.wants_rx(), "no credit left");
    assert_eq!(c.next_packet(4096, &mut buf, &m), None);
    assert_eq!(c.interest(), Some(EventSet::empty()));
    // Credit returns: the rest flows.
    let upd = Header {
        buf_alloc: CONN_BUF_SIZE,
        fwd_cnt: 4196,
        ..upd
    };
    c.handle_guest(&upd, Op::CreditUpdate, &[], &m);
    assert!(c.wants_rx());
    let mut total = 4196;
    while let Some(h) = c.next_packet(4096, &mut buf, &m) {
        assert_eq!(h.op, Op::Rw as u16);
        total += h.len;
    }
    assert_eq!(total, 10_000);
    assert_eq!(
        c.interest(),
        Some(EventSet::IN),
        "drained: epoll watches again"
    );
}

#[test]
fn shutdowns_both_ways_end_with_a_rst() {
    let (mut c, mut host, m) = established();
    // Guest: no more sending. The host sees EOF once buffered bytes are out.
    c.handle_guest(&rw(3), Op::Rw, b"abc", &m);
    c.handle_guest(
        &Header {
            flags: SHUTDOWN_F_SEND,
            ..ghdr(Op::Shutdown, 1000, 52)
        },
        Op::Shutdown,
        &[],
        &m,
    );
    let mut got = vec![];
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"abc");
    assert_eq!(c.state(), State::Established, "the host may still send");
    // Host: done too. The guest gets SHUTDOWN(SEND), then we RST.
    host.write_all(b"xy").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    c.host_event(EventSet::IN, &m);
    let mut buf = vec![];
    let h = c.next_packet(4096, &mut buf, &m).unwrap();
    assert_eq!((h.op, &buf[..]), (Op::Rw as u16, &b"xy"[..]));
    c.host_event(EventSet::IN, &m);
    let h = c.next_packet(4096, &mut buf, &m).unwrap();
    assert_eq!((h.op, h.flags), (Op::Shutdown as u16, SHUTDOWN_F_SEND));
    assert_eq!(c.state(), State::Killed);
    let h = c.next_packet(4096, &mut buf, &m).unwrap();
    assert_eq!(h.op, Op::Rst as u16);
    assert!(c.is_finished());
}

#[test]
fn guest_full_shutdown_drains_then_resets_and_data_after_it_is_an_error() {
    let (mut c, _host, m) = established();
    let full = Header {
        flags: SHUTDOWN_F_SEND | SHUTDOWN_F_RECEIVE,
        ..ghdr(Op::Shutdown, 1000, 52)
    };
    c.handle_guest(&full, Op::Shutdown, &[], &m);
    assert_eq!(c.state(), State::Killed, "nothing buffered: RST at once");
    let (mut c, _host, m) = established();
    let chunk = vec![0u8; 64 * 1024];
    while c.buffered() == 0 {
        c.handle_guest(&rw(chunk.len()), Op::Rw, &chunk, &m);
    }
    c.handle_guest(&full, Op::Shutdown, &[], &m);
    assert_eq!(c.state(), State::Closing, "draining to the host first");
    assert!(c.timed_out(
        Instant::now() + Duration::from_secs(6),
        Duration::from_secs(2),
        Duration::from_secs(5)
    ));
    c.handle_guest(&rw(1), Op::Rw, b"z", &m);
    assert_eq!(c.state(), State::Killed);
    assert_eq!(
        m.protocol_errors.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn host_hang_up_delivers_what_is_left_then_both_shutdown_flags() {
    let (mut c, mut host, m) = established();
    host.write_all(b"last words").unwrap();
    drop(host);
    c.host_event(EventSet::IN | EventSet::HANG_UP, &m);
    assert_eq!(c.interest(), None, "off epoll after a hang-up");
    let mut buf = vec![];
    // No RX room for payload: nothing yet, and nothing lost.
    assert_eq!(c.next_packet(0, &mut buf, &m), None);
    let h = c.next_packet(4, &mut buf, &m).unwrap();
    assert_eq!(&buf[..], b"last");
    assert_eq!(h.len, 4);
    let h = c.next_packet(4096, &mut buf, &m).unwrap();
    assert_eq!(&buf[..], b" words");
    assert_eq!(h.op, Op::Rw as u16);
    let h = c.next_packet(4096, &mut buf, &m).unwrap();
    assert_eq!(
        (h.op, h.flags),
        (Op::Shutdown as u16, SHUTDOWN_F_SEND | SHUTDOWN_F_RECEIVE)
    );
    assert_eq!(c.state(), State::Closing);
    // The guest answers with RST: forget, nothing owed.
    c.handle_guest(&ghdr(Op::Rst, 1000, 52), Op::Rst, &[], &m);
    assert!(c.is_finished());
    // A guest writing to a vanished host gets RST.
    let (mut c, host, m) = established();
    drop(host);
    c.handle_guest(&rw(3), Op::Rw, b"abc", &m);
    assert_eq!(c.state(), State::Killed);
    assert_eq!(
        m.host_io_errors.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn host_initiated_handshake() {
    let (ours, mut host) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let m = VsockMetrics::default();
    let key = ConnKey {
        local_port: 1 << 30,
        peer_port: 52,
    };
    let mut c = Connection::host_initiated(ours, key, GUEST_CID);
    assert_eq!(
        c.interest(),
        Some(EventSet::empty()),
        "no reading before the guest accepts"
    );
    let h = c.next_packet(4096, &mut Vec::new(), &m).unwrap();
    assert_eq!(
        (h.op, h.src_cid, h.src_port, h.dst_port),
        (Op::Request as u16, HOST_CID, 1 << 30, 52)
    );
    assert!(!c.wants_rx());
    assert!(!c.timed_out(
        Instant::now(),
        Duration::from_secs(2),
        Duration::from_secs(5)
    ));
    assert!(c.timed_out(
        Instant::now() + Duration::from_secs(3),
        Duration::from_secs(2),
        Duration::from_secs(5)
    ));
    c.handle_guest(&ghdr(Op::Response, 52, 1 << 30), Op::Response, &[], &m);
    assert_eq!(c.state(), State::Established);
    let mut line = [0u8; 14];
    host.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"OK 1073741824\n");
    assert_eq!(c.fwd_cnt, 0, "the OK line is not guest payload");

    // Anything but RESPONSE or RST while connecting is a protocol error.
    let (ours, _host) = UnixStream::pair().unwrap();
    let mut c = Connection::host_initiated(ours, key, GUEST_CID);
    c.handle_guest(&rw(1), Op::Rw, b"x", &m);
    assert_eq!(c.state(), State::Killed);
    // The client hanging up before the guest answers resets the guest side.
    let (ours, host) = UnixStream::pair().unwrap();
    let mut c = Connection::host_initiated(ours, key, GUEST_CID);
    drop(host);
    c.host_event(EventSet::HANG_UP, &m);
    assert_eq!(c.state(), State::Killed);
    c.host_event(EventSet::ERROR, &m);
    assert!(c.wants_rx());
}
