//! Puts a kernel into guest memory and prepares what its entry point expects: the initrd,
//! the command line, the memory map and either the PVH start_info or the Linux zero page.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::arch::layout::{
    e820_ram, CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIGH_RAM_START, MMIO_GAP_START, PVH_INFO_ADDR,
    PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};
use crate::arch::regs::EntryMode;

/// Errors loading the kernel and its boot data. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a kernel: not an x86_64 ELF vmlinux ({elf:?}) nor a bzImage ({bz:?})")]
    NotAKernel {
        /// The file.
        path: PathBuf,
        /// What the ELF loader said.
        elf: loader::Error,
        /// What the bzImage loader said.
        bz: loader::Error,
    },
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}")]
    Initrd {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit in guest RAM next to the kernel.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory after the kernel")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; the limit is {max} (including devices' entries)")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line has characters the kernel cannot take.
    #[error("kernel command line is invalid: {0}")]
    CmdlineInvalid(String),
    /// Writing a boot structure into guest memory failed.
    #[error("writing {0} into guest memory")]
    Write(&'static str),
}

/// Where and how the boot CPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// Entry state.
    pub mode: EntryMode,
    /// Entry point.
    pub entry: u64,
    /// Address of start_info (PVH) or the zero page (Linux boot protocol).
    pub boot_info: u64,
}

/// Builds a command line, checking the kernel's size limit.
pub fn make_cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut c =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::CmdlineInvalid(e.to_string()))?;
    if !text.trim().is_empty() {
        c.insert_str(text.trim()).map_err(|e| match e {
            linux_loader::cmdline::Error::TooLarge => BootError::CmdlineTooLong {
                len: text.trim().len(),
                max: CMDLINE_MAX_SIZE - 1,
            },
            other => BootError::CmdlineInvalid(other.to_string()),
        })?;
    }
    Ok(c)
}

/// Appends to a command line, with the same size check.
pub fn append_cmdline(c: &mut Cmdline, more: &str) -> Result<(), BootError> {
    let current = c.as_cstring().map(|s| s.as_bytes().len()).unwrap_or(0);
    c.insert_str(more).map_err(|e| match e {
        linux_loader::cmdline::Error::TooLarge => BootError::CmdlineTooLong {
            len: current + 1 + more.len(),
            max: CMDLINE_MAX_SIZE - 1,
        },
        other => BootError::CmdlineInvalid(other.to_string()),
    })
}

struct Loaded {
    result: loader::KernelLoaderResult,
    is_elf: bool,
}

fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Loaded, BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::OpenKernel {
            path: path.into(),
            source,
        })
    };
    let mut f = open()?;
    let elf = match Elf::load(mem, None, &mut f, Some(GuestAddress(HIGH_RAM_START))) {
        Ok(result) => {
            return Ok(Loaded {
                result,
                is_elf: true,
            })
        }
        Err(e) => e,
    };
    f.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::OpenKernel {
            path: path.into(),
            source,
        })?;
    match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIGH_RAM_START))) {
        Ok(result) => Ok(Loaded {
            result,
            is_elf: false,
        }),
        Err(bz) => Err(BootError::NotAKernel {
            path: path.into(),
            elf,
            bz,
        }),
    }
}

/// Copies the initrd to the top of low RAM (below the MMIO hole and `max_addr`), page
/// aligned, and returns `(address, size)`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    max_addr: u64,
) -> Result<(u64, u64), BootError> {
    let err = |source| BootError::Initrd {
        path: path.into(),
        source,
    };
    let mut f = File::open(path).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    let ram_top = mem
        .last_addr()
        .raw_value()
        .min(MMIO_GAP_START - 1)
        .min(max_addr);
    let too_large = || BootError::InitrdTooLarge {
        path: path.into(),
        size,
    };
    let addr = (ram_top + 1).checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end || size == 0 && addr == 0 {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    let mut slice = mem
        .get_slice(GuestAddress(addr), len)
        .map_err(|_| too_large())?;
    f.read_exact_volatile(&mut slice)
        .map_err(|e| err(std::io::Error::other(format!("{e}"))))?;
    Ok((addr, size))
}

/// The kernel and initrd as loaded into guest memory, before the boot data is written.
pub struct Images {
    kernel: Loaded,
    /// `(address, size)` of the initrd.
    initrd: Option<(u64, u64)>,
}

/// Loads `kernel` (ELF vmlinux or bzImage) and the optional initrd into guest memory. This
/// is the costly part of loading (copying megabytes into fresh memory), and it needs
/// neither the KVM VM nor the final command line, so it can run while the VM is being
/// created; [`write_boot_data`] finishes the job.
pub fn load_images(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
) -> Result<Images, BootError> {
    let loaded = load_kernel(mem, kernel)?;
    let initrd_max = match loaded.result.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => u64::from(u32::MAX),
    };
    let initrd = match initrd {
        Some(p) => Some(load_initrd(mem, p, loaded.result.kernel_end, initrd_max)?),
        None => None,
    };
    Ok(Images {
        kernel: loaded,
        initrd,
    })
}

