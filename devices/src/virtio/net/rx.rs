//! The receive path: frames from the backend into the guest's receive buffers.
//!
//! A frame is read from the tap into one device buffer (a single copy; a tap read must
//! return a whole frame, and its size is unknown until then), checked, then copied into
//! guest buffers. With VIRTIO_NET_F_MRG_RXBUF a frame spreads over as many chains as it
//! needs and `num_buffers` says how many (virtio 1.2 §5.1.6.3.2, §5.1.6.4).
//!
//! Chains popped from the ring wait in an [`RxPool`] until a frame fills them, so a frame
//! that needs more buffers than the guest has offered so far waits (held by the device)
//! instead of being dropped; it is dropped only when the device already holds as many
//! descriptors as the queue has, i.e. the guest cannot offer more. When the guest has no
//! buffers at all the tap is not read: frames stay in the tap until the guest adds some
//! and kicks the receive queue.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::backend::NetBackend;
use super::features::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
};
use super::metrics::NetMetrics;
use super::{
    VnetHdr, ETH_HLEN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM,
    MAX_BUFFER_LEN, VLAN_HLEN, VNET_HDR_LEN,
};
use crate::virtio::{count, feature};

/// At most this many descriptors of a receive chain are used; the rest are ignored.
pub const MAX_RX_DESCRIPTORS: usize = 256;
/// Frames read per wake-up before giving the event loop to other devices.
pub const RX_BUDGET: usize = 256;

/// Checks a frame read from the tap against what the guest negotiated and fixes up its
/// header in place. `false`: drop it. `frame` is header + Ethernet frame.
pub fn check_rx_frame(frame: &mut [u8], acked: u64, mtu: Option<u16>) -> bool {
    let has = |bit: u32| acked & feature(bit) != 0;
    if frame.len() < VNET_HDR_LEN + ETH_HLEN || frame.len() > MAX_BUFFER_LEN {
        return false;
    }
    let frame_len = frame.len() - VNET_HDR_LEN;
    let Some(raw) = frame.first_chunk_mut::<VNET_HDR_LEN>() else {
        return false;
    };
    let mut h = VnetHdr::from_bytes(raw);
    // virtio 1.2 §5.1.6.4.1: without GUEST_CSUM, flags are 0 and the packet is fully
    // checksummed, so a partial-checksum packet cannot be passed on.
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        h.flags &= HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID;
    } else if h.flags & HDR_F_NEEDS_CSUM != 0 {
        return false;
    } else {
        h.flags = 0;
    }
    // virtio 1.2 §5.1.6.4.1: only the GSO types the guest accepted (no ECN, UFO, USO).
    let gso_ok = match h.gso_type {
        GSO_NONE => true,
        GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
        GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
        _ => false,
    };
    if !gso_ok {
        return false;
    }
    // virtio 1.2 §5.1.4.1: with MTU negotiated, no non-GSO packet over mtu plus the
    // link-level header (a VLAN tag tolerated).
    if let (Some(mtu), true, GSO_NONE) = (mtu, has(VIRTIO_NET_F_MTU), h.gso_type) {
        if frame_len > usize::from(mtu) + ETH_HLEN + VLAN_HLEN {
            return false;
        }
    }
    h.num_buffers = 1;
    *raw = h.to_bytes();
    true
}

/// A receive chain popped from the ring, not used yet.
#[derive(Debug)]
struct HeldChain {
    head: u16,
    /// How many entries of `RxPool::regions` are this chain's.
    regions: usize,
    capacity: usize,
    descs: usize,
}

/// What became of a frame offered to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Copied into this many chains, which are now in the used ring.
    Delivered(u16),
    /// Cannot ever fit (or guest memory went away mid-copy); the frame is gone.
    Dropped,
    /// Needs more buffers than the guest offers now; try again when it adds some.
    NeedBuffers,
}

/// Receive chains the device holds, in ring order, with their writable regions.
#[derive(Debug, Default)]
pub struct RxPool {
    chains: VecDeque<HeldChain>,
    regions: VecDeque<(GuestAddress, usize)>,
    capacity: usize,
    descs: usize,
    /// Chains returned unused since the last [`RxPool::take_bad`].
    bad: u64,
    /// Heads outside the queue since the last [`RxPool::take_bad`].
    bad_heads: u64,
}

impl RxPool {
    /// Forgets every held chain (the queue they came from is gone).
    pub fn clear(&mut self) {
        *self = RxPool::default();
    }

