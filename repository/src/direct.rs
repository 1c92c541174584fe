//! Reading and writing local files around the page cache (`O_DIRECT`) where the data allows
//! it.
//!
//! A buffered write copies every byte into the page cache, and on a VM whose free memory is
//! handed back to the host, each fresh page-cache page also costs a host page fault: measured
//! with perf, that copy was 37% of a local backup's CPU, more than SHA-256, and a 1.6 GiB
//! copy with `dd` took 2.5-4.6 s buffered against 2.2-2.4 s with `oflag=direct`. Chunk
//! buffers start page-aligned (`buffers.rs`) and chunks sit at page multiples in their files
//! and objects (`codec.rs`, version 2), so a chunk goes from its buffer to the disk directly.
//!
//! Reads of chunks and objects go around it too: a buffered read copies every byte out of the
//! page cache (`_copy_to_iter`, 19% of a backup's CPU in perf on the bench's LZ4 shard) and
//! fills the cache with files read once.
//!
//! Anything the device cannot take directly (an unaligned buffer or offset, the tail after
//! the last full page, a filesystem without `O_DIRECT` such as some tmpfs or FUSE mounts) is
//! written through the page cache as before. Direct I/O is a path, not a durability
//! guarantee: callers still fsync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::buffers::{PAGE, PooledBuffer};

/// Reads smaller than this go through the page cache: they gain nothing from going around
/// it, and a direct read of a small file written a moment ago (a record) would first force
/// its dirty pages out to the device.
pub const DIRECT_READ_MIN: usize = 256 * 1024;

/// Appends the `len` bytes at `offset` of `file` to `buffer`: around the page cache when
/// `len` is at least [`DIRECT_READ_MIN`], `offset` and the end of `buffer`'s contents are
/// page-aligned and the filesystem takes `O_DIRECT`, through it otherwise. `O_DIRECT` is set
/// on `file`'s open file description for the read and cleared after, so `file` is one the
/// caller opened for its own reads. A file that ends before is an `UnexpectedEof` error, and
/// `buffer` is left as it was on any error.
///
/// One open file is read from its length to its bytes: a record replaced by a rename while
/// it is read is read whole, old or new, never the start of one cut to the other's length.
pub fn read_exact_at(
    file: &File,
    offset: u64,
    len: usize,
    buffer: &mut PooledBuffer,
) -> io::Result<()> {
    let at = buffer.len();
    let aligned = offset.is_multiple_of(PAGE as u64)
        && at.is_multiple_of(PAGE)
        && buffer.contents().as_ptr().align_offset(PAGE) == 0;
    let flags = rustix::fs::fcntl_getfl(file)?;
    let direct = len >= DIRECT_READ_MIN
        && aligned
        // Refused (EINVAL) where the filesystem has no `O_DIRECT`.
        && rustix::fs::fcntl_setfl(file, flags | rustix::fs::OFlags::DIRECT).is_ok();
    if direct {
        let read = read_pages(file, offset, len, buffer, true);
        if let Err(err) = rustix::fs::fcntl_setfl(file, flags) {
            buffer.truncate(at);
            return Err(err.into());
        }
        match read {
            Ok(()) => return Ok(()),
            // The device wants a larger alignment than a page: read it buffered.
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
            Err(err) => return Err(err),
        }
    }
    read_pages(file, offset, len, buffer, false)
}

/// Reads until `len` bytes are in or the file ends; a direct read asks for whole pages (a
/// short one is the end of the file) and drops what it read past `len`.
fn read_pages(
    file: &File,
    offset: u64,
    len: usize,
    buffer: &mut PooledBuffer,
    direct: bool,
) -> io::Result<()> {
    let at = buffer.len();
    let target = buffer.extend_unfilled(if direct {
        len.next_multiple_of(PAGE)
    } else {
        len
    });
    let mut filled = 0;
    let mut failed = None;
    while filled < len {
        match file.read_at(&mut target[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(got) => {
                filled += got;
                if direct && !got.is_multiple_of(PAGE) {
                    break;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                failed = Some(err);
                break;
            }
        }
    }
    if let Some(err) = failed {
        buffer.truncate(at);
        return Err(err);
    }
    if filled < len {
        buffer.truncate(at);
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{filled} of {len} bytes at offset {offset}: the file ends before"),
        ));
    }
    buffer.truncate(at + len);
    Ok(())
}

