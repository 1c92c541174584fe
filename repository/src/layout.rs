//! The object-key layout of a repository: the one place that builds keys.
//!
//! ```text
//! <prefix>/lockstep-repository.json             identity marker: format, repository id and
//!                                               the cluster it belongs to; written once
//! <prefix>/lockstep-encryption.json           whether the repository is encrypted (seal.rs);
//!                                               written once, when it is created
//! <prefix>/keys/<slot>.json                     key slots: the master key sealed under one
//!                                               passphrase each
//! <prefix>/coordinators/<epoch:020>.json        fencing: one per coordinator start, written
//!                                               create-only; the highest epoch acts
//! <prefix>/objects/<aa>/<sha256-hex>[.<copy>]   content-addressed data objects (codec.rs framing);
//!                                               copy n > 0 is written while copy n-1 is
//!                                               condemned by a GC sweep (gc.rs)
//! <prefix>/gc/candidates.bin                    the unreferenced objects the last GC pass saw,
//!                                               with when each was first seen (gc.rs)
//! <prefix>/verify/verified.bin                  when a full verify last checked each object
//!                                               (verify.rs, incremental verify)
//! <prefix>/schedules/<name>.json                a schedule's last firing (coordinator)
//! <prefix>/shards/<shard-id>/<backup-id>.json   shard manifests
//! <prefix>/backups/<backup-id>.json             backup manifests, written last
//! <prefix>/catalog/log/<n:020>.json             the catalog index's entries, create-only:
//!                                               manifests added or backup ids removed
//!                                               (catalog.rs)
//! <prefix>/catalog/snapshot/<n:020>.json        every indexed manifest after entry n
//! <prefix>/pending/<backup-id>.json             intent of a running backup; removed at commit
//!                                               or cleanup, so one left behind marks leftovers
//! <prefix>/restores/<restore-id>.json          a cluster restore under way; removed when it
//!                                               ends, so one left behind marks a restore to
//!                                               finish or discard
//! <prefix>/restores/<restore-id>.decision      whether its swapped shards commit or revert:
//!                                               written once, by whoever decides first;
//!                                               kept after the restore ends
//! <prefix>/tags/<tag-name>.json                 tags: named cut vectors (restore points)
//! <prefix>/wal/<shard-id>/<lineage>/<f[0..11]>/<f[11..14]>/<f[14..17]>/<segment name>
//!                                               WAL segments (wal.rs), named
//!                                               <first:020>-<last:020>-<hlc-min:016x>-<hlc-max:016x>-<sha256>.seg:
//!                                               the name alone says which writes a segment
//!                                               holds and its hash; f is the name's first 17
//!                                               digits, so a directory holds about 1,000
//!                                               entries at most and key order is name order;
//!                                               <lineage> is `Lineage::dir_name`:
//!                                               <timeline:010>-<id>-<parent>-<branch:020>
//!                                               (segments written before the directories
//!                                               sit right under <lineage> and are still read)
//! <prefix>/wal-marks/<shard-id>/<lineage>/<f[0..11]>/<f[11..14]>/<f[14..17]>/<segment name>
//!                                               empty: about one segment in 1,024, by its
//!                                               hash; where listing what follows a sequence
//!                                               number starts (`wal_mark_before`); flat
//!                                               under <lineage> before the directories
//! ```
//!
//! Architecture invariant: a key is derived only from validated ids (`ids.rs`) and object
//! hashes, so no caller-supplied string can escape the prefix. Anything not reachable from a
//! backup manifest is garbage.

use object_store::path::Path;

use crate::ids::{BackupId, ObjectId, RestoreId, ShardId, TagName};
use crate::lineage::Lineage;
use crate::wal::SegmentInfo;

pub const REPOSITORY_MARKER: &str = "lockstep-repository.json";
pub const ENCRYPTION_MARKER: &str = "lockstep-encryption.json";
const KEYS: &str = "keys";
const OBJECTS: &str = "objects";
const SHARDS: &str = "shards";
const BACKUPS: &str = "backups";
const PENDING: &str = "pending";
const RESTORES: &str = "restores";
const COORDINATORS: &str = "coordinators";
const TAGS: &str = "tags";
const WAL: &str = "wal";
const WAL_MARKS: &str = "wal-marks";
const GC: &str = "gc";
const SCHEDULES: &str = "schedules";
const VERIFY: &str = "verify";
const CATALOG: &str = "catalog";
const CATALOG_LOG: &str = "log";
const CATALOG_SNAPSHOTS: &str = "snapshot";

