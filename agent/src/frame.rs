//! Framing: the 8-byte header, per-type payload limits, and bounded reads and writes of whole
//! frames. Pure functions of bytes plus thin `Read`/`Write` wrappers, so everything here is
//! tested without a guest. The layout is documented in the crate root.

use std::io::{self, Read, Write};

use crate::{HEADER_LEN, MAGIC, MAX_CONTROL_PAYLOAD, MAX_DATA_CHUNK, WIRE_FORMAT};

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Host → agent: first frame of a connection.
    Hello = 0x01,
    /// Agent → host: the handshake succeeded.
    HelloOk = 0x02,
    /// Agent → host: a request failed, or the connection is about to close.
    Error = 0x03,
    /// Host → agent: liveness probe.
    Health = 0x10,
    /// Agent → host: answer to `Health`.
    HealthOk = 0x11,
    /// Host → agent: run a program.
    Exec = 0x20,
    /// Host → agent: a chunk of the program's stdin; empty ends it.
    Stdin = 0x21,
    /// Agent → host: a chunk of the program's stdout.
    Stdout = 0x22,
    /// Agent → host: a chunk of the program's stderr.
    Stderr = 0x23,
    /// Agent → host: the program ended.
    Exit = 0x24,
    /// Host → agent: end the VM.
    Shutdown = 0x30,
    /// Agent → host: the VM is about to end.
    ShutdownOk = 0x31,
    /// Host → agent: the manifest; become this VM and start its workload.
    Manifest = 0x40,
    /// Agent → host: the workload started.
    ManifestOk = 0x41,
    /// Host → agent: how is the workload doing.
    WorkloadStatus = 0x42,
    /// Agent → host: answer to `WorkloadStatus`.
    WorkloadStatusOk = 0x43,
    /// Host → agent: after a snapshot restore, take the host's time, fresh randomness and
    /// optionally a new hostname.
    Resync = 0x44,
    /// Agent → host: answer to `Resync`.
    ResyncOk = 0x45,
    /// Host → agent: read the workload's captured output.
    Logs = 0x60,
    /// Agent → host: which part of the log follows (in `Stdout` frames).
    LogsOk = 0x61,
}

impl FrameType {
    /// Every frame type this version defines.
    pub const ALL: [FrameType; 20] = [
        FrameType::Hello,
        FrameType::HelloOk,
        FrameType::Error,
        FrameType::Health,
        FrameType::HealthOk,
        FrameType::Exec,
        FrameType::Stdin,
        FrameType::Stdout,
        FrameType::Stderr,
        FrameType::Exit,
        FrameType::Shutdown,
        FrameType::ShutdownOk,
        FrameType::Manifest,
        FrameType::ManifestOk,
        FrameType::WorkloadStatus,
        FrameType::WorkloadStatusOk,
        FrameType::Resync,
        FrameType::ResyncOk,
        FrameType::Logs,
        FrameType::LogsOk,
    ];

    /// Parses a type byte. Reserved values (see [`FrameType::is_reserved`]) and unknown ones
    /// are errors.
    pub fn from_u8(value: u8) -> Result<FrameType, FrameError> {
        FrameType::ALL
            .into_iter()
            .find(|t| t.as_u8() == value)
            .ok_or(if FrameType::is_reserved(value) {
                FrameError::Reserved(value)
            } else {
                FrameError::UnknownType(value)
            })
    }

    /// The type byte on the wire.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Whether `value` lies in a range kept for later operations (0x40..=0x7f: manifest
    /// and resync, files, logs, later ones) without being a type this version defines.
    pub fn is_reserved(value: u8) -> bool {
        (0x40..=0x7f).contains(&value) && !FrameType::ALL.iter().any(|t| t.as_u8() == value)
    }

    /// Whether the payload is raw bytes rather than JSON.
    pub fn is_data(self) -> bool {
        matches!(
            self,
            FrameType::Stdin | FrameType::Stdout | FrameType::Stderr
        )
    }

    /// Largest payload a frame of this type may carry.
    pub fn max_payload(self) -> usize {
        if self.is_data() {
            MAX_DATA_CHUNK
        } else {
            MAX_CONTROL_PAYLOAD
        }
    }
}

