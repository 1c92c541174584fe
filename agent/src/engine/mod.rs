//! The `ShardEngine` trait: the narrow interface the rest of the agent uses to reach a shard.
//!
//! Two implementations: `RocksEngine` on RocksDB (with the `rocksdb` cargo feature, on by
//! default), and `MemEngine`, an in-memory model for simulations and fast tests. One
//! conformance suite (`conformance.rs`) runs against both; the model is trusted only because
//! that suite passes on both. Code that picks an engine by name does it through
//! [`with_engine!`], the one place that knows which engines this build has.
//!
//! Every method blocks: call them through `lockstep_repository::blocking::run` (the blocking
//! pool, or inline in simulations) or from a dedicated thread.

mod mem;
#[cfg(feature = "rocksdb")]
mod rocks;

#[cfg(test)]
mod conformance;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

pub use lockstep_repository::manifest::FileKind;
pub use lockstep_repository::wal::WalBatch;
use lockstep_repository::{Error, ErrorCode, HlcTime, Result, Seq};

use crate::hlc::HlcClock;
pub use mem::MemEngine;
#[cfg(feature = "rocksdb")]
pub use rocks::RocksEngine;

/// Evaluates `$body` with `$engine` naming the engine type whose [`ShardEngine::kind`] is
/// `$name`: `rocksdb` or `memory`. Any other name is an error, as is `rocksdb` in a build
/// without the `rocksdb` feature ([`unknown_engine`]); `$body` is a `Result`.
macro_rules! with_engine {
    ($name:expr, |$engine:ident| $body:expr) => {
        match $name {
            #[cfg(feature = "rocksdb")]
            "rocksdb" => {
                type $engine = $crate::engine::RocksEngine;
                $body
            }
            "memory" => {
                type $engine = $crate::engine::MemEngine;
                $body
            }
            other => Err($crate::engine::unknown_engine(other)),
        }
    };
}
pub(crate) use with_engine;

/// The error for an engine name this build cannot open: `rocksdb` without the `rocksdb`
/// feature is a bad request with the fix in it; any other name is a corrupt manifest.
pub(crate) fn unknown_engine(name: &str) -> Error {
    if name == "rocksdb" {
        Error::new(
            ErrorCode::InvalidArgument,
            "this lockstep-agent was built without RocksDB; build it with the `rocksdb` feature (on by default) or use the memory engine",
        )
    } else {
        Error::new(
            ErrorCode::BackupManifestCorrupt,
            format!("unknown engine {name:?}"),
        )
    }
}

/// The column family every shard has.
pub const DEFAULT_CF: &str = "default";

/// One mutation in a write batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        cf: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: String,
        key: Vec<u8>,
    },
    /// Deletes every key in `[start, end)`.
    DeleteRange {
        cf: String,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// An ordered group of mutations applied atomically; each consumes one sequence number,
/// except an empty range delete (`start == end`), which engines leave out (see
/// [`WriteBatch::checked`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<Op>,
}

impl WriteBatch {
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    pub fn put(
        &mut self,
        cf: &str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(Op::Put {
            cf: cf.into(),
            key: key.into(),
            value: value.into(),
        });
        self
    }

    pub fn delete(&mut self, cf: &str, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete {
            cf: cf.into(),
            key: key.into(),
        });
        self
    }

    pub fn delete_range(
        &mut self,
        cf: &str,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(Op::DeleteRange {
            cf: cf.into(),
            start: start.into(),
            end: end.into(),
        });
        self
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// The batch as engines write it. Refuses what no engine applies the same way, a range
    /// delete whose start is after its end, and leaves out empty range deletes
    /// (`start == end`), which delete nothing: RocksDB counts one in the sequence numbers a
    /// live write consumes but not when it replays its WAL at open, so a shard reopened (or
    /// a capture opened) right after one would stand one sequence number short of its own
    /// WAL, and its next write would reuse a number already shipped.
    pub fn checked(&self) -> Result<Cow<'_, WriteBatch>> {
        let mut empty_ranges = 0;
        for op in &self.ops {
            if let Op::DeleteRange { cf, start, end } = op {
                if start > end {
                    return Err(Error::new(
                        ErrorCode::InvalidArgument,
                        format!("range delete in {cf:?} has its start after its end"),
                    ));
                }
                empty_ranges += usize::from(start == end);
            }
        }
        if empty_ranges == 0 {
            return Ok(Cow::Borrowed(self));
        }
        let ops = self
            .ops
            .iter()
            .filter(|op| !matches!(op, Op::DeleteRange { start, end, .. } if start == end))
            .cloned()
            .collect();
        Ok(Cow::Owned(WriteBatch { ops }))
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl Op {
    /// The column family the operation writes.
    pub fn cf(&self) -> &str {
        let (Op::Put { cf, .. } | Op::Delete { cf, .. } | Op::DeleteRange { cf, .. }) = self;
        cf
    }
}

/// The sequence numbers a write batch consumed: `first..=last`; empty when `first > last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    pub first: Seq,
    pub last: Seq,
    /// The HLC commit time stamped into the batch's WAL record (for an empty batch, the
    /// clock's last time: nothing was written).
    pub hlc: HlcTime,
}

