//! `RocksEngine`: the `ShardEngine` on RocksDB.
//!
//! Capture uses RocksDB's own Checkpoint with flushing turned off: it hard-links the live SST
//! files and copies the MANIFEST and the WAL trimmed to their sizes at the instant, under
//! RocksDB's internal mutex, so the file set is consistent by construction. It runs while
//! writes flow (the barrier's stage, before any gate closes); the checkpoint is then opened
//! read-only to learn the exact sequence number it holds. `prepare_capture` flushes the
//! memtables first, so the WAL copy (the only part proportional to data) stays small.
//!
//! File deletions are disabled from just before the checkpoint until the `Capture` is
//! dropped (after the upload, or on any error), as RocksDB's BackupEngine does.
//!
//! Every SST gets an identity `incarnation/name/size/tail`, where the incarnation is a UUID
//! kept in `LOCKSTEP-INCARNATION` in the shard directory and `tail` hashes the file's table
//! properties (the writing session's id and the original file number, what RocksDB's unique
//! SST id is made of). RocksDB never reuses a file number within one DB session history, a
//! restored shard gets a fresh incarnation (the file is not part of a capture), and a machine
//! rolled back to a snapshot writes its reused file numbers in a new session, so equal
//! identities mean equal bytes across restores and rollbacks.
//!
//! Every batch starts with a LogData record (`LKH1` and the HLC time, u64 LE): RocksDB keeps
//! it in the WAL and skips it when applying, so the commit time of every write survives any
//! crash with no side index. `wal_since` reads the WAL with `GetUpdatesSince`; obsolete WAL
//! files are kept in `archive/` up to `EngineConfig::wal_retention_mb` for it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lockstep_repository::wal::check_continuity;
use lockstep_repository::{Error, ErrorCode, HlcTime, Result, Seq};
use rocksdb::checkpoint::Checkpoint;
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions};

use super::{
    Capture, EngineConfig, Op, SeqRange, ShardEngine, WalBatch, WriteBatch, list_capture,
    unknown_cf,
};
use crate::hlc::HlcClock;

fn engine_error(
    what: impl Into<String>,
    err: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::with_source(ErrorCode::ShardEngineFailed, what, err)
}

const INCARNATION_FILE: &str = "LOCKSTEP-INCARNATION";
const HLC_MAGIC: &[u8; 4] = b"LKH1";
/// RocksDB's WriteBatch header: sequence number (u64) and count (u32).
const BATCH_HEADER_LEN: usize = 12;
/// RocksDB's record tag for a LogData blob.
const TAG_LOG_DATA: u8 = 0x03;

fn hlc_blob(time: HlcTime) -> [u8; 12] {
    let mut blob = [0u8; 12];
    blob[..4].copy_from_slice(HLC_MAGIC);
    blob[4..].copy_from_slice(&time.0.to_le_bytes());
    blob
}

/// The HLC time in a raw batch's leading LogData record, if it has one.
fn hlc_of(data: &[u8]) -> Option<HlcTime> {
    let rest = data.get(BATCH_HEADER_LEN..)?;
    let (&tag, rest) = rest.split_first()?;
    if tag != TAG_LOG_DATA {
        return None;
    }
    // A varint32 length; our blob is 12 bytes, so one byte.
    let (&len, rest) = rest.split_first()?;
    let blob = rest.get(..usize::from(len))?;
    if len != 12 || &blob[..4] != HLC_MAGIC {
        return None;
    }
    blob[4..]
        .try_into()
        .ok()
        .map(u64::from_le_bytes)
        .map(HlcTime)
}

/// A shard stored in RocksDB.
pub struct RocksEngine {
    db: Arc<DB>,
    dir: PathBuf,
    incarnation: String,
    column_families: Vec<String>,
    /// Serializes writes so each batch's sequence range is exact and HLC times grow in
    /// sequence order.
    write_lock: Mutex<()>,
    clock: HlcClock,
}

