//! Retention: which backups and tags a repository keeps (`[retention]` in the configuration,
//! `lockstep retention apply [--dry-run]`, or after every committed backup).
//!
//! The plan is a pure function of the catalog, the tags, the policy and the time, so each
//! policy shape is a unit test. Rules, in the words operators know from pgBackRest and
//! restic:
//! - full backups are kept by count (`keep_full`), by age (`keep_full_days`: those of the last
//!   D days and the newest one before, so the start of the window stays restorable), and by
//!   calendar (`keep_daily`/`weekly`/`monthly`: the newest full of each of the last N UTC days,
//!   ISO weeks or months that have one); the rules add up;
//! - incrementals and differentials go with their full;
//! - the recovery window (`recovery_window_hours`) keeps every backup completed in it and the
//!   newest full before it, so every instant in the window can be restored;
//! - never removed: the newest good backup, pinned backups and tags (`pinned`), every parent
//!   a kept backup needs, a backup whose manifest cannot be read (an operator decides), and the
//!   newest backup at or before each kept tag (its base);
//! - tags go when older than `keep_tags_days` (0 keeps every tag), unless pinned or in the
//!   recovery window.
//!
//! The catalog's WAL archives, the repository's own `wal/` and, with `prune_wal_archive`,
//! `wal_archive` (an object store or a `lockstep://` service), lose, per shard, the segments no backup of the
//! catalog can replay: those before the oldest backup on each history, and forks none
//! reaches. The backups a pass removes still count in that pass (a restore may be reading
//! one): their WAL goes in the next. Kept always: a lineage no backup is on, before or after
//! (the archive may serve another repository's backups), a lineage whose ancestry reaches one
//! known nowhere, the segment of every lineage that reaches furthest (where shipping resumes,
//! and what keeps the lineage and its timeline listed), every segment younger than `[gc]
//! grace_s`, everything while any backup manifest cannot be read, and an archive that cannot
//! be listed (the plan says so; the backups and tags go ahead). A `lockstep://` archive (with
//! `prune_wal_archive`) is pruned through its service (`DeleteSegments`), which keeps the
//! segment where a lineage ends whatever it is asked. An archive that cannot be pruned stops
//! its own pruning (the plan's WAL line says so), not the apply.
//!
//! Removing a backup removes its manifests; its objects become garbage for `lockstep gc`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Datelike, Duration, Utc};
use lockstep_repository::archive::WalArchive;
use lockstep_repository::lineage::ancestry;
use lockstep_repository::manifest::{BackupKind, BackupManifest, TagManifest};
use lockstep_repository::wal::SegmentInfo;
use lockstep_repository::{
    BackupId, Error, ErrorCode, Lineage, LineageId, Result, Seq, ShardId, TagName,
};
use serde::{Deserialize, Serialize};

use crate::ops::ClusterContext;

/// The retention policy (`[retention]`); all zero (the default) keeps everything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Keep the newest N full backups.
    pub keep_full: u32,
    /// Keep the full backups of the last D days, and the newest one before them.
    pub keep_full_days: u32,
    /// Keep the newest full of each of the last N days, ISO weeks, months (UTC) that have one.
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    /// Every instant of the last H hours stays restorable.
    pub recovery_window_hours: u32,
    /// Tags older than D days go, unless pinned or in the recovery window; 0 keeps them all.
    pub keep_tags_days: u32,
    /// Backup ids and tag names never removed.
    pub pinned: Vec<String>,
    /// Apply the policy after every committed backup.
    pub after_backup: bool,
    /// Prune `wal_archive` too (the repository's own `wal/` always is): set it when no other
    /// repository's backups replay that archive.
    pub prune_wal_archive: bool,
    /// Simulations only: prune the WAL as if the newest backup were the only one, stranding
    /// the older kept backups: the bug their checkers must catch.
    #[serde(skip)]
    pub planted_bug: bool,
}

impl RetentionConfig {
    /// True when no rule keeps any full backup: applying it is refused (it would keep only
    /// the newest backup, which is never what an operator meant).
    pub fn is_empty(&self) -> bool {
        self.keep_full == 0
            && self.keep_full_days == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
            && self.recovery_window_hours == 0
    }
}

/// One backup or tag and what the plan does with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// `backup`, `tag`, or `wal` (a run of one shard's segments on one lineage).
    pub what: &'static str,
    pub name: String,
    pub remove: bool,
    /// Every reason it is kept, or why it goes.
    pub reasons: Vec<String>,
}

/// What applying the policy does.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    /// Every backup (oldest first in commit order), then every tag (oldest first), then the
    /// WAL archive's runs of segments by shard, lineage and sequence.
    pub items: Vec<Decision>,
    /// What happens to the WAL archive, in one line.
    pub wal: String,
    /// The segments the plan removes, by archive.
    #[serde(skip)]
    pub wal_doomed: Vec<(WalArchive, Vec<SegmentInfo>)>,
}

impl Plan {
    pub fn removed(&self) -> impl Iterator<Item = &Decision> {
        self.items.iter().filter(|item| item.remove)
    }
}

/// `now - span`, or the earliest time there is for a span longer than history.
fn before(now: DateTime<Utc>, span: Duration) -> DateTime<Utc> {
    now.checked_sub_signed(span)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A point of the cluster's history: each shard's lineage and sequence number.
type Point = BTreeMap<ShardId, (Lineage, Seq)>;

fn backup_point(backup: &BackupManifest) -> Point {
    backup
        .shards
        .iter()
        .map(|r| (r.shard_id.clone(), (r.lineage, r.seq)))
        .collect()
}

fn tag_point(tag: &TagManifest) -> Point {
    tag.points
        .iter()
        .map(|(shard, p)| (shard.clone(), (p.lineage, p.seq)))
        .collect()
}

/// Whether `backup` lies on the history that leads to `point` on every shard (a restore can
/// start from it and replay to the point), as the restore planner decides it.
fn on_history(backup: &BackupManifest, point: &Point, known: &HashMap<LineageId, Lineage>) -> bool {
    point.iter().all(|(shard, (lineage, seq))| {
        backup
            .shards
            .iter()
            .find(|r| &r.shard_id == shard)
            .is_some_and(|r| {
                ancestry(lineage, *seq, known)
                    .iter()
                    .any(|leg| leg.lineage.id == r.lineage.id && r.seq <= leg.to)
            })
    })
}

/// The WAL part of a plan before the archive is read.
const WAL_UNREAD: &str = "not planned: the archive was not read";

/// One shard's WAL archive: each lineage with its segments in sequence order.
pub type ShardArchive = Vec<(Lineage, Vec<SegmentInfo>)>;

/// Why a segment stays or goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WalFate {
    Unrelated,
    UnknownHistory,
    Needed(BackupId),
    Young,
    Last,
    Removed,
}

