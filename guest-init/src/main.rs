//! guest-init: PID 1 inside the guest.
//!
//! Its job, in order: mount /proc, /sys, /dev, /tmp and /run; read its parameters from the kernel
//! command line; print `guest-init: ready`; start the guest agent if `gi.agent=` asks for
//! it; run the command (`gi.cmd=`) or, without one, a built-in summary (or, with the agent
//! on, serve the agent until a `Shutdown` request); print `guest-init: exit status N`; and
//! end the VM. It must never panic as PID 1 (the kernel would panic with it): every error is
//! printed and leads to a clean end of the VM, with exit status 1 reported for errors of
//! guest-init's own. The agent's errors stay inside the agent's connection.
//!
//! The console lines are the contract with whoever runs the VM (`vmm`, qemu, a test):
//! - `guest-init: ready`
//! - `guest-init: agent listening on vsock port P` (with `gi.agent=P`)
//! - `guest-init: exit status N` (N as a shell reports it: 128+signal for a killed command)
//! - `guest-init: error: ...` for a failure of guest-init itself, followed by exit status 1.
//!
//! Children: one reaper thread collects every exit status in the guest (PID 1 inherits all
//! orphans) and routes each to whoever started that child: the main command here, an agent
//! exec, or the workload a manifest started over the agent (see `reaper.rs`, `workload/`).

use std::io::Write;
use std::process::Command;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything guest-init says goes through here: one line, straight to the console, and
/// never a panic if the console is gone.
fn say(msg: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "guest-init: {msg}");
    let _ = out.flush();
}

macro_rules! say {
    ($($arg:tt)*) => { say(format_args!($($arg)*)) };
}

mod cmdline;
mod reaper;
mod server;
mod sys;
mod workload;

use cmdline::{EndAction, Params};
use reaper::Reaper;
use server::{ServerContext, ShutdownStage};
use workload::{Workload, WorkloadConfig};

/// What the main thread waits for once the workload is running.
enum MainEvent {
    /// The main command exited with this raw wait status.
    CommandExited(libc::c_int),
    /// Progress of an agent `Shutdown` request.
    Shutdown(ShutdownStage),
}

/// How long to wait, after acknowledging `Shutdown`, for the host to close its connection.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Exit status reported when a `Shutdown` request ends the VM under a running command: the
/// command dies with the VM, as if killed (128 + SIGKILL).
const STATUS_CUT_SHORT: u8 = 137;

