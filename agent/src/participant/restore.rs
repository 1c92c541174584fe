//! The participant's side of the cluster restore (ARCHITECTURE.md, "The cluster restore
//! protocol"): stage a backup of the shard beside it (or beside a target directory), then swap
//! it in under the closed gate (or rename it into the target) and hold it there until the
//! restore's decision, then commit it or revert to the old shard; or discard a staged one.
//! Nothing reaches a target before Apply, and nothing reads or writes the restored shard
//! before the commit, so a restore that fails on any shard leaves every shard as it was.
//!
//! A restore's state is one value. While it holds the shard it is the active restore, whose
//! [`Phase`] owns what it holds: `Staging` (the staging task and its progress), `Staged` (the
//! checked shard, waiting for Apply) or `Swapped` (the restored shard in place, the gate closed
//! and the old shard aside; or the restored shard in its target). When it ends, its final
//! status (`Applied`, `Discarded` or `Failed`) joins the last 256 outcomes, which answer
//! repeated and late messages.
//!
//! Duplicated or reordered messages change nothing:
//! - RestoreStage for a known id returns its status (one staging per id); a new one while a
//!   barrier or another restore holds the shard is refused with `ERR_BARRIER_BUSY`.
//! - RestoreApply swaps only a `Staged` restore; repeated, before staging ended, or after a
//!   discard, it returns the status; for an id never staged it is `ERR_INVALID_ARGUMENT`.
//! - RestoreCommit commits only a `Swapped` restore; otherwise it returns the status.
//! - RestoreDiscard ends a `Staging` restore (its task is cancelled), a `Staged` one (its
//!   directory is removed) or a `Swapped` one (reverted); after it ended, or for an unknown
//!   id, it returns the status.
//! - A `Swapped` restore whose lease runs out asks the repository for its decision, deciding
//!   revert if there is none, and follows it; while the repository cannot answer it holds.
//!
//! Invariant: the live shard (or a target directory) changes only in Apply, the live shard
//! under the closed gate, which stays closed until the restore commits or reverts; a restore
//! holds the shard (no barrier starts) from Stage until it ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lockstep_repository::lineage::Leg;
use lockstep_repository::repository::RestoreDecision;
use lockstep_repository::transfer::Progress;
use lockstep_repository::{BackupId, Error, ErrorCode, Lineage, RestoreId, Result, Seq, ShardId};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use super::{Msg as ParticipantMsg, ParticipantHandle, REMEMBERED, ShardParts};
use crate::engine::ShardEngine;
use crate::gate::GateClosed;
use crate::lineage::{HistorySources, next_timeline};
use crate::restore::{
    Replay, StagedShard, check_target, mark_committed, remove_restored, replay_staged, stage_empty,
    stage_shard,
};
use crate::slot::{EngineSlot, SwappedIn};
use lockstep_repository::remembered::Remembered;

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
    /// Point-in-time recovery: then replay the WAL archive at this URL, leg by leg.
    pub archive: Option<(String, Vec<Leg>)>,
    /// The lineage that holds the restore point: the restored shard's history continues it.
    pub point: Lineage,
    /// Where any replay stops, exactly (ignored with no chain and no archive).
    pub to: Seq,
    /// Discard the restore by itself when no message about it came for this long.
    pub lease: Duration,
    /// Keep only these column families (never in place); empty: all.
    pub column_families: Vec<String>,
}

/// The lease of a restore whose request names none.
pub const DEFAULT_RESTORE_LEASE: Duration = Duration::from_secs(30);

/// Where a restore stands on this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreState {
    Staging,
    Staged,
    /// In place (or in its target) and checked; held until the restore commits or reverts.
    Swapped,
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

/// The restore messages of the participant.
pub(super) enum Msg {
    /// Phase 1: download and check, in the background.
    Stage {
        request: Box<RestoreRequest>,
        reply: oneshot::Sender<Result<RestoreStatus>>,
    },
    /// The status of one restore.
    Status {
        restore_id: String,
        reply: oneshot::Sender<RestoreStatus>,
    },
    /// Phase 2: swap the staged shard in under the closed gate, and hold.
    Apply {
        restore_id: String,
        reply: oneshot::Sender<Result<RestoreStatus>>,
    },
    /// Phase 3, the restore decided commit: keep the swapped shard and open the gate.
    Commit {
        restore_id: String,
        reply: oneshot::Sender<Result<RestoreStatus>>,
    },
    /// Drop a staging or staged restore, or revert a swapped one.
    Discard {
        restore_id: String,
        reply: oneshot::Sender<RestoreStatus>,
    },
}

impl ParticipantHandle {
    pub async fn restore_stage(&self, request: RestoreRequest) -> Result<RestoreStatus> {
        self.ask(|reply| {
            ParticipantMsg::Restore(Msg::Stage {
                request: Box::new(request),
                reply,
            })
        })
        .await?
    }

    pub async fn restore_status(&self, restore_id: String) -> Result<RestoreStatus> {
        self.ask(|reply| ParticipantMsg::Restore(Msg::Status { restore_id, reply }))
            .await
    }

