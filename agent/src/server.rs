//! The agent's gRPC server: the `Shard` data API (every write through the gate), the `Agent`
//! barrier API (through the participant actor), health checking and reflection.
//!
//! `serve` takes its listener and a cancellation token from the caller, so tests and
//! simulations inject their own.

use std::sync::Arc;
use std::time::Duration;

use lockstep_proto::tls::Security;
use lockstep_proto::v1::agent_server::{Agent, AgentServer};
use lockstep_proto::v1::shard_server::{Shard, ShardServer};
use lockstep_proto::wire::{
    legs_from_wire, limits_change_from_wire, lineage_from_wire, lineage_to_wire,
};
use lockstep_proto::{to_status, v1};
use lockstep_repository::bandwidth::{Bandwidth, Limits};
use lockstep_repository::{BackupId, Error, ErrorCode, Repository, ShardId};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::backup::{BackupOptions, CaptureMode, CondemnedSet};
use crate::engine::{DEFAULT_CF, ShardEngine, WriteBatch};
use crate::gate::WriteGate;
use crate::participant::{
    BarrierState, BarrierStatus, DEFAULT_RESTORE_LEASE, ParticipantHandle, PlantedBug,
    RestoreRequest, RestoreState, RestoreStatus, ShardParts,
};
use crate::shipper::{DestinationStatus, ShipperHandle, ShipperOptions};
use crate::slot::EngineSlot;

/// Longest lease an agent accepts; a longer one would let a lost coordinator pause writes.
pub const MAX_LEASE: Duration = Duration::from_secs(300);

struct ShardApi<E> {
    slot: Arc<EngineSlot<E>>,
    gate: WriteGate,
}

fn cf_name(name: &str) -> &str {
    if name.is_empty() { DEFAULT_CF } else { name }
}

fn blocking_failed(err: lockstep_repository::blocking::TaskFailed) -> Status {
    to_status(&Error::with_source(
        ErrorCode::ShardEngineFailed,
        "engine task failed",
        err,
    ))
}

impl<E: ShardEngine> ShardApi<E> {
    /// Applies a batch through the gate. The permit moves into the blocking task, so a client
    /// that goes away cannot release the gate while its write is still being applied.
    async fn apply(&self, batch: WriteBatch) -> Result<Response<v1::WriteReply>, Status> {
        let permit = self.gate.enter().await;
        let engine = self.slot.get().map_err(|err| to_status(&err))?;
        let range = lockstep_repository::blocking::run(move || {
            let range = engine.write(&batch);
            drop(permit);
            range
        })
        .await
        .map_err(blocking_failed)?
        .map_err(|err| to_status(&err))?;
        Ok(Response::new(v1::WriteReply {
            first_seq: range.first.0,
            last_seq: range.last.0,
            hlc: range.hlc.0,
        }))
    }
}

