//! The vCPU threads' policy, on top of `common`. A vCPU thread runs KVM_RUN and handles
//! the exits in place: port I/O to the UART, i8042 and status port (console writes,
//! eventfd writes), MMIO to the virtio transports (register reads and writes, eventfd
//! writes on activation). While paused it blocks on its channel, and it runs the
//! closures the main thread sends it to save its registers for a snapshot. It opens
//! nothing, creates no socket and starts no thread.

use super::ioctls::*;
use super::{one_of, Policy};

pub(super) fn add(p: &mut Policy) {
    // KVM_RUN enters the guest. The KVM_GET_* requests save the vCPU's state for a
    // snapshot (vstate::vcpu_state::save_vcpu, run on this thread through
    // VcpuSet::on_each while paused). Restoring state (KVM_SET_*) happens on the main
    // thread before the vCPU threads exist, so no KVM_SET_* is allowed here.
    p.allow_if(
        libc::SYS_ioctl,
        one_of(
            1,
            &[
                KVM_RUN,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                KVM_GET_FPU,
                KVM_GET_XSAVE,
                KVM_GET_XCRS,
                KVM_GET_DEBUGREGS,
                KVM_GET_LAPIC,
                KVM_GET_MSRS,
                KVM_GET_CPUID2,
                KVM_GET_TSC_KHZ,
                KVM_GET_MP_STATE,
                KVM_GET_VCPU_EVENTS,
            ],
        ),
    );
    // No read: the devices a vCPU drives only write (console output, irqfds, the
    // activation and reset eventfds); reading their fds is the event loop's job.
    //
    // std's HashMap seeds its hasher from the kernel the first time a thread makes one.
    p.allow(libc::SYS_getrandom);
}
