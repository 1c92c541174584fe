//! `ClusterOps`: the one owner of every operation that holds the cluster.
//!
//! Backups (each kind), tags (on demand and automatic), restores and deletes all run here,
//! one at a time. `ClusterOps` is the cloneable handle; a private task owns the state: the
//! running operation, if any, and the recently finished backup jobs. gRPC handlers only send
//! a message and await the reply; the work runs in the task's `JoinSet`, each operation
//! under a child of the task's cancellation token, so nothing is detached and shutdown is
//! staged (stop accepting, cancel, drain).
//!
//! Rules:
//! - An operation asked for while another holds the cluster is refused at once with
//!   `ERR_BARRIER_BUSY`, naming what runs (queueing would let requests pile up unseen
//!   behind a stuck cluster); an automatic tag that finds the cluster busy is skipped.
//! - An operation runs to its end whatever its client does: a client that goes away after
//!   a barrier's Prepare leaves the operation to commit or abort by itself, so gates never
//!   stay closed until the lease runs out.
//! - A cancelled operation (the coordinator is stopping) aborts its barrier or discards its
//!   staged restore on every agent before it ends; a backup past its commit point still
//!   publishes, and a restore already swapping shards in finishes its bounded Apply.
//! - The cluster is released before the operation's outcome is delivered, so a client that
//!   hears of the end can start the next operation at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use lockstep_proto::v1;
use lockstep_repository::export::ImportReport;
use lockstep_repository::manifest::{BackupKind, Labels, TagManifest};
use lockstep_repository::remembered::Remembered;
use lockstep_repository::{BackupId, Error, ErrorCode, Repository, RestoreId, Result, TagName};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backup::{self, Cut, JobView, Shared, read, update};
use crate::config::Config;
use crate::fleet::AgentLink;
use crate::restore::{self, PointInTime, RestoreTarget};

/// How many finished backup jobs the coordinator remembers for clients that poll them.
const REMEMBERED_JOBS: usize = 100;

/// What every operation needs: the configuration, the repository and the agents.
#[derive(Clone)]
pub struct ClusterContext {
    pub config: Arc<Config>,
    pub repo: Repository,
    pub agents: Arc<[AgentLink]>,
    /// This coordinator's epoch: checked before every step that changes the repository.
    pub fence: Arc<crate::fence::Fence>,
    /// What backups and GC sweeps share (`gc.rs`).
    pub sweep: Arc<crate::gc::Sweep>,
    /// Set while a restore's record may stay in the repository unsettled (an agent did not
    /// confirm a discard or a decision): the next backup, tag or restore settles it first,
    /// so a staged restore an agent still holds does not refuse barriers until its lease.
    pub restores_to_settle: Arc<std::sync::atomic::AtomicBool>,
    /// How this coordinator reaches agents and `lockstep://` archives.
    pub security: lockstep_proto::tls::Security,
}

impl ClusterContext {
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

    /// Settles the restores left unsettled (`restores_to_settle`), best effort and within
    /// one control timeout (an agent still cut off would otherwise hold every operation for
    /// a swap's timeout): what is not confirmed stays for the next operation, the agent's
    /// lease, or the next start. Settling is idempotent, so one cut short is taken up again.
    /// Call with the cluster held and no restore running.
    pub async fn settle_left_restores(&self) {
        use std::sync::atomic::Ordering;
        if !self.restores_to_settle.swap(false, Ordering::SeqCst) {
            return;
        }
        let within = std::time::Duration::from_millis(self.config.barrier.control_timeout_ms);
        let left = match tokio::time::timeout(within, crate::restore::settle_interrupted(self))
            .await
        {
            Ok(Ok(done)) => !done.unsettled.is_empty(),
            Ok(Err(err)) => {
                tracing::warn!(error = %err.chain(), "could not settle the restores left; the next operation tries again");
                true
            }
            Err(_) => {
                tracing::warn!(
                    "settling the restores left took longer than a control timeout; the next operation tries again"
                );
                true
            }
        };
        if left {
            self.restores_to_settle.store(true, Ordering::SeqCst);
        }
    }
}

