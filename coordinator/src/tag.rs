//! Tags: named restore points.
//!
//! A tag is the backup barrier without a capture: every agent closes its write gate, records
//! its exact sequence number, HLC time and lineage (`CAPTURE_MODE_POINT`), and reopens the
//! gate on Commit. Once every shard committed, the coordinator writes the tag manifest, so a
//! tag names one consistent cut, exactly as a backup's cut; restoring it replays the WAL from
//! the latest backup at or before each shard's point.
//!
//! Tags run as operations of `ClusterOps`, which also takes the automatic `auto-<UTC time>`
//! tags every `[tags] auto_every_s`.
//!
//! Architecture invariant: a tag is written only after every agent of the topology was
//! Prepared within the deadline and accepted the Commit; a failed tag barrier is aborted
//! everywhere and leaves nothing in the repository.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use lockstep_proto::v1::{self, BarrierState};
use lockstep_proto::wire::{lineage_from_wire, lineage_to_wire};
use lockstep_repository::manifest::{
    Labels, MANIFEST_FORMAT_VERSION, ShardPoint, TOOL_VERSION, TagManifest,
};
use lockstep_repository::{BackupId, Error, ErrorCode, HlcTime, Result, Seq, TagName};
use tokio_util::sync::CancellationToken;

use crate::backup::{JobView, abort_everywhere, barrier};
use crate::ops::ClusterContext;

/// Takes tag `name` across the whole cluster; on failure or `cancel`, aborts everywhere.
pub async fn create_tag(
    ctx: &ClusterContext,
    name: TagName,
    automatic: bool,
    labels: Labels,
    cancel: &CancellationToken,
) -> Result<TagManifest> {
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
    // The agents key barriers by id; a tag's barrier gets a fresh one.
    let id = BackupId::generate();
    let view = Arc::new(Mutex::new(JobView::new(id.clone())));
    let lease_ms = ctx.config.barrier.lease_ms;
    let created_at = Utc::now();
    let prepared = tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Error::new(
            ErrorCode::BarrierAborted,
            "the coordinator is shutting down; the tag was aborted",
        )),
        prepared = barrier(
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
        ) => prepared,
    };
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            abort_everywhere(ctx, &id).await;
            return Err(err.context(format!("tag {name}")));
        }
    };
    let mut points = BTreeMap::new();
    let mut max_gate_closed_us = 0;
    // In agent order; the barrier checked each agent answers for its configured shard.
    for (agent, status) in ctx.agents.iter().zip(&prepared) {
        points.insert(
            agent.shard_id.clone(),
            ShardPoint {
                seq: Seq(status.seq),
                lineage: lineage_from_wire(
                    status.lineage.as_ref(),
                    &format!("shard {}'s point", agent.shard_id),
                )?,
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
        labels,
        tool_version: TOOL_VERSION.to_string(),
    };
    ctx.fence
        .check(&format!("publish tag {}", tag.name))
        .await?;
    ctx.repo.put_tag(&tag).await?;
    metrics::histogram!(lockstep_process::metrics::BARRIER_WRITE_PAUSE)
        .record(max_gate_closed_us as f64 / 1e6);
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
                        lineage: Some(lineage_to_wire(&p.lineage)),
                        hlc: p.hlc.0,
                    },
                )
            })
            .collect(),
        max_gate_closed_us: tag.max_gate_closed_us,
        automatic: tag.automatic,
        error_code: String::new(),
        labels: tag.labels.clone().into_iter().collect(),
    }
}
