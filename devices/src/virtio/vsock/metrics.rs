//! Counters of one virtio-vsock device. Guest mistakes and host-side failures are counted
//! here instead of logged, so neither a hostile guest nor a misbehaving host client can
//! flood the host log.

use crate::virtio::counters;

counters! {
    /// Per-device virtio-vsock counters, shared with the VMM through an `Arc`.
    pub struct VsockMetrics {
        /// Well-formed packets taken from the TX queue.
        tx_packets,
        /// Packets put in the guest's RX buffers.
        rx_packets,
        /// Host-initiated connections the guest accepted (RESPONSE received).
        host_conns_opened,
        /// Guest-initiated connections to a host listener `<uds_path>_<port>`.
        guest_conns_opened,
        /// Guest connection requests refused because nothing listens on the host port.
        conns_refused,
        /// Connections forgotten, cleanly or not.
        conns_closed,
        /// Connections refused because the connection cap was reached.
        conn_limit_hits,
        /// RST packets sent to the guest.
        rst_sent,
        /// RST packets received from the guest.
        rst_received,
        /// TX chains that could not be parsed, or carried a bad CID, type or op.
        malformed_packets,
        /// Valid packets that break the protocol (credit overrun, data after shutdown,
        /// an op the connection state does not allow): the connection is reset.
        protocol_errors,
        /// CREDIT_UPDATE packets sent to the guest.
        credit_updates,
        /// CREDIT_REQUEST packets received from the guest.
        credit_requests,
        /// Payload bytes written to host streams.
        bytes_to_host,
        /// Payload bytes put in the guest's RX buffers.
        bytes_to_guest,
        /// Host clients closed for a bad `CONNECT <port>` line.
        handshake_errors,
        /// Handshakes, connection requests and closes that took too long.
        timeouts,
        /// Host socket failures (accept, read, write, epoll registration).
        host_io_errors,
        /// RX or event chains that could not take a packet (wrong direction, too small,
        /// outside guest memory, head out of the queue).
        rx_chain_errors,
        /// Queue-level failures (available ring inconsistent, used ring write failed).
        queue_errors,
        /// Times TX processing paused because replies for the guest were piling up while
        /// it supplied no RX buffers (virtio 1.2 §5.10.6.1).
        tx_stalls,
        /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET events delivered.
        transport_resets,
        /// Used-buffer interrupts sent to the guest.
        interrupts,
    }
}
