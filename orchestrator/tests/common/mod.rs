//! Helpers of the jailer tests: a throw-away base directory, running the `jailer` binary
//! with a timeout, reading a jailed script's output, cleaning up cgroups, and locating and
//! feeding the real `vmm`.

#![allow(dead_code, reason = "each test file uses a different subset")]

pub mod daemon;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const JAILER: &str = env!("CARGO_BIN_EXE_jailer");
pub const BUSYBOX: &str = "/bin/busybox";
pub const UID: u32 = 12345;
pub const GID: u32 = 23456;
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn preflight() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the jailer tests need root");
    assert!(
        Path::new("/dev/kvm").exists(),
        "the jailer tests need /dev/kvm"
    );
    assert!(
        Path::new(BUSYBOX).exists(),
        "the jailer tests need a static {BUSYBOX} (apt-get install busybox-static)"
    );
}

/// A root-owned 0755 base directory for one test, removed at the end.
pub struct Base(pub PathBuf);

impl Base {
    pub fn new(name: &str) -> Base {
        preflight();
        let p = std::env::temp_dir().join(format!("jailer-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        Base(p)
    }

    /// The jail root of `id` for the exec file named `exe`.
    pub fn root(&self, exe: &str, id: &str) -> PathBuf {
        self.0.join(exe).join(id).join("root")
    }

    /// A host file in the base (outside every jail).
    pub fn file(&self, name: &str, body: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::write(&p, body).unwrap();
        p
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `jailer --id ID --exec-file EXE --uid --gid --chroot-base-dir BASE EXTRA... -- ARGS...`.
pub fn jailer(base: &Base, exe: &str, id: &str, extra: &[&str], args: &[&str]) -> Command {
    let mut c = Command::new(JAILER);
    c.args(["--id", id, "--exec-file", exe])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--chroot-base-dir")
        .arg(&base.0)
        .args(extra)
        .arg("--")
        .args(args);
    c
}

/// A busybox shell script in the jail.
pub fn shell(base: &Base, id: &str, extra: &[&str], script: &str) -> Command {
    jailer(base, BUSYBOX, id, extra, &["sh", "-c", script])
}

pub struct Done {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs to the end (at most TIMEOUT).
pub fn run(cmd: &mut Command) -> Done {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let code = wait(&mut child);
    Done {
        code,
        stdout: out.recv().unwrap(),
        stderr: err.recv().unwrap(),
    }
}

pub fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx
}

pub fn wait(child: &mut Child) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("the jailer did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills a still-running jailer (and so its jailed child) when a test fails half-way.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            // SAFETY: kill with a pid we spawned and have not reaped.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

/// Reads lines until one equals `marker` (at most TIMEOUT); returns those before it.
pub fn lines_until(out: &mut BufReader<ChildStdout>, marker: &str) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    loop {
        let mut l = String::new();
        // Reads block: the jailed scripts always print the marker or exit, which ends the
        // output.
        let n = out.read_line(&mut l).unwrap();
        assert!(n > 0, "output ended before {marker:?}: {got:#?}");
        let l = l.trim_end_matches('\n').to_string();
        if l == marker {
            return got;
        }
        got.push(l);
        assert!(
            Instant::now() < deadline,
            "no {marker:?} within {TIMEOUT:?}"
        );
    }
}

/// The lines between `--NAME` and the next `--` line.
pub fn section<'a>(lines: &'a [String], name: &str) -> Vec<&'a str> {
    lines
        .iter()
        .skip_while(|l| **l != format!("--{name}"))
        .skip(1)
        .take_while(|l| !l.starts_with("--"))
        .map(String::as_str)
        .collect()
}

/// The cgroups a `--json` jailer run reports on its first stdout line, and a guard that
/// removes their parents at the end.
pub fn report_cgroups(d: &Done) -> (Vec<PathBuf>, CgroupCleanup) {
    let report: serde_json::Value = serde_json::from_str(d.stdout.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("no report ({e}): {}\n{}", d.stdout, d.stderr));
    let cgroups: Vec<PathBuf> = report["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| PathBuf::from(v.as_str().unwrap()))
        .collect();
    let cleanup = CgroupCleanup(cgroups.iter().map(|c| c.parent().unwrap().into()).collect());
    (cgroups, cleanup)
}

/// Removes the per-test parent cgroups (and any leaf left in them) at the end.
pub struct CgroupCleanup(pub Vec<PathBuf>);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        for parent in &self.0 {
            if let Ok(entries) = fs::read_dir(parent) {
                for e in entries.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
            let _ = fs::remove_dir(parent);
        }
    }
}

pub fn read_trim(p: &Path) -> String {
    fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// The `vmm` binary of this build: `$VMM_BIN`, or the one cargo builds next to this test's
/// binaries (`cargo test --workspace` builds it; alone: `cargo build -p vmm`).
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/jailer-<hash>
    let p = exe.parent().unwrap().parent().unwrap().join("vmm");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p vmm) or set VMM_BIN",
        p.display()
    );
    p
}

/// `--file` values putting a dynamic binary's loader and libraries at their host paths.
pub fn library_files(bin: &str) -> Vec<String> {
    orchestrator::daemon::vm::shared_libraries(Path::new(bin))
        .into_iter()
        .map(|l| format!("{}:{}", l.display(), l.display()))
        .collect()
}

/// A hand-made x86_64 ELF "kernel" (no PVH note, so entered in long mode at 0x100000) that
/// writes 42 to the status port (0x441: the guest's exit status), then resets the machine
/// through the i8042 (port 0x64, 0xfe).
pub fn tiny_guest_elf() -> Vec<u8> {
    elf_with_code(&[
        0x66, 0xba, 0x41, 0x04, // mov dx, 0x441
        0xb0, 0x2a, // mov al, 42
        0xee, // out dx, al
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
    ])
}

/// A hand-made guest that spins forever (`jmp $`): a VM that keeps running.
pub fn spinning_guest_elf() -> Vec<u8> {
    elf_with_code(&[0xeb, 0xfe])
}

/// An x86_64 ELF executable loading `code` at 0x100000 and entering it there.
fn elf_with_code(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let code_off = 64 + 56;
    let mut e = b"\x7fELF\x02\x01\x01\x00".to_vec();
    e.resize(16, 0);
    e.extend(2u16.to_le_bytes()); // ET_EXEC
    e.extend(0x3eu16.to_le_bytes()); // EM_X86_64
    e.extend(1u32.to_le_bytes());
    e.extend(LOAD.to_le_bytes()); // e_entry
    e.extend(64u64.to_le_bytes()); // e_phoff
    e.extend(0u64.to_le_bytes()); // e_shoff
    e.extend(0u32.to_le_bytes()); // e_flags
    for h in [64u16, 56, 1, 0, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        e.extend(h.to_le_bytes());
    }
    e.extend(1u32.to_le_bytes()); // PT_LOAD
    e.extend(5u32.to_le_bytes()); // R+X
    let len = code.len() as u64;
    for v in [code_off as u64, LOAD, LOAD, len, len, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        e.extend(v.to_le_bytes());
    }
    assert_eq!(e.len(), code_off);
    e.extend(code);
    e
}

pub fn assert_refused(d: &Done, code: i32, needles: &[&str]) {
    assert_eq!(d.code, Some(code), "stderr:\n{}", d.stderr);
    for n in needles {
        assert!(d.stderr.contains(n), "no {n:?} in:\n{}", d.stderr);
    }
}

/// Removes a directory at the end.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
