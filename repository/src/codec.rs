//! The data-object codec: plaintext → framed, possibly compressed bytes, and back.
//!
//! ```text
//! offset 0  magic  "LKSO"
//!        4  format version (1 or 2)
//!        5  codec: 0 = stored, 1 = zstd
//!        6  reserved (0, 0)
//!        8  plaintext length, u64 little endian
//!       16  payload (version 1)
//!     4096  payload (version 2; bytes 16..4096 are zero)
//! ```
//!
//! Version 2 frames a stored (uncompressed) chunk in the buffer it was read into: the chunk
//! is read one page after the buffer's start, the header goes in front of it, and the whole
//! object is written without a copy, with direct I/O on a local repository (`direct.rs`); on
//! restore, its payload is page-aligned and goes to the restored file the same way. Compressed
//! objects, WAL segments, chunks under a page and every object on a remote store use version
//! 1 ([`Encoded::unpaged`]). Readers accept both; binaries from before version 2 reject it
//! as an unknown format.
//!
//! An object's name is the SHA-256 of its plaintext. Compression is used only when it pays:
//! a zstd-1 probe of the first 64 KiB must save at least 10% for the chunk to be compressed,
//! and the result is kept only when it saves at least 3%, so incompressible data
//! (already-compressed SST blocks) costs one probe.
//!
//! Architecture invariant: `decode` returns plaintext only after re-hashing it against the
//! expected id; a reader never sees unverified bytes.

use sha2::{Digest, Sha256};

use crate::buffers::PooledBuffer;
use crate::error::{Error, ErrorCode, Result};
use crate::ids::ObjectId;

const MAGIC: &[u8; 4] = b"LKSO";
/// Version 1: the payload follows the header.
const FORMAT_VERSION: u8 = 1;
/// Version 2: the payload starts one page in ([`HEADER_ROOM`]).
const FORMAT_VERSION_PAGED: u8 = 2;
pub const HEADER_LEN: usize = 16;
/// Room a chunk buffer keeps in front of the chunk for a version-2 header: where a version-2
/// payload starts (a format constant: never derive it from the I/O page size).
pub const HEADER_ROOM: usize = 4096;
const _: () = assert!(HEADER_ROOM.is_multiple_of(crate::buffers::PAGE));
const CODEC_STORED: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const PROBE_LEN: usize = 64 * 1024;

/// Compression settings for new objects.
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    /// zstd level; 0 disables compression.
    pub zstd_level: i32,
}

impl Default for Compression {
    fn default() -> Self {
        Compression { zstd_level: 1 }
    }
}

/// An encoded object, ready to store.
#[derive(Debug)]
pub struct Encoded {
    pub id: ObjectId,
    pub plaintext_len: u64,
    pub frame: Frame,
    pub compressed: bool,
}

/// The bytes of a stored object.
#[derive(Debug)]
pub enum Frame {
    /// The whole object in one buffer (version 2, stored: the chunk's own buffer), starting
    /// page-aligned.
    Whole(bytes::Bytes),
    /// A version-1 header and the payload apart, so a payload is never copied behind it.
    Split([u8; HEADER_LEN], bytes::Bytes),
}

impl Encoded {
    /// Bytes the object takes in the repository.
    pub fn stored_len(&self) -> u64 {
        self.parts().iter().map(|part| part.len() as u64).sum()
    }

    /// The object's bytes, in order, in at most two pieces.
    pub fn parts(&self) -> [&[u8]; 2] {
        match &self.frame {
            Frame::Whole(whole) => [whole, &[]],
            Frame::Split(header, payload) => [header, payload],
        }
    }

    /// The object in format 1: a stored chunk's padding page dropped, without a copy (for
    /// stores and sizes where a page-aligned payload buys nothing).
    pub fn unpaged(self) -> Encoded {
        match self.frame {
            Frame::Whole(whole) if whole.len() >= HEADER_ROOM => Encoded {
                frame: Frame::Split(
                    header(FORMAT_VERSION, CODEC_STORED, self.plaintext_len),
                    whole.slice(HEADER_ROOM..),
                ),
                ..self
            },
            frame => Encoded { frame, ..self },
        }
    }

    /// The whole stored object in one buffer (a copy; for small objects such as WAL segments).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts().concat()
    }
}

fn header(version: u8, codec: u8, plaintext_len: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4] = version;
    out[5] = codec;
    out[8..].copy_from_slice(&plaintext_len.to_le_bytes());
    out
}

/// True when a probe compressed well enough to be worth compressing the whole chunk: at
/// least 10% saved. Below that (already-compressed SST blocks, for instance) zstd costs more
/// time than the bytes it saves are worth; measured with `make bench`.
fn probe_pays(plain: usize, compressed: usize) -> bool {
    compressed * 10 <= plain * 9
}