/// What a restore request asks for; it is planned inside the operation, while the cluster
/// is held.
#[derive(Debug)]
pub struct RestoreOrder {
    pub point: PointInTime,
    pub target: RestoreTarget,
    pub wal_from: Option<String>,
}

/// The operation holding the cluster, as `cluster status` shows it.
#[derive(Debug, Clone)]
pub struct Running {
    /// For example "backup bk-..." or "tag before-migration".
    pub what: String,
    /// The backup being taken, when the operation is a backup.
    pub backup: Option<BackupId>,
}

enum Msg {
    /// Start a backup of `kind`. Replies with the job's first view once its parent is picked
    /// (the barrier then runs on), or with the refusal.
    Backup {
        kind: BackupKind,
        labels: Labels,
        reply: oneshot::Sender<Result<JobView>>,
    },
    /// Take tag `name` across the cluster. Replies when the tag is written or has failed.
    Tag {
        name: TagName,
        labels: Labels,
        reply: oneshot::Sender<Result<TagManifest>>,
    },
    /// Plan and run a restore. Replies with its id once planned (or with the refusal); the
    /// restore's progress and outcome go to `updates`.
    Restore {
        order: RestoreOrder,
        updates: restore::Updates,
        reply: oneshot::Sender<Result<RestoreId>>,
    },
    /// Delete a backup that no other backup continues. Replies when done.
    Delete {
        backup: BackupId,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Plan the retention policy and, unless `dry_run`, apply it. Replies with the plan.
    Retention {
        dry_run: bool,
        reply: oneshot::Sender<Result<crate::retention::Plan>>,
    },
    /// Publish an import whose file was received and checked, as soon as the cluster is free
    /// (before any later request). Replies when done.
    Import {
        staged: Box<crate::export::Staged>,
        reply: oneshot::Sender<Result<ImportReport>>,
    },
    /// Cancel the running restore, or settle the restores a stopped coordinator left.
    /// Replies with what was done.
    AbortRestore {
        reply: oneshot::Sender<Result<(String, Vec<RestoreId>)>>,
    },
    /// The running or a remembered backup job.
    Job {
        backup: BackupId,
        reply: oneshot::Sender<Option<JobView>>,
    },
    /// What holds the cluster now, if anything.
    Running {
        reply: oneshot::Sender<Option<Running>>,
    },
}

/// Cloneable handle on the operations actor.
#[derive(Clone)]
pub struct ClusterOps {
    tx: mpsc::Sender<Msg>,
}

fn stopped() -> Error {
    Error::new(
        ErrorCode::BarrierAborted,
        "the coordinator is shutting down; retry on its successor",
    )
}

impl ClusterOps {
    /// Starts the actor in `tasks`; it stops when `cancel` fires, after its operations
    /// finished their cleanup.
    pub fn spawn(
        ctx: ClusterContext,
        cancel: CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> ClusterOps {
        let (tx, rx) = mpsc::channel(32);
        let actor = Actor {
            ctx,
            cancel,
            running: None,
            finished: Remembered::new(REMEMBERED_JOBS),
            ops: JoinSet::new(),
            imports: std::collections::VecDeque::new(),
            deliveries: JoinSet::new(),
            checks: JoinSet::new(),
        };
        tasks.spawn(actor.run(rx));
        ClusterOps { tx }
    }

    async fn ask<T>(&self, msg: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(msg(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    pub async fn backup(&self, kind: BackupKind, labels: Labels) -> Result<JobView> {
        self.ask(|reply| Msg::Backup {
            kind,
            labels,
            reply,
        })
        .await?
    }

    pub async fn tag(&self, name: TagName, labels: Labels) -> Result<TagManifest> {
        self.ask(|reply| Msg::Tag {
            name,
            labels,
            reply,
        })
        .await?
    }

    pub async fn restore(
        &self,
        order: RestoreOrder,
        updates: restore::Updates,
    ) -> Result<RestoreId> {
        self.ask(|reply| Msg::Restore {
            order,
            updates,
            reply,
        })
        .await?
    }

    pub async fn delete(&self, backup: BackupId) -> Result<()> {
        self.ask(|reply| Msg::Delete { backup, reply }).await?
    }

    /// Publishes a received import holding the cluster like a delete, so no backup commit,
    /// delete or retention runs in between; it waits for the operation holding the cluster.
    pub async fn import(&self, staged: crate::export::Staged) -> Result<ImportReport> {
        self.ask(|reply| Msg::Import {
            staged: Box::new(staged),
            reply,
        })
        .await?
    }

    pub async fn retention(&self, dry_run: bool) -> Result<crate::retention::Plan> {
        self.ask(|reply| Msg::Retention { dry_run, reply }).await?
    }

    pub async fn abort_restore(&self) -> Result<(String, Vec<RestoreId>)> {
        self.ask(|reply| Msg::AbortRestore { reply }).await?
    }

    pub async fn job(&self, backup: BackupId) -> Result<Option<JobView>> {
        self.ask(|reply| Msg::Job { backup, reply }).await
    }

    pub async fn running(&self) -> Result<Option<Running>> {
        self.ask(|reply| Msg::Running { reply }).await
    }
}

/// What an operation hands back when it ends. The actor releases the cluster first, then
/// delivers it, so a client that hears of the end can start the next operation at once.
enum Ended {
    /// Nothing to deliver (an automatic tag, a refusal already sent, a client gone).
    Quiet,
    /// A backup's outcome, applied to its job view (committed or failed) and remembered.
    Backup(Shared, Result<()>),
    Tag(oneshot::Sender<Result<TagManifest>>, Result<TagManifest>),
    Delete(oneshot::Sender<Result<()>>, Result<()>),
    Import(oneshot::Sender<Result<ImportReport>>, Result<ImportReport>),
    Retention(
        oneshot::Sender<Result<crate::retention::Plan>>,
        Result<crate::retention::Plan>,
    ),
    AbortRestore(
        oneshot::Sender<Result<(String, Vec<RestoreId>)>>,
        Result<(String, Vec<RestoreId>)>,
    ),
    /// A restore's final view, for its client's stream.
    Restore(restore::Updates, lockstep_proto::v1::RestoreJob),
}

/// The running operation, with the view of its backup job if it is one.
struct Current {
    running: Running,
    job: Option<Shared>,
    /// Cancels the operation (a restore's, for `AbortRestore`).
    cancel: CancellationToken,
    restore: bool,
}

struct Actor {
    ctx: ClusterContext,
    cancel: CancellationToken,
    running: Option<Current>,
    finished: Remembered<BackupId, JobView>,
    /// The running operation's task (at most one).
    ops: JoinSet<Ended>,
    /// Imports waiting for the cluster, in arrival order; each starts as the cluster frees.
    imports: std::collections::VecDeque<(
        Box<crate::export::Staged>,
        oneshot::Sender<Result<ImportReport>>,
    )>,
    /// Final restore views still on their way to slow clients (the cluster is free meanwhile).
    deliveries: JoinSet<()>,
    /// The verify of the backup committed last (`[verify] after_backup`), beside the cluster
    /// operations: at most one at a time.
    checks: JoinSet<()>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let auto_every = Duration::from_secs(self.ctx.config.tags.auto_every_s);
        let mut auto_tags = (!auto_every.is_zero()).then(|| {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + auto_every, auto_every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            ticks
        });
        loop {
            tokio::select! {
                // Fixed polling order: the simulations replay a seed exactly.
                biased;
                _ = self.cancel.cancelled() => break,
                Some(done) = self.ops.join_next(), if !self.ops.is_empty() => {
                    self.finish(done);
                    if let Some((staged, reply)) = self.imports.pop_front() {
                        self.import(staged, reply);
                    }
                }
                Some(_) = self.deliveries.join_next(), if !self.deliveries.is_empty() => {}
                Some(_) = self.checks.join_next(), if !self.checks.is_empty() => {}
                _ = async {
                    match auto_tags.as_mut() {
                        Some(ticks) => ticks.tick().await,
                        None => std::future::pending().await,
                    }
                } => self.auto_tag(),
                msg = rx.recv() => match msg {
                    None => break,
                    Some(msg) => self.handle(msg),
                },
            }
        }
        // Staged shutdown: no new operation is accepted (the receiver is dropped with the
        // loop's end); the running one was cancelled with its parent token and cleans up.
        drop(rx);
        while let Some(done) = self.ops.join_next().await {
            self.finish(done);
        }
        while self.deliveries.join_next().await.is_some() {}
        while self.checks.join_next().await.is_some() {}
    }

    /// Releases the cluster, then delivers what the ended operation hands back.
    fn finish(&mut self, done: std::result::Result<Ended, tokio::task::JoinError>) {
        let running = self.running.take();
        let ended = match done {
            Ok(ended) => ended,
            Err(err) => {
                // Its client's reply is dropped with the task: the client sees an error.
                let what = running.map(|r| r.running.what).unwrap_or_default();
                tracing::error!(operation = %what, error = %err, "cluster operation panicked");
                return;
            }
        };
        match ended {
            Ended::Quiet => {}
            Ended::Backup(view, outcome) => {
                update(&view, |v| match outcome {
                    Ok(()) => v.state = v1::JobState::Committed,
                    Err(err) => {
                        tracing::error!(backup = %v.backup_id, error = %err.chain(), "backup failed");
                        v.state = v1::JobState::Failed;
                        v.error = Some((err.code, err.chain()));
                    }
                });
                let view = read(&view);
                if view.state == v1::JobState::Committed {
                    self.verify_after(view.backup_id.clone());
                }
                self.finished.insert(view.backup_id.clone(), view);
            }
            Ended::Tag(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Ended::Delete(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Ended::Import(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Ended::Retention(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Ended::AbortRestore(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Ended::Restore(updates, view) => {
                self.deliveries.spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), updates.send(Ok(view))).await;
                });
            }
        }
    }

    /// Starts `[verify] after_backup` on `backup`, once the cluster is free: skipped (and
    /// said) while the verify of an earlier backup still runs; a stopping coordinator ends it.
    fn verify_after(&mut self, backup: BackupId) {
        if self.ctx.config.verify.after_backup == crate::config::AfterBackup::Off {
            return;
        }
        if !self.checks.is_empty() {
            tracing::warn!(backup = %backup, "verify after the backup skipped: the verify of an earlier backup still runs");
            return;
        }
        let (ctx, cancel) = (self.ctx.clone(), self.cancel.clone());
        self.checks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                () = backup::verify_after(&ctx, &backup) => {}
            }
        });
    }

    /// Holds the cluster for `what`, or names who holds it.
    fn hold(&mut self, what: String, backup: Option<BackupId>) -> Result<CancellationToken> {
        self.ctx.fence.still_held()?;
        if let Some(current) = &self.running {
            return Err(Error::new(
                ErrorCode::BarrierBusy,
                format!(
                    "{} is running; only one backup, tag, restore or delete runs at a time",
                    current.running.what
                ),
            ));
        }
        let cancel = self.cancel.child_token();
        self.running = Some(Current {
            running: Running { what, backup },
            job: None,
            cancel: cancel.clone(),
            restore: false,
        });
        Ok(cancel)
    }

    /// Publishes an import, holding the cluster.
    fn import(
        &mut self,
        staged: Box<crate::export::Staged>,
        reply: oneshot::Sender<Result<ImportReport>>,
    ) {
        if let Err(err) = self.hold(staged.what(), None) {
            let _ = reply.send(Err(err));
            return;
        }
        let ctx = self.ctx.clone();
        self.ops.spawn(async move {
            let outcome = crate::export::publish(&ctx, *staged).await;
            Ended::Import(reply, outcome)
        });
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Backup {
                kind,
                labels,
                reply,
            } => {
                if let Err(err) = self.ctx.require_agents("take a backup") {
                    let _ = reply.send(Err(err));
                    return;
                }
                let backup_id = BackupId::generate();
                let cancel = match self.hold(format!("backup {backup_id}"), Some(backup_id.clone()))
                {
                    Ok(cancel) => cancel,
                    Err(err) => {
                        let _ = reply.send(Err(err));
                        return;
                    }
                };
                let view: Shared = Arc::new(Mutex::new(JobView::new(backup_id.clone())));
                if let Some(current) = &mut self.running {
                    current.job = Some(view.clone());
                }
                let ctx = self.ctx.clone();
                self.ops.spawn(async move {
                    ctx.settle_left_restores().await;
                    let started = tokio::time::Instant::now();
                    // Before the parent is read, so a GC sweep that condemns objects waits
                    // for this backup or tells it.
                    let sweep = ctx.sweep.enter_backup().await;
                    // The parent is picked while the cluster is held: no delete in between.
                    let cut = match Cut::for_kind(&ctx, kind).await {
                        Ok(cut) => Cut {
                            condemned: sweep.condemned.clone(),
                            ..cut
                        },
                        Err(err) => {
                            backup::record_outcome(kind, false, started.elapsed());
                            let _ = reply.send(Err(err));
                            return Ended::Quiet;
                        }
                    };
                    // A client gone before it learned the backup's id still gets its backup:
                    // it can find it with `backup list`.
                    let _ = reply.send(Ok(read(&view)));
                    let outcome =
                        backup::run_backup(&ctx, &backup_id, &cut, &labels, &view, &cancel).await;
                    backup::record_outcome(cut.kind, outcome.is_ok(), started.elapsed());
                    drop(sweep);
                    if outcome.is_ok() && ctx.config.retention.after_backup {
                        match crate::retention::apply(&ctx, false).await {
                            Ok(plan) => tracing::info!(removed = plan.removed().count(), "retention applied after the backup"),
                            Err(err) => tracing::warn!(error = %err.chain(), "retention after the backup failed; the backup stands"),
                        }
                    }
                    Ended::Backup(view, outcome)
                });
            }
            Msg::Tag {
                name,
                labels,
                reply,
            } => {
                self.start_tag(name, false, labels, Some(reply));
            }
            Msg::Restore {
                order,
                updates,
                reply,
            } => {
                if let Err(err) = self.ctx.require_agents("restore") {
                    let _ = reply.send(Err(err));
                    return;
                }
                let cancel = match self.hold(format!("restore to {}", order.point), None) {
                    Ok(cancel) => cancel,
                    Err(err) => {
                        let _ = reply.send(Err(err));
                        return;
                    }
                };
                if let Some(current) = self.running.as_mut() {
                    current.restore = true;
                }
                let ctx = self.ctx.clone();
                self.ops.spawn(async move {
                    ctx.settle_left_restores().await;
                    let plan = restore::plan(&ctx, order.point, order.target, order.wal_from).await;
                    let plan = match plan {
                        Ok(plan) => plan,
                        Err(err) => {
                            let _ = reply.send(Err(err));
                            return Ended::Quiet;
                        }
                    };
                    let restore_id = RestoreId::generate();
                    // Nothing changed on any agent yet: a client gone while the restore was
                    // planned starts nothing.
                    if reply.send(Ok(restore_id.clone())).is_err() {
                        return Ended::Quiet;
                    }
                    let started = tokio::time::Instant::now();
                    let view = restore::run(&ctx, plan, restore_id, &updates, &cancel).await;
                    restore::record_outcome(&view, started.elapsed());
                    Ended::Restore(updates, view)
                });
            }
            Msg::Retention { dry_run, reply } => {
                // Held while planning and removing, so no backup picks a parent in between.
                let what = if dry_run {
                    "retention plan"
                } else {
                    "retention"
                };
                if let Err(err) = self.hold(what.into(), None) {
                    let _ = reply.send(Err(err));
                    return;
                }
                let ctx = self.ctx.clone();
                self.ops.spawn(async move {
                    let outcome = crate::retention::apply(&ctx, dry_run).await;
                    Ended::Retention(reply, outcome)
                });
            }
            Msg::Delete { backup, reply } => {
                // Held while checking and deleting, so no incremental picks this backup as
                // its parent in between.
                if let Err(err) = self.hold(format!("delete of backup {backup}"), None) {
                    let _ = reply.send(Err(err));
                    return;
                }
                let ctx = self.ctx.clone();
                self.ops.spawn(async move {
                    let outcome = backup::delete(&ctx, &backup).await;
                    Ended::Delete(reply, outcome)
                });
            }
            Msg::Import { staged, reply } => {
                if self.running.is_some() {
                    self.imports.push_back((staged, reply));
                } else {
                    self.import(staged, reply);
                }
            }
            Msg::AbortRestore { reply } => {
                if let Some(current) = self.running.as_ref().filter(|c| c.restore) {
                    current.cancel.cancel();
                    let message = format!(
                        "{} is cancelled: before its Apply every staged shard is discarded; once Apply is sent, the restore's stored decision settles every shard",
                        current.running.what
                    );
                    let _ = reply.send(Ok((message, Vec::new())));
                    return;
                }
                if let Err(err) = self.hold("abort of interrupted restores".into(), None) {
                    let _ = reply.send(Err(err));
                    return;
                }
                let ctx = self.ctx.clone();
                self.ops.spawn(async move {
                    let outcome = restore::settle_interrupted(&ctx).await.and_then(|done| {
                        if !done.unsettled.is_empty() {
                            let errors: Vec<Error> = done
                                .unsettled
                                .into_iter()
                                .map(|(id, err)| err.context(format!("restore {id}")))
                                .collect();
                            return Err(crate::fleet::joined(&errors, "restores left unsettled"));
                        }
                        let message = if done.settled.is_empty() {
                            "no restore to abort".to_string()
                        } else {
                            format!(
                                "settled {} restore(s) a stopped coordinator left",
                                done.settled.len()
                            )
                        };
                        Ok((message, done.settled))
                    });
                    Ended::AbortRestore(reply, outcome)
                });
            }
            Msg::Job { backup, reply } => {
                let running = self
                    .running
                    .as_ref()
                    .and_then(|current| current.job.as_ref())
                    .map(read)
                    .filter(|view| view.backup_id == backup);
                let _ = reply.send(running.or_else(|| self.finished.get(&backup).cloned()));
            }
            Msg::Running { reply } => {
                let _ = reply.send(self.running.as_ref().map(|c| c.running.clone()));
            }
        }
    }

