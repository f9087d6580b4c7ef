//! The guest memory file: guest RAM, sparse.
//!
//! Layout: the RAM regions back to back in guest address order, with no header. Region
//! `i` starts at file offset `sum(size of regions 0..i)`; the file is exactly the RAM size.
//! The [`MemoryRegionLayout`] list in the vmstate file says where each region goes in the
//! guest. Pages never touched, and pages of zeros, are holes (they read as zeros), so the
//! file takes only as much disk as the guest used.
//!
//! Writing finds the pages that may hold data without reading all of RAM:
//! - `mincore(2)` on the mapping: for anonymous private memory a page is resident once
//!   touched (a read maps the shared zero page, which the zero check then skips);
//! - `/proc/self/pagemap` bit 62: touched pages that are swapped out, which mincore does
//!   not report (if pagemap cannot be read, every page is read instead);
//! - for memory that is itself a private mapping of an earlier memory file, the file's
//!   data extents (`SEEK_DATA`): untouched pages there are not resident but hold data.
//!
//! Those pages are copied through a 2 MiB buffer, runs of non-zero pages are written with
//! one `pwrite` each, then the file is fsynced and renamed into place like the vmstate.
//! The vCPUs and devices must be paused while it runs.
//!
//! Restoring maps each region of the file `MAP_PRIVATE`: pages load lazily from the page
//! cache on first access and a guest write copies the page, so the file never changes and
//! many VMs restored from one file share its page cache.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

use super::format::{sync_parent, tmp_path};
use super::state::{validate_regions, PAGE_SIZE};

/// Pages written per `pwrite` at most, and the copy buffer's size.
pub const BATCH_BYTES: usize = 2 << 20;
/// Pages looked at per mincore/pagemap call.
const WINDOW_PAGES: usize = 16 * 1024;
/// Page size as a `usize`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "4096 fits every usize; const contexts have no try_from"
)]
const PAGE: usize = PAGE_SIZE as usize;

/// Where one guest RAM region goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionLayout {
    /// Guest physical start address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// What [`write_memory`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryWriteStats {
    /// Bytes of data written (the rest of the file is holes).
    pub bytes_written: u64,
    /// Pages written.
    pub pages_written: u64,
    /// Pages that may have held data and were read to check.
    pub pages_scanned: u64,
}

/// Errors writing or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// An I/O operation failed.
    #[error("memory file {}: {what}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The layout is unusable.
    #[error("memory file {}: invalid memory layout: {problem}", path.display())]
    Layout {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The file is not the size of the guest RAM it should hold.
    #[error("memory file {} is {actual} bytes, the snapshot's guest RAM is {expected} bytes", path.display())]
    Size {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The RAM size.
        expected: u64,
    },
    /// A region could not be mapped.
    #[error("memory file {}: cannot map the region at {guest_addr:#x}: {problem}", path.display())]
    Map {
        /// The file.
        path: PathBuf,
        /// The region's guest address.
        guest_addr: u64,
        /// Why.
        problem: String,
    },
    /// Guest memory could not be read.
    #[error("memory file {}: cannot read guest memory at {guest_addr:#x}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Where.
        guest_addr: u64,
        /// The failure.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The layout of `mem`, for the vmstate file.
pub fn layout_of(mem: &GuestMemoryMmap) -> Vec<MemoryRegionLayout> {
    mem.iter()
        .map(|r| MemoryRegionLayout {
            guest_addr: r.start_addr().raw_value(),
            size: r.len(),
        })
        .collect()
}

/// Which pages of one window may hold data: one bool per page.
struct PageProbe {
    pagemap: Option<File>,
}

impl PageProbe {
    fn new() -> PageProbe {
        // Without pagemap every page is read (slower, still correct); `pages_scanned` in
        // the stats shows it.
        PageProbe {
            pagemap: File::open("/proc/self/pagemap").ok(),
        }
    }

    /// Marks in `out` the pages of `[host, host + out.len() pages)` that may hold data.
    /// `file` is the region's backing file and the window's offset in it, if any.
    fn probe(&self, host: *mut u8, out: &mut [bool], file: Option<(&File, u64)>) {
        let len = out.len() * PAGE;
        let Some(pagemap) = &self.pagemap else {
            out.fill(true);
            return;
        };
        let mut vec = vec![0u8; out.len()];
        // SAFETY: `host` is the page-aligned start of `len` bytes inside a live mapping of
        // guest memory, and `vec` has one byte per page of it, as mincore(2) requires.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            out.fill(true);
            return;
        }
        let mut entries = vec![0u8; out.len() * 8];
        let at = (host as u64 / PAGE_SIZE) * 8;
        let swapped_known = pagemap.read_exact_at(&mut entries, at).is_ok();
        for (i, o) in out.iter_mut().enumerate() {
            let resident = vec[i] & 1 == 1;
            let swapped = if swapped_known {
                let e: [u8; 8] = std::array::from_fn(|b| entries[i * 8 + b]);
                (u64::from_ne_bytes(e) >> 62) & 1 == 1
            } else {
                true
            };
            *o = resident || swapped;
        }
        if let Some((f, start)) = file {
            mark_file_data(f, start, out);
        }
    }
}

