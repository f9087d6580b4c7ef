//! Typed messages: one per frame type, with their JSON payloads. Both ends decode what the
//! other sends through [`Message::from_frame`], so a malformed payload is an error value,
//! never a panic.

use std::fmt;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::frame::{read_frame, write_frame, Frame, FrameError, FrameType};
use crate::{MAX_EXEC_ARGS_BYTES, MAX_EXEC_CWD, MAX_EXEC_ENTRIES};

mod resync;
mod workload;

pub use resync::{ResyncReply, ResyncRequest, RESYNC_SEED_LEN};
pub use workload::{
    LogsOk, LogsRequest, ManifestDelivery, ManifestOk, RawManifest, WorkloadSpec, WorkloadState,
    WorkloadStatus, WorkloadStatusOk,
};

/// `Hello`: the host's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the host speaks.
    pub version: u32,
}

/// `HelloOk`: the agent accepted the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    /// The protocol version used on this connection.
    pub version: u32,
    /// The agent's software version (guest-init's package version).
    pub agent_version: String,
}

/// What went wrong, in an `Error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or unexpected frame; the connection closes.
    Protocol,
    /// The host's protocol version is not spoken here; the connection closes.
    Version,
    /// A frame or an exec's stdin over its limit; the connection closes.
    TooLarge,
    /// A reserved frame type; the connection closes.
    Unsupported,
    /// Too many connections at once; the connection closes.
    Busy,
    /// The request is invalid (see the limits in the crate docs), or a `Manifest` came
    /// while a workload runs; the connection stays open.
    BadRequest,
    /// The program could not be started; the connection stays open.
    ExecFailed,
    /// The agent failed for its own reasons; the connection stays open.
    Internal,
    /// A code from a newer agent.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Protocol => "protocol",
            ErrorCode::Version => "version",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Busy => "busy",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::ExecFailed => "exec_failed",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// Whether the agent closes the connection after sending this code.
    pub fn closes_connection(self) -> bool {
        !matches!(
            self,
            ErrorCode::BadRequest | ErrorCode::ExecFailed | ErrorCode::Internal
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Error`: a request failed or the connection is about to close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Machine-readable kind.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl ErrorInfo {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorInfo {
            code,
            message: message.into(),
        }
    }
}

/// `Health`: liveness probe; no fields yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {}

/// `HealthOk`: the agent is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthOk {
    /// The agent's software version.
    pub agent_version: String,
    /// Milliseconds since guest-init started.
    pub uptime_ms: u64,
}

/// `Exec`: run a program. Stdin, when present, follows in `Stdin` frames.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStart {
    /// Program and arguments; the program is looked up in `PATH` if it has no `/`.
    pub argv: Vec<String>,
    /// Variables added to (or overriding) the base environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; `/` if absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether `Stdin` frames follow, ended by an empty one. Without, stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the program's process group (SIGKILL) after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// At most this many characters of a peer's string go into an error message.
const QUOTE_MAX: usize = 64;

/// A peer-supplied string, shortened for an error message.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_MAX) {
        Some((cut, _)) => format!("{:?}...", s.get(..cut).unwrap_or_default()),
        None => format!("{s:?}"),
    }
}

impl ExecStart {
    /// Checks the request against the limits in the crate docs. The message names the
    /// offending field.
    pub fn validate(&self) -> Result<(), String> {
        validate_command(&self.argv, &self.env, self.cwd.as_deref())
    }
}

/// The checks an `Exec` and a workload share: argv, env and cwd against the limits in the
/// crate docs ("Exec"). The message names the offending field.
fn validate_command(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
) -> Result<(), String> {
    let Some(program) = argv.first() else {
        return Err("argv is empty".into());
    };
    if program.is_empty() {
        return Err("argv[0] is empty".into());
    }
    let entries = argv.len().saturating_add(env.len());
    if entries > MAX_EXEC_ENTRIES {
        return Err(format!(
            "{entries} argv and env entries, over the limit of {MAX_EXEC_ENTRIES}"
        ));
    }
    let mut total: usize = 0;
    for arg in argv {
        if arg.contains('\0') {
            return Err(format!("argv entry {} has a NUL byte", quote(arg)));
        }
        total = total.saturating_add(arg.len()).saturating_add(1);
    }
    for (name, value) in env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(format!("bad env name {}", quote(name)));
        }
        if value.contains('\0') {
            return Err(format!("env {} has a NUL byte", quote(name)));
        }
        total = total
            .saturating_add(name.len())
            .saturating_add(value.len())
            .saturating_add(2);
    }
    if total > MAX_EXEC_ARGS_BYTES {
        return Err(format!(
            "argv and env take {total} bytes, over the limit of {MAX_EXEC_ARGS_BYTES}"
        ));
    }
    if let Some(cwd) = cwd {
        if cwd.is_empty() || cwd.len() > MAX_EXEC_CWD || cwd.contains('\0') {
            return Err(format!("bad cwd {}", quote(cwd)));
        }
    }
    Ok(())
}

/// `Exit`: how the program ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, for a normal exit.
    pub code: Option<i32>,
    /// Signal number, when a signal ended the program.
    pub signal: Option<i32>,
    /// Whether the agent killed it because `timeout_ms` passed.
    #[serde(default)]
    pub timed_out: bool,
}

/// `Shutdown`: end the VM; no fields yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {}

/// `ShutdownOk`: the VM is about to end; no fields yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownOk {}

/// One frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloOk`].
    HelloOk(HelloOk),
    /// See [`ErrorInfo`].
    Error(ErrorInfo),
    /// See [`Health`].
    Health(Health),
    /// See [`HealthOk`].
    HealthOk(HealthOk),
    /// See [`ExecStart`].
    Exec(ExecStart),
    /// A chunk of stdin; empty ends it.
    Stdin(Vec<u8>),
    /// A chunk of stdout.
    Stdout(Vec<u8>),
    /// A chunk of stderr.
    Stderr(Vec<u8>),
    /// See [`ExitInfo`].
    Exit(ExitInfo),
    /// See [`Shutdown`].
    Shutdown(Shutdown),
    /// See [`ShutdownOk`].
    ShutdownOk(ShutdownOk),
    /// See [`ManifestDelivery`].
    Manifest(ManifestDelivery),
    /// See [`ManifestOk`].
    ManifestOk(ManifestOk),
    /// See [`WorkloadStatus`].
    WorkloadStatus(WorkloadStatus),
    /// See [`WorkloadStatusOk`].
    WorkloadStatusOk(WorkloadStatusOk),
    /// See [`ResyncRequest`].
    Resync(ResyncRequest),
    /// See [`ResyncReply`].
    ResyncOk(ResyncReply),
    /// See [`LogsRequest`].
    Logs(LogsRequest),
    /// See [`LogsOk`].
    LogsOk(LogsOk),
}

