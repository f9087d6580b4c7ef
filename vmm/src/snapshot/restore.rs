//! Restoring, the part before KVM: reading and checking both files, matching the overrides
//! against the snapshot's devices, and rebuilding each device (its host backend reopened)
//! from its saved state. Building the VM from all that is `runtime::restore`.
//!
//! Everything that can be refused without KVM is refused here, before a VM exists: a bad
//! vmstate file (magic, version, truncation, checksum, shape), a memory file of the wrong
//! size, a memory layout this VMM would not make, and overrides naming devices the snapshot
//! does not have.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::legacy::SerialRestoreError;
use devices::virtio::block::{Block, BlockRestoreError};
use devices::virtio::net::{Net, NetError};
use devices::virtio::rng::{Rng, RngError};
use devices::virtio::vsock::{Vsock, VsockError};
use vm_memory::GuestMemoryMmap;

use super::format::{self, VmStateFileError};
use super::memory::{map_memory, MemoryFileError};
use super::state::{VirtioDeviceKind, VirtioDeviceState, VmState};
use crate::api::SnapshotLoadParams;
use crate::arch::layout::ram_regions;
use crate::config::{DriveConfig, MachineConfig, NetConfig, VmConfig, VsockConfig};
use crate::device_manager::VirtioHandle;
use crate::vstate::vcpu_state::VcpuStateError;
use crate::vstate::vm_state::VmStateError;

