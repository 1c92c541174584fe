//! The shard's lineage: which history its writes belong to (`lockstep_repository::lineage`).
//!
//! Stored as `LOCKSTEP-LINEAGE` (JSON) in the shard directory, written durably before the
//! shard serves a write on it, and never part of a capture. A new lineage starts:
//!
//! - when a shard is created: a root, with no parent;
//! - at every restore (cluster or offline, in place or into a directory): a child of the
//!   lineage that holds the restore point, branching at it ([`next_timeline`] numbers it);
//! - at start ([`establish`]), whenever the agent cannot prove that the shard continues what
//!   it shipped and backed up: a WAL destination, a backup or a tag holds the shard's lineage
//!   past its sequence number (a rollback of its machine, a lost WAL tail), the shard is behind
//!   its own branch point, or a source cannot be read to tell. The new lineage is a child
//!   branching at the shard's sequence number, which is a point of the old history whatever
//!   happened after it;
//! - when a shard has data but no lineage file (a wiped file, a shard made by other tools):
//!   an orphan, whose writes before its branch are never replayed from an archive.
//!
//! So the shipper never appends to a history whose archive runs past the shard, and an
//! incremental never continues a parent of another history.

use std::path::Path;
use std::time::Duration;

use lockstep_repository::archive::WalArchive;
use lockstep_repository::{Error, ErrorCode, Lineage, Repository, Result, Seq, ShardId, Timeline};

pub const LINEAGE_FILE: &str = "LOCKSTEP-LINEAGE";

/// The highest timeline of a source that knows none of the shard's histories.
const NONE_KNOWN: Timeline = Timeline(0);

/// How long the start-up check waits for each WAL destination and the repository.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The lineage recorded in the shard directory `dir`, if any.
pub fn read_lineage(dir: &Path) -> Result<Option<Lineage>> {
    let path = dir.join(LINEAGE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(Error::io(
                ErrorCode::ShardEngineFailed,
                format!("read {}", path.display()),
                err,
            ));
        }
    };
    let lineage: Lineage = serde_json::from_slice(&bytes).map_err(|err| {
        Error::with_source(
            ErrorCode::ShardEngineFailed,
            format!(
                "{} is malformed; move it aside to start the shard on a new lineage",
                path.display()
            ),
            err,
        )
    })?;
    lineage.check()?;
    Ok(Some(lineage))
}

/// Records the lineage of the shard in `dir`, durably (written beside, synced, renamed).
pub fn write_lineage(dir: &Path, lineage: &Lineage) -> Result<()> {
    let path = dir.join(LINEAGE_FILE);
    let temporary = dir.join(format!(".{LINEAGE_FILE}.tmp"));
    let io = |err| {
        Error::io(
            ErrorCode::BackupRestorationFailed,
            format!("write {}", path.display()),
            err,
        )
    };
    let json = serde_json::to_vec_pretty(lineage).map_err(|err| {
        Error::with_source(
            ErrorCode::BackupRestorationFailed,
            "encode the lineage",
            err,
        )
    })?;
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::File::create(&temporary).map_err(io)?;
    std::io::Write::write_all(&mut &file, &json).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, &path).map_err(io)?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Where the shard's history was shipped and backed up: what [`establish`] and
/// [`next_timeline`] read.
#[derive(Clone)]
pub struct HistorySources {
    pub shard: ShardId,
    pub destinations: Vec<WalArchive>,
    pub repo: Option<Repository>,
}

