//! The workload: the long-running program a `Manifest` starts (semantics in the `agent`
//! crate's docs, "Manifest and workload" and "Logs").
//!
//! Starting one sets the hostname, stores the manifest, and spawns the program through the
//! reaper with stdout and stderr on one pipe. A pump thread moves the pipe's bytes into the
//! in-memory log ([`ring::LogRing`]) and hands a copy to a console thread, which writes it
//! to the console. The console copy is best effort through a bounded queue: a slow console
//! must not slow the workload down or hold guest memory, so chunks it cannot take are
//! left out (the log still has them).
//!
//! The reaper's exit callback only stores the status in an atomic: it runs on the reaper
//! thread, which must never block.
//!
//! What touches the machine (hostname, manifest directory, console) comes from
//! [`WorkloadConfig`], so tests on the host run real workloads without changing the host.

pub mod ring;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use agent::{
    ErrorCode, ErrorInfo, ManifestDelivery, WorkloadState, WorkloadStatusOk, LOG_RING_SIZE,
};

use crate::reaper::Reaper;
use crate::server::{exit_info, kill_group, shorten, BASE_ENV};
use ring::{LogRead, LogRing};

/// Name of the stored manifest inside [`WorkloadConfig::run_dir`].
pub const MANIFEST_FILE: &str = "manifest.json";

/// Bytes the pump reads from the workload's pipe at a time.
const PUMP_CHUNK: usize = 16 * 1024;

/// Chunks queued for the console before further ones are left out (at most
/// `CONSOLE_QUEUE * PUMP_CHUNK` bytes held).
const CONSOLE_QUEUE: usize = 16;

/// Marks "still running" in a workload's exit slot; real wait statuses fit in a c_int.
const RUNNING: i64 = i64::MIN;

/// Where the workload's side effects go.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Directory of the stored manifest (`/run` in the guest); created if missing.
    pub run_dir: PathBuf,
    /// Whether to set the hostname (off in tests on the host).
    pub set_hostname: bool,
    /// Where the output is copied (`/dev/console` in the guest); not created. `None`: nowhere.
    pub console: Option<PathBuf>,
    /// Bytes of output kept for `Logs`.
    pub log_capacity: usize,
}

impl WorkloadConfig {
    /// The configuration of guest-init as PID 1.
    pub fn guest() -> WorkloadConfig {
        WorkloadConfig {
            run_dir: PathBuf::from("/run"),
            set_hostname: true,
            console: Some(PathBuf::from("/dev/console")),
            log_capacity: LOG_RING_SIZE,
        }
    }
}

/// The latest workload, if any.
enum State {
    None,
    Started {
        pid: u32,
        /// The raw wait status once it exited, [`RUNNING`] until then.
        exit: Arc<AtomicI64>,
    },
}

/// Starts the workload and answers for it. Shared by every agent connection.
pub struct Workload {
    config: WorkloadConfig,
    reaper: Arc<Reaper>,
    state: Mutex<State>,
    /// Shared with the pump threads: every workload appends to the same stream.
    log: Arc<Mutex<LogRing>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section leaves the value consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn internal(what: &str, e: &io::Error) -> ErrorInfo {
    ErrorInfo::new(ErrorCode::Internal, format!("{what}: {e}"))
}

impl Workload {
    /// A workload slot with nothing started yet.
    pub fn new(config: WorkloadConfig, reaper: Arc<Reaper>) -> Workload {
        let log = Arc::new(Mutex::new(LogRing::new(config.log_capacity)));
        Workload {
            config,
            reaper,
            state: Mutex::new(State::None),
            log,
        }
    }

    /// Validates the delivery, applies it and starts its workload; returns the pid. The
    /// error is what the agent answers.
    pub fn start(&self, delivery: &ManifestDelivery) -> Result<u32, ErrorInfo> {
        delivery
            .validate()
            .map_err(|e| ErrorInfo::new(ErrorCode::BadRequest, e))?;
        // Held to the end, so two connections cannot start workloads at once.
        let mut state = lock(&self.state);
        if let State::Started { exit, .. } = &*state {
            if exit.load(Ordering::Acquire) == RUNNING {
                return Err(ErrorInfo::new(
                    ErrorCode::BadRequest,
                    "a workload is already running",
                ));
            }
        }
        if self.config.set_hostname {
            crate::sys::set_hostname(&delivery.hostname)
                .map_err(|e| internal("setting the hostname", &e))?;
        }
        write_manifest(&self.config.run_dir, delivery.manifest.get()).map_err(|e| {
            let path = self.config.run_dir.join(MANIFEST_FILE);
            internal(&format!("writing {}", path.display()), &e)
        })?;

        let spec = &delivery.workload;
        let Some((program, args)) = spec.argv.split_first() else {
            return Err(ErrorInfo::new(ErrorCode::BadRequest, "argv is empty"));
        };
        let cwd = spec.cwd.as_deref().unwrap_or("/");
        let (reader, writer) = io::pipe().map_err(|e| internal("creating a pipe", &e))?;
        let writer2 = writer
            .try_clone()
            .map_err(|e| internal("creating a pipe", &e))?;
        let exit = Arc::new(AtomicI64::new(RUNNING));
        let on_exit = {
            let exit = Arc::clone(&exit);
            Box::new(move |raw: libc::c_int| exit.store(i64::from(raw), Ordering::Release))
        };
        let spawned = {
            let mut cmd = Command::new(program);
            cmd.args(args)
                .env_clear()
                .envs(BASE_ENV)
                .envs(spec.env.iter().map(|(k, v)| (k, v)))
                .current_dir(cwd)
                .stdin(Stdio::null())
                .stdout(writer)
                .stderr(writer2)
                .process_group(0);
            self.reaper.spawn(&mut cmd, on_exit)
            // `cmd` goes here, and with it our copies of the pipe's write end: the pump
            // sees end-of-file once the workload (and whatever inherited it) is done.
        };
        let (child, pid) = spawned.map_err(|e| {
            ErrorInfo::new(
                ErrorCode::ExecFailed,
                format!(
                    "cannot run {:?} in {:?}: {e}",
                    shorten(program, 128),
                    shorten(cwd, 128)
                ),
            )
        })?;
        drop(child); // Holds no pipes; dropping a Child neither waits nor kills.
        let pid_u32 = u32::try_from(pid).unwrap_or(0);
        *state = State::Started { pid: pid_u32, exit };
        if let Err(e) = self.start_output(reader) {
            // Nobody would read its output: it would block once the pipe is full.
            kill_group(pid);
            return Err(internal("starting the output thread", &e));
        }
        crate::say(format_args!("workload started, pid {pid}"));
        Ok(pid_u32)
    }

