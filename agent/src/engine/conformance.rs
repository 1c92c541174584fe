//! The `ShardEngine` conformance suite, run against every engine by `conformance_suite!`.
//!
//! Each case takes a fresh directory and the engine type; the model (`Model`) is a plain
//! `BTreeMap` per column family that every engine must agree with key by key.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use lockstep_repository::Seq;
use rand::{Rng, SeedableRng};

use super::{EngineConfig, Op, ShardEngine, WalBatch, WriteBatch};
use crate::hlc::HlcClock;

type Model = BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

fn cfs() -> Vec<String> {
    vec!["default".into(), "meta".into(), "events".into()]
}

fn apply(model: &mut Model, batch: &WriteBatch) {
    for op in &batch.ops {
        match op {
            Op::Put { cf, key, value } => {
                model
                    .entry(cf.clone())
                    .or_default()
                    .insert(key.clone(), value.clone());
            }
            Op::Delete { cf, key } => {
                model.entry(cf.clone()).or_default().remove(key);
            }
            Op::DeleteRange { cf, start, end } => {
                if start < end {
                    model
                        .entry(cf.clone())
                        .or_default()
                        .retain(|k, _| k < start || k >= end);
                }
            }
        }
    }
}

fn assert_matches<E: ShardEngine>(engine: &E, model: &Model) {
    for cf in cfs() {
        let actual: BTreeMap<Vec<u8>, Vec<u8>> = engine
            .scan(&cf, b"", None, usize::MAX)
            .expect("scan")
            .into_iter()
            .collect();
        let expected = model.get(&cf).cloned().unwrap_or_default();
        assert_eq!(actual.len(), expected.len(), "key count differs in {cf}");
        assert!(actual == expected, "contents differ in {cf}");
    }
}

fn random_batch(rng: &mut rand::rngs::StdRng, n_ops: usize) -> WriteBatch {
    let mut batch = WriteBatch::new();
    let families = cfs();
    for _ in 0..n_ops {
        let cf = &families[rng.random_range(0..families.len())];
        let key = format!("k{:05}", rng.random_range(0..2000u32)).into_bytes();
        match rng.random_range(0..20) {
            0 => {
                let start = rng.random_range(0..2000u32);
                let end = start + rng.random_range(0..40u32);
                batch.delete_range(cf, format!("k{start:05}"), format!("k{end:05}"));
            }
            1..=4 => {
                batch.delete(cf, key);
            }
            _ => {
                let value = vec![rng.random::<u8>(); rng.random_range(0..64)];
                batch.put(cf, key, value);
            }
        }
    }
    batch
}

pub fn sequence_ranges_are_exact<E: ShardEngine>(dir: &Path) {
    let engine = E::open(dir, &cfs()).expect("open");
    let start = engine.latest_seq();
    let mut batch = WriteBatch::new();
    batch
        .put("default", "a", "1")
        .put("meta", "b", "2")
        .delete("events", "c");
    let range = engine.write(&batch).expect("write");
    assert_eq!(range.first, Seq(start.0 + 1));
    assert_eq!(range.last, Seq(start.0 + 3));
    assert_eq!(engine.latest_seq(), range.last);
    let mut single = WriteBatch::new();
    single.delete_range("default", "a", "z");
    let next = engine.write(&single).expect("write");
    assert_eq!(
        (next.first, next.last),
        (Seq(range.last.0 + 1), Seq(range.last.0 + 1))
    );
    let empty = engine.write(&WriteBatch::new()).expect("empty write");
    assert!(
        empty.first > empty.last,
        "an empty batch consumes no sequence number"
    );
    assert_eq!(engine.latest_seq(), next.last);
}

