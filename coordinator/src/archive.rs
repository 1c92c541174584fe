//! The `WalArchive` service: this coordinator's repository as a WAL archive for agents in
//! other regions (`--wal-to lockstep://HOST:PORT`) and for restores (`--wal-from ...`).
//!
//! Architecture invariant: a segment is stored only after its bytes decoded against the
//! SHA-256 in its name and turned out to hold the shard, lineage and range the name says;
//! storing is create-if-absent, so a retried put is a no-op success.
//!
//! A put costs the same however long the lineage's archive is: the service remembers where
//! each lineage's archive ends (found once, at its first put or `last_only` listing since the
//! start, by reading the lineage's last directories: `Repository::wal_end`), and a put
//! either continues after that end or is the exact segment already there; anything else
//! overlaps and is refused.

use lockstep_proto::auth::Identity;
use lockstep_proto::to_status;
use lockstep_proto::v1::{self, wal_archive_server::WalArchive};
use lockstep_proto::wire::{lineage_from_wire, lineage_to_wire};
use lockstep_repository::archive::{MAX_PAGE, PageStart, SegmentPage};
use lockstep_repository::repository::decode_wal_segment;
use lockstep_repository::seal::Seal;
use lockstep_repository::wal::SegmentInfo;
use lockstep_repository::{Error, ErrorCode, Lineage, LineageId, Repository, Result, Seq, ShardId};
use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

pub struct WalArchiveApi {
    repo: Repository,
    /// One writer at a time per shard and lineage, so the overlap check and the store
    /// happen as one step (a late put and its retry cannot both pass the check).
    writers: std::sync::Mutex<HashMap<(ShardId, LineageId), Writer>>,
    /// Where each lineage's archive ends (its segment that reaches furthest), once known.
    ends: std::sync::Mutex<HashMap<(ShardId, LineageId), SegmentInfo>>,
    /// One put's segment decoded at a time: a decode holds the segment's whole plaintext (up
    /// to `MAX_SEGMENT_BYTES`), so puts at once, crafted or not, never hold more than one.
    decoding: Arc<tokio::sync::Semaphore>,
}

/// Lineages whose end is remembered at most; past it the memory starts over (each lineage
/// is listed again once).
const MAX_ENDS: usize = 4096;

/// The lock of one shard's lineage in the archive.
type Writer = Arc<tokio::sync::Mutex<()>>;

impl WalArchiveApi {
    pub fn new(repo: Repository) -> WalArchiveApi {
        WalArchiveApi {
            repo,
            writers: std::sync::Mutex::default(),
            ends: std::sync::Mutex::default(),
            decoding: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// The segment of `shard`'s `lineage` that reaches furthest: remembered, or listed once.
    /// With `checked`, a remembered end is first looked up (an operator may have removed it):
    /// a shipper resuming after an end that is gone would leave a hole.
    async fn end(
        &self,
        shard: &ShardId,
        lineage: &Lineage,
        checked: bool,
    ) -> Result<Option<SegmentInfo>> {
        let key = (shard.clone(), lineage.id);
        let remembered = self
            .ends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some(end) = remembered {
            if !checked || self.repo.has_wal_segment(&end).await? {
                return Ok(Some(end));
            }
            self.forget_end(&key);
        }
        let end = self.repo.wal_end(shard, lineage).await?;
        if let Some(end) = &end {
            self.remember_end(end);
        }
        Ok(end)
    }

    fn forget_end(&self, key: &(ShardId, LineageId)) {
        self.ends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Remembers `segment` as its lineage's end if it reaches further than the one known.
    fn remember_end(&self, segment: &SegmentInfo) {
        let mut ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
        if ends.len() >= MAX_ENDS {
            ends.clear();
        }
        let key = (segment.shard_id.clone(), segment.lineage.id);
        match ends.get(&key) {
            Some(known) if known.last >= segment.last => {}
            _ => {
                ends.insert(key, segment.clone());
            }
        }
    }

    /// The lock of `info`'s shard and lineage, held until the returned guard drops; the
    /// map forgets a lock nobody holds, so it never outgrows the puts in flight.
    async fn writer(&self, info: &SegmentInfo) -> WriterGuard<'_> {
        let key = (info.shard_id.clone(), info.lineage.id);
        let writer = {
            let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
            // A put cancelled while it waited leaves its lock behind: forget those too.
            writers.retain(|_, w| Arc::strong_count(w) > 1);
            writers.entry(key.clone()).or_default().clone()
        };
        let held = writer.clone().lock_owned().await;
        WriterGuard {
            api: self,
            key,
            writer: Some((writer, held)),
        }
    }
}

/// A held writer lock; dropping it releases the lock and, when no other put waits for it,
/// its entry.
struct WriterGuard<'a> {
    api: &'a WalArchiveApi,
    key: (ShardId, LineageId),
    writer: Option<(Writer, tokio::sync::OwnedMutexGuard<()>)>,
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        let mut writers = self.api.writers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((writer, held)) = self.writer.take() {
            drop(held);
            // Ours, the held guard's (just dropped) and the map's: nobody else has a clone,
            // and clones are taken only under this lock.
            if Arc::strong_count(&writer) == 2 {
                writers.remove(&self.key);
            }
        }
    }
}

