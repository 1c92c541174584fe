//! Restoring one shard of a backup into a new directory.
//!
//! The files are downloaded into a staging directory next to the target, every chunk is
//! checked against its SHA-256, the shard is opened and its sequence number compared with
//! the manifest, and only then is the staging directory renamed to the target.
//!
//! Architecture invariant: a restore never writes into an existing non-empty directory, and
//! on any failure nothing is left at the target (the staging directory is removed).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use lockstep_repository::export::{ExportManifest, ExportedShard};
use lockstep_repository::lineage::Leg;
use lockstep_repository::manifest::ShardManifest;
use lockstep_repository::transfer::{Progress, TransferOptions, download_files};
use lockstep_repository::wal::segments_covering;
use lockstep_repository::{
    BackupId, Error, ErrorCode, Lineage, Repository, Result, Seq, ShardId, Timeline,
};

use crate::engine::{ShardEngine, with_engine};
use crate::lineage::write_lineage;

/// Bringing a staged full backup forward: first the WAL pieces of an incremental or
/// differential chain (from the backup repository), then the WAL archive's segments leg by
/// leg (each lineage's writes up to its leg's end, oldest lineage first), stopping exactly
/// after `to`. (A full backup's own WAL tail, from its files to its cut, is a chain
/// of that backup alone, replayed by `stage_shard`.)
#[derive(Debug, Clone)]
pub struct Replay {
    /// The repository holding the chain's backups.
    pub repo: Repository,
    /// Backups whose WAL pieces are replayed, in order; each starts where the previous (or the
    /// base) ends.
    pub chain: Vec<BackupId>,
    /// The WAL archive whose segments are replayed after the chain, and the legs of the
    /// history to replay (`lineage::ancestry`, oldest first).
    pub archive: Option<lockstep_repository::archive::WalArchive>,
    pub legs: Vec<Leg>,
    pub to: Seq,
}

/// One segment to replay, and where to fetch it.
enum Source {
    Piece(lockstep_repository::manifest::WalPiece),
    Archived(lockstep_repository::wal::SegmentInfo),
}

/// The segments that take `shard` from `base` to `replay.to`, checked for continuity, each
/// with the last sequence number of it to replay (a segment of an ancestor lineage may run
/// past the point where the history branched off it).
async fn replay_sources(shard: &ShardId, base: Seq, replay: &Replay) -> Result<Vec<(Source, Seq)>> {
    let mut sources = Vec::new();
    let mut cursor = base;
    for backup in &replay.chain {
        let manifest = replay.repo.shard_manifest(shard, backup).await?;
        if manifest.wal_start() != Some(cursor) {
            return Err(Error::new(
                ErrorCode::BackupIncomplete,
                format!(
                    "shard {shard}: backup {backup}'s WAL starts after sequence {}, the chain is at {cursor}",
                    manifest
                        .wal_start()
                        .map_or("(none: it has no WAL)".to_string(), |s| s.to_string())
                ),
            ));
        }
        for piece in manifest.wal {
            if piece.first <= replay.to {
                sources.push((Source::Piece(piece), replay.to));
            }
        }
        cursor = manifest.seq;
    }
    if cursor >= replay.to {
        return Ok(sources);
    }
    // What is replayed stops at `cursor`, short of the target: `why` says where it ends.
    let short = |cursor: Seq, why: &str| {
        lockstep_repository::wal::gap(
            format_args!(
                "shard {shard}: {why} at {cursor}, the target is {}",
                replay.to
            ),
            Seq(cursor.0 + 1),
            replay.to,
        )
    };
    let Some(archive) = &replay.archive else {
        return Err(short(
            cursor,
            "no WAL archive was given and the backups end",
        ));
    };
    for leg in &replay.legs {
        let to = leg.to.min(replay.to);
        if to <= cursor {
            continue;
        }
        let segments = segments_covering(
            archive
                .segments_after(shard, &leg.lineage, cursor, to)
                .await?,
            cursor,
            to,
            format_args!("shard {shard} {} in {}", leg.lineage, archive.url()),
        )?;
        sources.extend(segments.into_iter().map(|s| (Source::Archived(s), to)));
        cursor = to;
    }
    if cursor < replay.to {
        return Err(short(cursor, "the history given to replay ends"));
    }
    Ok(sources)
}

