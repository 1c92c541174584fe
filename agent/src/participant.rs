//! The barrier participant: the agent's side of the two-phase barrier, as an actor.
//!
//! `ParticipantHandle` is the cloneable handle; a private task owns every barrier's record
//! and the one active capture. Messages are handled one at a time, so Prepare, Commit, Abort
//! and lease expiry never race. Every request is idempotent per backup id: a repeated or
//! late message is answered from the remembered record and changes nothing.
//!
//! Architecture invariant: the gate is closed only while a record is `Prepared`, and every
//! `Prepared` record has a lease deadline that the task enforces by itself, so nothing the
//! coordinator does or fails to do keeps writes paused past the lease.
//!
//! Cancel-safety: gRPC handlers only send a message and await the reply; the work is done by
//! the task, so a client that goes away mid-call cannot leave a barrier half-done.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lockstep_repository::manifest::{FileKind, ShardManifest};
use lockstep_repository::transfer::Progress;
use lockstep_repository::{BackupId, Error, ErrorCode, Repository, Result, Seq, ShardId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backup::{
    BackupOptions, CaptureMode, CapturedShard, close_gate, stage_capture, upload_capture,
};
use crate::engine::ShardEngine;
use crate::gate::{GateClosed, WriteGate};
use crate::restore::{Replay, StagedShard, check_target, replay_staged, stage_empty, stage_shard};
use crate::shipper::ShipperHandle;
use crate::slot::EngineSlot;

/// How many finished barriers an agent remembers.
const REMEMBERED: usize = 256;

/// Where a barrier stands on this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierState {
    Staged,
    Prepared,
    Uploading,
    Uploaded,
    Aborted,
    Expired,
    Failed,
    Unknown,
}

/// One captured file as reported in Prepared.
#[derive(Debug, Clone)]
pub struct InventoryFile {
    pub name: String,
    pub size: u64,
    pub kind: FileKind,
}

/// What the agent says about one barrier.
#[derive(Debug, Clone)]
pub struct BarrierStatus {
    pub backup_id: BackupId,
    pub shard_id: ShardId,
    pub state: BarrierState,
    pub seq: Seq,
    /// The HLC time of the last write at the cut, and the shard's timeline.
    pub hlc: lockstep_repository::HlcTime,
    pub timeline: lockstep_repository::Timeline,
    pub captured_at: Option<chrono::DateTime<chrono::Utc>>,
    pub files: Vec<InventoryFile>,
    pub gate_closed: Duration,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<(ErrorCode, String)>,
}

/// The agent itself, for `Describe` and `cluster status`.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub shard_id: ShardId,
    pub engine: &'static str,
    pub seq: Seq,
    pub gate_closed: bool,
    pub active_backup: Option<BackupId>,
    pub timeline: lockstep_repository::Timeline,
}

enum Msg {
    /// Phase 0: capture with the gate open, and hold until Prepare, Abort or `deadline`.
    Stage {
        backup: BackupId,
        mode: CaptureMode,
        deadline: Instant,
        reply: oneshot::Sender<BarrierStatus>,
    },
    /// Phase 1: close the gate and cut (staging first if Stage did not), and hold until
    /// Commit, Abort or `deadline`.
    Prepare {
        backup: BackupId,
        mode: CaptureMode,
        deadline: Instant,
        reply: oneshot::Sender<BarrierStatus>,
    },
    /// Phase 2: open the gate and upload.
    Commit {
        backup: BackupId,
        reply: oneshot::Sender<BarrierStatus>,
    },
    /// Open the gate and drop the capture; remembered so a late Prepare does nothing.
    Abort {
        backup: BackupId,
        reply: oneshot::Sender<BarrierStatus>,
    },
    /// The remembered record of one barrier.
    Status {
        backup: BackupId,
        reply: oneshot::Sender<BarrierStatus>,
    },
    /// The agent's own state.
    Describe { reply: oneshot::Sender<AgentInfo> },
    /// Restore phase 1: download and check, in the background.
    RestoreStage {
        request: RestoreRequest,
        reply: oneshot::Sender<Result<RestoreStatus>>,
    },
    RestoreStatus {
        restore_id: String,
        reply: oneshot::Sender<RestoreStatus>,
    },
    /// Restore phase 2: swap the staged shard in under the closed gate.
    RestoreApply {
        restore_id: String,
        reply: oneshot::Sender<Result<RestoreStatus>>,
    },
    RestoreDiscard {
        restore_id: String,
        reply: oneshot::Sender<RestoreStatus>,
    },
}

