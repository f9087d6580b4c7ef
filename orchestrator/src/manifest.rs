//! Workload manifests: the JSON document an operator hands the orchestrator to describe one
//! workload (kernel, rootfs, size, what to run, network policy, limits). Schema version 1
//! is documented in `orchestrator/docs/manifest.md`.
//!
//! `Manifest::parse` turns untrusted bytes into a validated `Manifest` or a list of every
//! problem found, each with the dotted path of the field ("rootfs.path", "args[3]").
//! `Manifest::check_files` looks at the host files it names, separately, because the daemon
//! does that when a VM is created, not when the manifest is stored. Nothing here starts a
//! VM or talks to a guest.

#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::net_addr::Ipv4Cidr;

/// The manifest schema version this code reads and writes (the required `"schema"` field).
pub const SCHEMA_VERSION: u32 = 1;
/// Largest manifest accepted, in bytes of raw JSON. Checked before parsing, so an oversized
/// document costs nothing to refuse.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;
/// Longest workload name. 63 is a DNS label's limit, so the name can become a hostname.
pub const MAX_NAME_LEN: usize = 63;
/// Longest path (`kernel`, `initrd`, `rootfs.path`, `working_dir`) and `entrypoint`, in
/// bytes: Linux's PATH_MAX.
pub const MAX_PATH_BYTES: usize = 4096;
/// Most vCPUs per VM.
pub const MAX_VCPUS: u8 = 32;
/// vCPUs when the manifest names none.
pub const DEFAULT_VCPUS: u8 = 1;
/// Guest memory in MiB when the manifest names none.
pub const DEFAULT_MEMORY_MIB: u32 = 128;
/// Smallest guest memory, MiB: less does not boot a kernel plus guest-init comfortably.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Largest guest memory, MiB (64 GiB).
pub const MAX_MEMORY_MIB: u32 = 65536;
/// Most entries in `args`.
pub const MAX_ARGS: usize = 4096;
/// Longest single `args` entry, and longest `KEY=VALUE` of an `env` entry, in bytes. Linux
/// refuses an execve string longer than MAX_ARG_STRLEN (128 KiB including the NUL), so a
/// longer one could never reach the workload.
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;
/// Most entries in `env`.
pub const MAX_ENV_VARS: usize = 4096;
/// Longest `env` key, in bytes.
pub const MAX_ENV_KEY_BYTES: usize = 255;
/// Most entries in `network.egress_allow`: each becomes a netfilter rule.
pub const MAX_EGRESS_RULES: usize = 256;
/// vsock port guest-init's agent listens on when the manifest names none.
pub const DEFAULT_AGENT_PORT: u32 = 52;
/// `limits.memory_max_mib` must leave at least this much above `memory_mib` for the VMM's
/// own memory (device queues, buffers, page tables).
pub const VMM_MEMORY_HEADROOM_MIB: u64 = 16;
/// Largest `limits.memory_max_mib` (1 TiB): far above any guest we allow, and safely
/// convertible to bytes.
pub const MAX_MEMORY_MAX_MIB: u64 = 1024 * 1024;
/// Bounds of `limits.cpu_quota_pct`: 100 is one host CPU; 3200 is 32 CPUs, one per vCPU.
pub const CPU_QUOTA_PCT_RANGE: (u32, u32) = (1, 3200);
/// Bounds of `limits.pids_max`: the VMM needs a thread per vCPU plus a few of its own.
pub const PIDS_MAX_RANGE: (u32, u32) = (16, 65536);
/// Bounds of `limits.open_files` (RLIMIT_NOFILE): 1048576 is Linux's default `fs.nr_open`.
pub const OPEN_FILES_RANGE: (u64, u64) = (16, 1024 * 1024);
/// At most this many problems are listed; the rest are counted in one last entry, so an
/// error response stays small.
pub const MAX_REPORTED_ERRORS: usize = 64;