pub fn reads_scans_and_column_families<E: ShardEngine>(dir: &Path) {
    let engine = E::open(dir, &cfs()).expect("open");
    for cf in cfs() {
        assert!(engine.column_families().contains(&cf), "missing {cf}");
    }
    let mut batch = WriteBatch::new();
    for i in 0..10u8 {
        batch.put("default", vec![b'k', i], vec![i]);
        batch.put("meta", vec![b'k', i], vec![100 + i]);
    }
    engine.write(&batch).expect("write");
    assert_eq!(
        engine.get("default", &[b'k', 3]).expect("get"),
        Some(vec![3])
    );
    assert_eq!(
        engine.get("meta", &[b'k', 3]).expect("get"),
        Some(vec![103])
    );
    assert_eq!(engine.get("events", &[b'k', 3]).expect("get"), None);
    let scan = engine
        .scan("default", &[b'k', 2], Some(&[b'k', 6]), 100)
        .expect("scan");
    assert_eq!(
        scan.iter().map(|(k, _)| k[1]).collect::<Vec<_>>(),
        vec![2, 3, 4, 5]
    );
    let limited = engine.scan("meta", b"", None, 3).expect("scan");
    assert_eq!(limited.len(), 3);
    assert!(engine.get("nope", b"k").is_err());
    let mut bad = WriteBatch::new();
    bad.put("default", "x", "1").put("nope", "x", "1");
    let before = engine.latest_seq();
    assert!(engine.write(&bad).is_err());
    assert_eq!(
        engine.latest_seq(),
        before,
        "a failed batch applies nothing"
    );
    assert_eq!(engine.get("default", b"x").expect("get"), None);
}

pub fn deletes_and_range_deletes<E: ShardEngine>(dir: &Path) {
    let engine = E::open(dir, &cfs()).expect("open");
    let mut model = Model::new();
    let mut batch = WriteBatch::new();
    for i in 0..100u32 {
        batch.put("events", format!("e{i:03}"), format!("v{i}"));
    }
    apply(&mut model, &batch);
    engine.write(&batch).expect("write");
    let mut deletes = WriteBatch::new();
    deletes
        .delete("events", "e005")
        .delete_range("events", "e010", "e020")
        .delete_range("events", "e030", "e030");
    apply(&mut model, &deletes);
    engine.write(&deletes).expect("write");
    let mut reversed = WriteBatch::new();
    reversed
        .put("events", "r", "1")
        .delete_range("events", "e090", "e050");
    let before = engine.latest_seq();
    assert!(
        engine.write(&reversed).is_err(),
        "a range delete with start after end is refused"
    );
    assert_eq!(engine.latest_seq(), before);
    assert_eq!(
        engine.get("events", b"r").expect("get"),
        None,
        "a refused batch applies nothing"
    );
    assert_eq!(engine.get("events", b"e005").expect("get"), None);
    assert_eq!(engine.get("events", b"e015").expect("get"), None);
    assert_eq!(
        engine.get("events", b"e020").expect("get"),
        Some(b"v20".to_vec())
    );
    assert_matches(&engine, &model);
}

pub fn random_operations_agree_with_the_model<E: ShardEngine>(dir: &Path) {
    let seed = 0x5eed_0001;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let engine = E::open(dir, &cfs()).expect("open");
    let mut model = Model::new();
    for _ in 0..300 {
        let n_ops = rng.random_range(1..20);
        let batch = random_batch(&mut rng, n_ops);
        apply(&mut model, &batch);
        engine.write(&batch).expect("write");
    }
    assert_matches(&engine, &model);
}

/// Copies a capture's files into `to`, as a restore would.
fn materialize(capture: &super::Capture, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for file in &capture.files {
        let bytes = std::fs::read(capture.dir.join(&file.name)).expect("read captured file");
        assert_eq!(bytes.len() as u64, file.size, "{} changed size", file.name);
        std::fs::write(to.join(&file.name), bytes).expect("write");
    }
}

pub fn capture_is_exact_at_its_sequence_number<E: ShardEngine>(dir: &Path) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let engine = E::open(&dir.join("live"), &cfs()).expect("open");
    let mut model = Model::new();
    for _ in 0..200 {
        let batch = random_batch(&mut rng, 10);
        apply(&mut model, &batch);
        engine.write(&batch).expect("write");
    }
    engine.prepare_capture().expect("prepare");
    // Writes after the preparation and before the capture must be in it.
    for _ in 0..50 {
        let batch = random_batch(&mut rng, 10);
        apply(&mut model, &batch);
        engine.write(&batch).expect("write");
    }
    let capture = engine.capture(&dir.join("capture")).expect("capture");
    assert_eq!(capture.seq, engine.latest_seq());
    let model_at_capture = model.clone();
    // Writes after the capture must not be in it.
    for _ in 0..100 {
        let batch = random_batch(&mut rng, 10);
        apply(&mut model, &batch);
        engine.write(&batch).expect("write");
    }
    materialize(&capture, &dir.join("restored"));
    let restored = E::open(&dir.join("restored"), &cfs()).expect("open restored");
    assert_eq!(
        restored.latest_seq(),
        capture.seq,
        "restored shard reports the captured sequence"
    );
    assert_matches(&restored, &model_at_capture);
    let capture_dir = capture.dir.clone();
    drop(capture);
    assert!(
        !capture_dir.exists(),
        "dropping a capture removes its directory"
    );
    assert_matches(&engine, &model);
}

