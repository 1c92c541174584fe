//! What a serving agent does before it serves, in one function ([`prepare_serving`]) that the
//! `lockstep-agent serve` command and the simulations' agents both call:
//!
//! 1. set the CPU priority of background work (before any background thread starts);
//! 2. finish or undo an in-place restore that a crash interrupted (following its cluster
//!    restore's decision in the repository, deciding revert if there is none), and remove
//!    restores staged by an earlier run ([`recover_interrupted_swap`]), before the engine
//!    opens the directory;
//! 3. open the engine, or take the one that outlived its agent (the simulations);
//! 4. remove the captures an earlier run left (a capture never outlives its process): only
//!    the `lockstep-capture-*` directories, in a capture root that must not overlap the shard;
//! 5. settle the shard's lineage before it serves a write ([`crate::lineage::establish`]):
//!    a new one when the WAL destinations or the repository hold its history past it, or
//!    cannot be read;
//! 6. hold the engine in the [`EngineSlot`] the server serves.
//!
//! Everything that touches the outside world is a parameter: the priority (the simulations
//! leave it `Normal`, so a run changes nothing process-wide) and the engine. Blocking work goes
//! through `lockstep_repository::blocking`, so it runs inline, deterministically, under
//! simulation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::ValueEnum;
use lockstep_repository::repository::RestoreDecision;
use lockstep_repository::{BackupId, Error, ErrorCode, RestoreId, Result};

use crate::backup::{CAPTURE_PREFIX, check_capture_root};
use crate::engine::{EngineConfig, ShardEngine};
use crate::lineage::{HistorySources, establish, read_lineage};
use crate::participant::PlantedBug;
use crate::restore::undecided_restore;
use crate::slot::{EngineSlot, recover_interrupted_swap};

/// The CPU priority of a serving agent's background work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackgroundPriority {
    /// Uploads hash and compress at `nice` +10 and RocksDB compacts at the lowest priority,
    /// so neither delays the shard's writes or the barrier's messages.
    Low,
    /// Everything at the agent's own priority.
    Normal,
}

/// Where the serving engine comes from.
pub enum ShardSource<E> {
    /// Open the shard directory with these column families (created if missing) and settings;
    /// `low_priority_compactions` follows the background priority.
    Open {
        column_families: Vec<String>,
        config: EngineConfig,
    },
    /// An engine already open on the directory: a simulated shard outlives a crash of its
    /// agent, as RocksDB's files outlive the process.
    Running(Arc<E>),
}

/// What [`prepare_serving`] needs.
pub struct Startup<E> {
    /// The shard's directory.
    pub dir: PathBuf,
    /// Where the agent stages captures; its old captures are removed, nothing else.
    pub capture_root: PathBuf,
    pub priority: BackgroundPriority,
    pub source: ShardSource<E>,
    /// Where the shard's history was shipped and backed up.
    pub history: HistorySources,
    /// Always `None` in the binaries; see [`PlantedBug`].
    pub planted_bug: Option<PlantedBug>,
}

/// Prepares a shard for serving (see the module documentation) and returns its slot.
pub async fn prepare_serving<E: ShardEngine>(startup: Startup<E>) -> Result<Arc<EngineSlot<E>>> {
    let Startup {
        dir,
        capture_root,
        priority,
        source,
        history,
        planted_bug,
    } = startup;
    check_capture_root(&dir, &capture_root)?;
    let low = priority == BackgroundPriority::Low;
    if low {
        lockstep_repository::blocking::set_background_nice(
            lockstep_repository::blocking::LOW_PRIORITY_NICE,
        );
    }
    let decision = pending_decision(&dir, &history).await?;
    let shard_dir = dir.clone();
    let engine = lockstep_repository::blocking::run(move || -> Result<Arc<E>> {
        recover_interrupted_swap(&shard_dir, decision)?;
        match source {
            ShardSource::Open {
                column_families,
                config,
            } => {
                let config = EngineConfig {
                    low_priority_compactions: low,
                    ..config
                };
                Ok(Arc::new(E::open_with(
                    &shard_dir,
                    &column_families,
                    &config,
                )?))
            }
            ShardSource::Running(engine) => Ok(engine),
        }
    })
    .await
    .map_err(|err| Error::with_source(ErrorCode::ShardEngineFailed, "open shard", err))??;
    let removing = capture_root.clone();
    lockstep_repository::blocking::run(move || remove_old_captures(&removing))
        .await
        .map_err(|err| {
            Error::with_source(ErrorCode::ShardEngineFailed, "remove old captures", err)
        })?;
    let lineage = match (planted_bug, read_lineage(&dir)?) {
        (Some(PlantedBug::AppendAcrossFork), Some(recorded)) => recorded,
        _ => establish(&dir, engine.latest_seq(), &history).await?,
    };
    Ok(Arc::new(EngineSlot::new(dir, engine, lineage)))
}

/// The decision of the cluster restore the shard in `dir` was swapped in for and still waits
/// for, if any: the one in the repository, or `Revert`, decided here when there is none (the
/// agent that crashed with its shard swapped in can no longer commit it). Without a readable
/// repository the shard does not serve: it might be reverted everywhere else.
async fn pending_decision(dir: &Path, history: &HistorySources) -> Result<Option<RestoreDecision>> {
    let Some(restore) = undecided_restore(dir)? else {
        return Ok(None);
    };
    let unknown = |why: String| {
        Error::new(
            ErrorCode::StorageUnavailable,
            format!(
                "{} holds the shard of restore {restore}, which may still commit or revert, and {why}; the agent cannot serve until it knows",
                dir.display()
            ),
        )
    };
    let id = RestoreId::new(restore.as_str())
        .map_err(|err| unknown(format!("its id is not valid ({})", err.message)))?;
    let repo = history
        .repo
        .as_ref()
        .ok_or_else(|| unknown("no repository was given to read its decision from".into()))?;
    let by = format!("agent {} at start", history.shard);
    let decision = repo
        .decide_restore(&id, RestoreDecision::Revert, &by)
        .await
        .map_err(|err| unknown(format!("its decision cannot be read ({})", err.chain())))?;
    tracing::warn!(restore = %id, ?decision, dir = %dir.display(), "the shard was swapped in by a restore this agent did not finish; following its decision");
    Ok(Some(decision))
}

