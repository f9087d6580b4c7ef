//! gtool: a test and benchmark helper that runs inside the guest (static, next to busybox).
//!
//! It covers what busybox cannot: AF_VSOCK clients and servers (connect, echo, a checked
//! multi-connection stress, close detection, throughput sink and source), a large-write TCP
//! source and reader, and random O_DIRECT block reads. The host-side tests and benches start it through guest-init or the agent and
//! grep its stdout.
//!
//! Contract: results are `KEY=value` lines on stdout (flushed at once); every failure is one
//! `gtool: <subcommand>: <what failed>: <why>` line on stderr and exit status 1.

mod args;
mod conn;
mod error;
mod pattern;
mod randread;
mod tcp_cmds;
mod vsock_cmds;

use std::io::Write;
use std::process::ExitCode;

use args::Command;
use error::ToolError;

const USAGE: &str = "\
gtool: test and benchmark helper inside the guest; results are KEY=value lines on stdout,
failures one 'gtool: SUBCOMMAND: WHAT: WHY' line on stderr and exit status 1.

usage: gtool SUBCOMMAND ARGS...

  vsock-connect CID PORT
      Connect to CID:PORT (CID 2 is the host); copy stdin to the socket (half-close at
      stdin EOF) and the socket to stdout at the same time. Exits when the peer has closed
      and stdin has ended (stdin still open 1 s after the peer's close is left behind).
  vsock-echo-server PORT [--count N]
      Listen on any CID, port PORT; print LISTENING=PORT. Echo each connection back in its
      own thread until EOF, then close. With --count, stop after N connections, wait for
      them and print ECHO_CONNS=N and ECHO_BYTES=total.
  vsock-stress CID PORT CONNS BYTES
      CONNS concurrent connections, each sending BYTES of its own xorshift64 pattern
      (seed 0x9e3779b97f4a7c15 ^ index, little-endian u64 words), half-closing, and checking
      the echo byte for byte and in length. Prints STRESS_OK=n, STRESS_FAIL=n and
      STRESS_MIBS=x (checked bytes / wall time); exit 0 only if all connections are good.
  vsock-close-test CID PORT
      Connect, send 'hello\\n', read until the peer closes: PEER_CLOSED=1 on EOF,
      PEER_CLOSED=err:ERRNO (and exit 1) on a read error.
  vsock-sink PORT
      Listen (LISTENING=PORT), accept one connection, count bytes to EOF: SINK_BYTES=n,
      SINK_MIBS=x.
  vsock-source CID PORT BYTES
      Connect, send BYTES zero bytes in 256 KiB writes, half-close: SOURCE_BYTES=n,
      SOURCE_MIBS=x (then waits up to 10 s for the peer to close).
  tcp-source HOST PORT BYTES
      Connect over TCP to HOST:PORT (IPv4), send BYTES zero bytes in 256 KiB writes,
      half-close: SOURCE_BYTES=n, SOURCE_MIBS=x (then waits up to 10 s for the peer to
      close). Unlike busybox nc, whose 1 KiB writes each leave as one small segment, this
      lets the stack send full-sized (offloaded) segments.
  tcp-read HOST PORT
      Connect over TCP to HOST:PORT and count bytes to EOF: READ_BYTES=n, READ_MIBS=x.
  randread DEVICE BLOCK_SIZE SECONDS
      Random block-aligned O_DIRECT reads of BLOCK_SIZE (a multiple of 512) at queue depth 1
      for SECONDS: RANDREAD_IOPS=n, RANDREAD_OPS=n.
  --help
      This text.

Numbers are decimal or 0x hex; BYTES and BLOCK_SIZE take k, m or g (KiB, MiB, GiB);
SECONDS may have a fraction. MiB/s values have one decimal.
";

/// Prints one result line and flushes, so a reader sees it while gtool keeps running
/// (`LISTENING=` comes before the long wait for connections).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(cmd: Command) -> Result<(), ToolError> {
    match cmd {
        Command::Help => {
            print!("{USAGE}");
            Ok(())
        }
        Command::VsockConnect { cid, port } => vsock_cmds::connect_stdio(cid, port),
        Command::VsockEchoServer { port, count } => vsock_cmds::echo_server(port, count),
        Command::VsockStress {
            cid,
            port,
            conns,
            bytes,
        } => vsock_cmds::stress(cid, port, conns, bytes),
        Command::VsockCloseTest { cid, port } => vsock_cmds::close_test(cid, port),
        Command::VsockSink { port } => vsock_cmds::sink(port),
        Command::VsockSource { cid, port, bytes } => vsock_cmds::source(cid, port, bytes),
        Command::TcpSource { addr, bytes } => tcp_cmds::source(addr, bytes),
        Command::TcpRead { addr } => tcp_cmds::read(addr),
        Command::RandRead {
            device,
            block_size,
            seconds,
        } => randread::randread(&device, block_size, seconds),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match args::parse(&argv) {
        Ok(cmd) => cmd,
        Err((sub, e)) => {
            eprintln!("gtool: {sub}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sub = argv.first().cloned().unwrap_or_default();
    match run(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("gtool: {sub}: {e}");
            ExitCode::FAILURE
        }
    }
}
