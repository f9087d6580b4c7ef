//! virtio-rng on the event loop. Same shape as virtio-blk: `init` registers the activation
//! EventFd; the activation event registers the queue EventFd and serves what is queued; a
//! queue event serves the queue. Events while inactive are consumed and ignored.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Rng;
use crate::virtio::{register_queue_events, VirtioDevice, ACTIVATE_EVENT, QUEUE_EVENT_BASE};

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        crate::virtio::register_activate_event(ops, self.activate_evt(), "virtio-rng");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_EVENT => {
                // A non-blocking read of an empty EventFd fails with EAGAIN: nothing to do.
                let _ = self.activate_evt().read();
                if !self.queues_registered {
                    self.queues_registered =
                        register_queue_events(ops, self.queue_events(), "virtio-rng");
                }
                self.process_queue();
            }
            QUEUE_EVENT_BASE => {
                if let Some(evt) = self.queue_events().first() {
                    let _ = evt.read();
                }
                self.process_queue();
            }
            _ => {}
        }
    }
}
