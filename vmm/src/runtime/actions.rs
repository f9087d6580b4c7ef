//! API requests, handled on the control loop's thread with the whole [`Vmm`] at hand.
//!
//! - Before start, each configuration section is checked on its own as it arrives (400
//!   naming the field or file) and replaces the old one; the whole configuration is checked
//!   again, and the devices are opened, at InstanceStart (400 naming the device or file if
//!   that fails; the VM then stays not started). After start the sections are refused with
//!   409, as Firecracker refuses its pre-boot-only resources.
//! - Pause and resume are idempotent: pausing a paused VM or resuming a running one answers
//!   204 without doing anything, as Firecracker does. Both answer 409 before start.
//! - Pause parks every vCPU (answered only once all have acknowledged), then saves kvmclock
//!   (KVM_GET_CLOCK); resume writes it back (KVM_SET_CLOCK) before the vCPUs run again, so
//!   the guest's kvmclock does not jump by the paused time. A guest clocked by its TSC (not
//!   this project's kernel, which uses kvm-clock) would still see the jump; so does its
//!   wall clock, which stays behind by the paused time until something (NTP) corrects it.
//! - Snapshot create (paused VM only, else 409) and load (before any VM, else 409) are in
//!   `super::snapshot`.

use std::time::{Duration, Instant};

use devices::virtio::block::Block;
use serde_json::{json, Map, Value};

use super::{VmState, Vmm, VmmError};
use crate::api::{ApiError, InstanceInfo, VmmAction, VmmData};
use crate::config::{host_mem_mib, ConfigError};
use crate::device_manager::DeviceManagerError;

/// How long vCPUs get to acknowledge a pause or resume (the API gives up after 30 s).
pub(super) const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Firecracker's id for an instance started without `--id`.
const INSTANCE_ID: &str = "anonymous-instance";

/// An error and its sources, one line: "drive rootfs: cannot open disk image /x: No such
/// file or directory (os error 2)".
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // `#[error(transparent)]` wrappers repeat their source's message.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

fn bad_config(e: ConfigError) -> ApiError {
    ApiError::bad_request(chain(&e))
}

/// InstanceStart's failure: the client's configuration (400) or the host (500).
fn start_error(e: &VmmError) -> ApiError {
    let client = match e {
        VmmError::Config(_)
        | VmmError::Boot(_)
        | VmmError::Drive { .. }
        | VmmError::Net { .. }
        | VmmError::Vsock(_)
        | VmmError::Console { .. } => true,
        VmmError::Device(d) => {
            matches!(d, DeviceManagerError::Full | DeviceManagerError::Cmdline(_))
        }
        // Only a huge-page backing has a hint: the client asked for pages the host lacks.
        VmmError::Memory { hint, .. } => !hint.is_empty(),
        _ => false,
    };
    let message = format!("InstanceStart: {}", chain(e));
    if client {
        ApiError::bad_request(message)
    } else {
        ApiError::internal(message)
    }
}

/// Replaces the entry `same` finds, or appends `value`.
fn upsert<T: Clone>(list: &mut Vec<T>, value: &T, same: impl Fn(&T) -> bool) {
    match list.iter_mut().find(|x| same(x)) {
        Some(slot) => *slot = value.clone(),
        None => list.push(value.clone()),
    }
}

