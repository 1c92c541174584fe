//! The WAL shipper: tails the shard's WAL and writes it, as segments, to every WAL
//! destination ("region"), each at its own pace.
//!
//! One task per agent, owned by the server's `JoinSet`. Every `poll` it reads, per
//! destination, the batches after that destination's cursor (`ShardEngine::wal_since`, which
//! checks continuity) and cuts a segment when it holds `segment_bytes` or its oldest write has
//! waited `segment_age`. A failed upload is retried with exponential backoff (100 ms to 10 s);
//! the other destinations go on.
//!
//! The durable cursor of a destination is the destination itself: at start, and whenever the
//! shard's lineage changes (a restore, a fork), the shipper lists the destination's segments
//! of the current lineage and resumes after the last one. A segment is one atomic put under a key
//! naming its exact sequence range, so a crash before the put ships the range again and a
//! crash after it resumes past it: no gap and no duplicate, with no cursor file to fall out
//! of step with the archive.
//!
//! Architecture invariant: a destination's segments of one lineage are contiguous, and the
//! shipper never appends to a lineage whose segments run past the shard: that is a history
//! fork (another process shipped this lineage), and the shard moves to a new orphan lineage
//! whose archive starts at its next write. A WAL
//! range that is gone before it was shipped is `ERR_BACKUP_WAL_GAP`, reported in the status
//! and retried, never skipped. The one exception is the first segment of an empty archive:
//! the archive then starts where the WAL still reaches, and says so in its first key.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use lockstep_repository::archive::WalArchive;
use lockstep_repository::bandwidth::Bandwidth;
use lockstep_repository::codec::Compression;
use lockstep_repository::wal::{Segment, WalBatch};
use lockstep_repository::{Error, ErrorCode, HlcTime, Lineage, LineageId, Result, Seq, ShardId};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::engine::ShardEngine;
use crate::participant::PlantedBug;
use crate::slot::EngineSlot;

/// How many recent segment lags the status summarizes.
const LAG_WINDOW: usize = 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often the retained WAL is measured against its bound.
const PIN_CHECK_EVERY: Duration = Duration::from_secs(1);
const BACKUP_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Where and how the WAL is shipped.
#[derive(Debug, Clone)]
pub struct ShipperOptions {
    pub destinations: Vec<WalArchive>,
    /// A segment is cut once it holds this many bytes of batches...
    pub segment_bytes: usize,
    /// ...or once its oldest write has waited this long.
    pub segment_age: Duration,
    /// How often the WAL is checked for new writes.
    pub poll: Duration,
    pub compression: Compression,
    /// The engine's WAL retention bound, for the pin warning.
    pub wal_retention_bytes: u64,
    /// Always `None` in the binaries; see [`PlantedBug`].
    pub planted_bug: Option<PlantedBug>,
    /// The agent's rate limits: segments take their bytes from the upload limit at once,
    /// never waiting (`Bandwidth::wal_upload`).
    pub bandwidth: Option<Arc<Bandwidth>>,
}

impl Default for ShipperOptions {
    fn default() -> ShipperOptions {
        ShipperOptions {
            destinations: Vec::new(),
            segment_bytes: 4 << 20,
            segment_age: Duration::from_millis(25),
            poll: Duration::from_millis(10),
            compression: Compression::default(),
            wal_retention_bytes: 1 << 30,
            planted_bug: None,
            bandwidth: None,
        }
    }
}

/// What the shipper says about one destination.
#[derive(Debug, Clone, Default)]
pub struct DestinationStatus {
    pub url: String,
    /// The lineage the cursor is on (none before the destination was first read).
    pub lineage: Option<Lineage>,
    /// The last sequence number durable in the destination.
    pub shipped_seq: Seq,
    /// The HLC time of that write.
    pub shipped_hlc: HlcTime,
    /// The shard's latest sequence number when the status was taken.
    pub latest_seq: Seq,
    /// Writes not yet durable in the destination (see [`DestinationStatus::as_of`]).
    pub lag_seq: u64,
    /// How long the oldest unshipped write has waited, in milliseconds.
    pub lag_ms: u64,
    /// Bytes of batches read and not yet shipped (at most one segment's worth is read).
    pub pending_bytes: u64,
    pub pending_segments: u64,
    pub segments_shipped: u64,
    pub bytes_shipped: u64,
    /// Bytes shipped per second over the last completed second.
    pub rate_bytes_per_sec: u64,
    /// Over the last segments: how long their oldest write waited until it was durable.
    pub lag_p50_ms: u64,
    pub lag_p99_ms: u64,
    /// Bytes of WAL the shard keeps, and whether that is near the retention bound while this
    /// destination still needs some of it.
    pub wal_retained_bytes: u64,
    pub pin_near_bound: bool,
    pub last_error: Option<(ErrorCode, String)>,
}

