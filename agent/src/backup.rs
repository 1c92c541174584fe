//! Backing up one shard: capture under the closed write gate, then upload with the gate open.
//!
//! 1. `prepare_capture` (RocksDB: flush memtables) while writes still flow;
//! 2. close the gate (waits for in-flight writes);
//! 3. capture the shard and record its exact sequence number;
//! 4. open the gate: the pause ends here;
//! 5. upload the captured files, reusing unchanged SSTs of the shard's latest backup by
//!    identity, without reading them;
//! 6. publish the shard manifest; then drop the capture, which re-enables file deletions.
//!
//! `backup_offline` adds the backup manifest for a single shard backed up with no
//! coordinator (disaster recovery on a bare machine).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use lockstep_repository::manifest::{
    BackupKind, BackupManifest, MANIFEST_FORMAT_VERSION, ShardManifest, ShardTimings, TOOL_VERSION,
};
use lockstep_repository::transfer::{Progress, SourceFile, TransferOptions, upload_files};
use lockstep_repository::{
    BackupId, Error, ErrorCode, HlcTime, Repository, Result, ShardId, Timeline,
};

use crate::engine::{Capture, ShardEngine};
use crate::gate::{GateClosed, WriteGate};

/// Where and how a shard is backed up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Directory for capture directories; for RocksDB it must be on the shard's filesystem
    /// so the checkpoint can hard-link SST files.
    pub capture_root: PathBuf,
    pub transfer: TransferOptions,
}

fn join_error(err: tokio::task::JoinError) -> Error {
    Error::with_source(ErrorCode::BackupCreationFailed, "capture task failed", err)
}

/// A shard captured under the closed gate, waiting to be uploaded.
#[derive(Debug)]
pub struct CapturedShard {
    pub capture: Capture,
    /// `rocksdb` or `memory`.
    pub engine: &'static str,
    /// How long client writes were held at the gate.
    pub paused: std::time::Duration,
    pub captured_at: chrono::DateTime<Utc>,
    pub capture_us: u64,
    /// The HLC time of the last write in the capture.
    pub hlc: HlcTime,
    /// The shard's timeline at the capture.
    pub timeline: Timeline,
}

/// Steps 1-3: prepares, closes the gate and captures the shard. The gate stays closed: the
/// caller opens it (drops the returned guard) when the barrier allows, and then
/// [`CapturedShard::paused`] must be set from [`GateClosed::open`].
pub async fn capture_closed<E: ShardEngine>(
    engine: &Arc<E>,
    gate: &WriteGate,
    capture_dir: PathBuf,
    timeline: Timeline,
) -> Result<(GateClosed, CapturedShard)> {
    let started = Instant::now();
    let captured_at = Utc::now();
    let prepare = engine.clone();
    tokio::task::spawn_blocking(move || prepare.prepare_capture())
        .await
        .map_err(join_error)??;
    if let Some(parent) = capture_dir.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(|err| {
            Error::io(
                ErrorCode::BackupCreationFailed,
                format!("create {}", parent.display()),
                err,
            )
        })?;
    }
    let closed = gate.close().await;
    let capturer = engine.clone();
    let dir = capture_dir.clone();
    let captured = tokio::task::spawn_blocking(move || capturer.capture(&dir)).await;
    match captured.map_err(join_error).and_then(|r| r) {
        Ok(capture) => Ok((
            closed,
            CapturedShard {
                capture,
                engine: engine.kind(),
                paused: std::time::Duration::ZERO,
                captured_at,
                capture_us: started.elapsed().as_micros() as u64,
                hlc: engine.clock().last(),
                timeline,
            },
        )),
        Err(err) => {
            drop(closed);
            // A checkpoint that failed half-way may have left files behind.
            let _ = tokio::fs::remove_dir_all(&capture_dir).await;
            Err(err.context("capture shard"))
        }
    }
}

/// Steps 1-4: prepares, closes the gate, captures the shard and reopens the gate at once.
pub async fn capture_shard<E: ShardEngine>(
    engine: &Arc<E>,
    gate: &WriteGate,
    capture_dir: PathBuf,
    timeline: Timeline,
) -> Result<CapturedShard> {
    let (closed, mut captured) = capture_closed(engine, gate, capture_dir, timeline).await?;
    captured.paused = closed.open();
    Ok(captured)
}

