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
/// The most `EXPORT.json` and `SHA256SUMS` may hold (about 4 million objects listed).
pub const MAX_EXPORT_MANIFEST_BYTES: u64 = 512 << 20;
/// The most a GNU long name may hold.
const MAX_NAME_BYTES: u64 = 4096;
/// What may follow the last entry: tar's end blocks and padding to its record size.
const MAX_TRAILER_BYTES: u64 = 64 << 10;
/// The largest zstd window a reader accepts (the writer's level 1 uses far less).
const MAX_WINDOW_LOG: u32 = 24;

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

impl ExportManifest {
    /// `EXPORT.json` as written; refused beyond what a reader takes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self).map_err(|err| {
            Error::with_source(ErrorCode::InvalidArgument, "encode EXPORT.json", err)
        })?;
        if json.len() as u64 > MAX_EXPORT_MANIFEST_BYTES {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "the export lists {} entries, more than one file can ({MANIFEST_NAME} would be {} bytes, at most {MAX_EXPORT_MANIFEST_BYTES}); export a shorter chain",
                    self.entries.len(),
                    json.len()
                ),
            ));
        }
        Ok(json)
    }
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
    /// Bytes the entry holds.
    pub fn size(&self) -> u64 {
        *self.clone().size_mut()
    }

    /// The size, to set once a record is read.
    pub fn size_mut(&mut self) -> &mut u64 {
        match self {
            Entry::EncryptionMarker { size }
            | Entry::KeySlot { size, .. }
            | Entry::Object { size, .. }
            | Entry::WalSegment { size, .. }
            | Entry::ShardManifest { size, .. }
            | Entry::BackupManifest { size, .. }
            | Entry::Tag { size, .. } => size,
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
        let layout = Layout::new(Path::default());
        let name = match self {
            // As a repository stored segments before their directories (decision 043), so
            // files written before and since read alike.
            Entry::WalSegment { .. } => match self.segment()? {
                Some(info) => layout.wal_flat_segment(&info),
                None => unreachable_segment()?,
            },
            _ => self.key(&layout)?,
        };
        Ok(name.to_string())
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
        writer.put(MANIFEST_NAME, &manifest.encode()?)?;
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
    // One frame, as the writer makes it: the stream ends with it, whatever follows; and no
    // more decoder memory than the writer's level needs.
    let mut decoder = zstd::Decoder::new(input)
        .map_err(io_error("read the export file"))?
        .single_frame();
    decoder
        .window_log_max(MAX_WINDOW_LOG)
        .map_err(io_error("read the export file"))?;
    let mut archive = tar::Archive::new(decoder);
    let manifest = read_entries(&mut archive, on_manifest, &mut on_entry)?;
    // The rest of the frame (tar's end blocks and padding, zstd's checksum) must check too,
    // and be no more than padding.
    let rest = std::io::copy(
        &mut archive.into_inner().take(MAX_TRAILER_BYTES + 1),
        &mut std::io::sink(),
    )
    .map_err(damaged)?;
    if rest > MAX_TRAILER_BYTES {
        return Err(invalid_file(format!(
            "the export file holds more than padding after {SUMS_NAME}"
        )));
    }
    Ok(manifest)
}

/// The reader of an export file's tar stream, raw: nothing is read before its size and
/// name are checked against what may come next (the tar crate's own handling of extension
/// headers would read a PAX `size` or a long name whole, unbounded).
struct Entries<'a, R: Read> {
    entries: tar::Entries<'a, R>,
    sums: Vec<(String, [u8; 32])>,
}

