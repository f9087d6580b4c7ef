//! Real-guest tests of virtio-vsock with the Firecracker-compatible host side and the
//! guest agent: exec over vsock, the CONNECT/OK handshake from a client written from the
//! protocol description (Python, not this project's client), and a refused port.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::{connect_hybrid, AgentClient, ExecRequest};
use tests::{require_genuine_kvm, Artifacts};

const AGENT_PORT: u32 = 1024;

/// A running VM whose guest-init serves the agent; killed on drop.
struct AgentVm {
    child: Child,
    uds: PathBuf,
}

impl AgentVm {
    fn start(name: &str) -> AgentVm {
        require_genuine_kvm();
        let a = Artifacts::get();
        let dir = std::env::temp_dir().join(format!("vsock-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let _ = std::fs::remove_file(&uds);
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .arg("--kernel")
            .arg(&a.vmlinux)
            .arg("--initrd")
            .arg(&a.initramfs)
            .args([
                "--cmdline",
                &format!("console=ttyS0 reboot=k panic=-1 quiet gi.agent={AGENT_PORT}"),
            ])
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
            .args(["--console", "none"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        AgentVm { child, uds }
    }

    /// Connects to the agent, retrying while the guest boots.
    fn client(&self) -> AgentClient<std::os::unix::net::UnixStream> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(s) = connect_hybrid(&self.uds, AGENT_PORT, Duration::from_secs(10)) {
                let mut c = AgentClient::new(s);
                if c.hello().is_ok() {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the agent never answered on {}",
                self.uds.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_exit(mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn exec_over_the_vsock_agent() {
    let vm = AgentVm::start("exec");
    let mut c = vm.client();
    let h = c.health().unwrap();
    assert!(!h.agent_version.is_empty());
    let r = c
        .exec(&ExecRequest::new([
            "busybox",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    assert_eq!(r.code, Some(3));
    assert!(!r.timed_out);
    // Shutdown ends the VM cleanly.
    c.shutdown().unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(60)), Some(0));
}

/// A client written from the protocol description only: connect, `CONNECT <port>\n`,
/// expect `OK <number>\n`.
const PY_CONNECT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(b"CONNECT %d\n" % int(sys.argv[2]))
line = b""
while not line.endswith(b"\n"):
    c = s.recv(1)
    if not c:
        break
    line += c
print("REPLY=" + line.decode(errors="replace").strip())
"#;

fn python_connect(uds: &Path, port: u32) -> String {
    let out = Command::new("python3")
        .args(["-c", PY_CONNECT])
        .arg(uds)
        .arg(port.to_string())
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("REPLY=").map(str::to_string))
        .unwrap_or_default()
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn independent_client_completes_the_connect_handshake() {
    let vm = AgentVm::start("py");
    // Wait for the agent with our own client first, then use the independent one.
    drop(vm.client());
    let reply = python_connect(&vm.uds, AGENT_PORT);
    let port: Option<u32> = reply.strip_prefix("OK ").and_then(|p| p.parse().ok());
    assert!(port.is_some(), "expected `OK <port>`, got {reply:?}");
    // Nothing listens on another port: the host side is closed without an OK.
    let refused = python_connect(&vm.uds, 4444);
    assert!(
        !refused.starts_with("OK"),
        "got {refused:?} for a port nobody listens on"
    );
}
