//! Backup jobs: the two-phase barrier across every agent, then the uploads, then the commit.
//!
//! `JobsHandle` is the cloneable handle on the jobs actor, which runs at most one barrier at a
//! time: a `create` while a backup or a restore holds the cluster (`ClusterLock`) is refused
//! with `ERR_BARRIER_BUSY`, naming what runs (queueing would let requests pile up behind a
//! stuck cluster unseen).
//! Finished jobs are remembered so clients can poll their outcome.
//!
//! Architecture invariant: the backup manifest is written only after every agent of the
//! topology reported its shard manifest durable; a backup with any shard missing, data or
//! parity, is never committed, and its leftovers are removed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use lockstep_proto::from_status;
use lockstep_proto::v1::agent_client::AgentClient;
use lockstep_proto::v1::{self, BarrierState};
use lockstep_repository::manifest::{BackupKind, BackupManifest};
use lockstep_repository::{BackupId, Error, ErrorCode, Repository, Result, Seq, ShardId, Timeline};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::Config;

/// How many finished jobs the coordinator remembers.
const REMEMBERED: usize = 100;

/// Environment variable for fault tests that kill a process inside a backup:
/// `before-commit:MS` pauses between the last Prepared and Commit, `before-publish:MS`
/// between the last upload and the backup manifest. Never set in production.
pub const FAULT_PAUSE: &str = "LOCKSTEP_FAULT_PAUSE";

/// Waits at `point` if the fault-injection variable names it.
async fn fault_pause(point: &str, backup: &BackupId) {
    let Ok(spec) = std::env::var(FAULT_PAUSE) else {
        return;
    };
    let Some((name, ms)) = spec.split_once(':') else {
        return;
    };
    let Ok(ms) = ms.parse::<u64>() else { return };
    if name == point {
        tracing::warn!(backup = %backup, point, pause_ms = ms, "fault injection: pausing");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Preparing,
    Uploading,
    Committed,
    Failed,
}

/// One shard's part of a job, as last reported.
#[derive(Debug, Clone)]
pub struct ShardView {
    pub shard_id: ShardId,
    pub state: String,
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
            state: self.state.clone(),
            seq: self.seq,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            gate_closed_us: self.gate_closed_us,
            error_code,
            error_message,
        }
    }
}

/// A job as clients see it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub backup_id: BackupId,
    pub state: JobState,
    pub shards: Vec<ShardView>,
    /// The code and message of a failed job.
    pub error: Option<(ErrorCode, String)>,
}

impl JobView {
    fn error_pair(&self) -> Option<(String, String)> {
        self.error
            .as_ref()
            .map(|(code, message)| (code.as_str().to_string(), message.clone()))
    }

    pub fn to_wire(&self) -> v1::BackupJob {
        let (error_code, error_message) = self.error_pair().unwrap_or_default();
        v1::BackupJob {
            backup_id: self.backup_id.to_string(),
            state: match self.state {
                JobState::Preparing => v1::JobState::Preparing,
                JobState::Uploading => v1::JobState::Uploading,
                JobState::Committed => v1::JobState::Committed,
                JobState::Failed => v1::JobState::Failed,
            } as i32,
            shards: self.shards.iter().map(ShardView::to_wire).collect(),
            error_code,
            error_message,
        }
    }
}

/// One agent as the coordinator reaches it.
#[derive(Clone)]
pub struct AgentLink {
    pub shard_id: ShardId,
    pub endpoint: String,
    pub client: AgentClient<Channel>,
}

/// Builds lazily-connecting clients for every agent of the configuration.
pub fn agent_links(config: &Config) -> Result<Vec<AgentLink>> {
    config
        .agents
        .iter()
        .map(|agent| {
            let endpoint = lockstep_proto::long_lived(
                tonic::transport::Endpoint::from_shared(agent.endpoint.clone()).map_err(|err| {
                    Error::with_source(
                        ErrorCode::InvalidArgument,
                        format!("agent endpoint {}", agent.endpoint),
                        err,
                    )
                })?,
            );
            Ok(AgentLink {
                shard_id: agent.shard.clone(),
                endpoint: agent.endpoint.clone(),
                client: AgentClient::new(endpoint.connect_lazy()),
            })
        })
        .collect()
}

