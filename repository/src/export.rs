//! Export files (`lockstep backup export`, `lockstep backup import`,
//! `lockstep-agent restore --from-file`): one backup with its chain, or a tag with the WAL
//! its restore replays, in one `.tar.zst` file a disk can carry.
//!
//! The file is a zstd stream (with its frame checksum) of a POSIX tar whose entries are, in
//! this order:
//!
//! ```text
//! EXPORT.json                  the integrity manifest (`ExportManifest`): what the file
//!                              restores to, every entry after it by kind, name and size
//! lockstep-encryption.json     the exporting repository's encryption marker (if it has one)
//! keys/<slot>.json             its key slots (an encrypted repository: sealed, as stored)
//! objects/..., wal/...         data objects and WAL segments, byte for byte as stored
//! shards/..., backups/...,     manifests, after everything they name; backups parents first
//! tags/...
//! SHA256SUMS                   `sha256sum` lines of every entry before it, last
//! ```
//!
//! Entries are named by the repository's own keys (`layout.rs`), so an unpacked file is a
//! repository (what `--from-file` restores from). A reader refuses an entry that is not the
//! next one the manifest lists, with its size, and checks every entry's SHA-256 against
//! `SHA256SUMS` at the end: nothing read may be published before [`read_export`] returns.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec;
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{BackupId, ObjectId, Seq, ShardId, TagName};
use crate::layout::Layout;
use crate::lineage::{Leg, Lineage};
use crate::manifest::{BackupManifest, Chunk, ShardManifest, TagManifest};
use crate::repository::{MAX_MANIFEST_BYTES, MAX_SEGMENT_BYTES, Repository};
use crate::seal::Seal;
use crate::wal::SegmentInfo;

pub const FORMAT: &str = "lockstep-export";
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_NAME: &str = "EXPORT.json";
pub const SUMS_NAME: &str = "SHA256SUMS";
/// zstd level of the stream: objects are compressed already, so the fastest level.
const ZSTD_LEVEL: i32 = 1;

/// `EXPORT.json`: what the file holds and restores to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportManifest {
    pub format: String,
    pub format_version: u32,
    pub created_at: DateTime<Utc>,
    pub tool_version: String,
    /// The exporting repository, for people.
    pub source: String,
    /// The master key the entries are sealed under (the encryption marker's `key_id`);
    /// empty: plaintext.
    pub key_id: String,
    /// The backup exported (with its chain), or the base of a tag's first shard.
    pub backup_id: BackupId,
    /// The tag exported, if the file restores to a tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<TagName>,
    /// How each shard is restored from the file.
    pub shards: Vec<ExportedShard>,
    pub entries: Vec<Entry>,
}

/// One shard's restore from the file: its full base, the chain whose WAL is replayed after
/// it, then the WAL segments of `legs` (oldest lineage first) up to `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedShard {
    pub shard_id: ShardId,
    pub base: BackupId,
    pub chain: Vec<BackupId>,
    /// The lineage holding the target (the restored shard's history continues it).
    pub lineage: Lineage,
    pub legs: Vec<Leg>,
    pub target: Seq,
}

/// One entry after `EXPORT.json`, by kind: its name is the repository key it is stored
/// under, built by [`Layout`] from validated ids only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Entry {
    EncryptionMarker {
        size: u64,
    },
    KeySlot {
        slot: String,
        size: u64,
    },
    Object {
        id: ObjectId,
        copy: u32,
        size: u64,
    },
    WalSegment {
        shard_id: ShardId,
        lineage: Lineage,
        file_name: String,
        size: u64,
    },
    ShardManifest {
        shard_id: ShardId,
        backup_id: BackupId,
        size: u64,
    },
    BackupManifest {
        backup_id: BackupId,
        size: u64,
    },
    Tag {
        name: TagName,
        size: u64,
    },
}

fn invalid_file(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::BackupChecksumMismatch, message)
}

