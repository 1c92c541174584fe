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
//! Incremental and differential backups (`CaptureMode::Wal`) capture no files: under the
//! closed gate they record the sequence number only, and step 5 uploads the WAL from the
//! parent's sequence number to it, read from the engine, as content-addressed segments.
//! A tag (`CaptureMode::Point`) records the sequence number and uploads nothing.
//!
//! `backup_offline` adds the backup manifest for a single shard backed up with no
//! coordinator (disaster recovery on a bare machine).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use std::sync::atomic::Ordering;

use lockstep_repository::manifest::{
    BackupKind, BackupManifest, FileEntry, MANIFEST_FORMAT_VERSION, ShardManifest, ShardTimings,
    TOOL_VERSION, TransferStats, WalPiece,
};
use lockstep_repository::transfer::{Progress, SourceFile, TransferOptions, upload_files};
use lockstep_repository::wal::Segment;
use lockstep_repository::{
    BackupId, Error, ErrorCode, HlcTime, Repository, Result, Seq, ShardId, Timeline,
};

use crate::engine::{Capture, ShardEngine};

/// Raw WAL bytes per piece of an incremental or differential backup.
const WAL_PIECE_BYTES: usize = 4 << 20;

/// What a barrier takes from the shard while its write gate is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    /// A full backup: the shard's files.
    Files,
    /// An incremental or differential backup: the WAL after `after` (the parent's sequence
    /// number), which must be on `timeline`; read after the gate has reopened.
    Wal { after: Seq, timeline: Timeline },
    /// A tag: the sequence number and HLC time only.
    Point,
}
use crate::gate::{GateClosed, WriteGate};

/// Where and how a shard is backed up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Directory for capture directories; for RocksDB it must be on the shard's filesystem
    /// so the checkpoint can hard-link SST files.
    pub capture_root: PathBuf,
    pub transfer: TransferOptions,
}

fn join_error(err: lockstep_repository::blocking::TaskFailed) -> Error {
    Error::with_source(ErrorCode::BackupCreationFailed, "capture task failed", err)
}

