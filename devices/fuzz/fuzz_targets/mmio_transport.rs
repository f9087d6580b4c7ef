//! Fuzzes the virtio-mmio transport (`MmioTransport` as a `BusDevice`) the way a hostile
//! guest drives it: register reads and writes of any offset, width and value, interleaved
//! with queue notifications served by a real event loop (event-manager, as in the VMM) and
//! with guest stores into its own rings, over a small guest memory with a hole. Behind the
//! transport sits virtio-rng or virtio-blk over an in-memory disk, so once the input reaches
//! DRIVER_OK with rings inside memory the device walks hostile descriptor rings.
//!
//! Input layout (short inputs are zero-extended):
//!   [0]        device: bit0 virtio-blk (else virtio-rng); for blk: bit1 read-only,
//!              bit2 failing disk, bit3 disk of 1000 bytes (not whole sectors) instead of 16 KiB
//!   [1]        number of operations n
//!   [2..2+12n] n operations of 12 bytes: kind u8, len u8, offset u16, data u64
//!              kind & 7: 0/5 read, 1/6 write, 2/7 notify + event loop, 3 driver setup,
//!                        4 guest memory store
//!              kind bit7: read/write at offset | 0xffff_ffff_ffff_e000 (far outside),
//!                         store at offset + 0x1_0000
//!              read/write: offset & 0x1fff (half inside the 4 KiB window), width
//!                          len % 8 + 1 bytes (odd widths too), written bytes from data
//!              notify: writes data as u32 to QueueNotify, then runs the event loop
//!              setup: the standard driver sequence (virtio 1.2 §3.1.1), parameterised:
//!                len: features (bit0 INDIRECT_DESC, bit1 SIZE_MAX, bit2 SEG_MAX, bit3 RO,
//!                     bit4 BLK_SIZE, bit5 FLUSH, bit6 EVENT_IDX (never offered),
//!                     bit7 leave out VERSION_1)
//!                offset: bits0-3 queue size (0..8: 1 << k, 9: 0, 10: 3, 11: 512,
//!                        12: 0x10000, 13..15: data >> 52), bit4 skip QueueReady,
//!                        bit5 stop before DRIVER_OK, bit6 reset first, bits8-15 QueueSel
//!                data: desc u16, driver u16, device u16 ring addresses; bits 48/49/50
//!                      add 0x1_0000 to desc/driver/device, bit51 desc |= 1 << 40
//!              store: writes len % 8 + 1 bytes of data at guest address offset
//!   [2+12n..]  tiled over all of guest memory (address a gets tail[a % tail.len()])
//!
//! Guest memory: [0, 0xc000) and [0xd000, 0x11000); 0xc000..0xd000 and everything from
//! 0x11000 on is outside it.
//!
//! Checks:
//!   - nothing panics;
//!   - a read writes only the buffer it was given (sentinels around it) and returns what
//!     the register layout says: zeros past the window and for narrow or misaligned
//!     register reads, the device's config space (zero-filled past its end) at >= 0x100,
//!     and for aligned 32-bit register reads the identity registers, Status,
//!     InterruptStatus, QueueNumMax/QueueReady of QueueSel, DeviceFeatures by selector;
//!   - Status only holds defined bits, only bits the guest wrote to Status plus
//!     DEVICE_NEEDS_RESET, and follows ACKNOWLEDGE <= DRIVER <= FEATURES_OK <= DRIVER_OK;
//!   - the device is running exactly when Status has DRIVER_OK;
//!   - FEATURES_OK means the device recorded an offered feature set with VERSION_1;
//!   - InterruptStatus only holds USED_BUFFER and CONFIG_CHANGE;
//!   - a write that makes activation fail counts exactly one failure, records the error,
//!     sets DEVICE_NEEDS_RESET and raises a config-change interrupt; DEVICE_NEEDS_RESET is
//!     never set without a recorded failure;
//!   - a pass of the event loop never puts more chains in the used ring than it took from
//!     the available ring, and when it used any, used.idx in guest memory is the device's
//!     next_used.
#![no_main]

