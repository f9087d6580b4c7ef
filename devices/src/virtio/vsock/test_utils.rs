//! Test helpers for virtio-vsock: the guest driver's side of the three queues (laid out
//! with virtio-queue's `MockSplitQueue` at distinct guest addresses), and a harness that
//! runs a [`Vsock`] on a real event manager with its sockets in a temp dir.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

use super::connection::CONN_BUF_SIZE;
use super::muxer::Limits;
use super::packet::{Header, Op, HDR_LEN, TYPE_STREAM};
use super::{Vsock, EVENT_QUEUE, HOST_CID, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::virtio::test_utils::{mem, CountingInterrupt};
use crate::virtio::VirtioDevice;

/// The guest's CID in tests.
pub const GUEST_CID: u64 = 3;
/// Queue size used by the driver side.
pub const QSIZE: u16 = 256;
/// Write-only descriptor flag.
pub const W: u32 = VRING_DESC_F_WRITE;
/// Payload room of the RX buffers [`Driver::add_rx_buffers`] offers (Linux uses 4 KiB).
pub const RX_DATA: u32 = 4096;

const QUEUE_BASE: [u64; NUM_QUEUES] = [0x0, 0x1_0000, 0x2_0000];
const RX_AREA: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const TX_AREA: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u64 = 64;
const EV_AREA: u64 = 0xF0_0000;

/// A header from the guest: our CID to the host, stream type, full credit.
pub fn ghdr(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op: op as u16,
        buf_alloc: CONN_BUF_SIZE,
        ..Header::default()
    }
}

/// Where one queue's rings are.
#[derive(Clone, Copy)]
struct Rings {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

/// The driver's side of the three queues.
///
/// The layout comes from `MockSplitQueue`, created once per queue (creating one zeroes
/// its rings); after that the rings are written directly.
pub struct Driver {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    rings: [Rings; NUM_QUEUES],
    next_desc: [u16; NUM_QUEUES],
    seen_used: [u16; NUM_QUEUES],
    rx_slot: u64,
    tx_slot: u64,
    /// RX/event head index -> buffer address.
    bufs: HashMap<(usize, u16), u64>,
}

impl Driver {
    /// Fresh guest memory with three empty queues.
    pub fn new() -> Driver {
        let mem = mem();
        let rings = QUEUE_BASE.map(|base| {
            let mq = MockSplitQueue::create(&mem, GuestAddress(base), QSIZE);
            Rings {
                desc: mq.desc_table_addr(),
                avail: mq.avail_addr(),
                used: mq.used_addr(),
            }
        });
        Driver {
            mem,
            rings,
            next_desc: [0; NUM_QUEUES],
            seen_used: [0; NUM_QUEUES],
            rx_slot: 0,
            tx_slot: 0,
            bufs: HashMap::new(),
        }
    }

    /// The device's queues, as the transport would build them.
    pub fn queues(&self) -> Vec<Queue> {
        self.rings
            .iter()
            .map(|r| {
                let mut q = Queue::new(QSIZE).unwrap();
                q.try_set_desc_table_address(r.desc).unwrap();
                q.try_set_avail_ring_address(r.avail).unwrap();
                q.try_set_used_ring_address(r.used).unwrap();
                q.set_ready(true);
                q
            })
            .collect()
    }

    /// Address of queue `q`'s available ring.
    pub fn avail_addr(&self, q: usize) -> GuestAddress {
        self.rings[q].avail
    }