impl WalFate {
    fn reason(&self, grace: Duration) -> String {
        match self {
            WalFate::Unrelated => {
                "no kept backup is on this history or before it (another repository's?)".into()
            }
            WalFate::UnknownHistory => {
                "a lineage before it is not known here, so what it needs is unknown".into()
            }
            WalFate::Needed(id) => format!("replayed from kept backup {id}"),
            WalFate::Young => format!("younger than [gc] grace_s ({} s)", grace.num_seconds()),
            WalFate::Last => "the lineage's last segment: shipping resumes after it".into(),
            WalFate::Removed => "no backup replays it".into(),
        }
    }
}

/// Plans the WAL archive against the backups the plan keeps: per shard and lineage, which
/// segments no kept backup can replay (module docs). `known` holds every lineage known
/// elsewhere (every backup's, removed ones included, every tag's, other archives'): a
/// lineage whose ancestry reaches one known nowhere is kept whole. Returns the runs of
/// segments with their fate, and the segments to remove.
pub fn plan_wal(
    kept: &[&BackupManifest],
    archive: &BTreeMap<ShardId, ShardArchive>,
    known: &HashMap<LineageId, Lineage>,
    now: DateTime<Utc>,
    grace: Duration,
) -> (Vec<Decision>, Vec<SegmentInfo>) {
    let young_after = before(now, grace);
    let (mut items, mut doomed) = (Vec::new(), Vec::new());
    for (shard, lineages) in archive {
        let starts: Vec<(Lineage, Seq, &BackupId)> = kept
            .iter()
            .flat_map(|m| {
                m.shards
                    .iter()
                    .filter(|r| &r.shard_id == shard)
                    .map(|r| (r.lineage, r.seq, &m.backup_id))
            })
            .collect();
        let mut known = known.clone();
        known.extend(
            lineages
                .iter()
                .map(|(l, _)| *l)
                .chain(starts.iter().map(|(l, _, _)| *l))
                .map(|l| (l.id, l)),
        );
        // Each lineage and its ancestors, with the last sequence number of each the lineage's
        // own writes build on (itself: all of them); and whether it reaches a root (a lineage
        // with no parent) rather than one known nowhere.
        let chain = |lineage: &Lineage| -> (Vec<(LineageId, Seq)>, bool) {
            let mut chain = vec![(lineage.id, Seq(u64::MAX))];
            let (mut current, mut to) = (*lineage, Seq(u64::MAX));
            while let Some(parent) = current.parent {
                let Some(parent) = known.get(&parent) else {
                    return (chain, false);
                };
                if chain.len() > known.len() {
                    return (chain, false); // a loop in a damaged listing
                }
                to = to.min(current.branch);
                chain.push((parent.id, to));
                current = *parent;
            }
            (chain, true)
        };
        let start_chains: Vec<Vec<(LineageId, Seq)>> =
            starts.iter().map(|(l, _, _)| chain(l).0).collect();
        for (lineage, segments) in lineages {
            let (own, complete) = chain(lineage);
            // A lineage is related when a kept backup is on it, before it, or after it.
            let related = starts.iter().zip(&start_chains).any(|((l, _, _), c)| {
                own.iter().any(|(id, _)| *id == l.id) || c.iter().any(|(id, _)| *id == lineage.id)
            });
            // The kept backup that needs the most of this lineage: segments ending after its
            // sequence number are replayed from it (from one on an ancestor: all of them).
            let needed_after: Option<(Seq, &BackupId)> = starts
                .iter()
                .filter_map(|(l, seq, id)| {
                    if l.id == lineage.id {
                        return Some((*seq, *id));
                    }
                    own.iter()
                        .skip(1)
                        .find(|(ancestor, to)| *ancestor == l.id && seq <= to)
                        .map(|_| (Seq(0), *id))
                })
                .min_by_key(|(seq, _)| *seq);
            // The segment that reaches furthest: where shipping resumes.
            let end = lockstep_repository::wal::furthest(segments);
            let mut run: Option<(WalFate, &SegmentInfo, &SegmentInfo)> = None;
            let flush = |run: Option<(WalFate, &SegmentInfo, &SegmentInfo)>,
                         items: &mut Vec<Decision>| {
                if let Some((fate, first, last)) = run {
                    items.push(Decision {
                        what: "wal",
                        name: format!("{shard} {} {}..={}", lineage.id, first.first, last.last),
                        remove: fate == WalFate::Removed,
                        reasons: vec![fate.reason(grace)],
                    });
                }
            };
            for segment in segments {
                let fate = if !related {
                    WalFate::Unrelated
                } else if !complete {
                    WalFate::UnknownHistory
                } else if let Some((_, id)) =
                    needed_after.filter(|(after, _)| segment.last > *after)
                {
                    WalFate::Needed(id.clone())
                } else if segment.hlc_max.to_datetime() > young_after {
                    WalFate::Young
                } else if end == Some(segment) {
                    WalFate::Last
                } else {
                    WalFate::Removed
                };
                if fate == WalFate::Removed {
                    doomed.push(segment.clone());
                }
                run = match run {
                    Some((current, first, _)) if current == fate => Some((current, first, segment)),
                    other => {
                        flush(other, &mut items);
                        Some((fate, segment, segment))
                    }
                };
            }
            flush(run, &mut items);
        }
    }
    (items, doomed)
}