/// What a job needs from the coordinator.
#[derive(Clone)]
pub struct JobContext {
    pub config: Arc<Config>,
    pub repo: Repository,
    pub agents: Vec<AgentLink>,
    pub cluster: Arc<ClusterLock>,
}

impl JobContext {
    /// Refuses `what` on a coordinator with no agents (one that only serves a WAL archive).
    pub fn require_agents(&self, what: &str) -> Result<()> {
        if self.agents.is_empty() {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "cannot {what}: this coordinator has no [[agents]] (it only serves its repository as a WAL archive); list the cluster's agents in its configuration"
                ),
            ));
        }
        Ok(())
    }
}

/// The cluster is held by at most one barrier or restore at a time; the holder is named in
/// the refusal so the operator knows what to wait for.
#[derive(Debug, Default)]
pub struct ClusterLock {
    holder: Mutex<Option<String>>,
}

/// Holding the cluster; dropping it lets the next backup or restore in.
#[derive(Debug)]
pub struct ClusterGuard {
    lock: Arc<ClusterLock>,
}

impl ClusterLock {
    /// Holds the cluster for `what` (for example "backup bk-..."), or names who holds it.
    pub fn try_hold(self: &Arc<Self>, what: String) -> Result<ClusterGuard> {
        let mut holder = self.holder.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(busy) = holder.as_ref() {
            return Err(Error::new(
                ErrorCode::BarrierBusy,
                format!("{busy} is running; only one backup or restore runs at a time"),
            ));
        }
        *holder = Some(what);
        Ok(ClusterGuard { lock: self.clone() })
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        *self.lock.holder.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// What a backup's barrier takes from every shard, and what the backup continues from.
#[derive(Debug, Clone)]
pub struct Cut {
    pub kind: BackupKind,
    /// Incremental and differential backups: the backup they continue from, with each
    /// shard's sequence number and timeline there.
    pub parent: Option<(BackupId, ParentPoints)>,
}

/// Each shard's sequence number and timeline in a parent backup.
pub type ParentPoints = BTreeMap<ShardId, (Seq, Timeline)>;

impl Cut {
    /// A full backup continues from nothing; an incremental from the latest backup of any
    /// kind; a differential from the latest full backup. A parent that lacks a shard of the
    /// topology cannot be continued: take a full backup.
    pub async fn for_kind(ctx: &JobContext, kind: BackupKind) -> Result<Cut> {
        if kind == BackupKind::Full {
            return Ok(Cut { kind, parent: None });
        }
        let backups = ctx.repo.backups().await?;
        let parent = backups
            .into_iter()
            .rev()
            .filter_map(|(_, manifest)| manifest.ok())
            .find(|m| kind == BackupKind::Incremental || m.kind == BackupKind::Full)
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
            points.insert(shard, (manifest.seq, manifest.timeline));
        }
        Ok(Cut {
            kind,
            parent: Some((parent.backup_id, points)),
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
            ..Default::default()
        };
        if let Some((_, points)) = &self.parent
            && let Some((seq, timeline)) = points.get(shard)
        {
            request.capture = v1::CaptureMode::Wal as i32;
            request.wal_after_seq = seq.0;
            request.wal_timeline = timeline.0;
        }
        request
    }
}

enum Msg {
    /// Start a backup unless one is running.
    Create {
        kind: BackupKind,
        reply: oneshot::Sender<Result<JobView>>,
    },
    /// The running or a remembered job.
    Get {
        backup: BackupId,
        reply: oneshot::Sender<Option<JobView>>,
    },
    /// The running job's id, if any.
    Running {
        reply: oneshot::Sender<Option<BackupId>>,
    },
}

/// Cloneable handle on the jobs actor.
#[derive(Clone)]
pub struct JobsHandle {
    tx: mpsc::Sender<Msg>,
}

fn stopped() -> Error {
    Error::new(
        ErrorCode::BackupCreationFailed,
        "the coordinator is shutting down",
    )
}

impl JobsHandle {
    pub fn spawn(
        ctx: JobContext,
        cancel: CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> JobsHandle {
        let (tx, rx) = mpsc::channel(32);
        tasks.spawn(run(ctx, rx, cancel));
        JobsHandle { tx }
    }

    pub async fn create(&self, kind: BackupKind) -> Result<JobView> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Create { kind, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub async fn get(&self, backup: BackupId) -> Result<Option<JobView>> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Get { backup, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    pub async fn running(&self) -> Result<Option<BackupId>> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Running { reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }
}

pub(crate) type Shared = Arc<Mutex<JobView>>;

fn read(view: &Shared) -> JobView {
    view.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn update(view: &Shared, f: impl FnOnce(&mut JobView)) {
    f(&mut view.lock().unwrap_or_else(|p| p.into_inner()));
}

async fn run(ctx: JobContext, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
    // The running job, with its hold on the cluster: released here, after the job is
    // recorded as finished, so a new job never overwrites a running view.
    let mut running: Option<(Shared, ClusterGuard)> = None;
    let mut finished: HashMap<BackupId, JobView> = HashMap::new();
    let mut order: VecDeque<BackupId> = VecDeque::new();
    let mut jobs: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            // Fixed polling order: the simulations replay a seed exactly.
            biased;
            _ = cancel.cancelled() => break,
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {
                if let Some((view, _guard)) = running.take() {
                    let view = read(&view);
                    order.push_back(view.backup_id.clone());
                    finished.insert(view.backup_id.clone(), view);
                    while order.len() > REMEMBERED {
                        if let Some(old) = order.pop_front() {
                            finished.remove(&old);
                        }
                    }
                }
            }
            msg = rx.recv() => match msg {
                None => break,
                Some(Msg::Create { kind, reply }) => {
                    if let Err(err) = ctx.require_agents("take a backup") {
                        let _ = reply.send(Err(err));
                        continue;
                    }
                    let backup_id = BackupId::generate();
                    let guard = match ctx.cluster.try_hold(format!("backup {backup_id}")) {
                        Ok(guard) => guard,
                        Err(err) => {
                            let _ = reply.send(Err(err));
                            continue;
                        }
                    };
                    // The parent is picked while the cluster is held: no delete in between.
                    let cut = match Cut::for_kind(&ctx, kind).await {
                        Ok(cut) => cut,
                        Err(err) => {
                            let _ = reply.send(Err(err));
                            continue;
                        }
                    };
                    let view: Shared = Arc::new(Mutex::new(JobView {
                        backup_id: backup_id.clone(),
                        state: JobState::Preparing,
                        shards: Vec::new(),
                        error: None,
                    }));
                    let _ = reply.send(Ok(read(&view)));
                    running = Some((view.clone(), guard));
                    let ctx = ctx.clone();
                    jobs.spawn(async move {
                        let outcome = run_backup(&ctx, &backup_id, &cut, &view).await;
                        update(&view, |v| match outcome {
                            Ok(()) => v.state = JobState::Committed,
                            Err(err) => {
                                tracing::error!(backup = %backup_id, error = %err.chain(), "backup failed");
                                v.state = JobState::Failed;
                                v.error = Some((err.code, err.chain()));
                            }
                        });
                    });
                }
                Some(Msg::Get { backup, reply }) => {
                    let view = running
                        .as_ref()
                        .map(|(view, _)| read(view))
                        .filter(|v| v.backup_id == backup)
                        .or_else(|| finished.get(&backup).cloned());
                    let _ = reply.send(view);
                }
                Some(Msg::Running { reply }) => {
                    let _ = reply.send(running.as_ref().map(|(v, _)| read(v).backup_id));
                }
            },
        }
    }
    // Dropping an unfinished job leaves a pending marker; the next start cleans it up.
    jobs.abort_all();
}

fn shard_view(shard_id: &ShardId, status: &v1::BarrierStatus) -> ShardView {
    let state = BarrierState::try_from(status.state).unwrap_or(BarrierState::Unspecified);
    ShardView {
        shard_id: shard_id.clone(),
        state: state
            .as_str_name()
            .trim_start_matches("BARRIER_STATE_")
            .to_ascii_lowercase(),
        seq: status.seq,
        bytes_done: status.bytes_done,
        bytes_total: status.bytes_total,
        gate_closed_us: status.gate_closed_us,
        error: (!status.error_code.is_empty())
            .then(|| (status.error_code.clone(), status.error_message.clone())),
    }
}

fn failed_view(shard_id: &ShardId, err: &Error) -> ShardView {
    ShardView {
        shard_id: shard_id.clone(),
        state: "unreachable".into(),
        seq: 0,
        bytes_done: 0,
        bytes_total: 0,
        gate_closed_us: 0,
        error: Some((err.code.as_str().to_string(), err.chain())),
    }
}

/// The agent's own error for a non-Prepared reply.
fn status_error(shard: &ShardId, status: &v1::BarrierStatus) -> Error {
    let state = BarrierState::try_from(status.state).unwrap_or(BarrierState::Unspecified);
    let code = ErrorCode::parse(&status.error_code).unwrap_or(ErrorCode::BackupCreationFailed);
    let detail = if status.error_message.is_empty() {
        state.as_str_name().to_string()
    } else {
        status.error_message.clone()
    };
    Error::new(code, format!("shard {shard}: {detail}"))
}

/// Sends Abort to every agent, best effort: an agent that cannot be reached reopens by
/// itself when its lease runs out.
pub async fn abort_everywhere(agents: &[AgentLink], backup: &BackupId) {
    let aborts = agents.iter().map(|agent| {
        let mut client = agent.client.clone();
        let request = v1::BarrierRequest { backup_id: backup.to_string() };
        async move {
            let result = tokio::time::timeout(Duration::from_secs(2), client.abort(request)).await;
            if !matches!(result, Ok(Ok(_))) {
                tracing::warn!(shard = %agent.shard_id, backup = %backup, "abort not acknowledged; the agent's lease will reopen its gate");
            }
        }
    });
    join_all(aborts).await;
}

/// Removes what an uncommitted backup left: shard manifests and the pending marker.
pub async fn remove_leftovers(ctx: &JobContext, backup: &BackupId) -> Result<usize> {
    let removed = ctx
        .repo
        .delete_shard_manifests(backup, &ctx.config.shard_ids())
        .await?;
    ctx.repo.delete_pending(backup).await?;
    Ok(removed)
}

/// On start: every pending backup without a backup manifest is a leftover of a coordinator
/// that died mid-barrier. Abort it on the agents and remove its shard manifests.
pub async fn clean_leftovers(ctx: &JobContext) -> Result<Vec<BackupId>> {
    let mut cleaned = Vec::new();
    for backup in ctx.repo.pending_ids().await? {
        if ctx.repo.backup_exists(&backup).await? {
            ctx.repo.delete_pending(&backup).await?;
            continue;
        }
        abort_everywhere(&ctx.agents, &backup).await;
        let removed = remove_leftovers(ctx, &backup).await?;
        tracing::warn!(backup = %backup, shard_manifests = removed, "removed the leftovers of an uncommitted backup");
        cleaned.push(backup);
    }
    Ok(cleaned)
}

/// Waits (bounded) until no agent is still uploading `backup`, so cleanup cannot race a late
/// shard manifest. Returns false if some agent may still be uploading.
async fn wait_for_uploads_to_stop(ctx: &JobContext, backup: &BackupId) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut every = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < deadline {
        every.tick().await;
        let polls = ctx.agents.iter().map(|agent| {
            let mut client = agent.client.clone();
            let request = v1::BarrierRequest { backup_id: backup.to_string() };
            async move { tokio::time::timeout(Duration::from_secs(2), client.status(request)).await }
        });
        let uploading = join_all(polls).await.into_iter().any(|reply| match reply {
            Ok(Ok(status)) => status.into_inner().state == BarrierState::Uploading as i32,
            // An agent that does not answer has lost its upload with its process.
            _ => false,
        });
        if !uploading {
            return true;
        }
    }
    false
}

async fn run_backup(ctx: &JobContext, backup: &BackupId, cut: &Cut, view: &Shared) -> Result<()> {
    let started_at = Utc::now();
    let intent = serde_json::json!({ "backup_id": backup, "kind": cut.kind, "parent": cut.parent.as_ref().map(|p| &p.0), "started_at": started_at, "shards": ctx.config.shard_ids() });
    ctx.repo
        .put_pending(backup, intent.to_string().into_bytes())
        .await?;
    let outcome = barrier_and_upload(ctx, backup, cut, view, started_at).await;
    if outcome.is_err() {
        abort_everywhere(&ctx.agents, backup).await;
        if !wait_for_uploads_to_stop(ctx, backup).await {
            // The pending marker stays, so the next start removes what is published late.
            tracing::warn!(backup = %backup, "an agent is still uploading; leftovers will be removed at the next start");
        } else if let Err(err) = remove_leftovers(ctx, backup).await {
            tracing::warn!(backup = %backup, error = %err.chain(), "could not remove leftovers yet; the next start will");
        }
    }
    outcome
}

/// The phases of the barrier that fan a `PrepareRequest` out to every agent.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Phase 0: capture with the gates open.
    Stage,
    /// Phase 1: close the gates and cut.
    Prepare,
}

/// Sends `phase` to every agent in parallel; every reply must be `expected` and arrive by
/// `deadline`. The view shows each shard's reply.
async fn fan_out(
    ctx: &JobContext,
    view: &Shared,
    phase: Phase,
    deadline: Instant,
    request: &impl Fn(&AgentLink) -> v1::PrepareRequest,
) -> Result<Vec<v1::BarrierStatus>> {
    let (expected, name) = match phase {
        Phase::Stage => (BarrierState::Staged, "Staged"),
        Phase::Prepare => (BarrierState::Prepared, "Prepared"),
    };
    let sent = Instant::now();
    let calls = ctx.agents.iter().map(|agent| {
        let mut client = agent.client.clone();
        let request = request(agent);
        async move {
            let call = async {
                match phase {
                    Phase::Stage => client.stage(request).await,
                    Phase::Prepare => client.prepare(request).await,
                }
            };
            match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(reply)) => Ok(reply.into_inner()),
                Ok(Err(status)) => Err(from_status(
                    &format!("{phase:?} shard {}", agent.shard_id).to_lowercase(),
                    &status,
                )),
                Err(_) => Err(Error::new(
                    ErrorCode::AgentUnavailable,
                    format!(
                        "shard {} did not reply {name} within {} ms",
                        agent.shard_id,
                        deadline.saturating_duration_since(sent).as_millis()
                    ),
                )),
            }
        }
    });
    let replies = join_all(calls).await;
    let mut failures = Vec::new();
    let mut shards = Vec::new();
    let mut accepted = Vec::new();
    for (agent, reply) in ctx.agents.iter().zip(&replies) {
        match reply {
            Ok(status) if status.state == expected as i32 => {
                shards.push(shard_view(&agent.shard_id, status));
                accepted.push(status.clone());
            }
            Ok(status) => {
                shards.push(shard_view(&agent.shard_id, status));
                failures.push(status_error(&agent.shard_id, status));
            }
            Err(err) => {
                shards.push(failed_view(&agent.shard_id, err));
                failures.push(Error::new(err.code, err.chain()));
            }
        }
    }
    update(view, |v| v.shards = shards);
    if Instant::now() > deadline && failures.is_empty() {
        failures.push(Error::new(
            ErrorCode::BarrierLeaseExpired,
            format!("the {name} replies arrived after the deadline"),
        ));
    }
    if let Some(first) = failures.first() {
        let detail = failures
            .iter()
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Error::new(
            first.code,
            format!("barrier failed, aborted: {detail}"),
        ));
    }
    Ok(accepted)
}

