//! The repository at scale, through a coordinator's gRPC API over a synthetic `file://`
//! repository, each reported at two sizes to show how the cost grows:
//!
//! - the WAL archive: one shard lineage already holds N segments, served by an
//!   archive-only coordinator (`agents = []`, as another region runs it). A shipper's resume
//!   (`ListWalSegments` with `last_only`) and a segment put after the end (`PutWalSegment`):
//!   the first resume and the first put after a restart find the lineage's end by reading
//!   its last directories (`layout::WAL_DIRS`), later ones cost the same whatever N is;
//! - the catalog: N committed backups of three shards, written as manifests only (a
//!   repository from before the catalog index, so the first look after a start indexes
//!   them). `backup list` (`ListBackups`, pages of 500 as the CLI asks), whole and its first
//!   page alone; later looks read the index's new entries only (`catalog.rs`); and the plan
//!   of a restore of the newest backup (`Restore` with `dry_run`, what `lockstep restore
//!   --dry-run` asks: the catalog for its chain, its shard manifests), first after a start
//!   (the index built by the first coordinator) and later.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use lockstep_proto::v1::{
    self, coordinator_client::CoordinatorClient, wal_archive_client::WalArchiveClient,
};
use lockstep_proto::wire::lineage_to_wire;
use lockstep_repository::layout::Layout;
use lockstep_repository::manifest::{
    BackupKind, BackupManifest, ShardManifest, ShardRef, ShardTimings, TransferStats,
};
use lockstep_repository::wal::{Segment, SegmentInfo, WalBatch};
use lockstep_repository::{BackupId, HlcTime, Lineage, ObjectId, Repository, Seq, ShardId, codec};
use serde::Serialize;

use crate::barrier::{Processes, start};
use crate::contenders::Binaries;
use crate::stats::median;

/// Sequence numbers per synthetic segment.
const SPAN: u64 = 100;
/// Warm puts and resumes timed (the median reported).
const WARM: usize = 50;
/// Segments a timed replay listing needs.
const REPLAYED: u64 = 100;

#[derive(Debug, Clone, Serialize)]
pub struct ArchiveResult {
    pub segments: u64,
    /// The first resume after the coordinator started, on an archive never looked at before
    /// (it reads the lineage's last directories).
    pub resume_cold_ms: f64,
    /// A later resume (median).
    pub resume_ms: f64,
    /// The listing a replay of the last `REPLAYED` segments reads (a restore to the
    /// archive's end from a backup that recent): pages from the archive's mark (median).
    pub replay_ms: f64,
    /// The first put after the coordinator started again (it finds the end again).
    pub put_cold_ms: f64,
    /// A later put after the end (median).
    pub put_ms: f64,
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Creates the repository at `repo_dir` and a coordinator's configuration for it, with an
/// agent entry for each of `shards` shards (none: archive-only); returns the configuration's
/// path. The agents' endpoints are never reached: only plans are asked of them.
pub(crate) fn prepare(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    repo_dir: &Path,
    shards: u32,
) -> Result<std::path::PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(repo_dir)?;
    runtime.block_on(async {
        Repository::open(&format!("file://{}", repo_dir.display()))
            .await?
            .claim("bench")
            .await?;
        anyhow::Ok(())
    })?;
    let config = dir.join("lockstep.toml");
    let agents = if shards == 0 {
        "agents = []\n".to_string()
    } else {
        (0..shards)
            .map(|shard| {
                format!(
                    "[[agents]]\nshard = \"shard-{shard}\"\nendpoint = \"http://127.0.0.1:9\"\n"
                )
            })
            .collect()
    };
    std::fs::write(
        &config,
        format!(
            "cluster = \"bench\"\nrepository = \"file://{}\"\nlisten = \"127.0.0.1:0\"\nplaintext = true\n{agents}",
            repo_dir.display()
        ),
    )?;
    Ok(config)
}

