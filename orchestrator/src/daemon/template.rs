//! Templates: for a manifest with `"template": true`, one VM is booted to guest-init's
//! agent, paused and snapshotted; every VM of the manifest then restores that snapshot
//! instead of booting. Its memory file is mapped copy-on-write by every clone, so unchanged
//! pages are shared through the page cache.
//!
//! A template lives in `<state>/templates/<manifest>.<key>` (`vmstate`, `memory`, for a
//! writable rootfs `rootfs.img`, and `meta.json` written last). The key is a SHA-256 over
//! the manifest's content hash and the contents of its kernel, initrd and image and of the
//! `vmm` binary, so a change to any of them (a new VMM version included) builds a new
//! template; older ones of the manifest are removed then. A build happens in `<dir>.tmp`
//! and is renamed into place, so a half-built template is never used.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::vm::{self, ErrorKind, OpError, Spawn, Start};
use super::Daemon;
use crate::manifest::Manifest;
use crate::netsetup;

/// A built template's files.
#[derive(Debug, Clone)]
pub struct Template {
    /// Its directory.
    pub dir: PathBuf,
    /// The vmstate file.
    pub vmstate: PathBuf,
    /// The memory file (shared, never written).
    pub memory: PathBuf,
    /// The disk as it was at the snapshot (a writable rootfs; else the manifest's image).
    pub disk: PathBuf,
}

/// Per-file SHA-256 cache keyed by (device, inode, size, mtime): a file is hashed again
/// only when it changed.
#[derive(Default)]
pub struct HashCache(Mutex<HashMap<PathBuf, (FileStamp, String)>>);

/// What identifies a file version without reading it: device, inode, size, mtime.
type FileStamp = (u64, u64, u64, i64, i64);

