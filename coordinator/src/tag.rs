//! Tags: named restore points (DESIGN.md §4, §8).
//!
//! A tag is the backup barrier without a capture: every agent closes its write gate, records
//! its exact sequence number, HLC time and timeline (`CAPTURE_MODE_POINT`), and reopens the
//! gate on Commit. Once every shard committed, the coordinator writes the tag manifest, so a
//! tag names one consistent cut, exactly as a backup's cut; restoring it replays the WAL from
//! the latest backup at or before each shard's point.
//!
//! `auto_tags` takes `auto-<UTC time>` tags every N seconds; a tick that finds the cluster
//! busy with a backup or restore is skipped, not queued.
//!
//! Architecture invariant: a tag is written only after every agent of the topology was
//! Prepared within the deadline and accepted the Commit; a failed tag barrier is aborted
//! everywhere and leaves nothing in the repository.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use lockstep_proto::v1::{self, BarrierState};
use lockstep_repository::manifest::{
    MANIFEST_FORMAT_VERSION, ShardPoint, TOOL_VERSION, TagManifest,
};
use lockstep_repository::{
    BackupId, Error, ErrorCode, HlcTime, Result, Seq, ShardId, TagName, Timeline,
};
use tokio_util::sync::CancellationToken;

use crate::job::{JobContext, JobState, JobView, abort_everywhere, barrier};

/// Takes tag `name` across the whole cluster.
pub async fn create_tag(ctx: &JobContext, name: TagName, automatic: bool) -> Result<TagManifest> {
    ctx.require_agents("take a tag")?;
    match ctx.repo.tag(&name).await {
        Ok(_) => {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("tag {name} already exists; pick another name"),
            ));
        }
        Err(err) if err.code == ErrorCode::BackupNotFound => {}
        Err(err) => return Err(err),
    }
    let _guard = ctx.cluster.try_hold(format!("tag {name}"))?;
    // The agents key barriers by id; a tag's barrier gets a fresh one.
    let id = BackupId::generate();
    let view = Arc::new(Mutex::new(JobView {
        backup_id: id.clone(),
        state: JobState::Preparing,
        shards: Vec::new(),
        error: None,
    }));
    let lease_ms = ctx.config.barrier.lease_ms;
    let created_at = Utc::now();
    let prepared = barrier(
        ctx,
        &id,
        &view,
        |_| v1::PrepareRequest {
            backup_id: id.to_string(),
            lease_ms,
            capture: v1::CaptureMode::Point as i32,
            ..Default::default()
        },
        &[BarrierState::Uploaded],
    )
    .await;
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            abort_everywhere(&ctx.agents, &id).await;
            return Err(err.context(format!("tag {name}")));
        }
    };
    let mut points = BTreeMap::new();
    let mut max_gate_closed_us = 0;
    for status in &prepared {
        points.insert(
            ShardId::new(status.shard_id.as_str())?,
            ShardPoint {
                seq: Seq(status.seq),
                timeline: Timeline(status.timeline.max(1)),
                hlc: HlcTime(status.hlc),
            },
        );
        max_gate_closed_us = max_gate_closed_us.max(status.gate_closed_us);
    }
    let tag = TagManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        name,
        created_at,
        points,
        max_gate_closed_us,
        automatic,
        tool_version: TOOL_VERSION.to_string(),
    };
    ctx.repo.put_tag(&tag).await?;
    tracing::info!(tag = %tag.name, shards = tag.points.len(), max_gate_closed_us, "tag created");
    Ok(tag)
}

/// The wire form of a tag.
pub fn tag_info(tag: &TagManifest) -> v1::TagInfo {
    v1::TagInfo {
        name: tag.name.to_string(),
        created_at: tag.created_at.to_rfc3339(),
        points: tag
            .points
            .iter()
            .map(|(shard, p)| {
                (
                    shard.to_string(),
                    v1::TagPoint {
                        seq: p.seq.0,
                        timeline: p.timeline.0,
                        hlc: p.hlc.0,
                    },
                )
            })
            .collect(),
        max_gate_closed_us: tag.max_gate_closed_us,
        automatic: tag.automatic,
        error_code: String::new(),
    }
}

/// Takes an `auto-...` tag every `every`, until `cancel` fires.
pub async fn auto_tags(ctx: JobContext, every: Duration, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            // Fixed polling order: the simulations replay a seed exactly.
            biased;
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let name = format!("auto-{}", Utc::now().format("%Y%m%dT%H%M%S%.3fZ"));
        let name = match TagName::new(name) {
            Ok(name) => name,
            Err(err) => {
                tracing::error!(error = %err.chain(), "automatic restore point name");
                continue;
            }
        };
        match create_tag(&ctx, name.clone(), true).await {
            Ok(_) => {}
            Err(err) if err.code == ErrorCode::BarrierBusy => {
                tracing::info!(tag = %name, reason = %err.message, "automatic restore point skipped");
            }
            Err(err) => {
                tracing::warn!(tag = %name, error = %err.chain(), "automatic restore point failed")
            }
        }
    }
}
