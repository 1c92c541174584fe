//! Garbage collection under fire: clients write, agents ship their WAL and a backup runs
//! while retention and GC remove older backups. Afterwards every retained backup and a
//! point in time restore exactly to the model of acknowledged writes, the removed backups'
//! own objects are gone with their bytes reported, and nothing else was deleted. The same
//! with the coordinator killed inside a pass, twice, then a pass that finishes the work.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_tests::text;

use crate::cluster::{Cluster, N_AGENTS, json, wait_until};
use crate::pitr::{Acked, keys_in, seq_vector, state, wait_shipped};

/// Every stored object file: its path under `objects/` and its size.
fn object_files(repo: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let root = repo.join("objects");
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = file.file_name().to_string_lossy().to_string();
            if !name.contains('#') {
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                out.insert(name, size);
            }
        }
    }
    out
}

/// The object file names the shard manifests of `backup` name.
fn objects_of(repo: &Path, backup: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for shard in 0..N_AGENTS {
        let path = repo
            .join("shards")
            .join(Cluster::shard(shard))
            .join(format!("{backup}.json"));
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("shard manifest")).expect("json");
        let name = |chunk: &serde_json::Value| {
            let id = chunk["id"].as_str().expect("id").to_string();
            match chunk["copy"].as_u64() {
                Some(copy) if copy > 0 => format!("{id}.{copy}"),
                _ => id,
            }
        };
        for file in manifest["files"].as_array().into_iter().flatten() {
            out.extend(file["chunks"].as_array().into_iter().flatten().map(name));
        }
        for piece in manifest["wal"].as_array().into_iter().flatten() {
            out.insert(name(&piece["chunk"]));
        }
    }
    out
}

/// Each shard's sequence number in `backup`'s cut.
fn cut_of(repo: &Path, backup: &str) -> Vec<u64> {
    let path = repo.join("backups").join(format!("{backup}.json"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("backup manifest")).expect("json");
    (0..N_AGENTS)
        .map(|i| {
            let seq = &manifest["cut"][Cluster::shard(i)];
            seq.as_u64()
                .or_else(|| seq.as_str().and_then(|s| s.parse().ok()))
                .expect("cut seq")
        })
        .collect()
}

/// Clients writing to every shard until stopped (at most `limit` writes), each acknowledged
/// write recorded.
struct Writers {
    history: Arc<Mutex<Vec<Vec<Acked>>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writers {
    fn start(cluster: &Cluster, limit: usize) -> Writers {
        let history = Arc::new(Mutex::new(vec![Vec::new(); N_AGENTS]));
        let stop = Arc::new(AtomicBool::new(false));
        let addresses = cluster.addresses.clone();
        let (h, s) = (history.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut clients = Vec::new();
            for address in &addresses {
                clients.push(
                    lockstep_proto::v1::shard_client::ShardClient::connect(format!(
                        "http://{address}"
                    ))
                    .await
                    .expect("connect shard"),
                );
            }
            for n in 0..limit {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let shard = n % N_AGENTS;
                // Every seventh write deletes a key written earlier.
                let deleted = n % 7 == 6;
                let key = if deleted {
                    format!("k-{:06}", n / 2)
                } else {
                    format!("k-{n:06}")
                };
                let acked = crate::pitr::write_with(&mut clients[shard], key, deleted).await;
                h.lock().expect("history")[shard].push(acked);
            }
        });
        Writers {
            history,
            stop,
            task,
        }
    }

    async fn stop(self) -> Vec<Vec<Acked>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writers");
        Arc::try_unwrap(self.history)
            .map(|h| h.into_inner().expect("history"))
            .unwrap_or_else(|h| h.lock().expect("history").clone())
    }
}

/// Restores `point` (a backup id, or `--to-seq V`) to a fresh directory.
fn restore(cluster: &Cluster, point: &[&str], name: &str) -> PathBuf {
    let dir = cluster.dir.path().join(name);
    let mut args = vec!["restore"];
    args.extend_from_slice(point);
    args.extend_from_slice(&["--to", dir.to_str().expect("utf-8")]);
    let output = cluster.lockstep(&args);
    assert!(output.status.success(), "{name}: {}", text(&output));
    dir
}

