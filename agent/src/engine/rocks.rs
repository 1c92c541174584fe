//! `RocksEngine`: the `ShardEngine` on RocksDB.
//!
//! Capture uses RocksDB's own Checkpoint with flushing turned off: it hard-links the live SST
//! files and copies the MANIFEST and the WAL trimmed to their sizes at the instant, under
//! RocksDB's internal mutex, so the file set is consistent by construction. To keep the WAL
//! copy (the only part proportional to data) small while the write gate is closed,
//! `prepare_capture` flushes the memtables first, while writes still flow.
//!
//! File deletions are disabled from just before the checkpoint until the `Capture` is
//! dropped (after the upload, or on any error), as RocksDB's BackupEngine does.
//!
//! Every SST gets an identity `incarnation/name/size`, where the incarnation is a UUID kept
//! in `LOCKSTEP-INCARNATION` in the shard directory. RocksDB never reuses a file number within
//! one DB, and a restored shard gets a fresh incarnation (the file is not part of a capture),
//! so equal identities mean equal bytes even across restores.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lockstep_repository::{Error, ErrorCode, Result, Seq};
use rocksdb::checkpoint::Checkpoint;
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions};

use super::{
    Capture, Op, SeqRange, ShardEngine, WriteBatch, engine_error, list_capture, unknown_cf,
};

const INCARNATION_FILE: &str = "LOCKSTEP-INCARNATION";

/// A shard stored in RocksDB.
pub struct RocksEngine {
    db: Arc<DB>,
    dir: PathBuf,
    incarnation: String,
    column_families: Vec<String>,
    /// Serializes writes so each batch's sequence range is exact.
    write_lock: Mutex<()>,
}

fn db_options() -> Options {
    let mut options = Options::default();
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
    fn open(dir: &Path, column_families: &[String]) -> Result<RocksEngine> {
        std::fs::create_dir_all(dir).map_err(|err| {
            Error::io(
                ErrorCode::ShardEngineFailed,
                format!("create {}", dir.display()),
                err,
            )
        })?;
        let options = db_options();
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
            .map(|name| ColumnFamilyDescriptor::new(name, db_options()));
        let db = DB::open_cf_descriptors(&options, dir, descriptors)
            .map_err(|err| engine_error(format!("open RocksDB at {}", dir.display()), err))?;
        let incarnation = read_or_create_incarnation(dir)?;
        Ok(RocksEngine {
            db: Arc::new(db),
            dir: dir.to_path_buf(),
            incarnation,
            column_families: names,
            write_lock: Mutex::new(()),
        })
    }

    fn kind(&self) -> &'static str {
        "rocksdb"
    }

    fn column_families(&self) -> Vec<String> {
        self.column_families.clone()
    }

    fn write(&self, batch: &WriteBatch) -> Result<SeqRange> {
        batch.validate()?;
        let mut rocks_batch = rocksdb::WriteBatch::default();
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
            });
        }
        self.db
            .write(rocks_batch)
            .map_err(|err| engine_error("write batch", err))?;
        let last = self.db.latest_sequence_number();
        Ok(SeqRange {
            first: Seq(last + 1 - batch.len() as u64),
            last: Seq(last),
        })
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
        let seq = self.latest_seq();
        let checkpoint =
            Checkpoint::new(&*self.db).map_err(|err| engine_error("start checkpoint", err))?;
        // A log size threshold of u64::MAX means "never flush": the WAL tail is copied
        // instead, so capture time does not include a memtable flush.
        checkpoint
            .create_checkpoint_with_log_size(dir, u64::MAX)
            .map_err(|err| engine_error(format!("create checkpoint in {}", dir.display()), err))?;
        let after = self.latest_seq();
        if after != seq {
            return Err(Error::new(
                ErrorCode::BackupCreationFailed,
                format!(
                    "writes were not fenced during capture: sequence moved from {seq} to {after}"
                ),
            ));
        }
        let files = list_capture(dir, Some(&self.incarnation))?;
        Ok(Capture::new(
            seq,
            dir.to_path_buf(),
            files,
            self.column_families.clone(),
            Some(Box::new(freeze)),
        ))
    }
}