impl<R: Read> Entries<'_, R> {
    /// The next entry, which must be named `name` and hold at most `bound` bytes; hashed.
    fn take(&mut self, name: &str, bound: u64) -> Result<Vec<u8>> {
        let mut long_name = None;
        loop {
            let mut entry = self
                .entries
                .next()
                .ok_or_else(|| {
                    invalid_file(format!(
                        "the export file ends before {name}: it is cut short"
                    ))
                })?
                .map_err(damaged)?;
            let size = entry.header().entry_size().map_err(damaged)?;
            let kind = entry.header().entry_type();
            if kind.is_gnu_longname() && long_name.is_none() {
                if size > MAX_NAME_BYTES {
                    return Err(invalid_file(format!(
                        "the export file names an entry in {size} bytes where {name} belongs"
                    )));
                }
                let mut bytes = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut bytes).map_err(damaged)?;
                while bytes.last() == Some(&0) {
                    bytes.pop();
                }
                long_name = Some(String::from_utf8_lossy(&bytes).into_owned());
                continue;
            }
            if kind != tar::EntryType::Regular {
                return Err(invalid_file(format!(
                    "the export file holds a {kind:?} entry where {name} belongs; it holds regular files only"
                )));
            }
            let found = long_name
                .take()
                .unwrap_or_else(|| String::from_utf8_lossy(&entry.path_bytes()).into_owned());
            if found != name || size > bound {
                return Err(invalid_file(format!(
                    "the export file holds {found} ({size} bytes) where {name} belongs"
                )));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes).map_err(damaged)?;
            if bytes.len() as u64 != size {
                return Err(invalid_file(format!("{name} is cut short")));
            }
            self.sums
                .push((found, <[u8; 32]>::from(Sha256::digest(&bytes))));
            return Ok(bytes);
        }
    }
}

