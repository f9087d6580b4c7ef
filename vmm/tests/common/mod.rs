//! Shared by the real-guest test files: builds a `vmm` command line and runs it to the end.

#![allow(dead_code, reason = "each test file uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::{require_genuine_kvm, run_with_timeout, Artifacts, RunOutput};

/// Longest a single test VM may run.
pub const TIMEOUT: Duration = Duration::from_secs(180);

/// One `vmm` run.
pub struct Guest {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    vcpus: u32,
    mem_mib: u64,
    gi_cmd: String,
    kernel_args: String,
    args: Vec<String>,
    timeout: Duration,
}

impl Guest {
    /// The project's ELF kernel with the initramfs, 1 vCPU, 128 MiB.
    pub fn new() -> Guest {
        let a = Artifacts::get();
        Guest {
            kernel: a.vmlinux,
            initrd: Some(a.initramfs),
            vcpus: 1,
            mem_mib: 128,
            gi_cmd: String::new(),
            kernel_args: String::new(),
            args: Vec::new(),
            timeout: TIMEOUT,
        }
    }

    /// Use another kernel image.
    pub fn kernel(mut self, k: &Path) -> Guest {
        self.kernel = k.into();
        self
    }

    /// Boot without an initrd (root from a drive).
    pub fn no_initrd(mut self) -> Guest {
        self.initrd = None;
        self
    }

    /// vCPUs and memory.
    pub fn machine(mut self, vcpus: u32, mem_mib: u64) -> Guest {
        self.vcpus = vcpus;
        self.mem_mib = mem_mib;
        self
    }

    /// guest-init's command (no double quotes inside).
    pub fn cmd(mut self, gi_cmd: &str) -> Guest {
        self.gi_cmd = gi_cmd.into();
        self
    }

    /// Extra kernel command-line parameters (before gi.cmd).
    pub fn kernel_args(mut self, args: &str) -> Guest {
        self.kernel_args.push(' ');
        self.kernel_args.push_str(args);
        self
    }

    /// A longer limit for heavy workloads (everything in the guest runs emulated).
    pub fn timeout(mut self, t: Duration) -> Guest {
        self.timeout = t;
        self
    }

    /// Extra `vmm` flags.
    pub fn args(mut self, args: &[&str]) -> Guest {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Adds `--drive path=..,id=..[,readonly][,root]`.
    pub fn drive(self, path: &Path, id: &str, readonly: bool, root: bool) -> Guest {
        let spec = format!(
            "path={},id={id},readonly={readonly},root={root}",
            path.display()
        );
        self.args(&["--drive", &spec])
    }

    /// Runs the VM to its end and returns its output (console and VMM stderr).
    pub fn run(self) -> RunOutput {
        require_genuine_kvm();
        let mut cmdline = String::from("console=ttyS0 reboot=k panic=-1 quiet");
        cmdline.push_str(&self.kernel_args);
        if !self.gi_cmd.is_empty() {
            cmdline.push_str(&format!(" gi.cmd=\"{}\"", self.gi_cmd));
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
        cmd.arg("--kernel").arg(&self.kernel);
        if let Some(i) = &self.initrd {
            cmd.arg("--initrd").arg(i);
        }
        cmd.args(["--vcpus", &self.vcpus.to_string()])
            .args(["--memory-mib", &self.mem_mib.to_string()])
            .args(["--cmdline", &cmdline])
            .args(&self.args);
        let out = run_with_timeout(&mut cmd, self.timeout);
        assert!(
            !out.timed_out,
            "VM did not finish in {:?}:\n{}",
            self.timeout, out.output
        );
        assert!(!out.output.contains("panicked"), "{}", out.output);
        out
    }
}

/// The value the guest printed as `KEY=value`.
pub fn guest_value(out: &RunOutput, key: &str) -> String {
    let prefix = format!("{key}=");
    out.output
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("guest printed no {key}=:\n{}", out.output))
}

/// A private copy of the root image in a fresh temporary directory.
pub fn scratch_copy(src: &Path, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vmm-test-{}-{}",
        std::process::id(),
        name.replace('/', "_")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}
