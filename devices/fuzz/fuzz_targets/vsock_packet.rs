//! Fuzzes virtio-vsock, in two parts per input:
//!
//! 1. The packet parser on its own: a guest-controlled descriptor table, available ring and
//!    buffers go through `packet::parse_tx` and `RxBuffer::{parse, write}`, with invariants
//!    on what parsing accepts.
//! 2. The whole device (`Vsock` with its muxer and connections) driven by a command stream:
//!    guest TX packets with mostly-valid headers (so they get past the parser), RX and
//!    event buffers, host clients writing arbitrary CONNECT lines, host peers writing,
//!    half-closing and vanishing, transport resets. Host sockets are real unix sockets in
//!    a per-process temp dir; the event loop is simulated with poll(2) over whatever the
//!    device registered.
//!
//! Input layout for part 1 (short inputs are zero-extended):
//!   [0]        number of available entries (mod 17)
//!   [1..17]    available ring heads (mod 32: indices 16..31 are outside the queue)
//!   [17..145]  16 descriptors of 8 bytes: addr u16, len u16, flags u8, next u8, ext u16
//!              flags: bit0 NEXT, bit1 WRITE, bit2 INDIRECT, bit3 huge length,
//!                     bit4 address beyond guest memory; addr = ext << 16 | addr
//!   [145..]    copied into guest memory at PAYLOAD
//! Part 2 reads the whole input as commands (see `Cmd`).
#![no_main]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::io::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use devices::virtio::queue_handler::Chain;
use devices::virtio::vsock::muxer::{connect_nonblocking, FIRST_EPHEMERAL_PORT};
use devices::virtio::vsock::packet::{self, Header, Op, RxBuffer, HDR_LEN, MAX_PKT_DATA};
use devices::virtio::vsock::{EventRegistry, Vsock, EVENT_QUEUE, HOST_CID, RX_QUEUE, TX_QUEUE};
use devices::virtio::{VirtioDevice, VirtioInterrupt, ACTIVATE_EVENT, QUEUE_EVENT_BASE};
use event_manager::EventSet;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 0x10_0000;

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

// ---------------------------------------------------------------------------------------
// Part 1: the parser on arbitrary chains.

const P1_QSIZE: u16 = 16;
const P1_DESC: u64 = 0x0;
const P1_AVAIL: u64 = 0x100;
const P1_USED: u64 = 0x200;
const PAYLOAD: u64 = 0x1000;

fn p1_memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    for i in 0..usize::from(P1_QSIZE) {
        let at = 17 + i * 8;
        let f = byte(data, at + 4);
        let mut addr = (u64::from(u16_at(data, at + 6)) << 16) | u64::from(u16_at(data, at));
        if f & 0x10 != 0 {
            addr |= 0xffff_0000_0000;
        }
        let mut len = u32::from(u16_at(data, at + 2));
        if f & 0x08 != 0 {
            len |= 0xffff_0000;
        }
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&u16::from(f & 0x07).to_le_bytes());
        raw[14..16].copy_from_slice(&u16::from(byte(data, at + 5) % 32).to_le_bytes());
        mem.write_slice(&raw, GuestAddress(P1_DESC + 16 * i as u64))
            .unwrap();
    }
    mem.write_obj(u16::from(byte(data, 0) % 17), GuestAddress(P1_AVAIL + 2))
        .unwrap();
    for i in 0..P1_QSIZE {
        let head = u16::from(byte(data, 1 + usize::from(i)) % 32);
        mem.write_obj(head, GuestAddress(P1_AVAIL + 4 + 2 * u64::from(i)))
            .unwrap();
    }
    if let Some(p) = data.get(145..) {
        let n = p.len().min(0x4_0000 - PAYLOAD as usize);
        mem.write_slice(&p[..n], GuestAddress(PAYLOAD)).unwrap();
    }
    mem
}

fn queue(size: u16, desc: u64, avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_ready(true);
    q
}

