//! The catalog index: every committed backup manifest, kept in the repository, so listing,
//! planning, parent choice and commit read what changed since they last looked instead of
//! listing and reading the whole of `backups/`.
//!
//! ```text
//! catalog/log/<n:020>.json       entry n, written create-only: manifests added (a commit, an
//!                                import, a repair) or backup ids removed (a delete, a repair)
//! catalog/snapshot/<n:020>.json  every indexed manifest after entry n: snapshot 0 (empty)
//!                                when the index is created, then one by the writer of every
//!                                SNAPSHOT_EVERY-th entry
//! ```
//!
//! The manifests under `backups/` stay the truth: a backup is committed when its manifest
//! exists, and GC marks from the listings, never from the index. The index follows them. A
//! commit writes the manifest, then appends its entry; a delete removes the manifest, then
//! appends. A crash between the two leaves the index behind in one of two ways: a committed
//! backup not yet indexed (like a commit not yet acknowledged), or an indexed backup whose
//! manifest is gone (a restore of it fails closed on the missing manifests). Each handle's
//! first look reconciles the index with a listing of `backups/` and appends the repair.
//!
//! After that, a look lists `catalog/log/` after the position it knows and reads the entries
//! it finds. Pruning keeps the log under `2 x SNAPSHOT_EVERY` keys (the entries after the
//! second newest snapshot), so a look costs the same at 10 or 100,000 backups.
//!
//! Two writers appending at once both try entry n + 1; the create-only put lets one win, and
//! the other catches up and tries the next. On a store without create-only puts
//! (`put_once` falls back to look-then-put) two racing entries could overwrite each other;
//! the next handle's reconciliation repairs what that loses.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode, Result};
use crate::ids::BackupId;
use crate::manifest::BackupManifest;
use crate::repository::{CATALOG_READS, Repository};

/// A snapshot is written after every this many entries; the log holds at most twice as many.
const SNAPSHOT_EVERY: u64 = 64;
/// The most manifests one entry adds (a repair of a large catalog takes several).
const MANIFESTS_PER_ENTRY: usize = 1000;
/// The JSON an entry of several manifests holds at most (a repair of a large catalog).
const ENTRY_TARGET_BYTES: usize = 64 << 20;
/// The largest entry a reader accepts: one manifest of the largest size a reader accepts,
/// with room to spare.
const MAX_ENTRY_BYTES: u64 = 2 * crate::repository::MAX_MANIFEST_BYTES;
/// The largest snapshot a reader accepts: about a million backups of a few shards.
const MAX_SNAPSHOT_BYTES: u64 = 2 << 30;
/// How many times an append tries the next position before it gives up.
const APPEND_ATTEMPTS: usize = 64;
const FORMAT_VERSION: u32 = 1;

/// One entry of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Entry {
    Added(Vec<BackupManifest>),
    Removed(Vec<BackupId>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    format_version: u32,
    position: u64,
    backups: Vec<BackupManifest>,
}

#[derive(Serialize)]
struct SnapshotRef<'a> {
    format_version: u32,
    position: u64,
    backups: Vec<&'a BackupManifest>,
}

/// The catalog as a handle last read it: the indexed backup manifests in commit order, and
/// the backups whose manifest could not be read when it reconciled.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// The last log entry applied.
    position: u64,
    by_id: HashMap<BackupId, Arc<BackupManifest>>,
    /// `by_id`'s manifests, oldest first in commit order (then start time and id, for
    /// manifests from before the order was recorded).
    ordered: Vec<Arc<BackupManifest>>,
    /// Listed under `backups/` but unreadable (corrupt), with why: shown, never planned from.
    damaged: Vec<Damaged>,
    /// A snapshot or entry was damaged: what this holds must be reconciled with `backups/`.
    stale: bool,
}

impl Catalog {
    /// Every indexed backup, oldest first in commit order.
    pub fn backups(&self) -> &[Arc<BackupManifest>] {
        &self.ordered
    }

    pub fn get(&self, backup: &BackupId) -> Option<&Arc<BackupManifest>> {
        self.by_id.get(backup)
    }

    /// The last backup committed.
    pub fn latest(&self) -> Option<&Arc<BackupManifest>> {
        self.ordered.last()
    }

    /// Backups whose manifest is listed but could not be read, with why.
    pub fn damaged(&self) -> &[Damaged] {
        &self.damaged
    }

    /// The highest commit order recorded (0 for an empty catalog).
    pub fn last_commit_seq(&self) -> u64 {
        self.ordered.iter().map(|m| m.commit_seq).max().unwrap_or(0)
    }

