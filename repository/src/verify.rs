//! Backup verification: quick (manifests parse, every object exists with its recorded size)
//! and full (every object downloaded, decompressed and re-hashed).
//!
//! The report names every problem with its backup, shard, file and error code, and ends in a
//! one-line verdict, like the seeds' `--verify-backup`. An object shared by several files or
//! backups is checked once.
//!
//! `verify_wal` adds a WAL archive to the report: every shard's segments on every lineage
//! must run contiguously (the PITR window has no hole and no overlap), and at the full level
//! every segment is downloaded and checked against its SHA-256 and its key.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use serde::Serialize;

use crate::error::{ErrorCode, Result};
use crate::ids::{BackupId, Seq, ShardId};
use crate::lineage::Lineage;
use crate::manifest::Chunk;
use crate::repository::Repository;
use crate::transfer::Progress;

/// How deep to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyLevel {
    Quick,
    Full,
}

/// One thing wrong with a backup.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub backup: BackupId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub code: String,
    pub severity: String,
    pub message: String,
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub level: VerifyLevel,
    pub backups: Vec<BackupId>,
    pub shards_checked: u64,
    pub files_checked: u64,
    pub objects_checked: u64,
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
    /// The share of the backups' objects checked (`--sample`), in percent.
    pub sample_percent: u8,
    /// The backups' distinct objects, sampled or not.
    pub objects_named: u64,
    /// Objects left out because a full verify checked them within the window asked for.
    #[serde(skip_serializing_if = "is_zero")]
    pub objects_skipped: u64,
    /// WAL archive ranges checked, one per shard and lineage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wal: Vec<WalRange>,
    pub passed: bool,
}

/// One shard's WAL on one lineage of an archive, as `verify_wal` found it.
#[derive(Debug, Clone, Serialize)]
pub struct WalRange {
    pub archive: String,
    pub shard: ShardId,
    pub lineage: Lineage,
    pub segments: u64,
    pub first: Seq,
    pub last: Seq,
    /// The first problem found: its code and message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<(String, String)>,
}

impl VerifyReport {
    /// The distinct error codes found, for callers that branch on them.
    pub fn codes(&self) -> Vec<String> {
        let mut codes: Vec<String> = self
            .problems
            .iter()
            .map(|p| p.code.clone())
            .chain(
                self.wal
                    .iter()
                    .filter_map(|w| w.error.as_ref().map(|e| e.0.clone())),
            )
            .collect();
        codes.sort();
        codes.dedup();
        codes
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            VerifyLevel::Quick => "quick",
            VerifyLevel::Full => "full",
        };
        for problem in &self.problems {
            write!(f, "{:<32} {}", problem.code, problem.backup)?;
            if let Some(shard) = &problem.shard {
                write!(f, " shard={shard}")?;
            }
            if let Some(file) = &problem.file {
                write!(f, " file={file}")?;
            }
            writeln!(f, ": {}", problem.message)?;
        }
        for range in &self.wal {
            if let Some((code, message)) = &range.error {
                writeln!(
                    f,
                    "{code:<32} wal {} shard={} {}: {message}",
                    range.archive, range.shard, range.lineage
                )?;
            }
        }
        if !self.wal.is_empty() {
            writeln!(
                f,
                "Checked the WAL archive: {} shard lineage(s), {} segment(s){}.",
                self.wal.len(),
                self.wal.iter().map(|w| w.segments).sum::<u64>(),
                self.wal
                    .iter()
                    .map(|w| {
                        format!(
                            ", {} tl {} ({}): {}..={}",
                            w.shard,
                            w.lineage.timeline,
                            w.lineage.id.short(),
                            w.first,
                            w.last
                        )
                    })
                    .collect::<String>()
            )?;
        }
        let sample = if self.sample_percent < 100 {
            format!(
                ", a {}% sample of {} objects",
                self.sample_percent, self.objects_named
            )
        } else {
            String::new()
        };
        let skipped = if self.objects_skipped > 0 {
            format!(
                ", {} object(s) skipped: fully verified within the window",
                self.objects_skipped
            )
        } else {
            String::new()
        };
        writeln!(
            f,
            "Checked {} backup(s), {} shard(s), {} file(s), {} object(s), {} bytes ({level}{sample}{skipped}).",
            self.backups.len(),
            self.shards_checked,
            self.files_checked,
            self.objects_checked,
            self.bytes_checked
        )?;
        if self.passed {
            write!(f, "Backup verification: PASSED")
        } else {
            write!(
                f,
                "Backup verification: FAILED ({} problem(s): {})",
                self.problems.len() + self.wal.iter().filter(|w| w.error.is_some()).count(),
                self.codes().join(", ")
            )
        }
    }
}

