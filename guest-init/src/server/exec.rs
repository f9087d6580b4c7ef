//! One `Exec` request: start the program through the reaper, pump its pipes on helper
//! threads, stream the output to the host as it arrives, enforce the timeout, and report how
//! it ended. The semantics are documented in the `agent` crate's docs ("Exec").
//!
//! Threads and channels: a thread per output pipe reads chunks of at most `MAX_DATA_CHUNK`
//! into a bounded channel (so a slow host slows the program down instead of filling guest
//! memory), a thread writes stdin, and this thread writes frames. The reaper thread reports
//! the exit through a slot plus a non-blocking wake-up on the same channel.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agent::{write_message, ErrorCode, ExecStart, ExitInfo, Message, MAX_DATA_CHUNK};

use super::{send_error, shorten, ServeError};
use crate::reaper::Reaper;

/// Base environment of an exec and of the workload; the request's `env` overrides and
/// extends it.
pub(crate) const BASE_ENV: [(&str, &str); 2] =
    [("PATH", "/bin:/sbin:/usr/bin:/usr/sbin"), ("HOME", "/")];

/// Output chunks buffered between the pipe threads and the connection.
const CHANNEL_DEPTH: usize = 8;

/// After the program exits, stop waiting for its pipes to close once no output came for
/// this long: a background process may hold them open indefinitely.
const DRAIN_IDLE: Duration = Duration::from_millis(200);

/// ...and stop after this long in any case, even if such a process keeps writing.
const DRAIN_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

enum Event {
    Output(Stream, Vec<u8>),
    Eof,
    /// The reaper stored the exit status; look at the slot.
    Exited,
}

type Slot = Arc<Mutex<Option<libc::c_int>>>;

