//! Garbage collection of data objects: what the repository side of a GC pass needs.
//!
//! A pass (run by the coordinator, `coordinator/src/gc.rs`) marks the objects every shard
//! manifest names ([`Repository::referenced_objects`]), lists the stored ones
//! ([`Repository::stored_objects`]) and sorts the rest with [`plan`]: an unreferenced object
//! is first recorded as a *candidate* ([`CandidateRecord`], `gc/candidates.bin`); only a
//! later pass, at least the grace period after, deletes it, if it is still unreferenced and
//! was not written again since. Before deleting, the coordinator *condemns* the objects it is
//! about to delete ([`Condemned`]): every backup that starts from then on gets the set, and
//! a backup that needs one of them writes it again under the object's next *copy*
//! (`objects/<aa>/<sha256>.<copy>`) instead of relying on it, so a delete never races a
//! reuse.
//!
//! Architecture invariant: GC deletes an object only if no shard manifest present at the
//! pass's second mark names it, it was recorded as a candidate at least the grace period
//! before, and it was condemned before that second mark; memory is linear in the number of
//! objects at about 50 bytes each.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorCode, Result};
use crate::ids::{BackupId, ObjectId, ShardId};
use crate::manifest::ShardManifest;
use crate::repository::Repository;

/// One stored copy of an object: its content hash and which copy (0 is `<sha256>`, n is
/// `<sha256>.<n>`, written when copy n-1 was condemned).
pub type ObjectKey = (ObjectId, u32);

/// The most candidates one record holds and one pass condemns: a bound on the record's size
/// and on the filter each backup receives (`Condemned::to_wire`), about 1.5 MiB at this size.
pub const MAX_CANDIDATES: usize = 1_000_000;

/// The set of objects a sweep may delete, as a Bloom filter: a backup tests the objects it
/// would reuse against it. A false positive costs one extra upload, never a lost object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condemned {
    bits: Vec<u64>,
    hashes: u32,
    /// How many objects were added (for logs and metrics).
    count: u64,
}

const BITS_PER_OBJECT: usize = 12;
const HASHES: u32 = 8;
/// The largest filter a receiver accepts.
const MAX_FILTER_BYTES: usize = 4 << 20;

impl Condemned {
    pub fn new<'a>(keys: impl ExactSizeIterator<Item = &'a ObjectKey>) -> Condemned {
        let words = (keys.len() * BITS_PER_OBJECT).div_ceil(64).max(1);
        let mut filter = Condemned {
            bits: vec![0; words],
            hashes: HASHES,
            count: 0,
        };
        for key in keys {
            for bit in filter.positions(key) {
                filter.bits[bit / 64] |= 1 << (bit % 64);
            }
            filter.count += 1;
        }
        filter
    }

    /// Bit positions of `key`: double hashing over two words of its SHA-256, mixed with the
    /// copy number.
    fn positions(&self, (id, copy): &ObjectKey) -> impl Iterator<Item = usize> + use<> {
        let bytes = id.as_bytes();
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let h1 = word(0) ^ (u64::from(*copy)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let h2 = word(8) | 1;
        let m = (self.bits.len() * 64) as u64;
        (0..u64::from(self.hashes)).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % m) as usize)
    }

    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.positions(key)
            .all(|bit| self.bits[bit / 64] & (1 << (bit % 64)) != 0)
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The filter as sent to agents: its bits (little-endian words) and hash count.
    pub fn to_wire(&self) -> (Vec<u8>, u32, u64) {
        let bytes = self.bits.iter().flat_map(|w| w.to_le_bytes()).collect();
        (bytes, self.hashes, self.count)
    }

    pub fn from_wire(bytes: &[u8], hashes: u32, count: u64) -> Result<Condemned> {
        if bytes.is_empty()
            || !bytes.len().is_multiple_of(8)
            || bytes.len() > MAX_FILTER_BYTES
            || !(1..=32).contains(&hashes)
        {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "condemned-object filter of {} bytes and {hashes} hashes is malformed",
                    bytes.len()
                ),
            ));
        }
        let bits: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        // One built by `new` is about half full; a fuller one would condemn nearly everything.
        let set: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
        if set * 4 > bits.len() as u64 * 64 * 3 {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                "condemned-object filter is more than three quarters full",
            ));
        }
        Ok(Condemned {
            bits,
            hashes,
            count,
        })
    }
}

