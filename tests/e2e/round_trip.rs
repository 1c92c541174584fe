//! Full backups and restores of a RocksDB shard on file://, memory://, s3:// (moto) and
//! az:// (Azurite):
//! restored data equals the model at each backup's sequence number, key by key, and a second
//! full backup uploads only the new SST files.

use std::collections::HashSet;

use lockstep_agent::backup::backup_offline;
use lockstep_agent::engine::ShardEngine;
use lockstep_repository::manifest::FileKind;
use lockstep_repository::transfer::Progress;
use lockstep_repository::verify::{VerifyLevel, verify};
use lockstep_repository::{Lineage, Repository, ShardId};
use lockstep_tests::{Azurite, Moto};

use crate::model::{Shard, restore_exactly};

/// Returns the directory of the shard it backed up.
pub async fn round_trip(repo: Repository) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let shard_id = ShardId::new("shard-0").expect("shard id");
    let mut shard = Shard::open(&dir.path().join("db"), 42);
    let options = shard.options(&dir.path().join("captures"));

    // About 100k keys in 3 column families, with overwrites, deletes and range deletes,
    // compacted so the first backup's SST files are stable.
    shard.workload(100_000, 60_000);
    shard.engine.flush().expect("flush");
    shard.engine.compact().expect("compact");
    shard.workload(10_000, 60_000);
    let first = backup_offline(
        &shard.engine,
        &repo,
        &shard_id,
        &options,
        Lineage::root(),
        &Progress::default(),
    )
    .await
    .expect("first backup");
    let model_first = shard.model.clone();
    assert_eq!(first.cut[&shard_id], shard.engine.latest_seq());

    // More writes, flushed into new SST files; the old ones stay as they are.
    shard.workload(20_000, 80_000);
    let second = backup_offline(
        &shard.engine,
        &repo,
        &shard_id,
        &options,
        Lineage::root(),
        &Progress::default(),
    )
    .await
    .expect("second backup");
    let model_second = shard.model.clone();

    let m1 = repo
        .shard_manifest(&shard_id, &first.backup_id)
        .await
        .expect("manifest 1");
    let m2 = repo
        .shard_manifest(&shard_id, &second.backup_id)
        .await
        .expect("manifest 2");
    let old_ssts: HashSet<_> = m1.files.iter().filter_map(|f| f.identity.clone()).collect();
    let (mut reused, mut reused_bytes, mut new_sst_bytes, mut other_bytes) = (0, 0, 0, 0);
    for file in &m2.files {
        match (&file.identity, file.kind) {
            (Some(identity), FileKind::Sst) if old_ssts.contains(identity) => {
                reused += 1;
                reused_bytes += file.size;
            }
            (_, FileKind::Sst) => new_sst_bytes += file.size,
            _ => other_bytes += file.size,
        }
    }
    assert!(
        reused > 0,
        "the second backup shares SST files with the first"
    );
    assert!(new_sst_bytes > 0, "the second backup has new SST files");
    assert_eq!(m2.stats.files_reused, reused);
    assert_eq!(
        m2.stats.bytes_read,
        m2.stats.bytes_total - reused_bytes,
        "unchanged SST files are not re-read"
    );
    assert!(
        m2.stats.bytes_uploaded <= new_sst_bytes + other_bytes,
        "second backup uploaded {} bytes; new SSTs are {} bytes and metadata/WAL {} bytes",
        m2.stats.bytes_uploaded,
        new_sst_bytes,
        other_bytes
    );
    assert!(
        m2.stats.bytes_uploaded < m1.stats.bytes_uploaded / 2,
        "the second backup is mostly shared"
    );

    for (backup, model, seq) in [
        (&first.backup_id, &model_first, first.cut[&shard_id]),
        (&second.backup_id, &model_second, second.cut[&shard_id]),
    ] {
        let target = dir.path().join(format!("restored-{backup}"));
        restore_exactly(
            &repo,
            (backup, &shard_id),
            &target,
            (seq, model),
            &format!("restore of {backup}"),
        )
        .await;
    }

    let report = verify(
        &repo,
        &[first.backup_id.clone(), second.backup_id.clone()],
        VerifyLevel::Full,
        100,
        None,
        4,
        &Progress::default(),
    )
    .await
    .expect("verify");
    assert!(report.passed, "{report}");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_on_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().join("repo").display());
    round_trip(Repository::open(&url).await.expect("open repo")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_on_memory() {
    round_trip(
        Repository::open("memory://round-trip")
            .await
            .expect("open repo"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_on_s3_moto() {
    let moto = Moto::start("lockstep-test");
    let repo = Repository::open_with("s3://lockstep-test/backups", &moto.env())
        .await
        .expect("open repo");
    round_trip(repo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_on_azure_azurite() {
    let azurite = Azurite::start("lockstep-test");
    let repo = Repository::open_with("az://lockstep-test/backups", &azurite.env())
        .await
        .expect("open repo");
    round_trip(repo).await;
}
