//! Memory file tests: sparse writing, contents, copy-on-write mapping, size checks, and a
//! snapshot of a restored (file-backed) memory.

use std::os::unix::fs::MetadataExt;

use vm_memory::Bytes;
use vmm_sys_util::tempdir::TempDir;

use super::*;

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;

fn anon(ranges: &[(u64, u64)]) -> GuestMemoryMmap {
    let r: Vec<(GuestAddress, usize)> = ranges
        .iter()
        .map(|&(a, s)| (GuestAddress(a), usize::try_from(s).unwrap()))
        .collect();
    GuestMemoryMmap::from_ranges(&r).unwrap()
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE]
}

/// Bytes the file really occupies on disk.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn only_touched_non_zero_pages_are_written() {
    let mem = anon(&[(0, 64 * MIB)]);
    // Three lone pages, and a 3 MiB run that crosses a batch boundary.
    for (i, addr) in [0u64, 0x12_3000, 63 * MIB].iter().enumerate() {
        mem.write_slice(&page(u8::try_from(i + 1).unwrap()), GuestAddress(*addr))
            .unwrap();
    }
    let run: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8 | 1).collect();
    mem.write_slice(&run, GuestAddress(10 * MIB)).unwrap();
    // Touched but zero: written, then cleared. And a page only read.
    mem.write_slice(&page(9), GuestAddress(20 * MIB)).unwrap();
    mem.write_slice(&page(0), GuestAddress(20 * MIB)).unwrap();
    let _: u64 = mem.read_obj(GuestAddress(30 * MIB)).unwrap();

    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("mem");
    let stats = write_memory(&mem, &path).unwrap();
    let touched_pages = 3 + 3 * MIB / PAGE_SIZE;
    assert_eq!(stats.pages_written, touched_pages);
    assert_eq!(stats.bytes_written, touched_pages * PAGE_SIZE);
    assert!(
        stats.pages_scanned < 64 * MIB / PAGE_SIZE / 4,
        "mincore skipped untouched pages: scanned {}",
        stats.pages_scanned
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * MIB);
    let on_disk = allocated(&path);
    assert!(
        on_disk >= stats.bytes_written && on_disk < stats.bytes_written + MIB,
        "{on_disk} bytes allocated for {} written",
        stats.bytes_written
    );
    assert!(!tmp_path(&path).exists());

    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[..PAGE], &page(1)[..]);
    assert_eq!(&file[0x12_3000..0x12_3000 + PAGE], &page(2)[..]);
    assert_eq!(&file[63 * MIB_USIZE..63 * MIB_USIZE + PAGE], &page(3)[..]);
    assert_eq!(&file[10 * MIB_USIZE..13 * MIB_USIZE], &run[..]);
    assert!(file[PAGE..0x12_3000].iter().all(|&b| b == 0));
}

#[test]
fn mapped_back_it_reads_the_same_and_writes_stay_private() {
    let mem = anon(&[(0, 8 * MIB), (0x1_0000_0000, 4 * MIB)]);
    mem.write_slice(b"low", GuestAddress(0x5000)).unwrap();
    mem.write_slice(b"high", GuestAddress(0x1_0000_2000))
        .unwrap();
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("mem");
    write_memory(&mem, &path).unwrap();
    let layout = layout_of(&mem);
    assert_eq!(
        layout,
        [
            MemoryRegionLayout {
                guest_addr: 0,
                size: 8 * MIB
            },
            MemoryRegionLayout {
                guest_addr: 0x1_0000_0000,
                size: 4 * MIB
            }
        ]
    );
    // The second region follows the first in the file.
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[8 * MIB_USIZE + 0x2000..][..4], b"high");

    let restored = map_memory(&path, &layout).unwrap();
    let mut b = [0u8; 4];
    restored
        .read_slice(&mut b, GuestAddress(0x1_0000_2000))
        .unwrap();
    assert_eq!(&b, b"high");
    let mut b = [0u8; 3];
    restored.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
    assert_eq!(&b, b"low");
    assert_eq!(restored.read_obj::<u64>(GuestAddress(0x7000)).unwrap(), 0);

    restored.write_slice(b"LOW", GuestAddress(0x5000)).unwrap();
    restored.write_obj(7u64, GuestAddress(0x9000)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), file, "the file is unchanged");
    let mut b = [0u8; 3];
    restored.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
    assert_eq!(&b, b"LOW");

    // A second VM from the same file sees the file, not the first VM's writes.
    let other = map_memory(&path, &layout).unwrap();
    let mut b = [0u8; 3];
    other.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
    assert_eq!(&b, b"low");
}

#[test]
fn snapshot_of_a_restored_memory_keeps_untouched_file_pages() {
    let mem = anon(&[(0, 16 * MIB)]);
    mem.write_slice(&page(0x11), GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&page(0x22), GuestAddress(0x80_0000))
        .unwrap();
    let dir = TempDir::new().unwrap();
    let first = dir.as_path().join("mem1");
    write_memory(&mem, &first).unwrap();
    // Drop the file from the page cache (on a disk file system), so its pages are not
    // resident: only the file's data extents say they hold data.
    let f = File::open(&first).unwrap();
    // SAFETY: fadvise on a file we own; no memory is passed.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let restored = map_memory(&first, &layout_of(&mem)).unwrap();
    restored
        .write_slice(&page(0x33), GuestAddress(0x20_0000))
        .unwrap();
    let second = dir.as_path().join("mem2");
    let stats = write_memory(&restored, &second).unwrap();
    assert_eq!(stats.pages_written, 3);
    let f = std::fs::read(&second).unwrap();
    assert_eq!(&f[0x10_0000..0x10_1000], &page(0x11)[..]);
    assert_eq!(&f[0x80_0000..0x80_1000], &page(0x22)[..]);
    assert_eq!(&f[0x20_0000..0x20_1000], &page(0x33)[..]);
}

#[test]
fn a_file_of_the_wrong_size_or_a_bad_layout_is_refused() {
    let mem = anon(&[(0, 4 * MIB)]);
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("mem");
    write_memory(&mem, &path).unwrap();
    let big = [MemoryRegionLayout {
        guest_addr: 0,
        size: 8 * MIB,
    }];
    let e = map_memory(&path, &big).unwrap_err();
    assert!(
        matches!(e, MemoryFileError::Size { actual, expected, .. } if actual == 4 * MIB && expected == 8 * MIB)
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("4194304"),
        "{msg}"
    );

    let unaligned = [MemoryRegionLayout {
        guest_addr: 0,
        size: 4 * MIB - 1,
    }];
    assert!(matches!(
        map_memory(&path, &unaligned),
        Err(MemoryFileError::Layout { .. })
    ));
    let overlapping = [
        MemoryRegionLayout {
            guest_addr: 0,
            size: 2 * MIB,
        },
        MemoryRegionLayout {
            guest_addr: MIB,
            size: 2 * MIB,
        },
    ];
    assert!(matches!(
        map_memory(&path, &overlapping),
        Err(MemoryFileError::Layout { .. })
    ));
    assert!(matches!(
        map_memory(&dir.as_path().join("missing"), &layout_of(&mem)),
        Err(MemoryFileError::Io { .. })
    ));
}
