//! Backing up one shard: stage with the write gate open, cut under the closed gate, then
//! upload with the gate open again.
//!
//! 1. stage (`stage_capture`), while writes flow: RocksDB flushes its memtables and takes a
//!    checkpoint, whose exact sequence number `files_seq` it then reads;
//! 2. close the gate (waits for in-flight writes) and read the shard's sequence number: the
//!    cut (`close_gate`); the gate is closed for that read only, whatever the shard's size;
//! 3. open the gate: the pause ends here (the barrier holds it until every shard is cut);
//! 4. upload the captured files, reusing unchanged SSTs of the shard's latest full backup by
//!    identity, without reading them, then the WAL from just after `files_seq` to the cut,
//!    read from the engine (file deletions stay disabled until the capture is dropped, so it
//!    is still there);
//! 5. publish the shard manifest; then drop the capture, which re-enables file deletions.
//!
//! Incremental and differential backups (`CaptureMode::Wal`) capture no files: staging checks
//! the WAL since the parent is still there, and step 4 uploads the WAL from the parent's
//! sequence number to the cut. Either way the WAL goes up as content-addressed segments.
//! A tag (`CaptureMode::Point`) records the cut and uploads nothing.
//!
//! `backup_offline` adds the backup manifest for a single shard backed up with no
//! coordinator (disaster recovery on a bare machine).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
    BackupId, Error, ErrorCode, HlcTime, Lineage, Repository, Result, Seq, ShardId,
};

use crate::engine::{Capture, ShardEngine};
use tokio_util::sync::CancellationToken;

/// Raw WAL bytes per piece of a backup's WAL.
const WAL_PIECE_BYTES: usize = 4 << 20;

/// What a barrier takes from the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    /// A full backup: the shard's files, and the WAL from them to the cut.
    Files,
    /// An incremental or differential backup: the WAL after `after` (the parent's sequence
    /// number), which must be on `lineage` (the parent's); read after the gate has reopened.
    Wal { after: Seq, lineage: Lineage },
    /// A tag: the sequence number and HLC time only.
    Point,
}
use crate::gate::{GateClosed, WriteGate};

/// Where and how a shard is backed up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Directory for capture directories; for RocksDB it must be on the shard's filesystem
    /// so the checkpoint can hard-link SST files. Never the shard's directory, inside it, or
    /// holding it ([`check_capture_root`]).
    pub capture_root: PathBuf,
    pub transfer: TransferOptions,
    /// A capture holds files and WAL that compactions would delete, so none starts while the
    /// capture root's filesystem has less free space than this (0: no floor).
    pub min_free_bytes: u64,
}

/// The name every capture directory starts with: the agent removes only these.
pub const CAPTURE_PREFIX: &str = "lockstep-capture-";

impl BackupOptions {
    /// The capture directory of `backup`.
    pub fn capture_dir(&self, backup: &BackupId) -> PathBuf {
        self.capture_root.join(format!("{CAPTURE_PREFIX}{backup}"))
    }
}

/// Refuses to start a capture while the capture root's filesystem has less free space than
/// the floor: the capture pins files and WAL, and a full disk stops the shard's writes.
pub fn check_free_space(options: &BackupOptions) -> Result<()> {
    if options.min_free_bytes == 0 {
        return Ok(());
    }
    // The capture root may not exist yet: ask about its nearest existing ancestor.
    let root = crate::restore::absolute(&options.capture_root)?;
    let mut at = root.as_path();
    while !at.exists() {
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    let stats = rustix::fs::statvfs(at).map_err(|err| {
        Error::io(
            ErrorCode::BackupCreationFailed,
            format!("check the free space under {}", at.display()),
            err.into(),
        )
    })?;
    let free = stats.f_bavail.saturating_mul(stats.f_frsize);
    if free < options.min_free_bytes {
        return Err(Error::new(
            ErrorCode::StorageDiskFull,
            format!(
                "only {} MiB free under {}, below the floor of {} MiB a capture needs (--min-free-mib); free space first",
                free >> 20,
                at.display(),
                options.min_free_bytes >> 20
            ),
        ));
    }
    Ok(())
}

/// Refuses a capture root that is the shard's directory `db`, lies inside it, or holds it:
/// captures are created and removed there, and must never touch the live shard.
pub fn check_capture_root(db: &Path, capture_root: &Path) -> Result<()> {
    let (db_at, root_at) = (resolved(db)?, resolved(capture_root)?);
    if db_at.starts_with(&root_at) || root_at.starts_with(&db_at) {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "capture directory {} overlaps the shard directory {}: choose a directory beside the shard, on its filesystem (the default is <db>.lockstep-captures)",
                capture_root.display(),
                db.display()
            ),
        ));
    }
    Ok(())
}

