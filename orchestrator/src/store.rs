//! The orchestrator's state in SQLite: manifests, VMs, IP leases, snapshots and an event
//! log. The database is the source of truth; every change that spans rows (lease + VM row,
//! VM row + lease release, each with its event) is one transaction, so a daemon killed at
//! any point leaves either all of it or none.
//!
//! Each `Store` owns one connection (not `Sync`); threads or processes that share the file
//! each open their own. WAL mode lets readers run beside the writer, and writers wait on
//! each other up to `BUSY_TIMEOUT`. Writes that read-then-write (leasing) begin with
//! `BEGIN IMMEDIATE`, taking the write lock first, so two creates can never both pick the
//! same address.
//!
//! The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[i]` moves version `i`
//! to `i + 1`. A database written by a newer orchestrator is refused, never "downgraded".
//! The schema and migrations are in `store/schema.rs`, errors in `store/error.rs`, typed
//! records and their row conversion in `store/rows.rs`.

mod error;
mod rows;
mod schema;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::{json, Value};

use crate::manifest::Manifest;
use crate::net_addr::{Mac, Subnet};

pub use error::StoreError;
pub use rows::{Event, LeaseUsage, ManifestRecord, PortForward, SnapshotRecord, VmRecord, VmState};
pub use schema::SCHEMA_VERSION;
use schema::{migrate, user_version};

/// How long a connection waits for another one's write lock before giving up with
/// "database is locked".
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most events `events_since` returns in one call.
pub const MAX_EVENTS_PER_QUERY: u32 = 10_000;
/// Events kept: older ones are pruned (at daemon start and hourly), so the log of a
/// long-lived edge node stays bounded. Sequence numbers are never reused.
pub const EVENTS_KEPT: i64 = 100_000;
/// `last_console` keeps at most this many bytes (the tail).
pub const MAX_CONSOLE_BYTES: usize = 64 * 1024;
/// `ManifestInUse` names at most this many of the VMs using the manifest.
const IN_USE_IDS_SHOWN: usize = 10;

/// Adapts a rusqlite error into `StoreError::Sql` naming the file and the action.
fn sql(path: &Path, action: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    let action = action.into();
    move |source| StoreError::Sql {
        path,
        action,
        source,
    }
}

/// Now, in Unix milliseconds (0 if the clock is before 1970).
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The rule the jailer applies to `--id`, so every stored VM id can name a jail.
pub fn valid_vm_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Reads a process's start time: field 22 of `/proc/PID/stat`, in clock ticks since boot.
/// With the pid it identifies a process across pid reuse, so a restarted daemon re-adopts
/// only the VMM it started.
pub fn process_start_time(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: no start time in {stat:?}"),
        )
    })
}

