//! Restoring the whole cluster through its agents, all or nothing.
//!
//! 1. **Stage**: every agent downloads its shard of the backup, checks every chunk's SHA-256,
//!    opens the result and checks its sequence number, into a staging directory beside its
//!    live shard (in place) or beside its target directory (fresh machines, drills).
//! 2. **Apply**, only once every shard is staged: in place, every agent closes its write
//!    gate, swaps the staged shard in and opens it, keeping the old shard aside and the gate
//!    closed; into directories, every agent renames its staged shard to its target.
//! 3. **Decide**, once every shard is swapped: the coordinator stores the decision `commit`
//!    in the repository, unless a decision is there already (`revert`, stored by an agent
//!    whose lease ran out or that restarted mid-restore), and every shard follows the one
//!    stored: RestoreCommit opens the gates on the restored shards, RestoreDiscard puts the
//!    old ones back. An agent that does not hear it follows the stored decision when its
//!    lease runs out.
//!
//! A failure before the decision reverts every shard that was swapped and discards every
//! staged one: the cluster and every target are as they were. No shard takes a write between
//! its swap and the decision, so the shards never disagree about the cut.
//!
//! A restore runs as one operation of `ClusterOps`, so no backup's barrier runs in between,
//! and it runs to its end even if the client that asked goes away.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use lockstep_proto::archive::open_archive;
use lockstep_proto::v1::{self, RestorePhase, RestoreState};
use lockstep_proto::wire::{Label, legs_to_wire, lineage_from_wire, lineage_to_wire};
use lockstep_repository::archive::WalArchive;
use lockstep_repository::lineage::{Leg, ancestry};
use lockstep_repository::manifest::{BackupKind, BackupManifest};
use lockstep_repository::repository::RestoreDecision;
use lockstep_repository::wal::{SegmentInfo, chain, segments_covering};
use lockstep_repository::{
    BackupId, Error, ErrorCode, HlcTime, Lineage, LineageId, Repository, RestoreId, Result, Seq,
    ShardId,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backup::ShardView;
use crate::fleet::{self, AgentLink, Round, Step, call_each, poll_until};
use crate::ops::ClusterContext;

/// Where the restored shards go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// Replace every agent's live shard.
    InPlace,
    /// A directory on each agent's machine; `{shard}` in `template` is replaced by the shard
    /// id. `column_families`, unless empty, are the only ones restored (a selective restore).
    Directory {
        template: String,
        column_families: Vec<String>,
    },
}

impl RestoreTarget {
    /// From the request: exactly one of `in_place` and a directory; a selective restore only
    /// into a directory (in place it would drop the live shard's other column families).
    pub fn from_request(request: &v1::RestoreClusterRequest) -> Result<RestoreTarget> {
        let (in_place, target_dir) = (request.in_place, request.target_dir.as_str());
        let column_families = request.column_families.clone();
        if in_place && !column_families.is_empty() {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                "a selective restore (--cf) goes into a directory (--to DIR): in place it would drop the live shards' other column families",
            ));
        }
        match (in_place, target_dir.is_empty()) {
            (true, true) => Ok(RestoreTarget::InPlace),
            (false, false) if target_dir.contains("{shard}") => Ok(RestoreTarget::Directory {
                template: target_dir.to_string(),
                column_families,
            }),
            (false, false) => Ok(RestoreTarget::Directory {
                template: format!("{}/{{shard}}", target_dir.trim_end_matches('/')),
                column_families,
            }),
            _ => Err(Error::new(
                ErrorCode::InvalidArgument,
                "say where to restore: in place (replacing every live shard) or into a directory on each agent's machine, not both",
            )),
        }
    }

    fn dir_for(&self, shard: &ShardId) -> String {
        match self {
            RestoreTarget::InPlace => String::new(),
            RestoreTarget::Directory { template, .. } => {
                template.replace("{shard}", shard.as_str())
            }
        }
    }

    fn column_families(&self) -> Vec<String> {
        match self {
            RestoreTarget::InPlace => Vec::new(),
            RestoreTarget::Directory {
                column_families, ..
            } => column_families.clone(),
        }
    }
}

/// A cluster restore as clients see it.
#[derive(Debug, Clone)]
pub struct RestoreView {
    /// `None` for a dry run's plan.
    pub restore_id: Option<RestoreId>,
    /// The base backup named in progress reports (see `RestorePlan::label`).
    pub backup_id: String,
    pub phase: RestorePhase,
    pub shards: Vec<ShardView>,
    pub error: Option<(ErrorCode, String)>,
    pub plan: Vec<v1::ShardRestorePlan>,
    pub note: String,
    pub estimated_ms: u64,
}

impl RestoreView {
    pub fn to_wire(&self) -> v1::RestoreJob {
        let (error_code, error_message) = self
            .error
            .as_ref()
            .map(|(code, message)| (code.as_str().to_string(), message.clone()))
            .unwrap_or_default();
        v1::RestoreJob {
            restore_id: self
                .restore_id
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default(),
            backup_id: self.backup_id.clone(),
            phase: self.phase as i32,
            shards: self.shards.iter().map(ShardView::to_wire).collect(),
            error_code,
            error_message,
            plan: self.plan.clone(),
            note: self.note.clone(),
            estimated_ms: self.estimated_ms,
        }
    }
}

/// What a restore brings the cluster back to.
#[derive(Debug, Clone)]
pub enum PointInTime {
    /// A backup's cut.
    Backup(BackupId),
    /// A tag's recorded sequence vector, on the lineages it was taken on.
    Tag(lockstep_repository::TagName),
    /// An exact sequence number per shard.
    Seqs(BTreeMap<ShardId, Seq>),
    /// A time: by default the latest consistent restore point (a backup's cut or a tag) at or
    /// before it; `exact_per_shard` takes every shard to its own last write at or before it.
    Time {
        time: DateTime<Utc>,
        exact_per_shard: bool,
    },
    /// Every shard to the last write its archive holds on its history: the most recent state
    /// the archive can give, and not a consistent cut across shards.
    ArchiveEnd,
}

impl fmt::Display for PointInTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointInTime::Backup(id) => write!(f, "backup {id}"),
            PointInTime::Tag(name) => write!(f, "tag {name}"),
            PointInTime::Seqs(seqs) => {
                let seqs: Vec<String> = seqs.iter().map(|(s, q)| format!("{s}={q}")).collect();
                write!(f, "sequences {}", seqs.join(","))
            }
            PointInTime::Time { time, .. } => write!(f, "time {}", time.to_rfc3339()),
            PointInTime::ArchiveEnd => write!(f, "the end of every shard's archive"),
        }
    }
}

/// How one shard is restored.
#[derive(Clone)]
pub struct ShardPlan {
    pub agent: AgentLink,
    /// The full backup the shard is staged from; `None`: an empty shard, with the whole WAL
    /// from sequence 1 replayed from the archive (no backup at or before the target).
    pub base: Option<BackupId>,
    pub base_seq: Seq,
    /// Incremental and differential backups whose WAL is replayed after the base, in order,
    /// and the sequence number they reach.
    pub chain: Vec<BackupId>,
    pub chain_seq: Seq,
    /// Bytes of the base and the chain.
    pub base_bytes: u64,
    /// The lineage that holds the target (the restored shard's new history continues it),
    /// and the archive's WAL replayed after the chain, oldest lineage first.
    pub lineage: Lineage,
    pub legs: Vec<Leg>,
    pub target: Seq,
    pub target_hlc: HlcTime,
    /// The archive's segments the replay reads, in order.
    pub wal: Vec<SegmentInfo>,
}

