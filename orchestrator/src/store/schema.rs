//! The schema and its migrations. `MIGRATIONS[i]` moves a database from `PRAGMA
//! user_version` `i` to `i + 1`, in one transaction; a version above `SCHEMA_VERSION` means
//! a newer orchestrator wrote the file, and it is refused.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::{sql, StoreError};

/// Schema migrations, in order: entry `i` takes the database from `user_version` `i` to
/// `i + 1`. Append only; never edit a released entry.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema. Times are Unix milliseconds. `vms.ip` mirrors the VM's lease
    // for reading; `leases` is the authority (its primary key makes addresses unique).
    // Events keep no foreign key: they outlive the VM they describe.
    "CREATE TABLE manifests (
        name TEXT PRIMARY KEY NOT NULL,
        json TEXT NOT NULL CHECK (json_valid(json)),
        hash TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE vms (
        id TEXT PRIMARY KEY NOT NULL,
        manifest TEXT NOT NULL REFERENCES manifests(name) ON DELETE RESTRICT,
        state TEXT NOT NULL CHECK (state IN
            ('creating', 'running', 'stopped', 'crashed', 'destroying', 'hibernated')),
        ip TEXT,
        mac TEXT NOT NULL UNIQUE,
        pid INTEGER,
        pid_start_time INTEGER,
        jail_dir TEXT,
        netns TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_console TEXT
    ) STRICT;
    CREATE INDEX vms_manifest ON vms(manifest);
    CREATE TABLE leases (
        ip TEXT PRIMARY KEY NOT NULL,
        vm_id TEXT NOT NULL UNIQUE REFERENCES vms(id) ON DELETE CASCADE
    ) STRICT;
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        vmstate_path TEXT NOT NULL,
        mem_path TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX snapshots_vm ON snapshots(vm_id);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        time INTEGER NOT NULL,
        vm_id TEXT,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL CHECK (json_valid(detail))
    ) STRICT;",
    // 2: a VM's optional host port forward, JSON `{"host_port": N, "guest_port": N}`.
    "ALTER TABLE vms ADD COLUMN port_forward TEXT
        CHECK (port_forward IS NULL OR json_valid(port_forward));",
];

/// The schema version this code creates and understands.
pub const SCHEMA_VERSION: u32 = 2;
const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// `PRAGMA user_version` as a u32.
pub(super) fn user_version(conn: &Connection, path: &Path) -> Result<u32, StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql(path, "read schema version"))?;
    u32::try_from(version).map_err(|_| StoreError::Corrupt {
        path: path.to_path_buf(),
        row: "the database header".into(),
        field: "user_version",
        reason: format!("{version} is negative"),
    })
}

/// Applies the missing migrations, one transaction each. The version is re-read inside
/// each write transaction, so connections opening a fresh file at once do not both apply
/// the same step.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "begin migration"))?;
        let current = user_version(&tx, path)?;
        if current > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: current,
                known: SCHEMA_VERSION,
            });
        }
        let Some(step) = MIGRATIONS.get(current as usize) else {
            return Ok(());
        };
        let version = current + 1;
        let migrate_err = |source| StoreError::Migrate {
            path: path.to_path_buf(),
            version,
            source,
        };
        tx.execute_batch(step).map_err(migrate_err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(migrate_err)?;
        tx.commit().map_err(migrate_err)?;
    }
}