impl Entry {
    pub fn size(&self) -> u64 {
        match self {
            Entry::EncryptionMarker { size }
            | Entry::KeySlot { size, .. }
            | Entry::Object { size, .. }
            | Entry::WalSegment { size, .. }
            | Entry::ShardManifest { size, .. }
            | Entry::BackupManifest { size, .. }
            | Entry::Tag { size, .. } => *size,
        }
    }

    /// The WAL segment an entry names (its name carries its range and hash).
    pub fn segment(&self) -> Result<Option<SegmentInfo>> {
        match self {
            Entry::WalSegment {
                shard_id,
                lineage,
                file_name,
                ..
            } => SegmentInfo::parse(shard_id, lineage, file_name)
                .map(Some)
                .ok_or_else(|| invalid_file(format!("{file_name} names no WAL segment"))),
            _ => Ok(None),
        }
    }

    /// The key the entry is stored under in `layout`'s repository.
    pub fn key(&self, layout: &Layout) -> Result<Path> {
        Ok(match self {
            Entry::EncryptionMarker { .. } => layout.encryption_marker(),
            Entry::KeySlot { slot, .. } => {
                if !crate::layout::is_slot_name(slot) {
                    return Err(invalid_file(format!("{slot:?} names no key slot")));
                }
                layout.key_slot(slot)
            }
            Entry::Object { id, copy, .. } => layout.object(id, *copy),
            Entry::WalSegment { .. } => match self.segment()? {
                Some(info) => layout.wal_segment(&info),
                None => unreachable_segment()?,
            },
            Entry::ShardManifest {
                shard_id,
                backup_id,
                ..
            } => layout.shard_manifest(shard_id, backup_id),
            Entry::BackupManifest { backup_id, .. } => layout.backup_manifest(backup_id),
            Entry::Tag { name, .. } => layout.tag(name),
        })
    }

    /// The name of the entry in the file: its key relative to the repository.
    pub fn name(&self) -> Result<String> {
        Ok(self.key(&Layout::new(Path::default()))?.to_string())
    }

    /// The most an entry of this kind can hold, refused unread beyond.
    pub(crate) fn bound(&self) -> u64 {
        match self {
            Entry::Object { .. } | Entry::WalSegment { .. } => {
                codec::max_stored_len(MAX_SEGMENT_BYTES)
            }
            _ => MAX_MANIFEST_BYTES + crate::seal::RECORD_OVERHEAD,
        }
    }
}

fn unreachable_segment() -> Result<Path> {
    Err(invalid_file("a WAL segment entry names no segment"))
}

/// Writes an export file: `EXPORT.json` first, then each listed entry in order, then
/// `SHA256SUMS`.
pub struct ExportWriter<W: Write> {
    tar: tar::Builder<zstd::Encoder<'static, W>>,
    expected: std::vec::IntoIter<Entry>,
    sums: Vec<(String, [u8; 32])>,
}

fn io_error(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |err| Error::io(ErrorCode::StorageUnavailable, what.to_string(), err)
}

impl<W: Write> ExportWriter<W> {
    pub fn new(out: W, manifest: &ExportManifest) -> Result<ExportWriter<W>> {
        let mut encoder = zstd::Encoder::new(out, ZSTD_LEVEL).map_err(io_error("start zstd"))?;
        encoder
            .include_checksum(true)
            .map_err(io_error("start zstd"))?;
        let mut writer = ExportWriter {
            tar: tar::Builder::new(encoder),
            expected: manifest.entries.clone().into_iter(),
            sums: Vec::new(),
        };
        let json = serde_json::to_vec_pretty(manifest).map_err(|err| {
            Error::with_source(ErrorCode::InvalidArgument, "encode EXPORT.json", err)
        })?;
        writer.put(MANIFEST_NAME, &json)?;
        Ok(writer)
    }

    fn put(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        self.tar
            .append_data(&mut header, name, bytes)
            .map_err(io_error("write the export file"))?;
        self.sums
            .push((name.to_string(), Sha256::digest(bytes).into()));
        Ok(())
    }