/// True when saving `compressed` instead of `plain` bytes is worth the decompression.
fn pays(plain: usize, compressed: usize) -> bool {
    compressed + plain / 32 < plain
}

/// Hashes and encodes one plaintext (a small object: a stored one is copied behind its
/// header). CPU-bound: call it off the async workers.
pub fn encode(plaintext: &[u8], compression: Compression) -> Result<Encoded> {
    let id = ObjectId::of(plaintext);
    match compress(&id, plaintext, compression)? {
        Some(encoded) => Ok(encoded),
        None => Ok(Encoded {
            id,
            plaintext_len: plaintext.len() as u64,
            frame: Frame::Split(
                header(FORMAT_VERSION, CODEC_STORED, plaintext.len() as u64),
                bytes::Bytes::copy_from_slice(plaintext),
            ),
            compressed: false,
        }),
    }
}

/// Encodes a chunk whose id the caller has computed with [`ObjectId::of`] over
/// `buffer[HEADER_ROOM..]`; the first [`HEADER_ROOM`] bytes of `buffer` are free for the
/// header. A chunk of a page or more stored uncompressed becomes the object in place
/// (version 2), without a copy; a smaller one goes in version 1, also without a copy.
pub fn encode_in_place(
    id: ObjectId,
    mut buffer: PooledBuffer,
    compression: Compression,
) -> Result<Encoded> {
    let plaintext = buffer.contents().get(HEADER_ROOM..).ok_or_else(|| {
        Error::new(
            ErrorCode::BackupCreationFailed,
            format!("object {id}: the buffer has no room for its header"),
        )
    })?;
    let plaintext_len = plaintext.len() as u64;
    if let Some(encoded) = compress(&id, plaintext, compression)? {
        return Ok(encoded);
    }
    buffer.as_mut_slice()[..HEADER_LEN].copy_from_slice(&header(
        FORMAT_VERSION_PAGED,
        CODEC_STORED,
        plaintext_len,
    ));
    let encoded = Encoded {
        id,
        plaintext_len,
        frame: Frame::Whole(bytes::Bytes::from_owner(buffer)),
        compressed: false,
    };
    // Under a page nothing is written directly, and the padding would double the object.
    Ok(if plaintext_len < crate::buffers::PAGE as u64 {
        encoded.unpaged()
    } else {
        encoded
    })
}

/// The object compressed (version 1), or `None` when compression does not pay.
fn compress(id: &ObjectId, bytes: &[u8], compression: Compression) -> Result<Option<Encoded>> {
    if compression.zstd_level <= 0 || bytes.len() < 512 {
        return Ok(None);
    }
    let probe = &bytes[..bytes.len().min(PROBE_LEN)];
    let probe_pays = bytes.len() <= PROBE_LEN
        || zstd::bulk::compress(probe, 1)
            .map(|c| probe_pays(probe.len(), c.len()))
            .unwrap_or(true);
    if !probe_pays {
        return Ok(None);
    }
    let payload = zstd::bulk::compress(bytes, compression.zstd_level).map_err(|err| {
        Error::with_source(
            ErrorCode::BackupCompressionFailed,
            format!("compress object {id}"),
            err,
        )
    })?;
    if !pays(bytes.len(), payload.len()) {
        return Ok(None);
    }
    let plaintext_len = bytes.len() as u64;
    Ok(Some(Encoded {
        id: *id,
        plaintext_len,
        frame: Frame::Split(
            header(FORMAT_VERSION, CODEC_ZSTD, plaintext_len),
            payload.into(),
        ),
        compressed: true,
    }))
}

/// Decodes a stored object and checks that its plaintext hashes to `expected`. A stored
/// (uncompressed) object's plaintext is a slice of `stored`, not a copy.
pub fn decode(expected: &ObjectId, stored: bytes::Bytes) -> Result<bytes::Bytes> {
    decode_within(expected, stored, Limit::AtMost(MAX_PLAINTEXT))
}

/// No object's plaintext is larger (a chunk is at most a few MiB, a WAL segment 64 MiB).
const MAX_PLAINTEXT: u64 = 1 << 31;

/// [`decode`] for an object whose plaintext is at most `max` bytes (a WAL segment): a header
/// that declares more is refused before anything is decompressed or allocated.
pub fn decode_at_most(expected: &ObjectId, stored: bytes::Bytes, max: u64) -> Result<bytes::Bytes> {
    decode_within(expected, stored, Limit::AtMost(max))
}

/// The most bytes an object whose plaintext is `plaintext_len` bytes can take stored: the
/// header page and the plaintext (compression is kept only when it pays).
pub fn max_stored_len(plaintext_len: u64) -> u64 {
    plaintext_len.saturating_add(HEADER_ROOM as u64)
}

