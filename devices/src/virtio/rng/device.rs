//! The virtio-rng device: Inactive until activated with its one queue, then every chain's
//! device-writable buffers are filled with random bytes (virtio 1.2 §5.4.6: the device
//! fills the buffer and reports how much it wrote).

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::metrics::RngMetrics;
use super::{RngError, MAX_BYTES_PER_CHAIN, MAX_DESCRIPTORS_PER_CHAIN, QUEUE_SIZE};
use crate::virtio::queue_handler::{drain_queue, Chain};
use crate::virtio::{
    count, feature, ActivateError, DeviceCommon, VirtioDevice, VirtioInterrupt, TYPE_RNG,
    VIRTIO_F_VERSION_1,
};

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio-rng device. Wire it like [`crate::virtio::block::Block`]: one
/// `Arc<Mutex<Rng>>` for the transport, one for the event manager.
pub struct Rng {
    common: DeviceCommon,
    active: Option<Active>,
    metrics: Arc<RngMetrics>,
}

/// Fills `slice` from getrandom(2).
fn fill_random(slice: &VolatileSlice<'_>) -> io::Result<()> {
    let guard = slice.ptr_guard_mut();
    let base = guard.as_ptr();
    let mut done = 0usize;
    while done < slice.len() {
        // SAFETY: `base` points at `slice.len()` bytes of mapped guest memory kept mapped
        // by `guard`; the kernel writes at most `slice.len() - done` bytes from `done` on.
        let n = unsafe { libc::getrandom(base.add(done).cast(), slice.len() - done, 0) };
        if n > 0 {
            done += n.unsigned_abs();
        } else {
            let e = io::Error::last_os_error();
            if n == 0 || e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    slice.bitmap().mark_dirty(0, slice.len());
    Ok(())
}

impl Rng {
    /// A new, inactive entropy device.
    pub fn new() -> Result<Rng, RngError> {
        // virtio 1.2 §5.4.4: no configuration space.
        let common =
            DeviceCommon::new(TYPE_RNG, feature(VIRTIO_F_VERSION_1), &[QUEUE_SIZE], vec![])
                .map_err(RngError::EventFd)?;
        Ok(Rng {
            common,
            active: None,
            metrics: Arc::new(RngMetrics::default()),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    /// Serves every available chain and interrupts the guest if it asked for it. Does
    /// nothing while inactive.
    pub fn process_queue(&mut self) {
        let Some(Active {
            mem,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            return;
        };
        let m = &self.metrics;
        let notify = match drain_queue(queue, mem, |chain| handle_chain(mem, chain, m)) {
            Ok(d) => {
                count(&m.errors, d.bad_heads);
                d.notify
            }
            Err(_) => {
                count(&m.queue_errors, 1);
                true
            }
        };
        if notify {
            count(&m.interrupts, 1);
            interrupt.signal_used_queue();
        }
    }
}

/// Fills the chain's device-writable buffers, up to [`MAX_BYTES_PER_CHAIN`]; returns the
/// bytes written.
fn handle_chain(mem: &GuestMemoryMmap, chain: Chain<'_>, m: &RngMetrics) -> u32 {
    count(&m.requests, 1);
    let mut left = MAX_BYTES_PER_CHAIN;
    let mut written = 0usize;
    let mut failed = false;
    // Bound the walk too: an indirect table of thousands of empty or device-readable
    // descriptors costs work but never brings `left` down.
    let writable = chain
        .take(MAX_DESCRIPTORS_PER_CHAIN)
        .filter(|d| d.is_write_only());
    'descs: for d in writable {
        if left == 0 {
            break;
        }
        let len = usize::try_from(d.len()).unwrap_or(usize::MAX).min(left);
        for slice in GuestMemoryBackend::get_slices(mem, d.addr(), len) {
            let filled = slice.ok().filter(|s| fill_random(s).is_ok());
            let Some(s) = filled else {
                failed = true;
                break 'descs;
            };
            written += s.len();
            left -= s.len();
        }
    }
    if failed || written == 0 {
        count(&m.errors, 1);
    }
    count(&m.bytes, written as u64);
    // written <= MAX_BYTES_PER_CHAIN, far below u32::MAX.
    u32::try_from(written).unwrap_or(u32::MAX)
}

impl VirtioDevice for Rng {
    crate::virtio::common_accessors!(common);

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let [queue] = self.common.activate_queues(self.active.is_some(), queues)?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.common.reset();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

/// Snapshot state; a child module so it can read the queue position.
#[path = "persist.rs"]
pub mod persist;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{desc, mem, CountingInterrupt, TestQueue};
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Address, Bytes, GuestAddress};

    const W: u32 = VRING_DESC_F_WRITE;

    fn active(m: &GuestMemoryMmap, tq: &TestQueue) -> (Rng, Arc<CountingInterrupt>) {
        let mut rng = Rng::new().unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        rng.activate(m.clone(), vec![tq.queue()], irq.clone())
            .unwrap();
        (rng, irq)
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        // A readable descriptor in the chain is skipped, both writable ones are filled.
        tq.add_chain(
            0,
            &[
                desc(0x10_0000, 64, 0),
                desc(0x20_0000, 256, W),
                desc(0x30_0000, 256, W),
            ],
        );
        let (mut rng, irq) = active(&m, &tq);
        rng.process_queue();
        assert_eq!(tq.used_elem(0), (0, 512));
        assert_eq!(irq.used_count(), 1);
        let mut a = [0u8; 256];
        let mut b = [0u8; 256];
        m.read_slice(&mut a, GuestAddress(0x20_0000)).unwrap();
        m.read_slice(&mut b, GuestAddress(0x30_0000)).unwrap();
        // 256 zero bytes from getrandom has probability 2^-2048.
        assert!(a.iter().any(|&x| x != 0));
        assert_ne!(a, b);
        let mut r = [0u8; 64];
        m.read_slice(&mut r, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(r, [0u8; 64], "device-readable buffer untouched");
        let snap = rng.metrics().snapshot();
        assert!(snap.contains(&("requests", 1)));
        assert!(snap.contains(&("bytes", 512)));
    }

    #[test]
    fn bytes_per_chain_are_capped() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        tq.add_chain(0, &[desc(0x10_0000, 0x20_0000, W)]);
        let (mut rng, _) = active(&m, &tq);
        rng.process_queue();
        let cap = u32::try_from(MAX_BYTES_PER_CHAIN).unwrap();
        assert_eq!(tq.used_elem(0), (0, cap));
        let mut after = [0u8; 64];
        m.read_slice(&mut after, GuestAddress(0x10_0000 + u64::from(cap)))
            .unwrap();
        assert_eq!(after, [0u8; 64], "nothing written past the cap");
    }

    #[test]
    fn long_chains_are_only_walked_so_far() {
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        let m = mem();
        let next = u16::try_from(VRING_DESC_F_NEXT).unwrap();
        let indirect = u16::try_from(VRING_DESC_F_INDIRECT).unwrap();
        let tq = TestQueue::new(&m, 16);
        // Indirect tables of `readable` device-readable descriptors, then a writable one.
        for (head, table, readable) in [(0u16, 0x80_0000u64, 300u16), (1, 0x90_0000, 200)] {
            for i in 0..=readable {
                let d = if i < readable {
                    Descriptor::new(0x10_0000, 8, next, i + 1)
                } else {
                    Descriptor::new(0x20_0000, 64, u16::try_from(W).unwrap(), 0)
                };
                m.write_obj(
                    RawDescriptor::from(d),
                    GuestAddress(table + 16 * u64::from(i)),
                )
                .unwrap();
            }
            let len = (u32::from(readable) + 1) * 16;
            tq.set_desc(head, table, len, indirect, 0);
            tq.add_raw_head(head);
        }
        let (mut rng, _) = active(&m, &tq);
        rng.process_queue();
        assert_eq!(tq.used_elem(0), (0, 0));
        assert_eq!(tq.used_elem(1), (1, 64));
    }

    #[test]
    fn bad_chains_count_errors_and_never_panic() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        tq.add_chain(0, &[desc(0x10_0000, 16, 0)]); // nothing writable
        tq.add_chain(1, &[desc(0xffff_0000_0000, 16, W)]); // outside memory
        tq.add_raw_head(99); // head outside the queue
        let (mut rng, irq) = active(&m, &tq);
        rng.process_queue();
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(tq.used_elem(0), (0, 0));
        assert_eq!(tq.used_elem(1), (1, 0));
        assert_eq!(irq.used_count(), 1);
        let snap = rng.metrics().snapshot();
        assert!(snap.contains(&("errors", 3)), "{snap:?}");
    }

    #[test]
    fn every_counter_moves() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        tq.add_chain(0, &[desc(0x10_0000, 16, W)]);
        tq.add_chain(1, &[desc(0x10_0000, 16, 0)]);
        let (mut rng, _) = active(&m, &tq);
        rng.process_queue();
        // avail.idx far ahead of the device: a queue error.
        m.write_obj(200u16, tq.avail_addr().unchecked_add(2))
            .unwrap();
        rng.process_queue();
        for (name, v) in rng.metrics().snapshot() {
            assert!(v > 0, "counter {name} never incremented");
        }
    }

    #[test]
    fn activation_and_reset() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        let mut rng = Rng::new().unwrap();
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(CountingInterrupt::default());
        assert!(matches!(
            rng.activate(m.clone(), vec![], irq.clone()),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
        rng.activate(m.clone(), vec![tq.queue()], irq.clone())
            .unwrap();
        assert!(rng.is_activated());
        assert!(matches!(
            rng.activate(m.clone(), vec![tq.queue()], irq.clone()),
            Err(ActivateError::AlreadyActivated)
        ));
        rng.reset();
        assert!(!rng.is_activated());
        let mut b = [0xffu8; 4];
        rng.read_config(0, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn event_loop_serves_the_queue_after_activation() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut em = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        em.add_subscriber(rng.clone());
        // Nothing registered but the activation event: nothing fires.
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);

        let irq = Arc::new(CountingInterrupt::default());
        tq.add_chain(0, &[desc(0x10_0000, 32, W)]);
        rng.lock()
            .unwrap()
            .activate(m.clone(), vec![tq.queue()], irq.clone())
            .unwrap();
        // The activation event registers the queue fd and serves what was queued.
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert_eq!(tq.used_elem(0), (0, 32));

        // A queue notification (what the ioeventfd would write) serves the next chain.
        tq.add_chain(1, &[desc(0x10_1000, 8, W)]);
        rng.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert_eq!(tq.used_elem(1), (1, 8));
        assert_eq!(irq.used_count(), 2);

        // After a reset, notifications are consumed and ignored.
        rng.lock().unwrap().reset();
        tq.add_chain(2, &[desc(0x10_2000, 8, W)]);
        rng.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(em.run_with_timeout(0).unwrap(), 0, "event was drained");

        // Re-activation does not try to register the queue fd twice.
        rng.lock()
            .unwrap()
            .activate(m.clone(), vec![tq.queue()], irq.clone())
            .unwrap();
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    }
}