fn mount_early_filesystems() -> Result<(), String> {
    const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mounts: [(&str, &str, libc::c_ulong, &str); 4] = [
        ("proc", "/proc", NOSUID_NODEV_NOEXEC, ""),
        ("sysfs", "/sys", NOSUID_NODEV_NOEXEC, ""),
        ("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755"),
        (
            "tmpfs",
            "/tmp",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (fstype, target, flags, data) in mounts {
        sys::mount(fstype, target, flags, data).map_err(|e| format!("mount {target}: {e}"))?;
    }
    // /run holds the manifest the agent receives. Not fatal: a guest that never gets a
    // manifest does not need it, and one that does is told why it fails.
    if let Err(e) = sys::mount(
        "tmpfs",
        "/run",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    ) {
        say!("note: mount /run: {e} (a manifest cannot be stored)");
    }
    Ok(())
}

/// The default when no `gi.cmd` is given: a one-line description of the machine, which is
/// what the README's demo prints.
fn summary() -> u8 {
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    say!("no gi.cmd given; kernel {kernel}, {cpus} cpu(s), MemTotal {mem_kib} kB");
    0
}

fn run_command(
    argv: &[String],
    reaper: &Reaper,
    events: &Sender<MainEvent>,
    rx: &Receiver<MainEvent>,
) -> u8 {
    let Some((prog, args)) = argv.split_first() else {
        return 1;
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .env("HOME", "/")
        .env("TERM", "linux")
        .current_dir("/");
    let tx = events.clone();
    let on_exit = Box::new(move |raw| {
        let _ = tx.send(MainEvent::CommandExited(raw));
    });
    // The Child only matters for its pid, which the reaper already has; dropping it neither
    // waits nor kills.
    if let Err(e) = reaper.spawn(&mut cmd, on_exit) {
        say!("error: cannot run {prog:?}: {e}");
        return 127;
    }
    loop {
        match rx.recv() {
            Ok(MainEvent::CommandExited(raw)) => {
                let (status, signal) = sys::shell_status(raw);
                if let Some(sig) = signal {
                    say!("command killed by signal {sig}");
                }
                return status;
            }
            Ok(MainEvent::Shutdown(ShutdownStage::Requested)) => {
                say!("shutdown requested over the agent; the command is still running");
                await_shutdown_close(rx);
                return STATUS_CUT_SHORT;
            }
            Ok(MainEvent::Shutdown(ShutdownStage::Closed)) => {}
            // Cannot happen: `events` is a live sender.
            Err(_) => return 1,
        }
    }
}

/// Starts the agent on vsock `port`; reports failures on the console.
fn start_agent(
    port: u32,
    reaper: &Arc<Reaper>,
    started: Instant,
    events: &Sender<MainEvent>,
) -> bool {
    let listener =
        match agent::vsock::VsockListener::bind_with_backlog(port, server::listen::BACKLOG) {
            Ok(l) => l,
            Err(e) => {
                say!("error: agent: vsock port {port}: {e}");
                return false;
            }
        };
    let tx = events.clone();
    let ctx = ServerContext {
        reaper: Arc::clone(reaper),
        started,
        on_shutdown: Box::new(move |stage| {
            let _ = tx.send(MainEvent::Shutdown(stage));
        }),
        workload: Workload::new(WorkloadConfig::guest(), Arc::clone(reaper)),
        machine: Box::new(server::resync::Guest),
    };
    if let Err(e) = server::listen::spawn_accept_loop(listener, Arc::new(ctx)) {
        say!("error: agent: starting its thread: {e}");
        return false;
    }
    say!("agent listening on vsock port {port}");
    true
}

/// Without a command: serve the agent until a `Shutdown` request.
fn serve_until_shutdown(rx: &Receiver<MainEvent>) -> u8 {
    loop {
        match rx.recv() {
            Ok(MainEvent::Shutdown(ShutdownStage::Requested)) => {
                say!("shutdown requested over the agent");
                await_shutdown_close(rx);
                return 0;
            }
            Ok(_) => {}
            // Cannot happen: main holds a sender.
            Err(_) => return 1,
        }
    }
}

/// Gives the host up to [`SHUTDOWN_GRACE`] to close its connection after `ShutdownOk`, so
/// the acknowledgement is out of the guest before the VM ends.
fn await_shutdown_close(rx: &Receiver<MainEvent>) {
    let deadline = Instant::now().checked_add(SHUTDOWN_GRACE);
    loop {
        let left = deadline.map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(left) {
            Ok(MainEvent::Shutdown(ShutdownStage::Closed)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn finish(end: EndAction, port: Option<&sys::StatusPort>, status: u8) -> ! {
    say!("exit status {status}");
    if let Some(p) = port {
        p.exit_status(status);
    }
    let err = sys::end_vm(end);
    // Only reached if reboot(2) failed. Exiting PID 1 makes the kernel panic, and with the
    // `panic=-1` the VMMs pass, that reboots the VM: the VM still ends.
    say!("error: ending the VM failed: {err}");
    std::process::exit(i32::from(status));
}

fn main() {
    let started = Instant::now();
    let is_pid1 = std::process::id() == 1;
    // Last line of defence: a panic must still end the VM cleanly, not panic the kernel.
    std::panic::set_hook(Box::new(|info| {
        say!("error: internal panic: {info}");
        say!("exit status 1");
        if std::process::id() == 1 {
            let _ = sys::end_vm(EndAction::Reboot);
        }
    }));

    if !is_pid1 {
        // Outside a VM, reboot(2) and port I/O would act on the host: refuse.
        say!("error: must run as PID 1 inside a VM (it reboots the machine when done)");
        std::process::exit(2);
    }
    if let Err(e) = mount_early_filesystems() {
        sys::ensure_console_stdio();
        say!("error: {e}");
        finish(EndAction::Reboot, None, 1);
    }
    sys::ensure_console_stdio();

    let text = match std::fs::read_to_string("/proc/cmdline") {
        Ok(t) => t,
        Err(e) => {
            say!("error: reading /proc/cmdline: {e}");
            finish(EndAction::Reboot, None, 1);
        }
    };
    let params = match cmdline::parse(&text) {
        Ok(p) => p,
        Err(e) => {
            say!("error: {e}");
            let port = cmdline::status_port_only(&text).and_then(|p| sys::StatusPort::open(p).ok());
            finish(Params::default().end, port.as_ref(), 1);
        }
    };
    let port = match params.status_port.map(sys::StatusPort::open) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            say!("error: status port: {e} (continuing without it)");
            None
        }
    };

    let reaper = Arc::new(Reaper::new());
    if let Err(e) = reaper.start() {
        say!("error: starting the child reaper: {e}");
        finish(params.end, port.as_ref(), 1);
    }
    let (events, rx) = mpsc::channel();

    say!("ready");
    if let Some(p) = &port {
        p.ready();
    }
    let agent_on = match params.agent_port {
        Some(agent_port) => {
            let on = start_agent(agent_port, &reaper, started, &events);
            if !on && params.cmd.is_none() {
                // Nothing to run and nothing to serve.
                finish(params.end, port.as_ref(), 1);
            }
            on
        }
        None => false,
    };
    let status = match &params.cmd {
        Some(argv) => run_command(argv, &reaper, &events, &rx),
        None if agent_on => serve_until_shutdown(&rx),
        None => summary(),
    };
    finish(params.end, port.as_ref(), status);
}
