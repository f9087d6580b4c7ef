//! Counters of one virtio-net device. Guest mistakes and drops are counted here instead of
//! logged, so neither a hostile guest nor a flood of host traffic can fill the host log.

use crate::virtio::counters;

counters! {
    /// Per-device virtio-net counters, shared with the VMM through an `Arc`.
    pub struct NetMetrics {
        /// Frames delivered to the guest.
        rx_frames,
        /// Bytes of those frames (Ethernet frame, vnet header excluded).
        rx_bytes,
        /// Frames read from the tap but not delivered: malformed, over the MTU, using an
        /// offload the guest did not accept, or too big for every buffer the guest can give.
        rx_dropped,
        /// Times receiving stopped because the guest had no free receive buffer; the frame
        /// stays in the tap (or held by the device) until the guest adds buffers.
        rx_no_buffers,
        /// Receive chains the device could not use (device-readable or outside guest
        /// memory or shorter than the vnet header), returned with length 0.
        rx_bad_buffers,
        /// Tap reads that failed other than with EAGAIN.
        rx_tap_errors,
        /// Frames written to the tap.
        tx_frames,
        /// Bytes of those frames (Ethernet frame, vnet header excluded).
        tx_bytes,
        /// Transmit chains not sent, for any reason below.
        tx_dropped,
        /// Transmit chains with a bad layout, memory or header.
        tx_malformed,
        /// Transmit frames over 64 KiB, or non-GSO frames over the MTU.
        tx_oversized,
        /// Frames the tap refused or took only part of.
        tx_tap_errors,
        /// Queue-level failures (avail ring inconsistent, used ring write failed, head index
        /// outside the queue).
        queue_errors,
        /// Used-buffer interrupts sent to the guest.
        interrupts,
    }
}
