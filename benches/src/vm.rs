//! Starting a VM under either VMM and timing it from the console.
//!
//! Both VMMs print the guest's serial console on stdout. The harness reads it line by line
//! on its own thread and stamps the moment `guest-init: ready` arrives, so the boot time is
//! "spawn the VMM process" to "guest-init's ready line read from the pipe": what a user of
//! either VMM would observe. Every run has a deadline after which the VMM is killed and the
//! run counts as failed; the harness never hangs on a stuck guest.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// guest-init's line once user space is up.
pub const READY_LINE: &str = "guest-init: ready";

/// guest-init's line after the command, followed by the status.
pub const EXIT_PREFIX: &str = "guest-init: exit status ";

/// The files a VM boots from.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Our `vmm` binary.
    pub vmm: PathBuf,
    /// The guest kernel (ELF vmlinux with the PVH note; both VMMs boot it through PVH).
    pub kernel: PathBuf,
    /// The initramfs with guest-init as /init.
    pub initrd: PathBuf,
}

/// The VM to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// guest-init's command (`gi.cmd`); `None` runs its built-in summary.
    pub gi_cmd: Option<String>,
    /// A raw data disk attached as the guest's first virtio-blk device (/dev/vda).
    pub disk: Option<PathBuf>,
    /// A virtio-net device on a host tap, configured by the kernel's `ip=`.
    pub net: Option<NetSpec>,
    /// A vsock device (CID 3) with this host socket; ours only (qemu's needs vhost-vsock).
    pub vsock_uds: Option<PathBuf>,
    /// guest-init serves its agent on this vsock port (`gi.agent=`).
    pub agent_port: Option<u32>,
}

/// The guest's network: one NIC on an existing host tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The host tap (created by the harness, with `host_ip` on it).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// The guest's IPv4 address (/24).
    pub guest_ip: String,
    /// The host end's IPv4 address.
    pub host_ip: String,
}

impl GuestSpec {
    /// The kernel command line after the console and reboot arguments.
    fn cmdline_tail(&self) -> Result<String> {
        let mut s = String::from("panic=-1 quiet");
        if let Some(n) = &self.net {
            s.push_str(&format!(
                " ip={}::{}:255.255.255.0::eth0:off",
                n.guest_ip, n.host_ip
            ));
        }
        if let Some(port) = self.agent_port {
            s.push_str(&format!(" gi.agent={port}"));
        }
        if let Some(cmd) = &self.gi_cmd {
            if cmd.contains('"') {
                bail!("gi.cmd {cmd:?} has a double quote, which would end the kernel's quoting");
            }
            s.push_str(&format!(" gi.cmd=\"{cmd}\""));
        }
        Ok(s)
    }
}

/// Which VMM a run used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This project's `vmm`.
    Ours,
    /// qemu microvm.
    Peer,
}

impl Side {
    /// "ours" or "peer".
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::Peer => "peer",
        }
    }
}