/// The digits of a segment's name (its first sequence number, zero-padded to 20) that name
/// the directories it is stored under, one range per level: each directory holds at most
/// 1,000 entries whatever the lineage's length (the first level, a billion writes apiece,
/// a thousand at a trillion writes), and a key sorts where its name does, so an object store
/// lists segments in sequence order and a local directory tree is walked in it, from
/// anywhere, reading only the directories it needs.
pub const WAL_DIRS: [std::ops::Range<usize>; 3] = [0..11, 11..14, 14..17];

/// `info`'s name under `dir`, in the directories the name's first digits make.
fn wal_placed(dir: Path, info: &SegmentInfo) -> Path {
    let name = info.file_name();
    let mut key = dir;
    for digits in WAL_DIRS {
        key = key.join(&name[digits]);
    }
    key.join(name)
}

/// Where a key under a lineage's WAL (or marks) directory sits (`Layout::wal_place_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalPlace<'k> {
    /// A segment in the directories its name makes; the name.
    InDirectory(&'k str),
    /// Right under the lineage's directory, as segments were stored before directories.
    Flat(&'k str),
    /// Not where a segment goes.
    Other,
}

/// Builds every key of one repository under its prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: Path,
}

/// Whether `slot` can name a key slot: 1 to 64 lower-case hex digits.
pub fn is_slot_name(slot: &str) -> bool {
    (1..=64).contains(&slot.len()) && slot.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Layout {
    pub fn new(prefix: Path) -> Layout {
        Layout { prefix }
    }

    fn join(&self, parts: &[&str]) -> Path {
        let mut path = self.prefix.clone();
        for part in parts {
            path = path.join(*part);
        }
        path
    }

    pub fn marker(&self) -> Path {
        self.join(&[REPOSITORY_MARKER])
    }

    pub fn encryption_marker(&self) -> Path {
        self.join(&[ENCRYPTION_MARKER])
    }

    pub fn keys_dir(&self) -> Path {
        self.join(&[KEYS])
    }

    /// Key slot `slot` (a name [`Layout::slot_of`] accepts: lower-case hex).
    pub fn key_slot(&self, slot: &str) -> Path {
        self.join(&[KEYS, &format!("{slot}.json")])
    }

    /// The key slot named by a key under `keys/`, if it is one.
    pub fn slot_of(&self, key: &Path) -> Option<String> {
        let slot = key.filename()?.strip_suffix(".json")?;
        is_slot_name(slot).then(|| slot.to_string())
    }

    /// The repository's prefix (empty for a repository at the root of its store).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// `key` relative to the prefix: what a sealed record's seal names, so a repository
    /// copied to another prefix still opens.
    pub fn name_of(&self, key: &Path) -> String {
        match key.prefix_match(&self.prefix) {
            Some(parts) => parts
                .map(|part| part.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => key.to_string(),
        }
    }

    /// Copy `copy` of object `id`: copy 0 is named by the hash alone.
    pub fn object(&self, id: &ObjectId, copy: u32) -> Path {
        let hex = id.to_hex();
        if copy == 0 {
            self.join(&[OBJECTS, &hex[..2], &hex])
        } else {
            self.join(&[OBJECTS, &hex[..2], &format!("{hex}.{copy}")])
        }
    }

    /// When a full verify last checked each object.
    pub fn verified(&self) -> Path {
        self.join(&[VERIFY, "verified.bin"])
    }

    /// The record of a schedule's last firing.
    pub fn schedule(&self, name: &str) -> Path {
        self.join(&[SCHEDULES, &format!("{name}.json")])
    }

    pub fn gc_candidates(&self) -> Path {
        self.join(&[GC, "candidates.bin"])
    }

    pub fn objects_dir(&self) -> Path {
        self.join(&[OBJECTS])
    }

    pub fn shard_manifest(&self, shard: &ShardId, backup: &BackupId) -> Path {
        self.join(&[SHARDS, shard.as_str(), &format!("{backup}.json")])
    }

    pub fn shards_dir(&self) -> Path {
        self.join(&[SHARDS])
    }

    pub fn backup_manifest(&self, backup: &BackupId) -> Path {
        self.join(&[BACKUPS, &format!("{backup}.json")])
    }

    pub fn backups_dir(&self) -> Path {
        self.join(&[BACKUPS])
    }

    /// Entry `n` of the catalog index's log.
    pub fn catalog_entry(&self, n: u64) -> Path {
        self.join(&[CATALOG, CATALOG_LOG, &format!("{n:020}.json")])
    }

    pub fn catalog_log_dir(&self) -> Path {
        self.join(&[CATALOG, CATALOG_LOG])
    }

    /// The catalog index as it stood after entry `n`.
    pub fn catalog_snapshot(&self, n: u64) -> Path {
        self.join(&[CATALOG, CATALOG_SNAPSHOTS, &format!("{n:020}.json")])
    }

    pub fn catalog_snapshots_dir(&self) -> Path {
        self.join(&[CATALOG, CATALOG_SNAPSHOTS])
    }

    /// The position named by a key under `catalog/log/` or `catalog/snapshot/`.
    pub fn catalog_position_of(&self, key: &Path) -> Option<u64> {
        let digits = key.filename()?.strip_suffix(".json")?;
        (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
    }

    pub fn pending(&self, backup: &BackupId) -> Path {
        self.join(&[PENDING, &format!("{backup}.json")])
    }

    pub fn pending_dir(&self) -> Path {
        self.join(&[PENDING])
    }

    pub fn running_restore(&self, restore: &RestoreId) -> Path {
        self.join(&[RESTORES, &format!("{restore}.json")])
    }

    pub fn restore_decision(&self, restore: &RestoreId) -> Path {
        self.join(&[RESTORES, &format!("{restore}.decision")])
    }

    pub fn coordinator_epoch(&self, epoch: u64) -> Path {
        self.join(&[COORDINATORS, &format!("{epoch:020}.json")])
    }

    pub fn coordinators_dir(&self) -> Path {
        self.join(&[COORDINATORS])
    }

    /// The epoch named by a key under `coordinators/`, if it is one.
    pub fn epoch_of(&self, key: &Path) -> Option<u64> {
        key.filename()?.strip_suffix(".json")?.parse().ok()
    }

    pub fn running_restores_dir(&self) -> Path {
        self.join(&[RESTORES])
    }

    pub fn tag(&self, name: &TagName) -> Path {
        self.join(&[TAGS, &format!("{name}.json")])
    }

    pub fn tags_dir(&self) -> Path {
        self.join(&[TAGS])
    }

    /// The tag named by a key under `tags/`, if it is one.
    pub fn tag_name_of(&self, key: &Path) -> Option<TagName> {
        key.filename()?
            .strip_suffix(".json")
            .and_then(|name| TagName::new(name).ok())
    }

    pub fn wal_shard_dir(&self, shard: &ShardId) -> Path {
        self.join(&[WAL, shard.as_str()])
    }

    pub fn wal_lineage_dir(&self, shard: &ShardId, lineage: &Lineage) -> Path {
        self.join(&[WAL, shard.as_str(), &lineage.dir_name()])
    }

    /// The marks of `shard`'s `lineage`: empty objects named like about one segment in 1,024
    /// (`Repository::wal_mark_before`), where a listing of part of the lineage starts.
    pub fn wal_marks_dir(&self, shard: &ShardId, lineage: &Lineage) -> Path {
        self.join(&[WAL_MARKS, shard.as_str(), &lineage.dir_name()])
    }

    /// The mark of segment `info`, in the directories its name makes (`WAL_DIRS`).
    pub fn wal_mark(&self, info: &SegmentInfo) -> Path {
        wal_placed(self.wal_marks_dir(&info.shard_id, &info.lineage), info)
    }

    /// Where the mark of segment `info` was stored before marks had directories.
    pub fn wal_flat_mark(&self, info: &SegmentInfo) -> Path {
        self.wal_marks_dir(&info.shard_id, &info.lineage)
            .join(info.file_name())
    }

    /// Where segment `info` is stored: under the directories its name's first digits make
    /// (`WAL_DIRS`).
    pub fn wal_segment(&self, info: &SegmentInfo) -> Path {
        wal_placed(self.wal_lineage_dir(&info.shard_id, &info.lineage), info)
    }

    /// Where segment `info` was stored before segments had directories: right under its
    /// lineage's directory. Still read, never written.
    pub fn wal_flat_segment(&self, info: &SegmentInfo) -> Path {
        self.wal_lineage_dir(&info.shard_id, &info.lineage)
            .join(info.file_name())
    }

    /// Where a key under a lineage's directory sits: a segment in its directories (with
    /// the name), one stored flat (written before them), or neither.
    pub fn wal_place_of<'k>(&self, lineage_dir: &Path, key: &'k Path) -> WalPlace<'k> {
        let Some(parts) = key.prefix_match(lineage_dir) else {
            return WalPlace::Other;
        };
        let parts: Vec<_> = parts.collect();
        let Some(name) = key.filename() else {
            return WalPlace::Other;
        };
        match parts.len() {
            1 => WalPlace::Flat(name),
            n if n == WAL_DIRS.len() + 1 => {
                let placed = WAL_DIRS
                    .iter()
                    .zip(&parts)
                    .all(|(digits, part)| name.get(digits.clone()) == Some(part.as_ref()));
                if placed {
                    WalPlace::InDirectory(name)
                } else {
                    WalPlace::Other
                }
            }
            _ => WalPlace::Other,
        }
    }

    /// The lineage named by a directory under `wal/<shard>/`, if it is one.
    pub fn lineage_of(&self, dir: &Path) -> Option<Lineage> {
        Lineage::parse_dir_name(dir.filename()?)
    }

    /// The backup id named by a key under `backups/` or `pending/`, if it is one.
    pub fn backup_id_of(&self, key: &Path) -> Option<BackupId> {
        key.filename()?
            .strip_suffix(".json")
            .and_then(|id| BackupId::new(id).ok())
    }

    /// The restore id named by a key under `restores/`, if it is one.
    pub fn restore_id_of(&self, key: &Path) -> Option<RestoreId> {
        key.filename()?
            .strip_suffix(".json")
            .and_then(|id| RestoreId::new(id).ok())
    }

    /// The object and copy named by a key under `objects/`, if it is one.
    pub fn object_key_of(&self, key: &Path) -> Option<(ObjectId, u32)> {
        let name = key.filename()?;
        let (hex, copy) = match name.split_once('.') {
            Some((hex, suffix)) => {
                let copy: u32 = suffix.parse().ok().filter(|c| *c > 0)?;
                // Only the name `object` builds: another spelling is another file.
                (copy.to_string() == suffix).then_some((hex, copy))?
            }
            None => (name, 0),
        };
        let canonical =
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        Some((canonical.then(|| hex.parse().ok())??, copy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let layout = Layout::new(Path::from("repo"));
        let id = ObjectId::of(b"x");
        let hex = id.to_hex();
        assert_eq!(
            layout.object(&id, 0).as_ref(),
            format!("repo/objects/{}/{hex}", &hex[..2])
        );
        assert_eq!(
            layout.object(&id, 2).as_ref(),
            format!("repo/objects/{}/{hex}.2", &hex[..2])
        );
        let shard = ShardId::new("shard-0").ok();
        let backup = BackupId::new("bk-1").ok();
        if let (Some(shard), Some(backup)) = (shard, backup) {
            assert_eq!(
                layout.shard_manifest(&shard, &backup).as_ref(),
                "repo/shards/shard-0/bk-1.json"
            );
            assert_eq!(
                layout.backup_manifest(&backup).as_ref(),
                "repo/backups/bk-1.json"
            );
            assert_eq!(
                layout.backup_id_of(&layout.backup_manifest(&backup)),
                Some(backup)
            );
        } else {
            panic!("valid ids refused");
        }
        for copy in [0, 1, 7] {
            assert_eq!(
                layout.object_key_of(&layout.object(&id, copy)),
                Some((id, copy))
            );
        }
        assert_eq!(
            layout.object_key_of(&Path::from(format!("repo/objects/aa/{hex}#1"))),
            None,
            "a staging file is no object"
        );
        for other in [
            format!("{hex}.0"),
            format!("{hex}.01"),
            format!("{hex}.+1"),
            format!("{}.1", hex.to_uppercase()),
        ] {
            assert_eq!(
                layout.object_key_of(&Path::from(format!("repo/objects/aa/{other}"))),
                None,
                "{other}"
            );
        }
    }
}
