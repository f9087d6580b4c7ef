//! The VMM's seccomp filters, through the `vmm` binary, with a tiny hand-assembled guest on
//! this machine's /dev/kvm (kvm-pvm included, as in snapshot_tiny.rs: the guest has no
//! in-kernel irqchip and reaches the VMM as a restored snapshot, the one way the binary
//! runs such a guest).
//!
//! The guest prints `OK` on COM1 and halts, which ends the VM. Under the default filters
//! (level 2) that whole run works; with the debug-build hook, vCPU 0 makes a forbidden
//! syscall right after installing its filter, and the VMM must die by SIGSYS with a line
//! naming the thread and the syscall.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tiny::TinyGuest;
use common::{run_vmm_cli, VmmProcess};
use devices::legacy::ConsoleOutput;

/// Prints "OK\n" on port 0x3f8, then halts (a VM end without an irqchip).
#[rustfmt::skip]
const OK_GUEST: &[u8] = &[
    0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
    0xb0, b'O', 0xee,             // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee,             // mov al, 'K'; out dx, al
    0xb0, b'\n', 0xee,            // mov al, '\n'; out dx, al
    0xf4,                         // hlt
];

/// What the SIGSYS handler writes for the test hook's syscall.
const SIGSYS_LINE: &str =
    "vmm: seccomp: thread vcpu0 made forbidden syscall 41 (socket); killing the process";

const LIMIT: Duration = Duration::from_secs(30);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-seccomp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A snapshot of the OK guest before it ran its first instruction: (vmstate, memory).
fn ok_guest_snapshot(dir: &Path) -> (String, String) {
    let mut guest = TinyGuest::new(OK_GUEST, ConsoleOutput::discard());
    let set = guest.start(true);
    let (vmstate, memfile) = (dir.join("vmstate"), dir.join("mem"));
    guest.snapshot(set, &vmstate, &memfile);
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    (s(vmstate), s(memfile))
}

/// Runs `vmm --restore` of the OK guest with `extra` flags to its end: (status, output).
fn run_ok_guest(name: &str, extra: &[&str]) -> (std::process::ExitStatus, String) {
    // A process killed by SIGSYS would dump core: not here.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the initialised struct; lowering our own core limit (which
    // the vmm child inherits) affects nothing else.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    let dir = temp_dir(name);
    let (vmstate, mem) = ok_guest_snapshot(&dir);
    let mut args = vec!["--restore", &vmstate, "--memory", &mem, "--resume"];
    args.extend_from_slice(extra);
    let mut vmm = VmmProcess::start(&dir, "vmm", false, &args);
    let status = vmm.wait(LIMIT);
    let out = vmm.output();
    let _ = std::fs::remove_dir_all(&dir);
    (status, out)
}

#[test]
fn a_guest_runs_to_its_end_under_the_full_filters() {
    let (status, out) = run_ok_guest("full", &[]);
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("OK\n"), "{out}");
    assert!(out.contains("vmm: guest ended"), "{out}");
    assert!(!out.contains("forbidden syscall"), "{out}");
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the test hook exists in debug builds only"
)]
fn a_forbidden_syscall_on_a_vcpu_kills_the_vmm_by_sigsys_naming_it() {
    for level in ["2", "1"] {
        let (status, out) = run_ok_guest(
            &format!("forbidden{level}"),
            &[
                "--seccomp-level",
                level,
                "--debug-forbidden-syscall-on-vcpu",
            ],
        );
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "level {level}: {status}\n{out}"
        );
        assert!(out.contains(SIGSYS_LINE), "level {level}:\n{out}");
        // Killed before the guest ran a single instruction.
        assert!(!out.contains("OK\n"), "level {level}:\n{out}");
    }
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the test hook exists in debug builds only"
)]
fn level_0_installs_no_filter() {
    let (status, out) = run_ok_guest(
        "off",
        &["--seccomp-level", "0", "--debug-forbidden-syscall-on-vcpu"],
    );
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("OK\n"), "{out}");
    assert!(!out.contains("forbidden syscall"), "{out}");
}

#[test]
fn summary_counts_each_thread_kinds_syscalls() {
    let out = run_vmm_cli(&["--print-seccomp-summary"]);
    assert_eq!(out.code, Some(0), "{}", out.output);
    for kind in ["vmm", "vcpu", "api"] {
        let line = out
            .output
            .lines()
            .find(|l| l.starts_with(&format!("{kind}: ")))
            .unwrap_or_else(|| panic!("no {kind} line:\n{}", out.output));
        let count: usize = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line:?}"));
        assert!(count > 10, "{line}");
        if kind == "vcpu" {
            assert!(count <= 30, "{line}");
        }
    }
}

#[test]
fn seccomp_level_must_be_0_1_or_2() {
    let out = run_vmm_cli(&["--seccomp-level", "3"]);
    assert_eq!(out.code, Some(2), "{}", out.output);
    assert!(out.output.contains("--seccomp-level"), "{}", out.output);
    let help = run_vmm_cli(&["--help"]);
    assert!(help.output.contains("--seccomp-level"), "{}", help.output);
    assert!(help.output.contains("debugging"), "{}", help.output);
    assert!(
        !help.output.contains("--debug-forbidden-syscall-on-vcpu"),
        "the test hook is hidden"
    );
}
