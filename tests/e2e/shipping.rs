//! WAL shipping under faults, on a real cluster: every agent ships to a local archive and to
//! an S3 archive (moto) reached through a proxy whose link the test cuts and heals. An agent
//! is killed in the middle of a segment and restarted. Afterwards both archives hold every
//! acknowledged write, on every shard, in contiguous segments with no gap and no duplicate,
//! `lockstep backup verify --full` checks the archive's WAL range, and a restore to the end
//! replays it to exactly the model's state.
//!
//! Another ships to Azure Blob storage (Azurite) and restores from there.
//!
//! The last test ships to a remote `lockstep://` archive (a coordinator with no agents in
//! another "region") through an outage of that region, then loses the primary repository and
//! restores every shard from the region's archive alone.

use lockstep_proto::archive::open_archive;
use lockstep_proto::v1;
use lockstep_repository::archive::WalArchive;
use lockstep_repository::seal::Seal;
use lockstep_repository::wal::check_segments;
use lockstep_repository::{Repository, ShardId};
use lockstep_tests::{Azurite, Moto, kill_hard, start_server, text};

use crate::cluster::{Cluster, N_AGENTS, json};
use crate::pitr::{Acked, keys_in, seq_vector, state, wait_shipped};
use crate::proxy::LinkProxy;

/// One write to every shard; a shard that does not answer is skipped (the write was not
/// acknowledged, so it is not in the model).
async fn round(cluster: &Cluster, history: &mut [Vec<Acked>], n: usize) {
    for (i, shard) in history.iter_mut().enumerate() {
        let key = format!("k-{n:05}");
        let Ok(mut client) =
            v1::shard_client::ShardClient::connect(format!("http://{}", cluster.addresses[i]))
                .await
        else {
            continue;
        };
        let reply = client
            .put(v1::PutRequest {
                column_family: String::new(),
                key: key.clone().into_bytes(),
                value: b"v".to_vec(),
            })
            .await;
        if let Ok(reply) = reply {
            let reply = reply.into_inner();
            shard.push(Acked {
                seq: reply.last_seq,
                hlc: reply.hlc,
                key,
                deleted: false,
            });
        }
    }
}

