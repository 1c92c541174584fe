//! `lockstep backup export` and `lockstep backup import` on the coordinator (the file format:
//! `lockstep_repository::export`).
//!
//! An export lists the file's entries first (`EXPORT.json` leads the file), then reads them
//! from the repository one at a time (a tag's WAL from its archive) and hands each to a
//! blocking task that writes the file and streams it out chunk by chunk: memory holds a few
//! objects whatever the backup's size. An import reads the client's stream the same way:
//! objects and WAL segments are checked and stored as they come, avoiding what a GC sweep
//! condemned (it holds GC off like a running backup), and the manifests are published only
//! once the whole file checked and this coordinator still holds the repository.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use chrono::Utc;
use lockstep_proto::archive::open_archive;
use lockstep_proto::{to_status, v1};
use lockstep_repository::archive::WalArchive;
use lockstep_repository::export::{
    Entry, ExportManifest, ExportWriter, ExportedShard, FORMAT, FORMAT_VERSION, ImportReport,
    Importer, backup_entries, chain_of, read_export, sized,
};
use lockstep_repository::gc::Condemned;
use lockstep_repository::manifest::TOOL_VERSION;
use lockstep_repository::{BackupId, Error, ErrorCode, Result, TagName};
use tokio::sync::mpsc;
use tonic::Status;

use crate::ops::ClusterContext;
use crate::restore::{PointInTime, RestoreTarget};

/// Bytes of the file per streamed message.
const CHUNK: usize = 1 << 20;
/// Entries read ahead of the writer.
const READ_AHEAD: usize = 2;
/// How long an import waits for the client's next message.
const IMPORT_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// What one export writes: its manifest, and where a tag's WAL is read from.
pub struct Export {
    manifest: ExportManifest,
    archive: Option<WalArchive>,
}

impl Export {
    /// Plans the export of a backup (with its chain) or of a tag (with the backups and the
    /// WAL its restore needs, as `lockstep restore --tag` would plan it).
    pub async fn plan(ctx: &ClusterContext, request: &v1::ExportBackupRequest) -> Result<Export> {
        let key_id = match ctx.repo.encryption_marker().await? {
            Some(marker) if marker.is_encrypted() => marker.key_id,
            _ => String::new(),
        };
        let mut manifest = ExportManifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            created_at: Utc::now(),
            tool_version: TOOL_VERSION.into(),
            source: ctx.repo.url().to_string(),
            key_id,
            backup_id: BackupId::new("none")?,
            tag: None,
            shards: Vec::new(),
            entries: Vec::new(),
        };
        if request.tag.is_empty() {
            let backup = crate::service::resolve_backup(&ctx.repo, &request.backup_id).await?;
            let chain = chain_of(&ctx.repo, &backup).await?;
            let backup_manifest = ctx.repo.backup_manifest(&backup).await?;
            for shard in &backup_manifest.shards {
                manifest.shards.push(ExportedShard {
                    shard_id: shard.shard_id.clone(),
                    base: chain[0].clone(),
                    chain: chain[1..].to_vec(),
                    lineage: shard.lineage,
                    legs: Vec::new(),
                    target: shard.seq,
                });
            }
            manifest.entries = backup_entries(&ctx.repo, &chain).await?;
            manifest.backup_id = backup;
            manifest.encode()?;
            return Ok(Export {
                manifest,
                archive: None,
            });
        }
        if !request.backup_id.is_empty() {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                "export either a backup or a tag, not both",
            ));
        }
        let name = TagName::new(&request.tag)?;
        // Planned as a restore into a directory would be: nothing is asked of the agents.
        let plan = crate::restore::plan(
            ctx,
            PointInTime::Tag(name.clone()),
            RestoreTarget::Directory {
                template: "{shard}".into(),
                column_families: Vec::new(),
            },
            None,
        )
        .await?;
        let mut backups: Vec<(u64, BackupId)> = Vec::new();
        let mut wal = Vec::new();
        for shard in &plan.shards {
            let base = shard.base.clone().ok_or_else(|| {
                Error::new(
                    ErrorCode::BackupNotFound,
                    format!(
                        "tag {name}: shard {} has no backup at or before the tag (it would be rebuilt from its whole WAL); take a full backup before exporting",
                        shard.agent.shard_id
                    ),
                )
            })?;
            for backup in std::iter::once(&base).chain(&shard.chain) {
                if !backups.iter().any(|(_, b)| b == backup) {
                    let commit = ctx.repo.backup_manifest(backup).await?.commit_seq;
                    backups.push((commit, backup.clone()));
                }
            }
            manifest.shards.push(ExportedShard {
                shard_id: shard.agent.shard_id.clone(),
                base,
                chain: shard.chain.clone(),
                lineage: shard.lineage,
                legs: shard.legs.clone(),
                target: shard.target,
            });
            wal.extend(shard.wal.iter().cloned());
        }
        // Parents before children: the commit order.
        backups.sort();
        let backups: Vec<BackupId> = backups.into_iter().map(|(_, b)| b).collect();
        manifest.entries = backup_entries(&ctx.repo, &backups).await?;
        let archive = if wal.is_empty() {
            None
        } else {
            Some(open_archive(&plan.wal_from, &ctx.security, ctx.repo.seal()).await?)
        };
        if let Some(archive) = &archive {
            for info in wal {
                let size = archive.get_wal_stored(&info).await?.len() as u64;
                manifest.entries.push(Entry::WalSegment {
                    shard_id: info.shard_id.clone(),
                    lineage: info.lineage,
                    file_name: info.file_name(),
                    size,
                });
            }
        }
        let tag = Entry::Tag {
            name: name.clone(),
            size: 0,
        };
        manifest.entries.push(sized(&ctx.repo, tag).await?);
        manifest.backup_id = backups.first().cloned().ok_or_else(|| {
            Error::new(
                ErrorCode::BackupNotFound,
                format!("tag {name} names no backup"),
            )
        })?;
        manifest.tag = Some(name);
        manifest.encode()?;
        Ok(Export { manifest, archive })
    }

    /// Streams the file: each entry read and handed to the writer in order; the last message
    /// says the file is complete. The stream ends with an error status if anything fails, or
    /// without that message if the export stopped (the file is then cut short, and any
    /// reader refuses it).
    pub fn stream(
        self,
        ctx: &ClusterContext,
    ) -> mpsc::Receiver<std::result::Result<v1::ExportChunk, Status>> {
        let (out, rx) = mpsc::channel(4);
        let (to_writer, entries) = mpsc::channel::<(Entry, Bytes)>(READ_AHEAD);
        let total: u64 = self.manifest.entries.iter().map(Entry::size).sum();
        let done = Arc::new(AtomicU64::new(0));
        let writer = {
            let (out, manifest, done) = (out.clone(), self.manifest.clone(), done.clone());
            tokio::task::spawn_blocking(move || {
                let sink = ChunkSink {
                    out: out.clone(),
                    buffer: Vec::with_capacity(CHUNK),
                    done,
                    total,
                    complete: false,
                };
                if let Err(err) = write_file(sink, &manifest, entries) {
                    let _ = out.blocking_send(Err(to_status(&err)));
                }
            })
        };
        let repo = ctx.repo.clone();
        tokio::spawn(async move {
            for entry in &self.manifest.entries {
                let bytes = match (entry, &self.archive) {
                    (Entry::WalSegment { .. }, Some(archive)) => match entry.segment() {
                        Ok(Some(info)) => archive.get_wal_stored(&info).await.map(Bytes::from),
                        Ok(None) => continue,
                        Err(err) => Err(err),
                    },
                    _ => repo.export_entry(entry).await,
                };
                match bytes {
                    Ok(bytes) => {
                        if to_writer.send((entry.clone(), bytes)).await.is_err() {
                            return; // the writer failed and said why
                        }
                    }
                    Err(err) => {
                        drop(to_writer);
                        let _ = writer.await;
                        let _ = out.send(Err(to_status(&err))).await;
                        return;
                    }
                }
                done.fetch_add(entry.size(), Ordering::Relaxed);
            }
        });
        rx
    }
}