impl ShardPlan {
    fn to_wire(&self) -> v1::ShardRestorePlan {
        v1::ShardRestorePlan {
            shard_id: self.agent.shard_id.to_string(),
            base_backup_id: self
                .base
                .as_ref()
                .map(|b| b.to_string())
                .unwrap_or_default(),
            base_seq: self.base_seq.0,
            base_bytes: self.base_bytes,
            lineage: Some(lineage_to_wire(&self.lineage)),
            wal_legs: legs_to_wire(&self.legs),
            target_seq: self.target.0,
            wal_segments: self.wal.len() as u64,
            replay_seqs: self.target.0 - self.base_seq.0,
            target_hlc: self.target_hlc.0,
            chain: self.chain.iter().map(|b| b.to_string()).collect(),
        }
    }
}

/// A checked plan: which agent restores which shard from which base, up to where.
pub struct RestorePlan {
    /// The backup named in progress reports: the base of the first shard (or "none").
    pub label: String,
    pub target: RestoreTarget,
    pub shards: Vec<ShardPlan>,
    /// The WAL archive replays read from (empty when nothing is replayed).
    pub wal_from: String,
    pub note: String,
}

impl RestorePlan {
    pub fn to_wire(&self) -> Vec<v1::ShardRestorePlan> {
        self.shards.iter().map(ShardPlan::to_wire).collect()
    }

    /// A rough duration: 200 MiB/s of download and 50,000 replayed writes per second
    /// (both measured on one machine with `make bench`; a planning aid, not a promise).
    pub fn estimated_ms(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.base_bytes / (200 * 1024 * 1024 / 1000)
                    + s.target.0.saturating_sub(s.base_seq.0) / 50
            })
            .max()
            .unwrap_or(0)
    }
}

fn invalid(message: String) -> Error {
    Error::new(ErrorCode::InvalidArgument, message)
}

/// The agent of every shard in `shards`; in place, every agent must be among them, so no
/// shard is left at another point.
fn agents_for(
    ctx: &ClusterContext,
    shards: &[ShardId],
    target: &RestoreTarget,
    what: &str,
) -> Result<Vec<AgentLink>> {
    let mut agents = Vec::new();
    for shard in shards {
        let agent = ctx
            .agents
            .iter()
            .find(|a| &a.shard_id == shard)
            .ok_or_else(|| {
                invalid(format!(
                    "{what} has shard {shard} but the topology has no agent for it; add it to the configuration"
                ))
            })?;
        agents.push(agent.clone());
    }
    if *target == RestoreTarget::InPlace
        && let Some(extra) = ctx.agents.iter().find(|a| !shards.contains(&a.shard_id))
    {
        return Err(invalid(format!(
            "shard {} is not in {what}; restoring in place would leave it at another point",
            extra.shard_id
        )));
    }
    Ok(agents)
}

/// Where a committed backup left one shard.
#[derive(Debug, Clone)]
struct BackupPoint {
    backup_id: BackupId,
    lineage: Lineage,
    seq: Seq,
    hlc: HlcTime,
}

impl BackupPoint {
    /// From `backup`'s manifest when it records the shard's HLC time (every backup since it
    /// does), else from its shard manifest.
    async fn read(repo: &Repository, backup: &BackupManifest, shard: &ShardId) -> Result<Self> {
        let recorded = backup.shards.iter().find(|s| &s.shard_id == shard);
        if let Some(s) = recorded
            && let Some(hlc) = s.hlc
        {
            return Ok(BackupPoint {
                backup_id: backup.backup_id.clone(),
                lineage: s.lineage,
                seq: s.seq,
                hlc,
            });
        }
        let manifest = repo.shard_manifest(shard, &backup.backup_id).await?;
        Ok(BackupPoint {
            backup_id: manifest.backup_id,
            lineage: manifest.lineage,
            seq: manifest.seq,
            hlc: manifest.hlc,
        })
    }
}

/// What the repository and the archive know of one shard's histories: every lineage named by
/// a backup or an archive listing, and where the backups at or before a target left it.
struct History {
    known: HashMap<LineageId, Lineage>,
    /// Committed backups whose cut of the shard is at or before the target.
    points: Vec<BackupPoint>,
}

impl History {
    async fn read(
        repo: &Repository,
        backups: &[Arc<BackupManifest>],
        archive: Option<&WalArchive>,
        shard: &ShardId,
        at_most: Seq,
    ) -> Result<History> {
        let mut known = HashMap::new();
        if let Some(archive) = archive {
            for lineage in archive.wal_lineages(shard).await? {
                known.insert(lineage.id, lineage);
            }
        }
        let mut points = Vec::new();
        for backup in backups {
            if backup.cut.get(shard).is_none_or(|s| *s > at_most) {
                continue;
            }
            let point = BackupPoint::read(repo, backup, shard).await?;
            known.insert(point.lineage.id, point.lineage);
            points.push(point);
        }
        Ok(History { known, points })
    }

    /// The history ending at `seq` of `lineage`, newest leg first (`lineage::ancestry`).
    fn legs(&self, lineage: &Lineage, seq: Seq) -> Vec<Leg> {
        let mut known = self.known.clone();
        known.insert(lineage.id, *lineage);
        ancestry(lineage, seq, &known)
    }

    /// The committed backups on the history `legs`: each on one of its lineages, at or
    /// before the last of that lineage's sequence numbers the history includes.
    fn on_history<'a, 'l>(
        &'a self,
        legs: &'l [Leg],
    ) -> impl Iterator<Item = &'a BackupPoint> + use<'a, 'l> {
        self.points.iter().filter(|m| {
            legs.iter()
                .any(|leg| leg.lineage.id == m.lineage.id && m.seq <= leg.to)
        })
    }

    /// The latest committed backup on the history `legs`; of those at the same sequence
    /// number, the last committed.
    fn base(&self, legs: &[Leg]) -> Option<&BackupPoint> {
        self.on_history(legs).max_by_key(|m| m.seq)
    }
}

/// How `shard` is restored to backup `id`: the full backup at the root of its chain, then
/// the incremental and differential backups from there to `id` (ending with `id` unless it
/// is full). A parent that is gone makes the chain unrestorable: `ERR_BACKUP_INCOMPLETE`.
fn chain_of(
    backups: &[Arc<BackupManifest>],
    id: &BackupId,
    shard: &ShardId,
) -> Result<(BackupId, Seq, Vec<BackupId>, u64)> {
    let find = |id: &BackupId| backups.iter().find(|b| &b.backup_id == id);
    let mut current = find(id)
        .ok_or_else(|| Error::new(ErrorCode::BackupNotFound, format!("backup {id} not found")))?;
    let bytes_of = |b: &BackupManifest| {
        b.shards
            .iter()
            .find(|s| &s.shard_id == shard)
            .map_or(0, |s| s.bytes)
    };
    let mut chain = Vec::new();
    let mut bytes = 0;
    while current.kind != BackupKind::Full {
        if chain.len() > backups.len() {
            return Err(Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!("backup {id}: its chain of parents loops"),
            ));
        }
        chain.push(current.backup_id.clone());
        bytes += bytes_of(current);
        let parent = current.parent.as_ref().ok_or_else(|| {
            Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!(
                    "{} backup {} names no parent",
                    current.kind, current.backup_id
                ),
            )
        })?;
        current = find(parent).ok_or_else(|| {
            Error::new(
                ErrorCode::BackupIncomplete,
                format!(
                    "backup {} continues backup {parent}, which is gone; restore a later full backup",
                    current.backup_id
                ),
            )
        })?;
    }
    chain.reverse();
    let base_seq = current.cut.get(shard).copied().ok_or_else(|| {
        Error::new(
            ErrorCode::BackupIncomplete,
            format!("backup {} has no shard {shard}", current.backup_id),
        )
    })?;
    Ok((
        current.backup_id.clone(),
        base_seq,
        chain,
        bytes + bytes_of(current),
    ))
}

