//! Backups: the two-phase barrier across every agent, then the uploads, then the commit.
//!
//! A backup runs as one operation of `ClusterOps` (see `ops`), which also picks its parent
//! while it holds the cluster. `barrier` is shared with tags, which run it without a capture.
//!
//! Architecture invariant: the backup manifest is written only after every agent of the
//! topology reported its shard manifest durable; a backup with any shard missing, data or
//! parity, is never committed, and its leftovers are removed once no agent still uploads it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use lockstep_proto::v1::{self, BarrierState};
use lockstep_proto::wire::{Label, lineage_to_wire};
use lockstep_repository::manifest::{BackupKind, BackupManifest, Labels};
use lockstep_repository::{BackupId, Error, ErrorCode, Lineage, Result, Seq, ShardId};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::{self, AgentLink, Round, Step, call_each, poll_until};
use crate::ops::ClusterContext;

pub(crate) use lockstep_process::fault_pause;
use lockstep_process::metrics as names;

/// One shard's part of a backup, tag or restore, as last reported.
#[derive(Debug, Clone)]
pub struct ShardView {
    pub shard_id: ShardId,
    /// The agent's state, by its wire name (`uploading`, `staged`, ...), or `unreachable`.
    pub state: &'static str,
    pub seq: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub gate_closed_us: u64,
    pub error: Option<(String, String)>,
}

impl ShardView {
    pub fn to_wire(&self) -> v1::ShardProgress {
        let (error_code, error_message) = self.error.clone().unwrap_or_default();
        v1::ShardProgress {
            shard_id: self.shard_id.to_string(),
            state: self.state.to_string(),
            seq: self.seq,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            gate_closed_us: self.gate_closed_us,
            error_code,
            error_message,
        }
    }

    /// A shard whose agent did not answer.
    pub fn unreachable(shard_id: &ShardId, err: &Error) -> ShardView {
        ShardView {
            shard_id: shard_id.clone(),
            state: "unreachable",
            seq: 0,
            bytes_done: 0,
            bytes_total: 0,
            gate_closed_us: 0,
            error: Some((err.code.as_str().to_string(), err.chain())),
        }
    }

    fn barrier(shard_id: &ShardId, status: &v1::BarrierStatus) -> ShardView {
        ShardView {
            shard_id: shard_id.clone(),
            state: status.state().label(),
            seq: status.seq,
            bytes_done: status.bytes_done,
            bytes_total: status.bytes_total,
            gate_closed_us: status.gate_closed_us,
            error: (!status.error_code.is_empty())
                .then(|| (status.error_code.clone(), status.error_message.clone())),
        }
    }
}

/// A backup job as clients see it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub backup_id: BackupId,
    pub state: v1::JobState,
    pub shards: Vec<ShardView>,
    /// The code and message of a failed job.
    pub error: Option<(ErrorCode, String)>,
}

impl JobView {
    pub fn new(backup_id: BackupId) -> JobView {
        JobView {
            backup_id,
            state: v1::JobState::Preparing,
            shards: Vec::new(),
            error: None,
        }
    }

    pub fn to_wire(&self) -> v1::BackupJob {
        let (error_code, error_message) = self
            .error
            .as_ref()
            .map(|(code, message)| (code.as_str().to_string(), message.clone()))
            .unwrap_or_default();
        v1::BackupJob {
            backup_id: self.backup_id.to_string(),
            state: self.state as i32,
            shards: self.shards.iter().map(ShardView::to_wire).collect(),
            error_code,
            error_message,
        }
    }
}

/// A job's view, shared between the operation that updates it and the clients that poll it.
pub type Shared = Arc<Mutex<JobView>>;