#[tonic::async_trait]
impl<E: ShardEngine> Shard for ShardApi<E> {
    async fn put(
        &self,
        request: Request<v1::PutRequest>,
    ) -> Result<Response<v1::WriteReply>, Status> {
        let r = request.into_inner();
        let mut batch = WriteBatch::new();
        batch.put(cf_name(&r.column_family), r.key, r.value);
        self.apply(batch).await
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetReply>, Status> {
        let r = request.into_inner();
        let engine = self.slot.get().map_err(|err| to_status(&err))?;
        let value = lockstep_repository::blocking::run(move || {
            engine.get(cf_name(&r.column_family), &r.key)
        })
        .await
        .map_err(blocking_failed)?
        .map_err(|err| to_status(&err))?;
        Ok(Response::new(v1::GetReply {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::WriteReply>, Status> {
        let r = request.into_inner();
        let mut batch = WriteBatch::new();
        batch.delete(cf_name(&r.column_family), r.key);
        self.apply(batch).await
    }

    async fn write(
        &self,
        request: Request<v1::WriteRequest>,
    ) -> Result<Response<v1::WriteReply>, Status> {
        let mut batch = WriteBatch::new();
        for op in request.into_inner().ops {
            let cf = cf_name(&op.column_family);
            match v1::write_op::Kind::try_from(op.kind) {
                Ok(v1::write_op::Kind::Put) => batch.put(cf, op.key, op.value),
                Ok(v1::write_op::Kind::Delete) => batch.delete(cf, op.key),
                Ok(v1::write_op::Kind::DeleteRange) => batch.delete_range(cf, op.key, op.end_key),
                _ => {
                    return Err(to_status(&Error::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "write op kind {} is not put, delete or delete_range",
                            op.kind
                        ),
                    )));
                }
            };
        }
        self.apply(batch).await
    }

    async fn scan(
        &self,
        request: Request<v1::ScanRequest>,
    ) -> Result<Response<v1::ScanReply>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 {
            1000
        } else {
            r.limit.min(100_000)
        } as usize;
        let engine = self.slot.get().map_err(|err| to_status(&err))?;
        let entries = lockstep_repository::blocking::run(move || {
            let end = (!r.end.is_empty()).then_some(r.end.as_slice());
            engine.scan(cf_name(&r.column_family), &r.start, end, limit)
        })
        .await
        .map_err(blocking_failed)?
        .map_err(|err| to_status(&err))?;
        Ok(Response::new(v1::ScanReply {
            entries: entries
                .into_iter()
                .map(|(key, value)| v1::KeyValue { key, value })
                .collect(),
        }))
    }
}

struct AgentApi {
    participant: ParticipantHandle,
    shipper: ShipperHandle,
    shard_id: ShardId,
    bandwidth: Arc<Bandwidth>,
}

const MIB: u64 = 1 << 20;

/// The agent's limits on the wire, in MiB/s.
fn limits_to_wire(shard: &ShardId, limits: Limits) -> v1::AgentLimits {
    v1::AgentLimits {
        shard_id: shard.to_string(),
        upload_mib_s: limits.upload / MIB,
        download_mib_s: limits.download / MIB,
        wal_share_percent: limits.wal_share_percent,
        ..Default::default()
    }
}

fn destination_to_wire(d: DestinationStatus) -> v1::WalDestinationStatus {
    let (error_code, error_message) = d
        .last_error
        .map(|(code, message)| (code.as_str().to_string(), message))
        .unwrap_or_default();
    v1::WalDestinationStatus {
        url: d.url,
        lineage: d.lineage.as_ref().map(lineage_to_wire),
        shipped_seq: d.shipped_seq.0,
        shipped_hlc: d.shipped_hlc.0,
        latest_seq: d.latest_seq.0,
        lag_seq: d.lag_seq,
        lag_ms: d.lag_ms,
        pending_bytes: d.pending_bytes,
        pending_segments: d.pending_segments,
        segments_shipped: d.segments_shipped,
        bytes_shipped: d.bytes_shipped,
        rate_bytes_per_sec: d.rate_bytes_per_sec,
        lag_p50_ms: d.lag_p50_ms,
        lag_p99_ms: d.lag_p99_ms,
        wal_retained_bytes: d.wal_retained_bytes,
        pin_near_bound: d.pin_near_bound,
        error_code,
        error_message,
    }
}

/// A sequence number off the wire; one past the largest a shard can reach is refused.
fn seq(value: u64) -> Result<lockstep_repository::Seq, Status> {
    let seq = lockstep_repository::Seq(value);
    if !seq.is_valid() {
        return Err(to_status(&Error::new(
            ErrorCode::InvalidArgument,
            format!("sequence number {value} is past the largest a shard can reach"),
        )));
    }
    Ok(seq)
}

fn backup_id(raw: &str) -> Result<BackupId, Status> {
    BackupId::new(raw).map_err(|err| to_status(&err))
}

/// A restore id off the wire, validated as `RestoreId` (the participant keys restores by it).
fn restore_id(raw: String) -> Result<String, Status> {
    lockstep_repository::RestoreId::new(raw)
        .map(String::from)
        .map_err(|err| to_status(&err))
}

/// A participant's answer as a gRPC reply.
fn reply<T, W>(result: Result<T, Error>, wire: fn(T) -> W) -> Result<Response<W>, Status> {
    result
        .map(|value| Response::new(wire(value)))
        .map_err(|err| to_status(&err))
}

/// The wire form of a restore status.
pub fn restore_to_wire(status: RestoreStatus) -> v1::RestoreStatus {
    let state = match status.state {
        RestoreState::Staging => v1::RestoreState::Staging,
        RestoreState::Staged => v1::RestoreState::Staged,
        RestoreState::Swapped => v1::RestoreState::Swapped,
        RestoreState::Applied => v1::RestoreState::Applied,
        RestoreState::Discarded => v1::RestoreState::Discarded,
        RestoreState::Failed => v1::RestoreState::Failed,
        RestoreState::Unknown => v1::RestoreState::Unknown,
    };
    let (error_code, error_message) = status
        .error
        .map(|(code, message)| (code.as_str().to_string(), message))
        .unwrap_or_default();
    v1::RestoreStatus {
        restore_id: status.restore_id,
        backup_id: status.backup_id.map(|b| b.to_string()).unwrap_or_default(),
        shard_id: status.shard_id.to_string(),
        state: state as i32,
        seq: status.seq.0,
        bytes_done: status.bytes_done,
        bytes_total: status.bytes_total,
        n_files: status.n_files as u32,
        target_dir: status
            .target
            .map(|t| t.display().to_string())
            .unwrap_or_default(),
        error_code,
        error_message,
    }
}

/// The wire form of a barrier status.
pub fn status_to_wire(status: BarrierStatus) -> v1::BarrierStatus {
    let state = match status.state {
        BarrierState::Staged => v1::BarrierState::Staged,
        BarrierState::Prepared => v1::BarrierState::Prepared,
        BarrierState::Uploading => v1::BarrierState::Uploading,
        BarrierState::Uploaded => v1::BarrierState::Uploaded,
        BarrierState::Aborted => v1::BarrierState::Aborted,
        BarrierState::Expired => v1::BarrierState::Expired,
        BarrierState::Failed => v1::BarrierState::Failed,
        BarrierState::Unknown => v1::BarrierState::Unknown,
    };
    let (error_code, error_message) = status
        .error
        .map(|(code, message)| (code.as_str().to_string(), message))
        .unwrap_or_default();
    v1::BarrierStatus {
        backup_id: status.backup_id.to_string(),
        shard_id: status.shard_id.to_string(),
        condemned_objects: status.condemned_objects,
        state: state as i32,
        seq: status.seq.0,
        hlc: status.hlc.0,
        lineage: status.lineage.as_ref().map(lineage_to_wire),
        captured_at: status
            .captured_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        files: status
            .files
            .into_iter()
            .map(|f| v1::CapturedFile {
                name: f.name,
                size: f.size,
                kind: serde_json::to_value(f.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
            })
            .collect(),
        gate_closed_us: status.gate_closed.as_micros() as u64,
        bytes_done: status.bytes_done,
        bytes_total: status.bytes_total,
        error_code,
        error_message,
    }
}

/// The backup id, capture mode, condemned objects and lease of a Stage or Prepare request,
/// checked.
fn barrier_request(
    r: v1::PrepareRequest,
) -> Result<(BackupId, CaptureMode, CondemnedSet, Duration), Status> {
    let lease = Duration::from_millis(r.lease_ms);
    if lease.is_zero() || lease > MAX_LEASE {
        return Err(to_status(&Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "lease of {} ms is outside 1..={} ms",
                r.lease_ms,
                MAX_LEASE.as_millis()
            ),
        )));
    }
    let mode = match v1::CaptureMode::try_from(r.capture) {
        Ok(v1::CaptureMode::Files) => CaptureMode::Files,
        Ok(v1::CaptureMode::Point) => CaptureMode::Point,
        Ok(v1::CaptureMode::Wal) => CaptureMode::Wal {
            after: seq(r.wal_after_seq)?,
            lineage: lineage_from_wire(r.wal_lineage.as_ref(), "the parent backup's lineage")
                .map_err(|e| to_status(&e))?,
        },
        Err(_) => {
            return Err(to_status(&Error::new(
                ErrorCode::InvalidArgument,
                format!("unknown capture mode {}", r.capture),
            )));
        }
    };
    let condemned = match &r.condemned {
        Some(f) => Some(Arc::new(
            lockstep_repository::gc::Condemned::from_wire(&f.bits, f.hashes, f.count)
                .map_err(|e| to_status(&e))?,
        )),
        None => None,
    };
    Ok((backup_id(&r.backup_id)?, mode, condemned, lease))
}

#[tonic::async_trait]
impl Agent for AgentApi {
    async fn stage(
        &self,
        request: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::BarrierStatus>, Status> {
        let (backup, mode, condemned, lease) = barrier_request(request.into_inner())?;
        reply(
            self.participant.stage(backup, mode, condemned, lease).await,
            status_to_wire,
        )
    }

    async fn prepare(
        &self,
        request: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::BarrierStatus>, Status> {
        let request = request.into_inner();
        let close_at = (request.close_at_unix_us > 0)
            .then(|| std::time::UNIX_EPOCH + Duration::from_micros(request.close_at_unix_us));
        let (backup, mode, condemned, lease) = barrier_request(request)?;
        reply(
            self.participant
                .prepare(backup, mode, condemned, lease, close_at)
                .await,
            status_to_wire,
        )
    }

    async fn commit(
        &self,
        request: Request<v1::BarrierRequest>,
    ) -> Result<Response<v1::BarrierStatus>, Status> {
        let id = backup_id(&request.into_inner().backup_id)?;
        reply(self.participant.commit(id).await, status_to_wire)
    }

    async fn abort(
        &self,
        request: Request<v1::BarrierRequest>,
    ) -> Result<Response<v1::BarrierStatus>, Status> {
        let id = backup_id(&request.into_inner().backup_id)?;
        reply(self.participant.abort(id).await, status_to_wire)
    }

    async fn status(
        &self,
        request: Request<v1::BarrierRequest>,
    ) -> Result<Response<v1::BarrierStatus>, Status> {
        let id = backup_id(&request.into_inner().backup_id)?;
        reply(self.participant.status(id).await, status_to_wire)
    }

    async fn describe(
        &self,
        _request: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::AgentInfo>, Status> {
        let info = self
            .participant
            .describe()
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(v1::AgentInfo {
            shard_id: info.shard_id.to_string(),
            engine: info.engine.to_string(),
            seq: info.seq.0,
            lineage: Some(lineage_to_wire(&info.lineage)),
            gate_closed: info.gate_closed,
            active_backup_id: info
                .active_backup
                .map(|b| b.to_string())
                .unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn restore_stage(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::RestoreStatus>, Status> {
        let r = request.into_inner();
        let request = RestoreRequest {
            restore_id: restore_id(r.restore_id)?,
            backup: if r.backup_id.is_empty() {
                None
            } else {
                Some(backup_id(&r.backup_id)?)
            },
            target: (!r.target_dir.is_empty()).then(|| r.target_dir.into()),
            chain: r
                .chain
                .iter()
                .map(|id| backup_id(id))
                .collect::<Result<_, _>>()?,
            archive: if r.wal_from.is_empty() {
                None
            } else {
                Some((
                    r.wal_from.clone(),
                    legs_from_wire(&r.wal_legs).map_err(|e| to_status(&e))?,
                ))
            },
            point: lineage_from_wire(r.target_lineage.as_ref(), "the restore point's lineage")
                .map_err(|e| to_status(&e))?,
            to: seq(r.replay_to_seq)?,
            lease: match r.lease_ms {
                0 => DEFAULT_RESTORE_LEASE,
                ms => Duration::from_millis(ms).min(MAX_LEASE),
            },
            column_families: r.column_families,
        };
        reply(
            self.participant.restore_stage(request).await,
            restore_to_wire,
        )
    }

    async fn restore_status(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::RestoreStatus>, Status> {
        let id = restore_id(request.into_inner().restore_id)?;
        reply(self.participant.restore_status(id).await, restore_to_wire)
    }

    async fn restore_apply(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::RestoreStatus>, Status> {
        let id = restore_id(request.into_inner().restore_id)?;
        reply(self.participant.restore_apply(id).await, restore_to_wire)
    }

    async fn restore_commit(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::RestoreStatus>, Status> {
        let id = restore_id(request.into_inner().restore_id)?;
        reply(self.participant.restore_commit(id).await, restore_to_wire)
    }

    async fn restore_discard(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::RestoreStatus>, Status> {
        let id = restore_id(request.into_inner().restore_id)?;
        reply(self.participant.restore_discard(id).await, restore_to_wire)
    }

    async fn set_limits(
        &self,
        request: Request<v1::SetLimitsRequest>,
    ) -> Result<Response<v1::AgentLimits>, Status> {
        let limits = self
            .bandwidth
            .limits()
            .changed(&limits_change_from_wire(request.get_ref()))
            .map_err(|err| to_status(&err))?;
        self.bandwidth.set(limits);
        tracing::info!(
            upload_mib_s = limits.upload / MIB,
            download_mib_s = limits.download / MIB,
            wal_share_percent = limits.wal_share_percent,
            "rate limits changed"
        );
        Ok(Response::new(limits_to_wire(&self.shard_id, limits)))
    }

    async fn wal_status(
        &self,
        _request: Request<v1::WalStatusRequest>,
    ) -> Result<Response<v1::ShardWalStatus>, Status> {
        let info = self
            .participant
            .describe()
            .await
            .map_err(|err| to_status(&err))?;
        Ok(Response::new(v1::ShardWalStatus {
            shard_id: info.shard_id.to_string(),
            lineage: Some(lineage_to_wire(&info.lineage)),
            latest_seq: info.seq.0,
            destinations: self
                .shipper
                .status()
                .into_iter()
                .map(|status| destination_to_wire(status.as_of(info.seq, &info.lineage)))
                .collect(),
        }))
    }
}

/// Serves one shard on `listener` until `shutdown` fires: stops accepting, cancels the
/// participant (which reopens the gate), and waits for its task.
/// Everything an agent serves: its shard, repository and WAL shipping.
pub struct AgentParts<E> {
    pub slot: Arc<EngineSlot<E>>,
    pub repo: Repository,
    pub shard_id: ShardId,
    pub options: BackupOptions,
    pub shipping: ShipperOptions,
    /// The shard's write gate (the simulations watch it from outside).
    pub gate: WriteGate,
    /// Always `None` in the binaries; see [`PlantedBug`].
    pub planted_bug: Option<PlantedBug>,
    /// Keep the Prometheus gauges up to date (`--metrics-listen`).
    pub metrics: bool,
    /// The agent's rate limits: the repository's object transfers and WAL shipping draw on
    /// them; `SetLimits` changes them.
    pub bandwidth: Arc<Bandwidth>,
    /// How the server and the agent's calls to `lockstep://` archives are secured.
    pub security: Security,
}

/// How often an agent exporting metrics refreshes its gauges.
const METRICS_EVERY: Duration = Duration::from_secs(2);

/// Sets the shard's and every WAL destination's series from the participant and the shipper,
/// every [`METRICS_EVERY`], until `stop`.
async fn export_metrics(
    participant: ParticipantHandle,
    shipper: ShipperHandle,
    stop: CancellationToken,
) {
    use lockstep_process::metrics as names;
    loop {
        if let Ok(info) = participant.describe().await {
            let shard = info.shard_id.to_string();
            // No engine (a restore holds the slot): the last sequence number stands.
            if !info.engine.is_empty() {
                metrics::gauge!(names::SHARD_SEQ, "shard" => shard.clone()).set(info.seq.0 as f64);
            }
            metrics::gauge!(names::SHARD_GATE_CLOSED, "shard" => shard.clone())
                .set(f64::from(u8::from(info.gate_closed)));
            for status in shipper.status() {
                let s = status.as_of(info.seq, &info.lineage);
                let labels = [("shard", shard.clone()), ("destination", s.url.clone())];
                metrics::gauge!(names::WAL_SHIPPED_SEQ, &labels).set(s.shipped_seq.0 as f64);
                metrics::gauge!(names::WAL_LAG_SEQ, &labels).set(s.lag_seq as f64);
                metrics::gauge!(names::WAL_LAG_SECONDS, &labels).set(s.lag_ms as f64 / 1000.0);
                metrics::gauge!(names::WAL_PENDING_SEGMENTS, &labels)
                    .set(s.pending_segments as f64);
                metrics::counter!(names::WAL_SEGMENTS_SHIPPED, &labels)
                    .absolute(s.segments_shipped);
                metrics::counter!(names::WAL_BYTES_SHIPPED, &labels).absolute(s.bytes_shipped);
                let code = s.last_error.as_ref().map(|(code, _)| *code);
                metrics::gauge!(names::WAL_ERROR, &labels).set(f64::from(u8::from(code.is_some())));
                metrics::gauge!(names::WAL_GAP, &labels)
                    .set(f64::from(u8::from(code == Some(ErrorCode::BackupWalGap))));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(METRICS_EVERY) => {}
        }
    }
}

/// Runs the agent on `listener` (TCP) until `shutdown` fires.
pub async fn serve<E: ShardEngine>(
    parts: AgentParts<E>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    parts.security.reload_on_hangup(shutdown.clone());
    let incoming = lockstep_proto::tls::incoming(listener, &parts.security);
    serve_incoming(parts, incoming, shutdown).await
}

/// Runs the agent on any stream of connections (TCP, or the simulated network of the
/// simulations) until `shutdown` fires.
pub async fn serve_incoming<E, I, IO, IE>(
    parts: AgentParts<E>,
    incoming: I,
    shutdown: CancellationToken,
) -> Result<(), Error>
where
    E: ShardEngine,
    I: futures::Stream<Item = std::result::Result<IO, IE>>,
    IO: lockstep_proto::Connection,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let AgentParts {
        slot,
        repo,
        shard_id,
        options,
        shipping,
        gate,
        planted_bug,
        metrics,
        bandwidth,
        security,
    } = parts;
    let repo = repo.throttled(bandwidth.clone());
    let shipping = ShipperOptions {
        bandwidth: Some(bandwidth.clone()),
        ..shipping
    };
    let mut tasks = JoinSet::new();
    let shipper = ShipperHandle::spawn(
        slot.clone(),
        shard_id.clone(),
        shipping,
        shutdown.child_token(),
        &mut tasks,
    );
    let participant = ParticipantHandle::spawn(
        ShardParts {
            slot: slot.clone(),
            gate: gate.clone(),
            repo,
            shard_id: shard_id.clone(),
            options,
            shipper: shipper.clone(),
            planted_bug,
            security: security.clone(),
        },
        shutdown.child_token(),
        &mut tasks,
    );
    if metrics {
        let (participant, shipper, stop) =
            (participant.clone(), shipper.clone(), shutdown.child_token());
        tasks.spawn(export_metrics(participant, shipper, stop));
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ShardServer<ShardApi<E>>>()
        .await;
    health_reporter.set_serving::<AgentServer<AgentApi>>().await;
    let (reflection_v1, reflection_v1alpha) =
        lockstep_proto::reflection_services().map_err(|err| {
            Error::with_source(ErrorCode::InvalidArgument, "build gRPC reflection", err)
        })?;
    let result = lockstep_proto::server(&security)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ShardServer::new(ShardApi { slot, gate }))
        .add_service(AgentServer::new(AgentApi {
            participant,
            shipper,
            shard_id,
            bandwidth,
        }))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    result.map_err(|err| Error::with_source(ErrorCode::AgentUnavailable, "serve gRPC", err))
}
