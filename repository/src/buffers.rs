//! Reusable multi-MiB buffers for chunks and objects, page-aligned for direct I/O.
//!
//! A fresh multi-MiB allocation per chunk costs page faults, zeroing and memory-cgroup charges
//! in the kernel on every chunk, and hands the memory back to the system in between (measured
//! with perf on a backup: a quarter of its kernel time). A buffer returns to its pool when the
//! last reference to it drops, for instance when the `Bytes` holding it was written out.
//!
//! Every buffer's contents start at a [`PAGE`]-aligned address, so a buffer (or a slice of it
//! at a page multiple) can be written with `O_DIRECT` (`direct.rs`) as it is.

use std::io::Read;
use std::sync::{Arc, Mutex};

/// Buffers kept for reuse, at most this many.
const KEPT: usize = 32;

/// The alignment of buffer contents, and the unit of direct I/O: 4 KiB covers devices with
/// 512-byte and 4 KiB logical blocks.
pub const PAGE: usize = 4096;

/// Large buffers are allocated in multiples of this.
const SIZE_CLASS: usize = 1 << 20;

/// A pool of byte buffers. Cheap to clone; clones share the pool.
#[derive(Debug, Clone, Default)]
pub struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// A buffer from a [`BufferPool`], returned to it on drop. Its contents are the bytes
/// appended since it was taken.
#[derive(Debug)]
pub struct PooledBuffer {
    /// `start` bytes of padding, the contents (`start..end`), then whatever an earlier use of
    /// the allocation left: initialized memory that [`PooledBuffer::extend_unfilled`] hands
    /// out again without zeroing it (zeroing 8 MiB costs about 2 ms of a core on the bench
    /// machine, per chunk).
    buf: Vec<u8>,
    start: usize,
    end: usize,
    pool: BufferPool,
}

impl BufferPool {
    /// An empty buffer with room for at least `len` bytes, its contents page-aligned.
    pub fn take(&self, len: usize) -> PooledBuffer {
        let reused = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = reused.unwrap_or_default();
        // Room for the alignment and for `len` rounded up to whole pages (what a direct read
        // fills), so the buffer never grows, and never moves off its alignment, while in use;
        // a large one in whole MiB, so a chunk's read buffer and its compression buffer (a
        // few KiB more) are one size and each can reuse the other.
        let capacity = len.next_multiple_of(PAGE) + PAGE;
        let capacity = if capacity >= SIZE_CLASS {
            capacity.next_multiple_of(SIZE_CLASS)
        } else {
            capacity
        };
        if buf.capacity() < capacity {
            // A new allocation of exactly that size: nothing of the old one is worth copying,
            // and growing it would double it.
            buf = Vec::with_capacity(capacity);
        }
        // Always below PAGE for a byte pointer; anything else only costs the alignment.
        let start = buf.as_ptr().align_offset(PAGE).min(PAGE);
        if buf.len() < start {
            buf.resize(start, 0);
        }
        PooledBuffer {
            buf,
            start,
            end: start,
            pool: self.clone(),
        }
    }
}

impl PooledBuffer {
    /// Appends `len` zero bytes.
    pub fn extend_zeroed(&mut self, len: usize) {
        self.extend_unfilled(len).fill(0);
    }

    /// Appends `len` bytes of unspecified content (what an earlier use of the buffer left, or
    /// zeros) and returns them to be filled: the caller overwrites all of them, or
    /// [`PooledBuffer::truncate`]s what it did not fill.
    pub fn extend_unfilled(&mut self, len: usize) -> &mut [u8] {
        let (from, to) = (self.end, self.end + len);
        if self.buf.len() < to {
            self.buf.resize(to, 0);
        }
        self.end = to;
        &mut self.buf[from..to]
    }

    /// Keeps the first `len` bytes of the contents.
    pub fn truncate(&mut self, len: usize) {
        self.end = self.end.min(self.start + len);
    }

    /// Appends up to `max` bytes from `reader`; returns how many it appended (0 at the end of
    /// the input).
    pub fn read_from(&mut self, reader: impl Read, max: u64) -> std::io::Result<usize> {
        self.buf.truncate(self.end);
        let read = reader.take(max).read_to_end(&mut self.buf);
        self.end = self.buf.len();
        read
    }

    /// The pool the buffer returns to, for more buffers like it.
    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    /// The number of bytes of contents.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The contents, writable in place.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// The contents.
    pub fn contents(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut kept = self.pool.0.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < KEPT {
            kept.push(buf);
        }
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        self.contents()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_reused_empty() {
        let pool = BufferPool::default();
        let mut first = pool.take(1024);
        first.read_from(&b"abc"[..], 3).unwrap_or_default();
        let address = first.contents().as_ptr();
        drop(first);
        let second = pool.take(512);
        assert!(second.contents().is_empty());
        assert_eq!(
            second.contents().as_ptr(),
            address,
            "the same allocation came back"
        );
    }

    #[test]
    fn a_reused_buffer_shows_nothing_of_its_last_use_but_what_is_handed_out_to_fill() {
        let pool = BufferPool::default();
        let mut first = pool.take(64);
        first.extend_unfilled(8).copy_from_slice(b"secret!!");
        drop(first);
        let mut second = pool.take(64);
        second.extend_zeroed(4);
        assert_eq!(
            second.contents(),
            &[0; 4],
            "zeroed means zeros, reused or not"
        );
        let filled = second.extend_unfilled(3);
        filled.copy_from_slice(b"abc");
        assert_eq!(second.contents(), b"\0\0\0\0abc");
        second.truncate(5);
        assert_eq!(second.contents(), b"\0\0\0\0a");
        assert_eq!(second.read_from(&b"xyz"[..], 2).ok(), Some(2));
        assert_eq!(second.contents(), b"\0\0\0\0axy");
        assert_eq!(second.len(), 7);
        second.truncate(100);
        assert_eq!(second.len(), 7, "truncate never grows");
    }

    #[test]
    fn a_chunk_buffer_and_its_compression_buffer_reuse_one_allocation() {
        let pool = BufferPool::default();
        let chunk = 8 << 20;
        let read = pool.take(4096 + chunk);
        let address = read.contents().as_ptr();
        drop(read);
        // zstd's bound for 8 MiB, plus a header page: a few KiB more than the read buffer.
        let compressed = pool.take(4096 + chunk + chunk / 256 + 64);
        assert_eq!(compressed.contents().as_ptr(), address);
    }

    #[test]
    fn contents_start_page_aligned_and_grow_by_appends() -> std::io::Result<()> {
        let pool = BufferPool::default();
        for len in [1, 4096, 3 << 20] {
            let mut buffer = pool.take(len);
            assert_eq!(buffer.contents().as_ptr() as usize % PAGE, 0);
            buffer.extend_zeroed(2);
            assert_eq!(buffer.read_from(&[7u8; 10][..], 4)?, 4);
            buffer.as_mut_slice()[0] = 1;
            assert_eq!(buffer.contents(), &[1, 0, 7, 7, 7, 7]);
        }
        Ok(())
    }
}
