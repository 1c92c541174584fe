//! The checkers, run after every simulation on what it recorded and on the repository it
//! left:
//!
//! - **complete**: every committed backup has every shard of the topology, data and parity;
//! - **fenced**: every committed backup had an instant, between its request and its commit,
//!   when every shard's gate was closed (from the fence intervals watched in simulated time);
//! - **lease**: no gate stayed closed longer than the lease;
//! - **restore**: every committed backup (a full one, or an incremental or differential
//!   through its chain) restores to exactly the model at its cut: every
//!   acknowledged write at or below the shard's cut is there, none above it, and nothing else
//!   but writes that were never acknowledged. Retention and GC passes run beside the backups
//!   in every scenario, so this is also the proof that GC never deleted an object a retained
//!   or running backup needs;
//! - **causal**: a backup or tag that holds a write holds every write acknowledged before it
//!   was sent;
//! - **tags**: every tag, restored by replaying the archive's WAL along each point's lineage,
//!   is exactly the model at its cut;
//! - **wal**: every shard's WAL in the region's archive, followed along the lineage the shard
//!   is on and its ancestors, is contiguous from sequence 1 with no overlap, reaches its last
//!   acknowledged write, and replays to exactly the model. The same holds of the repository's
//!   own `wal/`, which retention prunes, from the oldest committed backup whose WAL is left:
//!   no kept backup on the shard's history may have lost the WAL after its cut;
//! - **converge**: once the faults stopped, a backup committed within the bound and every
//!   shard's WAL reached the archive; every in-place restore settled (its decision stored,
//!   or its record gone) within its bound.
//!
//! The model of a shard is one history per rollback or committed in-place restore of it
//! (`Record::rollbacks`): a backup, a tag or the archive must hold exactly the writes of the
//! history its cut was taken on, and never one of a history the rollback or restore
//! abandoned. After a restore every shard is on the history of the backup's cut: the
//! backups, tags and archive checked above cover what the restored shards hold and ship.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use lockstep_agent::engine::{MemEngine, ShardEngine};
use lockstep_agent::restore::{Replay, replay_staged, restore_shard, stage_shard};
use lockstep_repository::BackupId;
use lockstep_repository::lineage::ancestry;
use lockstep_repository::manifest::{BackupKind, BackupManifest};
use lockstep_repository::transfer::{Progress, TransferOptions};
use lockstep_repository::wal::{WalBatch, check_segments};
use lockstep_repository::{Lineage, Repository, Seq, ShardId};

