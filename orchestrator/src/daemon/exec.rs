//! Commands and logs of a running VM, through its guest agent.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::vm::{
    connect_agent, console_tail, ErrorKind, JailReport, OpError, CONSOLE_TAIL, VSOCK_IN_JAIL,
};
use super::Daemon;
use crate::manifest::FieldError;
use crate::store::VmState;

/// A command for [`exec`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Standard input (UTF-8 text).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill it after this many milliseconds (default 60000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// How an exec ended.
#[derive(Debug, Clone, Serialize)]
pub struct ExecOutcome {
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal, when one ended it.
    pub signal: Option<i32>,
    /// The timeout killed it.
    pub timed_out: bool,
}

fn agent_socket(d: &Daemon, id: &str) -> Result<(PathBuf, u32), OpError> {
    let vm = d.with_store(|s| s.get_vm(id))?;
    if vm.state != VmState::Running {
        return Err(OpError::new(
            ErrorKind::Conflict,
            format!("VM {id} is {}, not running", vm.state),
        ));
    }
    let manifest = d.with_store(|s| s.get_manifest(&vm.manifest))?.manifest;
    let report = JailReport::load(&d.config.vm_dir(id))
        .ok_or_else(|| OpError::internal(format!("VM {id}: no jail report")))?;
    Ok((
        report.jail_root.join(VSOCK_IN_JAIL.trim_start_matches('/')),
        manifest.agent_port,
    ))
}

/// A command ready to run: the agent connected (handshake done) and the request checked.
/// Made by [`prepare`]; run by [`exec`] (collected) or [`run_streaming`] (chunk by chunk).
pub struct Prepared {
    id: String,
    client: agent::AgentClient<UnixStream>,
    req: agent::ExecRequest,
}

/// Looks the VM up (404 if unknown, 409 if not running), checks the request against the
/// agent's limits (400) and connects to the agent: everything that can fail before the
/// command starts.
pub fn prepare(d: &Daemon, id: &str, body: &ExecBody) -> Result<Prepared, OpError> {
    let (uds, port) = agent_socket(d, id)?;
    let timeout = body.timeout_ms.unwrap_or(60_000);
    let req = agent::ExecRequest {
        argv: body.argv.clone(),
        env: body
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cwd: body.cwd.clone(),
        stdin: body.stdin.as_ref().map(|s| s.as_bytes().to_vec()),
        timeout_ms: Some(timeout),
    };
    req.start()
        .validate()
        .map_err(|m| OpError::new(ErrorKind::BadRequest, m))?;
    if req
        .stdin
        .as_ref()
        .is_some_and(|s| s.len() > agent::MAX_EXEC_STDIN)
    {
        return Err(OpError {
            kind: ErrorKind::BadRequest,
            message: format!("stdin is over the limit of {} bytes", agent::MAX_EXEC_STDIN),
            fields: vec![FieldError {
                path: "stdin".into(),
                reason: format!("at most {} bytes", agent::MAX_EXEC_STDIN),
            }],
        });
    }
    let mut client =
        connect_agent(&uds, port).map_err(|e| OpError::internal(format!("VM {id}: agent: {e}")))?;
    // Room for the command's own timeout plus the agent's.
    let _ = client
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(timeout.saturating_add(15_000))));
    Ok(Prepared {
        id: id.to_string(),
        client,
        req,
    })
}

fn agent_error(id: &str, e: agent::AgentError) -> OpError {
    match e {
        agent::AgentError::InvalidRequest(m) => OpError::new(ErrorKind::BadRequest, m),
        agent::AgentError::Remote { code, message } => {
            OpError::new(ErrorKind::BadRequest, format!("VM {id}: {code}: {message}"))
        }
        other => OpError::internal(format!("VM {id}: exec: {other}")),
    }
}

/// Runs a command in a VM through its agent and collects its output.
pub fn exec(d: &Daemon, id: &str, body: &ExecBody) -> Result<ExecOutcome, OpError> {
    let Prepared {
        id,
        mut client,
        req,
    } = prepare(d, id, body)?;
    let r = client.exec(&req).map_err(|e| agent_error(&id, e))?;
    Ok(ExecOutcome {
        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        code: r.code,
        signal: r.signal,
        timed_out: r.timed_out,
    })
}

