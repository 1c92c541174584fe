//! The Lockstep coordinator: the barrier leader, backup jobs, the catalog and the `lockstep`
//! CLI.
//!
//! - `archive`: the `WalArchive` service, this repository as a WAL archive for other regions;
//! - `config`: the TOML topology with RAID groups, validated;
//! - `fence`: at most one coordinator acts on a repository (epochs);
//! - `ops`: `ClusterOps`, the actor that owns every operation holding the cluster;
//! - `fleet`: every call to each agent, with per-step deadlines, and the one poll loop;
//! - `backup`: the two-phase barrier and backup jobs;
//! - `restore`: the all-or-nothing restore of the whole cluster through its agents;
//! - `retention`: which backups and tags the repository keeps;
//! - `gc`: garbage-collection passes beside backups (mark, condemn, sweep);
//! - `tag`: named restore points (the barrier without a capture);
//! - `service`: the `Coordinator` gRPC service and `serve`;
//! - `cli`: the `lockstep` command line; `demo`: `lockstep demo`, the main job end to end.
//!
//! Architecture invariant: this crate never links RocksDB; it reads the repository through
//! `lockstep-repository` and reaches shards only through agents.

pub mod archive;
pub mod backup;
pub mod cert;
pub mod cli;
pub mod config;
pub mod demo;
pub mod export;
pub mod fence;
pub mod fleet;
pub mod gc;
pub mod key;
pub mod ops;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod service;
pub mod tag;