type Reply<T> = std::result::Result<Response<T>, Status>;

fn shard_id(id: &str) -> std::result::Result<ShardId, Status> {
    ShardId::new(id).map_err(|e| to_status(&e))
}

fn lineage(wire: Option<&v1::Lineage>) -> std::result::Result<Lineage, Status> {
    lineage_from_wire(wire, "the segment's lineage").map_err(|e| to_status(&e))
}

fn segment(
    shard: &str,
    wire: Option<&v1::Lineage>,
    name: &str,
) -> std::result::Result<SegmentInfo, Status> {
    let shard = shard_id(shard)?;
    SegmentInfo::parse(&shard, &lineage(wire)?, name).ok_or_else(|| {
        to_status(&Error::new(
            ErrorCode::InvalidArgument,
            format!("{name:?} is not a WAL segment name"),
        ))
    })
}

#[tonic::async_trait]
impl WalArchive for WalArchiveApi {
    async fn list_lineages(
        &self,
        request: Request<v1::ListWalLineagesRequest>,
    ) -> Reply<v1::ListWalLineagesReply> {
        let shard = shard_id(&request.into_inner().shard_id)?;
        let lineages = self
            .repo
            .wal_lineages(&shard)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(v1::ListWalLineagesReply {
            lineages: lineages.iter().map(lineage_to_wire).collect(),
        }))
    }

    async fn list_segments(
        &self,
        request: Request<v1::ListWalSegmentsRequest>,
    ) -> Reply<v1::ListWalSegmentsReply> {
        let request = request.into_inner();
        let shard = shard_id(&request.shard_id)?;
        let lineage = lineage(request.lineage.as_ref())?;
        let page = if request.last_only {
            self.end(&shard, &lineage, true)
                .await
                .map(|end| SegmentPage {
                    segments: Vec::from_iter(end),
                    ..Default::default()
                })
        } else if request.page_size > 0 {
            let start = match (request.start_after, request.mark_for) {
                (name, _) if !name.is_empty() => PageStart::After(name),
                (_, Some(seq)) => PageStart::AfterMarkFor(Seq(seq)),
                (_, None) => PageStart::Beginning,
            };
            let up_to = if request.up_to == 0 {
                Seq::MAX
            } else {
                Seq(request.up_to)
            };
            let limit = (request.page_size as usize).min(MAX_PAGE);
            self.repo
                .wal_segment_page(&shard, &lineage, &start, up_to, limit)
                .await
        } else {
            // A client from before pages.
            self.repo
                .wal_segments(&shard, &lineage)
                .await
                .map(|segments| SegmentPage {
                    segments,
                    ..Default::default()
                })
        }
        .map_err(|e| to_status(&e))?;
        Ok(Response::new(v1::ListWalSegmentsReply {
            names: page.segments.iter().map(SegmentInfo::file_name).collect(),
            more: page.more,
            began_after: page.began_after.unwrap_or_default(),
        }))
    }

    async fn put_segment(
        &self,
        request: Request<v1::PutWalSegmentRequest>,
    ) -> Reply<v1::PutWalSegmentReply> {
        // Only a shard's own agent puts its WAL: another could make the real WAL never
        // reach the archive (a forged segment running ahead of the shard).
        let caller = lockstep_proto::tls::caller(&request).cloned();
        let request = request.into_inner();
        if let Some(caller) = caller
            && ShardId::new(request.shard_id.clone())
                .map_or(true, |shard| caller != Identity::Agent(shard))
        {
            return Err(to_status(&Error::new(
                ErrorCode::PermissionDenied,
                format!(
                    "{caller} may not put WAL segments of shard {:?}",
                    request.shard_id
                ),
            )));
        }
        let info = segment(&request.shard_id, request.lineage.as_ref(), &request.name)?;
        // Checked before it is stored: a damaged transfer is refused and shipped again. A
        // sealed segment (an encrypted repository's) is stored as it came, its frame checked:
        // the archive holds no keys, and whoever restores from it opens and checks it. An
        // encrypted archive takes no plaintext segment.
        let stored = &request.stored;
        if lockstep_repository::codec::is_sealed(stored) {
            lockstep_repository::codec::check_sealed_frame(
                stored,
                lockstep_repository::repository::MAX_SEGMENT_BYTES,
            )
            .map_err(|why| {
                to_status(&Error::new(
                    ErrorCode::BackupChecksumMismatch,
                    format!("sealed WAL segment {}: {why}", request.name),
                ))
            })?;
        } else if self.repo.seal().is_sealed() {
            return Err(to_status(&Error::new(
                ErrorCode::EncryptionKey,
                format!(
                    "this archive's repository is encrypted, and WAL segment {} is not: ship from an encrypted repository",
                    request.name
                ),
            )));
        } else {
            let decoding = self.decoding.clone().acquire_owned().await.map_err(|_| {
                to_status(&Error::new(
                    ErrorCode::StorageUnavailable,
                    "the archive is shutting down",
                ))
            })?;
            // The decode holds the permit in a task of its own: a caller that gives up (a
            // short deadline, a reset stream) does not free it while the decode runs on.
            let (checked, stored) = (info.clone(), stored.clone());
            tokio::spawn(async move {
                let _decoding = decoding;
                decode_wal_segment(&checked, stored, &Seal::Plain).await
            })
            .await
            .map_err(|err| {
                to_status(&Error::with_source(
                    ErrorCode::BackupWalArchiveFailed,
                    "the decode task failed",
                    err,
                ))
            })?
            .map_err(|e| to_status(&e))?;
        }
        // A segment overlapping one already here (a put that arrived after the agent gave up
        // on it and resumed from the listing) is refused: the archive stays free of
        // duplicates, and the agent reads the listing again.
        let _one_at_a_time = self.writer(&info).await;
        let end = self
            .end(&info.shard_id, &info.lineage, false)
            .await
            .map_err(|e| to_status(&e))?;
        if let Some(end) = end.filter(|end| info.first <= end.last) {
            let there = self
                .repo
                .has_wal_segment(&info)
                .await
                .map_err(|e| to_status(&e))?;
            if there {
                return Ok(Response::new(v1::PutWalSegmentReply {}));
            }
            // Refused on what this service remembers: the next request lists again, in case
            // the archive changed behind it.
            self.forget_end(&(info.shard_id.clone(), info.lineage.id));
            return Err(to_status(&Error::new(
                ErrorCode::BackupWalArchiveFailed,
                format!(
                    "segment {}..={} of shard {} overlaps the archive, which reaches {} ({}..={}); resume after {}",
                    info.first, info.last, info.shard_id, end.last, end.first, end.last, end.last
                ),
            )));
        }
        self.repo
            .put_wal_stored(&info, request.stored)
            .await
            .map_err(|e| to_status(&e))?;
        self.remember_end(&info);
        Ok(Response::new(v1::PutWalSegmentReply {}))
    }

    /// Retention of the cluster that ships here (the role table lets only coordinators
    /// call it): removes the named segments of one lineage, except any reaching as far as
    /// the lineage's end, found afresh (not what this service remembers: another
    /// coordinator on this repository may have taken puts past it).
    async fn delete_segments(
        &self,
        request: Request<v1::DeleteWalSegmentsRequest>,
    ) -> Reply<v1::DeleteWalSegmentsReply> {
        let request = request.into_inner();
        let doomed = request
            .names
            .iter()
            .map(|name| segment(&request.shard_id, request.lineage.as_ref(), name))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let Some(first) = doomed.first() else {
            return Ok(Response::new(v1::DeleteWalSegmentsReply::default()));
        };
        // Under the lineage's writer lock: the end cannot move while it is checked.
        let _one_at_a_time = self.writer(first).await;
        let end = self
            .repo
            .wal_end(&first.shard_id, &first.lineage)
            .await
            .map_err(|e| to_status(&e))?;
        let (kept, doomed): (Vec<SegmentInfo>, Vec<SegmentInfo>) = doomed
            .into_iter()
            .partition(|s| end.as_ref().is_some_and(|end| s.last >= end.last));
        if let Some(end) = &end {
            self.remember_end(end);
        }
        for segment in &kept {
            tracing::warn!(shard = %segment.shard_id, lineage = %segment.lineage, segment = %segment.file_name(), "retention asked to remove the segment where a lineage ends (shipping resumes after it): it is kept");
        }
        self.repo
            .delete_wal_segments(&doomed)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(v1::DeleteWalSegmentsReply {
            deleted: doomed.len() as u64,
            kept: kept.iter().map(SegmentInfo::file_name).collect(),
        }))
    }

    async fn get_segment(
        &self,
        request: Request<v1::GetWalSegmentRequest>,
    ) -> Reply<v1::GetWalSegmentReply> {
        let request = request.into_inner();
        let info = segment(&request.shard_id, request.lineage.as_ref(), &request.name)?;
        let stored = self
            .repo
            .get_wal_stored(&info)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(v1::GetWalSegmentReply { stored }))
    }
}