/// The lineage of a shard's live agent (PITR follows the current history).
async fn live_lineage(ctx: &ClusterContext, agent: &AgentLink) -> Result<Lineage> {
    let deadline = Instant::now() + Step::Describe.timeout(&ctx.config.barrier);
    let mut replies = call_each(
        [agent],
        Step::Describe,
        deadline,
        |_, mut client| async move { client.describe(v1::DescribeRequest {}).await },
    )
    .await;
    let info = replies
        .pop()
        .ok_or_else(|| Error::new(ErrorCode::AgentUnavailable, "no reply to describe"))??;
    lineage_from_wire(
        info.lineage.as_ref(),
        &format!("the lineage of shard {}", agent.shard_id),
    )
}

/// The last write of `shard` at or before `at` along the history `legs` (newest first) in
/// the archive, after `floor` (a backup's point at or before `at`, on one of the legs) when
/// there is one: its sequence number and time, or `None` when the archive holds none.
async fn last_write_at_or_before(
    archive: &WalArchive,
    shard: &ShardId,
    legs: &[Leg],
    at: HlcTime,
    floor: Option<&BackupPoint>,
) -> Result<Option<(Seq, HlcTime)>> {
    for leg in legs {
        // Writes on the floor's leg up to it, and on older legs, come before the floor.
        let on_floor = floor.filter(|p| p.lineage.id == leg.lineage.id);
        let after = on_floor.map_or(Seq(0), |p| p.seq);
        let mut segments = archive
            .segments_after(shard, &leg.lineage, after, leg.to)
            .await?;
        // On an open-ended leg, a listing from a mark can miss a leftover reaching past
        // every other segment (decision 042). Writes past a found one later than `at` are
        // later too; only when every write found is at or before `at` can the answer lie
        // past them, and then the whole lineage is listed.
        if leg.to == Seq::MAX && segments.iter().all(|s| s.hlc_max <= at) {
            segments = archive.wal_segments(shard, &leg.lineage).await?;
            segments.retain(|s| s.last > after);
        }
        let segments = chain(segments)?;
        for info in segments.iter().rev().filter(|s| s.hlc_min <= at) {
            let segment = archive.get_wal_segment(info).await?;
            let found = segment
                .batches
                .iter()
                .rev()
                .find(|b| b.hlc <= at && b.last() <= leg.to)
                .map(|b| (b.last(), b.hlc));
            if found.is_some() {
                return Ok(found);
            }
        }
        if on_floor.is_some() {
            break;
        }
    }
    Ok(None)
}

/// Each agent's shard to its last archived write at or before `at` on its live history (or,
/// before the archive, the latest backup there); `when` names `at` in errors. Returns a note
/// per shard.
async fn exact_targets(
    ctx: &ClusterContext,
    backups: &[Arc<BackupManifest>],
    wal_from: &str,
    at: HlcTime,
    when: &str,
    targets: &mut BTreeMap<ShardId, (Seq, Option<Lineage>, HlcTime)>,
) -> Result<Vec<String>> {
    if wal_from.is_empty() {
        return Err(invalid(
            "a restore to a time or to the archive's end needs a WAL archive: set wal_archive in the configuration or pass --wal-from".into(),
        ));
    }
    let archive = open_archive(wal_from, &ctx.security, ctx.repo.seal()).await?;
    let mut notes = Vec::new();
    for agent in ctx.agents.iter() {
        let lineage = live_lineage(ctx, agent).await?;
        let history = History::read(
            &ctx.repo,
            backups,
            Some(&archive),
            &agent.shard_id,
            Seq::MAX,
        )
        .await?;
        let legs = history.legs(&lineage, Seq::MAX);
        // A backup on this history may reach further than the archive (shipping lagged or
        // failed): the later of the two. The archive is searched after it only.
        let backed_up = history
            .on_history(&legs)
            .filter(|m| m.hlc <= at)
            .max_by_key(|m| m.seq);
        let archived =
            last_write_at_or_before(&archive, &agent.shard_id, &legs, at, backed_up).await?;
        let (seq, hlc) = archived
            .into_iter()
            .chain(backed_up.map(|m| (m.seq, m.hlc)))
            .max_by_key(|(seq, _)| *seq)
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::BackupNotFound,
                    format!(
                        "shard {}: no backup or archived write at or before {when}",
                        agent.shard_id
                    ),
                )
            })?;
        notes.push(format!("{} to seq {seq} ({hlc})", agent.shard_id));
        targets.insert(agent.shard_id.clone(), (seq, Some(lineage), hlc));
    }
    Ok(notes)
}

/// The consistent restore points at or before `at` on the cluster's live history, newest
/// first: backups whose every shard was cut at or before it, and (when there is a WAL archive
/// to replay a tag from) tags whose every point was, automatic tags included; by the time of
/// their last write, a backup before a tag at the same time (it needs no replay). A point on
/// a history a restore abandoned since is never one: its writes are not the cluster's.
async fn consistent_points(
    ctx: &ClusterContext,
    backups: &[Arc<BackupManifest>],
    wal_from: &str,
    at: HlcTime,
) -> Result<Vec<PointInTime>> {
    let archive = if wal_from.is_empty() {
        None
    } else {
        Some(open_archive(wal_from, &ctx.security, ctx.repo.seal()).await?)
    };
    // Each shard's live history, every lineage to where the shard inherited it.
    let mut live: BTreeMap<ShardId, Vec<Leg>> = BTreeMap::new();
    for agent in ctx.agents.iter() {
        let lineage = live_lineage(ctx, agent).await?;
        let history = History::read(
            &ctx.repo,
            backups,
            archive.as_ref(),
            &agent.shard_id,
            Seq::MAX,
        )
        .await?;
        live.insert(agent.shard_id.clone(), history.legs(&lineage, Seq::MAX));
    }
    // A shard's point: at or before `at` (an unknown time, 0, never is) and on its history.
    let on_live = |shard: &ShardId, lineage: &Lineage, seq: Seq, hlc: HlcTime| {
        hlc <= at
            && hlc != HlcTime::default()
            && live.get(shard).is_some_and(|legs| {
                legs.iter()
                    .any(|leg| leg.lineage.id == lineage.id && seq <= leg.to)
            })
    };
    let mut points: Vec<(HlcTime, bool, PointInTime)> = Vec::new();
    for backup in backups.iter().rev() {
        if backup.cut.len() != live.len() || !backup.cut.keys().all(|s| live.contains_key(s)) {
            continue;
        }
        let mut latest = HlcTime::default();
        let mut usable = true;
        for shard in backup.cut.keys() {
            let point = BackupPoint::read(&ctx.repo, backup, shard).await?;
            usable &= on_live(shard, &point.lineage, point.seq, point.hlc);
            latest = latest.max(point.hlc);
            if !usable {
                break;
            }
        }
        if usable {
            points.push((latest, true, PointInTime::Backup(backup.backup_id.clone())));
        }
    }
    if archive.is_some() {
        for (_, tag) in ctx.repo.tags().await? {
            let Ok(tag) = tag else {
                continue;
            };
            let usable = tag.points.len() == live.len()
                && tag
                    .points
                    .iter()
                    .all(|(shard, p)| on_live(shard, &p.lineage, p.seq, p.hlc));
            if usable {
                let latest = tag.points.values().map(|p| p.hlc).max().unwrap_or_default();
                points.push((latest, false, PointInTime::Tag(tag.name)));
            }
        }
    }
    points.sort_by_key(|(time, is_backup, _)| std::cmp::Reverse((*time, *is_backup)));
    Ok(points.into_iter().map(|(_, _, point)| point).collect())
}