pub fn read(view: &Shared) -> JobView {
    view.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

pub fn update(view: &Shared, f: impl FnOnce(&mut JobView)) {
    f(&mut view.lock().unwrap_or_else(|p| p.into_inner()));
}

/// What a backup's barrier takes from every shard, and what the backup continues from.
#[derive(Debug, Clone)]
pub struct Cut {
    pub kind: BackupKind,
    /// Incremental and differential backups: the backup they continue from, with each
    /// shard's sequence number and lineage there.
    pub parent: Option<(BackupId, ParentPoints)>,
    /// What a running GC sweep may delete: the agents must not rely on it (`gc.rs`).
    pub condemned: Option<Arc<v1::ObjectFilter>>,
}

/// Each shard's sequence number and lineage in a parent backup.
pub type ParentPoints = BTreeMap<ShardId, (Seq, Lineage)>;

impl Cut {
    /// A full backup continues from nothing; an incremental from the latest backup of any
    /// kind; a differential from the latest full backup. A parent that lacks a shard of the
    /// topology cannot be continued: take a full backup.
    pub async fn for_kind(ctx: &ClusterContext, kind: BackupKind) -> Result<Cut> {
        if kind == BackupKind::Full {
            return Ok(Cut {
                kind,
                parent: None,
                condemned: None,
            });
        }
        let mut catalog = ctx.repo.catalog().await?;
        // The parent is looked up: one deleted by another writer that did not record it
        // would make an incremental nothing can restore once GC took its objects.
        let wanted = |m: &&Arc<BackupManifest>| {
            kind == BackupKind::Incremental || m.kind == BackupKind::Full
        };
        if let Some(parent) = catalog.backups().iter().rev().find(wanted)
            && !ctx.repo.backup_exists(&parent.backup_id).await?
        {
            catalog = ctx.repo.reconciled_catalog().await?;
        }
        let parent = catalog
            .backups()
            .iter()
            .rev()
            .find(wanted)
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::BackupInvalidType,
                    format!(
                        "a {kind} backup continues a {} backup and the repository has none; take a full backup first",
                        if kind == BackupKind::Incremental { "previous" } else { "full" }
                    ),
                )
            })?;
        let mut points = BTreeMap::new();
        for shard in ctx.config.shard_ids() {
            if !parent.cut.contains_key(&shard) {
                return Err(Error::new(
                    ErrorCode::BackupInvalidType,
                    format!(
                        "backup {} has no shard {shard}, so a {kind} backup cannot continue it; take a full backup",
                        parent.backup_id
                    ),
                ));
            }
            let manifest = ctx.repo.shard_manifest(&shard, &parent.backup_id).await?;
            points.insert(shard, (manifest.seq, manifest.lineage));
        }
        Ok(Cut {
            kind,
            parent: Some((parent.backup_id.clone(), points)),
            condemned: None,
        })
    }

    fn prepare_request(
        &self,
        backup: &BackupId,
        lease_ms: u64,
        shard: &ShardId,
    ) -> v1::PrepareRequest {
        let mut request = v1::PrepareRequest {
            backup_id: backup.to_string(),
            lease_ms,
            condemned: self.condemned.as_deref().cloned(),
            ..Default::default()
        };
        if let Some((_, points)) = &self.parent
            && let Some((seq, lineage)) = points.get(shard)
        {
            request.capture = v1::CaptureMode::Wal as i32;
            request.wal_after_seq = seq.0;
            request.wal_lineage = Some(lineage_to_wire(lineage));
        }
        request
    }
}

/// The agent's own error for a reply in an unexpected state.
fn status_error(shard: &ShardId, status: &v1::BarrierStatus) -> Error {
    let state = status.state();
    let code = ErrorCode::parse(&status.error_code).unwrap_or(match state {
        BarrierState::Aborted => ErrorCode::BarrierAborted,
        BarrierState::Expired => ErrorCode::BarrierLeaseExpired,
        _ => ErrorCode::BackupCreationFailed,
    });
    let detail = if status.error_message.is_empty() {
        format!("the agent reports {}", state.label())
    } else {
        status.error_message.clone()
    };
    Error::new(code, format!("shard {shard}: {detail}"))
}

/// Sends Abort to every agent, best effort: an agent that cannot be reached reopens by
/// itself when its lease runs out.
pub async fn abort_everywhere(ctx: &ClusterContext, backup: &BackupId) {
    let deadline = Instant::now() + Step::Abort.timeout(&ctx.config.barrier);
    let replies = call_each(ctx.agents.iter(), Step::Abort, deadline, |_, mut client| {
        let request = v1::BarrierRequest {
            backup_id: backup.to_string(),
        };
        async move { client.abort(request).await }
    })
    .await;
    for (agent, reply) in ctx.agents.iter().zip(replies) {
        if let Err(err) = reply {
            tracing::warn!(shard = %agent.shard_id, backup = %backup, error = %err.chain(), "abort not acknowledged; the agent's lease will reopen its gate");
        }
    }
}