/// A validated workload manifest. Build it with `Manifest::parse`; the fields are public to
/// read. Optional fields left out of the JSON hold their defaults here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Workload name: 1 to 63 of `a-z`, `0-9`, `-`, not starting with `-`.
    pub name: String,
    /// Host path of the guest kernel.
    pub kernel: PathBuf,
    /// Host path of an initrd, if any.
    pub initrd: Option<PathBuf>,
    /// The root filesystem image.
    pub rootfs: Rootfs,
    /// vCPU count, 1 to 32.
    pub vcpus: u8,
    /// Guest memory in MiB, 64 to 65536.
    pub memory_mib: u32,
    /// The program guest-init starts.
    pub entrypoint: String,
    /// Its arguments (not including argv[0]).
    pub args: Vec<String>,
    /// Its environment.
    pub env: BTreeMap<String, String>,
    /// Its working directory, inside the guest.
    pub working_dir: String,
    /// vsock port of guest-init's agent.
    pub agent_port: u32,
    /// Network settings.
    pub network: Network,
    /// Resource limits applied to the VMM process.
    pub limits: Limits,
    /// Seconds idle before the VM is hibernated; `None` never hibernates it.
    pub idle_hibernate_s: Option<u64>,
    /// Start VMs from a template snapshot (booted once, then restored for every VM).
    pub template: bool,
}

/// `rootfs`: the root filesystem image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    /// Host path of the image.
    pub path: PathBuf,
    /// Whether the guest sees it read-only (default true).
    pub read_only: bool,
}

/// `network`: whether the VM gets a NIC, and where it may connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Whether the VM gets a network interface (default true).
    pub enabled: bool,
    /// Destinations outside the VM subnet the guest may reach; empty allows none.
    pub egress_allow: Vec<Ipv4Cidr>,
}

/// `limits`: caps on the VMM process (cgroups and rlimits via the jailer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// cgroup `memory.max` in MiB; at least `memory_mib` + 16.
    pub memory_max_mib: Option<u64>,
    /// cgroup `cpu.max` as a percentage of one CPU, 1 to 3200.
    pub cpu_quota_pct: Option<u32>,
    /// cgroup `pids.max`, 16 to 65536.
    pub pids_max: Option<u32>,
    /// RLIMIT_NOFILE, 16 to 1048576.
    pub open_files: Option<u64>,
}

/// One problem with a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Where: field names joined by `.`, array indices as `[i]` ("network.egress_allow[2]").
    /// Empty for the document as a whole.
    pub path: String,
    /// What is wrong, for a human.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Every problem found in a manifest, in document order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid manifest: {}", join(.0))]
pub struct ManifestErrors(Vec<FieldError>);

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ManifestErrors {
    /// A single problem.
    pub fn single(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ManifestErrors(vec![FieldError {
            path: path.into(),
            reason: reason.into(),
        }])
    }

    /// The problems.
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// Whether some problem is reported at exactly `path`.
    pub fn has_path(&self, path: &str) -> bool {
        self.0.iter().any(|e| e.path == path)
    }
}