/// The command line that boots `spec` under `side`.
pub fn command(side: Side, inputs: &Inputs, spec: &GuestSpec) -> Result<Command> {
    let tail = spec.cmdline_tail()?;
    let mut cmd;
    match side {
        Side::Ours => {
            cmd = Command::new(&inputs.vmm);
            cmd.arg("--kernel")
                .arg(&inputs.kernel)
                .arg("--initrd")
                .arg(&inputs.initrd)
                .args(["--vcpus", &spec.vcpus.to_string()])
                .args(["--memory-mib", &spec.mem_mib.to_string()])
                .arg("--cmdline")
                .arg(format!("console=ttyS0 reboot=k {tail}"));
            if let Some(disk) = &spec.disk {
                cmd.arg("--drive")
                    .arg(format!("path={},id=data", disk.display()));
            }
            if let Some(n) = &spec.net {
                cmd.arg("--net").arg(format!("tap={},mac={}", n.tap, n.mac));
            }
            if let Some(uds) = &spec.vsock_uds {
                cmd.arg("--vsock")
                    .arg(format!("cid=3,uds={}", uds.display()));
            }
        }
        Side::Peer => {
            // microvm has no i8042, so the guest's reboot goes through the triple-fault path
            // (reboot=t), and -no-reboot turns that into qemu exiting.
            cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off"])
                .args(["-enable-kvm", "-cpu", "host"])
                .args(["-smp", &spec.vcpus.to_string()])
                .args(["-m", &spec.mem_mib.to_string()])
                .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
                .args(["-serial", "stdio", "-monitor", "none"])
                .arg("-kernel")
                .arg(&inputs.kernel)
                .arg("-initrd")
                .arg(&inputs.initrd)
                .arg("-append")
                .arg(format!("console=ttyS0 reboot=t {tail}"));
            if let Some(disk) = &spec.disk {
                cmd.arg("-drive")
                    .arg(format!(
                        "id=data,file={},format=raw,if=none",
                        disk.display()
                    ))
                    .args(["-device", "virtio-blk-device,drive=data"]);
            }
            if let Some(n) = &spec.net {
                cmd.arg("-netdev")
                    .arg(format!(
                        "tap,id=n0,ifname={},script=no,downscript=no",
                        n.tap
                    ))
                    .arg("-device")
                    .arg(format!("virtio-net-device,netdev=n0,mac={}", n.mac));
            }
            if spec.vsock_uds.is_some() {
                bail!("qemu microvm's vsock needs vhost-vsock, which the test host lacks");
            }
        }
    }
    Ok(cmd)
}

/// A finished, successful run.
#[derive(Debug)]
pub struct VmRun<T> {
    /// Spawn to the ready line.
    pub ready: Duration,
    /// What the at-ready probe returned.
    pub probe: T,
    /// The last console lines (what the guest command printed at the end).
    pub console_tail: Vec<String>,
}

/// What the console reader thread saw.
#[derive(Debug, Default)]
struct Console {
    tail: VecDeque<String>,
    guest_status: Option<u8>,
}

const TAIL_LINES: usize = 12;

impl Console {
    fn push(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix(EXIT_PREFIX) {
            self.guest_status = rest.split_whitespace().next().and_then(|s| s.parse().ok());
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
    }
}

fn spawn_console_reader(
    stdout: impl Read + Send + 'static,
    ready_tx: std::sync::mpsc::Sender<Instant>,
) -> JoinHandle<Console> {
    std::thread::spawn(move || {
        let mut console = Console::default();
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        let mut sent = false;
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let now = Instant::now();
            let text = String::from_utf8_lossy(&buf);
            let line = text.trim();
            if !sent && line == READY_LINE {
                sent = true;
                let _ = ready_tx.send(now);
            }
            console.push(line);
        }
        console
    })
}

fn spawn_tail_reader(stderr: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = BufReader::new(stderr).read_to_end(&mut all);
        let text = String::from_utf8_lossy(&all);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    })
}

/// How long the pipe readers may take to finish after the VMM has exited.
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// The thread's result if it finishes within `grace`; otherwise it is left running.
fn join_within<T>(handle: JoinHandle<T>, grace: Duration) -> Option<T> {
    let deadline = Instant::now() + grace;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.join().ok()
}

