//! Counters of one virtio-rng device.

use crate::virtio::counters;

counters! {
    /// Per-device virtio-rng counters, shared with the VMM through an `Arc`.
    pub struct RngMetrics {
        /// Chains processed.
        requests,
        /// Random bytes given to the guest.
        bytes,
        /// Chains with no usable device-writable buffer, a buffer outside guest memory, or
        /// a getrandom failure.
        errors,
        /// Queue-level failures (avail ring inconsistent, used ring write failed).
        queue_errors,
        /// Used-buffer interrupts sent to the guest.
        interrupts,
    }
}
