//! virtio-rng on the event loop. Same shape as virtio-blk: `init` registers the activation
//! EventFd; the activation event registers the queue EventFd and serves what is queued; a
//! queue event serves the queue. Events while inactive are consumed and ignored.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Rng;
use crate::virtio::common::single_queue_event;
use crate::virtio::VirtioDevice;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        crate::virtio::register_activate_event(ops, self.activate_evt(), "virtio-rng");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        single_queue_event(self, events, ops, "virtio-rng", Rng::process_queue);
    }
}