/// Removes what an uncommitted backup left: shard manifests and the pending marker.
pub async fn remove_leftovers(ctx: &ClusterContext, backup: &BackupId) -> Result<usize> {
    ctx.fence
        .check(&format!("remove the leftovers of backup {backup}"))
        .await?;
    let removed = ctx
        .repo
        .delete_shard_manifests(backup, &ctx.config.shard_ids())
        .await?;
    ctx.repo.delete_pending(backup).await?;
    Ok(removed)
}

/// On start: every pending backup without a backup manifest, `takeover_grace_ms` after the
/// takeover, is a leftover of a coordinator that died mid-barrier (or was fenced out). Abort
/// it on the agents, wait (bounded) until none still uploads it, and remove its shard
/// manifests; safe to repeat.
pub async fn clean_leftovers(ctx: &ClusterContext) -> Result<Vec<BackupId>> {
    let mut cleaned = Vec::new();
    let (mut waited, mut reconciled) = (false, false);
    for backup in ctx.repo.pending_ids().await? {
        if !waited && !ctx.repo.backup_exists(&backup).await? {
            // The coordinator this one took over may have checked its epoch just before the
            // takeover and be publishing this backup now (fence.rs): give it the grace.
            tokio::time::sleep(ctx.config.barrier.takeover_grace()).await;
            waited = true;
        }
        if ctx.repo.backup_exists(&backup).await? {
            // Committed by a coordinator that stopped before it recorded it in the catalog,
            // maybe: the catalog looks again (once for all of them).
            if !std::mem::replace(&mut reconciled, true) {
                ctx.repo.reconciled_catalog().await?;
            }
            ctx.repo.delete_pending(&backup).await?;
            continue;
        }
        abort_everywhere(ctx, &backup).await;
        // An agent that accepted Commit uploads on: its shard manifest may land after any
        // cleanup that does not wait for it.
        if !wait_for_uploads_to_stop(ctx, &backup).await {
            tracing::warn!(backup = %backup, "an agent may still be uploading this uncommitted backup; its leftovers stay until the next start");
            continue;
        }
        let removed = remove_leftovers(ctx, &backup).await?;
        tracing::warn!(backup = %backup, shard_manifests = removed, "removed the leftovers of an uncommitted backup");
        cleaned.push(backup);
    }
    Ok(cleaned)
}

/// Waits (bounded) until no agent is still uploading `backup`, so cleanup cannot race a late
/// shard manifest. Returns false if some agent may still be uploading, including one that
/// stopped answering (it may be cut off, not dead).
async fn wait_for_uploads_to_stop(ctx: &ClusterContext, backup: &BackupId) -> bool {
    let agents: Vec<&AgentLink> = ctx.agents.iter().collect();
    let waited = poll_until(
        &agents,
        Step::Status,
        &ctx.config.barrier,
        Instant::now() + Duration::from_secs(30),
        Error::new(
            ErrorCode::AgentUnavailable,
            "agents still uploading after 30 s",
        ),
        |_, mut client| {
            let request = v1::BarrierRequest {
                backup_id: backup.to_string(),
            };
            async move { client.status(request).await }
        },
        |replies| {
            let uploading = replies.iter().any(|reply| match reply {
                Ok(status) => status.state() == BarrierState::Uploading,
                Err(_) => true,
            });
            Ok(if uploading {
                Round::Continue
            } else {
                Round::Done
            })
        },
    )
    .await;
    waited.is_ok()
}

/// Records a backup's outcome in the metrics.
pub fn record_outcome(kind: BackupKind, committed: bool, took: Duration) {
    let (status, label) = if committed {
        (1.0, "committed")
    } else {
        (0.0, "failed")
    };
    let kind = kind.to_string();
    metrics::gauge!(names::BACKUP_LAST_STATUS, "kind" => kind.clone()).set(status);
    metrics::counter!(names::BACKUPS, "kind" => kind.clone(), "outcome" => label).increment(1);
    metrics::histogram!(names::BACKUP_DURATION, "kind" => kind.clone()).record(took.as_secs_f64());
    if committed {
        metrics::gauge!(names::BACKUP_LAST_SUCCESS, "kind" => kind)
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
    }
}