/// Marks the pages of `out` (a window starting at offset `start` of `f`) that lie in data
/// extents of the file (lseek SEEK_DATA/SEEK_HOLE). Marks all if the file cannot tell.
fn mark_file_data(f: &File, start: u64, out: &mut [bool]) {
    let end = start + (out.len() * PAGE) as u64;
    let fd = f.as_raw_fd();
    let mut pos = start;
    while pos < end {
        let Ok(off) = libc::off_t::try_from(pos) else {
            out.fill(true);
            return;
        };
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                out.fill(true);
            }
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (Ok(data), Ok(hole)) = (u64::try_from(data), u64::try_from(hole)) else {
            out.fill(true);
            return;
        };
        if data >= end {
            return;
        }
        let first = usize::try_from((data - start) / PAGE_SIZE).unwrap_or(usize::MAX);
        let last = usize::try_from((hole.min(end) - start).div_ceil(PAGE_SIZE)).unwrap_or(0);
        if let Some(s) = out.get_mut(first..last.min(out.len())) {
            s.fill(true);
        }
        pos = hole.max(data + 1);
    }
}

fn is_zero(page: &[u8]) -> bool {
    // The compiler vectorises this; it runs at memory speed.
    page.iter().all(|&b| b == 0)
}

enum BatchError {
    Read(vm_memory::GuestMemoryError),
    Write(std::io::Error),
}

