//! `MemEngine`: the in-memory model of a shard, for simulations and fast tests.
//!
//! It follows the `ShardEngine` contract exactly (sequence numbers, range deletes, column
//! families), which the conformance suite checks. Its capture is one snapshot file,
//! `MEMSHARD`, which `open` reads back, so backup and restore run the same paths as RocksDB.
//! Like RocksDB it outlives its process: every batch is appended to its log, `MEMWAL`,
//! before it applies, and `open` reads the snapshot and then the log, so a shard reopened
//! after a crash or a close holds every write and the WAL it kept (the simulations crash
//! agents and swap shard directories under them).
//!
//! Snapshot format: `LKSMEM01`, seq (u64 LE), number of column families (u32 LE), then per
//! family its name and entries, every byte string as a u32 LE length and the bytes, and a
//! trailing SHA-256 of everything before it.
//!
//! Its WAL is a queue of batches in memory, each encoded as its operations (tag 1 put,
//! 2 delete, 3 range delete; then column family, key, and value or range end, as length and
//! bytes), holding up to `EngineConfig::wal_retention_mb`; older batches are dropped, as
//! RocksDB drops archived WAL. A shard restored from a capture starts with an empty WAL (one
//! that replayed WAL onto it keeps the replayed batches, as RocksDB does). The log grows
//! with every write until the next `sync` rewrites it as the WAL kept.
//!
//! Log format: records of first seq, count, HLC time (u64 LE each), the batch's length
//! (u32 LE) and bytes, and a SHA-256 of the record; a torn last record is ignored, as
//! RocksDB tolerates a torn WAL tail. `sync` writes the snapshot and then rewrites the log
//! as the WAL the shard keeps; `open` applies the records after the snapshot's sequence
//! number and keeps the earlier ones as WAL.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use lockstep_repository::wal::check_continuity;
use lockstep_repository::{Error, ErrorCode, Result, Seq};
use sha2::{Digest, Sha256};

use super::{
    Capture, EngineConfig, Op, SeqRange, ShardEngine, WalBatch, WriteBatch, list_capture,
    unknown_cf,
};
use crate::hlc::HlcClock;

const SNAPSHOT_FILE: &str = "MEMSHARD";
const LOG_FILE: &str = "MEMWAL";
const MAGIC: &[u8; 8] = b"LKSMEM01";

#[derive(Default)]
struct State {
    seq: u64,
    families: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    wal: VecDeque<WalBatch>,
    wal_bytes: u64,
    /// Sequence numbers of live captures (with a count each): the WAL after the lowest is
    /// kept whatever the retention, as RocksDB keeps it while file deletions are disabled.
    pins: BTreeMap<u64, usize>,
    /// The log, open for appending once the first batch is written.
    log_file: Option<std::fs::File>,
    /// A failed append left a part of a record the log could not cut off.
    log_damaged: bool,
}

impl State {
    /// Applies one batch's operations, consuming one sequence number each.
    fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            self.seq += 1;
            match op {
                Op::Put { cf, key, value } => {
                    self.families
                        .entry(cf.clone())
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                Op::Delete { cf, key } => {
                    self.families.entry(cf.clone()).or_default().remove(key);
                }
                Op::DeleteRange { cf, start, end } => {
                    if start < end {
                        let family = self.families.entry(cf.clone()).or_default();
                        let doomed: Vec<Vec<u8>> = family
                            .range(start.clone()..end.clone())
                            .map(|(k, _)| k.clone())
                            .collect();
                        for key in doomed {
                            family.remove(&key);
                        }
                    }
                }
            }
        }
    }

    fn check_families(&self, ops: &[Op]) -> Result<()> {
        for op in ops {
            if !self.families.contains_key(op.cf()) {
                return Err(unknown_cf(op.cf()));
            }
        }
        Ok(())
    }

    fn log(&mut self, batch: WalBatch, retention: u64) {
        self.wal_bytes += batch.data.len() as u64;
        self.wal.push_back(batch);
        let pinned = self.pins.keys().next().copied().unwrap_or(u64::MAX);
        while self.wal_bytes > retention
            && self.wal.len() > 1
            && self.wal.front().is_some_and(|b| b.last().0 <= pinned)
        {
            if let Some(dropped) = self.wal.pop_front() {
                self.wal_bytes -= dropped.data.len() as u64;
            }
        }
    }
}

