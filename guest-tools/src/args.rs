//! Command-line parsing: argv into a [`Command`], with no side effects, so every rule is
//! unit-tested on the host.
//!
//! Numbers are decimal or `0x` hex. Sizes (BYTES, BLOCK_SIZE) also take a binary suffix:
//! `k`/`K` (KiB), `m`/`M` (MiB), `g`/`G` (GiB), so `4k` is 4096. SECONDS may be fractional.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use crate::error::ToolError;

/// One parsed invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `--help`, `-h`, `help` or no arguments.
    Help,
    /// Connect and copy stdin to the socket and the socket to stdout.
    VsockConnect { cid: u32, port: u32 },
    /// Echo every accepted connection back; stop after `count` connections if given.
    VsockEchoServer { port: u32, count: Option<u64> },
    /// `conns` concurrent connections, each sending and checking `bytes` of pattern.
    VsockStress {
        cid: u32,
        port: u32,
        conns: u32,
        bytes: u64,
    },
    /// Connect, say hello, wait for the peer's close.
    VsockCloseTest { cid: u32, port: u32 },
    /// Accept one connection and count what arrives.
    VsockSink { port: u32 },
    /// Connect and send `bytes` of zeros.
    VsockSource { cid: u32, port: u32, bytes: u64 },
    /// Connect over TCP and send `bytes` of zeros in large writes.
    TcpSource { addr: SocketAddrV4, bytes: u64 },
    /// Connect over TCP and count what arrives until EOF.
    TcpRead { addr: SocketAddrV4 },
    /// Random O_DIRECT reads at queue depth 1.
    RandRead {
        device: PathBuf,
        block_size: u64,
        seconds: f64,
    },
}

/// Parses `args` (argv without the program name). An error names the subcommand it belongs
/// to (or the unknown word) so `main` can print `gtool: <sub>: ...`.
pub fn parse(args: &[String]) -> Result<Command, (String, ToolError)> {
    let Some(sub) = args.first() else {
        return Ok(Command::Help);
    };
    let rest = &args[1..];
    parse_sub(sub, rest).map_err(|e| (sub.clone(), e))
}

fn parse_sub(sub: &str, rest: &[String]) -> Result<Command, ToolError> {
    match sub {
        "--help" | "-h" | "help" => Ok(Command::Help),
        "vsock-connect" => {
            let [cid, port] = positional(sub, rest, ["CID", "PORT"])?;
            Ok(Command::VsockConnect {
                cid: parse_u32("CID", cid)?,
                port: parse_u32("PORT", port)?,
            })
        }
        "vsock-echo-server" => parse_echo_server(rest),
        "vsock-stress" => {
            let [cid, port, conns, bytes] =
                positional(sub, rest, ["CID", "PORT", "CONNS", "BYTES"])?;
            let conns = parse_u32("CONNS", conns)?;
            if conns == 0 {
                return Err(ToolError::new("bad CONNS \"0\"", "must be at least 1"));
            }
            Ok(Command::VsockStress {
                cid: parse_u32("CID", cid)?,
                port: parse_u32("PORT", port)?,
                conns,
                bytes: parse_size("BYTES", bytes)?,
            })
        }
        "vsock-close-test" => {
            let [cid, port] = positional(sub, rest, ["CID", "PORT"])?;
            Ok(Command::VsockCloseTest {
                cid: parse_u32("CID", cid)?,
                port: parse_u32("PORT", port)?,
            })
        }
        "vsock-sink" => {
            let [port] = positional(sub, rest, ["PORT"])?;
            Ok(Command::VsockSink {
                port: parse_u32("PORT", port)?,
            })
        }
        "vsock-source" => {
            let [cid, port, bytes] = positional(sub, rest, ["CID", "PORT", "BYTES"])?;
            Ok(Command::VsockSource {
                cid: parse_u32("CID", cid)?,
                port: parse_u32("PORT", port)?,
                bytes: parse_size("BYTES", bytes)?,
            })
        }
        "tcp-source" => {
            let [host, port, bytes] = positional(sub, rest, ["HOST", "PORT", "BYTES"])?;
            Ok(Command::TcpSource {
                addr: parse_addr(host, port)?,
                bytes: parse_size("BYTES", bytes)?,
            })
        }
        "tcp-read" => {
            let [host, port] = positional(sub, rest, ["HOST", "PORT"])?;
            Ok(Command::TcpRead {
                addr: parse_addr(host, port)?,
            })
        }
        "randread" => {
            let [device, bs, secs] = positional(sub, rest, ["DEVICE", "BLOCK_SIZE", "SECONDS"])?;
            let block_size = parse_size("BLOCK_SIZE", bs)?;
            if block_size == 0 || !block_size.is_multiple_of(512) {
                return Err(ToolError::new(
                    format!("bad BLOCK_SIZE \"{bs}\""),
                    "must be a non-zero multiple of 512 (O_DIRECT)",
                ));
            }
            Ok(Command::RandRead {
                device: PathBuf::from(device),
                block_size,
                seconds: parse_seconds(secs)?,
            })
        }
        _ => Err(ToolError::new(
            "unknown subcommand",
            "see gtool --help for the list",
        )),
    }
}

