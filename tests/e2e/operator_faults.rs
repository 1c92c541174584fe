//! Faults operators cause every week, driven through the real binaries: a mistyped flag, a
//! swapped endpoint, a manifest that cannot be read, a coordinator killed mid-operation. None
//! may lose a shard, record a wrong one, or leave the cluster held.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_proto::v1;
use lockstep_proto::v1::coordinator_client::CoordinatorClient;
use lockstep_tests::{agent_ok, binary, text};

use crate::cluster::{Cluster, N_AGENTS, json, wait_until};
use crate::cluster_restore::assert_no_restore_leftovers;

#[test]
fn serving_with_a_capture_dir_that_holds_the_shard_is_refused_and_deletes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("DATA");
    let db = data.join("shard-0");
    let repo = dir.path().join("repo");
    let (db_arg, repo_arg) = (db.to_str().expect("utf-8"), repo.to_str().expect("utf-8"));
    agent_ok(&["load", "--db", db_arg, "--keys", "1000"]);
    let before: Vec<_> = std::fs::read_dir(&db)
        .expect("read shard")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();

    for capture_dir in [data.clone(), db.clone(), db.join("captures")] {
        let mut child = Command::new(binary("lockstep-agent"))
            .args([
                "serve",
                "--plaintext",
                "--db",
                db_arg,
                "--shard",
                "shard-0",
                "--listen",
            ])
            .arg("127.0.0.1:0")
            .args(["--repo", repo_arg, "--capture-dir"])
            .arg(&capture_dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lockstep-agent serve");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = child.wait_with_output().expect("output");
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "--capture-dir {} must be refused as a bad argument:\n{out}",
            capture_dir.display()
        );
        assert!(out.contains("ERR_INVALID_ARGUMENT"), "{out}");
        assert!(!out.contains("listening"), "{out}");
        for name in &before {
            assert!(
                db.join(name).exists(),
                "{} lost {:?}:\n{out}",
                capture_dir.display(),
                name
            );
        }
    }
    // The shard still backs up: nothing of it went.
    agent_ok(&["backup", "--db", db_arg, "--repo", repo_arg]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_is_refused_while_a_possible_child_of_the_backup_cannot_be_read() {
    let cluster = Cluster::start(10_000, None);
    let full = cluster.backup("full");
    let incremental = cluster.backup("incremental");
    // The child's manifest cannot be read: a damaged byte here stands for a read that fails.
    let manifest = cluster
        .repo()
        .join("backups")
        .join(format!("{incremental}.json"));
    let intact = std::fs::read(&manifest).expect("read the incremental's manifest");
    std::fs::write(&manifest, b"{ not json").expect("damage it");

    let delete = cluster.lockstep(&["backup", "delete", &full]);
    assert!(!delete.status.success(), "{}", text(&delete));
    assert!(
        text(&delete).contains(&incremental) && text(&delete).contains("nothing was deleted"),
        "{}",
        text(&delete)
    );
    // Readable again, the incremental still restores through its parent.
    std::fs::write(&manifest, intact).expect("repair");
    let shown = cluster.lockstep(&["backup", "show", &full]);
    assert!(shown.status.success(), "the parent went: {}", text(&shown));
    let verify = cluster.lockstep(&["backup", "verify", &incremental, "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));

    // A manifest that stays damaged is deleted by name, and then its parent can go.
    std::fs::write(&manifest, b"{ not json").expect("damage it again");
    for backup in [&incremental, &full] {
        let delete = cluster.lockstep(&["backup", "delete", backup]);
        assert!(delete.status.success(), "{backup}: {}", text(&delete));
    }
    let shard_manifests: Vec<_> = walk(&cluster.repo().join("shards"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&incremental))
        .collect();
    assert_eq!(shard_manifests, Vec::<std::path::PathBuf>::new());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_answering_for_other_shards_are_refused_before_anything_is_recorded() {
    let mut cluster = Cluster::start(10_000, None);
    // The operator swapped two endpoints in the configuration.
    let config = std::fs::read_to_string(cluster.config_path()).expect("read config");
    let (a, b) = (&cluster.addresses[0], &cluster.addresses[1]);
    let swapped = config
        .replace(a.as_str(), "@A@")
        .replace(b.as_str(), a.as_str())
        .replace("@A@", b.as_str());
    std::fs::write(cluster.config_path(), swapped).expect("write config");
    cluster.kill_coordinator();
    cluster.start_coordinator(None);

    let tag = cluster.lockstep(&["tag", "create", "swapped"]);
    assert!(!tag.status.success(), "{}", text(&tag));
    assert!(
        text(&tag).contains("serves shard") && text(&tag).contains("ERR_INVALID_ARGUMENT"),
        "{}",
        text(&tag)
    );
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(!backup.status.success(), "{}", text(&backup));
    assert!(text(&backup).contains("serves shard"), "{}", text(&backup));
    let tags = json(&cluster.lockstep(&["tag", "list", "--json"]));
    assert_eq!(tags.as_array().map(Vec::len), Some(0), "{tags}");
    let backups = json(&cluster.lockstep(&["backup", "list", "--json"]));
    assert_eq!(backups.as_array().map(Vec::len), Some(0), "{backups}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_while_agents_upload_leaves_no_shard_manifest_after_it_restarts() {
    let mut cluster = Cluster::start_loaded(10_000, 48);
    let mut client = CoordinatorClient::connect(cluster.coordinator_address.clone())
        .await
        .expect("connect coordinator");
    let job = client
        .create_backup(v1::CreateBackupRequest {
            kind: "full".into(),
            ..Default::default()
        })
        .await
        .expect("create backup")
        .into_inner();
    let backup = job.backup_id.clone();
    // Killed as soon as the job reports UPLOADING: every agent took Commit and uploads on.
    let uploading = wait_until(Duration::from_secs(60), || {
        let mut client = client.clone();
        let backup = backup.clone();
        async move {
            client
                .get_backup_job(v1::GetBackupJobRequest { backup_id: backup })
                .await
                .is_ok_and(|job| job.into_inner().state() == v1::JobState::Uploading)
        }
    })
    .await;
    assert!(uploading.is_some(), "the backup never reported UPLOADING");
    cluster.kill_coordinator();
    cluster.start_coordinator(None);

    // Once no agent works for the backup any more, nothing of it is left in the repository.
    for i in 0..N_AGENTS {
        let agent = cluster.agent_client(i).await;
        let done = wait_until(Duration::from_secs(120), || {
            let mut agent = agent.clone();
            let backup = backup.clone();
            async move {
                agent
                    .status(v1::BarrierRequest { backup_id: backup })
                    .await
                    .is_ok_and(|s| s.into_inner().state() != v1::BarrierState::Uploading)
            }
        })
        .await;
        assert!(done.is_some(), "agent {i} still uploads");
    }
    let left = || -> Vec<std::path::PathBuf> {
        (0..N_AGENTS)
            .map(|i| {
                cluster
                    .repo()
                    .join("shards")
                    .join(Cluster::shard(i))
                    .join(format!("{backup}.json"))
            })
            .chain([cluster
                .repo()
                .join("pending")
                .join(format!("{backup}.json"))])
            .filter(|p| p.exists())
            .collect()
    };
    let cleaned = wait_until(Duration::from_secs(60), || {
        let none = left().is_empty();
        async move { none }
    })
    .await;
    assert!(cleaned.is_some(), "left in the repository: {:?}", left());
    assert!(
        !cluster
            .repo()
            .join("backups")
            .join(format!("{backup}.json"))
            .exists()
    );
}

/// Takes a backup, then starts `lockstep restore latest --in-place` and waits until the
/// coordinator (started with the `before-apply` fault pause) has every shard staged.
async fn restore_paused_before_apply(cluster: &Cluster) -> std::process::Child {
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));
    restore_paused(cluster).await
}

/// Starts `lockstep restore latest --in-place` and waits until the coordinator pauses at its
/// fault point.
async fn restore_paused(cluster: &Cluster) -> std::process::Child {
    let restore = cluster.spawn_lockstep(&["restore", "latest", "--in-place"]);
    cluster.wait_for_fault_pause().await;
    restore
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_with_every_shard_staged_leaves_the_cluster_usable_after_it_restarts()
{
    // The coordinator stops between the last shard staged and Apply.
    let mut cluster = Cluster::start(10_000, Some("before-apply:600000"));
    let mut restore = restore_paused_before_apply(&cluster).await;
    cluster.kill_coordinator();
    let _ = restore.kill();
    let _ = restore.wait();
    cluster.start_coordinator(None);

    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(
        backup.status.success(),
        "a backup after the restart: {}",
        text(&backup)
    );
    let rerun = cluster.lockstep(&["restore", "latest", "--in-place"]);
    assert!(
        rerun.status.success(),
        "the restore again: {}",
        text(&rerun)
    );
    assert_no_restore_leftovers(cluster.dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_abort_stops_a_restore_before_apply_and_leaves_every_shard_as_it_was() {
    let cluster = Cluster::start(10_000, Some("before-apply:600000"));
    let restore = restore_paused_before_apply(&cluster).await;

    let abort = cluster.lockstep(&["restore", "--abort"]);
    assert!(abort.status.success(), "{}", text(&abort));
    assert!(text(&abort).contains("cancelled"), "{}", text(&abort));
    let ended = restore.wait_with_output().expect("the restore ends");
    assert!(
        !ended.status.success(),
        "the aborted restore reported success"
    );
    assert!(text(&ended).contains("cancelled"), "{}", text(&ended));
    assert_no_restore_leftovers(cluster.dir.path()).await;
    // Nothing to abort any more; the cluster takes backups.
    let again = cluster.lockstep(&["restore", "--abort"]);
    assert!(
        text(&again).contains("no restore to abort"),
        "{}",
        text(&again)
    );
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));
}

async fn put_everywhere(cluster: &Cluster, key: &str) {
    for i in 0..N_AGENTS {
        cluster
            .shard_client(i)
            .await
            .put(v1::PutRequest {
                column_family: String::new(),
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
            })
            .await
            .expect("put");
    }
}

/// Kills the coordinator of an in-place restore at its fault point `fault` and restarts it;
/// returns whether each shard ended up restored (true) or as it was (false).
async fn restore_interrupted_at(fault: &str) -> Vec<bool> {
    let mut cluster = Cluster::start(10_000, Some(fault));
    put_everywhere(&cluster, "in-the-backup").await;
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));
    put_everywhere(&cluster, "after-the-backup").await;
    let mut restore = restore_paused(&cluster).await;
    cluster.kill_coordinator();
    let _ = restore.kill();
    let _ = restore.wait();
    cluster.start_coordinator(None);

    // The restart settled the restore, one way on every shard.
    let mut restored = Vec::new();
    for i in 0..N_AGENTS {
        let keys = crate::cluster_restore::live_keys(&cluster, i).await;
        assert!(keys.contains("in-the-backup"), "shard {i}: {keys:?}");
        restored.push(!keys.contains("after-the-backup"));
    }
    // The record is removed; the decision stays.
    let records: Vec<_> = std::fs::read_dir(cluster.repo().join("restores"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    assert!(records.is_empty(), "restore records left: {records:?}");
    assert_no_restore_leftovers(cluster.dir.path()).await;
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));
    restored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_with_every_shard_swapped_reverts_them_all_when_it_restarts() {
    // Every shard is swapped in, its gate closed, and no decision is stored: the restarted
    // coordinator decides revert.
    let restored = restore_interrupted_at("swapped:600000").await;
    assert_eq!(restored, vec![false; N_AGENTS], "every shard as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_after_deciding_to_commit_finishes_the_restore_when_it_restarts() {
    let restored = restore_interrupted_at("decided:600000").await;
    assert_eq!(restored, vec![true; N_AGENTS], "every shard restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_fences_out_the_first_and_nothing_listed_is_unrestorable() {
    // The first coordinator pauses between its last upload and publishing the backup.
    let cluster = Cluster::start(10_000, Some("before-publish:12000"));
    let first = cluster.spawn_lockstep(&["backup", "create", "--wait"]);
    cluster.wait_for_fault_pause().await;

    // A second coordinator of the same cluster starts on the same repository (a rolling
    // update): it takes the repository over.
    let (mut second, address) = lockstep_tests::start_server(
        "lockstep",
        &[
            "serve".to_string(),
            "--config".to_string(),
            cluster.config_path().display().to_string(),
        ],
        &[],
        &cluster.log("coordinator-2"),
    );
    let second_address = format!("http://{address}");
    let on_second = |args: &[&str]| {
        Command::new(binary("lockstep"))
            .args(args)
            .env("LOCKSTEP_COORDINATOR", &second_address)
            .output()
            .expect("run lockstep")
    };

    let first = first.wait_with_output().expect("the first backup ends");
    assert!(!first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("ERR_COORDINATOR_FENCED"),
        "{}",
        text(&first)
    );
    // The fenced coordinator refuses to act, and says why.
    let refused = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("ERR_COORDINATOR_FENCED"),
        "{}",
        text(&refused)
    );

    // The second one works, and every backup it lists verifies in full.
    let backup = on_second(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));
    let listed = json(&on_second(&["backup", "list", "--json"]));
    let listed = listed.as_array().expect("a list").clone();
    assert_eq!(
        listed.len(),
        1,
        "only the second coordinator's backup: {listed:?}"
    );
    let verify = on_second(&["backup", "verify", "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));
    let _ = second.kill();
    let _ = second.wait();
}

#[test]
fn a_coordinator_of_another_cluster_is_refused_on_the_repository() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    let config = |cluster: &str| {
        let path = dir.path().join(format!("{cluster}.toml"));
        std::fs::write(
            &path,
            format!(
                "cluster = \"{cluster}\"\nrepository = \"{}\"\nlisten = \"127.0.0.1:0\"\nplaintext = true\nagents = []\n",
                repo.display()
            ),
        )
        .expect("write config");
        path
    };
    let (mut first, _) = lockstep_tests::start_server(
        "lockstep",
        &[
            "serve".to_string(),
            "--config".to_string(),
            config("eu-prod").display().to_string(),
        ],
        &[],
        &dir.path().join("eu-prod.log"),
    );
    let _ = first.kill();
    let _ = first.wait();
    let other = Command::new(binary("lockstep"))
        .args(["serve", "--config"])
        .arg(config("us-prod"))
        .output()
        .expect("run lockstep serve");
    assert_eq!(other.status.code(), Some(2), "{}", text(&other));
    assert!(
        text(&other).contains("belongs to cluster \"eu-prod\""),
        "{}",
        text(&other)
    );
}
