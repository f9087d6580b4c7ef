//! A blocking client of the daemon's control API over its unix socket (HTTP/1.1 with hyper,
//! one request per connection), used by the CLI and the tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::Value;

/// An answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body (JSON for every endpoint but /metrics).
    pub body: String,
}

impl Answer {
    /// The body as JSON (`null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// `Ok(json)` for a 2xx answer, else an error carrying the daemon's message.
    pub fn ok(self) -> Result<Value> {
        if (200..300).contains(&self.status) {
            return Ok(self.json());
        }
        let v = self.json();
        let msg = v["error"]["message"]
            .as_str()
            .map_or_else(|| self.body.clone(), String::from);
        let mut text = format!("{} ({})", msg, self.status);
        if let Some(fields) = v["error"]["fields"].as_array() {
            for f in fields {
                text.push_str(&format!(
                    "\n  {}: {}",
                    f["path"].as_str().unwrap_or(""),
                    f["reason"].as_str().unwrap_or("")
                ));
            }
        }
        anyhow::bail!(text)
    }
}

/// The client.
pub struct Client {
    sock: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client for the control socket at `sock`.
    pub fn new(sock: &Path) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("start the client's runtime")?;
        Ok(Client {
            sock: sock.to_path_buf(),
            rt,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// One request, answered within `timeout`.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Answer> {
        let mut out = Vec::new();
        let status = self.request_streaming(method, path, body, timeout, |chunk| {
            out.extend_from_slice(chunk);
            true
        })?;
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&out).into_owned(),
        })
    }

    /// One request whose body is handed to `on_chunk` as it arrives (for event streams);
    /// `on_chunk` returns false to stop. Returns the status.
    pub fn request_streaming(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
        mut on_chunk: impl FnMut(&[u8]) -> bool,
    ) -> Result<u16> {
        let what = format!("{method} {path} on {}", self.sock.display());
        let body = Bytes::from(body.unwrap_or_default().to_vec());
        let fut = async {
            let stream = tokio::net::UnixStream::connect(&self.sock)
                .await
                .with_context(|| {
                    format!(
                        "connect to {} (is `orchestrator serve` running, and may you use its socket?)",
                        self.sock.display()
                    )
                })?;
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .context("HTTP handshake")?;
            let conn = tokio::spawn(conn);
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("Host", "localhost")
                .header("Content-Type", "application/json")
                .body(Full::new(body))
                .context("build the request")?;
            let resp = sender.send_request(req).await.context("send")?;
            let status = resp.status().as_u16();
            let mut b = resp.into_body();
            while let Some(frame) = b.frame().await {
                let frame = frame.context("read the answer")?;
                if let Some(data) = frame.data_ref() {
                    if !on_chunk(data) {
                        break;
                    }
                }
            }
            drop(sender);
            conn.abort();
            Ok::<_, anyhow::Error>(status)
        };
        self.rt
            .block_on(async { tokio::time::timeout(timeout, fut).await })
            .with_context(|| format!("{what}: no answer within {} s", timeout.as_secs()))?
            .with_context(|| what.clone())
    }
}

/// Cuts a streamed answer (NDJSON, one JSON object per line) into lines as its chunks
/// arrive; a line split between chunks is kept until its newline comes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Adds `chunk` and hands each line it completes (newline included) to `on_line`.
    pub fn push(&mut self, chunk: &[u8], mut on_line: impl FnMut(&[u8])) {
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(i) = self.pending[start..].iter().position(|&b| b == b'\n') {
            on_line(&self.pending[start..=start + i]);
            start += i + 1;
        }
        self.pending.drain(..start);
    }

    /// What came after the last newline (empty when the stream ended on a line's end).
    pub fn rest(&self) -> &[u8] {
        &self.pending
    }
}

#[cfg(test)]
mod line_tests {
    use super::LineSplitter;

    #[test]
    fn lines_split_across_chunks_come_out_whole() {
        let mut s = LineSplitter::default();
        let mut got: Vec<String> = Vec::new();
        for chunk in [&b"{\"a\":1}\n{\"b\""[..], b":2}", b"\n\n{\"c\":3}\n{\"d"] {
            s.push(chunk, |l| got.push(String::from_utf8_lossy(l).into_owned()));
        }
        assert_eq!(got, ["{\"a\":1}\n", "{\"b\":2}\n", "\n", "{\"c\":3}\n"]);
        assert_eq!(s.rest(), b"{\"d");
    }
}
