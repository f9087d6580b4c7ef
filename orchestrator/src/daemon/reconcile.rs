//! Startup reconciliation: makes the database and the host agree after a restart, including
//! one after `kill -9` at any point of a create or destroy.
//!
//! - `running` VMs whose VMM is still the process we started (pid and start time match) are
//!   re-adopted and watched again; the others become `crashed`, their host pieces reclaimed.
//! - `creating` and `destroying` VMs were cut short: torn down and forgotten (lease
//!   released), whatever step they had reached.
//! - `stopped`, `crashed` and `hibernated` VMs keep their rows; a leftover VMM is stopped.
//!   A running VM a hibernation was cut short in is resumed; a hibernated one keeps only
//!   the snapshot its row names (see `hibernate`).
//! - Host pieces no row accounts for (netns `orch-*`, host veths, jail and per-VM
//!   directories) are removed, after stopping any VMM still in their cgroup.

use std::collections::BTreeSet;
use std::fmt;

use super::vm::{self, JailReport};
use super::Daemon;
use super::{hibernate, template};
use crate::netsetup;
use crate::store::VmState;

/// What a reconciliation did.
#[derive(Debug, Default)]
pub struct Report {
    /// Running VMs re-adopted.
    pub adopted: Vec<String>,
    /// Running VMs found dead, now `crashed`.
    pub crashed: Vec<String>,
    /// Half-created or half-destroyed VMs removed.
    pub cleaned: Vec<String>,
    /// Host pieces without a VM removed (netns, directories, half-built templates).
    pub orphans: Vec<String>,
    /// Hibernated VMs checked (no VMM left, only their current snapshot kept).
    pub hibernated: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reconciled: {} re-adopted, {} hibernated, {} found crashed, {} half-done removed, {} orphans removed",
            self.adopted.len(),
            self.hibernated.len(),
            self.crashed.len(),
            self.cleaned.len(),
            self.orphans.len()
        )?;
        for (what, list) in [
            ("re-adopted", &self.adopted),
            ("crashed", &self.crashed),
            ("removed", &self.cleaned),
            ("orphans", &self.orphans),
        ] {
            if !list.is_empty() {
                write!(f, "; {what}: {}", list.join(", "))?;
            }
        }
        Ok(())
    }
}

/// Reconciles; see the module docs.
pub fn reconcile(d: &Daemon) -> anyhow::Result<Report> {
    let mut r = Report::default();
    let vms = d.with_store(|s| s.list_vms())?;
    for v in &vms {
        match v.state {
            VmState::Running => {
                let alive = matches!((v.pid, v.pid_start_time), (Some(p), Some(t)) if vm::process_alive(p, t));
                if alive {
                    // A hibernation cut short may have left it paused (its snapshot is
                    // not recorded, so it is still this running VM): resume it.
                    if let (Some(j), Some(ip)) = (JailReport::load(&d.config.vm_dir(&v.id)), v.ip) {
                        hibernate::resume_quietly(&j, vm::vm_uid(d, ip));
                    }
                    let current = d.with_store(|s| s.latest_snapshot(&v.id, hibernate::KIND))?;
                    hibernate::prune_snapshots(
                        &d.config.vm_dir(&v.id),
                        current.as_ref().map(|s| s.vmstate_path.as_path()),
                    );
                    r.adopted.push(v.id.clone());
                } else {
                    let tail = JailReport::load(&d.config.vm_dir(&v.id))
                        .map(|j| vm::console_tail(&j.jail_root, vm::CONSOLE_TAIL))
                        .unwrap_or_default();
                    vm::teardown(d, &v.id);
                    d.with_store(|s| {
                        s.set_last_console(&v.id, &tail)?;
                        s.clear_process(&v.id)?;
                        s.set_state(&v.id, VmState::Crashed)
                    })?;
                    r.crashed.push(v.id.clone());
                }
            }
            VmState::Creating | VmState::Destroying => {
                vm::teardown(d, &v.id);
                d.with_store(|s| s.destroy_vm(&v.id))?;
                r.cleaned.push(v.id.clone());
            }
            VmState::Hibernated => {
                // A VMM left by a hibernation after its commit, or by a wake cut short.
                vm::release_vmm(d, &v.id);
                d.with_store(|s| s.clear_process(&v.id))?;
                let current = d.with_store(|s| s.latest_snapshot(&v.id, hibernate::KIND))?;
                hibernate::prune_snapshots(
                    &d.config.vm_dir(&v.id),
                    current.as_ref().map(|s| s.vmstate_path.as_path()),
                );
                r.hibernated.push(v.id.clone());
            }
            VmState::Stopped | VmState::Crashed => {
                vm::teardown(d, &v.id);
            }
        }
    }

    let known: BTreeSet<String> = d
        .with_store(|s| s.list_vms())?
        .into_iter()
        .map(|v| v.id)
        .collect();
    // Directories: per-VM files and jails.
    for base in [
        d.config.state_dir.join("vms"),
        d.config.jail_base().join("vmm"),
    ] {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                vm::teardown(d, &name);
                r.orphans.push(format!("{}", e.path().display()));
            }
        }
    }
    r.orphans.extend(template::clean_partial(d));
    let known_list: Vec<String> = known.iter().cloned().collect();
    for o in netsetup::list_orphans(&known_list).unwrap_or_default() {
        if netsetup::remove_orphan(&o).unwrap_or(false) {
            r.orphans.push(o);
        }
    }
    Ok(r)
}