/// The barrier captures while writes flow: the capture must hold exactly the writes up to
/// its own sequence number (never part of a batch), and the WAL after it must stay readable
/// while the capture lives, so replaying it onto the capture reaches any later point.
pub fn capture_under_writes_is_exact_and_keeps_its_wal<E: ShardEngine>(dir: &Path) {
    let engine = E::open_with(
        &dir.join("live"),
        &cfs(),
        &EngineConfig {
            // A tiny retention: only the capture's hold keeps the WAL after it.
            wal_retention_mb: 1,
            ..EngineConfig::default()
        },
    )
    .expect("open");
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let mut model = Model::new();
    for _ in 0..100 {
        let batch = random_batch(&mut rng, 8);
        apply(&mut model, &batch);
        engine.write(&batch).expect("write");
    }
    let before_writer = engine.latest_seq();
    let (writing, captured) = (AtomicBool::new(false), AtomicBool::new(false));
    // The writer goes on until 20 batches after the capture returned.
    let (capture, written) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut written = Vec::new();
            let mut after_capture = 0;
            while after_capture < 20 {
                let batch = random_batch(&mut rng, 8);
                let range = engine.write(&batch).expect("write");
                written.push((batch, range));
                writing.store(true, Ordering::SeqCst);
                if captured.load(Ordering::SeqCst) {
                    after_capture += 1;
                }
            }
            written
        });
        while !writing.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        engine.prepare_capture().expect("prepare");
        let capture = engine.capture(&dir.join("capture")).expect("capture");
        captured.store(true, Ordering::SeqCst);
        (capture, writer.join().expect("writer"))
    });
    assert!(
        capture.seq < engine.latest_seq(),
        "writes went on after the capture"
    );
    let mut at_capture = (capture.seq == before_writer).then(|| model.clone());
    for (batch, range) in &written {
        assert!(
            range.last <= capture.seq || range.first > capture.seq,
            "the capture at {} splits batch {}..={}",
            capture.seq,
            range.first,
            range.last
        );
        apply(&mut model, batch);
        if range.last == capture.seq {
            at_capture = Some(model.clone());
        }
    }
    let at_capture = at_capture.expect("the capture ends after a batch");
    // Bulky writes after the capture, past the retention, while the capture lives.
    let mut filler = WriteBatch::new();
    for i in 0..40 {
        filler.put("events", format!("filler-{i}"), vec![7u8; 64 << 10]);
        apply(&mut model, &filler);
        engine.write(&filler).expect("write filler");
        filler = WriteBatch::new();
    }
    let wal = read_wal(&engine, capture.seq, 1 << 20);
    materialize(&capture, &dir.join("restored"));
    let restored = E::open(&dir.join("restored"), &cfs()).expect("open restored");
    assert_eq!(restored.latest_seq(), capture.seq);
    assert_matches(&restored, &at_capture);
    for batch in &wal {
        restored.replay(batch).expect("replay");
    }
    assert_eq!(restored.latest_seq(), engine.latest_seq());
    assert_matches(&restored, &model);
}

/// An empty range delete deletes nothing and consumes no sequence number: a capture taken
/// right after a batch holding one (its WAL copy ending with that batch) opens at the
/// shard's own sequence number, and the next write continues from it.
pub fn an_empty_range_delete_consumes_no_sequence_number<E: ShardEngine>(dir: &Path) {
    let engine = E::open(&dir.join("live"), &cfs()).expect("open");
    let mut model = Model::new();
    let mut first = WriteBatch::new();
    first.put("events", "a", "1").put("events", "b", "2");
    apply(&mut model, &first);
    engine.write(&first).expect("write");
    engine.prepare_capture().expect("prepare");
    let mut batch = WriteBatch::new();
    batch
        .put("events", "c", "3")
        .delete_range("events", "a", "a")
        .put("meta", "d", "4");
    apply(&mut model, &batch);
    let range = engine.write(&batch).expect("write");
    assert_eq!(
        range.last.0 - range.first.0 + 1,
        2,
        "two puts consume two sequence numbers, the empty range none"
    );
    assert_eq!(engine.latest_seq(), range.last);
    let mut unknown = WriteBatch::new();
    unknown
        .put("events", "x", "1")
        .delete_range("nope", "a", "a");
    assert!(
        engine.write(&unknown).is_err(),
        "an empty range of an unknown family still fails its batch"
    );
    assert_eq!(engine.latest_seq(), range.last);
    let capture = engine.capture(&dir.join("capture")).expect("capture");
    assert_eq!(
        capture.seq, range.last,
        "the capture opens at the shard's sequence number"
    );
    materialize(&capture, &dir.join("restored"));
    drop(capture);
    let restored = E::open(&dir.join("restored"), &cfs()).expect("open restored");
    assert_eq!(restored.latest_seq(), range.last);
    assert_matches(&restored, &model);
    let mut next = WriteBatch::new();
    next.put("events", "e", "5");
    assert_eq!(
        restored.write(&next).expect("write").first,
        Seq(range.last.0 + 1),
        "the next write continues the sequence"
    );
}

