//! The ioctl request numbers the policies allow, built with the kernel's `_IOC` encoding
//! (include/uapi/asm-generic/ioctl.h: direction in bits 30-31, argument size in 16-29,
//! type in 8-15, number in 0-7) from the KVM and TUN headers' definitions
//! (include/uapi/linux/kvm.h, if_tun.h). The struct sizes are those of the x86_64 uapi
//! structs; the crate's tests check them against kvm-bindings and a few results against
//! libc and known values.

const NONE: u32 = 0;
const WRITE: u32 = 1;
const READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}

/// KVM's ioctl type.
const KVMIO: u32 = 0xAE;

// Sizes of the uapi structs the requests carry (x86_64).
pub(crate) const SIZE_KVM_REGS: u32 = 144;
pub(crate) const SIZE_KVM_SREGS: u32 = 312;
pub(crate) const SIZE_KVM_FPU: u32 = 416;
pub(crate) const SIZE_KVM_MSRS: u32 = 8;
pub(crate) const SIZE_KVM_CPUID2: u32 = 8;
pub(crate) const SIZE_KVM_LAPIC_STATE: u32 = 1024;
pub(crate) const SIZE_KVM_MP_STATE: u32 = 4;
pub(crate) const SIZE_KVM_VCPU_EVENTS: u32 = 64;
pub(crate) const SIZE_KVM_DEBUGREGS: u32 = 128;
pub(crate) const SIZE_KVM_XSAVE: u32 = 4096;
pub(crate) const SIZE_KVM_XCRS: u32 = 392;
pub(crate) const SIZE_KVM_CLOCK_DATA: u32 = 48;
pub(crate) const SIZE_KVM_IRQCHIP: u32 = 520;
pub(crate) const SIZE_KVM_PIT_STATE2: u32 = 112;

// vCPU fd.
pub(crate) const KVM_RUN: u32 = ioc(NONE, KVMIO, 0x80, 0);
pub(crate) const KVM_GET_REGS: u32 = ioc(READ, KVMIO, 0x81, SIZE_KVM_REGS);
pub(crate) const KVM_GET_SREGS: u32 = ioc(READ, KVMIO, 0x83, SIZE_KVM_SREGS);
pub(crate) const KVM_GET_MSRS: u32 = ioc(READ | WRITE, KVMIO, 0x88, SIZE_KVM_MSRS);
pub(crate) const KVM_GET_FPU: u32 = ioc(READ, KVMIO, 0x8c, SIZE_KVM_FPU);
pub(crate) const KVM_GET_LAPIC: u32 = ioc(READ, KVMIO, 0x8e, SIZE_KVM_LAPIC_STATE);
pub(crate) const KVM_GET_CPUID2: u32 = ioc(READ | WRITE, KVMIO, 0x91, SIZE_KVM_CPUID2);
pub(crate) const KVM_GET_MP_STATE: u32 = ioc(READ, KVMIO, 0x98, SIZE_KVM_MP_STATE);
pub(crate) const KVM_GET_VCPU_EVENTS: u32 = ioc(READ, KVMIO, 0x9f, SIZE_KVM_VCPU_EVENTS);
pub(crate) const KVM_GET_DEBUGREGS: u32 = ioc(READ, KVMIO, 0xa1, SIZE_KVM_DEBUGREGS);
pub(crate) const KVM_GET_TSC_KHZ: u32 = ioc(NONE, KVMIO, 0xa3, 0);
pub(crate) const KVM_GET_XSAVE: u32 = ioc(READ, KVMIO, 0xa4, SIZE_KVM_XSAVE);
pub(crate) const KVM_GET_XCRS: u32 = ioc(READ, KVMIO, 0xa6, SIZE_KVM_XCRS);

// VM fd.
pub(crate) const KVM_GET_IRQCHIP: u32 = ioc(READ | WRITE, KVMIO, 0x62, SIZE_KVM_IRQCHIP);
pub(crate) const KVM_SET_CLOCK: u32 = ioc(WRITE, KVMIO, 0x7b, SIZE_KVM_CLOCK_DATA);
pub(crate) const KVM_GET_CLOCK: u32 = ioc(READ, KVMIO, 0x7c, SIZE_KVM_CLOCK_DATA);
pub(crate) const KVM_GET_PIT2: u32 = ioc(READ, KVMIO, 0x9f, SIZE_KVM_PIT_STATE2);

/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
pub(crate) const TUNSETOFFLOAD: u32 = ioc(WRITE, b'T' as u32, 208, 4);
/// `FIONBIO` (asm-generic/ioctls.h): std's `set_nonblocking` on sockets.
pub(crate) const FIONBIO: u32 = 0x5421;
