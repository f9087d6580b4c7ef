//! Clients for the two VMMs' control sockets: our REST API (HTTP/1.1 over a unix socket,
//! through the orchestrator's hyper-based client) and qemu's QMP (JSON lines over a unix
//! socket, through serde).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Our API over its unix socket. One request per connection, as curl would do it, through
/// the orchestrator's HTTP client (the same requests, another server).
pub struct Api {
    client: orchestrator::client::Client,
}

impl Api {
    /// A client for the API socket at `sock` (nothing is connected yet).
    pub fn new(sock: &Path) -> Result<Api> {
        Ok(Api {
            client: orchestrator::client::Client::new(sock).context("starting the API client")?,
        })
    }

    /// Sends one request and returns the status and the body, within `timeout`.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<(u16, String)> {
        let a = self
            .client
            .request(method, path, body.map(str::as_bytes), timeout)?;
        Ok((a.status, a.body))
    }

    /// Sends one request that must answer `want`; returns the body.
    pub fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        want: u16,
    ) -> Result<String> {
        let (status, text) = self.request(method, path, body, Duration::from_secs(120))?;
        if status != want {
            bail!("{method} {path}: status {status} (expected {want}): {text}");
        }
        Ok(text)
    }

    /// Waits until the socket answers `GET /`.
    pub fn wait_ready(&self, deadline: Instant) -> Result<()> {
        loop {
            if let Ok((200, _)) = self.request("GET", "/", None, Duration::from_secs(5)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{} never answered GET /", self.client.socket().display());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A QMP session with qemu over its unix socket, past the capabilities handshake.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until `deadline` while qemu starts), reads the greeting and
    /// leaves capabilities negotiation mode.
    pub fn connect(sock: &Path, deadline: Instant) -> Result<Qmp> {
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e)
                        .with_context(|| format!("connecting to QMP at {}", sock.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .context("QMP socket timeout")?;
        let writer = stream.try_clone().context("cloning the QMP socket")?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("QMP: expected the greeting, got {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).context("reading QMP")?;
        if n == 0 {
            bail!("QMP: qemu closed the socket");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP: unparsable line {line:?}"))
    }

    /// Runs one command and returns its `return` value, skipping events.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .with_context(|| format!("QMP: sending {command}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {command}: {e}");
            }
            // Anything else is an asynchronous event; keep reading.
        }
    }

    /// Polls `query` every millisecond until `done` accepts its answer or `deadline`.
    pub fn poll(
        &mut self,
        query: &str,
        deadline: Instant,
        mut done: impl FnMut(&Value) -> Result<bool>,
    ) -> Result<()> {
        loop {
            let v = self.execute(query, None)?;
            if done(&v)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("QMP {query}: not done by the deadline; last answer {v}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