/// Starts the coordinator of `config`; returns its address.
pub(crate) fn serve(
    processes: &mut Processes,
    bins: &Binaries,
    config: &Path,
    log: &Path,
) -> Result<String> {
    start(
        processes,
        &bins.coordinator,
        &["serve", "--config", config.to_str().unwrap_or_default()],
        log,
        "warn",
    )
}

/// Writes `n` segment files where the layout puts them (names only matter to a listing;
/// their bytes are never read), and their marks.
fn build(repo_dir: &Path, shard: &ShardId, lineage: &Lineage, n: u64) -> Result<()> {
    let layout = Layout::new(object_store::path::Path::default());
    let write = |key: object_store::path::Path, bytes: &[u8]| -> Result<()> {
        let path = repo_dir.join(key.as_ref());
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))
    };
    for i in 0..n {
        let info = SegmentInfo {
            shard_id: shard.clone(),
            lineage: *lineage,
            first: Seq(i * SPAN + 1),
            last: Seq((i + 1) * SPAN),
            hlc_min: HlcTime::new(i, 0),
            hlc_max: HlcTime::new(i, 0),
            id: ObjectId::of(&i.to_le_bytes()),
        };
        write(layout.wal_segment(&info), b"x")?;
        if info.is_marked() {
            write(layout.wal_mark(&info), b"")?;
        }
    }
    Ok(())
}

/// A put request for the segment `first..=first+SPAN-1`.
async fn segment_put(
    shard: &ShardId,
    lineage: &Lineage,
    first: u64,
) -> Result<v1::PutWalSegmentRequest> {
    let segment = Segment {
        shard_id: shard.clone(),
        lineage: *lineage,
        batches: vec![WalBatch {
            first: Seq(first),
            count: SPAN,
            hlc: HlcTime::new(first, 0),
            data: vec![7; 64],
        }],
    };
    let (info, encoded) = lockstep_repository::repository::encode_wal_segment(
        &segment,
        codec::Compression::default(),
        &lockstep_repository::seal::Seal::Plain,
    )
    .await?;
    Ok(v1::PutWalSegmentRequest {
        shard_id: shard.to_string(),
        lineage: Some(lineage_to_wire(lineage)),
        name: info.file_name(),
        stored: encoded.to_vec(),
    })
}

