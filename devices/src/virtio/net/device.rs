//! The virtio-net device: Inactive until the transport activates it with its two queues
//! (receiveq1, transmitq1), then Active, moving frames between the queues and the tap on
//! the event loop; reset returns it to Inactive with the tap still open.
//!
//! Receive offloads are applied to the tap (TUNSETOFFLOAD) on the event-loop thread, from
//! the first processing after activation, not in `activate` (a vCPU thread): that keeps
//! the tap ioctls in the event loop's seccomp policy only.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::backend::NetBackend;
use super::features::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use super::metrics::NetMetrics;
use super::rx::{RxContext, RxState};
use super::tap::Tap;
use super::tx::{transmit, TxOutcome};
use super::{
    config_space, random_mac, NetError, MIN_MTU, QUEUE_SIZE, RX_QUEUE, STATUS_LINK_UP, TX_QUEUE,
};
use crate::virtio::queue_handler::drain_queue;
use crate::virtio::{
    count, feature, ActivateError, DeviceCommon, VirtioDevice, VirtioInterrupt, TYPE_NET,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Running state: what activation handed over.
struct Active {
    mem: GuestMemoryMmap,
    rx_queue: Queue,
    tx_queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Whether the tap's offloads match the features this driver accepted.
    offloads_set: bool,
}

/// A virtio-net device over a tap.
///
/// Wiring: like [`crate::virtio::block::Block`]: one `Arc<Mutex<Net>>` for the transport,
/// one registered with the event manager. Besides the activation EventFd, `init` puts the
/// tap fd on the event loop itself (edge-triggered, see `event_handler`).
pub struct Net {
    backend: Box<dyn NetBackend>,
    tap_name: String,
    mac: [u8; 6],
    mtu: Option<u16>,
    status: u16,
    common: DeviceCommon,
    active: Option<Active>,
    rx: RxState,
    /// The tap may have frames: set by a tap edge, cleared by EAGAIN.
    tap_readable: bool,
    /// Whether an offload failure has been logged (once per device).
    offload_warned: bool,
    metrics: Arc<NetMetrics>,
}

impl Net {
    /// Opens the tap `tap_name` (creating it if absent). `mac`: the guest's address, random
    /// locally administered if `None`. `mtu`: advertised to the guest if given.
    pub fn new(tap_name: &str, mac: Option<[u8; 6]>, mtu: Option<u16>) -> Result<Net, NetError> {
        let tap = Tap::open(tap_name)?;
        let name = tap.name().to_string();
        let mut net = Net::with_backend(Box::new(tap), mac, mtu)?;
        net.tap_name = name;
        Ok(net)
    }

    /// A device over any [`NetBackend`] (tests and fuzzing use a [`super::MemTap`]).
    pub fn with_backend(
        backend: Box<dyn NetBackend>,
        mac: Option<[u8; 6]>,
        mtu: Option<u16>,
    ) -> Result<Net, NetError> {
        if let Some(m) = mtu.filter(|&m| m < MIN_MTU) {
            return Err(NetError::Mtu(m));
        }
        let mac = match mac {
            Some(m) => m,
            None => random_mac().map_err(NetError::Random)?,
        };
        let mut avail_features = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
        ]
        .into_iter()
        .fold(0, |acc, bit| acc | feature(bit));
        if mtu.is_some() {
            avail_features |= feature(VIRTIO_NET_F_MTU);
        }
        Ok(Net {
            backend,
            tap_name: String::from("(backend)"),
            mac,
            mtu,
            status: STATUS_LINK_UP,
            common: DeviceCommon::new(
                TYPE_NET,
                avail_features,
                &[QUEUE_SIZE; 2],
                config_space(mac, STATUS_LINK_UP, mtu).to_vec(),
            )
            .map_err(NetError::EventFd)?,
            active: None,
            rx: RxState::default(),
            tap_readable: true,
            offload_warned: false,
            metrics: Arc::new(NetMetrics::default()),
        })
    }

    /// The guest's MAC address (config `mac`).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The advertised MTU, if any.
    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The backend's fd, put on the event loop for readability.
    pub fn tap_fd(&self) -> std::os::fd::RawFd {
        self.backend.as_raw_fd()
    }

    /// Whether the link is reported up.
    pub fn link_up(&self) -> bool {
        self.status & STATUS_LINK_UP != 0
    }

    /// Sets the link status the guest reads (VIRTIO_NET_F_STATUS) and, if it changed on an
    /// active device, tells the guest with a configuration change (virtio 1.2 §5.1.4).
    pub fn set_link_up(&mut self, up: bool) {
        let status = if up { STATUS_LINK_UP } else { 0 };
        if status == self.status {
            return;
        }
        self.status = status;
        self.common
            .set_config(config_space(self.mac, status, self.mtu).to_vec());
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
        }
    }

    /// The tap offloads (TUN_F_*) matching what the driver accepted: the tap may hand us
    /// partial checksums and TSO frames only if the guest takes them (virtio 1.2
    /// §5.1.6.4.1). TSO needs CSUM (virtio 1.2 §5.1.3.1, and the tap insists too).
    pub fn offload_flags(acked: u64) -> u32 {
        let has = |bit: u32| acked & feature(bit) != 0;
        if !has(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        flags
    }

    /// Sets the tap offloads for this activation once. A failure leaves them as they were;
    /// frames using offloads the guest did not accept are then dropped on receive.
    fn ensure_offloads(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if a.offloads_set {
            return;
        }
        a.offloads_set = true;
        let flags = Net::offload_flags(self.common.acked_features());
        if let Err(e) = self.backend.set_offload(flags) {
            // Host-side, but a guest can repeat activations: log the first failure only.
            if !self.offload_warned {
                self.offload_warned = true;
                tracing::warn!(error = %e, tap = %self.tap_name, flags, "virtio-net: TUNSETOFFLOAD failed");
            }
        }
    }

    /// Sends every available transmit chain to the tap and interrupts the guest if it
    /// asked for it. Does nothing while inactive.
    pub fn process_tx(&mut self) {
        self.ensure_offloads();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let m = &self.metrics;
        let backend = self.backend.as_mut();
        let (acked, mtu) = (self.common.acked_features(), self.mtu);
        let mem = &a.mem;
        let result = drain_queue(&mut a.tx_queue, mem, |chain| {
            let c = match transmit(mem, chain, backend, acked, mtu) {
                TxOutcome::Sent(bytes) => {
                    count(&m.tx_frames, 1);
                    count(&m.tx_bytes, bytes);
                    return 0;
                }
                TxOutcome::Malformed => &m.tx_malformed,
                TxOutcome::Oversized => &m.tx_oversized,
                TxOutcome::BackendError => &m.tx_tap_errors,
            };
            count(c, 1);
            count(&m.tx_dropped, 1);
            0
        });
        let notify = match result {
            Ok(d) => {
                count(&m.queue_errors, d.bad_heads);
                d.notify
            }
            Err(_) => {
                count(&m.queue_errors, 1);
                // Some chains may have been used before the failure: tell the guest.
                true
            }
        };
        if notify {
            count(&m.interrupts, 1);
            a.interrupt.signal_used_queue();
        }
    }

    /// Moves frames from the tap into the guest's receive buffers, if the tap may have
    /// some or a frame is waiting. Does nothing while inactive. If it stopped on its
    /// budget, it kicks its own receive queue EventFd so the event loop comes back after
    /// serving others.
    pub fn process_rx(&mut self) {
        self.ensure_offloads();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let run = self.rx.run(RxContext {
            mem: &a.mem,
            queue: &mut a.rx_queue,
            backend: self.backend.as_mut(),
            acked: self.common.acked_features(),
            mtu: self.mtu,
            metrics: &self.metrics,
            tap_readable: &mut self.tap_readable,
        });
        if run.notify {
            count(&self.metrics.interrupts, 1);
            a.interrupt.signal_used_queue();
        }
        if run.yielded {
            if let Some(evt) = self.common.queue_events().get(RX_QUEUE) {
                // Fails only if the counter would overflow: then a wake-up is pending anyway.
                let _ = evt.write(1);
            }
        }
    }

    /// A tap readability edge: frames may be waiting.
    pub fn tap_event(&mut self) {
        self.tap_readable = true;
        self.process_rx();
    }

    /// Whether a frame read from the tap waits for guest buffers.
    pub fn rx_pending(&self) -> bool {
        self.rx.has_pending()
    }
}

impl VirtioDevice for Net {
    crate::virtio::common_accessors!(common);
    // `write_config` keeps the default (ignore): virtio 1.2 §5.1.4.2, the driver MUST NOT
    // write the config space; `mac` is only writable through the legacy interface, which
    // this device does not have.

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let [rx_queue, tx_queue] = self.common.activate_queues(self.active.is_some(), queues)?;
        self.rx.reset();
        // Frames may have arrived while inactive: look at the tap once.
        self.tap_readable = true;
        self.active = Some(Active {
            mem,
            rx_queue,
            tx_queue,
            interrupt,
            offloads_set: false,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.common.reset();
        self.rx.reset();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

const _: () = assert!(RX_QUEUE == 0 && TX_QUEUE == 1);

// Snapshot hook (issue 6): the state lives in `persist.rs`, a child module so it can read
// the queue positions.
#[path = "persist.rs"]
pub mod persist;
