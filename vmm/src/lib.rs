//! The VMM: KVM VM, vCPUs, guest memory, kernel loading, legacy devices and the control
//! loop. Devices live in the `devices` crate; this crate wires them to KVM.

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod device_manager;
pub mod runtime;
pub mod snapshot;
pub mod vstate;