/// Sets `lockstep_backup_last_success_timestamp_seconds` from the repository, once at start,
/// so a coordinator that restarted still alerts on a stale backup before its first one.
pub async fn seed_metrics(ctx: &ClusterContext) {
    let backups = match ctx.repo.backups().await {
        Ok(backups) => backups,
        Err(err) => {
            tracing::warn!(error = %err.chain(), "could not read the catalog for the backup metrics");
            return;
        }
    };
    let mut last: std::collections::BTreeMap<String, chrono::DateTime<Utc>> = Default::default();
    for manifest in backups
        .into_iter()
        .filter_map(|(_, manifest)| manifest.ok())
    {
        let at = last
            .entry(manifest.kind.to_string())
            .or_insert(manifest.completed_at);
        *at = (*at).max(manifest.completed_at);
    }
    for (kind, at) in last {
        metrics::gauge!(names::BACKUP_LAST_SUCCESS, "kind" => kind)
            .set(at.timestamp_millis() as f64 / 1000.0);
    }
}

/// Runs backup `backup` to its end: the barrier, the uploads, the commit; on any failure or
/// on `cancel` before every shard is uploaded, aborts everywhere and removes what it left.
/// Past that point the backup is published whatever happens to `cancel`.
pub async fn run_backup(
    ctx: &ClusterContext,
    backup: &BackupId,
    cut: &Cut,
    labels: &Labels,
    view: &Shared,
    cancel: &CancellationToken,
) -> Result<()> {
    let started_at = Utc::now();
    let intent = serde_json::json!({ "backup_id": backup, "kind": cut.kind, "parent": cut.parent.as_ref().map(|p| &p.0), "started_at": started_at, "shards": ctx.config.shard_ids() });
    ctx.repo
        .put_pending(backup, intent.to_string().into_bytes())
        .await?;
    let uploaded = tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Error::new(
            ErrorCode::BarrierAborted,
            "the coordinator is shutting down; the backup was aborted",
        )),
        uploaded = barrier_and_upload(ctx, backup, cut, view) => uploaded,
    };
    let outcome = match uploaded {
        Ok(()) => publish(ctx, backup, cut, labels, started_at).await,
        Err(err) => Err(err),
    };
    if outcome.is_err() {
        abort_everywhere(ctx, backup).await;
        // Agents upload only after Commit: before it was sent, none can publish late.
        let committed = read(view).state == v1::JobState::Uploading;
        if committed && (cancel.is_cancelled() || !wait_for_uploads_to_stop(ctx, backup).await) {
            // The pending marker stays, so the next start removes what is published late.
            tracing::warn!(backup = %backup, "an agent may still be uploading; leftovers will be removed at the next start");
        } else if let Err(err) = remove_leftovers(ctx, backup).await {
            tracing::warn!(backup = %backup, error = %err.chain(), "could not remove leftovers yet; the next start will");
        }
    }
    outcome
}

/// `[verify] after_backup`: checks the backup just committed. A failure is logged and
/// exported (`lockstep_verify_last_status` 0); the backup stands, for an operator to judge.
pub async fn verify_after(ctx: &ClusterContext, backup: &BackupId) {
    use lockstep_repository::verify::{VerifyLevel, verify};
    let level = match ctx.config.verify.after_backup {
        crate::config::AfterBackup::Off => return,
        crate::config::AfterBackup::Quick => VerifyLevel::Quick,
        crate::config::AfterBackup::Full => VerifyLevel::Full,
    };
    let progress = lockstep_repository::transfer::Progress::default();
    let verified = verify(
        &ctx.repo,
        std::slice::from_ref(backup),
        level,
        100,
        None,
        8,
        &progress,
    )
    .await;
    let passed = matches!(&verified, Ok(report) if report.passed);
    metrics::gauge!(lockstep_process::metrics::VERIFY_LAST_STATUS).set(if passed {
        1.0
    } else {
        0.0
    });
    match verified {
        Ok(report) if report.passed => {
            tracing::info!(backup = %backup, objects = report.objects_checked, "verified after the backup: passed")
        }
        Ok(report) => {
            tracing::error!(backup = %backup, report = %report, "verified after the backup: FAILED")
        }
        Err(err) => {
            tracing::error!(backup = %backup, error = %err.chain(), "verify after the backup could not run")
        }
    }
}

