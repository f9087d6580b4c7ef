//! virtio-rng snapshot state: the accepted features and the ring position of the running
//! queue. The device has no configuration; chains are served synchronously, so a paused
//! device holds none in flight.

use serde::{Deserialize, Serialize};

use super::super::RngError;
use super::Rng;
use crate::virtio::mmio::QueuePosition;
use crate::virtio::VirtioDevice;

/// An entropy device's snapshot state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Ring positions, one per queue, if the device was running.
    pub queues: Option<Vec<QueuePosition>>,
}

impl Rng {
    /// The device's snapshot state. Take it with the event loop and vCPUs paused.
    pub fn save_state(&self) -> RngState {
        RngState {
            acked_features: self.acked_features(),
            queues: self
                .active
                .as_ref()
                .map(|a| vec![QueuePosition::of(&a.queue)]),
        }
    }

    /// A new inactive device with the saved settings; the transport restore activates it.
    pub fn restore(state: &RngState) -> Result<Rng, RngError> {
        let mut rng = Rng::new()?;
        rng.set_acked_features(state.acked_features);
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::test_utils::{desc, drive_transport, mem, TestQueue};
    use crate::virtio::MmioTransport;

    #[test]
    fn chains_after_restore_are_served_at_the_saved_index() {
        let m = mem();
        let tq = TestQueue::new(&m, 256);
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut t = MmioTransport::new(rng.clone(), m.clone(), EventFd::new(0).unwrap()).unwrap();
        drive_transport(&mut t, 1 << 32, &[tq.queue()]);
        tq.add_chain(0, &[desc(0x10_0000, 16, VRING_DESC_F_WRITE)]);
        tq.add_chain(1, &[desc(0x10_1000, 16, VRING_DESC_F_WRITE)]);
        rng.lock().unwrap().process_queue();
        let (rs, ts) = (rng.lock().unwrap().save_state(), t.save_state());
        assert_eq!(rs.queues.as_ref().unwrap()[0].next_used, 2);

        let rng2 = Arc::new(Mutex::new(Rng::restore(&rs).unwrap()));
        let _t2 = MmioTransport::restore(
            rng2.clone(),
            m.clone(),
            EventFd::new(0).unwrap(),
            &ts,
            rs.queues.as_deref(),
        )
        .unwrap();
        tq.add_chain(2, &[desc(0x10_2000, 32, VRING_DESC_F_WRITE)]);
        rng2.lock().unwrap().process_queue();
        assert_eq!(tq.used_idx(), 3);
        assert_eq!(tq.used_elem(2), (2, 32));
    }
}