struct Use {
    backup: BackupId,
    shard: ShardId,
    file: String,
}

/// Verifies the given backups at `level`, checking up to `parallelism` objects at once, and
/// of their objects a random `sample_percent` (1..=100; 100 checks every one). Manifests are
/// always checked whole. A full verify with `skip_verified_within` leaves out the objects a
/// full verify checked within that window (`verify/verified.bin` records when each was last
/// checked whole) and records the ones it checks.
pub async fn verify(
    repo: &Repository,
    backups: &[BackupId],
    level: VerifyLevel,
    sample_percent: u8,
    skip_verified_within: Option<chrono::Duration>,
    parallelism: usize,
    progress: &Progress,
) -> Result<VerifyReport> {
    if skip_verified_within.is_some() && level != VerifyLevel::Full {
        return Err(crate::error::Error::new(
            ErrorCode::InvalidArgument,
            "skipping recently verified objects needs a full verify (--full): a quick one records nothing",
        ));
    }
    if let Some(window) = skip_verified_within
        && !(chrono::Duration::hours(1)..=chrono::Duration::days(VERIFIED_KEPT_DAYS))
            .contains(&window)
    {
        return Err(crate::error::Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "a window of {} hours is not 1..={} hours (the verify record keeps {VERIFIED_KEPT_DAYS} days)",
                window.num_hours(),
                VERIFIED_KEPT_DAYS * 24
            ),
        ));
    }
    if !(1..=100).contains(&sample_percent) {
        return Err(crate::error::Error::new(
            ErrorCode::InvalidArgument,
            format!("a sample of {sample_percent}% is not 1..=100"),
        ));
    }
    let mut problems = Vec::new();
    let mut report = VerifyReport {
        level,
        sample_percent,
        objects_named: 0,
        objects_skipped: 0,
        backups: backups.to_vec(),
        shards_checked: 0,
        files_checked: 0,
        objects_checked: 0,
        bytes_checked: 0,
        problems: Vec::new(),
        wal: Vec::new(),
        passed: false,
    };
    let problem = |backup: &BackupId,
                   shard: Option<&ShardId>,
                   file: Option<&str>,
                   code: ErrorCode,
                   message: String| Problem {
        backup: backup.clone(),
        shard: shard.cloned(),
        file: file.map(str::to_string),
        code: code.as_str().to_string(),
        severity: code.severity().to_string(),
        message,
    };

    // The first use of every object, to name it in a problem.
    let mut objects: BTreeMap<crate::gc::ObjectKey, (Chunk, Use)> = BTreeMap::new();
    for backup in backups {
        let manifest = match repo.backup_manifest(backup).await {
            Ok(manifest) => manifest,
            Err(err) => {
                problems.push(problem(backup, None, None, err.code, err.message));
                continue;
            }
        };
        let mut seen_shards = HashSet::new();
        for shard_ref in &manifest.shards {
            seen_shards.insert(shard_ref.shard_id.clone());
            let shard = match repo.shard_manifest(&shard_ref.shard_id, backup).await {
                Ok(shard) => shard,
                Err(err) => {
                    problems.push(problem(
                        backup,
                        Some(&shard_ref.shard_id),
                        None,
                        err.code,
                        err.message,
                    ));
                    continue;
                }
            };
            report.shards_checked += 1;
            if shard.seq != shard_ref.seq
                || shard.lineage != shard_ref.lineage
                || shard_ref.hlc.is_some_and(|hlc| hlc != shard.hlc)
                || &shard.backup_id != backup
            {
                problems.push(problem(
                    backup,
                    Some(&shard.shard_id),
                    None,
                    ErrorCode::BackupManifestCorrupt,
                    format!(
                        "shard manifest says backup {} at seq {} ({}, {}), backup manifest says {} at seq {} ({}, {})",
                        shard.backup_id,
                        shard.seq,
                        shard.lineage,
                        shard.hlc,
                        backup,
                        shard_ref.seq,
                        shard_ref.lineage,
                        shard_ref.hlc.map_or("no time".to_string(), |hlc| hlc.to_string())
                    ),
                ));
            }
            for file in &shard.files {
                report.files_checked += 1;
                for chunk in &file.chunks {
                    objects.entry(chunk.key()).or_insert_with(|| {
                        (
                            chunk.clone(),
                            Use {
                                backup: backup.clone(),
                                shard: shard.shard_id.clone(),
                                file: file.name.clone(),
                            },
                        )
                    });
                }
            }
            for piece in &shard.wal {
                objects.entry(piece.chunk.key()).or_insert_with(|| {
                    (
                        piece.chunk.clone(),
                        Use {
                            backup: backup.clone(),
                            shard: shard.shard_id.clone(),
                            file: format!("WAL {}..={}", piece.first, piece.last),
                        },
                    )
                });
            }
        }
        for group in &manifest.raid_groups {
            for (member, role) in group.members() {
                if !manifest.shards.iter().any(|s| &s.shard_id == member) {
                    problems.push(problem(
                        backup,
                        Some(member),
                        None,
                        ErrorCode::BackupIncomplete,
                        format!(
                            "RAID group {} ({}) lacks its {role} member {member}",
                            group.name, group.layout
                        ),
                    ));
                }
            }
        }
        for shard in manifest.cut.keys() {
            if !seen_shards.contains(shard) {
                problems.push(problem(
                    backup,
                    Some(shard),
                    None,
                    ErrorCode::BackupIncomplete,
                    "shard is in the cut vector but has no shard entry".into(),
                ));
            }
        }
    }

    report.objects_named = objects.len() as u64;
    if sample_percent < 100 {
        // The share, at least one object, drawn anew every run.
        let seed = std::collections::hash_map::RandomState::new();
        let keep = (objects.len() * usize::from(sample_percent)).div_ceil(100);
        let mut drawn: Vec<(u64, crate::gc::ObjectKey)> = objects
            .keys()
            .map(|key| (std::hash::BuildHasher::hash_one(&seed, key), *key))
            .collect();
        drawn.sort_unstable();
        let kept: HashSet<crate::gc::ObjectKey> =
            drawn.into_iter().take(keep).map(|(_, key)| key).collect();
        objects.retain(|key, _| kept.contains(key));
    }
    // Every full verify keeps the record: what it checked whole goes in, what it found
    // damaged comes out (so a later incremental run never skips known damage). Without a
    // window a record that cannot be read is only a warning.
    let now = chrono::Utc::now();
    let mut verified = match (skip_verified_within, level) {
        (Some(window), _) => {
            let record = repo.verified_objects().await?;
            let since = now - window;
            let before = objects.len();
            // A time ahead of now (a clock that ran ahead) is not trusted.
            objects.retain(|key, _| record.get(key).is_none_or(|at| *at < since || *at > now));
            report.objects_skipped = (before - objects.len()) as u64;
            Some(record)
        }
        (None, VerifyLevel::Full) => match repo.verified_objects().await {
            Ok(record) => Some(record),
            Err(err) => {
                tracing::warn!(error = %err.chain(), "the verify record cannot be read; this run does not update it");
                None
            }
        },
        (None, VerifyLevel::Quick) => None,
    };
    let mut damaged: Vec<crate::gc::ObjectKey> = Vec::new();
    let size = |chunk: &Chunk| match level {
        VerifyLevel::Quick => chunk.stored_len,
        VerifyLevel::Full => chunk.len,
    };
    progress.total_bytes.fetch_add(
        objects.values().map(|(c, _)| size(c)).sum(),
        Ordering::Relaxed,
    );
    let checks = futures::stream::iter(objects)
        .map(|((id, copy), (chunk, usage))| async move {
            let outcome: std::result::Result<(), (ErrorCode, String)> = match level {
                VerifyLevel::Quick => match repo.object_size(&id, copy).await {
                    Ok(Some(size)) if size == chunk.stored_len => Ok(()),
                    Ok(Some(size)) => Err((
                        ErrorCode::BackupChecksumMismatch,
                        format!("object {id} is {size} bytes, expected {}", chunk.stored_len),
                    )),
                    Ok(None) => Err((
                        ErrorCode::BackupIncomplete,
                        format!("object {id} is missing"),
                    )),
                    Err(err) => Err((err.code, err.chain())),
                },
                // Decoded to exactly the chunk's length, or refused.
                VerifyLevel::Full => match repo.get_object(&chunk).await {
                    Ok(_) => Ok(()),
                    Err(err) => Err((err.code, err.message)),
                },
            };
            ((id, copy), chunk, usage, outcome)
        })
        .buffer_unordered(parallelism.max(1));
    futures::pin_mut!(checks);
    while let Some((key, chunk, usage, outcome)) = checks.next().await {
        match (&outcome, verified.as_mut()) {
            (Ok(()), Some(record)) if level == VerifyLevel::Full => {
                record.insert(key, now);
            }
            (Err(_), _) => damaged.push(key),
            _ => {}
        }
        progress
            .done_bytes
            .fetch_add(size(&chunk), Ordering::Relaxed);
        report.objects_checked += 1;
        report.bytes_checked += match level {
            VerifyLevel::Quick => 0,
            VerifyLevel::Full => chunk.len,
        };
        if let Err((code, message)) = outcome {
            problems.push(problem(
                &usage.backup,
                Some(&usage.shard),
                Some(&usage.file),
                code,
                message,
            ));
        }
    }
    // A quick verify that found damage takes it out of the record too.
    if verified.is_none() && !damaged.is_empty() && level == VerifyLevel::Quick {
        verified = repo.verified_objects().await.ok();
    }
    if let Some(mut record) = verified {
        for key in &damaged {
            record.remove(key);
        }
        // Entries older than any window anyone asks for go.
        let oldest = now - chrono::Duration::days(VERIFIED_KEPT_DAYS);
        record.retain(|_, at| *at >= oldest);
        // The report stands whether or not the record could be written.
        if let Err(err) = repo.put_verified_objects(&record).await {
            tracing::warn!(error = %err.chain(), "the verify record could not be written; the next incremental run checks these objects again");
        }
    }
    problems.sort_by(|a, b| (&a.backup, &a.shard, &a.file).cmp(&(&b.backup, &b.shard, &b.file)));
    report.passed = problems.is_empty();
    report.problems = problems;
    Ok(report)
}