/// An agent that answers for another shard than the one configured at its endpoint: its
/// cut would be recorded under the wrong shard.
pub(crate) fn wrong_shard(agent: &AgentLink, reported: &str) -> Error {
    Error::new(
        ErrorCode::InvalidArgument,
        format!(
            "the agent at {} serves shard {reported:?}, but the configuration names it {}; fix its [[agents]] entry",
            agent.endpoint, agent.shard_id
        ),
    )
}

/// Sends `step` (Stage or Prepare) to every agent in parallel; every reply must be
/// `expected` and arrive by `deadline`. The view shows each shard's reply.
async fn fan_out(
    ctx: &ClusterContext,
    view: &Shared,
    step: Step,
    expected: BarrierState,
    deadline: Instant,
    request: &impl Fn(&AgentLink) -> v1::PrepareRequest,
) -> Result<Vec<v1::BarrierStatus>> {
    let replies = call_each(ctx.agents.iter(), step, deadline, |agent, mut client| {
        let request = request(agent);
        async move {
            match step {
                Step::Stage => client.stage(request).await,
                _ => client.prepare(request).await,
            }
        }
    })
    .await;
    let mut failures = Vec::new();
    let mut shards = Vec::new();
    let mut accepted = Vec::new();
    for (agent, reply) in ctx.agents.iter().zip(replies) {
        match reply {
            Ok(status) if status.shard_id != agent.shard_id.as_str() => {
                let err = wrong_shard(agent, &status.shard_id);
                shards.push(ShardView::unreachable(&agent.shard_id, &err));
                failures.push(err);
            }
            Ok(status) => {
                shards.push(ShardView::barrier(&agent.shard_id, &status));
                if status.state() == expected {
                    accepted.push(status);
                } else {
                    failures.push(status_error(&agent.shard_id, &status));
                }
            }
            Err(err) => {
                shards.push(ShardView::unreachable(&agent.shard_id, &err));
                failures.push(Error::new(err.code, err.chain()));
            }
        }
    }
    update(view, |v| v.shards = shards);
    if Instant::now() > deadline && failures.is_empty() {
        failures.push(Error::new(
            ErrorCode::BarrierLeaseExpired,
            format!(
                "the {} replies arrived after the deadline",
                expected.label()
            ),
        ));
    }
    if !failures.is_empty() {
        return Err(fleet::joined(&failures, "barrier failed, aborted"));
    }
    Ok(accepted)
}

