//! The workload's log: the newest `capacity` bytes of an endless byte stream, addressed by
//! absolute offsets (bytes since the stream began). Pure data structure, no I/O.

/// What a read returned: the held bytes from `start`, and whether older bytes that were
/// asked for are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    /// Absolute offset of `data[0]`.
    pub start: u64,
    /// The bytes.
    pub data: Vec<u8>,
    /// Whether the requested offset was older than the oldest byte held.
    pub dropped: bool,
}

/// A ring buffer over an append-only stream. The buffer is allocated on the first append,
/// so an agent whose workload never writes costs nothing.
#[derive(Debug)]
pub struct LogRing {
    buf: Vec<u8>,
    capacity: usize,
    /// Bytes ever appended: the absolute offset of the next byte.
    written: u64,
}

/// `n` as a u64; every usize fits on the targets guest-init builds for (64-bit).
fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl LogRing {
    /// A ring that keeps the newest `capacity` bytes.
    pub fn new(capacity: usize) -> LogRing {
        LogRing {
            buf: Vec::new(),
            capacity,
            written: 0,
        }
    }

    /// Bytes ever appended.
    #[cfg(test)]
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Absolute offset of the oldest byte still held.
    pub fn oldest(&self) -> u64 {
        self.written.saturating_sub(to_u64(self.capacity))
    }

    /// Where absolute offset `at` lives in `buf`.
    fn index(&self, at: u64) -> usize {
        // The remainder is below `capacity`, a usize, so the conversion cannot fail.
        usize::try_from(at % to_u64(self.capacity.max(1))).unwrap_or(0)
    }

    /// Appends `data`, overwriting the oldest bytes once full.
    pub fn append(&mut self, data: &[u8]) {
        if self.capacity == 0 {
            self.written = self.written.saturating_add(to_u64(data.len()));
            return;
        }
        if self.buf.len() != self.capacity {
            self.buf = vec![0; self.capacity];
        }
        // Only the newest `capacity` bytes of `data` can survive; skip the rest.
        let skip = data.len().saturating_sub(self.capacity);
        self.written = self.written.saturating_add(to_u64(skip));
        let mut rest = data.get(skip..).unwrap_or_default();
        while !rest.is_empty() {
            let at = self.index(self.written);
            let room = self.capacity - at;
            let n = room.min(rest.len());
            let (now, later) = rest.split_at(n);
            if let Some(dst) = self.buf.get_mut(at..at + n) {
                dst.copy_from_slice(now);
            }
            self.written = self.written.saturating_add(to_u64(n));
            rest = later;
        }
    }

    /// Up to `max` held bytes from absolute offset `offset`. An offset older than what is
    /// held starts at the oldest byte held (`dropped` set); one past the end reads nothing
    /// from the end.
    pub fn read(&self, offset: u64, max: usize) -> LogRead {
        let oldest = self.oldest();
        let dropped = offset < oldest;
        let start = offset.clamp(oldest, self.written);
        let available = self.written - start;
        let len = usize::try_from(available).unwrap_or(usize::MAX).min(max);
        let mut data = Vec::with_capacity(len);
        let mut at = start;
        while data.len() < len {
            let i = self.index(at);
            let n = (self.capacity - i).min(len - data.len());
            let Some(src) = self.buf.get(i..i + n) else {
                break;
            };
            data.extend_from_slice(src);
            at = at.saturating_add(to_u64(n));
        }
        LogRead {
            start,
            data,
            dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &LogRead) -> &str {
        std::str::from_utf8(&r.data).unwrap()
    }

    #[test]
    fn empty_ring_reads_nothing() {
        let ring = LogRing::new(8);
        let r = ring.read(0, 100);
        assert_eq!((r.start, r.data.len(), r.dropped), (0, 0, false));
        assert!(ring.buf.is_empty(), "allocated before the first write");
    }

    #[test]
    fn reads_before_the_ring_fills() {
        let mut ring = LogRing::new(8);
        ring.append(b"abc");
        ring.append(b"de");
        assert_eq!(text(&ring.read(0, 100)), "abcde");
        let r = ring.read(2, 2);
        assert_eq!((r.start, text(&r), r.dropped), (2, "cd", false));
        assert_eq!(ring.written(), 5);
    }

    #[test]
    fn wraparound_keeps_the_newest_bytes_in_order() {
        let mut ring = LogRing::new(8);
        ring.append(b"0123456");
        ring.append(b"789ab"); // wraps: holds "456789ab"
        assert_eq!(ring.written(), 12);
        assert_eq!(ring.oldest(), 4);
        let r = ring.read(4, 100);
        assert_eq!((r.start, text(&r), r.dropped), (4, "456789ab", false));
        // A read that itself crosses the physical end of the buffer.
        let r = ring.read(6, 4);
        assert_eq!((r.start, text(&r)), (6, "6789"));
        // Many small appends, many laps.
        let mut ring = LogRing::new(5);
        let all: Vec<u8> = (0..=255u8).cycle().take(1003).collect();
        for chunk in all.chunks(3) {
            ring.append(chunk);
        }
        let r = ring.read(0, 100);
        assert_eq!(r.start, 998);
        assert_eq!(r.data, &all[998..]);
    }

    #[test]
    fn offset_older_than_held_starts_at_the_oldest_and_says_dropped() {
        let mut ring = LogRing::new(4);
        ring.append(b"abcdefgh");
        let r = ring.read(1, 100);
        assert_eq!((r.start, text(&r), r.dropped), (4, "efgh", true));
        // Exactly the oldest held byte is not a drop.
        let r = ring.read(4, 100);
        assert!(!r.dropped);
    }

    #[test]
    fn offset_past_the_end_reads_nothing_from_the_end() {
        let mut ring = LogRing::new(4);
        ring.append(b"ab");
        let r = ring.read(1_000, 100);
        assert_eq!((r.start, r.data.len(), r.dropped), (2, 0, false));
        let r = ring.read(u64::MAX, usize::MAX);
        assert_eq!((r.start, r.data.len()), (2, 0));
    }

    #[test]
    fn max_caps_the_read() {
        let mut ring = LogRing::new(16);
        ring.append(b"0123456789");
        let r = ring.read(0, 3);
        assert_eq!((r.start, text(&r)), (0, "012"));
        let r = ring.read(8, 0);
        assert_eq!((r.start, r.data.len()), (8, 0));
    }

    #[test]
    fn an_append_larger_than_the_ring_keeps_its_tail() {
        let mut ring = LogRing::new(4);
        ring.append(b"xy");
        ring.append(b"0123456789");
        assert_eq!(ring.written(), 12);
        let r = ring.read(0, 100);
        assert_eq!((r.start, text(&r), r.dropped), (8, "6789", true));
    }

    #[test]
    fn zero_capacity_counts_but_holds_nothing() {
        let mut ring = LogRing::new(0);
        ring.append(b"abc");
        let r = ring.read(0, 10);
        assert_eq!((r.start, r.data.len(), r.dropped), (3, 0, true));
    }
}