fn check_tx(mem: &GuestMemoryMmap, chain: Chain<'_>) {
    let mut data = Vec::new();
    match packet::parse_tx(mem, chain, GUEST_CID, &mut data) {
        Ok(h) => {
            assert_eq!(h.src_cid, GUEST_CID);
            assert_eq!(h.dst_cid, HOST_CID);
            assert_eq!(h.type_, packet::TYPE_STREAM);
            let op = h.op().unwrap();
            if op == Op::Rw {
                assert_eq!(data.len(), h.len as usize);
                assert!(data.len() <= MAX_PKT_DATA);
            } else {
                assert!(data.is_empty());
            }
        }
        Err(r) => {
            if let Some(h) = r.hdr {
                assert_eq!(h.src_cid, GUEST_CID);
            }
        }
    }
}

fn check_rx(mem: &GuestMemoryMmap, chain: Chain<'_>) {
    if let Ok(buf) = RxBuffer::parse(mem, chain) {
        let cap = buf.data_capacity();
        assert!(cap <= MAX_PKT_DATA);
        let data = vec![0x5a; cap];
        let n = buf.write(mem, &Header::default(), &data).unwrap();
        assert_eq!(n as usize, HDR_LEN + cap);
        assert!(buf
            .write(mem, &Header::default(), &vec![0; cap + 1])
            .is_err());
    }
}

fn part1(data: &[u8]) {
    let mem = p1_memory(data);
    let mut q = queue(P1_QSIZE, P1_DESC, P1_AVAIL, P1_USED);
    let chains: Vec<_> = match q.iter(&mem) {
        Ok(it) => it.collect(),
        Err(_) => Vec::new(),
    };
    for chain in chains {
        if chain.head_index() >= P1_QSIZE {
            continue;
        }
        check_tx(&mem, chain.clone());
        check_rx(&mem, chain);
    }
}

// ---------------------------------------------------------------------------------------
// Part 2: the device, driven by commands.

const QSIZE: u16 = 64;
const QBASE: [u64; 3] = [0x0, 0x1000, 0x2000];
const RX_AREA: u64 = 0x1_0000;
const RX_SLOT: u64 = 0x1100;
const TX_AREA: u64 = 0x6_0000;
const TX_SLOT: u64 = 0x2100;
const TX_MAX_DATA: usize = 0x2000;
const EV_AREA: u64 = 0xF_0000;
const LISTEN_PORT: u32 = 1024;

fn desc_addr(q: usize) -> u64 {
    QBASE[q]
}
fn avail_addr(q: usize) -> u64 {
    QBASE[q] + 0x400
}
fn used_addr(q: usize) -> u64 {
    QBASE[q] + 0x600
}

/// The host side shared by all runs of this process: a temp dir and a listener at
/// `<dir>/v.sock_1024` for guest-initiated connections.
fn host() -> &'static (PathBuf, UnixListener) {
    static HOST: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vsock-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let l = UnixListener::bind(dir.join(format!("v.sock_{LISTEN_PORT}"))).unwrap();
        l.set_nonblocking(true).unwrap();
        (dir, l)
    })
}

/// A simulated event loop: remembers what the device registered and reports real
/// readiness with poll(2).
#[derive(Default)]
struct FakeLoop {
    fds: BTreeMap<RawFd, (u32, EventSet)>,
}

impl EventRegistry for FakeLoop {
    fn watch(&mut self, fd: RawFd, tag: u32, events: EventSet) -> bool {
        assert!(
            self.fds.insert(fd, (tag, events)).is_none(),
            "fd {fd} registered twice"
        );
        true
    }
    fn rewatch(&mut self, fd: RawFd, tag: u32, events: EventSet) -> bool {
        let e = self
            .fds
            .get_mut(&fd)
            .expect("rewatch of an unregistered fd");
        *e = (tag, events);
        true
    }
    fn unwatch(&mut self, fd: RawFd) {
        self.fds.remove(&fd);
    }
}

