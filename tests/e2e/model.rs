//! A model of a shard's contents, and a seeded workload that writes to a shard and the model.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use lockstep_agent::backup::BackupOptions;
use lockstep_agent::engine::{Op, RocksEngine, ShardEngine, WriteBatch};
use lockstep_agent::restore::restore_shard;
use lockstep_repository::transfer::{Progress, TransferOptions};
use lockstep_repository::{BackupId, Repository, Seq, ShardId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const CFS: [&str; 3] = ["default", "users", "events"];

pub type Model = BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

pub fn cfs() -> Vec<String> {
    CFS.iter().map(|s| s.to_string()).collect()
}

/// A RocksDB shard with its model.
pub struct Shard {
    pub engine: Arc<RocksEngine>,
    pub model: Model,
    rng: StdRng,
}

impl Shard {
    pub fn open(dir: &Path, seed: u64) -> Shard {
        let engine = Arc::new(RocksEngine::open(dir, &cfs()).expect("open shard"));
        Shard {
            engine,
            model: Model::new(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn write(&mut self, batch: &WriteBatch) {
        self.engine.write(batch).expect("write");
        for op in &batch.ops {
            match op {
                Op::Put { cf, key, value } => {
                    self.model
                        .entry(cf.clone())
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                Op::Delete { cf, key } => {
                    self.model.entry(cf.clone()).or_default().remove(key);
                }
                Op::DeleteRange { cf, start, end } => {
                    self.model
                        .entry(cf.clone())
                        .or_default()
                        .retain(|k, _| k < start || k >= end);
                }
            }
        }
    }

    /// Writes `n_keys` puts spread over the column families, then overwrites, point deletes
    /// and range deletes among keys `0..key_space`.
    pub fn workload(&mut self, n_keys: u64, key_space: u64) {
        let mut written = 0;
        while written < n_keys {
            let mut batch = WriteBatch::new();
            for _ in 0..500 {
                let cf = CFS[self.rng.random_range(0..CFS.len())];
                let key = format!("k{:08}", self.rng.random_range(0..key_space));
                match self.rng.random_range(0..100) {
                    0 => {
                        let len = self.rng.random_range(1..50u64);
                        let start = self.rng.random_range(0..key_space);
                        batch.delete_range(
                            cf,
                            format!("k{start:08}"),
                            format!("k{:08}", start + len),
                        );
                    }
                    1..=5 => {
                        batch.delete(cf, key);
                    }
                    _ => {
                        let mut value = vec![0u8; self.rng.random_range(20..200)];
                        self.rng.fill(&mut value[..]);
                        batch.put(cf, key, value);
                    }
                }
                written += 1;
            }
            self.write(&batch);
        }
    }

    pub fn options(&self, capture_root: &Path) -> BackupOptions {
        BackupOptions {
            capture_root: capture_root.to_path_buf(),
            transfer: TransferOptions {
                chunk_size: 256 * 1024,
                ..Default::default()
            },
            min_free_bytes: 0,
        }
    }
}

/// Fails with the first key where `engine` and `model` differ.
/// Restores `shard` of `backup` into `target` with the agent's own restore and checks it is
/// exactly `model`, at sequence number `seq`.
pub async fn restore_exactly(
    repo: &Repository,
    (backup, shard): (&BackupId, &ShardId),
    target: &Path,
    (seq, model): (Seq, &Model),
    what: &str,
) {
    let outcome = restore_shard(
        repo,
        backup,
        shard,
        target,
        &[],
        TransferOptions::default(),
        &Progress::default(),
    )
    .await
    .expect("restore");
    assert_eq!(outcome.seq, seq, "{what}: restored sequence number");
    let restored = RocksEngine::open(target, &[]).expect("open restored");
    assert_eq!(restored.latest_seq(), seq, "{what}: opened sequence number");
    assert_same(&restored, model, what);
}

pub fn assert_same(engine: &impl ShardEngine, model: &Model, what: &str) {
    for cf in CFS {
        let actual = engine.scan(cf, b"", None, usize::MAX).expect("scan");
        let expected: Vec<(Vec<u8>, Vec<u8>)> = model
            .get(cf)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (i, (a, e)) in actual.iter().zip(expected.iter()).enumerate() {
            assert!(
                a == e,
                "{what}: column family {cf} differs at entry {i}: restored key {:?}, expected key {:?}",
                String::from_utf8_lossy(&a.0),
                String::from_utf8_lossy(&e.0)
            );
        }
        assert_eq!(
            actual.len(),
            expected.len(),
            "{what}: column family {cf} has a different number of keys"
        );
    }
}
