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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
        cmd.arg("--kernel")
            .arg(&a.vmlinux)
            .arg("--initrd")
            .arg(&a.initramfs)
            .args([
                "--cmdline",
                &format!("console=ttyS0 reboot=k panic=-1 quiet gi.agent={AGENT_PORT}"),
            ])
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
            .args(["--console", "none"]);
        let (mut cmd, _jail) = tests::jail::maybe_jailed(cmd);
        let child = cmd.stdin(Stdio::null()).spawn().unwrap();
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

/// A host listener on the VM's hybrid socket for guest-initiated connections to `port`
/// (`<uds>_<port>`), serving each connection with `serve` in its own thread. Stops
/// accepting when `done` is set, so a guest that never connects cannot hang the test.
fn host_listener<F>(
    uds: &Path,
    port: u32,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    serve: F,
) -> std::thread::JoinHandle<Vec<std::thread::Result<u64>>>
where
    F: Fn(std::os::unix::net::UnixStream) -> u64 + Send + Sync + 'static,
{
    let path = PathBuf::from(format!("{}_{port}", uds.display()));
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    l.set_nonblocking(true).unwrap();
    let serve = std::sync::Arc::new(serve);
    std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                    let serve = serve.clone();
                    conns.push(std::thread::spawn(move || serve(s)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        conns.into_iter().map(|c| c.join()).collect()
    })
}

/// Echoes until EOF, then closes; returns the bytes echoed.
fn echo(mut s: std::os::unix::net::UnixStream) -> u64 {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return total,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return total;
                }
                total += n as u64;
            }
        }
    }
}

fn vsock_guest(name: &str) -> (PathBuf, common::Guest) {
    let dir = std::env::temp_dir().join(format!("vsock-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let g = common::Guest::new()
        .machine(2, 512)
        .timeout(Duration::from_secs(600))
        .args(&["--vsock", &format!("cid=3,uds={}", uds.display())]);
    (uds, g)
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn guest_to_host_64_concurrent_connections_of_16_mib() {
    let (uds, guest) = vsock_guest("stress");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let host = host_listener(&uds, 5000, done.clone(), echo);
    let out = guest.cmd("gtool vsock-stress 2 5000 64 16m").run();
    done.store(true, std::sync::atomic::Ordering::Release);
    let served = host.join().unwrap();
    assert_eq!(
        common::guest_value(&out, "STRESS_OK"),
        "64",
        "{}",
        out.output
    );
    assert_eq!(
        common::guest_value(&out, "STRESS_FAIL"),
        "0",
        "{}",
        out.output
    );
    assert_eq!(
        served.len(),
        64,
        "host accepted {} connections",
        served.len()
    );
    for r in served {
        assert_eq!(
            r.unwrap(),
            16 << 20,
            "a host connection echoed a short stream"
        );
    }
    assert_eq!(
        tests::guest_exit_status(&out.output),
        Some(0),
        "{}",
        out.output
    );
}

#[test]
#[ignore = "needs a genuine KVM: run inside the test host (tests/testhost/run)"]
fn closing_either_side_is_seen_by_the_other() {
    use std::io::{Read, Write};
    let (uds, guest) = vsock_guest("close");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Host closes: it reads the guest's hello, then drops the stream.
    let host = host_listener(&uds, 5001, done.clone(), |mut s| {
        let mut hello = [0u8; 6];
        let ok = s.read_exact(&mut hello).is_ok() && &hello == b"hello\n";
        u64::from(ok)
    });
    // Guest closes: the host connects to the guest's one-shot echo server, half-closes,
    // and must then see EOF (the guest's close) after the echo.
    let uds2 = uds.clone();
    let d2 = done.clone();
    let client = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut s = loop {
            if let Ok(s) = connect_hybrid(&uds2, 5002, Duration::from_secs(10)) {
                break s;
            }
            if Instant::now() > deadline || d2.load(std::sync::atomic::Ordering::Acquire) {
                return Err("never reached the guest's echo server".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"bye\n").map_err(|e| e.to_string())?;
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        // read_to_end returns only at EOF: a timeout means the close was not seen.
        s.read_to_end(&mut got)
            .map_err(|e| format!("no EOF: {e}"))?;
        Ok(got)
    });
    let out = guest
        .cmd("busybox sh -c 'gtool vsock-close-test 2 5001 && gtool vsock-echo-server 5002 --count 1'")
        .run();
    done.store(true, std::sync::atomic::Ordering::Release);
    let served = host.join().unwrap();
    assert_eq!(served.len(), 1, "{}", out.output);
    assert_eq!(*served[0].as_ref().unwrap(), 1, "host did not get hello");
    assert_eq!(
        common::guest_value(&out, "PEER_CLOSED"),
        "1",
        "{}",
        out.output
    );
    assert_eq!(
        client.join().unwrap(),
        Ok(b"bye\n".to_vec()),
        "{}",
        out.output
    );
    assert_eq!(
        common::guest_value(&out, "ECHO_CONNS"),
        "1",
        "{}",
        out.output
    );
}
