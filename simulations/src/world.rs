//! One simulated run: the production coordinator and N production agents (on `MemEngine`,
//! whose files outlive a crash as RocksDB's do) as turmoil hosts, one shared `memory://`
//! repository, a second region (a coordinator with no agents) that the agents ship their WAL
//! to over the simulated network, a client that writes causally chained data and asks for
//! backups, tags and in-place restores, a maintainer that applies retention and runs GC
//! passes beside them, and the fault schedule of the scenario applied between simulation
//! steps. Every acknowledged write is recorded as the model; every agent's gate is watched
//! from outside after every step, in simulated time.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_agent::WriteGate;
use lockstep_agent::backup::BackupOptions;
use lockstep_agent::engine::{EngineConfig, MemEngine, ShardEngine};
use lockstep_agent::lineage::HistorySources;
use lockstep_agent::participant::PlantedBug;
use lockstep_agent::server::{AgentParts, serve_incoming};
use lockstep_agent::shipper::ShipperOptions;
use lockstep_agent::startup::{BackgroundPriority, ShardSource, Startup, prepare_serving};
use lockstep_coordinator::config::{AgentConfig, BarrierConfig, Config, TagsConfig};
use lockstep_coordinator::fleet::AgentLink;
use lockstep_coordinator::gc::GcConfig;
use lockstep_coordinator::retention::RetentionConfig;
use lockstep_proto::tls::Security;
use lockstep_proto::v1;
use lockstep_proto::v1::agent_client::AgentClient;
use lockstep_proto::v1::coordinator_client::CoordinatorClient;
use lockstep_proto::v1::shard_client::ShardClient;
use lockstep_repository::archive::WalArchive;
use lockstep_repository::manifest::{RaidGroup, RaidLayout};
use lockstep_repository::repository::RestoreDecision;
use lockstep_repository::transfer::TransferOptions;
use lockstep_repository::{Repository, ShardId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::net::{channel, connect, endpoint, incoming};
use crate::scenario::{COORDINATOR, Fault, Kind, Moment, REGION, Scenario, agent};

const AGENT_PORT: u16 = 7401;
const COORDINATOR_PORT: u16 = 7400;
const REGION_PORT: u16 = 7500;

/// One write the client sent.
#[derive(Debug, Clone)]
pub struct Write {
    pub shard: usize,
    pub key: String,
    /// Its sequence number once acknowledged; `None` if no acknowledgement came (it may or
    /// may not have been applied).
    pub seq: Option<u64>,
    /// The write acknowledged last before this one was sent: this one causally follows it.
    pub after: Option<usize>,
    /// How many times its shard had been rolled back when it was sent: the history it
    /// belongs to (see [`Rollback`]).
    pub epoch: usize,
}

/// A shard's machine put back to a snapshot, or its shard restored in place: its history
/// from then on holds the writes of history `from_epoch` (the one the snapshot or the
/// backup was taken on) up to `to_seq`, and the writes sent since.
#[derive(Debug, Clone)]
pub struct Rollback {
    pub shard: usize,
    pub at_ms: u64,
    pub to_seq: u64,
    pub from_epoch: usize,
}

/// An in-place restore the client asked for.
#[derive(Debug, Clone)]
pub struct RestoreAttempt {
    pub backup_id: String,
    pub requested_ms: u64,
    pub answered_ms: u64,
    /// `committed`, `reverted`, `nothing` (refused, or failed before any decision), or
    /// `unresolved` (no outcome within the bound).
    pub outcome: String,
}

/// A tag the client asked for.
#[derive(Debug, Clone)]
pub struct TagAttempt {
    pub name: String,
    pub requested_ms: u64,
    pub answered_ms: u64,
    pub created: bool,
}

/// One backup the client asked for.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub backup_id: Option<String>,
    pub requested_ms: u64,
    /// When the client saw the outcome, and the outcome (`committed`, or an error code).
    pub outcome: Option<(u64, String)>,
}

/// What the run recorded.
#[derive(Debug, Default)]
pub struct Record {
    pub writes: Vec<Write>,
    pub attempts: Vec<Attempt>,
    /// Closed-gate intervals per agent, in simulated ms: `[from, to)`.
    pub fences: Vec<Vec<(u64, u64)>>,
    /// Gates seen closed for longer than the lease (agent, from, to).
    pub overlong_fences: Vec<(usize, u64, u64)>,
    /// Whether a backup committed within the bound once the faults stopped...
    pub converged: bool,
    /// ...and every agent's WAL reached the region's archive.
    pub shipped: bool,
    /// Tags the client asked for.
    pub tags: Vec<TagAttempt>,
    /// Shards rolled back or restored in place, in order.
    pub rollbacks: Vec<Rollback>,
    /// In-place restores the client asked for.
    pub restores: Vec<RestoreAttempt>,
    /// Odd while an in-place restore's outcome is unknown: a write sent meanwhile, or
    /// answered after it changed, may be on either history.
    pub restoring: u64,
    /// Every event, in order, for the determinism check.
    pub trace: Vec<String>,
    /// A host whose software failed (not a crash the scenario caused).
    pub host_error: Option<String>,
}