    fn empty_at(position: u64) -> Catalog {
        Catalog {
            position,
            stale: true,
            ..Catalog::default()
        }
    }

    fn from_snapshot(snapshot: Snapshot) -> Catalog {
        let mut catalog = Catalog {
            position: snapshot.position,
            ..Catalog::default()
        };
        for manifest in snapshot.backups {
            catalog
                .by_id
                .insert(manifest.backup_id.clone(), Arc::new(manifest));
        }
        catalog.reorder();
        catalog
    }

    /// Applies `entry` without recording a position (an entry this handle could not write).
    fn apply_entry(&mut self, entry: &Entry) {
        match entry {
            Entry::Added(manifests) => {
                for manifest in manifests {
                    self.damaged.retain(|d| d.backup_id != manifest.backup_id);
                    self.by_id
                        .insert(manifest.backup_id.clone(), Arc::new(manifest.clone()));
                }
            }
            Entry::Removed(ids) => {
                for id in ids {
                    self.by_id.remove(id);
                    self.damaged.retain(|d| &d.backup_id != id);
                }
            }
        }
    }

    fn reorder(&mut self) {
        self.ordered = self.by_id.values().cloned().collect();
        self.ordered.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
    }
}

fn order_key(m: &BackupManifest) -> (u64, chrono::DateTime<chrono::Utc>, &BackupId) {
    (m.commit_seq, m.started_at, &m.backup_id)
}

/// A backup listed under `backups/` whose manifest does not read.
#[derive(Debug, Clone)]
pub struct Damaged {
    pub backup_id: BackupId,
    pub code: ErrorCode,
    pub why: String,
}

/// A handle's view of the index, shared by its clones.
#[derive(Debug, Default)]
pub(crate) struct CatalogShared {
    state: tokio::sync::Mutex<CatalogState>,
    /// Set, outside the lock, when what the handle holds may lag `backups/`: a write whose
    /// outcome is unknown, or a recording its caller dropped midway (set by the recording's
    /// guard unless it finished). The next look reconciles.
    suspect: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct CatalogState {
    current: Option<Arc<Catalog>>,
    /// Whether this handle has reconciled the index with `backups/` (its first look, and
    /// again after it could not record a change).
    reconciled: bool,
}

pub(crate) type SharedCatalog = Arc<CatalogShared>;

/// Marks the catalog suspect when dropped before `done`: a recording cancelled midway.
struct Recording<'a>(&'a CatalogShared);

impl Recording<'_> {
    fn done(self) {
        std::mem::forget(self);
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        self.0
            .suspect
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How many times a look reconciles while the index keeps turning out damaged.
const RECONCILE_ATTEMPTS: usize = 3;

fn damaged_entry(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::BackupManifestCorrupt, format!("{what}: {why}"))
}

impl Repository {
    /// The catalog, up to date: reconciled with `backups/` at this handle's first look,
    /// afterwards the entries appended since its last.
    pub async fn catalog(&self) -> Result<Arc<Catalog>> {
        let mut state = self.catalog_state().state.lock().await;
        self.up_to_date(&mut state).await
    }

    /// The catalog reconciled with `backups/` now, whatever this handle saw before: for a
    /// decision that removes something (retention, a delete, leftovers), so a backup another
    /// writer committed without recording it cannot go unseen.
    pub async fn reconciled_catalog(&self) -> Result<Arc<Catalog>> {
        let mut state = self.catalog_state().state.lock().await;
        state.reconciled = false;
        self.up_to_date(&mut state).await
    }