/// The phases on every agent: Stage (gates open) in parallel within the stage timeout, then
/// Prepare (gates close) in parallel within the deadline, then Commit. Returns the Prepared
/// statuses (each shard's cut) once every agent accepted the Commit in one of `committed`
/// states. On error the caller aborts everywhere.
pub(crate) async fn barrier(
    ctx: &JobContext,
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
    fan_out(
        ctx,
        view,
        Phase::Stage,
        staging + barrier.stage_timeout(),
        &|agent| v1::PrepareRequest {
            lease_ms: hold_ms,
            ..request(agent)
        },
    )
    .await?;
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
        Phase::Prepare,
        sent + barrier.prepare_timeout(),
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
    update(view, |v| v.state = JobState::Uploading);
    let commits = ctx.agents.iter().map(|agent| {
        let mut client = agent.client.clone();
        let request = v1::BarrierRequest {
            backup_id: backup.to_string(),
        };
        async move {
            client
                .commit(request)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| from_status(&format!("commit shard {}", agent.shard_id), &s))
        }
    });
    for ((agent, reply), cut) in ctx
        .agents
        .iter()
        .zip(join_all(commits).await)
        .zip(prepared.iter_mut())
    {
        let status = reply?;
        let state = BarrierState::try_from(status.state).unwrap_or(BarrierState::Unspecified);
        if !committed.contains(&state) {
            return Err(status_error(&agent.shard_id, &status));
        }
        // The Commit reply carries the whole pause; Prepared only the pause so far.
        cut.gate_closed_us = status.gate_closed_us;
    }
    Ok(prepared)
}