fn now_ms() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

/// The cluster configuration the coordinator runs with.
fn config(scenario: &Scenario, repository: &str) -> Config {
    let shards: Vec<ShardId> = (0..scenario.agents)
        .filter_map(|i| ShardId::new(format!("shard-{i}")).ok())
        .collect();
    let data = scenario.agents - scenario.parity;
    let lease_ms = scenario.lease.as_millis() as u64;
    Config {
        cluster: "sim".into(),
        repository: repository.to_string(),
        listen: format!("0.0.0.0:{COORDINATOR_PORT}"),
        barrier: BarrierConfig {
            lease_ms,
            prepare_timeout_ms: lease_ms / 2,
            stage_timeout_ms: lease_ms,
            // Gates close on arrival: a close time is a wall-clock instant, and a wait on the
            // host's clock would make a seed's run depend on the host.
            close_lead_ms: 0,
            upload_timeout_ms: 30_000,
            // A swap here is instant; the client follows a restore for 30 s at most.
            apply_timeout_ms: 5_000,
            // One coordinator runs at a time here: the grace for a fenced-out one still
            // publishing only slows the workload down.
            takeover_grace_ms: 1_000,
            ..BarrierConfig::default()
        },
        agents: shards
            .iter()
            .enumerate()
            .map(|(i, shard)| AgentConfig {
                shard: shard.clone(),
                endpoint: format!("http://{}:{AGENT_PORT}", agent(i)),
            })
            .collect(),
        raid_groups: vec![RaidGroup {
            name: "group-0".into(),
            layout: if scenario.parity == 2 {
                RaidLayout::Raid6
            } else {
                RaidLayout::Raid5
            },
            data: shards[..data].to_vec(),
            parity: shards[data..].to_vec(),
        }],
        wal_archive: None,
        tags: TagsConfig::default(),
        // Backups go while others run, so GC has garbage to collect beside them.
        retention: RetentionConfig {
            keep_full: 2,
            planted_bug: scenario.planted_prune_bug,
            ..Default::default()
        },
        // Real time does not pass in a simulation (objects' times come from the host's
        // clock): no grace period, so only condemnation protects the running backups.
        gc: GcConfig {
            grace_s: 0,
            planted_bug: scenario.planted_gc_bug,
        },
        verify: Default::default(),
        schedules: Vec::new(),
        metrics_listen: None,
        // The simulated network: its faults are what is tested, not TLS.
        tls: None,
        plaintext: true,
    }
}

/// What a snapshot of an agent's machine holds of its shard (`Fault::Snapshot`): every file
/// of its directory (the engine's snapshot and log, the lineage file), and the history it
/// was on.
#[derive(Clone)]
struct MachineSnapshot {
    files: Vec<(std::ffi::OsString, Vec<u8>)>,
    from_epoch: usize,
}

impl MachineSnapshot {
    fn take(dir: &Path, from_epoch: usize) -> std::io::Result<MachineSnapshot> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                files.push((entry.file_name(), std::fs::read(entry.path())?));
            }
        }
        files.sort();
        Ok(MachineSnapshot { files, from_epoch })
    }

    /// Puts the files back in place of the directory's; the shard's sequence number then.
    fn put_back(&self, dir: &Path) -> Result<u64, String> {
        let io = |err: std::io::Error| format!("roll back {}: {err}", dir.display());
        std::fs::remove_dir_all(dir).map_err(io)?;
        std::fs::create_dir_all(dir).map_err(io)?;
        for (name, bytes) in &self.files {
            std::fs::write(dir.join(name), bytes).map_err(io)?;
        }
        let engine = MemEngine::open(dir, &[]).map_err(|e| e.chain())?;
        Ok(engine.latest_seq().0)
    }
}

/// The step of an in-place restore each shard's directory shows: staged beside it, or
/// swapped in with the old shard aside (`Moment::Swapped` wins).
fn restore_steps(dir: &Path, agents: usize) -> Vec<Option<Moment>> {
    let mut steps = vec![None; agents];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return steps;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((shard, what)) = name
            .strip_prefix(".shard-")
            .and_then(|rest| rest.split_once(".lockstep-"))
        else {
            continue;
        };
        let Some(step) = shard.parse::<usize>().ok().and_then(|i| steps.get_mut(i)) else {
            continue;
        };
        if what == "replaced" {
            *step = Some(Moment::Swapped);
        } else if what.starts_with("restore-") && step.is_none() {
            *step = Some(Moment::Staging);
        }
    }
    steps
}