/// Field 22 of a `/proc/PID/stat` line. Field 2 (comm) is in parentheses and may hold
/// spaces and ')', so fields are counted from the last ')': the one after it is field 3.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// A connection to the state database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, turns on WAL and foreign keys,
    /// and migrates it to `SCHEMA_VERSION`. Refuses a database newer than this code.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // Check the version before changing anything in a file we may not understand.
        let found = user_version(&conn, path)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| {
                row.get::<_, String>(0)
            })
            .map_err(open_err)?;
        }
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        if found < SCHEMA_VERSION {
            migrate(&mut conn, path)?;
        }
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version stored in the file.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        user_version(&self.conn, &self.path)
    }

    /// Stores a validated manifest under its name, with its canonical JSON and hash.
    pub fn add_manifest(&mut self, manifest: &Manifest) -> Result<ManifestRecord, StoreError> {
        let path = &self.path;
        let name = &manifest.name;
        let action = || format!("add manifest {name}");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, action()))?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM manifests WHERE name = ?1",
                [name],
                |_| Ok(()),
            )
            .optional()
            .map_err(sql(path, action()))?;
        if exists.is_some() {
            return Err(StoreError::ManifestExists { name: name.clone() });
        }
        let record = ManifestRecord {
            name: name.clone(),
            hash: manifest.content_hash(),
            created_at_ms: now_ms(),
            manifest: manifest.clone(),
        };
        tx.execute(
            "INSERT INTO manifests (name, json, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                name,
                manifest.canonical_json(),
                record.hash,
                record.created_at_ms
            ],
        )
        .map_err(sql(path, action()))?;
        insert_event(
            &tx,
            path,
            None,
            "manifest_added",
            &json!({ "name": name, "hash": record.hash }),
        )?;
        tx.commit().map_err(sql(path, action()))?;
        Ok(record)
    }

    /// The manifest named `name`.
    pub fn get_manifest(&self, name: &str) -> Result<ManifestRecord, StoreError> {
        self.conn
            .query_row(
                "SELECT name, json, hash, created_at FROM manifests WHERE name = ?1",
                [name],
                rows::RawManifestRow::from_row,
            )
            .optional()
            .map_err(sql(&self.path, format!("read manifest {name}")))?
            .ok_or_else(|| StoreError::ManifestNotFound {
                name: name.to_string(),
            })?
            .into_record(&self.path)
    }

    /// Every manifest, by name.
    pub fn list_manifests(&self) -> Result<Vec<ManifestRecord>, StoreError> {
        let action = "list manifests";
        let mut stmt = self
            .conn
            .prepare("SELECT name, json, hash, created_at FROM manifests ORDER BY name")
            .map_err(sql(&self.path, action))?;
        let raw = stmt
            .query_map([], rows::RawManifestRow::from_row)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(sql(&self.path, action))?;
        raw.into_iter().map(|r| r.into_record(&self.path)).collect()
    }

    /// Removes a manifest. Refused while any VM, in any state, was created from it.
    pub fn remove_manifest(&mut self, name: &str) -> Result<(), StoreError> {
        let path = &self.path;
        let action = || format!("remove manifest {name}");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, action()))?;
        let count: i64 = tx
            .query_row(
                "SELECT count(*) FROM vms WHERE manifest = ?1",
                [name],
                |r| r.get(0),
            )
            .map_err(sql(path, action()))?;
        if count > 0 {
            let mut stmt = tx
                .prepare("SELECT id FROM vms WHERE manifest = ?1 ORDER BY id LIMIT ?2")
                .map_err(sql(path, action()))?;
            let vm_ids = stmt
                .query_map(params![name, IN_USE_IDS_SHOWN as i64], |r| r.get(0))
                .and_then(Iterator::collect::<Result<Vec<String>, _>>)
                .map_err(sql(path, action()))?;
            return Err(StoreError::ManifestInUse {
                name: name.to_string(),
                count: count.unsigned_abs(),
                vm_ids,
            });
        }
        let deleted = tx
            .execute("DELETE FROM manifests WHERE name = ?1", [name])
            .map_err(sql(path, action()))?;
        if deleted == 0 {
            return Err(StoreError::ManifestNotFound {
                name: name.to_string(),
            });
        }
        insert_event(
            &tx,
            path,
            None,
            "manifest_removed",
            &json!({ "name": name }),
        )?;
        tx.commit().map_err(sql(path, action()))
    }

    /// Creates VM `vm_id` from manifest `manifest` in state `creating`, leasing it the
    /// lowest free address of `subnet` (never the network, gateway or broadcast address)
    /// and recording a `created` event, all in one `BEGIN IMMEDIATE` transaction. Returns
    /// the address and the VM's MAC (`Mac::for_vm`).
    pub fn create_vm_with_lease(
        &mut self,
        vm_id: &str,
        manifest: &str,
        subnet: &Subnet,
    ) -> Result<(Ipv4Addr, Mac), StoreError> {
        if !valid_vm_id(vm_id) {
            return Err(StoreError::InvalidVmId {
                id: vm_id.to_string(),
            });
        }
        let path = &self.path;
        let action = || format!("create VM {vm_id}");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, action()))?;
        let manifest_exists = tx
            .query_row(
                "SELECT 1 FROM manifests WHERE name = ?1",
                [manifest],
                |_| Ok(()),
            )
            .optional()
            .map_err(sql(path, action()))?;
        if manifest_exists.is_none() {
            return Err(StoreError::ManifestNotFound {
                name: manifest.to_string(),
            });
        }
        let vm_exists = tx
            .query_row("SELECT 1 FROM vms WHERE id = ?1", [vm_id], |_| Ok(()))
            .optional()
            .map_err(sql(path, action()))?;
        if vm_exists.is_some() {
            return Err(StoreError::VmExists {
                id: vm_id.to_string(),
            });
        }
        let mac = Mac::for_vm(vm_id);
        let holder: Option<String> = tx
            .query_row(
                "SELECT id FROM vms WHERE mac = ?1",
                [mac.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(path, action()))?;
        if let Some(other) = holder {
            return Err(StoreError::MacCollision {
                id: vm_id.to_string(),
                mac,
                other,
            });
        }

        let leased = leased_in(&tx, path, subnet)?;
        let ip = subnet
            .leasable()
            .find(|ip| !leased.contains(ip))
            .ok_or_else(|| StoreError::NoFreeAddress {
                subnet: *subnet,
                leased: u32::try_from(leased.len()).unwrap_or(u32::MAX),
            })?;

        let now = now_ms();
        tx.execute(
            "INSERT INTO vms (id, manifest, state, ip, mac, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            params![
                vm_id,
                manifest,
                VmState::Creating.as_str(),
                ip.to_string(),
                mac.to_string(),
                now
            ],
        )
        .map_err(sql(path, action()))?;
        tx.execute(
            "INSERT INTO leases (ip, vm_id) VALUES (?1, ?2)",
            params![ip.to_string(), vm_id],
        )
        .map_err(sql(path, action()))?;
        insert_event(
            &tx,
            path,
            Some(vm_id),
            "created",
            &json!({ "manifest": manifest, "ip": ip.to_string(), "mac": mac.to_string() }),
        )?;
        tx.commit().map_err(sql(path, action()))?;
        Ok((ip, mac))
    }

    /// Moves a VM to `state`, recording a `state` event. Returns the state it was in.
    pub fn set_state(&mut self, vm_id: &str, state: VmState) -> Result<VmState, StoreError> {
        let path = &self.path;
        let action = || format!("set state of VM {vm_id}");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, action()))?;
        let before = state_in(&tx, path, vm_id, &action())?;
        tx.execute(
            "UPDATE vms SET state = ?2, updated_at = ?3 WHERE id = ?1",
            params![vm_id, state.as_str(), now_ms()],
        )
        .map_err(sql(path, action()))?;
        insert_event(
            &tx,
            path,
            Some(vm_id),
            "state",
            &json!({ "from": before.as_str(), "to": state.as_str() }),
        )?;
        tx.commit().map_err(sql(path, action()))?;
        Ok(before)
    }

    /// Records the VMM process of a VM: the jailer's pid and its start time
    /// (`process_start_time`), the jail directory and the network namespace.
    pub fn set_process(
        &mut self,
        vm_id: &str,
        pid: u32,
        start_time: u64,
        jail_dir: &Path,
        netns: &str,
    ) -> Result<(), StoreError> {
        let start_time = i64::try_from(start_time).map_err(|_| StoreError::OutOfRange {
            id: vm_id.to_string(),
            field: "pid_start_time",
            value: start_time,
        })?;
        self.update_vm(
            vm_id,
            "record process of",
            "UPDATE vms SET pid = ?2, pid_start_time = ?3, jail_dir = ?4, netns = ?5,
             updated_at = ?6 WHERE id = ?1",
            params![
                vm_id,
                pid,
                start_time,
                jail_dir.to_string_lossy(),
                netns,
                now_ms()
            ],
        )
    }

    /// Sets (or clears) a VM's host port forward.
    pub fn set_port_forward(
        &mut self,
        vm_id: &str,
        forward: Option<PortForward>,
    ) -> Result<(), StoreError> {
        let text = forward.map(|f| serde_json::to_string(&f).unwrap_or_default());
        self.update_vm(
            vm_id,
            "set port forward of",
            "UPDATE vms SET port_forward = ?2, updated_at = ?3 WHERE id = ?1",
            params![vm_id, text, now_ms()],
        )
    }

    /// Forgets a VM's process (it exited), keeping its jail directory and netns so they can
    /// still be cleaned up.
    pub fn clear_process(&mut self, vm_id: &str) -> Result<(), StoreError> {
        self.update_vm(
            vm_id,
            "clear process of",
            "UPDATE vms SET pid = NULL, pid_start_time = NULL, updated_at = ?2 WHERE id = ?1",
            params![vm_id, now_ms()],
        )
    }

    /// Stores the last console output of a VM (the tail, at most `MAX_CONSOLE_BYTES`).
    pub fn set_last_console(&mut self, vm_id: &str, console: &str) -> Result<(), StoreError> {
        let mut start = console.len().saturating_sub(MAX_CONSOLE_BYTES);
        while !console.is_char_boundary(start) {
            start += 1;
        }
        self.update_vm(
            vm_id,
            "store console of",
            "UPDATE vms SET last_console = ?2, updated_at = ?3 WHERE id = ?1",
            params![vm_id, &console[start..], now_ms()],
        )
    }

    fn update_vm(
        &mut self,
        vm_id: &str,
        verb: &str,
        statement: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<(), StoreError> {
        let changed = self
            .conn
            .execute(statement, params)
            .map_err(sql(&self.path, format!("{verb} VM {vm_id}")))?;
        if changed == 0 {
            return Err(StoreError::VmNotFound {
                id: vm_id.to_string(),
            });
        }
        Ok(())
    }

    /// Deletes a VM, its lease and its snapshot rows, recording a `destroyed` event, in one
    /// transaction. The caller has already removed the process, netns and files.
    pub fn destroy_vm(&mut self, vm_id: &str) -> Result<(), StoreError> {
        let path = &self.path;
        let action = || format!("destroy VM {vm_id}");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, action()))?;
        let ip: Option<String> = tx
            .query_row("SELECT ip FROM vms WHERE id = ?1", [vm_id], |r| r.get(0))
            .optional()
            .map_err(sql(path, action()))?
            .ok_or_else(|| StoreError::VmNotFound {
                id: vm_id.to_string(),
            })?;
        tx.execute("DELETE FROM leases WHERE vm_id = ?1", [vm_id])
            .map_err(sql(path, action()))?;
        tx.execute("DELETE FROM snapshots WHERE vm_id = ?1", [vm_id])
            .map_err(sql(path, action()))?;
        tx.execute("DELETE FROM vms WHERE id = ?1", [vm_id])
            .map_err(sql(path, action()))?;
        insert_event(&tx, path, Some(vm_id), "destroyed", &json!({ "ip": ip }))?;
        tx.commit().map_err(sql(path, action()))
    }

    /// The VM with this id.
    pub fn get_vm(&self, vm_id: &str) -> Result<VmRecord, StoreError> {
        let sql_text = format!("SELECT {} FROM vms WHERE id = ?1", rows::VM_COLUMNS);
        self.conn
            .query_row(&sql_text, [vm_id], rows::RawVmRow::from_row)
            .optional()
            .map_err(sql(&self.path, format!("read VM {vm_id}")))?
            .ok_or_else(|| StoreError::VmNotFound {
                id: vm_id.to_string(),
            })?
            .into_record(&self.path)
    }

    /// Every VM, oldest first.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let action = "list VMs";
        let sql_text = format!(
            "SELECT {} FROM vms ORDER BY created_at, id",
            rows::VM_COLUMNS
        );
        let mut stmt = self
            .conn
            .prepare(&sql_text)
            .map_err(sql(&self.path, action))?;
        let raw = stmt
            .query_map([], rows::RawVmRow::from_row)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(sql(&self.path, action))?;
        raw.into_iter().map(|r| r.into_record(&self.path)).collect()
    }

    /// Every lease as (address, VM id), lowest address first.
    pub fn list_leases(&self) -> Result<Vec<(Ipv4Addr, String)>, StoreError> {
        let action = "list leases";
        let mut stmt = self
            .conn
            .prepare("SELECT ip, vm_id FROM leases")
            .map_err(sql(&self.path, action))?;
        let raw = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(sql(&self.path, action))?;
        let mut leases = raw
            .into_iter()
            .map(|(ip, vm)| Ok((rows::parse_ip(&self.path, &ip)?, vm)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        leases.sort();
        Ok(leases)
    }

    /// How much of `subnet` is leased.
    pub fn lease_usage(&self, subnet: &Subnet) -> Result<LeaseUsage, StoreError> {
        let used = leased_in(&self.conn, &self.path, subnet)?.len();
        Ok(LeaseUsage {
            used: u32::try_from(used).unwrap_or(u32::MAX),
            total: subnet.lease_capacity(),
        })
    }

    /// Appends an event; returns its sequence number.
    pub fn record_event(
        &mut self,
        vm_id: Option<&str>,
        kind: &str,
        detail: &Value,
    ) -> Result<i64, StoreError> {
        insert_event(&self.conn, &self.path, vm_id, kind, detail)
    }

    /// Events with a sequence number above `after`, oldest first, at most `limit` (capped
    /// at `MAX_EVENTS_PER_QUERY`). Pass 0 to start from the beginning.
    pub fn events_since(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let action = "read events";
        let mut stmt = self
            .conn
            .prepare(
                "SELECT seq, time, vm_id, kind, detail FROM events
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(sql(&self.path, action))?;
        let raw = stmt
            .query_map(
                params![after, limit.min(MAX_EVENTS_PER_QUERY)],
                rows::RawEventRow::from_row,
            )
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(sql(&self.path, action))?;
        raw.into_iter().map(|r| r.into_event(&self.path)).collect()
    }

    /// Deletes all but the newest `keep` events; returns how many went.
    pub fn prune_events(&mut self, keep: i64) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?1",
                [keep.max(0)],
            )
            .map_err(sql(&self.path, "prune events"))
    }

    /// Records a snapshot's files for a VM; returns the snapshot id.
    pub fn add_snapshot(
        &mut self,
        vm_id: &str,
        kind: &str,
        vmstate_path: &Path,
        mem_path: &Path,
    ) -> Result<i64, StoreError> {
        let action = format!("add snapshot of VM {vm_id}");
        let result = self.conn.execute(
            "INSERT INTO snapshots (vm_id, kind, vmstate_path, mem_path, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                vm_id,
                kind,
                vmstate_path.to_string_lossy(),
                mem_path.to_string_lossy(),
                now_ms()
            ],
        );
        match result {
            Ok(_) => Ok(self.conn.last_insert_rowid()),
            Err(err)
                if err.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) =>
            {
                Err(StoreError::VmNotFound {
                    id: vm_id.to_string(),
                })
            }
            Err(err) => Err(sql(&self.path, action)(err)),
        }
    }

    /// Records a finished hibernation in one transaction: the snapshot row (`kind`
    /// `hibernate`; earlier hibernate rows of the VM are replaced), the process forgotten and
    /// the state `hibernated`, with a `state` event. Returns the snapshot id. Until this
    /// commits the VM is `running` as far as anyone reading the database knows.
    pub fn commit_hibernation(
        &mut self,
        vm_id: &str,
        vmstate_path: &Path,
        mem_path: &Path,
    ) -> Result<i64, StoreError> {
        let path = &self.path;
        let action = || format!("record hibernation of VM {vm_id}");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, action()))?;
        let before = state_in(&tx, path, vm_id, &action())?;
        tx.execute(
            "DELETE FROM snapshots WHERE vm_id = ?1 AND kind = 'hibernate'",
            [vm_id],
        )
        .map_err(sql(path, action()))?;
        tx.execute(
            "INSERT INTO snapshots (vm_id, kind, vmstate_path, mem_path, created_at)
             VALUES (?1, 'hibernate', ?2, ?3, ?4)",
            params![
                vm_id,
                vmstate_path.to_string_lossy(),
                mem_path.to_string_lossy(),
                now_ms()
            ],
        )
        .map_err(sql(path, action()))?;
        let snap = tx.last_insert_rowid();
        tx.execute(
            "UPDATE vms SET state = 'hibernated', pid = NULL, pid_start_time = NULL,
             updated_at = ?2 WHERE id = ?1",
            params![vm_id, now_ms()],
        )
        .map_err(sql(path, action()))?;
        insert_event(
            &tx,
            path,
            Some(vm_id),
            "state",
            &json!({ "from": before.as_str(), "to": VmState::Hibernated.as_str() }),
        )?;
        tx.commit().map_err(sql(path, action()))?;
        Ok(snap)
    }

    /// The VM's latest snapshot of `kind`, if any.
    pub fn latest_snapshot(
        &self,
        vm_id: &str,
        kind: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        Ok(self
            .list_snapshots(vm_id)?
            .into_iter()
            .rfind(|s| s.kind == kind))
    }

    /// A VM's snapshots, oldest first.
    pub fn list_snapshots(&self, vm_id: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        let action = format!("list snapshots of VM {vm_id}");
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, vm_id, kind, vmstate_path, mem_path, created_at FROM snapshots
                 WHERE vm_id = ?1 ORDER BY id",
            )
            .map_err(sql(&self.path, action.clone()))?;
        stmt.query_map([vm_id], rows::snapshot_from_row)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(sql(&self.path, action))
    }
}

