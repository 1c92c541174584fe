//! The one door from the coordinator to its agents: every call to "each agent" goes through
//! [`call_each`] with a named [`Step`], and every wait for agents to finish something goes
//! through [`poll_until`].
//!
//! Every agent RPC runs under the deadline its step takes from the configuration
//! ([`Step::timeout`]); the channels themselves carry no per-call cap, so a phase that is
//! allowed a minute gets a minute, and a status poll gets its own short deadline. Replies come
//! back in the order the agents were given, one `Result` per agent, with the step and shard
//! named in every error.
//!
//! Poll policy (one for every wait): every agent is asked every [`POLL_EVERY`]; an agent that
//! has not answered for [`unreachable_after`] (5 s, or two call deadlines if longer) fails the
//! wait with `ERR_AGENT_UNAVAILABLE`; an agent that answers with an error fails it at once;
//! the whole wait fails at its overall deadline.

use std::future::Future;
use std::time::Duration;

use futures::future::join_all;
use lockstep_proto::auth::Identity;
use lockstep_proto::from_status;
use lockstep_proto::tls::Security;
use lockstep_proto::v1::agent_client::AgentClient;
use lockstep_repository::{Error, ErrorCode, Result, ShardId};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::config::{BarrierConfig, Config};

/// How often a wait asks every agent.
pub const POLL_EVERY: Duration = Duration::from_millis(100);

/// How long an agent may go without answering a poll before the wait gives up on it, at
/// least.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(5);

/// How long an agent may go without answering a poll: [`UNREACHABLE_AFTER`], or two call
/// deadlines when those are longer, so one slow answer never fails a wait.
pub fn unreachable_after(barrier: &BarrierConfig) -> Duration {
    UNREACHABLE_AFTER.max(2 * barrier.control_timeout())
}

/// One agent as the coordinator reaches it.
#[derive(Clone)]
pub struct AgentLink {
    pub shard_id: ShardId,
    pub endpoint: String,
    pub client: AgentClient<Channel>,
}

/// Builds lazily-connecting clients for every agent of the configuration; with TLS, each
/// agent's certificate must name its shard (`lockstep://agent/<shard>`).
pub fn agent_links(config: &Config, security: &Security) -> Result<Vec<AgentLink>> {
    config
        .agents
        .iter()
        .map(|agent| {
            let target = lockstep_proto::tls::endpoint(
                &agent.endpoint,
                security,
                Identity::Agent(agent.shard.clone()),
            )
            .map_err(|err| err.context(format!("agent {}", agent.shard)))?
            .with(lockstep_proto::long_lived);
            Ok(AgentLink {
                shard_id: agent.shard.clone(),
                endpoint: agent.endpoint.clone(),
                client: AgentClient::new(target.lazy()),
            })
        })
        .collect()
}

/// A named agent call, with the deadline the configuration gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Barrier phase 0: capture with the gate open.
    Stage,
    /// Barrier phase 1: close the gate and cut.
    Prepare,
    /// Barrier phase 2: reopen and upload.
    Commit,
    Abort,
    /// A barrier's status (upload progress).
    Status,
    Describe,
    WalStatus,
    SetLimits,
    /// Start staging a restore (the download runs after the reply).
    RestoreStage,
    RestoreStatus,
    /// Swap a staged shard in: drains the shard's clients, so it may take a while.
    RestoreApply,
    /// Keep a swapped shard (the restore decided commit).
    RestoreCommit,
    /// Drop a staged shard, or revert a swapped one: that reopens the old shard.
    RestoreDiscard,
}

impl Step {
    /// The step's name in messages, e.g. "prepare".
    pub fn name(self) -> &'static str {
        match self {
            Step::Stage => "stage",
            Step::Prepare => "prepare",
            Step::Commit => "commit",
            Step::Abort => "abort",
            Step::Status => "status",
            Step::Describe => "describe",
            Step::WalStatus => "wal status",
            Step::SetLimits => "set limits",
            Step::RestoreStage => "restore stage",
            Step::RestoreStatus => "restore status",
            Step::RestoreApply => "restore apply",
            Step::RestoreCommit => "restore commit",
            Step::RestoreDiscard => "restore discard",
        }
    }

    /// How long one call of this step may take.
    pub fn timeout(self, barrier: &BarrierConfig) -> Duration {
        let ms = match self {
            Step::Stage | Step::RestoreStage => barrier.stage_timeout_ms,
            Step::Prepare => barrier.prepare_timeout_ms,
            Step::RestoreApply | Step::RestoreCommit | Step::RestoreDiscard => {
                barrier.apply_timeout_ms
            }
            // A late Commit reply holds no gate: the agent reopens on receipt, or
            // answers that its lease ran out first.
            Step::Commit
            | Step::Abort
            | Step::Status
            | Step::Describe
            | Step::WalStatus
            | Step::SetLimits
            | Step::RestoreStatus => barrier.control_timeout_ms,
        };
        Duration::from_millis(ms)
    }
}

