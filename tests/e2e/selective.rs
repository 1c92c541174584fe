//! Selective restore (`--cf`): a cluster of shards with three column families restores only
//! the ones named, through an incremental chain whose WAL writes to all three; the others are
//! absent (the default one, which RocksDB always has, is empty unless named), the named ones
//! equal the model key by key, and the restored shard starts a history of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use lockstep_agent::engine::{RocksEngine, ShardEngine};
use lockstep_proto::v1;
use lockstep_tests::{agent_ok, text};

use crate::cluster::{Cluster, N_AGENTS};

const CFS: [&str; 3] = ["default", "users", "events"];

type Model = BTreeMap<String, BTreeSet<Vec<u8>>>;

/// Writes `n` keys to each column family of every shard, deleting every fourth one again.
async fn round(cluster: &Cluster, models: &mut [Model], name: &str, n: usize) {
    for (shard, model) in models.iter_mut().enumerate() {
        let mut client = cluster.shard_client(shard).await;
        for cf in CFS {
            for k in 0..n {
                let key = format!("{name}-{cf}-{k:03}").into_bytes();
                client
                    .put(v1::PutRequest {
                        column_family: cf.to_string(),
                        key: key.clone(),
                        value: b"v".to_vec(),
                    })
                    .await
                    .expect("put");
                model.entry(cf.to_string()).or_default().insert(key.clone());
                if k % 4 == 3 {
                    client
                        .delete(v1::DeleteRequest {
                            column_family: cf.to_string(),
                            key: key.clone(),
                        })
                        .await
                        .expect("delete");
                    model.entry(cf.to_string()).or_default().remove(&key);
                }
            }
        }
    }
}

/// The column families of the shard in `dir`, and the keys of each.
fn contents(dir: &Path) -> (Vec<String>, Model) {
    let engine = RocksEngine::open(dir, &[]).expect("open restored shard");
    let mut families = engine.column_families();
    families.sort();
    let model = families
        .iter()
        .map(|cf| {
            let keys = engine
                .scan(cf, b"", None, usize::MAX)
                .expect("scan")
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            (cf.clone(), keys)
        })
        .collect();
    (families, model)
}

fn only(model: &Model, keep: &[&str]) -> Model {
    CFS.iter()
        .filter(|cf| keep.contains(cf) || **cf == "default")
        .map(|cf| {
            let keys = if keep.contains(cf) {
                model.get(*cf).cloned().unwrap_or_default()
            } else {
                BTreeSet::new()
            };
            (cf.to_string(), keys)
        })
        .collect()
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selective_restore_keeps_only_the_named_column_families() {
    let cluster = Cluster::start_with(5000, None, vec!["--cfs".into(), CFS.join(",")], Vec::new());
    let mut models = vec![Model::new(); N_AGENTS];
    round(&cluster, &mut models, "before-full", 20).await;
    cluster.backup("full");
    round(&cluster, &mut models, "in-the-chain", 20).await;
    let incremental = cluster.backup("incremental");

    // Through the coordinator, every shard: `users` only.
    let dir = cluster.dir.path().join("selective");
    let restore = cluster.lockstep(&[
        "restore",
        &incremental,
        "--cf",
        "users",
        "--to",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(restore.status.success(), "{}", text(&restore));
    for (i, model) in models.iter().enumerate() {
        let (families, restored) = contents(&dir.join(Cluster::shard(i)));
        assert_eq!(families, sorted(&["default", "users"]), "shard {i}");
        assert!(
            restored == only(model, &["users"]),
            "shard {i}: {restored:?}"
        );
        let lineage = lockstep_agent::lineage::read_lineage(&dir.join(Cluster::shard(i)))
            .expect("read the lineage")
            .expect("a lineage");
        assert!(
            lineage.parent.is_none(),
            "a selective restore starts an orphan lineage: {lineage:?}"
        );
    }

    // Refused: in place, and a family the shards lack; nothing is left behind.
    let in_place = cluster.lockstep(&["restore", &incremental, "--cf", "users", "--in-place"]);
    assert_eq!(in_place.status.code(), Some(2), "{}", text(&in_place));
    let unknown_dir = cluster.dir.path().join("unknown");
    let unknown = cluster.lockstep(&[
        "restore",
        &incremental,
        "--cf",
        "orders",
        "--to",
        unknown_dir.to_str().expect("utf-8"),
    ]);
    assert!(!unknown.status.success(), "{}", text(&unknown));
    assert!(text(&unknown).contains("orders"), "{}", text(&unknown));
    assert!(!unknown_dir.join(Cluster::shard(0)).exists());

    // Offline, one shard through its chain: `events` and the default family, no `users`.
    let offline = cluster.dir.path().join("offline");
    agent_ok(&[
        "restore",
        "--repo",
        cluster.repo().to_str().expect("utf-8"),
        "--backup",
        &incremental,
        "--shard",
        &Cluster::shard(1),
        "--cf",
        "events,default",
        "--to",
        offline.to_str().expect("utf-8"),
    ]);
    let (families, restored) = contents(&offline);
    assert_eq!(families, sorted(&["default", "events"]));
    assert!(
        restored == only(&models[1], &["default", "events"]),
        "{restored:?}"
    );
}