/// Plans the policy over `backups` (commit order, oldest first, as `Repository::backups`
/// returns them) and `tags`, at `now`.
pub fn plan(
    policy: &RetentionConfig,
    backups: &[(BackupId, Result<BackupManifest>)],
    tags: &[(TagName, Result<TagManifest>)],
    now: DateTime<Utc>,
) -> Result<Plan> {
    if policy.is_empty() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            "the retention policy keeps no full backup: set keep_full, keep_full_days, keep_daily, keep_weekly, keep_monthly or recovery_window_hours in [retention]",
        ));
    }
    let good: Vec<&BackupManifest> = backups
        .iter()
        .filter_map(|(_, m)| m.as_ref().ok())
        .collect();
    let by_id: HashMap<&BackupId, &BackupManifest> =
        good.iter().map(|&m| (&m.backup_id, m)).collect();
    let mut reasons: BTreeMap<BackupId, Vec<String>> = BTreeMap::new();
    fn keep(reasons: &mut BTreeMap<BackupId, Vec<String>>, id: &BackupId, why: String) {
        reasons.entry(id.clone()).or_default().push(why);
    }

    // Every lineage the catalog and the tags name, to follow a history back through the
    // restores that started it.
    let mut known: HashMap<LineageId, Lineage> = HashMap::new();
    for lineage in good
        .iter()
        .flat_map(|m| m.shards.iter().map(|r| r.lineage))
        .chain(
            tags.iter()
                .filter_map(|(_, tag)| tag.as_ref().ok())
                .flat_map(|tag| tag.points.values().map(|p| p.lineage)),
        )
    {
        known.insert(lineage.id, lineage);
    }
    let fulls: Vec<&BackupManifest> = good
        .iter()
        .copied()
        .filter(|m| m.kind == BackupKind::Full)
        .collect();
    // By count.
    for full in fulls.iter().rev().take(policy.keep_full as usize) {
        keep(
            &mut reasons,
            &full.backup_id,
            format!("one of the newest {} full backups", policy.keep_full),
        );
    }
    // By age: the window, and the newest full before it.
    if policy.keep_full_days > 0 {
        let since = before(now, Duration::days(i64::from(policy.keep_full_days)));
        let why = format!("a full backup of the last {} days", policy.keep_full_days);
        for full in fulls.iter().filter(|m| m.completed_at >= since) {
            keep(&mut reasons, &full.backup_id, why.clone());
        }
        if let Some(before) = fulls.iter().rev().find(|m| m.completed_at < since) {
            keep(
                &mut reasons,
                &before.backup_id,
                format!(
                    "the newest full before the last {} days (their start stays restorable)",
                    policy.keep_full_days
                ),
            );
        }
    }
    // By calendar: the newest full of each of the last N buckets that have one.
    type Bucket = fn(&DateTime<Utc>) -> (i32, u32);
    let calendar: [(&str, &str, u32, Bucket); 3] = [
        ("day", "keep_daily", policy.keep_daily, |t| {
            (t.year(), t.ordinal())
        }),
        ("week", "keep_weekly", policy.keep_weekly, |t| {
            let week = t.iso_week();
            (week.year(), week.week())
        }),
        ("month", "keep_monthly", policy.keep_monthly, |t| {
            (t.year(), t.month())
        }),
    ];
    for (unit, rule, n, bucket_of) in calendar {
        let mut seen = BTreeSet::new();
        for full in fulls.iter().rev() {
            if seen.len() >= n as usize {
                break;
            }
            let bucket = bucket_of(&full.completed_at);
            if seen.insert(bucket) {
                keep(
                    &mut reasons,
                    &full.backup_id,
                    format!("the newest full of its {unit} ({rule} {n})"),
                );
            }
        }
    }
    // The recovery window: every backup in it, and the newest full before it.
    let window_start = (policy.recovery_window_hours > 0).then(|| {
        before(
            now,
            Duration::hours(i64::from(policy.recovery_window_hours)),
        )
    });
    if let Some(start) = window_start {
        let why = format!(
            "in the recovery window of {} hours",
            policy.recovery_window_hours
        );
        for backup in good.iter().filter(|m| m.completed_at >= start) {
            keep(&mut reasons, &backup.backup_id, why.clone());
        }
        // Each history the window holds (a restore starts a new one) is restored, from the
        // window's start to its first backup, from the newest full before the window on it.
        let mut histories: Vec<Point> = good
            .iter()
            .filter(|m| m.completed_at >= start)
            .map(|m| backup_point(m))
            .collect();
        histories.extend(
            tags.iter()
                .filter_map(|(_, tag)| tag.as_ref().ok())
                .filter(|tag| tag.created_at >= start)
                .map(tag_point),
        );
        if histories.is_empty() {
            histories.extend(good.last().map(|m| backup_point(m)));
        }
        for history in &histories {
            if let Some(anchor) = fulls
                .iter()
                .rev()
                .find(|m| m.completed_at < start && on_history(m, history, &known))
            {
                keep(
                    &mut reasons,
                    &anchor.backup_id,
                    "the newest full before the recovery window on a history in it: the window's start is restored from it".into(),
                );
            }
        }
    }
    // The newest good backup, pins, and what each kept tag is restored from.
    if let Some(newest) = good.last() {
        keep(
            &mut reasons,
            &newest.backup_id,
            "the newest good backup".into(),
        );
    }
    let pinned: BTreeSet<&str> = policy.pinned.iter().map(String::as_str).collect();
    for backup in good
        .iter()
        .filter(|m| pinned.contains(m.backup_id.as_str()))
    {
        keep(&mut reasons, &backup.backup_id, "pinned".into());
    }
    let mut items_tags = Vec::new();
    for (name, tag) in tags {
        let mut decision = Decision {
            what: "tag",
            name: name.to_string(),
            remove: false,
            reasons: Vec::new(),
        };
        match tag {
            Err(err) => decision
                .reasons
                .push(format!("unreadable ({}), kept for an operator", err.code)),
            Ok(tag) => {
                if pinned.contains(name.as_str()) {
                    decision.reasons.push("pinned".into());
                }
                if window_start.is_some_and(|start| tag.created_at >= start) {
                    decision.reasons.push("in the recovery window".into());
                }
                let old = policy.keep_tags_days > 0
                    && tag.created_at
                        < before(now, Duration::days(i64::from(policy.keep_tags_days)));
                if !old {
                    decision.reasons.push(if policy.keep_tags_days == 0 {
                        "tags are kept (keep_tags_days 0)".into()
                    } else {
                        format!("younger than {} days", policy.keep_tags_days)
                    });
                }
                if decision.reasons.is_empty() {
                    decision.remove = true;
                    decision
                        .reasons
                        .push(format!("older than {} days", policy.keep_tags_days));
                } else if let Some(base) = good.iter().rev().find(|m| {
                    m.completed_at <= tag.created_at && on_history(m, &tag_point(tag), &known)
                }) {
                    keep(
                        &mut reasons,
                        &base.backup_id,
                        format!("the newest backup before kept tag {name}"),
                    );
                }
            }
        }
        items_tags.push(decision);
    }
    // Incrementals and differentials go with their full; every parent of a kept backup stays.
    let root_of = |id: &BackupId| -> Option<BackupId> {
        let mut m = *by_id.get(id)?;
        for _ in 0..good.len() {
            match &m.parent {
                None => return Some(m.backup_id.clone()),
                Some(parent) => m = by_id.get(parent)?,
            }
        }
        None
    };
    for backup in good.iter().filter(|m| m.kind != BackupKind::Full) {
        match root_of(&backup.backup_id) {
            Some(root) if reasons.contains_key(&root) => keep(
                &mut reasons,
                &backup.backup_id,
                format!("its full backup {root} is kept"),
            ),
            Some(_) => {}
            None => keep(
                &mut reasons,
                &backup.backup_id,
                "its chain is incomplete; kept for an operator".into(),
            ),
        }
    }
    let kept: Vec<BackupId> = reasons.keys().cloned().collect();
    for id in kept {
        let mut at = by_id.get(&id).and_then(|m| m.parent.clone());
        while let Some(parent) = at {
            keep(
                &mut reasons,
                &parent,
                format!("a parent of kept backup {id}"),
            );
            at = by_id.get(&parent).and_then(|m| m.parent.clone());
        }
    }
    let mut items: Vec<Decision> = backups
        .iter()
        .map(|(id, manifest)| {
            let (remove, why) = match (manifest, reasons.remove(id)) {
                (Err(err), _) => (
                    false,
                    vec![format!("unreadable ({}), kept for an operator", err.code)],
                ),
                (Ok(_), Some(mut why)) => {
                    why.dedup();
                    (false, why)
                }
                (Ok(_), None) => (true, vec!["no rule keeps it".into()]),
            };
            Decision {
                what: "backup",
                name: id.to_string(),
                remove,
                reasons: why,
            }
        })
        .collect();
    items.extend(items_tags);
    Ok(Plan {
        items,
        wal: WAL_UNREAD.into(),
        wal_doomed: Vec::new(),
    })
}