/// Loads `kernel`, the optional initrd and the command line in one go: [`load_images`],
/// then [`write_boot_data`].
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<BootEntry, BootError> {
    let images = load_images(mem, kernel, initrd)?;
    write_boot_data(mem, mem_size, &images, cmdline)
}

/// Writes the command line and the boot data for the entry the loaded kernel supports:
/// PVH when the ELF has the PVH note, the 64-bit Linux boot protocol otherwise.
pub fn write_boot_data(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    images: &Images,
    cmdline: &Cmdline,
) -> Result<BootEntry, BootError> {
    let loaded = &images.kernel;
    let initrd = images.initrd;
    let header = loaded.result.setup_header;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(|_| BootError::Write("the command line"))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .map_err(|e| BootError::CmdlineInvalid(e.to_string()))?;
    let ram = e820_ram(mem_size);

    if let (true, PvhBootCapability::PvhEntryPresent(entry)) =
        (loaded.is_elf, loaded.result.pvh_boot_cap)
    {
        write_pvh_info(mem, &ram, initrd)?;
        return Ok(BootEntry {
            mode: EntryMode::Pvh,
            entry: entry.raw_value(),
            boot_info: PVH_INFO_ADDR,
        });
    }

    let mut params = boot_params::default();
    match header {
        Some(h) => params.hdr = h,
        None => {
            // ELF without PVH: a minimal header that says "this is a boot protocol loader".
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.kernel_alignment = 0x0100_0000;
        }
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(u32::MAX);
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image =
            u32::try_from(addr).map_err(|_| BootError::Write("the initrd address"))?;
        params.hdr.ramdisk_size =
            u32::try_from(size).map_err(|_| BootError::Write("the initrd size"))?;
    }
    for (i, &(addr, size)) in ram.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: 1, // E820_RAM
        };
    }
    params.e820_entries = u8::try_from(ram.len()).unwrap_or(0);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|_| BootError::Write("the zero page"))?;
    let entry = if loaded.is_elf {
        loaded.result.kernel_load.raw_value()
    } else {
        // 64-bit entry of a bzImage: startup_64, 0x200 past the protected-mode code start.
        loaded.result.kernel_load.raw_value() + 0x200
    };
    Ok(BootEntry {
        mode: EntryMode::Long,
        entry,
        boot_info: ZERO_PAGE_ADDR,
    })
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(ram.len()).unwrap_or(0),
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(|_| BootError::Write("the PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    for (i, &(addr, size)) in ram.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_: 1, // RAM
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at))
            .map_err(|_| BootError::Write("the PVH memory map"))?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(|_| BootError::Write("the PVH start_info"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_limits() {
        assert!(make_cmdline("console=ttyS0").is_ok());
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            make_cmdline(&long),
            Err(BootError::CmdlineTooLong { .. })
        ));
        let mut c = make_cmdline(&"b".repeat(CMDLINE_MAX_SIZE - 10)).unwrap();
        assert!(matches!(
            append_cmdline(&mut c, "virtio_mmio.device=4K@0xd0000000:5"),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn non_kernel_file_is_refused_with_its_name() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("not-a-kernel");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let c = make_cmdline("").unwrap();
        let err = load(&mem, 64 << 20, &junk, None, &c).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }));
        assert!(err.to_string().contains("not-a-kernel"), "{err}");
        let err = load(&mem, 64 << 20, &dir.join("missing"), None, &c).unwrap_err();
        assert!(matches!(err, BootError::OpenKernel { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
