//! Thin wrappers over the few system calls PID 1 needs: mounts, the console, the VMM's
//! status port and the final reboot. Each returns an `io::Error` instead of panicking.
//! (Children are reaped in `reaper.rs`.)

use std::ffi::CString;
use std::io;

use crate::cmdline::EndAction;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

/// Mounts `fstype` at `target`, creating the directory first. Already-mounted (EBUSY) is
/// not an error: the kernel mounts devtmpfs itself for disk roots.
pub fn mount(fstype: &str, target: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    match std::fs::create_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let (src, tgt, fs, dat) = (cstr(fstype)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            dat.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(err)
}

/// Sets the machine's hostname (the UTS namespace's, which in the guest is the machine's).
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call; the
    // kernel copies them and checks the length against HOST_NAME_MAX itself.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes sure fds 0, 1 and 2 are open on the console. The kernel opens /dev/console for
/// init only if the node existed when init started; an initramfs without it leaves them
/// closed.
pub fn ensure_console_stdio() {
    // SAFETY: fcntl on a possibly closed fd only reads its flags.
    let stdout_ok = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1;
    if stdout_ok {
        return;
    }
    let Ok(path) = cstr("/dev/console") else {
        return;
    };
    // SAFETY: path is a valid C string; the returned fd is checked before use.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        if fd != target {
            // SAFETY: dup2 between fds this process owns.
            unsafe { libc::dup2(fd, target) };
        }
    }
    if fd > 2 {
        // SAFETY: fd was opened above and is no longer needed.
        unsafe { libc::close(fd) };
    }
}

/// Talks to the VMM's status device: offset 0 takes the ready marker, offset 1 the exit
/// status. Only used when the VMM announced the port with `gi.statusport=`.
pub struct StatusPort {
    base: u16,
}

impl StatusPort {
    /// Asks the kernel for access to the two ports.
    pub fn open(base: u16) -> io::Result<StatusPort> {
        if base > u16::MAX - 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "status port range wraps past 0xffff",
            ));
        }
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        let rc = unsafe { libc::ioperm(libc::c_ulong::from(base), 2, 1) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(StatusPort { base })
    }

    fn outb(&self, offset: u16, value: u8) {
        let port = self.base + offset;
        // SAFETY: ioperm granted access to base..base+2 in `open`, so this `out` cannot
        // fault; it only causes a VM exit that the VMM handles.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
        }
    }

    /// Signals "guest-init is ready" (the boot timer's end point).
    pub fn ready(&self) {
        self.outb(0, 1);
    }

    /// Hands the command's exit status to the VMM.
    pub fn exit_status(&self, status: u8) {
        self.outb(1, status);
    }
}

/// Flushes file systems and ends the VM. Returns only if the reboot call failed.
pub fn end_vm(action: EndAction) -> io::Error {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let cmd = match action {
        EndAction::Reboot => libc::RB_AUTOBOOT,
        EndAction::PowerOff => libc::RB_POWER_OFF,
        EndAction::Halt => libc::RB_HALT_SYSTEM,
    };
    // SAFETY: reboot takes a plain command value; it returns only on failure.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// Exit status as a shell reports it: the code for a normal exit, 128 + signal otherwise.
pub fn shell_status(raw: libc::c_int) -> (u8, Option<i32>) {
    if libc::WIFEXITED(raw) {
        (
            u8::try_from(libc::WEXITSTATUS(raw) & 0xff).unwrap_or(255),
            None,
        )
    } else if libc::WIFSIGNALED(raw) {
        let sig = libc::WTERMSIG(raw);
        (u8::try_from((128 + sig) & 0xff).unwrap_or(255), Some(sig))
    } else {
        (255, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_status_of_normal_exit_and_signal() {
        // Raw wait statuses as the kernel encodes them: exit code in bits 8..15, signal in
        // bits 0..6.
        assert_eq!(shell_status(7 << 8), (7, None));
        assert_eq!(shell_status(0), (0, None));
        assert_eq!(shell_status(9), (137, Some(9)));
    }

    #[test]
    fn mount_reports_errors_instead_of_panicking() {
        let err = mount("nosuchfs", "/nonexistent-dir/x", 0, "").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn status_port_rejects_wrapping_range() {
        assert!(StatusPort::open(u16::MAX).is_err());
    }
}
