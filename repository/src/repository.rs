//! A handle on one repository: opening it from a URL, and reading and writing its objects
//! and manifests through `object_store`.
//!
//! Architecture invariant: this is the only module that calls `object_store`; every key comes
//! from `layout.rs`, and every object read goes through `codec::decode`, which verifies it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use url::Url;

use crate::archive::{PageStart, SegmentPage};
use crate::codec::{self, Encoded, Frame};
use crate::direct;
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{BackupId, ObjectId, RestoreId, Seq, ShardId, TagName};
use crate::layout::{Layout, WAL_DIRS, WalPlace};
use crate::lineage::Lineage;
use crate::manifest::{BackupKind, BackupManifest, Chunk, ShardManifest, TagManifest, WalPiece};
use crate::seal::{EncryptionMarker, KeySlot, Passphrase, Seal};
use crate::wal::{Segment, SegmentInfo};

/// `schedules/<name>.json`: when a schedule last fired.
#[derive(serde::Serialize, serde::Deserialize)]
struct ScheduleRecord {
    last_fired: chrono::DateTime<chrono::Utc>,
}

/// Who a repository belongs to: written once, when a coordinator first opens it
/// ([`Repository::claim`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepositoryIdentity {
    pub format: u32,
    pub repository_id: String,
    /// The cluster's name (`cluster` in the coordinator's configuration).
    pub cluster: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The largest manifest, tag, record or marker a reader accepts. A shard manifest spends
/// about 150 bytes per chunk, so this holds a shard of about 10 TiB in 8 MiB chunks.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

fn decode_task_failed(err: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::with_source(
        ErrorCode::BackupDecompressionFailed,
        "decode task failed",
        err,
    )
}

/// What a read of one kind of object may hold, and the error when it holds more.
type Bound = (u64, ErrorCode);

/// How many copies of one object a writer tries before giving up (`writable_copy`).
const MAX_COPIES: u32 = 16;

/// The bound of a manifest, tag, record or marker.
const MANIFEST: Bound = (MAX_MANIFEST_BYTES, ErrorCode::BackupManifestCorrupt);

/// The largest WAL segment plaintext a reader accepts. A segment holds whole write batches,
/// so one batch larger than `--wal-segment-mib` makes a larger segment; no batch comes near
/// this.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// What the swapped-in shards of a cluster restore do: keep the restored data, or return
/// to the data they had ([`Repository::decide_restore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreDecision {
    Commit,
    Revert,
}

/// Encodes a segment for storage (zstd when it pays, named by its plaintext's SHA-256, or
/// sealed and named by its keyed hash); returns its description and the encoded object.
pub async fn encode_wal_segment(
    segment: &Segment,
    compression: codec::Compression,
    seal: &Seal,
) -> Result<(SegmentInfo, Encoded)> {
    let plaintext = segment.encode();
    let seal = seal.clone();
    let encoded = crate::blocking::run(move || codec::encode(&plaintext, compression, &seal))
        .await
        .map_err(|err| {
            Error::with_source(ErrorCode::BackupWalArchiveFailed, "encode task failed", err)
        })??;
    let info = segment.info(encoded.id).ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidArgument,
            "a WAL segment needs at least one batch",
        )
    })?;
    Ok((info, encoded))
}

/// Decodes a stored segment: opens its seal, checks its hash against the one in `info` and
/// that it holds the shard, lineage and range `info` names.
pub async fn decode_wal_segment(
    info: &SegmentInfo,
    stored: Vec<u8>,
    seal: &Seal,
) -> Result<Segment> {
    let name = format!("WAL segment {}", info.file_name());
    let id = info.id;
    let seal = seal.clone();
    let plaintext = crate::blocking::run(move || {
        codec::decode_at_most(&id, stored.into(), MAX_SEGMENT_BYTES, &seal)
    })
    .await
    .map_err(decode_task_failed)??;
    let segment = Segment::decode(&name, &plaintext)?;
    if segment.info(info.id).as_ref() != Some(info) {
        return Err(Error::new(
            ErrorCode::BackupWalArchiveFailed,
            format!(
                "{name} of shard {} {} does not hold what its name says",
                info.shard_id, info.lineage
            ),
        ));
    }
    Ok(segment)
}

/// A repository on any object store.
#[derive(Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    url: String,
    /// For file:// repositories: the directory, so writes can be made durable (object
    /// stores are durable when a put returns; a local filesystem is not until fsync).
    local_root: Option<std::path::PathBuf>,
    /// Whether the store lists keys in name order (`Repository::open` knows it by scheme; a
    /// store handed to `from_store` is assumed not to), so a listing may stop early.
    lists_in_order: bool,
    /// Chunk and object buffers, reused from one to the next (`buffers`).
    buffers: crate::buffers::BufferPool,
    /// Local data objects this handle (and its clones) wrote or relied on that are not yet
    /// known to be durable: `sync_objects` finishes their fsyncs, and every manifest publish
    /// calls it first, so no manifest ever names an object a crash could lose.
    unsynced: Arc<Mutex<Unsynced>>,
    /// Objects a running GC sweep may delete (`gc.rs`): through this handle a writer never
    /// relies on one of them being there, it writes the object's next copy instead.
    condemned: Option<Arc<crate::gc::Condemned>>,
    /// The catalog index as this handle (and its clones) last read it (`catalog.rs`).
    catalog: crate::catalog::SharedCatalog,
    /// The agent's rate limits: data objects put through this handle take their stored size
    /// from the backup's upload share, and those fetched from the download limit.
    bandwidth: Option<Arc<crate::bandwidth::Bandwidth>>,
    /// How objects are named and stored: in plaintext, or sealed with the repository's keys.
    seal: Seal,
}

/// The verify record's largest size: 44 bytes an object, for 20 million objects.
const MAX_VERIFIED_RECORD_BYTES: u64 = 1 << 30;

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("url", &self.url)
            .finish()
    }
}

/// Object files and directories fsynced at once.
const SYNC_PARALLELISM: usize = 4;

/// Fsyncs a local file or directory, off the async workers.
async fn fsync(path: std::path::PathBuf) -> Result<()> {
    let shown = path.display().to_string();
    crate::blocking::run(move || std::fs::File::open(&path)?.sync_all())
        .await
        .map_err(|err| Error::with_source(ErrorCode::StorageUnavailable, "fsync task", err))?
        .map_err(|err| Error::io(ErrorCode::StorageUnavailable, format!("fsync {shown}"), err))
}

/// Objects not yet known to be durable.
#[derive(Debug, Default)]
struct Unsynced {
    /// Written by this handle (each synced before it was linked; its directory is not yet).
    written: Vec<Path>,
    /// Found already stored (another writer may not have synced them yet): fsynced at the
    /// next publish.
    found: Vec<Path>,
}

/// How many manifests (or catalog entries) are read at once: each is a round trip on an
/// object store.
pub(crate) const CATALOG_READS: usize = 16;

fn storage_error(what: impl Into<String>, err: object_store::Error) -> Error {
    Error::with_source(ErrorCode::StorageUnavailable, what, err)
}

/// In-process `memory://NAME` stores, so two opens of the same URL see the same data.
fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    let mut stores = stores
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    stores
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

/// Parses what an operator typed as a repository location: a URL, or a plain local path.
fn parse_location(location: &str) -> Result<Url> {
    let invalid = |why: String| {
        Error::new(
            ErrorCode::InvalidArgument,
            format!("repository {location:?}: {why}"),
        )
    };
    if location.contains("://") {
        return Url::parse(location).map_err(|err| invalid(err.to_string()));
    }
    let path = std::path::absolute(location).map_err(|err| invalid(err.to_string()))?;
    Url::from_directory_path(&path).map_err(|()| invalid("not an absolute path".into()))
}

impl Repository {
    /// Opens the repository at `location`: `file:///dir` or a plain path (the default),
    /// `memory://name`, `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`.
    /// Cloud credentials and endpoints come from the standard environment variables
    /// (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_ALLOW_HTTP`, ...).
    pub async fn open(location: &str) -> Result<Repository> {
        Repository::open_with(location, &[]).await
    }

    /// `open` with explicit store options that override the environment, named like the
    /// environment variables (`("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")`).
    ///
    /// An encrypted repository is unlocked with the passphrase in the file named by the
    /// option or environment variable `LOCKSTEP_PASSPHRASE_FILE` (or in `LOCKSTEP_PASSPHRASE`);
    /// a new (empty) repository opened with a passphrase is created encrypted
    /// (`seal.rs`).
    pub async fn open_with(location: &str, options: &[(String, String)]) -> Result<Repository> {
        let (passphrase_file, options): (Vec<_>, Vec<_>) = options
            .iter()
            .cloned()
            .partition(|(key, _)| key == crate::seal::PASSPHRASE_FILE_ENV);
        let passphrase = match passphrase_file.last() {
            Some((_, path)) => Some(Passphrase::from_file(std::path::Path::new(path))?),
            None => Passphrase::from_env()?,
        };
        Repository::open_store(location, &options)
            .await?
            .unlock(passphrase)
            .await
    }

    /// A WAL archive on an object store (or a repository's own `wal/`), whose segments are
    /// sealed with `seal`, the keys of the repository it archives for: an archive holds no
    /// keys of its own.
    pub async fn open_archive(location: &str, seal: &Seal) -> Result<Repository> {
        let mut archive = Repository::open_store(location, &[]).await?;
        archive.seal = seal.clone();
        Ok(archive)
    }