impl HashCache {
    /// The hex SHA-256 of the file at `path`.
    pub fn hash(&self, path: &Path) -> std::io::Result<String> {
        let md = std::fs::metadata(path)?;
        let stamp = (md.dev(), md.ino(), md.size(), md.mtime(), md.mtime_nsec());
        if let Some((s, h)) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(path) {
            if *s == stamp {
                return Ok(h.clone());
            }
        }
        let mut f = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let h = hex(&hasher.finalize());
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf(), (stamp, h.clone()));
        Ok(h)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The key of `m`'s template with the daemon's `vmm` (see the module docs).
pub fn key(d: &Daemon, m: &Manifest) -> Result<String, OpError> {
    let mut h = Sha256::new();
    h.update(m.content_hash().as_bytes());
    let mut files: Vec<(&str, &Path)> = vec![
        ("kernel", &m.kernel),
        ("rootfs", &m.rootfs.path),
        ("vmm", &d.config.vmm),
    ];
    if let Some(i) = &m.initrd {
        files.push(("initrd", i));
    }
    for (what, p) in files {
        let fh = d.file_hashes.hash(p).map_err(|e| {
            OpError::new(
                ErrorKind::BadRequest,
                format!("manifest {}: {what} {}: {e}", m.name, p.display()),
            )
        })?;
        h.update(what.as_bytes());
        h.update(fh.as_bytes());
    }
    Ok(hex(&h.finalize()))
}

/// Where templates are kept.
pub fn templates_dir(d: &Daemon) -> PathBuf {
    d.config.state_dir.join("templates")
}

fn files_of(dir: &Path, m: &Manifest) -> Template {
    Template {
        dir: dir.to_path_buf(),
        vmstate: dir.join("vmstate"),
        memory: dir.join("memory"),
        disk: if m.rootfs.read_only {
            m.rootfs.path.clone()
        } else {
            dir.join("rootfs.img")
        },
    }
}

/// `m`'s template, built now if there is none for its current key. Concurrent callers
/// for one manifest wait for a single build. Blocking.
pub fn ensure(d: &Daemon, m: &Manifest) -> Result<Template, OpError> {
    let key = key(d, m)?;
    let base = templates_dir(d);
    super::ensure_private_dir(&base).map_err(OpError::internal)?;
    let dir = base.join(format!("{}.{}", m.name, &key[..16]));
    let lock = d.template_lock(&m.name);
    let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
    if dir.join("meta.json").is_file() {
        return Ok(files_of(&dir, m));
    }
    let t = build(d, m, &key, &dir)?;
    // Older templates of this manifest: their clones hold their own links to the files.
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.split('.').next() == Some(m.name.as_str()) && e.path() != dir {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(t)
}

fn build(d: &Daemon, m: &Manifest, key: &str, dir: &Path) -> Result<Template, OpError> {
    let started = Instant::now();
    let id = format!("tpl-{}", &key[..12]);
    let tmp = PathBuf::from(format!("{}.tmp", dir.display()));
    let fail = |what: &str, e: String| {
        OpError::internal(format!("manifest {}: template {id}: {what}: {e}", m.name))
    };
    // Leftovers of a build cut short.
    vm::release_vmm(d, &id);
    let _ = netsetup::destroy_vm_net(&id);
    let _ = std::fs::remove_dir_all(&tmp);
    super::ensure_private_dir(&tmp).map_err(|e| fail("create", e.to_string()))?;
    eprintln!("orchestrator: manifest {}: building template {id}", m.name);

    // Index 0 of the subnet is never leased, so this uid is no VM's.
    let uid = d.config.uid_base;
    let result = (|| {
        if m.network.enabled {
            netsetup::create_template_netns(&id, uid)
        } else {
            netsetup::create_offline_netns(&id)
        }
        .map_err(|e| fail("network namespace", e.to_string()))?;
        let files = files_of(&tmp, m);
        if !m.rootfs.read_only {
            vm::copy_disk(&id, &m.rootfs.path, &files.disk)?;
        }
        let spawn = Spawn {
            id: &id,
            m,
            uid,
            disk: &files.disk,
            netns: &vm::netns_name(&id),
            start: Start::Boot {
                cmdline: vm::kernel_cmdline(m),
            },
        };
        let report = vm::spawn_vmm(&d.config, &spawn)?;
        let pid = u32::try_from(report.pid).map_err(OpError::internal)?;
        let client = vm::wait_for_agent(&report, m.agent_port, d.config.ready_timeout, pid, &id)?;
        drop(client);
        super::hibernate::snapshot_into(&report, uid, &tmp, None)
            .map_err(|e| fail("snapshot", e))?;
        // Every VMM uid reads the template (it holds no workload data: the manifest is
        // delivered after the restore); the files are root's so no VMM can change them.
        for f in [&files.vmstate, &files.memory] {
            set_owner_mode(f, 0o644).map_err(|e| fail("chown", e))?;
        }
        if !m.rootfs.read_only {
            set_owner_mode(&files.disk, 0o600).map_err(|e| fail("chown", e))?;
        }
        Ok::<_, OpError>(())
    })();
    vm::release_vmm(d, &id);
    let _ = netsetup::destroy_vm_net(&id);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let meta = json!({
        "manifest": m.name,
        "key": key,
        "built_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    });
    std::fs::write(tmp.join("meta.json"), meta.to_string())
        .map_err(|e| fail("write meta.json", e.to_string()))?;
    super::hibernate::fsync_path(&tmp.join("meta.json")).map_err(|e| fail("fsync", e))?;
    super::hibernate::fsync_path(&tmp).map_err(|e| fail("fsync", e))?;
    std::fs::rename(&tmp, dir).map_err(|e| fail("rename", e.to_string()))?;
    if let Some(parent) = dir.parent() {
        let _ = super::hibernate::fsync_path(parent);
    }
    eprintln!(
        "orchestrator: manifest {}: template {id} built in {:.2} s",
        m.name,
        started.elapsed().as_secs_f64()
    );
    Ok(files_of(dir, m))
}

fn set_owner_mode(p: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(p, Some(0), Some(0))
        .and_then(|()| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// Removes half-built templates (`*.tmp`) left by a daemon that died mid-build.
pub fn clean_partial(d: &Daemon) -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(entries) = std::fs::read_dir(templates_dir(d)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_dir_all(e.path());
                removed.push(e.path().display().to_string());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_hashed_again_only_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("tpl-hash-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("kernel");
        std::fs::write(&f, b"one").unwrap();
        let cache = HashCache::default();
        let a = cache.hash(&f).unwrap();
        // SHA-256("one")
        assert_eq!(
            a,
            "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
        );
        assert_eq!(cache.hash(&f).unwrap(), a, "cached");
        // Same size, new content and mtime: hashed again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"two").unwrap();
        let b = cache.hash(&f).unwrap();
        assert_ne!(a, b);
        // A replaced file (new inode) is seen too.
        let g = dir.join("new");
        std::fs::write(&g, b"one").unwrap();
        std::fs::rename(&g, &f).unwrap();
        assert_eq!(cache.hash(&f).unwrap(), a);
        assert!(cache.hash(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
