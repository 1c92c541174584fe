//! Garbage collection at scale: a synthetic `file://` repository of N small objects, half of
//! them named by shard manifests (500 chunks each), and one GC pass over it in its own process
//! under GNU time (`lockstep-bench gc-pass`: the mark, the listing, the plan and the candidate
//! record, the part of a pass that grows with the repository; the deletes come a grace period
//! later). Reported at two sizes, to show how time and peak RSS grow.

use std::path::Path;

use anyhow::{Context, Result};
use chrono::Utc;
use lockstep_repository::manifest::{
    Chunk, FileEntry, FileKind, MANIFEST_FORMAT_VERSION, ShardManifest, ShardTimings, TOOL_VERSION,
    TransferStats,
};
use lockstep_repository::{BackupId, HlcTime, Lineage, ObjectId, Repository, Seq, ShardId};
use serde::Serialize;

use crate::contenders::{Binaries, timed};

/// Chunks per synthetic shard manifest.
const CHUNKS_PER_MANIFEST: u64 = 500;
/// Bytes of each synthetic object (GC never reads them).
const OBJECT_BYTES: usize = 64;

#[derive(Debug, Clone, Serialize)]
pub struct GcResult {
    pub objects: u64,
    pub referenced: u64,
    pub manifests: u64,
    pub candidates: u64,
    /// The pass, timed from outside (process start to exit).
    pub secs: f64,
    pub max_rss_mib: f64,
}

/// Builds the repository at `dir`: `objects` objects, the even-numbered ones named.
fn build(dir: &Path, objects: u64) -> Result<u64> {
    let objects_dir = dir.join("objects");
    for n in 0..objects {
        let hex = ObjectId::of(&n.to_le_bytes()).to_hex();
        let sub = objects_dir.join(&hex[..2]);
        if n < 256 {
            std::fs::create_dir_all(&sub)?;
        }
        std::fs::write(sub.join(&hex), [0u8; OBJECT_BYTES])
            .or_else(|_| {
                std::fs::create_dir_all(&sub)?;
                std::fs::write(sub.join(&hex), [0u8; OBJECT_BYTES])
            })
            .with_context(|| format!("write object {hex}"))?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let repo = Repository::open(&format!("file://{}", dir.display())).await?;
        let shard = ShardId::new("shard-0")?;
        let named: Vec<u64> = (0..objects).step_by(2).collect();
        let mut manifests = 0;
        for (i, batch) in named.chunks(CHUNKS_PER_MANIFEST as usize).enumerate() {
            let chunks: Vec<Chunk> = batch
                .iter()
                .map(|n| Chunk {
                    id: ObjectId::of(&n.to_le_bytes()),
                    copy: 0,
                    len: OBJECT_BYTES as u64,
                    stored_len: OBJECT_BYTES as u64,
                })
                .collect();
            let manifest = ShardManifest {
                format_version: MANIFEST_FORMAT_VERSION,
                backup_id: BackupId::new(format!("bk-synthetic-{i:07}"))?,
                shard_id: shard.clone(),
                engine: "memory".into(),
                seq: Seq(0),
                lineage: Lineage::root(),
                hlc: HlcTime::default(),
                captured_at: Utc::now(),
                column_families: vec!["default".into()],
                files: vec![FileEntry {
                    name: "data".into(),
                    size: OBJECT_BYTES as u64 * chunks.len() as u64,
                    kind: FileKind::Meta,
                    identity: None,
                    chunks,
                }],
                files_seq: None,
                wal_after: None,
                wal: Vec::new(),
                stats: TransferStats::default(),
                timings: ShardTimings::default(),
                tool_version: TOOL_VERSION.into(),
            };
            // A backup being taken owns its shard manifests.
            repo.put_pending(&manifest.backup_id, b"{}".to_vec())
                .await?;
            repo.put_shard_manifest(&manifest).await?;
            manifests += 1;
        }
        Ok::<_, anyhow::Error>(manifests)
    })
}

/// One GC pass over a repository of `objects` objects, in its own process.
pub fn measure(bins: &Binaries, work: &Path, objects: u64) -> Result<GcResult> {
    let dir = work.join(format!("gc-{objects}"));
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("[bench] GC: building a repository of {objects} objects");
    let manifests = build(&dir, objects)?;
    eprintln!("[bench] GC: one pass over {objects} objects");
    let pass = timed(
        &bins.bench,
        &["gc-pass", "--repo", dir.to_str().unwrap_or_default()],
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    let report: serde_json::Value = serde_json::from_str(&pass.stdout).context("gc-pass output")?;
    let field = |name: &str| report[name].as_u64().unwrap_or(0);
    Ok(GcResult {
        objects: field("listed"),
        referenced: field("referenced"),
        manifests,
        candidates: field("candidates"),
        secs: pass.secs,
        max_rss_mib: pass.max_rss_kib as f64 / 1024.0,
    })
}

/// `lockstep-bench gc-pass`: the scan of a pass (no grace: every unreferenced object becomes
/// a candidate) and its record, as the coordinator runs them; prints what it found as JSON.
pub fn pass(repo: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let repo = Repository::open(&format!("file://{}", repo.display())).await?;
        let scan = repo.gc_scan(Utc::now(), chrono::Duration::zero()).await?;
        repo.put_gc_candidates(&scan.plan.record).await?;
        let report = serde_json::json!({
            "listed": scan.listed,
            "referenced": scan.referenced,
            "candidates": scan.plan.record.marked.len(),
        });
        println!("{report}");
        Ok(())
    })
}