/// Steps 5-6: uploads a capture and publishes its shard manifest, then releases the capture.
pub async fn upload_capture(
    captured: CapturedShard,
    repo: &Repository,
    shard_id: &ShardId,
    backup_id: &BackupId,
    transfer: TransferOptions,
    progress: &Progress,
) -> Result<ShardManifest> {
    let capture = &captured.capture;
    let reusable: HashMap<String, _> = match repo.latest_shard_manifest(shard_id).await {
        Ok(Some(previous)) => previous
            .files
            .into_iter()
            .filter_map(|f| f.identity.clone().map(|identity| (identity, f)))
            .collect(),
        Ok(None) => HashMap::new(),
        Err(err) => {
            tracing::warn!(shard = %shard_id, error = %err.chain(), "previous backup unreadable; reading every file");
            HashMap::new()
        }
    };
    let sources: Vec<SourceFile> = capture
        .files
        .iter()
        .map(|f| SourceFile {
            path: capture.dir.join(&f.name),
            name: f.name.clone(),
            size: f.size,
            kind: f.kind,
            identity: f.identity.clone(),
        })
        .collect();
    let upload_started = Instant::now();
    let (files, stats) = upload_files(repo, &sources, &reusable, transfer, progress)
        .await
        .map_err(|err| err.context(format!("upload shard {shard_id}")))?;
    let manifest = ShardManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        backup_id: backup_id.clone(),
        shard_id: shard_id.clone(),
        engine: captured.engine.to_string(),
        seq: capture.seq,
        timeline: captured.timeline,
        hlc: captured.hlc,
        captured_at: captured.captured_at,
        column_families: capture.column_families.clone(),
        files,
        stats,
        timings: ShardTimings {
            gate_closed_us: captured.paused.as_micros() as u64,
            capture_us: captured.capture_us,
            upload_us: upload_started.elapsed().as_micros() as u64,
        },
        tool_version: TOOL_VERSION.to_string(),
    };
    repo.put_shard_manifest(&manifest).await?;
    // Dropping the capture re-enables file deletions and removes its directory. It happens
    // on the error returns above too, because `captured` is dropped there as well.
    drop(captured);
    Ok(manifest)
}

/// Backs up a single shard with no coordinator and commits it as a one-shard backup.
pub async fn backup_offline<E: ShardEngine>(
    engine: &Arc<E>,
    repo: &Repository,
    shard_id: &ShardId,
    options: &BackupOptions,
    timeline: Timeline,
    progress: &Progress,
) -> Result<BackupManifest> {
    let backup_id = BackupId::generate();
    let started_at = Utc::now();
    let gate = WriteGate::new();
    let captured = capture_shard(
        engine,
        &gate,
        options.capture_root.join(backup_id.as_str()),
        timeline,
    )
    .await;
    let uploaded = match captured {
        Ok(captured) => {
            tracing::info!(
                shard = %shard_id, backup = %backup_id, seq = %captured.capture.seq,
                gate_closed_us = captured.paused.as_micros() as u64,
                files = captured.capture.files.len(), "captured shard"
            );
            upload_capture(
                captured,
                repo,
                shard_id,
                &backup_id,
                options.transfer,
                progress,
            )
            .await
        }
        Err(err) => Err(err),
    };
    let shard = uploaded.map_err(|err| Error {
        code: creation_code(err.code),
        ..err
    })?;
    let manifest = BackupManifest::commit(backup_id, BackupKind::Full, None, started_at, &[shard]);
    repo.put_backup_manifest(&manifest).await?;
    Ok(manifest)
}

/// Keeps specific codes (disk full, storage down) and folds the rest into creation failure.
fn creation_code(code: ErrorCode) -> ErrorCode {
    match code {
        ErrorCode::StorageDiskFull | ErrorCode::StorageUnavailable | ErrorCode::InvalidArgument => {
            code
        }
        _ => ErrorCode::BackupCreationFailed,
    }
}
