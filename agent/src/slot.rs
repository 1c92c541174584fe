//! The live shard of a serving agent, and its in-place replacement by a restore.
//!
//! `EngineSlot` holds the open engine and the directory it lives in. Every operation holds a
//! shared reference ([`EngineRef`], a read guard) for as long as it uses the engine; a restore
//! takes the exclusive side, which waits for those to end (no polling) and makes new ones fail
//! fast with "retry", then closes the engine and swaps directories:
//!
//! 1. rename the live directory aside (`.<name>.lockstep-replaced`);
//! 2. rename the staged shard, already marked complete ([`COMPLETE_FILE`]) and, for a cluster
//!    restore, undecided ([`UNDECIDED_FILE`]), into place;
//! 3. open it and check its sequence number.
//!
//! The swap then holds ([`SwappedIn`]): the slot stays exclusive, so nothing reads or writes
//! the restored shard, until the restore's decision. [`EngineSlot::commit`] removes the
//! undecided mark, durably, lets operations in, and removes the replaced directory;
//! [`EngineSlot::revert`] puts the old shard back as a failed swap does.
//!
//! If 2 or 3 fails, or on revert, the swap undoes itself without deleting the old shard
//! first: remove the restored shard's mark, rename it aside (`.<name>.lockstep-discarded`),
//! rename the old shard back, and only then remove the discarded one.
//!
//! [`recover_interrupted_swap`] finishes or undoes a swap a crash interrupted, at start. The
//! rule: the replaced (old) shard is removed only when the live directory is a complete
//! restored shard that is committed (no undecided mark, or its restore decided commit);
//! anything else at the live path (nothing, an empty directory a supervisor created, a
//! restored shard whose undo began or whose restore reverts) is moved aside and the old shard
//! moved back. Restores staged and swaps discarded by a process that died are removed too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use lockstep_repository::repository::RestoreDecision;
use lockstep_repository::{Error, ErrorCode, Lineage, Result, Seq};

use crate::engine::ShardEngine;
use crate::lineage::write_lineage;
use crate::restore::{
    COMPLETE_FILE, StagedShard, is_complete_restore, mark_committed, undecided_restore,
};

/// How long a swap waits for in-flight reads to let go of the old engine.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The open engine of a serving agent, replaceable by an in-place restore.
pub struct EngineSlot<E> {
    dir: PathBuf,
    current: Arc<RwLock<Option<Arc<E>>>>,
    /// The live shard's lineage; replaced with the shard.
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

/// A directory beside the shard: `.<name>.lockstep-<what>`.
fn side_dir(dir: &Path, what: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.lockstep-{what}"))
}

/// Where a swap moves the live shard while the restored one goes in.
fn replaced_dir(dir: &Path) -> PathBuf {
    side_dir(dir, "replaced")
}

/// Where a swap that undoes itself moves what it had put in place, before removing it.
fn discarded_dir(dir: &Path) -> PathBuf {
    side_dir(dir, "discarded")
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
/// `decision` is the decision of the restore the live shard waits for
/// ([`undecided_restore`]), which the caller reads (or makes) in the repository first.
pub fn recover_interrupted_swap(dir: &Path, decision: Option<RestoreDecision>) -> Result<()> {
    let staging_prefix = side_dir(dir, "restore-");
    let staging_prefix = staging_prefix
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
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
    let undecided = undecided_restore(dir)?;
    if let Some(restore) = &undecided
        && decision.is_none()
    {
        return Err(Error::new(
            ErrorCode::BackupRestorationFailed,
            format!(
                "{} holds the shard of restore {restore}, whose decision is not known",
                dir.display()
            ),
        ));
    }
    let committed = undecided.is_none() || decision == Some(RestoreDecision::Commit);
    let replaced = replaced_dir(dir);
    if replaced.exists() {
        if is_complete_restore(dir) && committed {
            tracing::warn!(dir = %replaced.display(), "an in-place restore was interrupted after it committed; removing the shard it replaced");
            mark_committed(dir)?;
            remove(&replaced)?;
        } else {
            tracing::warn!(dir = %dir.display(), "an in-place restore was interrupted before it committed; putting the old shard back");
            put_back(dir)?;
        }
    } else if let Some(restore) = undecided {
        if !committed {
            return Err(Error::new(
                ErrorCode::BackupRestorationFailed,
                format!(
                    "{} holds the shard of restore {restore}, whose decision is to revert, and no shard it replaced: remove the directory, or restore again",
                    dir.display()
                ),
            ));
        }
        mark_committed(dir)?;
    }
    let discarded = discarded_dir(dir);
    if discarded.exists() {
        remove(&discarded)?;
    }
    Ok(())
}

fn remove(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(swap_io(format!("remove {}", dir.display()), err))
        }
        _ => Ok(()),
    }
}

