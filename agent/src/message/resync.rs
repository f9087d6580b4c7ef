//! Payloads of the resync frames (0x44, 0x45): what a guest restored from a snapshot needs
//! to stop being a copy of the snapshot (clock, RNG state, identity). The semantics are in
//! the crate docs ("Resync").

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::quote;
use crate::{MAX_HOSTNAME, MAX_RESYNC_SEED, MIN_RESYNC_SEED};

/// How many seed bytes [`ResyncRequest::now`] draws from the host's `getrandom`.
pub const RESYNC_SEED_LEN: usize = 32;

/// `Resync`: the host's time, fresh randomness, and optionally a new hostname.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRequest {
    /// The host's `CLOCK_REALTIME`, in nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
    /// [`MIN_RESYNC_SEED`]..=[`MAX_RESYNC_SEED`] bytes for the guest's RNG, as hex (an even
    /// number of digits, either case).
    pub seed: String,
    /// The guest's new hostname: 1..=[`MAX_HOSTNAME`] ASCII letters, digits, `-` and `.`.
    /// `None` keeps the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

impl ResyncRequest {
    /// A request carrying `seed` (hex-encoded here). Not validated: see
    /// [`ResyncRequest::validate`].
    pub fn new(unix_time_ns: u64, seed: &[u8], hostname: Option<String>) -> ResyncRequest {
        ResyncRequest {
            unix_time_ns,
            seed: hex_encode(seed),
            hostname,
        }
    }

    /// A request with the host's current time and [`RESYNC_SEED_LEN`] bytes from the host's
    /// `getrandom(2)`. Fails if the clock is before 1970 (or past 2554) or `getrandom`
    /// fails.
    pub fn now(hostname: Option<String>) -> io::Result<ResyncRequest> {
        let mut seed = [0u8; RESYNC_SEED_LEN];
        fill_random(&mut seed)?;
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| io::Error::other("the host clock is before 1970"))?;
        let unix_time_ns = u64::try_from(since_epoch.as_nanos())
            .map_err(|_| io::Error::other("the host clock is past 2554"))?;
        Ok(ResyncRequest::new(unix_time_ns, &seed, hostname))
    }

    /// The seed's bytes, checked: hex of an even length, [`MIN_RESYNC_SEED`] to
    /// [`MAX_RESYNC_SEED`] bytes. The message names the field.
    pub fn seed_bytes(&self) -> Result<Vec<u8>, String> {
        let hex = self.seed.as_bytes();
        // Length first, so an oversized seed is refused before anything is allocated.
        if !hex.len().is_multiple_of(2) {
            return Err(format!(
                "seed has an odd number of hex digits ({})",
                hex.len()
            ));
        }
        let len = hex.len() / 2;
        if !(MIN_RESYNC_SEED..=MAX_RESYNC_SEED).contains(&len) {
            return Err(format!(
                "seed of {len} bytes, not within {MIN_RESYNC_SEED}..={MAX_RESYNC_SEED}"
            ));
        }
        hex.chunks_exact(2)
            .map(|pair| match pair {
                [hi, lo] => Some((hex_digit(*hi)? << 4) | hex_digit(*lo)?),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| format!("seed {} is not hex", quote(&self.seed)))
    }

    /// Checks every field against the limits in the crate docs. The message names the
    /// offending field.
    pub fn validate(&self) -> Result<(), String> {
        self.seed_bytes()?;
        if let Some(name) = &self.hostname {
            validate_resync_hostname(name)?;
        }
        Ok(())
    }
}

/// `ResyncOk`: what the agent did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncReply {
    /// How far the guest's realtime clock moved: new minus old, in milliseconds (positive
    /// when the guest was behind).
    pub clock_step_ms: i64,
    /// Whether the seed was credited as entropy (`RNDADDENTROPY`). `false` means the agent
    /// could only mix it in by writing it to `/dev/urandom`, which credits nothing.
    pub entropy_credited: bool,
    /// The guest's hostname after the resync.
    pub hostname: String,
}

/// A hostname for `Resync`: 1 to [`MAX_HOSTNAME`] ASCII letters, digits, `-` and `.`.
fn validate_resync_hostname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_HOSTNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!("bad hostname {}", quote(name)))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        for nibble in [b >> 4, b & 0xf] {
            out.push(char::from(DIGITS[usize::from(nibble)]));
        }
    }
    out
}