/// Waits for `child` until `deadline`, killing it then. `Ok(None)` means it was killed.
fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait().context("waiting for the VMM")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots `cmd`, times it to the ready line, calls `at_ready` with the VMM's pid, then lets
/// the guest run its command to the end and reaps the VMM. Fails, with the console's last
/// lines, when the VMM does not print the ready line, exits non-zero, the guest command
/// fails, `at_ready` fails, or everything takes longer than `timeout`.
pub fn run_vm<T>(
    mut cmd: Command,
    timeout: Duration,
    at_ready: impl FnOnce(u32) -> Result<T>,
) -> Result<VmRun<T>> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let (ready_tx, ready_rx) = channel();
    let start = Instant::now();
    let deadline = start + timeout;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {program}"))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let console = spawn_console_reader(stdout, ready_tx);
    let errors = spawn_tail_reader(stderr);

    let ready_at = ready_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    let mut failure = None;
    let mut probe = None;
    match ready_at {
        Ok(at) => match at_ready(pid) {
            Ok(p) => probe = Some((at - start, p)),
            Err(e) => failure = Some(anyhow!("at ready: {e:#}")),
        },
        Err(RecvTimeoutError::Timeout) => {
            failure = Some(anyhow!("no `{READY_LINE}` within {}s", timeout.as_secs()));
        }
        // The reader ended: the VMM closed its stdout (exited) before the ready line.
        Err(RecvTimeoutError::Disconnected) => {
            failure = Some(anyhow!("the VM ended before `{READY_LINE}`"));
        }
    }
    if failure.is_some() {
        let _ = child.kill();
    }
    let status = wait_until(&mut child, deadline)?;
    // A process the VMM left behind could hold the pipes open; do not wait on it forever.
    let console = join_within(console, PIPE_GRACE).unwrap_or_default();
    let errors = join_within(errors, PIPE_GRACE).unwrap_or_default();
    let failure = failure.or_else(|| match status {
        None => Some(anyhow!("did not end within {}s; killed", timeout.as_secs())),
        Some(s) if !s.success() => Some(anyhow!("{program} exited with {s}")),
        Some(_) if console.guest_status != Some(0) => Some(anyhow!(
            "guest command status {:?}, expected 0",
            console.guest_status
        )),
        Some(_) => None,
    });
    if let Some(e) = failure {
        let name = Path::new(&program)
            .file_name()
            .map_or(program.clone(), |n| n.to_string_lossy().into_owned());
        let indent = |lines: Vec<String>| match lines.is_empty() {
            true => "  (nothing)".to_string(),
            false => format!("  {}", lines.join("\n  ")),
        };
        let tail: Vec<String> = console.tail.into_iter().collect();
        let err_lines: Vec<String> = errors.lines().map(str::to_string).collect();
        bail!(
            "{name}: {e:#}\nconsole tail:\n{}\nstderr tail:\n{}",
            indent(tail),
            indent(err_lines)
        );
    }
    let (ready, probe) = probe.context("no probe result")?;
    Ok(VmRun {
        ready,
        probe,
        console_tail: console.tail.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn times_the_ready_line_and_runs_the_probe() {
        let run = run_vm(
            sh("echo boot; sleep 0.2; echo 'guest-init: ready\r'; sleep 0.1; echo 'guest-init: exit status 0'"),
            Duration::from_secs(10),
            |pid| {
                assert!(pid > 0);
                Ok(pid)
            },
        )
        .unwrap();
        assert!(run.ready >= Duration::from_millis(200), "{:?}", run.ready);
        assert!(run.ready < Duration::from_secs(5), "{:?}", run.ready);
    }

    #[test]
    fn failures_are_reported_with_the_console_tail() {
        let no_ready =
            run_vm(sh("echo kernel panic; exit 0"), Duration::from_secs(10), Ok).unwrap_err();
        let text = format!("{no_ready:#}");
        assert!(
            text.contains("ended before") && text.contains("kernel panic"),
            "{text}"
        );

        let bad_status = run_vm(
            sh("echo 'guest-init: ready'; echo 'guest-init: exit status 3'"),
            Duration::from_secs(10),
            Ok,
        )
        .unwrap_err();
        assert!(
            format!("{bad_status:#}").contains("Some(3)"),
            "{bad_status:#}"
        );

        let nonzero = run_vm(
            sh("echo 'guest-init: ready'; echo 'guest-init: exit status 0'; exit 2"),
            Duration::from_secs(10),
            Ok,
        )
        .unwrap_err();
        assert!(
            format!("{nonzero:#}").contains("exited with"),
            "{nonzero:#}"
        );

        let probe = run_vm(
            sh("echo 'guest-init: ready'; exec sleep 30"),
            Duration::from_secs(10),
            |_| -> Result<()> { bail!("smaps unreadable") },
        )
        .unwrap_err();
        assert!(
            format!("{probe:#}").contains("smaps unreadable"),
            "{probe:#}"
        );
    }

    #[test]
    fn a_hung_vm_is_killed_at_the_deadline() {
        let start = Instant::now();
        let err = run_vm(
            sh("echo 'guest-init: ready'; exec sleep 30"),
            Duration::from_millis(500),
            Ok,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("killed"), "{err:#}");
        assert!(start.elapsed() < Duration::from_secs(10));
        let err = run_vm(sh("exec sleep 30"), Duration::from_millis(300), Ok).unwrap_err();
        assert!(
            format!("{err:#}").contains("no `guest-init: ready`"),
            "{err:#}"
        );
    }

    #[test]
    fn commands_carry_the_spec() {
        let inputs = Inputs {
            vmm: "/x/vmm".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let spec = GuestSpec {
            vcpus: 2,
            mem_mib: 128,
            gi_cmd: Some("busybox sleep 5".into()),
            disk: Some("/d.img".into()),
            net: Some(NetSpec {
                tap: "t0".into(),
                mac: "06:00:00:00:00:02".into(),
                guest_ip: "10.9.0.2".into(),
                host_ip: "10.9.0.1".into(),
            }),
            vsock_uds: None,
            agent_port: None,
        };
        let args = |c: &Command| -> Vec<String> {
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let ours = command(Side::Ours, &inputs, &spec).unwrap();
        assert_eq!(ours.get_program(), "/x/vmm");
        let a = args(&ours);
        assert!(a.windows(2).any(|w| w == ["--vcpus", "2"]), "{a:?}");
        assert!(a.windows(2).any(|w| w == ["--memory-mib", "128"]), "{a:?}");
        assert!(
            a.windows(2)
                .any(|w| w == ["--drive", "path=/d.img,id=data"]),
            "{a:?}"
        );
        assert!(
            a.windows(2)
                .any(|w| w == ["--net", "tap=t0,mac=06:00:00:00:00:02"]),
            "{a:?}"
        );
        let ip = "ip=10.9.0.2::10.9.0.1:255.255.255.0::eth0:off";
        assert!(
            a.contains(&format!(
                "console=ttyS0 reboot=k panic=-1 quiet {ip} gi.cmd=\"busybox sleep 5\""
            )),
            "{a:?}"
        );
        let peer = command(Side::Peer, &inputs, &spec).unwrap();
        let a = args(&peer);
        assert!(a.windows(2).any(|w| w == ["-smp", "2"]), "{a:?}");
        assert!(a.windows(2).any(|w| w == ["-m", "128"]), "{a:?}");
        assert!(
            a.windows(2)
                .any(|w| w == ["-device", "virtio-blk-device,drive=data"]),
            "{a:?}"
        );
        assert!(
            a.windows(2).any(|w| w
                == [
                    "-device",
                    "virtio-net-device,netdev=n0,mac=06:00:00:00:00:02"
                ]),
            "{a:?}"
        );
        assert!(
            a.contains(&format!(
                "console=ttyS0 reboot=t panic=-1 quiet {ip} gi.cmd=\"busybox sleep 5\""
            )),
            "{a:?}"
        );
        let with_vsock = GuestSpec {
            vsock_uds: Some("/v.sock".into()),
            agent_port: None,
            ..spec.clone()
        };
        assert!(command(Side::Peer, &inputs, &with_vsock).is_err());
        let a = args(&command(Side::Ours, &inputs, &with_vsock).unwrap());
        assert!(
            a.windows(2).any(|w| w == ["--vsock", "cid=3,uds=/v.sock"]),
            "{a:?}"
        );
        let quoted = GuestSpec {
            gi_cmd: Some("echo \"x\"".into()),
            ..spec
        };
        assert!(command(Side::Ours, &inputs, &quoted).is_err());
    }
}
