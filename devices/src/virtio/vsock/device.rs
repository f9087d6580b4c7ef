//! The virtio-vsock device: Inactive until the transport activates it with its three
//! queues, then Active; reset returns it to Inactive and closes every host connection.
//!
//! Queue work happens on the event loop: TX chains are parsed and handed to the muxer,
//! RX buffers are filled with whatever the muxer owes the guest, the event queue carries
//! transport resets. Nothing here blocks on the host side (see `muxer`).

use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::Arc;

use event_manager::EventSet;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::metrics::VsockMetrics;
use super::muxer::{EventRegistry, Limits, Muxer};
use super::packet::{self, RxBuffer};
use super::{
    config_space, validate_cid, VsockError, EVENT_QUEUE, EVENT_TRANSPORT_RESET, NUM_QUEUES,
    QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use crate::virtio::queue_handler::Chain;
use crate::virtio::{
    count, feature, ActivateError, DeviceCommon, VirtioDevice, VirtioInterrupt, ACTIVATE_EVENT,
    QUEUE_EVENT_BASE, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

/// Running state: what activation handed over.
struct Active {
    mem: GuestMemoryMmap,
    queues: [Queue; NUM_QUEUES],
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio-vsock device with a Firecracker-style unix socket host side.
///
/// Wiring is generic (like [`crate::virtio::block::Block`]): one `Arc<Mutex<Vsock>>` for
/// the transport, one for the event manager. The device puts its own host fds (listener,
/// timer, client streams) on the event loop once activated.
pub struct Vsock {
    guest_cid: u64,
    /// Its activation EventFd is written by `activate`, `reset` and
    /// `send_transport_reset` to wake the event loop.
    common: DeviceCommon,
    active: Option<Active>,
    muxer: Muxer,
    metrics: Arc<VsockMetrics>,
    /// The queue EventFds are on the event loop.
    queues_registered: bool,
    /// The guest kicked TX since TX was last drained.
    tx_kicked: bool,
    /// TX processing paused until RX buffers take the replies waiting for the guest.
    tx_stalled: bool,
    /// Connections must be dropped for a transport reset.
    drop_conns_pending: bool,
    /// A transport reset event waits for an event queue buffer.
    reset_event_pending: bool,
    /// Scratch for TX and RX payloads, reused across packets.
    tx_data: Vec<u8>,
    rx_data: Vec<u8>,
}

impl Vsock {
    /// A vsock device for guest CID `guest_cid`, listening for host clients on the unix
    /// socket `uds_path` (which must not exist; it is removed when the device is dropped).
    /// Guest connections to host port P go to `<uds_path>_P`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        let guest_cid = validate_cid(guest_cid)?;
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(guest_cid, uds_path, metrics.clone())?;
        // Stream sockets only: no VIRTIO_VSOCK_F_SEQPACKET. Without feature bits both
        // sides act as if VIRTIO_VSOCK_F_STREAM were negotiated (virtio 1.2 §5.10.3).
        let common = DeviceCommon::new(
            TYPE_VSOCK,
            feature(VIRTIO_F_VERSION_1),
            &[QUEUE_SIZE; NUM_QUEUES],
            config_space(guest_cid).to_vec(),
        )
        .map_err(VsockError::EventFd)?;
        Ok(Vsock {
            guest_cid,
            common,
            active: None,
            muxer,
            metrics,
            queues_registered: false,
            tx_kicked: false,
            tx_stalled: false,
            drop_conns_pending: false,
            reset_event_pending: false,
            tx_data: Vec::new(),
            rx_data: Vec::new(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Limits and timeouts (connection cap, timeouts); defaults suit production.
    pub fn limits_mut(&mut self) -> &mut Limits {
        self.muxer.limits_mut()
    }

    /// Tells the guest driver that communication was interrupted (after a snapshot
    /// restore): puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in the event queue and drops
    /// every connection (virtio 1.2 §5.10.6.7). The guest keeps its listeners. The work
    /// happens on the event loop, which this wakes; the event waits for an event buffer
    /// if the guest has none.
    pub fn send_transport_reset(&mut self) {
        self.drop_conns_pending = true;
        self.reset_event_pending = true;
        self.wake();
    }

    fn wake(&self) {
        if self.common.activate_evt().write(1).is_err() {
            // Only fails if the counter would overflow: the loop is awake anyway.
            tracing::error!(device = "virtio-vsock", "cannot wake the event loop");
        }
    }

    /// Handles one event-loop event: `tag` says which fd (see `event_handler`). Used by
    /// the [`event_manager::MutEventSubscriber`] impl; callable directly with another
    /// [`EventRegistry`] (fuzzing, tests).
    pub fn handle_event(
        &mut self,
        tag: u32,
        fd: RawFd,
        set: EventSet,
        reg: &mut dyn EventRegistry,
    ) {
        if tag == ACTIVATE_EVENT {
            // A non-blocking read of an empty EventFd fails with EAGAIN: nothing to do.
            let _ = self.common.activate_evt().read();
        } else if let Some(index) = queue_index(tag) {
            if let Some(evt) = self.common.queue_events().get(index) {
                let _ = evt.read();
            }
            if index == TX_QUEUE {
                self.tx_kicked = true;
            }
        } else if self.active.is_some() {
            self.muxer.handle_event(tag, fd, set, reg);
        }
        self.run(reg);
    }

    /// Brings everything up to date: registrations, transport reset, TX, RX, interrupt.
    pub fn run(&mut self, reg: &mut dyn EventRegistry) {
        if self.active.is_none() {
            if self.muxer.is_started() {
                self.muxer.stop(reg);
            }
            return;
        }
        if !self.queues_registered {
            self.queues_registered = true;
            for (i, evt) in self.common.queue_events().iter().enumerate() {
                let tag = QUEUE_EVENT_BASE + u32::try_from(i).unwrap_or(0);
                if !reg.watch(
                    std::os::unix::io::AsRawFd::as_raw_fd(evt),
                    tag,
                    EventSet::IN,
                ) {
                    count(&self.metrics.host_io_errors, 1);
                    self.queues_registered = false;
                }
            }
        }
        self.muxer.start(reg);
        if self.drop_conns_pending {
            self.drop_conns_pending = false;
            self.muxer.drop_connections(reg);
        }
        let mut notify = false;
        if self.reset_event_pending {
            notify |= self.deliver_transport_reset();
        }
        loop {
            if self.tx_kicked || self.tx_stalled {
                notify |= self.process_tx(reg);
            }
            notify |= self.process_rx(reg);
            if !self.tx_stalled || self.muxer.tx_blocked() {
                break;
            }
        }
        if notify {
            if let Some(a) = self.active.as_ref() {
                count(&self.metrics.interrupts, 1);
                a.interrupt.signal_used_queue();
            }
        }
    }

    /// Drains the TX queue into the muxer, pausing if replies pile up. Returns whether
    /// the guest wants an interrupt.
    fn process_tx(&mut self, reg: &mut dyn EventRegistry) -> bool {
        self.tx_kicked = false;
        let Some(Active { mem, queues, .. }) = self.active.as_mut() else {
            return false;
        };
        let Some(queue) = queues.get_mut(TX_QUEUE) else {
            return false;
        };
        let m = &self.metrics;
        let mut used = 0u64;
        let mut first_round = true;
        let mut stalled = false;
        loop {
            if queue.disable_notification(mem).is_err() {
                count(&m.queue_errors, 1);
                break;
            }
            let mut popped = 0u64;
            loop {
                if self.muxer.tx_blocked() {
                    stalled = true;
                    break;
                }
                let Some(chain) = next_chain(queue, mem, m) else {
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                if head >= queue.size() {
                    count(&m.malformed_packets, 1);
                    continue;
                }
                match packet::parse_tx(mem, chain, self.guest_cid, &mut self.tx_data) {
                    Ok(hdr) => self.muxer.handle_tx(&hdr, &self.tx_data, reg),
                    Err(rejected) => {
                        count(&m.malformed_packets, 1);
                        if let Some(hdr) = rejected.hdr {
                            // virtio 1.2 §5.10.6.4: unknown types get RST; so does
                            // everything else we cannot take from the guest's own CID.
                            self.muxer.reply_rst(&hdr);
                        }
                    }
                }
                if queue.add_used(mem, head, 0).is_err() {
                    count(&m.queue_errors, 1);
                }
                used += 1;
            }
            if stalled {
                count(&m.tx_stalls, 1);
                break;
            }
            if popped == 0 && !first_round {
                // enable_notification said there was more, yet nothing could be read.
                count(&m.queue_errors, 1);
                break;
            }
            first_round = false;
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => {
                    count(&m.queue_errors, 1);
                    break;
                }
            }
        }
        self.tx_stalled = stalled;
        used > 0 && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Fills RX buffers with what the muxer owes the guest. Returns whether the guest
    /// wants an interrupt.
    fn process_rx(&mut self, reg: &mut dyn EventRegistry) -> bool {
        let Some(Active { mem, queues, .. }) = self.active.as_mut() else {
            return false;
        };
        let Some(queue) = queues.get_mut(RX_QUEUE) else {
            return false;
        };
        let m = &self.metrics;
        let mut used = 0u64;
        while self.muxer.has_rx() {
            // No buffer: the guest kicks the RX queue when it adds some.
            let Some(chain) = next_chain(queue, mem, m) else {
                break;
            };
            let head = chain.head_index();
            if head >= queue.size() {
                count(&m.rx_chain_errors, 1);
                continue;
            }
            let len = match RxBuffer::parse(mem, chain) {
                Err(_) => {
                    count(&m.rx_chain_errors, 1);
                    0
                }
                Ok(buf) => {
                    let cap = buf.data_capacity();
                    let Some(hdr) = self.muxer.next_rx(cap, &mut self.rx_data, reg) else {
                        // Nothing to send after all: leave the buffer for later.
                        queue.go_to_previous_position();
                        break;
                    };
                    buf.write(mem, &hdr, &self.rx_data).unwrap_or_else(|_| {
                        // parse() checked the buffers; only a memory map change gets here.
                        count(&m.rx_chain_errors, 1);
                        0
                    })
                }
            };
            if queue.add_used(mem, head, len).is_err() {
                count(&m.queue_errors, 1);
            }
            used += 1;
        }
        used > 0 && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Puts a transport reset event in the first usable event buffer. Returns whether
    /// the guest wants an interrupt.
    fn deliver_transport_reset(&mut self) -> bool {
        let Some(Active { mem, queues, .. }) = self.active.as_mut() else {
            return false;
        };
        let Some(queue) = queues.get_mut(EVENT_QUEUE) else {
            return false;
        };
        let m = &self.metrics;
        let mut used = 0u64;
        while self.reset_event_pending {
            let Some(chain) = next_chain(queue, mem, m) else {
                break;
            };
            let head = chain.head_index();
            if head >= queue.size() {
                count(&m.rx_chain_errors, 1);
                continue;
            }
            let len = match write_event(mem, chain, EVENT_TRANSPORT_RESET) {
                Some(len) => {
                    self.reset_event_pending = false;
                    count(&m.transport_resets, 1);
                    len
                }
                None => {
                    count(&m.rx_chain_errors, 1);
                    0
                }
            };
            if queue.add_used(mem, head, len).is_err() {
                count(&m.queue_errors, 1);
            }
            used += 1;
        }
        used > 0 && queue.needs_notification(mem).unwrap_or(true)
    }
}

/// The queue an event tag stands for, if any.
fn queue_index(tag: u32) -> Option<usize> {
    tag.checked_sub(QUEUE_EVENT_BASE)
        .and_then(|i| usize::try_from(i).ok())
        .filter(|&i| i < NUM_QUEUES)
}

/// Pops the next available chain; a broken available ring counts as a queue error.
fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    m: &VsockMetrics,
) -> Option<Chain<'a>> {
    match queue.iter(mem) {
        Ok(mut it) => it.next(),
        Err(_) => {
            count(&m.queue_errors, 1);
            None
        }
    }
}

/// Writes `struct virtio_vsock_event { le32 id; }` into the chain's first descriptor if it
/// is device-writable and large enough. Returns the used length.
fn write_event(mem: &GuestMemoryMmap, mut chain: Chain<'_>, id: u32) -> Option<u32> {
    let d = chain.next()?;
    if !d.is_write_only() || d.len() < 4 {
        return None;
    }
    mem.write_slice(&id.to_le_bytes(), d.addr()).ok()?;
    Some(4)
}

impl VirtioDevice for Vsock {
    crate::virtio::common_accessors!(common);
    // `write_config` keeps the default (ignore): guest_cid is read-only (virtio 1.2
    // §5.10.4).

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let queues = self.common.activate_queues(self.active.is_some(), queues)?;
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.common.reset();
        self.tx_kicked = false;
        self.tx_stalled = false;
        self.reset_event_pending = false;
        self.drop_conns_pending = false;
        // The host fds must leave epoll before they close, which needs the event loop:
        // wake it so it tears the muxer down (see `run`).
        self.wake();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

/// Snapshot state; a child module so it can read the queue positions.
#[path = "persist.rs"]
pub mod persist;

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
