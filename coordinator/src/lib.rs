//! The Lockstep coordinator: the barrier leader, backup jobs, the catalog and the `lockstep`
//! CLI.
//!
//! - `config`: the TOML topology with RAID groups, validated;
//! - `job`: the jobs actor and the two-phase barrier;
//! - `restore`: the two-phase restore of the whole cluster through its agents;
//! - `service`: the `Coordinator` gRPC service and `serve`;
//! - `cli`: the `lockstep` command line.
//!
//! Architecture invariant: this crate never links RocksDB; it reads the repository through
//! `lockstep-repository` and reaches shards only through agents.

pub mod cli;
pub mod config;
pub mod job;
pub mod restore;
pub mod service;
