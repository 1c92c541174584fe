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
use crate::ids::{Seq, ShardId};
use crate::lineage::Lineage;
use crate::repository::{Repository, decode_wal_segment, encode_wal_segment};
use crate::seal::Seal;
use crate::wal::{Segment, SegmentInfo};

/// Where a page of a lineage's segments starts (`WalArchive::segments_after`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageStart {
    /// At the lineage's first segment.
    Beginning,
    /// After the segment of this name (the last one of the page before).
    After(String),
    /// After the archive's mark for this sequence number (`Repository::wal_mark_before`):
    /// what follows holds every write after it, unless a leftover overlaps the mark.
    AfterMarkFor(Seq),
}

/// One page of a lineage's segments, in sequence order.
#[derive(Debug, Clone, Default)]
pub struct SegmentPage {
    pub segments: Vec<SegmentInfo>,
    /// Whether more segments follow (the next page starts after the last one of this).
    pub more: bool,
    /// The segment name the page began after; `None`: the lineage's start.
    pub began_after: Option<String>,
}

/// The most segment names one page of a remote archive's listing carries (about 15 MB).
pub const MAX_PAGE: usize = 100_000;

/// A remote archive's operations, on stored (encoded) segments.
pub trait RemoteWal: Send + Sync {
    fn lineages<'a>(&'a self, shard: &'a ShardId) -> BoxFuture<'a, Result<Vec<Lineage>>>;
    /// A page of `shard`'s segments on `lineage` from `start`, those whose first write is at
    /// most `up_to` (an archive from before pages sends them all at once).
    fn segment_page<'a>(
        &'a self,
        shard: &'a ShardId,
        lineage: &'a Lineage,
        start: &'a PageStart,
        up_to: Seq,
    ) -> BoxFuture<'a, Result<SegmentPage>>;
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
            WalArchive::Remote { .. } => Ok(self
                .pages(shard, lineage, PageStart::Beginning, Seq::MAX)
                .await?
                .segments),
        }
    }

    /// The segments of `shard` on `lineage` holding writes after `after` whose first write is
    /// at most `up_to`, in sequence order: what a replay from `after` reads, as a listing of
    /// the whole lineage would give it. The listing starts at the archive's mark before
    /// `after`, so it costs what follows `after` (on an object store: what lies between the
    /// two), not the lineage's length. Where what it found does not carry every write from
    /// `after` on with no gap up to `up_to` (open-ended: up to where the archive ended before
    /// the listing), the whole lineage is listed instead: a gap, or a leftover of a retried put
    /// overlapping the mark, which a listing from the mark does not see. Continuity is the
    /// caller's to check.
    ///
    /// Open-ended, the archive's end comes from its last directories (`Repository::wal_end`)
    /// or, on a remote archive, from what its service remembers; both can miss a leftover
    /// that starts before them. Such a leftover reaching past every other segment (its shipper stopped
    /// before shipping that range again) is not seen here; a restore to a time lists the
    /// whole lineage when nothing found is later than its target.
    pub async fn segments_after(
        &self,
        shard: &ShardId,
        lineage: &Lineage,
        after: Seq,
        up_to: Seq,
    ) -> Result<Vec<SegmentInfo>> {
        // Read before the listing: what is shipped meanwhile is named after the mark anyway.
        let end = if up_to == Seq::MAX {
            self.wal_end(shard, lineage).await?
        } else {
            None
        };
        let listed = self
            .pages(shard, lineage, PageStart::AfterMarkFor(after), up_to)
            .await?;
        let mut segments = listed.segments;
        segments.retain(|s| s.last > after && s.first <= up_to);
        if listed.began_after.is_none() {
            return Ok(segments); // the whole lineage
        }
        let wanted = match end {
            _ if up_to < Seq::MAX => up_to,
            Some(end) => end.last,
            None => after,
        };
        if reaches(&segments, after, wanted) {
            return Ok(segments);
        }
        tracing::info!(shard = %shard, lineage = %lineage, after = %after, "the WAL listing from a mark does not reach the archive's end; listing the whole lineage");
        let mut segments = self.wal_segments(shard, lineage).await?;
        segments.retain(|s| s.last > after && s.first <= up_to);
        Ok(segments)
    }

    /// Every page from `start`, as one page in sequence order.
    async fn pages(
        &self,
        shard: &ShardId,
        lineage: &Lineage,
        start: PageStart,
        up_to: Seq,
    ) -> Result<SegmentPage> {
        let page = |start: PageStart| async move {
            match self {
                WalArchive::Store(repo) => {
                    repo.wal_segment_page(shard, lineage, &start, up_to, usize::MAX)
                        .await
                }
                WalArchive::Remote { remote, .. } => {
                    remote.segment_page(shard, lineage, &start, up_to).await
                }
            }
        };
        let mut listed = page(start).await?;
        let mut more = listed.more;
        while more {
            let last = listed.segments.last().map(SegmentInfo::file_name);
            let next = match &last {
                Some(last) => page(PageStart::After(last.clone())).await?,
                None => SegmentPage::default(),
            };
            // Each page must move on, or the listing would never end.
            let moved = next
                .segments
                .first()
                .is_some_and(|first| Some(first.file_name()) > last);
            if !moved {
                return Err(crate::error::Error::new(
                    crate::error::ErrorCode::BackupWalArchiveFailed,
                    format!(
                        "WAL archive {} sent a page of shard {shard} {lineage} that does not follow the one before, and said more follow",
                        self.url()
                    ),
                ));
            }
            more = next.more;
            listed.segments.extend(next.segments);
        }
        // An archive from before pages sends its listing in no order.
        listed.segments.sort_by_key(|s| (s.first, s.last));
        listed.more = false;
        Ok(listed)
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
    /// keeps the segment where a lineage ends.
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

/// Whether `segments` (in sequence order, each holding writes after `after`) carry every
/// write after `after` through `wanted`, with no gap.
fn reaches(segments: &[SegmentInfo], after: Seq, wanted: Seq) -> bool {
    if wanted <= after {
        return true;
    }
    let Ok(chain) = crate::wal::chain(segments.to_vec()) else {
        return false;
    };
    match (chain.first(), chain.last()) {
        (Some(first), Some(last)) => first.first.0 <= after.0 + 1 && last.last >= wanted,
        _ => false,
    }
}