/// Calls every agent of `agents` in parallel, each call bounded by `deadline`; one result
/// per agent, in order. A call that fails or misses the deadline is an error naming the step
/// and the shard.
pub async fn call_each<'a, T, F, Fut>(
    agents: impl IntoIterator<Item = &'a AgentLink>,
    step: Step,
    deadline: Instant,
    call: F,
) -> Vec<Result<T>>
where
    F: Fn(&'a AgentLink, AgentClient<Channel>) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let sent = Instant::now();
    join_all(agents.into_iter().map(|agent| {
        let reply = call(agent, agent.client.clone());
        async move {
            match tokio::time::timeout_at(deadline, reply).await {
                Ok(Ok(reply)) => Ok(reply.into_inner()),
                Ok(Err(status)) => Err(from_status(
                    &format!("{} shard {}", step.name(), agent.shard_id),
                    &status,
                )),
                Err(_) => Err(Error::new(
                    ErrorCode::AgentUnavailable,
                    format!(
                        "shard {} did not answer {} within {} ms",
                        agent.shard_id,
                        step.name(),
                        deadline.saturating_duration_since(sent).as_millis()
                    ),
                )),
            }
        }
    }))
    .await
}

/// What a wait does after a round of answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Round {
    /// Every agent is where the wait wants it.
    Done,
    /// Ask again.
    Continue,
}

/// Asks every agent of `agents` with `call` (step `step`) every [`POLL_EVERY`] until `settle`
/// says [`Round::Done`] or returns an error; `settle` sees one result per agent, in order (a
/// miss, an agent that did not answer, is an `Err`). Fails when an agent answers with an
/// error, when one has not answered for [`unreachable_after`], or when `deadline` passes
/// (with the error `overdue`).
pub async fn poll_until<'a, T, F, Fut, S>(
    agents: &[&'a AgentLink],
    step: Step,
    barrier: &BarrierConfig,
    deadline: Instant,
    overdue: Error,
    call: F,
    mut settle: S,
) -> Result<()>
where
    F: Fn(&'a AgentLink, AgentClient<Channel>) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    S: FnMut(&[Result<T>]) -> Result<Round>,
{
    let mut every = tokio::time::interval(POLL_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let silent_limit = unreachable_after(barrier);
    let mut last_answer = vec![Instant::now(); agents.len()];
    loop {
        every.tick().await;
        let now = Instant::now();
        if now > deadline {
            return Err(overdue);
        }
        let call_deadline = (now + step.timeout(barrier)).min(deadline);
        let replies = call_each(agents.iter().copied(), step, call_deadline, &call).await;
        for ((agent, reply), last) in agents.iter().zip(&replies).zip(&mut last_answer) {
            match reply {
                Ok(_) => *last = Instant::now(),
                Err(err) if err.code != ErrorCode::AgentUnavailable => {
                    return Err(Error::new(err.code, err.chain()));
                }
                Err(err) if last.elapsed() >= silent_limit => {
                    return Err(Error::new(
                        ErrorCode::AgentUnavailable,
                        format!(
                            "shard {} stopped answering ({} for {} s): {}",
                            agent.shard_id,
                            step.name(),
                            silent_limit.as_secs(),
                            err.message
                        ),
                    ));
                }
                Err(_) => {}
            }
        }
        if settle(&replies)? == Round::Done {
            return Ok(());
        }
    }
}

/// Joins several agents' errors into one, with the first one's code.
pub fn joined(errors: &[Error], what: &str) -> Error {
    let detail = errors
        .iter()
        .map(|e| e.message.clone())
        .collect::<Vec<_>>()
        .join("; ");
    let code = errors
        .first()
        .map_or(ErrorCode::AgentUnavailable, |e| e.code);
    Error::new(code, format!("{what}: {detail}"))
}