/// `path` made absolute with every symbolic link in its existing part resolved.
fn resolved(path: &Path) -> Result<PathBuf> {
    let absolute = crate::restore::absolute(path)?;
    let mut missing = Vec::new();
    let mut existing = absolute.as_path();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return Ok(missing
                .iter()
                .rev()
                .fold(real, |path, part| path.join(part)));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            _ => return Ok(absolute),
        }
    }
}

fn join_error(err: lockstep_repository::blocking::TaskFailed) -> Error {
    Error::with_source(ErrorCode::BackupCreationFailed, "capture task failed", err)
}

/// A shard staged for a backup, and once its gate has closed, cut.
#[derive(Debug)]
pub struct CapturedShard {
    pub mode: CaptureMode,
    /// The captured files (none for `Wal` and `Point`) at their exact sequence number.
    pub capture: Capture,
    /// The cut: the shard's sequence number under the closed gate (until then, the files').
    pub seq: Seq,
    /// `rocksdb` or `memory`.
    pub engine: &'static str,
    /// How long client writes were held at the gate.
    pub paused: std::time::Duration,
    pub captured_at: chrono::DateTime<Utc>,
    /// How long staging took (with the gate open).
    pub capture_us: u64,
    /// The HLC time of the last write at the cut.
    pub hlc: HlcTime,
    /// The shard's lineage at the capture.
    pub lineage: Lineage,
    /// What a running GC sweep may delete, which the upload must not rely on.
    pub condemned: CondemnedSet,
}

/// The objects a GC sweep condemned, if one runs (`lockstep_repository::gc`).
pub type CondemnedSet = Option<Arc<lockstep_repository::gc::Condemned>>;

