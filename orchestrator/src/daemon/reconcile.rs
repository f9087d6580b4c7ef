//! Startup reconciliation: makes the database and the host agree after a restart, including
//! one after `kill -9` at any point of a create or destroy.
//!
//! - `running` VMs whose VMM is still the process we started (pid and start time match) are
//!   re-adopted and watched again; the others become `crashed`, their host pieces reclaimed.
//! - `creating` and `destroying` VMs were cut short: torn down and forgotten (lease
//!   released), whatever step they had reached.
//! - `stopped`, `crashed` and `hibernated` VMs keep their rows; a leftover VMM is stopped.
//! - Host pieces no row accounts for (netns `orch-*`, host veths, jail and per-VM
//!   directories) are removed, after stopping any VMM still in their cgroup.

use std::collections::BTreeSet;
use std::fmt;

use super::vm::{self, JailReport};
use super::Daemon;
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
    /// Host pieces without a VM removed (netns, directories).
    pub orphans: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reconciled: {} re-adopted, {} found crashed, {} half-done removed, {} orphans removed",
            self.adopted.len(),
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
            VmState::Stopped | VmState::Crashed | VmState::Hibernated => {
                if v.state != VmState::Hibernated {
                    vm::teardown(d, &v.id);
                }
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
    let known_list: Vec<String> = known.iter().cloned().collect();
    for o in netsetup::list_orphans(&known_list).unwrap_or_default() {
        if netsetup::remove_orphan(&o).unwrap_or(false) {
            r.orphans.push(o);
        }
    }
    Ok(r)
}