/// The repositories of a run: the cluster's and the WAL archive region's.
#[derive(Debug, Clone)]
pub struct Stores {
    pub repository: String,
    pub archive: String,
    /// Each shard's directory (its lineage file says which history it is on).
    pub shards: Vec<std::path::PathBuf>,
}

/// Runs `scenario` to its end; the record and the run's repositories.
pub fn run(scenario: &Scenario, dir: &std::path::Path) -> (Record, Stores) {
    lockstep_repository::blocking::run_inline_on_this_thread();
    let name = format!(
        "sim-{}-{}-{}",
        scenario.kind.name(),
        scenario.seed,
        dir.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned())
    );
    let stores = Stores {
        repository: format!("memory://{name}"),
        archive: format!("memory://{name}-region"),
        shards: (0..scenario.agents)
            .map(|i| dir.join(format!("shard-{i}")))
            .collect(),
    };
    let repository = stores.repository.clone();
    let mut sim = turmoil::Builder::new()
        .simulation_duration(
            scenario.fault_period + scenario.converge_within + Duration::from_secs(30),
        )
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(scenario.max_latency)
        .rng_seed(scenario.seed)
        .build();
    let record = Rc::new(RefCell::new(Record {
        fences: vec![Vec::new(); scenario.agents],
        ..Record::default()
    }));
    let gates: Arc<Mutex<Vec<WriteGate>>> =
        Arc::new(Mutex::new(vec![WriteGate::new(); scenario.agents]));
    let mut snapshots: Vec<Option<MachineSnapshot>> = vec![None; scenario.agents];

    for i in 0..scenario.agents {
        let shard_dir = stores.shards[i].clone();
        let (gates, repository) = (gates.clone(), repository.clone());
        let captures: PathBuf = dir.join(format!("captures-{i}"));
        let planted_bug = scenario.planted_bug.then_some(match scenario.kind {
            Kind::Rollbacks => PlantedBug::AppendAcrossFork,
            _ => PlantedBug::IgnoreLease,
        });
        sim.host(agent(i), move || {
            let (gates, repository, shard_dir, captures) = (
                gates.clone(),
                repository.clone(),
                shard_dir.clone(),
                captures.clone(),
            );
            async move {
                let gate = WriteGate::new();
                if let Ok(mut all) = gates.lock() {
                    all[i] = gate.clone();
                }
                let shard_id = ShardId::new(format!("shard-{i}"))?;
                let repo = Repository::open(&repository).await?;
                let region = lockstep_proto::archive::remote(
                    &format!("lockstep://{REGION}:{REGION_PORT}"),
                    connect(
                        lockstep_proto::archive::channel_settings(endpoint(REGION, REGION_PORT)),
                        REGION,
                        REGION_PORT,
                    ),
                    repo.seal(),
                );
                // The cluster's repository is a WAL destination too: retention prunes its
                // `wal/`, and the checkers replay what is left from the backups.
                let own_wal = WalArchive::Store(repo.clone());
                // The binary's start-up, on the files the agent's last run left, at the
                // agent's own priority (nothing process-wide changes under simulation).
                let slot = prepare_serving::<MemEngine>(Startup {
                    dir: shard_dir,
                    capture_root: captures.clone(),
                    priority: BackgroundPriority::Normal,
                    source: ShardSource::Open {
                        column_families: vec!["default".to_string()],
                        config: EngineConfig::default(),
                    },
                    history: HistorySources {
                        shard: shard_id.clone(),
                        destinations: vec![region.clone(), own_wal.clone()],
                        repo: Some(repo.clone()),
                    },
                    planted_bug,
                })
                .await?;
                let parts = AgentParts {
                    slot,
                    repo,
                    shard_id,
                    options: BackupOptions {
                        capture_root: captures,
                        transfer: TransferOptions {
                            parallelism: 2,
                            ..TransferOptions::default()
                        },
                        min_free_bytes: 0,
                    },
                    shipping: ShipperOptions {
                        destinations: vec![region, own_wal],
                        planted_bug,
                        ..ShipperOptions::default()
                    },
                    gate,
                    planted_bug,
                    metrics: false,
                    bandwidth: Default::default(),
                    security: Security::Plaintext,
                };
                serve_incoming(parts, incoming(AGENT_PORT).await?, CancellationToken::new())
                    .await?;
                Ok(())
            }
        });
    }

    let mut region_config = config(scenario, &stores.archive);
    region_config.agents.clear();
    region_config.raid_groups.clear();
    sim.host(REGION, move || {
        let config = region_config.clone();
        async move {
            lockstep_coordinator::service::serve_incoming(
                config,
                Vec::new(),
                Security::Plaintext,
                incoming(REGION_PORT).await?,
                CancellationToken::new(),
                || {},
            )
            .await?;
            Ok(())
        }
    });

    let coordinator_config = config(scenario, &repository);
    sim.host(COORDINATOR, move || {
        let config = coordinator_config.clone();
        async move {
            let agents = config
                .agents
                .iter()
                .enumerate()
                .map(|(i, a)| AgentLink {
                    shard_id: a.shard.clone(),
                    endpoint: a.endpoint.clone(),
                    // The production channel settings (timeouts, keepalive).
                    client: AgentClient::new(connect(
                        lockstep_proto::long_lived(endpoint(&agent(i), AGENT_PORT)),
                        &agent(i),
                        AGENT_PORT,
                    )),
                })
                .collect();
            lockstep_coordinator::service::serve_incoming(
                config,
                agents,
                Security::Plaintext,
                incoming(COORDINATOR_PORT).await?,
                CancellationToken::new(),
                || {},
            )
            .await?;
            Ok(())
        }
    });

    sim.client(
        "client",
        workload(scenario.clone(), record.clone(), repository.clone()),
    );

    // Faults between steps, and the gates watched after every step.
    let mut faults = scenario.faults.clone().into_iter().peekable();
    let mut closed_since: Vec<Option<u64>> = vec![None; scenario.agents];
    // Whether a restore was staged or swapped in while the gate was closed: its Apply holds
    // the gate until the restore's decision, under the restore's lease, not the barrier's.
    let mut closed_for_restore = vec![false; scenario.agents];
    let fault_period_ms = scenario.fault_period.as_millis() as u64;
    // The cluster's repository, read between steps to aim crashes at uploads.
    let backup_repo = match futures::executor::block_on(Repository::open(&repository)) {
        Ok(repo) => repo,
        Err(err) => {
            record.borrow_mut().host_error = Some(err.chain());
            return (
                Rc::try_unwrap(record)
                    .map(RefCell::into_inner)
                    .unwrap_or_default(),
                stores,
            );
        }
    };
    let lease_ms = scenario.lease.as_millis() as u64;
    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(err) => {
                record.borrow_mut().host_error = Some(err.to_string());
                break;
            }
        }
        let now = sim.elapsed().as_millis() as u64;
        let closed: Vec<bool> = match gates.lock() {
            Ok(all) => all.iter().map(WriteGate::is_closed).collect(),
            Err(_) => vec![false; scenario.agents],
        };
        // Read only when it matters: a gate is closed, or the next fault waits on a restore.
        let restore_matters = closed.iter().any(|c| *c)
            || faults.peek().is_some_and(|(at, fault)| {
                at.as_millis() as u64 <= now
                    && matches!(
                        fault,
                        Fault::Snapshot(_)
                            | Fault::Rollback(_)
                            | Fault::Bounce(_, Moment::Staging | Moment::Swapped)
                    )
            });
        let restoring = if restore_matters {
            restore_steps(dir, scenario.agents)
        } else {
            vec![None; scenario.agents]
        };
        while let Some((at, fault)) = faults.peek() {
            if at.as_millis() as u64 > now {
                break;
            }
            // A crash aimed at a moment of the barrier or of a restore waits for it (until
            // the faults end); a machine's snapshot, and its rollback, wait until no restore
            // touches its shard.
            let arrived = match fault {
                Fault::Bounce(_, moment) => {
                    let mid_barrier = closed.iter().any(|c| *c);
                    match moment {
                        Moment::Now => true,
                        Moment::MidBarrier => mid_barrier,
                        Moment::MidUpload => {
                            !mid_barrier
                                && futures::executor::block_on(backup_repo.pending_ids())
                                    .is_ok_and(|pending| !pending.is_empty())
                        }
                        Moment::Staging | Moment::Swapped => restoring.contains(&Some(*moment)),
                    }
                }
                // Not while a restore's outcome is open either: the model orders a rollback and
                // a restore by when each was seen, which must be the order they happened in.
                Fault::Snapshot(i) | Fault::Rollback(i) => {
                    restoring[*i].is_none() && record.borrow().restoring.is_multiple_of(2)
                }
                _ => true,
            };
            if !arrived && now < fault_period_ms {
                break;
            }
            if !arrived {
                record
                    .borrow_mut()
                    .trace
                    .push(format!("{now} fault {fault:?} never found its moment"));
                faults.next();
                continue;
            }
            record
                .borrow_mut()
                .trace
                .push(format!("{now} fault {fault:?}"));
            match fault {
                Fault::Bounce(host, _) => sim.bounce(host.as_str()),
                Fault::Partition(a, b) => sim.partition(a.as_str(), b.as_str()),
                Fault::Repair(a, b) => sim.repair(a.as_str(), b.as_str()),
                Fault::Lossy(a, b, percent) => {
                    sim.set_link_fail_rate(a.as_str(), b.as_str(), f64::from(*percent) / 100.0)
                }
                Fault::Latency(max) => sim.set_max_message_latency(*max),
                Fault::Snapshot(i) => {
                    let from_epoch = record
                        .borrow()
                        .rollbacks
                        .iter()
                        .filter(|r| r.shard == *i)
                        .count();
                    match MachineSnapshot::take(&stores.shards[*i], from_epoch) {
                        Ok(snapshot) => snapshots[*i] = Some(snapshot),
                        Err(err) => {
                            record.borrow_mut().host_error =
                                Some(format!("snapshot shard-{i}: {err}"))
                        }
                    }
                }
                Fault::Rollback(i) => {
                    if let Some(snapshot) = snapshots[*i].take() {
                        match snapshot.put_back(&stores.shards[*i]) {
                            Ok(to_seq) => record.borrow_mut().rollbacks.push(Rollback {
                                shard: *i,
                                at_ms: now,
                                to_seq,
                                from_epoch: snapshot.from_epoch,
                            }),
                            Err(err) => record.borrow_mut().host_error = Some(err),
                        }
                        sim.bounce(agent(*i).as_str());
                    }
                }
            }
            faults.next();
        }
        let mut record = record.borrow_mut();
        for (i, is_closed) in closed.into_iter().enumerate() {
            closed_for_restore[i] = is_closed && (closed_for_restore[i] || restoring[i].is_some());
            match (closed_since[i], is_closed) {
                (None, true) => closed_since[i] = Some(now),
                (Some(from), false) => {
                    record.fences[i].push((from, now));
                    closed_since[i] = None;
                }
                (Some(from), true) if now - from > lease_ms + 5 && !closed_for_restore[i] => {
                    match record
                        .overlong_fences
                        .iter_mut()
                        .find(|(a, f, _)| *a == i && *f == from)
                    {
                        Some(overlong) => overlong.2 = now,
                        None => record.overlong_fences.push((i, from, now)),
                    }
                }
                _ => {}
            }
        }
    }
    drop(sim);
    let mut record = Rc::try_unwrap(record)
        .map(RefCell::into_inner)
        .unwrap_or_default();
    // Which history each shard ended on (ids are random: the timeline goes in the trace).
    for (i, dir) in stores.shards.iter().enumerate() {
        let timeline = lockstep_agent::lineage::read_lineage(dir)
            .ok()
            .flatten()
            .map(|l| l.timeline.0);
        record
            .trace
            .push(format!("end shard-{i} timeline {timeline:?}"));
    }
    (record, stores)
}