use crate::world::{Record, Stores, Write};

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
    stores: &Stores,
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
    for (i, restore) in record.restores.iter().enumerate() {
        if restore.outcome == "unresolved" {
            violations.push(violation(
                "converge",
                format!(
                    "restore #{i} of {} (asked at {} ms) neither stored a decision nor went away by {} ms",
                    restore.backup_id, restore.requested_ms, restore.answered_ms
                ),
            ));
        }
    }
    if record.converged && !record.shipped {
        violations.push(violation(
            "converge",
            "the WAL did not reach the archive after the faults stopped".into(),
        ));
    }
    let repo = match Repository::open(&stores.repository).await {
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
    let histories = histories(record, agents);
    let unacked: BTreeSet<&str> = record
        .writes
        .iter()
        .filter(|w| w.seq.is_none())
        .map(|w| w.key.as_str())
        .collect();
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
        let cut = per_shard(agents, |s| manifest.cut.get(s).map(|seq| seq.0));

        // The fence: one instant in the backup's window when every gate was closed.
        let window = record
            .attempts
            .iter()
            .find(|a| a.backup_id.as_deref() == Some(id.as_str()))
            .map(|a| (a.requested_ms, a.outcome.as_ref().map_or(u64::MAX, |o| o.0)))
            .unwrap_or((0, u64::MAX));
        let instant = fence_instant(&record.fences, window);
        if instant.is_none() {
            violations.push(violation(
                "fenced",
                format!(
                    "backup {id}: no instant in {window:?} ms when every shard's gate was closed"
                ),
            ));
        }
        let epochs = epochs_at(record, agents, instant.unwrap_or(window.0));

        for (i, shard_cut) in cut.iter().enumerate() {
            let Some(shard_cut) = *shard_cut else {
                continue;
            };
            let keys = match restored_keys(&repo, &manifest, i, scratch).await {
                Ok(keys) => keys,
                Err(err) => {
                    violations.push(violation(
                        "restore",
                        format!("backup {id} shard-{i}: {err}"),
                    ));
                    continue;
                }
            };
            violations.extend(compare(
                &format!("backup {id} shard-{i} (cut {shard_cut})"),
                "restore",
                &keys,
                &histories[i][epochs[i]],
                &unacked,
                shard_cut,
            ));
        }

        violations.extend(causal(
            &format!("backup {id}"),
            record,
            &cut,
            &epochs,
            &histories,
        ));
    }

    // The region's archive: contiguous, complete, and replaying to the model; tags by replay.
    let archive = match Repository::open(&stores.archive).await {
        Ok(archive) => archive,
        Err(err) => {
            violations.push(violation(
                "wal",
                format!("open the archive: {}", err.chain()),
            ));
            return violations;
        }
    };
    // The region's archive is never pruned; the repository's own `wal/` is, by retention.
    for (name, wal, pruned) in [("region", &archive, false), ("repository", &repo, true)] {
        for (i, shard_histories) in histories.iter().enumerate() {
            // The history the shard is on now, and the model of it.
            let acked_here = shard_histories.last().expect("a shard has a history");
            let current = lockstep_agent::lineage::read_lineage(&stores.shards[i])
                .map_err(|e| e.chain())
                .and_then(|l| l.ok_or_else(|| "the shard has no lineage file".to_string()));
            let history = match current {
                Ok(current) => archived_history(wal, &repo, i, &current, Seq::MAX, pruned).await,
                Err(err) => Err(err),
            };
            let history = match history {
                Ok(history) => history,
                Err(err) => {
                    violations.push(violation("wal", format!("{name}: shard-{i}: {err}")));
                    Archived::default()
                }
            };
            let last_acked = acked_here.values().copied().max().unwrap_or(0);
            let archived = history.end();
            if record.shipped && archived < last_acked {
                violations.push(violation(
                    "wal",
                    format!("{name}: shard-{i}: the archive ends at {archived}, the last acknowledged write is {last_acked}"),
                ));
            }
            let dir = scratch.join(format!("wal-{name}-{i}"));
            match replayed_keys(&repo, i, &history, archived, &dir).await {
                Ok(keys) => violations.extend(compare(
                    &format!("{name}: the archive of shard-{i} replayed to {archived}"),
                    "wal",
                    &keys,
                    acked_here,
                    &unacked,
                    archived,
                )),
                Err(err) => violations.push(violation("wal", format!("{name}: shard-{i}: {err}"))),
            }
        }
    }
    let tags = match repo.tags().await {
        Ok(tags) => tags,
        Err(err) => {
            violations.push(violation("tags", format!("list tags: {}", err.chain())));
            Vec::new()
        }
    };
    for (name, tag) in tags {
        let tag = match tag {
            Ok(tag) => tag,
            Err(err) => {
                violations.push(violation("tags", format!("tag {name}: {}", err.chain())));
                continue;
            }
        };
        if tag.points.len() != agents {
            violations.push(violation(
                "tags",
                format!("tag {name} has {} of {agents} shards", tag.points.len()),
            ));
        }
        let cut = per_shard(agents, |s| tag.points.get(s).map(|p| p.seq.0));
        let window = record
            .tags
            .iter()
            .find(|t| t.name == name.as_str())
            .map_or((0, u64::MAX), |t| (t.requested_ms, t.answered_ms));
        let instant = fence_instant(&record.fences, window).unwrap_or(window.0);
        let epochs = epochs_at(record, agents, instant);
        violations.extend(causal(
            &format!("tag {name}"),
            record,
            &cut,
            &epochs,
            &histories,
        ));
        for (i, point) in cut.iter().enumerate() {
            let Some(point) = *point else {
                continue;
            };
            let Some(lineage) = ShardId::new(format!("shard-{i}"))
                .ok()
                .and_then(|s| tag.points.get(&s))
                .map(|p| p.lineage)
            else {
                continue;
            };
            let history =
                match archived_history(&archive, &repo, i, &lineage, Seq(point), false).await {
                    Ok(history) => history,
                    Err(err) => {
                        violations.push(violation("tags", format!("tag {name} shard-{i}: {err}")));
                        continue;
                    }
                };
            if history.end() < point {
                // The archive does not reach the tag (shipping had not caught up): nothing
                // to replay it from; the wal checker reports a short archive.
                continue;
            }
            let dir = scratch.join(format!("tag-{name}-{i}"));
            match replayed_keys(&repo, i, &history, point, &dir).await {
                Ok(keys) => violations.extend(compare(
                    &format!("tag {name} shard-{i} (point {point})"),
                    "tags",
                    &keys,
                    &histories[i][epochs[i]],
                    &unacked,
                    point,
                )),
                Err(err) => {
                    violations.push(violation("tags", format!("tag {name} shard-{i}: {err}")))
                }
            }
        }
    }
    violations
}