/// A restore of this agent's shard.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub restore_id: String,
    /// The full backup to start from; `None` starts from an empty shard and replays the WAL
    /// archive from sequence 1 (the backup repository is gone).
    pub backup: Option<BackupId>,
    /// A directory to restore into; `None` replaces the live shard.
    pub target: Option<PathBuf>,
    /// Incremental and differential backups whose WAL pieces are replayed after `backup`, in
    /// this order.
    pub chain: Vec<BackupId>,
    /// Point-in-time recovery: then replay the WAL archive at this URL, on this timeline.
    pub archive: Option<(String, lockstep_repository::Timeline)>,
    /// Where any replay stops, exactly (ignored with no chain and no archive).
    pub to: Seq,
}

/// Where a restore stands on this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreState {
    Staging,
    Staged,
    Applied,
    Discarded,
    Failed,
    Unknown,
}

/// What the agent says about one restore.
#[derive(Debug, Clone)]
pub struct RestoreStatus {
    pub restore_id: String,
    pub backup_id: Option<BackupId>,
    pub shard_id: ShardId,
    pub state: RestoreState,
    pub seq: Seq,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub n_files: usize,
    pub target: Option<PathBuf>,
    pub error: Option<(ErrorCode, String)>,
}

struct RestoreRecord {
    status: RestoreStatus,
    progress: Arc<Progress>,
    /// Set while `Staged`: the checked shard waiting for Apply.
    staged: Option<StagedShard>,
    /// Set while `Staging`.
    task: Option<AbortHandle>,
}

/// What a staging task produced: a shard staged for an in-place swap, or one already renamed
/// into its target directory.
enum Staged {
    InPlace(StagedShard),
    Placed { seq: Seq, n_files: usize },
}

/// The timeline a restored shard starts: above its current one, every one its WAL
/// destinations hold, and every one its backups were taken on, so its shipped WAL never lands
/// among an older history's segments and no incremental continues a history that is not its
/// own (even after the shard's directory, and its lineage file, were lost). A destination or
/// repository that cannot be read is skipped with a warning.
async fn next_timeline(
    current: lockstep_repository::Timeline,
    destinations: &[lockstep_repository::archive::WalArchive],
    repo: &Repository,
    shard: &ShardId,
) -> lockstep_repository::Timeline {
    let mut highest = current;
    for destination in destinations {
        match destination.wal_timelines(shard).await {
            Ok(timelines) => {
                if let Some(top) = timelines.last() {
                    highest = highest.max(*top);
                }
            }
            Err(err) => {
                tracing::warn!(destination = %destination.url(), error = %err.chain(), "could not list WAL timelines")
            }
        }
    }
    match repo.backups().await {
        Ok(backups) => {
            for (id, backup) in backups {
                if !backup.is_ok_and(|b| b.cut.contains_key(shard)) {
                    continue;
                }
                if let Ok(manifest) = repo.shard_manifest(shard, &id).await {
                    highest = highest.max(manifest.timeline);
                }
            }
        }
        Err(err) => {
            tracing::warn!(repository = %repo.url(), error = %err.chain(), "could not list backups for their timelines")
        }
    }
    highest.next()
}

/// A deliberate bug for the simulations' proof that their checkers catch one (issue: "the
/// checkers bite"). Never set by the binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// The agent ignores its lease: a Prepared barrier holds the gate until Commit or Abort.
    IgnoreLease,
}

/// What the participant works on: the shard, its gate, its repository and its WAL shipper.
pub struct ShardParts<E> {
    pub slot: Arc<EngineSlot<E>>,
    pub gate: WriteGate,
    pub repo: Repository,
    pub shard_id: ShardId,
    pub options: BackupOptions,
    pub shipper: ShipperHandle,
    pub planted_bug: Option<PlantedBug>,
}

/// Cloneable handle on the participant task.
#[derive(Clone)]
pub struct ParticipantHandle {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for ParticipantHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParticipantHandle")
    }
}

/// A capture held from Stage (gate open) or Prepare (gate closed) until Commit.
struct Held {
    /// Set once Prepare closed the gate.
    closed: Option<GateClosed>,
    captured: CapturedShard,
    deadline: Instant,
}

struct Record {
    status: BarrierStatus,
    held: Option<Held>,
    progress: Option<Arc<Progress>>,
}

struct Participant<E: ShardEngine> {
    slot: Arc<EngineSlot<E>>,
    gate: WriteGate,
    repo: Repository,
    shard_id: ShardId,
    options: BackupOptions,
    /// The WAL shipper: its destinations hold the shard's timelines.
    shipper: ShipperHandle,
    planted_bug: Option<PlantedBug>,
    records: HashMap<BackupId, Record>,
    order: VecDeque<BackupId>,
    /// The barrier holding the gate or uploading, if any.
    active: Option<BackupId>,
    uploads: JoinSet<(BackupId, Result<ShardManifest>)>,
    restores: HashMap<String, RestoreRecord>,
    restore_order: VecDeque<String>,
    /// The restore staging or staged, if any: it holds the shard like a barrier does.
    restoring: Option<String>,
    stagings: JoinSet<(String, Result<Staged>)>,
}

