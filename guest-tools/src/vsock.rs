//! AF_VSOCK stream sockets through libc: connect to CID:PORT, listen on VMADDR_CID_ANY:PORT,
//! and the connected stream as `Read + Write` plus the [`Duplex`] operations the
//! per-connection logic needs (a second handle for a writer thread, half-close).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// What a per-connection routine needs beyond `Read + Write`: a second handle to the same
/// connection (one thread writes while another reads) and a half-close that tells the peer
/// "no more data" while still reading its answer. Implemented for vsock and, for tests,
/// Unix sockets.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// Another handle to the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// `shutdown(SHUT_WR)`: the peer reads EOF; our read side stays open.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Duplex for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
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

/// A connected vsock stream.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

impl VsockStream {
    /// Connects to `port` on `cid` (2 is the host).
    pub fn connect(cid: u32, port: u32) -> io::Result<VsockStream> {
        let fd = new_socket()?;
        let (addr, len) = sockaddr(cid, port)?;
        loop {
            // SAFETY: addr is a valid sockaddr_vm of `len` bytes that outlives the call.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                    len,
                )
            };
            match check(rc) {
                Ok(_) => return Ok(VsockStream { fd }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sets a receive timeout (SO_RCVTIMEO); a read past it fails with EAGAIN.
    pub fn set_read_timeout(&self, timeout: std::time::Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>())
            .map_err(|_| io::Error::other("timeval size out of range"))?;
        // SAFETY: tv is a valid timeval of `len` bytes that outlives the call.
        check(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
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

impl Duplex for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream {
            fd: self.fd.try_clone()?,
        })
    }

    fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown on a socket fd we own.
        check(unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) })?;
        Ok(())
    }
}

/// A vsock socket listening on one port of every CID of this machine.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Binds VMADDR_CID_ANY:`port` and listens.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
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
        // SAFETY: listen on a bound socket we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(VsockListener { fd })
    }

    /// Waits for the next connection (retrying EINTR).
    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: null address pointers are allowed (the peer address is not wanted).
            let rc = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            match check(rc) {
                Ok(raw) => {
                    // SAFETY: raw is a fresh fd that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    return Ok(VsockStream { fd });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_layout_matches_the_kernel() {
        // struct sockaddr_vm is 16 bytes: family, reserved, port, cid, 4 zero bytes.
        assert_eq!(std::mem::size_of::<libc::sockaddr_vm>(), 16);
        let (a, len) = sockaddr(2, 5000).unwrap();
        assert_eq!(len, 16);
        assert_eq!(i32::from(a.svm_family), libc::AF_VSOCK);
        assert_eq!((a.svm_cid, a.svm_port), (2, 5000));
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
        client.write_all(b"ping").unwrap();
        client.shutdown_write().unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
    }
}
