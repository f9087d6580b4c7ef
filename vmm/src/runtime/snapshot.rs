//! Snapshot create and load on the running [`Vmm`], on the control loop's thread.
//!
//! Create (`PUT /snapshot/create`) needs a paused VM (409 otherwise): the vCPUs are parked
//! and, the loop being here, no device handler runs, so the state read is consistent. It
//! writes the memory file then the vmstate file (`crate::snapshot::create`), logs the sizes
//! and the time taken on stderr, and leaves the VM paused, as Firecracker does.
//!
//! Load (`PUT /snapshot/load`, or `vmm --restore`) needs a VMM that has not started a VM
//! (409 otherwise). Everything that can be refused without KVM is refused first
//! (`crate::snapshot::restore::load`); then `super::restore` builds the VM, its vCPU
//! threads start parked, and the VM is *Paused* until resumed (`resume_vm`, `--resume`, or
//! `PATCH /vm`). The configuration set before the load is replaced by the snapshot's, but
//! for the console and the boot timer flag. The kvmclock saved in the snapshot is the one
//! written back at resume, so neither the time the snapshot sat on disk nor the time the
//! restored VM waited paused shows in the guest's clock.

use std::path::Path;
use std::time::{Duration, Instant};

use event_manager::SubscriberOps;
use kvm_ioctls::Kvm;

use super::actions::{chain, PAUSE_TIMEOUT};
use super::build::BootZero;
use super::{restore, Instance, VmState, Vmm, VmmError};
use crate::api::{ApiError, SnapshotCreateParams, SnapshotLoadParams, VmmData};
use crate::device_manager::DeviceManagerError;
use crate::snapshot::create::{capture, write, SnapshotError, SnapshotSource, SnapshotWritten};
use crate::snapshot::memory::MemoryFileError;
use crate::snapshot::restore::{load, restored_config};
use crate::vstate::vcpu_state::{msrs_to_save, VcpuStateError};
use crate::vstate::vcpu_thread::VcpuSet;

/// `n` bytes for a log line: KiB below 10 MiB, MiB above.
fn size(n: u64) -> String {
    if n < 10 << 20 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    }
}

/// Takes a snapshot of `instance`, which must be paused.
fn take_snapshot(
    instance: &mut Instance,
    vmstate: &Path,
    mem: &Path,
) -> Result<SnapshotWritten, SnapshotError> {
    if instance.msr_list.is_none() {
        let kvm = Kvm::new()
            .map_err(|e| SnapshotError::MsrList(VcpuStateError::Ioctl("opening /dev/kvm", e)))?;
        instance.msr_list = Some(msrs_to_save(&kvm).map_err(SnapshotError::MsrList)?);
    }
    let g = &instance.guest;
    let src = SnapshotSource {
        vm: &g.vm,
        mem: &g.mem,
        io: &g.io,
        msr_list: instance.msr_list.as_deref().unwrap_or_default(),
        devices: &g.devices,
        serial: Some(&g.serial),
        i8042: Some(&g.i8042),
        paused_clock: instance.saved_clock,
    };
    let state = capture(&src, &mut instance.vcpus)?;
    write(&state, &g.mem, vmstate, mem)
}

/// A failed create: the client's paths (400) or the VMM (500).
fn create_error(e: &SnapshotError) -> ApiError {
    let message = format!("CreateSnapshot: {}", chain(e));
    match e {
        SnapshotError::Memory(MemoryFileError::Io { .. }) | SnapshotError::VmState(_) => {
            ApiError::bad_request(message)
        }
        _ => ApiError::internal(message),
    }
}

/// A failed load: the client's files, paths or overrides (400) or the host (500).
fn load_error(e: &VmmError) -> ApiError {
    let client = match e {
        VmmError::Restore(r) => r.is_client_error(),
        VmmError::Console { .. } => true,
        VmmError::Device(d) => matches!(
            d,
            DeviceManagerError::Slot { .. } | DeviceManagerError::TransportState { .. }
        ),
        _ => false,
    };
    let message = format!("LoadSnapshot: {}", chain(e));
    if client {
        ApiError::bad_request(message)
    } else {
        ApiError::internal(message)
    }
}