pub fn reopen_keeps_data_and_sequence<E: ShardEngine>(dir: &Path) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut model = Model::new();
    let capture_dir = dir.join("capture");
    let seq = {
        let engine = E::open(&dir.join("live"), &cfs()).expect("open");
        for _ in 0..50 {
            let batch = random_batch(&mut rng, 5);
            apply(&mut model, &batch);
            engine.write(&batch).expect("write");
        }
        let capture = engine.capture(&capture_dir).expect("capture");
        materialize(&capture, &dir.join("restored"));
        capture.seq
    };
    let restored =
        E::open(&dir.join("restored"), &[]).expect("open restored without naming families");
    assert_eq!(restored.latest_seq(), seq);
    for cf in cfs() {
        assert!(restored.column_families().contains(&cf));
    }
    assert_matches(&restored, &model);
    let mut more = WriteBatch::new();
    more.put("default", "after-restore", "1");
    let range = restored.write(&more).expect("write after restore");
    assert_eq!(
        range.first,
        Seq(seq.0 + 1),
        "a restored shard continues its sequence"
    );
}

/// Reads the whole WAL after `after`, in pieces of about `piece` bytes.
fn read_wal<E: ShardEngine>(engine: &E, after: Seq, piece: usize) -> Vec<WalBatch> {
    let mut out: Vec<WalBatch> = Vec::new();
    let mut cursor = after;
    loop {
        let batches = engine.wal_since(cursor, piece).expect("wal_since");
        let Some(last) = batches.last() else {
            return out;
        };
        cursor = last.last();
        out.extend(batches);
    }
}

pub fn wal_replay_rebuilds_the_shard_at_every_batch<E: ShardEngine>(dir: &Path) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let engine = E::open(&dir.join("live"), &cfs()).expect("open");
    let mut model = Model::new();
    for _ in 0..50 {
        let batch = random_batch(&mut rng, 4);
        apply(&mut model, &batch);
        engine.write(&batch).expect("write");
    }
    let capture = engine.capture(&dir.join("capture")).expect("capture");
    let base = capture.seq;
    // After the capture: remember the model and the write's range after every batch.
    let mut history = Vec::new();
    for _ in 0..120 {
        let n_ops = rng.random_range(1..6);
        let batch = random_batch(&mut rng, n_ops);
        apply(&mut model, &batch);
        let range = engine.write(&batch).expect("write");
        history.push((range, model.clone()));
    }
    let wal = read_wal(&engine, base, 512);
    assert_eq!(wal.len(), history.len(), "one WAL batch per write");
    for (batch, (range, _)) in wal.iter().zip(&history) {
        assert_eq!((batch.first, batch.last()), (range.first, range.last));
        assert_eq!(batch.hlc, range.hlc, "the WAL keeps the write's HLC time");
    }
    assert!(
        wal.windows(2).all(|w| w[0].hlc < w[1].hlc),
        "HLC times grow along the WAL"
    );
    assert!(
        engine
            .wal_since(engine.latest_seq(), 1)
            .expect("tail")
            .is_empty()
    );

    // Replay onto the capture, stopping after batch `stop`, then to the end.
    let stop = 70;
    materialize(&capture, &dir.join("restored"));
    let restored = E::open(&dir.join("restored"), &cfs()).expect("open restored");
    for batch in &wal[..=stop] {
        restored.replay(batch).expect("replay");
    }
    assert_eq!(restored.latest_seq(), history[stop].0.last);
    assert_matches(&restored, &history[stop].1);
    let skipped = restored.replay(&wal[stop + 2]);
    assert_eq!(
        skipped.err().map(|e| e.code),
        Some(lockstep_repository::ErrorCode::BackupWalGap),
        "a batch that does not follow is refused"
    );
    for batch in &wal[stop + 1..] {
        restored.replay(batch).expect("replay");
    }
    assert_matches(&restored, &model);
    // The replayed shard's own WAL continues with the same batches and times.
    let replayed = read_wal(&restored, base, 1 << 20);
    assert_eq!(
        replayed
            .iter()
            .map(|b| (b.first, b.count, b.hlc))
            .collect::<Vec<_>>(),
        wal.iter()
            .map(|b| (b.first, b.count, b.hlc))
            .collect::<Vec<_>>()
    );
}

