//! AF_VSOCK stream sockets through libc, for the guest side: a listener on a port of every
//! CID of this machine, an outgoing connection to CID:PORT, and the connected stream as
//! `Read + Write` with a second handle, half-close and timeouts. guest-init's agent and
//! gtool both use it; the host reaches these sockets through the VMM's hybrid vsock socket
//! ([`connect_hybrid`](crate::connect_hybrid)).
//!
//! Writes use `send(MSG_NOSIGNAL)`: a closed peer is an `EPIPE` error, never a `SIGPIPE`
//! (which would kill gtool, or be a signal to PID 1 in guest-init).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Runs `call` again for as long as it fails with EINTR.
fn retry_eintr(mut call: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
    loop {
        match check(call()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain values and returns a new fd or -1.
    let raw =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: raw is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn sockaddr(cid: u32, port: u32) -> io::Result<(libc::sockaddr_vm, libc::socklen_t)> {
    // SAFETY: sockaddr_vm is plain data; all-zero is valid (the reserved and zero fields
    // must be zero).
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK)
        .map_err(|_| io::Error::other("AF_VSOCK out of range"))?;
    addr.svm_port = port;
    addr.svm_cid = cid;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>())
        .map_err(|_| io::Error::other("sockaddr_vm size out of range"))?;
    Ok((addr, len))
}

/// A connected vsock stream (accepted or connected).
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

impl VsockStream {
    /// Connects to `port` on `cid` (2 is the host), retrying EINTR.
    pub fn connect(cid: u32, port: u32) -> io::Result<VsockStream> {
        let fd = new_socket()?;
        let (addr, len) = sockaddr(cid, port)?;
        retry_eintr(|| {
            // SAFETY: addr is a valid sockaddr_vm of `len` bytes that outlives the call.
            unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                    len,
                )
            }
        })?;
        Ok(VsockStream { fd })
    }

    /// Another handle to the same connection (a `dup` of the socket), e.g. for a writer
    /// thread while this one reads.
    pub fn try_clone(&self) -> io::Result<VsockStream> {
        Ok(VsockStream {
            fd: self.fd.try_clone()?,
        })
    }

    /// `shutdown(2)`: `Shutdown::Write` makes the peer read EOF while our read side stays
    /// open.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown on a socket fd we own.
        check(unsafe { libc::shutdown(self.fd.as_raw_fd(), how) })?;
        Ok(())
    }

    /// Sets the receive timeout (`SO_RCVTIMEO`); a read past it fails with `WouldBlock`
    /// (EAGAIN). `None` blocks forever; a zero duration is an `InvalidInput` error, as in
    /// `std::net::TcpStream`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_RCVTIMEO, timeout)
    }

    /// Sets the send timeout (`SO_SNDTIMEO`); a write past it fails with `WouldBlock`
    /// (EAGAIN). `None` blocks forever; a zero duration is an `InvalidInput` error.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_SNDTIMEO, timeout)
    }

    fn set_timeout(&self, option: libc::c_int, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            Some(t) if t.is_zero() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "cannot set a 0 duration timeout",
                ))
            }
            Some(t) => {
                let mut tv = libc::timeval {
                    tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
                    tv_usec: libc::suseconds_t::from(t.subsec_micros()),
                };
                // Under a microsecond: round up, as all-zero would mean "no timeout".
                if tv.tv_sec == 0 && tv.tv_usec == 0 {
                    tv.tv_usec = 1;
                }
                tv
            }
        };
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>())
            .map_err(|_| io::Error::other("timeval size out of range"))?;
        // SAFETY: tv is a valid timeval of `len` bytes that outlives the call.
        check(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&tv).cast(),
                len,
            )
        })?;
        Ok(())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a SIGPIPE.
        // SAFETY: buf is valid for reads of buf.len() bytes.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A vsock socket listening on one port of every CID of this machine.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Backlog of [`bind`](Self::bind).
    pub const DEFAULT_BACKLOG: u32 = 128;

    /// Binds `VMADDR_CID_ANY:port` and listens with [`DEFAULT_BACKLOG`](Self::DEFAULT_BACKLOG).
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        VsockListener::bind_with_backlog(port, VsockListener::DEFAULT_BACKLOG)
    }

    /// Binds `VMADDR_CID_ANY:port` and listens with room for `backlog` connections not yet
    /// accepted (the kernel caps it at `somaxconn`).
    pub fn bind_with_backlog(port: u32, backlog: u32) -> io::Result<VsockListener> {
        let fd = new_socket()?;
        let (addr, len) = sockaddr(libc::VMADDR_CID_ANY, port)?;
        // SAFETY: addr is a valid sockaddr_vm of `len` bytes that outlives the call.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                len,
            )
        })?;
        let backlog = libc::c_int::try_from(backlog).unwrap_or(libc::c_int::MAX);
        // SAFETY: listen on a bound socket we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
        Ok(VsockListener { fd })
    }

    /// Waits for the next connection, retrying EINTR.
    pub fn accept(&self) -> io::Result<VsockStream> {
        let raw = retry_eintr(|| {
            // SAFETY: null address pointers are allowed (the peer address is not wanted).
            unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            }
        })?;
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(VsockStream { fd })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn sockaddr_layout_matches_the_kernel() {
        // struct sockaddr_vm is 16 bytes: family, reserved, port, cid, 4 zero bytes.
        assert_eq!(std::mem::size_of::<libc::sockaddr_vm>(), 16);
        let (a, len) = sockaddr(2, 5000).unwrap();
        assert_eq!(len, 16);
        assert_eq!(i32::from(a.svm_family), libc::AF_VSOCK);
        assert_eq!((a.svm_cid, a.svm_port), (2, 5000));
    }

    /// The stream's I/O is plain socket calls on its fd, so a Unix socket pair stands in for
    /// vsock where the build machine has none.
    fn unix_pair() -> (VsockStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (VsockStream { fd: a.into() }, b)
    }

    /// Sends `ping` on `w`, half-closes it, and checks that `peer` reads exactly that.
    fn ping_then_half_close(w: &mut VsockStream, peer: &mut impl Read) {
        w.write_all(b"ping").unwrap();
        w.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
    }

    #[test]
    fn stream_io_half_close_and_clone_over_a_socket_pair() {
        let (mut s, mut peer) = unix_pair();
        ping_then_half_close(&mut s.try_clone().unwrap(), &mut peer);
        // Our read side is still open after the half-close.
        peer.write_all(b"pong").unwrap();
        drop(peer);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"pong");
    }

    #[test]
    fn write_to_a_closed_peer_is_an_error_not_a_signal() {
        let (mut s, peer) = unix_pair();
        drop(peer);
        let e = s.write_all(b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn read_timeout_expires_and_can_be_cleared() {
        let (mut s, mut peer) = unix_pair();
        let zero = s.set_read_timeout(Some(Duration::ZERO)).unwrap_err();
        assert_eq!(zero.kind(), io::ErrorKind::InvalidInput);
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let e = s.read(&mut [0u8; 4]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        s.set_read_timeout(None).unwrap();
        s.set_write_timeout(Some(Duration::from_nanos(1))).unwrap();
        s.set_write_timeout(None).unwrap();
        peer.write_all(b"ok").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
    }

    #[test]
    fn loopback_round_trip_when_the_host_kernel_has_vsock() {
        // Build machines may lack AF_VSOCK or its loopback transport; then the only check
        // is "an error, not a panic".
        let port = 41_000 + std::process::id() % 20_000;
        let listener = match VsockListener::bind(port) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping: vsock bind: {e}");
                return;
            }
        };
        let mut client = match VsockStream::connect(libc::VMADDR_CID_LOCAL, port) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipping: vsock loopback connect: {e}");
                return;
            }
        };
        let mut server = listener.accept().unwrap();
        ping_then_half_close(&mut client, &mut server);
        drop(client);
        assert!(server.write_all(b"x").is_err() || server.write_all(b"x").is_err());
    }
}