/// How many consistent restore points a snapped time tries, newest first, before it gives up.
const SNAP_ATTEMPTS: usize = 8;

/// Plans a restore: resolves the point in time to an exact sequence number per shard, and
/// picks for each shard the latest backup at or before it on its history (its lineage and the
/// ancestors it inherited from), with its chain, and the WAL legs from there.
pub async fn plan(
    ctx: &ClusterContext,
    point: PointInTime,
    target: RestoreTarget,
    wal_from: Option<String>,
) -> Result<RestorePlan> {
    let wal_from = wal_from
        .filter(|url| !url.is_empty())
        .or_else(|| ctx.config.wal_archive.clone())
        .unwrap_or_default();
    // The catalog as indexed: shared, not copied (a plan reads what it needs from it).
    let catalog = ctx.repo.catalog().await?;
    let backups = catalog.backups();
    let mut note = String::new();
    // Each shard's target, with its lineage (None: the live one) and HLC time if known.
    let mut targets: BTreeMap<ShardId, (Seq, Option<Lineage>, HlcTime)> = BTreeMap::new();
    let what;
    match point {
        PointInTime::Backup(id) => {
            let manifest = ctx.repo.backup_manifest(&id).await?;
            what = format!("backup {id}");
            let shards: Vec<ShardId> = manifest.cut.keys().cloned().collect();
            let agents = agents_for(ctx, &shards, &target, &what)?;
            let mut plans = Vec::new();
            for agent in agents {
                let shard = ctx.repo.shard_manifest(&agent.shard_id, &id).await?;
                let (base, base_seq, chain, base_bytes) = chain_of(backups, &id, &agent.shard_id)?;
                if !chain.is_empty() {
                    note = format!(
                        "{} backup {id}: full backup {base}, then the WAL of {}",
                        manifest.kind,
                        chain
                            .iter()
                            .map(|b| b.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                plans.push(ShardPlan {
                    agent,
                    base: Some(base),
                    base_seq,
                    chain,
                    chain_seq: shard.seq,
                    base_bytes,
                    lineage: shard.lineage,
                    legs: Vec::new(),
                    target: shard.seq,
                    target_hlc: shard.hlc,
                    wal: Vec::new(),
                });
            }
            return Ok(RestorePlan {
                label: id.to_string(),
                target,
                shards: plans,
                wal_from: String::new(),
                note,
            });
        }
        PointInTime::Tag(name) => {
            let tag = ctx.repo.tag(&name).await?;
            what = format!("tag {name}");
            note = format!(
                "tag {name}, taken {}",
                tag.created_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            );
            for (shard, point) in tag.points {
                targets.insert(shard, (point.seq, Some(point.lineage), point.hlc));
            }
        }
        PointInTime::Seqs(seqs) => {
            what = "the sequence vector".to_string();
            for (shard, seq) in seqs {
                targets.insert(shard, (seq, None, HlcTime::default()));
            }
        }
        PointInTime::Time {
            time,
            exact_per_shard,
        } => {
            let at = HlcTime::at_or_before(time);
            what = format!("time {}", time.to_rfc3339());
            if !exact_per_shard {
                // The newest point that plans: one whose WAL the archive lacks is skipped,
                // and the note says so.
                let mut skipped = Vec::new();
                for snapped in consistent_points(ctx, backups, &wal_from, at)
                    .await?
                    .into_iter()
                    .take(SNAP_ATTEMPTS)
                {
                    let described = snapped.to_string();
                    match Box::pin(plan(ctx, snapped, target.clone(), Some(wal_from.clone()))).await
                    {
                        Ok(mut plan) => {
                            let skipped = if skipped.is_empty() {
                                String::new()
                            } else {
                                format!(" (later ones cannot be restored: {})", skipped.join("; "))
                            };
                            let planned = if plan.note.is_empty() {
                                String::new()
                            } else {
                                format!("; {}", plan.note)
                            };
                            plan.note = format!(
                                "snapped to {described}, the latest consistent restore point at or before {}{skipped}; \
                                 use --exact-per-shard for each shard's last write at or before it{planned}",
                                time.to_rfc3339(),
                            );
                            return Ok(plan);
                        }
                        Err(err) => skipped.push(format!("{described}: {}", err.message)),
                    }
                }
                return Err(Error::new(
                    ErrorCode::BackupNotFound,
                    format!(
                        "no consistent restore point on the cluster's history at or before {}{}",
                        time.to_rfc3339(),
                        if skipped.is_empty() {
                            String::new()
                        } else {
                            format!(" can be restored: {}", skipped.join("; "))
                        }
                    ),
                ));
            }
            let notes = exact_targets(
                ctx,
                backups,
                &wal_from,
                at,
                &time.to_rfc3339(),
                &mut targets,
            )
            .await?;
            note = format!("exact per shard: {}", notes.join(", "));
        }
        PointInTime::ArchiveEnd => {
            what = "the end of every shard's archive".to_string();
            let notes = exact_targets(
                ctx,
                backups,
                &wal_from,
                HlcTime(u64::MAX),
                "the end of its archive",
                &mut targets,
            )
            .await?;
            note = format!(
                "NOT a consistent cut across shards: each shard to the end of its archive: {}",
                notes.join(", ")
            );
        }
    }
    let shards: Vec<ShardId> = targets.keys().cloned().collect();
    let agents = agents_for(ctx, &shards, &target, &what)?;
    let archive = if wal_from.is_empty() {
        None
    } else {
        Some(open_archive(&wal_from, &ctx.security, ctx.repo.seal()).await?)
    };
    let mut plans = Vec::new();
    let mut empty_bases = Vec::new();
    for agent in agents {
        let (seq, lineage, hlc) = targets[&agent.shard_id];
        let lineage = match lineage {
            Some(lineage) => lineage,
            None => live_lineage(ctx, &agent).await?,
        };
        let history =
            History::read(&ctx.repo, backups, archive.as_ref(), &agent.shard_id, seq).await?;
        // Newest first: legs[0] holds the target itself.
        let mut legs = history.legs(&lineage, seq);
        let point = legs[0].lineage;
        let latest = history.base(&legs).cloned();
        // With no backup on the history at or before the target (the backup repository is
        // gone, or the shard shipped its WAL from its first write), the shard is rebuilt from
        // empty by replaying the archive from sequence 1, if the history reaches back there.
        let (base, base_seq, chain, base_bytes, chain_seq) = match &latest {
            Some(latest) => {
                let (base, base_seq, chain, bytes) =
                    chain_of(backups, &latest.backup_id, &agent.shard_id)?;
                // The replay starts on the base's lineage: older legs are not needed.
                if let Some(at) = legs.iter().position(|l| l.lineage.id == latest.lineage.id) {
                    legs.truncate(at + 1);
                }
                (Some(base), base_seq, chain, bytes, latest.seq)
            }
            None if archive.is_some() => {
                let root = legs[legs.len() - 1].lineage;
                if root.parent.is_some() || root.branch > Seq(0) {
                    return Err(Error::new(
                        ErrorCode::BackupNotFound,
                        format!(
                            "shard {}: no backup on {lineage}'s history at or before sequence {seq}, and the archive's history of it starts after sequence {} ({root}); pick a later point or restore a backup",
                            agent.shard_id, root.branch
                        ),
                    ));
                }
                empty_bases.push(agent.shard_id.to_string());
                (None, Seq(0), Vec::new(), 0, Seq(0))
            }
            None => {
                return Err(Error::new(
                    ErrorCode::BackupNotFound,
                    format!(
                        "shard {}: no backup on {lineage}'s history at or before sequence {seq}, and no WAL archive to rebuild it from; take a full backup",
                        agent.shard_id
                    ),
                ));
            }
        };
        legs.reverse();
        let mut wal = Vec::new();
        if seq > chain_seq {
            let from = latest.as_ref().map_or("an empty shard".to_string(), |l| {
                format!("backup {}", l.backup_id)
            });
            let archive = archive.as_ref().ok_or_else(|| {
                invalid(format!(
                    "shard {} needs WAL after {from} (seq {chain_seq} to {seq}): set wal_archive in the configuration or pass --wal-from",
                    agent.shard_id
                ))
            })?;
            let mut cursor = chain_seq;
            for leg in legs.iter().filter(|leg| leg.to > chain_seq) {
                let needed = segments_covering(
                    archive
                        .segments_after(&agent.shard_id, &leg.lineage, cursor, leg.to)
                        .await?,
                    cursor,
                    leg.to,
                    format_args!(
                        "shard {} {} in {} (needed after {from})",
                        agent.shard_id,
                        leg.lineage,
                        archive.url()
                    ),
                )?;
                wal.extend(needed);
                cursor = leg.to;
            }
        }
        plans.push(ShardPlan {
            agent,
            base,
            base_seq,
            chain,
            chain_seq,
            base_bytes,
            lineage: point,
            legs,
            target: seq,
            target_hlc: hlc,
            wal,
        });
    }
    let label = plans
        .first()
        .map(|p| {
            p.base
                .as_ref()
                .map_or("(none)".to_string(), |b| b.to_string())
        })
        .ok_or_else(|| invalid(format!("{what} names no shard")))?;
    if !empty_bases.is_empty() {
        let rebuilt = format!(
            "no backup at or before the target for {}: rebuilt from empty shards by replaying the WAL archive from sequence 1",
            empty_bases.join(", ")
        );
        note = if note.is_empty() {
            rebuilt
        } else {
            format!("{note}; {rebuilt}")
        };
    }
    Ok(RestorePlan {
        label,
        target,
        shards: plans,
        wal_from,
        note,
    })
}

fn shard_view(shard: &ShardId, status: &v1::RestoreStatus) -> ShardView {
    ShardView {
        shard_id: shard.clone(),
        state: status.state().label(),
        seq: status.seq,
        bytes_done: status.bytes_done,
        bytes_total: status.bytes_total,
        gate_closed_us: 0,
        error: (!status.error_code.is_empty())
            .then(|| (status.error_code.clone(), status.error_message.clone())),
    }
}

fn status_error(shard: &ShardId, status: &v1::RestoreStatus) -> Error {
    let code = ErrorCode::parse(&status.error_code).unwrap_or(ErrorCode::BackupRestorationFailed);
    let detail = if status.error_message.is_empty() {
        format!("the agent reports {}", status.state().label())
    } else {
        status.error_message.clone()
    };
    Error::new(code, format!("shard {shard}: {detail}"))
}

/// The stream a client follows a restore on.
pub type Updates = mpsc::Sender<std::result::Result<v1::RestoreJob, tonic::Status>>;

/// Publishes progress views to the client; a slow client misses some.
struct Reporter<'a> {
    view: RestoreView,
    tx: &'a Updates,
}

impl Reporter<'_> {
    fn progress(&self) {
        let _ = self.tx.try_send(Ok(self.view.to_wire()));
    }

    /// The final view of `outcome`.
    fn finish(mut self, outcome: Result<()>) -> v1::RestoreJob {
        match outcome {
            Ok(()) => self.view.phase = RestorePhase::Done,
            Err(err) => {
                tracing::error!(restore = ?self.view.restore_id, backup = %self.view.backup_id, error = %err.chain(), "restore failed");
                self.view.phase = RestorePhase::Failed;
                self.view.error = Some((err.code, err.chain()));
            }
        }
        self.view.to_wire()
    }
}

/// Runs a planned restore to its end, reporting progress on `tx`, and returns the final view.
/// On failure, or on `cancel` before Apply is sent, every staged shard is discarded; once
/// Apply is sent the restore's decision settles it (each agent's swap is bounded by
/// `apply_timeout_ms`).
pub async fn run(
    ctx: &ClusterContext,
    plan: RestorePlan,
    restore_id: RestoreId,
    tx: &Updates,
    cancel: &CancellationToken,
) -> v1::RestoreJob {
    let mut reporter = Reporter {
        view: RestoreView {
            restore_id: Some(restore_id.clone()),
            backup_id: plan.label.clone(),
            phase: RestorePhase::Staging,
            shards: Vec::new(),
            error: None,
            plan: plan.to_wire(),
            note: plan.note.clone(),
            estimated_ms: plan.estimated_ms(),
        },
        tx,
    };
    tracing::info!(restore = %restore_id, backup = %plan.label, target = ?plan.target, "restore started");
    // Recorded before any agent stages, so a coordinator that stops mid-restore discards it
    // or settles it by its decision when it starts again (`settle_interrupted`); rewritten as
    // `applying` before the first Apply.
    let record = |phase: &str| {
        serde_json::json!({
            "restore_id": restore_id,
            "phase": phase,
            "backup": plan.label,
            "target": match &plan.target {
                RestoreTarget::InPlace => "in place",
                RestoreTarget::Directory { template, .. } => template.as_str(),
            },
            "shards": plan.shards.iter().map(|s| s.agent.shard_id.to_string()).collect::<Vec<_>>(),
            "started_at": Utc::now(),
        })
        .to_string()
        .into_bytes()
    };
    let recorded = match ctx.fence.check("start a restore").await {
        Ok(()) => {
            ctx.repo
                .put_running_restore(&restore_id, record(STAGING))
                .await
        }
        Err(err) => Err(err),
    };
    if let Err(err) = recorded {
        return reporter.finish(Err(
            err.context("record the restore in the repository; nothing changed")
        ));
    }
    // Cancelled (`lockstep restore --abort`, or a shutdown) any time before Apply is sent.
    let staged = tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(cancelled()),
        staged = async {
            stage(ctx, &plan, &restore_id, &mut reporter).await?;
            crate::backup::fault_pause("before-apply", &restore_id).await;
            Ok(())
        } => staged,
    };
    let staged = match staged {
        // Cancelled while the last shard staged: still before the decision to apply.
        Ok(()) if cancel.is_cancelled() => Err(cancelled()),
        Ok(()) => match ctx.fence.check("apply the restore").await {
            Ok(()) => ctx
                .repo
                .put_running_restore(&restore_id, record(APPLYING))
                .await
                .map_err(|err| err.context("record the restore's Apply; nothing changed")),
            Err(err) => Err(err),
        },
        Err(err) => Err(err),
    };
    let (outcome, settled) = match staged {
        Ok(()) => {
            crate::backup::fault_pause("applying", &restore_id).await;
            apply(ctx, &plan, &restore_id, &mut reporter).await
        }
        Err(err) => {
            let discarded = discard_everywhere(ctx, &plan, &restore_id).await;
            (Err(err), discarded)
        }
    };
    if outcome.is_ok() {
        tracing::info!(restore = %restore_id, backup = %plan.label, "restore done");
    }
    if !settled {
        tracing::warn!(restore = %restore_id, "some shards did not confirm the restore's decision or discard; they follow it when their lease runs out, and the record stays for the next operation to settle");
        ctx.restores_to_settle
            .store(true, std::sync::atomic::Ordering::SeqCst);
    } else if let Err(err) = ctx.repo.delete_running_restore(&restore_id).await {
        tracing::warn!(restore = %restore_id, error = %err.chain(), "could not remove the restore's record; the next start settles it again");
    }
    reporter.finish(outcome)
}

