//! Versioned JSON manifests: one per shard per backup, and one per backup.
//!
//! A shard manifest lists every file of the captured shard as an ordered list of
//! content-addressed chunks, with the exact sequence number of the cut. A backup manifest
//! names its shard manifests and the cut vector; it is written last, so its presence is the
//! commit point of a backup.
//!
//! Architecture invariant: manifests are parsed strictly (unknown format versions, file names
//! that could escape a directory, and chunk lists that do not add up to the file size are
//! all `ERR_BACKUP_MANIFEST_CORRUPT`), so restore can trust what it reads.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode, Result};
use crate::ids::{BackupId, HlcTime, ObjectId, Seq, ShardId, TagName};
use crate::lineage::Lineage;

/// The manifest format this build writes and the newest it reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// The tool version recorded in every manifest.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One content-addressed piece of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub id: ObjectId,
    /// Which stored copy of the object (`layout.rs`); 0, the usual one, is not written out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub copy: u32,
    /// Plaintext length.
    pub len: u64,
    /// Length of the stored (framed, maybe compressed) object.
    pub stored_len: u64,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

impl Chunk {
    /// The stored object this chunk names.
    pub fn key(&self) -> crate::gc::ObjectKey {
        (self.id, self.copy)
    }
}

/// What a captured file is, which decides how it may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// Immutable table file: reusable by identity without re-reading.
    Sst,
    /// Write-ahead log, copied up to its size at the cut.
    Wal,
    /// Engine metadata (MANIFEST, CURRENT, OPTIONS, snapshots of the in-memory engine).
    Meta,
}

/// One file of a captured shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name relative to the shard directory; never contains a path separator.
    pub name: String,
    pub size: u64,
    pub kind: FileKind,
    /// Identity of an immutable file (engine instance id, file name and size), used to reuse
    /// its chunks in the next backup without reading it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub chunks: Vec<Chunk>,
}

/// A run of the shard's WAL stored in an incremental or differential backup: one segment
/// (`wal.rs`), kept as a content-addressed object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalPiece {
    pub first: Seq,
    pub last: Seq,
    pub hlc_min: HlcTime,
    pub hlc_max: HlcTime,
    pub chunk: Chunk,
}

/// Numbers about how one shard's backup went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStats {
    /// Plaintext bytes of all files in the backup.
    pub bytes_total: u64,
    /// Plaintext bytes read from disk and hashed (reused immutable files are not read).
    pub bytes_read: u64,
    /// Plaintext bytes of chunks that were not in the repository yet.
    pub bytes_uploaded: u64,
    /// Stored bytes written to the repository.
    pub stored_bytes_uploaded: u64,
    pub objects_uploaded: u64,
    pub objects_already_present: u64,
    /// Files whose chunks were taken from the previous manifest by identity.
    pub files_reused: u64,
}

impl TransferStats {
    pub fn add(&mut self, other: &TransferStats) {
        self.bytes_total += other.bytes_total;
        self.bytes_read += other.bytes_read;
        self.bytes_uploaded += other.bytes_uploaded;
        self.stored_bytes_uploaded += other.stored_bytes_uploaded;
        self.objects_uploaded += other.objects_uploaded;
        self.objects_already_present += other.objects_already_present;
        self.files_reused += other.files_reused;
    }
}

/// Timings of one shard's backup, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardTimings {
    /// How long client writes were held at the write gate.
    pub gate_closed_us: u64,
    pub capture_us: u64,
    pub upload_us: u64,
}

