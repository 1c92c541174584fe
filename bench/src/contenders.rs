//! One operation of either contender, as its own process under GNU time: wall seconds and
//! peak RSS. BackupEngine runs through this binary's hidden subcommands.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use rocksdb::backup::{BackupEngine, BackupEngineOptions, RestoreOptions};
use rocksdb::{DB, Env};

/// A timed process.
#[derive(Debug, Clone)]
pub struct Timed {
    pub secs: f64,
    pub max_rss_kib: u64,
    pub stdout: String,
}

/// Whether every timed run so far started from a cold page cache (see [`start_cold`]).
static EVERY_RUN_COLD: AtomicBool = AtomicBool::new(true);

/// Starts a timed run from the same state whichever contender ran before: the previous run's
/// dirty pages written back (`sync`), so their writeback is not timed in this run, and the
/// page cache dropped, so neither contender reads what the other left cached (the kernel's
/// reclaim otherwise decides which files are still cached: restores of the same repository
/// took 1.3-4.8 s). Dropping needs root; without it runs start warm, and the report says so.
fn start_cold() {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    if !(synced && dropped) {
        EVERY_RUN_COLD.store(false, Ordering::Relaxed);
    }
}

/// True when every timed run started from a cold page cache.
pub fn every_run_cold() -> bool {
    EVERY_RUN_COLD.load(Ordering::Relaxed)
}

/// Runs `program args` under `/usr/bin/time`, from a cold page cache.
/// Writes a shard of `mib` MiB of 1 KiB values (`random_fraction` of each value random) with
/// `lockstep-agent load`.
pub fn load(bins: &Binaries, db: &Path, mib: u64, random_fraction: f64) -> Result<()> {
    timed(
        &bins.agent,
        &[
            "load",
            "--db",
            s(db),
            "--keys",
            &(mib * 1024).to_string(),
            "--value-size",
            "1024",
            "--random-fraction",
            &random_fraction.to_string(),
        ],
    )
    .context("load the shard")?;
    Ok(())
}

pub fn timed(program: &Path, args: &[&str]) -> Result<Timed> {
    timed_with(program, args, &[])
}

/// [`timed`] with more environment.
pub fn timed_with(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<Timed> {
    start_cold();
    let report = std::env::temp_dir().join(format!("lockstep-bench-time-{}", std::process::id()));
    let output = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%e %M")
        .arg("-o")
        .arg(&report)
        .arg(program)
        .args(args)
        // Only the runs that are given a passphrase open an encrypted repository.
        .env_remove("LOCKSTEP_PASSPHRASE_FILE")
        .env_remove("LOCKSTEP_PASSPHRASE")
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("run {} under /usr/bin/time", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed:\n{}{}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report = std::fs::read_to_string(&report).context("read GNU time report")?;
    let mut fields = report.split_whitespace();
    let secs = fields.next().and_then(|s| s.parse().ok());
    let max_rss_kib = fields.next().and_then(|s| s.parse().ok());
    let (Some(secs), Some(max_rss_kib)) = (secs, max_rss_kib) else {
        bail!("unexpected GNU time report {report:?}");
    };
    Ok(Timed {
        secs,
        max_rss_kib,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
    })
}

/// Bytes under `path` (files only).
pub fn disk_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => disk_bytes(&path),
                Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => 0,
            }
        })
        .sum()
}

pub fn remove(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
}