impl Vmm {
    /// `PUT /snapshot/create`.
    pub(super) fn create_snapshot(
        &mut self,
        p: &SnapshotCreateParams,
    ) -> Result<VmmData, ApiError> {
        let instance = match (self.state, self.instance.as_mut()) {
            (VmState::Paused, Some(instance)) => instance,
            (VmState::Running, _) => {
                return Err(ApiError::conflict(
                    "CreateSnapshot needs a paused VM and this one is running: pause it first \
                     (PATCH /vm {\"state\": \"Paused\"})",
                ))
            }
            _ => {
                return Err(ApiError::conflict(
                    "CreateSnapshot is not possible: the VM is not started",
                ))
            }
        };
        if p.snapshot_path == p.mem_file_path {
            return Err(ApiError::bad_request(format!(
                "CreateSnapshot: snapshot_path and mem_file_path are the same file {}",
                p.snapshot_path.display()
            )));
        }
        let t = Instant::now();
        let w = take_snapshot(instance, &p.snapshot_path, &p.mem_file_path)
            .map_err(|e| create_error(&e))?;
        eprintln!(
            "vmm: snapshot: memory file {} ({} guest RAM, {} of data in {} pages), \
             vmstate file {} ({} bytes), taken in {:.1} ms (files written in {:.1} ms)",
            w.mem_path.display(),
            size(w.mem_size),
            size(w.mem.bytes_written),
            w.mem.pages_written,
            w.vmstate_path.display(),
            w.vmstate_bytes,
            t.elapsed().as_secs_f64() * 1000.0,
            w.elapsed.as_secs_f64() * 1000.0
        );
        Ok(VmmData::Empty)
    }

    /// `PUT /snapshot/load`.
    pub(super) fn load_snapshot(&mut self, p: &SnapshotLoadParams) -> Result<VmmData, ApiError> {
        if self.state != VmState::NotStarted {
            return Err(ApiError::conflict(
                "LoadSnapshot is only possible in a VMM that has not started or loaded a VM; \
                 this one has (start a new VMM to load the snapshot)",
            ));
        }
        self.restore_snapshot(p).map_err(|e| load_error(&e))?;
        Ok(VmmData::Empty)
    }

    /// Restores the snapshot `p` names into this VMM, which must not have started a VM.
    /// The VM is then paused, or running if `p.resume_vm`. On an error before the vCPUs
    /// exist nothing is left behind and the VMM stays not started.
    pub fn restore_snapshot(&mut self, p: &SnapshotLoadParams) -> Result<(), VmmError> {
        if self.state != VmState::NotStarted {
            return Err(VmmError::AlreadyStarted);
        }
        let t = Instant::now();
        let (state, mem) = load(p)?;
        let loaded = t.elapsed();
        let zero = BootZero {
            at: self.start,
            name: "VMM start",
        };
        // A snapshot without an in-kernel irqchip comes from a tiny test guest (kvm-pvm
        // cannot run a guest with one); everything else has it.
        let (vm, msrs) = self.take_vm(state.vm.irqchip.is_some())?;
        let mut guest = restore::restore(
            vm,
            &state,
            mem,
            p,
            &self.config,
            &mut self.em,
            &self.exit_evt,
            zero,
        )?;
        let built = t.elapsed();
        let vcpus = std::mem::take(&mut guest.vcpus);
        let vcpus = match VcpuSet::start_paused(vcpus, &guest.io, &self.exit_evt, PAUSE_TIMEOUT) {
            Ok(v) => v,
            Err(e) => {
                for id in guest.subscribers.drain(..) {
                    let _ = self.em.remove_subscriber(id);
                }
                return Err(e.into());
            }
        };
        // Written back at resume (KVM_SET_CLOCK): the guest's clock continues from the
        // snapshot's.
        let clock = guest.vm.adjust_clock.then_some(state.vm.clock);
        self.config = restored_config(&state, p, &self.config);
        self.install(vcpus, guest, clock, msrs);
        self.state = VmState::Paused;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let done = t.elapsed();
        eprintln!(
            "vmm: restored {} (vCPUs: {}, memory: {} MiB, virtio devices: {}) with memory from \
             {} in {:.1} ms (files read and mapped {:.1} ms, VM and devices {:.1} ms, vCPU \
             threads {:.1} ms)",
            p.snapshot_path.display(),
            state.machine.vcpu_count,
            state.machine.mem_size_mib,
            state.devices.virtio.len(),
            p.mem_backend.backend_path.display(),
            ms(done),
            ms(loaded),
            ms(built - loaded),
            ms(done - built)
        );
        if p.resume_vm {
            let r = Instant::now();
            self.resume()
                .map_err(|e| VmmError::Host(format!("resuming the restored VM: {}", e.message)))?;
            eprintln!(
                "vmm: restored VM running {:.1} ms later (seccomp filters, clock, vCPUs resumed)",
                ms(r.elapsed())
            );
        }
        Ok(())
    }
}
