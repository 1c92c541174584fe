//! The WAL archive at scale: a `file://` repository whose one shard lineage already holds N
//! segments, served by an archive-only coordinator (`agents = []`, as another region runs
//! it), and through its gRPC API what agents ask of it:
//!
//! - a shipper's resume (`ListWalSegments` with `last_only`): the first after the
//!   coordinator starts lists the lineage once; later ones are answered from memory;
//! - a segment put after the end (`PutWalSegment`): the first lists the lineage once; later
//!   ones cost the same whatever N is.
//!
//! Reported at two sizes, to show how the cost grows with the archive.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use lockstep_proto::v1::{self, wal_archive_client::WalArchiveClient};
use lockstep_proto::wire::lineage_to_wire;
use lockstep_repository::wal::{Segment, SegmentInfo, WalBatch};
use lockstep_repository::{HlcTime, Lineage, ObjectId, Repository, Seq, ShardId, codec};
use serde::Serialize;

use crate::barrier::{Processes, start};
use crate::contenders::Binaries;

/// Sequence numbers per synthetic segment.
const SPAN: u64 = 100;
/// Warm puts and resumes timed (the median reported).
const WARM: usize = 50;

#[derive(Debug, Clone, Serialize)]
pub struct ArchiveResult {
    pub segments: u64,
    /// The first resume after the coordinator started (one listing of the lineage).
    pub resume_cold_ms: f64,
    /// A later resume (median).
    pub resume_ms: f64,
    /// The first put after the coordinator started.
    pub put_cold_ms: f64,
    /// A later put after the end (median).
    pub put_ms: f64,
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Writes `n` segment files (names only matter to a listing; their bytes are never read).
fn build(repo_dir: &Path, shard: &ShardId, lineage: &Lineage, n: u64) -> Result<()> {
    let layout_dir = repo_dir
        .join("wal")
        .join(shard.as_str())
        .join(lineage.dir_name());
    std::fs::create_dir_all(&layout_dir)?;
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
        std::fs::write(layout_dir.join(info.file_name()), b"x")
            .with_context(|| format!("write segment {i}"))?;
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
    let _ = std::fs::remove_dir_all(&dir);
    let repo_dir = dir.join("repo");
    std::fs::create_dir_all(&repo_dir)?;
    let shard = ShardId::new("shard-0")?;
    let lineage = Lineage::root();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // The repository's marker, as a first start writes it.
        Repository::open(&format!("file://{}", repo_dir.display()))
            .await?
            .claim("bench")
            .await?;
        anyhow::Ok(())
    })?;
    eprintln!("archive bench: writing {n} segments");
    build(&repo_dir, &shard, &lineage, n)?;
    let config = dir.join("lockstep.toml");
    std::fs::write(
        &config,
        format!(
            "cluster = \"bench\"\nrepository = \"file://{}\"\nlisten = \"127.0.0.1:0\"\nagents = []\n",
            repo_dir.display()
        ),
    )?;
    let mut processes = Processes(Vec::new());
    let address = start(
        &mut processes,
        &bins.coordinator,
        &["serve", "--config", config.to_str().unwrap_or_default()],
        &dir.join("coordinator.log"),
        "warn",
    )?;
    runtime
        .block_on(async {
            let mut client = WalArchiveClient::connect(format!("http://{address}")).await?;
            let resume = |client: &mut WalArchiveClient<tonic::transport::Channel>| {
                let request = v1::ListWalSegmentsRequest {
                    shard_id: shard.to_string(),
                    lineage: Some(lineage_to_wire(&lineage)),
                    last_only: true,
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
            // The coordinator again, so the first put is the one that lists.
            drop(client);
            anyhow::Ok((resume_cold_ms, median(resumes)))
        })
        .and_then(|(resume_cold_ms, resume_ms)| {
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
                    put_cold_ms,
                    put_ms: median(puts),
                })
            })
        })
}