/// The block cache every column family of a shard shares. Index and filter blocks live in it
/// too, so the engine's memory stays within it whatever the shard's size (with RocksDB's
/// defaults, every table's index and filter stay in memory, growing with the shard).
const BLOCK_CACHE_BYTES: usize = 64 << 20;

fn db_options(cache: &rocksdb::Cache) -> Options {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    let mut options = Options::default();
    options.set_block_based_table_factory(&table);
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    options.set_bottommost_compression_type(rocksdb::DBCompressionType::Zstd);
    options.set_keep_log_file_num(4);
    options
}

fn read_or_create_incarnation(dir: &Path) -> Result<String> {
    let path = dir.join(INCARNATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if uuid::Uuid::parse_str(text.trim()).is_ok() => Ok(text.trim().to_string()),
        Ok(_) | Err(_) => {
            let incarnation = uuid::Uuid::new_v4().to_string();
            std::fs::write(&path, &incarnation).map_err(|err| {
                Error::io(
                    ErrorCode::ShardEngineFailed,
                    format!("write {}", path.display()),
                    err,
                )
            })?;
            Ok(incarnation)
        }
    }
}

/// The sequence number a checkpoint opens at: it is opened read-only, which recovers its
/// WAL copy as a restore would, and loads no table until it is read.
fn checkpoint_seq(dir: &Path, column_families: &[String]) -> Result<Seq> {
    let cache = rocksdb::Cache::new_lru_cache(1 << 20);
    let mut options = db_options(&cache);
    options.create_if_missing(false);
    options.set_max_open_files(16);
    let db = DB::open_cf_for_read_only(&options, dir, column_families, false)
        .map_err(|err| engine_error(format!("open checkpoint {} read-only", dir.display()), err))?;
    Ok(Seq(db.latest_sequence_number()))
}

/// Re-enables file deletions when dropped.
struct DeletionFreeze(Arc<DB>);

impl Drop for DeletionFreeze {
    fn drop(&mut self) {
        if let Err(err) = self.0.enable_file_deletions() {
            tracing::error!(error = %err, "could not re-enable RocksDB file deletions");
        }
    }
}

impl RocksEngine {
    /// The directory the shard lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Flushes all memtables to SST files (used by tests to exercise compaction paths).
    pub fn flush(&self) -> Result<()> {
        for cf in &self.column_families {
            let handle = self.db.cf_handle(cf).ok_or_else(|| unknown_cf(cf))?;
            self.db
                .flush_cf(&handle)
                .map_err(|err| engine_error(format!("flush {cf}"), err))?;
        }
        Ok(())
    }