pub fn hlc_times_never_go_back_across_reopen<E: ShardEngine>(dir: &Path) {
    let at = |millis: u64| EngineConfig {
        clock: HlcClock::with_wall_clock(std::sync::Arc::new(move || millis)),
        ..EngineConfig::default()
    };
    let mut batch = WriteBatch::new();
    batch.put("default", "k", "v");
    let last = {
        let engine = E::open_with(&dir.join("live"), &cfs(), &at(50_000)).expect("open");
        engine.write(&batch).expect("write");
        engine.write(&batch).expect("write").hlc
    };
    assert_eq!(last.millis(), 50_000);
    let engine = E::open_with(&dir.join("live"), &cfs(), &at(10_000)).expect("reopen");
    let next = engine.write(&batch).expect("write").hlc;
    // Both engines read their last HLC time back from the WAL...
    assert!(next > last, "{next} is not after {last}");
    // ...also once the shard was synced (flushed) before it closed.
    engine.sync().expect("sync");
    drop(engine);
    let engine = E::open_with(&dir.join("live"), &cfs(), &at(10_000)).expect("reopen");
    let after_sync = engine.write(&batch).expect("write").hlc;
    assert!(after_sync > next, "{after_sync} is not after {next}");
}

/// A shard closed without a sync (a crashed process) reopens with every write it
/// acknowledged and the WAL it kept, and continues its sequence.
pub fn a_reopened_shard_keeps_its_writes_and_wal<E: ShardEngine>(dir: &Path) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let mut model = Model::new();
    let live = dir.join("live");
    let wal = {
        let engine = E::open(&live, &cfs()).expect("open");
        for _ in 0..40 {
            let batch = random_batch(&mut rng, 4);
            apply(&mut model, &batch);
            engine.write(&batch).expect("write");
        }
        read_wal(&engine, Seq(0), 1 << 20)
    };
    let engine = E::open(&live, &cfs()).expect("reopen");
    assert_matches(&engine, &model);
    let key = |b: &WalBatch| (b.first, b.count, b.hlc, b.data.clone());
    assert_eq!(
        read_wal(&engine, Seq(0), 1 << 20)
            .iter()
            .map(key)
            .collect::<Vec<_>>(),
        wal.iter().map(key).collect::<Vec<_>>(),
        "the WAL outlives the process"
    );
    // Synced and reopened again, with writes between: the same.
    let batch = random_batch(&mut rng, 3);
    apply(&mut model, &batch);
    let range = engine.write(&batch).expect("write after reopen");
    assert_eq!(range.first.0, wal.last().map_or(0, |b| b.last().0) + 1);
    engine.sync().expect("sync");
    let batch = random_batch(&mut rng, 2);
    apply(&mut model, &batch);
    engine.write(&batch).expect("write after sync");
    let before = read_wal(&engine, Seq(0), 1 << 20);
    drop(engine);
    let engine = E::open(&live, &cfs()).expect("reopen after sync");
    assert_matches(&engine, &model);
    assert_eq!(
        read_wal(&engine, Seq(0), 1 << 20)
            .iter()
            .map(key)
            .collect::<Vec<_>>(),
        before.iter().map(key).collect::<Vec<_>>()
    );
}