/// The blocking side of an export: writes every entry it is handed, then the sums; an entry
/// missing (the reader stopped) leaves the file unfinished.
fn write_file(
    sink: ChunkSink,
    manifest: &ExportManifest,
    mut entries: mpsc::Receiver<(Entry, Bytes)>,
) -> Result<()> {
    let mut writer = ExportWriter::new(sink, manifest)?;
    for _ in 0..manifest.entries.len() {
        let Some((entry, bytes)) = entries.blocking_recv() else {
            // The reader failed and says why; the file never says it is complete.
            return Ok(());
        };
        writer.append(&entry, &bytes)?;
    }
    let mut sink = writer.finish()?;
    let sent = |err| Error::io(ErrorCode::StorageUnavailable, "stream the export", err);
    sink.flush().map_err(sent)?;
    sink.complete = true;
    sink.send().map_err(sent)
}

/// The file's bytes, in messages of [`CHUNK`].
struct ChunkSink {
    out: mpsc::Sender<std::result::Result<v1::ExportChunk, Status>>,
    buffer: Vec<u8>,
    done: Arc<AtomicU64>,
    total: u64,
    /// Set for the last message.
    complete: bool,
}

impl ChunkSink {
    fn send(&mut self) -> std::io::Result<()> {
        let chunk = v1::ExportChunk {
            data: std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK)),
            entry_bytes_done: self.done.load(Ordering::Relaxed),
            entry_bytes_total: self.total,
            complete: self.complete,
        };
        self.out.blocking_send(Ok(chunk)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }
}

