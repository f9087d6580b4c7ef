//! The host side of virtio-vsock: the listening unix socket, host clients in the middle of
//! their `CONNECT <port>\n` handshake, the connection table keyed by (host port, guest
//! port), host port allocation, and the order in which packets go to the guest.
//!
//! Boundary: the muxer owns every host fd and keeps them on the event loop through an
//! [`EventRegistry`], but never touches a virtqueue: the device hands it parsed TX packets
//! ([`Muxer::handle_tx`]) and asks it for the next RX packet ([`Muxer::next_rx`]).
//!
//! Nothing here blocks: every socket is non-blocking, a host peer that stops reading only
//! stops its own connection's credit, and the work one wakeup does is bounded.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, Connection, State};
use super::metrics::VsockMetrics;
use super::packet::{Header, Op};
use super::{VsockError, HOST_STREAM_EVENT, LISTENER_EVENT, TIMER_EVENT};
use crate::virtio::count;

/// First host port handed to host-initiated connections; they count up from here.
pub const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted, newline included.
pub const MAX_HANDSHAKE_LINE: usize = 32;
/// Clients accepted per listener wakeup; the rest wait for the next one.
const ACCEPTS_PER_WAKEUP: usize = 64;

/// How the muxer keeps host fds on the event loop. Implemented for event-manager's
/// [`EventOps`]; [`NoEventLoop`] does nothing (fuzzing, tests that poll by hand).
pub trait EventRegistry {
    /// Starts watching `fd`, tagged `tag`. Returns whether it worked.
    fn watch(&mut self, fd: RawFd, tag: u32, events: EventSet) -> bool;
    /// Changes what `fd` is watched for. Returns whether it worked.
    fn rewatch(&mut self, fd: RawFd, tag: u32, events: EventSet) -> bool;
    /// Stops watching `fd`. Must be called before `fd` is closed.
    fn unwatch(&mut self, fd: RawFd);
}

impl EventRegistry for EventOps<'_> {
    fn watch(&mut self, fd: RawFd, tag: u32, events: EventSet) -> bool {
        matches!(
            self.add(Events::with_data_raw(fd, tag, events)),
            Ok(()) | Err(event_manager::Error::FdAlreadyRegistered)
        )
    }

    fn rewatch(&mut self, fd: RawFd, tag: u32, events: EventSet) -> bool {
        self.modify(Events::with_data_raw(fd, tag, events)).is_ok()
    }

    fn unwatch(&mut self, fd: RawFd) {
        // Fails only if the fd was not registered, which leaves nothing to undo.
        let _ = self.remove(Events::empty_raw(fd));
    }
}

/// An [`EventRegistry`] without an event loop.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEventLoop;

impl EventRegistry for NoEventLoop {
    fn watch(&mut self, _fd: RawFd, _tag: u32, _events: EventSet) -> bool {
        true
    }
    fn rewatch(&mut self, _fd: RawFd, _tag: u32, _events: EventSet) -> bool {
        true
    }
    fn unwatch(&mut self, _fd: RawFd) {}
}

/// Why a host client's handshake failed. The client is closed; the failure is counted.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client closed before sending a full line.
    #[error("client closed before the CONNECT line")]
    Eof,
    /// No newline within [`MAX_HANDSHAKE_LINE`] bytes.
    #[error("CONNECT line longer than {MAX_HANDSHAKE_LINE} bytes")]
    TooLong,
    /// The line is not `CONNECT <decimal u32>`.
    #[error("malformed CONNECT line")]
    Malformed,
    /// Reading the socket failed.
    #[error("reading the CONNECT line failed")]
    Io(#[source] io::Error),
}