/// The client: causally chained writes to random shards, and backups, tags and in-place
/// restores every so often; once the faults stop, backups until one commits within the bound.
async fn workload(
    scenario: Scenario,
    record: Rc<RefCell<Record>>,
    repository: String,
) -> turmoil::Result {
    let done = Rc::new(Cell::new(false));
    let writer = {
        let (record, done, scenario) = (record.clone(), done.clone(), scenario.clone());
        async move {
            let mut rng = StdRng::seed_from_u64(scenario.seed ^ 0x0057_17e5);
            let shards: Vec<ShardClient<_>> = (0..scenario.agents)
                .map(|i| ShardClient::new(channel(&agent(i), AGENT_PORT)))
                .collect();
            let mut last_acked = None;
            let mut n = 0u64;
            // The history a write to `shard` goes to, and whether a restore was in doubt.
            let history = |shard: usize| {
                let record = record.borrow();
                let epoch = record.rollbacks.iter().filter(|r| r.shard == shard).count();
                (epoch, record.restoring)
            };
            while !done.get() {
                let shard = rng.random_range(0..scenario.agents);
                let sent_on = history(shard);
                let epoch = sent_on.0;
                let key = format!("w-{n:06}");
                n += 1;
                let mut client = shards[shard].clone();
                let request = v1::PutRequest {
                    column_family: String::new(),
                    key: key.clone().into_bytes(),
                    value: b"v".to_vec(),
                };
                let reply = tokio::time::timeout(Duration::from_secs(3), client.put(request)).await;
                let in_doubt = history(shard) != sent_on || sent_on.1 % 2 == 1;
                let seq = match reply {
                    // Acknowledged across a rollback or a restore, or while a restore's
                    // outcome was unknown: which history holds it cannot be told, so the
                    // model treats it as never acknowledged.
                    Ok(Ok(reply)) if !in_doubt => Some(reply.into_inner().last_seq),
                    _ => None,
                };
                {
                    let mut record = record.borrow_mut();
                    let index = record.writes.len();
                    record
                        .trace
                        .push(format!("{} write {key} shard-{shard} {seq:?}", now_ms()));
                    record.writes.push(Write {
                        shard,
                        key,
                        seq,
                        after: last_acked,
                        epoch,
                    });
                    if seq.is_some() {
                        last_acked = Some(index);
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..=15))).await;
            }
        }
    };
    let backups = {
        let (record, scenario, done) = (record.clone(), scenario.clone(), done.clone());
        async move {
            let mut coordinator = CoordinatorClient::new(channel(COORDINATOR, COORDINATOR_PORT));
            let mut rng = StdRng::seed_from_u64(scenario.seed ^ 0x00ba_c0c0);
            let mut round = 0;
            while now_ms() < scenario.fault_period.as_millis() as u64 {
                tokio::time::sleep(scenario.backup_every).await;
                round += 1;
                if round % scenario.kind.restore_every() == 0 {
                    restore(&mut coordinator, &scenario, &record, &repository, &mut rng).await;
                } else if round % 3 == 0 {
                    tag(&mut coordinator, round, &record).await;
                } else {
                    // Chains too: an incremental or differential continues the shard's
                    // history from its parent, and is refused across a fork.
                    let kind = ["full", "incremental", "differential"][rng.random_range(0..3)];
                    backup(&mut coordinator, &scenario, &record, kind).await;
                }
            }
            // The faults are over: the cluster must converge, a backup committing within the bound.
            let deadline = now_ms() + scenario.converge_within.as_millis() as u64;
            let mut converged = false;
            while !converged && now_ms() < deadline {
                converged = backup(&mut coordinator, &scenario, &record, "full").await;
                if !converged {
                    tokio::time::sleep(scenario.lease).await;
                }
            }
            record.borrow_mut().converged = converged;
            done.set(true);
            deadline
        }
    };
    let maintenance = {
        let (record, scenario, done) = (record.clone(), scenario.clone(), done.clone());
        async move {
            let mut coordinator = CoordinatorClient::new(channel(COORDINATOR, COORDINATOR_PORT));
            let mut round = 0u64;
            while !done.get() {
                tokio::time::sleep(scenario.maintenance_every()).await;
                round += 1;
                let outcome = if round % 2 == 1 {
                    let request = v1::ApplyRetentionRequest { dry_run: false };
                    match tokio::time::timeout(
                        Duration::from_secs(5),
                        coordinator.apply_retention(request),
                    )
                    .await
                    {
                        Ok(Ok(plan)) => format!(
                            "retention removed {}",
                            plan.into_inner().items.iter().filter(|i| i.remove).count()
                        ),
                        Ok(Err(status)) => format!("retention refused {}", status.code()),
                        Err(_) => "retention unanswered".into(),
                    }
                } else {
                    let request = v1::CollectGarbageRequest { dry_run: false };
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        coordinator.collect_garbage(request),
                    )
                    .await
                    {
                        Ok(Ok(report)) => {
                            let report = report.into_inner();
                            format!(
                                "gc deleted {} rescued {}",
                                report.objects_deleted, report.objects_rescued
                            )
                        }
                        Ok(Err(status)) => format!("gc refused {}", status.code()),
                        Err(_) => "gc unanswered".into(),
                    }
                };
                record
                    .borrow_mut()
                    .trace
                    .push(format!("{} {outcome}", now_ms()));
            }
        }
    };
    let ((), deadline, ()) = futures::join!(writer, backups, maintenance);
    // With the writer stopped (no write in flight), every shard's WAL must reach the archive.
    let shipped = shipped_everything(&scenario, deadline + 10_000).await;
    record.borrow_mut().shipped = shipped;
    Ok(())
}

