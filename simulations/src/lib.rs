//! Deterministic turmoil simulations of whole Lockstep clusters.
//!
//! A run is the production coordinator and N production agents (on `MemEngine`) as turmoil
//! hosts, reached over turmoil's network through the same `serve_incoming` and `AgentLink`
//! the binaries use (`net`), a client that writes causally chained data and asks for backups,
//! and a scenario's faults (`scenario`): crashes at any point of the barrier, partitions and
//! delays around the lease deadline, lossy links to and outages of the WAL archive region,
//! a shard's machine rolled back to an earlier snapshot, and crashes while an in-place
//! restore stages or holds its swapped shards. After every run the checkers
//! (`check`) look at what the run recorded and at the repositories it left.
//!
//! - `world`: one run, and what it records;
//! - `check`: the properties every run must keep;
//! - `run_seed`: a seed in, an outcome out, with the hash of the run's event trace.
//!
//! Determinism: turmoil's network, latencies and host order come from the seed, the
//! workload's choices too, and blocking work runs inline on the simulation thread
//! (`lockstep_repository::blocking`). Not yet covered: restores into a directory (`--to`)
//! and point-in-time restores, which change no live shard.

pub mod check;
pub mod net;
pub mod scenario;
pub mod world;

use sha2::{Digest, Sha256};

pub use check::Violation;
pub use scenario::{Kind, Scenario};

/// What one run gave.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub kind: Kind,
    pub violations: Vec<Violation>,
    pub committed: usize,
    pub attempts: usize,
    pub writes: usize,
    /// SHA-256 of the event trace: equal seeds must give equal hashes.
    pub trace_hash: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} ({}): {} writes, {}/{} backups committed, trace {}",
            self.seed,
            self.kind.name(),
            self.writes,
            self.committed,
            self.attempts,
            &self.trace_hash[..12]
        )?;
        for v in &self.violations {
            write!(
                f,
                "\n  VIOLATION {}: {} (seed {})",
                v.property, v.detail, self.seed
            )?;
        }
        Ok(())
    }
}

/// Runs `scenario` and checks it.
pub fn run_scenario(scenario: &Scenario) -> Outcome {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(err) => {
            return Outcome {
                seed: scenario.seed,
                kind: scenario.kind,
                violations: vec![Violation {
                    property: "hosts",
                    detail: format!("no scratch directory: {err}"),
                }],
                committed: 0,
                attempts: 0,
                writes: 0,
                trace_hash: String::new(),
            };
        }
    };
    let (record, stores) = world::run(scenario, dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let violations = match runtime {
        Ok(runtime) => runtime.block_on(check::check(
            &record,
            &stores,
            scenario.agents,
            scenario.lease.as_millis() as u64,
            &dir.path().join("check"),
        )),
        Err(err) => vec![Violation {
            property: "hosts",
            detail: format!("checker runtime: {err}"),
        }],
    };
    if std::env::var_os("LOCKSTEP_SIM_TRACE").is_some() {
        for event in &record.trace {
            eprintln!("{event}");
        }
    }
    let mut hash = Sha256::new();
    for event in &record.trace {
        hash.update(event.as_bytes());
        hash.update(b"\n");
    }
    Outcome {
        seed: scenario.seed,
        kind: scenario.kind,
        violations,
        committed: record
            .attempts
            .iter()
            .filter(|a| a.outcome.as_ref().is_some_and(|o| o.1 == "committed"))
            .count(),
        attempts: record.attempts.len(),
        writes: record.writes.len(),
        trace_hash: format!("{:x}", hash.finalize()),
    }
}

/// Runs the scenario of `kind` that `seed` draws.
pub fn run_seed(seed: u64, kind: Kind) -> Outcome {
    run_scenario(&Scenario::new(seed, kind))
}