    /// Compacts every column family fully.
    pub fn compact(&self) -> Result<()> {
        for cf in &self.column_families {
            let handle = self.db.cf_handle(cf).ok_or_else(|| unknown_cf(cf))?;
            self.db
                .compact_range_cf(&handle, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// The HLC time of the last batch, if the WAL still has it. The WAL is read forward
    /// only, so this starts a little before the end and widens until it finds the batch.
    fn last_hlc(&self) -> Option<HlcTime> {
        let latest = self.db.latest_sequence_number();
        for window in [64u64, 4096, 1 << 20] {
            let iter = self
                .db
                .get_updates_since(latest.saturating_sub(window))
                .ok()?;
            let last = iter.filter_map(|item| item.ok()).last();
            if let Some((first, batch)) = last
                && first <= latest
                && latest < first + batch.len() as u64
            {
                return hlc_of(batch.data());
            }
        }
        None
    }

    /// Names of the live SST files.
    pub fn live_sst_files(&self) -> Result<Vec<String>> {
        let files = self
            .db
            .live_files()
            .map_err(|err| engine_error("list live files", err))?;
        Ok(files
            .into_iter()
            .map(|f| f.name.trim_start_matches('/').to_string())
            .collect())
    }
}

impl ShardEngine for RocksEngine {
    fn open_with(
        dir: &Path,
        column_families: &[String],
        config: &EngineConfig,
    ) -> Result<RocksEngine> {
        std::fs::create_dir_all(dir).map_err(|err| {
            Error::io(
                ErrorCode::ShardEngineFailed,
                format!("create {}", dir.display()),
                err,
            )
        })?;
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let mut options = db_options(&cache);
        // Obsolete WAL files move to archive/ and stay until the archive passes the bound.
        options.set_wal_size_limit_mb(config.wal_retention_mb.max(1));
        if config.low_priority_compactions {
            // The compaction pool of the process-wide default Env: every shard of the process.
            let mut env = rocksdb::Env::new()
                .map_err(|err| engine_error("open RocksDB's default Env", err))?;
            env.lower_thread_pool_cpu_priority();
            options.set_env(&env);
        }
        let mut names: Vec<String> = DB::list_cf(&options, dir).unwrap_or_default();
        for cf in
            std::iter::once(super::DEFAULT_CF.to_string()).chain(column_families.iter().cloned())
        {
            if !names.contains(&cf) {
                names.push(cf);
            }
        }
        let descriptors = names
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, db_options(&cache)));
        let db = DB::open_cf_descriptors(&options, dir, descriptors)
            .map_err(|err| engine_error(format!("open RocksDB at {}", dir.display()), err))?;
        let incarnation = read_or_create_incarnation(dir)?;
        let engine = RocksEngine {
            db: Arc::new(db),
            dir: dir.to_path_buf(),
            incarnation,
            column_families: names,
            write_lock: Mutex::new(()),
            clock: config.clock.clone(),
        };
        // Never stamp a time below the last one in the WAL, whatever the wall clock says.
        if let Some(last) = engine.last_hlc() {
            engine.clock.observe(last);
        }
        Ok(engine)
    }

    fn kind(&self) -> &'static str {
        "rocksdb"
    }

    fn column_families(&self) -> Vec<String> {
        self.column_families.clone()
    }

    fn write(&self, batch: &WriteBatch) -> Result<SeqRange> {
        let original = batch;
        let batch = original.checked()?;
        // What `checked` left out names its family too: an unknown one fails the batch.
        if matches!(batch, std::borrow::Cow::Owned(_)) {
            for op in &original.ops {
                self.db
                    .cf_handle(op.cf())
                    .ok_or_else(|| unknown_cf(op.cf()))?;
            }
        }
        let mut rocks_batch = rocksdb::WriteBatch::default();
        // The HLC record goes first and is stamped under the write lock below; reserve it.
        rocks_batch.put_log_data(hlc_blob(HlcTime(0)));
        for op in &batch.ops {
            match op {
                Op::Put { cf, key, value } => {
                    let handle = self.db.cf_handle(cf).ok_or_else(|| unknown_cf(cf))?;
                    rocks_batch.put_cf(&handle, key, value);
                }
                Op::Delete { cf, key } => {
                    let handle = self.db.cf_handle(cf).ok_or_else(|| unknown_cf(cf))?;
                    rocks_batch.delete_cf(&handle, key);
                }
                Op::DeleteRange { cf, start, end } => {
                    let handle = self.db.cf_handle(cf).ok_or_else(|| unknown_cf(cf))?;
                    rocks_batch.delete_range_cf(&handle, start, end);
                }
            }
        }
        let _serial = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if batch.is_empty() {
            let last = self.db.latest_sequence_number();
            return Ok(SeqRange {
                first: Seq(last + 1),
                last: Seq(last),
                hlc: self.clock.last(),
            });
        }
        let hlc = self.clock.now();
        let mut data = rocks_batch.data().to_vec();
        let blob = hlc_blob(hlc);
        // Header, LogData tag, one-byte length, then the blob.
        let at = BATCH_HEADER_LEN + 2;
        data[at..at + blob.len()].copy_from_slice(&blob);
        self.db
            .write(rocksdb::WriteBatch::from_data(&data))
            .map_err(|err| engine_error("write batch", err))?;
        let last = self.db.latest_sequence_number();
        Ok(SeqRange {
            first: Seq(last + 1 - batch.len() as u64),
            last: Seq(last),
            hlc,
        })
    }

