//! `lockstep restore` of the whole cluster through its agents: into directories (the live
//! shards untouched), in place (every shard back at the cut, serving writes), and a restore
//! that fails on one shard, which must change no shard at all, even once other shards are
//! swapped; no shard takes a write until every shard is swapped.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use lockstep_agent::engine::{RocksEngine, ShardEngine};
use lockstep_proto::v1;
use lockstep_tests::text;

use crate::cluster::{Cluster, N_AGENTS, json, wait_until};

async fn put(cluster: &Cluster, shard: usize, key: &str) {
    let mut client = cluster.shard_client(shard).await;
    client
        .put(v1::PutRequest {
            column_family: String::new(),
            key: key.as_bytes().to_vec(),
            value: format!("value of {key}").into_bytes(),
        })
        .await
        .expect("put");
}

async fn delete(cluster: &Cluster, shard: usize, key: &str) {
    let mut client = cluster.shard_client(shard).await;
    client
        .delete(v1::DeleteRequest {
            column_family: String::new(),
            key: key.as_bytes().to_vec(),
        })
        .await
        .expect("delete");
}

/// Every key of shard `i`, read through the live agent.
pub async fn live_keys(cluster: &Cluster, i: usize) -> BTreeSet<String> {
    let mut client = cluster.shard_client(i).await;
    let reply = client
        .scan(v1::ScanRequest {
            column_family: String::new(),
            start: Vec::new(),
            end: Vec::new(),
            limit: 100_000,
        })
        .await
        .expect("scan")
        .into_inner();
    reply
        .entries
        .into_iter()
        .map(|e| String::from_utf8(e.key).expect("utf-8 key"))
        .collect()
}

fn keys(prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|k| format!("{prefix}{k:04}")).collect()
}

/// Writes `old0000..` on every shard and takes a backup; returns its id and cut.
async fn backup_with_data(cluster: &Cluster) -> (String, serde_json::Value) {
    for i in 0..N_AGENTS {
        for key in keys("old", 200) {
            put(cluster, i, &key).await;
        }
    }
    let output = cluster.lockstep(&["backup", "create", "--wait", "--json"]);
    assert!(output.status.success(), "backup:\n{}", text(&output));
    let backup = json(&output)["backup_id"]
        .as_str()
        .expect("backup_id")
        .to_string();
    let show = json(&cluster.lockstep(&["backup", "show", &backup, "--json"]));
    (backup, show["cut"].clone())
}

/// After the backup: new keys, and some old ones deleted, on every shard.
async fn diverge(cluster: &Cluster) {
    for i in 0..N_AGENTS {
        for key in keys("new", 50) {
            put(cluster, i, &key).await;
        }
        for key in keys("old", 10) {
            delete(cluster, i, &key).await;
        }
    }
}

fn diverged() -> BTreeSet<String> {
    let mut expected: BTreeSet<String> = keys("old", 200).split_off("old0010");
    expected.extend(keys("new", 50));
    expected
}

