//! Incremental and differential backups and tags on a real cluster: a full backup, then
//! incrementals and differentials interleaved with puts and deletes and with tags; restoring
//! every backup and every tag must give exactly the model's state at its cut, key by key.
//! A shard restored in place cannot continue an incremental chain, and WAL removed behind
//! the agent's back is `ERR_BACKUP_WAL_GAP`, never skipped.

use lockstep_tests::text;

use crate::cluster::{Cluster, N_AGENTS, json};
use crate::pitr::{Acked, keys_in, seq_vector, state, write};

/// Puts and deletes on every shard; returns the next seed.
async fn mutate(
    cluster: &Cluster,
    history: &mut [Vec<Acked>],
    rounds: usize,
    mut seed: u64,
) -> u64 {
    for round in 0..rounds {
        for (i, shard) in history.iter_mut().enumerate() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = shard.len();
            let deleted = round % 5 == 2;
            let key = if deleted {
                shard[(seed >> 33) as usize % n].key.clone()
            } else {
                format!("k-{n:05}")
            };
            shard.push(write(cluster, i, key, deleted).await);
        }
    }
    seed
}

/// Every shard's latest acknowledged sequence number.
fn ends(history: &[Vec<Acked>]) -> Vec<u64> {
    history
        .iter()
        .map(|h| h.last().map_or(0, |w| w.seq))
        .collect()
}

fn backup(cluster: &Cluster, kind: &str) -> (String, serde_json::Value) {
    let output = cluster.lockstep(&["backup", "create", "--kind", kind, "--wait", "--json"]);
    assert!(output.status.success(), "{kind}: {}", text(&output));
    let job = json(&output);
    let id = job["backup_id"].as_str().expect("backup id").to_string();
    let shown = json(&cluster.lockstep(&["backup", "show", &id, "--json"]));
    (id, shown)
}