pub fn measure(bins: &Binaries, work: &Path, n: u64) -> Result<ArchiveResult> {
    let dir = work.join(format!("archive-{n}"));
    let repo_dir = dir.join("repo");
    let shard = ShardId::new("shard-0")?;
    let lineage = Lineage::root();
    let runtime = runtime()?;
    let config = prepare(&runtime, &dir, &repo_dir, 0)?;
    eprintln!("scale bench: writing {n} WAL segments");
    build(&repo_dir, &shard, &lineage, n)?;
    let mut processes = Processes(Vec::new());
    let address = serve(&mut processes, bins, &config, &dir.join("coordinator.log"))?;
    runtime
        .block_on(async {
            let mut client = WalArchiveClient::connect(format!("http://{address}")).await?;
            let resume = |client: &mut WalArchiveClient<tonic::transport::Channel>| {
                let request = v1::ListWalSegmentsRequest {
                    shard_id: shard.to_string(),
                    lineage: Some(lineage_to_wire(&lineage)),
                    last_only: true,
                    ..Default::default()
                };
                let mut client = client.clone();
                async move {
                    let started = Instant::now();
                    let names = client.list_segments(request).await?.into_inner().names;
                    anyhow::ensure!(names.len() == 1, "one end, got {}", names.len());
                    anyhow::Ok(started.elapsed().as_secs_f64() * 1000.0)
                }
            };
            let resume_cold_ms = resume(&mut client).await?;
            let mut resumes = Vec::new();
            for _ in 0..WARM {
                resumes.push(resume(&mut client).await?);
            }
            // What `WalArchive::segments_after` asks for a replay of the last segments.
            let after = n.saturating_sub(REPLAYED) * SPAN;
            let mut replays = Vec::new();
            for _ in 0..5 {
                let started = Instant::now();
                let (mut listed, mut start_after) = (0, String::new());
                loop {
                    let request = v1::ListWalSegmentsRequest {
                        shard_id: shard.to_string(),
                        lineage: Some(lineage_to_wire(&lineage)),
                        page_size: lockstep_repository::archive::MAX_PAGE as u32,
                        mark_for: start_after.is_empty().then_some(after),
                        start_after: start_after.clone(),
                        up_to: n * SPAN,
                        ..Default::default()
                    };
                    let page = client.list_segments(request).await?.into_inner();
                    listed += page.names.len() as u64;
                    match page.names.last() {
                        Some(last) if page.more => start_after = last.clone(),
                        _ => break,
                    }
                }
                anyhow::ensure!(
                    listed >= REPLAYED.min(n),
                    "a replay listing found {listed} segments"
                );
                replays.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            // The coordinator again, so the first put is the one that lists.
            drop(client);
            anyhow::Ok((resume_cold_ms, median(&resumes), median(&replays)))
        })
        .and_then(|(resume_cold_ms, resume_ms, replay_ms)| {
            drop(processes);
            let mut processes = Processes(Vec::new());
            let address = start(
                &mut processes,
                &bins.coordinator,
                &["serve", "--config", config.to_str().unwrap_or_default()],
                &dir.join("coordinator-2.log"),
                "warn",
            )?;
            runtime.block_on(async {
                let mut client = WalArchiveClient::connect(format!("http://{address}")).await?;
                let mut next = n * SPAN + 1;
                let mut timed_put =
                    async |client: &mut WalArchiveClient<tonic::transport::Channel>| {
                        let request = segment_put(&shard, &lineage, next).await?;
                        next += SPAN;
                        let started = Instant::now();
                        client.put_segment(request).await?;
                        anyhow::Ok(started.elapsed().as_secs_f64() * 1000.0)
                    };
                let put_cold_ms = timed_put(&mut client).await?;
                let mut puts = Vec::new();
                for _ in 0..WARM {
                    puts.push(timed_put(&mut client).await?);
                }
                drop(processes);
                anyhow::Ok(ArchiveResult {
                    segments: n,
                    resume_cold_ms,
                    resume_ms,
                    replay_ms,
                    put_cold_ms,
                    put_ms: median(&puts),
                })
            })
        })
}

#[derive(Debug, Clone, Serialize)]
pub struct CatalogResult {
    pub backups: u64,
    /// The first `backup list` after the coordinator started (every manifest read).
    pub list_cold_ms: f64,
    /// A later one (median).
    pub list_ms: f64,
    /// The first page of 500 alone, later (median): what an operator's `backup list` shows.
    pub page_ms: f64,
    /// The plan of a restore of the newest backup, first after a start (every manifest
    /// read) and later (median).
    pub plan_cold_ms: f64,
    pub plan_ms: f64,
}

/// Shards of each synthetic backup.
const CATALOG_SHARDS: u32 = 3;

/// Writes `n` committed backup manifests of three shards, and the shard manifests of the
/// newest (what a plan of its restore reads); returns the newest's id.
fn build_catalog(runtime: &tokio::runtime::Runtime, repo_dir: &Path, n: u64) -> Result<BackupId> {
    let dir = repo_dir.join("backups");
    std::fs::create_dir_all(&dir)?;
    let lineage = Lineage::root();
    let started = chrono::Utc::now() - chrono::Duration::days(365);
    let mut newest = None;
    for i in 0..n {
        let id = BackupId::new(format!("bk-{i:08}"))?;
        let mut manifest = BackupManifest::commit(id.clone(), BackupKind::Full, None, started, &[]);
        manifest.commit_seq = i + 1;
        for shard in 0..CATALOG_SHARDS {
            let shard_id = ShardId::new(format!("shard-{shard}"))?;
            manifest.cut.insert(shard_id.clone(), Seq(i * 1000));
            manifest.shards.push(ShardRef {
                shard_id,
                seq: Seq(i * 1000),
                lineage,
                hlc: Some(HlcTime::default()),
                n_files: 40,
                bytes: 1 << 30,
            });
        }
        std::fs::write(dir.join(format!("{id}.json")), manifest.to_json())
            .with_context(|| format!("write manifest {i}"))?;
        newest = Some((id, i));
    }
    let (id, i) = newest.context("an empty catalog")?;
    runtime.block_on(async {
        let repo = Repository::open(&format!("file://{}", repo_dir.display())).await?;
        for shard in 0..CATALOG_SHARDS {
            repo.put_shard_manifest(&ShardManifest {
                format_version: 1,
                backup_id: id.clone(),
                shard_id: ShardId::new(format!("shard-{shard}"))?,
                engine: "rocksdb".into(),
                seq: Seq(i * 1000),
                lineage,
                hlc: HlcTime::default(),
                captured_at: started,
                column_families: vec!["default".into()],
                files: Vec::new(),
                files_seq: None,
                wal_after: None,
                wal: Vec::new(),
                stats: TransferStats::default(),
                timings: ShardTimings::default(),
                tool_version: "bench".into(),
            })
            .await?;
        }
        anyhow::Ok(())
    })?;
    Ok(id)
}

pub fn measure_catalog(bins: &Binaries, work: &Path, n: u64) -> Result<CatalogResult> {
    let dir = work.join(format!("catalog-{n}"));
    let repo_dir = dir.join("repo");
    let runtime = runtime()?;
    let config = prepare(&runtime, &dir, &repo_dir, CATALOG_SHARDS)?;
    eprintln!("scale bench: writing {n} backup manifests");
    let newest = build_catalog(&runtime, &repo_dir, n)?;
    let mut processes = Processes(Vec::new());
    let address = serve(&mut processes, bins, &config, &dir.join("coordinator.log"))?;
    let result = runtime.block_on(async {
        let client = CoordinatorClient::connect(format!("http://{address}")).await?;
        let list = async |pages: usize| {
            let mut client = client.clone();
            let started = Instant::now();
            let (mut token, mut listed) = (String::new(), 0u64);
            for _ in 0..pages {
                let reply = client
                    .list_backups(v1::ListBackupsRequest {
                        page_size: 500,
                        page_token: token,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                listed += reply.backups.len() as u64;
                token = reply.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            anyhow::ensure!(
                listed == n || (pages == 1 && listed == n.min(500)),
                "listed {listed} of {n}"
            );
            anyhow::Ok(started.elapsed().as_secs_f64() * 1000.0)
        };
        let list_cold_ms = list(usize::MAX).await?;
        let (mut lists, mut pages) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            lists.push(list(usize::MAX).await?);
            pages.push(list(1).await?);
        }
        anyhow::Ok((list_cold_ms, median(&lists), median(&pages)))
    });
    drop(processes);
    let (list_cold_ms, list_ms, page_ms) = result?;
    // A coordinator of its own, so its first plan is the first read of the catalog.
    let mut processes = Processes(Vec::new());
    let address = serve(
        &mut processes,
        bins,
        &config,
        &dir.join("coordinator-plan.log"),
    )?;
    let result = runtime.block_on(async {
        let client = CoordinatorClient::connect(format!("http://{address}")).await?;
        let plan = async || {
            let mut client = client.clone();
            let started = Instant::now();
            let mut jobs = client
                .restore(v1::RestoreClusterRequest {
                    backup_id: newest.to_string(),
                    target_dir: "/nonexistent/{shard}".into(),
                    dry_run: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let job = jobs.message().await?.context("no plan")?;
            anyhow::ensure!(
                job.error_message.is_empty() && job.plan.len() == CATALOG_SHARDS as usize,
                "the plan of {newest}: {job:?}"
            );
            anyhow::Ok(started.elapsed().as_secs_f64() * 1000.0)
        };
        let plan_cold_ms = plan().await?;
        let mut plans = Vec::new();
        for _ in 0..5 {
            plans.push(plan().await?);
        }
        anyhow::Ok(CatalogResult {
            backups: n,
            list_cold_ms,
            list_ms,
            page_ms,
            plan_cold_ms,
            plan_ms: median(&plans),
        })
    });
    drop(processes);
    result
}