    fn wal_since(&self, after: Seq, max_bytes: usize) -> Result<Vec<WalBatch>> {
        if after >= self.latest_seq() {
            return Ok(Vec::new());
        }
        let gap = |err: rocksdb::Error| {
            Error::with_source(
                ErrorCode::BackupWalGap,
                format!(
                    "read the WAL of {} after sequence {after}",
                    self.dir.display()
                ),
                err,
            )
        };
        let iter = self.db.get_updates_since(after.0).map_err(gap)?;
        let mut batches = Vec::new();
        let mut bytes = 0;
        for item in iter {
            let (first, batch) = item.map_err(gap)?;
            let data = batch.data().to_vec();
            bytes += data.len();
            batches.push(WalBatch {
                first: Seq(first),
                count: batch.len() as u64,
                hlc: hlc_of(&data).unwrap_or_default(),
                data,
            });
            if bytes >= max_bytes {
                break;
            }
        }
        if batches.is_empty() {
            // Writes after `after` exist but no WAL file holds them any more.
            return Err(lockstep_repository::wal::gap(
                self.dir.display(),
                Seq(after.0 + 1),
                Seq(self.latest_seq().0 + 1),
            ));
        }
        check_continuity(self.dir.display(), Seq(after.0 + 1), &batches)?;
        Ok(batches)
    }

    fn replay(&self, batch: &WalBatch) -> Result<SeqRange> {
        let _serial = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let expected = Seq(self.db.latest_sequence_number() + 1);
        check_continuity(self.dir.display(), expected, std::slice::from_ref(batch))?;
        self.db
            .write(rocksdb::WriteBatch::from_data(&batch.data))
            .map_err(|err| engine_error("replay batch", err))?;
        let last = Seq(self.db.latest_sequence_number());
        if last != batch.last() {
            return Err(Error::new(
                ErrorCode::BackupRestorationFailed,
                format!(
                    "replaying batch {}..={} ended at sequence {last}",
                    batch.first,
                    batch.last()
                ),
            ));
        }
        self.clock.observe(batch.hlc);
        Ok(SeqRange {
            first: batch.first,
            last,
            hlc: batch.hlc,
        })
    }

    fn clock(&self) -> &HlcClock {
        &self.clock
    }

    fn sync(&self) -> Result<()> {
        self.db
            .flush_wal(true)
            .map_err(|err| engine_error("sync the WAL", err))
    }

