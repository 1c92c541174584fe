//! The `Coordinator` gRPC service and `serve`, which runs it on an injected listener.
//!
//! Every domain error reaches the client through `lockstep_proto::to_status`, with its seed
//! code in the metadata.

use std::sync::Arc;

use lockstep_proto::tls::Security;
use lockstep_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use lockstep_proto::v1::wal_archive_server::WalArchiveServer;
use lockstep_proto::{to_status, v1};
use lockstep_repository::manifest::{BackupKind, BackupManifest, Labels, check_labels, has_labels};
use lockstep_repository::transfer::Progress;
use lockstep_repository::verify::{VerifyLevel, verify, verify_wal};
use lockstep_repository::{BackupId, Error, ErrorCode, Repository, Result, Seq, ShardId};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::backup::{JobView, clean_leftovers};
use crate::config::Config;
use crate::fence::Fence;
use crate::fleet::{AgentLink, Step, agent_links, call_each};
use crate::ops::{ClusterContext, ClusterOps, RestoreOrder};
use crate::restore::RestoreTarget;
use crate::schedule::{Schedule, Scheduler};

/// The handlers: they validate, then read the repository or hand the operation to
/// `ClusterOps` and await its reply (cancel-safe: dropping them cancels nothing).
struct CoordinatorApi {
    ctx: ClusterContext,
    ops: ClusterOps,
    /// Fires when the coordinator stops: a GC pass ends between two batches.
    stop: CancellationToken,
    schedules: Arc<Scheduler>,
    /// The catalog as the last first page of `ListBackups` read it.
    listing: std::sync::Mutex<Option<Listing>>,
}

type Reply<T> = std::result::Result<Response<T>, Status>;

/// What a verify request asks for, checked.
struct VerifyOrder {
    backups: Vec<BackupId>,
    level: VerifyLevel,
    sample_percent: u8,
    /// Leave out objects a full verify checked within this window.
    skip_verified_within: Option<chrono::Duration>,
    /// Verifying everything includes the WAL archive's continuity (the PITR window).
    with_wal: bool,
}

impl VerifyOrder {
    async fn read(ctx: &ClusterContext, request: v1::VerifyBackupRequest) -> Result<VerifyOrder> {
        let backups = if request.backup_id.is_empty() {
            ctx.repo.backup_ids().await?
        } else {
            vec![resolve_backup(&ctx.repo, &request.backup_id).await?]
        };
        if backups.is_empty() {
            return Err(Error::new(
                ErrorCode::BackupNotFound,
                "the repository holds no backup",
            ));
        }
        Ok(VerifyOrder {
            backups,
            level: if request.full {
                VerifyLevel::Full
            } else {
                VerifyLevel::Quick
            },
            sample_percent: match request.sample_percent {
                0 => 100,
                pct => u8::try_from(pct).unwrap_or(u8::MAX),
            },
            skip_verified_within: (request.skip_verified_within_hours > 0)
                .then(|| chrono::Duration::hours(i64::from(request.skip_verified_within_hours))),
            with_wal: request.backup_id.is_empty(),
        })
    }

    async fn run(
        &self,
        ctx: &ClusterContext,
        progress: &Progress,
    ) -> Result<v1::VerifyBackupReply> {
        let mut report = verify(
            &ctx.repo,
            &self.backups,
            self.level,
            self.sample_percent,
            self.skip_verified_within,
            8,
            progress,
        )
        .await?;
        if self.with_wal
            && let Some(url) = &ctx.config.wal_archive
        {
            let archive =
                lockstep_proto::archive::open_archive(url, &ctx.security, ctx.repo.seal()).await?;
            let reach_back = oldest_backup_points(&ctx.repo).await?;
            verify_wal(
                &mut report,
                &archive,
                &ctx.config.shard_ids(),
                self.level,
                &reach_back,
            )
            .await?;
        }
        let passed = if report.passed { 1.0 } else { 0.0 };
        metrics::gauge!(lockstep_process::metrics::VERIFY_LAST_STATUS).set(passed);
        Ok(v1::VerifyBackupReply {
            passed: report.passed,
            report: report.to_string(),
            report_json: serde_json::to_string(&report).unwrap_or_default(),
        })
    }
}