    async fn open_store(location: &str, options: &[(String, String)]) -> Result<Repository> {
        let url = parse_location(location)?;
        let unknown_option = |key: &str| {
            Error::new(
                ErrorCode::InvalidArgument,
                format!("unknown repository option {key:?}"),
            )
        };
        let invalid = |why: String| {
            Error::new(
                ErrorCode::InvalidArgument,
                format!("repository {location:?}: {why}"),
            )
        };
        let mut local_root = None;
        // Object stores list keys in name order; a local directory (walked) and S3 Express
        // directory buckets (named `...--x-s3`) do not.
        let lists_in_order = match url.scheme() {
            "memory" | "gs" | "az" | "azure" | "abfs" | "abfss" => true,
            "s3" | "s3a" => {
                !url.host_str()
                    .is_some_and(|bucket| bucket.ends_with("--x-s3"))
                    && !options
                        .iter()
                        .any(|(key, _)| key.to_ascii_lowercase().contains("express"))
                    && std::env::var_os("AWS_S3_EXPRESS").is_none()
            }
            _ => false,
        };
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| invalid("file URL must be an absolute local path".into()))?;
                tokio::fs::create_dir_all(&dir).await.map_err(|err| {
                    Error::io(
                        ErrorCode::StorageUnavailable,
                        format!("create repository directory {}", dir.display()),
                        err,
                    )
                })?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|err| storage_error(format!("open {}", dir.display()), err))?
                    .with_automatic_cleanup(true);
                local_root = Some(dir);
                (Arc::new(fs), Path::default())
            }
            "memory" => {
                let name = url.host_str().unwrap_or_default();
                (memory_store(name), Path::from(url.path()))
            }
            "s3" | "s3a" => {
                let mut builder =
                    object_store::aws::AmazonS3Builder::from_env().with_url(url.as_str());
                for (key, value) in options {
                    let key_name = key.to_ascii_lowercase();
                    let parsed = key_name.parse().map_err(|_| unknown_option(key))?;
                    builder = builder.with_config(parsed, value);
                }
                let store = builder
                    .build()
                    .map_err(|err| storage_error(format!("configure {url}"), err))?;
                (Arc::new(store), Path::from(url.path()))
            }
            "gs" => {
                let mut builder =
                    object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url.as_str());
                for (key, value) in options {
                    let parsed = key
                        .to_ascii_lowercase()
                        .parse()
                        .map_err(|_| unknown_option(key))?;
                    builder = builder.with_config(parsed, value);
                }
                let store = builder
                    .build()
                    .map_err(|err| storage_error(format!("configure {url}"), err))?;
                (Arc::new(store), Path::from(url.path()))
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let mut builder =
                    object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url.as_str());
                for (key, value) in options {
                    let parsed = key
                        .to_ascii_lowercase()
                        .parse()
                        .map_err(|_| unknown_option(key))?;
                    builder = builder.with_config(parsed, value);
                }
                let store = builder
                    .build()
                    .map_err(|err| storage_error(format!("configure {url}"), err))?;
                (Arc::new(store), Path::from(url.path()))
            }
            other => {
                return Err(invalid(format!(
                    "unsupported scheme {other:?}; use file://, s3://, gs://, az:// or memory://"
                )));
            }
        };
        let mut repo = Repository::from_store(store, prefix, url.to_string());
        repo.local_root = local_root;
        repo.lists_in_order = lists_in_order;
        Ok(repo)
    }

    /// On a file:// repository, fsyncs the file at `key` and its directory, so what a put
    /// wrote survives a power loss before anything that refers to it is published.
    async fn make_durable(&self, key: &Path) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let file = root.join(key.as_ref());
        if let Some(dir) = file.parent().map(|d| d.to_path_buf()) {
            fsync(file).await?;
            fsync(dir).await
        } else {
            fsync(file).await
        }
    }

    /// On a file:// repository, creates the directories `key` goes in that are missing (a WAL
    /// segment's: `layout::WAL_DIRS`) and makes each durable in its parent, so a put's
    /// `make_durable` leaves a path that survives a power loss. One `stat` when they exist.
    async fn create_dirs_durably(&self, key: &Path) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let Some(dir) = root.join(key.as_ref()).parent().map(|d| d.to_path_buf()) else {
            return Ok(());
        };
        let created = crate::blocking::run(move || {
            let missing: Vec<std::path::PathBuf> = dir
                .ancestors()
                .take_while(|d| d.starts_with(&root) && !d.exists())
                .map(|d| d.to_path_buf())
                .collect();
            if !missing.is_empty() {
                std::fs::create_dir_all(&dir)?;
            }
            std::io::Result::Ok(missing)
        })
        .await
        .map_err(|err| Error::with_source(ErrorCode::StorageUnavailable, "mkdir task", err))?
        .map_err(|err| {
            Error::io(
                ErrorCode::StorageUnavailable,
                format!("create the directories of {key}"),
                err,
            )
        })?;
        for dir in created {
            if let Some(parent) = dir.parent() {
                fsync(parent.to_path_buf()).await?;
            }
        }
        Ok(())
    }

    /// Wraps an already-built store, e.g. a fault-injecting one in tests.
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: Path, url: String) -> Repository {
        Repository {
            store,
            layout: Layout::new(prefix),
            url,
            local_root: None,
            lists_in_order: false,
            buffers: Default::default(),
            unsynced: Default::default(),
            condemned: None,
            catalog: Default::default(),
            bandwidth: None,
            seal: Seal::Plain,
        }
    }

    /// How this handle names and stores objects: plaintext, or sealed.
    pub fn seal(&self) -> &Seal {
        &self.seal
    }

    /// This repository with its seal opened: plaintext when it is not encrypted and no
    /// passphrase is given; unlocked by `passphrase` when it is; created encrypted when it
    /// is new and a passphrase is given. Any other combination is refused, so nothing is
    /// ever written in plaintext to an encrypted repository, or the other way round.
    async fn unlock(mut self, passphrase: Option<Passphrase>) -> Result<Repository> {
        let mut marker = self.encryption_marker().await?;
        if marker.is_none() && passphrase.is_none() {
            // A plaintext repository claims its mode as an encrypted one does (once; one with
            // data from before the marker is plaintext too), so an encrypting opener racing
            // a new one cannot make it encrypted under its feet. A store that takes no write
            // (read-only credentials) leaves it unclaimed, and plaintext.
            match self
                .put_marker(&crate::seal::EncryptionMarker::plaintext())
                .await
            {
                Ok(true) => {}
                Ok(false) => marker = self.encryption_marker().await?,
                Err(err) => {
                    tracing::warn!(repository = %self.url, error = %err.chain(), "could not record that the repository is not encrypted");
                }
            }
        }
        let not_encrypted = |url: &str| {
            Error::new(
                ErrorCode::EncryptionKey,
                format!(
                    "repository {url} is not encrypted, and a passphrase was given: open it without LOCKSTEP_PASSPHRASE_FILE and LOCKSTEP_PASSPHRASE, or create an encrypted repository at a new location"
                ),
            )
        };
        self.seal = match (marker, passphrase) {
            (Some(marker), None) if !marker.is_encrypted() => Seal::Plain,
            (Some(marker), Some(_)) if !marker.is_encrypted() => {
                return Err(not_encrypted(&self.url));
            }
            (None, None) => Seal::Plain,
            (Some(_), None) => {
                return Err(Error::new(
                    ErrorCode::EncryptionKey,
                    format!(
                        "repository {} is encrypted, and no passphrase was given",
                        self.url
                    ),
                ));
            }
            (Some(marker), Some(passphrase)) => {
                Seal::sealed(self.unlock_with(&marker, &passphrase).await?)
            }
            (None, Some(passphrase)) => self.create_encrypted(&passphrase).await?,
        };
        Ok(self)
    }

    /// The encryption marker, if the repository is encrypted.
    pub async fn encryption_marker(&self) -> Result<Option<EncryptionMarker>> {
        let key = self.layout.encryption_marker();
        let Some(bytes) = self.get_raw(&key, MANIFEST).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|err| {
            Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!("the encryption marker {key} is unreadable: {err}"),
            )
        })
    }

    /// Every key slot of an encrypted repository, oldest first.
    /// What an export file carries so that, unpacked, it opens as this repository does: the
    /// encryption marker and the key slots, as stored (`export.rs`).
    pub async fn seal_entries(&self) -> Result<Vec<crate::export::Entry>> {
        use crate::export::Entry;
        let mut entries = Vec::new();
        if let Some(marker) = self
            .get_raw(&self.layout.encryption_marker(), MANIFEST)
            .await?
        {
            entries.push(Entry::EncryptionMarker {
                size: marker.len() as u64,
            });
        }
        let slots = self
            .keys_under(&self.layout.keys_dir(), "key slots", |key| {
                self.layout.slot_of(key)
            })
            .await?;
        for slot in slots {
            if let Some(bytes) = self.get_raw(&self.layout.key_slot(&slot), MANIFEST).await? {
                entries.push(Entry::KeySlot {
                    slot,
                    size: bytes.len() as u64,
                });
            }
        }
        Ok(entries)
    }

    /// An export entry's bytes as stored here, unchecked (`export.rs`).
    pub async fn export_entry(&self, entry: &crate::export::Entry) -> Result<Bytes> {
        let key = entry.key(&self.layout)?;
        self.get_raw(&key, (entry.bound(), ErrorCode::BackupChecksumMismatch))
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::BackupIncomplete,
                    format!("{key} is missing; the backup cannot be exported"),
                )
            })
    }

    pub async fn key_slots(&self) -> Result<Vec<KeySlot>> {
        let keys = self
            .keys_under(&self.layout.keys_dir(), "key slots", |key| {
                self.layout.slot_of(key).map(|slot| (slot, key.clone()))
            })
            .await?;
        let mut slots = Vec::with_capacity(keys.len());
        for (name, key) in keys {
            let Some(bytes) = self.get_raw(&key, MANIFEST).await? else {
                continue; // removed since the listing
            };
            // An unreadable slot is left out (and said): the others still open the repository.
            match serde_json::from_slice::<KeySlot>(&bytes) {
                Ok(slot) if slot.slot == name => slots.push(slot),
                Ok(slot) => {
                    tracing::warn!(key = %key, named = %slot.slot, "skipping a key slot that names another slot");
                }
                Err(err) => {
                    tracing::warn!(key = %key, error = %err, "skipping an unreadable key slot");
                }
            }
        }
        slots.sort_by(|a, b| (a.created_at, &a.slot).cmp(&(b.created_at, &b.slot)));
        Ok(slots)
    }

    /// The keys `passphrase` unlocks through one of the key slots.
    async fn unlock_with(
        &self,
        marker: &EncryptionMarker,
        passphrase: &Passphrase,
    ) -> Result<crate::seal::Keys> {
        crate::seal::check_marker(marker)?;
        let slots = self.key_slots().await?;
        let tried = slots.len();
        for slot in slots {
            let (marker, passphrase) = (marker.clone(), passphrase.clone());
            let name = slot.slot.clone();
            let unlocked =
                crate::blocking::run(move || crate::seal::unlock(&marker, &slot, &passphrase))
                    .await
                    .map_err(|err| {
                        Error::with_source(ErrorCode::StorageUnavailable, "unlock task", err)
                    })?;
            match unlocked {
                Ok(Some(keys)) => return Ok(keys),
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(slot = %name, error = %err.chain(), "skipping a key slot that cannot be used");
                }
            }
        }
        Err(Error::new(
            ErrorCode::EncryptionKey,
            format!(
                "the passphrase given opens none of the {tried} key slots of repository {}: it is the wrong passphrase",
                self.url
            ),
        ))
    }

    /// Creates the encryption of a new repository: its first key slot, then its marker
    /// (create-only; when another opener created it first, this one unlocks theirs).
    async fn create_encrypted(&self, passphrase: &Passphrase) -> Result<Seal> {
        if !self.holds_nothing().await? {
            return Err(Error::new(
                ErrorCode::EncryptionKey,
                format!(
                    "repository {} is not encrypted and already holds data, and a passphrase was given: open it without LOCKSTEP_PASSPHRASE_FILE and LOCKSTEP_PASSPHRASE, or create an encrypted repository at a new location",
                    self.url
                ),
            ));
        }
        let given = passphrase.clone();
        let (keys, marker, slot) = crate::blocking::run(move || crate::seal::create(&given))
            .await
            .map_err(|err| Error::with_source(ErrorCode::StorageUnavailable, "key task", err))??;
        self.put_key_slot(&slot).await?;
        if self.put_marker(&marker).await? {
            tracing::info!(repository = %self.url, slot = %slot.slot, "created an encrypted repository");
            return Ok(Seal::sealed(keys));
        }
        self.delete_if_present(&self.layout.key_slot(&slot.slot))
            .await?;
        let theirs = self.encryption_marker().await?.ok_or_else(|| {
            Error::new(
                ErrorCode::StorageUnavailable,
                "the encryption marker vanished while it was read",
            )
        })?;
        if !theirs.is_encrypted() {
            // A plaintext opener created it first.
            return Err(Error::new(
                ErrorCode::EncryptionKey,
                format!(
                    "repository {} was just created unencrypted by another process, and a passphrase was given",
                    self.url
                ),
            ));
        }
        Ok(Seal::sealed(self.unlock_with(&theirs, passphrase).await?))
    }

    /// Whether the repository holds nothing but key slots and encryption markers (it is
    /// new).
    async fn holds_nothing(&self) -> Result<bool> {
        let prefix = self.layout.prefix();
        let mut listing = self
            .store
            .list((!prefix.as_ref().is_empty()).then_some(prefix));
        let keys_dir = self.layout.keys_dir();
        let marker = self.layout.encryption_marker();
        while let Some(meta) = listing
            .try_next()
            .await
            .map_err(|err| storage_error("list the repository", err))?
        {
            if !meta.location.prefix_matches(&keys_dir) && meta.location != marker {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes `value` as JSON at `key` unless something is there (false then).
    async fn put_json_once(
        &self,
        key: &Path,
        value: &impl serde::Serialize,
        what: &str,
    ) -> Result<bool> {
        let json = serde_json::to_vec_pretty(value).map_err(|err| {
            Error::with_source(
                ErrorCode::InvalidArgument,
                format!("encode the {what}"),
                err,
            )
        })?;
        self.put_once(key, PutPayload::from(json), what).await
    }

    /// Writes the encryption marker unless one is there (false then).
    async fn put_marker(&self, marker: &EncryptionMarker) -> Result<bool> {
        self.put_json_once(
            &self.layout.encryption_marker(),
            marker,
            "encryption marker",
        )
        .await
    }

    async fn put_key_slot(&self, slot: &KeySlot) -> Result<()> {
        let key = self.layout.key_slot(&slot.slot);
        if !self.put_json_once(&key, slot, "key slot").await? {
            return Err(Error::new(
                ErrorCode::StorageUnavailable,
                format!("key slot {key} exists already"),
            ));
        }
        Ok(())
    }

    /// Copies this encrypted repository's encryption marker and key slots to `target` (a WAL
    /// archive, or a new repository), create-only: whoever holds a passphrase can then open
    /// what `target` holds without this repository, and a new repository given them by
    /// [`Repository::adopt_keys`] opens with the same keys. Both are safe to copy: the
    /// master key in them is sealed by the passphrases. A target with another repository's
    /// marker is refused.
    pub async fn copy_keys_to(&self, target: &Repository) -> Result<usize> {
        let Some(marker) = self.encryption_marker().await?.filter(|m| m.is_encrypted()) else {
            return Ok(0);
        };
        // The marker first, create-only: if the target's is another, nothing is copied.
        let written = target.put_marker(&marker).await?;
        if !written {
            let theirs = target.encryption_marker().await?;
            if theirs.as_ref().map(|m| &m.key_id) != Some(&marker.key_id) {
                let what = match theirs {
                    Some(m) if !m.is_encrypted() => {
                        "is claimed by a plaintext repository".to_string()
                    }
                    Some(m) => format!(
                        "holds the keys of another encrypted repository (key id {})",
                        m.key_id
                    ),
                    None => "lost its encryption marker while it was written".to_string(),
                };
                return Err(Error::new(
                    ErrorCode::EncryptionKey,
                    format!(
                        "{} {what}: no keys of key id {} were copied",
                        target.url, marker.key_id
                    ),
                ));
            }
        }
        let slots = self.key_slots().await?;
        // A slot removed here is removed there too, so a revoked passphrase opens no copy.
        for stale in target.key_slots().await? {
            if !slots.iter().any(|s| s.slot == stale.slot) {
                target
                    .delete_if_present(&target.layout.key_slot(&stale.slot))
                    .await?;
            }
        }
        let mut copied = 0;
        for slot in slots {
            let key = target.layout.key_slot(&slot.slot);
            copied += usize::from(target.put_json_once(&key, &slot, "key slot").await?);
        }
        Ok(copied)
    }

    /// Gives the new, empty repository at `location` the keys `source` holds (a WAL archive
    /// an agent copied them to, or another repository of the same cluster): after a disaster
    /// took the repository, a new one opens with the old passphrases and restores from the
    /// archive's WAL.
    pub async fn adopt_keys(location: &str, source: &Repository) -> Result<usize> {
        let target = Repository::open_store(location, &[]).await?;
        if target.encryption_marker().await?.is_some() || !target.holds_nothing().await? {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "repository {location} is not new (something opened, and so created, it already): keys are adopted only by a repository nothing has opened; import into a new location first, then start anything on it"
                ),
            ));
        }
        if !source
            .encryption_marker()
            .await?
            .is_some_and(|m| m.is_encrypted())
        {
            return Err(Error::new(
                ErrorCode::EncryptionKey,
                format!("{} holds no encryption keys to adopt", source.url),
            ));
        }
        source.copy_keys_to(&target).await
    }

    fn unlocked_keys(&self) -> Result<Arc<crate::seal::Keys>> {
        match &self.seal {
            Seal::Sealed { keys, .. } => Ok(keys.clone()),
            Seal::Plain => Err(Error::new(
                ErrorCode::EncryptionKey,
                format!("repository {} is not encrypted: it has no keys", self.url),
            )),
        }
    }

    /// Adds a key slot holding the master key under `passphrase` (the repository must be
    /// unlocked); every backup stays readable with either passphrase.
    pub async fn add_key(&self, passphrase: &Passphrase) -> Result<KeySlot> {
        let keys = self.unlocked_keys()?;
        let given = passphrase.clone();
        let slot = crate::blocking::run(move || crate::seal::new_slot(&keys, &given))
            .await
            .map_err(|err| Error::with_source(ErrorCode::StorageUnavailable, "key task", err))??;
        self.put_key_slot(&slot).await?;
        Ok(slot)
    }

    /// Removes key slot `slot`: its passphrase no longer opens the repository. The last
    /// slot is never removed (the data would be lost with it).
    pub async fn remove_key(&self, slot: &str) -> Result<()> {
        self.unlocked_keys()?;
        let slots = self.key_slots().await?;
        if !slots.iter().any(|s| s.slot == slot) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "repository {} has no key slot {slot:?} (`lockstep key list`)",
                    self.url
                ),
            ));
        }
        if slots.len() == 1 {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "key slot {slot} is the repository's last: add another first (`lockstep key add`), or every backup would be lost"
                ),
            ));
        }
        let removed = slots.into_iter().find(|s| s.slot == slot);
        self.store
            .delete(&self.layout.key_slot(slot))
            .await
            .map_err(|err| storage_error(format!("delete key slot {slot}"), err))?;
        // Two removals at once could each take one of the last two slots: whoever finds none
        // left puts its own back.
        if self.key_slots().await?.is_empty()
            && let Some(removed) = removed
        {
            self.put_key_slot(&removed).await?;
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "key slot {slot} was the last one left (another was removed meanwhile); it was put back"
                ),
            ));
        }
        Ok(())
    }

    /// The plaintext of the record at `key` (a manifest, tag or other record), its seal
    /// opened in an encrypted repository; `None` when there is none.
    pub(crate) async fn get_record(&self, key: &Path, (max, code): Bound) -> Result<Option<Bytes>> {
        // The bound is the plaintext's: a seal adds its header.
        let bound = (max.saturating_add(crate::seal::RECORD_OVERHEAD), code);
        match self.get_raw(key, bound).await? {
            None => Ok(None),
            Some(stored) => self
                .seal
                .open_record(&self.layout.name_of(key), stored)
                .map(Some),
        }
    }

    /// A record as stored at `key`: sealed in an encrypted repository.
    pub(crate) fn sealed_record(&self, key: &Path, plaintext: Vec<u8>) -> Result<Vec<u8>> {
        self.seal.seal_record(&self.layout.name_of(key), plaintext)
    }

    /// This repository, its object transfers within `bandwidth` (an agent's limits).
    pub fn throttled(&self, bandwidth: Arc<crate::bandwidth::Bandwidth>) -> Repository {
        Repository {
            bandwidth: Some(bandwidth),
            ..self.clone()
        }
    }

    /// This repository, for a backup that must not rely on the objects of `condemned`.
    pub fn avoiding(&self, condemned: Arc<crate::gc::Condemned>) -> Repository {
        Repository {
            condemned: Some(condemned),
            ..self.clone()
        }
    }

    pub(crate) fn catalog_state(&self) -> &crate::catalog::SharedCatalog {
        &self.catalog
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The buffers this repository's transfers reuse.
    pub(crate) fn buffers(&self) -> &crate::buffers::BufferPool {
        &self.buffers
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The stored size of an object's copy, or `None` if it is absent (a look-up: nothing
    /// relies on the object afterwards; see [`Repository::reuse_object`]).
    pub async fn object_size(&self, id: &ObjectId, copy: u32) -> Result<Option<u64>> {
        let key = self.layout.object(id, copy);
        match self.store.head(&key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(storage_error(format!("look up object {id}"), err)),
        }
    }

    /// The copy of object `id` a writer through this handle uses: the first one no running
    /// GC sweep may delete (of at most [`MAX_COPIES`]).
    fn writable_copy(&self, id: &ObjectId) -> Result<u32> {
        let condemned = self.condemned.as_deref();
        (0..MAX_COPIES)
            .find(|copy| !condemned.is_some_and(|c| c.contains(&(*id, *copy))))
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::BackupCreationFailed,
                    format!("every copy of object {id} is condemned by a GC sweep; retry the backup once the sweep ends"),
                )
            })
    }

    /// [`Repository::object_size`] for an object a manifest about to be published will name
    /// instead of storing it again: returns the copy to name (or to write, when absent) and
    /// its size if stored. Another writer may have stored it without syncing it yet, so the
    /// next [`Repository::sync_objects`] makes it durable.
    pub async fn reuse_object(&self, id: &ObjectId) -> Result<(u32, Option<u64>)> {
        let copy = self.writable_copy(id)?;
        let size = self.object_size(id, copy).await?;
        if size.is_some() {
            self.defer_sync(self.layout.object(id, copy));
        }
        Ok((copy, size))
    }

    /// Writes `payload` at `key` unless something is there already: returns false (and
    /// writes nothing) when the key exists. Stores without create-only puts fall back to a
    /// look-up then a plain put, which is safe for the content-addressed keys this serves.
    pub(crate) async fn put_once(
        &self,
        key: &Path,
        payload: PutPayload,
        what: &str,
    ) -> Result<bool> {
        let written = self.put_once_unsynced(key, payload, what).await?;
        if written {
            self.make_durable(key).await?;
        }
        Ok(written)
    }

    /// `put_once` without the fsync: the caller makes the key durable.
    async fn put_once_unsynced(&self, key: &Path, payload: PutPayload, what: &str) -> Result<bool> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.store.put_opts(key, payload.clone(), options).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => return Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.store.head(key).await.is_ok() {
                    return Ok(false);
                }
                self.store
                    .put(key, payload)
                    .await
                    .map_err(|err| storage_error(format!("write {what} {key}"), err))?;
            }
            Err(err) => return Err(storage_error(format!("write {what} {key}"), err)),
        }
        Ok(true)
    }

    /// Stores an encoded object and returns the size of the object under its key: the one
    /// written, or the one another writer stored first (objects are immutable: an existing
    /// object is left as it is).
    ///
    /// On a local filesystem the object is written by `direct::create_file` (a format-2
    /// object's payload around the page cache) and is durable before it appears under its key, so a crash never leaves a partial object
    /// there for a later backup to reuse; its directory entry is made durable by
    /// `sync_objects`, which every manifest publish runs first, once per directory. Elsewhere
    /// the object goes in format 1 (3 sealed): there the padding page buys nothing.
    pub async fn put_object(&self, encoded: Encoded) -> Result<(u32, u64)> {
        let copy = self.writable_copy(&encoded.id)?;
        // Pages buy nothing on a remote store: the object goes in format 1 (or 3), and the
        // limit is charged what is sent.
        let encoded = if self.local_root.is_some() {
            encoded
        } else {
            encoded.unpaged()
        };
        if let Some(bandwidth) = &self.bandwidth {
            bandwidth.backup_upload(encoded.stored_len()).await;
        }
        let key = self.layout.object(&encoded.id, copy);
        let Some(root) = &self.local_root else {
            let stored_len = encoded.stored_len();
            let payload = match encoded.frame {
                Frame::Whole(whole) => PutPayload::from(whole),
                Frame::Split(header, payload) => {
                    PutPayload::from_iter([Bytes::copy_from_slice(header.as_slice()), payload])
                }
            };
            if self.put_once_unsynced(&key, payload, "object").await? {
                return Ok((copy, stored_len));
            }
            let (copy, size) = self.reuse_object(&encoded.id).await?;
            return size.map(|size| (copy, size)).ok_or_else(|| {
                Error::new(
                    ErrorCode::StorageUnavailable,
                    format!("object {key} was there, then gone"),
                )
            });
        };
        let file = root.join(key.as_ref());
        let shown = key.to_string();
        let (written, stored_len) = crate::blocking::run_bulk(move || {
            let written = direct::create_file(&file, encoded.parts())?;
            let stored_len = if written {
                encoded.stored_len()
            } else {
                std::fs::metadata(&file)?.len()
            };
            Ok::<_, std::io::Error>((written, stored_len))
        })
        .await
        .map_err(|err| Error::with_source(ErrorCode::StorageUnavailable, "write task", err))?
        .map_err(|err| {
            Error::io(
                ErrorCode::StorageUnavailable,
                format!("write object {shown}"),
                err,
            )
        })?;
        let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        if written {
            unsynced.written.push(key);
        } else {
            unsynced.found.push(key);
        }
        Ok((copy, stored_len))
    }

    fn defer_sync(&self, key: Path) {
        if self.local_root.is_some() {
            self.unsynced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .found
                .push(key);
        }
    }

    /// Makes every data object written (or relied on) through this handle since the last
    /// call durable: fsyncs the objects found already stored, then the directories of those
    /// and of the ones written (each already synced before it was linked) once.
    pub async fn sync_objects(&self) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let Unsynced { written, found } =
            std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(|p| p.into_inner()));
        if written.is_empty() && found.is_empty() {
            return Ok(());
        }
        let mut dirs: Vec<std::path::PathBuf> = written
            .iter()
            .chain(&found)
            .filter_map(|k| root.join(k.as_ref()).parent().map(|d| d.to_path_buf()))
            .collect();
        dirs.sort();
        dirs.dedup();
        // Each key on its own: one that fails stays queued for the next publish, one that
        // is gone (deleted since it was found) fails this publish, which named it, and no
        // later one; the others are durable.
        let present: Vec<Path> = written.iter().chain(&found).cloned().collect();
        let synced: Vec<(Path, Result<()>)> = futures::stream::iter(found.into_iter().map(|key| {
            let file = root.join(key.as_ref());
            async move { (key, fsync(file).await) }
        }))
        .buffer_unordered(SYNC_PARALLELISM)
        .collect()
        .await;
        let mut first_error = None;
        let mut retry = Vec::new();
        for (key, result) in synced {
            if let Err(err) = result {
                let gone = err.io_kind() == Some(std::io::ErrorKind::NotFound);
                if !gone {
                    retry.push(key.clone());
                }
                first_error.get_or_insert(if gone {
                    Error::new(
                        ErrorCode::BackupIncomplete,
                        format!("object {key} was removed after this backup found it; nothing names it yet, retry the backup"),
                    )
                } else {
                    err
                });
            }
        }
        let dirs_synced = futures::stream::iter(dirs.into_iter().map(fsync))
            .buffer_unordered(SYNC_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await;
        if let Err(err) = dirs_synced {
            // The directories of every key: all of them are retried, but the ones gone.
            let gone_or_queued: std::collections::HashSet<&Path> = retry.iter().collect();
            let more: Vec<Path> = present
                .iter()
                .filter(|key| !gone_or_queued.contains(key))
                .filter(|key| root.join(key.as_ref()).exists())
                .cloned()
                .collect();
            retry.extend(more);
            first_error.get_or_insert(err);
        }
        match first_error {
            None => Ok(()),
            Some(err) => {
                self.unsynced
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .found
                    .extend(retry);
                Err(err)
            }
        }
    }

    /// The bytes at `key`, if any; an object larger than its kind's bound is refused before
    /// it is read (a crafted or damaged object never makes a reader allocate without bound).
    /// `max` and the code of the error for a larger object come from its kind
    /// ([`Bound`]).
    pub(crate) async fn get_raw(&self, key: &Path, bound: Bound) -> Result<Option<Bytes>> {
        Ok(self
            .get_stored(key, bound)
            .await?
            .map(codec::Stored::into_bytes))
    }

    /// [`Repository::get_raw`], a local repository's object in a reused buffer of its own.
    async fn get_stored(&self, key: &Path, (max, code): Bound) -> Result<Option<codec::Stored>> {
        let too_large = |len: u64| {
            Error::new(
                code,
                format!(
                    "{key} holds {len} bytes, more than the {max} it can hold; it is refused unread"
                ),
            )
        };
        if let Some(root) = &self.local_root {
            // A local repository is read directly, into reused buffers: object_store's local
            // reader zero-fills a fresh buffer before reading into it, a memset as large as
            // the object plus its page faults (a quarter of a restore's CPU, measured with perf),
            // and reads through the page cache (`direct.rs`).
            let (file, pool) = (root.join(key.as_ref()), self.buffers.clone());
            let read = move || -> std::io::Result<crate::buffers::PooledBuffer> {
                // One open file, its length and its bytes: a record replaced meanwhile is
                // read whole, old or new.
                let file = std::fs::File::open(file)?;
                let len = file.metadata()?.len();
                if len > max {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::FileTooLarge,
                        len.to_string(),
                    ));
                }
                let mut buffer = pool.take(len as usize);
                crate::direct::read_exact_at(&file, 0, len as usize, &mut buffer)?;
                Ok(buffer)
            };
            return match crate::blocking::run(read).await {
                Ok(Ok(buffer)) => Ok(Some(codec::Stored::Owned(buffer))),
                Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Ok(Err(err)) if err.kind() == std::io::ErrorKind::FileTooLarge => {
                    Err(too_large(err.to_string().parse().unwrap_or(u64::MAX)))
                }
                Ok(Err(err)) => Err(Error::io(
                    ErrorCode::StorageUnavailable,
                    format!("download {key}"),
                    err,
                )),
                Err(err) => Err(Error::with_source(
                    ErrorCode::StorageUnavailable,
                    "read task",
                    err,
                )),
            };
        }
        match self.store.get(key).await {
            Ok(result) if result.meta.size > max => Err(too_large(result.meta.size)),
            Ok(result) => result
                .bytes()
                .await
                .map(|bytes| Some(codec::Stored::Shared(bytes)))
                .map_err(|err| storage_error(format!("download {key}"), err)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(storage_error(format!("download {key}"), err)),
        }
    }

    /// Downloads the object of `chunk` and returns its verified plaintext, of exactly the
    /// chunk's length.
    pub async fn get_object(&self, chunk: &Chunk) -> Result<Bytes> {
        let id = chunk.id;
        if let Some(bandwidth) = &self.bandwidth {
            bandwidth.download(chunk.stored_len).await;
        }
        let stored = self
            .get_stored(
                &self.layout.object(&id, chunk.copy),
                (
                    codec::max_stored_len(chunk.len),
                    ErrorCode::BackupChecksumMismatch,
                ),
            )
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::BackupIncomplete,
                    format!("object {id} is missing"),
                )
            })?;
        let (len, seal, pool) = (chunk.len, self.seal.clone(), self.buffers.clone());
        crate::blocking::run_bulk(move || codec::decode_sized_owned(&id, stored, len, &seal, &pool))
            .await
            .map_err(decode_task_failed)?
    }

    /// Writes (or overwrites) a record that names no object, durably (sealed in an
    /// encrypted repository).
    pub(crate) async fn put_durable(&self, key: &Path, bytes: Vec<u8>, what: &str) -> Result<()> {
        let bytes = self.sealed_record(key, bytes)?;
        self.store
            .put(key, PutPayload::from(bytes))
            .await
            .map_err(|err| storage_error(format!("write {what} {key}"), err))?;
        self.make_durable(key).await
    }

    pub(crate) async fn put_manifest(&self, key: &Path, json: Vec<u8>) -> Result<()> {
        let json = self.sealed_record(key, json)?;
        // Whatever the manifest names must be durable before it is.
        self.sync_objects().await?;
        self.store
            .put(key, PutPayload::from(json))
            .await
            .map_err(|err| storage_error(format!("write manifest {key}"), err))?;
        self.make_durable(key).await
    }

    /// Publishes a shard manifest. Call only after every object it names is stored.
    pub async fn put_shard_manifest(&self, manifest: &ShardManifest) -> Result<()> {
        let key = self
            .layout
            .shard_manifest(&manifest.shard_id, &manifest.backup_id);
        let json = manifest.to_json();
        // What no reader would accept is never published.
        if json.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::new(
                ErrorCode::BackupCreationFailed,
                format!(
                    "the manifest of shard {} is {} bytes, more than the {MAX_MANIFEST_BYTES} a reader accepts: use larger chunks (--chunk-mib)",
                    manifest.shard_id,
                    json.len()
                ),
            ));
        }
        self.put_manifest(&key, json).await
    }

    /// Publishes a backup manifest, the commit point of a backup. Call only after every
    /// shard manifest it names is stored.
    /// Commits a backup: writes its manifest as the next in the commit order and returns it
    /// as written. Fails if a manifest cannot be read now (it may be the last committed); a
    /// corrupt one, which no restore can use, is skipped.
    pub async fn commit_backup(&self, mut manifest: BackupManifest) -> Result<BackupManifest> {
        let catalog = self.catalog().await?;
        manifest.commit_seq = catalog
            .backups()
            .iter()
            .filter(|existing| existing.backup_id != manifest.backup_id)
            .map(|existing| existing.commit_seq)
            .max()
            .unwrap_or(0)
            + 1;
        let key = self.layout.backup_manifest(&manifest.backup_id);
        if let Err(err) = self.put_manifest(&key, manifest.to_json()).await {
            // Written or not, unknown: the next look finds out.
            self.suspect_catalog();
            return Err(err);
        }
        self.index_added(&manifest).await;
        Ok(manifest)
    }

    pub async fn shard_manifest(
        &self,
        shard: &ShardId,
        backup: &BackupId,
    ) -> Result<ShardManifest> {
        let key = self.layout.shard_manifest(shard, backup);
        let bytes = self.get_record(&key, MANIFEST).await?.ok_or_else(|| {
            Error::new(
                ErrorCode::BackupIncomplete,
                format!("shard manifest of {shard} in backup {backup} is missing"),
            )
        })?;
        ShardManifest::parse(&format!("shard manifest {key}"), &bytes)
    }

    pub async fn backup_manifest(&self, backup: &BackupId) -> Result<BackupManifest> {
        let key = self.layout.backup_manifest(backup);
        let bytes = self.get_record(&key, MANIFEST).await?.ok_or_else(|| {
            Error::new(
                ErrorCode::BackupNotFound,
                format!("backup {backup} does not exist"),
            )
        })?;
        BackupManifest::parse(&format!("backup manifest {key}"), &bytes)
    }

    /// The backup ids named by the keys under `dir` (`backups/` or `pending/`), sorted.
    async fn ids_under(&self, dir: &Path, what: &str) -> Result<Vec<BackupId>> {
        self.keys_under(dir, what, |key| self.layout.backup_id_of(key))
            .await
    }

    /// The ids `parse` finds in the keys under `dir`, sorted.
    pub(crate) async fn keys_under<T: Ord>(
        &self,
        dir: &Path,
        what: &str,
        parse: impl Fn(&Path) -> Option<T>,
    ) -> Result<Vec<T>> {
        let metas: Vec<_> = self
            .store
            .list(Some(dir))
            .try_collect()
            .await
            .map_err(|err| storage_error(format!("list {what}"), err))?;
        let mut ids: Vec<T> = metas.iter().filter_map(|m| parse(&m.location)).collect();
        ids.sort();
        Ok(ids)
    }

    /// Ids of every committed backup, oldest first.
    pub async fn backup_ids(&self) -> Result<Vec<BackupId>> {
        self.ids_under(&self.layout.backups_dir(), "backups").await
    }

    /// Every committed backup manifest, oldest first in commit order (then start time and
    /// id, for manifests from before the order was recorded). A manifest that does not parse
    /// is returned as its error, first, so a listing still shows the rest.
    pub async fn backups(&self) -> Result<Vec<(BackupId, Result<BackupManifest>)>> {
        let catalog = self.catalog().await?;
        let damaged = catalog
            .damaged()
            .iter()
            .map(|d| (d.backup_id.clone(), Err(Error::new(d.code, d.why.clone()))));
        let indexed = catalog
            .backups()
            .iter()
            .map(|m| (m.backup_id.clone(), Ok(BackupManifest::clone(m))));
        Ok(damaged.chain(indexed).collect())
    }

    /// The last backup committed (a corrupt manifest, which no restore can use, is skipped).
    pub async fn latest_backup(&self) -> Result<BackupId> {
        let catalog = self.catalog().await?;
        catalog
            .latest()
            .map(|m| m.backup_id.clone())
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::BackupNotFound,
                    format!("repository {} holds no backup", self.url()),
                )
            })
    }

    /// The newest committed full backup that contains `shard`, with its shard manifest (the
    /// files a new full backup can reuse; incrementals and differentials have none).
    pub async fn latest_shard_manifest(&self, shard: &ShardId) -> Result<Option<ShardManifest>> {
        let catalog = self.catalog().await?;
        let newest_full = catalog.backups().iter().rev().find(|backup| {
            backup.kind == BackupKind::Full && backup.shards.iter().any(|s| &s.shard_id == shard)
        });
        match newest_full {
            Some(backup) => self
                .shard_manifest(shard, &backup.backup_id)
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    /// Every point of `shard`'s histories the repository records: where each committed backup
    /// and each tag left it. Fails closed when a manifest cannot be read now (whoever decides
    /// about a shard's history must not guess); a corrupt one, which no restore can use, is
    /// skipped.
    pub async fn shard_points(&self, shard: &ShardId) -> Result<Vec<(Lineage, Seq)>> {
        let mut out = Vec::new();
        for backup in self.catalog().await?.backups() {
            out.extend(
                backup
                    .shards
                    .iter()
                    .filter(|s| &s.shard_id == shard)
                    .map(|s| (s.lineage, s.seq)),
            );
        }
        for (name, tag) in self.tags().await? {
            match tag {
                Ok(tag) => out.extend(tag.points.get(shard).map(|p| (p.lineage, p.seq))),
                Err(err) if err.is_damaged_record() => {
                    tracing::warn!(tag = %name, error = %err.chain(), "skipping a corrupt tag");
                }
                Err(err) => return Err(err.context(format!("read tag {name}"))),
            }
        }
        Ok(out)
    }

    /// Records the intent of a backup before its barrier starts.
    pub async fn put_pending(&self, backup: &BackupId, json: Vec<u8>) -> Result<()> {
        self.put_manifest(&self.layout.pending(backup), json).await
    }

    /// Ids of backups whose intent is recorded; those without a backup manifest are leftovers.
    pub async fn pending_ids(&self) -> Result<Vec<BackupId>> {
        self.ids_under(&self.layout.pending_dir(), "pending backups")
            .await
    }

    pub(crate) async fn delete_if_present(&self, key: &Path) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(storage_error(format!("delete {key}"), err)),
        }
    }

    pub async fn delete_pending(&self, backup: &BackupId) -> Result<()> {
        self.delete_if_present(&self.layout.pending(backup)).await
    }

    /// Removes the staging files (`<key>#<n>`) that writers which crashed mid-write left in
    /// a local repository, once older than `older_than` (a write in flight renames its own
    /// within seconds); returns how many and their bytes. Nothing to do on object stores.
    pub async fn remove_staging_leftovers(
        &self,
        older_than: std::time::Duration,
    ) -> Result<(usize, u64)> {
        let Some(root) = self.local_root.clone() else {
            return Ok((0, 0));
        };
        let sweep = move || -> std::io::Result<(usize, u64)> {
            let (mut removed, mut bytes) = (0, 0);
            let mut dirs = vec![root];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
                    let Ok(kind) = entry.file_type() else {
                        continue;
                    };
                    if kind.is_dir() {
                        dirs.push(entry.path());
                        continue;
                    }
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let staging = name.rsplit_once('#').is_some_and(|(key, n)| {
                        !key.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                    });
                    let Ok(meta) = entry.metadata() else { continue };
                    let old = meta
                        .modified()
                        .ok()
                        .and_then(|at| at.elapsed().ok())
                        .is_some_and(|age| age >= older_than);
                    if staging && old && std::fs::remove_file(entry.path()).is_ok() {
                        removed += 1;
                        bytes += meta.len();
                    }
                }
            }
            Ok((removed, bytes))
        };
        crate::blocking::run(sweep)
            .await
            .map_err(|err| Error::with_source(ErrorCode::StorageUnavailable, "sweep task", err))?
            .map_err(|err| {
                Error::io(
                    ErrorCode::StorageUnavailable,
                    "remove staging leftovers",
                    err,
                )
            })
    }

    /// Takes the next coordinator epoch: the coordinator that holds the highest one acts on
    /// the repository, and every older one is fenced out ([`Repository::epoch_superseded`]).
    /// Each epoch is its own object, created with a create-only put, so two coordinators
    /// starting together get two epochs and the later one wins; `holder` says who took it.
    pub async fn take_epoch(&self, holder: &str) -> Result<u64> {
        for _ in 0..16 {
            let epochs = self
                .keys_under(
                    &self.layout.coordinators_dir(),
                    "coordinator epochs",
                    |key| self.layout.epoch_of(key),
                )
                .await?;
            let next = epochs.last().map_or(1, |last| last + 1);
            let record = serde_json::json!({
                "epoch": next,
                "holder": holder,
                "taken_at": chrono::Utc::now(),
            });
            let payload = PutPayload::from(record.to_string().into_bytes());
            if self
                .put_once(
                    &self.layout.coordinator_epoch(next),
                    payload,
                    "coordinator epoch",
                )
                .await?
            {
                // Older epochs stay: a coordinator is fenced by the one right after its own,
                // which must still be there however long it was cut off.
                return Ok(next);
            }
        }
        Err(Error::new(
            ErrorCode::StorageUnavailable,
            "could not take a coordinator epoch: other coordinators kept taking the next one",
        ))
    }

    /// Whether a coordinator started after the holder of `epoch` took the repository over.
    pub async fn epoch_superseded(&self, epoch: u64) -> Result<bool> {
        let next = self.layout.coordinator_epoch(epoch + 1);
        match self.store.head(&next).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(err) => Err(storage_error(format!("look up {next}"), err)),
        }
    }

    /// Checks that the repository belongs to `cluster`, or makes it so if it is new: the
    /// identity marker is written once (create-only) and read by every coordinator that
    /// starts on the repository, so a second cluster pointed at the same prefix is refused.
    pub async fn claim(&self, cluster: &str) -> Result<RepositoryIdentity> {
        let key = self.layout.marker();
        let mine = RepositoryIdentity {
            format: 1,
            repository_id: uuid::Uuid::new_v4().simple().to_string(),
            cluster: cluster.to_string(),
            created_at: chrono::Utc::now(),
        };
        let json = serde_json::to_vec(&mine).map_err(|err| {
            Error::with_source(
                ErrorCode::InvalidArgument,
                "encode the repository marker",
                err,
            )
        })?;
        if self
            .put_once(&key, PutPayload::from(json), "repository marker")
            .await?
        {
            return Ok(mine);
        }
        let stored = self.get_raw(&key, MANIFEST).await?.ok_or_else(|| {
            Error::new(
                ErrorCode::StorageUnavailable,
                "the repository marker vanished while it was read",
            )
        })?;
        let stored: RepositoryIdentity = serde_json::from_slice(&stored).map_err(|err| {
            Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!("the repository marker {key} is unreadable: {err}"),
            )
        })?;
        if stored.cluster != cluster {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "repository {} belongs to cluster {:?} (repository id {}, created {}), not {cluster:?}: give each cluster its own repository or prefix, or set `cluster = {:?}` if this is that cluster",
                    self.url,
                    stored.cluster,
                    stored.repository_id,
                    stored.created_at,
                    stored.cluster
                ),
            ));
        }
        Ok(stored)
    }

    /// Records a cluster restore under way (its plan, as JSON), before any agent stages it.
    pub async fn put_running_restore(&self, restore: &RestoreId, json: Vec<u8>) -> Result<()> {
        self.put_manifest(&self.layout.running_restore(restore), json)
            .await
    }

    /// Ids of the cluster restores recorded as under way; at start, every one was left by a
    /// coordinator that stopped before the restore ended.
    pub async fn running_restore_ids(&self) -> Result<Vec<RestoreId>> {
        self.keys_under(
            &self.layout.running_restores_dir(),
            "running restores",
            |key| self.layout.restore_id_of(key),
        )
        .await
    }

    /// The record of a restore under way, as written; `None` once it ended.
    pub async fn running_restore(&self, restore: &RestoreId) -> Result<Option<Vec<u8>>> {
        Ok(self
            .get_record(&self.layout.running_restore(restore), MANIFEST)
            .await?
            .map(|bytes| bytes.to_vec()))
    }

    /// Removes a restore's record once every shard ended it. Its decision stays: an agent
    /// that starts later with a shard of it still undecided (a `--to` target whose agent
    /// crashed) must find it.
    pub async fn delete_running_restore(&self, restore: &RestoreId) -> Result<()> {
        self.delete_if_present(&self.layout.running_restore(restore))
            .await
    }

    /// Decides whether the shards of a restore that are swapped in keep it (`Commit`) or
    /// return to their old data (`Revert`): stores `decision` unless a decision is stored
    /// already, and returns the one that holds. The coordinator decides `Commit` once every
    /// shard is swapped; an agent whose lease ran out, or that restarted mid-restore, decides
    /// `Revert`. Whoever writes first wins (a create-only put), so every shard follows the
    /// same decision. An error means nothing is known: decide nothing, ask again.
    pub async fn decide_restore(
        &self,
        restore: &RestoreId,
        decision: RestoreDecision,
        by: &str,
    ) -> Result<RestoreDecision> {
        let key = self.layout.restore_decision(restore);
        let record = serde_json::json!({
            "decision": decision,
            "by": by,
            "at": chrono::Utc::now(),
        });
        let payload = PutPayload::from(self.sealed_record(&key, record.to_string().into_bytes())?);
        if self.put_once(&key, payload, "restore decision").await? {
            return Ok(decision);
        }
        self.restore_decision(restore).await?.ok_or_else(|| {
            Error::new(
                ErrorCode::StorageUnavailable,
                format!("the decision of restore {restore} vanished while it was read"),
            )
        })
    }

    /// The decision stored for a restore, if any.
    pub async fn restore_decision(&self, restore: &RestoreId) -> Result<Option<RestoreDecision>> {
        let Some(bytes) = self
            .get_record(&self.layout.restore_decision(restore), MANIFEST)
            .await?
        else {
            return Ok(None);
        };
        #[derive(serde::Deserialize)]
        struct Stored {
            decision: RestoreDecision,
        }
        let stored: Stored = serde_json::from_slice(&bytes).map_err(|err| {
            Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!("the decision of restore {restore} is unreadable: {err}"),
            )
        })?;
        Ok(Some(stored.decision))
    }

    /// True if the backup manifest exists (the backup committed).
    pub async fn backup_exists(&self, backup: &BackupId) -> Result<bool> {
        match self.store.head(&self.layout.backup_manifest(backup)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(err) => Err(storage_error(format!("look up backup {backup}"), err)),
        }
    }

    /// Removes the shard manifests an uncommitted backup left behind; returns how many.
    pub async fn delete_shard_manifests(
        &self,
        backup: &BackupId,
        shards: &[ShardId],
    ) -> Result<usize> {
        let mut removed = 0;
        for shard in shards {
            let key = self.layout.shard_manifest(shard, backup);
            if self.store.head(&key).await.is_ok() {
                self.delete_if_present(&key).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes a backup manifest (and so the backup), then its shard manifests: those it
    /// names and those of `shards`, so a backup whose manifest is corrupt can be deleted too.
    /// Its objects become garbage.
    pub async fn delete_backup(&self, backup: &BackupId, shards: &[ShardId]) -> Result<()> {
        let mut shards = shards.to_vec();
        match self.backup_manifest(backup).await {
            Ok(manifest) => shards.extend(manifest.shards.into_iter().map(|s| s.shard_id)),
            Err(err) if err.is_damaged_record() => {
                tracing::warn!(backup = %backup, error = %err.chain(), "deleting a backup whose manifest is corrupt");
            }
            // Indexed, its manifest already gone (a delete that stopped before it was
            // recorded): finish it.
            Err(err) if err.code == ErrorCode::BackupNotFound => {
                let catalog = self.catalog().await?;
                let Some(indexed) = catalog.get(backup) else {
                    return Err(err);
                };
                shards.extend(indexed.shards.iter().map(|s| s.shard_id.clone()));
            }
            Err(err) => return Err(err),
        }
        if let Err(err) = self
            .delete_if_present(&self.layout.backup_manifest(backup))
            .await
        {
            self.suspect_catalog();
            return Err(err.context(format!("delete backup {backup}")));
        }
        // Recorded before anything else can fail: no parent choice or plan names it again.
        self.index_removed(backup).await;
        shards.sort();
        shards.dedup();
        self.delete_shard_manifests(backup, &shards).await?;
        Ok(())
    }

    /// Publishes a tag. Tags are never overwritten: a second tag with the same name fails.
    pub async fn put_tag(&self, tag: &TagManifest) -> Result<()> {
        let key = self.layout.tag(&tag.name);
        if self
            .put_once(
                &key,
                PutPayload::from(self.sealed_record(&key, tag.to_json())?),
                "tag",
            )
            .await?
        {
            Ok(())
        } else {
            Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("tag {} already exists; pick another name", tag.name),
            ))
        }
    }

    /// Removes a tag (retention); removing one that is gone already is not an error.
    pub async fn delete_tag(&self, name: &TagName) -> Result<()> {
        self.delete_if_present(&self.layout.tag(name)).await
    }

    pub async fn tag(&self, name: &TagName) -> Result<TagManifest> {
        let key = self.layout.tag(name);
        let bytes = self.get_record(&key, MANIFEST).await?.ok_or_else(|| {
            Error::new(
                ErrorCode::BackupNotFound,
                format!("tag {name} does not exist"),
            )
        })?;
        TagManifest::parse(&format!("tag {key}"), &bytes)
    }

    /// Every tag, oldest first; a tag that does not parse is returned as its error.
    pub async fn tags(&self) -> Result<Vec<(TagName, Result<TagManifest>)>> {
        let metas: Vec<_> = self
            .store
            .list(Some(&self.layout.tags_dir()))
            .try_collect()
            .await
            .map_err(|err| storage_error("list tags", err))?;
        let mut names: Vec<TagName> = metas
            .iter()
            .filter_map(|m| self.layout.tag_name_of(&m.location))
            .collect();
        names.sort();
        Ok(futures::stream::iter(names)
            .map(|name| async move {
                let tag = self.tag(&name).await;
                (name, tag)
            })
            .buffered(CATALOG_READS)
            .collect()
            .await)
    }

    /// Stores a WAL segment under its descriptive key and returns the description.
    /// Idempotent: storing the same segment again leaves the first copy.
    pub async fn put_wal_segment(
        &self,
        segment: &Segment,
        compression: codec::Compression,
    ) -> Result<SegmentInfo> {
        let (info, encoded) = encode_wal_segment(segment, compression, &self.seal).await?;
        self.put_wal_stored(&info, encoded.to_vec()).await?;
        Ok(info)
    }

    /// Stores an already encoded segment (as `encode_wal_segment` made it) under its key;
    /// an existing copy is left as it is.
    pub async fn put_wal_stored(&self, info: &SegmentInfo, stored: Vec<u8>) -> Result<()> {
        let key = self.layout.wal_segment(info);
        self.create_dirs_durably(&key).await?;
        let payload = PutPayload::from(Bytes::from(stored));
        self.put_once(&key, payload, "WAL segment").await?;
        if info.is_marked() {
            // Only ever a place to start listing: a lost mark makes a listing longer.
            let mark = self.layout.wal_mark(info);
            if let Err(err) = self.store.put(&mark, PutPayload::new()).await {
                tracing::warn!(key = %mark, error = %err, "could not mark a WAL segment");
            }
        }
        Ok(())
    }

    /// The stored bytes of a segment, unchecked (`decode_wal_segment` checks them).
    pub async fn get_wal_stored(&self, info: &SegmentInfo) -> Result<Vec<u8>> {
        let bound = (
            codec::max_stored_len(MAX_SEGMENT_BYTES),
            ErrorCode::BackupWalArchiveFailed,
        );
        let key = self.layout.wal_segment(info);
        if let Some(stored) = self.get_raw(&key, bound).await? {
            return Ok(stored.to_vec());
        }
        let stored = self
            .get_raw(&self.layout.wal_flat_segment(info), bound)
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::BackupWalGap,
                    format!("WAL segment {key} is missing"),
                )
            })?;
        Ok(stored.to_vec())
    }

    /// Stores a WAL segment as a content-addressed object, for an incremental or differential
    /// backup's shard manifest.
    pub async fn put_wal_piece(
        &self,
        segment: &Segment,
        compression: codec::Compression,
    ) -> Result<WalPiece> {
        let (info, encoded) = encode_wal_segment(segment, compression, &self.seal).await?;
        let (id, len) = (encoded.id, encoded.plaintext_len);
        let (copy, stored_len) = self.put_object(encoded).await?;
        let chunk = Chunk {
            id,
            copy,
            len,
            stored_len,
        };
        Ok(WalPiece {
            first: info.first,
            last: info.last,
            hlc_min: info.hlc_min,
            hlc_max: info.hlc_max,
            chunk,
        })
    }

    /// Downloads one WAL piece of `shard`'s backup and checks it holds what the manifest says.
    pub async fn get_wal_piece(&self, shard: &ShardId, piece: &WalPiece) -> Result<Segment> {
        let what = format!(
            "WAL piece {}..={} of shard {shard}",
            piece.first, piece.last
        );
        let plaintext = self.get_object(&piece.chunk).await?;
        let segment = Segment::decode(&what, &plaintext)?;
        let info = segment.info(piece.chunk.id);
        let matches = info.as_ref().is_some_and(|i| {
            &i.shard_id == shard && i.first == piece.first && i.last == piece.last
        });
        if !matches {
            return Err(Error::new(
                ErrorCode::BackupManifestCorrupt,
                format!("{what} does not hold what the manifest says"),
            ));
        }
        Ok(segment)
    }

    /// The lineages with WAL segments of `shard`, by timeline.
    pub async fn wal_lineages(&self, shard: &ShardId) -> Result<Vec<Lineage>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.layout.wal_shard_dir(shard)))
            .await
            .map_err(|err| storage_error(format!("list WAL lineages of {shard}"), err))?;
        let mut lineages: Vec<Lineage> = listing
            .common_prefixes
            .iter()
            .filter_map(|dir| self.layout.lineage_of(dir))
            .collect();
        lineages.sort_by_key(|l| (l.timeline, l.id));
        Ok(lineages)
    }

    /// The WAL segments of `shard` on `lineage`, in sequence order. Keys that are not
    /// segments are ignored; continuity is the caller's to check (`wal::check_segments`).
    pub async fn wal_segments(
        &self,
        shard: &ShardId,
        lineage: &Lineage,
    ) -> Result<Vec<SegmentInfo>> {
        let mut segments = self
            .wal_listing(shard, lineage, None, Seq::MAX, usize::MAX)
            .await?;
        segments.sort_by_key(|s| (s.first, s.last));
        Ok(segments)
    }

    /// A page of `shard`'s `lineage`: the segments named after where `start` says whose
    /// first write is at most `up_to`, in name order (which is sequence order), at most
    /// `limit` of them; the listing stops where the page or the range does.
    pub async fn wal_segment_page(
        &self,
        shard: &ShardId,
        lineage: &Lineage,
        start: &PageStart,
        up_to: Seq,
        limit: usize,
    ) -> Result<SegmentPage> {
        let after = match start {
            PageStart::Beginning => None,
            PageStart::After(name) => Some(SegmentInfo::parse(shard, lineage, name).ok_or_else(
                || {
                    Error::new(
                        ErrorCode::InvalidArgument,
                        format!("{name:?} is not a WAL segment name: a page starts after the last name of the page before"),
                    )
                },
            )?),
            PageStart::AfterMarkFor(seq) => self.wal_mark_before(shard, lineage, *seq).await?,
        };
        let limit = limit.clamp(1, usize::MAX - 1);
        // One more than the page: it only says that more follow.
        let mut segments = self
            .wal_listing(shard, lineage, after.as_ref(), up_to, limit + 1)
            .await?;
        let more = segments.len() > limit;
        segments.truncate(limit);
        Ok(SegmentPage {
            segments,
            more,
            began_after: after.map(|a| a.file_name()),
        })
    }

    /// The marked segment of `shard`'s `lineage` that starts furthest along while ending at
    /// or before `seq`, if any: every segment that holds a write after `seq` is named after
    /// it unless it overlaps it (a leftover of a retried put), so a listing of what follows
    /// `seq` can start after it. About one segment in 1,024 is marked
    /// (`SegmentInfo::is_marked`); the marks' directories are read back from `seq`'s to the
    /// first that holds one.
    pub async fn wal_mark_before(
        &self,
        shard: &ShardId,
        lineage: &Lineage,
        seq: Seq,
    ) -> Result<Option<SegmentInfo>> {
        let dir = self.layout.wal_marks_dir(shard, lineage);
        self.wal_last_in(&dir, shard, lineage, seq, |marks| {
            marks
                .into_iter()
                .filter(|m| m.last <= seq)
                .max_by_key(|m| (m.first, m.last))
        })
        .await
    }

    /// What `pick` chooses among the segments (or marks) under `dir` whose first write is at
    /// most `up_to`: read from the last directory at or before `up_to` at each level
    /// (`layout::WAL_DIRS`) back to the first where `pick` chooses one, with those stored
    /// flat (before directories) added. `pick` must choose the same from any set that holds
    /// its choice, and what it chooses in a later directory must beat anything earlier.
    async fn wal_last_in(
        &self,
        dir: &Path,
        shard: &ShardId,
        lineage: &Lineage,
        up_to: Seq,
        pick: impl Fn(Vec<SegmentInfo>) -> Option<SegmentInfo>,
    ) -> Result<Option<SegmentInfo>> {
        let failed = |err| storage_error(format!("list the WAL archive of {shard}"), err);
        let bound = format!("{:020}", up_to.0);
        let segments_in = |metas: &[object_store::ObjectMeta], flat: bool| {
            wal_names(&self.layout, dir, metas, flat)
                .filter_map(|name| SegmentInfo::parse(shard, lineage, name))
                .filter(|info| info.first <= up_to)
                .collect::<Vec<_>>()
        };
        let top = self
            .store
            .list_with_delimiter(Some(dir))
            .await
            .map_err(failed)?;
        let mut found: Vec<SegmentInfo> =
            pick(segments_in(&top.objects, true)).into_iter().collect();
        // The directories still to read, the last one last.
        let mut stack = wal_subdirs(&top.common_prefixes, "");
        stack.retain(|(_, digits)| wal_dir_in_range(digits, None, &bound));
        while let Some((path, digits)) = stack.pop() {
            let listing = self
                .store
                .list_with_delimiter(Some(&path))
                .await
                .map_err(failed)?;
            if let Some(last) = pick(segments_in(&listing.objects, false)) {
                found.push(last);
                break;
            }
            let mut children = wal_subdirs(&listing.common_prefixes, &digits);
            children.retain(|(_, digits)| wal_dir_in_range(digits, None, &bound));
            stack.extend(children);
        }
        Ok(pick(found))
    }

    /// The first `keep` segments of `shard`'s `lineage`, in name order and each once, of
    /// those named after `after` (all without it) whose first write is at most `up_to`.
    ///
    /// Keys sort as names do (`layout::WAL_DIRS`), so an object store that lists in name
    /// order lists from `after`'s key and stops at the first segment past the range or the
    /// page; anywhere else (a local directory is read in no order) the directories are
    /// walked in name order, skipping those wholly before `after` or past `up_to`, until the
    /// page is full. Segments stored flat, before directories, are read from the lineage's
    /// own directory (one listing that also names the first level) and merged in.
    async fn wal_listing(
        &self,
        shard: &ShardId,
        lineage: &Lineage,
        after: Option<&SegmentInfo>,
        up_to: Seq,
        keep: usize,
    ) -> Result<Vec<SegmentInfo>> {
        let failed = |err| storage_error(format!("list WAL segments of {shard}"), err);
        let dir = self.layout.wal_lineage_dir(shard, lineage);
        let after_name = after.map(SegmentInfo::file_name);
        let wanted = |name: &str| {
            SegmentInfo::parse(shard, lineage, name).filter(|info| {
                info.first <= up_to && after_name.as_deref().is_none_or(|after| name > after)
            })
        };
        let top = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(failed)?;
        let mut found: Vec<SegmentInfo> = wal_names(&self.layout, &dir, &top.objects, true)
            .filter_map(wanted)
            .collect();
        let mut placed = Vec::new();
        if self.lists_in_order {
            let mut listing = match after {
                Some(after) => self
                    .store
                    .list_with_offset(Some(&dir), &self.layout.wal_segment(after)),
                None => self.store.list(Some(&dir)),
            };
            while placed.len() < keep
                && let Some(meta) = listing.try_next().await.map_err(failed)?
            {
                let WalPlace::InDirectory(name) = self.layout.wal_place_of(&dir, &meta.location)
                else {
                    continue;
                };
                match SegmentInfo::parse(shard, lineage, name) {
                    Some(info) if info.first > up_to => break,
                    Some(_) => placed.extend(wanted(name)),
                    None => {}
                }
            }
        } else {
            let bound = format!("{:020}", up_to.0);
            // The directories still to read, the next one last.
            let mut stack = wal_subdirs(&top.common_prefixes, "");
            stack.retain(|(_, digits)| wal_dir_in_range(digits, after_name.as_deref(), &bound));
            stack.reverse();
            while placed.len() < keep
                && let Some((path, digits)) = stack.pop()
            {
                let listing = self
                    .store
                    .list_with_delimiter(Some(&path))
                    .await
                    .map_err(failed)?;
                let mut children = wal_subdirs(&listing.common_prefixes, &digits);
                children
                    .retain(|(_, digits)| wal_dir_in_range(digits, after_name.as_deref(), &bound));
                stack.extend(children.into_iter().rev());
                let mut leaf: Vec<SegmentInfo> =
                    wal_names(&self.layout, &dir, &listing.objects, false)
                        .filter_map(wanted)
                        .collect();
                leaf.sort_by_cached_key(SegmentInfo::file_name);
                placed.extend(leaf);
            }
        }
        found.extend(placed);
        found.sort_by_cached_key(SegmentInfo::file_name);
        found.dedup();
        found.truncate(keep);
        Ok(found)
    }

    /// The segment of `shard` on `lineage` that reaches furthest, if any.
    ///
    /// It reads the last directory at each level (`layout::WAL_DIRS`) down to the last that
    /// holds a segment, so finding the end costs the same at a million segments as at ten.
    /// A segment that starts in an earlier directory and reaches past all of these (a
    /// leftover of a retried put that an object store applied late) is missed: the end found
    /// is behind the furthest write, never past it, so a resume from it re-ships writes and
    /// never leaves a hole.
    pub async fn wal_end(&self, shard: &ShardId, lineage: &Lineage) -> Result<Option<SegmentInfo>> {
        let dir = self.layout.wal_lineage_dir(shard, lineage);
        self.wal_last_in(&dir, shard, lineage, Seq::MAX, |segments| {
            crate::wal::furthest(&segments).cloned()
        })
        .await
    }

    /// When a full verify last checked each object (empty before the first).
    pub async fn verified_objects(&self) -> Result<crate::verify::Verified> {
        let key = self.layout.verified();
        let bound = (MAX_VERIFIED_RECORD_BYTES, ErrorCode::BackupManifestCorrupt);
        match self.get_record(&key, bound).await? {
            None => Ok(Default::default()),
            Some(bytes) => crate::verify::decode_verified(&format!("verify record {key}"), &bytes),
        }
    }

    pub async fn put_verified_objects(&self, record: &crate::verify::Verified) -> Result<()> {
        let bytes = crate::verify::encode_verified(record);
        self.put_durable(&self.layout.verified(), bytes, "verify record")
            .await
    }

    /// When the schedule `name` last fired, as `put_schedule_fired` recorded it.
    pub async fn schedule_last_fired(
        &self,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        let key = self.layout.schedule(name);
        let Some(bytes) = self.get_record(&key, MANIFEST).await? else {
            return Ok(None);
        };
        let record: ScheduleRecord = serde_json::from_slice(&bytes).map_err(|err| {
            Error::with_source(
                ErrorCode::BackupManifestCorrupt,
                format!("schedule record {key} does not parse"),
                err,
            )
        })?;
        Ok(Some(record.last_fired))
    }

    /// Records that the schedule `name` fired at `at` (its firing time), durably.
    pub async fn put_schedule_fired(
        &self,
        name: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        let json = serde_json::to_vec(&ScheduleRecord { last_fired: at }).map_err(|err| {
            Error::with_source(ErrorCode::InvalidArgument, "encode a schedule record", err)
        })?;
        self.put_durable(&self.layout.schedule(name), json, "schedule record")
            .await
    }

    /// Whether exactly this segment (its name: range, times and SHA-256) is stored.
    pub async fn has_wal_segment(&self, info: &SegmentInfo) -> Result<bool> {
        for key in [
            self.layout.wal_segment(info),
            self.layout.wal_flat_segment(info),
        ] {
            match self.store.head(&key).await {
                Ok(_) => return Ok(true),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(err) => {
                    return Err(storage_error(format!("look up WAL segment {key}"), err));
                }
            }
        }
        Ok(false)
    }

    /// Deletes WAL segments and their marks (any already gone counts as deleted), wherever
    /// they are stored (`Layout::wal_flat_segment`).
    pub async fn delete_wal_segments(&self, segments: &[SegmentInfo]) -> Result<()> {
        let keys: Vec<Path> = segments
            .iter()
            .flat_map(|s| [self.layout.wal_segment(s), self.layout.wal_flat_segment(s)])
            .collect();
        self.delete_keys(&keys).await?;
        let marks: Vec<Path> = segments
            .iter()
            .filter(|s| s.is_marked())
            .flat_map(|s| [self.layout.wal_mark(s), self.layout.wal_flat_mark(s)])
            .collect();
        self.delete_keys(&marks).await
    }

    /// Downloads a WAL segment, checks its SHA-256 and that it holds what its key says.
    pub async fn get_wal_segment(&self, info: &SegmentInfo) -> Result<Segment> {
        let stored = self.get_wal_stored(info).await?;
        decode_wal_segment(info, stored, &self.seal).await
    }
}

