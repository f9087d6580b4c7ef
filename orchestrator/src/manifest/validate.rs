//! From JSON bytes to a `Manifest`. serde reads the document into loosely typed `Raw*`
//! structs (every field optional, numbers as u64) so that a missing or out-of-range field is
//! a validation problem, reported together with all the others, rather than the single
//! error serde would stop at. Only syntax and type errors stop early.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use serde_path_to_error::Segment;

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a manifest object")]
struct RawManifest {
    schema: Option<u64>,
    name: Option<String>,
    kernel: Option<String>,
    initrd: Option<String>,
    rootfs: Option<RawRootfs>,
    vcpus: Option<u64>,
    memory_mib: Option<u64>,
    entrypoint: Option<String>,
    args: Option<Vec<String>>,
    env: Option<RawEnv>,
    working_dir: Option<String>,
    agent_port: Option<u64>,
    network: Option<RawNetwork>,
    limits: Option<RawLimits>,
    idle_hibernate_s: Option<u64>,
    template: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
struct RawRootfs {
    path: Option<String>,
    read_only: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
struct RawNetwork {
    enabled: Option<bool>,
    egress_allow: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
struct RawLimits {
    memory_max_mib: Option<u64>,
    cpu_quota_pct: Option<u64>,
    pids_max: Option<u64>,
    open_files: Option<u64>,
}

/// `env` in document order. A JSON object may repeat a key and serde's maps keep the last
/// silently; here a repeat is an error, so what the operator reads is what runs.
struct RawEnv(Vec<(String, String)>);

impl<'de> Deserialize<'de> for RawEnv {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvVisitor;
        impl<'de> Visitor<'de> for EnvVisitor {
            type Value = RawEnv;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEnv, A::Error> {
                let mut seen = HashSet::new();
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format_args!(
                            "duplicate key {}",
                            quote_bounded(&key)
                        )));
                    }
                    entries.push((key, value));
                }
                Ok(RawEnv(entries))
            }
        }
        deserializer.deserialize_map(EnvVisitor)
    }
}

/// Reads the document. The caller has already checked its size.
///
/// Two passes. The first reads a `serde_json::Value`: it catches syntax errors and trailing
/// characters, and checks that every struct is written as a JSON object (serde would also
/// take a struct written as an array of its fields). The second reads the `Raw*` structs
/// straight from the bytes, so repeated keys are still seen, with the path of any type
/// error tracked by `serde_path_to_error`.
pub(super) fn parse(bytes: &[u8]) -> Result<Manifest, ManifestErrors> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|err| ManifestErrors::single("", format!("not valid JSON: {err}")))?;
    check_objects(&value)?;
    drop(value);

    let mut de = serde_json::Deserializer::from_slice(bytes);
    let raw: RawManifest = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = path_string(err.path());
        let reason = err.into_inner().to_string();
        ManifestErrors::single(unknown_field_path(path, &reason), reason)
    })?;
    raw.validate()
}

/// The document and its `rootfs`, `network` and `limits` must be objects.
fn check_objects(value: &Value) -> Result<(), ManifestErrors> {
    let Value::Object(root) = value else {
        return Err(ManifestErrors::single(
            "",
            format!("expected a JSON object, found {}", json_kind(value)),
        ));
    };
    for key in ["rootfs", "network", "limits"] {
        if let Some(inner @ Value::Array(_)) = root.get(key) {
            return Err(ManifestErrors::single(
                key,
                format!("expected an object, found {}", json_kind(inner)),
            ));
        }
    }
    Ok(())
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_path_to_error's path as `a.b[3].c`; empty for the root.
fn path_string(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&key_in_path(key));
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// Makes sure an unknown field's path ends with the field itself, so
/// `{"rootfs": {"size": 1}}` reports `rootfs.size`, not `rootfs`.
fn unknown_field_path(path: String, message: &str) -> String {
    let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| key_in_path(field))
    else {
        return path;
    };
    if path.rsplit('.').next() == Some(field.as_str()) {
        path
    } else if path.is_empty() {
        field
    } else {
        format!("{path}.{field}")
    }
}

/// A key as a path segment: as is when it is a plain name, else quoted and cut short, so a
/// hostile 100 KiB key cannot bloat the error.
fn key_in_path(key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= MAX_ENV_KEY_BYTES
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        key.to_string()
    } else {
        format!("[{}]", quote_bounded(key))
    }
}

/// `s` as a quoted string of at most 64 characters.
fn quote_bounded(s: &str) -> String {
    const SHOWN: usize = 64;
    if s.chars().count() <= SHOWN {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(SHOWN).collect();
        format!("{head:?}...")
    }
}

/// Collects problems, keeping at most `MAX_REPORTED_ERRORS`.
#[derive(Default)]
struct Problems {
    list: Vec<FieldError>,
    dropped: usize,
}

