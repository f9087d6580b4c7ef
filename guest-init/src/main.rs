//! guest-init: PID 1 inside the guest.
//!
//! Its job, in order: mount /proc, /sys, /dev and /tmp; read its parameters from the kernel
//! command line; print `guest-init: ready`; run the command (`gi.cmd=`) or, without one, a
//! built-in summary; print `guest-init: exit status N`; and end the VM. It must never panic
//! as PID 1 (the kernel would panic with it): every error is printed and leads to a clean
//! end of the VM, with exit status 1 reported for errors of guest-init's own.
//!
//! The console lines are the contract with whoever runs the VM (`vmm`, qemu, a test):
//! - `guest-init: ready`
//! - `guest-init: exit status N` (N as a shell reports it: 128+signal for a killed command)
//! - `guest-init: error: ...` for a failure of guest-init itself, followed by exit status 1.

mod cmdline;
mod sys;

use std::io::Write;
use std::process::Command;

use cmdline::{EndAction, Params};

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

fn run_command(argv: &[String]) -> u8 {
    let Some((prog, args)) = argv.split_first() else {
        return 1;
    };
    let child = Command::new(prog)
        .args(args)
        .env_clear()
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .env("HOME", "/")
        .env("TERM", "linux")
        .current_dir("/")
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            say!("error: cannot run {prog:?}: {e}");
            return 127;
        }
    };
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        say!("error: child pid out of range");
        return 1;
    };
    match sys::wait_for(pid) {
        Ok(raw) => {
            let (status, signal) = sys::shell_status(raw);
            if let Some(sig) = signal {
                say!("command killed by signal {sig}");
            }
            status
        }
        Err(e) => {
            say!("error: waiting for {prog:?}: {e}");
            1
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

    say!("ready");
    if let Some(p) = &port {
        p.ready();
    }
    let status = match &params.cmd {
        Some(argv) => run_command(argv),
        None => summary(),
    };
    finish(params.end, port.as_ref(), status);
}
