//! The Lockstep agent: owns one shard.
//!
//! - `engine`: the `ShardEngine` trait, `RocksEngine` (cargo feature `rocksdb`, on by
//!   default) and the `MemEngine` model;
//! - `gate`: the write gate every client write passes through;
//! - `hlc`: the hybrid logical clock stamped into every write's WAL record;
//! - `backup`: capture under the closed gate, upload with it open;
//! - `restore`: verified, atomic restore of a shard into a new directory;
//! - `participant`: the participant actor: the two-phase barrier, and in
//!   `participant/restore.rs` the cluster restore;
//! - `shipper`: WAL shipping to every destination, with durable cursors and status;
//! - `slot`: the live engine, and its in-place replacement by a restore;
//! - `server`: the gRPC `Shard` and `Agent` services;
//! - `startup`: what a serving agent does before it serves (the binary and the simulations);
//! - `cli`: the `lockstep-agent` command line;
//! - `lineage`: the shard's history identity (`LOCKSTEP-LINEAGE`), new at every restore and fork;
//! - `splitmix`: the seeded stream behind generated demo, test and benchmark data.
//!
//! An application that embeds RocksDB can use this crate as a library: it must route its
//! writes through a `WriteGate` for backups to be consistent.

pub mod backup;
pub mod cli;
pub mod config;
pub mod engine;
pub mod gate;
pub mod hlc;
pub mod lineage;
pub mod participant;
pub mod restore;
pub mod server;
pub mod shipper;
pub mod slot;
pub mod splitmix;
pub mod startup;

#[cfg(feature = "rocksdb")]
pub use engine::RocksEngine;
pub use engine::{MemEngine, ShardEngine, WriteBatch};
pub use gate::WriteGate;