/// Moves whatever is at `dir` aside (to the discarded directory) and the replaced shard back
/// into place. Deletes nothing: the caller removes the discarded directory.
fn put_back(dir: &Path) -> Result<()> {
    let discarded = discarded_dir(dir);
    if dir.exists() {
        remove(&discarded)?;
        std::fs::rename(dir, &discarded).map_err(|err| {
            swap_io(
                format!("move {} aside to {}", dir.display(), discarded.display()),
                err,
            )
        })?;
    }
    reached(SwapPoint::Discarded)?;
    let replaced = replaced_dir(dir);
    std::fs::rename(&replaced, dir)
        .map_err(|err| swap_io(format!("move {} back", replaced.display()), err))?;
    sync_parent(dir);
    Ok(())
}

impl<E: ShardEngine> EngineSlot<E> {
    /// Holds the engine open on `dir`, whose history is `lineage` (`lineage::establish`).
    pub fn new(dir: PathBuf, engine: Arc<E>, lineage: Lineage) -> EngineSlot<E> {
        EngineSlot {
            dir,
            current: Arc::new(RwLock::new(Some(engine))),
            lineage: std::sync::Mutex::new(lineage),
        }
    }

    /// Moves the live shard from history `from` to `to`, durably, from now on; does nothing
    /// (returns false) when the shard is no longer on `from` (a restore replaced it).
    pub fn fork(&self, from: &Lineage, to: Lineage) -> Result<bool> {
        // Holding the engine keeps a swap, which replaces the directory and its lineage, out.
        let _engine = self.get()?;
        let mut current = self
            .lineage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.id != from.id {
            return Ok(false);
        }
        write_lineage(&self.dir, &to)?;
        *current = to;
        Ok(true)
    }

    /// The live shard's lineage.
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