fn read_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    on_manifest: impl FnOnce(&ExportManifest) -> Result<()>,
    on_entry: &mut impl FnMut(&Entry, Vec<u8>) -> Result<()>,
) -> Result<ExportManifest> {
    let mut entries = Entries {
        entries: archive.entries().map_err(damaged)?.raw(true),
        sums: Vec::new(),
    };
    let json = entries.take(MANIFEST_NAME, MAX_EXPORT_MANIFEST_BYTES)?;
    let manifest: ExportManifest = serde_json::from_slice(&json)
        .map_err(|err| invalid_file(format!("{MANIFEST_NAME} cannot be read: {err}")))?;
    drop(json);
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
    if let Some(entry) = manifest.entries.iter().find(|e| e.size() > e.bound()) {
        return Err(invalid_file(format!(
            "{MANIFEST_NAME} lists {} of {} bytes, more than an entry of its kind holds",
            entry.name()?,
            entry.size()
        )));
    }
    on_manifest(&manifest)?;
    for entry in &manifest.entries {
        let bytes = entries.take(&entry.name()?, entry.size())?;
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
    let computed = std::mem::take(&mut entries.sums);
    // Exactly one line per entry before it: "<64 hex>  <name>\n".
    let sums_len: u64 = computed
        .iter()
        .map(|(name, _)| 67 + name.len() as u64)
        .sum();
    let text = entries.take(SUMS_NAME, sums_len)?;
    check_sums(&computed, &text)?;
    if let Some(entry) = entries.entries.next() {
        let name = entry
            .map(|e| String::from_utf8_lossy(&e.path_bytes()).into_owned())
            .unwrap_or_default();
        return Err(invalid_file(format!(
            "the export file holds {name:?} after {SUMS_NAME}"
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
    for entry in manifests {
        entries.push(sized(repo, entry).await?);
    }
    Ok(entries)
}

/// A record's entry with its size as stored in `repo`.
pub async fn sized(repo: &Repository, mut entry: Entry) -> Result<Entry> {
    *entry.size_mut() = repo.export_entry(&entry).await?.len() as u64;
    Ok(entry)
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
/// with the repository's own; manifests are held as read, and [`Importer::publish`] parses
/// and checks them all, renames their chunks to what was stored, and only then writes them.
pub struct Importer {
    target: Repository,
    file_seal: Seal,
    /// Each of the file's objects (id, copy) as stored here: its id, copy and stored size.
    stored: HashMap<(ObjectId, u32), (ObjectId, u32, u64)>,
    /// The file's manifests (shard, backup, tag), as stored in it, in its order.
    records: Vec<(Entry, Vec<u8>)>,
    report: ImportReport,
}

impl Importer {
    /// An importer of a file sealed as `manifest` says into `target`: a plaintext file goes
    /// into any repository; a sealed one only into a repository with the same master key.
    /// A repository holding backups the file does not is refused unless `force`: the file's
    /// backups become its newest (`latest`, the next incremental's parent, retention's
    /// "newest N" would all see them first).
    pub async fn new(
        target: Repository,
        manifest: &ExportManifest,
        force: bool,
    ) -> Result<Importer> {
        let file_seal = if manifest.key_id.is_empty() {
            Seal::Plain
        } else {
            match target.encryption_marker().await? {
                Some(own) if own.key_id == manifest.key_id && target.seal().is_sealed() => {
                    target.seal().clone()
                }
                _ => {
                    return Err(Error::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "the file is encrypted under master key {} and repository {} is not; \
                             give this repository that key first (`lockstep key import`)",
                            manifest.key_id,
                            target.url()
                        ),
                    ));
                }
            }
        };
        if !force {
            let in_file: HashSet<&BackupId> = manifest
                .entries
                .iter()
                .filter_map(|e| match e {
                    Entry::BackupManifest { backup_id, .. } => Some(backup_id),
                    _ => None,
                })
                .collect();
            let present: Vec<BackupId> = target.backup_ids().await?;
            let adds = in_file.iter().any(|id| !present.contains(id));
            let others: Vec<&BackupId> =
                present.iter().filter(|id| !in_file.contains(id)).collect();
            if let Some(newest) = others.last().filter(|_| adds) {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "repository {} holds {} backups the file does not (the newest: {newest}); \
                         the imported ones would become its newest, seen first by `latest`, the next incremental and retention's keep counts. \
                         Import into a new repository, or pass --force to add them anyway",
                        target.url(),
                        others.len()
                    ),
                ));
            }
        }
        Ok(Importer {
            target,
            file_seal,
            stored: HashMap::new(),
            records: Vec::new(),
            report: ImportReport::default(),
        })
    }

    /// Takes one entry: stores an object or a WAL segment (each checked on its own), holds a
    /// manifest as read.
    pub async fn entry(&mut self, entry: &Entry, bytes: Vec<u8>) -> Result<()> {
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
            Entry::ShardManifest { .. } | Entry::BackupManifest { .. } | Entry::Tag { .. } => {
                self.records.push((entry.clone(), bytes));
            }
        }
        Ok(())
    }

    /// Publishes what the file held, once the whole file checked: every manifest is parsed
    /// and checked against its entry and the others first (shards, sequence numbers,
    /// lineages, parents, an existing tag), so a file refused publishes nothing; then shard
    /// manifests, backup manifests parents first (a backup the repository holds already is
    /// left alone), and the tag.
    pub async fn publish(mut self) -> Result<ImportReport> {
        let (shards, backups, tag) = self.parse_records()?;
        let present: HashSet<BackupId> = self.target.backup_ids().await?.into_iter().collect();
        let mut by_backup: BTreeMap<BackupId, Vec<ShardManifest>> = BTreeMap::new();
        for shard in shards {
            by_backup
                .entry(shard.backup_id.clone())
                .or_default()
                .push(shard);
        }
        let mut published: HashSet<BackupId> = HashSet::new();
        let mut plan = Vec::new();
        for backup in backups {
            let id = backup.backup_id.clone();
            let shards = by_backup.remove(&id).unwrap_or_default();
            check_backup(&backup, &shards)?;
            if let Some(parent) = &backup.parent
                && !present.contains(parent)
                && !published.contains(parent)
            {
                return Err(Error::new(
                    ErrorCode::BackupIncomplete,
                    format!(
                        "backup {id} needs its parent {parent}, which neither the file nor repository {} holds",
                        self.target.url()
                    ),
                ));
            }
            published.insert(id.clone());
            plan.push((backup, shards));
        }
        if let Some((id, _)) = by_backup.into_iter().next() {
            return Err(invalid_file(format!(
                "the file holds shard manifests of backup {id} but not its backup manifest"
            )));
        }
        if let Some(tag) = &tag {
            match self.target.tag(&tag.name).await {
                Ok(existing) if existing.points != tag.points => {
                    return Err(Error::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "repository {} has a tag {} at other points; remove it or import into another repository",
                            self.target.url(),
                            tag.name
                        ),
                    ));
                }
                Ok(_) => {}
                Err(err) if err.code == ErrorCode::BackupNotFound => {}
                Err(err) => return Err(err),
            }
        }
        for (backup, shards) in plan {
            let id = backup.backup_id.clone();
            if present.contains(&id) {
                self.report.already_present.push(id);
                continue;
            }
            for shard in &shards {
                self.target.put_shard_manifest(shard).await?;
            }
            self.target.commit_backup(backup).await?;
            self.report.backups.push(id);
        }
        if let Some(tag) = tag {
            if let Err(err) = self.target.put_tag(&tag).await {
                // Taken meanwhile under that name: the same points are this import's tag.
                match self.target.tag(&tag.name).await {
                    Ok(existing) if existing.points == tag.points => {}
                    _ => return Err(err),
                }
            }
            self.report.tag = Some(tag.name);
        }
        Ok(self.report)
    }

    /// The held manifests, opened with the file's seal, parsed strictly, checked against the
    /// entries that carried them, their chunks renamed to the copies stored here.
    #[allow(clippy::type_complexity)]
    fn parse_records(
        &mut self,
    ) -> Result<(Vec<ShardManifest>, Vec<BackupManifest>, Option<TagManifest>)> {
        let (mut shards, mut backups, mut tag) = (Vec::new(), Vec::new(), None);
        for (entry, bytes) in std::mem::take(&mut self.records) {
            let name = entry.name()?;
            let plaintext = self.file_seal.open_record(&name, Bytes::from(bytes))?;
            match entry {
                Entry::ShardManifest {
                    shard_id,
                    backup_id,
                    ..
                } => {
                    let mut manifest = ShardManifest::parse(&name, &plaintext)?;
                    if manifest.shard_id != shard_id || manifest.backup_id != backup_id {
                        return Err(invalid_file(format!(
                            "{name} holds the manifest of shard {} of backup {}",
                            manifest.shard_id, manifest.backup_id
                        )));
                    }
                    self.rename_chunks(&name, &mut manifest)?;
                    // Renamed ids can be longer (a keyed hash's copy numbers, sizes): a
                    // manifest that no longer fits is refused before anything is written.
                    if manifest.to_json().len() as u64 > MAX_MANIFEST_BYTES {
                        return Err(Error::new(
                            ErrorCode::InvalidArgument,
                            format!(
                                "{name} grows past {MAX_MANIFEST_BYTES} bytes in this repository"
                            ),
                        ));
                    }
                    shards.push(manifest);
                }
                Entry::BackupManifest { backup_id, .. } => {
                    let manifest = BackupManifest::parse(&name, &plaintext)?;
                    if manifest.backup_id != backup_id {
                        return Err(invalid_file(format!(
                            "{name} holds the manifest of backup {}",
                            manifest.backup_id
                        )));
                    }
                    backups.push(manifest);
                }
                Entry::Tag { name: tag_name, .. } => {
                    let manifest = TagManifest::parse(&name, &plaintext)?;
                    if manifest.name != tag_name {
                        return Err(invalid_file(format!("{name} holds tag {}", manifest.name)));
                    }
                    tag = Some(manifest);
                }
                _ => {}
            }
        }
        Ok((shards, backups, tag))
    }

    fn rename_chunks(&self, name: &str, manifest: &mut ShardManifest) -> Result<()> {
        let rename = |chunk: &mut Chunk| -> Result<()> {
            let (id, copy, size) = *self.stored.get(&(chunk.id, chunk.copy)).ok_or_else(|| {
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
            .try_for_each(|piece| rename(&mut piece.chunk))
    }
}

/// A backup manifest and its shard manifests agree: the same shards, each at the sequence
/// number and on the lineage the backup records.
fn check_backup(backup: &BackupManifest, shards: &[ShardManifest]) -> Result<()> {
    let id = &backup.backup_id;
    if shards.len() != backup.shards.len() {
        return Err(invalid_file(format!(
            "backup {id} names {} shards; the file holds {} of its shard manifests",
            backup.shards.len(),
            shards.len()
        )));
    }
    for shard in &backup.shards {
        let found = shards.iter().find(|s| s.shard_id == shard.shard_id);
        match found {
            Some(manifest)
                if manifest.seq == shard.seq
                    && manifest.lineage == shard.lineage
                    && shard.hlc.is_none_or(|hlc| hlc == manifest.hlc) => {}
            _ => {
                return Err(invalid_file(format!(
                    "backup {id}'s shard {} does not match its shard manifest in the file",
                    shard.shard_id
                )));
            }
        }
    }
    Ok(())
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
            assert_eq!(
                err.code,
                ErrorCode::BackupChecksumMismatch,
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

    /// A tar stream of `entries` (name, type, size claimed, bytes), zstd-compressed, as a
    /// hostile file would be built.
    fn hostile(entries: &[(&str, tar::EntryType, u64, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, kind, size, bytes) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(*size);
            header.set_mode(0o644);
            let path = &mut header.as_gnu_mut().expect("gnu").name;
            path[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            tar.append(&header, *bytes).expect("append");
        }
        zstd::encode_all(&tar.into_inner().expect("tar")[..], 1).expect("zstd")
    }

    #[test]
    fn hostile_framing_is_refused_before_it_is_read() {
        // A long name claiming a gigabyte, a PAX header, a directory, a huge first entry:
        // each refused by its header, before its bytes are read.
        let zeros = vec![0u8; 8192];
        for (entries, what) in [
            (
                vec![(
                    "././@LongLink",
                    tar::EntryType::GNULongName,
                    1 << 30,
                    &zeros[..],
                )],
                "long name",
            ),
            (
                vec![(
                    "pax",
                    tar::EntryType::XHeader,
                    20,
                    &b"30 size=107374182400\n"[..],
                )],
                "PAX header",
            ),
            (
                vec![("objects", tar::EntryType::Directory, 0, &[][..])],
                "directory",
            ),
            (
                vec![(MANIFEST_NAME, tar::EntryType::Regular, 1 << 40, &zeros[..])],
                "huge manifest",
            ),
            (
                vec![("other.json", tar::EntryType::Regular, 2, &b"{}"[..])],
                "another name first",
            ),
        ] {
            let file = hostile(&entries);
            let err = read_all(&file).expect_err(what);
            assert_eq!(
                err.code,
                ErrorCode::BackupChecksumMismatch,
                "{what}: {err:?}"
            );
        }
    }

    #[test]
    fn long_entry_names_round_trip() {
        let segment = Entry::WalSegment {
            shard_id: ShardId::new("shard-0").expect("shard"),
            lineage: Lineage::root(),
            file_name: format!(
                "{:020}-{:020}-{:016x}-{:016x}-{}.seg",
                1,
                2,
                3,
                4,
                ObjectId::of(b"segment").to_hex()
            ),
            size: 7,
        };
        assert!(
            segment.name().expect("name").len() > 100,
            "needs a GNU long name"
        );
        let Entry::WalSegment {
            file_name, lineage, ..
        } = &segment
        else {
            unreachable!()
        };
        assert_eq!(
            segment.name().expect("name"),
            format!("wal/shard-0/{}/{file_name}", lineage.dir_name()),
            "named as before segment directories, so older files still read"
        );
        let bytes = file(&[(&segment, &b"segment"[..])]);
        assert_eq!(
            read_all(&bytes).expect("read"),
            vec![(segment, b"segment".to_vec())]
        );
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
