//! Disk backends for virtio-blk: where sectors live. A raw host file for the VMM, an
//! in-memory disk for unit tests and the fuzzer. Data moves straight between the backend
//! and guest memory (`VolatileSlice`), with no bounce buffer for files.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

/// Random-access storage behind a block device. Offsets are in bytes; callers check
/// ranges against [`Disk::size`] first.
pub trait Disk: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills all of `dst` from `offset`. A short read is an error.
    fn read_at(&mut self, offset: u64, dst: &VolatileSlice<'_>) -> io::Result<()>;
    /// Writes all of `src` at `offset`.
    fn write_at(&mut self, offset: u64, src: &VolatileSlice<'_>) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// A raw disk image in a host file, accessed with pread/pwrite.
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

fn off(offset: u64) -> io::Result<libc::off64_t> {
    libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl Disk for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, dst: &VolatileSlice<'_>) -> io::Result<()> {
        let guard = dst.ptr_guard_mut();
        let base = guard.as_ptr();
        let mut done = 0usize;
        while done < dst.len() {
            let pos = off(offset.saturating_add(done as u64))?;
            // SAFETY: `base` points at `dst.len()` bytes of mapped guest memory that stay
            // mapped while `guard` lives; we write at most `dst.len() - done` bytes starting
            // `done` bytes in. The kernel writes through the pointer, never Rust references.
            let n = unsafe {
                libc::pread64(
                    self.file.as_raw_fd(),
                    base.add(done).cast(),
                    dst.len() - done,
                    pos,
                )
            };
            match n {
                n if n > 0 => done += n.unsigned_abs(),
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        dst.bitmap().mark_dirty(0, dst.len());
        Ok(())
    }

    fn write_at(&mut self, offset: u64, src: &VolatileSlice<'_>) -> io::Result<()> {
        let guard = src.ptr_guard();
        let base = guard.as_ptr();
        let mut done = 0usize;
        while done < src.len() {
            let pos = off(offset.saturating_add(done as u64))?;
            // SAFETY: `base` points at `src.len()` bytes of mapped guest memory, kept
            // mapped by `guard`; the kernel only reads `src.len() - done` bytes from
            // `done` on.
            let n = unsafe {
                libc::pwrite64(
                    self.file.as_raw_fd(),
                    base.add(done).cast(),
                    src.len() - done,
                    pos,
                )
            };
            match n {
                n if n > 0 => done += n.unsigned_abs(),
                0 => return Err(io::ErrorKind::WriteZero.into()),
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

    fn read_at(&mut self, offset: u64, dst: &VolatileSlice<'_>) -> io::Result<()> {
        let r = self.range(offset, dst.len())?;
        let src = self.data.get(r).ok_or(io::ErrorKind::UnexpectedEof)?;
        dst.copy_from(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, src: &VolatileSlice<'_>) -> io::Result<()> {
        let r = self.range(offset, src.len())?;
        let dst = self.data.get_mut(r).ok_or(io::ErrorKind::WriteZero)?;
        src.copy_to(dst);
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
}