impl Vmm {
    /// Does what `action` asks, or says why not.
    pub(super) fn handle_action(&mut self, action: &VmmAction) -> Result<VmmData, ApiError> {
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
                id: INSTANCE_ID.into(),
                state: self.state.name().into(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                app_name: "vmm".into(),
            })),
            VmmAction::GetMachineConfig => Ok(VmmData::MachineConfig(self.config.machine.clone())),
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(self.config.clone())),
            VmmAction::GetMetrics => Ok(VmmData::Json(self.metrics_json())),
            VmmAction::PutBootSource(_)
            | VmmAction::PutMachineConfig(_)
            | VmmAction::PutDrive(_)
            | VmmAction::PutNetworkInterface(_)
            | VmmAction::PutVsock(_)
            | VmmAction::PutEntropy(_) => self.configure(action),
            VmmAction::InstanceStart => self.instance_start(),
            VmmAction::SendCtrlAltDel => self.send_ctrl_alt_del(),
            VmmAction::Pause => self.pause(),
            VmmAction::Resume => self.resume(),
            // In `snapshot`: create needs a paused VM, load a VMM that has not started one.
            VmmAction::CreateSnapshot(p) => self.create_snapshot(p),
            VmmAction::LoadSnapshot(p) => self.load_snapshot(p),
        }
    }

    /// A pre-boot configuration section.
    fn configure(&mut self, action: &VmmAction) -> Result<VmmData, ApiError> {
        if self.state != VmState::NotStarted {
            return Err(ApiError::conflict(format!(
                "{} is not possible after the VM started: boot source, machine config and \
                 devices can only be set before InstanceStart",
                action.kind()
            )));
        }
        let mut next = self.config.clone();
        match action {
            VmmAction::PutBootSource(b) => {
                next.boot_source = b.clone();
                next.validate_boot_source().map_err(bad_config)?;
            }
            VmmAction::PutMachineConfig(m) => {
                next.machine = m.clone();
                next.validate_machine(host_mem_mib()).map_err(bad_config)?;
            }
            VmmAction::PutDrive(d) => {
                upsert(&mut next.drives, d, |x| x.drive_id == d.drive_id);
                next.validate_devices().map_err(bad_config)?;
                // Opening it as the device will shows what a file check cannot (its size).
                Block::new(&d.path_on_host, d.is_read_only, Some(d.drive_id.clone()))
                    .map_err(|e| ApiError::bad_request(format!("drives: {}", chain(&e))))?;
            }
            VmmAction::PutNetworkInterface(n) => {
                upsert(&mut next.net, n, |x| x.iface_id == n.iface_id);
                next.validate_devices().map_err(bad_config)?;
            }
            VmmAction::PutVsock(v) => {
                next.vsock = Some(v.clone());
                next.validate_devices().map_err(bad_config)?;
            }
            VmmAction::PutEntropy(e) => {
                if e.rate_limiter.is_some() {
                    return Err(ApiError::bad_request(
                        "entropy.rate_limiter: rate limiting is not supported; leave it out",
                    ));
                }
                next.entropy = true;
                next.validate_devices().map_err(bad_config)?;
            }
            other => {
                return Err(ApiError::internal(format!(
                    "{} is not a configuration action",
                    other.kind()
                )))
            }
        }
        self.config = next;
        Ok(VmmData::Empty)
    }

    fn instance_start(&mut self) -> Result<VmmData, ApiError> {
        if self.state != VmState::NotStarted {
            return Err(ApiError::conflict(
                "InstanceStart is not possible: the VM is already started",
            ));
        }
        // The boot timer counts from here: configuration time is the client's.
        self.start_vm(Instant::now()).map_err(|e| start_error(&e))?;
        Ok(VmmData::Empty)
    }

    fn send_ctrl_alt_del(&mut self) -> Result<VmmData, ApiError> {
        if self.state == VmState::NotStarted {
            return Err(ApiError::conflict(
                "SendCtrlAltDel is not possible: the VM is not started",
            ));
        }
        // devices::legacy::I8042 emulates only the reset line: it has no keyboard buffer or
        // keyboard interrupt to inject the key sequence through, and the guest kernel has
        // no keyboard driver to read it.
        Err(ApiError::bad_request(
            "SendCtrlAltDel is not supported: the i8042 has no keyboard to inject \
             Ctrl+Alt+Del into (and the guest kernel has no keyboard driver); end the guest \
             from inside, or stop the VMM with SIGTERM",
        ))
    }

    fn pause(&mut self) -> Result<VmmData, ApiError> {
        let instance = match (self.state, self.instance.as_mut()) {
            (VmState::Paused, _) => return Ok(VmmData::Empty),
            (VmState::Running, Some(instance)) => instance,
            _ => {
                return Err(ApiError::conflict(
                    "Pause is not possible: the VM is not started (PUT /actions \
                     InstanceStart first)",
                ))
            }
        };
        if let Err(e) = instance.vcpus.pause(PAUSE_TIMEOUT) {
            // Let the ones that did park run again; the VM stays Running.
            let _ = instance.vcpus.resume(PAUSE_TIMEOUT);
            return Err(ApiError::internal(format!("Pause: {}", chain(&e))));
        }
        match instance.guest.vm.get_clock() {
            Ok(clock) => instance.saved_clock = clock,
            Err(e) => {
                let _ = instance.vcpus.resume(PAUSE_TIMEOUT);
                return Err(ApiError::internal(format!("Pause: {}", chain(&e))));
            }
        }
        self.state = VmState::Paused;
        Ok(VmmData::Empty)
    }

    pub(super) fn resume(&mut self) -> Result<VmmData, ApiError> {
        match (self.state, self.instance.is_some()) {
            (VmState::Running, _) => return Ok(VmmData::Empty),
            (VmState::Paused, true) => {}
            _ => {
                return Err(ApiError::conflict(
                    "Resume is not possible: the VM is not started (PUT /actions \
                     InstanceStart first)",
                ))
            }
        }
        self.resume_instance()
            .map_err(|e| ApiError::internal(format!("Resume: {}", chain(&e))))?;
        Ok(VmmData::Empty)
    }

    /// Lets the paused instance's vCPUs run: at the first run, installs the seccomp
    /// filters (see `super`'s docs); then writes back the kvmclock saved at pause.
    pub(super) fn resume_instance(&mut self) -> Result<(), VmmError> {
        let seccomp = self.seccomp;
        let Some(instance) = self.instance.as_mut() else {
            return Err(VmmError::Host("no VM to resume".into()));
        };
        instance.install_filters(seccomp)?;
        if let Some(clock) = instance.saved_clock.take() {
            if let Err(e) = instance.guest.vm.set_clock(&clock) {
                instance.saved_clock = Some(clock);
                return Err(e.into());
            }
        }
        // From here the vCPUs are told to run: whatever the answer, the VM is not paused
        // any more (devices must be served for the vCPUs that did resume).
        self.state = VmState::Running;
        instance.vcpus.resume(PAUSE_TIMEOUT)?;
        Ok(())
    }

    /// `GET /metrics`: VMM state, API, vCPU exits and device counters.
    fn metrics_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("state".into(), json!(self.state.name()));
        let uptime = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        m.insert("uptime_ms".into(), json!(uptime));
        m.insert("api".into(), json!({ "requests": self.api_requests }));
        let Some(instance) = &self.instance else {
            m.insert("boot_ready_ms".into(), Value::Null);
            return Value::Object(m);
        };
        let guest = &instance.guest;
        let ready = guest
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ready_ms;
        m.insert("boot_ready_ms".into(), json!(ready));
        let mut totals: Vec<(&'static str, u64)> = Vec::new();
        let mut per_vcpu = Vec::new();
        for (id, counters) in instance.vcpus.metrics() {
            let snapshot = counters.snapshot();
            if totals.is_empty() {
                totals = snapshot.iter().map(|(k, _)| (*k, 0)).collect();
            }
            let mut one = Map::new();
            one.insert("id".into(), json!(id));
            for ((name, value), total) in snapshot.iter().zip(totals.iter_mut()) {
                total.1 = total.1.saturating_add(*value);
                one.insert((*name).into(), json!(value));
            }
            per_vcpu.push(Value::Object(one));
        }
        m.insert("vcpu".into(), counters_json(&totals));
        m.insert("vcpus".into(), Value::Array(per_vcpu));
        let devices: Map<String, Value> = guest
            .device_counters
            .iter()
            .map(|(name, read)| (name.clone(), counters_json(&read())))
            .collect();
        m.insert("devices".into(), Value::Object(devices));
        let serial = {
            let s = guest.serial.lock().unwrap_or_else(|e| e.into_inner());
            json!({ "bytes_out": s.bytes_out(), "write_errors": s.write_errors() })
        };
        let resets = guest
            .i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resets();
        m.insert(
            "legacy".into(),
            json!({ "serial": serial, "i8042": { "resets": resets } }),
        );
        Value::Object(m)
    }
}

fn counters_json(counters: &[(&'static str, u64)]) -> Value {
    Value::Object(
        counters
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect(),
    )
}
