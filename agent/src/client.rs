//! The host side: a blocking client over any `Read + Write` stream (a hybrid-vsock
//! `UnixStream` in practice, a socket pair in tests). It trusts nothing the agent sends:
//! frames are bounded by the decoder, collected output by an output limit, and error text
//! by [`MAX_REMOTE_MESSAGE`].

use std::io::{Read, Write};

use crate::frame::{write_frame, FrameError, FrameType};
use crate::message::{
    read_message, write_message, ErrorCode, ExecStart, ExitInfo, Health, HealthOk, Hello, HelloOk,
    LogsRequest, ManifestDelivery, Message, ResyncReply, ResyncRequest, Shutdown, WorkloadStatus,
    WorkloadStatusOk,
};
use crate::{MAX_CONTROL_PAYLOAD, MAX_DATA_CHUNK, MAX_EXEC_STDIN, MAX_LOG_READ, PROTOCOL_VERSION};

/// Default cap on the stdout (and, separately, the stderr) [`AgentClient::exec`] keeps.
pub const DEFAULT_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// Longest agent error message kept in [`AgentError::Remote`]; the rest is cut.
pub const MAX_REMOTE_MESSAGE: usize = 1024;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The stream failed or carried a malformed frame.
    #[error("agent connection")]
    Frame(#[from] FrameError),
    /// The agent answered with an `Error` frame.
    #[error("agent error {code}: {message}")]
    Remote {
        /// The agent's error code.
        code: ErrorCode,
        /// The agent's message, cut to [`MAX_REMOTE_MESSAGE`] bytes.
        message: String,
    },
    /// The agent sent a frame that does not answer the request.
    #[error("unexpected {0:?} frame from the agent")]
    Unexpected(FrameType),
    /// The agent answered the handshake with another protocol version.
    #[error("agent speaks protocol version {theirs}, this client {ours}")]
    VersionMismatch {
        /// The version this client speaks.
        ours: u32,
        /// The version the agent claimed.
        theirs: u32,
    },
    /// The request breaks a protocol limit; nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The agent's answer breaks the protocol (e.g. more log bytes than announced). The
    /// connection is out of step: drop it.
    #[error("bad answer from the agent: {0}")]
    BadAnswer(String),
}

/// A piece of the workload's log, from [`AgentClient::logs`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogChunk {
    /// Absolute offset of `data[0]` in the log.
    pub start: u64,
    /// Absolute offset just past the end of `data`: where to ask next.
    pub end: u64,
    /// Whether output before `start` that was asked for is no longer held by the agent.
    pub dropped: bool,
    /// The bytes `start..end`.
    pub data: Vec<u8>,
}

/// What to run, for [`AgentClient::exec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Variables added to (or overriding) the agent's base environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` if `None`.
    pub cwd: Option<String>,
    /// Bytes fed to the program's stdin; /dev/null if `None`.
    pub stdin: Option<Vec<u8>>,
    /// Kill the program after this many milliseconds.
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    /// A request for `argv` with everything else at its default.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }

    /// The `Exec` frame's payload for this request.
    pub fn start(&self) -> ExecStart {
        ExecStart {
            argv: self.argv.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            stdin: self.stdin.is_some(),
            timeout_ms: self.timeout_ms,
        }
    }
}

/// What an exec produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// Collected stdout, at most the client's output limit.
    pub stdout: Vec<u8>,
    /// Collected stderr, at most the client's output limit.
    pub stderr: Vec<u8>,
    /// Exit code, for a normal exit.
    pub code: Option<i32>,
    /// Signal number, when a signal ended the program.
    pub signal: Option<i32>,
    /// Whether the agent killed the program at its timeout.
    pub timed_out: bool,
    /// Whether stdout went over the limit (the rest was read and dropped).
    pub stdout_truncated: bool,
    /// Whether stderr went over the limit (the rest was read and dropped).
    pub stderr_truncated: bool,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// The program's stdout.
    Stdout,
    /// The program's stderr.
    Stderr,
}

/// A blocking client for one agent connection. Calls are sequential, as the protocol
/// requires; set timeouts on the stream itself (e.g. `UnixStream::set_read_timeout`) if a
/// stuck agent must not block the caller.
pub struct AgentClient<S> {
    stream: S,
    output_limit: usize,
}

fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("...");
    }
    s
}

