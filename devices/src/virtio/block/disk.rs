//! Disk backends for virtio-blk: where sectors live. A raw host file for the VMM, an
//! in-memory disk for unit tests and the fuzzer. Data moves straight between the backend
//! and guest memory (`VolatileSlice`), with no bounce buffer for files.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

/// Random-access storage behind a block device. Offsets are in bytes; callers check
/// ranges against [`Disk::size`] first. A request's buffers move in one call: the slices are
/// consecutive on the disk, in order, from `offset` on.
pub trait Disk: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills every slice of `dst`, in order, from `offset` on. A short read is an error.
    fn read_vectored_at(&mut self, offset: u64, dst: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Writes every slice of `src`, in order, from `offset` on.
    fn write_vectored_at(&mut self, offset: u64, src: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> io::Result<()>;

    /// Fills all of `dst` from `offset`. A short read is an error.
    fn read_at(&mut self, offset: u64, dst: &VolatileSlice<'_>) -> io::Result<()> {
        self.read_vectored_at(offset, std::slice::from_ref(dst))
    }
    /// Writes all of `src` at `offset`.
    fn write_at(&mut self, offset: u64, src: &VolatileSlice<'_>) -> io::Result<()> {
        self.write_vectored_at(offset, std::slice::from_ref(src))
    }
}

/// A raw disk image in a host file, accessed with preadv/pwritev: one system call for a
/// whole request (up to [`IOV_MAX`] buffers), not one per guest page. In a nested test host
/// each system call is costly, and a 512 KiB request from the guest is 128 pages.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Wraps an open file; its current length is the disk size.
    pub fn new(file: File) -> io::Result<RawFile> {
        let size = file.metadata()?.len();
        Ok(RawFile { file, size })
    }
}

/// The most buffers one preadv/pwritev takes (Linux's UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