fn take(slot: &Slot) -> Option<libc::c_int> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// SIGKILLs the program's process group (it leads its own, see `process_group(0)`), then
/// the program itself in case it left the group. Called only before its exit was reported,
/// so its pid has not been recycled.
pub(crate) fn kill_group(pid: libc::pid_t) {
    // SAFETY: kill has no memory effects; a stale target just yields ESRCH.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

fn pump<R: Read>(mut pipe: R, stream: Stream, tx: &SyncSender<Event>) {
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let Some(data) = buf.get(..n) else { break };
                if tx.send(Event::Output(stream, data.to_vec())).is_err() {
                    // The exec is over (the host went away or we stopped draining).
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = tx.send(Event::Eof);
}

/// Starts the pipe threads. On failure the caller kills the program.
fn start_pumps(
    child: &mut Child,
    tx: &SyncSender<Event>,
    stdin: Option<Vec<u8>>,
) -> std::io::Result<()> {
    let pipes = [
        (
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            Stream::Stdout,
        ),
        (
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            Stream::Stderr,
        ),
    ];
    for (pipe, stream) in pipes {
        let tx = tx.clone();
        let Some(pipe) = pipe else {
            // Cannot happen with Stdio::piped(); count the stream as closed.
            let _ = tx.send(Event::Eof);
            continue;
        };
        std::thread::Builder::new()
            .name("agent-pipe".into())
            .spawn(move || pump(pipe, stream, &tx))?;
    }
    if let (Some(mut pipe), Some(data)) = (child.stdin.take(), stdin) {
        // A program that exits without reading gets EPIPE here (Rust ignores SIGPIPE);
        // either way the pipe is closed when the thread ends, which is the program's EOF.
        std::thread::Builder::new()
            .name("agent-stdin".into())
            .spawn(move || {
                let _ = pipe.write_all(&data);
            })?;
    }
    Ok(())
}

/// `t + d`, or `t` in the (theoretical) case the clock would overflow.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

/// How a raw wait status ended the program.
pub(crate) fn exit_info(raw: libc::c_int, timed_out: bool) -> ExitInfo {
    ExitInfo {
        code: libc::WIFEXITED(raw).then(|| libc::WEXITSTATUS(raw)),
        signal: libc::WIFSIGNALED(raw).then(|| libc::WTERMSIG(raw)),
        timed_out,
    }
}

/// Runs one exec. `Ok` means the connection can go on (also after an `Error` answer);
/// `Err` means it must close.
pub fn run<W: Write>(
    out: &mut W,
    reaper: &Reaper,
    start: &ExecStart,
    stdin: Option<Vec<u8>>,
) -> Result<(), ServeError> {
    if let Err(msg) = start.validate() {
        send_error(out, ErrorCode::BadRequest, &msg);
        return Ok(());
    }
    let Some((program, args)) = start.argv.split_first() else {
        send_error(out, ErrorCode::BadRequest, "argv is empty");
        return Ok(());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(BASE_ENV)
        .envs(start.env.iter().map(|(k, v)| (k, v)))
        .current_dir(start.cwd.as_deref().unwrap_or("/"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);

    let (tx, rx) = mpsc::sync_channel(CHANNEL_DEPTH);
    let slot: Slot = Arc::default();
    let on_exit = {
        let (slot, tx) = (Arc::clone(&slot), tx.clone());
        Box::new(move |status| {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
            // Never block the reaper: if the channel is full, the exec loop has events to
            // read and looks at the slot after each one.
            let _ = tx.try_send(Event::Exited);
        })
    };
    let (mut child, pid) = match reaper.spawn(&mut cmd, on_exit) {
        Ok(c) => c,
        Err(e) => {
            let cwd = start.cwd.as_deref().unwrap_or("/");
            send_error(
                out,
                ErrorCode::ExecFailed,
                &format!(
                    "cannot run {:?} in {:?}: {e}",
                    shorten(program, 128),
                    shorten(cwd, 128)
                ),
            );
            return Ok(());
        }
    };
    let pumps = start_pumps(&mut child, &tx, stdin);
    drop(tx);
    drop(child); // Only held the pipes; dropping a Child neither waits nor kills.
    if let Err(e) = pumps {
        kill_group(pid);
        send_error(
            out,
            ErrorCode::Internal,
            &format!("starting pipe threads: {e}"),
        );
        return Ok(());
    }

    let deadline = start
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let mut open_pipes = 2u8;
    let mut status: Option<(libc::c_int, Instant)> = None;
    let mut last_event = Instant::now();
    let mut timed_out = false;
    let raw = loop {
        if status.is_none() {
            if let Some(raw) = take(&slot) {
                // The idle window for draining starts at the exit, not at the last output.
                last_event = Instant::now();
                status = Some((raw, last_event));
            }
        }
        let wake_at = match status {
            Some((raw, _)) if open_pipes == 0 => break raw,
            Some((_, exited_at)) => {
                Some(later(last_event, DRAIN_IDLE).min(later(exited_at, DRAIN_MAX)))
            }
            None if timed_out => None,
            None => deadline,
        };
        let event = match wake_at {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match event {
            Ok(Event::Output(stream, data)) => {
                last_event = Instant::now();
                let msg = match stream {
                    Stream::Stdout => Message::Stdout(data),
                    Stream::Stderr => Message::Stderr(data),
                };
                if let Err(e) = write_message(out, &msg) {
                    // The host is gone: nobody will see this program's output.
                    if status.is_none() {
                        kill_group(pid);
                    }
                    return Err(ServeError::Frame(e));
                }
            }
            Ok(Event::Eof) => {
                last_event = Instant::now();
                open_pipes = open_pipes.saturating_sub(1);
            }
            Ok(Event::Exited) => {}
            Err(RecvTimeoutError::Timeout) => match status {
                Some((raw, _)) => break raw,
                None => {
                    kill_group(pid);
                    timed_out = true;
                }
            },
            Err(RecvTimeoutError::Disconnected) => {
                // Every sender is gone: both pumps ended and the exit callback ran, so the
                // slot holds the status (picked up at the top of the loop).
                if status.is_none()
                    && slot
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_none()
                {
                    send_error(out, ErrorCode::Internal, "lost the program's exit status");
                    return Ok(());
                }
                open_pipes = 0;
            }
        }
    };
    write_message(out, &Message::Exit(exit_info(raw, timed_out))).map_err(ServeError::Frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_info_from_raw_status() {
        assert_eq!(
            exit_info(3 << 8, false),
            ExitInfo {
                code: Some(3),
                signal: None,
                timed_out: false
            }
        );
        assert_eq!(
            exit_info(9, true),
            ExitInfo {
                code: None,
                signal: Some(9),
                timed_out: true
            }
        );
    }
}