/// The longest an agent waits for a Prepare's close time, whatever the coordinator's clock
/// says (ARCHITECTURE.md, "Scheduled close").
pub const MAX_CLOSE_WAIT: Duration = Duration::from_secs(1);

fn stopped() -> Error {
    Error::new(ErrorCode::AgentUnavailable, "the agent is shutting down")
}

impl ParticipantHandle {
    /// Starts the participant task in `tasks`; it stops when `cancel` fires, opening the gate
    /// and dropping any capture.
    pub fn spawn<E: ShardEngine>(
        shard: ShardParts<E>,
        cancel: CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> ParticipantHandle {
        let ShardParts {
            slot,
            gate,
            repo,
            shard_id,
            options,
            shipper,
            planted_bug,
        } = shard;
        let (tx, rx) = mpsc::channel(64);
        let participant = Participant {
            slot,
            gate,
            repo,
            shard_id,
            options,
            shipper,
            planted_bug,
            records: HashMap::new(),
            order: VecDeque::new(),
            active: None,
            uploads: JoinSet::new(),
            restores: HashMap::new(),
            restore_order: VecDeque::new(),
            restoring: None,
            stagings: JoinSet::new(),
        };
        tasks.spawn(participant.run(rx, cancel));
        ParticipantHandle { tx }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// Phase 0. The hold starts now, when the request arrives.
    pub async fn stage(
        &self,
        backup: BackupId,
        mode: CaptureMode,
        hold: Duration,
    ) -> Result<BarrierStatus> {
        let deadline = Instant::now() + hold;
        self.ask(|reply| Msg::Stage {
            backup,
            mode,
            deadline,
            reply,
        })
        .await
    }

    /// Phase 1. The lease starts now, when the request arrives; the gate closes at
    /// `close_at` if that is still to come (at most `MAX_CLOSE_WAIT` from now), else now.
    /// The wait happens here, before the participant sees Prepare, so it keeps answering
    /// Abort and Status meanwhile.
    pub async fn prepare(
        &self,
        backup: BackupId,
        mode: CaptureMode,
        lease: Duration,
        close_at: Option<SystemTime>,
    ) -> Result<BarrierStatus> {
        let deadline = Instant::now() + lease;
        let wait = close_at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .map(|wait| wait.min(MAX_CLOSE_WAIT));
        if let Some(wait) = wait {
            // A thread's sleep, not the runtime's timer: that one ticks in whole
            // milliseconds, and the agents are to close within a fraction of one.
            lockstep_repository::blocking::run(move || std::thread::sleep(wait))
                .await
                .map_err(|_| stopped())?;
        }
        self.ask(|reply| Msg::Prepare {
            backup,
            mode,
            deadline,
            reply,
        })
        .await
    }

    pub async fn commit(&self, backup: BackupId) -> Result<BarrierStatus> {
        self.ask(|reply| Msg::Commit { backup, reply }).await
    }

    pub async fn abort(&self, backup: BackupId) -> Result<BarrierStatus> {
        self.ask(|reply| Msg::Abort { backup, reply }).await
    }

    pub async fn status(&self, backup: BackupId) -> Result<BarrierStatus> {
        self.ask(|reply| Msg::Status { backup, reply }).await
    }

    pub async fn describe(&self) -> Result<AgentInfo> {
        self.ask(|reply| Msg::Describe { reply }).await
    }

    pub async fn restore_stage(&self, request: RestoreRequest) -> Result<RestoreStatus> {
        self.ask(|reply| Msg::RestoreStage { request, reply })
            .await?
    }

    pub async fn restore_status(&self, restore_id: String) -> Result<RestoreStatus> {
        self.ask(|reply| Msg::RestoreStatus { restore_id, reply })
            .await
    }

    pub async fn restore_apply(&self, restore_id: String) -> Result<RestoreStatus> {
        self.ask(|reply| Msg::RestoreApply { restore_id, reply })
            .await?
    }

    pub async fn restore_discard(&self, restore_id: String) -> Result<RestoreStatus> {
        self.ask(|reply| Msg::RestoreDiscard { restore_id, reply })
            .await
    }
}

impl<E: ShardEngine> Participant<E> {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        loop {
            let deadline = self.held_deadline();
            tokio::select! {
                // Fixed polling order: the simulations replay a seed exactly.
                biased;
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.expire();
                }
                Some(done) = self.uploads.join_next(), if !self.uploads.is_empty() => {
                    match done {
                        Ok((backup, result)) => self.upload_finished(backup, result),
                        Err(err) => tracing::error!(error = %err, "upload task failed"),
                    }
                }
                Some(done) = self.stagings.join_next(), if !self.stagings.is_empty() => {
                    match done {
                        Ok((restore_id, result)) => self.staging_finished(restore_id, result),
                        Err(err) if err.is_cancelled() => {}
                        Err(err) => tracing::error!(error = %err, "restore staging task failed"),
                    }
                }
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => break,
                },
            }
        }
        // Dropping the records opens the gate and releases any capture; uploads are cancelled.
        self.uploads.abort_all();
        self.stagings.abort_all();
        self.records.clear();
        self.restores.clear();
    }

    fn held_deadline(&self) -> Option<Instant> {
        if self.planted_bug == Some(PlantedBug::IgnoreLease) {
            return None;
        }
        let active = self.active.as_ref()?;
        self.records
            .get(active)?
            .held
            .as_ref()
            .map(|held| held.deadline)
    }

    fn unknown(&self, backup: BackupId) -> BarrierStatus {
        BarrierStatus {
            backup_id: backup,
            shard_id: self.shard_id.clone(),
            state: BarrierState::Unknown,
            seq: Seq(0),
            hlc: lockstep_repository::HlcTime::default(),
            timeline: lockstep_repository::Timeline::default(),
            captured_at: None,
            files: Vec::new(),
            gate_closed: Duration::ZERO,
            bytes_done: 0,
            bytes_total: 0,
            error: None,
        }
    }

    /// The current status of a record, with live gate time and upload progress.
    fn snapshot(&self, backup: &BackupId) -> BarrierStatus {
        let Some(record) = self.records.get(backup) else {
            return self.unknown(backup.clone());
        };
        let mut status = record.status.clone();
        if let Some(closed) = record.held.as_ref().and_then(|held| held.closed.as_ref()) {
            status.gate_closed = closed.elapsed();
        }
        if let Some(progress) = &record.progress {
            let (done, total) = progress.snapshot();
            status.bytes_done = done;
            status.bytes_total = total;
        }
        status
    }

    fn remember(&mut self, backup: BackupId, record: Record) {
        if !self.records.contains_key(&backup) {
            self.order.push_back(backup.clone());
        }
        self.records.insert(backup, record);
        while self.order.len() > REMEMBERED {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if self.active.as_ref() == Some(&oldest) {
                self.order.push_back(oldest);
                break;
            }
            self.records.remove(&oldest);
        }
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Stage {
                backup,
                mode,
                deadline,
                reply,
            } => {
                let status = self.stage(backup, mode, deadline).await;
                let _ = reply.send(status);
            }
            Msg::Prepare {
                backup,
                mode,
                deadline,
                reply,
            } => {
                let status = self.prepare(backup, mode, deadline).await;
                let _ = reply.send(status);
            }
            Msg::Commit { backup, reply } => {
                let _ = reply.send(self.commit(backup));
            }
            Msg::Abort { backup, reply } => {
                let _ = reply.send(self.abort(backup));
            }
            Msg::Status { backup, reply } => {
                let _ = reply.send(self.snapshot(&backup));
            }
            Msg::Describe { reply } => {
                let engine = self.slot.get().ok();
                let _ = reply.send(AgentInfo {
                    shard_id: self.shard_id.clone(),
                    engine: engine.as_ref().map_or("", |e| e.kind()),
                    seq: engine.as_ref().map_or(Seq(0), |e| e.latest_seq()),
                    gate_closed: self.gate.is_closed(),
                    active_backup: self.active.clone(),
                    timeline: self.slot.lineage().timeline,
                });
            }
            Msg::RestoreStage { request, reply } => {
                let _ = reply.send(self.restore_stage(request));
            }
            Msg::RestoreStatus { restore_id, reply } => {
                let _ = reply.send(self.restore_snapshot(&restore_id));
            }
            Msg::RestoreApply { restore_id, reply } => {
                let _ = reply.send(self.restore_apply(restore_id).await);
            }
            Msg::RestoreDiscard { restore_id, reply } => {
                let _ = reply.send(self.restore_discard(restore_id));
            }
        }
    }

    fn failed(
        &self,
        backup: &BackupId,
        state: BarrierState,
        code: ErrorCode,
        message: String,
    ) -> BarrierStatus {
        BarrierStatus {
            state,
            error: Some((code, message)),
            ..self.unknown(backup.clone())
        }
    }

    /// The status of a held capture, from its record.
    fn held_status(
        &self,
        backup: &BackupId,
        state: BarrierState,
        captured: &CapturedShard,
    ) -> BarrierStatus {
        BarrierStatus {
            backup_id: backup.clone(),
            shard_id: self.shard_id.clone(),
            state,
            seq: captured.seq,
            hlc: captured.hlc,
            timeline: captured.timeline,
            captured_at: Some(captured.captured_at),
            files: captured
                .capture
                .files
                .iter()
                .map(|f| InventoryFile {
                    name: f.name.clone(),
                    size: f.size,
                    kind: f.kind,
                })
                .collect(),
            gate_closed: Duration::ZERO,
            bytes_done: 0,
            bytes_total: captured.capture.files.iter().map(|f| f.size).sum(),
            error: None,
        }
    }

    /// Phase 0: captures with the gate open (everything slow happens here), then holds the
    /// capture until Prepare, Abort or `deadline`.
    async fn stage(
        &mut self,
        backup: BackupId,
        mode: CaptureMode,
        deadline: Instant,
    ) -> BarrierStatus {
        if self.records.contains_key(&backup) {
            return self.snapshot(&backup);
        }
        if let Some(refused) = self.refuse_busy(&backup) {
            return refused;
        }
        let capture_dir = self.options.capture_root.join(backup.as_str());
        let captured = match self.slot.get() {
            Ok(engine) => {
                let timeline = self.slot.lineage().timeline;
                stage_capture(&engine, capture_dir, timeline, mode).await
            }
            Err(err) => Err(err),
        };
        let captured = match captured {
            Ok(captured) => captured,
            Err(err) => {
                let status = self.failed(&backup, BarrierState::Failed, err.code, err.chain());
                self.remember(
                    backup,
                    Record {
                        status: status.clone(),
                        held: None,
                        progress: None,
                    },
                );
                return status;
            }
        };
        let status = self.held_status(&backup, BarrierState::Staged, &captured);
        tracing::info!(backup = %backup, shard = %self.shard_id, files_seq = %captured.capture.seq, stage_us = captured.capture_us, "staged: shard captured, gate open");
        self.active = Some(backup.clone());
        self.remember(
            backup.clone(),
            Record {
                status,
                held: Some(Held {
                    closed: None,
                    captured,
                    deadline,
                }),
                progress: None,
            },
        );
        self.held_until(deadline, &backup)
    }

    /// The status of a capture just taken or cut, releasing it at once if its `deadline`
    /// passed while it was being taken.
    fn held_until(&mut self, deadline: Instant, backup: &BackupId) -> BarrierStatus {
        if Instant::now() >= deadline && self.planted_bug != Some(PlantedBug::IgnoreLease) {
            self.expire();
        }
        self.snapshot(backup)
    }

    /// `Some(refusal)` when another barrier or a restore holds the shard.
    fn refuse_busy(&self, backup: &BackupId) -> Option<BarrierStatus> {
        let busy = if let Some(active) = &self.active {
            format!("shard {} is busy with backup {active}", self.shard_id)
        } else if let Some(restore) = &self.restoring {
            format!("shard {} is being restored ({restore})", self.shard_id)
        } else {
            return None;
        };
        Some(self.failed(backup, BarrierState::Failed, ErrorCode::BarrierBusy, busy))
    }

    /// Phase 1: closes the gate and cuts the staged shard (staging first when no Stage came),
    /// then holds the gate closed until Commit, Abort or `deadline`.
    async fn prepare(
        &mut self,
        backup: BackupId,
        mode: CaptureMode,
        deadline: Instant,
    ) -> BarrierStatus {
        if !self.records.contains_key(&backup) {
            // No Stage came for this barrier: stage now, with the gate still open.
            let staged = self.stage(backup.clone(), mode, deadline).await;
            if staged.state != BarrierState::Staged {
                return staged;
            }
        }
        let is_staged = self.active.as_ref() == Some(&backup)
            && self
                .records
                .get(&backup)
                .is_some_and(|r| r.held.as_ref().is_some_and(|h| h.closed.is_none()));
        if !is_staged {
            return self.snapshot(&backup);
        }
        let engine = match self.slot.get() {
            Ok(engine) => engine,
            Err(err) => {
                self.release(BarrierState::Failed, Some((err.code, err.chain())));
                return self.snapshot(&backup);
            }
        };
        let Some(mut held) = self.records.get_mut(&backup).and_then(|r| r.held.take()) else {
            return self.unknown(backup);
        };
        let closed = close_gate(engine.as_ref(), &self.gate, &mut held.captured).await;
        let status = self.held_status(&backup, BarrierState::Prepared, &held.captured);
        tracing::info!(backup = %backup, shard = %self.shard_id, seq = %status.seq, "prepared: gate closed, shard cut");
        if let Some(record) = self.records.get_mut(&backup) {
            record.status = status;
            record.held = Some(Held {
                closed: Some(closed),
                captured: held.captured,
                deadline,
            });
        }
        self.held_until(deadline, &backup)
    }

    /// Releases the held capture of the active barrier, ending it in `state`.
    fn release(&mut self, state: BarrierState, error: Option<(ErrorCode, String)>) {
        let Some(active) = self.active.take() else {
            return;
        };
        if let Some(record) = self.records.get_mut(&active) {
            if let Some(held) = record.held.take() {
                if let Some(closed) = held.closed {
                    record.status.gate_closed = closed.open();
                }
                drop(held.captured);
            }
            record.status.state = state;
            record.status.error = error;
        }
    }

    fn expire(&mut self) {
        let Some(active) = self.active.clone() else {
            return;
        };
        tracing::warn!(backup = %active, shard = %self.shard_id, "lease expired before commit: gate reopened, capture dropped");
        self.release(
            BarrierState::Expired,
            Some((
                ErrorCode::BarrierLeaseExpired,
                format!("the lease of backup {active} ran out before Commit"),
            )),
        );
    }

    fn commit(&mut self, backup: BackupId) -> BarrierStatus {
        // Only a cut shard commits: a Commit that overtook Prepare does nothing.
        let is_held = self.active.as_ref() == Some(&backup)
            && self
                .records
                .get(&backup)
                .is_some_and(|r| r.held.as_ref().is_some_and(|h| h.closed.is_some()));
        if !is_held {
            return self.snapshot(&backup);
        }
        let Some(record) = self.records.get_mut(&backup) else {
            return self.unknown(backup);
        };
        let Some(Held {
            closed: Some(closed),
            mut captured,
            ..
        }) = record.held.take()
        else {
            return self.unknown(backup);
        };
        captured.paused = closed.open();
        record.status.gate_closed = captured.paused;
        if captured.mode == CaptureMode::Point {
            // A tag: the cut is recorded, nothing to upload.
            record.status.state = BarrierState::Uploaded;
            self.active = None;
            tracing::info!(barrier = %backup, shard = %self.shard_id, seq = %captured.seq, gate_closed_us = captured.paused.as_micros() as u64, "restore point committed: gate open");
            return self.snapshot(&backup);
        }
        record.status.state = BarrierState::Uploading;
        let progress = Arc::new(Progress::default());
        record.progress = Some(progress.clone());
        tracing::info!(backup = %backup, shard = %self.shard_id, gate_closed_us = captured.paused.as_micros() as u64, "committed: gate open, uploading");
        let (repo, shard, transfer, id) = (
            self.repo.clone(),
            self.shard_id.clone(),
            self.options.transfer,
            backup.clone(),
        );
        let engine = self.slot.get().map(|engine| Arc::clone(&*engine));
        let upload = async move {
            let result = match engine {
                Ok(engine) => {
                    upload_capture(captured, engine, &repo, &shard, &id, transfer, &progress).await
                }
                Err(err) => Err(err),
            };
            (id, result)
        };
        // At background priority: the agents that got Commit first must not take the CPU
        // from those still waiting to receive theirs, gates closed (8 agents on 2 cores).
        match lockstep_repository::blocking::background() {
            Some(background) => self.uploads.spawn_on(upload, &background),
            None => self.uploads.spawn(upload),
        };
        self.snapshot(&backup)
    }

    fn abort(&mut self, backup: BackupId) -> BarrierStatus {
        if self.active.as_ref() == Some(&backup)
            && self.records.get(&backup).is_some_and(|r| r.held.is_some())
        {
            tracing::info!(backup = %backup, shard = %self.shard_id, "aborted: gate reopened, capture dropped");
            self.release(BarrierState::Aborted, None);
        } else if !self.records.contains_key(&backup) {
            // Remember the abort, so a Prepare that arrives late does not capture.
            let status = BarrierStatus {
                state: BarrierState::Aborted,
                ..self.unknown(backup.clone())
            };
            self.remember(
                backup.clone(),
                Record {
                    status,
                    held: None,
                    progress: None,
                },
            );
        }
        self.snapshot(&backup)
    }

    fn upload_finished(&mut self, backup: BackupId, result: Result<ShardManifest>) {
        if self.active.as_ref() == Some(&backup) {
            self.active = None;
        }
        let Some(record) = self.records.get_mut(&backup) else {
            return;
        };
        if let Some(progress) = record.progress.take() {
            let (done, total) = progress.snapshot();
            record.status.bytes_done = done;
            record.status.bytes_total = total;
        }
        match result {
            Ok(manifest) => {
                tracing::info!(backup = %backup, shard = %self.shard_id, bytes = manifest.stats.bytes_total, "uploaded: shard manifest published");
                if manifest.wal_after.is_none() {
                    self.shipper.note_full_backup(manifest.seq);
                }
                record.status.state = BarrierState::Uploaded;
            }
            Err(err) => {
                tracing::error!(backup = %backup, shard = %self.shard_id, error = %err.chain(), "upload failed");
                record.status.state = BarrierState::Failed;
                record.status.error = Some((err.code, err.chain()));
            }
        }
    }

    fn restore_unknown(&self, restore_id: &str) -> RestoreStatus {
        RestoreStatus {
            restore_id: restore_id.to_string(),
            backup_id: None,
            shard_id: self.shard_id.clone(),
            state: RestoreState::Unknown,
            seq: Seq(0),
            bytes_done: 0,
            bytes_total: 0,
            n_files: 0,
            target: None,
            error: None,
        }
    }

    fn restore_snapshot(&self, restore_id: &str) -> RestoreStatus {
        let Some(record) = self.restores.get(restore_id) else {
            return self.restore_unknown(restore_id);
        };
        let mut status = record.status.clone();
        let (done, total) = record.progress.snapshot();
        status.bytes_done = done;
        status.bytes_total = total;
        status
    }

    fn remember_restore(&mut self, restore_id: String, record: RestoreRecord) {
        self.restore_order.push_back(restore_id.clone());
        self.restores.insert(restore_id, record);
        while self.restore_order.len() > REMEMBERED {
            let Some(oldest) = self.restore_order.pop_front() else {
                break;
            };
            if self.restoring.as_ref() == Some(&oldest) {
                self.restore_order.push_back(oldest);
                break;
            }
            self.restores.remove(&oldest);
        }
    }

    fn restore_stage(&mut self, request: RestoreRequest) -> Result<RestoreStatus> {
        if self.restores.contains_key(&request.restore_id) {
            return Ok(self.restore_snapshot(&request.restore_id));
        }
        if let Some(active) = &self.active {
            return Err(Error::new(
                ErrorCode::BarrierBusy,
                format!("shard {} is busy with backup {active}", self.shard_id),
            ));
        }
        if let Some(restore) = &self.restoring {
            return Err(Error::new(
                ErrorCode::BarrierBusy,
                format!("shard {} is busy with restore {restore}", self.shard_id),
            ));
        }
        if let Some(target) = &request.target {
            if std::path::absolute(target).ok().as_deref()
                == std::path::absolute(self.slot.dir()).ok().as_deref()
            {
                return Err(Error::new(
                    ErrorCode::RestoreTargetNotEmpty,
                    format!(
                        "{} is the live shard; restore in place instead",
                        target.display()
                    ),
                ));
            }
            check_target(target)?;
        }
        let live = self.slot.get()?;
        let (engine_kind, column_families) = (live.kind(), live.column_families());
        drop(live);
        let progress = Arc::new(Progress::default());
        let (repo, shard, backup, transfer, live) = (
            self.repo.clone(),
            self.shard_id.clone(),
            request.backup.clone(),
            self.options.transfer,
            self.slot.dir().to_path_buf(),
        );
        let (id, target, task_progress) = (
            request.restore_id.clone(),
            request.target.clone(),
            progress.clone(),
        );
        let replay = (!request.chain.is_empty() || request.archive.is_some())
            .then(|| (request.chain.clone(), request.archive.clone(), request.to));
        let (destinations, current) = (
            self.shipper.destinations().to_vec(),
            self.slot.lineage().timeline,
        );
        let task = self.stagings.spawn(async move {
            // In place, or when replaying, the backup must come from this agent's engine.
            let engine = (target.is_none() || replay.is_some()).then_some(engine_kind);
            let stage_target = target.clone().unwrap_or(live);
            let result = async {
                let mut staged = match &backup {
                    Some(backup) => {
                        stage_shard(
                            &repo,
                            backup,
                            &shard,
                            &stage_target,
                            engine,
                            transfer,
                            &task_progress,
                        )
                        .await?
                    }
                    None => stage_empty::<E>(&stage_target, column_families).await?,
                };
                if let Some((chain, archive, to)) = replay {
                    let archive = match archive {
                        Some((url, timeline)) => Some((
                            lockstep_proto::archive::open_archive(&url).await?,
                            timeline,
                        )),
                        None => None,
                    };
                    let replay = Replay {
                        repo: repo.clone(),
                        chain,
                        archive,
                        to,
                    };
                    let started = std::time::Instant::now();
                    let n = replay_staged::<E>(&mut staged, &shard, &replay).await?;
                    let replay_ms = started.elapsed().as_millis() as u64;
                    tracing::info!(shard = %shard, batches = n, seq = %staged.seq, replay_ms, "restore: WAL replayed");
                }
                staged.start_timeline(next_timeline(current, &destinations, &repo, &shard).await)?;
                match &target {
                    None => Ok(Staged::InPlace(staged)),
                    Some(target) => {
                        let (seq, n_files) = (staged.seq, staged.n_files);
                        staged.move_to(target)?;
                        Ok(Staged::Placed { seq, n_files })
                    }
                }
            }
            .await;
            (id, result)
        });
        tracing::info!(restore = %request.restore_id, backup = ?request.backup, shard = %self.shard_id, target = ?request.target, "restore: staging");
        let status = RestoreStatus {
            backup_id: request.backup.clone(),
            state: RestoreState::Staging,
            target: request.target.clone(),
            ..self.restore_unknown(&request.restore_id)
        };
        self.restoring = Some(request.restore_id.clone());
        self.remember_restore(
            request.restore_id.clone(),
            RestoreRecord {
                status,
                progress,
                staged: None,
                task: Some(task),
            },
        );
        Ok(self.restore_snapshot(&request.restore_id))
    }

    fn staging_finished(&mut self, restore_id: String, result: Result<Staged>) {
        let Some(record) = self.restores.get_mut(&restore_id) else {
            return;
        };
        if record.status.state != RestoreState::Staging {
            return;
        }
        record.task = None;
        match result {
            Ok(Staged::InPlace(staged)) => {
                tracing::info!(restore = %restore_id, shard = %self.shard_id, seq = %staged.seq, "restore: staged and checked");
                record.status.state = RestoreState::Staged;
                record.status.seq = staged.seq;
                record.status.n_files = staged.n_files;
                record.staged = Some(staged);
            }
            Ok(Staged::Placed { seq, n_files }) => {
                tracing::info!(restore = %restore_id, shard = %self.shard_id, seq = %seq, "restore: shard restored into its target directory");
                record.status.state = RestoreState::Applied;
                record.status.seq = seq;
                record.status.n_files = n_files;
                self.restoring = None;
            }
            Err(err) => {
                tracing::error!(restore = %restore_id, shard = %self.shard_id, error = %err.chain(), "restore: staging failed");
                record.status.state = RestoreState::Failed;
                record.status.error = Some((err.code, err.chain()));
                self.restoring = None;
            }
        }
    }

    async fn restore_apply(&mut self, restore_id: String) -> Result<RestoreStatus> {
        let Some(record) = self.restores.get_mut(&restore_id) else {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("no restore {restore_id} on shard {}", self.shard_id),
            ));
        };
        if record.status.state != RestoreState::Staged {
            // Applied already (a retry), or not ready: the status says which.
            return Ok(self.restore_snapshot(&restore_id));
        }
        let Some(staged) = record.staged.take() else {
            return Ok(self.restore_snapshot(&restore_id));
        };
        let closed = self.gate.close().await;
        let swapped = self.slot.swap_in(staged).await;
        let paused = closed.open();
        self.restoring = None;
        let Some(record) = self.restores.get_mut(&restore_id) else {
            return Ok(self.restore_unknown(&restore_id));
        };
        match swapped {
            Ok(seq) => {
                tracing::info!(restore = %restore_id, shard = %self.shard_id, seq = %seq, paused_ms = paused.as_millis() as u64, "restore: live shard replaced");
                record.status.state = RestoreState::Applied;
                record.status.seq = seq;
            }
            Err(err) => {
                tracing::error!(restore = %restore_id, shard = %self.shard_id, error = %err.chain(), "restore: swap failed; the live shard is unchanged");
                record.status.state = RestoreState::Failed;
                record.status.error = Some((err.code, err.chain()));
            }
        }
        Ok(self.restore_snapshot(&restore_id))
    }

    fn restore_discard(&mut self, restore_id: String) -> RestoreStatus {
        if let Some(record) = self.restores.get_mut(&restore_id)
            && matches!(
                record.status.state,
                RestoreState::Staging | RestoreState::Staged
            )
        {
            if let Some(task) = record.task.take() {
                task.abort();
            }
            // Dropping the staged shard removes its staging directory.
            drop(record.staged.take());
            record.status.state = RestoreState::Discarded;
            if self.restoring.as_ref() == Some(&restore_id) {
                self.restoring = None;
            }
            tracing::info!(restore = %restore_id, shard = %self.shard_id, "restore: discarded");
        }
        self.restore_snapshot(&restore_id)
    }
}
