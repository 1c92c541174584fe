//! Garbage collection (`lockstep gc [--dry-run]`): one pass marks, records candidates and
//! deletes the candidates an earlier pass recorded, beside backups, restores and WAL shipping
//! (the repository side is `lockstep_repository::gc`).
//!
//! A pass:
//! 1. marks every object a shard manifest names (committed backups, backups being taken, and
//!    shard manifests younger than the grace period), then lists the stored objects;
//! 2. plans (`gc::plan`): unreferenced objects younger than the grace period are left alone;
//!    the others are due if the last record has them for at least the grace period and they
//!    were not written since, else they become candidates;
//! 3. if any are due: *condemns* them ([`Sweep::condemn`]): waits until no backup that
//!    started before is running, and hands the set to every backup that starts after, whose
//!    writers then never rely on those objects (they write a new copy). Then marks again:
//!    a due object a finished backup now names is kept (rescued); the rest are deleted in
//!    batches, each after checking this coordinator still holds the repository;
//! 4. removes the shard manifests no committed or pending backup owns, older than the grace
//!    period, and writes the new candidate record.
//!
//! A crash anywhere loses nothing: the record changes last, so the next pass finds the same
//! due objects (minus those already gone) and finishes the work.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::TryStreamExt;
use lockstep_proto::v1;
use lockstep_repository::gc::{self, Condemned, ObjectKey};
use lockstep_repository::{Error, ErrorCode, Result};
use serde::Deserialize;

use tokio_util::sync::CancellationToken;

use crate::ops::ClusterContext;

/// `[gc]` in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// How long an unreferenced object waits before it may be deleted, and how old it must be
    /// before it is even recorded: longer than any upload takes (an offline
    /// `lockstep-agent backup` is not told what a sweep condemns).
    pub grace_s: u64,
    /// Simulations only: count only committed backups as live and delete everything else at
    /// once, with no grace period and no condemnation: the bug their checkers must catch.
    #[serde(skip)]
    pub planted_bug: bool,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace_s: 6 * 3600,
            planted_bug: false,
        }
    }
}

impl GcConfig {
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_s)
    }
}

/// Objects deleted between two checks that this coordinator still holds the repository.
const DELETE_BATCH: usize = 64;

/// What the backups and the sweep of one coordinator share.
#[derive(Default)]
pub struct Sweep {
    /// Held (shared) by every running backup from before its barrier to its end; a sweep
    /// takes it exclusively to wait out the backups that started before it condemned.
    backups: Arc<tokio::sync::RwLock<()>>,
    condemned: Mutex<Option<Arc<v1::ObjectFilter>>>,
    /// One pass at a time.
    pass: tokio::sync::Mutex<()>,
}

/// A running backup's hold on [`Sweep`]: what it must not rely on, while it runs.
pub struct BackupHold {
    _running: tokio::sync::OwnedRwLockReadGuard<()>,
    pub condemned: Option<Arc<v1::ObjectFilter>>,
}

/// Ends the condemnation when dropped, whatever way the sweep ends.
struct Condemnation<'a>(&'a Sweep);

impl Drop for Condemnation<'_> {
    fn drop(&mut self) {
        *self.0.condemned.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Sweep {
    /// Called by a backup before its barrier: it then sends what is condemned to its agents.
    pub async fn enter_backup(&self) -> BackupHold {
        let running = self.backups.clone().read_owned().await;
        let condemned = self
            .condemned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        BackupHold {
            _running: running,
            condemned,
        }
    }

    /// Condemns `keys`: returns once every backup that started before has ended, and every
    /// one that starts until the returned guard drops is told.
    async fn condemn(&self, keys: &[ObjectKey]) -> Condemnation<'_> {
        let (bits, hashes, count) = Condemned::new(keys.iter()).to_wire();
        let filter = Arc::new(v1::ObjectFilter {
            bits,
            hashes,
            count,
        });
        let _no_backup_running = self.backups.write().await;
        *self.condemned.lock().unwrap_or_else(|p| p.into_inner()) = Some(filter);
        Condemnation(self)
    }
}

/// The simulations' planted bug: only committed backups count, and everything else is
/// deleted at once, with no grace period and no condemnation.
async fn planted_bug(
    ctx: &ClusterContext,
    mut report: v1::GarbageReport,
) -> Result<v1::GarbageReport> {
    let mut live = gc::LiveSet::default();
    for (backup, manifest) in ctx.repo.backups().await? {
        for shard in manifest?.shards {
            let manifest = ctx.repo.shard_manifest(&shard.shard_id, &backup).await?;
            live.insert_manifest(&manifest);
        }
    }
    let live = live.finish();
    let doomed: Vec<ObjectKey> = ctx
        .repo
        .stored_objects()
        .map_ok(|o| o.key)
        .try_filter(|key| std::future::ready(!live.contains(key)))
        .try_collect()
        .await?;
    ctx.repo.delete_objects(&doomed).await?;
    report.objects_deleted = doomed.len() as u64;
    Ok(report)
}

