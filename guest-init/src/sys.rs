//! Thin wrappers over the few system calls PID 1 needs: mounts, the console, the VMM's
//! status port, the clock, hostname and entropy pool (for the agent's resync) and the final
//! reboot. Each returns an `io::Error` instead of panicking.
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

/// The current hostname.
pub fn hostname() -> io::Result<String> {
    // HOST_NAME_MAX is 64; the rest is room for the terminating NUL and then some.
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which is writable and outlives the
    // call; the kernel writes at most `buf.len()` bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(buf.get(..len).unwrap_or_default()).into_owned())
}

/// `CLOCK_REALTIME`, in nanoseconds since the Unix epoch (negative before it).
pub fn realtime_ns() -> io::Result<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call; the kernel only writes it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// Splits nanoseconds since the Unix epoch into a `timespec`'s seconds and nanoseconds.
pub fn unix_ns_to_timespec(unix_time_ns: u64) -> io::Result<(libc::time_t, libc::c_long)> {
    const NS_PER_SEC: u64 = 1_000_000_000;
    let too_far = || io::Error::new(io::ErrorKind::InvalidInput, "time out of range");
    let sec = libc::time_t::try_from(unix_time_ns / NS_PER_SEC).map_err(|_| too_far())?;
    let nsec = libc::c_long::try_from(unix_time_ns % NS_PER_SEC).map_err(|_| too_far())?;
    Ok((sec, nsec))
}

/// Sets `CLOCK_REALTIME` (needs CAP_SYS_TIME, which PID 1 has).
pub fn set_realtime(unix_time_ns: u64) -> io::Result<()> {
    let (tv_sec, tv_nsec) = unix_ns_to_timespec(unix_time_ns)?;
    let ts = libc::timespec { tv_sec, tv_nsec };
    // SAFETY: `ts` is a valid timespec that outlives the call; the kernel only reads it.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `RNDADDENTROPY` from `<linux/random.h>`: `_IOW('R', 0x03, int[2])`.
pub const RNDADDENTROPY: libc::Ioctl = libc::_IOW::<[libc::c_int; 2]>(b'R' as u32, 0x03);

/// The argument of `RNDADDENTROPY`, `struct rand_pool_info { int entropy_count; int
/// buf_size; __u32 buf[]; }`, built as `u32` words so it is aligned like the C struct:
/// `entropy_count` is 8 bits per byte of `seed`, `buf_size` its length in bytes, and the
/// bytes follow (the last word zero-padded).
pub fn rand_pool_info(seed: &[u8]) -> io::Result<Vec<u32>> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "entropy seed too large");
    let buf_size = libc::c_int::try_from(seed.len()).map_err(|_| too_big())?;
    let bits = buf_size.checked_mul(8).ok_or_else(too_big)?;
    let mut words = Vec::with_capacity(2 + seed.len().div_ceil(4));
    // The two ints travel as their bit patterns; both are non-negative.
    words.push(u32::from_ne_bytes(bits.to_ne_bytes()));
    words.push(u32::from_ne_bytes(buf_size.to_ne_bytes()));
    for chunk in seed.chunks(4) {
        let mut word = [0u8; 4];
        for (slot, b) in word.iter_mut().zip(chunk) {
            *slot = *b;
        }
        words.push(u32::from_ne_bytes(word));
    }
    Ok(words)
}

/// Adds `seed` to the kernel's entropy pool through `/dev/urandom`, crediting 8 bits per
/// byte with `RNDADDENTROPY` (needs CAP_SYS_ADMIN). If the ioctl fails, writes the bytes to
/// `/dev/urandom` instead, which mixes them in without credit. Returns whether they were
/// credited; an error only if both failed.
pub fn add_entropy(seed: &[u8]) -> io::Result<bool> {
    add_entropy_at(std::path::Path::new("/dev/urandom"), seed)
}

/// [`add_entropy`] on a given device node.
fn add_entropy_at(path: &std::path::Path, seed: &[u8]) -> io::Result<bool> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut dev = std::fs::OpenOptions::new().write(true).open(path)?;
    let info = rand_pool_info(seed)?;
    // SAFETY: `info` is a complete rand_pool_info (header plus `buf_size` bytes of buffer,
    // u32-aligned) that outlives the call; the kernel only reads it. On anything other than
    // the random device the ioctl fails (ENOTTY) without touching memory.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc == 0 {
        return Ok(true);
    }
    let ioctl_err = io::Error::last_os_error();
    dev.write_all(seed).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "RNDADDENTROPY: {ioctl_err}; writing to {}: {e}",
                path.display()
            ),
        )
    })?;
    Ok(false)
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
    fn rndaddentropy_is_the_kernel_number() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
    }

    #[test]
    fn rand_pool_info_layout() {
        let seed: Vec<u8> = (1..=33).collect();
        let words = rand_pool_info(&seed).unwrap();
        assert_eq!(words.len(), 2 + 9);
        assert_eq!(words[0], 33 * 8);
        assert_eq!(words[1], 33);
        let bytes: Vec<u8> = words[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(&bytes[..33], &seed[..]);
        assert_eq!(&bytes[33..], &[0, 0, 0]);
    }

    #[test]
    fn entropy_falls_back_to_a_plain_write() {
        // A regular file refuses the ioctl (ENOTTY), so the bytes are written instead: the
        // fallback path, without touching the host's entropy pool.
        let path = std::env::temp_dir().join(format!("gi-entropy-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let seed = [7u8; 32];
        assert!(!add_entropy_at(&path, &seed).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), seed);
        std::fs::remove_file(&path).unwrap();
        assert!(add_entropy_at(&path, &seed).is_err());
    }

    #[test]
    fn clock_and_hostname_reads() {
        let ns = realtime_ns().unwrap();
        assert!(ns > 1_600_000_000 * 1_000_000_000);
        assert!(!hostname().unwrap().contains('\0'));
        assert_eq!(unix_ns_to_timespec(1_500_000_000_250).unwrap(), (1500, 250));
        assert_eq!(
            unix_ns_to_timespec(u64::MAX).unwrap(),
            (18_446_744_073, 709_551_615)
        );
    }

    #[test]
    fn status_port_rejects_wrapping_range() {
        assert!(StatusPort::open(u16::MAX).is_err());
    }
}