    fn wal_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for dir in [self.dir.clone(), self.dir.join("archive")] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(Error::io(
                        ErrorCode::ShardEngineFailed,
                        format!("list {}", dir.display()),
                        err,
                    ));
                }
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".log") {
                    total += entry.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        Ok(total)
    }

    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let handle = self.db.cf_handle(cf).ok_or_else(|| unknown_cf(cf))?;
        self.db
            .get_cf(&handle, key)
            .map_err(|err| engine_error("get", err))
    }

    fn scan(
        &self,
        cf: &str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let handle = self.db.cf_handle(cf).ok_or_else(|| unknown_cf(cf))?;
        let mut read_options = ReadOptions::default();
        if let Some(end) = end {
            read_options.set_iterate_upper_bound(end.to_vec());
        }
        let iter = self.db.iterator_cf_opt(
            &handle,
            read_options,
            IteratorMode::From(start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (key, value) = item.map_err(|err| engine_error("scan", err))?;
            out.push((key.into_vec(), value.into_vec()));
        }
        Ok(out)
    }

    fn latest_seq(&self) -> Seq {
        Seq(self.db.latest_sequence_number())
    }

    fn prepare_capture(&self) -> Result<()> {
        self.flush()
    }

    fn capture(&self, dir: &Path) -> Result<Capture> {
        self.db
            .disable_file_deletions()
            .map_err(|err| engine_error("disable file deletions", err))?;
        let freeze = DeletionFreeze(self.db.clone());
        let checkpoint =
            Checkpoint::new(&*self.db).map_err(|err| engine_error("start checkpoint", err))?;
        // A log size threshold of u64::MAX means "never flush": the WAL tail is copied
        // instead, so capture time does not include a memtable flush.
        checkpoint
            .create_checkpoint_with_log_size(dir, u64::MAX)
            .map_err(|err| engine_error(format!("create checkpoint in {}", dir.display()), err))?;
        let files = list_capture(dir, Some(&self.incarnation))?;
        // Writes may flow during the checkpoint: the only exact account of what it holds is
        // the sequence number it opens at.
        let seq = checkpoint_seq(dir, &self.column_families)?;
        Ok(Capture::new(
            seq,
            dir.to_path_buf(),
            files,
            self.column_families.clone(),
            Some(Box::new(freeze)),
        ))
    }

    fn drop_column_families(dir: &Path, drop: &[String]) -> Result<()> {
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let options = db_options(&cache);
        let names = DB::list_cf(&options, dir).map_err(|err| {
            engine_error(format!("list column families in {}", dir.display()), err)
        })?;
        let descriptors = names
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, db_options(&cache)));
        let mut db = DB::open_cf_descriptors(&options, dir, descriptors)
            .map_err(|err| engine_error(format!("open RocksDB at {}", dir.display()), err))?;
        for cf in drop {
            if cf != super::DEFAULT_CF && names.contains(cf) {
                db.drop_cf(cf)
                    .map_err(|err| engine_error(format!("drop column family {cf}"), err))?;
            }
        }
        db.flush_wal(true)
            .map_err(|err| engine_error("sync the WAL", err))
    }

    fn clear_column_family(&self, cf: &str) -> Result<()> {
        let handle = self.db.cf_handle(cf).ok_or_else(|| unknown_cf(cf))?;
        let empty = || -> Result<bool> {
            Ok(self
                .db
                .iterator_cf(&handle, IteratorMode::Start)
                .next()
                .transpose()
                .map_err(|err| engine_error("scan", err))?
                .is_none())
        };
        if empty()? {
            return Ok(());
        }
        // Every key into table files below level 0 (flushes and compactions consume no
        // sequence number; level 0 files are never deleted by range), then every file of
        // the family dropped: the range is the union of theirs, tombstones included.
        self.db
            .flush_cf(&handle)
            .map_err(|err| engine_error(format!("flush {cf}"), err))?;
        let mut compact = rocksdb::CompactOptions::default();
        compact.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(&handle, None::<&[u8]>, None::<&[u8]>, &compact);
        let files = self
            .db
            .live_files()
            .map_err(|err| engine_error("list the table files", err))?;
        let mut range: Option<(Vec<u8>, Vec<u8>)> = None;
        for file in files.into_iter().filter(|f| f.column_family_name == cf) {
            if file.level == 0 {
                // The compaction reports no error of its own: this is how one shows.
                return Err(Error::new(
                    ErrorCode::ShardEngineFailed,
                    format!(
                        "the compaction of column family {cf} did not finish (is the disk full?)"
                    ),
                ));
            }
            let (Some(start), Some(end)) = (file.start_key, file.end_key) else {
                continue;
            };
            range = Some(match range {
                None => (start, end),
                Some((low, high)) => (low.min(start), high.max(end)),
            });
        }
        if let Some((low, high)) = range {
            self.db
                .delete_file_in_range_cf(&handle, &low, &high)
                .map_err(|err| engine_error(format!("delete the files of {cf}"), err))?;
        }
        if !empty()? {
            return Err(Error::new(
                ErrorCode::ShardEngineFailed,
                format!("column family {cf} still holds keys after its files were deleted"),
            ));
        }
        Ok(())
    }
}