    /// What this handle holds may lag `backups/` (a write whose outcome is unknown): its next
    /// look reconciles.
    pub(crate) fn suspect_catalog(&self) {
        self.catalog_state()
            .suspect
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Records a committed backup in the index; call after its manifest is published. A
    /// failure is logged, not returned: the backup is committed, and this handle reconciles
    /// at its next look.
    pub(crate) async fn index_added(&self, manifest: &BackupManifest) {
        self.record(Entry::Added(vec![manifest.clone()])).await
    }

    /// Records a deleted backup in the index; call after its manifest is removed.
    pub(crate) async fn index_removed(&self, backup: &BackupId) {
        self.record(Entry::Removed(vec![backup.clone()])).await
    }

    async fn record(&self, entry: Entry) {
        let shared = self.catalog_state();
        let recording = Recording(shared);
        let mut state = shared.state.lock().await;
        let recorded = match self.up_to_date(&mut state).await {
            Ok(current) => {
                let mut catalog = Catalog::clone(&current);
                let appended = self.append(&mut catalog, &entry).await;
                state.current = Some(Arc::new(catalog));
                appended
            }
            Err(err) => Err(err),
        };
        recording.done();
        if let Err(err) = recorded {
            tracing::warn!(error = %err.chain(), "could not record a change in the catalog index; the next look reconciles it with backups/");
            state.reconciled = false;
        }
    }

    async fn up_to_date(&self, state: &mut CatalogState) -> Result<Arc<Catalog>> {
        if self
            .catalog_state()
            .suspect
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            state.reconciled = false;
        }
        let mut catalog = match &state.current {
            Some(current) if state.reconciled && !current.stale => {
                if self.positions_after(current.position).await?.is_empty() {
                    return Ok(current.clone());
                }
                Catalog::clone(current)
            }
            Some(current) => Catalog::clone(current),
            None => self.load_catalog().await?,
        };
        self.catch_up(&mut catalog).await?;
        let mut attempts = 0;
        while !state.reconciled || catalog.stale {
            if attempts == RECONCILE_ATTEMPTS {
                // Never planned or committed from: a stale catalog may lack backups.
                return Err(Error::new(
                    ErrorCode::BackupManifestCorrupt,
                    "the catalog index keeps turning out damaged while it is repaired; check the repository's catalog/ (removing it makes the next look rebuild it from backups/)",
                ));
            }
            attempts += 1;
            self.reconcile(&mut catalog).await?;
            state.reconciled = true;
        }
        let catalog = Arc::new(catalog);
        state.current = Some(catalog.clone());
        Ok(catalog)
    }

    /// The newest snapshot, or an empty index at 0 (created here) when there is none.
    async fn load_catalog(&self) -> Result<Catalog> {
        let layout = self.layout().clone();
        for _ in 0..3 {
            let snapshots = self
                .keys_under(
                    &layout.catalog_snapshots_dir(),
                    "catalog snapshots",
                    |key| layout.catalog_position_of(key),
                )
                .await?;
            let Some(&newest) = snapshots.last() else {
                // A new repository, or one from before the index: start it empty; the
                // reconciliation indexes what `backups/` holds.
                if let Err(err) = self.put_snapshot(&Catalog::default()).await {
                    tracing::warn!(error = %err.chain(), "could not create the catalog index; reading backups/ instead");
                }
                return Ok(Catalog::empty_at(0));
            };
            let key = layout.catalog_snapshot(newest);
            let what = format!("catalog snapshot {key}");
            let parsed = match self
                .get_record(&key, (MAX_SNAPSHOT_BYTES, ErrorCode::BackupManifestCorrupt))
                .await
            {
                Ok(None) => continue, // pruned since the listing
                Ok(Some(bytes)) => serde_json::from_slice::<Snapshot>(&bytes)
                    .map_err(|err| damaged_entry(&what, err))
                    .and_then(|snapshot| check_snapshot(&what, newest, snapshot)),
                Err(err) if err.is_damaged_record() => Err(err),
                Err(err) => return Err(err),
            };
            return Ok(match parsed {
                Ok(snapshot) => Catalog::from_snapshot(snapshot),
                Err(err) => {
                    tracing::warn!(error = %err.chain(), "the catalog index's snapshot is damaged; rebuilding it from backups/");
                    Catalog::empty_at(newest)
                }
            });
        }
        Err(Error::new(
            ErrorCode::StorageUnavailable,
            "the catalog index's snapshots kept disappearing while read: another writer is pruning them faster than this one reads",
        ))
    }

    /// The log positions after `after`, ascending.
    async fn positions_after(&self, after: u64) -> Result<Vec<u64>> {
        let layout = self.layout();
        let metas: Vec<_> = self
            .store()
            .list_with_offset(
                Some(&layout.catalog_log_dir()),
                &layout.catalog_entry(after),
            )
            .try_collect()
            .await
            .map_err(|err| {
                Error::with_source(ErrorCode::StorageUnavailable, "list the catalog index", err)
            })?;
        let mut positions: Vec<u64> = metas
            .iter()
            .filter_map(|meta| layout.catalog_position_of(&meta.location))
            .filter(|&n| n > after)
            .collect();
        positions.sort_unstable();
        Ok(positions)
    }