/// Checks, before the gate closes, that the WAL an incremental or differential backup needs
/// is still on the shard: a shard on another history (restored, or rolled back), a parent
/// ahead of the shard, or
/// WAL purged behind the agent's back is `ERR_BACKUP_WAL_GAP`, never skipped.
fn check_wal_available<E: ShardEngine>(
    engine: &E,
    after: Seq,
    parent: &Lineage,
    lineage: &Lineage,
) -> Result<()> {
    let hint = "take a full backup";
    if parent.id != lineage.id {
        return Err(Error::new(
            ErrorCode::BackupWalGap,
            format!(
                "the shard is on {lineage} but its previous backup is on {parent} (the shard was restored or rolled back since); {hint}"
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

/// Step 1: everything slow, with the gate open. Full backups capture the shard's files
/// (RocksDB: flush, then a checkpoint); incremental and differential backups check that the
/// WAL since their parent is still there.
pub async fn stage_capture<E: ShardEngine>(
    engine: &Arc<E>,
    capture_dir: PathBuf,
    lineage: Lineage,
    mode: CaptureMode,
) -> Result<CapturedShard> {
    let started = Instant::now();
    let captured_at = Utc::now();
    let staging = engine.clone();
    let capture = match mode {
        CaptureMode::Files => {
            if let Some(parent) = capture_dir.parent() {
                std::fs::create_dir_all(parent).map_err(|err| {
                    Error::io(
                        ErrorCode::BackupCreationFailed,
                        format!("create {}", parent.display()),
                        err,
                    )
                })?;
            }
            let dir = capture_dir.clone();
            let captured = lockstep_repository::blocking::run(move || {
                staging.prepare_capture()?;
                staging.capture(&dir)
            })
            .await;
            match captured.map_err(join_error).and_then(|r| r) {
                Ok(capture) => capture,
                Err(err) => {
                    // A checkpoint that failed half-way may have left files behind.
                    let _ = std::fs::remove_dir_all(&capture_dir);
                    return Err(err.context("capture shard"));
                }
            }
        }
        CaptureMode::Wal { .. } | CaptureMode::Point => {
            if let CaptureMode::Wal {
                after,
                lineage: parent,
            } = mode
            {
                lockstep_repository::blocking::run(move || {
                    check_wal_available(staging.as_ref(), after, &parent, &lineage)
                })
                .await
                .map_err(join_error)??;
            }
            Capture::new(
                engine.latest_seq(),
                capture_dir,
                Vec::new(),
                engine.column_families(),
                None,
            )
        }
    };
    Ok(CapturedShard {
        mode,
        seq: capture.seq,
        capture,
        engine: engine.kind(),
        paused: std::time::Duration::ZERO,
        captured_at,
        capture_us: started.elapsed().as_micros() as u64,
        hlc: engine.clock().last(),
        lineage,
        condemned: None,
    })
}

/// Step 2: closes the gate and cuts the staged shard at its sequence number. The gate stays
/// closed: the caller opens it (drops the returned guard) when the barrier allows, and then
/// [`CapturedShard::paused`] must be set from [`GateClosed::open`].
pub async fn close_gate<E: ShardEngine>(
    engine: &E,
    gate: &WriteGate,
    captured: &mut CapturedShard,
) -> GateClosed {
    let closed = gate.close().await;
    captured.seq = engine.latest_seq();
    captured.hlc = engine.clock().last();
    closed
}

/// Steps 1-2 at once.
pub async fn capture_closed<E: ShardEngine>(
    engine: &Arc<E>,
    gate: &WriteGate,
    capture_dir: PathBuf,
    lineage: Lineage,
    mode: CaptureMode,
) -> Result<(GateClosed, CapturedShard)> {
    let mut captured = stage_capture(engine, capture_dir, lineage, mode).await?;
    let closed = close_gate(engine.as_ref(), gate, &mut captured).await;
    Ok((closed, captured))
}

/// Steps 1-3: stages, cuts and reopens the gate at once.
pub async fn capture_shard<E: ShardEngine>(
    engine: &Arc<E>,
    gate: &WriteGate,
    capture_dir: PathBuf,
    lineage: Lineage,
) -> Result<CapturedShard> {
    let (closed, mut captured) =
        capture_closed(engine, gate, capture_dir, lineage, CaptureMode::Files).await?;
    captured.paused = closed.open();
    Ok(captured)
}

/// Steps 4-5: uploads a cut shard (its files, then its WAL to the cut) and publishes its
/// shard manifest, then releases the capture. `stop` ends the upload early with
/// `ERR_BARRIER_ABORTED`, at any point before the shard manifest is being published; once
/// publishing began it runs to its end, so a caller that waits for the upload to end knows
/// no manifest can land later.
#[allow(clippy::too_many_arguments)]
pub async fn upload_capture<E: ShardEngine>(
    captured: CapturedShard,
    engine: Arc<E>,
    repo: &Repository,
    shard_id: &ShardId,
    backup_id: &BackupId,
    transfer: TransferOptions,
    progress: &Progress,
    stop: &CancellationToken,
) -> Result<ShardManifest> {
    let aborted = || {
        Error::new(
            ErrorCode::BarrierAborted,
            format!("the upload of shard {shard_id} was stopped: the backup was aborted"),
        )
    };
    let uploaded = tokio::select! {
        biased;
        _ = stop.cancelled() => Err(aborted()),
        uploaded = upload_parts(&captured, engine, repo, shard_id, transfer, progress) => uploaded,
    };
    let ((files, wal), stats, upload_started) = uploaded?;
    if stop.is_cancelled() {
        return Err(aborted());
    }
    let manifest = shard_manifest(
        &captured,
        shard_id,
        backup_id,
        (files, wal),
        stats,
        upload_started,
    );
    repo.put_shard_manifest(&manifest).await?;
    // Dropping the capture re-enables file deletions and removes its directory. It happens
    // on the error returns above too, because `captured` is dropped there as well.
    drop(captured);
    Ok(manifest)
}

/// The files and the WAL of a capture, uploaded; what a shard manifest lists.
type UploadedParts = ((Vec<FileEntry>, Vec<WalPiece>), TransferStats, Instant);

/// Step 4: the capture's files (reusing unchanged SSTs), then its WAL to the cut.
async fn upload_parts<E: ShardEngine>(
    captured: &CapturedShard,
    engine: Arc<E>,
    repo: &Repository,
    shard_id: &ShardId,
    transfer: TransferOptions,
    progress: &Progress,
) -> Result<UploadedParts> {
    let capture = &captured.capture;
    let upload_started = Instant::now();
    let (files, mut stats) = if capture.files.is_empty() {
        (Vec::new(), TransferStats::default())
    } else {
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
        upload_files(repo, &sources, &reusable, transfer, progress)
            .await
            .map_err(|err| err.context(format!("upload shard {shard_id}")))?
    };
    let wal_start = match captured.mode {
        CaptureMode::Wal { after, .. } => after,
        CaptureMode::Files | CaptureMode::Point => capture.seq,
    };
    let wal = upload_wal(
        captured, engine, wal_start, repo, shard_id, transfer, progress, &mut stats,
    )
    .await?;
    Ok(((files, wal), stats, upload_started))
}

/// The shard manifest of a capture once its files and WAL pieces are uploaded.
fn shard_manifest(
    captured: &CapturedShard,
    shard_id: &ShardId,
    backup_id: &BackupId,
    (files, wal): (Vec<FileEntry>, Vec<WalPiece>),
    stats: TransferStats,
    upload_started: Instant,
) -> ShardManifest {
    let (files_seq, wal_after) = match captured.mode {
        CaptureMode::Wal { after, .. } => (None, Some(after)),
        _ if captured.capture.seq < captured.seq => (Some(captured.capture.seq), None),
        _ => (None, None),
    };
    ShardManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        backup_id: backup_id.clone(),
        shard_id: shard_id.clone(),
        engine: captured.engine.to_string(),
        seq: captured.seq,
        lineage: captured.lineage,
        hlc: captured.hlc,
        captured_at: captured.captured_at,
        column_families: captured.capture.column_families.clone(),
        files,
        files_seq,
        wal_after,
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

/// Uploads the shard's WAL from just after `after` to the cut, as segments of about 4 MiB,
/// read from the engine after the gate reopened; a batch it no longer holds is
/// `ERR_BACKUP_WAL_GAP`.
#[allow(clippy::too_many_arguments)]
async fn upload_wal<E: ShardEngine>(
    captured: &CapturedShard,
    engine: Arc<E>,
    after: Seq,
    repo: &Repository,
    shard_id: &ShardId,
    transfer: TransferOptions,
    progress: &Progress,
    stats: &mut TransferStats,
) -> Result<Vec<WalPiece>> {
    let seq = captured.seq;
    let mut pieces = Vec::new();
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
            lineage: captured.lineage,
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
    Ok(pieces)
}

/// Backs up a single shard with no coordinator and commits it as a one-shard backup.
pub async fn backup_offline<E: ShardEngine>(
    engine: &Arc<E>,
    repo: &Repository,
    shard_id: &ShardId,
    options: &BackupOptions,
    lineage: Lineage,
    progress: &Progress,
) -> Result<BackupManifest> {
    check_free_space(options)?;
    // No coordinator tells this backup what a GC sweep condemns: it avoids every candidate.
    let repo = &repo.avoiding_gc_candidates().await?;
    let backup_id = BackupId::generate();
    let started_at = Utc::now();
    let gate = WriteGate::new();
    let captured = capture_shard(engine, &gate, options.capture_dir(&backup_id), lineage).await;
    let uploaded = match captured {
        Ok(captured) => {
            tracing::info!(
                shard = %shard_id, backup = %backup_id, seq = %captured.seq,
                gate_closed_us = captured.paused.as_micros() as u64,
                files = captured.capture.files.len(), "captured shard"
            );
            upload_capture(
                captured,
                engine.clone(),
                repo,
                shard_id,
                &backup_id,
                options.transfer,
                progress,
                // Offline, nothing aborts the upload.
                &CancellationToken::new(),
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
    repo.commit_backup(manifest).await
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options(capture_root: PathBuf, min_free_bytes: u64) -> BackupOptions {
        BackupOptions {
            capture_root,
            transfer: TransferOptions::default(),
            min_free_bytes,
        }
    }

    #[test]
    fn no_capture_starts_below_the_free_space_floor() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Not created yet: the floor is checked on the filesystem it will be on.
        let root = dir.path().join("not/yet/captures");
        let err = check_free_space(&options(root.clone(), u64::MAX))
            .expect_err("no filesystem has that much free");
        assert_eq!(err.code, ErrorCode::StorageDiskFull, "{err}");
        assert!(err.to_string().contains("--min-free-mib"), "{err}");
        check_free_space(&options(root.clone(), 1)).expect("a byte is free");
        check_free_space(&options(root, 0)).expect("no floor");
        // `--db shard-1` gives the relative root `shard-1.lockstep-captures`.
        check_free_space(&options(PathBuf::from("shard-1.lockstep-captures"), 1))
            .expect("a relative root is checked where it will be");
    }
}