    pub async fn restore_apply(&self, restore_id: String) -> Result<RestoreStatus> {
        self.ask(|reply| ParticipantMsg::Restore(Msg::Apply { restore_id, reply }))
            .await?
    }

    pub async fn restore_commit(&self, restore_id: String) -> Result<RestoreStatus> {
        self.ask(|reply| ParticipantMsg::Restore(Msg::Commit { restore_id, reply }))
            .await?
    }

    pub async fn restore_discard(&self, restore_id: String) -> Result<RestoreStatus> {
        self.ask(|reply| ParticipantMsg::Restore(Msg::Discard { restore_id, reply }))
            .await
    }
}

/// The restore holding the shard.
struct Active<E> {
    /// What RestoreStatus reports; its state and progress come from `phase` when reported.
    status: RestoreStatus,
    phase: Phase<E>,
    lease: Duration,
    /// When the restore is discarded (or, swapped, decided) unless a message about it comes
    /// first.
    deadline: Instant,
}

/// Where the active restore stands; each phase owns what it holds.
enum Phase<E> {
    /// Downloading and checking in `task`.
    Staging {
        task: AbortHandle,
        progress: Arc<Progress>,
    },
    /// Checked and waiting for Apply (a swap in place, or a rename into its target).
    Staged(StagedShard),
    /// Applied and waiting for the restore's decision.
    Swapped(Held<E>),
}

/// What a swapped restore holds until its decision.
enum Held<E> {
    /// The restored shard is open in the slot, which it holds exclusively; the old one is
    /// aside; the gate is closed.
    InPlace {
        swapped: SwappedIn<E>,
        gate: GateClosed,
    },
    /// The restored shard is in its target directory, marked undecided.
    Target(PathBuf),
}

impl<E> Active<E> {
    fn snapshot(&self) -> RestoreStatus {
        let mut status = self.status.clone();
        match &self.phase {
            Phase::Staging { progress, .. } => {
                status.state = RestoreState::Staging;
                (status.bytes_done, status.bytes_total) = progress.snapshot();
            }
            Phase::Staged(_) => status.state = RestoreState::Staged,
            Phase::Swapped(_) => status.state = RestoreState::Swapped,
        }
        status
    }
}

/// How long a swapped restore whose lease ran out waits for the repository to give its
/// decision, and then before it asks again.
const DECISION_TIMEOUT: Duration = Duration::from_secs(10);

/// The restores of one shard: the active one, the outcomes of finished ones, and the staging
/// tasks.
pub(super) struct Restores<E> {
    active: Option<Active<E>>,
    outcomes: Remembered<String, RestoreStatus>,
    /// The active restore's staging task, and discarded ones' until they end.
    pub(super) stagings: JoinSet<(String, Result<StagedShard>)>,
}

impl<E: ShardEngine> Restores<E> {
    pub(super) fn new() -> Restores<E> {
        Restores {
            active: None,
            outcomes: Remembered::new(REMEMBERED),
            stagings: JoinSet::new(),
        }
    }

    /// The restore holding the shard, if any.
    pub(super) fn holder(&self) -> Option<&str> {
        self.active
            .as_ref()
            .map(|active| active.status.restore_id.as_str())
    }

    /// Cancels any staging and drops a staged shard (which removes its directory). A shard
    /// swapped in and undecided is closed and the slot left empty (every operation fails
    /// "retry"): the process is ending, and its next start settles the shard by the
    /// restore's decision.
    pub(super) fn stop(&mut self, slot: &EngineSlot<E>) {
        self.stagings.abort_all();
        if let Some(Active {
            phase: Phase::Swapped(Held::InPlace { swapped, gate }),
            ..
        }) = self.active.take()
        {
            slot.abandon(swapped);
            drop(gate);
        }
    }