/// Fills `buf` from the kernel's `getrandom(2)` (blocking until the pool is initialised,
/// which on a running host it long is).
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        // SAFETY: the pointer and length describe `rest`, which is writable and outlives
        // the call; the kernel writes at most `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n.min(rest.len()),
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, Frame, FrameType};
    use crate::message::{read_message, write_message, Message};
    use std::io::Cursor;

    fn request(seed_len: usize) -> ResyncRequest {
        let seed: Vec<u8> = (0..seed_len)
            .map(|i| u8::try_from(i * 7 % 256).unwrap())
            .collect();
        ResyncRequest::new(
            1_700_000_000_123_456_789,
            &seed,
            Some("clone-7.local".into()),
        )
    }

    #[test]
    fn round_trip_through_a_stream() {
        let req = request(32);
        req.validate().unwrap();
        let reply = ResyncReply {
            clock_step_ms: -1234,
            entropy_credited: true,
            hostname: "clone-7.local".into(),
        };
        let mut wire = Vec::new();
        write_message(&mut wire, &Message::Resync(req.clone())).unwrap();
        write_message(&mut wire, &Message::ResyncOk(reply.clone())).unwrap();
        assert_eq!(wire[3], 0x44);
        let mut r = Cursor::new(wire);
        assert_eq!(read_message(&mut r).unwrap(), Message::Resync(req.clone()));
        assert_eq!(read_message(&mut r).unwrap(), Message::ResyncOk(reply));
        // And the seed comes back as the bytes it was built from.
        let bytes = req.seed_bytes().unwrap();
        assert_eq!(bytes.len(), 32);
        assert_eq!(bytes[1], 7);
    }

    #[test]
    fn json_is_as_documented() {
        let req = ResyncRequest::new(5, &[0xab; 32], None);
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            format!(r#"{{"unix_time_ns":5,"seed":"{}"}}"#, "ab".repeat(32))
        );
        let with_host = ResyncRequest::new(5, &[0; 32], Some("h".into()));
        assert!(serde_json::to_string(&with_host)
            .unwrap()
            .ends_with(r#","hostname":"h"}"#));
        let reply = ResyncReply {
            clock_step_ms: 42,
            entropy_credited: false,
            hostname: "h".into(),
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"clock_step_ms":42,"entropy_credited":false,"hostname":"h"}"#
        );
        // Upper-case hex, a null hostname and unknown fields are accepted.
        let frame = Frame {
            kind: FrameType::Resync,
            payload: format!(
                r#"{{"unix_time_ns":1,"seed":"{}","hostname":null,"later":true}}"#,
                "AbCdEf09".repeat(8)
            )
            .into_bytes(),
        };
        let Message::Resync(got) = Message::from_frame(frame).unwrap() else {
            panic!("not a resync");
        };
        assert_eq!(got.hostname, None);
        assert_eq!(&got.seed_bytes().unwrap()[..4], &[0xab, 0xcd, 0xef, 0x09]);
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for payload in [
            &b"{}"[..],
            br#"{"seed":"00"}"#,
            br#"{"unix_time_ns":-1,"seed":"00"}"#,
            br#"{"unix_time_ns":1,"seed":7}"#,
            br#"{"clock_step_ms":"x","entropy_credited":true,"hostname":"h"}"#,
        ] {
            for kind in [FrameType::Resync, FrameType::ResyncOk] {
                let bytes = encode_frame(kind, payload).unwrap();
                assert!(
                    read_message(&mut Cursor::new(bytes)).is_err(),
                    "{kind:?} {}",
                    String::from_utf8_lossy(payload)
                );
            }
        }
    }

    #[test]
    fn seed_length_limits() {
        assert!(request(MIN_RESYNC_SEED).validate().is_ok());
        assert!(request(MAX_RESYNC_SEED).validate().is_ok());
        assert!(request(33).validate().is_ok());
        for len in [0, 1, MIN_RESYNC_SEED - 1] {
            let msg = request(len).validate().unwrap_err();
            assert!(msg.contains("seed") && msg.contains("bytes"), "{msg}");
        }
        // Oversized: refused on the length, and the message stays short.
        for len in [MAX_RESYNC_SEED + 1, 1 << 16] {
            let msg = request(len).validate().unwrap_err();
            assert!(msg.contains("seed") && msg.len() < 200, "{msg}");
        }
    }

    #[test]
    fn seed_must_be_hex() {
        let mut req = request(32);
        req.seed.push('0');
        assert!(req.validate().unwrap_err().contains("odd"));
        for bad in ["zz", "0x", " 0", "é"] {
            let mut req = request(32);
            req.seed.replace_range(..bad.len(), bad);
            let msg = req.validate().unwrap_err();
            assert!(msg.contains("not hex"), "{bad:?}: {msg}");
            assert!(msg.len() < 200, "{msg}");
        }
        // An odd number of bytes is fine: the length counts bytes, not words.
        let mut req = request(32);
        req.seed.push_str("ff");
        assert_eq!(req.seed_bytes().unwrap().len(), 33);
    }

    #[test]
    fn hostname_rules() {
        let mut req = request(32);
        req.hostname = None;
        assert!(req.validate().is_ok());
        for good in ["a", "clone-1", "node.example.com", "A9"] {
            req.hostname = Some(good.into());
            assert!(req.validate().is_ok(), "{good}");
        }
        req.hostname = Some("h".repeat(MAX_HOSTNAME));
        assert!(req.validate().is_ok());
        for bad in ["", "has space", "a/b", "under_score", "nul\0", "é"] {
            req.hostname = Some(bad.into());
            assert!(req.validate().unwrap_err().contains("hostname"), "{bad:?}");
        }
        req.hostname = Some("h".repeat(MAX_HOSTNAME + 1));
        let msg = req.validate().unwrap_err();
        assert!(msg.contains("hostname") && msg.len() < 200, "{msg}");
    }

    #[test]
    fn now_uses_the_clock_and_fresh_randomness() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let a = ResyncRequest::now(Some("n".into())).unwrap();
        let b = ResyncRequest::now(None).unwrap();
        a.validate().unwrap();
        b.validate().unwrap();
        assert!(u128::from(a.unix_time_ns) >= before);
        assert!(b.unix_time_ns >= a.unix_time_ns);
        assert_eq!(a.seed_bytes().unwrap().len(), RESYNC_SEED_LEN);
        assert_ne!(a.seed, b.seed);
        assert_eq!(a.hostname.as_deref(), Some("n"));
    }
}