/// The manifest of one shard in one backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardManifest {
    pub format_version: u32,
    pub backup_id: BackupId,
    pub shard_id: ShardId,
    /// `rocksdb` or `memory`.
    pub engine: String,
    /// The exact latest sequence number contained in the backup.
    pub seq: Seq,
    /// The shard's history when it was captured (WAL segments after `seq` continue on it).
    pub lineage: Lineage,
    /// The HLC time of the last write contained in the backup.
    #[serde(default)]
    pub hlc: HlcTime,
    pub captured_at: DateTime<Utc>,
    pub column_families: Vec<String>,
    pub files: Vec<FileEntry>,
    /// Full backups whose files were captured before the cut (with the write gate open): the
    /// files open at exactly `files_seq`, and the WAL pieces run from just after it to `seq`.
    /// Absent when the files hold `seq` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_seq: Option<Seq>,
    /// Incremental and differential backups: the WAL runs from just after `wal_after` (the
    /// parent's sequence number) to `seq`, contiguous. Full backups have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_after: Option<Seq>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wal: Vec<WalPiece>,
    pub stats: TransferStats,
    pub timings: ShardTimings,
    pub tool_version: String,
}

/// One shard's position in a restore point: the exact write to stop after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardPoint {
    pub seq: Seq,
    pub lineage: Lineage,
    /// The HLC time of the write at `seq` (zero for an empty shard).
    pub hlc: HlcTime,
}

/// A tag: a named restore point, taken by a barrier without capturing files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagManifest {
    pub format_version: u32,
    pub name: TagName,
    pub created_at: DateTime<Utc>,
    /// The cut vector, with each shard's lineage and HLC time.
    pub points: BTreeMap<ShardId, ShardPoint>,
    /// The longest time any shard's write gate stayed closed, in microseconds.
    pub max_gate_closed_us: u64,
    /// True for restore points the coordinator took by itself (`auto-...` names).
    #[serde(default)]
    pub automatic: bool,
    /// What the operator labelled it with (`--label key=value`).
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    pub tool_version: String,
}

/// Labels on a backup or a tag: `key=value` pairs an operator attaches and filters by.
pub type Labels = BTreeMap<String, String>;

/// At most this many labels on one backup or tag.
pub const MAX_LABELS: usize = 32;

/// Parses `key=value` (the CLI's `--label`), checked as [`check_labels`] does.
pub fn parse_label(text: &str) -> Result<(String, String)> {
    let (key, value) = text.split_once('=').ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidArgument,
            format!("label {text:?} is not KEY=VALUE"),
        )
    })?;
    let label = (key.to_string(), value.to_string());
    check_labels(&[label.clone()].into_iter().collect())?;
    Ok(label)
}

/// Keys are 1 to 63 characters of `a-z 0-9 . _ -` starting with a letter or digit; values at
/// most 255 characters of `A-Z a-z 0-9 . _ - : / @ +` (no space, `,` or `=`, which would read
/// as another label, and nothing that prints otherwise than it reads); at most
/// [`MAX_LABELS`].
pub fn check_labels(labels: &Labels) -> Result<()> {
    let invalid = |why: String| Err(Error::new(ErrorCode::InvalidArgument, why));
    if labels.len() > MAX_LABELS {
        return invalid(format!(
            "{} labels, more than the {MAX_LABELS} allowed",
            labels.len()
        ));
    }
    for (key, value) in labels {
        let key_ok = (1..=63).contains(&key.len())
            && key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if !key_ok {
            return invalid(format!(
                "label key {key:?}: 1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
            ));
        }
        let value_ok = value.len() <= 255
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:/@+".contains(c));
        if !value_ok {
            return invalid(format!(
                "label {key}: the value must be at most 255 characters of A-Z, a-z, 0-9 and . _ - : / @ +"
            ));
        }
    }
    Ok(())
}

/// Whether `labels` holds every label of `wanted` (an empty filter matches everything).
pub fn has_labels(labels: &Labels, wanted: &Labels) -> bool {
    wanted
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

impl TagManifest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn parse(what: &str, bytes: &[u8]) -> Result<TagManifest> {
        let manifest: TagManifest =
            serde_json::from_slice(bytes).map_err(|err| corrupt(what, err))?;
        check_version(what, manifest.format_version)?;
        for point in manifest.points.values() {
            point.lineage.check().map_err(|err| corrupt(what, err))?;
        }
        check_labels(&manifest.labels).map_err(|err| corrupt(what, err))?;
        Ok(manifest)
    }
}

