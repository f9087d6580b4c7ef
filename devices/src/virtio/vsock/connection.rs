//! One vsock connection: a guest port paired with a host unix stream. It holds the stream
//! state machine (virtio 1.2 §5.10.6.5) and the credit accounting (§5.10.6.3).
//!
//! Boundary: a [`Connection`] reads and writes its own host stream, always non-blocking,
//! and decides which packet it owes the guest next. It never touches the event loop: the
//! muxer asks it which readiness it wants ([`Connection::interest`]) and takes the stream
//! away to close it ([`Connection::take_stream`]), so the fd leaves epoll before it is
//! closed.
//!
//! Memory per connection is bounded: guest-to-host bytes the host has not read yet are
//! buffered up to [`CONN_BUF_SIZE`], which is exactly the credit the guest is given, so a
//! guest that keeps to its credit never overflows it and one that does not is reset.
//! Host-to-guest bytes are not buffered at all: they stay in the host socket until the
//! guest has both an RX buffer and credit for them.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;

use super::metrics::VsockMetrics;
use super::packet::{Header, Op, MAX_PKT_DATA, SHUTDOWN_F_RECEIVE, SHUTDOWN_F_SEND, TYPE_STREAM};
use super::HOST_CID;
use crate::virtio::count;

/// Receive buffer we advertise to the guest per connection (`buf_alloc`), and the bound on
/// guest bytes buffered for a host peer that is not reading.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Send a CREDIT_UPDATE once the guest's view of our free space drops below this and we
/// have freed space since we last told it (Linux does the same with 64 KiB).
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// A drained tx buffer keeping more capacity than this gives it back.
const SHRINK_ABOVE: usize = 64 * 1024;

/// Identifies a connection: our (host) port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// Host-side port: the guest's `dst_port`, our `src_port`.
    pub local_port: u32,
    /// Guest-side port: the guest's `src_port`, our `dst_port`.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST owed or sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows in each direction until that direction is shut down.
    Established,
    /// Closing cleanly: the guest shut down both directions (we still drain buffered bytes
    /// to the host, then RST), or we told the guest the host is gone (waiting for its RST).
    /// Bounded by the close timeout.
    Closing,
    /// Aborted or finished. A RST may still be owed to the guest; once it is sent (or if
    /// the guest sent one) the muxer forgets the connection.
    Killed,
}

/// What stopped a connection, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The guest broke the protocol.
    Protocol,
    /// The host stream failed.
    HostIo,
}

/// One connection. See the module docs.
#[derive(Debug)]
pub struct Connection {
    key: ConnKey,
    guest_cid: u64,
    stream: Option<UnixStream>,
    state: State,
    /// When `state` last changed: the start of the connect and close timeouts.
    since: Instant,
    rst_owed: bool,
    request_owed: bool,
    response_owed: bool,
    credit_update_owed: bool,
    /// The host stream may have bytes (or EOF) to read.
    host_readable: bool,
    /// The host peer closed its end entirely (EPOLLHUP). The stream is then off epoll,
    /// and what is left in it is read as RX buffers and credit allow.
    host_hup: bool,
    /// Read returned EOF and SHUTDOWN(SEND) went to the guest.
    host_eof: bool,
    /// SHUTDOWN flags received from the guest (permanent, virtio 1.2 §5.10.6.5).
    guest_shutdown: u32,
    host_write_shut: bool,
    host_read_shut: bool,
    /// Credit the guest gave us (§5.10.6.3).
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest (free-running).
    rx_cnt: u32,
    /// Payload bytes received from the guest (free-running).
    recv_cnt: u32,
    /// Payload bytes forwarded to the host stream (free-running): our `fwd_cnt`.
    fwd_cnt: u32,
    /// `fwd_cnt` as of the last packet we sent the guest: what the guest believes.
    last_fwd_cnt_sent: u32,
    /// Handshake reply (`OK <port>\n`) to write before any payload; not guest bytes.
    prefix: Vec<u8>,
    /// Guest bytes the host stream has not taken yet.
    tx_buf: VecDeque<u8>,
    /// Whether the muxer's RX queue holds this connection's key.
    pub(super) in_rxq: bool,
    /// Readiness this connection's fd is registered for, if it is on epoll.
    pub(super) registered: Option<EventSet>,
}

/// `send(2)` with MSG_NOSIGNAL: a host peer that went away gives EPIPE, never SIGPIPE,
/// whatever the process's signal setup is.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call, and the
    // fd is open: `stream` owns it and is borrowed for the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Narrows a byte count bounded by [`MAX_PKT_DATA`] or [`CONN_BUF_SIZE`] to u32.