    /// Starts a tag; an automatic one (no `reply`) is named `auto-<UTC time>` and skipped,
    /// not queued, when the cluster is busy.
    fn start_tag(
        &mut self,
        name: TagName,
        automatic: bool,
        labels: Labels,
        reply: Option<oneshot::Sender<Result<TagManifest>>>,
    ) {
        let refused = self
            .ctx
            .require_agents("take a tag")
            .and_then(|()| self.hold(format!("tag {name}"), None));
        let cancel = match refused {
            Ok(cancel) => cancel,
            Err(err) => {
                match reply {
                    Some(reply) => {
                        let _ = reply.send(Err(err));
                    }
                    None => {
                        tracing::info!(tag = %name, reason = %err.message, "automatic restore point skipped")
                    }
                }
                return;
            }
        };
        let ctx = self.ctx.clone();
        self.ops.spawn(async move {
            ctx.settle_left_restores().await;
            let outcome =
                crate::tag::create_tag(&ctx, name.clone(), automatic, labels, &cancel).await;
            let label = if outcome.is_ok() { "created" } else { "failed" };
            metrics::counter!(lockstep_process::metrics::TAGS, "outcome" => label).increment(1);
            match reply {
                Some(reply) => Ended::Tag(reply, outcome),
                None => {
                    if let Err(err) = outcome {
                        tracing::warn!(tag = %name, error = %err.chain(), "automatic restore point failed");
                    }
                    Ended::Quiet
                }
            }
        });
    }

    fn auto_tag(&mut self) {
        let name = format!("auto-{}", Utc::now().format("%Y%m%dT%H%M%S%.3fZ"));
        match TagName::new(name) {
            Ok(name) => self.start_tag(name, true, Labels::new(), None),
            Err(err) => tracing::error!(error = %err.chain(), "automatic restore point name"),
        }
    }
}