/// The kind of a backup: full, incremental (WAL since the previous backup) or differential (WAL since the last full one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Incremental,
    Differential,
}

impl std::fmt::Display for BackupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
            BackupKind::Differential => "differential",
        })
    }
}

impl std::str::FromStr for BackupKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(BackupKind::Full),
            "incremental" => Ok(BackupKind::Incremental),
            "differential" => Ok(BackupKind::Differential),
            other => Err(Error::new(
                ErrorCode::BackupInvalidType,
                format!("unsupported backup type {other:?}"),
            )),
        }
    }
}

/// How a RAID group spreads data over its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaidLayout {
    None,
    Raid1,
    Raid5,
    Raid6,
    Raid10,
}

impl std::fmt::Display for RaidLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RaidLayout::None => "none",
            RaidLayout::Raid1 => "raid1",
            RaidLayout::Raid5 => "raid5",
            RaidLayout::Raid6 => "raid6",
            RaidLayout::Raid10 => "raid10",
        })
    }
}

/// A shard's role in its RAID group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaidRole {
    Data,
    Parity,
}

impl std::fmt::Display for RaidRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RaidRole::Data => "data",
            RaidRole::Parity => "parity",
        })
    }
}

/// One RAID group: every member, data and parity, must be in every backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaidGroup {
    pub name: String,
    pub layout: RaidLayout,
    pub data: Vec<ShardId>,
    #[serde(default)]
    pub parity: Vec<ShardId>,
}

impl RaidGroup {
    pub fn members(&self) -> impl Iterator<Item = (&ShardId, RaidRole)> {
        self.data
            .iter()
            .map(|s| (s, RaidRole::Data))
            .chain(self.parity.iter().map(|s| (s, RaidRole::Parity)))
    }
}

/// A shard as the backup manifest names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRef {
    pub shard_id: ShardId,
    pub seq: Seq,
    /// The shard's history at `seq` (as its shard manifest says).
    pub lineage: Lineage,
    /// The HLC time of the shard's last write in the backup (as its shard manifest says), so
    /// a plan finds points in time from the catalog alone; absent in manifests written
    /// before it was recorded, whose shard manifests say it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<HlcTime>,
    pub n_files: u64,
    pub bytes: u64,
}

/// The manifest of a backup; its presence is the backup's commit point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupManifest {
    pub format_version: u32,
    pub backup_id: BackupId,
    pub kind: BackupKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<BackupId>,
    pub started_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
    pub shards: Vec<ShardRef>,
    /// The cut vector: the exact sequence number of every shard.
    pub cut: BTreeMap<ShardId, Seq>,
    pub stats: TransferStats,
    /// The longest time any shard's write gate stayed closed, in microseconds.
    pub max_gate_closed_us: u64,
    /// The RAID groups of the cluster when the backup was taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raid_groups: Vec<RaidGroup>,
    pub tool_version: String,
    /// The backup's place in the repository's commit order (1, 2, ...), set when it is
    /// committed; 0 in manifests written before the order was recorded. The catalog and
    /// `latest` follow it, not the clocks in ids and times, which can step back. Left out
    /// when 0, so such a manifest keeps the size it was stored with (the catalog index
    /// compares sizes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub commit_seq: u64,
    /// What the operator labelled it with (`--label key=value`).
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

fn corrupt(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::BackupManifestCorrupt, format!("{what}: {why}"))
}

fn check_version(what: &str, version: u32) -> Result<()> {
    if version == 0 || version > MANIFEST_FORMAT_VERSION {
        return Err(corrupt(
            what,
            format!(
                "format version {version} is not supported by this build (reads up to {MANIFEST_FORMAT_VERSION})"
            ),
        ));
    }
    Ok(())
}

/// A file name that stays inside the directory it is written to.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

