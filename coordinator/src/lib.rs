//! The Lockstep coordinator: the barrier leader, backup jobs, the catalog and the `lockstep`
//! CLI.
//!
//! - `archive`: the `WalArchive` service, this repository as a WAL archive for other regions;
//! - `config`: the TOML topology with RAID groups, validated;
//! - `job`: the jobs actor and the two-phase barrier;
//! - `restore`: the two-phase restore of the whole cluster through its agents;
//! - `tag`: named restore points (the barrier without a capture), taken on demand or every N s;
//! - `service`: the `Coordinator` gRPC service and `serve`;
//! - `cli`: the `lockstep` command line.
//!
//! Architecture invariant: this crate never links RocksDB; it reads the repository through
//! `lockstep-repository` and reaches shards only through agents.

pub mod archive;
pub mod cli;
pub mod config;
pub mod job;
pub mod restore;
pub mod service;
pub mod tag;
