//! Rate limits: an offline backup with `--upload-mib-s L` and a restore with
//! `--download-mib-s L` of a shard of random values (zstd cannot shrink it, so the bytes
//! stored are the bytes sent), timed whole from outside. The rate is the bytes stored over
//! the command's wall time, so it includes the fixed costs (opening the shard, the
//! checkpoint, fsyncs): it sits a little under the limit, never over it.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::contenders::{Binaries, disk_bytes, remove, timed};

#[derive(Debug, Clone, Serialize)]
pub struct LimitResult {
    pub limit_mib_s: u64,
    pub stored_mib: f64,
    pub backup_secs: f64,
    pub backup_mib_s: f64,
    pub restore_secs: f64,
    pub restore_mib_s: f64,
}

/// Backs up and restores a `mib` MiB shard of random values at `limit_mib_s`.
pub fn measure(bins: &Binaries, work: &Path, mib: u64, limit_mib_s: u64) -> Result<LimitResult> {
    eprintln!("[bench] rate limits: a {mib} MiB shard of random values at {limit_mib_s} MiB/s");
    let dir = work.join("limits");
    remove(&dir);
    std::fs::create_dir_all(&dir)?;
    let (db, repo, restored) = (dir.join("db"), dir.join("repo"), dir.join("restored"));
    let s = |p: &Path| p.to_str().unwrap_or_default().to_string();
    crate::contenders::load(bins, &db, mib, 1.0)?;
    let limit = limit_mib_s.to_string();
    let backup = timed(
        &bins.agent,
        &[
            "backup",
            "--db",
            &s(&db),
            "--repo",
            &s(&repo),
            "--upload-mib-s",
            &limit,
            "--json",
        ],
    )?;
    let manifest: serde_json::Value =
        serde_json::from_str(&backup.stdout).context("parse the backup manifest")?;
    let stored = manifest["stats"]["stored_bytes_uploaded"]
        .as_u64()
        .unwrap_or_else(|| disk_bytes(&repo.join("objects")));
    let restore = timed(
        &bins.agent,
        &[
            "restore",
            "--repo",
            &s(&repo),
            "--backup",
            "latest",
            "--to",
            &s(&restored),
            "--download-mib-s",
            &limit,
        ],
    )?;
    remove(&dir);
    let stored_mib = stored as f64 / (1 << 20) as f64;
    Ok(LimitResult {
        limit_mib_s,
        stored_mib,
        backup_secs: backup.secs,
        backup_mib_s: stored_mib / backup.secs.max(1e-9),
        restore_secs: restore.secs,
        restore_mib_s: stored_mib / restore.secs.max(1e-9),
    })
}