    /// The engine with the lineage its writes are on, read together: a swap replaces both
    /// while it holds the slot exclusively, so they cannot belong to two shards.
    pub fn get_with_lineage(&self) -> Result<(EngineRef<E>, Lineage)> {
        let engine = self.get()?;
        Ok((engine, self.lineage()))
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

    /// Swaps `staged` in for the live shard and opens it at its sequence number; the result
    /// holds until [`EngineSlot::commit`] or [`EngineSlot::revert`]. The caller holds the
    /// write gate closed and no capture is held. On failure the old shard is open again and
    /// untouched, unless it could not be put back: then the slot stays empty (every operation
    /// fails "retry") until the agent restarts and its start-up puts it back.
    pub async fn swap_in(&self, staged: StagedShard) -> Result<SwappedIn<E>> {
        // Without its own lineage the restored shard would serve, ship and back up as the
        // history it replaced.
        let lineage = staged.lineage.ok_or_else(|| {
            Error::new(
                ErrorCode::BackupRestorationFailed,
                "the staged shard has no lineage of its own; nothing was replaced",
            )
        })?;
        let (mut exclusive, old) = self.drain().await?;
        let (columns, old_seq) = (old.column_families(), old.latest_seq());
        close_engine(old).await?;
        let dir = self.dir.clone();
        let swapped = lockstep_repository::blocking::run(move || swap_directories(&dir, staged))
            .await
            .map_err(|err| {
                Error::with_source(ErrorCode::BackupRestorationFailed, "swap the shard", err)
            })?;
        match swapped {
            Ok((engine, seq, had_live)) => {
                *exclusive = Some(Arc::new(engine));
                Ok(SwappedIn {
                    exclusive,
                    lineage,
                    columns,
                    old_seq,
                    had_live,
                    seq,
                })
            }
            Err(SwapFailed {
                error,
                old_in_place: false,
            }) => {
                // The old shard is not back in place (the undo failed part-way): opening the
                // path now would serve the wrong shard, or create an empty one. The slot stays
                // empty until the agent restarts and its start-up settles the directories.
                tracing::error!(dir = %self.dir.display(), error = %error.chain(), "a failed restore could not put the old shard back; restart the agent");
                Err(error)
            }
            Err(SwapFailed { error, .. }) => {
                self.reopen_old(&mut exclusive, columns, old_seq).await;
                Err(error)
            }
        }
    }

    /// The restore committed: the restored shard serves, on its own history, and the shard
    /// it replaced is removed. If the undecided mark cannot be removed, nothing changed and
    /// the swap is handed back.
    pub async fn commit(
        &self,
        swapped: SwappedIn<E>,
    ) -> std::result::Result<(), (SwappedIn<E>, Error)> {
        let dir = self.dir.clone();
        let marked = lockstep_repository::blocking::run(move || mark_committed(&dir))
            .await
            .map_err(|err| {
                Error::with_source(ErrorCode::BackupRestorationFailed, "commit the swap", err)
            })
            .and_then(|marked| marked);
        if let Err(err) = marked {
            return Err((swapped, err));
        }
        *self
            .lineage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = swapped.lineage;
        drop(swapped.exclusive);
        let replaced = replaced_dir(&self.dir);
        let removing = replaced.clone();
        let removed =
            lockstep_repository::blocking::run(move || std::fs::remove_dir_all(&removing)).await;
        if let Ok(Err(err)) = removed {
            tracing::warn!(dir = %replaced.display(), error = %err, "could not remove the replaced shard; the next start removes it");
        }
        Ok(())
    }

    /// The restore reverted: the restored shard is moved aside and removed, and the old one
    /// serves again, as it was. If it cannot be put back the slot stays empty until the agent
    /// restarts (its start-up puts it back).
    pub async fn revert(&self, swapped: SwappedIn<E>) -> Result<()> {
        let SwappedIn {
            mut exclusive,
            columns,
            old_seq,
            had_live,
            ..
        } = swapped;
        if let Some(restored) = exclusive.take() {
            close_engine(restored).await?;
        }
        let dir = self.dir.clone();
        let undone = lockstep_repository::blocking::run(move || undo_swap(&dir, had_live))
            .await
            .map_err(|err| {
                Error::with_source(ErrorCode::BackupRestorationFailed, "revert the swap", err)
            })
            .and_then(|undone| undone);
        if let Err(err) = undone {
            tracing::error!(dir = %self.dir.display(), error = %err.chain(), "a reverted restore could not put the old shard back; restart the agent");
            return Err(err);
        }
        self.reopen_old(&mut exclusive, columns, old_seq).await;
        match exclusive.as_ref() {
            Some(_) => Ok(()),
            None => Err(Error::new(
                ErrorCode::ShardEngineFailed,
                "the old shard is back in place but did not reopen; restart the agent",
            )),
        }
    }

    /// The process is ending with `swapped` undecided: the restored engine is closed (synced
    /// first) and the slot stays empty, every operation failing "retry", so nothing serves a
    /// shard that may still revert. The next start settles it by the restore's decision.
    pub fn abandon(&self, swapped: SwappedIn<E>) {
        let SwappedIn { mut exclusive, .. } = swapped;
        if let Some(restored) = exclusive.take() {
            if let Err(err) = restored.sync() {
                tracing::warn!(error = %err.chain(), "could not sync the restored shard before closing it");
            }
            drop(restored);
        }
    }

    /// Reopens the old shard, back in place after a failed or reverted swap, into the slot.
    async fn reopen_old(
        &self,
        exclusive: &mut OwnedRwLockWriteGuard<Option<Arc<E>>>,
        columns: Vec<String>,
        old_seq: Seq,
    ) {
        let dir = self.dir.clone();
        let reopened = lockstep_repository::blocking::run(move || E::open(&dir, &columns))
            .await
            .map_err(|join| {
                Error::with_source(ErrorCode::ShardEngineFailed, "reopen the shard", join)
            })
            .and_then(|opened| opened);
        match reopened {
            Ok(engine) if engine.latest_seq() == old_seq => **exclusive = Some(Arc::new(engine)),
            Ok(engine) => {
                tracing::error!(seq = %engine.latest_seq(), expected = %old_seq, "the old shard reopened at another sequence number; restart the agent");
            }
            Err(reopen) => {
                tracing::error!(error = %reopen.chain(), "could not reopen the live shard after a failed restore; restart the agent");
            }
        }
    }
}

/// Closes an engine nothing else holds, its writes synced first (a reopen checks it finds
/// them all); closing RocksDB flushes and joins its threads.
async fn close_engine<E: ShardEngine>(engine: Arc<E>) -> Result<()> {
    lockstep_repository::blocking::run(move || {
        if let Err(err) = engine.sync() {
            tracing::warn!(error = %err.chain(), "could not sync the shard before closing it");
        }
        drop(engine)
    })
    .await
    .map_err(|err| Error::with_source(ErrorCode::ShardEngineFailed, "close the shard", err))
}

/// A restored shard swapped in and open, not yet committed (see the module documentation).
/// It holds the slot exclusively, so no operation reaches either shard until
/// [`EngineSlot::commit`], [`EngineSlot::revert`] or [`EngineSlot::abandon`] takes it.
/// Dropped, it lets operations in on the restored shard while it stays undecided on disk:
/// always pass it to one of them.
pub struct SwappedIn<E> {
    exclusive: OwnedRwLockWriteGuard<Option<Arc<E>>>,
    /// The restored shard's history: the slot's once committed.
    lineage: Lineage,
    /// The old shard's column families and sequence number, to reopen it on revert.
    columns: Vec<String>,
    old_seq: Seq,
    had_live: bool,
    /// The restored shard's sequence number.
    pub seq: Seq,
}

impl<E> std::fmt::Debug for SwappedIn<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwappedIn")
            .field("lineage", &self.lineage)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// The points of a swap where a crash leaves something for [`recover_interrupted_swap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SwapPoint {
    /// The live shard is renamed aside.
    MovedAside,
    /// The restored shard is in place, not yet opened.
    MovedIn,
    /// The restored shard opened at the right sequence number; the old one is not removed.
    Checked,
    /// Undo: the restored shard's mark is removed.
    Unmarked,
    /// Undo: the restored shard is renamed aside.
    Discarded,
    /// Undo: the old shard is back in place; the discarded one is not removed.
    MovedBack,
}