/// Keeps the WAL after a capture's sequence number until dropped.
struct WalPin {
    state: Arc<Mutex<State>>,
    seq: u64,
}

impl Drop for WalPin {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = state.pins.get_mut(&self.seq) {
            *count -= 1;
            if *count == 0 {
                state.pins.remove(&self.seq);
            }
        }
    }
}

/// An in-memory shard.
pub struct MemEngine {
    state: Arc<Mutex<State>>,
    dir: std::path::PathBuf,
    clock: HlcClock,
    wal_retention_bytes: u64,
}

fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        let (tag, cf, a, b) = match op {
            Op::Put { cf, key, value } => (1u8, cf, key, Some(value)),
            Op::Delete { cf, key } => (2, cf, key, None),
            Op::DeleteRange { cf, start, end } => (3, cf, start, Some(end)),
        };
        out.push(tag);
        put_bytes(&mut out, cf.as_bytes());
        put_bytes(&mut out, a);
        if let Some(b) = b {
            put_bytes(&mut out, b);
        }
    }
    out
}

fn decode_ops(data: &[u8]) -> Option<Vec<Op>> {
    let mut reader = Reader { bytes: data };
    let mut ops = Vec::new();
    while !reader.bytes.is_empty() {
        let tag = reader.take(1)?[0];
        let cf = String::from_utf8(reader.bytes()?).ok()?;
        let a = reader.bytes()?;
        ops.push(match tag {
            1 => Op::Put {
                cf,
                key: a,
                value: reader.bytes()?,
            },
            2 => Op::Delete { cf, key: a },
            3 => Op::DeleteRange {
                cf,
                start: a,
                end: reader.bytes()?,
            },
            _ => return None,
        });
    }
    Some(ops)
}

