//! The guest agent: serves the protocol defined (and documented) in the `agent` crate.
//!
//! [`serve`] runs one connection over any `Read + Write` stream, so the whole protocol is
//! tested on the host over a socket pair; [`listen`] accepts connections (vsock in the
//! guest) and runs each on its own thread. Every failure stays inside its connection:
//! nothing here panics or returns an error to PID 1's main thread, and no peer input is
//! indexed, unwrapped or allocated without a bound.

mod exec;
pub mod listen;
pub mod resync;

use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use agent::{
    read_message, write_frame, write_message, ErrorCode, ErrorInfo, FrameError, FrameType,
    HealthOk, HelloOk, LogsOk, LogsRequest, ManifestOk, Message, ShutdownOk, MAX_DATA_CHUNK,
    MAX_EXEC_STDIN, MAX_LOG_READ, PROTOCOL_VERSION,
};

pub(crate) use exec::{exit_info, kill_group, BASE_ENV};

use crate::reaper::Reaper;
use crate::workload::Workload;

/// The agent's software version, reported in `HelloOk` and `HealthOk`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Longest message the agent puts in an `Error` frame.
const MAX_ERROR_MESSAGE: usize = 512;

/// Most bytes read (and dropped) while waiting for the host to close after `ShutdownOk`.
const MAX_DRAIN_AFTER_SHUTDOWN: usize = 64 * 1024;

/// Where a `Shutdown` request has got to; reported to guest-init's main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownStage {
    /// `ShutdownOk` was sent; the VM should end once the host closes (or soon anyway).
    Requested,
    /// The host closed the connection after `ShutdownOk`: end the VM now.
    Closed,
}

/// What every connection shares.
pub struct ServerContext {
    /// Starts exec children and routes their statuses.
    pub reaper: Arc<Reaper>,
    /// When guest-init started, for `uptime_ms`.
    pub started: Instant,
    /// Told about `Shutdown` requests; must not block.
    pub on_shutdown: Box<dyn Fn(ShutdownStage) + Send + Sync>,
    /// The workload a `Manifest` starts, shared by all connections.
    pub workload: Workload,
    /// What `Resync` changes: the guest itself ([`resync::Guest`]), or a fake in tests.
    pub machine: Box<dyn resync::Machine>,
}

/// Why a connection ended early. The host has been sent an `Error` frame where possible.
#[derive(Debug)]
pub enum ServeError {
    /// The stream failed, or the host sent a malformed frame.
    Frame(FrameError),
    /// The host sent a well-formed frame that breaks the conversation.
    Protocol(String),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::Frame(FrameError::Io(e)) => write!(f, "i/o error: {e}"),
            ServeError::Frame(e) => write!(f, "{e}"),
            ServeError::Protocol(m) => f.write_str(m),
        }
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn shorten(s: &str, max: usize) -> &str {
    let mut at = s.len().min(max);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.get(..at).unwrap_or_default()
}

/// Sends an `Error` frame, best effort: the connection may already be gone.
pub(crate) fn send_error<W: Write + ?Sized>(out: &mut W, code: ErrorCode, message: &str) {
    let message = shorten(message, MAX_ERROR_MESSAGE);
    let _ = write_message(out, &Message::Error(ErrorInfo::new(code, message)));
}

/// Ends the connection over a frame that could not be read, telling the host why when the
/// stream is still usable.
fn fail<W: Write + ?Sized>(out: &mut W, err: FrameError) -> ServeError {
    let code = match &err {
        FrameError::Closed | FrameError::Truncated | FrameError::Io(_) => None,
        FrameError::Reserved(_) => Some(ErrorCode::Unsupported),
        FrameError::TooLarge { .. } => Some(ErrorCode::TooLarge),
        FrameError::BadMagic(_)
        | FrameError::BadWireFormat(_)
        | FrameError::UnknownType(_)
        | FrameError::BadPayload { .. } => Some(ErrorCode::Protocol),
    };
    if let Some(code) = code {
        send_error(out, code, &err.to_string());
    }
    ServeError::Frame(err)
}

/// Ends the connection over a frame that does not belong here.
fn refuse<W: Write + ?Sized>(out: &mut W, code: ErrorCode, message: String) -> ServeError {
    send_error(out, code, &message);
    ServeError::Protocol(message)
}

fn send<W: Write + ?Sized>(out: &mut W, msg: &Message) -> Result<(), ServeError> {
    write_message(out, msg).map_err(ServeError::Frame)
}