impl FakeLoop {
    /// One epoll_wait's worth of events: every registered fd that poll says is ready.
    fn ready(&self) -> Vec<(RawFd, u32, EventSet)> {
        let mut out = vec![];
        for (&fd, &(tag, ev)) in &self.fds {
            let mut events: libc::c_short = 0;
            if ev.contains(EventSet::IN) {
                events |= libc::POLLIN;
            }
            if ev.contains(EventSet::OUT) {
                events |= libc::POLLOUT;
            }
            let mut p = libc::pollfd {
                fd,
                events,
                revents: 0,
            };
            // SAFETY: `p` is one valid pollfd for the duration of the call; timeout 0.
            let n = unsafe { libc::poll(&mut p, 1, 0) };
            if n <= 0 {
                continue;
            }
            let mut set = EventSet::empty();
            if p.revents & libc::POLLIN != 0 {
                set |= EventSet::IN;
            }
            if p.revents & libc::POLLOUT != 0 {
                set |= EventSet::OUT;
            }
            if p.revents & libc::POLLHUP != 0 {
                set |= EventSet::HANG_UP;
            }
            if p.revents & libc::POLLERR != 0 {
                set |= EventSet::ERROR;
            }
            if !set.is_empty() {
                out.push((fd, tag, set));
            }
        }
        out
    }
}

struct Guest {
    mem: GuestMemoryMmap,
    avail: [u16; 3],
    used_seen: [u16; 3],
    tx_seq: u16,
}

impl Guest {
    fn new() -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Guest {
            mem,
            avail: [0; 3],
            used_seen: [0; 3],
            tx_seq: 0,
        }
    }

    fn queues(&self) -> Vec<Queue> {
        (0..3)
            .map(|q| queue(QSIZE, desc_addr(q), avail_addr(q), used_addr(q)))
            .collect()
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(used_addr(q) + 2)).unwrap()
    }

    fn outstanding(&self, q: usize) -> u16 {
        self.avail[q].wrapping_sub(self.used_idx(q))
    }

    fn write_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(desc_addr(q) + 16 * u64::from(idx)))
            .unwrap();
    }

    fn offer(&mut self, q: usize, head: u16) {
        let slot = avail_addr(q) + 4 + 2 * u64::from(self.avail[q] % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(avail_addr(q) + 2))
            .unwrap();
    }

    /// RX buffer `len` bytes long; one descriptor per buffer, slot = ring position.
    fn add_rx(&mut self, len: u32) -> bool {
        if self.outstanding(RX_QUEUE) >= QSIZE {
            return false;
        }
        let idx = self.avail[RX_QUEUE] % QSIZE;
        let addr = RX_AREA + u64::from(idx) * RX_SLOT;
        self.write_desc(RX_QUEUE, idx, addr, len.min(RX_SLOT as u32), 2, 0);
        self.offer(RX_QUEUE, idx);
        true
    }

    fn add_event(&mut self) -> bool {
        if self.outstanding(EVENT_QUEUE) >= QSIZE {
            return false;
        }
        let idx = self.avail[EVENT_QUEUE] % QSIZE;
        self.write_desc(EVENT_QUEUE, idx, EV_AREA + 8 * u64::from(idx), 4, 2, 0);
        self.offer(EVENT_QUEUE, idx);
        true
    }

    /// A TX packet: header descriptor plus payload descriptor (two slots per chain).
    fn send(&mut self, hdr: &Header, payload: &[u8]) -> bool {
        if self.outstanding(TX_QUEUE) >= QSIZE / 2 {
            return false;
        }
        let seq = self.tx_seq % (QSIZE / 2);
        self.tx_seq = self.tx_seq.wrapping_add(1);
        let addr = TX_AREA + u64::from(seq) * TX_SLOT;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        let head = seq * 2;
        if payload.is_empty() {
            self.write_desc(TX_QUEUE, head, addr, HDR_LEN as u32, 0, 0);
        } else {
            let d = addr + 0x100;
            self.mem.write_slice(payload, GuestAddress(d)).unwrap();
            self.write_desc(TX_QUEUE, head, addr, HDR_LEN as u32, 1, head + 1);
            self.write_desc(TX_QUEUE, head + 1, d, payload.len() as u32, 0, 0);
        }
        self.offer(TX_QUEUE, head);
        true
    }

    /// Checks every packet the device put in RX buffers since the last call.
    fn check_received(&mut self) {
        let idx = self.used_idx(RX_QUEUE);
        while self.used_seen[RX_QUEUE] != idx {
            let at = used_addr(RX_QUEUE) + 4 + 8 * u64::from(self.used_seen[RX_QUEUE] % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            assert!(id < u32::from(QSIZE));
            if len > 0 {
                let mut raw = [0u8; HDR_LEN];
                let addr = RX_AREA + u64::from(id) * RX_SLOT;
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let h = Header::from_bytes(&raw);
                assert_eq!((h.dst_cid, h.type_), (GUEST_CID, 1));
                let op = h.op().expect("known op");
                // RSTs to packets for a foreign CID come from that CID.
                assert!(h.src_cid == HOST_CID || op == Op::Rst);
                assert_eq!(len as usize, HDR_LEN + h.len as usize);
                assert!(h.len == 0 || op == Op::Rw);
                assert!(h.len as usize <= MAX_PKT_DATA);
            }
            self.used_seen[RX_QUEUE] = self.used_seen[RX_QUEUE].wrapping_add(1);
        }
    }
}