impl DestinationStatus {
    /// The status against the shard's sequence number `latest` on `lineage` now: the
    /// shipper takes its status once per pass, so writes acknowledged since would otherwise
    /// show as shipped (`lag_seq` 0) until its next pass.
    pub fn as_of(mut self, latest: Seq, lineage: &Lineage) -> DestinationStatus {
        if self.lineage.is_some_and(|l| l.id == lineage.id) && latest > self.latest_seq {
            self.latest_seq = latest;
            self.lag_seq = latest.0.saturating_sub(self.shipped_seq.0);
            if self.lag_seq > 0 {
                self.pending_segments = self.pending_segments.max(1);
            }
        }
        self
    }
}

/// Cloneable handle on the shipper task.
#[derive(Debug, Clone)]
pub struct ShipperHandle {
    status: watch::Receiver<Vec<DestinationStatus>>,
    destinations: Vec<WalArchive>,
    /// The sequence number of the shard's last full backup: the WAL after it is what the
    /// next incremental or differential needs.
    full_backup: Arc<watch::Sender<Option<Seq>>>,
}

impl ShipperHandle {
    /// Starts the shipper in `tasks`; with no destination it only watches the retained WAL.
    pub fn spawn<E: ShardEngine>(
        slot: Arc<EngineSlot<E>>,
        shard_id: ShardId,
        options: ShipperOptions,
        cancel: CancellationToken,
        tasks: &mut JoinSet<()>,
    ) -> ShipperHandle {
        let destinations = options.destinations.clone();
        let initial = destinations
            .iter()
            .map(|repo| DestinationStatus {
                url: repo.url().to_string(),
                ..DestinationStatus::default()
            })
            .collect();
        let (tx, status) = watch::channel(initial);
        let full_backup = Arc::new(watch::Sender::new(None));
        // With no destination the task still watches the retained WAL for the backups.
        {
            let shipper = Shipper {
                dests: destinations.iter().cloned().map(Destination::new).collect(),
                slot,
                shard_id,
                options,
                status: tx,
                last_pin_check: None,
                wal_retained_bytes: 0,
                full_backup: full_backup.subscribe(),
                last_backup_warning: None,
            };
            tasks.spawn(shipper.run(cancel));
        }
        ShipperHandle {
            status,
            destinations,
            full_backup,
        }
    }

    /// Records a full backup of the shard at `seq`: from now on the retention warning also
    /// speaks for the next incremental or differential, which needs the WAL after it.
    pub fn note_full_backup(&self, seq: Seq) {
        self.full_backup.send_replace(Some(seq));
    }

    /// The status of every destination.
    pub fn status(&self) -> Vec<DestinationStatus> {
        self.status.borrow().clone()
    }

    /// Waits until every destination has shipped through `seq`, or `timeout` passes; returns
    /// the status at that point.
    pub async fn wait_shipped(&self, seq: Seq, timeout: Duration) -> Vec<DestinationStatus> {
        let mut status = self.status.clone();
        let done = |all: &Vec<DestinationStatus>| all.iter().all(|d| d.shipped_seq >= seq);
        let _ = tokio::time::timeout(timeout, status.wait_for(done)).await;
        self.status()
    }

    pub fn destinations(&self) -> &[WalArchive] {
        &self.destinations
    }
}

/// Where one destination's shipping stands.
struct Cursor {
    /// The shard's lineage this cursor ships for.
    serves: LineageId,
    /// The lineage it writes to: `serves`, or its parent while it finishes the parent's
    /// archive up to the branch point (`until`).
    lineage: Lineage,
    until: Option<Seq>,
    seq: Seq,
    hlc: HlcTime,
    /// True once the destination holds a segment of `lineage`.
    has_segments: bool,
}