#[cfg(test)]
mod tests {
    use lockstep_repository::Seq;

    use super::*;

    fn info(shard: &str, lineage: Lineage) -> SegmentInfo {
        SegmentInfo {
            shard_id: ShardId::new(shard).expect("shard"),
            lineage,
            first: Seq(1),
            last: Seq(1),
            hlc_min: Default::default(),
            hlc_max: Default::default(),
            id: lockstep_repository::ObjectId::of(b"segment"),
        }
    }

    #[tokio::test]
    async fn the_writer_map_forgets_locks_nobody_holds() {
        let repo = Repository::open("memory://archive-writers")
            .await
            .expect("repo");
        let api = WalArchiveApi::new(repo);
        let entries = |api: &WalArchiveApi| api.writers.lock().map(|w| w.len()).unwrap_or(99);
        let lineage = Lineage::root();
        let first = api.writer(&info("shard-0", lineage)).await;
        let other = api.writer(&info("shard-1", lineage)).await;
        assert_eq!(entries(&api), 2);
        drop(first);
        assert_eq!(entries(&api), 1, "shard-0's lock went with its last holder");
        // A put waiting for the lock keeps it.
        let shard_1 = info("shard-1", lineage);
        let waiting = api.writer(&shard_1);
        let mut waiting = std::pin::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(other);
        assert_eq!(entries(&api), 1, "the waiting put still needs it");
        let held = waiting.await;
        drop(held);
        assert_eq!(entries(&api), 0);
    }

