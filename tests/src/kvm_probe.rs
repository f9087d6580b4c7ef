//! Finds out whether this machine's /dev/kvm can boot Linux.
//!
//! kvm-pvm (this project's development machines) answers the KVM API but cannot run a stock
//! kernel (../shared/TEST-HOST.md), so "a VM runs" is not enough: the backing module must be
//! a hardware one (kvm_amd or kvm_intel) and no kvm_pvm may be loaded.

use kvm_ioctls::{Kvm, VcpuExit};

/// What kind of KVM this machine has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// kvm_amd or kvm_intel: boots Linux.
    Hardware(&'static str),
    /// kvm_pvm: runs tiny hand-made guests only.
    Pvm,
    /// No usable /dev/kvm; the reason.
    Absent(String),
}

/// Names the KVM backend by the kernel modules present.
pub fn kvm_kind() -> KvmKind {
    let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    if !std::path::Path::new("/dev/kvm").exists() {
        return KvmKind::Absent("/dev/kvm does not exist".into());
    }
    if module("kvm_pvm") {
        return KvmKind::Pvm;
    }
    for m in ["kvm_amd", "kvm_intel"] {
        if module(m) {
            return KvmKind::Hardware(m);
        }
    }
    KvmKind::Absent("/dev/kvm exists but neither kvm_amd nor kvm_intel is loaded".into())
}

/// Creates a VM with one page of memory, runs a real-mode guest that writes 0x42 to port
/// 0x3f8 and halts, and checks both exits reach user space. Returns the exits seen.
pub fn run_tiny_guest() -> Result<Vec<String>, String> {
    // mov dx, 0x3f8; mov al, 0x42; out dx, al; hlt
    const CODE: [u8; 6] = [0xba, 0xf8, 0x03, 0xb0, 0x42, 0xee];
    const HLT: u8 = 0xf4;
    const GUEST_ADDR: u64 = 0x1000;
    const SIZE: usize = 0x1000;

    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    // SAFETY: anonymous private mapping of SIZE bytes; checked for MAP_FAILED below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let host = mem.cast::<u8>();
    // SAFETY: the mapping is SIZE bytes long and writable; CODE plus one byte fits.
    unsafe {
        std::ptr::copy_nonoverlapping(CODE.as_ptr(), host, CODE.len());
        *host.add(CODE.len()) = HLT;
    }
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: GUEST_ADDR,
        memory_size: SIZE as u64,
        userspace_addr: host as u64,
    };
    let result = (|| {
        // SAFETY: the region points at our live mapping, which is unmapped only after the
        // VM (and so the memory slot) is dropped at the end of this closure.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        let mut vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: GUEST_ADDR,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        let mut exits = Vec::new();
        for _ in 0..16 {
            match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
                VcpuExit::IoOut(port, data) => {
                    exits.push(format!("io-out port={port:#x} data={data:x?}"));
                }
                VcpuExit::Hlt => {
                    exits.push("hlt".into());
                    return Ok(exits);
                }
                other => return Err(format!("unexpected exit {other:?} after {exits:?}")),
            }
        }
        Err(format!("no HLT after 16 exits: {exits:?}"))
    })();
    // SAFETY: unmapping the mapping created above; the VM using it has been dropped.
    unsafe { libc::munmap(mem, SIZE) };
    result
}

/// `Ok(description)` when this machine's KVM can boot Linux, else why not.
pub fn genuine_kvm() -> Result<String, String> {
    match kvm_kind() {
        KvmKind::Hardware(m) => {
            let exits = run_tiny_guest()?;
            Ok(format!("{m}: tiny guest exits {exits:?}"))
        }
        KvmKind::Pvm => Err("/dev/kvm is kvm-pvm, which cannot boot a stock Linux kernel".into()),
        KvmKind::Absent(why) => Err(why),
    }
}