    /// Applies the entries appended after `catalog`'s position. One pruned past it starts
    /// again from the newest snapshot. Returns whether it met a damaged snapshot or entry, or
    /// a hole (then `catalog` is stale: it must be reconciled before anything is recorded on
    /// top of it).
    async fn catch_up(&self, catalog: &mut Catalog) -> Result<bool> {
        let mut met_damage = false;
        for _ in 0..3 {
            let positions = self.positions_after(catalog.position).await?;
            let Some(&first) = positions.first() else {
                return Ok(met_damage);
            };
            if first != catalog.position + 1 {
                let reloaded = self.load_catalog().await?;
                if reloaded.position + 1 < first {
                    // Entries are missing that no snapshot covers: rebuild from backups/.
                    tracing::warn!(
                        from = reloaded.position + 1,
                        to = first - 1,
                        "the catalog index's log has a hole; rebuilding it from backups/"
                    );
                    *catalog = Catalog::empty_at(positions[positions.len() - 1]);
                    return Ok(true);
                }
                met_damage |= reloaded.stale;
                // What this handle found damaged stays so, and out of the catalog.
                let damaged = std::mem::take(&mut catalog.damaged);
                *catalog = reloaded;
                for d in &damaged {
                    catalog.by_id.remove(&d.backup_id);
                }
                catalog.damaged = damaged;
                catalog.reorder();
                continue;
            }
            let contiguous = positions
                .iter()
                .enumerate()
                .take_while(|(i, n)| **n == first + *i as u64)
                .count();
            let entries: Vec<(u64, Result<Option<Entry>>)> =
                futures::stream::iter(positions[..contiguous].to_vec())
                    .map(|n| async move { (n, self.read_entry(n).await) })
                    .buffered(CATALOG_READS)
                    .collect()
                    .await;
            for (n, entry) in entries {
                match entry {
                    Ok(Some(entry)) => catalog.apply_entry(&entry),
                    // Pruned since the listing: the next round reloads.
                    Ok(None) => break,
                    Err(err) if err.is_damaged_record() => {
                        tracing::warn!(error = %err.chain(), "a catalog index entry is damaged; reconciling with backups/");
                        catalog.stale = true;
                        met_damage = true;
                    }
                    Err(err) => return Err(err),
                }
                catalog.position = n;
            }
            catalog.reorder();
            if catalog.position == positions[contiguous - 1] {
                return Ok(met_damage);
            }
        }
        Ok(met_damage)
    }

    async fn read_entry(&self, n: u64) -> Result<Option<Entry>> {
        let key = self.layout().catalog_entry(n);
        let Some(bytes) = self
            .get_record(&key, (MAX_ENTRY_BYTES, ErrorCode::BackupManifestCorrupt))
            .await?
        else {
            return Ok(None);
        };
        let what = format!("catalog entry {key}");
        let entry: Entry =
            serde_json::from_slice(&bytes).map_err(|err| damaged_entry(&what, err))?;
        if let Entry::Added(manifests) = &entry {
            for manifest in manifests {
                manifest.check(&what)?;
            }
        }
        Ok(Some(entry))
    }

    /// Appends `entry` at the first free position after `catalog`'s, catching up with
    /// entries other writers appended first; applies it to `catalog`.
    async fn append(&self, catalog: &mut Catalog, entry: &Entry) -> Result<()> {
        // Derived serializations of these types cannot fail.
        let json = serde_json::to_vec(entry).unwrap_or_default();
        for _ in 0..APPEND_ATTEMPTS {
            let n = catalog.position + 1;
            let key = self.layout().catalog_entry(n);
            let payload = PutPayload::from(self.sealed_record(&key, json.clone())?);
            if self.put_once(&key, payload, "catalog entry").await? {
                catalog.apply_entry(entry);
                catalog.position = n;
                catalog.reorder();
                if n.is_multiple_of(SNAPSHOT_EVERY) && !catalog.stale {
                    if let Err(err) = self.put_snapshot(catalog).await {
                        tracing::warn!(error = %err.chain(), "could not snapshot the catalog index; the log grows until the next snapshot");
                    } else if let Err(err) = self.prune_catalog().await {
                        tracing::warn!(error = %err.chain(), "could not prune the catalog index");
                    }
                }
                return Ok(());
            }
            if self.catch_up(catalog).await? {
                // What this handle holds is no longer what the log says: record nothing on
                // top of it until it reconciles.
                return Err(Error::new(
                    ErrorCode::BackupManifestCorrupt,
                    "the catalog index has a damaged or missing entry; reconciling it with backups/ first",
                ));
            }
        }
        Err(Error::new(
            ErrorCode::StorageUnavailable,
            format!(
                "the catalog index: {APPEND_ATTEMPTS} positions in a row were taken by other writers"
            ),
        ))
    }