/// Nothing of a restore is left beside the live shards, once the staging steps that were
/// running when it was discarded have ended (a RocksDB open cannot be interrupted; see
/// ARCHITECTURE.md): within 10 s.
/// Waits (up to 10 s) until no restore staging or replaced directory is left in `dir`.
pub async fn assert_no_restore_leftovers(dir: &Path) {
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("list cluster dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains("lockstep-restore") || name.contains("lockstep-replaced"))
            .collect()
    };
    let gone = wait_until(Duration::from_secs(10), || {
        let none = leftovers().is_empty();
        async move { none }
    })
    .await;
    assert!(gone.is_some(), "restore left {:?} behind", leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restore_into_directories_then_in_place_returns_every_shard_to_the_cut() {
    let cluster = Cluster::start(5000, None);
    let (backup, cut) = backup_with_data(&cluster).await;
    diverge(&cluster).await;

    // Into directories: a drill next to the live cluster, which it must not touch.
    let drill = cluster.dir.path().join("drill");
    let output = cluster.lockstep(&[
        "restore",
        &backup,
        "--to",
        drill.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(output.status.success(), "restore --to:\n{}", text(&output));
    let job = json(&output);
    assert_eq!(job["phase"], "done", "{job}");
    for i in 0..N_AGENTS {
        let shard = Cluster::shard(i);
        let engine = RocksEngine::open(&drill.join(&shard), &[]).expect("open drill shard");
        assert_eq!(Some(engine.latest_seq().0), cut[&shard].as_u64(), "{shard}");
        let restored: BTreeSet<String> = engine
            .scan("default", b"", None, usize::MAX)
            .expect("scan")
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).expect("utf-8"))
            .collect();
        assert_eq!(restored, keys("old", 200), "{shard} in the drill directory");
        assert_eq!(live_keys(&cluster, i).await, diverged(), "live {shard}");
    }
    // A second restore into the same, now full, directories is refused before any download.
    let again = cluster.lockstep(&["restore", &backup, "--to", drill.to_str().expect("utf-8")]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("ERR_RESTORE_TARGET_NOT_EMPTY"),
        "{}",
        text(&again)
    );

    // Neither or both targets: a usage error, nothing runs.
    let neither = cluster.lockstep(&["restore", &backup]);
    assert!(!neither.status.success(), "{}", text(&neither));

    // In place: every live shard goes back to the cut.
    let output = cluster.lockstep(&["restore", "latest", "--in-place", "--json"]);
    assert!(
        output.status.success(),
        "restore --in-place:\n{}",
        text(&output)
    );
    let job = json(&output);
    assert_eq!(job["phase"], "done", "{job}");
    assert_eq!(job["backup_id"], backup.as_str());
    for i in 0..N_AGENTS {
        let shard = Cluster::shard(i);
        assert_eq!(live_keys(&cluster, i).await, keys("old", 200), "{shard}");
        let row = job["shards"]
            .as_array()
            .expect("shards")
            .iter()
            .find(|s| s["shard_id"] == shard.as_str())
            .expect("shard row");
        assert_eq!(row["seq"], cut[&shard], "{shard}");
        assert_eq!(row["state"], "applied", "{shard}");
    }
    assert_no_restore_leftovers(cluster.dir.path()).await;

    // The restored cluster serves writes and takes the next backup.
    for i in 0..N_AGENTS {
        put(&cluster, i, "after-restore").await;
        assert!(live_keys(&cluster, i).await.contains("after-restore"));
    }
    let status = json(&cluster.lockstep(&["cluster", "status", "--json"]));
    for agent in status["agents"].as_array().expect("agents") {
        assert_eq!(agent["reachable"], true, "{agent}");
        assert_eq!(agent["gate_closed"], false, "{agent}");
    }
    let next = cluster.lockstep(&["backup", "create", "--wait", "--json"]);
    assert!(
        next.status.success(),
        "backup after restore:\n{}",
        text(&next)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_fails_on_one_shard_changes_no_shard() {
    let cluster = Cluster::start(5000, None);
    let (backup, _cut) = backup_with_data(&cluster).await;
    diverge(&cluster).await;

    // Flip a byte in an object that only shard-1's files use.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            cluster
                .repo()
                .join("shards/shard-1")
                .join(format!("{backup}.json")),
        )
        .expect("read shard manifest"),
    )
    .expect("parse shard manifest");
    let file = manifest["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter(|f| f["kind"] == "sst")
        .max_by_key(|f| f["size"].as_u64())
        .expect("an SST file");
    let id = file["chunks"][0]["id"].as_str().expect("chunk id");
    let object = cluster.repo().join("objects").join(&id[..2]).join(id);
    let mut bytes = std::fs::read(&object).expect("read object");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&object, bytes).expect("write object");

    let output = cluster.lockstep(&["restore", &backup, "--in-place"]);
    assert!(
        !output.status.success(),
        "restore should fail:\n{}",
        text(&output)
    );
    let printed = text(&output);
    assert!(printed.contains("shard-1"), "{printed}");
    assert!(
        printed.contains("ERR_BACKUP_CHECKSUM_MISMATCH"),
        "{printed}"
    );
    for i in 0..N_AGENTS {
        assert_eq!(
            live_keys(&cluster, i).await,
            diverged(),
            "shard-{i} changed by a failed restore"
        );
    }
    assert_no_restore_leftovers(cluster.dir.path()).await;
    // The cluster is free again: the next backup runs.
    let next = cluster.lockstep(&["backup", "create", "--wait", "--json"]);
    assert!(
        next.status.success(),
        "backup after failed restore:\n{}",
        text(&next)
    );
}

/// The chunk ids a shard manifest of `backup` names.
fn chunk_ids(cluster: &Cluster, shard: &str, backup: &str) -> BTreeSet<String> {
    let path = cluster
        .repo()
        .join("shards")
        .join(shard)
        .join(format!("{backup}.json"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read shard manifest"))
            .expect("parse shard manifest");
    manifest["files"]
        .as_array()
        .expect("files")
        .iter()
        .flat_map(|f| f["chunks"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_into_directories_that_fails_on_one_shard_leaves_no_shard_behind() {
    let cluster = Cluster::start(5000, None);
    let (backup, _) = backup_with_data(&cluster).await;
    // Damage an object only shard-1 holds: its restore fails, the others' succeed.
    let mut only_shard_1 = chunk_ids(&cluster, "shard-1", &backup);
    for other in ["shard-0", "shard-2"] {
        for id in chunk_ids(&cluster, other, &backup) {
            only_shard_1.remove(&id);
        }
    }
    let id = only_shard_1
        .pop_first()
        .expect("an object of shard-1 alone");
    let object = cluster.repo().join("objects").join(&id[..2]).join(&id);
    let mut bytes = std::fs::read(&object).expect("read object");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&object, bytes).expect("write object");

    let drill = cluster.dir.path().join("drill");
    let output = cluster.lockstep(&["restore", &backup, "--to", drill.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(4), "{}", text(&output));
    assert!(
        text(&output).contains("ERR_BACKUP_CHECKSUM_MISMATCH"),
        "{}",
        text(&output)
    );
    let gone = wait_until(Duration::from_secs(10), || {
        let left: Vec<_> = std::fs::read_dir(&drill)
            .map(|entries| entries.filter_map(Result::ok).collect())
            .unwrap_or_default();
        async move { left.is_empty() }
    })
    .await;
    let left: Vec<_> = std::fs::read_dir(&drill)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        gone.is_some(),
        "a failed restore left {left:?} in {}",
        drill.display()
    );
}

/// Once shard-0's Apply has closed its gate, a write to shard-0 in the background: it must
/// wait until the restore's decision. Returns the write's task.
async fn write_behind_the_closed_gate(
    cluster: &Cluster,
    key: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<v1::WriteReply>, tonic::Status>> {
    let closed = wait_until(Duration::from_secs(60), || async {
        cluster.gate_closed(0).await == Some(true)
    })
    .await;
    assert!(closed.is_some(), "shard-0's gate never closed for the swap");
    let mut client = cluster.shard_client(0).await;
    let request = v1::PutRequest {
        column_family: String::new(),
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
    };
    tokio::spawn(async move { client.put(request).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_swap_holds_every_shard_s_writes_until_all_are_swapped() {
    let mut cluster = Cluster::start(5000, None);
    // shard-1's swap takes 4 s (as behind a long scan that the drain waits for).
    cluster.restart_agent_with(1, &[("LOCKSTEP_FAULT_PAUSE", "restore-swap:4000")]);
    let (backup, _cut) = backup_with_data(&cluster).await;
    diverge(&cluster).await;

    let restore = cluster.spawn_lockstep(&["restore", &backup, "--in-place"]);
    let mut write = write_behind_the_closed_gate(&cluster, "written-during-the-restore").await;
    // shard-0 is swapped within milliseconds; shard-1 is still swapping: the write waits.
    let early = tokio::time::timeout(Duration::from_secs(1), &mut write).await;
    assert!(
        early.is_err(),
        "shard-0 took a write while shard-1 was still swapping: {early:?}"
    );
    let ended = restore.wait_with_output().expect("the restore ends");
    assert!(ended.status.success(), "restore:\n{}", text(&ended));
    write
        .await
        .expect("join")
        .expect("the write goes through after the commit");

    let restored = keys("old", 200);
    let mut shard_0 = restored.clone();
    shard_0.insert("written-during-the-restore".into());
    assert_eq!(live_keys(&cluster, 0).await, shard_0, "shard-0");
    for i in 1..N_AGENTS {
        assert_eq!(live_keys(&cluster, i).await, restored, "shard-{i}");
    }
    assert_no_restore_leftovers(cluster.dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_that_fails_on_one_shard_reverts_the_shards_already_swapped() {
    let mut cluster = Cluster::start(5000, None);
    cluster.restart_agent_with(1, &[("LOCKSTEP_FAULT_PAUSE", "restore-swap:2000")]);
    let (backup, _cut) = backup_with_data(&cluster).await;
    diverge(&cluster).await;
    // shard-2's swap cannot move its live shard aside: the name is taken by a directory that
    // is not empty.
    let blocker = cluster.dir.path().join(".db-2.lockstep-replaced");
    std::fs::create_dir(&blocker).expect("mkdir");
    std::fs::write(blocker.join("not-yours"), "x").expect("write");

    let restore = cluster.spawn_lockstep(&["restore", &backup, "--in-place"]);
    let write = write_behind_the_closed_gate(&cluster, "written-during-the-restore").await;
    let ended = restore.wait_with_output().expect("the restore ends");
    assert!(!ended.status.success(), "restore:\n{}", text(&ended));
    let printed = text(&ended);
    assert!(printed.contains("shard-2"), "{printed}");
    assert!(printed.contains("reverted"), "{printed}");
    write
        .await
        .expect("join")
        .expect("the write goes through after the revert");

    // Every shard is as it was; shard-0's write landed on its old data.
    let mut shard_0 = diverged();
    shard_0.insert("written-during-the-restore".into());
    assert_eq!(live_keys(&cluster, 0).await, shard_0, "shard-0");
    for i in 1..N_AGENTS {
        assert_eq!(live_keys(&cluster, i).await, diverged(), "shard-{i}");
    }
    std::fs::remove_dir_all(&blocker).expect("remove the blocker");
    assert_no_restore_leftovers(cluster.dir.path()).await;
    let kept: Vec<String> = std::fs::read_dir(cluster.repo().join("restores"))
        .expect("restores/")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        kept.len(),
        1,
        "the record is removed, the decision stays: {kept:?}"
    );
    let decision = std::fs::read_to_string(cluster.repo().join("restores").join(&kept[0]))
        .expect("read the decision");
    assert!(
        kept[0].ends_with(".decision") && decision.contains("\"revert\""),
        "{kept:?}: {decision}"
    );
    // The same restore, with the blocker gone, goes through.
    let again = cluster.lockstep(&["restore", &backup, "--in-place"]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(live_keys(&cluster, 2).await, keys("old", 200));
}