/// The phases on every agent: Stage (gates open) in parallel within the stage timeout, then
/// Prepare (gates close) in parallel within the deadline, then Commit. Returns the Prepared
/// statuses (each shard's cut) once every agent accepted the Commit in one of `committed`
/// states. On error the caller aborts everywhere.
pub async fn barrier(
    ctx: &ClusterContext,
    backup: &BackupId,
    view: &Shared,
    request: impl Fn(&AgentLink) -> v1::PrepareRequest,
    committed: &[BarrierState],
) -> Result<Vec<v1::BarrierStatus>> {
    let barrier = &ctx.config.barrier;
    // Phase 0: every agent captures with its gate open and holds the capture until Prepare:
    // at most the stage timeout plus the Prepare deadline, with a lease of margin.
    let staging = Instant::now();
    let hold_ms = barrier.stage_timeout_ms + barrier.prepare_timeout_ms + barrier.lease_ms;
    let staged = fan_out(
        ctx,
        view,
        Step::Stage,
        BarrierState::Staged,
        staging + Step::Stage.timeout(barrier),
        &|agent| v1::PrepareRequest {
            lease_ms: hold_ms,
            ..request(agent)
        },
    )
    .await?;
    // An agent too old to know the filter drops it: its upload could name what a sweep
    // deletes. Checked before any gate closes.
    for (agent, status) in ctx.agents.iter().zip(&staged) {
        let sent = request(agent).condemned.map_or(0, |f| f.count);
        if status.condemned_objects != sent {
            return Err(Error::new(
                ErrorCode::BarrierAborted,
                format!(
                    "the agent of shard {} did not take the {sent} objects a GC sweep condemned (is it older than the coordinator?); upgrade it, or retry once the sweep ends",
                    agent.shard_id
                ),
            ));
        }
    }
    tracing::info!(barrier = %backup, staged_ms = staging.elapsed().as_millis() as u64, "every shard staged; closing the gates");

    // Phase 1: Prepare everywhere in parallel; the deadline runs from sending. Every gate
    // closes at the same instant, the close lead after sending (ARCHITECTURE.md).
    let sent = Instant::now();
    let close_at_unix_us = match barrier.close_lead_ms {
        0 => 0,
        lead => u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0) + lead * 1000,
    };
    let mut prepared = fan_out(
        ctx,
        view,
        Step::Prepare,
        BarrierState::Prepared,
        sent + Step::Prepare.timeout(barrier),
        &|agent| v1::PrepareRequest {
            close_at_unix_us,
            ..request(agent)
        },
    )
    .await?;
    tracing::info!(barrier = %backup, prepared_ms = sent.elapsed().as_millis() as u64, "every shard prepared; committing");

    fault_pause("before-commit", backup).await;
    if Instant::now() > sent + barrier.lease() {
        return Err(Error::new(
            ErrorCode::BarrierLeaseExpired,
            "the lease ran out before Commit could be sent",
        ));
    }

    // Phase 2: Commit everywhere; each agent reopens its gate (and uploads).
    update(view, |v| v.state = v1::JobState::Uploading);
    let commits = call_each(
        ctx.agents.iter(),
        Step::Commit,
        Instant::now() + Step::Commit.timeout(barrier),
        |_, mut client| {
            let request = v1::BarrierRequest {
                backup_id: backup.to_string(),
            };
            async move { client.commit(request).await }
        },
    )
    .await;
    for ((agent, reply), cut) in ctx.agents.iter().zip(commits).zip(prepared.iter_mut()) {
        let status = reply?;
        if !committed.contains(&status.state()) {
            return Err(status_error(&agent.shard_id, &status));
        }
        // The Commit reply carries the whole pause; Prepared only the pause so far.
        cut.gate_closed_us = status.gate_closed_us;
    }
    Ok(prepared)
}

/// The barrier, then the wait until every shard manifest is uploaded.
async fn barrier_and_upload(
    ctx: &ClusterContext,
    backup: &BackupId,
    cut: &Cut,
    view: &Shared,
) -> Result<()> {
    let lease_ms = ctx.config.barrier.lease_ms;
    barrier(
        ctx,
        backup,
        view,
        |agent| cut.prepare_request(backup, lease_ms, &agent.shard_id),
        &[BarrierState::Uploading, BarrierState::Uploaded],
    )
    .await?;

    // Wait for every upload, polling progress.
    let agents: Vec<&AgentLink> = ctx.agents.iter().collect();
    poll_until(
        &agents,
        Step::Status,
        &ctx.config.barrier,
        Instant::now() + ctx.config.barrier.upload_timeout(),
        Error::new(
            ErrorCode::BackupCreationFailed,
            "uploads did not finish within upload_timeout_ms",
        ),
        |_, mut client| {
            let request = v1::BarrierRequest {
                backup_id: backup.to_string(),
            };
            async move { client.status(request).await }
        },
        |replies| {
            let mut shards = Vec::new();
            let mut all_uploaded = true;
            for (agent, reply) in ctx.agents.iter().zip(replies) {
                match reply {
                    Ok(status) => {
                        match status.state() {
                            BarrierState::Uploaded => {}
                            BarrierState::Uploading => all_uploaded = false,
                            _ => return Err(status_error(&agent.shard_id, status)),
                        }
                        shards.push(ShardView::barrier(&agent.shard_id, status));
                    }
                    Err(err) => {
                        all_uploaded = false;
                        shards.push(ShardView::unreachable(&agent.shard_id, err));
                    }
                }
            }
            update(view, |v| v.shards = shards);
            Ok(if all_uploaded {
                Round::Done
            } else {
                Round::Continue
            })
        },
    )
    .await
}

