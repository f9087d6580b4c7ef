//! virtio-vsock on the event loop: which fd woke us and what to do.
//!
//! `init` registers only the activation EventFd. Everything else is registered by the
//! device itself once activated (see `Vsock::run`): the three queue EventFds, then the
//! muxer's listening socket, housekeeping timer and host streams, each with its own tag
//! (`ACTIVATE_EVENT`, `QUEUE_EVENT_BASE + i`, `LISTENER_EVENT`, `TIMER_EVENT`,
//! `HOST_STREAM_EVENT`). The activation EventFd doubles as the device's wake-up: `reset`
//! and `send_transport_reset` write it so the work that needs the event loop (taking fds
//! off epoll before closing them) happens here.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Vsock;
use crate::virtio::VirtioDevice;

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        crate::virtio::register_activate_event(ops, self.activate_evt(), "virtio-vsock");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.data(), events.fd(), events.event_set(), ops);
    }
}
