//! The checkers, run after every simulation on what it recorded and on the repository it
//! left:
//!
//! - **complete**: every committed backup has every shard of the topology, data and parity;
//! - **fenced**: every committed backup had an instant, between its request and its commit,
//!   when every shard's gate was closed (from the fence intervals watched in simulated time);
//! - **lease**: no gate stayed closed longer than the lease;
//! - **restore**: every committed backup restores to exactly the model at its cut: every
//!   acknowledged write at or below the shard's cut is there, none above it, and nothing else
//!   but writes that were never acknowledged;
//! - **causal**: a backup that holds a write holds every write acknowledged before it was sent;
//! - **converge**: once the faults stopped, a backup committed within the bound.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use lockstep_agent::engine::{MemEngine, ShardEngine};
use lockstep_repository::transfer::{Progress, TransferOptions, download_files};
use lockstep_repository::{Repository, ShardId};

use crate::world::Record;

/// One violated property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub property: &'static str,
    pub detail: String,
}

fn violation(property: &'static str, detail: String) -> Violation {
    Violation { property, detail }
}

/// Checks everything; `agents` is the topology's size, `lease_ms` its lease.
pub async fn check(
    record: &Record,
    repository: &str,
    agents: usize,
    lease_ms: u64,
    scratch: &Path,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    if let Some(err) = &record.host_error {
        violations.push(violation("hosts", format!("a host failed: {err}")));
    }
    for (agent, from, to) in &record.overlong_fences {
        violations.push(violation(
            "lease",
            format!("agent-{agent}'s gate was closed from {from} ms to at least {to} ms, past its lease of {lease_ms} ms"),
        ));
    }
    if !record.converged {
        violations.push(violation(
            "converge",
            "no backup committed within the bound after the faults stopped".into(),
        ));
    }
    let repo = match Repository::open(repository).await {
        Ok(repo) => repo,
        Err(err) => {
            violations.push(violation(
                "restore",
                format!("open the repository: {}", err.chain()),
            ));
            return violations;
        }
    };
    let backups = match repo.backups().await {
        Ok(backups) => backups,
        Err(err) => {
            violations.push(violation(
                "restore",
                format!("list backups: {}", err.chain()),
            ));
            return violations;
        }
    };
    // Per shard: key -> acknowledged sequence number; and the keys never acknowledged.
    let mut acked: Vec<BTreeMap<&str, u64>> = vec![BTreeMap::new(); agents];
    let mut unacked: BTreeSet<&str> = BTreeSet::new();
    for write in &record.writes {
        match write.seq {
            Some(seq) => {
                acked[write.shard].insert(write.key.as_str(), seq);
            }
            None => {
                unacked.insert(write.key.as_str());
            }
        }
    }
    for (id, manifest) in backups {
        let manifest = match manifest {
            Ok(manifest) => manifest,
            Err(err) => {
                violations.push(violation(
                    "restore",
                    format!("backup {id}: {}", err.chain()),
                ));
                continue;
            }
        };
        if manifest.cut.len() != agents {
            violations.push(violation(
                "complete",
                format!("backup {id} has {} of {agents} shards", manifest.cut.len()),
            ));
        }
        let cut: Vec<Option<u64>> = (0..agents)
            .map(|i| {
                ShardId::new(format!("shard-{i}"))
                    .ok()
                    .and_then(|s| manifest.cut.get(&s).map(|seq| seq.0))
            })
            .collect();

        // The fence: one instant in the backup's window when every gate was closed.
        let window = record
            .attempts
            .iter()
            .find(|a| a.backup_id.as_deref() == Some(id.as_str()))
            .map(|a| (a.requested_ms, a.outcome.as_ref().map_or(u64::MAX, |o| o.0)))
            .unwrap_or((0, u64::MAX));
        if !all_fenced_at_once(&record.fences, window) {
            violations.push(violation(
                "fenced",
                format!(
                    "backup {id}: no instant in {window:?} ms when every shard's gate was closed"
                ),
            ));
        }

        for (i, shard_cut) in cut.iter().enumerate() {
            let Some(shard_cut) = *shard_cut else {
                continue;
            };
            let keys = match restored_keys(&repo, &id, i, scratch).await {
                Ok(keys) => keys,
                Err(err) => {
                    violations.push(violation(
                        "restore",
                        format!("backup {id} shard-{i}: {err}"),
                    ));
                    continue;
                }
            };
            for (key, seq) in &acked[i] {
                let expected = *seq <= shard_cut;
                if keys.contains(*key) != expected {
                    violations.push(violation(
                        "restore",
                        format!(
                            "backup {id} shard-{i} (cut {shard_cut}): {key} at seq {seq} is {}",
                            if expected {
                                "missing"
                            } else {
                                "there but after the cut"
                            }
                        ),
                    ));
                }
            }
            for key in &keys {
                if !acked[i].contains_key(key.as_str()) && !unacked.contains(key.as_str()) {
                    violations.push(violation(
                        "restore",
                        format!("backup {id} shard-{i}: {key} was never written there"),
                    ));
                }
            }
        }

        // Causality: holding a write means holding the one acknowledged before it was sent.
        for write in &record.writes {
            let (Some(seq), Some(before)) = (write.seq, write.after) else {
                continue;
            };
            let earlier = &record.writes[before];
            let (Some(earlier_seq), Some(cut_here), Some(cut_there)) =
                (earlier.seq, cut[write.shard], cut[earlier.shard])
            else {
                continue;
            };
            if seq <= cut_here && earlier_seq > cut_there {
                violations.push(violation(
                    "causal",
                    format!(
                        "backup {id} holds {} (shard-{}) but not {}, acknowledged before it was sent",
                        write.key, write.shard, earlier.key
                    ),
                ));
            }
        }
    }
    violations
}

/// Whether some instant in `window` had every agent's gate closed.
fn all_fenced_at_once(fences: &[Vec<(u64, u64)>], (from, to): (u64, u64)) -> bool {
    let in_window = |&(a, b): &(u64, u64)| b > from && a <= to;
    fences
        .iter()
        .flatten()
        .filter(|f| in_window(f))
        .any(|&(start, _)| {
            fences
                .iter()
                .all(|agent| agent.iter().any(|&(a, b)| a <= start && start < b))
        })
}

async fn restored_keys(
    repo: &Repository,
    backup: &lockstep_repository::BackupId,
    shard: usize,
    scratch: &Path,
) -> Result<BTreeSet<String>, String> {
    let shard_id = ShardId::new(format!("shard-{shard}")).map_err(|e| e.chain())?;
    let manifest = repo
        .shard_manifest(&shard_id, backup)
        .await
        .map_err(|e| e.chain())?;
    let dir = scratch.join(format!("{backup}-{shard}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    download_files(
        repo,
        &manifest.files,
        &dir,
        TransferOptions::default(),
        &Progress::default(),
    )
    .await
    .map_err(|e| e.chain())?;
    let engine = MemEngine::open(&dir, &manifest.column_families).map_err(|e| e.chain())?;
    if engine.latest_seq() != manifest.seq {
        return Err(format!(
            "opened at seq {}, the manifest says {}",
            engine.latest_seq(),
            manifest.seq
        ));
    }
    let keys = engine
        .scan("default", b"", None, usize::MAX)
        .map_err(|e| e.chain())?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(keys)
}