/// Serves one connection until the host closes it (`Ok`) or breaks the protocol (`Err`).
pub fn serve<S: Read + Write>(stream: &mut S, ctx: &ServerContext) -> Result<(), ServeError> {
    match read_message(stream) {
        Ok(Message::Hello(h)) if h.version == PROTOCOL_VERSION => send(
            stream,
            &Message::HelloOk(HelloOk {
                version: PROTOCOL_VERSION,
                agent_version: AGENT_VERSION.into(),
            }),
        )?,
        Ok(Message::Hello(h)) => {
            return Err(refuse(
                stream,
                ErrorCode::Version,
                format!(
                    "this agent speaks protocol version {PROTOCOL_VERSION}, not {}",
                    h.version
                ),
            ))
        }
        Ok(other) => {
            return Err(refuse(
                stream,
                ErrorCode::Protocol,
                format!("expected Hello, got {:?}", other.kind()),
            ))
        }
        Err(FrameError::Closed) => return Ok(()),
        Err(e) => return Err(fail(stream, e)),
    }
    loop {
        let msg = match read_message(stream) {
            Ok(m) => m,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(fail(stream, e)),
        };
        match msg {
            Message::Health(_) => {
                let uptime_ms =
                    u64::try_from(ctx.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                send(
                    stream,
                    &Message::HealthOk(HealthOk {
                        agent_version: AGENT_VERSION.into(),
                        uptime_ms,
                    }),
                )?;
            }
            Message::Exec(start) => {
                let stdin = if start.stdin {
                    Some(read_stdin(stream)?)
                } else {
                    None
                };
                exec::run(stream, &ctx.reaper, &start, stdin)?;
            }
            Message::Manifest(delivery) => match ctx.workload.start(&delivery) {
                Ok(pid) => send(stream, &Message::ManifestOk(ManifestOk { pid }))?,
                Err(e) => send_error(stream, e.code, &e.message),
            },
            Message::Resync(req) => match resync::handle(&req, ctx.machine.as_ref()) {
                Ok(reply) => send(stream, &Message::ResyncOk(reply))?,
                Err(e) => send_error(stream, e.code, &e.message),
            },
            Message::WorkloadStatus(_) => {
                send(stream, &Message::WorkloadStatusOk(ctx.workload.status()))?;
            }
            Message::Logs(req) => send_logs(stream, &ctx.workload, &req)?,
            Message::Shutdown(_) => {
                send(stream, &Message::ShutdownOk(ShutdownOk {}))?;
                (ctx.on_shutdown)(ShutdownStage::Requested);
                wait_for_close(stream);
                (ctx.on_shutdown)(ShutdownStage::Closed);
                return Ok(());
            }
            other => {
                return Err(refuse(
                    stream,
                    ErrorCode::Protocol,
                    format!("unexpected {:?} frame", other.kind()),
                ))
            }
        }
    }
}

/// Answers `Logs`: `LogsOk`, then the bytes it announces in `Stdout` frames.
fn send_logs<W: Write>(
    out: &mut W,
    workload: &Workload,
    req: &LogsRequest,
) -> Result<(), ServeError> {
    let max = usize::try_from(req.max_bytes)
        .unwrap_or(usize::MAX)
        .min(MAX_LOG_READ);
    let read = workload.read_log(req.offset, max);
    let len = u64::try_from(read.data.len()).unwrap_or(u64::MAX);
    send(
        out,
        &Message::LogsOk(LogsOk {
            start: read.start,
            end: read.start.saturating_add(len),
            dropped: read.dropped,
        }),
    )?;
    for chunk in read.data.chunks(MAX_DATA_CHUNK) {
        write_frame(out, FrameType::Stdout, chunk).map_err(ServeError::Frame)?;
    }
    Ok(())
}

/// Collects an exec's `Stdin` frames up to the empty one, within [`MAX_EXEC_STDIN`].
fn read_stdin<S: Read + Write>(stream: &mut S) -> Result<Vec<u8>, ServeError> {
    let mut stdin = Vec::new();
    loop {
        match read_message(stream) {
            Ok(Message::Stdin(chunk)) if chunk.is_empty() => return Ok(stdin),
            Ok(Message::Stdin(chunk)) => {
                if stdin.len().saturating_add(chunk.len()) > MAX_EXEC_STDIN {
                    return Err(refuse(
                        stream,
                        ErrorCode::TooLarge,
                        format!("exec stdin over the limit of {MAX_EXEC_STDIN} bytes"),
                    ));
                }
                stdin.extend_from_slice(&chunk);
            }
            Ok(other) => {
                return Err(refuse(
                    stream,
                    ErrorCode::Protocol,
                    format!("expected Stdin, got {:?}", other.kind()),
                ))
            }
            Err(e) => return Err(fail(stream, e)),
        }
    }
}

/// After `ShutdownOk`: waits until the host closes the connection, so the acknowledgement
/// has left the guest before the VM ends. Bounded in bytes here and in time by the caller.
fn wait_for_close<R: Read>(stream: &mut R) {
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    while total < MAX_DRAIN_AFTER_SHUTDOWN {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => total = total.saturating_add(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests;
