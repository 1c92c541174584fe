//! `make sim SEEDS=N`: N seeds of every scenario; prints every violation with its seed and a
//! count per scenario, and exits non-zero if any run violated a property.
//!
//! - `lockstep-sim N [FIRST [KIND]]` runs seeds FIRST.. (default 1) of every scenario, or of
//!   one kind (`agent-crashes`, `coordinator-crashes`, `partitions`, `delays`, `lossy-shipping`,
//!   `region-outages`, `rollbacks`, `restore-crashes`);
//! - `lockstep-sim replay SEED KIND` runs one seed and prints its outcome and trace hash (how a
//!   failing seed is reproduced; the determinism test compares two replays);
//! - `LOCKSTEP_SIM_TRACE=1` prints every run's event trace to stderr.

use lockstep_simulations::{Kind, run_seed};

fn kind_named(name: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.name() == name)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("replay") {
        let seed = args.get(1).and_then(|s| s.parse().ok());
        let kind = args.get(2).and_then(|k| kind_named(k));
        let (Some(seed), Some(kind)) = (seed, kind) else {
            eprintln!("usage: lockstep-sim replay SEED KIND");
            return std::process::ExitCode::FAILURE;
        };
        let outcome = run_seed(seed, kind);
        println!("{outcome}");
        println!("trace {}", outcome.trace_hash);
        return if outcome.violations.is_empty() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        };
    }
    let seeds: u64 = args.first().and_then(|n| n.parse().ok()).unwrap_or(100);
    let first: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1);
    let only = args.get(2).and_then(|k| kind_named(k));
    let started = std::time::Instant::now();
    let mut failed = false;
    let mut runs = 0;
    for kind in Kind::ALL {
        if only.is_some_and(|k| k != kind) {
            continue;
        }
        let mut violations = 0;
        let mut committed = 0;
        for seed in first..first + seeds {
            let outcome = run_seed(seed, kind);
            runs += 1;
            committed += outcome.committed;
            if !outcome.violations.is_empty() {
                violations += 1;
                failed = true;
                println!("{outcome}");
            }
        }
        println!(
            "{:<20} seeds {first}..{}: {violations} with violations, {committed} backups committed",
            kind.name(),
            first + seeds
        );
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{runs} runs in {secs:.1} s ({:.1} seeds/s)",
        runs as f64 / secs
    );
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