/// A cut vector in shard order (`None` where the cut has no such shard).
fn per_shard(agents: usize, seq_of: impl Fn(&ShardId) -> Option<u64>) -> Vec<Option<u64>> {
    (0..agents)
        .map(|i| {
            ShardId::new(format!("shard-{i}"))
                .ok()
                .and_then(|s| seq_of(&s))
        })
        .collect()
}

/// Compares a shard's keys with the model at `cut`: every acknowledged write at or below it
/// is there, none above it, and nothing that was never written.
fn compare(
    what: &str,
    property: &'static str,
    keys: &BTreeSet<String>,
    acked: &BTreeMap<&str, u64>,
    unacked: &BTreeSet<&str>,
    cut: u64,
) -> Vec<Violation> {
    let mut out = Vec::new();
    for (key, seq) in acked {
        let expected = *seq <= cut;
        if keys.contains(*key) != expected {
            out.push(violation(
                property,
                format!(
                    "{what}: {key} at seq {seq} is {}",
                    if expected {
                        "missing"
                    } else {
                        "there but after the cut"
                    }
                ),
            ));
        }
    }
    for key in keys {
        if !acked.contains_key(key.as_str()) && !unacked.contains(key.as_str()) {
            out.push(violation(
                property,
                format!("{what}: {key} was never written there"),
            ));
        }
    }
    out
}

/// Every history of every shard, `histories[shard][epoch]`: key -> sequence number of each
/// acknowledged write it holds. History 0 is the shard's first; a rollback (or an in-place
/// restore) to `to_seq` of history `from_epoch` starts the next, with the writes of that one
/// up to `to_seq` and then those sent since.
fn histories(record: &Record, agents: usize) -> Vec<Vec<BTreeMap<&str, u64>>> {
    (0..agents)
        .map(|shard| {
            let rollbacks: Vec<(u64, usize)> = record
                .rollbacks
                .iter()
                .filter(|r| r.shard == shard)
                .map(|r| (r.to_seq, r.from_epoch))
                .collect();
            let mut out: Vec<BTreeMap<&str, u64>> = Vec::with_capacity(rollbacks.len() + 1);
            let mut current: BTreeMap<&str, u64> = BTreeMap::new();
            for epoch in 0..=rollbacks.len() {
                if epoch > 0 {
                    let (to, from) = rollbacks[epoch - 1];
                    current = out.get(from).cloned().unwrap_or_default();
                    current.retain(|_, seq| *seq <= to);
                }
                for write in record
                    .writes
                    .iter()
                    .filter(|w| w.shard == shard && w.epoch == epoch)
                {
                    if let Some(seq) = write.seq {
                        current.insert(write.key.as_str(), seq);
                    }
                }
                out.push(current.clone());
            }
            out
        })
        .collect()
}