/// What one source holds of `lineage`: the last sequence number on it, and the highest
/// timeline it knows of for the shard.
async fn holds(
    source: Source<'_>,
    shard: &ShardId,
    lineage: Option<&Lineage>,
) -> Result<(Option<Seq>, Timeline)> {
    match source {
        Source::Archive(archive) => {
            let lineages = archive.wal_lineages(shard).await?;
            let top = lineages
                .iter()
                .map(|l| l.timeline)
                .max()
                .unwrap_or(NONE_KNOWN);
            let end = match lineage {
                Some(lineage) if lineages.iter().any(|l| l.id == lineage.id) => {
                    archive.wal_end(shard, lineage).await?.map(|s| s.last)
                }
                _ => None,
            };
            Ok((end, top))
        }
        Source::Repository(repo) => {
            // Backups and tags: a tag taken past the shard on its history counts as much as
            // a backup (restoring the tag would replay the shard's new writes).
            let points = repo.shard_points(shard).await?;
            let top = points
                .iter()
                .map(|(l, _)| l.timeline)
                .max()
                .unwrap_or(NONE_KNOWN);
            let end = points
                .iter()
                .filter(|(l, _)| lineage.is_some_and(|lineage| lineage.id == l.id))
                .map(|(_, seq)| *seq)
                .max();
            Ok((end, top))
        }
    }
}

#[derive(Clone, Copy)]
enum Source<'a> {
    Archive(&'a WalArchive),
    Repository(&'a Repository),
}

impl Source<'_> {
    fn url(&self) -> &str {
        match self {
            Source::Archive(archive) => archive.url(),
            Source::Repository(repo) => repo.url(),
        }
    }
}

/// Asks every source what it holds, each within [`CHECK_TIMEOUT`]: the highest end of
/// `lineage` found and where, the highest timeline, and the sources that could not be read.
async fn survey(
    sources: &HistorySources,
    lineage: Option<&Lineage>,
) -> (Option<(Seq, String)>, Timeline, Vec<String>) {
    let mut all: Vec<Source<'_>> = sources.destinations.iter().map(Source::Archive).collect();
    all.extend(sources.repo.as_ref().map(Source::Repository));
    let answers = futures::future::join_all(all.iter().map(|source| async move {
        let answer = tokio::time::timeout(CHECK_TIMEOUT, holds(*source, &sources.shard, lineage))
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorCode::StorageUnavailable,
                    format!("no answer in {} s", CHECK_TIMEOUT.as_secs()),
                ))
            });
        (source.url().to_string(), answer)
    }))
    .await;
    let (mut end, mut top, mut unreadable) = (None::<(Seq, String)>, NONE_KNOWN, Vec::new());
    for (url, answer) in answers {
        match answer {
            Ok((held, highest)) => {
                top = top.max(highest);
                if let Some(held) = held
                    && end.as_ref().is_none_or(|(seq, _)| held > *seq)
                {
                    end = Some((held, url));
                }
            }
            Err(err) => {
                tracing::warn!(shard = %sources.shard, source = %url, error = %err.chain(), "could not read the shard's history");
                unreadable.push(format!("{url} ({})", err.code));
            }
        }
    }
    (end, top, unreadable)
}

/// The timeline a new lineage of the shard gets: one above its current one and every one its
/// WAL destinations and backups know. Fails closed when one of them cannot be read, so two
/// histories of a shard never share a number people would read as the same.
pub async fn next_timeline(current: Timeline, sources: &HistorySources) -> Result<Timeline> {
    let (_, top, unreadable) = survey(sources, None).await;
    if !unreadable.is_empty() {
        return Err(Error::new(
            ErrorCode::StorageUnavailable,
            format!(
                "cannot number the new history of shard {}: {} cannot be read; retry when it is reachable",
                sources.shard,
                unreadable.join(", ")
            ),
        ));
    }
    Ok(Timeline(current.0.max(top.0) + 1))
}

