//! Restoring the whole cluster through its agents, in two phases.
//!
//! 1. **Stage**: every agent downloads its shard of the backup, checks every chunk's SHA-256,
//!    opens the result and checks its sequence number, into a staging directory beside its
//!    live shard (in place) or straight into a target directory (fresh machines, drills).
//! 2. **Apply** (in place only, and only once every shard is staged): every agent closes its
//!    write gate, swaps the staged shard in, reopens, and opens the gate.
//!
//! A failure in phase 1 discards every staged shard: the cluster is untouched. A failure in
//! phase 2 is reported shard by shard (each swap is atomic on its agent, so every shard is
//! either the backup's or its old self); rerunning the restore converges.
//!
//! The restore holds the cluster lock, so no backup's barrier runs in between, and it runs to
//! its end in its own task even if the client that asked goes away.

use std::time::Duration;

use futures::future::join_all;
use lockstep_proto::from_status;
use lockstep_proto::v1::agent_client::AgentClient;
use lockstep_proto::v1::{self, RestoreState};
use lockstep_repository::manifest::BackupManifest;
use lockstep_repository::{BackupId, Error, ErrorCode, Result, ShardId};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::job::{AgentLink, ClusterGuard, JobContext, ShardView};

/// Where the restored shards go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// Replace every agent's live shard.
    InPlace,
    /// A directory on each agent's machine; `{shard}` is replaced by the shard id.
    Directory(String),
}

impl RestoreTarget {
    /// From the request: exactly one of `in_place` and a directory.
    pub fn from_request(in_place: bool, target_dir: &str) -> Result<RestoreTarget> {
        match (in_place, target_dir.is_empty()) {
            (true, true) => Ok(RestoreTarget::InPlace),
            (false, false) if target_dir.contains("{shard}") => {
                Ok(RestoreTarget::Directory(target_dir.to_string()))
            }
            (false, false) => Ok(RestoreTarget::Directory(format!(
                "{}/{{shard}}",
                target_dir.trim_end_matches('/')
            ))),
            _ => Err(Error::new(
                ErrorCode::InvalidArgument,
                "say where to restore: in place (replacing every live shard) or into a directory on each agent's machine, not both",
            )),
        }
    }

    fn dir_for(&self, shard: &ShardId) -> String {
        match self {
            RestoreTarget::InPlace => String::new(),
            RestoreTarget::Directory(template) => template.replace("{shard}", shard.as_str()),
        }
    }
}

/// Where a cluster restore stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestorePhase {
    Staging,
    Applying,
    Done,
    Failed,
}

/// A cluster restore as clients see it.
#[derive(Debug, Clone)]
pub struct RestoreView {
    pub restore_id: String,
    pub backup_id: BackupId,
    pub phase: RestorePhase,
    pub shards: Vec<ShardView>,
    pub error: Option<(ErrorCode, String)>,
}

impl RestoreView {
    pub fn to_wire(&self) -> v1::RestoreJob {
        let (error_code, error_message) = self
            .error
            .as_ref()
            .map(|(code, message)| (code.as_str().to_string(), message.clone()))
            .unwrap_or_default();
        v1::RestoreJob {
            restore_id: self.restore_id.clone(),
            backup_id: self.backup_id.to_string(),
            phase: match self.phase {
                RestorePhase::Staging => v1::RestorePhase::Staging,
                RestorePhase::Applying => v1::RestorePhase::Applying,
                RestorePhase::Done => v1::RestorePhase::Done,
                RestorePhase::Failed => v1::RestorePhase::Failed,
            } as i32,
            shards: self.shards.iter().map(ShardView::to_wire).collect(),
            error_code,
            error_message,
        }
    }
}

/// A checked plan: which agent restores which shard, to where.
pub struct RestorePlan {
    pub manifest: BackupManifest,
    pub target: RestoreTarget,
    pub agents: Vec<AgentLink>,
}

/// Checks that the topology can take the backup: every shard of the backup has an agent, and
/// (in place) every agent has a shard in the backup, so no shard is left at another cut.
pub fn plan(
    ctx: &JobContext,
    manifest: BackupManifest,
    target: RestoreTarget,
) -> Result<RestorePlan> {
    let mut agents = Vec::new();
    for shard in &manifest.shards {
        let agent = ctx
            .agents
            .iter()
            .find(|a| a.shard_id == shard.shard_id)
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "backup {} has shard {} but the topology has no agent for it; add it to the configuration",
                        manifest.backup_id, shard.shard_id
                    ),
                )
            })?;
        agents.push(agent.clone());
    }
    if target == RestoreTarget::InPlace
        && let Some(extra) = ctx
            .agents
            .iter()
            .find(|a| !manifest.shards.iter().any(|s| s.shard_id == a.shard_id))
    {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "shard {} is not in backup {}; restoring in place would leave it at another cut",
                extra.shard_id, manifest.backup_id
            ),
        ));
    }
    Ok(RestorePlan {
        manifest,
        target,
        agents,
    })
}

