//! virtio-vsock snapshot state: the guest CID, the host socket path, the accepted features
//! and the ring positions of the three queues.
//!
//! Connections are not saved: their host ends (unix sockets) do not survive the VMM. On
//! restore the device starts with none and [`Vsock::finish_restore`] sends the guest
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2 §5.10.6.7), so its driver drops the
//! connections it had and applications reconnect. TX and RX chains are handled
//! synchronously, so a paused device holds none in flight.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::VsockError;
use super::Vsock;
use crate::virtio::mmio::QueuePosition;
use crate::virtio::VirtioDevice;

/// A vsock device's snapshot state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The listening unix socket's path.
    pub uds_path: PathBuf,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Ring positions, one per queue, if the device was running.
    pub queues: Option<Vec<QueuePosition>>,
}

impl Vsock {
    /// The device's snapshot state. Take it with the event loop and vCPUs paused.
    pub fn save_state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path().to_path_buf(),
            acked_features: self.acked_features(),
            queues: self
                .active
                .as_ref()
                .map(|a| a.queues.iter().map(QueuePosition::of).collect()),
        }
    }

    /// A new inactive device with the saved CID, listening on `uds_path` if given, else on
    /// the saved path (which must not exist, as for [`Vsock::new`]). The transport restore
    /// activates it; then call [`Vsock::finish_restore`].
    pub fn restore(state: &VsockState, uds_path: Option<&Path>) -> Result<Vsock, VsockError> {
        let path = uds_path.unwrap_or(&state.uds_path);
        let mut vsock = Vsock::new(state.guest_cid, path)?;
        vsock.set_acked_features(state.acked_features);
        Ok(vsock)
    }

    /// After the transport restore: if the device runs, tells the guest its connections
    /// are gone (a transport reset event, delivered by the event loop), and looks at the
    /// TX queue once: a notification the guest sent after the event loop last ran was in
    /// an eventfd of the old process, and is lost with it.
    pub fn finish_restore(&mut self) {
        if self.active.is_some() {
            self.tx_kicked = true;
            self.send_transport_reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::virtio::test_utils::drive_transport;
    use crate::virtio::vsock::packet::Op;
    use crate::virtio::vsock::test_utils::{ghdr, Driver, GUEST_CID};
    use crate::virtio::vsock::{
        EventRegistry, NoEventLoop, EVENT_QUEUE, EVENT_TRANSPORT_RESET, TX_QUEUE,
    };
    use crate::virtio::MmioTransport;

    #[test]
    fn restore_drops_connections_and_resets_the_guest_transport() {
        let dir = TempDir::new_with_prefix("/tmp/vsock-persist-").unwrap();
        let uds = dir.as_path().join("v.sock");
        let mut drv = Driver::new();
        let vsock = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &uds).unwrap()));
        let mut t =
            MmioTransport::new(vsock.clone(), drv.mem.clone(), EventFd::new(0).unwrap()).unwrap();
        drive_transport(&mut t, 1 << 32, &drv.queues());
        let mut reg = NoEventLoop;
        // The guest sends a packet (a RST to nobody): TX moves one entry.
        drv.send(&ghdr(Op::Rst, 1024, 5000), &[]);
        vsock.lock().unwrap().handle_event(
            crate::virtio::QUEUE_EVENT_BASE + 1,
            -1,
            event_manager::EventSet::IN,
            &mut reg as &mut dyn EventRegistry,
        );
        assert_eq!(drv.used(TX_QUEUE).len(), 1);
        let (vs, ts) = (vsock.lock().unwrap().save_state(), t.save_state());
        assert_eq!(vs.guest_cid, GUEST_CID);
        assert_eq!(vs.queues.as_ref().unwrap()[TX_QUEUE].next_avail, 1);
        drop((t, vsock));

        // The old socket path is gone with the old device; restore under another one.
        let uds2 = dir.as_path().join("v2.sock");
        let vsock2 = Arc::new(Mutex::new(Vsock::restore(&vs, Some(&uds2)).unwrap()));
        let _t2 = MmioTransport::restore(
            vsock2.clone(),
            drv.mem.clone(),
            EventFd::new(0).unwrap(),
            &ts,
            vs.queues.as_deref(),
        )
        .unwrap();
        assert_eq!(vsock2.lock().unwrap().uds_path(), uds2.as_path());
        vsock2.lock().unwrap().finish_restore();
        drv.add_event_buffer();
        vsock2.lock().unwrap().run(&mut reg);
        assert_eq!(drv.events(), vec![EVENT_TRANSPORT_RESET]);
        // TX continues at the saved index.
        drv.send(&ghdr(Op::Rst, 1024, 5001), &[]);
        vsock2.lock().unwrap().handle_event(
            crate::virtio::QUEUE_EVENT_BASE + 1,
            -1,
            event_manager::EventSet::IN,
            &mut reg as &mut dyn EventRegistry,
        );
        assert_eq!(drv.used(TX_QUEUE).len(), 1);
        assert_eq!(drv.used(EVENT_QUEUE).len(), 0);
    }
}
