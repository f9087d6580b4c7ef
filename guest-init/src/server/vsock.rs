//! AF_VSOCK through libc: a listening socket on a port of the guest (any CID), and the
//! accepted streams as `Read + Write`. The host reaches it through the VMM's hybrid vsock
//! socket (`CONNECT <port>`).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::listen::Listener;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A vsock socket listening on one port.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Binds `port` on every CID of this guest and listens.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        // SAFETY: socket takes plain values and returns a new fd or -1.
        let raw = check(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let family = libc::sa_family_t::try_from(libc::AF_VSOCK)
            .map_err(|_| io::Error::other("AF_VSOCK out of range"))?;
        // SAFETY: sockaddr_vm is plain data; all-zero is valid (and the reserved fields must
        // be zero).
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = family;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>())
            .map_err(|_| io::Error::other("sockaddr_vm size out of range"))?;
        // SAFETY: addr is a valid sockaddr_vm of `len` bytes that outlives the call.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                len,
            )
        })?;
        // SAFETY: listen on a bound socket we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
        Ok(VsockListener { fd })
    }
}

impl Listener for VsockListener {
    type Stream = VsockStream;

    fn accept(&self) -> io::Result<VsockStream> {
        // SAFETY: null address pointers are allowed (the peer address is not wanted).
        let raw = check(unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(VsockStream { fd })
    }
}

/// An accepted vsock connection.
pub struct VsockStream {
    fd: OwnedFd,
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
        // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a signal to PID 1.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Connects to `port` on the local CID through the kernel's vsock loopback.
    fn connect_local(port: u32) -> io::Result<VsockStream> {
        // SAFETY: socket takes plain values and returns a new fd or -1.
        let raw = check(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap();
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_LOCAL;
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).unwrap();
        // SAFETY: addr is a valid sockaddr_vm of `len` bytes that outlives the call.
        check(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                len,
            )
        })?;
        Ok(VsockStream { fd })
    }

    #[test]
    fn vsock_round_trip_when_the_host_kernel_has_loopback() {
        // Test machines may lack AF_VSOCK or the loopback transport; then there is nothing
        // to test beyond "an error, not a panic".
        let port = 40_000 + std::process::id() % 20_000;
        let listener = match VsockListener::bind(port) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping: vsock bind: {e}");
                return;
            }
        };
        let mut client = match connect_local(port) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipping: vsock loopback connect: {e}");
                return;
            }
        };
        let mut server = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        drop(client);
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        assert!(server.write_all(b"x").is_err() || server.write_all(b"x").is_err());
    }
}