impl MemEngine {
    /// Drops the WAL before `seq`, as if it had been deleted behind the agent's back (tests
    /// of gap detection).
    pub fn forget_wal_before(&self, seq: Seq) {
        let mut state = self.state();
        while state.wal.front().is_some_and(|b| b.first < seq) {
            if let Some(dropped) = state.wal.pop_front() {
                state.wal_bytes -= dropped.data.len() as u64;
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends `batch` to the log (before it applies: a batch the log lacks never applied).
    fn append_log(&self, state: &mut State, batch: &WalBatch) -> Result<()> {
        use std::io::Write;
        let io = |err| {
            Error::io(
                ErrorCode::ShardEngineFailed,
                format!("append to {}", self.dir.join(LOG_FILE).display()),
                err,
            )
        };
        if state.log_damaged {
            return Err(Error::new(
                ErrorCode::ShardEngineFailed,
                format!(
                    "{} holds a part of a failed write; reopen the shard",
                    self.dir.join(LOG_FILE).display()
                ),
            ));
        }
        if state.log_file.is_none() {
            std::fs::create_dir_all(&self.dir).map_err(io)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(LOG_FILE))
                .map_err(io)?;
            state.log_file = Some(file);
        }
        let mut record = Vec::with_capacity(batch.data.len() + 60);
        encode_log_record(&mut record, batch);
        let Some(file) = state.log_file.as_mut() else {
            return Ok(());
        };
        let before = file.metadata().map_err(io)?.len();
        if let Err(err) = file.write_all(&record) {
            // A part of the record may be there: cut it off, or later records would follow
            // a damaged one and be lost at the next open. If that fails too, the log is
            // not appended to again (`open` reopens it).
            if file.set_len(before).is_err() {
                state.log_file = None;
                state.log_damaged = true;
            }
            return Err(io(err));
        }
        Ok(())
    }
}

fn encode_log_record(out: &mut Vec<u8>, batch: &WalBatch) {
    let start = out.len();
    out.extend_from_slice(&batch.first.0.to_le_bytes());
    out.extend_from_slice(&batch.count.to_le_bytes());
    out.extend_from_slice(&batch.hlc.0.to_le_bytes());
    put_bytes(out, &batch.data);
    let digest = Sha256::digest(&out[start..]);
    out.extend_from_slice(&digest);
}

/// The log's records up to the first that is torn or damaged, and the length they take.
fn decode_log(bytes: &[u8]) -> (Vec<WalBatch>, usize) {
    let mut reader = Reader { bytes };
    let mut batches = Vec::new();
    loop {
        let before = reader.bytes;
        let Some(batch) = (|| {
            let first = reader.u64()?;
            let count = reader.u64()?;
            let hlc = reader.u64()?;
            let data = reader.bytes()?;
            let body = &before[..before.len() - reader.bytes.len()];
            let digest = reader.take(32)?;
            (Sha256::digest(body).as_slice() == digest).then_some(WalBatch {
                first: Seq(first),
                count,
                hlc: lockstep_repository::HlcTime(hlc),
                data,
            })
        })() else {
            return (batches, bytes.len() - before.len());
        };
        batches.push(batch);
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn encode_snapshot(state: &State) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&state.seq.to_le_bytes());
    out.extend_from_slice(&(state.families.len() as u32).to_le_bytes());
    for (name, entries) in &state.families {
        put_bytes(&mut out, name.as_bytes());
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (key, value) in entries {
            put_bytes(&mut out, key);
            put_bytes(&mut out, value);
        }
    }
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = self.u32()? as usize;
        self.take(len).map(<[u8]>::to_vec)
    }
}

fn decode_snapshot(bytes: &[u8]) -> Option<State> {
    if bytes.len() < MAGIC.len() + 32 {
        return None;
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return None;
    }
    let mut reader = Reader { bytes: body };
    if reader.take(MAGIC.len())? != MAGIC {
        return None;
    }
    let seq = reader.u64()?;
    let n_families = reader.u32()?;
    let mut families = BTreeMap::new();
    for _ in 0..n_families {
        let name = String::from_utf8(reader.bytes()?).ok()?;
        let n_entries = reader.u64()?;
        let mut entries = BTreeMap::new();
        for _ in 0..n_entries {
            let key = reader.bytes()?;
            entries.insert(key, reader.bytes()?);
        }
        families.insert(name, entries);
    }
    reader.bytes.is_empty().then_some(State {
        seq,
        families,
        ..State::default()
    })
}

impl ShardEngine for MemEngine {
    /// Opens an empty shard, or the one whose snapshot `dir` holds (a restored capture).
    fn open_with(
        dir: &Path,
        column_families: &[String],
        config: &EngineConfig,
    ) -> Result<MemEngine> {
        let path = dir.join(SNAPSHOT_FILE);
        let mut state = match std::fs::read(&path) {
            Ok(bytes) => decode_snapshot(&bytes).ok_or_else(|| {
                Error::new(
                    ErrorCode::ShardEngineFailed,
                    format!("snapshot {} is corrupt", path.display()),
                )
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(err) => {
                return Err(Error::io(
                    ErrorCode::ShardEngineFailed,
                    format!("read {}", path.display()),
                    err,
                ));
            }
        };
        for cf in
            std::iter::once(super::DEFAULT_CF).chain(column_families.iter().map(String::as_str))
        {
            state.families.entry(cf.to_string()).or_default();
        }
        let wal_retention_bytes = config.wal_retention_mb.max(1) << 20;
        let log = dir.join(LOG_FILE);
        let log_io = |err| {
            Error::io(
                ErrorCode::ShardEngineFailed,
                format!("read {}", log.display()),
                err,
            )
        };
        let logged = match std::fs::read(&log) {
            Ok(bytes) => {
                let (batches, valid) = decode_log(&bytes);
                if valid < bytes.len() {
                    // A torn or damaged record: cut it off with what follows, so the next
                    // record appends after the last good one.
                    tracing::warn!(
                        log = %log.display(),
                        kept = valid,
                        dropped = bytes.len() - valid,
                        "the in-memory shard's log ends in a torn or damaged record; cutting it off"
                    );
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&log)
                        .and_then(|file| file.set_len(valid as u64))
                        .map_err(log_io)?;
                }
                batches
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(log_io(err)),
        };
        for batch in logged {
            if batch.last().0 <= state.seq {
                // In the snapshot already: WAL only, if it continues what is kept.
                if state.wal.back().is_some_and(|b| b.next() != batch.first) {
                    state.wal.clear();
                    state.wal_bytes = 0;
                }
                config.clock.observe(batch.hlc);
                state.log(batch, wal_retention_bytes);
                continue;
            }
            let ops = decode_ops(&batch.data)
                .filter(|ops| ops.len() as u64 == batch.count && batch.first.0 == state.seq + 1)
                .ok_or_else(|| {
                    Error::new(
                        ErrorCode::ShardEngineFailed,
                        format!(
                            "{}: batch {}..={} does not follow sequence number {}",
                            log.display(),
                            batch.first,
                            batch.last(),
                            state.seq
                        ),
                    )
                })?;
            state.apply(&ops);
            config.clock.observe(batch.hlc);
            state.log(batch, wal_retention_bytes);
        }
        Ok(MemEngine {
            state: Arc::new(Mutex::new(state)),
            dir: dir.to_path_buf(),
            clock: config.clock.clone(),
            wal_retention_bytes,
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn column_families(&self) -> Vec<String> {
        self.state().families.keys().cloned().collect()
    }

    fn write(&self, batch: &WriteBatch) -> Result<SeqRange> {
        let original = batch;
        let batch = original.checked()?;
        let mut state = self.state();
        // Check every family first (those of what `checked` left out too), so a failing
        // batch applies nothing.
        state.check_families(&original.ops)?;
        let first = state.seq + 1;
        if batch.is_empty() {
            return Ok(SeqRange {
                first: Seq(first),
                last: Seq(state.seq),
                hlc: self.clock.last(),
            });
        }
        let hlc = self.clock.now();
        let record = WalBatch {
            first: Seq(first),
            count: batch.len() as u64,
            hlc,
            data: encode_ops(&batch.ops),
        };
        self.append_log(&mut state, &record)?;
        state.apply(&batch.ops);
        state.log(record, self.wal_retention_bytes);
        Ok(SeqRange {
            first: Seq(first),
            last: Seq(state.seq),
            hlc,
        })
    }

    fn wal_since(&self, after: Seq, max_bytes: usize) -> Result<Vec<WalBatch>> {
        let state = self.state();
        if after.0 >= state.seq {
            return Ok(Vec::new());
        }
        let start = state.wal.partition_point(|b| b.first <= after);
        let mut batches = Vec::new();
        let mut bytes = 0;
        for batch in state.wal.range(start..) {
            bytes += batch.data.len();
            batches.push(batch.clone());
            if bytes >= max_bytes {
                break;
            }
        }
        let expected = Seq(after.0 + 1);
        if batches.is_empty() {
            return Err(lockstep_repository::wal::gap(
                "the in-memory shard",
                expected,
                Seq(state.seq + 1),
            ));
        }
        check_continuity("the in-memory shard", expected, &batches)?;
        Ok(batches)
    }

    fn replay(&self, batch: &WalBatch) -> Result<SeqRange> {
        let ops = decode_ops(&batch.data)
            .filter(|ops| ops.len() as u64 == batch.count)
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::BackupWalArchiveFailed,
                    format!(
                        "batch {}..={} is not an in-memory shard batch",
                        batch.first,
                        batch.last()
                    ),
                )
            })?;
        let mut state = self.state();
        check_continuity(
            "the in-memory shard",
            Seq(state.seq + 1),
            std::slice::from_ref(batch),
        )?;
        state.check_families(&ops)?;
        self.append_log(&mut state, batch)?;
        state.apply(&ops);
        state.log(batch.clone(), self.wal_retention_bytes);
        self.clock.observe(batch.hlc);
        Ok(SeqRange {
            first: batch.first,
            last: Seq(state.seq),
            hlc: batch.hlc,
        })
    }

    fn clock(&self) -> &HlcClock {
        &self.clock
    }

    /// Writes the snapshot, then rewrites the log as the WAL kept (a crash between the two
    /// leaves a log whose records the snapshot holds already).
    fn sync(&self) -> Result<()> {
        let mut state = self.state();
        let snapshot = encode_snapshot(&state);
        let mut log = Vec::new();
        for batch in &state.wal {
            encode_log_record(&mut log, batch);
        }
        let io = |err| {
            Error::io(
                ErrorCode::ShardEngineFailed,
                format!("write snapshot in {}", self.dir.display()),
                err,
            )
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        for (name, bytes) in [(SNAPSHOT_FILE, snapshot), (LOG_FILE, log)] {
            let temp = self.dir.join(format!("{name}.tmp"));
            std::fs::write(&temp, bytes).map_err(io)?;
            std::fs::rename(&temp, self.dir.join(name)).map_err(io)?;
        }
        state.log_file = None;
        Ok(())
    }

    fn wal_bytes(&self) -> Result<u64> {
        Ok(self.state().wal_bytes)
    }

    fn drop_column_families(dir: &Path, drop: &[String]) -> Result<()> {
        let engine = MemEngine::open(dir, &[])?;
        {
            let mut state = engine.state();
            for cf in drop.iter().filter(|cf| cf.as_str() != super::DEFAULT_CF) {
                state.families.remove(cf);
            }
        }
        engine.sync()
    }

    fn clear_column_family(&self, cf: &str) -> Result<()> {
        self.state()
            .families
            .get_mut(cf)
            .ok_or_else(|| unknown_cf(cf))?
            .clear();
        self.sync()
    }

    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let state = self.state();
        let family = state.families.get(cf).ok_or_else(|| unknown_cf(cf))?;
        Ok(family.get(key).cloned())
    }

    fn scan(
        &self,
        cf: &str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let state = self.state();
        let family = state.families.get(cf).ok_or_else(|| unknown_cf(cf))?;
        Ok(family
            .range(start.to_vec()..)
            .take_while(|(key, _)| end.is_none_or(|end| key.as_slice() < end))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn latest_seq(&self) -> Seq {
        Seq(self.state().seq)
    }

    fn prepare_capture(&self) -> Result<()> {
        Ok(())
    }

    fn capture(&self, dir: &Path) -> Result<Capture> {
        let (seq, snapshot, families) = {
            let mut state = self.state();
            let at = state.seq;
            *state.pins.entry(at).or_default() += 1;
            (
                Seq(state.seq),
                encode_snapshot(&state),
                state.families.keys().cloned().collect(),
            )
        };
        let pin = WalPin {
            state: self.state.clone(),
            seq: seq.0,
        };
        let io = |err| {
            Error::io(
                ErrorCode::BackupCreationFailed,
                format!("write capture {}", dir.display()),
                err,
            )
        };
        std::fs::create_dir(dir).map_err(io)?;
        std::fs::write(dir.join(SNAPSHOT_FILE), snapshot).map_err(io)?;
        let files = list_capture(dir, None)?;
        Ok(Capture::new(
            seq,
            dir.to_path_buf(),
            files,
            families,
            Some(Box::new(pin)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(engine: &MemEngine, key: &str) -> SeqRange {
        let mut batch = WriteBatch::new();
        batch.put("default", key, "v");
        engine.write(&batch).expect("write")
    }

    /// A shard in `dir` with three single-put batches, closed unsynced: its directory, its
    /// log's path and the log's bytes.
    fn three_puts(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
        let live = dir.join("live");
        let engine = MemEngine::open(&live, &[]).expect("open");
        for key in ["a", "b", "c"] {
            put(&engine, key);
        }
        let log = live.join(LOG_FILE);
        let bytes = std::fs::read(&log).expect("read the log");
        (live, log, bytes)
    }

    #[test]
    fn a_torn_log_tail_is_cut_off_and_the_log_goes_on_after_the_last_good_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (live, log, mut bytes) = three_puts(dir.path());
        let whole = bytes.len();
        bytes.extend_from_slice(&[7; 20]);
        std::fs::write(&log, &bytes).expect("tear the log");
        {
            let engine = MemEngine::open(&live, &[]).expect("reopen a torn log");
            assert_eq!(engine.latest_seq(), Seq(3));
            assert_eq!(std::fs::metadata(&log).expect("log").len(), whole as u64);
            assert_eq!(put(&engine, "d").first, Seq(4));
        }
        let engine = MemEngine::open(&live, &[]).expect("reopen");
        assert_eq!(engine.latest_seq(), Seq(4));
        assert!(engine.get("default", b"d").expect("get").is_some());
    }

    #[test]
    fn a_damaged_log_record_in_the_middle_stops_the_replay_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (live, log, mut bytes) = three_puts(dir.path());
        let second = bytes.len() / 3 + 30;
        bytes[second] ^= 1;
        std::fs::write(&log, &bytes).expect("damage the log");
        let engine = MemEngine::open(&live, &[]).expect("reopen");
        assert_eq!(
            engine.latest_seq(),
            Seq(1),
            "only the record before the damage"
        );
    }
}