/// Replays `replay` onto a staged shard (which must come from engine `E`), leaving it
/// durable at exactly `replay.to`; returns the number of batches replayed.
pub async fn replay_staged<E: ShardEngine>(
    staged: &mut StagedShard,
    shard: &ShardId,
    replay: &Replay,
) -> Result<u64> {
    let base = staged.seq;
    if replay.to < base {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "shard {shard}: the target sequence {} is before the base backup's {base}",
                replay.to
            ),
        ));
    }
    if replay.to == base {
        return Ok(0);
    }
    let sources = replay_sources(shard, base, replay).await?;
    let dir = staged.staging.clone();
    let columns = staged.column_families.clone();
    // The engine and its directory's guard together: every blocking step holds both.
    let engine = Arc::new(
        lockstep_repository::blocking::run(move || E::open(dir.path(), &columns).map(|e| (e, dir)))
            .await
            .map_err(replay_task_failed)??,
    );
    let mut replayed = 0u64;
    // The next segment downloads while the current one is applied.
    let mut fetched = futures::stream::iter(sources)
        .map(|(source, stop)| async move {
            let segment = match source {
                Source::Piece(piece) => replay.repo.get_wal_piece(shard, &piece).await,
                Source::Archived(info) => match &replay.archive {
                    Some(archive) => archive.get_wal_segment(&info).await,
                    None => Err(Error::new(
                        ErrorCode::BackupRestorationFailed,
                        "an archived segment without an archive",
                    )),
                },
            };
            segment.map(|segment| (segment, stop))
        })
        .buffered(2);
    while let Some(fetched) = fetched.next().await {
        let (segment, to) = fetched?;
        let (engine, shard) = (engine.clone(), shard.clone());
        replayed += lockstep_repository::blocking::run(move || -> Result<u64> {
            let mut n = 0;
            for batch in &segment.batches {
                if batch.last() <= engine.0.latest_seq() {
                    continue;
                }
                if batch.first > to {
                    break;
                }
                if batch.last() > to {
                    return Err(Error::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "shard {shard}: sequence {to} is inside the batch {}..={}; a batch is atomic, pick {} or {}",
                            batch.first,
                            batch.last(),
                            Seq(batch.first.0.saturating_sub(1)),
                            batch.last()
                        ),
                    ));
                }
                engine.0.replay(batch)?;
                n += 1;
            }
            Ok(n)
        })
        .await
        .map_err(replay_task_failed)??;
    }
    let seq = engine.0.latest_seq();
    if seq != replay.to {
        return Err(Error::new(
            ErrorCode::BackupRestorationFailed,
            format!(
                "shard {shard}: replay ended at sequence {seq}, the target is {}",
                replay.to
            ),
        ));
    }
    let closing = engine.clone();
    lockstep_repository::blocking::run(move || closing.0.sync())
        .await
        .map_err(replay_task_failed)??;
    drop(engine);
    staged.seq = seq;
    Ok(replayed)
}

fn replay_task_failed(err: lockstep_repository::blocking::TaskFailed) -> Error {
    Error::with_source(
        ErrorCode::BackupRestorationFailed,
        "replay task failed",
        err,
    )
}

/// What a restore produced.
#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    pub shard: ShardId,
    pub seq: Seq,
    pub n_files: usize,
    pub bytes: u64,
    pub target: PathBuf,
}

/// A staging directory, removed when the last clone is dropped unless it was renamed into
/// place. Blocking work that opens RocksDB in it holds a clone: a cancelled restore drops its
/// future at once, but a RocksDB open already running on a blocking thread would recreate
/// the directory after its removal (`DB::Open` creates a missing one), so the directory goes
/// only when that work ends.
#[derive(Debug, Clone)]
struct Staging(Arc<StagingDir>);

#[derive(Debug)]
struct StagingDir {
    path: PathBuf,
    armed: AtomicBool,
}

impl Staging {
    fn new(path: PathBuf) -> Staging {
        Staging(Arc::new(StagingDir {
            path,
            armed: AtomicBool::new(true),
        }))
    }

    fn path(&self) -> &Path {
        &self.0.path
    }

