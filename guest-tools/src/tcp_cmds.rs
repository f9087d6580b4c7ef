//! The TCP throughput subcommands: a source with large writes (busybox nc writes 1 KiB at a
//! time, and each write leaves as its own small segment) and a reader, both timed by gtool.

use std::net::{SocketAddrV4, TcpStream};

use crate::conn;
use crate::error::{Context, ToolError};
use crate::say;
use crate::vsock_cmds::SOURCE_DRAIN;

fn connect(addr: SocketAddrV4) -> Result<TcpStream, ToolError> {
    TcpStream::connect(addr).ctx(|| format!("connect to {addr}"))
}

/// `tcp-source HOST PORT BYTES`: zeros in 256 KiB writes, timed from connect to the
/// half-close after the last write; then waits (bounded) for the peer to close.
pub fn source(addr: SocketAddrV4, bytes: u64) -> Result<(), ToolError> {
    let mut s = connect(addr)?;
    let secs = conn::timed_source(&mut s, bytes, SOURCE_DRAIN).ctx(|| "send")?;
    say(&format!("SOURCE_BYTES={bytes}"));
    say(&format!("SOURCE_MIBS={}", conn::mibs(bytes, secs)));
    Ok(())
}

/// `tcp-read HOST PORT`: bytes until EOF, timed from connect to EOF.
pub fn read(addr: SocketAddrV4) -> Result<(), ToolError> {
    let mut s = connect(addr)?;
    let (n, secs) = conn::timed_read(&mut s).ctx(|| "receive")?;
    say(&format!("READ_BYTES={n}"));
    say(&format!("READ_MIBS={}", conn::mibs(n, secs)));
    Ok(())
}
