//! Shard lineage with the product's own commands: a shard ships its WAL, is backed up
//! offline, ships on, is restored offline from the older backup and served again with the
//! same archive. Its new writes must go to a new lineage, never onto the old history, and a
//! PITR to its end must equal the writes it acknowledged, key by key.

use std::collections::HashMap;

use lockstep_repository::archive::WalArchive;
use lockstep_repository::wal::check_segments;
use lockstep_repository::{Repository, Seq, ShardId};
use lockstep_tests::{agent_ok, text};

use crate::cluster::{Cluster, N_AGENTS, json};
use crate::pitr::{Acked, keys_in, seq_vector, state, wait_shipped, write};

async fn write_many(cluster: &Cluster, shard: usize, prefix: &str, n: usize) -> Vec<Acked> {
    let mut acked = Vec::with_capacity(n);
    for k in 0..n {
        acked.push(write(cluster, shard, format!("{prefix}-{k:05}"), false).await);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_restore_served_with_the_same_archive_forks_a_new_lineage() {
    let mut cluster = Cluster::start(5_000, None);
    let mut history: Vec<Vec<Acked>> = vec![Vec::new(); N_AGENTS];
    for (i, shard) in history.iter_mut().enumerate().skip(1) {
        *shard = write_many(&cluster, i, "other", 10).await;
    }
    history[0] = write_many(&cluster, 0, "first", 2_000).await;
    assert_eq!(history[0].last().map(|w| w.seq), Some(2_000));
    wait_shipped(&cluster).await;

    // Offline backup at 2,000.
    cluster.kill_agent(0);
    let db = cluster.dir.path().join("db-0");
    let repo_arg = cluster.repo().display().to_string();
    let backup = agent_ok(&[
        "backup",
        "--db",
        db.to_str().expect("utf-8"),
        "--repo",
        &repo_arg,
        "--json",
    ]);
    let backup: serde_json::Value = serde_json::from_str(&backup).expect("backup json");
    let backup_id = backup["backup_id"].as_str().expect("backup id").to_string();
    assert_eq!(backup["cut"]["shard-0"], 2_000, "{backup:#}");

    // 3,000 more writes ship on the shard's first history: 1..5,000.
    cluster.restart_agent(0);
    let old_history = write_many(&cluster, 0, "old", 3_000).await;
    assert_eq!(old_history.last().map(|w| w.seq), Some(5_000));
    wait_shipped(&cluster).await;

    // Restored offline from the backup at 2,000 and served with the same --wal-to.
    cluster.kill_agent(0);
    let restored = cluster.dir.path().join("db-0.restored");
    agent_ok(&[
        "restore",
        "--repo",
        &repo_arg,
        "--backup",
        &backup_id,
        "--shard",
        "shard-0",
        "--to",
        restored.to_str().expect("utf-8"),
    ]);
    std::fs::rename(&db, cluster.dir.path().join("db-0.before")).expect("set the old shard aside");
    std::fs::rename(&restored, &db).expect("put the restored shard in place");
    cluster.restart_agent(0);
    let new_history = write_many(&cluster, 0, "new", 5_000).await;
    assert_eq!(new_history.last().map(|w| w.seq), Some(7_000));
    history[0].extend(new_history);
    let status = wait_shipped(&cluster).await;
    let shard_0 = &status["shards"][0];
    assert_eq!(shard_0["lineage"]["timeline"], 2, "{shard_0:#}");

    // The archive holds two histories of shard-0: the first, 1..5,000, untouched; the new one
    // a child branching at 2,000 and holding exactly 2,001..7,000.
    let archive = WalArchive::Store(
        Repository::open(cluster.archive().to_str().expect("utf-8"))
            .await
            .expect("archive"),
    );
    let shard = ShardId::new("shard-0").expect("shard id");
    let lineages = archive.wal_lineages(&shard).await.expect("lineages");
    assert_eq!(lineages.len(), 2, "{lineages:?}");
    let (root, child) = (lineages[0], lineages[1]);
    assert_eq!(root.parent, None);
    assert_eq!((child.parent, child.branch), (Some(root.id), Seq(2_000)));
    let mut ranges = HashMap::new();
    for lineage in &lineages {
        let segments = archive
            .wal_segments(&shard, lineage)
            .await
            .expect("segments");
        check_segments(&segments).expect("contiguous");
        let first = segments.first().map(|s| s.first.0);
        let last = segments.last().map(|s| s.last.0);
        ranges.insert(lineage.id, (first, last));
    }
    assert_eq!(ranges[&root.id], (Some(1), Some(5_000)));
    assert_eq!(ranges[&child.id], (Some(2_001), Some(7_000)));

    // PITR to the end of every shard: the backup at 2,000, then the new lineage's WAL; the
    // old history's 2,001..5,000 are never replayed.
    let ends: Vec<u64> = history
        .iter()
        .map(|h| h.last().map_or(0, |w| w.seq))
        .collect();
    let target = cluster.dir.path().join("pitr");
    let output = cluster.lockstep(&[
        "restore",
        "--to-seq",
        &seq_vector(&ends),
        "--to",
        target.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let outcome = json(&output);
    let plan = outcome["plan"]
        .as_array()
        .and_then(|plans| plans.iter().find(|p| p["shard_id"] == "shard-0"))
        .expect("a plan for shard-0");
    assert_eq!(plan["base_backup_id"], backup_id.as_str(), "{outcome:#}");
    // The legs: the base's lineage up to the branch point, then the new one to the end.
    let legs = plan["wal_legs"].as_array().expect("legs");
    assert_eq!(legs.len(), 2, "{plan:#}");
    assert_eq!(legs[0]["lineage"]["id"], root.id.to_string(), "{plan:#}");
    assert_eq!(legs[0]["to_seq"], 2_000, "{plan:#}");
    assert_eq!(legs[1]["lineage"]["id"], child.id.to_string(), "{plan:#}");
    assert_eq!(legs[1]["to_seq"], 7_000, "{plan:#}");
    for (i, acked) in history.iter().enumerate() {
        assert_eq!(
            keys_in(&target.join(Cluster::shard(i))),
            state(acked, |_| true),
            "shard {i} restored to {}",
            ends[i]
        );
    }
    let restored_old: Vec<_> = old_history.iter().map(|w| &w.key).collect();
    assert!(
        !keys_in(&target.join("shard-0"))
            .iter()
            .any(|k| restored_old.contains(&k)),
        "a write of the abandoned history came back"
    );
}