impl ShardManifest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and checks a shard manifest; `what` names it in errors.
    pub fn parse(what: &str, bytes: &[u8]) -> Result<ShardManifest> {
        let manifest: ShardManifest =
            serde_json::from_slice(bytes).map_err(|err| corrupt(what, err))?;
        check_version(what, manifest.format_version)?;
        manifest.lineage.check().map_err(|err| corrupt(what, err))?;
        for file in &manifest.files {
            if !is_safe_file_name(&file.name) {
                return Err(corrupt(what, format!("unsafe file name {:?}", file.name)));
            }
            let sum = file
                .chunks
                .iter()
                .try_fold(0u64, |sum, c| sum.checked_add(c.len));
            if sum != Some(file.size) {
                return Err(corrupt(
                    what,
                    format!(
                        "file {} has {:?} bytes of chunks for size {}",
                        file.name, sum, file.size
                    ),
                ));
            }
        }
        let positions = [Some(manifest.seq), manifest.files_seq, manifest.wal_after];
        if positions
            .into_iter()
            .flatten()
            .chain(manifest.wal.iter().flat_map(|p| [p.first, p.last]))
            .any(|seq| !seq.is_valid())
        {
            return Err(corrupt(
                what,
                "a sequence number past the largest a shard can reach",
            ));
        }
        if manifest.files_seq.is_some() && manifest.wal_after.is_some() {
            return Err(corrupt(what, "both files_seq and wal_after"));
        }
        if manifest.files_seq.is_some_and(|at| at > manifest.seq) {
            return Err(corrupt(what, "files_seq after the shard's sequence number"));
        }
        if let Some(after) = manifest.wal_start() {
            let mut next = Seq(after.0 + 1);
            for piece in &manifest.wal {
                if piece.first != next || piece.last < piece.first {
                    return Err(corrupt(
                        what,
                        format!(
                            "WAL piece {}..={} does not follow sequence {}",
                            piece.first,
                            piece.last,
                            Seq(next.0 - 1)
                        ),
                    ));
                }
                next = Seq(piece.last.0 + 1);
            }
            if next.0 - 1 != manifest.seq.0 {
                return Err(corrupt(
                    what,
                    format!(
                        "the WAL pieces end at sequence {}, the shard at {}",
                        next.0 - 1,
                        manifest.seq
                    ),
                ));
            }
        } else if !manifest.wal.is_empty() {
            return Err(corrupt(what, "WAL pieces without wal_after or files_seq"));
        }
        Ok(manifest)
    }

    /// Where the WAL pieces start (just after this): the parent's sequence number for an
    /// incremental or differential backup, the files' for a full backup taken with the gate
    /// open. `None` for a full backup with no pieces.
    pub fn wal_start(&self) -> Option<Seq> {
        self.wal_after.or(self.files_seq)
    }

    /// The sequence number the files open at.
    pub fn files_seq(&self) -> Seq {
        self.files_seq.unwrap_or(self.seq)
    }

    /// Plaintext bytes of the backup: its files and its WAL pieces.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum::<u64>()
            + self.wal.iter().map(|p| p.chunk.len).sum::<u64>()
    }
}

