//! The consistent cut: a writer chains writes across shards (`a_i` on one shard, then, only
//! after its acknowledgement, `b_i` on the next) while backups run. Every restored backup holds
//! every write acknowledged before the backup began, nothing started after it finished, and
//! never `b_i` without `a_i`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep_proto::v1;
use lockstep_tests::text;

use crate::cluster::{Cluster, N_AGENTS, json, wait_until};

struct Record {
    shard: usize,
    key: Vec<u8>,
    started: Instant,
    acked: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_under_load_are_consistent_cuts_of_every_raid_member() {
    let cluster = Arc::new(Cluster::start(5000, None));
    let mut clients = Vec::new();
    for i in 0..N_AGENTS {
        clients.push(cluster.shard_client(i).await);
    }
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (records, stop) = (records.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && i < 200_000 {
                for (shard, key) in [
                    (i % N_AGENTS, format!("a{i:08}")),
                    ((i + 1) % N_AGENTS, format!("b{i:08}")),
                ] {
                    let started = Instant::now();
                    let request = v1::PutRequest {
                        column_family: String::new(),
                        key: key.clone().into_bytes(),
                        value: vec![b'v'; 64],
                    };
                    clients[shard].put(request).await.expect("put");
                    records.lock().expect("records").push(Record {
                        shard,
                        key: key.into_bytes(),
                        started,
                        acked: Instant::now(),
                    });
                }
                i += 1;
            }
        })
    };

    let mut backups = Vec::new();
    for round in 0..3 {
        // Let the writer make progress between backups.
        let target = (round + 1) * 300;
        let waited = wait_until(Duration::from_secs(30), || {
            let records = records.clone();
            async move { records.lock().expect("records").len() >= target }
        })
        .await;
        assert!(waited.is_some(), "the writer made no progress");
        let began = Instant::now();
        let c = cluster.clone();
        let output = tokio::task::spawn_blocking(move || {
            c.lockstep(&["backup", "create", "--wait", "--json"])
        })
        .await
        .expect("backup task");
        let ended = Instant::now();
        assert!(output.status.success(), "backup failed:\n{}", text(&output));
        let job = json(&output);
        assert_eq!(job["state"], "committed", "{job}");
        backups.push((
            job["backup_id"].as_str().expect("backup_id").to_string(),
            began,
            ended,
        ));
    }
    let seen_after = records.lock().expect("records").len();
    let waited = wait_until(Duration::from_secs(30), || {
        let records = records.clone();
        async move { records.lock().expect("records").len() >= seen_after + 100 }
    })
    .await;
    assert!(waited.is_some(), "the writer stopped");
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    let records = records.lock().expect("records");

    for (backup, began, ended) in &backups {
        let mut present = HashSet::new();
        for shard in 0..N_AGENTS {
            for key in cluster.restored_keys(backup, shard) {
                present.insert((shard, key));
            }
        }
        let (mut before, mut after) = (0, 0);
        for record in records.iter() {
            let is_present = present.contains(&(record.shard, record.key.clone()));
            if record.acked < *began {
                before += 1;
                assert!(
                    is_present,
                    "backup {backup} lacks {:?}, acknowledged before it began",
                    String::from_utf8_lossy(&record.key)
                );
            }
            if record.started > *ended {
                after += 1;
                assert!(
                    !is_present,
                    "backup {backup} holds {:?}, written after it finished",
                    String::from_utf8_lossy(&record.key)
                );
            }
            if record.key[0] == b'b' && is_present {
                let mut a_key = record.key.clone();
                a_key[0] = b'a';
                let a_shard = (record.shard + N_AGENTS - 1) % N_AGENTS;
                assert!(
                    present.contains(&(a_shard, a_key)),
                    "backup {backup} splits a causal pair: has {:?} but not its a",
                    String::from_utf8_lossy(&record.key)
                );
            }
        }
        assert!(
            before > 0 && after > 0,
            "backup {backup}: {before} writes before, {after} after: the test must straddle the backup"
        );
    }

    // The catalog lists them, the write pause is recorded, and full verify passes.
    let list = json(&cluster.lockstep(&["backup", "list", "--json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(backups.len()), "{list}");
    for entry in list.as_array().into_iter().flatten() {
        assert!(entry["max_gate_closed_us"].as_u64() > Some(0), "{entry}");
        assert_eq!(entry["raid_groups"][0]["layout"], "raid5");
    }
    let verify = cluster.lockstep(&["backup", "verify", &backups[0].0, "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));

    // A backup that lacks its parity member is reported as incomplete.
    let manifest_path = cluster
        .repo()
        .join("backups")
        .join(format!("{}.json", backups[0].0));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).expect("read")).expect("parse");
    manifest["shards"]
        .as_array_mut()
        .expect("shards")
        .retain(|s| s["shard_id"] != "shard-2");
    manifest["cut"]
        .as_object_mut()
        .expect("cut")
        .remove("shard-2");
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).expect("json")).expect("write");
    let verify = cluster.lockstep(&["backup", "verify", &backups[0].0]);
    let out = text(&verify);
    assert!(!verify.status.success(), "{out}");
    assert!(
        out.contains("ERR_BACKUP_INCOMPLETE") && out.contains("parity member shard-2"),
        "{out}"
    );
}