fn off(offset: u64) -> io::Result<libc::off64_t> {
    libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Drops the first `n` bytes of `iov[*start..]`: whole entries first, then the front of a
/// partly done one. Zero-length entries at the front are dropped too.
fn advance(iov: &mut [libc::iovec], start: &mut usize, mut n: usize) {
    while let Some(first) = iov.get_mut(*start) {
        if n < first.iov_len {
            // The pointer stays inside the entry's buffer: n < iov_len.
            first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
            first.iov_len -= n;
            return;
        }
        n -= first.iov_len;
        *start += 1;
    }
}

/// Moves the bytes of `iov` between the file and memory at `offset`, retrying on short
/// transfers and EINTR. Every entry must point at `iov_len` mapped bytes for the whole call.
fn transfer_vectored(
    file: &File,
    offset: u64,
    iov: &mut [libc::iovec],
    write: bool,
) -> io::Result<()> {
    let mut start = 0;
    let mut pos = offset;
    advance(iov, &mut start, 0);
    while start < iov.len() {
        let batch = &iov[start..iov.len().min(start + IOV_MAX)];
        let count = libc::c_int::try_from(batch.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: each entry points at `iov_len` bytes of memory the caller keeps mapped for
        // this call; the kernel reads from or writes to them, never through Rust references.
        let n = unsafe {
            if write {
                libc::pwritev64(file.as_raw_fd(), batch.as_ptr(), count, off(pos)?)
            } else {
                libc::preadv64(file.as_raw_fd(), batch.as_ptr(), count, off(pos)?)
            }
        };
        match n {
            n if n > 0 => {
                let n = n.unsigned_abs();
                pos = pos.saturating_add(n as u64);
                advance(iov, &mut start, n);
            }
            0 if write => return Err(io::ErrorKind::WriteZero.into()),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// One iovec per `(pointer, length)`.
fn iovecs(bufs: impl Iterator<Item = (*mut u8, usize)>) -> Vec<libc::iovec> {
    bufs.map(|(base, len)| libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    })
    .collect()
}

impl Disk for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_vectored_at(&mut self, offset: u64, dst: &[VolatileSlice<'_>]) -> io::Result<()> {
        // The guards keep the guest memory mapped until the read is done.
        let guards: Vec<_> = dst.iter().map(VolatileSlice::ptr_guard_mut).collect();
        let mut iov = iovecs(guards.iter().zip(dst).map(|(g, s)| (g.as_ptr(), s.len())));
        transfer_vectored(&self.file, offset, &mut iov, false)?;
        for s in dst {
            s.bitmap().mark_dirty(0, s.len());
        }
        Ok(())
    }

    fn write_vectored_at(&mut self, offset: u64, src: &[VolatileSlice<'_>]) -> io::Result<()> {
        let guards: Vec<_> = src.iter().map(VolatileSlice::ptr_guard).collect();
        // pwritev only reads through these pointers; iovec has no const flavour.
        let mut iov = iovecs(
            guards
                .iter()
                .zip(src)
                .map(|(g, s)| (g.as_ptr().cast_mut(), s.len())),
        );
        transfer_vectored(&self.file, offset, &mut iov, true)
    }

    fn flush(&mut self) -> io::Result<()> {
        // fdatasync: data and the metadata needed to read it back (virtio 1.2 §5.2.6.1
        // VIRTIO_BLK_T_FLUSH: completed writes must be committed to non-volatile storage).
        self.file.sync_data()
    }
}

/// A disk held in memory, for tests and fuzzing.
#[derive(Debug, Clone, Default)]
pub struct MemDisk {
    /// The disk's bytes.
    pub data: Vec<u8>,
    /// Flush calls so far.
    pub flushes: u64,
    /// When set, every operation fails with EIO (to exercise error paths).
    pub fail: bool,
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize) -> MemDisk {
        MemDisk {
            data: vec![0; size],
            ..MemDisk::default()
        }
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let eio = || io::Error::from_raw_os_error(libc::EIO);
        if self.fail {
            return Err(eio());
        }
        let start = usize::try_from(offset).map_err(|_| eio())?;
        let end = start.checked_add(len).ok_or_else(eio)?;
        if end > self.data.len() {
            return Err(eio());
        }
        Ok(start..end)
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_vectored_at(&mut self, offset: u64, dst: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut at = offset;
        for s in dst {
            let r = self.range(at, s.len())?;
            let src = self.data.get(r).ok_or(io::ErrorKind::UnexpectedEof)?;
            s.copy_from(src);
            at = at.saturating_add(s.len() as u64);
        }
        Ok(())
    }

    fn write_vectored_at(&mut self, offset: u64, src: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut at = offset;
        for s in src {
            let r = self.range(at, s.len())?;
            let dst = self.data.get_mut(r).ok_or(io::ErrorKind::WriteZero)?;
            s.copy_to(dst);
            at = at.saturating_add(s.len() as u64);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.range(0, 0)?;
        self.flushes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn raw_file_reads_and_writes_at_offsets() {
        let tmp = TempFile::new().unwrap();
        let mut f = tmp.as_file().try_clone().unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        let mut disk = RawFile::new(tmp.as_file().try_clone().unwrap()).unwrap();
        assert_eq!(disk.size(), 4096);

        let mut buf = [0u8; 16];
        // SAFETY: `buf` outlives the slice and is not otherwise accessed while it lives.
        let vs = unsafe { VolatileSlice::new(buf.as_mut_ptr(), buf.len()) };
        disk.read_at(100, &vs).unwrap();
        assert_eq!(buf, [7u8; 16]);

        let mut src = [1u8, 2, 3, 4];
        // SAFETY: as above, for `src`.
        let vs = unsafe { VolatileSlice::new(src.as_mut_ptr(), src.len()) };
        disk.write_at(4094, &vs).unwrap();
        disk.flush().unwrap();
        let mut back = [0u8; 4];
        // SAFETY: as above, for `back`.
        let vs = unsafe { VolatileSlice::new(back.as_mut_ptr(), back.len()) };
        disk.read_at(4094, &vs).unwrap();
        assert_eq!(back, [1, 2, 3, 4]);

        // Reading past the end is a short read: an error, not zeroes.
        let mut past = [0u8; 8];
        // SAFETY: as above, for `past`.
        let vs = unsafe { VolatileSlice::new(past.as_mut_ptr(), past.len()) };
        assert!(disk.read_at(8192, &vs).is_err());
    }

    #[test]
    fn raw_file_moves_many_buffers_in_order() {
        // More buffers than one preadv/pwritev takes, of uneven sizes, some empty: the
        // bytes land consecutively from the offset, in buffer order.
        let tmp = TempFile::new().unwrap();
        let f = tmp.as_file().try_clone().unwrap();
        f.set_len(64 * 1024).unwrap();
        let mut disk = RawFile::new(f).unwrap();
        let sizes: Vec<usize> = (0..IOV_MAX + 300).map(|i| i % 7).collect();
        let total: usize = sizes.iter().sum();
        let pattern: Vec<u8> = (0..251u8).cycle().take(total).collect();
        let mut src = pattern.clone();
        let mut slices = Vec::new();
        let mut rest: &mut [u8] = &mut src;
        for &n in &sizes {
            let (head, tail) = rest.split_at_mut(n);
            // SAFETY: `head` is a distinct part of `src`, which outlives the slices and is
            // not otherwise accessed while they live.
            slices.push(unsafe { VolatileSlice::new(head.as_mut_ptr(), head.len()) });
            rest = tail;
        }
        disk.write_vectored_at(1000, &slices).unwrap();

        let mut back = vec![0u8; total];
        // SAFETY: as above, for `back`.
        let whole = unsafe { VolatileSlice::new(back.as_mut_ptr(), back.len()) };
        disk.read_at(1000, &whole).unwrap();
        assert_eq!(back, pattern);

        // And back out through many buffers.
        let mut dst = vec![0u8; total];
        let mut slices = Vec::new();
        let mut rest: &mut [u8] = &mut dst;
        for &n in sizes.iter().rev() {
            let (head, tail) = rest.split_at_mut(n);
            // SAFETY: as above, for `dst`.
            slices.push(unsafe { VolatileSlice::new(head.as_mut_ptr(), head.len()) });
            rest = tail;
        }
        disk.read_vectored_at(1000, &slices).unwrap();
        assert_eq!(dst, pattern);

        // A vectored read that runs past the end of the file is an error.
        let mut tail = [0u8; 16];
        // SAFETY: as above, for `tail`.
        let vs = unsafe { VolatileSlice::new(tail.as_mut_ptr(), tail.len()) };
        assert!(disk.read_vectored_at(64 * 1024 - 8, &[vs]).is_err());
    }

    #[test]
    fn advance_skips_done_entries_and_trims_a_partial_one() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 8];
        let mut iov = [
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let mut start = 0;
        advance(&mut iov, &mut start, 0);
        assert_eq!(start, 1, "a leading empty entry is dropped");
        advance(&mut iov, &mut start, 6);
        assert_eq!(start, 2);
        assert_eq!(iov[2].iov_len, 6);
        assert_eq!(iov[2].iov_base.cast::<u8>(), b[2..].as_mut_ptr());
        advance(&mut iov, &mut start, 6);
        assert_eq!(start, 3, "all done");
    }
}
