//! A participant on a `MemEngine` shard and a `memory://` repository, for the unit tests of
//! the barrier and restore rules. Tests run it on paused tokio time, so leases and holds run
//! out exactly when a test sleeps past them.

use std::sync::Arc;
use std::time::Duration;

use lockstep_repository::transfer::TransferOptions;
use lockstep_repository::{BackupId, Lineage, Repository, Seq, ShardId};
use tempfile::TempDir;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    BarrierState, BarrierStatus, ParticipantHandle, PlantedBug, RestoreRequest, RestoreState,
    RestoreStatus, ShardParts,
};
use crate::backup::{BackupOptions, CaptureMode};
use crate::engine::{DEFAULT_CF, MemEngine, ShardEngine, WriteBatch};
use crate::gate::WriteGate;
use crate::shipper::{ShipperHandle, ShipperOptions};
use crate::slot::EngineSlot;

/// The stage hold of [`TestShard::stage`].
pub(super) const HOLD: Duration = Duration::from_secs(5);

/// The longest a test waits, in real time, for background work (an upload, a staging).
const PATIENCE: Duration = Duration::from_secs(60);

pub(super) fn backup_id(id: &str) -> BackupId {
    BackupId::new(id).expect("backup id")
}

/// One shard with its participant running.
pub(super) struct TestShard {
    pub(super) handle: ParticipantHandle,
    pub(super) gate: WriteGate,
    pub(super) repo: Repository,
    pub(super) shard_id: ShardId,
    pub(super) slot: Arc<EngineSlot<MemEngine>>,
    pub(super) root: TempDir,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl TestShard {
    pub(super) async fn start() -> TestShard {
        TestShard::start_with(None).await
    }

    pub(super) async fn start_with(planted_bug: Option<PlantedBug>) -> TestShard {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("shard");
        let engine = MemEngine::open(&dir, &[]).expect("open shard");
        let slot = Arc::new(EngineSlot::new(dir, Arc::new(engine), Lineage::root()));
        let url = format!("memory://participant-{}", uuid::Uuid::new_v4().simple());
        let repo = Repository::open(&url).await.expect("repository");
        let shard_id = ShardId::new("shard-0").expect("shard id");
        let gate = WriteGate::new();
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let shipper = ShipperHandle::spawn(
            slot.clone(),
            shard_id.clone(),
            ShipperOptions::default(),
            cancel.child_token(),
            &mut tasks,
        );
        let handle = ParticipantHandle::spawn(
            ShardParts {
                slot: slot.clone(),
                gate: gate.clone(),
                repo: repo.clone(),
                shard_id: shard_id.clone(),
                options: BackupOptions {
                    capture_root: root.path().join("captures"),
                    transfer: TransferOptions::default(),
                    min_free_bytes: 0,
                },
                shipper,
                planted_bug,
                security: lockstep_proto::tls::Security::Plaintext,
            },
            cancel.child_token(),
            &mut tasks,
        );
        TestShard {
            handle,
            gate,
            repo,
            shard_id,
            slot,
            root,
            cancel,
            tasks,
        }
    }

    /// Writes `key` straight into the engine and returns its sequence number.
    pub(super) fn write(&self, key: &str) -> Seq {
        let mut batch = WriteBatch::new();
        batch.put(DEFAULT_CF, key, "v");
        let engine = self.slot.get().expect("engine");
        engine.write(&batch).expect("write").last
    }

    pub(super) fn has(&self, key: &str) -> bool {
        let engine = self.slot.get().expect("engine");
        engine
            .get(DEFAULT_CF, key.as_bytes())
            .expect("get")
            .is_some()
    }

    pub(super) fn seq(&self) -> Seq {
        self.slot.get().expect("engine").latest_seq()
    }

    /// A full backup's Stage, held for [`HOLD`].
    pub(super) async fn stage(&self, id: &BackupId) -> BarrierStatus {
        self.handle
            .stage(id.clone(), CaptureMode::Files, None, HOLD)
            .await
            .expect("stage")
    }

    /// A full backup's Prepare, closing at once.
    pub(super) async fn prepare(&self, id: &BackupId, lease: Duration) -> BarrierStatus {
        self.handle
            .prepare(id.clone(), CaptureMode::Files, None, lease, None)
            .await
            .expect("prepare")
    }

    /// A whole full backup whose upload must not rely on `condemned`; the Prepared status.
    pub(super) async fn backup_avoiding(
        &self,
        id: &BackupId,
        condemned: Option<Arc<lockstep_repository::gc::Condemned>>,
    ) -> BarrierStatus {
        self.handle
            .stage(id.clone(), CaptureMode::Files, condemned.clone(), HOLD)
            .await
            .expect("stage");
        let prepared = self
            .handle
            .prepare(id.clone(), CaptureMode::Files, condemned, HOLD, None)
            .await
            .expect("prepare");
        self.commit(id).await;
        self.wait_for(id, BarrierState::Uploaded).await;
        prepared
    }

    pub(super) async fn status(&self, id: &BackupId) -> BarrierStatus {
        self.handle.status(id.clone()).await.expect("status")
    }

    pub(super) async fn commit(&self, id: &BackupId) -> BarrierStatus {
        self.handle.commit(id.clone()).await.expect("commit")
    }

    pub(super) async fn abort(&self, id: &BackupId) -> BarrierStatus {
        self.handle.abort(id.clone()).await.expect("abort")
    }

    /// The barrier holding the shard, as Describe reports it.
    pub(super) async fn active_backup(&self) -> Option<BackupId> {
        let info = self.handle.describe().await.expect("describe");
        info.active_backup
    }

    pub(super) async fn restore_stage(&self, request: RestoreRequest) -> RestoreStatus {
        self.handle
            .restore_stage(request)
            .await
            .expect("restore stage")
    }

    pub(super) async fn restore_apply(&self, id: &str) -> RestoreStatus {
        self.handle
            .restore_apply(id.to_string())
            .await
            .expect("restore apply")
    }

    pub(super) async fn restore_commit(&self, id: &str) -> RestoreStatus {
        self.handle
            .restore_commit(id.to_string())
            .await
            .expect("restore commit")
    }

    pub(super) async fn restore_discard(&self, id: &str) -> RestoreStatus {
        self.handle
            .restore_discard(id.to_string())
            .await
            .expect("restore discard")
    }

    pub(super) async fn restore_status(&self, id: &str) -> RestoreStatus {
        self.handle
            .restore_status(id.to_string())
            .await
            .expect("restore status")
    }

    /// A whole full backup: Stage, Prepare, Commit, and the upload. Returns its cut.
    pub(super) async fn backup(&self, id: &BackupId) -> Seq {
        self.stage(id).await;
        let prepared = self.prepare(id, Duration::from_secs(1)).await;
        assert_eq!(prepared.state, BarrierState::Prepared);
        self.commit(id).await;
        self.wait_for(id, BarrierState::Uploaded).await;
        prepared.seq
    }

    /// Polls the barrier until it is in `state`.
    pub(super) async fn wait_for(&self, id: &BackupId, state: BarrierState) -> BarrierStatus {
        let what = format!("backup {id}");
        poll_until(&what, move || self.status(id), |s| s.state == state).await
    }

    /// Polls the restore until it is in `state`.
    pub(super) async fn wait_for_restore(&self, id: &str, state: RestoreState) -> RestoreStatus {
        let what = format!("restore {id}");
        poll_until(&what, move || self.restore_status(id), |s| s.state == state).await
    }

    /// Cancels the participant and waits for its task.
    pub(super) async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Reads until `done`, stepping paused time by 1 ms, for at most [`PATIENCE`] of real time.
async fn poll_until<T, F, R>(what: &str, mut read: R, done: impl Fn(&T) -> bool) -> T
where
    T: std::fmt::Debug,
    F: std::future::Future<Output = T>,
    R: FnMut() -> F,
{
    let started = std::time::Instant::now();
    loop {
        let value = read().await;
        if done(&value) {
            return value;
        }
        assert!(started.elapsed() < PATIENCE, "{what} is still {value:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