    /// Keeps the directory: it was renamed into place.
    fn disarm(&self) {
        self.0.armed.store(false, Ordering::Release);
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if *self.armed.get_mut() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn check_target(target: &Path) -> Result<()> {
    match std::fs::read_dir(target) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::new(
                    ErrorCode::RestoreTargetNotEmpty,
                    format!(
                        "restore target {} exists and is not empty",
                        target.display()
                    ),
                ));
            }
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotADirectory => Err(Error::new(
            ErrorCode::RestoreTargetNotEmpty,
            format!("restore target {} is a file", target.display()),
        )),
        Err(err) => Err(Error::io(
            ErrorCode::BackupRestorationFailed,
            format!("inspect {}", target.display()),
            err,
        )),
    }
}

/// `replay_staged` with the engine a manifest names.
async fn replay_with_engine(
    engine: &str,
    staged: &mut StagedShard,
    shard: &ShardId,
    replay: &Replay,
) -> Result<u64> {
    with_engine!(engine, |E| replay_staged::<E>(staged, shard, replay).await)
}

/// Drops `drop` from the closed shard in `dir`, empties its default column family if
/// `clear_default`, and returns its sequence number, synced.
fn keep_only<E: ShardEngine>(dir: &Path, drop: &[String], clear_default: bool) -> Result<Seq> {
    E::drop_column_families(dir, drop)?;
    let engine = E::open(dir, &[])?;
    if clear_default {
        engine.clear_column_family(crate::engine::DEFAULT_CF)?;
    }
    engine.sync()?;
    Ok(engine.latest_seq())
}

/// Opens the restored files with the engine that wrote them and returns its sequence number.
fn open_and_read_seq(manifest: &ShardManifest, dir: &Path) -> Result<Seq> {
    with_engine!(manifest.engine.as_str(), |E| E::open(
        dir,
        &manifest.column_families
    )
    .map(|e| e.latest_seq()))
}

