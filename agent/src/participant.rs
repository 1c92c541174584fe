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
use std::sync::Arc;
use std::time::Duration;

use lockstep_repository::manifest::{FileKind, ShardManifest};
use lockstep_repository::transfer::Progress;
use lockstep_repository::{BackupId, Error, ErrorCode, Repository, Result, Seq, ShardId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backup::{BackupOptions, CapturedShard, capture_closed, upload_capture};
use crate::engine::ShardEngine;
use crate::gate::{GateClosed, WriteGate};

/// How many finished barriers an agent remembers.
const REMEMBERED: usize = 256;

/// Where a barrier stands on this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierState {
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
}

enum Msg {
    /// Phase 1: close the gate, capture, and hold until Commit, Abort or `deadline`.
    Prepare {
        backup: BackupId,
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

/// A capture held between Prepare and Commit.
struct Held {
    closed: GateClosed,
    captured: CapturedShard,
    deadline: Instant,
}

struct Record {
    status: BarrierStatus,
    held: Option<Held>,
    progress: Option<Arc<Progress>>,
}

struct Participant<E: ShardEngine> {
    engine: Arc<E>,
    gate: WriteGate,
    repo: Repository,
    shard_id: ShardId,
    options: BackupOptions,
    records: HashMap<BackupId, Record>,
    order: VecDeque<BackupId>,
    /// The barrier holding the gate or uploading, if any.
    active: Option<BackupId>,
    uploads: JoinSet<(BackupId, Result<ShardManifest>)>,
}

fn stopped() -> Error {
    Error::new(ErrorCode::AgentUnavailable, "the agent is shutting down")
}

impl ParticipantHandle {
    /// Starts the participant task in `tasks`; it stops when `cancel` fires, opening the gate
    /// and dropping any capture.
    pub fn spawn<E: ShardEngine>(
        engine: Arc<E>,
        gate: WriteGate,
        repo: Repository,
        shard_id: ShardId,
        options: BackupOptions,
        cancel: CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> ParticipantHandle {
        let (tx, rx) = mpsc::channel(64);
        let participant = Participant {
            engine,
            gate,
            repo,
            shard_id,
            options,
            records: HashMap::new(),
            order: VecDeque::new(),
            active: None,
            uploads: JoinSet::new(),
        };
        tasks.spawn(participant.run(rx, cancel));
        ParticipantHandle { tx }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// Phase 1. The lease starts now, when the request arrives.
    pub async fn prepare(&self, backup: BackupId, lease: Duration) -> Result<BarrierStatus> {
        let deadline = Instant::now() + lease;
        self.ask(|reply| Msg::Prepare {
            backup,
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
}

impl<E: ShardEngine> Participant<E> {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        loop {
            let deadline = self.held_deadline();
            tokio::select! {
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
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => break,
                },
            }
        }
        // Dropping the records opens the gate and releases any capture; uploads are cancelled.
        self.uploads.abort_all();
        self.records.clear();
    }

    fn held_deadline(&self) -> Option<Instant> {
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
        if let Some(held) = &record.held {
            status.gate_closed = held.closed.elapsed();
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
            Msg::Prepare {
                backup,
                deadline,
                reply,
            } => {
                let status = self.prepare(backup, deadline).await;
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
                let _ = reply.send(AgentInfo {
                    shard_id: self.shard_id.clone(),
                    engine: self.engine.kind(),
                    seq: self.engine.latest_seq(),
                    gate_closed: self.gate.is_closed(),
                    active_backup: self.active.clone(),
                });
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

    async fn prepare(&mut self, backup: BackupId, deadline: Instant) -> BarrierStatus {
        if self.records.contains_key(&backup) {
            return self.snapshot(&backup);
        }
        if let Some(active) = &self.active {
            return self.failed(
                &backup,
                BarrierState::Failed,
                ErrorCode::BarrierBusy,
                format!("shard {} is busy with backup {active}", self.shard_id),
            );
        }
        let capture_dir = self.options.capture_root.join(backup.as_str());
        let (closed, captured) = match capture_closed(&self.engine, &self.gate, capture_dir).await {
            Ok(held) => held,
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
        let status = BarrierStatus {
            backup_id: backup.clone(),
            shard_id: self.shard_id.clone(),
            state: BarrierState::Prepared,
            seq: captured.capture.seq,
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
            gate_closed: closed.elapsed(),
            bytes_done: 0,
            bytes_total: captured.capture.files.iter().map(|f| f.size).sum(),
            error: None,
        };
        tracing::info!(backup = %backup, shard = %self.shard_id, seq = %status.seq, "prepared: gate closed, shard captured");
        self.active = Some(backup.clone());
        self.remember(
            backup.clone(),
            Record {
                status,
                held: Some(Held {
                    closed,
                    captured,
                    deadline,
                }),
                progress: None,
            },
        );
        if Instant::now() >= deadline {
            self.expire();
        }
        self.snapshot(&backup)
    }

    /// Releases the held capture of the active barrier, ending it in `state`.
    fn release(&mut self, state: BarrierState, error: Option<(ErrorCode, String)>) {
        let Some(active) = self.active.take() else {
            return;
        };
        if let Some(record) = self.records.get_mut(&active) {
            if let Some(held) = record.held.take() {
                record.status.gate_closed = held.closed.open();
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
        let is_held = self.active.as_ref() == Some(&backup)
            && self.records.get(&backup).is_some_and(|r| r.held.is_some());
        if !is_held {
            return self.snapshot(&backup);
        }
        let Some(record) = self.records.get_mut(&backup) else {
            return self.unknown(backup);
        };
        let Some(held) = record.held.take() else {
            return self.unknown(backup);
        };
        let mut captured = held.captured;
        captured.paused = held.closed.open();
        record.status.gate_closed = captured.paused;
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
        self.uploads.spawn(async move {
            let result = upload_capture(captured, &repo, &shard, &id, transfer, &progress).await;
            (id, result)
        });
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
                record.status.state = BarrierState::Uploaded;
            }
            Err(err) => {
                tracing::error!(backup = %backup, shard = %self.shard_id, error = %err.chain(), "upload failed");
                record.status.state = BarrierState::Failed;
                record.status.error = Some((err.code, err.chain()));
            }
        }
    }
}