/// How an engine is opened: its clock and how much WAL it keeps for shipping and
/// incremental backups.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub clock: HlcClock,
    /// WAL kept after the engine no longer needs it, in MiB, so the shipper and the next
    /// incremental backup can still read it (WAL pinning). Past this bound the
    /// oldest WAL goes, and whoever still needed it reports `ERR_BACKUP_WAL_GAP`.
    pub wal_retention_mb: u64,
    /// Run the engine's compactions at the lowest CPU priority (RocksDB's
    /// `LowerThreadPoolCPUPriority`), so on a busy host they wait for the shard's writes and
    /// the barrier's messages instead of delaying them.
    pub low_priority_compactions: bool,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            clock: HlcClock::system(),
            wal_retention_mb: 1024,
            low_priority_compactions: false,
        }
    }
}

/// One file of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedFile {
    pub name: String,
    pub size: u64,
    pub kind: FileKind,
    /// Set for immutable files: equal identities mean equal contents.
    pub identity: Option<String>,
}

/// A consistent file set of a shard at an exact sequence number, held on local disk.
///
/// Dropping it deletes the capture directory and releases whatever the engine holds for it
/// (for RocksDB: re-enables file deletions), so a failed upload cleans up like a good one.
pub struct Capture {
    pub seq: Seq,
    pub dir: PathBuf,
    pub files: Vec<CapturedFile>,
    pub column_families: Vec<String>,
    hold: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("seq", &self.seq)
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .finish()
    }
}

impl Capture {
    pub(crate) fn new(
        seq: Seq,
        dir: PathBuf,
        files: Vec<CapturedFile>,
        column_families: Vec<String>,
        hold: Option<Box<dyn Send + Sync>>,
    ) -> Capture {
        Capture {
            seq,
            dir,
            files,
            column_families,
            hold,
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %err, "could not remove capture directory");
        }
        drop(self.hold.take());
    }
}

/// A shard's storage engine.
pub trait ShardEngine: Send + Sync + 'static {
    /// Opens (creating if needed) the shard in `dir` with at least the given column families.
    fn open_with(dir: &Path, column_families: &[String], config: &EngineConfig) -> Result<Self>
    where
        Self: Sized;

    /// `open_with` the default configuration (the system clock).
    fn open(dir: &Path, column_families: &[String]) -> Result<Self>
    where
        Self: Sized,
    {
        Self::open_with(dir, column_families, &EngineConfig::default())
    }

    /// `rocksdb` or `memory`, as recorded in manifests.
    fn kind(&self) -> &'static str;

    fn column_families(&self) -> Vec<String>;

    /// Applies a batch atomically, with the clock's HLC time in its WAL record, and returns
    /// the exact sequence numbers it consumed.
    fn write(&self, batch: &WriteBatch) -> Result<SeqRange>;

    /// The batches after `after`, in order, from the first one starting at `after + 1`, until
    /// about `max_bytes` of raw data (at least one batch). Empty when nothing was written
    /// after `after`. `ERR_BACKUP_WAL_GAP` when the WAL no longer reaches back to `after + 1`.
    fn wal_since(&self, after: Seq, max_bytes: usize) -> Result<Vec<WalBatch>>;

    /// Applies a batch from this shard's WAL history (raw, as `wal_since` returned it), which
    /// must start right after `latest_seq()`. It keeps its original HLC time.
    fn replay(&self, batch: &WalBatch) -> Result<SeqRange>;

    /// Bytes of WAL the engine holds, live and retained.
    fn wal_bytes(&self) -> Result<u64>;

    /// The clock that stamps this engine's writes.
    fn clock(&self) -> &HlcClock;

    /// Makes every applied write durable in the shard directory (RocksDB: fsync the WAL;
    /// the in-memory engine: write its snapshot), e.g. after a restore's replay.
    fn sync(&self) -> Result<()>;

    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Up to `limit` pairs with `start <= key < end` (no upper bound when `end` is `None`).
    fn scan(
        &self,
        cf: &str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// The sequence number of the last applied write.
    fn latest_seq(&self) -> Seq;

    /// Work that makes the next `capture` cheaper (RocksDB flushes its memtables so the WAL
    /// tail the checkpoint copies is small).
    fn prepare_capture(&self) -> Result<()>;

    /// Captures a consistent file set into `dir` (which must not exist), while writes may
    /// still flow: the capture holds exactly the writes up to its `seq`, and the WAL after
    /// `seq` stays readable by `wal_since` until the capture is dropped.
    fn capture(&self, dir: &Path) -> Result<Capture>;

    /// Removes the column families `drop`, with everything in them, from the shard in `dir`,
    /// which no engine has open (a selective restore's staged shard). The default family
    /// cannot be dropped: see `clear_column_family`.
    fn drop_column_families(dir: &Path, drop: &[String]) -> Result<()>
    where
        Self: Sized;

    /// Deletes every key of `cf` without a write: no sequence number is consumed, so a
    /// restored shard stays at its target (the default family of a selective restore, which
    /// cannot be dropped).
    fn clear_column_family(&self, cf: &str) -> Result<()>;
}

