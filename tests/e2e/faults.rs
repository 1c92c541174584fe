//! Processes killed inside the barrier: no partial backup, no shard left frozen.

use std::time::Duration;

use lockstep_proto::v1;
use lockstep_tests::text;

use crate::cluster::{Cluster, all_gates, json, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_between_prepare_and_commit_fails_the_backup_and_the_others_reopen() {
    let mut cluster = Cluster::start(6000, Some("before-commit:1500"));
    let (bin_env, address) = (
        cluster.coordinator_address.clone(),
        lockstep_tests::binary("lockstep"),
    );
    let backup = tokio::process::Command::new(address)
        .args(["backup", "create", "--wait"])
        .env("LOCKSTEP_COORDINATOR", bin_env)
        .output();
    let backup = tokio::spawn(backup);
    let closed = wait_until(Duration::from_secs(10), || all_gates(&cluster, true, None)).await;
    assert!(closed.is_some(), "the barrier never closed every gate");
    cluster.kill_agent(1);

    let output = backup.await.expect("join").expect("run lockstep");
    let out = text(&output);
    assert!(
        !output.status.success(),
        "the backup succeeded without shard-1:\n{out}"
    );
    assert!(
        out.contains("shard-1"),
        "the error names the killed shard:\n{out}"
    );
    let reopened = wait_until(Duration::from_millis(cluster.lease_ms), || {
        all_gates(&cluster, false, Some(1))
    })
    .await;
    assert!(
        reopened.is_some(),
        "the surviving agents did not reopen their gates within the lease"
    );

    cluster.restart_agent(1);
    let mut shard = cluster.shard_client(1).await;
    shard
        .put(v1::PutRequest {
            column_family: String::new(),
            key: b"after-restart".to_vec(),
            value: b"1".to_vec(),
        })
        .await
        .expect("the restarted agent serves writes");
    let next = cluster.lockstep(&["backup", "create", "--wait", "--json"]);
    assert!(next.status.success(), "{}", text(&next));
    let list = json(&cluster.lockstep(&["backup", "list", "--json"]));
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "only the second backup exists: {list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_after_prepare_leaves_no_frozen_shard_and_no_partial_backup() {
    let lease_ms = 3000;
    let mut cluster = Cluster::start(lease_ms, Some("before-commit:600000"));
    let started = json(&cluster.lockstep(&["backup", "create", "--json"]));
    let backup = started["backup_id"]
        .as_str()
        .expect("backup_id")
        .to_string();
    let closed = wait_until(Duration::from_secs(10), || all_gates(&cluster, true, None)).await;
    assert!(closed.is_some(), "the barrier never closed every gate");
    cluster.kill_coordinator();

    let reopened = wait_until(Duration::from_millis(lease_ms + 2000), || {
        all_gates(&cluster, false, None)
    })
    .await
    .expect("agents reopen their gates by themselves");
    eprintln!(
        "gates reopened {} ms after the coordinator was killed (lease {lease_ms} ms)",
        reopened.as_millis()
    );
    assert!(
        reopened <= Duration::from_millis(lease_ms + 1000),
        "reopened after {reopened:?}, lease is {lease_ms} ms"
    );
    let mut agent = cluster.agent_client(0).await;
    let status = agent
        .status(v1::BarrierRequest {
            backup_id: backup.clone(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.state, v1::BarrierState::Expired as i32);
    assert_eq!(status.error_code, "ERR_BARRIER_LEASE_EXPIRED");

    let pending = cluster
        .repo()
        .join("pending")
        .join(format!("{backup}.json"));
    assert!(
        pending.exists(),
        "the intent marker shows the backup was started"
    );
    cluster.start_coordinator(None);
    assert!(
        !pending.exists(),
        "the restarted coordinator removed the leftovers"
    );
    let list = json(&cluster.lockstep(&["backup", "list", "--json"]));
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(0),
        "no partial backup is listed: {list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_before_publishing_leaves_shard_manifests_that_the_restart_removes() {
    let mut cluster = Cluster::start(5000, Some("before-publish:600000"));
    let started = json(&cluster.lockstep(&["backup", "create", "--json"]));
    let backup = started["backup_id"]
        .as_str()
        .expect("backup_id")
        .to_string();
    let manifests: Vec<_> = (0..3)
        .map(|i| {
            cluster
                .repo()
                .join("shards")
                .join(format!("shard-{i}"))
                .join(format!("{backup}.json"))
        })
        .collect();
    let uploaded = wait_until(Duration::from_secs(30), || {
        let all = manifests.iter().all(|m| m.exists());
        async move { all }
    })
    .await;
    assert!(
        uploaded.is_some(),
        "the agents never published their shard manifests"
    );
    cluster.kill_coordinator();
    assert!(
        !cluster
            .repo()
            .join("backups")
            .join(format!("{backup}.json"))
            .exists()
    );

    cluster.start_coordinator(None);
    for manifest in &manifests {
        assert!(
            !manifest.exists(),
            "{} is a leftover that was not removed",
            manifest.display()
        );
    }
    let list = json(&cluster.lockstep(&["backup", "list", "--json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    let next = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(next.status.success(), "{}", text(&next));
}