    /// A put request of the segment holding one batch per sequence number `first..=last`.
    async fn put_request(
        shard: &str,
        lineage: Lineage,
        first: u64,
        last: u64,
    ) -> (SegmentInfo, v1::PutWalSegmentRequest) {
        put_sealed_request(shard, lineage, first, last, &Seal::Plain).await
    }

    /// `put_request` of a segment sealed with `seal`.
    async fn put_sealed_request(
        shard: &str,
        lineage: Lineage,
        first: u64,
        last: u64,
        seal: &Seal,
    ) -> (SegmentInfo, v1::PutWalSegmentRequest) {
        let segment = lockstep_repository::wal::Segment {
            shard_id: ShardId::new(shard).expect("shard"),
            lineage,
            batches: (first..=last)
                .map(|seq| lockstep_repository::wal::WalBatch {
                    first: Seq(seq),
                    count: 1,
                    hlc: lockstep_repository::HlcTime::new(seq, 0),
                    data: seq.to_le_bytes().to_vec(),
                })
                .collect(),
        };
        let (info, encoded) = lockstep_repository::repository::encode_wal_segment(
            &segment,
            lockstep_repository::codec::Compression::default(),
            seal,
        )
        .await
        .expect("encode");
        let request = v1::PutWalSegmentRequest {
            shard_id: shard.to_string(),
            lineage: Some(lineage_to_wire(&lineage)),
            name: info.file_name(),
            stored: encoded.to_vec(),
        };
        (info, request)
    }