/// Picks the shard to restore: the one named, or the only one in the backup.
pub async fn select_shard(
    repo: &Repository,
    backup: &BackupId,
    shard: Option<&ShardId>,
) -> Result<ShardId> {
    let manifest = repo.backup_manifest(backup).await?;
    match shard {
        Some(shard) if manifest.shards.iter().any(|s| &s.shard_id == shard) => Ok(shard.clone()),
        Some(shard) => Err(Error::new(
            ErrorCode::BackupNotFound,
            format!("backup {backup} has no shard {shard}"),
        )),
        None if manifest.shards.len() == 1 => Ok(manifest.shards[0].shard_id.clone()),
        None => Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "backup {backup} has {} shards; name one with --shard ({})",
                manifest.shards.len(),
                manifest
                    .shards
                    .iter()
                    .map(|s| s.shard_id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// A shard of a backup downloaded and checked in a staging directory, not yet in place.
/// Dropping it removes the staging directory.
#[derive(Debug)]
pub struct StagedShard {
    staging: Staging,
    pub seq: Seq,
    /// The history the shard starts when it goes live ([`StagedShard::start_lineage`]); a
    /// swap refuses a staged shard without one.
    pub lineage: Option<Lineage>,
    pub column_families: Vec<String>,
    /// Column families were left out (a selective restore): the shard is no point of any
    /// history, so it starts an orphan lineage.
    pub partial: bool,
    /// The engine whose files these are (`rocksdb`, `memory`).
    pub engine: String,
    pub n_files: usize,
    pub bytes: u64,
    /// The cluster restore whose decision the shard waits for once in place
    /// ([`UNDECIDED_FILE`]); `None` for a restore that needs none (offline, one shard).
    pub undecided: Option<String>,
}

impl StagedShard {
    /// Starts the staged shard on a new history that continues `point` after the staged
    /// sequence number.
    /// (An orphan for a selective restore: no archive replays into it.)
    pub fn start_lineage(&mut self, point: &Lineage, timeline: Timeline) -> Result<Lineage> {
        let lineage = if self.partial {
            Lineage::orphan(self.seq, timeline)
        } else {
            point.child(self.seq, timeline)
        };
        write_lineage(self.staging.path(), &lineage)?;
        self.lineage = Some(lineage);
        Ok(lineage)
    }

    /// Keeps only the column families `keep` (a selective restore): the others are dropped
    /// and the default one, which cannot be, is emptied unless kept. Run after every replay:
    /// what the WAL wrote to the others goes with them. A name the shard lacks is refused.
    pub async fn keep_column_families(&mut self, keep: &[String]) -> Result<()> {
        if keep.is_empty() {
            return Ok(());
        }
        if let Some(missing) = keep.iter().find(|cf| !self.column_families.contains(cf)) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "the backup's shard has no column family {missing:?}; it has {}",
                    self.column_families.join(", ")
                ),
            ));
        }
        let drop: Vec<String> = self
            .column_families
            .iter()
            .filter(|cf| !keep.contains(cf))
            .cloned()
            .collect();
        let (dir, engine, clear_default) = (
            self.staging.clone(),
            self.engine.clone(),
            !keep.iter().any(|cf| cf == crate::engine::DEFAULT_CF),
        );
        let seq = lockstep_repository::blocking::run(move || {
            with_engine!(engine.as_str(), |E| keep_only::<E>(
                dir.path(),
                &drop,
                clear_default
            ))
        })
        .await
        .map_err(replay_task_failed)??;
        self.column_families
            .retain(|cf| keep.contains(cf) || cf == crate::engine::DEFAULT_CF);
        self.seq = seq;
        self.partial = true;
        Ok(())
    }

    /// Marks the staged shard complete ([`COMPLETE_FILE`], and [`UNDECIDED_FILE`] when it
    /// waits for a decision; synced), then renames it to `target`, which must be absent or
    /// an empty directory.
    pub fn move_to(self, target: &Path) -> Result<()> {
        let io = |what: String, err| Error::io(ErrorCode::BackupRestorationFailed, what, err);
        let write = |name: &str, content: String| {
            let file = self.staging.path().join(name);
            std::fs::write(&file, content)
                .and_then(|()| std::fs::File::open(&file)?.sync_all())
                .map_err(|err| io(format!("write {}", file.display()), err))
        };
        if let Some(restore) = &self.undecided {
            write(UNDECIDED_FILE, format!("{restore}\n"))?;
        }
        write(COMPLETE_FILE, format!("{}\n", self.seq))?;
        std::fs::File::open(self.staging.path())
            .and_then(|dir| dir.sync_all())
            .map_err(|err| io(format!("sync {}", self.staging.path().display()), err))?;
        // rename(2) replaces an empty directory atomically.
        std::fs::rename(self.staging.path(), target)
            .map_err(|err| io(format!("move restored shard to {}", target.display()), err))?;
        self.staging.disarm();
        if let Some(parent) = target.parent()
            && let Ok(dir) = std::fs::File::open(parent)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Written into a staged shard once everything in it is downloaded and checked, just before
/// it moves into place: a directory holding it is a complete restored shard.
pub const COMPLETE_FILE: &str = "LOCKSTEP-RESTORED";

/// Whether `dir` holds a complete restored shard (see [`COMPLETE_FILE`]).
pub fn is_complete_restore(dir: &Path) -> bool {
    dir.join(COMPLETE_FILE).is_file()
}

/// Written beside [`COMPLETE_FILE`] into the shard of a cluster restore, naming it: the shard
/// is in place but the restore may still revert (its decision is in the repository,
/// `Repository::decide_restore`). Removed, durably, when the restore commits; a shard holding
/// it never serves before its decision is known.
pub const UNDECIDED_FILE: &str = "LOCKSTEP-UNDECIDED";

/// The cluster restore a complete restored shard in `dir` still waits for, if any. A mark
/// that exists and cannot be read is an error, never "decided".
pub fn undecided_restore(dir: &Path) -> Result<Option<String>> {
    if !is_complete_restore(dir) {
        return Ok(None);
    }
    let file = dir.join(UNDECIDED_FILE);
    match std::fs::read_to_string(&file) {
        Ok(content) => Ok(Some(content.trim().to_string())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(Error::io(
            ErrorCode::BackupRestorationFailed,
            format!("read {}", file.display()),
            err,
        )),
    }
}

/// Removes a restored shard from the target directory it was applied to (its restore
/// reverted), unmarked first, so a crash part-way never leaves what looks like a complete
/// restore. The target was absent or empty before the restore.
pub fn remove_restored(target: &Path) -> Result<()> {
    let io = |what: String, err| Error::io(ErrorCode::BackupRestorationFailed, what, err);
    match std::fs::remove_file(target.join(COMPLETE_FILE)) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(io(format!("unmark {}", target.display()), err));
        }
        _ => {}
    }
    if let Ok(dir) = std::fs::File::open(target) {
        let _ = dir.sync_all();
    }
    match std::fs::remove_dir_all(target) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(io(format!("remove {}", target.display()), err))
        }
        _ => Ok(()),
    }
}

