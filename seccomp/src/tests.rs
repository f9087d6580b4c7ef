use std::mem::size_of;

use seccompiler::TargetArch;

use super::policy::ioctls;
use super::*;

/// The vCPU threads run guest-facing code all the time; their policy stays small.
const VCPU_MAX_SYSCALLS: usize = 30;

#[test]
fn vcpu_policy_stays_small() {
    let n = allowed_count(ThreadKind::Vcpu);
    assert!(n <= VCPU_MAX_SYSCALLS, "vCPU policy allows {n} syscalls");
}

#[test]
fn build_time_programs_are_the_policies_compiled_now() {
    for kind in ThreadKind::ALL {
        for level in [SeccompLevel::SyscallsOnly, SeccompLevel::Full] {
            let now = policy::compile(kind, level, TargetArch::x86_64).unwrap();
            assert_eq!(filter(kind, level), now, "{kind:?} at {level:?}");
            assert!(
                now.is_some_and(|p| p.len() < 4096),
                "BPF programs are at most 4096"
            );
        }
        assert_eq!(filter(kind, SeccompLevel::Off), None);
    }
}

#[test]
fn every_policy_allows_what_the_sigsys_handler_and_thread_exit_need() {
    for kind in ThreadKind::ALL {
        let p = policy(kind);
        for name in [
            "write",
            "rt_sigaction",
            "rt_sigprocmask",
            "getpid",
            "gettid",
            "tgkill",
            "rt_sigreturn",
            "exit",
            "exit_group",
            "futex",
            "munmap",
            "sigaltstack",
            "madvise",
        ] {
            let nr = syscall_number(name).unwrap();
            assert!(p.alternatives(nr).is_some(), "{kind:?} lacks {name}");
        }
        // The handler resets SIGSYS and re-raises it: both must pass the argument checks.
        let sigsys = u32::try_from(libc::SIGSYS).unwrap();
        for name in ["rt_sigaction", "tgkill"] {
            let nr = syscall_number(name).unwrap();
            let alts = p.alternatives(nr).unwrap();
            assert!(
                alts.iter()
                    .any(|a| a.iter().all(|c| c.test == Test::Eq(sigsys))),
                "{kind:?}: {name} with SIGSYS"
            );
        }
    }
}

#[test]
fn the_test_hook_syscall_is_forbidden_on_vcpus_only_where_expected() {
    let socket = syscall_number("socket").unwrap();
    assert_eq!(socket, 41);
    assert!(policy(ThreadKind::Vcpu).alternatives(socket).is_none());
    assert!(policy(ThreadKind::Api).alternatives(socket).is_none());
}

#[test]
fn ioctls_are_restricted_by_request_number() {
    let ioctl = syscall_number("ioctl").unwrap();
    for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
        let p = policy(kind);
        let alts = p.alternatives(ioctl).unwrap();
        assert!(!alts.is_empty(), "{kind:?}: ioctl allowed with any request");
        assert!(alts.iter().all(|a| a.len() == 1 && a[0].arg == 1));
    }
    let request = |kind, req: u32| {
        policy(kind)
            .alternatives(ioctl)
            .is_some_and(|alts| alts.iter().any(|a| a[0].test == Test::Eq(req)))
    };
    assert!(request(ThreadKind::Vcpu, ioctls::KVM_RUN));
    assert!(!request(ThreadKind::Vmm, ioctls::KVM_RUN));
    assert!(request(ThreadKind::Vmm, ioctls::KVM_SET_CLOCK));
    assert!(!request(ThreadKind::Vcpu, ioctls::KVM_SET_CLOCK));
    assert!(policy(ThreadKind::Api).alternatives(ioctl).is_none());
}