/// Plans the configured policy now, and unless `dry_run` removes what it names: tags first,
/// then backups newest first, so a parent never goes before its children. Run under
/// `ClusterOps` (no backup picks a parent meanwhile); every removal checks the fence.
pub async fn apply(ctx: &ClusterContext, dry_run: bool) -> Result<Plan> {
    // Every committed backup, whatever this coordinator saw so far: what no rule keeps goes.
    ctx.repo.reconciled_catalog().await?;
    let backups = ctx.repo.backups().await?;
    let tags = ctx.repo.tags().await?;
    let now = Utc::now();
    let mut plan = plan(&ctx.config.retention, &backups, &tags, now)?;
    plan_archive(ctx, &mut plan, &backups, &tags, now).await;
    for pin in &ctx.config.retention.pinned {
        if !plan.items.iter().any(|item| &item.name == pin) {
            tracing::warn!(pin = %pin, "a retention pin names no backup or tag");
        }
    }
    if dry_run {
        return Ok(plan);
    }
    // A manifest that could not be read for now (not a corrupt one) might be a child, a pin
    // or a tag whose base the plan would then remove: nothing is removed until it reads.
    let unread = backups
        .iter()
        .filter_map(|(id, m)| m.as_ref().err().map(|err| (id.to_string(), err)))
        .chain(
            tags.iter()
                .filter_map(|(name, t)| t.as_ref().err().map(|err| (name.to_string(), err))),
        )
        .find(|(_, err)| !err.is_damaged_record());
    if let Some((name, err)) = unread {
        return Err(Error::new(
            err.code,
            format!(
                "{name} could not be read ({}); nothing was removed: retry once it reads",
                err.message
            ),
        ));
    }
    let removed: Vec<&Decision> = plan.removed().collect();
    for item in removed.iter().filter(|item| item.what == "tag") {
        let name = TagName::new(item.name.as_str())?;
        ctx.fence.check(&format!("remove tag {name}")).await?;
        ctx.repo.delete_tag(&name).await?;
        tracing::info!(tag = %name, reasons = ?item.reasons, "retention: tag removed");
    }
    for item in removed.iter().rev().filter(|item| item.what == "backup") {
        let backup = BackupId::new(item.name.as_str())?;
        ctx.fence.check(&format!("remove backup {backup}")).await?;
        ctx.repo
            .delete_backup(&backup, &ctx.config.shard_ids())
            .await?;
        tracing::info!(backup = %backup, reasons = ?item.reasons, "retention: backup removed");
    }
    // The backups are gone: an archive that cannot be pruned now (unreachable, or too old to
    // take deletes) keeps its segments, and the next pass prunes them.
    let mut stopped = Vec::new();
    for (archive, doomed) in &plan.wal_doomed {
        let (removed, failed) = prune(&ctx.fence, archive, doomed).await?;
        tracing::info!(archive = %archive.url(), segments = removed, "retention: WAL segments removed");
        if let Some(err) = failed {
            tracing::warn!(archive = %archive.url(), error = %err.chain(), "retention: WAL pruning stopped; the next pass goes on");
            stopped.push(format!(
                "pruning {} stopped after {removed} segment(s): {} (the next pass goes on)",
                archive.url(),
                err.chain()
            ));
        }
    }
    for note in stopped {
        plan.wal = format!("{}; {note}", plan.wal);
    }
    Ok(plan)
}