/// A verify of every backup and of the WAL archive, as `lockstep backup verify` does: quick,
/// or with `window` full, leaving out the objects a full verify checked within it; a failed
/// check is `ERR_BACKUP_VERIFICATION_FAILED` with the report.
pub async fn verify_everything(
    ctx: &ClusterContext,
    window: Option<chrono::Duration>,
) -> Result<()> {
    let request = v1::VerifyBackupRequest {
        full: window.is_some(),
        skip_verified_within_hours: window
            .map(|w| u32::try_from(w.num_hours()).unwrap_or(u32::MAX))
            .unwrap_or(0),
        ..Default::default()
    };
    let order = VerifyOrder::read(ctx, request).await?;
    let reply = order.run(ctx, &Progress::default()).await?;
    if reply.passed {
        return Ok(());
    }
    Err(Error::new(
        ErrorCode::BackupVerificationFailed,
        format!("verify found problems:\n{}", reply.report),
    ))
}

/// Where the WAL archive must reach back to on each shard's lineage: the oldest committed
/// backup's sequence number there.
async fn oldest_backup_points(
    repo: &Repository,
) -> Result<std::collections::HashMap<(ShardId, lockstep_repository::LineageId), Seq>> {
    let mut out = std::collections::HashMap::new();
    for (_, manifest) in repo.backups().await? {
        let Ok(manifest) = manifest else { continue };
        for shard in manifest.shards {
            let seq = out
                .entry((shard.shard_id, shard.lineage.id))
                .or_insert(shard.seq);
            *seq = (*seq).min(shard.seq);
        }
    }
    Ok(out)
}

/// One page of `listed` (oldest first): at most `size` (0: all) after the backup `token`
/// names, and the token of the next page if more follow.
fn page<T: Clone>(
    listed: &[T],
    size: u32,
    token: &str,
    id_of: impl Fn(&T) -> &str,
) -> Result<(Vec<T>, String)> {
    let start = if token.is_empty() {
        0
    } else {
        1 + listed
            .iter()
            .position(|b| id_of(b) == token)
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::InvalidArgument,
                    format!("page token {token:?} names no backup (removed since?); list again from the start"),
                )
            })?
    };
    let end = match size {
        0 => listed.len(),
        size => listed.len().min(start + size as usize),
    };
    let next = if end < listed.len() && end > start {
        id_of(&listed[end - 1]).to_string()
    } else {
        String::new()
    };
    Ok((listed[start..end].to_vec(), next))
}

/// The catalog the first page of a paged `backup list` read, kept for the pages after it:
/// they page one consistent listing.
struct Listing {
    at: std::time::Instant,
    backups: Arc<lockstep_repository::catalog::Catalog>,
}

/// How long a listing serves the pages after its first.
const LISTING_KEPT: std::time::Duration = std::time::Duration::from_secs(60);

/// How often a running verify reports its progress.
const VERIFY_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

fn status(err: Error) -> Status {
    to_status(&err)
}

/// What a restore request asks for: a backup, a sequence vector or a time (exactly one).
async fn point_in_time(
    repo: &Repository,
    request: &v1::RestoreClusterRequest,
) -> Result<crate::restore::PointInTime> {
    use crate::restore::PointInTime;
    let named = [
        !request.backup_id.is_empty(),
        !request.to_seq.is_empty(),
        !request.to_time.is_empty(),
        !request.tag.is_empty(),
        request.to_archive_end,
    ];
    if named.iter().filter(|n| **n).count() > 1 {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            "name one restore point: a backup, a tag, a sequence vector, a time or the archive's end",
        ));
    }
    if request.to_archive_end {
        return Ok(PointInTime::ArchiveEnd);
    }
    if !request.tag.is_empty() {
        return Ok(PointInTime::Tag(lockstep_repository::TagName::new(
            request.tag.as_str(),
        )?));
    }
    if !request.to_seq.is_empty() {
        let mut seqs = std::collections::BTreeMap::new();
        for (shard, seq) in &request.to_seq {
            seqs.insert(
                lockstep_repository::ShardId::new(shard.as_str())?,
                lockstep_repository::Seq(*seq),
            );
        }
        return Ok(PointInTime::Seqs(seqs));
    }
    if !request.to_time.is_empty() {
        let time = chrono::DateTime::parse_from_rfc3339(&request.to_time).map_err(|err| {
            Error::with_source(
                ErrorCode::InvalidArgument,
                format!(
                    "time {:?} is not RFC 3339 with an explicit offset (for example 2026-11-21T14:05:00+01:00 or ...Z)",
                    request.to_time
                ),
                err,
            )
        })?;
        return Ok(PointInTime::Time {
            time: time.with_timezone(&chrono::Utc),
            exact_per_shard: request.exact_per_shard,
        });
    }
    Ok(PointInTime::Backup(
        resolve_backup(repo, &request.backup_id).await?,
    ))
}