/// What a decoder knows of the plaintext's length before it decodes.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// A manifest records it exactly.
    Exact(u64),
    /// The kind of object bounds it.
    AtMost(u64),
}

/// [`decode`] for an object whose plaintext length a manifest records: a header that
/// declares another length is refused before anything is decompressed or allocated, so a
/// crafted object cannot make a reader allocate more than the chunk it stands for.
pub fn decode_sized(expected: &ObjectId, stored: bytes::Bytes, len: u64) -> Result<bytes::Bytes> {
    decode_within(expected, stored, Limit::Exact(len))
}

fn decode_within(expected: &ObjectId, stored: bytes::Bytes, limit: Limit) -> Result<bytes::Bytes> {
    let corrupt = |why: &str| {
        Error::new(
            ErrorCode::BackupChecksumMismatch,
            format!("object {expected}: {why}"),
        )
    };
    if stored.len() < HEADER_LEN || &stored[..4] != MAGIC {
        return Err(corrupt("bad object header"));
    }
    if stored[6..8] != [0, 0] {
        return Err(corrupt("reserved header bytes are not zero"));
    }
    let payload_at = match stored[4] {
        FORMAT_VERSION => HEADER_LEN,
        FORMAT_VERSION_PAGED if stored.len() >= HEADER_ROOM => {
            if stored[HEADER_LEN..HEADER_ROOM].iter().any(|b| *b != 0) {
                return Err(corrupt("the header page's padding is not zero"));
            }
            HEADER_ROOM
        }
        FORMAT_VERSION_PAGED => return Err(corrupt("truncated object header")),
        other => {
            return Err(corrupt(&format!("unknown object format version {other}")));
        }
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&stored[8..16]);
    let plaintext_len = u64::from_le_bytes(len_bytes);
    if plaintext_len > MAX_PLAINTEXT {
        return Err(corrupt(&format!(
            "its header declares {plaintext_len} bytes, more than any object holds"
        )));
    }
    match limit {
        Limit::Exact(len) if len != plaintext_len => {
            return Err(corrupt(&format!(
                "its header declares {plaintext_len} bytes, the manifest {len}"
            )));
        }
        Limit::AtMost(max) if plaintext_len > max => {
            return Err(corrupt(&format!(
                "its header declares {plaintext_len} bytes, more than the {max} such an object holds"
            )));
        }
        _ => {}
    }
    let payload = &stored[payload_at..];
    let plaintext = match stored[5] {
        CODEC_STORED => stored.slice(payload_at..),
        CODEC_ZSTD => {
            let capacity = usize::try_from(plaintext_len)
                .map_err(|_| corrupt("implausible plaintext length"))?;
            // Stored bytes that do not decompress were damaged after they were written: the
            // operator's problem is corruption, so it is reported as a checksum mismatch.
            zstd::bulk::decompress(payload, capacity)
                .map_err(|err| {
                    Error::with_source(
                        ErrorCode::BackupChecksumMismatch,
                        format!("object {expected}: stored payload does not decompress"),
                        err,
                    )
                })?
                .into()
        }
        other => return Err(corrupt(&format!("unknown codec {other}"))),
    };
    if plaintext.len() as u64 != plaintext_len {
        return Err(corrupt(&format!(
            "plaintext is {} bytes, header says {plaintext_len}",
            plaintext.len()
        )));
    }
    let actual = ObjectId::from_digest(Sha256::digest(&plaintext).into());
    if &actual != expected {
        return Err(corrupt(&format!("content hashes to {actual}")));
    }
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_declaring_another_length_than_the_manifest_is_refused_before_decompression()
    -> Result<()> {
        let plain = vec![7u8; 100_000];
        let encoded = encode(&plain, Compression::default())?;
        let id = encoded.id;
        let stored: bytes::Bytes = encoded.to_vec().into();
        assert_eq!(decode_sized(&id, stored.clone(), 100_000)?, plain);
        let err = decode_sized(&id, stored.clone(), 99_999).expect_err("other length");
        assert_eq!(err.code, ErrorCode::BackupChecksumMismatch);
        assert!(err.message.contains("declares 100000 bytes"), "{err}");

        // A crafted header claiming 2 GiB for a few bytes of payload: refused at once, where
        // `decode` alone would reserve the 2 GiB before zstd saw the payload.
        let mut bomb = stored.to_vec();
        bomb[8..16].copy_from_slice(&(2u64 << 30).to_le_bytes());
        let err = decode_sized(&id, bomb.into(), 100_000).expect_err("bomb");
        assert_eq!(err.code, ErrorCode::BackupChecksumMismatch);
        assert!(err.message.contains("declares 2147483648 bytes"), "{err}");
        Ok(())
    }

    #[test]
    fn compressible_data_is_compressed_and_round_trips() -> Result<()> {
        let plain = vec![7u8; 100_000];
        let encoded = encode(&plain, Compression::default())?;
        assert!(encoded.compressed);
        assert!(encoded.stored_len() < 1000);
        assert_eq!(decode(&encoded.id, encoded.to_vec().into())?, plain);
        Ok(())
    }

    fn incompressible(len: usize) -> Vec<u8> {
        let mut state = 0x9e3779b97f4a7c15u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// A chunk encoded as the upload does it: read into a buffer after its header room,
    /// then encoded in place.
    fn encode_chunk(plain: &[u8]) -> Result<Encoded> {
        let mut buffer = crate::buffers::BufferPool::default().take(HEADER_ROOM + plain.len());
        buffer.extend_zeroed(HEADER_ROOM);
        let read = buffer.read_from(plain, plain.len() as u64);
        assert_eq!(read.ok(), Some(plain.len()));
        encode_in_place(ObjectId::of(plain), buffer, Compression::default())
    }

    #[test]
    fn an_incompressible_chunk_is_stored_in_place_with_its_payload_page_aligned() -> Result<()> {
        let plain = incompressible(300_000);
        let encoded = encode_chunk(&plain)?;
        assert!(!encoded.compressed);
        let Frame::Whole(whole) = &encoded.frame else {
            panic!("a stored chunk is one buffer");
        };
        assert_eq!(whole.as_ptr() as usize % crate::buffers::PAGE, 0);
        assert_eq!(encoded.stored_len(), (HEADER_ROOM + plain.len()) as u64);
        assert_eq!(whole[4], FORMAT_VERSION_PAGED);
        let decoded = decode(&encoded.id, whole.clone())?;
        assert_eq!(decoded, plain);
        assert_eq!(decoded.as_ptr() as usize % crate::buffers::PAGE, 0);
        let small = encode_chunk(&plain[..100])?;
        assert!(
            matches!(small.frame, Frame::Split(..)),
            "under a page: format 1"
        );
        assert_eq!(small.stored_len(), (HEADER_LEN + 100) as u64);
        Ok(())
    }

    #[test]
    fn a_compressible_chunk_is_compressed_from_its_buffer() -> Result<()> {
        let plain = vec![3u8; 200_000];
        let encoded = encode_chunk(&plain)?;
        assert!(encoded.compressed);
        assert_eq!(decode(&encoded.id, encoded.to_vec().into())?, plain);
        Ok(())
    }

    #[test]
    fn a_damaged_or_truncated_paged_object_is_a_checksum_mismatch_not_a_panic() -> Result<()> {
        let plain = incompressible(10_000);
        let encoded = encode_chunk(&plain)?;
        let (id, bytes) = (encoded.id, encoded.to_vec());
        let mut padded = bytes.clone();
        padded[HEADER_ROOM - 1] = 1;
        let err = decode(&id, padded.into()).err().map(|e| e.code);
        assert_eq!(
            err,
            Some(ErrorCode::BackupChecksumMismatch),
            "damaged padding"
        );
        let unpaged = encoded.unpaged();
        assert!(matches!(unpaged.frame, Frame::Split(..)));
        assert_eq!(unpaged.stored_len(), (HEADER_LEN + plain.len()) as u64);
        assert_eq!(decode(&unpaged.id, unpaged.to_vec().into())?, plain);
        for len in [HEADER_LEN, HEADER_ROOM - 1, HEADER_ROOM + 5] {
            let err = decode(&id, bytes[..len].to_vec().into())
                .err()
                .map(|e| e.code);
            assert_eq!(err, Some(ErrorCode::BackupChecksumMismatch), "{len} bytes");
        }
        Ok(())
    }

    #[test]
    fn incompressible_data_is_stored_as_is() -> Result<()> {
        let plain = incompressible(200_000);
        let encoded = encode(&plain, Compression::default())?;
        assert!(!encoded.compressed);
        assert_eq!(encoded.stored_len(), (plain.len() + HEADER_LEN) as u64);
        assert_eq!(decode(&encoded.id, encoded.to_vec().into())?, plain);
        Ok(())
    }

    #[test]
    fn a_flipped_byte_is_a_checksum_mismatch() -> Result<()> {
        for plain in [vec![1u8; 10_000], b"short".to_vec()] {
            let encoded = encode(&plain, Compression::default())?;
            let mut bytes = encoded.to_vec();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x40;
            let err = decode(&encoded.id, bytes.into()).err().map(|e| e.code);
            assert_eq!(err, Some(ErrorCode::BackupChecksumMismatch));
        }
        Ok(())
    }
}
