//! The vsock subcommands: sockets, threads, timing and the `KEY=value` result lines around
//! the per-connection logic of `conn.rs`.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use agent::vsock::{VsockListener, VsockStream};

use crate::conn::{self, Duplex, THREAD_STACK};
use crate::error::{Context, ToolError};
use crate::say;

/// How long vsock-connect still waits for stdin after the peer closed: a console stdin
/// never ends, and the peer is gone anyway.
const STDIN_GRACE: Duration = Duration::from_secs(1);
/// How long a source waits for the peer to close after its last byte, so the process
/// does not exit while data is still in flight.
pub const SOURCE_DRAIN: Duration = Duration::from_secs(10);

fn connect(cid: u32, port: u32) -> Result<VsockStream, ToolError> {
    VsockStream::connect(cid, port).ctx(|| format!("connect to {cid}:{port}"))
}

fn listen(port: u32) -> Result<VsockListener, ToolError> {
    let l = VsockListener::bind(port).ctx(|| format!("listen on vsock port {port}"))?;
    say(&format!("LISTENING={port}"));
    Ok(l)
}

/// `vsock-connect CID PORT`: stdin to the socket (half-close at EOF) and the socket to
/// stdout at the same time; done when the peer has closed and stdin has ended.
pub fn connect_stdio(cid: u32, port: u32) -> Result<(), ToolError> {
    let sock = connect(cid, port)?;
    let mut tx = sock.try_clone().ctx(|| "dup socket")?;
    let (done_tx, done_rx) = mpsc::channel();
    thread::Builder::new()
        .name("stdin-to-socket".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let r = conn::pump(&mut io::stdin().lock(), &mut tx).and_then(|_| tx.shutdown_write());
            let _ = done_tx.send(r);
        })
        .ctx(|| "spawn stdin thread")?;

    let mut rx = sock;
    conn::pump(&mut rx, &mut io::stdout().lock()).ctx(|| "copy socket to stdout")?;
    match done_rx.recv_timeout(STDIN_GRACE) {
        Ok(r) => r.ctx(|| "copy stdin to socket"),
        Err(mpsc::RecvTimeoutError::Timeout) => Ok(()),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(ToolError::new(
            "copy stdin to socket",
            "thread ended without a result",
        )),
    }
}

/// `vsock-echo-server PORT [--count N]`: one thread per connection, each echoing until EOF.
/// With a count, waits for those connections to finish and prints `ECHO_CONNS=` and
/// `ECHO_BYTES=`; fails if any connection failed.
pub fn echo_server(port: u32, count: Option<u64>) -> Result<(), ToolError> {
    let listener = listen(port)?;
    let bytes = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let mut accepted = 0u64;
    while count.is_none_or(|c| accepted < c) {
        let mut s = listener.accept().ctx(|| "accept")?;
        accepted += 1;
        let k = accepted;
        let (bytes, failed) = (Arc::clone(&bytes), Arc::clone(&failed));
        let worker = thread::Builder::new()
            .name(format!("echo-{k}"))
            .stack_size(THREAD_STACK)
            .spawn(move || match conn::echo(&mut s) {
                Ok(n) => {
                    bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    eprintln!("gtool: vsock-echo-server: connection {k}: echo: {e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            })
            .ctx(|| format!("spawn thread for connection {k}"))?;
        // Forget finished workers so an unlimited server does not grow.
        workers.retain(|w: &thread::JoinHandle<()>| !w.is_finished());
        workers.push(worker);
    }
    for w in workers {
        if w.join().is_err() {
            failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    say(&format!("ECHO_CONNS={accepted}"));
    say(&format!("ECHO_BYTES={}", bytes.load(Ordering::Relaxed)));
    match failed.load(Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(ToolError::new(
            format!("{n} of {accepted} connections failed"),
            "see the connection errors above",
        )),
    }
}

/// `vsock-stress CID PORT CONNS BYTES`: every connection in its own thread, sending and
/// checking its pattern. MiB/s is the echoed-and-checked bytes of good connections over the
/// wall time from the first connect to the last check.
pub fn stress(cid: u32, port: u32, conns: u32, bytes: u64) -> Result<(), ToolError> {
    let start = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            thread::Builder::new()
                .name(format!("stress-{i}"))
                .stack_size(THREAD_STACK)
                .spawn(move || {
                    let s = VsockStream::connect(cid, port)
                        .map_err(|e| format!("connect to {cid}:{port}: {e}"))?;
                    conn::stress_connection(s, u64::from(i), bytes)
                })
                .map_err(|e| format!("spawn thread: {e}"))
        })
        .collect();
    let (mut ok, mut failed, mut good_bytes) = (0u32, 0u32, 0u64);
    for (i, w) in workers.into_iter().enumerate() {
        let result = w.and_then(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())));
        match result {
            Ok(n) => {
                ok += 1;
                good_bytes += n;
            }
            Err(e) => {
                failed += 1;
                eprintln!("gtool: vsock-stress: connection {i}: {e}");
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    say(&format!("STRESS_OK={ok}"));
    say(&format!("STRESS_FAIL={failed}"));
    say(&format!("STRESS_MIBS={}", conn::mibs(good_bytes, secs)));
    if failed > 0 {
        return Err(ToolError::new(
            format!("{failed} of {conns} connections failed"),
            "see the connection errors above",
        ));
    }
    Ok(())
}

/// `vsock-close-test CID PORT`: says `hello\n`, then reads (discarding) until the peer's
/// close shows up as EOF (`PEER_CLOSED=1`) or as an error (`PEER_CLOSED=err:<errno>`).
pub fn close_test(cid: u32, port: u32) -> Result<(), ToolError> {
    let mut s = connect(cid, port)?;
    s.write_all(b"hello\n").ctx(|| "send hello")?;
    let mut buf = vec![0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                say("PEER_CLOSED=1");
                return Ok(());
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                say(&format!(
                    "PEER_CLOSED=err:{}",
                    e.raw_os_error().unwrap_or(0)
                ));
                return Err(ToolError::io("wait for the peer's close", &e));
            }
        }
    }
}

/// `vsock-sink PORT`: one connection, counted until EOF, timed from accept to EOF.
pub fn sink(port: u32) -> Result<(), ToolError> {
    let listener = listen(port)?;
    let mut s = listener.accept().ctx(|| "accept")?;
    let (n, secs) = conn::timed_read(&mut s).ctx(|| "receive")?;
    say(&format!("SINK_BYTES={n}"));
    say(&format!("SINK_MIBS={}", conn::mibs(n, secs)));
    Ok(())
}

/// `vsock-source CID PORT BYTES`: zeros in 256 KiB writes, timed from connect to the
/// half-close after the last write; then waits (bounded) for the peer to close.
pub fn source(cid: u32, port: u32, bytes: u64) -> Result<(), ToolError> {
    let mut s = connect(cid, port)?;
    let secs = conn::timed_source(&mut s, bytes, SOURCE_DRAIN).ctx(|| "send")?;
    say(&format!("SOURCE_BYTES={bytes}"));
    say(&format!("SOURCE_MIBS={}", conn::mibs(bytes, secs)));
    Ok(())
}
