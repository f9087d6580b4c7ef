//! Device models for the VMM.
//!
//! Legacy devices (8250 serial, i8042 reset, the guest status port) and virtio-mmio devices
//! (block, rng, net, vsock), one folder per device. This crate depends on rust-vmm crates
//! only, never on `vmm`: a device gets what it needs (guest memory, interrupt, bus) through
//! its constructor.

pub mod bus;
pub mod legacy;
pub mod virtio;
