//! Anonymous guest RAM, placed so that KVM can back the guest with 2 MiB pages.
//!
//! KVM maps guest memory with a 2 MiB second-level (NPT/EPT) entry only where the host
//! backs it with a huge page *and* the host address agrees with the guest address modulo
//! 2 MiB. Guest RAM regions start at 2 MiB multiples, so the host mapping must start at a
//! 2 MiB boundary too; `mmap(NULL, ...)` promises only 4 KiB (kernels before 6.7 do not
//! align large anonymous mappings). With 4 KiB entries a booting guest takes one
//! second-level fault per page it touches and many more TLB misses, each an expensive exit
//! on a nested host: in the KVM test host the guest kernel reached `/init` in about 0.45 s
//! aligned against about 0.7 s unaligned.
//!
//! vm-memory's owning regions are always mapped where the kernel chooses, so the mapping is
//! made here and handed to vm-memory as a borrowed pointer: it is not unmapped when the
//! last region handle drops. Guest RAM lives as long as the VMM process, which runs one VM;
//! after a failed start, [`release`] gives the pages back (the addresses stay reserved, so
//! a stale access reads zeros instead of faulting).

use std::io;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

/// The huge page size, and the alignment of the mappings made here.
pub const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes (a multiple of 4 KiB) of private anonymous read-write memory at a
/// 2 MiB-aligned address, `MAP_NORESERVE` like the rest of guest RAM. With `thp`, advises
/// transparent huge pages (`MADV_HUGEPAGE`), which hosts whose THP mode is `madvise` need
/// before they use huge pages at all; a host that refuses the advice only costs speed.
pub fn map_aligned(len: usize, thp: bool) -> io::Result<MmapRegion> {
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty RAM region",
        ));
    }
    let total = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "RAM region too large"))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing else is
    // affected.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), total, prot, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let head = start - base;
    let tail = total - head - len;
    // The slack on either side stays reserved, inaccessible, rather than unmapped: a hole
    // ending at a 2 MiB boundary is where the kernel puts the next small mapping, such as a
    // thread's 2 MiB stack, which would then be aligned and, on a host whose THP mode is
    // "always", take a whole huge page of memory.
    // SAFETY: both ranges lie inside the mapping just made, outside `start..start + len`,
    // and nothing refers to them.
    unsafe {
        if head > 0 {
            libc::mprotect(base as *mut libc::c_void, head, libc::PROT_NONE);
        }
        if tail > 0 {
            libc::mprotect((start + len) as *mut libc::c_void, tail, libc::PROT_NONE);
        }
    }
    if thp {
        // SAFETY: advice on the mapping made above; it does not change its contents.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(
                "madvise(MADV_HUGEPAGE) on guest RAM: {}; using 4 KiB pages",
                io::Error::last_os_error()
            );
        }
    }
    // SAFETY: `start..start + len` is a live read-write mapping that stays mapped for the
    // rest of the process (nothing here or in vm-memory unmaps a borrowed pointer).
    unsafe {
        MmapRegionBuilder::new(len)
            .with_raw_mmap_pointer(start as *mut u8)
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .build()
    }
    .map_err(|e| io::Error::other(e.to_string()))
}

/// Gives back the pages of every region of `mem` (`MADV_DONTNEED`): for RAM of a VM that
/// failed to start, whose mapping stays for the life of the process. Reads afterwards see
/// zeros.
pub fn release(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let len = usize::try_from(region.len()).unwrap_or(0);
        // SAFETY: the region's own mapping; DONTNEED on private anonymous memory only drops
        // its pages, and every later access maps a fresh zero page.
        unsafe {
            libc::madvise(region.as_ptr().cast(), len, libc::MADV_DONTNEED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestRegionMmap};

    #[test]
    fn mappings_are_aligned_writable_and_released() {
        for (len, thp) in [
            (4096, true),
            (3 * HUGE_PAGE + 8192, true),
            (HUGE_PAGE, false),
        ] {
            let r = map_aligned(len, thp).unwrap();
            assert_eq!(r.as_ptr() as usize % HUGE_PAGE, 0, "len {len}");
            assert_eq!(r.size(), len);
            let region = GuestRegionMmap::new(r, GuestAddress(0)).unwrap();
            let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
            let last = GuestAddress(len as u64 - 8);
            mem.write_obj(0x1234_5678_9abc_def0u64, last).unwrap();
            assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x1234_5678_9abc_def0);
            release(&mem);
            assert_eq!(
                mem.read_obj::<u64>(last).unwrap(),
                0,
                "released pages read 0"
            );
        }
    }

    #[test]
    fn empty_and_huge_lengths_are_refused() {
        assert!(map_aligned(0, true).is_err());
        assert!(map_aligned(usize::MAX - 4095, true).is_err());
    }
}