use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::virtio::block::disk::MemDisk;
use devices::virtio::block::{config_space, Block};
use devices::virtio::rng::Rng;
use devices::virtio::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use devices::virtio::{
    feature, read_config_bytes, MmioTransport, QueuePosition, VirtioDevice,
    INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER, MMIO_SIZE, VIRTIO_F_VERSION_1,
};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory regions: (start, length).
const REGIONS: [(u64, usize); 2] = [(0, 0xc000), (0xd000, 0x4000)];
/// One past the last guest address.
const MEM_END: usize = 0x11000;
const OP_LEN: usize = 12;
const CONFIG: u64 = 0x100;
const STATUS: u64 = 0x070;
const QUEUE_NOTIFY: u64 = 0x050;
const DEFINED_STATUS: u32 =
    ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | DEVICE_NEEDS_RESET | FAILED;

fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

fn u16_at(data: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([byte(data, i), byte(data, i + 1)])
}

fn u64_at(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, v) in b.iter_mut().enumerate() {
        *v = byte(data, i + k);
    }
    u64::from_le_bytes(b)
}

fn low(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

/// What the harness needs from a device besides `VirtioDevice`.
trait Fuzzed: VirtioDevice + MutEventSubscriber + 'static {
    /// The running queue's ring positions, if the device runs.
    fn position(&self) -> Option<QueuePosition>;
    /// The configuration space the guest should read.
    fn config(&self) -> Vec<u8>;
}

impl Fuzzed for Rng {
    fn position(&self) -> Option<QueuePosition> {
        self.save_state().queues.and_then(|q| q.first().copied())
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
}

impl Fuzzed for Block {
    fn position(&self) -> Option<QueuePosition> {
        self.save_state().queues.and_then(|q| q.first().copied())
    }
    fn config(&self) -> Vec<u8> {
        config_space(self.capacity_sectors()).to_vec()
    }
}

fn build_memory(tail: &[u8]) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    if !tail.is_empty() {
        let image: Vec<u8> = tail.iter().copied().cycle().take(MEM_END).collect();
        for (start, len) in REGIONS {
            let s = start as usize;
            mem.write_slice(&image[s..s + len], GuestAddress(start))
                .unwrap();
        }
    }
    mem
}

struct Rig<D: Fuzzed> {
    t: MmioTransport,
    dev: Arc<Mutex<D>>,
    mem: GuestMemoryMmap,
    em: EventManager<Arc<Mutex<D>>>,
    config: Vec<u8>,
    device_type: u32,
    /// Union of every value the guest wrote to Status.
    status_written: u32,
}

impl<D: Fuzzed> Rig<D> {
    fn new(dev: D, mem: GuestMemoryMmap) -> Self {
        let config = dev.config();
        let device_type = dev.device_type();
        let dev = Arc::new(Mutex::new(dev));
        // SAFETY: a fresh eventfd we own; the EventFd takes ownership and closes it.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd failed");
        // SAFETY: `fd` is a valid eventfd owned by nothing else.
        let irqfd = unsafe { FromRawFd::from_raw_fd(fd) };
        let t = MmioTransport::new(dev.clone(), mem.clone(), irqfd).unwrap();
        let mut em = EventManager::<Arc<Mutex<D>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        Rig {
            t,
            dev,
            mem,
            em,
            config,
            device_type,
            status_written: 0,
        }
    }

    fn interrupt_status(&self) -> u32 {
        self.t.interrupt_status().load(Ordering::SeqCst)
    }

    /// One guest write through the bus interface, with the checks that depend on it.
    fn write(&mut self, offset: u64, bytes: &[u8]) {
        if offset == STATUS && bytes.len() == 4 {
            self.status_written |= u32::from_le_bytes(bytes.try_into().unwrap());
        }
        let failures = self.t.activation_failures();
        self.t.write(offset, bytes);
        let now = self.t.activation_failures();
        assert!(now >= failures);
        if now > failures {
            assert_eq!(now, failures + 1, "one write, one activation");
            assert!(self.t.last_activation_error().is_some());
            assert_ne!(self.t.status() & DEVICE_NEEDS_RESET, 0);
            assert_eq!(self.t.status() & DRIVER_OK, 0);
            assert_ne!(self.interrupt_status() & INTERRUPT_CONFIG_CHANGE, 0);
        }
        self.check_state();
    }

    fn w32(&mut self, offset: u64, v: u32) {
        self.write(offset, &v.to_le_bytes());
    }