/// How long `verify/verified.bin` remembers a check.
const VERIFIED_KEPT_DAYS: i64 = 400;

/// `verify/verified.bin`: magic, count (u64 LE), then per object its id (32 bytes), copy
/// (u32 LE) and when a full verify last checked it (Unix seconds, i64 LE), and the SHA-256 of
/// all that.
const VERIFIED_MAGIC: &[u8; 8] = b"LKSVER01";
const VERIFIED_ENTRY: usize = 32 + 4 + 8;

/// When a full verify last checked each object.
pub type Verified = BTreeMap<crate::gc::ObjectKey, chrono::DateTime<chrono::Utc>>;

pub fn encode_verified(record: &Verified) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + record.len() * VERIFIED_ENTRY + 32);
    out.extend_from_slice(VERIFIED_MAGIC);
    out.extend_from_slice(&(record.len() as u64).to_le_bytes());
    for ((id, copy), at) in record {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&copy.to_le_bytes());
        out.extend_from_slice(&at.timestamp().to_le_bytes());
    }
    let digest = crate::ids::ObjectId::of(&out);
    out.extend_from_slice(digest.as_bytes());
    out
}

pub fn decode_verified(what: &str, bytes: &[u8]) -> Result<Verified> {
    let corrupt = |why: &str| {
        crate::error::Error::new(
            ErrorCode::BackupManifestCorrupt,
            format!(
                "{what} is damaged ({why}); delete it and the next full verify checks every object"
            ),
        )
    };
    let body_len = bytes
        .len()
        .checked_sub(32)
        .ok_or_else(|| corrupt("too short"))?;
    let (body, digest) = bytes.split_at(body_len);
    if crate::ids::ObjectId::of(body).as_bytes() != digest {
        return Err(corrupt("checksum"));
    }
    if body.len() < 16 || &body[..8] != VERIFIED_MAGIC {
        return Err(corrupt("not a verify record"));
    }
    let count = u64::from_le_bytes(body[8..16].try_into().map_err(|_| corrupt("count"))?);
    let entries = &body[16..];
    if (entries.len() as u64) != count.saturating_mul(VERIFIED_ENTRY as u64) {
        return Err(corrupt("length"));
    }
    let mut record = Verified::new();
    for entry in entries.chunks_exact(VERIFIED_ENTRY) {
        let id: [u8; 32] = entry[..32].try_into().map_err(|_| corrupt("id"))?;
        let copy = u32::from_le_bytes(entry[32..36].try_into().map_err(|_| corrupt("copy"))?);
        let secs = i64::from_le_bytes(entry[36..44].try_into().map_err(|_| corrupt("time"))?);
        let at = chrono::DateTime::from_timestamp(secs, 0).ok_or_else(|| corrupt("time"))?;
        record.insert((crate::ids::ObjectId::from_digest(id), copy), at);
    }
    Ok(record)
}