/// The objects shard manifests name, as a sorted list of 36-byte keys: duplicates are folded
/// away whenever the list doubles, so it holds at most about twice the distinct objects.
#[derive(Debug, Default)]
pub struct LiveSet {
    keys: Vec<ObjectKey>,
    folded: usize,
    /// Shard manifests read.
    pub manifests: u64,
}

impl LiveSet {
    pub fn insert(&mut self, key: ObjectKey) {
        self.keys.push(key);
        if self.keys.len() >= 2 * self.folded.max(1 << 16) {
            self.fold();
        }
    }

    fn fold(&mut self) {
        self.keys.sort_unstable();
        self.keys.dedup();
        self.folded = self.keys.len();
    }

    pub fn insert_manifest(&mut self, manifest: &ShardManifest) {
        self.manifests += 1;
        for file in &manifest.files {
            for chunk in &file.chunks {
                self.insert(chunk.key());
            }
        }
        for piece in &manifest.wal {
            self.insert(piece.chunk.key());
        }
    }

    /// Sorts and folds: call once every manifest is in, before `contains`.
    pub fn finish(mut self) -> LiveSet {
        self.fold();
        self
    }

    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.keys.binary_search(key).is_ok()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// One stored object as a listing shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredObject {
    pub key: ObjectKey,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
}

/// The unreferenced objects a pass found, with when each was first recorded as a candidate.
/// Stored as `gc/candidates.bin`: `LSGC`, version (u32), count (u64), then per candidate its
/// SHA-256, copy (u32) and the time it was marked (i64 ms since the epoch), then the SHA-256
/// of everything before; all little-endian.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CandidateRecord {
    pub marked: HashMap<ObjectKey, i64>,
}

const RECORD_MAGIC: &[u8; 4] = b"LSGC";
const RECORD_VERSION: u32 = 1;
const RECORD_ENTRY: usize = 32 + 4 + 8;

/// The largest candidate record a reader accepts.
pub const MAX_RECORD_BYTES: u64 = (16 + RECORD_ENTRY * MAX_CANDIDATES + 32) as u64;

