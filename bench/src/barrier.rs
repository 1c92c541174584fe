//! The write pause of the two-phase barrier: N agents (real processes, RocksDB) and a
//! coordinator on 127.0.0.1, one writer per agent writing as fast as it is acknowledged, and
//! a series of backups. Every shard's gate-closed time (from the request to close until the
//! gate reopens) is read back from its shard manifest.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::contenders::Binaries;

/// Kills its processes when dropped, so a failed run leaves nothing behind.
pub(crate) struct Processes(pub(crate) Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a server and returns its address from its "listening on ADDR" line.
pub(crate) fn start(
    processes: &mut Processes,
    program: &Path,
    args: &[&str],
    log: &Path,
    log_level: &str,
) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .env("LOCKSTEP_LOG", log_level)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).context("create log")?)
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    processes.0.push(child);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read server output")?;
        if let Some((_, address)) = line.split_once("listening on ") {
            return Ok(address.trim().to_string());
        }
    }
    bail!(
        "{} exited before listening; see {}",
        program.display(),
        log.display()
    )
}

/// Per-shard pauses, in microseconds, of every backup taken.
pub struct Pauses {
    pub backups: usize,
    pub pauses_us: Vec<u64>,
    /// Keys acknowledged per second over the whole cluster while backups ran.
    pub write_keys_per_sec: u64,
}

/// How hard the writers push.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// Batches of 1000 keys, each sent as soon as the previous one is acknowledged.
    Saturating,
    /// 200 batches of 10 keys per second per agent: steady traffic that leaves CPU free.
    Steady,
}

impl Load {
    pub fn name(self) -> &'static str {
        match self {
            Load::Saturating => "saturating",
            Load::Steady => "steady",
        }
    }

    /// Each writer stops after this many keys. Saturating writers are bounded so the section
    /// fits the disk: RocksDB enforces the WAL archive's size bound only every 10 minutes, so
    /// 8 shards keep every WAL byte written meanwhile (4M keys of 200 bytes each: about 0.8 GB
    /// of WAL and as much of tables per shard, the load of 12 backups at normal priority).
    pub(crate) fn keys(self) -> &'static str {
        match self {
            Load::Saturating => "4000000",
            Load::Steady => "100000000",
        }
    }

    pub(crate) fn args(self) -> &'static [&'static str] {
        match self {
            Load::Saturating => &["--batch-keys", "1000"],
            Load::Steady => &["--batch-keys", "10", "--batches-per-sec", "200"],
        }
    }
}

/// A coordinator and N agents on 127.0.0.1, with one writer per agent once started.
pub(crate) struct BenchCluster {
    pub dir: std::path::PathBuf,
    pub repo: std::path::PathBuf,
    pub coordinator: String,
    pub endpoints: Vec<String>,
    processes: Processes,
    writers: Processes,
}

impl BenchCluster {
    /// Starts `agents` agents (shipping their WAL to `wal_to`, if set) and a coordinator in
    /// a fresh `work/name`. The agents log at `log_level` (the WAL bench reads the replay
    /// timings of `info`; the barrier bench keeps the default, so logging adds no pause).
    pub fn start(
        bins: &Binaries,
        work: &Path,
        name: &str,
        agents: usize,
        wal_to: Option<&Path>,
        log_level: &str,
    ) -> Result<BenchCluster> {
        let dir = work.join(name);
        crate::contenders::remove(&dir);
        std::fs::create_dir_all(&dir)?;
        let repo = dir.join("repo");
        let mut processes = Processes(Vec::new());
        let mut config = format!(
            "repository = \"{}\"\nlisten = \"127.0.0.1:0\"\nplaintext = true\n",
            repo.display()
        );
        if let Some(archive) = wal_to {
            config.push_str(&format!("wal_archive = \"{}\"\n", archive.display()));
        }
        config.push_str("[barrier]\nlease_ms = 10000\nprepare_timeout_ms = 5000\n");
        let mut endpoints = Vec::new();
        for i in 0..agents {
            let shard = format!("shard-{i}");
            let db = dir.join(&shard);
            let mut args = vec![
                "serve",
                "--db",
                db.to_str().unwrap_or_default(),
                "--shard",
                &shard,
                "--listen",
                "127.0.0.1:0",
                "--repo",
                repo.to_str().unwrap_or_default(),
                "--plaintext",
            ];
            if let Some(archive) = wal_to {
                args.extend(["--wal-to", archive.to_str().unwrap_or_default()]);
            }
            let address = start(
                &mut processes,
                &bins.agent,
                &args,
                &dir.join(format!("agent-{i}.log")),
                log_level,
            )?;
            config.push_str(&format!(
                "[[agents]]\nshard = \"{shard}\"\nendpoint = \"http://{address}\"\n"
            ));
            endpoints.push(format!("http://{address}"));
        }
        let config_path = dir.join("lockstep.toml");
        std::fs::write(&config_path, config)?;
        let coordinator = start(
            &mut processes,
            &bins.coordinator,
            &[
                "serve",
                "--config",
                config_path.to_str().unwrap_or_default(),
            ],
            &dir.join("coordinator.log"),
            "info",
        )?;
        Ok(BenchCluster {
            dir,
            repo,
            coordinator: format!("http://{coordinator}"),
            endpoints,
            processes,
            writers: Processes(Vec::new()),
        })
    }

