//! The orchestrator daemon as the real-guest tests drive it: its own state directory,
//! socket, bridge and subnet, a restart with a kill point, and cleanup of every VM on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator::client::Client;
use serde_json::Value;
use tests::require_genuine_kvm;

const ORCHESTRATOR: &str = env!("CARGO_BIN_EXE_orchestrator");
const JAILER: &str = env!("CARGO_BIN_EXE_jailer");

/// A daemon on its own state dir, socket, bridge and subnet; stopped and cleaned on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub bridge: String,
    pub subnet_prefix: String,
    pub client: Client,
}

impl Daemon {
    pub fn start(name: &str, n: u8) -> Daemon {
        require_genuine_kvm();
        let dir = PathBuf::from(format!("/tmp/orch-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("o.sock");
        let bridge = format!("orcht{n}");
        let subnet_prefix = format!("172.29.{n}");
        let mut d = Daemon {
            child: None,
            client: Client::new(&sock).unwrap(),
            dir,
            sock,
            bridge,
            subnet_prefix,
        };
        d.spawn(None);
        d
    }

    /// Stops the daemon (SIGTERM; VMs keep running) and starts it again, with
    /// `ORCHESTRATOR_TEST_KILL_AT=kill_at` if given.
    pub fn restart(&mut self, kill_at: Option<&str>) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().unwrap().is_none() {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
            let _ = c.wait();
        }
        self.spawn(kill_at);
    }

    /// Waits for the daemon to die by SIGKILL (the test hook).
    pub fn wait_killed(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        let c = self.child.as_mut().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}\n{}", self.log());
                self.child = None;
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "not killed:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn spawn(&mut self, kill_at: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(ORCHESTRATOR);
        if let Some(point) = kill_at {
            cmd.env("ORCHESTRATOR_TEST_KILL_AT", point);
        }
        let child = cmd
            .arg("--socket")
            .arg(&self.sock)
            .arg("serve")
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--subnet", &format!("{}.0/24", self.subnet_prefix)])
            .args(["--bridge", &self.bridge])
            .args(["--jailer", JAILER])
            .arg("--vmm")
            .arg(super::vmm_binary())
            .args(["--ready-timeout-s", "240"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({st}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no control socket:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        let a = self
            .client
            .request(
                method,
                path,
                body.as_deref().map(str::as_bytes),
                Duration::from_secs(600),
            )
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}\n{}", self.log()));
        (a.status, a.json())
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (st, v) = self.call(method, path, body);
        assert!(
            (200..300).contains(&st),
            "{method} {path}: {st} {v}\n{}",
            self.log()
        );
        v
    }

    pub fn add_manifest(&self, m: &Value) {
        let a = self
            .client
            .request(
                "POST",
                "/v1/manifests",
                Some(m.to_string().as_bytes()),
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(a.status, 201, "{}", a.body);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_none() {
            self.spawn(None);
        }
        if let Some(c) = self.child.as_mut() {
            // Destroy what is left, so no VMM or netns outlives the test.
            if let Ok(a) = self
                .client
                .request("GET", "/v1/vms", None, Duration::from_secs(10))
            {
                for v in a.json().as_array().into_iter().flatten() {
                    let id = v["id"].as_str().unwrap_or_default();
                    let _ = self.client.request(
                        "DELETE",
                        &format!("/v1/vms/{id}"),
                        None,
                        Duration::from_secs(60),
                    );
                }
            }
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        if std::thread::panicking() {
            eprintln!("--- daemon log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
