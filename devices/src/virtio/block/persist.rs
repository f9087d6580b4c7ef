//! virtio-blk snapshot state: what is needed to reopen the same disk (path, read-only,
//! serial, and the capacity the guest saw) and the ring positions of the running queue.
//!
//! Restore = [`Block::restore`] (reopen the image, check it still has the size the guest
//! knows) then [`crate::virtio::MmioTransport::restore`] with [`BlockState::queues`].
//! Requests are served synchronously, so a paused device holds no request in flight.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::{BlockError, Disk, SECTOR_SIZE};
use super::Block;
use crate::virtio::mmio::QueuePosition;
use crate::virtio::VirtioDevice;

/// A block device's snapshot state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The image path (`None` for devices over an in-memory disk).
    pub path: Option<PathBuf>,
    /// Opened read-only.
    pub read_only: bool,
    /// The GET_ID answer, as given at creation.
    pub serial: Option<String>,
    /// Capacity the guest saw, in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Ring positions, one per queue, if the device was running.
    pub queues: Option<Vec<QueuePosition>>,
}

/// Why a block device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockRestoreError {
    /// The state has no image path and none was given.
    #[error("no disk image path in the snapshot and none given")]
    NoPath,
    /// The image could not be opened.
    #[error(transparent)]
    Open(#[from] BlockError),
    /// The image's size changed since the snapshot: the guest's view would be wrong.
    #[error("disk image {} has {actual} sectors, the snapshot's guest saw {saved}", path.display())]
    Capacity {
        /// The image.
        path: PathBuf,
        /// Sectors in the snapshot.
        saved: u64,
        /// Sectors now.
        actual: u64,
    },
}

impl Block {
    /// The device's snapshot state. Take it with the event loop and vCPUs paused.
    pub fn save_state(&self) -> BlockState {
        let serial = &self.backend.serial;
        let len = serial.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let serial = (len > 0).then(|| String::from_utf8_lossy(&serial[..len]).into_owned());
        BlockState {
            path: self.path.clone(),
            read_only: self.backend.read_only,
            serial,
            capacity_sectors: self.capacity_sectors(),
            acked_features: self.acked_features(),
            queues: self
                .active
                .as_ref()
                .map(|a| vec![QueuePosition::of(&a.queue)]),
        }
    }

    /// Reopens the image (at `path` if given, else the saved path) as an inactive device
    /// with the saved settings. The transport restore activates it.
    pub fn restore(state: &BlockState, path: Option<&Path>) -> Result<Block, BlockRestoreError> {
        let path = path
            .or(state.path.as_deref())
            .ok_or(BlockRestoreError::NoPath)?;
        let block = Block::new(path, state.read_only, state.serial.clone())?;
        block.finish_restore(state, path)
    }

    /// Like [`Block::restore`] over any [`Disk`] (tests, fuzzing).
    pub fn restore_with_disk(
        state: &BlockState,
        disk: Box<dyn Disk>,
    ) -> Result<Block, BlockRestoreError> {
        let block = Block::with_disk(disk, state.read_only, state.serial.clone())?;
        block.finish_restore(state, Path::new("(in-memory disk)"))
    }

    fn finish_restore(
        mut self,
        state: &BlockState,
        path: &Path,
    ) -> Result<Block, BlockRestoreError> {
        let actual = self.backend.capacity / SECTOR_SIZE;
        if actual != state.capacity_sectors {
            return Err(BlockRestoreError::Capacity {
                path: path.to_path_buf(),
                saved: state.capacity_sectors,
                actual,
            });
        }
        self.set_acked_features(state.acked_features);
        Ok(self)
    }
}