    /// Whether no chain is held.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Returns (bad chains, bad heads) seen since the last call.
    pub fn take_bad(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.bad),
            std::mem::take(&mut self.bad_heads),
        )
    }

    /// Pops one chain into the pool. `Ok(false)` when the ring is empty. A chain the
    /// device cannot use goes straight back with length 0.
    fn take_chain(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, virtio_queue::Error> {
        let Some(chain) = q.iter(mem)?.next() else {
            return Ok(false);
        };
        let head = chain.head_index();
        if head >= q.size() {
            // Cannot be returned through the used ring: skipped, like drain_queue does.
            self.bad_heads += 1;
            return Ok(true);
        }
        let (mut regions, mut capacity, mut descs, mut ok) = (0usize, 0usize, 0usize, true);
        for d in chain.take(MAX_RX_DESCRIPTORS) {
            descs += 1;
            let len = usize::try_from(d.len()).unwrap_or(usize::MAX);
            // virtio 1.2 §5.1.6.3: receive buffers are device-writable.
            if !d.is_write_only() || !GuestMemoryBackend::check_range(mem, d.addr(), len) {
                ok = false;
                break;
            }
            if len > 0 {
                self.regions.push_back((d.addr(), len));
                regions += 1;
                capacity = capacity.saturating_add(len);
            }
        }
        // virtio 1.2 §5.1.6.3.1: every buffer holds at least the header.
        if !ok || capacity < VNET_HDR_LEN {
            let keep = self.regions.len().saturating_sub(regions);
            self.regions.truncate(keep);
            self.bad += 1;
            q.add_used(mem, head, 0)?;
            return Ok(true);
        }
        self.capacity = self.capacity.saturating_add(capacity);
        self.descs += descs.max(1);
        self.chains.push_back(HeldChain {
            head,
            regions,
            capacity,
            descs: descs.max(1),
        });
        Ok(true)
    }

    /// Copies `frame` (header + Ethernet frame, header already checked) into held chains,
    /// popping more from the ring as needed, and puts the chains it used in the used ring.
    pub fn deliver(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        frame: &mut [u8],
        mrg: bool,
    ) -> Result<Delivery, virtio_queue::Error> {
        let need = frame.len();
        // Without MRG_RXBUF a frame uses exactly one chain (virtio 1.2 §5.1.6.3.2).
        while (mrg && self.capacity < need) || self.chains.is_empty() {
            // Holding a queue's worth of descriptors: the guest cannot offer more.
            if self.descs >= usize::from(q.size()) {
                return Ok(Delivery::Dropped);
            }
            if !self.take_chain(q, mem)? {
                return Ok(Delivery::NeedBuffers);
            }
        }
        let mut buffers = 0usize;
        let mut acc = 0usize;
        for c in &self.chains {
            buffers += 1;
            acc = acc.saturating_add(c.capacity);
            if acc >= need || !mrg {
                break;
            }
        }
        if acc < need {
            // No MRG_RXBUF and the next chain is too small: drop the frame, keep the chain.
            return Ok(Delivery::Dropped);
        }
        let n_buffers = u16::try_from(buffers).unwrap_or(u16::MAX);
        if let Some(nb) = frame.get_mut(10..12) {
            nb.copy_from_slice(&n_buffers.to_le_bytes());
        }
        let mut off = 0usize;
        let mut failed = false;
        for _ in 0..buffers {
            let Some(c) = self.chains.pop_front() else {
                break;
            };
            self.capacity -= c.capacity;
            self.descs -= c.descs;
            let mut written = 0usize;
            for _ in 0..c.regions {
                let Some((addr, len)) = self.regions.pop_front() else {
                    break;
                };
                let n = len.min(need - off);
                if n > 0 {
                    let src = frame.get(off..off + n).unwrap_or_default();
                    failed |= mem.write_slice(src, addr).is_err();
                }
                off += n;
                written += n;
            }
            q.add_used(mem, c.head, u32::try_from(written).unwrap_or(u32::MAX))?;
        }
        Ok(if failed {
            Delivery::Dropped
        } else {
            Delivery::Delivered(n_buffers)
        })
    }
}

/// The receive side of an active device: the frame buffer, a frame waiting for buffers,
/// and the held chains.
#[derive(Debug)]
pub struct RxState {
    buf: Vec<u8>,
    pending: Option<usize>,
    pool: RxPool,
}

impl Default for RxState {
    fn default() -> Self {
        RxState {
            // One byte over the largest frame accepted, so a longer one shows as too long.
            buf: vec![0; MAX_BUFFER_LEN + 1],
            pending: None,
            pool: RxPool::default(),
        }
    }
}

/// What one [`RxState::run`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxRun {
    /// Entries were added to the used ring and the guest asked to be told.
    pub notify: bool,
    /// Stopped on the budget with the tap possibly still readable: come back later.
    pub yielded: bool,
}