/// Records a restore's outcome in the metrics.
pub fn record_outcome(view: &v1::RestoreJob, took: std::time::Duration) {
    use lockstep_process::metrics as names;
    let done = view.phase() == RestorePhase::Done;
    metrics::gauge!(names::RESTORE_LAST_STATUS).set(if done { 1.0 } else { 0.0 });
    metrics::counter!(names::RESTORES, "outcome" => if done { "done" } else { "failed" })
        .increment(1);
    metrics::histogram!(names::RESTORE_DURATION).record(took.as_secs_f64());
}

fn cancelled() -> Error {
    Error::new(
        ErrorCode::BarrierAborted,
        "the restore was cancelled (`lockstep restore --abort`, or the coordinator is shutting down) before any shard changed",
    )
}

/// How often the coordinator renews the agents' restore leases while Apply runs (the lease is
/// the agents' default, 30 s).
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A restore's record before Apply: settling discards it.
const STAGING: &str = "staging";
/// A restore's record once Apply may have been sent: settling follows its decision.
const APPLYING: &str = "applying";

/// What [`settle_interrupted`] did.
#[derive(Debug, Default)]
pub struct Settled {
    /// Restores discarded everywhere, or whose decision every shard carried out; their
    /// records are removed.
    pub settled: Vec<RestoreId>,
    /// Restores not settled: kept for the next try when an agent did not answer, the
    /// decision cannot be read or the record is unreadable.
    pub unsettled: Vec<(RestoreId, Error)>,
}

