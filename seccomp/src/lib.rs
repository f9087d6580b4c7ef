//! Seccomp policies for the VMM, one per thread kind: the main thread (event loop and API
//! actions), the vCPU threads and the `vmm_api` thread. The policies are Rust data in
//! `policy/` (one reviewed file per thread kind, a comment on each rule); `build.rs`
//! compiles each to BPF with seccompiler at build time, and [`install`] copies the ready
//! program into the kernel for the calling thread only (no TSYNC: each thread installs its
//! own, after its setup and before any guest code runs).
//!
//! A forbidden syscall traps: the SIGSYS handler (`sigsys`) writes
//! `vmm: seccomp: thread NAME made forbidden syscall NR (NAME); killing the process` to
//! stderr and the process dies by SIGSYS.
//!
//! Boundary: this crate knows syscalls and ioctl numbers, not the VMM; the VMM decides
//! when each thread calls [`install`].

mod names;
pub(crate) mod policy;
mod sigsys;

pub use names::{syscall_name, syscall_number};
pub use policy::{compile, policy, Alternative, Check, Policy, SeccompLevel, Test, ThreadKind};
pub use seccompiler::BpfProgram;

/// The programs build.rs compiled.
mod prebuilt {
    /// One BPF instruction: code, jump if true, jump if false, constant.
    pub(crate) type Insn = (u16, u8, u8, u32);
    include!(concat!(env!("OUT_DIR"), "/filters.rs"));
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the {kind} seccomp filter")]
    Apply {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
}

/// What the VMM was asked to filter, handed to each place that installs a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeccompSettings {
    /// How much to filter.
    pub level: SeccompLevel,
    /// Test hook (set only by a debug build's hidden flag): vCPU 0 makes a syscall its
    /// policy forbids ([`forbidden_syscall`]) right after installing its filter.
    pub forbidden_syscall_on_vcpu0: bool,
}

impl SeccompSettings {
    /// No filters (library users and in-process tests).
    pub const OFF: SeccompSettings = SeccompSettings {
        level: SeccompLevel::Off,
        forbidden_syscall_on_vcpu0: false,
    };
}

/// The BPF program for `kind` at `level`, as build.rs compiled it; `None` at
/// [`SeccompLevel::Off`].
pub fn filter(kind: ThreadKind, level: SeccompLevel) -> Option<BpfProgram> {
    use prebuilt::*;
    let insns: &[Insn] = match (kind, level) {
        (_, SeccompLevel::Off) => return None,
        (ThreadKind::Vmm, SeccompLevel::SyscallsOnly) => VMM_1,
        (ThreadKind::Vmm, SeccompLevel::Full) => VMM_2,
        (ThreadKind::Vcpu, SeccompLevel::SyscallsOnly) => VCPU_1,
        (ThreadKind::Vcpu, SeccompLevel::Full) => VCPU_2,
        (ThreadKind::Api, SeccompLevel::SyscallsOnly) => API_1,
        (ThreadKind::Api, SeccompLevel::Full) => API_2,
    };
    Some(
        insns
            .iter()
            .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
            .collect(),
    )
}

/// Installs `kind`'s filter at `level` on the calling thread (and the process-wide SIGSYS
/// handler, once). `thread_name` is what the SIGSYS line calls this thread. Does nothing
/// at [`SeccompLevel::Off`].
pub fn install(
    kind: ThreadKind,
    level: SeccompLevel,
    thread_name: &str,
) -> Result<(), SeccompError> {
    let Some(bpf) = filter(kind, level) else {
        return Ok(());
    };
    sigsys::set_thread_name(thread_name);
    sigsys::install_handler().map_err(SeccompError::Handler)?;
    seccompiler::apply_filter(&bpf).map_err(|source| SeccompError::Apply {
        kind: kind.name(),
        source,
    })
}

/// The syscall [`SeccompSettings::forbidden_syscall_on_vcpu0`] makes: `socket` (41),
/// which no vCPU ever needs. Under the vCPU filter it never returns.
pub fn forbidden_syscall() {
    // SAFETY: a plain syscall without pointer arguments; if it is allowed (no filter),
    // the socket it returns is closed at once.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

/// How many syscalls `kind` may make (the same at levels 1 and 2).
pub fn allowed_count(kind: ThreadKind) -> usize {
    policy(kind).syscalls().len()
}

/// One line per thread kind: how many syscalls it may make, and which.
pub fn summary() -> String {
    let mut out = String::new();
    for kind in ThreadKind::ALL {
        let p = policy(kind);
        let names: Vec<String> = p
            .syscalls()
            .iter()
            .map(|&nr| {
                let name = syscall_name(nr).map_or_else(|| nr.to_string(), str::to_string);
                match p.alternatives(nr) {
                    Some([]) | None => name,
                    Some(_) => format!("{name}*"),
                }
            })
            .collect();
        out.push_str(&format!(
            "{}: {} syscalls: {}\n",
            kind.name(),
            names.len(),
            names.join(" ")
        ));
    }
    out.push_str("(* = arguments checked at level 2)\n");
    out
}

#[cfg(test)]
mod tests;