impl Problems {
    fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        if self.list.len() < MAX_REPORTED_ERRORS {
            self.list.push(FieldError {
                path: path.into(),
                reason: reason.into(),
            });
        } else {
            self.dropped += 1;
        }
    }

    fn into_errors(mut self) -> ManifestErrors {
        if self.dropped > 0 {
            self.list.push(FieldError {
                path: String::new(),
                reason: format!("and {} more problems", self.dropped),
            });
        }
        if self.list.is_empty() {
            // Only reached if a required field was absent without a problem being added,
            // which the checks below rule out; keep the "never empty" promise anyway.
            self.list.push(FieldError {
                path: String::new(),
                reason: "invalid manifest".into(),
            });
        }
        ManifestErrors(self.list)
    }

    /// A required field: reports it when absent.
    fn required<T>(&mut self, path: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.add(path, "required field is missing");
        }
        value
    }

    /// A number within `min..=max`; `None` when absent or out of range (reported).
    fn ranged(&mut self, path: &str, value: Option<u64>, min: u64, max: u64) -> Option<u64> {
        match value {
            Some(v) if !(min..=max).contains(&v) => {
                self.add(path, format!("{v} is outside {min}..={max}"));
                None
            }
            other => other,
        }
    }

    /// A string of at most `max` bytes without NUL (it ends up in a C string).
    fn string(&mut self, path: &str, value: &str, max: usize) -> bool {
        if value.len() > max {
            self.add(path, format!("{} bytes, more than {max}", value.len()));
            false
        } else if value.contains('\0') {
            self.add(path, "contains a NUL character");
            false
        } else {
            true
        }
    }

    /// An absolute path.
    fn absolute(&mut self, path: &str, value: &str) -> bool {
        if !self.string(path, value, MAX_PATH_BYTES) {
            false
        } else if !value.starts_with('/') {
            self.add(
                path,
                format!("{} is not an absolute path", quote_bounded(value)),
            );
            false
        } else {
            true
        }
    }
}