/// The names of the segments (or marks) among `metas`, listed under `dir`, that are stored
/// flat (`flat`, as before directories) or in their directories (`layout::WAL_DIRS`).
fn wal_names<'a>(
    layout: &'a Layout,
    dir: &'a Path,
    metas: &'a [object_store::ObjectMeta],
    flat: bool,
) -> impl Iterator<Item = &'a str> {
    metas
        .iter()
        .filter_map(move |meta| match layout.wal_place_of(dir, &meta.location) {
            WalPlace::Flat(name) if flat => Some(name),
            WalPlace::InDirectory(name) if !flat => Some(name),
            _ => None,
        })
}

/// The segment directories among `prefixes`, one level under the directory of the name
/// digits `digits` (`layout::WAL_DIRS`), each with its digits, in name order; none under a
/// last level.
fn wal_subdirs(prefixes: &[Path], digits: &str) -> Vec<(Path, String)> {
    let Some(level) = WAL_DIRS.iter().find(|d| d.start == digits.len()) else {
        return Vec::new();
    };
    let mut dirs: Vec<(Path, String)> = prefixes
        .iter()
        .filter_map(|dir| {
            let part = dir.filename()?;
            (part.len() == level.len() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| (dir.clone(), format!("{digits}{part}")))
        })
        .collect();
    dirs.sort_by(|a, b| a.1.cmp(&b.1));
    dirs
}

