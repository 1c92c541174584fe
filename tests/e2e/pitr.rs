//! WAL shipping and point-in-time restore on a real cluster: three agents ship their WAL to
//! an archive directory while clients write; restores to random sequence vectors and to
//! timestamps (exact per shard, and snapped to a consistent point) must match the model of
//! acknowledged writes key by key; an in-place restore starts a new lineage and leaves the
//! old one's segments untouched; a segment deleted from the archive is `ERR_BACKUP_WAL_GAP`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use lockstep_agent::engine::{RocksEngine, ShardEngine};
use lockstep_proto::v1;
use lockstep_repository::HlcTime;
use lockstep_tests::text;

use crate::cluster::{Cluster, N_AGENTS, json, wait_until};
use crate::cluster_restore::live_keys;

/// One acknowledged write: its last sequence number, HLC time, key, and whether it deleted.
#[derive(Debug, Clone)]
pub struct Acked {
    pub seq: u64,
    pub hlc: u64,
    pub key: String,
    pub deleted: bool,
}

/// The keys of a shard after every acknowledged write up to `keep`.
pub fn state(history: &[Acked], keep: impl Fn(&Acked) -> bool) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for write in history.iter().filter(|w| keep(w)) {
        if write.deleted {
            keys.remove(&write.key);
        } else {
            keys.insert(write.key.clone());
        }
    }
    keys
}

pub async fn write(cluster: &Cluster, shard: usize, key: String, deleted: bool) -> Acked {
    write_with(&mut cluster.shard_client(shard).await, key, deleted).await
}

/// `write` on a connected client.
pub async fn write_with(
    client: &mut lockstep_proto::v1::shard_client::ShardClient<tonic::transport::Channel>,
    key: String,
    deleted: bool,
) -> Acked {
    let reply = if deleted {
        client
            .delete(v1::DeleteRequest {
                column_family: String::new(),
                key: key.clone().into_bytes(),
            })
            .await
    } else {
        client
            .put(v1::PutRequest {
                column_family: String::new(),
                key: key.clone().into_bytes(),
                value: b"v".to_vec(),
            })
            .await
    }
    .expect("write")
    .into_inner();
    Acked {
        seq: reply.last_seq,
        hlc: reply.hlc,
        key,
        deleted,
    }
}

pub fn keys_in(dir: &Path) -> BTreeSet<String> {
    let engine = RocksEngine::open(dir, &[]).expect("open restored shard");
    engine
        .scan("default", b"", None, usize::MAX)
        .expect("scan")
        .into_iter()
        .map(|(k, _)| String::from_utf8(k).expect("utf-8 key"))
        .collect()
}

/// Waits until every shard's WAL is durable in the archive up to its latest write.
pub async fn wait_shipped(cluster: &Cluster) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let shipped = wait_until(Duration::from_secs(20), || {
        let status = json(&cluster.lockstep(&["wal", "status", "--json"]));
        let done = status["shards"].as_array().is_some_and(|shards| {
            shards.len() == N_AGENTS
                && shards.iter().all(|s| {
                    s["destinations"]
                        .as_array()
                        .is_some_and(|d| d.iter().all(|d| d["lag_seq"] == 0))
                })
        });
        last = status;
        async move { done }
    })
    .await;
    assert!(shipped.is_some(), "the WAL was not shipped: {last:#}");
    last
}

/// The plan of an in-place restore to `point` (`--to-time T`, say), changing nothing.
fn dry_run(cluster: &Cluster, point: &[&str]) -> serde_json::Value {
    let mut args = vec!["restore"];
    args.extend_from_slice(point);
    args.extend_from_slice(&["--in-place", "--dry-run", "--json"]);
    json(&cluster.lockstep(&args))
}

pub fn seq_vector(targets: &[u64]) -> String {
    targets
        .iter()
        .enumerate()
        .map(|(i, seq)| format!("{}={seq}", Cluster::shard(i)))
        .collect::<Vec<_>>()
        .join(",")
}