    /// The names `last_only` lists.
    async fn last(api: &WalArchiveApi, lineage: &Lineage) -> Vec<String> {
        let request = v1::ListWalSegmentsRequest {
            shard_id: "shard-0".into(),
            lineage: Some(lineage_to_wire(lineage)),
            last_only: true,
            ..Default::default()
        };
        api.list_segments(Request::new(request))
            .await
            .expect("list")
            .into_inner()
            .names
    }

    #[tokio::test]
    async fn sealed_segments_are_stored_without_keys_checked_by_frame_and_never_mixed() {
        let passphrase = lockstep_repository::seal::Passphrase::new("archive test").expect("p");
        let (keys, ..) = lockstep_repository::seal::create(&passphrase).expect("keys");
        let seal = Seal::sealed(keys);
        let lineage = Lineage::root();
        let keyless = Repository::open("memory://archive-keyless")
            .await
            .expect("repo");
        let api = WalArchiveApi::new(keyless.clone());
        let put = |request| api.put_segment(Request::new(request));
        let (info, request) = put_sealed_request("shard-0", lineage, 1, 10, &seal).await;
        let mut truncated = request.clone();
        truncated.stored.truncate(truncated.stored.len() - 1);
        let refused = put(truncated).await.expect_err("truncated");
        assert!(refused.message().contains("does not fit"), "{refused:?}");
        put(request)
            .await
            .expect("a sealed segment, stored without keys");
        let stored = keyless.get_wal_stored(&info).await.expect("stored");
        let opened = decode_wal_segment(&info, stored.clone(), &seal)
            .await
            .expect("opened by the key holder");
        assert_eq!(opened.batches.len(), 10);
        let locked = decode_wal_segment(&info, stored, &Seal::Plain)
            .await
            .expect_err("not without the keys");
        assert_eq!(locked.code, ErrorCode::EncryptionKey);
        // An archive whose repository is encrypted takes no plaintext segment.
        let encrypted = WalArchiveApi::new(
            Repository::open_archive("memory://archive-encrypted", &seal)
                .await
                .expect("repo"),
        );
        let (_, plain) = put_request("shard-0", lineage, 1, 10).await;
        let refused = encrypted
            .put_segment(Request::new(plain))
            .await
            .expect_err("plaintext into an encrypted archive");
        assert!(refused.message().contains("not:"), "{refused:?}");
    }

