//! Shared by the real-guest test files: builds a `vmm` command line and runs it to the end.

#![allow(dead_code, reason = "each test file uses a different subset")]

pub mod tiny;

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
        let (mut cmd, _jail) = tests::jail::maybe_jailed(cmd);
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

// ---- snapshot tests: a `vmm` process, its API, its memory ------------------------------

/// A raw HTTP/1.1 request over the API socket (a test client, not a parser): the status
/// and the body.
pub fn api_request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let body = body.unwrap_or_default();
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the answer");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    (status, body.to_string())
}

/// A running `vmm` whose stdout and stderr go to files in `dir`; killed on drop.
pub struct VmmProcess {
    /// The process.
    pub child: std::process::Child,
    /// Its directory (output files, and whatever the test puts there).
    pub dir: PathBuf,
    /// Its API socket, if started with one.
    pub sock: Option<PathBuf>,
    name: String,
    jail: Option<tests::jail::JailInfo>,
}

impl VmmProcess {
    /// Starts `vmm ARGS...` (plus `--api-sock DIR/NAME.sock` if `api`), output to
    /// `DIR/NAME.out`; with `api`, waits for the socket.
    pub fn start(dir: &Path, name: &str, api: bool, args: &[&str]) -> VmmProcess {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
        let sock = api.then(|| dir.join(format!("{name}.sock")));
        if let Some(s) = &sock {
            cmd.arg("--api-sock").arg(s);
        }
        cmd.args(args);
        let (mut cmd, jail) = tests::jail::maybe_jailed(cmd);
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut p = VmmProcess {
            child,
            dir: dir.to_path_buf(),
            sock,
            name: name.into(),
            jail,
        };
        if let Some(s) = p.sock.clone() {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::os::unix::net::UnixStream::connect(&s).is_err() {
                if let Some(st) = p.child.try_wait().unwrap() {
                    panic!("vmm exited ({st}) before serving its API:\n{}", p.output());
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no API socket:\n{}",
                    p.output()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        p
    }

    /// The VMM's process id (under the jailer, the jailed VMM's, not the jailer's).
    pub fn pid(&self) -> i32 {
        match &self.jail {
            Some(j) => j.vmm_pid(),
            None => i32::try_from(self.child.id()).unwrap(),
        }
    }

    /// stdout and stderr so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.out", self.name))).unwrap_or_default()
    }

    /// An API call: (status, body).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let sock = self.sock.as_ref().expect("started without --api-sock");
        api_request(sock, method, path, body)
    }

    /// An API call that must answer `status`; returns the body.
    pub fn api_expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> String {
        let (got, text) = self.api(method, path, body);
        assert_eq!(
            got,
            status,
            "{method} {path} {body:?}: {text}\n{}",
            self.output()
        );
        text
    }

    /// `GET /`'s state.
    pub fn state(&self) -> String {
        let body = self.api_expect("GET", "/", None, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["state"].as_str().unwrap().to_string()
    }

    /// Sends `sig` (to the jailer, which passes it on, when jailed) and waits (at most
    /// `limit`) for the exit.
    pub fn signal_and_wait(&mut self, sig: i32, limit: Duration) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, sig) };
        self.wait(limit)
    }

    /// Waits (at most `limit`) for the process to end; fails on a panic in its output.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let out = self.output();
                assert!(!out.contains("panicked"), "{out}");
                return st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "vmm still running after {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if std::thread::panicking() {
                eprintln!("--- {} output:\n{}", self.name, self.output());
            }
        }
    }
}

/// The values of the newline-terminated lines `KEY=value` of `text`, in order (a line cut
/// by a snapshot is not complete until its rest follows).
pub fn complete_values(text: &str, key: &str, radix: u32) -> Vec<u64> {
    let prefix = format!("{key}=");
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| u64::from_str_radix(l.trim().strip_prefix(&prefix)?, radix).ok())
        .collect()
}

/// A `/proc/PID/smaps_rollup` (or `status`) field in KiB, e.g. "Rss", "Pss", "Pss_Anon".
pub fn proc_kib(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .or_else(|_| std::fs::read_to_string(format!("/proc/{pid}/status")))
        .unwrap_or_default();
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} for pid {pid}:\n{text}"))
}

/// Bytes of disk a file takes (`st_blocks` * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Runs `vmm ARGS` to its end (30 s at most) for the command-line tests, failing the test
/// if it hangs or panics.
pub fn run_vmm_cli(args: &[&str]) -> RunOutput {
    let out = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_vmm")).args(args),
        Duration::from_secs(30),
    );
    assert!(!out.timed_out, "vmm hung on {args:?}");
    assert!(
        !out.output.contains("panicked"),
        "{args:?}:\n{}",
        out.output
    );
    out
}
