//! The repository over time: retention removes what the policy no longer keeps, says why,
//! changes nothing on a dry run, never removes what a kept backup needs, and what stays still
//! verifies and restores.

use lockstep_tests::text;

use crate::cluster::{Cluster, json};

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