fn shard_view(shard: &ShardId, status: &v1::RestoreStatus) -> ShardView {
    let state = RestoreState::try_from(status.state).unwrap_or(RestoreState::Unspecified);
    ShardView {
        shard_id: shard.clone(),
        state: state
            .as_str_name()
            .trim_start_matches("RESTORE_STATE_")
            .to_ascii_lowercase(),
        seq: status.seq,
        bytes_done: status.bytes_done,
        bytes_total: status.bytes_total,
        gate_closed_us: 0,
        error: (!status.error_code.is_empty())
            .then(|| (status.error_code.clone(), status.error_message.clone())),
    }
}

fn status_error(shard: &ShardId, status: &v1::RestoreStatus) -> Error {
    let state = RestoreState::try_from(status.state).unwrap_or(RestoreState::Unspecified);
    let code = ErrorCode::parse(&status.error_code).unwrap_or(ErrorCode::BackupRestorationFailed);
    let detail = if status.error_message.is_empty() {
        format!("the agent reports {}", state.as_str_name())
    } else {
        status.error_message.clone()
    };
    Error::new(code, format!("shard {shard}: {detail}"))
}

/// The stream a client follows a restore on.
pub type Updates = mpsc::Sender<std::result::Result<v1::RestoreJob, tonic::Status>>;

/// Publishes views to the client: progress is dropped when the client is slow, the final
/// view is always sent (unless the client is gone).
struct Reporter {
    view: RestoreView,
    tx: Updates,
}

impl Reporter {
    fn progress(&self) {
        let _ = self.tx.try_send(Ok(self.view.to_wire()));
    }

    async fn finish(mut self, outcome: Result<()>) {
        match outcome {
            Ok(()) => self.view.phase = RestorePhase::Done,
            Err(err) => {
                tracing::error!(restore = %self.view.restore_id, backup = %self.view.backup_id, error = %err.chain(), "restore failed");
                self.view.phase = RestorePhase::Failed;
                self.view.error = Some((err.code, err.chain()));
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.tx.send(Ok(self.view.to_wire())),
        )
        .await;
    }
}

/// Runs a planned restore to its end, reporting on `tx`.
pub async fn run(
    ctx: JobContext,
    plan: RestorePlan,
    restore_id: String,
    tx: Updates,
    guard: ClusterGuard,
) {
    let mut reporter = Reporter {
        view: RestoreView {
            restore_id: restore_id.clone(),
            backup_id: plan.manifest.backup_id.clone(),
            phase: RestorePhase::Staging,
            shards: Vec::new(),
            error: None,
        },
        tx,
    };
    tracing::info!(restore = %restore_id, backup = %plan.manifest.backup_id, target = ?plan.target, "restore started");
    let outcome = stage_and_apply(&ctx, &plan, &restore_id, &mut reporter).await;
    if outcome.is_err() {
        discard_everywhere(&plan, &restore_id).await;
    } else {
        tracing::info!(restore = %restore_id, backup = %plan.manifest.backup_id, "restore done");
    }
    drop(guard);
    reporter.finish(outcome).await;
}

fn request(plan: &RestorePlan, agent: &AgentLink, restore_id: &str) -> v1::RestoreRequest {
    v1::RestoreRequest {
        restore_id: restore_id.to_string(),
        backup_id: plan.manifest.backup_id.to_string(),
        target_dir: plan.target.dir_for(&agent.shard_id),
    }
}

/// Sends one restore call to every agent of the plan in parallel; replies in plan order.
async fn on_every_agent<F, Fut>(
    plan: &RestorePlan,
    restore_id: &str,
    what: &str,
    call: F,
) -> Vec<Result<v1::RestoreStatus>>
where
    F: Fn(AgentClient<Channel>, v1::RestoreRequest) -> Fut,
    Fut: std::future::Future<
            Output = std::result::Result<tonic::Response<v1::RestoreStatus>, tonic::Status>,
        >,
{
    join_all(plan.agents.iter().map(|agent| {
        let reply = call(agent.client.clone(), request(plan, agent, restore_id));
        async move {
            reply
                .await
                .map(|r| r.into_inner())
                .map_err(|s| from_status(&format!("{what} shard {}", agent.shard_id), &s))
        }
    }))
    .await
}

/// Best effort: an agent that cannot be reached lost its staging with its process.
async fn discard_everywhere(plan: &RestorePlan, restore_id: &str) {
    let discards = plan.agents.iter().map(|agent| {
        let mut client = agent.client.clone();
        let request = request(plan, agent, restore_id);
        async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), client.restore_discard(request)).await;
        }
    });
    join_all(discards).await;
}