fn json<T: Serialize>(kind: FrameType, value: &T) -> Result<Frame, FrameError> {
    let payload = serde_json::to_vec(value).map_err(|e| FrameError::BadPayload {
        kind,
        reason: e.to_string(),
    })?;
    Ok(Frame { kind, payload })
}

fn from_json<T: serde::de::DeserializeOwned>(frame: &Frame) -> Result<T, FrameError> {
    serde_json::from_slice(&frame.payload).map_err(|e| FrameError::BadPayload {
        kind: frame.kind,
        reason: e.to_string(),
    })
}

impl Message {
    /// The frame type this message travels in.
    pub fn kind(&self) -> FrameType {
        match self {
            Message::Hello(_) => FrameType::Hello,
            Message::HelloOk(_) => FrameType::HelloOk,
            Message::Error(_) => FrameType::Error,
            Message::Health(_) => FrameType::Health,
            Message::HealthOk(_) => FrameType::HealthOk,
            Message::Exec(_) => FrameType::Exec,
            Message::Stdin(_) => FrameType::Stdin,
            Message::Stdout(_) => FrameType::Stdout,
            Message::Stderr(_) => FrameType::Stderr,
            Message::Exit(_) => FrameType::Exit,
            Message::Shutdown(_) => FrameType::Shutdown,
            Message::ShutdownOk(_) => FrameType::ShutdownOk,
            Message::Manifest(_) => FrameType::Manifest,
            Message::ManifestOk(_) => FrameType::ManifestOk,
            Message::WorkloadStatus(_) => FrameType::WorkloadStatus,
            Message::WorkloadStatusOk(_) => FrameType::WorkloadStatusOk,
            Message::Resync(_) => FrameType::Resync,
            Message::ResyncOk(_) => FrameType::ResyncOk,
            Message::Logs(_) => FrameType::Logs,
            Message::LogsOk(_) => FrameType::LogsOk,
        }
    }