    /// When the active restore's lease runs out.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.active.as_ref().map(|active| active.deadline)
    }

    /// Ends the active restore if its lease ran out: its coordinator went away. A staging or
    /// staged restore is discarded; a swapped one follows the restore's decision, deciding
    /// revert if there is none (it cannot know whether the others swapped).
    pub(super) async fn expire(&mut self, shard: &ShardParts<E>) {
        let shard_id = &shard.shard_id;
        let Some(active) = self
            .active
            .as_ref()
            .filter(|active| active.deadline <= Instant::now())
        else {
            return;
        };
        let restore_id = active.status.restore_id.clone();
        let lease_ms = active.lease.as_millis() as u64;
        if matches!(active.phase, Phase::Swapped(_)) {
            tracing::warn!(restore = %restore_id, shard = %shard_id, lease_ms, "restore: swapped in and no word from its coordinator within the lease; following the restore's decision");
            if let Err(err) = self.follow_decision(shard, &restore_id, None).await {
                tracing::error!(restore = %restore_id, shard = %shard_id, error = %err.chain(), "restore: the decision cannot be read or carried out; holding the shard, trying again in 10 s");
                self.renew_for(&restore_id, DECISION_TIMEOUT);
            }
            return;
        }
        tracing::warn!(restore = %restore_id, shard = %shard_id, lease_ms, "restore: no word from its coordinator within the lease; discarding it");
        let Some(active) = self.active.take() else {
            return;
        };
        let mut status = active.snapshot();
        if let Phase::Staging { task, .. } = &active.phase {
            task.abort();
        }
        // Dropping a staged shard removes its staging directory.
        drop(active);
        status.state = RestoreState::Discarded;
        status.error = Some((
            ErrorCode::BarrierLeaseExpired,
            "no word from the coordinator within the restore's lease".into(),
        ));
        self.outcomes.insert(restore_id, status);
    }

    /// The active restore `restore_id`, if any, is held for `wait` more.
    fn renew_for(&mut self, restore_id: &str, wait: Duration) {
        if let Some(active) = self
            .active
            .as_mut()
            .filter(|active| active.status.restore_id == restore_id)
        {
            active.deadline = Instant::now() + wait;
        }
    }

    /// A message about `restore_id` came: its lease starts again.
    fn renew(&mut self, restore_id: &str) {
        let lease = self.active.as_ref().map(|active| active.lease);
        if let Some(lease) = lease {
            self.renew_for(restore_id, lease);
        }
    }

    fn active(&self, restore_id: &str) -> Option<&Active<E>> {
        self.active
            .as_ref()
            .filter(|active| active.status.restore_id == restore_id)
    }

    fn knows(&self, restore_id: &str) -> bool {
        self.active(restore_id).is_some() || self.outcomes.contains(restore_id)
    }

    fn unknown(shard_id: &ShardId, restore_id: &str) -> RestoreStatus {
        RestoreStatus {
            restore_id: restore_id.to_string(),
            backup_id: None,
            shard_id: shard_id.clone(),
            state: RestoreState::Unknown,
            seq: Seq(0),
            bytes_done: 0,
            bytes_total: 0,
            n_files: 0,
            target: None,
            error: None,
        }
    }

    /// The status of a restore: live if active, else remembered, else `Unknown`.
    fn snapshot(&self, shard_id: &ShardId, restore_id: &str) -> RestoreStatus {
        if let Some(active) = self.active(restore_id) {
            return active.snapshot();
        }
        match self.outcomes.get(restore_id) {
            Some(status) => status.clone(),
            None => Self::unknown(shard_id, restore_id),
        }
    }

    /// Handles one restore message; `barrier` is the barrier holding the shard, if any.
    pub(super) async fn handle(
        &mut self,
        shard: &ShardParts<E>,
        barrier: Option<&BackupId>,
        msg: Msg,
    ) {
        match msg {
            Msg::Stage { request, reply } => {
                self.renew(&request.restore_id);
                let _ = reply.send(self.stage(shard, barrier, *request));
            }
            Msg::Status { restore_id, reply } => {
                self.renew(&restore_id);
                let _ = reply.send(self.snapshot(&shard.shard_id, &restore_id));
            }
            Msg::Apply { restore_id, reply } => {
                let _ = reply.send(self.apply(shard, restore_id).await);
            }
            Msg::Commit { restore_id, reply } => {
                let _ = reply.send(self.commit(shard, restore_id).await);
            }
            Msg::Discard { restore_id, reply } => {
                let _ = reply.send(self.discard(shard, restore_id).await);
            }
        }
    }

    fn stage(
        &mut self,
        shard: &ShardParts<E>,
        barrier: Option<&BackupId>,
        request: RestoreRequest,
    ) -> Result<RestoreStatus> {
        let shard_id = &shard.shard_id;
        if self.knows(&request.restore_id) {
            return Ok(self.snapshot(shard_id, &request.restore_id));
        }
        if let Some(backup) = barrier {
            return Err(Error::new(
                ErrorCode::BarrierBusy,
                format!("shard {shard_id} is busy with backup {backup}"),
            ));
        }
        if let Some(restore) = self.holder() {
            return Err(Error::new(
                ErrorCode::BarrierBusy,
                format!("shard {shard_id} is busy with restore {restore}"),
            ));
        }
        if request.target.is_none() && !request.column_families.is_empty() {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                "a selective restore goes into a directory: in place it would drop the live shard's other column families",
            ));
        }
        if let Some(target) = &request.target {
            if std::path::absolute(target).ok().as_deref()
                == std::path::absolute(shard.slot.dir()).ok().as_deref()
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
        if let Some((_, legs)) = &request.archive {
            lockstep_repository::lineage::check_legs(legs, &request.point)?;
        }
        let live = shard.slot.get()?;
        let (engine_kind, column_families) = (live.kind(), live.column_families());
        drop(live);
        let progress = Arc::new(Progress::default());
        let (repo, shard_id_task, backup, transfer, live) = (
            shard.repo.clone(),
            shard_id.clone(),
            request.backup.clone(),
            shard.options.transfer,
            shard.slot.dir().to_path_buf(),
        );
        let (id, target, task_progress) = (
            request.restore_id.clone(),
            request.target.clone(),
            progress.clone(),
        );
        let replay = (!request.chain.is_empty() || request.archive.is_some())
            .then(|| (request.chain.clone(), request.archive.clone(), request.to));
        let sources = HistorySources {
            shard: shard_id.clone(),
            destinations: shard.shipper.destinations().to_vec(),
            repo: Some(shard.repo.clone()),
        };
        let (point, current) = (request.point, shard.slot.lineage().timeline);
        let keep = request.column_families.clone();
        let security = shard.security.clone();
        let task = self.stagings.spawn(async move {
            let shard = shard_id_task;
            // In place, or when replaying, the backup must come from this agent's engine.
            let engine = (target.is_none() || replay.is_some()).then_some(engine_kind);
            let stage_target = target.clone().unwrap_or(live);
            let result = async {
                // Numbered first: a source that cannot be read refuses the restore before
                // anything is downloaded.
                let timeline = next_timeline(current.max(point.timeline), &sources).await?;
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
                    let (archive, legs) = match archive {
                        Some((url, legs)) => {
                            (
                                Some(
                                    lockstep_proto::archive::open_archive(
                                        &url,
                                        &security,
                                        repo.seal(),
                                    )
                                    .await?,
                                ),
                                legs,
                            )
                        }
                        None => (None, Vec::new()),
                    };
                    let replay = Replay {
                        repo: repo.clone(),
                        chain,
                        archive,
                        legs,
                        to,
                    };
                    let started = std::time::Instant::now();
                    let n = replay_staged::<E>(&mut staged, &shard, &replay).await?;
                    let replay_ms = started.elapsed().as_millis() as u64;
                    tracing::info!(shard = %shard, batches = n, seq = %staged.seq, replay_ms, "restore: WAL replayed");
                }
                staged.keep_column_families(&keep).await?;
                let lineage = staged.start_lineage(&point, timeline)?;
                tracing::info!(shard = %shard, from = %point, to = %lineage, "restore: the shard starts a new history");
                Ok(staged)
            }
            .await;
            (id, result)
        });
        tracing::info!(restore = %request.restore_id, backup = ?request.backup, shard = %shard_id, target = ?request.target, "restore: staging");
        let status = RestoreStatus {
            backup_id: request.backup.clone(),
            state: RestoreState::Staging,
            target: request.target.clone(),
            ..Self::unknown(shard_id, &request.restore_id)
        };
        self.active = Some(Active {
            status,
            phase: Phase::Staging { task, progress },
            lease: request.lease,
            deadline: Instant::now() + request.lease,
        });
        Ok(self.snapshot(shard_id, &request.restore_id))
    }

    /// Records what a staging task produced. A task that ends after its restore was
    /// discarded changes nothing.
    pub(super) fn staging_finished(
        &mut self,
        shard_id: &ShardId,
        restore_id: String,
        result: Result<StagedShard>,
    ) {
        let staging = self.active.take_if(|active| {
            active.status.restore_id == restore_id && matches!(active.phase, Phase::Staging { .. })
        });
        let Some(staging) = staging else {
            return;
        };
        let mut status = staging.snapshot();
        match result {
            Ok(staged) => {
                tracing::info!(restore = %restore_id, shard = %shard_id, seq = %staged.seq, "restore: staged and checked");
                status.seq = staged.seq;
                status.n_files = staged.n_files;
                self.active = Some(Active {
                    status,
                    phase: Phase::Staged(staged),
                    lease: staging.lease,
                    deadline: Instant::now() + staging.lease,
                });
            }
            Err(err) => {
                tracing::error!(restore = %restore_id, shard = %shard_id, error = %err.chain(), "restore: staging failed");
                status.state = RestoreState::Failed;
                status.error = Some((err.code, err.chain()));
                self.outcomes.insert(restore_id, status);
            }
        }
    }

    async fn apply(&mut self, shard: &ShardParts<E>, restore_id: String) -> Result<RestoreStatus> {
        let shard_id = &shard.shard_id;
        if !self.knows(&restore_id) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("no restore {restore_id} on shard {shard_id}"),
            ));
        }
        let staged = self.active.take_if(|active| {
            active.status.restore_id == restore_id && matches!(active.phase, Phase::Staged(_))
        });
        let (mut status, mut staged, lease) = match staged {
            Some(Active {
                status,
                phase: Phase::Staged(staged),
                lease,
                ..
            }) => (status, staged, lease),
            // Swapped or applied already (a retry), not staged yet, or ended: the status says
            // which.
            _ => return Ok(self.snapshot(shard_id, &restore_id)),
        };
        staged.undecided = Some(restore_id.clone());
        let seq = staged.seq;
        let held = match &status.target {
            // Into its own directory: the live shard is untouched, no gate closes.
            Some(target) => staged
                .move_to(target)
                .map(|()| Held::Target(target.clone())),
            None => {
                let gate = shard.gate.close().await;
                lockstep_process::fault_pause("restore-swap", &restore_id).await;
                match shard.slot.swap_in(staged).await {
                    Ok(swapped) => Ok(Held::InPlace { swapped, gate }),
                    Err(err) => {
                        let paused = gate.open();
                        tracing::info!(restore = %restore_id, shard = %shard_id, paused_ms = paused.as_millis() as u64, "restore: the gate reopened after a failed swap");
                        Err(err)
                    }
                }
            }
        };
        match held {
            Ok(held) => {
                tracing::info!(restore = %restore_id, shard = %shard_id, seq = %seq, target = ?status.target, "restore: shard swapped in; holding it until the restore's decision");
                status.seq = seq;
                self.active = Some(Active {
                    status,
                    phase: Phase::Swapped(held),
                    lease,
                    deadline: Instant::now() + lease,
                });
                Ok(self.snapshot(shard_id, &restore_id))
            }
            Err(err) => {
                tracing::error!(restore = %restore_id, shard = %shard_id, error = %err.chain(), "restore: swap failed; the live shard is unchanged");
                status.state = RestoreState::Failed;
                status.error = Some((err.code, err.chain()));
                self.outcomes.insert(restore_id, status.clone());
                Ok(status)
            }
        }
    }

    async fn commit(&mut self, shard: &ShardParts<E>, restore_id: String) -> Result<RestoreStatus> {
        self.follow_decision(shard, &restore_id, Some(RestoreDecision::Commit))
            .await?;
        Ok(self.snapshot(&shard.shard_id, &restore_id))
    }

    /// Carries out, on the active restore `restore_id` if it is swapped, the decision stored
    /// in the repository, whoever asks: a Commit needs `commit` stored; a Discard, or a lease
    /// that ran out (`asked` `None`), stores `revert` unless a decision is there. The agent
    /// never acts on a message alone, so a coordinator that was fenced out, or a late
    /// message, cannot split the shards. Anything else is left as it is.
    async fn follow_decision(
        &mut self,
        shard: &ShardParts<E>,
        restore_id: &str,
        asked: Option<RestoreDecision>,
    ) -> Result<()> {
        let swapped = self
            .active(restore_id)
            .is_some_and(|active| matches!(active.phase, Phase::Swapped(_)));
        if !swapped {
            return Ok(());
        }
        let id = RestoreId::new(restore_id)?;
        let by = match asked {
            Some(_) => format!("agent {}, asked by its coordinator", shard.shard_id),
            None => format!("agent {}, its lease ran out", shard.shard_id),
        };
        let stored = async {
            match asked {
                Some(RestoreDecision::Commit) => shard.repo.restore_decision(&id).await,
                _ => shard
                    .repo
                    .decide_restore(&id, RestoreDecision::Revert, &by)
                    .await
                    .map(Some),
            }
        };
        let stored = tokio::time::timeout(DECISION_TIMEOUT, stored)
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorCode::StorageUnavailable,
                    "the repository did not answer within 10 s",
                ))
            })?;
        let Some(decision) = stored else {
            return Err(Error::new(
                ErrorCode::BackupRestorationFailed,
                format!(
                    "no decision is stored for restore {restore_id}; the shard holds until one is"
                ),
            ));
        };
        if asked.is_some_and(|asked| asked != decision) {
            tracing::warn!(restore = %restore_id, shard = %shard.shard_id, ?asked, ?decision, "restore: asked for one outcome, the stored decision says the other; following the decision");
        }
        self.carry_out(shard, restore_id, decision).await
    }

    /// Carries out the restore's decision on the active restore `restore_id` if it is
    /// swapped: commit keeps the restored shard, revert puts the old one back; either way the
    /// gate opens. Anything else is left as it is. A commit whose mark cannot be removed
    /// stays swapped and returns the error.
    async fn carry_out(
        &mut self,
        shard: &ShardParts<E>,
        restore_id: &str,
        decision: RestoreDecision,
    ) -> Result<()> {
        let shard_id = &shard.shard_id;
        let swapped = self.active.take_if(|active| {
            active.status.restore_id == restore_id && matches!(active.phase, Phase::Swapped(_))
        });
        let Some(Active {
            mut status,
            phase: Phase::Swapped(held),
            lease,
            deadline,
        }) = swapped
        else {
            return Ok(());
        };
        let outcome = match (decision, held) {
            (RestoreDecision::Commit, Held::InPlace { swapped, gate }) => {
                match shard.slot.commit(swapped).await {
                    Ok(()) => {
                        let paused = gate.open();
                        tracing::info!(restore = %restore_id, shard = %shard_id, paused_ms = paused.as_millis() as u64, "restore: committed; the gate reopened");
                        Ok(RestoreState::Applied)
                    }
                    Err((swapped, err)) => Err((Held::InPlace { swapped, gate }, err)),
                }
            }
            (RestoreDecision::Commit, Held::Target(target)) => {
                let dir = target.clone();
                match lockstep_repository::blocking::run(move || mark_committed(&dir)).await {
                    Ok(Ok(())) => Ok(RestoreState::Applied),
                    Ok(Err(err)) => Err((Held::Target(target), err)),
                    Err(join) => Err((
                        Held::Target(target),
                        Error::with_source(ErrorCode::BackupRestorationFailed, "commit", join),
                    )),
                }
            }
            (RestoreDecision::Revert, Held::InPlace { swapped, gate }) => {
                let reverted = shard.slot.revert(swapped).await;
                let paused = gate.open();
                tracing::warn!(restore = %restore_id, shard = %shard_id, paused_ms = paused.as_millis() as u64, "restore: reverted to the shard it replaced; the gate reopened");
                Ok(match reverted {
                    Ok(()) => RestoreState::Discarded,
                    Err(err) => {
                        status.error = Some((err.code, err.chain()));
                        RestoreState::Failed
                    }
                })
            }
            (RestoreDecision::Revert, Held::Target(target)) => {
                let dir = target.clone();
                let removed = lockstep_repository::blocking::run(move || remove_restored(&dir))
                    .await
                    .map_err(|join| {
                        Error::with_source(ErrorCode::BackupRestorationFailed, "revert", join)
                    })
                    .and_then(|removed| removed);
                if let Err(err) = removed {
                    tracing::error!(restore = %restore_id, shard = %shard_id, target = %target.display(), error = %err.chain(), "restore: reverted, but its target could not be removed");
                    status.error = Some((err.code, err.chain()));
                }
                Ok(RestoreState::Discarded)
            }
        };
        match outcome {
            Ok(state) => {
                status.state = state;
                self.outcomes.insert(restore_id.to_string(), status);
                Ok(())
            }
            Err((held, err)) => {
                tracing::error!(restore = %restore_id, shard = %shard_id, error = %err.chain(), "restore: could not commit; still holding the shard");
                self.active = Some(Active {
                    status,
                    phase: Phase::Swapped(held),
                    lease,
                    deadline,
                });
                Err(err)
            }
        }
    }

    async fn discard(&mut self, shard: &ShardParts<E>, restore_id: String) -> RestoreStatus {
        let shard_id = &shard.shard_id;
        let swapped = self
            .active(&restore_id)
            .is_some_and(|active| matches!(active.phase, Phase::Swapped(_)));
        if swapped {
            if let Err(err) = self
                .follow_decision(shard, &restore_id, Some(RestoreDecision::Revert))
                .await
            {
                tracing::error!(restore = %restore_id, shard = %shard_id, error = %err.chain(), "restore: the decision cannot be read; the shard holds");
            }
            return self.snapshot(shard_id, &restore_id);
        }
        let active = self
            .active
            .take_if(|active| active.status.restore_id == restore_id);
        if let Some(active) = active {
            let mut status = active.snapshot();
            if let Phase::Staging { task, .. } = &active.phase {
                task.abort();
            }
            // Dropping a staged shard removes its staging directory.
            drop(active);
            status.state = RestoreState::Discarded;
            tracing::info!(restore = %restore_id, shard = %shard_id, "restore: discarded");
            self.outcomes.insert(restore_id.clone(), status);
        }
        self.snapshot(shard_id, &restore_id)
    }
}

