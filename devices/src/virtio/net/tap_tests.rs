//! Tests of the real tap backend: its read/writev code over a SOCK_SEQPACKET socketpair
//! (frame boundaries kept, like a tap), the device on the event loop over it, and a real
//! tap through /dev/net/tun (needs root; fails loudly rather than skipping).

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::virtio::net::test_utils::{frame, Driver, RX_RING, TX_RING};
use crate::virtio::net::{Net, VnetHdr};
use crate::virtio::test_utils::{mem, CountingInterrupt};
use crate::virtio::{feature, VirtioDevice, VIRTIO_F_VERSION_1};

/// Two connected SOCK_SEQPACKET sockets, non-blocking.
fn seqpacket_pair() -> (File, File) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the 2-element array, alive for the call.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (File::from(a), File::from(b))
}

#[test]
fn reads_and_gathered_writes_keep_frame_boundaries() {
    let (a, mut peer) = seqpacket_pair();
    let mut tap = Tap::from_file(a, "pair");
    assert_eq!(tap.name(), "pair");
    let m = mem();
    let data: Vec<u8> = (0..300u32)
        .map(|i| u8::try_from(i % 256).unwrap())
        .collect();
    m.write_slice(&data, GuestAddress(0x1000)).unwrap();
    let slices: Vec<_> = [(0x1000u64, 100usize), (0x1064, 200)]
        .iter()
        .flat_map(|&(a, l)| GuestMemoryBackend::get_slices(&m, GuestAddress(a), l))
        .map(Result::unwrap)
        .collect();
    let hdr = [7u8; 12];
    assert_eq!(tap.write_frame(&hdr, &slices).unwrap(), 312);
    let mut got = vec![0u8; 1000];
    let n = peer.read(&mut got).unwrap();
    assert_eq!(got[..12], hdr);
    assert_eq!(got[12..n], data[..]);

    use std::io::Write;
    peer.write_all(&[1, 2, 3]).unwrap();
    peer.write_all(&[4, 5]).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(tap.read_frame(&mut buf).unwrap(), 3);
    assert_eq!(tap.read_frame(&mut buf).unwrap(), 2);
    let e = tap.read_frame(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    // Not a tap: TUNSETOFFLOAD is refused, and the error is reported.
    assert!(tap.set_offload(libc::TUN_F_CSUM).is_err());
}

#[test]
fn device_over_a_socket_on_the_event_loop() {
    let (a, mut peer) = seqpacket_pair();
    let m = mem();
    let net = Arc::new(Mutex::new(
        Net::with_backend(Box::new(Tap::from_file(a, "pair")), None, None).unwrap(),
    ));
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(net.clone());
    let mut rx = Driver::new(&m, RX_RING, 256);
    let mut tx = Driver::new(&m, TX_RING, 256);
    let irq = Arc::new(CountingInterrupt::default());
    {
        let mut n = net.lock().unwrap();
        n.set_acked_features(feature(VIRTIO_F_VERSION_1));
        n.activate(m.clone(), vec![rx.queue(), tx.queue()], irq.clone())
            .unwrap();
    }
    em.run_with_timeout(100).unwrap();

    use std::io::Write;
    rx.add_chain(&[(0x40_0000, 1526, VRING_DESC_F_WRITE)]);
    let f1 = frame(VnetHdr::default(), 90, 4);
    peer.write_all(&f1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(rx.used_elem(0), (0, 102));
    let mut got = vec![0u8; 90];
    m.read_slice(&mut got, GuestAddress(0x40_000c)).unwrap();
    assert_eq!(got, f1[12..]);

    let f2 = frame(VnetHdr::default(), 70, 5);
    m.write_slice(&f2, GuestAddress(0x10_0000)).unwrap();
    tx.add_chain(&[(0x10_0000, 82, 0)]);
    net.lock().unwrap().process_tx();
    let mut buf = vec![0u8; 200];
    let n = peer.read(&mut buf).unwrap();
    assert_eq!(buf[..n], f2[..]);
}

#[test]
fn names_that_cannot_be_interfaces_are_refused() {
    for bad in ["", "0123456789abcdef", "a\0b"] {
        let e = Tap::open(bad).unwrap_err();
        assert!(matches!(e, NetError::TapName(_)), "{bad:?}: {e}");
    }
}

/// Runs `ip` with `args`, panicking with its output on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A raw AF_PACKET socket sending `frame` out of interface `ifindex`.
fn packet_send(ifindex: i32, frame: &[u8]) {
    // SAFETY: plain socket creation; the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroes are valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap();
    // SAFETY: `frame` and `sll` are alive for the call; the lengths passed are theirs.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::addr_of!(sll).cast(),
            len,
        )
    };
    assert_eq!(
        usize::try_from(n).ok(),
        Some(frame.len()),
        "sendto: {}",
        io::Error::last_os_error()
    );
}