/// Prepare with a close time (ARCHITECTURE.md, "Scheduled close"), against a real agent: the
/// gate stays open until the close time and the cut holds what was written meanwhile; an
/// Abort sent during the wait wins; a close time far off waits at most `MAX_CLOSE_WAIT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_closes_the_gate_at_its_close_time_and_an_abort_during_the_wait_wins() {
    let cluster = Cluster::start(5000, None);
    let mut agent = cluster.agent_client(0).await;
    let control = agent.clone();
    let mut shard = cluster.shard_client(0).await;
    let unix_us_in = |wait: Duration| {
        let at = std::time::SystemTime::now() + wait;
        at.duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_micros() as u64
    };
    let request = |backup: &str, close_at_unix_us: u64| v1::PrepareRequest {
        backup_id: backup.to_string(),
        lease_ms: 5000,
        close_at_unix_us,
        ..Default::default()
    };
    let stage = |backup: &str| {
        let (mut agent, request) = (control.clone(), request(backup, 0));
        async move {
            let staged = agent.stage(request).await.expect("stage").into_inner();
            assert_eq!(staged.state, v1::BarrierState::Staged as i32, "{staged:?}");
        }
    };
    let prepare = |backup: &str, wait: Duration| {
        let (mut agent, request) = (control.clone(), request(backup, unix_us_in(wait)));
        tokio::spawn(async move {
            let sent = Instant::now();
            let status = agent.prepare(request).await.expect("prepare").into_inner();
            (sent.elapsed(), status)
        })
    };

    // The gate stays open until the close time; a write acknowledged meanwhile is in the cut.
    stage("bk-close-at").await;
    let prepared = prepare("bk-close-at", Duration::from_millis(600));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        cluster.gate_closed(0).await,
        Some(false),
        "closed before its time"
    );
    let written = shard
        .put(v1::PutRequest {
            column_family: String::new(),
            key: b"before-the-close-time".to_vec(),
            value: b"1".to_vec(),
        })
        .await
        .expect("a write while Prepare waits")
        .into_inner();
    let (took, status) = prepared.await.expect("join");
    assert_eq!(
        status.state,
        v1::BarrierState::Prepared as i32,
        "{status:?}"
    );
    assert!(took >= Duration::from_millis(550), "closed after {took:?}");
    assert!(
        status.seq >= written.last_seq,
        "the cut misses a write made before it"
    );
    assert_eq!(cluster.gate_closed(0).await, Some(true));
    agent
        .abort(v1::BarrierRequest {
            backup_id: "bk-close-at".into(),
        })
        .await
        .expect("abort");
    assert_eq!(cluster.gate_closed(0).await, Some(false));

    // An Abort during the wait wins: the Prepare finds the barrier aborted, no gate closes.
    stage("bk-aborted-first").await;
    let prepared = prepare("bk-aborted-first", Duration::from_millis(800));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let aborted = agent
        .abort(v1::BarrierRequest {
            backup_id: "bk-aborted-first".into(),
        })
        .await
        .expect("abort during the wait")
        .into_inner();
    assert_eq!(
        aborted.state,
        v1::BarrierState::Aborted as i32,
        "{aborted:?}"
    );
    let (_, status) = prepared.await.expect("join");
    assert_eq!(status.state, v1::BarrierState::Aborted as i32, "{status:?}");
    assert_eq!(cluster.gate_closed(0).await, Some(false));

    // A close time a minute off (a coordinator's clock far ahead) waits at most 1 s.
    stage("bk-far-off").await;
    let (took, status) = prepare("bk-far-off", Duration::from_secs(60))
        .await
        .expect("join");
    assert_eq!(
        status.state,
        v1::BarrierState::Prepared as i32,
        "{status:?}"
    );
    assert!(
        (Duration::from_millis(950)..Duration::from_secs(4)).contains(&took),
        "waited {took:?}"
    );
    agent
        .abort(v1::BarrierRequest {
            backup_id: "bk-far-off".into(),
        })
        .await
        .expect("abort");
}