#[cfg(test)]
mod tests {
    use super::super::BarrierState;
    use super::super::testing::{TestShard, backup_id};
    use super::*;

    fn in_place(restore_id: &str, backup: &BackupId) -> RestoreRequest {
        RestoreRequest {
            restore_id: restore_id.to_string(),
            backup: Some(backup.clone()),
            target: None,
            chain: Vec::new(),
            archive: None,
            point: Lineage::root(),
            to: Seq(0),
            lease: DEFAULT_RESTORE_LEASE,
            column_families: Vec::new(),
        }
    }

    /// How many restore staging directories are beside the shard.
    fn staging_dirs(shard: &TestShard) -> usize {
        std::fs::read_dir(shard.root.path())
            .expect("list")
            .filter_map(|entry| entry.ok())
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .contains("lockstep-restore")
            })
            .count()
    }

    /// A shard holding `k1` in backup `bk-1`, and `k2` written after it.
    async fn backed_up() -> (TestShard, BackupId, Seq) {
        let shard = TestShard::start().await;
        let id = backup_id("bk-1");
        shard.write("k1");
        let cut = shard.backup(&id).await;
        shard.write("k2");
        (shard, id, cut)
    }

    /// Stores `decision` for `rs-1`, as its coordinator does.
    async fn decide(shard: &TestShard, decision: RestoreDecision) {
        let id = RestoreId::new("rs-1").expect("id");
        shard
            .repo
            .decide_restore(&id, decision, "coordinator")
            .await
            .expect("decide");
    }

    #[tokio::test(start_paused = true)]
    async fn a_discard_after_the_restore_decided_commit_commits() {
        // A late Discard (a coordinator that was fenced out, a retried message) after the
        // decision: the shard follows the decision, not the message.
        let (shard, _) = staged_with_a_lease().await;
        assert_eq!(
            shard.restore_apply("rs-1").await.state,
            RestoreState::Swapped
        );
        decide(&shard, RestoreDecision::Commit).await;
        assert_eq!(
            shard.restore_discard("rs-1").await.state,
            RestoreState::Applied
        );
        assert!(!shard.has("k2"), "the restored shard");
        shard.stop().await;
    }

    /// [`backed_up`], with `bk-1` staged in place as `rs-1` under a 5 s lease.
    async fn staged_with_a_lease() -> (TestShard, Duration) {
        let (shard, backup, _) = backed_up().await;
        let lease = Duration::from_secs(5);
        shard
            .restore_stage(RestoreRequest {
                lease,
                ..in_place("rs-1", &backup)
            })
            .await;
        shard.wait_for_restore("rs-1", RestoreState::Staged).await;
        (shard, lease)
    }

    #[tokio::test(start_paused = true)]
    async fn apply_swaps_the_staged_backup_in_and_holds_it_until_commit() {
        let (shard, backup, cut) = backed_up().await;
        let before = shard.slot.lineage();
        let staging = shard.restore_stage(in_place("rs-1", &backup)).await;
        assert_eq!(staging.state, RestoreState::Staging);
        let staged = shard.wait_for_restore("rs-1", RestoreState::Staged).await;
        assert_eq!(staged.seq, cut);
        assert!(shard.has("k2"), "staging leaves the live shard alone");
        let swapped = shard.restore_apply("rs-1").await;
        assert_eq!(swapped.state, RestoreState::Swapped);
        assert_eq!(swapped.seq, cut);
        assert!(shard.gate.is_closed(), "no write until the restore commits");
        assert!(shard.slot.get().is_err(), "no read either");
        assert_eq!(shard.slot.lineage(), before);
        // A repeated Apply is answered from the record: no second swap.
        assert_eq!(
            shard.restore_apply("rs-1").await.state,
            RestoreState::Swapped
        );
        // A Commit with no decision stored is refused: the shard holds.
        let err = shard
            .handle
            .restore_commit("rs-1".into())
            .await
            .expect_err("no decision stored");
        assert!(err.message.contains("no decision is stored"), "{err}");
        assert!(shard.gate.is_closed());
        decide(&shard, RestoreDecision::Commit).await;
        let applied = shard.restore_commit("rs-1").await;
        assert_eq!(applied.state, RestoreState::Applied);
        assert_eq!(applied.seq, cut);
        assert!(!shard.gate.is_closed(), "the gate reopens on commit");
        assert_ne!(
            shard.slot.lineage(),
            before,
            "the restored shard's own history"
        );
        assert_eq!(shard.seq(), cut);
        assert!(shard.has("k1") && !shard.has("k2"));
        // Repeated Apply, Commit and Discard after the commit change nothing.
        shard.write("k3");
        for again in [
            shard.restore_apply("rs-1").await,
            shard.restore_commit("rs-1").await,
            shard.restore_discard("rs-1").await,
        ] {
            assert_eq!(again.state, RestoreState::Applied);
        }
        assert!(shard.has("k3"));
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_discard_after_apply_reverts_to_the_old_shard() {
        let (shard, backup, _) = backed_up().await;
        let before = (shard.slot.lineage(), shard.seq());
        shard.restore_stage(in_place("rs-1", &backup)).await;
        shard.wait_for_restore("rs-1", RestoreState::Staged).await;
        assert_eq!(
            shard.restore_apply("rs-1").await.state,
            RestoreState::Swapped
        );
        let reverted = shard.restore_discard("rs-1").await;
        assert_eq!(reverted.state, RestoreState::Discarded);
        assert_eq!(reverted.error, None);
        assert!(!shard.gate.is_closed());
        assert_eq!((shard.slot.lineage(), shard.seq()), before);
        assert!(
            shard.has("k1") && shard.has("k2"),
            "the old shard, as it was"
        );
        assert_eq!(staging_dirs(&shard), 0);
        // A late Commit does not bring the restore back.
        assert_eq!(
            shard.restore_commit("rs-1").await.state,
            RestoreState::Discarded
        );
        assert!(shard.has("k2"));
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_swapped_restore_whose_lease_runs_out_follows_the_decision_or_reverts() {
        for stored in [
            None,
            Some(RestoreDecision::Commit),
            Some(RestoreDecision::Revert),
        ] {
            let (shard, lease) = staged_with_a_lease().await;
            assert_eq!(
                shard.restore_apply("rs-1").await.state,
                RestoreState::Swapped
            );
            let id = RestoreId::new("rs-1").expect("id");
            if let Some(decision) = stored {
                decide(&shard, decision).await;
            }
            // The coordinator goes silent.
            tokio::time::sleep(lease + Duration::from_millis(10)).await;
            let expected = match stored {
                Some(RestoreDecision::Commit) => RestoreState::Applied,
                _ => RestoreState::Discarded,
            };
            let status = shard.wait_for_restore("rs-1", expected).await;
            assert!(!shard.gate.is_closed(), "{stored:?}");
            assert_eq!(
                shard.has("k2"),
                expected == RestoreState::Discarded,
                "{stored:?}: {status:?}"
            );
            assert_eq!(
                shard.repo.restore_decision(&id).await.expect("decision"),
                Some(stored.unwrap_or(RestoreDecision::Revert)),
                "with no decision stored, the agent stores revert"
            );
            shard.stop().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_stage_returns_the_first_restore() {
        let (shard, backup, _) = backed_up().await;
        shard.restore_stage(in_place("rs-1", &backup)).await;
        let target = shard.root.path().join("elsewhere");
        let repeated = RestoreRequest {
            target: Some(target.clone()),
            ..in_place("rs-1", &backup)
        };
        let again = shard.restore_stage(repeated).await;
        assert!(
            matches!(again.state, RestoreState::Staging | RestoreState::Staged),
            "{:?}",
            again.state
        );
        assert_eq!(again.target, None, "answered from the first request");
        shard.wait_for_restore("rs-1", RestoreState::Staged).await;
        assert!(!target.exists(), "nothing staged for the repeat");
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_staged_restore_nobody_asks_about_is_discarded_when_its_lease_runs_out() {
        let (shard, lease) = staged_with_a_lease().await;
        // Polled within the lease, it holds.
        tokio::time::sleep(lease / 2).await;
        assert_eq!(
            shard.restore_status("rs-1").await.state,
            RestoreState::Staged
        );
        tokio::time::sleep(lease / 2 + lease / 4).await;
        assert_eq!(
            shard.restore_status("rs-1").await.state,
            RestoreState::Staged
        );
        // Then its coordinator goes silent.
        tokio::time::sleep(lease + Duration::from_millis(10)).await;
        let status = shard.restore_status("rs-1").await;
        assert_eq!(status.state, RestoreState::Discarded);
        assert_eq!(
            status.error.map(|(code, _)| code),
            Some(ErrorCode::BarrierLeaseExpired)
        );
        assert_eq!(staging_dirs(&shard), 0, "the staged directory is removed");
        assert!(shard.has("k2"), "the live shard is untouched");
        // The shard is free again.
        let next = backup_id("bk-2");
        assert_eq!(shard.stage(&next).await.state, BarrierState::Staged);
        shard.abort(&next).await;
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_discard_of_an_unknown_restore_changes_nothing() {
        let (shard, backup, _) = backed_up().await;
        let discard = shard.restore_discard("rs-never").await;
        assert_eq!(discard.state, RestoreState::Unknown);
        let status = shard.restore_status("rs-never").await;
        assert_eq!(status.state, RestoreState::Unknown, "not remembered");
        // The shard is free: a restore and a barrier can still start.
        let next = backup_id("bk-2");
        assert_eq!(shard.stage(&next).await.state, BarrierState::Staged);
        shard.abort(&next).await;
        shard.restore_stage(in_place("rs-1", &backup)).await;
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_apply_of_an_unknown_restore_is_refused() {
        let shard = TestShard::start().await;
        let err = shard
            .handle
            .restore_apply("rs-never".into())
            .await
            .expect_err("no such restore");
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(!shard.gate.is_closed());
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_discarded_restore_is_never_applied() {
        let (shard, backup, _) = backed_up().await;
        shard.restore_stage(in_place("rs-1", &backup)).await;
        shard.wait_for_restore("rs-1", RestoreState::Staged).await;
        let discarded = shard.restore_discard("rs-1").await;
        assert_eq!(discarded.state, RestoreState::Discarded);
        assert_eq!(staging_dirs(&shard), 0, "the staged directory is removed");
        let apply = shard.restore_apply("rs-1").await;
        assert_eq!(apply.state, RestoreState::Discarded);
        assert!(shard.has("k2"), "the live shard is untouched");
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_discard_while_staging_cancels_it() {
        let (shard, backup, _) = backed_up().await;
        shard.restore_stage(in_place("rs-1", &backup)).await;
        // Sent right behind Stage: the staging task has its download, its blocking file
        // steps and the engine's open still to go.
        let discarded = shard.restore_discard("rs-1").await;
        assert_eq!(discarded.state, RestoreState::Discarded);
        assert_eq!(discarded.seq, Seq(0), "discarded while still staging");
        // The cancelled task ends meanwhile; the restore stays discarded.
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let status = shard.restore_status("rs-1").await;
        assert_eq!(status.state, RestoreState::Discarded);
        assert!(shard.has("k2"));
        shard.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_restore_and_a_barrier_never_hold_the_shard_together() {
        let (shard, backup, _) = backed_up().await;
        // A barrier holds the shard: a restore is refused.
        let barrier = backup_id("bk-2");
        shard.stage(&barrier).await;
        let err = shard
            .handle
            .restore_stage(in_place("rs-1", &backup))
            .await
            .expect_err("busy with a barrier");
        assert_eq!(err.code, ErrorCode::BarrierBusy);
        shard.abort(&barrier).await;
        // A restore holds the shard: a barrier, and another restore, are refused.
        shard.restore_stage(in_place("rs-1", &backup)).await;
        shard.wait_for_restore("rs-1", RestoreState::Staged).await;
        let refused = shard.stage(&backup_id("bk-3")).await;
        assert_eq!(refused.state, BarrierState::Failed);
        assert_eq!(
            refused.error.map(|(code, _)| code),
            Some(ErrorCode::BarrierBusy)
        );
        let err = shard
            .handle
            .restore_stage(in_place("rs-2", &backup))
            .await
            .expect_err("busy with a restore");
        assert_eq!(err.code, ErrorCode::BarrierBusy);
        // Once it is discarded the shard is free again.
        shard.restore_discard("rs-1").await;
        assert_eq!(
            shard.stage(&backup_id("bk-3")).await.state,
            BarrierState::Staged
        );
        shard.stop().await;
    }
}