/// A file written at offsets, through a direct handle when the data is aligned.
#[derive(Debug)]
pub struct DirectWriter {
    buffered: File,
    /// `None` where the filesystem refuses `O_DIRECT`.
    direct: Option<File>,
    /// Cleared when the device refused a page-aligned direct write: everything goes buffered.
    direct_works: AtomicBool,
}

impl DirectWriter {
    /// Wraps `file`, open for writing at `path`, and opens a direct handle to it if the
    /// filesystem allows.
    pub fn new(file: File, path: &Path) -> DirectWriter {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        DirectWriter {
            buffered: file,
            direct,
            direct_works: AtomicBool::new(true),
        }
    }

    /// The buffered handle: for `sync_all`, `set_len` and metadata.
    pub fn file(&self) -> &File {
        &self.buffered
    }

    /// Writes all of `data` at `offset`: the whole pages directly when `data` starts
    /// page-aligned at a page-aligned offset, the rest through the page cache.
    pub fn write_all_at(&self, mut data: &[u8], mut offset: u64) -> io::Result<()> {
        let aligned = data.as_ptr().align_offset(PAGE) == 0 && offset.is_multiple_of(PAGE as u64);
        let whole_pages = if aligned { data.len() / PAGE * PAGE } else { 0 };
        let direct = self
            .direct
            .as_ref()
            .filter(|_| whole_pages > 0 && self.direct_works.load(Ordering::Relaxed));
        if let Some(direct) = direct {
            match direct.write_all_at(&data[..whole_pages], offset) {
                Ok(()) => {
                    data = &data[whole_pages..];
                    offset += whole_pages as u64;
                }
                // The device wants a larger alignment than a page: write it all buffered
                // (rewriting whatever went directly is harmless), and from now on.
                Err(err) if err.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    self.direct_works.store(false, Ordering::Relaxed);
                }
                Err(err) => return Err(err),
            }
        }
        self.buffered.write_all_at(data, offset)
    }
}

/// Creates the file `path` holding `parts` one after the other, atomically and only if no file
/// is there: returns false, and leaves the existing file alone, if one is. The parent
/// directory is created if needed (and its own entry synced).
///
/// The file is written as `<path>#<n>`, synced, then hard-linked into place (as object_store's
/// local store does; its listings skip such names), so whatever appears at `path`, even
/// after a crash, is complete. The new directory entry is not synced: the caller syncs the
/// directory.
pub fn create_file(path: &Path, parts: [&[u8]; 2]) -> io::Result<bool> {
    let (file, staging) = create_staging(path)?;
    let writer = DirectWriter::new(file, &staging);
    let written = (|| {
        let mut offset = 0u64;
        for part in parts {
            writer.write_all_at(part, offset)?;
            offset += part.len() as u64;
        }
        writer.file().sync_all()?;
        std::fs::hard_link(&staging, path)
    })();
    drop(writer);
    // Linked or not, the staging name goes; a leftover one is skipped by listings.
    let _ = std::fs::remove_file(&staging);
    match written {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(err),
    }
}