/// Records that the restored shard in `dir` is committed: removes [`UNDECIDED_FILE`], durably.
pub fn mark_committed(dir: &Path) -> Result<()> {
    let file = dir.join(UNDECIDED_FILE);
    match std::fs::remove_file(&file) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(
                ErrorCode::BackupRestorationFailed,
                format!("remove {}", file.display()),
                err,
            ));
        }
        _ => {}
    }
    std::fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|err| {
            Error::io(
                ErrorCode::BackupRestorationFailed,
                format!("sync {}", dir.display()),
                err,
            )
        })
}

/// Keeps the codes an operator acts on; everything else is a restoration failure.
fn restoration_error(err: Error) -> Error {
    let code = match err.code {
        ErrorCode::StorageDiskFull
        | ErrorCode::BackupChecksumMismatch
        | ErrorCode::BackupManifestCorrupt
        | ErrorCode::BackupIncomplete
        | ErrorCode::BackupNotFound
        | ErrorCode::RestoreTargetNotEmpty
        | ErrorCode::InvalidArgument
        | ErrorCode::StorageUnavailable => err.code,
        _ => ErrorCode::BackupRestorationFailed,
    };
    Error { code, ..err }
}

/// `path` made absolute against the working directory.
pub(crate) fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|err| {
        Error::io(
            ErrorCode::InvalidArgument,
            format!("resolve {}", path.display()),
            err,
        )
    })
}

/// Downloads `shard` of `backup` into a staging directory beside `target` (on its
/// filesystem, so the final rename is atomic), checks every chunk's SHA-256, opens the shard
/// and compares its sequence number with the manifest's files, then replays the backup's WAL
/// tail to its cut. `engine`, when given, is the engine the shard must have been taken from.
pub async fn stage_shard(
    repo: &Repository,
    backup: &BackupId,
    shard: &ShardId,
    target: &Path,
    engine: Option<&str>,
    transfer: TransferOptions,
    progress: &Progress,
) -> Result<StagedShard> {
    let fail = restoration_error;
    let manifest = repo.shard_manifest(shard, backup).await.map_err(fail)?;
    if let Some(after) = manifest.wal_after {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "backup {backup} is incremental or differential (the WAL after sequence {after}); \
                 restore it through the coordinator (`lockstep restore {backup}`), which stages its \
                 full base and replays the chain"
            ),
        ));
    }
    if let Some(engine) = engine
        && engine != manifest.engine
    {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "shard {shard} of backup {backup} comes from a {} engine; this agent runs {engine}",
                manifest.engine
            ),
        ));
    }
    let staging = staging_beside(target)?;
    download_files(repo, &manifest.files, staging.path(), transfer, progress)
        .await
        .map_err(fail)?;

    let (check_manifest, dir) = (manifest.clone(), staging.clone());
    let seq =
        lockstep_repository::blocking::run(move || open_and_read_seq(&check_manifest, dir.path()))
            .await
            .map_err(|err| {
                Error::with_source(
                    ErrorCode::BackupRestorationFailed,
                    "open restored shard",
                    err,
                )
            })?
            .map_err(|err| fail(err.context("open restored shard")))?;
    if seq != manifest.files_seq() {
        return Err(Error::new(
            ErrorCode::BackupRestorationFailed,
            format!(
                "restored shard opened at sequence {seq}, manifest says {}",
                manifest.files_seq()
            ),
        ));
    }
    let mut staged = StagedShard {
        staging,
        seq,
        lineage: None,
        undecided: None,
        partial: false,
        engine: manifest.engine.clone(),
        n_files: manifest.files.len(),
        bytes: manifest.total_bytes(),
        column_families: manifest.column_families.clone(),
    };
    if seq < manifest.seq {
        // The WAL written between the capture of the files and the cut.
        let tail = Replay {
            repo: repo.clone(),
            chain: vec![backup.clone()],
            archive: None,
            legs: Vec::new(),
            to: manifest.seq,
        };
        replay_with_engine(&manifest.engine, &mut staged, shard, &tail)
            .await
            .map_err(|err| fail(err.context(format!("replay the WAL tail of backup {backup}"))))?;
    }
    Ok(staged)
}