/// Runs a prepared command, handing each piece of output to `emit` as one NDJSON line
/// (`{"stdout": text}` or `{"stderr": text}`, lossy UTF-8; a character split between two
/// chunks is kept whole), then `{"exit": {"code", "signal", "timed_out"}}`, or
/// `{"error": message}` if the exec fails on the way. `emit` returns false when nobody
/// listens any more: the agent connection is then shut down, which ends the exec.
/// Blocking.
pub fn run_streaming(p: Prepared, mut emit: impl FnMut(Bytes) -> bool) {
    let Prepared {
        id,
        mut client,
        req,
    } = p;
    let closer = client.get_ref().try_clone().ok();
    let mut out = Utf8Carry::default();
    let mut err = Utf8Carry::default();
    let mut listening = true;
    let result = client.exec_streaming(&req, |stream, data| {
        if !listening {
            return;
        }
        let (key, carry) = match stream {
            agent::OutputStream::Stdout => ("stdout", &mut out),
            agent::OutputStream::Stderr => ("stderr", &mut err),
        };
        let text = carry.push(data);
        if !text.is_empty() && !emit(ndjson(&json!({ key: text }))) {
            listening = false;
            if let Some(s) = &closer {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    });
    if !listening {
        return;
    }
    for (key, carry) in [("stdout", &mut out), ("stderr", &mut err)] {
        let rest = carry.finish();
        if !rest.is_empty() && !emit(ndjson(&json!({ key: rest }))) {
            return;
        }
    }
    let last = match result {
        Ok(exit) => json!({"exit": {
            "code": exit.code,
            "signal": exit.signal,
            "timed_out": exit.timed_out,
        }}),
        Err(e) => json!({"error": agent_error(&id, e).message}),
    };
    emit(ndjson(&last));
}

/// One NDJSON line.
pub fn ndjson(v: &serde_json::Value) -> Bytes {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Turns a byte stream cut into chunks into text, lossily, without breaking a UTF-8
/// character that straddles two chunks.
#[derive(Debug, Default)]
struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    /// The text of `data` after what is pending; an incomplete character at the end waits
    /// for the next chunk.
    fn push(&mut self, data: &[u8]) -> String {
        self.pending.extend_from_slice(data);
        let keep = incomplete_tail(&self.pending);
        let tail = self.pending.split_off(self.pending.len() - keep);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = tail;
        text
    }

    /// Whatever is still pending.
    fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// How many bytes at the end of `b` are the start of a UTF-8 character that is not
/// complete yet (0 to 3).
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let byte = b[b.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let need = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// Logs of a VM: the console tail, and the workload's output from the agent.
#[derive(Debug, Clone, Serialize)]
pub struct Logs {
    /// The last console output (up to 64 KiB).
    pub console: String,
    /// The workload's output from byte `workload_start` on (when the VM runs).
    pub workload: Option<String>,
    /// Absolute offset of the first workload byte returned.
    pub workload_start: u64,
    /// Offset to ask from next time.
    pub workload_end: u64,
}

/// A VM's logs. A VM that is not running has only its kept console tail.
pub fn logs(d: &Daemon, id: &str, offset: u64) -> Result<Logs, OpError> {
    let vm = d.with_store(|s| s.get_vm(id))?;
    let report = JailReport::load(&d.config.vm_dir(id));
    let console = match (&report, vm.state) {
        (Some(r), VmState::Running) => console_tail(&r.jail_root, CONSOLE_TAIL),
        _ => vm.last_console.clone().unwrap_or_default(),
    };
    let mut out = Logs {
        console,
        workload: None,
        workload_start: offset,
        workload_end: offset,
    };
    if vm.state == VmState::Running {
        let (uds, port) = agent_socket(d, id)?;
        let mut c = connect_agent(&uds, port)
            .map_err(|e| OpError::internal(format!("VM {id}: agent: {e}")))?;
        let chunk = c
            .logs(offset, 1 << 20)
            .map_err(|e| OpError::internal(format!("VM {id}: logs: {e}")))?;
        out.workload = Some(String::from_utf8_lossy(&chunk.data).into_owned());
        out.workload_start = chunk.start;
        out.workload_end = chunk.end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_between_chunks_stay_whole() {
        let text = "aé€😀z";
        let bytes = text.as_bytes();
        // Every way of cutting the text in two gives it back unchanged.
        for cut in 0..=bytes.len() {
            let mut c = Utf8Carry::default();
            let mut got = c.push(&bytes[..cut]);
            got.push_str(&c.push(&bytes[cut..]));
            got.push_str(&c.finish());
            assert_eq!(got, text, "cut at {cut}");
        }
        // One byte at a time, too.
        let mut c = Utf8Carry::default();
        let got: String = bytes.iter().map(|b| c.push(&[*b])).collect();
        assert_eq!(got + &c.finish(), text);
        // Invalid bytes are replaced, not held back.
        let mut c = Utf8Carry::default();
        assert_eq!(c.push(b"a\xffb"), "a\u{fffd}b");
        // A truncated character at the very end is replaced when the stream ends.
        assert_eq!(c.push(&"€".as_bytes()[..2]), "");
        assert_eq!(c.finish(), "\u{fffd}");
    }
}
