//! The Lockstep backup repository.
//!
//! A repository lives on any `object_store` URL and holds content-addressed data objects
//! (`codec`), versioned JSON manifests (`manifest`) under one documented key layout
//! (`layout`). `transfer` moves files in and out chunk by chunk in bounded memory, and
//! `verify` checks what is stored. `wal` is the segment format and `archive` the one API over
//! every place segments live. `error` defines the seed error codes used everywhere.
//! `buffers` and `direct` keep chunk data page-aligned and write it around the page cache
//! on local disks. `remembered` is the bounded map of outcomes the agent's and the
//! coordinator's actors answer repeated requests from.
//!
//! Architecture invariant: this crate never links RocksDB; the coordinator depends on it.
//! Architecture invariant: publish order is objects, then shard manifests, then the backup
//! manifest; anything not reachable from a backup manifest is garbage.

pub mod archive;
pub mod bandwidth;
pub mod blocking;
pub mod buffers;
pub mod catalog;
pub mod codec;
pub mod direct;
pub mod error;
pub mod export;
pub mod gc;
pub mod ids;
pub mod layout;
pub mod lineage;
pub mod manifest;
pub mod remembered;
pub mod repository;
pub mod seal;
pub mod transfer;
pub mod verify;
pub mod wal;

pub use error::{Error, ErrorCode, Result, Severity};
pub use ids::{BackupId, HlcTime, ObjectId, RestoreId, Seq, ShardId, TagName, Timeline};
pub use lineage::{Lineage, LineageId};
pub use repository::Repository;