/// Asks for a tag.
async fn tag(
    coordinator: &mut CoordinatorClient<tonic::transport::Channel>,
    round: usize,
    record: &Rc<RefCell<Record>>,
) {
    let name = format!("tag-{round:04}");
    let requested_ms = now_ms();
    let request = v1::CreateTagRequest {
        name: name.clone(),
        ..Default::default()
    };
    let created = matches!(
        tokio::time::timeout(Duration::from_secs(5), coordinator.create_tag(request)).await,
        Ok(Ok(_))
    );
    let mut record = record.borrow_mut();
    record
        .trace
        .push(format!("{} tag {name} created={created}", now_ms()));
    record.tags.push(TagAttempt {
        name,
        requested_ms,
        answered_ms: now_ms(),
        created,
    });
}

/// Restores a committed backup in place and follows it until its outcome is known. The
/// stream's last view says how it ended; the restore's stored decision says what the shards
/// did. When the stream breaks (its coordinator crashed), the restore is settled by the one
/// that starts next (it discards a staging restore and reverts an applying one that has no
/// decision) or by the agents' leases: the outcome is the decision once stored, or nothing
/// once the restore's record is gone without one.
async fn restore(
    coordinator: &mut CoordinatorClient<tonic::transport::Channel>,
    scenario: &Scenario,
    record: &Rc<RefCell<Record>>,
    repository: &str,
    rng: &mut StdRng,
) {
    let committed: Vec<String> = record
        .borrow()
        .attempts
        .iter()
        .filter(|a| a.outcome.as_ref().is_some_and(|o| o.1 == "committed"))
        .filter_map(|a| a.backup_id.clone())
        .collect();
    if committed.is_empty() {
        return;
    }
    let backup_id = committed[rng.random_range(0..committed.len())].clone();
    // Read before the restore: retention may remove the backup once it ends.
    let cut = async {
        let repo = Repository::open(repository).await?;
        let id = lockstep_repository::BackupId::new(backup_id.clone())?;
        repo.backup_manifest(&id).await
    }
    .await;
    let requested_ms = now_ms();
    record.borrow_mut().restoring += 1;
    let deadline = requested_ms + 20_000;
    let request = v1::RestoreClusterRequest {
        backup_id: backup_id.clone(),
        in_place: true,
        ..Default::default()
    };
    let mut restore_id = String::new();
    let mut last_phase = None;
    let mut refused = None;
    // Long enough for any planning: without an id, the call failed because its coordinator
    // went away, and a restarted one never commits what it did not start.
    match tokio::time::timeout(Duration::from_secs(15), coordinator.restore(request)).await {
        Ok(Ok(stream)) => {
            let mut stream = stream.into_inner();
            while now_ms() < deadline {
                let left = Duration::from_millis(deadline.saturating_sub(now_ms()));
                match tokio::time::timeout(left, stream.message()).await {
                    Ok(Ok(Some(job))) => {
                        if !job.restore_id.is_empty() {
                            restore_id = job.restore_id.clone();
                        }
                        last_phase = v1::RestorePhase::try_from(job.phase).ok();
                        if matches!(
                            last_phase,
                            Some(v1::RestorePhase::Done | v1::RestorePhase::Failed)
                        ) {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        }
        Ok(Err(status)) => refused = Some(status.code()),
        Err(_) => {}
    }
    let ended = matches!(
        last_phase,
        Some(v1::RestorePhase::Done | v1::RestorePhase::Failed)
    );
    let outcome = match lockstep_repository::RestoreId::new(restore_id) {
        // Refused, or gone before its first view: nothing was staged or recorded.
        Err(_) => refused.map_or("nothing".to_string(), |code| format!("nothing ({code})")),
        // Its coordinator saw it end: the decision, if any, is stored.
        Ok(id) if ended => settled(repository, &id, 0).await,
        Ok(id) => settled(repository, &id, deadline + 10_000).await,
    };
    let mut record = record.borrow_mut();
    if outcome == "committed" {
        // Every shard goes back to the backup's cut of the history it was taken on.
        let window = record
            .attempts
            .iter()
            .find(|a| a.backup_id.as_deref() == Some(backup_id.as_str()))
            .map_or((0, u64::MAX), |a| {
                (a.requested_ms, a.outcome.as_ref().map_or(u64::MAX, |o| o.0))
            });
        let instant = crate::check::fence_instant(&record.fences, window).unwrap_or(window.0);
        let from = crate::check::epochs_at(&record, scenario.agents, instant);
        match cut {
            Ok(manifest) => {
                for (shard, from_epoch) in from.into_iter().enumerate() {
                    let to_seq = ShardId::new(format!("shard-{shard}"))
                        .ok()
                        .and_then(|s| manifest.cut.get(&s).map(|seq| seq.0))
                        .unwrap_or(0);
                    record.rollbacks.push(Rollback {
                        shard,
                        at_ms: now_ms(),
                        to_seq,
                        from_epoch,
                    });
                }
            }
            Err(err) => {
                record.host_error = Some(format!(
                    "restore of {backup_id} committed, and its backup could not be read before: {}",
                    err.chain()
                ))
            }
        }
    }
    record.restoring += 1;
    let index = record.restores.len();
    record.trace.push(format!(
        "{} restore #{index} {outcome} (last view {last_phase:?})",
        now_ms()
    ));
    record.restores.push(RestoreAttempt {
        backup_id,
        requested_ms,
        answered_ms: now_ms(),
        outcome,
    });
}

/// What became of restore `id`: `committed` or `reverted` once its decision is stored,
/// `nothing` once its record is gone without one, `unresolved` if neither by `deadline_ms`.
/// A deadline of 0 reads the decision once: the restore ended, and one that ended with no
/// decision stored changed nothing (only the coordinator running it decides commit).
async fn settled(
    repository: &str,
    id: &lockstep_repository::RestoreId,
    deadline_ms: u64,
) -> String {
    let Ok(repo) = Repository::open(repository).await else {
        return "unresolved".into();
    };
    let outcome = |decision: Option<RestoreDecision>| match decision {
        Some(RestoreDecision::Commit) => "committed".to_string(),
        Some(RestoreDecision::Revert) => "reverted".to_string(),
        None => "nothing".to_string(),
    };
    if deadline_ms == 0 {
        return match repo.restore_decision(id).await {
            Ok(decision) => outcome(decision),
            Err(_) => "unresolved".into(),
        };
    }
    while now_ms() < deadline_ms {
        match repo.restore_decision(id).await {
            Ok(Some(decision)) => return outcome(Some(decision)),
            Ok(None) => {
                if let Ok(None) = repo.running_restore(id).await {
                    // Gone; a decision stored just before the record was removed counts.
                    if let Ok(decision) = repo.restore_decision(id).await {
                        return outcome(decision);
                    }
                }
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    "unresolved".into()
}

/// Waits until every agent reports its WAL durable in the archive up to its latest write.
async fn shipped_everything(scenario: &Scenario, deadline_ms: u64) -> bool {
    let agents: Vec<AgentClient<_>> = (0..scenario.agents)
        .map(|i| AgentClient::new(channel(&agent(i), AGENT_PORT)))
        .collect();
    while now_ms() < deadline_ms {
        let mut all = true;
        for client in &agents {
            let status = tokio::time::timeout(
                Duration::from_secs(2),
                client.clone().wal_status(v1::WalStatusRequest {}),
            )
            .await;
            all &= match status {
                Ok(Ok(reply)) => {
                    let reply = reply.into_inner();
                    reply
                        .destinations
                        .iter()
                        .all(|d| d.lag_seq == 0 && d.shipped_seq == reply.latest_seq)
                }
                _ => false,
            };
        }
        if all {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Asks for one backup of `kind` and follows it to its outcome; true if it committed.
async fn backup(
    coordinator: &mut CoordinatorClient<tonic::transport::Channel>,
    scenario: &Scenario,
    record: &Rc<RefCell<Record>>,
    kind: &str,
) -> bool {
    let requested_ms = now_ms();
    let index = {
        let mut record = record.borrow_mut();
        record.attempts.push(Attempt {
            backup_id: None,
            requested_ms,
            outcome: None,
        });
        record.attempts.len() - 1
    };
    // The trace keeps what a seed decides; a message can name random ids (lineages), which
    // only the outcome keeps.
    let finish = |outcome: String| {
        let mut record = record.borrow_mut();
        let traced = outcome.split(": ").next().unwrap_or_default().to_string();
        record
            .trace
            .push(format!("{} backup #{index} {traced}", now_ms()));
        record.attempts[index].outcome = Some((now_ms(), outcome));
    };
    let request = v1::CreateBackupRequest {
        kind: kind.into(),
        ..Default::default()
    };
    let job = match tokio::time::timeout(Duration::from_secs(3), coordinator.create_backup(request))
        .await
    {
        Ok(Ok(job)) => job.into_inner(),
        Ok(Err(status)) => {
            finish(format!("refused {}", status.code()));
            return false;
        }
        Err(_) => {
            finish("unanswered".into());
            return false;
        }
    };
    record.borrow_mut().attempts[index].backup_id = Some(job.backup_id.clone());
    let deadline = now_ms() + (scenario.lease * 4).as_millis() as u64 + 5_000;
    while now_ms() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let poll = v1::GetBackupJobRequest {
            backup_id: job.backup_id.clone(),
        };
        match tokio::time::timeout(Duration::from_secs(2), coordinator.get_backup_job(poll)).await {
            Ok(Ok(job)) => {
                let job = job.into_inner();
                match v1::JobState::try_from(job.state) {
                    Ok(v1::JobState::Committed) => {
                        finish("committed".into());
                        return true;
                    }
                    Ok(v1::JobState::Failed) => {
                        finish(format!("failed {}: {}", job.error_code, job.error_message));
                        return false;
                    }
                    _ => {}
                }
            }
            // The coordinator restarted and forgot the job, or is unreachable: keep asking
            // until the deadline; the repository says at the end whether it committed.
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                finish("lost".into());
                return false;
            }
            _ => {}
        }
    }
    finish("timed out".into());
    false
}