impl BackupManifest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn parse(what: &str, bytes: &[u8]) -> Result<BackupManifest> {
        let manifest: BackupManifest =
            serde_json::from_slice(bytes).map_err(|err| corrupt(what, err))?;
        manifest.check(what)?;
        Ok(manifest)
    }

    /// What `parse` checks beyond the JSON's shape: for a manifest read inside another
    /// record (the catalog index).
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        check_version(what, self.format_version)?;
        check_labels(&self.labels).map_err(|err| corrupt(what, err))
    }

    /// Builds the backup manifest that commits the given shard manifests.
    pub fn commit(
        backup_id: BackupId,
        kind: BackupKind,
        parent: Option<BackupId>,
        started_at: DateTime<Utc>,
        shards: &[ShardManifest],
    ) -> BackupManifest {
        let mut stats = TransferStats::default();
        for shard in shards {
            stats.add(&shard.stats);
        }
        BackupManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            backup_id,
            kind,
            parent,
            started_at,
            completed_at: Utc::now(),
            shards: shards
                .iter()
                .map(|s| ShardRef {
                    shard_id: s.shard_id.clone(),
                    seq: s.seq,
                    lineage: s.lineage,
                    hlc: Some(s.hlc),
                    n_files: s.files.len() as u64,
                    bytes: s.total_bytes(),
                })
                .collect(),
            cut: shards.iter().map(|s| (s.shard_id.clone(), s.seq)).collect(),
            stats,
            max_gate_closed_us: shards
                .iter()
                .map(|s| s.timings.gate_closed_us)
                .max()
                .unwrap_or(0),
            raid_groups: Vec::new(),
            tool_version: TOOL_VERSION.to_string(),
            commit_seq: 0,
            labels: Labels::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Result<ShardManifest> {
        Ok(ShardManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            backup_id: BackupId::new("bk-1")?,
            shard_id: ShardId::new("shard-0")?,
            engine: "memory".into(),
            seq: Seq(42),
            lineage: Lineage::root(),
            hlc: HlcTime::new(1_000, 1),
            captured_at: Utc::now(),
            column_families: vec!["default".into()],
            files: vec![FileEntry {
                name: "000007.sst".into(),
                size: 3,
                kind: FileKind::Sst,
                identity: Some("db/000007.sst/3".into()),
                chunks: vec![Chunk {
                    id: ObjectId::of(b"abc"),
                    copy: 0,
                    len: 3,
                    stored_len: 19,
                }],
            }],
            files_seq: None,
            wal_after: None,
            wal: Vec::new(),
            stats: TransferStats::default(),
            timings: ShardTimings::default(),
            tool_version: TOOL_VERSION.into(),
        })
    }

    #[test]
    fn labels_parse_check_and_filter() {
        assert_eq!(
            parse_label("team=payments").ok(),
            Some(("team".into(), "payments".into()))
        );
        assert_eq!(
            parse_label("ticket=").ok(),
            Some(("ticket".into(), String::new()))
        );
        for bad in [
            "noequals",
            "=v",
            "Team=x",
            "-x=y",
            "a b=c",
            "k=\u{7}",
            "k=a b",
            "k=x,b=y",
            "k=x=y",
            "k=\u{202e}abc",
            &format!("{}=v", "k".repeat(64)),
            &format!("k={}", "v".repeat(256)),
        ] {
            let err = parse_label(bad).expect_err(bad);
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{bad}: {err}");
        }
        let labels: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert!(check_labels(&labels).is_err(), "too many");
        let have: Labels = [
            ("team".into(), "payments".into()),
            ("env".into(), "prod".into()),
        ]
        .into_iter()
        .collect();
        assert!(has_labels(&have, &Labels::new()));
        assert!(has_labels(
            &have,
            &[("env".into(), "prod".into())].into_iter().collect()
        ));
        assert!(!has_labels(
            &have,
            &[("env".into(), "dev".into())].into_iter().collect()
        ));
    }

    /// A WAL piece of sequence numbers `first..=last`.
    fn piece(first: u64, last: u64) -> WalPiece {
        WalPiece {
            first: Seq(first),
            last: Seq(last),
            hlc_min: HlcTime::new(1, 0),
            hlc_max: HlcTime::new(2, 0),
            chunk: Chunk {
                id: ObjectId::of(b"w"),
                copy: 0,
                len: 1,
                stored_len: 17,
            },
        }
    }

    #[test]
    fn shard_manifests_round_trip() -> Result<()> {
        let manifest = sample()?;
        assert_eq!(ShardManifest::parse("m", &manifest.to_json())?, manifest);
        Ok(())
    }

    #[test]
    fn sequence_numbers_and_sizes_that_would_overflow_are_corrupt_not_wrapped() -> Result<()> {
        let corrupt = |manifest: &ShardManifest| {
            ShardManifest::parse("m", &manifest.to_json())
                .err()
                .map(|e| e.code)
        };
        let mut wraps = sample()?;
        wraps.files.clear();
        wraps.seq = Seq(u64::MAX);
        wraps.wal_after = Some(Seq(u64::MAX - 1));
        wraps.wal = vec![piece(u64::MAX, u64::MAX)];
        assert_eq!(corrupt(&wraps), Some(ErrorCode::BackupManifestCorrupt));
        let mut after_max = sample()?;
        after_max.files.clear();
        after_max.wal_after = Some(Seq(u64::MAX));
        assert_eq!(corrupt(&after_max), Some(ErrorCode::BackupManifestCorrupt));
        let mut chunks = sample()?;
        let chunk = chunks.files[0].chunks[0].clone();
        chunks.files[0].chunks = vec![
            Chunk {
                len: u64::MAX,
                ..chunk.clone()
            },
            Chunk { len: 4, ..chunk },
        ];
        chunks.files[0].size = 3;
        assert_eq!(corrupt(&chunks), Some(ErrorCode::BackupManifestCorrupt));
        Ok(())
    }

    #[test]
    fn truncated_or_hostile_manifests_are_corrupt() -> Result<()> {
        let json = sample()?.to_json();
        let truncated = ShardManifest::parse("m", &json[..json.len() / 2]);
        assert_eq!(
            truncated.err().map(|e| e.code),
            Some(ErrorCode::BackupManifestCorrupt)
        );

        let mut hostile = sample()?;
        hostile.files[0].name = "../../etc/passwd".into();
        let err = ShardManifest::parse("m", &hostile.to_json())
            .err()
            .map(|e| e.code);
        assert_eq!(err, Some(ErrorCode::BackupManifestCorrupt));

        let mut short = sample()?;
        short.files[0].size = 4;
        let err = ShardManifest::parse("m", &short.to_json())
            .err()
            .map(|e| e.code);
        assert_eq!(err, Some(ErrorCode::BackupManifestCorrupt));

        let mut incremental = sample()?;
        incremental.files.clear();
        incremental.wal_after = Some(Seq(30));
        incremental.wal = vec![piece(31, 40), piece(41, 42)];
        assert_eq!(
            ShardManifest::parse("m", &incremental.to_json())?,
            incremental
        );
        incremental.wal = vec![piece(31, 39), piece(41, 42)];
        let err = ShardManifest::parse("m", &incremental.to_json())
            .err()
            .map(|e| e.code);
        assert_eq!(err, Some(ErrorCode::BackupManifestCorrupt));
        incremental.wal = vec![piece(31, 41)];
        let err = ShardManifest::parse("m", &incremental.to_json())
            .err()
            .map(|e| e.code);
        assert_eq!(err, Some(ErrorCode::BackupManifestCorrupt));

        // A full backup whose files open before the cut: its WAL tail must reach the cut.
        let mut tail = sample()?;
        tail.files_seq = Some(Seq(40));
        tail.wal = vec![piece(41, 42)];
        assert_eq!(ShardManifest::parse("m", &tail.to_json())?, tail);
        assert_eq!(
            (tail.wal_start(), tail.files_seq()),
            (Some(Seq(40)), Seq(40))
        );
        tail.wal = vec![piece(41, 41)];
        let err = ShardManifest::parse("m", &tail.to_json())
            .err()
            .map(|e| e.code);
        assert_eq!(err, Some(ErrorCode::BackupManifestCorrupt));
        tail.wal = vec![piece(41, 42)];
        tail.wal_after = Some(Seq(40));
        let err = ShardManifest::parse("m", &tail.to_json())
            .err()
            .map(|e| e.code);
        assert_eq!(err, Some(ErrorCode::BackupManifestCorrupt));

        let mut future = sample()?;
        future.format_version = MANIFEST_FORMAT_VERSION + 1;
        let err = ShardManifest::parse("m", &future.to_json())
            .err()
            .map(|e| e.code);
        assert_eq!(err, Some(ErrorCode::BackupManifestCorrupt));
        Ok(())
    }
}
