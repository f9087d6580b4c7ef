//! Per-connection logic, generic over the stream so the host's unit tests run it over Unix
//! socket pairs while the guest runs it over vsock: echo, the stress send-and-check, and the
//! byte pumps of sink, source and connect.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use agent::vsock::VsockStream;

use crate::pattern::{Checker, Pattern};

/// What a per-connection routine needs beyond `Read + Write`: a second handle to the same
/// connection (one thread writes while another reads) and a half-close that tells the peer
/// "no more data" while still reading its answer. Implemented for vsock and TCP and, for
/// tests, Unix sockets.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// Another handle to the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// `shutdown(SHUT_WR)`: the peer reads EOF; our read side stays open.
    fn shutdown_write(&self) -> io::Result<()>;
    /// Bounds each later read (`None`: reads block).
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

/// The three stream types share the same inherent methods (std's sockets and
/// `agent::vsock::VsockStream` mirror each other), so one body fits all.
macro_rules! impl_duplex {
    ($($t:ty),*) => {$(
        impl Duplex for $t {
            fn try_clone(&self) -> io::Result<Self> {
                <$t>::try_clone(self)
            }
            fn shutdown_write(&self) -> io::Result<()> {
                self.shutdown(Shutdown::Write)
            }
            fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_read_timeout(self, t)
            }
        }
    )*};
}

impl_duplex!(UnixStream, TcpStream, VsockStream);

/// Read size for echo and checks: large enough that per-call overhead is small next to a
/// virtio-vsock packet's 64 KiB maximum.
const IO_CHUNK: usize = 64 * 1024;
/// Stack of gtool's worker threads: they keep their buffers on the heap, and a stress run
/// with many connections should not reserve 2 MiB per thread in a small guest.
pub const THREAD_STACK: usize = 256 * 1024;
/// Write size of vsock-source and tcp-source.
pub const SOURCE_CHUNK: usize = 256 * 1024;

