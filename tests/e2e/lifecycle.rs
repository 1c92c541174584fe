//! The repository over time: retention removes what the policy no longer keeps, says why,
//! changes nothing on a dry run, never removes what a kept backup needs, and what stays still
//! verifies and restores.

use std::time::Duration;

use lockstep_tests::text;

use crate::cluster::{Cluster, json};
use crate::pitr::{wait_shipped, write};

fn listed(cluster: &Cluster) -> Vec<String> {
    json(&cluster.lockstep(&["backup", "list", "--json"]))
        .as_array()
        .expect("a list")
        .iter()
        .map(|b| b["backup_id"].as_str().expect("id").to_string())
        .collect()
}

/// Restarts the coordinator with `policy` added to `[retention]` (the configuration's last
/// table).
fn with_retention(cluster: &mut Cluster, policy: &str) {
    let mut config = std::fs::read_to_string(cluster.config_path()).expect("config");
    if !config.contains("[retention]") {
        config.push_str("\n[retention]\n");
    }
    config.push_str(&format!("{policy}\n"));
    std::fs::write(cluster.config_path(), config).expect("write config");
    cluster.kill_coordinator();
    cluster.start_coordinator(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_what_the_policy_no_longer_keeps_and_what_stays_restores() {
    let mut cluster = Cluster::start(5000, None);
    // No policy: applying is refused, nothing changes.
    let refused = cluster.lockstep(&["retention", "apply"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("[retention]"), "{}", text(&refused));

    let f1 = cluster.backup("full");
    let i1 = cluster.backup("incremental");
    let f2 = cluster.backup("full");
    let d2 = cluster.backup("differential");
    // Listed page by page, oldest first, as the CLI does.
    let mut client = lockstep_proto::v1::coordinator_client::CoordinatorClient::connect(
        cluster.coordinator_address.clone(),
    )
    .await
    .expect("connect");
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let reply = client
            .list_backups(lockstep_proto::v1::ListBackupsRequest {
                page_size: 3,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert!(reply.backups.len() <= 3);
        paged.extend(reply.backups.into_iter().map(|b| b.backup_id));
        token = reply.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(paged, vec![f1.clone(), i1.clone(), f2.clone(), d2.clone()]);
    assert_eq!(listed(&cluster), paged);
    with_retention(&mut cluster, "keep_full = 1");

    let dry = cluster.lockstep(&["retention", "apply", "--dry-run", "--json"]);
    assert!(dry.status.success(), "{}", text(&dry));
    let plan = json(&dry);
    assert_eq!(plan["applied"], false);
    let removed: Vec<&str> = plan["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|item| item["remove"] == true)
        .map(|item| item["name"].as_str().expect("name"))
        .collect();
    assert_eq!(removed, vec![f1.as_str(), i1.as_str()], "{plan}");
    assert_eq!(listed(&cluster).len(), 4, "a dry run changes nothing");

    let applied = cluster.lockstep(&["retention", "apply"]);
    assert!(applied.status.success(), "{}", text(&applied));
    let printed = text(&applied);
    assert!(printed.contains("Removed 2 backup(s)"), "{printed}");
    assert!(printed.contains("no rule keeps it"), "{printed}");
    assert!(printed.contains("WAL archive: kept"), "{printed}");
    assert_eq!(listed(&cluster), vec![f2.clone(), d2.clone()]);
    let verify = cluster.lockstep(&["backup", "verify", "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));
    let target = cluster.dir.path().join("restored");
    let restore = cluster.lockstep(&["restore", &d2, "--to", target.to_str().expect("utf-8")]);
    assert!(restore.status.success(), "{}", text(&restore));

    // Applied after every backup: the next full takes the place of the last one's chain.
    with_retention(&mut cluster, "after_backup = true");
    let f3 = cluster.backup("full");
    assert_eq!(listed(&cluster), vec![f3]);
}

/// Every WAL segment file of shard-0 in the archive, with its first sequence number.
fn shard_0_segments(archive: &std::path::Path) -> Vec<(u64, std::path::PathBuf)> {
    let mut out = Vec::new();
    let mut dirs = vec![archive.join("wal").join(Cluster::shard(0))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(first) = path
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| n.ends_with(".seg"))
                .and_then(|n| n.split('-').next())
                .and_then(|n| n.parse().ok())
            {
                out.push((first, path));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_samples_checks_each_backup_and_finds_an_archive_that_does_not_reach_back() {
    let mut cluster = Cluster::start(5000, None);
    cluster.reconfigure("[verify]\nafter_backup = \"full\"\n");
    for i in 0..3 {
        for k in 0..30 {
            write(&cluster, i, format!("before-{k:03}"), false).await;
        }
    }
    let backup = cluster.backup("full");
    let verified = crate::cluster::wait_until(Duration::from_secs(30), || {
        let log = std::fs::read_to_string(cluster.log("coordinator")).unwrap_or_default();
        async move { log.contains("verified after the backup: passed") }
    })
    .await;
    assert!(verified.is_some(), "no verify after the backup");
    // Two rounds, each shipped before the next: segments start right after the cut and later.
    for round in 0..2 {
        for i in 0..3 {
            for k in 0..30 {
                write(&cluster, i, format!("after-{round}-{k:03}"), false).await;
            }
        }
        wait_shipped(&cluster).await;
    }

    let sampled = cluster.lockstep(&["backup", "verify", "--full", "--sample", "50", "--json"]);
    assert!(sampled.status.success(), "{}", text(&sampled));
    let report = json(&sampled);
    assert_eq!(report["sample_percent"], 50, "{report}");
    let (checked, named) = (
        report["objects_checked"].as_u64().unwrap_or(0),
        report["objects_named"].as_u64().unwrap_or(0),
    );
    assert!(0 < checked && checked < named, "{checked} of {named}");
    let refused = cluster.lockstep(&["backup", "verify", "--sample", "0"]);
    assert!(!refused.status.success(), "{}", text(&refused));

    // The archive loses the WAL right after the backup's cut on shard-0: the segments left
    // are contiguous, but the points between the backup and them cannot be restored.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            cluster
                .repo()
                .join("backups")
                .join(format!("{backup}.json")),
        )
        .expect("manifest"),
    )
    .expect("json");
    let cut = manifest["cut"][Cluster::shard(0)].as_u64().expect("cut");
    let segments = shard_0_segments(&cluster.archive());
    assert!(
        segments.iter().any(|(first, _)| *first > cut + 1),
        "{segments:?}"
    );
    for (first, path) in &segments {
        if *first <= cut + 1 {
            std::fs::remove_file(path).expect("remove segment");
        }
    }
    let verify = cluster.lockstep(&["backup", "verify"]);
    let out = text(&verify);
    assert!(!verify.status.success(), "{out}");
    assert!(
        out.contains("ERR_BACKUP_WAL_GAP") && out.contains("oldest backup on this lineage"),
        "cut {cut}, segments {segments:?}, left {:?}: {out}",
        shard_0_segments(&cluster.archive())
    );
}