/// Removes `doomed` from `archive` in batches, each after a fence check: how many went, and
/// the error that stopped it early (the archive unreachable, or too old to take deletes).
/// Only a lost fence is an error: nothing more may be removed by this coordinator.
async fn prune(
    fence: &crate::fence::Fence,
    archive: &WalArchive,
    doomed: &[SegmentInfo],
) -> Result<(usize, Option<Error>)> {
    let mut removed = 0;
    for batch in doomed.chunks(WAL_DELETE_BATCH) {
        fence.check("remove WAL segments").await?;
        if let Err(err) = archive.delete_wal_segments(batch).await {
            return Ok((removed, Some(err)));
        }
        removed += batch.len();
    }
    Ok((removed, None))
}

/// Segments deleted between two fence checks.
const WAL_DELETE_BATCH: usize = 64;

/// Reads the catalog's WAL archives for every shard the catalog names and adds their part to
/// `plan`. Best effort: an archive that cannot be read is kept whole and the plan says so,
/// and with any backup manifest unreadable nothing of them is removed.
async fn plan_archive(
    ctx: &ClusterContext,
    plan: &mut Plan,
    backups: &[(BackupId, Result<BackupManifest>)],
    tags: &[(TagName, Result<TagManifest>)],
    now: DateTime<Utc>,
) {
    if let Some((id, _)) = backups.iter().find(|(_, m)| m.is_err()) {
        plan.wal = format!("kept whole: backup {id} cannot be read, so what it needs is unknown");
        return;
    }
    // Every backup counts, the ones this pass removes included: a restore already reading
    // one keeps its WAL, and the next pass prunes it.
    let kept: Vec<&BackupManifest> = backups
        .iter()
        .filter_map(|(_, m)| m.as_ref().ok())
        .collect();
    let mut known: HashMap<LineageId, Lineage> = kept
        .iter()
        .flat_map(|m| m.shards.iter().map(|r| r.lineage))
        .chain(
            tags.iter()
                .filter_map(|(_, t)| t.as_ref().ok())
                .flat_map(|t| t.points.values().map(|p| p.lineage)),
        )
        .map(|l| (l.id, l))
        .collect();
    let shards: BTreeSet<ShardId> = kept
        .iter()
        .flat_map(|m| m.shards.iter().map(|r| r.shard_id.clone()))
        .chain(ctx.config.shard_ids())
        .collect();
    let mut archives = vec![WalArchive::Store(ctx.repo.clone())];
    let mut summary = Vec::new();
    if let Some(url) = ctx.config.wal_archive.as_deref() {
        match lockstep_proto::archive::open_archive(url, &ctx.security, ctx.repo.seal()).await {
            Ok(WalArchive::Store(repo)) if repo.url() == ctx.repo.url() => {}
            Ok(archive) if ctx.config.retention.prune_wal_archive => archives.push(archive),
            Ok(_) => summary.push(format!(
                "{url} kept whole: set prune_wal_archive = true in [retention] when only this repository's backups replay it"
            )),
            Err(err) => summary.push(format!("{url} kept whole: {}", err.chain())),
        }
    }
    // Every archive is read before any is planned: each one's lineages are known to all.
    let mut listed = Vec::new();
    for repo in archives {
        match list_archive(&repo, &shards).await {
            Ok(archive) => {
                known.extend(
                    archive
                        .values()
                        .flat_map(|lineages| lineages.iter().map(|(l, _)| (l.id, *l))),
                );
                listed.push((repo, archive));
            }
            Err(err) => {
                tracing::warn!(archive = %repo.url(), error = %err.chain(), "retention: the WAL archive could not be read; it is kept whole");
                summary.push(format!("{} kept whole: {}", repo.url(), err.chain()));
            }
        }
    }
    let grace = Duration::seconds(i64::try_from(ctx.config.gc.grace_s).unwrap_or(i64::MAX));
    let kept = if ctx.config.retention.planted_bug {
        kept.last().copied().into_iter().collect()
    } else {
        kept
    };
    for (repo, archive) in listed {
        let (items, doomed) = plan_wal(&kept, &archive, &known, now, grace);
        let of_shards = doomed.iter().map(|s| &s.shard_id).collect::<BTreeSet<_>>();
        summary.push(format!(
            "{} segment(s) of {} shard(s) in {} that no backup replays",
            doomed.len(),
            of_shards.len(),
            repo.url()
        ));
        plan.items.extend(items.into_iter().map(|mut item| {
            item.name = format!("{} in {}", item.name, repo.url());
            item
        }));
        if !doomed.is_empty() {
            plan.wal_doomed.push((repo, doomed));
        }
    }
    plan.wal = summary.join("; ");
}