pub async fn resolve_backup(repo: &Repository, name: &str) -> Result<BackupId> {
    if name == "latest" || name.is_empty() {
        return repo.latest_backup().await;
    }
    BackupId::new(name)
}

fn backup_info(manifest: &BackupManifest) -> v1::BackupInfo {
    v1::BackupInfo {
        backup_id: manifest.backup_id.to_string(),
        kind: manifest.kind.to_string(),
        started_at: manifest.started_at.to_rfc3339(),
        completed_at: manifest.completed_at.to_rfc3339(),
        cut: manifest
            .cut
            .iter()
            .map(|(s, seq)| (s.to_string(), seq.0))
            .collect(),
        bytes_total: manifest.stats.bytes_total,
        bytes_uploaded: manifest.stats.stored_bytes_uploaded,
        max_gate_closed_us: manifest.max_gate_closed_us,
        n_shards: manifest.shards.len() as u32,
        parent: manifest
            .parent
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        error_code: String::new(),
        manifest_json: String::from_utf8_lossy(&manifest.to_json()).into_owned(),
        labels: manifest.labels.clone().into_iter().collect(),
    }
}

/// Labels off the wire, checked.
fn labels_from_wire(labels: Labels) -> Result<Labels> {
    check_labels(&labels)?;
    Ok(labels)
}

#[tonic::async_trait]
impl Coordinator for CoordinatorApi {
    type RestoreStream =
        tokio_stream::wrappers::ReceiverStream<std::result::Result<v1::RestoreJob, Status>>;