/// Limits and timeouts. Tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Live connections plus pending handshakes (virtio 1.2 §5.10.6.5: a REQUEST beyond
    /// the device's resources gets RST).
    pub max_conns: usize,
    /// RSTs for packets that match no connection, held while the guest supplies no RX
    /// buffers. When full, TX processing pauses (virtio 1.2 §5.10.6.1).
    pub max_replies: usize,
    /// A host client must send its CONNECT line within this.
    pub handshake_timeout: Duration,
    /// The guest must answer a REQUEST within this.
    pub connect_timeout: Duration,
    /// A closing connection must finish within this, or it is reset.
    pub close_timeout: Duration,
    /// Period of the housekeeping timer that enforces the timeouts.
    pub tick: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_conns: 1024,
            max_replies: 256,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            close_timeout: Duration::from_secs(5),
            tick: Duration::from_millis(500),
        }
    }
}

/// A host client that has not sent its whole CONNECT line yet.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

impl Handshake {
    /// Reads one byte at a time so nothing after the newline is consumed: it belongs to
    /// the connection. Returns the port once the line is complete.
    fn read_line(&mut self) -> Result<Option<u32>, HandshakeError> {
        loop {
            if self.line.len() >= MAX_HANDSHAKE_LINE {
                return Err(HandshakeError::TooLong);
            }
            let mut b = [0u8; 1];
            match self.stream.read(&mut b) {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(_) if b == *b"\n" => return parse_connect(&self.line).map(Some),
                Ok(_) => self.line.extend_from_slice(&b),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
    }
}

/// Parses `CONNECT <port>` (the newline already stripped).
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let digits = line
        .strip_prefix(b"CONNECT ")
        .filter(|d| !d.is_empty() && d.iter().all(u8::is_ascii_digit))
        .ok_or(HandshakeError::Malformed)?;
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(HandshakeError::Malformed)
}

/// Connects to a unix socket without blocking: a listener whose backlog is full gives
/// EAGAIN instead of stalling the event loop.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    let len = libc::socklen_t::try_from(
        std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1,
    )
    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain syscall with no pointer arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call, and `len` does
    // not exceed its size; `fd` is open (owned by `owned`).
    let r = unsafe { libc::connect(fd, (&raw const addr).cast::<libc::sockaddr>(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// A timerfd whose read never blocks: a stale readiness (the timer was re-armed or
/// cleared after epoll reported it) then gives EAGAIN instead of stalling the event loop.
fn nonblocking_timer() -> vmm_sys_util::errno::Result<TimerFd> {
    let timer = TimerFd::new()?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl(F_GETFL) on a timerfd we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(vmm_sys_util::errno::Error::last());
    }
    // SAFETY: fcntl(F_SETFL) on the same fd with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(vmm_sys_util::errno::Error::last());
    }
    Ok(timer)
}

/// The host side: see the module docs.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// (dev, inode) of the socket file we bound, to remove it on drop only if it is ours.
    socket_file: Option<(u64, u64)>,
    timer: TimerFd,
    /// Listener and timer are on the event loop.
    started: bool,
    /// The listener is off the event loop after an accept failure (e.g. EMFILE), so a
    /// level-triggered listener cannot spin; the next tick puts it back.
    listener_paused: bool,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Connections with something for the guest, served round-robin.
    rxq: VecDeque<ConnKey>,
    /// RSTs for packets that match no connection.
    replies: VecDeque<Header>,
    /// Alternates between `replies` and `rxq`, so neither starves the other.
    replies_turn: bool,
    next_port: u32,
    limits: Limits,
    metrics: Arc<VsockMetrics>,
}

