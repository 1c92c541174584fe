//! The live shard of a serving agent, and its in-place replacement by a restore.
//!
//! `EngineSlot` holds the open engine and the directory it lives in. Every operation holds a
//! shared reference ([`EngineRef`], a read guard) for as long as it uses the engine; a restore
//! takes the exclusive side, which waits for those to end (no polling) and makes new ones fail
//! fast with "retry", then closes the engine and swaps directories:
//!
//! 1. rename the live directory aside (`.<name>.lockstep-replaced`);
//! 2. rename the staged, checked shard into place;
//! 3. open it and check its sequence number; on failure undo both renames and reopen the old
//!    shard;
//! 4. remove the replaced directory.
//!
//! A crash between 1 and 2 leaves no live directory and the replaced one beside it;
//! [`recover_interrupted_swap`] puts it back when the agent starts. A crash after 2 leaves the
//! restored shard in place and a replaced directory that the next start removes. Restores
//! staged beside the shard by a process that died are removed at start too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use lockstep_repository::{Error, ErrorCode, Result, Seq};

use crate::engine::ShardEngine;
use crate::restore::StagedShard;
use crate::timeline::{Lineage, read_lineage};

/// How long a swap waits for in-flight reads to let go of the old engine.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The open engine of a serving agent, replaceable by an in-place restore.
pub struct EngineSlot<E> {
    dir: PathBuf,
    current: Arc<RwLock<Option<Arc<E>>>>,
    /// The live shard's timeline; replaced with the shard.
    lineage: std::sync::Mutex<Lineage>,
}

/// The engine for one operation; a swap waits until every `EngineRef` is dropped.
pub type EngineRef<E> = OwnedRwLockReadGuard<Option<Arc<E>>, Arc<E>>;

fn swapping() -> Error {
    Error::new(
        ErrorCode::AgentUnavailable,
        "the shard is being replaced by a restore; retry in a moment",
    )
}

fn swap_io(what: String, err: std::io::Error) -> Error {
    Error::io(ErrorCode::BackupRestorationFailed, what, err)
}

/// The side directory a swap moves the live shard to.
fn replaced_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.lockstep-replaced"))
}

fn sync_parent(dir: &Path) {
    if let Some(parent) = dir.parent()
        && let Ok(handle) = std::fs::File::open(parent)
    {
        let _ = handle.sync_all();
    }
}