/// Whether the directory of the name digits `digits` can hold a segment named after
/// `after` whose first write is at most `bound` (zero-padded as names are).
fn wal_dir_in_range(digits: &str, after: Option<&str>, bound: &str) -> bool {
    let n = digits.len();
    let before = after.is_some_and(|after| digits < &after[..n.min(after.len())]);
    !before && digits <= &bound[..n.min(bound.len())]
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};

    use super::*;
    use crate::manifest::BackupKind;

    async fn commit(repo: &Repository, id: &str, started_ago: Duration) -> BackupManifest {
        let mut manifest = BackupManifest::commit(
            BackupId::new(id).expect("id"),
            BackupKind::Full,
            None,
            Utc::now() - started_ago,
            &[],
        );
        manifest.started_at = Utc::now() - started_ago;
        repo.commit_backup(manifest).await.expect("commit")
    }

    #[tokio::test]
    async fn an_object_removed_after_a_backup_found_it_fails_that_publish_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let writer = Repository::open(&url).await.expect("repo");
        let (reused, looked_up) = (b"reused".as_slice(), b"looked up".as_slice());
        for plaintext in [reused, looked_up] {
            let encoded = codec::encode(
                plaintext,
                codec::Compression::default(),
                &crate::seal::Seal::Plain,
            )
            .expect("encode");
            writer.put_object(encoded).await.expect("put");
        }
        writer.sync_objects().await.expect("sync");
        let file = |plaintext: &[u8]| {
            dir.path()
                .join(writer.layout.object(&ObjectId::of(plaintext), 0).as_ref())
        };

        // A verify's look-up queues nothing: the object going afterwards fails no publish.
        let verify = Repository::open(&url).await.expect("repo");
        let found = verify.object_size(&ObjectId::of(looked_up), 0).await;
        assert!(found.expect("head").is_some());
        std::fs::remove_file(file(looked_up)).expect("remove");
        verify
            .sync_objects()
            .await
            .expect("nothing queued by a look-up");
        // A backup's reuse does.
        let backup = Repository::open(&url).await.expect("repo");
        let found = backup.reuse_object(&ObjectId::of(reused)).await;
        assert!(found.expect("head").1.is_some());
        std::fs::remove_file(file(reused)).expect("remove");
        let err = backup
            .sync_objects()
            .await
            .expect_err("the reused object is gone");
        assert_eq!(err.code, ErrorCode::BackupIncomplete, "{err}");
        assert!(
            err.message.contains("removed after this backup found it"),
            "{err}"
        );
        // The next publish is not held hostage by it.
        backup.sync_objects().await.expect("nothing left to sync");
    }

    #[tokio::test]
    async fn staging_files_a_crash_left_are_removed_once_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::open(&format!("file://{}", dir.path().display()))
            .await
            .expect("repo");
        let objects = dir.path().join("objects").join("ab");
        std::fs::create_dir_all(&objects).expect("mkdir");
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for (name, old) in [
            ("abcd#1", true),
            ("abcd#2", false),
            ("abcd", true),
            ("x#y", true),
        ] {
            let file = std::fs::File::create(objects.join(name)).expect("create");
            if old {
                file.set_modified(hour_ago).expect("age it");
            }
        }
        let swept = repo
            .remove_staging_leftovers(std::time::Duration::from_secs(1800))
            .await
            .expect("sweep");
        assert_eq!(swept.0, 1);
        let left: std::collections::BTreeSet<String> = std::fs::read_dir(&objects)
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        let expected: std::collections::BTreeSet<String> = ["abcd#2", "abcd", "x#y"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(left, expected, "a fresh staging file and real keys stay");
    }

    #[tokio::test]
    async fn each_coordinator_start_takes_the_next_epoch_and_fences_the_older_ones() {
        let repo = Repository::open("memory://epochs").await.expect("repo");
        let first = repo.take_epoch("first").await.expect("take");
        assert!(!repo.epoch_superseded(first).await.expect("check"));
        let second = repo.take_epoch("second").await.expect("take");
        assert_eq!(second, first + 1);
        assert!(repo.epoch_superseded(first).await.expect("check"));
        assert!(!repo.epoch_superseded(second).await.expect("check"));
        // However many coordinators started since, the first stays fenced.
        for n in 0..10 {
            repo.take_epoch(&format!("n{n}")).await.expect("take");
        }
        assert!(repo.epoch_superseded(first).await.expect("check"));
        assert!(repo.epoch_superseded(second).await.expect("check"));
    }

    #[tokio::test]
    async fn a_repository_belongs_to_the_cluster_that_first_claimed_it() {
        let repo = Repository::open("memory://identity").await.expect("repo");
        let claimed = repo.claim("eu-prod").await.expect("claim");
        let again = repo.claim("eu-prod").await.expect("the same cluster");
        assert_eq!(claimed, again, "read back, not rewritten");
        let err = repo.claim("us-prod").await.expect_err("another cluster");
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(
            err.message.contains("belongs to cluster \"eu-prod\""),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_first_decision_of_a_restore_holds_for_everyone() {
        for url in ["memory://decisions", "file://"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = if url == "file://" {
                format!("file://{}", dir.path().display())
            } else {
                url.to_string()
            };
            let repo = Repository::open(&url).await.expect("repo");
            let restore = RestoreId::new("rs-1").expect("id");
            repo.put_running_restore(&restore, b"{}".to_vec())
                .await
                .expect("record");
            assert_eq!(repo.restore_decision(&restore).await.expect("read"), None);
            let first = repo
                .decide_restore(&restore, RestoreDecision::Revert, "agent shard-1")
                .await
                .expect("decide");
            assert_eq!(first, RestoreDecision::Revert);
            // The coordinator, later, wanted to commit: it learns the restore reverts.
            let second = repo
                .decide_restore(&restore, RestoreDecision::Commit, "coordinator")
                .await
                .expect("decide");
            assert_eq!(second, RestoreDecision::Revert, "{url}");
            assert_eq!(
                repo.running_restore_ids().await.expect("list"),
                vec![restore.clone()],
                "a decision is not a record"
            );
            repo.delete_running_restore(&restore).await.expect("delete");
            assert!(repo.running_restore_ids().await.expect("list").is_empty());
            assert_eq!(
                repo.restore_decision(&restore).await.expect("read"),
                Some(RestoreDecision::Revert),
                "the decision outlives the record"
            );
        }
    }

    #[tokio::test]
    async fn latest_is_the_last_committed_even_after_the_clock_stepped_back() {
        let repo = Repository::open("memory://latest-order")
            .await
            .expect("repo");
        let first = commit(&repo, "bk-20261206-120000000-aaaa", Duration::zero()).await;
        // The coordinator's clock stepped back an hour: the next id and start time are older.
        let second = commit(&repo, "bk-20261206-110000000-bbbb", Duration::hours(1)).await;
        assert_eq!((first.commit_seq, second.commit_seq), (1, 2));
        assert_eq!(
            repo.latest_backup().await.ok(),
            Some(second.backup_id.clone())
        );
        let order: Vec<BackupId> = repo
            .backups()
            .await
            .expect("backups")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(order, vec![first.backup_id, second.backup_id]);
    }

    #[tokio::test]
    async fn a_corrupt_manifest_is_skipped_for_latest_and_deletable_by_name() {
        let repo = Repository::open("memory://corrupt-skip")
            .await
            .expect("repo");
        let good = commit(&repo, "bk-1", Duration::zero()).await;
        let bad = BackupId::new("bk-2").expect("id");
        repo.put_manifest(&repo.layout.backup_manifest(&bad), b"{ not json".to_vec())
            .await
            .expect("put");
        assert_eq!(
            repo.latest_backup().await.ok(),
            Some(good.backup_id.clone())
        );
        let next = commit(&repo, "bk-3", Duration::zero()).await;
        assert_eq!(next.commit_seq, 2);
        repo.delete_backup(&bad, &[])
            .await
            .expect("delete the corrupt one");
        assert_eq!(
            repo.backup_ids().await.expect("ids"),
            vec![good.backup_id, next.backup_id]
        );
    }

    #[tokio::test]
    async fn segments_in_directories_list_in_order_from_anywhere_and_the_end_is_the_last_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Both ways of listing: an object store's (in name order) and a directory walk.
        for url in [
            "memory://wal-dirs".to_string(),
            format!("file://{}", dir.path().display()),
        ] {
            let repo = Repository::open(&url).await.expect("repo");
            let (shard, lineage) = (ShardId::new("shard-0").expect("shard"), Lineage::root());
            // Firsts in every level's directories, several sharing one.
            let firsts = [
                1,
                2,
                999,
                1_000,
                1_000_000,
                999_999_999,
                1_000_000_000,
                1_000_000_500,
                5_000_000_000_123,
            ];
            let mut infos = Vec::new();
            for n in firsts {
                infos.push(put_segment(&repo, &shard, lineage, n, 1, false).await);
            }
            let key = repo.layout.wal_segment(&infos[6]);
            assert!(
                key.as_ref()
                    .ends_with(&format!("/00000000001/000/000/{}", infos[6].file_name())),
                "{key}"
            );
            assert_eq!(
                repo.wal_segments(&shard, &lineage).await.expect("list"),
                infos
            );
            assert_eq!(
                repo.wal_end(&shard, &lineage).await.expect("end").as_ref(),
                infos.last()
            );
            // Pages of two, each after the last name of the one before, within a range.
            let up_to = Seq(1_000_000_000);
            let (mut paged, mut start) = (Vec::new(), PageStart::Beginning);
            loop {
                let page = repo
                    .wal_segment_page(&shard, &lineage, &start, up_to, 2)
                    .await
                    .expect("page");
                assert!(page.segments.len() <= 2);
                paged.extend(page.segments);
                if !page.more {
                    break;
                }
                start = PageStart::After(paged.last().expect("a page").file_name());
            }
            assert_eq!(paged, infos[..7], "{url}");
            let bad = PageStart::After("00000000000000000001".to_string());
            let err = repo
                .wal_segment_page(&shard, &lineage, &bad, Seq::MAX, 2)
                .await
                .expect_err("not a name");
            assert_eq!(err.code, ErrorCode::InvalidArgument);

            // A segment stored flat, as before directories: listed, read, found, deleted.
            let flat = put_segment(&repo, &shard, lineage, 1_000_001, 1, false).await;
            let bytes = repo.get_wal_stored(&flat).await.expect("stored");
            repo.store
                .put(&repo.layout.wal_flat_segment(&flat), bytes.into())
                .await
                .expect("plant");
            repo.store
                .delete(&repo.layout.wal_segment(&flat))
                .await
                .expect("move");
            let mut with_flat = infos.clone();
            with_flat.insert(5, flat.clone());
            assert_eq!(
                repo.wal_segments(&shard, &lineage).await.expect("list"),
                with_flat
            );
            let page = repo
                .wal_segment_page(
                    &shard,
                    &lineage,
                    &PageStart::After(infos[4].file_name()),
                    Seq::MAX,
                    2,
                )
                .await
                .expect("page");
            assert_eq!(page.segments, [flat.clone(), infos[5].clone()]);
            assert!(repo.has_wal_segment(&flat).await.expect("head"));
            repo.get_wal_segment(&flat).await.expect("read");
            repo.delete_wal_segments(std::slice::from_ref(&flat))
                .await
                .expect("delete");
            assert!(!repo.has_wal_segment(&flat).await.expect("head"));
            assert_eq!(
                repo.wal_segments(&shard, &lineage).await.expect("list"),
                infos
            );

            // The last directories emptied (a local one goes with its last segment): the end
            // moves back.
            repo.delete_wal_segments(&infos[7..]).await.expect("delete");
            assert_eq!(
                repo.wal_end(&shard, &lineage).await.expect("end").as_ref(),
                infos.get(6)
            );
            if url.starts_with("file://") {
                // Later directories with nothing that is a segment are passed over.
                let lineage_dir = dir
                    .path()
                    .join(repo.layout.wal_lineage_dir(&shard, &lineage).as_ref());
                std::fs::create_dir_all(lineage_dir.join("00000000003/000/000")).expect("mkdir");
                let junk = lineage_dir.join("00000000002/000/000");
                std::fs::create_dir_all(&junk).expect("mkdir");
                std::fs::write(junk.join("notes.txt"), b"x").expect("junk");
                assert_eq!(
                    repo.wal_end(&shard, &lineage).await.expect("end").as_ref(),
                    infos.get(6)
                );
                assert_eq!(
                    repo.wal_segments(&shard, &lineage).await.expect("list"),
                    infos[..7]
                );
            }
            // A leftover starting in an earlier directory and reaching past the end is not
            // seen there: the end found is behind the furthest write, never past it.
            let straddling = put_segment(&repo, &shard, lineage, 999_999_990, 100, false).await;
            assert_eq!(
                repo.wal_end(&shard, &lineage).await.expect("end").as_ref(),
                infos.get(6)
            );
            let all = repo.wal_segments(&shard, &lineage).await.expect("list");
            assert_eq!(crate::wal::furthest(&all), Some(&straddling));

            // Marks: in directories, and flat as before them; deleted with their segment.
            let marked = put_segment(&repo, &shard, lineage, 3_000_000_000, 1, true).await;
            let mark_before = |seq| repo.wal_mark_before(&shard, &lineage, Seq(seq));
            assert_eq!(
                mark_before(3_000_000_000).await.expect("mark"),
                Some(marked.clone())
            );
            assert_eq!(mark_before(2_999_999_999).await.expect("mark"), None);
            repo.store
                .put(&repo.layout.wal_flat_mark(&marked), PutPayload::new())
                .await
                .expect("plant");
            repo.store
                .delete(&repo.layout.wal_mark(&marked))
                .await
                .expect("move");
            assert_eq!(
                mark_before(u64::MAX >> 1).await.expect("mark"),
                Some(marked.clone())
            );
            repo.delete_wal_segments(std::slice::from_ref(&marked))
                .await
                .expect("delete");
            assert_eq!(mark_before(u64::MAX >> 1).await.expect("mark"), None);
        }
    }

    /// Puts the segment of write `n` (and, with `count`, the writes after it) on `lineage`,
    /// marked or not as asked (its payload varies until its SHA-256 says so).
    async fn put_segment(
        repo: &Repository,
        shard: &ShardId,
        lineage: Lineage,
        n: u64,
        count: u64,
        marked: bool,
    ) -> SegmentInfo {
        for nonce in 0u32.. {
            let segment = crate::wal::Segment {
                shard_id: shard.clone(),
                lineage,
                batches: vec![crate::wal::WalBatch {
                    first: Seq(n),
                    count,
                    hlc: crate::HlcTime(n),
                    data: nonce.to_le_bytes().to_vec(),
                }],
            };
            let (info, _) = encode_wal_segment(&segment, codec::Compression::default(), &repo.seal)
                .await
                .expect("encode");
            if info.is_marked() == marked {
                return repo
                    .put_wal_segment(&segment, codec::Compression::default())
                    .await
                    .expect("segment");
            }
        }
        unreachable!()
    }

    #[tokio::test]
    async fn a_listing_from_a_mark_reads_what_follows_it_and_a_hidden_segment_makes_it_list_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        for url in [
            "memory://wal-marks".to_string(),
            format!("file://{}", dir.path().display()),
        ] {
            let repo = Repository::open(&url).await.expect("repo");
            let archive = crate::archive::WalArchive::Store(repo.clone());
            let (shard, lineage) = (ShardId::new("shard-0").expect("shard"), Lineage::root());
            let mut infos = Vec::new();
            for n in 1..=300 {
                infos.push(put_segment(&repo, &shard, lineage, n, 1, n == 100 || n == 200).await);
            }
            let mark = |seq| repo.wal_mark_before(&shard, &lineage, Seq(seq));
            assert_eq!(mark(250).await.expect("mark").as_ref(), Some(&infos[199]));
            assert_eq!(mark(199).await.expect("mark").as_ref(), Some(&infos[99]));
            assert_eq!(mark(99).await.expect("mark"), None, "{url}");

            // A page from the mark holds what follows it, in order, up to `up_to`.
            let page = |start: PageStart, up_to, limit| {
                let (repo, shard) = (&repo, &shard);
                async move {
                    repo.wal_segment_page(shard, &lineage, &start, Seq(up_to), limit)
                        .await
                }
            };
            let from_mark = page(PageStart::AfterMarkFor(Seq(250)), 280, usize::MAX)
                .await
                .expect("page");
            assert_eq!(from_mark.began_after, Some(infos[199].file_name()));
            assert_eq!(from_mark.segments, infos[200..280].to_vec(), "{url}");
            assert!(!from_mark.more);
            // Pages of 7 from the start, each after the last one of the one before.
            let (mut all, mut start) = (Vec::new(), PageStart::Beginning);
            loop {
                let next = page(start, u64::MAX, 7).await.expect("page");
                assert!(next.segments.len() <= 7);
                all.extend(next.segments);
                if !next.more {
                    break;
                }
                start = PageStart::After(all.last().expect("a page").file_name());
            }
            assert_eq!(all, infos, "{url}");

            // A replay from 250 reads only what follows the mark.
            let after = |seq, up_to| archive.segments_after(&shard, &lineage, Seq(seq), Seq(up_to));
            assert_eq!(after(250, 300).await.expect("list"), infos[250..].to_vec());
            assert_eq!(after(0, 20).await.expect("list"), infos[..20].to_vec());

            // A leftover of a retried put starting before the mark, and the segments after
            // the mark it overlaps gone: only a whole listing finds what 251..=260 are in.
            let leftover = put_segment(&repo, &shard, lineage, 150, 111, false).await;
            repo.delete_wal_segments(&infos[200..260])
                .await
                .expect("delete");
            let found = after(250, 300).await.expect("list");
            assert_eq!(found.first(), Some(&leftover), "{url}");
            crate::wal::segments_covering(found, Seq(250), Seq(300), "the test")
                .expect("covered by the leftover and what follows");

            // A mark goes with its segment.
            repo.delete_wal_segments(&infos[199..200])
                .await
                .expect("delete");
            assert_eq!(mark(250).await.expect("mark").as_ref(), Some(&infos[99]));
            assert!(
                repo.store
                    .head(&repo.layout.wal_mark(&infos[199]))
                    .await
                    .is_err()
            );
        }
    }

    /// A remote archive whose pages hold at most 7 names (`WalArchive` asks for the rest),
    /// recording where each page it was asked for starts.
    struct SmallPages(Repository, std::sync::Mutex<Vec<PageStart>>);

    impl crate::archive::RemoteWal for SmallPages {
        fn lineages<'a>(
            &'a self,
            shard: &'a ShardId,
        ) -> futures::future::BoxFuture<'a, Result<Vec<Lineage>>> {
            Box::pin(self.0.wal_lineages(shard))
        }
        fn segment_page<'a>(
            &'a self,
            shard: &'a ShardId,
            lineage: &'a Lineage,
            start: &'a PageStart,
            up_to: Seq,
        ) -> futures::future::BoxFuture<'a, Result<SegmentPage>> {
            self.1.lock().expect("starts").push(start.clone());
            Box::pin(self.0.wal_segment_page(shard, lineage, start, up_to, 7))
        }
        fn last_segment_name<'a>(
            &'a self,
            shard: &'a ShardId,
            lineage: &'a Lineage,
        ) -> futures::future::BoxFuture<'a, Result<Option<String>>> {
            Box::pin(async move {
                Ok(self
                    .0
                    .wal_end(shard, lineage)
                    .await?
                    .map(|end| end.file_name()))
            })
        }
        fn put<'a>(
            &'a self,
            info: &'a SegmentInfo,
            stored: Vec<u8>,
        ) -> futures::future::BoxFuture<'a, Result<()>> {
            Box::pin(self.0.put_wal_stored(info, stored))
        }
        fn get<'a>(
            &'a self,
            info: &'a SegmentInfo,
        ) -> futures::future::BoxFuture<'a, Result<Vec<u8>>> {
            Box::pin(self.0.get_wal_stored(info))
        }
        fn delete<'a>(
            &'a self,
            shard: &'a ShardId,
            lineage: &'a Lineage,
            names: Vec<String>,
        ) -> futures::future::BoxFuture<'a, Result<u64>> {
            Box::pin(async move {
                let doomed: Vec<SegmentInfo> = names
                    .iter()
                    .filter_map(|name| SegmentInfo::parse(shard, lineage, name))
                    .collect();
                self.0.delete_wal_segments(&doomed).await?;
                Ok(doomed.len() as u64)
            })
        }
    }

    #[tokio::test]
    async fn a_remote_archive_is_listed_page_by_page() {
        let repo = Repository::open("memory://wal-pages").await.expect("repo");
        let (shard, lineage) = (ShardId::new("shard-0").expect("shard"), Lineage::root());
        let mut infos = Vec::new();
        for n in 1..=60 {
            infos.push(put_segment(&repo, &shard, lineage, n, 1, n == 20).await);
        }
        let pages = Arc::new(SmallPages(repo.clone(), Default::default()));
        let remote = crate::archive::WalArchive::Remote {
            url: "lockstep://small-pages".into(),
            remote: pages.clone(),
            seal: Default::default(),
        };
        let starts = || std::mem::take(&mut *pages.1.lock().expect("starts"));
        assert_eq!(
            remote.wal_segments(&shard, &lineage).await.expect("list"),
            infos
        );
        assert_eq!(starts().len(), 9, "60 names in pages of 7");
        assert_eq!(
            remote
                .segments_after(&shard, &lineage, Seq(30), Seq(50))
                .await
                .expect("list"),
            infos[30..50].to_vec()
        );
        // From the mark (segment 20) on, page after page; never the whole lineage.
        let asked = starts();
        assert_eq!(asked[0], PageStart::AfterMarkFor(Seq(30)));
        assert_eq!(asked[1], PageStart::After(infos[26].file_name()));
        assert!(!asked.contains(&PageStart::Beginning), "{asked:?}");
        // Pruned through the remote, what is left lists the same.
        remote
            .delete_wal_segments(&infos[..5])
            .await
            .expect("delete");
        assert_eq!(
            remote.wal_segments(&shard, &lineage).await.expect("list"),
            infos[5..].to_vec()
        );
    }
}

