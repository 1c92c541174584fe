//! WAL shipping and point-in-time restore: N agents ship their WAL to a second "region" (a
//! directory) while one writer per agent writes a steady load. After a warm-up and a full
//! backup, the writers run for a fixed time; then:
//!
//! - shipping lag p50/p99 comes from `lockstep wal status` (per segment: how long its oldest
//!   write waited until the segment was durable in the archive), the worst shard reported;
//! - an incremental backup's stored bytes are compared with the bytes the writers changed;
//! - a restore to the sequence vector at the end replays the whole WAL since the full backup
//!   from the archive; each agent logs how many batches it replayed and how long it took.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::barrier::{BenchCluster, Load};
use crate::contenders::Binaries;

#[derive(Debug, Clone, Serialize)]
pub struct WalResult {
    pub agents: usize,
    pub write_secs: f64,
    /// Keys acknowledged per second over the whole cluster while shipping (the raw write rate).
    pub write_keys_per_sec: u64,
    pub lag_p50_ms: u64,
    pub lag_p99_ms: u64,
    pub segments_shipped: u64,
    /// Key and value bytes written after the full backup.
    pub changed_bytes: u64,
    pub incremental_stored_bytes: u64,
    pub incremental_secs: f64,
    pub replay_batches: u64,
    pub replay_keys: u64,
    /// The slowest shard's replay time (shards replay in parallel).
    pub replay_secs: f64,
    pub replay_batches_per_sec: f64,
    pub replay_keys_per_sec: f64,
    pub restore_secs: f64,
}

/// The cut of every shard, in shard order.
fn seqs(status: &serde_json::Value) -> Vec<u64> {
    status["shards"]
        .as_array()
        .map(|shards| {
            shards
                .iter()
                .map(|s| s["latest_seq"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes terminal colour codes from a log line.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

pub fn measure(bins: &Binaries, work: &Path, agents: usize, write_secs: u64) -> Result<WalResult> {
    let archive = work.join("wal-region-2");
    crate::contenders::remove(&archive);
    let mut cluster = BenchCluster::start(bins, work, "wal", agents, Some(&archive), "info")?;
    let result = run(bins, &mut cluster, agents, write_secs);
    match result {
        Ok(result) => {
            cluster.remove();
            crate::contenders::remove(&archive);
            Ok(result)
        }
        // The logs stay for a look.
        Err(err) => Err(err.context(format!("logs in {}", cluster.dir.display()))),
    }
}

fn run(
    bins: &Binaries,
    cluster: &mut BenchCluster,
    agents: usize,
    write_secs: u64,
) -> Result<WalResult> {
    cluster.start_writers(bins, Load::Steady)?;
    // Warm-up, then a full backup as the base of the restore. (A benchmark's pacing.)
    std::thread::sleep(Duration::from_secs(2));
    let full = cluster.lockstep_json(bins, &["backup", "create", "--wait"])?;
    let full = full["backup_id"].as_str().unwrap_or_default().to_string();
    let full = cluster.lockstep_json(bins, &["backup", "show", &full])?;
    let before: Vec<u64> = (0..agents)
        .map(|i| full["cut"][format!("shard-{i}")].as_u64().unwrap_or(0))
        .collect();
    let at_start = seqs(&cluster.lockstep_json(bins, &["wal", "status"])?);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(write_secs));
    let status = cluster.lockstep_json(bins, &["wal", "status"])?;
    let elapsed = started.elapsed().as_secs_f64();
    cluster.stop_writers();
    let during = seqs(&status);
    let written: u64 = during
        .iter()
        .zip(&at_start)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    let destinations: Vec<&serde_json::Value> = status["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["destinations"].as_array().into_iter().flatten())
        .collect();
    let worst = |key: &str| {
        destinations
            .iter()
            .filter_map(|d| d[key].as_u64())
            .max()
            .unwrap_or(0)
    };

    // Everything written is shipped before the restore reads the archive.
    let deadline = Instant::now() + Duration::from_secs(60);
    let end = loop {
        let status = cluster.lockstep_json(bins, &["wal", "status"])?;
        let caught_up = status["shards"].as_array().is_some_and(|shards| {
            shards.iter().all(|s| {
                s["destinations"]
                    .as_array()
                    .is_some_and(|d| d.iter().all(|d| d["lag_seq"] == 0))
            })
        });
        if caught_up {
            break seqs(&status);
        }
        if Instant::now() > deadline {
            bail!("the WAL archive did not catch up within 60 s: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    let incremental_started = Instant::now();
    let incremental = cluster.lockstep_json(
        bins,
        &["backup", "create", "--kind", "incremental", "--wait"],
    )?;
    let incremental_secs = incremental_started.elapsed().as_secs_f64();
    let id = incremental["backup_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let shown = cluster.lockstep_json(bins, &["backup", "show", &id])?;

    // The restore replays from the full backup: the incremental is deleted first so the
    // planner takes the WAL from the archive.
    let output = std::process::Command::new(&bins.coordinator)
        .args(["backup", "delete", &id])
        .env("LOCKSTEP_COORDINATOR", &cluster.coordinator)
        .output()?;
    if !output.status.success() {
        bail!(
            "delete the incremental: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let vector = end
        .iter()
        .enumerate()
        .map(|(i, seq)| format!("shard-{i}={seq}"))
        .collect::<Vec<_>>()
        .join(",");
    let to = cluster.dir.join("restored");
    let restore_started = Instant::now();
    cluster.lockstep_json(
        bins,
        &[
            "restore",
            "--to-seq",
            &vector,
            "--to",
            to.to_str().unwrap_or_default(),
        ],
    )?;
    let restore_secs = restore_started.elapsed().as_secs_f64();
    let mut replay_batches = 0;
    let mut replay_ms = 0;
    for i in 0..agents {
        let log = cluster.dir.join(format!("agent-{i}.log"));
        let text =
            std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
        let line = text
            .lines()
            .rev()
            .map(plain)
            .find(|l| l.contains("restore: WAL replayed"))
            .with_context(|| format!("no replay in {}", log.display()))?;
        replay_batches += field(&line, "batches").unwrap_or(0);
        replay_ms = replay_ms.max(field(&line, "replay_ms").unwrap_or(0));
    }
    let replay_keys: u64 = end
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum::<u64>();
    let replay_secs = (replay_ms as f64 / 1000.0).max(1e-3);
    Ok(WalResult {
        agents,
        write_secs: elapsed,
        write_keys_per_sec: (written as f64 / elapsed) as u64,
        lag_p50_ms: worst("lag_p50_ms"),
        lag_p99_ms: worst("lag_p99_ms"),
        segments_shipped: destinations
            .iter()
            .filter_map(|d| d["segments_shipped"].as_u64())
            .sum(),
        // Each write since the full backup: a 17-byte key and a 200-byte value.
        changed_bytes: replay_keys * 217,
        incremental_stored_bytes: shown["stats"]["stored_bytes_uploaded"]
            .as_u64()
            .unwrap_or(0),
        incremental_secs,
        replay_batches,
        replay_keys,
        replay_secs,
        replay_batches_per_sec: replay_batches as f64 / replay_secs / agents as f64,
        replay_keys_per_sec: replay_keys as f64 / replay_secs,
        restore_secs,
    })
}
