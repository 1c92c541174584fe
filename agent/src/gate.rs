//! The write gate: every client write passes through it, and the barrier closes it.
//!
//! Writers hold a shared permit while they write; `close` takes the exclusive side, so it
//! waits for in-flight writes to finish, and writes that arrive meanwhile wait (they are not
//! rejected) until the gate opens again. tokio's `RwLock` is fair: once `close` is queued, no
//! new writer overtakes it, so a busy shard cannot starve the barrier.
//!
//! Architecture invariant: while a `GateClosed` exists, no write is applied to the shard.
//! Dropping it opens the gate, so an error or a cancelled task can never leave it closed.

use std::sync::Arc;
use std::time::Duration;

// tokio's clock: the real one in the binaries, simulated time in the simulations.
use tokio::time::Instant;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// The gate in front of one shard's writes. Cheap to clone; clones share the gate.
#[derive(Debug, Clone, Default)]
pub struct WriteGate {
    lock: Arc<RwLock<()>>,
}

/// Permission to apply one write; the gate cannot close until it is dropped.
#[derive(Debug)]
pub struct WritePermit {
    _guard: OwnedRwLockReadGuard<()>,
}

/// Proof that the gate is closed and every earlier write has finished.
#[derive(Debug)]
pub struct GateClosed {
    _guard: OwnedRwLockWriteGuard<()>,
    requested_at: Instant,
}

impl GateClosed {
    /// How long writers have been held so far, from the moment closing was requested.
    pub fn elapsed(&self) -> Duration {
        self.requested_at.elapsed()
    }

    /// Opens the gate and returns how long writes were paused.
    pub fn open(self) -> Duration {
        self.requested_at.elapsed()
    }
}

impl WriteGate {
    pub fn new() -> WriteGate {
        WriteGate::default()
    }

    /// Waits until the gate is open and returns a permit for one write.
    pub async fn enter(&self) -> WritePermit {
        WritePermit {
            _guard: self.lock.clone().read_owned().await,
        }
    }

    /// `enter` for callers outside an async runtime (an application embedding the agent).
    pub fn blocking_enter(&self) -> WritePermit {
        WritePermit {
            _guard: futures::executor::block_on(self.lock.clone().read_owned()),
        }
    }

    /// Closes the gate: new writes wait, and this returns once in-flight writes finished.
    pub async fn close(&self) -> GateClosed {
        let requested_at = Instant::now();
        GateClosed {
            _guard: self.lock.clone().write_owned().await,
            requested_at,
        }
    }

    /// True while the gate is closed or closing.
    pub fn is_closed(&self) -> bool {
        self.lock.try_read().is_err()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;
    use crate::engine::{MemEngine, ShardEngine, WriteBatch};

    async fn settle() {
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn closing_waits_for_in_flight_writes_and_holds_new_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(MemEngine::open(dir.path(), &[]).expect("open"));
        let gate = WriteGate::new();
        let applied_while_closed = Arc::new(AtomicBool::new(false));
        let closed_flag = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));

        let mut writers = Vec::new();
        for writer in 0..4u64 {
            let (engine, gate, acked, stop) =
                (engine.clone(), gate.clone(), acked.clone(), stop.clone());
            let (closed_flag, applied_while_closed) =
                (closed_flag.clone(), applied_while_closed.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let permit = gate.enter().await;
                    if closed_flag.load(Ordering::SeqCst) {
                        applied_while_closed.store(true, Ordering::SeqCst);
                    }
                    let mut batch = WriteBatch::new();
                    batch.put("default", format!("w{writer}-{i:08}"), b"v".to_vec());
                    engine.write(&batch).expect("write");
                    drop(permit);
                    acked.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                    tokio::task::yield_now().await;
                }
            }));
        }

        for _round in 0..20 {
            settle().await;
            let closed = gate.close().await;
            closed_flag.store(true, Ordering::SeqCst);
            assert!(gate.is_closed());
            let seq_at_close = engine.latest_seq();
            settle().await;
            assert_eq!(
                engine.latest_seq(),
                seq_at_close,
                "a write was applied while the gate was closed"
            );
            closed_flag.store(false, Ordering::SeqCst);
            let paused = closed.open();
            assert!(paused > Duration::ZERO);
        }
        // On a loaded machine the writers may not have run yet: let them write before
        // stopping, so the checks below are about writes that happened.
        let progressed = tokio::time::timeout(Duration::from_secs(30), async {
            while acked.load(Ordering::SeqCst) < 4 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(progressed.is_ok(), "the writers never ran");
        stop.store(true, Ordering::SeqCst);
        for writer in writers {
            writer.await.expect("writer");
        }
        assert!(!applied_while_closed.load(Ordering::SeqCst));
        let acked = acked.load(Ordering::SeqCst);
        assert!(acked > 0);
        // No acknowledged write was lost: every one consumed exactly one sequence number.
        assert_eq!(engine.latest_seq().0, acked);
        let keys = engine.scan("default", b"", None, usize::MAX).expect("scan");
        assert_eq!(keys.len() as u64, acked);
    }

    #[tokio::test]
    async fn dropping_the_closed_guard_opens_the_gate() {
        let gate = WriteGate::new();
        {
            let _closed = gate.close().await;
            assert!(gate.is_closed());
        }
        assert!(!gate.is_closed());
        let _permit = gate.enter().await;
    }
}