#[cfg(test)]
mod encrypted {
    use super::*;
    use crate::manifest::BackupKind;
    use crate::seal::PASSPHRASE_FILE_ENV;
    use crate::wal::WalBatch;

    const SECRET: &[u8] = b"SECRET-VALUE-never-stored-in-plaintext";

    fn passphrase_file(
        dir: &std::path::Path,
        name: &str,
        passphrase: &str,
    ) -> Vec<(String, String)> {
        let path = dir.join(name);
        std::fs::write(&path, format!("{passphrase}\n")).expect("write passphrase");
        vec![(PASSPHRASE_FILE_ENV.to_string(), path.display().to_string())]
    }

    fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
                if entry.path().is_dir() {
                    dirs.push(entry.path());
                } else {
                    out.push(entry.path());
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn an_encrypted_repository_opens_only_with_a_slot_passphrase_and_holds_no_plaintext() {
        let secrets = tempfile::tempdir().expect("tempdir");
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let first = passphrase_file(secrets.path(), "first", "first passphrase");
        let second = passphrase_file(secrets.path(), "second", "second passphrase");

        let repo = Repository::open_with(&url, &first).await.expect("create");
        assert!(repo.seal().is_sealed());
        let plaintext = SECRET.repeat(100);
        let encoded =
            codec::encode(&plaintext, codec::Compression::default(), repo.seal()).expect("encode");
        let chunk = Chunk {
            id: encoded.id,
            copy: 0,
            len: plaintext.len() as u64,
            stored_len: encoded.stored_len(),
        };
        repo.put_object(encoded).await.expect("put");
        let segment = Segment {
            shard_id: ShardId::new("shard-0").expect("shard"),
            lineage: Lineage::root(),
            batches: vec![WalBatch {
                first: Seq(1),
                count: 1,
                hlc: crate::HlcTime(5),
                data: SECRET.to_vec(),
            }],
        };
        let info = repo
            .put_wal_segment(&segment, codec::Compression::default())
            .await
            .expect("segment");
        let backup = BackupId::new("b-secret").expect("id");
        let mut manifest = BackupManifest::commit(
            backup.clone(),
            BackupKind::Full,
            None,
            chrono::Utc::now(),
            &[],
        );
        manifest.tool_version = String::from_utf8(SECRET.to_vec()).expect("utf-8");
        repo.commit_backup(manifest).await.expect("commit");
        for file in files(dir.path()) {
            let bytes = std::fs::read(&file).expect("read");
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET),
                "{} holds plaintext",
                file.display()
            );
        }

