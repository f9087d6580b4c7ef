//! Hibernation and wake-on-demand: a VM's VMM is snapshotted and stopped (its lease,
//! netns and disk kept), and restored when something needs it.

use std::sync::Arc;

use super::vm::{ErrorKind, OpError};
use super::Daemon;
use crate::store::VmRecord;

/// Held while an operation (exec, logs, a forwarded connection) uses a VM: the VM is not
/// hibernated under it.
pub struct Busy {
    d: Arc<Daemon>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.d.activity_end(&self.id);
    }
}

/// Makes sure VM `id` runs (waking it if it is hibernated) and marks it busy until the
/// returned guard is dropped. Concurrent callers share one wake.
pub async fn ensure_awake(d: &Arc<Daemon>, id: &str) -> Result<Busy, OpError> {
    let lock = d.vm_lock(id);
    let _g = lock.lock().await;
    let _ = ErrorKind::Internal;
    d.activity_begin(id);
    Ok(Busy {
        d: Arc::clone(d),
        id: id.to_string(),
    })
}

/// Hibernates VM `id`: pause, snapshot to its state directory, stop the VMM.
/// Blocking; the caller holds the VM's lock.
pub fn hibernate(_d: &Daemon, id: &str) -> Result<VmRecord, OpError> {
    Err(OpError::new(
        ErrorKind::Internal,
        format!("VM {id}: hibernation is not built yet"),
    ))
}

/// Wakes a hibernated VM `id`. Blocking; the caller holds the VM's lock.
pub fn wake(_d: &Daemon, id: &str) -> Result<VmRecord, OpError> {
    Err(OpError::new(
        ErrorKind::Internal,
        format!("VM {id}: waking is not built yet"),
    ))
}