/// A shard captured under the closed gate, waiting to be uploaded.
#[derive(Debug)]
pub struct CapturedShard {
    pub mode: CaptureMode,
    /// The captured files (none for `Wal` and `Point`) and the exact sequence number.
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

/// Checks, before the gate closes, that the WAL an incremental or differential backup needs
/// is still on the shard: a restored shard (new timeline), a parent ahead of the shard, or
/// WAL purged behind the agent's back is `ERR_BACKUP_WAL_GAP`, never skipped.
fn check_wal_available<E: ShardEngine>(
    engine: &E,
    after: Seq,
    parent_timeline: Timeline,
    timeline: Timeline,
) -> Result<()> {
    let hint = "take a full backup";
    if parent_timeline != timeline {
        return Err(Error::new(
            ErrorCode::BackupWalGap,
            format!(
                "the shard is on timeline {timeline} but its previous backup is on timeline {parent_timeline} (it was restored since); {hint}"
            ),
        ));
    }
    let latest = engine.latest_seq();
    if after > latest {
        return Err(Error::new(
            ErrorCode::BackupWalGap,
            format!(
                "the previous backup reaches sequence {after} but the shard is at {latest}; {hint}"
            ),
        ));
    }
    engine
        .wal_since(after, 1)
        .map(|_| ())
        .map_err(|err| err.context(format!("the WAL after sequence {after} is gone; {hint}")))
}

/// Steps 1-3: prepares, closes the gate and captures the shard. The gate stays closed: the
/// caller opens it (drops the returned guard) when the barrier allows, and then
/// [`CapturedShard::paused`] must be set from [`GateClosed::open`].
pub async fn capture_closed<E: ShardEngine>(
    engine: &Arc<E>,
    gate: &WriteGate,
    capture_dir: PathBuf,
    timeline: Timeline,
    mode: CaptureMode,
) -> Result<(GateClosed, CapturedShard)> {
    let started = Instant::now();
    let captured_at = Utc::now();
    let prepare = engine.clone();
    let captured = match mode {
        CaptureMode::Files => {
            lockstep_repository::blocking::run(move || prepare.prepare_capture())
                .await
                .map_err(join_error)??;
            if let Some(parent) = capture_dir.parent() {
                std::fs::create_dir_all(parent).map_err(|err| {
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
            let captured = lockstep_repository::blocking::run(move || capturer.capture(&dir)).await;
            match captured.map_err(join_error).and_then(|r| r) {
                Ok(capture) => (closed, capture),
                Err(err) => {
                    drop(closed);
                    // A checkpoint that failed half-way may have left files behind.
                    let _ = std::fs::remove_dir_all(&capture_dir);
                    return Err(err.context("capture shard"));
                }
            }
        }
        CaptureMode::Wal { .. } | CaptureMode::Point => {
            if let CaptureMode::Wal {
                after,
                timeline: parent,
            } = mode
            {
                lockstep_repository::blocking::run(move || {
                    check_wal_available(prepare.as_ref(), after, parent, timeline)
                })
                .await
                .map_err(join_error)??;
            }
            let closed = gate.close().await;
            let capture = Capture::new(
                engine.latest_seq(),
                capture_dir,
                Vec::new(),
                engine.column_families(),
                None,
            );
            (closed, capture)
        }
    };
    let (closed, capture) = captured;
    Ok((
        closed,
        CapturedShard {
            mode,
            capture,
            engine: engine.kind(),
            paused: std::time::Duration::ZERO,
            captured_at,
            capture_us: started.elapsed().as_micros() as u64,
            hlc: engine.clock().last(),
            timeline,
        },
    ))
}

/// Steps 1-4: prepares, closes the gate, captures the shard and reopens the gate at once.
pub async fn capture_shard<E: ShardEngine>(
    engine: &Arc<E>,
    gate: &WriteGate,
    capture_dir: PathBuf,
    timeline: Timeline,
) -> Result<CapturedShard> {
    let (closed, mut captured) =
        capture_closed(engine, gate, capture_dir, timeline, CaptureMode::Files).await?;
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
    let manifest = shard_manifest(
        &captured,
        shard_id,
        backup_id,
        (files, Vec::new()),
        stats,
        upload_started,
    );
    repo.put_shard_manifest(&manifest).await?;
    // Dropping the capture re-enables file deletions and removes its directory. It happens
    // on the error returns above too, because `captured` is dropped there as well.
    drop(captured);
    Ok(manifest)
}

/// The shard manifest of a capture once its files or WAL pieces are uploaded.
fn shard_manifest(
    captured: &CapturedShard,
    shard_id: &ShardId,
    backup_id: &BackupId,
    (files, wal): (Vec<FileEntry>, Vec<WalPiece>),
    stats: TransferStats,
    upload_started: Instant,
) -> ShardManifest {
    ShardManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        backup_id: backup_id.clone(),
        shard_id: shard_id.clone(),
        engine: captured.engine.to_string(),
        seq: captured.capture.seq,
        timeline: captured.timeline,
        hlc: captured.hlc,
        captured_at: captured.captured_at,
        column_families: captured.capture.column_families.clone(),
        files,
        wal_after: match captured.mode {
            CaptureMode::Wal { after, .. } => Some(after),
            _ => None,
        },
        wal,
        stats,
        timings: ShardTimings {
            gate_closed_us: captured.paused.as_micros() as u64,
            capture_us: captured.capture_us,
            upload_us: upload_started.elapsed().as_micros() as u64,
        },
        tool_version: TOOL_VERSION.to_string(),
    }
}

/// Step 5-6 of an incremental or differential backup: uploads the shard's WAL from just
/// after `after` to the captured sequence number, as segments of about 4 MiB, and publishes
/// the shard manifest. The WAL is read from the engine after the gate reopened; a batch it
/// no longer holds is `ERR_BACKUP_WAL_GAP`.
pub async fn upload_wal<E: ShardEngine>(
    captured: CapturedShard,
    engine: Arc<E>,
    repo: &Repository,
    shard_id: &ShardId,
    backup_id: &BackupId,
    transfer: TransferOptions,
    progress: &Progress,
) -> Result<ShardManifest> {
    let CaptureMode::Wal { after, .. } = captured.mode else {
        return Err(Error::new(
            ErrorCode::BackupCreationFailed,
            "upload_wal needs a WAL capture",
        ));
    };
    let seq = captured.capture.seq;
    let upload_started = Instant::now();
    let mut pieces = Vec::new();
    let mut stats = TransferStats::default();
    let mut cursor = after;
    while cursor < seq {
        let reader = engine.clone();
        let batches =
            lockstep_repository::blocking::run(move || reader.wal_since(cursor, WAL_PIECE_BYTES))
                .await
                .map_err(join_error)?
                .map_err(|err| {
                    err.context(format!(
                        "read the WAL of shard {shard_id}; take a full backup"
                    ))
                })?;
        let batches: Vec<_> = batches.into_iter().take_while(|b| b.first <= seq).collect();
        if let Some(crossing) = batches.iter().find(|b| b.last() > seq) {
            return Err(Error::new(
                ErrorCode::BackupCreationFailed,
                format!(
                    "shard {shard_id}: batch {}..={} crosses the cut at {seq}",
                    crossing.first,
                    crossing.last()
                ),
            ));
        }
        let segment = Segment {
            shard_id: shard_id.clone(),
            timeline: captured.timeline,
            batches,
        };
        let piece = repo.put_wal_piece(&segment, transfer.compression).await?;
        stats.bytes_total += piece.chunk.len;
        stats.bytes_read += piece.chunk.len;
        stats.bytes_uploaded += piece.chunk.len;
        stats.stored_bytes_uploaded += piece.chunk.stored_len;
        stats.objects_uploaded += 1;
        progress
            .done_bytes
            .fetch_add(piece.chunk.len, Ordering::Relaxed);
        progress
            .total_bytes
            .fetch_add(piece.chunk.len, Ordering::Relaxed);
        cursor = piece.last;
        pieces.push(piece);
    }
    let manifest = shard_manifest(
        &captured,
        shard_id,
        backup_id,
        (Vec::new(), pieces),
        stats,
        upload_started,
    );
    repo.put_shard_manifest(&manifest).await?;
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