    /// Starts the pump thread, and the console thread if there is a console.
    fn start_output(&self, reader: io::PipeReader) -> io::Result<()> {
        let console = self.config.console.as_deref().and_then(|path| {
            let opened = open_console(path);
            if let Err(e) = &opened {
                crate::say(format_args!(
                    "workload output not copied to {}: {e}",
                    path.display()
                ));
            }
            opened.ok()
        });
        let copy = match console {
            Some(file) => {
                let (tx, rx) = mpsc::sync_channel(CONSOLE_QUEUE);
                let skipped = Arc::new(AtomicU64::new(0));
                let for_thread = Arc::clone(&skipped);
                let started = std::thread::Builder::new()
                    .name("workload-console".into())
                    .spawn(move || console_writer(file, &rx, &for_thread));
                match started {
                    Ok(_) => Some(ConsoleCopy { tx, skipped }),
                    Err(e) => {
                        crate::say(format_args!("workload output not copied: {e}"));
                        None
                    }
                }
            }
            None => None,
        };
        let log = Arc::clone(&self.log);
        std::thread::Builder::new()
            .name("workload-pump".into())
            .spawn(move || pump(reader, &log, copy))?;
        Ok(())
    }

    /// The latest workload's state.
    pub fn status(&self) -> WorkloadStatusOk {
        match &*lock(&self.state) {
            State::None => WorkloadStatusOk::default(),
            State::Started { pid, exit } => {
                let raw = exit.load(Ordering::Acquire);
                let mut status = WorkloadStatusOk {
                    state: WorkloadState::Running,
                    pid: Some(*pid),
                    code: None,
                    signal: None,
                };
                if raw != RUNNING {
                    let info = exit_info(libc::c_int::try_from(raw).unwrap_or(0), false);
                    status.state = WorkloadState::Exited;
                    status.code = info.code;
                    status.signal = info.signal;
                }
                status
            }
        }
    }

    /// Up to `max` bytes of the log from absolute `offset` (see [`LogRing::read`]).
    pub fn read_log(&self, offset: u64, max: usize) -> LogRead {
        lock(&self.log).read(offset, max)
    }
}

/// Writes the manifest text to `dir/manifest.json`, mode 0600, replacing any earlier one
/// atomically (a reader never sees half a manifest).
fn write_manifest(dir: &Path, text: &str) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(".manifest.json.tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    drop(file);
    std::fs::rename(&tmp, dir.join(MANIFEST_FILE))
}

fn open_console(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
}

/// The pump's end of the console copy.
struct ConsoleCopy {
    tx: SyncSender<Vec<u8>>,
    /// Bytes left out because the queue was full, not yet reported.
    skipped: Arc<AtomicU64>,
}

/// Moves the workload's output into the log and, if it keeps up, to the console. Ends at
/// end-of-file: when every holder of the pipe's write end is gone.
fn pump<R: Read>(mut pipe: R, log: &Mutex<LogRing>, mut console: Option<ConsoleCopy>) {
    let mut buf = vec![0u8; PUMP_CHUNK];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let Some(data) = buf.get(..n) else { return };
        lock(log).append(data);
        if let Some(copy) = &console {
            match copy.tx.try_send(data.to_vec()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    let n = u64::try_from(n).unwrap_or(u64::MAX);
                    copy.skipped.fetch_add(n, Ordering::Relaxed);
                }
                // The console failed: stop copying, keep logging.
                Err(TrySendError::Disconnected(_)) => console = None,
            }
        }
    }
}

/// Writes queued output to the console as is; after a gap, says how much was left out.
fn console_writer(mut console: File, rx: &Receiver<Vec<u8>>, skipped: &AtomicU64) {
    while let Ok(chunk) = rx.recv() {
        let gap = skipped.swap(0, Ordering::Relaxed);
        if gap > 0 {
            let note = format!(
                "\nguest-init: {gap} bytes of workload output not shown here (see its logs)\n"
            );
            if console.write_all(note.as_bytes()).is_err() {
                return;
            }
        }
        if console.write_all(&chunk).is_err() {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
