//! Unit tests of the muxer without an event loop: the CONNECT line, non-blocking connects,
//! port allocation, reply bounds, fairness, and the socket file's life.

use super::*;
use crate::virtio::vsock::test_utils::{ghdr, GUEST_CID};
use std::io::Write;
use vmm_sys_util::tempdir::TempDir;

fn muxer() -> (TempDir, Muxer) {
    let dir = TempDir::new_with_prefix("/tmp/vsock-mux-").unwrap();
    let path = dir.as_path().join("m.sock");
    let m = Muxer::new(GUEST_CID, &path, Arc::new(VsockMetrics::default())).unwrap();
    (dir, m)
}

#[test]
fn connect_line_is_strict() {
    assert_eq!(parse_connect(b"CONNECT 52").unwrap(), 52);
    assert_eq!(parse_connect(b"CONNECT 4294967295").unwrap(), u32::MAX);
    for bad in [
        &b"CONNECT 4294967296"[..],
        b"CONNECT ",
        b"CONNECT +5",
        b"CONNECT -5",
        b"CONNECT 5 ",
        b"connect 5",
        b"CONNECT\t5",
        b"",
        b"\xff\xfe",
    ] {
        assert!(
            matches!(parse_connect(bad), Err(HandshakeError::Malformed)),
            "{bad:?}"
        );
    }
}

#[test]
fn handshake_reads_nothing_past_the_newline() {
    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let mut h = Handshake {
        stream: a,
        line: vec![],
        since: Instant::now(),
    };
    b.write_all(b"CONN").unwrap();
    assert!(matches!(h.read_line(), Ok(None)));
    b.write_all(b"ECT 7\npayload").unwrap();
    assert_eq!(h.read_line().unwrap(), Some(7));
    let mut rest = [0u8; 7];
    h.stream.read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"payload");

    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let mut h = Handshake {
        stream: a,
        line: vec![],
        since: Instant::now(),
    };
    b.write_all(&[b'9'; 40]).unwrap();
    assert!(matches!(h.read_line(), Err(HandshakeError::TooLong)));
    drop(b);
    let (a, b) = UnixStream::pair().unwrap();
    let mut h = Handshake {
        stream: a,
        line: vec![],
        since: Instant::now(),
    };
    drop(b);
    assert!(matches!(h.read_line(), Err(HandshakeError::Eof)));
}

#[test]
fn nonblocking_connect() {
    let dir = TempDir::new_with_prefix("/tmp/vsock-conn-").unwrap();
    let p = dir.as_path().join("l");
    assert_eq!(
        connect_nonblocking(&p).unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
    let l = UnixListener::bind(&p).unwrap();
    let s = connect_nonblocking(&p).unwrap();
    let (mut peer, _) = l.accept().unwrap();
    send_ok(&s);
    let mut b = [0u8; 2];
    peer.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hi");
    let long = dir.as_path().join("x".repeat(200));
    assert_eq!(
        connect_nonblocking(&long).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
}

fn send_ok(mut s: &UnixStream) {
    s.write_all(b"hi").unwrap();
}

#[test]
fn ports_are_unique_among_live_connections_and_wrap() {
    let (_d, mut m) = muxer();
    assert_eq!(m.alloc_port(), Some(FIRST_EPHEMERAL_PORT));
    // Occupy the next port with a live connection: it is skipped.
    let (a, _b) = UnixStream::pair().unwrap();
    let key = ConnKey {
        local_port: FIRST_EPHEMERAL_PORT + 1,
        peer_port: 9,
    };
    m.conns
        .insert(key, Connection::host_initiated(a, key, GUEST_CID));
    assert_eq!(m.alloc_port(), Some(FIRST_EPHEMERAL_PORT + 2));
    m.next_port = u32::MAX;
    assert_eq!(m.alloc_port(), Some(u32::MAX));
    assert_eq!(
        m.alloc_port(),
        Some(FIRST_EPHEMERAL_PORT),
        "wraps to the range start"
    );
}

#[test]
fn replies_are_bounded_and_never_answer_a_rst() {
    let (_d, mut m) = muxer();
    m.limits_mut().max_replies = 2;
    m.reply_rst(&ghdr(Op::Rst, 1, 2));
    assert!(!m.has_rx());
    for _ in 0..5 {
        m.reply_rst(&ghdr(Op::Rw, 1, 2));
    }
    assert!(m.tx_blocked());
    let mut buf = vec![];
    let mut n = 0;
    while let Some(h) = m.next_rx(4096, &mut buf, &mut NoEventLoop) {
        assert_eq!(
            (h.op, h.dst_cid, h.dst_port),
            (Op::Rst as u16, GUEST_CID, 1)
        );
        n += 1;
    }
    assert_eq!(n, 2);
    assert!(!m.tx_blocked());
}

#[test]
fn connections_are_served_round_robin() {
    let (dir, mut m) = muxer();
    let reg = &mut NoEventLoop;
    let mut hosts = vec![];
    for port in [100u32, 200] {
        let l = UnixListener::bind(dir.as_path().join(format!("m.sock_{port}"))).unwrap();
        m.handle_tx(&ghdr(Op::Request, port + 1, port), &[], reg);
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&[0u8; 20_000]).unwrap();
        hosts.push(s);
    }
    let mut buf = vec![];
    // RESPONSEs first, in request order.
    let order: Vec<(u16, u32)> = (0..2)
        .map(|_| {
            m.next_rx(4096, &mut buf, reg)
                .map(|h| (h.op, h.src_port))
                .unwrap()
        })
        .collect();
    assert_eq!(
        order,
        vec![(Op::Response as u16, 100), (Op::Response as u16, 200)]
    );
    for fd in m.by_fd.keys().copied().collect::<Vec<_>>() {
        m.handle_event(HOST_STREAM_EVENT, fd, EventSet::IN, reg);
    }
    // A reply for an unknown flow takes its turn too.
    m.reply_rst(&ghdr(Op::Rw, 5, 6));
    let mut seen = vec![];
    for _ in 0..7 {
        let h = m.next_rx(4096, &mut buf, reg).unwrap();
        seen.push(if h.op == Op::Rst as u16 {
            0
        } else {
            h.src_port
        });
    }
    assert_eq!(seen.iter().filter(|&&p| p == 0).count(), 1);
    let data: Vec<u32> = seen.into_iter().filter(|&p| p != 0).collect();
    for pair in data.windows(2) {
        assert_ne!(pair[0], pair[1], "alternates: {data:?}");
    }
}

#[test]
fn socket_file_is_removed_on_drop_only_if_still_ours() {
    let (dir, m) = muxer();
    let p = dir.as_path().join("m.sock");
    assert!(p.exists());
    drop(m);
    assert!(!p.exists());
    // Someone replaced the file: leave theirs alone.
    let (_d, m) = muxer();
    let p2 = m.uds_path().to_path_buf();
    std::fs::remove_file(&p2).unwrap();
    std::fs::write(&p2, b"not ours").unwrap();
    drop(m);
    assert!(p2.exists());
    // An existing path is an error that names it.
    let err = Muxer::new(GUEST_CID, &p2, Arc::new(VsockMetrics::default())).unwrap_err();
    assert!(err.to_string().contains(&*p2.to_string_lossy()), "{err}");
}
