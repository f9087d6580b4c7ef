//! Real-guest tests of virtio-net over a tap (issue "virtio-net over tap, and vsock"): the
//! guest gets its address from the kernel's ip= parameter, pings the host end of its tap,
//! and moves 256 MiB each way over TCP with matching checksums; two NICs on two subnets.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::thread;

use common::{guest_value, Guest};
use tests::guest_exit_status;

/// A tap with an address on the host side; deleted on drop.
struct Tap {
    name: String,
}

impl Tap {
    fn new(name: &str, host_cidr: &str) -> Tap {
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        // A jailed VMM (unprivileged) may only attach to a tap its uid owns.
        let mut add = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        let uid = tests::jail::jail_uid().map(|u| u.to_string());
        if let Some(u) = &uid {
            add.extend(["user", u.as_str()]);
        }
        for args in [
            add,
            vec!["addr", "add", host_cidr, "dev", name],
            vec!["link", "set", name, "up"],
        ] {
            let st = Command::new("ip").args(&args).status().expect("running ip");
            assert!(st.success(), "ip {args:?} failed");
        }
        Tap { name: name.into() }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// Accepts one connection, or gives up after `limit` so a guest that never connects fails
/// the test instead of hanging it.
fn accept_within(
    l: &TcpListener,
    limit: std::time::Duration,
    vm_done: &std::sync::atomic::AtomicBool,
) -> Option<std::net::TcpStream> {
    l.set_nonblocking(true).ok()?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ok()?;
                s.set_read_timeout(Some(limit)).ok()?;
                s.set_write_timeout(Some(limit)).ok()?;
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline
                    || vm_done.load(std::sync::atomic::Ordering::Acquire)
                {
                    return None;
                }
                thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(_) => return None,
        }
    }
}

fn ip_param(guest: &str, host: &str, dev: &str) -> String {
    format!("ip={guest}::{host}:255.255.255.0::{dev}:off")
}

/// Deterministic bytes (xorshift), so both sides can checksum without storing them.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn md5_hex(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

const MIB: usize = 1 << 20;

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn ping_and_256_mib_tcp_both_ways() {
    let tap = Tap::new("vmmnet0", "172.16.0.1/24");
    let len = 256 * MIB;
    let data = pattern(len);
    let want = md5_hex(&data);

    // Host -> guest: the host serves the pattern on port 5000 and closes.
    let to_guest = TcpListener::bind("172.16.0.1:5000").unwrap();
    let limit = std::time::Duration::from_secs(600);
    let vm_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = vm_done.clone();
    let sender = thread::spawn(move || {
        let mut s =
            accept_within(&to_guest, limit, &done).ok_or("the guest never connected to 5000")?;
        s.write_all(&data)
            .map_err(|_| "sending to the guest failed")
    });
    // Guest -> host: the guest sends back what it received; the host reads exactly `len`
    // bytes on port 5001 and compares them with the pattern.
    let from_guest = TcpListener::bind("172.16.0.1:5001").unwrap();
    let expected = pattern(len);
    let done = vm_done.clone();
    let receiver = thread::spawn(move || {
        let mut s =
            accept_within(&from_guest, limit, &done).ok_or("the guest never connected to 5001")?;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf)
            .map_err(|_| "the guest sent fewer bytes than it received")?;
        drop(s);
        Ok::<bool, &str>(buf == expected)
    });

    // Everything in the guest runs emulated in the test host: keep its own work small
    // (no urandom, one checksum).
    let cmd =
        "busybox sh -c 'ping -c 3 -W 5 172.16.0.1 >/dev/null && echo PING=ok || echo PING=fail; \
               nc 172.16.0.1 5000 > /tmp/data; \
               echo DOWN=$(md5sum /tmp/data | cut -c1-32); \
               nc 172.16.0.1 5001 < /tmp/data'";
    let out = Guest::new()
        .machine(2, 768)
        .timeout(std::time::Duration::from_secs(600))
        .args(&["--net", &format!("tap={},mac=06:00:ac:10:00:02", tap.name)])
        .kernel_args(&ip_param("172.16.0.2", "172.16.0.1", "eth0"))
        .kernel_args("loglevel=7")
        .cmd(cmd)
        .run();
    // The VM has ended: anything still waiting for a connection gives up now.
    vm_done.store(true, std::sync::atomic::Ordering::Release);
    let sent = sender.join().unwrap();
    let up = receiver.join().unwrap();
    assert_eq!(guest_value(&out, "PING"), "ok", "{}", out.output);
    assert_eq!(
        guest_value(&out, "DOWN"),
        want,
        "host->guest checksum:\n{}",
        out.output
    );
    assert_eq!(sent, Ok(()), "{}", out.output);
    assert_eq!(
        up,
        Ok(true),
        "guest->host bytes differ from what was sent:\n{}",
        out.output
    );
    assert_eq!(guest_exit_status(&out.output), Some(0), "{}", out.output);
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn two_nics_on_two_subnets() {
    let a = Tap::new("vmmnet1", "172.16.1.1/24");
    let b = Tap::new("vmmnet2", "172.16.2.1/24");
    // The kernel's ip= configures one interface; the second is set up by the command.
    let cmd = "busybox sh -c 'ip addr add 172.16.2.2/24 dev eth1 && ip link set eth1 up; \
               ping -c 2 -W 5 172.16.1.1 >/dev/null && echo A=ok || echo A=fail; \
               ping -c 2 -W 5 172.16.2.1 >/dev/null && echo B=ok || echo B=fail; \
               echo MACS=$(cat /sys/class/net/eth0/address)/$(cat /sys/class/net/eth1/address)'";
    let out = Guest::new()
        .args(&[
            "--net",
            &format!("tap={},mac=06:00:ac:10:01:02", a.name),
            "--net",
            &format!("tap={},mac=06:00:ac:10:02:02", b.name),
        ])
        .kernel_args(&ip_param("172.16.1.2", "172.16.1.1", "eth0"))
        .cmd(cmd)
        .run();
    assert_eq!(guest_value(&out, "A"), "ok", "{}", out.output);
    assert_eq!(guest_value(&out, "B"), "ok", "{}", out.output);
    assert_eq!(
        guest_value(&out, "MACS"),
        "06:00:ac:10:01:02/06:00:ac:10:02:02",
        "{}",
        out.output
    );
}