/// Every destination of every shard: its URL and last error code.
fn destination_errors(status: &serde_json::Value) -> Vec<(String, String)> {
    status["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["destinations"].as_array().into_iter().flatten())
        .map(|d| {
            (
                d["url"].as_str().unwrap_or_default().to_string(),
                d["error_code"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Keeps writing (so there is WAL to ship) until `wal status` reports an error on a
/// destination whose URL starts with `prefix`, bounded; the last status if it never does.
async fn write_until_failing(
    cluster: &Cluster,
    history: &mut [Vec<Acked>],
    n: &mut usize,
    prefix: &str,
) -> Result<(), serde_json::Value> {
    let mut last = serde_json::Value::Null;
    for _ in 0..300 {
        round(cluster, history, *n).await;
        *n += 1;
        let status = json(&cluster.lockstep(&["wal", "status", "--json"]));
        if destination_errors(&status)
            .iter()
            .any(|(url, code)| url.starts_with(prefix) && !code.is_empty())
        {
            return Ok(());
        }
        last = status;
    }
    Err(last)
}

/// The archive holds exactly the writes 1..=last of every shard on its one lineage, the root
/// its history started with: contiguous, no overlap, reaching the last acknowledged write.
async fn check_archive(archive: &WalArchive, history: &[Vec<Acked>]) {
    for (i, shard) in history.iter().enumerate() {
        let id = ShardId::new(Cluster::shard(i)).expect("shard id");
        let lineages = archive.wal_lineages(&id).await.expect("list lineages");
        assert_eq!(
            lineages.len(),
            1,
            "{} shard {i}: {lineages:?}",
            archive.url()
        );
        assert_eq!(lineages[0].parent, None, "shard {i} started on a root");
        let segments = archive
            .wal_segments(&id, &lineages[0])
            .await
            .expect("list segments");
        check_segments(&segments)
            .unwrap_or_else(|err| panic!("{} shard {i}: {}", archive.url(), err.chain()));
        assert_eq!(
            segments.first().map(|s| s.first.0),
            Some(1),
            "{} shard {i} starts late",
            archive.url()
        );
        let last = shard.last().map_or(0, |w| w.seq);
        assert_eq!(
            segments.last().map(|s| s.last.0),
            Some(last),
            "{} shard {i} does not end at the last acknowledged write",
            archive.url()
        );
        let mut batches = 0;
        for info in &segments {
            let segment = archive.get_wal_segment(info).await.expect("read segment");
            batches += segment.batches.len();
        }
        assert_eq!(batches as u64, last, "one batch per acknowledged put");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_survives_a_killed_agent_and_a_cut_link_with_no_gap_and_no_duplicate() {
    let moto = Moto::start("wal-region-3");
    let proxy = LinkProxy::start(
        moto.endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("moto address"),
    )
    .await;
    let through_proxy: Vec<(String, String)> = moto
        .env()
        .into_iter()
        .map(|(k, v)| {
            if k == "AWS_ENDPOINT_URL" {
                (k, format!("http://{}", proxy.address))
            } else {
                (k, v)
            }
        })
        .collect();
    let s3 = "s3://wal-region-3/archive";
    let mut cluster = Cluster::start_with(
        5_000,
        None,
        vec!["--wal-to".into(), s3.into()],
        through_proxy,
    );
    let mut history: Vec<Vec<Acked>> = vec![Vec::new(); N_AGENTS];
    let mut n = 0;
    for _ in 0..20 {
        round(&cluster, &mut history, n).await;
        n += 1;
    }
    // The base of the restore at the end, which replays everything below from the archive.
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));

    // Killed right after a write it acknowledged: the segment holding it is still open
    // (segments close after 25 ms).
    round(&cluster, &mut history, n).await;
    n += 1;
    cluster.kill_agent(1);
    for _ in 0..5 {
        round(&cluster, &mut history, n).await;
        n += 1;
    }
    cluster.restart_agent(1);
    for _ in 0..20 {
        round(&cluster, &mut history, n).await;
        n += 1;
    }

    // The link to the S3 region is cut while writes go on: shipping there fails and says so,
    // the local archive keeps up.
    proxy.cut();
    let reported = write_until_failing(&cluster, &mut history, &mut n, "s3://").await;
    for _ in 0..30 {
        round(&cluster, &mut history, n).await;
        n += 1;
    }
    assert!(
        reported.is_ok(),
        "the cut link was not reported: {reported:?}"
    );
    proxy.heal();
    for _ in 0..10 {
        round(&cluster, &mut history, n).await;
        n += 1;
    }
    let status = wait_shipped(&cluster).await;
    assert!(
        destination_errors(&status)
            .iter()
            .all(|(_, code)| code.is_empty()),
        "errors after healing: {status:#}"
    );

    let local = open_archive(
        cluster.archive().to_str().expect("utf-8"),
        &lockstep_proto::tls::Security::Plaintext,
        &Seal::Plain,
    )
    .await
    .expect("open local archive");
    check_archive(&local, &history).await;
    let remote = Repository::open_with(s3, &moto.env())
        .await
        .expect("open S3 archive");
    check_archive(&WalArchive::Store(remote), &history).await;

    // Verifying everything includes the configured archive's WAL range.
    let verify = cluster.lockstep(&["backup", "verify", "--full"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(
        text(&verify).contains("Checked the WAL archive: 3 shard lineage(s)"),
        "{}",
        text(&verify)
    );

    // A restore to the last acknowledged writes replays the WAL shipped through the kill and
    // the cut, onto the early backup, to exactly the model.
    restores_to_the_last_writes(&cluster, &history, &[]);
}

/// Restores every shard into directories at its last acknowledged write (`extra`: more
/// `restore` arguments) and compares each with the model, key by key.
fn restores_to_the_last_writes(cluster: &Cluster, history: &[Vec<Acked>], extra: &[&str]) {
    let ends: Vec<u64> = history
        .iter()
        .map(|h| h.last().map_or(0, |w| w.seq))
        .collect();
    let dir = cluster.dir.path().join("restored");
    let ends = seq_vector(&ends);
    let mut args = vec![
        "restore",
        "--to-seq",
        &ends,
        "--to",
        dir.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let output = cluster.lockstep(&args);
    assert!(output.status.success(), "{}", text(&output));
    for (i, shard) in history.iter().enumerate() {
        assert_eq!(
            keys_in(&dir.join(Cluster::shard(i))),
            state(shard, |_| true),
            "shard {i}"
        );
    }
}

/// WAL shipping to Azure Blob storage (Azurite) beside the local archive: the az:// archive
/// holds every acknowledged write of every shard, contiguous, and a restore replaying it
/// (`--wal-from az://...`) onto an early backup gives exactly the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_to_azure_blob_replays_to_the_model() {
    let azurite = Azurite::start("wal-archive");
    let az = "az://wal-archive/archive";
    let mut cluster = Cluster::start_with(
        5_000,
        None,
        vec!["--wal-to".into(), az.into()],
        azurite.env(),
    );
    // The coordinator reads the az:// archive for the restore.
    cluster.kill_coordinator();
    cluster.start_coordinator_with(&azurite.env());
    let mut history: Vec<Vec<Acked>> = vec![Vec::new(); N_AGENTS];
    for n in 0..10 {
        round(&cluster, &mut history, n).await;
    }
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));
    for n in 10..40 {
        round(&cluster, &mut history, n).await;
    }
    let status = wait_shipped(&cluster).await;
    let destinations = destination_errors(&status);
    assert!(
        destinations.iter().any(|(url, _)| url.starts_with("az://"))
            && destinations.iter().all(|(_, code)| code.is_empty()),
        "{status:#}"
    );
    let remote = Repository::open_with(az, &azurite.env())
        .await
        .expect("open the Azure archive");
    check_archive(&WalArchive::Store(remote), &history).await;
    restores_to_the_last_writes(&cluster, &history, &["--wal-from", az]);
}

/// A coordinator process, killed when dropped (so a failing test leaves nothing running).
pub(crate) struct Region(std::process::Child);

impl Drop for Region {
    fn drop(&mut self) {
        kill_hard(&mut self.0);
    }
}

/// A coordinator with no agents: another region's WAL archive, on `listen`.
pub(crate) fn start_region(dir: &std::path::Path, listen: &str) -> (Region, String) {
    let config = dir.join("region.toml");
    std::fs::write(
        &config,
        format!(
            "repository = \"{}\"\nlisten = \"{listen}\"\nplaintext = true\n",
            dir.join("repo").display()
        ),
    )
    .expect("write region config");
    let (child, address) = start_server(
        "lockstep",
        &[
            "serve".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &[],
        &dir.join("region.log"),
    );
    (Region(child), address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_region_archive_survives_its_outage_and_restores_the_cluster_without_the_primary_repository()
 {
    let region = tempfile::tempdir().expect("tempdir");
    let (region_server, address) = start_region(region.path(), "127.0.0.1:0");
    let url = format!("lockstep://{address}");
    let mut cluster = Cluster::start_with(
        5_000,
        None,
        vec!["--wal-to".into(), url.clone()],
        Vec::new(),
    );
    let mut history: Vec<Vec<Acked>> = vec![Vec::new(); N_AGENTS];
    let mut n = 0;
    for _ in 0..30 {
        round(&cluster, &mut history, n).await;
        n += 1;
    }

    // The region goes down while writes go on: shipping there fails and says so.
    drop(region_server);
    for _ in 0..20 {
        round(&cluster, &mut history, n).await;
        n += 1;
    }
    let reported = write_until_failing(&cluster, &mut history, &mut n, &url).await;
    assert!(
        reported.is_ok(),
        "the region outage was not reported: {reported:?}"
    );

    // It comes back on the same address; shipping resumes where the region's archive ends.
    let (_region_server, _) = start_region(region.path(), &address);
    for _ in 0..10 {
        round(&cluster, &mut history, n).await;
        n += 1;
    }
    wait_shipped(&cluster).await;
    let archive = open_archive(
        &url,
        &lockstep_proto::tls::Security::Plaintext,
        &Seal::Plain,
    )
    .await
    .expect("open the region's archive");
    check_archive(&archive, &history).await;

    // The primary repository is lost. A coordinator on a new, empty repository restores
    // every shard from the region's archive alone: empty shards, the whole WAL replayed.
    cluster.kill_coordinator();
    std::fs::remove_dir_all(cluster.repo()).expect("remove the primary repository");
    cluster.start_coordinator(None);
    let ends: Vec<u64> = history
        .iter()
        .map(|h| h.last().map_or(0, |w| w.seq))
        .collect();
    let dry = json(&cluster.lockstep(&[
        "restore",
        "--to-seq",
        &seq_vector(&ends),
        "--wal-from",
        &url,
        "--in-place",
        "--dry-run",
        "--json",
    ]));
    assert!(
        dry["note"]
            .as_str()
            .is_some_and(|n| n.contains("rebuilt from empty shards")),
        "{dry:#}"
    );
    let dir = cluster.dir.path().join("from-the-region");
    let output = cluster.lockstep(&[
        "restore",
        "--to-seq",
        &seq_vector(&ends),
        "--wal-from",
        &url,
        "--to",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    for (i, shard) in history.iter().enumerate() {
        assert_eq!(
            keys_in(&dir.join(Cluster::shard(i))),
            state(shard, |_| true),
            "shard {i}"
        );
    }
}