        // Reopened with the passphrase, everything reads back.
        let reopened = Repository::open_with(&url, &first).await.expect("reopen");
        assert_eq!(
            reopened.get_object(&chunk).await.expect("object"),
            plaintext
        );
        assert_eq!(
            reopened.get_wal_segment(&info).await.expect("segment"),
            segment
        );
        let read = reopened.backup_manifest(&backup).await.expect("manifest");
        assert_eq!(read.tool_version.as_bytes(), SECRET);

        // Without it, or with another, nothing opens.
        let locked = Repository::open(&url).await.expect_err("no passphrase");
        assert_eq!(locked.code, ErrorCode::EncryptionKey, "{locked}");
        let wrong = Repository::open_with(&url, &second)
            .await
            .expect_err("wrong");
        assert_eq!(wrong.code, ErrorCode::EncryptionKey, "{wrong}");
        assert!(wrong.message.contains("wrong passphrase"), "{wrong}");

        // A copy of the keys (a WAL archive's), made while the first slot exists.
        let archive_dir = tempfile::tempdir().expect("tempdir");
        let archive_url = format!("file://{}", archive_dir.path().display());
        let archive = Repository::open_archive(&archive_url, reopened.seal())
            .await
            .expect("archive");
        assert_eq!(reopened.copy_keys_to(&archive).await.expect("copy"), 1);

