//! virtio-net on the event loop: which fd woke us and what to do.
//!
//! `init` registers the activation EventFd and the tap fd. The tap is registered
//! edge-triggered (EPOLLIN | EPOLLET) once, for the device's life: an edge sets
//! "tap readable", and the receive path reads until EAGAIN, or until the guest runs out of
//! buffers, in which case the frames stay in the tap and nothing wakes us again for them
//! (no busy loop) until the guest adds buffers and kicks the receive queue, whose event
//! resumes reading. Level-triggered would need an epoll_ctl per run-out to mute the tap.
//!
//! Activation (on a vCPU thread) writes the activation EventFd; handling it here
//! registers the queue EventFds and processes both queues. Events while inactive (after a
//! reset) are consumed and ignored; a tap edge then only marks the tap readable.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;
use super::{RX_QUEUE, TX_QUEUE};
use crate::virtio::{VirtioDevice, ACTIVATE_EVENT, QUEUE_EVENT_BASE};

/// Event-manager data tag of the tap fd.
pub const TAP_EVENT: u32 = 100;
/// Tag of the receive queue's EventFd (queue 0).
const RX_EVENT: u32 = QUEUE_EVENT_BASE;
/// Tag of the transmit queue's EventFd (queue 1).
const TX_EVENT: u32 = QUEUE_EVENT_BASE + 1;
const _: () = assert!(RX_QUEUE == 0 && TX_QUEUE == 1 && TAP_EVENT > TX_EVENT);

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        crate::virtio::register_activate_event(ops, self.activate_evt(), "virtio-net");
        let tap = Events::with_data_raw(
            self.tap_fd(),
            TAP_EVENT,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(tap) {
            // Host-side failure: the guest will never receive. Not guest-triggerable.
            tracing::error!(error = %e, tap = %self.tap_name(), "virtio-net: cannot register the tap");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_EVENT => {
                self.common_mut().activation_event(ops, "virtio-net");
                self.process_tx();
                self.process_rx();
            }
            RX_EVENT => {
                if let Some(evt) = self.queue_events().get(RX_QUEUE) {
                    let _ = evt.read();
                }
                self.process_rx();
            }
            TX_EVENT => {
                if let Some(evt) = self.queue_events().get(TX_QUEUE) {
                    let _ = evt.read();
                }
                self.process_tx();
            }
            TAP_EVENT => self.tap_event(),
            _ => {}
        }
    }
}
