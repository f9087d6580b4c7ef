//! The state every virtio device keeps for the transport: feature words, queue sizes and
//! notification EventFds, the activation EventFd and the configuration space. Devices own
//! one [`DeviceCommon`] and hand it to the [`VirtioDevice`] default methods through
//! [`VirtioDevice::common`].

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{
    read_config_bytes, register_queue_events, ActivateError, VirtioDevice, ACTIVATE_EVENT,
    QUEUE_EVENT_BASE,
};

/// Transport-facing bookkeeping shared by all virtio devices.
#[derive(Debug)]
pub struct DeviceCommon {
    device_type: u32,
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: Vec<u16>,
    /// One notification EventFd per queue; the transport holds clones of the same fds.
    pub(super) queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    config: Vec<u8>,
    /// Whether the event handler has put the queue EventFds on the event loop.
    queues_registered: bool,
}

impl DeviceCommon {
    /// State for a device of `device_type` offering `avail_features`, with one queue (and
    /// one non-blocking EventFd) per entry of `queue_max_sizes`, and `config` as its
    /// configuration space.
    pub fn new(
        device_type: u32,
        avail_features: u64,
        queue_max_sizes: &[u16],
        config: Vec<u8>,
    ) -> std::io::Result<DeviceCommon> {
        let new_evt = || EventFd::new(libc::EFD_NONBLOCK);
        let queue_evts = queue_max_sizes
            .iter()
            .map(|_| new_evt())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(DeviceCommon {
            device_type,
            avail_features,
            acked_features: 0,
            queue_max_sizes: queue_max_sizes.to_vec(),
            queue_evts,
            activate_evt: new_evt()?,
            config,
            queues_registered: false,
        })
    }

    /// Device type (virtio 1.2 §5).
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Maximum size of each queue.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    /// One notification EventFd per queue, in queue order.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Features the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the accepted features, masked by what the device offers.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Reads the configuration space; out-of-range bytes read as 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    /// Replaces the configuration space.
    pub fn set_config(&mut self, config: Vec<u8>) {
        self.config = config;
    }

    /// Written by `activate` (on a vCPU thread) to wake the event loop.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// The activation checks every device makes: refuses if `activated`, takes exactly
    /// `N` queues, then wakes the event loop through the activation EventFd.
    pub fn activate_queues<const N: usize>(
        &self,
        activated: bool,
        queues: Vec<Queue>,
    ) -> Result<[Queue; N], ActivateError> {
        if activated {
            return Err(ActivateError::AlreadyActivated);
        }
        let got = queues.len();
        let queues: [Queue; N] = queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: N, got })?;
        self.activate_evt.write(1).map_err(ActivateError::EventFd)?;
        Ok(queues)
    }

    /// What a driver reset clears here: the accepted features.
    pub fn reset(&mut self) {
        self.acked_features = 0;
    }

    /// Handles the activation event on the event loop: consumes it and, the first time,
    /// puts the queue EventFds on the event loop.
    pub(crate) fn activation_event(&mut self, ops: &mut EventOps, device: &str) {
        // A non-blocking read of an empty EventFd fails with EAGAIN: nothing to do.
        let _ = self.activate_evt.read();
        if !self.queues_registered {
            self.queues_registered = register_queue_events(ops, &self.queue_evts, device);
        }
    }
}

/// The event handling of a device with one queue (virtio-blk, virtio-rng): the activation
/// event registers the queue EventFd and serves what is queued; a queue event serves the
/// queue. Events while inactive are consumed and ignored (`process_queue` does nothing).
pub(crate) fn single_queue_event<D: VirtioDevice>(
    dev: &mut D,
    events: Events,
    ops: &mut EventOps,
    device: &str,
    process_queue: fn(&mut D),
) {
    match events.data() {
        ACTIVATE_EVENT => {
            dev.common_mut().activation_event(ops, device);
            process_queue(dev);
        }
        QUEUE_EVENT_BASE => {
            if let Some(evt) = dev.queue_events().first() {
                let _ = evt.read();
            }
            process_queue(dev);
        }
        _ => {}
    }
}
