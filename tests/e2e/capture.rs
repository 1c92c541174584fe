//! Flushes and compactions while a capture is being uploaded do not break the backup, file
//! deletions stay frozen while the capture lives, and they resume once it is released.

use std::collections::HashSet;

use chrono::Utc;
use lockstep_agent::WriteGate;
use lockstep_agent::backup::{
    CaptureMode, capture_shard, close_gate, stage_capture, upload_capture,
};
use lockstep_agent::engine::{ShardEngine, WriteBatch};
use lockstep_repository::manifest::{BackupKind, BackupManifest};
use lockstep_repository::transfer::{Progress, TransferOptions};
use lockstep_repository::{BackupId, Lineage, Repository, ShardId};
use tokio_util::sync::CancellationToken;

use crate::model::{Shard, restore_exactly};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_and_compactions_during_upload_do_not_break_the_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_dir = dir.path().join("db");
    let repo = Repository::open(&format!("file://{}", dir.path().join("repo").display()))
        .await
        .expect("repo");
    let shard_id = ShardId::new("shard-0").expect("id");
    let backup_id = BackupId::generate();
    let mut shard = Shard::open(&db_dir, 7);
    for _ in 0..3 {
        shard.workload(20_000, 40_000);
        shard.engine.flush().expect("flush");
    }
    shard.workload(5_000, 40_000);
    let gate = WriteGate::new();
    let started_at = Utc::now();

    let captured = capture_shard(
        &shard.engine,
        &gate,
        dir.path().join("captures").join(backup_id.as_str()),
        Lineage::root(),
    )
    .await
    .expect("capture");
    let model_at_capture = shard.model.clone();
    let seq_at_capture = captured.seq;
    let live_before: HashSet<String> = shard
        .engine
        .live_sst_files()
        .expect("live")
        .into_iter()
        .collect();

    // Between capture and upload: more writes, a flush and a full compaction, which make
    // every SST file of the capture obsolete in the live shard.
    shard.workload(20_000, 40_000);
    shard.engine.flush().expect("flush");
    shard.engine.compact().expect("compact");
    let live_after: HashSet<String> = shard
        .engine
        .live_sst_files()
        .expect("live")
        .into_iter()
        .collect();
    let obsolete: Vec<&String> = live_before.difference(&live_after).collect();
    assert!(
        !obsolete.is_empty(),
        "the compaction replaced captured SST files"
    );
    for name in &obsolete {
        assert!(
            db_dir.join(name).exists(),
            "{name} was deleted while file deletions were frozen"
        );
    }

    // During the upload: writes, flushes and compactions keep running on another thread.
    let engine = shard.engine.clone();
    let background = tokio::task::spawn_blocking(move || {
        for round in 0..5u32 {
            let mut batch = WriteBatch::new();
            for i in 0..2_000u32 {
                batch.put(
                    "events",
                    format!("bg{round}-{i:06}"),
                    vec![round as u8; 100],
                );
            }
            engine.write(&batch).expect("background write");
            engine.flush().expect("background flush");
            engine.compact().expect("background compaction");
        }
    });
    let manifest = upload_capture(
        captured,
        shard.engine.clone(),
        &repo,
        &shard_id,
        &backup_id,
        TransferOptions::default(),
        &Progress::default(),
        &CancellationToken::new(),
    )
    .await
    .expect("upload");
    background.await.expect("background work");
    let backup = BackupManifest::commit(
        backup_id.clone(),
        BackupKind::Full,
        None,
        started_at,
        &[manifest],
    );
    repo.commit_backup(backup).await.expect("commit");

    // The capture is released: deletions resume and the obsolete files are purged.
    shard.engine.flush().expect("flush");
    shard.engine.compact().expect("compact");
    for name in &obsolete {
        assert!(
            !db_dir.join(name).exists(),
            "{name} is still there after the capture was released"
        );
    }

    restore_exactly(
        &repo,
        (&backup_id, &shard_id),
        &dir.path().join("restored"),
        (seq_at_capture, &model_at_capture),
        "backup taken across compactions",
    )
    .await;
}

/// A full backup's files are captured with the gate open, before the cut; the writes between
/// them and the cut go up as the backup's WAL tail, and a restore replays it to the exact cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_between_staging_and_the_cut_are_restored_from_the_wal_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repository::open(&format!("file://{}", dir.path().join("repo").display()))
        .await
        .expect("repo");
    let shard_id = ShardId::new("shard-0").expect("id");
    let backup_id = BackupId::generate();
    let mut shard = Shard::open(&dir.path().join("db"), 11);
    shard.workload(20_000, 30_000);
    let gate = WriteGate::new();
    let started_at = Utc::now();

    let mut captured = stage_capture(
        &shard.engine,
        dir.path().join("captures").join(backup_id.as_str()),
        Lineage::root(),
        CaptureMode::Files,
    )
    .await
    .expect("stage");
    let files_seq = captured.capture.seq;
    // Writes with the gate open, after the files were captured: part of the backup.
    shard.workload(8_000, 30_000);
    let closed = close_gate(shard.engine.as_ref(), &gate, &mut captured).await;
    let model_at_cut = shard.model.clone();
    captured.paused = closed.open();
    assert!(captured.seq > files_seq, "the cut is after the files");
    // Writes after the cut: not part of it.
    shard.workload(5_000, 30_000);

    let manifest = upload_capture(
        captured,
        shard.engine.clone(),
        &repo,
        &shard_id,
        &backup_id,
        TransferOptions::default(),
        &Progress::default(),
        &CancellationToken::new(),
    )
    .await
    .expect("upload");
    assert_eq!(manifest.files_seq, Some(files_seq));
    assert!(!manifest.wal.is_empty(), "the tail went up as WAL pieces");
    assert_eq!(manifest.wal.last().map(|p| p.last), Some(manifest.seq));
    let cut = manifest.seq;
    let backup = BackupManifest::commit(
        backup_id.clone(),
        BackupKind::Full,
        None,
        started_at,
        &[manifest],
    );
    repo.commit_backup(backup).await.expect("commit");

    restore_exactly(
        &repo,
        (&backup_id, &shard_id),
        &dir.path().join("restored"),
        (cut, &model_at_cut),
        "backup with a WAL tail",
    )
    .await;
}