/// The history each shard was on at `ms` (simulated).
pub(crate) fn epochs_at(record: &Record, agents: usize, ms: u64) -> Vec<usize> {
    (0..agents)
        .map(|shard| {
            record
                .rollbacks
                .iter()
                .filter(|r| r.shard == shard && r.at_ms <= ms)
                .count()
        })
        .collect()
}

/// A cut (per shard, `None` if absent) that holds a write must hold the write acknowledged
/// before it was sent, when both belong to the histories the cut was taken on (`epochs`).
fn causal(
    what: &str,
    record: &Record,
    cut: &[Option<u64>],
    epochs: &[usize],
    histories: &[Vec<BTreeMap<&str, u64>>],
) -> Vec<Violation> {
    let in_history = |w: &Write| {
        w.seq.is_some() && histories[w.shard][epochs[w.shard]].get(w.key.as_str()) == w.seq.as_ref()
    };
    let mut out = Vec::new();
    for write in &record.writes {
        let (Some(seq), Some(before)) = (write.seq, write.after) else {
            continue;
        };
        let earlier = &record.writes[before];
        if !in_history(write) || !in_history(earlier) {
            continue;
        }
        let (Some(earlier_seq), Some(cut_here), Some(cut_there)) =
            (earlier.seq, cut[write.shard], cut[earlier.shard])
        else {
            continue;
        };
        if seq <= cut_here && earlier_seq > cut_there {
            out.push(violation(
                "causal",
                format!(
                    "{what} holds {} (shard-{}) but not {}, acknowledged before it was sent",
                    write.key, write.shard, earlier.key
                ),
            ));
        }
    }
    out
}

/// A shard's history as the archive gives it: its batches from sequence 1, or from a backup
/// (`base`) where the archive cannot.
#[derive(Default)]
struct Archived {
    /// The backup, and the shard's sequence number in it.
    base: Option<(BackupManifest, u64)>,
    batches: Vec<WalBatch>,
}

impl Archived {
    /// The last sequence number it reaches.
    fn end(&self) -> u64 {
        match (self.batches.last(), &self.base) {
            (Some(batch), _) => batch.last().0,
            (None, Some((_, seq))) => *seq,
            (None, None) => 0,
        }
    }
}