/// Runs one pass; `dry_run` reports what it would record and delete and changes nothing.
/// `stop` (the coordinator stopping) ends the sweep between two batches.
pub async fn collect(
    ctx: &ClusterContext,
    dry_run: bool,
    stop: &CancellationToken,
) -> Result<v1::GarbageReport> {
    let sweep = &ctx.sweep;
    let Ok(_one_pass) = sweep.pass.try_lock() else {
        return Err(Error::new(
            ErrorCode::BarrierBusy,
            "a garbage-collection pass is running; wait for it to end",
        ));
    };
    ctx.fence.still_held()?;
    let started = std::time::Instant::now();
    let now = Utc::now();
    let grace = ctx.config.gc.grace();
    let grace_chrono = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let orphaned_before = now - grace_chrono;
    let mut report = v1::GarbageReport {
        dry_run,
        grace_s: grace.as_secs(),
        ..Default::default()
    };

    if ctx.config.gc.planted_bug && !dry_run {
        return planted_bug(ctx, report).await;
    }
    let gc::Scan {
        plan,
        orphans,
        listed,
        referenced,
        referenced_bytes,
    } = ctx.repo.gc_scan(now, grace_chrono).await?;
    report.objects_listed = listed;
    report.objects_referenced = referenced;
    report.bytes_referenced = referenced_bytes;
    report.objects_young = plan.young;
    report.candidates = plan.record.marked.len() as u64;
    report.candidate_bytes = plan.candidate_bytes;
    report.orphan_manifests = orphans.len() as u64;
    let next_due = |record: &gc::CandidateRecord| {
        let first = record.marked.values().min()?;
        let due = chrono::DateTime::from_timestamp_millis(*first)? + grace_chrono;
        Some(due.to_rfc3339())
    };
    if dry_run {
        report.next_due_at = next_due(&plan.record).unwrap_or_default();
        report.objects_deleted = plan.due.len() as u64;
        report.bytes_reclaimed = plan.due.iter().map(|o| o.size).sum();
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }

    let mut orphans = orphans;
    if !plan.due.is_empty() {
        let keys: Vec<ObjectKey> = plan.due.iter().map(|o| o.key).collect();
        let _condemned = sweep.condemn(&keys).await;
        tracing::info!(objects = keys.len(), "GC: objects condemned; marking again");
        let (live, still_orphaned) = ctx.repo.referenced_objects(orphaned_before).await?;
        // Only what both marks found orphaned goes.
        orphans.retain(|key| still_orphaned.contains(key));
        let (rescued, doomed): (Vec<&gc::StoredObject>, Vec<&gc::StoredObject>) =
            plan.due.iter().partition(|o| live.contains(&o.key));
        drop(live);
        report.objects_rescued = rescued.len() as u64;
        for batch in doomed.chunks(DELETE_BATCH) {
            if stop.is_cancelled() {
                return Err(Error::new(
                    ErrorCode::BarrierAborted,
                    "the coordinator is stopping; the next GC pass finishes the sweep",
                ));
            }
            // In the repository, not the cached flag: a coordinator taken over stops within
            // one batch.
            ctx.fence.check("delete unreferenced objects").await?;
            lockstep_process::fault_pause("gc-sweep", &"garbage collection").await;
            let keys: Vec<ObjectKey> = batch.iter().map(|o| o.key).collect();
            ctx.repo.delete_objects(&keys).await?;
            let bytes: u64 = batch.iter().map(|o| o.size).sum();
            report.objects_deleted += batch.len() as u64;
            report.bytes_reclaimed += bytes;
            metrics::counter!(lockstep_process::metrics::GC_DELETED_OBJECTS)
                .increment(batch.len() as u64);
            metrics::counter!(lockstep_process::metrics::GC_RECLAIMED_BYTES).increment(bytes);
            lockstep_process::fault_pause("gc-swept", &"garbage collection").await;
        }
    }
    for batch in orphans.chunks(DELETE_BATCH) {
        ctx.fence.check("delete orphaned shard manifests").await?;
        ctx.repo.delete_keys(batch).await?;
    }
    ctx.fence.check("record GC candidates").await?;
    // New candidates count from when writers can see them: an offline backup reads the
    // record when it starts.
    let mut record = plan.record;
    record.restamp(now.timestamp_millis(), Utc::now().timestamp_millis());
    ctx.repo.put_gc_candidates(&record).await?;
    report.next_due_at = next_due(&record).unwrap_or_default();
    report.duration_ms = started.elapsed().as_millis() as u64;
    metrics::gauge!(lockstep_process::metrics::GC_CANDIDATE_BYTES).set(plan.candidate_bytes as f64);
    metrics::gauge!(lockstep_process::metrics::GC_LAST_SUCCESS).set(Utc::now().timestamp() as f64);
    tracing::info!(
        deleted = report.objects_deleted,
        reclaimed_bytes = report.bytes_reclaimed,
        rescued = report.objects_rescued,
        candidates = report.candidates,
        young = report.objects_young,
        orphan_manifests = report.orphan_manifests,
        duration_ms = report.duration_ms,
        "GC pass done"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use lockstep_repository::ObjectId;
    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn a_sweep_waits_for_the_backups_before_it_and_tells_the_ones_after() {
        let sweep = Arc::new(Sweep::default());
        let before = sweep.enter_backup().await;
        assert!(before.condemned.is_none());
        let (condemned_tx, mut condemned_rx) = oneshot::channel();
        let (end_tx, end_rx) = oneshot::channel::<()>();
        let condemning = tokio::spawn({
            let sweep = sweep.clone();
            async move {
                let _condemned = sweep.condemn(&[(ObjectId::of(b"garbage"), 0)]).await;
                let _ = condemned_tx.send(());
                let _ = end_rx.await;
            }
        });
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(
            condemned_rx.try_recv().is_err(),
            "condemned while a backup that started before it runs"
        );
        drop(before);
        condemned_rx
            .await
            .expect("condemned once that backup ended");
        let after = sweep.enter_backup().await;
        let filter = after.condemned.clone().expect("a backup after it is told");
        let condemned =
            Condemned::from_wire(&filter.bits, filter.hashes, filter.count).expect("filter");
        assert!(condemned.contains(&(ObjectId::of(b"garbage"), 0)));
        let _ = end_tx.send(());
        condemning.await.expect("sweep");
        drop(after);
        assert!(
            sweep.enter_backup().await.condemned.is_none(),
            "the sweep ended"
        );
    }
}
