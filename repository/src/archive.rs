//! A WAL archive: where agents ship their segments and where restores and `verify` read them.
//!
//! An archive is either a repository on an object store (the segments under `wal/`), or a
//! remote `lockstep` archive endpoint (a coordinator in another region, reached over gRPC by
//! `lockstep-proto`, which implements `RemoteWal`). Both hold the same keys and the same
//! stored bytes, so every caller sees one API: list lineages, list segments, put and get.
//!
//! Architecture invariant: a segment read from any archive is checked against the SHA-256
//! and the range its name carries before anything uses it.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::codec;
use crate::error::Result;
use crate::ids::ShardId;
use crate::lineage::Lineage;
use crate::repository::{Repository, decode_wal_segment, encode_wal_segment};
use crate::seal::Seal;
use crate::wal::{Segment, SegmentInfo};

/// A remote archive's four operations, on stored (encoded) segments.
pub trait RemoteWal: Send + Sync {
    fn lineages<'a>(&'a self, shard: &'a ShardId) -> BoxFuture<'a, Result<Vec<Lineage>>>;
    /// The names of `shard`'s segments on `lineage` (`SegmentInfo::file_name`).
    fn segment_names<'a>(
        &'a self,
        shard: &'a ShardId,
        lineage: &'a Lineage,
    ) -> BoxFuture<'a, Result<Vec<String>>>;
    /// The name of the segment of `shard` on `lineage` that reaches furthest, if any.
    fn last_segment_name<'a>(
        &'a self,
        shard: &'a ShardId,
        lineage: &'a Lineage,
    ) -> BoxFuture<'a, Result<Option<String>>>;
    fn put<'a>(&'a self, info: &'a SegmentInfo, stored: Vec<u8>) -> BoxFuture<'a, Result<()>>;
    fn get<'a>(&'a self, info: &'a SegmentInfo) -> BoxFuture<'a, Result<Vec<u8>>>;
    /// Removes the named segments of `shard` on `lineage` (retention); returns how many.
    fn delete<'a>(
        &'a self,
        shard: &'a ShardId,
        lineage: &'a Lineage,
        names: Vec<String>,
    ) -> BoxFuture<'a, Result<u64>>;
}

/// Where WAL segments live.
#[derive(Clone)]
pub enum WalArchive {
    Store(Repository),
    Remote {
        url: String,
        remote: Arc<dyn RemoteWal>,
        /// The keys of the repository this archive serves: segments are sealed by the
        /// agents, never by the remote end.
        seal: Seal,
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

    /// The lineages with segments of `shard`, by timeline.
    pub async fn wal_lineages(&self, shard: &ShardId) -> Result<Vec<Lineage>> {
        match self {
            WalArchive::Store(repo) => repo.wal_lineages(shard).await,
            WalArchive::Remote { remote, .. } => {
                let mut lineages = remote.lineages(shard).await?;
                lineages.sort_by_key(|l| (l.timeline, l.id));
                Ok(lineages)
            }
        }
    }

    /// The segments of `shard` on `lineage`, in sequence order; continuity is the caller's
    /// to check (`wal::check_segments`).
    pub async fn wal_segments(
        &self,
        shard: &ShardId,
        lineage: &Lineage,
    ) -> Result<Vec<SegmentInfo>> {
        match self {
            WalArchive::Store(repo) => repo.wal_segments(shard, lineage).await,
            WalArchive::Remote { remote, .. } => {
                let mut segments: Vec<SegmentInfo> = remote
                    .segment_names(shard, lineage)
                    .await?
                    .iter()
                    .filter_map(|name| SegmentInfo::parse(shard, lineage, name))
                    .collect();
                segments.sort_by_key(|s| (s.first, s.last));
                Ok(segments)
            }
        }
    }

    /// The segment of `shard` on `lineage` that reaches furthest (where shipping resumes),
    /// if any; a remote archive sends only that one.
    pub async fn wal_end(&self, shard: &ShardId, lineage: &Lineage) -> Result<Option<SegmentInfo>> {
        match self {
            WalArchive::Store(repo) => repo.wal_end(shard, lineage).await,
            WalArchive::Remote { url, remote, .. } => {
                match remote.last_segment_name(shard, lineage).await? {
                    None => Ok(None),
                    Some(name) => SegmentInfo::parse(shard, lineage, &name)
                        .map(Some)
                        .ok_or_else(|| {
                            crate::error::Error::new(
                                crate::error::ErrorCode::BackupWalArchiveFailed,
                                format!("WAL archive {url} named {name:?} as the end of shard {shard} {lineage}, which is not a segment name"),
                            )
                        }),
                }
            }
        }
    }

    /// Removes segments (retention); those already gone count as removed. A remote archive
    /// refuses the segment where a lineage ends.
    pub async fn delete_wal_segments(&self, segments: &[SegmentInfo]) -> Result<()> {
        match self {
            WalArchive::Store(repo) => repo.delete_wal_segments(segments).await,
            WalArchive::Remote { remote, .. } => {
                let mut by_lineage: std::collections::BTreeMap<
                    (ShardId, crate::lineage::LineageId),
                    (Lineage, Vec<String>),
                > = Default::default();
                for segment in segments {
                    by_lineage
                        .entry((segment.shard_id.clone(), segment.lineage.id))
                        .or_insert_with(|| (segment.lineage, Vec::new()))
                        .1
                        .push(segment.file_name());
                }
                for ((shard, _), (lineage, names)) in by_lineage {
                    remote.delete(&shard, &lineage, names).await?;
                }
                Ok(())
            }
        }
    }

    /// Downloads a segment and checks it.
    pub async fn get_wal_segment(&self, info: &SegmentInfo) -> Result<Segment> {
        match self {
            WalArchive::Store(repo) => repo.get_wal_segment(info).await,
            WalArchive::Remote { remote, seal, .. } => {
                decode_wal_segment(info, remote.get(info).await?, seal).await
            }
        }
    }

    /// A segment as stored (sealed in an encrypted repository's archives), unchecked: an
    /// export copies it, and its reader checks it (`decode_wal_segment`).
    pub async fn get_wal_stored(&self, info: &SegmentInfo) -> Result<Vec<u8>> {
        match self {
            WalArchive::Store(repo) => repo.get_wal_stored(info).await,
            WalArchive::Remote { remote, .. } => remote.get(info).await,
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
            WalArchive::Remote { remote, seal, .. } => {
                let (info, encoded) = encode_wal_segment(segment, compression, seal).await?;
                remote.put(&info, encoded.to_vec()).await?;
                Ok(info)
            }
        }
    }
}
