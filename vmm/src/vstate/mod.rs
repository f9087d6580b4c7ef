//! KVM state: the VM and its vCPUs.

pub mod ram;
pub mod vcpu;
pub mod vcpu_state;
pub mod vcpu_thread;
pub mod vm;
pub mod vm_state;
