//! The barrier participant: the agent's side of the two-phase barrier and, in [`restore`], of
//! the cluster restore, as one actor.
//!
//! `ParticipantHandle` is the cloneable handle; a private task owns the barrier holding the
//! shard, the outcomes of finished ones, and the restores. Messages are handled one at a time,
//! so Prepare, Commit, Abort and lease expiry never race.
//!
//! A barrier's state is one value. While it holds the shard it is the active barrier, whose
//! [`Phase`] owns what it holds: `Staged` (the capture, with the gate open), `Prepared` (the
//! capture and the `GateClosed` guard, with the lease), `Uploading` (the upload's progress).
//! When it ends, its final status (`Uploaded`, `Aborted`, `Expired` or `Failed`) joins the
//! last 256 outcomes ([`Remembered`]), which answer repeated and late messages.
//!
//! Duplicated or reordered messages (ARCHITECTURE.md, "The barrier protocol") change nothing
//! and are answered from what the participant holds or remembers:
//! - Stage for a known id returns its status; for a new id while another barrier or a restore
//!   holds the shard it is refused with `ERR_BARRIER_BUSY`, and that refusal is not remembered.
//! - Prepare closes the gate only for the active barrier while it is `Staged`; for an unknown id
//!   it stages first; for any other id it returns the status (a late Prepare finds `Aborted`).
//! - Commit acts only on the active barrier while it is `Prepared`: a Commit that overtook
//!   Prepare, a repeated one, or one after Abort or expiry returns the status.
//! - Abort ends the active barrier while it is `Staged` or `Prepared`; while `Uploading` it
//!   stops the upload, and the barrier ends `Aborted` when the task has ended (`Uploaded` if
//!   it was already publishing); for an unknown id it remembers `Aborted`, so a late Stage or
//!   Prepare does nothing; after the upload ended it returns the final state.
//! - The stage hold and the lease end the barrier (`Expired`) by themselves.
//!
//! Architecture invariant: outside a restore's swap (within one message), the gate is closed
//! only while the active barrier is `Prepared`, and every `Prepared` barrier has a lease
//! deadline that the task enforces by itself, so nothing the coordinator does or fails to do
//! keeps writes paused past the lease.
//!
//! Cancel-safety: gRPC handlers only send a message and await the reply; the work is done by
//! the task, so a client that goes away mid-call cannot leave a barrier half-done.

mod restore;
#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lockstep_repository::manifest::{FileKind, ShardManifest};
use lockstep_repository::transfer::Progress;
use lockstep_repository::{
    BackupId, Error, ErrorCode, HlcTime, Lineage, Repository, Result, Seq, ShardId,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backup::{
    BackupOptions, CaptureMode, CapturedShard, CondemnedSet, check_free_space, close_gate,
    stage_capture, upload_capture,
};
use crate::engine::ShardEngine;
use crate::gate::{GateClosed, WriteGate};
use crate::shipper::ShipperHandle;
use crate::slot::EngineSlot;
use lockstep_repository::remembered::Remembered;

pub use restore::{DEFAULT_RESTORE_LEASE, RestoreRequest, RestoreState, RestoreStatus};

/// How many finished barriers, and finished restores, an agent remembers.
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
    /// The HLC time of the last write at the cut, and the shard's lineage (none before a
    /// capture).
    pub hlc: HlcTime,
    pub lineage: Option<Lineage>,
    pub captured_at: Option<chrono::DateTime<chrono::Utc>>,
    pub files: Vec<InventoryFile>,
    pub gate_closed: Duration,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<(ErrorCode, String)>,
    /// How many objects a GC sweep condemned for this backup's upload.
    pub condemned_objects: u64,
}

/// The agent itself, for `Describe` and `cluster status`.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub shard_id: ShardId,
    pub engine: &'static str,
    pub seq: Seq,
    pub gate_closed: bool,
    pub active_backup: Option<BackupId>,
    pub lineage: Lineage,
}