pub(crate) fn unknown_cf(cf: &str) -> Error {
    Error::new(
        ErrorCode::InvalidArgument,
        format!("column family {cf:?} does not exist in this shard"),
    )
}

/// How much of a table file's end its identity hashes: RocksDB writes the table properties
/// (among them the session id of the DB that wrote the file, its original file number and
/// creation time: what RocksDB's unique SST id is made of) just before the meta-index block
/// and the footer, the last few KiB of the file.
const IDENTITY_TAIL_BYTES: u64 = 64 << 10;

/// The identity of a table file: `incarnation/name/size/tail`, `tail` the first 128 bits of
/// the SHA-256 of its last [`IDENTITY_TAIL_BYTES`]. The name is unique within one DB and the
/// incarnation across restores; the tail tells apart two files of the same name written by
/// two sessions of one DB (a machine rolled back to a snapshot reuses file numbers).
fn table_identity(
    path: &Path,
    incarnation: &str,
    name: &str,
    size: u64,
) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let from = size.saturating_sub(IDENTITY_TAIL_BYTES);
    file.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::with_capacity((size - from) as usize);
    file.take(size - from).read_to_end(&mut tail)?;
    let digest = sha2::Sha256::digest(&tail);
    Ok(format!(
        "{incarnation}/{name}/{size}/{}",
        hex::encode(&digest[..16])
    ))
}

/// Lists a capture directory: every regular file with its size and kind. Immutable table
/// files get an identity ([`table_identity`]).
pub(crate) fn list_capture(dir: &Path, incarnation: Option<&str>) -> Result<Vec<CapturedFile>> {
    let io = |err| {
        Error::io(
            ErrorCode::BackupCreationFailed,
            format!("list capture {}", dir.display()),
            err,
        )
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let meta = entry.metadata().map_err(io)?;
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = if name.ends_with(".sst") {
            FileKind::Sst
        } else if name.ends_with(".log") {
            FileKind::Wal
        } else {
            FileKind::Meta
        };
        let identity = match (kind, incarnation) {
            (FileKind::Sst, Some(incarnation)) => {
                Some(table_identity(&entry.path(), incarnation, &name, meta.len()).map_err(io)?)
            }
            _ => None,
        };
        files.push(CapturedFile {
            name,
            size: meta.len(),
            kind,
            identity,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_file_of_the_same_name_and_size_from_another_session_gets_another_identity() {
        // The same file number and size in one incarnation, written twice: before a machine
        // was rolled back to a snapshot and after. Only the properties near the end differ.
        let (a, b, c) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let mut before = vec![7u8; 200_000];
        before[199_000..199_020].copy_from_slice(b"session-AAAAAAAAAAAA");
        let mut after = before.clone();
        after[199_000..199_020].copy_from_slice(b"session-BBBBBBBBBBBB");
        std::fs::write(a.path().join("000009.sst"), &before).expect("write");
        std::fs::write(b.path().join("000009.sst"), &after).expect("write");
        std::fs::write(c.path().join("000009.sst"), &before).expect("write");
        let identity = |dir: &Path| {
            list_capture(dir, Some("incarnation-1")).expect("list")[0]
                .identity
                .clone()
                .expect("an identity")
        };
        assert_ne!(identity(a.path()), identity(b.path()));
        assert_eq!(
            identity(a.path()),
            identity(c.path()),
            "equal bytes, equal identity"
        );
        assert!(identity(a.path()).starts_with("incarnation-1/000009.sst/200000/"));
        // Small files are hashed whole.
        std::fs::write(a.path().join("000010.sst"), b"tiny").expect("write");
        std::fs::write(b.path().join("000010.sst"), b"tinY").expect("write");
        let small = |dir: &Path| {
            list_capture(dir, Some("i")).expect("list")[1]
                .identity
                .clone()
        };
        assert_ne!(small(a.path()), small(b.path()));
    }

    fn engine_named(name: &str) -> Result<&'static str> {
        with_engine!(name, |E| Ok(std::any::type_name::<E>()))
    }

    #[test]
    fn engines_are_picked_by_their_kind_and_a_missing_one_is_a_clear_error() {
        assert_eq!(
            engine_named("memory").expect("memory"),
            std::any::type_name::<MemEngine>()
        );
        let unknown = engine_named("leveldb").expect_err("no such engine");
        assert_eq!(unknown.code, ErrorCode::BackupManifestCorrupt);
        let rocksdb = engine_named("rocksdb");
        #[cfg(feature = "rocksdb")]
        assert_eq!(
            rocksdb.expect("rocksdb"),
            std::any::type_name::<RocksEngine>()
        );
        #[cfg(not(feature = "rocksdb"))]
        {
            let err = rocksdb.expect_err("built without RocksDB");
            assert_eq!(err.code, ErrorCode::InvalidArgument);
            assert!(err.message.contains("`rocksdb` feature"), "{err}");
        }
    }
}