    fn check_state(&self) {
        let s = self.t.status();
        assert_eq!(s & !DEFINED_STATUS, 0, "undefined status bits {s:#x}");
        assert_eq!(
            s & !(self.status_written | DEVICE_NEEDS_RESET),
            0,
            "status {s:#x} has bits never written ({:#x})",
            self.status_written
        );
        for (later, earlier) in [
            (DRIVER_OK, FEATURES_OK),
            (FEATURES_OK, DRIVER),
            (DRIVER, ACKNOWLEDGE),
        ] {
            assert!(
                s & later == 0 || s & earlier != 0,
                "status {s:#x} skipped a step"
            );
        }
        if s & DEVICE_NEEDS_RESET != 0 {
            assert!(self.t.activation_failures() > 0);
        }
        assert_eq!(
            self.t.activation_failures() > 0,
            self.t.last_activation_error().is_some()
        );
        let irq = self.interrupt_status();
        assert_eq!(
            irq & !(INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE),
            0,
            "interrupt status {irq:#x}"
        );
        let d = self.dev.lock().unwrap();
        assert_eq!(d.is_activated(), s & DRIVER_OK != 0, "status {s:#x}");
        if s & FEATURES_OK != 0 {
            let acked = d.acked_features();
            assert_ne!(acked & feature(VIRTIO_F_VERSION_1), 0);
            assert_eq!(acked & !d.avail_features(), 0);
        }
    }