/// Opens a real tap (root and /dev/net/tun required: this test fails, not skips, without
/// them), checks the ioctls the device relies on, moves one frame each way through the
/// host kernel, and checks the tap disappears once closed.
#[test]
fn real_tap_through_dev_net_tun() {
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: this test needs the tun driver (modprobe tun)"
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (CAP_NET_ADMIN) to create a tap"
    );
    let name = format!("vmmtest{}", std::process::id() % 100_000_000);
    let sys = format!("/sys/class/net/{name}");
    {
        let mut tap = Tap::open(&name).unwrap();
        assert_eq!(tap.name(), name);
        assert!(Path::new(&sys).exists());
        let flags = std::fs::read_to_string(format!("{sys}/tun_flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 0x5003, 0x5002, "IFF_TAP | IFF_NO_PI | IFF_VNET_HDR");
        // Every offload combination the device may ask for.
        for acked in [0, u64::MAX] {
            tap.set_offload(Net::offload_flags(acked)).unwrap();
        }
        ip(&["link", "set", "dev", &name, "up"]);
        let err = Tap::open(&name).err().unwrap().to_string();
        assert!(err.contains(&name), "errors name the tap: {err}");

        // Guest -> host: a broadcast frame with a plain header; the kernel counts it.
        let m = mem();
        let mut eth = vec![0xffu8; 6];
        eth.extend([2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        eth.extend([0u8; 50]);
        m.write_slice(&eth, GuestAddress(0x1000)).unwrap();
        let slices: Vec<_> = GuestMemoryBackend::get_slices(&m, GuestAddress(0x1000), eth.len())
            .map(Result::unwrap)
            .collect();
        let n = tap.write_frame(&[0u8; 12], &slices).unwrap();
        assert_eq!(n, 12 + eth.len());
        let rx_packets: u64 = std::fs::read_to_string(format!("{sys}/statistics/rx_packets"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(rx_packets >= 1);

        // Host -> guest: a frame sent out of the interface comes out of the fd with a
        // vnet header. Other traffic (IPv6 ND) may come first: look for ours.
        let ifindex: i32 = std::fs::read_to_string(format!("{sys}/ifindex"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut out = vec![2u8, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 3, 0x88, 0xb5];
        out.extend((0..46u8).map(|i| i ^ 0x5a));
        packet_send(ifindex, &out);
        let mut buf = vec![0u8; 70_000];
        let mut found = false;
        for _ in 0..200 {
            match tap.read_frame(&mut buf) {
                Ok(n) if buf.get(12..n) == Some(&out[..]) => {
                    found = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("tap read: {e}"),
            }
        }
        assert!(
            found,
            "frame sent out of {name} never came out of the tap fd"
        );
    }
    assert!(!Path::new(&sys).exists(), "tap removed once its fd closed");

    // The device constructor over a real tap.
    let net = Net::new(&name, None, Some(1500)).unwrap();
    assert_eq!(net.tap_name(), name);
    drop(net);
    assert!(!Path::new(&sys).exists());
}