/// Every batch in the archive of the history that ends at `to` of `lineage` (and the
/// ancestors it inherited from), leg by leg, as a PITR replays it, checked for continuity.
/// An archive retention `pruned` must hold the history from the cut of the oldest committed
/// backup on it (it is the base), contiguous to its end: anything retention removed after
/// that cut strands that backup. An archive never pruned must hold it from sequence 1, but
/// where a leg starts past the end of the one before, at their branch point (a shard rolled
/// back before it shipped its last writes, then restored from a backup that holds them), the
/// history continues from a committed backup at or past that point.
async fn archived_history(
    archive: &Repository,
    repo: &Repository,
    shard: usize,
    lineage: &Lineage,
    to: Seq,
    pruned: bool,
) -> Result<Archived, String> {
    let shard_id = ShardId::new(format!("shard-{shard}")).map_err(|e| e.chain())?;
    let known = archive
        .wal_lineages(&shard_id)
        .await
        .map_err(|e| e.chain())?
        .into_iter()
        .map(|l| (l.id, l))
        .collect();
    let mut legs = ancestry(lineage, to, &known);
    legs.reverse();
    let whole: Vec<(Lineage, Seq)> = legs.iter().map(|l| (l.lineage, l.to)).collect();
    let mut history = Archived::default();
    if pruned {
        history.base = backup_within(repo, &shard_id, &whole, 0, u64::MAX).await?;
    }
    let mut branch: Option<Seq> = None;
    for leg in legs {
        let segments = archive
            .wal_segments(&shard_id, &leg.lineage)
            .await
            .map_err(|e| e.chain())?;
        check_segments(&segments).map_err(|e| e.chain())?;
        for (n, info) in segments.iter().enumerate() {
            let expected = history.end() + 1;
            if info.first > leg.to || info.last.0 < expected {
                // Past the point this leg ends at, or wholly before the base.
                continue;
            }
            if info.first.0 > expected {
                let at_branch = n == 0 && branch.is_some_and(|at| info.first.0 == at.0 + 1);
                let base = if at_branch && !pruned {
                    let lo = info.first.0 - 1;
                    backup_within(repo, &shard_id, &whole, lo, leg.to.0).await?
                } else {
                    None
                };
                let Some(base) = base else {
                    return Err(match &history.base {
                        Some((backup, cut)) if history.batches.is_empty() => format!(
                            "{}: the WAL after backup {}'s cut {cut} is gone (the archive resumes at {})",
                            leg.lineage, backup.backup_id, info.first
                        ),
                        _ => format!(
                            "{}: the archive starts at {}, not at {expected}",
                            leg.lineage, info.first
                        ),
                    });
                };
                history = Archived {
                    base: Some(base),
                    batches: Vec::new(),
                };
            }
            let after = history.end();
            let segment = archive.get_wal_segment(info).await.map_err(|e| e.chain())?;
            history.batches.extend(
                segment
                    .batches
                    .into_iter()
                    .filter(|b| b.first.0 > after)
                    .take_while(|b| b.last() <= leg.to),
            );
        }
        branch = Some(leg.to);
    }
    Ok(history)
}

/// The committed backup whose cut of `shard` is lowest in `lo..=hi` and lies on `history`
/// (lineages, each up to its end), and that cut.
async fn backup_within(
    repo: &Repository,
    shard: &ShardId,
    history: &[(Lineage, Seq)],
    lo: u64,
    hi: u64,
) -> Result<Option<(BackupManifest, u64)>, String> {
    let mut best: Option<(BackupManifest, u64)> = None;
    for (id, manifest) in repo.backups().await.map_err(|e| e.chain())? {
        let Ok(manifest) = manifest else {
            continue;
        };
        let Some(cut) = manifest.cut.get(shard).map(|seq| seq.0) else {
            continue;
        };
        if cut < lo || cut > hi || best.as_ref().is_some_and(|(_, at)| *at <= cut) {
            continue;
        }
        let point = repo
            .shard_manifest(shard, &id)
            .await
            .map_err(|e| e.chain())?;
        if history
            .iter()
            .any(|(lineage, to)| lineage.id == point.lineage.id && cut <= to.0)
        {
            best = Some((manifest, cut));
        }
    }
    Ok(best)
}