/// The two contenders' binaries.
pub struct Binaries {
    pub agent: PathBuf,
    pub coordinator: PathBuf,
    pub bench: PathBuf,
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// What a Lockstep backup reported.
pub struct LockstepBackup {
    pub timed: Timed,
    pub bytes_uploaded: u64,
    pub gate_closed_us: u64,
}

pub fn lockstep_backup(
    bins: &Binaries,
    db: &Path,
    repo: &Path,
    threads: usize,
) -> Result<LockstepBackup> {
    lockstep_backup_with(bins, db, repo, threads, &[])
}

/// [`lockstep_backup`] with more environment (an encrypted repository's passphrase file).
pub fn lockstep_backup_with(
    bins: &Binaries,
    db: &Path,
    repo: &Path,
    threads: usize,
    env: &[(&str, &Path)],
) -> Result<LockstepBackup> {
    let threads = threads.to_string();
    let timed = timed_with(
        &bins.agent,
        &[
            "backup",
            "--db",
            s(db),
            "--repo",
            s(repo),
            "--parallelism",
            &threads,
            "--json",
        ],
        env,
    )?;
    let manifest: serde_json::Value =
        serde_json::from_str(&timed.stdout).context("parse the backup manifest")?;
    let field = |path: &[&str]| {
        path.iter()
            .fold(&manifest, |v, k| &v[*k])
            .as_u64()
            .unwrap_or(0)
    };
    Ok(LockstepBackup {
        bytes_uploaded: field(&["stats", "bytes_uploaded"]),
        gate_closed_us: field(&["max_gate_closed_us"]),
        timed,
    })
}

pub fn lockstep_restore(bins: &Binaries, repo: &Path, to: &Path, threads: usize) -> Result<Timed> {
    lockstep_restore_with(bins, repo, to, threads, &[])
}

/// [`lockstep_restore`] with more environment (an encrypted repository's passphrase file).
pub fn lockstep_restore_with(
    bins: &Binaries,
    repo: &Path,
    to: &Path,
    threads: usize,
    env: &[(&str, &Path)],
) -> Result<Timed> {
    remove(to);
    timed_with(
        &bins.agent,
        &[
            "restore",
            "--repo",
            s(repo),
            "--backup",
            "latest",
            "--to",
            s(to),
            "--parallelism",
            &threads.to_string(),
        ],
        env,
    )
}

pub fn lockstep_verify(bins: &Binaries, repo: &Path, threads: usize) -> Result<Timed> {
    timed(
        &bins.agent,
        &[
            "verify",
            "--repo",
            s(repo),
            "--backup",
            "latest",
            "--full",
            "--parallelism",
            &threads.to_string(),
        ],
    )
}

/// The disk's copy floor (`floor.rs`): the files of `db` copied into `to`, in its own process.
pub fn copy_floor(bins: &Binaries, db: &Path, to: &Path, threads: usize) -> Result<Timed> {
    remove(to);
    let timed = timed(
        &bins.bench,
        &[
            "copy-floor",
            "--from",
            s(db),
            "--to",
            s(to),
            "--threads",
            &threads.to_string(),
        ],
    );
    remove(to);
    timed
}

pub fn backup_engine(bins: &Binaries, db: &Path, dir: &Path, threads: usize) -> Result<Timed> {
    timed(
        &bins.bench,
        &[
            "backup-engine-backup",
            "--db",
            s(db),
            "--dir",
            s(dir),
            "--threads",
            &threads.to_string(),
        ],
    )
}

pub fn backup_engine_restore_timed(
    bins: &Binaries,
    dir: &Path,
    to: &Path,
    threads: usize,
) -> Result<Timed> {
    remove(to);
    timed(
        &bins.bench,
        &[
            "backup-engine-restore",
            "--dir",
            s(dir),
            "--to",
            s(to),
            "--threads",
            &threads.to_string(),
        ],
    )
}

fn engine(dir: &Path, threads: i32) -> Result<BackupEngine> {
    let mut options = BackupEngineOptions::new(dir).context("backup engine options")?;
    options.set_max_background_operations(threads);
    // The default, as operators run it: files are fsynced, as Lockstep's file:// repository
    // and restores do.
    options.set_sync(true);
    let env = Env::new().context("rocksdb env")?;
    BackupEngine::open(&options, &env).context("open backup engine")
}

/// BackupEngine's backup, flushing first as Lockstep does.
pub fn backup_engine_backup(db: &Path, dir: &Path, threads: i32) -> Result<()> {
    let handle = DB::open(&crate::generate::options(true), db)
        .with_context(|| format!("open {}", db.display()))?;
    let mut engine = engine(dir, threads)?;
    engine
        .create_new_backup_flush(&handle, true)
        .context("create backup")?;
    Ok(())
}

pub fn backup_engine_restore(dir: &Path, to: &Path, threads: i32) -> Result<()> {
    let mut engine = engine(dir, threads)?;
    engine
        .restore_from_latest_backup(to, to, &RestoreOptions::default())
        .context("restore")?;
    Ok(())
}
