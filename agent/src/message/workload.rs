//! Payloads of the workload frames: manifest delivery (0x40..=0x43) and log reads
//! (0x60, 0x61). The semantics are in the crate docs ("Manifest and workload", "Logs").

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{quote, validate_command};
use crate::{MAX_HOSTNAME, MAX_VM_ID};

/// The workload manifest exactly as the host sent it: a JSON object, kept as text.
///
/// The agent does not interpret it; it stores it for the workload to read. Keeping the text
/// (rather than a parsed tree) means the file the workload sees is byte for byte what the
/// orchestrator wrote, and a large manifest is not rebuilt node by node in the guest.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawManifest(Box<RawValue>);

impl RawManifest {
    /// Takes JSON text; it must be a single JSON object.
    pub fn from_json(text: String) -> Result<RawManifest, String> {
        let raw = RawValue::from_string(text).map_err(|e| format!("manifest: {e}"))?;
        let manifest = RawManifest(raw);
        manifest.check_object()?;
        Ok(manifest)
    }

    /// Serializes `value`, which must serialize to a JSON object.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<RawManifest, String> {
        let raw = serde_json::value::to_raw_value(value).map_err(|e| format!("manifest: {e}"))?;
        let manifest = RawManifest(raw);
        manifest.check_object()?;
        Ok(manifest)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    fn check_object(&self) -> Result<(), String> {
        // The decoder has already checked this is one well-formed JSON value, and a raw
        // value starts at its first token.
        if self.get().starts_with('{') {
            Ok(())
        } else {
            Err("manifest is not a JSON object".into())
        }
    }
}

impl PartialEq for RawManifest {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for RawManifest {}

impl fmt::Debug for RawManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A manifest may be up to 1 MiB: show its size, not its text.
        write!(f, "RawManifest({} bytes)", self.get().len())
    }
}

/// The program a manifest starts: `Exec`'s argv, env and cwd, under the same rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Program and arguments; the program is looked up in `PATH` if it has no `/`.
    pub argv: Vec<String>,
    /// Variables added to (or overriding) the base environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; `/` if absent.
    #[serde(default)]
    pub cwd: Option<String>,
}

impl WorkloadSpec {
    /// Checks argv, env and cwd with the very rules (and limits) of `Exec`.
    pub fn validate(&self) -> Result<(), String> {
        validate_command(&self.argv, &self.env, self.cwd.as_deref())
    }
}

/// `Manifest`: everything the guest needs to become this VM and start its workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDelivery {
    /// The orchestrator's id for this VM.
    pub vm_id: String,
    /// The guest's hostname.
    pub hostname: String,
    /// The program to start.
    pub workload: WorkloadSpec,
    /// The full manifest, opaque to the agent; written to `/run/manifest.json`.
    pub manifest: RawManifest,
}

impl ManifestDelivery {
    /// Checks every field against the limits in the crate docs. The message names the
    /// offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.vm_id.is_empty()
            || self.vm_id.len() > MAX_VM_ID
            || self.vm_id.chars().any(char::is_control)
        {
            return Err(format!("bad vm_id {}", quote(&self.vm_id)));
        }
        validate_hostname(&self.hostname)?;
        self.workload
            .validate()
            .map_err(|e| format!("workload: {e}"))?;
        self.manifest.check_object()
    }
}

/// A hostname: 1 to [`MAX_HOSTNAME`] bytes of ASCII letters, digits, `-`, `_` and `.`.
fn validate_hostname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_HOSTNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!("bad hostname {}", quote(name)))
    }
}

/// `ManifestOk`: the workload is running.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestOk {
    /// The workload's pid in the guest.
    pub pid: u32,
}

/// `WorkloadStatus`: how is the workload doing; no fields yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadStatus {}

/// Where the workload is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadState {
    /// No manifest has started one yet.
    #[default]
    None,
    /// It is running.
    Running,
    /// It has exited; `code` or `signal` says how.
    Exited,
    /// A state from a newer agent.
    #[serde(other)]
    Unknown,
}

/// `WorkloadStatusOk`: the state of the latest workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadStatusOk {
    /// Where it is.
    pub state: WorkloadState,
    /// Its pid, once one was started.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Exit code, after a normal exit.
    #[serde(default)]
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    #[serde(default)]
    pub signal: Option<i32>,
}

/// `Logs`: read the workload's captured output from an absolute offset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    /// Bytes of output since the first workload started, where reading begins.
    pub offset: u64,
    /// Most bytes wanted; the agent caps it at [`crate::MAX_LOG_READ`].
    pub max_bytes: u32,
}