/// The keys of a shard rebuilt from empty (or from its base backup) by replaying the
/// history's batches up to exactly `to`.
async fn replayed_keys(
    repo: &Repository,
    shard: usize,
    history: &Archived,
    to: u64,
    dir: &Path,
) -> Result<BTreeSet<String>, String> {
    if let Some((backup, _)) = &history.base {
        restore_into(repo, backup, shard, dir).await?;
    } else {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let engine = MemEngine::open(dir, &["default".to_string()]).map_err(|e| e.chain())?;
    for batch in history.batches.iter().take_while(|b| b.last().0 <= to) {
        engine.replay(batch).map_err(|e| e.chain())?;
    }
    if engine.latest_seq().0 != to {
        return Err(format!(
            "replay ended at {}, not at {to} (a batch boundary)",
            engine.latest_seq()
        ));
    }
    let keys = engine
        .scan("default", b"", None, usize::MAX)
        .map_err(|e| e.chain())?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect();
    let _ = std::fs::remove_dir_all(dir);
    Ok(keys)
}

/// An instant in `window` when every agent's gate was closed, if there was one.
pub(crate) fn fence_instant(fences: &[Vec<(u64, u64)>], (from, to): (u64, u64)) -> Option<u64> {
    let in_window = |&(a, b): &(u64, u64)| b > from && a <= to;
    fences
        .iter()
        .flatten()
        .filter(|f| in_window(f))
        .map(|&(start, _)| start)
        .find(|&start| {
            fences
                .iter()
                .all(|agent| agent.iter().any(|&(a, b)| a <= start && start < b))
        })
}

/// The chain of `backup`: the full backup at its root, then the incremental and differential
/// backups from there to `backup` (ending with it unless it is full).
async fn chain_of(
    repo: &Repository,
    backup: &BackupManifest,
) -> Result<(BackupId, Vec<BackupId>), String> {
    let mut chain = Vec::new();
    let mut current = backup.clone();
    while current.kind != BackupKind::Full {
        chain.push(current.backup_id.clone());
        let parent = current
            .parent
            .clone()
            .ok_or_else(|| format!("backup {} has no parent", current.backup_id))?;
        current = repo
            .backup_manifest(&parent)
            .await
            .map_err(|e| format!("parent {parent}: {}", e.chain()))?;
        if chain.len() > 10_000 {
            return Err("a chain of parents that loops".into());
        }
    }
    chain.reverse();
    Ok((current.backup_id, chain))
}

/// Restores `shard` of `backup` from empty as production does: the full backup at the root
/// of its chain (files, then the WAL tail to its cut), then each backup's WAL of the chain,
/// checked on the way.
async fn restored_keys(
    repo: &Repository,
    backup: &BackupManifest,
    shard: usize,
    scratch: &Path,
) -> Result<BTreeSet<String>, String> {
    let dir = scratch.join(format!("{}-{shard}", backup.backup_id));
    let engine = restore_into(repo, backup, shard, &dir).await?;
    let keys = engine
        .scan("default", b"", None, usize::MAX)
        .map_err(|e| e.chain())?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect();
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(keys)
}

/// Restores `shard` of `backup` into `dir` (see [`restored_keys`]), checked, and opens it.
async fn restore_into(
    repo: &Repository,
    backup: &BackupManifest,
    shard: usize,
    dir: &Path,
) -> Result<MemEngine, String> {
    let shard_id = ShardId::new(format!("shard-{shard}")).map_err(|e| e.chain())?;
    let manifest = repo
        .shard_manifest(&shard_id, &backup.backup_id)
        .await
        .map_err(|e| e.chain())?;
    let dir = dir.to_path_buf();
    if let Some(scratch) = dir.parent() {
        std::fs::create_dir_all(scratch)
            .map_err(|e| format!("create {}: {e}", scratch.display()))?;
    }
    let (full, chain) = chain_of(repo, backup).await?;
    let seq = if chain.is_empty() {
        restore_shard(
            repo,
            &full,
            &shard_id,
            &dir,
            &[],
            TransferOptions::default(),
            &Progress::default(),
        )
        .await
        .map_err(|e| e.chain())?
        .seq
    } else {
        let mut staged = stage_shard(
            repo,
            &full,
            &shard_id,
            &dir,
            None,
            TransferOptions::default(),
            &Progress::default(),
        )
        .await
        .map_err(|e| e.chain())?;
        let replay = Replay {
            repo: repo.clone(),
            chain,
            archive: None,
            legs: Vec::new(),
            to: manifest.seq,
        };
        replay_staged::<MemEngine>(&mut staged, &shard_id, &replay)
            .await
            .map_err(|e| e.chain())?;
        let seq = staged.seq;
        staged.move_to(&dir).map_err(|e| e.chain())?;
        seq
    };
    let engine = MemEngine::open(&dir, &manifest.column_families).map_err(|e| e.chain())?;
    if engine.latest_seq() != manifest.seq || seq != manifest.seq {
        return Err(format!(
            "opened at seq {}, the manifest says {}",
            engine.latest_seq(),
            manifest.seq
        ));
    }
    Ok(engine)
}