#[test]
fn ioctl_numbers_match_the_headers() {
    use kvm_bindings::*;
    let size = |n: usize| u32::try_from(n).unwrap();
    assert_eq!(ioctls::SIZE_KVM_REGS, size(size_of::<kvm_regs>()));
    assert_eq!(ioctls::SIZE_KVM_SREGS, size(size_of::<kvm_sregs>()));
    assert_eq!(ioctls::SIZE_KVM_FPU, size(size_of::<kvm_fpu>()));
    assert_eq!(ioctls::SIZE_KVM_MSRS, size(size_of::<kvm_msrs>()));
    assert_eq!(ioctls::SIZE_KVM_CPUID2, size(size_of::<kvm_cpuid2>()));
    assert_eq!(
        ioctls::SIZE_KVM_LAPIC_STATE,
        size(size_of::<kvm_lapic_state>())
    );
    assert_eq!(ioctls::SIZE_KVM_MP_STATE, size(size_of::<kvm_mp_state>()));
    assert_eq!(
        ioctls::SIZE_KVM_VCPU_EVENTS,
        size(size_of::<kvm_vcpu_events>())
    );
    assert_eq!(ioctls::SIZE_KVM_DEBUGREGS, size(size_of::<kvm_debugregs>()));
    assert_eq!(ioctls::SIZE_KVM_XSAVE, size(size_of::<kvm_xsave>()));
    assert_eq!(ioctls::SIZE_KVM_XCRS, size(size_of::<kvm_xcrs>()));
    assert_eq!(
        ioctls::SIZE_KVM_CLOCK_DATA,
        size(size_of::<kvm_clock_data>())
    );
    assert_eq!(ioctls::SIZE_KVM_IRQCHIP, size(size_of::<kvm_irqchip>()));
    assert_eq!(
        ioctls::SIZE_KVM_PIT_STATE2,
        size(size_of::<kvm_pit_state2>())
    );
    // Well-known encodings.
    assert_eq!(ioctls::KVM_RUN, 0xae80);
    assert_eq!(ioctls::KVM_GET_REGS, 0x8090_ae81);
    assert_eq!(ioctls::KVM_GET_SREGS, 0x8138_ae83);
    assert_eq!(ioctls::KVM_GET_CLOCK, 0x8030_ae7c);
    assert_eq!(ioctls::KVM_SET_CLOCK, 0x4030_ae7b);
    // libc's c_ulong is u64 on x86_64.
    assert_eq!(u64::from(ioctls::TUNSETOFFLOAD), libc::TUNSETOFFLOAD);
    assert_eq!(u64::from(ioctls::FIONBIO), libc::FIONBIO);
}

#[test]
fn syscall_names() {
    assert_eq!(syscall_name(0), Some("read"));
    assert_eq!(syscall_name(41), Some("socket"));
    assert_eq!(syscall_name(110), Some("getppid"));
    assert_eq!(syscall_name(435), Some("clone3"));
    assert_eq!(syscall_name(100_000), None);
    assert_eq!(syscall_name(-1), None);
    assert_eq!(syscall_number("ioctl"), Some(libc::SYS_ioctl));
}

#[test]
fn summary_names_each_kind_with_its_count() {
    let s = summary();
    for kind in ThreadKind::ALL {
        let line = format!("{}: {} syscalls:", kind.name(), allowed_count(kind));
        assert!(s.contains(&line), "{s}");
    }
    assert!(s.contains("ioctl*"), "{s}");
}

#[test]
fn levels_round_trip_their_numbers() {
    for n in 0..3 {
        assert_eq!(SeccompLevel::from_number(n).unwrap().number(), n);
    }
    assert_eq!(SeccompLevel::from_number(3), None);
    assert_eq!(SeccompLevel::default(), SeccompLevel::Full);
}

/// A thread under the API filter can block on a channel, write an eventfd, allocate,
/// and end (sigaltstack, munmap, madvise, exit): the filter only stays on that thread.
#[test]
fn a_filtered_thread_works_and_ends_cleanly() {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    // SAFETY: plain syscall; the fd is closed below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(efd >= 0);
    let t = std::thread::Builder::new()
        .name("filtered".into())
        .spawn(move || {
            install(ThreadKind::Api, SeccompLevel::Full, "filtered").unwrap();
            let got = rx.recv().unwrap();
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our eventfd.
            let n = unsafe { libc::write(efd, one.as_ptr().cast(), one.len()) };
            let big = vec![7u8; 8 << 20];
            got.len() + usize::try_from(n).unwrap() + big.len()
        })
        .unwrap();
    tx.send(vec![1, 2, 3]).unwrap();
    assert_eq!(t.join().unwrap(), 3 + 8 + (8 << 20));
    // SAFETY: closing the eventfd made above.
    unsafe { libc::close(efd) };
}

/// README's "Seccomp" table states each kind's count: keep it true.
#[test]
fn readme_counts_are_current() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    for kind in ThreadKind::ALL {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {} | ", kind.name())))
            .unwrap_or_else(|| panic!("README has no seccomp row for {}", kind.name()));
        let count = row
            .trim_end_matches(" |")
            .rsplit("| ")
            .next()
            .unwrap_or_default();
        assert_eq!(
            count,
            allowed_count(kind).to_string(),
            "README's count for {}: {row}",
            kind.name()
        );
    }
}