/// Copies `len` bytes of `region` at `offset` into `buf` and writes its non-zero pages to
/// `file` at `file_off + offset`, one `pwrite` per run.
fn write_batch(
    region: &GuestRegionMmap,
    offset: u64,
    buf: &mut [u8],
    file: &File,
    file_off: u64,
    stats: &mut MemoryWriteStats,
) -> Result<(), BatchError> {
    region
        .get_slice(MemoryRegionAddress(offset), buf.len())
        .map_err(BatchError::Read)?
        .copy_to(buf);
    let pages = buf.len() / PAGE;
    let mut i = 0;
    while i < pages {
        if is_zero(&buf[i * PAGE..(i + 1) * PAGE]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < pages && !is_zero(&buf[i * PAGE..(i + 1) * PAGE]) {
            i += 1;
        }
        let run = &buf[start * PAGE..i * PAGE];
        file.write_all_at(run, file_off + offset + (start * PAGE) as u64)
            .map_err(BatchError::Write)?;
        stats.bytes_written += run.len() as u64;
        stats.pages_written += (i - start) as u64;
    }
    Ok(())
}

/// Writes guest RAM to the memory file `path` (layout in the module doc), sparse and
/// crash-safely. The guest must be paused.
pub fn write_memory(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<MemoryWriteStats, MemoryFileError> {
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| MemoryFileError::Io { path, what, source }
    };
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let tmp = tmp_path(path);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("cannot create"))?;
    let result = (|| {
        file.set_len(total).map_err(io("cannot size"))?;
        let probe = PageProbe::new();
        let mut stats = MemoryWriteStats::default();
        let mut buf = vec![0u8; BATCH_BYTES];
        let mut marks = vec![false; WINDOW_PAGES];
        let mut file_off = 0u64;
        for region in mem.iter() {
            let host = region.as_ptr();
            let len = usize::try_from(region.len()).unwrap_or(0);
            let backing = region.file_offset().map(|f| (f.file(), f.start()));
            let pages = len / PAGE;
            let mut w = 0;
            while w < pages {
                let n = WINDOW_PAGES.min(pages - w);
                let window = &mut marks[..n];
                // SAFETY: w < pages, so the window starts inside the region's mapping.
                let whost = unsafe { host.add(w * PAGE) };
                let wfile = backing.map(|(f, s)| (f, s + (w * PAGE) as u64));
                probe.probe(whost, window, wfile);
                let mut i = 0;
                while i < n {
                    if !window[i] {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < n && window[i] && (i - start) * PAGE < BATCH_BYTES {
                        i += 1;
                    }
                    let offset = ((w + start) * PAGE) as u64;
                    let b = &mut buf[..(i - start) * PAGE];
                    stats.pages_scanned += (i - start) as u64;
                    write_batch(region, offset, b, &file, file_off, &mut stats).map_err(
                        |e| match e {
                            BatchError::Write(source) => MemoryFileError::Io {
                                path: path.to_path_buf(),
                                what: "cannot write",
                                source,
                            },
                            BatchError::Read(source) => MemoryFileError::Read {
                                path: path.to_path_buf(),
                                guest_addr: region.start_addr().raw_value() + offset,
                                source,
                            },
                        },
                    )?;
                }
                w += n;
            }
            file_off += region.len();
        }
        file.sync_all().map_err(io("cannot fsync"))?;
        std::fs::rename(&tmp, path).map_err(io("cannot rename into place"))?;
        sync_parent(path).map_err(io("cannot fsync the directory"))?;
        Ok(stats)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Maps the memory file `path` as guest RAM laid out as `layout`: each region a
/// `MAP_PRIVATE` (copy-on-write, lazily loaded) mapping of its part of the file. The file
/// must be exactly the RAM size.
pub fn map_memory(
    path: &Path,
    layout: &[MemoryRegionLayout],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let total = layout.iter().fold(0u64, |a, r| a.saturating_add(r.size));
    validate_regions(layout, total).map_err(|problem| MemoryFileError::Layout {
        path: path.to_path_buf(),
        problem,
    })?;
    let file = File::open(path).map_err(|source| MemoryFileError::Io {
        path: path.to_path_buf(),
        what: "cannot open",
        source,
    })?;
    let actual = file
        .metadata()
        .map_err(|source| MemoryFileError::Io {
            path: path.to_path_buf(),
            what: "cannot stat",
            source,
        })?
        .len();
    if actual != total {
        return Err(MemoryFileError::Size {
            path: path.to_path_buf(),
            actual,
            expected: total,
        });
    }
    let map_err = |guest_addr: u64, problem: String| MemoryFileError::Map {
        path: path.to_path_buf(),
        guest_addr,
        problem,
    };
    let mut regions = Vec::with_capacity(layout.len());
    let mut offset = 0u64;
    for r in layout {
        let size =
            usize::try_from(r.size).map_err(|_| map_err(r.guest_addr, "too large".into()))?;
        let f = file.try_clone().map_err(|source| MemoryFileError::Io {
            path: path.to_path_buf(),
            what: "cannot dup",
            source,
        })?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(f, offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(r.guest_addr, e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| map_err(r.guest_addr, "overflows the address space".into()))?;
        regions.push(region);
        offset += r.size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(0, e.to_string()))
}

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