    /// Encodes the payload. The size limit is checked when the frame is written.
    pub fn to_frame(&self) -> Result<Frame, FrameError> {
        let kind = self.kind();
        match self {
            Message::Hello(m) => json(kind, m),
            Message::HelloOk(m) => json(kind, m),
            Message::Error(m) => json(kind, m),
            Message::Health(m) => json(kind, m),
            Message::HealthOk(m) => json(kind, m),
            Message::Exec(m) => json(kind, m),
            Message::Exit(m) => json(kind, m),
            Message::Shutdown(m) => json(kind, m),
            Message::ShutdownOk(m) => json(kind, m),
            Message::Manifest(m) => json(kind, m),
            Message::ManifestOk(m) => json(kind, m),
            Message::WorkloadStatus(m) => json(kind, m),
            Message::WorkloadStatusOk(m) => json(kind, m),
            Message::Resync(m) => json(kind, m),
            Message::ResyncOk(m) => json(kind, m),
            Message::Logs(m) => json(kind, m),
            Message::LogsOk(m) => json(kind, m),
            Message::Stdin(d) | Message::Stdout(d) | Message::Stderr(d) => Ok(Frame {
                kind,
                payload: d.clone(),
            }),
        }
    }

    /// Decodes a frame's payload according to its type.
    pub fn from_frame(frame: Frame) -> Result<Message, FrameError> {
        Ok(match frame.kind {
            FrameType::Hello => Message::Hello(from_json(&frame)?),
            FrameType::HelloOk => Message::HelloOk(from_json(&frame)?),
            FrameType::Error => Message::Error(from_json(&frame)?),
            FrameType::Health => Message::Health(from_json(&frame)?),
            FrameType::HealthOk => Message::HealthOk(from_json(&frame)?),
            FrameType::Exec => Message::Exec(from_json(&frame)?),
            FrameType::Exit => Message::Exit(from_json(&frame)?),
            FrameType::Shutdown => Message::Shutdown(from_json(&frame)?),
            FrameType::ShutdownOk => Message::ShutdownOk(from_json(&frame)?),
            FrameType::Manifest => Message::Manifest(from_json(&frame)?),
            FrameType::ManifestOk => Message::ManifestOk(from_json(&frame)?),
            FrameType::WorkloadStatus => Message::WorkloadStatus(from_json(&frame)?),
            FrameType::WorkloadStatusOk => Message::WorkloadStatusOk(from_json(&frame)?),
            FrameType::Resync => Message::Resync(from_json(&frame)?),
            FrameType::ResyncOk => Message::ResyncOk(from_json(&frame)?),
            FrameType::Logs => Message::Logs(from_json(&frame)?),
            FrameType::LogsOk => Message::LogsOk(from_json(&frame)?),
            FrameType::Stdin => Message::Stdin(frame.payload),
            FrameType::Stdout => Message::Stdout(frame.payload),
            FrameType::Stderr => Message::Stderr(frame.payload),
        })
    }
}

/// Reads and decodes one message.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Message, FrameError> {
    Message::from_frame(read_frame(r)?)
}