/// Reads command operands from the input.
struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let b = byte(self.data, self.at);
        self.at += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let start = self.at.min(self.data.len());
        let end = (self.at + n).min(self.data.len());
        self.at += n;
        &self.data[start..end]
    }
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}

fn guest_port(b: u8) -> u32 {
    1000 + u32::from(b % 4)
}

fn host_port(b: u8) -> u32 {
    match b % 4 {
        0 => LISTEN_PORT,
        1 => LISTEN_PORT + 1, // nothing listens
        _ => FIRST_EPHEMERAL_PORT + u32::from(b / 4 % 4),
    }
}

fn part2(data: &[u8]) {
    let (dir, listener) = host();
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let mut dev = Vsock::new(GUEST_CID, &uds).unwrap();
    dev.limits_mut().max_conns = 6;
    dev.limits_mut().max_replies = 4;
    let mut guest = Guest::new();
    let mut lp = FakeLoop::default();
    dev.activate(guest.mem.clone(), guest.queues(), Arc::new(NoInterrupt))
        .unwrap();
    dev.handle_event(ACTIVATE_EVENT, -1, EventSet::IN, &mut lp);
    let mut peers: Vec<UnixStream> = Vec::new();
    let mut inp = Input { data, at: 0 };
    let mut steps = 0;
    while !inp.done() && steps < 256 {
        steps += 1;
        match inp.u8() % 9 {
            0 => {
                // A guest packet with our CIDs (mostly) and a chosen op, ports, credit.
                let (op, misc, sp, dp) = (inp.u8(), inp.u8(), inp.u8(), inp.u8());
                let len = usize::from(inp.u16()) % (TX_MAX_DATA + 1);
                let hdr = Header {
                    src_cid: if misc & 0x80 != 0 {
                        GUEST_CID + 1
                    } else {
                        GUEST_CID
                    },
                    dst_cid: if misc & 0x40 != 0 { 5 } else { HOST_CID },
                    src_port: guest_port(sp),
                    dst_port: host_port(dp),
                    len: len as u32,
                    type_: if misc & 0x20 != 0 { 2 } else { 1 },
                    op: u16::from(op % 9),
                    flags: u32::from(misc & 0x3),
                    buf_alloc: u32::from(inp.u16()) << (misc >> 2 & 0x7),
                    fwd_cnt: u32::from(inp.u16()) << 4,
                };
                let payload = inp.bytes(len.min(64)).to_vec();
                let mut full = payload.clone();
                full.resize(len, 0xab);
                let mut h = hdr;
                if misc & 0x10 != 0 {
                    h.len = (len as u32).saturating_add(1); // lies about its length
                }
                if guest.send(&h, &full) {
                    dev.handle_event(
                        QUEUE_EVENT_BASE + TX_QUEUE as u32,
                        -1,
                        EventSet::IN,
                        &mut lp,
                    );
                }
            }
            1 => {
                let n = inp.u8() % 8;
                let size = match inp.u8() % 4 {
                    0 => 43,
                    1 => 44,
                    2 => 44 + 100,
                    _ => 44 + 4096,
                };
                for _ in 0..n {
                    guest.add_rx(size);
                }
                dev.handle_event(
                    QUEUE_EVENT_BASE + RX_QUEUE as u32,
                    -1,
                    EventSet::IN,
                    &mut lp,
                );
            }
            2 => {
                // A host client connects and writes a (possibly broken) CONNECT line.
                let n = usize::from(inp.u8() % 40);
                let line: Vec<u8> = if inp.u8() % 2 == 0 {
                    format!("CONNECT {}\n", guest_port(inp.u8())).into_bytes()
                } else {
                    inp.bytes(n).to_vec()
                };
                if let Ok(mut c) = connect_nonblocking(&uds) {
                    let _ = c.write(&line);
                    peers.push(c);
                }
            }
            3 => {
                // A host peer writes.
                let i = usize::from(inp.u8());
                let n = usize::from(inp.u16() % 8192);
                if !peers.is_empty() {
                    let buf = vec![0x42u8; n];
                    let k = i % peers.len();
                    let _ = peers[k].write(&buf);
                }
            }
            4 => {
                // A host peer reads, half-closes or vanishes.
                let i = usize::from(inp.u8());
                let what = inp.u8() % 4;
                if !peers.is_empty() {
                    let k = i % peers.len();
                    match what {
                        0 => {
                            let mut buf = [0u8; 8192];
                            let _ = peers[k].read(&mut buf);
                        }
                        1 => {
                            let _ = peers[k].shutdown(Shutdown::Write);
                        }
                        2 => {
                            let _ = peers[k].shutdown(Shutdown::Read);
                        }
                        _ => {
                            peers.swap_remove(k);
                        }
                    }
                }
            }
            5 | 6 => {
                // The event loop runs: accept what the device connected to, then deliver
                // real readiness.
                while let Ok((s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(true);
                    peers.push(s);
                }
                for (fd, tag, set) in lp.ready() {
                    if lp.fds.contains_key(&fd) {
                        dev.handle_event(tag, fd, set, &mut lp);
                    }
                }
            }
            7 => {
                dev.send_transport_reset();
                guest.add_event();
                dev.handle_event(ACTIVATE_EVENT, -1, EventSet::IN, &mut lp);
                dev.handle_event(
                    QUEUE_EVENT_BASE + EVENT_QUEUE as u32,
                    -1,
                    EventSet::IN,
                    &mut lp,
                );
            }
            _ => {
                if inp.u8() % 8 == 0 {
                    // Driver reset, then activation again with the same rings.
                    dev.reset();
                    dev.handle_event(ACTIVATE_EVENT, -1, EventSet::IN, &mut lp);
                    assert_eq!(dev.connection_count(), 0);
                    guest = Guest::new();
                    dev.activate(guest.mem.clone(), guest.queues(), Arc::new(NoInterrupt))
                        .unwrap();
                    dev.handle_event(ACTIVATE_EVENT, -1, EventSet::IN, &mut lp);
                }
            }
        }
        guest.check_received();
        assert!(dev.connection_count() <= 6);
        for q in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
            assert!(
                guest.outstanding(q) <= QSIZE,
                "used ring ran ahead of avail"
            );
        }
    }
    drop(dev);
    while let Ok((s, _)) = listener.accept() {
        drop(s);
    }
}

fuzz_target!(|data: &[u8]| {
    part1(data);
    part2(data);
});