fn as_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, state: State) -> Connection {
        Connection {
            key,
            guest_cid,
            stream: Some(stream),
            state,
            since: Instant::now(),
            rst_owed: false,
            request_owed: false,
            response_owed: false,
            credit_update_owed: false,
            host_readable: false,
            host_hup: false,
            host_eof: false,
            guest_shutdown: 0,
            host_write_shut: false,
            host_read_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            recv_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            prefix: Vec::new(),
            tx_buf: VecDeque::new(),
            in_rxq: false,
            registered: None,
        }
    }

    /// A host client asked for guest port `key.peer_port`: a REQUEST is owed.
    pub fn host_initiated(stream: UnixStream, key: ConnKey, guest_cid: u64) -> Connection {
        let mut c = Connection::new(stream, key, guest_cid, State::Connecting);
        c.request_owed = true;
        c
    }

    /// The guest's REQUEST `req` reached a host listener: a RESPONSE is owed.
    pub fn guest_initiated(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        req: &Header,
    ) -> Connection {
        let mut c = Connection::new(stream, key, guest_cid, State::Established);
        c.response_owed = true;
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = req.fwd_cnt;
        c
    }

    /// The connection's key.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// When the state last changed.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The host stream's fd, while the stream is open.
    pub fn fd(&self) -> Option<i32> {
        self.stream.as_ref().map(|s| s.as_raw_fd())
    }

    /// Guest bytes buffered for the host.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Bytes we may still send the guest: `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`
    /// (virtio 1.2 §5.10.6.3). A peer claiming to have consumed more than we sent gets
    /// no credit rather than a huge one.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Free space the guest believes we have, from the last `fwd_cnt` we sent it.
    fn guest_view_of_free(&self) -> u32 {
        CONN_BUF_SIZE.saturating_sub(self.recv_cnt.wrapping_sub(self.last_fwd_cnt_sent))
    }

    fn credit_update_due(&self) -> bool {
        matches!(self.state, State::Established | State::Closing)
            && self.guest_shutdown & SHUTDOWN_F_SEND == 0
            && self.fwd_cnt != self.last_fwd_cnt_sent
            && self.guest_view_of_free() < CREDIT_UPDATE_THRESHOLD
    }

    fn can_read_host(&self) -> bool {
        matches!(self.state, State::Established | State::Closing)
            && self.stream.is_some()
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_F_RECEIVE == 0
    }

    fn tx_flushed(&self) -> bool {
        self.prefix.is_empty() && self.tx_buf.is_empty()
    }

    fn set_state(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.since = Instant::now();
        }
    }

    /// Aborts: the host stream is to be closed and a RST is owed to the guest.
    pub fn kill(&mut self) {
        if self.state != State::Killed {
            self.set_state(State::Killed);
            self.rst_owed = true;
        }
    }

    fn fail(&mut self, fault: Fault, m: &VsockMetrics) {
        let c = match fault {
            Fault::Protocol => &m.protocol_errors,
            Fault::HostIo => &m.host_io_errors,
        };
        count(c, 1);
        self.kill();
    }

    /// Whether the muxer can forget this connection: killed, nothing owed.
    pub fn is_finished(&self) -> bool {
        self.state == State::Killed && !self.rst_owed
    }

    /// Whether the connection owes the guest a packet that it can produce now.
    pub fn wants_rx(&self) -> bool {
        match self.state {
            State::Killed => self.rst_owed,
            State::Connecting => self.request_owed,
            State::Established | State::Closing => {
                self.response_owed
                    || self.credit_update_owed
                    || self.credit_update_due()
                    || (self.host_readable && self.can_read_host() && self.peer_credit() > 0)
            }
        }
    }

    /// Readiness wanted on the host stream; `None` when the stream must be off epoll
    /// (closed, or the host hung up and the rest is read without epoll).
    pub fn interest(&self) -> Option<EventSet> {
        if self.stream.is_none() || self.host_hup || self.state == State::Killed {
            return None;
        }
        let mut set = EventSet::empty();
        if self.can_read_host() && !self.host_readable && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        if !self.tx_flushed() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Takes the stream if it is to be closed (the connection is killed). The caller
    /// removes the fd from epoll, then drops it.
    pub fn take_stream(&mut self) -> Option<UnixStream> {
        if self.state == State::Killed {
            self.stream.take()
        } else {
            None
        }
    }

    /// Whether the connection is waiting too long: for the guest's RESPONSE, or to finish
    /// closing.
    pub fn timed_out(
        &self,
        now: Instant,
        connect: std::time::Duration,
        close: std::time::Duration,
    ) -> bool {
        let limit = match self.state {
            State::Connecting => connect,
            State::Closing => close,
            State::Established | State::Killed => return false,
        };
        now.saturating_duration_since(self.since) > limit
    }

    /// A header from us to the guest for this connection, with our current credit. Every
    /// packet carries credit, so this also records what the guest now knows.
    fn header(&mut self, op: Op, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        // Any packet answers a CREDIT_REQUEST: they all carry buf_alloc and fwd_cnt.
        self.credit_update_owed = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, or `None`. `max_data` is the payload room in the
    /// RX buffer at hand; payload goes into `buf` (cleared first) and the header's `len`
    /// says how much.
    pub fn next_packet(
        &mut self,
        max_data: usize,
        buf: &mut Vec<u8>,
        m: &VsockMetrics,
    ) -> Option<Header> {
        buf.clear();
        match self.state {
            State::Killed => {
                if !self.rst_owed {
                    return None;
                }
                self.rst_owed = false;
                Some(self.header(Op::Rst, 0))
            }
            State::Connecting => {
                if !self.request_owed {
                    return None;
                }
                self.request_owed = false;
                Some(self.header(Op::Request, 0))
            }
            State::Established | State::Closing => {
                if self.response_owed {
                    self.response_owed = false;
                    return Some(self.header(Op::Response, 0));
                }
                if let Some(h) = self.read_host(max_data, buf, m) {
                    return Some(h);
                }
                if self.credit_update_owed || self.credit_update_due() {
                    self.credit_update_owed = false;
                    return Some(self.header(Op::CreditUpdate, 0));
                }
                None
            }
        }
    }

    /// Reads host bytes for one RW packet, or notices EOF (SHUTDOWN) or a failure (RST).
    fn read_host(
        &mut self,
        max_data: usize,
        buf: &mut Vec<u8>,
        m: &VsockMetrics,
    ) -> Option<Header> {
        if !self.host_readable || !self.can_read_host() {
            return None;
        }
        let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
        let want = credit.min(max_data).min(MAX_PKT_DATA);
        if want == 0 {
            return None;
        }
        buf.resize(want, 0);
        let result = match self.stream.as_mut() {
            Some(s) => s.read(buf),
            None => return None,
        };
        match result {
            Ok(0) => {
                buf.clear();
                self.host_eof = true;
                self.host_readable = false;
                let mut flags = SHUTDOWN_F_SEND;
                if self.host_hup {
                    // The host can no longer receive either: both directions are done
                    // on our side; the guest answers with RST (virtio 1.2 §5.10.6.5).
                    flags |= SHUTDOWN_F_RECEIVE;
                    self.set_state(State::Closing);
                }
                let h = self.header(Op::Shutdown, flags);
                self.check_done();
                Some(h)
            }
            Ok(n) => {
                buf.truncate(n);
                self.rx_cnt = self.rx_cnt.wrapping_add(as_u32(n));
                if n < want && !self.host_hup {
                    // Probably drained: let epoll say when there is more.
                    self.host_readable = false;
                }
                let mut h = self.header(Op::Rw, 0);
                h.len = as_u32(n);
                Some(h)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                buf.clear();
                self.host_readable = false;
                if self.host_hup {
                    // Off epoll after a hang-up and yet nothing to read: nothing would
                    // ever wake this connection again.
                    self.fail(Fault::HostIo, m);
                    return self.next_packet(0, buf, m);
                }
                None
            }
            Err(_) => {
                buf.clear();
                self.fail(Fault::HostIo, m);
                self.next_packet(0, buf, m)
            }
        }
    }

    /// Writes buffered bytes to the host stream until it would block.
    fn flush(&mut self, m: &VsockMetrics) {
        let Some(stream) = self.stream.as_ref() else {
            return;
        };
        let mut failed = false;
        while !self.prefix.is_empty() {
            match send_nosignal(stream, &self.prefix) {
                Ok(n) => {
                    self.prefix.drain(..n.min(self.prefix.len()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = e.kind() != io::ErrorKind::WouldBlock;
                    break;
                }
            }
        }
        while self.prefix.is_empty() && !failed && !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send_nosignal(stream, front) {
                Ok(n) => {
                    let n = n.min(self.tx_buf.len());
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(as_u32(n));
                    count(&m.bytes_to_host, n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = e.kind() != io::ErrorKind::WouldBlock;
                    break;
                }
            }
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > SHRINK_ABOVE {
            self.tx_buf.shrink_to(0);
        }
        if failed {
            self.fail(Fault::HostIo, m);
        }
    }

    /// Handles a packet from the guest for this connection. `data` is the RW payload.
    pub fn handle_guest(&mut self, hdr: &Header, op: Op, data: &[u8], m: &VsockMetrics) {
        // virtio 1.2 §5.10.6.3: every packet of a flow carries valid credit information.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        match (self.state, op) {
            (State::Killed, Op::Rst) => self.rst_owed = false,
            (State::Killed, _) => {}
            (_, Op::Rst) => {
                // The guest aborted: nothing is owed back.
                self.set_state(State::Killed);
                self.rst_owed = false;
            }
            (State::Connecting, Op::Response) => {
                self.set_state(State::Established);
                self.prefix = format!("OK {}\n", self.key.local_port).into_bytes();
                self.flush(m);
            }
            (State::Connecting, _) => self.fail(Fault::Protocol, m),
            (_, Op::Rw) => self.guest_data(data, m),
            (_, Op::Shutdown) => {
                self.guest_shutdown |= hdr.flags & (SHUTDOWN_F_RECEIVE | SHUTDOWN_F_SEND);
                if self.guest_shutdown == SHUTDOWN_F_RECEIVE | SHUTDOWN_F_SEND {
                    self.set_state(State::Closing);
                }
            }
            (_, Op::CreditUpdate) => {}
            (_, Op::CreditRequest) => self.credit_update_owed = true,
            (_, Op::Request | Op::Response) => self.fail(Fault::Protocol, m),
        }
        self.check_done();
    }

    /// An RW payload from the guest: straight to the host stream when nothing is queued
    /// before it, the rest buffered within the credit we gave.
    fn guest_data(&mut self, data: &[u8], m: &VsockMetrics) {
        if self.guest_shutdown & SHUTDOWN_F_SEND != 0 {
            self.fail(Fault::Protocol, m);
            return;
        }
        if self.tx_buf.len().saturating_add(data.len()) > CONN_BUF_SIZE as usize {
            // virtio 1.2 §5.10.6.3: the guest sent beyond the credit we advertised.
            self.fail(Fault::Protocol, m);
            return;
        }
        self.recv_cnt = self.recv_cnt.wrapping_add(as_u32(data.len()));
        let mut rest = data;
        if self.tx_flushed() {
            let Some(stream) = self.stream.as_ref() else {
                return;
            };
            loop {
                match send_nosignal(stream, rest) {
                    Ok(n) => {
                        let n = n.min(rest.len());
                        rest = rest.get(n..).unwrap_or_default();
                        self.fwd_cnt = self.fwd_cnt.wrapping_add(as_u32(n));
                        count(&m.bytes_to_host, n as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        self.fail(Fault::HostIo, m);
                        return;
                    }
                }
                break;
            }
        }
        self.tx_buf.extend(rest);
    }

    /// Readiness on the host stream.
    pub fn host_event(&mut self, set: EventSet, m: &VsockMetrics) {
        if self.state == State::Killed {
            return;
        }
        if set.contains(EventSet::ERROR) {
            self.fail(Fault::HostIo, m);
            return;
        }
        if set.contains(EventSet::HANG_UP) {
            if self.state == State::Connecting
                || self.guest_shutdown & SHUTDOWN_F_RECEIVE != 0
                || !self.tx_flushed()
            {
                // Nothing more can reach the host, and either the guest never got the
                // connection, will not read what is left, or has bytes the host will
                // never take: abort.
                self.kill();
                return;
            }
            self.host_hup = true;
            self.host_readable = true;
        }
        if set.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if set.contains(EventSet::OUT) {
            self.flush(m);
        }
        self.check_done();
    }

    /// Applies the guest's shutdowns to the host stream once buffered bytes are out, and
    /// finishes the connection once both sides are done sending.
    fn check_done(&mut self) {
        if !matches!(self.state, State::Established | State::Closing) {
            return;
        }
        let flushed = self.tx_flushed();
        if let Some(s) = self.stream.as_ref() {
            if self.guest_shutdown & SHUTDOWN_F_SEND != 0 && flushed && !self.host_write_shut {
                // Errors mean the peer is gone already, which is what we want it to see.
                let _ = s.shutdown(Shutdown::Write);
                self.host_write_shut = true;
            }
            if self.guest_shutdown & SHUTDOWN_F_RECEIVE != 0 && !self.host_read_shut {
                let _ = s.shutdown(Shutdown::Read);
                self.host_read_shut = true;
            }
        }
        let guest_done = self.guest_shutdown & SHUTDOWN_F_SEND != 0
            && (self.guest_shutdown & SHUTDOWN_F_RECEIVE != 0 || self.host_eof);
        if flushed && guest_done {
            // virtio 1.2 §5.10.6.5: a clean disconnect ends with a RST from the peer.
            self.kill();
        }
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