    /// Writes `descs` (address, length, flags) at the next free table slots, chained with
    /// NEXT, and offers the head. Returns the head index.
    pub fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u32)]) -> u16 {
        let r = self.rings[q];
        let n = u16::try_from(descs.len()).unwrap();
        if self.next_desc[q] + n > QSIZE {
            self.next_desc[q] = 0;
        }
        let start = self.next_desc[q];
        self.next_desc[q] += n;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = start + u16::try_from(i).unwrap();
            let (flags, next) = if i + 1 < descs.len() {
                (flags | VRING_DESC_F_NEXT, idx + 1)
            } else {
                (flags, 0)
            };
            let d = Descriptor::new(addr, len, u16::try_from(flags).unwrap(), next);
            let at = r.desc.unchecked_add(16 * u64::from(idx));
            self.mem.write_obj(RawDescriptor::from(d), at).unwrap();
        }
        let idx: u16 = self.mem.read_obj(r.avail.unchecked_add(2)).unwrap();
        let slot = r.avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE));
        self.mem.write_obj(start, slot).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), r.avail.unchecked_add(2))
            .unwrap();
        start
    }

    /// Offers `n` RX buffers of one descriptor each, room for a header and `data` bytes.
    pub fn add_rx_buffers(&mut self, n: usize, data: u32) {
        for _ in 0..n {
            let addr = RX_AREA + (self.rx_slot % 256) * RX_SLOT;
            self.rx_slot += 1;
            let len = u32::try_from(HDR_LEN).unwrap() + data;
            let head = self.add_chain(RX_QUEUE, &[(addr, len, W)]);
            self.bufs.insert((RX_QUEUE, head), addr);
        }
    }

    /// Puts a TX packet on the queue: header in one descriptor, payload in another.
    pub fn send(&mut self, hdr: &Header, data: &[u8]) {
        let mut h = *hdr;
        h.len = u32::try_from(data.len()).unwrap();
        self.send_raw(&h.to_bytes(), data);
    }

    /// Puts raw header bytes and payload on the TX queue.
    pub fn send_raw(&mut self, hdr: &[u8], data: &[u8]) {
        let addr = TX_AREA + (self.tx_slot % TX_SLOTS) * TX_SLOT;
        self.tx_slot += 1;
        self.mem.write_slice(hdr, GuestAddress(addr)).unwrap();
        let hlen = u32::try_from(hdr.len()).unwrap();
        if data.is_empty() {
            self.add_chain(TX_QUEUE, &[(addr, hlen, 0)]);
        } else {
            let daddr = addr + 0x100;
            self.mem.write_slice(data, GuestAddress(daddr)).unwrap();
            let dlen = u32::try_from(data.len()).unwrap();
            self.add_chain(TX_QUEUE, &[(addr, hlen, 0), (daddr, dlen, 0)]);
        }
    }

    /// Offers one 4-byte event buffer.
    pub fn add_event_buffer(&mut self) {
        let addr = EV_AREA + u64::from(self.next_desc[EVENT_QUEUE]) * 8;
        self.mem
            .write_obj(0xffff_ffffu32, GuestAddress(addr))
            .unwrap();
        let head = self.add_chain(EVENT_QUEUE, &[(addr, 4, W)]);
        self.bufs.insert((EVENT_QUEUE, head), addr);
    }

    /// Used elements of queue `q` not returned before, as (head, length).
    pub fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let r = self.rings[q];
        let idx: u16 = self.mem.read_obj(r.used.unchecked_add(2)).unwrap();
        let mut out = vec![];
        while self.seen_used[q] != idx {
            let at = r
                .used
                .unchecked_add(4 + 8 * u64::from(self.seen_used[q] % QSIZE));
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((u16::try_from(id).unwrap(), len));
            self.seen_used[q] = self.seen_used[q].wrapping_add(1);
        }
        out
    }

    /// Packets the device put in RX buffers since the last call.
    pub fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.used(RX_QUEUE);
        used.into_iter()
            .filter(|&(head, len)| {
                // Buffers the device refused come back empty.
                let known = self.bufs.contains_key(&(RX_QUEUE, head));
                assert!(known || len == 0);
                known
            })
            .map(|(head, len)| {
                let addr = self.bufs[&(RX_QUEUE, head)];
                let mut raw = [0u8; HDR_LEN];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let h = Header::from_bytes(&raw);
                assert_eq!(len as usize, HDR_LEN + h.len as usize, "used length");
                let mut data = vec![0u8; h.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
                    .unwrap();
                (h, data)
            })
            .collect()
    }

    /// Event ids the device wrote since the last call.
    pub fn events(&mut self) -> Vec<u32> {
        let used = self.used(EVENT_QUEUE);
        used.into_iter()
            .map(|(head, len)| {
                assert_eq!(len, 4);
                self.mem
                    .read_obj(GuestAddress(self.bufs[&(EVENT_QUEUE, head)]))
                    .unwrap()
            })
            .collect()
    }
}

/// A [`Vsock`] on a real event manager, activated with [`Driver`]'s queues.
pub struct Harness {
    /// Holds the sockets; removed on drop.
    pub dir: TempDir,
    /// The device's listening socket.
    pub uds: PathBuf,
    /// The guest driver.
    pub drv: Driver,
    /// The device.
    pub vsock: Arc<Mutex<Vsock>>,
    /// The event loop.
    pub em: EventManager<Arc<Mutex<Vsock>>>,
    /// Interrupts sent.
    pub irq: Arc<CountingInterrupt>,
}