    /// What a read of `len` bytes at `offset` must return.
    fn expected_read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        if offset >= MMIO_SIZE {
            return out;
        }
        if offset >= CONFIG {
            read_config_bytes(&self.config, offset - CONFIG, &mut out);
            return out;
        }
        if len != 4 || offset & 3 != 0 {
            return out;
        }
        let st = self.t.save_state();
        let avail = self.dev.lock().unwrap().avail_features();
        let max_sizes = self.dev.lock().unwrap().queue_max_sizes().to_vec();
        let sel = usize::try_from(st.queue_sel).unwrap_or(usize::MAX);
        let v: u32 = match offset {
            0x000 => 0x7472_6976,
            0x004 => 2,
            0x008 => self.device_type,
            0x00c => 0x4d4d_5600,
            0x010 => match st.device_features_sel {
                0 => low(avail),
                1 => low(avail >> 32),
                _ => 0,
            },
            0x034 => max_sizes.get(sel).map_or(0, |&m| u32::from(m)),
            0x044 => st.queues.get(sel).map_or(0, |q| u32::from(q.ready)),
            0x060 => self.interrupt_status(),
            0x070 => self.t.status(),
            0x0b0 | 0x0b4 | 0x0b8 | 0x0bc => u32::MAX,
            0x0fc => st.config_generation,
            _ => 0,
        };
        out.copy_from_slice(&v.to_le_bytes());
        out
    }

    fn read(&mut self, offset: u64, len: usize) {
        const GUARD: usize = 8;
        let mut buf = [0xa5u8; 8 + 2 * GUARD];
        self.t.read(offset, &mut buf[GUARD..GUARD + len]);
        assert!(
            buf[..GUARD].iter().all(|&b| b == 0xa5),
            "wrote before buffer"
        );
        assert!(
            buf[GUARD + len..].iter().all(|&b| b == 0xa5),
            "wrote past buffer"
        );
        let want = self.expected_read(offset, len);
        assert_eq!(
            &buf[GUARD..GUARD + len],
            &want[..],
            "read at {offset:#x} len {len}"
        );
    }

    /// Runs the event loop until it is idle (bounded), as the VMM's loop would.
    fn run_event_loop(&mut self) {
        let before = self.dev.lock().unwrap().position();
        for _ in 0..4 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                break;
            }
        }
        let after = self.dev.lock().unwrap().position();
        // Activation and reset only happen through register writes, not here.
        assert_eq!(before.is_some(), after.is_some());
        if let (Some(b), Some(a)) = (before, after) {
            let taken = a.next_avail.wrapping_sub(b.next_avail);
            let used = a.next_used.wrapping_sub(b.next_used);
            assert!(used <= taken, "used {used} chains, took {taken}");
            if used > 0 {
                let ring = self.t.save_state().queues[0].device;
                let idx: u16 = self.mem.read_obj(GuestAddress(ring + 2)).unwrap();
                assert_eq!(idx, a.next_used, "used.idx in memory");
            }
        }
        self.check_state();
    }

    fn setup(&mut self, feats: u8, opts: u16, data: u64) {
        let mut features = 0u64;
        if feats & 0x80 == 0 {
            features |= feature(VIRTIO_F_VERSION_1);
        }
        for (bit, f) in [
            (0u8, 28u32),
            (1, 1),
            (2, 2),
            (3, 5),
            (4, 6),
            (5, 9),
            (6, 29),
        ] {
            if feats & (1 << bit) != 0 {
                features |= feature(f);
            }
        }
        let size: u32 = match opts & 0xf {
            k @ 0..=8 => 1 << k,
            9 => 0,
            10 => 3,
            11 => 512,
            12 => 0x1_0000,
            _ => low(data >> 52),
        };
        let mut desc = data & 0xffff;
        let mut driver = (data >> 16) & 0xffff;
        let mut device = (data >> 32) & 0xffff;
        for (bit, addr) in [(48, &mut desc), (49, &mut driver), (50, &mut device)] {
            if data & (1 << bit) != 0 {
                *addr += 0x1_0000;
            }
        }
        if data & (1 << 51) != 0 {
            desc |= 1 << 40;
        }
        if opts & 0x40 != 0 {
            self.w32(STATUS, 0);
        }
        self.w32(STATUS, ACKNOWLEDGE);
        self.w32(STATUS, ACKNOWLEDGE | DRIVER);
        self.w32(0x024, 0);
        self.w32(0x020, low(features));
        self.w32(0x024, 1);
        self.w32(0x020, low(features >> 32));
        self.w32(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.w32(0x030, u32::from(opts >> 8));
        self.w32(0x038, size);
        for (reg, addr) in [(0x080, desc), (0x090, driver), (0x0a0, device)] {
            self.w32(reg, low(addr));
            self.w32(reg + 4, low(addr >> 32));
        }
        if opts & 0x10 == 0 {
            self.w32(0x044, 1);
        }
        if opts & 0x20 == 0 {
            self.w32(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        }
    }

    fn run(&mut self, ops: &[u8], n: usize) {
        self.check_state();
        for i in 0..n {
            let at = i * OP_LEN;
            let kind = byte(ops, at);
            let len_b = byte(ops, at + 1);
            let off16 = u16_at(ops, at + 2);
            let data = u64_at(ops, at + 4);
            let far = kind & 0x80 != 0;
            let len = usize::from(len_b % 8) + 1;
            let mut offset = u64::from(off16 & 0x1fff);
            if far {
                offset |= 0xffff_ffff_ffff_e000;
            }
            match kind & 7 {
                0 | 5 => self.read(offset, len),
                1 | 6 => self.write(offset, &data.to_le_bytes()[..len]),
                2 | 7 => {
                    self.w32(QUEUE_NOTIFY, low(data));
                    self.run_event_loop();
                }
                3 => self.setup(len_b, off16, data),
                _ => {
                    let addr = u64::from(off16) + if far { 0x1_0000 } else { 0 };
                    // Stores into the hole or past memory simply fail, like a bad guest PA.
                    let _ = self
                        .mem
                        .write_slice(&data.to_le_bytes()[..len], GuestAddress(addr));
                }
            }
        }
        // Whatever is left pending is served too.
        self.run_event_loop();
    }
}

fuzz_target!(|data: &[u8]| {
    let opts = byte(data, 0);
    let n = usize::from(byte(data, 1));
    let ops = data.get(2..).unwrap_or(&[]);
    let tail = data.get(2 + n * OP_LEN..).unwrap_or(&[]);
    let mem = build_memory(tail);
    if opts & 1 == 0 {
        let mut rig = Rig::new(Rng::new().unwrap(), mem);
        rig.run(ops, n);
    } else {
        let mut disk = MemDisk::new(if opts & 8 != 0 { 1000 } else { 16 * 1024 });
        disk.fail = opts & 4 != 0;
        let block = Block::with_disk(Box::new(disk), opts & 2 != 0, None).unwrap();
        let mut rig = Rig::new(block, mem);
        rig.run(ops, n);
    }
});