/// A selective restore's edits: dropped families are gone after a reopen, with their keys;
/// the default one, which cannot be dropped, is emptied without a write (the shard stays at
/// its sequence number); the kept one is intact.
pub fn dropped_column_families_are_gone_and_the_default_one_empties<E: ShardEngine>(dir: &Path) {
    let mut model = Model::new();
    let before = {
        let engine = E::open(dir, &cfs()).expect("open");
        let mut batch = WriteBatch::new();
        for i in 0..50u8 {
            for cf in cfs() {
                batch.put(&cf, vec![b'k', i], vec![i]);
            }
        }
        batch.put("default", vec![0xff; 3], b"last".to_vec());
        batch.put("default", Vec::new(), b"empty key".to_vec());
        engine.write(&batch).expect("write");
        apply(&mut model, &batch);
        engine.sync().expect("sync");
        engine.latest_seq()
    };
    E::drop_column_families(dir, &["events".to_string(), "default".to_string()]).expect("drop");
    let engine = E::open(dir, &[]).expect("reopen");
    let families = engine.column_families();
    assert!(!families.contains(&"events".to_string()), "{families:?}");
    assert!(families.contains(&"meta".to_string()), "{families:?}");
    assert!(families.contains(&"default".to_string()), "{families:?}");
    assert_eq!(
        engine.latest_seq(),
        before,
        "dropping consumes no sequence number"
    );
    engine.clear_column_family("default").expect("clear");
    engine.clear_column_family("default").expect("clear again");
    assert_eq!(
        engine.latest_seq(),
        before,
        "clearing consumes no sequence number"
    );
    assert!(
        engine.clear_column_family("events").is_err(),
        "a dropped family is unknown"
    );
    assert!(
        engine
            .scan("default", b"", None, usize::MAX)
            .expect("scan")
            .is_empty()
    );
    let meta: BTreeMap<Vec<u8>, Vec<u8>> = engine
        .scan("meta", b"", None, usize::MAX)
        .expect("scan")
        .into_iter()
        .collect();
    assert!(meta == model["meta"], "the kept family changed");
    engine.sync().expect("sync");
    drop(engine);
    let engine = E::open(dir, &[]).expect("reopen");
    assert!(
        engine
            .scan("default", b"", None, usize::MAX)
            .expect("scan")
            .is_empty()
    );
    assert!(!engine.column_families().contains(&"events".to_string()));
    assert_eq!(
        engine.latest_seq(),
        before,
        "a reopened shard is where it was"
    );
}

macro_rules! conformance_suite {
    ($module:ident, $engine:ty) => {
        mod $module {
            use super::*;

            fn run(case: fn(&Path)) {
                let dir = tempfile::tempdir().expect("tempdir");
                case(dir.path());
            }

            #[test]
            fn sequence_ranges_are_exact() {
                run(super::sequence_ranges_are_exact::<$engine>);
            }
            #[test]
            fn reads_scans_and_column_families() {
                run(super::reads_scans_and_column_families::<$engine>);
            }
            #[test]
            fn deletes_and_range_deletes() {
                run(super::deletes_and_range_deletes::<$engine>);
            }
            #[test]
            fn random_operations_agree_with_the_model() {
                run(super::random_operations_agree_with_the_model::<$engine>);
            }
            #[test]
            fn capture_is_exact_at_its_sequence_number() {
                run(super::capture_is_exact_at_its_sequence_number::<$engine>);
            }
            #[test]
            fn wal_replay_rebuilds_the_shard_at_every_batch() {
                run(super::wal_replay_rebuilds_the_shard_at_every_batch::<$engine>);
            }
            #[test]
            fn hlc_times_never_go_back_across_reopen() {
                run(super::hlc_times_never_go_back_across_reopen::<$engine>);
            }
            #[test]
            fn capture_under_writes_is_exact_and_keeps_its_wal() {
                run(super::capture_under_writes_is_exact_and_keeps_its_wal::<$engine>);
            }
            #[test]
            fn an_empty_range_delete_consumes_no_sequence_number() {
                run(super::an_empty_range_delete_consumes_no_sequence_number::<$engine>);
            }
            #[test]
            fn a_reopened_shard_keeps_its_writes_and_wal() {
                run(super::a_reopened_shard_keeps_its_writes_and_wal::<$engine>);
            }
            #[test]
            fn dropped_column_families_are_gone_and_the_default_one_empties() {
                run(super::dropped_column_families_are_gone_and_the_default_one_empties::<$engine>);
            }
            #[test]
            fn reopen_keeps_data_and_sequence() {
                run(super::reopen_keeps_data_and_sequence::<$engine>);
            }
        }
    };
}

#[cfg(feature = "rocksdb")]
conformance_suite!(rocks, super::super::RocksEngine);
conformance_suite!(mem, super::super::MemEngine);