        // Key slots: add the second, remove the first; the data stays readable.
        let first_slot = reopened.unlocked_keys().expect("keys").slot().to_string();
        let added = reopened
            .add_key(&Passphrase::new("second passphrase").expect("passphrase"))
            .await
            .expect("add");
        assert_eq!(reopened.key_slots().await.expect("slots").len(), 2);
        reopened.remove_key(&first_slot).await.expect("remove");
        let by_second = Repository::open_with(&url, &second).await.expect("second");
        assert_eq!(by_second.unlocked_keys().expect("keys").slot(), added.slot);
        assert_eq!(
            by_second.get_object(&chunk).await.expect("object"),
            plaintext
        );
        let gone = Repository::open_with(&url, &first)
            .await
            .expect_err("removed");
        assert_eq!(gone.code, ErrorCode::EncryptionKey);
        let last = by_second
            .remove_key(&added.slot)
            .await
            .expect_err("last slot");
        assert!(last.message.contains("last"), "{last}");
        // The copy follows: the removed slot leaves it, the added one joins it; a copy into
        // another repository's keys is refused.
        assert_eq!(by_second.copy_keys_to(&archive).await.expect("copy"), 1);
        let copied: Vec<String> = archive
            .key_slots()
            .await
            .expect("slots")
            .into_iter()
            .map(|s| s.slot)
            .collect();
        assert_eq!(copied, vec![added.slot.clone()]);
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other_url = format!("file://{}", other_dir.path().display());
        let other = Repository::open_with(&other_url, &first)
            .await
            .expect("other");
        let refused = by_second
            .copy_keys_to(&other)
            .await
            .expect_err("other keys");
        assert_eq!(refused.code, ErrorCode::EncryptionKey, "{refused}");