/// Restores `point` (CLI arguments naming it) into a fresh directory and compares every
/// shard with the model at `cut`.
fn check_restore(
    cluster: &Cluster,
    history: &[Vec<Acked>],
    point: &[&str],
    cut: &[u64],
    name: &str,
) {
    let dir = cluster.dir.path().join(format!("restored-{name}"));
    let mut args = vec!["restore"];
    args.extend_from_slice(point);
    args.extend_from_slice(&["--to", dir.to_str().expect("utf-8")]);
    let output = cluster.lockstep(&args);
    assert!(output.status.success(), "{name}: {}", text(&output));
    for (i, seq) in cut.iter().enumerate() {
        assert_eq!(
            keys_in(&dir.join(Cluster::shard(i))),
            state(&history[i], |w| w.seq <= *seq),
            "{name}: shard {i} at seq {seq}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_of_incrementals_differentials_and_tags_restore_exactly_to_their_cuts() {
    let mut cluster = Cluster::start(5_000, None);
    let mut history: Vec<Vec<Acked>> = vec![Vec::new(); N_AGENTS];
    let mut seed = mutate(&cluster, &mut history, 30, 0xc4a1).await;

    let no_full = cluster.lockstep(&["backup", "create", "--kind", "differential"]);
    assert!(!no_full.status.success());
    assert!(
        text(&no_full).contains("ERR_BACKUP_INVALID_TYPE"),
        "{}",
        text(&no_full)
    );

    // full, inc, tag, inc, diff, inc, tag, diff, inc: writes between every step.
    let plan = [
        "full",
        "incremental",
        "tag",
        "incremental",
        "differential",
        "incremental",
        "tag",
        "differential",
        "incremental",
    ];
    let mut backups: Vec<(String, String, Vec<u64>)> = Vec::new();
    let mut tags: Vec<(String, Vec<u64>)> = Vec::new();
    let mut full = String::new();
    for (step, kind) in plan.iter().enumerate() {
        let cut = ends(&history);
        if *kind == "tag" {
            let name = format!("before-step-{step}");
            let output = cluster.lockstep(&["tag", "create", &name, "--json"]);
            assert!(output.status.success(), "{}", text(&output));
            let tag = json(&output);
            for (i, seq) in cut.iter().enumerate() {
                assert_eq!(tag["points"][Cluster::shard(i)]["seq"], *seq, "{tag:#}");
            }
            tags.push((name, cut));
        } else {
            let (id, shown) = backup(&cluster, kind);
            assert_eq!(shown["kind"], *kind, "{shown:#}");
            for (i, seq) in cut.iter().enumerate() {
                assert_eq!(shown["cut"][Cluster::shard(i)], *seq, "{shown:#}");
            }
            match *kind {
                "full" => full = id.clone(),
                "differential" => assert_eq!(shown["parent"], full.as_str(), "{shown:#}"),
                _ => assert_eq!(
                    shown["parent"],
                    backups.last().map_or("", |b| b.0.as_str()),
                    "{shown:#}"
                ),
            }
            backups.push((id, kind.to_string(), cut));
        }
        seed = mutate(&cluster, &mut history, 12, seed).await;
    }

    // An incremental uploads only the WAL since its parent, not the shard again.
    let full_bytes = json(&cluster.lockstep(&["backup", "show", &backups[0].0, "--json"]))["stats"]
        ["bytes_total"]
        .as_u64()
        .unwrap_or(0);
    let inc_bytes = json(&cluster.lockstep(&["backup", "show", &backups[1].0, "--json"]))["stats"]
        ["bytes_total"]
        .as_u64()
        .unwrap_or(u64::MAX);
    println!("full backup {full_bytes} bytes, first incremental {inc_bytes} bytes");
    assert!(
        inc_bytes > 0 && inc_bytes < full_bytes,
        "{inc_bytes} vs {full_bytes}"
    );

    // The plan of the last incremental names the full base and the chain.
    let last = backups.last().expect("backups").0.clone();
    let dry = json(&cluster.lockstep(&["restore", &last, "--in-place", "--dry-run", "--json"]));
    let plans = dry["plan"].as_array().expect("plan");
    assert_eq!(plans.len(), N_AGENTS, "one plan per shard: {dry:#}");
    for plan in plans {
        assert_eq!(plan["base_backup_id"], full.as_str(), "{dry:#}");
        let chain: Vec<&str> = plan["chain"]
            .as_array()
            .expect("chain")
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        // The last differential, then the incremental after it.
        let differential = backups
            .iter()
            .rev()
            .find(|b| b.1 == "differential")
            .map(|b| b.0.as_str());
        assert_eq!(
            chain,
            vec![differential.unwrap_or(""), last.as_str()],
            "{dry:#}"
        );
    }

    for (id, kind, cut) in &backups {
        check_restore(
            &cluster,
            &history,
            &[id.as_str()],
            cut,
            &format!("{kind}-{id}"),
        );
    }
    for (name, cut) in &tags {
        check_restore(&cluster, &history, &["--tag", name], cut, name);
    }
    // A sequence vector between two incrementals: base and chain from the repository, the
    // rest from the WAL archive.
    let between: Vec<u64> = (0..N_AGENTS)
        .map(|i| {
            let middle = (backups[2].2[i] + backups[3].2[i]) / 2;
            history[i]
                .iter()
                .map(|w| w.seq)
                .filter(|s| *s <= middle)
                .max()
                .unwrap_or(middle)
        })
        .collect();
    check_restore(
        &cluster,
        &history,
        &["--to-seq", &seq_vector(&between)],
        &between,
        "between",
    );

    let verify = cluster.lockstep(&["backup", "verify", "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));

    // The parent of a chain cannot be deleted from under it.
    let delete = cluster.lockstep(&["backup", "delete", &backups[0].0]);
    assert!(!delete.status.success());
    assert!(text(&delete).contains("parent of"), "{}", text(&delete));

    // Restored in place to a tag, the shards start a new lineage: the chain cannot go on.
    let (tag, tag_cut) = &tags[1];
    let output = cluster.lockstep(&["restore", "--tag", tag, "--in-place"]);
    assert!(output.status.success(), "{}", text(&output));
    let refused = cluster.lockstep(&["backup", "create", "--kind", "incremental", "--wait"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("ERR_BACKUP_WAL_GAP")
            && text(&refused).contains("take a full backup"),
        "{}",
        text(&refused)
    );
    let mut history: Vec<Vec<Acked>> = history
        .iter()
        .zip(tag_cut)
        .map(|(h, seq)| h.iter().filter(|w| w.seq <= *seq).cloned().collect())
        .collect();
    let (_, _) = backup(&cluster, "full");
    seed = mutate(&cluster, &mut history, 10, seed).await;
    let cut = ends(&history);
    let (id, _) = backup(&cluster, "incremental");
    check_restore(&cluster, &history, &[id.as_str()], &cut, "after-restore");

    // WAL removed behind the agent's back: the next incremental reports the gap.
    mutate(&cluster, &mut history, 10, seed).await;
    // A restart flushes the recovered memtable, so the WAL holding these writes becomes
    // obsolete and moves to archive/; the agent is stopped again and that WAL removed.
    cluster.kill_agent(1);
    cluster.restart_agent(1);
    cluster.kill_agent(1);
    let archived = cluster.dir.path().join("db-1").join("archive");
    let removed = std::fs::read_dir(&archived)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| std::fs::remove_file(e.path()).is_ok())
        .filter(|ok| *ok)
        .count();
    assert!(removed > 0, "no archived WAL in {}", archived.display());
    cluster.restart_agent(1);
    let gap = cluster.lockstep(&["backup", "create", "--kind", "incremental", "--wait"]);
    assert!(!gap.status.success());
    assert!(text(&gap).contains("ERR_BACKUP_WAL_GAP"), "{}", text(&gap));
    assert!(text(&gap).contains("take a full backup"), "{}", text(&gap));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_restore_points_are_taken_while_clients_write_and_restore_exactly() {
    let mut cluster = Cluster::start(5_000, None);
    let mut history: Vec<Vec<Acked>> = vec![Vec::new(); N_AGENTS];
    let mut seed = mutate(&cluster, &mut history, 10, 0xa070).await;
    // Restore points every second; WAL replays from the first backup.
    let (_, _) = backup(&cluster, "full");
    cluster.kill_coordinator();
    let mut config = std::fs::read_to_string(cluster.config_path()).expect("read config");
    config.push_str("[tags]\nauto_every_s = 1\n");
    std::fs::write(cluster.config_path(), config).expect("write config");
    cluster.start_coordinator(None);

    // Keep writing until the coordinator has taken two restore points, one a second: bounded
    // in time, not in rounds (a round takes a few ms, so 200 of them could end too soon).
    let mut automatic = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        seed = mutate(&cluster, &mut history, 2, seed).await;
        let tags = json(&cluster.lockstep(&["tag", "list", "--json"]));
        automatic = tags
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["automatic"] == true)
            .cloned()
            .collect();
        if automatic.len() >= 2 {
            break;
        }
    }
    assert!(
        automatic.len() >= 2,
        "no automatic restore points: {automatic:?}"
    );
    for tag in &automatic {
        let name = tag["name"].as_str().expect("tag name");
        assert!(name.starts_with("auto-"), "{tag}");
        let cut: Vec<u64> = (0..N_AGENTS)
            .map(|i| {
                tag["points"][Cluster::shard(i)]["seq"]
                    .as_u64()
                    .expect("seq")
            })
            .collect();
        check_restore(&cluster, &history, &["--tag", name], &cut, name);
    }
}

/// The WAL the next incremental needs is retained up to `--wal-retention-mib`, and the agent
/// warns loudly when it reaches 90% of that bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_warns_when_the_wal_the_next_incremental_needs_nears_its_bound() {
    let cluster = Cluster::start_with(
        5_000,
        None,
        vec!["--wal-retention-mib".into(), "1".into()],
        Vec::new(),
    );
    let mut history: Vec<Vec<Acked>> = vec![Vec::new(); N_AGENTS];
    mutate(&cluster, &mut history, 5, 0xb0d).await;
    let (_, _) = backup(&cluster, "full");
    // About 1.2 MiB of WAL on shard-0 since the full backup.
    let mut client = cluster.shard_client(0).await;
    for k in 0..300 {
        client
            .put(lockstep_proto::v1::PutRequest {
                column_family: String::new(),
                key: format!("big-{k:04}").into_bytes(),
                value: vec![b'x'; 4096],
            })
            .await
            .expect("write");
    }
    let log = cluster.log("agent-0");
    let warned = crate::cluster::wait_until(std::time::Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("needs the WAL since the last full backup") }
    })
    .await;
    assert!(
        warned.is_some(),
        "no retention warning in {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
