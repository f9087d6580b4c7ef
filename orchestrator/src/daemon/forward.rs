//! Host TCP port forwards: a VM created with `port_forward` gets a listener on the host;
//! each connection wakes the VM if it is hibernated, then is joined to the guest's port
//! through the VM's leased address (its namespace translates that to the guest). The VM
//! counts as busy (never idle-hibernated) while a forwarded connection is open.

use std::sync::Arc;
use std::time::Duration;

use super::hibernate;
use super::vm::{ErrorKind, OpError};
use super::Daemon;
use crate::store::PortForward;

/// Binds the host side of a forward (all addresses), before the VM is created, so a port
/// already in use fails the create with nothing made.
pub fn bind(id: &str, pf: PortForward) -> Result<std::net::TcpListener, OpError> {
    if pf.host_port == 0 || pf.guest_port == 0 {
        return Err(OpError::new(
            ErrorKind::BadRequest,
            format!("VM {id}: port_forward ports must be 1-65535"),
        ));
    }
    let l = std::net::TcpListener::bind(("0.0.0.0", pf.host_port)).map_err(|e| {
        OpError::new(
            ErrorKind::Conflict,
            format!("VM {id}: port_forward: host port {}: {e}", pf.host_port),
        )
    })?;
    l.set_nonblocking(true).map_err(OpError::internal)?;
    Ok(l)
}

/// Serves VM `id`'s forward on `listener` until the VM is destroyed (`stop`).
pub fn spawn(d: &Arc<Daemon>, id: &str, pf: PortForward, listener: std::net::TcpListener) {
    let d2 = Arc::clone(d);
    let id2 = id.to_string();
    let task = tokio::spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            eprintln!("orchestrator: VM {id2}: port forward: cannot register the listener");
            return;
        };
        loop {
            let Ok((conn, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let d3 = Arc::clone(&d2);
            let id3 = id2.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(&d3, &id3, pf, conn).await {
                    eprintln!("orchestrator: VM {id3}: forwarded connection from {peer}: {e}");
                }
            });
        }
    });
    d.forwards
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.to_string(), task.abort_handle());
}

/// One forwarded connection: wake, connect to the guest, pass bytes both ways.
async fn serve(
    d: &Arc<Daemon>,
    id: &str,
    pf: PortForward,
    mut conn: tokio::net::TcpStream,
) -> Result<(), OpError> {
    let _busy = hibernate::ensure_awake(d, id).await?;
    let vm = {
        let d2 = Arc::clone(d);
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || d2.with_store(|s| s.get_vm(&id2)))
            .await
            .map_err(OpError::internal)??
    };
    let ip = vm
        .ip
        .ok_or_else(|| OpError::internal(format!("VM {id}: no lease")))?;
    // The guest's service was listening when it was snapshotted; give a just-woken guest a
    // moment in case its network is still coming back.
    let mut last = None;
    for _ in 0..50 {
        match tokio::net::TcpStream::connect((ip, pf.guest_port)).await {
            Ok(mut guest) => {
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(OpError::internal(format!(
        "VM {id}: connect to {ip}:{}: {}",
        pf.guest_port,
        last.map_or_else(String::new, |e| e.to_string())
    )))
}

/// Stops VM `id`'s forward (destroy).
pub fn stop(d: &Daemon, id: &str) {
    if let Some(h) = d
        .forwards
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id)
    {
        h.abort();
    }
}

/// At daemon start: listens again for every running or hibernated VM with a forward.
pub fn restore_all(d: &Arc<Daemon>) {
    let Ok(vms) = d.with_store(|s| s.list_vms()) else {
        return;
    };
    for v in vms {
        let Some(pf) = v.port_forward else { continue };
        if !matches!(
            v.state,
            crate::store::VmState::Running | crate::store::VmState::Hibernated
        ) {
            continue;
        }
        match bind(&v.id, pf) {
            Ok(l) => spawn(d, &v.id, pf, l),
            Err(e) => eprintln!("orchestrator: {e}"),
        }
    }
}