async fn barrier_and_upload(
    ctx: &JobContext,
    backup: &BackupId,
    cut: &Cut,
    view: &Shared,
    started_at: chrono::DateTime<Utc>,
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
    let barrier = &ctx.config.barrier;

    // Wait for every upload, polling progress.
    let upload_deadline = Instant::now() + barrier.upload_timeout();
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let mut unreachable: HashMap<ShardId, u32> = HashMap::new();
    loop {
        every.tick().await;
        if Instant::now() > upload_deadline {
            return Err(Error::new(
                ErrorCode::BackupCreationFailed,
                "uploads did not finish within upload_timeout_ms",
            ));
        }
        let polls = ctx.agents.iter().map(|agent| {
            let mut client = agent.client.clone();
            let request = v1::BarrierRequest {
                backup_id: backup.to_string(),
            };
            async move { client.status(request).await.map(|r| r.into_inner()) }
        });
        let mut shards = Vec::new();
        let mut all_uploaded = true;
        for (agent, reply) in ctx.agents.iter().zip(join_all(polls).await) {
            match reply {
                Ok(status) => {
                    unreachable.remove(&agent.shard_id);
                    let state =
                        BarrierState::try_from(status.state).unwrap_or(BarrierState::Unspecified);
                    match state {
                        BarrierState::Uploaded => {}
                        BarrierState::Uploading => all_uploaded = false,
                        _ => return Err(status_error(&agent.shard_id, &status)),
                    }
                    shards.push(shard_view(&agent.shard_id, &status));
                }
                Err(status) => {
                    all_uploaded = false;
                    let err = from_status(&format!("status of shard {}", agent.shard_id), &status);
                    let misses = unreachable.entry(agent.shard_id.clone()).or_default();
                    *misses += 1;
                    // An agent that restarted lost its upload; a few misses in a row fail the backup.
                    if *misses >= 20 {
                        return Err(Error::new(
                            ErrorCode::AgentUnavailable,
                            format!(
                                "shard {} stopped answering during upload: {}",
                                agent.shard_id, err.message
                            ),
                        ));
                    }
                    shards.push(failed_view(&agent.shard_id, &err));
                }
            }
        }
        update(view, |v| v.shards = shards);
        if all_uploaded {
            break;
        }
    }

    // Commit point: read every shard manifest back, then write the backup manifest.
    let mut manifests = Vec::with_capacity(ctx.agents.len());
    for agent in &ctx.agents {
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
    ctx.repo.put_backup_manifest(&manifest).await?;
    ctx.repo.delete_pending(backup).await?;
    tracing::info!(backup = %backup, shards = manifests.len(), max_gate_closed_us = manifest.max_gate_closed_us, "backup committed");
    Ok(())
}