fn joined(errors: &[Error], what: &str) -> Error {
    let detail = errors
        .iter()
        .map(|e| e.message.clone())
        .collect::<Vec<_>>()
        .join("; ");
    let code = errors
        .first()
        .map_or(ErrorCode::BackupRestorationFailed, |e| e.code);
    Error::new(code, format!("{what}: {detail}"))
}

async fn stage_and_apply(
    ctx: &JobContext,
    plan: &RestorePlan,
    restore_id: &str,
    reporter: &mut Reporter,
) -> Result<()> {
    // Phase 1: stage everywhere.
    let stages = on_every_agent(
        plan,
        restore_id,
        "stage",
        |mut client, request| async move { client.restore_stage(request).await },
    );
    let failures: Vec<Error> = stages.await.into_iter().filter_map(|r| r.err()).collect();
    if !failures.is_empty() {
        return Err(joined(&failures, "restore refused, nothing changed"));
    }

    let ready_state = match plan.target {
        RestoreTarget::InPlace => RestoreState::Staged,
        RestoreTarget::Directory(_) => RestoreState::Applied,
    };
    let deadline = Instant::now() + ctx.config.barrier.upload_timeout();
    let mut every = tokio::time::interval(Duration::from_millis(200));
    let mut misses = vec![0u32; plan.agents.len()];
    loop {
        every.tick().await;
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorCode::BackupRestorationFailed,
                "the shards were not downloaded within upload_timeout_ms; nothing changed",
            ));
        }
        let polls = plan.agents.iter().map(|agent| {
            let mut client = agent.client.clone();
            let request = request(plan, agent, restore_id);
            async move {
                tokio::time::timeout(Duration::from_secs(5), client.restore_status(request)).await
            }
        });
        let mut shards = Vec::new();
        let mut failures = Vec::new();
        let mut all_ready = true;
        for ((agent, reply), misses) in plan
            .agents
            .iter()
            .zip(join_all(polls).await)
            .zip(misses.iter_mut())
        {
            match reply {
                Ok(Ok(status)) => {
                    *misses = 0;
                    let status = status.into_inner();
                    let state =
                        RestoreState::try_from(status.state).unwrap_or(RestoreState::Unspecified);
                    if state == RestoreState::Staging {
                        all_ready = false;
                    } else if state != ready_state {
                        // Failed, or Unknown: the agent restarted and lost its staging.
                        failures.push(status_error(&agent.shard_id, &status));
                    }
                    shards.push(shard_view(&agent.shard_id, &status));
                }
                _ => {
                    all_ready = false;
                    *misses += 1;
                    if *misses >= 25 {
                        failures.push(Error::new(
                            ErrorCode::AgentUnavailable,
                            format!("shard {} stopped answering while staging", agent.shard_id),
                        ));
                    }
                }
            }
        }
        if !shards.is_empty() {
            reporter.view.shards = shards;
        }
        reporter.progress();
        if !failures.is_empty() {
            return Err(joined(&failures, "restore failed, nothing changed"));
        }
        if all_ready {
            break;
        }
    }
    if plan.target != RestoreTarget::InPlace {
        return check_cut(plan, &reporter.view);
    }

    // Phase 2: every shard is staged and checked; swap them in.
    reporter.view.phase = RestorePhase::Applying;
    reporter.progress();
    let applies = on_every_agent(
        plan,
        restore_id,
        "apply",
        |mut client, request| async move { client.restore_apply(request).await },
    )
    .await;
    let mut applied = Vec::new();
    let mut failures = Vec::new();
    let mut shards = Vec::new();
    for (agent, reply) in plan.agents.iter().zip(applies) {
        match reply {
            Ok(status) if status.state == RestoreState::Applied as i32 => {
                applied.push(agent.shard_id.to_string());
                shards.push(shard_view(&agent.shard_id, &status));
            }
            Ok(status) => {
                failures.push(status_error(&agent.shard_id, &status));
                shards.push(shard_view(&agent.shard_id, &status));
            }
            Err(err) => failures.push(err),
        }
    }
    if !shards.is_empty() {
        reporter.view.shards = shards;
    }
    if !failures.is_empty() {
        let replaced = if applied.is_empty() {
            "none".to_string()
        } else {
            applied.join(", ")
        };
        return Err(joined(
            &failures,
            &format!("restore incomplete (shards already replaced: {replaced}); rerun the restore"),
        ));
    }
    check_cut(plan, &reporter.view)
}

/// Every restored shard must sit exactly at the backup's cut.
fn check_cut(plan: &RestorePlan, view: &RestoreView) -> Result<()> {
    for shard in &view.shards {
        let expected = plan.manifest.cut.get(&shard.shard_id).map(|s| s.0);
        if expected != Some(shard.seq) {
            return Err(Error::new(
                ErrorCode::BackupRestorationFailed,
                format!(
                    "shard {} was restored at sequence {}, the backup's cut is {:?}",
                    shard.shard_id, shard.seq, expected
                ),
            ));
        }
    }
    Ok(())
}