impl Serialize for ManifestErrors {
    /// A JSON array of `{"path": ..., "reason": ...}`, for an API error body.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl IntoIterator for ManifestErrors {
    type Item = FieldError;
    type IntoIter = std::vec::IntoIter<FieldError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl Manifest {
    /// Parses and validates a manifest. Refuses more than `MAX_MANIFEST_BYTES` before
    /// looking at the content. A syntax or type error stops parsing and is reported alone,
    /// with the path where it happened; otherwise every validation problem is reported.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestErrors> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestErrors::single(
                "",
                format!(
                    "manifest is {} bytes, more than the {MAX_MANIFEST_BYTES} allowed",
                    bytes.len()
                ),
            ));
        }
        validate::parse(bytes)
    }

    /// Checks that the host files the manifest names (kernel, initrd, rootfs image) exist
    /// and are regular files (symlinks are followed). Reports every missing one.
    pub fn check_files(&self) -> Result<(), ManifestErrors> {
        let mut errors = Vec::new();
        let mut files = vec![("kernel", self.kernel.as_path())];
        if let Some(initrd) = &self.initrd {
            files.push(("initrd", initrd.as_path()));
        }
        files.push(("rootfs.path", self.rootfs.path.as_path()));
        for (field, path) in files {
            if let Err(reason) = check_regular_file(path) {
                errors.push(FieldError {
                    path: field.to_string(),
                    reason,
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ManifestErrors(errors))
        }
    }

    /// The manifest as a JSON value in the schema it was parsed from, with defaults filled
    /// in and absent optional fields left out. `Manifest::parse` reads it back unchanged.
    pub fn to_value(&self) -> Value {
        let path = |p: &Path| Value::from(p.to_string_lossy().into_owned());
        let mut root = Map::new();
        root.insert("schema".into(), SCHEMA_VERSION.into());
        root.insert("name".into(), self.name.clone().into());
        root.insert("kernel".into(), path(&self.kernel));
        if let Some(initrd) = &self.initrd {
            root.insert("initrd".into(), path(initrd));
        }
        let mut rootfs = Map::new();
        rootfs.insert("path".into(), path(&self.rootfs.path));
        rootfs.insert("read_only".into(), self.rootfs.read_only.into());
        root.insert("rootfs".into(), rootfs.into());
        root.insert("vcpus".into(), self.vcpus.into());
        root.insert("memory_mib".into(), self.memory_mib.into());
        root.insert("entrypoint".into(), self.entrypoint.clone().into());
        root.insert("args".into(), self.args.clone().into());
        let env: Map<String, Value> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        root.insert("env".into(), env.into());
        root.insert("working_dir".into(), self.working_dir.clone().into());
        root.insert("agent_port".into(), self.agent_port.into());
        let mut network = Map::new();
        network.insert("enabled".into(), self.network.enabled.into());
        let egress: Vec<Value> = self
            .network
            .egress_allow
            .iter()
            .map(|c| Value::from(c.to_string()))
            .collect();
        network.insert("egress_allow".into(), egress.into());
        root.insert("network".into(), network.into());
        let mut limits = Map::new();
        let limit_fields = [
            ("memory_max_mib", self.limits.memory_max_mib),
            ("cpu_quota_pct", self.limits.cpu_quota_pct.map(u64::from)),
            ("pids_max", self.limits.pids_max.map(u64::from)),
            ("open_files", self.limits.open_files),
        ];
        for (key, value) in limit_fields {
            if let Some(value) = value {
                limits.insert(key.into(), value.into());
            }
        }
        root.insert("limits".into(), limits.into());
        if let Some(idle) = self.idle_hibernate_s {
            root.insert("idle_hibernate_s".into(), idle.into());
        }
        if self.template {
            root.insert("template".into(), true.into());
        }
        root.into()
    }

    /// Canonical JSON: `to_value` written compactly with every object's keys sorted by
    /// their UTF-8 bytes, so equal manifests give equal text whatever the key order, spacing
    /// or omitted defaults of the document they came from.
    pub fn canonical_json(&self) -> String {
        let mut out = String::new();
        write_canonical(&self.to_value(), &mut out);
        out
    }

    /// SHA-256 of `canonical_json`, as 64 lower-case hex digits. Equal hashes mean equal
    /// manifests, so a VM template built for one can be reused for the other.
    pub fn content_hash(&self) -> String {
        let digest = Sha256::digest(self.canonical_json().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Serialize for Manifest {
    /// The same document as `to_value`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn check_regular_file(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(meta) if meta.is_dir() => Err(format!(
            "{} is a directory, not a regular file",
            path.display()
        )),
        Ok(_) => Err(format!("{} is not a regular file", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{} does not exist", path.display()))
        }
        Err(err) => Err(format!("{}: {err}", path.display())),
    }
}
