//! The canonical virtio-queue loop, shared by every device: pop available chains, let the
//! device handle each one, put it in the used ring, and say whether the guest needs an
//! interrupt. Signalling itself is left to the caller, so this part is testable with no
//! irqfd and no event loop.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// A descriptor chain over the VM's guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Why a queue could not be drained. All of these are caused by the guest driver (or a
/// queue we validated going bad), so callers count them rather than log them.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// virtio-queue refused an access: ring outside guest memory, or the avail index runs
    /// more than a queue size ahead of the device (virtio 1.2 §2.7.13.3).
    #[error("virtqueue access failed")]
    Queue(#[source] virtio_queue::Error),
    /// The avail index says there is work but no chain can be read: stop instead of spinning.
    #[error("available ring makes no progress")]
    Stalled,
}

impl From<virtio_queue::Error> for QueueError {
    fn from(e: virtio_queue::Error) -> Self {
        QueueError::Queue(e)
    }
}

/// What one [`drain_queue`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains put in the used ring.
    pub used: u64,
    /// Avail entries naming a descriptor index outside the queue: skipped, since they
    /// cannot be returned through the used ring.
    pub bad_heads: u64,
    /// The guest asked to be interrupted for these used entries.
    pub notify: bool,
}

/// Processes every available chain of `queue`. `handle` gets each chain and returns how
/// many bytes it wrote into the chain's device-writable buffers (the used length, virtio
/// 1.2 §2.7.8).
pub fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut handle: F,
) -> Result<Drained, QueueError>
where
    F: FnMut(Chain<'_>) -> u32,
{
    let mut out = Drained::default();
    let mut first_round = true;
    loop {
        queue.disable_notification(mem)?;
        let mut popped = 0u64;
        loop {
            let next = queue.iter(mem)?.next();
            let Some(chain) = next else { break };
            popped += 1;
            let head = chain.head_index();
            if head >= queue.size() {
                out.bad_heads += 1;
                continue;
            }
            let len = handle(chain);
            queue.add_used(mem, head, len)?;
            out.used += 1;
        }
        // A previous enable_notification said more chains were available; if none could be
        // popped now, the ring is unreadable and looping again would spin forever.
        if popped == 0 && !first_round {
            return Err(QueueError::Stalled);
        }
        first_round = false;
        // virtio 1.2 §2.7.10: re-enable notifications, then re-check for chains added
        // in between so none is missed.
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    if out.used > 0 {
        out.notify = queue.needs_notification(mem)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{desc, mem, TestQueue};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Address, Bytes};

    #[test]
    fn every_chain_is_handled_and_used_with_its_length() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        let w = VRING_DESC_F_WRITE;
        tq.add_chain(0, &[desc(0x10_0000, 8, w)]);
        tq.add_chain(1, &[desc(0x10_1000, 4, 0), desc(0x10_2000, 16, w)]);
        let mut q = tq.queue();
        let mut lens = vec![];
        let d = drain_queue(&mut q, &m, |c| {
            let n = c.clone().count();
            lens.push(n);
            u32::try_from(n * 100).unwrap()
        })
        .unwrap();
        assert_eq!(lens, vec![1, 2]);
        assert_eq!(d.used, 2);
        assert!(d.notify);
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(tq.used_elem(0), (0, 100));
        assert_eq!(tq.used_elem(1), (1, 200));
        // Nothing left: a second drain does nothing and asks for no interrupt.
        let d = drain_queue(&mut q, &m, |_| 0).unwrap();
        assert_eq!(d, Drained::default());
    }

    #[test]
    fn head_outside_queue_is_skipped_not_fatal() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        tq.add_raw_head(200);
        tq.add_chain(0, &[desc(0x10_0000, 8, VRING_DESC_F_WRITE)]);
        let mut q = tq.queue();
        let d = drain_queue(&mut q, &m, |_| 1).unwrap();
        assert_eq!(d.bad_heads, 1);
        assert_eq!(d.used, 1);
        assert_eq!(tq.used_elem(0), (0, 1));
    }

    #[test]
    fn avail_index_running_ahead_is_an_error_not_a_spin() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        // avail.idx = 100 with a 16-entry queue: virtio 1.2 §2.7.13.3 forbids this.
        m.write_obj(100u16, tq.avail_addr().unchecked_add(2))
            .unwrap();
        let mut q = tq.queue();
        let mut calls = 0;
        let r = drain_queue(&mut q, &m, |_| {
            calls += 1;
            0
        });
        assert!(matches!(r, Err(QueueError::Queue(_))));
        assert_eq!(calls, 0);
    }
}
