//! Prometheus metrics: every series Lockstep exports, named in one place, and the exporter
//! both binaries start with `--metrics-listen ADDR` (`GET /metrics` there).
//!
//! The coordinator exports the `lockstep_backup_*`, `lockstep_restore_*`, `lockstep_tag_*`,
//! `lockstep_barrier_*`, `lockstep_agent_up` and `lockstep_coordinator_*` series; each agent
//! exports `lockstep_shard_*` and `lockstep_wal_*`. `deploy/prometheus/` holds the alert
//! rules built on them and `deploy/grafana/` the dashboard; a test checks that both use only
//! the names in [`SERIES`]. Without an exporter (tests, simulations) recording does nothing.

use std::net::SocketAddr;

use lockstep_repository::{Error, ErrorCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

// The coordinator's series.
pub const BACKUP_LAST_STATUS: &str = "lockstep_backup_last_status";
pub const BACKUP_LAST_SUCCESS: &str = "lockstep_backup_last_success_timestamp_seconds";
pub const BACKUPS: &str = "lockstep_backups_total";
pub const BACKUP_DURATION: &str = "lockstep_backup_duration_seconds";
pub const BACKUP_BYTES: &str = "lockstep_backup_bytes_total";
pub const BARRIER_WRITE_PAUSE: &str = "lockstep_barrier_write_pause_seconds";
pub const TAGS: &str = "lockstep_tags_total";
pub const RESTORE_LAST_STATUS: &str = "lockstep_restore_last_status";
pub const RESTORES: &str = "lockstep_restores_total";
pub const RESTORE_DURATION: &str = "lockstep_restore_duration_seconds";
pub const AGENT_UP: &str = "lockstep_agent_up";
pub const COORDINATOR_EPOCH: &str = "lockstep_coordinator_epoch";
pub const COORDINATOR_FENCED: &str = "lockstep_coordinator_fenced";
pub const VERIFY_LAST_STATUS: &str = "lockstep_verify_last_status";
pub const GC_LAST_SUCCESS: &str = "lockstep_gc_last_success_timestamp_seconds";
pub const GC_RECLAIMED_BYTES: &str = "lockstep_gc_reclaimed_bytes_total";
pub const GC_DELETED_OBJECTS: &str = "lockstep_gc_deleted_objects_total";
pub const GC_CANDIDATE_BYTES: &str = "lockstep_gc_candidate_bytes";
pub const SCHEDULE_RUNS: &str = "lockstep_schedule_runs_total";
pub const SCHEDULE_SKIPPED: &str = "lockstep_schedule_skipped_total";
pub const SCHEDULE_NEXT_RUN: &str = "lockstep_schedule_next_run_timestamp_seconds";
// Each agent's series, labelled with its `shard`; the WAL ones also with `destination`.
pub const SHARD_SEQ: &str = "lockstep_shard_seq";
pub const SHARD_GATE_CLOSED: &str = "lockstep_shard_gate_closed";
pub const WAL_SHIPPED_SEQ: &str = "lockstep_wal_shipped_seq";
pub const WAL_LAG_SEQ: &str = "lockstep_wal_lag_seq";
pub const WAL_LAG_SECONDS: &str = "lockstep_wal_lag_seconds";
pub const WAL_PENDING_SEGMENTS: &str = "lockstep_wal_pending_segments";
pub const WAL_SEGMENTS_SHIPPED: &str = "lockstep_wal_segments_shipped_total";
pub const WAL_BYTES_SHIPPED: &str = "lockstep_wal_bytes_shipped_total";
pub const WAL_ERROR: &str = "lockstep_wal_error";
pub const WAL_GAP: &str = "lockstep_wal_gap";
// Both.
pub const BUILD_INFO: &str = "lockstep_build_info";

/// What a series is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every series: its name, kind and help text (exported as `# HELP`). This table is the
/// reference; README.md lists the same.
pub const SERIES: [(&str, Kind, &str); 32] = [
    (
        BACKUP_LAST_STATUS,
        Kind::Gauge,
        "1 if the last backup of this kind committed, 0 if it failed",
    ),
    (
        BACKUP_LAST_SUCCESS,
        Kind::Gauge,
        "when a backup of this kind last committed (Unix seconds)",
    ),
    (
        BACKUPS,
        Kind::Counter,
        "backups ended, by kind and outcome (committed, failed)",
    ),
    (
        BACKUP_DURATION,
        Kind::Histogram,
        "a backup from its start to its commit or failure",
    ),
    (
        BACKUP_BYTES,
        Kind::Counter,
        "bytes the committed backups' shards hold, before deduplication",
    ),
    (
        BARRIER_WRITE_PAUSE,
        Kind::Histogram,
        "the longest any shard's writes paused in one barrier (backup or tag)",
    ),
    (
        TAGS,
        Kind::Counter,
        "tags ended, by outcome (created, failed)",
    ),
    (
        RESTORE_LAST_STATUS,
        Kind::Gauge,
        "1 if the last cluster restore finished, 0 if it failed",
    ),
    (
        RESTORES,
        Kind::Counter,
        "cluster restores ended, by outcome (done, failed)",
    ),
    (
        RESTORE_DURATION,
        Kind::Histogram,
        "a cluster restore from its plan to its end",
    ),
    (
        AGENT_UP,
        Kind::Gauge,
        "1 if the shard's agent answered the coordinator's last poll (every 15 s)",
    ),
    (
        COORDINATOR_EPOCH,
        Kind::Gauge,
        "this coordinator's epoch on its repository",
    ),
    (
        COORDINATOR_FENCED,
        Kind::Gauge,
        "1 once a newer coordinator took the repository over from this one",
    ),
    (
        VERIFY_LAST_STATUS,
        Kind::Gauge,
        "1 if the last verify (on demand or after a backup) passed, 0 if it found a problem",
    ),
    (
        GC_LAST_SUCCESS,
        Kind::Gauge,
        "when a garbage-collection pass last completed (Unix seconds)",
    ),
    (
        GC_RECLAIMED_BYTES,
        Kind::Counter,
        "stored bytes of the objects garbage collection deleted",
    ),
    (
        GC_DELETED_OBJECTS,
        Kind::Counter,
        "objects garbage collection deleted",
    ),
    (
        GC_CANDIDATE_BYTES,
        Kind::Gauge,
        "stored bytes of unreferenced objects waiting out the grace period",
    ),
    (
        SCHEDULE_RUNS,
        Kind::Counter,
        "scheduled runs ended, by schedule and outcome (ok, failed)",
    ),
    (
        SCHEDULE_SKIPPED,
        Kind::Counter,
        "scheduled firings not run, by schedule and reason (overlap, busy, fenced, fired already, unrecorded, missed)",
    ),
    (
        SCHEDULE_NEXT_RUN,
        Kind::Gauge,
        "when the schedule fires next (Unix seconds)",
    ),
    (SHARD_SEQ, Kind::Gauge, "the shard's latest sequence number"),
    (
        SHARD_GATE_CLOSED,
        Kind::Gauge,
        "1 while the shard's write gate is closed (a barrier, or a restore's swap)",
    ),
    (
        WAL_SHIPPED_SEQ,
        Kind::Gauge,
        "the last sequence number durable in the WAL destination",
    ),
    (
        WAL_LAG_SEQ,
        Kind::Gauge,
        "writes not yet durable in the WAL destination",
    ),
    (
        WAL_LAG_SECONDS,
        Kind::Gauge,
        "how long the oldest write not yet durable in the WAL destination has waited",
    ),
    (
        WAL_PENDING_SEGMENTS,
        Kind::Gauge,
        "WAL segments not yet durable in the destination",
    ),
    (
        WAL_SEGMENTS_SHIPPED,
        Kind::Counter,
        "WAL segments made durable in the destination since the agent started",
    ),
    (
        WAL_BYTES_SHIPPED,
        Kind::Counter,
        "WAL bytes made durable in the destination since the agent started",
    ),
    (
        WAL_ERROR,
        Kind::Gauge,
        "1 while shipping to the WAL destination fails (see `lockstep wal status`)",
    ),
    (
        WAL_GAP,
        Kind::Gauge,
        "1 while the destination's archive has a hole the shard cannot fill (ERR_BACKUP_WAL_GAP)",
    ),
    (
        BUILD_INFO,
        Kind::Gauge,
        "always 1, labelled with the binary and its version",
    ),
];

/// Histogram buckets: write pauses are milliseconds, backups and restores seconds to hours.
const PAUSE_BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];
const DURATION_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
];

/// Serves `GET /metrics` on `address` from now on (on the current tokio runtime), with
/// `lockstep_build_info{binary,version}` set to 1.
pub fn serve(address: &str, binary: &'static str) -> Result<SocketAddr, Error> {
    let invalid = |why: String| {
        Error::new(
            ErrorCode::InvalidArgument,
            format!("--metrics-listen {address}: {why}"),
        )
    };
    let socket: SocketAddr = address
        .parse()
        .map_err(|err| invalid(format!("not an IP:port ({err})")))?;
    PrometheusBuilder::new()
        .with_http_listener(socket)
        .set_buckets_for_metric(Matcher::Full(BARRIER_WRITE_PAUSE.into()), &PAUSE_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Suffix("_duration_seconds".into()),
                &DURATION_BUCKETS,
            )
        })
        .map_err(|err| invalid(err.to_string()))?
        .install()
        .map_err(|err| invalid(err.to_string()))?;
    for (name, kind, help) in SERIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, metrics::Unit::Seconds, help),
        }
    }
    metrics::gauge!(BUILD_INFO, "binary" => binary, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    tracing::info!(%socket, "serving Prometheus metrics at /metrics");
    Ok(socket)
}
