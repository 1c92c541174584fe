//! The repository over time: retention removes what the policy no longer keeps, says why,
//! changes nothing on a dry run, never removes what a kept backup needs, and what stays still
//! verifies and restores.

use std::time::Duration;

use lockstep_tests::text;

use crate::cluster::{Cluster, json};
use crate::pitr::{wait_shipped, write};

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
    assert_eq!(cluster.listed(), paged);
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
    assert_eq!(cluster.listed().len(), 4, "a dry run changes nothing");

    let applied = cluster.lockstep(&["retention", "apply"]);
    assert!(applied.status.success(), "{}", text(&applied));
    let printed = text(&applied);
    assert!(printed.contains("Removed 2 backup(s)"), "{printed}");
    assert!(printed.contains("no rule keeps it"), "{printed}");
    assert!(
        printed.contains("kept whole: set prune_wal_archive = true"),
        "{printed}"
    );
    assert_eq!(cluster.listed(), vec![f2.clone(), d2.clone()]);
    let verify = cluster.lockstep(&["backup", "verify", "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));
    let target = cluster.dir.path().join("restored");
    let restore = cluster.lockstep(&["restore", &d2, "--to", target.to_str().expect("utf-8")]);
    assert!(restore.status.success(), "{}", text(&restore));

    // Applied after every backup: the next full takes the place of the last one's chain.
    with_retention(&mut cluster, "after_backup = true");
    let f3 = cluster.backup("full");
    assert_eq!(cluster.listed(), vec![f3]);
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
    // Incremental: the full verifies before (after the backup, and the sample) recorded what
    // they checked whole; within the window none of it is checked again.
    let incremental = |cluster: &Cluster| {
        let out = cluster.lockstep(&[
            "backup",
            "verify",
            "--full",
            "--skip-verified-within",
            "24",
            "--json",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let report = json(&out);
        (
            report["objects_checked"].as_u64().unwrap_or(0),
            report["objects_skipped"].as_u64().unwrap_or(0),
        )
    };
    assert_eq!(
        incremental(&cluster),
        (0, named),
        "every object was checked whole already"
    );

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

    // A damaged object that the next backup names again (its SST did not change): the
    // verify after that backup fails and says so; the backup stands, for an operator.
    let largest = lockstep_tests::files_under(&cluster.repo().join("objects"))
        .into_iter()
        .max_by_key(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .expect("an object");
    let mut bytes = std::fs::read(&largest).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x20;
    std::fs::write(&largest, bytes).expect("damage");
    let failed = |cluster: &Cluster| {
        std::fs::read_to_string(cluster.log("coordinator"))
            .unwrap_or_default()
            .matches("verified after the backup: FAILED")
            .count()
    };
    assert_eq!(failed(&cluster), 0);
    let second = cluster.backup("full");
    let noticed = crate::cluster::wait_until(Duration::from_secs(30), || {
        let count = failed(&cluster);
        async move { count == 1 }
    })
    .await;
    let log = std::fs::read_to_string(cluster.log("coordinator")).unwrap_or_default();
    assert!(noticed.is_some(), "the damage went unnoticed:\n{log}");
    assert!(log.contains(&second), "{log}");
    let listed = cluster.lockstep(&["backup", "show", &second]);
    assert!(listed.status.success(), "{}", text(&listed));
}

/// Writes 20 keys to shard-0 (and one to each other shard), each shipped before the next,
/// so the shipper cuts several segments.
async fn round(cluster: &Cluster, history: &mut Vec<crate::pitr::Acked>, name: &str) {
    for k in 0..20 {
        history.push(write(cluster, 0, format!("{name}-{k:03}"), k % 7 == 3).await);
        wait_shipped(cluster).await;
    }
    for shard in 1..crate::cluster::N_AGENTS {
        write(cluster, shard, format!("{name}-other"), false).await;
    }
    wait_shipped(cluster).await;
}

/// Shard-0's sequence number in `backup`.
fn shard_0_seq(cluster: &Cluster, backup: &str) -> u64 {
    json(&cluster.lockstep(&["backup", "show", backup, "--json"]))["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .find(|s| s["shard_id"] == Cluster::shard(0))
        .and_then(|s| s["seq"].as_u64())
        .expect("shard-0's sequence number")
}

/// Each WAL segment of shard-0 in `archive`: `(first, last)`.
fn shard_0_spans(archive: &std::path::Path) -> Vec<(u64, u64)> {
    shard_0_segments(archive)
        .iter()
        .filter_map(|(first, path)| {
            let name = path.file_name()?.to_str()?;
            Some((*first, name.split('-').nth(1)?.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_the_wal_no_kept_backup_replays_and_what_stays_restores() {
    let cluster = Cluster::start(5000, None);
    let archive = cluster.archive();
    prunes_the_wal_no_kept_backup_replays(cluster, &archive).await;
}

/// The same with the archive behind another region's coordinator (`lockstep://`): retention
/// prunes it through that coordinator's `DeleteSegments`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_a_lockstep_archive_through_its_coordinator() {
    let region = tempfile::tempdir().expect("tempdir");
    let (_region, address) = crate::shipping::start_region(region.path(), "127.0.0.1:0");
    let url = format!("lockstep://{address}");
    let cluster = Cluster::start_with(5000, None, vec!["--wal-to".into(), url.clone()], Vec::new());
    let config = std::fs::read_to_string(cluster.config_path()).expect("config");
    let local = format!("wal_archive = \"{}\"", cluster.archive().display());
    assert!(config.contains(&local), "{config}");
    std::fs::write(
        cluster.config_path(),
        config.replace(&local, &format!("wal_archive = \"{url}\"")),
    )
    .expect("write config");
    prunes_the_wal_no_kept_backup_replays(cluster, &region.path().join("repo")).await;
}

/// Two full backups and writes around them, then retention with `keep_full = 1` and
/// `prune_wal_archive`: the pass that removes the first keeps its WAL, the next removes every
/// segment ending at or before the second, and what stays verifies and restores. `archive`:
/// the directory of the repository holding the configured WAL archive.
async fn prunes_the_wal_no_kept_backup_replays(mut cluster: Cluster, archive: &std::path::Path) {
    cluster.reconfigure("[gc]\ngrace_s = 1\n");
    with_retention(&mut cluster, "keep_full = 1\nprune_wal_archive = true");
    let mut history = Vec::new();
    round(&cluster, &mut history, "before-f1").await;
    let f1 = cluster.backup("full");
    round(&cluster, &mut history, "before-f2").await;
    let f2 = cluster.backup("full");
    round(&cluster, &mut history, "after-f2").await;
    let (f1_seq, f2_seq) = (shard_0_seq(&cluster, &f1), shard_0_seq(&cluster, &f2));
    let before = shard_0_spans(archive);
    let last_before_f2 = before
        .iter()
        .map(|(_, last)| *last)
        .filter(|last| *last <= f2_seq)
        .max()
        .expect("segments before f2");
    assert!(
        before
            .iter()
            .filter(|(_, last)| *last > f1_seq && *last <= f2_seq)
            .count()
            >= 2,
        "segments between f1 and f2 to prune: {before:?}"
    );

    // The pass that removes f1 still keeps what f1 replays (a restore may be reading it).
    let applied = cluster.lockstep(&["retention", "apply"]);
    assert!(applied.status.success(), "{}", text(&applied));
    assert!(
        text(&applied).contains("Removed 1 backup(s)"),
        "{}",
        text(&applied)
    );
    assert_eq!(cluster.listed(), vec![f2.clone()], "{f1} went");
    let before = shard_0_spans(archive);
    assert!(
        before
            .iter()
            .any(|(first, last)| *first <= f1_seq + 1 && *last > f1_seq),
        "the WAL after f1 stays in the pass that removes f1: {before:?}"
    );
    let first = before[0].0;

    // Once they are older than the grace, the next pass removes every segment before f2.
    let run = format!(" {first}..={last_before_f2} in ");
    let mut plan = serde_json::Value::Null;
    let planned = crate::cluster::wait_until(Duration::from_secs(20), || {
        plan = json(&cluster.lockstep(&["retention", "apply", "--dry-run", "--json"]));
        let planned = plan["items"].as_array().is_some_and(|items| {
            items.iter().any(|item| {
                item["what"] == "wal"
                    && item["remove"] == true
                    && item["name"].as_str().is_some_and(|name| {
                        name.starts_with(&Cluster::shard(0)) && name.contains(&run)
                    })
            })
        });
        async move { planned }
    })
    .await;
    assert!(planned.is_some(), "{run} not planned for removal: {plan:#}");
    assert_eq!(shard_0_spans(archive), before, "a dry run changes nothing");
    let applied = cluster.lockstep(&["retention", "apply"]);
    assert!(applied.status.success(), "{}", text(&applied));
    let printed = text(&applied);
    assert!(printed.contains("Removed 0 backup(s)"), "{printed}");
    assert!(printed.contains("no backup replays it"), "{printed}");
    let after = shard_0_spans(archive);
    let expected: Vec<(u64, u64)> = before
        .iter()
        .copied()
        .filter(|(_, last)| *last > f2_seq)
        .collect();
    assert_eq!(
        after, expected,
        "exactly the segments ending at or before f2 ({f2_seq}) went"
    );

    // What stays restores: f2 and then every write after it, from the pruned archive.
    let verify = cluster.lockstep(&["backup", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    let dir = cluster.dir.path().join("restored-end");
    let restore = cluster.lockstep(&[
        "restore",
        "--to-archive-end",
        "--to",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(restore.status.success(), "{}", text(&restore));
    assert_eq!(
        crate::pitr::keys_in(&dir.join(Cluster::shard(0))),
        crate::pitr::state(&history, |_| true)
    );
    // A time before f2 has no backup left to start from.
    let early = history[5].hlc;
    let time = lockstep_repository::HlcTime(early)
        .to_datetime()
        .to_rfc3339();
    let refused = cluster.lockstep(&[
        "restore",
        "--to-time",
        &time,
        "--exact-per-shard",
        "--in-place",
        "--dry-run",
    ]);
    assert!(!refused.status.success(), "{}", text(&refused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_firing_every_second_runs_backups_and_survives_a_restart() {
    let mut cluster = Cluster::start(5000, None);
    cluster.reconfigure(
        "[[schedules]]\nname = \"every-second\"\ncron = \"* * * * * *\"\naction = \"incremental\"\n\
         [[schedules]]\nname = \"nightly\"\ncron = \"0 2 * * *\"\ntimezone = \"Europe/Berlin\"\naction = \"gc\"\n",
    );
    // The first incremental has no full to build on and fails; the operator takes one.
    cluster.backup("full");
    let scheduled = |cluster: &Cluster| {
        json(&cluster.lockstep(&["backup", "list", "--json"]))
            .as_array()
            .expect("a list")
            .iter()
            .filter(|b| b["labels"]["schedule"] == "every-second")
            .count()
    };
    let ran = crate::cluster::wait_until(Duration::from_secs(30), || {
        let n = scheduled(&cluster);
        async move { n >= 3 }
    })
    .await;
    assert!(ran.is_some(), "three scheduled backups");
    let listed = json(&cluster.lockstep(&["schedule", "list", "--json"]));
    let schedules = listed.as_array().expect("schedules");
    assert_eq!(schedules.len(), 2, "{listed:#}");
    let every = &schedules[0];
    assert_eq!(every["name"], "every-second");
    assert_eq!(every["action"], "incremental");
    // The third may still be running (its commit seen at the next poll).
    assert!(every["runs"].as_u64().is_some_and(|n| n >= 2), "{every:#}");
    assert!(every["next_run"].as_str().is_some_and(|t| !t.is_empty()));
    let nightly = &schedules[1];
    assert_eq!(nightly["timezone"], "Europe/Berlin");
    let next = nightly["next_run"].as_str().expect("next run");
    let next = chrono::DateTime::parse_from_rfc3339(next).expect("RFC 3339");
    let berlin = next.with_timezone(&chrono_tz::Europe::Berlin);
    assert_eq!(
        (
            chrono::Timelike::hour(&berlin),
            chrono::Timelike::minute(&berlin)
        ),
        (2, 0),
        "02:00 in Berlin: {next}"
    );
    assert!(
        cluster
            .repo()
            .join("schedules")
            .join("every-second.json")
            .exists(),
        "the last firing is in the repository"
    );
    let text_list = cluster.lockstep(&["schedule", "list"]);
    assert!(
        text(&text_list).contains("NEXT RUN"),
        "{}",
        text(&text_list)
    );

    // A restarted coordinator knows the last firing and goes on.
    cluster.kill_coordinator();
    cluster.start_coordinator(None);
    let listed = json(&cluster.lockstep(&["schedule", "list", "--json"]));
    assert!(
        listed[0]["last_fired"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{listed:#}"
    );
    let before = scheduled(&cluster);
    let more = crate::cluster::wait_until(Duration::from_secs(30), || {
        let n = scheduled(&cluster);
        async move { n > before }
    })
    .await;
    assert!(more.is_some(), "the restarted coordinator fires again");
}

/// The catalog index (decision 041) lost or damaged behind the coordinator's back: a
/// repository without one (from before it, or removed by hand), and one whose newest entry is
/// damaged, are indexed again from `backups/` at the next start; listing, parent choice and
/// verify then see every committed backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_damaged_catalog_index_is_rebuilt_from_the_manifests() {
    let mut cluster = Cluster::start(10_000, None);
    let full = cluster.backup("full");
    let incremental = cluster.backup("incremental");
    let index = cluster.repo().join("catalog");
    let entries = |index: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut entries: Vec<_> = std::fs::read_dir(index.join("log"))
            .expect("the index's log")
            .map(|entry| entry.expect("entry").path())
            .collect();
        entries.sort();
        entries
    };
    assert!(entries(&index).len() >= 2, "each commit is recorded");

    cluster.kill_coordinator();
    std::fs::remove_dir_all(&index).expect("remove the index");
    cluster.start_coordinator(None);
    assert_eq!(cluster.listed(), [full.clone(), incremental.clone()]);
    let next = cluster.backup("incremental");
    let list = json(&cluster.lockstep(&["backup", "list", "--json"]));
    assert_eq!(list[2]["parent"], incremental.as_str(), "{list:#}");
    assert!(
        index.join("snapshot").read_dir().is_ok(),
        "the index exists again"
    );

    cluster.kill_coordinator();
    let newest = entries(&index).pop().expect("an entry");
    std::fs::write(&newest, b"{ damaged").expect("damage the newest entry");
    cluster.start_coordinator(None);
    assert_eq!(cluster.listed(), [full, incremental, next.clone()]);
    let verify = cluster.lockstep(&["backup", "verify", &next]);
    assert!(verify.status.success(), "{}", text(&verify));
}
