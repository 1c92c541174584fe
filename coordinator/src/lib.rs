//! The Lockstep coordinator: barrier leader, backup jobs, catalog and topology.
//!
//! Architecture invariant: this crate never links RocksDB; it reads the repository through
//! `lockstep-repository` only. The barrier arrives with issue 3.