fn create_staging(path: &Path) -> io::Result<(File, PathBuf)> {
    let mut attempt = 1u32;
    loop {
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!("#{attempt}"));
        let staging = PathBuf::from(staging);
        match File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(file) => return Ok((file, staging)),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && attempt < 1000 => {
                attempt += 1;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound && attempt == 1 => {
                create_dirs(path.parent().unwrap_or(Path::new(".")))?;
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Creates `dir` and its missing ancestors, and syncs the directory holding each new one, so
/// files synced into them stay reachable after a crash.
fn create_dirs(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        if let Some(holder) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(holder)?.sync_all()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffers::BufferPool;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn reads_return_exactly_the_bytes_asked_for_direct_or_not_and_refuse_a_short_file()
    -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let len = 3 * DIRECT_READ_MIN + 1000;
        let data = pattern(len);
        std::fs::write(&path, &data)?;
        let probe = File::open(&path)?;
        let flags = rustix::fs::fcntl_getfl(&probe)?;
        assert!(
            rustix::fs::fcntl_setfl(&probe, flags | rustix::fs::OFlags::DIRECT).is_ok(),
            "the test directory's filesystem takes O_DIRECT, so the direct path is tested"
        );
        let pool = BufferPool::default();
        // (what the buffer holds first, offset, length): direct whole pages and a tail,
        // unaligned offsets and buffers, and reads too small to go direct.
        for (prefix, offset, want) in [
            (0, 0, len),
            (0, PAGE, 2 * DIRECT_READ_MIN + 17),
            (PAGE, DIRECT_READ_MIN, DIRECT_READ_MIN),
            (3, 0, DIRECT_READ_MIN),
            (0, 5, DIRECT_READ_MIN),
            (0, 100, 10),
        ] {
            let mut buffer = pool.take(prefix + want);
            buffer.extend_unfilled(prefix).fill(9);
            let file = File::open(&path)?;
            read_exact_at(&file, offset as u64, want, &mut buffer)?;
            let flags = rustix::fs::fcntl_getfl(&file)?;
            assert!(
                !flags.contains(rustix::fs::OFlags::DIRECT),
                "the file is left as it was"
            );
            assert_eq!(buffer.len(), prefix + want);
            assert!(buffer.contents()[..prefix].iter().all(|b| *b == 9));
            assert_eq!(&buffer.contents()[prefix..], &data[offset..offset + want]);
        }
        for (offset, want) in [(0, len + 1), (PAGE, len), (len, 1)] {
            let mut buffer = pool.take(want);
            let err = read_exact_at(&File::open(&path)?, offset as u64, want, &mut buffer)
                .err()
                .map(|err| err.kind());
            assert_eq!(err, Some(io::ErrorKind::UnexpectedEof), "{offset} {want}");
            assert!(buffer.is_empty(), "nothing of a failed read stays");
        }
        Ok(())
    }

    #[test]
    fn a_file_replaced_by_a_rename_is_read_whole_from_the_open_file() -> io::Result<()> {
        // A record is replaced by writing a new file and renaming it over the old one: a
        // reader that took the old one's length must get the old one's bytes, not the start
        // of the new one (a torn record reads as damaged, and a GC candidate record read as
        // damaged counts as empty).
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("record");
        let (old, new) = (pattern(DIRECT_READ_MIN), vec![1u8; 2 * DIRECT_READ_MIN]);
        std::fs::write(&path, &old)?;
        let file = File::open(&path)?;
        let len = file.metadata()?.len() as usize;
        let replacement = dir.path().join("record.new");
        std::fs::write(&replacement, &new)?;
        std::fs::rename(&replacement, &path)?;
        let pool = BufferPool::default();
        for len in [len, 100] {
            let mut buffer = pool.take(len);
            read_exact_at(&file, 0, len, &mut buffer)?;
            assert_eq!(buffer.contents(), &old[..len]);
        }
        Ok(())
    }

    #[test]
    fn aligned_and_unaligned_writes_land_where_they_belong() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let writer = DirectWriter::new(File::create_new(&path)?, &path);
        assert!(
            writer.direct.is_some(),
            "the test directory's filesystem takes O_DIRECT"
        );
        let data = pattern(3 * PAGE + 123);
        let mut aligned = BufferPool::default().take(data.len());
        aligned.read_from(&data[..], data.len() as u64)?;
        // Page-aligned at a page offset (direct, then a buffered tail), then unaligned.
        writer.write_all_at(aligned.contents(), PAGE as u64)?;
        writer.write_all_at(&data[1..PAGE], 1)?;
        writer.file().sync_all()?;
        let on_disk = std::fs::read(&path)?;
        assert_eq!(on_disk.len(), 4 * PAGE + 123);
        assert_eq!(on_disk[0], 0);
        assert_eq!(&on_disk[1..PAGE], &data[1..PAGE]);
        assert_eq!(&on_disk[PAGE..], &data[..]);
        Ok(())
    }

    #[test]
    fn create_file_publishes_once_and_leaves_no_staging_file() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ab").join("object");
        let body = pattern(2 * PAGE + 7);
        let mut buffer = BufferPool::default().take(body.len());
        buffer.read_from(&body[..], body.len() as u64)?;
        assert!(create_file(&path, [buffer.contents(), b"tail"])?);
        assert!(
            !create_file(&path, [b"other", b""])?,
            "an existing file stays"
        );
        let mut expected = body.clone();
        expected.extend_from_slice(b"tail");
        assert_eq!(std::fs::read(&path)?, expected);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap_or(dir.path()))?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        assert_eq!(names, vec![std::ffi::OsString::from("object")]);
        Ok(())
    }
}