fn parse_echo_server(rest: &[String]) -> Result<Command, ToolError> {
    let mut port = None;
    let mut count = None;
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        if arg == "--count" {
            let Some(v) = it.next() else {
                return Err(ToolError::new("--count", "needs a value"));
            };
            count = Some(parse_u64("--count", v)?);
        } else if let Some(v) = arg.strip_prefix("--count=") {
            count = Some(parse_u64("--count", v)?);
        } else if arg.starts_with("--") {
            return Err(ToolError::new(
                format!("unknown option {arg}"),
                "only --count N",
            ));
        } else if port.is_none() {
            port = Some(parse_u32("PORT", arg)?);
        } else {
            return Err(ToolError::new(
                format!("unexpected argument \"{arg}\""),
                "usage: gtool vsock-echo-server PORT [--count N]",
            ));
        }
    }
    let Some(port) = port else {
        return Err(ToolError::new(
            "missing PORT",
            "usage: gtool vsock-echo-server PORT [--count N]",
        ));
    };
    Ok(Command::VsockEchoServer { port, count })
}

/// Exactly N positional arguments, named for the error message.
fn positional<'a, const N: usize>(
    sub: &str,
    rest: &'a [String],
    names: [&str; N],
) -> Result<[&'a str; N], ToolError> {
    if rest.len() != N {
        return Err(ToolError::new(
            format!("expected {} argument(s), got {}", N, rest.len()),
            format!("usage: gtool {sub} {}", names.join(" ")),
        ));
    }
    Ok(std::array::from_fn(|i| rest[i].as_str()))
}

/// Decimal or `0x` hex.
pub fn parse_u64(name: &str, s: &str) -> Result<u64, ToolError> {
    let bad = |why: &str| ToolError::new(format!("bad {name} \"{s}\""), why.to_string());
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad("not a number"));
    }
    u64::from_str_radix(digits, radix).map_err(|_| bad("too large"))
}

/// A [`parse_u64`] that fits in 32 bits (CIDs, ports, counts of threads).
pub fn parse_u32(name: &str, s: &str) -> Result<u32, ToolError> {
    let v = parse_u64(name, s)?;
    u32::try_from(v)
        .map_err(|_| ToolError::new(format!("bad {name} \"{s}\""), "larger than 32 bits"))
}

/// A byte count with an optional binary suffix (`k`, `m`, `g`).
pub fn parse_size(name: &str, s: &str) -> Result<u64, ToolError> {
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let v = parse_u64(name, num).map_err(|_| {
        ToolError::new(
            format!("bad {name} \"{s}\""),
            "not a size (N, Nk, Nm or Ng)",
        )
    })?;
    v.checked_mul(1u64 << shift)
        .ok_or_else(|| ToolError::new(format!("bad {name} \"{s}\""), "too large"))
}

/// Positive, finite seconds; fractions allowed.
pub fn parse_seconds(s: &str) -> Result<f64, ToolError> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e6 => Ok(v),
        _ => Err(ToolError::new(
            format!("bad SECONDS \"{s}\""),
            "must be a positive number of seconds",
        )),
    }
}

