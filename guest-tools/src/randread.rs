//! `randread DEVICE BLOCK_SIZE SECONDS`: random, block-aligned O_DIRECT reads at queue
//! depth 1 (one thread, one read in flight), for a fixed time. Measures the latency-bound
//! IOPS of the virtio-blk path, not the device's parallelism.
//!
//! Offsets come from a fixed-seed xorshift64, so two runs (or two VMMs compared side by
//! side) read the same sequence of blocks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Context, ToolError};
use crate::pattern::XorShift64;
use crate::say;

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)` (linux/fs.h); libc does not export it.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// O_DIRECT wants the buffer aligned to the logical block size; 4096 covers every device.
const BUF_ALIGN: usize = 4096;
/// Seed of the offset sequence.
const OFFSET_SEED: u64 = 0x2545_f491_4f6c_dd1d;

/// Size in bytes of a block device (BLKGETSIZE64), or of a regular file (for tests).
fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKGETSIZE64,
            std::ptr::from_mut(&mut size),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// The byte offset of a random whole block among `blocks` blocks of `block_size`.
fn random_block_offset(rng: &mut XorShift64, blocks: u64, block_size: u64) -> u64 {
    (rng.next_u64() % blocks) * block_size
}

/// Issues reads through `read_at(buf, offset)` until `duration` has passed; returns the
/// number of reads and the time they took. A short read is an error: every offset is a
/// whole block inside the device.
fn read_loop(
    mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<usize>,
    buf: &mut [u8],
    blocks: u64,
    duration: Duration,
) -> io::Result<(u64, Duration)> {
    let block_size = buf.len() as u64;
    let mut rng = XorShift64::new(OFFSET_SEED);
    let mut ops = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        let off = random_block_offset(&mut rng, blocks, block_size);
        let n = loop {
            match read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if n != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read at offset {off}: {n} of {} bytes", buf.len()),
            ));
        }
        ops += 1;
    }
    Ok((ops, start.elapsed()))
}

/// The subcommand. Prints `RANDREAD_IOPS=<integer>` and `RANDREAD_OPS=<n>`.
pub fn randread(device: &Path, block_size: u64, seconds: f64) -> Result<(), ToolError> {
    let name = device.display();
    // The parser guarantees this; checked again because O_DIRECT needs it.
    if block_size == 0 || !block_size.is_multiple_of(512) {
        return Err(ToolError::new(
            format!("bad BLOCK_SIZE {block_size}"),
            "must be a non-zero multiple of 512",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .ctx(|| format!("open {name} with O_DIRECT"))?;
    let size = device_size(&file).ctx(|| format!("get the size of {name} (BLKGETSIZE64)"))?;
    let blocks = size / block_size;
    if blocks == 0 {
        return Err(ToolError::new(
            format!("{name} has {size} bytes"),
            format!("smaller than one block of {block_size} bytes"),
        ));
    }
    let bs = usize::try_from(block_size)
        .map_err(|_| ToolError::new(format!("bad BLOCK_SIZE {block_size}"), "too large"))?;
    // Over-allocate and read into the aligned window.
    let mut backing = vec![0u8; bs + BUF_ALIGN];
    let skip = backing.as_ptr().align_offset(BUF_ALIGN);
    let buf = &mut backing[skip..skip + bs];

    let duration = Duration::from_secs_f64(seconds);
    let (ops, took) = read_loop(|b, off| file.read_at(b, off), buf, blocks, duration)
        .ctx(|| format!("read {name}"))?;
    let secs = took.as_secs_f64();
    let iops = if secs > 0.0 { ops as f64 / secs } else { 0.0 };
    say(&format!("RANDREAD_IOPS={iops:.0}"));
    say(&format!("RANDREAD_OPS={ops}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_aligned_and_inside() {
        let mut rng = XorShift64::new(OFFSET_SEED);
        let mut seen_last = false;
        for _ in 0..10_000 {
            let off = random_block_offset(&mut rng, 10, 4096);
            assert_eq!(off % 4096, 0);
            assert!(off + 4096 <= 10 * 4096);
            seen_last |= off == 9 * 4096;
        }
        assert!(seen_last);
    }

    #[test]
    fn read_loop_runs_for_the_duration_and_counts() {
        let mut offsets = Vec::new();
        let mut buf = vec![0u8; 512];
        let (ops, took) = read_loop(
            |b, off| {
                offsets.push(off);
                Ok(b.len())
            },
            &mut buf,
            8,
            Duration::from_millis(20),
        )
        .unwrap();
        assert!(ops > 0 && ops == offsets.len() as u64);
        assert!(took >= Duration::from_millis(20));
        assert!(offsets
            .iter()
            .all(|o| o.is_multiple_of(512) && *o < 8 * 512));
    }

    #[test]
    fn read_loop_fails_on_short_read_and_errors() {
        let mut buf = vec![0u8; 512];
        let e = read_loop(|_, _| Ok(100), &mut buf, 1, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("short read"), "{e}");
        let e = read_loop(
            |_, _| Err(io::Error::from_raw_os_error(libc::EIO)),
            &mut buf,
            1,
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn refuses_a_device_smaller_than_a_block() {
        // A regular file stands in for the device; skip where the filesystem has no
        // O_DIRECT (tmpfs).
        let dir = std::env::temp_dir().join(format!("gtool-rr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("small");
        std::fs::write(&path, [0u8; 1024]).unwrap();
        let result = randread(&path, 4096, 0.01);
        std::fs::remove_dir_all(&dir).unwrap();
        match result {
            Err(e) if e.what.starts_with("open ") => eprintln!("skipping: {e}"),
            Err(e) => assert!(e.cause.contains("smaller than one block"), "{e}"),
            Ok(()) => panic!("a 1 KiB device must be refused for 4 KiB blocks"),
        }
    }
}