    /// Appends the next listed entry; `bytes` must be of the size the manifest lists.
    pub fn append(&mut self, entry: &Entry, bytes: &[u8]) -> Result<()> {
        let next = self.expected.next();
        if next.as_ref() != Some(entry) || entry.size() != bytes.len() as u64 {
            return Err(Error::new(
                ErrorCode::StorageUnavailable,
                format!(
                    "{} changed while it was exported ({} bytes, {} listed); export again",
                    entry.name()?,
                    bytes.len(),
                    entry.size()
                ),
            ));
        }
        self.put(&entry.name()?, bytes)
    }

    /// Writes `SHA256SUMS` and ends the stream; returns the output.
    pub fn finish(mut self) -> Result<W> {
        if let Some(missing) = self.expected.next() {
            return Err(Error::new(
                ErrorCode::StorageUnavailable,
                format!("{} was listed and not written", missing.name()?),
            ));
        }
        let sums: String = self
            .sums
            .iter()
            .map(|(name, sum)| format!("{}  {name}\n", hex::encode(sum)))
            .collect();
        self.put(SUMS_NAME, sums.as_bytes())?;
        let encoder = self
            .tar
            .into_inner()
            .map_err(io_error("write the export file"))?;
        encoder.finish().map_err(io_error("write the export file"))
    }
}

/// Reads an export file from `input`: calls `on_manifest` with `EXPORT.json`, then
/// `on_entry` with every entry in order, each checked against the listing; returns the
/// manifest once `SHA256SUMS` matched every entry and the file ended. Nothing handed to
/// `on_entry` may be published before this returns `Ok`.
pub fn read_export<R: Read>(
    input: R,
    on_manifest: impl FnOnce(&ExportManifest) -> Result<()>,
    mut on_entry: impl FnMut(&Entry, Vec<u8>) -> Result<()>,
) -> Result<ExportManifest> {
    let decoder = zstd::Decoder::new(input).map_err(io_error("read the export file"))?;
    let mut archive = tar::Archive::new(decoder);
    let manifest = read_entries(&mut archive, on_manifest, &mut on_entry)?;
    // The rest of the stream (tar's end blocks, zstd's frame checksum) must check too.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(damaged)?;
    Ok(manifest)
}

fn read_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    on_manifest: impl FnOnce(&ExportManifest) -> Result<()>,
    on_entry: &mut impl FnMut(&Entry, Vec<u8>) -> Result<()>,
) -> Result<ExportManifest> {
    let mut entries = archive.entries().map_err(damaged)?;
    let mut next = || -> Result<Option<(String, Vec<u8>)>> {
        let Some(entry) = entries.next() else {
            return Ok(None);
        };
        let entry = entry.map_err(damaged)?;
        let name = entry
            .path()
            .map_err(damaged)?
            .to_string_lossy()
            .into_owned();
        Ok(Some((name, read_entry(entry)?)))
    };
    let mut sums = Vec::new();
    let mut take =
        |expected_name: &str, bound: u64, sums: &mut Vec<(String, [u8; 32])>| -> Result<Vec<u8>> {
            let (name, bytes) = next()?.ok_or_else(|| {
                invalid_file(format!(
                    "the export file ends before {expected_name}: it is cut short"
                ))
            })?;
            if name != expected_name || bytes.len() as u64 > bound {
                return Err(invalid_file(format!(
                    "the export file holds {name} ({} bytes) where {expected_name} belongs",
                    bytes.len()
                )));
            }
            sums.push((name, <[u8; 32]>::from(Sha256::digest(&bytes))));
            Ok(bytes)
        };
    let json = take(MANIFEST_NAME, MAX_MANIFEST_BYTES, &mut sums)?;
    let manifest: ExportManifest = serde_json::from_slice(&json)
        .map_err(|err| invalid_file(format!("{MANIFEST_NAME} cannot be read: {err}")))?;
    if manifest.format != FORMAT
        || manifest.format_version == 0
        || manifest.format_version > FORMAT_VERSION
    {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "the file is {} version {}; this build reads {FORMAT} up to version {FORMAT_VERSION}",
                manifest.format, manifest.format_version
            ),
        ));
    }
    on_manifest(&manifest)?;
    for entry in &manifest.entries {
        let bytes = take(&entry.name()?, entry.bound(), &mut sums)?;
        if bytes.len() as u64 != entry.size() {
            return Err(invalid_file(format!(
                "{} holds {} bytes; {MANIFEST_NAME} lists {}",
                entry.name()?,
                bytes.len(),
                entry.size()
            )));
        }
        on_entry(entry, bytes)?;
    }
    let text = take(SUMS_NAME, MAX_MANIFEST_BYTES, &mut Vec::new())?;
    check_sums(&sums, &text)?;
    if next()?.is_some() {
        return Err(invalid_file(format!(
            "the export file holds entries after {SUMS_NAME}"
        )));
    }
    Ok(manifest)
}

