//! Counters of one virtio-blk device. Guest mistakes are counted here instead of logged,
//! so a hostile guest cannot flood the host log.

use crate::virtio::counters;

counters! {
    /// Per-device virtio-blk counters, shared with the VMM through an `Arc`.
    pub struct BlockMetrics {
        /// VIRTIO_BLK_T_IN requests parsed.
        read_requests,
        /// VIRTIO_BLK_T_OUT requests parsed.
        write_requests,
        /// VIRTIO_BLK_T_FLUSH requests parsed.
        flush_requests,
        /// VIRTIO_BLK_T_GET_ID requests parsed.
        get_id_requests,
        /// Bytes read from the disk into the guest.
        bytes_read,
        /// Bytes written from the guest to the disk.
        bytes_written,
        /// Requests that failed in the backend (answered IOERR).
        io_errors,
        /// Writes refused because the disk is read-only (answered IOERR).
        read_only_refusals,
        /// Malformed requests (answered IOERR).
        invalid_requests,
        /// Requests of a type not implemented (answered UNSUPP).
        unsupported_requests,
        /// Chains that could not be answered (no status byte, broken chain, head index out
        /// of the queue): returned with length 0 when possible.
        dropped_chains,
        /// Queue-level failures (avail ring inconsistent, used ring write failed).
        queue_errors,
        /// Used-buffer interrupts sent to the guest.
        interrupts,
    }
}