    async fn put_snapshot(&self, catalog: &Catalog) -> Result<()> {
        let key = self.layout().catalog_snapshot(catalog.position);
        let json = serde_json::to_vec(&SnapshotRef {
            format_version: FORMAT_VERSION,
            position: catalog.position,
            backups: catalog.ordered.iter().map(|m| m.as_ref()).collect(),
        })
        .unwrap_or_default();
        if json.len() as u64 > MAX_SNAPSHOT_BYTES {
            return Err(Error::new(
                ErrorCode::BackupCreationFailed,
                format!(
                    "a snapshot of the catalog index would be {} bytes, more than the {MAX_SNAPSHOT_BYTES} a reader accepts",
                    json.len()
                ),
            ));
        }
        let payload = PutPayload::from(self.sealed_record(&key, json)?);
        self.put_once(&key, payload, "catalog snapshot").await?;
        Ok(())
    }

    /// Keeps the two newest snapshots and the entries after the older of them: a reader that
    /// just loaded either still finds every entry it needs.
    async fn prune_catalog(&self) -> Result<()> {
        let layout = self.layout().clone();
        let snapshots = self
            .keys_under(
                &layout.catalog_snapshots_dir(),
                "catalog snapshots",
                |key| layout.catalog_position_of(key),
            )
            .await?;
        if snapshots.len() <= 2 {
            return Ok(());
        }
        let keep_from = snapshots[snapshots.len() - 2];
        let entries = self
            .keys_under(&layout.catalog_log_dir(), "the catalog index", |key| {
                layout.catalog_position_of(key)
            })
            .await?;
        for n in entries.into_iter().filter(|&n| n <= keep_from) {
            self.delete_if_present(&layout.catalog_entry(n)).await?;
        }
        for n in snapshots.into_iter().filter(|&n| n < keep_from) {
            self.delete_if_present(&layout.catalog_snapshot(n)).await?;
        }
        Ok(())
    }

    /// Makes the index say what `backups/` holds: indexes the manifests it lacks and removes
    /// what it holds that is gone. Only what was indexed before the listing started and is
    /// not listed counts as gone, so a backup committed during the listing is never removed.
    ///
    /// A listed manifest whose size is not the size of the one indexed (damaged, or changed
    /// by hand, after it was indexed) is read again: shown as damaged if it does not read,
    /// indexed again if it reads otherwise.
    async fn reconcile(&self, catalog: &mut Catalog) -> Result<()> {
        let before: HashSet<BackupId> = catalog.by_id.keys().cloned().collect();
        let layout = self.layout().clone();
        let listed: Vec<(BackupId, u64)> = self
            .store()
            .list(Some(&layout.backups_dir()))
            .try_filter_map(|meta| {
                let id = layout.backup_id_of(&meta.location);
                futures::future::ready(Ok(id.map(|id| (id, meta.size))))
            })
            .try_collect()
            .await
            .map_err(|err| {
                Error::with_source(ErrorCode::StorageUnavailable, "list backups", err)
            })?;
        let mut clean = !self.catch_up(catalog).await?;
        let listed_set: HashSet<&BackupId> = listed.iter().map(|(id, _)| id).collect();
        let to_read: Vec<BackupId> = listed
            .iter()
            .filter(|(id, size)| match catalog.by_id.get(id) {
                None => true,
                Some(indexed) => *size != self.stored_len(indexed),
            })
            .map(|(id, _)| id.clone())
            .collect();
        let read: Vec<(BackupId, Result<BackupManifest>)> = futures::stream::iter(to_read)
            .map(|id| async move {
                let manifest = self.backup_manifest(&id).await;
                (id, manifest)
            })
            .buffered(CATALOG_READS)
            .collect()
            .await;
        let mut added = Vec::new();
        let mut damaged = Vec::new();
        for (id, manifest) in read {
            match manifest {
                Ok(manifest) if catalog.by_id.get(&id).is_some_and(|m| **m == manifest) => {}
                Ok(manifest) => added.push(manifest),
                Err(err) if err.is_damaged_record() => {
                    tracing::warn!(backup = %id, error = %err.chain(), "skipping a corrupt backup manifest");
                    // Shown as damaged, not planned from; its entry stays (the file may be
                    // repaired), so a later handle reads it again.
                    catalog.by_id.remove(&id);
                    damaged.push(Damaged {
                        backup_id: id,
                        code: err.code,
                        why: err.chain(),
                    });
                }
                // Deleted since the listing.
                Err(err) if err.code == ErrorCode::BackupNotFound => {}
                Err(err) => return Err(err.context(format!("read the manifest of backup {id}"))),
            }
        }
        let gone: Vec<BackupId> = before
            .into_iter()
            .filter(|id| catalog.by_id.contains_key(id) && !listed_set.contains(id))
            .collect();
        added.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
        let (added_count, gone_count) = (added.len(), gone.len());
        let mut repairs = batches(added);
        if !gone.is_empty() {
            repairs.push(Entry::Removed(gone));
        }
        for entry in repairs {
            if let Err(err) = self.append(catalog, &entry).await {
                // A handle that may not write (a reader's credentials) still lists right.
                tracing::warn!(error = %err.chain(), "could not record the catalog index's repair; it holds for this process only");
                catalog.apply_entry(&entry);
                catalog.reorder();
                // A damaged entry met on the way: the next look reconciles again.
                clean &= !err.is_damaged_record();
            }
        }
        if added_count + gone_count > 0 {
            tracing::info!(
                indexed = added_count,
                removed = gone_count,
                "reconciled the catalog index with backups/"
            );
        }
        catalog.damaged = damaged;
        catalog.stale = !clean;
        catalog.reorder();
        Ok(())
    }