/// An IPv4 address and a TCP port (1 to 65535).
fn parse_addr(host: &str, port: &str) -> Result<SocketAddrV4, ToolError> {
    let ip: Ipv4Addr = host.parse().map_err(|_| {
        ToolError::new(
            format!("bad HOST \"{host}\""),
            "must be a dotted IPv4 address",
        )
    })?;
    let port = parse_u32("PORT", port)?;
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(SocketAddrV4::new(ip, p)),
        _ => Err(ToolError::new(
            format!("bad PORT \"{port}\""),
            "a TCP port is 1 to 65535",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse(&v).map_err(|(sub, e)| format!("{sub}: {e}"))
    }

    #[test]
    fn help_and_no_args() {
        assert_eq!(p(&[]), Ok(Command::Help));
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert_eq!(p(&["-h"]), Ok(Command::Help));
    }

    #[test]
    fn unknown_subcommand_names_it() {
        assert_eq!(
            p(&["frob"]),
            Err("frob: unknown subcommand: see gtool --help for the list".into())
        );
    }

    #[test]
    fn vsock_connect() {
        assert_eq!(
            p(&["vsock-connect", "2", "0x1388"]),
            Ok(Command::VsockConnect { cid: 2, port: 5000 })
        );
        let e = p(&["vsock-connect", "2"]).unwrap_err();
        assert!(
            e.starts_with("vsock-connect: expected 2 argument(s), got 1"),
            "{e}"
        );
        let e = p(&["vsock-connect", "two", "1"]).unwrap_err();
        assert_eq!(e, "vsock-connect: bad CID \"two\": not a number");
        let e = p(&["vsock-connect", "2", "4294967296"]).unwrap_err();
        assert_eq!(
            e,
            "vsock-connect: bad PORT \"4294967296\": larger than 32 bits"
        );
    }

    #[test]
    fn echo_server_count_forms() {
        assert_eq!(
            p(&["vsock-echo-server", "5000"]),
            Ok(Command::VsockEchoServer {
                port: 5000,
                count: None
            })
        );
        assert_eq!(
            p(&["vsock-echo-server", "5000", "--count", "3"]),
            Ok(Command::VsockEchoServer {
                port: 5000,
                count: Some(3)
            })
        );
        assert_eq!(
            p(&["vsock-echo-server", "--count=4", "5000"]),
            Ok(Command::VsockEchoServer {
                port: 5000,
                count: Some(4)
            })
        );
        assert!(p(&["vsock-echo-server", "5000", "--count"]).is_err());
        assert!(p(&["vsock-echo-server"]).is_err());
        assert!(p(&["vsock-echo-server", "1", "2"]).is_err());
        assert!(p(&["vsock-echo-server", "1", "--verbose"]).is_err());
    }

    #[test]
    fn stress_and_sizes() {
        assert_eq!(
            p(&["vsock-stress", "2", "6000", "8", "16M"]),
            Ok(Command::VsockStress {
                cid: 2,
                port: 6000,
                conns: 8,
                bytes: 16 << 20
            })
        );
        assert!(p(&["vsock-stress", "2", "6000", "0", "1"]).is_err());
        assert_eq!(parse_size("B", "0").unwrap(), 0);
        assert_eq!(parse_size("B", "4k").unwrap(), 4096);
        assert_eq!(parse_size("B", "3G").unwrap(), 3 << 30);
        assert_eq!(parse_size("B", "0x10").unwrap(), 16);
        assert!(parse_size("B", "k").is_err());
        assert!(parse_size("B", "12x").is_err());
        assert!(parse_size("B", "-1").is_err());
        assert!(parse_size("B", "99999999999999G").is_err());
    }

    #[test]
    fn sink_source_close_test() {
        assert_eq!(p(&["vsock-sink", "7"]), Ok(Command::VsockSink { port: 7 }));
        assert_eq!(
            p(&["vsock-source", "2", "7", "1m"]),
            Ok(Command::VsockSource {
                cid: 2,
                port: 7,
                bytes: 1 << 20
            })
        );
        assert_eq!(
            p(&["vsock-close-test", "2", "9"]),
            Ok(Command::VsockCloseTest { cid: 2, port: 9 })
        );
    }

    #[test]
    fn tcp_source_and_read() {
        let addr = SocketAddrV4::new(Ipv4Addr::new(172, 30, 0, 1), 5201);
        assert_eq!(
            p(&["tcp-source", "172.30.0.1", "5201", "128m"]),
            Ok(Command::TcpSource {
                addr,
                bytes: 128 << 20
            })
        );
        assert_eq!(
            p(&["tcp-read", "172.30.0.1", "5201"]),
            Ok(Command::TcpRead { addr })
        );
        let e = p(&["tcp-read", "host.example", "5201"]).unwrap_err();
        assert!(e.contains("bad HOST \"host.example\""), "{e}");
        let e = p(&["tcp-read", "10.0.0.1", "70000"]).unwrap_err();
        assert!(e.contains("1 to 65535"), "{e}");
        assert!(p(&["tcp-read", "10.0.0.1", "0"]).is_err());
        assert!(p(&["tcp-source", "10.0.0.1", "1"]).is_err());
    }

    #[test]
    fn randread_checks_block_size_and_seconds() {
        assert_eq!(
            p(&["randread", "/dev/vdb", "4k", "2.5"]),
            Ok(Command::RandRead {
                device: PathBuf::from("/dev/vdb"),
                block_size: 4096,
                seconds: 2.5
            })
        );
        let e = p(&["randread", "/dev/vdb", "1000", "1"]).unwrap_err();
        assert!(e.contains("multiple of 512"), "{e}");
        assert!(p(&["randread", "/dev/vdb", "0", "1"]).is_err());
        assert!(p(&["randread", "/dev/vdb", "512", "0"]).is_err());
        assert!(p(&["randread", "/dev/vdb", "512", "nan"]).is_err());
        assert!(p(&["randread", "/dev/vdb", "512", "-3"]).is_err());
    }

    #[test]
    fn every_subcommand_is_known() {
        for sub in [
            "vsock-connect",
            "vsock-echo-server",
            "vsock-stress",
            "vsock-close-test",
            "vsock-sink",
            "vsock-source",
            "tcp-source",
            "tcp-read",
            "randread",
        ] {
            assert!(
                crate::USAGE.contains(&format!("  {sub} ")),
                "{sub} not in the usage"
            );
            // Wrong argument counts, but the error must not be "unknown subcommand".
            let e = p(&[sub, "a", "b", "c", "d", "e"]).unwrap_err();
            assert!(!e.contains("unknown subcommand"), "{sub}: {e}");
        }
    }
}