/// Settles every restore recorded as under way: at start, each was left by a coordinator that
/// stopped before it ended. One recorded before Apply is discarded on its shards; one whose
/// Apply may have been sent follows its decision in the repository, deciding revert if there
/// is none (no shard has committed without one).
pub async fn settle_interrupted(ctx: &ClusterContext) -> Result<Settled> {
    ctx.fence.check("settle interrupted restores").await?;
    let mut outcome = Settled::default();
    for restore_id in ctx.repo.running_restore_ids().await? {
        match settle_one(ctx, &restore_id).await {
            Ok(()) => {
                ctx.repo.delete_running_restore(&restore_id).await?;
                outcome.settled.push(restore_id);
            }
            Err(err) => {
                tracing::error!(restore = %restore_id, error = %err.chain(), "a restore a stopped coordinator left is not settled yet; its record stays");
                outcome.unsettled.push((restore_id, err));
            }
        }
    }
    Ok(outcome)
}

/// Sends `step` (RestoreStatus, RestoreCommit or RestoreDiscard) for `restore_id` to
/// `agents`; a reply for another shard than the agent's is an error.
async fn ask_restore(
    ctx: &ClusterContext,
    agents: &[&AgentLink],
    restore_id: &RestoreId,
    step: Step,
) -> Vec<Result<v1::RestoreStatus>> {
    let deadline = Instant::now() + step.timeout(&ctx.config.barrier);
    let replies = call_each(agents.iter().copied(), step, deadline, |_, mut client| {
        let request = v1::RestoreRequest {
            restore_id: restore_id.to_string(),
            ..Default::default()
        };
        async move {
            match step {
                Step::RestoreStatus => client.restore_status(request).await,
                Step::RestoreCommit => client.restore_commit(request).await,
                _ => client.restore_discard(request).await,
            }
        }
    })
    .await;
    agents
        .iter()
        .zip(replies)
        .map(|(agent, reply)| reply.and_then(|status| own_shard(agent, status)))
        .collect()
}