impl Cursor {
    /// At the start of `lineage`'s own writes, with nothing of it in the destination yet.
    fn start_of(lineage: &Lineage) -> Cursor {
        Cursor {
            serves: lineage.id,
            lineage: *lineage,
            until: None,
            seq: lineage.branch,
            hlc: HlcTime::default(),
            has_segments: false,
        }
    }
}

struct Destination {
    repo: WalArchive,
    cursor: Option<Cursor>,
    /// When the shipper first saw writes it has not shipped yet.
    pending_since: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    lags_ms: VecDeque<u64>,
    rate_window: (Instant, u64),
    status: DestinationStatus,
}

impl Destination {
    fn new(repo: WalArchive) -> Destination {
        Destination {
            status: DestinationStatus {
                url: repo.url().to_string(),
                ..DestinationStatus::default()
            },
            repo,
            cursor: None,
            pending_since: None,
            retry_at: None,
            backoff: MIN_BACKOFF,
            lags_ms: VecDeque::new(),
            rate_window: (Instant::now(), 0),
        }
    }
}

struct Shipper<E> {
    dests: Vec<Destination>,
    slot: Arc<EngineSlot<E>>,
    shard_id: ShardId,
    options: ShipperOptions,
    status: watch::Sender<Vec<DestinationStatus>>,
    last_pin_check: Option<Instant>,
    wal_retained_bytes: u64,
    full_backup: watch::Receiver<Option<Seq>>,
    /// When the backups' retention warning was last logged (at most once a minute).
    last_backup_warning: Option<Instant>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn wall_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

impl<E: ShardEngine> Shipper<E> {
    async fn run(mut self, cancel: CancellationToken) {
        let every = if self.dests.is_empty() {
            PIN_CHECK_EVERY
        } else {
            self.options.poll
        };
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Fixed polling order: the simulations replay a seed exactly.
                biased;
                _ = cancel.cancelled() => break,
                _ = ticker.tick() => self.tick().await,
            }
        }
    }

    async fn tick(&mut self) {
        // Read together: a swap between two reads would pair the old lineage with the
        // restored shard's sequence number, which looks like a fork.
        let (lineage, latest) = match self.slot.get_with_lineage() {
            Ok((engine, lineage)) => (lineage, engine.latest_seq()),
            // A restore is swapping the shard: try again next tick.
            Err(_) => return,
        };
        self.check_pin().await;
        let now = Instant::now();
        for index in 0..self.dests.len() {
            if self.dests[index].retry_at.is_some_and(|at| now < at) {
                continue;
            }
            let result = self.ship(index, &lineage, latest).await;
            let dest = &mut self.dests[index];
            match result {
                Ok(()) => {
                    dest.retry_at = None;
                    dest.backoff = MIN_BACKOFF;
                    dest.status.last_error = None;
                }
                Err(err) => {
                    tracing::warn!(
                        shard = %self.shard_id, destination = %dest.repo.url(), error = %err.chain(),
                        retry_ms = dest.backoff.as_millis() as u64, "WAL shipping failed"
                    );
                    dest.status.last_error = Some((err.code, err.chain()));
                    // A failed put may have landed all the same (only its reply was lost):
                    // the next attempt reads the destination again and resumes after what it
                    // holds, so the range is neither shipped twice nor skipped.
                    dest.cursor = None;
                    dest.retry_at = Some(Instant::now() + dest.backoff);
                    dest.backoff = (dest.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        self.publish(latest);
    }

    /// Measures the retained WAL now and then, and warns loudly when a destination still
    /// needs WAL that is close to being dropped.
    async fn check_pin(&mut self) {
        let due = self
            .last_pin_check
            .is_none_or(|at| at.elapsed() >= PIN_CHECK_EVERY);
        if !due {
            return;
        }
        self.last_pin_check = Some(Instant::now());
        if let Ok(engine) = self.slot.get() {
            let engine = Arc::clone(&engine);
            if let Ok(Ok(bytes)) =
                lockstep_repository::blocking::run(move || engine.wal_bytes()).await
            {
                self.wal_retained_bytes = bytes;
            }
        }
        let near = self.wal_retained_bytes * 10 >= self.options.wal_retention_bytes * 9;
        for dest in &mut self.dests {
            let behind = dest.status.lag_seq > 0;
            dest.status.pin_near_bound = near && behind;
            if near && behind {
                tracing::error!(
                    shard = %self.shard_id, destination = %dest.repo.url(),
                    retained_bytes = self.wal_retained_bytes, bound_bytes = self.options.wal_retention_bytes,
                    lag_seq = dest.status.lag_seq,
                    "WAL retention is at 90% of its bound while this destination is behind: \
                     past the bound its WAL is dropped and shipping fails with ERR_BACKUP_WAL_GAP"
                );
            }
        }
        let full_backup = *self.full_backup.borrow();
        let quiet = self
            .last_backup_warning
            .is_some_and(|at| at.elapsed() < BACKUP_WARNING_EVERY);
        if let (Some(seq), true, false) = (full_backup, near, quiet) {
            // Only while that WAL is still there: once it is gone the next incremental
            // reports ERR_BACKUP_WAL_GAP itself, before its barrier.
            let still_there = match self.slot.get() {
                Ok(engine) => {
                    let engine = Arc::clone(&engine);
                    matches!(
                        lockstep_repository::blocking::run(move || engine.wal_since(seq, 1)).await,
                        Ok(Ok(_))
                    )
                }
                Err(_) => false,
            };
            if still_there {
                self.last_backup_warning = Some(Instant::now());
                tracing::error!(
                    shard = %self.shard_id, full_backup_seq = %seq,
                    retained_bytes = self.wal_retained_bytes, bound_bytes = self.options.wal_retention_bytes,
                    "WAL retention is at 90% of its bound: the next incremental or differential backup \
                     needs the WAL since the last full backup; past the bound it fails with \
                     ERR_BACKUP_WAL_GAP. Take a full backup or raise --wal-retention-mib"
                );
            }
        }
    }

    /// Positions a destination's cursor on `lineage` from what the destination holds. A new
    /// lineage whose parent's archive there stops short of the branch point (the shard moved
    /// to a new lineage before it shipped all of the old one) first finishes the parent: those
    /// writes are the shard's own, and the parent's history up to the branch point.
    /// The cursor goes after the archive's end whatever lies before it: a hole is history the
    /// archive lost (`verify` and restores through it report it), and an overlap is a late
    /// put's leftover; neither may stop the shard's new writes from shipping.
    async fn resume(&self, repo: &WalArchive, lineage: &Lineage) -> Result<Cursor> {
        if let Some(last) = repo.wal_end(&self.shard_id, lineage).await? {
            return Ok(Cursor {
                serves: lineage.id,
                lineage: *lineage,
                until: None,
                seq: last.last,
                hlc: last.hlc_max,
                has_segments: true,
            });
        }
        let parent = match lineage.parent {
            Some(id) => repo
                .wal_lineages(&self.shard_id)
                .await?
                .into_iter()
                .find(|l| l.id == id),
            None => None,
        };
        if let Some(parent) = parent {
            let end = repo.wal_end(&self.shard_id, &parent).await?;
            if let Some(last) = end.filter(|last| last.last < lineage.branch) {
                // The parent's writes up to the branch are the shard's own: appended after
                // its archive's end (a hole before it stays one, and a restore through it says
                // where).
                return Ok(Cursor {
                    serves: lineage.id,
                    lineage: parent,
                    until: Some(lineage.branch),
                    seq: last.last,
                    hlc: last.hlc_max,
                    has_segments: true,
                });
            }
        }
        Ok(Cursor::start_of(lineage))
    }

    /// A destination holds `lineage` up to `end`, past the shard's `latest`: another process
    /// shipped this history. Nothing is appended to it; the shard moves to a new orphan
    /// lineage (its writes up to `latest` cannot be told from the other history's), and the
    /// error stays on this destination until the next pass ships there.
    async fn fork(&self, lineage: &Lineage, latest: Seq, repo: &WalArchive, end: Seq) -> Error {
        // Numbered above every lineage this destination knows (the id is what tells them
        // apart; the number is for people).
        let top = repo
            .wal_lineages(&self.shard_id)
            .await
            .ok()
            .and_then(|all| all.iter().map(|l| l.timeline).max())
            .unwrap_or_default()
            .max(lineage.timeline);
        let orphan = Lineage::orphan(latest, top.next());
        let moved = match self.slot.fork(lineage, orphan) {
            Ok(true) => {
                format!("the shard continues on {orphan}, whose archive starts after {latest}")
            }
            Ok(false) => "the shard was replaced meanwhile".to_string(),
            Err(err) => format!("moving the shard to a new lineage failed: {}", err.chain()),
        };
        let err = Error::new(
            ErrorCode::BackupWalGap,
            format!(
                "history fork: {} holds {lineage} of shard {} up to {end}, past the shard's {latest}; \
                 nothing was appended to it; {moved}",
                repo.url(),
                self.shard_id
            ),
        );
        tracing::error!(shard = %self.shard_id, destination = %repo.url(), error = %err.chain(), "history fork");
        err
    }

    /// The batches after `after`, if the live shard's writes are still on lineage `serves`
    /// (a restore may have swapped the shard, or a fork moved it, since the tick began).
    async fn read_wal(&self, after: Seq, serves: LineageId) -> Result<Option<Vec<WalBatch>>> {
        // The reference itself goes to the read, not a clone of the engine: an in-place
        // restore's swap waits for every reference to drop, and fails on an engine still
        // shared past them.
        let (engine, lineage) = self.slot.get_with_lineage()?;
        if lineage.id != serves {
            return Ok(None);
        }
        let max_bytes = self.options.segment_bytes;
        lockstep_repository::blocking::run(move || engine.wal_since(after, max_bytes))
            .await
            .map_err(|err| {
                Error::with_source(ErrorCode::BackupWalArchiveFailed, "WAL read task", err)
            })?
            .map(Some)
    }

    /// Ships at most one segment to destination `index`.
    async fn ship(&mut self, index: usize, lineage: &Lineage, latest: Seq) -> Result<()> {
        if self.dests[index]
            .cursor
            .as_ref()
            .is_some_and(|c| c.until == Some(c.seq))
        {
            // The parent is finished up to the branch point: on to the shard's own lineage.
            self.dests[index].cursor = None;
        }
        let stale = self.dests[index]
            .cursor
            .as_ref()
            .is_none_or(|c| c.serves != lineage.id);
        if stale {
            let repo = self.dests[index].repo.clone();
            let cursor = self.resume(&repo, lineage).await?;
            if cursor.seq > latest && self.options.planted_bug != Some(PlantedBug::AppendAcrossFork)
            {
                return Err(self.fork(lineage, latest, &repo, cursor.seq).await);
            }
            tracing::info!(
                shard = %self.shard_id, destination = %repo.url(), lineage = %cursor.lineage,
                after = %cursor.seq, until = ?cursor.until, "WAL shipping resumes"
            );
            self.dests[index].cursor = Some(cursor);
            self.dests[index].pending_since = None;
        }
        let Some(after) = self.dests[index].cursor.as_ref().map(|c| c.seq) else {
            return Ok(());
        };
        if after >= latest {
            self.dests[index].pending_since = None;
            return Ok(());
        }
        let now = Instant::now();
        let pending_since = *self.dests[index].pending_since.get_or_insert(now);
        let until = self.dests[index].cursor.as_ref().and_then(|c| c.until);
        let batches = match self.read_wal(after, lineage.id).await {
            Ok(None) => {
                // The shard moved to another history since this tick began: nothing it wrote
                // there goes to this one; the next tick repositions.
                self.dests[index].cursor = None;
                self.dests[index].pending_since = None;
                return Ok(());
            }
            Ok(Some(mut batches)) => {
                if let Some(until) = until {
                    batches.retain(|b| b.last() <= until);
                }
                batches
            }
            Err(err) if err.code == ErrorCode::BackupWalGap => {
                let dest = &mut self.dests[index];
                if until.is_some() {
                    // What the parent lacks is gone from the WAL: its archive stays short of
                    // the branch point, and a restore there says so; on to the new lineage.
                    tracing::warn!(
                        shard = %self.shard_id, destination = %dest.repo.url(), after = %after,
                        "the WAL no longer reaches the end of the previous lineage's archive; it stays short of the branch point"
                    );
                    dest.cursor = Some(Cursor::start_of(lineage));
                    return Ok(());
                }
                if dest.cursor.as_ref().is_some_and(|c| !c.has_segments) {
                    // An empty archive starts where the WAL still reaches: nothing shipped is
                    // skipped. Its first segment's key says where that is.
                    tracing::warn!(
                        shard = %self.shard_id, destination = %dest.repo.url(), after = %after, latest = %latest,
                        "the WAL no longer reaches back to the start of this lineage; the archive starts at the next write"
                    );
                    if let Some(cursor) = dest.cursor.as_mut() {
                        cursor.seq = latest;
                    }
                    dest.pending_since = None;
                    return Ok(());
                }
                return Err(err.context(format!(
                    "ship the WAL of {} to {}",
                    self.shard_id,
                    dest.repo.url()
                )));
            }
            Err(err) => return Err(err),
        };
        let Some(last) = batches.last() else {
            return Ok(());
        };
        let (last_seq, last_hlc, oldest_hlc) = (last.last(), last.hlc, batches[0].hlc);
        let bytes: usize = batches.iter().map(|b| b.data.len()).sum();
        {
            let status = &mut self.dests[index].status;
            status.pending_bytes = bytes as u64;
            status.lag_ms = wall_ms().saturating_sub(oldest_hlc.millis());
        }
        let full = bytes >= self.options.segment_bytes;
        let old = now.duration_since(pending_since) >= self.options.segment_age;
        if !full && !old {
            return Ok(());
        }
        let Some(writes_to) = self.dests[index].cursor.as_ref().map(|c| c.lineage) else {
            return Ok(());
        };
        let segment = Segment {
            shard_id: self.shard_id.clone(),
            lineage: writes_to,
            batches,
        };
        if let Some(bandwidth) = &self.options.bandwidth {
            bandwidth.wal_upload(bytes as u64);
        }
        let repo = self.dests[index].repo.clone();
        let info = repo
            .put_wal_segment(&segment, self.options.compression)
            .await
            .map_err(|err| Error {
                code: match err.code {
                    ErrorCode::StorageDiskFull => err.code,
                    _ => ErrorCode::BackupWalArchiveFailed,
                },
                ..err
            })?;
        let lag = wall_ms().saturating_sub(oldest_hlc.millis());
        let dest = &mut self.dests[index];
        if let Some(cursor) = dest.cursor.as_mut() {
            cursor.seq = last_seq;
            cursor.hlc = last_hlc;
            cursor.has_segments = true;
        }
        dest.pending_since = (last_seq < latest).then_some(now);
        dest.status.segments_shipped += 1;
        dest.status.bytes_shipped += bytes as u64;
        dest.lags_ms.push_back(lag);
        if dest.lags_ms.len() > LAG_WINDOW {
            dest.lags_ms.pop_front();
        }
        tracing::debug!(shard = %self.shard_id, destination = %repo.url(), first = %info.first, last = %info.last, lag_ms = lag, "WAL segment shipped");
        Ok(())
    }

    fn publish(&mut self, latest: Seq) {
        let now = Instant::now();
        let statuses = self
            .dests
            .iter_mut()
            .map(|dest| {
                let status = &mut dest.status;
                if let Some(cursor) = &dest.cursor {
                    status.lineage = Some(cursor.lineage);
                    status.shipped_seq = cursor.seq;
                    status.shipped_hlc = cursor.hlc;
                }
                status.latest_seq = latest;
                status.lag_seq = latest.0.saturating_sub(status.shipped_seq.0);
                if status.lag_seq == 0 {
                    status.lag_ms = 0;
                    status.pending_bytes = 0;
                }
                status.pending_segments = if status.lag_seq == 0 {
                    0
                } else {
                    (status.pending_bytes / self.options.segment_bytes.max(1) as u64).max(1)
                };
                let (since, bytes_then) = dest.rate_window;
                let elapsed = now.duration_since(since);
                if elapsed >= Duration::from_secs(1) {
                    status.rate_bytes_per_sec =
                        ((status.bytes_shipped - bytes_then) as f64 / elapsed.as_secs_f64()) as u64;
                    dest.rate_window = (now, status.bytes_shipped);
                }
                let mut lags: Vec<u64> = dest.lags_ms.iter().copied().collect();
                lags.sort_unstable();
                status.lag_p50_ms = percentile(&lags, 0.50);
                status.lag_p99_ms = percentile(&lags, 0.99);
                status.wal_retained_bytes = self.wal_retained_bytes;
                status.clone()
            })
            .collect();
        self.status.send_replace(statuses);
    }
}

#[cfg(test)]
mod tests {
    use lockstep_repository::wal::{chain, check_segments};
    use lockstep_repository::{Repository, Timeline};

    use super::*;
    use crate::engine::{DEFAULT_CF, MemEngine, WriteBatch};

    /// How long a test waits for the shipper to reach a state, in real time.
    const PATIENCE: Duration = Duration::from_secs(30);

    struct Rig {
        _dir: tempfile::TempDir,
        slot: Arc<EngineSlot<MemEngine>>,
        archive: WalArchive,
        shard: ShardId,
    }

    impl Rig {
        async fn new(lineage: Lineage) -> Rig {
            let dir = tempfile::tempdir().expect("tempdir");
            let engine = MemEngine::open(&dir.path().join("shard"), &[]).expect("open");
            let slot = Arc::new(EngineSlot::new(
                dir.path().join("shard"),
                Arc::new(engine),
                lineage,
            ));
            let url = format!("file://{}", dir.path().join("archive").display());
            let archive = WalArchive::Store(Repository::open(&url).await.expect("archive"));
            let shard = ShardId::new("shard-0").expect("shard id");
            Rig {
                _dir: dir,
                slot,
                archive,
                shard,
            }
        }

        fn write(&self, n: u64) {
            let engine = self.slot.get().expect("engine");
            for _ in 0..n {
                let mut batch = WriteBatch::new();
                batch.put(DEFAULT_CF, b"k".to_vec(), b"v".to_vec());
                engine.write(&batch).expect("write");
            }
        }

        /// Ships `lineage`'s writes `first..=last` as another process would, from the
        /// shard's own WAL.
        async fn ship_as_another(&self, lineage: &Lineage, first: u64, last: u64) {
            let engine = self.slot.get().expect("engine");
            let batches: Vec<WalBatch> = engine
                .wal_since(Seq(first - 1), usize::MAX)
                .expect("wal")
                .into_iter()
                .take_while(|b| b.last().0 <= last)
                .collect();
            let segment = Segment {
                shard_id: self.shard.clone(),
                lineage: *lineage,
                batches,
            };
            self.archive
                .put_wal_segment(&segment, Compression::default())
                .await
                .expect("put");
        }

        fn spawn(&self, tasks: &mut JoinSet<()>, cancel: &CancellationToken) -> ShipperHandle {
            ShipperHandle::spawn(
                self.slot.clone(),
                self.shard.clone(),
                ShipperOptions {
                    destinations: vec![self.archive.clone()],
                    segment_age: Duration::ZERO,
                    ..ShipperOptions::default()
                },
                cancel.child_token(),
                tasks,
            )
        }

        /// Each lineage in the archive with the range its segments cover.
        async fn ranges(&self) -> Vec<(Lineage, Seq, Seq)> {
            let mut out = Vec::new();
            for lineage in self
                .archive
                .wal_lineages(&self.shard)
                .await
                .expect("lineages")
            {
                let segments = self
                    .archive
                    .wal_segments(&self.shard, &lineage)
                    .await
                    .expect("segments");
                check_segments(&segments).expect("contiguous");
                if let (Some(first), Some(last)) = (segments.first(), segments.last()) {
                    out.push((lineage, first.first, last.last));
                }
            }
            out
        }
    }

    async fn wait_for(handle: &ShipperHandle, done: impl Fn(&DestinationStatus) -> bool) {
        let mut status = handle.status.clone();
        let reached = tokio::time::timeout(PATIENCE, status.wait_for(|all| all.iter().all(&done)))
            .await
            .is_ok();
        assert!(
            reached,
            "the shipper never got there: {:?}",
            handle.status()
        );
    }

    #[tokio::test]
    async fn an_archive_holding_the_lineage_past_the_shard_forks_it_and_nothing_is_appended() {
        let root = Lineage::root();
        let rig = Rig::new(root).await;
        rig.write(50);
        // Another process (a clone of this shard's machine) shipped the history to 50; this
        // shard is the copy that was rolled back to 20 and goes on from there.
        rig.ship_as_another(&root, 1, 50).await;
        let rolled_back = Rig::new(root).await;
        let rolled_back = Rig {
            archive: rig.archive.clone(),
            ..rolled_back
        };
        rolled_back.write(20);

        let (mut tasks, cancel) = (JoinSet::new(), CancellationToken::new());
        let handle = rolled_back.spawn(&mut tasks, &cancel);
        wait_for(&handle, |d| {
            d.last_error.as_ref().is_some_and(|(code, message)| {
                *code == ErrorCode::BackupWalGap && message.contains("history fork")
            })
        })
        .await;
        let orphan = rolled_back.slot.lineage();
        assert_ne!(orphan.id, root.id);
        assert_eq!((orphan.parent, orphan.branch), (None, Seq(20)));
        assert_eq!(
            crate::lineage::read_lineage(rolled_back.slot.dir()).ok(),
            Some(Some(orphan)),
            "the new lineage is durable"
        );

        rolled_back.write(5);
        wait_for(&handle, |d| {
            d.shipped_seq == Seq(25) && d.last_error.is_none()
        })
        .await;
        cancel.cancel();
        let ranges = rolled_back.ranges().await;
        assert!(ranges.contains(&(root, Seq(1), Seq(50))), "{ranges:?}");
        assert!(ranges.contains(&(orphan, Seq(21), Seq(25))), "{ranges:?}");
        assert_eq!(ranges.len(), 2, "{ranges:?}");
    }

    #[tokio::test]
    async fn a_late_puts_leftover_overlapping_the_archive_does_not_stop_shipping() {
        let root = Lineage::root();
        let rig = Rig::new(root).await;
        rig.write(30);
        // Shipped as 1..=10 and 11..=20, and a put of 1..=15 that the store applied late.
        rig.ship_as_another(&root, 1, 10).await;
        rig.ship_as_another(&root, 11, 20).await;
        rig.ship_as_another(&root, 1, 15).await;

        let (mut tasks, cancel) = (JoinSet::new(), CancellationToken::new());
        let handle = rig.spawn(&mut tasks, &cancel);
        wait_for(&handle, |d| {
            d.shipped_seq == Seq(30) && d.last_error.is_none()
        })
        .await;
        cancel.cancel();
        let segments = rig
            .archive
            .wal_segments(&rig.shard, &root)
            .await
            .expect("segments");
        let chosen = chain(segments).expect("no hole");
        assert_eq!(
            chosen.iter().map(|s| (s.first, s.last)).collect::<Vec<_>>(),
            vec![(Seq(1), Seq(15)), (Seq(11), Seq(20)), (Seq(21), Seq(30))]
        );
    }

    #[tokio::test]
    async fn a_new_lineage_first_finishes_its_parents_archive_up_to_the_branch() {
        let root = Lineage::root();
        let rig = Rig::new(root).await;
        rig.write(30);
        rig.ship_as_another(&root, 1, 10).await;
        // The shard moved to a child at 30 before it shipped 11..30 of its first history.
        let child = root.child(Seq(30), Timeline(2));
        assert_eq!(rig.slot.fork(&root, child).ok(), Some(true));
        rig.write(5);

        let (mut tasks, cancel) = (JoinSet::new(), CancellationToken::new());
        let handle = rig.spawn(&mut tasks, &cancel);
        wait_for(&handle, |d| d.shipped_seq == Seq(35)).await;
        cancel.cancel();
        let ranges = rig.ranges().await;
        assert_eq!(
            ranges,
            vec![(root, Seq(1), Seq(30)), (child, Seq(31), Seq(35))]
        );
    }
}