enum Msg {
    /// Phase 0: capture with the gate open, and hold until Prepare, Abort or `deadline`.
    Stage {
        backup: BackupId,
        mode: CaptureMode,
        condemned: CondemnedSet,
        deadline: Instant,
        reply: oneshot::Sender<BarrierStatus>,
    },
    /// Phase 1: close the gate and cut (staging first if Stage did not), and hold until
    /// Commit, Abort or `deadline`.
    Prepare {
        backup: BackupId,
        mode: CaptureMode,
        condemned: CondemnedSet,
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
    /// The status of one barrier.
    Status {
        backup: BackupId,
        reply: oneshot::Sender<BarrierStatus>,
    },
    /// The agent's own state.
    Describe { reply: oneshot::Sender<AgentInfo> },
    /// A message of the cluster restore protocol.
    Restore(restore::Msg),
}

/// A deliberate bug for the simulations' proof that their checkers catch one (issue: "the
/// checkers bite"). Never set by the binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// The agent ignores its lease: a Prepared barrier holds the gate until Commit or Abort.
    IgnoreLease,
    /// The agent keeps the lineage its shard directory records whatever its WAL destinations
    /// hold, and the shipper appends to a lineage whose archive runs past the shard: after a
    /// rollback, the shard's new writes go onto its old history.
    AppendAcrossFork,
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
    /// How `lockstep://` archives a restore replays from are reached.
    pub security: lockstep_proto::tls::Security,
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

/// The barrier holding the shard.
struct Active {
    backup: BackupId,
    /// What Status reports; its state and live numbers come from `phase` when reported.
    status: BarrierStatus,
    phase: Phase,
}

/// Where the active barrier stands; each phase owns what it holds.
enum Phase {
    /// Captured with the gate open, until Prepare, Abort or `deadline` (the stage hold).
    Staged {
        captured: CapturedShard,
        deadline: Instant,
    },
    /// Cut; `closed` keeps the gate closed until Commit, Abort or `deadline` (the lease).
    Prepared {
        captured: CapturedShard,
        closed: GateClosed,
        deadline: Instant,
    },
    /// Committed: the gate is open and the upload task runs; `stop` ends it early (Abort).
    Uploading {
        progress: Arc<Progress>,
        stop: CancellationToken,
    },
}

impl Phase {
    fn state(&self) -> BarrierState {
        match self {
            Phase::Staged { .. } => BarrierState::Staged,
            Phase::Prepared { .. } => BarrierState::Prepared,
            Phase::Uploading { .. } => BarrierState::Uploading,
        }
    }

    /// When the participant drops the capture by itself: the stage hold or the lease.
    fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Staged { deadline, .. } | Phase::Prepared { deadline, .. } => Some(*deadline),
            Phase::Uploading { .. } => None,
        }
    }
}

impl Active {
    /// The status now, with live gate time and upload progress.
    fn snapshot(&self) -> BarrierStatus {
        let mut status = self.status.clone();
        status.state = self.phase.state();
        match &self.phase {
            Phase::Staged { .. } => {}
            Phase::Prepared { closed, .. } => status.gate_closed = closed.elapsed(),
            Phase::Uploading { progress, .. } => {
                (status.bytes_done, status.bytes_total) = progress.snapshot();
            }
        }
        status
    }