        // A flipped byte in the sealed manifest: refused as a checksum mismatch. A listing
        // reads the catalog index (sealed too), which holds the manifest as committed.
        let manifest_file = dir
            .path()
            .join(by_second.layout.backup_manifest(&backup).as_ref());
        let mut bytes = std::fs::read(&manifest_file).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&manifest_file, bytes).expect("write");
        let fresh = Repository::open_with(&url, &second).await.expect("open");
        let err = fresh.backup_manifest(&backup).await.expect_err("tampered");
        assert_eq!(err.code, ErrorCode::BackupChecksumMismatch, "{err}");
        let listed = fresh.backups().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert!(listed.iter().all(|(_, m)| m.is_ok()));
    }

    #[tokio::test]
    async fn a_passphrase_never_encrypts_a_repository_that_holds_plaintext_data() {
        let secrets = tempfile::tempdir().expect("tempdir");
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let plain = Repository::open(&url).await.expect("plain");
        let manifest = BackupManifest::commit(
            BackupId::new("b-plain").expect("id"),
            BackupKind::Full,
            None,
            chrono::Utc::now(),
            &[],
        );
        plain.commit_backup(manifest).await.expect("commit");
        let given = passphrase_file(secrets.path(), "p", "a passphrase");
        let err = Repository::open_with(&url, &given)
            .await
            .expect_err("refused");
        assert_eq!(err.code, ErrorCode::EncryptionKey, "{err}");
        assert!(err.message.contains("not encrypted"), "{err}");
        let marker = Repository::open(&url)
            .await
            .expect("still plain")
            .encryption_marker()
            .await
            .expect("marker")
            .expect("a new plaintext repository claims its mode");
        assert!(!marker.is_encrypted());
    }
}