impl Muxer {
    /// Binds the listening socket at `uds_path`. The path must not exist.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Muxer, VsockError> {
        let bind_err = |source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        let socket_file = std::fs::metadata(uds_path)
            .ok()
            .map(|md| (md.dev(), md.ino()));
        let muxer = Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            socket_file,
            timer: nonblocking_timer().map_err(VsockError::Timer)?,
            started: false,
            listener_paused: false,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            rxq: VecDeque::new(),
            replies: VecDeque::new(),
            replies_turn: false,
            next_port: FIRST_EPHEMERAL_PORT,
            limits: Limits::default(),
            metrics,
        };
        muxer.listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(muxer)
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Limits and timeouts in force.
    pub fn limits_mut(&mut self) -> &mut Limits {
        &mut self.limits
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the listener and timer are on the event loop.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// Puts the listener and the housekeeping timer on the event loop (at activation).
    pub fn start(&mut self, reg: &mut dyn EventRegistry) {
        if self.started {
            return;
        }
        self.started = true;
        if self
            .timer
            .reset(self.limits.tick, Some(self.limits.tick))
            .is_err()
            || !reg.watch(self.timer.as_raw_fd(), TIMER_EVENT, EventSet::IN)
        {
            // Host-side failure: timeouts will not be enforced. Not guest-triggerable.
            count(&self.metrics.host_io_errors, 1);
            tracing::error!(device = "virtio-vsock", "cannot arm the housekeeping timer");
        }
        self.watch_listener(reg);
    }

    fn watch_listener(&mut self, reg: &mut dyn EventRegistry) {
        self.listener_paused = !reg.watch(self.listener.as_raw_fd(), LISTENER_EVENT, EventSet::IN);
        if self.listener_paused {
            count(&self.metrics.host_io_errors, 1);
        }
    }

    /// Closes every connection and handshake and takes the listener and timer off the
    /// event loop (device reset). Host clients see their streams close.
    pub fn stop(&mut self, reg: &mut dyn EventRegistry) {
        self.drop_connections(reg);
        for (fd, h) in self.handshakes.drain() {
            reg.unwatch(fd);
            drop(h);
        }
        if self.started {
            reg.unwatch(self.listener.as_raw_fd());
            reg.unwatch(self.timer.as_raw_fd());
            // Disarming cannot fail on a valid timerfd; a stray tick would be harmless.
            let _ = self.timer.clear();
        }
        self.started = false;
        self.listener_paused = false;
        self.replies.clear();
    }

    /// Forgets every connection without telling the guest, closing the host streams
    /// (transport reset: the guest drops its side by itself, virtio 1.2 §5.10.6.7).
    pub fn drop_connections(&mut self, reg: &mut dyn EventRegistry) {
        for (_, mut c) in self.conns.drain() {
            c.kill();
            if let Some(s) = c.take_stream() {
                if c.registered.is_some() {
                    reg.unwatch(s.as_raw_fd());
                }
            }
            count(&self.metrics.conns_closed, 1);
        }
        self.by_fd.clear();
        self.rxq.clear();
    }

    /// Live connections plus pending handshakes: what the cap counts.
    fn live(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// Whether TX processing must pause: too many replies wait for RX buffers.
    pub fn tx_blocked(&self) -> bool {
        self.replies.len() >= self.limits.max_replies
    }

    /// Whether there may be a packet for the guest.
    pub fn has_rx(&self) -> bool {
        !self.replies.is_empty() || !self.rxq.is_empty()
    }

    /// Queues a RST answering `hdr`, unless `hdr` is itself a RST (never answer a RST,
    /// or two peers could bounce them forever).
    pub fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == Op::Rst as u16 {
            return;
        }
        if self.replies.len() < self.limits.max_replies {
            self.replies.push_back(hdr.rst_reply());
        }
    }

    /// Handles one well-formed packet from the guest (already checked by
    /// `packet::parse_tx`: our CIDs, stream type, known op, payload in `data`).
    pub fn handle_tx(&mut self, hdr: &Header, data: &[u8], reg: &mut dyn EventRegistry) {
        let m = self.metrics.clone();
        count(&m.tx_packets, 1);
        let Some(op) = hdr.op() else {
            self.reply_rst(hdr);
            return;
        };
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if op == Op::Request {
            self.guest_connect(hdr, key, reg);
            return;
        }
        match op {
            Op::Rst => count(&m.rst_received, 1),
            Op::CreditRequest => count(&m.credit_requests, 1),
            _ => {}
        }
        let Some(c) = self.conns.get_mut(&key) else {
            // virtio 1.2 §5.10.6.5: packets for no connection get RST.
            self.reply_rst(hdr);
            return;
        };
        let was_connecting = c.state() == State::Connecting;
        c.handle_guest(hdr, op, data, &m);
        if was_connecting && c.state() == State::Established {
            count(&m.host_conns_opened, 1);
        }
        self.sync(key, reg);
    }

    /// A guest REQUEST: connect to `<uds_path>_<port>`, RESPONSE on success, RST if
    /// nothing listens or the cap is reached.
    fn guest_connect(&mut self, hdr: &Header, key: ConnKey, reg: &mut dyn EventRegistry) {
        let m = self.metrics.clone();
        if let Some(c) = self.conns.get_mut(&key) {
            // A second REQUEST on a live flow: the guest has lost track; reset it.
            count(&m.protocol_errors, 1);
            c.kill();
            self.sync(key, reg);
            return;
        }
        if self.live() >= self.limits.max_conns {
            count(&m.conn_limit_hits, 1);
            self.reply_rst(hdr);
            return;
        }
        let mut path: OsString = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let c = Connection::guest_initiated(stream, key, self.guest_cid, hdr);
                self.insert(c, reg);
                count(&m.guest_conns_opened, 1);
            }
            Err(_) => {
                count(&m.conns_refused, 1);
                self.reply_rst(hdr);
            }
        }
    }

    fn insert(&mut self, c: Connection, reg: &mut dyn EventRegistry) {
        let key = c.key();
        if let Some(fd) = c.fd() {
            self.by_fd.insert(fd, key);
        }
        self.conns.insert(key, c);
        self.sync(key, reg);
    }

    /// Brings the event loop and the RX queue in line with a connection's state after
    /// anything happened to it, and forgets it once it is finished.
    fn sync(&mut self, key: ConnKey, reg: &mut dyn EventRegistry) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(s) = c.take_stream() {
            let fd = s.as_raw_fd();
            if c.registered.take().is_some() {
                reg.unwatch(fd);
            }
            self.by_fd.remove(&fd);
            drop(s);
        }
        if let Some(fd) = c.fd() {
            match (c.interest(), c.registered) {
                (None, Some(_)) => {
                    reg.unwatch(fd);
                    c.registered = None;
                }
                (Some(set), None) => {
                    if reg.watch(fd, HOST_STREAM_EVENT, set) {
                        c.registered = Some(set);
                    } else {
                        count(&self.metrics.host_io_errors, 1);
                        c.kill();
                        // Not registered, so closing needs no unwatch.
                        if let Some(s) = c.take_stream() {
                            self.by_fd.remove(&s.as_raw_fd());
                        }
                    }
                }
                (Some(set), Some(old)) if set != old && reg.rewatch(fd, HOST_STREAM_EVENT, set) => {
                    c.registered = Some(set);
                }
                _ => {}
            }
        }
        if c.wants_rx() && !c.in_rxq {
            c.in_rxq = true;
            self.rxq.push_back(key);
        }
        if c.is_finished() {
            if c.in_rxq {
                self.rxq.retain(|k| *k != key);
            }
            self.conns.remove(&key);
            count(&self.metrics.conns_closed, 1);
        }
    }

    /// The next packet for the guest, fitting `max_data` payload bytes (payload in
    /// `buf`). Replies and connections take turns; connections go round-robin.
    pub fn next_rx(
        &mut self,
        max_data: usize,
        buf: &mut Vec<u8>,
        reg: &mut dyn EventRegistry,
    ) -> Option<Header> {
        buf.clear();
        // Every key is looked at once at most, even if it re-queues itself.
        let mut budget = self.rxq.len() + 1;
        let hdr = loop {
            let reply_turn = self.replies_turn || self.rxq.is_empty();
            self.replies_turn = !self.replies_turn;
            if reply_turn {
                if let Some(h) = self.replies.pop_front() {
                    break Some(h);
                }
            }
            if budget == 0 {
                break self.replies.pop_front();
            }
            budget -= 1;
            let Some(key) = self.rxq.pop_front() else {
                break None;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_rxq = false;
            let pkt = c.next_packet(max_data, buf, &self.metrics);
            self.sync(key, reg);
            if pkt.is_some() {
                break pkt;
            }
        }?;
        let m = &self.metrics;
        count(&m.rx_packets, 1);
        match hdr.op() {
            Some(Op::Rst) => count(&m.rst_sent, 1),
            Some(Op::CreditUpdate) => count(&m.credit_updates, 1),
            Some(Op::Rw) => count(&m.bytes_to_guest, u64::from(hdr.len)),
            _ => {}
        }
        Some(hdr)
    }

    /// Handles readiness on one of the muxer's fds.
    pub fn handle_event(
        &mut self,
        tag: u32,
        fd: RawFd,
        set: EventSet,
        reg: &mut dyn EventRegistry,
    ) {
        match tag {
            LISTENER_EVENT => self.accept_clients(reg),
            TIMER_EVENT => {
                // Non-blocking: EAGAIN if nothing expired after all.
                let _ = self.timer.wait();
                self.sweep(reg);
            }
            HOST_STREAM_EVENT => {
                if self.handshakes.contains_key(&fd) {
                    self.handshake_event(fd, reg);
                } else if let Some(&key) = self.by_fd.get(&fd) {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.host_event(set, &self.metrics);
                    }
                    self.sync(key, reg);
                }
            }
            _ => {}
        }
    }

    fn accept_clients(&mut self, reg: &mut dyn EventRegistry) {
        let m = self.metrics.clone();
        for _ in 0..ACCEPTS_PER_WAKEUP {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    count(&m.host_io_errors, 1);
                    reg.unwatch(self.listener.as_raw_fd());
                    self.listener_paused = true;
                    return;
                }
            };
            if self.live() >= self.limits.max_conns {
                count(&m.conn_limit_hits, 1);
                continue;
            }
            let fd = stream.as_raw_fd();
            if stream.set_nonblocking(true).is_err()
                || !reg.watch(fd, HOST_STREAM_EVENT, EventSet::IN)
            {
                count(&m.host_io_errors, 1);
                continue;
            }
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                    since: Instant::now(),
                },
            );
        }
    }

    fn handshake_event(&mut self, fd: RawFd, reg: &mut dyn EventRegistry) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = match h.read_line() {
            Ok(None) => return,
            Ok(Some(port)) => port,
            Err(_) => {
                count(&self.metrics.handshake_errors, 1);
                self.close_handshake(fd, reg);
                return;
            }
        };
        let Some(local_port) = self.alloc_port() else {
            count(&self.metrics.conn_limit_hits, 1);
            self.close_handshake(fd, reg);
            return;
        };
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        // The fd stays on epoll (registered for IN); the connection takes it over and
        // sync() narrows the interest.
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut c = Connection::host_initiated(h.stream, key, self.guest_cid);
        c.registered = Some(EventSet::IN);
        self.insert(c, reg);
    }

    fn close_handshake(&mut self, fd: RawFd, reg: &mut dyn EventRegistry) {
        if let Some(h) = self.handshakes.remove(&fd) {
            reg.unwatch(fd);
            drop(h);
        }
    }

    /// A host port no live connection uses, counting up from [`FIRST_EPHEMERAL_PORT`]
    /// and wrapping back to it.
    fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..=self.conns.len() {
            let p = self.next_port;
            self.next_port = p.checked_add(1).unwrap_or(FIRST_EPHEMERAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return Some(p);
            }
        }
        None
    }

    /// Enforces the timeouts; puts a paused listener back.
    fn sweep(&mut self, reg: &mut dyn EventRegistry) {
        let now = Instant::now();
        let l = self.limits;
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.since) > l.handshake_timeout)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            count(&self.metrics.timeouts, 1);
            self.close_handshake(fd, reg);
        }
        let late: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.timed_out(now, l.connect_timeout, l.close_timeout))
            .map(Connection::key)
            .collect();
        for key in late {
            count(&self.metrics.timeouts, 1);
            if let Some(c) = self.conns.get_mut(&key) {
                c.kill();
            }
            self.sync(key, reg);
        }
        if self.listener_paused && self.started {
            self.watch_listener(reg);
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Remove the socket file only if it is still the one we bound.
        let ours = std::fs::metadata(&self.uds_path)
            .ok()
            .map(|md| (md.dev(), md.ino()));
        if ours.is_some() && ours == self.socket_file {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
