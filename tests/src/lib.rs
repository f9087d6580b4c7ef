//! Helpers for the real-guest integration tests and the KVM test host.
//!
//! Real-guest tests need a KVM that can boot Linux. This machine's /dev/kvm is kvm-pvm, so
//! those tests are marked `#[ignore = "needs a genuine KVM ..."]` and counted as ignored
//! (skipped) by a plain `cargo test`. `.ci/run` runs them with `--ignored` inside the KVM test
//! host (`tests/testhost/run`); there [`require_genuine_kvm`] makes any that still lack a
//! genuine KVM fail loudly instead of passing.

pub mod jail;
pub mod kvm_probe;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The text every ignored real-guest test carries.
pub const NEEDS_KVM: &str = "needs a genuine KVM: run inside the test host (tests/testhost/run)";

/// Panics (fails the test) unless /dev/kvm can boot Linux.
pub fn require_genuine_kvm() {
    if let Err(why) = kvm_probe::genuine_kvm() {
        panic!("this test {NEEDS_KVM}; here {why}");
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Paths of the guest artifacts built by `scripts/setup.sh` (kernel-config/build.sh and
/// scripts/build-images.sh), all under `target/guest/`.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// Uncompressed ELF kernel with the PVH note.
    pub vmlinux: PathBuf,
    /// Compressed bzImage of the same kernel.
    pub bzimage: PathBuf,
    /// newc initramfs with guest-init as /init and busybox.
    pub initramfs: PathBuf,
    /// ext4 root image with guest-init as /sbin/init and busybox.
    pub rootfs: PathBuf,
}

impl Artifacts {
    /// Locates the artifacts and checks they exist, naming the missing file and the command
    /// that builds it.
    pub fn get() -> Artifacts {
        let dir = repo_root().join("target/guest");
        let a = Artifacts {
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            initramfs: dir.join("initramfs.cpio"),
            rootfs: dir.join("rootfs.ext4"),
        };
        for p in [&a.vmlinux, &a.bzimage, &a.initramfs, &a.rootfs] {
            assert!(
                p.exists(),
                "{} is missing: run scripts/setup.sh (or kernel-config/build.sh and scripts/build-images.sh)",
                p.display()
            );
        }
        a
    }
}

/// A finished process: its exit code (None if killed by a signal or the timeout), whether
/// the timeout hit, and its stdout and stderr together.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit code.
    pub code: Option<i32>,
    /// The process was killed because it ran past its timeout.
    pub timed_out: bool,
    /// stdout followed by stderr, lossily decoded, CRs removed.
    pub output: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `cmd` to completion or until `timeout`, then kills it. Never hangs.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> RunOutput {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut readers = Vec::new();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        readers.push(std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        }));
    }
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() > timeout => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    // A grandchild that inherited the pipes could keep them open after the child is gone;
    // never wait for the readers longer than a few seconds past the child's end.
    let mut output = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    for r in readers {
        while !r.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if r.is_finished() {
            let bytes = r.join().unwrap_or_default();
            output.push_str(&String::from_utf8_lossy(&bytes).replace('\r', ""));
        } else {
            output.push_str("\n[output pipe still open after the process ended; not read]\n");
        }
    }
    RunOutput {
        code: status.and_then(|s| s.code()),
        timed_out,
        output,
        elapsed: start.elapsed(),
    }
}

/// The status from guest-init's `guest-init: exit status N` console line, if present.
pub fn guest_exit_status(console: &str) -> Option<u8> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("guest-init: exit status "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// Whether guest-init printed its ready line.
pub fn guest_ready(console: &str) -> bool {
    console.lines().any(|l| l.trim() == "guest-init: ready")
}

/// How the guest is given its root.
#[derive(Debug, Clone)]
pub enum Root {
    /// The initramfs is the root.
    Initramfs(PathBuf),
    /// An ext4 image on virtio-blk as /dev/vda.
    Disk(PathBuf),
}

/// The peer VMM: `qemu-system-x86_64 -enable-kvm -M microvm` booting our kernel through its
/// PVH entry, with the serial console on stdout. Ends with the guest's reboot (`reboot=t`
/// plus `-no-reboot`: microvm has no i8042).
pub fn qemu_microvm(kernel: &Path, root: &Root, gi_cmd: &str, vcpus: u32, mem_mib: u32) -> Command {
    assert!(
        !gi_cmd.contains('"'),
        "gi.cmd {gi_cmd:?} has a double quote, which would end the kernel's own quoting"
    );
    let mut append = String::from("console=ttyS0 reboot=t panic=-1 quiet");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off"])
        .args(["-enable-kvm", "-cpu", "host"])
        .args(["-smp", &vcpus.to_string(), "-m", &mem_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(kernel);
    match root {
        Root::Initramfs(cpio) => {
            cmd.arg("-initrd").arg(cpio);
        }
        Root::Disk(img) => {
            cmd.arg("-drive")
                .arg(format!("id=root,file={},format=raw,if=none", img.display()))
                .args(["-device", "virtio-blk-device,drive=root"]);
            append.push_str(" root=/dev/vda rw");
        }
    }
    if !gi_cmd.is_empty() {
        append.push_str(&format!(" gi.cmd=\"{gi_cmd}\""));
    }
    cmd.arg("-append").arg(append);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_parsing() {
        let console = "boot\nguest-init: ready\nhello\nguest-init: exit status 7\n";
        assert_eq!(guest_exit_status(console), Some(7));
        assert!(guest_ready(console));
        assert_eq!(guest_exit_status("guest-init: ready\n"), None);
        assert!(!guest_ready("guest-init: readyish\n"));
        assert_eq!(
            guest_exit_status("guest-init: exit status 300\n"),
            None,
            "out of range for u8"
        );
    }

    #[test]
    fn run_with_timeout_kills_a_hung_process() {
        let out = run_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200));
        assert!(out.timed_out);
        assert!(out.elapsed < Duration::from_secs(10));
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "echo hi; echo err >&2; exit 4"]),
            Duration::from_secs(10),
        );
        assert_eq!(out.code, Some(4));
        assert!(!out.timed_out);
        assert!(out.output.contains("hi") && out.output.contains("err"));
    }

    #[test]
    fn tiny_guest_runs_on_this_machines_kvm() {
        // Works on kvm-pvm and on hardware KVM alike; a machine without /dev/kvm fails here
        // with the reason rather than passing.
        let exits = kvm_probe::run_tiny_guest().expect("tiny guest");
        assert_eq!(exits, vec!["io-out port=0x3f8 data=[42]", "hlt"]);
    }
}