/// The commit point: every shard manifest read back, then the backup manifest written.
async fn publish(
    ctx: &ClusterContext,
    backup: &BackupId,
    cut: &Cut,
    labels: &Labels,
    started_at: chrono::DateTime<Utc>,
) -> Result<()> {
    let mut manifests = Vec::with_capacity(ctx.agents.len());
    for agent in ctx.agents.iter() {
        manifests.push(ctx.repo.shard_manifest(&agent.shard_id, backup).await?);
    }
    fault_pause("before-publish", backup).await;
    let mut manifest = BackupManifest::commit(
        backup.clone(),
        cut.kind,
        cut.parent.as_ref().map(|(id, _)| id.clone()),
        started_at,
        &manifests,
    );
    manifest.raid_groups = ctx.config.raid_groups.clone();
    manifest.labels = labels.clone();
    ctx.fence.check(&format!("publish backup {backup}")).await?;
    let manifest = ctx.repo.commit_backup(manifest).await?;
    ctx.repo.delete_pending(backup).await?;
    let kind = cut.kind.to_string();
    metrics::counter!(names::BACKUP_BYTES, "kind" => kind)
        .increment(manifest.shards.iter().map(|s| s.bytes).sum());
    metrics::histogram!(names::BARRIER_WRITE_PAUSE)
        .record(manifest.max_gate_closed_us as f64 / 1e6);
    tracing::info!(backup = %backup, shards = manifests.len(), max_gate_closed_us = manifest.max_gate_closed_us, "backup committed");
    Ok(())
}

/// Deletes `backup` unless an incremental or differential backup continues it (a child
/// restores through its parent). Fails closed: a backup whose manifest cannot be read might
/// be a child, so nothing is deleted until it can be (or is deleted itself).
pub async fn delete(ctx: &ClusterContext, backup: &BackupId) -> Result<()> {
    // A child another writer committed without recording it in the catalog counts too.
    ctx.repo.reconciled_catalog().await?;
    let mut children = Vec::new();
    for (id, manifest) in ctx.repo.backups().await? {
        match manifest {
            Ok(manifest) if manifest.parent.as_ref() == Some(backup) => {
                children.push(id.to_string())
            }
            Ok(_) => {}
            Err(_) if &id == backup => {}
            Err(err) => {
                return Err(Error::new(
                    err.code,
                    format!(
                        "cannot tell whether backup {id} continues {backup}: its manifest is unreadable ({err}); nothing was deleted. Retry once it reads, or delete {id} first"
                    ),
                ));
            }
        }
    }
    if !children.is_empty() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "backup {backup} is the parent of {}; nothing was deleted: delete those first",
                children.join(", ")
            ),
        ));
    }
    ctx.fence.check(&format!("delete backup {backup}")).await?;
    ctx.repo
        .delete_backup(backup, &ctx.config.shard_ids())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> ShardId {
        ShardId::new("shard-1").expect("shard id")
    }

    #[test]
    fn an_aborted_or_expired_agent_names_its_own_code() {
        let aborted = v1::BarrierStatus {
            state: BarrierState::Aborted as i32,
            ..Default::default()
        };
        let err = status_error(&shard(), &aborted);
        assert_eq!(err.code, ErrorCode::BarrierAborted);
        assert!(err.message.contains("shard-1") && err.message.contains("aborted"));
        let expired = v1::BarrierStatus {
            state: BarrierState::Expired as i32,
            ..Default::default()
        };
        assert_eq!(
            status_error(&shard(), &expired).code,
            ErrorCode::BarrierLeaseExpired
        );
        // The agent's own code wins.
        let failed = v1::BarrierStatus {
            state: BarrierState::Failed as i32,
            error_code: "ERR_STORAGE_DISK_FULL".into(),
            error_message: "no space".into(),
            ..Default::default()
        };
        assert_eq!(
            status_error(&shard(), &failed).code,
            ErrorCode::StorageDiskFull
        );
    }
}
