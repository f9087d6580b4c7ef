//! virtio-blk (virtio 1.2 §5.2): a raw disk image as a guest block device.
//!
//! This module holds the public type, feature bits and config space layout. The device
//! state machine is in `device`, request parsing in `request`, the event-loop glue in
//! `event_handler`, counters in `metrics`, backends in `disk`.

pub mod device;
pub mod disk;
pub mod event_handler;
pub mod metrics;
pub mod request;

use std::path::PathBuf;

pub use device::persist::{BlockRestoreError, BlockState};
pub use device::Block;
pub use disk::{Disk, MemDisk, RawFile};
pub use metrics::BlockMetrics;

/// The unit of `capacity` and of a request's `sector` (virtio 1.2 §5.2.4).
pub const SECTOR_SIZE: u64 = 512;
/// Maximum data segments per request (config `seg_max`).
pub const SEG_MAX: u32 = 128;
/// Maximum bytes per data segment (config `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Maximum data bytes per request: what a driver honouring `seg_max` and `size_max` can
/// send. Bounds the work one request can cause.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;

/// VIRTIO_BLK_F_SIZE_MAX: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// VIRTIO_BLK_F_SEG_MAX: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// VIRTIO_BLK_F_RO: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// VIRTIO_BLK_F_BLK_SIZE: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// VIRTIO_BLK_F_FLUSH: the device takes VIRTIO_BLK_T_FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Bytes of config space exposed: `struct virtio_blk_config` up to and including
/// `num_queues` (virtio 1.2 §5.2.4); fields beyond belong to features not offered.
pub const CONFIG_LEN: usize = 36;

/// Builds the config space (little endian, virtio 1.2 §5.2.4):
/// capacity u64 @0, size_max u32 @8, seg_max u32 @12, geometry @16, blk_size u32 @20,
/// topology @24, writeback u8 @32, num_queues u16 @34.
pub fn config_space(capacity_sectors: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let fields: [(usize, &[u8]); 5] = [
        (0, &capacity_sectors.to_le_bytes()),
        (8, &SIZE_MAX.to_le_bytes()),
        (12, &SEG_MAX.to_le_bytes()),
        (20, &512u32.to_le_bytes()),
        (34, &1u16.to_le_bytes()),
    ];
    for (at, bytes) in fields {
        if let Some(dst) = c.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    c
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image could not be opened.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The open failure.
        #[source]
        source: std::io::Error,
    },
    /// The disk image's size could not be read.
    #[error("cannot read the size of disk image {}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The stat failure.
        #[source]
        source: std::io::Error,
    },
    /// The serial is longer than the 20 bytes GET_ID can return.
    #[error("block serial is {0} bytes, at most 20 allowed")]
    SerialTooLong(usize),
    /// An EventFd could not be created.
    #[error("cannot create an EventFd")]
    EventFd(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let c = config_space(0x0102_0304_0506_0708);
        assert_eq!(&c[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&c[8..12], &(1u32 << 20).to_le_bytes());
        assert_eq!(&c[12..16], &128u32.to_le_bytes());
        assert_eq!(&c[16..20], &[0; 4], "no geometry");
        assert_eq!(&c[20..24], &512u32.to_le_bytes());
        assert_eq!(&c[34..36], &[1, 0]);
    }
}