fn damaged(err: std::io::Error) -> Error {
    Error::with_source(
        ErrorCode::BackupChecksumMismatch,
        "the export file is damaged (its zstd or tar framing does not check)",
        err,
    )
}

fn read_entry(mut entry: tar::Entry<'_, impl Read>) -> Result<Vec<u8>> {
    let size = entry.header().size().map_err(damaged)?;
    if size > codec::max_stored_len(MAX_SEGMENT_BYTES) {
        return Err(invalid_file(format!(
            "an entry of the export file claims {size} bytes, more than any entry can hold"
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut bytes).map_err(damaged)?;
    Ok(bytes)
}

fn check_sums(computed: &[(String, [u8; 32])], text: &[u8]) -> Result<()> {
    let text =
        std::str::from_utf8(text).map_err(|_| invalid_file(format!("{SUMS_NAME} is not text")))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != computed.len() {
        return Err(invalid_file(format!(
            "{SUMS_NAME} lists {} entries; the file holds {}",
            lines.len(),
            computed.len()
        )));
    }
    for (line, (name, sum)) in lines.iter().zip(computed) {
        if *line != format!("{}  {name}", hex::encode(sum)) {
            return Err(invalid_file(format!(
                "{name} does not match its SHA-256 in {SUMS_NAME}: the file is damaged"
            )));
        }
    }
    Ok(())
}

/// The entries of a backup and its chain (`chain`, base first) in `repo`: the encryption
/// marker and key slots, every object their shard manifests name (once), then the shard
/// manifests and backup manifests, parents first. Sizes as stored.
pub async fn backup_entries(repo: &Repository, chain: &[BackupId]) -> Result<Vec<Entry>> {
    let mut entries = repo.seal_entries().await?;
    let mut objects = Vec::new();
    let mut seen = HashSet::new();
    let mut manifests = Vec::new();
    for backup in chain {
        let manifest = repo.backup_manifest(backup).await?;
        for shard in &manifest.shards {
            let shard_manifest = repo.shard_manifest(&shard.shard_id, backup).await?;
            let chunks = shard_manifest
                .files
                .iter()
                .flat_map(|f| f.chunks.iter())
                .chain(shard_manifest.wal.iter().map(|p| &p.chunk));
            for chunk in chunks {
                if seen.insert((chunk.id, chunk.copy)) {
                    objects.push(Entry::Object {
                        id: chunk.id,
                        copy: chunk.copy,
                        size: chunk.stored_len,
                    });
                }
            }
            manifests.push(Entry::ShardManifest {
                shard_id: shard.shard_id.clone(),
                backup_id: backup.clone(),
                size: 0,
            });
        }
        manifests.push(Entry::BackupManifest {
            backup_id: backup.clone(),
            size: 0,
        });
    }
    entries.extend(objects);
    for mut entry in manifests {
        let stored = repo.export_entry(&entry).await?;
        set_size(&mut entry, stored.len() as u64);
        entries.push(entry);
    }
    Ok(entries)
}

/// Sets the size of a record entry, once read.
pub fn set_size(entry: &mut Entry, stored: u64) {
    match entry {
        Entry::EncryptionMarker { size }
        | Entry::KeySlot { size, .. }
        | Entry::Object { size, .. }
        | Entry::WalSegment { size, .. }
        | Entry::ShardManifest { size, .. }
        | Entry::BackupManifest { size, .. }
        | Entry::Tag { size, .. } => *size = stored,
    }
}

/// The chain of `backup` in `repo`: its full base first, the backup last.
pub async fn chain_of(repo: &Repository, backup: &BackupId) -> Result<Vec<BackupId>> {
    let mut chain = vec![backup.clone()];
    let mut manifest = repo.backup_manifest(backup).await?;
    while let Some(parent) = manifest.parent.clone() {
        if chain.contains(&parent) || chain.len() > 10_000 {
            return Err(Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!("backup {backup}'s chain of parents loops at {parent}"),
            ));
        }
        manifest = repo.backup_manifest(&parent).await.map_err(|err| {
            if err.code == ErrorCode::BackupNotFound {
                Error::new(
                    ErrorCode::BackupIncomplete,
                    format!("backup {backup} needs its parent {parent}, which is gone"),
                )
            } else {
                err
            }
        })?;
        chain.push(parent);
    }
    chain.reverse();
    Ok(chain)
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    /// The backups published, parents first.
    pub backups: Vec<BackupId>,
    /// Backups of the file the repository held already (left as they were).
    pub already_present: Vec<BackupId>,
    pub tag: Option<TagName>,
    /// Objects stored (or found stored already) and their stored bytes here.
    pub objects: u64,
    pub stored_bytes: u64,
    pub wal_segments: u64,
}

/// Loads an export file's entries into a repository: objects and WAL segments are checked
/// (decoded with the file's seal, which re-hashes them) and stored as they come, re-encoded
/// with the repository's own; manifests are held, their chunks renamed to what was stored,
/// and published by [`Importer::publish`] only after the whole file checked.
pub struct Importer {
    target: Repository,
    file_seal: Seal,
    /// Each of the file's objects (id, copy) as stored here: its id, copy and stored size.
    stored: HashMap<(ObjectId, u32), (ObjectId, u32, u64)>,
    shards: Vec<ShardManifest>,
    backups: Vec<BackupManifest>,
    tag: Option<TagManifest>,
    report: ImportReport,
}

impl Importer {
    /// An importer of a file sealed as `manifest` says into `target`: a plaintext file goes
    /// into any repository; a sealed one only into a repository with the same master key.
    pub async fn new(target: Repository, manifest: &ExportManifest) -> Result<Importer> {
        let file_seal = if manifest.key_id.is_empty() {
            Seal::Plain
        } else {
            let own = target.encryption_marker().await?;
            match own {
                Some(own) if own.key_id == manifest.key_id && target.seal().is_sealed() => {
                    target.seal().clone()
                }
                _ => {
                    return Err(Error::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "the file is encrypted under master key {} and repository {} is not; \
                             give this repository that key first (`lockstep key import`), or import into the exporting repository",
                            manifest.key_id,
                            target.url()
                        ),
                    ));
                }
            }
        };
        Ok(Importer {
            target,
            file_seal,
            stored: HashMap::new(),
            shards: Vec::new(),
            backups: Vec::new(),
            tag: None,
            report: ImportReport::default(),
        })
    }

    /// Takes one entry: stores an object or segment, holds a manifest.
    pub async fn entry(&mut self, entry: &Entry, bytes: Vec<u8>) -> Result<()> {
        let name = entry.name()?;
        let record = |bytes: Vec<u8>| self.file_seal.open_record(&name, Bytes::from(bytes));
        match entry {
            Entry::EncryptionMarker { .. } | Entry::KeySlot { .. } => {}
            Entry::Object { id, copy, .. } => {
                let (id, seal, target_seal) =
                    (*id, self.file_seal.clone(), self.target.seal().clone());
                let encoded = crate::blocking::run_bulk(move || {
                    let plaintext = codec::decode(&id, Bytes::from(bytes), &seal)?;
                    codec::encode(&plaintext, codec::Compression::default(), &target_seal)
                })
                .await
                .map_err(|err| {
                    Error::with_source(ErrorCode::StorageUnavailable, "import task", err)
                })??;
                let new_id = encoded.id;
                let (new_copy, size) = self.target.put_object(encoded).await?;
                self.report.objects += 1;
                self.report.stored_bytes += size;
                self.stored.insert((id, *copy), (new_id, new_copy, size));
            }
            Entry::WalSegment { .. } => {
                if let Some(info) = entry.segment()? {
                    let segment =
                        crate::repository::decode_wal_segment(&info, bytes, &self.file_seal)
                            .await?;
                    self.target
                        .put_wal_segment(&segment, codec::Compression::default())
                        .await?;
                    self.report.wal_segments += 1;
                }
            }
            Entry::ShardManifest { .. } => {
                let mut manifest = ShardManifest::parse(&name, &record(bytes)?)?;
                let rename = |chunk: &mut Chunk| -> Result<()> {
                    let (id, copy, size) =
                        *self.stored.get(&(chunk.id, chunk.copy)).ok_or_else(|| {
                            invalid_file(format!(
                                "{name} names object {} the file does not hold before it",
                                chunk.id
                            ))
                        })?;
                    (chunk.id, chunk.copy, chunk.stored_len) = (id, copy, size);
                    Ok(())
                };
                for file in &mut manifest.files {
                    file.chunks.iter_mut().try_for_each(rename)?;
                }
                manifest
                    .wal
                    .iter_mut()
                    .try_for_each(|p| rename(&mut p.chunk))?;
                self.shards.push(manifest);
            }
            Entry::BackupManifest { .. } => {
                self.backups
                    .push(BackupManifest::parse(&name, &record(bytes)?)?);
            }
            Entry::Tag { .. } => {
                self.tag = Some(TagManifest::parse(&name, &record(bytes)?)?);
            }
        }
        Ok(())
    }

    /// Publishes what the file held, once it all checked: shard manifests, then backup
    /// manifests parents first (a backup the repository holds already is left alone), then
    /// the tag (one of the same name must hold the same points).
    pub async fn publish(mut self) -> Result<ImportReport> {
        let present: HashSet<BackupId> = self.target.backup_ids().await?.into_iter().collect();
        let mut by_backup: BTreeMap<BackupId, Vec<ShardManifest>> = BTreeMap::new();
        for shard in std::mem::take(&mut self.shards) {
            by_backup
                .entry(shard.backup_id.clone())
                .or_default()
                .push(shard);
        }
        for backup in std::mem::take(&mut self.backups) {
            let id = backup.backup_id.clone();
            if present.contains(&id) {
                self.report.already_present.push(id);
                continue;
            }
            let shards = by_backup.remove(&id).unwrap_or_default();
            if shards.len() != backup.shards.len() {
                return Err(invalid_file(format!(
                    "backup {id} names {} shards; the file holds {} of its shard manifests",
                    backup.shards.len(),
                    shards.len()
                )));
            }
            for shard in &shards {
                self.target.put_shard_manifest(shard).await?;
            }
            self.target.commit_backup(backup).await?;
            self.report.backups.push(id);
        }
        if let Some(tag) = self.tag.take() {
            let exists = self.target.tag(&tag.name).await;
            match exists {
                Ok(existing) if existing.points == tag.points => {}
                _ => self.target.put_tag(&tag).await?,
            }
            self.report.tag = Some(tag.name);
        }
        Ok(self.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(entries: Vec<Entry>) -> ExportManifest {
        ExportManifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            created_at: Utc::now(),
            tool_version: "test".into(),
            source: "memory://".into(),
            key_id: String::new(),
            backup_id: BackupId::new("bk-1").expect("id"),
            tag: None,
            shards: Vec::new(),
            entries,
        }
    }

    fn file(contents: &[(&Entry, &[u8])]) -> Vec<u8> {
        let listed = manifest(contents.iter().map(|(e, _)| (*e).clone()).collect());
        let mut writer = ExportWriter::new(Vec::new(), &listed).expect("writer");
        for (entry, bytes) in contents {
            writer.append(entry, bytes).expect("append");
        }
        writer.finish().expect("finish")
    }

    fn object(bytes: &[u8]) -> Entry {
        Entry::Object {
            id: ObjectId::of(bytes),
            copy: 0,
            size: bytes.len() as u64,
        }
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(Entry, Vec<u8>)>> {
        let mut seen = Vec::new();
        read_export(
            bytes,
            |_| Ok(()),
            |e, b| {
                seen.push((e.clone(), b));
                Ok(())
            },
        )?;
        Ok(seen)
    }

    #[test]
    fn entries_come_back_in_order_with_their_bytes() {
        let (a, b) = (object(b"first"), object(b"second object"));
        let bytes = file(&[(&a, &b"first"[..]), (&b, &b"second object"[..])]);
        let seen = read_all(&bytes).expect("read");
        assert_eq!(
            seen,
            vec![(a, b"first".to_vec()), (b, b"second object".to_vec())]
        );
    }

    #[test]
    fn a_flipped_byte_anywhere_is_refused() {
        let a = object(&[7u8; 10_000]);
        let bytes = file(&[(&a, &[7u8; 10_000][..])]);
        for at in [0, bytes.len() / 3, bytes.len() / 2, bytes.len() - 5] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            let err = read_all(&damaged).expect_err("a damaged file reads");
            assert!(
                matches!(
                    err.code,
                    ErrorCode::BackupChecksumMismatch | ErrorCode::StorageUnavailable
                ),
                "byte {at}: {err:?}"
            );
        }
    }

    #[test]
    fn a_writer_refuses_what_was_not_listed_or_changed_size() {
        let a = object(b"listed");
        let writer = || ExportWriter::new(Vec::new(), &manifest(vec![a.clone()])).expect("writer");
        assert!(writer().append(&object(b"other"), b"other").is_err());
        assert!(writer().append(&a, b"listed, then grown").is_err());
        assert!(writer().append(&a, b"listed").is_ok());
        let writer = writer();
        assert!(writer.finish().is_err(), "a listed entry was never written");
    }

    #[test]
    fn sums_must_match_every_entry() {
        let sums = vec![("a".to_string(), [1u8; 32]), ("b".to_string(), [2u8; 32])];
        let good = format!(
            "{}  a\n{}  b\n",
            hex::encode([1u8; 32]),
            hex::encode([2u8; 32])
        );
        assert!(check_sums(&sums, good.as_bytes()).is_ok());
        let bad = format!(
            "{}  a\n{}  b\n",
            hex::encode([1u8; 32]),
            hex::encode([3u8; 32])
        );
        assert!(check_sums(&sums, bad.as_bytes()).is_err());
        assert!(check_sums(&sums, good.lines().next().unwrap_or("").as_bytes()).is_err());
    }

    #[test]
    fn names_are_repository_keys_and_cannot_escape() {
        let a = object(b"x");
        let hex = ObjectId::of(b"x").to_hex();
        assert_eq!(a.name().ok(), Some(format!("objects/{}/{hex}", &hex[..2])));
        let slot = Entry::KeySlot {
            slot: "../../etc".into(),
            size: 1,
        };
        assert!(slot.name().is_err());
        let json = r#"{"kind":"backup_manifest","backup_id":"../x","size":1}"#;
        assert!(serde_json::from_str::<Entry>(json).is_err());
    }
}
