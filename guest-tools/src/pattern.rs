//! The deterministic byte stream vsock-stress sends and checks, plus the small RNG
//! randread uses for offsets.
//!
//! Pattern of connection `i`: xorshift64 (Marsaglia's 13/7/17 triple) seeded with
//! `0x9e3779b97f4a7c15 ^ i`; each step's new state is emitted as a little-endian u64, and
//! the stream is cut at BYTES. Generation works on any chunk boundary, so the checker can
//! compare whatever each `read` returns without buffering the whole stream.

/// Seed base of the stress pattern (the golden-ratio constant).
pub const STRESS_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// xorshift64: a tiny, fast, full-period (2^64-1) generator. Not for anything secret.
#[derive(Debug, Clone)]
pub struct XorShift64 {
    state: u64,
}

impl XorShift64 {
    /// A zero state would stay zero forever, so it is replaced by [`STRESS_SEED`].
    pub fn new(seed: u64) -> XorShift64 {
        XorShift64 {
            state: if seed == 0 { STRESS_SEED } else { seed },
        }
    }

    /// Steps and returns the new state.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }
}

/// The byte stream of one stress connection, produced in chunks of any size.
#[derive(Debug, Clone)]
pub struct Pattern {
    rng: XorShift64,
    /// Bytes of the current word not handed out yet: `word[pos..]`.
    word: [u8; 8],
    pos: usize,
}

impl Pattern {
    /// The pattern of stress connection `conn_index`.
    pub fn for_connection(conn_index: u64) -> Pattern {
        Pattern {
            rng: XorShift64::new(STRESS_SEED ^ conn_index),
            word: [0; 8],
            pos: 8,
        }
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        // Leftover of a word split by the previous call.
        let take = (8 - self.pos).min(buf.len());
        buf[..take].copy_from_slice(&self.word[self.pos..self.pos + take]);
        self.pos += take;
        let rest = &mut buf[take..];
        let mut words = rest.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.rng.next_u64().to_le_bytes();
            tail.copy_from_slice(&self.word[..tail.len()]);
            self.pos = tail.len();
        }
    }
}

/// Checks a received stream against a [`Pattern`] chunk by chunk.
#[derive(Debug)]
pub struct Checker {
    expected: Pattern,
    scratch: Vec<u8>,
    /// Bytes checked so far.
    pub seen: u64,
    /// Offset of the first byte that differed, if any.
    pub first_mismatch: Option<u64>,
}

impl Checker {
    /// A checker for stress connection `conn_index`.
    pub fn for_connection(conn_index: u64) -> Checker {
        Checker {
            expected: Pattern::for_connection(conn_index),
            scratch: Vec::new(),
            seen: 0,
            first_mismatch: None,
        }
    }

    /// Checks the next received chunk. After a mismatch it only counts bytes.
    pub fn check(&mut self, got: &[u8]) {
        if self.first_mismatch.is_none() {
            self.scratch.resize(got.len(), 0);
            self.expected.fill(&mut self.scratch);
            if let Some(i) = got.iter().zip(&self.scratch).position(|(a, b)| a != b) {
                self.first_mismatch = Some(self.seen + i as u64);
            }
        }
        self.seen += got.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(conn: u64, len: usize) -> Vec<u8> {
        let mut p = Pattern::for_connection(conn);
        let mut v = vec![0; len];
        p.fill(&mut v);
        v
    }

    #[test]
    fn first_words_are_xorshift_of_the_seed_little_endian() {
        let mut r = XorShift64::new(STRESS_SEED ^ 3);
        let w0 = r.next_u64();
        let w1 = r.next_u64();
        let v = whole(3, 16);
        assert_eq!(&v[..8], &w0.to_le_bytes());
        assert_eq!(&v[8..], &w1.to_le_bytes());
        // Known value, so a change of the algorithm shows up here (and in the host's
        // expectations, if it ever checks the pattern itself).
        let mut r0 = XorShift64::new(STRESS_SEED);
        let mut x = STRESS_SEED;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        assert_eq!(r0.next_u64(), x);
    }

    #[test]
    fn connections_get_different_streams() {
        assert_ne!(whole(0, 64), whole(1, 64));
    }

    #[test]
    fn any_chunking_gives_the_same_stream() {
        let reference = whole(7, 1000);
        for chunk in [1usize, 3, 7, 8, 9, 13, 64, 999, 1000] {
            let mut p = Pattern::for_connection(7);
            let mut got = Vec::new();
            while got.len() < reference.len() {
                let n = chunk.min(reference.len() - got.len());
                let mut buf = vec![0; n];
                p.fill(&mut buf);
                got.extend_from_slice(&buf);
            }
            assert_eq!(got, reference, "chunk {chunk}");
        }
    }

    #[test]
    fn truncation_is_a_prefix() {
        assert_eq!(whole(2, 13), whole(2, 64)[..13]);
    }

    #[test]
    fn checker_finds_the_first_bad_byte_across_chunks() {
        let mut data = whole(5, 300);
        let mut c = Checker::for_connection(5);
        c.check(&data[..100]);
        c.check(&data[100..]);
        assert_eq!((c.seen, c.first_mismatch), (300, None));

        data[123] ^= 1;
        data[200] ^= 1;
        let mut c = Checker::for_connection(5);
        for chunk in data.chunks(17) {
            c.check(chunk);
        }
        assert_eq!((c.seen, c.first_mismatch), (300, Some(123)));
    }

    #[test]
    fn zero_seed_does_not_stick() {
        let mut r = XorShift64::new(0);
        assert_ne!(r.next_u64(), 0);
    }
}