/// A fresh staging directory next to `target`, removed on drop unless moved into place.
fn staging_beside(target: &Path) -> Result<Staging> {
    let fail = restoration_error;
    let target = absolute(target)?;
    let parent = target.parent().map(Path::to_path_buf).ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidArgument,
            format!("restore target {} has no parent", target.display()),
        )
    })?;
    std::fs::create_dir_all(&parent).map_err(|err| {
        fail(Error::io(
            ErrorCode::BackupRestorationFailed,
            format!("create {}", parent.display()),
            err,
        ))
    })?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging_path = parent.join(format!(
        ".{name}.lockstep-restore-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir(&staging_path).map_err(|err| {
        fail(Error::io(
            ErrorCode::BackupRestorationFailed,
            format!("create {}", staging_path.display()),
            err,
        ))
    })?;
    Ok(Staging::new(staging_path))
}

/// Stages an empty shard of engine `E` with `column_families` (in this order), for a
/// restore that replays a WAL archive from sequence 1 with no backup: when the backup
/// repository is gone. The column families must be created in the order the original shard
/// created them, because a raw batch names them by number; they come from the live agent's
/// configuration.
pub async fn stage_empty<E: ShardEngine>(
    target: &Path,
    column_families: Vec<String>,
) -> Result<StagedShard> {
    let staging = staging_beside(target)?;
    let (dir, columns) = (staging.clone(), column_families.clone());
    let (seq, engine) = lockstep_repository::blocking::run(move || {
        let engine = E::open(dir.path(), &columns)?;
        engine.sync()?;
        Ok::<_, Error>((engine.latest_seq(), engine.kind().to_string()))
    })
    .await
    .map_err(replay_task_failed)??;
    Ok(StagedShard {
        staging,
        seq,
        lineage: None,
        undecided: None,
        partial: false,
        engine,
        n_files: 0,
        bytes: 0,
        column_families,
    })
}

/// Restores `shard` of `backup` into `target`, which must be absent or empty, on a new
/// lineage that continues the backup's; an incremental or differential backup through its
/// chain (its full base staged, the chain's WAL replayed). `column_families`, unless empty,
/// are the only ones kept (`StagedShard::keep_column_families`).
pub async fn restore_shard(
    repo: &Repository,
    backup: &BackupId,
    shard: &ShardId,
    target: &Path,
    column_families: &[String],
    transfer: TransferOptions,
    progress: &Progress,
) -> Result<RestoreOutcome> {
    let manifest = repo.shard_manifest(shard, backup).await?;
    let chain = lockstep_repository::export::chain_of(repo, backup).await?;
    let plan = ExportedShard {
        shard_id: shard.clone(),
        base: chain[0].clone(),
        chain: chain[1..].to_vec(),
        lineage: manifest.lineage,
        legs: Vec::new(),
        target: manifest.seq,
    };
    restore_planned(repo, &plan, target, column_families, transfer, progress).await
}

/// Restores one shard as `plan` says, into `target` (absent or empty): its full base
/// staged, then the chain's WAL and the legs' segments (from `repo`'s own `wal/`) replayed
/// up to the target, on a new lineage that continues the plan's (an orphan when
/// `column_families`, unless empty, leaves some out).
pub async fn restore_planned(
    repo: &Repository,
    plan: &ExportedShard,
    target: &Path,
    column_families: &[String],
    transfer: TransferOptions,
    progress: &Progress,
) -> Result<RestoreOutcome> {
    check_target(target)?;
    let target = absolute(target)?;
    let shard = &plan.shard_id;
    let sources = crate::lineage::HistorySources {
        shard: shard.clone(),
        destinations: Vec::new(),
        repo: Some(repo.clone()),
    };
    let timeline = crate::lineage::next_timeline(plan.lineage.timeline, &sources).await?;
    let mut staged =
        stage_shard(repo, &plan.base, shard, &target, None, transfer, progress).await?;
    let engine = repo.shard_manifest(shard, &plan.base).await?.engine;
    if !plan.chain.is_empty() || plan.target > staged.seq {
        let replay = Replay {
            repo: repo.clone(),
            chain: plan.chain.clone(),
            archive: (!plan.legs.is_empty())
                .then(|| lockstep_repository::archive::WalArchive::Store(repo.clone())),
            legs: plan.legs.clone(),
            to: plan.target,
        };
        replay_with_engine(&engine, &mut staged, shard, &replay)
            .await
            .map_err(restoration_error)?;
    }
    staged.keep_column_families(column_families).await?;
    let lineage = staged.start_lineage(&plan.lineage, timeline)?;
    tracing::info!(shard = %shard, from = %plan.lineage, to = %lineage, "restore: the shard starts a new history");
    let (seq, n_files, bytes) = (staged.seq, staged.n_files, staged.bytes);
    staged.move_to(&target)?;
    Ok(RestoreOutcome {
        shard: shard.clone(),
        seq,
        n_files,
        bytes,
        target,
    })
}