/// Settles one recorded restore (`Ok` when settled or its record is gone already), `Err` to
/// try again later.
async fn settle_one(ctx: &ClusterContext, restore_id: &RestoreId) -> Result<()> {
    let Some(record) = ctx.repo.running_restore(restore_id).await? else {
        return Ok(());
    };
    let record: serde_json::Value = serde_json::from_slice(&record).map_err(|err| {
        Error::new(
            ErrorCode::BackupManifestCorrupt,
            format!(
                "the record of restore {restore_id} is unreadable ({err}); it stays for an operator"
            ),
        )
    })?;
    let shards: Vec<&str> = record["shards"]
        .as_array()
        .map(|shards| shards.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    // The recorded shards' agents (every agent if the record names none).
    let agents: Vec<&AgentLink> = ctx
        .agents
        .iter()
        .filter(|a| shards.is_empty() || shards.contains(&a.shard_id.as_str()))
        .collect();
    let decision = match record["phase"].as_str() {
        // No Apply was sent: nothing is swapped anywhere.
        Some(STAGING) => RestoreDecision::Revert,
        _ => {
            ctx.repo
                .decide_restore(restore_id, RestoreDecision::Revert, "coordinator at start")
                .await?
        }
    };
    carry_out(ctx, &agents, restore_id, decision)
        .await
        .map_err(|unreachable| {
            fleet::joined(
                &unreachable,
                "some agents did not answer; they follow the restore's decision when their lease runs out, and the next start or `lockstep restore --abort` tries again",
            )
        })?;
    tracing::warn!(restore = %restore_id, ?decision, "settled a restore a stopped coordinator left");
    Ok(())
}

/// Has every agent carry out `decision` (RestoreCommit, or RestoreDiscard: a staged shard is
/// dropped, a swapped one reverted). `Err` lists the agents that did not confirm. An agent
/// that answers `Unknown` restarted, and its start-up followed the decision.
async fn carry_out(
    ctx: &ClusterContext,
    agents: &[&AgentLink],
    restore_id: &RestoreId,
    decision: RestoreDecision,
) -> std::result::Result<Vec<v1::RestoreStatus>, Vec<Error>> {
    let step = match decision {
        RestoreDecision::Commit => Step::RestoreCommit,
        RestoreDecision::Revert => Step::RestoreDiscard,
    };
    let mut statuses = Vec::new();
    let mut unconfirmed = Vec::new();
    for (agent, reply) in agents
        .iter()
        .zip(ask_restore(ctx, agents, restore_id, step).await)
    {
        let confirmed = |state| match decision {
            RestoreDecision::Commit => {
                matches!(state, RestoreState::Applied | RestoreState::Unknown)
            }
            RestoreDecision::Revert => discarded(state),
        };
        match reply {
            Ok(status) if confirmed(status.state()) => statuses.push(status),
            Ok(status) => unconfirmed.push(Error::new(
                ErrorCode::BackupRestorationFailed,
                format!(
                    "shard {}: the restore is {} although it decided {decision:?}",
                    agent.shard_id,
                    status.state().label()
                ),
            )),
            Err(err) => unconfirmed.push(err),
        }
    }
    if unconfirmed.is_empty() {
        Ok(statuses)
    } else {
        Err(unconfirmed)
    }
}

fn request(plan: &RestorePlan, shard: &ShardPlan, restore_id: &RestoreId) -> v1::RestoreRequest {
    let replays = shard.target > shard.chain_seq;
    v1::RestoreRequest {
        restore_id: restore_id.to_string(),
        backup_id: shard
            .base
            .as_ref()
            .map(|b| b.to_string())
            .unwrap_or_default(),
        target_dir: plan.target.dir_for(&shard.agent.shard_id),
        wal_from: if replays {
            plan.wal_from.clone()
        } else {
            String::new()
        },
        wal_legs: if replays {
            legs_to_wire(&shard.legs)
        } else {
            Vec::new()
        },
        target_lineage: Some(lineage_to_wire(&shard.lineage)),
        replay_to_seq: shard.target.0,
        chain: shard.chain.iter().map(|b| b.to_string()).collect(),
        // The agent's default, 30 s: the restore is polled every 100 ms while it runs.
        lease_ms: 0,
        column_families: plan.target.column_families(),
    }
}

/// The request for the shard `agent` restores.
fn request_for(
    plan: &RestorePlan,
    agent: &AgentLink,
    restore_id: &RestoreId,
) -> v1::RestoreRequest {
    let shard = plan
        .shards
        .iter()
        .find(|s| s.agent.shard_id == agent.shard_id);
    shard.map_or_else(v1::RestoreRequest::default, |shard| {
        request(plan, shard, restore_id)
    })
}

fn plan_agents(plan: &RestorePlan) -> Vec<&AgentLink> {
    plan.shards.iter().map(|s| &s.agent).collect()
}

/// Sends `step` (RestoreStage, RestoreApply or RestoreDiscard) for the plan's shard to every
/// agent of the plan, under the step's deadline; one result per agent, in plan order.
async fn on_every_shard(
    ctx: &ClusterContext,
    plan: &RestorePlan,
    restore_id: &RestoreId,
    step: Step,
) -> Vec<Result<v1::RestoreStatus>> {
    let deadline = Instant::now() + step.timeout(&ctx.config.barrier);
    let replies = call_each(plan_agents(plan), step, deadline, |agent, mut client| {
        let request = request_for(plan, agent, restore_id);
        async move {
            match step {
                Step::RestoreStage => client.restore_stage(request).await,
                Step::RestoreApply => client.restore_apply(request).await,
                _ => client.restore_discard(request).await,
            }
        }
    })
    .await;
    plan_agents(plan)
        .into_iter()
        .zip(replies)
        .map(|(agent, reply)| reply.and_then(|status| own_shard(agent, status)))
        .collect()
}

/// A restore status from the agent of the shard it was asked about; an agent that answers
/// for another shard (endpoints swapped in the configuration) would restore that shard to
/// this one's point.
fn own_shard(agent: &AgentLink, status: v1::RestoreStatus) -> Result<v1::RestoreStatus> {
    if status.shard_id != agent.shard_id.as_str() {
        return Err(crate::backup::wrong_shard(agent, &status.shard_id));
    }
    Ok(status)
}

/// Discards the restore on every shard; false if some agent did not confirm (it may be cut
/// off, not gone, and hold its staged shard, refusing barriers, until its lease runs out):
/// the record then stays for the next operation to settle.
async fn discard_everywhere(
    ctx: &ClusterContext,
    plan: &RestorePlan,
    restore_id: &RestoreId,
) -> bool {
    let replies = on_every_shard(ctx, plan, restore_id, Step::RestoreDiscard).await;
    let mut confirmed = true;
    for (agent, reply) in plan_agents(plan).into_iter().zip(replies) {
        match reply {
            Ok(status) if discarded(status.state()) => {}
            Ok(status) => {
                tracing::warn!(shard = %agent.shard_id, restore = %restore_id, state = status.state().label(), "discard not carried out");
                confirmed = false;
            }
            Err(err) => {
                tracing::warn!(shard = %agent.shard_id, restore = %restore_id, error = %err.chain(), "discard not acknowledged");
                confirmed = false;
            }
        }
    }
    confirmed
}

/// A shard's restore state once a discard (or a revert) is carried out: dropped, failed, or
/// unknown (its agent restarted, and its start-up followed the decision).
fn discarded(state: RestoreState) -> bool {
    matches!(
        state,
        RestoreState::Discarded | RestoreState::Failed | RestoreState::Unknown
    )
}

/// Phase 1: every shard staged and checked.
async fn stage(
    ctx: &ClusterContext,
    plan: &RestorePlan,
    restore_id: &RestoreId,
    reporter: &mut Reporter<'_>,
) -> Result<()> {
    let barrier = &ctx.config.barrier;
    let agents = plan_agents(plan);
    // Phase 1: stage everywhere.
    let stages = on_every_shard(ctx, plan, restore_id, Step::RestoreStage).await;
    let failures: Vec<Error> = stages.into_iter().filter_map(|r| r.err()).collect();
    if !failures.is_empty() {
        return Err(fleet::joined(&failures, "restore refused, nothing changed"));
    }

    poll_until(
        &agents,
        Step::RestoreStatus,
        barrier,
        Instant::now() + barrier.upload_timeout(),
        Error::new(
            ErrorCode::BackupRestorationFailed,
            "the shards were not downloaded within upload_timeout_ms; nothing changed",
        ),
        |agent, mut client| {
            let request = request_for(plan, agent, restore_id);
            async move { client.restore_status(request).await }
        },
        |replies| {
            let mut shards = Vec::new();
            let mut failures = Vec::new();
            let mut all_ready = true;
            for (agent, reply) in agents.iter().zip(replies) {
                match reply {
                    Ok(status) => {
                        let state = status.state();
                        if state == RestoreState::Staging {
                            all_ready = false;
                        } else if state != RestoreState::Staged {
                            // Failed, or Unknown: the agent restarted and lost its staging.
                            failures.push(status_error(&agent.shard_id, status));
                        }
                        shards.push(shard_view(&agent.shard_id, status));
                    }
                    Err(_) => all_ready = false,
                }
            }
            if !shards.is_empty() {
                reporter.view.shards = shards;
            }
            reporter.progress();
            if !failures.is_empty() {
                return Err(fleet::joined(&failures, "restore failed, nothing changed"));
            }
            Ok(if all_ready {
                Round::Done
            } else {
                Round::Continue
            })
        },
    )
    .await
}

/// Phases 2 and 3: every shard is staged and checked; swap them in (or rename them into their
/// directories), then decide, and have every shard carry the decision out. Returns the
/// outcome and whether every shard confirmed it (else the record stays).
async fn apply(
    ctx: &ClusterContext,
    plan: &RestorePlan,
    restore_id: &RestoreId,
    reporter: &mut Reporter<'_>,
) -> (Result<()>, bool) {
    let agents = plan_agents(plan);
    reporter.view.phase = RestorePhase::Applying;
    reporter.progress();
    // The shards that swapped first hold under their lease while a slow one drains (up to
    // `apply_timeout_ms`): a status poll renews it.
    let apply = on_every_shard(ctx, plan, restore_id, Step::RestoreApply);
    tokio::pin!(apply);
    let applies = loop {
        tokio::select! {
            applies = &mut apply => break applies,
            _ = tokio::time::sleep(RENEW_EVERY) => {
                let _ = ask_restore(ctx, &agents, restore_id, Step::RestoreStatus).await;
            }
        }
    };
    let mut failures = Vec::new();
    let mut shards = Vec::new();
    for (agent, reply) in agents.iter().zip(applies) {
        match reply {
            Ok(status) if status.state() == RestoreState::Swapped => {
                shards.push(shard_view(&agent.shard_id, &status));
            }
            Ok(status) => {
                failures.push(status_error(&agent.shard_id, &status));
                shards.push(shard_view(&agent.shard_id, &status));
            }
            Err(err) => failures.push(err),
        }
    }
    if !shards.is_empty() {
        reporter.view.shards = shards;
    }
    let wanted = if failures.is_empty() {
        crate::backup::fault_pause("swapped", restore_id).await;
        RestoreDecision::Commit
    } else {
        RestoreDecision::Revert
    };
    let decided = match ctx.fence.check("decide the restore").await {
        // A fenced-out coordinator decides nothing: the shards hold, and follow what the
        // coordinator that took over, or their lease, decides.
        Ok(()) => {
            ctx.repo
                .decide_restore(restore_id, wanted, "coordinator")
                .await
        }
        Err(err) => Err(err),
    };
    let decision = match decided {
        Ok(decision) => decision,
        Err(err) => {
            // Nothing is known: sending either would split the shards if the other decision
            // was stored after all. Every swapped shard holds its gate until it reads one.
            failures.push(err.context("store the restore's decision"));
            return (
                Err(fleet::joined(
                    &failures,
                    "the restore's outcome is not decided: every swapped shard holds its writes until the repository answers, then follows the decision stored there (revert, unless this coordinator's commit landed)",
                )),
                false,
            );
        }
    };
    if decision == RestoreDecision::Revert && failures.is_empty() {
        failures.push(Error::new(
            ErrorCode::BackupRestorationFailed,
            "a shard decided to revert the restore before the coordinator could commit it (its lease ran out, or its agent restarted)",
        ));
    }
    crate::backup::fault_pause("decided", restore_id).await;
    let carried = carry_out(ctx, &agents, restore_id, decision).await;
    let settled = carried.is_ok();
    if let Ok(statuses) = &carried
        && decision == RestoreDecision::Commit
    {
        let committed: Vec<ShardView> = agents
            .iter()
            .zip(statuses)
            .map(|(agent, status)| shard_view(&agent.shard_id, status))
            .filter(|view| view.state != "unknown")
            .collect();
        if committed.len() == reporter.view.shards.len() {
            reporter.view.shards = committed;
        }
    }
    match decision {
        RestoreDecision::Commit => {
            if let Err(unconfirmed) = &carried {
                for err in unconfirmed {
                    tracing::warn!(restore = %restore_id, error = %err.chain(), "a shard did not confirm the commit; it commits when its lease runs out");
                }
            }
            (check_cut(plan, &reporter.view), settled)
        }
        RestoreDecision::Revert => {
            if let Err(unconfirmed) = carried {
                failures.extend(unconfirmed.into_iter().map(|err| err.context("revert")));
            }
            (
                Err(fleet::joined(
                    &failures,
                    "restore failed; every shard that was swapped is reverted to its old data (one that did not confirm reverts when its lease runs out)",
                )),
                settled,
            )
        }
    }
}

/// Every restored shard must sit exactly at its target.
fn check_cut(plan: &RestorePlan, view: &RestoreView) -> Result<()> {
    for shard in &view.shards {
        let expected = plan
            .shards
            .iter()
            .find(|s| s.agent.shard_id == shard.shard_id)
            .map(|s| s.target.0);
        if expected != Some(shard.seq) {
            return Err(Error::new(
                ErrorCode::BackupRestorationFailed,
                format!(
                    "shard {} was restored at sequence {}, its target is {:?}",
                    shard.shard_id, shard.seq, expected
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use lockstep_repository::Timeline;

    use super::*;

    /// Puts the segment of writes `first..=last` (each at HLC time = its sequence number),
    /// marked or not as asked.
    async fn put_segment(
        repo: &Repository,
        lineage: Lineage,
        first: u64,
        last: u64,
        marked: bool,
    ) -> SegmentInfo {
        for nonce in 0u32.. {
            let segment = lockstep_repository::wal::Segment {
                shard_id: ShardId::new("shard-0").expect("shard"),
                lineage,
                batches: (first..=last)
                    .map(|seq| lockstep_repository::wal::WalBatch {
                        first: Seq(seq),
                        count: 1,
                        hlc: HlcTime::new(seq, 0),
                        data: nonce.to_le_bytes().to_vec(),
                    })
                    .collect(),
            };
            let compression = lockstep_repository::codec::Compression::default();
            let (info, _) = lockstep_repository::repository::encode_wal_segment(
                &segment,
                compression,
                repo.seal(),
            )
            .await
            .expect("encode");
            if info.is_marked() == marked {
                return repo
                    .put_wal_segment(&segment, compression)
                    .await
                    .expect("put");
            }
        }
        unreachable!()
    }

    #[tokio::test]
    async fn a_restore_to_a_time_finds_a_leftover_that_the_mark_and_the_end_miss() {
        let repo = Repository::open("memory://time-leftover")
            .await
            .expect("repo");
        let (shard, lineage) = (ShardId::new("shard-0").expect("shard"), Lineage::root());
        for n in 1..=1100 {
            put_segment(&repo, lineage, n, n, n == 1000).await;
        }
        // The end is 1100; then a put of 990..=1200 applied late, starting before the mark
        // (1000) and in an earlier directory than the end, reaching past everything else.
        let end = repo.wal_end(&shard, &lineage).await.expect("end");
        assert_eq!(end.map(|e| e.last), Some(Seq(1100)));
        put_segment(&repo, lineage, 990, 1200, false).await;
        let archive = WalArchive::Store(repo.clone());
        let legs = [Leg {
            lineage,
            to: Seq::MAX,
        }];
        let floor = BackupPoint {
            lineage,
            ..manifest("bk-1", lineage, 1050)
        };
        let at = |t| HlcTime::new(t, 0);
        assert_eq!(
            last_write_at_or_before(&archive, &shard, &legs, at(5000), Some(&floor))
                .await
                .expect("search"),
            Some((Seq(1200), at(1200))),
            "the leftover's writes after 1100 are the latest"
        );
        // A time inside what the listing from the mark found needs nothing past it.
        assert_eq!(
            last_write_at_or_before(&archive, &shard, &legs, at(1070), Some(&floor))
                .await
                .expect("search"),
            Some((Seq(1070), at(1070)))
        );
    }

    fn manifest(id: &str, lineage: Lineage, seq: u64) -> BackupPoint {
        BackupPoint {
            backup_id: BackupId::new(id).expect("backup id"),
            seq: Seq(seq),
            lineage,
            hlc: HlcTime::default(),
        }
    }

    #[test]
    fn a_point_on_a_branch_restores_from_the_latest_backup_its_history_shares() {
        // Root 1..5,000; a restore at 2,000 started a child; the child went on to 7,000 and
        // another restore at 6,000 started a grandchild.
        let root = Lineage::root();
        let child = root.child(Seq(2_000), Timeline(2));
        let grandchild = child.child(Seq(6_000), Timeline(3));
        let history = History {
            known: [root, child, grandchild]
                .into_iter()
                .map(|l| (l.id, l))
                .collect(),
            points: vec![
                manifest("bk-root-1000", root, 1_000),
                // Taken on the abandoned part of the root: never a base for the branches.
                manifest("bk-root-3000", root, 3_000),
                manifest("bk-child-4000", child, 4_000),
                // Past the grandchild's branch point on the child: not on its history.
                manifest("bk-child-6500", child, 6_500),
            ],
        };
        let legs = history.legs(&grandchild, Seq(8_000));
        assert_eq!(
            legs.iter()
                .map(|l| (l.lineage.id, l.to))
                .collect::<Vec<_>>(),
            vec![
                (grandchild.id, Seq(8_000)),
                (child.id, Seq(6_000)),
                (root.id, Seq(2_000))
            ]
        );
        let base = history.base(&legs).map(|m| m.backup_id.to_string());
        assert_eq!(base.as_deref(), Some("bk-child-4000"));

        // On the child before its first backup: the root's backup before the branch.
        let legs = history.legs(&child, Seq(3_500));
        let base = history.base(&legs).map(|m| m.backup_id.to_string());
        assert_eq!(base.as_deref(), Some("bk-root-1000"));

        // On the root itself, past the branch: its own later backup.
        let legs = history.legs(&root, Seq(4_000));
        let base = history.base(&legs).map(|m| m.backup_id.to_string());
        assert_eq!(base.as_deref(), Some("bk-root-3000"));
    }
}