impl Write for ChunkSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= CHUNK {
            self.send()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buffer.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

/// The client's stream as a `Read` for the blocking reader.
struct ChunkSource {
    input: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChunkSource {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.input.blocking_recv() {
                Some(bytes) => self.current = bytes,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// What the blocking reader hands the importer.
enum Received {
    Manifest(ExportManifest),
    Entry(Entry, Vec<u8>),
}

/// An import received whole and checked, its objects and WAL stored, its manifests held for
/// [`publish`]; it holds GC off like a running backup until it is published or dropped.
pub struct Staged {
    importer: Importer,
    manifest: ExportManifest,
    _hold: crate::gc::BackupHold,
}

impl Staged {
    /// What `cluster status` shows while it is published.
    pub fn what(&self) -> String {
        match &self.manifest.tag {
            Some(tag) => format!("import of tag {tag}"),
            None => format!("import of backup {}", self.manifest.backup_id),
        }
    }
}

/// Receives the file streamed in `input` into this coordinator's repository: everything but
/// the manifests, which [`publish`] writes. The first message's `force` lets it into a
/// repository holding other backups.
pub async fn receive(
    ctx: &ClusterContext,
    mut input: impl futures::Stream<Item = std::result::Result<v1::ImportChunk, Status>>
    + Unpin
    + Send
    + 'static,
) -> Result<Staged> {
    use futures::StreamExt;
    let (bytes_tx, bytes_rx) = mpsc::channel::<Bytes>(4);
    let client_error = Arc::new(std::sync::Mutex::new(None::<Error>));
    let force = Arc::new(AtomicBool::new(false));
    let forward = {
        let (client_error, force) = (client_error.clone(), force.clone());
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let failed = match tokio::time::timeout(IMPORT_IDLE, input.next()).await {
                    Ok(None) => return,
                    Ok(Some(Ok(chunk))) => {
                        if std::mem::take(&mut first) {
                            force.store(chunk.force, Ordering::Relaxed);
                        }
                        if bytes_tx.send(Bytes::from(chunk.data)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Ok(Some(Err(status))) => {
                        lockstep_proto::from_status("the client's stream", &status)
                    }
                    Err(_) => Error::new(
                        ErrorCode::AgentUnavailable,
                        format!(
                            "the client sent nothing for {} s; the import stopped",
                            IMPORT_IDLE.as_secs()
                        ),
                    ),
                };
                *client_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(failed);
                return;
            }
        })
    };
    let (items_tx, mut items) = mpsc::channel::<Received>(READ_AHEAD);
    let reader = tokio::task::spawn_blocking(move || {
        let source = ChunkSource {
            input: bytes_rx,
            current: Bytes::new(),
        };
        let gone = || Error::new(ErrorCode::StorageUnavailable, "the import stopped");
        let entries_tx = items_tx.clone();
        read_export(
            source,
            |manifest| {
                items_tx
                    .blocking_send(Received::Manifest(manifest.clone()))
                    .map_err(|_| gone())
            },
            |entry, bytes| {
                entries_tx
                    .blocking_send(Received::Entry(entry.clone(), bytes))
                    .map_err(|_| gone())
            },
        )
    });
    // Like a backup: a GC sweep waits for this import or tells it what it condemned.
    let hold = ctx.sweep.enter_backup().await;
    let repo = match &hold.condemned {
        Some(filter) => ctx.repo.avoiding(Arc::new(Condemned::from_wire(
            &filter.bits,
            filter.hashes,
            filter.count,
        )?)),
        None => ctx.repo.clone(),
    };
    let mut importer = None;
    let mut failed = None;
    while let Some(item) = items.recv().await {
        let step = match item {
            Received::Manifest(manifest) => {
                Importer::new(repo.clone(), &manifest, force.load(Ordering::Relaxed))
                    .await
                    .map(|new| importer = Some(new))
            }
            Received::Entry(entry, bytes) => match importer.as_mut() {
                Some(importer) => importer.entry(&entry, bytes).await,
                None => Ok(()),
            },
        };
        if let Err(err) = step {
            failed = Some(err);
            break;
        }
    }
    // The reader ends once nothing more comes from the client or nobody takes its entries.
    drop(items);
    forward.abort();
    let read = reader
        .await
        .map_err(|err| Error::with_source(ErrorCode::StorageUnavailable, "import task", err))?;
    let client_error = client_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    // The first cause: the importer's own failure (the reader then stops for want of a
    // taker, or meets the end of a stream cut short), else the client's, else the reader's.
    let manifest = match (failed, client_error, read) {
        (Some(err), _, _) | (None, Some(err), _) | (None, None, Err(err)) => return Err(err),
        (None, None, Ok(manifest)) => manifest,
    };
    let importer = importer.ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidArgument,
            "the export file holds no manifest",
        )
    })?;
    Ok(Staged {
        importer,
        manifest,
        _hold: hold,
    })
}

/// Publishes a received import: under `ClusterOps` (no backup commits, delete or retention
/// runs meanwhile, and it runs to its end whatever its client does), after a fence check.
pub async fn publish(ctx: &ClusterContext, staged: Staged) -> Result<ImportReport> {
    ctx.fence.check("publish an imported backup").await?;
    let Staged {
        importer,
        manifest,
        _hold,
    } = staged;
    let report = importer.publish().await;
    match &report {
        Ok(report) => tracing::info!(
            backups = ?report.backups,
            tag = ?manifest.tag,
            objects = report.objects,
            "imported an export file from {}",
            manifest.source
        ),
        Err(err) => {
            tracing::warn!(error = %err.chain(), "an import from {} failed", manifest.source)
        }
    }
    report
}