    #[tokio::test]
    async fn puts_continue_after_the_end_a_retry_is_a_no_op_and_an_overlap_is_refused() {
        let repo = Repository::open("memory://archive-ends")
            .await
            .expect("repo");
        let api = WalArchiveApi::new(repo.clone());
        let lineage = Lineage::root();
        async fn api_put(
            api: &WalArchiveApi,
            request: v1::PutWalSegmentRequest,
        ) -> std::result::Result<(), Status> {
            api.put_segment(Request::new(request)).await.map(|_| ())
        }
        let (first, request) = put_request("shard-0", lineage, 1, 10).await;
        api_put(&api, request.clone()).await.expect("1..=10");
        api_put(&api, request)
            .await
            .expect("a retry of the same segment");
        let (_, request) = put_request("shard-0", lineage, 11, 20).await;
        api_put(&api, request).await.expect("11..=20");
        let (_, overlap) = put_request("shard-0", lineage, 5, 15).await;
        let refused = api_put(&api, overlap).await.expect_err("overlap");
        assert!(
            refused.message().contains("reaches 20")
                && refused.message().contains("resume after 20"),
            "{}",
            refused.message()
        );
        assert_eq!(last(&api, &lineage).await.len(), 1);
        assert!(
            last(&api, &lineage).await[0].starts_with("00000000000000000011-00000000000000000020-")
        );
        // A fresh service (a restarted coordinator) lists the lineage once and agrees.
        let restarted = WalArchiveApi::new(repo.clone());
        assert_eq!(last(&restarted, &lineage).await, last(&api, &lineage).await);
        let (_, request) = put_request("shard-0", lineage, 21, 30).await;
        api_put(&restarted, request).await.expect("21..=30");
        let all = repo
            .wal_segments(&ShardId::new("shard-0").expect("shard"), &lineage)
            .await
            .expect("segments");
        lockstep_repository::wal::check_segments(&all).expect("no gap, no overlap");
        assert_eq!((all.len(), all[0].clone()), (3, first));
        // An end removed behind the service's back is not handed to a resuming shipper.
        repo.delete_wal_segments(&all[2..]).await.expect("delete");
        let end = last(&restarted, &lineage).await;
        assert!(
            end.len() == 1 && end[0].starts_with("00000000000000000011-00000000000000000020-"),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn segments_are_listed_in_pages_of_at_most_the_size_asked() {
        let repo = Repository::open("memory://archive-pages")
            .await
            .expect("repo");
        let api = WalArchiveApi::new(repo.clone());
        let lineage = Lineage::root();
        let mut names = Vec::new();
        for first in (1..=200).step_by(10) {
            let (info, request) = put_request("shard-0", lineage, first, first + 9).await;
            api.put_segment(Request::new(request)).await.expect("put");
            names.push(info.file_name());
        }
        let list = |page_size, start_after: &str, up_to| {
            api.list_segments(Request::new(v1::ListWalSegmentsRequest {
                shard_id: "shard-0".into(),
                lineage: Some(lineage_to_wire(&lineage)),
                page_size,
                start_after: start_after.to_string(),
                up_to,
                ..Default::default()
            }))
        };
        let (mut listed, mut after) = (Vec::new(), String::new());
        loop {
            let page = list(3, &after, 0).await.expect("list").into_inner();
            assert!(page.names.len() <= 3);
            assert_eq!(page.began_after, after);
            listed.extend(page.names);
            if !page.more {
                break;
            }
            after = listed.last().expect("a page").clone();
        }
        assert_eq!(listed, names);
        // Only those starting at or before `up_to`, here the first five.
        let page = list(100, "", 45).await.expect("list").into_inner();
        assert_eq!((page.names, page.more), (names[..5].to_vec(), false));
        // Unpaged, as a client from before pages asks: every name.
        let mut all = list(0, "", 0).await.expect("list").into_inner().names;
        all.sort();
        assert_eq!(all, names);
    }

    #[tokio::test]
    async fn retention_removes_segments_but_never_where_a_lineage_ends() {
        let repo = Repository::open("memory://archive-delete")
            .await
            .expect("repo");
        let api = WalArchiveApi::new(repo.clone());
        let (shard, lineage) = (ShardId::new("shard-0").expect("shard"), Lineage::root());
        let mut names = Vec::new();
        for first in [1, 11, 21] {
            let (info, request) = put_request("shard-0", lineage, first, first + 9).await;
            api.put_segment(Request::new(request)).await.expect("put");
            names.push(info.file_name());
        }
        let delete = |names: Vec<String>| {
            api.delete_segments(Request::new(v1::DeleteWalSegmentsRequest {
                shard_id: shard.to_string(),
                lineage: Some(lineage_to_wire(&lineage)),
                names,
            }))
        };
        // The end is kept, even when another coordinator took its put: this one remembers
        // an earlier end.
        let (later, request) = put_request("shard-0", lineage, 31, 40).await;
        repo.put_wal_stored(&later, request.stored)
            .await
            .expect("put behind the service's back");
        let deleted = delete(names.clone()).await.expect("delete").into_inner();
        assert_eq!((deleted.deleted, deleted.kept), (3, vec![]));
        let deleted = delete(vec![later.file_name()])
            .await
            .expect("delete")
            .into_inner();
        assert_eq!(
            (deleted.deleted, deleted.kept),
            (0, vec![later.file_name()])
        );
        let left = repo.wal_segments(&shard, &lineage).await.expect("list");
        assert_eq!(left, vec![later.clone()]);
        let bad = delete(vec!["not-a-segment".into()])
            .await
            .expect_err("a name");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
        // A put still continues after the end.
        let (_, request) = put_request("shard-0", lineage, 41, 50).await;
        api.put_segment(Request::new(request))
            .await
            .expect("41..=50");
    }
}