/// `LogsOk`: which part of the log follows, in `Stdout` frames totalling `end - start`
/// bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsOk {
    /// Absolute offset of the first byte that follows.
    pub start: u64,
    /// Absolute offset just past the last byte that follows.
    pub end: u64,
    /// Whether output between the requested offset and `start` is no longer held.
    #[serde(default)]
    pub dropped: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MAX_EXEC_ARGS_BYTES, MAX_EXEC_ENTRIES};

    fn delivery(argv: &[&str]) -> ManifestDelivery {
        ManifestDelivery {
            vm_id: "vm-1".into(),
            hostname: "web-1".into(),
            workload: WorkloadSpec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..WorkloadSpec::default()
            },
            manifest: RawManifest::from_json(r#"{"name":"web","vcpus":2}"#.into()).unwrap(),
        }
    }

    #[test]
    fn raw_manifest_keeps_the_text_and_wants_an_object() {
        let text = r#"{"z":1,  "a":[true,null]}"#;
        assert_eq!(RawManifest::from_json(text.into()).unwrap().get(), text);
        for bad in ["[1]", "3", "\"s\"", "null", "{", "", "{} {}"] {
            assert!(RawManifest::from_json(bad.into()).is_err(), "{bad}");
        }
        let m = RawManifest::from_value(&serde_json::json!({"k": "v"})).unwrap();
        assert_eq!(m.get(), r#"{"k":"v"}"#);
        assert!(RawManifest::from_value(&[1, 2]).is_err());
        assert_eq!(format!("{m:?}"), "RawManifest(9 bytes)");
    }

    #[test]
    fn manifest_validation_reuses_the_exec_rules() {
        assert!(delivery(&["/bin/app", "--flag"]).validate().is_ok());
        // The same failures, with the same messages, as an Exec.
        for argv in [&[][..], &[""][..], &["a\0b"][..]] {
            let d = delivery(argv);
            let exec = crate::ExecStart {
                argv: d.workload.argv.clone(),
                ..crate::ExecStart::default()
            };
            let (ours, theirs) = (d.validate().unwrap_err(), exec.validate().unwrap_err());
            assert_eq!(ours, format!("workload: {theirs}"));
        }
        let mut d = delivery(&["app"]);
        d.workload.env = vec![("A=B".into(), "c".into())];
        assert!(d.validate().unwrap_err().contains("env name"));
        d.workload.env = (0..MAX_EXEC_ENTRIES)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        assert!(d.validate().unwrap_err().contains("entries"));
        d.workload.env = vec![("BIG".into(), "x".repeat(MAX_EXEC_ARGS_BYTES))];
        assert!(d.validate().unwrap_err().contains("bytes"));
        d.workload.env.clear();
        d.workload.cwd = Some(String::new());
        assert!(d.validate().unwrap_err().contains("cwd"));
    }

    #[test]
    fn manifest_validation_of_its_own_fields() {
        let mut d = delivery(&["app"]);
        for bad in ["", "has space", "a/b", "nul\0", "é"] {
            d.hostname = bad.into();
            assert!(d.validate().unwrap_err().contains("hostname"), "{bad:?}");
        }
        d.hostname = "h".repeat(MAX_HOSTNAME + 1);
        let msg = d.validate().unwrap_err();
        assert!(msg.contains("hostname") && msg.len() < 200, "{msg}");
        d.hostname = "h".repeat(MAX_HOSTNAME);
        assert!(d.validate().is_ok());
        d.hostname = "node-1.example_x".into();
        assert!(d.validate().is_ok());

        for bad in [String::new(), "x".repeat(MAX_VM_ID + 1), "a\nb".into()] {
            d.vm_id = bad;
            assert!(d.validate().unwrap_err().contains("vm_id"));
        }
        d.vm_id = "vm".into();
        // A manifest that decoded from the wire as something other than an object.
        d.manifest = serde_json::from_str("[1,2]").unwrap();
        assert!(d.validate().unwrap_err().contains("object"));
    }

    #[test]
    fn workload_status_json() {
        let ok = WorkloadStatusOk {
            state: WorkloadState::Exited,
            pid: Some(42),
            code: Some(3),
            signal: None,
        };
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"state":"exited","pid":42,"code":3,"signal":null}"#
        );
        let none: WorkloadStatusOk = serde_json::from_str(r#"{"state":"none"}"#).unwrap();
        assert_eq!(none, WorkloadStatusOk::default());
        let future: WorkloadStatusOk = serde_json::from_str(r#"{"state":"paused"}"#).unwrap();
        assert_eq!(future.state, WorkloadState::Unknown);
    }
}
