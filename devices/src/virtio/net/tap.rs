//! A host tap device opened through `/dev/net/tun` (Linux
//! Documentation/networking/tuntap.rst).
//!
//! The fd is non-blocking and carries a 12-byte `virtio_net_hdr` in front of every frame
//! (IFF_VNET_HDR + TUNSETVNETHDRSZ), so guest offload metadata passes through unchanged.
//! The interface itself (creation, addresses, bridge) is the orchestrator's business; a
//! tap that does not exist yet is created here and vanishes when the fd is closed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::VolatileSlice;

use super::backend::NetBackend;
use super::{NetError, VNET_HDR_LEN};

/// Most iovecs one writev takes (UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;

/// TUNSETIFF flags: an Ethernet tap, no packet-info prefix, a vnet header on every frame.
#[expect(
    clippy::cast_possible_truncation,
    reason = "0x5002 fits in the c_short ifr_flags field"
)]
const TAP_FLAGS: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;

/// A tap device fd.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates) the tap `name` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and
    /// a 12-byte vnet header, non-blocking.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(NetError::TapName(name.to_string()));
        }
        let err = |what| {
            let name = name.to_string();
            move |source| NetError::Tap { name, what, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(err("cannot open /dev/net/tun"))?;

        // SAFETY: ifreq is plain data (a name array and a union of plain fields); all
        // zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
            *dst = libc::c_char::from_ne_bytes([src]);
        }
        ifr.ifr_ifru.ifru_flags = TAP_FLAGS;
        // SAFETY: `file` is an open tun fd; TUNSETIFF reads and writes one `ifreq`, which
        // `ifr` is, alive for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            return Err(err("TUNSETIFF failed")(io::Error::last_os_error()));
        }
        // The kernel may have expanded a pattern such as `tap%d`: keep the real name.
        let actual: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c.to_ne_bytes()[0])
            .collect();
        let name = String::from_utf8(actual).unwrap_or_else(|_| name.to_string());

        let hdr_len = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(12);
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, alive for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if r < 0 {
            return Err(NetError::Tap {
                name,
                what: "TUNSETVNETHDRSZ failed",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap { file, name })
    }

    /// Wraps an fd that behaves like a tap (one frame per read and write), e.g. one end of
    /// a SOCK_SEQPACKET socketpair in tests. `set_offload` fails on anything but a tap.
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_frame(&mut self, hdr: &[u8], frame: &[VolatileSlice<'_>]) -> io::Result<usize> {
        if frame.len() >= MAX_IOVECS {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // The guards keep the guest mappings alive until writev returns.
        let guards: Vec<_> = frame.iter().map(|s| (s.ptr_guard(), s.len())).collect();
        let mut iov = Vec::with_capacity(frame.len() + 1);
        iov.push(libc::iovec {
            iov_base: hdr.as_ptr().cast_mut().cast(),
            iov_len: hdr.len(),
        });
        for (g, len) in &guards {
            iov.push(libc::iovec {
                iov_base: g.as_ptr().cast_mut().cast(),
                iov_len: *len,
            });
        }
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        loop {
            // SAFETY: every iovec points at memory alive for the call: `hdr` is borrowed,
            // and each guest slice's mapping is held by its guard, each `len` bytes long.
            // writev only reads through them.
            let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) };
            if let Ok(n) = usize::try_from(n) {
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "tap_tests.rs"]
mod tests;