fn segment_files(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                out.insert(entry.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restores_replay_the_shipped_wal_exactly_to_each_target() {
    let cluster = Cluster::start(5_000, None);
    let mut history: Vec<Vec<Acked>> = vec![Vec::new(); N_AGENTS];
    for (i, shard) in history.iter_mut().enumerate() {
        for k in 0..40 {
            shard.push(write(&cluster, i, format!("base-{k:03}"), false).await);
        }
    }
    let backup = json(&cluster.lockstep(&["backup", "create", "--wait", "--json"]));
    let backup_id = backup["backup_id"].as_str().expect("backup id").to_string();
    let cut: Vec<u64> = (0..N_AGENTS)
        .map(|i| history[i].last().map_or(0, |w| w.seq))
        .collect();

    // After the backup: puts and deletes, some milliseconds apart so timestamps separate them.
    let mut seed = 0x5eed_u64;
    for round in 0..60 {
        for (i, shard) in history.iter_mut().enumerate() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let deleted = round % 7 == 3;
            let key = if deleted {
                format!("base-{:03}", (seed >> 33) % 40)
            } else {
                format!("late-{round:03}")
            };
            shard.push(write(&cluster, i, key, deleted).await);
        }
    }
    let status = wait_shipped(&cluster).await;
    println!("WAL status after shipping: {status:#}");

    // The plan names the base backup and the WAL to replay, and changes nothing.
    let ends: Vec<u64> = history
        .iter()
        .map(|h| h.last().map_or(0, |w| w.seq))
        .collect();
    let dry = cluster.lockstep(&[
        "restore",
        "--to-seq",
        &seq_vector(&ends),
        "--in-place",
        "--dry-run",
        "--json",
    ]);
    let dry = json(&dry);
    let plans = dry["plan"].as_array().expect("plan");
    assert_eq!(plans.len(), cut.len(), "one plan per shard: {dry:#}");
    for (i, plan) in plans.iter().enumerate() {
        assert_eq!(plan["base_backup_id"], backup_id.as_str());
        assert_eq!(plan["base_seq"], cut[i]);
        assert_eq!(plan["target_seq"], ends[i]);
        assert!(plan["wal_segments"].as_u64().unwrap_or(0) > 0, "{plan}");
    }

    // Random sequence vectors: every shard exactly at its target.
    for round in 0..20 {
        let mut targets = Vec::new();
        for shard in &history {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let after_cut = &shard[40..];
            targets.push(after_cut[(seed >> 33) as usize % after_cut.len()].seq);
        }
        let dir = cluster.dir.path().join(format!("pitr-seq-{round}"));
        let output = cluster.lockstep(&[
            "restore",
            "--to-seq",
            &seq_vector(&targets),
            "--to",
            dir.to_str().expect("utf-8"),
        ]);
        assert!(output.status.success(), "{}", text(&output));
        for (i, target) in targets.iter().enumerate() {
            let expected = state(&history[i], |w| w.seq <= *target);
            assert_eq!(
                keys_in(&dir.join(Cluster::shard(i))),
                expected,
                "shard {i} at seq {target} (round {round})"
            );
        }
    }

    // A timestamp, exact per shard: each shard's writes at or before it.
    let pivot = history[0][40 + 30].hlc;
    let time = HlcTime(pivot).to_datetime().to_rfc3339();
    let bound = HlcTime::at_or_before(HlcTime(pivot).to_datetime()).0;
    let dir = cluster.dir.path().join("pitr-time");
    let output = cluster.lockstep(&[
        "restore",
        "--to-time",
        &time,
        "--exact-per-shard",
        "--to",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    for (i, shard) in history.iter().enumerate() {
        assert_eq!(
            keys_in(&dir.join(Cluster::shard(i))),
            state(shard, |w| w.hlc <= bound),
            "shard {i} at time {time}"
        );
    }

    // The same time without --exact-per-shard snaps to the backup, and says so.
    let snapped = dry_run(&cluster, &["--to-time", &time]);
    assert!(
        snapped["note"]
            .as_str()
            .is_some_and(|n| n.contains("snapped to backup")),
        "{snapped:#}"
    );
    let plans = snapped["plan"].as_array().expect("plan");
    assert_eq!(plans.len(), cut.len(), "one plan per shard: {snapped:#}");
    for (i, plan) in plans.iter().enumerate() {
        assert_eq!(plan["target_seq"], cut[i]);
    }

    // A tag taken after every write: a time after it snaps to the tag, the latest consistent
    // restore point, not to the older backup.
    let tag = cluster.lockstep(&["tag", "create", "after-the-writes"]);
    assert!(tag.status.success(), "{}", text(&tag));
    // A dry run of `point` must say `note` and take every shard to its last write.
    let plans_the_ends = |point: &[&str], note: &str| {
        let plan = dry_run(&cluster, point);
        assert!(
            plan["note"].as_str().is_some_and(|n| n.contains(note)),
            "{plan:#}"
        );
        for (i, shard) in plan["plan"].as_array().expect("plan").iter().enumerate() {
            assert_eq!(shard["target_seq"], ends[i], "{plan:#}");
        }
    };
    let now = chrono::Utc::now().to_rfc3339();
    plans_the_ends(&["--to-time", &now], "snapped to tag after-the-writes");

    // The end of every shard's archive: each shard's last shipped write, labelled as not a
    // consistent cut.
    plans_the_ends(&["--to-archive-end"], "NOT a consistent cut");
    let no_offset = cluster.lockstep(&[
        "restore",
        "--to-time",
        "2026-11-21T10:00:00",
        "--in-place",
        "--dry-run",
    ]);
    assert!(!no_offset.status.success());
    assert!(
        text(&no_offset).contains("explicit offset"),
        "{}",
        text(&no_offset)
    );

    // A hole in the archive is reported, never skipped.
    let segments: Vec<String> = segment_files(&cluster.archive())
        .into_iter()
        .filter(|f| f.contains("/shard-1/0000000001-"))
        .collect();
    let victim = &segments[segments.len() / 2];
    let aside = cluster.dir.path().join("segment-aside");
    std::fs::rename(victim, &aside).expect("move a segment away");
    let output = cluster.lockstep(&["restore", "--to-seq", &seq_vector(&ends), "--in-place"]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("ERR_BACKUP_WAL_GAP"),
        "{}",
        text(&output)
    );
    std::fs::rename(&aside, victim).expect("put the segment back");
    // An archive that stops short of the target says how far it reaches.
    let last = segments.last().expect("shard-1 has segments");
    std::fs::rename(last, &aside).expect("move the last segment away");
    let output = cluster.lockstep(&["restore", "--to-seq", &seq_vector(&ends), "--in-place"]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("ERR_BACKUP_WAL_GAP")
            && text(&output).contains("reaches sequence")
            && text(&output).contains(&format!("short of the target {}", ends[1])),
        "{}",
        text(&output)
    );
    std::fs::rename(&aside, last).expect("put the segment back");

    // In place, to a vector in the middle: the live shards serve exactly that state, start
    // timeline 2 (a new lineage), and the segments of the old lineage stay as they were.
    let middle: Vec<u64> = history.iter().map(|h| h[40 + 20].seq).collect();
    let before = segment_files(&cluster.archive());
    let output = cluster.lockstep(&["restore", "--to-seq", &seq_vector(&middle), "--in-place"]);
    assert!(output.status.success(), "{}", text(&output));
    for (i, target) in middle.iter().enumerate() {
        let live = live_keys(&cluster, i).await;
        assert_eq!(
            live,
            state(&history[i], |w| w.seq <= *target),
            "live shard {i}"
        );
        write(&cluster, i, "after-restore".into(), false).await;
    }
    let status = wait_shipped(&cluster).await;
    for shard in status["shards"].as_array().expect("shards") {
        assert_eq!(shard["lineage"]["timeline"], 2, "{shard}");
    }
    let after = segment_files(&cluster.archive());
    assert!(
        before.is_subset(&after),
        "segments of the old lineage changed"
    );
    assert!(
        after.len() > before.len(),
        "the new lineage shipped nothing"
    );

    // The tag taken before that restore is on the history the restore abandoned: a time
    // now no longer snaps to it (its writes past the restore point are not the cluster's),
    // but to the backup the live history shares.
    let now = chrono::Utc::now().to_rfc3339();
    let snapped = dry_run(&cluster, &["--to-time", &now]);
    assert!(
        snapped["note"]
            .as_str()
            .is_some_and(|n| n.contains(&format!("snapped to backup {backup_id}"))),
        "{snapped:#}"
    );
}
