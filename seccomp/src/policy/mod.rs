//! The policies: which syscalls each thread kind may make once its filter is in, as plain
//! data ([`Policy`]), and their compilation to BPF with seccompiler ([`compile`]).
//!
//! This module is also compiled into the crate's build script (`build.rs` includes it by
//! path), which compiles every (thread kind, level) pair to BPF at build time. So it may
//! only use `std`, `libc` and `seccompiler`, and nothing else from this crate.
//!
//! Each thread kind has its own file with one commented rule per syscall: `vmm` (the main
//! thread, running the event loop and the API's actions), `vcpu` and `api`. A rule with no
//! argument checks allows the syscall whatever its arguments; a rule with checks allows it
//! only if one of its alternatives holds. At [`SeccompLevel::SyscallsOnly`] the checks are
//! dropped and every listed syscall is allowed with any arguments.

mod api;
pub(crate) mod ioctls;
mod vcpu;
mod vmm;

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kinds of thread the VMM runs, each with its own policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: event loop, device emulation, API actions (pause, snapshot).
    Vmm,
    /// A vCPU thread: KVM_RUN and the port/MMIO exits it handles.
    Vcpu,
    /// The `vmm_api` thread: HTTP over the API socket on a tokio current-thread runtime.
    Api,
}

impl ThreadKind {
    /// Every kind, in the order the summary prints them.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api];

    /// A short name: `vmm`, `vcpu`, `api`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
        }
    }
}

/// How much filtering `vmm --seccomp-level` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SeccompLevel {
    /// 0: no filter at all (debugging only).
    Off,
    /// 1: the allow-list of syscall numbers, arguments not checked (debugging only).
    SyscallsOnly,
    /// 2: the allow-list with its argument checks (ioctl request numbers, socket family,
    /// open flags, signal numbers, ...). The default.
    #[default]
    Full,
}

impl SeccompLevel {
    /// The level for `--seccomp-level N`.
    pub fn from_number(n: u8) -> Option<SeccompLevel> {
        match n {
            0 => Some(SeccompLevel::Off),
            1 => Some(SeccompLevel::SyscallsOnly),
            2 => Some(SeccompLevel::Full),
            _ => None,
        }
    }

    /// The number `--seccomp-level` takes.
    pub fn number(self) -> u8 {
        match self {
            SeccompLevel::Off => 0,
            SeccompLevel::SyscallsOnly => 1,
            SeccompLevel::Full => 2,
        }
    }
}

/// One argument check: the low 32 bits of argument `arg` (all checks here are on ints,
/// flags or ioctl request numbers, which the kernel reads as 32-bit values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// Argument index, 0 to 5.
    pub arg: u8,
    /// What must hold of it.
    pub test: Test,
}

/// What a [`Check`] tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// Equal to the value.
    Eq(u32),
    /// None of the bits of the mask set.
    NoBits(u32),
}

/// One alternative: every check must hold.
pub type Alternative = Vec<Check>;

/// The syscalls a thread kind may make. A syscall maps to its alternatives; an empty list
/// means any arguments.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: BTreeMap<i64, Vec<Alternative>>,
}

impl Policy {
    /// Allows `nr` with any arguments.
    fn allow(&mut self, nr: libc::c_long) {
        // Any-arguments wins over a narrower rule given elsewhere.
        self.rules.insert(nr, Vec::new());
    }

    /// Allows `nr` when one of `alternatives` holds. Adds to the alternatives already
    /// given for `nr`, unless it is already allowed with any arguments.
    fn allow_if(&mut self, nr: libc::c_long, alternatives: Vec<Alternative>) {
        match self.rules.get_mut(&nr) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.extend(alternatives),
            None => {
                self.rules.insert(nr, alternatives);
            }
        }
    }

    /// The allowed syscall numbers, ascending.
    pub fn syscalls(&self) -> Vec<i64> {
        self.rules.keys().copied().collect()
    }

    /// The alternatives for `nr` (empty: any arguments), or `None` if it is not allowed.
    pub fn alternatives(&self, nr: i64) -> Option<&[Alternative]> {
        self.rules.get(&nr).map(Vec::as_slice)
    }
}

/// Argument `arg` equals `value`.
fn eq(arg: u8, value: u32) -> Check {
    Check {
        arg,
        test: Test::Eq(value),
    }
}

/// Argument `arg` has none of the bits of `mask`.
fn no_bits(arg: u8, mask: u32) -> Check {
    Check {
        arg,
        test: Test::NoBits(mask),
    }
}

/// One alternative per value: argument `arg` is one of `values`.
fn one_of(arg: u8, values: &[u32]) -> Vec<Alternative> {
    values.iter().map(|&v| vec![eq(arg, v)]).collect()
}

/// A libc constant that is a non-negative int, as the 32-bit value a check compares.
const fn u32_of(v: libc::c_int) -> u32 {
    v.unsigned_abs()
}

