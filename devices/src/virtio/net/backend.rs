//! The host side of a virtio-net device: a frame source and sink that can be polled.
//!
//! [`NetBackend`] is what the device needs from a tap: read one frame, write one frame
//! gathered from guest memory, set receive offloads, and an fd that becomes readable when
//! a frame is waiting. [`super::Tap`] is the real one; [`MemTap`] keeps frames in memory
//! for tests and fuzzing. Every frame carries the 12-byte `virtio_net_hdr` in front.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_memory::VolatileSlice;
use vmm_sys_util::eventfd::EventFd;

/// A frame source and sink with a pollable fd.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame (header + Ethernet frame) into `buf`; `WouldBlock` when none is
    /// waiting. A frame longer than `buf` may be truncated, so callers pass a buffer one
    /// byte longer than the largest frame they accept.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame: `hdr` followed by the guest buffers `frame`, in one call.
    fn write_frame(&mut self, hdr: &[u8], frame: &[VolatileSlice<'_>]) -> io::Result<usize>;
    /// Tells the backend which receive offloads the reader handles (TUN_F_* bits).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// What a [`MemTap`] holds; shared between clones.
#[derive(Debug, Default)]
pub struct MemTapState {
    /// Frames waiting to be read by the device, oldest first.
    pub rx: VecDeque<Vec<u8>>,
    /// Frames the device wrote, header included.
    pub tx: Vec<Vec<u8>>,
    /// The last offload flags set.
    pub offload: Option<u32>,
    /// Make reads fail (other than with `WouldBlock`).
    pub fail_reads: bool,
    /// Make writes fail.
    pub fail_writes: bool,
    /// Make offload changes fail.
    pub fail_offload: bool,
}

/// An in-memory backend. Readable (its EventFd, in semaphore mode, counts waiting frames)
/// whenever `rx` is not empty, so it works on the event loop like a tap. Clones share
/// state, so a test keeps one clone and gives another to the device.
#[derive(Debug, Clone)]
pub struct MemTap {
    state: Arc<Mutex<MemTapState>>,
    readable: Arc<EventFd>,
}

impl MemTap {
    /// An empty backend.
    pub fn new() -> io::Result<MemTap> {
        Ok(MemTap {
            state: Arc::default(),
            readable: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_SEMAPHORE)?),
        })
    }

    /// The shared state. A poisoned lock (a test thread panicked) is still usable.
    pub fn state(&self) -> MutexGuard<'_, MemTapState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame for the device to read and makes the fd readable.
    pub fn push_rx(&self, frame: Vec<u8>) -> io::Result<()> {
        self.state().rx.push_back(frame);
        self.readable.write(1)
    }

    /// Takes the frames the device has written so far.
    pub fn take_tx(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.state().tx)
    }
}

impl AsRawFd for MemTap {
    fn as_raw_fd(&self) -> RawFd {
        self.readable.as_raw_fd()
    }
}

impl NetBackend for MemTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.state();
        if s.fail_reads {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let Some(frame) = s.rx.pop_front() else {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        };
        drop(s);
        // One count per frame (EFD_SEMAPHORE); a count is always there for a queued frame.
        let _ = self.readable.read();
        let n = frame.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), frame.get(..n)) {
            dst.copy_from_slice(src);
        }
        Ok(n)
    }

    fn write_frame(&mut self, hdr: &[u8], frame: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let mut s = self.state();
        if s.fail_writes {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let len = hdr.len() + frame.iter().map(|f| f.len()).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(hdr);
        for f in frame {
            let at = out.len();
            out.resize(at + f.len(), 0);
            if let Some(dst) = out.get_mut(at..) {
                f.copy_to(dst);
            }
        }
        s.tx.push(out);
        Ok(len)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        let mut s = self.state();
        if s.fail_offload {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        s.offload = Some(flags);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_in_order_and_fd_readable_while_any_wait() {
        let t = MemTap::new().unwrap();
        let mut dev = t.clone();
        t.push_rx(vec![1, 2, 3]).unwrap();
        t.push_rx(vec![4; 10]).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(dev.read_frame(&mut buf).unwrap(), 3);
        assert_eq!(buf[..3], [1, 2, 3]);
        // Truncated to the buffer.
        assert_eq!(dev.read_frame(&mut buf).unwrap(), 8);
        let e = dev.read_frame(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // The eventfd count went back to 0.
        assert!(t.readable.read().is_err());
    }

    #[test]
    fn failures_are_reported() {
        let t = MemTap::new().unwrap();
        let mut dev = t.clone();
        t.state().fail_reads = true;
        t.state().fail_writes = true;
        t.state().fail_offload = true;
        assert!(dev.read_frame(&mut [0u8; 4]).is_err());
        assert!(dev.write_frame(&[0; 12], &[]).is_err());
        assert!(dev.set_offload(1).is_err());
        t.state().fail_offload = false;
        dev.set_offload(3).unwrap();
        assert_eq!(t.state().offload, Some(3));
    }
}