/// Every lineage of every one of `shards` in the WAL archive `repo`, with its segments.
async fn list_archive(
    repo: &WalArchive,
    shards: &BTreeSet<ShardId>,
) -> Result<BTreeMap<ShardId, ShardArchive>> {
    let mut archive = BTreeMap::new();
    for shard in shards {
        let mut lineages = Vec::new();
        for lineage in repo.wal_lineages(shard).await? {
            let segments = repo.wal_segments(shard, &lineage).await?;
            lineages.push((lineage, segments));
        }
        archive.insert(shard.clone(), lineages);
    }
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use lockstep_repository::manifest::{MANIFEST_FORMAT_VERSION, ShardRef, TOOL_VERSION};

    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-12-06T12:00:00Z".parse().expect("time")
    }

    /// A catalog built oldest first: (id, kind, parent, hours before `now`).
    fn catalog(
        backups: &[(&str, BackupKind, Option<&str>, i64)],
    ) -> Vec<(BackupId, Result<BackupManifest>)> {
        backups
            .iter()
            .map(|(id, kind, parent, hours_ago)| {
                let id = BackupId::new(*id).expect("id");
                let at = now() - Duration::hours(*hours_ago);
                let mut manifest = BackupManifest::commit(
                    id.clone(),
                    *kind,
                    parent.map(|p| BackupId::new(p).expect("parent")),
                    at,
                    &[],
                );
                manifest.completed_at = at;
                (id, Ok(manifest))
            })
            .collect()
    }

    fn tag(name: &str, hours_ago: i64) -> (TagName, Result<TagManifest>) {
        let name = TagName::new(name).expect("tag");
        let manifest = TagManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            name: name.clone(),
            created_at: now() - Duration::hours(hours_ago),
            points: BTreeMap::new(),
            max_gate_closed_us: 0,
            automatic: false,
            labels: Default::default(),
            tool_version: TOOL_VERSION.to_string(),
        };
        (name, Ok(manifest))
    }

    /// The names the plan removes.
    fn removed(plan: &Plan) -> Vec<&str> {
        plan.removed().map(|item| item.name.as_str()).collect()
    }

    fn reasons<'p>(plan: &'p Plan, name: &str) -> &'p [String] {
        &plan
            .items
            .iter()
            .find(|item| item.name == name)
            .expect("in the plan")
            .reasons
    }

    use BackupKind::{Differential as Diff, Full, Incremental as Incr};

    #[test]
    fn an_empty_policy_is_refused() {
        let err = plan(&RetentionConfig::default(), &[], &[], now()).expect_err("empty");
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(err.message.contains("[retention]"), "{err}");
    }

    #[test]
    fn by_count_the_newest_fulls_stay_with_their_chains() {
        let backups = catalog(&[
            ("f1", Full, None, 50),
            ("i1", Incr, Some("f1"), 49),
            ("f2", Full, None, 40),
            ("d2", Diff, Some("f2"), 39),
            ("f3", Full, None, 30),
            ("i3", Incr, Some("f3"), 29),
            ("i3b", Incr, Some("i3"), 28),
        ]);
        let policy = RetentionConfig {
            keep_full: 2,
            ..RetentionConfig::default()
        };
        let plan = plan(&policy, &backups, &[], now()).expect("plan");
        assert_eq!(removed(&plan), vec!["f1", "i1"]);
        assert!(reasons(&plan, "f2")[0].contains("newest 2 full"));
        assert!(
            reasons(&plan, "i3")
                .iter()
                .any(|r| r.contains("its full backup f3 is kept"))
        );
        assert!(
            reasons(&plan, "i3b")
                .iter()
                .any(|r| r.contains("newest good"))
        );
        assert_eq!(plan.wal, WAL_UNREAD);
    }

    #[test]
    fn by_age_the_newest_full_before_the_window_stays() {
        let backups = catalog(&[
            ("f10", Full, None, 240),
            ("f6", Full, None, 144),
            ("f3", Full, None, 72),
            ("f1", Full, None, 24),
        ]);
        let policy = RetentionConfig {
            keep_full_days: 5,
            ..RetentionConfig::default()
        };
        let plan = plan(&policy, &backups, &[], now()).expect("plan");
        assert_eq!(removed(&plan), vec!["f10"]);
        assert!(reasons(&plan, "f6")[0].contains("newest full before the last 5 days"));
    }

    #[test]
    fn by_calendar_the_newest_full_of_each_bucket_stays() {
        // now is Sunday 2026-12-06 12:00 UTC.
        let backups = catalog(&[
            ("nov", Full, None, 24 * 40),    // October 27
            ("w1", Full, None, 24 * 8),      // Saturday of the week before
            ("d2a", Full, None, 24 * 2 + 6), // Friday 06:00
            ("d2b", Full, None, 24 * 2),     // Friday 12:00
            ("d1", Full, None, 24),          // Saturday
            ("d0a", Full, None, 4),          // Sunday 08:00
            ("d0b", Full, None, 1),          // Sunday 11:00
        ]);
        let daily = RetentionConfig {
            keep_daily: 2,
            ..RetentionConfig::default()
        };
        let plan_daily = plan(&daily, &backups, &[], now()).expect("plan");
        assert_eq!(removed(&plan_daily), vec!["nov", "w1", "d2a", "d2b", "d0a"]);
        let weekly = RetentionConfig {
            keep_weekly: 2,
            ..RetentionConfig::default()
        };
        let plan_weekly = plan(&weekly, &backups, &[], now()).expect("plan");
        assert_eq!(
            removed(&plan_weekly),
            vec!["nov", "d2a", "d2b", "d1", "d0a"]
        );
        let monthly = RetentionConfig {
            keep_monthly: 2,
            ..RetentionConfig::default()
        };
        let plan_monthly = plan(&monthly, &backups, &[], now()).expect("plan");
        // December's newest, and November's newest (w1 is November 28).
        assert_eq!(
            removed(&plan_monthly),
            vec!["nov", "d2a", "d2b", "d1", "d0a"]
        );
        assert!(reasons(&plan_monthly, "w1")[0].contains("keep_monthly 2"));
    }

    #[test]
    fn the_recovery_window_keeps_every_instant_in_it_restorable() {
        let backups = catalog(&[
            ("f48", Full, None, 48),
            ("f30", Full, None, 30),
            ("i29", Incr, Some("f30"), 29),
            ("f20", Full, None, 20),
            ("i10", Incr, Some("f20"), 10),
        ]);
        let policy = RetentionConfig {
            recovery_window_hours: 24,
            ..RetentionConfig::default()
        };
        let plan = plan(&policy, &backups, &[], now()).expect("plan");
        // f30 restores the window's start; i29 goes with its full.
        assert_eq!(removed(&plan), vec!["f48"]);
        assert!(reasons(&plan, "f30")[0].contains("before the recovery window"));
    }

    #[test]
    fn the_window_keeps_the_full_its_restored_history_starts_from() {
        // F1 and F2 on the first history; at -26 h the cluster is restored to F1, which starts
        // a new history from F1's cut; F3 is taken on it inside the window.
        let mut backups = catalog(&[
            ("f1", Full, None, 30),
            ("f2", Full, None, 27),
            ("f3", Full, None, 10),
        ]);
        let first = Lineage::root();
        let restored = first.child(Seq(100), lockstep_repository::Timeline(2));
        for ((_, manifest), (lineage, seq)) in
            backups
                .iter_mut()
                .zip([(first, 100), (first, 200), (restored, 150)])
        {
            manifest.as_mut().expect("manifest").shards.push(ShardRef {
                shard_id: ShardId::new("shard-0").expect("shard"),
                seq: Seq(seq),
                lineage,
                hlc: None,
                n_files: 1,
                bytes: 1,
            });
        }
        let policy = RetentionConfig {
            recovery_window_hours: 24,
            ..RetentionConfig::default()
        };
        let plan = plan(&policy, &backups, &[], now()).expect("plan");
        // F2 is past the branch: no instant of the window's history is restored from it.
        assert_eq!(removed(&plan), vec!["f2"]);
        assert!(reasons(&plan, "f1")[0].contains("on a history in it"));
    }

    #[test]
    fn pins_the_newest_backup_and_unreadable_manifests_are_never_removed() {
        let mut backups = catalog(&[
            ("f1", Full, None, 50),
            ("f2", Full, None, 40),
            ("i2", Incr, Some("f2"), 39),
            ("f3", Full, None, 30),
            ("f4", Full, None, 20),
            ("i1", Incr, Some("f1"), 10),
        ]);
        backups.insert(
            0,
            (
                BackupId::new("broken").expect("id"),
                Err(Error::new(ErrorCode::BackupManifestCorrupt, "bad json")),
            ),
        );
        let policy = RetentionConfig {
            keep_full: 1,
            pinned: vec!["i2".into()],
            ..RetentionConfig::default()
        };
        let plan = plan(&policy, &backups, &[], now()).expect("plan");
        // f4 by count; i1 is the newest backup, so its full f1 stays; pinned i2 keeps f2.
        assert_eq!(removed(&plan), vec!["f3"]);
        assert!(reasons(&plan, "broken")[0].contains("unreadable"));
        assert!(
            reasons(&plan, "f1")
                .iter()
                .any(|r| r.contains("a parent of kept backup i1"))
        );
        assert!(
            reasons(&plan, "f2")
                .iter()
                .any(|r| r.contains("a parent of kept backup i2"))
        );
    }

    #[test]
    fn old_tags_go_and_kept_tags_keep_their_base_backup() {
        let backups = catalog(&[
            ("f300", Full, None, 300),
            ("f200", Full, None, 200),
            ("f100", Full, None, 100),
            ("f1", Full, None, 1),
        ]);
        let tags = vec![tag("old", 250), tag("pinned", 240), tag("recent", 90)];
        let policy = RetentionConfig {
            keep_full: 1,
            keep_tags_days: 7,
            pinned: vec!["pinned".into()],
            ..RetentionConfig::default()
        };
        let plan = plan(&policy, &backups, &tags, now()).expect("plan");
        // "old" (250 h) is past 7 days; "pinned" keeps f300, "recent" keeps f100.
        assert_eq!(removed(&plan), vec!["f200", "old"]);
        assert!(
            reasons(&plan, "f300")
                .iter()
                .any(|r| r.contains("kept tag pinned"))
        );
        assert!(
            reasons(&plan, "f100")
                .iter()
                .any(|r| r.contains("kept tag recent"))
        );
    }

    /// A backup of shard-0 at `seq` on `lineage`.
    fn at(id: &str, lineage: Lineage, seq: u64) -> BackupManifest {
        let (_, manifest) = catalog(&[(id, Full, None, 1)]).remove(0);
        let mut manifest = manifest.expect("manifest");
        manifest.shards.push(ShardRef {
            shard_id: ShardId::new("shard-0").expect("shard"),
            seq: Seq(seq),
            lineage,
            hlc: None,
            n_files: 1,
            bytes: 1,
        });
        manifest
    }

    /// Segments of shard-0 on `lineage`, each `(first, last, hours ago)`.
    fn segments(lineage: Lineage, spans: &[(u64, u64, i64)]) -> Vec<SegmentInfo> {
        spans
            .iter()
            .map(|&(first, last, hours_ago)| {
                let time =
                    lockstep_repository::HlcTime::at_or_before(now() - Duration::hours(hours_ago));
                SegmentInfo {
                    shard_id: ShardId::new("shard-0").expect("shard"),
                    lineage,
                    first: Seq(first),
                    last: Seq(last),
                    hlc_min: time,
                    hlc_max: time,
                    id: lockstep_repository::ObjectId::of(&first.to_le_bytes()),
                }
            })
            .collect()
    }

    fn doomed_spans(doomed: &[SegmentInfo]) -> Vec<(LineageId, u64, u64)> {
        doomed
            .iter()
            .map(|s| (s.lineage.id, s.first.0, s.last.0))
            .collect()
    }

    #[test]
    fn the_wal_before_the_oldest_kept_backup_goes_and_the_rest_stays() {
        let root = Lineage::root();
        let archive = BTreeMap::from([(
            ShardId::new("shard-0").expect("shard"),
            vec![(
                root,
                segments(
                    root,
                    &[
                        (1, 100, 90),
                        (101, 200, 80),
                        (201, 300, 70),
                        (301, 400, 60),
                        (401, 500, 0),
                    ],
                ),
            )],
        )]);
        let (old, newer) = (at("b-old", root, 250), at("b-new", root, 350));
        let grace = Duration::hours(6);
        let (items, doomed) = plan_wal(&[&old, &newer], &archive, &HashMap::new(), now(), grace);
        assert_eq!(
            doomed_spans(&doomed),
            vec![(root.id, 1, 100), (root.id, 101, 200)],
            "only what ends at or before the oldest kept backup goes"
        );
        let removed: Vec<&Decision> = items.iter().filter(|i| i.remove).collect();
        assert_eq!(removed.len(), 1, "one run: {items:?}");
        assert!(removed[0].name.ends_with(" 1..=200"), "{}", removed[0].name);
        assert!(items.iter().any(|i| !i.remove
            && i.name.ends_with(" 201..=500")
            && i.reasons[0].contains("b-old")));
        // Nothing kept before the archive: nothing related, nothing removed.
        let (_, none) = plan_wal(&[], &archive, &HashMap::new(), now(), grace);
        assert!(
            none.is_empty(),
            "no kept backup: the archive is not ours to judge"
        );
    }

    #[test]
    fn young_segments_and_each_lineages_last_stay() {
        let root = Lineage::root();
        let archive = BTreeMap::from([(
            ShardId::new("shard-0").expect("shard"),
            vec![(
                root,
                segments(root, &[(1, 100, 90), (101, 200, 2), (201, 300, 1)]),
            )],
        )]);
        let backup = at("b", root, 300);
        let (items, doomed) = plan_wal(
            &[&backup],
            &archive,
            &HashMap::new(),
            now(),
            Duration::hours(6),
        );
        assert_eq!(doomed_spans(&doomed), vec![(root.id, 1, 100)]);
        assert!(
            items.iter().any(|i| i.reasons[0].contains("grace")),
            "{items:?}"
        );
        // All old: the last segment still stays, where shipping resumes.
        let archive = BTreeMap::from([(
            ShardId::new("shard-0").expect("shard"),
            vec![(root, segments(root, &[(1, 100, 90), (101, 200, 80)]))],
        )]);
        let (items, doomed) = plan_wal(
            &[&backup],
            &archive,
            &HashMap::new(),
            now(),
            Duration::hours(6),
        );
        assert_eq!(doomed_spans(&doomed), vec![(root.id, 1, 100)]);
        assert!(
            items
                .iter()
                .any(|i| !i.remove && i.reasons[0].contains("last segment"))
        );
    }

    #[test]
    fn lineages_are_followed_through_restores_and_unrelated_ones_are_kept() {
        let root = Lineage::root();
        // Restored at 150 (a child of root), later a fork of the child at 260.
        let child = root.child(Seq(150), lockstep_repository::Timeline(2));
        let fork = child.child(Seq(260), lockstep_repository::Timeline(3));
        let stranger = Lineage::root();
        let archive = BTreeMap::from([(
            ShardId::new("shard-0").expect("shard"),
            vec![
                (
                    root,
                    segments(root, &[(1, 100, 90), (101, 200, 80), (201, 300, 70)]),
                ),
                (
                    child,
                    segments(child, &[(151, 250, 60), (251, 350, 50), (351, 450, 40)]),
                ),
                (fork, segments(fork, &[(261, 270, 30), (271, 280, 20)])),
                (stranger, segments(stranger, &[(1, 10, 90), (11, 20, 80)])),
            ],
        )]);
        // Kept: one backup on the root before the restore point, one on the child after the
        // fork.
        let (on_root, on_child) = (at("r", root, 120), at("c", child, 300));
        let (_, doomed) = plan_wal(
            &[&on_root, &on_child],
            &archive,
            &HashMap::new(),
            now(),
            Duration::hours(6),
        );
        assert_eq!(
            doomed_spans(&doomed),
            vec![
                (root.id, 1, 100),
                // The fork branched at 260, before "c" at 300, and after "r" at 120:
                // "r" replays through the child into it, so it stays.
            ],
        );
        // Without "r", the root's history before the child and the fork are unreachable.
        let (items, doomed) = plan_wal(
            &[&on_child],
            &archive,
            &HashMap::new(),
            now(),
            Duration::hours(6),
        );
        assert_eq!(
            doomed_spans(&doomed),
            vec![
                (root.id, 1, 100),
                (root.id, 101, 200),
                (child.id, 151, 250),
                (fork.id, 261, 270),
            ],
            "the root's last segment and the fork's last stay; the stranger is untouched"
        );
        assert!(
            items
                .iter()
                .any(|i| i.name.contains(&stranger.id.to_string())
                    && !i.remove
                    && i.reasons[0].contains("another repository"))
        );
    }

    #[tokio::test]
    async fn an_archive_that_cannot_be_pruned_stops_only_its_own_pruning() {
        let repo = lockstep_repository::Repository::open("memory://prune-stops")
            .await
            .expect("repo");
        let fence = crate::fence::Fence::take(&repo).await.expect("fence");
        let segment = lockstep_repository::wal::Segment {
            shard_id: ShardId::new("shard-0").expect("shard"),
            lineage: Lineage::root(),
            batches: vec![lockstep_repository::wal::WalBatch {
                first: Seq(1),
                count: 1,
                hlc: lockstep_repository::HlcTime::new(1, 0),
                data: vec![1],
            }],
        };
        let info = repo
            .put_wal_segment(&segment, Default::default())
            .await
            .expect("put");
        let down = lockstep_proto::archive::open_archive(
            "lockstep://127.0.0.1:1",
            &lockstep_proto::tls::Security::Plaintext,
            repo.seal(),
        )
        .await
        .expect("open");
        let doomed = std::slice::from_ref(&info);
        let (removed, failed) = prune(&fence, &down, doomed).await.expect("fenced");
        assert_eq!(removed, 0);
        let failed = failed.expect("unreachable");
        assert_eq!(failed.code, ErrorCode::StorageUnavailable, "{failed:?}");
        let (removed, failed) = prune(&fence, &WalArchive::Store(repo.clone()), doomed)
            .await
            .expect("fenced");
        assert_eq!((removed, failed.map(|e| e.code)), (1, None));
        assert!(!repo.has_wal_segment(&info).await.expect("head"));
    }
}
