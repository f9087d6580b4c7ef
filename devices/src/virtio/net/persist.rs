//! virtio-net snapshot state: what is needed to reopen the same interface (tap name, MAC,
//! MTU, link status), the accepted features and the ring positions of both queues.
//!
//! Restore = [`Net::restore`] (reopen the tap, possibly under another name) then
//! [`crate::virtio::MmioTransport::restore`] with [`NetState::queues`]. Frames in flight
//! are lost, as on a real link: a frame read from the tap and waiting for guest buffers is
//! dropped, and the tap's queue belongs to the host.
//!
//! Receive chains the device has popped and holds for a waiting frame (see `rx::RxPool`)
//! are counted in `next_avail` but not used; saving rewinds the receive queue's
//! `next_avail` by their number so the restored device pops them again. (A chain the
//! device refused and returned with length 0 in between would be popped twice; only a
//! misbehaving driver offers such chains.)

use serde::{Deserialize, Serialize};

use super::super::backend::NetBackend;
use super::super::{NetError, RX_QUEUE, TX_QUEUE};
use super::Net;
use crate::virtio::mmio::QueuePosition;
use crate::virtio::VirtioDevice;

/// A network device's snapshot state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The tap's interface name.
    pub tap_name: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The advertised MTU, if any.
    pub mtu: Option<u16>,
    /// Whether the link was reported up.
    pub link_up: bool,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Ring positions (receiveq1, transmitq1), if the device was running.
    pub queues: Option<Vec<QueuePosition>>,
}

impl Net {
    /// The device's snapshot state. Take it with the event loop and vCPUs paused.
    pub fn save_state(&self) -> NetState {
        NetState {
            tap_name: self.tap_name.clone(),
            mac: self.mac,
            mtu: self.mtu,
            link_up: self.link_up(),
            acked_features: self.acked_features(),
            queues: self.active.as_ref().map(|a| {
                let mut q = vec![QueuePosition::default(); 2];
                q[RX_QUEUE] = QueuePosition::of(&a.rx_queue);
                q[RX_QUEUE].next_avail = q[RX_QUEUE].next_avail.wrapping_sub(self.rx.held_chains());
                q[TX_QUEUE] = QueuePosition::of(&a.tx_queue);
                q
            }),
        }
    }

    /// Reopens the tap (`tap_name` if given, else the saved name) as an inactive device
    /// with the saved MAC, MTU and link status. The transport restore activates it.
    pub fn restore(state: &NetState, tap_name: Option<&str>) -> Result<Net, NetError> {
        let name = tap_name.unwrap_or(&state.tap_name);
        let net = Net::new(name, Some(state.mac), state.mtu)?;
        Ok(net.finish_restore(state))
    }

    /// Like [`Net::restore`] over any [`NetBackend`] (tests, fuzzing).
    pub fn restore_with_backend(
        state: &NetState,
        backend: Box<dyn NetBackend>,
    ) -> Result<Net, NetError> {
        let net = Net::with_backend(backend, Some(state.mac), state.mtu)?;
        Ok(net.finish_restore(state))
    }

    fn finish_restore(mut self, state: &NetState) -> Net {
        // Inactive here, so no configuration change is signalled.
        self.set_link_up(state.link_up);
        self.set_acked_features(state.acked_features);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::super::super::test_utils::{frame, Driver, RX_RING, TX_RING};
    use super::super::super::{MemTap, VnetHdr};
    use super::*;
    use crate::virtio::test_utils::{drive_transport, mem};
    use crate::virtio::MmioTransport;

    const FEATURES: u64 = 1 << 32 | 1 << 5; // VERSION_1, MAC

    fn send(m: &GuestMemoryMmap, tx: &mut Driver<'_>, k: u8) {
        let f = frame(VnetHdr::default(), 60, k);
        let addr = 0x10_0000 + u64::from(k) * 0x1000;
        m.write_slice(&f, GuestAddress(addr)).unwrap();
        tx.add_chain(&[(addr, u32::try_from(f.len()).unwrap(), 0)]);
    }

    #[test]
    fn transmit_after_restore_continues_at_the_saved_index() {
        let m = mem();
        let mut rx = Driver::new(&m, RX_RING, 256);
        let mut tx = Driver::new(&m, TX_RING, 256);
        let tap = MemTap::new().unwrap();
        let net =
            Net::with_backend(Box::new(tap.clone()), Some([2, 0, 0, 0, 0, 9]), Some(1400)).unwrap();
        let net = Arc::new(Mutex::new(net));
        let mut t = MmioTransport::new(net.clone(), m.clone(), EventFd::new(0).unwrap()).unwrap();
        drive_transport(&mut t, FEATURES, &[rx.queue(), tx.queue()]);
        send(&m, &mut tx, 0);
        send(&m, &mut tx, 1);
        net.lock().unwrap().set_link_up(false);
        net.lock().unwrap().process_tx();
        assert_eq!(tap.take_tx().len(), 2);
        let (ns, ts) = (net.lock().unwrap().save_state(), t.save_state());
        let q = ns.queues.clone().unwrap();
        assert_eq!((q[TX_QUEUE].next_avail, q[TX_QUEUE].next_used), (2, 2));
        assert_eq!(q[RX_QUEUE].next_avail, 0);
        assert_eq!(
            (ns.mac, ns.mtu, ns.link_up),
            ([2, 0, 0, 0, 0, 9], Some(1400), false)
        );
        drop((t, net));

        let tap2 = MemTap::new().unwrap();
        let net2 = Arc::new(Mutex::new(
            Net::restore_with_backend(&ns, Box::new(tap2.clone())).unwrap(),
        ));
        let _t2 = MmioTransport::restore(
            net2.clone(),
            m.clone(),
            EventFd::new(0).unwrap(),
            &ts,
            ns.queues.as_deref(),
        )
        .unwrap();
        assert_eq!(net2.lock().unwrap().save_state(), ns);
        send(&m, &mut tx, 2);
        net2.lock().unwrap().process_tx();
        assert_eq!(tap2.take_tx().len(), 1);
        assert_eq!(tx.used_idx(), 3);
        assert_eq!(tx.used_elem(2).0, 2, "the third chain, head 2");
        // Receive works too: a frame lands in the first receive buffer.
        rx.add_chain(&[(
            0x20_0000,
            2048,
            virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE,
        )]);
        tap2.push_rx(frame(VnetHdr::default(), 60, 7)).unwrap();
        net2.lock().unwrap().tap_event();
        assert_eq!(rx.used_idx(), 1);
    }
}
