//! Errors of the state database. Messages name the database file, the VM or the manifest;
//! the SQLite error is the `source`, printed by the caller.

use std::path::PathBuf;

use crate::manifest::ManifestErrors;
use crate::net_addr::{Mac, Subnet};

/// Errors from the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or set up (WAL, foreign keys).
    #[error("open state database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer orchestrator.
    #[error(
        "state database {path} has schema version {found}, newer than version {known} that \
         this orchestrator knows; run a newer orchestrator"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// `user_version` in the file.
        found: u32,
        /// `SCHEMA_VERSION`.
        known: u32,
    },
    /// A migration failed; the database stays at the previous version.
    #[error("state database {path}: migrate to schema version {version}")]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The version the migration leads to.
        version: u32,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A statement failed.
    #[error("state database {path}: {action}")]
    Sql {
        /// The database file.
        path: PathBuf,
        /// What was being done, naming the VM or manifest.
        action: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored value does not read back as its type (edited by hand, or a bug).
    #[error("state database {path}: {row} has an invalid {field}: {reason}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// Which row ("VM vm-1", "manifest web").
        row: String,
        /// Which column.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A VM id that could not name a jail directory or netns.
    #[error("invalid VM id {id:?}: use 1 to 64 of A-Z, a-z, 0-9, '-' and '_'")]
    InvalidVmId {
        /// The id given.
        id: String,
    },
    /// `add_manifest` with a name already stored.
    #[error("manifest {name} already exists")]
    ManifestExists {
        /// The manifest name.
        name: String,
    },
    /// No manifest has this name.
    #[error("no manifest named {name}")]
    ManifestNotFound {
        /// The manifest name.
        name: String,
    },
    /// `remove_manifest` while VMs still use it.
    #[error("manifest {name} is used by {count} VM(s) ({}); destroy them first", vm_ids.join(", "))]
    ManifestInUse {
        /// The manifest name.
        name: String,
        /// How many VMs use it.
        count: u64,
        /// Some of them (at most 10).
        vm_ids: Vec<String>,
    },
    /// A stored manifest no longer validates.
    #[error("state database {path}: stored manifest {name} is invalid")]
    StoredManifest {
        /// The database file.
        path: PathBuf,
        /// The manifest name.
        name: String,
        /// The validation problems.
        #[source]
        source: ManifestErrors,
    },
    /// `create_vm_with_lease` with an id already stored.
    #[error("VM {id} already exists")]
    VmExists {
        /// The VM id.
        id: String,
    },
    /// No VM has this id.
    #[error("no VM with id {id}")]
    VmNotFound {
        /// The VM id.
        id: String,
    },
    /// Every address in the pool is leased.
    #[error("no free address in {subnet} ({leased} leased)")]
    NoFreeAddress {
        /// The pool.
        subnet: Subnet,
        /// Leases inside it.
        leased: u32,
    },
    /// The MAC derived from a new VM's id equals a live VM's.
    #[error("VM {id}: its MAC {mac} is already used by VM {other}; choose another id")]
    MacCollision {
        /// The new VM id.
        id: String,
        /// The MAC.
        mac: Mac,
        /// The VM holding it.
        other: String,
    },
    /// A number too large for SQLite's signed 64-bit integers.
    #[error("VM {id}: {field} {value} does not fit a signed 64-bit integer")]
    OutOfRange {
        /// The VM id.
        id: String,
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
    },
}
