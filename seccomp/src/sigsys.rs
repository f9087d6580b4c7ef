//! What happens on a forbidden syscall: the filter traps (SECCOMP_RET_TRAP), the kernel
//! sends SIGSYS to the thread, and [`on_sigsys`] writes one line naming the thread and the
//! syscall to stderr, then ends the process by SIGSYS:
//!
//! ```text
//! vmm: seccomp: thread vcpu0 made forbidden syscall 41 (socket); killing the process
//! ```
//!
//! The handler only makes async-signal-safe calls (write, sigaction, sigprocmask, getpid,
//! gettid, tgkill), each of which every policy allows, formats into a stack buffer, and
//! reads the thread's name from a const-initialised thread-local with no destructor (a
//! plain TLS read, no allocation or lazy initialisation).

use std::cell::Cell;
use std::sync::OnceLock;

use libc::{c_int, c_void, siginfo_t};

/// Longest thread name kept (the kernel's comm is 15 bytes).
const NAME_MAX: usize = 15;

thread_local! {
    /// This thread's name for the SIGSYS line, and its length.
    static NAME: Cell<([u8; NAME_MAX], usize)> = const { Cell::new(([0; NAME_MAX], 0)) };
}

/// Records the current thread's name for the SIGSYS line.
pub(crate) fn set_thread_name(name: &str) {
    let mut buf = [0u8; NAME_MAX];
    let len = name.len().min(NAME_MAX);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    NAME.with(|n| n.set((buf, len)));
}

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: c_int = 1;

/// The head of a SIGSYS `siginfo_t` on x86_64 (include/uapi/asm-generic/siginfo.h: the
/// three ints, padding to the union, then `_sigsys`). libc does not expose `_sigsys`.
#[repr(C)]
struct SigsysInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad: c_int,
    call_addr: *mut c_void,
    syscall: c_int,
    arch: u32,
}

/// Installs the SIGSYS handler (process-wide, once).
pub(crate) fn install_handler() -> Result<(), std::io::Error> {
    static DONE: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value to fill in.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `act` is initialised and outlives the call; `on_sigsys` has the
        // SA_SIGINFO signature and only makes async-signal-safe calls.
        let rc = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// A line assembled on the stack.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut v = n.unsigned_abs();
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            // v % 10 < 10, so the cast keeps the value.
            digits[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The SIGSYS handler: see the module docs.
extern "C" fn on_sigsys(_num: c_int, info: *mut siginfo_t, _ctx: *mut c_void) {
    let mut line = Line {
        buf: [0; 160],
        len: 0,
    };
    line.push(b"vmm: seccomp: thread ");
    let (name, len) = NAME.try_with(Cell::get).unwrap_or(([0; NAME_MAX], 0));
    if len == 0 {
        line.push(b"(unnamed)");
    } else {
        line.push(&name[..len]);
    }
    let seccomp = if info.is_null() {
        None
    } else {
        // SAFETY: the kernel passes a full siginfo_t (128 bytes) to an SA_SIGINFO
        // handler; SigsysInfo is a prefix of it for SIGSYS.
        let si = unsafe { &*info.cast::<SigsysInfo>() };
        (si.code == SYS_SECCOMP).then_some(i64::from(si.syscall))
    };
    match seccomp {
        Some(nr) => {
            line.push(b" made forbidden syscall ");
            line.push_number(nr);
            if let Some(name) = crate::names::syscall_name(nr) {
                line.push(b" (");
                line.push(name.as_bytes());
                line.push(b")");
            }
        }
        None => line.push(b" got SIGSYS not sent by seccomp"),
    }
    line.push(b"; killing the process\n");
    // SAFETY: writes `line.len` initialised bytes of a stack buffer to stderr; write is
    // async-signal-safe. A failed write changes nothing: the process dies anyway.
    let _ = unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
    die_by_sigsys();
}

/// Resets SIGSYS to its default action (end the process, with a core dump if enabled)
/// and sends it to this thread, unblocked.
fn die_by_sigsys() {
    // SAFETY: every call below is async-signal-safe and gets initialised arguments that
    // outlive it: a zeroed sigaction (SIG_DFL, no flags) and a sigset holding SIGSYS.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &dfl, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
        // Not reached: SIGSYS is fatal now. Should it not be, still end here.
        libc::_exit(128 + libc::SIGSYS);
    }
}