    /// One writer per agent, 200-byte values, `load.keys()` keys at most.
    pub fn start_writers(&mut self, bins: &Binaries, load: Load) -> Result<()> {
        for endpoint in &self.endpoints {
            self.writers.0.push(
                Command::new(&bins.agent)
                    .args([
                        "load",
                        "--endpoint",
                        endpoint,
                        "--keys",
                        load.keys(),
                        "--value-size",
                        "200",
                        "--prefix",
                        "bench",
                    ])
                    .args(load.args())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("start writer")?,
            );
        }
        Ok(())
    }

    pub fn stop_writers(&mut self) {
        for child in &mut self.writers.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.writers.0.clear();
    }

    /// Runs `lockstep ARGS --json` against the coordinator; fails on a non-zero exit.
    pub fn lockstep_json(&self, bins: &Binaries, args: &[&str]) -> Result<serde_json::Value> {
        let output = Command::new(&bins.coordinator)
            .args(args)
            .arg("--json")
            .env("LOCKSTEP_COORDINATOR", &self.coordinator)
            .output()
            .with_context(|| format!("run lockstep {}", args.join(" ")))?;
        if !output.status.success() {
            bail!(
                "lockstep {} failed:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// Stops everything and removes the directory.
    pub fn remove(mut self) {
        self.stop_writers();
        for child in &mut self.processes.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
        crate::contenders::remove(&self.dir);
    }
}

pub fn measure(
    bins: &Binaries,
    work: &Path,
    agents: usize,
    backups: usize,
    load: Load,
) -> Result<Pauses> {
    let mut cluster = BenchCluster::start(
        bins,
        work,
        &format!("barrier-{agents}"),
        agents,
        None,
        "warn",
    )?;
    let repo = cluster.repo.clone();
    cluster.start_writers(bins, load)?;
    // Let the writers reach their steady rate before the first backup: the bench measures
    // the pause under load, not during start-up. (A benchmark's pacing, not a test's wait.)
    std::thread::sleep(Duration::from_secs(2));
    let mut ids = Vec::new();
    for _ in 0..backups {
        let job = cluster.lockstep_json(bins, &["backup", "create", "--wait"])?;
        ids.push(job["backup_id"].as_str().unwrap_or_default().to_string());
        // Writes between backups, so each backup's capture has fresh memtables to flush.
        std::thread::sleep(Duration::from_millis(300));
    }
    cluster.stop_writers();

    let mut pauses_us = Vec::new();
    for id in &ids {
        for i in 0..agents {
            let path = repo.join(format!("shards/shard-{i}/{id}.json"));
            let manifest: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
            )?;
            pauses_us.push(manifest["timings"]["gate_closed_us"].as_u64().unwrap_or(0));
        }
    }
    // The writers' rate: keys acknowledged between the first and the last backup's cut.
    let cut_and_time = |id: &String| -> Result<(u64, f64)> {
        let path = repo.join(format!("backups/{id}.json"));
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
        let keys = manifest["cut"]
            .as_object()
            .map(|cut| cut.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0);
        let at = manifest["started_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_micros() as f64 / 1e6)
            .unwrap_or(0.0);
        Ok((keys, at))
    };
    let mut write_keys_per_sec = 0;
    if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
        let ((k0, t0), (k1, t1)) = (cut_and_time(first)?, cut_and_time(last)?);
        if t1 > t0 {
            write_keys_per_sec = ((k1.saturating_sub(k0)) as f64 / (t1 - t0)) as u64;
        }
    }
    cluster.remove();
    Ok(Pauses {
        backups: ids.len(),
        pauses_us,
        write_keys_per_sec,
    })
}