/// Why bytes could not be turned into a frame, or a frame into bytes.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream cleanly, between frames.
    #[error("connection closed")]
    Closed,
    /// The stream or buffer ended inside a frame.
    #[error("truncated frame")]
    Truncated,
    /// The first two bytes are not [`MAGIC`].
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// The header layout byte is not [`WIRE_FORMAT`].
    #[error("unsupported wire format {0}")]
    BadWireFormat(u8),
    /// A type byte no version defines.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A type byte kept for a later version.
    #[error("frame type {0:#04x} is reserved, not supported by this version")]
    Reserved(u8),
    /// The payload is over its type's limit.
    #[error("{kind:?} payload of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// The frame's type.
        kind: FrameType,
        /// The length given.
        len: u64,
        /// The type's limit.
        max: usize,
    },
    /// A control payload is not valid JSON for its type.
    #[error("bad {kind:?} payload: {reason}")]
    BadPayload {
        /// The frame's type.
        kind: FrameType,
        /// What the JSON decoder said.
        reason: String,
    },
    /// Reading or writing the stream failed.
    #[error("i/o error")]
    Io(#[from] io::Error),
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame's type.
    pub kind: FrameType,
    /// Payload length, already checked against the type's limit.
    pub len: usize,
}

/// A whole frame: type and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The frame's type.
    pub kind: FrameType,
    /// The payload, at most `kind.max_payload()` bytes.
    pub payload: Vec<u8>,
}

/// Encodes a header, refusing a length over the type's limit.
pub fn encode_header(kind: FrameType, len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    let too_large = || FrameError::TooLarge {
        kind,
        len: u64::try_from(len).unwrap_or(u64::MAX),
        max: kind.max_payload(),
    };
    if len > kind.max_payload() {
        return Err(too_large());
    }
    let [l0, l1, l2, l3] = u32::try_from(len).map_err(|_| too_large())?.to_le_bytes();
    let [m0, m1] = MAGIC;
    Ok([m0, m1, WIRE_FORMAT, kind.as_u8(), l0, l1, l2, l3])
}

/// Decodes and checks a header: magic, wire format, type, then length against the type's
/// limit. Nothing is allocated, so a hostile length costs nothing.
pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let [m0, m1, format, kind, l0, l1, l2, l3] = *bytes;
    if [m0, m1] != MAGIC {
        return Err(FrameError::BadMagic([m0, m1]));
    }
    if format != WIRE_FORMAT {
        return Err(FrameError::BadWireFormat(format));
    }
    let kind = FrameType::from_u8(kind)?;
    let len32 = u32::from_le_bytes([l0, l1, l2, l3]);
    let too_large = || FrameError::TooLarge {
        kind,
        len: u64::from(len32),
        max: kind.max_payload(),
    };
    let len = usize::try_from(len32).map_err(|_| too_large())?;
    if len > kind.max_payload() {
        return Err(too_large());
    }
    Ok(Header { kind, len })
}

/// Encodes a whole frame into one buffer.
pub fn encode_frame(kind: FrameType, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let header = encode_header(kind, payload.len())?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes the first frame in `buf` and returns it with the number of bytes it used. A
/// buffer that ends inside the frame is [`FrameError::Truncated`] (an empty one too).
pub fn decode_frame(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
    let header: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let Header { kind, len } = decode_header(header)?;
    let end = HEADER_LEN.checked_add(len).ok_or(FrameError::Truncated)?;
    let payload = buf.get(HEADER_LEN..end).ok_or(FrameError::Truncated)?;
    Ok((
        Frame {
            kind,
            payload: payload.to_vec(),
        },
        end,
    ))
}

/// Reads into `buf` until it is full or the stream ends; returns how much was read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n.min(rest.len()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads one frame. The payload buffer is allocated only after the header's length passed
/// its type's limit, and exactly that many bytes are read: never more than one frame.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match read_full(r, &mut header)? {
        0 => return Err(FrameError::Closed),
        HEADER_LEN => {}
        _ => return Err(FrameError::Truncated),
    }
    let Header { kind, len } = decode_header(&header)?;
    let mut payload = vec![0u8; len];
    if read_full(r, &mut payload)? != len {
        return Err(FrameError::Truncated);
    }
    Ok(Frame { kind, payload })
}