/// Encodes and writes one message (one `write_all`, then a flush).
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message) -> Result<(), FrameError> {
    match msg {
        // Data frames go out without the copy `to_frame` makes.
        Message::Stdin(d) | Message::Stdout(d) | Message::Stderr(d) => {
            write_frame(w, msg.kind(), d)
        }
        _ => {
            let frame = msg.to_frame()?;
            write_frame(w, frame.kind, &frame.payload)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;
    use std::io::Cursor;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello { version: 1 }),
            Message::HelloOk(HelloOk {
                version: 1,
                agent_version: "0.1.0".into(),
            }),
            Message::Error(ErrorInfo::new(ErrorCode::ExecFailed, "no such file")),
            Message::Health(Health {}),
            Message::HealthOk(HealthOk {
                agent_version: "0.1.0".into(),
                uptime_ms: 42,
            }),
            Message::Exec(ExecStart {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b c".into())],
                cwd: Some("/tmp".into()),
                stdin: true,
                timeout_ms: Some(5000),
            }),
            Message::Stdin(b"in".to_vec()),
            Message::Stdin(Vec::new()),
            Message::Stdout(vec![0, 255, 10]),
            Message::Stderr(b"err\n".to_vec()),
            Message::Exit(ExitInfo {
                code: None,
                signal: Some(9),
                timed_out: true,
            }),
            Message::Shutdown(Shutdown {}),
            Message::ShutdownOk(ShutdownOk {}),
            Message::Manifest(ManifestDelivery {
                vm_id: "vm-7".into(),
                hostname: "web-7".into(),
                workload: WorkloadSpec {
                    argv: vec!["/bin/sh".into(), "-c".into(), "exec app".into()],
                    env: vec![("K".into(), "V".into())],
                    cwd: Some("/srv".into()),
                },
                manifest: RawManifest::from_json(r#"{"schema":1,"env":{"K":"V"}}"#.into()).unwrap(),
            }),
            Message::ManifestOk(ManifestOk { pid: 17 }),
            Message::WorkloadStatus(WorkloadStatus {}),
            Message::WorkloadStatusOk(WorkloadStatusOk {
                state: WorkloadState::Running,
                pid: Some(17),
                code: None,
                signal: None,
            }),
            Message::Resync(ResyncRequest::new(
                1_700_000_000_000_000_000,
                &[0x5a; 32],
                Some("clone-1".into()),
            )),
            Message::ResyncOk(ResyncReply {
                clock_step_ms: 86_400_000,
                entropy_credited: true,
                hostname: "clone-1".into(),
            }),
            Message::Logs(LogsRequest {
                offset: 1 << 40,
                max_bytes: u32::MAX,
            }),
            Message::LogsOk(LogsOk {
                start: 5,
                end: 9,
                dropped: true,
            }),
        ]
    }

    #[test]
    fn messages_round_trip_through_a_stream() {
        let mut wire = Vec::new();
        for m in samples() {
            write_message(&mut wire, &m).unwrap();
        }
        let mut r = Cursor::new(wire);
        for m in samples() {
            assert_eq!(read_message(&mut r).unwrap(), m);
        }
        assert!(matches!(read_message(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn json_payloads_are_as_documented() {
        let f = Message::Hello(Hello { version: 1 }).to_frame().unwrap();
        assert_eq!(f.payload, br#"{"version":1}"#);
        let f = Message::Health(Health {}).to_frame().unwrap();
        assert_eq!(f.payload, b"{}");
        let f = Message::Error(ErrorInfo::new(ErrorCode::BadRequest, "x"))
            .to_frame()
            .unwrap();
        assert_eq!(f.payload, br#"{"code":"bad_request","message":"x"}"#);
        let f = Message::Exec(ExecStart {
            argv: vec!["true".into()],
            env: vec![("K".into(), "V".into())],
            ..ExecStart::default()
        })
        .to_frame()
        .unwrap();
        assert_eq!(
            f.payload,
            br#"{"argv":["true"],"env":[["K","V"]],"cwd":null,"stdin":false,"timeout_ms":null}"#
        );
        let f = Message::ManifestOk(ManifestOk { pid: 5 })
            .to_frame()
            .unwrap();
        assert_eq!(f.payload, br#"{"pid":5}"#);
        let f = Message::Logs(LogsRequest {
            offset: 10,
            max_bytes: 20,
        })
        .to_frame()
        .unwrap();
        assert_eq!(f.payload, br#"{"offset":10,"max_bytes":20}"#);
        let f = Message::LogsOk(LogsOk {
            start: 1,
            end: 2,
            dropped: false,
        })
        .to_frame()
        .unwrap();
        assert_eq!(f.payload, br#"{"start":1,"end":2,"dropped":false}"#);
        let f = Message::WorkloadStatus(WorkloadStatus {})
            .to_frame()
            .unwrap();
        assert_eq!(f.payload, b"{}");
    }

    #[test]
    fn manifest_payload_carries_the_manifest_verbatim() {
        // Key order and spacing survive both ways: the agent writes exactly these bytes.
        let text = r#"{"zeta": 1, "alpha": {"nested": [1, 2]}}"#;
        let payload = format!(
            r#"{{"vm_id":"v","hostname":"h","workload":{{"argv":["app"],"env":[["A","b"]],"cwd":"/"}},"manifest":{text},"extra":0}}"#
        );
        let frame = Frame {
            kind: FrameType::Manifest,
            payload: payload.into_bytes(),
        };
        let Message::Manifest(d) = Message::from_frame(frame).unwrap() else {
            panic!("not a manifest");
        };
        assert_eq!(d.manifest.get(), text);
        assert_eq!(d.workload.env, [("A".to_string(), "b".to_string())]);
        assert_eq!(d.workload.cwd.as_deref(), Some("/"));
        let again = Message::Manifest(d).to_frame().unwrap();
        let again = String::from_utf8(again.payload).unwrap();
        assert!(
            again.ends_with(&format!(r#""manifest":{text}}}"#)),
            "{again}"
        );
    }

    #[test]
    fn a_manifest_near_the_control_limit_round_trips() {
        // >= 64 KiB is the requirement; go close to the 1 MiB frame limit.
        let big: String = (0..60_000).map(|i| format!(r#""k{i}":{i},"#)).collect();
        let text = format!("{{{}\"end\":0}}", big);
        let m = Message::Manifest(ManifestDelivery {
            vm_id: "v".into(),
            hostname: "h".into(),
            workload: WorkloadSpec {
                argv: vec!["app".into()],
                ..WorkloadSpec::default()
            },
            manifest: RawManifest::from_json(text).unwrap(),
        });
        let mut wire = Vec::new();
        write_message(&mut wire, &m).unwrap();
        assert!(wire.len() > 512 * 1024 && wire.len() <= crate::MAX_CONTROL_PAYLOAD + 8);
        assert_eq!(read_message(&mut Cursor::new(wire)).unwrap(), m);
    }

    #[test]
    fn optional_fields_may_be_omitted_and_unknown_ones_are_ignored() {
        let frame = Frame {
            kind: FrameType::Exec,
            payload: br#"{"argv":["ls"],"future":{"x":1}}"#.to_vec(),
        };
        let Message::Exec(start) = Message::from_frame(frame).unwrap() else {
            panic!("not an exec");
        };
        assert_eq!(start.argv, ["ls"]);
        assert!(start.env.is_empty() && start.cwd.is_none() && !start.stdin);
        let frame = Frame {
            kind: FrameType::Error,
            payload: br#"{"code":"from_the_future","message":"m"}"#.to_vec(),
        };
        let Message::Error(e) = Message::from_frame(frame).unwrap() else {
            panic!("not an error");
        };
        assert_eq!(e.code, ErrorCode::Unknown);
    }

    #[test]
    fn bad_json_is_an_error_not_a_panic() {
        for payload in [
            &b""[..],
            b"null",
            b"{",
            b"[]",
            br#"{"version":-1}"#,
            br#"{"version":4294967296}"#,
            b"\xff\xfe",
            br#"{"argv":"ls"}"#,
        ] {
            for kind in [
                FrameType::Hello,
                FrameType::Exec,
                FrameType::Exit,
                FrameType::Manifest,
                FrameType::WorkloadStatusOk,
                FrameType::Resync,
                FrameType::ResyncOk,
                FrameType::Logs,
                FrameType::LogsOk,
            ] {
                let err = Message::from_frame(Frame {
                    kind,
                    payload: payload.to_vec(),
                });
                // `{"argv":...}` style payloads are valid Exit objects (all optional),
                // everything else must fail cleanly.
                if let Err(e) = err {
                    assert!(matches!(e, FrameError::BadPayload { .. }), "{e}");
                }
            }
        }
        let bytes = encode_frame(FrameType::Hello, b"{}").unwrap();
        assert!(matches!(
            read_message(&mut Cursor::new(bytes)),
            Err(FrameError::BadPayload {
                kind: FrameType::Hello,
                ..
            })
        ));
    }

    #[test]
    fn random_mutations_of_valid_frames_never_panic() {
        let mut rng = crate::frame::tests::XorShift(0x2545_f491_4f6c_dd1d);
        let frames: Vec<Vec<u8>> = samples()
            .iter()
            .map(|m| {
                let f = m.to_frame().unwrap();
                encode_frame(f.kind, &f.payload).unwrap()
            })
            .collect();
        for _ in 0..20_000 {
            let mut bytes = frames[rng.below(frames.len())].clone();
            for _ in 0..=rng.below(4) {
                let i = rng.below(bytes.len());
                bytes[i] = rng.byte();
            }
            let _ = read_message(&mut Cursor::new(&bytes));
        }
    }

    fn exec(argv: &[&str]) -> ExecStart {
        ExecStart {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..ExecStart::default()
        }
    }

    #[test]
    fn exec_validation_limits() {
        assert!(exec(&["true"]).validate().is_ok());
        assert!(exec(&[]).validate().unwrap_err().contains("argv"));
        assert!(exec(&[""]).validate().unwrap_err().contains("argv[0]"));
        assert!(exec(&["a\0b"]).validate().unwrap_err().contains("NUL"));

        let mut e = exec(&["true"]);
        e.env = vec![("A=B".into(), "c".into())];
        assert!(e.validate().unwrap_err().contains("env name"));
        e.env = vec![(String::new(), "c".into())];
        assert!(e.validate().is_err());
        e.env = vec![("A".into(), "c\0".into())];
        assert!(e.validate().is_err());

        let mut e = exec(&["true"]);
        e.argv.push("x".repeat(MAX_EXEC_ARGS_BYTES));
        let msg = e.validate().unwrap_err();
        assert!(msg.contains("bytes"), "{msg}");

        let mut e = exec(&["true"]);
        e.env = (0..MAX_EXEC_ENTRIES)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        assert!(e.validate().unwrap_err().contains("entries"));

        let mut e = exec(&["true"]);
        e.cwd = Some(String::new());
        assert!(e.validate().unwrap_err().contains("cwd"));
        e.cwd = Some("/".repeat(MAX_EXEC_CWD + 1));
        let msg = e.validate().unwrap_err();
        assert!(
            msg.len() < 200,
            "error message quotes peer data unbounded: {msg}"
        );
    }

    #[test]
    fn error_codes_on_the_wire() {
        for code in [
            ErrorCode::Protocol,
            ErrorCode::Version,
            ErrorCode::TooLarge,
            ErrorCode::Unsupported,
            ErrorCode::Busy,
            ErrorCode::BadRequest,
            ErrorCode::ExecFailed,
            ErrorCode::Internal,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        assert!(!ErrorCode::ExecFailed.closes_connection());
        assert!(ErrorCode::Version.closes_connection());
    }
}
