//! Taking a snapshot of a paused VM: [`capture`] reads every piece of state into a
//! [`VmState`], [`write`] puts it and guest RAM into the two files.
//!
//! The caller guarantees the VM is paused: every vCPU parked on its thread (so each is
//! read there, through [`VcpuSet::on_each`]), and the event loop not running any device
//! (the VMM calls this from the loop's own thread while paused, so no device handler can
//! run meanwhile). Memory is written before the vmstate file: a vmstate file on disk
//! always has its memory file next to it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{SerialConsole, I8042};
use kvm_bindings::kvm_clock_data;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::format::{self, VmStateFileError};
use super::memory::{layout_of, write_memory, MemoryFileError, MemoryWriteStats};
use super::state::{DevicesState, MachineState, VmState};
use crate::device_manager::AttachedVirtio;
use crate::vstate::vcpu::{VcpuExitReason, VcpuIo};
use crate::vstate::vcpu_state::{save_vcpu, VcpuState, VcpuStateError};
use crate::vstate::vcpu_thread::{VcpuSet, VcpuThreadError};
use crate::vstate::vm::Vm;
use crate::vstate::vm_state::{save_vm, VmStateError};

/// How long the parked vCPU threads get to save their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The list of MSRs to save could not be read.
    #[error("cannot list the MSRs to save")]
    MsrList(#[source] VcpuStateError),
    /// The vCPU threads did not all answer.
    #[error("vCPU threads")]
    Threads(#[source] VcpuThreadError),
    /// A vCPU's pending I/O could not be completed.
    #[error("vCPU {id}: completing its pending I/O: {reason:?}")]
    PendingIo {
        /// vCPU index.
        id: u8,
        /// What the vCPU did instead.
        reason: VcpuExitReason,
    },
    /// A vCPU's state could not be read.
    #[error("vCPU {id}: saving its state")]
    Vcpu {
        /// vCPU index.
        id: u8,
        /// The error.
        #[source]
        source: VcpuStateError,
    },
    /// The VM-wide state could not be read.
    #[error("saving the VM state")]
    Vm(#[source] VmStateError),
    /// The machine does not fit the vmstate format.
    #[error("{0}")]
    Shape(String),
    /// The memory file could not be written.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// The vmstate file could not be written.
    #[error(transparent)]
    VmState(#[from] VmStateFileError),
}

/// What a paused VM is made of, for [`capture`].
pub struct SnapshotSource<'a> {
    /// The KVM VM.
    pub vm: &'a Vm,
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap,
    /// The buses, to finish a vCPU's pending I/O exit.
    pub io: &'a VcpuIo,
    /// The MSRs to save (`vcpu_state::msrs_to_save`, asked once per VMM).
    pub msr_list: &'a [u32],
    /// Every virtio device, in attach order.
    pub devices: &'a [AttachedVirtio],
    /// COM1, if the VM has it. Its buffered console output is flushed.
    pub serial: Option<&'a Mutex<SerialConsole>>,
    /// The i8042, if the VM has it.
    pub i8042: Option<&'a Mutex<I8042>>,
    /// kvmclock as read when the VM was paused: saved instead of the current clock, so the
    /// time spent paused before the snapshot does not show in the guest's clock.
    pub paused_clock: Option<kvm_clock_data>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the whole state of a paused VM (see the module doc). Each vCPU first completes
/// an I/O exit it may have parked in the middle of, then is saved on its own thread.
pub fn capture(src: &SnapshotSource<'_>, vcpus: &mut VcpuSet) -> Result<VmState, SnapshotError> {
    let msr_list: Arc<[u32]> = src.msr_list.into();
    let io = src.io.clone();
    type Saved = Result<VcpuState, SnapshotError>;
    let saved: Vec<(u8, Saved)> = vcpus
        .on_each(
            move |v| {
                let id = v.id;
                v.complete_pending_io(&io)
                    .map_err(|reason| SnapshotError::PendingIo { id, reason })?;
                save_vcpu(&v.fd, &msr_list).map_err(|source| SnapshotError::Vcpu { id, source })
            },
            SAVE_TIMEOUT,
        )
        .map_err(SnapshotError::Threads)?;
    let mut states = Vec::with_capacity(saved.len());
    for (i, (id, s)) in saved.into_iter().enumerate() {
        if usize::from(id) != i {
            // on_each answers by id for the live vCPUs; a gap means one has ended.
            return Err(SnapshotError::Shape(format!(
                "vCPU {i} has ended; cannot snapshot a VM with a stopped vCPU"
            )));
        }
        states.push(s?);
    }
    let vcpu_count = u8::try_from(states.len())
        .map_err(|_| SnapshotError::Shape(format!("{} vCPUs", states.len())))?;
    let mut vm = save_vm(&src.vm.fd).map_err(SnapshotError::Vm)?;
    if let Some(clock) = src.paused_clock {
        vm.clock = kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        };
    }
    let bytes: u64 = src.mem.iter().map(|r| r.len()).sum();
    if !bytes.is_multiple_of(1 << 20) {
        return Err(SnapshotError::Shape(format!(
            "guest RAM of {bytes} bytes is not a whole number of MiB"
        )));
    }
    let serial = src.serial.map(|s| {
        let mut s = lock(s);
        // Best effort: a console that cannot be written to loses the text either way.
        let _ = s.flush();
        s.save_state()
    });
    Ok(VmState {
        machine: MachineState {
            vcpu_count,
            mem_size_mib: bytes >> 20,
            regions: layout_of(src.mem),
        },
        vm,
        vcpus: states,
        devices: DevicesState {
            serial,
            i8042: src.i8042.map(|d| lock(d).save_state()),
            virtio: src.devices.iter().map(AttachedVirtio::save_state).collect(),
        },
    })
}

/// What [`write`] wrote.
#[derive(Debug, Clone)]
pub struct SnapshotWritten {
    /// The vmstate file.
    pub vmstate_path: PathBuf,
    /// Its size.
    pub vmstate_bytes: u64,
    /// The memory file.
    pub mem_path: PathBuf,
    /// Its apparent size (guest RAM).
    pub mem_size: u64,
    /// Data pages written to it (the rest are holes).
    pub mem: MemoryWriteStats,
    /// Time taken by both files.
    pub elapsed: Duration,
}

/// Writes guest RAM to `mem_path` (sparse), then `state` to `vmstate_path`; each file is
/// written to `PATH.tmp` and renamed into place. The guest must still be paused.
pub fn write(
    state: &VmState,
    mem: &GuestMemoryMmap,
    vmstate_path: &Path,
    mem_path: &Path,
) -> Result<SnapshotWritten, SnapshotError> {
    let t = Instant::now();
    let stats = write_memory(mem, mem_path)?;
    let vmstate_bytes = format::save(vmstate_path, state)?;
    Ok(SnapshotWritten {
        vmstate_path: vmstate_path.to_path_buf(),
        vmstate_bytes,
        mem_path: mem_path.to_path_buf(),
        mem_size: state.mem_size(),
        mem: stats,
        elapsed: t.elapsed(),
    })
}
