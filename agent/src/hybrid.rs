//! Host → guest connections through Firecracker-style hybrid vsock: the VMM listens on a
//! unix socket; a client connects, writes `CONNECT <port>\n`, and the VMM answers
//! `OK <host_port>\n` once the guest accepted on that vsock port. From then on the stream
//! carries the guest's bytes. A refused connection is closed without an answer.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest answer line accepted from the VMM, newline included. `OK 4294967295\n` is 14.
pub const MAX_HYBRID_LINE: usize = 64;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one `\n`-terminated line, a byte at a time so nothing past the newline (the guest's
/// first bytes) is consumed, giving up at `deadline` or after [`MAX_HYBRID_LINE`] bytes.
fn read_line(stream: &mut UnixStream, deadline: Option<Instant>, port: u32) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "hybrid vsock: no answer to CONNECT in time",
                ));
            }
            stream.set_read_timeout(Some(left))?;
        }
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "hybrid vsock: closed before answering CONNECT \
                         (is the guest listening on vsock port {port}?)"
                    ),
                ))
            }
            Ok(_) if byte == *b"\n" => break,
            Ok(_) => {
                line.extend_from_slice(&byte);
                if line.len() >= MAX_HYBRID_LINE {
                    return Err(invalid(format!(
                        "hybrid vsock: answer longer than {MAX_HYBRID_LINE} bytes: {:?}...",
                        String::from_utf8_lossy(&line)
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // What a read timeout looks like on a unix socket; the deadline check above
                // turns it into TimedOut on the next pass.
            }
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(line).map_err(|e| {
        invalid(format!(
            "hybrid vsock: answer is not UTF-8: {:?}",
            String::from_utf8_lossy(e.as_bytes())
        ))
    })
}

/// Connects to guest vsock `port` through the VMM's hybrid vsock socket at `uds_path`.
/// `timeout` bounds the whole handshake (it must not be zero). The returned stream has no
/// read or write timeout set: the caller chooses its own.
pub fn connect_hybrid(uds_path: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    if timeout.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "hybrid vsock: zero timeout",
        ));
    }
    let deadline = Instant::now().checked_add(timeout);
    let mut stream = UnixStream::connect(uds_path)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let line = read_line(&mut stream, deadline, port)?;
    let host_port = line.strip_prefix("OK ").and_then(|p| p.parse::<u32>().ok());
    if host_port.is_none() {
        return Err(invalid(format!(
            "hybrid vsock: expected \"OK <port>\", got {line:?}"
        )));
    }
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake VMM: accepts one connection, reads the CONNECT line, answers `reply` (an empty
    /// one closes the connection), then sends `after` (the "guest's" first bytes) and
    /// returns the CONNECT line and what the client wrote next.
    fn fake_vmm(
        reply: &'static [u8],
        after: &'static [u8],
    ) -> (tempdir::Dir, thread::JoinHandle<(String, Vec<u8>)>) {
        let dir = tempdir::Dir::new();
        let listener = UnixListener::bind(dir.path().join("v.sock")).unwrap();
        let handle = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut connect = String::new();
            r.read_line(&mut connect).unwrap();
            if reply.is_empty() {
                // Refuse: close without an answer, as Firecracker does.
                return (connect, Vec::new());
            }
            (&s).write_all(reply).unwrap();
            (&s).write_all(after).unwrap();
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            (connect, rest)
        });
        (dir, handle)
    }

    /// A throwaway directory, removed on drop (no dev-dependency for this).
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Dir {
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "agent-hybrid-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn connect_ok_leaves_the_guest_bytes_unread() {
        let (dir, vmm) = fake_vmm(b"OK 1073741824\n", b"GUEST");
        let mut s = connect_hybrid(&dir.path().join("v.sock"), 52, T).unwrap();
        assert_eq!(s.read_timeout().unwrap(), None);
        let mut first = [0u8; 5];
        s.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"GUEST");
        s.write_all(b"ping").unwrap();
        drop(s);
        let (connect, rest) = vmm.join().unwrap();
        assert_eq!(connect, "CONNECT 52\n");
        assert_eq!(rest, b"ping");
    }

    #[test]
    fn refused_garbage_and_overlong_answers() {
        let (dir, vmm) = fake_vmm(b"", b"");
        let e = connect_hybrid(&dir.path().join("v.sock"), 7, T).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("port 7"), "{e}");
        vmm.join().unwrap();

        for bad in [
            &b"NO 1\n"[..],
            b"OK\n",
            b"OK x\n",
            b"OK 99999999999\n",
            b"\xff\n",
        ] {
            let (dir, vmm) = fake_vmm(bad, b"");
            let e = connect_hybrid(&dir.path().join("v.sock"), 7, T).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad:?}: {e}");
            vmm.join().unwrap();
        }

        let (dir, vmm) = fake_vmm(&[b'O'; 4096], b"");
        let e = connect_hybrid(&dir.path().join("v.sock"), 7, T).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().len() < 200, "{e}");
        vmm.join().unwrap();
    }

    #[test]
    fn silent_vmm_times_out() {
        let dir = tempdir::Dir::new();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let started = Instant::now();
        let e = connect_hybrid(&path, 7, Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(listener);
    }

    #[test]
    fn missing_socket_and_zero_timeout() {
        let dir = tempdir::Dir::new();
        let e = connect_hybrid(&dir.path().join("nope"), 7, T).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = connect_hybrid(&dir.path().join("nope"), 7, Duration::ZERO).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