/// Removes the capture directories in `capture_root`; anything else there stays.
fn remove_old_captures(capture_root: &Path) {
    let Ok(entries) = std::fs::read_dir(capture_root) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Earlier versions named a capture by its backup id alone.
        if !name.starts_with(CAPTURE_PREFIX) && !BackupId::is_generated(&name) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), "removed a capture left by an earlier run")
            }
            Err(err) => {
                tracing::warn!(dir = %path.display(), error = %err, "could not remove an old capture")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DEFAULT_CF, MemEngine, WriteBatch};

    fn no_history() -> HistorySources {
        HistorySources {
            shard: lockstep_repository::ShardId::new("shard-0").expect("shard id"),
            destinations: Vec::new(),
            repo: None,
        }
    }

    #[tokio::test]
    async fn a_serving_shard_starts_without_the_leftovers_of_an_earlier_run() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("shard");
        let captures = root.path().join("captures");
        let old_capture = captures.join(format!("{CAPTURE_PREFIX}bk-old"));
        std::fs::create_dir_all(&old_capture).expect("mkdir");
        std::fs::write(captures.join("operator-notes.txt"), "mine").expect("write");
        let older_capture = captures.join(BackupId::generate().as_str());
        std::fs::create_dir_all(&older_capture).expect("mkdir");
        let staged = root.path().join(".shard.lockstep-restore-0123");
        std::fs::create_dir(&staged).expect("mkdir");
        let slot = prepare_serving::<MemEngine>(Startup {
            dir: dir.clone(),
            capture_root: captures.clone(),
            priority: BackgroundPriority::Normal,
            source: ShardSource::Open {
                column_families: vec!["extra".to_string()],
                config: EngineConfig::default(),
            },
            history: no_history(),
            planted_bug: None,
        })
        .await
        .expect("prepare");
        assert!(!old_capture.exists(), "old captures are removed");
        assert!(
            !older_capture.exists(),
            "captures named as earlier versions did are removed"
        );
        assert_eq!(
            std::fs::read_to_string(captures.join("operator-notes.txt")).expect("kept"),
            "mine",
            "what Lockstep did not create stays"
        );
        assert!(
            !staged.exists(),
            "restores staged by an earlier run are removed"
        );
        assert_eq!(slot.dir(), dir);
        let engine = slot.get().expect("engine");
        assert!(engine.column_families().contains(&"extra".to_string()));
    }

    #[tokio::test]
    async fn a_running_engine_is_served_as_it_is() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("shard");
        let engine = Arc::new(MemEngine::open(&dir, &[]).expect("open"));
        let mut batch = WriteBatch::new();
        batch.put(DEFAULT_CF, "k", "v");
        engine.write(&batch).expect("write");
        let slot = prepare_serving(Startup {
            dir,
            capture_root: root.path().join("captures"),
            priority: BackgroundPriority::Normal,
            source: ShardSource::Running(engine.clone()),
            history: no_history(),
            planted_bug: None,
        })
        .await
        .expect("prepare");
        let served = slot.get().expect("engine");
        assert!(
            Arc::ptr_eq(&*served, &engine),
            "the same engine, not a reopened one"
        );
        assert_eq!(served.latest_seq(), engine.latest_seq());
    }

    #[tokio::test]
    async fn a_capture_root_that_overlaps_the_shard_is_refused_and_nothing_is_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let data = root.path().join("DATA");
        let dir = data.join("shard-0");
        let engine = Arc::new(MemEngine::open(&dir, &[]).expect("open"));
        let mut batch = WriteBatch::new();
        batch.put(DEFAULT_CF, "k", "v");
        engine.write(&batch).expect("write");
        // What the live database holds on disk, and a neighbour in the same parent.
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("000001.sst"), "live").expect("write");
        std::fs::create_dir(data.join("shard-1")).expect("mkdir");
        std::os::unix::fs::symlink(&data, root.path().join("link")).expect("symlink");
        for capture_root in [
            data.clone(),
            dir.clone(),
            dir.join("captures"),
            root.path().join("link"),
            root.path().join("DATA/../DATA"),
        ] {
            let err = prepare_serving(Startup {
                dir: dir.clone(),
                capture_root: capture_root.clone(),
                priority: BackgroundPriority::Normal,
                source: ShardSource::Running(engine.clone()),
                history: no_history(),
                planted_bug: None,
            })
            .await
            .err()
            .unwrap_or_else(|| panic!("{} must be refused", capture_root.display()));
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
            assert!(err.to_string().contains("overlaps the shard"), "{err}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("000001.sst")).expect("the shard is still there"),
            "live"
        );
        assert!(data.join("shard-1").exists());
        // Beside the shard is fine.
        prepare_serving(Startup {
            dir: dir.clone(),
            capture_root: data.join("shard-0.lockstep-captures"),
            priority: BackgroundPriority::Normal,
            source: ShardSource::Running(engine),
            history: no_history(),
            planted_bug: None,
        })
        .await
        .expect("a capture root beside the shard");
    }
}