/// The lineage a starting shard serves writes on, recorded before it serves any (see the
/// module documentation). `seq` is the shard's latest sequence number at open.
pub async fn establish(dir: &Path, seq: Seq, sources: &HistorySources) -> Result<Lineage> {
    let recorded = read_lineage(dir)?;
    let (end, top, unreadable) = survey(sources, recorded.as_ref()).await;
    let timeline = Timeline(top.0.max(recorded.map_or(0, |l| l.timeline.0)) + 1);
    let lineage = match recorded {
        None if seq == Seq(0) => {
            // Numbered above what the sources know of the shard (a wiped directory).
            let root = Lineage {
                timeline,
                ..Lineage::root()
            };
            tracing::info!(shard = %sources.shard, lineage = %root, "a new shard: its history starts");
            root
        }
        None => {
            let orphan = Lineage::orphan(seq, timeline);
            tracing::warn!(
                shard = %sources.shard, seq = %seq, lineage = %orphan,
                "the shard has data but no lineage file: its writes up to here cannot be told \
                 from another history's, so it continues on a new lineage; take a full backup"
            );
            orphan
        }
        Some(lineage) => {
            if seq < lineage.branch {
                let child = lineage.child(seq, timeline);
                tracing::warn!(
                    shard = %sources.shard, seq = %seq, branch = %lineage.branch,
                    from = %lineage, to = %child,
                    "the shard is behind the point its history branched at (a lost WAL tail): \
                     it continues on a new lineage"
                );
                child
            } else if let Some((end, url)) = end.filter(|(end, _)| *end > seq) {
                let child = lineage.child(seq, timeline);
                tracing::warn!(
                    shard = %sources.shard, seq = %seq, archive_end = %end, source = %url,
                    from = %lineage, to = %child,
                    "history fork: {url} holds this shard's history up to {end}, past the \
                     shard's {seq} (a rollback, or a lost WAL tail); the shard continues on a \
                     new lineage and nothing is appended to the old one"
                );
                child
            } else if !unreadable.is_empty() {
                let child = lineage.child(seq, timeline);
                tracing::warn!(
                    shard = %sources.shard, seq = %seq, from = %lineage, to = %child,
                    "cannot tell whether the shard continues its history ({} cannot be read): \
                     it continues on a new lineage, so nothing is appended to a history that \
                     may have moved on",
                    unreadable.join(", ")
                );
                child
            } else {
                return Ok(lineage);
            }
        }
    };
    write_lineage(dir, &lineage)?;
    Ok(lineage)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt;
    use futures::future::BoxFuture;
    use lockstep_repository::archive::{PageStart, RemoteWal, SegmentPage};
    use lockstep_repository::codec::Compression;
    use lockstep_repository::transfer::{Progress, TransferOptions};
    use lockstep_repository::wal::{Segment, SegmentInfo, WalBatch};
    use lockstep_repository::{HlcTime, ShardId};

    use super::*;
    use crate::backup::{BackupOptions, backup_offline};
    use crate::engine::{DEFAULT_CF, MemEngine, ShardEngine, WriteBatch};

    fn shard() -> ShardId {
        ShardId::new("shard-0").expect("shard id")
    }

    async fn repository() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().join("repo").display());
        let repo = Repository::open(&url).await.expect("repository");
        (dir, repo)
    }

    fn sources(destinations: Vec<WalArchive>, repo: Option<Repository>) -> HistorySources {
        HistorySources {
            shard: shard(),
            destinations,
            repo,
        }
    }

    /// Ships batches `first..=last` of `lineage` to `archive`, one batch per sequence number.
    async fn ship(archive: &WalArchive, lineage: &Lineage, first: u64, last: u64) {
        let batches = (first..=last)
            .map(|seq| WalBatch {
                first: Seq(seq),
                count: 1,
                hlc: HlcTime(seq),
                data: vec![seq as u8],
            })
            .collect();
        let segment = Segment {
            shard_id: shard(),
            lineage: *lineage,
            batches,
        };
        archive
            .put_wal_segment(&segment, Compression::default())
            .await
            .expect("ship");
    }

    /// An archive that never answers with anything but an error: a destination down.
    struct Unreachable;

    /// What every call of `Unreachable` answers.
    fn refused<'a, T: Send + 'a>() -> BoxFuture<'a, Result<T>> {
        async {
            Err(Error::new(
                ErrorCode::StorageUnavailable,
                "connection refused",
            ))
        }
        .boxed()
    }

    impl RemoteWal for Unreachable {
        fn lineages<'a>(&'a self, _: &'a ShardId) -> BoxFuture<'a, Result<Vec<Lineage>>> {
            refused()
        }
        fn segment_page<'a>(
            &'a self,
            _: &'a ShardId,
            _: &'a Lineage,
            _: &'a PageStart,
            _: Seq,
        ) -> BoxFuture<'a, Result<SegmentPage>> {
            refused()
        }
        fn last_segment_name<'a>(
            &'a self,
            _: &'a ShardId,
            _: &'a Lineage,
        ) -> BoxFuture<'a, Result<Option<String>>> {
            refused()
        }
        fn put<'a>(&'a self, _: &'a SegmentInfo, _: Vec<u8>) -> BoxFuture<'a, Result<()>> {
            refused()
        }
        fn get<'a>(&'a self, _: &'a SegmentInfo) -> BoxFuture<'a, Result<Vec<u8>>> {
            refused()
        }
        fn delete<'a>(
            &'a self,
            _: &'a ShardId,
            _: &'a Lineage,
            _: Vec<String>,
        ) -> BoxFuture<'a, Result<u64>> {
            refused()
        }
    }

    fn unreachable() -> WalArchive {
        WalArchive::Remote {
            url: "lockstep://127.0.0.1:9".into(),
            remote: Arc::new(Unreachable),
            seal: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_new_shard_starts_a_root_and_a_shard_without_a_file_an_orphan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = establish(dir.path(), Seq(0), &sources(vec![], None))
            .await
            .expect("establish");
        assert_eq!((root.parent, root.timeline), (None, Timeline(1)));
        assert_eq!(read_lineage(dir.path()).ok(), Some(Some(root)));
        // Started again with nothing shipped: the same history goes on.
        let again = establish(dir.path(), Seq(40), &sources(vec![], None))
            .await
            .expect("establish");
        assert_eq!(again, root);

        let other = tempfile::tempdir().expect("tempdir");
        let orphan = establish(other.path(), Seq(40), &sources(vec![], None))
            .await
            .expect("establish");
        assert_eq!((orphan.parent, orphan.branch), (None, Seq(40)));
        assert_ne!(orphan.id, root.id);
    }

    #[tokio::test]
    async fn an_archive_past_the_shard_starts_a_child_and_one_at_it_keeps_the_history() {
        let (_keep, repo) = repository().await;
        let archive = WalArchive::Store(repo);
        let dir = tempfile::tempdir().expect("tempdir");
        let lineage = Lineage::root();
        write_lineage(dir.path(), &lineage).expect("write");
        ship(&archive, &lineage, 1, 50).await;

        // The archive ends where the shard does: it continues its history.
        let kept = establish(dir.path(), Seq(50), &sources(vec![archive.clone()], None))
            .await
            .expect("establish");
        assert_eq!(kept, lineage);

        // The machine was rolled back to 20: the history forks there.
        let child = establish(dir.path(), Seq(20), &sources(vec![archive.clone()], None))
            .await
            .expect("establish");
        assert_eq!(child.parent, Some(lineage.id));
        assert_eq!(child.branch, Seq(20));
        assert!(child.timeline > lineage.timeline);
        assert_eq!(read_lineage(dir.path()).ok(), Some(Some(child)));
    }

    #[tokio::test]
    async fn an_unreadable_destination_starts_a_child_and_numbering_fails_closed() {
        let (_keep, repo) = repository().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let lineage = Lineage::root();
        write_lineage(dir.path(), &lineage).expect("write");
        let sources = sources(vec![WalArchive::Store(repo), unreachable()], None);
        let child = establish(dir.path(), Seq(7), &sources)
            .await
            .expect("establish");
        assert_eq!((child.parent, child.branch), (Some(lineage.id), Seq(7)));

        let err = next_timeline(child.timeline, &sources)
            .await
            .expect_err("numbering with a destination down");
        assert_eq!(err.code, ErrorCode::StorageUnavailable);
        assert!(err.message.contains("lockstep://127.0.0.1:9"), "{err}");
    }

    #[tokio::test]
    async fn a_tag_past_the_shard_or_a_shard_behind_its_branch_starts_a_child() {
        use lockstep_repository::TagName;
        use lockstep_repository::manifest::{
            MANIFEST_FORMAT_VERSION, ShardPoint, TOOL_VERSION, TagManifest,
        };
        let (_keep, repo) = repository().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let lineage = Lineage::root().child(Seq(100), Timeline(2));
        write_lineage(dir.path(), &lineage).expect("write");
        // The shard was tagged at 3,100; a lost WAL tail takes it back to 3,000.
        let tag = TagManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            name: TagName::new("before-migration").expect("tag name"),
            created_at: chrono::Utc::now(),
            points: [(
                shard(),
                ShardPoint {
                    seq: Seq(3_100),
                    lineage,
                    hlc: HlcTime::default(),
                },
            )]
            .into_iter()
            .collect(),
            max_gate_closed_us: 0,
            automatic: false,
            labels: Default::default(),
            tool_version: TOOL_VERSION.into(),
        };
        repo.put_tag(&tag).await.expect("tag");
        let child = establish(dir.path(), Seq(3_000), &sources(vec![], Some(repo)))
            .await
            .expect("establish");
        assert_eq!((child.parent, child.branch), (Some(lineage.id), Seq(3_000)));

        // Behind its own branch point (restored at 100, then lost everything back to 40).
        let other = tempfile::tempdir().expect("tempdir");
        write_lineage(other.path(), &lineage).expect("write");
        let behind = establish(other.path(), Seq(40), &sources(vec![], None))
            .await
            .expect("establish");
        assert_eq!((behind.parent, behind.branch), (Some(lineage.id), Seq(40)));
    }

    #[tokio::test]
    async fn a_backup_past_the_shard_starts_a_child_numbered_above_it() {
        let (keep, repo) = repository().await;
        let dir = keep.path().join("shard");
        let engine = Arc::new(MemEngine::open(&dir, &[]).expect("open"));
        for key in 0..30u32 {
            let mut batch = WriteBatch::new();
            batch.put(DEFAULT_CF, key.to_be_bytes(), b"v".to_vec());
            engine.write(&batch).expect("write");
        }
        let lineage = Lineage::root().child(Seq(0), Timeline(4));
        write_lineage(&dir, &lineage).expect("write");
        let options = BackupOptions {
            capture_root: keep.path().join("captures"),
            transfer: TransferOptions::default(),
            min_free_bytes: 0,
        };
        backup_offline(
            &engine,
            &repo,
            &shard(),
            &options,
            lineage,
            &Progress::default(),
        )
        .await
        .expect("backup");

        // The shard comes back at 10, behind the backup taken at 30.
        let child = establish(&dir, Seq(10), &sources(vec![], Some(repo.clone())))
            .await
            .expect("establish");
        assert_eq!((child.parent, child.branch), (Some(lineage.id), Seq(10)));
        assert_eq!(child.timeline, Timeline(5));
        assert_eq!(
            next_timeline(child.timeline, &sources(vec![], Some(repo)))
                .await
                .expect("number"),
            Timeline(6)
        );
    }

    #[test]
    fn a_lineage_file_round_trips_and_refuses_junk() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_lineage(dir.path()).ok(), Some(None));
        let lineage = Lineage::root().child(Seq(99), Timeline(3));
        write_lineage(dir.path(), &lineage).expect("write");
        assert_eq!(read_lineage(dir.path()).ok(), Some(Some(lineage)));
        std::fs::write(dir.path().join(LINEAGE_FILE), "x").expect("write junk");
        assert!(read_lineage(dir.path()).is_err());
    }
}