fn assert_restores_to(dir: &Path, history: &[Vec<Acked>], cut: &[u64], what: &str) {
    for i in 0..N_AGENTS {
        assert_eq!(
            keys_in(&dir.join(Cluster::shard(i))),
            state(&history[i], |w| w.seq <= cut[i]),
            "{what}: shard {i} at seq {}",
            cut[i]
        );
    }
}

fn gc(cluster: &Cluster, dry_run: bool) -> serde_json::Value {
    let mut args = vec!["gc", "--json"];
    if dry_run {
        args.push("--dry-run");
    }
    let output = cluster.lockstep(&args);
    assert!(output.status.success(), "gc: {}", text(&output));
    json(&output)
}

fn number(report: &serde_json::Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .or_else(|| report[field].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// Takes f1, `incrementals` incrementals, f2 and i2 under writes and removes f1 and its
/// incrementals by retention (`keep_full = 1`); returns the retained backups and the object
/// files only the removed ones named.
fn backups_then_retention(
    cluster: &Cluster,
    incrementals: usize,
) -> (Vec<String>, BTreeMap<String, u64>) {
    let mut removed = vec![cluster.backup("full")];
    for _ in 0..incrementals {
        removed.push(cluster.backup("incremental"));
    }
    let f2 = cluster.backup("full");
    let i2 = cluster.backup("incremental");
    let repo = cluster.repo();
    let kept: BTreeSet<String> = objects_of(&repo, &f2)
        .union(&objects_of(&repo, &i2))
        .cloned()
        .collect();
    let stored = object_files(&repo);
    let removed_only: BTreeMap<String, u64> = removed
        .iter()
        .flat_map(|b| objects_of(&repo, b))
        .filter(|o| !kept.contains(o))
        .map(|o| (o.clone(), stored[&o]))
        .collect();
    assert!(
        !removed_only.is_empty(),
        "f1 and its chain have objects of their own"
    );
    let applied = cluster.lockstep(&["retention", "apply", "--json"]);
    assert!(applied.status.success(), "{}", text(&applied));
    (vec![f2, i2], removed_only)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_reclaims_what_retention_removed_while_clients_write_and_a_backup_runs() {
    let mut cluster = Cluster::start(5_000, None);
    cluster.reconfigure("[gc]\ngrace_s = 1\n[retention]\nkeep_full = 1\n");
    let writers = Writers::start(&cluster, 20_000);
    let (retained, removed_only) = backups_then_retention(&cluster, 1);
    let repo = cluster.repo();
    let before = object_files(&repo);

    // The first pass only records candidates; a dry run changes nothing.
    let first = gc(&cluster, false);
    assert_eq!(number(&first, "objects_deleted"), 0, "{first:#}");
    let dry = gc(&cluster, true);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        object_files(&repo).len(),
        before.len(),
        "a dry run deletes nothing"
    );

    // Passes beside a full backup, until the removed backups' objects are gone.
    let mut backup =
        cluster.spawn_lockstep(&["backup", "create", "--kind", "full", "--wait", "--json"]);
    let (mut deleted, mut reclaimed) = (0, 0);
    let gone = wait_until(Duration::from_secs(60), || {
        let report = gc(&cluster, false);
        deleted += number(&report, "objects_deleted");
        reclaimed += number(&report, "bytes_reclaimed");
        let stored = object_files(&repo);
        let done = removed_only.keys().all(|o| !stored.contains_key(o));
        async move { done }
    })
    .await;
    assert!(
        gone.is_some(),
        "GC never deleted the removed backups' objects"
    );
    let status = backup.wait().expect("backup");
    assert!(status.success(), "the backup beside GC failed");
    let mut out = String::new();
    std::io::Read::read_to_string(backup.stdout.as_mut().expect("stdout"), &mut out).expect("read");
    let concurrent = serde_json::from_str::<serde_json::Value>(&out).expect("json")["backup_id"]
        .as_str()
        .expect("id")
        .to_string();

    let history = writers.stop().await;
    wait_shipped(&cluster).await;
    // Exactly the removed backups' own objects went, and their bytes are what was reported.
    let after = object_files(&repo);
    let went: BTreeMap<String, u64> = before
        .iter()
        .filter(|(o, _)| !after.contains_key(*o))
        .map(|(o, s)| (o.clone(), *s))
        .collect();
    assert_eq!(went, removed_only, "GC deleted something else");
    assert_eq!(deleted, removed_only.len() as u64);
    assert_eq!(reclaimed, removed_only.values().sum::<u64>());

    let verify = cluster.lockstep(&["backup", "verify", "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));
    for backup in retained.iter().chain([&concurrent]) {
        let dir = restore(&cluster, &[backup], &format!("restored-{backup}"));
        assert_restores_to(&dir, &history, &cut_of(&repo, backup), backup);
    }
    let ends: Vec<u64> = history
        .iter()
        .map(|h| h.last().map_or(0, |w| w.seq))
        .collect();
    let dir = restore(&cluster, &["--to-seq", &seq_vector(&ends)], "restored-pitr");
    assert_restores_to(&dir, &history, &ends, "point in time");
}

/// How many times the coordinator's log says it paused at a fault point.
fn pauses(cluster: &Cluster) -> usize {
    std::fs::read_to_string(cluster.log("coordinator"))
        .unwrap_or_default()
        .matches("fault injection: pausing")
        .count()
}

/// Starts a GC pass on a coordinator paused at `fault`, waits for the pause and kills it.
async fn kill_inside_a_pass(cluster: &mut Cluster, fault: &str) {
    let seen = pauses(cluster);
    cluster.kill_coordinator();
    cluster.start_coordinator(Some(fault));
    let mut pass = cluster.spawn_lockstep(&["gc"]);
    let paused = wait_until(Duration::from_secs(60), || {
        let paused = pauses(cluster) > seen;
        async move { paused }
    })
    .await;
    assert!(paused.is_some(), "the pass never reached {fault}");
    cluster.kill_coordinator();
    let _ = pass.wait();
    cluster.start_coordinator(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gc_pass_killed_anywhere_loses_nothing_and_the_next_one_finishes() {
    let mut cluster = Cluster::start(5_000, None);
    cluster.reconfigure("[gc]\ngrace_s = 1\n[retention]\nkeep_full = 1\n");
    let writers = Writers::start(&cluster, 50_000);
    // More objects of their own than one delete batch (64), so a kill can split the sweep.
    let (retained, removed_only) = backups_then_retention(&cluster, 25);
    assert!(removed_only.len() > 64, "{} objects", removed_only.len());
    let history = writers.stop().await;
    let repo = cluster.repo();
    // One pass records them all once they are older than the grace period...
    let old = wait_until(Duration::from_secs(30), || {
        let old = removed_only.keys().all(|o| {
            let path = repo.join("objects").join(&o[..2]).join(o);
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_millis(1500))
        });
        async move { old }
    })
    .await;
    assert!(old.is_some(), "the objects never aged");
    let first = gc(&cluster, false);
    assert!(
        number(&first, "candidates") >= removed_only.len() as u64,
        "{first:#}"
    );
    // ...and they are due once the grace period has passed since.
    let due = wait_until(Duration::from_secs(30), || {
        let due = number(&gc(&cluster, true), "objects_deleted") >= removed_only.len() as u64;
        async move { due }
    })
    .await;
    assert!(due.is_some(), "the candidates never became due");

    // Killed with the objects condemned, before any delete: nothing is gone.
    kill_inside_a_pass(&mut cluster, "gc-sweep:60000").await;
    let stored = object_files(&repo);
    assert!(removed_only.keys().all(|o| stored.contains_key(o)));
    // Killed after the first batch was deleted, before the record was rewritten.
    kill_inside_a_pass(&mut cluster, "gc-swept:60000").await;
    let left = object_files(&repo);
    let gone = removed_only
        .keys()
        .filter(|o| !left.contains_key(*o))
        .count();
    assert!(
        gone > 0 && gone < removed_only.len(),
        "{gone} of {} gone",
        removed_only.len()
    );
    assert_eq!(pauses(&cluster), 2, "one pause at each fault point");
    // The next pass finishes: whatever is left of them goes, the rest stays.
    let report = gc(&cluster, false);
    let after = object_files(&repo);
    assert!(
        removed_only.keys().all(|o| !after.contains_key(o)),
        "{report:#}"
    );
    let expected: BTreeSet<&String> = stored
        .keys()
        .filter(|o| !removed_only.contains_key(*o))
        .collect();
    assert_eq!(after.keys().collect::<BTreeSet<_>>(), expected);
    let verify = cluster.lockstep(&["backup", "verify", "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));
    for backup in &retained {
        let dir = restore(&cluster, &[backup], &format!("restored-{backup}"));
        assert_restores_to(&dir, &history, &cut_of(&repo, backup), backup);
    }
}
