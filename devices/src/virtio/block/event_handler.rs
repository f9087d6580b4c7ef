//! virtio-blk on the event loop: which fd woke us and what to do.
//!
//! `init` registers only the activation EventFd. Activation (on a vCPU thread) writes it;
//! handling it here registers the queue EventFd and processes anything already queued.
//! A queue event drains the queue. Events while inactive (after a reset) are consumed
//! and ignored.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Block;
use crate::virtio::common::single_queue_event;
use crate::virtio::VirtioDevice;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        crate::virtio::register_activate_event(ops, self.activate_evt(), "virtio-blk");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        single_queue_event(self, events, ops, "virtio-blk", Block::process_queue);
    }
}
