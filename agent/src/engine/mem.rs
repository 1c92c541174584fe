//! `MemEngine`: the in-memory model of a shard, for simulations and fast tests.
//!
//! It follows the `ShardEngine` contract exactly (sequence numbers, range deletes, column
//! families), which the conformance suite checks. Its capture is one snapshot file,
//! `MEMSHARD`, which `open` reads back, so backup and restore run the same paths as RocksDB.
//!
//! Snapshot format: `LKSMEM01`, seq (u64 LE), number of column families (u32 LE), then per
//! family its name and entries, every byte string as a u32 LE length and the bytes, and a
//! trailing SHA-256 of everything before it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use lockstep_repository::{Error, ErrorCode, Result, Seq};
use sha2::{Digest, Sha256};

use super::{Capture, Op, SeqRange, ShardEngine, WriteBatch, list_capture, unknown_cf};

const SNAPSHOT_FILE: &str = "MEMSHARD";
const MAGIC: &[u8; 8] = b"LKSMEM01";

#[derive(Default)]
struct State {
    seq: u64,
    families: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
}

/// An in-memory shard.
pub struct MemEngine {
    state: Mutex<State>,
}

impl MemEngine {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    reader.bytes.is_empty().then_some(State { seq, families })
}

impl ShardEngine for MemEngine {
    /// Opens an empty shard, or the one whose snapshot `dir` holds (a restored capture).
    fn open(dir: &Path, column_families: &[String]) -> Result<MemEngine> {
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
        Ok(MemEngine {
            state: Mutex::new(state),
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn column_families(&self) -> Vec<String> {
        self.state().families.keys().cloned().collect()
    }

    fn write(&self, batch: &WriteBatch) -> Result<SeqRange> {
        batch.validate()?;
        let mut state = self.state();
        // Check every family first, so a failing batch applies nothing.
        for op in &batch.ops {
            let (Op::Put { cf, .. } | Op::Delete { cf, .. } | Op::DeleteRange { cf, .. }) = op;
            if !state.families.contains_key(cf) {
                return Err(unknown_cf(cf));
            }
        }
        let first = state.seq + 1;
        for op in &batch.ops {
            state.seq += 1;
            match op {
                Op::Put { cf, key, value } => {
                    state
                        .families
                        .entry(cf.clone())
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                Op::Delete { cf, key } => {
                    state.families.entry(cf.clone()).or_default().remove(key);
                }
                Op::DeleteRange { cf, start, end } => {
                    if start < end {
                        let family = state.families.entry(cf.clone()).or_default();
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
        Ok(SeqRange {
            first: Seq(first),
            last: Seq(state.seq),
        })
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
            let state = self.state();
            (
                Seq(state.seq),
                encode_snapshot(&state),
                state.families.keys().cloned().collect(),
            )
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
        Ok(Capture::new(seq, dir.to_path_buf(), files, families, None))
    }
}