impl CandidateRecord {
    /// Moves the candidates marked at `from` (this pass's new ones) to `to`.
    pub fn restamp(&mut self, from: i64, to: i64) {
        for at in self.marked.values_mut().filter(|at| **at == from) {
            *at = to;
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut entries: Vec<_> = self.marked.iter().collect();
        entries.sort_unstable();
        let mut out = Vec::with_capacity(16 + RECORD_ENTRY * entries.len() + 32);
        out.extend_from_slice(RECORD_MAGIC);
        out.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for ((id, copy), marked) in entries {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&copy.to_le_bytes());
            out.extend_from_slice(&marked.to_le_bytes());
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    pub fn decode(what: &str, bytes: &[u8]) -> Result<CandidateRecord> {
        let corrupt = |why: &str| {
            Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!("{what}: {why}; delete it and the next GC pass starts over"),
            )
        };
        if bytes.len() < 16 + 32 {
            return Err(corrupt("too short"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(corrupt("checksum mismatch"));
        }
        if &body[..4] != RECORD_MAGIC {
            return Err(corrupt("not a candidate record"));
        }
        let version = u32::from_le_bytes(body[4..8].try_into().unwrap_or_default());
        if version != RECORD_VERSION {
            return Err(corrupt(&format!("unknown version {version}")));
        }
        let count = u64::from_le_bytes(body[8..16].try_into().unwrap_or_default());
        let entries = &body[16..];
        if count > MAX_CANDIDATES as u64 || entries.len() as u64 != count * RECORD_ENTRY as u64 {
            return Err(corrupt("entry count does not match its length"));
        }
        let mut marked = HashMap::with_capacity(count as usize);
        for entry in entries.chunks_exact(RECORD_ENTRY) {
            let mut id = [0u8; 32];
            id.copy_from_slice(&entry[..32]);
            let copy = u32::from_le_bytes(entry[32..36].try_into().unwrap_or_default());
            let at = i64::from_le_bytes(entry[36..44].try_into().unwrap_or_default());
            marked.insert((ObjectId::from_digest(id), copy), at);
        }
        Ok(CandidateRecord { marked })
    }
}

/// What one pass does with the unreferenced objects it found.
#[derive(Debug, Default)]
pub struct Plan {
    /// Due for deletion: candidates for at least the grace period, not written since.
    pub due: Vec<StoredObject>,
    /// The next record: candidates not due yet (with their first marking) and new ones.
    pub record: CandidateRecord,
    /// Stored bytes of the candidates in `record`.
    pub candidate_bytes: u64,
    /// Unreferenced objects younger than the grace period (an upload may be about to name
    /// them): left alone.
    pub young: u64,
}

/// Sorts the unreferenced objects of a pass that started at `now`: objects younger than
/// `grace` are left alone; the rest are due if `previous` recorded them at least `grace`
/// ago and they were not written after that, else they are (still) candidates. At most
/// [`MAX_CANDIDATES`] are due and recorded; the oldest go first.
pub fn plan(
    mut unreferenced: Vec<StoredObject>,
    previous: &CandidateRecord,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> Plan {
    let mut out = Plan::default();
    let cutoff = now - grace;
    unreferenced.sort_by_key(|o| (o.last_modified, o.key));
    for object in unreferenced {
        if object.last_modified > cutoff {
            out.young += 1;
            continue;
        }
        let marked = previous.marked.get(&object.key).copied();
        let written_after = marked.is_some_and(|at| object.last_modified.timestamp_millis() > at);
        match marked {
            Some(at) if !written_after && at <= cutoff.timestamp_millis() => {
                if out.due.len() < MAX_CANDIDATES {
                    out.due.push(object);
                } else if out.record.marked.len() < MAX_CANDIDATES {
                    out.record.marked.insert(object.key, at);
                    out.candidate_bytes += object.size;
                }
            }
            _ if out.record.marked.len() < MAX_CANDIDATES => {
                let at = match marked {
                    Some(at) if !written_after => at,
                    _ => now.timestamp_millis(),
                };
                out.record.marked.insert(object.key, at);
                out.candidate_bytes += object.size;
            }
            _ => {}
        }
    }
    out
}

/// What the first half of a pass found: the plan, the orphaned shard manifests, and the
/// referenced objects' count and bytes.
#[derive(Debug, Default)]
pub struct Scan {
    pub plan: Plan,
    pub orphans: Vec<Path>,
    pub listed: u64,
    pub referenced: u64,
    pub referenced_bytes: u64,
}

/// The shard and backup a key under `shards/` names.
fn shard_manifest_of(repo: &Repository, key: &Path) -> Option<(ShardId, BackupId)> {
    let backup = repo.layout().backup_id_of(key)?;
    let mut parts: Vec<_> = key.parts().collect();
    parts.pop();
    let shard = ShardId::new(parts.pop()?.as_ref()).ok()?;
    Some((shard, backup))
}

/// How many shard manifests a mark reads at once.
const MARK_READS: usize = 16;

impl Repository {
    /// Every stored object (every copy), as the store lists them; keys that are not objects
    /// (a writer's staging file) are skipped.
    pub fn stored_objects(&self) -> impl Stream<Item = Result<StoredObject>> + '_ {
        self.store()
            .list(Some(&self.layout().objects_dir()))
            .map_err(|err| Error::with_source(ErrorCode::StorageUnavailable, "list objects", err))
            .try_filter_map(move |meta| async move {
                let layout = self.layout();
                // Only where `object` puts it: a stray copy elsewhere is not ours to count.
                Ok(layout
                    .object_key_of(&meta.location)
                    .filter(|(id, copy)| layout.object(id, *copy) == meta.location)
                    .map(|key| StoredObject {
                        key,
                        size: meta.size,
                        last_modified: meta.last_modified,
                    }))
            })
    }

    /// Marks every object a shard manifest names: of committed backups, of backups being
    /// taken (their pending intent is there), and of any other whose manifest is younger than
    /// `orphaned_before` (an offline backup, which records no intent, about to commit).
    /// Returns the set and the shard manifests older than that which no committed or pending
    /// backup owns (a crash between deleting a backup and its shard manifests leaves them):
    /// they mark nothing, and the sweep removes them.
    ///
    /// A shard manifest that cannot be read fails the mark: what it names is unknown.
    pub async fn referenced_objects(
        &self,
        orphaned_before: DateTime<Utc>,
    ) -> Result<(LiveSet, Vec<Path>)> {
        // Shard manifests first, then the pending intents, then the committed backups: a
        // backup writes its intent before any shard manifest and its backup manifest before
        // it removes its intent, so the shard manifest of a backup that is running or
        // committed is always owned here, whatever the grace period.
        let metas: Vec<_> = self
            .store()
            .list(Some(&self.layout().shards_dir()))
            .try_collect()
            .await
            .map_err(|err| {
                Error::with_source(ErrorCode::StorageUnavailable, "list shard manifests", err)
            })?;
        let pending = self.pending_ids().await?;
        let committed = self.backup_ids().await?;
        let owned = |backup: &BackupId| {
            committed.binary_search(backup).is_ok() || pending.binary_search(backup).is_ok()
        };
        let mut orphans = Vec::new();
        let mut to_read = Vec::new();
        for meta in metas {
            let Some((shard, backup)) = shard_manifest_of(self, &meta.location) else {
                continue;
            };
            if !owned(&backup) && meta.last_modified < orphaned_before {
                orphans.push(meta.location);
            } else {
                to_read.push((shard, backup));
            }
        }
        let mut live = LiveSet::default();
        let mut reads = futures::stream::iter(to_read)
            .map(|(shard, backup)| async move {
                match self.shard_manifest(&shard, &backup).await {
                    Ok(manifest) => Ok(Some(manifest)),
                    // Deleted since the listing (a backup removed meanwhile): it names nothing.
                    Err(err) if err.code == ErrorCode::BackupIncomplete => Ok(None),
                    Err(err) => Err(err.context(
                        "GC cannot tell what this shard manifest names; repair or delete its backup",
                    )),
                }
            })
            .buffer_unordered(MARK_READS);
        while let Some(manifest) = reads.try_next().await? {
            if let Some(manifest) = manifest {
                live.insert_manifest(&manifest);
            }
        }
        Ok((live.finish(), orphans))
    }

    /// The first half of a GC pass at `now`: marks, reads the last record (an unreadable one
    /// is dropped: starting over only delays deletions), lists every object and plans.
    pub async fn gc_scan(&self, now: DateTime<Utc>, grace: chrono::Duration) -> Result<Scan> {
        let (live, orphans) = self.referenced_objects(now - grace).await?;
        let previous = self.gc_candidates_or_none().await?;
        let mut scan = Scan {
            orphans,
            ..Default::default()
        };
        let mut unreferenced = Vec::new();
        let mut listing = std::pin::pin!(self.stored_objects());
        while let Some(object) = listing.try_next().await? {
            scan.listed += 1;
            if live.contains(&object.key) {
                scan.referenced += 1;
                scan.referenced_bytes += object.size;
            } else {
                unreferenced.push(object);
            }
        }
        drop(live);
        scan.plan = plan(unreferenced, &previous, now, grace);
        Ok(scan)
    }

    /// The candidate record of the last pass, or an empty one.
    pub async fn gc_candidates(&self) -> Result<CandidateRecord> {
        let key = self.layout().gc_candidates();
        match self
            .get_record(&key, (MAX_RECORD_BYTES, ErrorCode::BackupManifestCorrupt))
            .await?
        {
            Some(bytes) => CandidateRecord::decode(key.as_ref(), &bytes),
            None => Ok(CandidateRecord::default()),
        }
    }

    /// [`Repository::gc_candidates`], with an unreadable record taken as empty: no pass
    /// deletes from a record it cannot read, and starting over only delays deletions.
    async fn gc_candidates_or_none(&self) -> Result<CandidateRecord> {
        match self.gc_candidates().await {
            Err(err) if err.is_damaged_record() => {
                tracing::warn!(error = %err.chain(), "GC candidate record unreadable; recording candidates afresh");
                Ok(CandidateRecord::default())
            }
            other => other,
        }
    }

    /// When the last GC pass recorded its candidates (it does so last), if one did.
    pub async fn gc_last_pass(&self) -> Result<Option<DateTime<Utc>>> {
        match self.store().head(&self.layout().gc_candidates()).await {
            Ok(meta) => Ok(Some(meta.last_modified)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(Error::with_source(
                ErrorCode::StorageUnavailable,
                "look up the GC candidate record",
                err,
            )),
        }
    }

    pub async fn put_gc_candidates(&self, record: &CandidateRecord) -> Result<()> {
        let key = self.layout().gc_candidates();
        self.put_durable(&key, record.encode(), "GC candidate record")
            .await
    }

    /// This repository for a writer no coordinator tells what a sweep condemns (an offline
    /// backup): it avoids every candidate of the last pass, a superset of what the next
    /// sweep may delete. Only a writer running longer than the grace period could meet the
    /// sweep after that.
    pub async fn avoiding_gc_candidates(&self) -> Result<Repository> {
        let record = self.gc_candidates_or_none().await?;
        if record.marked.is_empty() {
            return Ok(self.clone());
        }
        let condemned = Condemned::new(record.marked.keys());
        Ok(self.avoiding(std::sync::Arc::new(condemned)))
    }

    /// Deletes objects (any that is gone already counts as deleted).
    pub async fn delete_objects(&self, keys: &[ObjectKey]) -> Result<()> {
        let paths: Vec<Path> = keys
            .iter()
            .map(|(id, copy)| self.layout().object(id, *copy))
            .collect();
        self.delete_keys(&paths).await
    }

    /// Deletes keys, a few at once (any that is gone already counts as deleted).
    pub async fn delete_keys(&self, keys: &[Path]) -> Result<()> {
        futures::stream::iter(keys.iter().cloned())
            .map(|key| async move { self.delete_if_present(&key).await })
            .buffer_unordered(MARK_READS)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32, copy: u32) -> ObjectKey {
        (ObjectId::of(&n.to_le_bytes()), copy)
    }

    #[test]
    fn condemned_filter_has_no_false_negatives_and_few_false_positives() -> Result<()> {
        let members: Vec<ObjectKey> = (0..10_000).map(|n| key(n, 0)).collect();
        let filter = Condemned::new(members.iter());
        let (bytes, hashes, count) = filter.to_wire();
        let filter = Condemned::from_wire(&bytes, hashes, count)?;
        assert!(members.iter().all(|k| filter.contains(k)));
        let false_positives = (10_000..110_000)
            .filter(|n| filter.contains(&key(*n, 0)))
            .count();
        assert!(false_positives < 1_000, "{false_positives} in 100000");
        // Another copy of a member is another object.
        let other_copies = (0..10_000).filter(|n| filter.contains(&key(*n, 1))).count();
        assert!(other_copies < 100, "{other_copies}");
        assert!(Condemned::from_wire(&[0; 7], 8, 0).is_err());
        assert!(Condemned::from_wire(&[0; 8], 0, 0).is_err());
        assert!(
            Condemned::from_wire(&[0xff; 64], 8, 1).is_err(),
            "saturated"
        );
        Ok(())
    }

    #[test]
    fn live_set_folds_duplicates_and_answers_membership() {
        let mut live = LiveSet::default();
        for round in 0..5 {
            for n in 0..100_000 {
                live.insert(key(n, round % 2));
            }
        }
        let live = live.finish();
        assert_eq!(live.len(), 200_000);
        assert!(live.contains(&key(5, 0)) && live.contains(&key(5, 1)));
        assert!(!live.contains(&key(5, 2)) && !live.contains(&key(100_000, 0)));
    }

    #[test]
    fn candidate_record_round_trips_and_refuses_damage() -> Result<()> {
        let mut record = CandidateRecord::default();
        record.marked.insert(key(1, 0), 1_000);
        record.marked.insert(key(2, 3), -5);
        let bytes = record.encode();
        assert_eq!(CandidateRecord::decode("r", &bytes)?, record);
        for at in [0, 5, 20, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert!(CandidateRecord::decode("r", &bad).is_err(), "flip at {at}");
        }
        assert!(CandidateRecord::decode("r", &bytes[..bytes.len() - 1]).is_err());
        Ok(())
    }

    #[tokio::test]
    async fn a_writer_avoiding_condemned_objects_writes_the_next_copy() -> Result<()> {
        use crate::codec::{Compression, encode};
        let repo = Repository::open("memory://gc").await?;
        let plaintext = b"an object a sweep condemned";
        let id = ObjectId::of(plaintext);
        let (copy, _) = repo
            .put_object(encode(
                plaintext,
                Compression::default(),
                &crate::seal::Seal::Plain,
            )?)
            .await?;
        assert_eq!(copy, 0);
        let writer = repo.avoiding(std::sync::Arc::new(Condemned::new([(id, 0)].iter())));
        assert_eq!(
            writer.reuse_object(&id).await?,
            (1, None),
            "copy 0 is not relied on"
        );
        let (copy, stored_len) = writer
            .put_object(encode(
                plaintext,
                Compression::default(),
                &crate::seal::Seal::Plain,
            )?)
            .await?;
        assert_eq!(copy, 1);
        // The sweep deletes copy 0; the writer's copy stays readable.
        repo.delete_objects(&[(id, 0)]).await?;
        let chunk = crate::manifest::Chunk {
            id,
            copy: 1,
            len: plaintext.len() as u64,
            stored_len,
        };
        assert_eq!(&repo.get_object(&chunk).await?[..], plaintext);
        let listed: Vec<ObjectKey> = repo
            .stored_objects()
            .map_ok(|o| o.key)
            .try_collect()
            .await?;
        assert_eq!(listed, vec![(id, 1)]);
        // An offline writer avoids every recorded candidate.
        let mut record = CandidateRecord::default();
        record.marked.insert((id, 1), 0);
        repo.put_gc_candidates(&record).await?;
        assert_eq!(repo.gc_candidates().await?, record);
        let offline = repo.avoiding_gc_candidates().await?;
        assert_eq!(offline.reuse_object(&id).await?, (0, None));
        let both = repo.avoiding(std::sync::Arc::new(Condemned::new(
            [(id, 0), (id, 1)].iter(),
        )));
        assert_eq!(both.reuse_object(&id).await?, (2, None));
        Ok(())
    }

    fn stored(n: u32, age_s: i64, now: DateTime<Utc>) -> StoredObject {
        StoredObject {
            key: key(n, 0),
            size: 100,
            last_modified: now - chrono::Duration::seconds(age_s),
        }
    }

    #[test]
    fn plan_deletes_only_candidates_older_than_the_grace_and_not_written_since() {
        let now = Utc::now();
        let grace = chrono::Duration::seconds(60);
        let ms = |age_s: i64| (now - chrono::Duration::seconds(age_s)).timestamp_millis();
        let mut previous = CandidateRecord::default();
        previous.marked.insert(key(1, 0), ms(120)); // marked long enough ago: due
        previous.marked.insert(key(2, 0), ms(30)); // marked recently: waits, keeps its time
        previous.marked.insert(key(3, 0), ms(600)); // written again after marking: new
        previous.marked.insert(key(9, 0), ms(600)); // now referenced: not listed, dropped
        let unreferenced = vec![
            stored(1, 600, now),
            stored(2, 600, now),
            stored(3, 300, now),
            stored(4, 600, now), // never seen: new candidate
            stored(5, 10, now),  // young: an upload may name it
        ];
        let plan = plan(unreferenced, &previous, now, grace);
        let due: Vec<_> = plan.due.iter().map(|o| o.key).collect();
        assert_eq!(due, vec![key(1, 0)]);
        assert_eq!(plan.young, 1);
        let mut expected = HashMap::new();
        expected.insert(key(2, 0), ms(30));
        expected.insert(key(3, 0), now.timestamp_millis());
        expected.insert(key(4, 0), now.timestamp_millis());
        assert_eq!(plan.record.marked, expected);
    }
}