impl Harness {
    /// A device with default limits.
    pub fn new() -> Harness {
        Harness::with_limits(|_| {})
    }

    /// A device whose limits `f` adjusts before activation.
    pub fn with_limits(f: impl FnOnce(&mut Limits)) -> Harness {
        let dir = TempDir::new_with_prefix("/tmp/vsock-test-").unwrap();
        let uds = dir.as_path().join("v.sock");
        let mut dev = Vsock::new(GUEST_CID, &uds).unwrap();
        f(dev.limits_mut());
        let vsock = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(vsock.clone());
        let drv = Driver::new();
        let irq = Arc::new(CountingInterrupt::default());
        vsock
            .lock()
            .unwrap()
            .activate(drv.mem.clone(), drv.queues(), irq.clone())
            .unwrap();
        let mut h = Harness {
            dir,
            uds,
            drv,
            vsock,
            em,
            irq,
        };
        h.pump();
        h
    }

    /// Runs the event loop until it goes quiet. Panics if it never does: a level-
    /// triggered fd left ready without progress would spin the VMM.
    pub fn pump(&mut self) {
        for _ in 0..200 {
            if self.em.run_with_timeout(10).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went quiet");
    }

    /// Notifies queue `q`, as the guest's MMIO write would.
    pub fn kick(&self, q: usize) {
        self.vsock.lock().unwrap().queue_events()[q]
            .write(1)
            .unwrap();
    }

    /// The guest sends a packet; the loop runs.
    pub fn send(&mut self, hdr: &Header, data: &[u8]) {
        self.drv.send(hdr, data);
        self.kick(TX_QUEUE);
        self.pump();
    }

    /// The guest offers `n` RX buffers; the loop runs.
    pub fn give_rx(&mut self, n: usize) {
        self.drv.add_rx_buffers(n, RX_DATA);
        self.kick(RX_QUEUE);
        self.pump();
    }

    /// Packets the guest received since the last call.
    pub fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.drv.received()
    }

    /// A counter's value.
    pub fn metric(&self, name: &str) -> u64 {
        let m = self.vsock.lock().unwrap().metrics();
        m.snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// Live connections.
    pub fn conns(&self) -> usize {
        self.vsock.lock().unwrap().connection_count()
    }

    /// A host client connects and asks for guest port `port`. Returns the client and the
    /// REQUEST the guest got (RX buffers must be available).
    pub fn host_connect(&mut self, port: u32) -> (UnixStream, Header) {
        let mut c = UnixStream::connect(&self.uds).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.pump();
        let pkts = self.recv();
        assert_eq!(pkts.len(), 1, "one REQUEST: {pkts:?}");
        let (req, _) = pkts[0];
        assert_eq!(req.op, Op::Request as u16);
        assert_eq!(req.dst_port, port);
        (c, req)
    }

    /// A full host-initiated connection: REQUEST, the guest's RESPONSE, the client's OK
    /// line. Returns the client and the host port.
    pub fn host_connection(&mut self, port: u32) -> (UnixStream, u32) {
        let (mut c, req) = self.host_connect(port);
        self.send(&ghdr(Op::Response, port, req.src_port), &[]);
        let line = read_line(&mut c);
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (c, req.src_port)
    }

    /// Listens on `<uds>_<port>`.
    pub fn host_listen(&self, port: u32) -> UnixListener {
        let mut p = self.uds.clone().into_os_string();
        p.push(format!("_{port}"));
        UnixListener::bind(p).unwrap()
    }

    /// A guest connection from `guest_port` to host `port`, accepted by `l`. Returns the
    /// host side of the stream.
    pub fn guest_connection(&mut self, l: &UnixListener, guest_port: u32, port: u32) -> UnixStream {
        self.send(&ghdr(Op::Request, guest_port, port), &[]);
        let pkts = self.recv();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        assert_eq!(pkts[0].0.op, Op::Response as u16);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }
}

/// Reads one line byte by byte (so nothing after it is consumed).
pub fn read_line(s: &mut UnixStream) -> String {
    let mut out = vec![];
    let mut b = [0u8; 1];
    while out.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "stream closed mid-line");
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

/// Reads exactly `n` bytes.
pub fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    s.read_exact(&mut out).unwrap();
    out
}

/// Whether the peer closed `s` (read returns 0 or an error within a short wait).
pub fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}