impl RawManifest {
    fn validate(self) -> Result<Manifest, ManifestErrors> {
        let mut p = Problems::default();

        match p.required("schema", self.schema) {
            Some(v) if v != u64::from(SCHEMA_VERSION) => p.add(
                "schema",
                format!(
                    "schema version {v} is not supported; this orchestrator reads version \
                     {SCHEMA_VERSION}"
                ),
            ),
            _ => {}
        }

        let name = p.required("name", self.name).filter(|name| {
            let ok = (1..=MAX_NAME_LEN).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-');
            if !ok {
                p.add(
                    "name",
                    format!(
                        "{} must be 1 to {MAX_NAME_LEN} of a-z, 0-9 and '-', not starting with '-'",
                        quote_bounded(name)
                    ),
                );
            }
            ok
        });

        let kernel = p
            .required("kernel", self.kernel)
            .filter(|k| p.absolute("kernel", k));
        let initrd = self.initrd.filter(|i| p.absolute("initrd", i));

        let rootfs = p.required("rootfs", self.rootfs).and_then(|r| {
            let path = p
                .required("rootfs.path", r.path)
                .filter(|path| p.absolute("rootfs.path", path))?;
            Some(Rootfs {
                path: PathBuf::from(path),
                read_only: r.read_only.unwrap_or(true),
            })
        });

        let vcpus = p.ranged("vcpus", self.vcpus, 1, MAX_VCPUS.into());
        let memory_mib = p.ranged(
            "memory_mib",
            self.memory_mib,
            MIN_MEMORY_MIB.into(),
            MAX_MEMORY_MIB.into(),
        );

        let entrypoint = p.required("entrypoint", self.entrypoint).filter(|e| {
            if e.is_empty() {
                p.add("entrypoint", "must not be empty");
                false
            } else {
                p.string("entrypoint", e, MAX_PATH_BYTES)
            }
        });

        let args = self.args.unwrap_or_default();
        if args.len() > MAX_ARGS {
            p.add(
                "args",
                format!("{} entries, more than {MAX_ARGS}", args.len()),
            );
        }
        for (i, arg) in args.iter().enumerate() {
            p.string(&format!("args[{i}]"), arg, MAX_ARG_BYTES);
        }

        let env_entries = self.env.map(|e| e.0).unwrap_or_default();
        if env_entries.len() > MAX_ENV_VARS {
            p.add(
                "env",
                format!("{} entries, more than {MAX_ENV_VARS}", env_entries.len()),
            );
        }
        for (key, value) in &env_entries {
            let path = format!("env.{}", key_in_path(key));
            if !is_env_name(key) {
                p.add(
                    &path,
                    format!(
                        "{} is not a valid variable name: 1 to {MAX_ENV_KEY_BYTES} of A-Z, \
                         a-z, 0-9 and '_', not starting with a digit",
                        quote_bounded(key)
                    ),
                );
            } else if key.len() + 1 + value.len() > MAX_ARG_BYTES {
                p.add(
                    &path,
                    format!(
                        "{}=VALUE is {} bytes, more than {MAX_ARG_BYTES}",
                        key,
                        key.len() + 1 + value.len()
                    ),
                );
            } else if value.contains('\0') {
                p.add(&path, "value contains a NUL character");
            }
        }
        let env: BTreeMap<String, String> = env_entries.into_iter().collect();

        let working_dir = self.working_dir.unwrap_or_else(|| "/".to_string());
        p.absolute("working_dir", &working_dir);

        // vsock port u32::MAX is VMADDR_PORT_ANY, not a port one can listen on.
        let agent_port = p.ranged("agent_port", self.agent_port, 1, u64::from(u32::MAX - 1));

        let raw_network = self.network.unwrap_or(RawNetwork {
            enabled: None,
            egress_allow: None,
        });
        let enabled = raw_network.enabled.unwrap_or(true);
        let egress_text = raw_network.egress_allow.unwrap_or_default();
        if egress_text.len() > MAX_EGRESS_RULES {
            p.add(
                "network.egress_allow",
                format!(
                    "{} entries, more than {MAX_EGRESS_RULES}",
                    egress_text.len()
                ),
            );
        }
        if !enabled && !egress_text.is_empty() {
            p.add(
                "network.egress_allow",
                "must be empty when network.enabled is false",
            );
        }
        let mut egress_allow = Vec::with_capacity(egress_text.len());
        for (i, text) in egress_text.iter().enumerate() {
            match text.parse::<Ipv4Cidr>() {
                Ok(cidr) => egress_allow.push(cidr),
                Err(err) => p.add(format!("network.egress_allow[{i}]"), err.to_string()),
            }
        }

        let raw_limits = self.limits.unwrap_or(RawLimits {
            memory_max_mib: None,
            cpu_quota_pct: None,
            pids_max: None,
            open_files: None,
        });
        let memory_max_mib = match (raw_limits.memory_max_mib, memory_mib) {
            (Some(max), Some(mem)) if max < mem + VMM_MEMORY_HEADROOM_MIB => {
                p.add(
                    "limits.memory_max_mib",
                    format!(
                        "{max} is less than memory_mib ({mem}) + {VMM_MEMORY_HEADROOM_MIB} \
                         for the VMM itself"
                    ),
                );
                None
            }
            (Some(max), _) if max > MAX_MEMORY_MAX_MIB => {
                p.add(
                    "limits.memory_max_mib",
                    format!("{max} is more than {MAX_MEMORY_MAX_MIB}"),
                );
                None
            }
            (max, _) => max,
        };
        let cpu_quota_pct = p.ranged(
            "limits.cpu_quota_pct",
            raw_limits.cpu_quota_pct,
            CPU_QUOTA_PCT_RANGE.0.into(),
            CPU_QUOTA_PCT_RANGE.1.into(),
        );
        let pids_max = p.ranged(
            "limits.pids_max",
            raw_limits.pids_max,
            PIDS_MAX_RANGE.0.into(),
            PIDS_MAX_RANGE.1.into(),
        );
        let open_files = p.ranged(
            "limits.open_files",
            raw_limits.open_files,
            OPEN_FILES_RANGE.0,
            OPEN_FILES_RANGE.1,
        );

        let idle_hibernate_s = match self.idle_hibernate_s {
            Some(0) => {
                p.add(
                    "idle_hibernate_s",
                    "must be at least 1; leave it out to never hibernate",
                );
                None
            }
            other => other,
        };

        if !p.list.is_empty() || p.dropped > 0 {
            return Err(p.into_errors());
        }
        // Every check passed, so every required value is present and every number is in
        // range; a None or failed conversion here would be a bug in the checks above.
        let (Some(name), Some(kernel), Some(rootfs), Some(entrypoint)) =
            (name, kernel, rootfs, entrypoint)
        else {
            return Err(p.into_errors());
        };
        let narrow = |v: Option<u64>, default: u32| -> Option<u32> {
            v.map_or(Some(default), |v| u32::try_from(v).ok())
        };
        let (Some(vcpus), Some(memory_mib), Some(agent_port)) = (
            narrow(vcpus, DEFAULT_VCPUS.into()).and_then(|v| u8::try_from(v).ok()),
            narrow(memory_mib, DEFAULT_MEMORY_MIB),
            narrow(agent_port, DEFAULT_AGENT_PORT),
        ) else {
            return Err(p.into_errors());
        };
        let limits = Limits {
            memory_max_mib,
            cpu_quota_pct: cpu_quota_pct.and_then(|v| u32::try_from(v).ok()),
            pids_max: pids_max.and_then(|v| u32::try_from(v).ok()),
            open_files,
        };

        Ok(Manifest {
            name,
            kernel: PathBuf::from(kernel),
            initrd: initrd.map(PathBuf::from),
            rootfs,
            vcpus,
            memory_mib,
            entrypoint,
            args,
            env,
            working_dir,
            agent_port,
            network: Network {
                enabled,
                egress_allow,
            },
            limits,
            idle_hibernate_s,
            template: self.template.unwrap_or(false),
        })
    }
}

/// POSIX's portable environment variable name: a letter or `_`, then letters, digits, `_`.
fn is_env_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    first_ok
        && key.len() <= MAX_ENV_KEY_BYTES
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
