//! The virtio-blk device: Inactive until the transport activates it with its one queue,
//! then Active, processing requests on the event loop; reset returns it to Inactive.
//!
//! I/O is synchronous preadv/pwritev (one call per request) straight into guest memory on
//! the event-loop thread.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::disk::{Disk, RawFile};
use super::metrics::BlockMetrics;
use super::request::{self, RequestError, RequestType, ID_BYTES, VIRTIO_BLK_S_OK};
use super::{
    config_space, BlockError, QUEUE_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use crate::virtio::queue_handler::{drain_queue, Chain};
use crate::virtio::{
    count, feature, ActivateError, DeviceCommon, VirtioDevice, VirtioInterrupt, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Running state: what activation handed over.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// What a request needs besides guest memory.
struct Backend {
    disk: Box<dyn Disk>,
    read_only: bool,
    serial: [u8; ID_BYTES],
    /// Disk size in bytes, rounded down to whole sectors.
    capacity: u64,
    metrics: Arc<BlockMetrics>,
}

/// A virtio-blk device.
///
/// Wiring: put it in an `Arc<Mutex<Block>>`, give one clone (as
/// `Arc<Mutex<dyn VirtioDevice>>`) to [`crate::virtio::MmioTransport::new`] and register
/// another with the event manager (`Mutex<T: MutEventSubscriber>` is a subscriber).
pub struct Block {
    backend: Backend,
    common: DeviceCommon,
    active: Option<Active>,
    /// The image's path, if opened from one: a snapshot records it to reopen the image.
    path: Option<PathBuf>,
}

impl Block {
    /// Opens the raw disk image at `path` (read-only if `read_only`). `serial` is what
    /// VIRTIO_BLK_T_GET_ID answers, at most 20 bytes.
    pub fn new(path: &Path, read_only: bool, serial: Option<String>) -> Result<Block, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let disk = RawFile::new(file).map_err(|source| BlockError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        let mut block = Block::with_disk(Box::new(disk), read_only, serial)?;
        block.path = Some(path.to_path_buf());
        Ok(block)
    }

    /// A block device over any [`Disk`] (tests and fuzzing use a `MemDisk`).
    pub fn with_disk(
        disk: Box<dyn Disk>,
        read_only: bool,
        serial: Option<String>,
    ) -> Result<Block, BlockError> {
        let mut id = [0u8; ID_BYTES];
        if let Some(s) = serial {
            let dst = id
                .get_mut(..s.len())
                .ok_or(BlockError::SerialTooLong(s.len()))?;
            dst.copy_from_slice(s.as_bytes());
        }
        let sectors = disk.size() / SECTOR_SIZE;
        let mut avail_features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if read_only {
            avail_features |= feature(VIRTIO_BLK_F_RO);
        }
        Ok(Block {
            backend: Backend {
                disk,
                read_only,
                serial: id,
                capacity: sectors * SECTOR_SIZE,
                metrics: Arc::new(BlockMetrics::default()),
            },
            common: DeviceCommon::new(
                TYPE_BLOCK,
                avail_features,
                &[QUEUE_SIZE],
                config_space(sectors).to_vec(),
            )
            .map_err(BlockError::EventFd)?,
            active: None,
            path: None,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.backend.metrics.clone()
    }

    /// Capacity in 512-byte sectors, as the guest sees it.
    pub fn capacity_sectors(&self) -> u64 {
        self.backend.capacity / SECTOR_SIZE
    }

    /// Processes every available request and interrupts the guest if it asked for it.
    /// Does nothing while inactive.
    pub fn process_queue(&mut self) {
        let Some(Active {
            mem,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            return;
        };
        let backend = &mut self.backend;
        let m = backend.metrics.clone();
        let result = drain_queue(queue, mem, |chain| backend.handle_chain(mem, chain));
        let notify = match result {
            Ok(d) => {
                count(&m.dropped_chains, d.bad_heads);
                d.notify
            }
            Err(_) => {
                count(&m.queue_errors, 1);
                // Some chains may have been used before the failure: tell the guest.
                true
            }
        };
        if notify {
            count(&m.interrupts, 1);
            interrupt.signal_used_queue();
        }
    }
}

impl Backend {
    /// Parses and runs one chain, writes its status, and returns the used length.
    fn handle_chain(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let m = &self.metrics;
        let (status_addr, status, written) = match request::parse(mem, chain, self.capacity) {
            Ok(req) => {
                let c = match req.request_type {
                    RequestType::In => &m.read_requests,
                    RequestType::Out => &m.write_requests,
                    RequestType::Flush => &m.flush_requests,
                    RequestType::GetId => &m.get_id_requests,
                };
                count(c, 1);
                let r = req.execute(mem, self.disk.as_mut(), self.read_only, &self.serial);
                match r {
                    Ok(written) => {
                        match req.request_type {
                            RequestType::In => count(&m.bytes_read, req.data_len),
                            RequestType::Out => count(&m.bytes_written, req.data_len),
                            RequestType::Flush | RequestType::GetId => {}
                        }
                        (req.status, VIRTIO_BLK_S_OK, written)
                    }
                    Err(e) => {
                        let c = match e {
                            RequestError::ReadOnly => &m.read_only_refusals,
                            RequestError::Io(_) => &m.io_errors,
                            _ => &m.invalid_requests,
                        };
                        count(c, 1);
                        (req.status, e.status().unwrap_or(1), 0)
                    }
                }
            }
            Err(rejected) => {
                let (Some(addr), Some(status)) = (rejected.status, rejected.error.status()) else {
                    count(&m.dropped_chains, 1);
                    return 0;
                };
                let c = match rejected.error {
                    RequestError::Unsupported(_) => &m.unsupported_requests,
                    _ => &m.invalid_requests,
                };
                count(c, 1);
                (addr, status, 0)
            }
        };
        if mem.write_obj(status, status_addr).is_err() {
            // parse() checked the address; only a memory map change could get here.
            count(&m.dropped_chains, 1);
            return 0;
        }
        written.saturating_add(1)
    }
}

impl VirtioDevice for Block {
    crate::virtio::common_accessors!(common);
    // `write_config` keeps the default (ignore): no writable field, `writeback` needs
    // VIRTIO_BLK_F_CONFIG_WCE, not offered (virtio 1.2 §5.2.4).

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let [queue] = self.common.activate_queues(self.active.is_some(), queues)?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.common.reset();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

/// Snapshot state; a child module so it can read the queue positions.
#[path = "persist.rs"]
pub mod persist;

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
