//! virtio-blk on the event loop: which fd woke us and what to do.
//!
//! `init` registers only the activation EventFd. Activation (on a vCPU thread) writes it;
//! handling it here registers the queue EventFd and processes anything already queued.
//! A queue event drains the queue. Events while inactive (after a reset) are consumed
//! and ignored.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Block;
use crate::virtio::{register_queue_events, VirtioDevice, ACTIVATE_EVENT, QUEUE_EVENT_BASE};

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        crate::virtio::register_activate_event(ops, self.activate_evt(), "virtio-blk");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_EVENT => {
                // A non-blocking read of an empty EventFd fails with EAGAIN: nothing to do.
                let _ = self.activate_evt().read();
                if !self.queues_registered {
                    self.queues_registered =
                        register_queue_events(ops, self.queue_events(), "virtio-blk");
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