#[cfg(test)]
thread_local! {
    /// The fault hook: the tests stop a swap at a point as if the process died there.
    static CRASH_AT: std::cell::Cell<Option<SwapPoint>> = const { std::cell::Cell::new(None) };
}

/// Passes `point`, or under the fault hook stops there with nothing undone.
fn reached(point: SwapPoint) -> Result<()> {
    #[cfg(test)]
    if CRASH_AT.with(|at| at.get()) == Some(point) {
        return Err(Error::new(
            ErrorCode::BackupRestorationFailed,
            format!("the test crashed the swap at {point:?}"),
        ));
    }
    let _ = point;
    Ok(())
}

/// A swap that failed, and whether the old shard is in place again (else the agent must not
/// open the path until its start-up has settled the directories).
#[derive(Debug)]
struct SwapFailed {
    error: Error,
    old_in_place: bool,
}

impl From<Error> for SwapFailed {
    /// A failure past the first rename that nothing undid: the fault hook's crash.
    fn from(error: Error) -> SwapFailed {
        SwapFailed {
            error,
            old_in_place: false,
        }
    }
}

impl std::fmt::Display for SwapFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Steps 1-3 of the swap, blocking. Undoes itself on failure.
fn swap_directories<E: ShardEngine>(
    dir: &Path,
    staged: StagedShard,
) -> std::result::Result<(E, Seq, bool), SwapFailed> {
    let replaced = replaced_dir(dir);
    let had_live = dir.exists();
    if had_live {
        // A replaced directory left by an earlier swap whose clean-up failed: the live shard
        // is the complete, committed restored one, so it is garbage (as at start).
        if replaced.exists()
            && is_complete_restore(dir)
            && matches!(undecided_restore(dir), Ok(None))
        {
            remove(&replaced).map_err(|error| SwapFailed {
                error,
                old_in_place: true,
            })?;
        }
        std::fs::rename(dir, &replaced).map_err(|err| SwapFailed {
            error: swap_io(
                format!("move {} aside to {}", dir.display(), replaced.display()),
                err,
            ),
            old_in_place: true,
        })?;
        sync_parent(dir);
    }
    reached(SwapPoint::MovedAside)?;
    let expected = staged.seq;
    let columns = staged.column_families.clone();
    let moved = staged.move_to(dir);
    if moved.is_ok() {
        reached(SwapPoint::MovedIn)?;
    }
    let checked = moved
        .and_then(|()| E::open(dir, &columns).map_err(|err| err.context("open the restored shard")))
        .and_then(|engine| {
            let seq = engine.latest_seq();
            if seq != expected {
                return Err(Error::new(
                    ErrorCode::BackupRestorationFailed,
                    format!("restored shard opened at sequence {seq}, the backup says {expected}"),
                ));
            }
            Ok((engine, seq))
        });
    match checked {
        Ok((engine, seq)) => {
            reached(SwapPoint::Checked)?;
            Ok((engine, seq, had_live))
        }
        Err(err) => match undo_swap(dir, had_live) {
            Ok(()) => Err(SwapFailed {
                error: err,
                old_in_place: true,
            }),
            Err(undo) => {
                tracing::error!(dir = %dir.display(), error = %undo.chain(), "could not put the old shard back; the next start does");
                Err(SwapFailed {
                    error: Error {
                        message: format!(
                            "{}; the old shard is not back in place yet ({})",
                            err.message,
                            undo.chain()
                        ),
                        ..err
                    },
                    old_in_place: false,
                })
            }
        },
    }
}