/// Writes one frame with a single `write_all`, then flushes.
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    kind: FrameType,
    payload: &[u8],
) -> Result<(), FrameError> {
    let bytes = encode_frame(kind, payload)?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    fn header(kind: u8, len: u32) -> [u8; HEADER_LEN] {
        let [l0, l1, l2, l3] = len.to_le_bytes();
        [b'G', b'A', WIRE_FORMAT, kind, l0, l1, l2, l3]
    }

    #[test]
    fn header_layout_is_as_documented() {
        let h = encode_header(FrameType::Exec, 0x0102_0304 & 0xffff).unwrap();
        assert_eq!(h, [0x47, 0x41, 1, 0x20, 0x04, 0x03, 0, 0]);
    }

    #[test]
    fn every_type_round_trips() {
        for kind in FrameType::ALL {
            assert_eq!(FrameType::from_u8(kind.as_u8()).unwrap(), kind);
            let payload = vec![0xa5; kind.max_payload()];
            let bytes = encode_frame(kind, &payload).unwrap();
            let (frame, used) = decode_frame(&bytes).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(frame, Frame { kind, payload });
            let frame = read_frame(&mut Cursor::new(&bytes)).unwrap();
            assert_eq!(frame.kind, kind);
        }
    }

    #[test]
    fn reads_exactly_one_frame_at_a_time() {
        let mut bytes = encode_frame(FrameType::Stdout, b"one").unwrap();
        bytes.extend(encode_frame(FrameType::Stderr, b"").unwrap());
        let mut r = Cursor::new(bytes);
        assert_eq!(read_frame(&mut r).unwrap().payload, b"one");
        let f = read_frame(&mut r).unwrap();
        assert_eq!((f.kind, f.payload.len()), (FrameType::Stderr, 0));
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn type_bytes_unknown_and_reserved() {
        for v in 0..=u8::MAX {
            match FrameType::from_u8(v) {
                Ok(t) => assert_eq!(t.as_u8(), v),
                Err(FrameError::Reserved(r)) => {
                    assert_eq!(r, v);
                    assert!((0x40..=0x7f).contains(&v));
                    assert!(FrameType::is_reserved(v));
                }
                Err(FrameError::UnknownType(u)) => assert_eq!(u, v),
                Err(e) => panic!("{v}: {e}"),
            }
        }
        assert!(matches!(
            decode_header(&header(0x00, 0)),
            Err(FrameError::UnknownType(0))
        ));
        assert!(matches!(
            decode_header(&header(0x46, 0)),
            Err(FrameError::Reserved(0x46))
        ));
        // The manifest, resync and log types are defined now; their neighbours stay
        // reserved.
        for (v, kind) in [
            (0x40, FrameType::Manifest),
            (0x41, FrameType::ManifestOk),
            (0x42, FrameType::WorkloadStatus),
            (0x43, FrameType::WorkloadStatusOk),
            (0x44, FrameType::Resync),
            (0x45, FrameType::ResyncOk),
            (0x60, FrameType::Logs),
            (0x61, FrameType::LogsOk),
        ] {
            assert_eq!(FrameType::from_u8(v).unwrap(), kind);
            assert!(!FrameType::is_reserved(v) && !kind.is_data());
        }
        for v in [0x46, 0x4f, 0x50, 0x62, 0x7f] {
            assert!(matches!(
                FrameType::from_u8(v),
                Err(FrameError::Reserved(_))
            ));
        }
    }

    #[test]
    fn bad_magic_and_wire_format() {
        let mut h = header(0x01, 0);
        h[0] = b'X';
        assert!(matches!(
            decode_header(&h),
            Err(FrameError::BadMagic([b'X', b'A']))
        ));
        let mut h = header(0x01, 0);
        h[2] = 2;
        assert!(matches!(
            decode_header(&h),
            Err(FrameError::BadWireFormat(2))
        ));
    }

    #[test]
    fn oversized_is_rejected_before_reading_the_payload() {
        // A 4 GiB claim with no payload behind it: the error must be TooLarge (decided on the
        // header alone), not Truncated (which would mean we tried to read it).
        let h = header(FrameType::Exec.as_u8(), u32::MAX);
        let err = read_frame(&mut Cursor::new(h)).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { kind: FrameType::Exec, len, .. } if len == u64::from(u32::MAX)),
            "{err}"
        );
        // Data frames have the smaller limit.
        let len = u32::try_from(MAX_DATA_CHUNK + 1).unwrap();
        assert!(matches!(
            decode_header(&header(FrameType::Stdout.as_u8(), len)),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(decode_header(&header(FrameType::Exec.as_u8(), len)).is_ok());
        // And the encoder refuses to produce what the decoder would refuse.
        assert!(matches!(
            encode_frame(FrameType::Stdout, &vec![0; MAX_DATA_CHUNK + 1]),
            Err(FrameError::TooLarge { .. })
        ));
        let mut sink = Vec::new();
        assert!(write_frame(
            &mut sink,
            FrameType::Error,
            &vec![0; MAX_CONTROL_PAYLOAD + 1]
        )
        .is_err());
        assert!(sink.is_empty());
    }

    #[test]
    fn truncated_header_and_payload() {
        let bytes = encode_frame(FrameType::Stdin, b"hello").unwrap();
        for cut in 1..bytes.len() {
            let part = &bytes[..cut];
            assert!(matches!(decode_frame(part), Err(FrameError::Truncated)));
            assert!(matches!(
                read_frame(&mut Cursor::new(part)),
                Err(FrameError::Truncated)
            ));
        }
        assert!(matches!(decode_frame(&[]), Err(FrameError::Truncated)));
        assert!(matches!(
            read_frame(&mut Cursor::new(&[] as &[u8])),
            Err(FrameError::Closed)
        ));
    }

    /// A reader that hands out one byte at a time and is interrupted in between, as a
    /// socket may be.
    struct Trickle<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            let (Some(b), Some(slot)) = (self.data.first(), buf.first_mut()) else {
                return Ok(0);
            };
            *slot = *b;
            self.data = &self.data[1..];
            Ok(1)
        }
    }

    #[test]
    fn short_reads_and_eintr_are_retried() {
        let bytes = encode_frame(FrameType::Stdout, b"trickle").unwrap();
        let mut r = Trickle {
            data: &bytes,
            interrupt: false,
        };
        assert_eq!(read_frame(&mut r).unwrap().payload, b"trickle");
    }

    /// xorshift64: a deterministic source of noise for the decoder tests.
    pub(crate) struct XorShift(pub u64);

    impl XorShift {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        pub(crate) fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
        }
    }

    #[test]
    fn decoder_never_panics_on_random_bytes() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut decoded = 0;
        for i in 0..100_000 {
            let len = rng.below(64);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            // Most random headers fail on the magic; give half of them a valid prefix (and
            // some a valid type) so the later checks are exercised too.
            if i % 2 == 0 && buf.len() >= 4 {
                buf[..3].copy_from_slice(&[b'G', b'A', WIRE_FORMAT]);
                if i % 4 == 0 {
                    buf[3] = FrameType::ALL[rng.below(FrameType::ALL.len())].as_u8();
                    if buf.len() >= HEADER_LEN && i % 8 == 0 {
                        // A length that fits what follows, to reach full decodes.
                        let fit = u32::try_from(buf.len() - HEADER_LEN).unwrap();
                        buf[4..8].copy_from_slice(&fit.to_le_bytes());
                    }
                }
            }
            if let Ok((frame, used)) = decode_frame(&buf) {
                assert!(used <= buf.len());
                assert!(frame.payload.len() <= frame.kind.max_payload());
                decoded += 1;
            }
            let _ = read_frame(&mut Cursor::new(&buf));
            let _ = crate::Message::from_frame(Frame {
                kind: FrameType::ALL[rng.below(FrameType::ALL.len())],
                payload: buf,
            });
        }
        assert!(decoded > 1000, "only {decoded} buffers decoded");
    }
}