    /// The size `manifest` has as this build stores it (`commit_backup`).
    fn stored_len(&self, manifest: &BackupManifest) -> u64 {
        let overhead = if self.seal().is_sealed() {
            crate::seal::RECORD_OVERHEAD
        } else {
            0
        };
        manifest.to_json().len() as u64 + overhead
    }
}

/// `manifests` as entries of at most `MANIFESTS_PER_ENTRY` manifests and
/// `ENTRY_TARGET_BYTES` of JSON each (one larger manifest goes alone).
fn batches(manifests: Vec<BackupManifest>) -> Vec<Entry> {
    let mut out = Vec::new();
    let (mut batch, mut bytes) = (Vec::new(), 0usize);
    for manifest in manifests {
        let len = manifest.to_json().len();
        if !batch.is_empty()
            && (batch.len() == MANIFESTS_PER_ENTRY || bytes + len > ENTRY_TARGET_BYTES)
        {
            out.push(Entry::Added(std::mem::take(&mut batch)));
            bytes = 0;
        }
        bytes += len;
        batch.push(manifest);
    }
    if !batch.is_empty() {
        out.push(Entry::Added(batch));
    }
    out
}

fn check_snapshot(what: &str, position: u64, snapshot: Snapshot) -> Result<Snapshot> {
    if snapshot.format_version != FORMAT_VERSION {
        return Err(damaged_entry(
            what,
            format!(
                "format version {} is not supported by this build (reads {FORMAT_VERSION})",
                snapshot.format_version
            ),
        ));
    }
    if snapshot.position != position {
        return Err(damaged_entry(
            what,
            format!("it says position {}", snapshot.position),
        ));
    }
    for manifest in &snapshot.backups {
        manifest.check(what)?;
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use object_store::ObjectStoreExt;

    use super::*;
    use crate::manifest::BackupKind;

    fn manifest(id: &str) -> BackupManifest {
        BackupManifest::commit(
            BackupId::new(id).expect("id"),
            BackupKind::Full,
            None,
            Utc::now(),
            &[],
        )
    }

    async fn commit(repo: &Repository, id: &str) -> BackupManifest {
        repo.commit_backup(manifest(id)).await.expect("commit")
    }

    /// A commit that stopped after its manifest, before its entry: the manifest alone.
    async fn unrecorded(repo: &Repository, id: &str, commit_seq: u64) -> BackupManifest {
        let mut manifest = manifest(id);
        manifest.commit_seq = commit_seq;
        let key = repo.layout().backup_manifest(&manifest.backup_id);
        repo.put_manifest(&key, manifest.to_json())
            .await
            .expect("put");
        manifest
    }

    async fn listed(repo: &Repository) -> Vec<String> {
        repo.catalog()
            .await
            .expect("catalog")
            .backups()
            .iter()
            .map(|m| m.backup_id.to_string())
            .collect()
    }

    async fn log_len(repo: &Repository) -> usize {
        repo.positions_after(0).await.expect("log").len()
    }

    #[tokio::test]
    async fn commits_and_deletes_reach_another_handle_through_the_log_without_reading_backups() {
        let url = "memory://catalog-log";
        let writer = Repository::open(url).await.expect("repo");
        let reader = Repository::open(url).await.expect("repo");
        commit(&writer, "bk-1").await;
        commit(&writer, "bk-2").await;
        assert_eq!(listed(&reader).await, ["bk-1", "bk-2"]);
        commit(&writer, "bk-3").await;
        writer
            .delete_backup(&BackupId::new("bk-1").expect("id"), &[])
            .await
            .expect("delete");
        // The reader's later looks read the log, not backups/: a manifest damaged behind its
        // back goes unseen.
        writer
            .store()
            .put(
                &writer
                    .layout()
                    .backup_manifest(&BackupId::new("bk-2").expect("id")),
                PutPayload::from(b"{ not json".to_vec()),
            )
            .await
            .expect("damage");
        assert_eq!(listed(&reader).await, ["bk-2", "bk-3"]);
        assert_eq!(
            reader.catalog().await.expect("catalog").last_commit_seq(),
            3
        );
        // A new handle reconciles with backups/ by listing it: it reads the manifests the
        // index lacks and those whose size changed, and shows the damaged one as such.
        let fresh = Repository::open(url).await.expect("repo");
        assert_eq!(listed(&fresh).await, ["bk-3"]);
        let backups = fresh.backups().await.expect("backups");
        assert!(
            matches!(&backups[0], (id, Err(err)) if id.as_str() == "bk-2" && err.code == ErrorCode::BackupManifestCorrupt),
            "{backups:?}"
        );
    }

    #[tokio::test]
    async fn a_commit_or_delete_that_stopped_before_its_entry_is_repaired_by_the_next_handle() {
        let url = "memory://catalog-repair";
        let repo = Repository::open(url).await.expect("repo");
        commit(&repo, "bk-1").await;
        commit(&repo, "bk-2").await;
        // A commit that stopped after its manifest, and a delete after removing one.
        unrecorded(&repo, "bk-3", 3).await;
        repo.delete_if_present(
            &repo
                .layout()
                .backup_manifest(&BackupId::new("bk-1").expect("id")),
        )
        .await
        .expect("delete");
        assert_eq!(
            listed(&repo).await,
            ["bk-1", "bk-2"],
            "this handle has not looked at backups/ again"
        );
        let entries = log_len(&repo).await;
        let fresh = Repository::open(url).await.expect("repo");
        assert_eq!(listed(&fresh).await, ["bk-2", "bk-3"]);
        assert_eq!(log_len(&repo).await, entries + 2, "the repair is recorded");
        assert_eq!(
            listed(&repo).await,
            ["bk-2", "bk-3"],
            "and reaches the first handle"
        );
        // Deleting a backup the index holds whose manifest is gone finishes it.
        let stale = Repository::open(url).await.expect("repo");
        listed(&stale).await;
        repo.delete_if_present(
            &repo
                .layout()
                .backup_manifest(&BackupId::new("bk-2").expect("id")),
        )
        .await
        .expect("delete");
        stale
            .delete_backup(&BackupId::new("bk-2").expect("id"), &[])
            .await
            .expect("finish the delete");
        assert_eq!(listed(&stale).await, ["bk-3"]);
    }

    #[tokio::test]
    async fn a_repository_from_before_the_index_is_indexed_at_its_first_look() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let repo = Repository::open(&url).await.expect("repo");
        for n in 1..=5 {
            commit(&repo, &format!("bk-{n}")).await;
        }
        std::fs::remove_dir_all(dir.path().join("catalog")).expect("remove the index");
        let fresh = Repository::open(&url).await.expect("repo");
        assert_eq!(
            listed(&fresh).await,
            ["bk-1", "bk-2", "bk-3", "bk-4", "bk-5"]
        );
        assert!(
            dir.path()
                .join("catalog/snapshot")
                .join(format!("{:020}.json", 0))
                .exists()
        );
        let next = commit(&fresh, "bk-6").await;
        assert_eq!(next.commit_seq, 6);
    }

    #[tokio::test]
    async fn the_log_is_snapshotted_and_pruned_and_a_handle_left_behind_reloads() {
        let url = "memory://catalog-prune";
        let writer = Repository::open(url).await.expect("repo");
        let behind = Repository::open(url).await.expect("repo");
        commit(&writer, "bk-0000").await;
        assert_eq!(listed(&behind).await.len(), 1);
        for n in 1..300 {
            commit(&writer, &format!("bk-{n:04}")).await;
        }
        let entries = log_len(&writer).await;
        assert!(
            entries <= 2 * SNAPSHOT_EVERY as usize,
            "{entries} entries kept"
        );
        let layout = writer.layout().clone();
        let snapshots = writer
            .keys_under(&layout.catalog_snapshots_dir(), "snapshots", |key| {
                layout.catalog_position_of(key)
            })
            .await
            .expect("snapshots");
        assert_eq!(snapshots.len(), 2, "{snapshots:?}");
        let expected: Vec<String> = (0..300).map(|n| format!("bk-{n:04}")).collect();
        assert_eq!(listed(&behind).await, expected, "pruned past: reloaded");
        let fresh = Repository::open(url).await.expect("repo");
        assert_eq!(listed(&fresh).await, expected);
    }

    #[tokio::test]
    async fn a_damaged_snapshot_or_entry_is_rebuilt_from_backups() {
        let url = "memory://catalog-damage";
        let repo = Repository::open(url).await.expect("repo");
        for n in 0..70 {
            commit(&repo, &format!("bk-{n:04}")).await;
        }
        let damage = |key: object_store::path::Path| {
            let repo = repo.clone();
            async move {
                repo.store()
                    .put(&key, PutPayload::from(b"not json".to_vec()))
                    .await
                    .expect("damage");
            }
        };
        damage(repo.layout().catalog_snapshot(SNAPSHOT_EVERY)).await;
        damage(repo.layout().catalog_entry(SNAPSHOT_EVERY + 3)).await;
        let fresh = Repository::open(url).await.expect("repo");
        let expected: Vec<String> = (0..70).map(|n| format!("bk-{n:04}")).collect();
        assert_eq!(listed(&fresh).await, expected);
    }

    #[tokio::test]
    async fn an_append_that_finds_its_position_taken_catches_up_and_takes_the_next() {
        let url = "memory://catalog-race";
        let (a, b) = (
            Repository::open(url).await.expect("repo"),
            Repository::open(url).await.expect("repo"),
        );
        commit(&a, "bk-1").await;
        let stale = Catalog::clone(&b.catalog().await.expect("catalog"));
        // Another writer takes the position b would take next.
        commit(&a, "bk-2").await;
        let manifest = unrecorded(&b, "bk-3", 3).await;
        let mut catalog = stale.clone();
        b.append(&mut catalog, &Entry::Added(vec![manifest]))
            .await
            .expect("append");
        assert_eq!(catalog.position, stale.position + 2);
        let ids = |c: &Catalog| -> Vec<String> {
            c.backups()
                .iter()
                .map(|m| m.backup_id.to_string())
                .collect()
        };
        assert_eq!(ids(&catalog), ["bk-1", "bk-2", "bk-3"]);
        let fresh = Repository::open(url).await.expect("repo");
        assert_eq!(listed(&fresh).await, ["bk-1", "bk-2", "bk-3"]);
        assert_eq!(log_len(&fresh).await, 3, "no repair was needed");
    }

    #[tokio::test]
    async fn a_recording_dropped_midway_makes_the_next_look_reconcile() {
        let url = "memory://catalog-cancelled";
        let repo = Repository::open(url).await.expect("repo");
        commit(&repo, "bk-1").await;
        unrecorded(&repo, "bk-2", 2).await;
        assert_eq!(listed(&repo).await, ["bk-1"]);
        // What a caller cancelled inside `record` leaves behind.
        drop(Recording(repo.catalog_state()));
        assert_eq!(listed(&repo).await, ["bk-1", "bk-2"]);
    }

    #[test]
    fn a_manifest_from_before_the_commit_order_keeps_its_stored_size() {
        let mut old: serde_json::Value =
            serde_json::from_slice(&manifest("bk-old").to_json()).expect("json");
        old.as_object_mut().expect("object").remove("commit_seq");
        let stored = serde_json::to_vec_pretty(&old).expect("json");
        let parsed = BackupManifest::parse("old", &stored).expect("parse");
        assert_eq!(parsed.commit_seq, 0);
        assert_eq!(
            parsed.to_json().len(),
            stored.len(),
            "re-read at every look otherwise"
        );
    }

    #[tokio::test]
    async fn a_decision_that_removes_things_sees_a_commit_no_entry_recorded() {
        let url = "memory://catalog-unrecorded";
        let repo = Repository::open(url).await.expect("repo");
        commit(&repo, "bk-1").await;
        // Another writer's commit that stopped before its entry.
        unrecorded(&repo, "bk-2", 2).await;
        assert_eq!(listed(&repo).await, ["bk-1"]);
        let reconciled = repo.reconciled_catalog().await.expect("catalog");
        let ids: Vec<&str> = reconciled
            .backups()
            .iter()
            .map(|m| m.backup_id.as_str())
            .collect();
        assert_eq!(ids, ["bk-1", "bk-2"]);
        assert_eq!(listed(&repo).await, ["bk-1", "bk-2"]);
    }
}