/// Checks the WAL archive at `archive` for `shards` (every lineage it holds) and adds what it
/// found to `report`: contiguous segments on each lineage, reaching back on each to the
/// sequence number `reach_back` names for it (the oldest backup there: every point after it
/// must be restorable), and at the full level every segment downloaded and checked.
pub async fn verify_wal(
    report: &mut VerifyReport,
    archive: &crate::archive::WalArchive,
    shards: &[ShardId],
    level: VerifyLevel,
    reach_back: &std::collections::HashMap<(ShardId, crate::lineage::LineageId), Seq>,
) -> Result<()> {
    for shard in shards {
        for lineage in archive.wal_lineages(shard).await? {
            let segments = archive.wal_segments(shard, &lineage).await?;
            let mut range = WalRange {
                archive: archive.url().to_string(),
                shard: shard.clone(),
                lineage,
                segments: segments.len() as u64,
                first: segments.first().map_or(Seq(0), |s| s.first),
                last: segments.iter().map(|s| s.last).max().unwrap_or(Seq(0)),
                error: None,
            };
            // Overlaps are tolerated (a late put's leftover: the same writes twice), holes not.
            let mut outcome = crate::wal::chain(segments.clone()).map(|_| ());
            if let (Some(oldest), Some(first)) = (
                reach_back.get(&(shard.clone(), lineage.id)),
                segments.first(),
            ) && first.first.0 > oldest.0 + 1
                && outcome.is_ok()
            {
                outcome = Err(crate::error::Error::new(
                    ErrorCode::BackupWalGap,
                    format!(
                        "the archive starts at {} but the oldest backup on this lineage is at {oldest}: points between cannot be restored",
                        first.first
                    ),
                ));
            }
            if level == VerifyLevel::Full && outcome.is_ok() {
                for info in &segments {
                    match archive.get_wal_segment(info).await {
                        Ok(segment) => {
                            report.bytes_checked += segment
                                .batches
                                .iter()
                                .map(|b| b.data.len() as u64)
                                .sum::<u64>()
                        }
                        Err(err) => {
                            outcome = Err(err);
                            break;
                        }
                    }
                }
            }
            if let Err(err) = outcome {
                range.error = Some((err.code.as_str().to_string(), err.chain()));
            }
            report.wal.push(range);
        }
    }
    report.passed = report.problems.is_empty() && report.wal.iter().all(|w| w.error.is_none());
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{SubsecRound, Utc};

    use object_store::ObjectStoreExt as _;

    use super::*;
    use crate::codec;
    use crate::ids::{HlcTime, ObjectId};
    use crate::manifest::{
        BackupKind, BackupManifest, FileEntry, FileKind, MANIFEST_FORMAT_VERSION, ShardManifest,
        ShardTimings, TOOL_VERSION, TransferStats,
    };

    /// A committed backup of one shard whose one file is `objects` stored objects.
    async fn backup(repo: &Repository, objects: &[&[u8]]) -> BackupId {
        let mut chunks = Vec::new();
        for plaintext in objects {
            let encoded = codec::encode(
                plaintext,
                codec::Compression::default(),
                &crate::seal::Seal::Plain,
            )
            .expect("encode");
            let (id, len) = (encoded.id, encoded.plaintext_len);
            let (copy, stored_len) = repo.put_object(encoded).await.expect("put");
            chunks.push(Chunk {
                id,
                copy,
                len,
                stored_len,
            });
        }
        let backup_id = BackupId::new("bk-verified").expect("id");
        let shard = ShardManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            backup_id: backup_id.clone(),
            shard_id: ShardId::new("shard-0").expect("shard"),
            engine: "memory".into(),
            seq: Seq(1),
            lineage: Lineage::root(),
            hlc: HlcTime::default(),
            captured_at: Utc::now(),
            column_families: vec!["default".into()],
            files: vec![FileEntry {
                name: "data".into(),
                size: chunks.iter().map(|c| c.len).sum(),
                kind: FileKind::Meta,
                identity: None,
                chunks,
            }],
            files_seq: None,
            wal_after: None,
            wal: Vec::new(),
            stats: TransferStats::default(),
            timings: ShardTimings::default(),
            tool_version: TOOL_VERSION.into(),
        };
        repo.put_pending(&backup_id, b"{}".to_vec())
            .await
            .expect("pending");
        repo.put_shard_manifest(&shard).await.expect("shard");
        let manifest = BackupManifest::commit(
            backup_id.clone(),
            BackupKind::Full,
            None,
            Utc::now(),
            &[shard],
        );
        repo.commit_backup(manifest).await.expect("commit");
        backup_id
    }

    async fn full(repo: &Repository, id: &BackupId, window: Option<i64>) -> VerifyReport {
        verify(
            repo,
            std::slice::from_ref(id),
            VerifyLevel::Full,
            100,
            window.map(chrono::Duration::hours),
            2,
            &Progress::default(),
        )
        .await
        .expect("verify")
    }

    #[tokio::test]
    async fn an_incremental_verify_skips_what_a_full_one_checked_within_its_window() {
        let repo = Repository::open("memory://verify-incremental")
            .await
            .expect("repo");
        let objects: [&[u8]; 3] = [b"one", b"two", b"three"];
        let id = backup(&repo, &objects).await;
        let first = full(&repo, &id, Some(24)).await;
        assert!(first.passed, "{first}");
        assert_eq!((first.objects_checked, first.objects_skipped), (3, 0));
        assert_eq!(repo.verified_objects().await.expect("record").len(), 3);
        let second = full(&repo, &id, Some(24)).await;
        assert_eq!((second.objects_checked, second.objects_skipped), (0, 3));
        assert!(
            second.to_string().contains("3 object(s) skipped"),
            "{second}"
        );
        // Damage found by a run without the window (and by one once the window passed).
        let damaged = ObjectId::of(b"two");
        repo.store()
            .put(
                &repo.layout().object(&damaged, 0),
                object_store::PutPayload::from(b"not the object".to_vec()),
            )
            .await
            .expect("damage");
        let whole = full(&repo, &id, None).await;
        assert!(!whole.passed, "{whole}");
        // That run took the damaged object out of the record: the incremental run checks it
        // again, so known damage never passes as verified.
        let after = full(&repo, &id, Some(24)).await;
        assert!(!after.passed, "{after}");
        assert_eq!((after.objects_checked, after.objects_skipped), (1, 2));
        // A window past what the record keeps is refused, not a panic.
        let too_long = verify(
            &repo,
            std::slice::from_ref(&id),
            VerifyLevel::Full,
            100,
            Some(chrono::Duration::hours(i64::from(u32::MAX))),
            2,
            &Progress::default(),
        )
        .await
        .expect_err("too long");
        assert_eq!(too_long.code, ErrorCode::InvalidArgument);
        // A damaged record is refused with what to do, never read as "all verified".
        repo.store()
            .put(
                &repo.layout().verified(),
                object_store::PutPayload::from(b"garbage".to_vec()),
            )
            .await
            .expect("damage the record");
        let err = verify(
            &repo,
            std::slice::from_ref(&id),
            VerifyLevel::Full,
            100,
            Some(chrono::Duration::hours(24)),
            2,
            &Progress::default(),
        )
        .await
        .expect_err("a damaged record");
        assert!(err.message.contains("delete it"), "{err}");
        // A quick verify records nothing, so it cannot skip.
        assert!(
            verify(
                &repo,
                std::slice::from_ref(&id),
                VerifyLevel::Quick,
                100,
                Some(chrono::Duration::hours(24)),
                2,
                &Progress::default(),
            )
            .await
            .is_err()
        );
    }

    #[test]
    fn the_verify_record_round_trips_and_refuses_any_damage() {
        let mut record = Verified::new();
        record.insert((ObjectId::of(b"a"), 0), Utc::now().trunc_subsecs(0));
        record.insert((ObjectId::of(b"b"), 3), Utc::now().trunc_subsecs(0));
        let bytes = encode_verified(&record);
        assert_eq!(decode_verified("test", &bytes).ok(), Some(record));
        for at in [0, 9, 20, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1;
            assert!(decode_verified("test", &damaged).is_err(), "byte {at}");
        }
        assert!(decode_verified("test", &bytes[..bytes.len() - 1]).is_err());
    }
}
