//! The VMM: KVM VM, vCPUs, guest memory, kernel loading, device manager, event loop, API and
//! snapshots. Filled in by the "vmm boots Linux" issue and those after it.