    async fn restore(
        &self,
        request: Request<v1::RestoreClusterRequest>,
    ) -> Reply<Self::RestoreStream> {
        let request = request.into_inner();
        let target = RestoreTarget::from_request(&request).map_err(status)?;
        let point = point_in_time(&self.ctx.repo, &request)
            .await
            .map_err(status)?;
        let wal_from = Some(request.wal_from.clone());
        if request.dry_run {
            // A plan only reads: it needs no hold on the cluster.
            let plan = crate::restore::plan(&self.ctx, point, target, wal_from)
                .await
                .map_err(status)?;
            let view = crate::restore::RestoreView {
                restore_id: None,
                backup_id: plan.label.clone(),
                phase: v1::RestorePhase::Done,
                shards: Vec::new(),
                error: None,
                plan: plan.to_wire(),
                note: plan.note.clone(),
                estimated_ms: plan.estimated_ms(),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx.send(Ok(view.to_wire())).await;
            return Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
                rx,
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let order = RestoreOrder {
            point,
            target,
            wal_from,
        };
        self.ops.restore(order, tx).await.map_err(status)?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn create_backup(
        &self,
        request: Request<v1::CreateBackupRequest>,
    ) -> Reply<v1::BackupJob> {
        let request = request.into_inner();
        let kind: BackupKind = if request.kind.is_empty() {
            BackupKind::Full
        } else {
            request.kind.parse().map_err(status)?
        };
        let labels = labels_from_wire(request.labels).map_err(status)?;
        let job = self.ops.backup(kind, labels).await.map_err(status)?;
        Ok(Response::new(job.to_wire()))
    }

    async fn get_backup_job(
        &self,
        request: Request<v1::GetBackupJobRequest>,
    ) -> Reply<v1::BackupJob> {
        let backup = BackupId::new(request.into_inner().backup_id).map_err(status)?;
        if let Some(job) = self.ops.job(backup.clone()).await.map_err(status)? {
            return Ok(Response::new(job.to_wire()));
        }
        // Not remembered (e.g. the coordinator restarted): the repository decides.
        if !self.ctx.repo.backup_exists(&backup).await.map_err(status)? {
            return Err(status(Error::new(
                ErrorCode::BackupNotFound,
                format!("no backup or job {backup}"),
            )));
        }
        let mut job = JobView::new(backup);
        job.state = v1::JobState::Committed;
        Ok(Response::new(job.to_wire()))
    }

    async fn list_backups(
        &self,
        request: Request<v1::ListBackupsRequest>,
    ) -> Reply<v1::ListBackupsReply> {
        let request = request.into_inner();
        let wanted = labels_from_wire(request.labels).map_err(status)?;
        // The first page reads the catalog; the pages after it, soon after, page that read.
        let kept = (!request.page_token.is_empty())
            .then(|| {
                let listing = self.listing.lock().unwrap_or_else(|p| p.into_inner());
                listing
                    .as_ref()
                    .filter(|l| l.at.elapsed() < LISTING_KEPT)
                    .map(|l| l.backups.clone())
            })
            .flatten();
        let catalog = match kept {
            Some(catalog) => catalog,
            None => {
                let catalog = self.ctx.repo.catalog().await.map_err(status)?;
                *self.listing.lock().unwrap_or_else(|p| p.into_inner()) = Some(Listing {
                    at: std::time::Instant::now(),
                    backups: catalog.clone(),
                });
                catalog
            }
        };
        // Unreadable ones first: listed unless a filter asks for labels they cannot show.
        let damaged = catalog
            .damaged()
            .iter()
            .filter(|_| wanted.is_empty())
            .map(|d| (&d.backup_id, Err(d.code)));
        let indexed = catalog
            .backups()
            .iter()
            .filter(|manifest| has_labels(&manifest.labels, &wanted))
            .map(|manifest| (&manifest.backup_id, Ok(manifest)));
        let backups: Vec<(
            &BackupId,
            std::result::Result<&Arc<BackupManifest>, ErrorCode>,
        )> = damaged.chain(indexed).collect();
        // Only the page is turned into replies.
        let (backups, next_page_token) = page(
            &backups,
            request.page_size,
            &request.page_token,
            |(id, _)| id.as_str(),
        )
        .map_err(status)?;
        let backups = backups
            .into_iter()
            .map(|(id, manifest)| match manifest {
                Ok(manifest) => backup_info(manifest),
                Err(code) => v1::BackupInfo {
                    backup_id: id.to_string(),
                    error_code: code.as_str().to_string(),
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(v1::ListBackupsReply {
            backups,
            next_page_token,
        }))
    }

    async fn get_backup(&self, request: Request<v1::GetBackupRequest>) -> Reply<v1::BackupInfo> {
        let backup = resolve_backup(&self.ctx.repo, &request.into_inner().backup_id)
            .await
            .map_err(status)?;
        let manifest = self
            .ctx
            .repo
            .backup_manifest(&backup)
            .await
            .map_err(status)?;
        Ok(Response::new(backup_info(&manifest)))
    }

    async fn verify_backup(
        &self,
        request: Request<v1::VerifyBackupRequest>,
    ) -> Reply<v1::VerifyBackupReply> {
        let order = VerifyOrder::read(&self.ctx, request.into_inner())
            .await
            .map_err(status)?;
        let reply = order
            .run(&self.ctx, &Progress::default())
            .await
            .map_err(status)?;
        Ok(Response::new(reply))
    }

    type VerifyBackupStreamStream =
        tokio_stream::wrappers::ReceiverStream<std::result::Result<v1::VerifyProgress, Status>>;

    async fn verify_backup_stream(
        &self,
        request: Request<v1::VerifyBackupRequest>,
    ) -> Reply<Self::VerifyBackupStreamStream> {
        let order = VerifyOrder::read(&self.ctx, request.into_inner())
            .await
            .map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let progress = Arc::new(Progress::default());
            let checking = order.run(&ctx, &progress);
            tokio::pin!(checking);
            let mut every = tokio::time::interval(VERIFY_PROGRESS_EVERY);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut checking => break outcome,
                    _ = every.tick() => {
                        let (bytes_done, bytes_total) = progress.snapshot();
                        let update = v1::VerifyProgress { bytes_done, bytes_total, report: None };
                        if tx.send(Ok(update)).await.is_err() {
                            // The client went away: nobody reads the report, stop checking.
                            return;
                        }
                    }
                }
            };
            let (bytes_done, bytes_total) = progress.snapshot();
            let last = outcome.map_err(status).map(|report| v1::VerifyProgress {
                bytes_done,
                bytes_total,
                report: Some(report),
            });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type ExportBackupStream =
        tokio_stream::wrappers::ReceiverStream<std::result::Result<v1::ExportChunk, Status>>;

    async fn export_backup(
        &self,
        request: Request<v1::ExportBackupRequest>,
    ) -> Reply<Self::ExportBackupStream> {
        let export = crate::export::Export::plan(&self.ctx, &request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            export.stream(&self.ctx),
        )))
    }

    async fn import_backup(
        &self,
        request: Request<tonic::Streaming<v1::ImportChunk>>,
    ) -> Reply<v1::ImportReply> {
        let staged = crate::export::receive(&self.ctx, request.into_inner())
            .await
            .map_err(status)?;
        let report = self.ops.import(staged).await.map_err(status)?;
        let names = |ids: &[BackupId]| ids.iter().map(|id| id.to_string()).collect();
        Ok(Response::new(v1::ImportReply {
            backup_ids: names(&report.backups),
            already_present: names(&report.already_present),
            tag: report.tag.map(|t| t.to_string()).unwrap_or_default(),
            objects: report.objects,
            stored_bytes: report.stored_bytes,
            wal_segments: report.wal_segments,
        }))
    }

    async fn delete_backup(
        &self,
        request: Request<v1::DeleteBackupRequest>,
    ) -> Reply<v1::DeleteBackupReply> {
        let backup = BackupId::new(request.into_inner().backup_id).map_err(status)?;
        self.ops.delete(backup).await.map_err(status)?;
        Ok(Response::new(v1::DeleteBackupReply {}))
    }

    async fn apply_retention(
        &self,
        request: Request<v1::ApplyRetentionRequest>,
    ) -> Reply<v1::RetentionPlan> {
        let dry_run = request.into_inner().dry_run;
        let plan = self.ops.retention(dry_run).await.map_err(status)?;
        Ok(Response::new(v1::RetentionPlan {
            items: plan
                .items
                .into_iter()
                .map(|item| v1::RetentionItem {
                    what: item.what.to_string(),
                    name: item.name,
                    remove: item.remove,
                    reasons: item.reasons,
                })
                .collect(),
            wal: plan.wal,
            applied: !dry_run,
        }))
    }

    async fn collect_garbage(
        &self,
        request: Request<v1::CollectGarbageRequest>,
    ) -> Reply<v1::GarbageReport> {
        let dry_run = request.into_inner().dry_run;
        // Runs to its end even if the client goes away (a pass dropped halfway is safe, but
        // wasted).
        let (ctx, stop) = (self.ctx.clone(), self.stop.clone());
        let report = tokio::spawn(async move { crate::gc::collect(&ctx, dry_run, &stop).await })
            .await
            .map_err(|err| Status::internal(format!("GC pass failed: {err}")))?
            .map_err(status)?;
        Ok(Response::new(report))
    }

    async fn list_schedules(
        &self,
        _request: Request<v1::ListSchedulesRequest>,
    ) -> Reply<v1::ListSchedulesReply> {
        Ok(Response::new(v1::ListSchedulesReply {
            schedules: self.schedules.list(),
        }))
    }

    async fn abort_restore(
        &self,
        _request: Request<v1::AbortRestoreRequest>,
    ) -> Reply<v1::AbortRestoreReply> {
        let (message, settled) = self.ops.abort_restore().await.map_err(status)?;
        Ok(Response::new(v1::AbortRestoreReply {
            message,
            settled: settled.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn create_tag(&self, request: Request<v1::CreateTagRequest>) -> Reply<v1::TagInfo> {
        let request = request.into_inner();
        let name = lockstep_repository::TagName::new(request.name).map_err(status)?;
        let labels = labels_from_wire(request.labels).map_err(status)?;
        let tag = self.ops.tag(name, labels).await.map_err(status)?;
        Ok(Response::new(crate::tag::tag_info(&tag)))
    }

    async fn list_tags(&self, request: Request<v1::ListTagsRequest>) -> Reply<v1::ListTagsReply> {
        let wanted = labels_from_wire(request.into_inner().labels).map_err(status)?;
        let mut tags: Vec<v1::TagInfo> = self
            .ctx
            .repo
            .tags()
            .await
            .map_err(status)?
            .into_iter()
            .filter_map(|(name, tag)| match tag {
                Ok(tag) => has_labels(&tag.labels, &wanted).then(|| crate::tag::tag_info(&tag)),
                Err(err) => wanted.is_empty().then(|| v1::TagInfo {
                    name: name.to_string(),
                    error_code: err.code.as_str().to_string(),
                    ..Default::default()
                }),
            })
            .collect();
        tags.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(Response::new(v1::ListTagsReply { tags }))
    }

    async fn cluster_status(
        &self,
        _request: Request<v1::ClusterStatusRequest>,
    ) -> Reply<v1::ClusterStatusReply> {
        let agents = &self.ctx.agents;
        let deadline = Instant::now() + Step::Describe.timeout(&self.ctx.config.barrier);
        let replies = call_each(
            agents.iter(),
            Step::Describe,
            deadline,
            |_, mut client| async move { client.describe(v1::DescribeRequest {}).await },
        )
        .await;
        let mut rows = Vec::new();
        for (agent, reply) in agents.iter().zip(replies) {
            let (raid_group, role) = self
                .ctx
                .config
                .group_of(&agent.shard_id)
                .unwrap_or_default();
            let mut row = v1::AgentStatus {
                shard_id: agent.shard_id.to_string(),
                endpoint: agent.endpoint.clone(),
                raid_group,
                role,
                ..Default::default()
            };
            match reply {
                Ok(info) => {
                    row.reachable = true;
                    row.seq = info.seq;
                    row.gate_closed = info.gate_closed;
                    if info.shard_id != agent.shard_id.as_str() {
                        row.error = format!(
                            "agent serves shard {}, configured as {}",
                            info.shard_id, agent.shard_id
                        );
                    }
                }
                Err(err) => row.error = err.message,
            }
            rows.push(row);
        }
        let running = self.ops.running().await.map_err(status)?;
        Ok(Response::new(v1::ClusterStatusReply {
            agents: rows,
            repository: self.ctx.repo.url().to_string(),
            running_backup_id: running
                .and_then(|r| r.backup)
                .map(|b| b.to_string())
                .unwrap_or_default(),
        }))
    }

    async fn set_limits(&self, request: Request<v1::SetLimitsRequest>) -> Reply<v1::ClusterLimits> {
        let request = request.into_inner();
        // Refused here, not by every agent: the operator gets one clear error.
        lockstep_repository::bandwidth::Limits::default()
            .changed(&lockstep_proto::wire::limits_change_from_wire(&request))
            .map_err(status)?;
        let agents = &self.ctx.agents;
        let deadline = Instant::now() + Step::SetLimits.timeout(&self.ctx.config.barrier);
        let replies = call_each(
            agents.iter(),
            Step::SetLimits,
            deadline,
            |_, mut client| async move { client.set_limits(request).await },
        )
        .await;
        let agents = agents
            .iter()
            .zip(replies)
            .map(|(agent, reply)| match reply {
                Ok(limits) if limits.shard_id == agent.shard_id.as_str() => limits,
                Ok(limits) => v1::AgentLimits {
                    error_code: ErrorCode::AgentUnavailable.as_str().to_string(),
                    error_message: format!(
                        "agent serves shard {}, configured as {}",
                        limits.shard_id, agent.shard_id
                    ),
                    ..limits
                },
                Err(err) => v1::AgentLimits {
                    shard_id: agent.shard_id.to_string(),
                    error_code: err.code.as_str().to_string(),
                    error_message: err.chain(),
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(v1::ClusterLimits { agents }))
    }

    async fn wal_status(
        &self,
        _request: Request<v1::WalStatusRequest>,
    ) -> Reply<v1::ClusterWalStatus> {
        let agents = &self.ctx.agents;
        let deadline = Instant::now() + Step::WalStatus.timeout(&self.ctx.config.barrier);
        let replies = call_each(
            agents.iter(),
            Step::WalStatus,
            deadline,
            |_, mut client| async move { client.wal_status(v1::WalStatusRequest {}).await },
        )
        .await;
        let mut out = v1::ClusterWalStatus::default();
        for (agent, reply) in agents.iter().zip(replies) {
            let error = match reply {
                Ok(status) => {
                    out.shards.push(status);
                    continue;
                }
                Err(err) => err.message,
            };
            out.unreachable.push(v1::AgentStatus {
                shard_id: agent.shard_id.to_string(),
                endpoint: agent.endpoint.clone(),
                error,
                ..Default::default()
            });
        }
        Ok(Response::new(out))
    }
}

/// Runs the coordinator on `listener` until `shutdown` fires. Leftovers of backups that an
/// earlier coordinator left uncommitted are cleaned first; `on_ready` runs after that, just
/// before requests are served.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(),
) -> Result<()> {
    let security = config.security()?;
    let agents = agent_links(&config, &security)?;
    security.reload_on_hangup(shutdown.clone());
    let incoming = lockstep_proto::tls::incoming(listener, &security);
    serve_incoming(config, agents, security, incoming, shutdown, on_ready).await
}

/// How often the coordinator asks every agent whether it is up, for `lockstep_agent_up`.
const AGENT_POLL_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// Sets `lockstep_agent_up{shard}` from a Describe of every agent, every
/// [`AGENT_POLL_EVERY`], until `stop`.
async fn poll_agents_up(ctx: &ClusterContext, stop: CancellationToken) {
    loop {
        let deadline = tokio::time::Instant::now() + Step::Describe.timeout(&ctx.config.barrier);
        let replies = call_each(
            ctx.agents.iter(),
            Step::Describe,
            deadline,
            |_, mut client| async move { client.describe(v1::DescribeRequest {}).await },
        )
        .await;
        for (agent, reply) in ctx.agents.iter().zip(replies) {
            let up = reply.is_ok_and(|info| info.shard_id == agent.shard_id.as_str());
            metrics::gauge!(lockstep_process::metrics::AGENT_UP, "shard" => agent.shard_id.to_string())
                .set(if up { 1.0 } else { 0.0 });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(AGENT_POLL_EVERY) => {}
        }
    }
}

/// `serve` on any stream of connections, reaching the agents through `agents` (TCP channels,
/// or the simulated network of the simulations).
pub async fn serve_incoming<I, IO, IE>(
    config: Config,
    agents: Vec<AgentLink>,
    security: Security,
    incoming: I,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(),
) -> Result<()>
where
    I: futures::Stream<Item = std::result::Result<IO, IE>>,
    IO: lockstep_proto::Connection,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let config = Arc::new(config);
    let repo = Repository::open(&config.repository).await?;
    let identity = repo.claim(&config.cluster).await?;
    tracing::info!(cluster = %identity.cluster, repository_id = %identity.repository_id, "repository identity checked");
    let fence = Arc::new(Fence::take(&repo).await?);
    // The last GC pass survives a restart in the repository: the stale-GC alert still fires.
    if let Ok(Some(at)) = repo.gc_last_pass().await {
        metrics::gauge!(lockstep_process::metrics::GC_LAST_SUCCESS).set(at.timestamp() as f64);
    }
    let ctx = ClusterContext {
        config: config.clone(),
        repo: repo.clone(),
        agents: agents.into(),
        fence: fence.clone(),
        sweep: Default::default(),
        restores_to_settle: Default::default(),
        security: security.clone(),
    };
    // Restores first: their agents' leases run while backups' leftovers are waited for.
    // Neither stops the coordinator from serving (its WAL archive service included): what
    // is left is tried again at the next start, or by `lockstep restore --abort`.
    let left = match crate::restore::settle_interrupted(&ctx).await {
        Ok(done) => !done.unsettled.is_empty(),
        Err(err) => {
            tracing::error!(error = %err.chain(), "could not settle the restores a stopped coordinator left; serving anyway, the next operation tries again");
            true
        }
    };
    ctx.restores_to_settle
        .store(left, std::sync::atomic::Ordering::SeqCst);
    match clean_leftovers(&ctx).await {
        Ok(cleaned) if !cleaned.is_empty() => {
            tracing::warn!(backups = ?cleaned, "cleaned leftovers of uncommitted backups")
        }
        Ok(_) => {}
        Err(err) => {
            tracing::error!(error = %err.chain(), "could not remove the leftovers of uncommitted backups; serving anyway, the next start tries again")
        }
    }
    let mut tasks = JoinSet::new();
    // Staging files of writers that crashed mid-write (a local repository only).
    let sweeping = repo.clone();
    tasks.spawn(async move {
        match sweeping
            .remove_staging_leftovers(std::time::Duration::from_secs(3600))
            .await
        {
            Ok((0, _)) => {}
            Ok((files, bytes)) => tracing::warn!(files, bytes, "removed staging files that crashed writers left"),
            Err(err) => tracing::warn!(error = %err.chain(), "could not remove staging files crashed writers left"),
        }
    });
    let watching = shutdown.child_token();
    tasks.spawn(async move { fence.watch(watching).await });
    if config.metrics_listen.is_some() && !ctx.agents.is_empty() {
        let (polled, stop) = (ctx.clone(), shutdown.child_token());
        tasks.spawn(async move {
            crate::backup::seed_metrics(&polled).await;
            poll_agents_up(&polled, stop).await
        });
    }
    let ops = ClusterOps::spawn(ctx.clone(), shutdown.child_token(), &mut tasks);
    let schedules = config
        .schedules
        .iter()
        .map(Schedule::parse)
        .collect::<Result<Vec<_>>>()?;
    let schedules = Arc::new(Scheduler::new(
        schedules,
        repo.clone(),
        ctx.fence.clone(),
        Arc::new(chrono::Utc::now),
        crate::schedule::cluster_runner(ctx.clone(), ops.clone(), shutdown.child_token()),
    ));
    tasks.spawn(schedules.clone().run(shutdown.child_token()));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorApi>>()
        .await;
    let (reflection_v1, reflection_v1alpha) =
        lockstep_proto::reflection_services().map_err(|err| {
            Error::with_source(ErrorCode::InvalidArgument, "build gRPC reflection", err)
        })?;
    let archive_repo = repo.clone();
    let api = CoordinatorApi {
        ctx,
        ops,
        stop: shutdown.child_token(),
        schedules,
        listing: Default::default(),
    };
    on_ready();
    let result = lockstep_proto::server(&security)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CoordinatorServer::new(api))
        .add_service(
            WalArchiveServer::new(crate::archive::WalArchiveApi::new(archive_repo))
                .max_decoding_message_size(lockstep_proto::archive::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(lockstep_proto::archive::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    result.map_err(|err| Error::with_source(ErrorCode::StorageUnavailable, "serve gRPC", err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(n: usize) -> Vec<v1::BackupInfo> {
        (0..n)
            .map(|i| v1::BackupInfo {
                backup_id: format!("bk-{i}"),
                ..Default::default()
            })
            .collect()
    }

    fn ids(page: &[v1::BackupInfo]) -> Vec<&str> {
        page.iter().map(|b| b.backup_id.as_str()).collect()
    }

    #[test]
    fn backups_page_after_the_token_until_none_follow() -> Result<()> {
        let (first, token) = page(&listed(5), 2, "", |b| b.backup_id.as_str())?;
        assert_eq!(
            (ids(&first), token.as_str()),
            (vec!["bk-0", "bk-1"], "bk-1")
        );
        let (second, token) = page(&listed(5), 2, &token, |b| b.backup_id.as_str())?;
        assert_eq!(
            (ids(&second), token.as_str()),
            (vec!["bk-2", "bk-3"], "bk-3")
        );
        let (last, token) = page(&listed(5), 2, &token, |b| b.backup_id.as_str())?;
        assert_eq!((ids(&last), token.as_str()), (vec!["bk-4"], ""));
        let (all, token) = page(&listed(5), 0, "", |b| b.backup_id.as_str())?;
        assert_eq!((all.len(), token.as_str()), (5, ""));
        let (exact, token) = page(&listed(4), 2, "bk-1", |b| b.backup_id.as_str())?;
        assert_eq!((ids(&exact), token.as_str()), (vec!["bk-2", "bk-3"], ""));
        let gone = page(&listed(5), 2, "bk-9", |b| b.backup_id.as_str())
            .expect_err("a token of no backup");
        assert_eq!(gone.code, ErrorCode::InvalidArgument);
        Ok(())
    }
}
