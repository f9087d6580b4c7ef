//! Commands and logs of a running VM, through its guest agent.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::vm::{
    connect_agent, console_tail, ErrorKind, JailReport, OpError, CONSOLE_TAIL, VSOCK_IN_JAIL,
};
use super::Daemon;
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

/// Runs a command in a VM through its agent.
pub fn exec(d: &Daemon, id: &str, body: &ExecBody) -> Result<ExecOutcome, OpError> {
    let (uds, port) = agent_socket(d, id)?;
    let timeout = body.timeout_ms.unwrap_or(60_000);
    let mut c =
        connect_agent(&uds, port).map_err(|e| OpError::internal(format!("VM {id}: agent: {e}")))?;
    // Room for the command's own timeout plus the agent's.
    let _ = c
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(timeout.saturating_add(15_000))));
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
    let r = c.exec(&req).map_err(|e| match e {
        agent::AgentError::InvalidRequest(m) => OpError::new(ErrorKind::BadRequest, m),
        agent::AgentError::Remote { code, message } => {
            OpError::new(ErrorKind::BadRequest, format!("VM {id}: {code}: {message}"))
        }
        other => OpError::internal(format!("VM {id}: exec: {other}")),
    })?;
    Ok(ExecOutcome {
        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        code: r.code,
        signal: r.signal,
        timed_out: r.timed_out,
    })
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