/// The state of VM `vm_id` as `conn` (a transaction) sees it.
fn state_in(
    conn: &Connection,
    path: &Path,
    vm_id: &str,
    action: &str,
) -> Result<VmState, StoreError> {
    let text: String = conn
        .query_row("SELECT state FROM vms WHERE id = ?1", [vm_id], |r| r.get(0))
        .optional()
        .map_err(sql(path, action))?
        .ok_or_else(|| StoreError::VmNotFound {
            id: vm_id.to_string(),
        })?;
    text.parse().map_err(|reason| StoreError::Corrupt {
        path: path.to_path_buf(),
        row: format!("VM {vm_id}"),
        field: "state",
        reason,
    })
}

/// The leased addresses inside `subnet`. Leases outside it (left from a previous subnet
/// setting) are not counted: they cannot collide with new ones.
fn leased_in(
    conn: &Connection,
    path: &Path,
    subnet: &Subnet,
) -> Result<HashSet<Ipv4Addr>, StoreError> {
    let action = "read leases";
    let mut stmt = conn
        .prepare("SELECT ip FROM leases")
        .map_err(sql(path, action))?;
    let texts = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(sql(path, action))?;
    let mut leased = HashSet::with_capacity(texts.len());
    for text in texts {
        let ip = rows::parse_ip(path, &text)?;
        if subnet.cidr().contains(ip) {
            leased.insert(ip);
        }
    }
    Ok(leased)
}

fn insert_event(
    conn: &Connection,
    path: &Path,
    vm_id: Option<&str>,
    kind: &str,
    detail: &Value,
) -> Result<i64, StoreError> {
    conn.execute(
        "INSERT INTO events (time, vm_id, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![now_ms(), vm_id, kind, detail.to_string()],
    )
    .map_err(sql(path, format!("record {kind} event")))?;
    Ok(conn.last_insert_rowid())
}

#[cfg(test)]
mod tests;