/// Finishes or undoes a swap that a crash interrupted, and removes restores staged beside
/// the shard by an earlier run (staging never survives its process); call before opening.
pub fn recover_interrupted_swap(dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging_prefix = format!(".{name}.lockstep-restore-");
    if let Some(parent) = dir.parent()
        && let Ok(entries) = std::fs::read_dir(parent)
    {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&staging_prefix)
            {
                tracing::warn!(dir = %entry.path().display(), "removing a restore staged by an earlier run");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let replaced = replaced_dir(dir);
    if !replaced.exists() {
        return Ok(());
    }
    if dir.exists() {
        tracing::warn!(dir = %replaced.display(), "removing the shard replaced by an earlier restore");
        std::fs::remove_dir_all(&replaced)
            .map_err(|err| swap_io(format!("remove {}", replaced.display()), err))?;
    } else {
        tracing::warn!(dir = %dir.display(), "an in-place restore was interrupted before the new shard was in place; reopening the old shard");
        std::fs::rename(&replaced, dir)
            .map_err(|err| swap_io(format!("move {} back", replaced.display()), err))?;
        sync_parent(dir);
    }
    Ok(())
}

impl<E: ShardEngine> EngineSlot<E> {
    /// Holds the engine open on `dir`; fails if the shard's timeline file is unreadable.
    pub fn new(dir: PathBuf, engine: Arc<E>) -> Result<EngineSlot<E>> {
        let lineage = read_lineage(&dir)?;
        Ok(EngineSlot {
            dir,
            current: Arc::new(RwLock::new(Some(engine))),
            lineage: std::sync::Mutex::new(lineage),
        })
    }

    /// The live shard's timeline.
    pub fn lineage(&self) -> Lineage {
        *self
            .lineage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The live shard's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The engine, for one operation; fails at once while a restore swaps it.
    pub fn get(&self) -> Result<EngineRef<E>> {
        let guard = self
            .current
            .clone()
            .try_read_owned()
            .map_err(|_| swapping())?;
        OwnedRwLockReadGuard::try_map(guard, |engine| engine.as_ref()).map_err(|_| swapping())
    }

    /// Takes the slot exclusively once every in-flight operation has dropped its reference.
    async fn drain(&self) -> Result<(OwnedRwLockWriteGuard<Option<Arc<E>>>, Arc<E>)> {
        let mut exclusive = tokio::time::timeout(DRAIN_TIMEOUT, self.current.clone().write_owned())
            .await
            .map_err(|_| {
                Error::new(
                    ErrorCode::BackupRestorationFailed,
                    "the live shard is still in use after 30 s; nothing was replaced",
                )
            })?;
        let engine = exclusive.take().ok_or_else(swapping)?;
        if Arc::strong_count(&engine) > 1 {
            // Someone kept the engine beyond an EngineRef; closing it now would not close it.
            *exclusive = Some(engine);
            return Err(Error::new(
                ErrorCode::BackupRestorationFailed,
                "the live shard is still referenced; nothing was replaced",
            ));
        }
        Ok((exclusive, engine))
    }

    /// Replaces the live shard by `staged`. The caller holds the write gate closed and no
    /// capture is held. On failure the old shard is open again and untouched.
    pub async fn swap_in(&self, staged: StagedShard) -> Result<Seq> {
        let (mut exclusive, old) = self.drain().await?;
        let columns = old.column_families();
        // Closing RocksDB flushes and joins its threads: blocking work.
        lockstep_repository::blocking::run(move || drop(old))
            .await
            .map_err(|err| {
                Error::with_source(ErrorCode::ShardEngineFailed, "close the live shard", err)
            })?;
        let dir = self.dir.clone();
        let swapped = lockstep_repository::blocking::run(move || swap_directories(&dir, staged))
            .await
            .map_err(|err| {
                Error::with_source(ErrorCode::BackupRestorationFailed, "swap the shard", err)
            })?;
        match swapped {
            Ok((engine, seq)) => {
                *exclusive = Some(Arc::new(engine));
                match read_lineage(&self.dir) {
                    Ok(lineage) => {
                        *self
                            .lineage
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) = lineage
                    }
                    Err(err) => {
                        tracing::error!(error = %err.chain(), "the restored shard's timeline is unreadable")
                    }
                }
                drop(exclusive);
                let replaced = replaced_dir(&self.dir);
                let removing = replaced.clone();
                let removed =
                    lockstep_repository::blocking::run(move || std::fs::remove_dir_all(&removing))
                        .await;
                if let Ok(Err(err)) = removed {
                    tracing::warn!(dir = %replaced.display(), error = %err, "could not remove the replaced shard; the next start removes it");
                }
                Ok(seq)
            }
            Err(err) => {
                let dir = self.dir.clone();
                let reopened = lockstep_repository::blocking::run(move || E::open(&dir, &columns))
                    .await
                    .map_err(|join| {
                        Error::with_source(ErrorCode::ShardEngineFailed, "reopen the shard", join)
                    })
                    .and_then(|opened| opened);
                match reopened {
                    Ok(engine) => *exclusive = Some(Arc::new(engine)),
                    Err(reopen) => {
                        tracing::error!(error = %reopen.chain(), "could not reopen the live shard after a failed restore; restart the agent");
                    }
                }
                Err(err)
            }
        }
    }
}

/// Steps 1-3 of the swap, blocking. Undoes itself on failure.
fn swap_directories<E: ShardEngine>(dir: &Path, staged: StagedShard) -> Result<(E, Seq)> {
    let replaced = replaced_dir(dir);
    let had_live = dir.exists();
    if had_live {
        std::fs::rename(dir, &replaced).map_err(|err| {
            swap_io(
                format!("move {} aside to {}", dir.display(), replaced.display()),
                err,
            )
        })?;
    }
    let undo = |err: Error| -> Error {
        if had_live {
            let _ = std::fs::remove_dir_all(dir);
            if let Err(undo) = std::fs::rename(&replaced, dir) {
                tracing::error!(dir = %dir.display(), error = %undo, "could not move the old shard back; the next start does");
            }
            sync_parent(dir);
        }
        err
    };
    let expected = staged.seq;
    let columns = staged.column_families.clone();
    if let Err(err) = staged.move_to(dir) {
        return Err(undo(err));
    }
    sync_parent(dir);
    let engine = match E::open(dir, &columns) {
        Ok(engine) => engine,
        Err(err) => return Err(undo(err.context("open the restored shard"))),
    };
    let seq = engine.latest_seq();
    if seq != expected {
        drop(engine);
        return Err(undo(Error::new(
            ErrorCode::BackupRestorationFailed,
            format!("restored shard opened at sequence {seq}, the backup says {expected}"),
        )));
    }
    Ok((engine, seq))
}

#[cfg(test)]
mod tests {
    use lockstep_repository::transfer::{Progress, TransferOptions};
    use lockstep_repository::{Repository, ShardId, Timeline};

    use super::*;
    use crate::backup::{BackupOptions, backup_offline};
    use crate::engine::{DEFAULT_CF, MemEngine, WriteBatch};
    use crate::restore::stage_shard;

    fn put<E: ShardEngine>(engine: &E, key: &str) {
        let mut batch = WriteBatch::new();
        batch.put(DEFAULT_CF, key, "v");
        engine.write(&batch).expect("write");
    }

    /// Backs up `engine` (holding `k1`) into `repo` and stages that backup beside `live`.
    async fn staged_backup<E: ShardEngine>(
        engine: &Arc<E>,
        root: &Path,
        repo: &Repository,
        live: &Path,
    ) -> StagedShard {
        let shard = ShardId::new("s1").expect("shard id");
        let options = BackupOptions {
            capture_root: root.join("captures"),
            transfer: TransferOptions::default(),
        };
        let manifest = backup_offline(
            engine,
            repo,
            &shard,
            &options,
            Timeline::default(),
            &Progress::default(),
        )
        .await
        .expect("backup");
        stage_shard(
            repo,
            &manifest.backup_id,
            &shard,
            live,
            None,
            TransferOptions::default(),
            &Progress::default(),
        )
        .await
        .expect("stage")
    }

    async fn swap_in_replaces_the_live_shard_with_the_staged_one<E: ShardEngine>() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = root.path().join("db");
        let repo = Repository::open("memory://").await.expect("repo");
        let engine = Arc::new(E::open(&live, &[]).expect("open"));
        put(engine.as_ref(), "k1");
        let at_backup = engine.latest_seq();
        let staged = staged_backup(&engine, root.path(), &repo, &live).await;
        put(engine.as_ref(), "k2");

        let slot = EngineSlot::new(live.clone(), engine).expect("slot");
        let seq = slot.swap_in(staged).await.expect("swap");
        assert_eq!(seq, at_backup);
        let engine = slot.get().expect("engine back in the slot");
        assert!(engine.get(DEFAULT_CF, b"k1").expect("get").is_some());
        assert!(engine.get(DEFAULT_CF, b"k2").expect("get").is_none());
        assert!(!replaced_dir(&live).exists());
        put(engine.as_ref(), "k3");
        assert_eq!(engine.latest_seq(), Seq(at_backup.0 + 1));
    }

    #[cfg(feature = "rocksdb")]
    #[tokio::test]
    async fn swap_in_replaces_a_rocksdb_shard() {
        swap_in_replaces_the_live_shard_with_the_staged_one::<crate::engine::RocksEngine>().await;
    }

    #[tokio::test]
    async fn swap_in_replaces_a_memory_shard() {
        swap_in_replaces_the_live_shard_with_the_staged_one::<MemEngine>().await;
    }

    #[cfg(feature = "rocksdb")]
    #[tokio::test]
    async fn a_swap_that_cannot_open_the_staged_shard_keeps_the_live_one() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = root.path().join("db");
        let repo = Repository::open("memory://").await.expect("repo");
        // A MemEngine shard staged into a RocksDB slot: RocksDB opens an empty database there,
        // at the wrong sequence number, so the swap must undo itself.
        let model = Arc::new(MemEngine::open(&root.path().join("model"), &[]).expect("model"));
        put(model.as_ref(), "k1");
        put(model.as_ref(), "k1");
        let staged = staged_backup(&model, root.path(), &repo, &live).await;

        let engine = Arc::new(crate::engine::RocksEngine::open(&live, &[]).expect("open"));
        put(engine.as_ref(), "live");
        let before = engine.latest_seq();
        let slot = EngineSlot::new(live.clone(), engine).expect("slot");
        let err = slot.swap_in(staged).await.expect_err("swap must fail");
        assert_eq!(err.code, ErrorCode::BackupRestorationFailed, "{err}");
        let engine = slot.get().expect("the live shard is open again");
        assert_eq!(engine.latest_seq(), before);
        assert!(engine.get(DEFAULT_CF, b"live").expect("get").is_some());
        assert!(!replaced_dir(&live).exists());
    }

    #[test]
    fn an_interrupted_swap_is_undone_or_finished_at_start() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = root.path().join("db");
        let replaced = replaced_dir(&live);
        // Crash between the two renames: only the replaced directory exists.
        std::fs::create_dir(&replaced).expect("mkdir");
        std::fs::write(replaced.join("CURRENT"), "old").expect("write");
        recover_interrupted_swap(&live).expect("recover");
        assert_eq!(
            std::fs::read_to_string(live.join("CURRENT")).expect("read"),
            "old"
        );
        assert!(!replaced.exists());
        // Crash after the second rename: the new shard is live, the old one is garbage.
        std::fs::create_dir(&replaced).expect("mkdir");
        recover_interrupted_swap(&live).expect("recover");
        assert!(live.exists() && !replaced.exists());
        recover_interrupted_swap(&live).expect("nothing to do");
        // A restore staged by a run that died is removed.
        let staging = root.path().join(".db.lockstep-restore-0123");
        std::fs::create_dir(&staging).expect("mkdir");
        recover_interrupted_swap(&live).expect("recover");
        assert!(!staging.exists());
    }
}
