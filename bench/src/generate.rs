//! Deterministic shards: 1000-byte values, a third compressible text, a third half random, a
//! third random, written with the WAL off, flushed and compacted, so both contenders start
//! from the same steady-state files.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use lockstep_agent::splitmix::SplitMix;
use rocksdb::{DB, DBCompressionType, Options, WriteBatch, WriteOptions};

pub const VALUE_SIZE: usize = 1000;
const BATCH: u64 = 1000;

/// RocksDB options for a benchmark shard.
pub fn options(compressed: bool) -> Options {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.set_compression_type(if compressed {
        DBCompressionType::Lz4
    } else {
        DBCompressionType::None
    });
    options.set_write_buffer_size(64 << 20);
    options.set_max_background_jobs(2);
    options
}

fn value(key: u64, rng: &mut SplitMix) -> Vec<u8> {
    let random = match key % 3 {
        0 => 0,
        1 => VALUE_SIZE / 2,
        _ => VALUE_SIZE,
    };
    let mut value: Vec<u8> = format!("value of key {key:012} ")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(VALUE_SIZE)
        .collect();
    rng.fill(&mut value[..random]);
    value
}

/// What writing a shard cost (generation included, so not a pure RocksDB write rate).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Generated {
    pub keys: u64,
    pub batches: u64,
    pub write_secs: f64,
}

/// Writes `keys` keys starting at `first` (overwriting what is there) into the shard at `db`.
pub fn write(db: &Path, compressed: bool, first: u64, keys: u64, seed: u64) -> Result<Generated> {
    let handle =
        DB::open(&options(compressed), db).with_context(|| format!("open {}", db.display()))?;
    let mut write_options = WriteOptions::default();
    write_options.disable_wal(true);
    let mut rng = SplitMix(seed);
    let started = Instant::now();
    let mut batches = 0;
    let mut key = first;
    while key < first + keys {
        let mut batch = WriteBatch::default();
        for k in key..(key + BATCH).min(first + keys) {
            batch.put(format!("key{k:012}"), value(k, &mut rng));
        }
        handle.write_opt(batch, &write_options).context("write")?;
        batches += 1;
        key += BATCH;
    }
    let write_secs = started.elapsed().as_secs_f64();
    handle.flush().context("flush")?;
    Ok(Generated {
        keys,
        batches,
        write_secs,
    })
}

/// A new shard of `mib` MiB of values, fully compacted.
pub fn shard(db: &Path, compressed: bool, mib: u64) -> Result<Generated> {
    let keys = mib * 1024 * 1024 / VALUE_SIZE as u64;
    let generated = write(db, compressed, 0, keys, 1)?;
    let handle =
        DB::open(&options(compressed), db).with_context(|| format!("open {}", db.display()))?;
    handle.compact_range::<&[u8], &[u8]>(None, None);
    Ok(generated)
}