/// What a receive run works on.
pub struct RxContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The receive queue.
    pub queue: &'a mut Queue,
    /// The tap.
    pub backend: &'a mut dyn NetBackend,
    /// Negotiated features.
    pub acked: u64,
    /// The device MTU, if offered.
    pub mtu: Option<u16>,
    /// Counters.
    pub metrics: &'a NetMetrics,
    /// Whether the tap may have frames (edge-triggered: cleared on EAGAIN only).
    pub tap_readable: &'a mut bool,
}

impl RxState {
    /// Drops the waiting frame and the held chains (device reset).
    pub fn reset(&mut self) {
        self.pending = None;
        self.pool.clear();
    }

    /// Whether a frame read from the tap waits for buffers.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Receive chains popped from the ring and held for a frame, not used yet. They are
    /// the most recently popped ones, so a snapshot rewinds `next_avail` by this many to
    /// hand them back to the restored device.
    pub fn held_chains(&self) -> u16 {
        u16::try_from(self.pool.chains.len()).unwrap_or(u16::MAX)
    }

    /// Moves frames from the tap to the guest until the tap is empty, the guest has no
    /// buffers, or the budget is spent.
    pub fn run(&mut self, cx: RxContext<'_>) -> RxRun {
        let RxContext {
            mem,
            queue,
            backend,
            acked,
            mtu,
            metrics: m,
            tap_readable,
        } = cx;
        let used_before = queue.next_used();
        let result = self.run_inner(mem, queue, backend, acked, mtu, m, tap_readable);
        let (bad, bad_heads) = self.pool.take_bad();
        count(&m.rx_bad_buffers, bad);
        count(&m.queue_errors, bad_heads);
        let yielded = result.unwrap_or_else(|_| {
            count(&m.queue_errors, 1);
            false
        });
        // A failed needs_notification read: interrupt anyway, a spurious one is harmless.
        let notify =
            queue.next_used() != used_before && queue.needs_notification(mem).unwrap_or(true);
        RxRun { notify, yielded }
    }

    /// Returns whether it stopped on the budget.
    #[expect(clippy::too_many_arguments, reason = "the split borrows of RxContext")]
    fn run_inner(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
        backend: &mut dyn NetBackend,
        acked: u64,
        mtu: Option<u16>,
        m: &NetMetrics,
        tap_readable: &mut bool,
    ) -> Result<bool, virtio_queue::Error> {
        let mrg = acked & feature(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut budget = RX_BUDGET;
        // Kicks for new receive buffers only matter once the device runs out: keep them off
        // until then.
        q.disable_notification(mem)?;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => {
                    if !*tap_readable {
                        return Ok(false);
                    }
                    if budget == 0 {
                        return Ok(true);
                    }
                    let ring_empty =
                        q.avail_idx(mem, Ordering::Acquire)? == Wrapping(q.next_avail());
                    if self.pool.is_empty() && ring_empty {
                        // No buffer at all: leave the frame in the tap.
                        if wait_for_buffers(q, mem, m)? {
                            return Ok(false);
                        }
                        continue;
                    }
                    match backend.read_frame(&mut self.buf) {
                        Ok(n) => {
                            budget -= 1;
                            let frame = self.buf.get_mut(..n);
                            if !frame.is_some_and(|f| check_rx_frame(f, acked, mtu)) {
                                count(&m.rx_dropped, 1);
                                continue;
                            }
                            self.pending = Some(n);
                            n
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            *tap_readable = false;
                            return Ok(false);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            // Edge-triggered: wait for the next edge rather than spin.
                            count(&m.rx_tap_errors, 1);
                            *tap_readable = false;
                            return Ok(false);
                        }
                    }
                }
            };
            let Some(frame) = self.buf.get_mut(..len) else {
                self.pending = None;
                continue;
            };
            match self.pool.deliver(q, mem, frame, mrg)? {
                Delivery::Delivered(_) => {
                    self.pending = None;
                    count(&m.rx_frames, 1);
                    count(&m.rx_bytes, len.saturating_sub(VNET_HDR_LEN) as u64);
                }
                Delivery::Dropped => {
                    self.pending = None;
                    count(&m.rx_dropped, 1);
                }
                Delivery::NeedBuffers => {
                    if wait_for_buffers(q, mem, m)? {
                        return Ok(false);
                    }
                }
            }
        }
    }
}

/// The guest has no (or not enough) buffers: turn kicks back on, then look again so a
/// buffer added in between is not missed (virtio 1.2 §2.7.10). `true`: really none, stop
/// and wait for the receive queue kick.
fn wait_for_buffers(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    m: &NetMetrics,
) -> Result<bool, virtio_queue::Error> {
    if q.enable_notification(mem)? {
        q.disable_notification(mem)?;
        return Ok(false);
    }
    count(&m.rx_no_buffers, 1);
    Ok(true)
}