/// Why a snapshot cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The vmstate file is refused.
    #[error(transparent)]
    VmState(#[from] VmStateFileError),
    /// The memory file is refused.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// The memory layout is not the one this VMM makes for that memory size.
    #[error("vmstate file {}: memory layout {found:x?} is not this VMM's layout for {mib} MiB ({expected:x?})", path.display())]
    Layout {
        /// The vmstate file.
        path: PathBuf,
        /// Memory size.
        mib: u64,
        /// The saved regions as (start, size).
        found: Vec<(u64, u64)>,
        /// What this VMM lays out.
        expected: Vec<(u64, u64)>,
    },
    /// An override names a device the snapshot does not have.
    #[error("{what}: the snapshot has no {kind} {id:?} (it has: {have})")]
    UnknownOverride {
        /// The override list (`drive_overrides`, `network_overrides`, `vsock_override`).
        what: &'static str,
        /// `drive`, `network interface`, `vsock device`.
        kind: &'static str,
        /// The id given.
        id: String,
        /// The ids the snapshot has.
        have: String,
    },
    /// An override names the same device twice.
    #[error("{what}: {id:?} is given twice")]
    DuplicateOverride {
        /// The override list.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// A saved device's name does not fit its kind.
    #[error("vmstate file: virtio device {0:?} has a name that does not match its kind")]
    DeviceName(String),
    /// A drive could not be reopened.
    #[error("drive {id}")]
    Block {
        /// Drive id.
        id: String,
        /// Why.
        #[source]
        source: BlockRestoreError,
    },
    /// A network interface's tap could not be reopened.
    #[error("network interface {id}")]
    Net {
        /// Interface id.
        id: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// The vsock device could not be recreated (its socket path in use, ...).
    #[error("vsock")]
    Vsock(#[source] VsockError),
    /// The entropy device could not be recreated.
    #[error("virtio-rng")]
    Rng(#[source] RngError),
    /// The serial port's saved state is refused.
    #[error("serial port")]
    Serial(#[source] SerialRestoreError),
    /// KVM refused the VM-wide state.
    #[error("restoring the VM state")]
    Vm(#[source] VmStateError),
    /// KVM refused a vCPU's state.
    #[error("restoring vCPU {id}")]
    Vcpu {
        /// vCPU index.
        id: u8,
        /// Why.
        #[source]
        source: VcpuStateError,
    },
}

impl RestoreError {
    /// Whether the client can fix it (a file, a path, an override, a snapshot this host's
    /// KVM cannot take), as opposed to the host failing.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, RestoreError::Rng(_))
    }
}

/// The device kinds' name prefixes, as `runtime::build` names them.
const BLOCK_PREFIX: &str = "block:";
const NET_PREFIX: &str = "net:";

/// The id in a device name (`block:rootfs` -> `rootfs`), if it has `prefix`.
fn id_of<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)
}

/// Reads the vmstate file and maps the memory file, refusing anything wrong with either
/// and overrides that name devices the snapshot lacks. Touches no KVM.
pub fn load(params: &SnapshotLoadParams) -> Result<(VmState, GuestMemoryMmap), RestoreError> {
    let path = &params.snapshot_path;
    let state = format::load(path, None)?;
    let expected = ram_regions(state.mem_size());
    let found: Vec<(u64, u64)> = state
        .machine
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if found != expected {
        return Err(RestoreError::Layout {
            path: path.clone(),
            mib: state.machine.mem_size_mib,
            found,
            expected,
        });
    }
    check_overrides(&state, params)?;
    let mem = map_memory(&params.mem_backend.backend_path, &state.machine.regions)?;
    Ok((state, mem))
}

/// Every override must name a device of the snapshot, once.
pub fn check_overrides(state: &VmState, params: &SnapshotLoadParams) -> Result<(), RestoreError> {
    let names: Vec<&str> = state
        .devices
        .virtio
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    let check = |what: &'static str, kind: &'static str, prefix: &str, ids: Vec<&str>| {
        let have: BTreeSet<&str> = names.iter().filter_map(|n| id_of(n, prefix)).collect();
        let mut seen = BTreeSet::new();
        for id in ids {
            if !seen.insert(id) {
                return Err(RestoreError::DuplicateOverride {
                    what,
                    id: id.into(),
                });
            }
            if !have.contains(id) {
                return Err(RestoreError::UnknownOverride {
                    what,
                    kind,
                    id: id.into(),
                    have: list(&have),
                });
            }
        }
        Ok(())
    };
    check(
        "drive_overrides",
        "drive",
        BLOCK_PREFIX,
        params
            .drive_overrides
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect(),
    )?;
    check(
        "network_overrides",
        "network interface",
        NET_PREFIX,
        params
            .network_overrides
            .iter()
            .map(|n| n.iface_id.as_str())
            .collect(),
    )?;
    let has_vsock = state
        .devices
        .virtio
        .iter()
        .any(|d| matches!(d.device, VirtioDeviceKind::Vsock(_)));
    if params.vsock_override.is_some() && !has_vsock {
        return Err(RestoreError::UnknownOverride {
            what: "vsock_override",
            kind: "vsock device",
            id: "vsock".into(),
            have: "no vsock device".into(),
        });
    }
    Ok(())
}

fn list(ids: &BTreeSet<&str>) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(|i| format!("{i:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The host resources the overrides give, by device.
struct Overrides<'a> {
    drives: BTreeMap<&'a str, &'a Path>,
    taps: BTreeMap<&'a str, &'a str>,
    vsock: Option<&'a Path>,
}

impl<'a> Overrides<'a> {
    fn of(p: &'a SnapshotLoadParams) -> Overrides<'a> {
        Overrides {
            drives: p
                .drive_overrides
                .iter()
                .map(|d| (d.drive_id.as_str(), d.path_on_host.as_path()))
                .collect(),
            taps: p
                .network_overrides
                .iter()
                .map(|n| (n.iface_id.as_str(), n.host_dev_name.as_str()))
                .collect(),
            vsock: p.vsock_override.as_ref().map(|v| v.uds_path.as_path()),
        }
    }
}

/// Rebuilds the device `saved` describes, inactive, with its host backend reopened (at the
/// override's path or tap if one names it). Its transport restore activates it.
pub fn rebuild_device(
    saved: &VirtioDeviceState,
    params: &SnapshotLoadParams,
) -> Result<VirtioHandle, RestoreError> {
    let o = Overrides::of(params);
    let name = saved.name.as_str();
    let bad_name = || RestoreError::DeviceName(name.into());
    Ok(match &saved.device {
        VirtioDeviceKind::Block(s) => {
            let id = id_of(name, BLOCK_PREFIX).ok_or_else(bad_name)?;
            let dev = Block::restore(s, o.drives.get(id).copied()).map_err(|source| {
                RestoreError::Block {
                    id: id.into(),
                    source,
                }
            })?;
            VirtioHandle::Block(Arc::new(Mutex::new(dev)))
        }
        VirtioDeviceKind::Net(s) => {
            let id = id_of(name, NET_PREFIX).ok_or_else(bad_name)?;
            let dev =
                Net::restore(s, o.taps.get(id).copied()).map_err(|source| RestoreError::Net {
                    id: id.into(),
                    source,
                })?;
            VirtioHandle::Net(Arc::new(Mutex::new(dev)))
        }
        VirtioDeviceKind::Vsock(s) => {
            let dev = Vsock::restore(s, o.vsock).map_err(RestoreError::Vsock)?;
            VirtioHandle::Vsock(Arc::new(Mutex::new(dev)))
        }
        VirtioDeviceKind::Rng(s) => VirtioHandle::Rng(Arc::new(Mutex::new(
            Rng::restore(s).map_err(RestoreError::Rng)?,
        ))),
    })
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The configuration a restored VM reports (`GET /vm/config`): its machine and devices as
/// restored (overrides applied), the console and boot timer of `base`. The boot source is
/// empty: the kernel is in the memory file. Which drive was the root device is not saved,
/// so every drive reports `is_root_device: false`.
pub fn restored_config(state: &VmState, params: &SnapshotLoadParams, base: &VmConfig) -> VmConfig {
    let o = Overrides::of(params);
    let mut cfg = VmConfig {
        boot_source: Default::default(),
        machine: MachineConfig {
            vcpu_count: u16::from(state.machine.vcpu_count),
            mem_size_mib: state.machine.mem_size_mib,
            ..MachineConfig::default()
        },
        console: base.console.clone(),
        boot_timer: base.boot_timer,
        drives: Vec::new(),
        entropy: false,
        net: Vec::new(),
        vsock: None,
    };
    for d in &state.devices.virtio {
        match &d.device {
            VirtioDeviceKind::Block(s) => {
                let id = id_of(&d.name, BLOCK_PREFIX).unwrap_or(&d.name);
                let path = o
                    .drives
                    .get(id)
                    .map(|p| p.to_path_buf())
                    .or_else(|| s.path.clone())
                    .unwrap_or_default();
                cfg.drives.push(DriveConfig {
                    drive_id: id.into(),
                    path_on_host: path,
                    is_root_device: false,
                    is_read_only: s.read_only,
                });
            }
            VirtioDeviceKind::Net(s) => {
                let id = id_of(&d.name, NET_PREFIX).unwrap_or(&d.name);
                let tap = o.taps.get(id).copied().unwrap_or(&s.tap_name);
                cfg.net.push(NetConfig {
                    iface_id: id.into(),
                    host_dev_name: tap.into(),
                    guest_mac: Some(mac_text(s.mac)),
                    mtu: s.mtu,
                });
            }
            VirtioDeviceKind::Vsock(s) => {
                cfg.vsock = Some(VsockConfig {
                    vsock_id: None,
                    guest_cid: s.guest_cid,
                    uds_path: o
                        .vsock
                        .map_or_else(|| s.uds_path.clone(), Path::to_path_buf),
                });
            }
            VirtioDeviceKind::Rng(_) => cfg.entropy = true,
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DriveOverride, MemBackend, MemBackendType, NetworkOverride, VsockOverride};
    use crate::snapshot::test_utils::sample_state;

    fn params() -> SnapshotLoadParams {
        SnapshotLoadParams {
            snapshot_path: "/s".into(),
            mem_backend: MemBackend {
                backend_type: MemBackendType::File,
                backend_path: "/m".into(),
            },
            resume_vm: false,
            network_overrides: vec![],
            drive_overrides: vec![],
            vsock_override: None,
        }
    }

    fn drive(id: &str) -> DriveOverride {
        DriveOverride {
            drive_id: id.into(),
            path_on_host: "/disk".into(),
        }
    }

    #[test]
    fn overrides_must_name_the_snapshots_devices() {
        let state = sample_state();
        let mut p = params();
        p.drive_overrides = vec![drive("rootfs")];
        check_overrides(&state, &p).unwrap();

        p.drive_overrides = vec![drive("data")];
        let e = check_overrides(&state, &p).unwrap_err().to_string();
        assert!(
            e.contains("drive_overrides") && e.contains("\"data\""),
            "{e}"
        );
        assert!(e.contains("\"rootfs\""), "lists what there is: {e}");

        p.drive_overrides = vec![drive("rootfs"), drive("rootfs")];
        let e = check_overrides(&state, &p).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");

        let mut p = params();
        p.network_overrides = vec![NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
        }];
        let e = check_overrides(&state, &p).unwrap_err().to_string();
        assert!(e.contains("network_overrides") && e.contains("none"), "{e}");

        let mut p = params();
        p.vsock_override = Some(VsockOverride {
            uds_path: "/v.sock".into(),
        });
        let e = check_overrides(&state, &p).unwrap_err().to_string();
        assert!(e.contains("vsock_override"), "{e}");
    }

    #[test]
    fn restored_config_reports_devices_with_overrides_applied() {
        let state = sample_state();
        let mut p = params();
        p.drive_overrides = vec![drive("rootfs")];
        let base = VmConfig {
            console: crate::config::ConsoleTarget::None,
            ..VmConfig::default()
        };
        let cfg = restored_config(&state, &p, &base);
        assert_eq!(cfg.machine.vcpu_count, 1);
        assert_eq!(cfg.machine.mem_size_mib, 2);
        assert_eq!(cfg.console, crate::config::ConsoleTarget::None);
        assert_eq!(cfg.drives.len(), 1);
        assert_eq!(cfg.drives[0].drive_id, "rootfs");
        assert_eq!(cfg.drives[0].path_on_host, Path::new("/disk"));
        assert!(!cfg.entropy);
        let cfg = restored_config(&state, &params(), &base);
        assert_eq!(cfg.drives[0].path_on_host, Path::new("/rootfs.ext4"));
    }

    #[test]
    fn device_names_must_fit_their_kind() {
        let mut state = sample_state();
        state.devices.virtio[0].name = "net:eth0".into();
        let e = rebuild_device(&state.devices.virtio[0], &params())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("net:eth0"), "{e}");
    }
}