/// Undoes a swap whose restored shard failed: unmark it (so a crash from here on puts the old
/// shard back at start), rename it aside, rename the old shard back, then remove it. An unmark
/// that fails does not stop the renames, which take the marked shard off the live path.
fn undo_swap(dir: &Path, had_live: bool) -> Result<()> {
    match std::fs::remove_file(dir.join(COMPLETE_FILE)) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            tracing::error!(dir = %dir.display(), error = %err, "could not unmark the failed restored shard; moving it aside anyway");
        }
        _ => {}
    }
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
    reached(SwapPoint::Unmarked)?;
    if had_live {
        put_back(dir)?;
    } else if dir.exists() {
        std::fs::rename(dir, discarded_dir(dir))
            .map_err(|err| swap_io(format!("move {} aside", dir.display()), err))?;
    }
    reached(SwapPoint::MovedBack)?;
    remove(&discarded_dir(dir))
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
            min_free_bytes: 0,
        };
        let manifest = backup_offline(
            engine,
            repo,
            &shard,
            &options,
            Lineage::root(),
            &Progress::default(),
        )
        .await
        .expect("backup");
        let mut staged = stage_shard(
            repo,
            &manifest.backup_id,
            &shard,
            live,
            None,
            TransferOptions::default(),
            &Progress::default(),
        )
        .await
        .expect("stage");
        staged
            .start_lineage(&Lineage::root(), Timeline(2))
            .expect("lineage");
        staged
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

        let old = Lineage::root();
        let slot = EngineSlot::new(live.clone(), engine, old);
        let restored = staged.lineage;
        let swapped = slot.swap_in(staged).await.expect("swap");
        assert_eq!(swapped.seq, at_backup);
        assert!(
            slot.get().is_err(),
            "nothing reaches the shard before commit"
        );
        assert_eq!(slot.lineage(), old, "not yet the restored history");
        slot.commit(swapped).await.expect("commit");
        assert_eq!(
            Some(slot.lineage()),
            restored,
            "the restored shard's own history"
        );
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

    async fn a_reverted_swap_serves_the_old_shard_as_it_was<E: ShardEngine>() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = root.path().join("db");
        let repo = Repository::open("memory://").await.expect("repo");
        let engine = Arc::new(E::open(&live, &[]).expect("open"));
        put(engine.as_ref(), "k1");
        let mut staged = staged_backup(&engine, root.path(), &repo, &live).await;
        staged.undecided = Some("rs-1".into());
        put(engine.as_ref(), "k2");
        let before = engine.latest_seq();

        let old = Lineage::root();
        let slot = EngineSlot::new(live.clone(), engine, old);
        let swapped = slot.swap_in(staged).await.expect("swap");
        assert_eq!(
            undecided_restore(&live).expect("read").as_deref(),
            Some("rs-1")
        );
        slot.revert(swapped).await.expect("revert");
        assert_eq!(slot.lineage(), old);
        let engine = slot.get().expect("the old shard serves");
        assert_eq!(engine.latest_seq(), before);
        assert!(engine.get(DEFAULT_CF, b"k2").expect("get").is_some());
        assert!(!is_complete_restore(&live));
        assert_eq!(leftovers(&live), Vec::<String>::new());
    }

    #[cfg(feature = "rocksdb")]
    #[tokio::test]
    async fn a_reverted_swap_serves_the_old_rocksdb_shard() {
        a_reverted_swap_serves_the_old_shard_as_it_was::<crate::engine::RocksEngine>().await;
    }

    #[tokio::test]
    async fn a_reverted_swap_serves_the_old_memory_shard() {
        a_reverted_swap_serves_the_old_shard_as_it_was::<MemEngine>().await;
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
        let slot = EngineSlot::new(live.clone(), engine, Lineage::root());
        let err = slot.swap_in(staged).await.expect_err("swap must fail");
        assert_eq!(err.code, ErrorCode::BackupRestorationFailed, "{err}");
        let engine = slot.get().expect("the live shard is open again");
        assert_eq!(engine.latest_seq(), before);
        assert!(engine.get(DEFAULT_CF, b"live").expect("get").is_some());
        assert!(!replaced_dir(&live).exists());
    }

    /// A live shard holding `old` (restored earlier, so marked complete, or never restored)
    /// and, staged beside it, a backup holding `new`.
    async fn live_and_staged(root: &Path, old_was_restored: bool) -> (PathBuf, StagedShard) {
        let live = root.join("db");
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().replace('.', ""));
        let repo = Repository::open(&format!("memory://slot{}", name.unwrap_or_default()))
            .await
            .expect("repo");
        let old = Arc::new(MemEngine::open(&root.join("old"), &[]).expect("old"));
        put(old.as_ref(), "old");
        staged_backup(&old, root, &repo, &live)
            .await
            .move_to(&live)
            .expect("the old shard in place");
        if !old_was_restored {
            std::fs::remove_file(live.join(COMPLETE_FILE)).expect("unmark");
        }
        let new = Arc::new(MemEngine::open(&root.join("new"), &[]).expect("new"));
        put(new.as_ref(), "new");
        let staged = staged_backup(&new, root, &repo, &live).await;
        (live, staged)
    }

    /// Which shard is live after the agent starts again, its restore's decision (if it
    /// waits for one) being `decision`: "old" or "new".
    fn live_shard(live: &Path, decision: RestoreDecision) -> &'static str {
        let decision = undecided_restore(live).expect("read").map(|_| decision);
        recover_interrupted_swap(live, decision).expect("recover");
        let engine = MemEngine::open(live, &[]).expect("open the live shard");
        let has = |key: &str| {
            engine
                .get(DEFAULT_CF, key.as_bytes())
                .expect("get")
                .is_some()
        };
        match (has("old"), has("new")) {
            (true, false) => "old",
            (false, true) => "new",
            other => panic!("the live shard is neither: {other:?}"),
        }
    }

    fn leftovers(live: &Path) -> Vec<String> {
        std::fs::read_dir(live.parent().expect("parent"))
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".db."))
            .collect()
    }

    #[tokio::test]
    async fn a_crash_at_any_point_of_a_swap_leaves_one_complete_shard_at_start() {
        use RestoreDecision::{Commit, Revert};
        use SwapPoint::*;
        // (where the process dies, whether the swap was failing and undoing itself, the
        // shard live after the next start: alone, in a cluster restore that commits, in one
        // that reverts)
        let cases = [
            (MovedAside, false, ["old", "old", "old"]),
            (MovedIn, false, ["new", "new", "old"]),
            (Checked, false, ["new", "new", "old"]),
            (Unmarked, true, ["old", "old", "old"]),
            (Discarded, true, ["old", "old", "old"]),
            (MovedBack, true, ["old", "old", "old"]),
        ];
        for (point, failing, expected) in cases {
            for (decision, expected) in [
                (None, expected[0]),
                (Some(Commit), expected[1]),
                (Some(Revert), expected[2]),
            ] {
                for old_was_restored in [false, true] {
                    for supervisor_mkdir in [false, true] {
                        let root = tempfile::tempdir().expect("tempdir");
                        let (live, mut staged) =
                            live_and_staged(root.path(), old_was_restored).await;
                        if failing {
                            staged.seq = Seq(staged.seq.0 + 7);
                        }
                        if decision.is_some() {
                            staged.undecided = Some("rs-1".into());
                        }
                        CRASH_AT.with(|at| at.set(Some(point)));
                        let crashed = swap_directories::<MemEngine>(&live, staged);
                        CRASH_AT.with(|at| at.set(None));
                        let err = crashed.err().expect("the swap stopped at the crash");
                        assert!(err.to_string().contains("crashed"), "{point:?}: {err}");
                        // A supervisor's `mkdir -p` of the shard path before the agent restarts.
                        std::fs::create_dir_all(&live).expect("mkdir -p");
                        if !supervisor_mkdir
                            && std::fs::read_dir(&live).expect("ls").next().is_none()
                        {
                            std::fs::remove_dir(&live).expect("rmdir");
                        }
                        let case = format!(
                            "crash at {point:?}, decision {decision:?}, old shard restored before: {old_was_restored}, mkdir -p: {supervisor_mkdir}"
                        );
                        assert_eq!(
                            live_shard(&live, decision.unwrap_or(Revert)),
                            expected,
                            "{case}"
                        );
                        assert_eq!(leftovers(&live), Vec::<String>::new(), "{case}");
                        assert_eq!(undecided_restore(&live).expect("read"), None, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_reverted_restore_with_no_shard_to_put_back_refuses_to_serve() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = root.path().join("db");
        std::fs::create_dir(&live).expect("mkdir");
        std::fs::write(live.join(COMPLETE_FILE), "5\n").expect("mark");
        std::fs::write(live.join(crate::restore::UNDECIDED_FILE), "rs-1\n").expect("mark");
        let err = recover_interrupted_swap(&live, None).expect_err("undecided");
        assert!(err.message.contains("not known"), "{err}");
        let err =
            recover_interrupted_swap(&live, Some(RestoreDecision::Revert)).expect_err("reverted");
        assert!(err.message.contains("decision is to revert"), "{err}");
        assert!(live.join(COMPLETE_FILE).exists(), "nothing is deleted");
        recover_interrupted_swap(&live, Some(RestoreDecision::Commit)).expect("committed");
        assert_eq!(undecided_restore(&live).expect("read"), None);
    }

    #[tokio::test]
    async fn a_failed_swap_puts_the_old_shard_back_and_leaves_nothing_beside_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let (live, mut staged) = live_and_staged(root.path(), false).await;
        staged.seq = Seq(staged.seq.0 + 7);
        let err = swap_directories::<MemEngine>(&live, staged)
            .err()
            .expect("a wrong sequence number fails the swap");
        assert!(err.to_string().contains("opened at sequence"), "{err}");
        assert!(
            !is_complete_restore(&live),
            "the failed shard's mark is not on the old one"
        );
        assert_eq!(leftovers(&live), Vec::<String>::new());
        assert_eq!(live_shard(&live, RestoreDecision::Revert), "old");
    }

    #[tokio::test]
    async fn a_replaced_shard_left_by_an_earlier_swap_does_not_block_the_next() {
        let root = tempfile::tempdir().expect("tempdir");
        // The live shard was restored (marked); removing the shard it replaced had failed.
        let (live, staged) = live_and_staged(root.path(), true).await;
        std::fs::create_dir(replaced_dir(&live)).expect("mkdir");
        std::fs::write(replaced_dir(&live).join("CURRENT"), "stale").expect("write");
        swap_directories::<MemEngine>(&live, staged)
            .map(drop)
            .map_err(|failed| failed.to_string())
            .expect("the swap goes through");
        assert_eq!(live_shard(&live, RestoreDecision::Revert), "new");
    }

    #[test]
    fn restores_staged_and_swaps_discarded_by_an_earlier_run_are_removed_at_start() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = root.path().join("db");
        std::fs::create_dir(&live).expect("mkdir");
        for name in [".db.lockstep-restore-0123", ".db.lockstep-discarded"] {
            std::fs::create_dir(root.path().join(name)).expect("mkdir");
        }
        recover_interrupted_swap(&live, None).expect("recover");
        assert_eq!(leftovers(&live), Vec::<String>::new());
        assert!(live.exists());
        recover_interrupted_swap(&live, None).expect("nothing to do");
    }
}
