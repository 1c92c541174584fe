//! Scenarios: which faults a run injects, and the options a seed draws (cluster size, RAID
//! layout, lease length, latency, fault times).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The kind of trouble a run is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Agents crash and restart at random points, barrier steps included.
    AgentCrashes,
    /// The coordinator crashes and restarts, mid-barrier and mid-upload.
    CoordinatorCrashes,
    /// Links between the coordinator and agents are cut around the lease deadline.
    Partitions,
    /// Slow links: message delays up to and past the Prepare deadline, until the faults end.
    Delays,
    /// Lossy links between the agents and the WAL archive region while they ship.
    LossyShipping,
    /// The WAL archive region goes away (cut off, or crashed and restarted) and comes back.
    RegionOutages,
    /// A shard's machine is rolled back to an earlier snapshot of it (a VM snapshot restored,
    /// a disk image put back): its writes since are gone, and its archive runs past it.
    Rollbacks,
    /// In-place restores every other round, with the coordinator and agents crashing while
    /// a restore stages, while its shards are swapped in and wait for its decision, and
    /// mid-barrier.
    RestoreCrashes,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::AgentCrashes,
        Kind::CoordinatorCrashes,
        Kind::Partitions,
        Kind::Delays,
        Kind::LossyShipping,
        Kind::RegionOutages,
        Kind::Rollbacks,
        Kind::RestoreCrashes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::AgentCrashes => "agent-crashes",
            Kind::CoordinatorCrashes => "coordinator-crashes",
            Kind::Partitions => "partitions",
            Kind::Delays => "delays",
            Kind::LossyShipping => "lossy-shipping",
            Kind::RegionOutages => "region-outages",
            Kind::Rollbacks => "rollbacks",
            Kind::RestoreCrashes => "restore-crashes",
        }
    }

    /// Every how many rounds the workload restores the cluster in place, instead of asking
    /// for a backup or a tag.
    pub fn restore_every(self) -> usize {
        match self {
            Kind::RestoreCrashes => 2,
            _ => 7,
        }
    }
}

/// When, within the barrier, a crash lands: the fault waits (after its time) for that moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// At once.
    Now,
    /// While some gate is closed: between Prepare and Commit.
    MidBarrier,
    /// While a backup is pending and every gate is open: uploads (or just before Prepare).
    MidUpload,
    /// While an in-place restore stages some shard beside the live one.
    Staging,
    /// While some shard of an in-place restore is swapped in, its old one aside: between
    /// Apply and the shard carrying out the restore's decision.
    Swapped,
}

/// One fault at one simulated instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Crash a host and start it again (its state on "disk" survives), at that moment of the
    /// barrier.
    Bounce(String, Moment),
    /// Cut the link between two hosts...
    Partition(String, String),
    /// ...and heal it.
    Repair(String, String),
    /// Drop this share of the messages between two hosts (0 heals the link).
    Lossy(String, String, u32),
    /// Delay every message by up to this long.
    Latency(Duration),
    /// Snapshot agent N's machine: its shard as it is now, WAL and lineage file included...
    Snapshot(usize),
    /// ...and later crash it and start it again from that snapshot.
    Rollback(usize),
}

/// The message delay of a healthy network.
const CALM_LATENCY: Duration = Duration::from_millis(10);

/// Everything a run does, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub kind: Kind,
    pub agents: usize,
    /// Parity shards of the one RAID group (1: raid5, 2: raid6).
    pub parity: usize,
    pub lease: Duration,
    pub max_latency: Duration,
    /// Faults happen during this first part of the run...
    pub fault_period: Duration,
    /// ...then the cluster must take a backup within this bound.
    pub converge_within: Duration,
    pub faults: Vec<(Duration, Fault)>,
    /// Time between the workload's backup requests.
    pub backup_every: Duration,
    /// The checkers' proof: an agent that ignores its lease.
    pub planted_bug: bool,
    /// The checkers' proof for GC: a coordinator that counts only committed backups as live
    /// and deletes everything else at once (no grace period, no condemnation).
    pub planted_gc_bug: bool,
    /// The checkers' proof for WAL pruning: retention that prunes the WAL every backup but
    /// the newest replays.
    pub planted_prune_bug: bool,
}

pub fn agent(i: usize) -> String {
    format!("agent-{i}")
}

pub const COORDINATOR: &str = "coordinator";

/// The other region: a coordinator with no agents, serving its repository as a WAL archive.
pub const REGION: &str = "region";