/// Turns an answer that is not the expected one into the right error.
fn unexpected(msg: Message) -> AgentError {
    match msg {
        Message::Error(e) => AgentError::Remote {
            code: e.code,
            message: cut(e.message, MAX_REMOTE_MESSAGE),
        },
        other => AgentError::Unexpected(other.kind()),
    }
}

fn append_capped(buf: &mut Vec<u8>, data: &[u8], limit: usize, truncated: &mut bool) {
    let room = limit.saturating_sub(buf.len());
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(data.get(..room.min(data.len())).unwrap_or_default());
}

impl<S: Read + Write> AgentClient<S> {
    /// Wraps a connected stream. Call [`AgentClient::hello`] first.
    pub fn new(stream: S) -> Self {
        AgentClient {
            stream,
            output_limit: DEFAULT_OUTPUT_LIMIT,
        }
    }

    /// Sets how much stdout (and, separately, stderr) [`AgentClient::exec`] keeps.
    pub fn with_output_limit(mut self, limit: usize) -> Self {
        self.output_limit = limit;
        self
    }

    /// The underlying stream, e.g. to set timeouts.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.stream
    }

    fn send(&mut self, msg: &Message) -> Result<(), AgentError> {
        Ok(write_message(&mut self.stream, msg)?)
    }

    fn recv(&mut self) -> Result<Message, AgentError> {
        Ok(read_message(&mut self.stream)?)
    }

    /// The handshake: offers [`PROTOCOL_VERSION`], expects the agent to accept it.
    pub fn hello(&mut self) -> Result<HelloOk, AgentError> {
        self.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
        }))?;
        match self.recv()? {
            Message::HelloOk(ok) if ok.version == PROTOCOL_VERSION => Ok(ok),
            Message::HelloOk(ok) => Err(AgentError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: ok.version,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Asks whether the agent is alive.
    pub fn health(&mut self) -> Result<HealthOk, AgentError> {
        self.send(&Message::Health(Health {}))?;
        match self.recv()? {
            Message::HealthOk(ok) => Ok(ok),
            other => Err(unexpected(other)),
        }
    }

    /// Runs a program and collects its output, keeping at most the output limit of each
    /// stream (the rest is read and dropped, and flagged in the result).
    pub fn exec(&mut self, req: &ExecRequest) -> Result<ExecResult, AgentError> {
        let mut result = ExecResult::default();
        let limit = self.output_limit;
        let exit = self.exec_streaming(req, |stream, data| match stream {
            OutputStream::Stdout => append_capped(
                &mut result.stdout,
                data,
                limit,
                &mut result.stdout_truncated,
            ),
            OutputStream::Stderr => append_capped(
                &mut result.stderr,
                data,
                limit,
                &mut result.stderr_truncated,
            ),
        })?;
        result.code = exit.code;
        result.signal = exit.signal;
        result.timed_out = exit.timed_out;
        Ok(result)
    }

    /// Runs a program and hands each output chunk (at most [`MAX_DATA_CHUNK`] bytes) to
    /// `on_output` as it arrives; returns how the program ended.
    pub fn exec_streaming(
        &mut self,
        req: &ExecRequest,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitInfo, AgentError> {
        let start = req.start();
        start.validate().map_err(AgentError::InvalidRequest)?;
        if let Some(stdin) = &req.stdin {
            if stdin.len() > MAX_EXEC_STDIN {
                return Err(AgentError::InvalidRequest(format!(
                    "stdin of {} bytes, over the limit of {MAX_EXEC_STDIN}",
                    stdin.len()
                )));
            }
        }
        self.send(&Message::Exec(start))?;
        if let Some(stdin) = &req.stdin {
            for chunk in stdin.chunks(MAX_DATA_CHUNK) {
                self.send(&Message::Stdin(chunk.to_vec()))?;
            }
            self.send(&Message::Stdin(Vec::new()))?;
        }
        loop {
            match self.recv()? {
                Message::Stdout(d) => on_output(OutputStream::Stdout, &d),
                Message::Stderr(d) => on_output(OutputStream::Stderr, &d),
                Message::Exit(exit) => return Ok(exit),
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Delivers the manifest: the agent sets the hostname, stores the manifest and starts the
    /// workload. Returns the workload's pid in the guest.
    pub fn send_manifest(&mut self, delivery: &ManifestDelivery) -> Result<u32, AgentError> {
        delivery.validate().map_err(AgentError::InvalidRequest)?;
        // Encoded here rather than through `Message`, which would copy the manifest.
        let payload = serde_json::to_vec(delivery).map_err(|e| FrameError::BadPayload {
            kind: FrameType::Manifest,
            reason: e.to_string(),
        })?;
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(AgentError::InvalidRequest(format!(
                "manifest payload of {} bytes, over the limit of {MAX_CONTROL_PAYLOAD}",
                payload.len()
            )));
        }
        write_frame(&mut self.stream, FrameType::Manifest, &payload)?;
        match self.recv()? {
            Message::ManifestOk(ok) => Ok(ok.pid),
            other => Err(unexpected(other)),
        }
    }

    /// Asks how the workload is doing.
    pub fn workload_status(&mut self) -> Result<WorkloadStatusOk, AgentError> {
        self.send(&Message::WorkloadStatus(WorkloadStatus {}))?;
        match self.recv()? {
            Message::WorkloadStatusOk(ok) => Ok(ok),
            other => Err(unexpected(other)),
        }
    }

    /// After a snapshot restore: sets the guest's clock, feeds its RNG the seed and, if the
    /// request names one, sets its hostname (see the crate docs, "Resync"). Build the
    /// request with [`ResyncRequest::now`]. An invalid request is refused before anything is
    /// sent.
    pub fn resync(&mut self, req: &ResyncRequest) -> Result<ResyncReply, AgentError> {
        req.validate().map_err(AgentError::InvalidRequest)?;
        self.send(&Message::Resync(req.clone()))?;
        match self.recv()? {
            Message::ResyncOk(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// Reads up to `max_bytes` (at most [`MAX_LOG_READ`]) of the workload's log from the
    /// absolute `offset`. To follow the log, call again with the chunk's `end`.
    pub fn logs(&mut self, offset: u64, max_bytes: u32) -> Result<LogChunk, AgentError> {
        self.send(&Message::Logs(LogsRequest { offset, max_bytes }))?;
        let ok = match self.recv()? {
            Message::LogsOk(ok) => ok,
            other => return Err(unexpected(other)),
        };
        let limit = usize::try_from(max_bytes)
            .unwrap_or(usize::MAX)
            .min(MAX_LOG_READ);
        let len = ok
            .end
            .checked_sub(ok.start)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= limit)
            .ok_or_else(|| {
                AgentError::BadAnswer(format!(
                    "log range {}..{} for a read of at most {limit} bytes",
                    ok.start, ok.end
                ))
            })?;
        // `len` is at most MAX_LOG_READ, so this allocation is bounded.
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            let left = len - data.len();
            match self.recv()? {
                Message::Stdout(d) if !d.is_empty() && d.len() <= left => {
                    data.extend_from_slice(&d);
                }
                Message::Stdout(d) => {
                    return Err(AgentError::BadAnswer(format!(
                        "log data frame of {} bytes with {left} bytes left to come",
                        d.len()
                    )))
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok(LogChunk {
            start: ok.start,
            end: ok.end,
            dropped: ok.dropped,
            data,
        })
    }

    /// Asks the agent to end the VM and waits for the acknowledgement. The client is
    /// consumed: dropping the stream closes the connection, which is the agent's cue to go
    /// ahead (it also goes ahead 1 s after acknowledging).
    pub fn shutdown(mut self) -> Result<(), AgentError> {
        self.send(&Message::Shutdown(Shutdown {}))?;
        match self.recv()? {
            Message::ShutdownOk(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ErrorInfo;
    use std::os::unix::net::UnixStream;
    use std::thread;

    /// A scripted agent: checks the requests it receives and replies with canned frames.
    fn fake_agent(
        script: Vec<(FrameType, Vec<Message>)>,
    ) -> (UnixStream, thread::JoinHandle<Vec<Message>>) {
        let (client, mut server) = UnixStream::pair().unwrap();
        let handle = thread::spawn(move || {
            let mut seen = Vec::new();
            for (expect, replies) in script {
                loop {
                    let m = read_message(&mut server).unwrap();
                    let kind = m.kind();
                    seen.push(m);
                    if kind == expect {
                        break;
                    }
                }
                for r in replies {
                    write_message(&mut server, &r).unwrap();
                }
            }
            seen
        });
        (client, handle)
    }

    #[test]
    fn hello_health_exec_shutdown() {
        let (stream, agent) = fake_agent(vec![
            (
                FrameType::Hello,
                vec![Message::HelloOk(HelloOk {
                    version: PROTOCOL_VERSION,
                    agent_version: "t".into(),
                })],
            ),
            (
                FrameType::Health,
                vec![Message::HealthOk(HealthOk {
                    agent_version: "t".into(),
                    uptime_ms: 7,
                })],
            ),
            (
                FrameType::Stdin,
                vec![
                    Message::Stdout(b"o".to_vec()),
                    Message::Stderr(b"e".to_vec()),
                    Message::Stdout(b"k".to_vec()),
                    Message::Exit(ExitInfo {
                        code: Some(3),
                        signal: None,
                        timed_out: false,
                    }),
                ],
            ),
            (
                FrameType::Shutdown,
                vec![Message::ShutdownOk(Default::default())],
            ),
        ]);
        // The scripted agent stops reading stdin at the first Stdin frame; with a tiny
        // stdin that is also the last non-empty one, and the empty end frame is read as
        // part of the next step.
        let mut c = AgentClient::new(stream);
        assert_eq!(c.hello().unwrap().agent_version, "t");
        assert_eq!(c.health().unwrap().uptime_ms, 7);
        let mut req = ExecRequest::new(["cat"]);
        req.stdin = Some(b"input".to_vec());
        let r = c.exec(&req).unwrap();
        assert_eq!(
            (r.stdout.as_slice(), r.stderr.as_slice()),
            (&b"ok"[..], &b"e"[..])
        );
        assert_eq!((r.code, r.signal, r.timed_out), (Some(3), None, false));
        c.shutdown().unwrap();
        let seen = agent.join().unwrap();
        assert!(seen.contains(&Message::Stdin(b"input".to_vec())));
        assert!(seen.contains(&Message::Stdin(Vec::new())));
        let Some(Message::Exec(start)) = seen.iter().find(|m| m.kind() == FrameType::Exec) else {
            panic!("no exec sent");
        };
        assert!(start.stdin);
    }

    #[test]
    fn output_is_capped_and_flagged() {
        let (stream, agent) = fake_agent(vec![(
            FrameType::Exec,
            vec![
                Message::Stdout(vec![b'a'; 6]),
                Message::Stdout(vec![b'b'; 6]),
                Message::Stderr(vec![b'c'; 3]),
                Message::Exit(ExitInfo::default()),
            ],
        )]);
        let mut c = AgentClient::new(stream).with_output_limit(8);
        let r = c.exec(&ExecRequest::new(["x"])).unwrap();
        assert_eq!(r.stdout, b"aaaaaabb");
        assert!(r.stdout_truncated);
        assert_eq!(r.stderr, b"ccc");
        assert!(!r.stderr_truncated);
        agent.join().unwrap();
    }

    #[test]
    fn exec_streaming_hands_over_each_chunk_in_order() {
        let (stream, agent) = fake_agent(vec![(
            FrameType::Exec,
            vec![
                Message::Stdout(b"a".to_vec()),
                Message::Stderr(b"b".to_vec()),
                Message::Stdout(b"c".to_vec()),
                Message::Exit(ExitInfo {
                    code: None,
                    signal: Some(9),
                    timed_out: true,
                }),
            ],
        )]);
        let mut c = AgentClient::new(stream);
        let mut seen = Vec::new();
        let exit = c
            .exec_streaming(&ExecRequest::new(["x"]), |s, d| seen.push((s, d.to_vec())))
            .unwrap();
        assert_eq!(
            seen,
            [
                (OutputStream::Stdout, b"a".to_vec()),
                (OutputStream::Stderr, b"b".to_vec()),
                (OutputStream::Stdout, b"c".to_vec()),
            ]
        );
        assert_eq!(
            (exit.code, exit.signal, exit.timed_out),
            (None, Some(9), true)
        );
        agent.join().unwrap();
    }

    #[test]
    fn remote_errors_and_unexpected_frames() {
        let long = "x".repeat(10 * MAX_REMOTE_MESSAGE);
        let (stream, agent) = fake_agent(vec![
            (
                FrameType::Hello,
                vec![Message::Error(ErrorInfo::new(ErrorCode::Version, long))],
            ),
            (FrameType::Health, vec![Message::Stdout(b"?".to_vec())]),
        ]);
        let mut c = AgentClient::new(stream);
        match c.hello().unwrap_err() {
            AgentError::Remote { code, message } => {
                assert_eq!(code, ErrorCode::Version);
                assert!(message.len() <= MAX_REMOTE_MESSAGE + 3);
            }
            e => panic!("{e}"),
        }
        assert!(matches!(
            c.health().unwrap_err(),
            AgentError::Unexpected(FrameType::Stdout)
        ));
        agent.join().unwrap();
    }

    #[test]
    fn version_mismatch_in_hello_ok() {
        let (stream, agent) = fake_agent(vec![(
            FrameType::Hello,
            vec![Message::HelloOk(HelloOk {
                version: PROTOCOL_VERSION + 1,
                agent_version: "t".into(),
            })],
        )]);
        assert!(matches!(
            AgentClient::new(stream).hello().unwrap_err(),
            AgentError::VersionMismatch { .. }
        ));
        agent.join().unwrap();
    }

    #[test]
    fn invalid_requests_are_refused_before_sending() {
        let (stream, peer) = UnixStream::pair().unwrap();
        let mut c = AgentClient::new(stream);
        assert!(matches!(
            c.exec(&ExecRequest::default()),
            Err(AgentError::InvalidRequest(_))
        ));
        let mut req = ExecRequest::new(["cat"]);
        req.stdin = Some(vec![0; MAX_EXEC_STDIN + 1]);
        assert!(matches!(c.exec(&req), Err(AgentError::InvalidRequest(_))));
        drop(c);
        let mut rest = Vec::new();
        (&peer).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "sent {} bytes", rest.len());
    }

    fn delivery() -> ManifestDelivery {
        ManifestDelivery {
            vm_id: "vm-1".into(),
            hostname: "web-1".into(),
            workload: crate::WorkloadSpec {
                argv: vec!["/bin/app".into()],
                env: (0..200)
                    .map(|i| (format!("VAR_{i}"), "v".repeat(512)))
                    .collect(),
                cwd: None,
            },
            manifest: crate::RawManifest::from_json(format!(
                r#"{{"name":"web","blob":"{}"}}"#,
                "b".repeat(100_000)
            ))
            .unwrap(),
        }
    }

    #[test]
    fn manifest_status_and_logs() {
        use crate::{LogsOk, ManifestOk, WorkloadState};
        let (stream, agent) = fake_agent(vec![
            (
                FrameType::Manifest,
                vec![Message::ManifestOk(ManifestOk { pid: 42 })],
            ),
            (
                FrameType::WorkloadStatus,
                vec![Message::WorkloadStatusOk(WorkloadStatusOk {
                    state: WorkloadState::Exited,
                    pid: Some(42),
                    code: Some(0),
                    signal: None,
                })],
            ),
            (
                FrameType::Logs,
                vec![
                    Message::LogsOk(LogsOk {
                        start: 10,
                        end: 10 + 70_000,
                        dropped: true,
                    }),
                    Message::Stdout(vec![b'a'; MAX_DATA_CHUNK]),
                    Message::Stdout(vec![b'b'; 70_000 - MAX_DATA_CHUNK]),
                ],
            ),
            (
                FrameType::Logs,
                vec![Message::LogsOk(LogsOk {
                    start: 5,
                    end: 5,
                    dropped: false,
                })],
            ),
        ]);
        let mut c = AgentClient::new(stream);
        let d = delivery();
        assert_eq!(c.send_manifest(&d).unwrap(), 42);
        let st = c.workload_status().unwrap();
        assert_eq!((st.state, st.code), (WorkloadState::Exited, Some(0)));
        let chunk = c.logs(0, u32::MAX).unwrap();
        assert_eq!((chunk.start, chunk.end, chunk.dropped), (10, 70_010, true));
        assert_eq!(chunk.data.len(), 70_000);
        assert_eq!(chunk.data[MAX_DATA_CHUNK], b'b');
        // An empty answer has no data frames: the next call is not confused by any.
        let chunk = c.logs(99, 10).unwrap();
        assert_eq!((chunk.start, chunk.end, chunk.data.len()), (5, 5, 0));
        let seen = agent.join().unwrap();
        // The large manifest arrived whole (> 64 KiB).
        let Some(Message::Manifest(got)) = seen.iter().find(|m| m.kind() == FrameType::Manifest)
        else {
            panic!("no manifest sent");
        };
        assert_eq!(got, &d);
        assert!(got.manifest.get().len() > 64 * 1024);
        assert!(seen.contains(&Message::Logs(LogsRequest {
            offset: 99,
            max_bytes: 10
        })));
    }

    #[test]
    fn log_answers_that_break_their_announcement_are_refused() {
        use crate::LogsOk;
        let ok = |start, end| {
            Message::LogsOk(LogsOk {
                start,
                end,
                dropped: false,
            })
        };
        let (stream, agent) = fake_agent(vec![
            // More than was asked for.
            (FrameType::Logs, vec![ok(0, 11)]),
            // End before start.
            (FrameType::Logs, vec![ok(5, 4)]),
            // A data frame overshooting the announced length.
            (
                FrameType::Logs,
                vec![ok(0, 3), Message::Stdout(b"abcd".to_vec())],
            ),
            // An empty data frame.
            (FrameType::Logs, vec![ok(0, 3), Message::Stdout(Vec::new())]),
            // An unrelated frame in the middle.
            (
                FrameType::Logs,
                vec![ok(0, 3), Message::Stderr(b"x".to_vec())],
            ),
        ]);
        let mut c = AgentClient::new(stream);
        for _ in 0..4 {
            assert!(matches!(c.logs(0, 10), Err(AgentError::BadAnswer(_))));
        }
        assert!(matches!(
            c.logs(0, 10),
            Err(AgentError::Unexpected(FrameType::Stderr))
        ));
        agent.join().unwrap();
    }

    #[test]
    fn invalid_manifests_are_refused_before_sending() {
        let (stream, peer) = UnixStream::pair().unwrap();
        let mut c = AgentClient::new(stream);
        let mut d = delivery();
        d.workload.argv.clear();
        assert!(matches!(
            c.send_manifest(&d),
            Err(AgentError::InvalidRequest(m)) if m.contains("argv")
        ));
        let mut d = delivery();
        d.hostname = "no spaces".into();
        assert!(matches!(
            c.send_manifest(&d),
            Err(AgentError::InvalidRequest(_))
        ));
        // Valid fields, but the whole payload is over the control frame limit.
        let mut d = delivery();
        d.manifest = crate::RawManifest::from_json(format!(
            r#"{{"blob":"{}"}}"#,
            "b".repeat(MAX_CONTROL_PAYLOAD)
        ))
        .unwrap();
        assert!(matches!(
            c.send_manifest(&d),
            Err(AgentError::InvalidRequest(m)) if m.contains("limit")
        ));
        drop(c);
        let mut rest = Vec::new();
        (&peer).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "sent {} bytes", rest.len());
    }

    #[test]
    fn resync_round_trip_and_refusals() {
        use crate::ErrorInfo;
        let reply = ResyncReply {
            clock_step_ms: 3_600_000,
            entropy_credited: false,
            hostname: "clone-2".into(),
        };
        let (stream, agent) = fake_agent(vec![
            (FrameType::Resync, vec![Message::ResyncOk(reply.clone())]),
            (
                FrameType::Resync,
                vec![Message::Error(ErrorInfo::new(ErrorCode::Internal, "clock"))],
            ),
        ]);
        let mut c = AgentClient::new(stream);
        let req = ResyncRequest::now(Some("clone-2".into())).unwrap();
        assert_eq!(c.resync(&req).unwrap(), reply);
        // Refused locally: nothing reaches the agent, whose script still waits for the
        // second request.
        let mut bad = req.clone();
        bad.seed.truncate(62);
        assert!(matches!(c.resync(&bad), Err(AgentError::InvalidRequest(m)) if m.contains("seed")));
        let mut bad = req.clone();
        bad.hostname = Some("no_underscores".into());
        assert!(
            matches!(c.resync(&bad), Err(AgentError::InvalidRequest(m)) if m.contains("hostname"))
        );
        assert!(matches!(
            c.resync(&req),
            Err(AgentError::Remote {
                code: ErrorCode::Internal,
                ..
            })
        ));
        let seen = agent.join().unwrap();
        assert_eq!(seen, [Message::Resync(req.clone()), Message::Resync(req)]);
    }

    #[test]
    fn closed_connection_is_an_error() {
        let (stream, peer) = UnixStream::pair().unwrap();
        drop(peer);
        let mut c = AgentClient::new(stream);
        assert!(matches!(c.hello(), Err(AgentError::Frame(_))));
    }

    #[test]
    fn cut_respects_char_boundaries() {
        assert_eq!(cut("héllo".into(), 2), "h...");
        assert_eq!(cut("abc".into(), 3), "abc");
    }
}