/// The thread kind's policy.
pub fn policy(kind: ThreadKind) -> Policy {
    let mut p = Policy::default();
    common(&mut p);
    match kind {
        ThreadKind::Vmm => vmm::add(&mut p),
        ThreadKind::Vcpu => vcpu::add(&mut p),
        ThreadKind::Api => api::add(&mut p),
    }
    p
}

/// What every thread needs once running, whatever it does.
fn common(p: &mut Policy) {
    // Mutexes, condition variables, channels, thread join and parking all wait on futexes.
    p.allow(libc::SYS_futex);
    // std's channels back off with yield_now while they spin.
    p.allow(libc::SYS_sched_yield);
    // Instant::now and timeouts. Normally the vDSO answers; the syscall is its fallback
    // when the host clocksource has no vDSO support.
    p.allow(libc::SYS_clock_gettime);
    // The allocator: glibc malloc maps and unmaps chunks and arenas, grows an arena with
    // mprotect, gives pages back with madvise, and Vec growth of large buffers remaps.
    // New executable memory is never needed, so PROT_EXEC is refused.
    p.allow_if(
        libc::SYS_mmap,
        vec![vec![no_bits(2, u32_of(libc::PROT_EXEC))]],
    );
    p.allow_if(
        libc::SYS_mprotect,
        vec![vec![no_bits(2, u32_of(libc::PROT_EXEC))]],
    );
    p.allow(libc::SYS_munmap);
    p.allow(libc::SYS_mremap);
    p.allow(libc::SYS_madvise);
    // glibc trims the main arena with brk, also when another thread frees into it.
    p.allow(libc::SYS_brk);
    // Dropping fds (eventfds, kvm_run and vCPU fds at the end, sockets, files).
    p.allow(libc::SYS_close);
    // Builds with debug assertions (the test builds) check that an fd is open before
    // closing it: std's OwnedFd drop asks fcntl(fd, F_GETFD).
    p.allow_if(libc::SYS_fcntl, vec![vec![eq(1, u32_of(libc::F_GETFD))]]);
    // Returning from a signal handler (the vCPU kick, the SIGSYS handler).
    p.allow(libc::SYS_rt_sigreturn);
    // The SIGSYS handler unblocks SIGSYS before re-raising it; glibc blocks signals
    // around thread exit and abort().
    p.allow(libc::SYS_rt_sigprocmask);
    // The SIGSYS handler resets SIGSYS to its default action before re-raising it, and
    // abort() does the same for SIGABRT. No other handler changes after the filters.
    p.allow_if(
        libc::SYS_rt_sigaction,
        one_of(0, &[u32_of(libc::SIGSYS), u32_of(libc::SIGABRT)]),
    );
    // The SIGSYS handler and abort() (panic=abort in release builds) send the signal to
    // their own thread: getpid, gettid, tgkill. The main thread's own tgkill (the vCPU
    // kick) is added in `vmm`.
    p.allow(libc::SYS_getpid);
    p.allow(libc::SYS_gettid);
    p.allow_if(
        libc::SYS_tgkill,
        one_of(2, &[u32_of(libc::SIGSYS), u32_of(libc::SIGABRT)]),
    );
    // A thread's end: std takes down the thread's alternate signal stack, then exit. A
    // fatal error ends the process with exit_group.
    p.allow(libc::SYS_sigaltstack);
    p.allow(libc::SYS_exit);
    p.allow(libc::SYS_exit_group);
    // The SIGSYS line and panic messages go to stderr; every thread also writes eventfds.
    p.allow(libc::SYS_write);
}

/// The BPF seccompiler makes of `kind`'s policy at `level`: SIGSYS (trap) for anything
/// not allowed. `None` at [`SeccompLevel::Off`].
pub fn compile(
    kind: ThreadKind,
    level: SeccompLevel,
    arch: TargetArch,
) -> Result<Option<BpfProgram>, seccompiler::Error> {
    if level == SeccompLevel::Off {
        return Ok(None);
    }
    let p = policy(kind);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (&nr, alternatives) in &p.rules {
        let mut out = Vec::new();
        if level == SeccompLevel::Full {
            for alt in alternatives {
                let conditions = alt
                    .iter()
                    .map(|c| {
                        let (op, value) = match c.test {
                            Test::Eq(v) => (SeccompCmpOp::Eq, u64::from(v)),
                            Test::NoBits(m) => (SeccompCmpOp::MaskedEq(u64::from(m)), 0),
                        };
                        SeccompCondition::new(c.arg, SeccompCmpArgLen::Dword, op, value)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                out.push(SeccompRule::new(conditions)?);
            }
        }
        rules.insert(nr, out);
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)?;
    Ok(Some(BpfProgram::try_from(filter)?))
}