/// `read` that retries EINTR.
fn read_some<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Writes back everything read until EOF; returns the number of bytes echoed.
pub fn echo<S: Read + Write>(s: &mut S) -> io::Result<u64> {
    let mut buf = vec![0u8; IO_CHUNK];
    let mut total = 0u64;
    loop {
        let n = read_some(s, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        s.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Sends the first `bytes` bytes of connection `index`'s pattern.
pub fn send_pattern<W: Write>(w: &mut W, index: u64, bytes: u64) -> io::Result<()> {
    let mut pattern = Pattern::for_connection(index);
    let mut buf = vec![0u8; IO_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        pattern.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Sends `bytes` zero bytes in [`SOURCE_CHUNK`] writes.
pub fn send_zeros<W: Write>(w: &mut W, bytes: u64) -> io::Result<()> {
    let buf = vec![0u8; SOURCE_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The source side of a throughput run: `bytes` zeros, then a half-close. Returns the
/// seconds from the first write to the half-close. Afterwards waits up to `drain` for the
/// peer's close, so the process does not exit while data is in flight; a peer that never
/// closes or resets then is not an error, since the data is already sent.
pub fn timed_source<S: Duplex>(s: &mut S, bytes: u64, drain: Duration) -> io::Result<f64> {
    let start = Instant::now();
    send_zeros(s, bytes)?;
    s.shutdown_write()?;
    let secs = start.elapsed().as_secs_f64();
    if s.set_read_timeout(Some(drain)).is_ok() {
        let _ = count_until_eof(s);
    }
    Ok(secs)
}

/// The reading side of a throughput run: bytes until EOF and the seconds that took.
pub fn timed_read<R: Read>(r: &mut R) -> io::Result<(u64, f64)> {
    let start = Instant::now();
    let n = count_until_eof(r)?;
    Ok((n, start.elapsed().as_secs_f64()))
}

/// Reads until EOF and returns how many bytes came.
pub fn count_until_eof<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut buf = vec![0u8; IO_CHUNK];
    let mut total = 0u64;
    loop {
        let n = read_some(r, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Copies `r` to `w` until EOF, flushing after every chunk so interactive output shows up
/// at once; returns the byte count.
pub fn pump<R: Read, W: Write>(r: &mut R, w: &mut W) -> io::Result<u64> {
    let mut buf = vec![0u8; IO_CHUNK];
    let mut total = 0u64;
    loop {
        let n = read_some(r, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n])?;
        w.flush()?;
        total += n as u64;
    }
}

/// One stress connection: a writer thread sends the pattern and half-closes while this
/// thread reads the echo and checks it on the fly. Returns the bytes checked, or why the
/// connection is bad.
pub fn stress_connection<S: Duplex>(stream: S, index: u64, bytes: u64) -> Result<u64, String> {
    let mut writer = stream.try_clone().map_err(|e| format!("dup socket: {e}"))?;
    let sender = thread::Builder::new()
        .name(format!("stress-tx-{index}"))
        .stack_size(THREAD_STACK)
        .spawn(move || -> io::Result<()> {
            send_pattern(&mut writer, index, bytes)?;
            writer.shutdown_write()
        })
        .map_err(|e| format!("spawn writer thread: {e}"))?;

    let mut reader = stream;
    let mut checker = Checker::for_connection(index);
    let mut buf = vec![0u8; IO_CHUNK];
    let read_result = loop {
        match read_some(&mut reader, &mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => checker.check(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    let send_result = sender
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));

    // Report the most telling failure first: data corruption, then I/O, then length.
    if let Some(at) = checker.first_mismatch {
        return Err(format!("echoed data differs from the pattern at byte {at}"));
    }
    send_result.map_err(|e| format!("send after {} echoed bytes: {e}", checker.seen))?;
    read_result.map_err(|e| format!("receive after {} bytes: {e}", checker.seen))?;
    if checker.seen != bytes {
        return Err(format!(
            "peer echoed {} bytes, expected {bytes}",
            checker.seen
        ));
    }
    Ok(checker.seen)
}

/// MiB/s with one decimal, for the `*_MIBS=` lines.
pub fn mibs(bytes: u64, secs: f64) -> String {
    let rate = if secs > 0.0 {
        bytes as f64 / (1024.0 * 1024.0) / secs
    } else {
        0.0
    };
    format!("{rate:.1}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `server` on one end of a socket pair in a thread and returns the other end.
    fn serve(server: impl FnOnce(UnixStream) + Send + 'static) -> UnixStream {
        let (a, b) = UnixStream::pair().unwrap();
        thread::spawn(move || server(b));
        a
    }

    fn echo_server() -> UnixStream {
        serve(|mut s| {
            echo(&mut s).unwrap();
        })
    }

    #[test]
    fn stress_over_an_echo_passes() {
        // Larger than the socket buffers in both directions: only works if sending and
        // checking really run at the same time.
        for (index, bytes) in [(0u64, 0u64), (1, 1), (2, 13), (3, 3 * 1024 * 1024 + 5)] {
            let got = stress_connection(echo_server(), index, bytes);
            assert_eq!(got, Ok(bytes), "conn {index}");
        }
    }

    #[test]
    fn stress_finds_a_flipped_byte() {
        let s = serve(|mut s| {
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            all[1000] ^= 0x40;
            s.write_all(&all).unwrap();
        });
        let e = stress_connection(s, 4, 5000).unwrap_err();
        assert_eq!(e, "echoed data differs from the pattern at byte 1000");
    }

    #[test]
    fn stress_finds_a_short_echo() {
        let s = serve(|mut s| {
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            s.write_all(&all[..all.len() - 1]).unwrap();
        });
        let e = stress_connection(s, 4, 5000).unwrap_err();
        assert_eq!(e, "peer echoed 4999 bytes, expected 5000");
    }

    #[test]
    fn stress_finds_a_long_echo() {
        let s = serve(|mut s| {
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            // The right pattern, just 8 bytes too long.
            let mut p = Pattern::for_connection(4);
            let mut longer = vec![0u8; all.len() + 8];
            p.fill(&mut longer);
            s.write_all(&longer).unwrap();
        });
        let e = stress_connection(s, 4, 64).unwrap_err();
        assert_eq!(e, "peer echoed 72 bytes, expected 64");
    }

    #[test]
    fn stress_reports_a_peer_that_closes_early() {
        let s = serve(drop);
        let e = stress_connection(s, 0, 10 * 1024 * 1024).unwrap_err();
        assert!(e.starts_with("send after 0 echoed bytes"), "{e}");
    }

    #[test]
    fn echo_returns_the_count_and_sink_counts() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || echo(&mut b).unwrap());
        let writer = {
            let mut a2 = a.try_clone().unwrap();
            thread::spawn(move || {
                send_zeros(&mut a2, 1_000_000).unwrap();
                a2.shutdown_write().unwrap();
            })
        };
        assert_eq!(count_until_eof(&mut a).unwrap(), 1_000_000);
        writer.join().unwrap();
        assert_eq!(t.join().unwrap(), 1_000_000);
    }

    #[test]
    fn timed_source_and_read_over_tcp() {
        // Loopback TCP, as in the guest: the reader gets every byte, then closes, and the
        // source's drain sees that close instead of waiting out its bound.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            timed_read(&mut s).unwrap()
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let t0 = Instant::now();
        let secs =
            timed_source(&mut s, 3 * SOURCE_CHUNK as u64 + 7, Duration::from_secs(30)).unwrap();
        let (n, read_secs) = reader.join().unwrap();
        assert_eq!(n, 3 * SOURCE_CHUNK as u64 + 7);
        assert!(secs >= 0.0 && read_secs >= 0.0);
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "drain waited for nothing"
        );
    }

    #[test]
    fn timed_source_does_not_wait_forever_for_a_silent_peer() {
        // The peer reads everything but keeps its end open: the drain gives up after its
        // bound.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let peer = thread::spawn(move || {
            let n = count_until_eof(&mut b).unwrap();
            thread::sleep(Duration::from_secs(2));
            n
        });
        let t0 = Instant::now();
        timed_source(&mut a, 100_000, Duration::from_millis(200)).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(peer.join().unwrap(), 100_000);
    }

    #[test]
    fn pump_copies_everything() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let mut out = Vec::new();
        assert_eq!(pump(&mut &data[..], &mut out).unwrap(), 200_000);
        assert_eq!(out, data);
    }

    #[test]
    fn mibs_format() {
        assert_eq!(mibs(3 * 1024 * 1024, 2.0), "1.5");
        assert_eq!(mibs(1, 0.0), "0.0");
    }
}