/// An export file unpacked into a directory beside a restore target: a repository of its
/// own, removed when this drops.
pub struct Unpacked {
    dir: Staging,
    pub manifest: ExportManifest,
    pub repo: Repository,
}

/// Unpacks `file` (`lockstep backup export`) beside `target`, every entry checked
/// (`export::read_export`: its place in the listing, its size and its SHA-256), and opens
/// the result as a repository (an encrypted one with the passphrase a repository would
/// need). `progress` counts the file's bytes.
pub async fn unpack_export(
    file: &Path,
    target: &Path,
    shard: Option<ShardId>,
    progress: Arc<Progress>,
) -> Result<Unpacked> {
    let dir = staging_beside(target)?;
    let input = std::fs::File::open(file).map_err(|err| {
        Error::io(
            ErrorCode::InvalidArgument,
            format!("open {}", file.display()),
            err,
        )
    })?;
    if let Ok(meta) = input.metadata() {
        progress.total_bytes.store(meta.len(), Ordering::Relaxed);
    }
    let root = dir.path().to_path_buf();
    let manifest = lockstep_repository::blocking::run(move || {
        let counted = Counted {
            inner: std::io::BufReader::with_capacity(1 << 20, input),
            progress,
        };
        let mut sealed_as_stored = false;
        let manifest = lockstep_repository::export::read_export(
            counted,
            // A shard the file lacks is refused before anything is unpacked.
            |manifest| plan_of(manifest, shard.as_ref()).map(|_| ()),
            |entry, bytes| {
                sealed_as_stored |= matches!(
                    entry,
                    lockstep_repository::export::Entry::EncryptionMarker { .. }
                );
                let path = root.join(entry.name()?);
                let write = || {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&path, &bytes)
                };
                write().map_err(|err| {
                    Error::io(
                        ErrorCode::StorageUnavailable,
                        format!("unpack into {}", path.display()),
                        err,
                    )
                })
            },
        )?;
        if !sealed_as_stored && manifest.key_id.is_empty() {
            // A file from a repository older than its encryption marker: plaintext, and
            // opened so even with a passphrase set.
            let marker =
                serde_json::to_vec(&lockstep_repository::seal::EncryptionMarker::plaintext())
                    .map_err(|err| {
                        Error::with_source(ErrorCode::InvalidArgument, "encode marker", err)
                    })?;
            std::fs::write(
                root.join(lockstep_repository::layout::ENCRYPTION_MARKER),
                marker,
            )
            .map_err(|err| Error::io(ErrorCode::StorageUnavailable, "unpack the marker", err))?;
        }
        Ok::<_, Error>(manifest)
    })
    .await
    .map_err(replay_task_failed)??;
    // A plain path (`staging_beside` made it absolute): no URL parsing of its characters.
    let location = dir.path().to_str().ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "{} is not UTF-8; restore into another directory",
                dir.path().display()
            ),
        )
    })?;
    let repo = Repository::open(location).await?;
    Ok(Unpacked {
        dir,
        manifest,
        repo,
    })
}

impl Unpacked {
    /// The plan of the shard to restore: the one named, or the file's only one.
    pub fn shard(&self, shard: Option<&ShardId>) -> Result<&ExportedShard> {
        plan_of(&self.manifest, shard)
    }

    /// Where the file was unpacked (removed when this drops).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The plan in `manifest` of the shard named, or of its only shard.
fn plan_of<'a>(manifest: &'a ExportManifest, shard: Option<&ShardId>) -> Result<&'a ExportedShard> {
    let shards = &manifest.shards;
    let found = match shard {
        Some(shard) => shards.iter().find(|s| &s.shard_id == shard),
        None if shards.len() == 1 => shards.first(),
        None => {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "the file holds shards {}; pick one with --shard",
                    shards
                        .iter()
                        .map(|s| s.shard_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };
    found.ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "the file holds no shard {}",
                shard.map(|s| s.as_str()).unwrap_or_default()
            ),
        )
    })
}

/// A reader that counts what it read into a progress.
struct Counted<R> {
    inner: R,
    progress: Arc<Progress>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress
            .done_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