impl Scenario {
    pub fn new(seed: u64, kind: Kind) -> Scenario {
        let mut rng = StdRng::seed_from_u64(seed);
        let agents = rng.random_range(3..=5);
        let parity = if agents >= 4 && rng.random_bool(0.5) {
            2
        } else {
            1
        };
        let lease = Duration::from_millis(rng.random_range(300..=1500));
        let max_latency = match kind {
            Kind::Delays => {
                Duration::from_millis(rng.random_range(20..=lease.as_millis() as u64 / 2 + 20))
            }
            _ => Duration::from_millis(rng.random_range(1..=CALM_LATENCY.as_millis() as u64)),
        };
        let fault_period = Duration::from_secs(6);
        let mut faults = Vec::new();
        let n_faults = rng.random_range(2..=6);
        for _ in 0..n_faults {
            let at = Duration::from_millis(rng.random_range(200..fault_period.as_millis() as u64));
            let moments = [Moment::Now, Moment::MidBarrier, Moment::MidUpload];
            match kind {
                Kind::AgentCrashes => {
                    let victim = agent(rng.random_range(0..agents));
                    let moment = moments[rng.random_range(0..moments.len())];
                    faults.push((at, Fault::Bounce(victim, moment)));
                }
                Kind::CoordinatorCrashes => {
                    let moment = moments[rng.random_range(0..moments.len())];
                    faults.push((at, Fault::Bounce(COORDINATOR.to_string(), moment)));
                }
                Kind::RestoreCrashes => {
                    let victim = match rng.random_range(0..=agents) {
                        0 => COORDINATOR.to_string(),
                        n => agent(n - 1),
                    };
                    let moment = [Moment::Staging, Moment::Swapped, Moment::MidBarrier]
                        [rng.random_range(0..3)];
                    faults.push((at, Fault::Bounce(victim, moment)));
                }
                Kind::Partitions => {
                    let victim = agent(rng.random_range(0..agents));
                    // Around the lease deadline: shorter than it, about it, or longer.
                    let lasting = lease.mul_f64(rng.random_range(0.3..1.7));
                    faults.push((
                        at,
                        Fault::Partition(COORDINATOR.to_string(), victim.clone()),
                    ));
                    faults.push((
                        (at + lasting).min(fault_period),
                        Fault::Repair(COORDINATOR.to_string(), victim),
                    ));
                }
                Kind::Delays => {}
                Kind::LossyShipping => {
                    let victim = agent(rng.random_range(0..agents));
                    let percent = rng.random_range(1..=20);
                    let lasting = Duration::from_millis(rng.random_range(100..=1500));
                    faults.push((
                        at,
                        Fault::Lossy(victim.clone(), REGION.to_string(), percent),
                    ));
                    faults.push((
                        (at + lasting).min(fault_period),
                        Fault::Lossy(victim, REGION.to_string(), 0),
                    ));
                }
                Kind::Rollbacks => {
                    // One rollback per victim, its snapshot some writes and backups earlier.
                    let victim = rng.random_range(0..agents);
                    if !faults.iter().any(|(_, f)| *f == Fault::Snapshot(victim)) {
                        let back = Duration::from_millis(rng.random_range(300..=2000));
                        faults.push((at, Fault::Snapshot(victim)));
                        faults.push(((at + back).min(fault_period), Fault::Rollback(victim)));
                    }
                }
                Kind::RegionOutages => {
                    if rng.random_bool(0.5) {
                        faults.push((at, Fault::Bounce(REGION.to_string(), Moment::Now)));
                    } else {
                        let lasting = Duration::from_millis(rng.random_range(200..=3000));
                        for i in 0..agents {
                            faults.push((at, Fault::Partition(agent(i), REGION.to_string())));
                            faults.push((
                                (at + lasting).min(fault_period),
                                Fault::Repair(agent(i), REGION.to_string()),
                            ));
                        }
                    }
                }
            }
        }
        if kind == Kind::Delays {
            // The links calm down with the faults: a barrier cannot beat a Prepare deadline
            // shorter than the round trip, so convergence is owed only after that.
            faults.push((fault_period, Fault::Latency(CALM_LATENCY)));
        }
        faults.sort_by_key(|(at, _)| *at);
        Scenario {
            seed,
            kind,
            agents,
            parity,
            lease,
            max_latency,
            fault_period,
            converge_within: Duration::from_secs(10),
            faults,
            backup_every: Duration::from_millis(rng.random_range(150..=600)),
            planted_bug: false,
            planted_gc_bug: false,
            planted_prune_bug: false,
        }
    }

    /// The same scenario with the planted WAL-pruning bug switched on.
    pub fn with_planted_prune_bug(mut self) -> Scenario {
        self.planted_prune_bug = true;
        self
    }

    /// The same scenario with the planted GC bug switched on.
    pub fn with_planted_gc_bug(mut self) -> Scenario {
        self.planted_gc_bug = true;
        self
    }

    /// Time between the workload's retention and GC passes.
    pub fn maintenance_every(&self) -> Duration {
        self.backup_every * 2
    }

    /// The same scenario with the planted bug switched on.
    pub fn with_planted_bug(mut self) -> Scenario {
        self.planted_bug = true;
        self
    }
}