    /// Ends the barrier in `state`: opens the gate if it is closed and drops the capture.
    /// Returns its final status.
    fn end(self, state: BarrierState, error: Option<(ErrorCode, String)>) -> BarrierStatus {
        let mut status = self.snapshot();
        if let Phase::Prepared { closed, .. } = self.phase {
            status.gate_closed = closed.open();
        }
        status.state = state;
        status.error = error;
        status
    }
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
        let (tx, rx) = mpsc::channel(64);
        let participant = Participant {
            shard,
            active: None,
            outcomes: Remembered::new(REMEMBERED),
            uploads: JoinSet::new(),
            restores: restore::Restores::new(),
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
        condemned: CondemnedSet,
        hold: Duration,
    ) -> Result<BarrierStatus> {
        let deadline = Instant::now() + hold;
        self.ask(|reply| Msg::Stage {
            backup,
            mode,
            condemned,
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
        condemned: CondemnedSet,
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
            condemned,
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

struct Participant<E: ShardEngine> {
    shard: ShardParts<E>,
    /// The barrier holding the shard (staged, prepared or uploading), if any.
    active: Option<Active>,
    /// The final status of barriers that no longer hold the shard.
    outcomes: Remembered<BackupId, BarrierStatus>,
    /// The active barrier's upload while it is `Uploading`.
    uploads: JoinSet<(BackupId, Result<ShardManifest>)>,
    restores: restore::Restores<E>,
}

impl<E: ShardEngine> Participant<E> {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        loop {
            let deadline = self.held_deadline();
            let restore_deadline = self.restores.deadline();
            tokio::select! {
                // Fixed polling order: the simulations replay a seed exactly.
                biased;
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.expire();
                }
                _ = tokio::time::sleep_until(restore_deadline.unwrap_or_else(Instant::now)), if restore_deadline.is_some() => {
                    self.restores.expire(&self.shard).await;
                }
                Some(done) = self.uploads.join_next(), if !self.uploads.is_empty() => {
                    match done {
                        Ok((backup, result)) => self.upload_finished(backup, result),
                        Err(err) => self.upload_panicked(&err),
                    }
                }
                Some(done) = self.restores.stagings.join_next(), if !self.restores.stagings.is_empty() => {
                    match done {
                        Ok((restore_id, result)) => {
                            self.restores.staging_finished(&self.shard.shard_id, restore_id, result)
                        }
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
        // Dropping the active barrier opens the gate and releases its capture; the upload and
        // any staging are cancelled.
        self.uploads.abort_all();
        self.active = None;
        self.restores.stop(&self.shard.slot);
    }

    /// When the active barrier ends by itself, unless the planted bug ignores it.
    fn held_deadline(&self) -> Option<Instant> {
        if self.shard.planted_bug == Some(PlantedBug::IgnoreLease) {
            return None;
        }
        self.active.as_ref()?.phase.deadline()
    }

    fn unknown(&self, backup: BackupId) -> BarrierStatus {
        BarrierStatus {
            backup_id: backup,
            shard_id: self.shard.shard_id.clone(),
            state: BarrierState::Unknown,
            seq: Seq(0),
            hlc: HlcTime::default(),
            lineage: None,
            captured_at: None,
            files: Vec::new(),
            condemned_objects: 0,
            gate_closed: Duration::ZERO,
            bytes_done: 0,
            bytes_total: 0,
            error: None,
        }
    }

    fn failed(&self, backup: &BackupId, code: ErrorCode, message: String) -> BarrierStatus {
        BarrierStatus {
            state: BarrierState::Failed,
            error: Some((code, message)),
            ..self.unknown(backup.clone())
        }
    }

    /// The active barrier, if it is `backup`.
    fn active(&self, backup: &BackupId) -> Option<&Active> {
        self.active
            .as_ref()
            .filter(|active| active.backup == *backup)
    }

    /// Whether the participant holds or remembers `backup`.
    fn knows(&self, backup: &BackupId) -> bool {
        self.active(backup).is_some() || self.outcomes.contains(backup)
    }

    /// The status of a barrier: live if active, else remembered, else `Unknown`.
    fn snapshot(&self, backup: &BackupId) -> BarrierStatus {
        if let Some(active) = self.active(backup) {
            return active.snapshot();
        }
        match self.outcomes.get(backup) {
            Some(status) => status.clone(),
            None => self.unknown(backup.clone()),
        }
    }

    /// Ends the active barrier in `state` and remembers its outcome.
    fn end_active(&mut self, state: BarrierState, error: Option<(ErrorCode, String)>) {
        if let Some(active) = self.active.take() {
            let backup = active.backup.clone();
            self.outcomes.insert(backup, active.end(state, error));
        }
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Stage {
                backup,
                mode,
                condemned,
                deadline,
                reply,
            } => {
                let status = self.stage(backup, mode, condemned, deadline).await;
                let _ = reply.send(status);
            }
            Msg::Prepare {
                backup,
                mode,
                condemned,
                deadline,
                reply,
            } => {
                let status = self.prepare(backup, mode, condemned, deadline).await;
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
                let engine = self.shard.slot.get().ok();
                let _ = reply.send(AgentInfo {
                    shard_id: self.shard.shard_id.clone(),
                    engine: engine.as_ref().map_or("", |e| e.kind()),
                    seq: engine.as_ref().map_or(Seq(0), |e| e.latest_seq()),
                    gate_closed: self.shard.gate.is_closed(),
                    active_backup: self.active.as_ref().map(|active| active.backup.clone()),
                    lineage: self.shard.slot.lineage(),
                });
            }
            Msg::Restore(msg) => {
                let barrier = self.active.as_ref().map(|active| &active.backup);
                self.restores.handle(&self.shard, barrier, msg).await;
            }
        }
    }

    /// The status of a capture just taken or cut (its state comes from the phase).
    fn held_status(&self, backup: &BackupId, captured: &CapturedShard) -> BarrierStatus {
        BarrierStatus {
            backup_id: backup.clone(),
            shard_id: self.shard.shard_id.clone(),
            state: BarrierState::Staged,
            seq: captured.seq,
            hlc: captured.hlc,
            lineage: Some(captured.lineage),
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
            condemned_objects: captured.condemned.as_ref().map_or(0, |c| c.count()),
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
        condemned: CondemnedSet,
        deadline: Instant,
    ) -> BarrierStatus {
        if self.knows(&backup) {
            return self.snapshot(&backup);
        }
        if let Some(refused) = self.refuse_busy(&backup) {
            return refused;
        }
        let capture_dir = self.shard.options.capture_dir(&backup);
        let captured =
            match check_free_space(&self.shard.options).and_then(|()| self.shard.slot.get()) {
                Ok(engine) => {
                    let lineage = self.shard.slot.lineage();
                    stage_capture(&engine, capture_dir, lineage, mode).await
                }
                Err(err) => Err(err),
            };
        let captured = match captured {
            Ok(captured) => CapturedShard {
                condemned,
                ..captured
            },
            Err(err) => {
                let status = self.failed(&backup, err.code, err.chain());
                self.outcomes.insert(backup, status.clone());
                return status;
            }
        };
        tracing::info!(backup = %backup, shard = %self.shard.shard_id, files_seq = %captured.capture.seq, stage_us = captured.capture_us, "staged: shard captured, gate open");
        self.active = Some(Active {
            backup: backup.clone(),
            status: self.held_status(&backup, &captured),
            phase: Phase::Staged { captured, deadline },
        });
        self.held_until(deadline, &backup)
    }

    /// The status of a capture just taken or cut, releasing it at once if its `deadline`
    /// passed while it was being taken.
    fn held_until(&mut self, deadline: Instant, backup: &BackupId) -> BarrierStatus {
        if Instant::now() >= deadline && self.shard.planted_bug != Some(PlantedBug::IgnoreLease) {
            self.expire();
        }
        self.snapshot(backup)
    }

    /// `Some(refusal)` when another barrier or a restore holds the shard.
    fn refuse_busy(&self, backup: &BackupId) -> Option<BarrierStatus> {
        let shard = &self.shard.shard_id;
        let busy = if let Some(active) = &self.active {
            format!("shard {shard} is busy with backup {}", active.backup)
        } else if let Some(restore) = self.restores.holder() {
            format!("shard {shard} is being restored ({restore})")
        } else {
            return None;
        };
        Some(self.failed(backup, ErrorCode::BarrierBusy, busy))
    }

    /// Phase 1: closes the gate and cuts the staged shard (staging first when no Stage came),
    /// then holds the gate closed until Commit, Abort or `deadline`.
    async fn prepare(
        &mut self,
        backup: BackupId,
        mode: CaptureMode,
        condemned: CondemnedSet,
        deadline: Instant,
    ) -> BarrierStatus {
        if !self.knows(&backup) {
            // No Stage came for this barrier: stage now, with the gate still open.
            let staged = self.stage(backup.clone(), mode, condemned, deadline).await;
            if staged.state != BarrierState::Staged {
                return staged;
            }
        }
        let is_staged = self
            .active(&backup)
            .is_some_and(|active| matches!(active.phase, Phase::Staged { .. }));
        if !is_staged {
            return self.snapshot(&backup);
        }
        let engine = match self.shard.slot.get() {
            Ok(engine) => engine,
            Err(err) => {
                self.end_active(BarrierState::Failed, Some((err.code, err.chain())));
                return self.snapshot(&backup);
            }
        };
        let mut captured = match self.active.take() {
            Some(Active {
                phase: Phase::Staged { captured, .. },
                ..
            }) => captured,
            // Checked above: the active barrier is this one, staged.
            _ => return self.unknown(backup),
        };
        let closed = close_gate(engine.as_ref(), &self.shard.gate, &mut captured).await;
        drop(engine);
        let lineage = self.shard.slot.lineage();
        if lineage.id != captured.lineage.id {
            // The shipper found a history fork since Stage: the writes up to the cut are not
            // all on the lineage the capture would record.
            drop(closed);
            let status = self.failed(
                &backup,
                ErrorCode::BackupCreationFailed,
                format!(
                    "shard {} moved from {} to {lineage} (a history fork) while backup {backup} was staged; take the backup again",
                    self.shard.shard_id, captured.lineage
                ),
            );
            self.outcomes.insert(backup, status.clone());
            return status;
        }
        let status = self.held_status(&backup, &captured);
        tracing::info!(backup = %backup, shard = %self.shard.shard_id, seq = %status.seq, "prepared: gate closed, shard cut");
        self.active = Some(Active {
            backup: backup.clone(),
            status,
            phase: Phase::Prepared {
                captured,
                closed,
                deadline,
            },
        });
        self.held_until(deadline, &backup)
    }

    /// Ends the active barrier when its stage hold or lease ran out.
    fn expire(&mut self) {
        let Some(active) = self
            .active
            .as_ref()
            .filter(|a| a.phase.deadline().is_some())
        else {
            return;
        };
        let backup = active.backup.clone();
        tracing::warn!(backup = %backup, shard = %self.shard.shard_id, "lease expired before commit: gate reopened, capture dropped");
        self.end_active(
            BarrierState::Expired,
            Some((
                ErrorCode::BarrierLeaseExpired,
                format!("the lease of backup {backup} ran out before Commit"),
            )),
        );
    }

    /// Phase 2: opens the gate and starts the upload (a tag has nothing to upload).
    fn commit(&mut self, backup: BackupId) -> BarrierStatus {
        let prepared = self.active.take_if(|active| {
            active.backup == backup && matches!(active.phase, Phase::Prepared { .. })
        });
        let (mut status, mut captured, closed) = match prepared {
            Some(Active {
                status,
                phase: Phase::Prepared {
                    captured, closed, ..
                },
                ..
            }) => (status, captured, closed),
            // Only a cut shard commits: a Commit that overtook Prepare, a repeated one, or one
            // after the barrier ended answers from what is known.
            _ => return self.snapshot(&backup),
        };
        captured.paused = closed.open();
        status.gate_closed = captured.paused;
        let gate_closed_us = captured.paused.as_micros() as u64;
        if captured.mode == CaptureMode::Point {
            // A tag: the cut is recorded, nothing to upload.
            tracing::info!(barrier = %backup, shard = %self.shard.shard_id, seq = %captured.seq, gate_closed_us, "restore point committed: gate open");
            status.state = BarrierState::Uploaded;
            self.outcomes.insert(backup, status.clone());
            return status;
        }
        let progress = Arc::new(Progress::default());
        tracing::info!(backup = %backup, shard = %self.shard.shard_id, gate_closed_us, "committed: gate open, uploading");
        // A GC sweep may delete what it condemned: the upload writes such objects again.
        let repo = match &captured.condemned {
            Some(condemned) => self.shard.repo.avoiding(condemned.clone()),
            None => self.shard.repo.clone(),
        };
        let (repo, shard, transfer, id) = (
            repo,
            self.shard.shard_id.clone(),
            self.shard.options.transfer,
            backup.clone(),
        );
        let engine = self.shard.slot.get().map(|engine| Arc::clone(&*engine));
        let task_progress = progress.clone();
        let stop = CancellationToken::new();
        let task_stop = stop.clone();
        let upload = async move {
            let result = match engine {
                Ok(engine) => {
                    upload_capture(
                        captured,
                        engine,
                        &repo,
                        &shard,
                        &id,
                        transfer,
                        &task_progress,
                        &task_stop,
                    )
                    .await
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
        self.active = Some(Active {
            backup: backup.clone(),
            status,
            phase: Phase::Uploading { progress, stop },
        });
        self.snapshot(&backup)
    }

    fn abort(&mut self, backup: BackupId) -> BarrierStatus {
        let phase = self.active(&backup).map(|active| active.phase.state());
        if matches!(phase, Some(BarrierState::Staged | BarrierState::Prepared)) {
            tracing::info!(backup = %backup, shard = %self.shard.shard_id, "aborted: gate reopened, capture dropped");
            self.end_active(BarrierState::Aborted, None);
        } else if let Some(Phase::Uploading { stop, .. }) =
            self.active.as_ref().map(|active| &active.phase)
            && phase == Some(BarrierState::Uploading)
        {
            // The backup failed elsewhere: its upload would only hold the capture (file
            // deletions, WAL) and the shard for nothing. The task stops at its next step, or
            // finishes a publish it began; the barrier stays `Uploading` until it has ended
            // (then `Aborted`, or `Uploaded`), so whoever waits for it to stop can then clean
            // up knowing nothing lands later.
            tracing::info!(backup = %backup, shard = %self.shard.shard_id, "abort while uploading: stopping the upload");
            stop.cancel();
        } else if !self.knows(&backup) {
            // Remember the abort, so a Prepare that arrives late does not capture.
            let status = BarrierStatus {
                state: BarrierState::Aborted,
                ..self.unknown(backup.clone())
            };
            self.outcomes.insert(backup.clone(), status);
        }
        self.snapshot(&backup)
    }

    /// The upload task panicked: the barrier it served fails (it never ends otherwise).
    fn upload_panicked(&mut self, err: &tokio::task::JoinError) {
        tracing::error!(error = %err, shard = %self.shard.shard_id, "upload task failed");
        let uploading = self
            .active
            .as_ref()
            .is_some_and(|active| matches!(active.phase, Phase::Uploading { .. }));
        if uploading {
            self.end_active(
                BarrierState::Failed,
                Some((
                    ErrorCode::BackupCreationFailed,
                    format!("the upload task failed: {err}"),
                )),
            );
        }
    }

    fn upload_finished(&mut self, backup: BackupId, result: Result<ShardManifest>) {
        let uploading = self
            .active(&backup)
            .is_some_and(|active| matches!(active.phase, Phase::Uploading { .. }));
        if !uploading {
            return;
        }
        match result {
            Ok(manifest) => {
                tracing::info!(backup = %backup, shard = %self.shard.shard_id, bytes = manifest.stats.bytes_total, "uploaded: shard manifest published");
                if manifest.wal_after.is_none() {
                    self.shard.shipper.note_full_backup(manifest.seq);
                }
                self.end_active(BarrierState::Uploaded, None);
            }
            Err(err) if err.code == ErrorCode::BarrierAborted => {
                tracing::info!(backup = %backup, shard = %self.shard.shard_id, "upload stopped by Abort; capture dropped");
                self.end_active(BarrierState::Aborted, Some((err.code, err.chain())));
            }
            Err(err) => {
                tracing::error!(backup = %backup, shard = %self.shard.shard_id, error = %err.chain(), "upload failed");
                self.end_active(BarrierState::Failed, Some((err.code, err.chain())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lockstep_repository::{BackupId, ErrorCode};

    use super::testing::{TestShard, backup_id};
    use super::*;

    const LEASE: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn stage_prepare_commit_cuts_under_the_closed_gate_and_uploads_with_it_open() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        shard.write("before");
        let staged = shard.stage(&id).await;
        assert_eq!(staged.state, BarrierState::Staged);
        assert!(!shard.gate.is_closed(), "Stage keeps the gate open");
        shard.write("between");
        let prepared = shard.prepare(&id, LEASE).await;
        assert_eq!(prepared.state, BarrierState::Prepared);
        assert!(shard.gate.is_closed(), "Prepare closes the gate");
        assert_eq!(
            prepared.seq,
            shard.seq(),
            "the cut is the shard's sequence number"
        );
        assert!(prepared.seq > staged.seq);
        let committed = shard.commit(&id).await;
        assert_eq!(committed.state, BarrierState::Uploading);
        assert!(!shard.gate.is_closed(), "Commit opens the gate");
        let uploaded = shard.wait_for(&id, BarrierState::Uploaded).await;
        assert_eq!(uploaded.seq, prepared.seq);
        let manifest = shard
            .repo
            .shard_manifest(&shard.shard_id, &id)
            .await
            .expect("the shard manifest is published");
        assert_eq!(manifest.seq, prepared.seq);
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_never_names_a_condemned_object_and_writes_its_next_copy() {
        use lockstep_repository::gc::{Condemned, ObjectKey};
        let shard = TestShard::start().await;
        shard.write("a");
        let named = |manifest: &lockstep_repository::manifest::ShardManifest| -> Vec<ObjectKey> {
            let files = manifest.files.iter().flat_map(|f| f.chunks.iter());
            files
                .chain(manifest.wal.iter().map(|p| &p.chunk))
                .map(|c| c.key())
                .collect()
        };
        let first = backup_id("bk-1");
        shard.backup_avoiding(&first, None).await;
        let first = shard.repo.shard_manifest(&shard.shard_id, &first).await;
        let first = named(&first.expect("manifest"));
        // A sweep condemns everything bk-1 named; nothing was written since, so bk-2 holds
        // the same content.
        let condemned = Arc::new(Condemned::new(first.iter()));
        let second = backup_id("bk-2");
        let prepared = shard
            .backup_avoiding(&second, Some(condemned.clone()))
            .await;
        assert_eq!(
            prepared.condemned_objects,
            first.len() as u64,
            "the agent echoes the filter it took"
        );
        let manifest = shard.repo.shard_manifest(&shard.shard_id, &second).await;
        let manifest = manifest.expect("manifest");
        let second = named(&manifest);
        assert!(second.iter().all(|key| !condemned.contains(key)));
        assert!(
            second
                .iter()
                .any(|(id, copy)| *copy == 1 && first.contains(&(*id, 0))),
            "the same content is written again as copy 1: {second:?}"
        );
        // The sweep deletes what it condemned; bk-2 is whole.
        shard.repo.delete_objects(&first).await.expect("sweep");
        let chunks = manifest.files.iter().flat_map(|f| f.chunks.iter());
        for chunk in chunks.chain(manifest.wal.iter().map(|p| &p.chunk)) {
            shard.repo.get_object(chunk).await.expect("bk-2's object");
        }
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_stage_returns_the_held_capture() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        let first = shard.stage(&id).await;
        shard.write("after-stage");
        let again = shard.stage(&id).await;
        assert_eq!(again.state, BarrierState::Staged);
        assert_eq!(again.seq, first.seq, "no second capture");
        assert_eq!(again.captured_at, first.captured_at);
        assert!(!shard.gate.is_closed());
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_prepare_is_answered_from_the_record() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        let first = shard.prepare(&id, LEASE).await;
        assert_eq!(first.state, BarrierState::Prepared);
        // A write past the gate would move a new cut; the repeat keeps the first one.
        shard.write("past-the-gate");
        let again = shard.prepare(&id, LEASE).await;
        assert_eq!(again.state, BarrierState::Prepared);
        assert_eq!(again.seq, first.seq, "no second cut");
        assert!(shard.gate.is_closed(), "the gate stays closed");
        let info = shard.handle.describe().await.expect("describe");
        assert_eq!(info.active_backup, Some(id.clone()));
        assert!(info.gate_closed);
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_prepare_without_stage_stages_first_and_closes() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        shard.write("k");
        let prepared = shard.prepare(&id, LEASE).await;
        assert_eq!(prepared.state, BarrierState::Prepared);
        assert_eq!(prepared.seq, shard.seq());
        assert!(shard.gate.is_closed());
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_before_prepare_does_nothing() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        shard.stage(&id).await;
        let early = shard.commit(&id).await;
        assert_eq!(early.state, BarrierState::Staged);
        assert!(!shard.gate.is_closed());
        // The barrier goes on as if the Commit had not come.
        let prepared = shard.prepare(&id, LEASE).await;
        assert_eq!(prepared.state, BarrierState::Prepared);
        assert!(shard.gate.is_closed());
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_for_an_unknown_barrier_is_unknown() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-never");
        let status = shard.commit(&id).await;
        assert_eq!(status.state, BarrierState::Unknown);
        assert!(!shard.gate.is_closed());
        assert_eq!(shard.active_backup().await, None);
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_reopens_the_gate_and_a_later_commit_or_prepare_returns_aborted() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        shard.prepare(&id, LEASE).await;
        assert!(shard.gate.is_closed());
        let aborted = shard.abort(&id).await;
        assert_eq!(aborted.state, BarrierState::Aborted);
        assert!(!shard.gate.is_closed());
        let commit = shard.commit(&id).await;
        assert_eq!(
            commit.state,
            BarrierState::Aborted,
            "never reopens a capture"
        );
        let prepare = shard.prepare(&id, LEASE).await;
        assert_eq!(prepare.state, BarrierState::Aborted);
        assert!(!shard.gate.is_closed());
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_before_stage_makes_a_late_stage_or_prepare_do_nothing() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        let aborted = shard.abort(&id).await;
        assert_eq!(aborted.state, BarrierState::Aborted);
        assert_eq!(shard.stage(&id).await.state, BarrierState::Aborted);
        assert_eq!(shard.prepare(&id, LEASE).await.state, BarrierState::Aborted);
        assert!(
            !shard.gate.is_closed(),
            "a late Prepare never closes the gate"
        );
        assert_eq!(shard.active_backup().await, None, "nothing was captured");
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_while_uploading_stops_the_upload_and_frees_the_shard() {
        let shard = TestShard::start().await;
        // Enough data that the upload is still running when the Abort arrives.
        for i in 0..20_000 {
            shard.write(&format!("key-{i:06}-{}", "x".repeat(200)));
        }
        let id = backup_id("bk-1");
        shard.prepare(&id, LEASE).await;
        assert_eq!(shard.commit(&id).await.state, BarrierState::Uploading);
        let abort = shard.abort(&id).await;
        assert_eq!(abort.state, BarrierState::Uploading, "stopping");
        let stopped = shard.wait_for(&id, BarrierState::Aborted).await;
        assert_eq!(
            stopped.error.map(|(code, _)| code),
            Some(ErrorCode::BarrierAborted)
        );
        assert!(
            shard
                .repo
                .shard_manifest(&shard.shard_id, &id)
                .await
                .is_err(),
            "the stopped upload published its shard manifest"
        );
        // The capture is released: the next barrier is not refused busy.
        let next = backup_id("bk-2");
        assert_eq!(shard.stage(&next).await.state, BarrierState::Staged);
        shard.abort(&next).await;
        // Later messages find it aborted.
        assert_eq!(shard.abort(&id).await.state, BarrierState::Aborted);
        assert_eq!(shard.commit(&id).await.state, BarrierState::Aborted);
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_after_the_upload_ended_returns_its_final_state() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        shard.prepare(&id, LEASE).await;
        shard.commit(&id).await;
        shard.wait_for(&id, BarrierState::Uploaded).await;
        let late = shard.abort(&id).await;
        assert_eq!(late.state, BarrierState::Uploaded);
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_running_out_reopens_the_gate_by_itself() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        shard.prepare(&id, LEASE).await;
        tokio::time::sleep(LEASE - Duration::from_millis(1)).await;
        assert!(shard.gate.is_closed(), "closed for the whole lease");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(!shard.gate.is_closed(), "reopened when the lease ran out");
        let status = shard.status(&id).await;
        assert_eq!(status.state, BarrierState::Expired);
        assert_eq!(
            status.error.map(|(code, _)| code),
            Some(ErrorCode::BarrierLeaseExpired)
        );
        assert!(status.gate_closed >= LEASE);
        let commit = shard.commit(&id).await;
        assert_eq!(
            commit.state,
            BarrierState::Expired,
            "a late Commit uploads nothing"
        );
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_stage_hold_running_out_frees_the_shard() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        shard.stage(&id).await;
        tokio::time::sleep(testing::HOLD + Duration::from_millis(1)).await;
        assert_eq!(shard.status(&id).await.state, BarrierState::Expired);
        assert_eq!(shard.active_backup().await, None);
        let next = backup_id("bk-2");
        assert_eq!(shard.stage(&next).await.state, BarrierState::Staged);
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_barrier_while_one_is_held_is_refused_busy() {
        let shard = TestShard::start().await;
        let (first, second) = (backup_id("bk-1"), backup_id("bk-2"));
        shard.prepare(&first, LEASE).await;
        for refused in [
            shard.stage(&second).await,
            shard.prepare(&second, LEASE).await,
        ] {
            assert_eq!(refused.state, BarrierState::Failed);
            assert_eq!(
                refused.error.map(|(code, _)| code),
                Some(ErrorCode::BarrierBusy)
            );
        }
        // A refusal is not remembered: the barrier can run once the shard is free.
        assert_eq!(shard.status(&second).await.state, BarrierState::Unknown);
        assert_eq!(shard.status(&first).await.state, BarrierState::Prepared);
        assert!(
            shard.gate.is_closed(),
            "the first barrier still holds the gate"
        );
        shard.abort(&first).await;
        assert_eq!(shard.stage(&second).await.state, BarrierState::Staged);
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_commits_without_uploading() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-tag");
        let prepared = shard
            .handle
            .prepare(id.clone(), CaptureMode::Point, None, LEASE, None)
            .await
            .expect("prepare");
        assert_eq!(prepared.state, BarrierState::Prepared);
        assert!(shard.gate.is_closed());
        let committed = shard.commit(&id).await;
        assert_eq!(committed.state, BarrierState::Uploaded);
        assert!(!shard.gate.is_closed());
        assert_eq!(shard.active_backup().await, None);
        assert!(
            shard
                .repo
                .shard_manifest(&shard.shard_id, &id)
                .await
                .is_err()
        );
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_the_participant_opens_the_gate() {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        shard.prepare(&id, LEASE).await;
        let gate = shard.gate.clone();
        assert!(gate.is_closed());
        shard.stop().await;
        assert!(!gate.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn the_planted_bug_keeps_the_gate_closed_past_the_lease() {
        let shard = TestShard::start_with(Some(PlantedBug::IgnoreLease)).await;
        let id = backup_id("bk-1");
        shard.prepare(&id, LEASE).await;
        tokio::time::sleep(LEASE * 3).await;
        assert!(shard.gate.is_closed());
        assert_eq!(shard.status(&id).await.state, BarrierState::Prepared);
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_are_remembered_per_id() {
        let shard = TestShard::start().await;
        let ids: Vec<BackupId> = (0..3).map(|i| backup_id(&format!("bk-{i}"))).collect();
        for id in &ids {
            shard.abort(id).await;
        }
        for id in &ids {
            assert_eq!(shard.status(id).await.state, BarrierState::Aborted);
        }
        assert_eq!(
            shard.status(&backup_id("bk-other")).await.state,
            BarrierState::Unknown
        );
        shard.stop().await;
    }
}
