//! The disk's own copy floor: the files of a shard copied with direct I/O (no page cache, no
//! hashing, no compression), `threads` chunks of 8 MiB in flight, each file fsynced, as its
//! own process. Backup and restore both read and write about the shard's bytes on the same
//! disk, so no copy tool does either faster than this on the same files by much; every
//! contender's time is also reported as a ratio to it, measured in the same pair of runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use lockstep_repository::buffers::BufferPool;
use lockstep_repository::direct::{DirectWriter, read_exact_at};

const CHUNK: u64 = 8 << 20;

struct Target {
    source: PathBuf,
    writer: DirectWriter,
    /// Chunks not written yet; the writer of the last one fsyncs the file.
    remaining: AtomicUsize,
}

/// Copies every regular file of `from` into `to` (created), then fsyncs `to`.
pub fn copy(from: &Path, to: &Path, threads: usize) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    let mut jobs = Vec::new();
    for entry in std::fs::read_dir(from).with_context(|| format!("list {}", from.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let len = entry.metadata()?.len();
        let path = to.join(entry.file_name());
        let file = std::fs::File::create_new(&path)
            .with_context(|| format!("create {}", path.display()))?;
        let chunks = len.div_ceil(CHUNK);
        let target = Arc::new(Target {
            source: entry.path(),
            writer: DirectWriter::new(file, &path),
            remaining: AtomicUsize::new(chunks as usize),
        });
        for index in 0..chunks {
            let offset = index * CHUNK;
            jobs.push((target.clone(), offset, (len - offset).min(CHUNK) as usize));
        }
        if chunks == 0 {
            target.writer.file().sync_all()?;
        }
    }
    let next = AtomicUsize::new(0);
    let pool = BufferPool::default();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    while let Some((target, offset, len)) =
                        jobs.get(next.fetch_add(1, Ordering::Relaxed))
                    {
                        let mut buffer = pool.take(*len);
                        let source = std::fs::File::open(&target.source)
                            .with_context(|| format!("open {}", target.source.display()))?;
                        read_exact_at(&source, *offset, *len, &mut buffer)
                            .with_context(|| format!("read {}", target.source.display()))?;
                        target.writer.write_all_at(buffer.contents(), *offset)?;
                        if target.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                            target.writer.file().sync_all()?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(result) => result?,
                Err(_) => bail!("a copy thread panicked"),
            }
        }
        Ok(())
    })?;
    std::fs::File::open(to)?.sync_all()?;
    Ok(())
}
