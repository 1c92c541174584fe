//! A WAL archive: where agents ship their segments and where restores and `verify` read them.
//!
//! An archive is either a repository on an object store (the segments under `wal/`), or a
//! remote `lockstep` archive endpoint (a coordinator in another region, reached over gRPC by
//! `lockstep-proto`, which implements `RemoteWal`). Both hold the same keys and the same
//! stored bytes, so every caller sees one API: list timelines, list segments, put and get.
//!
//! Architecture invariant: a segment read from any archive is checked against the SHA-256
//! and the range its name carries before anything uses it.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::codec;
use crate::error::Result;
use crate::ids::{ShardId, Timeline};
use crate::repository::{Repository, decode_wal_segment, encode_wal_segment};
use crate::wal::{Segment, SegmentInfo};

/// A remote archive's four operations, on stored (encoded) segments.
pub trait RemoteWal: Send + Sync {
    fn timelines<'a>(&'a self, shard: &'a ShardId) -> BoxFuture<'a, Result<Vec<Timeline>>>;
    /// The names of `shard`'s segments on `timeline` (`SegmentInfo::file_name`).
    fn segment_names<'a>(
        &'a self,
        shard: &'a ShardId,
        timeline: Timeline,
    ) -> BoxFuture<'a, Result<Vec<String>>>;
    fn put<'a>(&'a self, info: &'a SegmentInfo, stored: Vec<u8>) -> BoxFuture<'a, Result<()>>;
    fn get<'a>(&'a self, info: &'a SegmentInfo) -> BoxFuture<'a, Result<Vec<u8>>>;
}

/// Where WAL segments live.
#[derive(Clone)]
pub enum WalArchive {
    Store(Repository),
    Remote {
        url: String,
        remote: Arc<dyn RemoteWal>,
    },
}

impl std::fmt::Debug for WalArchive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WalArchive({})", self.url())
    }
}

impl WalArchive {
    pub fn url(&self) -> &str {
        match self {
            WalArchive::Store(repo) => repo.url(),
            WalArchive::Remote { url, .. } => url,
        }
    }

    /// The timelines with segments of `shard`, oldest first.
    pub async fn wal_timelines(&self, shard: &ShardId) -> Result<Vec<Timeline>> {
        match self {
            WalArchive::Store(repo) => repo.wal_timelines(shard).await,
            WalArchive::Remote { remote, .. } => {
                let mut timelines = remote.timelines(shard).await?;
                timelines.sort();
                Ok(timelines)
            }
        }
    }

    /// The segments of `shard` on `timeline`, in sequence order; continuity is the caller's
    /// to check (`wal::check_segments`).
    pub async fn wal_segments(
        &self,
        shard: &ShardId,
        timeline: Timeline,
    ) -> Result<Vec<SegmentInfo>> {
        match self {
            WalArchive::Store(repo) => repo.wal_segments(shard, timeline).await,
            WalArchive::Remote { remote, .. } => {
                let mut segments: Vec<SegmentInfo> = remote
                    .segment_names(shard, timeline)
                    .await?
                    .iter()
                    .filter_map(|name| SegmentInfo::parse(shard, timeline, name))
                    .collect();
                segments.sort_by_key(|s| (s.first, s.last));
                Ok(segments)
            }
        }
    }

    /// Downloads a segment and checks it.
    pub async fn get_wal_segment(&self, info: &SegmentInfo) -> Result<Segment> {
        match self {
            WalArchive::Store(repo) => repo.get_wal_segment(info).await,
            WalArchive::Remote { remote, .. } => {
                decode_wal_segment(info, remote.get(info).await?).await
            }
        }
    }

    /// Stores a segment; storing it again leaves the first copy.
    pub async fn put_wal_segment(
        &self,
        segment: &Segment,
        compression: codec::Compression,
    ) -> Result<SegmentInfo> {
        match self {
            WalArchive::Store(repo) => repo.put_wal_segment(segment, compression).await,
            WalArchive::Remote { remote, .. } => {
                let (info, encoded) = encode_wal_segment(segment, compression).await?;
                remote.put(&info, encoded.to_vec()).await?;
                Ok(info)
            }
        }
    }
}
